//! Key lifecycle without reconstruction (DESIGN.md §4.3) on real processes over real
//! post-quantum mutual TLS: proactive refresh, repair of a node that lost its disk, and
//! a coordinator that dies in the middle of activating renewed shares.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::time::{Duration, Instant};

use quorate_coordinator::store::KeyStore as _;
use quorate_proto::api;
use quorate_proto::fragment;
use quorate_tests::load::{Seen, SignLoad};
use quorate_tests::{DOMAIN, POOL_FLAGS, TestCluster, binary, sign_batch, verify_es256 as verify};

/// Each node's epoch of `key_id` (`None`: no active share).
async fn epochs(c: &TestCluster, key_id: &str) -> Vec<Option<u32>> {
    let mut out = Vec::new();
    for i in 1..=c.n {
        if c.nodes[usize::from(i) - 1].is_none() {
            out.push(None);
            continue;
        }
        let inv = c
            .node_as_coordinator(i)
            .await
            .inventory(fragment::InventoryRequest {})
            .await
            .unwrap()
            .into_inner();
        out.push(
            inv.keys
                .iter()
                .find(|k| hex::encode(&k.key_id) == key_id && k.active)
                .map(|k| k.epoch),
        );
    }
    out
}

/// Signs until success or `limit`; returns the signature and how long it took.
async fn sign_within(c: &TestCluster, name: &str, msg: &[u8], limit: Duration) -> Vec<u8> {
    let start = Instant::now();
    loop {
        match c.sign(name, msg).await {
            Ok(sig) => return sig,
            Err(e) if start.elapsed() < limit => {
                eprintln!("signing not yet possible: {e:?}");
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            Err(e) => panic!("no signature within {limit:?}: {e:?}"),
        }
    }
}

/// The coordinator's current key versions.
async fn list_keys(c: &TestCluster) -> Vec<api::KeyInfo> {
    c.keys()
        .await
        .list_keys(api::ListKeysRequest {})
        .await
        .unwrap()
        .into_inner()
        .keys
}

/// Starts node `i` (the next index) with a certificate from the cluster CA.
fn add_node(c: &mut TestCluster, i: u16) {
    assert_eq!(usize::from(i), c.node_addrs.len() + 1);
    let dir = c.dir.0.clone();
    let ca = quorate_proto::pki::ClusterCa::from_pem(
        &std::fs::read_to_string(dir.join("ca.pem")).unwrap(),
        &std::fs::read_to_string(dir.join("ca-key.pem")).unwrap(),
        DOMAIN,
    )
    .unwrap();
    let issued = ca.issue(&quorate_proto::tls::Role::Node(i)).unwrap();
    std::fs::write(dir.join(format!("node-{i}.pem")), &issued.cert_pem).unwrap();
    std::fs::write(
        dir.join(format!("node-{i}-key.pem")),
        issued.key_pem.as_bytes(),
    )
    .unwrap();
    let p = c.spawn_node(i, "127.0.0.1:0".parse().unwrap(), None);
    c.node_addrs.push(p.addr);
    c.nodes.push(Some(p));
    c.n = i;
}

/// Runs the coordinator as configured and expects it to refuse to start; returns its
/// error output.
fn refused(c: &TestCluster) -> String {
    let log = c.dir.0.join("refused.log");
    let mut child = c
        .coordinator_command()
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if start.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "the coordinator started instead of refusing: {}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let err = std::fs::read_to_string(&log).unwrap();
    assert!(!status.success(), "{err}");
    err
}

/// The `quorate` CLI as the cluster's admin.
fn cli(c: &TestCluster, args: &[&str]) -> std::process::Output {
    let d = &c.dir.0;
    let out = std::process::Command::new(binary("quorate"))
        .args(args)
        .env("QUORATE_ADDR", c.coordinator_addr.to_string())
        .env("QUORATE_CACERT", d.join("ca.pem"))
        .env("QUORATE_CERT", d.join("client-admin.pem"))
        .env("QUORATE_KEY", d.join("client-admin-key.pem"))
        .env("QUORATE_DOMAIN", DOMAIN)
        .output()
        .unwrap();
    eprintln!(
        "quorate {}: {}\n{}{}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A refresh gives every node a new share of the same key (same key id, public key and
/// JWKS entry, next epoch), and burns every presignature made from the old shares: a
/// presignature share that outlived a refresh would let an adversary that corrupts
/// nodes before and after it combine what it saw.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refresh_keeps_the_key_and_burns_presignatures_of_the_old_shares() {
    let mut c = TestCluster::start("refresh", 3, 1, POOL_FLAGS);
    let created = c.create_key("k", api::Purpose::Sign).await;
    assert_eq!(created.epoch, 0);
    let before = sign_within(&c, "k", b"before", Duration::from_secs(60)).await;
    verify(&created.public_key, b"before", &before);

    // In the coordinator's place: presignatures whose public halves we hold.
    let cluster = c.coordinator_in_process().await;
    let named = cluster.named("k").unwrap();
    for (mset, sset) in cluster.sets() {
        cluster
            .presign(&named.public, &mset, &sset, 2)
            .await
            .unwrap();
    }
    let old = cluster.pooled(named.public.key_id).unwrap();
    assert_eq!(old.len(), 6);
    // Before the refresh, a node signs with one of them (so the refusal below is the
    // refresh's doing).
    let used = &old[0];
    let j = used.sset.members()[0].get();
    let reply = c
        .node_as_coordinator(j)
        .await
        .sign(sign_batch(&named.public, used, [1; 32], None))
        .await
        .unwrap()
        .into_inner();
    assert!(matches!(
        reply.results[0].result,
        Some(fragment::sign_result::Result::Share(_))
    ));

    let refreshed = cluster.refresh_key("k").await.unwrap();
    assert_eq!(refreshed.public.epoch, 1);
    assert_eq!(refreshed.public.key_id, named.public.key_id);
    assert_eq!(refreshed.public.public_key(), named.public.public_key());
    assert!(
        cluster.pooled(named.public.key_id).unwrap().is_empty(),
        "the coordinator must drop the pools of the old shares"
    );
    assert_eq!(
        epochs(&c, &created.key_id).await,
        vec![Some(1); 3],
        "every node holds the new epoch"
    );
    // Every old presignature is refused by every node of its set, fresh or repeated.
    for p in &old[1..] {
        for s in p.sset.members() {
            let reply = c
                .node_as_coordinator(s.get())
                .await
                .sign(sign_batch(&named.public, p, [2; 32], None))
                .await
                .unwrap()
                .into_inner();
            match &reply.results[0].result {
                Some(fragment::sign_result::Result::Refused(e)) => {
                    assert!(e.contains("unknown presignature"), "{e}");
                }
                other => panic!("node {s} signed with a pre-refresh presignature: {other:?}"),
            }
        }
    }
    drop(cluster);

    // The coordinator process again: status shows the epoch, signing goes on, and the
    // signature verifies under the public key from before the refresh.
    c.start_coordinator();
    let after = sign_within(&c, "k", b"after", Duration::from_secs(60)).await;
    verify(&created.public_key, b"after", &after);
    let status = cli(&c, &["status"]);
    assert!(status.status.success());
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(text.contains("epoch 1"), "{text}");
    assert!(text.contains("shares renewed"), "{text}");
    // And the CLI refreshes on demand.
    let out = cli(&c, &["key", "refresh", "k"]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("epoch 2"));
    assert_eq!(epochs(&c, &created.key_id).await, vec![Some(2); 3]);
    let again = sign_within(&c, "k", b"again", Duration::from_secs(60)).await;
    verify(&created.public_key, b"again", &again);
}

/// A node whose disk is gone comes back empty; `quorate admin repair-node` reshares
/// every key from the other nodes, and the repaired node then signs — in the only
/// signing set left once another node is down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_lost_its_disk_is_repaired_by_resharing_and_signs_again() {
    let mut c = TestCluster::start("repair", 3, 1, POOL_FLAGS);
    let k = c.create_key("k", api::Purpose::Sign).await;
    let d = c.create_key("d", api::Purpose::Derive).await;
    c.wait_pools("k", 4, Duration::from_secs(120)).await;

    c.kill_node(2);
    std::fs::remove_dir_all(c.dir.0.join("node-2")).unwrap();
    c.restart_node(2, None);
    assert_eq!(epochs(&c, &k.key_id).await, vec![Some(0), None, Some(0)]);

    let out = cli(&c, &["admin", "repair-node", "2"]);
    assert!(out.status.success(), "repair failed");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("node 2 repaired"), "{text}");
    assert_eq!(epochs(&c, &k.key_id).await, vec![Some(1); 3]);
    assert_eq!(epochs(&c, &d.key_id).await, vec![Some(1); 3]);

    // Pools of the new epoch fill (presigning needs all three nodes at (3,1)); then
    // node 1 goes down and only the set {2, 3} can sign.
    c.wait_pools("k", 4, Duration::from_secs(120)).await;
    c.kill_node(1);
    for m in [&b"one"[..], b"two", b"three"] {
        let sig = sign_within(&c, "k", m, Duration::from_secs(30)).await;
        verify(&k.public_key, m, &sig);
    }
    // The repaired node's share is of the same key: list_keys reports it unchanged.
    let keys = list_keys(&c).await;
    let now_k = keys.iter().find(|x| x.name == "k").unwrap();
    assert_eq!(now_k.public_key, k.public_key);
    assert_eq!(now_k.key_id, k.key_id);
    assert!(now_k.renewed_at > 0);
}

