//! The PostgreSQL store (`--store postgres://…`, `coordinator/STORE.md`): one database
//! that any number of coordinators share, implementing [`KeyStore`], [`IdentityStore`]
//! and [`AuditStore`]. Public data only.
//!
//! The store traits are synchronous (as redb is); calls enter the `tokio-postgres` pool
//! with [`tokio::task::block_in_place`] + [`Handle::block_on`] on a multi-thread runtime
//! worker, or plain `block_on` on a blocking thread. Every call is bounded by
//! [`CALL_TIMEOUT`]; a lost or refused connection is reported as unavailable (a
//! retryable failure: gRPC `UNAVAILABLE`), and the pool reconnects on the next call.
//!
//! Schema: numbered migrations (`coordinator/migrations/NNNN_*.sql`) recorded in
//! `schema_version`, applied by [`migrate`] (`quorate-coordinator migrate`). [`PgStore::open`]
//! refuses a database whose schema is not exactly [`SCHEMA_VERSION`].
//!
//! A Unix socket or loopback address may be reached unencrypted; any other host only
//! over verified TLS 1.3 ([`Target`]).

use std::collections::HashMap;
use std::future::Future;
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use quorate_crypto::keys::{KeyId, KeyPublic};
use quorate_crypto::params::{PartyIndex, SessionId};
use quorate_crypto::wire::Wire;
use quorate_proto::profile::KeyProfile;
use quorate_proto::tls::{Identity, KxGroup};
use std::sync::Arc;
use tokio::runtime::{Handle, RuntimeFlavor};
use tokio_postgres::NoTls;
use tokio_postgres::config::Host;
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::audit::{AuditStore, CommitError, record::Event};
use crate::identity::approval::{ApprovalError, KEEP_DECIDED_SECONDS, Stored};
use crate::identity::store::{
    IdentityStore, IdentityStoreError, Issuance, OneUse, Task, decode_approval, encode_approval,
    no_issuance,
};
use crate::store::{KeyStore, KeyVersion, NamedKey, StoreError, StoredVersion};

/// Writes a key's public data (`$1` key id, `$2` its encoding), replacing an older row.
const UPSERT_PUBLIC: &str = "INSERT INTO keys (key_id, public) VALUES ($1, $2)
     ON CONFLICT (key_id) DO UPDATE SET public = EXCLUDED.public";

/// Writes a key's profile (`$1` key id, `$2` its encoding), replacing an older row.
const UPSERT_PROFILE: &str = "INSERT INTO key_profiles (key_id, profile) VALUES ($1, $2)
     ON CONFLICT (key_id) DO UPDATE SET profile = EXCLUDED.profile";

/// The schema version this build reads and writes.
pub const SCHEMA_VERSION: i32 = 2;

/// Migrations, in order: (version, SQL).
const MIGRATIONS: &[(i32, &str)] = &[
    (1, include_str!("../migrations/0001_initial.sql")),
    (
        2,
        include_str!("../migrations/0002_retry_safe_issuance_and_approvals.sql"),
    ),
];

/// The longest one store call waits (for a connection and its statements).
pub const CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// The advisory lock key that serialises migrations (`pg_advisory_xact_lock`).
const MIGRATION_LOCK: i64 = 0x7175_6f72_6174_6501;

/// Why a PostgreSQL call failed.
#[derive(Debug, thiserror::Error)]
pub enum PgError {
    /// The server cannot be reached or refused for now: retry.
    #[error("PostgreSQL store unavailable, retry later: {0}")]
    Unavailable(String),
    /// A configuration or schema problem, or a failed statement.
    #[error("PostgreSQL store: {0}")]
    Failed(String),
}

impl From<tokio_postgres::Error> for PgError {
    fn from(e: tokio_postgres::Error) -> Self {
        let retryable = match e.code() {
            // No SQLSTATE: the connection failed or closed.
            None => true,
            Some(c) => {
                let c = c.code();
                // Connection exceptions, the server shutting down or starting, and
                // transaction conflicts.
                c.starts_with("08") || matches!(c, "57P01" | "57P02" | "57P03" | "40001" | "40P01")
            }
        };
        let msg = match e.as_db_error() {
            Some(db) => format!("{}: {}", db.code().code(), db.message()),
            None => match std::error::Error::source(&e) {
                Some(s) => format!("{e}: {s}"),
                None => e.to_string(),
            },
        };
        if retryable {
            PgError::Unavailable(msg)
        } else {
            PgError::Failed(msg)
        }
    }
}

impl From<deadpool_postgres::PoolError> for PgError {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        match e {
            deadpool_postgres::PoolError::Backend(e) => e.into(),
            other => PgError::Unavailable(other.to_string()),
        }
    }
}

impl From<PgError> for StoreError {
    fn from(e: PgError) -> Self {
        match e {
            PgError::Unavailable(m) => StoreError::Unavailable(m),
            PgError::Failed(m) => StoreError::Failed(m),
        }
    }
}

impl From<PgError> for IdentityStoreError {
    fn from(e: PgError) -> Self {
        IdentityStoreError(e.to_string())
    }
}

type Result<T> = core::result::Result<T, PgError>;

/// Server settings of every store session (PostgreSQL §19.3.1), sent as startup
/// `options`: keepalive probes after 2 s of silence, 1 s apart, 3 unanswered end the
/// session; data unacknowledged for 5 s ends it. So the server ends the session of a
/// coordinator whose host vanished without closing its socket within about 5 s, not the
/// kernel's default two hours, releasing its advisory locks ([`crate::election`]) and
/// the row locks of a transaction it left open (the audit head). Unix-socket sessions
/// ignore them: there the kernel reports a dead peer at once.
pub const SERVER_KEEPALIVES: &str = "-c tcp_keepalives_idle=2 -c tcp_keepalives_interval=1 \
     -c tcp_keepalives_count=3 -c tcp_user_timeout=5000";

/// URL parameters the coordinator reads itself (TLS); the rest go to `tokio-postgres`.
const TLS_PARAMS: &[&str] = &["sslmode", "sslrootcert", "sslcert", "sslkey", "ssl_groups"];

/// Where and how the store connects: the `--store` URL's `tokio-postgres` settings and
/// the TLS they use (coordinator/STORE.md, "Connecting").
///
/// - A Unix socket or a loopback address may go unencrypted (`sslmode` absent or
///   `disable`).
/// - Any other host needs `sslmode=verify-full` and `sslrootcert=<PEM file of the
///   server's CA>`: TLS 1.3, the server's certificate checked against that CA and the
///   host name. `sslcert`/`sslkey` add a client certificate (PostgreSQL's `cert`
///   authentication). `ssl_groups` lists the key-exchange groups offered, by default
///   only X25519MLKEM768 ([`KxGroup`]).
/// - The weaker modes (`allow`, `prefer`, `require`, `verify-ca`) are refused: none
///   checks whom the coordinator talks to.
#[derive(Clone)]
pub struct Target {
    cfg: tokio_postgres::Config,
    /// `None`: unencrypted, over a Unix socket or loopback.
    tls: Option<MakeRustlsConnect>,
    groups: Vec<KxGroup>,
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe())
    }
}

