//! The one place Quorate builds rustls configurations (DESIGN.md §6).
//!
//! Every internal channel is TLS 1.3 with the hybrid post-quantum key exchange
//! X25519MLKEM768 and nothing else: [`provider`] carries no classic group, so a peer
//! that cannot speak the hybrid group fails the handshake instead of being downgraded.
//! Both ends authenticate with certificates from the cluster CA ([`crate::pki`]), and a
//! peer's [`Role`] is read from its certificate — never from a request field.
//!
//! # Names
//!
//! A certificate names its role twice (see [`Role`]):
//! - a SPIFFE ID as its only URI SAN, e.g. `spiffe://quorate.local/node/3`, which servers
//!   read to decide what the peer may do ([`server_config`]'s `allowed` roles, then
//!   [`peer_role`] in handlers);
//! - a DNS SAN, e.g. `node-3.quorate.local`, which clients check through the TLS server
//!   name: [`crate::transport::connect`] connects to "node 3" with server name
//!   `node-3.quorate.local`, so a peer holding node 2's or the coordinator's certificate
//!   fails the handshake.
//!
//! Because every role's DNS name starts with a different fixed label (`node-`,
//! `coordinator.`, `client-`), no client name can produce a node's or the coordinator's
//! DNS name.
//!
//! # Secrets
//!
//! [`Identity`] holds a private key: it is wiped on drop, its `Debug` shows the
//! certificate's name only, and no error carries key bytes (errors about a key file name
//! the file, never its content).

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, LazyLock};

use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::CryptoProvider;
use rustls::crypto::aws_lc_rs;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{
    ClientConfig, DigitallySignedStruct, DistinguishedName, RootCertStore, ServerConfig,
    SignatureScheme,
};
use x509_parser::extensions::GeneralName;
use zeroize::{Zeroize, Zeroizing};

/// ALPN protocol offered and accepted on every Quorate channel: gRPC runs over HTTP/2.
const ALPN_H2: &[u8] = b"h2";

/// Longest client name accepted in a [`Role::Client`].
pub const MAX_CLIENT_NAME_LEN: usize = 64;

/// Highest node index accepted in a [`Role::Node`].
pub const MAX_NODE_INDEX: u16 = 255;

