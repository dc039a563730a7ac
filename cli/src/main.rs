//! `quorate`: the Quorate command-line tool.
//!
//! Runs a local dev cluster (`quorate dev`), creates a deployment's certificates
//! (`quorate admin init`), and talks to a cluster: status, keys, signing, derivation,
//! encryption and decryption. Exit codes: 0 success, 1 other failure, 2 usage or
//! configuration error, 3 cluster unreachable, 4 request refused by the cluster.
#![forbid(unsafe_code)]

mod agent;
mod governance;

use std::io::{Read as _, Write as _};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use quorate_cli::dev::{self, DevCluster, DevOptions, WaitOutcome, shell_quote};
use quorate_client::{
    Client, ClientConfig, ClusterStatus, Error, Format, KeyInfo, KeyProfile, KeyPurpose, Result,
    SignInput,
};
use quorate_crypto::ThresholdParams;
use quorate_proto::pki;
use zeroize::Zeroizing;

/// Quorate: threshold keys split across independent fragment nodes.
#[derive(Debug, Parser)]
#[command(name = "quorate", version)]
#[command(
    after_help = "Exit codes: 0 success, 1 other failure, 2 usage or configuration error, \
                        3 cluster unreachable, 4 request refused by the cluster.\n\
                        Start with `quorate dev`, then `source ./quorate-dev/env`."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a local development cluster (fragment nodes and a coordinator on 127.0.0.1)
    Dev(DevArgs),
    /// Administration: create a deployment's CA and certificates
    #[command(subcommand)]
    Admin(AdminCommand),
    /// Show the cluster's nodes and presignature pools
    Status {
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// Create, list and export keys
    #[command(subcommand)]
    Key(KeyCommand),
    /// Sign a file (or a SHA-256 digest) with an ES256 key
    Sign(SignArgs),
    /// Derive a credential for a context from a derivation key
    Derive(DeriveArgs),
    /// Encrypt a file to a decryption key (locally, with its public key)
    Encrypt(CryptArgs),
    /// Decrypt a file made by `quorate encrypt`
    Decrypt(CryptArgs),
    /// Agent access tokens: issue, introspect, revoke
    #[command(subcommand)]
    Token(agent::TokenCommand),
    /// DPoP keys and proofs (RFC 9449): bind tokens to a key, prove possession
    #[command(subcommand)]
    Dpop(agent::DpopCommand),
    /// Tasks: the windows agents' tokens live in
    #[command(subcommand)]
    Task(agent::TaskCommand),
    /// Cedar policy: check a directory, apply it, show the active set
    #[command(subcommand)]
    Policy(agent::PolicyCommand),
    /// The audit trail: follow it live, verify a chain offline
    #[command(subcommand)]
    Audit(governance::AuditCommand),
    /// Human approval of requests that policy marks @approval("required")
    #[command(subcommand)]
    Approval(governance::ApprovalCommand),
    /// Confidential per-task credentials (threshold DH, unmasked locally)
    #[command(subcommand)]
    Credential(governance::CredentialCommand),
    /// Run a fragment node (what `quorate-node` runs; used by `quorate dev`)
    #[command(hide = true)]
    Node(quorate_node::config::Args),
    /// Run a coordinator (what `quorate-coordinator` runs), or `quorate coordinator
    /// migrate --store postgres://…` to create or upgrade the PostgreSQL store's schema
    Coordinator(Box<quorate_coordinator::config::Args>),
}

#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
struct DevArgs {
    #[command(subcommand)]
    action: Option<DevAction>,
    /// Directory for certificates, data, logs and the env file (reused if it exists)
    #[arg(long, default_value = "./quorate-dev", value_name = "DIR")]
    dir: PathBuf,
    /// Number of fragment nodes
    #[arg(long, default_value_t = 3, value_name = "N")]
    nodes: u16,
    /// Corruption threshold t: any t nodes learn nothing, t+1 sign (needs N >= 2t+1)
    #[arg(long, default_value_t = 1, value_name = "T")]
    threshold: u16,
    /// Trust domain of the certificates
    #[arg(long, default_value = quorate_client::DEFAULT_DOMAIN, value_name = "D")]
    domain: String,
    /// Presignatures each pool of the `default` key must hold before the cluster is
    /// reported ready (0: do not wait)
    #[arg(long, default_value_t = 16, value_name = "COUNT")]
    pool_target: u64,
    /// Seconds to wait for the pools before reporting ready anyway
    #[arg(long, default_value_t = 120, value_name = "SECS")]
    pool_timeout: u64,
    /// Open the agent listener: agents get tokens with their X.509-SVID (`quorate dev
    /// svid` issues them; the env file sets QUORATE_AGENT_ADDR). The nodes then leave
    /// token evidence to the coordinator
    #[arg(long)]
    agent_listen: bool,
    /// Let OAuth clients whose TLS cannot negotiate X25519MLKEM768 (Debian's curl,
    /// OpenSSL 3.0, Node, Python) use the HTTPS token endpoints with classic key exchange
    #[arg(long)]
    allow_classic_token_endpoints: bool,
    /// The quorate-node executable (default: next to this executable)
    #[arg(long, env = "QUORATE_NODE_BIN", value_name = "FILE", hide = true)]
    node_bin: Option<PathBuf>,
    /// The quorate-coordinator executable (default: next to this executable)
    #[arg(
        long,
        env = "QUORATE_COORDINATOR_BIN",
        value_name = "FILE",
        hide = true
    )]
    coordinator_bin: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
