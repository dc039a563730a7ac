//! # quorate-coordinator
//!
//! The coordinator composes threshold operations across fragment nodes without ever
//! holding a share: it relays sealed, signed round messages between nodes, keeps the
//! public data of keys and presignatures ([`store`]), keeps presignature pools filled in
//! the background ([`pools`]), batches concurrent sign requests per node, verifies every
//! combined signature and names culprits ([`cluster`]), and serves the public API
//! ([`service`]).
#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod app;
pub mod audit;
pub use quorate_authz::authn;
pub mod cluster;
pub mod config;
pub mod election;
pub mod identity;
pub mod lifecycle;
pub mod pg;
pub use quorate_authz::policy;
pub mod pools;
pub mod service;
pub mod store;
