//! `quorate-bench`: the load generator and the side-by-side comparison behind
//! BENCHMARKS.md.
//!
//! ```sh
//! cargo run --release -p quorate-bench -- compare                # the headline table and targets
//! cargo run --release -p quorate-bench -- token --concurrency 8 --duration 30
//! cargo run --release -p quorate-bench -- scaling                # (3,1), (5,2), (7,3)
//! cargo run --release -p quorate-bench -- storage --presigs 100000
//! ```
//!
//! Cluster operations start a local cluster of real processes (this executable, with the
//! hidden `node` / `coordinator` subcommands, exactly as `quorate dev` runs them) in a
//! temporary directory, unless `--external` targets the cluster named by `QUORATE_*`.
//! Every command prints a markdown table on stdout, a progress line on stderr while it
//! runs, and with `--json FILE` the full results (histogram quantiles, pool depth over
//! time, CPU per process) as JSON.
#![allow(
    clippy::print_stdout,
    reason = "a command-line report: the tables on stdout are the program's output"
)]

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::{Args, Parser, Subcommand};
use quorate_bench::load::{self, LoadSpec, Measured};
use quorate_bench::local::{self, PoolSettings, Sampler, Target};
use quorate_bench::ops;
use quorate_bench::report::{self, Row, Verdict};
use serde::Serialize;

#[derive(Debug, Parser)]
#[command(
    name = "quorate-bench",
    version,
    about = "Quorate load generator and benchmarks"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Access tokens through the public IssueToken API (presigning included: the pool is
    /// drained first, so the rate is the sustained one)
    Token(Opts),
    /// Raw ES256 signatures of fresh digests through the public Sign API, then through the
    /// PKCS#11 module (libquorate_pkcs11.so), each from half the same full pool
    Sign(Opts),
    /// Confidential derivations through the public Derive API
    Derive(Opts),
    /// A bare unary gRPC round trip (health check) over the same PQ mTLS channel
    Rtt(Opts),
    /// Baseline: single-key ES256 JWTs signed by aws-lc-rs in process (same claims and encoder)
    Jwt(Opts),
    /// Quorate's online signing in process: t+1 signing steps and the combine
    Online(Opts),
    /// Quorate's presigning and signing in process, per signature
    PresignSign(Opts),
    /// Baseline: FROST(P-256, SHA-256) 2-of-3 signing in process
    Frost(Opts),
    /// Baseline: cggmp21 2-of-3 presign + sign in process (needs `--features cggmp21`)
    Cggmp21(Opts),
    /// Everything above side by side, with the issue's targets as ratios
    Compare(Opts),
    /// Tokens per second: one coordinator on redb against one, two and three on one
    /// PostgreSQL store, with the ratios to redb
    Coordinators(quorate_bench::coordinators::Opts),
    /// Presigning cost and online latency for several (n,t)
    Scaling(ScalingOpts),
    /// Bytes at rest per presignature and node RSS with a large pool
    Storage(StorageOpts),
    /// The failover gap: three coordinators on PostgreSQL, the one in use killed
    Failover(quorate_bench::failover::FailoverOpts),
    /// Run a fragment node (used by the local cluster)
    #[command(hide = true)]
    Node(quorate_node::config::Args),
    /// Run the coordinator (used by the local cluster)
    #[command(hide = true)]
    Coordinator(Box<quorate_coordinator::config::Args>),
    /// Sign through the PKCS#11 module in this process, for the cluster named by the
    /// QUORATE_* variables, and print the row as JSON (used by `sign` and `compare`)
    #[command(hide = true)]
    Pkcs11Sign(Pkcs11Opts),
}

#[derive(Debug, Clone, Args)]
struct Pkcs11Opts {
    /// Threads, each with a session of its own
    #[arg(long)]
    concurrency: usize,
    /// Measured seconds
    #[arg(long)]
    duration: f64,
    /// Start at most this many signatures
    #[arg(long)]
    max_ops: Option<u64>,
    /// The module (libquorate_pkcs11.so)
    #[arg(long)]
    module: PathBuf,
}

impl Command {
    /// The common options of a load command.
    fn opts(&self) -> Option<&Opts> {
        match self {
            Command::Token(o)
            | Command::Sign(o)
            | Command::Derive(o)
            | Command::Rtt(o)
            | Command::Jwt(o)
            | Command::Online(o)
            | Command::PresignSign(o)
            | Command::Frost(o)
            | Command::Cggmp21(o)
            | Command::Compare(o) => Some(o),
            Command::Scaling(_)
            | Command::Coordinators(_)
            | Command::Storage(_)
            | Command::Failover(_)
            | Command::Node(_)
            | Command::Coordinator(_)
            | Command::Pkcs11Sign(_) => None,
        }
    }
}

#[derive(Debug, Clone, Args)]
struct Opts {
    /// Workers (tasks for cluster operations, threads for in-process ones)
    #[arg(long, default_value_t = 4)]
    concurrency: usize,
    /// Measured seconds
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Unmeasured warm-up seconds
    #[arg(long, default_value_t = 2.0)]
    warmup: f64,
    /// Fragment nodes of the local cluster
    #[arg(long, default_value_t = 3)]
    nodes: u16,
    /// Threshold t of the local cluster
    #[arg(long, default_value_t = 1)]
    threshold: u16,
    /// Presignatures per pool (key and signing set) before signing starts; the local
    /// cluster refills only once a pool is empty, so `sign` measures signing from a full
    /// pool and stops before it runs dry
    #[arg(long, default_value_t = 400)]
    pool: usize,
    /// Presignatures per presigning session
    #[arg(long, default_value_t = 32)]
    batch: u32,
    /// Drive the cluster named by QUORATE_ADDR, QUORATE_CACERT, QUORATE_CERT, QUORATE_KEY
    /// (QUORATE_BENCH_METRICS: its metrics address; QUORATE_BENCH_ATTESTATION: a JWT
    /// for `token`) instead of starting one
    #[arg(long)]
    external: bool,
    /// Write the results as JSON here
    #[arg(long)]
    json: Option<PathBuf>,
    /// Exit with an error if any operation failed or none completed (for CI)
    #[arg(long)]
    strict: bool,
    /// An extra argument for the local coordinator (repeat; e.g.
    /// `--coordinator-arg=--presign-parallel --coordinator-arg=3`)
    #[arg(long = "coordinator-arg", allow_hyphen_values = true)]
    coordinator_args: Vec<String>,
    /// Bench only: the local nodes do not check the evidence behind tokens (their
    /// ceilings name no trust configuration), to measure what that check costs
    #[arg(long)]
    no_node_evidence: bool,
    /// The PKCS#11 module for `sign` through PKCS#11 (default: the libquorate_pkcs11.so
    /// cargo built beside this executable)
    #[arg(long)]
    pkcs11_module: Option<PathBuf>,
}

