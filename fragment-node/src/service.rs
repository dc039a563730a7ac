//! The fragment-node gRPC service (STYLE.md §5): each handler converts the request to
//! domain types (`InvalidArgument` on failure), runs the protocol step from
//! `quorate-crypto` on a blocking thread, persists what must be durable *before* it
//! replies, and encodes the reply.
//!
//! Only the coordinator may call (enforced by the TLS server config and checked again
//! here from the peer certificate). Round state lives in memory per session; a node that
//! restarts mid-protocol simply fails that session, and the coordinator starts a new one.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use quorate_authz::credential::CredentialContext;
use quorate_crypto::dkg::{self, DkgConfig, DkgMode};
use quorate_crypto::identity::IdentityKey;
use quorate_crypto::keys::{KeyId, KeyPublic, KeyShare};
use quorate_crypto::params::{PartyIndex, PartySet, SessionId, ThresholdParams};
use quorate_crypto::presign::{self, PresignConfig};
use quorate_crypto::seal::KemSecretKey;
use quorate_crypto::sign::{self, SignRequest};
use quorate_crypto::tdh::{self, DhRequest};
use quorate_crypto::wire::Wire;
use quorate_proto::convert;
use quorate_proto::fragment::{self, fragment_node_server::FragmentNode};
use quorate_proto::profile::KeyProfile;
use quorate_proto::rules::{REFUSAL_PREFIX, TokenRules};
use quorate_proto::tls::{Role, Trust};
use rand::TryRng as _;
use rustls::pki_types::CertificateDer;
use tonic::{Request, Response, Status};

use crate::ceiling::Ceiling;
use crate::evidence::{EvidenceCheck, TokenKeys};
use crate::policy::NodePolicy;
use crate::presigs::{PresigBook, ReleaseLog};
use crate::rules;
use crate::store::{Release, Store, StoreError, request_rng};

/// How long an unfinished protocol session is kept.
const SESSION_TTL: Duration = Duration::from_secs(300);

enum Round {
    Dkg1(dkg::DkgRound1, Option<KeyProfile>),
    /// A reshare recipient that deals nothing, with the profile it will record.
    DkgJoin(dkg::DkgJoin, KeyProfile),
    Dkg2(dkg::DkgRound2, Option<KeyProfile>),
    /// Each presign round carries the coordinator instance the batch is for.
    Presign1(presign::PresignRound1, Arc<str>),
    Presign2(presign::PresignRound2, Arc<str>),
    Presign3(presign::PresignRound3, KeyShare, Arc<str>),
    /// With the epoch of the key share it used.
    Presign4(presign::PresignRound4, u32, Arc<str>),
}

struct Session {
    round: Round,
    since: Instant,
}

/// Crash-test hook: where to stop the process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailPoint {
    /// Exit right after the sign batch's presignatures are marked consumed (in memory),
    /// before replying.
    SignAfterCommit,
    /// Testing only: on a graceful stop, write the secrets of the unused presignature
    /// shares to `<data-dir>/presignatures.dump`.
    DumpPresignatures,
}

/// The node's counters (Prometheus).
#[derive(Debug, Default)]
pub struct NodeMetrics {
    /// Sign RPCs (batches) served.
    pub sign_batches: quorate_proto::metrics::Counter,
    /// Signature shares released for the first time.
    pub sign_shares_released: quorate_proto::metrics::Counter,
    /// Idempotent repeats of an earlier share.
    pub sign_shares_repeated: quorate_proto::metrics::Counter,
    /// Sign requests refused (consumed presignature, wrong set, unknown ids, token
    /// rules).
    pub sign_refusals: quorate_proto::metrics::Counter,
    /// Threshold-DH partials released.
    pub dh_partials_released: quorate_proto::metrics::Counter,
    /// Presignature shares stored.
    pub presignatures_stored: quorate_proto::metrics::Counter,
    /// Key shares activated (DKG or refresh).
    pub keys_activated: quorate_proto::metrics::Counter,
}

impl NodeMetrics {
    /// Prometheus text exposition.
    pub fn render(&self, node: u16) -> String {
        let n = node.to_string();
        let l = [("node", n.as_str())];
        let mut e = quorate_proto::metrics::Exposition::default();
        for (name, help, c) in [
            (
                "quorate_node_sign_batches_total",
                "Sign RPCs served.",
                &self.sign_batches,
            ),
            (
                "quorate_node_sign_shares_released_total",
                "Signature shares released for the first time.",
                &self.sign_shares_released,
            ),
            (
                "quorate_node_sign_shares_repeated_total",
                "Idempotent repeats of an earlier signature share.",
                &self.sign_shares_repeated,
            ),
            (
                "quorate_node_sign_refusals_total",
                "Sign requests refused.",
                &self.sign_refusals,
            ),
            (
                "quorate_node_dh_partials_released_total",
                "Threshold-DH partials released.",
                &self.dh_partials_released,
            ),
            (
                "quorate_node_presignatures_stored_total",
                "Presignature shares made and held in memory.",
                &self.presignatures_stored,
            ),
            (
                "quorate_node_keys_activated_total",
                "Key shares activated by DKG or refresh.",
                &self.keys_activated,
            ),
        ] {
            e.family(name, "counter", help).sample(name, &l, c.get());
        }
        e.finish()
    }
}

/// The node's state, shared by all handlers.
pub struct Node {
    index: PartyIndex,
    domain: String,
    identity: IdentityKey,
    kem: KemSecretKey,
    cert_chain: Vec<CertificateDer<'static>>,
    trust: Trust,
    store: Arc<Store>,
    /// The presignatures this process holds (memory only, DESIGN.md §4.5).
    presigs: PresigBook,
    /// Active key shares already opened from the store (each sign and DH needs one;
    /// opening unseals and decodes it, point decompressions included).
    key_cache: Mutex<HashMap<quorate_crypto::keys::KeyId, Arc<KeyShare>>>,
    /// The log of released shares, written in the background.
    releases: ReleaseLog,
    /// Random per process start (see `InventoryReply.instance`).
    instance: [u8; 16],
    /// What token keys may be on this node (`--ceiling`); `None`: no token keys at all.
    ceiling: Option<Ceiling>,
    /// The node's own attestation verifier, when its ceiling names a trust config.
    evidence: Option<EvidenceCheck>,
    /// The operator-signed policy the node decides under, when its ceiling names the
    /// operator's key.
    policy: Option<Arc<NodePolicy>>,
    sessions: Mutex<HashMap<SessionId, Session>>,
    failpoint: Option<FailPoint>,
    metrics: Arc<NodeMetrics>,
}

