//! The agent-identity commands (DESIGN.md §7): `token`, `task`, `policy` and
//! `dev attest`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use clap::{Args, Subcommand};
use quorate_cli::dev_issuer;
use quorate_client::{Error, ExchangeRequest, Result, RevokeTarget, TokenRequest};
use quorate_proto::dpop::DpopKey;

use crate::{ConnArgs, out, read_input};

/// `quorate token …`
#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Get an access token for an attested agent; prints the token alone on stdout
    Issue(IssueArgs),
    /// RFC 7662 introspection: prints the response JSON (exit 0 active, 4 inactive)
    Introspect {
        /// File holding the token (`-` for stdin)
        #[arg(value_name = "FILE")]
        token: PathBuf,
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// Revoke one token, an agent's tokens (and its future issuance), or a task's
    Revoke(RevokeArgs),
    /// RFC 8693 token exchange: a token for a sub-agent, scopes only narrowing, with
    /// the delegation chain in `act`; prints the token alone on stdout
    Exchange(ExchangeArgs),
}

/// `quorate token exchange`
#[derive(Debug, Args)]
pub struct ExchangeArgs {
    /// The delegating agent's Quorate token: a file, or `-` for stdin
    #[arg(long, value_name = "FILE")]
    subject_token: PathBuf,
    /// The sub-agent's attestation: a file holding its OIDC JWT
    #[arg(long, value_name = "FILE")]
    actor_attestation: PathBuf,
    /// Space-separated scopes, a subset of the subject token's (default: all of them)
    #[arg(long, default_value = "", value_name = "\"A B\"")]
    scope: String,
    /// Lifetime (capped by the subject token's expiry)
    #[arg(long, default_value = "5m", value_name = "TTL")]
    ttl: String,
    /// Policy context, KEY=VALUE; repeatable
    #[arg(long = "context", value_name = "K=V")]
    context: Vec<String>,
    #[command(flatten)]
    dpop: DpopArgs,
    #[command(flatten)]
    conn: ConnArgs,
}

/// Binding a token to a DPoP key (RFC 9449): `--dpop-key` and the issuer its proof names.
#[derive(Debug, Args)]
pub struct DpopArgs {
    /// Bind the token to this DPoP key (RFC 9449): a P-256 private key, PKCS#8 PEM
    /// (`quorate dpop keygen FILE` makes one). The token's `cnf.jkt` is its thumbprint,
    /// printed on stderr; a resource server then wants a proof by this key with every
    /// request (`quorate dpop proof`)
    #[arg(long, value_name = "FILE")]
    dpop_key: Option<PathBuf>,
    /// The coordinator's issuer URL: the proof is for `POST <issuer>/token`
    #[arg(long, env = "QUORATE_ISSUER", value_name = "URL")]
    issuer: Option<String>,
}

impl DpopArgs {
    /// The proof for the token request, and the key's thumbprint; `None` without
    /// `--dpop-key`.
    fn token_request_proof(&self) -> Result<Option<(String, String)>> {
        let Some(path) = &self.dpop_key else {
            return Ok(None);
        };
        let issuer = self.issuer.as_deref().ok_or_else(|| {
            Error::Usage(
                "--dpop-key needs the coordinator's issuer URL (the proof is for POST \
                 <issuer>/token): pass --issuer or set QUORATE_ISSUER"
                    .into(),
            )
        })?;
        let key = load_dpop_key("--dpop-key", path)?;
        let htu = format!("{}/token", issuer.trim_end_matches('/'));
        let proof = key
            .proof("POST", &htu, None)
            .map_err(|e| Error::Other(e.to_string()))?;
        Ok(Some((proof, key.thumbprint())))
    }
}

/// Loads a DPoP key file, naming the flag and the file in every error.
fn load_dpop_key(flag: &str, path: &Path) -> Result<DpopKey> {
    let pem = zeroize::Zeroizing::new(std::fs::read_to_string(path).map_err(|e| {
        let how = if e.kind() == std::io::ErrorKind::NotFound {
            format!(" (make one with `quorate dpop keygen {}`)", path.display())
        } else {
            String::new()
        };
        Error::Usage(format!("{flag} {}: {e}{how}", path.display()))
    })?);
    DpopKey::from_pkcs8_pem(&pem)
        .map_err(|e| Error::Usage(format!("{flag} {}: {e}", path.display())))
}

