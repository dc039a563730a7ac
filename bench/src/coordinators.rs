//! `quorate-bench coordinators`: token issuance per second with one coordinator on the
//! embedded redb store against one, two and three coordinators sharing one PostgreSQL
//! store (`coordinator/STORE.md`), all in the same run.
//!
//! Each configuration is a fresh local `(n, t)` cluster of real processes (the same as
//! `quorate dev`). For PostgreSQL, a real server is started first (Debian's `initdb` and
//! `pg_ctl`, Unix socket only: `quorate_tests::postgres`), migrated with `coordinator
//! migrate`, and the first coordinator gets `--store <url>`; every further coordinator
//! runs with the first one's exact command line except its listeners, its data directory
//! and its audit file. The load (IssueToken over gRPC, post-quantum mutual TLS) is spread
//! over the coordinators: worker `w` talks to coordinator `w mod k` over a connection of
//! its own. Each coordinator keeps its own presignature pools, refilled while the run
//! lasts, so the figure is the sustained rate with presigning included.
//!
//! All processes share this machine's cores: more coordinators add serving capacity only
//! where the cores are not already busy, so the ratios say what the shared store costs
//! here, not how far coordinators scale across hosts.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Args;
use quorate_client::Client;
use serde::Serialize;
use tokio::io::AsyncBufReadExt as _;

use crate::load::{self, LoadSpec};
use crate::local::{self, PoolSettings, Sampler, Target};
use crate::ops;
use crate::report::Row;

/// Options of `quorate-bench coordinators`.
#[derive(Debug, Clone, Args)]
pub struct Opts {
    /// Workers (tokio tasks), spread evenly over the coordinators of a configuration
    #[arg(long, default_value_t = 8)]
    pub concurrency: usize,
    /// Measured seconds per configuration
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    /// Unmeasured warm-up seconds per configuration (drains the first pools)
    #[arg(long, default_value_t = 3.0)]
    pub warmup: f64,
    /// Coordinator counts to measure on the PostgreSQL store, e.g. `1,2,3`
    #[arg(long, value_delimiter = ',', default_values_t = [1u16, 2, 3])]
    pub postgres: Vec<u16>,
    /// Fragment nodes
    #[arg(long, default_value_t = 3)]
    pub nodes: u16,
    /// Threshold t
    #[arg(long, default_value_t = 1)]
    pub threshold: u16,
    /// Each coordinator refills a pool (key and signing set) below this many presignatures
    #[arg(long, default_value_t = 16)]
    pub pool_low: usize,
    /// … up to this many
    #[arg(long, default_value_t = 64)]
    pub pool_high: usize,
    /// Presignatures per presigning session
    #[arg(long, default_value_t = 32)]
    pub batch: u32,
    /// Write the results as JSON here
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Exit with an error if any configuration had a failed operation or none completed
    /// (for CI)
    #[arg(long)]
    pub strict: bool,
}

/// One measured configuration.
#[derive(Clone, Debug, Serialize)]
pub struct StoreRow {
    /// `redb` or `postgres`.
    pub store: &'static str,
    /// Coordinators serving at once.
    pub coordinators: u16,
    /// The measured run (tokens per second in `per_second`).
    pub row: Row,
    /// `per_second` over that of one coordinator on redb.
    pub ratio_to_redb: Option<f64>,
}

/// What `coordinators` measured.
#[derive(Debug, Serialize)]
pub struct Results {
    /// The command line.
    pub command: Vec<String>,
    /// Logical CPUs of this machine (every process shares them).
    pub cpus: usize,
    /// One row per configuration, redb first.
    pub rows: Vec<StoreRow>,
}

