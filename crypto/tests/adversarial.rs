//! Scripted adversaries: each test plays one malicious party or relay and asserts the
//! right culprit, and that no key, presignature, signature or credential is released.

// Tests state expectations with unwrap/expect/panic/indexing.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use quorate_crypto::error::{Error, Fault, Refusal};
use quorate_crypto::hash::sha256;
use quorate_crypto::keys::{KeyId, KeyPurpose};
use quorate_crypto::params::{PartyIndex, PartySet, SessionId};
use quorate_crypto::presign::PresignConfig;
use quorate_crypto::sign::{self, PresigRecord, SignRequest};
use quorate_crypto::sim::{Attack, Cluster, test_rng};
use quorate_crypto::tdh::{self, DhInput, DhRequest, Requester};
use quorate_crypto::wire::Wire;

fn p(i: u16) -> PartyIndex {
    PartyIndex::new(i).unwrap()
}

fn assert_blames(err: &Error, culprits: &[u16], fault: Fault) {
    let want: Vec<PartyIndex> = culprits.iter().map(|&i| p(i)).collect();
    match err {
        Error::PeerMisbehaved { culprits, fault: f } => {
            assert_eq!(culprits, &want, "wrong culprits in {err}");
            assert_eq!(*f, fault, "wrong fault in {err}");
        }
        other => panic!("expected PeerMisbehaved, got {other:?}"),
    }
    assert_eq!(err.culprits(), &want[..]);
}

fn cluster(n: u16, t: u16, label: &str) -> Cluster {
    Cluster::new(n, t, test_rng(label)).unwrap()
}

// ---------------------------------------------------------------- DKG

#[test]
fn reshare_dealer_of_a_wrong_value_is_named_and_nothing_changes() {
    let mut c = cluster(3, 1, "reshare-value");
    let key = c.dkg(KeyPurpose::Sign, Attack::None).unwrap();
    let before: Vec<_> = c
        .nodes
        .iter()
        .map(|n| n.shares[&key.key_id].clone())
        .collect();
    let params = c.params;
    let err = c
        .reshare(
            key.key_id,
            &[1, 3],
            params,
            &[2],
            Attack::ReshareWrongValue { dealer: 3 },
        )
        .unwrap_err();
    assert_blames(&err, &[3], Fault::WrongReshareConstant);
    // No node's share was replaced (node 2's was wiped before the run).
    for i in [0usize, 2] {
        assert_eq!(c.nodes[i].shares[&key.key_id].public, before[i].public);
    }
    assert_eq!(c.keys[&key.key_id], key, "the key data must not change");
}

#[test]
fn reshare_tampered_share_blames_dealer() {
    let mut c = cluster(5, 2, "reshare-share");
    let key = c.dkg(KeyPurpose::Sign, Attack::None).unwrap();
    let params = c.params;
    let err = c
        .reshare(
            key.key_id,
            &[1, 2, 4],
            params,
            &[],
            Attack::DkgCorruptShare {
                dealer: 4,
                recipient: 3,
            },
        )
        .unwrap_err();
    assert_blames(&err, &[4], Fault::BadShare);
}

#[test]
fn reshare_needs_exactly_t_plus_one_dealers_holding_the_prior_share() {
    let mut c = cluster(5, 2, "reshare-dealers");
    let key = c.dkg(KeyPurpose::Sign, Attack::None).unwrap();
    let params = c.params;
    // Too few dealers cannot reach the key; too many are rejected as well.
    for dealers in [&[1u16, 2][..], &[1, 2, 3, 4][..]] {
        let err = c
            .reshare(key.key_id, dealers, params, &[], Attack::None)
            .unwrap_err();
        assert!(
            err.to_string().contains("t + 1 = 3"),
            "unexpected error: {err}"
        );
    }
    // A wiped node cannot deal.
    let err = c
        .reshare(key.key_id, &[1, 2, 3], params, &[3], Attack::None)
        .unwrap_err();
    assert!(err.to_string().contains("holds no share"), "{err}");
}

#[test]
fn dkg_tampered_feldman_share_blames_dealer() {
    let mut c = cluster(5, 2, "dkg-share");
    let err = c
        .dkg(
            KeyPurpose::Sign,
            Attack::DkgCorruptShare {
                dealer: 2,
                recipient: 4,
            },
        )
        .unwrap_err();
    assert_blames(&err, &[2], Fault::BadShare);
    assert!(
        c.keys.is_empty(),
        "no key may be activated after a complaint"
    );
    assert!(c.nodes.iter().all(|n| n.shares.is_empty()));
}

