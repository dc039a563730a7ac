//! Orchestration of the fragment nodes: DKG, presignature batches, one-round signing
//! with per-node request batching, and threshold DH.
//!
//! Keys have versions: a name's newest version is the one that signs and whose pools
//! are kept filled; [`Cluster::rotate_key`] adds a version by a fresh DKG, and a retired
//! signing version stays in [`Cluster::jwks_keys`] while tokens it signed may still be
//! valid. A token-signing key ([`TokenRules`]) signs only through
//! [`Cluster::sign_jws`]: the JWS signing input travels to every node, which checks it
//! against the rules it recorded when the key was created.
//!
//! The coordinator only relays: every round message it forwards is sealed to its
//! recipients and signed by its sender, and it runs the coordinator-side checks of
//! `quorate-crypto` (`dkg::finalize`, `presign::aggregate`/`verify_mus`/`public_output`,
//! `sign::combine`, `tdh::combine`) which never touch a secret.

use std::collections::{HashMap, HashSet, VecDeque};
use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use quorate_crypto::Error as CryptoError;
use quorate_crypto::dkg::{self, DkgConfig, DkgMode};
use quorate_crypto::keys::{KeyId, KeyPublic, KeyPurpose};
use quorate_crypto::params::{PartyIndex, PartySet, SessionId, ThresholdParams};
use quorate_crypto::presign::{self, PresignConfig, PresignaturePublic};
use quorate_crypto::sign::{self, SignRequest, Signature, SignatureShare};
use quorate_crypto::tdh::{self, DhRequest, DhResponse};
use quorate_crypto::wire::Wire;
use quorate_proto::convert;
use quorate_proto::fragment::{self, fragment_node_client::FragmentNodeClient};
use quorate_proto::tls::Trust;
use rand::SeedableRng;
use tokio::sync::{mpsc, oneshot};
use tonic::transport::Channel;

use quorate_authz::bundle::BUNDLE_MISMATCH;
pub use quorate_proto::profile::KeyProfile;
pub use quorate_proto::rules::TokenRules;
use quorate_proto::rules::{CLOCK_SKEW_SECONDS, MAX_SIGNING_INPUT, REFUSAL_PREFIX};

use crate::store::{KeyStore, KeyVersion, NamedKey, StoreError, StoredVersion};

/// Round-trip limit for protocol rounds (a batch of presignatures takes a while).
const ROUND_TIMEOUT: Duration = Duration::from_secs(120);
/// Round-trip limit for signing and DH.
const ONLINE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a node that failed is left out of new work.
const DOWN_BACKOFF: Duration = Duration::from_secs(2);

/// How long a heartbeat waits for each node.
const HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(2);
/// The most sign requests sent to one node in one RPC.
const MAX_SIGN_BATCH: usize = 256;

/// How long a signature waits for a presignature when the pools of its key are empty
/// (the filler is woken at once and a batch takes well under this), before it fails as
/// unavailable.
const PRESIG_WAIT: Duration = Duration::from_secs(5);

/// Errors of the coordinator, mapped to gRPC statuses by the service layer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CoordError {
    /// Bad request.
    #[error("{0}")]
    Invalid(String),
    /// No such key.
    #[error("{0}")]
    NotFound(String),
    /// Not possible in the current state (wrong purpose, name taken).
    #[error("{0}")]
    Precondition(String),
    /// Not enough healthy nodes.
    #[error("{0}")]
    Unavailable(String),
    /// A node misbehaved; it has been excluded from new work.
    #[error("{0}")]
    Misbehaved(String),
    /// The fragment nodes refused by the key's usage rules (token rules): final, another
    /// presignature would be refused the same way.
    #[error("{0}")]
    Refused(String),
    /// The key was rotated after the caller chose its version (`kid`): rebuild what
    /// names the version and try again.
    #[error("{0}")]
    Rotated(String),
    /// Internal failure.
    #[error("{0}")]
    Internal(String),
}

impl From<StoreError> for CoordError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Unavailable(_) => CoordError::Unavailable(e.to_string()),
            _ => CoordError::Internal(e.to_string()),
        }
    }
}

impl From<CoordError> for tonic::Status {
    fn from(e: CoordError) -> Self {
        match e {
            CoordError::Invalid(m) => tonic::Status::invalid_argument(m),
            CoordError::NotFound(m) => tonic::Status::not_found(m),
            CoordError::Precondition(m) => tonic::Status::failed_precondition(m),
            CoordError::Unavailable(m) => tonic::Status::unavailable(m),
            CoordError::Misbehaved(m) => tonic::Status::aborted(m),
            CoordError::Refused(m) => tonic::Status::permission_denied(m),
            CoordError::Rotated(m) => tonic::Status::aborted(m),
            CoordError::Internal(m) => tonic::Status::internal(m),
        }
    }
}

fn crypto(e: CryptoError) -> CoordError {
    match &e {
        CryptoError::InvalidInput(_) => CoordError::Invalid(e.to_string()),
        CryptoError::Refused(_) => CoordError::Precondition(e.to_string()),
        CryptoError::PeerMisbehaved { .. } | CryptoError::Unauthentic { .. } => {
            CoordError::Misbehaved(e.to_string())
        }
        _ => CoordError::Internal(e.to_string()),
    }
}

type Result<T, E = CoordError> = core::result::Result<T, E>;

struct SignJob {
    request: Vec<u8>,
    /// The JWS signing input whose SHA-256 the request signs, or empty.
    signing_input: Vec<u8>,
    /// What the token rests on, for nodes that check evidence (DESIGN.md §9).
    evidence: Option<fragment::TokenEvidence>,
    reply: oneshot::Sender<Result<SignatureShare, String>>,
}

/// One fragment node as the coordinator sees it.
/// A finished DKG, refresh or reshare run, not yet activated.
struct DkgRun {
    session: SessionId,
    public: KeyPublic,
    /// What every node was started with.
    start: fragment::DkgStart,
    /// Every holder's signed confirmation (quorate-crypto encoding).
    confirms: Vec<Vec<u8>>,
}

/// A node leaving the cluster ([`Cluster::set_retiring`]).
struct Retiring {
    index: PartyIndex,
    /// `None`: the node is gone for good (nothing to ask).
    client: Option<FragmentNodeClient<Channel>>,
}

struct NodeHandle {
    index: PartyIndex,
    addr: SocketAddr,
    client: FragmentNodeClient<Channel>,
    signer: mpsc::Sender<SignJob>,
}

#[derive(Default)]
struct State {
    /// By name; the last version of each is the current one.
    keys: HashMap<String, NamedKey>,
    names: HashMap<KeyId, String>,
    pools: HashMap<(KeyId, PartySet), VecDeque<PresignaturePublic>>,
    down: HashMap<PartyIndex, Instant>,
    culprits: HashSet<PartyIndex>,
    /// Keys whose renewed shares are decided but not active on every node: nothing
    /// presigns for them until the activation is done (nodes would hold two epochs).
    renewing: HashSet<KeyId>,
    /// Each node's process instance, as last reported (a change is a restart).
    instances: HashMap<PartyIndex, Vec<u8>>,
    /// Each node's build version, as last reported.
    versions: HashMap<PartyIndex, String>,
    /// Nodes whose store reports failing writes, with the reason.
    store_faults: HashMap<PartyIndex, String>,
    /// Nodes that did not answer the last heartbeat: no new work until one answers.
    unreachable: HashSet<PartyIndex>,
}

/// Leaves node `i` out of new work because its store fails (`error`), until a heartbeat
/// finds it writing again.
fn note_store_fault(s: &mut State, i: PartyIndex, error: &str) {
    if s.store_faults.insert(i, error.to_owned()).is_none() {
        tracing::warn!(
            node = i.get(),
            error,
            "node's store fails to write: leaving it out of new work"
        );
    }
}

/// How a fragment node's refusals name a failure of its own store.
const STORE_FAULT: &str = "node store: ";

impl State {
    fn usable(&self, i: PartyIndex) -> bool {
        !self.culprits.contains(&i)
            && !self.store_faults.contains_key(&i)
            && !self.unreachable.contains(&i)
            && self.down.get(&i).is_none_or(|t| t.elapsed() > DOWN_BACKOFF)
    }
}

/// One version of a named key.
#[derive(Clone, Debug)]
pub struct KeyVersionInfo {
    /// The key's name.
    pub name: String,
    /// 1 for a new key, +1 per rotation.
    pub version: u32,
    /// The version's public data.
    pub public: KeyPublic,
    /// Its profile (the same for every version of a name).
    pub profile: KeyProfile,
    /// Unix seconds.
    pub created_at: i64,
    /// When a newer version replaced it; `None` for the current version.
    pub retired_at: Option<i64>,
}

impl KeyVersionInfo {
    fn of(name: &str, v: &StoredVersion) -> Self {
        KeyVersionInfo {
            name: name.to_string(),
            version: v.version.version,
            public: v.public.clone(),
            profile: v.profile.clone(),
            created_at: v.version.created_at,
            retired_at: v.version.retired_at,
        }
    }

    /// The JWS `kid` of this version: its key id in hex.
    pub fn kid(&self) -> String {
        self.public.key_id.to_string()
    }
}

/// Current time, unix seconds.
pub(crate) fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// A node's health as last seen.
#[derive(Clone, Debug)]
pub struct NodeView {
    /// Index.
    pub index: u16,
    /// Address.
    pub addr: SocketAddr,
    /// Reachable and not excluded.
    pub healthy: bool,
    /// Why not.
    pub error: String,
    /// The node's build version (empty if it did not answer).
    pub version: String,
}

/// Crash-test hook: where a key renewal stops the process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RenewalFailPoint {
    /// Exit right after the renewal is recorded as pending, before any node activates.
    AfterRecord,
    /// Exit after the first node (by index) activated its new share.
    AfterOneNode,
}

/// The coordinator's counters (Prometheus).
#[derive(Debug, Default)]
pub struct CoordMetrics {
    /// Signatures returned (verified).
    pub signatures: quorate_proto::metrics::Counter,
    /// Signing attempts that failed (and were retried or reported).
    pub sign_attempt_failures: quorate_proto::metrics::Counter,
    /// Presignatures added to pools.
    pub presignatures_made: quorate_proto::metrics::Counter,
    /// Threshold-DH responses returned.
    pub dh_responses: quorate_proto::metrics::Counter,
    /// Key share renewals (refresh, reshare, repair) active on every node.
    pub renewals: quorate_proto::metrics::Counter,
    /// Key share renewals that failed before activation.
    pub renewal_failures: quorate_proto::metrics::Counter,
}

