//! Distributed key generation and refresh (DESIGN.md §4.3).
//!
//! Round 1 ([`round1`]): every node `i` draws `f_i`, commits `C_i`, proves knowledge of
//! `f_i(0)` bound to `(sid, i)`, and sends only `h_i = H(sid, i, C_i)` — so no node can
//! choose its dealing after seeing the others' (rushing / bias).
//! Round 2 ([`round2`]): after every commitment hash is in, nodes reveal `C_i`, the
//! proof, and `f_i(j)` sealed to each `j` ([`crate::seal`]), the whole message signed.
//! Round 3 ([`round3`]): node `j` checks signatures, hash openings, commitment lengths,
//! proofs and its shares (all batched); sets `x_j = Σ_i f_i(j)`; and returns a signed
//! [`DkgConfirm`] carrying the group commitments, which fix `X` and every `X_k`.
//! The coordinator's [`finalize`] checks that every node confirms the same key; only
//! then do nodes mark the share active. Any failure aborts and names the dealer.
//!
//! **Refresh** runs the same rounds with dealings of zero ([`DkgMode::Refresh`]): no
//! `C_0` and no proof are sent, each node adds its received shares to its old share,
//! the public key is unchanged, and the epoch advances so that old and new shares are
//! never mixed.
//!
//! **Resharing** ([`DkgMode::Reshare`]) hands an existing key to a new set of shares,
//! possibly with a new `n` and `t`, without reconstructing it: `t+1` holders of the
//! prior epoch (the *dealers*) each deal `λ_i·x_i` (Lagrange weight over the dealer
//! set) with a polynomial of the new degree, and every recipient checks the constant
//! commitment against the public `λ_i·X_i`, so a dealer cannot change the key. Nodes
//! that deal nothing (a node that lost its disk, a new node) [`join`] and only receive.
//! The public key is unchanged; the epoch advances and every old share, including the
//! dealers' own, is replaced.

use rand_core::CryptoRng;

use crate::batch::{BatchVerifier, Form};
use crate::error::{Error, Fault, Result};
use crate::feldman::{Commitments, Polynomial};
use crate::group::{Point, Scalar};
use crate::hash::Transcript;
use crate::identity::{IdentityKey, Roster, SIGNATURE_LEN};
use crate::keys::{KeyId, KeyPublic, KeyPurpose, KeyShare};
use crate::params::{PartyIndex, PartySet, SessionId, ThresholdParams, one_from_each};
use crate::proofs::SchnorrProof;
use crate::seal::{self, KemSecretKey, SealContext, Sealed};
use crate::secret::SecretScalar;
use crate::wire::{Reader, Wire, Writer};

const SEAL_ROUND: u8 = 0x21;

/// New key, or refresh of an existing one.
#[derive(Clone, Debug)]
pub enum DkgMode {
    /// Generate a new key.
    NewKey {
        /// Its fixed purpose.
        purpose: KeyPurpose,
    },
    /// Re-share an existing key with fresh shares and the same public key.
    Refresh {
        /// The key's current public data.
        prior: KeyPublic,
    },
    /// Hand an existing key to fresh shares for the parties of the new parameters
    /// (repair, added nodes, a new threshold); the public key is unchanged.
    Reshare {
        /// The key's current public data (its parameters are the old ones).
        prior: KeyPublic,
        /// The `t_old + 1` holders of the prior epoch that deal; each must also be a
        /// party of the new parameters.
        dealers: PartySet,
        /// A digest of what else every dealer must agree on, bound into every message
        /// of the run: the fragment nodes put the key's usage profile here, so that a
        /// recipient with no record of the key (a repaired or new node) takes the
        /// profile only if `t + 1` holders signed off on it.
        binding: [u8; 32],
    },
}

/// The holder indices, big-endian `u16` each, for transcripts.
fn holder_bytes(p: &ThresholdParams) -> Vec<u8> {
    p.all_parties()
        .members()
        .iter()
        .flat_map(|i| i.get().to_be_bytes())
        .collect()
}