/// A coordinator killed after recording a renewal, or after only one node activated it,
/// finishes the activation when it starts again: the nodes never stay on two epochs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coordinator_killed_during_activation_finishes_it_on_restart() {
    for fail_point in ["renewal-after-record", "renewal-after-one-node"] {
        let mut flags: Vec<&str> = POOL_FLAGS.to_vec();
        flags.extend(["--fail-point", fail_point]);
        let mut c = TestCluster::start("renewal-crash", 3, 1, &flags);
        let k = c.create_key("k", api::Purpose::Sign).await;
        let err = c
            .keys()
            .await
            .refresh_key(api::RefreshKeyRequest { name: "k".into() })
            .await
            .unwrap_err();
        eprintln!("{fail_point}: refresh answered {err:?}");
        let exited = c
            .coordinator
            .as_mut()
            .unwrap()
            .wait_exit(Duration::from_secs(10));
        assert!(
            exited.is_some(),
            "{fail_point}: the coordinator did not exit"
        );
        c.coordinator = None;
        let mid = epochs(&c, &k.key_id).await;
        let expect_mid = if fail_point == "renewal-after-record" {
            vec![Some(0); 3]
        } else {
            vec![Some(1), Some(0), Some(0)]
        };
        assert_eq!(mid, expect_mid, "{fail_point}");

        c.coordinator_flags = POOL_FLAGS.iter().map(|s| s.to_string()).collect();
        c.start_coordinator();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let st = c
                .cluster()
                .await
                .status(api::StatusRequest {})
                .await
                .unwrap()
                .into_inner();
            let epoch = st.keys.iter().find(|x| x.name == "k").map(|x| x.epoch);
            if st.pending_activations == 0 && epoch == Some(1) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{fail_point}: activation not finished: {st:?}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        assert_eq!(
            epochs(&c, &k.key_id).await,
            vec![Some(1); 3],
            "{fail_point}"
        );
        let sig = sign_within(&c, "k", b"m", Duration::from_secs(60)).await;
        verify(&k.public_key, b"m", &sig);
    }
}

