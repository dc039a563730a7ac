//! A cluster across test hosts (DESIGN.md §10): every fragment node and the
//! coordinator a real process in a network namespace of its own ([`crate::netns`]),
//! with its own address in 198.18.0.0/15 named in its certificate, and the coordinator
//! reaching node `i` only through link `i` of a [`FaultProxy`] in the test's namespace.
//!
//! ```text
//!   coordinator ns            root ns (the test)                  node i ns
//!   198.18.b.2:7100  <-- API -- client
//!   coordinator --> gateway:7200+i  [FaultProxy link i] --> 198.18.b.(4i+2):7101  quorate-node i
//! ```
//!
//! The coordinator is started with `--node i=<its gateway>:<7200+i>`; the TLS server
//! name it checks is `node-i.<domain>` whatever the address (`quorate_proto::transport`),
//! so the proxy is invisible to TLS. Ports are fixed: every host has its own addresses.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use quorate_proto::api;
use quorate_proto::tls::{self, Identity, Role, Trust};
use quorate_proto::transport;
use tonic::transport::Channel;

use crate::faultproxy::{FaultProxy, Link};
use crate::netns::{Host, Hosts};
use crate::{DOMAIN, Proc, TempDir, binary, spawn_ready};

/// The coordinator's API port, on its own address.
pub const API_PORT: u16 = 7100;
/// Every node's port, on its own address.
pub const NODE_PORT: u16 = 7101;
/// The coordinator's HTTPS metadata port.
pub const HTTP_PORT: u16 = 7443;
/// Link `i` listens on the coordinator's gateway at this port plus `i`.
pub const PROXY_PORT_BASE: u16 = 7200;

/// A cluster of `n` nodes and a coordinator, each on its own test host.
pub struct MultiHostCluster {
    /// Node processes (index `k` is node `k + 1`); `None` while stopped.
    pub nodes: Vec<Option<Proc>>,
    /// The coordinator; `None` while stopped.
    pub coordinator: Option<Proc>,
    /// n.
    pub n: u16,
    /// t.
    pub t: u16,
    coordinator_flags: Vec<String>,
    // Field order is drop order: processes first (above), then the links, the hosts
    // and the files.
    proxy: FaultProxy,
    hosts: Hosts,
    /// Certificates, stores, ceilings.
    pub dir: TempDir,
}

impl MultiHostCluster {
    /// Starts `n` nodes and the coordinator (with `coordinator_flags`), each on a test
    /// host of its own. Panics if the hosts cannot be made: call
    /// [`crate::netns::skip_unless_available`] first.
    pub fn start(label: &str, n: u16, t: u16, coordinator_flags: &[&str]) -> Self {
        let hosts = Hosts::create(usize::from(n) + 1).unwrap_or_else(|e| panic!("{e}"));
        let dir = TempDir::new(label);
        quorate_proto::pki::write_cluster(&dir.0, DOMAIN, n, false).unwrap();
        // Node and coordinator certificates also name their host's address.
        let ca = quorate_proto::pki::ClusterCa::from_pem(
            &std::fs::read_to_string(dir.0.join("ca.pem")).unwrap(),
            &std::fs::read_to_string(dir.0.join("ca-key.pem")).unwrap(),
            DOMAIN,
        )
        .unwrap();
        for (k, host) in hosts.all().iter().enumerate() {
            let (role, stem) = if k == 0 {
                (Role::Coordinator, "coordinator".to_owned())
            } else {
                let i = u16::try_from(k).unwrap();
                (Role::Node(i), format!("node-{i}"))
            };
            let issued = ca.issue_with_ips(&role, &[IpAddr::V4(host.addr)]).unwrap();
            std::fs::write(dir.0.join(format!("{stem}.pem")), &issued.cert_pem).unwrap();
            write_secret(
                &dir.0.join(format!("{stem}-key.pem")),
                issued.key_pem.as_bytes(),
            );
        }
        let gateway = hosts.host(0).gateway;
        let pairs: Vec<(SocketAddr, SocketAddr)> = (1..=n)
            .map(|i| {
                (
                    SocketAddr::new(IpAddr::V4(gateway), PROXY_PORT_BASE + i),
                    SocketAddr::new(IpAddr::V4(hosts.host(usize::from(i)).addr), NODE_PORT),
                )
            })
            .collect();
        let seed = u64::from(std::process::id());
        eprintln!("multihost {label}: fault proxy seed {seed}");
        let proxy = FaultProxy::start(&pairs, seed).unwrap();
        let mut c = MultiHostCluster {
            dir,
            nodes: Vec::new(),
            coordinator: None,
            n,
            t,
            coordinator_flags: coordinator_flags.iter().map(|s| s.to_string()).collect(),
            proxy,
            hosts,
        };
        for i in 1..=n {
            let p = c.spawn_node(i);
            c.nodes.push(Some(p));
        }
        c.start_coordinator();
        c
    }

