//! `quorate dev`: a complete cluster on 127.0.0.1 for development, like
//! `vault server -dev`.
//!
//! [`DevCluster::start`]:
//! 1. creates the cluster directory and, unless `DIR/ca.pem` exists (then it is reused
//!    along with the nodes' and coordinator's data), a cluster CA and certificates
//!    ([`quorate_proto::pki::write_cluster`]);
//! 2. starts `n` `quorate-node` processes and then `quorate-coordinator`, found next to
//!    the current executable, each on `127.0.0.1:0`; a process prints
//!    `QUORATE_READY ... addr=<ip:port>` on stdout once it listens, which is how its
//!    address is learnt. Their logs (stderr) go to `DIR/logs/<name>.log`; other stdout
//!    lines are forwarded to this process's stderr;
//! 3. connects as the `admin` client, creates the signing key [`DEFAULT_KEY`] unless it
//!    exists, and waits until every presignature pool of that key holds
//!    [`DevOptions::pool_target`] presignatures, showing progress on stderr;
//! 4. writes `DIR/env` (mode 0600): shell `export`s of `QUORATE_ADDR`,
//!    `QUORATE_CACERT`, `QUORATE_CERT`, `QUORATE_KEY` and `QUORATE_DOMAIN`.
//!
//! [`DevCluster::wait`] then returns on SIGINT (Ctrl-C), SIGTERM or SIGHUP, or when a
//! child process exits, and [`DevCluster::stop`] stops the coordinator and then the
//! nodes with SIGTERM, killing any that has not stopped after [`STOP_GRACE`].
//!
//! Children are spawned with `kill_on_drop`, so they are killed if this process unwinds
//! or returns without stopping them; they stay in this process's process group, so a
//! Ctrl-C or a closed terminal reaches them too. A `SIGKILL` of `quorate dev` itself
//! cannot be caught: its children then keep running and must be stopped by hand.

use std::io::IsTerminal as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use quorate_client::{Client, ClientConfig, Error, Result};
use quorate_crypto::ThresholdParams;
use quorate_proto::pki;
use quorate_proto::profile::KeyProfile;
use quorate_proto::rules::TokenRules;
use quorate_proto::tls::{Identity, Role};
use tokio::io::{AsyncBufReadExt as _, BufReader, Lines};
use tokio::process::{Child, ChildStdout, Command};
use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio::time::Instant;

/// The multi-threaded tokio runtime of the executables that run a dev cluster's
/// processes (`quorate`, `quorate-bench`); on failure it says why on stderr.
pub fn runtime() -> std::result::Result<tokio::runtime::Runtime, std::process::ExitCode> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| {
            eprintln!("error: cannot start the async runtime: {e}");
            std::process::ExitCode::FAILURE
        })
}

/// The signing key `quorate dev` creates.
pub const DEFAULT_KEY: &str = "default";

/// The token-signing key `quorate dev` creates: its fragment nodes sign only `at+jwt`
/// tokens from the dev issuer URL living at most [`DEV_TOKEN_MAX_TTL`] seconds.
pub const TOKEN_KEY: &str = "tokens";
/// The JSON-lines audit file `quorate dev` writes in its directory.
pub const AUDIT_FILE: &str = "audit.jsonl";

/// The derivation key of confidential credentials (`quorate credential get`).
pub const CREDENTIAL_KEY: &str = "credentials";

/// The token key's node-enforced maximum lifetime (the dev policy caps lower, 15 min).
pub const DEV_TOKEN_MAX_TTL: u32 = 3600;

/// The nodes' ceiling file in the dev directory (`quorate_node::ceiling`).
pub const NODE_CEILING_FILE: &str = "node-ceiling.json";

/// How long each process may take to report that it listens.
pub const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a process may take to stop after SIGTERM before it is killed.
pub const STOP_GRACE: Duration = Duration::from_secs(10);

/// How long key creation may keep failing with an unreachable cluster (nodes still
/// starting) before `quorate dev` gives up.
const CREATE_KEY_TIMEOUT: Duration = Duration::from_secs(60);

/// How often pools are polled.
const POLL_INTERVAL: Duration = Duration::from_millis(250);

/// How often children are checked for an unexpected exit.
const CHILD_CHECK_INTERVAL: Duration = Duration::from_millis(500);

/// Log lines shown when a process fails to start.
const LOG_TAIL_LINES: usize = 20;