/// Everything all parties must agree on before a DKG or refresh starts.
#[derive(Clone, Debug)]
pub struct DkgConfig {
    /// Binds every message of this run.
    pub session: SessionId,
    /// The key being generated or refreshed.
    pub key_id: KeyId,
    /// Threshold parameters (all `n` holders take part).
    pub params: ThresholdParams,
    /// New key or refresh.
    pub mode: DkgMode,
    /// Verified public material of every node.
    pub roster: Roster,
}

impl DkgConfig {
    fn check(&self) -> Result<()> {
        self.roster.covers(&self.params.all_parties())?;
        match &self.mode {
            DkgMode::NewKey { .. } => {}
            DkgMode::Refresh { prior } => {
                if prior.key_id != self.key_id || prior.params != self.params {
                    return Err(Error::input(
                        "refresh: prior key data does not match the key id and parameters",
                    ));
                }
            }
            DkgMode::Reshare { prior, dealers, .. } => {
                if prior.key_id != self.key_id {
                    return Err(Error::input(
                        "reshare: prior key data belongs to another key id",
                    ));
                }
                if dealers.len() != prior.params.commitment_len() {
                    return Err(Error::input(format!(
                        "reshare: {} dealers given, but the prior sharing needs exactly t + 1 = {}",
                        dealers.len(),
                        prior.params.commitment_len()
                    )));
                }
                prior.params.check_members(dealers)?;
                self.params.check_members(dealers)?;
            }
        }
        Ok(())
    }

    fn is_refresh(&self) -> bool {
        matches!(self.mode, DkgMode::Refresh { .. })
    }

    fn is_reshare(&self) -> bool {
        matches!(self.mode, DkgMode::Reshare { .. })
    }

    /// The parties that deal in this run: all of them, or a reshare's dealers.
    pub fn dealers(&self) -> PartySet {
        match &self.mode {
            DkgMode::Reshare { dealers, .. } => dealers.clone(),
            _ => self.params.all_parties(),
        }
    }

    /// Whether party `p` deals in this run (a reshare recipient outside the dealers
    /// does not: it calls [`join`] instead of [`round1`]).
    pub fn is_dealer(&self, p: PartyIndex) -> bool {
        self.dealers().contains(p)
    }

    /// A digest of the configuration, bound into every signature and proof.
    fn context(&self, label: &str, party: PartyIndex) -> Vec<u8> {
        let mut t = Transcript::new("quorate/dkg/v1");
        t.append("label", label.as_bytes())
            .append("sid", &self.session.0)
            .append("key", &self.key_id.0)
            .u64("n", u64::from(self.params.n()))
            .u64("t", u64::from(self.params.t()))
            .u64("party", u64::from(party.get()));
        if !self.params.is_contiguous() {
            t.append("holders", &holder_bytes(&self.params));
        }
        match &self.mode {
            DkgMode::NewKey { purpose } => {
                t.u64("purpose", u64::from(purpose.to_u8()));
            }
            DkgMode::Refresh { prior } => {
                t.point("X", &prior.public_key())
                    .u64("epoch", u64::from(prior.epoch));
            }
            DkgMode::Reshare {
                prior,
                dealers,
                binding,
            } => {
                let d: Vec<u8> = dealers
                    .members()
                    .iter()
                    .flat_map(|p| p.get().to_be_bytes())
                    .collect();
                t.point("X", &prior.public_key())
                    .u64("epoch", u64::from(prior.epoch))
                    .u64("prior-n", u64::from(prior.params.n()))
                    .u64("prior-t", u64::from(prior.params.t()))
                    .append("prior-holders", &holder_bytes(&prior.params))
                    .append("dealers", &d)
                    .append("binding", binding);
            }
        }
        t.digest().to_vec()
    }

    /// The proof-of-knowledge context binds the run, the dealer and `C_0`.
    fn pok_context(&self, dealer: PartyIndex, c0: &Point) -> Vec<u8> {
        let mut ctx = self.context("pok", dealer);
        ctx.extend_from_slice(&c0.to_bytes());
        ctx
    }

    fn commitment_hash(&self, dealer: PartyIndex, c: &[Point]) -> [u8; 32] {
        let mut t = Transcript::new("quorate/dkg/commit/v1");
        t.append("ctx", &self.context("commit-hash", dealer))
            .points("C", c);
        t.digest()
    }
}

