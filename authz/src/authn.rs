//! Agent authentication (DESIGN.md §7, "Authenticate"): turn what an agent already holds —
//! an OIDC JWT from a trusted issuer, or an X.509-SVID client certificate — into an
//! [`Attestation`] naming the agent.
//!
//! # Trust configuration
//!
//! [`AuthnConfig::from_file`] reads the JSON file given with `--trust-config`:
//!
//! ```json
//! { "oidc": [ { "name": "dev", "issuer": "https://dev-issuer.quorate.local",
//!               "audiences": ["quorate"], "jwks_file": "jwks.json" },
//!             { "name": "github", "issuer": "https://token.actions.githubusercontent.com",
//!               "audiences": ["quorate"],
//!               "jwks_url": "https://token.actions.githubusercontent.com/.well-known/jwks",
//!               "algorithms": ["RS256"], "ca_file": "extra-root.pem", "refresh_seconds": 300 } ],
//!   "svid": [ { "trust_domain": "example.org", "bundle_file": "bundle.pem" } ] }
//! ```
//!
//! - `name`: `[a-z0-9-]{1,32}`, unique; it becomes part of the agent's SPIFFE ID.
//! - `issuer`: the exact `iss` of the issuer's tokens, unique.
//! - `audiences`: non-empty; a token's `aud` must contain one of them.
//! - exactly one of `jwks_file` (re-read whenever its modification time or size changes)
//!   and `jwks_url` (`https://`, fetched on first use with [`quorate_proto::https`],
//!   cached, refreshed after `refresh_seconds` — default 300, 30 to 86400 — and when a
//!   token names an unknown `kid`, at most once per 30 s).
//! - `algorithms`: default `["ES256", "RS256"]`; allowed values `ES256`, `ES384`, `RS256`,
//!   `PS256`, `EdDSA`. Symmetric (`HS*`) and `none` are never accepted.
//! - `ca_file` (only with `jwks_url`): an extra trusted root (PEM) for the JWKS endpoint,
//!   added to the system roots.
//! - `svid`: trust domains whose X.509-SVIDs are accepted, each with its CA bundle (PEM).
//!   The cluster's own trust domain is refused: those are Quorate's certificates.
//!
//! Relative paths resolve against the directory of the configuration file. Unknown
//! fields are errors, and every problem is reported at once.
//!
//! # JWT verification order
//!
//! 1. Size and shape: three base64url segments (JWE and `crit` refused); header and
//!    payload are JSON objects in which no object, nested ones included, names a member
//!    twice ([`quorate_proto::json::parse_object_unique`]: parsers differ on which
//!    duplicate wins, and a duplicated claim would otherwise become a policy tag with the
//!    last value); registered claims have their RFC 7519 types — `iat`, `exp`, `nbf`
//!    JSON numbers, `iss`, `sub`, `jti` strings, `aud` a string or an array of strings.
//! 2. The header's `alg`: `none` and `HS*` are refused **before any key is looked at**, so
//!    the classic confusion attack (an HMAC keyed with the issuer's public key) cannot
//!    work. Header keys (`jwk`, `jku`, `x5c`, `x5u`) are ignored: keys come only from the
//!    issuer's configured JWKS.
//! 3. The unverified `iss` picks the issuer configuration — nothing else is read from the
//!    unverified payload; `alg` must be in that issuer's list.
//! 4. The key: by `kid` (or, without `kid`, the issuer's only key usable with `alg`); its
//!    type and curve must match `alg`, its `use` (if given) must be `sig`, its `alg` (if
//!    given) must equal the header's.
//! 5. jsonwebtoken verifies the signature with `Validation` pinned to that one `alg`, then
//!    `exp`, `iss`, `aud`, `sub` (all required) and `nbf`, with 60 s of leeway.
//! 6. `iat`, if present, is not more than the leeway in the future.
//!
//! # X.509-SVID verification
//!
//! [`Authenticator::verify_svid`] checks the leaf against the X.509-SVID profile (SPIFFE
//! X.509-SVID §4, §5.2) before its chain: exactly one `spiffe://` URI SAN naming a
//! workload in a configured trust domain (never the cluster's own), not a CA
//! (`basicConstraints` without `cA`), and a `keyUsage` extension that asserts
//! `digitalSignature` and neither `keyCertSign` nor `cRLSign`. Each refusal names what is
//! wrong.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use quorate_proto::https;
use rustls::RootCertStore;
use rustls::crypto::aws_lc_rs;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::ClientCertVerifier;
use serde_json::{Map, Value};
use x509_parser::extensions::GeneralName;

/// Clock leeway for `exp` and `nbf`, in seconds.
pub const LEEWAY_SECONDS: u64 = 60;

/// Longest token accepted, in bytes.
pub const MAX_TOKEN_LEN: usize = 16 * 1024;

/// Longest external subject (`sub`) accepted, in bytes.
pub const MAX_SUBJECT_LEN: usize = 1024;

/// Most claims copied into [`Attestation::claims`].
pub const MAX_CLAIMS: usize = 64;

/// Longest claim value (in characters) copied into [`Attestation::claims`]; longer ones
/// are dropped.
pub const MAX_CLAIM_VALUE_LEN: usize = 256;

/// Deepest nesting flattened into [`Attestation::claims`] (top-level claims are depth 1).
pub const MAX_CLAIM_DEPTH: usize = 3;

/// Default JWKS refresh period of a `jwks_url` source.
pub const DEFAULT_REFRESH: Duration = Duration::from_secs(300);

/// A `jwks_url` is fetched again for an unknown `kid` at most this often.
pub const MIN_REFETCH: Duration = Duration::from_secs(30);

/// After a failed fetch with nothing cached, the next attempt waits this long.
const RETRY_EMPTY: Duration = Duration::from_secs(5);

/// Cached JWKS keys stay usable this long past their refresh time while the endpoint
/// cannot be reached; after that, tokens are refused until a fetch succeeds.
const MAX_STALE: Duration = Duration::from_secs(3600);

/// Claims never copied into [`Attestation::claims`]: they are checked, or are fields of
/// their own.
const RESERVED_CLAIMS: [&str; 7] = ["iss", "sub", "aud", "exp", "nbf", "iat", "jti"];

/// Places the system's CA bundle is usually found (Debian/Ubuntu/Arch, RHEL/Fedora,
/// openSUSE, Alpine/BSD). `SSL_CERT_FILE` is tried first.
const SYSTEM_CA_BUNDLES: [&str; 5] = [
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/pki/ca-trust/extracted/pem/tls-ca-bundle.pem",
    "/etc/ssl/ca-bundle.pem",
    "/etc/ssl/cert.pem",
];

// ---------------------------------------------------------------------------------------
// Configuration
// ---------------------------------------------------------------------------------------

/// An asymmetric JWS algorithm an issuer may be trusted with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum JwsAlgorithm {
    /// ECDSA P-256 with SHA-256.
    Es256,
    /// ECDSA P-384 with SHA-384.
    Es384,
    /// RSASSA-PKCS1-v1_5 with SHA-256.
    Rs256,
    /// RSASSA-PSS with SHA-256.
    Ps256,
    /// Ed25519.
    EdDsa,
}

impl JwsAlgorithm {
    /// Every algorithm Quorate can trust an issuer with.
    pub const ALL: [JwsAlgorithm; 5] = [
        JwsAlgorithm::Es256,
        JwsAlgorithm::Es384,
        JwsAlgorithm::Rs256,
        JwsAlgorithm::Ps256,
        JwsAlgorithm::EdDsa,
    ];

    /// The default list of an issuer: ES256 and RS256.
    pub const DEFAULT: [JwsAlgorithm; 2] = [JwsAlgorithm::Es256, JwsAlgorithm::Rs256];

    /// The JOSE name (`ES256`, …).
    pub fn as_str(self) -> &'static str {
        match self {
            JwsAlgorithm::Es256 => "ES256",
            JwsAlgorithm::Es384 => "ES384",
            JwsAlgorithm::Rs256 => "RS256",
            JwsAlgorithm::Ps256 => "PS256",
            JwsAlgorithm::EdDsa => "EdDSA",
        }
    }

    /// Parses a JOSE name; only the five asymmetric algorithms of [`JwsAlgorithm::ALL`].
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|a| a.as_str() == name)
    }

    fn to_jwt(self) -> Algorithm {
        match self {
            JwsAlgorithm::Es256 => Algorithm::ES256,
            JwsAlgorithm::Es384 => Algorithm::ES384,
            JwsAlgorithm::Rs256 => Algorithm::RS256,
            JwsAlgorithm::Ps256 => Algorithm::PS256,
            JwsAlgorithm::EdDsa => Algorithm::EdDSA,
        }
    }

    fn key_kind(self) -> KeyKind {
        match self {
            JwsAlgorithm::Es256 => KeyKind::P256,
            JwsAlgorithm::Es384 => KeyKind::P384,
            JwsAlgorithm::Rs256 | JwsAlgorithm::Ps256 => KeyKind::Rsa,
            JwsAlgorithm::EdDsa => KeyKind::Ed25519,
        }
    }
}

impl fmt::Display for JwsAlgorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

fn list_algorithms(algorithms: &[JwsAlgorithm]) -> String {
    algorithms
        .iter()
        .map(|a| a.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Where an issuer's signing keys come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JwksSource {
    /// A JWKS file, re-read when it changes.
    File(PathBuf),
    /// An `https://` URL, fetched lazily and cached.
    Url(String),
}

/// A trusted OIDC issuer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OidcIssuerConfig {
    /// Short name, `[a-z0-9-]{1,32}`: the `<issuer name>` in agent SPIFFE IDs.
    pub name: String,
    /// The exact `iss` of its tokens.
    pub issuer: String,
    /// Accepted audiences (a token's `aud` must contain one).
    pub audiences: Vec<String>,
    /// Where its keys come from.
    pub jwks: JwksSource,
    /// Accepted algorithms.
    pub algorithms: Vec<JwsAlgorithm>,
    /// Extra trusted root (PEM) for a [`JwksSource::Url`].
    pub ca_file: Option<PathBuf>,
    /// Refresh period of a [`JwksSource::Url`].
    pub refresh: Duration,
}

/// A trusted SPIFFE trust domain for X.509-SVIDs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SvidTrustConfig {
    /// The trust domain, e.g. `example.org`.
    pub trust_domain: String,
    /// Its X.509 bundle: CA certificates, PEM.
    pub bundle_file: PathBuf,
}

/// The trust configuration (`--trust-config FILE`); see the [module docs](self).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuthnConfig {
    /// Trusted OIDC issuers.
    pub oidc: Vec<OidcIssuerConfig>,
    /// Trusted SPIFFE trust domains.
    pub svid: Vec<SvidTrustConfig>,
}

impl AuthnConfig {
    /// Reads and checks a trust configuration file. Relative paths inside resolve against
    /// the file's directory. On failure, returns every problem found, each naming the
    /// file.
    pub fn from_file(path: impl AsRef<Path>) -> Result<AuthnConfig, Vec<String>> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| {
            vec![format!(
                "cannot read trust configuration {}: {e}",
                path.display()
            )]
        })?;
        let base = path.parent().unwrap_or_else(|| Path::new("."));
        Self::from_json(&text, base).map_err(|errors| {
            errors
                .into_iter()
                .map(|e| format!("{}: {e}", path.display()))
                .collect()
        })
    }

    /// Parses and checks a trust configuration from JSON text; relative paths resolve
    /// against `base_dir`. On failure, returns every problem found.
    pub fn from_json(text: &str, base_dir: &Path) -> Result<AuthnConfig, Vec<String>> {
        let root: Value =
            serde_json::from_str(text).map_err(|e| vec![format!("not valid JSON: {e}")])?;
        let mut errors = Vec::new();
        let Some(root) = root.as_object() else {
            return Err(vec![
                "the trust configuration must be a JSON object with `oidc` and/or `svid` arrays"
                    .to_owned(),
            ]);
        };
        unknown_fields(root, &["oidc", "svid"], "the top level", &mut errors);
        let mut config = AuthnConfig::default();
        for (i, entry) in array_field(root, "oidc", &mut errors).iter().enumerate() {
            if let Some(issuer) = parse_oidc(i, entry, base_dir, &mut errors) {
                config.oidc.push(issuer);
            }
        }
        for (i, entry) in array_field(root, "svid", &mut errors).iter().enumerate() {
            if let Some(trust) = parse_svid(i, entry, base_dir, &mut errors) {
                config.svid.push(trust);
            }
        }
        errors.extend(config.duplicates());
        if errors.is_empty() {
            Ok(config)
        } else {
            Err(errors)
        }
    }

    /// Every problem with this configuration (empty if it is valid): field values,
    /// uniqueness of names, issuers and trust domains. Files are not opened here.
    pub fn problems(&self) -> Vec<String> {
        let mut errors = Vec::new();
        for (i, c) in self.oidc.iter().enumerate() {
            let fields = OidcFields {
                name: Some(&c.name),
                issuer: Some(&c.issuer),
                audiences: Some(&c.audiences),
                jwks: Some(&c.jwks),
                algorithms: &c.algorithms,
                ca_file: c.ca_file.is_some(),
                refresh: c.refresh,
            };
            errors.extend(fields.problems(&format!("oidc[{i}] ({})", c.name)));
        }
        for (i, s) in self.svid.iter().enumerate() {
            if let Err(e) = check_trust_domain(&s.trust_domain) {
                errors.push(format!("svid[{i}]: trust_domain `{}` {e}", s.trust_domain));
            }
        }
        errors.extend(self.duplicates());
        errors
    }

    /// Names, issuers and trust domains given twice.
    fn duplicates(&self) -> Vec<String> {
        let mut errors = Vec::new();
        let mut names = BTreeSet::new();
        let mut issuers = BTreeSet::new();
        for c in &self.oidc {
            if !names.insert(c.name.as_str()) {
                errors.push(format!("oidc: the name `{}` is used twice", c.name));
            }
            if !issuers.insert(c.issuer.as_str()) {
                errors.push(format!(
                    "oidc: the issuer `{}` is configured twice",
                    c.issuer
                ));
            }
        }
        let mut domains = BTreeSet::new();
        for s in &self.svid {
            if !domains.insert(s.trust_domain.as_str()) {
                errors.push(format!(
                    "svid: the trust domain `{}` is configured twice",
                    s.trust_domain
                ));
            }
        }
        errors
    }
}

