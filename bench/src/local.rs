//! The cluster a run drives: a local one started here (the same processes as
//! `quorate dev`), or one named by the `QUORATE_*` environment; and what is sampled from
//! it while a run lasts — presignatures made, pool depth, CPU per process.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use quorate_cli::dev::{DevCluster, DevOptions};
use quorate_client::{Client, ClientConfig};
use serde::Serialize;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// Pool settings of a local cluster.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PoolSettings {
    /// Refill a pool when it falls below this.
    pub low: usize,
    /// Refill up to this.
    pub high: usize,
    /// Presignatures per presigning session.
    pub batch: u32,
    /// Wait until every pool of the dev keys holds this many before starting (0: no).
    pub fill: u64,
}

/// A cluster to drive.
pub struct Target {
    /// The admin client configuration.
    pub config: ClientConfig,
    /// The cluster directory of a local cluster (dev issuer key, policy), if local.
    pub dir: Option<PathBuf>,
    /// The trust domain.
    pub domain: String,
    /// The coordinator's metrics endpoint, if known.
    pub metrics: Option<SocketAddr>,
    /// `(n, t)`, if known.
    pub params: Option<(u16, u16)>,
    local: Option<DevCluster>,
    _tmp: Option<tempfile::TempDir>,
}

/// A free loopback port (bound and released; a small race with other processes).
fn free_port() -> Result<u16, String> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| format!("no free loopback port: {e}"))
}

impl Target {
    /// Starts a local `(n, t)` cluster in `dir` (a fresh temporary directory if `None`)
    /// with the given pool settings and extra coordinator arguments, as separate
    /// processes of this executable. With `node_evidence` off (bench-only), the nodes
    /// check rules and ceilings but not the evidence behind each token.
    pub async fn start_local(
        n: u16,
        t: u16,
        pools: PoolSettings,
        coordinator_args: &[String],
        dir: Option<&Path>,
        node_evidence: bool,
    ) -> Result<Target, String> {
        let (tmp, dir) = match dir {
            Some(d) => (None, d.to_owned()),
            None => {
                let tmp = tempfile::Builder::new()
                    .prefix("quorate-bench-")
                    .tempdir()
                    .map_err(|e| format!("cannot create a temporary cluster directory: {e}"))?;
                let d = tmp.path().to_owned();
                (Some(tmp), d)
            }
        };
        let metrics_port = free_port()?;
        let mut opts = DevOptions::new(&dir);
        opts.nodes = n;
        opts.threshold = t;
        opts.pool_target = pools.fill;
        opts.pool_timeout = Duration::from_secs(1800);
        opts.node_evidence = node_evidence;
        opts.coordinator_args = vec![
            "--pool-low".into(),
            pools.low.to_string(),
            "--pool-high".into(),
            pools.high.to_string(),
            "--presign-batch".into(),
            pools.batch.to_string(),
            "--metrics-listen".into(),
            format!("127.0.0.1:{metrics_port}"),
        ];
        opts.coordinator_args
            .extend(coordinator_args.iter().cloned());
        let cluster = DevCluster::start(&opts)
            .await
            .map_err(|e| format!("cannot start a local ({n},{t}) cluster: {e}"))?
            .ok_or_else(|| "interrupted while starting the cluster".to_owned())?;
        Ok(Target {
            config: cluster.client_config(),
            dir: Some(cluster.dir().to_owned()),
            domain: opts.domain.clone(),
            metrics: Some(SocketAddr::from(([127, 0, 0, 1], metrics_port))),
            params: Some((n, t)),
            local: Some(cluster),
            _tmp: tmp,
        })
    }