#[derive(Debug, Clone, Args)]
struct ScalingOpts {
    /// The (n,t) pairs, as `n,t` separated by spaces
    #[arg(long, num_args = 1.., default_values_t = ["3,1".to_owned(), "5,2".to_owned(), "7,3".to_owned()])]
    params: Vec<String>,
    /// Presignatures per pool to make and then sign from
    #[arg(long, default_value_t = 200)]
    pool: usize,
    /// Presignatures per presigning session
    #[arg(long, default_value_t = 32)]
    batch: u32,
    /// Measured seconds of online signing per (n,t) (stops early when the pool runs low)
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Workers for online signing (1: latency without queueing)
    #[arg(long, default_value_t = 1)]
    concurrency: usize,
    /// Write the results as JSON here
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(Debug, Clone, Args)]
struct StorageOpts {
    /// Unused presignatures each node should hold
    #[arg(long, default_value_t = 100_000)]
    presigs: u64,
    /// Fragment nodes
    #[arg(long, default_value_t = 3)]
    nodes: u16,
    /// Threshold t
    #[arg(long, default_value_t = 1)]
    threshold: u16,
    /// Presignatures per presigning session
    #[arg(long, default_value_t = 128)]
    batch: u32,
    /// Write the results as JSON here
    #[arg(long)]
    json: Option<PathBuf>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match quorate_cli::dev::runtime() {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    let result = match cli.command {
        Command::Node(args) => return runtime.block_on(quorate_node::app::main_with(args)),
        Command::Coordinator(args) => {
            return runtime.block_on(quorate_coordinator::app::main_with(*args));
        }
        Command::Pkcs11Sign(o) => pkcs11_sign(&o),
        Command::Coordinators(o) => runtime.block_on(quorate_bench::coordinators::run(&o)),
        Command::Failover(o) => runtime.block_on(quorate_bench::failover::main(o)),
        command => runtime.block_on(run(command)),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn spec(o: &Opts, max_ops: Option<u64>) -> Result<LoadSpec, String> {
    let secs = |name: &str, v: f64| {
        if v.is_finite() && (0.0..=86_400.0).contains(&v) {
            Ok(Duration::from_secs_f64(v))
        } else {
            Err(format!("--{name} {v}: seconds from 0 to 86400"))
        }
    };
    if o.concurrency == 0 || o.concurrency > 4096 {
        return Err(format!("--concurrency {}: 1 to 4096", o.concurrency));
    }
    Ok(LoadSpec {
        concurrency: o.concurrency,
        warmup: secs("warmup", o.warmup)?,
        duration: secs("duration", o.duration)?,
        max_ops,
    })
}

/// Everything a command produced, for `--json`.
#[derive(Debug, Default, Serialize)]
struct Results {
    command: Vec<String>,
    machine: Machine,
    rows: Vec<Row>,
    verdicts: Vec<Verdict>,
    scaling: Vec<ScalingRow>,
    storage: Option<StorageResult>,
}

#[derive(Debug, Default, Serialize)]
struct Machine {
    cpus: usize,
    cpu_model: String,
    memory: String,
}

impl Machine {
    fn this() -> Machine {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        Machine {
            cpus: std::thread::available_parallelism().map_or(0, usize::from),
            cpu_model: cpuinfo
                .lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|l| l.trim_start_matches([' ', '\t', ':']).to_owned())
                .unwrap_or_default(),
            memory: meminfo
                .lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .map(|l| l.trim().to_owned())
                .unwrap_or_default(),
        }
    }
}

async fn run(command: Command) -> Result<(), String> {
    let mut results = Results {
        command: std::env::args().collect(),
        machine: Machine::this(),
        ..Results::default()
    };
    let json = match &command {
        Command::Scaling(o) => o.json.clone(),
        Command::Storage(o) => o.json.clone(),
        other => other.opts().and_then(|o| o.json.clone()),
    };
    let strict = command.opts().is_some_and(|o| o.strict);
    match command {
        Command::Jwt(o) => results.rows.push(in_process(&o, InProc::Jwt)?),
        Command::Online(o) => results.rows.push(in_process(&o, InProc::Online)?),
        Command::PresignSign(o) => results.rows.push(in_process(&o, InProc::PresignSign)?),
        Command::Frost(o) => results.rows.push(in_process(&o, InProc::Frost)?),
        Command::Cggmp21(o) => results.rows.push(in_process(&o, InProc::Cggmp21)?),
        Command::Token(o) => results.rows.extend(cluster_ops(&o, &[Op::Token]).await?),
        Command::Sign(o) => {
            let rows = cluster_ops(&o, &[Op::Sign, Op::Pkcs11Sign]).await?;
            results.rows.extend(rows);
        }
        Command::Derive(o) => results.rows.extend(cluster_ops(&o, &[Op::Derive]).await?),
        Command::Rtt(o) => results.rows.extend(cluster_ops(&o, &[Op::Rtt]).await?),
        Command::Compare(o) => compare(&o, &mut results).await?,
        Command::Scaling(o) => results.scaling = scaling(&o).await?,
        Command::Storage(o) => results.storage = Some(storage(&o).await?),
        Command::Node(_)
        | Command::Coordinator(_)
        | Command::Pkcs11Sign(_)
        | Command::Coordinators(_)
        | Command::Failover(_) => {}
    }
    if !results.rows.is_empty() {
        println!("{}", report::table(&results.rows));
        let cpu = report::cpu_table(&results.rows);
        if !cpu.is_empty() {
            println!("{cpu}");
        }
        for r in results.rows.iter().filter(|r| !r.pool_depth.is_empty()) {
            println!(
                "pool depth during `{}` (s:depth): {}\n",
                r.name,
                report::depth_series(r)
            );
        }
    }
    if !results.verdicts.is_empty() {
        println!("{}", report::verdict_table(&results.verdicts));
    }
    if !results.scaling.is_empty() {
        println!("{}", scaling_table(&results.scaling));
    }
    if let Some(s) = &results.storage {
        println!("{}", storage_table(s));
    }
    if let Some(path) = json {
        let text = serde_json::to_string_pretty(&results)
            .map_err(|e| format!("cannot encode the results: {e}"))?;
        std::fs::write(&path, text).map_err(|e| format!("{}: {e}", path.display()))?;
        eprintln!("results written to {}", path.display());
    }
    if strict {
        let failed: Vec<String> = results
            .rows
            .iter()
            .filter(|r| r.ops == 0 || r.errors > 0)
            .map(|r| format!("`{}` ({} ok, {} failed)", r.name, r.ops, r.errors))
            .collect();
        if !failed.is_empty() {
            return Err(format!(
                "--strict: failing operations: {}",
                failed.join(", ")
            ));
        }
    }
    Ok(())
}

/// In-process operations.
#[derive(Clone, Copy, Debug)]
enum InProc {
    Jwt,
    Online,
    PresignSign,
    Frost,
    Cggmp21,
}

fn in_process(o: &Opts, what: InProc) -> Result<Row, String> {
    let spec = spec(o, None)?;
    let (n, t) = (o.nodes, o.threshold);
    let (m, params, units): (Measured, Option<(u16, u16)>, u64) = match what {
        InProc::Jwt => (
            load::run_threads("baseline: aws-lc-rs ES256 JWT", spec, ops::jwt_worker)?,
            None,
            1,
        ),
        InProc::Online => (
            load::run_threads("quorate online sign", spec, |w| ops::online_worker(n, t, w))?,
            Some((n, t)),
            1,
        ),
        InProc::PresignSign => (
            load::run_threads("quorate presign+sign", spec, |w| {
                ops::presign_sign_worker(n, t, w)
            })?,
            Some((n, t)),
            u64::from(ops::PRESIGN_BATCH),
        ),
        InProc::Frost => (
            load::run_threads("baseline: FROST-P256 sign", spec, ops::frost_worker)?,
            Some((3, 1)),
            1,
        ),
        InProc::Cggmp21 => (cggmp21(spec)?, Some((3, 1)), 1),
    };
    Ok(Row::new(&m, "in-process", params, units, None))
}

#[cfg(feature = "cggmp21")]
fn cggmp21(spec: LoadSpec) -> Result<Measured, String> {
    load::run_threads("baseline: cggmp21 presign+sign", spec, |w| {
        let mut c = quorate_bench::baselines::Cggmp21::new(0xc66 + w as u64)?;
        Ok(Box::new(move |i| c.presign_and_sign(&ops::digest_for(i))))
    })
}

#[cfg(not(feature = "cggmp21"))]
fn cggmp21(_spec: LoadSpec) -> Result<Measured, String> {
    Err(
        "this quorate-bench was built without the cggmp21 baseline: \
         cargo run --release -p quorate-bench --features cggmp21 -- cggmp21"
            .to_owned(),
    )
}

/// Cluster operations.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    Token,
    Sign,
    /// The same signatures as `Sign`, through the PKCS#11 module.
    Pkcs11Sign,
    Derive,
    Rtt,
}

impl Op {
    fn name(self) -> &'static str {
        match self {
            Op::Token => "token (sustained, presigning included)",
            Op::Sign => "sign (from a full pool)",
            Op::Pkcs11Sign => "sign through PKCS#11 (from a full pool)",
            Op::Derive => "derive",
            Op::Rtt => "baseline: gRPC round trip",
        }
    }