/// One `--store` error, prefixed with the option's name.
fn bad(msg: impl std::fmt::Display) -> PgError {
    PgError::Failed(format!("--store: {msg}"))
}

impl Target {
    /// Parses a `postgres://…` or `postgresql://…` URL: checks its host against its TLS
    /// settings (see [`Target`]) and loads the TLS files it names.
    ///
    /// Errors name what is wrong and what to write instead; none repeats the URL (it may
    /// hold a password).
    pub fn parse(url: &str) -> Result<Self> {
        if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
            return Err(bad(
                "not a PostgreSQL URL: write postgres://USER@HOST:PORT/DATABASE?… (or postgres:///DATABASE?host=/run/postgresql for a Unix socket)",
            ));
        }
        // tokio-postgres reads the user and password up to an '@' wherever it is, while
        // the parameters start at the first '?': a raw '?', '/' or '#' in a password would
        // make the two readings differ. Refuse any '@' after the host part (RFC 3986
        // §3.2: it ends at the first '/', '?' or '#') and any raw '#'.
        let after = url.split_once("://").map_or("", |(_, a)| a);
        let host_end = after.find(['/', '?', '#']).unwrap_or(after.len());
        if after.get(host_end..).is_some_and(|r| r.contains('@')) || url.contains('#') {
            return Err(bad(
                "the URL has an '@' after its host part, or a '#': percent-encode '?', '/', '#' and '@' inside a user name or password (%3F, %2F, %23, %40)",
            ));
        }
        let (base, query) = url.split_once('?').unwrap_or((url, ""));
        let mut rest = Vec::new();
        let mut tls: HashMap<&str, String> = HashMap::new();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            if TLS_PARAMS.contains(&k) {
                let v = percent_encoding::percent_decode_str(v)
                    .decode_utf8()
                    .map_err(|_| bad(format!("{k}: the value is not UTF-8")))?;
                if tls.insert(k, v.into_owned()).is_some() {
                    return Err(bad(format!("{k} is given twice")));
                }
            } else {
                rest.push(pair);
            }
        }
        let mode = tls.remove("sslmode");
        let verify = match mode.as_deref() {
            None | Some("disable") => false,
            Some("verify-full") => true,
            Some(m @ ("allow" | "prefer" | "require" | "verify-ca")) => {
                return Err(bad(format!(
                    "sslmode={m} does not check that the server is the one named: use sslmode=verify-full with sslrootcert=<the server's CA file>"
                )));
            }
            Some(_) => {
                return Err(bad(
                    "sslmode has a value that is not a mode: use verify-full (or disable, over a Unix socket or loopback)",
                ));
            }
        };
        let passed = format!("{base}?{}", rest.join("&"));
        let mut cfg: tokio_postgres::Config =
            passed.parse().map_err(|e: tokio_postgres::Error| {
                // The cause names the option at fault (never its value).
                match std::error::Error::source(&e) {
                    Some(cause) => bad(format!("not a usable PostgreSQL URL: {cause}")),
                    None => bad(format!("not a usable PostgreSQL URL: {e}")),
                }
            })?;
        // The mode tokio-postgres applies: TLS required (the verification is ours), or none.
        cfg.ssl_mode(if verify {
            tokio_postgres::config::SslMode::Require
        } else {
            tokio_postgres::config::SslMode::Disable
        });
        if cfg.get_hosts().is_empty() {
            return Err(bad(
                "the URL names no host; give a host (with sslmode=verify-full), a Unix socket directory (?host=/run/postgresql) or a loopback address",
            ));
        }
        if cfg.get_connect_timeout().is_none() {
            cfg.connect_timeout(CALL_TIMEOUT);
        }
        // Dead peers are noticed within seconds on both ends: the server ends the session
        // of a vanished coordinator (releasing its advisory locks, and row locks of a
        // transaction it left open), and the coordinator drops a connection to a vanished
        // server.
        let options = match cfg.get_options() {
            Some(o) if !o.is_empty() => format!("{o} {SERVER_KEEPALIVES}"),
            _ => SERVER_KEEPALIVES.to_owned(),
        };
        cfg.options(&options)
            .keepalives(true)
            .keepalives_idle(Duration::from_secs(2))
            .keepalives_interval(Duration::from_secs(1))
            .keepalives_retries(3);
        if !verify {
            if let Some(k) = TLS_PARAMS.iter().find(|k| tls.contains_key(*k)) {
                return Err(bad(format!(
                    "{k} applies only with sslmode=verify-full; add it, or remove {k}"
                )));
            }
            // tokio-postgres connects to `hostaddr` when given, whatever the host's name.
            if let Some(a) = cfg.get_hostaddrs().iter().find(|a| !a.is_loopback()) {
                return Err(bad(format!(
                    "hostaddr {a}: a connection beyond this host must be encrypted: add sslmode=verify-full&sslrootcert=<the server's CA file>"
                )));
            }
            for h in cfg.get_hosts() {
                if let Host::Tcp(name) = h
                    && !is_loopback(name)
                {
                    let how = match mode {
                        Some(_) => {
                            "sslmode=disable is allowed only over a Unix socket or a loopback address"
                        }
                        None => "a connection beyond this host must be encrypted",
                    };
                    return Err(bad(format!(
                        "host {name}: {how}: add sslmode=verify-full&sslrootcert=<the server's CA file>"
                    )));
                }
            }
            return Ok(Target {
                cfg,
                tls: None,
                groups: Vec::new(),
            });
        }
        if cfg.get_hosts().iter().any(|h| !matches!(h, Host::Tcp(_))) {
            return Err(bad(
                "sslmode=verify-full needs host names: a Unix socket carries no TLS (use sslmode=disable for it)",
            ));
        }
        let roots = match tls.remove("sslrootcert") {
            None => {
                return Err(bad(
                    "sslmode=verify-full needs sslrootcert=<PEM file of the CA that certified the server>",
                ));
            }
            Some(r) if r == "system" => {
                return Err(bad(
                    "sslrootcert=system: the system's trust store is not used; name the PEM file of the CA that certified the server",
                ));
            }
            Some(r) => r,
        };
        let client = match (tls.remove("sslcert"), tls.remove("sslkey")) {
            (None, None) => None,
            (Some(c), Some(k)) => Some(
                Identity::from_pem_files(&c, &k)
                    .map_err(|e| bad(format!("sslcert/sslkey: {e}")))?,
            ),
            _ => return Err(bad("sslcert and sslkey go together: give both or neither")),
        };
        let groups = match tls.remove("ssl_groups") {
            None => vec![KxGroup::X25519MLKEM768],
            Some(list) => list
                .split([':', ','])
                .map(|g| {
                    KxGroup::parse(g.trim()).ok_or_else(|| {
                        bad(format!(
                            "ssl_groups: `{g}` is not a group; the groups are X25519MLKEM768, X25519 and P-256"
                        ))
                    })
                })
                .collect::<Result<Vec<_>>>()?,
        };
        let config = quorate_proto::tls::database_client_config(
            std::path::Path::new(&roots),
            client.as_ref(),
            &groups,
        )
        .map_err(|e| bad(format!("TLS: {e}")))?;
        Ok(Target {
            cfg,
            tls: Some(MakeRustlsConnect::new(Arc::unwrap_or_clone(config))),
            groups,
        })
    }

    /// How the store is reached, for logs: hosts (never the password) and the TLS used.
    pub fn describe(&self) -> String {
        let hosts: Vec<String> = self
            .cfg
            .get_hosts()
            .iter()
            .map(|h| match h {
                Host::Tcp(n) => n.clone(),
                Host::Unix(p) => p.display().to_string(),
            })
            .collect();
        match self.tls {
            None => format!("{} (unencrypted: local)", hosts.join(",")),
            Some(_) => format!(
                "{} (TLS 1.3, verify-full, key exchange {})",
                hosts.join(","),
                self.groups_named()
            ),
        }
    }

    fn groups_named(&self) -> String {
        self.groups
            .iter()
            .map(|g| g.name())
            .collect::<Vec<_>>()
            .join(":")
    }

    /// Whether the link may fall back to a classic key exchange (`ssl_groups` lists one).
    pub fn allows_classic(&self) -> bool {
        self.groups.iter().any(|g| *g != KxGroup::X25519MLKEM768)
    }

    /// Opens one session; its connection runs in a spawned task, which the returned
    /// handle ends when aborted.
    pub async fn connect(&self) -> Result<(tokio_postgres::Client, tokio::task::JoinHandle<()>)> {
        fn run<S>(conn: S) -> tokio::task::JoinHandle<()>
        where
            S: Future<Output = core::result::Result<(), tokio_postgres::Error>> + Send + 'static,
        {
            tokio::spawn(async move {
                if let Err(e) = conn.await {
                    tracing::warn!(error = %e, "a PostgreSQL store session ended");
                }
            })
        }
        let connected = match &self.tls {
            None => self
                .cfg
                .connect(NoTls)
                .await
                .map(|(c, conn)| (c, run(conn))),
            Some(tls) => self
                .cfg
                .connect(tls.clone())
                .await
                .map(|(c, conn)| (c, run(conn))),
        };
        connected.map_err(|e| self.explain(e.into()))
    }

    /// Adds what to do to a failed TLS handshake, and marks configuration faults (a
    /// refused certificate or handshake, a server without TLS) as not retryable.
    pub fn explain(&self, e: PgError) -> PgError {
        if self.tls.is_none() {
            return e;
        }
        let (retry, m) = match e {
            PgError::Unavailable(m) => (true, m),
            PgError::Failed(m) => (false, m),
        };
        let hint = if m.contains("does not support TLS") {
            Some("the server does not accept TLS: turn ssl on in its postgresql.conf".to_owned())
        } else if m.contains("fatal alert: HandshakeFailure") {
            Some(if self.allows_classic() {
                format!(
                    "the server shares none of the key-exchange groups {} with this coordinator, or no TLS 1.3 cipher suite",
                    self.groups_named()
                )
            } else {
                "this coordinator offers only the key exchange X25519MLKEM768, which needs PostgreSQL 18 built with OpenSSL 3.5 or later and ssl_groups including X25519MLKEM768; to accept a classic key exchange on this link, add ssl_groups=X25519MLKEM768:P-256 to the URL".to_owned()
            })
        } else if m.contains("fatal alert: ProtocolVersion") {
            Some("the server does not speak TLS 1.3: set ssl_min_protocol_version = 'TLSv1.3' (OpenSSL 1.1.1 or later)".to_owned())
        } else {
            None
        };
        let settled = hint.is_some() || m.contains("invalid peer certificate");
        let m = match hint {
            Some(h) => format!("{m} ({h})"),
            None => m,
        };
        if retry && !settled {
            PgError::Unavailable(m)
        } else {
            PgError::Failed(m)
        }
    }

    /// Logs a warning when the link may use a classic key exchange.
    pub fn warn_if_classic(&self) {
        if self.allows_classic() {
            tracing::warn!(
                groups = %self.groups_named(),
                "the link to the PostgreSQL store may use a classic key exchange (ssl_groups in --store): its traffic, recorded now, could be read by a future quantum computer"
            );
        }
    }

    fn pool(&self) -> Result<Pool> {
        let cfg = ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        };
        let mgr = match &self.tls {
            None => Manager::from_config(self.cfg.clone(), NoTls, cfg),
            Some(tls) => Manager::from_config(self.cfg.clone(), tls.clone(), cfg),
        };
        Pool::builder(mgr)
            .max_size(16)
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .wait_timeout(Some(CALL_TIMEOUT))
            .create_timeout(Some(CALL_TIMEOUT))
            .recycle_timeout(Some(CALL_TIMEOUT))
            .build()
            .map_err(|e| PgError::Failed(format!("connection pool: {e}")))
    }
}

