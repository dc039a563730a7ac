//! The node's durable store (DESIGN.md §5): a redb file whose secret values are sealed
//! at rest with AES-256-GCM under the node's key-encryption key (KEK).
//!
//! Every value is `nonce (12) || ciphertext`, with AAD `table name || record key`, so a
//! value copied to another record or table does not open. Every write that precedes a
//! reply is committed with redb's default `Durability::Immediate` (fsync) before the
//! reply is sent. Presignatures are never written here: they live in the node
//! process's memory only ([`crate::presigs`]); the release log is appended in the
//! background.
//!
//! Tables:
//! - `meta`: the node's KEM secret key, the policy bundle, and for a moment the health
//!   probe's write (see below);
//! - `pending`: key shares from a DKG or refresh awaiting the coordinator's commit,
//!   by session id;
//! - `keys`: active key shares, by key id;
//! - `presigs`: no longer used; emptied at [`Store::open`], so the secret `w_j, v_j` an
//!   earlier version stored there do not stay at rest;
//! - `released`: append-only log of every share this node released;
//! - `profiles`: each key's [`KeyProfile`] (DESIGN.md §9), by key id, unsealed (public;
//!   versioned encoding). Written once, when the key's DKG starts; the only later change
//!   is the narrowing raw → checkpoint ([`Store::narrow_profile`]);
//! - `token_rules`: read only to migrate a store written before profiles existed: at
//!   [`Store::open`] every active key without a profile gets one (a key with token rules
//!   becomes a token key, any other signing key raw, derive and decrypt keys keep their
//!   purpose).
//!
//! ## Health and recovery without a restart
//!
//! A write that fails (a full disk, an I/O error) fails its caller: nothing retries it
//! behind the caller's back, so no reply ever rests on a write that did not commit. It
//! also marks the store unhealthy ([`Store::fault`]), which the node reports in its
//! inventory (`InventoryReply.store_error`): the coordinator leaves the node out of new
//! work until it clears. After an I/O error redb refuses every later operation
//! (`PreviousIo`) until the database is opened again, so the store then closes its
//! handle (releasing redb's file lock) and opens the file again; redb's recovery brings
//! it back to the last committed transaction. While unhealthy, the recovery thread
//! ([`Store::start_recovery`]) tries every [`PROBE_INTERVAL`]: it reopens if needed and
//! commits a probe write of [`PROBE_BYTES`] (deleted again at once); once one commits,
//! and nothing failed meanwhile, the fault clears. Both transitions are logged.
//!
//! Every operation runs its whole transaction under a read lock of the handle;
//! reopening takes the write lock, so no operation sees a half-reopened store and no
//! transaction outlives the handle it was made from. No operation calls another under
//! the lock (a reader waiting behind a queued reopen would deadlock a nested one).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError, RwLock, Weak};
use std::time::{Duration, Instant};

use aes_gcm::Aes256Gcm;
use aes_gcm::aead::{Aead, KeyInit, Payload};
use quorate_crypto::keys::{KeyId, KeyShare};
use quorate_crypto::params::SessionId;
use quorate_crypto::seal::KemSecretKey;
use quorate_proto::profile::KeyProfile;
use quorate_proto::rules::TokenRules;
use rand::TryRng;
use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};
use zeroize::Zeroizing;

/// redb's page cache. Its default (1 GiB) let the cache grow with the pool: a node
/// holding 100 000 presignatures reached 65 MiB resident. Records are read once (to
/// sign) and written twice, so a small cache loses little; the kernel's page cache
/// still serves re-reads.
const CACHE_BYTES: usize = 8 << 20;

/// How often an unhealthy store tries to recover: reopen the database if an I/O error
/// left it refusing work, then commit a probe write.
pub const PROBE_INTERVAL: Duration = Duration::from_secs(1);

const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
const PENDING: TableDefinition<&[u8], &[u8]> = TableDefinition::new("pending");
const KEYS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("keys");
const PRESIGS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("presigs");
const RELEASED: TableDefinition<u64, &[u8]> = TableDefinition::new("released");
const TOKEN_RULES: TableDefinition<&[u8], &[u8]> = TableDefinition::new("token_rules");
const PROFILES: TableDefinition<&[u8], &[u8]> = TableDefinition::new("profiles");
/// The META entry holding the policy bundle's JWS.
const POLICY_BUNDLE: &str = "policy_bundle";
/// The META entry the health probe writes and deletes again ([`Store::probe`]); never
/// part of a backup.
const PROBE: &str = "probe";
/// How much room a health probe must find: enough for a few thousand release-log
/// entries, so that a node reported healthy can take work again.
pub const PROBE_BYTES: usize = 256 << 10;

/// Store errors. Messages never contain secret material.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The database failed.
    #[error("node store: {0}")]
    Db(String),
    /// The disk or the file failed (an I/O error, or the database refusing work after
    /// one until it is reopened): the operation did not happen. The store reopens
    /// itself and reports the fault until a write commits again.
    #[error("node store: {0}")]
    Io(String),
    /// A sealed value did not open: wrong KEK, or the file was altered.
    #[error(
        "node store: a sealed record in table `{0}` does not open with this key-encryption key (wrong KEK file, or the store was altered)"
    )]
    Unseal(&'static str),
    /// A record decoded to something invalid.
    #[error("node store: corrupt record in table `{table}`: {detail}")]
    Corrupt {
        /// Table.
        table: &'static str,
        /// What is wrong.
        detail: String,
    },
    /// The KEK file is unusable.
    #[error("{0}")]
    Kek(String),
}

impl<E: Into<redb::Error>> From<E> for StoreError {
    fn from(e: E) -> Self {
        let e = e.into();
        match e {
            redb::Error::Io(_)
            | redb::Error::PreviousIo
            | redb::Error::DatabaseClosed
            | redb::Error::Backend(_) => StoreError::Io(e.to_string()),
            _ => StoreError::Db(e.to_string()),
        }
    }
}