    /// The key whose pool the sampler follows.
    fn key(self) -> &'static str {
        match self {
            Op::Token => quorate_cli::dev::TOKEN_KEY,
            _ => ops::SIGN_KEY,
        }
    }
}

async fn start(o: &Opts) -> Result<Target, String> {
    if o.external {
        return Target::from_env();
    }
    let pools = PoolSettings {
        low: 1,
        high: o.pool.max(1),
        batch: o.batch,
        fill: o.pool as u64,
    };
    eprintln!(
        "starting a local ({},{}) cluster; filling pools of {} presignatures",
        o.nodes, o.threshold, o.pool
    );
    Target::start_local(
        o.nodes,
        o.threshold,
        pools,
        &o.coordinator_args,
        None,
        !o.no_node_evidence,
    )
    .await
}

async fn cluster_ops(o: &Opts, what: &[Op]) -> Result<Vec<Row>, String> {
    let target = start(o).await?;
    let out = drive(o, &target, what).await;
    target.stop().await;
    out
}

async fn drive(o: &Opts, target: &Target, what: &[Op]) -> Result<Vec<Row>, String> {
    let client = target.connect().await?;
    let mut rows = Vec::new();
    for (k, &op) in what.iter().enumerate() {
        let status = Arc::new(Mutex::new(String::new()));
        let mut max_ops = None;
        let mut warmup = o.warmup;
        // Operations that sign from the pool share it: each takes an equal part of what
        // the ones before it left.
        let pooled = |op: &&Op| matches!(op, Op::Sign | Op::Pkcs11Sign);
        let sharing = what
            .get(k..)
            .unwrap_or_default()
            .iter()
            .filter(pooled)
            .count()
            .max(1) as u64;
        match op {
            Op::Pkcs11Sign => {
                if let Some(m) = target.metrics {
                    max_ops = Some(depth_of(m, op.key()).await? * 9 / 10 / sharing);
                }
            }
            Op::Sign => {
                // Sign only from what is pooled: a warm-up of a tenth of the pool, then at
                // most 90 % of what is left, with the refill off (low watermark 1).
                if let Some(m) = target.metrics {
                    let depth = depth_of(m, op.key()).await?;
                    let spec = LoadSpec {
                        concurrency: o.concurrency,
                        warmup: Duration::ZERO,
                        duration: Duration::from_secs_f64(o.warmup.max(0.1)),
                        max_ops: Some(depth / 10 / sharing),
                    };
                    let c = client.clone();
                    load::run_async("sign warm-up", spec, None, move |i| {
                        ops::sign(c.clone(), u64::MAX - i)
                    })
                    .await?;
                    let depth = depth_of(m, op.key()).await?;
                    max_ops = Some(depth * 9 / 10 / sharing);
                    warmup = 0.0;
                }
            }
            Op::Token => drain(o, target, &client).await?,
            Op::Derive => ops::ensure_derive_key(&client).await?,
            Op::Rtt => {}
        }
        if op == Op::Pkcs11Sign {
            let mut row = pkcs11_child(o, target, max_ops).await?;
            row.params = target.params.map(|(n, t)| format!("({n},{t})"));
            rows.push(row);
            continue;
        }
        let spec = spec(
            &Opts {
                warmup,
                ..o.clone()
            },
            max_ops,
        )?;
        let sampler = Sampler::start(
            target.metrics,
            op.key().to_owned(),
            spec.warmup,
            target.is_local(),
            status.clone(),
        );
        let c = client.clone();
        let m = match op {
            Op::Token => {
                let req = Arc::new(ops::token_request(target)?);
                load::run_async(op.name(), spec, Some(status), move |_| {
                    ops::issue_token(c.clone(), req.clone())
                })
                .await?
            }
            Op::Sign => {
                load::run_async(op.name(), spec, Some(status), move |i| {
                    ops::sign(c.clone(), i)
                })
                .await?
            }
            Op::Derive => {
                load::run_async(op.name(), spec, Some(status), move |i| {
                    ops::derive(c.clone(), i)
                })
                .await?
            }
            Op::Rtt => {
                load::run_async(op.name(), spec, Some(status), move |_| ops::ping(c.clone()))
                    .await?
            }
            Op::Pkcs11Sign => return Err("PKCS#11 signing runs in a child process".to_owned()),
        };
        let sampled = sampler.finish().await;
        rows.push(Row::new(&m, "cluster", target.params, 1, Some(sampled)));
    }
    Ok(rows)
}

