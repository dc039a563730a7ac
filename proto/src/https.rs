//! A small HTTPS/1.1 client for public metadata: JWKS and OpenID discovery documents
//! (DESIGN.md §6-§7).
//!
//! One request per connection over tokio-rustls and `hyper::client::conn::http1`, no
//! pooling, no redirects (a 3xx is returned as a status), a 10 s deadline for the whole
//! exchange (connect, handshake, request, body) and a 1 MiB body limit.
//!
//! A status other than 2xx is **not** an error: the caller gets [`HttpsResponse::status`]
//! and decides. Errors are about the exchange itself — bad URL, connect, TLS, HTTP,
//! timeout, oversized body — and each names the URL.
//!
//! # TLS
//!
//! [`public_client_config`] is for *public* endpoints (a JWKS of GitHub, Google, a
//! Kubernetes API server): TLS 1.3 and 1.2, key exchange X25519MLKEM768 preferred, then
//! X25519 and secp256r1, because most deployed servers cannot yet speak the hybrid group.
//! The data fetched is public and authenticated by the server certificate; nothing
//! secret travels on these connections. Anything carrying tokens or secrets uses the
//! hybrid-only configurations of [`crate::tls`] instead.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Bytes;
use hyper::header::{CONTENT_LENGTH, CONTENT_TYPE, HOST, USER_AGENT};
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;
use rustls::crypto::{CryptoProvider, aws_lc_rs};
use rustls::pki_types::ServerName;
use rustls::{ClientConfig, RootCertStore};

/// Deadline for a whole exchange: TCP connect, TLS handshake, request and response body.
pub const TIMEOUT: Duration = Duration::from_secs(10);

/// Largest response body accepted, in bytes (1 MiB).
pub const MAX_BODY: usize = 1 << 20;

/// ALPN protocol offered: this client speaks HTTP/1.1 only.
const ALPN_HTTP11: &[u8] = b"http/1.1";

/// `User-Agent` sent with every request.
const AGENT: &str = concat!("quorate/", env!("CARGO_PKG_VERSION"));

/// A response: status, `Content-Type` and body. Any status is a response, not an error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpsResponse {
    /// The HTTP status code.
    pub status: u16,
    /// The `Content-Type` header, if present and valid text.
    pub content_type: Option<String>,
    /// The body (at most [`MAX_BODY`] bytes).
    pub body: Vec<u8>,
}

impl HttpsResponse {
    /// Whether the status is 2xx.
    pub fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }
}

/// What went wrong with an exchange. Every variant names the URL.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HttpsError {
    /// The URL is not of the form `https://host[:port][/path][?query]`.
    #[error("invalid URL `{url}`: {reason} (expected https://host[:port]/path)")]
    InvalidUrl {
        /// The URL given.
        url: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The TCP connection could not be made.
    #[error("cannot connect to {url}: {source}")]
    Connect {
        /// The URL.
        url: String,
        /// The I/O error (resolution or connect).
        #[source]
        source: std::io::Error,
    },
    /// The TLS handshake failed (e.g. the server certificate does not verify).
    #[error(
        "TLS handshake with {url} failed: {source} (check the server certificate and the trusted roots)"
    )]
    Tls {
        /// The URL.
        url: String,
        /// The error from rustls, wrapped by tokio-rustls.
        #[source]
        source: std::io::Error,
    },
    /// The HTTP exchange failed after the handshake.
    #[error("HTTP exchange with {url} failed: {reason}")]
    Http {
        /// The URL.
        url: String,
        /// hyper's error, as text.
        reason: String,
    },
    /// The exchange took longer than its deadline ([`TIMEOUT`]).
    #[error("request to {url} timed out after {} ms", deadline.as_millis())]
    Timeout {
        /// The URL.
        url: String,
        /// The deadline that passed.
        deadline: Duration,
    },
    /// The response body is larger than [`MAX_BODY`].
    #[error("response from {url} is larger than {} bytes", MAX_BODY)]
    BodyTooLarge {
        /// The URL.
        url: String,
    },
    /// rustls refused the client configuration (a bug: the provider is fixed).
    #[error("building the TLS client configuration failed: {0}")]
    Config(#[from] rustls::Error),
}