/// The fields of an OIDC entry that are present, for checking entries that are complete
/// ([`AuthnConfig::problems`]) and entries that are not (while parsing), alike.
struct OidcFields<'a> {
    name: Option<&'a str>,
    issuer: Option<&'a str>,
    audiences: Option<&'a [String]>,
    jwks: Option<&'a JwksSource>,
    algorithms: &'a [JwsAlgorithm],
    ca_file: bool,
    refresh: Duration,
}

impl OidcFields<'_> {
    fn problems(&self, at: &str) -> Vec<String> {
        let mut errors = Vec::new();
        if let Some(name) = self.name
            && let Err(e) = check_issuer_name(name)
        {
            errors.push(format!("{at}: name `{name}` {e}"));
        }
        if let Some(issuer) = self.issuer
            && (issuer.is_empty() || issuer.len() > 512 || issuer.chars().any(char::is_control))
        {
            errors.push(format!(
                "{at}: issuer must be 1 to 512 characters without control characters"
            ));
        }
        if let Some(audiences) = self.audiences {
            if audiences.is_empty() {
                errors.push(format!("{at}: audiences must list at least one audience"));
            }
            if audiences.iter().any(String::is_empty) {
                errors.push(format!("{at}: an audience must not be empty"));
            }
        }
        if self.algorithms.is_empty() {
            errors.push(format!(
                "{at}: algorithms must list at least one algorithm (omit it for the default ES256, RS256)"
            ));
        }
        match self.jwks {
            Some(JwksSource::Url(url)) => {
                if let Err(e) = https::check_url(url) {
                    errors.push(format!("{at}: jwks_url: {e}"));
                }
            }
            Some(JwksSource::File(_)) if self.ca_file => errors.push(format!(
                "{at}: ca_file applies only to jwks_url (a jwks_file needs no TLS)"
            )),
            _ => {}
        }
        if !(MIN_REFETCH..=Duration::from_secs(86_400)).contains(&self.refresh) {
            errors.push(format!(
                "{at}: refresh_seconds must be between 30 and 86400"
            ));
        }
        errors
    }
}

fn unknown_fields(obj: &Map<String, Value>, known: &[&str], at: &str, errors: &mut Vec<String>) {
    for key in obj.keys() {
        if !known.contains(&key.as_str()) {
            errors.push(format!(
                "{at}: unknown field `{key}` (expected one of: {})",
                known.join(", ")
            ));
        }
    }
}

fn array_field<'a>(
    obj: &'a Map<String, Value>,
    key: &str,
    errors: &mut Vec<String>,
) -> &'a [Value] {
    match obj.get(key) {
        None => &[],
        Some(Value::Array(items)) => items,
        Some(_) => {
            errors.push(format!("`{key}` must be an array"));
            &[]
        }
    }
}

/// A string field: `Ok(None)` if absent, an error if present with another type.
fn string_field(
    obj: &Map<String, Value>,
    key: &str,
    at: &str,
    errors: &mut Vec<String>,
) -> Option<String> {
    match obj.get(key) {
        None => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(_) => {
            errors.push(format!("{at}: `{key}` must be a string"));
            None
        }
    }
}

fn string_list(
    obj: &Map<String, Value>,
    key: &str,
    at: &str,
    errors: &mut Vec<String>,
) -> Option<Vec<String>> {
    match obj.get(key) {
        None => None,
        Some(Value::Array(items)) => {
            let strings: Option<Vec<String>> = items
                .iter()
                .map(|v| v.as_str().map(str::to_owned))
                .collect();
            if strings.is_none() {
                errors.push(format!("{at}: `{key}` must be an array of strings"));
            }
            strings
        }
        Some(_) => {
            errors.push(format!("{at}: `{key}` must be an array of strings"));
            None
        }
    }
}

fn resolve(base: &Path, path: &str) -> PathBuf {
    let path = Path::new(path);
    if path.is_absolute() {
        path.to_owned()
    } else {
        base.join(path)
    }
}

const OIDC_FIELDS: [&str; 8] = [
    "name",
    "issuer",
    "audiences",
    "jwks_file",
    "jwks_url",
    "algorithms",
    "ca_file",
    "refresh_seconds",
];

fn parse_oidc(
    i: usize,
    entry: &Value,
    base: &Path,
    errors: &mut Vec<String>,
) -> Option<OidcIssuerConfig> {
    let Some(obj) = entry.as_object() else {
        errors.push(format!("oidc[{i}]: must be an object"));
        return None;
    };
    let name = string_field(obj, "name", &format!("oidc[{i}]"), errors);
    let at = match &name {
        Some(name) => format!("oidc[{i}] ({name})"),
        None => format!("oidc[{i}]"),
    };
    unknown_fields(obj, &OIDC_FIELDS, &at, errors);
    let before = errors.len();
    if name.is_none() {
        errors.push(format!("{at}: `name` is required"));
    }
    let issuer = string_field(obj, "issuer", &at, errors);
    if issuer.is_none() && !obj.contains_key("issuer") {
        errors.push(format!("{at}: `issuer` is required"));
    }
    let audiences = string_list(obj, "audiences", &at, errors);
    if !obj.contains_key("audiences") {
        errors.push(format!("{at}: `audiences` is required"));
    }
    let jwks_file = string_field(obj, "jwks_file", &at, errors);
    let jwks_url = string_field(obj, "jwks_url", &at, errors);
    let jwks = match (jwks_file, jwks_url) {
        (Some(file), None) => Some(JwksSource::File(resolve(base, &file))),
        (None, Some(url)) => Some(JwksSource::Url(url)),
        (Some(_), Some(_)) => {
            errors.push(format!(
                "{at}: give exactly one of `jwks_file` and `jwks_url`, not both"
            ));
            None
        }
        (None, None) => {
            if !obj.contains_key("jwks_file") && !obj.contains_key("jwks_url") {
                errors.push(format!(
                    "{at}: one of `jwks_file` and `jwks_url` is required"
                ));
            }
            None
        }
    };
    let algorithms = match string_list(obj, "algorithms", &at, errors) {
        None => JwsAlgorithm::DEFAULT.to_vec(),
        Some(names) => {
            let mut algorithms = Vec::new();
            for name in names {
                match JwsAlgorithm::from_name(&name) {
                    Some(a) if !algorithms.contains(&a) => algorithms.push(a),
                    Some(_) => {}
                    None => {
                        let never = name.eq_ignore_ascii_case("none")
                            || name.to_ascii_uppercase().starts_with("HS");
                        let hint = if never {
                            " (unsigned and symmetric algorithms are never trusted)"
                        } else {
                            ""
                        };
                        errors.push(format!(
                            "{at}: algorithm `{name}` is not accepted{hint}; \
                             use ES256, ES384, RS256, PS256 or EdDSA"
                        ));
                    }
                }
            }
            algorithms
        }
    };
    let ca_file = string_field(obj, "ca_file", &at, errors).map(|f| resolve(base, &f));
    let refresh = match obj.get("refresh_seconds") {
        None => DEFAULT_REFRESH,
        Some(v) => match v.as_u64() {
            Some(s) => Duration::from_secs(s),
            None => {
                errors.push(format!(
                    "{at}: `refresh_seconds` must be a whole number of seconds"
                ));
                DEFAULT_REFRESH
            }
        },
    };
    if obj.contains_key("refresh_seconds") && matches!(jwks, Some(JwksSource::File(_))) {
        errors.push(format!(
            "{at}: `refresh_seconds` applies only to `jwks_url` (a jwks_file is re-read when it changes)"
        ));
    }
    let fields = OidcFields {
        name: name.as_deref(),
        issuer: issuer.as_deref(),
        audiences: audiences.as_deref(),
        jwks: jwks.as_ref(),
        algorithms: &algorithms,
        ca_file: ca_file.is_some(),
        refresh,
    };
    errors.extend(fields.problems(&at));
    if errors.len() > before {
        return None;
    }
    Some(OidcIssuerConfig {
        name: name?,
        issuer: issuer?,
        audiences: audiences?,
        jwks: jwks?,
        algorithms,
        ca_file,
        refresh,
    })
}

fn parse_svid(
    i: usize,
    entry: &Value,
    base: &Path,
    errors: &mut Vec<String>,
) -> Option<SvidTrustConfig> {
    let at = format!("svid[{i}]");
    let Some(obj) = entry.as_object() else {
        errors.push(format!("{at}: must be an object"));
        return None;
    };
    unknown_fields(obj, &["trust_domain", "bundle_file"], &at, errors);
    let trust_domain = string_field(obj, "trust_domain", &at, errors);
    if !obj.contains_key("trust_domain") {
        errors.push(format!("{at}: `trust_domain` is required"));
    }
    let bundle_file = string_field(obj, "bundle_file", &at, errors);
    if !obj.contains_key("bundle_file") {
        errors.push(format!("{at}: `bundle_file` is required"));
    }
    if let Some(domain) = &trust_domain
        && let Err(e) = check_trust_domain(domain)
    {
        errors.push(format!("{at}: trust_domain `{domain}` {e}"));
        return None;
    }
    Some(SvidTrustConfig {
        trust_domain: trust_domain?,
        bundle_file: resolve(base, &bundle_file?),
    })
}

fn check_issuer_name(name: &str) -> Result<(), &'static str> {
    if (1..=32).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        Ok(())
    } else {
        Err("must be 1 to 32 characters of a-z, 0-9 and `-`")
    }
}

/// A SPIFFE trust domain: 1 to 255 characters of `a-z 0-9 . - _` (SPIFFE ID spec §2.1).
fn check_trust_domain(domain: &str) -> Result<(), &'static str> {
    if (1..=255).contains(&domain.len())
        && domain.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'_')
        })
    {
        Ok(())
    } else {
        Err("must be 1 to 255 characters of a-z, 0-9, `.`, `-` and `_`")
    }
}

// ---------------------------------------------------------------------------------------
// Results and errors
// ---------------------------------------------------------------------------------------

/// How an agent authenticated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum AuthMethod {
    /// An OIDC JWT from a trusted issuer.
    #[serde(rename = "oidc")]
    Oidc,
    /// An X.509-SVID client certificate.
    #[serde(rename = "x509-svid")]
    X509Svid,
}

impl fmt::Display for AuthMethod {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            AuthMethod::Oidc => "oidc",
            AuthMethod::X509Svid => "x509-svid",
        })
    }
}

/// An attestation JWT as presented (a bearer credential until it expires): its `Debug`
/// prints nothing of it.
#[derive(Clone, PartialEq, Eq)]
pub struct PresentedJwt(String);

