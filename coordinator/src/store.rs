//! The coordinator's durable public data (DESIGN.md §5): key names and public key data,
//! and the pools' presignature public data. Nothing here is secret.
//!
//! Tables:
//! - `key_names`: name → key id of the name's current version;
//! - `keys`: key id → `KeyPublic` (quorate-crypto's versioned encoding), every version;
//! - `key_versions`: name → the name's versions, oldest first ([`KeyVersion`]; own
//!   versioned encoding). A store written before versions existed has no entry: its
//!   names load as version 1, created at time 0, never retired;
//! - `profiles`: key id → [`KeyProfile`] (versioned encoding). A key written before
//!   profiles existed has no entry and loads with its legacy profile
//!   ([`KeyProfile::legacy`], from `token_rules`: key id → [`TokenRules`], which is only
//!   read); the audit key is then narrowed to the checkpoint profile by the coordinator
//!   at start ([`KeyStore::put_profile`]);
//! - `pool`: presignature id → `PresignaturePublic`.

use std::path::Path;

use quorate_crypto::keys::{KeyId, KeyPublic};
use quorate_crypto::params::{PartyIndex, SessionId};
use quorate_crypto::wire::Wire;
use quorate_proto::profile::KeyProfile;
use quorate_proto::rules::TokenRules;
use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};

const NAMES: TableDefinition<&str, &[u8]> = TableDefinition::new("key_names");
const KEYS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("keys");
const VERSIONS: TableDefinition<&str, &[u8]> = TableDefinition::new("key_versions");
const RULES: TableDefinition<&[u8], &[u8]> = TableDefinition::new("token_rules");
const PROFILES: TableDefinition<&[u8], &[u8]> = TableDefinition::new("profiles");
const POOL: TableDefinition<&[u8], &[u8]> = TableDefinition::new("pool");
/// Refreshes and reshares decided but not yet active on every node: key name →
/// session id (32 bytes) || the new `KeyPublic`. Retried until every node holds it.
const PENDING_ACTIVATIONS: TableDefinition<&str, &[u8]> =
    TableDefinition::new("pending_activations");
/// When each key version's shares were last renewed (refresh or reshare): key id →
/// Unix seconds.
const RENEWED: TableDefinition<&[u8], i64> = TableDefinition::new("key_renewed");

/// Shares to destroy on nodes a reshare moved a key away from: key id (16 bytes) ||
/// node index (2 bytes, big-endian) → the node's `RetireKeyRequest` (protobuf: the
/// reshare's start and every new holder's signed confirmation).
const RETIREMENTS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("retirements");

fn retirement_key(key: &KeyId, node: PartyIndex) -> Vec<u8> {
    let mut k = key.0.to_vec();
    k.extend_from_slice(&node.get().to_be_bytes());
    k
}

/// Encoding version of a `key_versions` entry.
const VERSIONS_V1: u8 = 1;
/// Bytes per version in a `key_versions` entry.
const VERSION_LEN: usize = 4 + 16 + 8 + 1 + 8;

/// Store errors.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// A read or write failed, or data is malformed.
    #[error("coordinator store: {0}")]
    Failed(String),
    /// The store cannot be reached for now (PostgreSQL down or restarting): retry.
    #[error("coordinator store unavailable, retry later: {0}")]
    Unavailable(String),
}

impl<E: Into<redb::Error>> From<E> for StoreError {
    fn from(e: E) -> Self {
        StoreError::Failed(e.into().to_string())
    }
}

/// Result alias.
pub type Result<T> = core::result::Result<T, StoreError>;

/// One version of a named key: `create` makes version 1, each rotation the next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KeyVersion {
    /// 1, 2, …
    pub version: u32,
    /// The key of this version (its JWS `kid` is the hex of this id).
    pub key_id: KeyId,
    /// Unix seconds.
    pub created_at: i64,
    /// When a newer version replaced it (unix seconds); `None` for the current one.
    pub retired_at: Option<i64>,
}