/// A parsed `https://` URL.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Target {
    /// Host without brackets: a DNS name or an IP address.
    host: String,
    port: u16,
    /// `host[:port]` as written, for the `Host` header.
    authority: String,
    /// Path and query, starting with `/`.
    path_and_query: String,
}

fn parse_url(url: &str) -> Result<Target, HttpsError> {
    let invalid = |reason| HttpsError::InvalidUrl {
        url: url.to_owned(),
        reason,
    };
    let rest = match url.get(..8) {
        Some(scheme) if scheme.eq_ignore_ascii_case("https://") => url.get(8..).unwrap_or(""),
        _ => return Err(invalid("the scheme must be https://")),
    };
    // The fragment is never sent.
    let rest = rest.split_once('#').map_or(rest, |(before, _)| before);
    let split = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, path) = rest.split_at(split);
    if authority.is_empty() {
        return Err(invalid("it has no host"));
    }
    if authority.contains('@') {
        return Err(invalid("user information in URLs is not supported"));
    }
    let (host, port) = if let Some(bracketed) = authority.strip_prefix('[') {
        let (host, after) = bracketed
            .split_once(']')
            .ok_or_else(|| invalid("an IPv6 host lacks its closing `]`"))?;
        let port = match after {
            "" => None,
            _ => Some(
                after
                    .strip_prefix(':')
                    .ok_or_else(|| invalid("unexpected text after the IPv6 host"))?,
            ),
        };
        (host, port)
    } else {
        match authority.rsplit_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (authority, None),
        }
    };
    if host.is_empty() || (host.contains(':') && !authority.starts_with('[')) {
        return Err(invalid("the host is empty or malformed"));
    }
    let port = match port {
        None => 443,
        Some(p) => p
            .parse::<u16>()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| invalid("the port must be a number from 1 to 65535"))?,
    };
    let path_and_query = if path.starts_with('/') {
        path.to_owned()
    } else {
        format!("/{path}")
    };
    if path_and_query
        .bytes()
        .any(|b| b.is_ascii_control() || b == b' ' || !b.is_ascii())
    {
        return Err(invalid(
            "the path contains spaces, control or non-ASCII characters (percent-encode them)",
        ));
    }
    Ok(Target {
        host: host.to_owned(),
        port,
        authority: authority.to_owned(),
        path_and_query,
    })
}

/// Checks that `url` is a URL [`get`] and [`post_form`] accept
/// (`https://host[:port][/path][?query]`), without connecting: for configuration checks.
pub fn check_url(url: &str) -> Result<(), HttpsError> {
    let target = parse_url(url)?;
    ServerName::try_from(target.host.as_str())
        .map(|_| ())
        .map_err(|_| HttpsError::InvalidUrl {
            url: url.to_owned(),
            reason: "the host is neither a valid DNS name nor an IP address",
        })
}

/// Percent-encodes `s` for `application/x-www-form-urlencoded`: every byte outside
/// `A-Z a-z 0-9 - . _ ~` becomes `%XX` (a space becomes `%20`, which form decoders accept
/// like `+`).
fn form_encode_into(out: &mut String, s: &str) {
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push('%');
            out.push(hex_digit(b >> 4));
            out.push(hex_digit(b & 0x0f));
        }
    }
}

/// The upper-case hex digit of a nibble (`n < 16`).
fn hex_digit(n: u8) -> char {
    char::from(if n < 10 { b'0' + n } else { b'A' + (n - 10) })
}

/// Encodes `pairs` as an `application/x-www-form-urlencoded` body.
fn form_body(pairs: &[(&str, &str)]) -> String {
    let mut out = String::new();
    for (i, (name, value)) in pairs.iter().enumerate() {
        if i > 0 {
            out.push('&');
        }
        form_encode_into(&mut out, name);
        out.push('=');
        form_encode_into(&mut out, value);
    }
    out
}

/// GETs `url` (`https://host[:port][/path][?query]`) with `tls`.
///
/// The TLS server name (SNI and certificate check) is the URL's host; an IP address host
/// is checked against the certificate's IP SANs. Deadline [`TIMEOUT`], body limit
/// [`MAX_BODY`]. Any HTTP status is returned as a response.
pub async fn get(url: &str, tls: Arc<ClientConfig>) -> Result<HttpsResponse, HttpsError> {
    exchange(url, tls, Method::GET, None).await
}