/// Settings of a dev cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DevOptions {
    /// The cluster directory: certificates, data, logs and the env file.
    pub dir: PathBuf,
    /// Number of fragment nodes.
    pub nodes: u16,
    /// Corruption threshold `t` (`nodes >= 2t + 1`).
    pub threshold: u16,
    /// Trust domain of the certificates.
    pub domain: String,
    /// The `quorate-node` executable; default: next to the current executable.
    pub node_bin: Option<PathBuf>,
    /// The `quorate-coordinator` executable; default: next to the current executable.
    pub coordinator_bin: Option<PathBuf>,
    /// Presignatures every pool of [`DEFAULT_KEY`] must hold before the cluster is
    /// reported ready (0: do not wait).
    pub pool_target: u64,
    /// How long to wait for the pools before reporting ready anyway.
    pub pool_timeout: Duration,
    /// Extra arguments for the coordinator (pool watermarks, a metrics listener, …),
    /// appended after the ones set here.
    pub coordinator_args: Vec<String>,
    /// Whether the nodes verify every token's evidence themselves (their ceilings name
    /// the dev trust configuration). On by default; `quorate-bench` turns it off to
    /// measure what it costs.
    pub node_evidence: bool,
    /// Open the coordinator's agent listener (`--agent-listen`) on a loopback port kept
    /// in `DIR/agent-port`, trusting the dev SVID CA for `agents.<domain>` (`quorate
    /// dev svid` issues X.509-SVIDs). Node evidence is off then: an X.509-SVID proves
    /// possession to the coordinator's TLS listener only, and a node that checks
    /// evidence refuses tokens it cannot verify.
    pub agent_listener: bool,
    /// Let OAuth clients whose TLS cannot negotiate X25519MLKEM768 (curl and OpenSSL 3.0,
    /// Node, Python here) use the HTTPS token endpoints (`--allow-classic-token-endpoints`).
    pub allow_classic_token_endpoints: bool,
}

impl DevOptions {
    /// The defaults of `quorate dev`: `./quorate-dev`, 3 nodes, `t = 1`, domain
    /// `quorate.local`, pools of 16 within 120 s.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        DevOptions {
            dir: dir.into(),
            nodes: 3,
            threshold: 1,
            domain: quorate_client::DEFAULT_DOMAIN.to_owned(),
            node_bin: None,
            coordinator_bin: None,
            pool_target: 16,
            pool_timeout: Duration::from_secs(120),
            coordinator_args: Vec::new(),
            node_evidence: true,
            agent_listener: false,
            allow_classic_token_endpoints: false,
        }
    }
}

/// Why [`DevCluster::wait`] returned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WaitOutcome {
    /// A signal asked to stop (`SIGINT`, `SIGTERM` or `SIGHUP`; named).
    Signal(&'static str),
    /// A child process exited on its own.
    ChildExited {
        /// Which process (`node-2`, `coordinator`).
        name: String,
        /// How it exited.
        status: String,
        /// Its log file.
        log: PathBuf,
    },
}

/// A running dev cluster.
#[derive(Debug)]
pub struct DevCluster {
    dir: PathBuf,
    domain: String,
    nodes: u16,
    threshold: u16,
    addr: SocketAddr,
    agent_addr: Option<SocketAddr>,
    env_file: PathBuf,
    pools_filled: bool,
    procs: Procs,
    signals: Signals,
}

impl DevCluster {
    /// Starts the cluster as described in the [module docs](self).
    ///
    /// Returns `Ok(None)` if a signal interrupted the start (the processes started so
    /// far are stopped first). On error, too, every process started is stopped.
    pub async fn start(opts: &DevOptions) -> Result<Option<DevCluster>> {
        let mut signals = Signals::install()?;
        let mut procs = Procs::default();
        let outcome = tokio::select! {
            result = bring_up(opts, &mut procs) => Some(result),
            name = signals.recv() => {
                eprintln!("\nreceived {name} while starting: stopping the dev cluster");
                None
            }
        };
        match outcome {
            Some(Ok(up)) => Ok(Some(DevCluster {
                dir: up.dir,
                domain: opts.domain.clone(),
                nodes: opts.nodes,
                threshold: opts.threshold,
                addr: up.addr,
                agent_addr: up.agent_addr,
                env_file: up.env_file,
                pools_filled: up.pools_filled,
                procs,
                signals,
            })),
            Some(Err(e)) => {
                procs.stop().await;
                Err(e)
            }
            None => {
                procs.stop().await;
                Ok(None)
            }
        }
    }

    /// The cluster directory (absolute).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The coordinator's public API address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The agent listener's address, when [`DevOptions::agent_listener`] opened it.
    pub fn agent_addr(&self) -> Option<SocketAddr> {
        self.agent_addr
    }

    /// The env file (`DIR/env`).
    pub fn env_file(&self) -> &Path {
        &self.env_file
    }

    /// The logs directory (`DIR/logs`).
    pub fn logs_dir(&self) -> PathBuf {
        self.dir.join("logs")
    }

    /// Number of fragment nodes.
    pub fn nodes(&self) -> u16 {
        self.nodes
    }

    /// Corruption threshold.
    pub fn threshold(&self) -> u16 {
        self.threshold
    }

    /// Whether the pools reached their target before the cluster was reported ready.
    pub fn pools_filled(&self) -> bool {
        self.pools_filled
    }

    /// Connection settings of the admin client.
    pub fn client_config(&self) -> ClientConfig {
        ClientConfig::admin(&self.dir, self.addr, &self.domain)
    }

