//! Harness for the integration tests: a cluster of real `quorate-node` and
//! `quorate-coordinator` processes on 127.0.0.1 (ports chosen by the OS), with
//! certificates from the cluster PKI in a fresh temporary directory, and API and
//! node clients over real post-quantum mutual TLS.
//!
//! The binaries are the ones `cargo test --workspace` builds next to the test
//! executable (`target/<profile>/`).
#![forbid(unsafe_code)]
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    reason = "test harness: failing loudly is the point"
)]

pub mod faultproxy;
pub mod load;
pub mod multihost;
pub mod netns;
pub mod postgres;
pub mod tmpfs;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use quorate_proto::api::cluster_service_client::ClusterServiceClient;
use quorate_proto::api::key_service_client::KeyServiceClient;
use quorate_proto::fragment::fragment_node_client::FragmentNodeClient;
use quorate_proto::tls::{self, Identity, Role, Trust};
use quorate_proto::transport;
use tonic::transport::Channel;

/// The trust domain of test clusters.
pub const DOMAIN: &str = "quorate.test";

/// The issuer URL of [`TestIssuer`]'s attestations.
pub const TEST_ISS: &str = "https://issuer.test";

/// A token issuer every test node's default ceiling admits besides the cluster's own.
pub const CEILING_TEST_ISSUER: &str = "https://issuer.test";

/// The audience of [`TestIssuer`]'s attestations (what `trust.json` accepts).
pub const TEST_AUD: &str = "quorate";

/// A test OIDC issuer: an ES256 key, its JWKS on disk, and `trust.json` naming it.
pub struct TestIssuer {
    der: Vec<u8>,
    /// The public key as SPKI PEM (for algorithm-confusion tests).
    pub spki_pem: String,
}

impl TestIssuer {
    /// A new key; writes `dir/jwks.json` and `dir/trust.json` (issuer "test").
    pub fn new(dir: &Path) -> Self {
        use base64::Engine as _;
        use base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let raw = pair.public_key_raw();
        let jwks = serde_json::json!({"keys": [{
            "kty": "EC", "crv": "P-256", "alg": "ES256", "use": "sig", "kid": "k1",
            "x": URL_SAFE_NO_PAD.encode(&raw[1..33]), "y": URL_SAFE_NO_PAD.encode(&raw[33..65]),
        }]});
        std::fs::write(dir.join("jwks.json"), jwks.to_string()).unwrap();
        let trust = serde_json::json!({"oidc": [{
            "name": "test", "issuer": TEST_ISS, "audiences": [TEST_AUD],
            "jwks_file": "jwks.json", "algorithms": ["ES256"],
        }]});
        std::fs::write(dir.join("trust.json"), trust.to_string()).unwrap();
        TestIssuer {
            der: pair.serialize_der(),
            spki_pem: pair.public_key_pem(),
        }
    }

    /// Claims for `sub`, valid for 10 minutes from now, with `extra` members added.
    pub fn claims(&self, sub: &str, extra: serde_json::Value) -> serde_json::Value {
        let now = jsonwebtoken::get_current_timestamp();
        let mut c = serde_json::json!({
            "iss": TEST_ISS, "sub": sub, "aud": TEST_AUD,
            "iat": now, "nbf": now, "exp": now + 600,
        });
        for (k, v) in extra.as_object().unwrap() {
            c[k] = v.clone();
        }
        c
    }

    /// `claims` signed with the issuer's key (kid `k1`).
    pub fn sign(&self, claims: &serde_json::Value) -> String {
        let mut h = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
        h.kid = Some("k1".into());
        jsonwebtoken::encode(
            &h,
            claims,
            &jsonwebtoken::EncodingKey::from_ec_der(&self.der),
        )
        .unwrap()
    }

    /// A signed attestation for `sub` with `extra` claims.
    pub fn attest(&self, sub: &str, extra: serde_json::Value) -> String {
        self.sign(&self.claims(sub, extra))
    }

