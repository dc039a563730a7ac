//! Test support: a seeded RNG and an in-process simulation of a whole cluster.
//!
//! The simulation drives the same round functions that fragment nodes and the
//! coordinator call, and round-trips every message through its wire encoding
//! ([`crate::wire::Wire`]) on its way between parties, like round-based's
//! `Simulation`. An [`Attack`] lets a test play a malicious party or relay at one
//! precise point.

use std::collections::HashMap;

use rand::SeedableRng;
use rand::rngs::StdRng;
use rand_core::{Rng, TryRng};

use crate::dkg::{self, DkgConfig, DkgMode};
use crate::ecies::{self, EciesCiphertext};
use crate::error::{Error, Result};
use crate::identity::{IdentityKey, NodePublic, Roster};
use crate::keys::{KeyId, KeyPublic, KeyPurpose, KeyShare};
use crate::params::{PartyIndex, PartySet, SessionId, ThresholdParams};
use crate::presign::{self, PresigId, PresignConfig, PresignaturePublic};
use crate::proofs::SchnorrProof;
use crate::seal::KemSecretKey;
use crate::secret::SecretScalar;
use crate::sign::{self, PresigRecord, SignRequest, Signature};
use crate::tdh::{self, Credential, DhInput, DhRequest, Requester};
use crate::wire::Wire;

/// A seeded RNG for tests. The seed is `QUORATE_TEST_SEED` if set, otherwise fresh; it
/// is printed (with `label`) so that a failing run can be replayed.
pub fn test_rng(label: &str) -> StdRng {
    let seed = match std::env::var("QUORATE_TEST_SEED") {
        Ok(s) => s.parse().unwrap_or(0),
        Err(_) => {
            let mut b = [0u8; 8];
            rand::rngs::SysRng
                .try_fill_bytes(&mut b)
                .map(|()| u64::from_le_bytes(b))
                .unwrap_or(0)
        }
    };
    eprintln!("[{label}] QUORATE_TEST_SEED={seed}");
    StdRng::seed_from_u64(seed)
}

/// One misbehaviour to inject.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Attack {
    /// Everyone is honest.
    #[default]
    None,
    /// DKG: `dealer` seals a wrong share to `recipient` (and signs it).
    DkgCorruptShare {
        /// The malicious dealer.
        dealer: u16,
        /// Its victim.
        recipient: u16,
    },
    /// DKG: `dealer` sends one commitment too many (and signs it).
    DkgLongCommitments {
        /// The malicious dealer.
        dealer: u16,
    },
    /// DKG: `dealer` sends an invalid proof of knowledge (and signs it).
    DkgBadPok {
        /// The malicious dealer.
        dealer: u16,
    },
    /// DKG: `dealer` swaps the seals of two recipients (and signs it).
    DkgMisaddressedSeal {
        /// The malicious dealer.
        dealer: u16,
        /// One recipient.
        a: u16,
        /// The other.
        b: u16,
    },
    /// DKG: the relay flips a bit of `dealer`'s seal to `recipient` (not re-signed).
    DkgRelayTamper {
        /// Whose message the relay alters.
        dealer: u16,
        /// Which seal.
        recipient: u16,
    },
    /// Reshare: `dealer` deals a value other than its Lagrange-weighted share.
    ReshareWrongValue {
        /// The malicious dealer.
        dealer: u16,
    },
    /// Presign: `dealer` seals wrong `k`/`a` shares to `recipient`.
    PresignCorruptShare {
        /// The malicious dealer.
        dealer: u16,
        /// Its victim.
        recipient: u16,
    },
    /// Presign: `party` sends a μ that does not match its proof.
    PresignBadMu {
        /// The malicious party.
        party: u16,
    },
    /// Presign: `party` sends a degree-reduction dealing with a wrong commitment.
    PresignBadReduction {
        /// The malicious party.
        party: u16,
    },
    /// Sign: `party` returns a wrong signature share.
    SignBadShare {
        /// The malicious party.
        party: u16,
    },
    /// Threshold DH: `party` returns a wrong partial.
    DhBadPartial {
        /// The malicious party.
        party: u16,
    },
}

/// A simulated fragment node.
pub struct SimNode {
    /// Its index.
    pub index: PartyIndex,
    /// Its identity key.
    pub identity: IdentityKey,
    /// Its KEM key.
    pub kem: KemSecretKey,
    /// Its key shares.
    pub shares: HashMap<KeyId, KeyShare>,
    /// Its presignature records.
    pub presigs: HashMap<PresigId, PresigRecord>,
}