/// Errors from loading identities, checking certificates, building TLS configurations,
/// issuing certificates ([`crate::pki`]) and connecting ([`crate::transport`]).
///
/// Messages say what is wrong and what to do. None carries key material: errors about a
/// private key name its file (or "the PEM input"), never its content.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// A file could not be read.
    #[error("cannot read {what} at {}: {source}", path.display())]
    ReadFile {
        /// What the file should hold ("certificate", "private key", "CA certificate").
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A file or directory could not be written.
    #[error("cannot write {}: {source}", path.display())]
    WriteFile {
        /// The file or directory.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// Refused to replace an existing cluster CA key.
    #[error(
        "refusing to overwrite the existing cluster CA key at {}: replacing it invalidates every \
         certificate of the cluster; pass the overwrite flag (`quorate admin init --force`) if you \
         really mean to create a new CA",
        path.display()
    )]
    WouldOverwrite {
        /// The existing CA key file.
        path: PathBuf,
    },
    /// PEM input held no certificate, or a malformed one.
    #[error(
        "{origin} holds no valid PEM certificate ({reason}): expected one or more `-----BEGIN CERTIFICATE-----` blocks"
    )]
    BadCertificatePem {
        /// Where the PEM came from (a path, or "the PEM input").
        origin: String,
        /// What was wrong.
        reason: String,
    },
    /// PEM input held no private key, or a malformed one.
    #[error(
        "{origin} holds no valid PEM private key ({reason}): expected a `-----BEGIN PRIVATE KEY-----` block (PKCS#8)"
    )]
    BadKeyPem {
        /// Where the PEM came from (a path, or "the PEM input").
        origin: String,
        /// What was wrong (never key bytes).
        reason: &'static str,
    },
    /// The private key is unusable or does not belong to the certificate.
    #[error(
        "the private key from {key_origin} cannot be used with the certificate from {cert_origin}: {reason}"
    )]
    KeyMismatch {
        /// Where the certificate came from.
        cert_origin: String,
        /// Where the key came from.
        key_origin: String,
        /// What was wrong (never key bytes).
        reason: String,
    },
    /// The key is not an ECDSA P-256 key, which Quorate's protocol signatures need.
    #[error(
        "the identity's private key is not a P-256 (prime256v1) EC key: Quorate nodes sign protocol \
         messages with their certificate key; reissue the certificate with `quorate admin init`"
    )]
    KeyNotP256,
    /// A certificate could not be parsed as X.509.
    #[error("certificate is not valid X.509 DER ({reason}): reissue it with `quorate admin init`")]
    CertificateParse {
        /// The parser's complaint.
        reason: String,
    },
    /// The peer presented no certificate.
    #[error(
        "no certificate was presented: connect with mutual TLS using a certificate from the cluster CA"
    )]
    NoCertificate,
    /// The certificate carries no SPIFFE ID.
    #[error(
        "certificate has no SPIFFE URI SAN for domain {domain}: reissue it with `quorate admin init`"
    )]
    NoSpiffeId {
        /// The trust domain expected.
        domain: String,
    },
    /// The certificate carries more than one URI SAN.
    #[error(
        "certificate has {count} URI SANs, but an X.509-SVID must have exactly one (its SPIFFE ID): \
         reissue it with `quorate admin init`"
    )]
    MultipleUriSans {
        /// How many URI SANs there are.
        count: usize,
    },
    /// The SPIFFE ID does not name a Quorate role in this trust domain.
    #[error("SPIFFE ID `{id}` is not a Quorate role in trust domain {domain}: {reason}")]
    BadSpiffeId {
        /// The ID found (public data).
        id: String,
        /// The trust domain expected.
        domain: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A role cannot be expressed in a certificate.
    #[error("invalid role {role}: {reason}")]
    InvalidRole {
        /// The role, as displayed.
        role: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The trust domain is not a valid lower-case DNS name.
    #[error(
        "invalid trust domain `{domain}`: {reason} (use a lower-case DNS name such as `quorate.local`)"
    )]
    InvalidDomain {
        /// The domain given.
        domain: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The certificate chain does not verify against the cluster CA.
    #[error(
        "certificate was rejected: {reason} (it must be issued by this cluster's CA and be valid now; \
         reissue it with `quorate admin init`)"
    )]
    ChainRejected {
        /// rustls/webpki's reason.
        reason: rustls::Error,
    },
    /// The peer holds a valid certificate, but for a role this endpoint does not accept.
    #[error("peer is {role}, but this endpoint accepts only {allowed}")]
    RoleNotAllowed {
        /// The peer's role.
        role: Role,
        /// The roles accepted, as a list.
        allowed: String,
    },
    /// A key-exchange group list that does not put the hybrid group first.
    #[error(
        "key-exchange groups `{given}`: the list must start with X25519MLKEM768 (classic groups may follow it as fallbacks), e.g. X25519MLKEM768:P-256"
    )]
    KxGroups {
        /// The groups given, `:`-separated.
        given: String,
    },
    /// A server configuration that accepts no role at all was requested.
    #[error("a server must accept at least one peer role (this is a bug in the caller)")]
    NoRolesAllowed,
    /// rustls refused the configuration.
    #[error("building the TLS configuration failed: {0}")]
    Config(#[from] rustls::Error),
    /// The client-certificate verifier could not be built.
    #[error("building the client-certificate verifier failed: {0}: check the CA certificate")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
    /// Certificate generation failed.
    #[error("certificate generation failed: {0}")]
    Pki(#[from] rcgen::Error),
    /// A server name could not be formed for a role.
    #[error("`{name}` is not a valid TLS server name: check the trust domain")]
    InvalidServerName {
        /// The name.
        name: String,
    },
    /// The address could not be turned into an endpoint.
    #[error("invalid endpoint for {addr}: {reason}")]
    InvalidEndpoint {
        /// The address.
        addr: std::net::SocketAddr,
        /// What tonic said.
        reason: String,
    },
    /// Connecting (TCP, TLS handshake, HTTP/2) failed.
    #[error("cannot connect to {server} at {addr}: {reason}")]
    Connect {
        /// The address.
        addr: std::net::SocketAddr,
        /// The role expected at that address.
        server: Role,
        /// The chain of causes.
        reason: String,
    },
}

/// Result alias for this module.
pub type Result<T, E = TlsError> = std::result::Result<T, E>;

// ---------------------------------------------------------------------------------------
// Roles
// ---------------------------------------------------------------------------------------

/// A principal of the cluster, as named by its certificate.
///
/// | role | URI SAN (SPIFFE ID) | DNS SAN |
/// | --- | --- | --- |
/// | node `i` (1..=255) | `spiffe://<domain>/node/<i>` | `node-<i>.<domain>` |
/// | coordinator | `spiffe://<domain>/coordinator` | `coordinator.<domain>` |
/// | client `name` | `spiffe://<domain>/client/<name>` | `client-<name>.<domain>` |
///
/// Client names are 1 to 64 characters of `[A-Za-z0-9._-]` that also form a valid DNS
/// name once prefixed with `client-`: no leading, trailing or doubled `.`, and at most
/// 56 characters before the first `.` (a DNS label is at most 63 bytes).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Role {
    /// Fragment node with this index (1..=255).
    Node(u16),
    /// The coordinator.
    Coordinator,
    /// An API user or the admin CLI.
    Client(String),
}

/// The kind of a [`Role`], for lists of roles an endpoint accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RoleKind {
    /// Any fragment node.
    Node,
    /// The coordinator.
    Coordinator,
    /// Any client.
    Client,
}

impl fmt::Display for RoleKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            RoleKind::Node => "node",
            RoleKind::Coordinator => "coordinator",
            RoleKind::Client => "client",
        })
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Role::Node(i) => write!(f, "node {i}"),
            Role::Coordinator => f.write_str("coordinator"),
            Role::Client(name) => write!(f, "client {name}"),
        }
    }
}

impl Role {
    /// The SPIFFE ID this role's certificate carries as its URI SAN.
    pub fn spiffe_id(&self, domain: &str) -> String {
        match self {
            Role::Node(i) => format!("spiffe://{domain}/node/{i}"),
            Role::Coordinator => format!("spiffe://{domain}/coordinator"),
            Role::Client(name) => format!("spiffe://{domain}/client/{name}"),
        }
    }

    /// The DNS name this role's certificate carries as its DNS SAN, and the TLS server
    /// name a client uses to reach it.
    pub fn dns_name(&self, domain: &str) -> String {
        match self {
            Role::Node(i) => format!("node-{i}.{domain}"),
            Role::Coordinator => format!("coordinator.{domain}"),
            Role::Client(name) => format!("client-{name}.{domain}"),
        }
    }

