//! The governance commands: `audit`, `approval` and `credential`.

use std::collections::HashMap;
use std::path::PathBuf;

use clap::{Args, Subcommand};
use quorate_client::{CredentialFor, Error, Result};
use quorate_proto::audit;

use crate::agent::{pairs, read_text};
use crate::{ConnArgs, out};

/// `quorate audit …`
#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Stream audit events as JSON lines (admin only)
    Tail {
        /// Replay stored events from this sequence number first (0: the whole chain)
        #[arg(long, value_name = "SEQ")]
        from: Option<u64>,
        /// Stop after the stored events instead of following new ones
        #[arg(long)]
        no_follow: bool,
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// Check a chain offline: every link, and every checkpoint's signature with the
    /// cluster's JWKS; names the first broken event (exit 4)
    Verify {
        /// A JSON-lines audit file (an `--audit-sink file:` or `audit tail --from 0`)
        file: PathBuf,
        /// The cluster's checkpoint JWKS: a file, or an https URL (`<issuer>/checkpoint-jwks.json`)
        #[arg(long, value_name = "URL|FILE")]
        jwks: String,
        /// CA certificate (PEM) for an https JWKS URL
        #[arg(long, env = "QUORATE_CACERT", value_name = "FILE")]
        cacert: Option<PathBuf>,
    },
}

/// `quorate approval …`
#[derive(Debug, Subcommand)]
pub enum ApprovalCommand {
    /// List pending approval requests (with --all, decided ones too)
    List {
        /// Include approved, rejected, expired and used requests
        #[arg(long)]
        all: bool,
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// Approve a pending request
    Approve(DecideArgs),
    /// Reject a pending request
    Deny(DecideArgs),
}

/// `quorate approval approve|deny`
#[derive(Debug, Args)]
pub struct DecideArgs {
    /// The approval id (apr-…)
    id: String,
    /// Why (recorded in the audit trail)
    #[arg(long)]
    reason: Option<String>,
    /// Sign the approval with this approver key (PKCS#8 PEM), as a cluster whose policy
    /// is an operator-signed bundle requires: the fragment nodes check the signature
    /// against the bundle's approvers
    #[arg(long, env = "QUORATE_APPROVER_KEY", value_name = "FILE")]
    approver_key: Option<PathBuf>,
    /// The approver name the bundle lists for that key (default: `admin`)
    #[arg(
        long,
        env = "QUORATE_APPROVER_NAME",
        value_name = "NAME",
        default_value = "admin"
    )]
    approver_name: String,
    /// How long the signed approval may be used (e.g. 15m)
    #[arg(long, value_name = "DURATION", default_value = "15m")]
    valid_for: String,
    #[command(flatten)]
    conn: ConnArgs,
}

/// `quorate credential …`
#[derive(Debug, Subcommand)]
pub enum CredentialCommand {
    /// Get a confidential per-task credential for a target; prints it (hex) alone on
    /// stdout. It is unmasked here: the cluster never sees it.
    Get {
        /// What the credential is for
        #[arg(long, value_name = "T")]
        target: String,
        /// The task it serves (its window bounds the credential)
        #[arg(long, value_name = "ID")]
        task: String,
        /// The agent's attestation: a file holding its OIDC JWT, or `-` for stdin
        #[arg(long, value_name = "FILE", conflicts_with = "agent")]
        attestation: Option<PathBuf>,
        /// As a resource client: derive this agent's credential (its subject) to check it
        #[arg(long, value_name = "SUBJECT")]
        agent: Option<String>,
        /// As a resource client: a file holding the access token the agent presented
        /// for the task (nodes that check evidence require it)
        #[arg(long, value_name = "FILE", requires = "agent")]
        agent_token: Option<PathBuf>,
        /// Policy context, KEY=VALUE; repeatable
        #[arg(long = "context", value_name = "K=V")]
        context: Vec<String>,
        #[command(flatten)]
        conn: ConnArgs,
    },
}

