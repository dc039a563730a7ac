//! The `quorate-coordinator` process: configuration, tracing, serving and graceful drain.

use std::process::ExitCode;

use crate::cluster::Cluster;
use crate::config::{Args, Config};
use crate::pools;
use crate::service::Api;
use crate::store::Store;
use quorate_proto::api::cluster_service_server::ClusterServiceServer;
use quorate_proto::api::key_service_server::KeyServiceServer;
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
                eprintln!("quorate-coordinator: {e}");
            }
            return ExitCode::from(2);
        }
    };
    match run(cfg).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("quorate-coordinator: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cfg: Config) -> Result<(), String> {
    let identity = Identity::from_pem_files(&cfg.cert, &cfg.key).map_err(|e| e.to_string())?;
    let trust = Trust::from_pem_file(&cfg.ca, &cfg.domain).map_err(|e| e.to_string())?;
    match identity.role(&cfg.domain).map_err(|e| e.to_string())? {
        Role::Coordinator => {}
        other => {
            return Err(format!(
                "{} holds the certificate of {other}, not of the coordinator",
                cfg.cert.display()
            ));
        }
    }
    std::fs::create_dir_all(&cfg.data_dir)
        .map_err(|e| format!("cannot create {}: {e}", cfg.data_dir.display()))?;
    let store = Store::open(&cfg.data_dir.join("coordinator.redb")).map_err(|e| e.to_string())?;
    let client_tls = tls::client_config(&identity, &trust).map_err(|e| e.to_string())?;
    let mut channels = Vec::new();
    for (i, addr) in &cfg.nodes {
        let ch =
            transport::connect_lazy(*addr, &Role::Node(i.get()), &cfg.domain, client_tls.clone())
                .map_err(|e| e.to_string())?;
        channels.push((*i, *addr, ch));
    }
    let cluster = Cluster::new(
        cfg.params,
        trust.clone(),
        channels,
        store,
        cfg.record_relay.clone(),
    )
    .map_err(|e| e.to_string())?;
    tokio::spawn(pools::fill_forever(cluster.clone(), cfg.marks));
    if let Some(m) = cfg.metrics_listen {
        let c = cluster.clone();
        let at = quorate_proto::metrics::serve(m, std::sync::Arc::new(move || c.render_metrics()))
            .await
            .map_err(|e| format!("cannot serve metrics on {m}: {e}"))?;
        tracing::info!(%at, "metrics at http://{at}/metrics");
    }
    let server_tls =
        tls::server_config(&identity, &trust, &[RoleKind::Client]).map_err(|e| e.to_string())?;
    let (listener, addr) = transport::bind(cfg.listen)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", cfg.listen))?;
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter.set_serving::<KeyServiceServer<Api>>().await;
    let api = Api::new(cluster, cfg.domain.clone());
    tracing::info!(%addr, n = cfg.params.n(), t = cfg.params.t(), "coordinator listening");
    #[allow(
        clippy::print_stdout,
        reason = "the readiness line is read by `quorate dev` and tests"
    )]
    {
        println!("QUORATE_READY coordinator addr={addr}");
    }
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tonic::transport::Server::builder()
        .add_service(health)
        .add_service(KeyServiceServer::new(api.clone()))
        .add_service(ClusterServiceServer::new(api))
        .serve_with_incoming_shutdown(transport::incoming(listener, server_tls), async {
            let _ = stop_rx.await;
        });
    quorate_proto::process::serve_until_signal(server, stop_tx, cfg.grace).await
}