impl PresentedJwt {
    /// The compact JWS.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for PresentedJwt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// A verified agent identity.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Attestation {
    /// The agent's SPIFFE ID: `spiffe://<domain>/agent/<issuer name>/<percent-encoded
    /// sub>` for OIDC (bytes outside `A-Z a-z 0-9 - . _` become `%XX`), or the SVID's
    /// own ID.
    pub subject: String,
    /// The OIDC `iss`, or `spiffe://<trust domain>`.
    pub issuer: String,
    /// The OIDC `sub`, or the SVID's ID.
    pub external_subject: String,
    /// How the agent authenticated.
    pub method: AuthMethod,
    /// Top-level claims that are strings, numbers or booleans, as text, except `iss sub
    /// aud exp nbf iat jti`; nested objects are flattened with `.`-joined keys (depth ≤
    /// 3); at most 64 claims, values over 256 characters dropped. Empty for SVIDs.
    pub claims: BTreeMap<String, String>,
    /// `exp` (Unix seconds), or the SVID's `notAfter`.
    pub expires_at: Option<i64>,
    /// The OIDC JWT as the agent presented it, which fragment nodes verify again
    /// themselves (DESIGN.md §9); `None` for an X.509-SVID, which proves possession only
    /// to the TLS listener that saw it.
    #[serde(skip)]
    pub presented: Option<PresentedJwt>,
}

/// Why an attestation was refused. Messages say what is wrong and what to do; none
/// carries the token itself.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AuthnError {
    /// The token is not a well-formed signed JWT.
    #[error("attestation is not a well-formed signed JWT: {0}")]
    Malformed(String),
    /// The token's issuer is not trusted.
    #[error(
        "attestation issuer `{issuer}` is not trusted; trusted issuers: {}",
        if trusted.is_empty() { "none configured".to_owned() } else { trusted.join(", ") }
    )]
    UnknownIssuer {
        /// The `iss` of the token.
        issuer: String,
        /// The issuers this service trusts.
        trusted: Vec<String>,
    },
    /// The token's `alg` is not accepted (globally, or for its issuer).
    #[error("attestation uses alg {alg}; only asymmetric algorithms {accepted} are accepted")]
    UntrustedAlgorithm {
        /// The header's `alg`.
        alg: String,
        /// What is accepted, e.g. `ES256, ES384, RS256, PS256, EdDSA` or `RS256 (issuer
        /// github)`.
        accepted: String,
    },
    /// The token expired (beyond the leeway).
    #[error(
        "attestation has expired (exp is more than {LEEWAY_SECONDS} s in the past): get a fresh token from its issuer"
    )]
    Expired,
    /// The token's `nbf` is in the future (beyond the leeway).
    #[error(
        "attestation is not valid yet (nbf is more than {LEEWAY_SECONDS} s in the future): check the clocks"
    )]
    NotYetValid,
    /// The token's `aud` names none of the audiences accepted for its issuer.
    #[error(
        "attestation audience is not accepted: request a token for one of: {}",
        expected.join(", ")
    )]
    WrongAudience {
        /// Audiences accepted for the issuer.
        expected: Vec<String>,
    },
    /// A required claim is missing.
    #[error("attestation lacks the required claim `{0}` (exp, iss, aud and sub are required)")]
    MissingClaim(String),
    /// A registered claim (RFC 7519 §4.1) has the wrong JSON type.
    #[error("attestation claim `{claim}` must be {expected} (RFC 7519 §4.1)")]
    WrongClaimType {
        /// The claim, e.g. `iat`.
        claim: String,
        /// What it must be, e.g. `a JSON number (NumericDate)`.
        expected: &'static str,
    },
    /// The token's `iat` is in the future (beyond the leeway).
    #[error(
        "attestation was issued in the future (iat is more than {LEEWAY_SECONDS} s ahead of this server's clock): check the issuer's clock"
    )]
    IssuedInFuture,
    /// The signature does not verify with the issuer's key.
    #[error("attestation signature does not verify with the issuer's key")]
    BadSignature,
    /// The issuer's JWKS has no key for the token.
    #[error(
        "issuer `{issuer}` has no signing key with kid `{kid}` (if it just rotated keys, retry in a minute)"
    )]
    NoKey {
        /// The token's `kid` (`<none>` if it has none).
        kid: String,
        /// The issuer's configured name.
        issuer: String,
    },
    /// The key named by `kid` cannot verify this token's `alg`.
    #[error("issuer key `{kid}` cannot verify this attestation: {reason}")]
    KeyUnusable {
        /// The key's `kid`.
        kid: String,
        /// Why.
        reason: String,
    },
    /// The issuer's keys could not be obtained.
    #[error("issuer signing keys are unavailable: {0}")]
    JwksUnavailable(String),
    /// The X.509-SVID was refused.
    #[error("X.509-SVID refused: {0}")]
    Svid(String),
}

// ---------------------------------------------------------------------------------------
// Keys
// ---------------------------------------------------------------------------------------

/// Key type and curve of a JWK, as far as it matters for the algorithms accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum KeyKind {
    P256,
    P384,
    Rsa,
    Ed25519,
}

impl KeyKind {
    fn describe(self) -> &'static str {
        match self {
            KeyKind::P256 => "an EC P-256 key",
            KeyKind::P384 => "an EC P-384 key",
            KeyKind::Rsa => "an RSA key",
            KeyKind::Ed25519 => "an Ed25519 key",
        }
    }
}

/// A usable public signing key from a JWKS.
#[derive(Clone)]
struct Key {
    kid: Option<String>,
    kind: KeyKind,
    /// The JWK's `alg`, if it declares one.
    declared_alg: Option<String>,
    decoding: DecodingKey,
}

impl Key {
    /// Why this key cannot verify `alg`, if it cannot.
    fn incompatibility(&self, alg: JwsAlgorithm) -> Option<String> {
        if self.kind != alg.key_kind() {
            return Some(format!(
                "it is {} but the token uses {alg}",
                self.kind.describe()
            ));
        }
        match &self.declared_alg {
            Some(declared) if declared != alg.as_str() => Some(format!(
                "the key is declared for {declared} but the token uses {alg}"
            )),
            _ => None,
        }
    }
}

/// The usable keys of one JWKS document.
#[derive(Default)]
struct KeySet {
    keys: Vec<Key>,
}

/// Parses a JWKS document, keeping only public signature keys Quorate can use: EC P-256
/// and P-384, RSA, Ed25519. Symmetric (`oct`) keys, encryption keys (`use: enc`) and
/// unknown key types are skipped; a document without any usable key is an error.
fn parse_jwks(bytes: &[u8]) -> Result<KeySet, String> {
    let doc: Value =
        serde_json::from_slice(bytes).map_err(|e| format!("the JWKS is not valid JSON: {e}"))?;
    let entries = doc
        .get("keys")
        .and_then(Value::as_array)
        .ok_or("the JWKS has no `keys` array")?;
    let mut keys = Vec::new();
    for entry in entries {
        let Ok(jwk) = serde_json::from_value::<Jwk>(entry.clone()) else {
            continue;
        };
        if matches!(&jwk.common.public_key_use, Some(u) if *u != PublicKeyUse::Signature) {
            continue;
        }
        let kind = match &jwk.algorithm {
            AlgorithmParameters::EllipticCurve(p) => match p.curve {
                EllipticCurve::P256 => KeyKind::P256,
                EllipticCurve::P384 => KeyKind::P384,
                _ => continue,
            },
            AlgorithmParameters::RSA(_) => KeyKind::Rsa,
            AlgorithmParameters::OctetKeyPair(p) if p.curve == EllipticCurve::Ed25519 => {
                KeyKind::Ed25519
            }
            // Never a symmetric key: trusting one would let its holder mint tokens.
            _ => continue,
        };
        let Ok(decoding) = DecodingKey::from_jwk(&jwk) else {
            continue;
        };
        keys.push(Key {
            kid: jwk.common.key_id.clone(),
            kind,
            declared_alg: jwk.common.key_algorithm.map(|a| a.to_string()),
            decoding,
        });
    }
    if keys.is_empty() {
        return Err(format!(
            "the JWKS holds no usable public signing key ({} entries; EC P-256/P-384, RSA and Ed25519 are supported)",
            entries.len()
        ));
    }
    Ok(KeySet { keys })
}

/// The outcome of looking a key up in a [`KeySet`].
enum Selected {
    Key(Box<Key>),
    Missing,
    Unusable(AuthnError),
}

/// Finds the key for a token: by `kid` (the first with that kid usable with `alg`), or,
/// without `kid`, the only key usable with `alg`.
fn select(set: &KeySet, kid: Option<&str>, alg: JwsAlgorithm) -> Selected {
    match kid {
        Some(kid) => {
            let mut named = set.keys.iter().filter(|k| k.kid.as_deref() == Some(kid));
            let Some(first) = named.clone().next() else {
                return Selected::Missing;
            };
            match named.find(|k| k.incompatibility(alg).is_none()) {
                Some(key) => Selected::Key(Box::new(key.clone())),
                None => Selected::Unusable(AuthnError::KeyUnusable {
                    kid: kid.to_owned(),
                    reason: first.incompatibility(alg).unwrap_or_default(),
                }),
            }
        }
        None => {
            let mut usable = set.keys.iter().filter(|k| k.incompatibility(alg).is_none());
            match (usable.next(), usable.next()) {
                (Some(key), None) => Selected::Key(Box::new(key.clone())),
                _ => Selected::Missing,
            }
        }
    }
}

/// A `jwks_file`: re-read when its modification time or size changes.
struct FileKeys {
    path: PathBuf,
    state: Mutex<FileState>,
}

struct FileState {
    /// Modification time and size of the file the keys were read from.
    stamp: Option<(SystemTime, u64)>,
    /// Stamp of a version that failed to load (warned about once).
    failed: Option<(SystemTime, u64)>,
    keys: Arc<KeySet>,
}

fn file_stamp(path: &Path) -> Option<(SystemTime, u64)> {
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.modified().ok()?, meta.len()))
}

fn load_jwks_file(path: &Path) -> Result<KeySet, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    parse_jwks(&bytes).map_err(|e| format!("{}: {e}", path.display()))
}

impl FileKeys {
    fn open(path: PathBuf) -> Result<Self, String> {
        let stamp = file_stamp(&path);
        let keys = load_jwks_file(&path)?;
        Ok(Self {
            path,
            state: Mutex::new(FileState {
                stamp,
                failed: None,
                keys: Arc::new(keys),
            }),
        })
    }

    /// The current keys, re-reading the file if it changed. A changed file that does not
    /// load (e.g. caught mid-write) leaves the previous keys in place.
    fn current(&self, issuer: &str) -> Arc<KeySet> {
        let stamp = file_stamp(&self.path);
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if stamp.is_some() && stamp != state.stamp && stamp != state.failed {
            match load_jwks_file(&self.path) {
                Ok(keys) => {
                    tracing::info!(
                        issuer,
                        path = %self.path.display(),
                        keys = keys.keys.len(),
                        "reloaded JWKS file"
                    );
                    state.keys = Arc::new(keys);
                    state.stamp = stamp;
                    state.failed = None;
                }
                Err(error) => {
                    tracing::warn!(
                        issuer,
                        %error,
                        "JWKS file changed but does not load; keeping the previous keys"
                    );
                    state.failed = stamp;
                }
            }
        }
        Arc::clone(&state.keys)
    }
}

/// A `jwks_url`: fetched on first use, cached, refreshed when stale or for an unknown
/// `kid` (rate-limited).
struct UrlKeys {
    url: String,
    tls: Arc<rustls::ClientConfig>,
    refresh: Duration,
    min_refetch: Duration,
    state: Mutex<UrlState>,
    /// Held while fetching, so concurrent verifications trigger one fetch.
    fetching: tokio::sync::Mutex<()>,
}

#[derive(Default, Clone)]
struct UrlState {
    keys: Option<Arc<KeySet>>,
    fetched_at: Option<Instant>,
    attempted_at: Option<Instant>,
    last_error: Option<String>,
}