/// `quorate dpop …`
#[derive(Debug, Subcommand)]
pub enum DpopCommand {
    /// Create a DPoP key: a P-256 private key, PKCS#8 PEM, mode 0600; prints its RFC
    /// 7638 thumbprint (the `cnf.jkt` of tokens bound to it) alone on stdout
    Keygen {
        /// Where to write the key (refused if it exists)
        #[arg(value_name = "FILE")]
        out: PathBuf,
    },
    /// Print a DPoP proof (RFC 9449 §4) for one request to a resource server: send it
    /// as the `DPoP` header, with `Authorization: DPoP <token>`
    Proof {
        /// The DPoP key the token is bound to
        #[arg(long, value_name = "FILE")]
        key: PathBuf,
        /// The request's HTTP method
        #[arg(long, default_value = "GET", value_name = "METHOD")]
        method: String,
        /// The request's URL (query and fragment are left out of the proof)
        #[arg(long, value_name = "URL")]
        url: String,
        /// The access token the request carries (a file, or `-` for stdin): the proof
        /// then holds its hash (`ath`), as a resource server requires
        #[arg(long, value_name = "FILE")]
        access_token: Option<PathBuf>,
    },
    /// Print a key's thumbprint alone on stdout
    Thumbprint {
        /// The DPoP key
        #[arg(value_name = "FILE")]
        key: PathBuf,
    },
}

/// `quorate token issue`
#[derive(Debug, Args)]
pub struct IssueArgs {
    /// The agent's attestation: a file holding its OIDC JWT or JWT-SVID, or `-` for
    /// stdin
    #[arg(long, value_name = "FILE", required_unless_present = "svid_cert")]
    attestation: Option<PathBuf>,
    /// Authenticate with this X.509-SVID instead of an attestation (PEM: the SVID,
    /// then any intermediates), on the coordinator's agent listener (--agent-addr)
    #[arg(
        long,
        value_name = "FILE",
        conflicts_with = "attestation",
        requires = "svid_key"
    )]
    svid_cert: Option<PathBuf>,
    /// The X.509-SVID's private key (PKCS#8 PEM)
    #[arg(long, value_name = "FILE", requires = "svid_cert")]
    svid_key: Option<PathBuf>,
    /// The coordinator's agent listener, for --svid-cert (its `--agent-listen`)
    #[arg(long, env = "QUORATE_AGENT_ADDR", value_name = "HOST:PORT")]
    agent_addr: Option<String>,
    /// The resource server the token is for
    #[arg(long, value_name = "AUD")]
    audience: String,
    /// Space-separated scopes
    #[arg(long, default_value = "", value_name = "\"A B\"")]
    scope: String,
    /// Lifetime: seconds, or with a unit (90s, 5m, 1h)
    #[arg(long, default_value = "5m", value_name = "TTL")]
    ttl: String,
    /// The task the token serves (from `quorate task start`)
    #[arg(long, value_name = "ID")]
    task: Option<String>,
    /// Policy context, KEY=VALUE (environment, tool, data_sensitivity); repeatable
    #[arg(long = "context", value_name = "K=V")]
    context: Vec<String>,
    /// If policy asks for human approval, wait this long for it (at most 5m); without
    /// it, a pending request prints its approval id and exits 5
    #[arg(long, value_name = "TTL")]
    wait: Option<String>,
    /// Poll a pending approval: the same request again, with its id
    #[arg(long, value_name = "ID")]
    approval: Option<String>,
    #[command(flatten)]
    dpop: DpopArgs,
    #[command(flatten)]
    conn: ConnArgs,
}

/// `quorate token revoke`
#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("what").required(true).args(["jti", "agent", "task", "token"])))]
pub struct RevokeArgs {
    /// A token id
    #[arg(long)]
    jti: Option<String>,
    /// An agent's subject (spiffe://…/agent/…): deprovisions it
    #[arg(long)]
    agent: Option<String>,
    /// A task id: ends the task
    #[arg(long)]
    task: Option<String>,
    /// A file holding a whole token (`-` for stdin)
    #[arg(long, value_name = "FILE")]
    token: Option<PathBuf>,
    #[command(flatten)]
    conn: ConnArgs,
}

