//! Crash safety, channel security and confidentiality against the coordinator, on real
//! processes over real post-quantum mutual TLS.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::time::Duration;

use quorate_crypto::sign::SignRequest;
use quorate_crypto::wire::Wire;
use quorate_node::store::{Kek, Store};
use quorate_proto::api;
use quorate_proto::fragment;
use quorate_proto::tls::{self, Role};
use quorate_proto::transport;
use quorate_tests::{DOMAIN, POOL_FLAGS, TestCluster};

/// A node killed between marking a presignature used and replying, and a node whose
/// data directory is put back to a copy taken before it signed (a restored backup or VM
/// snapshot): presignatures live in the node process's memory only (DESIGN.md §4.5), so
/// after either restart every presignature it held before is refused, whatever the
/// digest, and the cluster keeps signing from new ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_or_a_restored_disk_never_signs_with_an_old_presignature() {
    let mut c = TestCluster::start("crash", 3, 1, POOL_FLAGS);
    c.create_key("k", api::Purpose::Sign).await;
    c.wait_pools("k", 4, Duration::from_secs(120)).await;
    // Node 2 now dies right after marking a sign batch used, before it replies.
    c.restart_node(2, Some("sign-after-commit"));
    let mut crashed = false;
    for k in 0..12 {
        let _ = c.sign("k", format!("m{k}").as_bytes()).await;
        if let Some(p) = c.nodes[1].as_mut()
            && p.wait_exit(Duration::from_millis(300)).is_some()
        {
            crashed = true;
            break;
        }
    }
    assert!(crashed, "node 2 was never asked to sign");
    c.nodes[1] = None;
    c.restart_node(2, None);
    // The coordinator notices the burnt presignatures and signs from new ones.
    let mut signed = false;
    for _ in 0..20 {
        if c.sign("k", b"after crash").await.is_ok() {
            signed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(
        signed,
        "the cluster did not sign again after node 2 restarted"
    );

    // Acting as the coordinator: presignatures for every set, a copy of node 2's data
    // directory, then node 2 signs half of its presignatures.
    let (named, presigs) = c.presign_as_coordinator("k", 4).await;
    let key = named.public;
    let two = quorate_crypto::params::PartyIndex::new(2).unwrap();
    let mine: Vec<_> = presigs.iter().filter(|p| p.sset.contains(two)).collect();
    assert!(mine.len() >= 4, "node 2 holds too few presignatures");
    let dir = c.dir.0.join("node-2");
    let copy = c.dir.0.join("node-2-copy");
    copy_dir(&dir, &copy);
    let ask = |p: &quorate_crypto::presign::PresignaturePublic, digest: [u8; 32]| {
        quorate_tests::sign_batch(&key, p, digest, None)
    };
    let mut node = c.node_as_coordinator(2).await;
    for p in mine.iter().step_by(2) {
        let r = node.sign(ask(p, [0x11; 32])).await.unwrap().into_inner();
        assert!(
            matches!(
                r.results[0].result,
                Some(fragment::sign_result::Result::Share(_))
            ),
            "node 2 refused a fresh presignature: {:?}",
            r.results[0].result
        );
    }
    // The copy goes back and the node starts again.
    c.kill_node(2);
    std::fs::remove_dir_all(&dir).unwrap();
    copy_dir(&copy, &dir);
    c.restart_node(2, None);
    let mut node = c.node_as_coordinator(2).await;
    for p in &mine {
        let r = node.sign(ask(p, [0x22; 32])).await.unwrap().into_inner();
        match r.results[0].result.as_ref().unwrap() {
            fragment::sign_result::Result::Refused(why) => {
                assert!(
                    why.contains("unknown presignature"),
                    "unexpected refusal: {why}"
                )
            }
            fragment::sign_result::Result::Share(_) => {
                panic!("a presignature from before the restore signed a new digest")
            }
        }
    }
}

/// Copies a directory tree (files and subdirectories).
fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let target = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &target);
        } else {
            std::fs::copy(e.path(), &target).unwrap();
        }
    }
}