impl UrlKeys {
    fn snapshot(&self) -> UrlState {
        self.state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Cached keys younger than `limit`.
    fn keys_younger_than(state: &UrlState, now: Instant, limit: Duration) -> Option<Arc<KeySet>> {
        match (&state.keys, state.fetched_at) {
            (Some(keys), Some(at)) if now.saturating_duration_since(at) < limit => {
                Some(Arc::clone(keys))
            }
            _ => None,
        }
    }

    async fn fetch(&self) -> Result<KeySet, String> {
        let response = https::get(&self.url, Arc::clone(&self.tls))
            .await
            .map_err(|e| e.to_string())?;
        if !response.is_success() {
            return Err(format!("{} answered HTTP {}", self.url, response.status));
        }
        parse_jwks(&response.body).map_err(|e| format!("{}: {e}", self.url))
    }

    async fn lookup(
        &self,
        issuer: &str,
        kid: Option<&str>,
        alg: JwsAlgorithm,
    ) -> Result<Key, AuthnError> {
        // 1. Fresh cache.
        if let Some(keys) = Self::keys_younger_than(&self.snapshot(), Instant::now(), self.refresh)
        {
            match select(&keys, kid, alg) {
                Selected::Key(key) => return Ok(*key),
                Selected::Unusable(e) => return Err(e),
                Selected::Missing => {}
            }
        }
        // 2. Fetch (one at a time), unless an attempt was made too recently — possibly by
        //    a concurrent verification we just waited for.
        let _one_fetch = self.fetching.lock().await;
        let state = self.snapshot();
        let now = Instant::now();
        let min_gap = if state.keys.is_some() {
            self.min_refetch
        } else {
            self.min_refetch.min(RETRY_EMPTY)
        };
        let recent = state
            .attempted_at
            .is_some_and(|at| now.saturating_duration_since(at) < min_gap);
        if !recent {
            let result = self.fetch().await;
            let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
            state.attempted_at = Some(Instant::now());
            match result {
                Ok(keys) => {
                    tracing::info!(
                        issuer,
                        url = %self.url,
                        keys = keys.keys.len(),
                        "fetched JWKS"
                    );
                    state.keys = Some(Arc::new(keys));
                    state.fetched_at = state.attempted_at;
                    state.last_error = None;
                }
                Err(error) => {
                    tracing::warn!(issuer, %error, "JWKS fetch failed");
                    state.last_error = Some(error);
                }
            }
        }
        // 3. Whatever is cached now, if not too stale.
        let state = self.snapshot();
        let Some(keys) = Self::keys_younger_than(
            &state,
            Instant::now(),
            self.refresh.saturating_add(MAX_STALE),
        ) else {
            return Err(AuthnError::JwksUnavailable(format!(
                "issuer `{issuer}`: {}",
                state
                    .last_error
                    .unwrap_or_else(|| format!("no keys fetched from {} yet", self.url))
            )));
        };
        match select(&keys, kid, alg) {
            Selected::Key(key) => Ok(*key),
            Selected::Unusable(e) => Err(e),
            Selected::Missing => Err(AuthnError::NoKey {
                kid: kid.unwrap_or("<none>").to_owned(),
                issuer: issuer.to_owned(),
            }),
        }
    }
}

enum KeySource {
    File(FileKeys),
    Url(UrlKeys),
}

// ---------------------------------------------------------------------------------------
// Authenticator
// ---------------------------------------------------------------------------------------

struct Issuer {
    name: String,
    issuer: String,
    audiences: Vec<String>,
    algorithms: Vec<JwsAlgorithm>,
    keys: KeySource,
}

struct SvidTrust {
    trust_domain: String,
    verifier: Arc<dyn ClientCertVerifier>,
}

/// The TLS client-certificate check of the agent listener: a chain is accepted if it
/// verifies to the bundle of *some* configured SVID trust domain. Which domain, and
/// everything else about the SVID, is checked again per request by
/// [`Authenticator::verify_svid`] (trust domain of the SPIFFE ID = the bundle's).
#[derive(Debug)]
struct AnySvidBundle {
    verifiers: Vec<Arc<dyn ClientCertVerifier>>,
    hints: Vec<rustls::DistinguishedName>,
}

impl ClientCertVerifier for AnySvidBundle {
    fn root_hint_subjects(&self) -> &[rustls::DistinguishedName] {
        &self.hints
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<rustls::server::danger::ClientCertVerified, rustls::Error> {
        let mut last = rustls::Error::General("no SVID trust domain is configured".into());
        for v in &self.verifiers {
            match v.verify_client_cert(end_entity, intermediates, now) {
                Ok(ok) => return Ok(ok),
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        match self.verifiers.first() {
            Some(v) => v.verify_tls12_signature(message, cert, dss),
            None => Err(rustls::Error::General("no SVID trust domain".into())),
        }
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        match self.verifiers.first() {
            Some(v) => v.verify_tls13_signature(message, cert, dss),
            None => Err(rustls::Error::General("no SVID trust domain".into())),
        }
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.verifiers
            .first()
            .map(|v| v.supported_verify_schemes())
            .unwrap_or_default()
    }
}

/// Verifies agent attestations against the trust configuration. `Send + Sync`; share it
/// in an `Arc`.
pub struct Authenticator {
    domain: String,
    oidc: Vec<Issuer>,
    svid: Vec<SvidTrust>,
}

impl fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Authenticator")
            .field("domain", &self.domain)
            .field("issuers", &self.issuers())
            .finish()
    }
}

fn read_pem_certs(path: &Path, what: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let pem =
        std::fs::read(path).map_err(|e| format!("cannot read {what} {}: {e}", path.display()))?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{what} {} is not valid PEM: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "{what} {} holds no `-----BEGIN CERTIFICATE-----` block",
            path.display()
        ));
    }
    Ok(certs)
}

/// The system's trusted roots: `SSL_CERT_FILE`, else the first bundle of
/// [`SYSTEM_CA_BUNDLES`] that exists. Empty if none is found.
fn system_roots() -> RootCertStore {
    let mut roots = RootCertStore::empty();
    let candidates = std::env::var_os("SSL_CERT_FILE")
        .map(PathBuf::from)
        .into_iter()
        .chain(SYSTEM_CA_BUNDLES.iter().map(PathBuf::from));
    for path in candidates {
        if let Ok(pem) = std::fs::read(&path) {
            let certs = CertificateDer::pem_slice_iter(&pem).filter_map(Result::ok);
            let (added, _ignored) = roots.add_parsable_certificates(certs);
            if added > 0 {
                break;
            }
        }
    }
    roots
}

impl Authenticator {
    /// Builds an authenticator for the cluster trust domain `domain`: loads every
    /// `jwks_file` and SVID bundle now (JWKS URLs are fetched on first use). On failure,
    /// the message lists every problem, one per line.
    pub async fn new(cfg: AuthnConfig, domain: &str) -> Result<Self, String> {
        Self::build(cfg, domain, MIN_REFETCH)
    }

