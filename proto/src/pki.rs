//! The cluster CA and certificate issuance (rcgen), used by `quorate admin init`
//! (DESIGN.md §6) and by tests.
//!
//! All keys are ECDSA P-256 (`PKCS_ECDSA_P256_SHA256`): TLS uses them, and nodes also
//! sign protocol messages with their certificate key ([`crate::tls::Identity::signing_key_bytes`]).
//!
//! - The CA certificate is a path-length-0 CA (`keyCertSign`, `cRLSign`), valid for 10
//!   years: it issues leaf certificates only.
//! - A leaf certificate names its role as in [`Role`]: SPIFFE ID as its only URI SAN, the
//!   role's DNS name as its only DNS SAN (no `localhost` or IP SANs: peers are checked by
//!   role, not by address). [`ClusterCa::issue_with_ips`] also names the host's addresses
//!   as IP SANs, for hosts whose certificates should say where they run; peers still check
//!   only the role. Key usage `digitalSignature`, extended key usage `serverAuth`
//!   and `clientAuth` (every process is both a TLS server and client), a random 128-bit
//!   serial, valid from one hour ago (clock skew) for one year.
//!
//! The CA key is wiped when the [`ClusterCa`] is dropped and is never `Debug`-printed;
//! issued keys are returned in [`zeroize::Zeroizing`] strings. Private key files are
//! written with mode 0600.

use std::fmt;
use std::fs;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, PublicKeyData as _, SanType,
    SerialNumber,
};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use zeroize::{Zeroize, Zeroizing};

use crate::tls::{Result, Role, TlsError, provider, validate_domain};

/// How long a CA certificate is valid.
const CA_VALIDITY: time::Duration = time::Duration::days(3650);
/// How long a leaf certificate is valid.
const LEAF_VALIDITY: time::Duration = time::Duration::days(365);
/// How far in the past validity starts, to tolerate clock skew between machines.
const BACKDATE: time::Duration = time::Duration::hours(1);

/// A freshly issued certificate and its private key (PKCS#8 PEM).
pub struct IssuedCert {
    /// The certificate, PEM.
    pub cert_pem: String,
    /// The private key, PKCS#8 PEM. Secret: wiped on drop.
    pub key_pem: Zeroizing<String>,
}

impl fmt::Debug for IssuedCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IssuedCert")
            .field("cert_pem", &self.cert_pem)
            .field("key_pem", &"<redacted>")
            .finish()
    }
}

/// The cluster certificate authority: its certificate and signing key.
pub struct ClusterCa {
    domain: String,
    cert_pem: String,
    cert_der: CertificateDer<'static>,
    key: KeyPair,
}

impl fmt::Debug for ClusterCa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClusterCa")
            .field("domain", &self.domain)
            .field("key", &"<redacted>")
            .finish()
    }
}

impl Drop for ClusterCa {
    fn drop(&mut self) {
        // Wipes rcgen's PKCS#8 copy; aws-lc clears its own key object when freed.
        self.key.zeroize();
    }
}

fn random_serial() -> Result<SerialNumber> {
    let mut bytes = [0u8; 16];
    provider()
        .secure_random
        .fill(&mut bytes)
        .map_err(|e| TlsError::Config(e.into()))?;
    // Positive and non-zero, as RFC 5280 §4.1.2.2 asks.
    if let Some(first) = bytes.first_mut() {
        *first = (*first & 0x7f) | 0x01;
    }
    Ok(SerialNumber::from_slice(&bytes))
}

