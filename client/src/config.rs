//! Connection settings: flags, environment, or a cluster directory.

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// Environment variable holding the coordinator's address (`HOST:PORT`).
pub const ENV_ADDR: &str = "QUORATE_ADDR";
/// Environment variable holding the cluster CA certificate's path.
pub const ENV_CACERT: &str = "QUORATE_CACERT";
/// Environment variable holding the client certificate's path.
pub const ENV_CERT: &str = "QUORATE_CERT";
/// Environment variable holding the client private key's path.
pub const ENV_KEY: &str = "QUORATE_KEY";
/// Environment variable holding the cluster's trust domain.
pub const ENV_DOMAIN: &str = "QUORATE_DOMAIN";
/// The trust domain used when none is given.
pub const DEFAULT_DOMAIN: &str = "quorate.local";

/// Where the coordinator is and how to authenticate to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientConfig {
    /// The coordinator's public API address.
    pub addr: SocketAddr,
    /// The cluster CA certificate (PEM).
    pub ca: PathBuf,
    /// This client's certificate (PEM), issued by the cluster CA with a client role.
    pub cert: PathBuf,
    /// This client's private key (PKCS#8 PEM).
    pub key: PathBuf,
    /// The cluster's trust domain (the coordinator's certificate must be
    /// `coordinator.<domain>`).
    pub domain: String,
}

impl ClientConfig {
    /// Builds a configuration from optional settings (e.g. flags that fell back to the
    /// environment), reporting every missing or unusable setting at once.
    ///
    /// `addr` may be `HOST:PORT` with a host name; it is resolved here. `domain`
    /// defaults to [`DEFAULT_DOMAIN`].
    pub fn from_options(
        addr: Option<&str>,
        ca: Option<PathBuf>,
        cert: Option<PathBuf>,
        key: Option<PathBuf>,
        domain: Option<String>,
    ) -> Result<Self> {
        let mut problems = Vec::new();
        let addr = match addr.map(str::trim).filter(|a| !a.is_empty()) {
            None => {
                problems.push(format!(
                    "no coordinator address: pass --addr HOST:PORT or set {ENV_ADDR}"
                ));
                None
            }
            Some(a) => match resolve(a) {
                Ok(addr) => Some(addr),
                Err(e) => {
                    problems.push(e);
                    None
                }
            },
        };
        let mut file = |value: Option<PathBuf>, flag: &str, env: &str, what: &str| match value
            .filter(|p| !p.as_os_str().is_empty())
        {
            None => {
                problems.push(format!("no {what}: pass {flag} FILE or set {env}"));
                None
            }
            Some(path) if !path.is_file() => {
                problems.push(format!("{flag} {}: no such file ({what})", path.display()));
                None
            }
            Some(path) => Some(path),
        };
        let ca = file(ca, "--cacert", ENV_CACERT, "cluster CA certificate");
        let cert = file(cert, "--cert", ENV_CERT, "client certificate");
        let key = file(key, "--key", ENV_KEY, "client private key");
        let domain = domain
            .map(|d| d.trim().to_owned())
            .filter(|d| !d.is_empty())
            .unwrap_or_else(|| DEFAULT_DOMAIN.to_owned());
        match (addr, ca, cert, key) {
            (Some(addr), Some(ca), Some(cert), Some(key)) if problems.is_empty() => {
                Ok(ClientConfig {
                    addr,
                    ca,
                    cert,
                    key,
                    domain,
                })
            }
            _ => Err(Error::Config(format!(
                "{}\nFor a dev cluster run `source ./quorate-dev/env` (written by `quorate dev`); \
                 for a deployed one, use the files from `quorate admin init`.",
                problems.join("\n")
            ))),
        }
    }

    /// Reads the settings from `QUORATE_ADDR`, `QUORATE_CACERT`, `QUORATE_CERT`,
    /// `QUORATE_KEY` and `QUORATE_DOMAIN` (optional, default [`DEFAULT_DOMAIN`]).
    pub fn from_env() -> Result<Self> {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        Self::from_options(
            var(ENV_ADDR).as_deref(),
            var(ENV_CACERT).map(PathBuf::from),
            var(ENV_CERT).map(PathBuf::from),
            var(ENV_KEY).map(PathBuf::from),
            var(ENV_DOMAIN),
        )
    }

    /// The admin client of a cluster directory written by `quorate admin init` or
    /// `quorate dev`: `dir/ca.pem`, `dir/client-admin.pem`, `dir/client-admin-key.pem`.
    pub fn admin(dir: &Path, addr: SocketAddr, domain: &str) -> Self {
        ClientConfig {
            addr,
            ca: dir.join("ca.pem"),
            cert: dir.join("client-admin.pem"),
            key: dir.join("client-admin-key.pem"),
            domain: domain.to_owned(),
        }
    }
}

/// Resolves `HOST:PORT` to one address (the first the resolver returns).
fn resolve(addr: &str) -> Result<SocketAddr, String> {
    if let Ok(a) = addr.parse::<SocketAddr>() {
        return Ok(a);
    }
    let bad =
        |why: String| format!("--addr {addr}: {why} (expected HOST:PORT, e.g. 127.0.0.1:7100)");
    if !addr.contains(':') {
        return Err(bad("no port".to_owned()));
    }
    addr.to_socket_addrs()
        .map_err(|e| bad(format!("cannot resolve: {e}")))?
        .next()
        .ok_or_else(|| bad("the name resolves to no address".to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_missing_setting_is_reported_at_once() {
        let err = ClientConfig::from_options(None, None, None, None, None).unwrap_err();
        assert_eq!(err.exit_code(), 2);
        let text = err.to_string();
        for needle in [
            "QUORATE_ADDR",
            "QUORATE_CACERT",
            "QUORATE_CERT",
            "QUORATE_KEY",
            "source",
        ] {
            assert!(text.contains(needle), "{needle} missing from: {text}");
        }
    }

    #[test]
    fn missing_files_and_bad_addresses_are_named() {
        let err = ClientConfig::from_options(
            Some("nonsense"),
            Some("/nonexistent/ca.pem".into()),
            Some("/nonexistent/c.pem".into()),
            Some("/nonexistent/k.pem".into()),
            None,
        )
        .unwrap_err();
        let text = err.to_string();
        assert!(text.contains("--addr nonsense"), "{text}");
        assert!(text.contains("/nonexistent/ca.pem"), "{text}");
        assert!(text.contains("/nonexistent/k.pem"), "{text}");
    }

    #[test]
    fn complete_settings_resolve() {
        let dir = tempfile::tempdir().unwrap();
        for f in ["ca.pem", "client-admin.pem", "client-admin-key.pem"] {
            std::fs::write(dir.path().join(f), "x").unwrap();
        }
        let admin = ClientConfig::admin(
            dir.path(),
            "127.0.0.1:7100".parse().unwrap(),
            "quorate.local",
        );
        let cfg = ClientConfig::from_options(
            Some("127.0.0.1:7100"),
            Some(admin.ca.clone()),
            Some(admin.cert.clone()),
            Some(admin.key.clone()),
            Some(String::new()),
        )
        .unwrap();
        assert_eq!(cfg, admin);
        assert_eq!(cfg.domain, DEFAULT_DOMAIN);
    }
}