/// `quorate admin backup-node` / `restore-node`: a node's sealed shares and
/// configuration, restored into a new data directory with the KEK kept apart, rejoin
/// and sign. A running node, a wrong KEK and a non-empty target are refused by name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_restored_from_backup_rejoins_and_signs() {
    use std::os::unix::fs::PermissionsExt as _;
    let mut c = TestCluster::start("backup", 3, 1, POOL_FLAGS);
    let k = c.create_key("k", api::Purpose::Sign).await;
    c.wait_pools("k", 4, Duration::from_secs(120)).await;
    let d = c.dir.0.clone();
    let node2 = d.join("node-2");
    let backup = d.join("node-2.backup.json");
    let ceiling = c.ceiling_path(2);
    let args = |extra: &[&str]| {
        let mut a = vec![
            "admin".to_owned(),
            "backup-node".to_owned(),
            "--data-dir".to_owned(),
            node2.display().to_string(),
            "--ceiling".to_owned(),
            ceiling.display().to_string(),
            "--out".to_owned(),
            backup.display().to_string(),
        ];
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    };
    let run =
        |c: &TestCluster, a: &[String]| cli(c, &a.iter().map(String::as_str).collect::<Vec<_>>());

    // While the node runs, its store is locked.
    let out = run(&c, &args(&[]));
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("stop the node first"),
        "{out:?}"
    );
    assert!(!backup.exists());

    c.nodes[1].take().unwrap().terminate();
    let out = run(&c, &args(&[]));
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("backed up 1 key shares"));
    let mode = std::fs::metadata(&backup).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let text = std::fs::read_to_string(&backup).unwrap();
    assert!(!text.contains("presig"), "a backup holds no presignatures");

    // The disk is lost; the KEK was kept elsewhere.
    let kek = d.join("node-2-kek.kept");
    std::fs::copy(node2.join("kek"), &kek).unwrap();
    std::fs::remove_dir_all(&node2).unwrap();

    // A wrong KEK restores nothing.
    let wrong = d.join("wrong-kek");
    std::fs::write(&wrong, [7u8; 32]).unwrap();
    std::fs::set_permissions(&wrong, std::fs::Permissions::from_mode(0o600)).unwrap();
    let elsewhere = d.join("elsewhere");
    let out = cli(
        &c,
        &[
            "admin",
            "restore-node",
            "--from",
            &backup.display().to_string(),
            "--data-dir",
            &elsewhere.display().to_string(),
            "--kek-file",
            &wrong.display().to_string(),
        ],
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("key-encryption key"), "{err}");

    std::fs::create_dir_all(&node2).unwrap();
    std::fs::copy(&kek, node2.join("kek")).unwrap();
    std::fs::set_permissions(node2.join("kek"), std::fs::Permissions::from_mode(0o600)).unwrap();
    let restore = [
        "admin",
        "restore-node",
        "--from",
        &backup.display().to_string(),
        "--data-dir",
        &node2.display().to_string(),
    ];
    let out = cli(&c, &restore);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("restored 1 key shares"));
    // Twice: the data directory now holds shares.
    let out = cli(&c, &restore);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("empty"));

    let addr = c.node_addrs[1];
    c.nodes[1] = Some(c.spawn_node(2, addr, None));
    assert_eq!(epochs(&c, &k.key_id).await, vec![Some(0); 3]);
    // Pools refill (presigning needs all three nodes); then only {2, 3} can sign.
    tokio::time::sleep(Duration::from_secs(1)).await;
    c.wait_pools("k", 4, Duration::from_secs(120)).await;
    c.kill_node(1);
    let sig = sign_within(&c, "k", b"restored", Duration::from_secs(30)).await;
    verify(&k.public_key, b"restored", &sig);
}

