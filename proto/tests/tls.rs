//! Real TLS on 127.0.0.1:0: a tonic server serving `grpc.health.v1` behind
//! `transport::incoming`, clients through `transport::connect`, certificates written by
//! `pki::write_cluster` into a temporary directory.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use quorate_proto::pki::{self, CertPaths, ClusterCa, ClusterFiles};
use quorate_proto::tls::{self, Identity, Role, RoleKind, TlsError, Trust};
use quorate_proto::transport;
use tokio::sync::oneshot;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

const DOMAIN: &str = "quorate.local";
const LIMIT: Duration = Duration::from_secs(20);

/// A directory under the system temp dir, unique per test, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(test: &str) -> Self {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let dir = std::env::temp_dir().join(format!(
            "quorate-proto-tls-{test}-{}-{nanos}",
            std::process::id()
        ));
        Self(dir)
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

struct Cluster {
    _dir: TempDir,
    files: ClusterFiles,
    trust: Trust,
}

impl Cluster {
    fn new(test: &str) -> Self {
        let dir = TempDir::new(test);
        let files = pki::write_cluster(dir.path(), DOMAIN, 3, false).unwrap();
        let trust = Trust::from_pem_file(&files.ca_cert, DOMAIN).unwrap();
        Self {
            _dir: dir,
            files,
            trust,
        }
    }

    fn node(&self, i: u16) -> Identity {
        let paths = &self.files.nodes[usize::from(i) - 1];
        assert_eq!(paths.role, Role::Node(i));
        identity(paths)
    }

    fn coordinator(&self) -> Identity {
        identity(&self.files.coordinator)
    }

    fn admin(&self) -> Identity {
        identity(&self.files.admin)
    }
}

fn identity(paths: &CertPaths) -> Identity {
    let id = Identity::from_pem_files(&paths.cert, &paths.key).unwrap();
    assert_eq!(id.role(DOMAIN).unwrap(), paths.role);
    id
}

/// A health server; records the role `peer_role_of` reports for every call.
struct TestServer {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<Role>>>,
    shutdown: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Result<(), tonic::transport::Error>>,
}

impl TestServer {
    async fn start(id: &Identity, trust: &Trust, allowed: &[RoleKind]) -> Self {
        let config = tls::server_config(id, trust, allowed).unwrap();
        let (listener, addr) = transport::bind("127.0.0.1:0".parse().unwrap())
            .await
            .unwrap();
        let (_reporter, health) = tonic_health::server::health_reporter();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let record = Arc::clone(&seen);
        let domain = trust.domain().to_owned();
        let check_role =
            move |req: tonic::Request<()>| -> Result<tonic::Request<()>, tonic::Status> {
                let role = transport::peer_role_of(&req, &domain)?;
                record.lock().unwrap().push(role);
                Ok(req)
            };
        let service = tonic::service::interceptor::InterceptedService::new(health, check_role);
        let (shutdown, stop) = oneshot::channel::<()>();
        let task = tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming_shutdown(transport::incoming(listener, config), async {
                    let _ = stop.await;
                }),
        );
        Self {
            addr,
            seen,
            shutdown,
            task,
        }
    }

    fn seen(&self) -> Vec<Role> {
        self.seen.lock().unwrap().clone()
    }

    async fn stop(self) {
        let _ = self.shutdown.send(());
        tokio::time::timeout(LIMIT, self.task)
            .await
            .expect("server did not shut down")
            .unwrap()
            .unwrap();
    }
}

/// Connects to `server` at `addr` and runs one health check.
async fn health_check(
    addr: SocketAddr,
    server: &Role,
    config: Arc<rustls::ClientConfig>,
) -> Result<(), String> {
    let call = async {
        let channel = transport::connect(addr, server, DOMAIN, config)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let reply = HealthClient::new(channel)
            .check(HealthCheckRequest {
                service: String::new(),
            })
            .await
            .map_err(|status| format!("call: {status}"))?;
        assert_eq!(reply.into_inner().status, ServingStatus::Serving as i32);
        Ok(())
    };
    tokio::time::timeout(LIMIT, call)
        .await
        .expect("health check hung")
}

#[tokio::test]
async fn client_role_connects_and_server_sees_its_role() {
    let cluster = Cluster::new("client-ok");
    let server =
        TestServer::start(&cluster.coordinator(), &cluster.trust, &[RoleKind::Client]).await;
    let config = tls::client_config(&cluster.admin(), &cluster.trust).unwrap();

    health_check(server.addr, &Role::Coordinator, Arc::clone(&config))
        .await
        .unwrap();
    assert_eq!(server.seen(), vec![Role::Client("admin".into())]);

    // A lazy channel connects on first use.
    let lazy = transport::connect_lazy(server.addr, &Role::Coordinator, DOMAIN, config).unwrap();
    HealthClient::new(lazy)
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap();
    assert_eq!(server.seen().len(), 2);

    // Without a TLS connection there is no role.
    let status = transport::peer_role_of(&tonic::Request::new(()), DOMAIN).unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unauthenticated);
    server.stop().await;
}