fn is_loopback(name: &str) -> bool {
    name == "localhost"
        || name
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<std::net::IpAddr>()
            .is_ok_and(|a| a.is_loopback())
}

/// Runs `fut` to completion from synchronous code, bounded by [`CALL_TIMEOUT`].
fn block<T>(handle: &Handle, fut: impl Future<Output = Result<T>>) -> Result<T> {
    let bounded = async {
        match tokio::time::timeout(CALL_TIMEOUT, fut).await {
            Ok(r) => r,
            Err(_) => Err(PgError::Unavailable(format!(
                "no answer within {} s",
                CALL_TIMEOUT.as_secs()
            ))),
        }
    };
    match Handle::try_current() {
        Ok(h) => match h.runtime_flavor() {
            RuntimeFlavor::CurrentThread => Err(PgError::Failed(
                "the PostgreSQL store needs tokio's multi-thread runtime".into(),
            )),
            _ => tokio::task::block_in_place(|| h.block_on(bounded)),
        },
        Err(_) => handle.block_on(bounded),
    }
}

/// Applies every migration newer than the database's schema, in one transaction under
/// an advisory lock (so two coordinators migrating at once apply each migration once).
/// Returns the versions applied (empty: already current). A database newer than this
/// build is refused.
pub async fn migrate(target: &Target) -> Result<Vec<i32>> {
    target.warn_if_classic();
    let (mut client, conn) = target.connect().await?;
    let result = async {
        let tx = client.transaction().await?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
            .await?;
        tx.batch_execute(
            "CREATE TABLE IF NOT EXISTS schema_version (
                 version    integer PRIMARY KEY,
                 applied_at timestamptz NOT NULL DEFAULT now()
             )",
        )
        .await?;
        let current: i32 = tx
            .query_one("SELECT coalesce(max(version), 0) FROM schema_version", &[])
            .await?
            .try_get(0)?;
        if current > SCHEMA_VERSION {
            return Err(newer(current));
        }
        let mut applied = Vec::new();
        for (v, sql) in MIGRATIONS.iter().filter(|(v, _)| *v > current) {
            tx.batch_execute(sql)
                .await
                .map_err(|e| PgError::Failed(format!("migration {v}: {}", PgError::from(e))))?;
            tx.execute("INSERT INTO schema_version (version) VALUES ($1)", &[v])
                .await?;
            applied.push(*v);
        }
        tx.commit().await?;
        Ok(applied)
    }
    .await;
    drop(client);
    let _ = conn.await;
    result
}

