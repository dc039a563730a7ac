//! # quorate-authz
//!
//! What decides whether a key may be used for an agent (DESIGN.md §7, §9), in one
//! implementation that the coordinator and every fragment node link, so that both decide
//! a request the same way:
//! - [`authn`]: verifying agent attestations (OIDC JWTs, JWT-SVIDs, registered clients'
//!   `private_key_jwt` assertions, X.509-SVIDs) against a trust configuration;
//! - [`policy`]: the Cedar policy engine, its schema and the default policy set;
//! - [`bundle`]: operator-signed policy bundles and approver-signed approvals, which
//!   every node verifies itself;
//! - [`credential`]: the canonical context of a confidential credential.
//!
//! Nodes and coordinator still meet only over gRPC; this crate holds no network service.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod authn;
pub mod bundle;
pub mod credential;
pub mod policy;