    /// Waits for a stop signal or for a child process to exit.
    pub async fn wait(&mut self) -> WaitOutcome {
        let mut tick = tokio::time::interval(CHILD_CHECK_INTERVAL);
        loop {
            tokio::select! {
                name = self.signals.recv() => return WaitOutcome::Signal(name),
                _ = tick.tick() => {
                    if let Some((proc, status)) = self.procs.exited() {
                        return WaitOutcome::ChildExited {
                            name: proc.name.clone(),
                            status: describe_status(status),
                            log: proc.log.clone(),
                        };
                    }
                }
            }
        }
    }

    /// Stops the coordinator, then the nodes (SIGTERM; SIGKILL after [`STOP_GRACE`]).
    pub async fn stop(mut self) {
        self.procs.stop().await;
    }
}

/// What [`bring_up`] produced.
struct Up {
    dir: PathBuf,
    addr: SocketAddr,
    agent_addr: Option<SocketAddr>,
    env_file: PathBuf,
    pools_filled: bool,
}

async fn bring_up(opts: &DevOptions, procs: &mut Procs) -> Result<Up> {
    ThresholdParams::new(opts.nodes, opts.threshold).map_err(|e| {
        Error::Usage(format!(
            "--nodes {} --threshold {}: {e}",
            opts.nodes, opts.threshold
        ))
    })?;
    let node_bin = launcher(opts.node_bin.as_deref(), "node")?;
    let coordinator_bin = launcher(opts.coordinator_bin.as_deref(), "coordinator")?;

    std::fs::create_dir_all(&opts.dir).map_err(|e| {
        Error::Config(format!(
            "cannot create the cluster directory {}: {e}",
            opts.dir.display()
        ))
    })?;
    let dir = opts.dir.canonicalize().map_err(|e| {
        Error::Config(format!(
            "cannot resolve the cluster directory {}: {e}",
            opts.dir.display()
        ))
    })?;
    let env_file = dir.join("env");
    // A stale env file would point at the previous run's (dead) coordinator.
    remove_if_exists(&env_file)?;
    prepare_certificates(&dir, &opts.domain, opts.nodes)?;
    crate::dev_issuer::ensure(&dir, &opts.domain)?;
    let http_port = crate::dev_issuer::http_port(&dir)?;
    let issuer = format!("https://localhost:{http_port}");
    let logs = dir.join("logs");
    std::fs::create_dir_all(&logs)
        .map_err(|e| Error::Config(format!("cannot create {}: {e}", logs.display())))?;

    let ca = dir.join("ca.pem");
    // Each node's own ceiling for token keys (DESIGN.md §9): the dev issuer, at+jwt,
    // tokens of at most an hour, and the nodes verify every token's attestation
    // against the dev trust configuration themselves. Rewritten on every start (the
    // issuer port may change).
    let ceiling = dir.join(NODE_CEILING_FILE);
    let mut ceiling_json = serde_json::Map::new();
    ceiling_json.insert("token_issuers".into(), serde_json::json!([issuer]));
    ceiling_json.insert("token_typs".into(), serde_json::json!(["at+jwt"]));
    ceiling_json.insert(
        "max_token_ttl_seconds".into(),
        serde_json::json!(DEV_TOKEN_MAX_TTL),
    );
    // With node evidence on (the default), policy is an operator-signed bundle too
    // (DESIGN.md §9): the operator key stays in DIR, which no cluster process reads;
    // the nodes and the coordinator get its public key; the dev policy directory is
    // signed afresh at every start (edit it, then `quorate policy apply DIR/policy`
    // signs and applies it with QUORATE_OPERATOR_KEY from DIR/env).
    let bundle_file = dir.join(crate::dev_issuer::POLICY_BUNDLE_FILE);
    let agent_addr = if opts.agent_listener {
        crate::dev_issuer::ensure_svid_ca(&dir, &opts.domain)?;
        let port = crate::dev_issuer::agent_port(&dir)?;
        Some(SocketAddr::from(([127, 0, 0, 1], port)))
    } else {
        None
    };
    let node_evidence = opts.node_evidence && !opts.agent_listener;
    if opts.node_evidence && !node_evidence {
        eprintln!(
            "note: with --agent-listen the nodes do not check token evidence themselves: an \
             X.509-SVID proves possession to the coordinator's listener only (the coordinator \
             alone decides tokens in this dev cluster)"
        );
    }
    if node_evidence {
        let trust = crate::dev_issuer::trust_config_path(&dir);
        ceiling_json.insert("trust_config".into(), trust.display().to_string().into());
        ceiling_json.insert(
            "operator_public_key_file".into(),
            crate::dev_issuer::operator_public_path(&dir)
                .display()
                .to_string()
                .into(),
        );
        crate::dev_issuer::sign_dev_bundle(&dir, &bundle_file)?;
    }
    let ceiling_json = serde_json::Value::Object(ceiling_json);
    std::fs::write(&ceiling, format!("{ceiling_json:#}\n"))
        .map_err(|e| Error::Config(format!("cannot write {}: {e}", ceiling.display())))?;
    for i in 1..=opts.nodes {
        let name = format!("node-{i}");
        let mut cmd = node_bin.command();
        cmd.arg("--listen")
            .arg("127.0.0.1:0")
            .arg("--data-dir")
            .arg(dir.join(&name))
            .arg("--cert")
            .arg(dir.join(format!("{name}.pem")))
            .arg("--key")
            .arg(dir.join(format!("{name}-key.pem")))
            .arg("--ca")
            .arg(&ca)
            .arg("--domain")
            .arg(&opts.domain)
            .arg("--ceiling")
            .arg(&ceiling)
            .arg("--init-kek");
        procs.nodes.push(Proc::spawn(name, cmd, &logs)?);
    }
    eprintln!(
        "starting {} fragment nodes (logs in {})",
        opts.nodes,
        logs.display()
    );
    let deadline = Instant::now() + READY_TIMEOUT;
    let mut node_addrs = Vec::with_capacity(procs.nodes.len());
    for (i, node) in (1u16..).zip(procs.nodes.iter_mut()) {
        let addr = node.await_ready(&format!("node={i}"), deadline).await?;
        eprintln!("  node {i} listening on {addr}");
        node_addrs.push((i, addr));
    }

    let mut cmd = coordinator_bin.command();
    cmd.arg("--listen")
        .arg("127.0.0.1:0")
        .arg("--data-dir")
        .arg(dir.join("coordinator"))
        .arg("--cert")
        .arg(dir.join("coordinator.pem"))
        .arg("--key")
        .arg(dir.join("coordinator-key.pem"))
        .arg("--ca")
        .arg(&ca)
        .arg("--domain")
        .arg(&opts.domain)
        .arg("--threshold")
        .arg(opts.threshold.to_string())
        .arg("--http-listen")
        .arg(format!("127.0.0.1:{http_port}"))
        .arg("--issuer-url")
        .arg(&issuer)
        .arg("--trust-config")
        .arg(crate::dev_issuer::trust_config_path(&dir))
        .arg("--audit-sink")
        .arg(format!("file:{}", dir.join(AUDIT_FILE).display()));
    if node_evidence {
        cmd.arg("--operator-public-key")
            .arg(crate::dev_issuer::operator_public_path(&dir))
            .arg("--policy-bundle")
            .arg(&bundle_file);
    } else {
        cmd.arg("--policy-dir")
            .arg(crate::dev_issuer::policy_dir(&dir));
    }
    for (i, addr) in &node_addrs {
        cmd.arg("--node").arg(format!("{i}={addr}"));
    }
    if let Some(at) = agent_addr {
        cmd.arg("--agent-listen").arg(at.to_string());
    }
    if opts.allow_classic_token_endpoints {
        cmd.arg("--allow-classic-token-endpoints");
    }
    cmd.args(&opts.coordinator_args);
    let coordinator = procs
        .coordinator
        .insert(Proc::spawn("coordinator".to_owned(), cmd, &logs)?);
    let addr = coordinator
        .await_ready("coordinator", Instant::now() + READY_TIMEOUT)
        .await?;
    eprintln!("coordinator listening on {addr}; issuer {issuer}");

    let client = Client::connect(&ClientConfig::admin(&dir, addr, &opts.domain)).await?;
    ensure_key(&client, opts, procs, DEFAULT_KEY, &KeyProfile::Raw).await?;
    let rules = TokenRules::new(DEV_TOKEN_MAX_TTL, issuer.clone(), "at+jwt")
        .map_err(|e| Error::Other(format!("dev token rules: {e}")))?;
    ensure_key(&client, opts, procs, TOKEN_KEY, &KeyProfile::Token(rules)).await?;
    ensure_key(&client, opts, procs, CREDENTIAL_KEY, &KeyProfile::Derive).await?;
    let pools_filled = fill_pools(&client, opts, procs).await?;
    write_env_file(&env_file, addr, &dir, &opts.domain, &issuer, agent_addr)?;
    Ok(Up {
        dir,
        addr,
        agent_addr,
        env_file,
        pools_filled,
    })
}