/// Round-1 message: the hash of a dealer's commitments.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DkgCommit {
    /// The run.
    pub session: SessionId,
    /// The dealer.
    pub dealer: PartyIndex,
    hash: [u8; 32],
    sig: [u8; SIGNATURE_LEN],
}

/// Round-2 message: a dealer's commitments, proof and sealed shares.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DkgReveal {
    /// The run.
    pub session: SessionId,
    /// The dealer.
    pub dealer: PartyIndex,
    commitments: Vec<Point>,
    pok: Option<SchnorrProof>,
    seals: Vec<(PartyIndex, Sealed)>,
    sig: [u8; SIGNATURE_LEN],
}

/// Round-3 message: a node's view of the resulting key, signed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DkgConfirm {
    /// The run.
    pub session: SessionId,
    /// The confirming node.
    pub party: PartyIndex,
    commitments: Vec<Point>,
    sig: [u8; SIGNATURE_LEN],
}

/// A node's secret state after round 1.
pub struct DkgRound1 {
    cfg: DkgConfig,
    me: PartyIndex,
    poly: Polynomial,
    commitments: Vec<Point>,
    pok: Option<SchnorrProof>,
}

/// A node's secret state after round 2.
pub struct DkgRound2 {
    cfg: DkgConfig,
    me: PartyIndex,
    commits: Vec<DkgCommit>,
}

impl DkgRound2 {
    /// The key being generated or refreshed.
    pub fn key_id(&self) -> KeyId {
        self.cfg.key_id
    }

    /// The receiving party.
    pub fn party(&self) -> PartyIndex {
        self.me
    }

    /// Whether this run refreshes an existing key (round 3 then needs the prior share).
    pub fn is_refresh(&self) -> bool {
        self.cfg.is_refresh()
    }
}

crate::identity::signed_message!(DkgCommit, "dkg/commit");
crate::identity::signed_message!(DkgReveal, "dkg/reveal");
crate::identity::signed_message!(DkgConfirm, "dkg/confirm");

impl DkgReveal {
    /// Test support: replaces the seal for `recipient` with one holding a random share,
    /// as a malicious dealer would (call [`DkgReveal::resign`] after).
    #[cfg(any(test, feature = "test-support"))]
    pub fn corrupt_seal_for(
        &mut self,
        rng: &mut (impl CryptoRng + ?Sized),
        roster: &Roster,
        recipient: PartyIndex,
    ) -> Result<()> {
        let bogus = SecretScalar::random(rng);
        let sealed = roster.seal_to(
            rng,
            self.session,
            SEAL_ROUND,
            self.dealer,
            recipient,
            &bogus.secret_bytes()[..],
        )?;
        for (r, s) in &mut self.seals {
            if *r == recipient {
                *s = sealed.clone();
            }
        }
        Ok(())
    }

    /// Test support: mutable access for adversarial tests.
    #[cfg(any(test, feature = "test-support"))]
    pub fn parts_mut(
        &mut self,
    ) -> (
        &mut Vec<Point>,
        &mut Option<SchnorrProof>,
        &mut Vec<(PartyIndex, Sealed)>,
    ) {
        (&mut self.commitments, &mut self.pok, &mut self.seals)
    }
}

/// Round 1 (§4.3 step 1): draw the dealing and send only its commitment hash.
pub fn round1(
    rng: &mut (impl CryptoRng + ?Sized),
    cfg: DkgConfig,
    me: PartyIndex,
    id: &IdentityKey,
) -> Result<(DkgRound1, DkgCommit)> {
    cfg.check()?;
    cfg.roster.get(me)?;
    if cfg.is_reshare() {
        return Err(Error::input(
            "a reshare dealer starts with round1_reshare (it needs its prior share); a recipient with join",
        ));
    }
    let t = cfg.params.t();
    let (poly, commitments, pok) = if cfg.is_refresh() {
        let poly = Polynomial::random_zero(rng, t);
        let c = poly.commit().to_points(true)?;
        (poly, c, None)
    } else {
        let secret = SecretScalar::random(rng);
        let poly = Polynomial::random(rng, &secret, t);
        let c = poly.commit().to_points(false)?;
        let x0 = c.first().copied().ok_or(Error::Bug("empty commitments"))?;
        let pok = SchnorrProof::prove(rng, &cfg.pok_context(me, &x0), &secret)?;
        (poly, c, Some(pok))
    };
    Ok(commit_to(cfg, me, id, poly, commitments, pok))
}

