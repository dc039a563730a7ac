//! # quorate-example-resource-server
//!
//! A small resource server — the shape an MCP server takes — that protects one tool,
//! `POST /tools/echo`, with Quorate access tokens, following the MCP authorization
//! specification:
//!
//! - **Discovery** (OpenID Connect Discovery 1.0 §4): the issuer's
//!   `/.well-known/openid-configuration` is fetched over HTTPS with
//!   [`quorate_proto::https`], its `issuer` must equal the configured one, and its
//!   `jwks_uri` gives the signing keys. Keys are cached; a token whose `kid` is not in the
//!   cache triggers one refetch of the JWKS, at most once per [`JWKS_REFETCH_INTERVAL`],
//!   which is how a rotated key reaches this verifier.
//! - **Verification** (RFC 9068 §4): header `alg` ES256 and `typ` `at+jwt`; signature
//!   under the key the `kid` names; `iss`, `aud`, `exp` (and `nbf`) with
//!   [`LEEWAY_SECONDS`] of clock skew; `iat`, `sub` and `jti` present; then the token's
//!   `scope` must contain the tool's scope.
//! - **Challenges** (RFC 6750 §3, RFC 9728 §5.1): a request without a usable bearer token
//!   gets `401` with `WWW-Authenticate: Bearer resource_metadata="…"`, which is how an MCP
//!   client finds the authorization server; an invalid token gets `401` with
//!   `error="invalid_token"`; a valid token lacking the scope gets `403` with
//!   `error="insufficient_scope"`.
//! - **DPoP** (RFC 9449): a token with `"cnf": {"jkt": …}` is bound to a key and must come
//!   as `Authorization: DPoP <token>` with exactly one `DPoP: <proof>` header. The token is
//!   verified as above, then the proof with [`quorate_proto::dpop::verify`]: method and URL
//!   of this request (`htu` = [`Config::public_url`] + path, so behind a proxy pass
//!   `--public-url`), at most [`DPOP_MAX_AGE_SECONDS`] old, `ath` the hash of this token;
//!   its key's thumbprint must be the token's `cnf.jkt`, and its `jti` must be new (a
//!   [`ReplayCache`] remembers proofs while they would verify). A bound token sent as
//!   `Bearer` is refused (a stolen bound token is useless without the key), and so is an
//!   unbound token sent as `DPoP` (RFC 9449 §7.1). Proof problems are answered with
//!   `WWW-Authenticate: DPoP error="invalid_dpop_proof", error_description="…",
//!   algs="ES256"`; a request without credentials is offered both schemes.
//! - **Metadata** (RFC 9728 §3): `GET /.well-known/oauth-protected-resource`, with
//!   `dpop_signing_alg_values_supported`.
//!
//! Tokens and proofs are never logged: log lines carry the subject, `jti` and the reason a
//! token or proof was refused, never the token, the proof or attacker-chosen header values.
//!
//! # Transport
//!
//! The server speaks plain HTTP, meant for `127.0.0.1`. Bearer tokens must not cross a
//! network in clear: in production put a TLS-terminating proxy in front of it, or serve
//! with rustls as the coordinator's metadata listener does
//! (`quorate_proto::transport::incoming` with a rustls server configuration).
//!
//! # Layout
//!
//! [`Args`] and [`Config`] (flags, checked all at once), [`Verifier`] (discovery, JWKS
//! cache, verification), [`router`] (the axum routes over an [`AppState`]) and [`Server`]
//! (bind, then serve until SIGTERM/SIGINT). `main.rs` only wires these together.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

use std::collections::HashMap;
use std::future::{Future, IntoFuture};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, Instant};

use axum::extract::rejection::JsonRejection;
use axum::extract::{DefaultBodyLimit, FromRequestParts, State};
use axum::http::header::{AUTHORIZATION, CACHE_CONTROL, RETRY_AFTER, WWW_AUTHENTICATE};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, JwkSet, KeyAlgorithm, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use quorate_proto::dpop::{self, DpopError, ReplayCache};
use quorate_proto::https::{self, HttpsError};
use rustls::RootCertStore;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use serde::Deserialize;
use serde_json::json;

/// Default listen address.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8080";

/// Shortest time between two JWKS fetches (the initial one included): a flood of tokens
/// with made-up `kid`s costs the issuer at most one request per interval.
pub const JWKS_REFETCH_INTERVAL: Duration = Duration::from_secs(10);

/// Clock skew allowed on `exp`, `nbf` and `iat`, in seconds.
pub const LEEWAY_SECONDS: u64 = 30;

/// Largest request body accepted by the tool, in bytes (64 KiB).
pub const MAX_BODY: usize = 64 * 1024;

/// Path of the RFC 9728 protected-resource metadata document.
pub const METADATA_PATH: &str = "/.well-known/oauth-protected-resource";

/// Path of the protected tool.
pub const TOOL_PATH: &str = "/tools/echo";

/// The JOSE `typ` of access tokens (RFC 9068 §2.1).
pub const TOKEN_TYP: &str = "at+jwt";

/// Human-readable name in the metadata document (RFC 9728 §2 `resource_name`).
pub const RESOURCE_NAME: &str = "Quorate example tool";

/// How old a DPoP proof may be, in seconds (a proof is made just before its request).
pub const DPOP_MAX_AGE_SECONDS: i64 = 60;

/// The DPoP proof request header (RFC 9449 §4.1).
pub const DPOP_HEADER: &str = "dpop";

/// Drain time for in-flight requests after SIGTERM/SIGINT.
pub const GRACE: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------------------
// Configuration
// ---------------------------------------------------------------------------------------

/// Command-line flags (with environment fallbacks) of `quorate-resource-server`.
#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "quorate-resource-server",
    version,
    about = "Example resource server (MCP-style tool) protected by Quorate access tokens"
)]
pub struct Args {
    /// The token issuer (the Quorate coordinator's issuer URL, `https://…`); discovery is
    /// fetched from `<issuer>/.well-known/openid-configuration`.
    #[arg(long, env = "QUORATE_ISSUER", value_name = "URL")]
    pub issuer: String,
    /// PEM file of root certificates that verify the issuer's HTTPS certificate (the
    /// cluster CA). Without it no root is trusted and discovery fails.
    #[arg(long, env = "QUORATE_CACERT", value_name = "FILE")]
    pub ca: Option<PathBuf>,
    /// The audience tokens must be issued for (`aud`).
    #[arg(long, default_value = "dev", value_name = "AUD")]
    pub audience: String,
    /// The scope a token must carry to call the tool.
    #[arg(long, default_value = "tools:run", value_name = "SCOPE")]
    pub scope: String,
    /// Address to listen on (port 0: any free port).
    #[arg(long, default_value = DEFAULT_LISTEN, value_name = "ADDR")]
    pub listen: SocketAddr,
    /// The resource identifier announced in metadata and challenges (default
    /// `http://<bound address>`).
    #[arg(long, value_name = "URL")]
    pub resource: Option<String>,
    /// The URL clients reach this server at (scheme, host, port, optional path prefix),
    /// which DPoP proofs name in `htu` (default `http://<bound address>`). Set it behind
    /// a proxy, e.g. `https://tools.example.com`.
    #[arg(long, value_name = "URL")]
    pub public_url: Option<String>,
}

/// Checked configuration: every flag parsed, the CA file read.
#[derive(Debug, Clone)]
pub struct Config {
    /// The issuer URL, exactly as tokens carry it in `iss`.
    pub issuer: String,
    /// Roots trusted for the issuer's HTTPS certificate (empty without `--ca`).
    pub roots: RootCertStore,
    /// Where the roots came from, for messages.
    pub ca: Option<PathBuf>,
    /// The required audience.
    pub audience: String,
    /// The required scope.
    pub scope: String,
    /// The listen address.
    pub listen: SocketAddr,
    /// The resource identifier, if given (otherwise derived from the bound address).
    pub resource: Option<String>,
    /// The public URL of this server, if given (otherwise derived from the bound
    /// address): DPoP proofs must name `<public_url><request path>` in `htu`.
    pub public_url: Option<String>,
}

/// Every problem found in the flags, reported together.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration:\n  - {}", .0.join("\n  - "))]
pub struct ConfigError(pub Vec<String>);

impl Config {
    /// Checks `args` and reads the CA file; reports every error at once.
    pub fn from_args(args: Args) -> Result<Self, ConfigError> {
        let mut errors = Vec::new();
        if let Err(e) = https::check_url(&args.issuer) {
            errors.push(format!("--issuer: {e}"));
        }
        if args.audience.is_empty() {
            errors.push("--audience must not be empty".to_owned());
        }
        if !valid_scope(&args.scope) {
            errors.push(format!(
                "--scope {:?} is not one OAuth scope token (printable ASCII without space, `\"` or `\\`)",
                args.scope
            ));
        }
        if let Some(r) = &args.resource
            && let Err(reason) = check_resource(r)
        {
            errors.push(format!("--resource {r:?}: {reason}"));
        }
        if let Some(u) = &args.public_url
            && let Err(reason) = check_public_url(u)
        {
            errors.push(format!("--public-url {u:?}: {reason}"));
        }
        let mut roots = RootCertStore::empty();
        if let Some(path) = &args.ca {
            match load_roots(path) {
                Ok(r) => roots = r,
                Err(e) => errors.push(format!("--ca {}: {e}", path.display())),
            }
        }
        if !errors.is_empty() {
            return Err(ConfigError(errors));
        }
        Ok(Self {
            issuer: args.issuer,
            roots,
            ca: args.ca,
            audience: args.audience,
            scope: args.scope,
            listen: args.listen,
            resource: args.resource,
            public_url: args.public_url.map(|u| u.trim_end_matches('/').to_owned()),
        })
    }
}

/// Reads every certificate of a PEM file into a root store.
fn load_roots(path: &std::path::Path) -> Result<RootCertStore, String> {
    let mut roots = RootCertStore::empty();
    let certs = CertificateDer::pem_file_iter(path).map_err(|e| e.to_string())?;
    for cert in certs {
        let cert = cert.map_err(|e| e.to_string())?;
        roots
            .add(cert)
            .map_err(|e| format!("not a usable root certificate: {e}"))?;
    }
    if roots.is_empty() {
        return Err("no certificate in the file".to_owned());
    }
    Ok(roots)
}

/// A scope token (RFC 6749 §3.3: `%x21 / %x23-5B / %x5D-7E`); also safe inside a quoted
/// `WWW-Authenticate` parameter.
fn valid_scope(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b == 0x21 || (0x23..=0x5B).contains(&b) || (0x5D..=0x7E).contains(&b))
}

/// The resource identifier must be an absolute http(s) URL without fragment that can sit
/// inside a quoted header parameter.
fn check_resource(r: &str) -> Result<(), &'static str> {
    let lower = r.to_ascii_lowercase();
    if !(lower.starts_with("https://") || lower.starts_with("http://")) {
        return Err("must be an absolute http:// or https:// URL");
    }
    if r.contains('#') {
        return Err("must not contain a fragment (RFC 8707 §2)");
    }
    if r.bytes()
        .any(|b| !b.is_ascii_graphic() || b == b'"' || b == b'\\')
    {
        return Err("must be printable ASCII without spaces, quotes or backslashes");
    }
    Ok(())
}