/// A simulated cluster with a coordinator's pools.
pub struct Cluster {
    /// Parameters.
    pub params: ThresholdParams,
    /// Public roster.
    pub roster: Roster,
    /// The nodes, index `k` is party `k + 1`.
    pub nodes: Vec<SimNode>,
    /// The coordinator's key records.
    pub keys: HashMap<KeyId, KeyPublic>,
    /// The coordinator's presignature pools.
    pub pools: HashMap<KeyId, Vec<PresignaturePublic>>,
    /// The RNG.
    pub rng: StdRng,
}

/// Round-trips a message through its wire encoding.
pub fn wire<T: Wire>(m: &T) -> Result<T> {
    T::from_bytes(&m.to_bytes())
}

fn node_in(nodes: &[SimNode], i: PartyIndex) -> Result<&SimNode> {
    nodes
        .get(usize::from(i.get()) - 1)
        .ok_or_else(|| Error::input("no such node"))
}

fn idx(i: u16) -> Result<PartyIndex> {
    PartyIndex::new(i).ok_or_else(|| Error::input("bad index"))
}

impl Cluster {
    /// A cluster of `n` nodes with threshold `t`.
    pub fn new(n: u16, t: u16, mut rng: StdRng) -> Result<Self> {
        let params = ThresholdParams::new(n, t)?;
        let mut nodes = Vec::new();
        let mut publics = Vec::new();
        for i in 1..=n {
            let identity = IdentityKey::generate(&mut rng)?;
            let kem = KemSecretKey::generate(&mut rng);
            publics.push(NodePublic {
                identity: identity.public(),
                kem: kem.public(),
            });
            nodes.push(SimNode {
                index: idx(i)?,
                identity,
                kem,
                shares: HashMap::new(),
                presigs: HashMap::new(),
            });
        }
        Ok(Cluster {
            params,
            roster: Roster::new(publics)?,
            nodes,
            keys: HashMap::new(),
            pools: HashMap::new(),
            rng,
        })
    }

    fn node_mut(&mut self, i: PartyIndex) -> Result<&mut SimNode> {
        self.nodes
            .get_mut(usize::from(i.get()) - 1)
            .ok_or_else(|| Error::input("no such node"))
    }

    /// Runs a DKG for a new key.
    pub fn dkg(&mut self, purpose: KeyPurpose, attack: Attack) -> Result<KeyPublic> {
        let mut key_id = [0u8; 16];
        self.rng.fill_bytes(&mut key_id);
        self.run_dkg(KeyId(key_id), DkgMode::NewKey { purpose }, attack)
    }

    /// Refreshes a key's shares.
    pub fn refresh(&mut self, key_id: KeyId) -> Result<KeyPublic> {
        let prior = self
            .keys
            .get(&key_id)
            .cloned()
            .ok_or_else(|| Error::input("no such key"))?;
        self.run_dkg(key_id, DkgMode::Refresh { prior }, Attack::None)
    }

    fn run_dkg(&mut self, key_id: KeyId, mode: DkgMode, attack: Attack) -> Result<KeyPublic> {
        let cfg = DkgConfig {
            session: SessionId::random(&mut self.rng),
            key_id,
            params: self.params,
            mode,
            roster: self.roster.clone(),
        };
        // Nodes beyond `params.n` (a cluster built to grow into) take no part.
        let n = usize::from(self.params.n());
        let mut states = Vec::new();
        let mut commits = Vec::new();
        for node in self.nodes.iter().take(n) {
            let (s, m) = dkg::round1(&mut self.rng, cfg.clone(), node.index, &node.identity)?;
            states.push(s);
            commits.push(wire(&m)?);
        }
        let mut states2 = Vec::new();
        let mut reveals = Vec::new();
        for (node, s) in self.nodes.iter().take(n).zip(states) {
            let (s2, mut m) = dkg::round2(&mut self.rng, s, &commits, &node.identity)?;
            attack_reveal(&mut self.rng, &self.roster, &self.nodes, &mut m, attack)?;
            states2.push(s2);
            reveals.push(wire(&m)?);
        }
        let mut confirms = Vec::new();
        let mut new_shares = Vec::new();
        for (node, s) in self.nodes.iter().take(n).zip(states2) {
            let prior = node.shares.get(&key_id).cloned();
            let prior = if matches!(cfg.mode, DkgMode::Refresh { .. }) {
                prior
            } else {
                None
            };
            let (share, confirm) =
                dkg::round3(&mut self.rng, s, &reveals, &node.kem, &node.identity, prior)?;
            new_shares.push(share);
            confirms.push(wire(&confirm)?);
        }
        let public = dkg::finalize(&cfg, &confirms)?;
        for (node, share) in self.nodes.iter_mut().zip(new_shares) {
            node.shares.insert(key_id, share);
        }
        self.keys.insert(key_id, public.clone());
        Ok(public)
    }