fn store_err(e: StoreError) -> Status {
    tracing::error!(error = %e, "store failure");
    Status::internal(e.to_string())
}

fn crypto_err(e: quorate_crypto::Error) -> Status {
    use quorate_crypto::Error;
    match &e {
        Error::InvalidInput(_) => Status::invalid_argument(e.to_string()),
        Error::Refused(_) => Status::failed_precondition(e.to_string()),
        Error::PeerMisbehaved { .. } | Error::Unauthentic { .. } => Status::aborted(e.to_string()),
        _ => Status::internal(e.to_string()),
    }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Node {
    /// A node over its store, with its TLS identity as protocol identity.
    pub fn new(
        index: PartyIndex,
        domain: String,
        identity: IdentityKey,
        cert_chain: Vec<CertificateDer<'static>>,
        trust: Trust,
        store: Store,
        failpoint: Option<FailPoint>,
    ) -> Result<Self, StoreError> {
        let kem = store.kem_key()?;
        let store = Arc::new(store);
        Store::start_recovery(&store).map_err(|e| {
            StoreError::Db(format!("cannot start the store's recovery thread: {e}"))
        })?;
        Ok(Node {
            presigs: PresigBook::default(),
            key_cache: Mutex::new(HashMap::new()),
            releases: ReleaseLog::start(Arc::clone(&store)),
            instance: {
                let mut b = [0u8; 16];
                rand::rngs::SysRng
                    .try_fill_bytes(&mut b)
                    .map_err(|e| StoreError::Db(format!("system RNG failed: {e}")))?;
                b
            },
            index,
            domain,
            identity,
            kem,
            cert_chain,
            trust,
            store,
            ceiling: None,
            evidence: None,
            policy: None,
            sessions: Mutex::new(HashMap::new()),
            failpoint,
            metrics: Arc::new(NodeMetrics::default()),
        })
    }

    /// Sets the node's ceiling for token keys (`--ceiling`); without one the node takes
    /// part in no token key.
    #[must_use]
    pub fn with_ceiling(mut self, ceiling: Option<Ceiling>) -> Self {
        self.ceiling = ceiling;
        self
    }

    /// Sets the node's evidence check (DESIGN.md §9): every token of a token key must
    /// then rest on evidence this node verifies itself ([`crate::evidence`]).
    #[must_use]
    pub fn with_evidence(mut self, evidence: Option<EvidenceCheck>) -> Self {
        self.evidence = evidence;
        self
    }

    /// Sets the operator-signed policy the node decides tokens and credentials under
    /// ([`crate::policy`]); it needs the evidence check too.
    #[must_use]
    pub fn with_policy(mut self, policy: Option<NodePolicy>) -> Self {
        self.policy = policy.map(Arc::new);
        self
    }

    /// This node's index.
    pub fn index(&self) -> PartyIndex {
        self.index
    }

    /// The node's counters.
    pub fn metrics(&self) -> Arc<NodeMetrics> {
        self.metrics.clone()
    }

    fn put(&self, sid: SessionId, round: Round) -> Result<(), Status> {
        let mut s = self
            .sessions
            .lock()
            .map_err(|_| Status::internal("session table poisoned"))?;
        s.retain(|_, v| v.since.elapsed() < SESSION_TTL);
        s.insert(
            sid,
            Session {
                round,
                since: Instant::now(),
            },
        );
        Ok(())
    }

    fn take(&self, sid: &SessionId) -> Result<Round, Status> {
        self.sessions
            .lock()
            .map_err(|_| Status::internal("session table poisoned"))?
            .remove(sid)
            .map(|s| s.round)
            .ok_or_else(|| {
                Status::failed_precondition(
                    "unknown or expired session (rounds must follow in order; start a new session)",
                )
            })
    }

    fn wrong_round() -> Status {
        Status::failed_precondition("message is for a different round of this session")
    }

    fn decode_all<T: Wire>(msgs: &[Vec<u8>]) -> Result<Vec<T>, Status> {
        msgs.iter()
            .map(|m| T::from_bytes(m).map_err(crypto_err))
            .collect()
    }

    fn info(&self) -> fragment::NodeInfo {
        convert::node_info(
            self.index,
            &self.cert_chain,
            &self.kem.public(),
            &self.identity,
        )
    }

    fn dkg_commit(&self, req: fragment::DkgStart) -> Result<Vec<u8>, Status> {
        let session = convert::session_id(&req.session_id)?;
        let key_id = convert::key_id(&req.key_id)?;
        let params = convert::dkg_params(&req)?;
        if !params.holds(self.index) {
            return Err(Status::invalid_argument(format!(
                "node {} is not one of the holders {} of this run",
                self.index,
                params.all_parties()
            )));
        }
        let roster =
            convert::verify_roster(req.roster.as_ref(), &self.trust, &params.all_parties())?;
        if !req.reshare_dealers.is_empty() {
            return self.reshare_start(&req, session, key_id, params, roster);
        }
        let mode = if req.refresh_prior.is_empty() {
            let purpose = convert::purpose(req.purpose)?;
            // A new key needs an id this node has never used: activating it would
            // replace the share (and escape the rules) of an existing key.
            if self.store.key(&key_id).map_err(store_err)?.is_some() {
                return Err(Status::failed_precondition(format!(
                    "key id {key_id} is already in use on this node; a new key needs a fresh id"
                )));
            }
            let profile = KeyProfile::from_fragment(req.profile, req.token_rules.as_ref())?;
            if profile.purpose() != purpose {
                return Err(Status::invalid_argument(format!(
                    "a {} key has purpose {}, not {}",
                    profile.name(),
                    profile.purpose().name(),
                    purpose.name()
                )));
            }
            if let Some(rules) = profile.token_rules() {
                let ceiling = self.ceiling.as_ref().ok_or_else(|| {
                    Status::permission_denied(format!(
                        "node {}: this node has no token ceiling (--ceiling FILE), so it takes part in no token key",
                        self.index
                    ))
                })?;
                ceiling.admits(rules).map_err(|why| {
                    Status::permission_denied(format!(
                        "node {}: token key refused: {why}",
                        self.index
                    ))
                })?;
            }
            // First writer wins: a later DKG cannot replace a key's profile.
            if !self
                .store
                .put_profile_once(&key_id, &profile)
                .map_err(store_err)?
            {
                return Err(Status::failed_precondition(format!(
                    "key id {key_id} already has a profile; profiles are fixed when a key is created"
                )));
            }
            tracing::info!(key = %key_id, profile = %profile, "key profile recorded");
            DkgMode::NewKey { purpose }
        } else {
            // Refresh: the rules recorded at creation stay; any in the request are ignored.
            let prior = KeyPublic::from_bytes(&req.refresh_prior).map_err(crypto_err)?;
            let mine = self.store.key(&key_id).map_err(store_err)?.ok_or_else(|| {
                Status::failed_precondition("this node holds no share of the key to refresh")
            })?;
            if mine.public != prior {
                return Err(Status::failed_precondition(
                    "refresh: this node's share is of another epoch than the coordinator's key data",
                ));
            }
            DkgMode::Refresh { prior }
        };
        let cfg = DkgConfig {
            session,
            key_id,
            params,
            mode,
            roster,
        };
        let mut rng = request_rng().map_err(store_err)?;
        let (state, msg) =
            dkg::round1(&mut rng, cfg, self.index, &self.identity).map_err(crypto_err)?;
        self.put(session, Round::Dkg1(state, None))?;
        Ok(msg.to_bytes())
    }

    /// The configuration of the reshare `req` starts, as every party rebuilds it: the
    /// prior key data, dealers and profile the coordinator names, the profile checked
    /// against the one this node recorded for the key (if any). Returns the
    /// configuration, the profile and the recorded profile.
    fn reshare_config(
        &self,
        req: &fragment::DkgStart,
        session: SessionId,
        key_id: KeyId,
        params: ThresholdParams,
        roster: quorate_crypto::identity::Roster,
    ) -> Result<(DkgConfig, KeyProfile, Option<KeyProfile>), Status> {
        let prior = KeyPublic::from_bytes(&req.refresh_prior).map_err(crypto_err)?;
        if prior.key_id != key_id {
            return Err(Status::invalid_argument(
                "reshare: the prior key data is of another key",
            ));
        }
        let dealers = req
            .reshare_dealers
            .iter()
            .map(|&d| u16::try_from(d).unwrap_or(u16::MAX))
            .collect::<Vec<_>>();
        let dealers = PartySet::from_indices(&dealers).map_err(crypto_err)?;
        let profile = KeyProfile::from_fragment(req.profile, req.token_rules.as_ref())?;
        if profile.purpose() != prior.purpose {
            return Err(Status::invalid_argument(format!(
                "reshare: a {} profile does not fit a {} key",
                profile.name(),
                prior.purpose.name()
            )));
        }
        let recorded = self.store.profile(&key_id).map_err(store_err)?;
        if let Some(recorded) = &recorded
            && recorded != &profile
        {
            return Err(Status::failed_precondition(format!(
                "reshare: the coordinator gives key {key_id} the profile {profile}, but this node recorded {recorded}; a profile never changes by resharing"
            )));
        }
        let binding = quorate_crypto::hash::sha256(&profile.to_bytes());
        let cfg = DkgConfig {
            session,
            key_id,
            params,
            mode: DkgMode::Reshare {
                prior,
                dealers,
                binding,
            },
            roster,
        };
        Ok((cfg, profile, recorded))
    }

    /// Deletes this node's share of a key that a reshare moved elsewhere, once every
    /// new holder's confirmation of that reshare verifies (see `RetireKey` in
    /// fragment.proto). Idempotent: a node holding no share answers `false`.
    fn retire_key(&self, req: fragment::RetireKeyRequest) -> Result<bool, Status> {
        let start = req
            .start
            .ok_or_else(|| Status::invalid_argument("retire: the reshare's DkgStart is missing"))?;
        let session = convert::session_id(&start.session_id)?;
        let key_id = convert::key_id(&start.key_id)?;
        let params = convert::dkg_params(&start)?;
        if start.reshare_dealers.is_empty() {
            return Err(Status::invalid_argument(
                "retire: the DkgStart given is not a reshare's",
            ));
        }
        if params.holds(self.index) {
            return Err(Status::failed_precondition(format!(
                "retire: node {} is one of the new holders {} of key {key_id}; it keeps its share",
                self.index,
                params.all_parties()
            )));
        }
        let Some(mine) = self.store.key(&key_id).map_err(store_err)? else {
            return Ok(false);
        };
        let roster =
            convert::verify_roster(start.roster.as_ref(), &self.trust, &params.all_parties())?;
        let (cfg, _, _) = self.reshare_config(&start, session, key_id, params, roster)?;
        let DkgMode::Reshare { prior, .. } = &cfg.mode else {
            return Err(Status::internal("reshare configuration is not a reshare"));
        };
        // The reshare may start from a later epoch than this node's share (it missed a
        // refresh); it may not start from an earlier one, or from another key.
        if prior.public_key() != mine.public.public_key() || prior.epoch < mine.public.epoch {
            return Err(Status::failed_precondition(format!(
                "retire: this node holds epoch {} of key {key_id}, which the reshare (from epoch {}) does not succeed",
                mine.public.epoch, prior.epoch
            )));
        }
        let confirms: Vec<dkg::DkgConfirm> = Self::decode_all(&req.confirms)?;
        let moved = dkg::finalize(&cfg, &confirms).map_err(|e| {
            Status::failed_precondition(format!(
                "retire: the new holders' confirmations do not verify, so the share stays: {e}"
            ))
        })?;
        let held = self.store.retire_key(&key_id).map_err(store_err)?;
        self.key_cache
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(&key_id);
        let burned = self.presigs.burn_older(&key_id, u32::MAX);
        tracing::info!(key = %key_id, epoch = mine.public.epoch, holders = %moved.params.all_parties(), new_epoch = moved.epoch, burned, "key share destroyed: the key moved to other nodes");
        Ok(held)
    }

    /// Round 1 of a reshare (DESIGN.md §4.3): a dealer checks that the coordinator's
    /// prior key data and profile are its own and deals; any other party of the new
    /// parameters joins as a recipient and answers with an empty message.
    fn reshare_start(
        &self,
        req: &fragment::DkgStart,
        session: SessionId,
        key_id: KeyId,
        params: ThresholdParams,
        roster: quorate_crypto::identity::Roster,
    ) -> Result<Vec<u8>, Status> {
        let (cfg, profile, recorded) = self.reshare_config(req, session, key_id, params, roster)?;
        let DkgMode::Reshare { prior, .. } = &cfg.mode else {
            return Err(Status::internal("reshare configuration is not a reshare"));
        };
        let prior = prior.clone();
        if cfg.is_dealer(self.index) {
            let mine = self.store.key(&key_id).map_err(store_err)?.ok_or_else(|| {
                Status::failed_precondition(format!(
                    "reshare: node {} is named as a dealer but holds no share of key {key_id}",
                    self.index
                ))
            })?;
            if mine.public != prior || recorded.is_none() {
                return Err(Status::failed_precondition(format!(
                    "reshare: node {}'s share of key {key_id} is of epoch {}, not the coordinator's epoch {}",
                    self.index, mine.public.epoch, prior.epoch
                )));
            }
            let mut rng = request_rng().map_err(store_err)?;
            let (state, msg) =
                dkg::round1_reshare(&mut rng, cfg, self.index, &self.identity, &mine)
                    .map_err(crypto_err)?;
            self.put(session, Round::Dkg1(state, None))?;
            return Ok(msg.to_bytes());
        }
        if recorded.is_none()
            && let Some(rules) = profile.token_rules()
        {
            let ceiling = self.ceiling.as_ref().ok_or_else(|| {
                Status::permission_denied(format!(
                    "node {}: this node has no token ceiling (--ceiling FILE), so it takes part in no token key",
                    self.index
                ))
            })?;
            ceiling.admits(rules).map_err(|why| {
                Status::permission_denied(format!("node {}: token key refused: {why}", self.index))
            })?;
        }
        let state = dkg::join(cfg, self.index).map_err(crypto_err)?;
        self.put(session, Round::DkgJoin(state, profile))?;
        Ok(Vec::new())
    }

    fn dkg_reveal(&self, req: fragment::RoundInput) -> Result<Vec<u8>, Status> {
        let session = convert::session_id(&req.session_id)?;
        let commits = Self::decode_all(&req.messages)?;
        let (state, profile) = match self.take(&session)? {
            Round::Dkg1(state, profile) => (state, profile),
            Round::DkgJoin(state, profile) => {
                let state = dkg::join_commits(state, &commits).map_err(crypto_err)?;
                self.put(session, Round::Dkg2(state, Some(profile)))?;
                return Ok(Vec::new());
            }
            _ => return Err(Self::wrong_round()),
        };
        let mut rng = request_rng().map_err(store_err)?;
        let (state, msg) =
            dkg::round2(&mut rng, state, &commits, &self.identity).map_err(crypto_err)?;
        self.put(session, Round::Dkg2(state, profile))?;
        Ok(msg.to_bytes())
    }

    fn dkg_confirm(&self, req: fragment::RoundInput) -> Result<Vec<u8>, Status> {
        let session = convert::session_id(&req.session_id)?;
        let Round::Dkg2(state, profile) = self.take(&session)? else {
            return Err(Self::wrong_round());
        };
        let reveals: Vec<dkg::DkgReveal> = Self::decode_all(&req.messages)?;
        // For a refresh, the prior share is the active one of the key being refreshed.
        let key_id = state.key_id();
        let prior = if state.is_refresh() {
            self.store.key(&key_id).map_err(store_err)?
        } else {
            None
        };
        let mut rng = request_rng().map_err(store_err)?;
        let (share, confirm) =
            dkg::round3(&mut rng, state, &reveals, &self.kem, &self.identity, prior)
                .map_err(crypto_err)?;
        // A reshare recipient with no record of the key takes the profile that the
        // dealers' signatures vouched for (it is bound into every message it verified).
        if let Some(profile) = profile
            && !self
                .store
                .put_profile_once(&key_id, &profile)
                .map_err(store_err)?
            && self.store.profile(&key_id).map_err(store_err)?.as_ref() != Some(&profile)
        {
            return Err(Status::failed_precondition(format!(
                "key {key_id} already has another profile on this node"
            )));
        }
        // Durable before the reply: the share is pending until the coordinator commits.
        self.store
            .put_pending(&session, &share)
            .map_err(store_err)?;
        Ok(confirm.to_bytes())
    }

    fn dkg_activate(&self, req: fragment::DkgActivateRequest) -> Result<(), Status> {
        let session = convert::session_id(&req.session_id)?;
        let public = KeyPublic::from_bytes(&req.key_public).map_err(crypto_err)?;
        let active = self.store.key(&public.key_id).map_err(store_err)?;
        let Some(share) = self.store.pending(&session).map_err(store_err)? else {
            // Idempotent: a coordinator that crashed after some nodes activated sends
            // the same request again.
            if active.as_ref().is_some_and(|a| a.public == public) {
                return Ok(());
            }
            return Err(Status::failed_precondition(
                "no pending key share for this session",
            ));
        };
        if share.public != public {
            return Err(Status::failed_precondition(
                "the coordinator's key data differs from this node's pending share: not activating",
            ));
        }
        if let Some(a) = &active
            && a.public.epoch >= public.epoch
        {
            return Err(Status::failed_precondition(format!(
                "key {} is active at epoch {} on this node: activating epoch {} would go back",
                public.key_id, a.public.epoch, public.epoch
            )));
        }
        self.store.activate(&session, &share).map_err(store_err)?;
        self.key_cache
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(&public.key_id);
        let burned = self.presigs.burn_older(&public.key_id, public.epoch);
        self.metrics.keys_activated.inc();
        tracing::info!(key = %public.key_id, epoch = public.epoch, burned, "key share activated");
        Ok(())
    }

    fn presign_commit(&self, req: fragment::PresignStart) -> Result<Vec<u8>, Status> {
        let session = convert::session_id(&req.session_id)?;
        let key_id = convert::key_id(&req.key_id)?;
        let owner: Arc<str> = Arc::from(convert::coordinator_instance(
            &req.coordinator_instance,
            true,
        )?);
        let share = self.store.key(&key_id).map_err(store_err)?.ok_or_else(|| {
            Status::not_found(format!("this node holds no active share of key {key_id}"))
        })?;
        if share.public.epoch != req.key_epoch {
            return Err(Status::failed_precondition(format!(
                "this node holds epoch {} of key {key_id}, the coordinator presigns for epoch {}: a renewal is not yet active everywhere",
                share.public.epoch, req.key_epoch
            )));
        }
        let roster = convert::verify_roster(
            req.roster.as_ref(),
            &self.trust,
            &share.public.params.all_parties(),
        )?;
        let cfg = PresignConfig {
            session,
            key: share.public.clone(),
            mset: convert::party_set(&req.multiplication_set)?,
            sset: convert::party_set(&req.signing_set)?,
            batch: req.batch,
            roster,
        };
        let mut rng = request_rng().map_err(store_err)?;
        let (state, msg) =
            presign::round1(&mut rng, cfg, self.index, &self.identity).map_err(crypto_err)?;
        self.put(session, Round::Presign1(state, owner))?;
        Ok(msg.to_bytes())
    }

    fn presign_deal(&self, req: fragment::RoundInput) -> Result<Vec<u8>, Status> {
        let session = convert::session_id(&req.session_id)?;
        let Round::Presign1(state, owner) = self.take(&session)? else {
            return Err(Self::wrong_round());
        };
        let commits = Self::decode_all(&req.messages)?;
        let mut rng = request_rng().map_err(store_err)?;
        let (state, msg) =
            presign::round2(&mut rng, state, &commits, &self.identity).map_err(crypto_err)?;
        self.put(session, Round::Presign2(state, owner))?;
        Ok(msg.to_bytes())
    }

    fn presign_mu(&self, req: fragment::RoundInput) -> Result<Vec<u8>, Status> {
        let session = convert::session_id(&req.session_id)?;
        let Round::Presign2(state, owner) = self.take(&session)? else {
            return Err(Self::wrong_round());
        };
        let share = self
            .store
            .key(&state.key_id())
            .map_err(store_err)?
            .ok_or_else(|| Status::not_found("key share disappeared during presigning"))?;
        let dealings = Self::decode_all(&req.messages)?;
        let mut rng = request_rng().map_err(store_err)?;
        let (state, msg) = presign::round3(&mut rng, state, &dealings, &self.kem, &self.identity)
            .map_err(crypto_err)?;
        self.put(session, Round::Presign3(state, share, owner))?;
        Ok(msg.to_bytes())
    }

    fn presign_reduce(&self, req: fragment::RoundInput) -> Result<Vec<u8>, Status> {
        let session = convert::session_id(&req.session_id)?;
        let Round::Presign3(state, share, owner) = self.take(&session)? else {
            return Err(Self::wrong_round());
        };
        let mus = Self::decode_all(&req.messages)?;
        let mut rng = request_rng().map_err(store_err)?;
        let (state, msg) =
            presign::round4(&mut rng, state, &mus, &share, &self.identity).map_err(crypto_err)?;
        self.put(session, Round::Presign4(state, share.public.epoch, owner))?;
        Ok(msg.to_bytes())
    }

    fn presign_store(&self, req: fragment::RoundInput) -> Result<u32, Status> {
        let session = convert::session_id(&req.session_id)?;
        let Round::Presign4(state, epoch, owner) = self.take(&session)? else {
            return Err(Self::wrong_round());
        };
        let reductions = Self::decode_all(&req.messages)?;
        let mut rng = request_rng().map_err(store_err)?;
        let shares =
            presign::round5(&mut rng, state, &reductions, &self.kem).map_err(crypto_err)?;
        let n = shares.len();
        // Held in memory only (DESIGN.md §4.5): a restart burns them.
        self.presigs.insert(epoch, &owner, shares);
        self.metrics.presignatures_stored.add(n as u64);
        Ok(u32::try_from(n).unwrap_or(u32::MAX))
    }

    fn sign_batch(&self, req: fragment::SignBatch) -> Result<Vec<fragment::SignResult>, Status> {
        use fragment::sign_result::Result as R;
        if !req.signing_inputs.is_empty() && req.signing_inputs.len() != req.requests.len() {
            return Err(Status::invalid_argument(format!(
                "signing_inputs must be empty or parallel to requests: {} inputs for {} requests",
                req.signing_inputs.len(),
                req.requests.len()
            )));
        }
        if !req.evidence.is_empty() && req.evidence.len() != req.requests.len() {
            return Err(Status::invalid_argument(format!(
                "evidence must be empty or parallel to requests: {} for {} requests",
                req.evidence.len(),
                req.requests.len()
            )));
        }
        let now_unix = i64::try_from(now()).unwrap_or(i64::MAX);
        // The key's profile, rules, ceiling and evidence (DESIGN.md §9) first, outside
        // the lock (an attestation check may fetch a JWKS), and before any presignature
        // is touched: a refused request consumes nothing.
        let checked: Vec<Result<SignRequest, String>> = req
            .requests
            .iter()
            .enumerate()
            .map(|(k, raw)| {
                let r = SignRequest::from_bytes(raw).map_err(|e| e.to_string())?;
                let input = req.signing_inputs.get(k).map_or(&[][..], Vec::as_slice);
                self.check_usage(&r, input, req.evidence.get(k), now_unix)?;
                Ok(r)
            })
            .collect();
        // Each presignature is checked and marked consumed under its own shard lock, in
        // memory, before its share leaves (DESIGN.md §4.5: at most one message per
        // presignature, also under concurrent requests); no lock spans the batch.
        let mut results = Vec::with_capacity(req.requests.len());
        let mut released = 0u64;
        let mut releases = Vec::new();
        let mut fresh_ids = std::collections::HashSet::new();
        for checked in checked {
            let outcome = (|| -> Result<sign::SignStep, String> {
                let r = checked?;
                if !fresh_ids.insert(r.presig_id) {
                    return Err("the batch names this presignature twice".into());
                }
                let share = self
                    .active_key(&r.key_id)
                    .map_err(|e| e.to_string())?
                    .ok_or_else(|| format!("no active share of key {}", r.key_id))?;
                self.presigs.sign(&share.public, &r)
            })();
            match outcome {
                Ok(step) => {
                    if step.fresh {
                        releases.push(Release {
                            at: now(),
                            kind: "sign".into(),
                            key_id: step.record.key_id,
                            presig_id: step.record.id.0,
                            digest: step.record.digest,
                        });
                        released += 1;
                    } else {
                        self.metrics.sign_shares_repeated.inc();
                    }
                    results.push(R::Share(step.share.to_bytes()));
                }
                Err(why) => {
                    self.metrics.sign_refusals.inc();
                    results.push(R::Refused(why));
                }
            }
        }
        // The node's own log of what it signed, written off the reply path.
        self.releases.append(releases);
        self.metrics.sign_batches.inc();
        self.metrics.sign_shares_released.add(released);
        if self.failpoint == Some(FailPoint::SignAfterCommit) && released > 0 {
            tracing::warn!("fail-point sign-after-commit: exiting before the reply");
            std::process::exit(86);
        }
        Ok(results
            .into_iter()
            .map(|r| fragment::SignResult { result: Some(r) })
            .collect())
    }

    /// The key profile of a sign request (DESIGN.md §9): a raw key signs any digest (a
    /// signing input, if given, must hash to it); a token key signs only a JWS that
    /// passes its rules and this node's ceiling ([`rules::check`]); a checkpoint key only
    /// a checkpoint statement ([`rules::check_checkpoint`]); derive and decrypt keys
    /// never sign.
    fn check_usage(
        &self,
        r: &SignRequest,
        input: &[u8],
        evidence: Option<&fragment::TokenEvidence>,
        now_unix: i64,
    ) -> Result<(), String> {
        let refused = |why: String| format!("{REFUSAL_PREFIX}{why}");
        let profile = self
            .store
            .profile(&r.key_id)
            .map_err(|e| e.to_string())?
            .ok_or_else(|| format!("no profile recorded for key {}", r.key_id))?;
        if profile.signs_jws_only() && input.is_empty() {
            return Err(refused(format!(
                "key {} has the {} profile: it signs only JWS statements of its profile, and this request carries no signing input (a raw digest)",
                r.key_id, profile
            )));
        }
        match &profile {
            KeyProfile::Token(rules) => {
                let ceiling = self.ceiling.as_ref().ok_or_else(|| {
                    refused(
                        "this node has no token ceiling (--ceiling FILE), so it signs no tokens"
                            .into(),
                    )
                })?;
                ceiling.admits(rules).map_err(|why| {
                    refused(format!("the key's rules exceed this node's ceiling: {why}"))
                })?;
                let claims = rules::check(rules, input, &r.digest, now_unix).map_err(refused)?;
                let Some(check) = &self.evidence else {
                    return Ok(());
                };
                let verified = check
                    .check(&claims, evidence, self, now_unix)
                    .map_err(refused)?;
                match (&self.policy, evidence) {
                    (Some(policy), Some(ev)) => policy
                        .decide_token(&claims, &verified, ev, now_unix)
                        .map_err(refused),
                    _ => Ok(()),
                }
            }
            KeyProfile::Checkpoint => rules::check_checkpoint(input, &r.digest).map_err(refused),
            KeyProfile::Raw
                if !input.is_empty() && quorate_crypto::hash::sha256(input) != r.digest =>
            {
                Err(
                    "the signing input does not hash (SHA-256) to the digest the request signs"
                        .into(),
                )
            }
            KeyProfile::Raw => Ok(()),
            KeyProfile::Derive | KeyProfile::Decrypt => Err(refused(format!(
                "key {} has the {} profile and signs nothing",
                r.key_id,
                profile.name()
            ))),
        }
    }

    fn narrow_profile(&self, req: fragment::NarrowProfileRequest) -> Result<(), Status> {
        let key_id = convert::key_id(&req.key_id)?;
        let to = KeyProfile::from_fragment(req.profile, None)?;
        match self.store.narrow_profile(&key_id, &to).map_err(store_err)? {
            Ok(before) => {
                if before != to {
                    tracing::info!(key = %key_id, from = before.name(), to = to.name(), "key profile narrowed");
                }
                Ok(())
            }
            Err(why) => Err(Status::failed_precondition(format!(
                "node {}: {why}",
                self.index
            ))),
        }
    }

    fn threshold_dh(&self, req: fragment::DhCall) -> Result<Vec<u8>, Status> {
        let r = DhRequest::from_bytes(&req.request).map_err(crypto_err)?;
        if let tdh::DhInput::Derive { context } = &r.input
            && CredentialContext::claims_to_be(context)
        {
            self.check_credential(context, req.evidence.as_ref())
                .map_err(|why| {
                    Status::permission_denied(format!("node {}: {REFUSAL_PREFIX}{why}", self.index))
                })?;
        }
        let share = self
            .active_key(&r.key_id)
            .map_err(store_err)?
            .ok_or_else(|| Status::not_found(format!("no active share of key {}", r.key_id)))?;
        let mut rng = request_rng().map_err(store_err)?;
        let partial = tdh::partial(&mut rng, &share, &r).map_err(crypto_err)?;
        self.releases.append(vec![Release {
            at: now(),
            kind: "dh".into(),
            key_id: r.key_id,
            presig_id: [0; 32],
            digest: quorate_crypto::hash::sha256(&req.request),
        }]);
        self.metrics.dh_partials_released.inc();
        Ok(partial.to_bytes())
    }

    /// The evidence of a derivation whose context names an agent (DESIGN.md §9), on a
    /// node that checks evidence: the agent's own attestation (then policy decides
    /// again, if the node holds a bundle), or, for a resource client, the agent's access
    /// token of this cluster for the same task.
    fn check_credential(
        &self,
        context: &[u8],
        evidence: Option<&fragment::CredentialEvidence>,
    ) -> Result<(), String> {
        let Some(check) = &self.evidence else {
            return Ok(());
        };
        let ctx = CredentialContext::parse(context)?;
        let ev = evidence.ok_or(
            "evidence: this derivation is for an agent's credential and carries no evidence",
        )?;
        let now_unix = i64::try_from(now()).unwrap_or(i64::MAX);
        if !ev.attestation.trim().is_empty() {
            let agent = check.attestation(&ev.attestation)?;
            if agent.subject != ctx.agent {
                return Err(format!(
                    "evidence: the credential is for {}, but the attestation is {}'s",
                    ctx.agent, agent.subject
                ));
            }
            return match &self.policy {
                Some(policy) => policy.decide_credential(&ctx, &agent, ev, now_unix),
                None => Ok(()),
            };
        }
        if !ev.agent_token.trim().is_empty() {
            let claims =
                crate::evidence::own_token(&ev.agent_token, self, now_unix, "the agent's token")?;
            if claims.get("sub").and_then(serde_json::Value::as_str) != Some(ctx.agent.as_str()) {
                return Err(format!(
                    "evidence: the agent's token is not {}'s",
                    ctx.agent
                ));
            }
            if claims.get("task_id").and_then(serde_json::Value::as_str)
                != Some(ctx.task_id.as_str())
            {
                return Err(format!(
                    "evidence: the agent's token is not for task {}",
                    ctx.task_id
                ));
            }
            return Ok(());
        }
        Err("evidence: an agent's credential needs the agent's attestation, or its access token for the task (a resource client)".into())
    }

    fn install_policy(
        &self,
        req: fragment::PolicyBundle,
    ) -> Result<fragment::PolicyBundleReply, Status> {
        let policy = self.policy.as_ref().ok_or_else(|| {
            Status::failed_precondition(format!(
                "node {}: its ceiling names no operator_public_key_file, so it decides under no policy bundle",
                self.index
            ))
        })?;
        let held = policy
            .install(&req.jws, |jws| {
                self.store.put_policy_bundle(jws).map_err(|e| e.to_string())
            })
            .map_err(|why| Status::permission_denied(format!("node {}: {why}", self.index)))?;
        Ok(fragment::PolicyBundleReply {
            id: held.id().to_owned(),
            seq: held.seq(),
        })
    }

    /// The active share of key `id`, opened once and then kept in memory (dropped from
    /// the cache when the key's share is replaced).
    fn active_key(
        &self,
        id: &quorate_crypto::keys::KeyId,
    ) -> Result<Option<Arc<KeyShare>>, StoreError> {
        let cached = self
            .key_cache
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(id)
            .cloned();
        if let Some(k) = cached {
            return Ok(Some(k));
        }
        let Some(share) = self.store.key(id)? else {
            return Ok(None);
        };
        let share = Arc::new(share);
        self.key_cache
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(*id, Arc::clone(&share));
        Ok(Some(share))
    }

    /// Testing only ([`FailPoint::DumpPresignatures`]): the secret encodings of the
    /// unused presignature shares held.
    pub fn presignature_secrets_for_test(&self) -> Option<Vec<Vec<u8>>> {
        (self.failpoint == Some(FailPoint::DumpPresignatures))
            .then(|| self.presigs.unused_secrets())
    }

    /// Forgets the unused presignatures made for coordinator instance `owner` (and
    /// untagged ones); every presignature when `owner` is empty (a coordinator from
    /// before instance ids). A coordinator that starts afresh holds none of their
    /// public halves, so they could never be used.
    fn discard_presignatures(&self, owner: &str) -> Result<u64, Status> {
        let owner = convert::coordinator_instance(owner, true)?;
        let n = if owner.is_empty() {
            self.presigs.clear()
        } else {
            self.presigs.discard(owner)
        };
        if n > 0 {
            tracing::info!(
                n,
                coordinator = owner,
                "presignatures discarded at the coordinator's request"
            );
        }
        Ok(n)
    }

    /// The node's key holdings, from its store.
    fn holdings(&self) -> Result<Vec<fragment::KeyHolding>, StoreError> {
        self.store
            .keys()?
            .iter()
            .map(|k| {
                let profile = self
                    .store
                    .profile(&k.public.key_id)?
                    .map_or(fragment::KeyProfile::Unspecified, |p| p.to_fragment().0);
                Ok(fragment::KeyHolding {
                    key_id: k.public.key_id.0.to_vec(),
                    epoch: k.public.epoch,
                    active: true,
                    profile: profile as i32,
                })
            })
            .collect()
    }

    fn inventory(&self) -> Result<fragment::InventoryReply, Status> {
        // A store that an I/O failure keeps from reading still answers, with no keys and
        // the fault: the coordinator learns why the node is out of work, and that the
        // process (its instance, its presignatures) lives on.
        let (keys, fault) = match self.holdings() {
            Ok(keys) => (keys, self.store.fault()),
            Err(e @ StoreError::Io(_)) => (
                Vec::new(),
                Some(self.store.fault().unwrap_or_else(|| e.to_string())),
            ),
            Err(e) => return Err(store_err(e)),
        };
        Ok(fragment::InventoryReply {
            keys,
            unused_presignatures: self.presigs.unused(),
            unused_by_coordinator: self.presigs.unused_by_owner().into_iter().collect(),
            instance: self.instance.to_vec(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            store_error: fault.unwrap_or_default(),
        })
    }
}

impl TokenKeys for Node {
    fn token_key(&self, id: &quorate_crypto::keys::KeyId) -> Option<(KeyPublic, TokenRules)> {
        let share = self.active_key(id).ok().flatten()?;
        match self.store.profile(id).ok().flatten()? {
            KeyProfile::Token(rules) => Some((share.public.clone(), rules)),
            _ => None,
        }
    }
}

/// The tonic service around a shared [`Node`].
#[derive(Clone)]
pub struct Service {
    node: Arc<Node>,
}

impl Service {
    /// Wraps the node.
    pub fn new(node: Arc<Node>) -> Self {
        Service { node }
    }

    /// Checks the caller is the coordinator, then runs `f` on a blocking thread.
    async fn run<T, R, F>(&self, req: Request<T>, f: F) -> Result<Response<R>, Status>
    where
        T: Send + 'static,
        R: Send + 'static,
        F: FnOnce(&Node, T) -> Result<R, Status> + Send + 'static,
    {
        let role = quorate_proto::transport::peer_role_of(&req, &self.node.domain)?;
        if role != Role::Coordinator {
            return Err(Status::permission_denied(format!(
                "only the coordinator may call a fragment node; caller is {role}"
            )));
        }
        let node = self.node.clone();
        let inner = req.into_inner();
        tokio::task::spawn_blocking(move || f(&node, inner))
            .await
            .map_err(|_| Status::internal("handler task failed"))?
            .map(Response::new)
    }
}

#[tonic::async_trait]
impl FragmentNode for Service {
    #[tracing::instrument(skip(self, request), fields(node = %self.node.index))]
    async fn info(
        &self,
        request: Request<fragment::InfoRequest>,
    ) -> Result<Response<fragment::NodeInfo>, Status> {
        self.run(request, |n, _| Ok(n.info())).await
    }

    #[tracing::instrument(skip(self, request), fields(node = %self.node.index))]
    async fn dkg_commit(
        &self,
        request: Request<fragment::DkgStart>,
    ) -> Result<Response<fragment::RoundMessage>, Status> {
        self.run(request, |n, r| {
            n.dkg_commit(r)
                .map(|message| fragment::RoundMessage { message })
        })
        .await
    }

    #[tracing::instrument(skip(self, request), fields(node = %self.node.index))]
    async fn dkg_reveal(
        &self,
        request: Request<fragment::RoundInput>,
    ) -> Result<Response<fragment::RoundMessage>, Status> {
        self.run(request, |n, r| {
            n.dkg_reveal(r)
                .map(|message| fragment::RoundMessage { message })
        })
        .await
    }

    #[tracing::instrument(skip(self, request), fields(node = %self.node.index))]
    async fn dkg_confirm(
        &self,
        request: Request<fragment::RoundInput>,
    ) -> Result<Response<fragment::RoundMessage>, Status> {
        self.run(request, |n, r| {
            n.dkg_confirm(r)
                .map(|message| fragment::RoundMessage { message })
        })
        .await
    }

    #[tracing::instrument(skip(self, request), fields(node = %self.node.index))]
    async fn dkg_activate(
        &self,
        request: Request<fragment::DkgActivateRequest>,
    ) -> Result<Response<fragment::DkgActivateReply>, Status> {
        self.run(request, |n, r| {
            n.dkg_activate(r).map(|()| fragment::DkgActivateReply {})
        })
        .await
    }

    #[tracing::instrument(skip(self, request), fields(node = %self.node.index))]
    async fn retire_key(
        &self,
        request: Request<fragment::RetireKeyRequest>,
    ) -> Result<Response<fragment::RetireKeyReply>, Status> {
        self.run(request, |n, r| {
            n.retire_key(r)
                .map(|destroyed| fragment::RetireKeyReply { destroyed })
        })
        .await
    }

    #[tracing::instrument(skip(self, request), fields(node = %self.node.index))]
    async fn presign_commit(
        &self,
        request: Request<fragment::PresignStart>,
    ) -> Result<Response<fragment::RoundMessage>, Status> {
        self.run(request, |n, r| {
            n.presign_commit(r)
                .map(|message| fragment::RoundMessage { message })
        })
        .await
    }

    #[tracing::instrument(skip(self, request), fields(node = %self.node.index))]
    async fn presign_deal(
        &self,
        request: Request<fragment::RoundInput>,
    ) -> Result<Response<fragment::RoundMessage>, Status> {
        self.run(request, |n, r| {
            n.presign_deal(r)
                .map(|message| fragment::RoundMessage { message })
        })
        .await
    }

    #[tracing::instrument(skip(self, request), fields(node = %self.node.index))]
    async fn presign_mu(
        &self,
        request: Request<fragment::RoundInput>,
    ) -> Result<Response<fragment::RoundMessage>, Status> {
        self.run(request, |n, r| {
            n.presign_mu(r)
                .map(|message| fragment::RoundMessage { message })
        })
        .await
    }

    #[tracing::instrument(skip(self, request), fields(node = %self.node.index))]
    async fn presign_reduce(
        &self,
        request: Request<fragment::RoundInput>,
    ) -> Result<Response<fragment::RoundMessage>, Status> {
        self.run(request, |n, r| {
            n.presign_reduce(r)
                .map(|message| fragment::RoundMessage { message })
        })
        .await
    }

    #[tracing::instrument(skip(self, request), fields(node = %self.node.index))]
    async fn presign_store(
        &self,
        request: Request<fragment::RoundInput>,
    ) -> Result<Response<fragment::PresignStoreReply>, Status> {
        self.run(request, |n, r| {
            n.presign_store(r)
                .map(|stored| fragment::PresignStoreReply { stored })
        })
        .await
    }

    #[tracing::instrument(skip(self, request), fields(node = %self.node.index))]
    async fn sign(
        &self,
        request: Request<fragment::SignBatch>,
    ) -> Result<Response<fragment::SignBatchReply>, Status> {
        self.run(request, |n, r| {
            n.sign_batch(r)
                .map(|results| fragment::SignBatchReply { results })
        })
        .await
    }

    #[tracing::instrument(skip(self, request), fields(node = %self.node.index))]
    async fn threshold_dh(
        &self,
        request: Request<fragment::DhCall>,
    ) -> Result<Response<fragment::DhReply>, Status> {
        self.run(request, |n, r| {
            n.threshold_dh(r)
                .map(|partial| fragment::DhReply { partial })
        })
        .await
    }

    #[tracing::instrument(skip(self, request), fields(node = %self.node.index))]
    async fn inventory(
        &self,
        request: Request<fragment::InventoryRequest>,
    ) -> Result<Response<fragment::InventoryReply>, Status> {
        self.run(request, |n, _| n.inventory()).await
    }

    #[tracing::instrument(skip(self, request), fields(node = %self.node.index))]
    async fn discard_presignatures(
        &self,
        request: Request<fragment::DiscardPresignaturesRequest>,
    ) -> Result<Response<fragment::DiscardPresignaturesReply>, Status> {
        self.run(request, |n, r| {
            Ok(fragment::DiscardPresignaturesReply {
                discarded: n.discard_presignatures(&r.coordinator_instance)?,
            })
        })
        .await
    }

    #[tracing::instrument(skip(self, request), fields(node = %self.node.index))]
    async fn install_policy(
        &self,
        request: Request<fragment::PolicyBundle>,
    ) -> Result<Response<fragment::PolicyBundleReply>, Status> {
        self.run(request, |n, r| n.install_policy(r)).await
    }

    async fn narrow_profile(
        &self,
        request: Request<fragment::NarrowProfileRequest>,
    ) -> Result<Response<fragment::NarrowProfileReply>, Status> {
        self.run(request, |n, r| {
            n.narrow_profile(r)
                .map(|()| fragment::NarrowProfileReply {})
        })
        .await
    }
}
