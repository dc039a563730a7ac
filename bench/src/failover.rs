//! `quorate-bench failover`: how long token issuance stalls when a coordinator dies.
//!
//! Three coordinator processes serve one cluster over one PostgreSQL store
//! (`coordinator/STORE.md`), started with the integration tests' harness
//! (`quorate_tests::postgres::Postgres`, `quorate_tests::TestCluster`: a real PostgreSQL
//! via `initdb`/`pg_ctl`, real node and coordinator processes on 127.0.0.1, so the
//! workspace's `quorate-node` and `quorate-coordinator` binaries must be built beside
//! this one). One `quorate_client::Client` given all three addresses issues tokens from
//! `concurrency` tasks; after `before` seconds the coordinator it sends to is killed
//! with SIGKILL, and issuance goes on for `after` seconds.
//!
//! Reported: the **gap**, the time between the last token answered before the kill and
//! the first answered after it (milliseconds); the latency of the calls that were in
//! flight across the kill (p50, p99, max); the library's retries; failures (there
//! should be none: every call is retried on another coordinator).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Args;
use quorate_client::{Client, ClientConfig, KeyProfile, TokenRequest, TokenRules};
use quorate_tests::postgres::{Postgres, SharedStoreSetup};
use quorate_tests::{TestCluster, free_port, spawn_ready};
use serde::Serialize;

/// The policy: agents of team blue get tokens for audience `tools`.
const POLICY: &str = r#"
@id("blue-team-tools")
@max_ttl_seconds("600")
permit (principal is Agent, action == Action::"issue_token", resource == Audience::"tools")
when { principal.hasTag("team") && principal.getTag("team") == "blue" };

@id("admin-client")
permit (principal == Client::"admin", action, resource);
"#;

/// Options of `quorate-bench failover`.
#[derive(Debug, Clone, Args)]
pub struct FailoverOpts {
    /// Concurrent token requests
    #[arg(long, default_value_t = 8)]
    pub concurrency: usize,
    /// Seconds of issuance before the kill
    #[arg(long, default_value_t = 5.0)]
    pub before: f64,
    /// Seconds of issuance after the kill
    #[arg(long, default_value_t = 5.0)]
    pub after: f64,
    /// Write the result as JSON here
    #[arg(long)]
    pub json: Option<std::path::PathBuf>,
}

/// What one run measured.
#[derive(Debug, Clone, Serialize)]
pub struct FailoverResult {
    /// Concurrent requests.
    pub concurrency: usize,
    /// Tokens answered before the kill.
    pub tokens_before: usize,
    /// Tokens answered after the kill.
    pub tokens_after: usize,
    /// Tokens per second before the kill.
    pub rate_before: f64,
    /// Tokens per second after the kill.
    pub rate_after: f64,
    /// Milliseconds between the last answer before the kill and the first after it.
    pub gap_ms: f64,
    /// Calls in flight across the kill.
    pub spanning: usize,
    /// Their median latency, milliseconds.
    pub spanning_p50_ms: f64,
    /// Their 99th-percentile latency, milliseconds.
    pub spanning_p99_ms: f64,
    /// Their longest latency, milliseconds.
    pub spanning_max_ms: f64,
    /// Median latency of every other call, milliseconds.
    pub other_p50_ms: f64,
    /// Calls the library sent again after a failure.
    pub retries: u64,
    /// Calls that failed (after the library's retries).
    pub failures: usize,
}

/// One finished call.
struct Call {
    start: Instant,
    end: Instant,
    ok: bool,
}

/// Runs the measurement and prints it; writes JSON if asked.
pub async fn main(o: FailoverOpts) -> Result<(), String> {
    let r = run(&o).await?;
    eprintln!(
        "failover (3 coordinators on PostgreSQL, {} concurrent token requests, coordinator in use killed with SIGKILL):\n  \
         before: {} tokens, {:.1}/s; after: {} tokens, {:.1}/s\n  \
         gap: {:.0} ms between the last token before the kill and the first after it\n  \
         {} calls spanned the kill: p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms (other calls: p50 {:.0} ms)\n  \
         {} retries, {} failures",
        r.concurrency,
        r.tokens_before,
        r.rate_before,
        r.tokens_after,
        r.rate_after,
        r.gap_ms,
        r.spanning,
        r.spanning_p50_ms,
        r.spanning_p99_ms,
        r.spanning_max_ms,
        r.other_p50_ms,
        r.retries,
        r.failures
    );
    if let Some(path) = &o.json {
        let text = serde_json::to_string_pretty(&r).map_err(|e| e.to_string())?;
        std::fs::write(path, text).map_err(|e| format!("{}: {e}", path.display()))?;
    }
    if r.failures > 0 {
        return Err(format!(
            "{} token requests failed despite failover",
            r.failures
        ));
    }
    Ok(())
}

fn secs(name: &str, v: f64) -> Result<Duration, String> {
    if v.is_finite() && (0.5..=3600.0).contains(&v) {
        Ok(Duration::from_secs_f64(v))
    } else {
        Err(format!("--{name} {v}: seconds from 0.5 to 3600"))
    }
}