/// Result alias.
pub type Result<T, E = StoreError> = core::result::Result<T, E>;

/// The key-encryption key: 32 bytes, from a file that only the owner can read.
pub struct Kek(Zeroizing<[u8; 32]>);

impl Kek {
    /// Loads the KEK from `path` (32 raw bytes or 64 hex characters). Refuses a file that
    /// group or others can read. With `create`, makes a fresh one (mode 0600) if absent.
    pub fn load(path: &Path, create: bool) -> Result<Self> {
        use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
        if !path.exists() {
            if !create {
                return Err(StoreError::Kek(format!(
                    "key-encryption key file {} does not exist: create 32 random bytes with mode 0600, or start with --init-kek",
                    path.display()
                )));
            }
            let mut k = Zeroizing::new([0u8; 32]);
            rand::rngs::SysRng
                .try_fill_bytes(&mut k[..])
                .map_err(|e| StoreError::Kek(format!("system RNG failed: {e}")))?;
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)
                .map_err(|e| StoreError::Kek(format!("cannot create {}: {e}", path.display())))?;
            std::io::Write::write_all(&mut f, &k[..])
                .and_then(|()| f.sync_all())
                .map_err(|e| StoreError::Kek(format!("cannot write {}: {e}", path.display())))?;
            return Ok(Kek(k));
        }
        let meta = std::fs::metadata(path)
            .map_err(|e| StoreError::Kek(format!("cannot read {}: {e}", path.display())))?;
        if meta.permissions().mode() & 0o077 != 0 {
            return Err(StoreError::Kek(format!(
                "key-encryption key file {} is readable by group or others (mode {:o}): run `chmod 600 {}`",
                path.display(),
                meta.permissions().mode() & 0o777,
                path.display()
            )));
        }
        let raw = Zeroizing::new(
            std::fs::read(path)
                .map_err(|e| StoreError::Kek(format!("cannot read {}: {e}", path.display())))?,
        );
        let mut k = Zeroizing::new([0u8; 32]);
        if raw.len() == 32 {
            k.copy_from_slice(&raw);
        } else {
            let text = String::from_utf8_lossy(&raw);
            let hex = text.trim();
            if hex.len() != 64 {
                return Err(StoreError::Kek(format!(
                    "key-encryption key file {} must hold 32 bytes or 64 hex characters",
                    path.display()
                )));
            }
            for (i, o) in k.iter_mut().enumerate() {
                *o = hex
                    .get(2 * i..2 * i + 2)
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                    .ok_or_else(|| {
                        StoreError::Kek(format!(
                            "key-encryption key file {} is not valid hex",
                            path.display()
                        ))
                    })?;
            }
        }
        Ok(Kek(k))
    }

    fn cipher(&self) -> Result<Aes256Gcm> {
        Aes256Gcm::new_from_slice(&self.0[..]).map_err(|_| StoreError::Kek("KEK length".into()))
    }
}

/// An entry of the release log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Release {
    /// Unix seconds.
    pub at: u64,
    /// What was released (`sign` or `dh`).
    pub kind: String,
    /// Key id.
    pub key_id: KeyId,
    /// Presignature id for `sign`, zeros for `dh`.
    pub presig_id: [u8; 32],
    /// The signed digest, or a hash of the DH request.
    pub digest: [u8; 32],
}

/// Raw store entries for a backup ([`Store::backup_entries`]); the key shares and the
/// KEM key stay sealed under the node's KEK.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BackupEntries {
    /// Key id → sealed key share.
    pub keys: Vec<(Vec<u8>, Vec<u8>)>,
    /// Key id → profile encoding.
    pub profiles: Vec<(Vec<u8>, Vec<u8>)>,
    /// Metadata name → value (the KEM key sealed, the policy bundle).
    pub meta: Vec<(String, Vec<u8>)>,
}

/// The node store.
pub struct Store {
    path: PathBuf,
    /// The open database; `None` while closed after an I/O failure and not yet opened
    /// again. Every operation holds the read lock for its whole transaction; reopening
    /// holds the write lock (module docs).
    db: RwLock<Option<Database>>,
    cipher: Aes256Gcm,
    /// Shared with the recovery thread, which must not keep the store alive.
    health: Arc<Health>,
}

/// Whether the store works, and the recovery thread's wake-up.
#[derive(Default)]
struct Health {
    state: Mutex<HealthState>,
    /// Notified when the store becomes unhealthy.
    wake: Condvar,
}

#[derive(Default)]
struct HealthState {
    /// Set while the store is unhealthy.
    fault: Option<Fault>,
    /// Failures so far (a probe clears the fault only if none happened meanwhile).
    failures: u64,
    /// Times the database was opened again.
    reopens: u64,
}

struct Fault {
    /// The failure that made the store unhealthy (no secrets: redb's and the OS's words).
    reason: String,
    since: Instant,
    /// An I/O error may have left the database refusing work: open it again.
    reopen: bool,
    /// Failed attempts to open it again (the first is logged as a warning).
    reopen_failures: u64,
    /// Times it was opened again during this fault (the first is logged).
    reopened: u64,
}

impl Health {
    fn lock(&self) -> MutexGuard<'_, HealthState> {
        // Nothing panics while the lock is held; a poisoned lock still guards a
        // consistent state.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// What the recovery thread did in one step ([`Store::recover`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Recovery {
    /// The store is healthy (it was, or a probe write just committed).
    Healthy,
    /// Still unhealthy: why.
    Failing(String),
}

fn aad(table: &str, key: &[u8]) -> Vec<u8> {
    let mut a = Vec::with_capacity(table.len() + 1 + key.len());
    a.extend_from_slice(table.as_bytes());
    a.push(0);
    a.extend_from_slice(key);
    a
}

fn create_db(path: &Path) -> Result<Database> {
    Ok(Database::builder()
        .set_cache_size(CACHE_BYTES)
        .create(path)?)
}