#[tokio::test]
async fn classic_only_key_exchange_is_refused() {
    let cluster = Cluster::new("classic");
    let server =
        TestServer::start(&cluster.coordinator(), &cluster.trust, &[RoleKind::Client]).await;
    let classic =
        tls::classic_only_client_config_for_tests(&cluster.admin(), &cluster.trust).unwrap();

    // No common key-exchange group: the handshake itself fails, so `connect` does.
    let err = tokio::time::timeout(
        LIMIT,
        transport::connect(server.addr, &Role::Coordinator, DOMAIN, classic),
    )
    .await
    .unwrap()
    .unwrap_err();
    assert!(matches!(err, TlsError::Connect { .. }), "{err}");
    assert!(err.to_string().contains("TLS handshake"), "{err}");

    // The server keeps serving hybrid clients.
    let hybrid = tls::client_config(&cluster.admin(), &cluster.trust).unwrap();
    health_check(server.addr, &Role::Coordinator, hybrid)
        .await
        .unwrap();
    assert_eq!(server.seen(), vec![Role::Client("admin".into())]);
    server.stop().await;
}

#[tokio::test]
async fn certificate_from_another_ca_is_refused() {
    let cluster = Cluster::new("foreign-ca");
    let server =
        TestServer::start(&cluster.coordinator(), &cluster.trust, &[RoleKind::Client]).await;

    // Same trust domain and role name, different CA.
    let rogue_ca = ClusterCa::generate(DOMAIN).unwrap();
    let rogue = rogue_ca.issue(&Role::Client("admin".into())).unwrap();
    let rogue_id = Identity::from_pem(&rogue.cert_pem, &rogue.key_pem).unwrap();
    assert!(
        cluster
            .trust
            .verify_peer_chain(rogue_id.cert_chain())
            .is_err()
    );
    // The rogue client trusts the real CA, so only the server can refuse it.
    let rogue_config = tls::client_config(&rogue_id, &cluster.trust).unwrap();
    let err = health_check(server.addr, &Role::Coordinator, rogue_config)
        .await
        .unwrap_err();
    eprintln!("refused as expected: {err}");
    assert!(server.seen().is_empty());

    let good = tls::client_config(&cluster.admin(), &cluster.trust).unwrap();
    health_check(server.addr, &Role::Coordinator, good)
        .await
        .unwrap();
    assert_eq!(server.seen(), vec![Role::Client("admin".into())]);
    server.stop().await;
}

#[tokio::test]
async fn node_never_accepts_another_node_as_coordinator() {
    let cluster = Cluster::new("node-as-coordinator");
    // Node 1's port for the coordinator.
    let server =
        TestServer::start(&cluster.node(1), &cluster.trust, &[RoleKind::Coordinator]).await;

    for impostor in [cluster.node(2), cluster.admin()] {
        let config = tls::client_config(&impostor, &cluster.trust).unwrap();
        let err = health_check(server.addr, &Role::Node(1), config)
            .await
            .unwrap_err();
        eprintln!("refused as expected: {err}");
    }
    assert!(server.seen().is_empty());

    let coordinator = tls::client_config(&cluster.coordinator(), &cluster.trust).unwrap();
    health_check(server.addr, &Role::Node(1), coordinator)
        .await
        .unwrap();
    assert_eq!(server.seen(), vec![Role::Coordinator]);
    server.stop().await;
}

#[tokio::test]
async fn server_must_hold_the_expected_role() {
    let cluster = Cluster::new("wrong-server");
    let server =
        TestServer::start(&cluster.node(3), &cluster.trust, &[RoleKind::Coordinator]).await;
    let config = tls::client_config(&cluster.coordinator(), &cluster.trust).unwrap();

    for expected in [
        Role::Node(2),
        Role::Coordinator,
        Role::Client("admin".into()),
    ] {
        let err = tokio::time::timeout(
            LIMIT,
            transport::connect(server.addr, &expected, DOMAIN, Arc::clone(&config)),
        )
        .await
        .unwrap()
        .unwrap_err();
        let text = err.to_string();
        assert!(text.contains("TLS handshake"), "{text}");
        assert!(text.contains(&expected.to_string()), "{text}");
    }
    assert!(server.seen().is_empty());

    health_check(server.addr, &Role::Node(3), config)
        .await
        .unwrap();
    assert_eq!(server.seen(), vec![Role::Coordinator]);
    server.stop().await;
}