fn newer(found: i32) -> PgError {
    PgError::Failed(format!(
        "the database's schema is version {found}, newer than this coordinator's {SCHEMA_VERSION}: run a coordinator of that version or later"
    ))
}

/// The PostgreSQL store (see the module docs).
#[derive(Clone)]
pub struct PgStore {
    pool: Pool,
    handle: Handle,
}

impl PgStore {
    /// Connects to `url` and checks that its schema is this build's. Call from within a
    /// tokio runtime (the pool's connections run on it).
    ///
    /// Errors: a URL that is not PostgreSQL's or names a remote host, an unreachable
    /// server ([`PgError::Unavailable`]), and a schema that was not migrated or is of
    /// another version (the message says what to run).
    pub async fn open(target: &Target) -> Result<Self> {
        let pool = target.pool()?;
        let client = pool.get().await.map_err(|e| target.explain(e.into()))?;
        let found: Option<i32> = match client
            .query_one("SELECT max(version) FROM schema_version", &[])
            .await
        {
            Ok(row) => row.try_get(0)?,
            Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::UNDEFINED_TABLE) => None,
            Err(e) => return Err(e.into()),
        };
        match found {
            Some(SCHEMA_VERSION) => {}
            Some(v) if v > SCHEMA_VERSION => return Err(newer(v)),
            Some(v) => {
                return Err(PgError::Failed(format!(
                    "the database's schema is version {v}, older than this coordinator's {SCHEMA_VERSION}: run `quorate-coordinator migrate --store URL` first"
                )));
            }
            None => {
                return Err(PgError::Failed(format!(
                    "the database has no coordinator schema: run `quorate-coordinator migrate --store URL` first (creates schema version {SCHEMA_VERSION})"
                )));
            }
        }
        drop(client);
        tracing::info!(store = %target.describe(), "PostgreSQL store");
        target.warn_if_classic();
        Ok(PgStore {
            pool,
            handle: Handle::current(),
        })
    }

    fn block<T>(&self, fut: impl Future<Output = Result<T>>) -> Result<T> {
        block(&self.handle, fut)
    }
}

fn key_id(b: &[u8], what: &str) -> Result<KeyId> {
    b.try_into()
        .map(KeyId)
        .map_err(|_| PgError::Failed(format!("{what}: malformed key id")))
}

fn corrupt(what: String) -> PgError {
    PgError::Failed(what)
}

impl KeyStore for PgStore {
    fn put_version(
        &self,
        name: &str,
        key: &KeyPublic,
        profile: &KeyProfile,
        versions: &[KeyVersion],
    ) -> crate::store::Result<()> {
        if versions.last().map(|v| v.key_id) != Some(key.key_id) {
            return Err(StoreError::Failed(format!(
                "key {name}: the version list must end with the new key {}",
                key.key_id
            )));
        }
        Ok(self.block(async {
            let mut c = self.pool.get().await?;
            let tx = c.transaction().await?;
            let id = &key.key_id.0[..];
            tx.execute(UPSERT_PUBLIC, &[&id, &key.to_bytes()]).await?;
            tx.execute(UPSERT_PROFILE, &[&id, &profile.to_bytes()])
                .await?;
            tx.execute("DELETE FROM key_versions WHERE name = $1", &[&name])
                .await?;
            for v in versions {
                tx.execute(
                    "INSERT INTO key_versions (name, version, key_id, created_at, retired_at)
                     VALUES ($1, $2, $3, $4, $5)",
                    &[
                        &name,
                        &i32::try_from(v.version).unwrap_or(i32::MAX),
                        &&v.key_id.0[..],
                        &v.created_at,
                        &v.retired_at,
                    ],
                )
                .await?;
            }
            tx.execute(
                "INSERT INTO key_names (name, key_id) VALUES ($1, $2)
                 ON CONFLICT (name) DO UPDATE SET key_id = EXCLUDED.key_id",
                &[&name, &id],
            )
            .await?;
            tx.commit().await?;
            Ok(())
        })?)
    }

    fn put_key(&self, name: &str, key: &KeyPublic) -> crate::store::Result<()> {
        let version = KeyVersion {
            version: 1,
            key_id: key.key_id,
            created_at: 0,
            retired_at: None,
        };
        let profile = KeyProfile::legacy(key.purpose, None);
        self.put_version(name, key, &profile, &[version])
    }

    fn put_pending_activation(
        &self,
        name: &str,
        session: &SessionId,
        key: &KeyPublic,
    ) -> crate::store::Result<()> {
        Ok(self.block(async {
            let c = self.pool.get().await?;
            c.execute(
                "INSERT INTO pending_activations (name, session, public) VALUES ($1, $2, $3)
                 ON CONFLICT (name) DO UPDATE SET session = EXCLUDED.session, public = EXCLUDED.public",
                &[&name, &&session.0[..], &key.to_bytes()],
            )
            .await?;
            Ok(())
        })?)
    }

    fn pending_activations(&self) -> crate::store::Result<Vec<(String, SessionId, KeyPublic)>> {
        Ok(self.block(async {
            let c = self.pool.get().await?;
            let rows = c
                .query(
                    "SELECT name, session, public FROM pending_activations ORDER BY name",
                    &[],
                )
                .await?;
            let mut out = Vec::with_capacity(rows.len());
            for r in rows {
                let name: String = r.try_get(0)?;
                let bad = || corrupt(format!("pending activation of key {name} is malformed"));
                let session: &[u8] = r.try_get(1)?;
                let session = SessionId(session.try_into().map_err(|_| bad())?);
                let public: &[u8] = r.try_get(2)?;
                let key = KeyPublic::from_bytes(public).map_err(|_| bad())?;
                out.push((name, session, key));
            }
            Ok(out)
        })?)
    }

    fn commit_activation(&self, name: &str, key: &KeyPublic, at: i64) -> crate::store::Result<()> {
        Ok(self.block(async {
            let mut c = self.pool.get().await?;
            let tx = c.transaction().await?;
            let id = &key.key_id.0[..];
            tx.execute(UPSERT_PUBLIC, &[&id, &key.to_bytes()]).await?;
            tx.execute(
                "INSERT INTO key_renewed (key_id, at) VALUES ($1, $2)
                 ON CONFLICT (key_id) DO UPDATE SET at = EXCLUDED.at",
                &[&id, &at],
            )
            .await?;
            tx.execute("DELETE FROM pending_activations WHERE name = $1", &[&name])
                .await?;
            tx.commit().await?;
            Ok(())
        })?)
    }

    fn put_retirements(
        &self,
        key: &KeyId,
        nodes: &[PartyIndex],
        request: &[u8],
    ) -> crate::store::Result<()> {
        Ok(self.block(async {
            let mut c = self.pool.get().await?;
            let tx = c.transaction().await?;
            for n in nodes {
                tx.execute(
                    "INSERT INTO retirements (key_id, node, request) VALUES ($1, $2, $3)
                     ON CONFLICT (key_id, node) DO UPDATE SET request = EXCLUDED.request",
                    &[&&key.0[..], &i32::from(n.get()), &request],
                )
                .await?;
            }
            tx.commit().await?;
            Ok(())
        })?)
    }