/// POSTs `form` as an `application/x-www-form-urlencoded` body (names and values are
/// percent-encoded here) to `url` with `tls`. Same rules as [`get`].
pub async fn post_form(
    url: &str,
    tls: Arc<ClientConfig>,
    form: &[(&str, &str)],
) -> Result<HttpsResponse, HttpsError> {
    let body = form_body(form);
    exchange(
        url,
        tls,
        Method::POST,
        Some(("application/x-www-form-urlencoded", body.into_bytes())),
    )
    .await
}

async fn exchange(
    url: &str,
    tls: Arc<ClientConfig>,
    method: Method,
    body: Option<(&'static str, Vec<u8>)>,
) -> Result<HttpsResponse, HttpsError> {
    exchange_within(TIMEOUT, url, tls, method, body).await
}

async fn exchange_within(
    deadline: Duration,
    url: &str,
    tls: Arc<ClientConfig>,
    method: Method,
    body: Option<(&'static str, Vec<u8>)>,
) -> Result<HttpsResponse, HttpsError> {
    let target = parse_url(url)?;
    match tokio::time::timeout(deadline, exchange_inner(url, &target, tls, method, body)).await {
        Ok(result) => result,
        Err(_) => Err(HttpsError::Timeout {
            url: url.to_owned(),
            deadline,
        }),
    }
}

/// Aborts the spawned connection driver when the exchange ends (or times out).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn exchange_inner(
    url: &str,
    target: &Target,
    tls: Arc<ClientConfig>,
    method: Method,
    body: Option<(&'static str, Vec<u8>)>,
) -> Result<HttpsResponse, HttpsError> {
    let http = |e: &dyn std::fmt::Display| HttpsError::Http {
        url: url.to_owned(),
        reason: e.to_string(),
    };
    let server_name =
        ServerName::try_from(target.host.clone()).map_err(|_| HttpsError::InvalidUrl {
            url: url.to_owned(),
            reason: "the host is neither a valid DNS name nor an IP address",
        })?;
    let tcp = connect_tcp(&target.host, target.port)
        .await
        .map_err(|source| HttpsError::Connect {
            url: url.to_owned(),
            source,
        })?;
    let stream = tokio_rustls::TlsConnector::from(tls)
        .connect(server_name, tcp)
        .await
        .map_err(|source| HttpsError::Tls {
            url: url.to_owned(),
            source,
        })?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| http(&e))?;
    // The driver ends by itself once the response is read and `sender` dropped; errors
    // surface through `send_request` and the body, so the driver's own result is unused.
    let _driver = AbortOnDrop(tokio::spawn(async move {
        let _ = connection.await;
    }));

    let mut request = Request::builder()
        .method(method)
        .uri(target.path_and_query.as_str())
        .header(HOST, target.authority.as_str())
        .header(USER_AGENT, AGENT);
    let payload = match body {
        Some((content_type, bytes)) => {
            request = request
                .header(CONTENT_TYPE, content_type)
                .header(CONTENT_LENGTH, bytes.len());
            Bytes::from(bytes)
        }
        None => Bytes::new(),
    };
    let request = request.body(Full::new(payload)).map_err(|e| http(&e))?;
    let response = sender.send_request(request).await.map_err(|e| http(&e))?;

    let status = response.status().as_u16();
    let content_type = response
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let declared_len = response
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let too_large = || HttpsError::BodyTooLarge {
        url: url.to_owned(),
    };
    if declared_len.is_some_and(|n| n > MAX_BODY as u64) {
        return Err(too_large());
    }
    let body = Limited::new(response.into_body(), MAX_BODY)
        .collect()
        .await
        .map_err(|e| {
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some()
            {
                too_large()
            } else {
                http(&e)
            }
        })?
        .to_bytes()
        .to_vec();
    Ok(HttpsResponse {
        status,
        content_type,
        body,
    })
}

/// Connects to the first address of `host:port` that accepts.
async fn connect_tcp(host: &str, port: u16) -> std::io::Result<tokio::net::TcpStream> {
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host, port)).await?.collect();
    let mut last_error = None;
    for addr in addrs {
        match tokio::net::TcpStream::connect(addr).await {
            Ok(stream) => return Ok(stream),
            Err(e) => last_error = Some(e),
        }
    }
    Err(last_error.unwrap_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!("{host} resolves to no address"),
        )
    }))
}