#[test]
fn signing_key_matches_certificate_public_key() {
    let cluster = Cluster::new("signing-key");
    for id in [cluster.node(1), cluster.node(2), cluster.coordinator()] {
        let scalar = id.signing_key_bytes().unwrap();
        let secret = p256::SecretKey::from_slice(scalar.as_slice()).unwrap();

        let (_, cert) = x509_parser::parse_x509_certificate(id.cert_chain()[0].as_ref()).unwrap();
        let spki = &cert.public_key().subject_public_key.data;
        let from_cert = p256::PublicKey::from_sec1_bytes(spki).unwrap();
        assert_eq!(secret.public_key(), from_cert);
    }

    // A key that is not P-256 is refused with a clear error.
    let ed = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
    let mut params = rcgen::CertificateParams::new(vec![format!("node-1.{DOMAIN}")]).unwrap();
    params.subject_alt_names.push(rcgen::SanType::URI(
        Role::Node(1).spiffe_id(DOMAIN).try_into().unwrap(),
    ));
    let cert = params.self_signed(&ed).unwrap();
    let id = Identity::from_pem(&cert.pem(), &ed.serialize_pem()).unwrap();
    assert_eq!(id.role(DOMAIN).unwrap(), Role::Node(1));
    assert!(matches!(id.signing_key_bytes(), Err(TlsError::KeyNotP256)));
}

#[cfg(unix)]
#[test]
fn write_cluster_protects_keys_and_refuses_to_overwrite() {
    use std::os::unix::fs::PermissionsExt;
    let mode = |path: &Path| std::fs::metadata(path).unwrap().permissions().mode() & 0o777;

    let tmp = TempDir::new("write-cluster");
    let dir = tmp.path().join("certs");
    let files = pki::write_cluster(&dir, DOMAIN, 3, false).unwrap();
    assert_eq!(mode(&dir), 0o700);
    assert_eq!(files.nodes.len(), 3);

    let mut keys = vec![files.ca_key.clone()];
    let mut certs = vec![files.ca_cert.clone()];
    for paths in files.nodes.iter().chain([&files.coordinator, &files.admin]) {
        keys.push(paths.key.clone());
        certs.push(paths.cert.clone());
    }
    let names: Vec<String> = keys
        .iter()
        .chain(&certs)
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    for expected in [
        "ca-key.pem",
        "node-1-key.pem",
        "node-3-key.pem",
        "coordinator-key.pem",
        "client-admin-key.pem",
        "ca.pem",
        "node-2.pem",
        "coordinator.pem",
        "client-admin.pem",
    ] {
        assert!(names.iter().any(|n| n == expected), "{expected} missing");
    }
    for key in &keys {
        assert_eq!(mode(key), 0o600, "{}", key.display());
        let pem = std::fs::read_to_string(key).unwrap();
        assert!(pem.starts_with("-----BEGIN PRIVATE KEY-----"));
    }
    for cert in &certs {
        assert_eq!(mode(cert), 0o644, "{}", cert.display());
    }

    // Without the flag, an existing CA key is never replaced.
    let ca_before = std::fs::read(&files.ca_cert).unwrap();
    let key_before = std::fs::read(&files.ca_key).unwrap();
    let err = pki::write_cluster(&dir, DOMAIN, 3, false).unwrap_err();
    assert!(matches!(err, TlsError::WouldOverwrite { .. }), "{err}");
    assert!(err.to_string().contains("ca-key.pem"), "{err}");
    assert_eq!(std::fs::read(&files.ca_cert).unwrap(), ca_before);
    assert_eq!(std::fs::read(&files.ca_key).unwrap(), key_before);

    // With it, a new CA is written, keys still 0600 even if a file had been opened up.
    std::fs::set_permissions(&files.ca_key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let again = pki::write_cluster(&dir, DOMAIN, 3, true).unwrap();
    assert_ne!(std::fs::read(&again.ca_cert).unwrap(), ca_before);
    assert_eq!(mode(&again.ca_key), 0o600);

    // The new files form a working cluster; the old trust no longer verifies them.
    let old_trust = Trust::from_pem(std::str::from_utf8(&ca_before).unwrap(), DOMAIN).unwrap();
    let new_trust = Trust::from_pem_file(&again.ca_cert, DOMAIN).unwrap();
    let node = identity(&again.nodes[0]);
    assert_eq!(
        new_trust.verify_peer_chain(node.cert_chain()).unwrap(),
        Role::Node(1)
    );
    assert!(old_trust.verify_peer_chain(node.cert_chain()).is_err());

    // Errors name the file at fault.
    let missing = dir.join("nope.pem");
    let err = Identity::from_pem_files(&missing, &again.nodes[0].key).unwrap_err();
    assert!(err.to_string().contains("nope.pem"), "{err}");
}
