//! # quorate-cli
//!
//! The `quorate` command-line tool (`src/main.rs`) and the parts of it other programs
//! reuse. Unlike the client library (`quorate-client`), this crate links the fragment
//! node, the coordinator and the policy engine: `quorate` runs them as its hidden `node`
//! and `coordinator` subcommands, backs up and restores node stores, and checks and signs
//! policy bundles.
//!
//! - [`dev`] runs a local development cluster (`quorate dev`): certificates, fragment
//!   nodes and a coordinator as child processes, a default signing key, filled
//!   presignature pools, and an environment file for the other commands. The load
//!   generator (`quorate-bench`) starts its clusters with it.
//! - [`dev_issuer`] is that cluster's OIDC issuer, operator key and approver key:
//!   attestations for `quorate dev attest` and the signed dev policy bundle.
//!
//! Connection settings come from flags or the environment variables the client library
//! reads (`QUORATE_ADDR`, `QUORATE_CACERT`, `QUORATE_CERT`, `QUORATE_KEY`,
//! `QUORATE_DOMAIN`; see `quorate_client::ClientConfig::from_env`).
#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod dev;
pub mod dev_issuer;