    /// The cluster named by `QUORATE_ADDR`, `QUORATE_CACERT`, `QUORATE_CERT`,
    /// `QUORATE_KEY` (and `QUORATE_DOMAIN`); `QUORATE_BENCH_METRICS` may name the
    /// coordinator's metrics address and `QUORATE_BENCH_DIR` its `quorate dev` directory
    /// (for attestations from the dev issuer).
    pub fn from_env() -> Result<Target, String> {
        let config = ClientConfig::from_env().map_err(|e| e.to_string())?;
        let metrics = match std::env::var("QUORATE_BENCH_METRICS") {
            Ok(s) => Some(
                s.parse()
                    .map_err(|e| format!("QUORATE_BENCH_METRICS={s:?}: {e}"))?,
            ),
            Err(_) => None,
        };
        Ok(Target {
            domain: config.domain.clone(),
            config,
            dir: std::env::var_os("QUORATE_BENCH_DIR").map(PathBuf::from),
            metrics,
            params: None,
            local: None,
            _tmp: None,
        })
    }

    /// Whether this run started the cluster (so CPU per process can be sampled).
    pub fn is_local(&self) -> bool {
        self.local.is_some()
    }

    /// A new connection as the admin client (each has its own HTTP/2 connection).
    pub async fn connect(&self) -> Result<Client, String> {
        Client::connect(&self.config)
            .await
            .map(|c| c.with_timeout(Duration::from_secs(60)))
            .map_err(|e| format!("cannot connect to {}: {e}", self.config.addr))
    }

    /// Stops a local cluster (a no-op for an external one).
    pub async fn stop(mut self) {
        if let Some(c) = self.local.take() {
            c.stop().await;
        }
    }
}

/// The coordinator's counters and pool depths at one moment.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Scrape {
    /// `quorate_coordinator_presignatures_made_total`.
    pub presigs_made: u64,
    /// `quorate_coordinator_signatures_total`.
    pub signatures: u64,
    /// Pool depth per key name, summed over its signing sets.
    pub depth: BTreeMap<String, u64>,
}

/// `GET /metrics` from the coordinator.
pub async fn scrape(addr: SocketAddr) -> Result<Scrape, String> {
    let fetch = async {
        let mut sock = tokio::net::TcpStream::connect(addr).await?;
        sock.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            .await?;
        let mut body = String::new();
        sock.read_to_string(&mut body).await?;
        Ok::<_, std::io::Error>(body)
    };
    let text = tokio::time::timeout(Duration::from_secs(5), fetch)
        .await
        .map_err(|_| format!("metrics at {addr}: no answer in 5 s"))?
        .map_err(|e| format!("metrics at {addr}: {e}"))?;
    Ok(parse_metrics(&text))
}

/// Reads the few samples the bench uses from a Prometheus text exposition.
pub fn parse_metrics(text: &str) -> Scrape {
    let mut out = Scrape::default();
    for line in text.lines() {
        if line.starts_with('#') {
            continue;
        }
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let Ok(value) = value.trim().parse::<u64>() else {
            continue;
        };
        if series == "quorate_coordinator_presignatures_made_total" {
            out.presigs_made = value;
        } else if series == "quorate_coordinator_signatures_total" {
            out.signatures = value;
        } else if let Some(labels) = series.strip_prefix("quorate_coordinator_pool_depth{") {
            let key = labels
                .split(',')
                .find_map(|kv| kv.strip_prefix("key=\""))
                .and_then(|v| v.split('"').next());
            if let Some(key) = key {
                *out.depth.entry(key.to_owned()).or_default() += value;
            }
        }
    }
    out
}

/// CPU time of one process.
#[derive(Clone, Debug, PartialEq, Eq)]
struct ProcCpu {
    name: String,
    ticks: u64,
    rss_kib: u64,
}

/// Linux's `USER_HZ`: `/proc/<pid>/stat` counts CPU time in these (100 on every
/// mainstream architecture).
const TICKS_PER_SEC: f64 = 100.0;

