//! The coordinator's durable public data (DESIGN.md §5): key names and public key data,
//! and the pools' presignature public data. Nothing here is secret.

use std::path::Path;

use quorate_crypto::keys::{KeyId, KeyPublic};
use quorate_crypto::presign::{PresigId, PresignaturePublic};
use quorate_crypto::wire::Wire;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

const NAMES: TableDefinition<&str, &[u8]> = TableDefinition::new("key_names");
const KEYS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("keys");
const POOL: TableDefinition<&[u8], &[u8]> = TableDefinition::new("pool");

/// Store errors.
#[derive(Debug, thiserror::Error)]
#[error("coordinator store: {0}")]
pub struct StoreError(String);

impl<E: Into<redb::Error>> From<E> for StoreError {
    fn from(e: E) -> Self {
        StoreError(e.into().to_string())
    }
}

/// Result alias.
pub type Result<T> = core::result::Result<T, StoreError>;

/// A named key.
#[derive(Clone, Debug)]
pub struct NamedKey {
    /// Its name.
    pub name: String,
    /// Its public data.
    pub public: KeyPublic,
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
            tx.open_table(POOL)?;
        }
        tx.commit()?;
        Ok(Store { db })
    }

    /// Records (or, for a refresh, replaces) a named key.
    pub fn put_key(&self, name: &str, key: &KeyPublic) -> Result<()> {
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

    /// Every named key.
    pub fn keys(&self) -> Result<Vec<NamedKey>> {
        let tx = self.db.begin_read()?;
        let names = tx.open_table(NAMES)?;
        let keys = tx.open_table(KEYS)?;
        let mut out = Vec::new();
        for e in names.iter()? {
            let (name, id) = e?;
            let Some(bytes) = keys.get(id.value())? else {
                return Err(StoreError(format!(
                    "key {} has a name but no data",
                    name.value()
                )));
            };
            let public = KeyPublic::from_bytes(bytes.value())
                .map_err(|e| StoreError(format!("key {}: {e}", name.value())))?;
            out.push(NamedKey {
                name: name.value().to_string(),
                public,
            });
        }
        Ok(out)
    }

    /// Adds presignatures to the pools.
    pub fn add_presigs(&self, presigs: &[PresignaturePublic]) -> Result<()> {
        let tx = self.db.begin_write()?;
        {
            let mut t = tx.open_table(POOL)?;
            for p in presigs {
                t.insert(&p.id.0[..], p.to_bytes().as_slice())?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// Durably removes a presignature from the pools *before* it is used, so that a
    /// coordinator restart never hands it out again.
    pub fn take_presig(&self, id: &PresigId) -> Result<()> {
        let tx = self.db.begin_write()?;
        {
            let mut t = tx.open_table(POOL)?;
            t.remove(&id.0[..])?;
        }
        tx.commit()?;
        Ok(())
    }

    /// Every pooled presignature.
    pub fn presigs(&self) -> Result<Vec<PresignaturePublic>> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(POOL)?;
        let mut out = Vec::new();
        for e in t.iter()? {
            let (_, v) = e?;
            out.push(
                PresignaturePublic::from_bytes(v.value())
                    .map_err(|e| StoreError(format!("pool: {e}")))?,
            );
        }
        Ok(out)
    }

    /// The key id of `name`.
    pub fn key_id(&self, name: &str) -> Result<Option<KeyId>> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(NAMES)?;
        Ok(t.get(name)?
            .and_then(|v| v.value().try_into().ok().map(KeyId)))
    }
}
