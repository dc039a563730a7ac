//! Presignature batches (DESIGN.md §4.4): honest-majority, DJNPØ-style nonce
//! generation with BGW degree reduction onto a fixed signing set.
//!
//! A batch of `B` presignatures is made by a multiplication set `M` (`|M| = 2t + 1`) for
//! a fixed signing set `S ⊆ M` (`|S| = t + 1`):
//! 1. [`round1`] / [`round2`]: each `d ∈ M` commits to, then deals, random degree-`t`
//!    sharings `k^(d)`, `a^(d)` per presignature (one seal per recipient carries the
//!    whole batch).
//! 2. [`round3`]: `i ∈ M` verifies its shares against the *aggregated* commitments
//!    (`Σ_d C^(d)`, point additions only; per-dealer checks run only to blame), sets
//!    `k_i = Σ_d k^(d)(i)`, `a_i = Σ_d a^(d)(i)`, and sends `μ_i = k_i·a_i` with a DLEQ
//!    proof `log_G K_i = log_{A_i}(μ_i·G)`.
//! 3. The coordinator checks every proof ([`verify_mus`]) and relays the μ messages;
//!    every node computes `u = Σ_{i∈M} λ_i^M μ_i` itself, and `R = Σ_d C^{k,(d)}_0`.
//! 4. [`round4`]: `i ∈ M` sets `w_i = a_i·u⁻¹` (a share of `k⁻¹`), `p_i = w_i·x_i`, and
//!    deals a degree-`t` `g_i` with `g_i(0) = p_i` to `S`, with a DLEQ
//!    `log_G W_i = log_{X_i} D_{i,0}`.
//! 5. [`round5`]: `j ∈ S` verifies every reduction dealing and proof and keeps
//!    `(id, key, S, R, w_j, v_j = Σ_{i∈M} λ_i^M g_i(j))`; the coordinator's pool keeps the
//!    public `(id, key, S, R, {W_j, V_j})` from [`public_output`].
//!
//! Only the `t + 1` members of `S` hold shares of a presignature, so each signature
//! needs all of them, and each honest member answers for one message only.
//!
//! Proof contexts bind the session, the key, `M`, `S`, the batch index and the party;
//! the μ proofs also bind every dealer's commitment hash (which fixes `K_i`, `A_i`) and
//! `μ_i`; the reduction proofs also bind `u` and `D_{i,0}`.

use elliptic_curve::Field;
use rand_core::CryptoRng;

use crate::batch::{BaseId, BatchVerifier, Form};
use crate::error::{Error, Fault, Result};
use crate::feldman::{Commitments, Polynomial};
use crate::group::{self, Point, Scalar};
use crate::hash::Transcript;
use crate::identity::{IdentityKey, Roster, SIGNATURE_LEN};
use crate::keys::{KeyId, KeyPublic, KeyPurpose, KeyShare};
use crate::params::{PartyIndex, PartySet, SessionId, one_from_each};
use crate::proofs::{Base, DleqForms, DleqProof};
use crate::seal::{self, KemSecretKey, Sealed};
use crate::secret::SecretScalar;
use crate::wire::{Reader, Wire, Writer};

/// The largest batch one run may make.
pub const MAX_BATCH: u32 = 10_000;
const SEAL_DEAL: u8 = 0x41;
const SEAL_REDUCE: u8 = 0x44;

/// Identifier of one presignature.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PresigId(pub [u8; 32]);

impl core::fmt::Display for PresigId {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        for b in &self.0[..8] {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

/// What every party agrees on before a batch starts.
#[derive(Clone, Debug)]
pub struct PresignConfig {
    /// Binds every message of this run.
    pub session: SessionId,
    /// The signing key's public data.
    pub key: KeyPublic,
    /// The multiplication set `M` (`2t + 1` members).
    pub mset: PartySet,
    /// The fixed signing set `S ⊆ M` (`t + 1` members).
    pub sset: PartySet,
    /// Number of presignatures.
    pub batch: u32,
    /// Verified public material of the nodes.
    pub roster: Roster,
}

impl PresignConfig {
    /// Validates the configuration.
    pub fn check(&self) -> Result<()> {
        self.key.purpose.require(KeyPurpose::Sign)?;
        let p = self.key.params;
        p.multiplication_set(self.mset.clone())?;
        p.signing_set(self.sset.clone())?;
        if !self.sset.is_subset_of(&self.mset) {
            return Err(Error::input(
                "the signing set must be inside the multiplication set",
            ));
        }
        if self.batch == 0 || self.batch > MAX_BATCH {
            return Err(Error::input(format!(
                "batch size must be between 1 and {MAX_BATCH}, got {}",
                self.batch
            )));
        }
        self.roster.covers(&self.mset)
    }

    fn b(&self) -> usize {
        self.batch as usize
    }

    fn context(&self, label: &str, party: PartyIndex) -> Transcript {
        let mut t = Transcript::new("quorate/presign/v1");
        t.append("label", label.as_bytes())
            .append("sid", &self.session.0)
            .append("key", &self.key.key_id.0)
            .point("X", &self.key.public_key())
            .u64("batch", u64::from(self.batch))
            .u64("party", u64::from(party.get()));
        let m: Vec<u8> = self
            .mset
            .members()
            .iter()
            .flat_map(|p| p.get().to_be_bytes())
            .collect();
        let s: Vec<u8> = self
            .sset
            .members()
            .iter()
            .flat_map(|p| p.get().to_be_bytes())
            .collect();
        t.append("M", &m).append("S", &s);
        t
    }

    /// The id of presignature `b` of this batch.
    pub fn presig_id(&self, b: usize) -> PresigId {
        PresigId(self.session.derive("presig", b as u64).0)
    }