/// The PKCS#11 module: `--pkcs11-module`, else the one cargo built with this executable
/// (`deps/` holds the build of a dependency, the directory itself that of `cargo build -p
/// quorate-pkcs11`).
fn pkcs11_module(o: &Opts) -> Result<PathBuf, String> {
    if let Some(m) = &o.pkcs11_module {
        return Ok(m.clone());
    }
    let exe = std::env::current_exe().map_err(|e| format!("cannot find this executable: {e}"))?;
    let dir = exe.parent().ok_or("this executable has no directory")?;
    [dir.join("deps"), dir.to_path_buf()]
        .into_iter()
        .map(|d| d.join("libquorate_pkcs11.so"))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            format!(
                "no libquorate_pkcs11.so in {} or its deps/: build it with `cargo build --release \
                 -p quorate-pkcs11` or pass --pkcs11-module",
                dir.display()
            )
        })
}

/// Runs `pkcs11-sign` in a child process whose `QUORATE_*` variables name `target`
/// (the module reads its configuration from its environment when it is initialised) and
/// returns the row it prints.
async fn pkcs11_child(o: &Opts, target: &Target, max_ops: Option<u64>) -> Result<Row, String> {
    let module = pkcs11_module(o)?;
    let exe = std::env::current_exe().map_err(|e| format!("cannot find this executable: {e}"))?;
    let mut cmd = tokio::process::Command::new(exe);
    cmd.arg("pkcs11-sign")
        .arg("--concurrency")
        .arg(o.concurrency.to_string())
        .arg("--duration")
        .arg(o.duration.to_string())
        .arg("--module")
        .arg(&module)
        .env("QUORATE_ADDR", target.config.addr.to_string())
        .env("QUORATE_CACERT", &target.config.ca)
        .env("QUORATE_CERT", &target.config.cert)
        .env("QUORATE_KEY", &target.config.key)
        .env("QUORATE_DOMAIN", &target.domain)
        .env_remove("QUORATE_PKCS11_CONFIG")
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::inherit());
    if let Some(m) = max_ops {
        cmd.arg("--max-ops").arg(m.to_string());
    }
    let out = cmd
        .output()
        .await
        .map_err(|e| format!("cannot run pkcs11-sign: {e}"))?;
    if !out.status.success() {
        return Err(format!("pkcs11-sign failed: {}", out.status));
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .map_err(|e| format!("pkcs11-sign printed something other than a row: {e}"))?;
    let f = |k: &str| v.get(k).and_then(serde_json::Value::as_f64).unwrap_or(0.0);
    let u = |k: &str| v.get(k).and_then(serde_json::Value::as_u64).unwrap_or(0);
    Ok(Row {
        name: Op::Pkcs11Sign.name().to_owned(),
        kind: "cluster",
        params: None,
        concurrency: o.concurrency,
        ops: u("ops"),
        errors: u("errors"),
        first_error: v
            .get("first_error")
            .and_then(serde_json::Value::as_str)
            .map(str::to_owned),
        seconds: f("seconds"),
        units_per_op: 1,
        per_second: f("per_second"),
        p50_us: f("p50_us"),
        p90_us: f("p90_us"),
        p99_us: f("p99_us"),
        p999_us: f("p999_us"),
        mean_us: f("mean_us"),
        presigs_per_sec: None,
        cpu: Vec::new(),
        pool_depth: Vec::new(),
    })
}

