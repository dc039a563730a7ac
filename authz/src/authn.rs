//! Agent authentication (DESIGN.md §7, "Authenticate"): turn what an agent already holds —
//! an OIDC JWT from a trusted issuer, a JWT-SVID of a trusted SPIFFE trust domain, a
//! registered client's `private_key_jwt` assertion, or an X.509-SVID client certificate —
//! into an [`Attestation`] naming the agent.
//!
//! # Trust configuration
//!
//! [`AuthnConfig::from_file`] reads the JSON file given with `--trust-config` (a fragment
//! node reads the same format from its ceiling's `trust_config`):
//!
//! ```json
//! { "oidc": [ { "name": "dev", "issuer": "https://dev-issuer.quorate.local",
//!               "audiences": ["quorate"], "jwks_file": "jwks.json" },
//!             { "name": "github", "issuer": "https://token.actions.githubusercontent.com",
//!               "audiences": ["quorate"],
//!               "jwks_url": "https://token.actions.githubusercontent.com/.well-known/jwks",
//!               "algorithms": ["RS256"], "ca_file": "extra-root.pem", "refresh_seconds": 300 } ],
//!   "svid": [ { "trust_domain": "example.org", "bundle_file": "bundle.pem",
//!               "jwt_bundle_file": "example.org.spiffe.json", "audiences": ["quorate"] },
//!             { "trust_domain": "prod.example.com",
//!               "jwt_bundle_url": "https://spire.prod.example.com/bundle",
//!               "audiences": ["quorate"], "ca_file": "spire-root.pem" } ],
//!   "clients": [ { "client_id": "billing-bot", "jwks_file": "billing-bot.jwks.json" },
//!                { "client_id": "ci.deployer", "jwks_url": "https://ci.example/jwks",
//!                  "algorithms": ["ES256"] } ] }
//! ```
//!
//! - `oidc`: trusted OIDC issuers.
//!   - `name`: `[a-z0-9-]{1,32}`, unique; it becomes part of the agent's SPIFFE ID.
//!   - `issuer`: the exact `iss` of the issuer's tokens, unique, and no client's
//!     `client_id`.
//!   - `audiences`: non-empty; a token's `aud` must contain one of them.
//!   - exactly one of `jwks_file` (re-read whenever its modification time or size
//!     changes) and `jwks_url` (`https://`, fetched on first use with
//!     [`quorate_proto::https`], cached, refreshed after `refresh_seconds` — default 300,
//!     30 to 86400 — and when a token names an unknown `kid`, at most once per 30 s).
//!   - `algorithms`: default `["ES256", "RS256"]`; allowed values `ES256`, `ES384`,
//!     `RS256`, `PS256`, `EdDSA`. Symmetric (`HS*`) and `none` are never accepted.
//!   - `ca_file` (only with `jwks_url`): an extra trusted root (PEM) for the JWKS
//!     endpoint, added to the system roots.
//! - `svid`: trusted SPIFFE trust domains (`trust_domain`: `a-z 0-9 . - _`, unique), each
//!   with at least one of:
//!   - `bundle_file`: its X.509 bundle (CA certificates, PEM): its X.509-SVIDs are
//!     accepted on the agent listener;
//!   - `jwt_bundle_file` or `jwt_bundle_url` (exactly one): its SPIFFE bundle (SPIFFE
//!     Trust Domain and Bundle §4), a JWKS whose JWT authorities carry `"use":
//!     "jwt-svid"`, with optional integer `spiffe_sequence` and `spiffe_refresh_hint`
//!     members: its JWT-SVIDs are accepted. Keys with `"use": "x509-svid"` never verify a
//!     JWT, and keys of any other or no `use` are ignored (§4.2.2), so a plain JWKS
//!     (`"use": "sig"`) is no SPIFFE bundle. The file is re-read and the URL fetched and
//!     cached exactly as `jwks_file` / `jwks_url`, with `ca_file` and `refresh_seconds`;
//!     a bundle's `spiffe_refresh_hint` shortens the refresh period (never below 30 s).
//!     With a JWT bundle, `audiences` is required (JWT-SVID §3.2: the `aud` of a
//!     JWT-SVID must name this service) and `algorithms` is as for OIDC, except that
//!     `EdDSA` is refused (JWT-SVID §2.1 allows RS*, ES* and PS* only).
//!
//!   The cluster's own trust domain is refused: those are Quorate's identities.
//! - `clients`: registered OAuth clients that authenticate with `private_key_jwt`
//!   (RFC 7523 §2.2, §3; OpenID Connect Core §9): `client_id` (`[A-Za-z0-9._-]{1,64}`,
//!   not `.` or `..`, unique) and its public keys as `jwks_file` or `jwks_url`, with
//!   `algorithms`, `ca_file` and `refresh_seconds` as for OIDC. Which `aud` a client
//!   assertion must carry is not configured here but by the process that verifies it:
//!   [`Authenticator::with_client_assertion_audiences`] (the coordinator and every node
//!   use [`client_assertion_audiences_for`] their issuer URLs: `I` and `I/token`).
//!   Without those audiences every client assertion is refused, saying so.
//!
//! Relative paths resolve against the directory of the configuration file. Unknown
//! fields are errors, and every problem is reported at once.
//!
//! # JWT verification order
//!
//! [`Authenticator::verify_jwt`] checks, in this order:
//!
//! 1. Size and shape: three base64url segments (JWE and `crit` refused); header and
//!    payload are JSON objects in which no object, nested ones included, names a member
//!    twice ([`quorate_proto::json::parse_object_unique`]: parsers differ on which
//!    duplicate wins, and a duplicated claim would otherwise become a policy tag with the
//!    last value); registered claims have their RFC 7519 types — `iat`, `exp`, `nbf`
//!    JSON numbers, `iss`, `sub`, `jti` strings, `aud` a string or an array of strings.
//! 2. The header's `alg`: `none` and `HS*` are refused **before any key is looked at**
//!    and before the token is routed anywhere, so the classic confusion attack (an HMAC
//!    keyed with a public key) cannot work. Header keys (`jwk`, `jku`, `x5c`, `x5u`) are
//!    ignored: keys come only from the configured JWKS and bundles.
//! 3. The route: the unverified `iss` and `sub` — nothing else of the unverified payload
//!    is read — pick the verifier, first match wins:
//!    1. `iss` is a configured OIDC issuer: an **OIDC JWT**;
//!    2. `iss` is a registered `client_id`: a **client assertion**, whose `sub` must be
//!       that same `client_id` (else it is refused, naming both);
//!    3. `sub` is a `spiffe://` ID: a **JWT-SVID** of its trust domain, refused if the ID
//!       is malformed, in the cluster's own trust domain, or of a trust domain without
//!       a JWT bundle;
//!    4. otherwise [`AuthnError::UnknownIssuer`], naming the trusted OIDC issuers,
//!       JWT-SVID trust domains and clients (or [`AuthnError::MissingClaim`] `iss` for a
//!       token with neither `iss` nor a SPIFFE ID `sub`).
//!
//!    A JWT-SVID whose header has a `typ` must say `JWT` or `JOSE` (JWT-SVID §2.3).
//!    `alg` must be in that issuer's, trust domain's or client's list. A client
//!    assertion is refused here if this authenticator has no client-assertion audience.
//! 4. The key, from that issuer's, trust domain's or client's keys only: by `kid` (or,
//!    without `kid`, the only key usable with `alg`); its type and curve must match
//!    `alg`, its `alg` (if given) must equal the header's, and its `use` must be `sig` or
//!    absent (OIDC, clients) or `jwt-svid` (a SPIFFE bundle; a `kid` naming an
//!    `x509-svid` key is refused by name).
//! 5. jsonwebtoken verifies the signature with `Validation` pinned to that one `alg`,
//!    then, with 60 s of leeway for `exp` and `nbf`:
//!    - OIDC: `exp`, `iss`, `aud` (the issuer's `audiences`), `sub` required;
//!    - JWT-SVID: `exp`, `aud` (the trust domain's `audiences`), `sub` required; `iss`
//!      optional and not checked;
//!    - client assertion: `exp`, `aud` (the client-assertion audiences), `iss` = `sub` =
//!      the `client_id`.
//! 6. `iat`, if present, is not more than the leeway in the future. A client assertion
//!    also needs a non-empty `jti`, and a lifetime — `exp` minus `iat`, or minus now
//!    without `iat` — of at most [`MAX_CLIENT_ASSERTION_LIFETIME_SECONDS`] (300 s).
//!
//! The agent it names ([`Attestation`]): for OIDC
//! `spiffe://<domain>/agent/<issuer name>/<percent-encoded sub>`; for a JWT-SVID its
//! SPIFFE ID (issuer `spiffe://<trust domain>`); for a client assertion
//! `spiffe://<domain>/client/<client_id>` (issuer and external subject: the
//! `client_id`). [`Attestation::jti`] carries the `jti` so that the caller can refuse a
//! second use of a client assertion (the coordinator does; fragment nodes, which see one
//! assertion once per signature, cannot); [`Attestation::presented`] carries the JWT
//! for fragment nodes to verify again (DESIGN.md §9).
//!
//! # X.509-SVID verification
//!
//! [`Authenticator::verify_svid`] checks the leaf against the X.509-SVID profile (SPIFFE
//! X.509-SVID §4, §5.2) before its chain: exactly one `spiffe://` URI SAN naming a
//! workload in a trust domain with a `bundle_file` (never the cluster's own), not a CA
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

/// Where signing keys come from: an OIDC issuer's JWKS, a trust domain's SPIFFE bundle, or
/// a registered client's JWKS.
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

/// How the JWT-SVIDs of a trust domain are verified (SPIFFE JWT-SVID; the bundle is a
/// SPIFFE bundle, SPIFFE Trust Domain and Bundle §4).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JwtSvidConfig {
    /// The trust domain's SPIFFE bundle: a JWKS whose JWT authorities carry
    /// `"use": "jwt-svid"`.
    pub bundle: JwksSource,
    /// Accepted audiences (a JWT-SVID's `aud` must contain one; JWT-SVID §3.2).
    pub audiences: Vec<String>,
    /// Accepted algorithms (never `EdDSA`, which JWT-SVID §2.1 does not allow).
    pub algorithms: Vec<JwsAlgorithm>,
    /// Extra trusted root (PEM) for a [`JwksSource::Url`].
    pub ca_file: Option<PathBuf>,
    /// Refresh period of a [`JwksSource::Url`] (shortened to the bundle's
    /// `spiffe_refresh_hint`, never below [`MIN_REFETCH`]).
    pub refresh: Duration,
}

/// A trusted SPIFFE trust domain: its X.509-SVIDs, its JWT-SVIDs, or both.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SvidTrustConfig {
    /// The trust domain, e.g. `example.org`.
    pub trust_domain: String,
    /// Its X.509 bundle (CA certificates, PEM), if its X.509-SVIDs are accepted.
    pub bundle_file: Option<PathBuf>,
    /// How its JWT-SVIDs are verified, if they are accepted.
    pub jwt: Option<JwtSvidConfig>,
}

/// A registered OAuth client that authenticates with `private_key_jwt` (RFC 7523 §2.2,
/// §3; OpenID Connect Core §9): a JWT it signs itself, with `iss` = `sub` = its id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegisteredClientConfig {
    /// The client id, `[A-Za-z0-9._-]{1,64}` (not `.` or `..`).
    pub client_id: String,
    /// Where its public keys come from.
    pub jwks: JwksSource,
    /// Accepted algorithms.
    pub algorithms: Vec<JwsAlgorithm>,
    /// Extra trusted root (PEM) for a [`JwksSource::Url`].
    pub ca_file: Option<PathBuf>,
    /// Refresh period of a [`JwksSource::Url`].
    pub refresh: Duration,
}

