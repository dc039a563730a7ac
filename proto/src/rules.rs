//! Token rules: what a token-signing key may sign (DESIGN.md §4.5 "node-side key-usage
//! rules", §7 "Issue").
//!
//! A key created with [`TokenRules`] signs only JWS compact signing inputs
//! `BASE64URL(header).BASE64URL(payload)` whose header says `alg: ES256` and the rules'
//! `typ`, and whose payload names the rules' `iss` and a lifetime of at most
//! `max_ttl_seconds`. Every fragment node records the rules it received when the key was
//! created and checks them itself on every signature (`quorate-node`'s `rules::check`),
//! so a compromised coordinator cannot mint long-lived or foreign tokens with the key.
//!
//! The type lives here, beside the wire messages it converts from, because the
//! coordinator (which stores rules with the key's public data) and the node (which
//! enforces them) both need it and neither may depend on the other (DESIGN.md §2).

use crate::convert::ConvertError;
use crate::{api, fragment};

/// The longest token lifetime a key may allow: 24 hours.
pub const MAX_TTL_LIMIT_SECONDS: u32 = 86_400;

/// Clock skew tolerated between the issuer and the nodes, in seconds.
pub const CLOCK_SKEW_SECONDS: i64 = 60;

/// The longest JWS signing input a node accepts, in bytes.
pub const MAX_SIGNING_INPUT: usize = 8 * 1024;

/// The prefix of every sign refusal that a node gives because of a key's token rules.
/// The coordinator treats such a refusal as final: another presignature would be
/// refused for the same reason.
pub const REFUSAL_PREFIX: &str = "token rules: ";

/// Longest issuer, in bytes.
const MAX_ISSUER: usize = 1024;
/// Longest `typ`, in bytes.
const MAX_TYP: usize = 128;
/// Version of the byte encoding.
const ENCODING_V1: u8 = 1;

/// Validated token rules: `0 < max_ttl_seconds <= 24 h`, a non-empty issuer and a
/// non-empty `typ`, without control characters. Construct with [`TokenRules::new`] or
/// from a wire message; decode stored rules with [`TokenRules::from_bytes`].
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct TokenRules {
    max_ttl_seconds: u32,
    issuer: String,
    typ: String,
}

fn err(msg: impl Into<String>) -> ConvertError {
    ConvertError(msg.into())
}

fn check_text(field: &str, value: &str, max: usize) -> Result<(), ConvertError> {
    if value.is_empty() {
        return Err(err(format!("token rules: {field} must not be empty")));
    }
    if value.len() > max {
        return Err(err(format!(
            "token rules: {field} is {} bytes; at most {max} are allowed",
            value.len()
        )));
    }
    if value.chars().any(char::is_control) {
        return Err(err(format!(
            "token rules: {field} must not contain control characters"
        )));
    }
    Ok(())
}

impl TokenRules {
    /// Validated rules.
    pub fn new(
        max_ttl_seconds: u32,
        issuer: impl Into<String>,
        typ: impl Into<String>,
    ) -> Result<Self, ConvertError> {
        let (issuer, typ) = (issuer.into(), typ.into());
        if max_ttl_seconds == 0 || max_ttl_seconds > MAX_TTL_LIMIT_SECONDS {
            return Err(err(format!(
                "token rules: max_ttl_seconds must be between 1 and {MAX_TTL_LIMIT_SECONDS} (24 h), got {max_ttl_seconds}"
            )));
        }
        check_text("issuer", &issuer, MAX_ISSUER)?;
        check_text("typ", &typ, MAX_TYP)?;
        Ok(TokenRules {
            max_ttl_seconds,
            issuer,
            typ,
        })
    }

    /// The longest token lifetime (`exp - iat`), in seconds.
    pub fn max_ttl_seconds(&self) -> u32 {
        self.max_ttl_seconds
    }

    /// The required `iss` claim.
    pub fn issuer(&self) -> &str {
        &self.issuer
    }

    /// The required `typ` header.
    pub fn typ(&self) -> &str {
        &self.typ
    }

    /// The fragment-node wire message.
    pub fn to_fragment(&self) -> fragment::TokenRules {
        fragment::TokenRules {
            max_ttl_seconds: self.max_ttl_seconds,
            issuer: self.issuer.clone(),
            typ: self.typ.clone(),
        }
    }

    /// The public-API wire message.
    pub fn to_api(&self) -> api::TokenRules {
        api::TokenRules {
            max_ttl_seconds: self.max_ttl_seconds,
            issuer: self.issuer.clone(),
            typ: self.typ.clone(),
        }
    }

