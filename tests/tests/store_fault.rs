//! A node whose disk fills up (issue 14 item 5), on real processes over real
//! post-quantum mutual TLS and a real full filesystem: node 3's data directory is a
//! small tmpfs, which the test fills with a filler file while clients sign. The node's
//! store fails to write, the node reports it (`InventoryReply.store_error`, and
//! `ClusterService.Status` shows it unhealthy), the coordinator routes signing around it;
//! once the filler is deleted the node's store recovers by itself — same process, same
//! instance, no restart — and the node signs again.
//!
//! ```text
//! cargo build --release --workspace --all-targets
//! cargo test --release -p quorate-tests --test store_fault -- --nocapture
//! ```
//!
//! It needs root (to mount the tmpfs); elsewhere it prints why and passes as skipped,
//! unless `QUORATE_REQUIRE_NETNS=1` (set by `.ci/run`) makes that a failure. It asserts
//! correctness only; the figures (failed requests, the longest time without a
//! signature, seconds to recovery) are printed.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::time::{Duration, Instant};

use quorate_proto::api;
use quorate_proto::fragment;
use quorate_tests::load::SignLoad;
use quorate_tests::tmpfs::Tmpfs;
use quorate_tests::{TestCluster, verify_es256 as verify};

/// The node whose disk fills up.
const FULL: u16 = 3;

/// The tmpfs under node 3's store: room for its store, not much more.
const TMPFS_BYTES: u64 = 8 << 20;

/// How long the node may take to report healthy after the filler is deleted (its store
/// probes every second; the bound only keeps a broken recovery from hanging the test).
const RECOVERY_LIMIT: Duration = Duration::from_secs(20);

/// A signer's pause after each request: about 10 signatures a second from two
/// signers. While node 3 is out, nothing presigns (at (3,1) presigning needs all three
/// nodes), so the pool of the set {1,2} must carry the signing until it is back.
const PACE: Duration = Duration::from_millis(200);

/// Pools deep enough to carry the fault (see [`PACE`]).
const POOLS: &[&str] = &[
    "--pool-low",
    "32",
    "--pool-high",
    "96",
    "--presign-batch",
    "32",
];

/// Node `i`'s inventory, asked directly as the coordinator.
async fn inventory(c: &TestCluster, i: u16) -> fragment::InventoryReply {
    c.node_as_coordinator(i)
        .await
        .inventory(fragment::InventoryRequest {})
        .await
        .unwrap()
        .into_inner()
}

/// Node `i` as `ClusterService.Status` shows it.
async fn status_of(c: &TestCluster, i: u16) -> api::NodeStatus {
    c.cluster()
        .await
        .status(api::StatusRequest {})
        .await
        .unwrap()
        .into_inner()
        .nodes
        .into_iter()
        .find(|n| n.index == u32::from(i))
        .unwrap()
}

