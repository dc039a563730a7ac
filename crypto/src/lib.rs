//! # quorate-crypto
//!
//! The pure protocol core of Quorate (DESIGN.md §4): Feldman dealing, hybrid
//! post-quantum sealing, zero-knowledge proofs, distributed key generation and refresh,
//! presignature batches, one-round threshold ES256 signing, and threshold Diffie–Hellman
//! for confidential derivation and decryption.
//!
//! Every protocol step is a function from typed inputs (and `&mut impl CryptoRng`) to a
//! typed output or an [`Error`]. There is no I/O, no async, no clock and no environment
//! access here: fragment nodes and the coordinator call these functions and persist and
//! transport what they return. Every message has a strict, versioned wire encoding
//! ([`wire`]).
//!
//! Secrets live in types that zeroize on drop, never print, and cannot be compared with
//! `==` ([`secret`]). A whole private key is never reconstructed outside test support
//! gated by the loudly named `insecure-test-only-key-reconstruction` feature.
#![forbid(unsafe_code)]
#![deny(missing_docs)]
#![cfg_attr(
    not(test),
    deny(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::panic,
        clippy::indexing_slicing
    )
)]

pub mod batch;
pub mod dkg;
pub mod ecies;
pub mod error;
pub mod feldman;
pub mod group;
pub mod hash;
pub mod identity;
pub mod keys;
pub mod opcount;
pub mod params;
pub mod presign;
pub mod proofs;
pub mod seal;
pub mod secret;
pub mod sign;
pub mod tdh;
pub mod wire;

#[cfg(any(test, feature = "test-support"))]
pub mod sim;

#[cfg(feature = "insecure-test-only-key-reconstruction")]
pub mod insecure_reconstruct;
pub use error::{Error, Fault, Refusal};
pub use group::{Point, Scalar};
pub use params::{PartyIndex, PartySet, ThresholdParams};
pub use secret::SecretScalar;
