//! The node's ceiling (DESIGN.md §9, "Node ceilings"): what token keys may be on this
//! node, from the node's own configuration — never from the coordinator.
//!
//! `--ceiling FILE` names a JSON file:
//!
//! ```json
//! { "token_issuers": ["https://issuer.example"],
//!   "token_typs": ["at+jwt"],
//!   "max_token_ttl_seconds": 3600,
//!   "operator_public_key_file": "operator.pub.pem",
//!   "trust_config": "trust.json" }
//! ```
//!
//! - `token_issuers`: the `iss` values a token key may sign for (exact match);
//! - `token_typs`: the JOSE `typ`s a token key may sign;
//! - `max_token_ttl_seconds`: the longest token lifetime any token key may allow
//!   (1 to 86400);
//! - `operator_public_key_file`: the operator's P-256 public key (SPKI PEM) that signs
//!   policy bundles (DESIGN.md §1, §9). With it the node decides every token and agent
//!   credential again under the bundle it holds ([`crate::policy`]); needs
//!   `trust_config`.
//! - `trust_config`: the identity providers this node trusts (the coordinator's
//!   `--trust-config` format: OIDC issuers, SPIFFE trust domains with JWT bundles,
//!   registered clients). With it, the node checks the evidence of every token
//!   ([`crate::evidence`]); without it, it checks rules and ceiling only. Registered
//!   clients' assertions must then be addressed to one of `token_issuers` `I`, or to
//!   `I/token` (what the coordinator accepts too).
//!
//! A relative path resolves against the file's directory; unknown fields are errors and
//! every problem is reported at once. A node started without `--ceiling` takes part in
//! no token key: it refuses their DKG and every token they would sign.
//!
//! A key's rules are checked against the ceiling when its DKG starts, and again on every
//! signature, so an operator who lowers a ceiling narrows existing keys at once.

use std::path::Path;

use p256::pkcs8::DecodePublicKey;
use quorate_proto::rules::{MAX_TTL_LIMIT_SECONDS, TokenRules};
use serde::Deserialize;

/// What token keys may be on this node.
#[derive(Clone, Debug)]
pub struct Ceiling {
    issuers: Vec<String>,
    typs: Vec<String>,
    max_ttl_seconds: u32,
    operator_key: Option<p256::PublicKey>,
    trust_config: Option<std::path::PathBuf>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    token_issuers: Vec<String>,
    token_typs: Vec<String>,
    max_token_ttl_seconds: u32,
    #[serde(default)]
    operator_public_key_file: Option<String>,
    #[serde(default)]
    trust_config: Option<String>,
}