impl ClusterCa {
    /// Creates a new CA with a fresh P-256 key for trust domain `domain`.
    pub fn generate(domain: &str) -> Result<Self> {
        validate_domain(domain)?;
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let now = time::OffsetDateTime::now_utc();
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, format!("Quorate cluster CA {domain}"));
        params
            .distinguished_name
            .push(DnType::OrganizationName, "Quorate");
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.not_before = now - BACKDATE;
        params.not_after = now + CA_VALIDITY;
        params.serial_number = Some(random_serial()?);
        let cert = params.self_signed(&key)?;
        Ok(Self {
            domain: domain.to_owned(),
            cert_pem: cert.pem(),
            cert_der: cert.der().clone(),
            key,
        })
    }

    /// Loads an existing CA from its certificate and PKCS#8 P-256 key (as written by
    /// [`write_cluster`]). Checks that the key belongs to the certificate.
    pub fn from_pem(cert_pem: &str, key_pem: &str, domain: &str) -> Result<Self> {
        validate_domain(domain)?;
        let cert_der = CertificateDer::from_pem_slice(cert_pem.as_bytes()).map_err(|e| {
            TlsError::BadCertificatePem {
                origin: "the CA certificate PEM".to_owned(),
                reason: e.to_string(),
            }
        })?;
        let key_mismatch = |reason: String| TlsError::KeyMismatch {
            cert_origin: "the CA certificate PEM".to_owned(),
            key_origin: "the CA key PEM".to_owned(),
            reason,
        };
        // rcgen's PEM errors do not quote the input.
        let key = KeyPair::from_pem(key_pem).map_err(|e| key_mismatch(e.to_string()))?;
        if key.algorithm() != &PKCS_ECDSA_P256_SHA256 {
            return Err(key_mismatch("the CA key must be ECDSA P-256".to_owned()));
        }
        let (_, cert) = x509_parser::parse_x509_certificate(cert_der.as_ref()).map_err(|e| {
            TlsError::CertificateParse {
                reason: e.to_string(),
            }
        })?;
        if cert.public_key().raw != key.subject_public_key_info().as_slice() {
            return Err(key_mismatch(
                "the key does not match the certificate".to_owned(),
            ));
        }
        if !cert.is_ca() {
            return Err(key_mismatch(
                "the certificate is not a CA certificate".to_owned(),
            ));
        }
        Ok(Self {
            domain: domain.to_owned(),
            cert_pem: cert_pem.to_owned(),
            cert_der,
            key,
        })
    }

    /// The trust domain.
    pub fn domain(&self) -> &str {
        &self.domain
    }

    /// The CA certificate, PEM: what every process trusts (`ca.pem`).
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA private key, PKCS#8 PEM — secret; for writing `ca-key.pem` only.
    pub fn secret_key_pem(&self) -> Zeroizing<String> {
        Zeroizing::new(self.key.serialize_pem())
    }

    /// Issues a certificate for `role` with a fresh P-256 key.
    pub fn issue(&self, role: &Role) -> Result<IssuedCert> {
        role.validate()?;
        let domain = &self.domain;
        let spiffe_id = role.spiffe_id(domain);
        let dns_name = role.dns_name(domain);
        let sans = vec![
            SanType::URI(spiffe_id.try_into()?),
            SanType::DnsName(dns_name.clone().try_into()?),
        ];
        self.issue_leaf(
            dns_name,
            sans,
            vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ],
        )
    }

    /// Issues a certificate for `role` as [`ClusterCa::issue`] does, that also names the
    /// host's addresses `ips` as IP SANs (after the URI and DNS SANs). Peers check the
    /// role, never the address, so such a certificate works wherever its holder runs;
    /// the addresses only say where it was meant to (multi-host deployments and tests).
    pub fn issue_with_ips(&self, role: &Role, ips: &[std::net::IpAddr]) -> Result<IssuedCert> {
        role.validate()?;
        let domain = &self.domain;
        let dns_name = role.dns_name(domain);
        let mut sans = vec![
            SanType::URI(role.spiffe_id(domain).try_into()?),
            SanType::DnsName(dns_name.clone().try_into()?),
        ];
        sans.extend(ips.iter().copied().map(SanType::IpAddress));
        self.issue_leaf(
            dns_name,
            sans,
            vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ],
        )
    }

    /// Issues a web server certificate (serverAuth only, no SPIFFE ID) for the HTTPS
    /// metadata listener (discovery, JWKS, introspection): each name becomes a DNS SAN,
    /// or an IP SAN when it parses as an IP address.
    pub fn issue_web(&self, names: &[&str]) -> Result<IssuedCert> {
        let first = names.first().ok_or(TlsError::InvalidRole {
            role: "web server".to_owned(),
            reason: "a web certificate needs at least one name",
        })?;
        let mut sans = Vec::with_capacity(names.len());
        for name in names {
            sans.push(match name.parse::<std::net::IpAddr>() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => SanType::DnsName((*name).to_owned().try_into()?),
            });
        }
        self.issue_leaf(
            (*first).to_owned(),
            sans,
            vec![ExtendedKeyUsagePurpose::ServerAuth],
        )
    }

    /// Issues an X.509-SVID (SPIFFE X.509-SVID §2–§5) for `spiffe://<domain>/<path>` with
    /// a fresh P-256 key: the SPIFFE ID as the only SAN, `digitalSignature`,
    /// `clientAuth`. For a CA that stands for an agents' trust domain (the dev cluster's
    /// `agents.<domain>`), never the cluster CA: the agent listener does not accept the
    /// cluster CA's certificates.
    ///
    /// Errors: [`TlsError::InvalidRole`] when `path` is empty, starts with `/`, or holds
    /// a segment that is empty, `.` or `..`, or characters outside
    /// `A-Za-z0-9-._` (SPIFFE ID §2.2).
    pub fn issue_svid(&self, path: &str) -> Result<IssuedCert> {
        let segment_ok = |seg: &str| {
            !seg.is_empty()
                && seg != "."
                && seg != ".."
                && seg
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'))
        };
        if !path.split('/').all(segment_ok) {
            return Err(TlsError::InvalidRole {
                role: path.to_owned(),
                reason: "an SVID path is segments of A-Z a-z 0-9 - . _ separated by '/' \
                         (SPIFFE ID §2.2)",
            });
        }
        let id = format!("spiffe://{}/{path}", self.domain);
        self.issue_leaf(
            id.clone(),
            vec![SanType::URI(id.try_into()?)],
            vec![ExtendedKeyUsagePurpose::ClientAuth],
        )
    }

    /// A leaf certificate with a fresh P-256 key: common name, SANs and extended key
    /// usages as given; validity [`LEAF_VALIDITY`] from [`BACKDATE`] ago.
    fn issue_leaf(
        &self,
        common_name: String,
        sans: Vec<SanType>,
        ekus: Vec<ExtendedKeyUsagePurpose>,
    ) -> Result<IssuedCert> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let now = time::OffsetDateTime::now_utc();
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params
            .distinguished_name
            .push(DnType::OrganizationName, "Quorate");
        params.subject_alt_names = sans;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = ekus;
        params.use_authority_key_identifier_extension = true;
        params.not_before = now - BACKDATE;
        params.not_after = now + LEAF_VALIDITY;
        params.serial_number = Some(random_serial()?);
        let issuer = Issuer::from_ca_cert_der(&self.cert_der, &self.key)?;
        let cert = params.signed_by(&key, &issuer)?;
        Ok(IssuedCert {
            cert_pem: cert.pem(),
            key_pem: Zeroizing::new(key.serialize_pem()),
        })
    }
}