impl Store {
    /// Opens (or creates) the store at `path`.
    pub fn open(path: &Path, kek: &Kek) -> Result<Self> {
        let store = Store {
            db: RwLock::new(Some(create_db(path)?)),
            path: path.to_owned(),
            cipher: kek.cipher()?,
            health: Arc::default(),
        };
        store.write(|db| {
            let tx = db.begin_write()?;
            {
                tx.open_table(META)?;
                tx.open_table(PENDING)?;
                tx.open_table(KEYS)?;
                tx.open_table(PRESIGS)?;
                tx.open_table(RELEASED)?;
                tx.open_table(TOKEN_RULES)?;
                tx.open_table(PROFILES)?;
            }
            tx.commit()?;
            Ok(())
        })?;
        store.migrate_profiles()?;
        store.burn_stored_presignatures()?;
        Ok(store)
    }

    /// Runs `f` on the database under the read lock; a failure counts against the
    /// store's health ([`Store::failed`]).
    fn run<T>(&self, write: bool, f: impl FnOnce(&Database) -> Result<T>) -> Result<T> {
        let outcome = {
            let db = self.db.read().unwrap_or_else(PoisonError::into_inner);
            match db.as_ref() {
                Some(db) => f(db),
                None => Err(StoreError::Io(format!(
                    "the database is closed until it can be opened again (after: {})",
                    self.fault().unwrap_or_default()
                ))),
            }
        };
        if let Err(e) = &outcome {
            self.failed(write, e);
        }
        outcome
    }

    /// A read-only operation: only an I/O failure makes the store unhealthy.
    fn read<T>(&self, f: impl FnOnce(&Database) -> Result<T>) -> Result<T> {
        self.run(false, f)
    }

    /// An operation that writes: any database failure makes the store unhealthy.
    fn write<T>(&self, f: impl FnOnce(&Database) -> Result<T>) -> Result<T> {
        self.run(true, f)
    }

    /// Records a failure: an I/O error (which may leave redb refusing work until it is
    /// reopened) or a failed write makes the store unhealthy until a probe write commits;
    /// a record that does not open or decode says nothing about the disk.
    fn failed(&self, write: bool, e: &StoreError) {
        let reopen = match e {
            StoreError::Io(_) => true,
            StoreError::Db(_) if write => false,
            _ => return,
        };
        let mut s = self.health.lock();
        s.failures += 1;
        match &mut s.fault {
            Some(f) => f.reopen |= reopen,
            None => {
                tracing::error!(
                    error = %e,
                    "node store failing: the node reports it as unhealthy (the coordinator \
                     leaves it out of new work); the failed operation did not happen; \
                     retrying every {PROBE_INTERVAL:?} without a restart"
                );
                s.fault = Some(Fault {
                    reason: e.to_string(),
                    since: Instant::now(),
                    reopen,
                    reopen_failures: 0,
                    reopened: 0,
                });
            }
        }
        drop(s);
        self.health.wake.notify_all();
    }

    /// Why the store is unhealthy, while it is (`None` when writes commit).
    pub fn fault(&self) -> Option<String> {
        self.health.lock().fault.as_ref().map(|f| f.reason.clone())
    }

    /// How many times the database was opened again after an I/O failure.
    pub fn reopens(&self) -> u64 {
        self.health.lock().reopens
    }

    /// Closes the database (dropping the old handle first: redb holds a lock on the file)
    /// and opens it again; redb recovers it to its last committed transaction. On
    /// failure the store stays closed until the next attempt.
    fn reopen(&self) -> Result<()> {
        let mut db = self.db.write().unwrap_or_else(PoisonError::into_inner);
        // No transaction is alive: each runs under the read lock this write lock excludes.
        drop(db.take());
        let started = Instant::now();
        let opened = create_db(&self.path);
        let mut s = self.health.lock();
        match opened {
            Ok(new) => {
                *db = Some(new);
                s.reopens += 1;
                let took_ms = started.elapsed().as_millis() as u64;
                // While the disk stays full this repeats every step: logged once a fault.
                if let Some(f) = &mut s.fault {
                    f.reopen = false;
                    f.reopened += 1;
                    if f.reopened == 1 {
                        tracing::info!(
                            took_ms,
                            "node store: database opened again after an I/O failure"
                        );
                    } else {
                        tracing::debug!(took_ms, "node store: database opened again");
                    }
                }
                Ok(())
            }
            Err(e) => {
                if let Some(f) = &mut s.fault {
                    f.reopen = true;
                    f.reopen_failures += 1;
                    if f.reopen_failures == 1 {
                        tracing::warn!(error = %e, "node store: cannot open the database again yet; retrying every {PROBE_INTERVAL:?}");
                    } else {
                        tracing::debug!(error = %e, "node store: cannot open the database again yet");
                    }
                }
                Err(e)
            }
        }
    }

    /// The health probe: commits [`PROBE_BYTES`] under the `meta` entry `probe`, then
    /// deletes it in a second transaction (both durable). A probe of a few bytes would
    /// fit in pages the file already holds free and pass on a disk that still cannot take
    /// the node's next release-log batch, so the node would flap between healthy and not.
    fn probe(&self) -> Result<()> {
        let room = vec![0u8; PROBE_BYTES];
        self.write(|db| {
            let tx = db.begin_write()?;
            tx.open_table(META)?.insert(PROBE, room.as_slice())?;
            tx.commit()?;
            let tx = db.begin_write()?;
            tx.open_table(META)?.remove(PROBE)?;
            tx.commit()?;
            Ok(())
        })
    }