fn commit_to(
    cfg: DkgConfig,
    me: PartyIndex,
    id: &IdentityKey,
    poly: Polynomial,
    commitments: Vec<Point>,
    pok: Option<SchnorrProof>,
) -> (DkgRound1, DkgCommit) {
    let mut msg = DkgCommit {
        session: cfg.session,
        dealer: me,
        hash: cfg.commitment_hash(me, &commitments),
        sig: [0; SIGNATURE_LEN],
    };
    msg.sign(id);
    (
        DkgRound1 {
            cfg,
            me,
            poly,
            commitments,
            pok,
        },
        msg,
    )
}

/// Round 1 of a reshare for dealer `me` (§4.3): deals `λ_me·x_me`, with `λ` the
/// Lagrange weight at zero over the dealer set, by a polynomial of the new degree, and
/// sends only the commitment hash. `share` is `me`'s active share of the prior epoch.
///
/// Errors: the run is not a reshare, `me` is not a dealer, or `share` is not `me`'s
/// share of exactly the prior key data.
pub fn round1_reshare(
    rng: &mut (impl CryptoRng + ?Sized),
    cfg: DkgConfig,
    me: PartyIndex,
    id: &IdentityKey,
    share: &KeyShare,
) -> Result<(DkgRound1, DkgCommit)> {
    cfg.check()?;
    cfg.roster.get(me)?;
    let DkgMode::Reshare { prior, dealers, .. } = &cfg.mode else {
        return Err(Error::input("round1_reshare: this run is not a reshare"));
    };
    if !dealers.contains(me) {
        return Err(Error::input(format!(
            "reshare: party {me} is not one of the dealers; it joins as a recipient"
        )));
    }
    if &share.public != prior || share.index != me {
        return Err(Error::input(
            "reshare: this node's share is not its share of the key being reshared (another key or epoch)",
        ));
    }
    let weighted = SecretScalar::new(*share.secret.expose() * dealers.lagrange(me)?);
    let poly = Polynomial::random(rng, &weighted, cfg.params.t());
    let commitments = poly.commit().to_points(false)?;
    Ok(commit_to(cfg, me, id, poly, commitments, None))
}

/// A reshare recipient that deals nothing (a node that lost its disk, a new node):
/// it skips rounds 1 and 2 and receives in [`round3`] after [`join_commits`].
pub struct DkgJoin {
    cfg: DkgConfig,
    me: PartyIndex,
}

/// Starts a reshare as a recipient only. Errors if the run is not a reshare, or `me`
/// is a dealer or not a party of the new parameters.
pub fn join(cfg: DkgConfig, me: PartyIndex) -> Result<DkgJoin> {
    cfg.check()?;
    cfg.roster.get(me)?;
    if !cfg.is_reshare() {
        return Err(Error::input(
            "only a reshare can be joined without dealing; a DKG or refresh needs every node to deal",
        ));
    }
    if cfg.is_dealer(me) {
        return Err(Error::input(format!(
            "party {me} is a dealer of this reshare: it starts with round1_reshare"
        )));
    }
    cfg.params.check_members(&PartySet::new(vec![me])?)?;
    Ok(DkgJoin { cfg, me })
}

/// Takes the dealers' round-1 commitment hashes for a joining recipient (checking their
/// signatures, as a dealer does in [`round2`]).
pub fn join_commits(state: DkgJoin, commits: &[DkgCommit]) -> Result<DkgRound2> {
    let DkgJoin { cfg, me } = state;
    let commits = checked_commits(&cfg, commits)?;
    Ok(DkgRound2 { cfg, me, commits })
}

fn checked_commits(cfg: &DkgConfig, commits: &[DkgCommit]) -> Result<Vec<DkgCommit>> {
    let ordered = one_from_each(commits, &cfg.dealers(), |m| m.dealer)?;
    for m in &ordered {
        check_session(m.session, cfg)?;
        cfg.roster
            .verify_from(m.dealer, DkgCommit::PURPOSE, &m.unsigned_bytes(), &m.sig)?;
    }
    Ok(ordered.into_iter().cloned().collect())
}