#[test]
fn dkg_wrong_commitment_length_blames_dealer() {
    let mut c = cluster(3, 1, "dkg-len");
    let err = c
        .dkg(KeyPurpose::Sign, Attack::DkgLongCommitments { dealer: 3 })
        .unwrap_err();
    assert_blames(
        &err,
        &[3],
        Fault::WrongCommitmentLength {
            expected: 2,
            got: 3,
        },
    );
    assert!(c.keys.is_empty());
}

#[test]
fn dkg_bad_proof_of_knowledge_blames_dealer() {
    let mut c = cluster(5, 1, "dkg-pok");
    let err = c
        .dkg(KeyPurpose::Sign, Attack::DkgBadPok { dealer: 5 })
        .unwrap_err();
    assert_blames(&err, &[5], Fault::BadProofOfKnowledge);
    assert!(c.keys.is_empty());
}

#[test]
fn dkg_misaddressed_seal_blames_dealer() {
    let mut c = cluster(3, 1, "dkg-misaddressed");
    let err = c
        .dkg(
            KeyPurpose::Sign,
            Attack::DkgMisaddressedSeal {
                dealer: 1,
                a: 2,
                b: 3,
            },
        )
        .unwrap_err();
    assert_blames(&err, &[1], Fault::BadSeal);
    assert!(c.keys.is_empty());
}

#[test]
fn dkg_seal_tampered_in_relay_is_unauthentic_and_blames_no_node() {
    let mut c = cluster(3, 1, "dkg-relay");
    let err = c
        .dkg(
            KeyPurpose::Sign,
            Attack::DkgRelayTamper {
                dealer: 2,
                recipient: 1,
            },
        )
        .unwrap_err();
    assert_eq!(
        err,
        Error::Unauthentic {
            claimed_sender: p(2)
        }
    );
    assert!(err.culprits().is_empty());
    assert!(c.keys.is_empty());
}

#[test]
fn dkg_rejects_missing_duplicate_and_foreign_messages() {
    use quorate_crypto::dkg::{self, DkgConfig, DkgMode};
    let mut c = cluster(3, 1, "dkg-msgs");
    let mut rng = test_rng("dkg-msgs-2");
    let cfg = DkgConfig {
        session: SessionId::random(&mut rng),
        key_id: KeyId([1; 16]),
        params: c.params,
        mode: DkgMode::NewKey {
            purpose: KeyPurpose::Sign,
        },
        roster: c.roster.clone(),
    };
    let other = DkgConfig {
        session: SessionId::random(&mut rng),
        ..cfg.clone()
    };
    let mut commits = Vec::new();
    let mut states = Vec::new();
    for node in &c.nodes {
        let (s, m) = dkg::round1(&mut rng, cfg.clone(), node.index, &node.identity).unwrap();
        states.push(s);
        commits.push(m);
    }
    let node = &c.nodes[0];
    let (s_other, m_other) = dkg::round1(&mut rng, other, node.index, &node.identity).unwrap();
    drop(s_other);
    // Missing: party 3's commit dropped.
    let (s, _) = dkg::round1(&mut rng, cfg.clone(), node.index, &node.identity).unwrap();
    let err = dkg::round2(&mut rng, s, &commits[..2], &node.identity)
        .err()
        .unwrap();
    assert_blames(&err, &[3], Fault::Missing);
    // Duplicate: party 2 twice.
    let (s, _) = dkg::round1(&mut rng, cfg.clone(), node.index, &node.identity).unwrap();
    let mut dup = commits.clone();
    dup.push(commits[1].clone());
    let err = dkg::round2(&mut rng, s, &dup, &node.identity)
        .err()
        .unwrap();
    assert_blames(&err, &[2], Fault::Duplicate);
    // Replay from another session.
    let (s, _) = dkg::round1(&mut rng, cfg, node.index, &node.identity).unwrap();
    let mut replay = commits.clone();
    replay[0] = m_other;
    let err = dkg::round2(&mut rng, s, &replay, &node.identity)
        .err()
        .unwrap();
    assert!(matches!(err, Error::InvalidInput(_)), "{err:?}");
    c.nodes.clear();
}

// ---------------------------------------------------------------- presignatures

fn signing_cluster(n: u16, t: u16, label: &str) -> (Cluster, KeyId) {
    let mut c = cluster(n, t, label);
    let key = c.dkg(KeyPurpose::Sign, Attack::None).unwrap();
    (c, key.key_id)
}

fn assert_no_presignatures(c: &Cluster, key: KeyId) {
    assert!(c.pools.get(&key).is_none_or(|p| p.is_empty()));
    assert!(c.nodes.iter().all(|n| n.presigs.is_empty()));
}