    /// One recovery step of an unhealthy store: reopens the database if an I/O error
    /// may have left it refusing work, then commits a probe write; if it commits and
    /// nothing failed meanwhile, the fault clears. A probe that fails with an I/O error
    /// reopens at once, so that reads keep working from a fresh handle until the next
    /// step. Called by the recovery thread ([`Store::start_recovery`]).
    pub fn recover(&self) -> Recovery {
        let (failures, reopen) = {
            let s = self.health.lock();
            match &s.fault {
                None => return Recovery::Healthy,
                Some(f) => (s.failures, f.reopen),
            }
        };
        if reopen && let Err(e) = self.reopen() {
            return Recovery::Failing(e.to_string());
        }
        match self.probe() {
            Ok(()) => {
                let mut s = self.health.lock();
                if s.failures != failures {
                    return Recovery::Failing(
                        "another operation failed during the probe".to_owned(),
                    );
                }
                if let Some(f) = s.fault.take() {
                    tracing::info!(
                        unhealthy_ms = f.since.elapsed().as_millis() as u64,
                        reopens = s.reopens,
                        "node store accepts writes again: the node reports healthy"
                    );
                }
                Recovery::Healthy
            }
            Err(e) => {
                if matches!(e, StoreError::Io(_)) {
                    let _ = self.reopen();
                }
                Recovery::Failing(e.to_string())
            }
        }
    }

    /// Starts the thread that heals `store`: it sleeps while the store is healthy; once
    /// a failure makes it unhealthy it runs [`Store::recover`] at once and then every
    /// [`PROBE_INTERVAL`] until the store is healthy again. It holds the store only
    /// during a step, and ends once the store is dropped.
    pub fn start_recovery(store: &Arc<Store>) -> std::io::Result<()> {
        let weak: Weak<Store> = Arc::downgrade(store);
        let health = Arc::clone(&store.health);
        std::thread::Builder::new()
            .name("store-recovery".into())
            .spawn(move || {
                loop {
                    {
                        let mut s = health.lock();
                        while s.fault.is_none() {
                            s = health
                                .wake
                                .wait_timeout(s, PROBE_INTERVAL)
                                .unwrap_or_else(PoisonError::into_inner)
                                .0;
                            if weak.strong_count() == 0 {
                                return;
                            }
                        }
                    }
                    loop {
                        let Some(store) = weak.upgrade() else {
                            return;
                        };
                        let step = store.recover();
                        drop(store);
                        if step == Recovery::Healthy {
                            break;
                        }
                        std::thread::sleep(PROBE_INTERVAL);
                    }
                }
            })
            .map(drop)
    }

    /// Deletes the presignature records an earlier version kept on disk: presignatures
    /// live in memory only now, and a stored one could be brought back by a restored
    /// disk. Returns how many were deleted.
    fn burn_stored_presignatures(&self) -> Result<u64> {
        let n = self.write(|db| {
            let tx = db.begin_write()?;
            let n = {
                let mut t = tx.open_table(PRESIGS)?;
                let n = t.len()?;
                t.retain(|_, _| false)?;
                n
            };
            tx.commit()?;
            Ok(n)
        })?;
        if n > 0 {
            tracing::info!(n, "deleted presignatures stored by an earlier version");
        }
        Ok(n)
    }

    /// Gives every active key without a profile its legacy profile (module docs), in one
    /// transaction. Returns how many keys were migrated.
    fn migrate_profiles(&self) -> Result<usize> {
        let shares = self.keys()?;
        let missing: Vec<KeyShare> = self.read(|db| {
            let tx = db.begin_read()?;
            let profiles = tx.open_table(PROFILES)?;
            let mut out = Vec::new();
            for share in shares {
                if profiles.get(&share.public.key_id.0[..])?.is_none() {
                    out.push(share);
                }
            }
            Ok(out)
        })?;
        if missing.is_empty() {
            return Ok(0);
        }
        self.write(|db| {
            let tx = db.begin_write()?;
            {
                let rules = tx.open_table(TOKEN_RULES)?;
                let mut profiles = tx.open_table(PROFILES)?;
                for share in &missing {
                    let id = &share.public.key_id.0[..];
                    let r = match rules.get(id)? {
                        None => None,
                        Some(v) => Some(TokenRules::from_bytes(v.value()).map_err(|e| {
                            StoreError::Corrupt {
                                table: "token_rules",
                                detail: e.to_string(),
                            }
                        })?),
                    };
                    let profile = KeyProfile::legacy(share.public.purpose, r);
                    tracing::info!(key = %share.public.key_id, profile = profile.name(), "key profile migrated from a store written before profiles");
                    profiles.insert(id, profile.to_bytes().as_slice())?;
                }
            }
            tx.commit()?;
            Ok(())
        })?;
        Ok(missing.len())
    }

