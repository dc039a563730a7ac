//! The coordinator's configuration: flags and environment, all checked before anything
//! binds (STYLE.md §5).

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Parser;
use quorate_crypto::params::{PartyIndex, PartySet, ThresholdParams};

use crate::pools::Watermarks;

/// Command line of `quorate-coordinator`.
#[derive(Debug, Parser)]
#[command(
    name = "quorate-coordinator",
    version,
    about = "Quorate coordinator: drives the fragment nodes and serves the key API over post-quantum mTLS",
    subcommand_negates_reqs = true,
    args_conflicts_with_subcommands = true
)]
pub struct Args {
    /// Instead of serving: a maintenance command.
    #[command(subcommand)]
    pub command: Option<Command>,
    /// Where the coordinator's state lives: `redb` (files in `--data-dir`, one
    /// coordinator) or a PostgreSQL URL (`postgres://USER@localhost/DB`, or
    /// `postgres:///DB?host=/run/postgresql` for a Unix socket) that any number of
    /// coordinators share; run `migrate` on it first.
    // hide_env_values: `--help` must not print a URL that may hold a password.
    #[arg(
        long,
        env = "QUORATE_COORDINATOR_STORE",
        hide_env_values = true,
        default_value = "redb"
    )]
    pub store: String,
    /// Address of the public API (port 0 picks a free port; the chosen address is printed).
    #[arg(
        long,
        env = "QUORATE_COORDINATOR_LISTEN",
        default_value = "127.0.0.1:7100"
    )]
    pub listen: SocketAddr,
    /// Directory for the coordinator's redb store (public data only); required with
    /// `--store redb`.
    #[arg(long, env = "QUORATE_COORDINATOR_DATA")]
    pub data_dir: Option<PathBuf>,
    /// The coordinator's certificate (PEM, role coordinator).
    #[arg(long, env = "QUORATE_COORDINATOR_CERT", required = true)]
    pub cert: Option<PathBuf>,
    /// The coordinator's private key (PEM).
    #[arg(long, env = "QUORATE_COORDINATOR_KEY", required = true)]
    pub key: Option<PathBuf>,
    /// The cluster CA certificate (PEM).
    #[arg(long, env = "QUORATE_COORDINATOR_CA", required = true)]
    pub ca: Option<PathBuf>,
    /// Trust domain of the cluster's SPIFFE IDs.
    #[arg(long, env = "QUORATE_DOMAIN", default_value = "quorate.local")]
    pub domain: String,
    /// A fragment node, `INDEX=HOST:PORT`; give one per node, each index once. The
    /// indices are the nodes' identities (`spiffe://<domain>/node/<INDEX>`): usually
    /// 1..=n, any set after a node was replaced (e.g. 1, 3, 4 once node 4 took node 2's
    /// place with `--reshare --retire 2=HOST:PORT`).
    #[arg(
        long = "node",
        env = "QUORATE_COORDINATOR_NODES",
        value_delimiter = ',',
        required = true
    )]
    pub nodes: Vec<String>,
    /// Corruption threshold t (n >= 2t + 1).
    #[arg(long, env = "QUORATE_THRESHOLD", default_value_t = 1)]
    pub threshold: u16,
    /// Refill a presignature pool below this depth.
    #[arg(long, default_value_t = 16)]
    pub pool_low: usize,
    /// Refill pools up to this depth.
    #[arg(long, default_value_t = 64)]
    pub pool_high: usize,
    /// Most presignatures per batch.
    #[arg(long, default_value_t = 32)]
    pub presign_batch: u32,
    /// Most presigning sessions at once (pipelined rounds keep every core busy).
    #[arg(long, default_value_t = 2)]
    pub presign_parallel: usize,
    /// Seconds to let in-flight requests finish after SIGTERM/SIGINT.
    #[arg(long, default_value_t = 10)]
    pub grace_secs: u64,
    /// Serve Prometheus metrics (plain HTTP `GET /metrics`) on this address.
    #[arg(long, env = "QUORATE_COORDINATOR_METRICS")]
    pub metrics_listen: Option<SocketAddr>,
    /// Testing: append every relayed round message to this file.
    #[arg(long, hide = true)]
    pub record_relay: Option<PathBuf>,
    /// Crash tests: exit at a named point of a key renewal
    /// (`renewal-after-record`, `renewal-after-one-node`).
    #[arg(long, hide = true)]
    pub fail_point: Option<String>,
    /// Log format: `plain` or `json` (filter from QUORATE_LOG).
    #[arg(long, env = "QUORATE_LOG_FORMAT", default_value = "plain")]
    pub log_format: String,
    /// Address of the HTTPS metadata listener: discovery, JWKS, introspection,
    /// revocation (port 0 picks a free port).
    #[arg(long, env = "QUORATE_HTTP_LISTEN", default_value = "127.0.0.1:7443")]
    pub http_listen: SocketAddr,
    /// Certificate of the metadata listener (PEM). Default: `metadata.pem` beside `--ca`.
    #[arg(long, env = "QUORATE_HTTP_CERT")]
    pub http_cert: Option<PathBuf>,
    /// Private key of the metadata listener (PEM). Default: `metadata-key.pem` beside `--ca`.
    #[arg(long, env = "QUORATE_HTTP_KEY")]
    pub http_key: Option<PathBuf>,
    /// The issuer URL put in every token and served by discovery. Default:
    /// `https://localhost:<metadata port>`.
    #[arg(long, env = "QUORATE_ISSUER")]
    pub issuer_url: Option<String>,
    /// Cedar policy directory (`*.cedar` and optional `schema.cedarschema`), watched for
    /// changes. Without it, only `Client::"admin"` may administer and no agent gets a
    /// token until a policy set is applied.
    #[arg(long, env = "QUORATE_POLICY_DIR")]
    pub policy_dir: Option<PathBuf>,
    /// The operator's P-256 public key (SPKI PEM). With it, policy comes only from
    /// bundles the operator signed (`quorate policy apply --operator-key`), approvals
    /// must be signed by the bundle's approvers, and `--policy-dir` is refused
    /// (DESIGN.md §9).
    #[arg(long, env = "QUORATE_OPERATOR_PUBLIC_KEY")]
    pub operator_public_key: Option<PathBuf>,
    /// A signed policy bundle to start with (compact JWS, from `quorate policy sign`),
    /// used when it is newer than the bundle last applied. Needs
    /// `--operator-public-key`.
    #[arg(long, env = "QUORATE_POLICY_BUNDLE")]
    pub policy_bundle: Option<PathBuf>,
    /// How often to look for policy changes, in milliseconds.
    #[arg(long, default_value_t = 1000)]
    pub policy_poll_ms: u64,
    /// Trusted attestation issuers (JSON: OIDC issuers with their JWKS, SPIFFE trust
    /// domains with their X.509 and JWT bundles, registered `private_key_jwt` clients;
    /// see `quorate_authz::authn`). Without it, every attestation is refused.
    #[arg(long, env = "QUORATE_TRUST_CONFIG")]
    pub trust_config: Option<PathBuf>,
    /// The name of the key that signs access tokens.
    #[arg(long, env = "QUORATE_TOKEN_KEY", default_value = "tokens")]
    pub token_key: String,
    /// Let introspection and revocation run over classic (non-hybrid) key exchange.
    #[arg(long)]
    pub allow_classic_token_endpoints: bool,
    /// Address of the agent listener, where agents authenticate with their X.509-SVID
    /// (trust bundles from `--trust-config`) and get tokens for themselves.
    #[arg(long, env = "QUORATE_AGENT_LISTEN")]
    pub agent_listen: Option<SocketAddr>,
    /// Where audit events go besides the chain in the store: `file:PATH` (JSON lines),
    /// `stdout`, `syslog+udp://HOST:PORT` or `syslog+unix:PATH` (RFC 5424). Repeat or
    /// separate with commas. A sink that fails makes requests fail.
    #[arg(
        long = "audit-sink",
        env = "QUORATE_AUDIT_SINKS",
        value_delimiter = ','
    )]
    pub audit_sinks: Vec<String>,
    /// Seconds between threshold-signed checkpoints of the audit chain head.
    #[arg(long, default_value_t = 60)]
    pub audit_checkpoint_secs: u64,
    /// Proactive refresh (DESIGN.md §4.3): renew every key's shares once they are this
    /// many seconds old (since creation or the last refresh or reshare). 0 (the
    /// default) refreshes only on demand (`quorate key refresh`). A refresh needs every
    /// node; one that fails is retried at the next check (every minute, or sooner when
    /// the interval is shorter).
    #[arg(long, default_value_t = 0, env = "QUORATE_REFRESH_INTERVAL_SECS")]
    pub refresh_interval_secs: u64,
    /// At start, reshare every key held with other parameters than `--node`/`--threshold`
    /// (more nodes, a higher threshold; DESIGN.md §4.3) before serving. Without it, such
    /// keys stop the coordinator with an error naming them. Needs every node of the old
    /// and the new set up.
    #[arg(long)]
    pub reshare: bool,
    /// A node leaving the cluster, `INDEX=HOST:PORT` (it destroys its shares once
    /// `--reshare` has moved every key to the `--node` set; it checks the new holders'
    /// signed confirmations first) or `INDEX` alone (the node is gone for good, its disk
    /// destroyed: nothing to ask). Every holder of a key that is not in `--node` must
    /// be named here.
    #[arg(
        long = "retire",
        env = "QUORATE_COORDINATOR_RETIRE",
        value_delimiter = ','
    )]
    pub retire: Vec<String>,
    /// The name of the signing key for audit checkpoints (created on first use).
    #[arg(long, env = "QUORATE_AUDIT_KEY", default_value = "audit")]
    pub audit_key: String,
    /// The name of the derivation key for confidential credentials.
    #[arg(long, env = "QUORATE_CREDENTIAL_KEY", default_value = "credentials")]
    pub credential_key: String,
    /// Seconds a request that needs human approval waits before it expires.
    #[arg(long, default_value_t = 600)]
    pub approval_ttl_secs: u64,
    /// This coordinator's instance id, 1 to 64 characters of `[A-Za-z0-9._-]`, unique
    /// among the coordinators of one cluster and stable across its restarts: nodes tag
    /// the presignatures it makes with it, and a restart discards only its own
    /// (coordinator/STORE.md). Over PostgreSQL a second coordinator started with an id
    /// in use refuses to start. Default: `<host name>-<--listen port>` (with port 0,
    /// which is not stable, `<host name>-pid<process id>`).
    #[arg(long, env = "QUORATE_COORDINATOR_INSTANCE")]
    pub instance_id: Option<String>,
}