/// Where the metadata of `resource` lives (RFC 9728 §3.1): the well-known suffix
/// inserted between the host component and the path (and query), after dropping a
/// terminating `/` that follows the host. `http://h:1/tools/echo` →
/// `(http://h:1/.well-known/oauth-protected-resource/tools/echo, its path)`;
/// `https://h/` → `(https://h/.well-known/oauth-protected-resource, …)`. The resource
/// must have passed `check_resource`.
pub fn metadata_location(resource: &str) -> (String, String) {
    let after_scheme = resource.find("://").map_or(0, |i| i + 3);
    let (origin, rest) = match resource
        .get(after_scheme..)
        .and_then(|r| r.find(['/', '?']))
    {
        Some(i) => resource.split_at(after_scheme + i),
        None => (resource, ""),
    };
    let rest = if rest == "/" { "" } else { rest };
    let rest = rest
        .strip_prefix("/?")
        .map_or(rest.to_owned(), |q| format!("?{q}"));
    let path = rest.split('?').next().unwrap_or_default();
    (
        format!("{origin}{METADATA_PATH}{rest}"),
        format!("{METADATA_PATH}{path}"),
    )
}

/// The public URL must be an absolute http(s) URL without query or fragment (requests'
/// paths are appended to it).
fn check_public_url(u: &str) -> Result<(), &'static str> {
    check_resource(u)?;
    if u.contains('?') {
        return Err("must not contain a query");
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Verification
// ---------------------------------------------------------------------------------------

/// Why a presented token was refused. [`TokenError::description`] is the short reason sent
/// back in `error_description`; none of them repeats anything from the token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TokenError {
    /// Not a compact JWS with a parsable header and claims.
    #[error("malformed token")]
    Malformed,
    /// The header `alg` is not ES256 (this includes `none` and HMAC algorithm confusion).
    #[error("algorithm is not ES256")]
    WrongAlgorithm,
    /// The header `typ` is not `at+jwt` (RFC 9068 §4): an ID token or other JWT.
    #[error("not an access token (typ must be at+jwt)")]
    WrongType,
    /// The header has no `kid`.
    #[error("token has no key id")]
    NoKeyId,
    /// The `kid` names no key of the issuer, even after refetching the JWKS.
    #[error("unknown signing key")]
    UnknownKey,
    /// The signature does not verify.
    #[error("bad signature")]
    BadSignature,
    /// `exp` has passed (beyond the leeway).
    #[error("token expired")]
    Expired,
    /// `nbf` is in the future (beyond the leeway).
    #[error("token not yet valid")]
    NotYetValid,
    /// `iat` is in the future (beyond the leeway).
    #[error("token issued in the future")]
    IssuedInFuture,
    /// `aud` is not this resource server's audience.
    #[error("wrong audience")]
    WrongAudience,
    /// `iss` is not the configured issuer.
    #[error("wrong issuer")]
    WrongIssuer,
    /// A required claim is missing or empty.
    #[error("missing claim {0}")]
    MissingClaim(&'static str),
    /// The token's `kid` was unknown and refetching the JWKS failed: a problem on our side
    /// or the issuer's, not necessarily the token's.
    #[error("signing keys unavailable")]
    KeysUnavailable,
    /// The token is bound to a DPoP key (`cnf.jkt`) but came as `Bearer` (RFC 9449 §7.2).
    #[error("DPoP-bound token presented as a bearer token")]
    DpopBoundAsBearer,
    /// The token came with the `DPoP` scheme but is not bound to a key (RFC 9449 §7.1).
    #[error("token is not DPoP-bound: present it as a bearer token")]
    NotDpopBound,
    /// The token's `cnf` names a confirmation method other than `jkt` (e.g. an mTLS
    /// certificate, RFC 8705) that this server cannot check.
    #[error("token is bound by an unsupported confirmation method")]
    UnsupportedConfirmation,
}

impl TokenError {
    /// The short reason for `error_description`: static text, no token contents, and
    /// nothing that needs escaping in a quoted header parameter.
    pub fn description(&self) -> &'static str {
        match self {
            Self::Malformed => "malformed token",
            Self::WrongAlgorithm => "algorithm is not ES256",
            Self::WrongType => "not an access token (typ must be at+jwt)",
            Self::NoKeyId => "token has no key id",
            Self::UnknownKey => "unknown signing key",
            Self::BadSignature => "bad signature",
            Self::Expired => "token expired",
            Self::NotYetValid => "token not yet valid",
            Self::IssuedInFuture => "token issued in the future",
            Self::WrongAudience => "wrong audience",
            Self::WrongIssuer => "wrong issuer",
            Self::MissingClaim(c) => match *c {
                "exp" => "missing claim exp",
                "iat" => "missing claim iat",
                "iss" => "missing claim iss",
                "aud" => "missing claim aud",
                "sub" => "missing claim sub",
                "jti" => "missing claim jti",
                _ => "missing required claim",
            },
            Self::KeysUnavailable => "signing keys unavailable",
            Self::DpopBoundAsBearer => "DPoP-bound token presented as a bearer token",
            Self::NotDpopBound => "token is not DPoP-bound: present it as a bearer token",
            Self::UnsupportedConfirmation => "token is bound by an unsupported confirmation method",
        }
    }
}

/// A verified access token: the claims a tool needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessToken {
    /// `sub`: the agent (`spiffe://<domain>/agent/<issuer>/<subject>`).
    pub subject: String,
    /// `client_id`, if present.
    pub client_id: Option<String>,
    /// `jti`: the token's id (its revocation handle).
    pub jti: String,
    /// `scope`: space-separated scopes (empty if absent).
    pub scope: String,
    /// `task_id`, if the token serves a task.
    pub task_id: Option<String>,
    /// `exp`, unix seconds.
    pub expires_at: i64,
    /// The `kid` of the key that signed it.
    pub kid: String,
    /// `cnf.jkt`: the thumbprint of the DPoP key the token is bound to, if it is.
    pub jkt: Option<String>,
}

impl AccessToken {
    /// The scopes, split on spaces (RFC 6749 §3.3).
    pub fn scopes(&self) -> impl Iterator<Item = &str> {
        self.scope.split(' ').filter(|s| !s.is_empty())
    }

    /// Whether the token carries `scope`.
    pub fn has_scope(&self, scope: &str) -> bool {
        self.scopes().any(|s| s == scope)
    }
}

/// Claims read from a token after jsonwebtoken checked signature, `iss`, `aud`, `exp`,
/// `nbf`. Everything optional here is checked explicitly to name what is missing.
#[derive(Deserialize)]
struct Claims {
    sub: Option<String>,
    jti: Option<String>,
    iat: Option<f64>,
    exp: Option<f64>,
    #[serde(default)]
    scope: Option<String>,
    #[serde(default)]
    task_id: Option<String>,
    #[serde(default)]
    client_id: Option<String>,
    /// RFC 7800 confirmation; `jkt` (RFC 9449 §6.1) is the only method understood.
    #[serde(default)]
    cnf: Option<serde_json::Map<String, serde_json::Value>>,
}

/// Why discovery or a JWKS fetch failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DiscoveryError {
    /// The HTTPS exchange failed (connect, TLS, timeout, …).
    #[error("{source}{hint}")]
    Https {
        /// The error from the HTTPS client; it names the URL.
        #[source]
        source: HttpsError,
        /// Advice appended to the message (empty if none).
        hint: &'static str,
    },
    /// The server answered with a status other than 2xx.
    #[error("{url} answered HTTP {status}")]
    Status {
        /// The URL fetched.
        url: String,
        /// The status.
        status: u16,
    },
    /// The body is not the JSON document expected.
    #[error("{url} did not return a valid {what}: {reason}")]
    Document {
        /// The URL fetched.
        url: String,
        /// Which document was expected.
        what: &'static str,
        /// The parse error.
        reason: String,
    },
    /// The discovery document names another issuer (OpenID Connect Discovery §4.3).
    #[error(
        "the discovery document at {url} names issuer {found:?}, not {expected:?}: --issuer must be exactly the issuer URL tokens carry"
    )]
    IssuerMismatch {
        /// The discovery URL.
        url: String,
        /// `--issuer`.
        expected: String,
        /// The document's `issuer`.
        found: String,
    },
}

/// Advice added to TLS errors when no root is trusted.
const NO_ROOTS_HINT: &str = " (no --ca or QUORATE_CACERT was given, so no root certificate is trusted: pass the cluster CA, e.g. --ca quorate-dev/ca.pem)";

/// The parts of an OpenID discovery document used here.
#[derive(Deserialize)]
struct DiscoveryDoc {
    issuer: String,
    jwks_uri: String,
}

/// A boxed JWKS fetch.
type FetchFuture = Pin<Box<dyn Future<Output = Result<JwkSet, String>> + Send>>;

/// How the JWKS is fetched again when a `kid` is unknown.
type Fetch = Arc<dyn Fn() -> FetchFuture + Send + Sync>;

/// The usable keys of a JWKS, by `kid`.
type Keys = HashMap<String, Arc<DecodingKey>>;

/// Verifies Quorate access tokens: discovery, a JWKS cache refreshed on unknown `kid`s,
/// and RFC 9068 checks.
pub struct Verifier {
    issuer: String,
    audience: String,
    validation: Validation,
    /// The cached keys; read on every request, replaced on refetch.
    keys: RwLock<Keys>,
    /// How to refetch the JWKS (`None`: fixed keys).
    fetch: Option<Fetch>,
    /// When the JWKS was last fetched. The async mutex also serialises refetches, so
    /// concurrent requests with a new `kid` wait for one fetch instead of starting many.
    last_fetch: tokio::sync::Mutex<Option<Instant>>,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier")
            .field("issuer", &self.issuer)
            .field("audience", &self.audience)
            .field("kids", &self.kids())
            .field("refetch", &self.fetch.is_some())
            .finish()
    }
}

impl Verifier {
    /// Discovers `issuer` over HTTPS (server certificate checked against `roots`), checks
    /// the discovery document names the same issuer, and fetches its JWKS. Tokens must be
    /// for `audience`.
    pub async fn discover(
        issuer: &str,
        audience: &str,
        roots: RootCertStore,
    ) -> Result<Self, DiscoveryError> {
        let hint = if roots.is_empty() { NO_ROOTS_HINT } else { "" };
        let tls = https::public_client_config(roots)
            .map_err(|source| DiscoveryError::Https { source, hint: "" })?;
        let url = format!(
            "{}/.well-known/openid-configuration",
            issuer.trim_end_matches('/')
        );
        let doc: DiscoveryDoc =
            get_json(&url, Arc::clone(&tls), hint, "OpenID discovery document").await?;
        if doc.issuer != issuer {
            return Err(DiscoveryError::IssuerMismatch {
                url,
                expected: issuer.to_owned(),
                found: doc.issuer,
            });
        }
        let jwks_uri = doc.jwks_uri;
        let jwks: JwkSet = get_json(&jwks_uri, Arc::clone(&tls), hint, "JWKS").await?;
        let fetched_at = Instant::now();
        let verifier = Self::from_jwks(issuer, audience, &jwks);
        tracing::info!(issuer, %jwks_uri, kids = ?verifier.kids(), "issuer discovered");
        if verifier.kids().is_empty() {
            tracing::warn!(
                %jwks_uri,
                "the JWKS has no usable ES256 key yet: every token is refused until one appears"
            );
        }
        let fetch: Fetch = Arc::new(move || {
            let (uri, tls) = (jwks_uri.clone(), Arc::clone(&tls));
            Box::pin(async move {
                get_json::<JwkSet>(&uri, tls, hint, "JWKS")
                    .await
                    .map_err(|e| e.to_string())
            })
        });
        Ok(Self {
            fetch: Some(fetch),
            last_fetch: tokio::sync::Mutex::new(Some(fetched_at)),
            ..verifier
        })
    }

