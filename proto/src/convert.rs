//! Conversions between wire messages and `quorate-crypto` domain types, and the
//! verification of node rosters.
//!
//! A node never trusts the coordinator's word for another node's keys: every
//! [`fragment::NodeInfo`] carries the node's certificate chain and a signature, by the
//! certificate's key, over its index and hybrid KEM key; [`verify_roster`] checks the
//! chain against the cluster CA, the role in the certificate against the claimed index,
//! and the signature — so a coordinator cannot swap in a key of its own.

use quorate_crypto::identity::{IdentityKey, IdentityPublic, NodePublic, Roster};
use quorate_crypto::keys::{KeyId, KeyPurpose};
use quorate_crypto::params::{PartyIndex, PartySet, SessionId, ThresholdParams};
use quorate_crypto::seal::KemPublicKey;
use rustls::pki_types::CertificateDer;

use crate::fragment;
use crate::tls::{Role, Trust};

const NODE_INFO_PURPOSE: &str = "node-info";

/// A conversion or verification failure, with a message that names what is wrong.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConvertError(pub String);

impl From<ConvertError> for tonic::Status {
    fn from(e: ConvertError) -> Self {
        tonic::Status::invalid_argument(e.0)
    }
}

impl From<quorate_crypto::Error> for ConvertError {
    fn from(e: quorate_crypto::Error) -> Self {
        ConvertError(e.to_string())
    }
}

fn err(msg: impl Into<String>) -> ConvertError {
    ConvertError(msg.into())
}

/// The longest coordinator instance id, in characters.
pub const MAX_COORDINATOR_INSTANCE: usize = 64;

/// Checks a coordinator instance id (`PresignStart.coordinator_instance`): 1 to
/// [`MAX_COORDINATOR_INSTANCE`] characters of `[A-Za-z0-9._-]`. The empty id (untagged,
/// an older coordinator) is accepted only where `allow_empty`.
pub fn coordinator_instance(id: &str, allow_empty: bool) -> Result<&str, ConvertError> {
    if id.is_empty() {
        return if allow_empty {
            Ok(id)
        } else {
            Err(err("coordinator instance id is empty"))
        };
    }
    if id.len() > MAX_COORDINATOR_INSTANCE {
        return Err(err(format!(
            "coordinator instance id is {} characters long, at most {MAX_COORDINATOR_INSTANCE} are allowed",
            id.len()
        )));
    }
    if let Some(c) = id
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(err(format!(
            "coordinator instance id {id:?} has the character {c:?}; use only A-Z, a-z, 0-9, '.', '_' and '-'"
        )));
    }
    Ok(id)
}

/// A 32-byte session id.
pub fn session_id(b: &[u8]) -> Result<SessionId, ConvertError> {
    b.try_into()
        .map(SessionId)
        .map_err(|_| err(format!("session_id must be 32 bytes, got {}", b.len())))
}

/// A 16-byte key id.
pub fn key_id(b: &[u8]) -> Result<KeyId, ConvertError> {
    b.try_into()
        .map(KeyId)
        .map_err(|_| err(format!("key_id must be 16 bytes, got {}", b.len())))
}

/// A party set from indices.
pub fn party_set(v: &[u32]) -> Result<PartySet, ConvertError> {
    let idx = v
        .iter()
        .map(|&i| u16::try_from(i).map_err(|_| err(format!("party index {i} out of range"))))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(PartySet::from_indices(&idx)?)
}

/// Wire purpose to domain purpose.
pub fn purpose(p: i32) -> Result<KeyPurpose, ConvertError> {
    match fragment::KeyPurpose::try_from(p) {
        Ok(fragment::KeyPurpose::Sign) => Ok(KeyPurpose::Sign),
        Ok(fragment::KeyPurpose::Derive) => Ok(KeyPurpose::Derive),
        Ok(fragment::KeyPurpose::Decrypt) => Ok(KeyPurpose::Decrypt),
        _ => Err(err("key purpose must be sign, derive or decrypt")),
    }
}

/// Domain purpose to wire purpose.
pub fn purpose_to_wire(p: KeyPurpose) -> fragment::KeyPurpose {
    match p {
        KeyPurpose::Sign => fragment::KeyPurpose::Sign,
        KeyPurpose::Derive => fragment::KeyPurpose::Derive,
        KeyPurpose::Decrypt => fragment::KeyPurpose::Decrypt,
    }
}

fn node_info_bytes(index: u32, kem_public: &[u8]) -> Vec<u8> {
    let mut b = Vec::with_capacity(4 + kem_public.len());
    b.extend_from_slice(&index.to_be_bytes());
    b.extend_from_slice(kem_public);
    b
}