    fn retirements(&self) -> crate::store::Result<Vec<(KeyId, PartyIndex, Vec<u8>)>> {
        Ok(self.block(async {
            let c = self.pool.get().await?;
            let rows = c
                .query(
                    "SELECT key_id, node, request FROM retirements ORDER BY key_id, node",
                    &[],
                )
                .await?;
            let mut out = Vec::with_capacity(rows.len());
            for r in rows {
                let id = key_id(r.try_get(0)?, "a retirement record")?;
                let node: i32 = r.try_get(1)?;
                let node = u16::try_from(node)
                    .ok()
                    .and_then(PartyIndex::new)
                    .ok_or_else(|| corrupt("a retirement record is malformed".into()))?;
                out.push((id, node, r.try_get(2)?));
            }
            Ok(out)
        })?)
    }

    fn remove_retirement(&self, key: &KeyId, node: PartyIndex) -> crate::store::Result<()> {
        Ok(self.block(async {
            let c = self.pool.get().await?;
            c.execute(
                "DELETE FROM retirements WHERE key_id = $1 AND node = $2",
                &[&&key.0[..], &i32::from(node.get())],
            )
            .await?;
            Ok(())
        })?)
    }

    fn renewed_at(&self, id: &KeyId) -> crate::store::Result<Option<i64>> {
        Ok(self.block(async {
            let c = self.pool.get().await?;
            let row = c
                .query_opt(
                    "SELECT at FROM key_renewed WHERE key_id = $1",
                    &[&&id.0[..]],
                )
                .await?;
            Ok(match row {
                None => None,
                Some(r) => Some(r.try_get(0)?),
            })
        })?)
    }

    fn put_profile(&self, ids: &[KeyId], profile: &KeyProfile) -> crate::store::Result<()> {
        Ok(self.block(async {
            let mut c = self.pool.get().await?;
            let tx = c.transaction().await?;
            for id in ids {
                tx.execute(UPSERT_PROFILE, &[&&id.0[..], &profile.to_bytes()])
                    .await?;
            }
            tx.commit().await?;
            Ok(())
        })?)
    }

    fn keys(&self) -> crate::store::Result<Vec<NamedKey>> {
        Ok(self.block(async {
            let mut c = self.pool.get().await?;
            // One snapshot of every table.
            let tx = c
                .build_transaction()
                .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
                .read_only(true)
                .start()
                .await?;
            let mut publics = HashMap::new();
            for r in tx.query("SELECT key_id, public FROM keys", &[]).await? {
                let id = key_id(r.try_get(0)?, "keys")?;
                let b: &[u8] = r.try_get(1)?;
                let p = KeyPublic::from_bytes(b).map_err(|e| corrupt(format!("key {id}: {e}")))?;
                publics.insert(id, p);
            }
            let mut profiles = HashMap::new();
            for r in tx
                .query("SELECT key_id, profile FROM key_profiles", &[])
                .await?
            {
                let id = key_id(r.try_get(0)?, "key_profiles")?;
                let b: &[u8] = r.try_get(1)?;
                let p = KeyProfile::from_bytes(b)
                    .map_err(|e| corrupt(format!("profile of key {id}: {e}")))?;
                profiles.insert(id, p);
            }
            let mut lists: HashMap<String, Vec<KeyVersion>> = HashMap::new();
            for r in tx
                .query(
                    "SELECT name, version, key_id, created_at, retired_at FROM key_versions
                     ORDER BY name, version",
                    &[],
                )
                .await?
            {
                let name: String = r.try_get(0)?;
                let version: i32 = r.try_get(1)?;
                let v = KeyVersion {
                    version: u32::try_from(version)
                        .map_err(|_| corrupt(format!("key {name}: negative version")))?,
                    key_id: key_id(r.try_get(2)?, &format!("key {name}"))?,
                    created_at: r.try_get(3)?,
                    retired_at: r.try_get(4)?,
                };
                lists.entry(name).or_default().push(v);
            }
            let mut out = Vec::new();
            for r in tx
                .query("SELECT name, key_id FROM key_names ORDER BY name", &[])
                .await?
            {
                let name: String = r.try_get(0)?;
                let current = key_id(r.try_get(1)?, &format!("key {name}"))?;
                let list = lists.remove(&name).unwrap_or_default();
                if list.last().map(|v| v.key_id) != Some(current) {
                    return Err(corrupt(format!(
                        "key {name}: the current key is not the newest version"
                    )));
                }
                let mut versions = Vec::with_capacity(list.len());
                for v in list {
                    let public = publics.get(&v.key_id).cloned().ok_or_else(|| {
                        corrupt(format!("key {name}: version {} has no key data", v.version))
                    })?;
                    let profile = match profiles.get(&v.key_id) {
                        Some(p) => p.clone(),
                        None => KeyProfile::legacy(public.purpose, None),
                    };
                    versions.push(StoredVersion {
                        version: v,
                        public,
                        profile,
                    });
                }
                let public = versions
                    .last()
                    .map(|v| v.public.clone())
                    .ok_or_else(|| corrupt(format!("key {name}: no versions")))?;
                out.push(NamedKey {
                    name,
                    public,
                    versions,
                });
            }
            tx.commit().await?;
            Ok(out)
        })?)
    }

    fn drop_stored_pools(&self) -> crate::store::Result<u64> {
        // This schema never stored presignatures.
        Ok(0)
    }

    fn key_id(&self, name: &str) -> crate::store::Result<Option<KeyId>> {
        Ok(self.block(async {
            let c = self.pool.get().await?;
            match c
                .query_opt("SELECT key_id FROM key_names WHERE name = $1", &[&name])
                .await?
            {
                None => Ok(None),
                Some(r) => Ok(Some(key_id(r.try_get(0)?, &format!("key {name}"))?)),
            }
        })?)
    }
}

/// The `meta` entry holding the operator-signed policy bundle last applied.
const POLICY_BUNDLE: &str = "policy_bundle";

type IdResult<T> = core::result::Result<T, IdentityStoreError>;

impl IdentityStore for PgStore {
    fn put_policy_bundle(&self, jws: &str) -> IdResult<()> {
        Ok(self.block(async {
            let c = self.pool.get().await?;
            c.execute(
                "INSERT INTO meta (name, value) VALUES ($1, $2)
                 ON CONFLICT (name) DO UPDATE SET value = EXCLUDED.value",
                &[&POLICY_BUNDLE, &jws],
            )
            .await?;
            Ok(())
        })?)
    }

    fn policy_bundle(&self) -> IdResult<Option<String>> {
        Ok(self.block(async {
            let c = self.pool.get().await?;
            let row = c
                .query_opt("SELECT value FROM meta WHERE name = $1", &[&POLICY_BUNDLE])
                .await?;
            Ok(match row {
                None => None,
                Some(r) => Some(r.try_get(0)?),
            })
        })?)
    }

    fn put_task(&self, task: &Task) -> IdResult<()> {
        let record = crate::identity::store::encode_task(task)?;
        Ok(self.block(async {
            let c = self.pool.get().await?;
            c.execute(
                "INSERT INTO tasks (id, record) VALUES ($1, $2)
                 ON CONFLICT (id) DO UPDATE SET record = EXCLUDED.record",
                &[&task.id, &record],
            )
            .await?;
            Ok(())
        })?)
    }