/// How to start a node or the coordinator: an explicit executable, or this very
/// `quorate` executable with the hidden `node` / `coordinator` subcommand (so that
/// `cargo run -p quorate-cli --bin quorate -- dev` needs nothing else built). Either
/// way each runs as a separate process.
struct Launcher {
    program: PathBuf,
    subcommand: Option<&'static str>,
}

impl Launcher {
    fn command(&self) -> Command {
        let mut c = Command::new(&self.program);
        if let Some(s) = self.subcommand {
            c.arg(s);
        }
        c
    }
}

fn launcher(explicit: Option<&Path>, subcommand: &'static str) -> Result<Launcher> {
    match explicit {
        Some(p) => Ok(Launcher {
            program: find_binary(Some(p), &format!("quorate-{subcommand}"))?,
            subcommand: None,
        }),
        None => Ok(Launcher {
            program: std::env::current_exe()
                .map_err(|e| Error::Other(format!("cannot locate the quorate executable: {e}")))?,
            subcommand: Some(subcommand),
        }),
    }
}

/// The executable `name`: `explicit` if given, else next to the current executable.
fn find_binary(explicit: Option<&Path>, name: &str) -> Result<PathBuf> {
    let path = match explicit {
        Some(p) => p.to_owned(),
        None => std::env::current_exe()
            .map_err(|e| Error::Other(format!("cannot locate the quorate executable: {e}")))?
            .with_file_name(name),
    };
    if path.is_file() {
        Ok(path)
    } else {
        Err(Error::Other(format!(
            "{name} not found at {}: `quorate dev` starts it from the directory of the `quorate` \
             executable; build it with `cargo build --release -p quorate-node -p quorate-coordinator` \
             (and run the `quorate` from the same target directory)",
            path.display()
        )))
    }
}