    /// A JWT signed (ES256, the issuer's key) over exactly these header and payload
    /// bytes: for attestations no JSON serialiser would produce, such as a member name
    /// given twice.
    pub fn sign_raw(&self, header: &str, payload: &str) -> String {
        use base64::Engine as _;
        use base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header),
            URL_SAFE_NO_PAD.encode(payload)
        );
        let sig = jsonwebtoken::crypto::sign(
            input.as_bytes(),
            &jsonwebtoken::EncodingKey::from_ec_der(&self.der),
            jsonwebtoken::Algorithm::ES256,
        )
        .unwrap();
        format!("{input}.{sig}")
    }
}

/// A directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    /// A fresh directory under the system temp dir.
    pub fn new(label: &str) -> Self {
        static N: AtomicU64 = AtomicU64::new(0);
        let p = std::env::temp_dir().join(format!(
            "quorate-it-{label}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A free TCP port on 127.0.0.1, for a process that must be told its port before it
/// starts (bound and released, so only probably still free when used).
///
/// It is taken below the kernel's ephemeral range (32768–60999 by default), from which
/// every `:0` bind and every outgoing connection draws: a port picked there can be taken
/// by any other socket of a concurrent test between this check and its use, and was
/// (`Address already in use` at a coordinator's start). Ports here come from a per-process
/// sequence starting at a point derived from the process id, so concurrent tests of one
/// binary never get the same one.
pub fn free_port() -> u16 {
    const LOW: u64 = 20_000;
    const SPAN: u64 = 12_000;
    static NEXT: AtomicU64 = AtomicU64::new(u64::MAX);
    let _ = NEXT.compare_exchange(
        u64::MAX,
        u64::from(std::process::id()).wrapping_mul(7_919) % SPAN,
        Ordering::Relaxed,
        Ordering::Relaxed,
    );
    for _ in 0..SPAN {
        let k = NEXT.fetch_add(1, Ordering::Relaxed) % SPAN;
        let port = u16::try_from(LOW + k).unwrap();
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port in {LOW}..{}", LOW + SPAN);
}

/// Path of a workspace binary built by `cargo test --workspace`: beside the running
/// test (`target/<profile>/deps/..`), or beside the running executable (a workspace
/// binary such as `quorate-bench` in `target/<profile>/`).
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let beside = exe.parent().unwrap();
    let dir = if beside.join(name).is_file() {
        beside
    } else {
        beside.parent().unwrap()
    };
    let p = dir.join(name);
    assert!(
        p.is_file(),
        "{} not found: run the tests with `cargo test --workspace` so the binaries are built",
        p.display()
    );
    p
}

/// A child process killed on drop.
pub struct Proc {
    /// The child.
    pub child: Child,
    /// Its address.
    pub addr: SocketAddr,
}

impl Proc {
    /// Sends SIGKILL and waits.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sends SIGTERM and waits up to 10 s.
    pub fn terminate(&mut self) -> Option<std::process::ExitStatus> {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(s)) = self.child.try_wait() {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.kill();
        None
    }

    /// Waits for the process to exit by itself (up to `limit`).
    pub fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Ok(Some(s)) = self.child.try_wait() {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Spawns `cmd`, waits for its `QUORATE_READY ... addr=` line, forwards the rest.
pub fn spawn_ready(mut cmd: Command) -> Proc {
    cmd.stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .stdin(Stdio::null());
    let mut child = cmd.spawn().unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut sent = false;
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if !sent
                && line.starts_with("QUORATE_READY")
                && let Some(a) = line.split("addr=").nth(1)
            {
                let _ = tx.send(a.trim().to_string());
                sent = true;
            }
        }
    });
    let addr = match rx.recv_timeout(Duration::from_secs(60)) {
        Ok(a) => a.parse().unwrap(),
        Err(_) => {
            let _ = child.kill();
            panic!("process did not become ready: {cmd:?}");
        }
    };
    Proc { child, addr }
}

/// A running test cluster.
pub struct TestCluster {
    /// Certificates, stores, logs.
    pub dir: TempDir,
    /// Node processes (index `k` is node `k + 1`); `None` while stopped.
    pub nodes: Vec<Option<Proc>>,
    /// Node addresses (fixed across restarts).
    pub node_addrs: Vec<SocketAddr>,
    /// The coordinator.
    pub coordinator: Option<Proc>,
    /// Coordinator address.
    pub coordinator_addr: SocketAddr,
    /// n, t.
    pub n: u16,
    /// Threshold.
    pub t: u16,
    /// Extra coordinator flags.
    pub coordinator_flags: Vec<String>,
    /// Port of the coordinator's HTTPS metadata listener (fixed across restarts, so the
    /// issuer URL is too).
    pub http_port: u16,
    /// Nodes left out of the coordinator's `--node` list (replaced or removed; their
    /// processes and addresses stay for the test to inspect).
    pub left: Vec<u16>,
}

impl TestCluster {
    /// Starts `n` nodes and a coordinator with small pools.
    pub fn start(label: &str, n: u16, t: u16, coordinator_flags: &[&str]) -> Self {
        let dir = TempDir::new(label);
        quorate_proto::pki::write_cluster(&dir.0, DOMAIN, n, false).unwrap();
        let mut c = TestCluster {
            dir,
            nodes: Vec::new(),
            node_addrs: Vec::new(),
            coordinator: None,
            coordinator_addr: "127.0.0.1:0".parse().unwrap(),
            n,
            t,
            coordinator_flags: coordinator_flags.iter().map(|s| s.to_string()).collect(),
            http_port: free_port(),
            left: Vec::new(),
        };
        for i in 1..=n {
            let p = c.spawn_node(i, "127.0.0.1:0".parse().unwrap(), None);
            c.node_addrs.push(p.addr);
            c.nodes.push(Some(p));
        }
        c.start_coordinator();
        c
    }

    /// The ceiling file of node `i` (`quorate_node::ceiling`). [`TestCluster::spawn_node`]
    /// writes [`TestCluster::default_ceiling`] there unless a test wrote its own first.
    pub fn ceiling_path(&self, i: u16) -> PathBuf {
        self.dir.0.join(format!("node-{i}-ceiling.json"))
    }

    /// The test nodes' ceiling: this cluster's issuer and [`CEILING_TEST_ISSUER`], typ
    /// `at+jwt`, tokens of at most 24 h.
    pub fn default_ceiling(&self) -> serde_json::Value {
        serde_json::json!({
            "token_issuers": [self.issuer(), CEILING_TEST_ISSUER],
            "token_typs": ["at+jwt"],
            "max_token_ttl_seconds": 86_400,
        })
    }

    /// Spawns node `i` on `addr`, optionally with a fail-point.
    pub fn spawn_node(&self, i: u16, addr: SocketAddr, fail_point: Option<&str>) -> Proc {
        let d = &self.dir.0;
        let ceiling = self.ceiling_path(i);
        if !ceiling.exists() {
            std::fs::write(&ceiling, self.default_ceiling().to_string()).unwrap();
        }
        let mut cmd = Command::new(binary("quorate-node"));
        cmd.arg("--listen")
            .arg(addr.to_string())
            .arg("--data-dir")
            .arg(d.join(format!("node-{i}")))
            .arg("--cert")
            .arg(d.join(format!("node-{i}.pem")))
            .arg("--key")
            .arg(d.join(format!("node-{i}-key.pem")))
            .arg("--ca")
            .arg(d.join("ca.pem"))
            .arg("--domain")
            .arg(DOMAIN)
            .arg("--ceiling")
            .arg(&ceiling)
            .arg("--init-kek")
            .env("QUORATE_LOG", "warn");
        if let Some(fp) = fail_point {
            cmd.arg("--fail-point").arg(fp);
        }
        spawn_ready(cmd)
    }

    /// Starts the coordinator (again).
    pub fn start_coordinator(&mut self) {
        let p = spawn_ready(self.coordinator_command());
        self.coordinator_addr = p.addr;
        self.coordinator = Some(p);
    }

    /// The coordinator's command line: every node not in [`Self::left`], the threshold
    /// [`Self::t`], [`Self::coordinator_flags`].
    pub fn coordinator_command(&self) -> Command {
        let listen = if self.coordinator_addr.port() == 0 {
            "127.0.0.1:0".to_string()
        } else {
            self.coordinator_addr.to_string()
        };
        self.coordinator_command_on(&listen, self.http_port)
    }

    /// [`Self::coordinator_command`] for a coordinator listening on `listen` (API) and
    /// `http_port` (metadata), with the same issuer URL: another coordinator of the
    /// same cluster, when they share a store.
    pub fn coordinator_command_on(&self, listen: &str, http_port: u16) -> Command {
        let d = &self.dir.0;
        let mut cmd = Command::new(binary("quorate-coordinator"));
        cmd.arg("--listen")
            .arg(listen)
            .arg("--data-dir")
            .arg(d.join("coordinator"))
            .arg("--cert")
            .arg(d.join("coordinator.pem"))
            .arg("--key")
            .arg(d.join("coordinator-key.pem"))
            .arg("--ca")
            .arg(d.join("ca.pem"))
            .arg("--domain")
            .arg(DOMAIN)
            .arg("--threshold")
            .arg(self.t.to_string())
            .arg("--http-listen")
            .arg(format!("127.0.0.1:{http_port}"))
            .arg("--issuer-url")
            .arg(self.issuer())
            .env("QUORATE_LOG", "warn");
        for (i, a) in (1u16..).zip(&self.node_addrs) {
            if !self.left.contains(&i) {
                cmd.arg("--node").arg(format!("{i}={a}"));
            }
        }
        for f in &self.coordinator_flags {
            cmd.arg(f);
        }
        cmd
    }

    /// Stops node `i` with SIGKILL.
    pub fn kill_node(&mut self, i: u16) {
        if let Some(mut p) = self.nodes[usize::from(i) - 1].take() {
            p.kill();
        }
    }

    /// Restarts node `i` on its old address.
    pub fn restart_node(&mut self, i: u16, fail_point: Option<&str>) {
        self.kill_node(i);
        let addr = self.node_addrs[usize::from(i) - 1];
        let p = self.spawn_node(i, addr, fail_point);
        self.nodes[usize::from(i) - 1] = Some(p);
    }

    /// Identity and trust for a certificate in the cluster directory (`client-admin`,
    /// `coordinator`, `node-2`, …).
    pub fn identity(&self, name: &str) -> (Identity, Trust) {
        let d = &self.dir.0;
        let id = Identity::from_pem_files(
            d.join(format!("{name}.pem")),
            d.join(format!("{name}-key.pem")),
        )
        .unwrap();
        let trust = Trust::from_pem_file(d.join("ca.pem"), DOMAIN).unwrap();
        (id, trust)
    }

    /// A channel to the coordinator's public API as `client-admin`.
    pub async fn api_channel(&self) -> Channel {
        self.channel_as("admin").await
    }

    /// Issues a certificate for client `name` from the cluster CA
    /// (`client-<name>.pem`), for tests of what a client other than `admin` may do.
    pub fn add_client(&self, name: &str) {
        let d = &self.dir.0;
        let ca = quorate_proto::pki::ClusterCa::from_pem(
            &std::fs::read_to_string(d.join("ca.pem")).unwrap(),
            &std::fs::read_to_string(d.join("ca-key.pem")).unwrap(),
            DOMAIN,
        )
        .unwrap();
        let issued = ca.issue(&Role::Client(name.to_owned())).unwrap();
        std::fs::write(d.join(format!("client-{name}.pem")), &issued.cert_pem).unwrap();
        std::fs::write(
            d.join(format!("client-{name}-key.pem")),
            issued.key_pem.as_bytes(),
        )
        .unwrap();
    }

    /// A channel to the coordinator's public API as `client-<name>`.
    pub async fn channel_as(&self, name: &str) -> Channel {
        let (id, trust) = self.identity(&format!("client-{name}"));
        let cfg = tls::client_config(&id, &trust).unwrap();
        transport::connect(self.coordinator_addr, &Role::Coordinator, DOMAIN, cfg)
            .await
            .unwrap()
    }

    /// The coordinator's data directory.
    pub fn coordinator_dir(&self) -> PathBuf {
        self.dir.0.join("coordinator")
    }

    /// The issuer URL (`https://localhost:<metadata port>`).
    pub fn issuer(&self) -> String {
        format!("https://localhost:{}", self.http_port)
    }

    /// Creates the signing key `name` with token rules for this cluster's issuer
    /// (`typ: at+jwt`, at most `max_ttl_seconds`), and waits until each of its pools holds
    /// `depth` presignatures.
    pub async fn create_token_key(&self, name: &str, max_ttl_seconds: u32, depth: u64) {
        use quorate_proto::api;
        self.keys()
            .await
            .create_key(api::CreateKeyRequest {
                name: name.into(),
                purpose: api::Purpose::Sign as i32,
                token_rules: Some(api::TokenRules {
                    max_ttl_seconds,
                    issuer: self.issuer(),
                    typ: "at+jwt".into(),
                }),
                profile: api::KeyProfile::Token as i32,
            })
            .await
            .unwrap();
        self.wait_pools(name, depth, Duration::from_secs(120)).await;
    }

    /// IdentityService client.
    pub async fn identity_api(
        &self,
    ) -> quorate_proto::api::identity_service_client::IdentityServiceClient<Channel> {
        quorate_proto::api::identity_service_client::IdentityServiceClient::new(
            self.api_channel().await,
        )
    }

    /// KeyService client.
    pub async fn keys(&self) -> KeyServiceClient<Channel> {
        KeyServiceClient::new(self.api_channel().await)
    }

    /// ClusterService client.
    pub async fn cluster(&self) -> ClusterServiceClient<Channel> {
        ClusterServiceClient::new(self.api_channel().await)
    }

    /// Stops the coordinator process and takes its place in-process (its certificate
    /// and store, real nodes over real TLS): presigns `batch` presignatures of key `name`
    /// for every signing set and returns the key and their public halves, which the
    /// coordinator keeps only in memory (DESIGN.md §4.5). What a compromised coordinator
    /// would hold.
    pub async fn presign_as_coordinator(
        &mut self,
        name: &str,
        batch: u32,
    ) -> (
        quorate_coordinator::store::NamedKey,
        Vec<quorate_crypto::presign::PresignaturePublic>,
    ) {
        let cluster = self.coordinator_in_process().await;
        let named = cluster.named(name).unwrap();
        for (mset, sset) in cluster.sets() {
            cluster
                .presign(&named.public, &mset, &sset, batch)
                .await
                .unwrap();
        }
        let presigs = cluster.pooled(named.public.key_id).unwrap();
        (named, presigs)
    }

    /// Stops the coordinator process and takes its place in-process: its certificate and
    /// store, real nodes over real TLS, no background tasks (no pools fill). Drop the
    /// returned cluster before [`TestCluster::start_coordinator`]: it holds the store.
    pub async fn coordinator_in_process(
        &mut self,
    ) -> std::sync::Arc<quorate_coordinator::cluster::Cluster> {
        if let Some(mut p) = self.coordinator.take() {
            p.terminate();
        }
        let store = quorate_coordinator::store::Store::open(
            &self.dir.0.join("coordinator").join("coordinator.redb"),
        )
        .unwrap();
        let (id, trust) = self.identity("coordinator");
        let mut channels = Vec::new();
        for i in 1..=self.n {
            let addr = self.node_addrs[usize::from(i) - 1];
            let cfg = tls::client_config(&id, &trust).unwrap();
            let ch = transport::connect(addr, &Role::Node(i), DOMAIN, cfg)
                .await
                .unwrap();
            channels.push((
                quorate_crypto::params::PartyIndex::new(i).unwrap(),
                addr,
                ch,
            ));
        }
        let params = quorate_crypto::params::ThresholdParams::new(self.n, self.t).unwrap();
        quorate_coordinator::cluster::Cluster::new(
            params,
            trust,
            channels,
            std::sync::Arc::new(store),
            None,
        )
        .unwrap()
    }

    /// A fragment-node client to node `i`, presenting the coordinator's certificate.
    pub async fn node_as_coordinator(&self, i: u16) -> FragmentNodeClient<Channel> {
        let (id, trust) = self.identity("coordinator");
        let cfg = tls::client_config(&id, &trust).unwrap();
        let ch = transport::connect(
            self.node_addrs[usize::from(i) - 1],
            &Role::Node(i),
            DOMAIN,
            cfg,
        )
        .await
        .unwrap();
        FragmentNodeClient::new(ch)
    }

    /// Polls Status until every pool of `key` has at least `depth` presignatures, or
    /// `limit` passes. Returns the final depths.
    pub async fn wait_pools(&self, key: &str, depth: u64, limit: Duration) -> Vec<(Vec<u32>, u64)> {
        let mut c = self.cluster().await;
        let deadline = Instant::now() + limit;
        loop {
            let st = c
                .status(quorate_proto::api::StatusRequest {})
                .await
                .unwrap()
                .into_inner();
            let pools: Vec<(Vec<u32>, u64)> = st
                .pools
                .iter()
                .filter(|p| p.key_name == key)
                .map(|p| (p.signing_set.clone(), p.depth))
                .collect();
            if (!pools.is_empty() && pools.iter().all(|(_, d)| *d >= depth))
                || Instant::now() > deadline
            {
                return pools;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// Small pools for process tests: refill below 4, up to 8, in batches of 8.
pub const POOL_FLAGS: &[&str] = &[
    "--pool-low",
    "4",
    "--pool-high",
    "8",
    "--presign-batch",
    "8",
];

impl TestCluster {
    /// Creates key `name` (legacy purpose, no token rules) as the admin client.
    pub async fn create_key(
        &self,
        name: &str,
        purpose: quorate_proto::api::Purpose,
    ) -> quorate_proto::api::KeyInfo {
        self.keys()
            .await
            .create_key(quorate_proto::api::CreateKeyRequest {
                name: name.into(),
                purpose: purpose as i32,
                token_rules: None,
                profile: quorate_proto::api::KeyProfile::Unspecified as i32,
            })
            .await
            .unwrap()
            .into_inner()
    }

    /// Signs `msg` with key `name` through the API (raw `r || s`).
    pub async fn sign(&self, name: &str, msg: &[u8]) -> Result<Vec<u8>, tonic::Status> {
        use quorate_proto::api;
        self.keys()
            .await
            .sign(api::SignRequest {
                name: name.into(),
                input: Some(api::sign_request::Input::Message(msg.to_vec())),
                format: api::SignatureFormat::Raw as i32,
            })
            .await
            .map(|r| r.into_inner().signature)
    }
}

/// Verifies an ES256 signature (`r || s`) on `msg` with aws-lc-rs, under the compressed
/// SEC1 public key `public_compressed`; panics if it does not verify.
pub fn verify_es256(public_compressed: &[u8], msg: &[u8], sig: &[u8]) {
    use aws_lc_rs::signature::{ECDSA_P256_SHA256_FIXED, UnparsedPublicKey};
    let x = quorate_crypto::Point::from_bytes(public_compressed).unwrap();
    UnparsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, x.to_uncompressed())
        .verify(msg, sig)
        .expect("aws-lc-rs rejects the cluster's signature");
}

/// A sign batch of one request, as the coordinator sends it to a node: presignature `p`
/// of `key` for `digest`, with the signing input the digest was made from, if any.
pub fn sign_batch(
    key: &quorate_crypto::keys::KeyPublic,
    p: &quorate_crypto::presign::PresignaturePublic,
    digest: [u8; 32],
    input: Option<&[u8]>,
) -> quorate_proto::fragment::SignBatch {
    use quorate_crypto::wire::Wire as _;
    quorate_proto::fragment::SignBatch {
        requests: vec![
            quorate_crypto::sign::SignRequest {
                key_id: key.key_id,
                presig_id: p.id,
                sset: p.sset.clone(),
                digest,
            }
            .to_bytes(),
        ],
        signing_inputs: input.map(|i| vec![i.to_vec()]).unwrap_or_default(),
        evidence: Vec::new(),
    }
}