/// The coordinator's view of the cluster.
pub struct Cluster {
    params: ThresholdParams,
    trust: Trust,
    nodes: Vec<NodeHandle>,
    store: Arc<dyn KeyStore>,
    state: Mutex<State>,
    relay_log: Option<Mutex<std::fs::File>>,
    metrics: CoordMetrics,
    /// Serialises key creation and rotation (each a DKG of seconds): a name is checked
    /// and written by one of them at a time.
    admin: tokio::sync::Mutex<()>,
    /// Signalled when presignatures are pooled (waiting signatures retry).
    presigs_added: tokio::sync::Notify,
    /// Signalled when a presignature is taken (the filler re-checks the watermarks).
    presig_drawn: tokio::sync::Notify,
    /// Signalled when a node is marked down (waits on it give up early).
    down_changed: tokio::sync::Notify,
    /// The operator-signed policy bundle the identity plane decides under (id, JWS):
    /// installed on a node before it is asked to sign under it (DESIGN.md §9).
    policy_bundle: std::sync::RwLock<Option<(String, String)>>,
    /// The bundle each node is known to hold (or to need none: it enforces no bundle).
    policy_installed: Mutex<HashMap<PartyIndex, String>>,
    /// Presigning sessions hold it shared; activating refreshed or reshared shares
    /// holds it exclusively, so that no session mixes the shares of two epochs.
    gate: tokio::sync::RwLock<()>,
    /// Crash tests only.
    fail_point: std::sync::OnceLock<RenewalFailPoint>,
    /// The last node info each node sent (its KEM key, signed by its certificate key).
    infos: Mutex<HashMap<PartyIndex, fragment::NodeInfo>>,
    /// Nodes leaving the cluster (`--retire`).
    retiring: std::sync::OnceLock<Vec<Retiring>>,
    /// This coordinator's instance id (`Cluster::set_instance`), which nodes record with
    /// each presignature it makes.
    instance: std::sync::OnceLock<String>,
}

/// Where a node stands after [`Cluster::install_policy`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BundleReport {
    /// The node verified the bundle and holds it now.
    Holds(String),
    /// The node checks no signed policy (its ceiling names no operator key).
    NotEnforcing,
    /// The node refused the bundle (bad signature, rollback, Cedar errors): the reason.
    Refused(String),
    /// The node could not be reached; it gets the bundle before its next signature.
    Unreachable(String),
}

fn rng() -> Result<rand::rngs::StdRng> {
    rand::rngs::StdRng::try_from_rng(&mut rand::rngs::SysRng)
        .map_err(|e| CoordError::Internal(format!("system RNG failed: {e}")))
}

/// `(n,t)`, with the holders when they are not `1..=n`: `(3,1) on nodes {1,3,4}`.
pub fn describe(p: &ThresholdParams) -> String {
    if p.is_contiguous() {
        format!("({},{})", p.n(), p.t())
    } else {
        format!("({},{}) on nodes {}", p.n(), p.t(), p.all_parties())
    }
}

fn status_text(s: &tonic::Status) -> String {
    format!("{:?}: {}", s.code(), s.message())
}

