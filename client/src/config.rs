//! Connection settings: flags, environment, or a cluster directory.

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// Environment variable holding the coordinators' addresses: `HOST:PORT`, or several
/// separated by commas (`a:7443,b:7443`).
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

/// Where the coordinators are and how to authenticate to them.
///
/// A cluster may run several coordinators over one store (`coordinator/STORE.md`); the
/// client sends to one of them and fails over to the others ([`crate::Client`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientConfig {
    /// The preferred coordinator's public API address (the first one given).
    pub addr: SocketAddr,
    /// Further coordinators of the same cluster, tried in this order when `addr` fails;
    /// empty for a single coordinator.
    pub fallback_addrs: Vec<SocketAddr>,
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
    /// `addr` is `HOST:PORT`, or several separated by commas; a host name is resolved
    /// here, and every address it resolves to is a coordinator (one DNS name with a
    /// record per coordinator). Duplicates are dropped, the order kept. `domain` defaults
    /// to [`DEFAULT_DOMAIN`].
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
                    "no coordinator address: pass --addr HOST:PORT[,HOST:PORT...] or set {ENV_ADDR}"
                ));
                None
            }
            Some(a) => match resolve_list(a) {
                Ok(addrs) => Some(addrs),
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
            (Some(mut addrs), Some(ca), Some(cert), Some(key)) if problems.is_empty() => {
                // `resolve_list` returns at least one address or an error.
                let addr = addrs.remove(0);
                Ok(ClientConfig {
                    addr,
                    fallback_addrs: addrs,
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
            fallback_addrs: Vec::new(),
            ca: dir.join("ca.pem"),
            cert: dir.join("client-admin.pem"),
            key: dir.join("client-admin-key.pem"),
            domain: domain.to_owned(),
        }
    }
}

impl ClientConfig {
    /// Every coordinator address, the preferred one first.
    pub fn addrs(&self) -> Vec<SocketAddr> {
        let mut all = Vec::with_capacity(1 + self.fallback_addrs.len());
        all.push(self.addr);
        all.extend(
            self.fallback_addrs
                .iter()
                .copied()
                .filter(|a| *a != self.addr),
        );
        all
    }

    /// This configuration with further coordinators to fail over to, after the ones it has.
    #[must_use]
    pub fn with_fallback_addrs(mut self, addrs: impl IntoIterator<Item = SocketAddr>) -> Self {
        for a in addrs {
            if a != self.addr && !self.fallback_addrs.contains(&a) {
                self.fallback_addrs.push(a);
            }
        }
        self
    }
}

/// Resolves a comma-separated list of `HOST:PORT` to every address it names, in order,
/// without duplicates; reports every bad entry at once.
pub(crate) fn resolve_list(list: &str) -> Result<Vec<SocketAddr>, String> {
    let mut addrs = Vec::new();
    let mut problems = Vec::new();
    for entry in list.split(',').map(str::trim) {
        if entry.is_empty() {
            problems.push(format!(
                "--addr {list}: an empty entry (expected HOST:PORT[,HOST:PORT...])"
            ));
            continue;
        }
        match resolve(entry) {
            Ok(found) => {
                for a in found {
                    if !addrs.contains(&a) {
                        addrs.push(a);
                    }
                }
            }
            Err(e) => problems.push(e),
        }
    }
    if problems.is_empty() && !addrs.is_empty() {
        Ok(addrs)
    } else {
        Err(problems.join("\n"))
    }
}

/// Resolves `HOST:PORT` to every address the resolver returns for it.
fn resolve(addr: &str) -> Result<Vec<SocketAddr>, String> {
    if let Ok(a) = addr.parse::<SocketAddr>() {
        return Ok(vec![a]);
    }
    let bad =
        |why: String| format!("--addr {addr}: {why} (expected HOST:PORT, e.g. 127.0.0.1:7100)");
    if !addr.contains(':') {
        return Err(bad("no port".to_owned()));
    }
    let all: Vec<SocketAddr> = addr
        .to_socket_addrs()
        .map_err(|e| bad(format!("cannot resolve: {e}")))?
        .collect();
    if all.is_empty() {
        return Err(bad("the name resolves to no address".to_owned()));
    }
    Ok(all)
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
        assert_eq!(cfg.addrs(), vec![admin.addr]);
    }

    #[test]
    fn several_addresses_are_kept_in_order_without_duplicates() {
        let dir = tempfile::tempdir().unwrap();
        for f in ["ca.pem", "client-admin.pem", "client-admin-key.pem"] {
            std::fs::write(dir.path().join(f), "x").unwrap();
        }
        let cfg = ClientConfig::from_options(
            Some(" 127.0.0.1:7100, 127.0.0.2:7443,127.0.0.1:7100,[::1]:7101 "),
            Some(dir.path().join("ca.pem")),
            Some(dir.path().join("client-admin.pem")),
            Some(dir.path().join("client-admin-key.pem")),
            None,
        )
        .unwrap();
        let want: Vec<SocketAddr> = ["127.0.0.1:7100", "127.0.0.2:7443", "[::1]:7101"]
            .iter()
            .map(|a| a.parse().unwrap())
            .collect();
        assert_eq!(cfg.addr, want[0]);
        assert_eq!(cfg.addrs(), want);
        let more = ClientConfig::admin(dir.path(), want[0], DEFAULT_DOMAIN)
            .with_fallback_addrs(want.iter().copied());
        assert_eq!(more.addrs(), want);
    }

    #[test]
    fn a_name_gives_every_address_it_resolves_to() {
        // `localhost` resolves to 127.0.0.1 and often also ::1: each is a coordinator.
        let addrs = resolve_list("localhost:7100").unwrap();
        assert!(!addrs.is_empty());
        assert!(
            addrs
                .iter()
                .all(|a| a.port() == 7100 && a.ip().is_loopback())
        );
    }

    #[test]
    fn every_bad_entry_of_a_list_is_named() {
        let err = resolve_list("127.0.0.1:7100,,nonsense,127.0.0.1").unwrap_err();
        assert!(err.contains("an empty entry"), "{err}");
        assert!(err.contains("--addr nonsense: no port"), "{err}");
        assert!(err.contains("--addr 127.0.0.1: no port"), "{err}");
    }
}
