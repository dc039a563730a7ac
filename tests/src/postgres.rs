//! A real PostgreSQL server for tests of the coordinator's shared store
//! (`coordinator/STORE.md`): Debian's `postgresql` binaries (`initdb`, `pg_ctl`), a data
//! directory and a Unix socket directory in a temporary directory; no TCP listener
//! unless [`Postgres::listen_tls`] adds one, TLS only.
//!
//! `initdb` refuses to run as root, so as root the server runs as `nobody`.
//! [`Postgres::start`] returns `None`, saying why on stderr, when the binaries are
//! absent, unless `CI` is set: then it fails.

use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::TempDir;

/// Where Debian installs the server binaries, one directory per major version.
const PG_LIB: &str = "/usr/lib/postgresql";

/// The database user the tests connect as (`initdb -U`).
pub const USER: &str = "quorate";

/// A running PostgreSQL server, stopped on drop.
pub struct Postgres {
    dir: TempDir,
    bin: PathBuf,
    /// The port number in the socket's name (`.s.PGSQL.<port>`).
    pub port: u16,
    /// The unprivileged user the server runs as when the tests run as root.
    run_as: Option<&'static str>,
    running: bool,
    /// The TCP addresses the server listens on besides its socket ([`Postgres::listen_tls`]).
    tcp: Vec<std::net::IpAddr>,
}

impl Postgres {
    /// Creates a cluster (`initdb`) and starts it, or returns `None` when PostgreSQL is
    /// not installed and `CI` is not set.
    pub fn start(label: &str) -> Option<Self> {
        let Some(bin) = find_bin() else {
            let why = format!(
                "PostgreSQL server binaries not found under {PG_LIB}/*/bin (Debian package `postgresql`)"
            );
            if std::env::var_os("CI").is_some() {
                panic!("{why}; CI must install them (.ci/run)");
            }
            eprintln!("SKIPPED: {why}");
            return None;
        };
        let dir = TempDir::new(&format!("pg-{label}"));
        let root = std::fs::metadata("/proc/self")
            .map(|m| m.uid() == 0)
            .unwrap_or(false);
        let run_as = root.then_some("nobody");
        let data = dir.0.join("data");
        let sock = dir.0.join("sock");
        for d in [&data, &sock] {
            std::fs::create_dir_all(d).unwrap();
        }
        if root {
            for d in [&dir.0, &data, &sock] {
                let id = user_id("nobody");
                std::os::unix::fs::chown(d, Some(id), Some(id)).unwrap();
            }
        }
        let pg = Postgres {
            dir,
            bin,
            port: crate::free_port(),
            run_as,
            running: false,
            tcp: Vec::new(),
        };
        let out = pg
            .command("initdb")
            .arg("-D")
            .arg(&data)
            .arg("-U")
            .arg(USER)
            .arg("--auth=trust")
            .arg("--no-sync")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut pg = pg;
        pg.resume();
        Some(pg)
    }

    fn command(&self, tool: &str) -> Command {
        let exe = self.bin.join(tool);
        let mut c = match self.run_as {
            Some(user) => {
                let mut c = Command::new("runuser");
                c.arg("-u").arg(user).arg("--").arg(exe);
                c
            }
            None => Command::new(exe),
        };
        c.current_dir(&self.dir.0);
        c
    }

    fn data(&self) -> PathBuf {
        self.dir.0.join("data")
    }

    /// The socket directory.
    pub fn socket_dir(&self) -> PathBuf {
        self.dir.0.join("sock")
    }

    /// The coordinator's `--store` URL for database `postgres`.
    pub fn url(&self) -> String {
        format!(
            "postgres:///postgres?host={}&port={}&user={USER}",
            self.socket_dir().display(),
            self.port
        )
    }