    /// The kind of this role.
    pub fn kind(&self) -> RoleKind {
        match self {
            Role::Node(_) => RoleKind::Node,
            Role::Coordinator => RoleKind::Coordinator,
            Role::Client(_) => RoleKind::Client,
        }
    }

    /// Checks that the role can be put in a certificate: node index in 1..=255, client
    /// name as described on [`Role`].
    pub fn validate(&self) -> Result<()> {
        let invalid = |reason| TlsError::InvalidRole {
            role: self.to_string(),
            reason,
        };
        match self {
            Role::Node(i) if (1..=MAX_NODE_INDEX).contains(i) => Ok(()),
            Role::Node(_) => Err(invalid("node indices run from 1 to 255")),
            Role::Coordinator => Ok(()),
            Role::Client(name) => check_client_name(name).map_err(invalid),
        }
    }

    /// Parses a SPIFFE ID strictly: scheme `spiffe`, exactly this trust domain, and one of
    /// the paths of [`Role`] in canonical form (node index without sign or leading zero).
    pub fn from_spiffe_id(uri: &str, domain: &str) -> Result<Role> {
        let bad = |reason| TlsError::BadSpiffeId {
            id: uri.to_owned(),
            domain: domain.to_owned(),
            reason,
        };
        let rest = uri
            .strip_prefix("spiffe://")
            .ok_or_else(|| bad("the scheme must be `spiffe://`"))?;
        let (trust_domain, path) = rest
            .split_once('/')
            .ok_or_else(|| bad("it has no path naming a role"))?;
        if trust_domain != domain {
            return Err(bad("it belongs to another trust domain"));
        }
        if path == "coordinator" {
            return Ok(Role::Coordinator);
        }
        if let Some(index) = path.strip_prefix("node/") {
            let canonical = !index.is_empty()
                && index.len() <= 3
                && index.bytes().all(|b| b.is_ascii_digit())
                && !index.starts_with('0');
            let i = index
                .parse::<u16>()
                .ok()
                .filter(|i| canonical && (1..=MAX_NODE_INDEX).contains(i))
                .ok_or_else(|| bad("a node index is a decimal number from 1 to 255"))?;
            return Ok(Role::Node(i));
        }
        if let Some(name) = path.strip_prefix("client/") {
            check_client_name(name).map_err(bad)?;
            return Ok(Role::Client(name.to_owned()));
        }
        Err(bad(
            "the path must be `node/<i>`, `coordinator` or `client/<name>`",
        ))
    }
}

fn check_client_name(name: &str) -> Result<(), &'static str> {
    if name.is_empty() || name.len() > MAX_CLIENT_NAME_LEN {
        return Err("a client name has 1 to 64 characters");
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        return Err("a client name uses only A-Z, a-z, 0-9, `.`, `_` and `-`");
    }
    if name.starts_with('.') || name.ends_with('.') || name.contains("..") {
        return Err("a client name must not start or end with `.` or contain `..`");
    }
    // The DNS name is `client-<name>.<domain>`: its first label must fit in 63 bytes.
    let first_label = name.split('.').next().unwrap_or(name);
    if "client-".len() + first_label.len() > 63 {
        return Err("a client name has at most 56 characters before its first `.`");
    }
    Ok(())
}

