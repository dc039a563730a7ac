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
//! - `meta`: the node's KEM secret key;
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

use std::path::Path;

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

const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
const PENDING: TableDefinition<&[u8], &[u8]> = TableDefinition::new("pending");
const KEYS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("keys");
const PRESIGS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("presigs");
const RELEASED: TableDefinition<u64, &[u8]> = TableDefinition::new("released");
const TOKEN_RULES: TableDefinition<&[u8], &[u8]> = TableDefinition::new("token_rules");
const PROFILES: TableDefinition<&[u8], &[u8]> = TableDefinition::new("profiles");
/// The META entry holding the policy bundle's JWS.
const POLICY_BUNDLE: &str = "policy_bundle";

/// Store errors. Messages never contain secret material.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The database failed.
    #[error("node store: {0}")]
    Db(String),
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
        StoreError::Db(e.into().to_string())
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
    db: Database,
    cipher: Aes256Gcm,
}

fn aad(table: &str, key: &[u8]) -> Vec<u8> {
    let mut a = Vec::with_capacity(table.len() + 1 + key.len());
    a.extend_from_slice(table.as_bytes());
    a.push(0);
    a.extend_from_slice(key);
    a
}

impl Store {
    /// Opens (or creates) the store at `path`.
    pub fn open(path: &Path, kek: &Kek) -> Result<Self> {
        let db = Database::builder()
            .set_cache_size(CACHE_BYTES)
            .create(path)?;
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
        let store = Store {
            db,
            cipher: kek.cipher()?,
        };
        store.migrate_profiles()?;
        store.burn_stored_presignatures()?;
        Ok(store)
    }

    /// Deletes the presignature records an earlier version kept on disk: presignatures
    /// live in memory only now, and a stored one could be brought back by a restored
    /// disk. Returns how many were deleted.
    fn burn_stored_presignatures(&self) -> Result<u64> {
        let tx = self.db.begin_write()?;
        let n = {
            let mut t = tx.open_table(PRESIGS)?;
            let n = t.len()?;
            t.retain(|_, _| false)?;
            n
        };
        tx.commit()?;
        if n > 0 {
            tracing::info!(n, "deleted presignatures stored by an earlier version");
        }
        Ok(n)
    }

    /// Gives every active key without a profile its legacy profile (module docs), in one
    /// transaction. Returns how many keys were migrated.
    fn migrate_profiles(&self) -> Result<usize> {
        let missing: Vec<KeyShare> = {
            let tx = self.db.begin_read()?;
            let profiles = tx.open_table(PROFILES)?;
            let mut out = Vec::new();
            for share in self.keys()? {
                if profiles.get(&share.public.key_id.0[..])?.is_none() {
                    out.push(share);
                }
            }
            out
        };
        if missing.is_empty() {
            return Ok(0);
        }
        let tx = self.db.begin_write()?;
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
        let tx = self.db.begin_read()?;
        let t = tx.open_table(META)?;
        if let Some(v) = t.get("kem")? {
            let plain = self.open_sealed("meta", b"kem", v.value())?;
            return KemSecretKey::from_secret_bytes(&plain).map_err(|e| StoreError::Corrupt {
                table: "meta",
                detail: e.to_string(),
            });
        }
        drop(t);
        drop(tx);
        let mut rng = request_rng()?;
        let sk = KemSecretKey::generate(&mut rng);
        let sealed = self.seal("meta", b"kem", &sk.secret_bytes())?;
        let tx = self.db.begin_write()?;
        {
            let mut t = tx.open_table(META)?;
            t.insert("kem", sealed.as_slice())?;
        }
        tx.commit()?;
        Ok(sk)
    }