/// `quorate task …`
#[derive(Debug, Subcommand)]
pub enum TaskCommand {
    /// Start a task; prints its id alone on stdout
    Start {
        /// How long the task may run: seconds, or with a unit (30m, 2h)
        #[arg(long, value_name = "TTL")]
        ttl: String,
        /// Bind the task to this agent (a file holding its attestation, `-` for stdin)
        #[arg(long, value_name = "FILE")]
        attestation: Option<PathBuf>,
        /// What the task is for
        #[arg(long, default_value = "")]
        description: String,
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// End a task: its tokens stop being active and it gets no new ones
    End {
        /// The task id
        id: String,
        #[command(flatten)]
        conn: ConnArgs,
    },
}

/// `quorate policy …`
#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// Validate a policy directory against its schema (nothing is sent)
    Check {
        /// The directory (`*.cedar`, optional `schema.cedarschema`)
        dir: PathBuf,
    },
    /// Validate a policy directory and make it the cluster's active policy set; with
    /// --operator-key, sign it as a bundle that every fragment node verifies
    Apply {
        /// The directory
        dir: PathBuf,
        #[command(flatten)]
        sign: BundleArgs,
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// Sign a policy directory as an operator bundle and write it to a file (for the
    /// coordinator's --policy-bundle); nothing is sent
    Sign {
        /// The directory
        dir: PathBuf,
        #[command(flatten)]
        sign: BundleArgs,
        /// Where to write the bundle (compact JWS)
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
    },
    /// Show the active policy set
    Show {
        #[command(flatten)]
        conn: ConnArgs,
    },
}

/// How to sign a policy bundle (DESIGN.md §9).
#[derive(Debug, Args)]
pub struct BundleArgs {
    /// The operator's signing key (PKCS#8 PEM); no cluster process holds it
    #[arg(long, env = "QUORATE_OPERATOR_KEY", value_name = "FILE")]
    operator_key: Option<PathBuf>,
    /// An approver whose signed approvals count: NAME=PUBLIC-KEY.pem; repeatable
    #[arg(
        long = "approver",
        value_name = "NAME=FILE",
        env = "QUORATE_APPROVERS",
        value_delimiter = ','
    )]
    approvers: Vec<String>,
    /// The bundle's sequence number (default: one more than the active bundle's, or
    /// the current unix time for `policy sign`)
    #[arg(long, value_name = "N")]
    seq: Option<u64>,
}

impl BundleArgs {
    /// Signs `dir`'s files as bundle `seq`.
    fn sign(
        &self,
        dir: &std::path::Path,
        seq: u64,
    ) -> Result<Option<quorate_authz::bundle::PolicyBundle>> {
        use quorate_authz::bundle as b;
        let Some(key_file) = &self.operator_key else {
            return Ok(None);
        };
        let key = b::signing_key_from_file(key_file)
            .map_err(|e| Error::Usage(format!("--operator-key {e}")))?;
        let files = quorate_coordinator::policy::read_dir_files(dir)
            .map_err(|e| Error::Usage(format!("{}: {e}", dir.display())))?;
        // Compile before signing: an operator signs only a set that loads.
        quorate_coordinator::policy::check_dir(dir)
            .map_err(|e| Error::Usage(format!("{}: {e}", dir.display())))?;
        let mut approvers = std::collections::BTreeMap::new();
        for a in &self.approvers {
            let (name, file) = a.split_once('=').ok_or_else(|| {
                Error::Usage(format!("--approver {a}: expected NAME=PUBLIC-KEY.pem"))
            })?;
            let pk = b::public_key_from_file(std::path::Path::new(file))
                .map_err(|e| Error::Usage(format!("--approver {name}: {e}")))?;
            approvers.insert(name.to_owned(), pk);
        }
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
        b::PolicyBundle::sign(&key, self.seq.unwrap_or(seq), now, files, approvers)
            .map(Some)
            .map_err(|e| Error::Usage(format!("cannot sign the bundle: {e}")))
    }
}