/// Refresh and repair while two clients sign: every request succeeds or fails with a
/// retryable status, none hangs, and the figures (signatures, failures, the longest
/// stretch without a signature) are printed for BENCHMARKS.md.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refresh_and_repair_under_load_keep_signing() {
    let mut c = TestCluster::start(
        "lifecycle-load",
        3,
        1,
        &[
            "--pool-low",
            "16",
            "--pool-high",
            "48",
            "--presign-batch",
            "16",
        ],
    );
    let k = c.create_key("k", api::Purpose::Sign).await;
    c.wait_pools("k", 32, Duration::from_secs(120)).await;

    // Refresh under load.
    let load = SignLoad::start(&c, "k", &k.public_key, 2, Duration::ZERO).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let t = Instant::now();
    let refreshed = c
        .keys()
        .await
        .refresh_key(api::RefreshKeyRequest { name: "k".into() })
        .await
        .unwrap()
        .into_inner();
    let took = t.elapsed();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let seen = load.finish().await;
    assert_eq!(refreshed.epoch, 1);
    eprintln!(
        "refresh under load: refresh took {took:?}; over {:?}: {} signatures, {} failed (all retryable), longest stretch without a signature {:?}; failures: {:?}",
        seen.ran,
        seen.ok,
        seen.failed.len(),
        seen.longest_gap,
        seen.failed.iter().take(3).collect::<Vec<_>>()
    );
    signing_went_on(&seen);

    // Repair of a wiped node under load.
    c.kill_node(2);
    std::fs::remove_dir_all(c.dir.0.join("node-2")).unwrap();
    c.restart_node(2, None);
    let load = SignLoad::start(&c, "k", &k.public_key, 2, Duration::ZERO).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let t = Instant::now();
    let r = c
        .cluster()
        .await
        .repair_node(api::RepairNodeRequest { index: 2 })
        .await
        .unwrap()
        .into_inner();
    let took = t.elapsed();
    assert_eq!(r.keys.iter().find(|x| x.name == "k").unwrap().epoch, 2);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let seen = load.finish().await;
    eprintln!(
        "repair under load: repair took {took:?}; over {:?}: {} signatures, {} failed (all retryable), longest stretch without a signature {:?}; failures: {:?}",
        seen.ran,
        seen.ok,
        seen.failed.len(),
        seen.longest_gap,
        seen.failed.iter().take(3).collect::<Vec<_>>()
    );
    signing_went_on(&seen);
    assert_eq!(epochs(&c, &k.key_id).await, vec![Some(2); 3]);
}