/// Writes a new CA and certificates unless `dir/ca.pem` exists; else checks that the
/// existing ones cover `n` nodes of `domain`.
fn prepare_certificates(dir: &Path, domain: &str, n: u16) -> Result<()> {
    if !dir.join("ca.pem").exists() {
        pki::write_cluster(dir, domain, n, false).map_err(|e| Error::Config(e.to_string()))?;
        eprintln!(
            "created a cluster CA and certificates for {domain} in {}",
            dir.display()
        );
        return Ok(());
    }
    let mut names = vec!["ca.pem".to_owned()];
    for stem in (1..=n)
        .map(|i| format!("node-{i}"))
        .chain(["coordinator".to_owned(), "client-admin".to_owned()])
    {
        names.push(format!("{stem}.pem"));
        names.push(format!("{stem}-key.pem"));
    }
    let missing: Vec<_> = names.iter().filter(|f| !dir.join(f).is_file()).collect();
    if !missing.is_empty() {
        return Err(Error::Config(format!(
            "{} holds a cluster from an earlier run, but not the files {}: it was made with fewer \
             nodes or is incomplete. Use another --dir, the same --nodes as before, or delete the \
             directory to start afresh",
            dir.display(),
            missing
                .iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        )));
    }
    let admin = Identity::from_pem_files(
        dir.join("client-admin.pem"),
        dir.join("client-admin-key.pem"),
    )
    .map_err(|e| Error::Config(e.to_string()))?;
    match admin.role(domain) {
        Ok(Role::Client(_)) => {}
        _ => {
            return Err(Error::Config(format!(
                "the certificates in {} are not for trust domain {domain}: pass the --domain used \
                 when the directory was created, or use another --dir",
                dir.display()
            )));
        }
    }
    if !dir.join("metadata.pem").is_file() {
        // A directory from before the metadata listener: issue its certificate now.
        let read = |f: &str| {
            std::fs::read_to_string(dir.join(f))
                .map_err(|e| Error::Config(format!("{}: {e}", dir.join(f).display())))
        };
        let ca = pki::ClusterCa::from_pem(&read("ca.pem")?, &read("ca-key.pem")?, domain)
            .map_err(|e| Error::Config(e.to_string()))?;
        let web = ca
            .issue_web(&pki::METADATA_NAMES)
            .map_err(|e| Error::Config(e.to_string()))?;
        crate::dev_issuer::write_secret_and_cert(dir, "metadata", &web)?;
    }
    eprintln!("reusing the cluster in {}", dir.display());
    Ok(())
}