/// `quorate dev attest`
#[derive(Debug, Args)]
pub struct AttestArgs {
    /// The dev cluster's directory
    #[arg(long, default_value = "./quorate-dev", value_name = "DIR")]
    dir: PathBuf,
    /// The agent's name (its `sub`)
    #[arg(long, value_name = "NAME")]
    agent: String,
    /// An extra claim, KEY=VALUE; repeatable
    #[arg(long = "claim", value_name = "K=V")]
    claims: Vec<String>,
    /// Lifetime of the attestation
    #[arg(long, default_value = "10m", value_name = "TTL")]
    ttl: String,
    /// Trust domain of the dev cluster
    #[arg(long, env = "QUORATE_DOMAIN", default_value = quorate_client::DEFAULT_DOMAIN, value_name = "D")]
    domain: String,
}

/// `quorate dev svid`
#[derive(Debug, Args)]
pub struct SvidArgs {
    /// The dev cluster's directory
    #[arg(long, default_value = "./quorate-dev", value_name = "DIR")]
    dir: PathBuf,
    /// The agent's path in the SPIFFE ID `spiffe://agents.<domain>/<PATH>`
    #[arg(long, value_name = "PATH")]
    agent: String,
    /// Trust domain of the dev cluster
    #[arg(long, env = "QUORATE_DOMAIN", default_value = quorate_client::DEFAULT_DOMAIN, value_name = "D")]
    domain: String,
}

/// Runs `quorate dev svid`: prints `--svid-cert FILE --svid-key FILE`, ready to paste.
pub fn svid(a: SvidArgs) -> Result<()> {
    let (cert, key) = dev_issuer::issue_svid(&a.dir, &a.domain, &a.agent)?;
    eprintln!(
        "issued spiffe://{}/{} (valid as long as the dev cluster's certificates)",
        dev_issuer::agents_domain(&a.domain),
        a.agent
    );
    out(&format!(
        "--svid-cert {} --svid-key {}\n",
        crate::shell_quote(&cert.display().to_string()),
        crate::shell_quote(&key.display().to_string())
    ))
}

/// Parses `300`, `300s`, `5m`, `2h` or `1d` into seconds.
pub fn parse_ttl(flag: &str, s: &str) -> Result<u64> {
    let s = s.trim();
    let (num, unit) = match s.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        Some((i, _)) => s.split_at(i),
        None => (s, "s"),
    };
    let mult = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => 0,
    };
    match num.parse::<u64>() {
        Ok(n) if mult > 0 && n > 0 => n
            .checked_mul(mult)
            .ok_or_else(|| Error::Usage(format!("{flag} {s}: too long"))),
        _ => Err(Error::Usage(format!(
            "{flag} {s:?}: expected a positive duration such as 300, 90s, 5m, 1h or 1d"
        ))),
    }
}

pub(crate) fn pairs(flag: &str, items: &[String]) -> Result<Vec<(String, String)>> {
    items
        .iter()
        .map(|kv| {
            kv.split_once('=')
                .filter(|(k, _)| !k.is_empty())
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .ok_or_else(|| Error::Usage(format!("{flag} {kv:?}: expected KEY=VALUE")))
        })
        .collect()
}

pub(crate) fn read_text(flag: &str, path: &Path) -> Result<String> {
    let bytes = read_input(path).map_err(|e| Error::Usage(format!("{flag}: {e}")))?;
    let text = String::from_utf8(bytes)
        .map_err(|_| Error::Usage(format!("{flag} {}: not UTF-8 text", path.display())))?;
    let text = text.trim().to_owned();
    if text.is_empty() {
        return Err(Error::Usage(format!("{flag} {}: empty", path.display())));
    }
    Ok(text)
}

fn u32_ttl(flag: &str, s: &str) -> Result<u32> {
    let secs = parse_ttl(flag, s)?;
    u32::try_from(secs).map_err(|_| Error::Usage(format!("{flag} {s}: too long")))
}

