//! RFC 9449 DPoP (Demonstrating Proof of Possession), shared by the three parties that
//! speak it:
//! - a **client** holds a [`DpopKey`] and makes a proof per request ([`DpopKey::proof`]);
//! - the **coordinator** verifies the proof sent with a token request and binds the token
//!   it issues to the proof's key: `"cnf": {"jkt": <thumbprint>}` (RFC 9449 §6.1);
//! - a **resource server** verifies the proof sent with a DPoP-bound token ([`verify`]
//!   with `access_token` set, so `ath` binds proof and token), compares the proof's key
//!   with the token's `cnf.jkt`, and refuses a proof it has seen before
//!   ([`ReplayCache`]).
//!
//! Only ES256 (P-256) proof keys are made or accepted: the one algorithm Quorate tokens
//! use, and nothing to negotiate.
//!
//! # What [`verify`] checks (RFC 9449 §4.3)
//!
//! 1. one compact JWS (three base64url parts), at most [`MAX_PROOF_LEN`] bytes;
//! 2. header `typ` `dpop+jwt`; `alg` ES256 (`none`, HMAC and every other algorithm are
//!    refused before any key is touched); no `crit`;
//! 3. header `jwk`: an EC P-256 public key, no private member `d`;
//! 4. the signature verifies under that `jwk`;
//! 5. claims: `jti` of 1–256 characters; `htm` equal to the request method; `htu` equal to
//!    the request URI without query and fragment, after syntax- and scheme-based
//!    normalisation (RFC 3986 §6.2.2–6.2.3: case of scheme and host, default port, empty
//!    path, case of percent-encodings); `iat` at most `max_age_seconds` old and at most
//!    [`FUTURE_SKEW_SECONDS`] ahead;
//! 6. with an access token: `ath` equal to base64url(SHA-256(token)).
//!
//! Replay (the `jti` seen before) is the caller's check, with a [`ReplayCache`], after
//! everything else passed. Error messages name the check that failed; they are static
//! text, never parts of the proof, so a server may send them back in a header.
//!
//! # Secrets
//!
//! A [`DpopKey`]'s private key lives in a `jsonwebtoken::EncodingKey` (wiped on drop);
//! rcgen's copy made at generation is wiped at once. Its `Debug` shows the thumbprint
//! only, and it is not `Clone`.

use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::sync::{Mutex, PoisonError};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use rcgen::{KeyPair, PKCS_ECDSA_P256_SHA256};
use serde_json::{Map, Value, json};
use sha2::{Digest as _, Sha256};
use zeroize::Zeroize as _;

/// The JOSE `typ` of a DPoP proof (RFC 9449 §4.2).
pub const TYP: &str = "dpop+jwt";

/// The only proof algorithm made and accepted.
pub const ALG: &str = "ES256";

/// How far in the future a proof's `iat` may be (clock skew), in seconds.
pub const FUTURE_SKEW_SECONDS: i64 = 5;

/// A reasonable `max_age_seconds` for [`Expect`]: proofs are made just before the request.
pub const DEFAULT_MAX_AGE_SECONDS: i64 = 60;

/// Longest proof accepted, in bytes. An ES256 proof with a P-256 `jwk` is about 600
/// bytes; the bound keeps parsing cheap for junk.
pub const MAX_PROOF_LEN: usize = 8 * 1024;

/// Longest `jti` accepted, in characters.
pub const MAX_JTI_LEN: usize = 256;

/// Bytes of randomness in a proof's `jti` (128 bits).
const JTI_BYTES: usize = 16;

/// Length of a P-256 coordinate, in bytes.
const COORDINATE_LEN: usize = 32;