/// Checks that `domain` is a lower-case DNS name usable as a SPIFFE trust domain and as
/// the suffix of TLS server names.
pub fn validate_domain(domain: &str) -> Result<()> {
    let invalid = |reason| TlsError::InvalidDomain {
        domain: domain.to_owned(),
        reason,
    };
    if domain.is_empty() || domain.len() > 200 {
        return Err(invalid("it must have 1 to 200 characters"));
    }
    if !domain
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-'))
    {
        return Err(invalid("it may contain only a-z, 0-9, `.` and `-`"));
    }
    for label in domain.split('.') {
        if label.is_empty() || label.len() > 63 {
            return Err(invalid(
                "each dot-separated label must have 1 to 63 characters",
            ));
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err(invalid("a label must not start or end with `-`"));
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Provider
// ---------------------------------------------------------------------------------------

static PROVIDER: LazyLock<Arc<CryptoProvider>> = LazyLock::new(|| {
    Arc::new(restricted_provider(vec![
        aws_lc_rs::kx_group::X25519MLKEM768,
    ]))
});

fn restricted_provider(
    kx_groups: Vec<&'static dyn rustls::crypto::SupportedKxGroup>,
) -> CryptoProvider {
    let base = aws_lc_rs::default_provider();
    CryptoProvider {
        cipher_suites: base
            .cipher_suites
            .iter()
            .filter(|suite| suite.tls13().is_some())
            .copied()
            .collect(),
        kx_groups,
        ..base
    }
}

/// The crypto provider of every Quorate channel: aws-lc-rs with TLS 1.3 cipher suites
/// only and the single key-exchange group X25519MLKEM768.
///
/// Built once; each call returns the same `Arc`.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::clone(&PROVIDER)
}

// ---------------------------------------------------------------------------------------
// Certificate inspection
// ---------------------------------------------------------------------------------------

/// The URI SANs of a DER certificate.
fn uri_sans(der: &CertificateDer<'_>) -> Result<Vec<String>> {
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref()).map_err(|e| {
        TlsError::CertificateParse {
            reason: e.to_string(),
        }
    })?;
    let san = cert
        .subject_alternative_name()
        .map_err(|e| TlsError::CertificateParse {
            reason: e.to_string(),
        })?;
    Ok(san
        .map(|ext| {
            ext.value
                .general_names
                .iter()
                .filter_map(|name| match name {
                    GeneralName::URI(uri) => Some((*uri).to_owned()),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default())
}

/// A short public label for a certificate: its URI SAN if it has one, else its subject.
fn cert_label(der: &CertificateDer<'_>) -> String {
    if let Ok(uris) = uri_sans(der)
        && let [uri] = uris.as_slice()
    {
        return uri.clone();
    }
    match x509_parser::parse_x509_certificate(der.as_ref()) {
        Ok((_, cert)) => cert.subject().to_string(),
        Err(_) => "<unparsable certificate>".to_owned(),
    }
}

/// The role named by the leaf (first) certificate of `certs`: its only URI SAN, parsed
/// strictly by [`Role::from_spiffe_id`].
///
/// This does **not** verify the chain: call it on certificates a TLS handshake with
/// [`server_config`] or [`client_config`] already verified (e.g. through
/// [`crate::transport::peer_role_of`]), or use [`Trust::verify_peer_chain`].
pub fn peer_role(certs: &[CertificateDer<'_>], domain: &str) -> Result<Role> {
    let leaf = certs.first().ok_or(TlsError::NoCertificate)?;
    let uris = uri_sans(leaf)?;
    match uris.as_slice() {
        [] => Err(TlsError::NoSpiffeId {
            domain: domain.to_owned(),
        }),
        [uri] => Role::from_spiffe_id(uri, domain),
        _ => Err(TlsError::MultipleUriSans { count: uris.len() }),
    }
}

fn parse_certs(pem: &[u8], origin: &str) -> Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| TlsError::BadCertificatePem {
            origin: origin.to_owned(),
            reason: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::BadCertificatePem {
            origin: origin.to_owned(),
            reason: "no CERTIFICATE block".to_owned(),
        });
    }
    Ok(certs)
}

fn parse_key(pem: &[u8], origin: &str) -> Result<PrivateKeyDer<'static>> {
    use rustls::pki_types::pem::Error as PemError;
    // The PEM error's text may quote input lines; describe it without them.
    let encrypted = pem
        .windows(b"ENCRYPTED PRIVATE KEY".len())
        .any(|w| w == b"ENCRYPTED PRIVATE KEY");
    PrivateKeyDer::from_pem_slice(pem).map_err(|e| TlsError::BadKeyPem {
        origin: origin.to_owned(),
        reason: match e {
            PemError::NoItemsFound if encrypted => {
                "an encrypted private key, which is not read: store it decrypted (openssl pkey -in FILE -out PLAIN), readable by its owner only"
            }
            PemError::NoItemsFound => "no PRIVATE KEY block",
            PemError::MissingSectionEnd { .. } => "a PEM section is not terminated",
            PemError::Base64Decode(_) => "invalid base64 inside a PEM section",
            _ => "malformed PEM",
        },
    })
}

fn read_text(path: &Path, what: &'static str) -> Result<Zeroizing<String>> {
    std::fs::read_to_string(path)
        .map(Zeroizing::new)
        .map_err(|source| TlsError::ReadFile {
            what,
            path: path.to_owned(),
            source,
        })
}

// ---------------------------------------------------------------------------------------
// Identity
// ---------------------------------------------------------------------------------------

/// This process's certificate chain and private key.
///
/// The key is wiped on drop; `Debug` shows the certificate's SPIFFE ID (or subject) only.
pub struct Identity {
    cert_chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    /// Public label of the leaf certificate, for `Debug` and logs.
    label: String,
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Identity")
            .field("certificate", &self.label)
            .field("chain_len", &self.cert_chain.len())
            .field("key", &"<redacted>")
            .finish()
    }
}

impl Drop for Identity {
    fn drop(&mut self) {
        self.key.zeroize();
    }
}

impl Identity {
    /// Loads an identity from a PEM certificate chain (leaf first) and a PEM private key
    /// (PKCS#8, or SEC1 `EC PRIVATE KEY`).
    ///
    /// Checks that the key is usable by rustls and matches the leaf certificate.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self> {
        Self::from_pem_with_origin(
            cert_pem,
            key_pem,
            "the certificate PEM input",
            "the key PEM input",
        )
    }

    /// Loads an identity from a PEM certificate file and a PEM private-key file. Errors
    /// name the file at fault.
    ///
    /// On Unix, logs a warning if the key file is readable by group or others.
    pub fn from_pem_files(cert_path: impl AsRef<Path>, key_path: impl AsRef<Path>) -> Result<Self> {
        let (cert_path, key_path) = (cert_path.as_ref(), key_path.as_ref());
        let cert_pem = read_text(cert_path, "certificate")?;
        let key_pem = read_text(key_path, "private key")?;
        warn_if_key_file_is_open(key_path);
        Self::from_pem_with_origin(
            &cert_pem,
            &key_pem,
            &cert_path.display().to_string(),
            &key_path.display().to_string(),
        )
    }

    fn from_pem_with_origin(
        cert_pem: &str,
        key_pem: &str,
        cert_origin: &str,
        key_origin: &str,
    ) -> Result<Self> {
        let cert_chain = parse_certs(cert_pem.as_bytes(), cert_origin)?;
        let key = parse_key(key_pem.as_bytes(), key_origin)?;
        // Fail now, naming both files, rather than when a configuration is built.
        rustls::sign::CertifiedKey::from_der(cert_chain.clone(), key.clone_key(), &provider())
            .map_err(|e| TlsError::KeyMismatch {
                cert_origin: cert_origin.to_owned(),
                key_origin: key_origin.to_owned(),
                reason: e.to_string(),
            })?;
        let label = cert_chain.first().map(cert_label).unwrap_or_default();
        Ok(Self {
            cert_chain,
            key,
            label,
        })
    }

    /// The role named by the leaf certificate's SPIFFE ID.
    pub fn role(&self, domain: &str) -> Result<Role> {
        peer_role(&self.cert_chain, domain)
    }

    /// The certificate chain, leaf first.
    pub fn cert_chain(&self) -> &[CertificateDer<'static>] {
        &self.cert_chain
    }

    /// The P-256 private scalar of the certificate key, 32 bytes big-endian.
    ///
    /// Nodes sign protocol messages (NodeInfo, round messages; DESIGN.md §4.2) with their
    /// certificate key, so peers can check the signature against the certificate. The
    /// bytes are secret: keep them in the returned `Zeroizing` and hand them straight to
    /// the signing key's constructor.
    pub fn signing_key_bytes(&self) -> Result<Zeroizing<[u8; 32]>> {
        use p256::pkcs8::DecodePrivateKey;
        let secret = match &self.key {
            PrivateKeyDer::Pkcs8(der) => p256::SecretKey::from_pkcs8_der(der.secret_pkcs8_der())
                .map_err(|_| TlsError::KeyNotP256)?,
            PrivateKeyDer::Sec1(der) => p256::SecretKey::from_sec1_der(der.secret_sec1_der())
                .map_err(|_| TlsError::KeyNotP256)?,
            _ => return Err(TlsError::KeyNotP256),
        };
        let mut field_bytes = secret.to_bytes();
        let mut out = Zeroizing::new([0u8; 32]);
        // `FieldBytes<NistP256>` is exactly 32 bytes, so the lengths agree.
        for (dst, src) in out.iter_mut().zip(field_bytes.iter()) {
            *dst = *src;
        }
        field_bytes.zeroize();
        Ok(out)
    }
}

#[cfg(unix)]
fn warn_if_key_file_is_open(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(meta) = std::fs::metadata(path) {
        let mode = meta.permissions().mode();
        if mode & 0o077 != 0 {
            tracing::warn!(
                path = %path.display(),
                mode = format_args!("{:o}", mode & 0o777),
                "private key file is readable by group or others: chmod 600 it"
            );
        }
    }
}

#[cfg(not(unix))]
fn warn_if_key_file_is_open(_path: &Path) {}

// ---------------------------------------------------------------------------------------
// Trust
// ---------------------------------------------------------------------------------------

/// The cluster CA and trust domain: what every peer certificate is checked against.
#[derive(Clone)]
pub struct Trust {
    roots: Arc<RootCertStore>,
    ca_der: CertificateDer<'static>,
    domain: String,
    /// webpki chain validation to `roots`, with the PQ-only provider's signature
    /// algorithms (built once; also the inner verifier of [`server_config`]).
    verifier: Arc<dyn ClientCertVerifier>,
}

impl fmt::Debug for Trust {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Trust")
            .field("domain", &self.domain)
            .field("ca", &cert_label(&self.ca_der))
            .field("roots", &self.roots.len())
            .finish()
    }
}