    fn check_session(&self, s: SessionId) -> Result<()> {
        if s == self.session {
            Ok(())
        } else {
            Err(Error::input("message belongs to another session"))
        }
    }

    fn require_member(&self, me: PartyIndex, set: &PartySet) -> Result<()> {
        if set.contains(me) {
            Ok(())
        } else {
            Err(Error::Refused(crate::error::Refusal::NotAMember(me)))
        }
    }
}

// ---------------------------------------------------------------- messages

/// Step 1a: a dealer's commitment hash.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PresignCommit {
    /// The run.
    pub session: SessionId,
    /// The dealer.
    pub dealer: PartyIndex,
    hash: [u8; 32],
    sig: [u8; SIGNATURE_LEN],
}

/// Step 1b: a dealer's commitments to `k^(d)`, `a^(d)` for the whole batch, and one seal
/// per member of `M` with its `2B` shares.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PresignDealing {
    /// The run.
    pub session: SessionId,
    /// The dealer.
    pub dealer: PartyIndex,
    k_coms: Vec<Vec<Point>>,
    a_coms: Vec<Vec<Point>>,
    seals: Vec<(PartyIndex, Sealed)>,
    sig: [u8; SIGNATURE_LEN],
}

/// Step 2: `μ_i` and its proof for each presignature.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PresignMu {
    /// The run.
    pub session: SessionId,
    /// The sender.
    pub party: PartyIndex,
    mus: Vec<Scalar>,
    proofs: Vec<DleqProof>,
    sig: [u8; SIGNATURE_LEN],
}

/// Step 4: the degree-reduction dealing of `p_i = w_i·x_i` to `S`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PresignReduction {
    /// The run.
    pub session: SessionId,
    /// The dealer.
    pub party: PartyIndex,
    d_coms: Vec<Vec<Point>>,
    proofs: Vec<DleqProof>,
    seals: Vec<(PartyIndex, Sealed)>,
    sig: [u8; SIGNATURE_LEN],
}

crate::identity::signed_message!(PresignCommit, "presign/commit");
crate::identity::signed_message!(PresignDealing, "presign/deal");
crate::identity::signed_message!(PresignMu, "presign/mu");
crate::identity::signed_message!(PresignReduction, "presign/reduce");

fn verify_sig(
    roster: &Roster,
    from: PartyIndex,
    purpose: &str,
    bytes: &[u8],
    sig: &[u8],
) -> Result<()> {
    roster.verify_from(from, purpose, bytes, sig)
}

#[cfg(any(test, feature = "test-support"))]
impl PresignMu {
    /// Test support: the μ values, for adversarial tests.
    pub fn mus_mut(&mut self) -> &mut Vec<Scalar> {
        &mut self.mus
    }
}

#[cfg(any(test, feature = "test-support"))]
impl PresignReduction {
    /// Test support: the reduction commitments, for adversarial tests.
    pub fn d_coms_mut(&mut self) -> &mut Vec<Vec<Point>> {
        &mut self.d_coms
    }
}

#[cfg(any(test, feature = "test-support"))]
impl PresignDealing {
    /// Test support: replaces the seal for `recipient` with one holding random shares,
    /// as a malicious dealer would (call [`PresignDealing::resign`] after).
    pub fn corrupt_seal_for(
        &mut self,
        rng: &mut (impl CryptoRng + ?Sized),
        roster: &Roster,
        recipient: PartyIndex,
    ) -> Result<()> {
        let n = self.k_coms.len() * 2;
        let mut plain = Vec::with_capacity(32 * n);
        for _ in 0..n {
            plain.extend_from_slice(&SecretScalar::random(rng).secret_bytes()[..]);
        }
        let sealed =
            roster.seal_to(rng, self.session, SEAL_DEAL, self.dealer, recipient, &plain)?;
        for (r, s) in &mut self.seals {
            if *r == recipient {
                *s = sealed.clone();
            }
        }
        Ok(())
    }
}

// ---------------------------------------------------------------- node state

/// A dealer's secret state after step 1a.
pub struct PresignRound1 {
    cfg: PresignConfig,
    me: PartyIndex,
    k_polys: Vec<Polynomial>,
    a_polys: Vec<Polynomial>,
    k_coms: Vec<Vec<Point>>,
    a_coms: Vec<Vec<Point>>,
}

/// Secret state after step 1b.
pub struct PresignRound2 {
    cfg: PresignConfig,
    me: PartyIndex,
    commits: Vec<PresignCommit>,
}

impl PresignRound2 {
    /// The signing key of this batch.
    pub fn key_id(&self) -> KeyId {
        self.cfg.key.key_id
    }
}

/// Secret state after step 2: `a_i` per presignature (`k_i` is gone).
pub struct PresignRound3 {
    cfg: PresignConfig,
    me: PartyIndex,
    agg: PresignAggregate,
    a: Vec<SecretScalar>,
}

/// Secret state after step 4: `w_i` per presignature if `i ∈ S`.
pub struct PresignRound4 {
    cfg: PresignConfig,
    me: PartyIndex,
    agg: PresignAggregate,
    u: Vec<Scalar>,
    w: Vec<SecretScalar>,
}

/// The public aggregate of all dealings: per presignature, `Σ_d C^{k,(d)}` and
/// `Σ_d C^{a,(d)}`, plus the commitment hashes that fix them.
#[derive(Clone, Debug)]
pub struct PresignAggregate {
    k: Vec<Commitments>,
    a: Vec<Commitments>,
    commit_hashes: Vec<[u8; 32]>,
}