fn check_session(session: SessionId, cfg: &DkgConfig) -> Result<()> {
    if session == cfg.session {
        Ok(())
    } else {
        Err(Error::input("message belongs to another session"))
    }
}

/// Round 2 (§4.3 step 2): once every commitment hash is in, reveal the commitments and
/// seal each node's share to it.
pub fn round2(
    rng: &mut (impl CryptoRng + ?Sized),
    state: DkgRound1,
    commits: &[DkgCommit],
    id: &IdentityKey,
) -> Result<(DkgRound2, DkgReveal)> {
    let DkgRound1 {
        cfg,
        me,
        poly,
        commitments,
        pok,
    } = state;
    let all = cfg.params.all_parties();
    let commits = checked_commits(&cfg, commits)?;
    let mut seals = Vec::with_capacity(all.len());
    for &j in all.members() {
        let share = poly.eval(j);
        let sealed = cfg.roster.seal_to(
            rng,
            cfg.session,
            SEAL_ROUND,
            me,
            j,
            &share.secret_bytes()[..],
        )?;
        seals.push((j, sealed));
    }
    let mut msg = DkgReveal {
        session: cfg.session,
        dealer: me,
        commitments,
        pok,
        seals,
        sig: [0; SIGNATURE_LEN],
    };
    msg.sign(id);
    Ok((DkgRound2 { cfg, me, commits }, msg))
}

/// Opens the seal addressed to `me` in `msg` and decodes the share; failures blame the
/// dealer (its signature covers the seal, so the relay cannot have altered it).
pub(crate) fn open_share(
    kem: &KemSecretKey,
    session: SessionId,
    round: u8,
    dealer: PartyIndex,
    me: PartyIndex,
    seals: &[(PartyIndex, Sealed)],
    count: usize,
) -> Result<Vec<SecretScalar>> {
    let sealed = seals
        .iter()
        .find(|(r, _)| *r == me)
        .map(|(_, s)| s)
        .ok_or_else(|| Error::blame_one(dealer, Fault::BadSeal))?;
    let ctx = SealContext {
        session,
        round,
        dealer,
        recipient: me,
    };
    let plain =
        seal::open(kem, &ctx, sealed).map_err(|_| Error::blame_one(dealer, Fault::BadSeal))?;
    if plain.len() != 32 * count {
        return Err(Error::blame_one(dealer, Fault::BadSeal));
    }
    plain
        .chunks_exact(32)
        .map(|c| {
            SecretScalar::from_secret_bytes(c).map_err(|_| Error::blame_one(dealer, Fault::BadSeal))
        })
        .collect()
}