/// A version with its public data.
#[derive(Clone, Debug)]
pub struct StoredVersion {
    /// Version, id and times.
    pub version: KeyVersion,
    /// Public key data.
    pub public: KeyPublic,
    /// What the key may be used for.
    pub profile: KeyProfile,
}

/// A named key.
#[derive(Clone, Debug)]
pub struct NamedKey {
    /// Its name.
    pub name: String,
    /// The public data of its current (newest) version.
    pub public: KeyPublic,
    /// Every version, oldest first; the last is the current one.
    pub versions: Vec<StoredVersion>,
}

fn encode_versions(versions: &[KeyVersion]) -> Vec<u8> {
    let mut out = Vec::with_capacity(5 + versions.len() * VERSION_LEN);
    out.push(VERSIONS_V1);
    out.extend_from_slice(
        &u32::try_from(versions.len())
            .unwrap_or(u32::MAX)
            .to_be_bytes(),
    );
    for v in versions {
        out.extend_from_slice(&v.version.to_be_bytes());
        out.extend_from_slice(&v.key_id.0);
        out.extend_from_slice(&v.created_at.to_be_bytes());
        out.push(u8::from(v.retired_at.is_some()));
        out.extend_from_slice(&v.retired_at.unwrap_or(0).to_be_bytes());
    }
    out
}

fn decode_versions(b: &[u8]) -> Option<Vec<KeyVersion>> {
    let (&VERSIONS_V1, rest) = b.split_first()? else {
        return None;
    };
    let (count, mut rest) = rest.split_first_chunk::<4>()?;
    let count = usize::try_from(u32::from_be_bytes(*count)).ok()?;
    if rest.len() != count.checked_mul(VERSION_LEN)? {
        return None;
    }
    let mut out = Vec::with_capacity(count);
    while let Some((one, tail)) = rest.split_first_chunk::<VERSION_LEN>() {
        rest = tail;
        let (version, one) = one.split_first_chunk::<4>()?;
        let (key_id, one) = one.split_first_chunk::<16>()?;
        let (created_at, one) = one.split_first_chunk::<8>()?;
        let (&retired, one) = one.split_first()?;
        let retired_at = i64::from_be_bytes(*one.first_chunk::<8>()?);
        out.push(KeyVersion {
            version: u32::from_be_bytes(*version),
            key_id: KeyId(*key_id),
            created_at: i64::from_be_bytes(*created_at),
            retired_at: match retired {
                0 => None,
                1 => Some(retired_at),
                _ => return None,
            },
        });
    }
    Some(out)
}

/// The coordinator's redb store.
pub struct Store {
    db: Database,
}

impl Store {
    /// Opens or creates the store.
    pub fn open(path: &Path) -> Result<Self> {
        let db = Database::create(path)?;
        let tx = db.begin_write()?;
        {
            tx.open_table(NAMES)?;
            tx.open_table(KEYS)?;
            tx.open_table(VERSIONS)?;
            tx.open_table(RULES)?;
            tx.open_table(PROFILES)?;
            tx.open_table(POOL)?;
        }
        tx.commit()?;
        Ok(Store { db })
    }
}

/// The coordinator's durable key data (see `coordinator/STORE.md`): implemented by the
/// embedded redb [`Store`] and by the PostgreSQL store. Every write is durable before
/// the call returns.
pub trait KeyStore: Send + Sync {
    /// Records a new version of `name` in one transaction: its public data, its
    /// profile, the name's whole version list `versions` (whose last entry is `key`'s),
    /// and `key` as the name's current key.
    fn put_version(
        &self,
        name: &str,
        key: &KeyPublic,
        profile: &KeyProfile,
        versions: &[KeyVersion],
    ) -> Result<()>;

    /// Records the public data of a named key's current version (as versions before
    /// key versions existed stored it).
    fn put_key(&self, name: &str, key: &KeyPublic) -> Result<()>;

