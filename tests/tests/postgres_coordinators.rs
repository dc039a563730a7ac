//! Two coordinators over one PostgreSQL store and one node cluster, against a real
//! PostgreSQL server started here (skipped, saying so, where it is not installed and
//! `CI` is not set) — `coordinator/STORE.md`, "Singletons" and "Fragment nodes and two
//! coordinators":
//!
//! - each coordinator has its own presignature pool on the nodes, tagged with its
//!   `--instance-id` (node inventory counts them per instance);
//! - a third coordinator given A's instance id refuses to start, naming the id, and A's
//!   presignatures on the nodes stay;
//! - kill -9 and restart of coordinator A discards A's presignatures only: B's count on
//!   every node is unchanged;
//! - with a one-second checkpoint interval, exactly one coordinator signs audit
//!   checkpoints while both run (one instance in every checkpoint event, no two
//!   checkpoints of one chain position), and the chain verifies with the checkpoint JWKS;
//! - after kill -9 of the checkpoint leader, the other keeps signing without a failed
//!   request and takes the checkpoints over.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    missing_docs
)]

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use quorate_proto::{api, fragment, https};
use quorate_tests::postgres::Postgres;
use quorate_tests::{POOL_FLAGS, Proc, TestCluster, free_port, spawn_ready};
use serde_json::Value;

/// One coordinator of the shared store: its instance id, API address and metadata port.
struct Coord {
    id: &'static str,
    listen: SocketAddr,
    http_port: u16,
    proc: Option<Proc>,
}

impl Coord {
    fn start(cluster: &TestCluster, id: &'static str, listen: SocketAddr, http_port: u16) -> Self {
        let mut c = Coord {
            id,
            listen,
            http_port,
            proc: None,
        };
        c.restart(cluster);
        c
    }

    fn restart(&mut self, cluster: &TestCluster) {
        let mut cmd = cluster.coordinator_command_on(&self.listen.to_string(), self.http_port);
        cmd.env("QUORATE_COORDINATOR_INSTANCE", self.id);
        // Who leads which job, in the test's output.
        cmd.env(
            "QUORATE_LOG",
            "warn,quorate_coordinator::election=info,quorate_coordinator::audit=debug",
        );
        let p = spawn_ready(cmd);
        assert_eq!(p.addr, self.listen);
        self.proc = Some(p);
    }

    fn kill9(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.kill();
        }
    }
}

/// Each node's unused presignatures by coordinator instance.
async fn held(cluster: &TestCluster) -> Vec<BTreeMap<String, u64>> {
    let mut out = Vec::new();
    for i in 1..=cluster.n {
        let inv = cluster
            .node_as_coordinator(i)
            .await
            .inventory(fragment::InventoryRequest {})
            .await
            .unwrap()
            .into_inner();
        let by: BTreeMap<String, u64> = inv.unused_by_coordinator.into_iter().collect();
        assert_eq!(by.values().sum::<u64>(), inv.unused_presignatures);
        out.push(by);
    }
    out
}

fn count(held: &[BTreeMap<String, u64>], id: &str) -> Vec<u64> {
    held.iter()
        .map(|m| m.get(id).copied().unwrap_or(0))
        .collect()
}

/// The chain as stored: each event as JSON, and the text (one line per event).
async fn stored_chain(url: &str) -> (Vec<Value>, String) {
    let text = quorate_tests::postgres::stored_chain(url).await;
    let events = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    (events, text)
}

/// Checkpoint events from `from_seq` on: (event seq, covered seq, writer instance).
fn checkpoints(events: &[Value], from_seq: u64) -> Vec<(u64, u64, String)> {
    events
        .iter()
        .filter(|e| e["kind"] == "checkpoint" && e["seq"].as_u64().unwrap() >= from_seq)
        .map(|e| {
            (
                e["seq"].as_u64().unwrap(),
                e["checkpoint"]["seq"].as_u64().unwrap(),
                e["reason"]
                    .as_str()
                    .unwrap_or_default()
                    .trim_start_matches("coordinator instance ")
                    .to_owned(),
            )
        })
        .collect()
}

/// The checkpoint JWKS from the metadata listener on `http_port`.
async fn checkpoint_jwks(cluster: &TestCluster, http_port: u16) -> jsonwebtoken::jwk::JwkSet {
    let (_, trust) = cluster.identity("client-admin");
    let mut roots = rustls::RootCertStore::empty();
    roots.add(trust.ca_der().clone()).unwrap();
    let tls = https::public_client_config(roots).unwrap();
    let r = https::get(
        &format!("https://localhost:{http_port}/checkpoint-jwks.json"),
        tls,
    )
    .await
    .unwrap();
    assert_eq!(r.status, 200);
    serde_json::from_slice(&r.body).unwrap()
}

