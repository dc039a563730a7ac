//! Errors of the protocol core (STYLE.md §4).
//!
//! Four families, kept apart because callers act on them differently:
//! - [`Error::InvalidInput`]: the caller (or a client) passed something malformed; fix the
//!   request. Nobody is blamed.
//! - [`Error::PeerMisbehaved`]: a protocol participant sent something provably wrong; the
//!   error names the culprit(s) so the coordinator can exclude them (identifiable abort).
//! - [`Error::Unauthentic`]: a relayed message failed its sender's signature, so it was
//!   altered in transit (or forged); the relay, not the named sender, is at fault.
//! - [`Error::Refused`]: a well-formed request that the rules forbid (a consumed
//!   presignature, a key used for the wrong purpose).
//!
//! No variant carries secret material.

use crate::params::PartyIndex;

/// The result type of this crate.
pub type Result<T, E = Error> = core::result::Result<T, E>;

/// Every error the protocol core returns.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Malformed or out-of-range input; nobody is blamed.
    #[error("invalid input: {0}")]
    InvalidInput(String),
    /// Provable misbehaviour by the named parties.
    #[error("{fault} (culprits: {})", fmt_parties(culprits))]
    PeerMisbehaved {
        /// The parties to blame, sorted and deduplicated; never empty.
        culprits: Vec<PartyIndex>,
        /// What they did.
        fault: Fault,
    },
    /// A relayed message claiming to come from `claimed_sender` does not carry that
    /// party's valid signature: the relay altered or forged it.
    #[error(
        "message claiming to come from party {claimed_sender} failed authentication: altered or forged in relay"
    )]
    Unauthentic {
        /// The sender named in the message (not blamed).
        claimed_sender: PartyIndex,
    },
    /// A well-formed request that the protocol rules forbid.
    #[error("refused: {0}")]
    Refused(Refusal),
    /// An internal invariant failed. This is a bug in Quorate; please report it.
    #[error("internal error (bug): {0}")]
    Bug(&'static str),
}

/// What a misbehaving party did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Fault {
    /// A Feldman share does not match the dealer's commitments.
    #[error("share does not match the dealer's Feldman commitments")]
    BadShare,
    /// A commitment vector has the wrong length (threshold-raising attempt).
    #[error("commitment vector has length {got}, expected {expected}")]
    WrongCommitmentLength {
        /// The length required by the threshold.
        expected: usize,
        /// The length received.
        got: usize,
    },
    /// Revealed commitments do not open the hash committed in the first round.
    #[error("revealed commitments do not match the committed hash")]
    CommitmentMismatch,
    /// A Schnorr proof of knowledge of the dealt secret failed.
    #[error("proof of knowledge of the dealt secret is invalid")]
    BadProofOfKnowledge,
    /// A DLEQ proof for a μ value (presignature step 2) failed.
    #[error("proof for the μ = k·a value is invalid")]
    BadMuProof,
    /// A degree-reduction dealing (presignature step 4) is wrong.
    #[error("degree-reduction dealing is invalid")]
    BadReductionDealing,
    /// A signature share failed its public check.
    #[error("signature share fails its public check")]
    BadSignatureShare,
    /// A threshold-DH partial failed its proof.
    #[error("threshold DH partial fails its proof")]
    BadDhPartial,
    /// A seal addressed to us could not be opened or holds the wrong content.
    #[error("sealed payload cannot be opened or is malformed")]
    BadSeal,
    /// A party's message could not be decoded.
    #[error("message is malformed")]
    Malformed,
    /// A resharing dealing does not deal the dealer's Lagrange-weighted share: its
    /// constant commitment is not `λ_i·X_i` (DESIGN.md §4.3).
    #[error("resharing dealing does not deal this dealer's share of the key (C_0 ≠ λ_i·X_i)")]
    WrongReshareConstant,
    /// A party's reported result disagrees with the others'.
    #[error("reported result disagrees with the other parties")]
    Inconsistent,
    /// A party sent more than one message for a round.
    #[error("duplicate message")]
    Duplicate,
    /// An expected message is missing.
    #[error("missing message")]
    Missing,
    /// A party that is not part of this round sent a message.
    #[error("message from a party outside this round")]
    UnexpectedSender,
    /// The contributions combine to a degenerate value (zero scalar or identity point).
    #[error("contributions combine to a degenerate value")]
    Degenerate,
}

/// Why a well-formed request is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Refusal {
    /// The presignature already signed a different message.
    #[error("presignature {0} was already used for a different message")]
    PresignatureConsumed(String),
    /// The request names a signing set other than the presignature's.
    #[error("signing set does not match the presignature's fixed set")]
    WrongSigningSet,
    /// The request names a different key than the presignature's.
    #[error("presignature belongs to a different key")]
    WrongKey,
    /// The request names a different presignature than the record.
    #[error("presignature id does not match the record")]
    WrongPresignature,
    /// The key's fixed purpose forbids this operation.
    #[error("key purpose is {actual}, operation needs {needed}")]
    WrongPurpose {
        /// The key's purpose.
        actual: &'static str,
        /// What the operation needs.
        needed: &'static str,
    },
    /// This party is not a member of the set the request needs.
    #[error("party {0} is not a member of the requested set")]
    NotAMember(PartyIndex),
}

impl Error {
    /// The parties this error blames. Empty for errors that blame nobody (bad input,
    /// relay tampering, refusals, bugs).
    pub fn culprits(&self) -> &[PartyIndex] {
        match self {
            Error::PeerMisbehaved { culprits, .. } => culprits,
            Error::InvalidInput(_) => &[],
            Error::Unauthentic { .. } => &[],
            Error::Refused(_) => &[],
            Error::Bug(_) => &[],
        }
    }

    /// Blames `culprits` (sorted, deduplicated) for `fault`.
    pub(crate) fn blame(mut culprits: Vec<PartyIndex>, fault: Fault) -> Self {
        culprits.sort_unstable();
        culprits.dedup();
        if culprits.is_empty() {
            return Error::Bug("blame called with no culprit");
        }
        Error::PeerMisbehaved { culprits, fault }
    }

    /// Blames one party.
    pub(crate) fn blame_one(culprit: PartyIndex, fault: Fault) -> Self {
        Error::PeerMisbehaved {
            culprits: vec![culprit],
            fault,
        }
    }

    /// Bad input with a message saying what is wrong.
    pub(crate) fn input(msg: impl Into<String>) -> Self {
        Error::InvalidInput(msg.into())
    }
}

fn fmt_parties(parties: &[PartyIndex]) -> String {
    parties
        .iter()
        .map(|p| p.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}