/// Classic-only clients, foreign certificates and wrong roles are refused on every port.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channels_refuse_classic_foreign_and_wrong_role_peers() {
    let c = TestCluster::start("channels", 3, 1, POOL_FLAGS);
    let (admin, trust) = c.identity("client-admin");
    let (coord, _) = c.identity("coordinator");
    let (node3, _) = c.identity("node-3");

    // Hybrid PQ works (sanity).
    let ok = tls::client_config(&admin, &trust).unwrap();
    let ch = transport::connect(c.coordinator_addr, &Role::Coordinator, DOMAIN, ok)
        .await
        .unwrap();
    let mut status = api::cluster_service_client::ClusterServiceClient::new(ch);
    assert!(status.status(api::StatusRequest {}).await.is_ok());

    // Classic X25519 only: refused by the coordinator and by every node.
    let classic = tls::classic_only_client_config_for_tests(&admin, &trust).unwrap();
    assert!(
        transport::connect(
            c.coordinator_addr,
            &Role::Coordinator,
            DOMAIN,
            classic.clone()
        )
        .await
        .is_err(),
        "coordinator accepted a classic-only client"
    );
    let classic_coord = tls::classic_only_client_config_for_tests(&coord, &trust).unwrap();
    for i in 1..=3u16 {
        assert!(
            transport::connect(
                c.node_addrs[usize::from(i) - 1],
                &Role::Node(i),
                DOMAIN,
                classic_coord.clone()
            )
            .await
            .is_err(),
            "node {i} accepted a classic-only client"
        );
    }

    // A certificate from another CA (same domain and names) is refused.
    let other = quorate_tests::TempDir::new("other-ca");
    quorate_proto::pki::write_cluster(&other.0, DOMAIN, 3, false).unwrap();
    let foreign = tls::Identity::from_pem_files(
        other.0.join("client-admin.pem"),
        other.0.join("client-admin-key.pem"),
    )
    .unwrap();
    let cfg = tls::client_config(&foreign, &trust).unwrap();
    let refused =
        match transport::connect(c.coordinator_addr, &Role::Coordinator, DOMAIN, cfg).await {
            Err(_) => true,
            Ok(ch) => api::cluster_service_client::ClusterServiceClient::new(ch)
                .status(api::StatusRequest {})
                .await
                .is_err(),
        };
    assert!(refused, "coordinator served a client from a foreign CA");

    // A node never accepts another node's certificate as the coordinator.
    let cfg = tls::client_config(&node3, &trust).unwrap();
    let refused = match transport::connect(c.node_addrs[0], &Role::Node(1), DOMAIN, cfg).await {
        Err(_) => true,
        Ok(ch) => fragment::fragment_node_client::FragmentNodeClient::new(ch)
            .info(fragment::InfoRequest {})
            .await
            .is_err(),
    };
    assert!(
        refused,
        "node 1 served node 3 as if it were the coordinator"
    );

    // A client certificate is refused on a node port, too.
    let cfg = tls::client_config(&admin, &trust).unwrap();
    let refused = match transport::connect(c.node_addrs[1], &Role::Node(2), DOMAIN, cfg).await {
        Err(_) => true,
        Ok(ch) => fragment::fragment_node_client::FragmentNodeClient::new(ch)
            .info(fragment::InfoRequest {})
            .await
            .is_err(),
    };
    assert!(refused, "node 2 served an API client");
}

