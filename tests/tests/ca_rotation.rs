//! Rotating the cluster CA with no downtime (README, runbook): three rolling restarts
//! of every node and the coordinator — trust both CAs, take certificates from the new
//! one, drop the old one — with signatures served after every restart, on real
//! processes over real post-quantum mutual TLS.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::time::{Duration, Instant};

use quorate_proto::api;
use quorate_proto::pki::ClusterCa;
use quorate_proto::tls::Role;
use quorate_tests::{DOMAIN, POOL_FLAGS, TestCluster, verify_es256 as verify};

/// Signs `msg` within `limit`, counting the attempts refused meanwhile.
async fn sign_within(c: &TestCluster, msg: &[u8], limit: Duration) -> (Vec<u8>, u32) {
    let start = Instant::now();
    let mut refused = 0;
    loop {
        match c.sign("k", msg).await {
            Ok(sig) => return (sig, refused),
            Err(e) if start.elapsed() < limit => {
                refused += 1;
                eprintln!("not yet: {e:?}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("no signature within {limit:?}: {e:?}"),
        }
    }
}

/// Restarts every node, then the coordinator, one at a time, signing after each.
async fn roll(c: &mut TestCluster, phase: &str, public_key: &[u8]) -> (u32, Duration) {
    let mut refused = 0;
    let mut longest = Duration::ZERO;
    for i in 1..=c.n {
        c.restart_node(i, None);
        let at = Instant::now();
        let msg = format!("{phase}: node {i} restarted");
        let (sig, r) = sign_within(c, msg.as_bytes(), Duration::from_secs(60)).await;
        verify(public_key, msg.as_bytes(), &sig);
        refused += r;
        longest = longest.max(at.elapsed());
    }
    if let Some(mut p) = c.coordinator.take() {
        p.terminate();
    }
    c.start_coordinator();
    let at = Instant::now();
    let msg = format!("{phase}: coordinator restarted");
    let (sig, r) = sign_within(c, msg.as_bytes(), Duration::from_secs(60)).await;
    verify(public_key, msg.as_bytes(), &sig);
    (refused + r, longest.max(at.elapsed()))
}

fn write(c: &TestCluster, name: &str, contents: &str) {
    std::fs::write(c.dir.0.join(name), contents).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cluster_ca_is_rotated_by_three_rolling_restarts() {
    let mut c = TestCluster::start("ca-rotation", 3, 1, POOL_FLAGS);
    let k = c.create_key("k", api::Purpose::Sign).await;
    c.wait_pools("k", 2, Duration::from_secs(120)).await;
    let old_ca = std::fs::read_to_string(c.dir.0.join("ca.pem")).unwrap();
    let old_admin = (
        std::fs::read_to_string(c.dir.0.join("client-admin.pem")).unwrap(),
        std::fs::read_to_string(c.dir.0.join("client-admin-key.pem")).unwrap(),
    );
    let new = ClusterCa::generate(DOMAIN).unwrap();

    // 1. Every process trusts both CAs.
    write(&c, "ca.pem", &format!("{old_ca}{}", new.cert_pem()));
    let one = roll(&mut c, "both CAs trusted", &k.public_key).await;

    // 2. Every process gets a certificate from the new CA.
    let mut stems: Vec<(String, Role)> = (1..=c.n)
        .map(|i| (format!("node-{i}"), Role::Node(i)))
        .collect();
    stems.push(("coordinator".into(), Role::Coordinator));
    stems.push(("client-admin".into(), Role::Client("admin".into())));
    for (stem, role) in &stems {
        let issued = new.issue(role).unwrap();
        write(&c, &format!("{stem}.pem"), &issued.cert_pem);
        write(&c, &format!("{stem}-key.pem"), &issued.key_pem);
    }
    let web = new.issue_web(&quorate_proto::pki::METADATA_NAMES).unwrap();
    write(&c, "metadata.pem", &web.cert_pem);
    write(&c, "metadata-key.pem", &web.key_pem);
    let two = roll(&mut c, "new certificates", &k.public_key).await;
    assert_eq!(old_client(&c, &old_admin).await, "served");

    // 3. The old CA is dropped.
    write(&c, "ca.pem", new.cert_pem());
    let three = roll(&mut c, "old CA dropped", &k.public_key).await;
    eprintln!(
        "CA rotation at (3,1): refused sign attempts / longest wait for a signature after a restart: trust both {} / {:.2} s, new certificates {} / {:.2} s, old CA dropped {} / {:.2} s",
        one.0,
        one.1.as_secs_f64(),
        two.0,
        two.1.as_secs_f64(),
        three.0,
        three.1.as_secs_f64()
    );

    // A client still holding a certificate of the old CA is refused now (it was
    // served while both CAs were trusted: see `old_client` after phase 2).
    let after = old_client(&c, &old_admin).await;
    eprintln!("old-CA client after the old CA was dropped: {after}");
    assert_ne!(
        after, "served",
        "a certificate of the dropped CA was accepted"
    );
}

/// Lists keys with the old CA's admin certificate: "served" or the refusal.
async fn old_client(c: &TestCluster, old_admin: &(String, String)) -> String {
    tokio::time::timeout(Duration::from_secs(10), async {
        let (_, trust) = c.identity("client-admin");
        let id = quorate_proto::tls::Identity::from_pem(&old_admin.0, &old_admin.1).unwrap();
        let cfg = quorate_proto::tls::client_config(&id, &trust).unwrap();
        match quorate_proto::transport::connect(c.coordinator_addr, &Role::Coordinator, DOMAIN, cfg)
            .await
        {
            Err(e) => format!("{e}"),
            Ok(ch) => api::key_service_client::KeyServiceClient::new(ch)
                .list_keys(api::ListKeysRequest {})
                .await
                .map(|_| "served".to_string())
                .unwrap_or_else(|e| format!("{e:?}")),
        }
    })
    .await
    .unwrap()
}