/// Why a DPoP operation failed. Messages are static text naming the problem — never
/// contents of the proof — so they can be returned to the client as they are.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DpopError {
    /// Not one compact JWS with a JSON header and claims (peer's fault).
    #[error("malformed DPoP proof: {0}")]
    Malformed(&'static str),
    /// The JOSE header is unacceptable: `typ`, `alg`, `jwk` or `crit` (peer's fault).
    #[error("DPoP proof header: {0}")]
    Header(&'static str),
    /// The signature does not verify under the header's `jwk` (peer's fault).
    #[error("DPoP proof signature does not verify with the header jwk")]
    BadSignature,
    /// A claim is missing, malformed or does not match the request (peer's fault).
    #[error("DPoP proof claim {claim}: {reason}")]
    Claim {
        /// The claim: `jti`, `htm`, `htu`, `iat` or `ath`.
        claim: &'static str,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A key that is not an EC P-256 public key was given to [`thumbprint`].
    #[error("unsupported DPoP key: {0}")]
    UnsupportedKey(&'static str),
    /// Generating a key, drawing randomness or signing failed: a problem on this side,
    /// not the peer's. The message names the failing step, never key material.
    #[error("DPoP key operation failed: {0}")]
    Crypto(String),
}

// ---------------------------------------------------------------------------------------
// Keys and proofs (client side)
// ---------------------------------------------------------------------------------------

/// A DPoP key pair: a fresh P-256 key that signs proofs with ES256.
///
/// Not `Clone` (one copy of the private key); `Debug` shows the thumbprint only.
pub struct DpopKey {
    /// The private key (PKCS#8); `EncodingKey` is `ZeroizeOnDrop`.
    signing: EncodingKey,
    /// The public key as the header `jwk` carries it.
    jwk: Jwk,
    /// base64url x and y coordinates.
    x: String,
    y: String,
    /// RFC 7638 SHA-256 thumbprint of the public key.
    thumbprint: String,
}

impl fmt::Debug for DpopKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DpopKey")
            .field("thumbprint", &self.thumbprint)
            .field("private_key", &"<redacted>")
            .finish()
    }
}

impl DpopKey {
    /// Generates a fresh P-256 key pair.
    pub fn generate() -> Result<Self, DpopError> {
        let pair = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)
            .map_err(|e| DpopError::Crypto(format!("P-256 key generation: {e}")))?;
        Self::from_pair(pair)
    }

    /// Loads a P-256 private key from PKCS#8 PEM (`-----BEGIN PRIVATE KEY-----`, as
    /// `openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256` or
    /// `quorate dpop keygen` write it).
    ///
    /// Errors: [`DpopError::UnsupportedKey`] for anything else (another curve or key
    /// type, a SEC1 `EC PRIVATE KEY` block, text that is not PEM); the message never
    /// quotes the input.
    pub fn from_pkcs8_pem(pem: &str) -> Result<Self, DpopError> {
        let pair = KeyPair::from_pem(pem).map_err(|_| {
            DpopError::UnsupportedKey("not a PKCS#8 PEM private key (BEGIN PRIVATE KEY)")
        })?;
        if pair.algorithm() != &PKCS_ECDSA_P256_SHA256 {
            return Err(DpopError::UnsupportedKey(
                "a DPoP key must be an EC P-256 key (ES256)",
            ));
        }
        Self::from_pair(pair)
    }

    /// Takes a P-256 key pair apart into the signing key and its public JWK, wiping
    /// the pair's own copy of the private key.
    fn from_pair(mut pair: KeyPair) -> Result<Self, DpopError> {
        let signing = EncodingKey::from_ec_der(pair.serialized_der());
        // The uncompressed SEC1 point: 0x04 || x || y.
        let point = pair.public_key_raw();
        let coordinates = point
            .strip_prefix(&[0x04])
            .filter(|xy| xy.len() == 2 * COORDINATE_LEN)
            .map(|xy| xy.split_at(COORDINATE_LEN));
        let parsed =
            coordinates.map(|(x, y)| (URL_SAFE_NO_PAD.encode(x), URL_SAFE_NO_PAD.encode(y)));
        // rcgen's PKCS#8 copy is no longer needed; the EncodingKey holds (and wipes) its own.
        pair.zeroize();
        let (x, y) = parsed.ok_or_else(|| {
            DpopError::Crypto("the public key is not an uncompressed P-256 point".into())
        })?;
        let jwk: Jwk = serde_json::from_value(public_jwk(&x, &y))
            .map_err(|e| DpopError::Crypto(format!("building the public JWK: {e}")))?;
        let thumbprint = canonical_thumbprint(&x, &y);
        Ok(Self {
            signing,
            jwk,
            x,
            y,
            thumbprint,
        })
    }

    /// The public key as a JWK: `{"kty":"EC","crv":"P-256","x":…,"y":…}`.
    pub fn jwk(&self) -> Value {
        public_jwk(&self.x, &self.y)
    }

    /// The RFC 7638 SHA-256 thumbprint of the public key (base64url, no padding): the
    /// `cnf.jkt` of tokens bound to this key.
    pub fn thumbprint(&self) -> String {
        self.thumbprint.clone()
    }

    /// A proof for a request with method `htm` to `htu` (the URI without query and
    /// fragment), issued now. With `access_token`, the proof carries its hash (`ath`), as
    /// requests to a resource server must; without, for a token request.
    pub fn proof(
        &self,
        htm: &str,
        htu: &str,
        access_token: Option<&str>,
    ) -> Result<String, DpopError> {
        self.proof_at(htm, htu, access_token, now())
    }

    /// [`DpopKey::proof`] with an explicit `iat` (unix seconds): for a client that
    /// corrects for a known clock offset, and for tests.
    pub fn proof_at(
        &self,
        htm: &str,
        htu: &str,
        access_token: Option<&str>,
        iat: i64,
    ) -> Result<String, DpopError> {
        let mut header = Header::new(Algorithm::ES256);
        header.typ = Some(TYP.to_owned());
        header.jwk = Some(self.jwk.clone());
        let mut claims = json!({
            "jti": random_jti()?,
            "htm": htm,
            "htu": htu,
            "iat": iat,
        });
        if let (Some(token), Some(map)) = (access_token, claims.as_object_mut()) {
            map.insert("ath".to_owned(), Value::String(ath(token)));
        }
        jsonwebtoken::encode(&header, &claims, &self.signing)
            .map_err(|e| DpopError::Crypto(format!("signing the proof: {e}")))
    }
}

/// `{"kty":"EC","crv":"P-256","x":…,"y":…}`.
fn public_jwk(x: &str, y: &str) -> Value {
    json!({"kty": "EC", "crv": "P-256", "x": x, "y": y})
}

/// A `jti` of [`JTI_BYTES`] random bytes from the process's crypto provider.
fn random_jti() -> Result<String, DpopError> {
    let mut bytes = [0u8; JTI_BYTES];
    crate::tls::provider()
        .secure_random
        .fill(&mut bytes)
        .map_err(|_| DpopError::Crypto("the system random generator failed".into()))?;
    Ok(URL_SAFE_NO_PAD.encode(bytes))
}

/// `ath`: base64url(SHA-256(access token)) (RFC 9449 §4.2).
pub fn ath(access_token: &str) -> String {
    URL_SAFE_NO_PAD.encode(Sha256::digest(access_token.as_bytes()))
}

/// The current time, unix seconds.
fn now() -> i64 {
    i64::try_from(jsonwebtoken::get_current_timestamp()).unwrap_or(i64::MAX)
}

// ---------------------------------------------------------------------------------------
// Thumbprints (RFC 7638)
// ---------------------------------------------------------------------------------------

/// The RFC 7638 SHA-256 thumbprint (base64url, no padding) of an EC P-256 public JWK:
/// SHA-256 over `{"crv":"P-256","kty":"EC","x":"…","y":"…"}`. Other keys are refused.
pub fn thumbprint(jwk: &Jwk) -> Result<String, DpopError> {
    let AlgorithmParameters::EllipticCurve(ec) = &jwk.algorithm else {
        return Err(DpopError::UnsupportedKey(
            "only EC P-256 keys are supported (kty EC, crv P-256)",
        ));
    };
    if ec.curve != EllipticCurve::P256 {
        return Err(DpopError::UnsupportedKey(
            "only the P-256 curve is supported (crv P-256)",
        ));
    }
    if !is_coordinate(&ec.x) || !is_coordinate(&ec.y) {
        return Err(DpopError::UnsupportedKey(
            "x and y must be 32-byte base64url coordinates",
        ));
    }
    Ok(canonical_thumbprint(&ec.x, &ec.y))
}

