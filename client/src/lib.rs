//! # quorate-client
//!
//! A typed async client for a Quorate cluster, and the machinery behind the `quorate`
//! command-line tool.
//!
//! - [`Client`] talks to the coordinator's public API (KeyService and ClusterService)
//!   over post-quantum mutual TLS (TLS 1.3, X25519MLKEM768 only; see
//!   [`quorate_proto::tls`]). Derivation and decryption are confidential to the caller:
//!   the client sends a fresh requester key with every request and unmasks the reply
//!   itself (DESIGN.md §4.6), so neither the coordinator nor any node learns the
//!   credential or the plaintext.
//! - [`ClientConfig`] holds the connection settings: the coordinator's address, the
//!   cluster CA, and a client certificate and key, from flags or the environment
//!   (`QUORATE_ADDR`, `QUORATE_CACERT`, `QUORATE_CERT`, `QUORATE_KEY`, `QUORATE_DOMAIN`).
//! - [`Error`] separates what the user can fix locally (exit code 2), an unreachable
//!   cluster (3) and a request the cluster refused (4); [`Error::exit_code`] gives the
//!   code the CLI exits with.
//! - [`keyfmt`] renders public keys as SPKI PEM and JWK.
//! - [`dev`] runs a local development cluster (`quorate dev`): certificates, fragment
//!   nodes and a coordinator as child processes, a default signing key, filled
//!   presignature pools, and an environment file for the other commands.
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
pub mod dev;
pub mod dev_issuer;
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