    /// Records that the new shares of `key` (a refresh or reshare of `name`'s current
    /// version, run `session`) are decided and must be activated on every node. Durable
    /// before the first node activates, so a coordinator that dies midway finishes the
    /// activation when it starts again ([`KeyStore::pending_activations`]).
    fn put_pending_activation(
        &self,
        name: &str,
        session: &SessionId,
        key: &KeyPublic,
    ) -> Result<()>;

    /// Activations recorded by [`KeyStore::put_pending_activation`] and not yet committed.
    fn pending_activations(&self) -> Result<Vec<(String, SessionId, KeyPublic)>>;

    /// Every node holds the new shares of `key`: replaces its public data (same key
    /// id, next epoch), records when, and clears the pending activation, in one
    /// transaction.
    fn commit_activation(&self, name: &str, key: &KeyPublic, at: i64) -> Result<()>;

    /// Records that `nodes` must destroy their shares of `key` once its reshare is
    /// active, with the evidence each is to be shown (`request`). Durable before the
    /// activation, so a coordinator that dies midway still retires them.
    fn put_retirements(&self, key: &KeyId, nodes: &[PartyIndex], request: &[u8]) -> Result<()>;

    /// Retirements recorded by [`KeyStore::put_retirements`] and not yet done.
    fn retirements(&self) -> Result<Vec<(KeyId, PartyIndex, Vec<u8>)>>;

    /// Node `node` no longer holds a share of `key` (or is gone).
    fn remove_retirement(&self, key: &KeyId, node: PartyIndex) -> Result<()>;

    /// When the shares of key version `id` were last renewed (Unix seconds), if ever.
    fn renewed_at(&self, id: &KeyId) -> Result<Option<i64>>;

    /// Records the profile of existing key versions (the narrowing raw → checkpoint,
    /// after every node has made it).
    fn put_profile(&self, ids: &[KeyId], profile: &KeyProfile) -> Result<()>;

    /// Every named key, with all its versions.
    fn keys(&self) -> Result<Vec<NamedKey>>;

    /// Empties the pool table an earlier version kept: presignatures now live only in
    /// memory, on the nodes and in the coordinator (DESIGN.md §4.5). Returns how many
    /// entries were dropped.
    fn drop_stored_pools(&self) -> Result<u64>;

    /// The key id of `name`.
    fn key_id(&self, name: &str) -> Result<Option<KeyId>>;
}

impl KeyStore for Store {
    fn put_version(
        &self,
        name: &str,
        key: &KeyPublic,
        profile: &KeyProfile,
        versions: &[KeyVersion],
    ) -> Result<()> {
        if versions.last().map(|v| v.key_id) != Some(key.key_id) {
            return Err(StoreError::Failed(format!(
                "key {name}: the version list must end with the new key {}",
                key.key_id
            )));
        }
        let tx = self.db.begin_write()?;
        {
            let mut k = tx.open_table(KEYS)?;
            k.insert(&key.key_id.0[..], key.to_bytes().as_slice())?;
            let mut p = tx.open_table(PROFILES)?;
            p.insert(&key.key_id.0[..], profile.to_bytes().as_slice())?;
            let mut v = tx.open_table(VERSIONS)?;
            v.insert(name, encode_versions(versions).as_slice())?;
            let mut n = tx.open_table(NAMES)?;
            n.insert(name, &key.key_id.0[..])?;
        }
        tx.commit()?;
        Ok(())
    }

    fn put_key(&self, name: &str, key: &KeyPublic) -> Result<()> {
        let tx = self.db.begin_write()?;
        {
            let mut n = tx.open_table(NAMES)?;
            n.insert(name, &key.key_id.0[..])?;
            let mut k = tx.open_table(KEYS)?;
            k.insert(&key.key_id.0[..], key.to_bytes().as_slice())?;
        }
        tx.commit()?;
        Ok(())
    }