/// A node's signed [`fragment::NodeInfo`].
pub fn node_info(
    index: PartyIndex,
    cert_chain: &[CertificateDer<'_>],
    kem: &KemPublicKey,
    identity: &IdentityKey,
) -> fragment::NodeInfo {
    let kem_public = kem.to_bytes();
    let index = u32::from(index.get());
    let signature = identity
        .sign(NODE_INFO_PURPOSE, &node_info_bytes(index, &kem_public))
        .to_vec();
    fragment::NodeInfo {
        index,
        cert_chain: cert_chain.iter().map(|c| c.as_ref().to_vec()).collect(),
        kem_public,
        signature,
    }
}

/// The P-256 public key of a certificate, as a protocol identity key.
pub fn certificate_identity(leaf: &CertificateDer<'_>) -> Result<IdentityPublic, ConvertError> {
    let (_, cert) = x509_parser::parse_x509_certificate(leaf.as_ref())
        .map_err(|e| err(format!("certificate does not parse: {e}")))?;
    let spki = &cert.tbs_certificate.subject_pki;
    let pk = p256::PublicKey::from_sec1_bytes(spki.subject_public_key.data.as_ref())
        .map_err(|_| err("certificate key is not a P-256 public key"))?;
    let point = quorate_crypto::Point::new(pk.to_projective())
        .ok_or_else(|| err("certificate key is the identity"))?;
    Ok(IdentityPublic::from_bytes(&point.to_bytes())?)
}

/// Verifies one [`fragment::NodeInfo`] against the cluster CA.
pub fn verify_node_info(
    info: &fragment::NodeInfo,
    trust: &Trust,
) -> Result<(PartyIndex, NodePublic), ConvertError> {
    let chain: Vec<CertificateDer<'static>> = info
        .cert_chain
        .iter()
        .map(|c| CertificateDer::from(c.clone()))
        .collect();
    let role = trust
        .verify_peer_chain(&chain)
        .map_err(|e| err(format!("node {}: certificate rejected: {e}", info.index)))?;
    let index = u16::try_from(info.index)
        .ok()
        .and_then(PartyIndex::new)
        .ok_or_else(|| err(format!("node index {} out of range", info.index)))?;
    if role != Role::Node(index.get()) {
        return Err(err(format!(
            "node {}: certificate belongs to {role}, not to node {}",
            info.index, info.index
        )));
    }
    let leaf = chain
        .first()
        .ok_or_else(|| err(format!("node {}: empty certificate chain", info.index)))?;
    let identity = certificate_identity(leaf)?;
    if !identity.verify(
        NODE_INFO_PURPOSE,
        &node_info_bytes(info.index, &info.kem_public),
        &info.signature,
    ) {
        return Err(err(format!(
            "node {}: NodeInfo signature does not verify under its certificate key",
            info.index
        )));
    }
    let kem = KemPublicKey::from_bytes(&info.kem_public)?;
    Ok((index, NodePublic { identity, kem }))
}

/// The threshold parameters of a [`fragment::DkgStart`]: `n`, `t` and its holder list
/// (empty: holders `1..=n`). Errors name the field that is wrong.
pub fn dkg_params(req: &fragment::DkgStart) -> Result<ThresholdParams, ConvertError> {
    let n = u16::try_from(req.n).map_err(|_| err(format!("n = {} is out of range", req.n)))?;
    let t = u16::try_from(req.t).map_err(|_| err(format!("t = {} is out of range", req.t)))?;
    if req.holders.is_empty() {
        return Ok(ThresholdParams::new(n, t)?);
    }
    if req.holders.len() != usize::from(n) {
        return Err(err(format!(
            "{} holders listed for n = {n}",
            req.holders.len()
        )));
    }
    let holders = req
        .holders
        .iter()
        .map(|&i| {
            u16::try_from(i)
                .ok()
                .and_then(PartyIndex::new)
                .ok_or_else(|| err(format!("holder index {i} is outside 1..=255")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(ThresholdParams::with_holders(&PartySet::new(holders)?, t)?)
}

/// The `holders` field of a [`fragment::DkgStart`] for `params`: empty for `1..=n`.
pub fn holders_to_wire(params: &ThresholdParams) -> Vec<u32> {
    if params.is_contiguous() {
        Vec::new()
    } else {
        params
            .all_parties()
            .members()
            .iter()
            .map(|p| u32::from(p.get()))
            .collect()
    }
}

/// Verifies a roster that lists exactly `parties`, each once, every entry signed by a
/// certificate of the cluster CA. Errors name the node that is missing, extra or bad.
pub fn verify_roster(
    roster: Option<&fragment::Roster>,
    trust: &Trust,
    parties: &PartySet,
) -> Result<Roster, ConvertError> {
    let roster = roster.ok_or_else(|| err("roster is missing"))?;
    let mut entries = Vec::with_capacity(roster.nodes.len());
    for info in &roster.nodes {
        let (i, node) = verify_node_info(info, trust)?;
        if !parties.contains(i) {
            return Err(err(format!(
                "roster names node {i}, which is not one of the parties {parties}"
            )));
        }
        entries.push((i, node));
    }
    let roster = Roster::from_entries(entries)?;
    if let Some(p) = parties.members().iter().find(|p| roster.get(**p).is_err()) {
        return Err(err(format!("roster lacks node {p}")));
    }
    Ok(roster)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn coordinator_instance_ids_are_short_and_plain() {
        for ok in ["coord-a", "host.example.org", "pod_7", "a"] {
            assert_eq!(coordinator_instance(ok, false).unwrap(), ok);
        }
        assert_eq!(coordinator_instance("", true).unwrap(), "");
        let e = coordinator_instance("", false).unwrap_err().0;
        assert!(e.contains("empty"), "{e}");
        let e = coordinator_instance("a b", false).unwrap_err().0;
        assert!(e.contains("' '"), "{e}");
        let e = coordinator_instance("host:7100", true).unwrap_err().0;
        assert!(e.contains("':'"), "{e}");
        let long = "x".repeat(MAX_COORDINATOR_INSTANCE + 1);
        let e = coordinator_instance(&long, false).unwrap_err().0;
        assert!(e.contains("65 characters"), "{e}");
    }
}