impl PresignAggregate {
    /// `R_b = Σ_d C^{k,(d)}_{b,0}`.
    fn r(&self, b: usize) -> Result<Point> {
        let k = self.k.get(b).ok_or(Error::Bug("batch index"))?;
        Point::new(k.constant()).ok_or(Error::PeerMisbehaved {
            culprits: Vec::new(),
            fault: Fault::Degenerate,
        })
    }
}

fn commit_hash(
    cfg: &PresignConfig,
    dealer: PartyIndex,
    k: &[Vec<Point>],
    a: &[Vec<Point>],
) -> [u8; 32] {
    let mut t = cfg.context("commit-hash", dealer);
    for c in k {
        t.points("k", c);
    }
    for c in a {
        t.points("a", c);
    }
    t.digest()
}

/// Step 1a: draw the batch's dealings and send only their hash.
pub fn round1(
    rng: &mut (impl CryptoRng + ?Sized),
    cfg: PresignConfig,
    me: PartyIndex,
    id: &IdentityKey,
) -> Result<(PresignRound1, PresignCommit)> {
    cfg.check()?;
    cfg.require_member(me, &cfg.mset)?;
    let t = cfg.key.params.t();
    let mut k_polys = Vec::with_capacity(cfg.b());
    let mut a_polys = Vec::with_capacity(cfg.b());
    let mut k_coms = Vec::with_capacity(cfg.b());
    let mut a_coms = Vec::with_capacity(cfg.b());
    for _ in 0..cfg.b() {
        let (k0, a0) = (SecretScalar::random(rng), SecretScalar::random(rng));
        let k = Polynomial::random(rng, &k0, t);
        let a = Polynomial::random(rng, &a0, t);
        k_coms.push(k.commit().to_points(false)?);
        a_coms.push(a.commit().to_points(false)?);
        k_polys.push(k);
        a_polys.push(a);
    }
    let mut msg = PresignCommit {
        session: cfg.session,
        dealer: me,
        hash: commit_hash(&cfg, me, &k_coms, &a_coms),
        sig: [0; SIGNATURE_LEN],
    };
    msg.sign(id);
    Ok((
        PresignRound1 {
            cfg,
            me,
            k_polys,
            a_polys,
            k_coms,
            a_coms,
        },
        msg,
    ))
}

/// Step 1b: once every commitment hash of `M` is in, reveal and seal the dealings.
pub fn round2(
    rng: &mut (impl CryptoRng + ?Sized),
    state: PresignRound1,
    commits: &[PresignCommit],
    id: &IdentityKey,
) -> Result<(PresignRound2, PresignDealing)> {
    let PresignRound1 {
        cfg,
        me,
        k_polys,
        a_polys,
        k_coms,
        a_coms,
    } = state;
    let ordered = one_from_each(commits, &cfg.mset, |m| m.dealer)?;
    for m in &ordered {
        cfg.check_session(m.session)?;
        verify_sig(
            &cfg.roster,
            m.dealer,
            PresignCommit::PURPOSE,
            &m.unsigned_bytes(),
            &m.sig,
        )?;
    }
    let mut seals = Vec::with_capacity(cfg.mset.len());
    for &j in cfg.mset.members() {
        let mut plain = zeroize::Zeroizing::new(Vec::with_capacity(64 * cfg.b()));
        for (k, a) in k_polys.iter().zip(&a_polys) {
            plain.extend_from_slice(&k.eval(j).secret_bytes()[..]);
            plain.extend_from_slice(&a.eval(j).secret_bytes()[..]);
        }
        seals.push((
            j,
            cfg.roster
                .seal_to(rng, cfg.session, SEAL_DEAL, me, j, &plain)?,
        ));
    }
    let mut msg = PresignDealing {
        session: cfg.session,
        dealer: me,
        k_coms,
        a_coms,
        seals,
        sig: [0; SIGNATURE_LEN],
    };
    msg.sign(id);
    Ok((
        PresignRound2 {
            cfg,
            me,
            commits: ordered.into_iter().cloned().collect(),
        },
        msg,
    ))
}

/// Checks every dealing's signature, hash opening and commitment lengths, and sums the
/// commitments. Used by the nodes (step 2) and the coordinator (to verify μ proofs and
/// build the pool's public data).
pub fn aggregate(
    cfg: &PresignConfig,
    commits: &[PresignCommit],
    dealings: &[PresignDealing],
) -> Result<PresignAggregate> {
    let commits = one_from_each(commits, &cfg.mset, |m| m.dealer)?;
    let dealings = one_from_each(dealings, &cfg.mset, |m| m.dealer)?;
    aggregate_ordered(cfg, &commits, &dealings)
}