/// Runs every configuration, prints the table on stdout, and writes `--json`.
#[allow(
    clippy::print_stdout,
    reason = "a command's report: the table on stdout is the program's output"
)]
pub async fn run(o: &Opts) -> Result<(), String> {
    if o.concurrency == 0 || o.concurrency > 4096 {
        return Err(format!("--concurrency {}: 1 to 4096", o.concurrency));
    }
    if let Some(k) = o.postgres.iter().find(|k| !(1..=16).contains(*k)) {
        return Err(format!("--postgres {k}: coordinator counts from 1 to 16"));
    }
    if o.pool_low == 0 || o.pool_high < o.pool_low {
        return Err(format!(
            "--pool-low {} --pool-high {}: need 1 <= low <= high",
            o.pool_low, o.pool_high
        ));
    }
    let spec = LoadSpec {
        concurrency: o.concurrency,
        warmup: seconds("warmup", o.warmup)?,
        duration: seconds("duration", o.duration)?,
        max_ops: None,
    };
    let mut rows = Vec::new();
    let redb = measure(o, spec, None).await?;
    rows.push(StoreRow {
        store: "redb",
        coordinators: 1,
        row: redb,
        ratio_to_redb: Some(1.0),
    });
    for &k in &o.postgres {
        let row = measure(o, spec, Some(k)).await?;
        rows.push(StoreRow {
            store: "postgres",
            coordinators: k,
            row,
            ratio_to_redb: None,
        });
    }
    let base = rows.first().map_or(0.0, |r| r.row.per_second);
    for r in &mut rows {
        r.ratio_to_redb = (base > 0.0).then(|| r.row.per_second / base);
    }
    print!("{}", table(&rows));
    let results = Results {
        command: std::env::args().collect(),
        cpus: std::thread::available_parallelism().map_or(0, usize::from),
        rows,
    };
    if let Some(path) = &o.json {
        let text = serde_json::to_string_pretty(&results)
            .map_err(|e| format!("cannot encode the results: {e}"))?;
        std::fs::write(path, text).map_err(|e| format!("{}: {e}", path.display()))?;
        eprintln!("results written to {}", path.display());
    }
    if o.strict {
        let failed: Vec<String> = results
            .rows
            .iter()
            .filter(|r| r.row.ops == 0 || r.row.errors > 0)
            .map(|r| {
                format!(
                    "{} x{} ({} ok, {} failed: {})",
                    r.store,
                    r.coordinators,
                    r.row.ops,
                    r.row.errors,
                    r.row.first_error.as_deref().unwrap_or("-")
                )
            })
            .collect();
        if !failed.is_empty() {
            return Err(format!("--strict: failing runs: {}", failed.join(", ")));
        }
    }
    Ok(())
}

fn seconds(name: &str, v: f64) -> Result<Duration, String> {
    if v.is_finite() && (0.0..=86_400.0).contains(&v) {
        Ok(Duration::from_secs_f64(v))
    } else {
        Err(format!("--{name} {v}: seconds from 0 to 86400"))
    }
}

/// The markdown table: one line per configuration, with the ratio to redb.
pub fn table(rows: &[StoreRow]) -> String {
    let mut out = String::from(
        "| store | coordinators | workers | tokens/s | ratio to redb x1 | p50 ms | p99 ms | ok | failed |\n\
         | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n",
    );
    for r in rows {
        out.push_str(&format!(
            "| {} | {} | {} | {:.1} | {} | {:.1} | {:.1} | {} | {} |\n",
            r.store,
            r.coordinators,
            r.row.concurrency,
            r.row.per_second,
            r.ratio_to_redb
                .map_or_else(|| "-".to_owned(), |x| format!("{x:.2}")),
            r.row.p50_us / 1000.0,
            r.row.p99_us / 1000.0,
            r.row.ops,
            r.row.errors,
        ));
    }
    out
}

/// One configuration: redb (`postgres: None`) or `k` coordinators over PostgreSQL.
async fn measure(o: &Opts, spec: LoadSpec, postgres: Option<u16>) -> Result<Row, String> {
    let label = match postgres {
        None => "redb, 1 coordinator".to_owned(),
        Some(k) => format!("postgres, {k} coordinator(s)"),
    };
    eprintln!("== {label}");
    let pg = match postgres {
        Some(_) => Some(start_postgres()?),
        None => None,
    };
    let mut coordinator_args = Vec::new();
    if let Some(pg) = &pg {
        migrate(&pg.url()).await?;
        coordinator_args = vec!["--store".to_owned(), pg.url()];
    }
    let pools = PoolSettings {
        low: o.pool_low,
        high: o.pool_high,
        batch: o.batch,
        fill: o.pool_low as u64,
    };
    let target =
        Target::start_local(o.nodes, o.threshold, pools, &coordinator_args, None, true).await?;
    let out = drive(o, spec, &target, postgres.unwrap_or(1), &label).await;
    target.stop().await;
    drop(pg);
    out
}