/// Every failure had a retryable status, no request hung, and signatures were made.
fn signing_went_on(seen: &Seen) {
    assert!(
        seen.fatal().is_empty(),
        "not retryable failures: {:?}",
        seen.fatal()
    );
    assert_eq!(seen.hung, 0, "requests hung");
    assert!(seen.ok > 0);
}

/// `--refresh-interval-secs`: the coordinator refreshes every key once its shares are
/// that old, without being asked; the lifecycle metrics count it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_are_refreshed_on_schedule_and_counted() {
    let metrics_port = quorate_tests::free_port();
    let metrics = format!("127.0.0.1:{metrics_port}");
    let mut flags: Vec<&str> = POOL_FLAGS.to_vec();
    flags.extend(["--refresh-interval-secs", "2", "--metrics-listen", &metrics]);
    let c = TestCluster::start("scheduled-refresh", 3, 1, &flags);
    let k = c.create_key("k", api::Purpose::Sign).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    let epoch = loop {
        let e = epochs(&c, &k.key_id).await;
        if e.iter().all(|x| x.is_some_and(|x| x >= 2)) {
            break e;
        }
        assert!(Instant::now() < deadline, "no scheduled refresh: {e:?}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    eprintln!("epochs after the schedule ran: {epoch:?}");
    let sig = sign_within(&c, "k", b"scheduled", Duration::from_secs(60)).await;
    verify(&k.public_key, b"scheduled", &sig);

    use std::io::{Read as _, Write as _};
    let mut s = std::net::TcpStream::connect(&metrics).unwrap();
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).unwrap();
    let renewals: u64 = body
        .lines()
        .find_map(|l| l.strip_prefix("quorate_coordinator_key_renewals_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no renewal counter in {body}"));
    assert!(renewals >= 2, "{body}");
    assert!(
        body.contains("quorate_coordinator_key_epoch{key=\"k\"}"),
        "{body}"
    );
    assert!(
        body.contains("quorate_coordinator_pending_activations 0"),
        "{body}"
    );
}

/// Growing a cluster from (3,1) to (5,2) without reconstruction: two new nodes start
/// empty, the coordinator restarted with five `--node`s, `--threshold 2` and
/// `--reshare` reshares every key (old shares overwritten, same public key), and the
/// key then signs with any three nodes — here with two of the old ones down. Without
/// `--reshare` the coordinator refuses to start and names the keys.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_grows_from_3_1_to_5_2_by_resharing() {
    let mut c = TestCluster::start("grow", 3, 1, POOL_FLAGS);
    let k = c.create_key("k", api::Purpose::Sign).await;
    let d = c.create_key("d", api::Purpose::Derive).await;
    c.wait_pools("k", 4, Duration::from_secs(120)).await;
    if let Some(mut p) = c.coordinator.take() {
        p.terminate();
    }
    // Two new nodes, with certificates from the cluster CA.
    add_node(&mut c, 4);
    add_node(&mut c, 5);
    c.t = 2;

    // Without --reshare: refused, naming the keys.
    let err = refused(&c);
    assert!(
        err.contains("--reshare") && err.contains("k (3,1)"),
        "{err}"
    );

    c.coordinator_flags.push("--reshare".into());
    c.start_coordinator();
    let keys = list_keys(&c).await;
    for (before, name) in [(&k, "k"), (&d, "d")] {
        let now = keys.iter().find(|x| x.name == name).unwrap();
        assert_eq!((now.n, now.t, now.epoch), (5, 2, 1), "{name}");
        assert_eq!(now.public_key, before.public_key, "{name}");
        assert_eq!(now.key_id, before.key_id, "{name}");
        assert_eq!(epochs(&c, &before.key_id).await, vec![Some(1); 5], "{name}");
    }
    // Pools of the new parameters fill (presigning needs all five nodes at t = 2);
    // then two nodes go down and the set {3, 4, 5} signs.
    c.wait_pools("k", 4, Duration::from_secs(120)).await;
    c.kill_node(1);
    c.kill_node(2);
    for m in [&b"grown"[..], b"again"] {
        let sig = sign_within(&c, "k", m, Duration::from_secs(30)).await;
        verify(&k.public_key, m, &sig);
    }
}