fn aggregate_ordered(
    cfg: &PresignConfig,
    commits: &[&PresignCommit],
    dealings: &[&PresignDealing],
) -> Result<PresignAggregate> {
    let len = cfg.key.params.commitment_len();
    let mut k_sum: Vec<Option<Commitments>> = vec![None; cfg.b()];
    let mut a_sum: Vec<Option<Commitments>> = vec![None; cfg.b()];
    for (c, d) in commits.iter().zip(dealings) {
        cfg.check_session(c.session)?;
        cfg.check_session(d.session)?;
        verify_sig(
            &cfg.roster,
            c.dealer,
            PresignCommit::PURPOSE,
            &c.unsigned_bytes(),
            &c.sig,
        )?;
        verify_sig(
            &cfg.roster,
            d.dealer,
            PresignDealing::PURPOSE,
            &d.unsigned_bytes(),
            &d.sig,
        )?;
        if d.k_coms.len() != cfg.b() || d.a_coms.len() != cfg.b() {
            return Err(Error::blame_one(d.dealer, Fault::Malformed));
        }
        for (coms, sums) in [(&d.k_coms, &mut k_sum), (&d.a_coms, &mut a_sum)] {
            for (pts, acc) in coms.iter().zip(sums.iter_mut()) {
                let c = Commitments::received(pts, len, d.dealer)?;
                *acc = Some(match acc.take() {
                    None => c,
                    Some(s) => s.add(&c)?,
                });
            }
        }
        if commit_hash(cfg, d.dealer, &d.k_coms, &d.a_coms) != c.hash {
            return Err(Error::blame_one(d.dealer, Fault::CommitmentMismatch));
        }
    }
    let unwrap_all = |v: Vec<Option<Commitments>>| -> Result<Vec<Commitments>> {
        v.into_iter()
            .map(|c| c.ok_or(Error::Bug("empty aggregate")))
            .collect()
    };
    Ok(PresignAggregate {
        k: unwrap_all(k_sum)?,
        a: unwrap_all(a_sum)?,
        commit_hashes: commits.iter().map(|c| c.hash).collect(),
    })
}

/// Registers aggregated commitments as shared bases and returns, per presignature,
/// their base ids.
fn register(batch: &mut BatchVerifier, coms: &[Commitments]) -> Result<Vec<Vec<BaseId>>> {
    coms.iter()
        .map(|c| {
            Ok(
                c.eval_terms(PartyIndex::new(1).ok_or(Error::Bug("index"))?, Scalar::ONE)
                    .into_iter()
                    .map(|(p, _)| batch.base(p))
                    .collect(),
            )
        })
        .collect()
}

/// `Σ_k i^k·B_k` as a form over shared bases.
fn eval_form(bases: &[BaseId], i: PartyIndex, scale: Scalar) -> Form {
    let x = i.scalar();
    let mut pow = scale;
    Form::shared(
        bases
            .iter()
            .map(|b| {
                let t = (*b, pow);
                pow *= x;
                t
            })
            .collect(),
    )
}

fn mu_context(
    cfg: &PresignConfig,
    agg: &PresignAggregate,
    party: PartyIndex,
    b: usize,
    mu: &Scalar,
) -> Vec<u8> {
    let mut t = cfg.context("mu", party);
    for h in &agg.commit_hashes {
        t.append("commit", h);
    }
    t.u64("b", b as u64).scalar("mu", mu);
    t.digest().to_vec()
}

/// Step 2 (`i ∈ M`): verify shares, compute `μ_i = k_i·a_i` and prove it.
pub fn round3(
    rng: &mut (impl CryptoRng + ?Sized),
    state: PresignRound2,
    dealings: &[PresignDealing],
    kem: &KemSecretKey,
    id: &IdentityKey,
) -> Result<(PresignRound3, PresignMu)> {
    let PresignRound2 { cfg, me, commits } = state;
    let ordered = one_from_each(dealings, &cfg.mset, |m| m.dealer)?;
    let commit_refs: Vec<&PresignCommit> = commits.iter().collect();
    let agg = aggregate_ordered(&cfg, &commit_refs, &ordered)?;
    let b_len = cfg.b();
    // Sums of secret shares: zeroized when dropped.
    let mut k = zeroize::Zeroizing::new(vec![Scalar::ZERO; b_len]);
    let mut a = zeroize::Zeroizing::new(vec![Scalar::ZERO; b_len]);
    let mut per_dealer = Vec::with_capacity(ordered.len());
    for d in &ordered {
        let shares = crate::dkg::open_share(
            kem,
            cfg.session,
            SEAL_DEAL,
            d.dealer,
            me,
            &d.seals,
            2 * b_len,
        )?;
        for (b, pair) in shares.chunks_exact(2).enumerate() {
            if let ([ks, as_], Some(kb), Some(ab)) = (pair, k.get_mut(b), a.get_mut(b)) {
                *kb += ks.expose();
                *ab += as_.expose();
            }
        }
        per_dealer.push(shares);
    }
    // Aggregated check: k_i·G = Σ_k i^k·(Σ_d C^{k,(d)}_k) for every presignature (and
    // likewise for a), all in one batch.
    let mut batch = BatchVerifier::new();
    let first = cfg
        .mset
        .members()
        .first()
        .copied()
        .ok_or(Error::Bug("empty M"))?;
    for b in 0..b_len {
        for (sum, coms) in [(&*k, &agg.k), (&*a, &agg.a)] {
            let (Some(s), Some(c)) = (sum.get(b), coms.get(b)) else {
                return Err(Error::Bug("batch index"));
            };
            c.verify_share_into(me, s, &mut batch, first, Fault::BadShare);
        }
    }
    if batch.verify(rng).is_err() {
        // Someone dealt a bad share: check dealer by dealer to name them.
        let mut blame = BatchVerifier::new();
        for (d, shares) in ordered.iter().zip(&per_dealer) {
            for (b, pair) in shares.chunks_exact(2).enumerate() {
                let (Some(kc), Some(ac)) = (d.k_coms.get(b), d.a_coms.get(b)) else {
                    return Err(Error::Bug("batch index"));
                };
                let len = kc.len();
                if let [ks, as_] = pair {
                    Commitments::received(kc, len, d.dealer)?.verify_share_into(
                        me,
                        ks.expose(),
                        &mut blame,
                        d.dealer,
                        Fault::BadShare,
                    );
                    Commitments::received(ac, len, d.dealer)?.verify_share_into(
                        me,
                        as_.expose(),
                        &mut blame,
                        d.dealer,
                        Fault::BadShare,
                    );
                }
            }
        }
        blame.verify(rng)?;
        return Err(Error::Bug(
            "aggregate share check failed but every dealing verifies",
        ));
    }
    drop(per_dealer);
    let k: Vec<SecretScalar> = k.iter().copied().map(SecretScalar::new).collect();
    let a: Vec<SecretScalar> = a.iter().copied().map(SecretScalar::new).collect();
    let mut mus = Vec::with_capacity(b_len);
    let mut proofs = Vec::with_capacity(b_len);
    for (b, (kb, ab)) in k.iter().zip(&a).enumerate() {
        let mu = *kb.expose() * ab.expose();
        let ctx = mu_context(&cfg, &agg, me, b, &mu);
        proofs.push(DleqProof::prove(
            rng,
            &ctx,
            Base::G,
            Base::KnownLog(ab),
            kb,
        )?);
        mus.push(mu);
    }
    let mut msg = PresignMu {
        session: cfg.session,
        party: me,
        mus,
        proofs,
        sig: [0; SIGNATURE_LEN],
    };
    msg.sign(id);
    Ok((PresignRound3 { cfg, me, agg, a }, msg))
}