async fn drive(
    o: &Opts,
    spec: LoadSpec,
    target: &Target,
    k: u16,
    label: &str,
) -> Result<Row, String> {
    // Further coordinators: the first one's command line, with listeners of their own.
    let mut extra = Vec::new();
    let mut addrs = vec![target.config.addr];
    for i in 2..=k {
        let c = spawn_like_first(target, i).await?;
        eprintln!("coordinator {i} listening on {}", c.addr);
        addrs.push(c.addr);
        extra.push(c);
    }
    // One connection per worker, to coordinator `w mod k`.
    let mut clients = Vec::with_capacity(o.concurrency);
    for w in 0..o.concurrency {
        let mut config = target.config.clone();
        config.addr = addrs
            .get(w % addrs.len())
            .copied()
            .ok_or("no coordinator address")?;
        let c = Client::connect(&config)
            .await
            .map(|c| c.with_timeout(Duration::from_secs(60)))
            .map_err(|e| format!("cannot connect to {}: {e}", config.addr))?;
        clients.push(c);
    }
    let clients = Arc::new(clients);
    let req = Arc::new(ops::token_request(target)?);
    let status = Arc::new(Mutex::new(String::new()));
    let sampler = Sampler::start(
        target.metrics,
        quorate_cli::dev::TOKEN_KEY.to_owned(),
        spec.warmup,
        target.is_local(),
        status.clone(),
    );
    let name = format!("token ({label})");
    let m = load::run_async(&name, spec, Some(status), move |i| {
        // run_async numbers worker w's operations from w << 40.
        let w = usize::try_from(i >> 40).unwrap_or(0);
        let client = clients.get(w % clients.len().max(1)).cloned();
        let req = req.clone();
        async move {
            match client {
                Some(c) => ops::issue_token(c, req).await,
                None => Err("no client for this worker".to_owned()),
            }
        }
    })
    .await?;
    let sampled = sampler.finish().await;
    drop(extra);
    Ok(Row::new(
        &m,
        "cluster",
        Some((o.nodes, o.threshold)),
        1,
        Some(sampled),
    ))
}

/// The PostgreSQL server of one configuration.
fn start_postgres() -> Result<quorate_tests::postgres::Postgres, String> {
    quorate_tests::postgres::Postgres::start("bench").ok_or_else(|| {
        "PostgreSQL server binaries not found under /usr/lib/postgresql/*/bin \
         (Debian package `postgresql`): install it to measure the PostgreSQL store"
            .to_owned()
    })
}