/// Polls until `Status` shows node `i` healthy (`true`) or not, or `limit` passes;
/// what it showed last and when it got there.
async fn wait_health(
    c: &TestCluster,
    i: u16,
    healthy: bool,
    limit: Duration,
) -> (api::NodeStatus, Option<Instant>) {
    let deadline = Instant::now() + limit;
    loop {
        let st = status_of(c, i).await;
        if st.healthy == healthy {
            return (st, Some(Instant::now()));
        }
        if Instant::now() > deadline {
            return (st, None);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Node 3's disk fills up under load: every request still succeeds (the coordinator
/// leaves node 3 out of new work once it reports its store failing), `Status` shows the
/// node unhealthy with the store's reason; once the filler is deleted the node reports
/// healthy again by itself — the same process (instance id and pid unchanged) — and
/// then signs: with node 1 down, only the set {2,3} can, and it does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_whose_disk_filled_up_recovers_without_a_restart() {
    let test = "a_node_whose_disk_filled_up_recovers_without_a_restart";
    let mut c = TestCluster::start("store-fault", 3, 1, POOLS);
    // Node 3's data directory onto a small tmpfs: stop it, mount, put its files
    // (its KEK and its store) back, start it again — before any key exists.
    c.kill_node(FULL);
    let data = c.dir.0.join(format!("node-{FULL}"));
    let saved = c.dir.0.join(format!("node-{FULL}-saved"));
    std::fs::rename(&data, &saved).unwrap();
    let Some(disk) = Tmpfs::mount_or_skip(test, &data, TMPFS_BYTES) else {
        return;
    };
    for f in std::fs::read_dir(&saved).unwrap() {
        let f = f.unwrap();
        std::fs::copy(f.path(), data.join(f.file_name())).unwrap();
    }
    c.restart_node(FULL, None);

    let k = c.create_key("k", api::Purpose::Sign).await;
    let pools = c.wait_pools("k", 64, Duration::from_secs(180)).await;
    eprintln!("store fault: pools before the fault {pools:?}");
    let before = inventory(&c, FULL).await;
    assert!(before.store_error.is_empty(), "{before:?}");
    let pid = c.nodes[usize::from(FULL) - 1].as_ref().unwrap().child.id();

    let load = SignLoad::start(&c, "k", &k.public_key, 2, PACE).await;
    tokio::time::sleep(Duration::from_secs(2)).await;

    // The disk fills up.
    let filled = disk.fill("filler");
    let t_full = Instant::now();
    eprintln!(
        "store fault: wrote {filled} bytes of filler; {:?} bytes left on node {FULL}'s tmpfs",
        disk.free_bytes()
    );
    // Node 3 signs (and so writes its release log) only while it is in a signing set;
    // its next write fails.
    let (st, unhealthy_at) = wait_health(&c, FULL, false, Duration::from_secs(20)).await;
    let unhealthy_at =
        unhealthy_at.unwrap_or_else(|| panic!("node {FULL} never reported its full disk: {st:?}"));
    assert!(st.error.contains("store failing"), "{st:?}");
    let inv = inventory(&c, FULL).await;
    assert!(!inv.store_error.is_empty(), "{inv:?}");
    eprintln!(
        "store fault: node {FULL} reported unhealthy {:.2} s after the disk filled: Status error {:?}",
        (unhealthy_at - t_full).as_secs_f64(),
        st.error
    );
    // Signing goes on without it for a while; the node stays unhealthy while full.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let st = status_of(&c, FULL).await;
    assert!(
        !st.healthy,
        "node {FULL} reports healthy while its disk is still full: {st:?}"
    );

    // Room again: no restart, only the filler goes.
    std::fs::remove_file(disk.dir.join("filler")).unwrap();
    let t_freed = Instant::now();
    let (st, healthy_at) = wait_health(&c, FULL, true, RECOVERY_LIMIT).await;
    let healthy_at = healthy_at.unwrap_or_else(|| {
        panic!("node {FULL} did not recover within {RECOVERY_LIMIT:?} of its disk having room again: {st:?}")
    });
    let recovery = healthy_at - t_freed;
    let after = inventory(&c, FULL).await;
    assert!(after.store_error.is_empty(), "{after:?}");
    assert_eq!(
        after.instance, before.instance,
        "node {FULL} restarted (its instance id changed)"
    );
    assert!(
        c.nodes[usize::from(FULL) - 1]
            .as_mut()
            .unwrap()
            .child
            .try_wait()
            .unwrap()
            .is_none(),
        "node {FULL}'s process exited"
    );
    assert_eq!(
        c.nodes[usize::from(FULL) - 1].as_ref().unwrap().child.id(),
        pid
    );
    assert!(
        after
            .keys
            .iter()
            .any(|h| hex::encode(&h.key_id) == k.key_id && h.active),
        "node {FULL} lost its share: {after:?}"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    let seen = load.finish().await;
    eprintln!(
        "store fault: over {:.1} s of load (2 signers): {} signatures, {} failed requests, {} \
         unanswered at the deadline, longest without a signature {:.2} s; node {FULL} unhealthy \
         for {:.1} s, healthy again {:.2} s after the filler was deleted (same process); \
         failures: {:?}",
        seen.ran.as_secs_f64(),
        seen.ok,
        seen.failed.len(),
        seen.hung,
        seen.longest_gap.as_secs_f64(),
        (healthy_at - unhealthy_at).as_secs_f64(),
        recovery.as_secs_f64(),
        seen.failed.iter().take(3).collect::<Vec<_>>()
    );
    assert!(
        seen.failed.is_empty() && seen.hung == 0,
        "requests failed while node {FULL}'s disk was full: {seen:?}"
    );
    assert!(seen.ok > 0);

    // Node 3 takes part again: the pools refill (presigning needs every node at (3,1)),
    // then node 1 goes down and only the set {2,3} can sign.
    let pools = c.wait_pools("k", 8, Duration::from_secs(60)).await;
    assert!(
        pools.iter().all(|(_, d)| *d >= 8),
        "the pools did not refill with node {FULL} back: {pools:?}"
    );
    let held = inventory(&c, FULL).await.unused_presignatures;
    c.kill_node(1);
    for m in [&b"one"[..], b"two", b"three"] {
        let started = Instant::now();
        let sig = loop {
            match c.sign("k", m).await {
                Ok(sig) => break sig,
                Err(e) if started.elapsed() < Duration::from_secs(30) => {
                    eprintln!("store fault: with node 1 down, signing not yet possible: {e:?}");
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
                Err(e) => panic!("no signature from the set {{2,3}} within 30 s: {e:?}"),
            }
        };
        verify(&k.public_key, m, &sig);
    }
    let now_held = inventory(&c, FULL).await.unused_presignatures;
    assert!(
        now_held < held,
        "node {FULL} used none of its presignatures ({held} before, {now_held} after)"
    );
    eprintln!(
        "store fault: with node 1 down, the set {{2,3}} signed 3 messages; node {FULL} holds {now_held} presignatures (was {held})"
    );
    // Dropped in reverse order: `disk` first (a lazy unmount while node 3 still runs),
    // then the cluster, which stops the processes and removes its directory.
}