/// Every byte the coordinator relays during DKG and presigning is recorded; no share
/// scalar of this run appears in it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coordinator_never_sees_a_share() {
    let relay = std::env::temp_dir().join(format!("quorate-relay-{}.bin", std::process::id()));
    let _ = std::fs::remove_file(&relay);
    let relay_flag = relay.display().to_string();
    let flags = [
        "--pool-low",
        "4",
        "--pool-high",
        "8",
        "--presign-batch",
        "8",
        "--record-relay",
        &relay_flag,
    ];
    let mut c = TestCluster::start("relay", 3, 1, &flags);
    // Nodes that dump their presignature shares when stopped (testing only: they are
    // never on disk otherwise).
    for i in 1..=3 {
        c.restart_node(i, Some("dump-presignatures"));
    }
    c.create_key("k", api::Purpose::Sign).await;
    c.wait_pools("k", 4, Duration::from_secs(120)).await;
    if let Some(mut p) = c.coordinator.take() {
        p.terminate();
    }
    let recorded = std::fs::read(&relay).unwrap();
    assert!(
        recorded.len() > 10_000,
        "relay log unexpectedly small: {} bytes",
        recorded.len()
    );

    // Collect every secret scalar the nodes hold: key shares and presignature shares.
    let mut secrets: Vec<[u8; 32]> = Vec::new();
    for i in 1..=3u16 {
        if let Some(mut p) = c.nodes[usize::from(i) - 1].take() {
            p.terminate();
        }
        let dir = c.dir.0.join(format!("node-{i}"));
        let kek = Kek::load(&dir.join("kek"), false).unwrap();
        let store = Store::open(&dir.join("node.redb"), &kek).unwrap();
        for share in store.keys().unwrap() {
            let b = share.secret_bytes();
            secrets.push(b[b.len() - 32..].try_into().unwrap());
        }
        let mut presigs = 0;
        let dump = std::fs::read(dir.join("presignatures.dump")).unwrap();
        let mut rest = &dump[..];
        while !rest.is_empty() {
            let len = u32::from_be_bytes(rest[..4].try_into().unwrap()) as usize;
            // The encoding ends with w_j || v_j.
            let b = &rest[4..4 + len];
            secrets.push(b[b.len() - 64..b.len() - 32].try_into().unwrap());
            secrets.push(b[b.len() - 32..].try_into().unwrap());
            presigs += 1;
            rest = &rest[4 + len..];
        }
        assert!(presigs > 0, "node {i} holds no presignature shares");
    }
    assert!(secrets.len() > 3, "no presignature shares collected");
    // Index every 32-byte window of the relay log once, then look each secret up.
    let windows: std::collections::HashSet<&[u8]> = recorded.windows(32).collect();
    for s in &secrets {
        assert!(
            !windows.contains(&s[..]),
            "a share scalar appears in the bytes the coordinator relayed"
        );
    }
    // The check can fail: a public value that was relayed is found.
    let some_relayed: [u8; 32] = recorded[100..132].try_into().unwrap();
    assert!(windows.contains(&some_relayed[..]));
    let _ = std::fs::remove_file(&relay);
}

/// Two concurrent sign batches naming the same unused presignature with different
/// digests: the node releases one share and refuses the other.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_requests_cannot_use_a_presignature_twice() {
    let mut c = TestCluster::start("concurrent", 3, 1, POOL_FLAGS);
    c.create_key("k", api::Purpose::Sign).await;
    c.wait_pools("k", 4, Duration::from_secs(120)).await;
    // Acting as the coordinator (its certificate and store): presignatures to race on.
    let (named, presigs) = c.presign_as_coordinator("k", 4).await;
    let key = named.public;
    let one = quorate_crypto::params::PartyIndex::new(1).unwrap();
    let target: Vec<_> = presigs
        .iter()
        .filter(|p| p.sset.contains(one))
        .take(8)
        .collect();
    assert!(!target.is_empty());
    for p in target {
        let req = |d: u8| fragment::SignBatch {
            requests: vec![
                SignRequest {
                    key_id: key.key_id,
                    presig_id: p.id,
                    sset: p.sset.clone(),
                    digest: [d; 32],
                }
                .to_bytes(),
            ],
            signing_inputs: Vec::new(),
            evidence: Vec::new(),
        };
        let mut a = c.node_as_coordinator(1).await;
        let mut b = c.node_as_coordinator(1).await;
        let (ra, rb) = tokio::join!(a.sign(req(1)), b.sign(req(2)));
        let shares = [ra.unwrap().into_inner(), rb.unwrap().into_inner()]
            .iter()
            .filter(|r| {
                matches!(
                    r.results[0].result,
                    Some(fragment::sign_result::Result::Share(_))
                )
            })
            .count();
        assert_eq!(
            shares, 1,
            "a presignature released shares for two different digests"
        );
    }
}