    /// The test host of node `i` (0 is the coordinator's).
    pub fn host(&self, i: u16) -> &Host {
        self.hosts.host(usize::from(i))
    }

    /// Node `i`'s address.
    pub fn node_addr(&self, i: u16) -> SocketAddr {
        SocketAddr::new(IpAddr::V4(self.host(i).addr), NODE_PORT)
    }

    /// The coordinator's API address.
    pub fn coordinator_addr(&self) -> SocketAddr {
        SocketAddr::new(IpAddr::V4(self.host(0).addr), API_PORT)
    }

    /// The link coordinator → node `i`.
    pub fn link(&self, i: u16) -> &Link {
        self.proxy.link(usize::from(i) - 1)
    }

    /// Every link.
    pub fn links(&self) -> &[Link] {
        self.proxy.links()
    }

    /// The issuer URL, on the coordinator's address.
    pub fn issuer(&self) -> String {
        format!("https://{}:{HTTP_PORT}", self.host(0).addr)
    }

    /// Node `i`'s ceiling file: this cluster's issuer and the test issuer, `at+jwt`,
    /// tokens of at most 24 h (as [`crate::TestCluster::default_ceiling`]).
    pub fn ceiling_path(&self, i: u16) -> PathBuf {
        self.dir.0.join(format!("node-{i}-ceiling.json"))
    }

    /// Starts node `i` in its namespace (on its fixed address) and waits until ready.
    pub fn spawn_node(&self, i: u16) -> Proc {
        let d = &self.dir.0;
        let ceiling = self.ceiling_path(i);
        if !ceiling.exists() {
            let c = serde_json::json!({
                "token_issuers": [self.issuer(), crate::CEILING_TEST_ISSUER],
                "token_typs": ["at+jwt"],
                "max_token_ttl_seconds": 86_400,
            });
            std::fs::write(&ceiling, c.to_string()).unwrap();
        }
        let mut cmd = self.host(i).command(binary("quorate-node"));
        cmd.arg("--listen")
            .arg(self.node_addr(i).to_string())
            .arg("--data-dir")
            .arg(self.node_data_dir(i))
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
        spawn_ready(cmd)
    }

    /// The coordinator's command line.
    fn coordinator_command(&self) -> Command {
        let d = &self.dir.0;
        let me = self.host(0);
        let mut cmd = me.command(binary("quorate-coordinator"));
        cmd.arg("--listen")
            .arg(self.coordinator_addr().to_string())
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
            .arg(format!("{}:{HTTP_PORT}", me.addr))
            .arg("--issuer-url")
            .arg(self.issuer())
            .env("QUORATE_LOG", "warn");
        for (k, link) in self.proxy.links().iter().enumerate() {
            cmd.arg("--node").arg(format!("{}={}", k + 1, link.listen));
        }
        for f in &self.coordinator_flags {
            cmd.arg(f);
        }
        cmd
    }

    /// Starts the coordinator (again) and waits until it is ready.
    pub fn start_coordinator(&mut self) {
        let p = spawn_ready(self.coordinator_command());
        self.coordinator = Some(p);
    }

    /// Stops the coordinator gracefully (SIGTERM; it drains) and starts it again.
    pub fn restart_coordinator(&mut self) {
        if let Some(mut p) = self.coordinator.take() {
            p.terminate();
        }
        self.start_coordinator();
    }

    /// Stops node `i` gracefully (SIGTERM; it drains) and starts it again.
    pub fn restart_node(&mut self, i: u16) {
        self.stop_node(i);
        self.start_node(i);
    }

    /// Stops node `i` gracefully (SIGTERM; it drains), if it runs.
    pub fn stop_node(&mut self, i: u16) {
        if let Some(mut p) = self.nodes[usize::from(i) - 1].take() {
            p.terminate();
        }
    }

    /// Starts node `i` (again) and waits until it is ready.
    pub fn start_node(&mut self, i: u16) {
        let p = self.spawn_node(i);
        self.nodes[usize::from(i) - 1] = Some(p);
    }

    /// Node `i`'s data directory (its store and key-encryption key; its certificate and
    /// ceiling live beside it in the cluster directory).
    pub fn node_data_dir(&self, i: u16) -> PathBuf {
        self.dir.0.join(format!("node-{i}"))
    }