/// The crypto provider for public endpoints: aws-lc-rs with its default cipher suites
/// (TLS 1.3 and 1.2) and key exchange X25519MLKEM768, then X25519, then secp256r1 (in
/// order of preference).
fn public_provider() -> CryptoProvider {
    CryptoProvider {
        kx_groups: vec![
            aws_lc_rs::kx_group::X25519MLKEM768,
            aws_lc_rs::kx_group::X25519,
            aws_lc_rs::kx_group::SECP256R1,
        ],
        ..aws_lc_rs::default_provider()
    }
}

/// A client configuration for **public** endpoints (JWKS, discovery): TLS 1.3 and 1.2,
/// key exchange X25519MLKEM768 preferred, then X25519 and secp256r1; server certificates
/// verified against `roots`; ALPN `http/1.1`; no client certificate.
///
/// Never use it for a connection carrying tokens or secrets (DESIGN.md §6): those are
/// hybrid-only ([`crate::tls`]).
///
/// TLS 1.2 is offered when rustls is built with its `tls12` feature, which tonic's TLS
/// support enables in every Quorate build; `rustls::ALL_VERSIONS` lists exactly the
/// versions compiled in.
pub fn public_client_config(roots: RootCertStore) -> Result<Arc<ClientConfig>, HttpsError> {
    let mut config = ClientConfig::builder_with_provider(Arc::new(public_provider()))
        .with_protocol_versions(rustls::ALL_VERSIONS)?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![ALPN_HTTP11.to_vec()];
    Ok(Arc::new(config))
}

/// **Test support only**: a tiny HTTPS/1.1 server on `127.0.0.1` with its own CA, for
/// tests of [`get`] and [`post_form`] and of JWKS fetching elsewhere in the workspace.
#[cfg(any(test, feature = "test-support"))]
pub mod test_server {
    use std::convert::Infallible;
    use std::net::{IpAddr, Ipv4Addr, SocketAddr};
    use std::sync::Arc;

    use http_body_util::{BodyExt, Full};
    use hyper::body::{Bytes, Incoming};
    use hyper::header::CONTENT_TYPE;
    use hyper::{Request, Response, StatusCode};
    use hyper_util::rt::TokioIo;
    use rcgen::{
        BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
        KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, SanType,
    };
    use rustls::crypto::{CryptoProvider, aws_lc_rs};
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
    use rustls::{RootCertStore, ServerConfig, SupportedProtocolVersion};

    /// Boxed error of the test server's setup.
    pub type SetupError = Box<dyn std::error::Error + Send + Sync>;

    /// A request as the handler sees it.
    #[derive(Debug, Clone)]
    pub struct TestRequest {
        /// `GET`, `POST`, …
        pub method: String,
        /// Path and query.
        pub path: String,
        /// The `Content-Type` header, if any.
        pub content_type: Option<String>,
        /// The body.
        pub body: Vec<u8>,
    }

    /// The handler's answer.
    #[derive(Debug, Clone)]
    pub struct TestResponse {
        /// The HTTP status.
        pub status: u16,
        /// The `Content-Type` header.
        pub content_type: String,
        /// The body.
        pub body: Vec<u8>,
    }

    impl TestResponse {
        /// A 200 response with a JSON body.
        pub fn json(body: impl Into<Vec<u8>>) -> Self {
            Self {
                status: 200,
                content_type: "application/json".to_owned(),
                body: body.into(),
            }
        }

        /// A response with this status and a plain-text body.
        pub fn text(status: u16, body: impl Into<Vec<u8>>) -> Self {
            Self {
                status,
                content_type: "text/plain".to_owned(),
                body: body.into(),
            }
        }
    }

    /// Answers each request.
    pub type Handler = Arc<dyn Fn(TestRequest) -> TestResponse + Send + Sync>;