/// SHA-256 over the RFC 7638 §3.2 canonical JSON of a P-256 key. `x` and `y` are
/// base64url (checked by the callers), so they need no JSON escaping.
fn canonical_thumbprint(x: &str, y: &str) -> String {
    let canonical = format!(r#"{{"crv":"P-256","kty":"EC","x":"{x}","y":"{y}"}}"#);
    URL_SAFE_NO_PAD.encode(Sha256::digest(canonical.as_bytes()))
}

/// Whether `s` is unpadded base64url of exactly one P-256 coordinate.
fn is_coordinate(s: &str) -> bool {
    URL_SAFE_NO_PAD
        .decode(s)
        .is_ok_and(|b| b.len() == COORDINATE_LEN)
}

// ---------------------------------------------------------------------------------------
// Verification (server side)
// ---------------------------------------------------------------------------------------

/// What the request a proof comes with looks like.
#[derive(Debug, Clone, Copy)]
pub struct Expect<'a> {
    /// The request's HTTP method, e.g. `POST` (compared exactly).
    pub htm: &'a str,
    /// The request's URI as the client addressed it (query and fragment are ignored).
    pub htu: &'a str,
    /// The current time, unix seconds.
    pub now: i64,
    /// How old a proof's `iat` may be, in seconds.
    pub max_age_seconds: i64,
    /// The access token the request carries: `ath` is then required and must match.
    pub access_token: Option<&'a str>,
}

/// A verified proof.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Proof {
    /// The RFC 7638 thumbprint of the proof's key (compare with a token's `cnf.jkt`).
    pub jkt: String,
    /// The proof's `jti` (for the replay check).
    pub jti: String,
    /// The proof's `iat`, unix seconds.
    pub iat: i64,
}

impl Proof {
    /// Until when a [`ReplayCache`] must remember this proof: as long as [`verify`] with
    /// `max_age_seconds` would still accept it.
    pub fn expires_at(&self, max_age_seconds: i64) -> i64 {
        self.iat.saturating_add(max_age_seconds)
    }
}

/// Verifies `proof` (the value of one `DPoP` header) for the request `expect` describes;
/// see the module documentation for the checks. The replay check is the caller's.
pub fn verify(proof: &str, expect: &Expect<'_>) -> Result<Proof, DpopError> {
    if proof.len() > MAX_PROOF_LEN {
        return Err(DpopError::Malformed("longer than 8 KiB"));
    }
    let mut parts = proof.split('.');
    let (Some(header_b64), Some(_), Some(_), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(DpopError::Malformed(
            "not exactly one compact JWT (three base64url parts separated by dots)",
        ));
    };
    let header = decode_object(header_b64).ok_or(DpopError::Malformed(
        "the header is not a base64url JSON object",
    ))?;
    let jwk = check_header(&header)?;

    // The jwk was checked to be an EC P-256 public key; a point not on the curve fails
    // here or in the signature check.
    let key = DecodingKey::from_jwk(&jwk)
        .map_err(|_| DpopError::Header("jwk is not a valid P-256 public key"))?;
    let mut validation = Validation::new(Algorithm::ES256);
    validation.set_required_spec_claims::<&str>(&[]);
    validation.validate_exp = false;
    validation.validate_nbf = false;
    validation.validate_aud = false;
    let claims = jsonwebtoken::decode::<Map<String, Value>>(proof, &key, &validation)
        .map_err(|e| {
            use jsonwebtoken::errors::ErrorKind as K;
            match e.kind() {
                K::InvalidSignature | K::InvalidEcdsaKey | K::InvalidKeyFormat => {
                    DpopError::BadSignature
                }
                K::InvalidAlgorithm | K::UnsupportedAlgorithm => {
                    DpopError::Header("alg must be ES256")
                }
                _ => DpopError::Malformed("the header or claims do not parse as a JWT"),
            }
        })?
        .claims;
    let (jti, iat) = check_claims(&claims, expect)?;
    Ok(Proof {
        jkt: thumbprint(&jwk).map_err(|_| DpopError::Header("jwk must be an EC P-256 key"))?,
        jti,
        iat,
    })
}

/// base64url (no padding) → JSON object.
fn decode_object(b64: &str) -> Option<Map<String, Value>> {
    let bytes = URL_SAFE_NO_PAD.decode(b64).ok()?;
    match serde_json::from_slice(&bytes).ok()? {
        Value::Object(map) => Some(map),
        _ => None,
    }
}

/// Header checks (RFC 9449 §4.3 steps 4–7); returns the public key.
fn check_header(header: &Map<String, Value>) -> Result<Jwk, DpopError> {
    let typ = header.get("typ").and_then(Value::as_str);
    if !typ.is_some_and(is_dpop_typ) {
        return Err(DpopError::Header("typ must be dpop+jwt"));
    }
    match header.get("alg").and_then(Value::as_str) {
        Some(ALG) => {}
        Some(a) if a.eq_ignore_ascii_case("none") => {
            return Err(DpopError::Header(
                "alg none is not allowed: the proof must be signed (ES256)",
            ));
        }
        Some(a) if a.starts_with("HS") => {
            return Err(DpopError::Header(
                "symmetric (HMAC) algorithms are not allowed: alg must be ES256",
            ));
        }
        Some(_) => return Err(DpopError::Header("alg must be ES256")),
        None => return Err(DpopError::Header("alg is missing")),
    }
    // No extension is understood, so none may be critical (RFC 7515 §4.1.11).
    if header.contains_key("crit") {
        return Err(DpopError::Header("crit is not supported"));
    }
    let Some(jwk) = header.get("jwk") else {
        return Err(DpopError::Header("jwk is missing"));
    };
    let Some(members) = jwk.as_object() else {
        return Err(DpopError::Header("jwk is not a JSON object"));
    };
    if members.contains_key("d") {
        return Err(DpopError::Header(
            "jwk contains a private key (d): it must be the public key only",
        ));
    }
    let kty = members.get("kty").and_then(Value::as_str);
    let crv = members.get("crv").and_then(Value::as_str);
    if kty != Some("EC") || crv != Some("P-256") {
        return Err(DpopError::Header(
            "jwk must be an EC P-256 key (kty EC, crv P-256)",
        ));
    }
    let coordinate = |name| members.get(name).and_then(Value::as_str);
    if !coordinate("x").is_some_and(is_coordinate) || !coordinate("y").is_some_and(is_coordinate) {
        return Err(DpopError::Header(
            "jwk x and y must be 32-byte base64url coordinates",
        ));
    }
    serde_json::from_value(jwk.clone())
        .map_err(|_| DpopError::Header("jwk is not a valid JSON Web Key"))
}