/// Runs `quorate audit …`.
pub async fn audit(cmd: AuditCommand) -> Result<()> {
    match cmd {
        AuditCommand::Tail {
            from,
            no_follow,
            conn,
        } => {
            let client = conn.connect().await?;
            let mut stream = client.audit_tail(from, !no_follow).await?;
            loop {
                match stream.message().await {
                    Ok(Some(rec)) => out(&format!("{}\n", rec.json))?,
                    Ok(None) => return Ok(()),
                    Err(status) => {
                        return Err(Error::from_status(
                            "tail the audit trail",
                            client.addr(),
                            &status,
                        ));
                    }
                }
            }
        }
        AuditCommand::Verify { file, jwks, cacert } => {
            let text = std::fs::read_to_string(&file)
                .map_err(|e| Error::Usage(format!("{}: {e}", file.display())))?;
            let set = load_jwks(&jwks, cacert.as_deref()).await?;
            match audit::verify_chain(&text, &set) {
                Ok(v) => {
                    let tail = v.unsigned_tail();
                    out(&format!(
                        "{}: chain intact: {} events, {} checkpoints verified{}; head {}\n",
                        file.display(),
                        v.events,
                        v.checkpoints,
                        v.signed_through
                            .map(|s| format!(" (signed through event {s})"))
                            .unwrap_or_default(),
                        v.head
                    ))?;
                    if tail > 0 {
                        eprintln!(
                            "note: the last {tail} events are chained but not yet under a checkpoint signature"
                        );
                    }
                    Ok(())
                }
                Err(broken) => Err(Error::Failed(format!(
                    "{}: audit chain BROKEN at {broken}",
                    file.display()
                ))),
            }
        }
    }
}

async fn load_jwks(
    source: &str,
    cacert: Option<&std::path::Path>,
) -> Result<jsonwebtoken::jwk::JwkSet> {
    let body = if source.starts_with("https://") {
        let ca = cacert.ok_or_else(|| {
            Error::Usage("--jwks URL needs --cacert (the CA of the metadata listener)".into())
        })?;
        let pem = std::fs::read(ca).map_err(|e| Error::Usage(format!("{}: {e}", ca.display())))?;
        let mut roots = rustls::RootCertStore::empty();
        use rustls::pki_types::pem::PemObject as _;
        for cert in rustls::pki_types::CertificateDer::pem_slice_iter(&pem) {
            let cert = cert.map_err(|e| Error::Usage(format!("{}: {e}", ca.display())))?;
            roots
                .add(cert)
                .map_err(|e| Error::Usage(format!("{}: {e}", ca.display())))?;
        }
        let tls = quorate_proto::https::public_client_config(roots)
            .map_err(|e| Error::Other(e.to_string()))?;
        let resp = quorate_proto::https::get(source, tls)
            .await
            .map_err(|e| Error::Other(format!("fetching {source}: {e}")))?;
        if !resp.is_success() {
            return Err(Error::Other(format!(
                "fetching {source}: HTTP {}",
                resp.status
            )));
        }
        resp.body
    } else {
        std::fs::read(source).map_err(|e| Error::Usage(format!("--jwks {source}: {e}")))?
    };
    serde_json::from_slice(&body)
        .map_err(|e| Error::Usage(format!("--jwks {source}: not a JWK set: {e}")))
}

/// Runs `quorate approval …`.
pub async fn approval(cmd: ApprovalCommand) -> Result<()> {
    match cmd {
        ApprovalCommand::List { all, conn } => {
            let client = conn.connect().await?;
            let list = client.list_approvals(all).await?;
            if list.is_empty() {
                eprintln!("no {}approval requests", if all { "" } else { "pending " });
            }
            for a in list {
                out(&format!(
                    "{}  {:<8}  {}  policy {}  expires {}{}\n",
                    a.id,
                    a.state,
                    request_line(&a),
                    a.policy_ids.join(","),
                    a.expires_at,
                    if a.decided_by.is_empty() {
                        String::new()
                    } else {
                        format!("  by {}", a.decided_by)
                    }
                ))?;
            }
            Ok(())
        }
        ApprovalCommand::Approve(d) => decide(d, true).await,
        ApprovalCommand::Deny(d) => decide(d, false).await,
    }
}