impl Ceiling {
    /// Reads and validates the ceiling file; every problem at once.
    pub fn from_file(path: &Path) -> Result<Self, Vec<String>> {
        let at = path.display();
        let text = std::fs::read_to_string(path)
            .map_err(|e| vec![format!("--ceiling {at}: cannot read: {e}")])?;
        let f: File = serde_json::from_str(&text)
            .map_err(|e| vec![format!("--ceiling {at}: not a valid ceiling: {e}")])?;
        let mut errors = Vec::new();
        if f.token_issuers.is_empty() || f.token_issuers.iter().any(String::is_empty) {
            errors.push(format!(
                "--ceiling {at}: token_issuers must list at least one non-empty issuer"
            ));
        }
        if f.token_typs.is_empty() || f.token_typs.iter().any(String::is_empty) {
            errors.push(format!(
                "--ceiling {at}: token_typs must list at least one non-empty typ"
            ));
        }
        if f.max_token_ttl_seconds == 0 || f.max_token_ttl_seconds > MAX_TTL_LIMIT_SECONDS {
            errors.push(format!(
                "--ceiling {at}: max_token_ttl_seconds must be between 1 and {MAX_TTL_LIMIT_SECONDS}, got {}",
                f.max_token_ttl_seconds
            ));
        }
        let base = path.parent().unwrap_or(Path::new("."));
        let trust_config = f.trust_config.as_ref().map(|p| base.join(p));
        if let Some(t) = &trust_config
            && !t.is_file()
        {
            errors.push(format!(
                "--ceiling {at}: trust_config {}: no such file",
                t.display()
            ));
        }
        let operator_key = match &f.operator_public_key_file {
            None => None,
            Some(p) => {
                let full = base.join(p);
                match std::fs::read_to_string(&full)
                    .map_err(|e| e.to_string())
                    .and_then(|pem| {
                        p256::PublicKey::from_public_key_pem(&pem).map_err(|e| e.to_string())
                    }) {
                    Ok(k) => Some(k),
                    Err(e) => {
                        errors.push(format!(
                            "--ceiling {at}: operator_public_key_file {}: not a P-256 public key (SPKI PEM): {e}",
                            full.display()
                        ));
                        None
                    }
                }
            }
        };
        if f.operator_public_key_file.is_some() && f.trust_config.is_none() {
            errors.push(format!(
                "--ceiling {at}: operator_public_key_file needs trust_config: the signed policy decides on the agent, which this node must verify itself"
            ));
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        Ok(Ceiling {
            issuers: f.token_issuers,
            typs: f.token_typs,
            max_ttl_seconds: f.max_token_ttl_seconds,
            operator_key,
            trust_config,
        })
    }

    /// Whether token keys with `rules` may exist on this node; the error names what
    /// exceeds the ceiling.
    pub fn admits(&self, rules: &TokenRules) -> Result<(), String> {
        if !self.issuers.iter().any(|i| i == rules.issuer()) {
            return Err(format!(
                "issuer \"{}\" is not among this node's token issuers ({})",
                rules.issuer().escape_debug(),
                self.issuers.join(", ")
            ));
        }
        if !self.typs.iter().any(|t| t == rules.typ()) {
            return Err(format!(
                "typ \"{}\" is not among this node's token typs ({})",
                rules.typ().escape_debug(),
                self.typs.join(", ")
            ));
        }
        if rules.max_ttl_seconds() > self.max_ttl_seconds {
            return Err(format!(
                "a maximum token lifetime of {} s exceeds this node's ceiling of {} s",
                rules.max_ttl_seconds(),
                self.max_ttl_seconds
            ));
        }
        Ok(())
    }

    /// The `iss` values a token key may sign for: also what identifies this node's
    /// token service to registered clients' assertions (each issuer `I`, and `I/token`;
    /// [`quorate_authz::authn::client_assertion_audiences_for`]).
    pub fn token_issuers(&self) -> &[String] {
        &self.issuers
    }

    /// The trust configuration whose identity providers this node verifies agents'
    /// attestations against, if configured (then it checks evidence).
    pub fn trust_config(&self) -> Option<&Path> {
        self.trust_config.as_deref()
    }

    /// The operator's public key, if configured.
    pub fn operator_key(&self) -> Option<&p256::PublicKey> {
        self.operator_key.as_ref()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    fn write(dir: &Path, json: &str) -> std::path::PathBuf {
        let p = dir.join("ceiling.json");
        std::fs::write(&p, json).unwrap();
        p
    }

    #[test]
    fn admits_only_within_every_bound() {
        let dir = tempfile::tempdir().unwrap();
        let c = Ceiling::from_file(&write(
            dir.path(),
            r#"{"token_issuers":["https://i.test"],"token_typs":["at+jwt"],"max_token_ttl_seconds":900}"#,
        ))
        .unwrap();
        let ok = TokenRules::new(900, "https://i.test", "at+jwt").unwrap();
        assert!(c.admits(&ok).is_ok());
        for (rules, words) in [
            (
                TokenRules::new(901, "https://i.test", "at+jwt").unwrap(),
                "exceeds this node's ceiling of 900 s",
            ),
            (
                TokenRules::new(60, "https://evil.test", "at+jwt").unwrap(),
                "issuer \"https://evil.test\"",
            ),
            (
                TokenRules::new(60, "https://i.test", "JWT").unwrap(),
                "typ \"JWT\"",
            ),
        ] {
            let e = c.admits(&rules).unwrap_err();
            assert!(e.contains(words), "{e}");
        }
    }

    #[test]
    fn every_problem_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let e = Ceiling::from_file(&write(
            dir.path(),
            r#"{"token_issuers":[],"token_typs":[""],"max_token_ttl_seconds":0,"operator_public_key_file":"none.pem"}"#,
        ))
        .unwrap_err();
        assert_eq!(e.len(), 5, "{e:?}");
        assert!(
            e[4].contains("operator_public_key_file needs trust_config"),
            "{e:?}"
        );
        let e = Ceiling::from_file(&write(dir.path(), r#"{"token_issuers":["a"],"extra":1}"#))
            .unwrap_err();
        assert!(e[0].contains("extra"), "{e:?}");
    }
}