/// Node 2 is replaced by a new node 4: the coordinator, started with `--node 1,3,4
/// --reshare --retire 2=ADDR`, reshares every key from nodes 1 and 3 onto {1, 3, 4}
/// (same public key and key id, next epoch), and node 2 destroys its share only on
/// evidence it checks itself: every new holder's signed confirmation. Forged or
/// partial evidence (what a compromised coordinator could send) leaves the share in
/// place; a node that was down when the key moved is retired at the next start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_2_is_replaced_by_node_4_and_destroys_its_share_on_checked_evidence() {
    let mut c = TestCluster::start("replace", 3, 1, POOL_FLAGS);
    let k = c.create_key("k", api::Purpose::Sign).await;
    let d = c.create_key("d", api::Purpose::Derive).await;
    c.wait_pools("k", 2, Duration::from_secs(120)).await;
    if let Some(mut p) = c.coordinator.take() {
        p.terminate();
    }
    add_node(&mut c, 4);
    c.left = vec![2];
    // Keys held by node 2, which is not in --node: refused without --reshare, and
    // with it, refused until node 2 is accounted for.
    let err = refused(&c);
    assert!(
        err.contains("--reshare") && err.contains("k (3,1)"),
        "{err}"
    );
    c.coordinator_flags.push("--reshare".into());
    let err = refused(&c);
    assert!(
        err.contains("held by node 2") && err.contains("--retire 2=HOST:PORT"),
        "{err}"
    );
    // Node 2 is down while the keys move: they move anyway (nodes 1 and 3 deal), and
    // its retirement waits.
    c.kill_node(2);
    let addr2 = c.node_addrs[1];
    c.coordinator_flags.push(format!("--retire=2={addr2}"));
    let restart = Instant::now();
    c.start_coordinator();
    let serving = restart.elapsed();
    let keys = list_keys(&c).await;
    for (before, name) in [(&k, "k"), (&d, "d")] {
        let now = keys.iter().find(|x| x.name == name).unwrap();
        assert_eq!((now.n, now.t, now.epoch), (3, 1, 1), "{name}");
        assert_eq!(now.holders, vec![1, 3, 4], "{name}");
        assert_eq!(now.public_key, before.public_key, "{name}");
        assert_eq!(now.key_id, before.key_id, "{name}");
    }
    let sig = sign_within(&c, "k", b"replaced", Duration::from_secs(60)).await;
    verify(&k.public_key, b"replaced", &sig);
    eprintln!(
        "replacing node 2 by node 4 (2 keys): coordinator serving after {:.2} s, first signature after {:.2} s",
        serving.as_secs_f64(),
        restart.elapsed().as_secs_f64()
    );
    if let Some(mut p) = c.coordinator.take() {
        p.terminate();
    }

    // Node 2 comes back with its old shares. The evidence the coordinator keeps for it:
    let store = quorate_coordinator::store::Store::open(
        &c.dir.0.join("coordinator").join("coordinator.redb"),
    )
    .unwrap();
    let pending = store.retirements().unwrap();
    drop(store);
    assert_eq!(pending.len(), 2, "one retirement per key for node 2");
    assert!(pending.iter().all(|(_, n, _)| n.get() == 2));
    c.restart_node(2, None);
    assert_eq!(
        epochs(&c, &k.key_id).await,
        vec![Some(1), Some(0), Some(1), Some(1)]
    );
    let mut node2 = c.node_as_coordinator(2).await;
    let (_, _, evidence) = pending
        .iter()
        .find(|(id, _, _)| id.to_string() == k.key_id)
        .unwrap();
    let genuine: fragment::RetireKeyRequest = prost::Message::decode(evidence.as_slice()).unwrap();
    // Partial evidence: one new holder's confirmation missing.
    let mut partial = genuine.clone();
    partial.confirms.pop();
    // Forged: one confirmation's signature altered.
    let mut forged = genuine.clone();
    let last = forged.confirms[0].len() - 1;
    forged.confirms[0][last] ^= 1;
    // Another run's key data: a key that did not move.
    let mut other = genuine.clone();
    other.start.as_mut().unwrap().key_id = hex::decode(&d.key_id).unwrap();
    for (what, req) in [
        ("partial", partial),
        ("forged", forged),
        ("other key", other),
    ] {
        let e = node2.retire_key(req).await.unwrap_err();
        eprintln!("{what}: {e:?}");
        assert!(
            matches!(
                e.code(),
                tonic::Code::FailedPrecondition | tonic::Code::InvalidArgument
            ),
            "{what}: {e:?}"
        );
    }
    assert_eq!(
        epochs(&c, &k.key_id).await[1],
        Some(0),
        "node 2 kept its share"
    );
    // A new holder is never told to drop its share by this evidence.
    let e = c
        .node_as_coordinator(1)
        .await
        .retire_key(genuine.clone())
        .await
        .unwrap_err();
    assert!(e.message().contains("one of the new holders"), "{e:?}");

    // The next start retires node 2 with the genuine evidence.
    c.start_coordinator();
    for before in [&k, &d] {
        assert_eq!(
            epochs(&c, &before.key_id).await,
            vec![Some(1), None, Some(1), Some(1)]
        );
    }
    let store_left = {
        if let Some(mut p) = c.coordinator.take() {
            p.terminate();
        }
        let store = quorate_coordinator::store::Store::open(
            &c.dir.0.join("coordinator").join("coordinator.redb"),
        )
        .unwrap();
        store.retirements().unwrap().len()
    };
    assert_eq!(store_left, 0);
    // Idempotent: node 2 holds nothing of the key now.
    let again = node2.retire_key(genuine).await.unwrap().into_inner();
    assert!(!again.destroyed);
    // The new holders sign without node 1 (once pools are made: at (3,1) presigning
    // needs all three).
    c.start_coordinator();
    c.wait_pools("k", 2, Duration::from_secs(120)).await;
    c.kill_node(1);
    let sig = sign_within(&c, "k", b"without node 1", Duration::from_secs(60)).await;
    verify(&k.public_key, b"without node 1", &sig);
}