    /// Starts the server (again) and waits until it accepts connections.
    pub fn resume(&mut self) {
        let listen = self
            .tcp
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(",");
        let opts = format!(
            "-k {} -p {} -c listen_addresses='{listen}'",
            self.socket_dir().display(),
            self.port
        );
        let out = self
            .command("pg_ctl")
            .arg("-D")
            .arg(self.data())
            .arg("-l")
            .arg(self.dir.0.join("server.log"))
            .arg("-o")
            .arg(opts)
            .arg("-w")
            .arg("-t")
            .arg("60")
            .arg("start")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "pg_ctl start failed: {}{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            std::fs::read_to_string(self.dir.0.join("server.log")).unwrap_or_default()
        );
        self.running = true;
    }

    /// Restarts the server listening also on 127.0.0.1 and `also` at [`Postgres::port`],
    /// TLS only: `cert_pem`/`key_pem` are its certificate and key, `client_ca_pem` the CA
    /// of client certificates. Over TCP (`hostssl` only; anything else is rejected) user
    /// [`USER`] authenticates with `password` (SCRAM-SHA-256), and user `cert_user` with
    /// a client certificate whose CN is that name (`cert`). The Unix socket stays `trust`.
    ///
    /// Debian 12's server is built with OpenSSL 3.0 and so negotiates only classic key
    /// exchange (P-256, its `ssl_ecdh_curve`), never X25519MLKEM768.
    pub fn listen_tls(
        &mut self,
        also: &[std::net::IpAddr],
        cert_pem: &str,
        key_pem: &str,
        client_ca_pem: &str,
        password: &str,
        cert_user: &str,
    ) {
        let data = self.data();
        for (name, text) in [
            ("server.crt", cert_pem),
            ("server.key", key_pem),
            ("client-ca.crt", client_ca_pem),
        ] {
            let p = data.join(name);
            std::fs::write(&p, text).unwrap();
            std::fs::set_permissions(&p, std::os::unix::fs::PermissionsExt::from_mode(0o600))
                .unwrap();
            if self.run_as.is_some() {
                let id = user_id("nobody");
                std::os::unix::fs::chown(&p, Some(id), Some(id)).unwrap();
            }
        }
        let mut conf = std::fs::OpenOptions::new()
            .append(true)
            .open(data.join("postgresql.conf"))
            .unwrap();
        std::io::Write::write_all(
            &mut conf,
            b"\nssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n\
              ssl_ca_file = 'client-ca.crt'\nssl_min_protocol_version = 'TLSv1.3'\n\
              password_encryption = 'scram-sha-256'\n",
        )
        .unwrap();
        let hba = format!(
            "local all all trust\n\
             hostssl all {USER} all scram-sha-256\n\
             hostssl all {cert_user} all cert\n\
             host all all all reject\n"
        );
        std::fs::write(data.join("pg_hba.conf"), hba).unwrap();
        self.psql(&format!("ALTER ROLE {USER} PASSWORD '{password}'"));
        self.psql(&format!("CREATE ROLE {cert_user} LOGIN"));
        self.psql(&format!("CREATE DATABASE {cert_user} OWNER {cert_user}"));
        self.stop();
        self.tcp = std::iter::once(std::net::IpAddr::from([127, 0, 0, 1]))
            .chain(also.iter().copied())
            .collect();
        self.resume();
    }

    /// Runs SQL through `psql` over the Unix socket as [`USER`], on database `postgres`.
    ///
    /// # Panics
    /// If `psql` fails.
    pub fn psql(&self, sql: &str) -> String {
        let out = self
            .command("psql")
            .arg("-h")
            .arg(self.socket_dir())
            .arg("-p")
            .arg(self.port.to_string())
            .args([
                "-U",
                USER,
                "-d",
                "postgres",
                "-v",
                "ON_ERROR_STOP=1",
                "-At",
                "-c",
                sql,
            ])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "psql failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Stops the server (fast shutdown: open sessions are ended) and waits.
    pub fn stop(&mut self) {
        let out = self
            .command("pg_ctl")
            .arg("-D")
            .arg(self.data())
            .arg("-m")
            .arg("fast")
            .arg("-w")
            .arg("stop")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "pg_ctl stop failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        self.running = false;
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        if self.running {
            let _ = self
                .command("pg_ctl")
                .arg("-D")
                .arg(self.data())
                .arg("-m")
                .arg("immediate")
                .arg("-w")
                .arg("stop")
                .output();
        }
    }
}