    /// The entries a backup holds (DESIGN.md §5: sealed key shares and configuration
    /// only): every active key share as stored (sealed under the KEK), every profile,
    /// and the metadata entries (the sealed KEM key, the policy bundle). Nothing about
    /// presignatures, pending shares or the release log.
    pub fn backup_entries(&self) -> Result<BackupEntries> {
        let tx = self.db.begin_read()?;
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
            out.meta.push((k.value().to_string(), v.value().to_vec()));
        }
        Ok(out)
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
        let tx = self.db.begin_write()?;
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
        // Check before committing: a wrong KEK or a corrupt backup leaves nothing behind.
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
    }

    /// Durably records a pending key share for `session`.
    pub fn put_pending(&self, session: &SessionId, share: &KeyShare) -> Result<()> {
        let sealed = self.seal("pending", &session.0, &share.secret_bytes())?;
        let tx = self.db.begin_write()?;
        {
            let mut t = tx.open_table(PENDING)?;
            t.insert(&session.0[..], sealed.as_slice())?;
        }
        tx.commit()?;
        Ok(())
    }

    /// The pending share of `session`, if any.
    pub fn pending(&self, session: &SessionId) -> Result<Option<KeyShare>> {
        let tx = self.db.begin_read()?;
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
    }

    /// Moves the pending share of `session` to the active keys (replacing an older epoch
    /// of the same key, for refresh), in one transaction.
    pub fn activate(&self, session: &SessionId, share: &KeyShare) -> Result<()> {
        let id = share.public.key_id.0;
        let sealed = self.seal("keys", &id, &share.secret_bytes())?;
        let tx = self.db.begin_write()?;
        {
            let mut p = tx.open_table(PENDING)?;
            p.remove(&session.0[..])?;
            let mut k = tx.open_table(KEYS)?;
            k.insert(&id[..], sealed.as_slice())?;
        }
        tx.commit()?;
        Ok(())
    }

    /// Deletes the active share of `key`, its profile and token rules, in one
    /// transaction (a reshare moved the key to other nodes). Returns whether a share
    /// was held. The sealed bytes may linger in the file's free pages until reused.
    pub fn retire_key(&self, key: &KeyId) -> Result<bool> {
        let tx = self.db.begin_write()?;
        let held = {
            let mut k = tx.open_table(KEYS)?;
            let held = k.remove(&key.0[..])?.is_some();
            tx.open_table(PROFILES)?.remove(&key.0[..])?;
            tx.open_table(TOKEN_RULES)?.remove(&key.0[..])?;
            held
        };
        tx.commit()?;
        Ok(held)
    }

    /// The active share of `key`.
    pub fn key(&self, key: &KeyId) -> Result<Option<KeyShare>> {
        let tx = self.db.begin_read()?;
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
    }

    /// Every active key share.
    pub fn keys(&self) -> Result<Vec<KeyShare>> {
        let tx = self.db.begin_read()?;
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
    }

    /// Durably records the operator-signed policy bundle this node decides under
    /// (DESIGN.md §9), replacing the one before; the caller has verified it and checked
    /// that it is newer.
    pub fn put_policy_bundle(&self, jws: &str) -> Result<()> {
        let tx = self.db.begin_write()?;
        {
            let mut t = tx.open_table(META)?;
            t.insert(POLICY_BUNDLE, jws.as_bytes())?;
        }
        tx.commit()?;
        Ok(())
    }

    /// The policy bundle this node holds, as stored (verify it before use).
    pub fn policy_bundle(&self) -> Result<Option<String>> {
        let tx = self.db.begin_read()?;
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
    }

    /// Durably records the profile of a new key unless it already has one (first writer
    /// wins: profiles are fixed when a key is created). Returns `false`, writing nothing,
    /// if the key already has a profile.
    pub fn put_profile_once(&self, key: &KeyId, profile: &KeyProfile) -> Result<bool> {
        let tx = self.db.begin_write()?;
        {
            let mut t = tx.open_table(PROFILES)?;
            if t.get(&key.0[..])?.is_some() {
                return Ok(false);
            }
            t.insert(&key.0[..], profile.to_bytes().as_slice())?;
        }
        tx.commit()?;
        Ok(true)
    }

    /// The profile of `key`, if one is recorded.
    pub fn profile(&self, key: &KeyId) -> Result<Option<KeyProfile>> {
        let tx = self.db.begin_read()?;
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
    }

    /// Narrows the profile of `key` to `to` if [`KeyProfile::may_narrow_to`] allows it
    /// (raw → checkpoint only). Returns the profile before the change; `Err` with a
    /// sentence if the key has no profile or the change would widen it.
    pub fn narrow_profile(
        &self,
        key: &KeyId,
        to: &KeyProfile,
    ) -> Result<Result<KeyProfile, String>> {
        let tx = self.db.begin_write()?;
        let before = {
            let mut t = tx.open_table(PROFILES)?;
            let before = match t.get(&key.0[..])? {
                None => return Ok(Err(format!("this node holds no key {key}"))),
                Some(v) => KeyProfile::from_bytes(v.value()).map_err(|e| StoreError::Corrupt {
                    table: "profiles",
                    detail: e.to_string(),
                })?,
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
    }

    /// Appends releases to the node's log (one durable transaction).
    pub fn log_releases(&self, releases: &[Release]) -> Result<()> {
        let tx = self.db.begin_write()?;
        {
            let mut log = tx.open_table(RELEASED)?;
            let first = log.last()?.map(|(k, _)| k.value() + 1).unwrap_or(0);
            for (seq, r) in (first..).zip(releases) {
                log.insert(seq, encode_release(r).as_slice())?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// The release log.
    pub fn releases(&self) -> Result<Vec<Release>> {
        let tx = self.db.begin_read()?;
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
                db: Database::create(dir.join("node.redb")).unwrap(),
                cipher: kek.cipher().unwrap(),
            };
            let tx = store.db.begin_write().unwrap();
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
}