/// Coordinator, step 3: verify every μ proof (naming culprits) before relaying.
pub fn verify_mus(
    rng: &mut (impl CryptoRng + ?Sized),
    cfg: &PresignConfig,
    agg: &PresignAggregate,
    mus: &[PresignMu],
) -> Result<()> {
    let ordered = one_from_each(mus, &cfg.mset, |m| m.party)?;
    let mut batch = BatchVerifier::new();
    let kb = register(&mut batch, &agg.k)?;
    let ab = register(&mut batch, &agg.a)?;
    for m in &ordered {
        cfg.check_session(m.session)?;
        verify_sig(
            &cfg.roster,
            m.party,
            PresignMu::PURPOSE,
            &m.unsigned_bytes(),
            &m.sig,
        )?;
        if m.mus.len() != cfg.b() || m.proofs.len() != cfg.b() {
            return Err(Error::blame_one(m.party, Fault::Malformed));
        }
        for (b, (mu, proof)) in m.mus.iter().zip(&m.proofs).enumerate() {
            let (Some(kbases), Some(abases)) = (kb.get(b), ab.get(b)) else {
                return Err(Error::Bug("batch index"));
            };
            let g = Form::generator();
            let k_i = eval_form(kbases, m.party, Scalar::ONE);
            let a_i = eval_form(abases, m.party, Scalar::ONE);
            let mu_g = Form::g_times(*mu);
            let forms = DleqForms {
                b1: &g,
                a: &k_i,
                b2: &a_i,
                c: &mu_g,
            };
            let ctx = mu_context(cfg, agg, m.party, b, mu);
            proof.verify_into(&ctx, &forms, &mut batch, m.party, Fault::BadMuProof);
        }
    }
    batch.verify(rng)
}

/// `u_b = Σ_{i∈M} λ_i^M μ_{i,b}` from the relayed μ messages (signatures checked).
fn compute_u(cfg: &PresignConfig, mus: &[PresignMu]) -> Result<Vec<Scalar>> {
    let ordered = one_from_each(mus, &cfg.mset, |m| m.party)?;
    let mut u = vec![Scalar::ZERO; cfg.b()];
    for m in &ordered {
        cfg.check_session(m.session)?;
        verify_sig(
            &cfg.roster,
            m.party,
            PresignMu::PURPOSE,
            &m.unsigned_bytes(),
            &m.sig,
        )?;
        if m.mus.len() != cfg.b() {
            return Err(Error::blame_one(m.party, Fault::Malformed));
        }
        let l = cfg.mset.lagrange(m.party)?;
        for (acc, mu) in u.iter_mut().zip(&m.mus) {
            *acc += l * mu;
        }
    }
    if u.iter().any(|x| bool::from(x.is_zero())) {
        return Err(Error::blame(cfg.mset.members().to_vec(), Fault::Degenerate));
    }
    Ok(u)
}

fn reduce_context(
    cfg: &PresignConfig,
    agg: &PresignAggregate,
    party: PartyIndex,
    b: usize,
    u: &Scalar,
    d0: &Point,
) -> Vec<u8> {
    let mut t = cfg.context("reduce", party);
    for h in &agg.commit_hashes {
        t.append("commit", h);
    }
    t.u64("b", b as u64).scalar("u", u).point("D0", d0);
    t.digest().to_vec()
}