/// Round 3 (§4.3 step 3): verify every dealing, combine the share, confirm the key.
///
/// For a refresh, `prior` must be this node's current share of the key; it is consumed
/// and the returned share replaces it once the coordinator commits.
pub fn round3(
    rng: &mut (impl CryptoRng + ?Sized),
    state: DkgRound2,
    reveals: &[DkgReveal],
    kem: &KemSecretKey,
    id: &IdentityKey,
    prior: Option<KeyShare>,
) -> Result<(KeyShare, DkgConfirm)> {
    let DkgRound2 { cfg, me, commits } = state;
    let all = cfg.params.all_parties();
    let ordered = one_from_each(reveals, &cfg.dealers(), |m| m.dealer)?;
    let expected_len = cfg.params.commitment_len();
    let mut batch = BatchVerifier::new();
    let mut dealt = Vec::with_capacity(ordered.len());
    let mut x = Scalar::ZERO;
    for (m, c) in ordered.iter().zip(&commits) {
        let d = m.dealer;
        check_session(m.session, &cfg)?;
        cfg.roster
            .verify_from(d, DkgReveal::PURPOSE, &m.unsigned_bytes(), &m.sig)?;
        // Commitment length first: a longer vector would raise the threshold.
        let com = if cfg.is_refresh() {
            Commitments::zero_constant(&m.commitments, expected_len, d)?
        } else {
            Commitments::received(&m.commitments, expected_len, d)?
        };
        if cfg.commitment_hash(d, &m.commitments) != c.hash {
            return Err(Error::blame_one(d, Fault::CommitmentMismatch));
        }
        if let DkgMode::Reshare { prior, dealers, .. } = &cfg.mode {
            // The dealing must be of λ_d·x_d: then the dealt constants sum to X.
            let expected = prior.public_share(d) * dealers.lagrange(d)?;
            if com.constant() != expected {
                return Err(Error::blame_one(d, Fault::WrongReshareConstant));
            }
        }
        match (&m.pok, cfg.is_refresh() || cfg.is_reshare()) {
            (Some(pok), false) => {
                let x0 = m
                    .commitments
                    .first()
                    .ok_or(Error::Bug("empty commitments"))?;
                pok.verify_into(
                    &cfg.pok_context(d, x0),
                    &Form::point(x0),
                    &mut batch,
                    d,
                    Fault::BadProofOfKnowledge,
                );
            }
            (None, true) => {}
            _ => return Err(Error::blame_one(d, Fault::BadProofOfKnowledge)),
        }
        let share = open_share(kem, cfg.session, SEAL_ROUND, d, me, &m.seals, 1)?;
        let s = share.first().ok_or(Error::Bug("share count"))?;
        com.verify_share_into(me, s.expose(), &mut batch, d, Fault::BadShare);
        x += s.expose();
        dealt.push(com);
    }
    batch.verify(rng)?;

    let sum = Commitments::sum(&dealt)?;
    let (public, secret) = match (&cfg.mode, prior) {
        (DkgMode::NewKey { purpose }, None) => (
            KeyPublic::new(cfg.key_id, cfg.params, *purpose, 0, sum)
                .map_err(|_| Error::blame(all.members().to_vec(), Fault::Degenerate))?,
            SecretScalar::new(x),
        ),
        (DkgMode::Refresh { prior: prior_pub }, Some(old)) => {
            if &old.public != prior_pub || old.index != me {
                return Err(Error::input(
                    "refresh: this node's stored share is not the share being refreshed",
                ));
            }
            let public = KeyPublic::new(
                cfg.key_id,
                cfg.params,
                prior_pub.purpose,
                prior_pub.epoch + 1,
                prior_pub.commitments.add(&sum)?,
            )?;
            (public, SecretScalar::new(x + old.secret.expose()))
        }
        (
            DkgMode::Reshare {
                prior: prior_pub, ..
            },
            None,
        ) => {
            if sum.constant() != prior_pub.public_key().projective() {
                return Err(Error::blame(
                    cfg.dealers().members().to_vec(),
                    Fault::Inconsistent,
                ));
            }
            let public = KeyPublic::new(
                cfg.key_id,
                cfg.params,
                prior_pub.purpose,
                prior_pub.epoch + 1,
                sum,
            )?;
            (public, SecretScalar::new(x))
        }
        (DkgMode::Reshare { .. }, Some(_)) => {
            return Err(Error::input(
                "a reshare replaces the share: round 3 takes no prior share",
            ));
        }
        (DkgMode::NewKey { .. }, Some(_)) => {
            return Err(Error::input("new-key DKG takes no prior share"));
        }
        (DkgMode::Refresh { .. }, None) => {
            return Err(Error::input("refresh needs this node's current share"));
        }
    };
    let share = KeyShare {
        public,
        index: me,
        secret,
    };
    // Every dealing verified, so this holds; checking it costs one multiplication and
    // guards the invariant the rest of the system relies on.
    share
        .validate()
        .map_err(|_| Error::Bug("combined share fails its public check"))?;
    let mut confirm = DkgConfirm {
        session: cfg.session,
        party: me,
        commitments: share.public.commitments.to_points(false)?,
        sig: [0; SIGNATURE_LEN],
    };
    confirm.sign(id);
    Ok((share, confirm))
}

