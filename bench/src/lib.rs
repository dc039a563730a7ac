//! # quorate-bench
//!
//! Measurements of Quorate's protocol phases (STYLE.md §7):
//!
//! - `benches/protocol.rs`: criterion groups per phase and per `(n, t)` — DKG, a
//!   presignature batch, one node's signing step, the coordinator's combine-and-verify,
//!   and a confidential derivation — with single-key ES256 baselines (aws-lc-rs, p256)
//!   in the same run;
//! - `src/bin/opcount.rs` (`quorate-opcount`): how many scalar multiplications each
//!   phase performs, from [`quorate_crypto::opcount`].
//!
//! Everything runs in one process through [`quorate_crypto::sim::Cluster`], which drives
//! the same round functions as the services and round-trips every message through its
//! wire encoding, so the figures include encoding, sealing and every proof, but no
//! network, storage or scheduling. This library holds the setup the two share.
#![forbid(unsafe_code)]

pub mod baselines;
pub mod coordinators;
pub mod failover;
pub mod load;
pub mod local;
pub mod ops;
pub mod report;

use quorate_crypto::keys::{KeyPublic, KeyPurpose};
use quorate_crypto::presign::PresignaturePublic;
use quorate_crypto::sign::{self, PresigRecord, SignRequest, SignatureShare};
use quorate_crypto::sim::{Attack, Cluster};
use quorate_crypto::{Error, PartyIndex};
use rand::SeedableRng;
use rand::rngs::StdRng;

/// The result type of the setup helpers (they fail only on a protocol bug).
pub type Result<T> = core::result::Result<T, Error>;

/// Seed of every RNG here. Fixed so that runs are comparable; the protocols' cost does
/// not depend on the values drawn.
pub const SEED: u64 = 0x5155_4f52_4154_4521;

/// The message the single-signature paths sign: 200 bytes, about the size of a JWS
/// signing input for a short-lived agent token (printable bytes; the value does not
/// affect the cost).
pub fn message() -> [u8; 200] {
    core::array::from_fn(|i| b'A' + (i % 26) as u8)
}

/// `SHA-256(message())`, the digest the threshold signing steps take (a coordinator
/// hashes the signing input once and sends the digest to the nodes).
pub fn message_digest() -> Result<[u8; 32]> {
    let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &message());
    <[u8; 32]>::try_from(d.as_ref()).map_err(|_| Error::Bug("SHA-256 is not 32 bytes"))
}

/// A seeded RNG (see [`SEED`]); `stream` separates the RNGs of one run.
pub fn rng(stream: u64) -> StdRng {
    StdRng::seed_from_u64(SEED ^ stream)
}

/// A cluster of `n` nodes with threshold `t` and seeded RNG; node keys are generated here.
pub fn cluster(n: u16, t: u16) -> Result<Cluster> {
    Cluster::new(n, t, rng((u64::from(n) << 16) | u64::from(t)))
}

/// The multiplication set of a presignature batch: the first `2t + 1` nodes.
pub fn mset(t: u16) -> Vec<u16> {
    (1..=2 * t + 1).collect()
}

/// The signing set of a presignature batch: the first `t + 1` nodes.
pub fn sset(t: u16) -> Vec<u16> {
    (1..=t + 1).collect()
}

/// The first `t + 1` nodes, a smallest quorum for threshold DH.
pub fn quorum(t: u16) -> Vec<u16> {
    sset(t)
}

/// A cluster with a signing key and one unused presignature for it, ready to sign
/// [`message_digest`].
pub struct SignFixture {
    /// The cluster; its nodes hold the presignature records.
    pub cluster: Cluster,
    /// The signing key.
    pub key: KeyPublic,
    /// The unused presignature.
    pub presig: PresignaturePublic,
    /// The digest to sign.
    pub digest: [u8; 32],
}

impl SignFixture {
    /// Runs a DKG and a presignature batch of `batch` on a fresh `(n, t)` cluster and
    /// keeps the batch's first presignature.
    pub fn new(n: u16, t: u16, batch: u32) -> Result<Self> {
        let mut cluster = cluster(n, t)?;
        let key = cluster.dkg(KeyPurpose::Sign, Attack::None)?;
        let presig = cluster
            .presign(key.key_id, &mset(t), &sset(t), batch, Attack::None)?
            .into_iter()
            .next()
            .ok_or(Error::Bug("a presignature batch came back empty"))?;
        Ok(SignFixture {
            cluster,
            key,
            presig,
            digest: message_digest()?,
        })
    }

    /// The coordinator's request for this presignature and digest.
    pub fn request(&self) -> SignRequest {
        SignRequest {
            key_id: self.key.key_id,
            presig_id: self.presig.id,
            sset: self.presig.sset.clone(),
            digest: self.digest,
        }
    }

    /// The members of the signing set.
    pub fn signers(&self) -> &[PartyIndex] {
        self.presig.sset.members()
    }

    /// Node `j`'s record of the presignature (still unused: nothing here consumes it).
    pub fn record(&self, j: PartyIndex) -> Result<&PresigRecord> {
        self.cluster
            .nodes
            .iter()
            .find(|node| node.index == j)
            .and_then(|node| node.presigs.get(&self.presig.id))
            .ok_or(Error::Bug("a signer lacks the presignature record"))
    }

    /// Node `j`'s signing step; the returned record is discarded, so the stored record
    /// stays unused and the step can be repeated.
    pub fn sign_step(&self, j: PartyIndex, req: &SignRequest) -> Result<SignatureShare> {
        Ok(sign::sign_step(&self.key, self.record(j)?, req)?.share)
    }

    /// One share from every member of the signing set.
    pub fn shares(&self) -> Result<Vec<SignatureShare>> {
        let req = self.request();
        self.signers()
            .iter()
            .map(|&j| self.sign_step(j, &req))
            .collect()
    }

    /// The first member of the signing set.
    pub fn first_signer(&self) -> Result<PartyIndex> {
        self.signers()
            .first()
            .copied()
            .ok_or(Error::Bug("empty signing set"))
    }
}

/// Drops everything that earlier iterations of a benchmark left in `cluster` — keys,
/// key shares, presignature records and pools — except the key `keep`, so that
/// repeated runs neither grow the maps nor pay for dropping them inside the timing.
pub fn forget_all_but(cluster: &mut Cluster, keep: Option<quorate_crypto::keys::KeyId>) {
    cluster.keys.retain(|id, _| Some(*id) == keep);
    cluster.pools.clear();
    for node in &mut cluster.nodes {
        node.shares.retain(|id, _| Some(*id) == keep);
        node.presigs.clear();
    }
}