/// `coordinator migrate --store URL`, through this executable's hidden subcommand.
async fn migrate(url: &str) -> Result<(), String> {
    let exe = std::env::current_exe().map_err(|e| format!("cannot find this executable: {e}"))?;
    let out = tokio::process::Command::new(exe)
        .args(["coordinator", "migrate", "--store", url])
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .map_err(|e| format!("cannot run coordinator migrate: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "coordinator migrate failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// A further coordinator, stopped (SIGKILL) on drop.
struct Extra {
    addr: SocketAddr,
    _child: tokio::process::Child,
}

/// Starts coordinator `i` with the first coordinator's command line (read from
/// `/proc/<pid>/cmdline`), on free loopback ports, with `coordinator-<i>` as its data
/// directory and `audit-<i>.jsonl` as its audit file.
async fn spawn_like_first(target: &Target, i: u16) -> Result<Extra, String> {
    let pid = *local::children_named("coordinator")
        .first()
        .ok_or("the first coordinator's process was not found")?;
    let raw = std::fs::read(format!("/proc/{pid}/cmdline"))
        .map_err(|e| format!("cannot read the first coordinator's command line: {e}"))?;
    let mut args: Vec<String> = raw
        .split(|b| *b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    if args.is_empty() {
        return Err("the first coordinator's command line is empty".to_owned());
    }
    let program = args.remove(0);
    let dir = target
        .dir
        .as_deref()
        .ok_or("a local cluster has a directory")?;
    let http_port = free_port()?;
    let metrics_port = free_port()?;
    let data_dir = dir.join(format!("coordinator-{i}"));
    let audit = format!("file:{}", dir.join(format!("audit-{i}.jsonl")).display());
    let replacements: [(&str, String); 5] = [
        ("--listen", "127.0.0.1:0".to_owned()),
        ("--http-listen", format!("127.0.0.1:{http_port}")),
        ("--metrics-listen", format!("127.0.0.1:{metrics_port}")),
        ("--data-dir", data_dir.display().to_string()),
        ("--audit-sink", audit),
    ];
    for (flag, value) in &replacements {
        replace_value(&mut args, flag, value);
    }
    let log_path = dir.join("logs").join(format!("coordinator-{i}.log"));
    let log =
        std::fs::File::create(&log_path).map_err(|e| format!("{}: {e}", log_path.display()))?;
    let mut child = tokio::process::Command::new(program)
        .args(&args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("cannot start coordinator {i}: {e}"))?;
    let stdout = child
        .stdout
        .take()
        .ok_or("the coordinator's stdout is not piped")?;
    let addr = ready_addr(stdout, &log_path).await?;
    Ok(Extra {
        addr,
        _child: child,
    })
}

/// Replaces the value of `flag` (as `--flag value` or `--flag=value`).
fn replace_value(args: &mut [String], flag: &str, value: &str) {
    let eq = format!("{flag}=");
    let mut k = 0;
    while k < args.len() {
        if args.get(k).is_some_and(|a| a == flag) {
            if let Some(v) = args.get_mut(k + 1) {
                *v = value.to_owned();
            }
            k += 2;
            continue;
        }
        if let Some(a) = args.get_mut(k)
            && a.starts_with(&eq)
        {
            *a = format!("{eq}{value}");
        }
        k += 1;
    }
}

/// Waits for the coordinator's `QUORATE_READY coordinator addr=…` line.
async fn ready_addr(stdout: tokio::process::ChildStdout, log: &Path) -> Result<SocketAddr, String> {
    let mut lines = tokio::io::BufReader::new(stdout).lines();
    let deadline = Instant::now() + Duration::from_secs(120);
    let read = async {
        while let Ok(Some(line)) = lines.next_line().await {
            let mut words = line.split_whitespace();
            if words.next() != Some("QUORATE_READY") {
                continue;
            }
            let words: Vec<&str> = words.collect();
            if words.contains(&"coordinator")
                && let Some(addr) = words
                    .iter()
                    .find_map(|w| w.strip_prefix("addr="))
                    .and_then(|a| a.parse().ok())
            {
                return Some((addr, lines));
            }
        }
        None
    };
    match tokio::time::timeout_at(deadline.into(), read).await {
        Ok(Some((addr, mut lines))) => {
            // Keep reading so that the child never blocks on a full pipe.
            tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
            Ok(addr)
        }
        Ok(None) => Err(format!(
            "a further coordinator stopped before it was ready; see {}",
            log.display()
        )),
        Err(_) => Err(format!(
            "a further coordinator was not ready within 120 s; see {}",
            log.display()
        )),
    }
}

fn free_port() -> Result<u16, String> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| format!("no free loopback port: {e}"))
}

#[cfg(test)]
mod tests {
    use super::replace_value;

    #[test]
    fn replaces_both_spellings_of_a_flag() {
        let mut args: Vec<String> = ["--listen", "a", "--data-dir=b", "--node", "1=x"]
            .iter()
            .map(|s| (*s).to_owned())
            .collect();
        replace_value(&mut args, "--listen", "L");
        replace_value(&mut args, "--data-dir", "D");
        replace_value(&mut args, "--absent", "Z");
        assert_eq!(args, ["--listen", "L", "--data-dir=D", "--node", "1=x"]);
    }
}