/// Names on the metadata listener's certificate written by [`write_cluster`].
pub const METADATA_NAMES: [&str; 3] = ["localhost", "127.0.0.1", "::1"];

/// Where a role's certificate and key were written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertPaths {
    /// The role.
    pub role: Role,
    /// The certificate (PEM, mode 0644).
    pub cert: PathBuf,
    /// The private key (PKCS#8 PEM, mode 0600).
    pub key: PathBuf,
}

/// The files [`write_cluster`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterFiles {
    /// The directory.
    pub dir: PathBuf,
    /// `ca.pem`.
    pub ca_cert: PathBuf,
    /// `ca-key.pem` (mode 0600).
    pub ca_key: PathBuf,
    /// `node-<i>.pem` / `node-<i>-key.pem`, for i = 1..=n in order.
    pub nodes: Vec<CertPaths>,
    /// `coordinator.pem` / `coordinator-key.pem`.
    pub coordinator: CertPaths,
    /// `client-admin.pem` / `client-admin-key.pem` (for the admin CLI).
    pub admin: CertPaths,
    /// `metadata.pem`: the HTTPS metadata listener's certificate for
    /// [`METADATA_NAMES`] (serverAuth only).
    pub metadata_cert: PathBuf,
    /// `metadata-key.pem` (mode 0600).
    pub metadata_key: PathBuf,
}

/// File stem of a role's certificate in a cluster directory.
fn file_stem(role: &Role) -> String {
    match role {
        Role::Node(i) => format!("node-{i}"),
        Role::Coordinator => "coordinator".to_owned(),
        Role::Client(name) => format!("client-{name}"),
    }
}