    /// Hands key `key_id` to fresh shares for every party of `to` (nodes `1..=to.n`
    /// of this cluster; it must have that many), dealt by the prior holders `dealers`.
    /// Nodes in `wipe` lose their share first (a lost disk) and only receive. The
    /// cluster's parameters become `to`.
    pub fn reshare(
        &mut self,
        key_id: KeyId,
        dealers: &[u16],
        to: ThresholdParams,
        wipe: &[u16],
        attack: Attack,
    ) -> Result<KeyPublic> {
        let prior = self
            .keys
            .get(&key_id)
            .cloned()
            .ok_or_else(|| Error::input("no such key"))?;
        for &w in wipe {
            self.node_mut(idx(w)?)?.shares.remove(&key_id);
        }
        let cfg = DkgConfig {
            session: SessionId::random(&mut self.rng),
            key_id,
            params: to,
            mode: DkgMode::Reshare {
                prior,
                dealers: PartySet::from_indices(dealers)?,
                binding: [0; 32],
            },
            roster: self.roster.clone(),
        };
        let parties = to.all_parties();
        let mut dealing = Vec::new();
        let mut joining = Vec::new();
        let mut commits = Vec::new();
        for &p in parties.members() {
            let node = node_in(&self.nodes, p)?;
            if cfg.is_dealer(p) {
                let mut share = node
                    .shares
                    .get(&key_id)
                    .cloned()
                    .ok_or_else(|| Error::input(format!("dealer {p} holds no share")))?;
                if attack == (Attack::ReshareWrongValue { dealer: p.get() }) {
                    share.secret =
                        SecretScalar::new(*share.secret.expose() + crate::group::Scalar::ONE);
                }
                let (s, m) =
                    dkg::round1_reshare(&mut self.rng, cfg.clone(), p, &node.identity, &share)?;
                dealing.push((p, s));
                commits.push(wire(&m)?);
            } else {
                joining.push(dkg::join(cfg.clone(), p)?);
            }
        }
        let mut states2 = Vec::new();
        let mut reveals = Vec::new();
        for (p, s) in dealing {
            let node = node_in(&self.nodes, p)?;
            let (s2, mut m) = dkg::round2(&mut self.rng, s, &commits, &node.identity)?;
            attack_reveal(&mut self.rng, &self.roster, &self.nodes, &mut m, attack)?;
            states2.push(s2);
            reveals.push(wire(&m)?);
        }
        for j in joining {
            states2.push(dkg::join_commits(j, &commits)?);
        }
        let mut confirms = Vec::new();
        let mut new_shares = Vec::new();
        for s in states2 {
            let p = s.party();
            let node = node_in(&self.nodes, p)?;
            let (share, confirm) =
                dkg::round3(&mut self.rng, s, &reveals, &node.kem, &node.identity, None)?;
            new_shares.push((p, share));
            confirms.push(wire(&confirm)?);
        }
        let public = dkg::finalize(&cfg, &confirms)?;
        for node in &mut self.nodes {
            node.shares.remove(&key_id);
        }
        for (p, share) in new_shares {
            self.node_mut(p)?.shares.insert(key_id, share);
        }
        self.params = to;
        self.keys.insert(key_id, public.clone());
        Ok(public)
    }

