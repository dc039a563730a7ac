//! # quorate-node
//!
//! A fragment node: it holds key shares and presignature shares sealed at rest
//! ([`store`]), and runs the protocol steps of `quorate-crypto` for the coordinator over
//! post-quantum mutual TLS ([`service`]). It never sends a share except sealed to
//! another node or as a publicly checkable protocol output.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod app;
pub mod backup;
pub mod ceiling;
pub mod config;
pub mod evidence;
pub mod policy;
pub mod presigs;
pub mod rules;
pub mod service;
pub mod store;