/// A cluster shrinks from (5,2) to (3,1) on nodes {1, 3, 4}: node 2 leaves and
/// destroys its share, node 5 is gone for good (`--retire 5`); the key keeps its
/// public key and signs with the new threshold.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_shrinks_from_5_2_to_3_1_on_other_nodes() {
    let mut c = TestCluster::start("shrink", 5, 2, POOL_FLAGS);
    let k = c.create_key("k", api::Purpose::Sign).await;
    if let Some(mut p) = c.coordinator.take() {
        p.terminate();
    }
    c.kill_node(5);
    c.left = vec![2, 5];
    c.t = 1;
    let addr2 = c.node_addrs[1];
    c.coordinator_flags.extend([
        "--reshare".into(),
        format!("--retire=2={addr2}"),
        "--retire=5".into(),
    ]);
    c.start_coordinator();
    let now = list_keys(&c)
        .await
        .into_iter()
        .find(|x| x.name == "k")
        .unwrap();
    assert_eq!(
        (now.n, now.t, now.epoch, now.holders.clone()),
        (3, 1, 1, vec![1, 3, 4])
    );
    assert_eq!(now.public_key, k.public_key);
    assert_eq!(
        epochs(&c, &k.key_id).await,
        vec![Some(1), None, Some(1), Some(1), None]
    );
    let out = cli(&c, &["status"]);
    let status = String::from_utf8_lossy(&out.stdout);
    assert!(status.contains("(3,1) on nodes 1,3,4"), "{status}");
    c.wait_pools("k", 2, Duration::from_secs(120)).await;
    c.kill_node(3);
    let sig = sign_within(&c, "k", b"shrunk", Duration::from_secs(60)).await;
    verify(&k.public_key, b"shrunk", &sig);
}
