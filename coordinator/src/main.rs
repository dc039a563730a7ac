//! `quorate-coordinator`.
#![forbid(unsafe_code)]

use clap::Parser;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    quorate_coordinator::app::main_with(quorate_coordinator::config::Args::parse()).await
}