/// Creates the key `name` of `profile` unless it exists, retrying while the cluster is
/// still coming up.
async fn ensure_key(
    client: &Client,
    opts: &DevOptions,
    procs: &mut Procs,
    name: &str,
    profile: &KeyProfile,
) -> Result<()> {
    let deadline = Instant::now() + CREATE_KEY_TIMEOUT;
    let mut announced = false;
    loop {
        procs.check_running()?;
        let attempt = async {
            if client.list_keys().await?.iter().any(|k| k.name == name) {
                return Ok(false);
            }
            if !announced {
                eprintln!(
                    "creating key `{name}` (distributed key generation on {} nodes)",
                    opts.nodes
                );
                announced = true;
            }
            client
                .create_key_with_profile(name, profile)
                .await
                .map(|_| true)
        };
        match attempt.await {
            Ok(true) => {
                eprintln!("created key `{name}`");
                return Ok(());
            }
            Ok(false) => {
                eprintln!("key `{name}` exists");
                return Ok(());
            }
            Err(Error::Refused {
                code: tonic::Code::AlreadyExists,
                ..
            }) => return Ok(()),
            Err(e @ Error::Unreachable { .. }) if Instant::now() < deadline => {
                tracing::debug!(error = %e, "creating a dev key failed; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Err(e) => return Err(e),
        }
    }
}

/// Waits until every pool of [`DEFAULT_KEY`] holds `opts.pool_target` presignatures, or
/// `opts.pool_timeout` passes. Returns whether the target was reached.
async fn fill_pools(client: &Client, opts: &DevOptions, procs: &mut Procs) -> Result<bool> {
    if opts.pool_target == 0 {
        return Ok(true);
    }
    let client = client.clone().with_timeout(Duration::from_secs(5));
    let tty = std::io::stderr().is_terminal();
    let deadline = Instant::now() + opts.pool_timeout;
    let mut shown: Option<String> = None;
    let mut last_error = None;
    let mut tick = tokio::time::interval(POLL_INTERVAL);
    let filled = loop {
        tick.tick().await;
        procs.check_running()?;
        match client.status().await {
            Ok(status) => {
                let depths: Vec<u64> = status
                    .pools
                    .iter()
                    .filter(|p| p.key_name == DEFAULT_KEY || p.key_name == TOKEN_KEY)
                    .map(|p| p.depth)
                    .collect();
                let least = depths.iter().copied().min().unwrap_or(0);
                let line = format!(
                    "filling presignature pools: {}/{} ({} pool{} for keys `{DEFAULT_KEY}` and `{TOKEN_KEY}`)",
                    least.min(opts.pool_target),
                    opts.pool_target,
                    depths.len(),
                    if depths.len() == 1 { "" } else { "s" }
                );
                if shown.as_deref() != Some(line.as_str()) {
                    if tty {
                        eprint!("\r{line}\x1b[K");
                    } else {
                        eprintln!("{line}");
                    }
                    shown = Some(line);
                }
                if !depths.is_empty() && least >= opts.pool_target {
                    break true;
                }
            }
            Err(e) => last_error = Some(e),
        }
        if Instant::now() >= deadline {
            break false;
        }
    };
    if tty && shown.is_some() {
        eprintln!();
    }
    if !filled {
        let why = last_error
            .map(|e| format!(" (last error: {e})"))
            .unwrap_or_default();
        eprintln!(
            "warning: the pools of `{DEFAULT_KEY}` and `{TOKEN_KEY}` did not reach {} presignatures within {} s{why}; \
             the cluster is up and keeps filling them in the background, but the first signatures \
             may be slow (`quorate status` shows the depths)",
            opts.pool_target,
            opts.pool_timeout.as_secs()
        );
    }
    Ok(filled)
}

/// Writes `DIR/env` (mode 0600) atomically: a reader never sees half a file.
fn write_env_file(
    path: &Path,
    addr: SocketAddr,
    dir: &Path,
    domain: &str,
    issuer: &str,
    agent_addr: Option<SocketAddr>,
) -> Result<()> {
    let mut contents = env_file_contents(addr, dir, domain, issuer);
    if let Some(at) = agent_addr {
        contents.push_str(&format!("export QUORATE_AGENT_ADDR={at}\n"));
    }
    let tmp = path.with_extension("tmp");
    let err = |e: std::io::Error| Error::Other(format!("cannot write {}: {e}", path.display()));
    {
        use std::io::Write as _;
        use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(err)?;
        file.set_permissions(std::fs::Permissions::from_mode(0o600))
            .map_err(err)?;
        file.write_all(contents.as_bytes()).map_err(err)?;
        file.sync_all().map_err(err)?;
    }
    std::fs::rename(&tmp, path).map_err(err)
}

/// The env file's text: shell `export`s with absolute, quoted paths.
pub fn env_file_contents(addr: SocketAddr, dir: &Path, domain: &str, issuer: &str) -> String {
    let path = |f: &str| shell_quote(&dir.join(f).display().to_string());
    format!(
        "# Written by `quorate dev`: `source` this file to point the quorate CLI at the dev cluster.\n\
         export QUORATE_ADDR={addr}\n\
         export QUORATE_CACERT={}\n\
         export QUORATE_CERT={}\n\
         export QUORATE_KEY={}\n\
         export QUORATE_DOMAIN={}\n\
         export QUORATE_ISSUER={}\n\
         export QUORATE_OPERATOR_KEY={}\n\
         export QUORATE_APPROVERS={}\n\
         export QUORATE_APPROVER_KEY={}\n",
        path("ca.pem"),
        path("client-admin.pem"),
        path("client-admin-key.pem"),
        shell_quote(domain),
        shell_quote(issuer),
        path(crate::dev_issuer::OPERATOR_KEY_FILE),
        shell_quote(&format!(
            "{}={}",
            crate::dev_issuer::DEV_APPROVER,
            dir.join(crate::dev_issuer::APPROVER_PUBLIC_FILE).display()
        )),
        path(crate::dev_issuer::APPROVER_KEY_FILE),
    )
}

/// Quotes `s` for a POSIX shell if it needs it.
pub fn shell_quote(s: &str) -> String {
    let plain = !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_./:=@%+,-".contains(&b));
    if plain {
        s.to_owned()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

fn remove_if_exists(path: &Path) -> Result<()> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::Config(format!(
            "cannot remove the stale {}: {e}",
            path.display()
        ))),
    }
}

/// Parses `QUORATE_READY <who> addr=<ip:port>`; `who` is e.g. `node=2` or
/// `coordinator`.
fn parse_ready(line: &str, who: &str) -> Option<SocketAddr> {
    let mut words = line.split_whitespace();
    if words.next()? != "QUORATE_READY" {
        return None;
    }
    let mut named = false;
    let mut addr = None;
    for word in words {
        if word == who {
            named = true;
        } else if let Some(a) = word.strip_prefix("addr=") {
            addr = a.parse().ok();
        }
    }
    if named { addr } else { None }
}

fn describe_status(status: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt as _;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit code {code}"),
        (None, Some(sig)) => format!("killed by signal {sig}"),
        (None, None) => status.to_string(),
    }
}