/// This process and its children (the local cluster), by name.
fn proc_table() -> BTreeMap<u32, ProcCpu> {
    let me = std::process::id();
    let mut out = BTreeMap::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in entries.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let Some(fields) = stat_fields(&stat) else {
            continue;
        };
        // Fields after `comm`: state(0) ppid(1) … utime(11) stime(12) … rss(21) in pages.
        let num = |i: usize| {
            fields
                .get(i)
                .and_then(|f| f.parse::<u64>().ok())
                .unwrap_or(0)
        };
        let ppid = num(1) as u32;
        if pid != me && ppid != me {
            continue;
        }
        let name = if pid == me {
            "bench (client)".to_owned()
        } else {
            process_name(pid)
        };
        out.insert(
            pid,
            ProcCpu {
                name,
                ticks: num(11) + num(12),
                rss_kib: num(21) * 4,
            },
        );
    }
    out
}

/// The fields of `/proc/<pid>/stat` after the parenthesised command name.
fn stat_fields(stat: &str) -> Option<Vec<&str>> {
    let rest = stat.get(stat.rfind(')')? + 1..)?;
    Some(rest.split_whitespace().collect())
}

/// `node-2` or `coordinator`, from the `--data-dir` of the child's command line.
fn process_name(pid: u32) -> String {
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let args: Vec<String> = cmdline
        .split(|b| *b == 0)
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    args.iter()
        .position(|a| a == "--data-dir")
        .and_then(|i| args.get(i + 1))
        .and_then(|d| Path::new(d).file_name())
        .map(|f| f.to_string_lossy().into_owned())
        .unwrap_or_else(|| format!("pid {pid}"))
}

/// The peak resident set of a process (`VmHWM`), in KiB.
pub fn peak_rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// The children of this process named `name` (`node-1`, `coordinator`), with pids.
pub fn children_named(name: &str) -> Vec<u32> {
    proc_table()
        .into_iter()
        .filter(|(_, p)| p.name == name)
        .map(|(pid, _)| pid)
        .collect()
}

/// CPU seconds used so far by this process's children (the local cluster).
pub fn cluster_cpu_seconds() -> f64 {
    let me = std::process::id();
    proc_table()
        .into_iter()
        .filter(|(pid, _)| *pid != me)
        .map(|(_, p)| p.ticks as f64 / TICKS_PER_SEC)
        .sum()
}

/// Current resident set of a process, in KiB.
pub fn rss_kib(pid: u32) -> Option<u64> {
    proc_table().get(&pid).map(|p| p.rss_kib)
}

/// CPU use of one process over a run.
#[derive(Clone, Debug, Serialize)]
pub struct CpuUse {
    /// `bench (client)`, `coordinator`, `node-1`, …
    pub process: String,
    /// CPU seconds used during the measured window.
    pub cpu_seconds: f64,
    /// Of one core (100 = one core busy the whole window).
    pub percent_of_core: f64,
    /// Resident set at the end, MiB.
    pub rss_mib: f64,
}

/// One point of the pool-depth series.
#[derive(Clone, Debug, Serialize)]
pub struct DepthPoint {
    /// Seconds since the start of the measured window (negative in the warm-up).
    pub t: f64,
    /// Pool depth of the driven key (all signing sets).
    pub depth: u64,
    /// Presignatures made since the run started.
    pub made: u64,
}

/// What the sampler saw over a run.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Sampled {
    /// Presignatures made per second during the measured window.
    pub presigs_per_sec: Option<f64>,
    /// Pool depth of the driven key once a second.
    pub depth: Vec<DepthPoint>,
    /// CPU per process during the measured window (local clusters only).
    pub cpu: Vec<CpuUse>,
}

/// Samples metrics and `/proc` while a run lasts.
pub struct Sampler {
    stop: Arc<tokio::sync::Notify>,
    task: tokio::task::JoinHandle<Sampled>,
}