    /// Makes a batch of presignatures for `key_id` with multiplication set `mset` and
    /// signing set `sset`; adds them to the pool.
    pub fn presign(
        &mut self,
        key_id: KeyId,
        mset: &[u16],
        sset: &[u16],
        batch: u32,
        attack: Attack,
    ) -> Result<Vec<PresignaturePublic>> {
        let key = self
            .keys
            .get(&key_id)
            .cloned()
            .ok_or_else(|| Error::input("no such key"))?;
        let cfg = PresignConfig {
            session: SessionId::random(&mut self.rng),
            key,
            mset: PartySet::from_indices(mset)?,
            sset: PartySet::from_indices(sset)?,
            batch,
            roster: self.roster.clone(),
        };
        let members: Vec<PartyIndex> = cfg.mset.members().to_vec();
        let mut s1 = Vec::new();
        let mut commits = Vec::new();
        for &i in &members {
            let (s, m) = presign::round1(
                &mut self.rng,
                cfg.clone(),
                i,
                &node_in(&self.nodes, i)?.identity,
            )?;
            s1.push(s);
            commits.push(wire(&m)?);
        }
        let mut s2 = Vec::new();
        let mut dealings = Vec::new();
        for (&i, s) in members.iter().zip(s1) {
            let (s, mut m) = presign::round2(
                &mut self.rng,
                s,
                &commits,
                &node_in(&self.nodes, i)?.identity,
            )?;
            if let Attack::PresignCorruptShare { dealer, recipient } = attack
                && dealer == i.get()
            {
                m.corrupt_seal_for(&mut self.rng, &self.roster, idx(recipient)?)?;
                m.resign(&node_in(&self.nodes, i)?.identity);
            }
            s2.push(s);
            dealings.push(wire(&m)?);
        }
        let agg = presign::aggregate(&cfg, &commits, &dealings)?;
        let mut s3 = Vec::new();
        let mut mus = Vec::new();
        for (&i, s) in members.iter().zip(s2) {
            let node = node_in(&self.nodes, i)?;
            let (s, mut m) =
                presign::round3(&mut self.rng, s, &dealings, &node.kem, &node.identity)?;
            if attack == (Attack::PresignBadMu { party: i.get() }) {
                if let Some(mu) = m.mus_mut().first_mut() {
                    *mu += crate::group::Scalar::ONE;
                }
                m.resign(&node.identity);
            }
            s3.push(s);
            mus.push(wire(&m)?);
        }
        presign::verify_mus(&mut self.rng, &cfg, &agg, &mus)?;
        let mut s4 = Vec::new();
        let mut reductions = Vec::new();
        for (&i, s) in members.iter().zip(s3) {
            let node = node_in(&self.nodes, i)?;
            let share = node
                .shares
                .get(&key_id)
                .ok_or_else(|| Error::input("node lacks the key"))?;
            let (s, mut m) = presign::round4(&mut self.rng, s, &mus, share, &node.identity)?;
            if attack == (Attack::PresignBadReduction { party: i.get() }) {
                if let Some(c) = m.d_coms_mut().first_mut().and_then(|c| c.get_mut(1)) {
                    *c = crate::group::Point::GENERATOR;
                }
                m.resign(&node.identity);
            }
            s4.push(s);
            reductions.push(wire(&m)?);
        }
        let mut outputs = Vec::new();
        for (&i, s) in members.iter().zip(s4) {
            let node = node_in(&self.nodes, i)?;
            outputs.push((
                i,
                presign::round5(&mut self.rng, s, &reductions, &node.kem)?,
            ));
        }
        let public = presign::public_output(&mut self.rng, &cfg, &agg, &mus, &reductions)?;
        for (i, shares) in outputs {
            let node = self.node_mut(i)?;
            for p in shares {
                // Round-trip through the storage encoding, as a node's store would.
                let p = presign::PresignatureShare::from_secret_bytes(&p.secret_bytes())?;
                node.presigs.insert(p.id, PresigRecord::Unused(p));
            }
        }
        let public: Vec<PresignaturePublic> = public.iter().map(wire).collect::<Result<_>>()?;
        self.pools
            .entry(key_id)
            .or_default()
            .extend(public.iter().cloned());
        Ok(public)
    }

    /// Signs `digest` with presignature `presig` (not taken from the pool).
    pub fn sign_with(
        &mut self,
        presig: &PresignaturePublic,
        digest: [u8; 32],
        attack: Attack,
    ) -> Result<Signature> {
        let key = self
            .keys
            .get(&presig.key_id)
            .cloned()
            .ok_or_else(|| Error::input("no such key"))?;
        let req = wire(&SignRequest {
            key_id: key.key_id,
            presig_id: presig.id,
            sset: presig.sset.clone(),
            digest,
        })?;
        let mut shares = Vec::new();
        for &j in presig.sset.members() {
            let node = self.node_mut(j)?;
            let record = node
                .presigs
                .get(&presig.id)
                .ok_or_else(|| Error::input("node has no such presignature"))?;
            let step = sign::sign_step(&key, record, &req)?;
            // Persist before release.
            let stored = wire(&step.record)?;
            node.presigs
                .insert(presig.id, PresigRecord::Consumed(stored));
            let mut share = step.share;
            if attack == (Attack::SignBadShare { party: j.get() }) {
                share.corrupt();
            }
            shares.push(wire(&share)?);
        }
        sign::combine(&mut self.rng, &key, presig, &digest, &shares)
    }

    /// Signs `digest` with the next presignature from `key_id`'s pool.
    pub fn sign(&mut self, key_id: KeyId, digest: [u8; 32], attack: Attack) -> Result<Signature> {
        let presig = self
            .pools
            .get_mut(&key_id)
            .and_then(|p| p.pop())
            .ok_or_else(|| Error::input("presignature pool is empty"))?;
        self.sign_with(&presig, digest, attack)
    }