/// Creates a new cluster CA for `domain` and certificates for nodes `1..=n`, the
/// coordinator and the `admin` client, written under `dir` (created, mode 0700, if
/// missing):
///
/// `ca.pem`, `ca-key.pem`, `node-<i>.pem` + `node-<i>-key.pem`, `coordinator.pem` +
/// `coordinator-key.pem`, `client-admin.pem` + `client-admin-key.pem`, `metadata.pem` +
/// `metadata-key.pem`.
///
/// Private keys are written with mode 0600. If `dir/ca-key.pem` exists, nothing is
/// written unless `overwrite` is true: a new CA invalidates every certificate of the
/// running cluster.
pub fn write_cluster(dir: &Path, domain: &str, n: u16, overwrite: bool) -> Result<ClusterFiles> {
    validate_domain(domain)?;
    if !(1..=crate::tls::MAX_NODE_INDEX).contains(&n) {
        return Err(TlsError::InvalidRole {
            role: format!("node count {n}"),
            reason: "a cluster has 1 to 255 nodes",
        });
    }
    let ca_key_path = dir.join("ca-key.pem");
    if !overwrite && ca_key_path.try_exists().unwrap_or(true) {
        return Err(TlsError::WouldOverwrite { path: ca_key_path });
    }
    create_private_dir(dir)?;

    let ca = ClusterCa::generate(domain)?;
    let ca_cert_path = dir.join("ca.pem");
    write_file(&ca_key_path, ca.secret_key_pem().as_bytes(), true)?;
    write_file(&ca_cert_path, ca.cert_pem().as_bytes(), false)?;

    let write_role = |role: Role| -> Result<CertPaths> {
        let issued = ca.issue(&role)?;
        let stem = file_stem(&role);
        let cert = dir.join(format!("{stem}.pem"));
        let key = dir.join(format!("{stem}-key.pem"));
        write_file(&key, issued.key_pem.as_bytes(), true)?;
        write_file(&cert, issued.cert_pem.as_bytes(), false)?;
        Ok(CertPaths { role, cert, key })
    };
    let nodes = (1..=n)
        .map(|i| write_role(Role::Node(i)))
        .collect::<Result<Vec<_>>>()?;
    let coordinator = write_role(Role::Coordinator)?;
    let admin = write_role(Role::Client("admin".to_owned()))?;
    let web = ca.issue_web(&METADATA_NAMES)?;
    let metadata_cert = dir.join("metadata.pem");
    let metadata_key = dir.join("metadata-key.pem");
    write_file(&metadata_key, web.key_pem.as_bytes(), true)?;
    write_file(&metadata_cert, web.cert_pem.as_bytes(), false)?;
    Ok(ClusterFiles {
        metadata_cert,
        metadata_key,
        dir: dir.to_owned(),
        ca_cert: ca_cert_path,
        ca_key: ca_key_path,
        nodes,
        coordinator,
        admin,
    })
}

fn create_private_dir(dir: &Path) -> Result<()> {
    let mut builder = fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        builder.mode(0o700);
    }
    builder.create(dir).map_err(|source| TlsError::WriteFile {
        path: dir.to_owned(),
        source,
    })
}

