//! # quorate-pkcs11
//!
//! `libquorate_pkcs11.so`: a PKCS#11 module (Cryptoki 2.40) over the Quorate client
//! library, so that software made for hardware security modules — OpenSSL through
//! `libengine-pkcs11-openssl`, OpenSC's `pkcs11-tool`, OpenSSH (`ssh-keygen -D`,
//! `PKCS11Provider`), `python-pkcs11` — signs with threshold keys whose private part
//! exists only as shares on the fragment nodes.
//!
//! - **Slots**: one per cluster, from the file named by `QUORATE_PKCS11_CONFIG`, else one
//!   (label `quorate`) from the `QUORATE_*` variables of the client library ([`config`]).
//!   Each slot has one token and one client connection, shared by all its sessions.
//! - **Login**: none. The client certificate of the mutual-TLS connection is the
//!   authority, so `C_GetTokenInfo` does not set `CKF_LOGIN_REQUIRED` and `C_Login`
//!   answers `CKR_USER_ALREADY_LOGGED_IN`.
//! - **Objects**: each key of the `raw` profile (DESIGN.md §9) is a private-key object
//!   (`CKA_SIGN`) and a public-key object, both `CKK_EC` on P-256 with `CKA_LABEL` = the
//!   key's name ([`object`]). Token, checkpoint, derive and decrypt keys are not objects
//!   of the token: they cannot be signed with here. `C_DeriveKey` (also
//!   `CKM_ECDH1_DERIVE`) is `CKR_MECHANISM_INVALID`: threshold DH (§4.6) never gives out
//!   a bare shared secret.
//! - **Mechanisms**: `CKM_ECDSA` (a digest in — 32 bytes for SHA-256, other lengths by
//!   FIPS 186-5 `bits2int` — and `r || s`, 64 bytes, out) and `CKM_ECDSA_SHA256` (the
//!   message in, hashed in this process, single- or multi-part). The cluster signs the
//!   digest; the message never leaves the process.
//! - **Threads**: safe for concurrent use as `CKF_OS_LOCKING_OK` asks; sessions sign in
//!   parallel.
//! - **Errors**: every refusal maps to its `CKR_*` code and its reason is logged to
//!   stderr (filter: `QUORATE_LOG`, default `warn`); a panic is caught at the boundary
//!   and returned as `CKR_GENERAL_ERROR`.
//!
//! The one exported symbol is [`C_GetFunctionList`]. This crate is the only one besides
//! the aws-lc boundary that may use `unsafe`, and only in its C ABI layer, each block
//! with a `// SAFETY:` comment.

mod abi;
pub mod config;
pub mod object;
pub mod token;

pub use abi::{C_GetFunctionList, initialize_with};
/// The PKCS#11 types and constants this module speaks (from `cryptoki-sys`).
pub use cryptoki_sys;
