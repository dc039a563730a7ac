//! Key profiles (DESIGN.md §9): what a key may be used for, fixed when it is created and
//! recorded by every fragment node, which refuses any other use.
//!
//! | profile | signs / answers | published |
//! | --- | --- | --- |
//! | [`KeyProfile::Raw`] | any 32-byte digest (HSM-style API) | its public key on request; never in the issuer JWKS |
//! | [`KeyProfile::Token`] | only JWS access tokens that pass the key's [`TokenRules`], the node's ceiling and the node's evidence check | the issuer JWKS |
//! | [`KeyProfile::Checkpoint`] | only audit checkpoint statements (JWS of typ [`CHECKPOINT_TYP`]) | its own JWKS URL |
//! | [`KeyProfile::Derive`], [`KeyProfile::Decrypt`] | threshold DH (§4.6) | its public key on request |
//!
//! The only change a profile may ever undergo is a narrowing that removes uses:
//! [`KeyProfile::Raw`] → [`KeyProfile::Checkpoint`] (how a store written before profiles
//! existed gets its audit key back under the checkpoint profile). Nothing widens.

use quorate_crypto::keys::KeyPurpose;

use crate::convert::ConvertError;
use crate::rules::TokenRules;
use crate::{api, fragment};

/// The JOSE `typ` of audit checkpoint statements, the only JWS a checkpoint key signs.
pub const CHECKPOINT_TYP: &str = "quorate-audit-checkpoint+jwt";

/// Version of the byte encoding of a profile.
const ENCODING_V1: u8 = 1;

/// What a key may be used for. A token key carries its rules, so a token key without
/// rules (or a raw key with rules) cannot be written down.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum KeyProfile {
    /// Signs any 32-byte digest.
    Raw,
    /// Signs only JWS access tokens within these rules (and the node's ceiling).
    Token(TokenRules),
    /// Signs only audit checkpoint statements.
    Checkpoint,
    /// Answers threshold DH for derivation.
    Derive,
    /// Answers threshold DH for decryption.
    Decrypt,
}

fn err(msg: impl Into<String>) -> ConvertError {
    ConvertError(msg.into())
}

