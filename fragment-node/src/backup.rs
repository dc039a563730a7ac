//! Backups of a node (DESIGN.md §5): its sealed key shares and configuration only.
//!
//! A backup holds every active key share exactly as stored — sealed with AES-256-GCM
//! under the node's key-encryption key (KEK), which is **not** in the backup: keep the
//! KEK apart from the backups (another volume, a secret manager), or a backup is no
//! more protected than the disk it came from. Besides the shares it holds the key
//! profiles, the node's sealed KEM key and policy bundle, and (if given) the node's
//! ceiling file. Nothing about presignatures: they live in process memory only
//! (DESIGN.md §4.5), so a restored node holds none and no restore can make a
//! presignature sign twice.
//!
//! The node must be stopped for both (the store is opened exclusively). A restored node
//! rejoins with the shares of the backup's epoch; if the cluster has refreshed or
//! reshared the keys since, those shares are of an older epoch and the node is
//! repaired instead (`quorate admin repair-node`).
//!
//! File format: JSON, `"format": "quorate-node-backup/v1"`, binary values in base64url
//! without padding; written with mode 0600, atomically (temporary file, then rename).

use std::io::Write as _;
use std::path::Path;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use quorate_crypto::keys::KeyShare;

use crate::store::{BackupEntries, Kek, Store};

/// The format tag of version 1.
pub const FORMAT: &str = "quorate-node-backup/v1";

/// What a backup or restore covered: `(key id, epoch)` per key share.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Summary {
    /// Every key share, with its epoch.
    pub keys: Vec<(String, u32)>,
    /// Whether a ceiling file was included (backup) or written (restore).
    pub ceiling: bool,
}

fn open_store(data_dir: &Path, kek_file: &Path, create: bool) -> Result<Store, String> {
    let kek = Kek::load(kek_file, false).map_err(|e| e.to_string())?;
    let path = data_dir.join("node.redb");
    if !create && !path.exists() {
        return Err(format!(
            "{} does not exist: is {} the node's data directory?",
            path.display(),
            data_dir.display()
        ));
    }
    Store::open(&path, &kek).map_err(|e| {
        let e = e.to_string();
        if e.contains("already open") || e.contains("lock") {
            format!("{}: {e} (stop the node first)", path.display())
        } else {
            format!("{}: {e}", path.display())
        }
    })
}

fn summary(shares: &[KeyShare], ceiling: bool) -> Summary {
    Summary {
        keys: shares
            .iter()
            .map(|s| (s.public.key_id.to_string(), s.public.epoch))
            .collect(),
        ceiling,
    }
}

fn pairs(v: &Pairs) -> serde_json::Value {
    v.iter()
        .map(|(k, v)| serde_json::json!([B64.encode(k), B64.encode(v)]))
        .collect()
}

/// Binary (key, value) pairs.
type Pairs = Vec<(Vec<u8>, Vec<u8>)>;

fn unpairs(v: Option<&serde_json::Value>, what: &str) -> Result<Pairs, String> {
    let bad = || format!("backup: \"{what}\" must be a list of [key, value] base64url pairs");
    v.and_then(serde_json::Value::as_array)
        .ok_or_else(bad)?
        .iter()
        .map(|p| {
            let p = p.as_array().filter(|p| p.len() == 2).ok_or_else(bad)?;
            let dec = |x: Option<&serde_json::Value>| {
                x.and_then(serde_json::Value::as_str)
                    .and_then(|s| B64.decode(s).ok())
                    .ok_or_else(bad)
            };
            Ok((dec(p.first())?, dec(p.get(1))?))
        })
        .collect()
}