    fn seal(&self, table: &str, key: &[u8], plain: &[u8]) -> Result<Vec<u8>> {
        let mut nonce = [0u8; 12];
        rand::rngs::SysRng
            .try_fill_bytes(&mut nonce)
            .map_err(|e| StoreError::Db(format!("system RNG failed: {e}")))?;
        let ct = self
            .cipher
            .encrypt(
                (&nonce).into(),
                Payload {
                    msg: plain,
                    aad: &aad(table, key),
                },
            )
            .map_err(|_| StoreError::Db("sealing failed".into()))?;
        let mut out = Vec::with_capacity(12 + ct.len());
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&ct);
        Ok(out)
    }

    fn open_sealed(
        &self,
        table: &'static str,
        key: &[u8],
        sealed: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>> {
        if sealed.len() < 12 {
            return Err(StoreError::Unseal(table));
        }
        let (nonce, ct) = sealed.split_at(12);
        let mut n = [0u8; 12];
        n.copy_from_slice(nonce);
        self.cipher
            .decrypt(
                (&n).into(),
                Payload {
                    msg: ct,
                    aad: &aad(table, key),
                },
            )
            .map(Zeroizing::new)
            .map_err(|_| StoreError::Unseal(table))
    }

    /// The node's KEM secret key, created on first use.
    pub fn kem_key(&self) -> Result<KemSecretKey> {
        // Sealed: the copy is ciphertext.
        let stored = self.read(|db| {
            let tx = db.begin_read()?;
            let t = tx.open_table(META)?;
            Ok(t.get("kem")?.map(|v| v.value().to_vec()))
        })?;
        if let Some(v) = stored {
            let plain = self.open_sealed("meta", b"kem", &v)?;
            return KemSecretKey::from_secret_bytes(&plain).map_err(|e| StoreError::Corrupt {
                table: "meta",
                detail: e.to_string(),
            });
        }
        let mut rng = request_rng()?;
        let sk = KemSecretKey::generate(&mut rng);
        let sealed = self.seal("meta", b"kem", &sk.secret_bytes())?;
        self.write(|db| {
            let tx = db.begin_write()?;
            {
                let mut t = tx.open_table(META)?;
                t.insert("kem", sealed.as_slice())?;
            }
            tx.commit()?;
            Ok(())
        })?;
        Ok(sk)
    }

    /// The entries a backup holds (DESIGN.md §5: sealed key shares and configuration
    /// only): every active key share as stored (sealed under the KEK), every profile,
    /// and the metadata entries (the sealed KEM key, the policy bundle). Nothing about
    /// presignatures, pending shares, the release log or the health probe.
    pub fn backup_entries(&self) -> Result<BackupEntries> {
        self.read(|db| {
            let tx = db.begin_read()?;
            let mut out = BackupEntries::default();
            for e in tx.open_table(KEYS)?.iter()? {
                let (k, v) = e?;
                out.keys.push((k.value().to_vec(), v.value().to_vec()));
            }
            for e in tx.open_table(PROFILES)?.iter()? {
                let (k, v) = e?;
                out.profiles.push((k.value().to_vec(), v.value().to_vec()));
            }
            for e in tx.open_table(META)?.iter()? {
                let (k, v) = e?;
                if k.value() != PROBE {
                    out.meta.push((k.value().to_string(), v.value().to_vec()));
                }
            }
            Ok(out)
        })
    }

    /// Writes backup entries into this store in one transaction. Refuses a store that
    /// already holds a key share (restore into an empty data directory); then checks
    /// that every restored share opens under this store's KEK and matches its public
    /// share, and returns them.
    pub fn restore_entries(&self, b: &BackupEntries) -> Result<Vec<KeyShare>> {
        if !self.keys()?.is_empty() {
            return Err(StoreError::Db(
                "the data directory already holds key shares: restore only into an empty one"
                    .into(),
            ));
        }
        self.write(|db| {
            let tx = db.begin_write()?;
            {
                let mut keys = tx.open_table(KEYS)?;
                for (k, v) in &b.keys {
                    keys.insert(k.as_slice(), v.as_slice())?;
                }
                let mut profiles = tx.open_table(PROFILES)?;
                for (k, v) in &b.profiles {
                    profiles.insert(k.as_slice(), v.as_slice())?;
                }
                let mut meta = tx.open_table(META)?;
                for (k, v) in &b.meta {
                    meta.insert(k.as_str(), v.as_slice())?;
                }
            }
            // Check before committing: a wrong KEK or a corrupt backup leaves nothing
            // behind.
            let shares = {
                let keys = tx.open_table(KEYS)?;
                let mut out = Vec::new();
                for e in keys.iter()? {
                    let (k, v) = e?;
                    let plain = self.open_sealed("keys", k.value(), v.value())?;
                    let share =
                        KeyShare::from_secret_bytes(&plain).map_err(|e| StoreError::Corrupt {
                            table: "keys",
                            detail: e.to_string(),
                        })?;
                    share.validate().map_err(|e| StoreError::Corrupt {
                        table: "keys",
                        detail: e.to_string(),
                    })?;
                    out.push(share);
                }
                out
            };
            tx.commit()?;
            Ok(shares)
        })
    }

    /// Durably records a pending key share for `session`.
    pub fn put_pending(&self, session: &SessionId, share: &KeyShare) -> Result<()> {
        let sealed = self.seal("pending", &session.0, &share.secret_bytes())?;
        self.write(|db| {
            let tx = db.begin_write()?;
            {
                let mut t = tx.open_table(PENDING)?;
                t.insert(&session.0[..], sealed.as_slice())?;
            }
            tx.commit()?;
            Ok(())
        })
    }

    /// The pending share of `session`, if any.
    pub fn pending(&self, session: &SessionId) -> Result<Option<KeyShare>> {
        self.read(|db| {
            let tx = db.begin_read()?;
            let t = tx.open_table(PENDING)?;
            match t.get(&session.0[..])? {
                None => Ok(None),
                Some(v) => {
                    let plain = self.open_sealed("pending", &session.0, v.value())?;
                    KeyShare::from_secret_bytes(&plain)
                        .map(Some)
                        .map_err(|e| StoreError::Corrupt {
                            table: "pending",
                            detail: e.to_string(),
                        })
                }
            }
        })
    }

    /// Moves the pending share of `session` to the active keys (replacing an older epoch
    /// of the same key, for refresh), in one transaction.
    pub fn activate(&self, session: &SessionId, share: &KeyShare) -> Result<()> {
        let id = share.public.key_id.0;
        let sealed = self.seal("keys", &id, &share.secret_bytes())?;
        self.write(|db| {
            let tx = db.begin_write()?;
            {
                let mut p = tx.open_table(PENDING)?;
                p.remove(&session.0[..])?;
                let mut k = tx.open_table(KEYS)?;
                k.insert(&id[..], sealed.as_slice())?;
            }
            tx.commit()?;
            Ok(())
        })
    }

    /// Deletes the active share of `key`, its profile and token rules, in one
    /// transaction (a reshare moved the key to other nodes). Returns whether a share
    /// was held. The sealed bytes may linger in the file's free pages until reused.
    pub fn retire_key(&self, key: &KeyId) -> Result<bool> {
        self.write(|db| {
            let tx = db.begin_write()?;
            let held = {
                let mut k = tx.open_table(KEYS)?;
                let held = k.remove(&key.0[..])?.is_some();
                tx.open_table(PROFILES)?.remove(&key.0[..])?;
                tx.open_table(TOKEN_RULES)?.remove(&key.0[..])?;
                held
            };
            tx.commit()?;
            Ok(held)
        })
    }

    /// The active share of `key`.
    pub fn key(&self, key: &KeyId) -> Result<Option<KeyShare>> {
        self.read(|db| {
            let tx = db.begin_read()?;
            let t = tx.open_table(KEYS)?;
            match t.get(&key.0[..])? {
                None => Ok(None),
                Some(v) => {
                    let plain = self.open_sealed("keys", &key.0, v.value())?;
                    KeyShare::from_secret_bytes(&plain)
                        .map(Some)
                        .map_err(|e| StoreError::Corrupt {
                            table: "keys",
                            detail: e.to_string(),
                        })
                }
            }
        })
    }

    /// Every active key share.
    pub fn keys(&self) -> Result<Vec<KeyShare>> {
        self.read(|db| {
            let tx = db.begin_read()?;
            let t = tx.open_table(KEYS)?;
            let mut out = Vec::new();
            for entry in t.iter()? {
                let (k, v) = entry?;
                let plain = self.open_sealed("keys", k.value(), v.value())?;
                out.push(
                    KeyShare::from_secret_bytes(&plain).map_err(|e| StoreError::Corrupt {
                        table: "keys",
                        detail: e.to_string(),
                    })?,
                );
            }
            Ok(out)
        })
    }

    /// Durably records the operator-signed policy bundle this node decides under
    /// (DESIGN.md §9), replacing the one before; the caller has verified it and checked
    /// that it is newer.
    pub fn put_policy_bundle(&self, jws: &str) -> Result<()> {
        self.write(|db| {
            let tx = db.begin_write()?;
            {
                let mut t = tx.open_table(META)?;
                t.insert(POLICY_BUNDLE, jws.as_bytes())?;
            }
            tx.commit()?;
            Ok(())
        })
    }

    /// The policy bundle this node holds, as stored (verify it before use).
    pub fn policy_bundle(&self) -> Result<Option<String>> {
        self.read(|db| {
            let tx = db.begin_read()?;
            let t = tx.open_table(META)?;
            match t.get(POLICY_BUNDLE)? {
                None => Ok(None),
                Some(v) => String::from_utf8(v.value().to_vec())
                    .map(Some)
                    .map_err(|_| StoreError::Corrupt {
                        table: "meta",
                        detail: "the policy bundle is not UTF-8".into(),
                    }),
            }
        })
    }

    /// Durably records the profile of a new key unless it already has one (first writer
    /// wins: profiles are fixed when a key is created). Returns `false`, writing nothing,
    /// if the key already has a profile.
    pub fn put_profile_once(&self, key: &KeyId, profile: &KeyProfile) -> Result<bool> {
        self.write(|db| {
            let tx = db.begin_write()?;
            {
                let mut t = tx.open_table(PROFILES)?;
                if t.get(&key.0[..])?.is_some() {
                    return Ok(false);
                }
                t.insert(&key.0[..], profile.to_bytes().as_slice())?;
            }
            tx.commit()?;
            Ok(true)
        })
    }

    /// The profile of `key`, if one is recorded.
    pub fn profile(&self, key: &KeyId) -> Result<Option<KeyProfile>> {
        self.read(|db| {
            let tx = db.begin_read()?;
            let t = tx.open_table(PROFILES)?;
            match t.get(&key.0[..])? {
                None => Ok(None),
                Some(v) => {
                    KeyProfile::from_bytes(v.value())
                        .map(Some)
                        .map_err(|e| StoreError::Corrupt {
                            table: "profiles",
                            detail: e.to_string(),
                        })
                }
            }
        })
    }

    /// Narrows the profile of `key` to `to` if [`KeyProfile::may_narrow_to`] allows it
    /// (raw → checkpoint only). Returns the profile before the change; `Err` with a
    /// sentence if the key has no profile or the change would widen it.
    pub fn narrow_profile(
        &self,
        key: &KeyId,
        to: &KeyProfile,
    ) -> Result<Result<KeyProfile, String>> {
        self.write(|db| {
            let tx = db.begin_write()?;
            let before = {
                let mut t = tx.open_table(PROFILES)?;
                let before = match t.get(&key.0[..])? {
                    None => return Ok(Err(format!("this node holds no key {key}"))),
                    Some(v) => {
                        KeyProfile::from_bytes(v.value()).map_err(|e| StoreError::Corrupt {
                            table: "profiles",
                            detail: e.to_string(),
                        })?
                    }
                };
                if !before.may_narrow_to(to) {
                    return Ok(Err(format!(
                        "key {key} has profile {}; it cannot become {} (the only change allowed is raw -> checkpoint)",
                        before.name(),
                        to.name()
                    )));
                }
                t.insert(&key.0[..], to.to_bytes().as_slice())?;
                before
            };
            tx.commit()?;
            Ok(Ok(before))
        })
    }

    /// Appends releases to the node's log (one durable transaction).
    pub fn log_releases(&self, releases: &[Release]) -> Result<()> {
        self.write(|db| {
            let tx = db.begin_write()?;
            {
                let mut log = tx.open_table(RELEASED)?;
                let first = log.last()?.map(|(k, _)| k.value() + 1).unwrap_or(0);
                for (seq, r) in (first..).zip(releases) {
                    log.insert(seq, encode_release(r).as_slice())?;
                }
            }
            tx.commit()?;
            Ok(())
        })
    }

    /// The release log.
    pub fn releases(&self) -> Result<Vec<Release>> {
        self.read(|db| {
            let tx = db.begin_read()?;
            let t = tx.open_table(RELEASED)?;
            let mut out = Vec::new();
            for e in t.iter()? {
                let (_, v) = e?;
                out.push(decode_release(v.value()).ok_or(StoreError::Corrupt {
                    table: "released",
                    detail: "bad release entry".into(),
                })?);
            }
            Ok(out)
        })
    }
}