#[test]
fn presign_tampered_share_blames_dealer() {
    let (mut c, key) = signing_cluster(5, 2, "presign-share");
    let err = c
        .presign(
            key,
            &[1, 2, 3, 4, 5],
            &[1, 2, 3],
            4,
            Attack::PresignCorruptShare {
                dealer: 4,
                recipient: 2,
            },
        )
        .unwrap_err();
    assert_blames(&err, &[4], Fault::BadShare);
    assert_no_presignatures(&c, key);
}

#[test]
fn presign_bad_mu_proof_blames_sender() {
    let (mut c, key) = signing_cluster(3, 1, "presign-mu");
    let err = c
        .presign(
            key,
            &[1, 2, 3],
            &[1, 3],
            4,
            Attack::PresignBadMu { party: 2 },
        )
        .unwrap_err();
    assert_blames(&err, &[2], Fault::BadMuProof);
    assert_no_presignatures(&c, key);
}

#[test]
fn presign_bad_degree_reduction_blames_dealer() {
    let (mut c, key) = signing_cluster(5, 2, "presign-reduce");
    let err = c
        .presign(
            key,
            &[1, 2, 3, 4, 5],
            &[2, 4, 5],
            3,
            Attack::PresignBadReduction { party: 3 },
        )
        .unwrap_err();
    assert_blames(&err, &[3], Fault::BadReductionDealing);
    assert_no_presignatures(&c, key);
}

#[test]
fn presign_refuses_a_non_signing_key_and_bad_sets() {
    let mut c = cluster(3, 1, "presign-purpose");
    let dkey = c.dkg(KeyPurpose::Derive, Attack::None).unwrap();
    let err = c
        .presign(dkey.key_id, &[1, 2, 3], &[1, 2], 1, Attack::None)
        .unwrap_err();
    assert!(
        matches!(err, Error::Refused(Refusal::WrongPurpose { .. })),
        "{err:?}"
    );
    let skey = c.dkg(KeyPurpose::Sign, Attack::None).unwrap();
    let mk = |m: &[u16], s: &[u16], b| PresignConfig {
        session: SessionId([0; 32]),
        key: skey.clone(),
        mset: PartySet::from_indices(m).unwrap(),
        sset: PartySet::from_indices(s).unwrap(),
        batch: b,
        roster: c.roster.clone(),
    };
    assert!(mk(&[1, 2], &[1, 2], 1).check().is_err(), "M too small");
    assert!(
        mk(&[1, 2, 3], &[1, 2, 3], 1).check().is_err(),
        "S too large"
    );
    assert!(mk(&[1, 2, 3], &[1, 2], 0).check().is_err(), "empty batch");
    assert!(mk(&[1, 2, 3], &[1, 2], 1).check().is_ok());
}

// ---------------------------------------------------------------- signing

#[test]
fn bad_signature_share_blames_node_and_releases_nothing() {
    let (mut c, key) = signing_cluster(5, 2, "sign-bad");
    c.presign(key, &[1, 2, 3, 4, 5], &[1, 3, 5], 2, Attack::None)
        .unwrap();
    let err = c
        .sign(key, sha256(b"m"), Attack::SignBadShare { party: 3 })
        .unwrap_err();
    assert_blames(&err, &[3], Fault::BadSignatureShare);
    // The next presignature signs fine.
    let x = c.keys[&key].public_key();
    let sig = c.sign(key, sha256(b"m"), Attack::None).unwrap();
    assert!(sig.verify(&x, &sha256(b"m")));
}

#[test]
fn presignature_signs_at_most_one_message() {
    let (mut c, key) = signing_cluster(3, 1, "one-time");
    let pres = c
        .presign(key, &[1, 2, 3], &[1, 2], 1, Attack::None)
        .unwrap();
    let presig = &pres[0];
    let h1 = sha256(b"first");
    let h2 = sha256(b"second");
    let s1 = c.sign_with(presig, h1, Attack::None).unwrap();
    // A retry of the same message (e.g. after a lost reply) returns the same signature.
    let again = c.sign_with(presig, h1, Attack::None).unwrap();
    assert_eq!(s1, again);
    // Any other message is refused by every node of S.
    let err = c.sign_with(presig, h2, Attack::None).unwrap_err();
    assert!(
        matches!(err, Error::Refused(Refusal::PresignatureConsumed(_))),
        "{err:?}"
    );
    // The records hold no secret any more.
    for j in [1u16, 2] {
        match &c.nodes[usize::from(j) - 1].presigs[&presig.id] {
            PresigRecord::Consumed(rec) => assert_eq!(rec.digest, h1),
            PresigRecord::Unused(_) => panic!("record still unused after signing"),
        }
    }
}