/// The `pkcs11-sign` child: loads the module, initialises it (`CKF_OS_LOCKING_OK`), signs
/// with one session per thread, and prints its row as JSON on stdout.
fn pkcs11_sign(o: &Pkcs11Opts) -> Result<(), String> {
    use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
    let pkcs11 = Pkcs11::new(&o.module).map_err(|e| format!("{}: {e}", o.module.display()))?;
    pkcs11
        .initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))
        .map_err(|e| format!("C_Initialize: {e}"))?;
    let spec = LoadSpec {
        concurrency: o.concurrency,
        warmup: Duration::ZERO,
        duration: Duration::from_secs_f64(o.duration.clamp(0.0, 86_400.0)),
        max_ops: o.max_ops,
    };
    let m = load::run_threads(Op::Pkcs11Sign.name(), spec, |_| ops::pkcs11_worker(&pkcs11))?;
    let row = Row::new(&m, "cluster", None, 1, None);
    let json = serde_json::to_string(&row).map_err(|e| e.to_string())?;
    println!("{json}");
    Ok(())
}

/// The pool depth of `key`, all signing sets together.
async fn depth_of(metrics: std::net::SocketAddr, key: &str) -> Result<u64, String> {
    Ok(local::scrape(metrics)
        .await?
        .depth
        .get(key)
        .copied()
        .unwrap_or(0))
}

/// Issues tokens until the token key's pools hold less than one presigning batch, so
/// that the measured rate includes presigning (at most two minutes).
async fn drain(o: &Opts, target: &Target, client: &quorate_client::Client) -> Result<(), String> {
    let Some(metrics) = target.metrics else {
        return Ok(());
    };
    let req = Arc::new(ops::token_request(target)?);
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let depth = depth_of(metrics, quorate_cli::dev::TOKEN_KEY).await?;
        if depth < u64::from(o.batch) || Instant::now() >= deadline {
            return Ok(());
        }
        let spec = LoadSpec {
            concurrency: o.concurrency,
            warmup: Duration::ZERO,
            duration: Duration::from_secs(1),
            max_ops: Some(depth),
        };
        let c = client.clone();
        let r = req.clone();
        let m = load::run_async("draining the token pool", spec, None, move |_| {
            ops::issue_token(c.clone(), r.clone())
        })
        .await?;
        if m.ops == 0
            && let Some(e) = m.first_error
        {
            return Err(format!("token issuance fails: {e}"));
        }
    }
}

fn find<'a>(rows: &'a [Row], prefix: &str) -> Option<&'a Row> {
    rows.iter().find(|r| r.name.starts_with(prefix))
}

/// The arithmetic floor of one presignature at (n,t): the scalar multiplications that
/// `quorate-opcount` counts for a batch of 64 (all parties), each priced at its cost
/// measured here and now, in this process, on one thread.
#[derive(Debug, Clone, Serialize)]
struct ArithmeticFloor {
    fixed_base: f64,
    var_base: f64,
    msm_calls: f64,
    msm_terms: f64,
    mul_g_us: f64,
    mul_us: f64,
    /// One multi-scalar multiplication of the average size (terms ÷ calls, rounded).
    msm_avg_us: f64,
    floor_ms: f64,
}

fn arithmetic_floor(n: u16, t: u16) -> Result<ArithmeticFloor, String> {
    use quorate_crypto::group::{self, Point, random_nonzero};
    use quorate_crypto::opcount;
    use quorate_crypto::sim::Attack;
    const BATCH: u32 = 64;
    let e = |e: quorate_crypto::Error| format!("arithmetic floor: {e}");
    let mut f = quorate_bench::SignFixture::new(n, t, 1).map_err(e)?;
    let (m, s) = (quorate_bench::mset(t), quorate_bench::sset(t));
    opcount::reset();
    f.cluster
        .presign(f.key.key_id, &m, &s, BATCH, Attack::None)
        .map_err(e)?;
    let c = opcount::snapshot();
    let per = |x: u64| x as f64 / f64::from(BATCH);
    let (fixed_base, var_base) = (per(c.fixed_base), per(c.var_base));
    let (msm_calls, msm_terms) = (per(c.msm_calls), per(c.msm_terms));
    let mut rng = quorate_bench::rng(0xf1);
    let scalars: Vec<_> = (0..200).map(|_| random_nonzero(&mut rng)).collect();
    let time_us = |reps: usize, f: &mut dyn FnMut()| {
        let start = Instant::now();
        for _ in 0..reps {
            f();
        }
        start.elapsed().as_secs_f64() * 1e6 / reps.max(1) as f64
    };
    let points: Vec<Point> = scalars
        .iter()
        .filter_map(|k| Point::new(group::mul_g(k)))
        .collect();
    let mut pairs = points.iter().zip(&scalars).cycle();
    let mul_g_us = time_us(200, &mut || {
        if let Some((_, k)) = pairs.next() {
            std::hint::black_box(group::mul_g(k));
        }
    });
    let mul_us = time_us(100, &mut || {
        if let Some((p, k)) = pairs.next() {
            std::hint::black_box(group::mul(p, k));
        }
    });
    let size = if msm_calls > 0.0 {
        (msm_terms / msm_calls).round().max(1.0) as usize
    } else {
        1
    };
    let terms: Vec<_> = points
        .iter()
        .zip(&scalars)
        .take(size)
        .map(|(p, k)| (p.projective(), *k))
        .collect();
    let msm_avg_us = time_us(50, &mut || {
        std::hint::black_box(group::msm(&terms));
    });
    let floor_ms = (fixed_base * mul_g_us + var_base * mul_us + msm_calls * msm_avg_us) / 1_000.0;
    Ok(ArithmeticFloor {
        fixed_base,
        var_base,
        msm_calls,
        msm_terms,
        mul_g_us,
        mul_us,
        msm_avg_us,
        floor_ms,
    })
}