/// Verifies the whole stored chain (links and checkpoint signatures) and that no chain
/// position has two checkpoints. Returns the number of events.
fn verify(text: &str, events: &[Value], jwks: &jsonwebtoken::jwk::JwkSet) -> u64 {
    let report = quorate_proto::audit::verify_chain(text, jwks)
        .unwrap_or_else(|e| panic!("the stored chain does not verify: {e}"));
    let mut covered = HashMap::new();
    for (seq, cov, who) in checkpoints(events, 0) {
        if let Some((first, by)) = covered.insert(cov, (seq, who.clone())) {
            panic!(
                "chain position {cov} has two checkpoints: event {first} by {by}, event {seq} by {who}"
            );
        }
    }
    report.events
}

type Keys = api::key_service_client::KeyServiceClient<tonic::transport::Channel>;

/// The admin client's KeyService on the coordinator at `addr`.
async fn keys_at(cluster: &mut TestCluster, addr: SocketAddr) -> Keys {
    cluster.coordinator_addr = addr;
    cluster.keys().await
}

/// Signs with `key` through `c` until `stop`; returns how many signatures, and every
/// error.
async fn sign_until(
    mut c: Keys,
    key: &str,
    stop: tokio::sync::watch::Receiver<bool>,
) -> (u64, Vec<String>) {
    let (mut ok, mut errors) = (0, Vec::new());
    let mut i = 0u64;
    while !*stop.borrow() {
        i += 1;
        let r = c
            .sign(api::SignRequest {
                name: key.into(),
                input: Some(api::sign_request::Input::Message(
                    format!("message {i}").into_bytes(),
                )),
                format: api::SignatureFormat::Raw as i32,
            })
            .await;
        match r {
            Ok(_) => ok += 1,
            Err(s) => errors.push(format!("{:?}: {}", s.code(), s.message())),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    (ok, errors)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_coordinators_keep_their_own_pools_and_elect_one_checkpointer() {
    let Some(pg) = Postgres::start("coords") else {
        return;
    };
    let url = pg.url();
    let out = std::process::Command::new(quorate_tests::binary("quorate-coordinator"))
        .args(["migrate", "--store", &url])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");

    let mut flags = vec!["--store", url.as_str(), "--audit-checkpoint-secs", "1"];
    flags.extend_from_slice(POOL_FLAGS);
    let mut cluster = TestCluster::start("pg-coords", 3, 1, &flags);
    // The harness's own coordinator (a default instance id) goes; A and B, with their
    // own ids and fixed addresses, take its place.
    if let Some(mut p) = cluster.coordinator.take() {
        p.kill();
    }
    let http_a = cluster.http_port;
    let mut a = Coord::start(
        &cluster,
        "coord-a",
        format!("127.0.0.1:{}", free_port()).parse().unwrap(),
        http_a,
    );
    cluster.coordinator_addr = a.listen;
    let raw = cluster.create_key("raw", api::Purpose::Sign).await;
    let mut b = Coord::start(
        &cluster,
        "coord-b",
        format!("127.0.0.1:{}", free_port()).parse().unwrap(),
        free_port(),
    );
    for c in [&a, &b] {
        cluster.coordinator_addr = c.listen;
        let pools = cluster.wait_pools("raw", 8, Duration::from_secs(180)).await;
        assert!(pools.iter().all(|(_, d)| *d >= 8), "{}: {pools:?}", c.id);
    }
    eprintln!("key {} ({} bytes public)", raw.name, raw.public_key.len());

    // Each coordinator's presignatures are its own on the nodes.
    let before = held(&cluster).await;
    eprintln!("held per node, both running: {before:?}");
    for id in ["coord-a", "coord-b"] {
        assert!(
            count(&before, id).iter().sum::<u64>() > 0,
            "no presignature of {id} on any node: {before:?}"
        );
    }

    // A third coordinator given A's instance id refuses to start, before it could have
    // the nodes discard A's presignatures.
    let a_before = count(&held(&cluster).await, "coord-a");
    let mut dup =
        cluster.coordinator_command_on(&format!("127.0.0.1:{}", free_port()), free_port());
    dup.env("QUORATE_COORDINATOR_INSTANCE", "coord-a");
    let t = Instant::now();
    let mut child = dup
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    while child.try_wait().unwrap().is_none() {
        if t.elapsed() > Duration::from_secs(30) {
            child.kill().unwrap();
            let _ = child.wait();
            panic!("a second coord-a still runs after 30 s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a second coord-a started");
    assert!(
        err.contains("instance id `coord-a` is in use") && err.contains("--instance-id"),
        "{err}"
    );
    let a_after = count(&held(&cluster).await, "coord-a");
    eprintln!(
        "a second coord-a refused after {} ms; coord-a's presignatures per node {a_before:?} -> {a_after:?}",
        t.elapsed().as_millis()
    );
    assert!(
        a_after.iter().zip(&a_before).all(|(x, y)| x >= y),
        "{a_before:?} -> {a_after:?}"
    );

    // Both sign for a while: events on both, checkpoints by one.
    let (events0, _) = stored_chain(&url).await;
    let from = events0.len() as u64;
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    let mut load = Vec::new();
    for addr in [a.listen, b.listen] {
        let stop = stop.clone();
        let c = keys_at(&mut cluster, addr).await;
        load.push(tokio::spawn(
            async move { sign_until(c, "raw", stop).await },
        ));
    }
    tokio::time::sleep(Duration::from_secs(6)).await;
    stop_tx.send(true).unwrap();
    for l in load {
        let (ok, errors) = l.await.unwrap();
        assert!(
            ok > 0 && errors.is_empty(),
            "{ok} signed, errors: {errors:?}"
        );
    }
    // The last interval's checkpoint.
    tokio::time::sleep(Duration::from_secs(3)).await;
    // The audit key is made by the first checkpoint; its JWK is served by each
    // coordinator once loaded.
    let jwks = checkpoint_jwks(&cluster, http_a).await;
    let (events, text) = stored_chain(&url).await;
    let n = verify(&text, &events, &jwks);
    let cps = checkpoints(&events, from);
    let writers: HashSet<&str> = cps.iter().map(|(_, _, w)| w.as_str()).collect();
    eprintln!(
        "{n} events; {} checkpoints while both ran, written by {writers:?}",
        cps.len()
    );
    assert!(
        !cps.is_empty(),
        "no checkpoint while both ran (from event {from}); the last: {}",
        text.lines().last().unwrap_or_default()
    );
    assert_eq!(
        writers.len(),
        1,
        "checkpoints by more than one coordinator: {cps:?}"
    );

    // Kill -9 and restart A: A discards its own presignatures, B's stay. B is idle and
    // its pools above the low watermark, so its filler adds none meanwhile.
    cluster.coordinator_addr = b.listen;
    cluster.wait_pools("raw", 4, Duration::from_secs(180)).await;
    let b_before = count(&held(&cluster).await, "coord-b");
    a.kill9();
    a.restart(&cluster);
    // A asks every node to discard before it serves; its filler then makes new ones.
    let after = held(&cluster).await;
    eprintln!("held per node, after A's restart: {after:?}");
    assert_eq!(
        count(&after, "coord-b"),
        b_before,
        "B's presignatures changed"
    );
    cluster.coordinator_addr = a.listen;
    cluster.wait_pools("raw", 8, Duration::from_secs(180)).await;
    let sig = cluster.sign("raw", b"after the restart").await.unwrap();
    quorate_tests::verify_es256(&raw.public_key, b"after the restart", &sig);

    // The checkpoint leader dies (kill -9): the other keeps signing without a failed
    // request and takes the checkpoints over.
    let (events, _) = stored_chain(&url).await;
    let leader = checkpoints(&events, 0)
        .last()
        .map(|(_, _, w)| w.clone())
        .unwrap();
    let (dead, alive) = if leader == a.id {
        (&mut a, &mut b)
    } else {
        (&mut b, &mut a)
    };
    eprintln!(
        "checkpoint leader {leader}; killing it, {} goes on",
        alive.id
    );
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    let c = keys_at(&mut cluster, alive.listen).await;
    let signer = tokio::spawn(async move { sign_until(c, "raw", stop).await });
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mark = stored_chain(&url).await.0.len() as u64;
    dead.kill9();
    let killed = Instant::now();
    let took_over = loop {
        let (events, _) = stored_chain(&url).await;
        if checkpoints(&events, mark)
            .iter()
            .any(|(_, _, w)| w == alive.id)
        {
            break killed.elapsed();
        }
        assert!(
            killed.elapsed() < Duration::from_secs(60),
            "{} did not take the checkpoints over",
            alive.id
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    eprintln!(
        "{} wrote its first checkpoint {} ms after {leader} was killed",
        alive.id,
        took_over.as_millis()
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop_tx.send(true).unwrap();
    let (ok, errors) = signer.await.unwrap();
    eprintln!("{} signed {ok} times across the kill", alive.id);
    assert!(ok > 0 && errors.is_empty(), "errors: {errors:?}");
    let jwks = checkpoint_jwks(&cluster, alive.http_port).await;
    let (events, text) = stored_chain(&url).await;
    let n = verify(&text, &events, &jwks);
    let cps = checkpoints(&events, mark);
    assert!(
        cps.iter().all(|(_, _, w)| w == alive.id || w == &leader),
        "{cps:?}"
    );
    eprintln!("{n} events, chain and checkpoints verify");
    drop(pg);
}