    /// Runs threshold DH over `quorum` and unmasks as the requester.
    pub fn dh(
        &mut self,
        key_id: KeyId,
        input: DhInput,
        quorum: &[u16],
        attack: Attack,
    ) -> Result<tdh::SharedPoint> {
        let key = self
            .keys
            .get(&key_id)
            .cloned()
            .ok_or_else(|| Error::input("no such key"))?;
        let requester = Requester::new(&mut self.rng)?;
        let req = wire(&DhRequest {
            key_id,
            input,
            requester: requester.public(),
        })?;
        let quorum = PartySet::from_indices(quorum)?;
        let mut partials = Vec::new();
        for &i in quorum.members() {
            let share = node_in(&self.nodes, i)?
                .shares
                .get(&key_id)
                .ok_or_else(|| Error::input("node lacks the key"))?
                .clone();
            let mut p = tdh::partial(&mut self.rng, &share, &req)?;
            if attack == (Attack::DhBadPartial { party: i.get() }) {
                p.corrupt();
            }
            partials.push(wire(&p)?);
        }
        let resp = wire(&tdh::combine(
            &mut self.rng,
            &key,
            &req,
            &quorum,
            &partials,
        )?)?;
        requester.unmask(&resp)
    }

    /// Derives the credential for `context` through `quorum`.
    pub fn derive(
        &mut self,
        key_id: KeyId,
        context: &[u8],
        quorum: &[u16],
        attack: Attack,
    ) -> Result<Credential> {
        let xp = self.dh(
            key_id,
            DhInput::Derive {
                context: context.to_vec(),
            },
            quorum,
            attack,
        )?;
        tdh::derive_credential(&xp, context)
    }

    /// Decrypts an ECIES ciphertext through `quorum`.
    pub fn decrypt(
        &mut self,
        key_id: KeyId,
        ct: &EciesCiphertext,
        aad: &[u8],
        quorum: &[u16],
    ) -> Result<zeroize::Zeroizing<Vec<u8>>> {
        let x = self
            .keys
            .get(&key_id)
            .map(|k| k.public_key())
            .ok_or_else(|| Error::input("no such key"))?;
        let xp = self.dh(
            key_id,
            DhInput::Decrypt {
                point: ct.ephemeral,
            },
            quorum,
            Attack::None,
        )?;
        ecies::decrypt_with_shared(&xp, &x, ct, aad)
    }
}

fn attack_reveal(
    rng: &mut StdRng,
    roster: &Roster,
    nodes: &[SimNode],
    m: &mut dkg::DkgReveal,
    attack: Attack,
) -> Result<()> {
    let dealer = m.dealer.get();
    match attack {
        Attack::DkgCorruptShare {
            dealer: d,
            recipient,
        } if d == dealer => {
            let r = idx(recipient)?;
            m.corrupt_seal_for(rng, roster, r)?;
            m.resign(&node_in(nodes, m.dealer)?.identity);
        }
        Attack::DkgLongCommitments { dealer: d } if d == dealer => {
            let (coms, _, _) = m.parts_mut();
            coms.push(crate::group::Point::GENERATOR);
            m.resign(&node_in(nodes, m.dealer)?.identity);
        }
        Attack::DkgBadPok { dealer: d } if d == dealer => {
            let bogus = SecretScalar::random(rng);
            let fake = SchnorrProof::prove(rng, b"not the statement", &bogus)?;
            let (_, pok, _) = m.parts_mut();
            *pok = Some(fake);
            m.resign(&node_in(nodes, m.dealer)?.identity);
        }
        Attack::DkgMisaddressedSeal { dealer: d, a, b } if d == dealer => {
            let (_, _, seals) = m.parts_mut();
            let pa = seals.iter().position(|(r, _)| r.get() == a);
            let pb = seals.iter().position(|(r, _)| r.get() == b);
            if let (Some(pa), Some(pb)) = (pa, pb) {
                seals.swap(pa, pb);
                if let Some(x) = seals.get_mut(pa) {
                    x.0 = idx(a)?;
                }
                if let Some(x) = seals.get_mut(pb) {
                    x.0 = idx(b)?;
                }
            }
            m.resign(&node_in(nodes, m.dealer)?.identity);
        }
        Attack::DkgRelayTamper {
            dealer: d,
            recipient,
        } if d == dealer => {
            let (_, _, seals) = m.parts_mut();
            for (r, s) in seals.iter_mut() {
                if r.get() == recipient {
                    s.tamper();
                }
            }
        }
        _ => {}
    }
    Ok(())
}
