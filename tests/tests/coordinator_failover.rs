//! The client library fails over between coordinators (`client/src/client/failover.rs`):
//! three coordinator processes over one real PostgreSQL store (skipped, saying so, where
//! PostgreSQL is not installed and `CI` is not set), one `quorate_client::Client` given
//! all three addresses.
//!
//! - four concurrent loops issue tokens (each with a fresh OIDC attestation and its own
//!   request id) and sign with a raw key for ~40 s while the test kills a coordinator
//!   with SIGKILL every 5–10 s (the one the client sends to; every third kill a random
//!   one) and restarts it on the same address;
//! - every call the library answered succeeded (each retried to success), every token
//!   verifies against the issuer's JWKS and every signature under the key (aws-lc-rs);
//! - the audit chain in the store verifies as one chain (no gap, no fork) and holds
//!   every token returned;
//! - then the same `issue_token` with the same request id, sent to two different
//!   coordinators, yields one token (the same `jti`).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    missing_docs
)]

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use quorate_client::{Client, ClientConfig, Format, KeyPurpose, SignInput, TokenRequest};
use quorate_proto::https;
use quorate_tests::postgres::{Postgres, SharedStoreSetup, stored_chain};
use quorate_tests::{Proc, TestCluster, TestIssuer, free_port, spawn_ready};
use rand::{Rng as _, RngExt as _, SeedableRng as _};
use serde_json::{Value, json};

const POLICY: &str = r#"
@id("blue-team-tools")
@max_ttl_seconds("600")
permit (principal is Agent, action == Action::"issue_token", resource == Audience::"tools")
when { principal.hasTag("team") && principal.getTag("team") == "blue" };

@id("admin-client")
permit (principal == Client::"admin", action, resource);
"#;

/// How long the loops run.
const LOAD: Duration = Duration::from_secs(40);

/// Concurrent loops; even ones issue tokens, odd ones sign.
const LOOPS: usize = 4;

/// One coordinator process of the cluster, restartable on its addresses.
struct Coordinator {
    addr: SocketAddr,
    http_port: u16,
    proc: Option<Proc>,
}

/// What a loop got back.
enum Done {
    Token { jti: String, token: String },
    Signature { msg: Vec<u8>, sig: Vec<u8> },
}

fn token_request(issuer: &TestIssuer, k: usize, request_id: Option<String>) -> TokenRequest {
    TokenRequest {
        attestation: issuer.attest(&format!("agent-{k}"), json!({"team": "blue"})),
        audience: "tools".into(),
        scopes: vec!["tools:read".into()],
        ttl_seconds: 300,
        request_id,
        ..TokenRequest::default()
    }
}

/// The issuer's JWKS, from the metadata listener of the first coordinator.
async fn jwks(cluster: &TestCluster) -> jsonwebtoken::jwk::JwkSet {
    let (_, trust) = cluster.identity("client-admin");
    let mut roots = rustls::RootCertStore::empty();
    roots.add(trust.ca_der().clone()).unwrap();
    let tls = https::public_client_config(roots).unwrap();
    let r = https::get(&format!("{}/jwks.json", cluster.issuer()), tls)
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    serde_json::from_slice(&r.body).unwrap()
}