/// Step 4 (`i ∈ M`): compute `w_i = a_i·u⁻¹`, `p_i = w_i·x_i`, and deal `p_i` to `S`.
pub fn round4(
    rng: &mut (impl CryptoRng + ?Sized),
    state: PresignRound3,
    mus: &[PresignMu],
    share: &KeyShare,
    id: &IdentityKey,
) -> Result<(PresignRound4, PresignReduction)> {
    let PresignRound3 { cfg, me, agg, a } = state;
    if share.public != cfg.key || share.index != me {
        return Err(Error::input(
            "key share does not belong to this presignature run",
        ));
    }
    let u = compute_u(&cfg, mus)?;
    let t = cfg.key.params.t();
    let mut w = Vec::with_capacity(cfg.b());
    let mut d_coms = Vec::with_capacity(cfg.b());
    let mut proofs = Vec::with_capacity(cfg.b());
    let mut polys = Vec::with_capacity(cfg.b());
    for (b, (ab, ub)) in a.iter().zip(&u).enumerate() {
        let u_inv = group::invert(ub).ok_or(Error::Bug("u is zero"))?;
        let wb = SecretScalar::new(*ab.expose() * u_inv);
        let p = SecretScalar::new(*wb.expose() * share.secret.expose());
        let g = Polynomial::random(rng, &p, t);
        let coms = g.commit().to_points(false)?;
        let d0 = *coms.first().ok_or(Error::Bug("empty commitments"))?;
        let ctx = reduce_context(&cfg, &agg, me, b, ub, &d0);
        proofs.push(DleqProof::prove(
            rng,
            &ctx,
            Base::G,
            Base::KnownLog(&share.secret),
            &wb,
        )?);
        d_coms.push(coms);
        polys.push(g);
        w.push(wb);
    }
    let mut seals = Vec::with_capacity(cfg.sset.len());
    for &j in cfg.sset.members() {
        let mut plain = zeroize::Zeroizing::new(Vec::with_capacity(32 * cfg.b()));
        for g in &polys {
            plain.extend_from_slice(&g.eval(j).secret_bytes()[..]);
        }
        seals.push((
            j,
            cfg.roster
                .seal_to(rng, cfg.session, SEAL_REDUCE, me, j, &plain)?,
        ));
    }
    let mut msg = PresignReduction {
        session: cfg.session,
        party: me,
        d_coms,
        proofs,
        seals,
        sig: [0; SIGNATURE_LEN],
    };
    msg.sign(id);
    // Members outside S keep nothing: their w_i is dropped (and zeroized) here.
    let w = if cfg.sset.contains(me) { w } else { Vec::new() };
    Ok((PresignRound4 { cfg, me, agg, u, w }, msg))
}

/// Adds every check of the reduction dealings that `j` (if given) or the public can make:
/// the DLEQ proofs `log_G W_i = log_{X_i} D_{i,0}`, and for `j` its shares.
fn check_reductions(
    cfg: &PresignConfig,
    agg: &PresignAggregate,
    u: &[Scalar],
    ordered: &[&PresignReduction],
    batch: &mut BatchVerifier,
) -> Result<()> {
    let len = cfg.key.params.commitment_len();
    let ab = register(batch, &agg.a)?;
    let xb: Vec<BaseId> = cfg
        .key
        .commitments()
        .eval_terms(PartyIndex::new(1).ok_or(Error::Bug("index"))?, Scalar::ONE)
        .into_iter()
        .map(|(p, _)| batch.base(p))
        .collect();
    let u_invs = u
        .iter()
        .map(|ub| group::invert(ub).ok_or(Error::Bug("u is zero")))
        .collect::<Result<Vec<_>>>()?;
    for m in ordered {
        cfg.check_session(m.session)?;
        verify_sig(
            &cfg.roster,
            m.party,
            PresignReduction::PURPOSE,
            &m.unsigned_bytes(),
            &m.sig,
        )?;
        if m.d_coms.len() != cfg.b() || m.proofs.len() != cfg.b() {
            return Err(Error::blame_one(m.party, Fault::Malformed));
        }
        let x_i = eval_form(&xb, m.party, Scalar::ONE);
        for (b, (coms, proof)) in m.d_coms.iter().zip(&m.proofs).enumerate() {
            if coms.len() != len {
                return Err(Error::blame_one(
                    m.party,
                    Fault::WrongCommitmentLength {
                        expected: len,
                        got: coms.len(),
                    },
                ));
            }
            let (Some(abases), Some(ub), Some(u_inv), Some(d0)) =
                (ab.get(b), u.get(b), u_invs.get(b), coms.first())
            else {
                return Err(Error::Bug("batch index"));
            };
            let g = Form::generator();
            let w_i = eval_form(abases, m.party, *u_inv);
            let d0f = Form::point(d0);
            let forms = DleqForms {
                b1: &g,
                a: &w_i,
                b2: &x_i,
                c: &d0f,
            };
            let ctx = reduce_context(cfg, agg, m.party, b, ub, d0);
            proof.verify_into(&ctx, &forms, batch, m.party, Fault::BadReductionDealing);
        }
    }
    Ok(())
}

/// A node's share of one presignature: `(id, key, S, R, w_j, v_j)`. Secret.
pub struct PresignatureShare {
    /// Its id.
    pub id: PresigId,
    /// The key.
    pub key_id: KeyId,
    /// The fixed signing set.
    pub sset: PartySet,
    /// This node.
    pub index: PartyIndex,
    /// `R = k·G`.
    pub r: Point,
    pub(crate) w: SecretScalar,
    pub(crate) v: SecretScalar,
}

impl core::fmt::Debug for PresignatureShare {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("PresignatureShare")
            .field("id", &self.id)
            .field("index", &self.index)
            .field("w", &"<redacted>")
            .field("v", &"<redacted>")
            .finish()
    }
}