/// Runs `quorate token …`.
pub async fn token(cmd: TokenCommand) -> Result<()> {
    match cmd {
        TokenCommand::Issue(a) => {
            let attestation = match &a.attestation {
                Some(path) => read_text("--attestation", path)?,
                // The X.509-SVID on the connection is the attestation.
                None => String::new(),
            };
            let dpop = a.dpop.token_request_proof()?;
            let req = TokenRequest {
                attestation,
                audience: a.audience,
                scopes: a.scope.split_whitespace().map(str::to_owned).collect(),
                ttl_seconds: u32_ttl("--ttl", &a.ttl)?,
                task_id: a.task,
                context: pairs("--context", &a.context)?
                    .into_iter()
                    .collect::<HashMap<_, _>>(),
                wait_seconds: match &a.wait {
                    Some(w) => u32_ttl("--wait", w)?,
                    None => 0,
                },
                approval_id: a.approval,
                dpop_proof: dpop.as_ref().map(|(proof, _)| proof.clone()),
                request_id: None,
            };
            let client = match (&a.svid_cert, &a.svid_key) {
                (Some(cert), Some(key)) => {
                    connect_agent(&a.conn, a.agent_addr.as_deref(), cert, key).await?
                }
                _ => a.conn.connect().await?,
            };
            let reply = client.issue_token(req).await?;
            if !reply.pending_approval.is_empty() {
                eprintln!(
                    "waiting for approval {id} (expires at {}): an approver runs `quorate approval approve {id}`; then run this again with --approval {id}",
                    reply.approval_expires_at,
                    id = reply.pending_approval
                );
                return Err(Error::Pending(reply.pending_approval));
            }
            eprintln!(
                "token for {} (jti {}, kid {}), expires at {}, allowed by {}",
                reply.subject,
                reply.jti,
                reply.kid,
                reply.expires_at,
                reply.policy_ids.join(", ")
            );
            say_bound(dpop.as_ref());
            out(&format!("{}\n", reply.access_token))
        }
        TokenCommand::Introspect { token, conn } => {
            let token = read_text("token", &token)?;
            let client = conn.connect().await?;
            let reply = client.introspect(&token).await?;
            let pretty = serde_json::from_str::<serde_json::Value>(&reply.json)
                .and_then(|v| serde_json::to_string_pretty(&v))
                .unwrap_or(reply.json);
            out(&format!("{pretty}\n"))?;
            if reply.active {
                Ok(())
            } else {
                Err(Error::Inactive)
            }
        }
        TokenCommand::Revoke(a) => {
            let target = match (a.jti, a.agent, a.task, a.token) {
                (Some(j), _, _, _) => RevokeTarget::Jti(j),
                (_, Some(ag), _, _) => RevokeTarget::Agent(ag),
                (_, _, Some(t), _) => RevokeTarget::Task(t),
                (_, _, _, Some(f)) => RevokeTarget::Token(read_text("--token", &f)?),
                _ => return Err(Error::Usage("name what to revoke".into())),
            };
            let client = a.conn.connect().await?;
            let what = client.revoke(target).await?;
            out(&format!("{what}\n"))
        }
        TokenCommand::Exchange(a) => {
            let dpop = a.dpop.token_request_proof()?;
            let req = ExchangeRequest {
                subject_token: read_text("--subject-token", &a.subject_token)?,
                actor_attestation: read_text("--actor-attestation", &a.actor_attestation)?,
                audience: String::new(),
                scopes: a.scope.split_whitespace().map(str::to_owned).collect(),
                ttl_seconds: u32_ttl("--ttl", &a.ttl)?,
                dpop_proof: dpop.as_ref().map(|(proof, _)| proof.clone()),
                context: pairs("--context", &a.context)?.into_iter().collect(),
                request_id: None,
            };
            let client = a.conn.connect().await?;
            let reply = client.exchange_token(req).await?;
            eprintln!(
                "delegated token for {} (jti {}), expires at {}, allowed by {}",
                reply.subject,
                reply.jti,
                reply.expires_at,
                reply.policy_ids.join(", ")
            );
            say_bound(dpop.as_ref());
            out(&format!("{}\n", reply.access_token))
        }
    }
}