    fn build(cfg: AuthnConfig, domain: &str, min_refetch: Duration) -> Result<Self, String> {
        let mut errors = cfg.problems();
        if let Err(e) = quorate_proto::tls::validate_domain(domain) {
            errors.push(e.to_string());
        }
        let needs_system_roots = cfg
            .oidc
            .iter()
            .any(|c| matches!(c.jwks, JwksSource::Url(_)));
        let system = if needs_system_roots {
            system_roots()
        } else {
            RootCertStore::empty()
        };
        let mut oidc = Vec::new();
        for c in cfg.oidc {
            let at = format!("issuer {}", c.name);
            let keys = match c.jwks {
                JwksSource::File(path) => match FileKeys::open(path) {
                    Ok(keys) => KeySource::File(keys),
                    Err(e) => {
                        errors.push(format!("{at}: {e}"));
                        continue;
                    }
                },
                JwksSource::Url(url) => {
                    let mut roots = system.clone();
                    if let Some(ca_file) = &c.ca_file {
                        match read_pem_certs(ca_file, "ca_file") {
                            Ok(certs) => {
                                let (added, _) = roots.add_parsable_certificates(certs);
                                if added == 0 {
                                    errors.push(format!(
                                        "{at}: ca_file {} holds no usable CA certificate",
                                        ca_file.display()
                                    ));
                                }
                            }
                            Err(e) => errors.push(format!("{at}: {e}")),
                        }
                    }
                    if roots.is_empty() {
                        errors.push(format!(
                            "{at}: no trusted roots for {url}: no system CA bundle was found; set ca_file or SSL_CERT_FILE"
                        ));
                        continue;
                    }
                    match https::public_client_config(roots) {
                        Ok(tls) => KeySource::Url(UrlKeys {
                            url,
                            tls,
                            refresh: c.refresh,
                            min_refetch,
                            state: Mutex::new(UrlState::default()),
                            fetching: tokio::sync::Mutex::new(()),
                        }),
                        Err(e) => {
                            errors.push(format!("{at}: {e}"));
                            continue;
                        }
                    }
                }
            };
            oidc.push(Issuer {
                name: c.name,
                issuer: c.issuer,
                audiences: c.audiences,
                algorithms: c.algorithms,
                keys,
            });
        }
        let mut svid = Vec::new();
        for s in cfg.svid {
            let at = format!("svid trust domain {}", s.trust_domain);
            if s.trust_domain == domain {
                errors.push(format!(
                    "{at}: this is the cluster's own trust domain; its certificates are Quorate's, not agents'"
                ));
                continue;
            }
            let certs = match read_pem_certs(&s.bundle_file, "bundle_file") {
                Ok(certs) => certs,
                Err(e) => {
                    errors.push(format!("{at}: {e}"));
                    continue;
                }
            };
            let mut roots = RootCertStore::empty();
            let (added, _) = roots.add_parsable_certificates(certs);
            if added == 0 {
                errors.push(format!(
                    "{at}: bundle_file {} holds no usable CA certificate",
                    s.bundle_file.display()
                ));
                continue;
            }
            let provider = Arc::new(aws_lc_rs::default_provider());
            match WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider).build() {
                Ok(verifier) => svid.push(SvidTrust {
                    trust_domain: s.trust_domain,
                    verifier,
                }),
                Err(e) => errors.push(format!("{at}: {e}")),
            }
        }
        if errors.is_empty() {
            Ok(Self {
                domain: domain.to_owned(),
                oidc,
                svid,
            })
        } else {
            Err(errors.join("\n"))
        }
    }

    /// An authenticator that trusts nobody: every attestation is refused.
    pub fn empty(domain: &str) -> Self {
        Self {
            domain: domain.to_owned(),
            oidc: Vec::new(),
            svid: Vec::new(),
        }
    }

    /// What is trusted: each OIDC issuer (`iss`), then `spiffe://<trust domain>` for each
    /// SVID trust domain.
    pub fn issuers(&self) -> Vec<String> {
        self.oidc
            .iter()
            .map(|i| i.issuer.clone())
            .chain(
                self.svid
                    .iter()
                    .map(|s| format!("spiffe://{}", s.trust_domain)),
            )
            .collect()
    }

    /// Verifies an OIDC JWT (see the [module docs](self) for the order of checks).
    pub async fn verify_jwt(&self, token: &str) -> Result<Attestation, AuthnError> {
        if token.len() > MAX_TOKEN_LEN {
            return Err(AuthnError::Malformed(format!(
                "it is longer than {MAX_TOKEN_LEN} bytes"
            )));
        }
        let unverified = Unverified::parse(token)?;
        let alg = JwsAlgorithm::from_name(&unverified.alg).ok_or_else(|| {
            AuthnError::UntrustedAlgorithm {
                alg: unverified.alg.clone(),
                accepted: list_algorithms(&JwsAlgorithm::ALL),
            }
        })?;
        let issuer = self
            .oidc
            .iter()
            .find(|i| i.issuer == unverified.iss)
            .ok_or_else(|| AuthnError::UnknownIssuer {
                issuer: unverified.iss.clone(),
                trusted: self.oidc.iter().map(|i| i.issuer.clone()).collect(),
            })?;
        if !issuer.algorithms.contains(&alg) {
            return Err(AuthnError::UntrustedAlgorithm {
                alg: unverified.alg.clone(),
                accepted: format!(
                    "{} (for issuer {})",
                    list_algorithms(&issuer.algorithms),
                    issuer.name
                ),
            });
        }
        let kid = unverified.kid.as_deref();
        let key = match &issuer.keys {
            KeySource::File(file) => match select(&file.current(&issuer.name), kid, alg) {
                Selected::Key(key) => *key,
                Selected::Unusable(e) => return Err(e),
                Selected::Missing => {
                    return Err(AuthnError::NoKey {
                        kid: kid.unwrap_or("<none>").to_owned(),
                        issuer: issuer.name.clone(),
                    });
                }
            },
            KeySource::Url(url) => url.lookup(&issuer.name, kid, alg).await?,
        };

        let mut validation = Validation::new(alg.to_jwt());
        validation.leeway = LEEWAY_SECONDS;
        validation.validate_exp = true;
        validation.validate_nbf = true;
        validation.validate_aud = true;
        validation.set_audience(&issuer.audiences);
        validation.set_issuer(&[issuer.issuer.as_str()]);
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        let data = jsonwebtoken::decode::<Map<String, Value>>(token, &key.decoding, &validation)
            .map_err(|e| map_jwt_error(&e, issuer, &key, alg, &unverified.iss))?;
        let claims = data.claims;
        // `check_claim_types` made `iat` a number if present.
        if let Some(iat) = claims.get("iat").and_then(Value::as_f64)
            && iat > unix_now_f64() + LEEWAY_SECONDS as f64
        {
            return Err(AuthnError::IssuedInFuture);
        }

        let sub = match claims.get("sub") {
            Some(Value::String(sub)) if !sub.is_empty() && sub.len() <= MAX_SUBJECT_LEN => {
                sub.clone()
            }
            _ => {
                return Err(AuthnError::Malformed(format!(
                    "`sub` must be a string of 1 to {MAX_SUBJECT_LEN} bytes"
                )));
            }
        };
        let expires_at = claims.get("exp").and_then(Value::as_i64);
        Ok(Attestation {
            subject: format!(
                "spiffe://{}/agent/{}/{}",
                self.domain,
                issuer.name,
                percent_encode_segment(&sub)
            ),
            issuer: issuer.issuer.clone(),
            external_subject: sub,
            method: AuthMethod::Oidc,
            claims: flatten_claims(&claims),
            expires_at,
            presented: Some(PresentedJwt(token.to_owned())),
        })
    }

    /// The client-certificate verifier of the agent listener, where agents authenticate
    /// with their X.509-SVID: `None` when no SVID trust domain is configured.
    pub fn svid_client_verifier(&self) -> Option<Arc<dyn ClientCertVerifier>> {
        if self.svid.is_empty() {
            return None;
        }
        let verifiers: Vec<_> = self.svid.iter().map(|t| Arc::clone(&t.verifier)).collect();
        let hints = verifiers
            .iter()
            .flat_map(|v| v.root_hint_subjects().to_vec())
            .collect();
        Some(Arc::new(AnySvidBundle { verifiers, hints }))
    }

    /// Verifies an X.509-SVID chain (leaf first, as presented in a TLS handshake): its
    /// single `spiffe://` URI SAN names a configured trust domain (never the cluster's
    /// own), and the chain verifies to that domain's bundle now, for client
    /// authentication.
    pub fn verify_svid(&self, chain: &[CertificateDer<'_>]) -> Result<Attestation, AuthnError> {
        let svid = |reason: String| AuthnError::Svid(reason);
        let (leaf, intermediates) = chain
            .split_first()
            .ok_or_else(|| svid("no certificate was presented".to_owned()))?;
        let (_, cert) = x509_parser::parse_x509_certificate(leaf.as_ref())
            .map_err(|e| svid(format!("the certificate is not valid X.509: {e}")))?;
        let sans = cert
            .subject_alternative_name()
            .map_err(|e| svid(format!("the SAN extension is malformed: {e}")))?;
        let uris: Vec<&str> = sans
            .map(|ext| {
                ext.value
                    .general_names
                    .iter()
                    .filter_map(|name| match name {
                        GeneralName::URI(uri) => Some(*uri),
                        _ => None,
                    })
                    .collect()
            })
            .unwrap_or_default();
        let id = match uris.as_slice() {
            [uri] => *uri,
            [] => {
                return Err(svid(
                    "the certificate has no SPIFFE ID (URI SAN)".to_owned(),
                ));
            }
            _ => {
                return Err(svid(format!(
                    "the certificate has {} URI SANs; an X.509-SVID has exactly one",
                    uris.len()
                )));
            }
        };
        let trust_domain = parse_spiffe_id(id).map_err(|e| svid(format!("`{id}` {e}")))?;
        check_leaf_profile(&cert).map_err(|e| svid(format!("`{id}`: {e}")))?;
        if trust_domain == self.domain {
            return Err(svid(format!(
                "`{id}` is in the cluster's own trust domain; Quorate's own certificates are not agent identities"
            )));
        }
        let trust = self
            .svid
            .iter()
            .find(|t| t.trust_domain == trust_domain)
            .ok_or_else(|| {
                svid(format!(
                    "trust domain `{trust_domain}` of `{id}` is not trusted (trusted: {})",
                    if self.svid.is_empty() {
                        "none configured".to_owned()
                    } else {
                        self.svid
                            .iter()
                            .map(|t| t.trust_domain.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    }
                ))
            })?;
        trust
            .verifier
            .verify_client_cert(leaf, intermediates, UnixTime::now())
            .map_err(|e| {
                svid(format!(
                    "the chain of `{id}` does not verify to the bundle of {trust_domain}: {e}"
                ))
            })?;
        Ok(Attestation {
            subject: id.to_owned(),
            issuer: format!("spiffe://{trust_domain}"),
            external_subject: id.to_owned(),
            method: AuthMethod::X509Svid,
            claims: BTreeMap::new(),
            expires_at: Some(cert.validity().not_after.timestamp()),
            presented: None,
        })
    }
}

/// Checks what the X.509-SVID profile asks of a leaf beyond its SPIFFE ID (SPIFFE
/// X.509-SVID §4.1, §4.3, §5.2): it is not a CA, and its `keyUsage` extension is present,
/// asserts `digitalSignature`, and asserts neither `keyCertSign` nor `cRLSign`.
fn check_leaf_profile(cert: &x509_parser::certificate::X509Certificate<'_>) -> Result<(), String> {
    let constraints = cert.basic_constraints().map_err(|e| {
        format!("the X.509-SVID leaf's basicConstraints extension is malformed: {e}")
    })?;
    if constraints.is_some_and(|c| c.value.ca) {
        return Err(
            "the X.509-SVID leaf is a CA certificate (basicConstraints cA is set)".to_owned(),
        );
    }
    let usage = cert
        .key_usage()
        .map_err(|e| format!("the X.509-SVID leaf's keyUsage extension is malformed: {e}"))?
        .ok_or_else(|| {
            "the X.509-SVID leaf has no keyUsage extension; it must have one asserting digitalSignature"
                .to_owned()
        })?;
    let usage = usage.value;
    if usage.key_cert_sign() {
        return Err(
            "the X.509-SVID leaf's keyUsage asserts keyCertSign, which only a signing certificate may"
                .to_owned(),
        );
    }
    if usage.crl_sign() {
        return Err(
            "the X.509-SVID leaf's keyUsage asserts cRLSign, which only a signing certificate may"
                .to_owned(),
        );
    }
    if !usage.digital_signature() {
        let asserted = usage.to_string();
        return Err(format!(
            "the X.509-SVID leaf's keyUsage lacks digitalSignature (it asserts {})",
            if asserted.is_empty() {
                "nothing"
            } else {
                &asserted
            }
        ));
    }
    Ok(())
}

/// Checks a SPIFFE ID (SPIFFE ID spec §2) of a workload: scheme `spiffe`, a trust domain of
/// `a-z 0-9 . - _`, a non-empty path of segments of `A-Z a-z 0-9 . - _` (no empty, `.` or
/// `..` segment), no query or fragment. Returns the trust domain.
fn parse_spiffe_id(id: &str) -> Result<&str, &'static str> {
    if id.len() > 2048 {
        return Err("is longer than 2048 bytes");
    }
    let rest = id
        .strip_prefix("spiffe://")
        .ok_or("is not a SPIFFE ID (scheme spiffe://)")?;
    let (domain, path) = rest
        .split_once('/')
        .ok_or("has no path: an X.509-SVID names a workload")?;
    check_trust_domain(domain).map_err(|_| "has an invalid trust domain")?;
    for segment in path.split('/') {
        if segment.is_empty() || segment == "." || segment == ".." {
            return Err("has an empty, `.` or `..` path segment");
        }
        if !segment
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
        {
            return Err("has characters outside A-Z, a-z, 0-9, `.`, `-`, `_` in its path");
        }
    }
    Ok(domain)
}

/// What is read from a JWT before its signature is checked: the header's `alg` and `kid`,
/// and the payload's `iss` (used only to pick the issuer configuration).
struct Unverified {
    alg: String,
    kid: Option<String>,
    iss: String,
}

impl Unverified {
    fn parse(token: &str) -> Result<Self, AuthnError> {
        let malformed = |reason: &str| AuthnError::Malformed(reason.to_owned());
        let parts: Vec<&str> = token.split('.').collect();
        let [header, payload, _signature] = parts.as_slice() else {
            return Err(if parts.len() == 5 {
                malformed("it is an encrypted JWT (JWE); send the signed JWT itself")
            } else {
                malformed("a JWT has three `.`-separated parts")
            });
        };
        let decode = |part: &str, what: &str| -> Result<Map<String, Value>, AuthnError> {
            let bytes = URL_SAFE_NO_PAD
                .decode(part)
                .map_err(|_| AuthnError::Malformed(format!("the {what} is not base64url")))?;
            quorate_proto::json::parse_object_unique(&bytes).map_err(|e| {
                AuthnError::Malformed(format!(
                    "the {what} is not a JSON object with unique member names: {e}"
                ))
            })
        };
        let header = decode(header, "header")?;
        let alg = match header.get("alg") {
            Some(Value::String(alg)) => alg.clone(),
            _ => return Err(malformed("the header has no `alg`")),
        };
        // Refused before anything else, so no key is ever used with them.
        if alg.eq_ignore_ascii_case("none") || alg.to_ascii_uppercase().starts_with("HS") {
            return Err(AuthnError::UntrustedAlgorithm {
                alg,
                accepted: list_algorithms(&JwsAlgorithm::ALL),
            });
        }
        if header.contains_key("crit") {
            return Err(malformed(
                "the header has `crit` extensions, which are not supported",
            ));
        }
        let kid = match header.get("kid") {
            None => None,
            Some(Value::String(kid)) => Some(kid.clone()),
            Some(_) => return Err(malformed("the header's `kid` is not a string")),
        };
        let payload = decode(payload, "payload")?;
        check_claim_types(&payload)?;
        let iss = match payload.get("iss") {
            Some(Value::String(iss)) => iss.clone(),
            Some(_) => return Err(malformed("the `iss` claim is not a string")),
            None => return Err(AuthnError::MissingClaim("iss".to_owned())),
        };
        Ok(Self { alg, kid, iss })
    }
}

/// Refuses a payload whose registered claims (RFC 7519 §4.1) have the wrong JSON type:
/// `iat`, `exp`, `nbf` numbers (NumericDate), `iss`, `sub`, `jti` strings, `aud` a string
/// or an array of strings. Absent claims are left to the later checks.
fn check_claim_types(payload: &Map<String, Value>) -> Result<(), AuthnError> {
    const NUMBER: &str = "a JSON number (NumericDate)";
    const STRING: &str = "a JSON string";
    const AUDIENCE: &str = "a JSON string or an array of strings";
    for (claim, expected) in [
        ("iat", NUMBER),
        ("exp", NUMBER),
        ("nbf", NUMBER),
        ("iss", STRING),
        ("sub", STRING),
        ("jti", STRING),
        ("aud", AUDIENCE),
    ] {
        let ok = match payload.get(claim) {
            None => true,
            Some(value) => match expected {
                NUMBER => value.is_number(),
                STRING => value.is_string(),
                _ => match value {
                    Value::String(_) => true,
                    Value::Array(items) => items.iter().all(Value::is_string),
                    _ => false,
                },
            },
        };
        if !ok {
            return Err(AuthnError::WrongClaimType {
                claim: claim.to_owned(),
                expected,
            });
        }
    }
    Ok(())
}

/// Unix seconds now, as a float (NumericDate may have fractions).
fn unix_now_f64() -> f64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

fn map_jwt_error(
    e: &jsonwebtoken::errors::Error,
    issuer: &Issuer,
    key: &Key,
    alg: JwsAlgorithm,
    iss: &str,
) -> AuthnError {
    match e.kind() {
        ErrorKind::ExpiredSignature => AuthnError::Expired,
        ErrorKind::ImmatureSignature => AuthnError::NotYetValid,
        ErrorKind::InvalidAudience => AuthnError::WrongAudience {
            expected: issuer.audiences.clone(),
        },
        // Only if the payload is ambiguous (e.g. `iss` given twice): the issuer was picked
        // by `iss`, so a well-formed token always matches it.
        ErrorKind::InvalidIssuer => AuthnError::UnknownIssuer {
            issuer: iss.to_owned(),
            trusted: vec![issuer.issuer.clone()],
        },
        ErrorKind::InvalidSignature => AuthnError::BadSignature,
        ErrorKind::InvalidAlgorithm => AuthnError::UntrustedAlgorithm {
            alg: alg.as_str().to_owned(),
            accepted: list_algorithms(&issuer.algorithms),
        },
        ErrorKind::MissingRequiredClaim(claim) => AuthnError::MissingClaim(claim.clone()),
        ErrorKind::InvalidClaimFormat(claim) => {
            AuthnError::Malformed(format!("the `{claim}` claim has the wrong type"))
        }
        ErrorKind::InvalidEcdsaKey
        | ErrorKind::InvalidEddsaKey
        | ErrorKind::InvalidRsaKey(_)
        | ErrorKind::InvalidKeyFormat => AuthnError::KeyUnusable {
            kid: key.kid.clone().unwrap_or_else(|| "<none>".to_owned()),
            reason: e.to_string(),
        },
        _ => AuthnError::Malformed(e.to_string()),
    }
}

