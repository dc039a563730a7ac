//! Soak: a (3,1) cluster signs random digests with a raw key for four concurrent clients
//! while a killer SIGKILLs a random node at random moments (every 3–10 s) and restarts
//! it after a random pause (0–2 s). Runs only on demand, on the release binaries:
//!
//! ```text
//! cargo build --release --workspace --all-targets
//! QUORATE_SOAK_SECONDS=120 cargo test --release -p quorate-tests --test soak -- --ignored --nocapture
//! ```
//!
//! `QUORATE_SOAK_SECONDS` is how long the clients sign (default 120). At the end: every
//! signature a client received verifies for the digest it asked for; no presignature
//! released shares for two different digests, according to every node's release log; a
//! failed request has a retryable status and none outlived its deadline. The figures
//! (signatures per second, failed requests, kills) are printed.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use p256::ecdsa::signature::hazmat::PrehashVerifier as _;
use p256::ecdsa::{Signature, VerifyingKey};
use quorate_node::store::{Kek, Release, Store};
use quorate_proto::api;
use quorate_proto::api::key_service_client::KeyServiceClient;
use quorate_proto::fragment;
use quorate_tests::TestCluster;
use rand::rngs::StdRng;
use rand::{RngExt as _, SeedableRng as _};
use tonic::transport::Channel;

/// How long the clients sign unless `QUORATE_SOAK_SECONDS` says otherwise.
const DEFAULT_SECONDS: u64 = 120;

/// Concurrent signing clients.
const SIGNERS: usize = 4;

/// The raw signing key.
const KEY: &str = "soak";

/// A client's deadline for one request. The coordinator's own worst case is three
/// attempts of at most 15 s each (5 s waiting for a presignature, 10 s for the nodes); a
/// request still unanswered after this hangs.
const DEADLINE: Duration = Duration::from_secs(60);

/// How long a client waits before its next request after a failed one.
const BACKOFF: Duration = Duration::from_millis(100);

/// What a client may see while nodes die and come back, and retry.
const RETRYABLE: [tonic::Code; 4] = [
    tonic::Code::Unavailable,
    tonic::Code::DeadlineExceeded,
    tonic::Code::Aborted,
    tonic::Code::ResourceExhausted,
];

/// What one client saw.
#[derive(Default)]
struct Tally {
    /// The digests it asked for and the signatures it received.
    signed: Vec<([u8; 32], Vec<u8>)>,
    /// Requests that failed, with their status.
    failed: Vec<tonic::Status>,
    /// Requests unanswered at their deadline.
    hung: usize,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "soak test, minutes long: run on demand with --ignored (see the module docs)"]
async fn signing_survives_random_node_kills() {
    let seconds = std::env::var("QUORATE_SOAK_SECONDS").map_or(DEFAULT_SECONDS, |s| {
        s.parse()
            .expect("QUORATE_SOAK_SECONDS must be a whole number of seconds")
    });
    // One seeded RNG (its seed is printed) for the digests and the killer's choices.
    let mut rng = quorate_crypto::sim::test_rng("soak");
    let c = TestCluster::start("soak", 3, 1, &[]);
    let info = c
        .keys()
        .await
        .create_key(api::CreateKeyRequest {
            name: KEY.into(),
            purpose: api::Purpose::Sign as i32,
            token_rules: None,
            profile: api::KeyProfile::Unspecified as i32,
        })
        .await
        .unwrap()
        .into_inner();
    let public = VerifyingKey::from_sec1_bytes(&info.public_key).unwrap();
    c.wait_pools(KEY, 16, Duration::from_secs(120)).await;

    let started = Instant::now();
    let until = started + Duration::from_secs(seconds);
    let mut signers = Vec::with_capacity(SIGNERS);
    for _ in 0..SIGNERS {
        signers.push(tokio::spawn(signer(c.keys().await, rng.fork(), until)));
    }
    // The killer owns the cluster (restarting a node blocks until it is ready) and
    // hands it back with every node running.
    let killer_rng = rng.fork();
    let killer = tokio::task::spawn_blocking(move || killer(c, killer_rng, until));
    let mut tally = Tally::default();
    for s in signers {
        let t = s.await.unwrap();
        tally.signed.extend(t.signed);
        tally.failed.extend(t.failed);
        tally.hung += t.hung;
    }
    let elapsed = started.elapsed();
    let (mut c, kills) = killer.await.unwrap();

    let mut by_code: BTreeMap<String, usize> = BTreeMap::new();
    for s in &tally.failed {
        *by_code.entry(format!("{:?}", s.code())).or_default() += 1;
    }
    eprintln!(
        "soak: {:.0} s, {kills} kills, {} signatures ({:.1}/s), {} failed requests {by_code:?}, {} past their deadline",
        elapsed.as_secs_f64(),
        tally.signed.len(),
        tally.signed.len() as f64 / elapsed.as_secs_f64(),
        tally.failed.len(),
        tally.hung,
    );

    // 1. Every signature verifies for the digest that was asked.
    assert!(!tally.signed.is_empty(), "no request was signed");
    for (digest, sig) in &tally.signed {
        let sig = Signature::from_slice(sig).expect("a raw signature is r || s");
        public.verify_prehash(digest, &sig).unwrap_or_else(|e| {
            panic!(
                "the signature for digest {} does not verify: {e}",
                hex::encode(digest)
            )
        });
    }

    // 3. Failures are retryable and none outlived its deadline.
    let fatal: Vec<&tonic::Status> = tally
        .failed
        .iter()
        .filter(|s| !RETRYABLE.contains(&s.code()))
        .collect();
    assert!(
        fatal.is_empty(),
        "{} requests failed with a status a client cannot retry: {fatal:?}",
        fatal.len()
    );
    assert_eq!(
        tally.hung, 0,
        "requests hung past their {DEADLINE:?} deadline"
    );

    // 2. No presignature released shares for two digests, on one node or across its
    // signing set. The real coordinator never asks for a second digest, so acting as the
    // coordinator (its certificate and store) the test asks, too: every node of a fresh
    // presignature's set signs one digest with it, then is asked for another.
    let (named, presigs) = c.presign_as_coordinator(KEY, 2).await;
    let mut second_shares = 0;
    for p in &presigs {
        let (digest, other): ([u8; 32], [u8; 32]) = (rng.random(), rng.random());
        for j in p.sset.members() {
            let mut node = c.node_as_coordinator(j.get()).await;
            let first = node
                .sign(quorate_tests::sign_batch(&named.public, p, digest, None))
                .await
                .unwrap();
            assert!(
                is_share(&first.into_inner()),
                "node {j} refused a fresh presignature"
            );
            let second = node
                .sign(quorate_tests::sign_batch(&named.public, p, other, None))
                .await
                .unwrap();
            if is_share(&second.into_inner()) {
                second_shares += 1;
            }
        }
    }
    let releases = release_logs(&mut c);
    let signs = releases.iter().filter(|(_, r)| r.kind == "sign").count();
    eprintln!("soak: {signs} sign releases in the nodes' logs");
    assert!(signs > 0, "the release logs are empty");
    let reused = reused_presignatures(&releases);
    assert!(
        reused.is_empty(),
        "{} presignatures released shares for two different digests; the first: {:?}",
        reused.len(),
        reused.first()
    );
    // The logs are written in the background and may miss their last entries.
    assert_eq!(
        second_shares, 0,
        "nodes released a second share of a used presignature"
    );
}

