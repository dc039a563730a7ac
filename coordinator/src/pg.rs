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
//! Connections are unencrypted, so only a Unix socket or a loopback address is accepted
//! ([`parse_url`]).

use std::collections::HashMap;
use std::future::Future;
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use quorate_crypto::keys::{KeyId, KeyPublic};
use quorate_crypto::params::{PartyIndex, SessionId};
use quorate_crypto::wire::Wire;
use quorate_proto::profile::KeyProfile;
use tokio::runtime::{Handle, RuntimeFlavor};
use tokio_postgres::NoTls;
use tokio_postgres::config::Host;

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

/// Parses `postgres://…` (or `postgresql://…`, or key=value) connection settings and
/// checks that they name a Unix socket or a loopback address, since the connection is
/// not encrypted.
pub fn parse_url(url: &str) -> Result<tokio_postgres::Config> {
    let mut cfg: tokio_postgres::Config = url
        .parse()
        .map_err(|e| PgError::Failed(format!("--store: not a PostgreSQL URL: {e}")))?;
    if cfg.get_hosts().is_empty() {
        return Err(PgError::Failed(
            "--store: the URL names no host; give a Unix socket directory (?host=/run/postgresql) or a loopback address".into(),
        ));
    }
    for h in cfg.get_hosts() {
        if let Host::Tcp(name) = h {
            let loopback = name == "localhost"
                || name
                    .trim_start_matches('[')
                    .trim_end_matches(']')
                    .parse::<std::net::IpAddr>()
                    .is_ok_and(|a| a.is_loopback());
            if !loopback {
                return Err(PgError::Failed(format!(
                    "--store: host {name} is neither a Unix socket nor a loopback address; connections to PostgreSQL are not encrypted yet, so run the coordinator next to it"
                )));
            }
        }
    }
    if cfg.get_connect_timeout().is_none() {
        cfg.connect_timeout(CALL_TIMEOUT);
    }
    Ok(cfg)
}

fn pool(cfg: tokio_postgres::Config) -> Result<Pool> {
    let mgr = Manager::from_config(
        cfg,
        NoTls,
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    Pool::builder(mgr)
        .max_size(16)
        .runtime(deadpool_postgres::Runtime::Tokio1)
        .wait_timeout(Some(CALL_TIMEOUT))
        .create_timeout(Some(CALL_TIMEOUT))
        .recycle_timeout(Some(CALL_TIMEOUT))
        .build()
        .map_err(|e| PgError::Failed(format!("connection pool: {e}")))
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
pub async fn migrate(url: &str) -> Result<Vec<i32>> {
    let cfg = parse_url(url)?;
    let (mut client, conn) = cfg.connect(NoTls).await?;
    let conn = tokio::spawn(conn);
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
    pub async fn open(url: &str) -> Result<Self> {
        let pool = pool(parse_url(url)?)?;
        let client = pool.get().await?;
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

    #[test]
    fn urls_must_name_a_socket_or_loopback() {
        assert!(parse_url("postgres://q@localhost/quorate").is_ok());
        assert!(parse_url("postgres://q@127.0.0.1:5433/quorate").is_ok());
        assert!(parse_url("postgresql://q@[::1]/quorate").is_ok());
        assert!(parse_url("postgres:///quorate?host=/run/postgresql&user=q").is_ok());
        let e = parse_url("postgres://q@db.example.com/quorate")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("db.example.com") && e.contains("not encrypted"),
            "{e}"
        );
        let e = parse_url("mysql://x").unwrap_err().to_string();
        assert!(e.contains("not a PostgreSQL URL"), "{e}");
    }
}