/// The last lines of a log file, indented, for an error message.
fn log_tail(path: &Path) -> String {
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let lines: Vec<&str> = text.lines().collect();
            let tail = lines
                .get(lines.len().saturating_sub(LOG_TAIL_LINES)..)
                .unwrap_or_default();
            if tail.is_empty() {
                "  (the log is empty)".to_owned()
            } else {
                tail.iter()
                    .map(|l| format!("  {l}"))
                    .collect::<Vec<_>>()
                    .join("\n")
            }
        }
        Err(e) => format!("  (cannot read the log: {e})"),
    }
}

// ---------------------------------------------------------------------------------------
// Child processes
// ---------------------------------------------------------------------------------------

/// One child process.
#[derive(Debug)]
struct Proc {
    name: String,
    child: Child,
    log: PathBuf,
    stdout: Option<Lines<BufReader<ChildStdout>>>,
}

impl Proc {
    /// Spawns `cmd` with stdout piped (read for the readiness line), stderr appended to
    /// `logs/<name>.log`, and `kill_on_drop`.
    fn spawn(name: String, mut cmd: Command, logs: &Path) -> Result<Proc> {
        let log = logs.join(format!("{name}.log"));
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .map_err(|e| {
                Error::Other(format!("cannot open the log file {}: {e}", log.display()))
            })?;
        cmd.stdin(Stdio::null())
            // Plain log files: tracing-subscriber leaves out colour codes under NO_COLOR.
            .env("NO_COLOR", "1")
            .stdout(Stdio::piped())
            .stderr(Stdio::from(file))
            .kill_on_drop(true);
        let mut child = cmd.spawn().map_err(|e| {
            Error::Other(format!(
                "cannot start {name} ({}): {e}",
                cmd.as_std().get_program().to_string_lossy()
            ))
        })?;
        let stdout = child.stdout.take().map(|s| BufReader::new(s).lines());
        Ok(Proc {
            name,
            child,
            log,
            stdout,
        })
    }

    /// Reads stdout until the readiness line naming `who`, forwarding other lines to
    /// stderr; then keeps forwarding in a background task.
    async fn await_ready(&mut self, who: &str, deadline: Instant) -> Result<SocketAddr> {
        let Some(mut lines) = self.stdout.take() else {
            return Err(Error::Other(format!("{}: no stdout to read", self.name)));
        };
        let name = self.name.clone();
        let read = async {
            while let Ok(Some(line)) = lines.next_line().await {
                if let Some(addr) = parse_ready(&line, who) {
                    return Some(addr);
                }
                eprintln!("{name} | {line}");
            }
            None
        };
        match tokio::time::timeout_at(deadline, read).await {
            Ok(Some(addr)) => {
                tokio::spawn(async move {
                    while let Ok(Some(line)) = lines.next_line().await {
                        eprintln!("{name} | {line}");
                    }
                });
                Ok(addr)
            }
            Ok(None) => {
                let status =
                    match tokio::time::timeout(Duration::from_secs(5), self.child.wait()).await {
                        Ok(Ok(status)) => describe_status(status),
                        _ => "closed its output".to_owned(),
                    };
                Err(Error::Other(format!(
                    "{} stopped before it was ready ({status}). The end of its log {}:\n{}",
                    self.name,
                    self.log.display(),
                    log_tail(&self.log)
                )))
            }
            Err(_elapsed) => Err(Error::Other(format!(
                "{} did not report that it listens within {} s. The end of its log {}:\n{}",
                self.name,
                READY_TIMEOUT.as_secs(),
                self.log.display(),
                log_tail(&self.log)
            ))),
        }
    }