/// Writes a backup of the stopped node at `data_dir` (KEK at `kek_file`) to `out`,
/// with the ceiling file `ceiling` if given. Every share is opened and checked against
/// its public share first, so a backup that is written is one that restores.
///
/// Errors (a sentence each): no store, a running node, a wrong KEK, a corrupt share,
/// an unreadable ceiling, an existing `out`, I/O.
pub fn backup(
    data_dir: &Path,
    kek_file: &Path,
    ceiling: Option<&Path>,
    out: &Path,
) -> Result<Summary, String> {
    if out.exists() {
        return Err(format!(
            "{} exists: a backup never overwrites a file",
            out.display()
        ));
    }
    let store = open_store(data_dir, kek_file, false)?;
    let shares = store.keys().map_err(|e| e.to_string())?;
    for s in &shares {
        s.validate()
            .map_err(|e| format!("key {}: {e}", s.public.key_id))?;
    }
    let entries = store.backup_entries().map_err(|e| e.to_string())?;
    drop(store);
    let ceiling_text = match ceiling {
        None => None,
        Some(p) => Some(
            std::fs::read_to_string(p).map_err(|e| format!("cannot read {}: {e}", p.display()))?,
        ),
    };
    let created_at = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let doc = serde_json::json!({
        "format": FORMAT,
        "created_at": created_at,
        "keys": pairs(&entries.keys),
        "profiles": pairs(&entries.profiles),
        "meta": entries
            .meta
            .iter()
            .map(|(k, v)| serde_json::json!([k, B64.encode(v)]))
            .collect::<Vec<_>>(),
        "ceiling": ceiling_text,
    });
    let tmp = out.with_extension("partial");
    {
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(|e| format!("cannot create {}: {e}", tmp.display()))?;
        f.write_all(doc.to_string().as_bytes())
            .and_then(|()| f.sync_all())
            .map_err(|e| format!("cannot write {}: {e}", tmp.display()))?;
    }
    std::fs::rename(&tmp, out).map_err(|e| format!("cannot rename to {}: {e}", out.display()))?;
    Ok(summary(&shares, ceiling.is_some()))
}

/// Restores `from` into the data directory `data_dir` (created if needed; it must hold
/// no key share), with the KEK at `kek_file` — the KEK the backup was sealed under. If
/// the backup holds a ceiling and `ceiling_out` is given, writes it there.
///
/// Errors: not a backup (or another format version), a wrong KEK (nothing is written),
/// a data directory that already holds shares, a running node, I/O.
pub fn restore(
    from: &Path,
    data_dir: &Path,
    kek_file: &Path,
    ceiling_out: Option<&Path>,
) -> Result<Summary, String> {
    let text = std::fs::read_to_string(from)
        .map_err(|e| format!("cannot read {}: {e}", from.display()))?;
    let doc: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| format!("{} is not a node backup (not JSON: {e})", from.display()))?;
    match doc.get("format").and_then(serde_json::Value::as_str) {
        Some(FORMAT) => {}
        Some(other) => {
            return Err(format!(
                "{}: backup format {other} is not supported (this build reads {FORMAT})",
                from.display()
            ));
        }
        None => {
            return Err(format!(
                "{} is not a node backup (no format)",
                from.display()
            ));
        }
    }
    let meta_bad = || "backup: \"meta\" must be a list of [name, base64url] pairs".to_owned();
    let entries = BackupEntries {
        keys: unpairs(doc.get("keys"), "keys")?,
        profiles: unpairs(doc.get("profiles"), "profiles")?,
        meta: doc
            .get("meta")
            .and_then(serde_json::Value::as_array)
            .ok_or_else(meta_bad)?
            .iter()
            .map(|p| {
                let k = p
                    .get(0)
                    .and_then(serde_json::Value::as_str)
                    .ok_or_else(meta_bad)?;
                let v = p
                    .get(1)
                    .and_then(serde_json::Value::as_str)
                    .and_then(|s| B64.decode(s).ok())
                    .ok_or_else(meta_bad)?;
                Ok((k.to_owned(), v))
            })
            .collect::<Result<_, String>>()?,
    };
    std::fs::create_dir_all(data_dir)
        .map_err(|e| format!("cannot create {}: {e}", data_dir.display()))?;
    let store = open_store(data_dir, kek_file, true)?;
    let shares = store.restore_entries(&entries).map_err(|e| {
        let e = e.to_string();
        if e.contains("unseal") || e.contains("open") {
            format!(
                "{e}: is {} the KEK this backup was sealed under? nothing was restored",
                kek_file.display()
            )
        } else {
            e
        }
    })?;
    let mut wrote = false;
    if let (Some(text), Some(p)) = (
        doc.get("ceiling").and_then(serde_json::Value::as_str),
        ceiling_out,
    ) {
        std::fs::write(p, text).map_err(|e| format!("cannot write {}: {e}", p.display()))?;
        wrote = true;
    }
    Ok(summary(&shares, wrote))
}