fn encode_release(r: &Release) -> Vec<u8> {
    let mut out = Vec::with_capacity(8 + 1 + r.kind.len() + 16 + 64);
    out.extend_from_slice(&r.at.to_be_bytes());
    out.push(r.kind.len() as u8);
    out.extend_from_slice(r.kind.as_bytes());
    out.extend_from_slice(&r.key_id.0);
    out.extend_from_slice(&r.presig_id);
    out.extend_from_slice(&r.digest);
    out
}

fn decode_release(b: &[u8]) -> Option<Release> {
    let at = u64::from_be_bytes(b.get(..8)?.try_into().ok()?);
    let klen = usize::from(*b.get(8)?);
    let kind = String::from_utf8(b.get(9..9 + klen)?.to_vec()).ok()?;
    let rest = b.get(9 + klen..)?;
    if rest.len() != 16 + 64 {
        return None;
    }
    Some(Release {
        at,
        kind,
        key_id: KeyId(rest.get(..16)?.try_into().ok()?),
        presig_id: rest.get(16..48)?.try_into().ok()?,
        digest: rest.get(48..80)?.try_into().ok()?,
    })
}

/// A fresh CSPRNG seeded from the operating system, one per request.
pub fn request_rng() -> Result<rand::rngs::StdRng> {
    use rand::SeedableRng;
    rand::rngs::StdRng::try_from_rng(&mut rand::rngs::SysRng)
        .map_err(|e| StoreError::Db(format!("system RNG failed: {e}")))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    fn temp(label: &str) -> std::path::PathBuf {
        let dir =
            std::env::temp_dir().join(format!("quorate-node-store-{label}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn profiles_are_written_once_and_only_narrow() {
        let dir = temp("profiles");
        let kek = Kek::load(&dir.join("kek"), true).unwrap();
        let store = Store::open(&dir.join("node.redb"), &kek).unwrap();
        let key = KeyId([5; 16]);
        let token =
            KeyProfile::Token(TokenRules::new(900, "https://issuer.test", "at+jwt").unwrap());
        assert_eq!(store.profile(&key).unwrap(), None);
        assert!(store.put_profile_once(&key, &token).unwrap());
        assert!(!store.put_profile_once(&key, &KeyProfile::Raw).unwrap());
        assert_eq!(store.profile(&key).unwrap(), Some(token.clone()));
        // A token key never becomes anything else.
        let e = store
            .narrow_profile(&key, &KeyProfile::Raw)
            .unwrap()
            .unwrap_err();
        assert!(e.contains("cannot become raw"), "{e}");
        let e = store
            .narrow_profile(&key, &KeyProfile::Checkpoint)
            .unwrap()
            .unwrap_err();
        assert!(e.contains("cannot become checkpoint"), "{e}");
        // A raw key narrows to checkpoint, and not back.
        let raw = KeyId([6; 16]);
        assert!(store.put_profile_once(&raw, &KeyProfile::Raw).unwrap());
        assert_eq!(
            store.narrow_profile(&raw, &KeyProfile::Checkpoint).unwrap(),
            Ok(KeyProfile::Raw)
        );
        assert!(
            store
                .narrow_profile(&raw, &KeyProfile::Raw)
                .unwrap()
                .is_err()
        );
        assert!(
            store
                .narrow_profile(&KeyId([7; 16]), &KeyProfile::Checkpoint)
                .unwrap()
                .is_err()
        );
        // Durable across reopening.
        drop(store);
        let store = Store::open(&dir.join("node.redb"), &kek).unwrap();
        assert_eq!(store.profile(&key).unwrap(), Some(token));
        assert_eq!(store.profile(&raw).unwrap(), Some(KeyProfile::Checkpoint));
        drop(store);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A store written before profiles existed (key shares and a `token_rules` table, no
    /// `profiles`) migrates when it is opened: the key with rules becomes a token key,
    /// the other signing key raw, the derive key derive.
    #[test]
    fn a_store_from_before_profiles_migrates() {
        use quorate_crypto::keys::KeyPurpose;
        use quorate_crypto::sim::{Attack, Cluster, test_rng};
        let dir = temp("legacy");
        let kek = Kek::load(&dir.join("kek"), true).unwrap();
        let mut sim = Cluster::new(3, 1, test_rng("node-store-legacy")).unwrap();
        let tokens = sim.dkg(KeyPurpose::Sign, Attack::None).unwrap().key_id;
        let audit = sim.dkg(KeyPurpose::Sign, Attack::None).unwrap().key_id;
        let creds = sim.dkg(KeyPurpose::Derive, Attack::None).unwrap().key_id;
        let rules = TokenRules::new(900, "https://issuer.test", "at+jwt").unwrap();
        {
            // Written the way the store did before profiles: sealed shares in `keys`,
            // unsealed rules in `token_rules`, and no `profiles` table at all.
            let store = Store {
                path: dir.join("node.redb"),
                db: RwLock::new(Some(Database::create(dir.join("node.redb")).unwrap())),
                cipher: kek.cipher().unwrap(),
                health: Arc::default(),
            };
            let db = store.db.read().unwrap();
            let tx = db.as_ref().unwrap().begin_write().unwrap();
            {
                let mut k = tx.open_table(KEYS).unwrap();
                for id in [tokens, audit, creds] {
                    let share = sim.nodes[0].shares.get(&id).unwrap();
                    let sealed = store.seal("keys", &id.0, &share.secret_bytes()).unwrap();
                    k.insert(&id.0[..], sealed.as_slice()).unwrap();
                }
                let mut r = tx.open_table(TOKEN_RULES).unwrap();
                r.insert(&tokens.0[..], rules.to_bytes().as_slice())
                    .unwrap();
            }
            tx.commit().unwrap();
        }
        let store = Store::open(&dir.join("node.redb"), &kek).unwrap();
        assert_eq!(
            store.profile(&tokens).unwrap(),
            Some(KeyProfile::Token(rules))
        );
        assert_eq!(store.profile(&audit).unwrap(), Some(KeyProfile::Raw));
        assert_eq!(store.profile(&creds).unwrap(), Some(KeyProfile::Derive));
        assert_eq!(store.migrate_profiles().unwrap(), 0, "migration runs once");
        drop(store);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A tmpfs of `bytes` at `dir`, unmounted on drop (root only).
    struct Tmpfs(std::path::PathBuf);

    impl Tmpfs {
        fn mount(dir: &Path, bytes: u64) -> std::result::Result<Self, String> {
            let out = std::process::Command::new("mount")
                .args(["-t", "tmpfs", "-o", &format!("size={bytes}")])
                .arg("tmpfs")
                .arg(dir)
                .output()
                .map_err(|e| e.to_string())?;
            if out.status.success() {
                Ok(Tmpfs(dir.to_owned()))
            } else {
                Err(String::from_utf8_lossy(&out.stderr).trim().to_owned())
            }
        }

        /// Writes `file` until the tmpfs is full.
        fn fill(&self, file: &str) {
            use std::io::Write as _;
            let mut f = std::fs::File::create(self.0.join(file)).unwrap();
            for chunk in [64 << 10, 4 << 10] {
                let buf = vec![1u8; chunk];
                while f.write_all(&buf).is_ok() {}
            }
        }
    }

    impl Drop for Tmpfs {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(&self.0)
                .status();
        }
    }

    /// A store on a full disk fails its writes and says so ([`Store::fault`]); it stays
    /// unhealthy while the disk is full; once there is room it reopens the database
    /// (which an I/O error left refusing every later write, `PreviousIo`) and a probe
    /// clears the fault — the same `Store`, no restart — and it writes again and still
    /// holds what it held. Needs root for the tmpfs: skipped elsewhere unless
    /// `QUORATE_REQUIRE_NETNS=1`.
    #[test]
    fn a_store_on_a_full_disk_recovers_once_there_is_room() {
        let dir = temp("full-disk");
        let disk = match Tmpfs::mount(&dir, 4 << 20) {
            Ok(t) => t,
            Err(why) if std::env::var("QUORATE_REQUIRE_NETNS").is_ok_and(|v| v == "1") => {
                panic!("cannot mount a tmpfs ({why}), and QUORATE_REQUIRE_NETNS=1")
            }
            Err(why) => {
                eprintln!("SKIPPED a_store_on_a_full_disk_recovers: needs root for a tmpfs: {why}");
                return;
            }
        };
        let kek = Kek::load(&dir.join("kek"), true).unwrap();
        let store = Store::open(&dir.join("node.redb"), &kek).unwrap();
        let key = KeyId([9; 16]);
        assert!(store.put_profile_once(&key, &KeyProfile::Raw).unwrap());
        let release = |i: u64| Release {
            at: i,
            kind: "sign".into(),
            key_id: key,
            presig_id: [1; 32],
            digest: [2; 32],
        };
        assert_eq!(store.fault(), None);
        assert_eq!(store.recover(), Recovery::Healthy);

        disk.fill("filler");
        // Writes fail once the file's free pages are used up.
        let mut failed = None;
        for i in 0..10_000u64 {
            let batch: Vec<Release> = (0..64).map(|j| release(i * 64 + j)).collect();
            if let Err(e) = store.log_releases(&batch) {
                failed = Some(e);
                break;
            }
        }
        let failed = failed.expect("writes never failed on a full disk");
        assert!(matches!(failed, StoreError::Io(_)), "{failed:?}");
        let fault = store
            .fault()
            .expect("a failed write marks the store unhealthy");
        assert!(fault.contains("No space left"), "{fault}");
        // Still full: recovery steps fail, the fault stays, the failed write stays failed.
        for _ in 0..3 {
            assert!(matches!(store.recover(), Recovery::Failing(_)));
        }
        assert!(store.fault().is_some());
        // Reads go on from a reopened handle.
        assert_eq!(store.profile(&key).unwrap(), Some(KeyProfile::Raw));

        std::fs::remove_file(dir.join("filler")).unwrap();
        assert_eq!(store.recover(), Recovery::Healthy);
        assert_eq!(store.fault(), None);
        assert!(store.reopens() >= 1, "the database was never reopened");
        let before = store.releases().unwrap().len();
        store.log_releases(&[release(u64::MAX)]).unwrap();
        assert_eq!(store.releases().unwrap().len(), before + 1);
        assert_eq!(store.profile(&key).unwrap(), Some(KeyProfile::Raw));
        assert!(
            store
                .backup_entries()
                .unwrap()
                .meta
                .iter()
                .all(|(k, _)| k != PROBE),
            "the probe is not part of a backup"
        );
        drop(store);
        drop(disk);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// The recovery thread heals a store by itself and ends when the store is dropped.
    #[test]
    fn the_recovery_thread_clears_a_fault_and_ends_with_the_store() {
        let dir = temp("recovery-thread");
        let kek = Kek::load(&dir.join("kek"), true).unwrap();
        let store = Arc::new(Store::open(&dir.join("node.redb"), &kek).unwrap());
        Store::start_recovery(&store).unwrap();
        // A failed write, as a full disk would give.
        store.failed(
            true,
            &StoreError::Io("I/O error: No space left on device".into()),
        );
        assert!(store.fault().is_some());
        let deadline = Instant::now() + Duration::from_secs(10);
        while store.fault().is_some() {
            assert!(Instant::now() < deadline, "the fault never cleared");
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(store.reopens(), 1);
        // Dropped, the store releases its file at once: it opens again.
        drop(store);
        let again = Store::open(&dir.join("node.redb"), &kek).unwrap();
        drop(again);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
