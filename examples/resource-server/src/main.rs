//! `quorate-resource-server`: the example resource server (see the library docs).
//!
//! Exit codes: 2 bad flags, 3 issuer discovery failed, 1 anything else.
#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::Parser;
use quorate_example_resource_server::{Args, Config, Server, StartError};

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    quorate_proto::process::init_tracing(false);
    let config = match Config::from_args(args) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!("{e}");
            return ExitCode::from(2);
        }
    };
    let server = match Server::bind(config).await {
        Ok(s) => s,
        Err(e) => {
            tracing::error!("{e}");
            return ExitCode::from(match e {
                StartError::Discovery(_) => 3,
                _ => 1,
            });
        }
    };
    ready(&server);
    match server
        .serve(quorate_proto::process::shutdown_signal())
        .await
    {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("server failed: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The readiness line on stdout.
#[allow(
    clippy::print_stdout,
    reason = "the readiness line is read by tests and scripts"
)]
fn ready(server: &Server) {
    println!("QUORATE_READY resource-server addr={}", server.addr());
}