/// Tells the caller (on stderr) which DPoP key the token is bound to.
fn say_bound(dpop: Option<&(String, String)>) {
    if let Some((_, jkt)) = dpop {
        eprintln!("bound to DPoP key {jkt} (cnf.jkt): present a proof by this key with every use");
    }
}

/// Connects to the agent listener at `addr` with an X.509-SVID, trusting the
/// coordinator as `conn` says (cluster CA, trust domain).
async fn connect_agent(
    conn: &ConnArgs,
    addr: Option<&str>,
    cert: &Path,
    key: &Path,
) -> Result<quorate_client::Client> {
    use std::net::ToSocketAddrs as _;
    let addr = addr.ok_or_else(|| {
        Error::Usage(
            "--svid-cert needs the coordinator's agent listener: pass --agent-addr or set \
             QUORATE_AGENT_ADDR"
                .into(),
        )
    })?;
    let bad =
        |why: String| Error::Usage(format!("--agent-addr {addr}: {why} (expected HOST:PORT)"));
    let resolved = addr
        .to_socket_addrs()
        .map_err(|e| bad(e.to_string()))?
        .next()
        .ok_or_else(|| bad("the name resolves to no address".into()))?;
    let ca = conn.cacert.as_deref().ok_or_else(|| {
        Error::Config("--svid-cert: the cluster CA is needed to trust the coordinator: pass --cacert or set QUORATE_CACERT".into())
    })?;
    let client =
        quorate_client::Client::connect_agent(resolved, ca, &conn.domain, cert, key).await?;
    Ok(client.with_timeout(std::time::Duration::from_secs(conn.timeout.max(1))))
}

/// Runs `quorate dpop …`.
pub fn dpop(cmd: DpopCommand) -> Result<()> {
    match cmd {
        DpopCommand::Keygen { out: path } => {
            let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
                .map_err(|e| Error::Other(format!("cannot make a P-256 key: {e}")))?;
            let pem = zeroize::Zeroizing::new(pair.serialize_pem());
            let key = DpopKey::from_pkcs8_pem(&pem).map_err(|e| Error::Other(e.to_string()))?;
            write_secret(&path, pem.as_bytes())?;
            eprintln!("wrote DPoP key {} (keep it secret)", path.display());
            out(&format!("{}\n", key.thumbprint()))
        }
        DpopCommand::Proof {
            key,
            method,
            url,
            access_token,
        } => {
            let key = load_dpop_key("--key", &key)?;
            let token = access_token
                .map(|p| read_text("--access-token", &p))
                .transpose()?;
            let htu = url.split(['?', '#']).next().unwrap_or_default();
            let parsed_ok = htu.starts_with("https://") || htu.starts_with("http://");
            if !parsed_ok {
                return Err(Error::Usage(format!(
                    "--url {url:?}: expected an absolute http(s) URL"
                )));
            }
            let proof = key
                .proof(&method.to_ascii_uppercase(), htu, token.as_deref())
                .map_err(|e| Error::Other(e.to_string()))?;
            out(&format!("{proof}\n"))
        }
        DpopCommand::Thumbprint { key } => out(&format!(
            "{}\n",
            load_dpop_key("the key", &key)?.thumbprint()
        )),
    }
}

/// Writes a new secret file (mode 0600), refusing to replace one.
fn write_secret(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let err = |e: std::io::Error| Error::Usage(format!("{}: {e}", path.display()));
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(err)?;
    file.write_all(bytes).map_err(err)?;
    file.sync_all().map_err(err)
}

/// Runs `quorate task …`.
pub async fn task(cmd: TaskCommand) -> Result<()> {
    match cmd {
        TaskCommand::Start {
            ttl,
            attestation,
            description,
            conn,
        } => {
            let ttl = u32_ttl("--ttl", &ttl)?;
            let attestation = attestation
                .map(|p| read_text("--attestation", &p))
                .transpose()?;
            let client = conn.connect().await?;
            let t = client.start_task(attestation, ttl, description).await?;
            eprintln!(
                "task {} started{}, ends at {}",
                t.task_id,
                if t.agent.is_empty() {
                    String::new()
                } else {
                    format!(" for {}", t.agent)
                },
                t.expires_at
            );
            out(&format!("{}\n", t.task_id))
        }
        TaskCommand::End { id, conn } => {
            let client = conn.connect().await?;
            let t = client.end_task(&id).await?;
            out(&format!("task {} ended\n", t.task_id))
        }
    }
}