    /// A verifier with fixed keys from `jwks` and no refetching (tests, offline use).
    /// Add a refetch with [`Verifier::with_refetch`].
    pub fn from_jwks(issuer: &str, audience: &str, jwks: &JwkSet) -> Self {
        let mut validation = Validation::new(Algorithm::ES256);
        validation.set_issuer(&[issuer]);
        validation.set_audience(&[audience]);
        // jsonwebtoken enforces presence of exp, iss, aud and sub; iat and jti are
        // checked in `verify`.
        validation.set_required_spec_claims(&["exp", "iat", "iss", "aud", "sub", "jti"]);
        validation.leeway = LEEWAY_SECONDS;
        validation.validate_exp = true;
        validation.validate_nbf = true;
        validation.validate_aud = true;
        Self {
            issuer: issuer.to_owned(),
            audience: audience.to_owned(),
            validation,
            keys: RwLock::new(usable_keys(jwks)),
            fetch: None,
            last_fetch: tokio::sync::Mutex::new(None),
        }
    }

    /// Refetches the JWKS with `fetch` when a token's `kid` is unknown (at most once per
    /// [`JWKS_REFETCH_INTERVAL`]; the first refetch may happen at once).
    pub fn with_refetch<F, Fut>(mut self, fetch: F) -> Self
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<JwkSet, String>> + Send + 'static,
    {
        self.fetch = Some(Arc::new(move || Box::pin(fetch())));
        self
    }

    /// The issuer tokens must come from.
    pub fn issuer(&self) -> &str {
        &self.issuer
    }

    /// The audience tokens must be for.
    pub fn audience(&self) -> &str {
        &self.audience
    }

    /// The `kid`s currently cached, sorted.
    pub fn kids(&self) -> Vec<String> {
        let keys = self.keys.read().unwrap_or_else(PoisonError::into_inner);
        let mut kids: Vec<String> = keys.keys().cloned().collect();
        kids.sort();
        kids
    }

    /// Verifies `token` (a compact JWS) as an RFC 9068 access token for this issuer and
    /// audience. Scope is not checked here: see [`AccessToken::has_scope`].
    pub async fn verify(&self, token: &str) -> Result<AccessToken, TokenError> {
        let header = jsonwebtoken::decode_header(token).map_err(|_| TokenError::Malformed)?;
        // Pinned before any key is touched: no `none`, no HMAC keyed with a public key.
        if header.alg != Algorithm::ES256 {
            return Err(TokenError::WrongAlgorithm);
        }
        if !header.typ.as_deref().is_some_and(is_access_token_typ) {
            return Err(TokenError::WrongType);
        }
        let kid = header.kid.ok_or(TokenError::NoKeyId)?;
        let key = self.key_for(&kid).await?;
        let claims = jsonwebtoken::decode::<Claims>(token, &key, &self.validation)
            .map_err(|e| map_jwt_error(e.kind()))?
            .claims;
        let subject = non_empty(claims.sub).ok_or(TokenError::MissingClaim("sub"))?;
        let jti = non_empty(claims.jti).ok_or(TokenError::MissingClaim("jti"))?;
        let iat = claims.iat.ok_or(TokenError::MissingClaim("iat"))?;
        let exp = claims.exp.ok_or(TokenError::MissingClaim("exp"))?;
        let now = jsonwebtoken::get_current_timestamp();
        if iat > now.saturating_add(LEEWAY_SECONDS) as f64 {
            return Err(TokenError::IssuedInFuture);
        }
        let jkt = match claims.cnf {
            None => None,
            Some(cnf) => match cnf.get("jkt") {
                Some(serde_json::Value::String(jkt)) if !jkt.is_empty() => Some(jkt.clone()),
                Some(_) => return Err(TokenError::Malformed),
                None => return Err(TokenError::UnsupportedConfirmation),
            },
        };
        Ok(AccessToken {
            subject,
            client_id: claims.client_id,
            jti,
            scope: claims.scope.unwrap_or_default(),
            task_id: claims.task_id,
            // `as` saturates; jsonwebtoken already checked `exp` is a future number.
            expires_at: exp as i64,
            kid,
            jkt,
        })
    }

    /// The cached key for `kid`, if any.
    fn cached(&self, kid: &str) -> Option<Arc<DecodingKey>> {
        self.keys
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(kid)
            .cloned()
    }

    /// The key for `kid`, refetching the JWKS once if it is unknown and the last fetch is
    /// older than [`JWKS_REFETCH_INTERVAL`].
    async fn key_for(&self, kid: &str) -> Result<Arc<DecodingKey>, TokenError> {
        if let Some(key) = self.cached(kid) {
            return Ok(key);
        }
        let Some(fetch) = &self.fetch else {
            return Err(TokenError::UnknownKey);
        };
        let mut last = self.last_fetch.lock().await;
        // Another request may have refetched while this one waited for the lock.
        if let Some(key) = self.cached(kid) {
            return Ok(key);
        }
        let now = Instant::now();
        if !may_refetch(*last, now) {
            return Err(TokenError::UnknownKey);
        }
        *last = Some(now);
        match fetch().await {
            Ok(jwks) => {
                let keys = usable_keys(&jwks);
                *self.keys.write().unwrap_or_else(PoisonError::into_inner) = keys;
                tracing::info!(kids = ?self.kids(), "JWKS refetched for an unknown kid");
            }
            Err(e) => {
                tracing::warn!(error = %e, "JWKS refetch failed; keeping the cached keys");
                return Err(TokenError::KeysUnavailable);
            }
        }
        self.cached(kid).ok_or(TokenError::UnknownKey)
    }
}

/// Whether a refetch may start at `now` after the last fetch at `last`.
fn may_refetch(last: Option<Instant>, now: Instant) -> bool {
    last.is_none_or(|t| now.saturating_duration_since(t) >= JWKS_REFETCH_INTERVAL)
}

/// `at+jwt` or `application/at+jwt`, case-insensitively (RFC 7515 §4.1.9, RFC 9068 §4).
fn is_access_token_typ(typ: &str) -> bool {
    let typ = typ
        .get(..12)
        .filter(|p| p.eq_ignore_ascii_case("application/"))
        .and_then(|_| typ.get(12..))
        .unwrap_or(typ);
    typ.eq_ignore_ascii_case(TOKEN_TYP)
}

fn non_empty(s: Option<String>) -> Option<String> {
    s.filter(|s| !s.is_empty())
}

fn map_jwt_error(kind: &jsonwebtoken::errors::ErrorKind) -> TokenError {
    use jsonwebtoken::errors::ErrorKind as K;
    match kind {
        K::InvalidSignature | K::InvalidEcdsaKey | K::InvalidKeyFormat => TokenError::BadSignature,
        K::ExpiredSignature => TokenError::Expired,
        K::ImmatureSignature => TokenError::NotYetValid,
        K::InvalidAudience => TokenError::WrongAudience,
        K::InvalidIssuer => TokenError::WrongIssuer,
        K::InvalidAlgorithm | K::UnsupportedAlgorithm => TokenError::WrongAlgorithm,
        K::MissingRequiredClaim(c) => TokenError::MissingClaim(match c.as_str() {
            "exp" => "exp",
            "iss" => "iss",
            "aud" => "aud",
            "sub" => "sub",
            _ => "required",
        }),
        _ => TokenError::Malformed,
    }
}

/// The ES256 signing keys of `jwks` by `kid`: EC P-256 keys with a `kid`, whose `use` (if
/// given) is `sig` and `alg` (if given) ES256. Others are skipped.
fn usable_keys(jwks: &JwkSet) -> Keys {
    let mut keys = Keys::new();
    for jwk in &jwks.keys {
        let Some(kid) = &jwk.common.key_id else {
            continue;
        };
        if jwk
            .common
            .public_key_use
            .as_ref()
            .is_some_and(|u| *u != PublicKeyUse::Signature)
            || jwk
                .common
                .key_algorithm
                .is_some_and(|a| a != KeyAlgorithm::ES256)
        {
            continue;
        }
        let AlgorithmParameters::EllipticCurve(ec) = &jwk.algorithm else {
            continue;
        };
        if ec.curve != EllipticCurve::P256 {
            continue;
        }
        match DecodingKey::from_ec_components(&ec.x, &ec.y) {
            Ok(key) => {
                keys.insert(kid.clone(), Arc::new(key));
            }
            Err(e) => tracing::warn!(%kid, error = %e, "skipping a JWKS key that does not parse"),
        }
    }
    keys
}

/// GETs `url` and parses a 2xx JSON body as `T`.
async fn get_json<T: serde::de::DeserializeOwned>(
    url: &str,
    tls: Arc<rustls::ClientConfig>,
    hint: &'static str,
    what: &'static str,
) -> Result<T, DiscoveryError> {
    let response = https::get(url, tls).await.map_err(|source| {
        let hint = if matches!(source, HttpsError::Tls { .. }) {
            hint
        } else {
            ""
        };
        DiscoveryError::Https { source, hint }
    })?;
    if !response.is_success() {
        return Err(DiscoveryError::Status {
            url: url.to_owned(),
            status: response.status,
        });
    }
    serde_json::from_slice(&response.body).map_err(|e| DiscoveryError::Document {
        url: url.to_owned(),
        what,
        reason: e.to_string(),
    })
}

// ---------------------------------------------------------------------------------------
// HTTP
// ---------------------------------------------------------------------------------------

/// The HTTP authentication scheme credentials came with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    /// `Authorization: Bearer` (RFC 6750): whoever holds the token may use it.
    Bearer,
    /// `Authorization: DPoP` with a `DPoP` proof header (RFC 9449): the token is bound to
    /// a key the caller proves it holds.
    Dpop,
}

impl Scheme {
    /// The scheme's name in `Authorization` and `WWW-Authenticate`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Bearer => "Bearer",
            Self::Dpop => "DPoP",
        }
    }
}

/// Why a DPoP proof was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ProofError {
    /// No `DPoP` header.
    Missing,
    /// More than one `DPoP` header (RFC 9449 §4.3 step 1).
    Multiple,
    /// The proof failed [`dpop::verify`].
    Invalid(DpopError),
    /// The proof is valid but made with another key than the token is bound to.
    KeyMismatch,
    /// The proof was used before (its `jti` is remembered), or the replay cache is full.
    Replayed,
}

impl ProofError {
    /// The reason for `error_description`: static text that names the problem and fits
    /// in a quoted header parameter.
    pub fn description(&self) -> String {
        match self {
            Self::Missing => "missing DPoP proof header".to_owned(),
            Self::Multiple => "more than one DPoP proof header".to_owned(),
            // `DpopError` messages are static text, never proof contents; escaping is
            // only a second line of defence.
            Self::Invalid(e) => quoted_safe(&e.to_string()),
            Self::KeyMismatch => {
                "DPoP proof key does not match the token's key (cnf.jkt)".to_owned()
            }
            Self::Replayed => "DPoP proof already used (make a fresh proof per request)".to_owned(),
        }
    }
}