impl Trust {
    /// Trusts the CA certificate(s) in `ca_pem` for trust domain `domain`.
    ///
    /// Every certificate in the PEM becomes a trust anchor (so a CA rotation can trust
    /// old and new CA for a while); [`Trust::ca_der`] is the first.
    pub fn from_pem(ca_pem: &str, domain: &str) -> Result<Self> {
        Self::from_pem_with_origin(ca_pem, domain, "the CA PEM input")
    }

    /// Like [`Trust::from_pem`], reading the CA certificate from a file.
    pub fn from_pem_file(path: impl AsRef<Path>, domain: &str) -> Result<Self> {
        let path = path.as_ref();
        let pem = read_text(path, "CA certificate")?;
        Self::from_pem_with_origin(&pem, domain, &path.display().to_string())
    }

    fn from_pem_with_origin(ca_pem: &str, domain: &str, origin: &str) -> Result<Self> {
        validate_domain(domain)?;
        let certs = parse_certs(ca_pem.as_bytes(), origin)?;
        let mut roots = RootCertStore::empty();
        for cert in &certs {
            roots
                .add(cert.clone())
                .map_err(|e| TlsError::BadCertificatePem {
                    origin: origin.to_owned(),
                    reason: format!("not usable as a trust anchor: {e}"),
                })?;
        }
        let ca_der = certs
            .into_iter()
            .next()
            .ok_or_else(|| TlsError::BadCertificatePem {
                origin: origin.to_owned(),
                reason: "no CERTIFICATE block".to_owned(),
            })?;
        let roots = Arc::new(roots);
        let verifier =
            WebPkiClientVerifier::builder_with_provider(Arc::clone(&roots), provider()).build()?;
        Ok(Self {
            roots,
            ca_der,
            domain: domain.to_owned(),
            verifier,
        })
    }

    /// The trust domain.
    pub fn domain(&self) -> &str {
        &self.domain
    }