    /// TLS settings of the server.
    #[derive(Debug, Clone, Copy)]
    pub struct ServerOptions {
        /// Protocol versions accepted.
        pub versions: &'static [&'static SupportedProtocolVersion],
        /// Accept only the classic X25519 group (as most public servers today).
        pub classic_only: bool,
    }

    impl Default for ServerOptions {
        fn default() -> Self {
            Self {
                versions: rustls::ALL_VERSIONS,
                classic_only: false,
            }
        }
    }

    /// A running server; stops accepting when dropped.
    pub struct TestServer {
        addr: SocketAddr,
        ca_pem: String,
        ca_der: CertificateDer<'static>,
        accept: tokio::task::JoinHandle<()>,
    }

    impl std::fmt::Debug for TestServer {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("TestServer")
                .field("addr", &self.addr)
                .finish()
        }
    }

    impl Drop for TestServer {
        fn drop(&mut self) {
            self.accept.abort();
        }
    }

    /// A CA and a server certificate signed by it.
    struct Issued {
        ca_pem: String,
        ca_der: CertificateDer<'static>,
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
    }

    /// A fresh CA and a leaf for `localhost` and `127.0.0.1` signed by it.
    fn issue() -> Result<Issued, SetupError> {
        let ca_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca_cert = ca_params.self_signed(&ca_key)?;
        let issuer = Issuer::new(ca_params, ca_key);

        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::new(vec!["localhost".to_owned()])?;
        params
            .subject_alt_names
            .push(SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)));
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let leaf = params.signed_by(&key, &issuer)?;
        let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        Ok(Issued {
            ca_pem: ca_cert.pem(),
            ca_der: ca_cert.der().clone(),
            chain: vec![leaf.der().clone()],
            key: key_der,
        })
    }

    impl TestServer {
        /// Starts a server with default options (TLS 1.3 and 1.2, all aws-lc-rs groups).
        pub async fn start(handler: Handler) -> Result<Self, SetupError> {
            Self::start_with(handler, ServerOptions::default()).await
        }

        /// Starts a server with `options`.
        pub async fn start_with(
            handler: Handler,
            options: ServerOptions,
        ) -> Result<Self, SetupError> {
            let Issued {
                ca_pem,
                ca_der,
                chain,
                key,
            } = issue()?;
            let mut provider = aws_lc_rs::default_provider();
            if options.classic_only {
                provider.kx_groups = vec![aws_lc_rs::kx_group::X25519];
            }
            let provider: Arc<CryptoProvider> = Arc::new(provider);
            let mut config = ServerConfig::builder_with_provider(provider)
                .with_protocol_versions(options.versions)?
                .with_no_client_auth()
                .with_single_cert(chain, key)?;
            config.alpn_protocols = vec![b"http/1.1".to_vec()];
            let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
            let listener = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?;
            let addr = listener.local_addr()?;
            let accept = tokio::spawn(async move {
                while let Ok((tcp, _)) = listener.accept().await {
                    let acceptor = acceptor.clone();
                    let handler = Arc::clone(&handler);
                    tokio::spawn(async move {
                        let Ok(tls) = acceptor.accept(tcp).await else {
                            return;
                        };
                        let service = hyper::service::service_fn(move |req| {
                            let handler = Arc::clone(&handler);
                            async move { Ok::<_, Infallible>(answer(&handler, req).await) }
                        });
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(TokioIo::new(tls), service)
                            .await;
                    });
                }
            });
            Ok(Self {
                addr,
                ca_pem,
                ca_der,
                accept,
            })
        }

        /// The server's address.
        pub fn addr(&self) -> SocketAddr {
            self.addr
        }

        /// `https://127.0.0.1:<port><path>`.
        pub fn url(&self, path: &str) -> String {
            format!("https://{}{path}", self.addr)
        }

        /// `https://localhost:<port><path>`.
        pub fn localhost_url(&self, path: &str) -> String {
            format!("https://localhost:{}{path}", self.addr.port())
        }

        /// The server's CA certificate, PEM.
        pub fn ca_pem(&self) -> &str {
            &self.ca_pem
        }

        /// A root store holding only the server's CA.
        pub fn roots(&self) -> Result<RootCertStore, SetupError> {
            let mut roots = RootCertStore::empty();
            roots.add(self.ca_der.clone())?;
            Ok(roots)
        }
    }

    async fn answer(handler: &Handler, req: Request<Incoming>) -> Response<Full<Bytes>> {
        let method = req.method().as_str().to_owned();
        let path = req
            .uri()
            .path_and_query()
            .map_or_else(|| req.uri().path().to_owned(), |p| p.as_str().to_owned());
        let content_type = req
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let body = match req.into_body().collect().await {
            Ok(collected) => collected.to_bytes().to_vec(),
            Err(_) => return status_only(StatusCode::BAD_REQUEST),
        };
        let out = handler(TestRequest {
            method,
            path,
            content_type,
            body,
        });
        let Ok(status) = StatusCode::from_u16(out.status) else {
            return status_only(StatusCode::INTERNAL_SERVER_ERROR);
        };
        Response::builder()
            .status(status)
            .header(CONTENT_TYPE, out.content_type)
            .body(Full::new(Bytes::from(out.body)))
            .unwrap_or_else(|_| status_only(StatusCode::INTERNAL_SERVER_ERROR))
    }

    fn status_only(status: StatusCode) -> Response<Full<Bytes>> {
        let mut response = Response::new(Full::new(Bytes::new()));
        *response.status_mut() = status;
        response
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::test_server::{Handler, ServerOptions, TestRequest, TestResponse, TestServer};
    use super::*;

    fn echo() -> Handler {
        Arc::new(|req: TestRequest| match req.path.as_str() {
            "/missing" => TestResponse::text(404, "no such thing"),
            "/big" => TestResponse::text(200, vec![b'x'; MAX_BODY + 1]),
            _ => TestResponse::text(
                200,
                format!(
                    "{}\n{}\n{}\n{}",
                    req.method,
                    req.path,
                    req.content_type.unwrap_or_default(),
                    String::from_utf8_lossy(&req.body)
                ),
            ),
        })
    }

    /// The echo handler's lines: method, path, content type, body.
    fn lines(response: &HttpsResponse) -> Vec<String> {
        String::from_utf8(response.body.clone())
            .expect("UTF-8 body")
            .lines()
            .map(str::to_owned)
            .collect()
    }

    #[test]
    fn urls_are_parsed_strictly() {
        let t = parse_url("https://example.org/.well-known/jwks").unwrap();
        assert_eq!((t.host.as_str(), t.port), ("example.org", 443));
        assert_eq!(t.authority, "example.org");
        assert_eq!(t.path_and_query, "/.well-known/jwks");
        let t = parse_url("https://127.0.0.1:8443").unwrap();
        assert_eq!((t.host.as_str(), t.port), ("127.0.0.1", 8443));
        assert_eq!(t.path_and_query, "/");
        let t = parse_url("HTTPS://[::1]:9000?x=1#frag").unwrap();
        assert_eq!((t.host.as_str(), t.port), ("::1", 9000));
        assert_eq!(t.authority, "[::1]:9000");
        assert_eq!(t.path_and_query, "/?x=1");
        check_url("https://token.actions.githubusercontent.com/.well-known/jwks").unwrap();
        assert!(check_url("https://exa mple.org/").is_err());
        for bad in [
            "http://example.org/",
            "https:///path",
            "https://user@example.org/",
            "https://example.org:0/",
            "https://example.org:99999/",
            "https://example.org:x/",
            "https://[::1/",
            "https://::1/",
            "https://example.org/a b",
            "example.org",
        ] {
            assert!(
                matches!(parse_url(bad), Err(HttpsError::InvalidUrl { .. })),
                "{bad} accepted"
            );
        }
    }

    #[test]
    fn forms_are_percent_encoded() {
        assert_eq!(
            form_body(&[("grant_type", "urn:ietf:params:oauth"), ("a b", "x&y=z/é~")]),
            "grant_type=urn%3Aietf%3Aparams%3Aoauth&a%20b=x%26y%3Dz%2F%C3%A9~"
        );
        assert_eq!(form_body(&[]), "");
    }

    #[test]
    fn public_config_offers_hybrid_first_then_classic() {
        let config = public_client_config(RootCertStore::empty()).unwrap();
        let names: Vec<_> = config
            .crypto_provider()
            .kx_groups
            .iter()
            .map(|g| g.name())
            .collect();
        assert_eq!(
            names,
            [
                rustls::NamedGroup::X25519MLKEM768,
                rustls::NamedGroup::X25519,
                rustls::NamedGroup::secp256r1
            ]
        );
        assert_eq!(config.alpn_protocols, [b"http/1.1".to_vec()]);
    }

    #[tokio::test]
    async fn get_and_post_round_trip() {
        let server = TestServer::start(echo()).await.unwrap();
        let tls = public_client_config(server.roots().unwrap()).unwrap();

        // IP host: checked against the IP SAN.
        let r = get(&server.url("/jwks?x=1"), Arc::clone(&tls))
            .await
            .unwrap();
        assert_eq!(r.status, 200);
        assert!(r.is_success());
        assert_eq!(r.content_type.as_deref(), Some("text/plain"));
        assert_eq!(lines(&r)[..2], ["GET", "/jwks?x=1"]);

        // DNS host: checked against the DNS SAN.
        let r = post_form(
            &server.localhost_url("/token"),
            Arc::clone(&tls),
            &[("grant_type", "client_credentials"), ("scope", "a b")],
        )
        .await
        .unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(
            lines(&r),
            [
                "POST",
                "/token",
                "application/x-www-form-urlencoded",
                "grant_type=client_credentials&scope=a%20b"
            ]
        );
    }

    #[tokio::test]
    async fn error_statuses_are_responses() {
        let server = TestServer::start(echo()).await.unwrap();
        let tls = public_client_config(server.roots().unwrap()).unwrap();
        let r = get(&server.url("/missing"), tls).await.unwrap();
        assert_eq!(r.status, 404);
        assert!(!r.is_success());
        assert_eq!(r.body, b"no such thing");
    }

    #[tokio::test]
    async fn wrong_root_is_a_tls_error() {
        let server = TestServer::start(echo()).await.unwrap();
        let other = TestServer::start(echo()).await.unwrap();
        let tls = public_client_config(other.roots().unwrap()).unwrap();
        let err = get(&server.url("/"), tls).await.unwrap_err();
        assert!(matches!(err, HttpsError::Tls { .. }), "{err}");
        let text = err.to_string();
        assert!(text.contains(&server.url("/")), "{text}");
        assert!(text.contains("certificate"), "{text}");
    }

    #[tokio::test]
    async fn oversized_bodies_are_refused() {
        let server = TestServer::start(echo()).await.unwrap();
        let tls = public_client_config(server.roots().unwrap()).unwrap();
        let err = get(&server.url("/big"), tls).await.unwrap_err();
        assert!(matches!(err, HttpsError::BodyTooLarge { .. }), "{err}");
    }

    static TLS12_ONLY: &[&rustls::SupportedProtocolVersion] = &[&rustls::version::TLS12];
    static TLS13_ONLY: &[&rustls::SupportedProtocolVersion] = &[&rustls::version::TLS13];

    #[tokio::test]
    async fn classic_and_tls12_servers_are_reachable() {
        for options in [
            ServerOptions {
                versions: TLS12_ONLY,
                classic_only: false,
            },
            ServerOptions {
                versions: TLS13_ONLY,
                classic_only: true,
            },
        ] {
            let server = TestServer::start_with(echo(), options).await.unwrap();
            let tls = public_client_config(server.roots().unwrap()).unwrap();
            let r = get(&server.url("/"), tls).await.unwrap();
            assert_eq!(r.status, 200, "{options:?}");
        }
    }

    #[tokio::test]
    async fn connect_failures_and_timeouts_name_the_url() {
        // A port nobody listens on.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        drop(listener);
        let url = format!("https://127.0.0.1:{port}/jwks");
        let tls = public_client_config(RootCertStore::empty()).unwrap();
        let err = get(&url, Arc::clone(&tls)).await.unwrap_err();
        assert!(matches!(err, HttpsError::Connect { .. }), "{err}");
        assert!(err.to_string().contains(&url));

        // A server that accepts TCP but never speaks: the deadline fires.
        let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("https://{}/", silent.local_addr().unwrap());
        let held = Arc::new(Mutex::new(Vec::new()));
        let accepted = Arc::new(AtomicUsize::new(0));
        let (held2, accepted2) = (Arc::clone(&held), Arc::clone(&accepted));
        let task = tokio::spawn(async move {
            while let Ok((s, _)) = silent.accept().await {
                accepted2.fetch_add(1, Ordering::SeqCst);
                held2.lock().unwrap().push(s);
            }
        });
        let deadline = Duration::from_millis(300);
        let err = exchange_within(deadline, &url, tls, Method::GET, None)
            .await
            .unwrap_err();
        task.abort();
        assert!(matches!(err, HttpsError::Timeout { .. }), "{err}");
        assert!(err.to_string().contains(&url));
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
    }
}