async fn decide(d: DecideArgs, approve: bool) -> Result<()> {
    let client = d.conn.connect().await?;
    let statement = match (&d.approver_key, approve) {
        (Some(file), true) => {
            let valid_for = crate::agent::parse_ttl("--valid-for", &d.valid_for)?;
            Some(sign_approval(&client, &d.id, &d.approver_name, file, valid_for).await?)
        }
        _ => None,
    };
    let a = client
        .decide_approval(&d.id, approve, d.reason, statement)
        .await?;
    out(&format!(
        "approval {} {} by {}\n",
        a.id, a.state, a.decided_by
    ))
}

/// What a pending request asks for, on one line.
fn request_line(a: &quorate_proto::api::Approval) -> String {
    format!(
        "{} {} {} scopes=[{}] ttl={}s{}",
        a.agent,
        a.action,
        a.resource,
        a.scopes.join(" "),
        a.ttl_seconds,
        if a.task_id.is_empty() {
            String::new()
        } else {
            format!(" task={}", a.task_id)
        }
    )
}

/// Signs an approval statement for pending request `id` as it is listed (the request
/// is shown on stderr first: the approver signs exactly what it names).
async fn sign_approval(
    client: &quorate_client::Client,
    id: &str,
    approver: &str,
    key_file: &std::path::Path,
    valid_for: u64,
) -> Result<String> {
    let key = quorate_authz::bundle::signing_key_from_file(key_file)
        .map_err(|e| Error::Usage(format!("--approver-key {e}")))?;
    let a = client
        .list_approvals(true)
        .await?
        .into_iter()
        .find(|a| a.id == id)
        .ok_or_else(|| {
            Error::Usage(format!(
                "no approval request {id} (see `quorate approval list`)"
            ))
        })?;
    eprintln!(
        "signing approval {id} as {approver}: {}{}",
        request_line(&a),
        if a.jkt.is_empty() {
            String::new()
        } else {
            format!(" dpop={}", a.jkt)
        }
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
    let st = quorate_authz::bundle::ApprovalStatement {
        approval_id: a.id,
        approver: approver.to_owned(),
        sub: a.agent,
        action: a.action,
        resource: a.resource,
        scopes: a.scopes,
        ttl_seconds: u64::from(a.ttl_seconds),
        task_id: (!a.task_id.is_empty()).then_some(a.task_id),
        context: a.context.into_iter().collect(),
        jkt: (!a.jkt.is_empty()).then_some(a.jkt),
        iat: now,
        exp: now.saturating_add(i64::try_from(valid_for).unwrap_or(i64::MAX)),
    };
    Ok(st.sign(&key))
}

/// Runs `quorate credential …`.
pub async fn credential(cmd: CredentialCommand) -> Result<()> {
    let CredentialCommand::Get {
        target,
        task,
        attestation,
        agent,
        agent_token,
        context,
        conn,
    } = cmd;
    let agent_token = agent_token
        .map(|f| read_text("--agent-token", &f))
        .transpose()?;
    let who = match (attestation, agent) {
        (Some(f), None) => CredentialFor::Agent {
            attestation: read_text("--attestation", &f)?,
        },
        (None, Some(agent)) => CredentialFor::Resource { agent, agent_token },
        _ => {
            return Err(Error::Usage(
                "give --attestation (an agent asks) or --agent (a resource checks an agent's credential)".into(),
            ));
        }
    };
    let context: HashMap<String, String> = pairs("--context", &context)?.into_iter().collect();
    let client = conn.connect().await?;
    let grant = client
        .request_credential(who, &target, &task, context)
        .await?;
    eprintln!(
        "credential for {target} (task {task}), valid {} to {}, from key {} via nodes {:?}",
        grant.not_before, grant.not_after, grant.key, grant.nodes
    );
    let hex = zeroize::Zeroizing::new(hex::encode(grant.credential.secret_bytes()));
    out(&format!("{}\n", hex.as_str()))
}