    /// Identity and trust for a certificate in the cluster directory.
    pub fn identity(&self, name: &str) -> (Identity, Trust) {
        let d = &self.dir.0;
        let id = Identity::from_pem_files(
            d.join(format!("{name}.pem")),
            d.join(format!("{name}-key.pem")),
        )
        .unwrap();
        (id, Trust::from_pem_file(d.join("ca.pem"), DOMAIN).unwrap())
    }

    /// A channel to the coordinator's API as `client-admin`, connecting lazily (and
    /// again after the coordinator restarts).
    pub fn api_channel(&self) -> Channel {
        let (id, trust) = self.identity("client-admin");
        let cfg = tls::client_config(&id, &trust).unwrap();
        transport::connect_lazy(self.coordinator_addr(), &Role::Coordinator, DOMAIN, cfg).unwrap()
    }

    /// KeyService client.
    pub fn keys(&self) -> api::key_service_client::KeyServiceClient<Channel> {
        api::key_service_client::KeyServiceClient::new(self.api_channel())
    }

    /// IdentityService client.
    pub fn identity_api(&self) -> api::identity_service_client::IdentityServiceClient<Channel> {
        api::identity_service_client::IdentityServiceClient::new(self.api_channel())
    }

    /// ClusterService client.
    pub fn cluster(&self) -> api::cluster_service_client::ClusterServiceClient<Channel> {
        api::cluster_service_client::ClusterServiceClient::new(self.api_channel())
    }

    /// Node `i`'s `Inventory`, asked directly as the coordinator, not through the link.
    pub async fn node_inventory(
        &self,
        i: u16,
    ) -> Result<quorate_proto::fragment::InventoryReply, String> {
        let (id, trust) = self.identity("coordinator");
        let cfg = tls::client_config(&id, &trust).map_err(|e| e.to_string())?;
        let ch = transport::connect(self.node_addr(i), &Role::Node(i), DOMAIN, cfg)
            .await
            .map_err(|e| e.to_string())?;
        let mut node = quorate_proto::fragment::fragment_node_client::FragmentNodeClient::new(ch);
        let reply = node
            .inventory(quorate_proto::fragment::InventoryRequest {})
            .await
            .map_err(|e| e.to_string())?;
        Ok(reply.into_inner())
    }

    /// How many unused presignatures node `i` holds ([`MultiHostCluster::node_inventory`]).
    pub async fn node_presignatures(&self, i: u16) -> Result<u64, String> {
        Ok(self.node_inventory(i).await?.unused_presignatures)
    }

    /// Each node's epoch of the key with id `key_id` (hex), from its own inventory
    /// (`None`: stopped, unreachable, or no active share).
    pub async fn epochs(&self, key_id: &str) -> Vec<Option<u32>> {
        let mut out = Vec::new();
        for i in 1..=self.n {
            let inv = if self.nodes[usize::from(i) - 1].is_some() {
                self.node_inventory(i).await.ok()
            } else {
                None
            };
            out.push(inv.and_then(|inv| {
                inv.keys
                    .iter()
                    .find(|k| hex::encode(&k.key_id) == key_id && k.active)
                    .map(|k| k.epoch)
            }));
        }
        out
    }

    /// The depth of each pool of `key`: (signing set, depth).
    pub async fn pools(&self, key: &str) -> Result<Vec<(Vec<u32>, u64)>, tonic::Status> {
        let st = self
            .cluster()
            .status(api::StatusRequest {})
            .await?
            .into_inner();
        Ok(st
            .pools
            .iter()
            .filter(|p| p.key_name == key)
            .map(|p| (p.signing_set.clone(), p.depth))
            .collect())
    }

    /// Polls Status until every pool of `key` named in `sets` (every pool, if `sets`
    /// is empty) has at least `depth` presignatures, or `limit` passes. Returns the last
    /// depths and whether they got there.
    pub async fn wait_pools(
        &self,
        key: &str,
        sets: &[Vec<u32>],
        depth: u64,
        limit: Duration,
    ) -> (Vec<(Vec<u32>, u64)>, bool) {
        let deadline = Instant::now() + limit;
        loop {
            let pools = self.pools(key).await.unwrap_or_default();
            let wanted = |s: &Vec<u32>| sets.is_empty() || sets.contains(s);
            let full = !pools.is_empty()
                && (sets.is_empty() || sets.iter().all(|s| pools.iter().any(|(p, _)| p == s)))
                && pools
                    .iter()
                    .filter(|(s, _)| wanted(s))
                    .all(|(_, d)| *d >= depth);
            if full || Instant::now() > deadline {
                return (pools, full);
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// Writes a private key file, mode 0600.
fn write_secret(path: &std::path::Path, contents: &[u8]) {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .unwrap();
    f.write_all(contents).unwrap();
}