/// Step 5 (`j ∈ S`): verify every reduction dealing and keep the presignature shares.
/// Members of `M` outside `S` call this too and get an empty list (they only learn that
/// the batch completed).
pub fn round5(
    rng: &mut (impl CryptoRng + ?Sized),
    state: PresignRound4,
    reductions: &[PresignReduction],
    kem: &KemSecretKey,
) -> Result<Vec<PresignatureShare>> {
    let PresignRound4 { cfg, me, agg, u, w } = state;
    if !cfg.sset.contains(me) {
        return Ok(Vec::new());
    }
    let ordered = one_from_each(reductions, &cfg.mset, |m| m.party)?;
    let mut batch = BatchVerifier::new();
    check_reductions(&cfg, &agg, &u, &ordered, &mut batch)?;
    let mut v = zeroize::Zeroizing::new(vec![Scalar::ZERO; cfg.b()]);
    for m in &ordered {
        let shares = crate::dkg::open_share(
            kem,
            cfg.session,
            SEAL_REDUCE,
            m.party,
            me,
            &m.seals,
            cfg.b(),
        )
        .map_err(|e| match e {
            Error::PeerMisbehaved { culprits, .. } => {
                Error::blame(culprits, Fault::BadReductionDealing)
            }
            other => other,
        })?;
        let l = cfg.mset.lagrange(m.party)?;
        for ((s, coms), acc) in shares.iter().zip(&m.d_coms).zip(v.iter_mut()) {
            let len = coms.len();
            Commitments::received(coms, len, m.party)?.verify_share_into(
                me,
                s.expose(),
                &mut batch,
                m.party,
                Fault::BadReductionDealing,
            );
            *acc += l * s.expose();
        }
    }
    batch.verify(rng)?;
    let mut out = Vec::with_capacity(cfg.b());
    for (b, (wb, vb)) in w.into_iter().zip(v.iter().copied()).enumerate() {
        out.push(PresignatureShare {
            id: cfg.presig_id(b),
            key_id: cfg.key.key_id,
            sset: cfg.sset.clone(),
            index: me,
            r: agg.r(b)?,
            w: wb,
            v: SecretScalar::new(vb),
        });
    }
    Ok(out)
}

/// The public data of one presignature, kept in the coordinator's pool.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PresignaturePublic {
    /// Its id.
    pub id: PresigId,
    /// The key.
    pub key_id: KeyId,
    /// The fixed signing set `S`.
    pub sset: PartySet,
    /// `R`.
    pub r: Point,
    /// `(W_j, V_j)` for each `j ∈ S`, in member order.
    pub(crate) wv: Vec<(Point, Point)>,
}

/// Coordinator, after step 5: verifies the reduction proofs and computes the pool's
/// public data `(id, key, S, R, {W_j, V_j})`.
pub fn public_output(
    rng: &mut (impl CryptoRng + ?Sized),
    cfg: &PresignConfig,
    agg: &PresignAggregate,
    mus: &[PresignMu],
    reductions: &[PresignReduction],
) -> Result<Vec<PresignaturePublic>> {
    let u = compute_u(cfg, mus)?;
    let ordered = one_from_each(reductions, &cfg.mset, |m| m.party)?;
    let mut batch = BatchVerifier::new();
    check_reductions(cfg, agg, &u, &ordered, &mut batch)?;
    batch.verify(rng)?;
    let lambdas = cfg.mset.lagrange_all()?;
    let mut out = Vec::with_capacity(cfg.b());
    for (b, ub) in u.iter().enumerate() {
        let u_inv = group::invert(ub).ok_or(Error::Bug("u is zero"))?;
        let a = agg.a.get(b).ok_or(Error::Bug("batch index"))?;
        // V_j = Σ_k j^k Σ_i λ_i D_{i,k}: one multi-scalar multiplication over every
        // D_{i,k} per j (no intermediate sums: each costs a full set of doublings).
        let mut wv = Vec::with_capacity(cfg.sset.len());
        for &j in cfg.sset.members() {
            let x = j.scalar();
            let mut terms = Vec::with_capacity(ordered.len() * cfg.key.params.commitment_len());
            for (m, (_, l)) in ordered.iter().zip(&lambdas) {
                let coms = m
                    .d_coms
                    .get(b)
                    .filter(|c| c.len() == cfg.key.params.commitment_len())
                    .ok_or(Error::Bug("reduction commitment index"))?;
                let mut pow = *l;
                for d in coms {
                    terms.push((d.projective(), pow));
                    pow *= x;
                }
            }
            let v_pub = group::msm_point(&terms);
            let w_pub = group::msm_point(&a.eval_terms(j, u_inv));
            match (w_pub, v_pub) {
                (Some(w), Some(v)) => wv.push((w, v)),
                _ => return Err(Error::blame(cfg.mset.members().to_vec(), Fault::Degenerate)),
            }
        }
        out.push(PresignaturePublic {
            id: cfg.presig_id(b),
            key_id: cfg.key.key_id,
            sset: cfg.sset.clone(),
            r: agg.r(b)?,
            wv,
        });
    }
    Ok(out)
}

// ---------------------------------------------------------------- encodings

fn enc_coms(w: &mut Writer, coms: &[Vec<Point>]) {
    w.list(coms, |w, c| w.list(c, |w, p| w.point(p)));
}

fn dec_coms(r: &mut Reader<'_>) -> Result<Vec<Vec<Point>>> {
    r.list(4, |r| r.list(33, |r| r.point()))
}

fn enc_seals(w: &mut Writer, seals: &[(PartyIndex, Sealed)]) {
    w.list(seals, |w, (j, s)| {
        w.party(*j);
        s.encode(w);
    });
}

fn dec_seals(r: &mut Reader<'_>) -> Result<Vec<(PartyIndex, Sealed)>> {
    r.list(2 + seal::MLKEM_CT_LEN, |r| {
        Ok((r.party()?, Sealed::decode(r)?))
    })
}

impl Wire for PresignCommit {
    const TAG: u8 = 0x41;
    const NAME: &'static str = "PresignCommit";
    fn encode_body(&self, w: &mut Writer) {
        w.fixed(&self.session.0);
        w.party(self.dealer);
        w.fixed(&self.hash);
        w.fixed(&self.sig);
    }
    fn decode_body(r: &mut Reader<'_>) -> Result<Self> {
        Ok(PresignCommit {
            session: SessionId(r.array()?),
            dealer: r.party()?,
            hash: r.array()?,
            sig: r.array()?,
        })
    }
}