/// `dpop+jwt` or `application/dpop+jwt`, case-insensitively (RFC 7515 §4.1.9).
fn is_dpop_typ(typ: &str) -> bool {
    const PREFIX: &str = "application/";
    let typ = typ
        .get(..PREFIX.len())
        .filter(|p| p.eq_ignore_ascii_case(PREFIX))
        .and_then(|_| typ.get(PREFIX.len()..))
        .unwrap_or(typ);
    typ.eq_ignore_ascii_case(TYP)
}

/// Claim checks (RFC 9449 §4.3 steps 8–12, the replay check aside); returns `jti`, `iat`.
fn check_claims(
    claims: &Map<String, Value>,
    expect: &Expect<'_>,
) -> Result<(String, i64), DpopError> {
    let claim = |name| claims.get(name);
    let bad = |claim, reason| DpopError::Claim { claim, reason };

    let jti = claim("jti")
        .ok_or(bad("jti", "missing"))?
        .as_str()
        .ok_or(bad("jti", "must be a string"))?;
    let jti_len = jti.chars().count();
    if jti_len == 0 || jti_len > MAX_JTI_LEN {
        return Err(bad("jti", "must be 1 to 256 characters"));
    }

    let htm = claim("htm")
        .ok_or(bad("htm", "missing"))?
        .as_str()
        .ok_or(bad("htm", "must be a string"))?;
    if htm != expect.htm {
        return Err(bad("htm", "does not match the request method"));
    }

    let htu = claim("htu")
        .ok_or(bad("htu", "missing"))?
        .as_str()
        .ok_or(bad("htu", "must be a string"))?;
    let htu = normalize_htu(htu).ok_or(bad("htu", "is not an absolute http(s) URI"))?;
    if normalize_htu(expect.htu).is_none_or(|expected| expected != htu) {
        return Err(bad("htu", "does not match the request URI"));
    }

    let iat = claim("iat").ok_or(bad("iat", "missing"))?;
    let iat = iat
        .as_i64()
        .or_else(|| {
            iat.as_f64()
                .filter(|f| f.is_finite())
                .map(|f| f.floor() as i64)
        })
        .ok_or(bad("iat", "must be a NumericDate (unix seconds)"))?;
    if iat > expect.now.saturating_add(FUTURE_SKEW_SECONDS) {
        return Err(bad("iat", "is in the future (check the client clock)"));
    }
    if expect.now.saturating_sub(iat) > expect.max_age_seconds {
        return Err(bad(
            "iat",
            "is too old: the proof expired (make a fresh proof per request)",
        ));
    }

    if let Some(token) = expect.access_token {
        let ath_claim = claim("ath")
            .ok_or(bad(
                "ath",
                "missing: a proof sent with an access token must hash it",
            ))?
            .as_str()
            .ok_or(bad("ath", "must be a string"))?;
        if ath_claim != ath(token) {
            return Err(bad("ath", "does not match the access token"));
        }
    }
    Ok((jti.to_owned(), iat))
}

/// `scheme://host[:port]/path` of an absolute http(s) URI, normalised for comparison: the
/// query and fragment dropped (RFC 9449 §4.3), scheme and host lowercased, a default port
/// dropped, an empty path made `/`, percent-encodings uppercased (RFC 3986 §6.2.2.1,
/// §6.2.3). Dot segments are not removed: a client sends the path it requested. `None`
/// for anything else (relative, other schemes, userinfo, bad port, whitespace).
fn normalize_htu(uri: &str) -> Option<String> {
    if uri
        .bytes()
        .any(|b| b.is_ascii_whitespace() || b.is_ascii_control())
    {
        return None;
    }
    let (scheme, rest) = uri.split_once("://")?;
    let scheme = scheme.to_ascii_lowercase();
    let default_port = match scheme.as_str() {
        "http" => 80,
        "https" => 443,
        _ => return None,
    };
    // `split` yields at least one item; the fallback is never taken.
    let rest = rest.split(['?', '#']).next().unwrap_or_default();
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    if authority.contains('@') {
        return None;
    }
    let (host, port) = match authority.strip_prefix('[') {
        // An IPv6 literal: `[…]` then an optional `:port`.
        Some(v6) => {
            let (literal, after) = v6.split_once(']')?;
            let port = match after {
                "" => None,
                p => Some(p.strip_prefix(':')?),
            };
            (format!("[{}]", literal.to_ascii_lowercase()), port)
        }
        None => match authority.rsplit_once(':') {
            Some((h, p)) => (h.to_ascii_lowercase(), Some(p)),
            None => (authority.to_ascii_lowercase(), None),
        },
    };
    if host.is_empty() || host == "[]" {
        return None;
    }
    // An empty port is the default one (RFC 3986 §6.2.3).
    let port = match port.filter(|p| !p.is_empty()) {
        None => None,
        Some(p) if p.bytes().all(|b| b.is_ascii_digit()) => {
            let p: u16 = p.parse().ok()?;
            (p != default_port).then_some(p)
        }
        Some(_) => return None,
    };
    let mut normalized = format!("{scheme}://{host}");
    if let Some(p) = port {
        normalized.push(':');
        normalized.push_str(&p.to_string());
    }
    if path.is_empty() {
        normalized.push('/');
    }
    // Uppercase the two characters after each `%`.
    let mut upper = 0u8;
    for c in path.chars() {
        if upper > 0 {
            normalized.push(c.to_ascii_uppercase());
            upper -= 1;
        } else {
            if c == '%' {
                upper = 2;
            }
            normalized.push(c);
        }
    }
    Some(normalized)
}