/// The trust configuration (`--trust-config FILE`); see the [module docs](self).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuthnConfig {
    /// Trusted OIDC issuers.
    pub oidc: Vec<OidcIssuerConfig>,
    /// Trusted SPIFFE trust domains.
    pub svid: Vec<SvidTrustConfig>,
    /// Registered clients authenticating with `private_key_jwt`.
    pub clients: Vec<RegisteredClientConfig>,
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
                "the trust configuration must be a JSON object with `oidc`, `svid` and/or `clients` arrays"
                    .to_owned(),
            ]);
        };
        unknown_fields(
            root,
            &["oidc", "svid", "clients"],
            "the top level",
            &mut errors,
        );
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
        for (i, entry) in array_field(root, "clients", &mut errors).iter().enumerate() {
            if let Some(client) = parse_client(i, entry, base_dir, &mut errors) {
                config.clients.push(client);
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
    /// uniqueness of names, issuers, trust domains and client ids. Files are not opened
    /// here.
    pub fn problems(&self) -> Vec<String> {
        let mut errors = Vec::new();
        for (i, c) in self.oidc.iter().enumerate() {
            let fields = OidcFields {
                name: Some(&c.name),
                issuer: Some(&c.issuer),
                audiences: Some(&c.audiences),
                keys: KeyFields {
                    names: OIDC_KEY_NAMES,
                    source: Some(&c.jwks),
                    algorithms: &c.algorithms,
                    ca_file: c.ca_file.is_some(),
                    refresh: c.refresh,
                },
            };
            errors.extend(fields.problems(&format!("oidc[{i}] ({})", c.name)));
        }
        for (i, s) in self.svid.iter().enumerate() {
            let at = format!("svid[{i}]");
            if let Err(e) = check_trust_domain(&s.trust_domain) {
                errors.push(format!("{at}: trust_domain `{}` {e}", s.trust_domain));
            }
            if s.bundle_file.is_none() && s.jwt.is_none() {
                errors.push(format!("{at}: {SVID_NEEDS_A_BUNDLE}"));
            }
            if let Some(jwt) = &s.jwt {
                errors.extend(audience_problems(&at, Some(&jwt.audiences)));
                errors.extend(jwt_svid_algorithm_problems(&at, &jwt.algorithms));
                let keys = KeyFields {
                    names: JWT_BUNDLE_KEY_NAMES,
                    source: Some(&jwt.bundle),
                    algorithms: &jwt.algorithms,
                    ca_file: jwt.ca_file.is_some(),
                    refresh: jwt.refresh,
                };
                errors.extend(keys.problems(&at));
            }
        }
        for (i, c) in self.clients.iter().enumerate() {
            let at = format!("clients[{i}]");
            if let Err(e) = check_client_id(&c.client_id) {
                errors.push(format!("{at}: client_id `{}` {e}", c.client_id));
            }
            let keys = KeyFields {
                names: OIDC_KEY_NAMES,
                source: Some(&c.jwks),
                algorithms: &c.algorithms,
                ca_file: c.ca_file.is_some(),
                refresh: c.refresh,
            };
            errors.extend(keys.problems(&format!("{at} ({})", c.client_id)));
        }
        errors.extend(self.duplicates());
        errors
    }

    /// Names, issuers, trust domains and client ids given twice, and OIDC issuers that
    /// are also client ids (dispatch by `iss` would be ambiguous).
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
        let mut ids = BTreeSet::new();
        for c in &self.clients {
            if !ids.insert(c.client_id.as_str()) {
                errors.push(format!(
                    "clients: the client_id `{}` is registered twice",
                    c.client_id
                ));
            }
            if issuers.contains(c.client_id.as_str()) {
                errors.push(format!(
                    "clients: the client_id `{}` is also the issuer of an oidc entry; a token's `iss` must name one or the other",
                    c.client_id
                ));
            }
        }
        errors
    }
}

/// What an `svid` entry without any bundle is told.
const SVID_NEEDS_A_BUNDLE: &str = "give at least one of `bundle_file` (X.509-SVIDs) and `jwt_bundle_file` / `jwt_bundle_url` (JWT-SVIDs)";

/// The JSON field names of a key source, for parsing and messages.
#[derive(Clone, Copy)]
struct KeySourceNames {
    file: &'static str,
    url: &'static str,
}

const OIDC_KEY_NAMES: KeySourceNames = KeySourceNames {
    file: "jwks_file",
    url: "jwks_url",
};

const JWT_BUNDLE_KEY_NAMES: KeySourceNames = KeySourceNames {
    file: "jwt_bundle_file",
    url: "jwt_bundle_url",
};

/// The fields of a key source that are present (`oidc`, `svid` JWT bundles, `clients`),
/// checked alike whether complete ([`AuthnConfig::problems`]) or not (while parsing).
struct KeyFields<'a> {
    names: KeySourceNames,
    source: Option<&'a JwksSource>,
    algorithms: &'a [JwsAlgorithm],
    ca_file: bool,
    refresh: Duration,
}