#[test]
fn node_refuses_wrong_set_key_or_presignature() {
    let (mut c, key) = signing_cluster(3, 1, "sign-refuse");
    let pres = c
        .presign(key, &[1, 2, 3], &[2, 3], 2, Attack::None)
        .unwrap();
    let kp = c.keys[&key].clone();
    let node = &c.nodes[1];
    let rec = &node.presigs[&pres[0].id];
    let base = SignRequest {
        key_id: key,
        presig_id: pres[0].id,
        sset: pres[0].sset.clone(),
        digest: sha256(b"x"),
    };
    let wrong_set = SignRequest {
        sset: PartySet::from_indices(&[1, 2]).unwrap(),
        ..base.clone()
    };
    assert_eq!(
        sign::sign_step(&kp, rec, &wrong_set).unwrap_err(),
        Error::Refused(Refusal::WrongSigningSet)
    );
    let wrong_id = SignRequest {
        presig_id: pres[1].id,
        ..base.clone()
    };
    assert_eq!(
        sign::sign_step(&kp, rec, &wrong_id).unwrap_err(),
        Error::Refused(Refusal::WrongPresignature)
    );
    let wrong_key = SignRequest {
        key_id: KeyId([9; 16]),
        ..base.clone()
    };
    assert_eq!(
        sign::sign_step(&kp, rec, &wrong_key).unwrap_err(),
        Error::Refused(Refusal::WrongKey)
    );
    // The consumed state survives its storage encoding and still refuses.
    let step = sign::sign_step(&kp, rec, &base).unwrap();
    assert!(step.fresh);
    let stored = sign::ConsumedPresig::from_bytes(&step.record.to_bytes()).unwrap();
    let consumed = PresigRecord::Consumed(stored);
    let retry = sign::sign_step(&kp, &consumed, &base).unwrap();
    assert!(!retry.fresh);
    assert_eq!(retry.share, step.share);
    let other = SignRequest {
        digest: sha256(b"y"),
        ..base
    };
    assert!(matches!(
        sign::sign_step(&kp, &consumed, &other).unwrap_err(),
        Error::Refused(Refusal::PresignatureConsumed(_))
    ));
}

// ---------------------------------------------------------------- threshold DH

#[test]
fn bad_dh_partial_blames_node_and_releases_nothing() {
    let mut c = cluster(5, 2, "dh-bad");
    let key = c.dkg(KeyPurpose::Derive, Attack::None).unwrap();
    let err = c
        .derive(
            key.key_id,
            b"ctx",
            &[1, 2, 4],
            Attack::DhBadPartial { party: 4 },
        )
        .unwrap_err();
    assert_blames(&err, &[4], Fault::BadDhPartial);
}

#[test]
fn keys_refuse_other_purposes() {
    let mut c = cluster(3, 1, "purpose");
    let skey = c.dkg(KeyPurpose::Sign, Attack::None).unwrap();
    let err = c
        .derive(skey.key_id, b"ctx", &[1, 2], Attack::None)
        .unwrap_err();
    assert!(
        matches!(err, Error::Refused(Refusal::WrongPurpose { .. })),
        "{err:?}"
    );
    let dkey = c.dkg(KeyPurpose::Derive, Attack::None).unwrap();
    let mut rng = test_rng("purpose-2");
    let r = Requester::new(&mut rng).unwrap();
    let req = DhRequest {
        key_id: dkey.key_id,
        input: DhInput::Decrypt {
            point: quorate_crypto::Point::GENERATOR,
        },
        requester: r.public(),
    };
    let share = &c.nodes[0].shares[&dkey.key_id];
    assert!(matches!(
        tdh::partial(&mut rng, share, &req).unwrap_err(),
        Error::Refused(Refusal::WrongPurpose { .. })
    ));
}

// ---------------------------------------------------------------- decoders

#[test]
fn decoders_reject_truncation_trailing_bytes_and_versions() {
    let (mut c, key) = signing_cluster(3, 1, "decoders");
    let pres = c
        .presign(key, &[1, 2, 3], &[1, 2], 1, Attack::None)
        .unwrap();
    let bytes = pres[0].to_bytes();
    type Pp = quorate_crypto::presign::PresignaturePublic;
    assert!(Pp::from_bytes(&bytes).is_ok());
    for cut in [0, 1, 2, 10, bytes.len() - 1] {
        assert!(Pp::from_bytes(&bytes[..cut]).is_err(), "truncated at {cut}");
    }
    let mut trailing = bytes.clone();
    trailing.push(0);
    assert!(Pp::from_bytes(&trailing).is_err());
    let mut version = bytes.clone();
    version[0] = 9;
    assert!(Pp::from_bytes(&version).is_err());
    let mut tag = bytes;
    tag[1] ^= 0xff;
    assert!(Pp::from_bytes(&tag).is_err());
    let kp = &c.keys[&key];
    let kb = kp.to_bytes();
    assert_eq!(
        &quorate_crypto::keys::KeyPublic::from_bytes(&kb).unwrap(),
        kp
    );
}