/// The default instance id: the host name (from the kernel, cut to 48 characters) and
/// the `--listen` port, or the process id when that port is 0 (tests, `quorate dev`).
pub fn default_instance_id(listen: &SocketAddr) -> String {
    let host: String = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .unwrap_or_default()
        .trim()
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
        .take(48)
        .collect();
    let host = if host.is_empty() {
        "coordinator".to_owned()
    } else {
        host
    };
    match listen.port() {
        0 => format!("{host}-pid{}", std::process::id()),
        p => format!("{host}-{p}"),
    }
}

/// `quorate-coordinator` maintenance commands.
#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Brings a PostgreSQL store's schema to this version's (numbered migrations,
    /// recorded in `schema_version`; safe to run from several hosts at once).
    Migrate {
        /// The PostgreSQL URL, as for `--store`.
        #[arg(long, env = "QUORATE_COORDINATOR_STORE", hide_env_values = true)]
        store: String,
    },
}

/// Where the coordinator's state lives (`coordinator/STORE.md`).
///
/// `Debug` does not show a PostgreSQL URL (it may carry a password).
#[derive(Clone)]
pub enum StoreSpec {
    /// redb files in this directory.
    Redb(PathBuf),
    /// A PostgreSQL store, parsed from its URL (TLS files loaded).
    Postgres(Box<crate::pg::Target>),
}