impl KeyProfile {
    /// The profile's name as operators type it: `raw`, `token`, `checkpoint`, `derive`,
    /// `decrypt`.
    pub fn name(&self) -> &'static str {
        match self {
            KeyProfile::Raw => "raw",
            KeyProfile::Token(_) => "token",
            KeyProfile::Checkpoint => "checkpoint",
            KeyProfile::Derive => "derive",
            KeyProfile::Decrypt => "decrypt",
        }
    }

    /// The cryptographic purpose of keys of this profile (bound into their DKG).
    pub fn purpose(&self) -> KeyPurpose {
        match self {
            KeyProfile::Raw | KeyProfile::Token(_) | KeyProfile::Checkpoint => KeyPurpose::Sign,
            KeyProfile::Derive => KeyPurpose::Derive,
            KeyProfile::Decrypt => KeyPurpose::Decrypt,
        }
    }

    /// The token rules of a token key.
    pub fn token_rules(&self) -> Option<&TokenRules> {
        match self {
            KeyProfile::Token(r) => Some(r),
            _ => None,
        }
    }

    /// Whether the key signs JWS only (never a bare digest).
    pub fn signs_jws_only(&self) -> bool {
        matches!(self, KeyProfile::Token(_) | KeyProfile::Checkpoint)
    }

    /// The profile a key created before profiles existed gets: a signing key with token
    /// rules is a token key, any other signing key raw, derive and decrypt keys keep
    /// their purpose.
    pub fn legacy(purpose: KeyPurpose, rules: Option<TokenRules>) -> Self {
        match (purpose, rules) {
            (KeyPurpose::Sign, Some(r)) => KeyProfile::Token(r),
            (KeyPurpose::Sign, None) => KeyProfile::Raw,
            (KeyPurpose::Derive, _) => KeyProfile::Derive,
            (KeyPurpose::Decrypt, _) => KeyProfile::Decrypt,
        }
    }

    /// Whether a key of this profile may be narrowed to `to` (only raw → checkpoint;
    /// anything to itself).
    pub fn may_narrow_to(&self, to: &KeyProfile) -> bool {
        self == to || matches!((self, to), (KeyProfile::Raw, KeyProfile::Checkpoint))
    }

    /// The fragment-node wire form: the profile enum and, for a token key, its rules.
    pub fn to_fragment(&self) -> (fragment::KeyProfile, Option<fragment::TokenRules>) {
        let p = match self {
            KeyProfile::Raw => fragment::KeyProfile::Raw,
            KeyProfile::Token(_) => fragment::KeyProfile::Token,
            KeyProfile::Checkpoint => fragment::KeyProfile::Checkpoint,
            KeyProfile::Derive => fragment::KeyProfile::Derive,
            KeyProfile::Decrypt => fragment::KeyProfile::Decrypt,
        };
        (p, self.token_rules().map(TokenRules::to_fragment))
    }

    /// From the fragment-node wire form; rules are required for a token key and refused
    /// for any other.
    pub fn from_fragment(
        profile: i32,
        rules: Option<&fragment::TokenRules>,
    ) -> Result<Self, ConvertError> {
        let name = match fragment::KeyProfile::try_from(profile) {
            Ok(fragment::KeyProfile::Raw) => "raw",
            Ok(fragment::KeyProfile::Token) => "token",
            Ok(fragment::KeyProfile::Checkpoint) => "checkpoint",
            Ok(fragment::KeyProfile::Derive) => "derive",
            Ok(fragment::KeyProfile::Decrypt) => "decrypt",
            _ => {
                return Err(err(
                    "the key profile must be raw, token, checkpoint, derive or decrypt",
                ));
            }
        };
        let rules = rules.map(TokenRules::try_from).transpose()?;
        KeyProfile::from_name(name, rules)
    }

    /// From the public-API wire form (`PROFILE_UNSPECIFIED` is refused).
    pub fn from_api(profile: i32, rules: Option<&api::TokenRules>) -> Result<Self, ConvertError> {
        let name = match api::KeyProfile::try_from(profile) {
            Ok(api::KeyProfile::Raw) => "raw",
            Ok(api::KeyProfile::Token) => "token",
            Ok(api::KeyProfile::Checkpoint) => "checkpoint",
            Ok(api::KeyProfile::Derive) => "derive",
            Ok(api::KeyProfile::Decrypt) => "decrypt",
            _ => {
                return Err(err(
                    "the key profile must be raw, token, checkpoint, derive or decrypt",
                ));
            }
        };
        let rules = rules
            .map(|r| {
                TokenRules::try_from(r).map_err(|e| {
                    err(format!(
                        "{e} (token rules need all three: max_ttl_seconds, issuer, typ)"
                    ))
                })
            })
            .transpose()?;
        KeyProfile::from_name(name, rules)
    }

    /// The public-API wire form.
    pub fn to_api(&self) -> (api::KeyProfile, Option<api::TokenRules>) {
        let p = match self {
            KeyProfile::Raw => api::KeyProfile::Raw,
            KeyProfile::Token(_) => api::KeyProfile::Token,
            KeyProfile::Checkpoint => api::KeyProfile::Checkpoint,
            KeyProfile::Derive => api::KeyProfile::Derive,
            KeyProfile::Decrypt => api::KeyProfile::Decrypt,
        };
        (p, self.token_rules().map(TokenRules::to_api))
    }

    /// From a profile name and, for `token`, its rules.
    pub fn from_name(name: &str, rules: Option<TokenRules>) -> Result<Self, ConvertError> {
        match (name, rules) {
            ("token", Some(r)) => Ok(KeyProfile::Token(r)),
            ("token", None) => Err(err(
                "a token key needs token rules (max_ttl_seconds, issuer, typ)",
            )),
            (other, Some(_)) if ["raw", "checkpoint", "derive", "decrypt"].contains(&other) => {
                Err(err(format!(
                    "token rules apply only to token keys, not to a {other} key"
                )))
            }
            ("raw", None) => Ok(KeyProfile::Raw),
            ("checkpoint", None) => Ok(KeyProfile::Checkpoint),
            ("derive", None) => Ok(KeyProfile::Derive),
            ("decrypt", None) => Ok(KeyProfile::Decrypt),
            (other, _) => Err(err(format!(
                "unknown key profile \"{}\": use raw, token, checkpoint, derive or decrypt",
                other.escape_debug()
            ))),
        }
    }

    /// Versioned encoding for stores: `1 || tag || rules` (rules only for a token key,
    /// in [`TokenRules::to_bytes`]).
    pub fn to_bytes(&self) -> Vec<u8> {
        let tag = match self {
            KeyProfile::Raw => 1,
            KeyProfile::Token(_) => 2,
            KeyProfile::Checkpoint => 3,
            KeyProfile::Derive => 4,
            KeyProfile::Decrypt => 5,
        };
        let mut out = vec![ENCODING_V1, tag];
        if let KeyProfile::Token(r) = self {
            out.extend_from_slice(&r.to_bytes());
        }
        out
    }

    /// Decodes [`KeyProfile::to_bytes`], validating the rules again.
    pub fn from_bytes(b: &[u8]) -> Result<Self, ConvertError> {
        let [version, tag, rest @ ..] = b else {
            return Err(err("key profile record is truncated"));
        };
        if *version != ENCODING_V1 {
            return Err(err(format!(
                "key profile record has encoding version {version}; this build reads version {ENCODING_V1}"
            )));
        }
        let plain = |p: KeyProfile| {
            if rest.is_empty() {
                Ok(p)
            } else {
                Err(err("key profile record has trailing bytes"))
            }
        };
        match tag {
            1 => plain(KeyProfile::Raw),
            2 => Ok(KeyProfile::Token(TokenRules::from_bytes(rest)?)),
            3 => plain(KeyProfile::Checkpoint),
            4 => plain(KeyProfile::Derive),
            5 => plain(KeyProfile::Decrypt),
            t => Err(err(format!("key profile record has unknown tag {t}"))),
        }
    }
}