impl Sampler {
    /// Starts sampling: the window measured starts `warmup` from now. `status` gets a
    /// short `pool N` text for the progress line.
    pub fn start(
        metrics: Option<SocketAddr>,
        key: String,
        warmup: Duration,
        local: bool,
        status: Arc<Mutex<String>>,
    ) -> Sampler {
        let stop = Arc::new(tokio::sync::Notify::new());
        let stopped = stop.clone();
        let task = tokio::spawn(async move {
            let started = Instant::now();
            let measure_from = started + warmup;
            let first = match metrics {
                Some(m) => scrape(m).await.ok(),
                None => None,
            };
            let mut at_window: Option<(Instant, Scrape, BTreeMap<u32, ProcCpu>)> = None;
            let mut last: Option<(Instant, Scrape)> = None;
            let mut out = Sampled::default();
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            let stopping = stopped.notified();
            tokio::pin!(stopping);
            loop {
                let finish = tokio::select! {
                    _ = tick.tick() => false,
                    () = &mut stopping => true,
                };
                let now = Instant::now();
                if at_window.is_none() && now >= measure_from {
                    let s = match metrics {
                        Some(m) => scrape(m).await.unwrap_or_default(),
                        None => Scrape::default(),
                    };
                    at_window = Some((now, s, if local { proc_table() } else { BTreeMap::new() }));
                }
                if let Some(m) = metrics
                    && let Ok(s) = scrape(m).await
                {
                    let depth = s.depth.get(&key).copied().unwrap_or(0);
                    let made = s
                        .presigs_made
                        .saturating_sub(first.as_ref().map_or(0, |f| f.presigs_made));
                    if let Ok(mut st) = status.lock() {
                        *st = format!("pool {depth}");
                    }
                    let t = if now >= measure_from {
                        now.duration_since(measure_from).as_secs_f64()
                    } else {
                        -measure_from.duration_since(now).as_secs_f64()
                    };
                    out.depth.push(DepthPoint { t, depth, made });
                    last = Some((now, s));
                }
                if finish {
                    break;
                }
            }
            let end = Instant::now();
            if let Some((t0, s0, cpu0)) = at_window {
                if let Some((t1, s1)) = last.as_ref()
                    && *t1 > t0
                    && metrics.is_some()
                {
                    out.presigs_per_sec = Some(
                        s1.presigs_made.saturating_sub(s0.presigs_made) as f64
                            / t1.duration_since(t0).as_secs_f64(),
                    );
                }
                if local {
                    let window = end.duration_since(t0).as_secs_f64().max(1e-9);
                    let cpu1 = proc_table();
                    for (pid, p1) in cpu1 {
                        let before = cpu0.get(&pid).map_or(0, |p| p.ticks);
                        let secs = p1.ticks.saturating_sub(before) as f64 / TICKS_PER_SEC;
                        out.cpu.push(CpuUse {
                            process: p1.name,
                            cpu_seconds: secs,
                            percent_of_core: 100.0 * secs / window,
                            rss_mib: p1.rss_kib as f64 / 1024.0,
                        });
                    }
                    out.cpu.sort_by(|a, b| a.process.cmp(&b.process));
                }
            }
            out
        });
        Sampler { stop, task }
    }

    /// Stops sampling and returns what was seen.
    pub async fn finish(self) -> Sampled {
        self.stop.notify_one();
        self.task.await.unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use super::*;

    #[test]
    fn metrics_are_parsed() {
        let text = "# HELP x\n# TYPE quorate_coordinator_presignatures_made_total counter\n\
            quorate_coordinator_presignatures_made_total 96\n\
            quorate_coordinator_signatures_total 5\n\
            quorate_coordinator_pool_depth{key=\"default\",set=\"{1,2}\"} 10\n\
            quorate_coordinator_pool_depth{key=\"default\",set=\"{2,3}\"} 7\n\
            quorate_coordinator_pool_depth{key=\"tokens\",set=\"{1,2}\"} 3\n";
        let s = parse_metrics(text);
        assert_eq!(s.presigs_made, 96);
        assert_eq!(s.signatures, 5);
        assert_eq!(s.depth.get("default"), Some(&17));
        assert_eq!(s.depth.get("tokens"), Some(&3));
    }

    #[test]
    fn this_process_is_in_the_table() {
        let t = proc_table();
        let me = t.get(&std::process::id()).unwrap();
        assert_eq!(me.name, "bench (client)");
        assert!(me.rss_kib > 0);
        assert!(peak_rss_kib(std::process::id()).unwrap() > 0);
    }
}
