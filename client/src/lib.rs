//! # quorate-client
//!
//! A typed async client library for a Quorate cluster. It links only the protocol math
//! (`quorate-crypto`) and the wire contracts (`quorate-proto`): no fragment-node,
//! coordinator or policy-engine code, so integrators can depend on it alone. The
//! `quorate` command-line tool, built on this library, is the `quorate-cli` crate.
//!
//! - [`Client`] talks to the coordinator's public API — KeyService, ClusterService, and
//!   the identity, audit and approval services — over post-quantum mutual TLS (TLS 1.3,
//!   X25519MLKEM768 only; see [`quorate_proto::tls`]). Derivation, decryption and
//!   credential requests are confidential to the caller: the client sends a fresh
//!   requester key with every request and unmasks the reply itself (DESIGN.md §4.6), so
//!   neither the coordinator nor any node learns the credential or the plaintext.
//! - [`Client`] fails over between the coordinators of a cluster (several serve one
//!   store): a call that failed in a retryable way goes to the next coordinator, within
//!   the call's timeout; which calls are retried, and when, is in [`Client`]'s docs.
//! - [`ClientConfig`] holds the connection settings: the coordinators' addresses, the
//!   cluster CA, and a client certificate and key. [`ClientConfig::from_env`] reads them
//!   from the environment:
//!
//!   | variable | meaning |
//!   | --- | --- |
//!   | `QUORATE_ADDR` ([`ENV_ADDR`]) | the coordinators' public API: `HOST:PORT`, several separated by commas, or a name with a record per coordinator |
//!   | `QUORATE_CACERT` ([`ENV_CACERT`]) | the cluster CA certificate (PEM file) |
//!   | `QUORATE_CERT` ([`ENV_CERT`]) | this client's certificate (PEM file) |
//!   | `QUORATE_KEY` ([`ENV_KEY`]) | this client's private key (PKCS#8 PEM file) |
//!   | `QUORATE_DOMAIN` ([`ENV_DOMAIN`]) | the trust domain, default [`DEFAULT_DOMAIN`] |
//!
//!   [`ClientConfig::from_options`] takes the same settings from elsewhere (flags), and
//!   [`ClientConfig::admin`] those of a cluster directory's admin client.
//! - [`Error`] separates what the user can fix locally (exit code 2), an unreachable
//!   cluster (3), a request the cluster refused or a failed check (4) and one waiting
//!   for approval (5); [`Error::exit_code`] gives the code a command-line tool exits with.
//! - [`keyfmt`] renders public keys as SPKI (DER, PEM) and JWK.
//!
//! ```no_run
//! # async fn demo() -> Result<(), quorate_client::Error> {
//! use quorate_client::{Client, ClientConfig, Format, SignInput};
//!
//! let config = ClientConfig::from_env()?;
//! let client = Client::connect(&config).await?;
//! let sig = client
//!     .sign("default", SignInput::Message(b"hello".to_vec()), Format::Der)
//!     .await?;
//! println!("{}", hex::encode(&sig.signature));
//! # Ok(())
//! # }
//! ```
#![forbid(unsafe_code)]
#![deny(missing_docs)]

mod client;
mod config;
mod error;
pub mod keyfmt;

pub use client::identity::{
    CredentialFor, CredentialGrant, ExchangeRequest, RevokeTarget, TokenRequest,
};
pub use client::{
    Client, ClusterStatus, DEFAULT_TIMEOUT, Format, KeyInfo, NodeStatus, PoolStatus, PublicKey,
    SignInput, Signature,
};
pub use config::{
    ClientConfig, DEFAULT_DOMAIN, ENV_ADDR, ENV_CACERT, ENV_CERT, ENV_DOMAIN, ENV_KEY,
};
pub use error::{Error, Result};
pub use quorate_crypto::keys::KeyPurpose;
pub use quorate_crypto::tdh::Credential;
pub use quorate_proto::profile::KeyProfile;
pub use quorate_proto::rules::TokenRules;