/// `s` with everything that cannot sit in a quoted-string unescaped replaced by `?`.
fn quoted_safe(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c == ' ' || (c.is_ascii_graphic() && c != '"' && c != '\\') {
                c
            } else {
                '?'
            }
        })
        .collect()
}

/// Why a request to the tool was refused; each maps to a status and challenges.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Denial {
    /// No `Authorization: Bearer` or `DPoP` header, or one that does not parse: `401`
    /// with bare challenges for both schemes (RFC 6750 §3.1: no error code when no
    /// credentials were sent).
    NoToken,
    /// The token was refused: `401 invalid_token` in the scheme it came with (or `503`
    /// for [`TokenError::KeysUnavailable`]).
    InvalidToken(Scheme, TokenError),
    /// The DPoP proof was refused: `401 invalid_dpop_proof` (RFC 9449 §7.1).
    InvalidDpopProof(ProofError),
    /// The token is valid but lacks the tool's scope: `403 insufficient_scope`.
    InsufficientScope(Scheme),
}

impl Denial {
    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::NoToken | Self::InvalidDpopProof(_) => StatusCode::UNAUTHORIZED,
            Self::InvalidToken(_, TokenError::KeysUnavailable) => StatusCode::SERVICE_UNAVAILABLE,
            Self::InvalidToken(..) => StatusCode::UNAUTHORIZED,
            Self::InsufficientScope(_) => StatusCode::FORBIDDEN,
        }
    }

    /// The `WWW-Authenticate` values, one header each (RFC 6750 §3, RFC 9449 §7.1, RFC
    /// 9728 §5.1): the challenge of the scheme used, plus a bare challenge of the other
    /// scheme when the token needs that one (or no credentials were sent). Empty when the
    /// refusal is not about the credentials ([`TokenError::KeysUnavailable`]).
    /// `resource_metadata` and `scope` must be free of `"` and `\` ([`Config`] checks).
    pub fn challenges(&self, resource_metadata: &str, scope: &str) -> Vec<String> {
        let meta = format!("resource_metadata=\"{resource_metadata}\"");
        let bearer = format!("Bearer {meta}");
        let dpop = format!("DPoP algs=\"{}\", {meta}", dpop::ALG);
        let dpop_error = |error: &str, description: &str| {
            format!(
                "DPoP error=\"{error}\", error_description=\"{description}\", algs=\"{}\", {meta}",
                dpop::ALG
            )
        };
        match self {
            Self::NoToken => vec![bearer, dpop],
            Self::InvalidToken(_, TokenError::KeysUnavailable) => Vec::new(),
            Self::InvalidToken(Scheme::Bearer, e) => {
                let mut challenges = vec![format!(
                    "Bearer error=\"invalid_token\", error_description=\"{}\", {meta}",
                    e.description()
                )];
                if *e == TokenError::DpopBoundAsBearer {
                    challenges.push(dpop);
                }
                challenges
            }
            Self::InvalidToken(Scheme::Dpop, e) => {
                let mut challenges = vec![dpop_error("invalid_token", e.description())];
                if *e == TokenError::NotDpopBound {
                    challenges.push(bearer);
                }
                challenges
            }
            Self::InvalidDpopProof(e) => vec![dpop_error("invalid_dpop_proof", &e.description())],
            Self::InsufficientScope(Scheme::Bearer) => vec![format!(
                "Bearer error=\"insufficient_scope\", scope=\"{scope}\", {meta}"
            )],
            Self::InsufficientScope(Scheme::Dpop) => vec![format!(
                "DPoP error=\"insufficient_scope\", scope=\"{scope}\", algs=\"{}\", {meta}",
                dpop::ALG
            )],
        }
    }

    /// The JSON error body.
    pub fn body(&self, resource_metadata: &str, scope: &str) -> serde_json::Value {
        match self {
            Self::NoToken => json!({
                "error": "unauthorized",
                "error_description": "this tool requires an access token (Bearer, or DPoP with a proof)",
                "resource_metadata": resource_metadata,
            }),
            Self::InvalidToken(_, TokenError::KeysUnavailable) => json!({
                "error": "temporarily_unavailable",
                "error_description": "the issuer's signing keys could not be fetched; retry later",
            }),
            Self::InvalidToken(_, e) => json!({
                "error": "invalid_token",
                "error_description": e.description(),
                "resource_metadata": resource_metadata,
            }),
            Self::InvalidDpopProof(e) => json!({
                "error": "invalid_dpop_proof",
                "error_description": e.description(),
                "resource_metadata": resource_metadata,
            }),
            Self::InsufficientScope(_) => json!({
                "error": "insufficient_scope",
                "error_description": format!("this tool requires the scope {scope}"),
                "scope": scope,
                "resource_metadata": resource_metadata,
            }),
        }
    }
}

/// Shared state of the routes.
#[derive(Debug)]
pub struct AppState {
    verifier: Verifier,
    resource: String,
    resource_metadata: String,
    /// The path the metadata is served at (RFC 9728 §3.1).
    metadata_path: String,
    scope: String,
    /// Where clients reach this server: DPoP `htu` = `public_url` + request path.
    public_url: String,
    /// DPoP proofs seen and still valid.
    replay: ReplayCache,
}

impl AppState {
    /// State for `resource` (the resource identifier, announced exactly as given, RFC
    /// 9728 §3.3) whose tool requires `scope`. The public URL defaults to the resource
    /// identifier's origin; set it with [`AppState::with_public_url`].
    pub fn new(verifier: Verifier, resource: &str, scope: &str) -> Self {
        let (resource_metadata, metadata_path) = metadata_location(resource);
        let origin = resource_metadata
            .split(METADATA_PATH)
            .next()
            .unwrap_or_default()
            .to_owned();
        Self {
            verifier,
            resource_metadata,
            metadata_path,
            public_url: origin,
            resource: resource.to_owned(),
            scope: scope.to_owned(),
            replay: ReplayCache::default(),
        }
    }

    /// Sets the URL clients reach this server at (no trailing `/`), which DPoP proofs
    /// name: `htu` = `public_url` + request path.
    pub fn with_public_url(mut self, public_url: &str) -> Self {
        self.public_url = public_url.trim_end_matches('/').to_owned();
        self
    }

    /// The verifier.
    pub fn verifier(&self) -> &Verifier {
        &self.verifier
    }

    /// The resource identifier.
    pub fn resource(&self) -> &str {
        &self.resource
    }

    /// The URL of the protected-resource metadata document.
    pub fn resource_metadata(&self) -> &str {
        &self.resource_metadata
    }

    /// The URL clients reach this server at.
    pub fn public_url(&self) -> &str {
        &self.public_url
    }

    /// The response for a refusal: status, challenges, JSON body.
    fn deny(&self, denial: &Denial) -> Response {
        let mut response = (
            denial.status(),
            Json(denial.body(&self.resource_metadata, &self.scope)),
        )
            .into_response();
        let headers = response.headers_mut();
        let challenges = denial.challenges(&self.resource_metadata, &self.scope);
        if challenges.is_empty() {
            headers.insert(RETRY_AFTER, HeaderValue::from_static("10"));
        }
        for challenge in challenges {
            match HeaderValue::from_str(&challenge) {
                Ok(v) => {
                    headers.append(WWW_AUTHENTICATE, v);
                }
                // Unreachable with a checked Config; never send a broken challenge.
                Err(_) => return StatusCode::INTERNAL_SERVER_ERROR.into_response(),
            }
        }
        headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
        response
    }

    /// Checks the DPoP proof of a request carrying the bound token `token` (verified,
    /// bound to `jkt`), then records it against replay.
    fn check_proof(
        &self,
        parts: &Parts,
        token: &str,
        jkt: &str,
    ) -> Result<dpop::Proof, ProofError> {
        let mut values = parts.headers.get_all(DPOP_HEADER).iter();
        let value = values.next().ok_or(ProofError::Missing)?;
        if values.next().is_some() {
            return Err(ProofError::Multiple);
        }
        let proof = value
            .to_str()
            .map_err(|_| ProofError::Invalid(DpopError::Malformed("the header is not ASCII")))?;
        let htu = format!("{}{}", self.public_url, parts.uri.path());
        let now = i64::try_from(jsonwebtoken::get_current_timestamp()).unwrap_or(i64::MAX);
        let expect = dpop::Expect {
            htm: parts.method.as_str(),
            htu: &htu,
            now,
            max_age_seconds: DPOP_MAX_AGE_SECONDS,
            access_token: Some(token),
        };
        let proof = dpop::verify(proof, &expect).map_err(ProofError::Invalid)?;
        if proof.jkt != jkt {
            return Err(ProofError::KeyMismatch);
        }
        // Last, so only a proof that passed every other check is remembered.
        let expires_at = proof.expires_at(DPOP_MAX_AGE_SECONDS);
        if !self
            .replay
            .check_and_insert(&proof.jkt, &proof.jti, expires_at, now)
        {
            return Err(ProofError::Replayed);
        }
        Ok(proof)
    }
}

/// The routes: `GET` the resource's metadata path (RFC 9728 §3.1: [`METADATA_PATH`]
/// followed by the resource identifier's path, see [`metadata_location`]) and `POST`
/// [`TOOL_PATH`] (bodies up to [`MAX_BODY`]).
pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route(&state.metadata_path.clone(), get(metadata))
        .route(TOOL_PATH, post(echo))
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(state)
}

/// RFC 9728 §2 protected-resource metadata.
async fn metadata(State(state): State<Arc<AppState>>) -> Response {
    let body = json!({
        "resource": state.resource,
        "authorization_servers": [state.verifier.issuer()],
        "scopes_supported": [state.scope],
        "bearer_methods_supported": ["header"],
        "resource_signing_alg_values_supported": ["ES256"],
        "dpop_signing_alg_values_supported": [dpop::ALG],
        "resource_name": RESOURCE_NAME,
    });
    let mut response = Json(body).into_response();
    response.headers_mut().insert(
        CACHE_CONTROL,
        HeaderValue::from_static("public, max-age=300"),
    );
    response
}

/// A request that carried a valid token with the tool's scope (and, for a DPoP-bound
/// token, a valid fresh proof by its key).
#[derive(Debug, Clone)]
pub struct Authorized(pub AccessToken);