    fn task(&self, id: &str) -> IdResult<Option<Task>> {
        let record: Option<String> = self.block(async {
            let c = self.pool.get().await?;
            let row = c
                .query_opt("SELECT record FROM tasks WHERE id = $1", &[&id])
                .await?;
            Ok(match row {
                None => None,
                Some(r) => Some(r.try_get(0)?),
            })
        })?;
        record
            .map(|r| crate::identity::store::decode_task(id, r.as_bytes()))
            .transpose()
    }

    fn end_task(&self, id: &str, now: i64) -> IdResult<Option<Task>> {
        let record: Option<String> = self.block(async {
            let mut c = self.pool.get().await?;
            let tx = c.transaction().await?;
            let row = tx
                .query_opt("SELECT record FROM tasks WHERE id = $1 FOR UPDATE", &[&id])
                .await?;
            let Some(row) = row else {
                return Ok(None);
            };
            let record: String = row.try_get(0)?;
            let task = crate::identity::store::decode_task(id, record.as_bytes())
                .map_err(|e| PgError::Failed(e.to_string()))?;
            if task.ended_at.is_some() {
                return Ok(Some(record));
            }
            let mut ended = task;
            ended.ended_at = Some(now);
            let updated = crate::identity::store::encode_task(&ended)
                .map_err(|e| PgError::Failed(e.to_string()))?;
            tx.execute(
                "UPDATE tasks SET record = $2 WHERE id = $1",
                &[&id, &updated],
            )
            .await?;
            tx.commit().await?;
            Ok(Some(updated))
        })?;
        record
            .map(|r| crate::identity::store::decode_task(id, r.as_bytes()))
            .transpose()
    }

    fn revoke_jti(&self, jti: &str, exp: i64) -> IdResult<()> {
        Ok(self.block(async {
            let c = self.pool.get().await?;
            c.execute(
                "INSERT INTO revoked_jti (jti, exp) VALUES ($1, $2)
                 ON CONFLICT (jti) DO UPDATE SET exp = greatest(revoked_jti.exp, EXCLUDED.exp)",
                &[&jti, &exp],
            )
            .await?;
            Ok(())
        })?)
    }

    fn jti_revoked(&self, jti: &str) -> IdResult<bool> {
        Ok(self.block(async {
            let c = self.pool.get().await?;
            let row = c
                .query_opt("SELECT 1 FROM revoked_jti WHERE jti = $1", &[&jti])
                .await?;
            Ok(row.is_some())
        })?)
    }

    fn revoke_agent(&self, subject: &str, now: i64) -> IdResult<i64> {
        Ok(self.block(async {
            let c = self.pool.get().await?;
            // Keeps the first revocation time (a no-op update returns the stored row).
            let row = c
                .query_one(
                    "INSERT INTO revoked_agents (subject, at) VALUES ($1, $2)
                     ON CONFLICT (subject) DO UPDATE SET at = revoked_agents.at
                     RETURNING at",
                    &[&subject, &now],
                )
                .await?;
            Ok(row.try_get(0)?)
        })?)
    }

    fn agent_revoked_at(&self, subject: &str) -> IdResult<Option<i64>> {
        Ok(self.block(async {
            let c = self.pool.get().await?;
            let row = c
                .query_opt(
                    "SELECT at FROM revoked_agents WHERE subject = $1",
                    &[&subject],
                )
                .await?;
            Ok(match row {
                None => None,
                Some(r) => Some(r.try_get(0)?),
            })
        })?)
    }

    fn purge_expired(&self, now: i64) -> IdResult<usize> {
        Ok(self.block(async {
            let c = self.pool.get().await?;
            let n = c
                .execute("DELETE FROM revoked_jti WHERE exp < $1", &[&now])
                .await?;
            c.execute("DELETE FROM one_use WHERE expires_at < $1", &[&now])
                .await?;
            c.execute("DELETE FROM issuance WHERE expires_at < $1", &[&now])
                .await?;
            c.execute(
                "DELETE FROM approvals
                 WHERE state NOT IN ('pending', 'deciding', 'approved') AND expires_at < $1",
                &[&now.saturating_sub(KEEP_DECIDED_SECONDS)],
            )
            .await?;
            Ok(usize::try_from(n).unwrap_or(usize::MAX))
        })?)
    }

    fn first_use(
        &self,
        kind: OneUse,
        scope: &str,
        jti: &str,
        owner: &str,
        expires_at: i64,
        now: i64,
    ) -> IdResult<bool> {
        Ok(self.block(async {
            let c = self.pool.get().await?;
            // A row is written (inserted, or an expired one replaced) only on first use;
            // its owner's retries touch it again, nobody else does.
            let n = c
                .execute(
                    "INSERT INTO one_use (kind, scope, jti, owner, expires_at) VALUES ($1, $2, $3, $4, $5)
                     ON CONFLICT (kind, scope, jti) DO UPDATE
                       SET expires_at = EXCLUDED.expires_at, owner = EXCLUDED.owner
                     WHERE one_use.expires_at < $6
                        OR (one_use.owner <> '' AND one_use.owner = EXCLUDED.owner)",
                    &[&kind.as_str(), &scope, &jti, &owner, &expires_at, &now],
                )
                .await?;
            Ok(n == 1)
        })?)
    }

    fn issuance_begin(&self, key: &str, digest: &str, expires_at: i64) -> IdResult<Issuance> {
        self.block(async {
            let c = self.pool.get().await?;
            c.execute(
                "INSERT INTO issuance (key, digest, expires_at) VALUES ($1, $2, $3)
                 ON CONFLICT (key) DO NOTHING",
                &[&key, &digest, &expires_at],
            )
            .await?;
            issuance_row(&c, key).await
        })?
        .ok_or_else(|| no_issuance(key))
    }

    fn issuance_claims(&self, key: &str, claims: &str) -> IdResult<String> {
        self.block(async {
            let c = self.pool.get().await?;
            c.execute(
                "UPDATE issuance SET claims = $2 WHERE key = $1 AND claims IS NULL",
                &[&key, &claims],
            )
            .await?;
            issuance_row(&c, key).await
        })?
        .and_then(|r| r.claims)
        .ok_or_else(|| no_issuance(key))
    }

    fn issuance_reply(&self, key: &str, reply: &str) -> IdResult<String> {
        self.block(async {
            let c = self.pool.get().await?;
            c.execute(
                "UPDATE issuance SET reply = $2 WHERE key = $1 AND reply IS NULL",
                &[&key, &reply],
            )
            .await?;
            issuance_row(&c, key).await
        })?
        .and_then(|r| r.reply)
        .ok_or_else(|| no_issuance(key))
    }

    fn approval_insert(&self, entry: &Stored) -> IdResult<()> {
        let record = encode_approval(entry)?;
        let e = &entry.entry;
        Ok(self.block(async {
            let c = self.pool.get().await?;
            c.execute(
                "INSERT INTO approvals (id, state, expires_at, record) VALUES ($1, $2, $3, $4)",
                &[&e.id, &approval_state(entry), &e.expires_at, &record],
            )
            .await?;
            Ok(())
        })?)
    }

