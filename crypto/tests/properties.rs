//! Property tests over random `(n, t)` and quorums. They use the loudly named
//! `insecure-test-only-key-reconstruction` feature (enabled for this crate's tests only)
//! to compute reference values from a rebuilt key.

// Tests state expectations with unwrap/expect/panic/indexing.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use proptest::prelude::*;
use quorate_crypto::error::Error;
use quorate_crypto::insecure_reconstruct::{reconstruct_key, reference_credential};
use quorate_crypto::keys::{KeyPurpose, KeyShare};
use quorate_crypto::params::{PartySet, SessionId};
use quorate_crypto::presign::PresignConfig;
use quorate_crypto::sim::{Attack, Cluster, test_rng};
use subtle::ConstantTimeEq;

/// `(n, t, seed)` with `n >= 2t + 1`, `n <= 7`.
fn setting() -> impl Strategy<Value = (u16, u16, u64)> {
    (1u16..=3)
        .prop_flat_map(|t| (2 * t + 1..=7u16, Just(t), any::<u64>()))
        .prop_map(|(n, t, s)| (n, t, s))
}

/// A random quorum of size `size` out of `1..=n`, from a seed.
fn quorum(n: u16, size: usize, seed: u64) -> Vec<u16> {
    let mut all: Vec<u16> = (1..=n).collect();
    let mut s = seed;
    for i in (1..all.len()).rev() {
        s = s
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        all.swap(i, (s >> 33) as usize % (i + 1));
    }
    all.truncate(size);
    all.sort_unstable();
    all
}

fn sim_wire(k: &quorate_crypto::keys::KeyPublic) -> quorate_crypto::keys::KeyPublic {
    quorate_crypto::sim::wire(k).unwrap()
}

