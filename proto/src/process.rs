//! Process scaffolding shared by `quorate-node` and `quorate-coordinator` (STYLE.md
//! §5): tracing set up first (filter from `QUORATE_LOG`, plain or JSON, to stderr), and
//! serving until SIGTERM/SIGINT followed by a drain with a grace timeout.

use std::future::Future;
use std::time::Duration;

use tokio::sync::oneshot;

/// Sets up tracing; a second call in the same process is a no-op.
pub fn init_tracing(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("QUORATE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        let _ = b.json().try_init();
    } else {
        let _ = b.try_init();
    }
}

/// Resolves on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {},
        () = term => {},
    }
}

/// Runs `server` (built with `serve_with_incoming_shutdown(.., stop_rx)`) until it ends
/// or a signal arrives; then stops accepting (`stop`) and lets in-flight requests finish
/// for at most `grace`.
pub async fn serve_until_signal<F>(
    server: F,
    stop: oneshot::Sender<()>,
    grace: Duration,
) -> Result<(), String>
where
    F: Future<Output = Result<(), tonic::transport::Error>>,
{
    let mut server = std::pin::pin!(server);
    tokio::select! {
        r = &mut server => return r.map_err(|e| format!("server failed: {e}")),
        () = shutdown_signal() => {}
    }
    tracing::info!("shutting down: draining in-flight requests");
    let _ = stop.send(());
    match tokio::time::timeout(grace, server).await {
        Ok(r) => r.map_err(|e| format!("server failed: {e}")),
        Err(_) => {
            tracing::warn!("drain timed out");
            Ok(())
        }
    }
}
