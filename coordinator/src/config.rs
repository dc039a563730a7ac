//! The coordinator's configuration: flags and environment, all checked before anything
//! binds (STYLE.md §5).

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Parser;
use quorate_crypto::params::{PartyIndex, ThresholdParams};

use crate::pools::Watermarks;

/// Command line of `quorate-coordinator`.
#[derive(Debug, Parser)]
#[command(
    name = "quorate-coordinator",
    version,
    about = "Quorate coordinator: drives the fragment nodes and serves the key API over post-quantum mTLS"
)]
pub struct Args {
    /// Address of the public API (port 0 picks a free port; the chosen address is printed).
    #[arg(
        long,
        env = "QUORATE_COORDINATOR_LISTEN",
        default_value = "127.0.0.1:7100"
    )]
    pub listen: SocketAddr,
    /// Directory for the coordinator's store (public data only).
    #[arg(long, env = "QUORATE_COORDINATOR_DATA")]
    pub data_dir: PathBuf,
    /// The coordinator's certificate (PEM, role coordinator).
    #[arg(long, env = "QUORATE_COORDINATOR_CERT")]
    pub cert: PathBuf,
    /// The coordinator's private key (PEM).
    #[arg(long, env = "QUORATE_COORDINATOR_KEY")]
    pub key: PathBuf,
    /// The cluster CA certificate (PEM).
    #[arg(long, env = "QUORATE_COORDINATOR_CA")]
    pub ca: PathBuf,
    /// Trust domain of the cluster's SPIFFE IDs.
    #[arg(long, env = "QUORATE_DOMAIN", default_value = "quorate.local")]
    pub domain: String,
    /// A fragment node, `INDEX=HOST:PORT`; give one per node, indices 1..=n.
    #[arg(
        long = "node",
        env = "QUORATE_COORDINATOR_NODES",
        value_delimiter = ',',
        required = true
    )]
    pub nodes: Vec<String>,
    /// Corruption threshold t (n >= 2t + 1).
    #[arg(long, env = "QUORATE_THRESHOLD", default_value_t = 1)]
    pub threshold: u16,
    /// Refill a presignature pool below this depth.
    #[arg(long, default_value_t = 16)]
    pub pool_low: usize,
    /// Refill pools up to this depth.
    #[arg(long, default_value_t = 64)]
    pub pool_high: usize,
    /// Most presignatures per batch.
    #[arg(long, default_value_t = 32)]
    pub presign_batch: u32,
    /// Seconds to let in-flight requests finish after SIGTERM/SIGINT.
    #[arg(long, default_value_t = 10)]
    pub grace_secs: u64,
    /// Serve Prometheus metrics (plain HTTP `GET /metrics`) on this address.
    #[arg(long, env = "QUORATE_COORDINATOR_METRICS")]
    pub metrics_listen: Option<SocketAddr>,
    /// Testing: append every relayed round message to this file.
    #[arg(long, hide = true)]
    pub record_relay: Option<PathBuf>,
    /// Log format: `plain` or `json` (filter from QUORATE_LOG).
    #[arg(long, env = "QUORATE_LOG_FORMAT", default_value = "plain")]
    pub log_format: String,
}

/// A validated configuration.
#[derive(Debug)]
pub struct Config {
    /// Public API address.
    pub listen: SocketAddr,
    /// Store directory.
    pub data_dir: PathBuf,
    /// Certificate.
    pub cert: PathBuf,
    /// Key.
    pub key: PathBuf,
    /// CA.
    pub ca: PathBuf,
    /// Trust domain.
    pub domain: String,
    /// Nodes in index order.
    pub nodes: Vec<(PartyIndex, SocketAddr)>,
    /// Parameters.
    pub params: ThresholdParams,
    /// Pool sizing.
    pub marks: Watermarks,
    /// Drain timeout.
    pub grace: std::time::Duration,
    /// Relay recording.
    pub record_relay: Option<PathBuf>,
    /// Metrics address.
    pub metrics_listen: Option<SocketAddr>,
}

impl Args {
    /// Validates everything, returning every problem found.
    pub fn build(self) -> Result<Config, Vec<String>> {
        let mut errors = Vec::new();
        for (what, p) in [
            ("--cert", &self.cert),
            ("--key", &self.key),
            ("--ca", &self.ca),
        ] {
            if !p.is_file() {
                errors.push(format!("{what} {}: no such file", p.display()));
            }
        }
        let mut nodes = Vec::new();
        for spec in &self.nodes {
            let parsed = spec.split_once('=').and_then(|(i, a)| {
                Some((
                    PartyIndex::new(i.trim().parse().ok()?)?,
                    a.trim().parse::<SocketAddr>().ok()?,
                ))
            });
            match parsed {
                Some(n) => nodes.push(n),
                None => errors.push(format!(
                    "--node {spec}: expected INDEX=HOST:PORT, e.g. 1=127.0.0.1:7101"
                )),
            }
        }
        nodes.sort_by_key(|(i, _)| *i);
        for (k, (i, _)) in nodes.iter().enumerate() {
            if usize::from(i.get()) != k + 1 {
                errors.push(format!(
                    "--node indices must be 1..=n, each once; found {i} at position {}",
                    k + 1
                ));
                break;
            }
        }
        let n = u16::try_from(nodes.len()).unwrap_or(u16::MAX);
        let params = match ThresholdParams::new(n, self.threshold) {
            Ok(p) => Some(p),
            Err(e) => {
                errors.push(format!(
                    "--threshold {} with {n} nodes: {e}",
                    self.threshold
                ));
                None
            }
        };
        if self.pool_low == 0 || self.pool_high < self.pool_low {
            errors.push("pool watermarks need 0 < --pool-low <= --pool-high".into());
        }
        if self.presign_batch == 0 || self.presign_batch > quorate_crypto::presign::MAX_BATCH {
            errors.push(format!(
                "--presign-batch must be 1..={}",
                quorate_crypto::presign::MAX_BATCH
            ));
        }
        if self.log_format != "plain" && self.log_format != "json" {
            errors.push(format!(
                "--log-format {}: use plain or json",
                self.log_format
            ));
        }
        match (errors.is_empty(), params) {
            (true, Some(params)) => Ok(Config {
                listen: self.listen,
                data_dir: self.data_dir,
                cert: self.cert,
                key: self.key,
                ca: self.ca,
                domain: self.domain,
                nodes,
                params,
                marks: Watermarks {
                    low: self.pool_low,
                    high: self.pool_high,
                    batch: self.presign_batch,
                },
                grace: std::time::Duration::from_secs(self.grace_secs),
                record_relay: self.record_relay,
                metrics_listen: self.metrics_listen,
            }),
            _ => Err(errors),
        }
    }
}