impl Wire for PresignDealing {
    const TAG: u8 = 0x42;
    const NAME: &'static str = "PresignDealing";
    fn encode_body(&self, w: &mut Writer) {
        w.fixed(&self.session.0);
        w.party(self.dealer);
        enc_coms(w, &self.k_coms);
        enc_coms(w, &self.a_coms);
        enc_seals(w, &self.seals);
        w.fixed(&self.sig);
    }
    fn decode_body(r: &mut Reader<'_>) -> Result<Self> {
        Ok(PresignDealing {
            session: SessionId(r.array()?),
            dealer: r.party()?,
            k_coms: dec_coms(r)?,
            a_coms: dec_coms(r)?,
            seals: dec_seals(r)?,
            sig: r.array()?,
        })
    }
}

impl Wire for PresignMu {
    const TAG: u8 = 0x43;
    const NAME: &'static str = "PresignMu";
    fn encode_body(&self, w: &mut Writer) {
        w.fixed(&self.session.0);
        w.party(self.party);
        w.list(&self.mus, |w, s| w.scalar(s));
        w.list(&self.proofs, |w, p| p.encode(w));
        w.fixed(&self.sig);
    }
    fn decode_body(r: &mut Reader<'_>) -> Result<Self> {
        Ok(PresignMu {
            session: SessionId(r.array()?),
            party: r.party()?,
            mus: r.list(32, |r| r.scalar())?,
            proofs: r.list(98, DleqProof::decode)?,
            sig: r.array()?,
        })
    }
}

impl Wire for PresignReduction {
    const TAG: u8 = 0x44;
    const NAME: &'static str = "PresignReduction";
    fn encode_body(&self, w: &mut Writer) {
        w.fixed(&self.session.0);
        w.party(self.party);
        enc_coms(w, &self.d_coms);
        w.list(&self.proofs, |w, p| p.encode(w));
        enc_seals(w, &self.seals);
        w.fixed(&self.sig);
    }
    fn decode_body(r: &mut Reader<'_>) -> Result<Self> {
        Ok(PresignReduction {
            session: SessionId(r.array()?),
            party: r.party()?,
            d_coms: dec_coms(r)?,
            proofs: r.list(98, DleqProof::decode)?,
            seals: dec_seals(r)?,
            sig: r.array()?,
        })
    }
}

impl Wire for PresignaturePublic {
    const TAG: u8 = 0x45;
    const NAME: &'static str = "PresignaturePublic";
    fn encode_body(&self, w: &mut Writer) {
        w.fixed(&self.id.0);
        w.fixed(&self.key_id.0);
        w.party_set(&self.sset);
        w.point(&self.r);
        w.list(&self.wv, |w, (a, b)| {
            w.point(a);
            w.point(b);
        });
    }
    fn decode_body(r: &mut Reader<'_>) -> Result<Self> {
        let id = PresigId(r.array()?);
        let key_id = KeyId(r.array()?);
        let sset = r.party_set()?;
        let rp = r.point()?;
        let wv = r.list(66, |r| Ok((r.point()?, r.point()?)))?;
        if wv.len() != sset.len() {
            return Err(Error::input(
                "PresignaturePublic: one (W, V) pair per signing-set member is required",
            ));
        }
        Ok(PresignaturePublic {
            id,
            key_id,
            sset,
            r: rp,
            wv,
        })
    }
}

impl PresignaturePublic {
    /// `(W_j, V_j)` for member `j` of `S`.
    pub fn public_shares(&self, j: PartyIndex) -> Option<(Point, Point)> {
        let pos = self.sset.members().iter().position(|p| *p == j)?;
        self.wv.get(pos).copied()
    }
}

impl PresignatureShare {
    /// Encoding for sealed storage at rest. The bytes hold `w_j` and `v_j`.
    pub fn secret_bytes(&self) -> zeroize::Zeroizing<Vec<u8>> {
        let mut w = Writer::default();
        w.u8(crate::wire::VERSION);
        w.u8(0x46);
        w.fixed(&self.id.0);
        w.fixed(&self.key_id.0);
        w.party_set(&self.sset);
        w.party(self.index);
        w.point(&self.r);
        w.fixed(&self.w.secret_bytes()[..]);
        w.fixed(&self.v.secret_bytes()[..]);
        zeroize::Zeroizing::new(w.into_bytes())
    }

    /// The key id inside a [`PresignatureShare::secret_bytes`] encoding, read without
    /// decoding the rest (no secret is parsed); `None` if the encoding is not one.
    pub fn key_id_of(bytes: &[u8]) -> Option<KeyId> {
        let mut r = Reader::new(bytes, "PresignatureShare");
        r.version().ok()?;
        if r.u8().ok()? != 0x46 {
            return None;
        }
        let _id: [u8; 32] = r.array().ok()?;
        r.array().ok().map(KeyId)
    }

    /// Strict decoding of [`PresignatureShare::secret_bytes`].
    pub fn from_secret_bytes(bytes: &[u8]) -> Result<Self> {
        let mut r = Reader::new(bytes, "PresignatureShare");
        r.version()?;
        if r.u8()? != 0x46 {
            return Err(Error::input(
                "PresignatureShare: unsupported version or wrong type",
            ));
        }
        let out = PresignatureShare {
            id: PresigId(r.array()?),
            key_id: KeyId(r.array()?),
            sset: r.party_set()?,
            index: r.party()?,
            r: r.point()?,
            w: SecretScalar::from_secret_bytes(r.fixed(32)?)?,
            v: SecretScalar::from_secret_bytes(r.fixed(32)?)?,
        };
        r.finish()?;
        if !out.sset.contains(out.index) {
            return Err(Error::input(
                "PresignatureShare: node is not in the signing set",
            ));
        }
        Ok(out)
    }
}
