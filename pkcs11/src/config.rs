//! Which clusters the module offers: one slot (with its one token) per cluster.
//!
//! - With `QUORATE_PKCS11_CONFIG` ([`ENV_CONFIG`]) naming a JSON file, one slot per entry
//!   of its `slots` array:
//!
//!   ```json
//!   {"slots": [
//!     {"label": "prod", "addr": "quorate.example:7100", "cacert": "ca.pem",
//!      "cert": "client-ci.pem", "key": "client-ci-key.pem", "domain": "quorate.example"}
//!   ]}
//!   ```
//!
//!   `domain` is optional (default `quorate.local`); relative paths are relative to the
//!   file's directory. Unknown members are an error, so a misspelt one is not ignored.
//! - Otherwise one slot labelled `quorate` from the client library's `QUORATE_ADDR`,
//!   `QUORATE_CACERT`, `QUORATE_CERT`, `QUORATE_KEY` and `QUORATE_DOMAIN`.
//!
//! Every problem is reported at once, naming the slot and the setting.

use std::path::{Path, PathBuf};

use quorate_client::ClientConfig;
use serde::Deserialize;

/// Environment variable naming the module's configuration file.
pub const ENV_CONFIG: &str = "QUORATE_PKCS11_CONFIG";

/// The token label of the one slot configured from the `QUORATE_*` variables.
pub const ENV_SLOT_LABEL: &str = "quorate";

/// Longest token label: `CK_TOKEN_INFO.label` is 32 bytes, blank-padded (PKCS#11 2.40
/// §3.2).
pub const MAX_LABEL: usize = 32;

/// One slot: a token label and the client settings of its cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotConfig {
    /// The token label (at most [`MAX_LABEL`] bytes of UTF-8, unique across slots).
    pub label: String,
    /// How to reach and authenticate to the cluster.
    pub client: ClientConfig,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    slots: Vec<FileSlot>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileSlot {
    label: String,
    addr: String,
    cacert: PathBuf,
    cert: PathBuf,
    key: PathBuf,
    #[serde(default)]
    domain: Option<String>,
}

/// The slots, from [`ENV_CONFIG`]'s file if set, else from the `QUORATE_*` variables.
///
/// # Errors
/// A message naming every unusable setting (and the slot it belongs to).
pub fn load() -> Result<Vec<SlotConfig>, String> {
    match std::env::var_os(ENV_CONFIG).filter(|v| !v.is_empty()) {
        Some(path) => from_file(Path::new(&path)),
        None => ClientConfig::from_env()
            .map(|client| {
                vec![SlotConfig {
                    label: ENV_SLOT_LABEL.to_owned(),
                    client,
                }]
            })
            .map_err(|e| {
                format!("no {ENV_CONFIG} file and the QUORATE_* variables are incomplete: {e}")
            }),
    }
}

/// The slots of a configuration file (see the module docs for its shape).
///
/// # Errors
/// The file cannot be read or parsed, it has no slot, a label is empty, too long or
/// repeated, or a slot's client settings are unusable; every problem is listed.
pub fn from_file(path: &Path) -> Result<Vec<SlotConfig>, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("{ENV_CONFIG}={}: cannot read it: {e}", path.display()))?;
    let file: FileConfig = serde_json::from_str(&text).map_err(|e| {
        format!(
            "{ENV_CONFIG}={}: not a valid configuration: {e}",
            path.display()
        )
    })?;
    let base = path.parent().unwrap_or_else(|| Path::new("."));
    let mut problems = Vec::new();
    let mut slots: Vec<SlotConfig> = Vec::new();
    if file.slots.is_empty() {
        problems.push("`slots` is empty: give at least one cluster".to_owned());
    }
    for (i, s) in file.slots.into_iter().enumerate() {
        let label = s.label.trim().to_owned();
        let name = format!("slots[{i}] ({label:?})");
        if label.is_empty() {
            problems.push(format!("{name}: `label` is empty"));
        } else if label.len() > MAX_LABEL {
            problems.push(format!(
                "{name}: `label` has {} bytes; a token label has at most {MAX_LABEL}",
                label.len()
            ));
        } else if slots.iter().any(|o| o.label == label) {
            problems.push(format!("{name}: `label` is used by another slot"));
        }
        let path = |p: PathBuf| if p.is_absolute() { p } else { base.join(p) };
        match ClientConfig::from_options(
            Some(&s.addr),
            Some(path(s.cacert)),
            Some(path(s.cert)),
            Some(path(s.key)),
            s.domain,
        ) {
            Ok(client) => slots.push(SlotConfig { label, client }),
            Err(e) => problems.push(format!("{name}: {e}")),
        }
    }
    if problems.is_empty() {
        Ok(slots)
    } else {
        Err(format!(
            "{ENV_CONFIG}={}:\n{}",
            path.display(),
            problems.join("\n")
        ))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use super::*;

    #[test]
    fn a_file_with_relative_paths_resolves_against_its_directory() {
        let dir = tempfile::tempdir().unwrap();
        for f in ["ca.pem", "c.pem", "k.pem"] {
            std::fs::write(dir.path().join(f), "x").unwrap();
        }
        let cfg = dir.path().join("p11.json");
        std::fs::write(
            &cfg,
            r#"{"slots": [{"label": "prod", "addr": "127.0.0.1:7100", "cacert": "ca.pem",
                "cert": "c.pem", "key": "k.pem", "domain": "quorate.test"}]}"#,
        )
        .unwrap();
        let slots = from_file(&cfg).unwrap();
        assert_eq!(slots.len(), 1);
        assert_eq!(slots[0].label, "prod");
        assert_eq!(slots[0].client.ca, dir.path().join("ca.pem"));
        assert_eq!(slots[0].client.domain, "quorate.test");
    }

    #[test]
    fn every_problem_is_named_with_its_slot() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("p11.json");
        std::fs::write(
            &cfg,
            r#"{"slots": [
                {"label": "", "addr": "127.0.0.1:7100", "cacert": "no-ca.pem", "cert": "c", "key": "k"},
                {"label": "a-label-that-is-much-longer-than-32-bytes", "addr": "x", "cacert": "c", "cert": "c", "key": "k"}
            ]}"#,
        )
        .unwrap();
        let err = from_file(&cfg).unwrap_err();
        for needle in [
            "slots[0]",
            "`label` is empty",
            "no-ca.pem",
            "slots[1]",
            "at most 32",
            "--addr x",
        ] {
            assert!(err.contains(needle), "{needle} missing from: {err}");
        }
        std::fs::write(&cfg, r#"{"slots": [], "slot": 1}"#).unwrap();
        let err = from_file(&cfg).unwrap_err();
        assert!(err.contains("unknown field `slot`"), "{err}");
    }
}