impl std::fmt::Display for KeyProfile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KeyProfile::Token(r) => write!(
                f,
                "token (typ {}, issuer {}, tokens of at most {} s)",
                r.typ(),
                r.issuer(),
                r.max_ttl_seconds()
            ),
            other => f.write_str(other.name()),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    fn all() -> Vec<KeyProfile> {
        vec![
            KeyProfile::Raw,
            KeyProfile::Token(TokenRules::new(900, "https://i.test", "at+jwt").unwrap()),
            KeyProfile::Checkpoint,
            KeyProfile::Derive,
            KeyProfile::Decrypt,
        ]
    }

    #[test]
    fn encodings_round_trip() {
        for p in all() {
            assert_eq!(KeyProfile::from_bytes(&p.to_bytes()).unwrap(), p);
            let (w, r) = p.to_fragment();
            assert_eq!(KeyProfile::from_fragment(w as i32, r.as_ref()).unwrap(), p);
            let (w, r) = p.to_api();
            assert_eq!(KeyProfile::from_api(w as i32, r.as_ref()).unwrap(), p);
            let mut trailing = p.to_bytes();
            trailing.push(0);
            assert!(KeyProfile::from_bytes(&trailing).is_err());
        }
        assert!(KeyProfile::from_bytes(&[2, 1]).is_err());
        assert!(KeyProfile::from_bytes(&[1, 9]).is_err());
    }

    #[test]
    fn rules_only_with_token() {
        let rules = TokenRules::new(900, "https://i.test", "at+jwt").unwrap();
        for name in ["raw", "checkpoint", "derive", "decrypt"] {
            let e = KeyProfile::from_name(name, Some(rules.clone())).unwrap_err();
            assert!(e.0.contains("only to token keys"), "{e}");
        }
        assert!(KeyProfile::from_name("token", None).is_err());
        assert!(KeyProfile::from_fragment(0, None).is_err());
        assert!(KeyProfile::from_api(0, None).is_err());
    }

    #[test]
    fn only_raw_narrows_and_only_to_checkpoint() {
        for from in all() {
            for to in all() {
                let allowed =
                    from == to || (from == KeyProfile::Raw && to == KeyProfile::Checkpoint);
                assert_eq!(from.may_narrow_to(&to), allowed, "{from} -> {to}");
            }
        }
    }

    #[test]
    fn legacy_mapping() {
        let rules = TokenRules::new(900, "https://i.test", "at+jwt").unwrap();
        assert_eq!(
            KeyProfile::legacy(KeyPurpose::Sign, Some(rules.clone())),
            KeyProfile::Token(rules)
        );
        assert_eq!(KeyProfile::legacy(KeyPurpose::Sign, None), KeyProfile::Raw);
        assert_eq!(
            KeyProfile::legacy(KeyPurpose::Derive, None),
            KeyProfile::Derive
        );
    }
}