enum DevAction {
    /// Print an attestation JWT for an agent from the dev cluster's OIDC issuer
    Attest(agent::AttestArgs),
    /// Issue an X.509-SVID for an agent from the dev SVID CA (`quorate dev
    /// --agent-listen` creates it); prints the certificate and key paths
    Svid(agent::SvidArgs),
}

#[derive(Debug, Subcommand)]
enum AdminCommand {
    /// Create a cluster CA and certificates for the nodes, the coordinator and an admin
    /// client, and print how to start each process
    Init(InitArgs),
    /// Give a node that lost its disk (or a replacement with the same index and a
    /// certificate for it) a share of every key again, by resharing from the others;
    /// every node must be up
    RepairNode {
        /// The node's index (1..=n)
        index: u16,
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// Back up a stopped node: its sealed key shares and configuration only (no
    /// presignatures); the KEK is not in the backup, keep it apart
    BackupNode {
        /// The node's data directory
        #[arg(long, value_name = "DIR")]
        data_dir: PathBuf,
        /// The node's key-encryption key (default: DIR/kek)
        #[arg(long, value_name = "FILE")]
        kek_file: Option<PathBuf>,
        /// The node's ceiling file, to include
        #[arg(long, value_name = "FILE")]
        ceiling: Option<PathBuf>,
        /// Where to write the backup (mode 0600; never overwritten)
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
    },
    /// Restore a node backup into an empty data directory (the node stopped), with the
    /// KEK it was sealed under
    RestoreNode {
        /// The backup file
        #[arg(long, value_name = "FILE")]
        from: PathBuf,
        /// The node's (empty) data directory
        #[arg(long, value_name = "DIR")]
        data_dir: PathBuf,
        /// The key-encryption key the backup was sealed under (default: DIR/kek)
        #[arg(long, value_name = "FILE")]
        kek_file: Option<PathBuf>,
        /// Write the backed-up ceiling file here
        #[arg(long, value_name = "FILE")]
        ceiling: Option<PathBuf>,
    },
}

#[derive(Debug, Args)]
struct InitArgs {
    /// Directory to write the certificates and keys to (created with mode 0700)
    #[arg(long, value_name = "DIR")]
    dir: PathBuf,
    /// Number of fragment nodes
    #[arg(long, value_name = "N")]
    nodes: u16,
    /// Corruption threshold t (needs N >= 2t+1)
    #[arg(long, value_name = "T")]
    threshold: u16,
    /// Trust domain of the certificates' SPIFFE IDs and DNS names
    #[arg(long, default_value = quorate_client::DEFAULT_DOMAIN, value_name = "D")]
    domain: String,
    /// Replace an existing CA (invalidates every certificate it issued)
    #[arg(long)]
    force: bool,
}

#[derive(Debug, Subcommand)]
enum KeyCommand {
    /// Create a key by distributed key generation across all nodes
    Create {
        /// Key name: 1-64 of letters, digits, '-', '_', '.'
        name: String,
        /// What the key may be used for (fixed at creation, enforced by every node): raw
        /// (signs any digest), token (signs only access tokens; needs the token rules),
        /// derive, decrypt. Default: from --purpose (sign: raw, or token with token rules)
        #[arg(long, value_enum)]
        profile: Option<ProfileArg>,
        /// What the key is for (older spelling of --profile; sign means raw)
        #[arg(long, value_enum, default_value_t = PurposeArg::Sign)]
        purpose: PurposeArg,
        #[command(flatten)]
        rules: TokenRulesArgs,
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// Add a new version of a signing key (fresh key generation; same name, purpose and
    /// token rules); the previous version stays verifiable for its tokens' lifetime
    Rotate {
        /// Key name
        name: String,
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// Renew a key's shares on every node (proactive refresh): same key, public key
    /// and JWKS entry, next epoch; a share stolen before is useless after
    Refresh {
        /// Key name
        name: String,
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// List the keys
    List {
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// Print a key's public key
    Pubkey {
        /// Key name
        name: String,
        /// Encoding: SubjectPublicKeyInfo PEM (OpenSSL) or JWK (JOSE)
        #[arg(long, value_enum, default_value_t = KeyFormat::Pem)]
        format: KeyFormat,
        #[command(flatten)]
        conn: ConnArgs,
    },
}

/// Token rules of `quorate key create`: all three or none.
#[derive(Debug, Args)]
#[command(next_help_heading = "Token rules (a key that signs only access tokens)")]
struct TokenRulesArgs {
    /// Issuer every token must name (`iss`), compared exactly
    #[arg(long, value_name = "URL")]
    token_issuer: Option<String>,
    /// Longest token lifetime (`exp - iat`): seconds, or with s, m or h (900, 15m, 1h); at
    /// most 24h
    #[arg(long, value_name = "TTL")]
    token_max_ttl: Option<String>,
    /// JWS `typ` header every token must carry, compared exactly (e.g. at+jwt)
    #[arg(long, value_name = "TYP")]
    token_typ: Option<String>,
}

impl TokenRulesArgs {
    /// The key profile of `key create`.
    fn profile(self, profile: Option<ProfileArg>, purpose: PurposeArg) -> Result<KeyProfile> {
        let rules = self.rules(purpose)?;
        let name = match profile {
            Some(p) => p.name(),
            None => return Ok(KeyProfile::legacy(purpose.into(), rules)),
        };
        KeyProfile::from_name(name, rules).map_err(|e| Error::Usage(e.to_string()))
    }

    fn rules(self, purpose: PurposeArg) -> Result<Option<quorate_client::TokenRules>> {
        match (self.token_issuer, self.token_max_ttl, self.token_typ) {
            (None, None, None) => Ok(None),
            (Some(issuer), Some(ttl), Some(typ)) => {
                if purpose != PurposeArg::Sign {
                    return Err(Error::Usage(
                        "token rules apply only to token keys: drop --purpose or use --profile token"
                            .into(),
                    ));
                }
                let ttl = agent::parse_ttl("--token-max-ttl", &ttl)?;
                let ttl = u32::try_from(ttl).unwrap_or(u32::MAX);
                quorate_client::TokenRules::new(ttl, issuer, typ)
                    .map(Some)
                    .map_err(|e| Error::Usage(e.to_string()))
            }
            _ => Err(Error::Usage(
                "--token-issuer, --token-max-ttl and --token-typ go together: give all three for a \
                 token-signing key, or none"
                    .into(),
            )),
        }
    }
}

/// What `key create` and `key rotate` print.
fn describe_key(verb: &str, key: &KeyInfo) -> String {
    let mut s = format!(
        "{verb} key `{}`: profile {}, {} nodes, t = {}, key id {}",
        key.name,
        key.profile.name(),
        key.n,
        key.t,
        key.key_id
    );
    if key.version > 1 {
        s.push_str(&format!(", version {} (JWS kid {})", key.version, key.kid));
    }
    if let Some(r) = key.profile.token_rules() {
        s.push_str(&format!(
            "\ntoken rules: typ {}, issuer {}, tokens of at most {} s",
            r.typ(),
            r.issuer(),
            r.max_ttl_seconds()
        ));
    }
    s.push('\n');
    s
}

#[derive(Debug, Args)]
struct SignArgs {
    /// Key name
    name: String,
    /// File to sign (`-` for stdin)
    #[arg(long = "in", value_name = "FILE")]
    input: PathBuf,
    /// FILE holds a SHA-256 digest (32 bytes, or 64 hex characters) instead of a message
    #[arg(long)]
    digest: bool,
    /// Signature encoding: raw r||s (64 bytes, JWS ES256) or DER (OpenSSL)
    #[arg(long, value_enum)]
    format: SigFormat,
    /// Write the signature's bytes to FILE (default: hex on stdout)
    #[arg(long, value_name = "FILE")]
    out: Option<PathBuf>,
    #[command(flatten)]
    conn: ConnArgs,
}

#[derive(Debug, Args)]
struct DeriveArgs {
    /// Key name (a key created with `--purpose derive`)
    name: String,
    /// The credential's context (1-4096 bytes); the same context gives the same
    /// credential
    #[arg(long, value_name = "STR")]
    context: String,
    #[command(flatten)]
    conn: ConnArgs,
}

#[derive(Debug, Args)]
struct CryptArgs {
    /// Key name (a key created with `--purpose decrypt`)
    name: String,
    /// Input file (`-` for stdin)
    #[arg(long = "in", value_name = "FILE")]
    input: PathBuf,
    /// Associated data: authenticated, not encrypted; decryption needs the same
    #[arg(long, value_name = "STR", default_value = "")]
    aad: String,
    /// Output file (default: stdout; ciphertext as hex)
    #[arg(long, value_name = "FILE")]
    out: Option<PathBuf>,
    #[command(flatten)]
    conn: ConnArgs,
}

/// Connection settings shared by every command that talks to a cluster.
#[derive(Debug, Args)]
#[command(next_help_heading = "Connection")]
struct ConnArgs {
    /// Coordinator address; several coordinators of one cluster separated by commas
    /// (a,b,c), or one DNS name with a record per coordinator: calls fail over between them
    #[arg(long, env = "QUORATE_ADDR", value_name = "HOST:PORT[,HOST:PORT...]")]
    addr: Option<String>,
    /// Cluster CA certificate (PEM)
    #[arg(long, env = "QUORATE_CACERT", value_name = "FILE")]
    cacert: Option<PathBuf>,
    /// Client certificate (PEM) issued by the cluster CA
    #[arg(long, env = "QUORATE_CERT", value_name = "FILE")]
    cert: Option<PathBuf>,
    /// Client private key (PEM)
    #[arg(long, env = "QUORATE_KEY", value_name = "FILE")]
    key: Option<PathBuf>,
    /// Trust domain of the cluster
    #[arg(long, env = "QUORATE_DOMAIN", default_value = quorate_client::DEFAULT_DOMAIN, value_name = "D")]
    domain: String,
    /// Seconds to wait for each answer
    #[arg(
        long,
        env = "QUORATE_TIMEOUT",
        default_value_t = 60,
        value_name = "SECS"
    )]
    timeout: u64,
}

impl ConnArgs {
    async fn connect(self) -> Result<Client> {
        let config = ClientConfig::from_options(
            self.addr.as_deref(),
            self.cacert,
            self.cert,
            self.key,
            Some(self.domain),
        )?;
        Ok(Client::connect(&config)
            .await?
            .with_timeout(Duration::from_secs(self.timeout.max(1))))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum PurposeArg {
    /// ES256 signatures
    Sign,
    /// Confidential credential derivation
    Derive,
    /// Decryption of data encrypted with `quorate encrypt`
    Decrypt,
}

/// `--profile` of `key create` (checkpoint keys are the coordinator's own).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum ProfileArg {
    /// Signs any 32-byte digest (HSM-style); never published as a token key
    Raw,
    /// Signs only access tokens issued by the identity service (needs --token-issuer,
    /// --token-max-ttl, --token-typ); published in the issuer JWKS
    Token,
    /// Confidential credential derivation
    Derive,
    /// Decryption of data encrypted with `quorate encrypt`
    Decrypt,
}

impl ProfileArg {
    fn name(self) -> &'static str {
        match self {
            ProfileArg::Raw => "raw",
            ProfileArg::Token => "token",
            ProfileArg::Derive => "derive",
            ProfileArg::Decrypt => "decrypt",
        }
    }
}

impl From<PurposeArg> for KeyPurpose {
    fn from(p: PurposeArg) -> Self {
        match p {
            PurposeArg::Sign => KeyPurpose::Sign,
            PurposeArg::Derive => KeyPurpose::Derive,
            PurposeArg::Decrypt => KeyPurpose::Decrypt,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum KeyFormat {
    /// SubjectPublicKeyInfo, PEM
    Pem,
    /// RFC 7517 JSON Web Key
    Jwk,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum SigFormat {
    /// r || s, 64 bytes
    Raw,
    /// ASN.1 DER ECDSA-Sig-Value
    Der,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match quorate_cli::dev::runtime() {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    // The server subcommands set up their own tracing and exit codes.
    let command = match cli.command {
        Command::Node(args) => return runtime.block_on(quorate_node::app::main_with(args)),
        Command::Coordinator(args) => {
            return runtime.block_on(quorate_coordinator::app::main_with(*args));
        }
        other => other,
    };
    init_tracing();
    match runtime.block_on(run(Cli { command })) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

/// Logs to stderr, filtered by `QUORATE_LOG` (default: warnings).
fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("QUORATE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

async fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Dev(DevArgs {
            action: Some(DevAction::Attest(a)),
            ..
        }) => agent::attest(a),
        Command::Dev(DevArgs {
            action: Some(DevAction::Svid(a)),
            ..
        }) => agent::svid(a),
        Command::Dev(args) => dev(args).await,
        Command::Token(c) => agent::token(c).await,
        Command::Dpop(c) => agent::dpop(c),
        Command::Task(c) => agent::task(c).await,
        Command::Policy(c) => agent::policy(c).await,
        Command::Audit(c) => governance::audit(c).await,
        Command::Approval(c) => governance::approval(c).await,
        Command::Credential(c) => governance::credential(c).await,
        Command::Admin(AdminCommand::Init(args)) => admin_init(&args),
        Command::Admin(AdminCommand::BackupNode {
            data_dir,
            kek_file,
            ceiling,
            out: file,
        }) => {
            let kek = kek_file.unwrap_or_else(|| data_dir.join("kek"));
            let done = quorate_node::backup::backup(&data_dir, &kek, ceiling.as_deref(), &file)
                .map_err(Error::Usage)?;
            let mut s = format!(
                "backed up {} key shares (sealed under {}, which is not in the backup){} to {}\n",
                done.keys.len(),
                kek.display(),
                if done.ceiling { " and the ceiling" } else { "" },
                file.display()
            );
            for (id, epoch) in &done.keys {
                s.push_str(&format!("  key {id} epoch {epoch}\n"));
            }
            out(&s)
        }
        Command::Admin(AdminCommand::RestoreNode {
            from,
            data_dir,
            kek_file,
            ceiling,
        }) => {
            let kek = kek_file.unwrap_or_else(|| data_dir.join("kek"));
            let done = quorate_node::backup::restore(&from, &data_dir, &kek, ceiling.as_deref())
                .map_err(Error::Usage)?;
            let mut s = format!(
                "restored {} key shares into {}; start the node: it rejoins with no presignatures. If the cluster refreshed its keys since this backup, run `quorate admin repair-node` for it\n",
                done.keys.len(),
                data_dir.display()
            );
            for (id, epoch) in &done.keys {
                s.push_str(&format!("  key {id} epoch {epoch}\n"));
            }
            out(&s)
        }
        Command::Admin(AdminCommand::RepairNode { index, conn }) => {
            let client = conn.connect().await?;
            eprintln!("repairing node {index}: resharing every key from the other nodes…");
            let keys = client.repair_node(index).await?;
            let mut s = format!(
                "node {index} repaired: it holds a share of each of {} keys again\n",
                keys.len()
            );
            for k in &keys {
                s.push_str(&format!("  {:<20} epoch {}\n", k.name, k.epoch));
            }
            out(&s)
        }
        Command::Status { conn } => {
            let client = conn.connect().await?;
            let status = client.status().await?;
            out(&format_status(&client, &status))
        }
        Command::Key(KeyCommand::Create {
            name,
            profile,
            purpose,
            rules,
            conn,
        }) => {
            let profile = rules.profile(profile, purpose)?;
            let client = conn.connect().await?;
            let key = client.create_key_with_profile(&name, &profile).await?;
            out(&describe_key("created", &key))
        }
        Command::Key(KeyCommand::Rotate { name, conn }) => {
            let client = conn.connect().await?;
            let key = client.rotate_key(&name).await?;
            out(&describe_key("rotated", &key))
        }
        Command::Key(KeyCommand::Refresh { name, conn }) => {
            let client = conn.connect().await?;
            eprintln!("refreshing the shares of key `{name}` on every node…");
            let key = client.refresh_key(&name).await?;
            out(&format!(
                "refreshed key `{}`: shares now at epoch {} on all {} nodes ({}); public key and key id {} unchanged; older shares and presignatures are gone\n",
                key.name,
                key.epoch,
                key.n,
                key.holders
                    .iter()
                    .map(u32::to_string)
                    .collect::<Vec<_>>()
                    .join(","),
                key.key_id
            ))
        }
        Command::Key(KeyCommand::List { conn }) => {
            let client = conn.connect().await?;
            let keys = client.list_keys().await?;
            out(&format_keys(&keys))
        }
        Command::Key(KeyCommand::Pubkey { name, format, conn }) => {
            let client = conn.connect().await?;
            let key = client.public_key(&name).await?;
            match format {
                KeyFormat::Pem => out(&key.spki_pem),
                KeyFormat::Jwk => {
                    let pretty = serde_json::from_str::<serde_json::Value>(&key.jwk_json)
                        .and_then(|v| serde_json::to_string_pretty(&v))
                        .unwrap_or(key.jwk_json);
                    out(&format!("{pretty}\n"))
                }
            }
        }
        Command::Sign(args) => sign(args).await,
        Command::Derive(args) => {
            let client = args.conn.connect().await?;
            let credential = client.derive(&args.name, args.context.as_bytes()).await?;
            let hex = Zeroizing::new(hex::encode(credential.secret_bytes()));
            out(&format!("{}\n", hex.as_str()))
        }
        Command::Encrypt(args) => {
            let plaintext = Zeroizing::new(read_input(&args.input)?);
            let client = args.conn.connect().await?;
            let ct = client
                .encrypt(&args.name, &plaintext, args.aad.as_bytes())
                .await?;
            match &args.out {
                Some(path) => write_output(path, &ct, false),
                None => out(&format!("{}\n", hex::encode(&ct))),
            }
        }
        Command::Node(_) | Command::Coordinator(_) => Err(Error::Usage(
            "the node and coordinator subcommands run as their own processes".into(),
        )),
        Command::Decrypt(args) => {
            let ct = ciphertext_bytes(read_input(&args.input)?);
            let client = args.conn.connect().await?;
            let plaintext = client.decrypt(&args.name, &ct, args.aad.as_bytes()).await?;
            match &args.out {
                Some(path) => write_output(path, &plaintext, true),
                None => out_bytes(&plaintext),
            }
        }
    }
}

async fn sign(args: SignArgs) -> Result<()> {
    let data = read_input(&args.input)?;
    let input = if args.digest {
        SignInput::Digest(parse_digest(&data).ok_or_else(|| {
            Error::Usage(format!(
                "--digest: {} holds {} bytes, but a SHA-256 digest is 32 bytes (or 64 hex \
                 characters, as `sha256sum` prints); drop --digest to sign the file itself",
                args.input.display(),
                data.len()
            ))
        })?)
    } else {
        SignInput::Message(data)
    };
    let format = match args.format {
        SigFormat::Raw => Format::Raw,
        SigFormat::Der => Format::Der,
    };
    let client = args.conn.connect().await?;
    let sig = client.sign(&args.name, input, format).await?;
    match &args.out {
        Some(path) => write_output(path, &sig.signature, false),
        None => out(&format!("{}\n", hex::encode(&sig.signature))),
    }
}

/// A digest file: 32 raw bytes, or 64 hex characters (optionally followed by
/// whitespace and a file name, as `sha256sum` prints).
fn parse_digest(data: &[u8]) -> Option<[u8; 32]> {
    if let Ok(raw) = <[u8; 32]>::try_from(data) {
        return Some(raw);
    }
    let text = std::str::from_utf8(data).ok()?;
    let word = text.split_whitespace().next()?;
    let mut digest = [0u8; 32];
    hex::decode_to_slice(word, &mut digest).ok()?;
    Some(digest)
}

/// A ciphertext file: the raw encoding, or hex as `quorate encrypt` prints it. The raw
/// encoding starts with a version byte (1) that is not a hex digit, so the two cannot
/// be confused.
fn ciphertext_bytes(data: Vec<u8>) -> Vec<u8> {
    match std::str::from_utf8(&data).ok().map(str::trim) {
        Some(text) if !text.is_empty() => hex::decode(text).unwrap_or(data),
        _ => data,
    }
}

fn read_input(path: &Path) -> Result<Vec<u8>> {
    if path.as_os_str() == "-" {
        let mut data = Vec::new();
        std::io::stdin()
            .read_to_end(&mut data)
            .map_err(|e| Error::Usage(format!("--in -: cannot read stdin: {e}")))?;
        return Ok(data);
    }
    std::fs::read(path)
        .map_err(|e| Error::Usage(format!("--in {}: cannot read: {e}", path.display())))
}

/// Writes `data` to `path`; `secret` files (plaintext) get mode 0600.
fn write_output(path: &Path, data: &[u8], secret: bool) -> Result<()> {
    use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
    let err =
        |e: std::io::Error| Error::Other(format!("--out {}: cannot write: {e}", path.display()));
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(if secret { 0o600 } else { 0o644 })
        .open(path)
        .map_err(err)?;
    if secret {
        file.set_permissions(std::fs::Permissions::from_mode(0o600))
            .map_err(err)?;
    }
    file.write_all(data).map_err(err)?;
    file.flush().map_err(err)
}

/// Writes to stdout; a closed pipe (e.g. `| head`) is not an error.
fn out_bytes(data: &[u8]) -> Result<()> {
    let mut stdout = std::io::stdout().lock();
    match stdout.write_all(data).and_then(|()| stdout.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
            Err(Error::Other(format!("cannot write to stdout: {e}")))
        }
        _ => Ok(()),
    }
}

fn out(text: &str) -> Result<()> {
    out_bytes(text.as_bytes())
}

fn format_status(client: &Client, status: &ClusterStatus) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "cluster at {}: {} fragment nodes, threshold t = {} (any {} nodes sign)",
        client.addr(),
        status.n,
        status.t,
        status.t.saturating_add(1)
    );
    let healthy = status.nodes.iter().filter(|n| n.healthy).count();
    let _ = writeln!(s, "nodes ({healthy}/{} healthy):", status.nodes.len());
    for node in &status.nodes {
        let state = if node.healthy {
            "healthy".to_owned()
        } else if node.error.is_empty() {
            "UNHEALTHY".to_owned()
        } else {
            format!("UNHEALTHY: {}", node.error)
        };
        let version = if node.version.is_empty() {
            String::new()
        } else {
            format!("v{}  ", node.version)
        };
        let _ = writeln!(
            s,
            "  node {:<3} {:<22} {version}{state}",
            node.index, node.address
        );
    }
    if !status.keys.is_empty() {
        let _ = writeln!(s, "keys (current versions):");
        let width = status.keys.iter().map(|k| k.name.len()).max().unwrap_or(0);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
        for k in &status.keys {
            let renewed = k
                .renewed_at
                .map_or("shares never renewed".to_owned(), |at| {
                    format!("shares renewed {} ago", age(now.saturating_sub(at)))
                });
            let _ = writeln!(
                s,
                "  {:<width$}  {:<10} v{}  epoch {}  ({},{}) on nodes {}  {renewed}",
                k.name,
                k.profile.name(),
                k.version,
                k.epoch,
                k.n,
                k.t,
                k.holders
                    .iter()
                    .map(u32::to_string)
                    .collect::<Vec<_>>()
                    .join(",")
            );
        }
    }
    if status.pending_activations > 0 {
        let _ = writeln!(
            s,
            "renewals pending: {} (decided, not yet active on every node; the coordinator retries)",
            status.pending_activations
        );
    }
    if status.pools.is_empty() {
        let _ = writeln!(
            s,
            "presignature pools: none (signing keys get pools once created)"
        );
    } else {
        let _ = writeln!(s, "presignature pools:");
        let width = status
            .pools
            .iter()
            .map(|p| p.key_name.len())
            .max()
            .unwrap_or(0);
        for pool in &status.pools {
            let set = pool
                .signing_set
                .iter()
                .map(u32::to_string)
                .collect::<Vec<_>>()
                .join(",");
            let _ = writeln!(
                s,
                "  {:<width$}  signing set {{{set}}}  {} ready",
                pool.key_name, pool.depth
            );
        }
    }
    s
}

/// A duration in seconds as operators read it: `42s`, `5m`, `3h`, `2d`.
fn age(secs: i64) -> String {
    if secs < 120 {
        format!("{secs}s")
    } else if secs < 7200 {
        format!("{}m", secs / 60)
    } else if secs < 172_800 {
        format!("{}h", secs / 3600)
    } else {
        format!("{}d", secs / 86_400)
    }
}

fn format_keys(keys: &[KeyInfo]) -> String {
    use std::fmt::Write as _;
    if keys.is_empty() {
        return "no keys yet: create one with `quorate key create NAME [--profile raw|token|derive|decrypt]`\n"
            .to_owned();
    }
    let width = keys.iter().map(|k| k.name.len()).max().unwrap_or(0).max(4);
    let mut s = String::new();
    let _ = writeln!(s, "{:<width$}  PROFILE     N    T    EPOCH  KEY ID", "NAME");
    for k in keys {
        let _ = writeln!(
            s,
            "{:<width$}  {:<10}  {:<3}  {:<3}  {:<5}  {}",
            k.name,
            k.profile.name(),
            k.n,
            k.t,
            k.epoch,
            k.key_id
        );
    }
    s
}

async fn dev(args: DevArgs) -> Result<()> {
    let opts = DevOptions {
        dir: args.dir,
        nodes: args.nodes,
        threshold: args.threshold,
        domain: args.domain,
        node_bin: args.node_bin,
        coordinator_bin: args.coordinator_bin,
        pool_target: args.pool_target,
        pool_timeout: Duration::from_secs(args.pool_timeout),
        coordinator_args: Vec::new(),
        node_evidence: true,
        agent_listener: args.agent_listen,
        allow_classic_token_endpoints: args.allow_classic_token_endpoints,
    };
    let Some(mut cluster) = DevCluster::start(&opts).await? else {
        return Ok(());
    };
    out(&next_steps(&cluster))?;
    let outcome = cluster.wait().await;
    match &outcome {
        WaitOutcome::Signal(name) => eprintln!("\nreceived {name}: stopping the dev cluster"),
        WaitOutcome::ChildExited { name, status, .. } => {
            eprintln!("\n{name} exited unexpectedly ({status}): stopping the dev cluster");
        }
    }
    let dir = cluster.dir().to_owned();
    cluster.stop().await;
    match outcome {
        WaitOutcome::Signal(_) => {
            eprintln!(
                "dev cluster stopped; its keys and data stay in {} (`quorate dev --dir {}` reuses them)",
                dir.display(),
                shell_quote(&dir.display().to_string())
            );
            Ok(())
        }
        WaitOutcome::ChildExited { name, status, log } => Err(Error::Other(format!(
            "the dev cluster stopped because {name} exited ({status}); see its log {}",
            log.display()
        ))),
    }
}

/// How to invoke this CLI in printed commands: `quorate` if that is what `PATH` finds,
/// else this executable's path.
fn cli_command() -> String {
    let Ok(me) = std::env::current_exe().and_then(|p| p.canonicalize()) else {
        return "quorate".to_owned();
    };
    let on_path = std::env::var_os("PATH").is_some_and(|paths| {
        std::env::split_paths(&paths).any(|dir| {
            dir.join("quorate")
                .canonicalize()
                .is_ok_and(|found| found == me)
        })
    });
    if on_path {
        "quorate".to_owned()
    } else {
        shell_quote(&me.display().to_string())
    }
}

fn next_steps(cluster: &DevCluster) -> String {
    let q = cli_command();
    let env = shell_quote(&cluster.env_file().display().to_string());
    let pools = if cluster.pools_filled() {
        "its presignature pools are filled"
    } else {
        "its presignature pools are still filling"
    };
    let agents = match cluster.agent_addr() {
        None => String::new(),
        Some(at) => format!(
            "\nAgents with an X.509-SVID get tokens on the agent listener {at}:\n\
             \x20 {q} token issue $({q} dev svid --agent ci/job-1) --audience dev\n"
        ),
    };
    format!(
        "\nQuorate dev cluster is ready: {n} fragment nodes (t = {t}) and a coordinator at {addr}.\n\
         Key `{key}` (ES256) exists and {pools}.\n\
         Certificates, data and env file: {dir}\n\
         Logs: {logs}\n\
         \n\
         In another shell:\n\
         \x20 source {env}\n\
         \x20 {q} status\n\
         \x20 {q} key list\n\
         \x20 echo 'hello, quorate' > msg.txt\n\
         \x20 {q} sign {key} --in msg.txt --format raw\n\
         \x20 {q} sign {key} --in msg.txt --format der --out msg.sig\n\
         \x20 {q} key pubkey {key} --format pem > {key}.pem\n\
         \x20 openssl dgst -sha256 -verify {key}.pem -signature msg.sig msg.txt\n\
         \x20 {q} key create app-creds --purpose derive\n\
         \x20 {q} derive app-creds --context 'agent=a1;task=t1'\n\
         \x20 {q} key create vault --purpose decrypt\n\
         \x20 {q} encrypt vault --in msg.txt --out msg.enc\n\
         \x20 {q} decrypt vault --in msg.enc\n\
         {agents}\
         \n\
         Press Ctrl-C to stop the cluster; `{q} dev --dir {dir_arg}` starts it again with the same keys.\n\
         QUORATE_READY dev env={env_plain}\n",
        n = cluster.nodes(),
        t = cluster.threshold(),
        addr = cluster.addr(),
        key = dev::DEFAULT_KEY,
        dir = cluster.dir().display(),
        dir_arg = shell_quote(&cluster.dir().display().to_string()),
        logs = cluster.logs_dir().display(),
        env_plain = cluster.env_file().display(),
    )
}

fn admin_init(args: &InitArgs) -> Result<()> {
    ThresholdParams::new(args.nodes, args.threshold).map_err(|e| {
        Error::Usage(format!(
            "--nodes {} --threshold {}: {e}",
            args.nodes, args.threshold
        ))
    })?;
    let files = pki::write_cluster(&args.dir, &args.domain, args.nodes, args.force)
        .map_err(|e| Error::Config(e.to_string()))?;
    let dir = files.dir.canonicalize().unwrap_or(files.dir.clone());
    let p = |path: &Path| {
        let abs = dir.join(path.file_name().unwrap_or(path.as_os_str()));
        shell_quote(&abs.display().to_string())
    };
    let d = shell_quote(&args.domain);
    let mut listing: Vec<(String, String)> = vec![
        (
            "ca.pem".to_owned(),
            "the cluster CA certificate: every process and client needs it".to_owned(),
        ),
        (
            "ca-key.pem".to_owned(),
            "the CA's private key: keep it offline; it is needed only to issue certificates"
                .to_owned(),
        ),
    ];
    for node in &files.nodes {
        if let quorate_proto::tls::Role::Node(i) = node.role {
            listing.push((
                format!("node-{i}.pem, node-{i}-key.pem"),
                format!("fragment node {i}"),
            ));
        }
    }
    listing.push((
        "coordinator.pem, coordinator-key.pem".to_owned(),
        "the coordinator".to_owned(),
    ));
    listing.push((
        "client-admin.pem, client-admin-key.pem".to_owned(),
        "the admin client (the quorate CLI)".to_owned(),
    ));
    let width = listing.iter().map(|(f, _)| f.len()).max().unwrap_or(0);
    let mut s = format!(
        "Wrote a new cluster CA and certificates for trust domain {} to {}:\n",
        args.domain,
        dir.display()
    );
    for (file, what) in &listing {
        s.push_str(&format!("  {file:<width$}  {what}\n"));
    }
    s.push_str(
        "Private keys have mode 0600. Copy each process's certificate, key and ca.pem to its machine.\n\
         \n\
         Start each fragment node (ideally on separate machines; --init-kek creates the node's\n\
         key-encryption key on first start). Each node's operator writes its own ceiling for\n\
         token keys (JSON: token_issuers, token_typs, max_token_ttl_seconds; see the README's\n\
         \"Key profiles\"); a node without --ceiling takes part in no token key:\n",
    );
    for node in &files.nodes {
        if let quorate_proto::tls::Role::Node(i) = node.role {
            s.push_str(&format!(
                "  quorate-node --listen 0.0.0.0:{port} --data-dir /var/lib/quorate/node-{i} --cert {} --key {} --ca {} --domain {d} --ceiling /etc/quorate/node-{i}-ceiling.json --init-kek\n",
                p(&node.cert),
                p(&node.key),
                p(&files.ca_cert),
                port = 7100 + u32::from(i),
            ));
        }
    }
    let node_flags: Vec<String> = files
        .nodes
        .iter()
        .filter_map(|node| match node.role {
            quorate_proto::tls::Role::Node(i) => {
                Some(format!("--node {i}=NODE{i}_HOST:{}", 7100 + u32::from(i)))
            }
            _ => None,
        })
        .collect();
    s.push_str(&format!(
        "\nThen the coordinator, naming every node's address:\n\
         \x20 quorate-coordinator --listen 0.0.0.0:7100 --data-dir /var/lib/quorate/coordinator --cert {} --key {} --ca {} --domain {d} --threshold {} {}\n\
         \n\
         Then point the CLI at the coordinator:\n\
         \x20 export QUORATE_ADDR=COORDINATOR_HOST:7100 QUORATE_CACERT={} QUORATE_CERT={} QUORATE_KEY={} QUORATE_DOMAIN={d}\n\
         \x20 quorate status\n",
        p(&files.coordinator.cert),
        p(&files.coordinator.key),
        p(&files.ca_cert),
        args.threshold,
        node_flags.join(" "),
        p(&files.ca_cert),
        p(&files.admin.cert),
        p(&files.admin.key),
    ));
    out(&s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_are_raw_or_hex() {
        let raw = [7u8; 32];
        assert_eq!(parse_digest(&raw), Some(raw));
        let hex_line = format!("{}  msg.txt\n", hex::encode(raw));
        assert_eq!(parse_digest(hex_line.as_bytes()), Some(raw));
        assert_eq!(parse_digest(b"hello"), None);
        assert_eq!(parse_digest(&[0u8; 33]), None);
    }

    #[test]
    fn ciphertexts_are_raw_or_hex() {
        let raw = vec![1u8, 0x71, 0, 2];
        assert_eq!(ciphertext_bytes(raw.clone()), raw);
        assert_eq!(ciphertext_bytes(b"01710002\n".to_vec()), raw);
    }

    #[test]
    fn cli_definition_is_consistent() {
        use clap::CommandFactory as _;
        Cli::command().debug_assert();
    }
}
