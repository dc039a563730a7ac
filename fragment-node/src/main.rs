//! `quorate-node`.
#![forbid(unsafe_code)]

use clap::Parser;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    quorate_node::app::main_with(quorate_node::config::Args::parse()).await
}