impl std::fmt::Debug for StoreSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StoreSpec::Redb(dir) => f.debug_tuple("Redb").field(dir).finish(),
            StoreSpec::Postgres(_) => f.write_str("Postgres(<url redacted>)"),
        }
    }
}

/// A validated configuration.
#[derive(Debug)]
pub struct Config {
    /// Public API address.
    pub listen: SocketAddr,
    /// The store.
    pub store: StoreSpec,
    /// Certificate.
    pub cert: PathBuf,
    /// Key.
    pub key: PathBuf,
    /// CA.
    pub ca: PathBuf,
    /// Trust domain.
    pub domain: String,
    /// Nodes in index order (any distinct indices).
    pub nodes: Vec<(PartyIndex, SocketAddr)>,
    /// Parameters.
    pub params: ThresholdParams,
    /// Pool sizing.
    pub marks: Watermarks,
    /// Drain timeout.
    pub grace: std::time::Duration,
    /// Relay recording.
    pub record_relay: Option<PathBuf>,
    /// Crash-test hook.
    pub fail_point: Option<crate::cluster::RenewalFailPoint>,
    /// Metrics address.
    pub metrics_listen: Option<SocketAddr>,
    /// Metadata listener address.
    pub http_listen: SocketAddr,
    /// Metadata listener certificate and key.
    pub http_cert: PathBuf,
    /// Metadata listener key.
    pub http_key: PathBuf,
    /// Issuer URL, if set.
    pub issuer_url: Option<String>,
    /// Policy directory.
    pub policy_dir: Option<PathBuf>,
    /// The operator's public key file.
    pub operator_public_key: Option<PathBuf>,
    /// A signed bundle to start with.
    pub policy_bundle: Option<PathBuf>,
    /// Policy poll interval.
    pub policy_poll: std::time::Duration,
    /// Trusted issuers file.
    pub trust_config: Option<PathBuf>,
    /// Token key name.
    pub token_key: String,
    /// Classic key exchange on token endpoints.
    pub allow_classic_token_endpoints: bool,
    /// The agent (X.509-SVID) listener.
    pub agent_listen: Option<SocketAddr>,
    /// Audit sinks.
    pub audit_sinks: Vec<crate::audit::SinkSpec>,
    /// Checkpoint interval.
    pub audit_checkpoint: std::time::Duration,
    /// The audit checkpoint key.
    pub audit_key: String,
    /// The credential derivation key.
    pub credential_key: String,
    /// Approval lifetime.
    pub approval_ttl_seconds: i64,
    /// Scheduled refresh: renew shares older than this (`None`: on demand only).
    pub refresh_interval: Option<std::time::Duration>,
    /// Reshare keys held with other parameters at start.
    pub reshare: bool,
    /// Nodes leaving the cluster: index, and address unless the node is gone.
    pub retire: Vec<(PartyIndex, Option<SocketAddr>)>,
    /// This coordinator's instance id (`--instance-id`), validated.
    pub instance_id: String,
}