impl KeyFields<'_> {
    fn problems(&self, at: &str) -> Vec<String> {
        let mut errors = Vec::new();
        if self.algorithms.is_empty() {
            errors.push(format!(
                "{at}: algorithms must list at least one algorithm (omit it for the default ES256, RS256)"
            ));
        }
        match self.source {
            Some(JwksSource::Url(url)) => {
                if let Err(e) = https::check_url(url) {
                    errors.push(format!("{at}: {}: {e}", self.names.url));
                }
            }
            Some(JwksSource::File(_)) if self.ca_file => errors.push(format!(
                "{at}: ca_file applies only to {} (a {} needs no TLS)",
                self.names.url, self.names.file
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

/// The fields of an OIDC entry that are present, for checking entries that are complete
/// ([`AuthnConfig::problems`]) and entries that are not (while parsing), alike.
struct OidcFields<'a> {
    name: Option<&'a str>,
    issuer: Option<&'a str>,
    audiences: Option<&'a [String]>,
    keys: KeyFields<'a>,
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
        errors.extend(audience_problems(at, self.audiences));
        errors.extend(self.keys.problems(at));
        errors
    }
}

fn audience_problems(at: &str, audiences: Option<&[String]>) -> Vec<String> {
    let mut errors = Vec::new();
    if let Some(audiences) = audiences {
        if audiences.is_empty() {
            errors.push(format!("{at}: audiences must list at least one audience"));
        }
        if audiences.iter().any(String::is_empty) {
            errors.push(format!("{at}: an audience must not be empty"));
        }
    }
    errors
}

/// JWT-SVID §2.1 allows RS*, ES* and PS* only: EdDSA is refused by name.
fn jwt_svid_algorithm_problems(at: &str, algorithms: &[JwsAlgorithm]) -> Vec<String> {
    if algorithms.contains(&JwsAlgorithm::EdDsa) {
        vec![format!(
            "{at}: algorithm `EdDSA` is not a JWT-SVID algorithm (SPIFFE JWT-SVID §2.1 allows RS*, ES* and PS*); use ES256, ES384, RS256 or PS256"
        )]
    } else {
        Vec::new()
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

/// A key source as parsed from an entry: every field that is present, each error
/// reported once. Whether the source itself is required is the caller's question.
struct ParsedKeys {
    source: Option<JwksSource>,
    algorithms: Vec<JwsAlgorithm>,
    ca_file: Option<PathBuf>,
    refresh: Duration,
}

fn parse_keys(
    obj: &Map<String, Value>,
    names: KeySourceNames,
    at: &str,
    base: &Path,
    errors: &mut Vec<String>,
) -> ParsedKeys {
    let file = string_field(obj, names.file, at, errors);
    let url = string_field(obj, names.url, at, errors);
    let source = match (file, url) {
        (Some(file), None) => Some(JwksSource::File(resolve(base, &file))),
        (None, Some(url)) => Some(JwksSource::Url(url)),
        (Some(_), Some(_)) => {
            errors.push(format!(
                "{at}: give exactly one of `{}` and `{}`, not both",
                names.file, names.url
            ));
            None
        }
        (None, None) => None,
    };
    let algorithms = match string_list(obj, "algorithms", at, errors) {
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
    let ca_file = string_field(obj, "ca_file", at, errors).map(|f| resolve(base, &f));
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
    if obj.contains_key("refresh_seconds") && matches!(source, Some(JwksSource::File(_))) {
        errors.push(format!(
            "{at}: `refresh_seconds` applies only to `{}` (a {} is re-read when it changes)",
            names.url, names.file
        ));
    }
    ParsedKeys {
        source,
        algorithms,
        ca_file,
        refresh,
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

/// The head of one entry of a configuration array: the object, the string value of its
/// identifying field `key`, and the label its errors start with, `section[i] (value)`.
/// Reports an entry that is not an object, and unknown fields.
fn entry_head<'v>(
    section: &str,
    i: usize,
    entry: &'v Value,
    key: &str,
    fields: &[&str],
    errors: &mut Vec<String>,
) -> Option<(&'v Map<String, Value>, Option<String>, String)> {
    let Some(obj) = entry.as_object() else {
        errors.push(format!("{section}[{i}]: must be an object"));
        return None;
    };
    let value = string_field(obj, key, &format!("{section}[{i}]"), errors);
    let at = match &value {
        Some(v) => format!("{section}[{i}] ({v})"),
        None => format!("{section}[{i}]"),
    };
    unknown_fields(obj, fields, &at, errors);
    Some((obj, value, at))
}

fn parse_oidc(
    i: usize,
    entry: &Value,
    base: &Path,
    errors: &mut Vec<String>,
) -> Option<OidcIssuerConfig> {
    let (obj, name, at) = entry_head("oidc", i, entry, "name", &OIDC_FIELDS, errors)?;
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
    let keys = parse_keys(obj, OIDC_KEY_NAMES, &at, base, errors);
    if !obj.contains_key("jwks_file") && !obj.contains_key("jwks_url") {
        errors.push(format!(
            "{at}: one of `jwks_file` and `jwks_url` is required"
        ));
    }
    let fields = OidcFields {
        name: name.as_deref(),
        issuer: issuer.as_deref(),
        audiences: audiences.as_deref(),
        keys: KeyFields {
            names: OIDC_KEY_NAMES,
            source: keys.source.as_ref(),
            algorithms: &keys.algorithms,
            ca_file: keys.ca_file.is_some(),
            refresh: keys.refresh,
        },
    };
    errors.extend(fields.problems(&at));
    if errors.len() > before {
        return None;
    }
    Some(OidcIssuerConfig {
        name: name?,
        issuer: issuer?,
        audiences: audiences?,
        jwks: keys.source?,
        algorithms: keys.algorithms,
        ca_file: keys.ca_file,
        refresh: keys.refresh,
    })
}

const SVID_FIELDS: [&str; 8] = [
    "trust_domain",
    "bundle_file",
    "jwt_bundle_file",
    "jwt_bundle_url",
    "audiences",
    "algorithms",
    "ca_file",
    "refresh_seconds",
];

fn parse_svid(
    i: usize,
    entry: &Value,
    base: &Path,
    errors: &mut Vec<String>,
) -> Option<SvidTrustConfig> {
    let (obj, trust_domain, at) =
        entry_head("svid", i, entry, "trust_domain", &SVID_FIELDS, errors)?;
    let before = errors.len();
    if !obj.contains_key("trust_domain") {
        errors.push(format!("{at}: `trust_domain` is required"));
    }
    if let Some(domain) = &trust_domain
        && let Err(e) = check_trust_domain(domain)
    {
        errors.push(format!("{at}: trust_domain `{domain}` {e}"));
    }
    let bundle_file = string_field(obj, "bundle_file", &at, errors).map(|f| resolve(base, &f));
    let keys = parse_keys(obj, JWT_BUNDLE_KEY_NAMES, &at, base, errors);
    let audiences = string_list(obj, "audiences", &at, errors);
    let has_jwt_bundle =
        obj.contains_key(JWT_BUNDLE_KEY_NAMES.file) || obj.contains_key(JWT_BUNDLE_KEY_NAMES.url);
    if !has_jwt_bundle && !obj.contains_key("bundle_file") {
        errors.push(format!("{at}: {SVID_NEEDS_A_BUNDLE}"));
    }
    if has_jwt_bundle {
        if !obj.contains_key("audiences") {
            errors.push(format!(
                "{at}: `audiences` is required with a JWT bundle (a JWT-SVID's aud must name this service; SPIFFE JWT-SVID §3.2)"
            ));
        }
        errors.extend(audience_problems(&at, audiences.as_deref()));
        errors.extend(jwt_svid_algorithm_problems(&at, &keys.algorithms));
        let fields = KeyFields {
            names: JWT_BUNDLE_KEY_NAMES,
            source: keys.source.as_ref(),
            algorithms: &keys.algorithms,
            ca_file: keys.ca_file.is_some(),
            refresh: keys.refresh,
        };
        errors.extend(fields.problems(&at));
    } else {
        for key in ["audiences", "algorithms", "ca_file", "refresh_seconds"] {
            if obj.contains_key(key) {
                errors.push(format!(
                    "{at}: `{key}` applies only to JWT-SVIDs: give `jwt_bundle_file` or `jwt_bundle_url` with it"
                ));
            }
        }
    }
    if errors.len() > before {
        return None;
    }
    let jwt = match (keys.source, audiences) {
        (Some(bundle), Some(audiences)) => Some(JwtSvidConfig {
            bundle,
            audiences,
            algorithms: keys.algorithms,
            ca_file: keys.ca_file,
            refresh: keys.refresh,
        }),
        _ => None,
    };
    Some(SvidTrustConfig {
        trust_domain: trust_domain?,
        bundle_file,
        jwt,
    })
}

const CLIENT_FIELDS: [&str; 6] = [
    "client_id",
    "jwks_file",
    "jwks_url",
    "algorithms",
    "ca_file",
    "refresh_seconds",
];

fn parse_client(
    i: usize,
    entry: &Value,
    base: &Path,
    errors: &mut Vec<String>,
) -> Option<RegisteredClientConfig> {
    let (obj, client_id, at) =
        entry_head("clients", i, entry, "client_id", &CLIENT_FIELDS, errors)?;
    let before = errors.len();
    if !obj.contains_key("client_id") {
        errors.push(format!("{at}: `client_id` is required"));
    }
    if let Some(id) = &client_id
        && let Err(e) = check_client_id(id)
    {
        errors.push(format!("{at}: client_id `{id}` {e}"));
    }
    let keys = parse_keys(obj, OIDC_KEY_NAMES, &at, base, errors);
    if !obj.contains_key("jwks_file") && !obj.contains_key("jwks_url") {
        errors.push(format!(
            "{at}: one of `jwks_file` and `jwks_url` is required"
        ));
    }
    let fields = KeyFields {
        names: OIDC_KEY_NAMES,
        source: keys.source.as_ref(),
        algorithms: &keys.algorithms,
        ca_file: keys.ca_file.is_some(),
        refresh: keys.refresh,
    };
    errors.extend(fields.problems(&at));
    if errors.len() > before {
        return None;
    }
    Some(RegisteredClientConfig {
        client_id: client_id?,
        jwks: keys.source?,
        algorithms: keys.algorithms,
        ca_file: keys.ca_file,
        refresh: keys.refresh,
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

/// A registered client id: 1 to 64 characters of `A-Z a-z 0-9 . _ -`, and not `.` or
/// `..` (it becomes a segment of the client's SPIFFE ID, SPIFFE ID spec §2.2).
fn check_client_id(id: &str) -> Result<(), &'static str> {
    if !(1..=64).contains(&id.len())
        || !id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        return Err("must be 1 to 64 characters of A-Z, a-z, 0-9, `.`, `_` and `-`");
    }
    if id == "." || id == ".." {
        return Err("must not be `.` or `..` (it becomes a segment of the client's SPIFFE ID)");
    }
    Ok(())
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

/// How an agent authenticated. Its text (serde and `Display`) is what Cedar policy sees
/// as `principal.method` and what tokens carry as `attestation.method`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum AuthMethod {
    /// An OIDC JWT from a trusted issuer (`"oidc"`).
    #[serde(rename = "oidc")]
    Oidc,
    /// An X.509-SVID client certificate (`"x509-svid"`).
    #[serde(rename = "x509-svid")]
    X509Svid,
    /// A JWT-SVID of a trusted trust domain (`"jwt-svid"`).
    #[serde(rename = "jwt-svid")]
    JwtSvid,
    /// A registered client's `private_key_jwt` client assertion (`"private-key-jwt"`).
    #[serde(rename = "private-key-jwt")]
    PrivateKeyJwt,
}

impl AuthMethod {
    /// The method's name: `oidc`, `x509-svid`, `jwt-svid` or `private-key-jwt`.
    pub fn as_str(self) -> &'static str {
        match self {
            AuthMethod::Oidc => "oidc",
            AuthMethod::X509Svid => "x509-svid",
            AuthMethod::JwtSvid => "jwt-svid",
            AuthMethod::PrivateKeyJwt => "private-key-jwt",
        }
    }
}

impl fmt::Display for AuthMethod {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
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
    /// sub>` for OIDC (bytes outside `A-Z a-z 0-9 - . _` become `%XX`); the SVID's own
    /// ID for an X.509-SVID or a JWT-SVID; `spiffe://<domain>/client/<client_id>` for a
    /// registered client's assertion.
    pub subject: String,
    /// The OIDC `iss`; `spiffe://<trust domain>` for an SVID; the client_id for a client
    /// assertion.
    pub issuer: String,
    /// The OIDC `sub`; the SVID's ID; the client_id for a client assertion.
    pub external_subject: String,
    /// How the agent authenticated.
    pub method: AuthMethod,
    /// Top-level claims that are strings, numbers or booleans, as text, except `iss sub
    /// aud exp nbf iat jti`; nested objects are flattened with `.`-joined keys (depth ≤
    /// 3); at most 64 claims, values over 256 characters dropped. Empty for X.509-SVIDs.
    pub claims: BTreeMap<String, String>,
    /// `exp` (Unix seconds), or the X.509-SVID's `notAfter`.
    pub expires_at: Option<i64>,
    /// The JWT's `jti`, if it has one (a client assertion always does), for a caller
    /// that refuses a second use of the same JWT; `None` for an X.509-SVID.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jti: Option<String>,
    /// The JWT as the agent presented it (OIDC JWT, JWT-SVID or client assertion), which
    /// fragment nodes verify again themselves (DESIGN.md §9); `None` for an X.509-SVID,
    /// which proves possession only to the TLS listener that saw it.
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
    /// Nothing trusted matches the token: its `iss` is no OIDC issuer or registered
    /// client, and its `sub` is no SPIFFE ID of a trust domain with a JWT bundle.
    #[error("{}", unknown_issuer(.issuer, .spiffe_trust_domain, .trusted))]
    UnknownIssuer {
        /// The `iss` of the token, if it has one.
        issuer: Option<String>,
        /// The trust domain of its `sub`, if that is a SPIFFE ID.
        spiffe_trust_domain: Option<String>,
        /// What this service trusts.
        trusted: Trusted,
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
    /// The token's `aud` names none of the audiences accepted for it.
    #[error("{}", wrong_audience(.method, .expected))]
    WrongAudience {
        /// What kind of JWT it is.
        method: AuthMethod,
        /// Audiences accepted for it.
        expected: Vec<String>,
    },
    /// A required claim is missing.
    #[error(
        "attestation lacks the required claim `{0}` (an OIDC JWT needs iss, sub, aud and exp; a JWT-SVID sub, aud and exp; a client assertion iss, sub, aud, exp and jti)"
    )]
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
        /// Whose keys: the OIDC issuer's configured name, `spiffe://<trust domain>`,
        /// or the client_id.
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
    /// The JWT-SVID was refused for a reason of its own profile; the text completes
    /// `JWT-SVID …`.
    #[error("JWT-SVID {0}")]
    JwtSvid(String),
    /// The client assertion was refused for a reason of its own profile (RFC 7523 §3);
    /// the text completes `client assertion …`.
    #[error("client assertion {0}")]
    ClientAssertion(String),
}

/// What an authenticator trusts, for [`AuthnError::UnknownIssuer`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Trusted {
    /// OIDC issuers (`iss`).
    pub oidc_issuers: Vec<String>,
    /// Trust domains whose JWT-SVIDs are accepted.
    pub jwt_svid_trust_domains: Vec<String>,
    /// Registered client ids.
    pub clients: Vec<String>,
}

impl fmt::Display for Trusted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = [
            ("OIDC issuers", &self.oidc_issuers),
            ("JWT-SVID trust domains", &self.jwt_svid_trust_domains),
            ("registered clients", &self.clients),
        ]
        .into_iter()
        .filter(|(_, list)| !list.is_empty())
        .map(|(what, list)| format!("{what} {}", list.join(", ")))
        .collect();
        if parts.is_empty() {
            f.write_str("none configured")
        } else {
            f.write_str(&parts.join("; "))
        }
    }
}

fn unknown_issuer(issuer: &Option<String>, domain: &Option<String>, trusted: &Trusted) -> String {
    let what = match (issuer, domain) {
        (Some(iss), None) => format!("attestation issuer `{iss}` is not trusted"),
        (Some(iss), Some(domain)) => format!(
            "attestation issuer `{iss}` is not trusted, nor is the trust domain `{domain}` of its SPIFFE ID sub"
        ),
        (None, Some(domain)) => format!(
            "attestation has no iss and the trust domain `{domain}` of its SPIFFE ID sub is not trusted for JWT-SVIDs"
        ),
        (None, None) => "attestation has no iss".to_owned(),
    };
    format!("{what}; trusted: {trusted}")
}

fn wrong_audience(method: &AuthMethod, expected: &[String]) -> String {
    let expected = expected.join(", ");
    match method {
        AuthMethod::JwtSvid => {
            format!("JWT-SVID audience is not accepted: fetch a JWT-SVID for one of: {expected}")
        }
        AuthMethod::PrivateKeyJwt if expected.is_empty() => {
            "client assertion audience is not accepted: this service accepts no client assertions"
                .to_owned()
        }
        AuthMethod::PrivateKeyJwt => format!(
            "client assertion audience is not accepted: its aud must contain one of: {expected}"
        ),
        AuthMethod::Oidc | AuthMethod::X509Svid => {
            format!("attestation audience is not accepted: request a token for one of: {expected}")
        }
    }
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

/// What a key document is, which decides the `use` its signing keys must carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum KeyDocument {
    /// A JWKS (an OIDC issuer's, a registered client's): `use` absent or `sig`.
    Jwks,
    /// A SPIFFE bundle (SPIFFE Trust Domain and Bundle §4): JWT authorities carry `use`
    /// `jwt-svid`; X.509 authorities (`use` `x509-svid`) never verify a JWT; keys of
    /// any other or no `use` are ignored (§4.2.2).
    SpiffeBundle,
}

/// The `use` of a SPIFFE bundle's X.509 authorities.
const USE_X509_SVID: &str = "x509-svid";

/// The `use` of a SPIFFE bundle's JWT authorities.
const USE_JWT_SVID: &str = "jwt-svid";

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
    /// The `kid`s of a SPIFFE bundle's X.509 authorities: named by a JWT, they are
    /// refused by name rather than reported missing.
    x509_kids: Vec<String>,
    /// A SPIFFE bundle's `spiffe_sequence`.
    sequence: Option<u64>,
    /// A SPIFFE bundle's `spiffe_refresh_hint`.
    refresh_hint: Option<Duration>,
}

/// A non-negative integer member of a SPIFFE bundle (`spiffe_sequence`,
/// `spiffe_refresh_hint`), if present.
fn bundle_integer(doc: &Value, member: &str) -> Result<Option<u64>, String> {
    match doc.get(member) {
        None => Ok(None),
        Some(v) => v.as_u64().map(Some).ok_or_else(|| {
            format!("the SPIFFE bundle's `{member}` must be a non-negative integer (SPIFFE Trust Domain and Bundle §4.1)")
        }),
    }
}

/// Parses a JWKS document, keeping only public signature keys Quorate can use: EC P-256
/// and P-384, RSA, Ed25519. Symmetric (`oct`) keys, keys of another `use` (see
/// [`KeyDocument`]) and unknown key types are skipped; a document without any usable key
/// is an error.
fn parse_jwks(bytes: &[u8], document: KeyDocument) -> Result<KeySet, String> {
    let doc: Value =
        serde_json::from_slice(bytes).map_err(|e| format!("the JWKS is not valid JSON: {e}"))?;
    let entries = doc
        .get("keys")
        .and_then(Value::as_array)
        .ok_or("the JWKS has no `keys` array")?;
    let mut set = KeySet::default();
    if document == KeyDocument::SpiffeBundle {
        set.sequence = bundle_integer(&doc, "spiffe_sequence")?;
        set.refresh_hint = bundle_integer(&doc, "spiffe_refresh_hint")?.map(Duration::from_secs);
    }
    for entry in entries {
        let Ok(jwk) = serde_json::from_value::<Jwk>(entry.clone()) else {
            continue;
        };
        let usable = match (document, &jwk.common.public_key_use) {
            (KeyDocument::Jwks, None | Some(PublicKeyUse::Signature)) => true,
            (KeyDocument::SpiffeBundle, Some(PublicKeyUse::Other(u))) if u == USE_JWT_SVID => true,
            (KeyDocument::SpiffeBundle, Some(PublicKeyUse::Other(u))) if u == USE_X509_SVID => {
                if let Some(kid) = &jwk.common.key_id {
                    set.x509_kids.push(kid.clone());
                }
                false
            }
            _ => false,
        };
        if !usable {
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
        set.keys.push(Key {
            kid: jwk.common.key_id.clone(),
            kind,
            declared_alg: jwk.common.key_algorithm.map(|a| a.to_string()),
            decoding,
        });
    }
    if set.keys.is_empty() {
        return Err(match document {
            KeyDocument::Jwks => format!(
                "the JWKS holds no usable public signing key ({} entries; EC P-256/P-384, RSA and Ed25519 are supported)",
                entries.len()
            ),
            KeyDocument::SpiffeBundle => format!(
                "the SPIFFE bundle holds no usable JWT authority ({} entries; a JWT authority is an EC P-256/P-384 or RSA key with \"use\": \"jwt-svid\")",
                entries.len()
            ),
        });
    }
    Ok(set)
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
                if set.x509_kids.iter().any(|k| k == kid) {
                    return Selected::Unusable(AuthnError::KeyUnusable {
                        kid: kid.to_owned(),
                        reason: format!(
                            "key with use {USE_X509_SVID} cannot verify a JWT-SVID (only keys with use {USE_JWT_SVID} can; SPIFFE Trust Domain and Bundle §4.2.2)"
                        ),
                    });
                }
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

/// A `jwks_file` or `jwt_bundle_file`: re-read when its modification time or size
/// changes.
struct FileKeys {
    path: PathBuf,
    document: KeyDocument,
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

fn load_jwks_file(path: &Path, document: KeyDocument) -> Result<KeySet, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    parse_jwks(&bytes, document).map_err(|e| format!("{}: {e}", path.display()))
}

impl FileKeys {
    fn open(path: PathBuf, document: KeyDocument) -> Result<Self, String> {
        let stamp = file_stamp(&path);
        let keys = load_jwks_file(&path, document)?;
        Ok(Self {
            path,
            document,
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
            match load_jwks_file(&self.path, self.document) {
                Ok(keys) => {
                    tracing::info!(
                        issuer,
                        path = %self.path.display(),
                        keys = keys.keys.len(),
                        sequence = keys.sequence,
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

/// A `jwks_url` or `jwt_bundle_url`: fetched on first use, cached, refreshed when stale
/// or for an unknown `kid` (rate-limited).
struct UrlKeys {
    url: String,
    document: KeyDocument,
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

    /// How long fetched `keys` stay fresh: the configured period, shortened to a SPIFFE
    /// bundle's `spiffe_refresh_hint` (but never below the refetch limit).
    fn refresh_of(&self, keys: &KeySet) -> Duration {
        match keys.refresh_hint {
            Some(hint) => self.refresh.min(hint.max(self.min_refetch)),
            None => self.refresh,
        }
    }

    /// Cached keys younger than their refresh period plus `extra`.
    fn keys_younger_than(
        &self,
        state: &UrlState,
        now: Instant,
        extra: Duration,
    ) -> Option<Arc<KeySet>> {
        match (&state.keys, state.fetched_at) {
            (Some(keys), Some(at))
                if now.saturating_duration_since(at)
                    < self.refresh_of(keys).saturating_add(extra) =>
            {
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
        parse_jwks(&response.body, self.document).map_err(|e| format!("{}: {e}", self.url))
    }

    async fn lookup(
        &self,
        issuer: &str,
        kid: Option<&str>,
        alg: JwsAlgorithm,
    ) -> Result<Key, AuthnError> {
        // 1. Fresh cache.
        if let Some(keys) = self.keys_younger_than(&self.snapshot(), Instant::now(), Duration::ZERO)
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
                        sequence = keys.sequence,
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
        let Some(keys) = self.keys_younger_than(&state, Instant::now(), MAX_STALE) else {
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

/// The keys of an OIDC issuer, a trust domain's JWT authorities or a registered client.
enum KeySource {
    File(FileKeys),
    Url(UrlKeys),
}

impl KeySource {
    /// The key for a token of `alg` with `kid`; `issuer` names the source in errors and
    /// logs.
    async fn lookup(
        &self,
        issuer: &str,
        kid: Option<&str>,
        alg: JwsAlgorithm,
    ) -> Result<Key, AuthnError> {
        match self {
            KeySource::File(file) => match select(&file.current(issuer), kid, alg) {
                Selected::Key(key) => Ok(*key),
                Selected::Unusable(e) => Err(e),
                Selected::Missing => Err(AuthnError::NoKey {
                    kid: kid.unwrap_or("<none>").to_owned(),
                    issuer: issuer.to_owned(),
                }),
            },
            KeySource::Url(url) => url.lookup(issuer, kid, alg).await,
        }
    }
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

/// A trust domain whose JWT-SVIDs are accepted.
struct JwtSvidTrust {
    trust_domain: String,
    /// `spiffe://<trust domain>`: the attestation's issuer, and the name of its keys.
    id: String,
    audiences: Vec<String>,
    algorithms: Vec<JwsAlgorithm>,
    keys: KeySource,
}

/// A registered client (`private_key_jwt`).
struct Client {
    client_id: String,
    algorithms: Vec<JwsAlgorithm>,
    keys: KeySource,
}

/// Verifies agent attestations against the trust configuration. `Send + Sync`; share it
/// in an `Arc`.
pub struct Authenticator {
    domain: String,
    oidc: Vec<Issuer>,
    /// Trust domains whose X.509-SVIDs are accepted.
    svid: Vec<SvidTrust>,
    /// Trust domains whose JWT-SVIDs are accepted.
    jwt_svid: Vec<JwtSvidTrust>,
    clients: Vec<Client>,
    /// The audiences a client assertion's `aud` must contain one of (empty: client
    /// assertions are refused).
    client_audiences: Vec<String>,
}

impl fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Authenticator")
            .field("domain", &self.domain)
            .field("issuers", &self.issuers())
            .field("clients", &self.clients())
            .field("client_assertion_audiences", &self.client_audiences)
            .finish()
    }
}

/// The longest lifetime of a client assertion accepted, in seconds: `exp` minus `iat`,
/// or minus now when it has no `iat`. Short-lived assertions keep the set of `jti`s a
/// caller must remember for one-time use small (RFC 7523 §3, items 4 and 7).
pub const MAX_CLIENT_ASSERTION_LIFETIME_SECONDS: u64 = 300;

/// The client-assertion audiences of a token service whose issuer URLs are `issuers`:
/// each issuer `I` and its token endpoint `I/token` (RFC 7523 §3 item 3, OpenID Connect
/// Core §9: the token endpoint URL, or the issuer). The coordinator and every fragment
/// node derive them alike, the nodes from their ceiling's `token_issuers`. Empty
/// issuers are skipped; a trailing `/` of an issuer is not doubled.
pub fn client_assertion_audiences_for<'a>(
    issuers: impl IntoIterator<Item = &'a str>,
) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for issuer in issuers.into_iter().filter(|i| !i.is_empty()) {
        for aud in [
            issuer.to_owned(),
            format!("{}/token", issuer.trim_end_matches('/')),
        ] {
            if !out.contains(&aud) {
                out.push(aud);
            }
        }
    }
    out
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

/// Opens key sources for [`Authenticator::build`], reading the system's roots once, and
/// only if some source is a URL.
struct SourceOpener {
    system: Option<RootCertStore>,
    min_refetch: Duration,
}

impl SourceOpener {
    fn open(
        &mut self,
        source: JwksSource,
        ca_file: Option<&Path>,
        refresh: Duration,
        document: KeyDocument,
    ) -> Result<KeySource, Vec<String>> {
        match source {
            JwksSource::File(path) => FileKeys::open(path, document)
                .map(KeySource::File)
                .map_err(|e| vec![e]),
            JwksSource::Url(url) => {
                let mut errors = Vec::new();
                let mut roots = self.system.get_or_insert_with(system_roots).clone();
                if let Some(ca_file) = ca_file {
                    match read_pem_certs(ca_file, "ca_file") {
                        Ok(certs) => {
                            let (added, _) = roots.add_parsable_certificates(certs);
                            if added == 0 {
                                errors.push(format!(
                                    "ca_file {} holds no usable CA certificate",
                                    ca_file.display()
                                ));
                            }
                        }
                        Err(e) => errors.push(e),
                    }
                }
                if roots.is_empty() {
                    errors.push(format!(
                        "no trusted roots for {url}: no system CA bundle was found; set ca_file or SSL_CERT_FILE"
                    ));
                    return Err(errors);
                }
                match https::public_client_config(roots) {
                    Ok(tls) if errors.is_empty() => Ok(KeySource::Url(UrlKeys {
                        url,
                        document,
                        tls,
                        refresh,
                        min_refetch: self.min_refetch,
                        state: Mutex::new(UrlState::default()),
                        fetching: tokio::sync::Mutex::new(()),
                    })),
                    Ok(_) => Err(errors),
                    Err(e) => {
                        errors.push(e.to_string());
                        Err(errors)
                    }
                }
            }
        }
    }
}

/// What the unverified `iss` and `sub` of a JWT select to verify it with.
enum Route<'a> {
    Oidc(&'a Issuer),
    Client(&'a Client),
    JwtSvid(&'a JwtSvidTrust),
}

/// What a JWT is checked against once its verifier is chosen: the keys, and what
/// jsonwebtoken checks besides the signature.
struct Expectations<'a> {
    method: AuthMethod,
    /// Names the key source in errors and logs.
    label: &'a str,
    keys: &'a KeySource,
    algorithms: &'a [JwsAlgorithm],
    /// Completes `(for …)` in an algorithm refusal.
    algorithms_for: String,
    audiences: &'a [String],
    /// The exact `iss` required, if any.
    issuer: Option<&'a str>,
    /// The exact `sub` required, if any.
    subject: Option<&'a str>,
    required: &'a [&'a str],
}

impl Authenticator {
    /// Builds an authenticator for the cluster trust domain `domain`: loads every
    /// `jwks_file`, `jwt_bundle_file` and X.509 bundle now (URLs are fetched on first
    /// use). It accepts no client assertion until
    /// [`Authenticator::with_client_assertion_audiences`] names its audiences. On
    /// failure, the message lists every problem, one per line.
    pub async fn new(cfg: AuthnConfig, domain: &str) -> Result<Self, String> {
        Self::build(cfg, domain, MIN_REFETCH)
    }

    fn build(cfg: AuthnConfig, domain: &str, min_refetch: Duration) -> Result<Self, String> {
        let mut errors = cfg.problems();
        if let Err(e) = quorate_proto::tls::validate_domain(domain) {
            errors.push(e.to_string());
        }
        let mut opener = SourceOpener {
            system: None,
            min_refetch,
        };
        let mut oidc = Vec::new();
        for c in cfg.oidc {
            let at = format!("issuer {}", c.name);
            match opener.open(c.jwks, c.ca_file.as_deref(), c.refresh, KeyDocument::Jwks) {
                Ok(keys) => oidc.push(Issuer {
                    name: c.name,
                    issuer: c.issuer,
                    audiences: c.audiences,
                    algorithms: c.algorithms,
                    keys,
                }),
                Err(e) => errors.extend(e.into_iter().map(|e| format!("{at}: {e}"))),
            }
        }
        let mut svid = Vec::new();
        let mut jwt_svid = Vec::new();
        for s in cfg.svid {
            let at = format!("svid trust domain {}", s.trust_domain);
            if s.trust_domain == domain {
                errors.push(format!(
                    "{at}: this is the cluster's own trust domain; its certificates are Quorate's, not agents'"
                ));
                continue;
            }
            if let Some(jwt) = s.jwt {
                match opener.open(
                    jwt.bundle,
                    jwt.ca_file.as_deref(),
                    jwt.refresh,
                    KeyDocument::SpiffeBundle,
                ) {
                    Ok(keys) => jwt_svid.push(JwtSvidTrust {
                        trust_domain: s.trust_domain.clone(),
                        id: format!("spiffe://{}", s.trust_domain),
                        audiences: jwt.audiences,
                        algorithms: jwt.algorithms,
                        keys,
                    }),
                    Err(e) => {
                        errors.extend(e.into_iter().map(|e| format!("{at}: JWT bundle: {e}")));
                    }
                }
            }
            let Some(bundle_file) = s.bundle_file else {
                continue;
            };
            let certs = match read_pem_certs(&bundle_file, "bundle_file") {
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
                    bundle_file.display()
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
        let mut clients = Vec::new();
        for c in cfg.clients {
            let at = format!("client {}", c.client_id);
            match opener.open(c.jwks, c.ca_file.as_deref(), c.refresh, KeyDocument::Jwks) {
                Ok(keys) => clients.push(Client {
                    client_id: c.client_id,
                    algorithms: c.algorithms,
                    keys,
                }),
                Err(e) => errors.extend(e.into_iter().map(|e| format!("{at}: {e}"))),
            }
        }
        if errors.is_empty() {
            Ok(Self {
                domain: domain.to_owned(),
                oidc,
                svid,
                jwt_svid,
                clients,
                client_audiences: Vec::new(),
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
            jwt_svid: Vec::new(),
            clients: Vec::new(),
            client_audiences: Vec::new(),
        }
    }

    /// Sets the audiences a client assertion's `aud` must contain one of (RFC 7523 §3
    /// item 3): what identifies the process that verifies it, e.g.
    /// [`client_assertion_audiences_for`] its issuer URL. Replaces any set before; empty
    /// strings and repeats are dropped. With none, every client assertion is refused,
    /// saying so.
    #[must_use]
    pub fn with_client_assertion_audiences(mut self, audiences: Vec<String>) -> Self {
        let mut kept: Vec<String> = Vec::new();
        for aud in audiences {
            if !aud.is_empty() && !kept.contains(&aud) {
                kept.push(aud);
            }
        }
        self.client_audiences = kept;
        self
    }

    /// The audiences set by [`Authenticator::with_client_assertion_audiences`].
    pub fn client_assertion_audiences(&self) -> &[String] {
        &self.client_audiences
    }

    /// What is trusted: each OIDC issuer (`iss`), then `spiffe://<trust domain>` for
    /// each SVID trust domain (X.509, JWT or both). Registered clients are listed by
    /// [`Authenticator::clients`].
    pub fn issuers(&self) -> Vec<String> {
        let mut out: Vec<String> = self.oidc.iter().map(|i| i.issuer.clone()).collect();
        let domains = self
            .svid
            .iter()
            .map(|s| s.trust_domain.as_str())
            .chain(self.jwt_svid.iter().map(|t| t.trust_domain.as_str()));
        for domain in domains {
            let id = format!("spiffe://{domain}");
            if !out.contains(&id) {
                out.push(id);
            }
        }
        out
    }

    /// The registered clients' ids.
    pub fn clients(&self) -> Vec<String> {
        self.clients.iter().map(|c| c.client_id.clone()).collect()
    }

    fn trusted(&self) -> Trusted {
        Trusted {
            oidc_issuers: self.oidc.iter().map(|i| i.issuer.clone()).collect(),
            jwt_svid_trust_domains: self
                .jwt_svid
                .iter()
                .map(|t| t.trust_domain.clone())
                .collect(),
            clients: self.clients(),
        }
    }

    /// Verifies a JWT attestation — an OIDC JWT, a JWT-SVID or a registered client's
    /// assertion — and names the agent (see the [module docs](self) for the order of
    /// checks and how the kind is chosen).
    ///
    /// # Errors
    ///
    /// An [`AuthnError`] naming what is wrong: the token's shape, its algorithm, an
    /// unknown issuer, trust domain or client, the key, the signature, a claim.
    pub async fn verify_jwt(&self, token: &str) -> Result<Attestation, AuthnError> {
        if token.len() > MAX_TOKEN_LEN {
            return Err(AuthnError::Malformed(format!(
                "it is longer than {MAX_TOKEN_LEN} bytes"
            )));
        }
        // `none` and `HS*` are refused in here, before anything else.
        let unverified = Unverified::parse(token)?;
        let alg = JwsAlgorithm::from_name(&unverified.alg).ok_or_else(|| {
            AuthnError::UntrustedAlgorithm {
                alg: unverified.alg.clone(),
                accepted: list_algorithms(&JwsAlgorithm::ALL),
            }
        })?;
        match self.route(&unverified)? {
            Route::Oidc(issuer) => self.verify_oidc(token, &unverified, alg, issuer).await,
            Route::Client(client) => {
                self.verify_client_assertion(token, &unverified, alg, client)
                    .await
            }
            Route::JwtSvid(trust) => self.verify_jwt_svid(token, &unverified, alg, trust).await,
        }
    }

    /// Chooses the verifier from the unverified `iss` and `sub` alone: an OIDC issuer
    /// named by `iss`; else a registered client named by `iss` (whose `sub` must be the
    /// same); else the trust domain of a `spiffe://` `sub` (never the cluster's own).
    fn route(&self, u: &Unverified) -> Result<Route<'_>, AuthnError> {
        if let Some(iss) = &u.iss {
            if let Some(issuer) = self.oidc.iter().find(|i| i.issuer == *iss) {
                return Ok(Route::Oidc(issuer));
            }
            if let Some(client) = self.clients.iter().find(|c| c.client_id == *iss) {
                return match &u.sub {
                    Some(sub) if sub == iss => Ok(Route::Client(client)),
                    Some(sub) => Err(AuthnError::ClientAssertion(format!(
                        "sub `{}` differs from its iss `{iss}`: a client assertion has iss = sub = the client_id (RFC 7523 §3)",
                        sub.escape_debug()
                    ))),
                    None => Err(AuthnError::MissingClaim("sub".to_owned())),
                };
            }
        }
        let mut spiffe_trust_domain = None;
        if let Some(sub) = &u.sub
            && sub.starts_with("spiffe://")
        {
            let domain = parse_spiffe_id(sub).map_err(|e| {
                AuthnError::JwtSvid(format!(
                    "sub `{}` {e} (SPIFFE ID spec §2)",
                    sub.escape_debug()
                ))
            })?;
            if domain == self.domain {
                return Err(AuthnError::JwtSvid(format!(
                    "`{sub}` is in the cluster's own trust domain; Quorate's own identities are not agent identities"
                )));
            }
            if let Some(trust) = self.jwt_svid.iter().find(|t| t.trust_domain == domain) {
                return Ok(Route::JwtSvid(trust));
            }
            spiffe_trust_domain = Some(domain.to_owned());
        }
        if u.iss.is_none() && spiffe_trust_domain.is_none() {
            return Err(AuthnError::MissingClaim("iss".to_owned()));
        }
        Err(AuthnError::UnknownIssuer {
            issuer: u.iss.clone(),
            spiffe_trust_domain,
            trusted: self.trusted(),
        })
    }

    /// Checks `alg` against the verifier's list, finds the key and has jsonwebtoken
    /// verify the signature, `exp`, `nbf`, `aud` and whatever `expect` requires; then
    /// `iat`. Returns the claims.
    async fn verify_signed(
        &self,
        token: &str,
        unverified: &Unverified,
        alg: JwsAlgorithm,
        expect: &Expectations<'_>,
    ) -> Result<Map<String, Value>, AuthnError> {
        if !expect.algorithms.contains(&alg) {
            return Err(AuthnError::UntrustedAlgorithm {
                alg: unverified.alg.clone(),
                accepted: format!(
                    "{} (for {})",
                    list_algorithms(expect.algorithms),
                    expect.algorithms_for
                ),
            });
        }
        let key = expect
            .keys
            .lookup(expect.label, unverified.kid.as_deref(), alg)
            .await?;
        let mut validation = Validation::new(alg.to_jwt());
        validation.leeway = LEEWAY_SECONDS;
        validation.validate_exp = true;
        validation.validate_nbf = true;
        validation.validate_aud = true;
        validation.set_audience(expect.audiences);
        if let Some(issuer) = expect.issuer {
            validation.set_issuer(&[issuer]);
        }
        validation.sub = expect.subject.map(str::to_owned);
        validation.set_required_spec_claims(expect.required);
        let data = jsonwebtoken::decode::<Map<String, Value>>(token, &key.decoding, &validation)
            .map_err(|e| map_jwt_error(&e, expect, &key, alg))?;
        let claims = data.claims;
        // `check_claim_types` made `iat` a number if present.
        if let Some(iat) = claims.get("iat").and_then(Value::as_f64)
            && iat > unix_now_f64() + LEEWAY_SECONDS as f64
        {
            return Err(AuthnError::IssuedInFuture);
        }
        Ok(claims)
    }

    async fn verify_oidc(
        &self,
        token: &str,
        unverified: &Unverified,
        alg: JwsAlgorithm,
        issuer: &Issuer,
    ) -> Result<Attestation, AuthnError> {
        let expect = Expectations {
            method: AuthMethod::Oidc,
            label: &issuer.name,
            keys: &issuer.keys,
            algorithms: &issuer.algorithms,
            algorithms_for: format!("issuer {}", issuer.name),
            audiences: &issuer.audiences,
            issuer: Some(&issuer.issuer),
            subject: None,
            required: &["exp", "iss", "aud", "sub"],
        };
        let claims = self.verify_signed(token, unverified, alg, &expect).await?;
        let sub = subject_of(&claims)?;
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
            expires_at: claims.get("exp").and_then(Value::as_i64),
            jti: jti_of(&claims),
            presented: Some(PresentedJwt(token.to_owned())),
        })
    }

    /// A JWT-SVID (SPIFFE JWT-SVID §2, §3): `typ` (if any) `JWT` or `JOSE`; a key of the
    /// trust domain's bundle with `use` `jwt-svid`; `sub` the SPIFFE ID, `aud` and `exp`
    /// required, `iss` optional and not checked.
    async fn verify_jwt_svid(
        &self,
        token: &str,
        unverified: &Unverified,
        alg: JwsAlgorithm,
        trust: &JwtSvidTrust,
    ) -> Result<Attestation, AuthnError> {
        if let Some(typ) = &unverified.typ
            && typ != "JWT"
            && typ != "JOSE"
        {
            return Err(AuthnError::JwtSvid(format!(
                "header typ `{}` is neither JWT nor JOSE (SPIFFE JWT-SVID §2.3)",
                typ.escape_debug()
            )));
        }
        let expect = Expectations {
            method: AuthMethod::JwtSvid,
            label: &trust.id,
            keys: &trust.keys,
            algorithms: &trust.algorithms,
            algorithms_for: format!("trust domain {}", trust.trust_domain),
            audiences: &trust.audiences,
            issuer: None,
            subject: unverified.sub.as_deref(),
            required: &["exp", "aud", "sub"],
        };
        let claims = self.verify_signed(token, unverified, alg, &expect).await?;
        let sub = subject_of(&claims)?;
        // The route read the same signed `sub`; checked again so no other path can pass.
        if parse_spiffe_id(&sub).ok() != Some(trust.trust_domain.as_str()) {
            return Err(AuthnError::JwtSvid(format!(
                "sub `{}` is not a SPIFFE ID of trust domain {}",
                sub.escape_debug(),
                trust.trust_domain
            )));
        }
        Ok(Attestation {
            subject: sub.clone(),
            issuer: trust.id.clone(),
            external_subject: sub,
            method: AuthMethod::JwtSvid,
            claims: flatten_claims(&claims),
            expires_at: claims.get("exp").and_then(Value::as_i64),
            jti: jti_of(&claims),
            presented: Some(PresentedJwt(token.to_owned())),
        })
    }

    /// A registered client's `private_key_jwt` assertion (RFC 7523 §3, OpenID Connect
    /// Core §9): `iss` = `sub` = the client_id, `aud` one of the client-assertion
    /// audiences, `exp` and `jti` required, a lifetime of at most
    /// [`MAX_CLIENT_ASSERTION_LIFETIME_SECONDS`].
    async fn verify_client_assertion(
        &self,
        token: &str,
        unverified: &Unverified,
        alg: JwsAlgorithm,
        client: &Client,
    ) -> Result<Attestation, AuthnError> {
        if self.client_audiences.is_empty() {
            return Err(AuthnError::ClientAssertion(format!(
                "from `{}` cannot be accepted: this service has no client-assertion audience configured, so it accepts no client assertions",
                client.client_id
            )));
        }
        let expect = Expectations {
            method: AuthMethod::PrivateKeyJwt,
            label: &client.client_id,
            keys: &client.keys,
            algorithms: &client.algorithms,
            algorithms_for: format!("client {}", client.client_id),
            audiences: &self.client_audiences,
            issuer: Some(&client.client_id),
            subject: Some(&client.client_id),
            required: &["exp", "iss", "aud", "sub"],
        };
        let claims = self.verify_signed(token, unverified, alg, &expect).await?;
        let jti = match claims.get("jti") {
            Some(Value::String(jti)) if !jti.is_empty() => jti.clone(),
            _ => {
                return Err(AuthnError::ClientAssertion(
                    "lacks `jti`: each assertion needs a unique jti (RFC 7523 §3 item 7)"
                        .to_owned(),
                ));
            }
        };
        // `check_claim_types` made `exp` and `iat` numbers; jsonwebtoken required `exp`.
        let exp = claims.get("exp").and_then(Value::as_f64).unwrap_or(0.0);
        let (start, from) = match claims.get("iat").and_then(Value::as_f64) {
            Some(iat) => (iat, "exp - iat"),
            None => (unix_now_f64(), "exp - now, as it has no iat"),
        };
        let lifetime = (exp - start).ceil();
        if lifetime > MAX_CLIENT_ASSERTION_LIFETIME_SECONDS as f64 {
            return Err(AuthnError::ClientAssertion(format!(
                "lifetime {lifetime} s exceeds {MAX_CLIENT_ASSERTION_LIFETIME_SECONDS} s ({from}): make short-lived assertions"
            )));
        }
        Ok(Attestation {
            subject: format!("spiffe://{}/client/{}", self.domain, client.client_id),
            issuer: client.client_id.clone(),
            external_subject: client.client_id.clone(),
            method: AuthMethod::PrivateKeyJwt,
            claims: flatten_claims(&claims),
            expires_at: claims.get("exp").and_then(Value::as_i64),
            jti: Some(jti),
            presented: Some(PresentedJwt(token.to_owned())),
        })
    }

    /// The names of the configured X.509-SVID CAs, as a TLS server offers them to
    /// clients (`certificate_authorities`); empty when no trust domain has an X.509
    /// bundle. The listeners verify presented chains per request with
    /// [`Authenticator::verify_svid`].
    pub fn svid_root_hints(&self) -> Vec<rustls::DistinguishedName> {
        self.svid
            .iter()
            .flat_map(|t| t.verifier.root_hint_subjects().to_vec())
            .collect()
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
            jti: None,
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
        .ok_or("has no path: an SVID names a workload")?;
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

/// What is read from a JWT before its signature is checked: the header's `alg`, `kid`
/// and `typ`, and the payload's `iss` and `sub` (used only to choose the verifier).
struct Unverified {
    alg: String,
    kid: Option<String>,
    typ: Option<String>,
    iss: Option<String>,
    sub: Option<String>,
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
        let header_string = |name: &str| match header.get(name) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(_) => Err(AuthnError::Malformed(format!(
                "the header's `{name}` is not a string"
            ))),
        };
        let kid = header_string("kid")?;
        let typ = header_string("typ")?;
        let payload = decode(payload, "payload")?;
        // Also makes `iss` and `sub` strings if present.
        check_claim_types(&payload)?;
        let claim = |name: &str| payload.get(name).and_then(Value::as_str).map(str::to_owned);
        Ok(Self {
            alg,
            kid,
            typ,
            iss: claim("iss"),
            sub: claim("sub"),
        })
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
    expect: &Expectations<'_>,
    key: &Key,
    alg: JwsAlgorithm,
) -> AuthnError {
    match e.kind() {
        ErrorKind::ExpiredSignature => AuthnError::Expired,
        ErrorKind::ImmatureSignature => AuthnError::NotYetValid,
        ErrorKind::InvalidAudience => AuthnError::WrongAudience {
            method: expect.method,
            expected: expect.audiences.to_vec(),
        },
        // Only if the payload is ambiguous (e.g. `iss` given twice): the verifier was
        // chosen by `iss` and `sub`, so a well-formed token always matches them.
        ErrorKind::InvalidIssuer | ErrorKind::InvalidSubject => AuthnError::Malformed(format!(
            "its {} does not match the one it was routed by",
            if matches!(e.kind(), ErrorKind::InvalidIssuer) {
                "iss"
            } else {
                "sub"
            }
        )),
        ErrorKind::InvalidSignature => AuthnError::BadSignature,
        ErrorKind::InvalidAlgorithm => AuthnError::UntrustedAlgorithm {
            alg: alg.as_str().to_owned(),
            accepted: list_algorithms(expect.algorithms),
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

/// The verified `sub`: a string of 1 to [`MAX_SUBJECT_LEN`] bytes.
fn subject_of(claims: &Map<String, Value>) -> Result<String, AuthnError> {
    match claims.get("sub") {
        Some(Value::String(sub)) if !sub.is_empty() && sub.len() <= MAX_SUBJECT_LEN => {
            Ok(sub.clone())
        }
        _ => Err(AuthnError::Malformed(format!(
            "`sub` must be a string of 1 to {MAX_SUBJECT_LEN} bytes"
        ))),
    }
}

/// The verified `jti`, if it is a non-empty string.
fn jti_of(claims: &Map<String, Value>) -> Option<String> {
    match claims.get("jti") {
        Some(Value::String(jti)) if !jti.is_empty() => Some(jti.clone()),
        _ => None,
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
        let token = sign(&f.key, &claims());
        let a = f.auth.verify_jwt(&token).await.unwrap();
        assert_eq!(
            a.subject,
            "spiffe://quorate.local/agent/dev/repo%3Aocto%2Fapp%3Aref%3Arefs%2Fheads%2Fmain"
        );
        assert_eq!(a.issuer, ISS);
        assert_eq!(a.external_subject, SUB);
        assert_eq!(a.method, AuthMethod::Oidc);
        assert_eq!(a.method.to_string(), "oidc");
        assert_eq!(a.expires_at, Some(exp));
        assert_eq!(a.jti.as_deref(), Some("j-1"));
        assert_eq!(
            a.presented.as_ref().map(PresentedJwt::as_str),
            Some(&*token)
        );
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

    // --- JWT-SVIDs and client assertions -------------------------------------------------

    const TD: &str = "example.org";
    const WORKLOAD: &str = "spiffe://example.org/ns/agents/sa/bot";
    const CLIENT: &str = "billing-bot";
    const QUORATE_ISSUER: &str = "https://quorate.example";
    const TOKEN_ENDPOINT: &str = "https://quorate.example/token";

    /// A SPIFFE bundle (SPIRE-style: no `alg` on the keys) with `jwt` as JWT authorities
    /// and `x509` as X.509 authorities.
    fn spiffe_bundle(jwt: &[&IssuerKey], x509: &[&IssuerKey], hint: Option<u64>) -> String {
        let entry = |k: &IssuerKey, use_: &str| {
            let mut jwk = k.jwk.clone();
            jwk["use"] = json!(use_);
            jwk.as_object_mut().unwrap().remove("alg");
            jwk
        };
        let mut keys: Vec<Value> = jwt.iter().map(|k| entry(k, "jwt-svid")).collect();
        keys.extend(x509.iter().map(|k| entry(k, "x509-svid")));
        let mut doc = json!({ "spiffe_sequence": 7, "keys": keys });
        if let Some(hint) = hint {
            doc["spiffe_refresh_hint"] = json!(hint);
        }
        doc.to_string()
    }

    struct SpiffeFixture {
        dir: tempfile::TempDir,
        /// The OIDC issuer's key (`k1`).
        oidc: IssuerKey,
        /// The trust domain's JWT authority (`j1`).
        svid: IssuerKey,
        /// The trust domain's X.509 authority (`x1`).
        x509: IssuerKey,
        /// The registered client's key (`c1`).
        client: IssuerKey,
        auth: Authenticator,
    }

    /// OIDC issuer `dev`, trust domain `example.org` with a JWT bundle file (audience
    /// `quorate`), client `billing-bot` with a JWKS file; client assertions addressed to
    /// [`QUORATE_ISSUER`] or [`TOKEN_ENDPOINT`].
    async fn spiffe_fixture() -> SpiffeFixture {
        let dir = tempfile::tempdir().unwrap();
        let (oidc, svid, x509, client) = (
            es256_key("k1"),
            es256_key("j1"),
            es256_key("x1"),
            es256_key("c1"),
        );
        std::fs::write(dir.path().join("jwks.json"), jwks(&[&oidc])).unwrap();
        std::fs::write(
            dir.path().join("bundle.json"),
            spiffe_bundle(&[&svid], &[&x509], Some(300)),
        )
        .unwrap();
        std::fs::write(dir.path().join("client.json"), jwks(&[&client])).unwrap();
        let text = json!({
            "oidc": [ { "name": "dev", "issuer": ISS, "audiences": ["quorate"],
                        "jwks_file": "jwks.json" } ],
            "svid": [ { "trust_domain": TD, "jwt_bundle_file": "bundle.json",
                        "audiences": ["quorate"] } ],
            "clients": [ { "client_id": CLIENT, "jwks_file": "client.json",
                           "algorithms": ["ES256"] } ],
        })
        .to_string();
        let cfg = AuthnConfig::from_json(&text, dir.path()).unwrap();
        let auth = Authenticator::new(cfg, DOMAIN)
            .await
            .unwrap()
            .with_client_assertion_audiences(client_assertion_audiences_for([QUORATE_ISSUER]));
        SpiffeFixture {
            dir,
            oidc,
            svid,
            x509,
            client,
            auth,
        }
    }

    /// JWT-SVID claims for `sub`, valid now.
    fn svid_claims(sub: &str) -> Value {
        let now = now();
        json!({ "sub": sub, "aud": "quorate", "exp": now + 300, "iat": now, "jti": "s-1",
                "team": "blue" })
    }

    /// Client assertion claims of [`CLIENT`] to [`TOKEN_ENDPOINT`], valid now for 120 s.
    fn assertion_claims() -> Value {
        let now = now();
        json!({ "iss": CLIENT, "sub": CLIENT, "aud": TOKEN_ENDPOINT, "exp": now + 120,
                "iat": now, "jti": "a-1" })
    }

    fn without(mut claims: Value, key: &str) -> Value {
        claims.as_object_mut().unwrap().remove(key);
        claims
    }

    #[tokio::test]
    async fn jwt_svid_gives_attestation() {
        let f = spiffe_fixture().await;
        assert_eq!(f.auth.issuers(), [ISS, "spiffe://example.org"]);
        assert_eq!(f.auth.clients(), [CLIENT]);
        let svid = svid_claims(WORKLOAD);
        let token = sign(&f.svid, &svid);
        let a = f.auth.verify_jwt(&token).await.unwrap();
        assert_eq!(a.subject, WORKLOAD);
        assert_eq!(a.external_subject, WORKLOAD);
        assert_eq!(a.issuer, "spiffe://example.org");
        assert_eq!(a.method, AuthMethod::JwtSvid);
        assert_eq!(a.method.to_string(), "jwt-svid");
        assert_eq!(serde_json::to_value(a.method).unwrap(), json!("jwt-svid"));
        assert_eq!(a.jti.as_deref(), Some("s-1"));
        assert_eq!(a.expires_at, svid["exp"].as_i64());
        assert_eq!(
            a.presented.as_ref().map(PresentedJwt::as_str),
            Some(&*token)
        );
        assert_eq!(
            a.claims,
            BTreeMap::from([("team".to_owned(), "blue".to_owned())])
        );

        // `iss` is optional and, when it names nothing trusted, not a reason to refuse;
        // `typ` JWT is allowed; without `kid`, the bundle's only JWT authority is used
        // (the X.509 authority never is).
        let c = with(
            svid_claims(WORKLOAD),
            "iss",
            json!("https://spire.example.org"),
        );
        let a = f.auth.verify_jwt(&sign(&f.svid, &c)).await.unwrap();
        assert_eq!(
            (a.subject.as_str(), a.jti.as_deref()),
            (WORKLOAD, Some("s-1"))
        );
        let mut header = Header::new(Algorithm::ES256);
        header.typ = Some("JWT".to_owned());
        let c = without(svid_claims(WORKLOAD), "jti");
        let token = jsonwebtoken::encode(&header, &c, &f.svid.encoding).unwrap();
        let a = f.auth.verify_jwt(&token).await.unwrap();
        assert_eq!(a.jti, None);

        // An OIDC issuer named by `iss` wins over a SPIFFE ID `sub`: the same claims
        // signed by the issuer are an OIDC JWT, not a JWT-SVID.
        let c = with(claims(), "sub", json!(WORKLOAD));
        let a = f.auth.verify_jwt(&sign(&f.oidc, &c)).await.unwrap();
        assert_eq!(a.method, AuthMethod::Oidc);
        assert!(
            a.subject.starts_with("spiffe://quorate.local/agent/dev/"),
            "{a:?}"
        );
    }

    #[tokio::test]
    async fn jwt_svid_refusals() {
        let f = spiffe_fixture().await;
        let refused = |token: String| {
            let auth = &f.auth;
            async move { auth.verify_jwt(&token).await.unwrap_err() }
        };

        let e = refused(sign(
            &f.svid,
            &with(svid_claims(WORKLOAD), "aud", json!("other")),
        ))
        .await;
        assert!(
            matches!(
                e,
                AuthnError::WrongAudience {
                    method: AuthMethod::JwtSvid,
                    ..
                }
            ),
            "{e}"
        );
        assert_eq!(
            e.to_string(),
            "JWT-SVID audience is not accepted: fetch a JWT-SVID for one of: quorate"
        );
        for claim in ["aud", "exp"] {
            let e = refused(sign(&f.svid, &without(svid_claims(WORKLOAD), claim))).await;
            assert!(
                matches!(&e, AuthnError::MissingClaim(c) if c == claim),
                "{e}"
            );
        }
        let e = refused(sign(
            &f.svid,
            &with(svid_claims(WORKLOAD), "exp", json!(now() - 120)),
        ))
        .await;
        assert!(matches!(e, AuthnError::Expired), "{e}");

        // The X.509 authority's key, named by its kid, is refused by name.
        let e = refused(sign(&f.x509, &svid_claims(WORKLOAD))).await;
        assert!(
            matches!(e, AuthnError::KeyUnusable { ref kid, .. } if kid == "x1"),
            "{e}"
        );
        assert!(
            e.to_string()
                .contains("key with use x509-svid cannot verify a JWT-SVID"),
            "{e}"
        );
        // A key outside the bundle: under the bundle's kid, under its own, and the
        // OIDC issuer's (each key source is its own).
        let stranger = es256_key("j1");
        let e = refused(sign(&stranger, &svid_claims(WORKLOAD))).await;
        assert!(matches!(e, AuthnError::BadSignature), "{e}");
        let e = refused(sign(&es256_key("j9"), &svid_claims(WORKLOAD))).await;
        assert!(
            matches!(&e, AuthnError::NoKey { kid, issuer } if kid == "j9" && issuer == "spiffe://example.org"),
            "{e}"
        );
        let e = refused(sign(&f.oidc, &svid_claims(WORKLOAD))).await;
        assert!(matches!(e, AuthnError::NoKey { .. }), "{e}");

        // A trust domain without a JWT bundle, named with everything that is trusted.
        let e = refused(sign(&f.svid, &svid_claims("spiffe://elsewhere.org/w"))).await;
        assert!(matches!(e, AuthnError::UnknownIssuer { .. }), "{e}");
        assert_eq!(
            e.to_string(),
            format!(
                "attestation has no iss and the trust domain `elsewhere.org` of its SPIFFE ID sub is not trusted for JWT-SVIDs; \
                 trusted: OIDC issuers {ISS}; JWT-SVID trust domains example.org; registered clients billing-bot"
            )
        );
        let c = with(
            svid_claims("spiffe://elsewhere.org/w"),
            "iss",
            json!("https://x"),
        );
        let e = refused(sign(&f.svid, &c)).await;
        assert!(
            e.to_string()
                .contains("`https://x` is not trusted, nor is the trust domain `elsewhere.org`"),
            "{e}"
        );
        // The cluster's own trust domain, even signed by a trusted authority.
        let e = refused(sign(
            &f.svid,
            &svid_claims("spiffe://quorate.local/coordinator"),
        ))
        .await;
        assert!(matches!(e, AuthnError::JwtSvid(_)), "{e}");
        assert!(e.to_string().contains("cluster's own trust domain"), "{e}");
        // Not a SPIFFE ID; a typ of another kind of token.
        let e = refused(sign(&f.svid, &svid_claims("spiffe://example.org/a/../b"))).await;
        assert!(matches!(e, AuthnError::JwtSvid(_)), "{e}");
        assert!(e.to_string().contains("`..`"), "{e}");
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some("j1".to_owned());
        header.typ = Some("at+jwt".to_owned());
        let token =
            jsonwebtoken::encode(&header, &svid_claims(WORKLOAD), &f.svid.encoding).unwrap();
        let e = refused(token).await;
        assert!(
            e.to_string()
                .contains("JWT-SVID header typ `at+jwt` is neither JWT nor JOSE"),
            "{e}"
        );
        // No iss and no SPIFFE ID sub: nothing to route by.
        let e = refused(sign(
            &f.svid,
            &with(svid_claims(WORKLOAD), "sub", json!("bot")),
        ))
        .await;
        assert!(
            matches!(&e, AuthnError::MissingClaim(c) if c == "iss"),
            "{e}"
        );
    }

    #[tokio::test]
    async fn jwt_bundle_file_is_reloaded_when_it_changes() {
        let f = spiffe_fixture().await;
        let j2 = es256_key("j2");
        let e = f
            .auth
            .verify_jwt(&sign(&j2, &svid_claims(WORKLOAD)))
            .await
            .unwrap_err();
        assert!(matches!(e, AuthnError::NoKey { .. }), "{e}");
        // Rotation: j2 replaces j1 (the size changes, whatever the mtime clock).
        std::fs::write(
            f.dir.path().join("bundle.json"),
            spiffe_bundle(&[&j2], &[&f.x509, &f.svid], None),
        )
        .unwrap();
        f.auth
            .verify_jwt(&sign(&j2, &svid_claims(WORKLOAD)))
            .await
            .unwrap();
        // j1 is now an X.509 authority only: refused by name.
        let e = f
            .auth
            .verify_jwt(&sign(&f.svid, &svid_claims(WORKLOAD)))
            .await
            .unwrap_err();
        assert!(e.to_string().contains("use x509-svid"), "{e}");
        // A rewrite that does not load keeps the previous keys.
        std::fs::write(
            f.dir.path().join("bundle.json"),
            spiffe_bundle(&[], &[&j2], None),
        )
        .unwrap();
        f.auth
            .verify_jwt(&sign(&j2, &svid_claims(WORKLOAD)))
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn client_assertion_gives_attestation() {
        let f = spiffe_fixture().await;
        assert_eq!(
            f.auth.client_assertion_audiences(),
            [QUORATE_ISSUER, TOKEN_ENDPOINT]
        );
        let token = sign(&f.client, &assertion_claims());
        let a = f.auth.verify_jwt(&token).await.unwrap();
        assert_eq!(a.subject, "spiffe://quorate.local/client/billing-bot");
        assert_eq!(a.issuer, CLIENT);
        assert_eq!(a.external_subject, CLIENT);
        assert_eq!(a.method, AuthMethod::PrivateKeyJwt);
        assert_eq!(a.method.to_string(), "private-key-jwt");
        assert_eq!(
            serde_json::to_value(a.method).unwrap(),
            json!("private-key-jwt")
        );
        assert_eq!(a.jti.as_deref(), Some("a-1"));
        assert_eq!(
            a.presented.as_ref().map(PresentedJwt::as_str),
            Some(&*token)
        );
        assert!(a.claims.is_empty(), "{:?}", a.claims);

        // The issuer itself as audience, in an array; 300 s exactly; no iat (lifetime
        // counted from now).
        let c = with(assertion_claims(), "aud", json!(["x", QUORATE_ISSUER]));
        let iat = c["iat"].as_i64().unwrap();
        let c = with(c, "exp", json!(iat + 300));
        f.auth.verify_jwt(&sign(&f.client, &c)).await.unwrap();
        let c = with(
            without(assertion_claims(), "iat"),
            "exp",
            json!(now() + 200),
        );
        f.auth.verify_jwt(&sign(&f.client, &c)).await.unwrap();
    }

    #[tokio::test]
    async fn client_assertion_refusals() {
        let f = spiffe_fixture().await;
        let refused = |claims: Value| {
            let (auth, key) = (&f.auth, &f.client);
            async move { auth.verify_jwt(&sign(key, &claims)).await.unwrap_err() }
        };
        let e = refused(with(assertion_claims(), "sub", json!("other-bot"))).await;
        assert!(matches!(e, AuthnError::ClientAssertion(_)), "{e}");
        assert!(
            e.to_string()
                .contains("client assertion sub `other-bot` differs from its iss `billing-bot`"),
            "{e}"
        );
        let e = refused(without(assertion_claims(), "sub")).await;
        assert!(
            matches!(&e, AuthnError::MissingClaim(c) if c == "sub"),
            "{e}"
        );
        let e = refused(without(assertion_claims(), "jti")).await;
        assert!(
            e.to_string().starts_with("client assertion lacks `jti`"),
            "{e}"
        );
        let e = refused(with(assertion_claims(), "jti", json!(""))).await;
        assert!(
            e.to_string().starts_with("client assertion lacks `jti`"),
            "{e}"
        );
        let e = refused(without(assertion_claims(), "exp")).await;
        assert!(
            matches!(&e, AuthnError::MissingClaim(c) if c == "exp"),
            "{e}"
        );

        let now = now();
        let long_from = |iat: i64| with(assertion_claims(), "iat", json!(iat));
        let e = refused(with(long_from(now), "exp", json!(now + 3600))).await;
        assert!(
            e.to_string()
                .starts_with("client assertion lifetime 3600 s exceeds 300 s (exp - iat)"),
            "{e}"
        );
        let long = with(without(assertion_claims(), "iat"), "exp", json!(now + 1000));
        let e = refused(long).await;
        assert!(e.to_string().contains("exceeds 300 s (exp - now"), "{e}");
        // One second over the limit.
        let e = refused(with(long_from(now), "exp", json!(now + 301))).await;
        assert!(
            e.to_string().contains("lifetime 301 s exceeds 300 s"),
            "{e}"
        );

        let e = refused(with(assertion_claims(), "aud", json!("quorate"))).await;
        assert!(
            matches!(
                e,
                AuthnError::WrongAudience {
                    method: AuthMethod::PrivateKeyJwt,
                    ..
                }
            ),
            "{e}"
        );
        assert!(
            e.to_string().contains(&format!(
                "client assertion audience is not accepted: its aud must contain one of: {QUORATE_ISSUER}, {TOKEN_ENDPOINT}"
            )),
            "{e}"
        );
        // Another client's key, or the trust domain's, is not this client's.
        let e = f
            .auth
            .verify_jwt(&sign(&f.svid, &assertion_claims()))
            .await
            .unwrap_err();
        assert!(
            matches!(&e, AuthnError::NoKey { issuer, .. } if issuer == CLIENT),
            "{e}"
        );
        // ES384 is not among the client's algorithms (checked before any key).
        let token = hand_made(
            &json!({ "alg": "ES384", "kid": "c1" }),
            &assertion_claims(),
            b"s",
        );
        let e = f.auth.verify_jwt(&token).await.unwrap_err();
        assert!(
            e.to_string().contains("ES256 (for client billing-bot)"),
            "{e}"
        );

        // Without client-assertion audiences, no client assertion is accepted.
        let text = json!({ "clients": [ { "client_id": CLIENT, "jwks_file": "client.json" } ] })
            .to_string();
        let bare = Authenticator::new(AuthnConfig::from_json(&text, f.dir.path()).unwrap(), DOMAIN)
            .await
            .unwrap();
        assert!(bare.client_assertion_audiences().is_empty());
        let e = bare
            .verify_jwt(&sign(&f.client, &assertion_claims()))
            .await
            .unwrap_err();
        assert!(
            e.to_string()
                .contains("this service has no client-assertion audience configured"),
            "{e}"
        );
        // Setting them makes the same assertion pass.
        let with_audiences =
            bare.with_client_assertion_audiences(vec![String::new(), TOKEN_ENDPOINT.to_owned()]);
        assert_eq!(
            with_audiences.client_assertion_audiences(),
            [TOKEN_ENDPOINT]
        );
        with_audiences
            .verify_jwt(&sign(&f.client, &assertion_claims()))
            .await
            .unwrap();
    }

    #[test]
    fn client_assertion_audiences_are_the_issuer_and_its_token_endpoint() {
        assert_eq!(
            client_assertion_audiences_for(["https://a.example/", "", "https://b.example"]),
            [
                "https://a.example/",
                "https://a.example/token",
                "https://b.example",
                "https://b.example/token"
            ]
        );
        assert_eq!(
            client_assertion_audiences_for(["https://a", "https://a"]),
            ["https://a", "https://a/token"]
        );
    }

    /// `none` and `HS*` are refused before the token is routed anywhere: with nothing
    /// trusted at all the refusal is still about the algorithm, for JWT-SVID-shaped and
    /// client-assertion-shaped tokens alike.
    #[tokio::test]
    async fn alg_none_and_hmac_are_refused_before_routing() {
        let f = spiffe_fixture().await;
        let nobody = Authenticator::empty(DOMAIN);
        for claims in [svid_claims(WORKLOAD), assertion_claims()] {
            let mut tokens = vec![hand_made(&json!({ "alg": "none" }), &claims, b"")];
            for key in [&f.svid, &f.client, &f.x509] {
                for secret in [key.public_pem.as_bytes(), &key.public_raw[..]] {
                    let hmac = EncodingKey::from_secret(secret).unwrap();
                    tokens.push(sign_as(Algorithm::HS256, Some(&key.kid), &claims, &hmac));
                }
            }
            for token in &tokens {
                for auth in [&f.auth, &nobody] {
                    let e = auth.verify_jwt(token).await.unwrap_err();
                    assert!(
                        matches!(&e, AuthnError::UntrustedAlgorithm { alg, .. }
                            if alg == "none" || alg == "HS256"),
                        "{e}"
                    );
                }
            }
        }
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
            cfg.svid[0].bundle_file.as_deref(),
            Some(Path::new("/etc/quorate/bundle.pem"))
        );
        assert_eq!(cfg.svid[0].jwt, None);
        assert!(cfg.clients.is_empty());
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
            "svid[0] (Bad Domain): give at least one of `bundle_file` (X.509-SVIDs) and `jwt_bundle_file` / `jwt_bundle_url` (JWT-SVIDs)",
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
            "svid[0] (Bad Domain): trust_domain `Bad Domain`",
            "the trust domain `example.org` is configured twice",
        ] {
            assert!(all.contains(needle), "missing `{needle}` in:\n{all}");
        }
        assert!(
            AuthnConfig::from_file("/nonexistent/trust.json").unwrap_err()[0]
                .contains("/nonexistent/trust.json")
        );
    }

    #[test]
    fn svid_and_client_entries_parse_with_defaults() {
        let text = json!({
            "svid": [
                { "trust_domain": "example.org", "bundle_file": "ca.pem",
                  "jwt_bundle_file": "bundle.json", "audiences": ["quorate"] },
                { "trust_domain": "prod.example.com", "jwt_bundle_url": "https://spire.example.com/bundle",
                  "audiences": ["quorate", "q2"], "algorithms": ["RS256", "PS256"],
                  "ca_file": "spire-root.pem", "refresh_seconds": 60 },
            ],
            "clients": [
                { "client_id": "billing-bot", "jwks_file": "keys/billing.json" },
                { "client_id": "A.b_c-9", "jwks_url": "https://keys.example/jwks",
                  "algorithms": ["ES384"], "ca_file": "/etc/extra.pem", "refresh_seconds": 900 },
            ],
        })
        .to_string();
        let cfg = AuthnConfig::from_json(&text, Path::new("/etc/quorate")).unwrap();
        assert!(cfg.problems().is_empty(), "{:?}", cfg.problems());
        let [both, jwt_only] = cfg.svid.as_slice() else {
            panic!("{cfg:?}")
        };
        assert_eq!(
            both.bundle_file.as_deref(),
            Some(Path::new("/etc/quorate/ca.pem"))
        );
        assert_eq!(
            both.jwt,
            Some(JwtSvidConfig {
                bundle: JwksSource::File("/etc/quorate/bundle.json".into()),
                audiences: vec!["quorate".into()],
                algorithms: JwsAlgorithm::DEFAULT.to_vec(),
                ca_file: None,
                refresh: DEFAULT_REFRESH,
            })
        );
        assert_eq!(jwt_only.bundle_file, None);
        let jwt = jwt_only.jwt.as_ref().unwrap();
        assert_eq!(
            jwt.bundle,
            JwksSource::Url("https://spire.example.com/bundle".into())
        );
        assert_eq!(jwt.algorithms, [JwsAlgorithm::Rs256, JwsAlgorithm::Ps256]);
        assert_eq!(
            jwt.ca_file.as_deref(),
            Some(Path::new("/etc/quorate/spire-root.pem"))
        );
        assert_eq!(jwt.refresh, Duration::from_secs(60));
        assert_eq!(
            cfg.clients,
            [
                RegisteredClientConfig {
                    client_id: "billing-bot".into(),
                    jwks: JwksSource::File("/etc/quorate/keys/billing.json".into()),
                    algorithms: JwsAlgorithm::DEFAULT.to_vec(),
                    ca_file: None,
                    refresh: DEFAULT_REFRESH,
                },
                RegisteredClientConfig {
                    client_id: "A.b_c-9".into(),
                    jwks: JwksSource::Url("https://keys.example/jwks".into()),
                    algorithms: vec![JwsAlgorithm::Es384],
                    ca_file: Some("/etc/extra.pem".into()),
                    refresh: Duration::from_secs(900),
                },
            ]
        );
    }

    #[test]
    fn svid_and_client_entries_report_every_problem() {
        let long_id = "c".repeat(65);
        let text = json!({
            "oidc": [ { "name": "dev", "issuer": "shared-id", "audiences": ["q"], "jwks_file": "j" } ],
            "svid": [
                { "trust_domain": "a.org" },
                { "trust_domain": "b.org", "jwt_bundle_file": "b.json" },
                { "trust_domain": "c.org", "jwt_bundle_file": "c.json", "jwt_bundle_url": "https://c/",
                  "audiences": [""], "algorithms": ["EdDSA"] },
                { "trust_domain": "d.org", "bundle_file": "d.pem", "audiences": ["q"],
                  "refresh_seconds": 60 },
                { "trust_domain": "e.org", "jwt_bundle_file": "e.json", "audiences": ["q"],
                  "ca_file": "x.pem", "refresh_seconds": 60, "jwks_url": "https://e/" },
            ],
            "clients": [
                { "client_id": "bad id!", "jwks_file": "k.json" },
                { "client_id": "..", "jwks_file": "k.json" },
                { "client_id": long_id, "jwks_file": "k.json" },
                { "client_id": "dup", "jwks_file": "k.json" },
                { "client_id": "dup", "jwks_url": "http://k/" },
                { "client_id": "nokeys" },
                { "client_id": "shared-id", "jwks_file": "k.json", "audiences": ["q"] },
                { "jwks_file": "k.json" },
            ],
        })
        .to_string();
        let all = AuthnConfig::from_json(&text, Path::new("/"))
            .unwrap_err()
            .join("\n");
        for needle in [
            "svid[0] (a.org): give at least one of `bundle_file` (X.509-SVIDs) and `jwt_bundle_file` / `jwt_bundle_url` (JWT-SVIDs)",
            "svid[1] (b.org): `audiences` is required with a JWT bundle",
            "svid[2] (c.org): give exactly one of `jwt_bundle_file` and `jwt_bundle_url`, not both",
            "svid[2] (c.org): an audience must not be empty",
            "svid[2] (c.org): algorithm `EdDSA` is not a JWT-SVID algorithm",
            "svid[3] (d.org): `audiences` applies only to JWT-SVIDs",
            "svid[3] (d.org): `refresh_seconds` applies only to JWT-SVIDs",
            "svid[4] (e.org): unknown field `jwks_url`",
            "svid[4] (e.org): `refresh_seconds` applies only to `jwt_bundle_url` (a jwt_bundle_file is re-read when it changes)",
            "svid[4] (e.org): ca_file applies only to jwt_bundle_url (a jwt_bundle_file needs no TLS)",
            "clients[0] (bad id!): client_id `bad id!` must be 1 to 64 characters of A-Z, a-z, 0-9, `.`, `_` and `-`",
            "clients[1] (..): client_id `..` must not be `.` or `..`",
            "clients[2] (ccc",
            "clients[4] (dup): jwks_url: ",
            "clients[5] (nokeys): one of `jwks_file` and `jwks_url` is required",
            "clients[6] (shared-id): unknown field `audiences`",
            "clients[7]: `client_id` is required",
        ] {
            assert!(all.contains(needle), "missing `{needle}` in:\n{all}");
        }
        // Duplicates and clashes across entries, together.
        let text = json!({
            "oidc": [ { "name": "dev", "issuer": "shared-id", "audiences": ["q"], "jwks_file": "j" } ],
            "clients": [
                { "client_id": "dup", "jwks_file": "k.json" },
                { "client_id": "dup", "jwks_file": "k.json" },
                { "client_id": "shared-id", "jwks_file": "k.json" },
            ],
        })
        .to_string();
        let all = AuthnConfig::from_json(&text, Path::new("/"))
            .unwrap_err()
            .join("\n");
        for needle in [
            "clients: the client_id `dup` is registered twice",
            "clients: the client_id `shared-id` is also the issuer of an oidc entry",
        ] {
            assert!(all.contains(needle), "missing `{needle}` in:\n{all}");
        }
        // The same rules for a configuration built in code.
        let cfg = AuthnConfig {
            svid: vec![SvidTrustConfig {
                trust_domain: "x.org".into(),
                bundle_file: None,
                jwt: None,
            }],
            clients: vec![RegisteredClientConfig {
                client_id: ".".into(),
                jwks: JwksSource::File("k.json".into()),
                algorithms: vec![],
                ca_file: None,
                refresh: DEFAULT_REFRESH,
            }],
            ..AuthnConfig::default()
        };
        let all = cfg.problems().join("\n");
        for needle in [
            "svid[0]: give at least one of `bundle_file`",
            "clients[0]: client_id `.` must not be",
            "clients[0] (.): algorithms must list at least one algorithm",
        ] {
            assert!(all.contains(needle), "missing `{needle}` in:\n{all}");
        }
    }

    #[tokio::test]
    async fn new_reports_unusable_spiffe_bundles_and_client_keys() {
        let dir = tempfile::tempdir().unwrap();
        let key = es256_key("k");
        std::fs::write(
            dir.path().join("x509-only.json"),
            spiffe_bundle(&[], &[&key], None),
        )
        .unwrap();
        // A plain JWKS (`use: sig`) is no SPIFFE bundle: its keys are not JWT authorities.
        std::fs::write(dir.path().join("plain.json"), jwks(&[&key])).unwrap();
        let mut hinted: Value = serde_json::from_str(&spiffe_bundle(&[&key], &[], None)).unwrap();
        hinted["spiffe_refresh_hint"] = json!("soon");
        std::fs::write(dir.path().join("hinted.json"), hinted.to_string()).unwrap();
        // A client's JWKS is a plain one: SPIFFE-bundle keys are not signature keys.
        std::fs::write(
            dir.path().join("client.json"),
            spiffe_bundle(&[&key], &[], None),
        )
        .unwrap();
        let text = json!({
            "svid": [
                { "trust_domain": "a.org", "jwt_bundle_file": "x509-only.json", "audiences": ["q"] },
                { "trust_domain": "b.org", "jwt_bundle_file": "plain.json", "audiences": ["q"] },
                { "trust_domain": "c.org", "jwt_bundle_file": "hinted.json", "audiences": ["q"] },
                { "trust_domain": DOMAIN, "jwt_bundle_file": "plain.json", "audiences": ["q"] },
            ],
            "clients": [ { "client_id": "c", "jwks_file": "client.json" } ],
        })
        .to_string();
        let cfg = AuthnConfig::from_json(&text, dir.path()).unwrap();
        let err = Authenticator::new(cfg, DOMAIN).await.unwrap_err();
        for needle in [
            "svid trust domain a.org: JWT bundle: ",
            "x509-only.json: the SPIFFE bundle holds no usable JWT authority (1 entries",
            "svid trust domain b.org: JWT bundle: ",
            "plain.json: the SPIFFE bundle holds no usable JWT authority",
            "hinted.json: the SPIFFE bundle's `spiffe_refresh_hint` must be a non-negative integer",
            "svid trust domain quorate.local: this is the cluster's own trust domain",
            "client c: ",
            "client.json: the JWKS holds no usable public signing key",
        ] {
            assert!(err.contains(needle), "missing `{needle}` in:\n{err}");
        }
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
        assert_eq!((a.jti, a.presented), (None, None));
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

    /// A `jwt_bundle_url` is fetched and cached like a `jwks_url`, and a bundle's
    /// `spiffe_refresh_hint` shortens how long it is cached.
    #[tokio::test]
    async fn jwt_bundle_url_is_cached_for_its_refresh_hint() {
        let j1 = es256_key("j1");
        let served = Arc::new(Mutex::new(spiffe_bundle(&[&j1], &[], Some(0))));
        let hits = Arc::new(AtomicUsize::new(0));
        let (served2, hits2) = (Arc::clone(&served), Arc::clone(&hits));
        let server = TestServer::start(Arc::new(move |req| {
            if req.path == "/bundle" {
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
        let text = json!({ "svid": [ {
            "trust_domain": TD, "jwt_bundle_url": server.url("/bundle"), "ca_file": "ca.pem",
            "audiences": ["quorate"],
        } ] })
        .to_string();
        let cfg = AuthnConfig::from_json(&text, dir.path()).unwrap();
        let auth = Authenticator::build(cfg, DOMAIN, Duration::ZERO).unwrap();
        let hits_now = || hits.load(Ordering::SeqCst);
        let token = sign(&j1, &svid_claims(WORKLOAD));

        assert_eq!(hits_now(), 0, "fetched lazily");
        // Hint 0: stale at once, so every verification fetches.
        for expected in 1..=2 {
            let a = auth.verify_jwt(&token).await.unwrap();
            assert_eq!(a.method, AuthMethod::JwtSvid);
            assert_eq!(hits_now(), expected);
        }
        // Without a hint: the configured 300 s, so cached.
        *served.lock().unwrap() = spiffe_bundle(&[&j1], &[], None);
        auth.verify_jwt(&token).await.unwrap();
        assert_eq!(hits_now(), 3);
        auth.verify_jwt(&token).await.unwrap();
        auth.verify_jwt(&token).await.unwrap();
        assert_eq!(hits_now(), 3, "cached");
        // An X.509 authority's kid is refused by name from a fetched bundle too, without
        // a refetch (the kid is known).
        let x1 = es256_key("x1");
        *served.lock().unwrap() = spiffe_bundle(&[&j1], &[&x1], None);
        let e = auth
            .verify_jwt(&sign(&x1, &svid_claims(WORKLOAD)))
            .await
            .unwrap_err();
        assert_eq!(hits_now(), 4, "an unknown kid refreshes");
        assert!(e.to_string().contains("use x509-svid"), "{e}");
        auth.verify_jwt(&sign(&x1, &svid_claims(WORKLOAD)))
            .await
            .unwrap_err();
        assert_eq!(hits_now(), 4, "a known X.509 kid needs no refetch");
    }
}
