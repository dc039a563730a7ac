//! The node's configuration: flags and environment (STYLE.md §5). Everything is parsed
//! and checked up front, every problem is reported at once, and nothing binds or opens
//! until the whole configuration is valid.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Parser;

use crate::ceiling::Ceiling;
use crate::service::FailPoint;

/// Command line of `quorate-node`.
#[derive(Debug, Parser)]
#[command(
    name = "quorate-node",
    version,
    about = "Quorate fragment node: holds key shares, answers the coordinator over post-quantum mTLS"
)]
pub struct Args {
    /// Address to listen on (port 0 picks a free port; the chosen address is printed).
    #[arg(long, env = "QUORATE_NODE_LISTEN", default_value = "127.0.0.1:7101")]
    pub listen: SocketAddr,
    /// Directory for the node's store.
    #[arg(long, env = "QUORATE_NODE_DATA")]
    pub data_dir: PathBuf,
    /// This node's certificate (PEM), issued by the cluster CA with role node/<i>.
    #[arg(long, env = "QUORATE_NODE_CERT")]
    pub cert: PathBuf,
    /// This node's private key (PEM, P-256).
    #[arg(long, env = "QUORATE_NODE_KEY")]
    pub key: PathBuf,
    /// The cluster CA certificate (PEM).
    #[arg(long, env = "QUORATE_NODE_CA")]
    pub ca: PathBuf,
    /// Trust domain of the cluster's SPIFFE IDs.
    #[arg(long, env = "QUORATE_DOMAIN", default_value = "quorate.local")]
    pub domain: String,
    /// Key-encryption key file (32 bytes or 64 hex characters, mode 0600). Defaults to
    /// `<data-dir>/kek`.
    #[arg(long, env = "QUORATE_NODE_KEK")]
    pub kek_file: Option<PathBuf>,
    /// Create the key-encryption key file if it does not exist.
    #[arg(long)]
    pub init_kek: bool,
    /// Seconds to let in-flight requests finish after SIGTERM/SIGINT.
    #[arg(long, default_value_t = 10)]
    pub grace_secs: u64,
    /// The node's ceiling for token keys (JSON; see `quorate_node::ceiling`). Without
    /// it the node takes part in no token key.
    #[arg(long, env = "QUORATE_NODE_CEILING")]
    pub ceiling: Option<PathBuf>,
    /// Serve Prometheus metrics (plain HTTP `GET /metrics`) on this address.
    #[arg(long, env = "QUORATE_NODE_METRICS")]
    pub metrics_listen: Option<SocketAddr>,
    /// Testing only: stop the process at a named point (`sign-after-commit`), or on a
    /// graceful stop write the unused presignature shares' secrets to
    /// `<data-dir>/presignatures.dump` (`dump-presignatures`, for the test that checks
    /// no share ever passes through the coordinator).
    #[arg(long, env = "QUORATE_NODE_FAILPOINT", hide = true)]
    pub fail_point: Option<String>,
    /// Log format: `plain` or `json` (filter from QUORATE_LOG).
    #[arg(long, env = "QUORATE_LOG_FORMAT", default_value = "plain")]
    pub log_format: String,
}

/// A validated configuration.
#[derive(Debug)]
pub struct Config {
    /// Listen address.
    pub listen: SocketAddr,
    /// Store directory.
    pub data_dir: PathBuf,
    /// Certificate path.
    pub cert: PathBuf,
    /// Key path.
    pub key: PathBuf,
    /// CA path.
    pub ca: PathBuf,
    /// Trust domain.
    pub domain: String,
    /// KEK path.
    pub kek_file: PathBuf,
    /// Create the KEK if missing.
    pub init_kek: bool,
    /// Drain timeout.
    pub grace: std::time::Duration,
    /// Crash-test hook.
    pub fail_point: Option<FailPoint>,
    /// Metrics address.
    pub metrics_listen: Option<SocketAddr>,
    /// The token-key ceiling, if configured.
    pub ceiling: Option<Ceiling>,
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
        if self.data_dir.exists() && !self.data_dir.is_dir() {
            errors.push(format!(
                "--data-dir {}: exists and is not a directory",
                self.data_dir.display()
            ));
        }
        let fail_point = match self.fail_point.as_deref() {
            None | Some("") => None,
            Some("sign-after-commit") => Some(FailPoint::SignAfterCommit),
            Some("dump-presignatures") => Some(FailPoint::DumpPresignatures),
            Some(other) => {
                errors.push(format!(
                    "--fail-point {other}: unknown (known: sign-after-commit, dump-presignatures)"
                ));
                None
            }
        };
        if self.log_format != "plain" && self.log_format != "json" {
            errors.push(format!(
                "--log-format {}: use plain or json",
                self.log_format
            ));
        }
        let ceiling = match &self.ceiling {
            None => None,
            Some(p) => match Ceiling::from_file(p) {
                Ok(c) => Some(c),
                Err(mut e) => {
                    errors.append(&mut e);
                    None
                }
            },
        };
        if !errors.is_empty() {
            return Err(errors);
        }
        let kek_file = self.kek_file.unwrap_or_else(|| self.data_dir.join("kek"));
        Ok(Config {
            listen: self.listen,
            data_dir: self.data_dir,
            cert: self.cert,
            key: self.key,
            ca: self.ca,
            domain: self.domain,
            kek_file,
            init_kek: self.init_kek,
            grace: std::time::Duration::from_secs(self.grace_secs),
            fail_point,
            metrics_listen: self.metrics_listen,
            ceiling,
        })
    }
}
