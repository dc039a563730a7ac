//! The cluster end to end: real node and coordinator processes, real PQ mutual TLS on
//! 127.0.0.1, real files.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::time::Duration;

use quorate_crypto::tdh::{self, DhResponse, Requester};
use quorate_crypto::wire::Wire;
use quorate_proto::api;
use quorate_tests::{DOMAIN, POOL_FLAGS, TestCluster, verify_es256 as verify_aws};
use sha2::Digest;

async fn derive(c: &TestCluster, name: &str, context: &[u8]) -> [u8; 32] {
    let mut rng = rand_rng();
    let req = Requester::new(&mut rng).unwrap();
    let reply = c
        .keys()
        .await
        .derive(api::DeriveRequest {
            name: name.into(),
            context: context.to_vec(),
            requester_public: req.public().to_bytes().to_vec(),
        })
        .await
        .unwrap()
        .into_inner();
    let resp = DhResponse::from_bytes(&reply.masked).unwrap();
    let shared = req.unmask(&resp).unwrap();
    *tdh::derive_credential(&shared, context)
        .unwrap()
        .secret_bytes()
}

fn scrape(addr: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\n\r\n")
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    out
}

fn rand_rng() -> rand::rngs::StdRng {
    quorate_crypto::sim::test_rng("it")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dkg_sign_derive_decrypt_and_node_outage() {
    let metrics_port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let metrics_addr = format!("127.0.0.1:{metrics_port}");
    let mut flags = POOL_FLAGS.to_vec();
    flags.extend(["--metrics-listen", metrics_addr.as_str()]);
    let mut c = TestCluster::start("e2e", 3, 1, &flags);
    let key = c.create_key("tokens", api::Purpose::Sign).await;
    assert_eq!((key.n, key.t), (3, 1));
    let pools = c.wait_pools("tokens", 4, Duration::from_secs(120)).await;
    assert_eq!(pools.len(), 3, "one pool per signing set: {pools:?}");
    assert!(
        pools.iter().all(|(_, d)| *d >= 4),
        "pools did not fill: {pools:?}"
    );

    for k in 0..5 {
        let msg = format!("token {k}");
        let sig = c.sign("tokens", msg.as_bytes()).await.unwrap();
        verify_aws(&key.public_key, msg.as_bytes(), &sig);
    }

    // Prometheus metrics count what happened.
    let text = scrape(&metrics_addr);
    assert!(
        text.contains("quorate_coordinator_signatures_total 5"),
        "{text}"
    );
    assert!(
        text.contains("quorate_coordinator_pool_depth{key=\"tokens\",set=\"{1,2}\"}"),
        "{text}"
    );

    // Derivation: the same credential through different quorums.
    let dkey = c.create_key("creds", api::Purpose::Derive).await;
    let ctx = b"quorate/derive/v1|target=db|agent=a|task=1";
    let first = derive(&c, "creds", ctx).await;
    // Decryption round trip.
    let ekey = c.create_key("secrets", api::Purpose::Decrypt).await;
    let mut rng = rand_rng();
    let x = quorate_crypto::Point::from_bytes(&ekey.public_key).unwrap();
    let ct = quorate_crypto::ecies::encrypt(&mut rng, &x, b"db password", b"aad").unwrap();
    let req = Requester::new(&mut rng).unwrap();
    let reply = c
        .keys()
        .await
        .decrypt(api::DecryptRequest {
            name: "secrets".into(),
            ciphertext: ct.to_bytes(),
            requester_public: req.public().to_bytes().to_vec(),
        })
        .await
        .unwrap()
        .into_inner();
    let shared = req
        .unmask(&DhResponse::from_bytes(&reply.masked).unwrap())
        .unwrap();
    let pt = quorate_crypto::ecies::decrypt_with_shared(&shared, &x, &ct, b"aad").unwrap();
    assert_eq!(&pt[..], b"db password");
    let _ = dkey;

    // Kill node 1: signing continues from the pool of the surviving set {2,3}, and
    // derivation through quorum {2,3} gives the same credential.
    c.kill_node(1);
    for k in 0..3 {
        let msg = format!("during outage {k}");
        let sig = c.sign("tokens", msg.as_bytes()).await.unwrap();
        verify_aws(&key.public_key, msg.as_bytes(), &sig);
    }
    let second = derive(&c, "creds", ctx).await;
    assert_eq!(first, second, "derived credential depends on the quorum");

    // Restart node 1: its shares load from its store and new presignatures are made
    // for the sets that include it.
    c.restart_node(1, None);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let pools = c.wait_pools("tokens", 4, Duration::from_secs(120)).await;
    assert!(
        pools.iter().all(|(_, d)| *d >= 4),
        "pools did not refill after restart: {pools:?}"
    );
    let sig = c.sign("tokens", b"after restart").await.unwrap();
    verify_aws(&key.public_key, b"after restart", &sig);

    // The coordinator restarts and keeps its keys and pools.
    if let Some(mut p) = c.coordinator.take() {
        p.terminate();
    }
    c.start_coordinator();
    let sig = c
        .sign("tokens", b"after coordinator restart")
        .await
        .unwrap();
    verify_aws(&key.public_key, b"after coordinator restart", &sig);
    let _ = DOMAIN;
    let _ = sha2::Sha256::digest(b"");
}

/// A burst of signatures larger than every pool together waits for presigning instead of
/// failing: with pools of at most 2 per signing set (6 in all) and refilling only once a
/// pool is empty, 24 concurrent signatures all succeed, each verified by aws-lc-rs, and
/// each on its own presignature (the nodes would refuse a second digest on one).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_beyond_the_pools_waits_for_presignatures() {
    let metrics_addr = format!("127.0.0.1:{}", quorate_tests::free_port());
    let c = TestCluster::start(
        "burst",
        3,
        1,
        &[
            "--pool-low",
            "1",
            "--pool-high",
            "2",
            "--presign-batch",
            "2",
            "--metrics-listen",
            &metrics_addr,
        ],
    );
    let key = c.create_key("burst", api::Purpose::Sign).await;
    c.wait_pools("burst", 2, Duration::from_secs(60)).await;
    let mut burst = tokio::task::JoinSet::new();
    for i in 0..24u32 {
        let keys = c.keys().await;
        burst.spawn(async move {
            let msg = format!("burst message {i}").into_bytes();
            let mut keys = keys;
            let sig = keys
                .sign(api::SignRequest {
                    name: "burst".into(),
                    input: Some(api::sign_request::Input::Message(msg.clone())),
                    format: api::SignatureFormat::Raw as i32,
                })
                .await
                .map(|r| r.into_inner().signature);
            (msg, sig)
        });
    }
    let mut ok = 0;
    while let Some(done) = burst.join_next().await {
        let (msg, sig) = done.unwrap();
        let sig = sig.unwrap_or_else(|s| panic!("a signature of the burst failed: {s:?}"));
        verify_aws(&key.public_key, &msg, &sig);
        ok += 1;
    }
    assert_eq!(ok, 24);
    let metrics = scrape(&metrics_addr);
    let made: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("quorate_coordinator_presignatures_made_total "))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(
        made >= 24,
        "24 signatures need 24 presignatures, {made} were made"
    );
}