impl Args {
    /// Validates everything, returning every problem found.
    pub fn build(self) -> Result<Config, Vec<String>> {
        let mut errors = Vec::new();
        let mut file = |what: &str, p: Option<PathBuf>| match p {
            Some(p) => {
                if !p.is_file() {
                    errors.push(format!("{what} {}: no such file", p.display()));
                }
                p
            }
            None => {
                errors.push(format!("{what} is required"));
                PathBuf::new()
            }
        };
        let cert = file("--cert", self.cert);
        let key = file("--key", self.key);
        let ca = file("--ca", self.ca);
        let store = if self.store == "redb" {
            match self.data_dir {
                Some(d) => Some(StoreSpec::Redb(d)),
                None => {
                    errors.push("--data-dir is required with the redb store".into());
                    None
                }
            }
        } else if self.store.starts_with("postgres://") || self.store.starts_with("postgresql://") {
            match crate::pg::Target::parse(&self.store) {
                Ok(t) => Some(StoreSpec::Postgres(Box::new(t))),
                Err(e) => {
                    errors.push(e.to_string());
                    None
                }
            }
        } else {
            errors.push(format!(
                "--store {}: use redb or a postgres:// URL",
                self.store
            ));
            None
        };
        if self.nodes.is_empty() {
            errors.push("--node is required (one per fragment node)".into());
        }
        let mut nodes = Vec::new();
        for spec in &self.nodes {
            let parsed = spec.split_once('=').and_then(|(i, a)| {
                Some((
                    PartyIndex::new(i.trim().parse().ok()?)?,
                    a.trim().parse::<SocketAddr>().ok()?,
                ))
            });
            match parsed {
                Some(n) => nodes.push(n),
                None => errors.push(format!(
                    "--node {spec}: expected INDEX=HOST:PORT, e.g. 1=127.0.0.1:7101"
                )),
            }
        }
        nodes.sort_by_key(|(i, _)| *i);
        if let Some(w) = nodes
            .windows(2)
            .find(|w| w.first().map(|a| a.0) == w.get(1).map(|b| b.0))
            && let Some((i, _)) = w.first()
        {
            errors.push(format!("--node {i} is given twice"));
        }
        let mut retire = Vec::new();
        for spec in &self.retire {
            let (i, addr) = match spec.split_once('=') {
                Some((i, a)) => (i, Some(a)),
                None => (spec.as_str(), None),
            };
            let index = i.trim().parse().ok().and_then(PartyIndex::new);
            let addr = addr.map(|a| a.trim().parse::<SocketAddr>().ok());
            match (index, addr) {
                (Some(i), None) => retire.push((i, None)),
                (Some(i), Some(Some(a))) => retire.push((i, Some(a))),
                _ => errors.push(format!(
                    "--retire {spec}: expected INDEX=HOST:PORT (the leaving node destroys its shares) or INDEX (the node is gone), e.g. 2=127.0.0.1:7102"
                )),
            }
        }
        for (i, _) in &retire {
            if nodes.iter().any(|(n, _)| n == i) {
                errors.push(format!(
                    "--retire {i}: node {i} is also given with --node; a node either stays or leaves"
                ));
            }
        }
        let params = PartySet::new(nodes.iter().map(|(i, _)| *i).collect())
            .map_err(|e| e.to_string())
            .and_then(|set| {
                ThresholdParams::with_holders(&set, self.threshold).map_err(|e| e.to_string())
            });
        let params = match params {
            Ok(p) => Some(p),
            Err(e) => {
                errors.push(format!(
                    "--threshold {} with {} nodes: {e}",
                    self.threshold,
                    nodes.len()
                ));
                None
            }
        };
        if self.pool_low == 0 || self.pool_high < self.pool_low {
            errors.push("pool watermarks need 0 < --pool-low <= --pool-high".into());
        }
        if self.presign_parallel == 0 || self.presign_parallel > 64 {
            errors.push("--presign-parallel must be 1..=64".into());
        }
        if self.presign_batch == 0 || self.presign_batch > quorate_crypto::presign::MAX_BATCH {
            errors.push(format!(
                "--presign-batch must be 1..={}",
                quorate_crypto::presign::MAX_BATCH
            ));
        }
        if self.log_format != "plain" && self.log_format != "json" {
            errors.push(format!(
                "--log-format {}: use plain or json",
                self.log_format
            ));
        }
        let beside_ca = |name: &str| {
            ca.parent()
                .map(|d| d.join(name))
                .unwrap_or_else(|| PathBuf::from(name))
        };
        let http_cert = self
            .http_cert
            .clone()
            .unwrap_or_else(|| beside_ca("metadata.pem"));
        let http_key = self
            .http_key
            .clone()
            .unwrap_or_else(|| beside_ca("metadata-key.pem"));
        for (what, p) in [("--http-cert", &http_cert), ("--http-key", &http_key)] {
            if !p.is_file() {
                errors.push(format!(
                    "{what} {}: no such file (the metadata listener needs a certificate; `quorate admin init` writes metadata.pem)",
                    p.display()
                ));
            }
        }
        if let Some(u) = &self.issuer_url
            && (!u.starts_with("https://")
                || u.ends_with('/')
                || u.contains('?')
                || u.contains('#'))
        {
            errors.push(format!(
                "--issuer-url {u}: must be an https URL without a trailing slash, query or fragment"
            ));
        }
        if let Some(d) = &self.policy_dir
            && !d.is_dir()
        {
            errors.push(format!("--policy-dir {}: no such directory", d.display()));
        }
        if self.operator_public_key.is_some() && self.policy_dir.is_some() {
            errors.push("--policy-dir and --operator-public-key: with an operator key, policy comes only from signed bundles (`quorate policy apply DIR --operator-key FILE` signs a directory)".into());
        }
        if self.policy_bundle.is_some() && self.operator_public_key.is_none() {
            errors.push("--policy-bundle needs --operator-public-key to verify it".into());
        }
        for (flag, f) in [
            ("--operator-public-key", &self.operator_public_key),
            ("--policy-bundle", &self.policy_bundle),
        ] {
            if let Some(f) = f
                && !f.is_file()
            {
                errors.push(format!("{flag} {}: no such file", f.display()));
            }
        }
        if let Some(f) = &self.trust_config
            && !f.is_file()
        {
            errors.push(format!("--trust-config {}: no such file", f.display()));
        }
        if self.agent_listen.is_some() && self.trust_config.is_none() {
            errors.push(
                "--agent-listen needs --trust-config with at least one `svid` trust domain".into(),
            );
        }
        if self.policy_poll_ms < 50 {
            errors.push("--policy-poll-ms must be at least 50".into());
        }
        let mut audit_sinks = Vec::new();
        for spec in &self.audit_sinks {
            match spec.parse::<crate::audit::SinkSpec>() {
                Ok(s) => audit_sinks.push(s),
                Err(e) => errors.push(format!("--audit-sink: {e}")),
            }
        }
        let fail_point = match self.fail_point.as_deref() {
            None => None,
            Some("renewal-after-record") => Some(crate::cluster::RenewalFailPoint::AfterRecord),
            Some("renewal-after-one-node") => Some(crate::cluster::RenewalFailPoint::AfterOneNode),
            Some(other) => {
                errors.push(format!(
                    "--fail-point {other}: unknown (known: renewal-after-record, renewal-after-one-node)"
                ));
                None
            }
        };
        if self.audit_checkpoint_secs == 0 {
            errors.push("--audit-checkpoint-secs must be at least 1".into());
        }
        if self.approval_ttl_secs == 0 || self.approval_ttl_secs > 7 * 24 * 3600 {
            errors.push("--approval-ttl-secs must be 1 s to 7 days".into());
        }
        let instance_id = match self.instance_id {
            Some(id) => {
                if let Err(e) = quorate_proto::convert::coordinator_instance(&id, false) {
                    errors.push(format!("--instance-id: {e}"));
                }
                id
            }
            None => default_instance_id(&self.listen),
        };
        match (errors.is_empty(), params, store) {
            (true, Some(params), Some(store)) => Ok(Config {
                listen: self.listen,
                store,
                cert,
                key,
                ca,
                domain: self.domain,
                nodes,
                params,
                marks: Watermarks {
                    low: self.pool_low,
                    high: self.pool_high,
                    batch: self.presign_batch,
                    parallel: self.presign_parallel,
                },
                grace: std::time::Duration::from_secs(self.grace_secs),
                record_relay: self.record_relay,
                fail_point,
                metrics_listen: self.metrics_listen,
                http_listen: self.http_listen,
                http_cert,
                http_key,
                issuer_url: self.issuer_url,
                policy_dir: self.policy_dir,
                operator_public_key: self.operator_public_key,
                policy_bundle: self.policy_bundle,
                policy_poll: std::time::Duration::from_millis(self.policy_poll_ms),
                trust_config: self.trust_config,
                token_key: self.token_key,
                allow_classic_token_endpoints: self.allow_classic_token_endpoints,
                agent_listen: self.agent_listen,
                audit_sinks,
                audit_checkpoint: std::time::Duration::from_secs(self.audit_checkpoint_secs),
                audit_key: self.audit_key,
                credential_key: self.credential_key,
                approval_ttl_seconds: i64::try_from(self.approval_ttl_secs).unwrap_or(600),
                refresh_interval: (self.refresh_interval_secs > 0)
                    .then(|| std::time::Duration::from_secs(self.refresh_interval_secs)),
                reshare: self.reshare,
                retire,
                instance_id,
            }),
            _ => Err(errors),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_store_url_is_not_in_debug_output() {
        let spec = StoreSpec::Postgres(Box::new(
            crate::pg::Target::parse("postgres://q:s3cret@localhost/quorate")
                .unwrap_or_else(|e| panic!("{e}")),
        ));
        let shown = format!("{spec:?}");
        assert!(!shown.contains("s3cret"), "{shown}");
        assert_eq!(shown, "Postgres(<url redacted>)");
    }

    #[test]
    fn the_default_instance_id_is_valid_and_names_the_port() {
        let at: SocketAddr = "127.0.0.1:7100".parse().unwrap_or_else(|_| unreachable!());
        let id = default_instance_id(&at);
        assert!(id.ends_with("-7100"), "{id}");
        assert!(quorate_proto::convert::coordinator_instance(&id, false).is_ok());
        let any: SocketAddr = "127.0.0.1:0".parse().unwrap_or_else(|_| unreachable!());
        let id = default_instance_id(&any);
        assert!(id.ends_with(&format!("-pid{}", std::process::id())), "{id}");
    }
}