async fn compare(o: &Opts, results: &mut Results) -> Result<(), String> {
    // In-process first, while no cluster competes for the CPU.
    let floor = arithmetic_floor(o.nodes, o.threshold)?;
    results.rows.push(in_process(o, InProc::Jwt)?);
    results.rows.push(in_process(o, InProc::Online)?);
    results.rows.push(in_process(o, InProc::PresignSign)?);
    results.rows.push(in_process(o, InProc::Frost)?);
    if cfg!(feature = "cggmp21") {
        results.rows.push(in_process(o, InProc::Cggmp21)?);
    }
    results
        .rows
        .extend(cluster_ops(o, &[Op::Rtt, Op::Sign, Op::Pkcs11Sign, Op::Token]).await?);
    if !o.external && !o.no_node_evidence {
        // The same build and load with the nodes' evidence check off: what DESIGN.md §9's
        // node-side enforcement costs.
        let off = Opts {
            no_node_evidence: true,
            ..o.clone()
        };
        for mut row in cluster_ops(&off, &[Op::Token]).await? {
            row.name = format!("baseline: {} with node evidence off", row.name);
            results.rows.push(row);
        }
    }
    let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { f64::NAN };
    // A verdict needs both sides measured.
    let rows: Vec<Row> = results.rows.iter().filter(|r| r.ops > 0).cloned().collect();
    let rows = &rows;
    if let (Some(tok), Some(jwt)) = (find(rows, "token"), find(rows, "baseline: aws-lc-rs")) {
        let r = ratio(tok.per_second, jwt.per_second);
        let formula = format!(
            "token {:.1}/s ÷ aws-lc-rs JWT {:.0}/s",
            tok.per_second, jwt.per_second
        );
        results.verdicts.push(Verdict::at_least(
            "sustained token issuance ≥ 2 % of single-key JWT signing",
            formula.clone(),
            r,
            0.02,
        ));
        results.verdicts.push(Verdict::at_least(
            "goal: sustained token issuance ≥ 10 % of single-key JWT signing",
            formula,
            r,
            0.10,
        ));
    }
    if let (Some(p11), Some(grpc)) = (find(rows, "sign through PKCS#11"), find(rows, "sign (")) {
        // Not a target: what the PKCS#11 layer (C ABI, its own runtime, a session per
        // thread) costs or saves against the gRPC client, same cluster, same run.
        results.verdicts.push(Verdict::at_least(
            "measured: signatures through the PKCS#11 module ÷ through the gRPC client (no target)",
            format!("{:.0}/s ÷ {:.0}/s", p11.per_second, grpc.per_second),
            ratio(p11.per_second, grpc.per_second),
            0.0,
        ));
    }
    if let (Some(on), Some(off)) = (find(rows, "token"), find(rows, "baseline: token")) {
        // Not a target: the cost of node-side evidence checks, reported as a ratio.
        results.verdicts.push(Verdict::at_least(
            "measured: sustained tokens with node evidence checks ÷ without (no target)",
            format!("{:.1}/s ÷ {:.1}/s", on.per_second, off.per_second),
            ratio(on.per_second, off.per_second),
            0.0,
        ));
    }
    if let (Some(sign), Some(rtt)) = (find(rows, "sign (from"), find(rows, "baseline: gRPC")) {
        results.verdicts.push(Verdict::at_most(
            "online signing p50 ≤ 2× bare gRPC round trip",
            format!("p50 {:.0} µs ÷ {:.0} µs", sign.p50_us, rtt.p50_us),
            ratio(sign.p50_us, rtt.p50_us),
            2.0,
        ));
        results.verdicts.push(Verdict::at_most(
            "online signing p99 ≤ 4× bare gRPC round trip",
            format!("p99 {:.0} µs ÷ {:.0} µs", sign.p99_us, rtt.p99_us),
            ratio(sign.p99_us, rtt.p99_us),
            4.0,
        ));
    }
    if let Some(tok) = find(rows, "token").filter(|r| !r.cpu.is_empty()) {
        // Everything the cluster's processes spent, presigning included, over the
        // presignatures made meanwhile (one per token at steady state).
        let cluster_cpu: f64 = tok
            .cpu
            .iter()
            .filter(|c| !c.process.starts_with("bench"))
            .map(|c| c.cpu_seconds)
            .sum();
        let made = tok.presigs_per_sec.unwrap_or(0.0) * tok.seconds;
        let per_presig_ms = if made > 0.0 {
            cluster_cpu * 1e3 / made
        } else {
            f64::NAN
        };
        results.verdicts.push(Verdict::at_least(
            "measured: cluster CPU per presignature during `token` ÷ its arithmetic floor (no target)",
            format!(
                "{per_presig_ms:.2} ms ÷ {:.2} ms (per presignature: {:.1} k·G at {:.1} µs, {:.1} k·P at {:.1} µs, {:.1} MSMs of {:.0} terms at {:.0} µs)",
                floor.floor_ms,
                floor.fixed_base,
                floor.mul_g_us,
                floor.var_base,
                floor.mul_us,
                floor.msm_calls,
                floor.msm_terms / floor.msm_calls.max(1.0),
                floor.msm_avg_us
            ),
            ratio(per_presig_ms, floor.floor_ms),
            0.0,
        ));
    }
    if let (Some(ours), Some(frost)) = (find(rows, "quorate online"), find(rows, "baseline: FROST"))
    {
        results.verdicts.push(Verdict::at_least(
            "in-process online signing ≥ FROST-P256 2-of-3 signing rate",
            format!("{:.0}/s ÷ {:.0}/s", ours.per_second, frost.per_second),
            ratio(ours.per_second, frost.per_second),
            1.0,
        ));
    }
    if let (Some(ours), Some(cg)) = (
        find(rows, "quorate presign+sign"),
        find(rows, "baseline: cggmp21"),
    ) {
        results.verdicts.push(Verdict::at_least(
            "presign+sign ≥ 100× cggmp21 2-of-3 presign+sign (in process)",
            format!("{:.1}/s ÷ {:.3}/s", ours.per_second, cg.per_second),
            ratio(ours.per_second, cg.per_second),
            100.0,
        ));
    }
    Ok(())
}