    /// Versioned encoding for stores: `1 || ttl (u32 BE) || len (u16 BE) || issuer ||
    /// len (u16 BE) || typ`.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(9 + self.issuer.len() + self.typ.len());
        out.push(ENCODING_V1);
        out.extend_from_slice(&self.max_ttl_seconds.to_be_bytes());
        for s in [&self.issuer, &self.typ] {
            // Lengths fit: `new` bounds both strings well below u16::MAX.
            out.extend_from_slice(&u16::try_from(s.len()).unwrap_or(u16::MAX).to_be_bytes());
            out.extend_from_slice(s.as_bytes());
        }
        out
    }

    /// Decodes [`TokenRules::to_bytes`], validating again (parse, don't validate).
    pub fn from_bytes(b: &[u8]) -> Result<Self, ConvertError> {
        let truncated = || err("token rules record is truncated");
        let (&version, rest) = b.split_first().ok_or_else(truncated)?;
        if version != ENCODING_V1 {
            return Err(err(format!(
                "token rules record has encoding version {version}; this build reads version {ENCODING_V1}"
            )));
        }
        let (ttl, mut rest) = rest.split_first_chunk::<4>().ok_or_else(truncated)?;
        let mut text = || -> Result<String, ConvertError> {
            let (len, tail) = rest.split_first_chunk::<2>().ok_or_else(truncated)?;
            let len = usize::from(u16::from_be_bytes(*len));
            let (s, tail) = tail.split_at_checked(len).ok_or_else(truncated)?;
            rest = tail;
            String::from_utf8(s.to_vec()).map_err(|_| err("token rules record is not UTF-8"))
        };
        let issuer = text()?;
        let typ = text()?;
        if !rest.is_empty() {
            return Err(err("token rules record has trailing bytes"));
        }
        TokenRules::new(u32::from_be_bytes(*ttl), issuer, typ)
    }
}

impl TryFrom<&fragment::TokenRules> for TokenRules {
    type Error = ConvertError;

    fn try_from(r: &fragment::TokenRules) -> Result<Self, ConvertError> {
        TokenRules::new(r.max_ttl_seconds, r.issuer.clone(), r.typ.clone())
    }
}

impl TryFrom<&api::TokenRules> for TokenRules {
    type Error = ConvertError;

    fn try_from(r: &api::TokenRules) -> Result<Self, ConvertError> {
        TokenRules::new(r.max_ttl_seconds, r.issuer.clone(), r.typ.clone())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    #[test]
    fn validation_names_the_field() {
        for (ttl, iss, typ, words) in [
            (0, "https://i", "at+jwt", "max_ttl_seconds"),
            (86_401, "https://i", "at+jwt", "max_ttl_seconds"),
            (900, "", "at+jwt", "issuer"),
            (900, "https://i", "", "typ"),
            (900, "https://i\n", "at+jwt", "control"),
        ] {
            let e = TokenRules::new(ttl, iss, typ).unwrap_err();
            assert!(e.0.contains(words), "{e} does not mention {words}");
        }
        assert!(TokenRules::new(86_400, "https://i", "at+jwt").is_ok());
    }

    #[test]
    fn encoding_round_trips_and_is_strict() {
        let r = TokenRules::new(900, "https://issuer.test", "at+jwt").unwrap();
        let b = r.to_bytes();
        assert_eq!(TokenRules::from_bytes(&b).unwrap(), r);
        let mut trailing = b.clone();
        trailing.push(0);
        assert!(TokenRules::from_bytes(&trailing).is_err());
        assert!(TokenRules::from_bytes(&b[..b.len() - 1]).is_err());
        let mut v2 = b.clone();
        v2[0] = 2;
        assert!(
            TokenRules::from_bytes(&v2)
                .unwrap_err()
                .0
                .contains("version")
        );
        // A record with invalid rules does not decode.
        let mut zero = b;
        zero[1..5].copy_from_slice(&0u32.to_be_bytes());
        assert!(TokenRules::from_bytes(&zero).is_err());
    }

    #[test]
    fn wire_conversions_agree() {
        let r = TokenRules::new(900, "https://issuer.test", "at+jwt").unwrap();
        assert_eq!(TokenRules::try_from(&r.to_fragment()).unwrap(), r);
        assert_eq!(TokenRules::try_from(&r.to_api()).unwrap(), r);
        assert!(TokenRules::try_from(&fragment::TokenRules::default()).is_err());
    }
}