    fn put_pending_activation(
        &self,
        name: &str,
        session: &SessionId,
        key: &KeyPublic,
    ) -> Result<()> {
        let mut v = session.0.to_vec();
        v.extend_from_slice(&key.to_bytes());
        let tx = self.db.begin_write()?;
        {
            let mut t = tx.open_table(PENDING_ACTIVATIONS)?;
            t.insert(name, v.as_slice())?;
        }
        tx.commit()?;
        Ok(())
    }

    fn pending_activations(&self) -> Result<Vec<(String, SessionId, KeyPublic)>> {
        let tx = self.db.begin_read()?;
        let t = match tx.open_table(PENDING_ACTIVATIONS) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
            Err(e) => return Err(e.into()),
        };
        let mut out = Vec::new();
        for e in t.iter()? {
            let (name, v) = e?;
            let name = name.value().to_string();
            let v = v.value();
            let corrupt =
                || StoreError::Failed(format!("pending activation of key {name} is malformed"));
            let session = SessionId(
                v.get(..32)
                    .ok_or_else(corrupt)?
                    .try_into()
                    .map_err(|_| corrupt())?,
            );
            let key =
                KeyPublic::from_bytes(v.get(32..).ok_or_else(corrupt)?).map_err(|_| corrupt())?;
            out.push((name, session, key));
        }
        Ok(out)
    }

    fn commit_activation(&self, name: &str, key: &KeyPublic, at: i64) -> Result<()> {
        let tx = self.db.begin_write()?;
        {
            let mut k = tx.open_table(KEYS)?;
            k.insert(&key.key_id.0[..], key.to_bytes().as_slice())?;
            let mut r = tx.open_table(RENEWED)?;
            r.insert(&key.key_id.0[..], at)?;
            let mut p = tx.open_table(PENDING_ACTIVATIONS)?;
            p.remove(name)?;
        }
        tx.commit()?;
        Ok(())
    }

    fn put_retirements(&self, key: &KeyId, nodes: &[PartyIndex], request: &[u8]) -> Result<()> {
        let tx = self.db.begin_write()?;
        {
            let mut t = tx.open_table(RETIREMENTS)?;
            for n in nodes {
                t.insert(retirement_key(key, *n).as_slice(), request)?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    fn retirements(&self) -> Result<Vec<(KeyId, PartyIndex, Vec<u8>)>> {
        let tx = self.db.begin_read()?;
        let t = match tx.open_table(RETIREMENTS) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
            Err(e) => return Err(e.into()),
        };
        let mut out = Vec::new();
        for e in t.iter()? {
            let (k, v) = e?;
            let k = k.value();
            let corrupt = || StoreError::Failed("a retirement record is malformed".into());
            let id: [u8; 16] = k
                .get(..16)
                .and_then(|b| b.try_into().ok())
                .ok_or_else(corrupt)?;
            let i: [u8; 2] = k
                .get(16..)
                .and_then(|b| b.try_into().ok())
                .ok_or_else(corrupt)?;
            let node = PartyIndex::new(u16::from_be_bytes(i)).ok_or_else(corrupt)?;
            out.push((KeyId(id), node, v.value().to_vec()));
        }
        Ok(out)
    }

    fn remove_retirement(&self, key: &KeyId, node: PartyIndex) -> Result<()> {
        let tx = self.db.begin_write()?;
        {
            let mut t = tx.open_table(RETIREMENTS)?;
            t.remove(retirement_key(key, node).as_slice())?;
        }
        tx.commit()?;
        Ok(())
    }

    fn renewed_at(&self, id: &KeyId) -> Result<Option<i64>> {
        let tx = self.db.begin_read()?;
        let t = match tx.open_table(RENEWED) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        Ok(t.get(&id.0[..])?.map(|v| v.value()))
    }

    fn put_profile(&self, ids: &[KeyId], profile: &KeyProfile) -> Result<()> {
        let tx = self.db.begin_write()?;
        {
            let mut p = tx.open_table(PROFILES)?;
            for id in ids {
                p.insert(&id.0[..], profile.to_bytes().as_slice())?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    fn keys(&self) -> Result<Vec<NamedKey>> {
        let tx = self.db.begin_read()?;
        let names = tx.open_table(NAMES)?;
        let keys = tx.open_table(KEYS)?;
        let versions = tx.open_table(VERSIONS)?;
        let rules = tx.open_table(RULES)?;
        let profiles = tx.open_table(PROFILES)?;
        let mut out = Vec::new();
        for e in names.iter()? {
            let (name, id) = e?;
            let name = name.value().to_string();
            let corrupt = |what: &str| StoreError::Failed(format!("key {name}: {what}"));
            let current = KeyId(
                id.value()
                    .try_into()
                    .map_err(|_| corrupt("the name maps to a malformed key id"))?,
            );
            let list = match versions.get(name.as_str())? {
                Some(v) => {
                    decode_versions(v.value()).ok_or_else(|| corrupt("malformed version list"))?
                }
                // Written before key versions existed: the one key is version 1.
                None => vec![KeyVersion {
                    version: 1,
                    key_id: current,
                    created_at: 0,
                    retired_at: None,
                }],
            };
            if list.last().map(|v| v.key_id) != Some(current) {
                return Err(corrupt("the current key is not the newest version"));
            }
            let mut stored = Vec::with_capacity(list.len());
            for v in list {
                let Some(bytes) = keys.get(&v.key_id.0[..])? else {
                    return Err(corrupt(&format!("version {} has no key data", v.version)));
                };
                let public = KeyPublic::from_bytes(bytes.value())
                    .map_err(|e| corrupt(&format!("version {}: {e}", v.version)))?;
                let bad = |e: quorate_proto::convert::ConvertError| {
                    corrupt(&format!("version {}: {e}", v.version))
                };
                let profile = match profiles.get(&v.key_id.0[..])? {
                    Some(p) => KeyProfile::from_bytes(p.value()).map_err(bad)?,
                    // Written before profiles existed.
                    None => {
                        let r = match rules.get(&v.key_id.0[..])? {
                            None => None,
                            Some(r) => Some(TokenRules::from_bytes(r.value()).map_err(bad)?),
                        };
                        KeyProfile::legacy(public.purpose, r)
                    }
                };
                stored.push(StoredVersion {
                    version: v,
                    public,
                    profile,
                });
            }
            let public = stored
                .last()
                .map(|v| v.public.clone())
                .ok_or_else(|| corrupt("no versions"))?;
            out.push(NamedKey {
                name,
                public,
                versions: stored,
            });
        }
        Ok(out)
    }

    fn drop_stored_pools(&self) -> Result<u64> {
        let tx = self.db.begin_write()?;
        let n = {
            let mut t = tx.open_table(POOL)?;
            let n = t.len()?;
            t.retain(|_, _| false)?;
            n
        };
        tx.commit()?;
        Ok(n)
    }

    fn key_id(&self, name: &str) -> Result<Option<KeyId>> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(NAMES)?;
        Ok(t.get(name)?
            .and_then(|v| v.value().try_into().ok().map(KeyId)))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

    use super::*;

    #[test]
    fn version_lists_round_trip_and_reject_garbage() {
        let v = vec![
            KeyVersion {
                version: 1,
                key_id: KeyId([1; 16]),
                created_at: 10,
                retired_at: Some(20),
            },
            KeyVersion {
                version: 2,
                key_id: KeyId([2; 16]),
                created_at: 20,
                retired_at: None,
            },
        ];
        let b = encode_versions(&v);
        assert_eq!(decode_versions(&b).unwrap(), v);
        assert!(decode_versions(&b[..b.len() - 1]).is_none());
        let mut more = b.clone();
        more.push(0);
        assert!(decode_versions(&more).is_none());
        let mut v2 = b.clone();
        v2[0] = 2;
        assert!(decode_versions(&v2).is_none());
        let mut flag = b;
        flag[5 + 28] = 7;
        assert!(decode_versions(&flag).is_none());
        assert_eq!(decode_versions(&encode_versions(&[])).unwrap(), vec![]);
    }
}