impl FromRequestParts<Arc<AppState>> for Authorized {
    type Rejection = Response;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<AppState>,
    ) -> Result<Self, Self::Rejection> {
        let Some((scheme, token)) = authorization(&parts.headers) else {
            tracing::info!("refused: no usable Bearer or DPoP credentials");
            return Err(state.deny(&Denial::NoToken));
        };
        let access = match state.verifier.verify(token).await {
            Ok(access) => access,
            Err(e) => {
                tracing::info!(reason = %e, scheme = scheme.name(), "refused: invalid token");
                return Err(state.deny(&Denial::InvalidToken(scheme, e)));
            }
        };
        match (scheme, access.jkt.as_deref()) {
            (Scheme::Bearer, None) => {}
            (Scheme::Bearer, Some(_)) => {
                tracing::info!(sub = %access.subject, jti = %access.jti, "refused: DPoP-bound token sent as a bearer token");
                return Err(
                    state.deny(&Denial::InvalidToken(scheme, TokenError::DpopBoundAsBearer))
                );
            }
            (Scheme::Dpop, None) => {
                tracing::info!(sub = %access.subject, jti = %access.jti, "refused: unbound token sent with the DPoP scheme");
                return Err(state.deny(&Denial::InvalidToken(scheme, TokenError::NotDpopBound)));
            }
            (Scheme::Dpop, Some(jkt)) => {
                if let Err(e) = state.check_proof(parts, token, jkt) {
                    tracing::info!(
                        sub = %access.subject, jti = %access.jti, reason = %e.description(),
                        "refused: invalid DPoP proof"
                    );
                    return Err(state.deny(&Denial::InvalidDpopProof(e)));
                }
            }
        }
        if !access.has_scope(&state.scope) {
            tracing::info!(
                sub = %access.subject, jti = %access.jti, required = %state.scope,
                "refused: insufficient scope"
            );
            return Err(state.deny(&Denial::InsufficientScope(scheme)));
        }
        Ok(Self(access))
    }
}

/// The scheme and credentials of `Authorization: Bearer <token>` (RFC 6750 §2.1) or
/// `Authorization: DPoP <token>` (RFC 9449 §7.1), if there is exactly one
/// `Authorization` header, its scheme is one of these, and the token is `token68`.
pub fn authorization(headers: &HeaderMap) -> Option<(Scheme, &str)> {
    let mut values = headers.get_all(AUTHORIZATION).iter();
    let value = values.next()?;
    if values.next().is_some() {
        return None;
    }
    let (scheme, token) = value.to_str().ok()?.split_once(' ')?;
    let scheme = if scheme.eq_ignore_ascii_case("Bearer") {
        Scheme::Bearer
    } else if scheme.eq_ignore_ascii_case("DPoP") {
        Scheme::Dpop
    } else {
        return None;
    };
    let token = token.trim_start_matches(' ');
    is_token68(token).then_some((scheme, token))
}

/// The credentials of `Authorization: Bearer <token>` (RFC 6750 §2.1), if there is
/// exactly one such header and the token is `token68`.
pub fn bearer_token(headers: &HeaderMap) -> Option<&str> {
    match authorization(headers)? {
        (Scheme::Bearer, token) => Some(token),
        (Scheme::Dpop, _) => None,
    }
}

/// `token68 = 1*( ALPHA / DIGIT / "-" / "." / "_" / "~" / "+" / "/" ) *"="`.
fn is_token68(s: &str) -> bool {
    let body = s.trim_end_matches('=');
    !body.is_empty()
        && body
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._~+/".contains(&b))
}

/// The tool's input.
#[derive(Debug, Deserialize)]
struct EchoRequest {
    text: String,
}