impl Cluster {
    /// A cluster over `nodes` (index → address), loading keys and pools from `store`
    /// (redb or PostgreSQL, `coordinator/STORE.md`).
    pub fn new(
        params: ThresholdParams,
        trust: Trust,
        channels: Vec<(PartyIndex, SocketAddr, Channel)>,
        store: Arc<dyn KeyStore>,
        relay_log: Option<PathBuf>,
    ) -> Result<Arc<Self>> {
        if channels.len() != usize::from(params.n()) {
            return Err(CoordError::Invalid(format!(
                "{} node addresses given for n = {}",
                channels.len(),
                params.n()
            )));
        }
        let relay_log = match relay_log {
            None => None,
            Some(p) => Some(Mutex::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&p)
                    .map_err(|e| {
                        CoordError::Internal(format!("cannot open relay log {}: {e}", p.display()))
                    })?,
            )),
        };
        let mut nodes = Vec::new();
        let mut receivers = Vec::new();
        for (index, addr, ch) in channels {
            let client = FragmentNodeClient::new(ch)
                .max_decoding_message_size(256 * 1024 * 1024)
                .max_encoding_message_size(256 * 1024 * 1024);
            let (tx, rx) = mpsc::channel(4096);
            receivers.push((client.clone(), rx));
            nodes.push(NodeHandle {
                index,
                addr,
                client,
                signer: tx,
            });
        }
        let mut state = State::default();
        for k in store.keys()? {
            for v in &k.versions {
                state.names.insert(v.public.key_id, k.name.clone());
            }
            state.keys.insert(k.name.clone(), k);
        }
        for (_, _, public) in store.pending_activations()? {
            state.renewing.insert(public.key_id);
        }
        // Presignatures live in memory only (DESIGN.md §4.5): pools start empty, and
        // whatever an earlier version stored is dropped.
        let dropped = store.drop_stored_pools()?;
        if dropped > 0 {
            tracing::info!(
                dropped,
                "dropped presignature pools stored by an earlier version"
            );
        }
        let cluster = Arc::new(Cluster {
            params,
            trust,
            nodes,
            store: store.clone(),
            state: Mutex::new(state),
            relay_log,
            metrics: CoordMetrics::default(),
            admin: tokio::sync::Mutex::new(()),
            presigs_added: tokio::sync::Notify::new(),
            presig_drawn: tokio::sync::Notify::new(),
            down_changed: tokio::sync::Notify::new(),
            policy_bundle: std::sync::RwLock::new(None),
            policy_installed: Mutex::new(HashMap::new()),
            gate: tokio::sync::RwLock::new(()),
            fail_point: std::sync::OnceLock::new(),
            infos: Mutex::new(HashMap::new()),
            retiring: std::sync::OnceLock::new(),
            instance: std::sync::OnceLock::new(),
        });
        for (client, rx) in receivers {
            tokio::spawn(sign_batcher(client, rx));
        }
        Ok(cluster)
    }

    /// Threshold parameters.
    pub fn params(&self) -> ThresholdParams {
        self.params
    }

    /// Prometheus text exposition: counters, pool depths, excluded nodes.
    pub fn render_metrics(&self) -> String {
        let mut e = quorate_proto::metrics::Exposition::default();
        let m = &self.metrics;
        for (name, help, c) in [
            (
                "quorate_coordinator_signatures_total",
                "Verified signatures returned.",
                &m.signatures,
            ),
            (
                "quorate_coordinator_sign_attempt_failures_total",
                "Signing attempts that failed.",
                &m.sign_attempt_failures,
            ),
            (
                "quorate_coordinator_presignatures_made_total",
                "Presignatures added to pools.",
                &m.presignatures_made,
            ),
            (
                "quorate_coordinator_dh_responses_total",
                "Threshold-DH responses returned.",
                &m.dh_responses,
            ),
            (
                "quorate_coordinator_key_renewals_total",
                "Key share renewals (refresh, reshare, repair) active on every node.",
                &m.renewals,
            ),
            (
                "quorate_coordinator_key_renewal_failures_total",
                "Key share renewals that failed before activation.",
                &m.renewal_failures,
            ),
        ] {
            e.family(name, "counter", help).sample(name, &[], c.get());
        }
        e.family(
            "quorate_coordinator_pool_depth",
            "gauge",
            "Presignatures ready per key and signing set.",
        );
        for (key, set, depth) in self.pool_depths().unwrap_or_default() {
            let set = set.to_string();
            e.sample(
                "quorate_coordinator_pool_depth",
                &[("key", &key), ("set", &set)],
                depth as u64,
            );
        }
        let pending = self.pending_activations();
        e.family(
            "quorate_coordinator_pending_activations",
            "gauge",
            "Renewed key shares decided but not yet active on every node.",
        )
        .sample(
            "quorate_coordinator_pending_activations",
            &[],
            pending as u64,
        );
        e.family(
            "quorate_coordinator_key_epoch",
            "gauge",
            "Share epoch of each key's current version (+1 per refresh or reshare).",
        );
        for v in self.current_versions().unwrap_or_default() {
            e.sample(
                "quorate_coordinator_key_epoch",
                &[("key", &v.name)],
                u64::from(v.public.epoch),
            );
        }
        let excluded = self.state().map(|s| s.culprits.len()).unwrap_or(0);
        e.family(
            "quorate_coordinator_excluded_nodes",
            "gauge",
            "Nodes excluded after misbehaving.",
        )
        .sample("quorate_coordinator_excluded_nodes", &[], excluded as u64);
        e.finish()
    }

    fn state(&self) -> Result<std::sync::MutexGuard<'_, State>> {
        self.state
            .lock()
            .map_err(|_| CoordError::Internal("coordinator state poisoned".into()))
    }

    fn node(&self, i: PartyIndex) -> Result<&NodeHandle> {
        self.nodes
            .iter()
            .find(|n| n.index == i)
            .ok_or_else(|| CoordError::Internal(format!("no node {i}")))
    }

    /// Sets the operator-signed bundle (id, JWS) nodes are to hold before they sign
    /// under it.
    pub fn set_policy_bundle(&self, bundle: Option<(String, String)>) {
        *self
            .policy_bundle
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = bundle;
    }

    fn installed(&self) -> std::sync::MutexGuard<'_, HashMap<PartyIndex, String>> {
        self.policy_installed
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Sends a signed bundle to every node at once; each verifies it against its own
    /// operator key. Returns each node's answer, by index.
    pub async fn install_policy(&self, id: &str, jws: &str) -> Vec<(u16, BundleReport)> {
        let mut out = Vec::with_capacity(self.nodes.len());
        for n in &self.nodes {
            out.push((n.index.get(), self.install_on(n, id, jws).await));
        }
        out
    }

    async fn install_on(&self, n: &NodeHandle, id: &str, jws: &str) -> BundleReport {
        let mut c = n.client.clone();
        let res = tokio::time::timeout(
            ONLINE_TIMEOUT,
            c.install_policy(fragment::PolicyBundle {
                jws: jws.to_owned(),
            }),
        )
        .await;
        let report = match res {
            Ok(Ok(reply)) => BundleReport::Holds(reply.into_inner().id),
            Ok(Err(s)) if s.code() == tonic::Code::FailedPrecondition => BundleReport::NotEnforcing,
            Ok(Err(s)) if s.code() == tonic::Code::Unavailable => {
                BundleReport::Unreachable(s.message().to_owned())
            }
            Ok(Err(s)) => BundleReport::Refused(s.message().to_owned()),
            Err(_) => BundleReport::Unreachable("timed out".into()),
        };
        match &report {
            BundleReport::Holds(_) | BundleReport::NotEnforcing => {
                self.installed().insert(n.index, id.to_owned());
            }
            _ => {
                self.installed().remove(&n.index);
            }
        }
        report
    }

    /// Makes sure node `j` holds the bundle `id` before it is asked to decide under it.
    async fn ensure_policy(&self, j: PartyIndex, id: &str) -> Result<()> {
        if id.is_empty() || self.installed().get(&j).is_some_and(|held| held == id) {
            return Ok(());
        }
        let jws = match &*self
            .policy_bundle
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
        {
            Some((held, jws)) if held == id => jws.clone(),
            _ => {
                return Err(CoordError::Precondition(format!(
                    "policy bundle {id} is no longer the coordinator's; ask again"
                )));
            }
        };
        match self.install_on(self.node(j)?, id, &jws).await {
            BundleReport::Holds(_) | BundleReport::NotEnforcing => Ok(()),
            BundleReport::Refused(why) => Err(CoordError::Refused(format!(
                "node {j} refused policy bundle {id}: {why}"
            ))),
            BundleReport::Unreachable(why) => {
                self.mark_down(j);
                Err(CoordError::Unavailable(format!(
                    "node {j} could not be given policy bundle {id}: {why}"
                )))
            }
        }
    }

    /// Sets this coordinator's instance id (`--instance-id`), once, before any
    /// presigning: nodes tag the presignatures it makes with it. Unset: untagged (as a
    /// coordinator from before instance ids).
    pub fn set_instance(&self, id: String) {
        if self.instance.set(id).is_err() {
            tracing::warn!("the coordinator instance id is already set; keeping the first");
        }
    }

    /// This coordinator's instance id (empty if unset).
    pub fn instance(&self) -> &str {
        self.instance.get().map_or("", String::as_str)
    }

    /// Asks every reachable node to forget the unused presignatures it holds for this
    /// coordinator instance (they live in memory only; a process that starts afresh
    /// holds none of their public halves), and untagged ones; other coordinators'
    /// stay. A node that cannot be reached keeps them until it restarts; they can
    /// never be used.
    pub async fn discard_node_presignatures(&self) {
        for n in &self.nodes {
            let mut c = n.client.clone();
            match tokio::time::timeout(
                Duration::from_secs(2),
                c.discard_presignatures(fragment::DiscardPresignaturesRequest {
                    coordinator_instance: self.instance().to_owned(),
                }),
            )
            .await
            {
                Ok(Ok(r)) => {
                    let discarded = r.into_inner().discarded;
                    if discarded > 0 {
                        tracing::info!(
                            node = n.index.get(),
                            discarded,
                            "node forgot presignatures of an earlier coordinator"
                        );
                    }
                }
                Ok(Err(s)) => {
                    tracing::warn!(node = n.index.get(), error = %s.message(), "could not have the node discard old presignatures")
                }
                Err(_) => tracing::warn!(
                    node = n.index.get(),
                    "could not have the node discard old presignatures: timed out"
                ),
            }
        }
    }

    /// Drops every pool whose signing set includes node `j`: it answered that it does
    /// not hold a presignature it acknowledged, so it restarted and burnt them all
    /// (DESIGN.md §4.5). The filler makes new ones.
    fn drop_pools_of(&self, j: PartyIndex) {
        if let Ok(mut s) = self.state() {
            let before: usize = s.pools.values().map(VecDeque::len).sum();
            s.pools.retain(|(_, set), _| !set.contains(j));
            let after: usize = s.pools.values().map(VecDeque::len).sum();
            if before > after {
                tracing::info!(
                    node = j.get(),
                    dropped = before - after,
                    "node restarted: its presignatures are gone; refilling"
                );
            }
        }
        self.presig_drawn.notify_one();
    }

    fn mark_down(&self, i: PartyIndex) {
        if let Ok(mut s) = self.state() {
            s.down.insert(i, Instant::now());
        }
        self.down_changed.notify_waiters();
    }

    /// Waits for node `j`'s answer to a request sent at `sent`, up to
    /// [`ONLINE_TIMEOUT`]; gives up early (`None`) once `j` is marked down after `sent`
    /// (by the heartbeat or another request), so that a partitioned node holds a
    /// signature up for about a heartbeat, not the whole time limit.
    async fn await_node<T>(
        &self,
        j: PartyIndex,
        sent: Instant,
        rx: oneshot::Receiver<T>,
    ) -> Option<Result<T, oneshot::error::RecvError>> {
        let deadline = tokio::time::Instant::now() + ONLINE_TIMEOUT;
        tokio::pin!(rx);
        loop {
            let down = self.down_changed.notified();
            tokio::pin!(down);
            down.as_mut().enable();
            let gone = self
                .state()
                .map(|s| s.down.get(&j).is_some_and(|t| *t > sent))
                .unwrap_or(false);
            if gone {
                return None;
            }
            tokio::select! {
                r = &mut rx => return Some(r),
                () = &mut down => {}
                () = tokio::time::sleep_until(deadline) => return None,
            }
        }
    }

    /// Every node's index (the nodes a DKG runs on).
    pub fn all_nodes(&self) -> Vec<u16> {
        self.params
            .all_parties()
            .members()
            .iter()
            .map(|p| p.get())
            .collect()
    }

    /// Whether `i` may be given new work now.
    pub fn usable(&self, i: PartyIndex) -> bool {
        self.state().map(|s| s.usable(i)).unwrap_or(false)
    }

    /// Asks every node for its inventory, with a short time limit: a node that does not
    /// answer is marked down; a node whose store reports write failures is left out of
    /// new work until it reports none; a node that restarted (a new process instance)
    /// holds none of the presignatures pooled for it, so its pools are dropped at once
    /// rather than discovered one failed signature at a time (DESIGN.md §4.5).
    pub async fn heartbeat(&self) {
        let mut tasks = Vec::with_capacity(self.nodes.len());
        for n in &self.nodes {
            let mut c = n.client.clone();
            tasks.push((
                n.index,
                tokio::spawn(async move {
                    tokio::time::timeout(
                        HEARTBEAT_TIMEOUT,
                        c.inventory(fragment::InventoryRequest {}),
                    )
                    .await
                }),
            ));
        }
        for (i, t) in tasks {
            let Ok(Ok(Ok(reply))) = t.await else {
                if let Ok(mut s) = self.state()
                    && s.unreachable.insert(i)
                {
                    tracing::warn!(
                        node = i.get(),
                        "node does not answer: no new work for it until it does"
                    );
                }
                self.mark_down(i);
                continue;
            };
            let r = reply.into_inner();
            let restarted = match self.state() {
                Ok(mut s) => {
                    s.versions.insert(i, r.version);
                    if r.store_error.is_empty() {
                        if s.store_faults.remove(&i).is_some() {
                            tracing::info!(node = i.get(), "node's store accepts writes again");
                        }
                    } else {
                        note_store_fault(&mut s, i, &r.store_error);
                    }
                    s.down.remove(&i);
                    if s.unreachable.remove(&i) {
                        tracing::info!(node = i.get(), "node answers again");
                    }
                    let prev = s.instances.insert(i, r.instance.clone());
                    prev.is_some_and(|p| p != r.instance)
                }
                Err(_) => false,
            };
            if restarted {
                tracing::info!(
                    node = i.get(),
                    "node restarted: its presignatures are gone, dropping its pools"
                );
                self.drop_pools_of(i);
            }
        }
    }

    fn record_relay(&self, msgs: &[Vec<u8>]) {
        if let Some(log) = &self.relay_log
            && let Ok(mut f) = log.lock()
        {
            for m in msgs {
                let _ = f.write_all(&(m.len() as u32).to_be_bytes());
                let _ = f.write_all(m);
            }
            let _ = f.flush();
        }
    }

    /// Runs one round on `members` in parallel: `call(client)` per node.
    async fn round<F, Fut, T>(&self, members: &[PartyIndex], what: &str, call: F) -> Result<Vec<T>>
    where
        F: Fn(FragmentNodeClient<Channel>) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>
            + Send
            + 'static,
        T: Send + 'static,
    {
        self.round_within(members, what, ROUND_TIMEOUT, call).await
    }

    /// [`Cluster::round`] with its own time limit per node.
    async fn round_within<F, Fut, T>(
        &self,
        members: &[PartyIndex],
        what: &str,
        limit: Duration,
        call: F,
    ) -> Result<Vec<T>>
    where
        F: Fn(FragmentNodeClient<Channel>) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>
            + Send
            + 'static,
        T: Send + 'static,
    {
        let mut tasks = Vec::with_capacity(members.len());
        for &i in members {
            let fut = call(self.node(i)?.client.clone());
            tasks.push((
                i,
                tokio::spawn(async move { tokio::time::timeout(limit, fut).await }),
            ));
        }
        let mut out = Vec::with_capacity(tasks.len());
        let mut failures = Vec::new();
        // The most telling refusal among the failures: a node's verdict on the request
        // itself (wrong purpose, unknown key, bad input) beats "unavailable".
        let mut refusal: Option<tonic::Code> = None;
        for (i, t) in tasks {
            match t.await {
                Ok(Ok(Ok(r))) => out.push(r.into_inner()),
                Ok(Ok(Err(s))) => {
                    if matches!(
                        s.code(),
                        tonic::Code::Unavailable | tonic::Code::DeadlineExceeded
                    ) {
                        self.mark_down(i);
                    } else {
                        refusal.get_or_insert(s.code());
                    }
                    failures.push(format!("node {i}: {}", status_text(&s)));
                }
                Ok(Err(_)) => {
                    self.mark_down(i);
                    failures.push(format!("node {i}: timed out"));
                }
                Err(_) => failures.push(format!("node {i}: task failed")),
            }
        }
        if failures.is_empty() {
            return Ok(out);
        }
        let msg = format!("{what} failed: {}", failures.join("; "));
        Err(match refusal {
            None => CoordError::Unavailable(msg),
            Some(tonic::Code::FailedPrecondition) => CoordError::Precondition(msg),
            Some(tonic::Code::InvalidArgument) => CoordError::Invalid(msg),
            Some(tonic::Code::NotFound) => CoordError::NotFound(msg),
            Some(tonic::Code::Aborted) => CoordError::Misbehaved(msg),
            // A node's own limit (its ceiling, a key's profile): final, say so.
            Some(tonic::Code::PermissionDenied) => CoordError::Refused(msg),
            Some(_) => CoordError::Internal(msg),
        })
    }

    async fn roster(&self) -> Result<(fragment::Roster, quorate_crypto::identity::Roster)> {
        let all: Vec<PartyIndex> = self.params.all_parties().members().to_vec();
        self.roster_for(&all).await
    }

    /// The roster with fresh node info from `members` (the nodes that take part) and
    /// the last verified info of every other node, so that a node that is down or
    /// partitioned delays nothing it has no part in. A node never heard from since
    /// this process started is asked too.
    async fn roster_for(
        &self,
        members: &[PartyIndex],
    ) -> Result<(fragment::Roster, quorate_crypto::identity::Roster)> {
        let mut ask: Vec<PartyIndex> = members.to_vec();
        {
            let cache = self
                .infos
                .lock()
                .map_err(|_| CoordError::Internal("node info cache poisoned".into()))?;
            for p in self.params.all_parties().members() {
                if !ask.contains(p) && !cache.contains_key(p) {
                    ask.push(*p);
                }
            }
        }
        ask.sort_unstable();
        // Short: a node that does not answer this at once is not fit to presign.
        let fresh = self
            .round_within(
                &ask,
                "fetching node info",
                ONLINE_TIMEOUT,
                |mut c| async move { c.info(fragment::InfoRequest {}).await },
            )
            .await?;
        let infos = {
            let mut cache = self
                .infos
                .lock()
                .map_err(|_| CoordError::Internal("node info cache poisoned".into()))?;
            for (p, info) in ask.iter().zip(fresh) {
                cache.insert(*p, info);
            }
            self.params
                .all_parties()
                .members()
                .iter()
                .filter_map(|p| cache.get(p).cloned())
                .collect()
        };
        let roster = fragment::Roster { nodes: infos };
        let verified =
            convert::verify_roster(Some(&roster), &self.trust, &self.params.all_parties())
                .map_err(|e| CoordError::Internal(format!("node roster does not verify: {e}")))?;
        Ok((roster, verified))
    }

    /// Runs a DKG for a new key (all `n` nodes must be up) and activates it as version
    /// 1 of `name`. Every node records `profile` and refuses any other use of the key
    /// (DESIGN.md §9); a token key's rules must fit every node's ceiling.
    pub async fn create_key(&self, name: &str, profile: KeyProfile) -> Result<KeyPublic> {
        let _admin = self.admin.lock().await;
        if self.state()?.keys.contains_key(name) {
            return Err(CoordError::Precondition(format!(
                "a key named {name} already exists"
            )));
        }
        let public = self
            .run_dkg(
                fresh_key_id()?,
                DkgMode::NewKey {
                    purpose: profile.purpose(),
                },
                Some(&profile),
            )
            .await?;
        let version = KeyVersion {
            version: 1,
            key_id: public.key_id,
            created_at: unix_now(),
            retired_at: None,
        };
        self.store
            .put_version(name, &public, &profile, &[version])?;
        {
            let mut s = self.state()?;
            s.names.insert(public.key_id, name.to_string());
            s.keys.insert(
                name.to_string(),
                NamedKey {
                    name: name.to_string(),
                    public: public.clone(),
                    versions: vec![StoredVersion {
                        version,
                        public: public.clone(),
                        profile: profile.clone(),
                    }],
                },
            );
        }
        tracing::info!(key = name, id = %public.key_id, profile = %profile, "key created");
        Ok(public)
    }

    /// Adds a new version of the signing key `name` by a fresh DKG (new key id, same
    /// purpose and token rules) and makes it current: from now on it signs and its pools
    /// are filled. The previous version is retired now; it stays in
    /// [`Cluster::jwks_keys`] for its tokens' lifetime, and its pooled presignatures are
    /// dropped. Returns the new version.
    pub async fn rotate_key(&self, name: &str) -> Result<KeyVersionInfo> {
        let _admin = self.admin.lock().await;
        let (mut versions, profile, purpose) = {
            let s = self.state()?;
            let k = s.keys.get(name).ok_or_else(|| no_such_key(name))?;
            let profile = k
                .versions
                .last()
                .map(|v| v.profile.clone())
                .ok_or_else(|| CoordError::Internal(format!("key {name} has no versions")))?;
            (
                k.versions.iter().map(|v| v.version).collect::<Vec<_>>(),
                profile,
                k.public.purpose,
            )
        };
        if purpose != KeyPurpose::Sign {
            return Err(CoordError::Precondition(format!(
                "only signing keys rotate: key {name} is a {} key, and its outputs depend on the key itself",
                purpose.name()
            )));
        }
        let public = self
            .run_dkg(fresh_key_id()?, DkgMode::NewKey { purpose }, Some(&profile))
            .await?;
        let now = unix_now();
        let last = versions
            .last_mut()
            .ok_or_else(|| CoordError::Internal(format!("key {name} has no versions")))?;
        last.retired_at = Some(now);
        let (old_id, next) = (last.key_id, last.version.checked_add(1));
        let version = KeyVersion {
            version: next
                .ok_or_else(|| CoordError::Internal(format!("key {name}: too many versions")))?,
            key_id: public.key_id,
            created_at: now,
            retired_at: None,
        };
        versions.push(version);
        self.store.put_version(name, &public, &profile, &versions)?;
        let stored = StoredVersion {
            version,
            public: public.clone(),
            profile,
        };
        let dropped: Vec<_> = {
            let mut s = self.state()?;
            s.names.insert(public.key_id, name.to_string());
            if let Some(k) = s.keys.get_mut(name) {
                for (held, v) in k.versions.iter_mut().zip(&versions) {
                    held.version = *v;
                }
                k.versions.push(stored.clone());
                k.public = public.clone();
            }
            // Nothing signs with the retired version any more.
            let old: Vec<_> = s
                .pools
                .keys()
                .filter(|(k, _)| *k == old_id)
                .cloned()
                .collect();
            old.iter()
                .filter_map(|p| s.pools.remove(p))
                .flatten()
                .map(|p| p.id)
                .collect()
        };
        drop(dropped);
        tracing::info!(key = name, version = version.version, id = %public.key_id, retired = %old_id, "key rotated");
        Ok(KeyVersionInfo::of(name, &stored))
    }

    async fn run_dkg(
        &self,
        key_id: KeyId,
        mode: DkgMode,
        profile: Option<&KeyProfile>,
    ) -> Result<KeyPublic> {
        let (session, public) = self.dkg_rounds(key_id, mode, profile).await?;
        self.activate_on_nodes(session, &public).await?;
        Ok(public)
    }

    /// The rounds of a DKG, refresh or reshare (DESIGN.md §4.3) up to the checked
    /// result; every node then holds its new share as pending. Parties that deal
    /// nothing in a reshare answer rounds 1 and 2 with empty messages, which are not
    /// relayed.
    async fn dkg_rounds(
        &self,
        key_id: KeyId,
        mode: DkgMode,
        profile: Option<&KeyProfile>,
    ) -> Result<(SessionId, KeyPublic)> {
        let run = self.dkg_run(key_id, mode, profile).await?;
        Ok((run.session, run.public))
    }

    /// [`Cluster::dkg_rounds`], keeping the start message and the confirmations: the
    /// evidence a node leaving the key checks before it destroys its share.
    async fn dkg_run(
        &self,
        key_id: KeyId,
        mode: DkgMode,
        profile: Option<&KeyProfile>,
    ) -> Result<DkgRun> {
        let (roster, verified) = self.roster().await?;
        let mut r = rng()?;
        let session = SessionId::random(&mut r);
        let (purpose, prior, dealers) = match &mode {
            DkgMode::NewKey { purpose } => (*purpose, Vec::new(), Vec::new()),
            DkgMode::Refresh { prior } => (prior.purpose, prior.to_bytes(), Vec::new()),
            DkgMode::Reshare { prior, dealers, .. } => (
                prior.purpose,
                prior.to_bytes(),
                dealers
                    .members()
                    .iter()
                    .map(|p| u32::from(p.get()))
                    .collect(),
            ),
        };
        let cfg = DkgConfig {
            session,
            key_id,
            params: self.params,
            mode,
            roster: verified,
        };
        let all: Vec<PartyIndex> = self.params.all_parties().members().to_vec();
        let start = fragment::DkgStart {
            session_id: session.0.to_vec(),
            key_id: key_id.0.to_vec(),
            n: u32::from(self.params.n()),
            t: u32::from(self.params.t()),
            purpose: convert::purpose_to_wire(purpose) as i32,
            refresh_prior: prior,
            roster: Some(roster),
            token_rules: profile.and_then(|p| p.to_fragment().1),
            profile: profile.map_or(fragment::KeyProfile::Unspecified, |p| p.to_fragment().0)
                as i32,
            reshare_dealers: dealers,
            holders: convert::holders_to_wire(&self.params),
        };
        let mut commits = self
            .round(&all, "DKG commit", |mut c| {
                let s = start.clone();
                async move { c.dkg_commit(s).await }
            })
            .await?;
        commits.retain(|m| !m.message.is_empty());
        let mut reveals = self
            .relay(
                &all,
                session,
                commits,
                "DKG reveal",
                |mut c, i| async move { c.dkg_reveal(i).await },
            )
            .await?;
        reveals.retain(|m| !m.message.is_empty());
        let confirms = self
            .relay(
                &all,
                session,
                reveals,
                "DKG confirm",
                |mut c, i| async move { c.dkg_confirm(i).await },
            )
            .await?;
        let decoded: Vec<dkg::DkgConfirm> = confirms
            .iter()
            .map(|m| dkg::DkgConfirm::from_bytes(&m.message).map_err(crypto))
            .collect::<Result<_>>()?;
        let public = dkg::finalize(&cfg, &decoded).map_err(|e| self.blame(e))?;
        Ok(DkgRun {
            session,
            public,
            start,
            confirms: confirms.into_iter().map(|m| m.message).collect(),
        })
    }

    /// Asks every node to activate its pending share of `public` from `session`
    /// (idempotent on the nodes: one that already holds it answers yes).
    async fn activate_on_nodes(&self, session: SessionId, public: &KeyPublic) -> Result<()> {
        let all: Vec<PartyIndex> = public.params.all_parties().members().to_vec();
        let activate = fragment::DkgActivateRequest {
            session_id: session.0.to_vec(),
            key_public: public.to_bytes(),
        };
        self.round(&all, "DKG activate", |mut c| {
            let a = activate.clone();
            async move { c.dkg_activate(a).await }
        })
        .await?;
        Ok(())
    }

    /// Makes the renewed shares of `name`'s current version active (refresh, reshare):
    /// records the decision durably, waits for presigning sessions in flight to end,
    /// activates on every node, then commits the new key data and drops the key's
    /// pools — their presignatures were made from the old shares, and every node burns
    /// its shares of them on activation (DESIGN.md §4.3). If a node cannot be reached,
    /// the decision stays pending and [`Cluster::resume_activations`] finishes it.
    async fn activate_renewal(
        &self,
        name: &str,
        session: SessionId,
        public: &KeyPublic,
    ) -> Result<()> {
        self.store.put_pending_activation(name, &session, public)?;
        self.state()?.renewing.insert(public.key_id);
        // Nothing else may fail between the record above and the activation below.
        let _gate = self.gate.write().await;
        match self.fail_point.get() {
            Some(RenewalFailPoint::AfterRecord) => {
                tracing::warn!("fail point renewal-after-record: exiting");
                std::process::exit(3);
            }
            Some(RenewalFailPoint::AfterOneNode) => {
                let first = public.params.all_parties().members().first().copied();
                if let Some(first) = first {
                    let a = fragment::DkgActivateRequest {
                        session_id: session.0.to_vec(),
                        key_public: public.to_bytes(),
                    };
                    let _ = self
                        .round(&[first], "DKG activate", |mut c| {
                            let a = a.clone();
                            async move { c.dkg_activate(a).await }
                        })
                        .await;
                }
                tracing::warn!("fail point renewal-after-one-node: exiting");
                std::process::exit(3);
            }
            None => {}
        }
        self.activate_on_nodes(session, public).await.map_err(|e| {
            CoordError::Unavailable(format!(
                "key {name}: the new shares (epoch {}) are decided but not yet active on every node; the coordinator keeps retrying: {e}",
                public.epoch
            ))
        })?;
        self.commit_renewal(name, public)
    }

    fn commit_renewal(&self, name: &str, public: &KeyPublic) -> Result<()> {
        self.store.commit_activation(name, public, unix_now())?;
        let dropped = {
            let mut s = self.state()?;
            if let Some(k) = s.keys.get_mut(name) {
                for v in &mut k.versions {
                    if v.public.key_id == public.key_id {
                        v.public = public.clone();
                    }
                }
                if k.public.key_id == public.key_id {
                    k.public = public.clone();
                }
            }
            s.renewing.remove(&public.key_id);
            let before: usize = s.pools.values().map(VecDeque::len).sum();
            s.pools.retain(|(k, _), _| *k != public.key_id);
            before - s.pools.values().map(VecDeque::len).sum::<usize>()
        };
        self.metrics.renewals.inc();
        tracing::info!(
            key = name,
            epoch = public.epoch,
            dropped_presignatures = dropped,
            "renewed key shares active on every node"
        );
        Ok(())
    }

    /// On a coordinator that does not lead the `key-lifecycle` job: forgets renewals
    /// this process started that are no longer pending in the store (the leader's
    /// [`Cluster::resume_activations`] finished them), dropping their pools, made from
    /// the old shares, so that the filler presigns for the new epoch. Returns how many.
    pub fn forget_finished_renewals(&self) -> Result<usize> {
        let pending: HashSet<KeyId> = self
            .store
            .pending_activations()?
            .into_iter()
            .map(|(_, _, p)| p.key_id)
            .collect();
        let mut s = self.state()?;
        let done: Vec<KeyId> = s
            .renewing
            .iter()
            .filter(|k| !pending.contains(k))
            .copied()
            .collect();
        for k in &done {
            s.renewing.remove(k);
            s.pools.retain(|(id, _), _| id != k);
        }
        drop(s);
        if !done.is_empty() {
            tracing::info!(
                keys = done.len(),
                "renewals finished by another coordinator: pools of the old shares dropped"
            );
            self.presig_drawn.notify_one();
        }
        Ok(done.len())
    }

    /// Finishes renewals that a previous run (or a failed call) decided but did not
    /// activate everywhere. Returns how many are still pending.
    pub async fn resume_activations(&self) -> Result<usize> {
        if self.store.pending_activations()?.is_empty() {
            return Ok(0);
        }
        // Not while a refresh or repair is running: it finishes its own activation.
        let _admin = self.admin.lock().await;
        let pending = self.store.pending_activations()?;
        let mut left = 0;
        for (name, session, public) in pending {
            let _gate = self.gate.write().await;
            match self.activate_on_nodes(session, &public).await {
                Ok(()) => self.commit_renewal(&name, &public)?,
                Err(e) => {
                    left += 1;
                    tracing::warn!(key = name, epoch = public.epoch, error = %e, "renewed shares not yet active everywhere; will retry");
                }
            }
        }
        Ok(left)
    }

    /// Proactive refresh (DESIGN.md §4.3): new shares of `name`'s current version by
    /// dealings of zero from every node; the public key, key id and JWKS entry stay,
    /// the epoch advances, and every old share is overwritten on its node. Needs every
    /// node. Pools of untouched keys keep signing meanwhile; this key's pools are
    /// dropped at activation and refill. Returns the version with its new epoch.
    ///
    /// Errors: no such key, a node unreachable ([`CoordError::Unavailable`]), a
    /// dealing that fails its checks (the culprit is named and excluded).
    pub async fn refresh_key(&self, name: &str) -> Result<KeyVersionInfo> {
        let out = self.refresh_key_inner(name).await;
        if out.is_err() {
            self.metrics.renewal_failures.inc();
        }
        out
    }

    async fn refresh_key_inner(&self, name: &str) -> Result<KeyVersionInfo> {
        let _admin = self.admin.lock().await;
        let current = self.current_version(name)?;
        let prior = current.public.clone();
        let (session, public) = self
            .dkg_rounds(
                prior.key_id,
                DkgMode::Refresh { prior },
                Some(&current.profile),
            )
            .await?;
        self.activate_renewal(name, session, &public).await?;
        self.current_version(name)
    }

    /// Repairs node `index` (one that lost its disk, or was replaced under the same
    /// index): every key's current version is reshared (DESIGN.md §4.3) by `t + 1`
    /// other nodes holding it to fresh shares for all `n` nodes, so `index` gets a
    /// share again and every other share is renewed. Needs every node up, `index`
    /// included. Returns `(key name, new epoch)` per key, in the order done.
    pub async fn repair_node(&self, index: u16) -> Result<Vec<(String, u32)>> {
        let out = self.repair_node_inner(index).await;
        if out.is_err() {
            self.metrics.renewal_failures.inc();
        }
        out
    }

    async fn repair_node_inner(&self, index: u16) -> Result<Vec<(String, u32)>> {
        let target = PartyIndex::new(index)
            .filter(|p| self.params.all_parties().contains(*p))
            .ok_or_else(|| {
                CoordError::Invalid(format!(
                    "node {index} is not a node of this cluster {}",
                    self.params.all_parties()
                ))
            })?;
        let _admin = self.admin.lock().await;
        self.reshare_keys(self.current_versions()?, Some(target))
            .await
    }

    /// Reshares each of `keys` (current versions) from `t_old + 1` of its holders that
    /// stay holders — never `exclude` — to fresh shares for every node of this
    /// coordinator's parameters, which may name other nodes, more or fewer, and
    /// another threshold than the key's. Holders that leave destroy their shares once
    /// the new ones are active ([`Cluster::retire_moved_shares`]). Caller holds the
    /// admin lock.
    async fn reshare_keys(
        &self,
        keys: Vec<KeyVersionInfo>,
        exclude: Option<PartyIndex>,
    ) -> Result<Vec<(String, u32)>> {
        let mut done = Vec::with_capacity(keys.len());
        for v in keys {
            let prior = v.public.clone();
            let mut candidates: Vec<PartyIndex> = prior
                .params
                .all_parties()
                .members()
                .iter()
                .copied()
                .filter(|p| Some(*p) != exclude && self.params.holds(*p))
                .collect();
            // Healthy nodes deal first.
            candidates.sort_by_key(|p| !self.usable(*p));
            candidates.truncate(prior.params.commitment_len());
            if candidates.len() != prior.params.commitment_len() {
                return Err(CoordError::Precondition(format!(
                    "key {}: resharing needs {} of its holders {} to stay in the cluster {} (besides a node being repaired) to deal, but only {} do",
                    v.name,
                    prior.params.commitment_len(),
                    prior.params.all_parties(),
                    self.params.all_parties(),
                    candidates.len()
                )));
            }
            let leaving: Vec<PartyIndex> = prior
                .params
                .all_parties()
                .members()
                .iter()
                .copied()
                .filter(|p| !self.params.holds(*p))
                .collect();
            let dealers = PartySet::new(candidates).map_err(crypto)?;
            tracing::info!(key = v.name, dealers = %dealers, from = %describe(&prior.params), to = %describe(&self.params), "resharing");
            let binding = quorate_crypto::hash::sha256(&v.profile.to_bytes());
            let run = self
                .dkg_run(
                    prior.key_id,
                    DkgMode::Reshare {
                        prior,
                        dealers,
                        binding,
                    },
                    Some(&v.profile),
                )
                .await?;
            if !leaving.is_empty() {
                let evidence = fragment::RetireKeyRequest {
                    start: Some(run.start.clone()),
                    confirms: run.confirms.clone(),
                };
                self.store.put_retirements(
                    &run.public.key_id,
                    &leaving,
                    &prost::Message::encode_to_vec(&evidence),
                )?;
            }
            self.activate_renewal(&v.name, run.session, &run.public)
                .await?;
            done.push((v.name.clone(), run.public.epoch));
        }
        Ok(done)
    }

    /// The current key versions whose shares are held with other parameters than this
    /// coordinator's (`--node` list and `--threshold`).
    pub fn keys_with_other_params(&self) -> Result<Vec<KeyVersionInfo>> {
        Ok(self
            .current_versions()?
            .into_iter()
            .filter(|v| v.public.params != self.params)
            .collect())
    }

    /// Sets the nodes leaving the cluster (`--retire`): index and, unless the node is
    /// gone, a channel to it. Once.
    pub fn set_retiring(&self, nodes: Vec<(PartyIndex, Option<Channel>)>) {
        let nodes = nodes
            .into_iter()
            .map(|(index, ch)| Retiring {
                index,
                client: ch.map(FragmentNodeClient::new),
            })
            .collect();
        let _ = self.retiring.set(nodes);
    }

    /// Holders of keys with other parameters that are not in this coordinator's node
    /// set and not named as leaving (`--retire`): `(key name, node)`.
    pub fn unaccounted_holders(&self) -> Result<Vec<(String, PartyIndex)>> {
        let retiring = self.retiring.get().map_or(&[][..], Vec::as_slice);
        let mut out = Vec::new();
        for v in self.keys_with_other_params()? {
            for p in v.public.params.all_parties().members() {
                if !self.params.holds(*p) && !retiring.iter().any(|r| r.index == *p) {
                    out.push((v.name.clone(), *p));
                }
            }
        }
        Ok(out)
    }

    /// Asks every node that a reshare moved a key away from to destroy its share
    /// (`RetireKey`: the node checks the new holders' signed confirmations first), for
    /// reshares whose new shares are active. A node named gone (`--retire INDEX`) is
    /// struck off; one not named, or unreachable, is asked again at the next start.
    /// Returns how many retirements are left.
    pub async fn retire_moved_shares(&self) -> Result<usize> {
        let retiring = self.retiring.get().map_or(&[][..], Vec::as_slice);
        let renewing = self.state()?.renewing.clone();
        let mut left = 0;
        for (key, node, evidence) in self.store.retirements()? {
            if renewing.contains(&key) {
                left += 1;
                continue;
            }
            let Some(r) = retiring.iter().find(|r| r.index == node) else {
                tracing::warn!(key = %key, node = node.get(), "node {node} still holds an old share of key {key}: give it with --retire {node}=HOST:PORT to have the share destroyed, or --retire {node} once its disk is destroyed");
                left += 1;
                continue;
            };
            let Some(client) = &r.client else {
                tracing::info!(key = %key, node = node.get(), "node {node} is gone (--retire {node}): no share to destroy");
                self.store.remove_retirement(&key, node)?;
                continue;
            };
            let req: fragment::RetireKeyRequest = prost::Message::decode(evidence.as_slice())
                .map_err(|e| {
                    CoordError::Internal(format!(
                        "retirement record of key {key} is malformed: {e}"
                    ))
                })?;
            let mut c = client.clone();
            let call = tokio::time::timeout(ONLINE_TIMEOUT, c.retire_key(req)).await;
            match call {
                Ok(Ok(reply)) => {
                    tracing::info!(key = %key, node = node.get(), destroyed = reply.get_ref().destroyed, "node {node} holds no share of key {key} any more");
                    self.store.remove_retirement(&key, node)?;
                }
                Ok(Err(e))
                    if !matches!(
                        e.code(),
                        tonic::Code::Unavailable | tonic::Code::DeadlineExceeded
                    ) =>
                {
                    left += 1;
                    tracing::warn!(key = %key, node = node.get(), error = %status_text(&e), "node {node} refused to destroy its old share of key {key}");
                }
                Ok(Err(_)) | Err(_) => {
                    left += 1;
                    tracing::warn!(key = %key, node = node.get(), "node {node} cannot be reached; its old share of key {key} is destroyed at a later start (--retire {node}=HOST:PORT)");
                }
            }
        }
        Ok(left)
    }

    /// Reshares every key held with other parameters to this coordinator's (DESIGN.md
    /// §4.3): nodes added, replaced or removed and the threshold changed, e.g. (3,1) →
    /// (5,2), or {1,2,3} → {1,3,4}. Every node of the new set and `t_old + 1` holders
    /// staying must be up; every holder leaving must be named with `--retire`
    /// ([`Cluster::unaccounted_holders`]). Returns `(key, new epoch)` per key reshared;
    /// leaving nodes then destroy their shares ([`Cluster::retire_moved_shares`]).
    pub async fn reshare_to_params(&self) -> Result<Vec<(String, u32)>> {
        let _admin = self.admin.lock().await;
        let missing = self.unaccounted_holders()?;
        if let Some((key, node)) = missing.first() {
            return Err(CoordError::Precondition(format!(
                "key {key} is held by node {node}, which is not given with --node: name it with --retire {node}=HOST:PORT (it destroys its share once the new holders hold theirs) or --retire {node} (it is gone)"
            )));
        }
        let keys = self.keys_with_other_params()?;
        let out = self.reshare_keys(keys, None).await;
        if out.is_err() {
            self.metrics.renewal_failures.inc();
        }
        out
    }

    /// Crash tests: arms a fail point (once).
    pub fn set_fail_point(&self, p: RenewalFailPoint) {
        let _ = self.fail_point.set(p);
    }

    /// Key `name` with every version, as held now.
    pub fn named(&self, name: &str) -> Result<crate::store::NamedKey> {
        self.state()?
            .keys
            .get(name)
            .cloned()
            .ok_or_else(|| no_such_key(name))
    }

    /// Reloads every named key from the store, which other coordinators sharing it may
    /// have changed (a new key, a rotation, a renewal): the store's view replaces this
    /// process's. Returns how many keys changed.
    pub fn reload_keys(&self) -> Result<usize> {
        let stored = self.store.keys()?;
        let mut s = self.state()?;
        let mut changed = 0;
        for k in stored {
            let same = s.keys.get(&k.name).is_some_and(|mine| {
                mine.versions.len() == k.versions.len()
                    && mine.versions.iter().zip(&k.versions).all(|(a, b)| {
                        a.version == b.version && a.public == b.public && a.profile == b.profile
                    })
            });
            if same {
                continue;
            }
            changed += 1;
            for v in &k.versions {
                s.names.insert(v.public.key_id, k.name.clone());
            }
            s.keys.insert(k.name.clone(), k);
        }
        Ok(changed)
    }

    /// How many renewals are decided but not yet active on every node.
    pub fn pending_activations(&self) -> u32 {
        // `renewing` mirrors the store's pending activations (loaded at start, added
        // with each record, removed with each commit): no store read per scrape.
        self.state()
            .map_or(0, |s| u32::try_from(s.renewing.len()).unwrap_or(u32::MAX))
    }

    /// The public data of key version `id` as the coordinator holds it now.
    fn public_of(&self, id: KeyId) -> Result<Option<KeyPublic>> {
        let s = self.state()?;
        Ok(s.names
            .get(&id)
            .and_then(|name| s.keys.get(name))
            .and_then(|k| k.versions.iter().find(|v| v.public.key_id == id))
            .map(|v| v.public.clone()))
    }

    /// When the shares of key version `id` were last renewed (Unix seconds).
    pub fn renewed_at(&self, id: &KeyId) -> Result<Option<i64>> {
        Ok(self.store.renewed_at(id)?)
    }

    /// Relays the previous round's messages to `members` and returns their replies.
    async fn relay<F, Fut>(
        &self,
        members: &[PartyIndex],
        session: SessionId,
        msgs: Vec<fragment::RoundMessage>,
        what: &str,
        call: F,
    ) -> Result<Vec<fragment::RoundMessage>>
    where
        F: Fn(FragmentNodeClient<Channel>, fragment::RoundInput) -> Fut,
        Fut: std::future::Future<
                Output = Result<tonic::Response<fragment::RoundMessage>, tonic::Status>,
            > + Send
            + 'static,
    {
        let messages: Vec<Vec<u8>> = msgs.into_iter().map(|m| m.message).collect();
        self.record_relay(&messages);
        let input = fragment::RoundInput {
            session_id: session.0.to_vec(),
            messages,
        };
        self.round(members, what, |c| call(c, input.clone())).await
    }

    /// The signing sets the pools serve: `S_k = {k, …, k+t}` (cyclically), each with the
    /// multiplication set `M_k = {k, …, k+2t}`, so that any single node outage leaves
    /// sets whose pools keep signing.
    pub fn sets(&self) -> Vec<(PartySet, PartySet)> {
        let holders = self.params.all_parties();
        let m = holders.members();
        let n = m.len();
        let t = usize::from(self.params.t());
        (0..n)
            .filter_map(|k| {
                let pick = |len: usize| {
                    PartySet::new(
                        (0..len)
                            .filter_map(|j| m.get((k + j) % n).copied())
                            .collect(),
                    )
                    .ok()
                };
                Some((pick(2 * t + 1)?, pick(t + 1)?))
            })
            .collect()
    }

    /// Makes a batch of presignatures for `key` on `(mset, sset)` and pools them.
    pub async fn presign(
        &self,
        key: &KeyPublic,
        mset: &PartySet,
        sset: &PartySet,
        batch: u32,
    ) -> Result<usize> {
        let _gate = self.gate.read().await;
        // The key data as of now: a renewal may have become active since `key` was read.
        let key = &self.public_of(key.key_id)?.unwrap_or_else(|| key.clone());
        let (roster, verified) = self.roster_for(mset.members()).await?;
        let mut r = rng()?;
        let session = SessionId::random(&mut r);
        let cfg = PresignConfig {
            session,
            key: key.clone(),
            mset: mset.clone(),
            sset: sset.clone(),
            batch,
            roster: verified,
        };
        cfg.check().map_err(crypto)?;
        let members = mset.members().to_vec();
        let start = fragment::PresignStart {
            session_id: session.0.to_vec(),
            key_id: key.key_id.0.to_vec(),
            multiplication_set: members.iter().map(|p| u32::from(p.get())).collect(),
            signing_set: sset.members().iter().map(|p| u32::from(p.get())).collect(),
            batch,
            roster: Some(roster),
            key_epoch: key.epoch,
            coordinator_instance: self.instance().to_owned(),
        };
        let commits = self
            .round(&members, "presign commit", |mut c| {
                let s = start.clone();
                async move { c.presign_commit(s).await }
            })
            .await?;
        let commit_msgs = decode_all::<presign::PresignCommit>(&commits)?;
        let dealings = self
            .relay(
                &members,
                session,
                commits,
                "presign deal",
                |mut c, i| async move { c.presign_deal(i).await },
            )
            .await?;
        let dealing_msgs = decode_all::<presign::PresignDealing>(&dealings)?;
        // The coordinator's checks are whole-batch multi-scalar multiplications: they run
        // on the blocking pool, so that signing requests keep their async workers.
        let (cfg, agg) = blocking(move || {
            let agg = presign::aggregate(&cfg, &commit_msgs, &dealing_msgs).map_err(crypto)?;
            Ok((cfg, agg))
        })
        .await?;
        let mus = self
            .relay(
                &members,
                session,
                dealings,
                "presign μ",
                |mut c, i| async move { c.presign_mu(i).await },
            )
            .await?;
        let mu_msgs = decode_all::<presign::PresignMu>(&mus)?;
        let (cfg, agg, mu_msgs, mut r) = blocking(move || {
            let checked = presign::verify_mus(&mut r, &cfg, &agg, &mu_msgs);
            Ok((checked, (cfg, agg, mu_msgs, r)))
        })
        .await
        .and_then(|(checked, state)| checked.map(|()| state).map_err(|e| self.blame(e)))?;
        let reductions = self
            .relay(
                &members,
                session,
                mus,
                "presign reduce",
                |mut c, i| async move { c.presign_reduce(i).await },
            )
            .await?;
        let red_msgs = decode_all::<presign::PresignReduction>(&reductions)?;
        let public = blocking(move || {
            Ok(presign::public_output(
                &mut r, &cfg, &agg, &mu_msgs, &red_msgs,
            ))
        })
        .await?
        .map_err(|e| self.blame(e))?;
        let messages: Vec<Vec<u8>> = reductions.into_iter().map(|m| m.message).collect();
        self.record_relay(&messages);
        let input = fragment::RoundInput {
            session_id: session.0.to_vec(),
            messages,
        };
        let acks = self
            .round(&members, "presign store", |mut c| {
                let i = input.clone();
                async move { c.presign_store(i).await }
            })
            .await?;
        let stored: u32 = acks.iter().map(|a| a.stored).sum();
        let expected = batch.saturating_mul(u32::try_from(sset.len()).unwrap_or(u32::MAX));
        if stored != expected {
            return Err(CoordError::Internal(format!(
                "signing set stored {stored} presignature shares, expected {expected}"
            )));
        }
        let n = public.len();
        self.metrics.presignatures_made.add(n as u64);
        let mut s = self.state()?;
        // No renewal can have become active meanwhile: this session holds the gate.
        s.pools
            .entry((key.key_id, sset.clone()))
            .or_default()
            .extend(public);
        drop(s);
        self.presigs_added.notify_waiters();
        Ok(n)
    }

    /// Excludes the culprits of `e` from new work and converts the error.
    fn blame(&self, e: CryptoError) -> CoordError {
        if !e.culprits().is_empty()
            && let Ok(mut s) = self.state()
        {
            for c in e.culprits() {
                tracing::warn!(node = c.get(), error = %e, "excluding misbehaving node");
                s.culprits.insert(*c);
            }
        }
        crypto(e)
    }

    /// The current version of a named key.
    pub fn key(&self, name: &str) -> Result<KeyPublic> {
        self.state()?
            .keys
            .get(name)
            .map(|k| k.public.clone())
            .ok_or_else(|| no_such_key(name))
    }

    /// Every named key (current versions), by name.
    pub fn keys(&self) -> Result<Vec<(String, KeyPublic)>> {
        let mut v: Vec<_> = self
            .state()?
            .keys
            .iter()
            .map(|(n, k)| (n.clone(), k.public.clone()))
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(v)
    }

    /// The current version of a named key, with its version number and rules.
    pub fn current_version(&self, name: &str) -> Result<KeyVersionInfo> {
        let s = self.state()?;
        s.keys
            .get(name)
            .and_then(|k| k.versions.last())
            .map(|v| KeyVersionInfo::of(name, v))
            .ok_or_else(|| no_such_key(name))
    }

    /// Every named key's current version, by name.
    pub fn current_versions(&self) -> Result<Vec<KeyVersionInfo>> {
        let s = self.state()?;
        let mut out: Vec<_> = s
            .keys
            .iter()
            .filter_map(|(n, k)| k.versions.last().map(|v| KeyVersionInfo::of(n, v)))
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// Every version of a named key, oldest first.
    pub fn key_versions(&self, name: &str) -> Result<Vec<KeyVersionInfo>> {
        let s = self.state()?;
        let k = s.keys.get(name).ok_or_else(|| no_such_key(name))?;
        Ok(k.versions
            .iter()
            .map(|v| KeyVersionInfo::of(name, v))
            .collect())
    }

    /// The key that signs for `name` now, for building a JWS header (its `kid` is
    /// `key_id.to_string()`) before calling [`Cluster::sign_jws`].
    pub fn current_signing_key(&self, name: &str) -> Result<KeyPublic> {
        let key = self.key(name)?;
        key.purpose.require(KeyPurpose::Sign).map_err(crypto)?;
        Ok(key)
    }

    /// The token-key versions a verifier must know at `now` (unix seconds), by name and
    /// newest version first — what the issuer JWKS publishes, and nothing else (DESIGN.md
    /// invariant 7): every current token key, and every retired one whose tokens may
    /// still be valid (retired less than its rules' maximum token lifetime plus the
    /// clock skew the nodes allow ago).
    pub fn jwks_keys(&self, now: i64) -> Result<Vec<KeyVersionInfo>> {
        self.published(|v| {
            let KeyProfile::Token(rules) = &v.profile else {
                return false;
            };
            v.version.retired_at.is_none_or(|retired| {
                now < retired
                    .saturating_add(i64::from(rules.max_ttl_seconds()))
                    .saturating_add(CLOCK_SKEW_SECONDS)
            })
        })
    }

    /// Every version of every checkpoint key, by name and newest version first: what the
    /// checkpoint JWKS publishes. Retired versions stay, so old checkpoints verify.
    pub fn checkpoint_jwks_keys(&self) -> Result<Vec<KeyVersionInfo>> {
        self.published(|v| v.profile == KeyProfile::Checkpoint)
    }

    fn published(&self, keep: impl Fn(&StoredVersion) -> bool) -> Result<Vec<KeyVersionInfo>> {
        let s = self.state()?;
        let mut out: Vec<_> = s
            .keys
            .iter()
            .flat_map(|(name, k)| {
                k.versions
                    .iter()
                    .filter(|v| keep(v))
                    .map(|v| KeyVersionInfo::of(name, v))
            })
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name).then(b.version.cmp(&a.version)));
        Ok(out)
    }

    /// Narrows every version of the raw key `name` to the checkpoint profile: every node
    /// first (each refuses anything but raw → checkpoint), then this store. How a store
    /// written before profiles gets its audit key back under the checkpoint profile.
    /// A no-op for a key that is already a checkpoint key.
    pub async fn narrow_to_checkpoint(&self, name: &str) -> Result<()> {
        let done = |v: &[KeyVersionInfo]| v.iter().all(|v| v.profile == KeyProfile::Checkpoint);
        if done(&self.key_versions(name)?) {
            return Ok(());
        }
        let _admin = self.admin.lock().await;
        let versions = self.key_versions(name)?;
        if done(&versions) {
            return Ok(());
        }
        if let Some(v) = versions
            .iter()
            .find(|v| !v.profile.may_narrow_to(&KeyProfile::Checkpoint))
        {
            return Err(CoordError::Precondition(format!(
                "key {name} has the {} profile and cannot serve as the audit checkpoint key; \
                 name another --audit-key",
                v.profile.name()
            )));
        }
        let all: Vec<PartyIndex> = self.params.all_parties().members().to_vec();
        let ids: Vec<KeyId> = versions.iter().map(|v| v.public.key_id).collect();
        for id in &ids {
            let req = fragment::NarrowProfileRequest {
                key_id: id.0.to_vec(),
                profile: fragment::KeyProfile::Checkpoint as i32,
            };
            self.round(&all, "narrow key profile", |mut c| {
                let r = req.clone();
                async move { c.narrow_profile(r).await }
            })
            .await?;
        }
        self.store.put_profile(&ids, &KeyProfile::Checkpoint)?;
        let mut s = self.state()?;
        if let Some(k) = s.keys.get_mut(name) {
            for v in &mut k.versions {
                v.profile = KeyProfile::Checkpoint;
            }
        }
        tracing::info!(key = name, "key narrowed to the checkpoint profile");
        Ok(())
    }

    /// Pool depths: `(key name, signing set, depth)`.
    /// The pooled presignatures of key `key_id`, every pool (public data only).
    pub fn pooled(&self, key_id: KeyId) -> Result<Vec<PresignaturePublic>> {
        let s = self.state()?;
        Ok(s.pools
            .iter()
            .filter(|((k, _), _)| *k == key_id)
            .flat_map(|(_, q)| q.iter().cloned())
            .collect())
    }

    /// Pool depths by key name and signing set.
    pub fn pool_depths(&self) -> Result<Vec<(String, PartySet, usize)>> {
        let s = self.state()?;
        let mut out = Vec::new();
        for (name, key) in &s.keys {
            let key = &key.public;
            if key.purpose != KeyPurpose::Sign {
                continue;
            }
            for (_, sset) in self.sets() {
                let d = s
                    .pools
                    .get(&(key.key_id, sset.clone()))
                    .map_or(0, VecDeque::len);
                out.push((name.clone(), sset, d));
            }
        }
        out.sort_by(|a, b| a.0.cmp(&b.0).then(a.1.members().cmp(b.1.members())));
        Ok(out)
    }

    /// Resolves when a presignature has been taken from a pool (for the filler).
    pub(crate) async fn pool_drawn(&self) {
        self.presig_drawn.notified().await;
    }

    /// Takes a presignature of `key` (see [`Cluster::try_take_presig`]); if none is
    /// pooled, waits up to [`PRESIG_WAIT`] for the filler to make one, so a burst above
    /// the presigning rate queues instead of failing.
    async fn take_presig(&self, key: KeyId) -> Result<PresignaturePublic> {
        let deadline = tokio::time::Instant::now() + PRESIG_WAIT;
        loop {
            let added = self.presigs_added.notified();
            tokio::pin!(added);
            added.as_mut().enable();
            match self.try_take_presig(key) {
                Ok(presig) => {
                    self.presig_drawn.notify_one();
                    return Ok(presig);
                }
                Err(CoordError::Unavailable(why)) => {
                    self.presig_drawn.notify_one();
                    if tokio::time::timeout_at(deadline, added).await.is_err() {
                        return Err(CoordError::Unavailable(why));
                    }
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Takes a presignature of `key` whose signing set is entirely usable out of its
    /// in-memory pool, preferring the deepest pool.
    fn try_take_presig(&self, key: KeyId) -> Result<PresignaturePublic> {
        let presig = {
            let mut s = self.state()?;
            let usable = |p: PartyIndex, s: &State| s.usable(p);
            let best = s
                .pools
                .iter()
                .filter(|((k, set), q)| {
                    *k == key && !q.is_empty() && set.members().iter().all(|p| usable(*p, &s))
                })
                .max_by_key(|(_, q)| q.len())
                .map(|(k, _)| k.clone());
            let Some(pool) = best else {
                return Err(CoordError::Unavailable(
                    "no presignature available for a fully healthy signing set: pools are empty or nodes are down; retry shortly".into(),
                ));
            };
            s.pools
                .get_mut(&pool)
                .and_then(VecDeque::pop_front)
                .ok_or_else(|| CoordError::Internal("pool emptied concurrently".into()))?
        };
        Ok(presig)
    }

    /// Puts back a presignature that every node of its signing set refused before
    /// touching it (a token-rules refusal), so a bad token does not waste it. Only into
    /// a current version's pool.
    fn return_presig(&self, presig: PresignaturePublic) {
        let current = self
            .state()
            .map(|s| s.keys.values().any(|k| k.public.key_id == presig.key_id))
            .unwrap_or(false);
        if !current {
            return;
        }
        if let Ok(mut s) = self.state() {
            s.pools
                .entry((presig.key_id, presig.sset.clone()))
                .or_default()
                .push_front(presig);
        }
    }

    /// Signs a SHA-256 digest with the named key: one round to the `t + 1` nodes of a
    /// pooled presignature; verifies the result; on failure names the culprit, excludes
    /// it and retries with another presignature. A token-signing key refuses: it signs
    /// only through [`Cluster::sign_jws`].
    pub async fn sign(&self, name: &str, digest: [u8; 32]) -> Result<(Signature, Vec<u16>)> {
        let current = self.current_version(name)?;
        current
            .public
            .purpose
            .require(KeyPurpose::Sign)
            .map_err(crypto)?;
        if current.profile.signs_jws_only() {
            return Err(CoordError::Refused(format!(
                "key {name} has the {} profile: its fragment nodes sign only {}, not raw \
                 messages or digests; use a key of the raw profile",
                current.profile,
                if matches!(current.profile, KeyProfile::Checkpoint) {
                    "the coordinator's audit checkpoints"
                } else {
                    "JWS tokens issued by the identity service"
                }
            )));
        }
        self.sign_attempts(&current.public, digest, &[], None).await
    }

    /// Signs a JWS compact signing input `BASE64URL(header).BASE64URL(payload)` (ES256:
    /// the digest is its SHA-256) with the current version of `name`, which must be
    /// `expected` — the key whose `kid` the caller put in the header, from
    /// [`Cluster::current_signing_key`]. If the key was rotated in between, fails with
    /// [`CoordError::Rotated`]: rebuild the header and call again. The signing input
    /// travels to every node of the signing set; for a token-signing key each node checks
    /// it against the key's rules, and a refusal is final ([`CoordError::Refused`], with
    /// the nodes' reasons). Returns the signature, the key that made it and the nodes
    /// that signed.
    pub async fn sign_jws(
        &self,
        name: &str,
        expected: KeyId,
        signing_input: &[u8],
        evidence: Option<&fragment::TokenEvidence>,
    ) -> Result<(Signature, KeyPublic, Vec<u16>)> {
        let current = self.current_version(name)?;
        current
            .public
            .purpose
            .require(KeyPurpose::Sign)
            .map_err(crypto)?;
        if current.public.key_id != expected {
            return Err(CoordError::Rotated(format!(
                "key {name} was rotated: its current version {} has kid {}, not {expected}; \
                 build the token header with the new kid and sign again",
                current.version,
                current.kid()
            )));
        }
        if signing_input.is_empty() || signing_input.len() > MAX_SIGNING_INPUT {
            return Err(CoordError::Invalid(format!(
                "a JWS signing input has 1 to {MAX_SIGNING_INPUT} bytes, got {}",
                signing_input.len()
            )));
        }
        let digest = quorate_crypto::hash::sha256(signing_input);
        let (sig, nodes) = self
            .sign_attempts(&current.public, digest, signing_input, evidence)
            .await?;
        Ok((sig, current.public, nodes))
    }

    /// Up to three attempts, each with another presignature; a usage-rules refusal ends
    /// them at once. Returns the signature and the signing set.
    async fn sign_attempts(
        &self,
        key: &KeyPublic,
        digest: [u8; 32],
        signing_input: &[u8],
        evidence: Option<&fragment::TokenEvidence>,
    ) -> Result<(Signature, Vec<u16>)> {
        let mut last = None;
        for _attempt in 0..3 {
            let presig = self.take_presig(key.key_id).await?;
            // Nothing is written: what keeps a presignature to one message is each
            // node's in-memory consumed record, set before it releases a share.
            let signed = self
                .sign_with(key, &presig, digest, signing_input, evidence)
                .await;
            match signed {
                Ok(sig) => {
                    self.metrics.signatures.inc();
                    let nodes = presig.sset.members().iter().map(|p| p.get()).collect();
                    return Ok((sig, nodes));
                }
                Err(e @ CoordError::Refused(_)) => {
                    self.metrics.sign_attempt_failures.inc();
                    self.return_presig(presig);
                    return Err(e);
                }
                Err(e) => {
                    self.metrics.sign_attempt_failures.inc();
                    tracing::warn!(error = %e, "signing attempt failed; retrying with another presignature");
                    last = Some(e);
                }
            }
        }
        Err(last.unwrap_or_else(|| CoordError::Internal("signing failed".into())))
    }

    /// One signing attempt. If every node of the set refused by the key's usage rules,
    /// the error is [`CoordError::Refused`] (and no node consumed the presignature); a
    /// mix of rules refusals and other outcomes is a failed attempt like any other, so
    /// one node cannot end signing by claiming a refusal that the others do not share.
    async fn sign_with(
        &self,
        key: &KeyPublic,
        presig: &PresignaturePublic,
        digest: [u8; 32],
        signing_input: &[u8],
        evidence: Option<&fragment::TokenEvidence>,
    ) -> Result<Signature> {
        let req = SignRequest {
            key_id: key.key_id,
            presig_id: presig.id,
            sset: presig.sset.clone(),
            digest,
        }
        .to_bytes();
        if let Some(ev) = evidence {
            for &j in presig.sset.members() {
                self.ensure_policy(j, &ev.policy_bundle).await?;
            }
        }
        let sent = Instant::now();
        let mut waits = Vec::new();
        for &j in presig.sset.members() {
            let (tx, rx) = oneshot::channel();
            self.node(j)?
                .signer
                .send(SignJob {
                    request: req.clone(),
                    signing_input: signing_input.to_vec(),
                    evidence: evidence.cloned(),
                    reply: tx,
                })
                .await
                .map_err(|_| CoordError::Internal("signing queue closed".into()))?;
            waits.push((j, rx));
        }
        let mut shares = Vec::new();
        let mut failures = Vec::new();
        // Rules refusals: (reason, nodes giving it).
        let mut by_rules: Vec<(String, Vec<PartyIndex>)> = Vec::new();
        for (j, rx) in waits {
            match self.await_node(j, sent, rx).await.ok_or(()) {
                Ok(Ok(Ok(share))) => shares.push(share),
                Ok(Ok(Err(why))) => {
                    if why.starts_with("unavailable") {
                        self.mark_down(j);
                    }
                    if why.contains("unknown presignature") {
                        self.drop_pools_of(j);
                    }
                    if why.contains(STORE_FAULT)
                        && let Ok(mut s) = self.state()
                    {
                        // Its store failed on this request: the retry takes a set
                        // without it rather than wait for the heartbeat to notice.
                        note_store_fault(&mut s, j, &why);
                    }
                    if why.contains(BUNDLE_MISMATCH) {
                        // The node holds another bundle (a restored disk, a newer one
                        // applied elsewhere): give it ours again on the next attempt.
                        self.installed().remove(&j);
                        failures.push(format!("node {j}: {why}"));
                        continue;
                    }
                    if let Some(reason) = why
                        .strip_prefix("refused: ")
                        .filter(|r| r.starts_with(REFUSAL_PREFIX))
                    {
                        match by_rules.iter_mut().find(|(r, _)| r == reason) {
                            Some((_, nodes)) => nodes.push(j),
                            None => by_rules.push((reason.to_string(), vec![j])),
                        }
                    }
                    failures.push(format!("node {j}: {why}"));
                }
                _ => {
                    self.mark_down(j);
                    failures.push(format!("node {j}: no answer"));
                }
            }
        }
        let refusals: usize = by_rules.iter().map(|(_, n)| n.len()).sum();
        if refusals > 0 && refusals == presig.sset.len() {
            let reasons: Vec<String> = by_rules
                .iter()
                .map(|(reason, nodes)| {
                    let nodes: Vec<String> = nodes.iter().map(|n| format!("node {n}")).collect();
                    format!("{reason} ({})", nodes.join(", "))
                })
                .collect();
            return Err(CoordError::Refused(format!(
                "the fragment nodes refused to sign: {}",
                reasons.join("; ")
            )));
        }
        if !failures.is_empty() {
            return Err(CoordError::Unavailable(format!(
                "signing failed: {}",
                failures.join("; ")
            )));
        }
        let mut r = rng()?;
        sign::combine(&mut r, key, presig, &digest, &shares).map_err(|e| self.blame(e))
    }

    /// Threshold DH for derivation or decryption over `t + 1` usable nodes, retrying
    /// once with another quorum if a node fails or misbehaves. Returns the masked
    /// response and the quorum that answered.
    pub async fn dh(
        &self,
        name: &str,
        input: tdh::DhInput,
        requester: quorate_crypto::Point,
        evidence: Option<fragment::CredentialEvidence>,
    ) -> Result<(DhResponse, Vec<u16>)> {
        let key = self.key(name)?;
        let needed = match input {
            tdh::DhInput::Derive { .. } => KeyPurpose::Derive,
            tdh::DhInput::Decrypt { .. } => KeyPurpose::Decrypt,
        };
        key.purpose.require(needed).map_err(crypto)?;
        let req = DhRequest {
            key_id: key.key_id,
            input,
            requester,
        };
        req.input.point().map_err(crypto)?;
        let mut last = None;
        for _ in 0..2 {
            let quorum: Vec<PartyIndex> = self
                .params
                .all_parties()
                .members()
                .iter()
                .copied()
                .filter(|p| self.usable(*p))
                .take(usize::from(self.params.t()) + 1)
                .collect();
            if quorum.len() <= usize::from(self.params.t()) {
                return Err(CoordError::Unavailable(format!(
                    "only {} healthy nodes; a quorum needs {}",
                    quorum.len(),
                    self.params.t() + 1
                )));
            }
            if let Some(ev) = &evidence {
                for &j in &quorum {
                    self.ensure_policy(j, &ev.policy_bundle).await?;
                }
            }
            let call = fragment::DhCall {
                request: req.to_bytes(),
                evidence: evidence.clone(),
            };
            self.record_relay(std::slice::from_ref(&call.request));
            let res = self
                .round(&quorum, "threshold DH", |mut c| {
                    let call = call.clone();
                    async move { c.threshold_dh(call).await }
                })
                .await;
            let replies = match res {
                Ok(r) => r,
                Err(e @ CoordError::Unavailable(_)) => {
                    last = Some(e);
                    continue;
                }
                Err(e) => return Err(e),
            };
            let partials = replies
                .iter()
                .map(|r| tdh::DhPartial::from_bytes(&r.partial).map_err(crypto))
                .collect::<Result<Vec<_>>>()?;
            self.record_relay(
                &replies
                    .iter()
                    .map(|r| r.partial.clone())
                    .collect::<Vec<_>>(),
            );
            let nodes: Vec<u16> = quorum.iter().map(|p| p.get()).collect();
            let set = PartySet::new(quorum).map_err(crypto)?;
            let mut r = rng()?;
            match tdh::combine(&mut r, &key, &req, &set, &partials) {
                Ok(resp) => {
                    self.metrics.dh_responses.inc();
                    self.record_relay(&[resp.to_bytes()]);
                    return Ok((resp, nodes));
                }
                Err(e) => last = Some(self.blame(e)),
            }
        }
        Err(last.unwrap_or_else(|| CoordError::Internal("threshold DH failed".into())))
    }

    /// Node health for `Status`: a quick Inventory call to each node.
    pub async fn node_views(&self) -> Vec<NodeView> {
        let mut out = Vec::new();
        for n in &self.nodes {
            let mut c = n.client.clone();
            let res = tokio::time::timeout(
                Duration::from_secs(2),
                c.inventory(fragment::InventoryRequest {}),
            )
            .await;
            let (healthy, error, version) = match res {
                Ok(Ok(r)) => {
                    let r = r.into_inner();
                    let excluded = self
                        .state()
                        .map(|s| s.culprits.contains(&n.index))
                        .unwrap_or(false);
                    if excluded {
                        (false, "excluded after misbehaving".to_string(), r.version)
                    } else if !r.store_error.is_empty() {
                        (
                            false,
                            format!("store failing: {}", r.store_error),
                            r.version,
                        )
                    } else {
                        (true, String::new(), r.version)
                    }
                }
                Ok(Err(s)) => (false, status_text(&s), String::new()),
                Err(_) => (false, "timed out".into(), String::new()),
            };
            out.push(NodeView {
                index: n.index.get(),
                addr: n.addr,
                healthy,
                error,
                version,
            });
        }
        out
    }

    /// Keys that need presignatures: `(key, mset, sset, depth)`.
    pub(crate) fn pool_needs(&self) -> Result<Vec<(KeyPublic, PartySet, PartySet, usize)>> {
        let s = self.state()?;
        let mut out = Vec::new();
        // Current versions only: a retired version's pools are dropped at rotation.
        for key in s
            .keys
            .values()
            .map(|k| &k.public)
            .filter(|k| k.purpose == KeyPurpose::Sign && !s.renewing.contains(&k.key_id))
        {
            for (mset, sset) in self.sets() {
                let d = s
                    .pools
                    .get(&(key.key_id, sset.clone()))
                    .map_or(0, VecDeque::len);
                out.push((key.clone(), mset, sset, d));
            }
        }
        Ok(out)
    }
}

/// Runs CPU-heavy protocol work on tokio's blocking pool.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| CoordError::Internal(format!("a protocol task failed: {e}")))?
}

fn no_such_key(name: &str) -> CoordError {
    CoordError::NotFound(format!(
        "no key named {name}: create it with `quorate key create {name}`"
    ))
}

/// A fresh random key id.
fn fresh_key_id() -> Result<KeyId> {
    let mut id = [0u8; 16];
    rand::Rng::fill_bytes(&mut rng()?, &mut id);
    Ok(KeyId(id))
}

fn decode_all<T: Wire>(msgs: &[fragment::RoundMessage]) -> Result<Vec<T>> {
    msgs.iter()
        .map(|m| T::from_bytes(&m.message).map_err(crypto))
        .collect()
}

/// Drains a node's sign queue: whatever is waiting goes out in one `Sign` RPC, and each
/// caller gets its own result.
async fn sign_batcher(mut client: FragmentNodeClient<Channel>, mut rx: mpsc::Receiver<SignJob>) {
    while let Some(first) = rx.recv().await {
        let mut jobs = vec![first];
        while jobs.len() < MAX_SIGN_BATCH {
            match rx.try_recv() {
                Ok(j) => jobs.push(j),
                Err(_) => break,
            }
        }
        // Signing inputs go along, parallel to the requests, when any job has one.
        let signing_inputs = if jobs.iter().any(|j| !j.signing_input.is_empty()) {
            jobs.iter().map(|j| j.signing_input.clone()).collect()
        } else {
            Vec::new()
        };
        // Evidence likewise (a job without any gets an empty message, which a node that
        // checks evidence refuses for a token key).
        let evidence = if jobs.iter().any(|j| j.evidence.is_some()) {
            jobs.iter()
                .map(|j| j.evidence.clone().unwrap_or_default())
                .collect()
        } else {
            Vec::new()
        };
        let batch = fragment::SignBatch {
            requests: jobs.iter().map(|j| j.request.clone()).collect(),
            signing_inputs,
            evidence,
        };
        let res = tokio::time::timeout(ONLINE_TIMEOUT, client.sign(batch)).await;
        match res {
            Ok(Ok(reply)) => {
                let results = reply.into_inner().results;
                let mut results = results.into_iter();
                for job in jobs {
                    let r = match results.next().and_then(|r| r.result) {
                        Some(fragment::sign_result::Result::Share(b)) => {
                            SignatureShare::from_bytes(&b)
                                .map_err(|e| format!("malformed share: {e}"))
                        }
                        Some(fragment::sign_result::Result::Refused(why)) => {
                            Err(format!("refused: {why}"))
                        }
                        None => Err("missing result".into()),
                    };
                    let _ = job.reply.send(r);
                }
            }
            Ok(Err(s)) => {
                let why = if matches!(s.code(), tonic::Code::Unavailable) {
                    format!("unavailable: {}", s.message())
                } else {
                    status_text(&s)
                };
                for job in jobs {
                    let _ = job.reply.send(Err(why.clone()));
                }
            }
            Err(_) => {
                for job in jobs {
                    let _ = job.reply.send(Err("unavailable: timed out".into()));
                }
            }
        }
    }
}
