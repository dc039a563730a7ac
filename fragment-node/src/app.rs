//! The `quorate-node` process: configuration, tracing, serving and graceful drain.

use std::process::ExitCode;
use std::sync::Arc;

use crate::config::{Args, Config};
use crate::service::{Node, Service};
use crate::store::{Kek, Store};
use quorate_crypto::identity::IdentityKey;
use quorate_crypto::params::PartyIndex;
use quorate_proto::fragment::fragment_node_server::FragmentNodeServer;
use quorate_proto::tls::{self, Identity, Role, RoleKind, Trust};
use quorate_proto::transport;

/// Runs the process with parsed arguments: sets up tracing, validates the
/// configuration (exit 2 on errors), serves until SIGTERM/SIGINT.
pub async fn main_with(args: Args) -> ExitCode {
    quorate_proto::process::init_tracing(args.log_format == "json");
    let cfg = match args.build() {
        Ok(c) => c,
        Err(errors) => {
            for e in errors {
                eprintln!("quorate-node: {e}");
            }
            return ExitCode::from(2);
        }
    };
    match run(cfg).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("quorate-node: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cfg: Config) -> Result<(), String> {
    let identity = Identity::from_pem_files(&cfg.cert, &cfg.key).map_err(|e| e.to_string())?;
    let trust = Trust::from_pem_file(&cfg.ca, &cfg.domain).map_err(|e| e.to_string())?;
    let index = match identity.role(&cfg.domain).map_err(|e| e.to_string())? {
        Role::Node(i) => PartyIndex::new(i).ok_or("node index out of range")?,
        other => {
            return Err(format!(
                "{} holds the certificate of {other}, not of a node: use a node certificate from `quorate admin init`",
                cfg.cert.display()
            ));
        }
    };
    let signing = identity.signing_key_bytes().map_err(|e| e.to_string())?;
    let id_key = IdentityKey::from_secret_bytes(&signing[..]).map_err(|e| e.to_string())?;
    std::fs::create_dir_all(&cfg.data_dir)
        .map_err(|e| format!("cannot create {}: {e}", cfg.data_dir.display()))?;
    let kek = Kek::load(&cfg.kek_file, cfg.init_kek).map_err(|e| e.to_string())?;
    let store = Store::open(&cfg.data_dir.join("node.redb"), &kek).map_err(|e| e.to_string())?;
    let evidence = match cfg
        .ceiling
        .as_ref()
        .and_then(|c| c.trust_config().map(|path| (path, c.token_issuers())))
    {
        None => None,
        Some((path, issuers)) => Some(
            crate::evidence::EvidenceCheck::load(path, &cfg.domain, issuers)
                .await
                .map_err(|e| e.join("\n"))?,
        ),
    };
    if evidence.is_some() {
        tracing::info!("token evidence: this node verifies every token's attestation itself");
    }
    let policy = match cfg.ceiling.as_ref().and_then(|c| c.operator_key()) {
        None => None,
        Some(key) => {
            let stored = store.policy_bundle().map_err(|e| e.to_string())?;
            Some(crate::policy::NodePolicy::new(*key, stored.as_deref()))
        }
    };
    let node = Node::new(
        index,
        cfg.domain.clone(),
        id_key,
        identity.cert_chain().to_vec(),
        trust.clone(),
        store,
        cfg.fail_point,
    )
    .map_err(|e| e.to_string())?
    .with_ceiling(cfg.ceiling.clone())
    .with_evidence(evidence)
    .with_policy(policy);
    let server_tls = tls::server_config(&identity, &trust, &[RoleKind::Coordinator])
        .map_err(|e| e.to_string())?;
    let (listener, addr) = transport::bind(cfg.listen)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", cfg.listen))?;
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter.set_serving::<FragmentNodeServer<Service>>().await;
    if let Some(m) = cfg.metrics_listen {
        let metrics = node.metrics();
        let i = index.get();
        let at = quorate_proto::metrics::serve(m, Arc::new(move || metrics.render(i)))
            .await
            .map_err(|e| format!("cannot serve metrics on {m}: {e}"))?;
        tracing::info!(%at, "metrics at http://{at}/metrics");
    }
    let node = Arc::new(node);
    let kept = Arc::clone(&node);
    let service = Service::new(node);
    tracing::info!(node = index.get(), %addr, "fragment node listening");
    // A parent process (`quorate dev`, tests) reads this line to learn the address.
    #[allow(
        clippy::print_stdout,
        reason = "the readiness line is read by `quorate dev` and tests"
    )]
    {
        println!("QUORATE_READY node={} addr={addr}", index.get());
    }
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tonic::transport::Server::builder()
        .add_service(health)
        .add_service(FragmentNodeServer::new(service).max_decoding_message_size(256 * 1024 * 1024))
        .serve_with_incoming_shutdown(transport::incoming(listener, server_tls), async {
            let _ = stop_rx.await;
        });
    let served = quorate_proto::process::serve_until_signal(server, stop_tx, cfg.grace).await;
    if let Some(secrets) = kept.presignature_secrets_for_test() {
        // Each share: its length (u32, big-endian), then its secret encoding.
        let mut dump = Vec::new();
        for b in secrets {
            dump.extend_from_slice(&u32::try_from(b.len()).unwrap_or(u32::MAX).to_be_bytes());
            dump.extend_from_slice(&b);
        }
        let at = cfg.data_dir.join("presignatures.dump");
        std::fs::write(&at, dump).map_err(|e| format!("cannot write {}: {e}", at.display()))?;
    }
    served
}