fn cluster(n: u16, t: u16, seed: u64) -> Cluster {
    use rand::SeedableRng;
    Cluster::new(n, t, rand::rngs::StdRng::seed_from_u64(seed)).unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 10, ..ProptestConfig::default() })]

    #[test]
    fn derived_credentials_agree_across_quorums_and_match_reference(
        (n, t, seed) in setting(), q1 in any::<u64>(), q2 in any::<u64>(), extra in 0usize..=2
    ) {
        let mut c = cluster(n, t, seed);
        let key = c.dkg(KeyPurpose::Derive, Attack::None).unwrap();
        let ctx = format!("quorate/derive/v1|agent=a{seed}|task=t");
        let size1 = (usize::from(t) + 1 + extra).min(usize::from(n));
        let a = c.derive(key.key_id, ctx.as_bytes(), &quorum(n, size1, q1), Attack::None).unwrap();
        let b = c.derive(key.key_id, ctx.as_bytes(), &quorum(n, usize::from(t) + 1, q2), Attack::None).unwrap();
        prop_assert_eq!(a.secret_bytes(), b.secret_bytes());

        let shares: Vec<&KeyShare> = quorum(n, usize::from(t) + 1, q1)
            .iter()
            .map(|&i| &c.nodes[usize::from(i) - 1].shares[&key.key_id])
            .collect();
        let x = reconstruct_key(&shares).unwrap();
        prop_assert_eq!(x.public_image(), key.public_key().projective());
        let reference = reference_credential(&x, ctx.as_bytes()).unwrap();
        prop_assert_eq!(a.secret_bytes(), reference.secret_bytes());

        // Independent HKDF (aws-lc-rs) over the same input gives the same credential.
        let xp = quorate_crypto::group::mul(
            &quorate_crypto::hash::h2c("derive", ctx.as_bytes()).unwrap(),
            &quorate_crypto::group::scalar_from_bytes(&x.secret_bytes()[..]).unwrap(),
        );
        let xp = quorate_crypto::Point::new(xp).unwrap().to_bytes();
        let salt = aws_lc_rs::hkdf::Salt::new(aws_lc_rs::hkdf::HKDF_SHA256, &[]);
        let info = [ctx.as_bytes()];
        let prk = salt.extract(&xp);
        let okm = prk.expand(&info, aws_lc_rs::hkdf::HKDF_SHA256).unwrap();
        let mut out = [0u8; 32];
        okm.fill(&mut out).unwrap();
        prop_assert_eq!(&out, a.secret_bytes());
    }

    #[test]
    fn refresh_keeps_public_key_and_old_new_shares_never_combine(
        (n, t, seed) in setting(), q in any::<u64>()
    ) {
        let mut c = cluster(n, t, seed);
        let before = c.dkg(KeyPurpose::Sign, Attack::None).unwrap();
        let old: Vec<KeyShare> = c.nodes.iter().map(|nd| nd.shares[&before.key_id].clone()).collect();
        let after = c.refresh(before.key_id).unwrap();
        prop_assert_eq!(after.public_key(), before.public_key());
        prop_assert_eq!(after.epoch, before.epoch + 1);
        let new: Vec<KeyShare> = c.nodes.iter().map(|nd| nd.shares[&before.key_id].clone()).collect();

        let qs = quorum(n, usize::from(t) + 1, q);
        let pick = |v: &[KeyShare], i: u16| v[usize::from(i) - 1].clone();
        // Every share changed.
        for i in 1..=n {
            prop_assert!(!bool::from(
                reconstruct_key(&[&pick(&old, i)]).unwrap().ct_eq(&reconstruct_key(&[&pick(&new, i)]).unwrap())
            ));
        }
        // New shares alone rebuild the key; a mix of old and new does not.
        let new_q: Vec<KeyShare> = qs.iter().map(|&i| pick(&new, i)).collect();
        let x_new = reconstruct_key(&new_q.iter().collect::<Vec<_>>()).unwrap();
        prop_assert_eq!(x_new.public_image(), before.public_key().projective());
        let mut mixed: Vec<KeyShare> = new_q.clone();
        mixed[0] = pick(&old, qs[0]);
        let x_mixed = reconstruct_key(&mixed.iter().collect::<Vec<_>>()).unwrap();
        prop_assert_ne!(x_mixed.public_image(), before.public_key().projective());

        // The protocol refuses an old-epoch share: presigning checks the share's epoch.
        let mset: Vec<u16> = (1..=2 * t + 1).collect();
        let cfg = PresignConfig {
            session: SessionId([3; 32]),
            key: after.clone(),
            mset: PartySet::from_indices(&mset).unwrap(),
            sset: PartySet::from_indices(&mset[..usize::from(t) + 1]).unwrap(),
            batch: 1,
            roster: c.roster.clone(),
        };
        prop_assert!(cfg.check().is_ok());
        c.nodes[0].shares.insert(before.key_id, old[0].clone());
        let err = c.presign(before.key_id, &mset, &mset[..usize::from(t) + 1], 1, Attack::None).unwrap_err();
        prop_assert!(matches!(err, Error::InvalidInput(_)), "{:?}", err);
        // Restored, signing works and verifies under the unchanged public key.
        c.nodes[0].shares.insert(before.key_id, new[0].clone());
        c.presign(before.key_id, &mset, &mset[..usize::from(t) + 1], 1, Attack::None).unwrap();
        let d = quorate_crypto::hash::sha256(b"after refresh");
        let sig = c.sign(before.key_id, d, Attack::None).unwrap();
        prop_assert!(sig.verify(&before.public_key(), &d));
    }

    #[test]
    fn reshare_keeps_the_key_repairs_a_wiped_node_and_changes_the_threshold(
        (n, t, seed) in setting(), q in any::<u64>(), grow in any::<bool>()
    ) {
        // Room to grow: a cluster of up to 2t + 3 nodes (≤ 9), the key on the first n.
        let room = if grow { (n + 2).max(2 * (t + 1) + 1).min(9) } else { n };
        let mut c = cluster(room, t, seed);
        c.params = quorate_crypto::params::ThresholdParams::new(n, t).unwrap();
        let before = c.dkg(KeyPurpose::Sign, Attack::None).unwrap();
        let old: Vec<KeyShare> = (1..=n).map(|i| c.nodes[usize::from(i) - 1].shares[&before.key_id].clone()).collect();
        // One node loses its disk; t + 1 others deal.
        let dealers: Vec<u16> = quorum(n, usize::from(t) + 2, q);
        let wiped = dealers[usize::from(t) + 1];
        let dealers = &dealers[..=usize::from(t)];
        let to = if grow {
            quorate_crypto::params::ThresholdParams::new(room, (room - 1) / 2).unwrap()
        } else {
            c.params
        };
        let after = c.reshare(before.key_id, dealers, to, &[wiped], Attack::None).unwrap();
        prop_assert_eq!(after.public_key(), before.public_key());
        prop_assert_eq!(after.epoch, before.epoch + 1);
        prop_assert_eq!(after.params, to);
        prop_assert_eq!(after.commitments().len(), usize::from(to.t()) + 1);
        let new: Vec<KeyShare> = (1..=to.n()).map(|i| c.nodes[usize::from(i) - 1].shares[&before.key_id].clone()).collect();
        // Every party of the new parameters holds a share that passes its public check,
        // the wiped node included; every old share changed.
        for s in &new {
            s.validate().unwrap();
        }
        for i in 1..=n {
            prop_assert!(!bool::from(
                reconstruct_key(&[&old[usize::from(i) - 1]]).unwrap()
                    .ct_eq(&reconstruct_key(&[&new[usize::from(i) - 1]]).unwrap())
            ));
        }
        let qs = quorum(to.n(), usize::from(to.t()) + 1, q ^ 7);
        let new_q: Vec<&KeyShare> = qs.iter().map(|&i| &new[usize::from(i) - 1]).collect();
        prop_assert_eq!(reconstruct_key(&new_q).unwrap().public_image(), before.public_key().projective());
        // And the new sharing signs, with the wiped node in the signing set.
        let mut mset: Vec<u16> = quorum(to.n(), 2 * usize::from(to.t()) + 1, q ^ 9);
        if !mset.contains(&wiped) {
            mset[0] = wiped;
            mset.sort_unstable();
        }
        let mut sset: Vec<u16> = mset.iter().copied().filter(|&i| i != wiped).take(usize::from(to.t())).collect();
        sset.push(wiped);
        sset.sort_unstable();
        c.presign(before.key_id, &mset, &sset, 2, Attack::None).unwrap();
        let d = quorate_crypto::hash::sha256(b"after reshare");
        let sig = c.sign(before.key_id, d, Attack::None).unwrap();
        prop_assert!(sig.verify(&before.public_key(), &d));
    }

    #[test]
    fn reshare_moves_the_key_onto_another_holder_set(
        (n, t, seed) in setting(), q in any::<u64>(), t_new in 1u16..=3
    ) {
        // The key on 1..=n inside a room of 9 nodes; the new holders are any 2t'+1 or
        // more of the room that keep at least t + 1 old holders (the dealers): a node
        // replaced by another index, nodes added or removed, the threshold changed.
        let room = 9u16;
        let mut c = cluster(room, t, seed);
        c.params = quorate_crypto::params::ThresholdParams::new(n, t).unwrap();
        let before = c.dkg(KeyPurpose::Sign, Attack::None).unwrap();
        let dealers = quorum(n, usize::from(t) + 1, q);
        let size = usize::from(2 * t_new + 1).max(dealers.len()) + usize::try_from(q % 3).unwrap();
        let mut holders = dealers.clone();
        for i in quorum(room, usize::from(room), q ^ 3) {
            if holders.len() < size && !holders.contains(&i) {
                holders.push(i);
            }
        }
        holders.sort_unstable();
        let to = quorate_crypto::params::ThresholdParams::with_holders(
            &PartySet::from_indices(&holders).unwrap(), t_new).unwrap();
        prop_assert_eq!(to.all_parties().members().iter().map(|p| p.get()).collect::<Vec<_>>(), holders.clone());
        let after = c.reshare(before.key_id, &dealers, to, &[], Attack::None).unwrap();
        prop_assert_eq!(after.public_key(), before.public_key());
        prop_assert_eq!(after.params, to);
        prop_assert_eq!(sim_wire(&after), after.clone());
        // Exactly the new holders hold shares; each passes its public check.
        for node in &c.nodes {
            let held = node.shares.get(&before.key_id);
            prop_assert_eq!(held.is_some(), holders.contains(&node.index.get()), "node {}", node.index);
            if let Some(s) = held {
                s.validate().unwrap();
            }
        }
        let qs: Vec<u16> = quorum(u16::try_from(holders.len()).unwrap(), usize::from(t_new) + 1, q ^ 7)
            .iter().map(|&k| holders[usize::from(k) - 1]).collect();
        let shares: Vec<&KeyShare> = qs.iter().map(|&i| &c.nodes[usize::from(i) - 1].shares[&before.key_id]).collect();
        prop_assert_eq!(reconstruct_key(&shares).unwrap().public_image(), before.public_key().projective());
        // Signing sets come from the new holders; one naming a non-holder is refused.
        let mset: Vec<u16> = holders[..usize::from(2 * t_new + 1)].to_vec();
        let sset: Vec<u16> = mset[..usize::from(t_new) + 1].to_vec();
        c.presign(before.key_id, &mset, &sset, 1, Attack::None).unwrap();
        let d = quorate_crypto::hash::sha256(b"after moving");
        let sig = c.sign(before.key_id, d, Attack::None).unwrap();
        prop_assert!(sig.verify(&before.public_key(), &d));
        if let Some(outsider) = (1..=room).find(|i| !holders.contains(i)) {
            let mut bad = mset.clone();
            bad[0] = outsider;
            bad.sort_unstable();
            let sset: Vec<u16> = bad[..usize::from(t_new) + 1].to_vec();
            let err = c.presign(before.key_id, &bad, &sset, 1, Attack::None).unwrap_err();
            prop_assert!(err.to_string().contains("not one of the key's holders"), "{}", err);
        }
    }

    #[test]
    fn random_signing_sets_produce_valid_signatures((n, t, seed) in setting(), q in any::<u64>()) {
        let mut c = cluster(n, t, seed);
        let key = c.dkg(KeyPurpose::Sign, Attack::None).unwrap();
        let mset = quorum(n, 2 * usize::from(t) + 1, q);
        let sset = quorum(2 * t + 1, usize::from(t) + 1, q ^ 0x55)
            .iter()
            .map(|&k| mset[usize::from(k) - 1])
            .collect::<Vec<_>>();
        let mut sset = sset;
        sset.sort_unstable();
        c.presign(key.key_id, &mset, &sset, 3, Attack::None).unwrap();
        for k in 0..3u8 {
            let d = quorate_crypto::hash::sha256(&[k]);
            let sig = c.sign(key.key_id, d, Attack::None).unwrap();
            prop_assert!(sig.verify(&key.public_key(), &d));
        }
    }
}

#[test]
fn sim_rng_prints_its_seed() {
    // Smoke check that the seeded RNG is usable (its seed goes to stderr).
    let mut r = test_rng("smoke");
    let _ = quorate_crypto::SecretScalar::random(&mut r);
}