fn admin_config(cluster: &TestCluster, addrs: &[SocketAddr]) -> ClientConfig {
    ClientConfig::admin(&cluster.dir.0, addrs[0], quorate_tests::DOMAIN)
        .with_fallback_addrs(addrs[1..].iter().copied())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_fail_over_while_coordinators_are_killed() {
    let Some(pg) = Postgres::start("failover") else {
        return;
    };
    let url = pg.url();
    let seed: u64 = rand::rngs::StdRng::try_from_rng(&mut rand::rngs::SysRng)
        .unwrap()
        .next_u64();
    eprintln!("seed {seed}");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);

    let migrated = std::process::Command::new(quorate_tests::binary("quorate-coordinator"))
        .args(["migrate", "--store", &url])
        .output()
        .unwrap();
    assert!(migrated.status.success(), "{migrated:?}");

    let setup = SharedStoreSetup::new("failover-cfg", POLICY);
    let flags = setup.flags(&url);

    // Three coordinators over the one store.
    let mut cluster = TestCluster::start("failover", 3, 1, &flags);
    let mut coordinators = vec![Coordinator {
        addr: cluster.coordinator_addr,
        http_port: cluster.http_port,
        proc: cluster.coordinator.take(),
    }];
    for _ in 0..2 {
        let http_port = free_port();
        let p = spawn_ready(cluster.coordinator_command_on("127.0.0.1:0", http_port));
        coordinators.push(Coordinator {
            addr: p.addr,
            http_port,
            proc: Some(p),
        });
    }
    let addrs: Vec<SocketAddr> = coordinators.iter().map(|c| c.addr).collect();
    eprintln!("coordinators at {addrs:?}");

    let client = Client::connect(&admin_config(&cluster, &addrs))
        .await
        .unwrap()
        .with_timeout(Duration::from_secs(30));
    client
        .create_key_with_profile(
            "tokens",
            &quorate_client::KeyProfile::Token(
                quorate_client::TokenRules::new(900, cluster.issuer(), "at+jwt").unwrap(),
            ),
        )
        .await
        .unwrap();
    let raw = client.create_key("raw", KeyPurpose::Sign).await.unwrap();
    for &addr in &addrs {
        cluster.coordinator_addr = addr;
        for key in ["tokens", "raw"] {
            cluster.wait_pools(key, 2, Duration::from_secs(120)).await;
        }
    }

    // Load, with a coordinator killed every 5–10 s.
    let started = Instant::now();
    let results: Arc<Mutex<Vec<(Instant, Duration, Done)>>> = Arc::new(Mutex::new(Vec::new()));
    let issuer_for_loops = Arc::clone(&setup.issuer);
    let mut loops = Vec::new();
    for k in 0..LOOPS {
        let client = client.clone();
        let issuer = Arc::clone(&issuer_for_loops);
        let results = Arc::clone(&results);
        loops.push(tokio::spawn(async move {
            let mut failures = Vec::new();
            let mut i = 0u64;
            while started.elapsed() < LOAD {
                i += 1;
                let t0 = Instant::now();
                let done = if k % 2 == 0 {
                    client
                        .issue_token(token_request(&issuer, k, None))
                        .await
                        .map(|t| Done::Token {
                            jti: t.jti,
                            token: t.access_token,
                        })
                } else {
                    let msg = format!("loop {k} message {i}").into_bytes();
                    client
                        .sign("raw", SignInput::Message(msg.clone()), Format::Raw)
                        .await
                        .map(|s| Done::Signature {
                            msg,
                            sig: s.signature,
                        })
                };
                match done {
                    Ok(d) => results
                        .lock()
                        .unwrap()
                        .push((Instant::now(), t0.elapsed(), d)),
                    Err(e) => {
                        eprintln!("loop {k}: request {i} failed: {e}");
                        failures.push(e.to_string());
                    }
                }
            }
            failures
        }));
    }
    let mut kills = Vec::new();
    while started.elapsed() + Duration::from_secs(10) < LOAD {
        let wait = Duration::from_millis(rng.random_range(5000..=10_000));
        tokio::time::sleep(wait).await;
        // The coordinator the client sends to (so the kill meets calls in flight), or a
        // random one every third kill (a coordinator the client is not using).
        let in_use = coordinators.iter().position(|c| c.addr == client.addr());
        let victim = match in_use {
            Some(i) if kills.len() % 3 != 2 => i,
            _ => rng.random_range(0..coordinators.len()),
        };
        let c = &mut coordinators[victim];
        let at = Instant::now();
        if let Some(mut p) = c.proc.take() {
            p.kill();
        }
        eprintln!(
            "killed coordinator {victim} ({}) at {:.1} s",
            c.addr,
            started.elapsed().as_secs_f64()
        );
        kills.push(at);
        tokio::time::sleep(Duration::from_millis(500)).await;
        let cmd = cluster.coordinator_command_on(&c.addr.to_string(), c.http_port);
        let p = tokio::task::spawn_blocking(move || spawn_ready(cmd))
            .await
            .unwrap();
        assert_eq!(p.addr, c.addr);
        c.proc = Some(p);
        eprintln!(
            "restarted coordinator {victim} at {:.1} s",
            started.elapsed().as_secs_f64()
        );
    }
    let mut failures = Vec::new();
    for l in loops {
        failures.extend(l.await.unwrap());
    }
    assert!(!kills.is_empty());

    // Every call succeeded, after retries where a coordinator was lost.
    let results = std::mem::take(&mut *results.lock().unwrap());
    let tokens = results
        .iter()
        .filter(|r| matches!(r.2, Done::Token { .. }))
        .count();
    let signatures = results.len() - tokens;
    let mut ends: Vec<Instant> = results.iter().map(|r| r.0).collect();
    ends.sort();
    let longest_gap = ends
        .windows(2)
        .map(|w| w[1] - w[0])
        .max()
        .unwrap_or_default();
    let slowest = results.iter().map(|r| r.1).max().unwrap_or_default();
    eprintln!(
        "{} kills; {tokens} tokens and {signatures} signatures in {:.1} s; {} retries; \
         longest gap between answers {} ms; slowest call {} ms; {} failed",
        kills.len(),
        started.elapsed().as_secs_f64(),
        client.retries(),
        longest_gap.as_millis(),
        slowest.as_millis(),
        failures.len()
    );
    assert!(
        failures.is_empty(),
        "calls failed despite failover: {failures:#?}"
    );
    assert!(tokens > 0 && signatures > 0);
    assert!(
        client.retries() > 0,
        "no call was retried: the kills missed every call"
    );

    // Every answer is valid: tokens against the issuer's JWKS, signatures under the key.
    let keys = jwks(&cluster).await;
    let mut jtis = Vec::new();
    let public = raw.public_key.to_uncompressed();
    for (_, _, done) in &results {
        match done {
            Done::Token { jti, token } => {
                let kid = jsonwebtoken::decode_header(token).unwrap().kid.unwrap();
                let key = DecodingKey::from_jwk(keys.find(&kid).unwrap()).unwrap();
                let mut v = Validation::new(Algorithm::ES256);
                v.set_audience(&["tools"]);
                v.set_issuer(&[cluster.issuer()]);
                let claims = jsonwebtoken::decode::<Value>(token, &key, &v)
                    .unwrap_or_else(|e| panic!("token {jti} does not verify: {e}"))
                    .claims;
                assert_eq!(claims["jti"], json!(jti));
                jtis.push(jti.clone());
            }
            Done::Signature { msg, sig } => {
                use aws_lc_rs::signature::{ECDSA_P256_SHA256_FIXED, UnparsedPublicKey};
                UnparsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, public.as_slice())
                    .verify(msg, sig)
                    .expect("aws-lc-rs rejects a signature the client returned");
            }
        }
    }
    let unique: std::collections::HashSet<&String> = jtis.iter().collect();
    assert_eq!(unique.len(), jtis.len(), "a jti was returned twice");

    // One audit chain across the coordinators: no gap, no fork, every token in it.
    let text = stored_chain(&url).await;
    let none = jsonwebtoken::jwk::JwkSet { keys: vec![] };
    let report = quorate_proto::audit::verify_chain(&text, &none)
        .unwrap_or_else(|e| panic!("the stored chain does not verify: {e}"));
    eprintln!("stored chain: {} events, verified", report.events);
    for jti in &jtis {
        assert!(
            text.contains(jti.as_str()),
            "token {jti} is not in the chain"
        );
    }
    // The same request id, sent to two different coordinators: one token.
    {
        let one = Client::connect(&admin_config(&cluster, &addrs[..1]))
            .await
            .unwrap();
        let two = Client::connect(&admin_config(&cluster, &addrs[1..2]))
            .await
            .unwrap();
        let id = "retry-same-request-0001".to_owned();
        let req = token_request(&issuer_for_loops, 0, Some(id));
        let first = one.issue_token(req.clone()).await.unwrap();
        let again = two.issue_token(req).await.unwrap();
        assert_eq!(
            first.jti, again.jti,
            "a retried issue_token (same request id) on another coordinator gave a second token"
        );
        eprintln!(
            "same request id on two coordinators: one token, jti {}",
            first.jti
        );
    }
    drop(coordinators);
}