    fn approval(&self, id: &str) -> IdResult<Option<Stored>> {
        let record: Option<String> = self.block(async {
            let c = self.pool.get().await?;
            let row = c
                .query_opt("SELECT record FROM approvals WHERE id = $1", &[&id])
                .await?;
            Ok(match row {
                None => None,
                Some(r) => Some(r.try_get(0)?),
            })
        })?;
        record.map(|r| decode_approval(&r)).transpose()
    }

    fn approvals(&self, open_only: bool) -> IdResult<Vec<Stored>> {
        let records: Vec<String> = self.block(async {
            let c = self.pool.get().await?;
            let rows = c
                .query(
                    "SELECT record FROM approvals WHERE NOT $1 OR state IN ('pending', 'deciding')",
                    &[&open_only],
                )
                .await?;
            rows.iter()
                .map(|r| r.try_get(0).map_err(PgError::from))
                .collect()
        })?;
        records.iter().map(|r| decode_approval(r)).collect()
    }

    fn approvals_due(&self, now: i64) -> IdResult<Vec<String>> {
        Ok(self.block(async {
            let c = self.pool.get().await?;
            let rows = c
                .query(
                    "SELECT id FROM approvals
                     WHERE state IN ('pending', 'deciding') AND expires_at <= $1",
                    &[&now],
                )
                .await?;
            rows.iter()
                .map(|r| r.try_get(0).map_err(PgError::from))
                .collect()
        })?)
    }

    fn approval_update(
        &self,
        id: &str,
        change: &mut dyn FnMut(&mut Stored) -> core::result::Result<(), ApprovalError>,
    ) -> IdResult<core::result::Result<Stored, ApprovalError>> {
        Ok(self.block(async {
            let mut c = self.pool.get().await?;
            let tx = c.transaction().await?;
            // The row lock serialises changes to one entry across coordinators.
            let row = tx
                .query_opt(
                    "SELECT record FROM approvals WHERE id = $1 FOR UPDATE",
                    &[&id],
                )
                .await?;
            let Some(row) = row else {
                return Ok(Err(ApprovalError::Unknown(id.to_owned())));
            };
            let record: String = row.try_get(0)?;
            let mut s = decode_approval(&record).map_err(|e| PgError::Failed(e.0))?;
            if let Err(e) = change(&mut s) {
                return Ok(Err(e));
            }
            let updated = encode_approval(&s).map_err(|e| PgError::Failed(e.0))?;
            tx.execute(
                "UPDATE approvals SET state = $2, expires_at = $3, record = $4 WHERE id = $1",
                &[&id, &approval_state(&s), &s.entry.expires_at, &updated],
            )
            .await?;
            tx.commit().await?;
            Ok(Ok(s))
        })?)
    }
}

/// The `approvals.state` column: the entry's state, or `deciding` while claimed.
fn approval_state(s: &Stored) -> &'static str {
    if s.deciding {
        "deciding"
    } else {
        s.entry.state.as_str()
    }
}

/// The issuance record of `key`, if any.
async fn issuance_row(c: &tokio_postgres::Client, key: &str) -> Result<Option<Issuance>> {
    let row = c
        .query_opt(
            "SELECT digest, claims, reply, expires_at FROM issuance WHERE key = $1",
            &[&key],
        )
        .await?;
    Ok(match row {
        None => None,
        Some(r) => Some(Issuance {
            digest: r.try_get(0)?,
            claims: r.try_get(1)?,
            reply: r.try_get(2)?,
            expires_at: r.try_get(3)?,
        }),
    })
}

impl AuditStore for PgStore {
    fn last(&self) -> core::result::Result<Option<(u64, String)>, String> {
        self.block(async {
            let c = self.pool.get().await?;
            let row = c
                .query_opt(
                    "SELECT seq, line FROM audit_events ORDER BY seq DESC LIMIT 1",
                    &[],
                )
                .await?;
            Ok(match row {
                None => None,
                Some(r) => {
                    let seq: i64 = r.try_get(0)?;
                    Some((
                        u64::try_from(seq)
                            .map_err(|_| corrupt("audit store: negative seq".into()))?,
                        r.try_get(1)?,
                    ))
                }
            })
        })
        .map_err(|e| e.to_string())
    }

    fn commit(&self, batch: &[(Event, String)]) -> core::result::Result<(), CommitError> {
        let Some((first, _)) = batch.first() else {
            return Ok(());
        };
        let outcome = self.block(async {
            let mut c = self.pool.get().await?;
            let tx = c.transaction().await?;
            // Every appender, on every coordinator, queues here: one order.
            let head = tx
                .query_one(
                    "SELECT seq, hash FROM audit_head WHERE only_row FOR UPDATE",
                    &[],
                )
                .await?;
            let (next, prev) = head_of(&head)?;
            if first.seq != next || first.prev != prev {
                return Ok(Some((next, prev)));
            }
            let mut last = None;
            for (ev, line) in batch {
                let seq = i64::try_from(ev.seq)
                    .map_err(|_| corrupt("audit store: seq out of range".into()))?;
                tx.execute(
                    "INSERT INTO audit_events (seq, line) VALUES ($1, $2)",
                    &[&seq, line],
                )
                .await?;
                last = Some((seq, ev.hash.as_str()));
            }
            if let Some((seq, hash)) = last {
                tx.execute(
                    "INSERT INTO audit_head (only_row, seq, hash) VALUES (true, $1, $2)
                     ON CONFLICT (only_row) DO UPDATE SET seq = EXCLUDED.seq, hash = EXCLUDED.hash",
                    &[&seq, &hash],
                )
                .await?;
            }
            tx.commit().await?;
            Ok(None)
        });
        match outcome {
            Ok(None) => Ok(()),
            Ok(Some((next, head))) => Err(CommitError::Behind { next, head }),
            Err(e) => Err(CommitError::Failed(e.to_string())),
        }
    }

    fn lines(&self, from: u64, to: u64) -> core::result::Result<Vec<String>, String> {
        let from = i64::try_from(from).unwrap_or(i64::MAX);
        let to = i64::try_from(to).unwrap_or(i64::MAX);
        self.block(async {
            let c = self.pool.get().await?;
            let rows = c
                .query(
                    "SELECT line FROM audit_events WHERE seq >= $1 AND seq < $2 ORDER BY seq",
                    &[&from, &to],
                )
                .await?;
            rows.iter()
                .map(|r| r.try_get(0).map_err(PgError::from))
                .collect()
        })
        .map_err(|e| e.to_string())
    }

    fn rechains(&self) -> bool {
        true
    }
}