/// Signs random digests with [`KEY`] until `until`, one request at a time.
async fn signer(mut keys: KeyServiceClient<Channel>, mut rng: StdRng, until: Instant) -> Tally {
    let mut tally = Tally::default();
    while Instant::now() < until {
        let digest: [u8; 32] = rng.random();
        let request = api::SignRequest {
            name: KEY.into(),
            input: Some(api::sign_request::Input::Digest(digest.to_vec())),
            format: api::SignatureFormat::Raw as i32,
        };
        match tokio::time::timeout(DEADLINE, keys.sign(request)).await {
            Ok(Ok(reply)) => tally.signed.push((digest, reply.into_inner().signature)),
            Ok(Err(status)) => {
                tally.failed.push(status);
                tokio::time::sleep(BACKOFF).await;
            }
            Err(_) => tally.hung += 1,
        }
    }
    tally
}

/// Until `until`: waits 3–10 s, SIGKILLs a random node, waits 0–2 s and restarts it.
/// Returns the cluster, every node running, and how many kills it made.
fn killer(mut c: TestCluster, mut rng: StdRng, until: Instant) -> (TestCluster, usize) {
    let mut kills = 0;
    loop {
        let wait = Duration::from_millis(rng.random_range(3_000..=10_000));
        if Instant::now() + wait >= until {
            return (c, kills);
        }
        std::thread::sleep(wait);
        let i = rng.random_range(1..=c.n);
        c.kill_node(i);
        kills += 1;
        std::thread::sleep(Duration::from_millis(rng.random_range(0..=2_000)));
        c.restart_node(i, None);
    }
}

/// Whether the only result of a reply is a share.
fn is_share(reply: &fragment::SignBatchReply) -> bool {
    matches!(
        reply.results.as_slice(),
        [fragment::SignResult {
            result: Some(fragment::sign_result::Result::Share(_))
        }]
    )
}

/// Stops every node and reads its release log (node index, entry).
fn release_logs(c: &mut TestCluster) -> Vec<(u16, Release)> {
    let mut out = Vec::new();
    for i in 1..=c.n {
        if let Some(mut p) = c.nodes[usize::from(i) - 1].take() {
            p.terminate();
        }
        let dir = c.dir.0.join(format!("node-{i}"));
        let kek = Kek::load(&dir.join("kek"), false).unwrap();
        let store = Store::open(&dir.join("node.redb"), &kek).unwrap();
        out.extend(store.releases().unwrap().into_iter().map(|r| (i, r)));
    }
    out
}

/// The presignatures whose shares were released, by any nodes, for more than one digest:
/// each with the (node, digest) releases of it, as hex.
fn reused_presignatures(releases: &[(u16, Release)]) -> Vec<(String, Vec<(u16, String)>)> {
    let mut by_presig: HashMap<[u8; 32], Vec<(u16, [u8; 32])>> = HashMap::new();
    for (node, r) in releases.iter().filter(|(_, r)| r.kind == "sign") {
        by_presig
            .entry(r.presig_id)
            .or_default()
            .push((*node, r.digest));
    }
    by_presig
        .into_iter()
        .filter(|(_, uses)| {
            uses.iter()
                .any(|(_, d)| Some(d) != uses.first().map(|(_, d)| d))
        })
        .map(|(id, uses)| {
            let uses = uses
                .into_iter()
                .map(|(node, d)| (node, hex::encode(d)))
                .collect();
            (hex::encode(id), uses)
        })
        .collect()
}