/// Writes `contents` to `path`, replacing it; `secret` files get mode 0600 — also when
/// the file already existed with a wider mode — before any byte is written.
fn write_file(path: &Path, contents: &[u8], secret: bool) -> Result<()> {
    let err = |source| TlsError::WriteFile {
        path: path.to_owned(),
        source,
    };
    let mut options = fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(if secret { 0o600 } else { 0o644 });
    }
    let mut file = options.open(path).map_err(err)?;
    #[cfg(unix)]
    if secret {
        use std::os::unix::fs::PermissionsExt;
        file.set_permissions(fs::Permissions::from_mode(0o600))
            .map_err(err)?;
    }
    file.write_all(contents).map_err(err)?;
    file.sync_all().map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::{Identity, Trust};

    #[test]
    fn issued_certificates_name_their_role_and_verify() {
        let ca = ClusterCa::generate("quorate.local").unwrap();
        let trust = Trust::from_pem(ca.cert_pem(), "quorate.local").unwrap();
        for role in [
            Role::Node(7),
            Role::Coordinator,
            Role::Client("admin".into()),
        ] {
            let issued = ca.issue(&role).unwrap();
            let id = Identity::from_pem(&issued.cert_pem, &issued.key_pem).unwrap();
            assert_eq!(id.role("quorate.local").unwrap(), role);
            assert_eq!(trust.verify_peer_chain(id.cert_chain()).unwrap(), role);
            // Debug shows the name, never the key.
            let debug = format!("{id:?}");
            assert!(debug.contains(&role.spiffe_id("quorate.local")), "{debug}");
            assert!(!debug.contains("PRIVATE"), "{debug}");
        }
        assert!(ca.issue(&Role::Node(0)).is_err());
        assert!(!format!("{ca:?}").contains("PRIVATE"));
    }

    #[test]
    fn certificates_with_ip_sans_name_the_addresses_and_still_verify_by_role() {
        let ca = ClusterCa::generate("quorate.local").unwrap();
        let trust = Trust::from_pem(ca.cert_pem(), "quorate.local").unwrap();
        let ips: [std::net::IpAddr; 2] = ["198.18.0.2".parse().unwrap(), "::1".parse().unwrap()];
        let issued = ca.issue_with_ips(&Role::Node(3), &ips).unwrap();
        let id = Identity::from_pem(&issued.cert_pem, &issued.key_pem).unwrap();
        assert_eq!(
            trust.verify_peer_chain(id.cert_chain()).unwrap(),
            Role::Node(3)
        );
        let (_, cert) = x509_parser::parse_x509_certificate(id.cert_chain()[0].as_ref()).unwrap();
        let mut named = Vec::new();
        for name in &cert
            .subject_alternative_name()
            .unwrap()
            .unwrap()
            .value
            .general_names
        {
            named.push(match name {
                x509_parser::extensions::GeneralName::URI(u) => format!("uri {u}"),
                x509_parser::extensions::GeneralName::DNSName(d) => format!("dns {d}"),
                x509_parser::extensions::GeneralName::IPAddress(ip) => format!("ip {ip:?}"),
                other => format!("other {other:?}"),
            });
        }
        assert_eq!(
            named,
            [
                "uri spiffe://quorate.local/node/3".to_owned(),
                "dns node-3.quorate.local".to_owned(),
                format!("ip {:?}", [198u8, 18, 0, 2]),
                format!("ip {:?}", std::net::Ipv6Addr::LOCALHOST.octets()),
            ]
        );
        // Without addresses it is the role certificate `issue` makes.
        let plain = ca.issue_with_ips(&Role::Coordinator, &[]).unwrap();
        let id = Identity::from_pem(&plain.cert_pem, &plain.key_pem).unwrap();
        assert_eq!(id.role("quorate.local").unwrap(), Role::Coordinator);
    }

    #[test]
    fn ca_reloads_from_pem_and_rejects_foreign_keys() {
        let ca = ClusterCa::generate("quorate.local").unwrap();
        let again =
            ClusterCa::from_pem(ca.cert_pem(), &ca.secret_key_pem(), "quorate.local").unwrap();
        let issued = again.issue(&Role::Node(1)).unwrap();
        let trust = Trust::from_pem(ca.cert_pem(), "quorate.local").unwrap();
        let id = Identity::from_pem(&issued.cert_pem, &issued.key_pem).unwrap();
        assert_eq!(
            trust.verify_peer_chain(id.cert_chain()).unwrap(),
            Role::Node(1)
        );

        let other = ClusterCa::generate("quorate.local").unwrap();
        assert!(
            ClusterCa::from_pem(ca.cert_pem(), &other.secret_key_pem(), "quorate.local").is_err()
        );
        // A leaf certificate is not a CA.
        assert!(ClusterCa::from_pem(&issued.cert_pem, &issued.key_pem, "quorate.local").is_err());
    }

    #[test]
    fn foreign_and_cross_domain_certificates_are_rejected() {
        let ca = ClusterCa::generate("quorate.local").unwrap();
        let trust = Trust::from_pem(ca.cert_pem(), "quorate.local").unwrap();
        let other = ClusterCa::generate("quorate.local").unwrap();
        let foreign = other.issue(&Role::Coordinator).unwrap();
        let id = Identity::from_pem(&foreign.cert_pem, &foreign.key_pem).unwrap();
        assert!(matches!(
            trust.verify_peer_chain(id.cert_chain()),
            Err(TlsError::ChainRejected { .. })
        ));

        let elsewhere = ClusterCa::generate("elsewhere.local").unwrap();
        let trust_elsewhere = Trust::from_pem(elsewhere.cert_pem(), "elsewhere.local").unwrap();
        let issued = ca.issue(&Role::Node(1)).unwrap();
        let id = Identity::from_pem(&issued.cert_pem, &issued.key_pem).unwrap();
        assert!(trust_elsewhere.verify_peer_chain(id.cert_chain()).is_err());
        assert!(matches!(
            id.role("elsewhere.local"),
            Err(TlsError::BadSpiffeId { .. })
        ));
    }

    #[test]
    fn mismatched_key_is_refused_naming_both_inputs() {
        let ca = ClusterCa::generate("quorate.local").unwrap();
        let a = ca.issue(&Role::Node(1)).unwrap();
        let b = ca.issue(&Role::Node(2)).unwrap();
        let err = Identity::from_pem(&a.cert_pem, &b.key_pem).unwrap_err();
        assert!(matches!(err, TlsError::KeyMismatch { .. }), "{err}");
        let err = Identity::from_pem(&a.cert_pem, "not a key").unwrap_err();
        assert!(matches!(err, TlsError::BadKeyPem { .. }), "{err}");
    }
}