// ---------------------------------------------------------------------------------------
// Replay
// ---------------------------------------------------------------------------------------

/// Default bound of a [`ReplayCache`].
pub const DEFAULT_REPLAY_CAPACITY: usize = 100_000;

/// Remembers the proofs seen (by key thumbprint and `jti`) for as long as they would
/// verify, so each is accepted once (RFC 9449 §11.1).
///
/// Bounded: every insert first forgets the entries that expired. If the cache is still
/// full, new proofs are **refused** (as if replayed, with a warning in the log) rather
/// than forgetting a live entry, which would let that proof be replayed. At
/// [`DEFAULT_REPLAY_CAPACITY`] and a 60 s proof lifetime that is over 1,600 distinct
/// proofs per second; size it for the expected rate × lifetime.
#[derive(Debug)]
pub struct ReplayCache {
    capacity: usize,
    inner: Mutex<ReplayEntries>,
}

/// The entries, by key and by expiry (for purging in order).
#[derive(Debug, Default)]
struct ReplayEntries {
    /// (jkt, jti) → (expiry, owner: empty, or the request that used it).
    seen: HashMap<(String, String), (i64, String)>,
    /// (expiry, jkt, jti), oldest first.
    by_expiry: BTreeSet<(i64, String, String)>,
}

impl Default for ReplayCache {
    fn default() -> Self {
        Self::new(DEFAULT_REPLAY_CAPACITY)
    }
}

