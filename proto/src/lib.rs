//! # quorate-proto
//!
//! Quorate's gRPC contracts and the code every service shares to speak them:
//! - [`fragment`]: the fragment-node API (coordinator → node);
//! - [`api`]: the public KeyService and ClusterService (clients → coordinator);
//! - [`audit`]: the audit event format, hash chaining and the offline chain and
//!   checkpoint verifier (the coordinator appends, `quorate audit verify` checks);
//! - [`convert`]: conversions between wire messages and `quorate-crypto` domain types;
//! - [`dpop`]: RFC 9449 DPoP keys, proofs, proof verification and the replay cache;
//! - [`json`]: JSON objects with unique member names at every depth (JWS parts);
//! - [`profile`]: key profiles (raw, token, checkpoint, derive, decrypt) that nodes enforce;
//! - [`rules`]: token rules of token keys (coordinator and nodes share them);
//! - [`tls`]: the only place rustls configurations are built — TLS 1.3 only, key
//!   exchange X25519MLKEM768 only, mutual TLS, peer roles read from certificates;
//! - [`pki`]: the cluster CA and certificate issuance (rcgen);
//! - [`transport`]: tonic servers and channels over those TLS configurations.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

/// Generated fragment-node API (`proto/fragment.proto`).
#[allow(
    missing_docs,
    clippy::all,
    clippy::pedantic,
    clippy::unwrap_used,
    clippy::indexing_slicing
)]
pub mod fragment {
    tonic::include_proto!("quorate.fragment.v1");
}

/// Generated public API (`proto/quorate.proto`).
#[allow(
    missing_docs,
    clippy::all,
    clippy::pedantic,
    clippy::unwrap_used,
    clippy::indexing_slicing
)]
pub mod api {
    tonic::include_proto!("quorate.v1");
}

pub mod audit;
pub mod convert;
pub mod dpop;
pub mod https;
pub mod json;
pub mod metrics;
pub mod pki;
pub mod process;
pub mod profile;
pub mod rules;
pub mod tls;
pub mod transport;