    /// The CA certificate (the first, if several were trusted).
    pub fn ca_der(&self) -> &CertificateDer<'static> {
        &self.ca_der
    }

    /// Verifies `chain` (leaf first) to the cluster CA as of now — signatures, validity
    /// period, key usage for client authentication (Quorate certificates carry both TLS
    /// purposes) — and returns the role of its leaf.
    ///
    /// Nodes use this on each other's `NodeInfo` certificates (DESIGN.md §4.2), so the
    /// coordinator cannot substitute keys.
    pub fn verify_peer_chain(&self, chain: &[CertificateDer<'_>]) -> Result<Role> {
        let (leaf, intermediates) = chain.split_first().ok_or(TlsError::NoCertificate)?;
        self.verifier
            .verify_client_cert(leaf, intermediates, UnixTime::now())
            .map_err(|reason| TlsError::ChainRejected { reason })?;
        peer_role(chain, &self.domain)
    }
}

// ---------------------------------------------------------------------------------------
// Configurations
// ---------------------------------------------------------------------------------------

/// Client-certificate verifier: webpki chain validation to the cluster CA, then the
/// leaf's role must be one of `allowed`.
#[derive(Debug)]
struct RoleVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    domain: String,
    allowed: Vec<RoleKind>,
}

impl RoleVerifier {
    fn allowed_list(&self) -> String {
        self.allowed
            .iter()
            .map(RoleKind::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    }
}

impl ClientCertVerifier for RoleVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> std::result::Result<ClientCertVerified, rustls::Error> {
        let verified = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)?;
        let refuse = |error: TlsError| {
            rustls::Error::InvalidCertificate(rustls::CertificateError::Other(rustls::OtherError(
                Arc::new(error),
            )))
        };
        let role = peer_role(std::slice::from_ref(end_entity), &self.domain).map_err(refuse)?;
        if self.allowed.contains(&role.kind()) {
            Ok(verified)
        } else {
            Err(refuse(TlsError::RoleNotAllowed {
                role,
                allowed: self.allowed_list(),
            }))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Server configuration: TLS 1.3, X25519MLKEM768 only, ALPN `h2`, client certificate
/// required, verified against the cluster CA, and its role one of `allowed`.
///
/// A peer whose certificate chains to the CA but names another role fails the
/// handshake — e.g. a node's port that allows only [`RoleKind::Coordinator`] refuses
/// another node's certificate.
pub fn server_config(
    id: &Identity,
    trust: &Trust,
    allowed: &[RoleKind],
) -> Result<Arc<ServerConfig>> {
    if allowed.is_empty() {
        return Err(TlsError::NoRolesAllowed);
    }
    let mut kinds = allowed.to_vec();
    kinds.dedup();
    let verifier = Arc::new(RoleVerifier {
        inner: Arc::clone(&trust.verifier),
        domain: trust.domain.clone(),
        allowed: kinds,
    });
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(id.cert_chain.clone(), id.key.clone_key())?;
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(Arc::new(config))
}

static PUBLIC_PROVIDER: LazyLock<Arc<CryptoProvider>> = LazyLock::new(|| {
    Arc::new(restricted_provider(vec![
        aws_lc_rs::kx_group::X25519MLKEM768,
        aws_lc_rs::kx_group::X25519,
        aws_lc_rs::kx_group::SECP256R1,
    ]))
});

/// The provider of the public metadata listener (DESIGN.md §6): TLS 1.3 suites, key
/// exchange preferring X25519MLKEM768 and also accepting X25519 and P-256, because
/// discovery documents and JWKS are public and most deployed verifiers cannot yet speak
/// hybrid TLS.
pub fn public_provider() -> Arc<CryptoProvider> {
    Arc::clone(&PUBLIC_PROVIDER)
}

/// The name of the hybrid post-quantum group, as [`negotiated_group_name`] reports it.
pub const HYBRID_GROUP: &str = "X25519MLKEM768";

/// The key-exchange group a connection negotiated (`"X25519MLKEM768"`, `"X25519"`, …).
pub fn negotiated_group_name(conn: &rustls::ServerConnection) -> Option<String> {
    conn.negotiated_key_exchange_group()
        .map(|g| format!("{:?}", g.name()))
}

/// Server configuration of the HTTPS metadata listener: TLS 1.3, [`public_provider`]
/// groups (the hybrid one preferred by the server), ALPN `http/1.1`, and an *optional*
/// client certificate whose chain the handshake does not judge (see
/// [`DeferredClientAuth`]): the listener verifies it per request against each trust
/// anchor alone — the cluster CA ([`Trust::verify_peer_chain`]) for introspection and
/// revocation, an agent's trust domain for `tls_client_auth` at the token endpoint (RFC
/// 8705 §2) — so a refusal reaches the client with its reason, and an agent CA can never
/// vouch for a cluster role. `agent_hints`: the agents' CA names, offered to clients
/// besides the cluster CA's. Endpoints that carry tokens require the hybrid group per
/// request.
pub fn metadata_server_config(
    id: &Identity,
    trust: &Trust,
    agent_hints: &[DistinguishedName],
) -> Result<Arc<ServerConfig>> {
    let mut hints = trust.verifier.root_hint_subjects().to_vec();
    hints.extend(agent_hints.iter().cloned());
    let verifier = Arc::new(DeferredClientAuth::new(false, hints));
    let mut config = ServerConfig::builder_with_provider(public_provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(id.cert_chain.clone(), id.key.clone_key())?;
    config.ignore_client_order = true;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// A client-certificate verifier that leaves the chain to the application: the
/// handshake still proves possession of the certificate's key (CertificateVerify,
/// checked with the provider's signature algorithms), but any chain is admitted, so
/// that the service can refuse an untrusted one *with its reason* — a TLS alert carries
/// none (a bare `bad_certificate`). Every handler behind a listener built with it must
/// verify the peer's chain itself before trusting anything in it.
#[derive(Debug)]
struct DeferredClientAuth {
    mandatory: bool,
    hints: Vec<DistinguishedName>,
    algorithms: rustls::crypto::WebPkiSupportedAlgorithms,
}

impl DeferredClientAuth {
    fn new(mandatory: bool, hints: Vec<DistinguishedName>) -> Self {
        DeferredClientAuth {
            mandatory,
            hints,
            algorithms: provider().signature_verification_algorithms,
        }
    }
}

impl ClientCertVerifier for DeferredClientAuth {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        self.mandatory
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &self.hints
    }

    fn verify_client_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> std::result::Result<ClientCertVerified, rustls::Error> {
        // Deferred: see the type's docs.
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// Client configuration for the metadata listener's token-carrying endpoints: TLS 1.3,
/// X25519MLKEM768 only, ALPN `http/1.1`, presenting `id` (a cluster client) and trusting
/// the cluster CA.
pub fn metadata_client_config(id: &Identity, trust: &Trust) -> Result<Arc<ClientConfig>> {
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(Arc::clone(&trust.roots))
        .with_client_auth_cert(id.cert_chain.clone(), id.key.clone_key())?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Server configuration of the coordinator's agent listener: TLS 1.3, X25519MLKEM768
/// only, ALPN `h2`, presenting `id` (the coordinator), and requiring a client
/// certificate whose chain the handshake admits unjudged ([`DeferredClientAuth`]): the
/// agent service verifies every request's X.509-SVID against its trust domain's bundle
/// and refuses with the reason (an unknown CA, a leaf outside the SVID profile), which a
/// TLS alert could not carry. `hints`: the agents' CA names offered to clients.
pub fn agent_server_config(
    id: &Identity,
    hints: &[DistinguishedName],
) -> Result<Arc<ServerConfig>> {
    let verifier = Arc::new(DeferredClientAuth::new(true, hints.to_vec()));
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(id.cert_chain.clone(), id.key.clone_key())?;
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(Arc::new(config))
}

/// Client configuration: TLS 1.3, X25519MLKEM768 only, ALPN `h2`, presenting `id`, and
/// trusting only the cluster CA.
///
/// The server's role is checked through the server name: connect with
/// `ServerName = role.dns_name(domain)` (as [`crate::transport::connect`] does) and
/// webpki matches it against the server certificate's DNS SAN.
pub fn client_config(id: &Identity, trust: &Trust) -> Result<Arc<ClientConfig>> {
    client_config_with(provider(), id, trust)
}

fn client_config_with(
    provider: Arc<CryptoProvider>,
    id: &Identity,
    trust: &Trust,
) -> Result<Arc<ClientConfig>> {
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(Arc::clone(&trust.roots))
        .with_client_auth_cert(id.cert_chain.clone(), id.key.clone_key())?;
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(Arc::new(config))
}

// ---------------------------------------------------------------------------------------
// The coordinator's link to its PostgreSQL store
// ---------------------------------------------------------------------------------------

/// A TLS 1.3 key-exchange group the coordinator may offer its PostgreSQL store, named as
/// OpenSSL and PostgreSQL's `ssl_groups` setting name it (RFC 8446 §4.2.7; the hybrid group
/// per draft-ietf-tls-ecdhe-mlkem).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KxGroup {
    /// X25519 combined with ML-KEM-768: the hybrid post-quantum group.
    X25519MLKEM768,
    /// Classic X25519 (RFC 7748).
    X25519,
    /// Classic ECDHE over P-256 (`secp256r1`, `prime256v1`).
    P256,
}

impl KxGroup {
    /// Parses one group name: `X25519MLKEM768`, `X25519`, or `P-256` (also `prime256v1`,
    /// `secp256r1`); case-insensitive.
    pub fn parse(name: &str) -> Option<Self> {
        match name.to_ascii_lowercase().as_str() {
            "x25519mlkem768" => Some(Self::X25519MLKEM768),
            "x25519" => Some(Self::X25519),
            "p-256" | "p256" | "prime256v1" | "secp256r1" => Some(Self::P256),
            _ => None,
        }
    }

    /// The group's name as [`KxGroup::parse`] reads it.
    pub fn name(self) -> &'static str {
        match self {
            Self::X25519MLKEM768 => HYBRID_GROUP,
            Self::X25519 => "X25519",
            Self::P256 => "P-256",
        }
    }

    fn rustls(self) -> &'static dyn rustls::crypto::SupportedKxGroup {
        match self {
            Self::X25519MLKEM768 => aws_lc_rs::kx_group::X25519MLKEM768,
            Self::X25519 => aws_lc_rs::kx_group::X25519,
            Self::P256 => aws_lc_rs::kx_group::SECP256R1,
        }
    }
}

/// Client configuration of a coordinator's connections to its PostgreSQL store
/// (`sslmode=verify-full`): TLS 1.3 only, the key-exchange `groups` in order of
/// preference, ALPN `postgresql` (which PostgreSQL 17 and later check), trusting only the
/// CA certificates in the PEM file `roots` (the server's name is checked against its
/// certificate by the caller's server name), and presenting `client` for PostgreSQL's
/// `cert` authentication if given.
///
/// `groups` must start with [`KxGroup::X25519MLKEM768`]: the classic groups are fallbacks
/// an operator adds for a server that cannot negotiate the hybrid group (PostgreSQL
/// before 18, or built with OpenSSL before 3.5), never a replacement.
///
/// Errors: an unreadable or empty CA file ([`TlsError::ReadFile`],
/// [`TlsError::BadCertificatePem`]), a group list without the hybrid group first
/// ([`TlsError::KxGroups`]).
pub fn database_client_config(
    roots: &Path,
    client: Option<&Identity>,
    groups: &[KxGroup],
) -> Result<Arc<ClientConfig>> {
    if groups.first() != Some(&KxGroup::X25519MLKEM768) {
        return Err(TlsError::KxGroups {
            given: groups
                .iter()
                .map(|g| g.name())
                .collect::<Vec<_>>()
                .join(":"),
        });
    }
    let mut seen = Vec::new();
    for g in groups {
        if !seen.contains(g) {
            seen.push(*g);
        }
    }
    let origin = roots.display().to_string();
    let pem = read_text(roots, "CA certificate")?;
    let mut store = RootCertStore::empty();
    for cert in parse_certs(pem.as_bytes(), &origin)? {
        store.add(cert).map_err(|e| TlsError::BadCertificatePem {
            origin: origin.clone(),
            reason: format!("not usable as a trust anchor: {e}"),
        })?;
    }
    let provider = Arc::new(restricted_provider(
        seen.iter().map(|g| g.rustls()).collect(),
    ));
    let builder = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(store);
    let mut config = match client {
        Some(id) => builder.with_client_auth_cert(id.cert_chain.clone(), id.key.clone_key())?,
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"postgresql".to_vec()];
    Ok(Arc::new(config))
}

/// **Test support only**: like [`client_config`] but offering only the classic X25519
/// group, to show that Quorate servers refuse it.
#[cfg(any(test, feature = "test-support"))]
pub fn classic_only_client_config_for_tests(
    id: &Identity,
    trust: &Trust,
) -> Result<Arc<ClientConfig>> {
    let provider = Arc::new(restricted_provider(vec![aws_lc_rs::kx_group::X25519]));
    client_config_with(provider, id, trust)
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "quorate.local";

    #[test]
    fn roles_round_trip_through_spiffe_ids() {
        for role in [
            Role::Node(1),
            Role::Node(255),
            Role::Coordinator,
            Role::Client("admin".into()),
            Role::Client("ci-bot_2.eu".into()),
        ] {
            role.validate().unwrap();
            assert_eq!(Role::from_spiffe_id(&role.spiffe_id(D), D).unwrap(), role);
        }
        assert_eq!(Role::Node(3).spiffe_id(D), "spiffe://quorate.local/node/3");
        assert_eq!(Role::Node(3).dns_name(D), "node-3.quorate.local");
        assert_eq!(Role::Coordinator.dns_name(D), "coordinator.quorate.local");
        assert_eq!(
            Role::Client("admin".into()).dns_name(D),
            "client-admin.quorate.local"
        );
    }

    #[test]
    fn spiffe_ids_are_parsed_strictly() {
        for bad in [
            "https://quorate.local/node/1",
            "spiffe://other.local/node/1",
            "spiffe://quorate.local.evil/node/1",
            "spiffe://quorate.local",
            "spiffe://quorate.local/",
            "spiffe://quorate.local/node/0",
            "spiffe://quorate.local/node/256",
            "spiffe://quorate.local/node/01",
            "spiffe://quorate.local/node/+1",
            "spiffe://quorate.local/node/1/",
            "spiffe://quorate.local/node/",
            "spiffe://quorate.local/coordinator/",
            "spiffe://quorate.local/Coordinator",
            "spiffe://quorate.local/client/",
            "spiffe://quorate.local/client/a/b",
            "spiffe://quorate.local/client/..",
            "spiffe://quorate.local/client/a b",
            "spiffe://quorate.local/client/a%2Fb",
            "spiffe://QUORATE.local/coordinator",
        ] {
            assert!(Role::from_spiffe_id(bad, D).is_err(), "{bad} accepted");
        }
        let long = "a".repeat(65);
        assert!(Role::from_spiffe_id(&format!("spiffe://{D}/client/{long}"), D).is_err());
        let ok = format!("{}.{}", "a".repeat(56), "b".repeat(7));
        assert_eq!(ok.len(), 64);
        assert!(Role::from_spiffe_id(&format!("spiffe://{D}/client/{ok}"), D).is_ok());
        let too_long_label = "a".repeat(57);
        assert!(Role::Client(too_long_label).validate().is_err());
        assert!(Role::Node(0).validate().is_err());
        assert!(Role::Node(256).validate().is_err());
    }

    #[test]
    fn domains_are_validated() {
        for ok in ["quorate.local", "a", "x-1.example.com"] {
            validate_domain(ok).unwrap();
        }
        for bad in [
            "",
            "Quorate.local",
            "a..b",
            ".a",
            "a.",
            "-a.b",
            "a_b",
            "a/b",
            "a b",
        ] {
            assert!(validate_domain(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn provider_is_pq_only_tls13_only() {
        let p = provider();
        assert_eq!(p.kx_groups.len(), 1);
        assert_eq!(
            p.kx_groups.first().unwrap().name(),
            rustls::NamedGroup::X25519MLKEM768
        );
        assert!(!p.cipher_suites.is_empty());
        assert!(p.cipher_suites.iter().all(|s| s.tls13().is_some()));
    }

    #[test]
    fn errors_name_the_fix() {
        let e = TlsError::NoSpiffeId {
            domain: D.to_owned(),
        };
        assert_eq!(
            e.to_string(),
            "certificate has no SPIFFE URI SAN for domain quorate.local: reissue it with `quorate admin init`"
        );
    }
}