/// One (n,t) of the scaling run.
#[derive(Debug, Serialize)]
struct ScalingRow {
    params: String,
    /// Presignatures made per second while filling the pools (all keys).
    presigs_per_sec: f64,
    /// CPU seconds (all processes) per presignature while filling.
    cpu_ms_per_presig: f64,
    /// Bytes on disk per presignature per node (store size growth ÷ presignatures held).
    disk_bytes_per_presig: f64,
    sign: Row,
    rtt: Row,
}

fn parse_params(s: &str) -> Result<(u16, u16), String> {
    let (n, t) = s
        .split_once(',')
        .ok_or_else(|| format!("--params {s:?}: expected n,t"))?;
    let n = n
        .trim()
        .parse()
        .map_err(|e| format!("--params {s:?}: n: {e}"))?;
    let t = t
        .trim()
        .parse()
        .map_err(|e| format!("--params {s:?}: t: {e}"))?;
    Ok((n, t))
}

/// Total size of the files under `dir`.
fn dir_bytes(dir: &std::path::Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_bytes(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

/// Waits until every pool of every signing key holds `per_pool`, reporting progress;
/// returns (presignatures made, seconds, CPU seconds of all processes) from the first
/// presignature on.
async fn wait_full(
    metrics: std::net::SocketAddr,
    keys: &[&str],
    pools_per_key: u64,
    per_pool: u64,
    limit: Duration,
) -> Result<(u64, f64, f64), String> {
    let target = per_pool * pools_per_key;
    let deadline = Instant::now() + limit;
    let mut first: Option<(Instant, u64, f64)> = None;
    loop {
        let s = local::scrape(metrics).await?;
        let now = Instant::now();
        let cpu = local::cluster_cpu_seconds();
        if first.is_none() && s.presigs_made > 0 {
            first = Some((now, s.presigs_made, cpu));
        }
        let least = keys
            .iter()
            .map(|k| s.depth.get(*k).copied().unwrap_or(0))
            .min()
            .unwrap_or(0);
        eprint!(
            "\r  filling pools: {least}/{target} per key, {} made   ",
            s.presigs_made
        );
        if least >= target || now >= deadline {
            eprintln!();
            let (t0, m0, c0) = first.unwrap_or((now, 0, cpu));
            return Ok((
                s.presigs_made.saturating_sub(m0),
                now.duration_since(t0).as_secs_f64(),
                cpu - c0,
            ));
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

async fn scaling(o: &ScalingOpts) -> Result<Vec<ScalingRow>, String> {
    let mut out = Vec::new();
    for p in &o.params {
        let (n, t) = parse_params(p)?;
        let pools = PoolSettings {
            low: 1,
            high: o.pool.max(1),
            batch: o.batch,
            fill: 0,
        };
        eprintln!("({n},{t}): starting a local cluster");
        let target = Target::start_local(n, t, pools, &[], None, true).await?;
        let result = scale_one(o, &target, n, t).await;
        target.stop().await;
        out.push(result?);
    }
    Ok(out)
}

async fn scale_one(o: &ScalingOpts, target: &Target, n: u16, t: u16) -> Result<ScalingRow, String> {
    let metrics = target.metrics.ok_or("no metrics address")?;
    let dir = target.dir.clone().ok_or("no cluster directory")?;
    let disk0 = dir_bytes(&dir.join("node-1"));
    let (made, secs, cpu) = wait_full(
        metrics,
        &[ops::SIGN_KEY, quorate_cli::dev::TOKEN_KEY],
        u64::from(n),
        o.pool as u64,
        Duration::from_secs(1800),
    )
    .await?;
    let disk1 = dir_bytes(&dir.join("node-1"));
    let total = local::scrape(metrics).await?.presigs_made;
    // Node 1 is in t+1 of the n cyclic signing sets and keeps only their shares.
    let held = total as f64 * f64::from(t + 1) / f64::from(n);
    let opts = Opts {
        concurrency: o.concurrency,
        duration: o.duration,
        warmup: 1.0,
        nodes: n,
        threshold: t,
        pool: o.pool,
        batch: o.batch,
        external: false,
        json: None,
        strict: false,
        coordinator_args: Vec::new(),
        no_node_evidence: false,
        pkcs11_module: None,
    };
    let mut rows = drive(&opts, target, &[Op::Rtt, Op::Sign]).await?;
    let sign = rows.pop().ok_or("no sign row")?;
    let rtt = rows.pop().ok_or("no rtt row")?;
    Ok(ScalingRow {
        params: format!("({n},{t})"),
        presigs_per_sec: if secs > 0.0 { made as f64 / secs } else { 0.0 },
        cpu_ms_per_presig: if made > 0 {
            1000.0 * cpu / made as f64
        } else {
            0.0
        },
        disk_bytes_per_presig: if held > 0.0 {
            disk1.saturating_sub(disk0) as f64 / held
        } else {
            0.0
        },
        sign,
        rtt,
    })
}

fn scaling_table(rows: &[ScalingRow]) -> String {
    let mut s = String::from(
        "| (n,t) | presigs/s (cluster) | CPU ms per presig (all processes) | node-1 disk bytes per presig | sign p50 | sign p99 | gRPC RTT p50 | RTT p99 | p50 ÷ RTT | p99 ÷ RTT |\n\
         | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n",
    );
    for r in rows {
        s.push_str(&format!(
            "| {} | {:.1} | {:.1} | {:.0} | {:.0} µs | {:.0} µs | {:.0} µs | {:.0} µs | {:.2} | {:.2} |\n",
            r.params,
            r.presigs_per_sec,
            r.cpu_ms_per_presig,
            r.disk_bytes_per_presig,
            r.sign.p50_us,
            r.sign.p99_us,
            r.rtt.p50_us,
            r.rtt.p99_us,
            r.sign.p50_us / r.rtt.p50_us.max(1e-9),
            r.sign.p99_us / r.rtt.p99_us.max(1e-9),
        ));
    }
    s
}

/// The storage run's findings.
#[derive(Debug, Serialize)]
struct StorageResult {
    params: String,
    /// Presignatures made in all.
    made: u64,
    /// Unused presignatures node 1 holds (its signing sets' share).
    held_by_node1: f64,
    /// The logical record: presignature id (key) + nonce + tag + tag byte + secret share.
    logical_bytes: usize,
    /// Node 1's store growth ÷ presignatures it holds.
    disk_bytes_per_presig: f64,
    /// Node 1's resident set at the end, MiB.
    node1_rss_mib: f64,
    /// Node 1's peak resident set, MiB.
    node1_peak_rss_mib: f64,
    /// The coordinator's resident set at the end, MiB.
    coordinator_rss_mib: f64,
    /// Seconds the fill took.
    fill_seconds: f64,
    /// (held by node 1, node RSS MiB, disk bytes) along the way.
    series: Vec<(f64, f64, u64)>,
}

async fn storage(o: &StorageOpts) -> Result<StorageResult, String> {
    let (n, t) = (o.nodes, o.threshold);
    // Node 1 holds t+1 of every n presignatures; two keys share the pools.
    let total = o.presigs * u64::from(n) / u64::from(t + 1);
    let per_pool = total.div_ceil(2 * u64::from(n));
    let pools = PoolSettings {
        low: 1,
        high: usize::try_from(per_pool).map_err(|_| "--presigs too large")?,
        batch: o.batch,
        fill: 0,
    };
    eprintln!(
        "({n},{t}): starting a local cluster to pool {} presignatures in all",
        total
    );
    let target = Target::start_local(n, t, pools, &[], None, true).await?;
    let result = storage_run(o, &target, per_pool).await;
    target.stop().await;
    result
}

async fn storage_run(
    o: &StorageOpts,
    target: &Target,
    per_pool: u64,
) -> Result<StorageResult, String> {
    let (n, t) = (o.nodes, o.threshold);
    let metrics = target.metrics.ok_or("no metrics address")?;
    let dir = target.dir.clone().ok_or("no cluster directory")?;
    let node1 = local::children_named("node-1")
        .into_iter()
        .next()
        .ok_or("node-1 is not a child of this process")?;
    let coordinator = local::children_named("coordinator")
        .into_iter()
        .next()
        .ok_or("the coordinator is not a child of this process")?;
    let disk0 = dir_bytes(&dir.join("node-1"));
    let started = Instant::now();
    let mut series = Vec::new();
    let mut next_mark = 0.0;
    let keys = [ops::SIGN_KEY, quorate_cli::dev::TOKEN_KEY];
    let share = f64::from(t + 1) / f64::from(n);
    loop {
        let s = local::scrape(metrics).await?;
        let least = keys
            .iter()
            .map(|k| s.depth.get(*k).copied().unwrap_or(0))
            .min()
            .unwrap_or(0);
        let held = s.presigs_made as f64 * share;
        if held >= next_mark {
            let rss = local::rss_kib(node1).unwrap_or(0) as f64 / 1024.0;
            series.push((held, rss, dir_bytes(&dir.join("node-1"))));
            next_mark += o.presigs as f64 / 10.0;
        }
        eprint!(
            "\r  pooling: node 1 holds {held:.0} of {}; {:.0} s   ",
            o.presigs,
            started.elapsed().as_secs_f64()
        );
        if least >= per_pool * u64::from(n) {
            eprintln!();
            break;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    // Let the last batch settle and the allocator reach its steady state.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let made = local::scrape(metrics).await?.presigs_made;
    let held = made as f64 * share;
    let disk = dir_bytes(&dir.join("node-1"));
    let node1_rss = local::rss_kib(node1).unwrap_or(0) as f64 / 1024.0;
    series.push((held, node1_rss, disk));
    let fixture = quorate_bench::SignFixture::new(n, t, 1).map_err(|e| e.to_string())?;
    let signer = fixture.first_signer().map_err(|e| e.to_string())?;
    let logical = match fixture.record(signer).map_err(|e| e.to_string())? {
        quorate_crypto::sign::PresigRecord::Unused(p) => {
            // Key (id) + nonce + record tag + secret encoding + GCM tag.
            p.id.0.len() + 12 + 1 + p.secret_bytes().len() + 16
        }
        quorate_crypto::sign::PresigRecord::Consumed(_) => 0,
    };
    Ok(StorageResult {
        params: format!("({n},{t})"),
        made,
        held_by_node1: held,
        logical_bytes: logical,
        disk_bytes_per_presig: disk.saturating_sub(disk0) as f64 / held.max(1.0),
        node1_rss_mib: node1_rss,
        node1_peak_rss_mib: local::peak_rss_kib(node1).unwrap_or(0) as f64 / 1024.0,
        coordinator_rss_mib: local::rss_kib(coordinator).unwrap_or(0) as f64 / 1024.0,
        fill_seconds: started.elapsed().as_secs_f64(),
        series,
    })
}

fn storage_table(s: &StorageResult) -> String {
    let mut out = format!(
        "| (n,t) | presigs made | held by node 1 | logical bytes per record | node-1 disk bytes per presig | node-1 RSS | node-1 peak RSS | coordinator RSS | fill time |\n\
         | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n\
         | {} | {} | {:.0} | {} | {:.0} | {:.1} MiB | {:.1} MiB | {:.1} MiB | {:.0} s |\n\nalong the way (held, node-1 RSS MiB, node-1 store bytes):",
        s.params,
        s.made,
        s.held_by_node1,
        s.logical_bytes,
        s.disk_bytes_per_presig,
        s.node1_rss_mib,
        s.node1_peak_rss_mib,
        s.coordinator_rss_mib,
        s.fill_seconds
    );
    for (held, rss, disk) in &s.series {
        out.push_str(&format!(" ({held:.0}, {rss:.1}, {disk})"));
    }
    out
}