/// Starts the cluster, runs the load, kills the coordinator in use, measures.
pub async fn run(o: &FailoverOpts) -> Result<FailoverResult, String> {
    let before = secs("before", o.before)?;
    let after = secs("after", o.after)?;
    if o.concurrency == 0 || o.concurrency > 1024 {
        return Err(format!("--concurrency {}: 1 to 1024", o.concurrency));
    }
    let pg = Postgres::start("bench-failover").ok_or_else(|| {
        "PostgreSQL server binaries are not installed (Debian package `postgresql`)".to_owned()
    })?;
    let url = pg.url();
    let migrated = std::process::Command::new(quorate_tests::binary("quorate-coordinator"))
        .args(["migrate", "--store", &url])
        .output()
        .map_err(|e| format!("cannot run `quorate-coordinator migrate`: {e}"))?;
    if !migrated.status.success() {
        return Err(format!(
            "migrate failed: {}",
            String::from_utf8_lossy(&migrated.stderr)
        ));
    }
    let setup = SharedStoreSetup::new("bench-failover-cfg", POLICY);
    let issuer = &setup.issuer;
    let flags = setup.flags(&url);
    let mut cluster = TestCluster::start("bench-failover", 3, 1, &flags);
    let mut procs = vec![cluster.coordinator.take()];
    for _ in 0..2 {
        let p = spawn_ready(cluster.coordinator_command_on("127.0.0.1:0", free_port()));
        cluster.coordinator_addr = p.addr;
        procs.push(Some(p));
    }
    let addrs: Vec<SocketAddr> = procs.iter().flatten().map(|p| p.addr).collect();
    let first = *addrs
        .first()
        .ok_or_else(|| "no coordinator started".to_owned())?;
    let config = ClientConfig::admin(&cluster.dir.0, first, quorate_tests::DOMAIN)
        .with_fallback_addrs(addrs.iter().copied());
    let client = Client::connect(&config)
        .await
        .map_err(|e| e.to_string())?
        .with_timeout(Duration::from_secs(30));
    let rules = TokenRules::new(900, cluster.issuer(), "at+jwt").map_err(|e| e.to_string())?;
    client
        .create_key_with_profile("tokens", &KeyProfile::Token(rules))
        .await
        .map_err(|e| e.to_string())?;
    for &addr in &addrs {
        cluster.coordinator_addr = addr;
        cluster
            .wait_pools("tokens", 4, Duration::from_secs(300))
            .await;
    }

    let attestation = issuer.attest("bench-agent", serde_json::json!({"team": "blue"}));
    let request = TokenRequest {
        attestation,
        audience: "tools".into(),
        scopes: vec!["tools:read".into()],
        ttl_seconds: 300,
        ..TokenRequest::default()
    };
    let calls: Arc<Mutex<Vec<Call>>> = Arc::new(Mutex::new(Vec::new()));
    let started = Instant::now();
    let end = started + before + after;
    let mut tasks = Vec::new();
    for _ in 0..o.concurrency {
        let (client, request, calls) = (client.clone(), request.clone(), Arc::clone(&calls));
        tasks.push(tokio::spawn(async move {
            while Instant::now() < end {
                let start = Instant::now();
                let ok = client.issue_token(request.clone()).await.is_ok();
                let done = Call {
                    start,
                    end: Instant::now(),
                    ok,
                };
                if let Ok(mut c) = calls.lock() {
                    c.push(done);
                }
            }
        }));
    }
    tokio::time::sleep(before).await;
    let victim_addr = client.addr();
    let victim = addrs.iter().position(|a| *a == victim_addr).unwrap_or(0);
    let killed_at = Instant::now();
    if let Some(p) = procs.get_mut(victim).and_then(Option::as_mut) {
        p.kill();
    }
    for t in tasks {
        t.await.map_err(|e| format!("a load task failed: {e}"))?;
    }
    drop(procs);
    drop(cluster);
    drop(pg);

    let calls = std::mem::take(&mut *calls.lock().map_err(|_| "poisoned".to_owned())?);
    Ok(summarise(
        o.concurrency,
        &calls,
        started,
        killed_at,
        client.retries(),
    ))
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// The `q`-quantile of sorted `v` (nearest rank), 0 if empty.
fn quantile(v: &[f64], q: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    let rank = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len());
    v.get(rank - 1).copied().unwrap_or(0.0)
}

fn summarise(
    concurrency: usize,
    calls: &[Call],
    started: Instant,
    killed_at: Instant,
    retries: u64,
) -> FailoverResult {
    let ok: Vec<&Call> = calls.iter().filter(|c| c.ok).collect();
    let last_before = ok.iter().map(|c| c.end).filter(|e| *e <= killed_at).max();
    let first_after = ok.iter().map(|c| c.end).filter(|e| *e > killed_at).min();
    let last_end = ok.iter().map(|c| c.end).max().unwrap_or(killed_at);
    let gap = match (last_before, first_after) {
        (Some(b), Some(a)) => a - b,
        _ => Duration::ZERO,
    };
    let mut spanning: Vec<f64> = ok
        .iter()
        .filter(|c| c.start <= killed_at && c.end > killed_at)
        .map(|c| ms(c.end - c.start))
        .collect();
    spanning.sort_by(f64::total_cmp);
    let mut other: Vec<f64> = ok
        .iter()
        .filter(|c| !(c.start <= killed_at && c.end > killed_at))
        .map(|c| ms(c.end - c.start))
        .collect();
    other.sort_by(f64::total_cmp);
    let tokens_before = ok.iter().filter(|c| c.end <= killed_at).count();
    let tokens_after = ok.len() - tokens_before;
    let rate = |n: usize, d: Duration| {
        if d.is_zero() {
            0.0
        } else {
            n as f64 / d.as_secs_f64()
        }
    };
    FailoverResult {
        concurrency,
        tokens_before,
        tokens_after,
        rate_before: rate(tokens_before, killed_at - started),
        rate_after: rate(tokens_after, last_end.saturating_duration_since(killed_at)),
        gap_ms: ms(gap),
        spanning: spanning.len(),
        spanning_p50_ms: quantile(&spanning, 0.5),
        spanning_p99_ms: quantile(&spanning, 0.99),
        spanning_max_ms: spanning.last().copied().unwrap_or(0.0),
        other_p50_ms: quantile(&other, 0.5),
        retries,
        failures: calls.iter().filter(|c| !c.ok).count(),
    }
}