    /// `Some(status)` if the process has exited.
    fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// SIGTERM, then SIGKILL if it is still running after `grace`.
    async fn stop(mut self, grace: Duration) {
        if self.exited().is_some() {
            return;
        }
        let termed = match self.child.id() {
            // The child is not reaped yet (try_wait said so), so the PID is still ours.
            Some(pid) => Command::new("kill")
                .arg("-TERM")
                .arg(pid.to_string())
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .await
                .is_ok_and(|s| s.success()),
            None => false,
        };
        if termed {
            if let Ok(Ok(_)) = tokio::time::timeout(grace, self.child.wait()).await {
                eprintln!("stopped {}", self.name);
                return;
            }
            eprintln!(
                "{} did not stop within {} s: killing it",
                self.name,
                grace.as_secs()
            );
        }
        match self.child.kill().await {
            Ok(()) => eprintln!("killed {}", self.name),
            Err(e) => eprintln!("cannot kill {}: {e}", self.name),
        }
    }
}

/// Every child of the dev cluster.
#[derive(Debug, Default)]
struct Procs {
    nodes: Vec<Proc>,
    coordinator: Option<Proc>,
}

impl Procs {
    /// The first process found to have exited.
    fn exited(&mut self) -> Option<(&Proc, ExitStatus)> {
        let all = self.coordinator.iter_mut().chain(self.nodes.iter_mut());
        for proc in all {
            if let Some(status) = proc.exited() {
                return Some((proc, status));
            }
        }
        None
    }

    /// An error if any process has exited.
    fn check_running(&mut self) -> Result<()> {
        match self.exited() {
            None => Ok(()),
            Some((proc, status)) => Err(Error::Other(format!(
                "{} exited unexpectedly ({}). The end of its log {}:\n{}",
                proc.name,
                describe_status(status),
                proc.log.display(),
                log_tail(&proc.log)
            ))),
        }
    }

    /// Stops the coordinator first (it may be mid-request to nodes), then every node.
    async fn stop(&mut self) {
        if let Some(coordinator) = self.coordinator.take() {
            coordinator.stop(STOP_GRACE).await;
        }
        let mut stopping = tokio::task::JoinSet::new();
        for node in self.nodes.drain(..) {
            stopping.spawn(node.stop(STOP_GRACE));
        }
        while stopping.join_next().await.is_some() {}
    }
}

/// The stop signals `quorate dev` handles.
#[derive(Debug)]
struct Signals {
    interrupt: Signal,
    terminate: Signal,
    hangup: Signal,
}

impl Signals {
    fn install() -> Result<Self> {
        let install = |kind| {
            signal(kind).map_err(|e| Error::Other(format!("cannot install a signal handler: {e}")))
        };
        Ok(Signals {
            interrupt: install(SignalKind::interrupt())?,
            terminate: install(SignalKind::terminate())?,
            hangup: install(SignalKind::hangup())?,
        })
    }

    /// Waits for a signal and names it.
    async fn recv(&mut self) -> &'static str {
        tokio::select! {
            _ = self.interrupt.recv() => "SIGINT",
            _ = self.terminate.recv() => "SIGTERM",
            _ = self.hangup.recv() => "SIGHUP",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_lines_are_parsed_strictly() {
        assert_eq!(
            parse_ready("QUORATE_READY node=2 addr=127.0.0.1:4000", "node=2"),
            Some("127.0.0.1:4000".parse().unwrap())
        );
        assert_eq!(
            parse_ready("QUORATE_READY node=2 addr=127.0.0.1:4000", "node=1"),
            None
        );
        assert_eq!(
            parse_ready("QUORATE_READY node=12 addr=127.0.0.1:4000", "node=1"),
            None
        );
        assert_eq!(
            parse_ready("QUORATE_READY coordinator addr=[::1]:7100", "coordinator"),
            Some("[::1]:7100".parse().unwrap())
        );
        assert_eq!(
            parse_ready("node listening addr=127.0.0.1:1", "node=1"),
            None
        );
        assert_eq!(
            parse_ready("QUORATE_READY coordinator addr=nonsense", "coordinator"),
            None
        );
    }

    #[test]
    fn env_file_quotes_paths() {
        let text = env_file_contents(
            "127.0.0.1:7100".parse().unwrap(),
            Path::new("/tmp/it's here"),
            "quorate.local",
            "https://localhost:7443",
        );
        assert!(
            text.contains("export QUORATE_ISSUER=https://localhost:7443\n"),
            "{text}"
        );
        assert!(
            text.contains("export QUORATE_ADDR=127.0.0.1:7100\n"),
            "{text}"
        );
        assert!(
            text.contains(r"export QUORATE_CACERT='/tmp/it'\''s here/ca.pem'"),
            "{text}"
        );
        assert!(
            text.contains("export QUORATE_DOMAIN=quorate.local\n"),
            "{text}"
        );
        assert_eq!(shell_quote("/a/b.pem"), "/a/b.pem");
        assert_eq!(shell_quote(""), "''");
    }

    #[test]
    fn missing_binaries_say_how_to_build_them() {
        let err =
            find_binary(Some(Path::new("/nonexistent/quorate-node")), "quorate-node").unwrap_err();
        assert!(
            err.to_string()
                .contains("cargo build --release -p quorate-node"),
            "{err}"
        );
    }
}