/// Bad input gets a clear status naming what is wrong, and the cluster keeps working.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_a_clear_status_and_loses_nothing() {
    let c = TestCluster::start("badinput", 3, 1, POOL_FLAGS);
    c.create_key("k", api::Purpose::Sign).await;
    c.keys()
        .await
        .create_key(api::CreateKeyRequest {
            name: "d".into(),
            purpose: api::Purpose::Derive as i32,
            token_rules: None,
            profile: api::KeyProfile::Unspecified as i32,
        })
        .await
        .unwrap();
    c.wait_pools("k", 4, Duration::from_secs(120)).await;
    let mut keys = c.keys().await;
    fn expect<T>(r: Result<tonic::Response<T>, tonic::Status>, code: tonic::Code, words: &str) {
        let s = r.err().expect("bad input was accepted");
        assert_eq!(s.code(), code, "{s:?}");
        assert!(
            s.message().contains(words),
            "status {:?} does not mention {words:?}",
            s.message()
        );
    }
    // Unknown key.
    expect(
        keys.sign(api::SignRequest {
            name: "nope".into(),
            input: Some(api::sign_request::Input::Message(b"m".to_vec())),
            format: api::SignatureFormat::Raw as i32,
        })
        .await,
        tonic::Code::NotFound,
        "no key named nope",
    );
    // Wrong digest length.
    expect(
        keys.sign(api::SignRequest {
            name: "k".into(),
            input: Some(api::sign_request::Input::Digest(vec![0; 31])),
            format: api::SignatureFormat::Raw as i32,
        })
        .await,
        tonic::Code::InvalidArgument,
        "digest must be 32 bytes",
    );
    // Malformed point (not on the curve / wrong encoding).
    expect(
        keys.derive(api::DeriveRequest {
            name: "d".into(),
            context: b"ctx".to_vec(),
            requester_public: vec![0x05; 33],
        })
        .await,
        tonic::Code::InvalidArgument,
        "requester_public",
    );
    // Oversize context.
    let a = quorate_crypto::Point::GENERATOR.to_bytes().to_vec();
    expect(
        keys.derive(api::DeriveRequest {
            name: "d".into(),
            context: vec![b'x'; 5000],
            requester_public: a.clone(),
        })
        .await,
        tonic::Code::InvalidArgument,
        "context",
    );
    // Malformed ciphertext.
    expect(
        keys.decrypt(api::DecryptRequest {
            name: "d".into(),
            ciphertext: vec![1, 2, 3],
            requester_public: a,
        })
        .await,
        tonic::Code::InvalidArgument,
        "ciphertext",
    );
    // Oversize message (beyond the transport limit).
    let big = keys
        .sign(api::SignRequest {
            name: "k".into(),
            input: Some(api::sign_request::Input::Message(vec![0; 5 * 1024 * 1024])),
            format: api::SignatureFormat::Raw as i32,
        })
        .await;
    let s = big.expect_err("oversize message accepted");
    assert!(
        s.message().contains("too large") || s.message().contains("length"),
        "{s:?}"
    );
    // A bad key name.
    expect(
        keys.create_key(api::CreateKeyRequest {
            name: "bad name!".into(),
            purpose: api::Purpose::Sign as i32,
            token_rules: None,
            profile: api::KeyProfile::Unspecified as i32,
        })
        .await,
        tonic::Code::InvalidArgument,
        "key name",
    );
    // Nothing was lost: the cluster still signs.
    assert!(c.sign("k", b"still fine").await.is_ok());
}