impl ReplayCache {
    /// A cache remembering at most `capacity` live proofs.
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity,
            inner: Mutex::new(ReplayEntries::default()),
        }
    }

    /// Records the proof (`jkt`, `jti`), remembered until `expires_at` (unix seconds, see
    /// [`Proof::expires_at`]). `true`: first use, accept it. `false`: refuse it — a
    /// replay, or the cache is full of live proofs.
    pub fn check_and_insert(&self, jkt: &str, jti: &str, expires_at: i64, now: i64) -> bool {
        self.check_and_insert_for(jkt, jti, "", expires_at, now)
    }

    /// [`Self::check_and_insert`] on behalf of a retry-safe request `owner` (empty: none):
    /// a `jti` first used by a non-empty `owner` is accepted again for that same owner
    /// only, so that a retried request is not refused as its own replay.
    pub fn check_and_insert_for(
        &self,
        jkt: &str,
        jti: &str,
        owner: &str,
        expires_at: i64,
        now: i64,
    ) -> bool {
        let mut entries = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        entries.purge(now);
        let key = (jkt.to_owned(), jti.to_owned());
        if let Some((_, first)) = entries.seen.get(&key) {
            return !owner.is_empty() && first == owner;
        }
        if expires_at <= now {
            // Already expired: it cannot verify again, nothing to remember.
            return true;
        }
        if entries.seen.len() >= self.capacity {
            tracing::warn!(
                capacity = self.capacity,
                "DPoP replay cache full of live proofs: refusing new proofs until some expire"
            );
            return false;
        }
        entries
            .by_expiry
            .insert((expires_at, key.0.clone(), key.1.clone()));
        entries.seen.insert(key, (expires_at, owner.to_owned()));
        true
    }

    /// How many proofs are remembered (expired ones included until the next insert).
    pub fn len(&self) -> usize {
        self.inner
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .seen
            .len()
    }

    /// Whether no proof is remembered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl ReplayEntries {
    /// Forgets the entries that expired at or before `now`.
    fn purge(&mut self, now: i64) {
        while let Some(first) = self.by_expiry.first() {
            if first.0 > now {
                break;
            }
            if let Some((_, jkt, jti)) = self.by_expiry.pop_first() {
                self.seen.remove(&(jkt, jti));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::panic,
        clippy::indexing_slicing
    )]

    use super::*;

    const HTU: &str = "https://rs.test/tools/echo";
    const TOKEN: &str = "header.payload.signature";

    fn expect<'a>(now: i64) -> Expect<'a> {
        Expect {
            htm: "POST",
            htu: HTU,
            now,
            max_age_seconds: 60,
            access_token: Some(TOKEN),
        }
    }

    /// The refusal of `proof` under `expect`, as text.
    fn refused(proof: &str, expect: &Expect<'_>) -> String {
        verify(proof, expect)
            .expect_err("the proof must be refused")
            .to_string()
    }

    /// A proof JWT with an arbitrary header and claims, signed by `key` as ES256.
    fn forge(key: &DpopKey, header: &Value, claims: &Value) -> String {
        let h = URL_SAFE_NO_PAD.encode(header.to_string());
        let c = URL_SAFE_NO_PAD.encode(claims.to_string());
        let input = format!("{h}.{c}");
        let sig =
            jsonwebtoken::crypto::sign(input.as_bytes(), &key.signing, Algorithm::ES256).unwrap();
        format!("{input}.{sig}")
    }

    fn good_header(key: &DpopKey) -> Value {
        json!({"typ": "dpop+jwt", "alg": "ES256", "jwk": key.jwk()})
    }

    fn good_claims(now: i64) -> Value {
        json!({"jti": "j-1", "htm": "POST", "htu": HTU, "iat": now, "ath": ath(TOKEN)})
    }

    #[test]
    fn keys_load_from_pkcs8_pem_and_others_are_refused() {
        let pair = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let pem = pair.serialize_pem();
        let a = DpopKey::from_pkcs8_pem(&pem).unwrap();
        let b = DpopKey::from_pkcs8_pem(&pem).unwrap();
        assert_eq!(a.thumbprint(), b.thumbprint(), "one key, one thumbprint");
        let proof = a.proof("POST", HTU, Some(TOKEN)).unwrap();
        assert_eq!(verify(&proof, &expect(now())).unwrap().jkt, b.thumbprint());

        let p384 = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
        let e = DpopKey::from_pkcs8_pem(&p384.serialize_pem()).unwrap_err();
        assert!(e.to_string().contains("P-256"), "{e}");
        let e = DpopKey::from_pkcs8_pem("not a key").unwrap_err();
        assert!(e.to_string().contains("PKCS#8"), "{e}");
        assert!(!format!("{a:?}").contains("PRIVATE"), "Debug shows no key");
    }

    #[test]
    fn fresh_proof_verifies() {
        let key = DpopKey::generate().unwrap();
        let proof = key.proof("POST", HTU, Some(TOKEN)).unwrap();
        let p = verify(&proof, &expect(now())).unwrap();
        assert_eq!(p.jkt, key.thumbprint());
        assert!(p.jti.len() >= 22, "{}", p.jti);
        assert!((now() - p.iat).abs() <= 1);
        assert_eq!(p.expires_at(60), p.iat + 60);

        // The header is what RFC 9449 §4.2 asks, with the public key only.
        let header = jsonwebtoken::decode_header(&proof).unwrap();
        assert_eq!(header.typ.as_deref(), Some("dpop+jwt"));
        assert_eq!(header.alg, Algorithm::ES256);
        let raw = decode_object(proof.split('.').next().unwrap()).unwrap();
        assert_eq!(raw["jwk"], key.jwk());
        // (serde_json's map order depends on a feature other crates may turn on.)
        let jwk = key.jwk();
        let mut members: Vec<&String> = jwk.as_object().unwrap().keys().collect();
        members.sort();
        assert_eq!(members, ["crv", "kty", "x", "y"]);

        // A proof without a token carries no ath, and verifies when none is expected.
        let token_request = key
            .proof("POST", "https://issuer.test/token", None)
            .unwrap();
        let claims: Value = serde_json::from_slice(
            &URL_SAFE_NO_PAD
                .decode(token_request.split('.').nth(1).unwrap())
                .unwrap(),
        )
        .unwrap();
        assert!(claims.get("ath").is_none(), "{claims}");
        let e = Expect {
            htu: "https://issuer.test/token",
            access_token: None,
            ..expect(now())
        };
        verify(&token_request, &e).unwrap();
        // An ath that is not asked for is fine.
        verify(
            &proof,
            &Expect {
                access_token: None,
                ..expect(now())
            },
        )
        .unwrap();

        // Every proof has a fresh jti.
        let again = key.proof("POST", HTU, Some(TOKEN)).unwrap();
        assert_ne!(verify(&again, &expect(now())).unwrap().jti, p.jti);
        // Debug hides the private key.
        let debug = format!("{key:?}");
        assert!(
            debug.contains("<redacted>") && debug.contains(&key.thumbprint()),
            "{debug}"
        );
    }

    #[test]
    fn request_mismatches_are_refused() {
        let key = DpopKey::generate().unwrap();
        let now = now();
        let proof = key.proof_at("POST", HTU, Some(TOKEN), now).unwrap();
        let cases: [(Expect<'_>, &str); 4] = [
            (
                Expect {
                    htm: "GET",
                    ..expect(now)
                },
                "claim htm: does not match",
            ),
            (
                Expect {
                    htu: "https://rs.test/tools/other",
                    ..expect(now)
                },
                "claim htu: does not match",
            ),
            (
                Expect {
                    htu: "https://other.test/tools/echo",
                    ..expect(now)
                },
                "claim htu: does not match",
            ),
            (
                Expect {
                    access_token: Some("another.access.token"),
                    ..expect(now)
                },
                "claim ath: does not match",
            ),
        ];
        for (e, want) in cases {
            let got = refused(&proof, &e);
            assert!(got.contains(want), "{got} (want {want})");
        }
        // ath required with a token.
        let no_ath = key.proof_at("POST", HTU, None, now).unwrap();
        assert!(refused(&no_ath, &expect(now)).contains("claim ath: missing"));
    }

    #[test]
    fn iat_window() {
        let key = DpopKey::generate().unwrap();
        let now = now();
        let at = |iat| key.proof_at("POST", HTU, Some(TOKEN), iat).unwrap();
        verify(&at(now - 60), &expect(now)).unwrap();
        verify(&at(now + 5), &expect(now)).unwrap();
        let old = refused(&at(now - 61), &expect(now));
        assert!(
            old.contains("claim iat") && old.contains("too old"),
            "{old}"
        );
        let future = refused(&at(now + 6), &expect(now));
        assert!(
            future.contains("claim iat") && future.contains("future"),
            "{future}"
        );
    }

    #[test]
    fn htu_normalisation() {
        let key = DpopKey::generate().unwrap();
        let now = now();
        for htu in [
            "https://rs.test/tools/echo",
            "HTTPS://RS.test/tools/echo",
            "https://rs.test:443/tools/echo",
            "https://rs.test/tools/echo?x=1",
            "https://rs.test/tools/echo#frag",
            "https://rs.test:/tools/echo",
        ] {
            let p = key.proof_at("POST", htu, Some(TOKEN), now).unwrap();
            verify(&p, &expect(now)).unwrap_or_else(|e| panic!("{htu}: {e}"));
        }
        for htu in [
            "http://rs.test/tools/echo",
            "https://rs.test:8443/tools/echo",
            "https://rs.test/Tools/echo",
            "https://rs.test/tools/echo/",
            "https://user@rs.test/tools/echo",
            "/tools/echo",
            "ftp://rs.test/tools/echo",
        ] {
            let p = key.proof_at("POST", htu, Some(TOKEN), now).unwrap();
            let got = refused(&p, &expect(now));
            assert!(got.contains("claim htu"), "{htu}: {got}");
        }
        assert_eq!(
            normalize_htu("http://[::1]:80").as_deref(),
            Some("http://[::1]/")
        );
        assert_eq!(
            normalize_htu("http://127.0.0.1:8080/a%2fb?q").as_deref(),
            Some("http://127.0.0.1:8080/a%2Fb")
        );
        assert_eq!(normalize_htu("http://x:99999/"), None);
        assert_eq!(normalize_htu("http:///path"), None);
    }

    #[test]
    fn header_problems_are_named() {
        let key = DpopKey::generate().unwrap();
        let now = now();
        let claims = good_claims(now);
        // The forged proof is well-formed when the header is.
        verify(&forge(&key, &good_header(&key), &claims), &expect(now)).unwrap();

        let mut with_d = key.jwk();
        with_d["d"] = json!(URL_SAFE_NO_PAD.encode([7u8; 32]));
        let mut rsa = json!({"kty": "RSA", "n": "AQAB", "e": "AQAB"});
        let cases = [
            (
                json!({"typ": "JWT", "alg": "ES256", "jwk": key.jwk()}),
                "typ must be dpop+jwt",
            ),
            (
                json!({"alg": "ES256", "jwk": key.jwk()}),
                "typ must be dpop+jwt",
            ),
            (
                json!({"typ": "dpop+jwt", "alg": "none", "jwk": key.jwk()}),
                "alg none",
            ),
            (
                json!({"typ": "dpop+jwt", "alg": "HS256", "jwk": key.jwk()}),
                "HMAC",
            ),
            (
                json!({"typ": "dpop+jwt", "alg": "RS256", "jwk": key.jwk()}),
                "alg must be ES256",
            ),
            (
                json!({"typ": "dpop+jwt", "jwk": key.jwk()}),
                "alg is missing",
            ),
            (json!({"typ": "dpop+jwt", "alg": "ES256"}), "jwk is missing"),
            (
                json!({"typ": "dpop+jwt", "alg": "ES256", "jwk": with_d}),
                "private key (d)",
            ),
            (
                json!({"typ": "dpop+jwt", "alg": "ES256", "jwk": rsa.take()}),
                "EC P-256",
            ),
            (
                json!({"typ": "dpop+jwt", "alg": "ES256", "jwk": key.jwk(), "crit": ["x"]}),
                "crit",
            ),
        ];
        for (header, want) in cases {
            let got = refused(&forge(&key, &header, &claims), &expect(now));
            assert!(got.contains(want), "{header}: {got} (want {want})");
            assert!(got.starts_with("DPoP proof header"), "{got}");
        }
        // `application/dpop+jwt` is the same media type.
        let h = json!({"typ": "application/DPoP+JWT", "alg": "ES256", "jwk": key.jwk()});
        verify(&forge(&key, &h, &claims), &expect(now)).unwrap();
    }

    #[test]
    fn unsigned_and_hmac_proofs_are_refused() {
        let key = DpopKey::generate().unwrap();
        let now = now();
        let claims = URL_SAFE_NO_PAD.encode(good_claims(now).to_string());
        let none = format!(
            "{}.{claims}.",
            URL_SAFE_NO_PAD
                .encode(json!({"typ": "dpop+jwt", "alg": "none", "jwk": key.jwk()}).to_string())
        );
        assert!(refused(&none, &expect(now)).contains("alg none"));
        // HS256 keyed with the public x coordinate, as an algorithm-confusion attempt.
        let mut h = Header::new(Algorithm::HS256);
        h.typ = Some(TYP.into());
        h.jwk = Some(serde_json::from_value(key.jwk()).unwrap());
        let secret = EncodingKey::from_secret(key.x.as_bytes()).unwrap();
        let hs = jsonwebtoken::encode(&h, &good_claims(now), &secret).unwrap();
        assert!(refused(&hs, &expect(now)).contains("HMAC"));
    }

    #[test]
    fn signature_must_match_the_header_key() {
        let key = DpopKey::generate().unwrap();
        let other = DpopKey::generate().unwrap();
        let now = now();
        // Signed by `other`, claiming `key`'s public key.
        let p = forge(&other, &good_header(&key), &good_claims(now));
        assert_eq!(verify(&p, &expect(now)), Err(DpopError::BadSignature));

        // One changed claim after signing.
        let proof = key.proof_at("POST", HTU, Some(TOKEN), now).unwrap();
        let parts: Vec<&str> = proof.split('.').collect();
        let mut claims: Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[1]).unwrap()).unwrap();
        claims["htm"] = json!("GET");
        let tampered = format!(
            "{}.{}.{}",
            parts[0],
            URL_SAFE_NO_PAD.encode(claims.to_string()),
            parts[2]
        );
        assert_eq!(
            verify(
                &tampered,
                &Expect {
                    htm: "GET",
                    ..expect(now)
                }
            ),
            Err(DpopError::BadSignature)
        );
        // A point that is not on the curve.
        let mut off_curve = key.jwk();
        off_curve["y"] = off_curve["x"].clone();
        let h = json!({"typ": "dpop+jwt", "alg": "ES256", "jwk": off_curve});
        let got = verify(&forge(&key, &h, &good_claims(now)), &expect(now)).unwrap_err();
        assert!(
            matches!(got, DpopError::BadSignature | DpopError::Header(_)),
            "{got}"
        );
    }

    #[test]
    fn claim_and_shape_problems_are_named() {
        let key = DpopKey::generate().unwrap();
        let now = now();
        let h = good_header(&key);
        let with = |k: &str, v: Value| {
            let mut c = good_claims(now);
            if v.is_null() {
                c.as_object_mut().unwrap().remove(k);
            } else {
                c[k] = v;
            }
            forge(&key, &h, &c)
        };
        for (k, v, want) in [
            ("jti", Value::Null, "claim jti: missing"),
            ("jti", json!(""), "claim jti: must be 1 to 256"),
            ("jti", json!("x".repeat(257)), "claim jti: must be 1 to 256"),
            ("jti", json!(7), "claim jti: must be a string"),
            ("htm", Value::Null, "claim htm: missing"),
            ("htu", Value::Null, "claim htu: missing"),
            ("iat", Value::Null, "claim iat: missing"),
            ("iat", json!("now"), "claim iat: must be a NumericDate"),
            ("ath", json!(5), "claim ath: must be a string"),
        ] {
            let got = refused(&with(k, v), &expect(now));
            assert!(got.contains(want), "{k}: {got} (want {want})");
        }
        verify(&with("jti", json!("x".repeat(256))), &expect(now)).unwrap();
        verify(&with("iat", json!(now as f64 + 0.5)), &expect(now)).unwrap();

        let proof = key.proof("POST", HTU, Some(TOKEN)).unwrap();
        for junk in [
            String::new(),
            "abc".into(),
            "a.b".into(),
            format!("{proof}.{proof}"),
            format!("{proof} {proof}"),
            format!("{proof},{proof}"),
            "x".repeat(MAX_PROOF_LEN + 1),
        ] {
            let got = verify(&junk, &expect(now)).unwrap_err();
            assert!(
                matches!(got, DpopError::Malformed(_) | DpopError::BadSignature),
                "{got}"
            );
            // The message never repeats the proof.
            assert!(!got.to_string().contains(&proof), "{got}");
        }
    }

    #[test]
    fn thumbprint_is_rfc_7638() {
        let key = DpopKey::generate().unwrap();
        let jwk: Jwk = serde_json::from_value(key.jwk()).unwrap();
        let jkt = thumbprint(&jwk).unwrap();
        assert_eq!(jkt, key.thumbprint());
        // Deterministic, and independent of members outside the required set.
        let mut decorated = key.jwk();
        decorated["kid"] = json!("k");
        decorated["alg"] = json!("ES256");
        let decorated: Jwk = serde_json::from_value(decorated).unwrap();
        assert_eq!(thumbprint(&decorated).unwrap(), jkt);
        // By hand: SHA-256 over the canonical JSON (members sorted, no whitespace).
        let canonical = format!(
            r#"{{"crv":"P-256","kty":"EC","x":"{}","y":"{}"}}"#,
            key.jwk()["x"].as_str().unwrap(),
            key.jwk()["y"].as_str().unwrap()
        );
        let by_hand = URL_SAFE_NO_PAD.encode(Sha256::digest(canonical.as_bytes()));
        assert_eq!(jkt, by_hand);
        assert_eq!(jkt.len(), 43);
        // An independent implementation agrees (jsonwebtoken's).
        assert_eq!(
            jwk.thumbprint(jsonwebtoken::jwk::ThumbprintHash::SHA256)
                .unwrap(),
            jkt
        );
        // A known answer: the P-256 key of RFC 7515 Appendix A.3.
        let rfc: Jwk = serde_json::from_value(json!({
            "kty": "EC", "crv": "P-256",
            "x": "f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU",
            "y": "x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0",
        }))
        .unwrap();
        assert_eq!(
            thumbprint(&rfc).unwrap(),
            URL_SAFE_NO_PAD.encode(Sha256::digest(
                br#"{"crv":"P-256","kty":"EC","x":"f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU","y":"x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0"}"#
            ))
        );

        let rsa: Jwk =
            serde_json::from_value(json!({"kty": "RSA", "n": "AQAB", "e": "AQAB"})).unwrap();
        assert!(
            thumbprint(&rsa)
                .unwrap_err()
                .to_string()
                .contains("EC P-256")
        );
        let p384: Jwk = serde_json::from_value(json!({
            "kty": "EC", "crv": "P-384", "x": "AQAB", "y": "AQAB"
        }))
        .unwrap();
        assert!(thumbprint(&p384).unwrap_err().to_string().contains("P-256"));
    }

    #[test]
    fn replay_cache_refuses_a_second_use_and_forgets_after_expiry() {
        let cache = ReplayCache::new(2);
        let t = 1_000;
        assert!(cache.check_and_insert("k1", "a", t + 60, t));
        assert!(!cache.check_and_insert("k1", "a", t + 60, t + 1), "replay");
        // The same jti under another key is another proof.
        assert!(cache.check_and_insert("k2", "a", t + 30, t + 1));
        assert_eq!(cache.len(), 2);
        // Full of live proofs: refuse rather than forget one.
        assert!(!cache.check_and_insert("k1", "b", t + 60, t + 2));
        assert!(!cache.check_and_insert("k1", "a", t + 60, t + 2));
        // k2/a expired at t+30: purged on the next insert, which then fits.
        assert!(cache.check_and_insert("k1", "b", t + 90, t + 30));
        assert_eq!(cache.len(), 2);
        // After its expiry the first one is forgotten (it can no longer verify anyway).
        assert!(cache.check_and_insert("k1", "a", t + 120, t + 60));
        assert!(!cache.check_and_insert("k1", "a", t + 120, t + 61));
        // An already expired proof is not stored.
        assert!(cache.check_and_insert("k3", "z", t, t + 61));
        assert_eq!(cache.len(), 2);
        assert!(!cache.is_empty());
    }

    #[test]
    fn replay_cache_lets_a_retry_safe_request_reuse_only_its_own_jti() {
        let cache = ReplayCache::new(8);
        let t = 1_000;
        assert!(cache.check_and_insert_for("k4", "r", "req-1", t + 200, t));
        assert!(cache.check_and_insert_for("k4", "r", "req-1", t + 200, t + 1));
        assert!(!cache.check_and_insert_for("k4", "r", "req-2", t + 200, t + 1));
        assert!(!cache.check_and_insert("k4", "r", t + 200, t + 1));
        // A jti used without an owner is nobody's to reuse.
        assert!(cache.check_and_insert("k5", "s", t + 200, t + 1));
        assert!(!cache.check_and_insert_for("k5", "s", "", t + 200, t + 2));
    }
}