/// Runs `quorate policy …`.
pub async fn policy(cmd: PolicyCommand) -> Result<()> {
    use quorate_coordinator::policy as p;
    match cmd {
        PolicyCommand::Check { dir } => {
            let info =
                p::check_dir(&dir).map_err(|e| Error::Usage(format!("{}: {e}", dir.display())))?;
            out(&format!(
                "{}: valid; {} policies ({}), digest {}\n",
                dir.display(),
                info.policy_ids.len(),
                info.policy_ids.join(", "),
                info.digest
            ))
        }
        PolicyCommand::Sign {
            dir,
            sign,
            out: file,
        } => {
            if sign.operator_key.is_none() {
                return Err(Error::Usage("policy sign needs --operator-key FILE".into()));
            }
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            let bundle = sign
                .sign(&dir, now)?
                .ok_or_else(|| Error::Usage("no --operator-key".into()))?;
            std::fs::write(&file, format!("{}\n", bundle.jws()))
                .map_err(|e| Error::Usage(format!("--out {}: {e}", file.display())))?;
            out(&format!(
                "signed policy bundle {} ({} files) to {}\n",
                bundle.id(),
                bundle.files().len(),
                file.display()
            ))
        }
        PolicyCommand::Apply { dir, sign, conn } => {
            let files = p::read_dir_files(&dir)
                .map_err(|e| Error::Usage(format!("{}: {e}", dir.display())))?;
            let client = conn.connect().await?;
            if sign.operator_key.is_some() {
                let held = client.policy().await?;
                let bundle = sign
                    .sign(&dir, held.bundle_seq.saturating_add(1))?
                    .ok_or_else(|| Error::Usage("no --operator-key".into()))?;
                let info = client.apply_policy_bundle(bundle.jws()).await?;
                for line in &info.node_reports {
                    eprintln!("  {line}");
                }
                return out(&format!(
                    "applied policy bundle {}: {} policies ({}), digest {}\n",
                    info.bundle,
                    info.policy_ids.len(),
                    info.policy_ids.join(", "),
                    info.digest
                ));
            }
            let info = client.apply_policy(files).await?;
            out(&format!(
                "applied {} policies ({}), digest {}\n",
                info.policy_ids.len(),
                info.policy_ids.join(", "),
                info.digest
            ))
        }
        PolicyCommand::Show { conn } => {
            let client = conn.connect().await?;
            let info = client.policy().await?;
            out(&format!(
                "active since {} from {}{}: {} policies ({}), digest {}\n",
                info.activated_at,
                info.source,
                if info.bundle.is_empty() {
                    " (unsigned)".to_owned()
                } else {
                    format!(" (operator-signed bundle {})", info.bundle)
                },
                info.policy_ids.len(),
                info.policy_ids.join(", "),
                info.digest
            ))
        }
    }
}

/// Runs `quorate dev attest`.
pub fn attest(a: AttestArgs) -> Result<()> {
    let claims = pairs("--claim", &a.claims)?;
    let ttl = parse_ttl("--ttl", &a.ttl)?;
    let jwt = dev_issuer::attest(&a.dir, &a.domain, &a.agent, &claims, ttl)?;
    out(&format!("{jwt}\n"))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn ttls_parse_with_units() {
        assert_eq!(parse_ttl("--ttl", "300").unwrap(), 300);
        assert_eq!(parse_ttl("--ttl", "90s").unwrap(), 90);
        assert_eq!(parse_ttl("--ttl", "5m").unwrap(), 300);
        assert_eq!(parse_ttl("--ttl", "2h").unwrap(), 7200);
        assert_eq!(parse_ttl("--ttl", "1d").unwrap(), 86_400);
        for bad in ["", "0", "5x", "m", "-5m", "1.5h"] {
            assert!(parse_ttl("--ttl", bad).is_err(), "{bad}");
        }
    }
}