/// `PG_LIB/<newest version>/bin`, if it holds `initdb` and `pg_ctl`.
fn find_bin() -> Option<PathBuf> {
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir(PG_LIB)
        .ok()?
        .filter_map(Result::ok)
        .filter_map(|e| {
            let v = e.file_name().to_str()?.parse().ok()?;
            Some((v, e.path().join("bin")))
        })
        .filter(|(_, bin)| has(bin, "initdb") && has(bin, "pg_ctl"))
        .collect();
    versions.sort();
    versions.pop().map(|(_, b)| b)
}

fn has(dir: &Path, tool: &str) -> bool {
    dir.join(tool).is_file()
}

fn user_id(name: &str) -> u32 {
    let out = Command::new("id").arg("-u").arg(name).output().unwrap();
    assert!(out.status.success(), "no user {name}");
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
}

/// The audit chain as the coordinators' shared store at `url` holds it: one JSON line per
/// event, in sequence order, each ending in a newline.
///
/// # Panics
/// If the store cannot be read.
pub async fn stored_chain(url: &str) -> String {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .expect("connect to the store");
    let conn = tokio::spawn(conn);
    let rows = client
        .query("SELECT line FROM audit_events ORDER BY seq", &[])
        .await
        .expect("read the audit chain");
    drop(client);
    let _ = conn.await;
    let mut text = String::new();
    for r in rows {
        text.push_str(r.get::<_, &str>(0));
        text.push('\n');
    }
    text
}

/// Runs `quorate-coordinator migrate --store URL`: (success, stdout + stderr).
///
/// # Panics
/// If the binary cannot be run.
pub fn migrate(url: &str) -> (bool, String) {
    let out = Command::new(crate::binary("quorate-coordinator"))
        .args(["migrate", "--store", url])
        .output()
        .unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// What the coordinators of a shared-store test need besides the store: a policy
/// directory holding one policy file, and a test attestation issuer with its trust
/// configuration, in a temporary directory.
pub struct SharedStoreSetup {
    /// Holds the files; removed on drop.
    _dir: TempDir,
    /// The attestation issuer the trust configuration names.
    pub issuer: std::sync::Arc<crate::TestIssuer>,
    policy_dir: String,
    trust: String,
}

impl SharedStoreSetup {
    /// Writes `policy` (Cedar) as `base.cedar` and makes the issuer, under `label`.
    ///
    /// # Panics
    /// If the files cannot be written.
    pub fn new(label: &str, policy: &str) -> Self {
        let dir = TempDir::new(label);
        let issuer = std::sync::Arc::new(crate::TestIssuer::new(&dir.0));
        let policy_dir = dir.0.join("policy");
        std::fs::create_dir_all(&policy_dir).unwrap();
        std::fs::write(policy_dir.join("base.cedar"), policy).unwrap();
        let trust = dir.0.join("trust.json").display().to_string();
        SharedStoreSetup {
            issuer,
            policy_dir: policy_dir.display().to_string(),
            trust,
            _dir: dir,
        }
    }

    /// Coordinator flags: `--store url`, the policy directory and trust configuration,
    /// hourly checkpoints (the tests' chain checks read no checkpoint JWKS), and
    /// [`crate::POOL_FLAGS`].
    pub fn flags<'a>(&'a self, url: &'a str) -> Vec<&'a str> {
        let mut flags = vec![
            "--store",
            url,
            "--policy-dir",
            &self.policy_dir,
            "--trust-config",
            &self.trust,
            "--audit-checkpoint-secs",
            "3600",
        ];
        flags.extend_from_slice(crate::POOL_FLAGS);
        flags
    }
}