/// The coordinator's last step (§4.3 step 4): every node must confirm the same key. On
/// success the returned public data is what the coordinator stores and nodes activate.
pub fn finalize(cfg: &DkgConfig, confirms: &[DkgConfirm]) -> Result<KeyPublic> {
    cfg.check()?;
    let all = cfg.params.all_parties();
    let ordered = one_from_each(confirms, &all, |m| m.party)?;
    for m in &ordered {
        check_session(m.session, cfg)?;
        cfg.roster
            .verify_from(m.party, DkgConfirm::PURPOSE, &m.unsigned_bytes(), &m.sig)?;
    }
    // Majority view; everyone who disagrees with it is blamed.
    let views: Vec<&Vec<Point>> = ordered.iter().map(|m| &m.commitments).collect();
    let majority = views
        .iter()
        .max_by_key(|v| views.iter().filter(|w| w == v).count())
        .ok_or(Error::Bug("no confirmations"))?;
    let dissent: Vec<PartyIndex> = ordered
        .iter()
        .filter(|m| &&m.commitments != majority)
        .map(|m| m.party)
        .collect();
    if !dissent.is_empty() {
        return Err(Error::blame(dissent, Fault::Inconsistent));
    }
    let com = Commitments::received(majority, cfg.params.commitment_len(), all_first(&all)?)?;
    let (purpose, epoch) = match &cfg.mode {
        DkgMode::NewKey { purpose } => (*purpose, 0),
        DkgMode::Refresh { prior } | DkgMode::Reshare { prior, .. } => {
            if prior.public_key().projective() != com.constant() {
                return Err(Error::blame(all.members().to_vec(), Fault::Inconsistent));
            }
            (prior.purpose, prior.epoch + 1)
        }
    };
    KeyPublic::new(cfg.key_id, cfg.params, purpose, epoch, com)
}

fn all_first(all: &PartySet) -> Result<PartyIndex> {
    all.members()
        .first()
        .copied()
        .ok_or(Error::Bug("empty party set"))
}

// ---- wire encodings ----

impl Wire for DkgCommit {
    const TAG: u8 = 0x21;
    const NAME: &'static str = "DkgCommit";
    fn encode_body(&self, w: &mut Writer) {
        w.fixed(&self.session.0);
        w.party(self.dealer);
        w.fixed(&self.hash);
        w.fixed(&self.sig);
    }
    fn decode_body(r: &mut Reader<'_>) -> Result<Self> {
        Ok(DkgCommit {
            session: SessionId(r.array()?),
            dealer: r.party()?,
            hash: r.array()?,
            sig: r.array()?,
        })
    }
}

impl Wire for DkgReveal {
    const TAG: u8 = 0x22;
    const NAME: &'static str = "DkgReveal";
    fn encode_body(&self, w: &mut Writer) {
        w.fixed(&self.session.0);
        w.party(self.dealer);
        w.list(&self.commitments, |w, p| w.point(p));
        match &self.pok {
            Some(p) => {
                w.u8(1);
                p.encode(w);
            }
            None => w.u8(0),
        }
        w.list(&self.seals, |w, (j, s)| {
            w.party(*j);
            s.encode(w);
        });
        w.fixed(&self.sig);
    }
    fn decode_body(r: &mut Reader<'_>) -> Result<Self> {
        let session = SessionId(r.array()?);
        let dealer = r.party()?;
        let commitments = r.list(33, |r| r.point())?;
        let pok = match r.u8()? {
            0 => None,
            1 => Some(SchnorrProof::decode(r)?),
            v => return Err(Error::input(format!("DkgReveal: bad proof flag {v}"))),
        };
        let seals = r.list(2 + seal::MLKEM_CT_LEN, |r| {
            Ok((r.party()?, Sealed::decode(r)?))
        })?;
        Ok(DkgReveal {
            session,
            dealer,
            commitments,
            pok,
            seals,
            sig: r.array()?,
        })
    }
}

impl Wire for DkgConfirm {
    const TAG: u8 = 0x23;
    const NAME: &'static str = "DkgConfirm";
    fn encode_body(&self, w: &mut Writer) {
        w.fixed(&self.session.0);
        w.party(self.party);
        w.list(&self.commitments, |w, p| w.point(p));
        w.fixed(&self.sig);
    }
    fn decode_body(r: &mut Reader<'_>) -> Result<Self> {
        Ok(DkgConfirm {
            session: SessionId(r.array()?),
            party: r.party()?,
            commitments: r.list(33, |r| r.point())?,
            sig: r.array()?,
        })
    }
}