/// Percent-encodes `s` as one SPIFFE path segment: bytes outside `A-Z a-z 0-9 - . _`
/// become `%XX`. (`.` and `..` alone are encoded too, so no segment is a dot segment.)
fn percent_encode_segment(s: &str) -> String {
    fn hex(n: u8) -> char {
        char::from(if n < 10 { b'0' + n } else { b'A' + (n - 10) })
    }
    if s == "." || s == ".." {
        return "%2E".repeat(s.len());
    }
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_') {
            out.push(char::from(b));
        } else {
            out.push('%');
            out.push(hex(b >> 4));
            out.push(hex(b & 0x0f));
        }
    }
    out
}

/// The claims copied into an [`Attestation`] (see [`Attestation::claims`]).
fn flatten_claims(claims: &Map<String, Value>) -> BTreeMap<String, String> {
    fn walk(
        map: &Map<String, Value>,
        prefix: &str,
        depth: usize,
        out: &mut BTreeMap<String, String>,
    ) {
        for (key, value) in map {
            if out.len() >= MAX_CLAIMS {
                return;
            }
            if depth == 1 && RESERVED_CLAIMS.contains(&key.as_str()) {
                continue;
            }
            let name = if prefix.is_empty() {
                key.clone()
            } else {
                format!("{prefix}.{key}")
            };
            let text = match value {
                Value::String(s) => s.clone(),
                Value::Number(n) => n.to_string(),
                Value::Bool(b) => b.to_string(),
                Value::Object(inner) if depth < MAX_CLAIM_DEPTH => {
                    walk(inner, &name, depth + 1, out);
                    continue;
                }
                _ => continue,
            };
            if text.chars().count() <= MAX_CLAIM_VALUE_LEN && name.len() <= MAX_CLAIM_VALUE_LEN {
                out.insert(name, text);
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(claims, "", 1, &mut out);
    out
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use jsonwebtoken::{EncodingKey, Header};
    use quorate_proto::https::test_server::{TestResponse, TestServer};
    use rcgen::{
        BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer as CaIssuer,
        KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, SanType,
    };
    use serde_json::json;

    use super::*;

    const DOMAIN: &str = "quorate.local";
    const ISS: &str = "https://dev-issuer.quorate.local";
    const SUB: &str = "repo:octo/app:ref:refs/heads/main";

    fn b64(bytes: &[u8]) -> String {
        URL_SAFE_NO_PAD.encode(bytes)
    }

    fn now() -> i64 {
        i64::try_from(jsonwebtoken::get_current_timestamp()).unwrap()
    }

    /// An ES256 issuer key: signing key, JWK, and the public key in the forms an
    /// attacker would use as an HMAC secret.
    struct IssuerKey {
        kid: String,
        encoding: EncodingKey,
        jwk: Value,
        public_pem: String,
        public_raw: Vec<u8>,
    }

    fn es256_key(kid: &str) -> IssuerKey {
        let pair = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let raw = pair.public_key_raw().to_vec();
        assert_eq!((raw.len(), raw[0]), (65, 4), "uncompressed P-256 point");
        IssuerKey {
            kid: kid.to_owned(),
            encoding: EncodingKey::from_ec_der(&pair.serialize_der()),
            jwk: json!({
                "kty": "EC", "crv": "P-256", "use": "sig", "alg": "ES256", "kid": kid,
                "x": b64(&raw[1..33]), "y": b64(&raw[33..65]),
            }),
            public_pem: pair.public_key_pem(),
            public_raw: raw,
        }
    }

    fn jwks(keys: &[&IssuerKey]) -> String {
        json!({ "keys": keys.iter().map(|k| k.jwk.clone()).collect::<Vec<_>>() }).to_string()
    }

    /// Typical GitHub/Kubernetes-like claims, valid now.
    fn claims() -> Value {
        let now = now();
        json!({
            "iss": ISS, "sub": SUB, "aud": "quorate", "exp": now + 300, "iat": now,
            "nbf": now - 10, "jti": "j-1",
            "repository": "octo/app", "run_attempt": 2, "ref_protected": true,
            "kubernetes.io": { "namespace": "agents",
                               "serviceaccount": { "name": "bot", "uid": "u-1" },
                               "deep": { "a": { "b": "too deep" } } },
            "groups": ["a", "b"],
            "long": "x".repeat(MAX_CLAIM_VALUE_LEN + 1),
        })
    }

    fn with(mut claims: Value, key: &str, value: Value) -> Value {
        claims[key] = value;
        claims
    }

    fn sign_as(alg: Algorithm, kid: Option<&str>, claims: &Value, key: &EncodingKey) -> String {
        let mut header = Header::new(alg);
        header.kid = kid.map(str::to_owned);
        jsonwebtoken::encode(&header, claims, key).unwrap()
    }

    fn sign(key: &IssuerKey, claims: &Value) -> String {
        sign_as(Algorithm::ES256, Some(&key.kid), claims, &key.encoding)
    }

    /// A token with a hand-made header and signature.
    fn hand_made(header: &Value, claims: &Value, signature: &[u8]) -> String {
        format!(
            "{}.{}.{}",
            b64(header.to_string().as_bytes()),
            b64(claims.to_string().as_bytes()),
            b64(signature)
        )
    }

    /// A token signed over exactly the given header and payload bytes (duplicate member
    /// names survive, as they would from a hostile or sloppy issuer).
    fn sign_raw(key: &IssuerKey, header: &str, payload: &str) -> String {
        let input = format!("{}.{}", b64(header.as_bytes()), b64(payload.as_bytes()));
        let sig =
            jsonwebtoken::crypto::sign(input.as_bytes(), &key.encoding, Algorithm::ES256).unwrap();
        format!("{input}.{sig}")
    }

    /// The registered claims of [`claims`] as JSON text, valid now, with `extra` (raw JSON
    /// members) appended.
    fn raw_payload(extra: &str) -> String {
        let now = now();
        format!(
            r#"{{"iss":"{ISS}","sub":"agent-1","aud":"quorate","exp":{},"iat":{now},"nbf":{now}{extra}}}"#,
            now + 300
        )
    }

    struct Fixture {
        dir: tempfile::TempDir,
        key: IssuerKey,
        auth: Authenticator,
    }

    /// Issuer `dev` with a JWKS file holding one ES256 key `k1`, plus `extra` entries.
    async fn fixture(extra: Vec<Value>) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let key = es256_key("k1");
        std::fs::write(dir.path().join("jwks.json"), jwks(&[&key])).unwrap();
        let mut oidc = vec![json!({
            "name": "dev", "issuer": ISS, "audiences": ["quorate", "quorate-admin"],
            "jwks_file": "jwks.json",
        })];
        oidc.extend(extra);
        let path = dir.path().join("trust.json");
        std::fs::write(&path, json!({ "oidc": oidc }).to_string()).unwrap();
        let cfg = AuthnConfig::from_file(&path).unwrap();
        let auth = Authenticator::new(cfg, DOMAIN).await.unwrap();
        Fixture { dir, key, auth }
    }

    #[test]
    fn authenticator_is_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<Authenticator>();
        check::<AuthnError>();
    }

    #[tokio::test]
    async fn good_token_gives_attestation() {
        let f = fixture(vec![]).await;
        let exp = claims()["exp"].as_i64().unwrap();
        let a = f.auth.verify_jwt(&sign(&f.key, &claims())).await.unwrap();
        assert_eq!(
            a.subject,
            "spiffe://quorate.local/agent/dev/repo%3Aocto%2Fapp%3Aref%3Arefs%2Fheads%2Fmain"
        );
        assert_eq!(a.issuer, ISS);
        assert_eq!(a.external_subject, SUB);
        assert_eq!(a.method, AuthMethod::Oidc);
        assert_eq!(a.method.to_string(), "oidc");
        assert_eq!(a.expires_at, Some(exp));
        let expected: BTreeMap<String, String> = [
            ("repository", "octo/app"),
            ("run_attempt", "2"),
            ("ref_protected", "true"),
            ("kubernetes.io.namespace", "agents"),
            ("kubernetes.io.serviceaccount.name", "bot"),
            ("kubernetes.io.serviceaccount.uid", "u-1"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        assert_eq!(a.claims, expected);

        // An array audience containing one accepted audience; exp within the leeway.
        let c = with(claims(), "aud", json!(["other", "quorate-admin"]));
        let c = with(c, "exp", json!(now() - 30));
        f.auth.verify_jwt(&sign(&f.key, &c)).await.unwrap();
        // No kid, and the issuer has exactly one usable key.
        let token = sign_as(Algorithm::ES256, None, &claims(), &f.key.encoding);
        f.auth.verify_jwt(&token).await.unwrap();
    }

    #[test]
    fn claims_are_capped() {
        let mut many = Map::new();
        for i in 0..100 {
            many.insert(format!("c{i:03}"), json!(i));
        }
        assert_eq!(flatten_claims(&many).len(), MAX_CLAIMS);
        assert_eq!(percent_encode_segment(".."), "%2E%2E");
        assert_eq!(percent_encode_segment("a b/é"), "a%20b%2F%C3%A9");
    }

    #[tokio::test]
    async fn expired_and_not_yet_valid() {
        let f = fixture(vec![]).await;
        let c = with(claims(), "exp", json!(now() - 120));
        let err = f.auth.verify_jwt(&sign(&f.key, &c)).await.unwrap_err();
        assert!(matches!(err, AuthnError::Expired), "{err}");
        let c = with(claims(), "nbf", json!(now() + 600));
        let err = f.auth.verify_jwt(&sign(&f.key, &c)).await.unwrap_err();
        assert!(matches!(err, AuthnError::NotYetValid), "{err}");
    }

    #[tokio::test]
    async fn wrong_audience() {
        let f = fixture(vec![]).await;
        let c = with(claims(), "aud", json!("someone-else"));
        let err = f.auth.verify_jwt(&sign(&f.key, &c)).await.unwrap_err();
        assert!(matches!(err, AuthnError::WrongAudience { .. }), "{err}");
        assert!(err.to_string().contains("quorate, quorate-admin"), "{err}");
    }

    #[tokio::test]
    async fn unknown_issuer_is_named_with_the_trusted_ones() {
        let f = fixture(vec![]).await;
        let c = with(claims(), "iss", json!("https://evil.example"));
        let err = f.auth.verify_jwt(&sign(&f.key, &c)).await.unwrap_err();
        assert!(matches!(err, AuthnError::UnknownIssuer { .. }), "{err}");
        let text = err.to_string();
        assert!(
            text.contains("https://evil.example") && text.contains(ISS),
            "{text}"
        );

        let empty = Authenticator::empty(DOMAIN);
        assert!(empty.issuers().is_empty());
        let err = empty
            .verify_jwt(&sign(&f.key, &claims()))
            .await
            .unwrap_err();
        assert!(err.to_string().contains("none configured"), "{err}");
    }

    #[tokio::test]
    async fn alg_none_is_refused() {
        let f = fixture(vec![]).await;
        let payload = b64(claims().to_string().as_bytes());
        let token = format!("eyJhbGciOiJub25lIn0.{payload}.");
        let err = f.auth.verify_jwt(&token).await.unwrap_err();
        assert!(
            matches!(err, AuthnError::UntrustedAlgorithm { .. }),
            "{err}"
        );
        let text = err.to_string();
        assert!(
            text.contains("alg none") && text.contains("ES256") && text.contains("RS256"),
            "{text}"
        );
        // Spelling variants too.
        for alg in ["None", "NONE"] {
            let token = hand_made(&json!({ "alg": alg }), &claims(), b"");
            let err = f.auth.verify_jwt(&token).await.unwrap_err();
            assert!(
                matches!(err, AuthnError::UntrustedAlgorithm { .. }),
                "{err}"
            );
        }
    }

    /// The classic alg-confusion attack: HS256 keyed with the issuer's public key.
    #[tokio::test]
    async fn hmac_keyed_with_the_public_key_is_refused() {
        let f = fixture(vec![]).await;
        let secrets = [
            f.key.public_pem.as_bytes().to_vec(),
            f.key.public_raw.clone(),
            f.key.jwk.to_string().into_bytes(),
        ];
        for secret in &secrets {
            for alg in [Algorithm::HS256, Algorithm::HS384, Algorithm::HS512] {
                let key = EncodingKey::from_secret(secret).unwrap();
                let token = sign_as(alg, Some("k1"), &claims(), &key);
                let err = f.auth.verify_jwt(&token).await.unwrap_err();
                assert!(
                    matches!(err, AuthnError::UntrustedAlgorithm { ref alg, .. } if alg.starts_with("HS")),
                    "{err}"
                );
            }
        }
    }

    #[tokio::test]
    async fn another_key_with_the_same_kid_is_a_bad_signature() {
        let f = fixture(vec![]).await;
        let impostor = es256_key("k1");
        let err = f
            .auth
            .verify_jwt(&sign(&impostor, &claims()))
            .await
            .unwrap_err();
        assert!(matches!(err, AuthnError::BadSignature), "{err}");
        // A tampered payload, too.
        let token = sign(&f.key, &claims());
        let mut parts: Vec<&str> = token.split('.').collect();
        let forged = b64(with(claims(), "sub", json!("admin")).to_string().as_bytes());
        parts[1] = &forged;
        let err = f.auth.verify_jwt(&parts.join(".")).await.unwrap_err();
        assert!(matches!(err, AuthnError::BadSignature), "{err}");
    }

    #[tokio::test]
    async fn unknown_kid_is_no_key() {
        let f = fixture(vec![]).await;
        let other = es256_key("k9");
        let err = f
            .auth
            .verify_jwt(&sign(&other, &claims()))
            .await
            .unwrap_err();
        assert!(
            matches!(&err, AuthnError::NoKey { kid, issuer } if kid == "k9" && issuer == "dev"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn algorithms_are_per_issuer() {
        let f = fixture(vec![json!({
            "name": "rs-only", "issuer": "https://rs.example", "audiences": ["quorate"],
            "jwks_file": "jwks.json", "algorithms": ["RS256"],
        })])
        .await;
        let c = with(claims(), "iss", json!("https://rs.example"));
        let err = f.auth.verify_jwt(&sign(&f.key, &c)).await.unwrap_err();
        assert!(
            matches!(err, AuthnError::UntrustedAlgorithm { .. }),
            "{err}"
        );
        assert!(
            err.to_string().contains("RS256 (for issuer rs-only)"),
            "{err}"
        );
        // ES384 is not in the default list.
        let token = hand_made(&json!({ "alg": "ES384", "kid": "k1" }), &claims(), b"sig");
        let err = f.auth.verify_jwt(&token).await.unwrap_err();
        assert!(
            matches!(err, AuthnError::UntrustedAlgorithm { .. }),
            "{err}"
        );
    }

    #[tokio::test]
    async fn key_type_must_match_alg() {
        let f = fixture(vec![json!({
            "name": "ed", "issuer": "https://ed.example", "audiences": ["quorate"],
            "jwks_file": "jwks.json", "algorithms": ["EdDSA", "ES256"],
        })])
        .await;
        let c = with(claims(), "iss", json!("https://ed.example"));
        let token = hand_made(&json!({ "alg": "EdDSA", "kid": "k1" }), &c, &[0; 64]);
        let err = f.auth.verify_jwt(&token).await.unwrap_err();
        assert!(matches!(err, AuthnError::KeyUnusable { .. }), "{err}");
        assert!(err.to_string().contains("P-256"), "{err}");
    }

    #[tokio::test]
    async fn malformed_tokens() {
        let f = fixture(vec![]).await;
        let good = sign(&f.key, &claims());
        let crit = hand_made(
            &json!({ "alg": "ES256", "kid": "k1", "crit": ["b64"] }),
            &claims(),
            b"s",
        );
        for token in [
            "",
            "abc",
            "a.b",
            "a.b.c.d.e",
            "!!.!!.!!",
            &format!("{good}.x"),
            &crit,
            &"a".repeat(MAX_TOKEN_LEN + 1),
        ] {
            let err = f.auth.verify_jwt(token).await.unwrap_err();
            assert!(
                matches!(err, AuthnError::Malformed(_)),
                "{token:.40}: {err}"
            );
        }
        for claim in ["sub", "exp", "aud"] {
            let mut c = claims();
            c.as_object_mut().unwrap().remove(claim);
            let err = f.auth.verify_jwt(&sign(&f.key, &c)).await.unwrap_err();
            assert!(
                matches!(&err, AuthnError::MissingClaim(m) if m == claim),
                "{claim}: {err}"
            );
        }
        let c = with(claims(), "sub", json!(""));
        let err = f.auth.verify_jwt(&sign(&f.key, &c)).await.unwrap_err();
        assert!(matches!(err, AuthnError::Malformed(_)), "{err}");
    }

    #[tokio::test]
    async fn jwks_file_is_reloaded_when_it_changes() {
        let f = fixture(vec![]).await;
        let k2 = es256_key("k2");
        let err = f.auth.verify_jwt(&sign(&k2, &claims())).await.unwrap_err();
        assert!(matches!(err, AuthnError::NoKey { .. }), "{err}");

        // Rotation: k2 replaces k1 (the file's size changes, whatever the mtime clock).
        let with_oct = json!({ "keys": [
            k2.jwk,
            { "kty": "oct", "kid": "k-oct", "k": b64(b"shared secret") },
            { "kty": "EC", "crv": "P-256", "use": "enc", "kid": "k-enc",
              "x": k2.jwk["x"], "y": k2.jwk["y"] },
        ] });
        std::fs::write(f.dir.path().join("jwks.json"), with_oct.to_string()).unwrap();
        f.auth.verify_jwt(&sign(&k2, &claims())).await.unwrap();
        let err = f
            .auth
            .verify_jwt(&sign(&f.key, &claims()))
            .await
            .unwrap_err();
        assert!(matches!(err, AuthnError::NoKey { .. }), "{err}");
        // Symmetric and encryption keys are never used.
        for kid in ["k-oct", "k-enc"] {
            let token = sign_as(Algorithm::ES256, Some(kid), &claims(), &k2.encoding);
            let err = f.auth.verify_jwt(&token).await.unwrap_err();
            assert!(matches!(err, AuthnError::NoKey { .. }), "{kid}: {err}");
        }

        // A broken rewrite keeps the previous keys.
        std::fs::write(f.dir.path().join("jwks.json"), "{ not json").unwrap();
        f.auth.verify_jwt(&sign(&k2, &claims())).await.unwrap();
    }

    // --- configuration -----------------------------------------------------------------

    #[test]
    fn config_example_parses_with_defaults() {
        let text = json!({
            "oidc": [
                { "name": "dev", "issuer": ISS, "audiences": ["quorate"], "jwks_file": "keys/jwks.json" },
                { "name": "github", "issuer": "https://token.actions.githubusercontent.com",
                  "audiences": ["quorate"],
                  "jwks_url": "https://token.actions.githubusercontent.com/.well-known/jwks",
                  "algorithms": ["RS256"], "ca_file": "/etc/extra.pem", "refresh_seconds": 600 },
            ],
            "svid": [ { "trust_domain": "example.org", "bundle_file": "bundle.pem" } ],
        })
        .to_string();
        let cfg = AuthnConfig::from_json(&text, Path::new("/etc/quorate")).unwrap();
        let dev = &cfg.oidc[0];
        assert_eq!(
            dev.jwks,
            JwksSource::File("/etc/quorate/keys/jwks.json".into())
        );
        assert_eq!(dev.algorithms, JwsAlgorithm::DEFAULT);
        assert_eq!(dev.refresh, DEFAULT_REFRESH);
        let gh = &cfg.oidc[1];
        assert_eq!(
            gh.jwks,
            JwksSource::Url("https://token.actions.githubusercontent.com/.well-known/jwks".into())
        );
        assert_eq!(gh.algorithms, [JwsAlgorithm::Rs256]);
        assert_eq!(gh.ca_file.as_deref(), Some(Path::new("/etc/extra.pem")));
        assert_eq!(gh.refresh, Duration::from_secs(600));
        assert_eq!(
            cfg.svid[0].bundle_file,
            Path::new("/etc/quorate/bundle.pem")
        );
    }

    #[test]
    fn config_reports_every_problem() {
        let text = json!({
            "oidc": [
                { "name": "Dev!", "issuer": ISS, "audiences": [], "jwks_file": "a", "jwks_url": "https://x/" },
                { "name": "dup", "issuer": ISS, "audiences": ["q"], "jwks_url": "http://x/",
                  "algorithms": ["HS256", "none", "ES256"], "refresh_seconds": 5 },
                { "name": "dup", "issuer": "https://other", "audiences": ["q"], "jwks_file": "f",
                  "ca_file": "c.pem", "colour": "blue" },
                { "issuer": "https://third" },
            ],
            "svid": [ { "trust_domain": "Bad Domain" }, "x" ],
            "extra": 1,
        })
        .to_string();
        let errors = AuthnConfig::from_json(&text, Path::new("/")).unwrap_err();
        let all = errors.join("\n");
        for needle in [
            "audiences must list at least one",
            "exactly one of `jwks_file` and `jwks_url`",
            "the scheme must be https://",
            "`HS256` is not accepted (unsigned and symmetric",
            "`none` is not accepted",
            "refresh_seconds must be between 30 and 86400",
            "unknown field `colour`",
            "ca_file applies only to jwks_url",
            "`name` is required",
            "`audiences` is required",
            "one of `jwks_file` and `jwks_url` is required",
            "unknown field `extra`",
            "`bundle_file` is required",
            "svid[1]: must be an object",
            "trust_domain `Bad Domain` must be",
        ] {
            assert!(all.contains(needle), "missing `{needle}` in:\n{all}");
        }
        // Value errors and duplicates across entries, together.
        let text = json!({ "oidc": [
            { "name": "Dev!", "issuer": "https://x", "audiences": ["q"], "jwks_file": "a" },
            { "name": "ok", "issuer": ISS, "audiences": ["q"], "jwks_file": "a" },
            { "name": "ok", "issuer": ISS, "audiences": ["q"], "jwks_file": "a" },
        ], "svid": [
            { "trust_domain": "Bad Domain", "bundle_file": "b" },
            { "trust_domain": "example.org", "bundle_file": "b" },
            { "trust_domain": "example.org", "bundle_file": "c" },
        ] })
        .to_string();
        let all = AuthnConfig::from_json(&text, Path::new("/"))
            .unwrap_err()
            .join("\n");
        for needle in [
            "oidc[0] (Dev!): name `Dev!` must be 1 to 32",
            "the name `ok` is used twice",
            "the issuer `https://dev-issuer.quorate.local` is configured twice",
            "svid[0]: trust_domain `Bad Domain`",
            "the trust domain `example.org` is configured twice",
        ] {
            assert!(all.contains(needle), "missing `{needle}` in:\n{all}");
        }
        assert!(
            AuthnConfig::from_file("/nonexistent/trust.json").unwrap_err()[0]
                .contains("/nonexistent/trust.json")
        );
    }

    #[tokio::test]
    async fn new_reports_unloadable_files_and_the_own_domain() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("empty.json"), r#"{"keys":[]}"#).unwrap();
        let text = json!({
            "oidc": [
                { "name": "a", "issuer": "https://a", "audiences": ["q"], "jwks_file": "missing.json" },
                { "name": "b", "issuer": "https://b", "audiences": ["q"], "jwks_file": "empty.json" },
            ],
            "svid": [
                { "trust_domain": DOMAIN, "bundle_file": "missing.pem" },
                { "trust_domain": "example.org", "bundle_file": "missing.pem" },
            ],
        })
        .to_string();
        let cfg = AuthnConfig::from_json(&text, dir.path()).unwrap();
        let err = Authenticator::new(cfg, DOMAIN).await.unwrap_err();
        for needle in [
            "missing.json",
            "no usable public signing key",
            "cluster's own trust domain",
            "cannot read bundle_file",
        ] {
            assert!(err.contains(needle), "missing `{needle}` in:\n{err}");
        }
        assert!(
            Authenticator::new(AuthnConfig::default(), "Not A Domain")
                .await
                .is_err()
        );
    }

    #[tokio::test]
    async fn duplicate_member_names_are_refused_anywhere() {
        let f = fixture(vec![]).await;
        let header = r#"{"alg":"ES256","kid":"k1"}"#;
        // The baseline is accepted, so each refusal below is about its duplicate.
        let ok = f
            .auth
            .verify_jwt(&sign_raw(&f.key, header, &raw_payload(r#","team":"a""#)))
            .await
            .unwrap();
        assert_eq!(ok.claims["team"], "a");
        for (header, payload, name) in [
            // Today's attack: the last value would become the Cedar tag.
            (
                header.to_owned(),
                raw_payload(r#","team":"a","team":"admin""#),
                "team",
            ),
            (
                header.to_owned(),
                raw_payload(r#","org":{"team":"a","team":"admin"}"#),
                "team",
            ),
            (
                header.to_owned(),
                raw_payload(r#","list":[{"k":1,"k":2}]"#),
                "k",
            ),
            (header.to_owned(), raw_payload(r#","sub":"agent-2""#), "sub"),
            (
                r#"{"alg":"ES256","kid":"k1","kid":"k2"}"#.to_owned(),
                raw_payload(""),
                "kid",
            ),
        ] {
            let e = f
                .auth
                .verify_jwt(&sign_raw(&f.key, &header, &payload))
                .await
                .unwrap_err();
            assert!(matches!(e, AuthnError::Malformed(_)), "{payload}: {e}");
            let msg = e.to_string();
            assert!(
                msg.contains(&format!("member \"{name}\" appears twice")),
                "{payload}: {msg}"
            );
        }
    }

    #[tokio::test]
    async fn registered_claims_must_have_their_types() {
        let f = fixture(vec![]).await;
        let now = now();
        let cases = [
            ("iat", json!(now.to_string()), "a JSON number"),
            ("exp", json!((now + 300).to_string()), "a JSON number"),
            ("nbf", json!(true), "a JSON number"),
            ("iss", json!([ISS]), "a JSON string"),
            ("sub", json!(7), "a JSON string"),
            ("jti", json!({"id": "x"}), "a JSON string"),
            (
                "aud",
                json!(["quorate", 1]),
                "a JSON string or an array of strings",
            ),
            ("aud", json!(null), "a JSON string or an array of strings"),
        ];
        for (claim, value, expected) in cases {
            let token = sign(&f.key, &with(claims(), claim, value.clone()));
            let e = f.auth.verify_jwt(&token).await.unwrap_err();
            let msg = e.to_string();
            assert!(
                matches!(&e, AuthnError::WrongClaimType { claim: c, .. } if c == claim),
                "{claim}={value}: {msg}"
            );
            assert!(
                msg.contains(&format!("claim `{claim}` must be {expected}")),
                "{claim}={value}: {msg}"
            );
        }
        // The right types pass: fractional NumericDates, `aud` as an array, no `jti`.
        let mut c = with(claims(), "iat", json!(now as f64 + 0.5));
        c = with(c, "aud", json!(["other", "quorate"]));
        c.as_object_mut().unwrap().remove("jti");
        f.auth.verify_jwt(&sign(&f.key, &c)).await.unwrap();
    }

    #[tokio::test]
    async fn iat_in_the_future_is_refused_beyond_the_leeway() {
        let f = fixture(vec![]).await;
        let now = now();
        let leeway = i64::try_from(LEEWAY_SECONDS).unwrap();
        for iat in [now + 3600, now + leeway + 5] {
            let c = with(claims(), "iat", json!(iat));
            let e = f.auth.verify_jwt(&sign(&f.key, &c)).await.unwrap_err();
            assert!(matches!(e, AuthnError::IssuedInFuture), "{iat}: {e}");
            assert!(e.to_string().contains("iat is more than 60 s ahead"), "{e}");
        }
        // Within the leeway (clock skew) is fine.
        let c = with(claims(), "iat", json!(now + leeway - 5));
        f.auth.verify_jwt(&sign(&f.key, &c)).await.unwrap();
    }

    // --- X.509-SVID --------------------------------------------------------------------

    struct Ca {
        pem: String,
        issuer: CaIssuer<'static, KeyPair>,
    }

    fn ca() -> Ca {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let cert = params.self_signed(&key).unwrap();
        Ca {
            pem: cert.pem(),
            issuer: CaIssuer::new(params, key),
        }
    }

    fn svid(ca: &Ca, uris: &[&str]) -> CertificateDer<'static> {
        svid_with(ca, uris, vec![KeyUsagePurpose::DigitalSignature])
    }

    /// An SVID with the given key usages (none: no keyUsage extension at all).
    fn svid_with(ca: &Ca, uris: &[&str], usages: Vec<KeyUsagePurpose>) -> CertificateDer<'static> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.subject_alt_names = uris
            .iter()
            .map(|u| SanType::URI((*u).try_into().unwrap()))
            .collect();
        params.key_usages = usages;
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.signed_by(&key, &ca.issuer).unwrap().der().clone()
    }

    #[tokio::test]
    async fn svid_leaf_key_usage_follows_the_profile() {
        let ca = ca();
        let (_dir, auth) = svid_authenticator(&ca).await;
        let id = ["spiffe://example.org/agent/a"];
        use KeyUsagePurpose::*;
        let cases = [
            (vec![KeyCertSign], "keyUsage asserts keyCertSign"),
            (vec![DigitalSignature, CrlSign], "keyUsage asserts cRLSign"),
            (
                vec![KeyEncipherment, KeyAgreement],
                "keyUsage lacks digitalSignature (it asserts Key Encipherment, Key Agreement)",
            ),
            (vec![], "has no keyUsage extension"),
        ];
        for (usages, needle) in cases {
            let err = auth
                .verify_svid(&[svid_with(&ca, &id, usages.clone())])
                .unwrap_err();
            assert!(matches!(err, AuthnError::Svid(_)), "{err}");
            assert!(
                err.to_string().contains(needle),
                "{usages:?}: `{needle}` not in {err}"
            );
            assert!(err.to_string().contains(id[0]), "{err}");
        }
        // digitalSignature with other usages that do not sign certificates is fine.
        auth.verify_svid(&[svid_with(&ca, &id, vec![DigitalSignature, KeyAgreement])])
            .unwrap();
    }

    #[tokio::test]
    async fn svid_leaf_must_not_be_a_ca() {
        let ca = ca();
        let (_dir, auth) = svid_authenticator(&ca).await;
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.subject_alt_names = vec![SanType::URI(
            "spiffe://example.org/agent/a".try_into().unwrap(),
        )];
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let leaf = params.signed_by(&key, &ca.issuer).unwrap().der().clone();
        let err = auth.verify_svid(&[leaf]).unwrap_err();
        assert!(err.to_string().contains("is a CA certificate"), "{err}");
    }

    async fn svid_authenticator(ca: &Ca) -> (tempfile::TempDir, Authenticator) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("bundle.pem"), &ca.pem).unwrap();
        let text =
            json!({ "svid": [ { "trust_domain": "example.org", "bundle_file": "bundle.pem" } ] })
                .to_string();
        let cfg = AuthnConfig::from_json(&text, dir.path()).unwrap();
        let auth = Authenticator::new(cfg, DOMAIN).await.unwrap();
        (dir, auth)
    }

    #[tokio::test]
    async fn svid_from_trusted_domain_is_accepted() {
        let ca = ca();
        let (_dir, auth) = svid_authenticator(&ca).await;
        assert_eq!(auth.issuers(), ["spiffe://example.org"]);
        let a = auth
            .verify_svid(&[svid(&ca, &["spiffe://example.org/agent/a"])])
            .unwrap();
        assert_eq!(a.subject, "spiffe://example.org/agent/a");
        assert_eq!(a.external_subject, a.subject);
        assert_eq!(a.issuer, "spiffe://example.org");
        assert_eq!(a.method, AuthMethod::X509Svid);
        assert_eq!(a.method.to_string(), "x509-svid");
        assert!(a.expires_at.unwrap() > now());
        assert!(a.claims.is_empty());
    }

    #[tokio::test]
    async fn svid_refusals() {
        let ca = ca();
        let (_dir, auth) = svid_authenticator(&ca).await;
        let other_ca = self::ca();
        let cases: [(Vec<CertificateDer<'static>>, &str); 7] = [
            (
                vec![svid(&other_ca, &["spiffe://example.org/agent/a"])],
                "does not verify",
            ),
            (
                vec![svid(&ca, &["spiffe://quorate.local/client/admin"])],
                "cluster's own trust domain",
            ),
            (
                vec![svid(&other_ca, &["spiffe://quorate.local/coordinator"])],
                "cluster's own trust domain",
            ),
            (
                vec![svid(&ca, &["spiffe://elsewhere.org/agent/a"])],
                "`elsewhere.org` of",
            ),
            (
                vec![svid(
                    &ca,
                    &["spiffe://example.org/a", "spiffe://example.org/b"],
                )],
                "2 URI SANs",
            ),
            (vec![svid(&ca, &["spiffe://example.org/a/../b"])], "`..`"),
            (vec![], "no certificate"),
        ];
        for (chain, needle) in cases {
            let err = auth.verify_svid(&chain).unwrap_err();
            assert!(matches!(err, AuthnError::Svid(_)), "{err}");
            assert!(err.to_string().contains(needle), "`{needle}` not in {err}");
        }
        let err = auth.verify_svid(&[svid(&ca, &[])]).unwrap_err();
        assert!(err.to_string().contains("no SPIFFE ID"), "{err}");
    }

    // --- JWKS over HTTPS -----------------------------------------------------------------

    #[tokio::test]
    async fn jwks_url_is_fetched_cached_and_refreshed_for_unknown_kids() {
        let k1 = es256_key("k1");
        let k2 = es256_key("k2");
        let k3 = es256_key("k3");
        let served = Arc::new(Mutex::new(jwks(&[&k1])));
        let hits = Arc::new(AtomicUsize::new(0));
        let (served2, hits2) = (Arc::clone(&served), Arc::clone(&hits));
        let server = TestServer::start(Arc::new(move |req| {
            if req.path == "/jwks" {
                hits2.fetch_add(1, Ordering::SeqCst);
                TestResponse::json(served2.lock().unwrap().clone())
            } else {
                TestResponse::text(404, "not found")
            }
        }))
        .await
        .unwrap();
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("ca.pem"), server.ca_pem()).unwrap();
        let config = |path: &str| {
            let text = json!({ "oidc": [ {
                "name": "remote", "issuer": ISS, "audiences": ["quorate"],
                "jwks_url": server.url(path), "ca_file": "ca.pem",
            } ] })
            .to_string();
            AuthnConfig::from_json(&text, dir.path()).unwrap()
        };
        let hits_now = || hits.load(Ordering::SeqCst);

        // No refetch limit: every unknown kid refreshes.
        let auth = Authenticator::build(config("/jwks"), DOMAIN, Duration::ZERO).unwrap();
        assert_eq!(hits_now(), 0, "fetched lazily");
        auth.verify_jwt(&sign(&k1, &claims())).await.unwrap();
        assert_eq!(hits_now(), 1);
        auth.verify_jwt(&sign(&k1, &claims())).await.unwrap();
        assert_eq!(hits_now(), 1, "cached");
        *served.lock().unwrap() = jwks(&[&k1, &k2]);
        let a = auth.verify_jwt(&sign(&k2, &claims())).await.unwrap();
        assert_eq!(
            a.subject,
            format!(
                "spiffe://{DOMAIN}/agent/remote/{}",
                percent_encode_segment(SUB)
            )
        );
        assert_eq!(hits_now(), 2, "refreshed for the unknown kid k2");
        let err = auth.verify_jwt(&sign(&k3, &claims())).await.unwrap_err();
        assert!(matches!(err, AuthnError::NoKey { .. }), "{err}");
        assert_eq!(hits_now(), 3);

        // The default limit: one fetch per 30 s, so an unknown kid right after the first
        // fetch does not reach the server.
        let auth = Authenticator::new(config("/jwks"), DOMAIN).await.unwrap();
        auth.verify_jwt(&sign(&k1, &claims())).await.unwrap();
        assert_eq!(hits_now(), 4);
        for _ in 0..3 {
            let err = auth.verify_jwt(&sign(&k3, &claims())).await.unwrap_err();
            assert!(matches!(err, AuthnError::NoKey { .. }), "{err}");
        }
        assert_eq!(hits_now(), 4, "rate-limited");

        // An endpoint that fails: JwksUnavailable, naming the issuer and the status.
        let auth = Authenticator::new(config("/missing"), DOMAIN)
            .await
            .unwrap();
        let err = auth.verify_jwt(&sign(&k1, &claims())).await.unwrap_err();
        assert!(matches!(err, AuthnError::JwksUnavailable(_)), "{err}");
        assert!(
            err.to_string().contains("remote") && err.to_string().contains("404"),
            "{err}"
        );
    }
}