/// `POST /tools/echo`: echoes `text` with who called.
async fn echo(
    State(state): State<Arc<AppState>>,
    Authorized(token): Authorized,
    body: Result<Json<EchoRequest>, JsonRejection>,
) -> Response {
    let Json(request) = match body {
        Ok(b) => b,
        Err(rejection) => {
            let status = rejection.status();
            let mut response = (
                status,
                Json(
                    json!({"error": "invalid_request", "error_description": rejection.body_text()}),
                ),
            )
                .into_response();
            response
                .headers_mut()
                .insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
            return response;
        }
    };
    // The extractor only lets a bound token through with the DPoP scheme, and an unbound
    // one with Bearer.
    let scheme = if token.jkt.is_some() {
        Scheme::Dpop
    } else {
        Scheme::Bearer
    };
    tracing::info!(
        sub = %token.subject, jti = %token.jti, kid = %token.kid,
        task = token.task_id.as_deref().unwrap_or("-"), bytes = request.text.len(),
        scheme = scheme.name(), resource = %state.resource, "tool called"
    );
    let mut response = Json(json!({
        "echo": request.text,
        "agent": token.subject,
        "task_id": token.task_id,
        "scope": token.scope,
        "jti": token.jti,
        "token_type": scheme.name(),
    }))
    .into_response();
    response
        .headers_mut()
        .insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

// ---------------------------------------------------------------------------------------
// Process
// ---------------------------------------------------------------------------------------

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    /// Discovery of the issuer failed.
    #[error("cannot discover the issuer: {0}")]
    Discovery(#[from] DiscoveryError),
    /// The listen address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The default resource identifier or public URL is not usable (an unusual bound
    /// address).
    #[error("{0:?} derived from the bound address is not usable; pass --resource and --public-url")]
    Resource(String),
}

/// A server that discovered its issuer and bound its address, not yet serving.
#[derive(Debug)]
pub struct Server {
    listener: tokio::net::TcpListener,
    addr: SocketAddr,
    state: Arc<AppState>,
}

impl Server {
    /// Discovers the issuer, then binds the listen address.
    pub async fn bind(config: Config) -> Result<Self, StartError> {
        let verifier =
            Verifier::discover(&config.issuer, &config.audience, config.roots.clone()).await?;
        let listener = tokio::net::TcpListener::bind(config.listen)
            .await
            .map_err(|source| StartError::Bind {
                addr: config.listen,
                source,
            })?;
        let addr = listener.local_addr().map_err(|source| StartError::Bind {
            addr: config.listen,
            source,
        })?;
        let resource = match config.resource {
            Some(r) => r,
            None => {
                let r = format!("http://{addr}");
                check_resource(&r).map_err(|_| StartError::Resource(r.clone()))?;
                r
            }
        };
        let public_url = match config.public_url {
            Some(u) => u,
            None => {
                let u = format!("http://{addr}");
                check_public_url(&u).map_err(|_| StartError::Resource(u.clone()))?;
                u
            }
        };
        let state = Arc::new(
            AppState::new(verifier, &resource, &config.scope).with_public_url(&public_url),
        );
        tracing::info!(
            %addr, resource = %state.resource, public_url = %state.public_url,
            audience = %config.audience, scope = %config.scope,
            "resource server listening"
        );
        Ok(Self {
            listener,
            addr,
            state,
        })
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The routes' state.
    pub fn state(&self) -> &Arc<AppState> {
        &self.state
    }

    /// Serves until `shutdown` resolves, then stops accepting and lets in-flight requests
    /// finish for at most [`GRACE`].
    pub async fn serve(self, shutdown: impl Future<Output = ()> + Send) -> std::io::Result<()> {
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let server = axum::serve(self.listener, router(self.state))
            .with_graceful_shutdown(async {
                let _ = stop_rx.await;
            })
            .into_future();
        let mut server = std::pin::pin!(server);
        tokio::select! {
            r = &mut server => return r,
            () = shutdown => {}
        }
        tracing::info!("shutting down: draining in-flight requests");
        let _ = stop_tx.send(());
        match tokio::time::timeout(GRACE, server).await {
            Ok(r) => r,
            Err(_) => {
                tracing::warn!("drain timed out");
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use aws_lc_rs::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair};
    use axum::body::Body;
    use axum::http::Request;
    use base64::Engine as _;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use http_body_util::BodyExt as _;
    use jsonwebtoken::{EncodingKey, Header};
    use quorate_proto::dpop::DpopKey;
    use quorate_proto::https::test_server::{TestRequest, TestResponse, TestServer};
    use serde_json::Value;
    use tower::ServiceExt as _;

    use super::*;

    const ISS: &str = "https://issuer.test";
    const AUD: &str = "dev";
    const SCOPE: &str = "tools:run";
    const RESOURCE: &str = "http://127.0.0.1:8080";
    const META: &str = "http://127.0.0.1:8080/.well-known/oauth-protected-resource";

    /// A local ES256 key with its JWK.
    struct TestKey {
        kid: String,
        pkcs8: Vec<u8>,
        public: Vec<u8>,
    }

    impl TestKey {
        fn new(kid: &str) -> Self {
            let pair = EcdsaKeyPair::generate(&ECDSA_P256_SHA256_FIXED_SIGNING).unwrap();
            Self {
                kid: kid.to_owned(),
                pkcs8: pair.to_pkcs8v1().unwrap().as_ref().to_vec(),
                public: pair.public_key().as_ref().to_vec(),
            }
        }

        fn jwk(&self) -> Value {
            json!({
                "kty": "EC", "crv": "P-256", "alg": "ES256", "use": "sig", "kid": self.kid,
                "x": URL_SAFE_NO_PAD.encode(&self.public[1..33]),
                "y": URL_SAFE_NO_PAD.encode(&self.public[33..65]),
            })
        }

        /// Signs `claims` as ES256 with this key's `kid` and header `typ`.
        fn sign_typ(&self, typ: Option<&str>, claims: &Value) -> String {
            let mut h = Header::new(Algorithm::ES256);
            h.kid = Some(self.kid.clone());
            h.typ = typ.map(str::to_owned);
            jsonwebtoken::encode(&h, claims, &EncodingKey::from_ec_der(&self.pkcs8)).unwrap()
        }

        fn sign(&self, claims: &Value) -> String {
            self.sign_typ(Some(TOKEN_TYP), claims)
        }
    }

    fn jwks(keys: &[&TestKey]) -> JwkSet {
        serde_json::from_value(json!({"keys": keys.iter().map(|k| k.jwk()).collect::<Vec<_>>()}))
            .unwrap()
    }

    fn now() -> i64 {
        jsonwebtoken::get_current_timestamp() as i64
    }

    /// Claims of a good token (as the coordinator issues them), with `changes` applied;
    /// a `null` change removes the claim.
    fn claims(changes: Value) -> Value {
        let now = now();
        let mut c = json!({
            "iss": ISS, "sub": "spiffe://quorate.test/agent/test/a1", "aud": AUD,
            "client_id": "spiffe://quorate.test/agent/test/a1",
            "iat": now, "nbf": now, "exp": now + 300, "jti": "j-1",
            "scope": "tools:read tools:run",
            "attestation": {"iss": "https://ci.test", "sub": "a1", "method": "oidc"},
        });
        for (k, v) in changes.as_object().unwrap() {
            if v.is_null() {
                c.as_object_mut().unwrap().remove(k);
            } else {
                c[k] = v.clone();
            }
        }
        c
    }

    fn verifier(key: &TestKey) -> Verifier {
        Verifier::from_jwks(ISS, AUD, &jwks(&[key]))
    }

    async fn refused(v: &Verifier, token: &str) -> TokenError {
        v.verify(token)
            .await
            .expect_err("the token must be refused")
    }

    #[tokio::test]
    async fn confirmation_claim() {
        let key = TestKey::new("k1");
        let v = verifier(&key);
        let t = v.verify(&key.sign(&claims(json!({})))).await.unwrap();
        assert_eq!(t.jkt, None);
        let t = v
            .verify(&key.sign(&claims(json!({"cnf": {"jkt": "abc"}}))))
            .await
            .unwrap();
        assert_eq!(t.jkt.as_deref(), Some("abc"));
        assert_eq!(
            refused(&v, &key.sign(&claims(json!({"cnf": {"x5t#S256": "abc"}})))).await,
            TokenError::UnsupportedConfirmation
        );
        for bad in [json!({"jkt": 7}), json!({"jkt": ""}), json!("jkt")] {
            assert_eq!(
                refused(&v, &key.sign(&claims(json!({ "cnf": bad })))).await,
                TokenError::Malformed,
                "{bad}"
            );
        }
    }

    #[tokio::test]
    async fn good_token_verifies() {
        let key = TestKey::new("k1");
        let v = verifier(&key);
        let t = v
            .verify(&key.sign(&claims(json!({"task_id": "t-9"}))))
            .await
            .unwrap();
        assert_eq!(t.subject, "spiffe://quorate.test/agent/test/a1");
        assert_eq!(t.jti, "j-1");
        assert_eq!(t.kid, "k1");
        assert_eq!(t.task_id.as_deref(), Some("t-9"));
        assert!(t.has_scope(SCOPE) && t.has_scope("tools:read"));
        assert!(!t.has_scope("tools") && !t.has_scope("tools:run:all"));
        // `application/at+jwt` is the same media type (RFC 9068 §2.1, RFC 7515 §4.1.9).
        let t = key.sign_typ(Some("application/AT+JWT"), &claims(json!({})));
        v.verify(&t).await.unwrap();
        // Inside the leeway.
        let t = key.sign(&claims(json!({"exp": now() - 10})));
        v.verify(&t).await.unwrap();
    }

    #[tokio::test]
    async fn header_checks() {
        let key = TestKey::new("k1");
        let v = verifier(&key);
        let c = claims(json!({}));
        assert_eq!(
            refused(&v, &key.sign_typ(Some("JWT"), &c)).await,
            TokenError::WrongType
        );
        assert_eq!(
            refused(&v, &key.sign_typ(None, &c)).await,
            TokenError::WrongType
        );

        // Algorithm confusion: HS256 keyed with the public key the JWKS publishes.
        let mut h = Header::new(Algorithm::HS256);
        h.kid = Some("k1".into());
        h.typ = Some(TOKEN_TYP.into());
        let secret = EncodingKey::from_secret(&key.public).unwrap();
        let hs = jsonwebtoken::encode(&h, &c, &secret).unwrap();
        assert_eq!(refused(&v, &hs).await, TokenError::WrongAlgorithm);

        // alg none does not even parse as a JOSE header jsonwebtoken knows.
        let none = format!(
            "{}.{}.",
            URL_SAFE_NO_PAD.encode(br#"{"alg":"none","typ":"at+jwt","kid":"k1"}"#),
            URL_SAFE_NO_PAD.encode(c.to_string())
        );
        assert_eq!(refused(&v, &none).await, TokenError::Malformed);

        let mut h = Header::new(Algorithm::ES256);
        h.typ = Some(TOKEN_TYP.into());
        let no_kid = jsonwebtoken::encode(&h, &c, &EncodingKey::from_ec_der(&key.pkcs8)).unwrap();
        assert_eq!(refused(&v, &no_kid).await, TokenError::NoKeyId);

        for junk in ["", "abc", "a.b.c", "....", "eyJhbGciOiJFUzI1NiJ9"] {
            assert_eq!(refused(&v, junk).await, TokenError::Malformed, "{junk:?}");
        }
    }

    #[tokio::test]
    async fn signature_checks() {
        let key = TestKey::new("k1");
        let v = verifier(&key);
        let token = key.sign(&claims(json!({})));

        // One changed byte of the payload.
        let mut parts: Vec<String> = token.split('.').map(str::to_owned).collect();
        let mut payload = URL_SAFE_NO_PAD.decode(&parts[1]).unwrap();
        let at = payload.iter().position(|&b| b == b'j').unwrap();
        payload[at] = b'k';
        parts[1] = URL_SAFE_NO_PAD.encode(payload);
        assert_eq!(
            refused(&v, &parts.join(".")).await,
            TokenError::BadSignature
        );

        // One flipped bit of the signature.
        let mut parts: Vec<String> = token.split('.').map(str::to_owned).collect();
        let mut sig = URL_SAFE_NO_PAD.decode(&parts[2]).unwrap();
        sig[5] ^= 1;
        parts[2] = URL_SAFE_NO_PAD.encode(sig);
        assert_eq!(
            refused(&v, &parts.join(".")).await,
            TokenError::BadSignature
        );

        // Another key claiming the same kid.
        let impostor = TestKey::new("k1");
        assert_eq!(
            refused(&v, &impostor.sign(&claims(json!({})))).await,
            TokenError::BadSignature
        );
        // A kid the JWKS does not have (and no refetch configured).
        let other = TestKey::new("k2");
        assert_eq!(
            refused(&v, &other.sign(&claims(json!({})))).await,
            TokenError::UnknownKey
        );
    }

    #[tokio::test]
    async fn claim_checks() {
        let key = TestKey::new("k1");
        let v = verifier(&key);
        let now = now();
        let cases = [
            (
                json!({"exp": now - 3600, "iat": now - 4000, "nbf": now - 4000}),
                TokenError::Expired,
            ),
            (json!({"exp": now - 31}), TokenError::Expired),
            (json!({"nbf": now + 600}), TokenError::NotYetValid),
            (json!({"iat": now + 600}), TokenError::IssuedInFuture),
            (json!({"aud": "other"}), TokenError::WrongAudience),
            (json!({"aud": ["other", "more"]}), TokenError::WrongAudience),
            (json!({"iss": "https://evil.test"}), TokenError::WrongIssuer),
            (json!({"iss": format!("{ISS}/")}), TokenError::WrongIssuer),
            (json!({"exp": null}), TokenError::MissingClaim("exp")),
            (json!({"aud": null}), TokenError::MissingClaim("aud")),
            (json!({"iss": null}), TokenError::MissingClaim("iss")),
            (json!({"sub": null}), TokenError::MissingClaim("sub")),
            (json!({"sub": ""}), TokenError::MissingClaim("sub")),
            (json!({"iat": null}), TokenError::MissingClaim("iat")),
            (json!({"jti": null}), TokenError::MissingClaim("jti")),
            (json!({"scope": 7}), TokenError::Malformed),
        ];
        for (change, want) in cases {
            let token = key.sign(&claims(change.clone()));
            assert_eq!(refused(&v, &token).await, want, "{change}");
        }
        // An audience array containing ours is accepted (RFC 7519 §4.1.3).
        let t = key.sign(&claims(json!({"aud": ["other", AUD]})));
        v.verify(&t).await.unwrap();
        // No scope claim: valid token, no scopes.
        let t = v
            .verify(&key.sign(&claims(json!({"scope": null}))))
            .await
            .unwrap();
        assert!(!t.has_scope(SCOPE));
    }

    #[tokio::test]
    async fn unknown_kid_refetches_at_most_once_per_interval() {
        let old = TestKey::new("k1");
        let new = TestKey::new("k2");
        let served = Arc::new(Mutex::new(jwks(&[&old, &new])));
        let calls = Arc::new(AtomicUsize::new(0));
        let (s, c) = (Arc::clone(&served), Arc::clone(&calls));
        let v = verifier(&old).with_refetch(move || {
            c.fetch_add(1, Ordering::SeqCst);
            let jwks = s.lock().unwrap().clone();
            async move { Ok(jwks) }
        });
        v.verify(&old.sign(&claims(json!({})))).await.unwrap();
        assert_eq!(
            calls.load(Ordering::SeqCst),
            0,
            "a known kid fetches nothing"
        );

        // Rotation: the new kid is fetched; the old key stays (it is still served).
        v.verify(&new.sign(&claims(json!({})))).await.unwrap();
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert_eq!(v.kids(), ["k1", "k2"]);
        v.verify(&old.sign(&claims(json!({})))).await.unwrap();

        // A made-up kid right after: refused without another fetch.
        let bogus = TestKey::new("k3");
        assert_eq!(
            refused(&v, &bogus.sign(&claims(json!({})))).await,
            TokenError::UnknownKey
        );
        assert_eq!(calls.load(Ordering::SeqCst), 1);

        let now = Instant::now();
        assert!(may_refetch(None, now));
        assert!(!may_refetch(Some(now), now + Duration::from_secs(9)));
        assert!(may_refetch(Some(now), now + JWKS_REFETCH_INTERVAL));
    }

    #[tokio::test]
    async fn failed_refetch_is_unavailable_and_keeps_keys() {
        let key = TestKey::new("k1");
        let v = verifier(&key).with_refetch(|| async { Err("issuer down".to_owned()) });
        let other = TestKey::new("k2");
        assert_eq!(
            refused(&v, &other.sign(&claims(json!({})))).await,
            TokenError::KeysUnavailable
        );
        v.verify(&key.sign(&claims(json!({})))).await.unwrap();
    }

    #[test]
    fn jwks_keeps_only_es256_signing_keys() {
        let good = TestKey::new("good");
        let mut enc = TestKey::new("enc").jwk();
        enc["use"] = json!("enc");
        let mut rs = TestKey::new("rs").jwk();
        rs["alg"] = json!("ES384");
        let mut no_kid = TestKey::new("x").jwk();
        no_kid.as_object_mut().unwrap().remove("kid");
        let oct = json!({"kty": "oct", "k": "c2VjcmV0", "kid": "hmac"});
        let set: JwkSet =
            serde_json::from_value(json!({"keys": [good.jwk(), enc, rs, no_kid, oct]})).unwrap();
        let v = Verifier::from_jwks(ISS, AUD, &set);
        assert_eq!(v.kids(), ["good"]);
    }

    #[test]
    fn challenges_follow_rfc_6750_9449_and_9728() {
        use Scheme::{Bearer, Dpop};
        let bearer_bare = format!("Bearer resource_metadata=\"{META}\"");
        let dpop_bare = format!("DPoP algs=\"ES256\", resource_metadata=\"{META}\"");
        assert_eq!(
            Denial::NoToken.challenges(META, SCOPE),
            [bearer_bare.clone(), dpop_bare.clone()]
        );
        assert_eq!(
            Denial::InvalidToken(Bearer, TokenError::Expired).challenges(META, SCOPE),
            [format!(
                "Bearer error=\"invalid_token\", error_description=\"token expired\", resource_metadata=\"{META}\""
            )]
        );
        assert_eq!(
            Denial::InvalidToken(Bearer, TokenError::DpopBoundAsBearer).challenges(META, SCOPE),
            [
                format!(
                    "Bearer error=\"invalid_token\", error_description=\"DPoP-bound token presented as a bearer token\", resource_metadata=\"{META}\""
                ),
                dpop_bare.clone()
            ]
        );
        assert_eq!(
            Denial::InvalidToken(Dpop, TokenError::Expired).challenges(META, SCOPE),
            [format!(
                "DPoP error=\"invalid_token\", error_description=\"token expired\", algs=\"ES256\", resource_metadata=\"{META}\""
            )]
        );
        assert_eq!(
            Denial::InvalidToken(Dpop, TokenError::NotDpopBound).challenges(META, SCOPE),
            [
                format!(
                    "DPoP error=\"invalid_token\", error_description=\"token is not DPoP-bound: present it as a bearer token\", algs=\"ES256\", resource_metadata=\"{META}\""
                ),
                bearer_bare
            ]
        );
        assert_eq!(
            Denial::InvalidDpopProof(ProofError::Replayed).challenges(META, SCOPE),
            [format!(
                "DPoP error=\"invalid_dpop_proof\", error_description=\"DPoP proof already used (make a fresh proof per request)\", algs=\"ES256\", resource_metadata=\"{META}\""
            )]
        );
        assert_eq!(
            Denial::InsufficientScope(Bearer).challenges(META, SCOPE),
            [format!(
                "Bearer error=\"insufficient_scope\", scope=\"tools:run\", resource_metadata=\"{META}\""
            )]
        );
        assert_eq!(
            Denial::InsufficientScope(Dpop).challenges(META, SCOPE),
            [format!(
                "DPoP error=\"insufficient_scope\", scope=\"tools:run\", algs=\"ES256\", resource_metadata=\"{META}\""
            )]
        );
        assert!(
            Denial::InvalidToken(Dpop, TokenError::KeysUnavailable)
                .challenges(META, SCOPE)
                .is_empty()
        );
        assert_eq!(Denial::NoToken.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(
            Denial::InvalidToken(Bearer, TokenError::BadSignature).status(),
            StatusCode::UNAUTHORIZED
        );
        assert_eq!(
            Denial::InvalidToken(Dpop, TokenError::KeysUnavailable).status(),
            StatusCode::SERVICE_UNAVAILABLE
        );
        assert_eq!(
            Denial::InvalidDpopProof(ProofError::Missing).status(),
            StatusCode::UNAUTHORIZED
        );
        assert_eq!(
            Denial::InsufficientScope(Dpop).status(),
            StatusCode::FORBIDDEN
        );
        // Proof descriptions fit in a quoted-string too, whatever the error.
        for e in [
            ProofError::Missing,
            ProofError::Multiple,
            ProofError::KeyMismatch,
            ProofError::Replayed,
            ProofError::Invalid(DpopError::BadSignature),
            ProofError::Invalid(DpopError::Crypto("a \"quoted\" \\ thing\n".into())),
        ] {
            let d = e.description();
            assert!(
                d.bytes()
                    .all(|b| b == b' ' || (b.is_ascii_graphic() && b != b'"' && b != b'\\')),
                "{d}"
            );
        }
        // Every description can sit in a quoted-string unescaped.
        for e in [
            TokenError::Malformed,
            TokenError::WrongAlgorithm,
            TokenError::WrongType,
            TokenError::NoKeyId,
            TokenError::UnknownKey,
            TokenError::BadSignature,
            TokenError::Expired,
            TokenError::NotYetValid,
            TokenError::IssuedInFuture,
            TokenError::WrongAudience,
            TokenError::WrongIssuer,
            TokenError::MissingClaim("jti"),
            TokenError::KeysUnavailable,
            TokenError::DpopBoundAsBearer,
            TokenError::NotDpopBound,
            TokenError::UnsupportedConfirmation,
        ] {
            let d = e.description();
            assert!(
                d.bytes()
                    .all(|b| b == b' ' || (b.is_ascii_graphic() && b != b'"' && b != b'\\')),
                "{d}"
            );
            assert_eq!(d, e.to_string());
        }
    }

    #[test]
    fn bearer_header_parsing() {
        let parse = |values: &[&str]| {
            let mut h = HeaderMap::new();
            for v in values {
                h.append(AUTHORIZATION, HeaderValue::from_str(v).unwrap());
            }
            bearer_token(&h).map(str::to_owned)
        };
        assert_eq!(parse(&["Bearer a.b.c"]).as_deref(), Some("a.b.c"));
        assert_eq!(parse(&["DPoP a.b.c"]), None);
        assert_eq!(parse(&["bearer  a.b-_c=="]).as_deref(), Some("a.b-_c=="));
        for bad in [
            &[][..],
            &["Bearer"],
            &["Bearer "],
            &["Basic YTpi"],
            &["Bearer a b"],
            &["Bearer a\"b"],
            &["Bearer =="],
            &["Bearer a.b.c", "Bearer d.e.f"],
        ] {
            assert_eq!(parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn config_reports_every_error() {
        let args = Args {
            issuer: "http://plain.test".into(),
            ca: Some("/nonexistent/ca.pem".into()),
            audience: String::new(),
            scope: "two words".into(),
            listen: "127.0.0.1:0".parse().unwrap(),
            resource: Some("ftp://x".into()),
            public_url: Some("http://x/?q".into()),
        };
        let e = Config::from_args(args).unwrap_err();
        assert_eq!(e.0.len(), 6, "{e}");
        let text = e.to_string();
        for w in [
            "--issuer",
            "--ca",
            "--audience",
            "--scope",
            "--resource",
            "--public-url",
        ] {
            assert!(text.contains(w), "{text}");
        }
        let ok = Config::from_args(Args {
            issuer: ISS.into(),
            ca: None,
            audience: AUD.into(),
            scope: SCOPE.into(),
            listen: "127.0.0.1:0".parse().unwrap(),
            resource: Some(format!("{RESOURCE}/")),
            public_url: Some("https://tools.test/".into()),
        })
        .unwrap();
        assert!(ok.roots.is_empty());
        // The resource identifier is kept exactly (RFC 9728 §3.3); the public URL, a
        // prefix for request paths, loses its trailing slash.
        assert_eq!(ok.resource, Some(format!("{RESOURCE}/")));
        assert_eq!(ok.public_url.as_deref(), Some("https://tools.test"));
    }

    // ---- Routes, in process ----

    async fn call(app: &Router, req: Request<Body>) -> (StatusCode, HeaderMap, Value) {
        let response = app.clone().oneshot(req).await.unwrap();
        let (parts, body) = response.into_parts();
        let bytes = body.collect().await.unwrap().to_bytes();
        let json = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        (parts.status, parts.headers, json)
    }

    fn tool(token: Option<&str>, body: &str) -> Request<Body> {
        let mut b = Request::post(TOOL_PATH).header("content-type", "application/json");
        if let Some(t) = token {
            b = b.header(AUTHORIZATION, format!("Bearer {t}"));
        }
        b.body(Body::from(body.to_owned())).unwrap()
    }

    fn challenge(h: &HeaderMap) -> String {
        h.get(WWW_AUTHENTICATE)
            .expect("a challenge")
            .to_str()
            .unwrap()
            .to_owned()
    }

    fn challenges(h: &HeaderMap) -> Vec<String> {
        h.get_all(WWW_AUTHENTICATE)
            .iter()
            .map(|v| v.to_str().unwrap().to_owned())
            .collect()
    }

    /// A request to `path` with `Authorization: DPoP <token>` and one `DPoP` header per
    /// proof.
    fn dpop_call(path: &str, token: &str, proofs: &[&str]) -> Request<Body> {
        let mut b = Request::post(path)
            .header("content-type", "application/json")
            .header(AUTHORIZATION, format!("DPoP {token}"));
        for p in proofs {
            b = b.header(DPOP_HEADER, *p);
        }
        b.body(Body::from(r#"{"text":"bound"}"#)).unwrap()
    }

    /// Asserts a `401 invalid_dpop_proof` whose description contains `want`.
    fn assert_bad_proof(status: StatusCode, h: &HeaderMap, json: &Value, want: &str) {
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{json}");
        let c = challenges(h);
        assert_eq!(c.len(), 1, "{c:?}");
        assert!(
            c[0].starts_with("DPoP error=\"invalid_dpop_proof\", error_description=\""),
            "{c:?}"
        );
        assert!(c[0].contains("algs=\"ES256\""), "{c:?}");
        assert_eq!(json["error"], "invalid_dpop_proof");
        let d = json["error_description"].as_str().unwrap();
        assert!(d.contains(want), "{d} (want {want})");
        assert!(c[0].contains(d), "{c:?}");
    }

    #[tokio::test]
    async fn dpop_bound_tokens() {
        let key = TestKey::new("k1");
        let app = router(Arc::new(AppState::new(verifier(&key), RESOURCE, SCOPE)));
        let holder = DpopKey::generate().unwrap();
        let thief = DpopKey::generate().unwrap();
        let bound = key.sign(&claims(json!({"cnf": {"jkt": holder.thumbprint()}})));
        let htu = format!("{RESOURCE}{TOOL_PATH}");
        let proof = holder.proof("POST", &htu, Some(&bound)).unwrap();

        // Bound token + good proof: 200.
        let (status, h, json) = call(&app, dpop_call(TOOL_PATH, &bound, &[&proof])).await;
        assert_eq!(status, StatusCode::OK, "{json}");
        assert!(h.get(WWW_AUTHENTICATE).is_none());
        assert_eq!(json["echo"], "bound");
        assert_eq!(json["token_type"], "DPoP");

        // The same proof again: a replay.
        let (status, h, json) = call(&app, dpop_call(TOOL_PATH, &bound, &[&proof])).await;
        assert_bad_proof(status, &h, &json, "already used");

        // A fresh proof works (also with a query: htu has none).
        let p = holder.proof("POST", &htu, Some(&bound)).unwrap();
        let (status, _, json) =
            call(&app, dpop_call(&format!("{TOOL_PATH}?x=1"), &bound, &[&p])).await;
        assert_eq!(status, StatusCode::OK, "{json}");

        // A proof by another key (a stolen token without its key).
        let p = thief.proof("POST", &htu, Some(&bound)).unwrap();
        let (status, h, json) = call(&app, dpop_call(TOOL_PATH, &bound, &[&p])).await;
        assert_bad_proof(status, &h, &json, "does not match the token's key");

        // Wrong ath, htm, htu.
        let other_token = key.sign(&claims(
            json!({"jti": "j-2", "cnf": {"jkt": holder.thumbprint()}}),
        ));
        for (p, want) in [
            (holder.proof("POST", &htu, Some(&other_token)), "claim ath"),
            (holder.proof("POST", &htu, None), "claim ath: missing"),
            (holder.proof("GET", &htu, Some(&bound)), "claim htm"),
            (
                holder.proof("POST", &format!("{RESOURCE}/tools/other"), Some(&bound)),
                "claim htu",
            ),
            (
                holder.proof("POST", "https://127.0.0.1:8080/tools/echo", Some(&bound)),
                "claim htu",
            ),
        ] {
            let (status, h, json) = call(&app, dpop_call(TOOL_PATH, &bound, &[&p.unwrap()])).await;
            assert_bad_proof(status, &h, &json, want);
        }
        // An old proof.
        let old = holder
            .proof_at("POST", &htu, Some(&bound), now() - DPOP_MAX_AGE_SECONDS - 5)
            .unwrap();
        let (status, h, json) = call(&app, dpop_call(TOOL_PATH, &bound, &[&old])).await;
        assert_bad_proof(status, &h, &json, "claim iat");
        // Junk.
        let (status, h, json) = call(&app, dpop_call(TOOL_PATH, &bound, &["not.a.proof"])).await;
        assert_bad_proof(status, &h, &json, "malformed");

        // Missing DPoP header, and two of them.
        let (status, h, json) = call(&app, dpop_call(TOOL_PATH, &bound, &[])).await;
        assert_bad_proof(status, &h, &json, "missing DPoP proof header");
        let p1 = holder.proof("POST", &htu, Some(&bound)).unwrap();
        let p2 = holder.proof("POST", &htu, Some(&bound)).unwrap();
        let (status, h, json) = call(&app, dpop_call(TOOL_PATH, &bound, &[&p1, &p2])).await;
        assert_bad_proof(status, &h, &json, "more than one");

        // The bound token as a bearer token.
        let (status, h, json) = call(&app, tool(Some(&bound), r#"{"text":"x"}"#)).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        assert_eq!(
            challenges(&h),
            [
                format!(
                    "Bearer error=\"invalid_token\", error_description=\"DPoP-bound token presented as a bearer token\", resource_metadata=\"{META}\""
                ),
                format!("DPoP algs=\"ES256\", resource_metadata=\"{META}\"")
            ]
        );
        assert_eq!(json["error"], "invalid_token");

        // An unbound token with the DPoP scheme, even with a good proof.
        let unbound = key.sign(&claims(json!({})));
        let p = holder.proof("POST", &htu, Some(&unbound)).unwrap();
        let (status, h, json) = call(&app, dpop_call(TOOL_PATH, &unbound, &[&p])).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        assert!(
            challenge(&h).starts_with(
                "DPoP error=\"invalid_token\", error_description=\"token is not DPoP-bound"
            ),
            "{h:?}"
        );
        assert_eq!(json["error"], "invalid_token");

        // An invalid token with the DPoP scheme: invalid_token in the DPoP challenge.
        let expired = key.sign(&claims(json!({
            "exp": now() - 3600, "iat": now() - 4000, "cnf": {"jkt": holder.thumbprint()}
        })));
        let p = holder.proof("POST", &htu, Some(&expired)).unwrap();
        let (status, h, _) = call(&app, dpop_call(TOOL_PATH, &expired, &[&p])).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        assert!(
            challenge(&h)
                .starts_with("DPoP error=\"invalid_token\", error_description=\"token expired\""),
            "{h:?}"
        );

        // A bound token without the scope, with a good proof: 403 in the DPoP scheme.
        let narrow = key.sign(&claims(json!({
            "scope": "tools:read", "cnf": {"jkt": holder.thumbprint()}
        })));
        let p = holder.proof("POST", &htu, Some(&narrow)).unwrap();
        let (status, h, _) = call(&app, dpop_call(TOOL_PATH, &narrow, &[&p])).await;
        assert_eq!(status, StatusCode::FORBIDDEN);
        assert!(
            challenge(&h).starts_with("DPoP error=\"insufficient_scope\", scope=\"tools:run\""),
            "{h:?}"
        );
    }

    #[tokio::test]
    async fn dpop_htu_is_the_public_url() {
        let key = TestKey::new("k1");
        let state = AppState::new(verifier(&key), RESOURCE, SCOPE)
            .with_public_url("https://tools.test/mcp/");
        assert_eq!(state.public_url(), "https://tools.test/mcp");
        let app = router(Arc::new(state));
        let holder = DpopKey::generate().unwrap();
        let bound = key.sign(&claims(json!({"cnf": {"jkt": holder.thumbprint()}})));
        let p = holder
            .proof("POST", "https://tools.test/mcp/tools/echo", Some(&bound))
            .unwrap();
        let (status, _, json) = call(&app, dpop_call(TOOL_PATH, &bound, &[&p])).await;
        assert_eq!(status, StatusCode::OK, "{json}");
        // The listen address is not what the client addressed.
        let p = holder
            .proof("POST", &format!("{RESOURCE}{TOOL_PATH}"), Some(&bound))
            .unwrap();
        let (status, h, json) = call(&app, dpop_call(TOOL_PATH, &bound, &[&p])).await;
        assert_bad_proof(status, &h, &json, "claim htu");
    }

    #[test]
    fn metadata_urls_insert_the_well_known_suffix_after_the_host() {
        for (resource, url, path) in [
            (
                "http://127.0.0.1:8081/tools/echo",
                "http://127.0.0.1:8081/.well-known/oauth-protected-resource/tools/echo",
                "/.well-known/oauth-protected-resource/tools/echo",
            ),
            (
                "https://tools.example.com/api/",
                "https://tools.example.com/.well-known/oauth-protected-resource/api/",
                "/.well-known/oauth-protected-resource/api/",
            ),
            (
                "https://tools.example.com/",
                "https://tools.example.com/.well-known/oauth-protected-resource",
                "/.well-known/oauth-protected-resource",
            ),
            (
                "https://tools.example.com",
                "https://tools.example.com/.well-known/oauth-protected-resource",
                "/.well-known/oauth-protected-resource",
            ),
            (
                "https://tools.example.com/?tenant=a",
                "https://tools.example.com/.well-known/oauth-protected-resource?tenant=a",
                "/.well-known/oauth-protected-resource",
            ),
            (
                "https://tools.example.com/r?tenant=a",
                "https://tools.example.com/.well-known/oauth-protected-resource/r?tenant=a",
                "/.well-known/oauth-protected-resource/r",
            ),
        ] {
            assert_eq!(
                metadata_location(resource),
                (url.to_owned(), path.to_owned()),
                "{resource}"
            );
        }
    }

    #[tokio::test]
    async fn metadata_of_a_resource_with_a_path_is_served_where_rfc_9728_puts_it() {
        let key = TestKey::new("k1");
        let resource = "http://127.0.0.1:8081/tools/echo/";
        let app = router(Arc::new(AppState::new(verifier(&key), resource, SCOPE)));
        let (status, _, doc) = call(
            &app,
            Request::get("/.well-known/oauth-protected-resource/tools/echo/")
                .body(Body::empty())
                .unwrap(),
        )
        .await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(
            doc["resource"], resource,
            "announced exactly, trailing slash kept"
        );
        assert_eq!(doc["authorization_servers"], json!([ISS]));
        let (status, _, _) = call(
            &app,
            Request::get(METADATA_PATH).body(Body::empty()).unwrap(),
        )
        .await;
        assert_eq!(
            status,
            StatusCode::NOT_FOUND,
            "the root document would name another resource"
        );
        // The challenge points at the path-inserted URL.
        let (status, headers, _) =
            call(&app, Request::post(TOOL_PATH).body(Body::empty()).unwrap()).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        let challenge = headers.get(WWW_AUTHENTICATE).unwrap().to_str().unwrap();
        assert!(
            challenge.contains(
                "resource_metadata=\"http://127.0.0.1:8081/.well-known/oauth-protected-resource/tools/echo/\""
            ),
            "{challenge}"
        );
    }

    #[tokio::test]
    async fn routes() {
        let key = TestKey::new("k1");
        let app = router(Arc::new(AppState::new(verifier(&key), RESOURCE, SCOPE)));

        let (status, _, doc) = call(
            &app,
            Request::get(METADATA_PATH).body(Body::empty()).unwrap(),
        )
        .await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(
            doc,
            json!({
                "resource": RESOURCE, "authorization_servers": [ISS],
                "scopes_supported": [SCOPE], "bearer_methods_supported": ["header"],
                "resource_signing_alg_values_supported": ["ES256"],
                "dpop_signing_alg_values_supported": ["ES256"],
                "resource_name": "Quorate example tool",
            })
        );

        let body = r#"{"text":"hi"}"#;
        let (status, h, json) = call(&app, tool(None, body)).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        assert_eq!(
            challenges(&h),
            [
                format!("Bearer resource_metadata=\"{META}\""),
                format!("DPoP algs=\"ES256\", resource_metadata=\"{META}\"")
            ]
        );
        assert_eq!(json["resource_metadata"], META);

        let (status, h, json) = call(&app, tool(Some("not-a-jwt"), body)).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        assert!(challenge(&h).starts_with("Bearer error=\"invalid_token\""));
        assert_eq!(json["error"], "invalid_token");

        let expired = key.sign(&claims(json!({"exp": now() - 3600, "iat": now() - 4000})));
        let (status, h, json) = call(&app, tool(Some(&expired), body)).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        assert!(challenge(&h).contains("error_description=\"token expired\""));
        assert_eq!(json["error_description"], "token expired");

        let narrow = key.sign(&claims(json!({"scope": "tools:read"})));
        let (status, h, json) = call(&app, tool(Some(&narrow), body)).await;
        assert_eq!(status, StatusCode::FORBIDDEN);
        assert_eq!(
            challenge(&h),
            format!(
                "Bearer error=\"insufficient_scope\", scope=\"tools:run\", resource_metadata=\"{META}\""
            )
        );
        assert_eq!(json["error"], "insufficient_scope");

        let good = key.sign(&claims(json!({})));
        let (status, h, json) = call(&app, tool(Some(&good), body)).await;
        assert_eq!(status, StatusCode::OK, "{json}");
        assert!(h.get(WWW_AUTHENTICATE).is_none());
        assert_eq!(
            json,
            json!({
                "echo": "hi", "agent": "spiffe://quorate.test/agent/test/a1",
                "task_id": null, "scope": "tools:read tools:run", "jti": "j-1",
                "token_type": "Bearer",
            })
        );

        // Authentication comes before the body is looked at.
        let (status, _, _) = call(&app, tool(None, "not json")).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        let (status, _, json) = call(&app, tool(Some(&good), "not json")).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(json["error"], "invalid_request");
        let big = format!(r#"{{"text":"{}"}}"#, "x".repeat(MAX_BODY));
        let (status, _, _) = call(&app, tool(Some(&good), &big)).await;
        assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
        let fits = format!(r#"{{"text":"{}"}}"#, "x".repeat(MAX_BODY - 20));
        let (status, _, _) = call(&app, tool(Some(&good), &fits)).await;
        assert_eq!(status, StatusCode::OK);
    }

    // ---- Discovery over real HTTPS (a local test server) ----

    #[tokio::test]
    async fn discovery_over_https() {
        let key = TestKey::new("k1");
        let jwks_body = json!({"keys": [key.jwk()]}).to_string();
        let base = Arc::new(Mutex::new(String::new()));
        let claimed_issuer = Arc::new(Mutex::new(None::<String>));
        let (b, ci) = (Arc::clone(&base), Arc::clone(&claimed_issuer));
        let server = TestServer::start(Arc::new(move |req: TestRequest| {
            let base = b.lock().unwrap().clone();
            match req.path.as_str() {
                "/.well-known/openid-configuration" => TestResponse::json(
                    json!({
                        "issuer": ci.lock().unwrap().clone().unwrap_or_else(|| base.clone()),
                        "jwks_uri": format!("{base}/jwks.json"),
                    })
                    .to_string(),
                ),
                "/jwks.json" => TestResponse::json(jwks_body.clone()),
                _ => TestResponse::text(404, "no"),
            }
        }))
        .await
        .unwrap();
        let issuer = server.url("");
        *base.lock().unwrap() = issuer.clone();

        let v = Verifier::discover(&issuer, AUD, server.roots().unwrap())
            .await
            .unwrap();
        assert_eq!(v.kids(), ["k1"]);
        let t = key.sign(&claims(json!({"iss": issuer})));
        v.verify(&t).await.unwrap();

        // No roots: the TLS error says why.
        let e = Verifier::discover(&issuer, AUD, RootCertStore::empty())
            .await
            .unwrap_err();
        assert!(e.to_string().contains("no --ca or QUORATE_CACERT"), "{e}");

        // The document must name the issuer we asked for.
        *claimed_issuer.lock().unwrap() = Some("https://evil.test".into());
        let e = Verifier::discover(&issuer, AUD, server.roots().unwrap())
            .await
            .unwrap_err();
        assert!(matches!(e, DiscoveryError::IssuerMismatch { .. }), "{e}");
    }
}