/// The next sequence number and the newest hash, from the head row (seq -1: empty).
fn head_of(r: &tokio_postgres::Row) -> Result<(u64, String)> {
    let seq: i64 = r.try_get(0)?;
    let next = u64::try_from(seq.saturating_add(1))
        .map_err(|_| corrupt(format!("audit store: head seq {seq} is out of range")))?;
    Ok((next, r.try_get(1)?))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn err(url: &str) -> String {
        Target::parse(url).unwrap_err().to_string()
    }

    #[test]
    fn local_hosts_may_go_unencrypted_and_others_must_not() {
        for url in [
            "postgres://q@localhost/quorate",
            "postgres://q@127.0.0.1:5433/quorate?sslmode=disable",
            "postgresql://q@[::1]/quorate",
            "postgres:///quorate?host=/run/postgresql&user=q",
        ] {
            let t = Target::parse(url).unwrap();
            assert!(t.describe().contains("unencrypted"), "{url}");
        }
        let e = err("postgres://q:s3cret@db.example.com/quorate");
        assert!(
            e.contains("db.example.com") && e.contains("sslmode=verify-full"),
            "{e}"
        );
        assert!(!e.contains("s3cret"), "{e}");
        let e = err("postgres://q@db.example.com/quorate?sslmode=disable");
        assert!(e.contains("only over a Unix socket or a loopback"), "{e}");
        // tokio-postgres connects to hostaddr, whatever the host's name.
        let e = err("postgres://q:s3cret@localhost:5499/quorate?hostaddr=192.0.2.2");
        assert!(
            e.contains("hostaddr 192.0.2.2") && !e.contains("s3cret"),
            "{e}"
        );
        assert!(Target::parse("postgres://q@localhost/quorate?hostaddr=127.0.0.1").is_ok());
        // A password holding '?' must not move parameters into or out of the userinfo.
        for url in [
            "postgres://q:s3cret?x&sslmode=verify-full&sslrootcert=/x&y@192.0.2.2:5500/quorate",
            "postgres://q:S3CR?sslmode=ETPW@localhost:5499/quorate",
            "postgres://q:s3#cret@localhost/quorate",
        ] {
            let e = err(url);
            assert!(
                e.contains("percent-encode") && !e.contains("s3cret") && !e.contains("ETPW"),
                "{e}"
            );
        }
        assert!(Target::parse("postgres://q:s3%3Fcr%40et@localhost/quorate").is_ok());
        // tokio-postgres's own complaints name the option, never its value.
        let e = err("postgres://q@localhost/quorate?sslpassword=s3cret");
        assert!(e.contains("sslpassword") && !e.contains("s3cret"), "{e}");
        // Every session asks for keepalives; an operator's own options stay.
        let t =
            Target::parse("postgres://q@localhost/quorate?options=-c%20statement_timeout%3D1000")
                .unwrap();
        let o = t.cfg.get_options().unwrap();
        assert!(
            o.starts_with("-c statement_timeout=1000 ") && o.ends_with(SERVER_KEEPALIVES),
            "{o}"
        );
        assert_eq!(t.cfg.get_keepalives_idle(), Duration::from_secs(2));
        assert!(err("mysql://x").contains("not a PostgreSQL URL"));
        assert!(err("host=localhost user=q").contains("not a PostgreSQL URL"));
    }

    #[test]
    fn weak_or_incomplete_tls_settings_are_refused_by_name() {
        for mode in ["require", "prefer", "allow", "verify-ca"] {
            let e = err(&format!(
                "postgres://q@db.example.com/quorate?sslmode={mode}&sslrootcert=/x"
            ));
            assert!(
                e.contains(&format!("sslmode={mode}")) && e.contains("verify-full"),
                "{e}"
            );
        }
        assert!(err("postgres://q@db/quorate?sslmode=verify-full").contains("sslrootcert"));
        assert!(
            err("postgres://q@db/quorate?sslmode=verify-full&sslrootcert=system")
                .contains("system")
        );
        assert!(err("postgres://q@localhost/quorate?sslrootcert=/x").contains("only with"));
        assert!(
            err("postgres:///quorate?host=/run/postgresql&sslmode=verify-full&sslrootcert=/x")
                .contains("Unix socket")
        );
        let e = err("postgres://q@db/quorate?sslmode=verify-full&sslrootcert=/nonexistent/ca.pem");
        assert!(e.contains("/nonexistent/ca.pem"), "{e}");
        let e = err("postgres://q@db/quorate?sslmode=verify-full&sslrootcert=/x&sslcert=/c");
        assert!(e.contains("sslcert and sslkey"), "{e}");
        let e = err("postgres://q@db/quorate?sslmode=verify-full&sslmode=disable");
        assert!(e.contains("twice"), "{e}");
        let e = err("postgres://q@db/quorate?sslmode=s3cret");
        assert!(e.contains("not a mode") && !e.contains("s3cret"), "{e}");
    }

    #[test]
    fn key_exchange_groups_must_lead_with_the_hybrid_group() {
        let dir = tempfile::tempdir().unwrap();
        let ca = rcgen::generate_simple_self_signed(vec!["db".into()]).unwrap();
        let path = dir.path().join("ca.pem");
        std::fs::write(&path, ca.cert.pem()).unwrap();
        let url = |groups: &str| {
            format!(
                "postgres://q@db.example.com/quorate?sslmode=verify-full&sslrootcert={}{groups}",
                path.display()
            )
        };
        let t = Target::parse(&url("")).unwrap();
        assert!(!t.allows_classic());
        assert!(
            t.describe().contains("key exchange X25519MLKEM768)"),
            "{t:?}"
        );
        let t = Target::parse(&url("&ssl_groups=X25519MLKEM768:prime256v1")).unwrap();
        assert!(t.allows_classic());
        assert!(t.describe().contains("X25519MLKEM768:P-256"), "{t:?}");
        let e = err(&url("&ssl_groups=P-256"));
        assert!(e.contains("must start with X25519MLKEM768"), "{e}");
        let e = err(&url("&ssl_groups=X25519MLKEM768:ffdhe2048"));
        assert!(e.contains("`ffdhe2048` is not a group"), "{e}");

        // Handshake failures: a hint that fits the cause, and no retry for a
        // configuration fault; a lost connection stays retryable.
        let hybrid = Target::parse(&url("")).unwrap();
        let classic = Target::parse(&url("&ssl_groups=X25519MLKEM768:X25519")).unwrap();
        let shown = |t: &Target, m: &str| t.explain(PgError::Unavailable(m.into()));
        let alert = "error performing TLS handshake: received fatal alert: HandshakeFailure";
        let e = shown(&hybrid, alert);
        assert!(
            matches!(&e, PgError::Failed(m) if m.contains("ssl_groups=X25519MLKEM768:P-256")),
            "{e}"
        );
        let e = shown(&classic, alert);
        assert!(
            matches!(&e, PgError::Failed(m) if m.contains("X25519MLKEM768:X25519") && !m.contains("PostgreSQL 18")),
            "{e}"
        );
        let e = shown(
            &hybrid,
            "error performing TLS handshake: received fatal alert: ProtocolVersion",
        );
        assert!(
            matches!(&e, PgError::Failed(m) if m.contains("TLS 1.3") && !m.contains("ssl_groups")),
            "{e}"
        );
        let e = shown(
            &hybrid,
            "error performing TLS handshake: server does not support TLS",
        );
        assert!(
            matches!(&e, PgError::Failed(m) if m.contains("turn ssl on")),
            "{e}"
        );
        let e = shown(
            &hybrid,
            "error performing TLS handshake: invalid peer certificate: UnknownIssuer",
        );
        assert!(matches!(&e, PgError::Failed(_)), "{e}");
        let e = shown(&hybrid, "error connecting to server: Connection refused");
        assert!(matches!(&e, PgError::Unavailable(_)), "{e}");
    }
}
