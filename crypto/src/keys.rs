//! Key records: the public data of a threshold key and a node's secret share of it.

use p256::ProjectivePoint;

use crate::error::{Error, Result};
use crate::feldman::Commitments;
use crate::group::Point;
use crate::params::{PartyIndex, ThresholdParams};
use crate::secret::SecretScalar;
use crate::wire::{Reader, Wire, Writer};

/// A key's identifier (random, chosen by the coordinator at creation).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KeyId(pub [u8; 16]);

impl core::fmt::Display for KeyId {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

/// The one purpose a key serves, fixed at creation; nodes refuse any other use
/// (DESIGN.md §4.6).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum KeyPurpose {
    /// ES256 signing (presignatures and one-round signing).
    Sign,
    /// Confidential credential derivation (threshold DH on `H2C(context)`).
    Derive,
    /// Decryption (threshold DH on a caller-supplied ECIES ephemeral point).
    Decrypt,
}

impl KeyPurpose {
    /// Wire value.
    pub fn to_u8(self) -> u8 {
        match self {
            KeyPurpose::Sign => 1,
            KeyPurpose::Derive => 2,
            KeyPurpose::Decrypt => 3,
        }
    }

    /// From the wire value.
    pub fn from_u8(v: u8) -> Result<Self> {
        match v {
            1 => Ok(KeyPurpose::Sign),
            2 => Ok(KeyPurpose::Derive),
            3 => Ok(KeyPurpose::Decrypt),
            _ => Err(Error::input(format!("unknown key purpose {v}"))),
        }
    }

    /// Name for messages.
    pub fn name(self) -> &'static str {
        match self {
            KeyPurpose::Sign => "sign",
            KeyPurpose::Derive => "derive",
            KeyPurpose::Decrypt => "decrypt",
        }
    }

    /// Refuses unless `self == needed`.
    pub fn require(self, needed: KeyPurpose) -> Result<()> {
        if self == needed {
            Ok(())
        } else {
            Err(Error::Refused(crate::error::Refusal::WrongPurpose {
                actual: self.name(),
                needed: needed.name(),
            }))
        }
    }
}

/// The public data of a threshold key: its parameters and the group's Feldman
/// commitments, from which the public key `X = C_0` and every node's public share
/// `X_j = Σ_k j^k·C_k` follow. `epoch` counts refreshes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyPublic {
    /// The key's id.
    pub key_id: KeyId,
    /// Its threshold parameters.
    pub params: ThresholdParams,
    /// Its fixed purpose.
    pub purpose: KeyPurpose,
    /// Number of refreshes since creation.
    pub epoch: u32,
    pub(crate) commitments: Commitments,
    public_key: Point,
}

impl KeyPublic {
    pub(crate) fn new(
        key_id: KeyId,
        params: ThresholdParams,
        purpose: KeyPurpose,
        epoch: u32,
        commitments: Commitments,
    ) -> Result<Self> {
        if commitments.len() != params.commitment_len() {
            return Err(Error::input("group commitments do not match the threshold"));
        }
        let public_key = Point::new(commitments.constant())
            .ok_or_else(|| Error::input("the group public key is the identity"))?;
        Ok(KeyPublic {
            key_id,
            params,
            purpose,
            epoch,
            commitments,
            public_key,
        })
    }

    /// The public key `X`.
    pub fn public_key(&self) -> Point {
        self.public_key
    }

    /// Node `j`'s public share `X_j = x_j·G`.
    pub fn public_share(&self, j: PartyIndex) -> ProjectivePoint {
        self.commitments.eval(j)
    }

    /// The group commitments `C_0..C_t`.
    pub fn commitments(&self) -> &Commitments {
        &self.commitments
    }
}

impl Wire for KeyPublic {
    const TAG: u8 = 0x10;
    const NAME: &'static str = "KeyPublic";

    fn encode_body(&self, w: &mut Writer) {
        w.fixed(&self.key_id.0);
        w.params(&self.params);
        w.u8(self.purpose.to_u8());
        w.u32(self.epoch);
        // Group commitments are never the identity for a real key (C_0 = X ≠ O, and the
        // higher coefficients are sums of random points).
        let pts = self.commitments.to_points(false).unwrap_or_default();
        w.list(&pts, |w, p| w.point(p));
    }

    fn decode_body(r: &mut Reader<'_>) -> Result<Self> {
        let key_id = KeyId(r.array()?);
        let params = r.params()?;
        let purpose = KeyPurpose::from_u8(r.u8()?)?;
        let epoch = r.u32()?;
        let pts = r.list(33, |r| r.point())?;
        if pts.len() != params.commitment_len() {
            return Err(Error::input(format!(
                "KeyPublic: {} commitments for threshold {} (need {})",
                pts.len(),
                params.t(),
                params.commitment_len()
            )));
        }
        let commitments = Commitments::from_points(&pts);
        KeyPublic::new(key_id, params, purpose, epoch, commitments)
    }
}

/// A node's share of a key: `x_j` with the key's public data. Secret; zeroized on drop.
#[derive(Clone)]
pub struct KeyShare {
    /// The key's public data.
    pub public: KeyPublic,
    /// This node's index.
    pub index: PartyIndex,
    pub(crate) secret: SecretScalar,
}

impl KeyShare {
    /// Checks `x_j·G = X_j` (used after decoding from storage).
    pub fn validate(&self) -> Result<()> {
        if self.secret.public_image() == self.public.public_share(self.index) {
            Ok(())
        } else {
            Err(Error::input(
                "key share does not match its public share (corrupt or from another epoch)",
            ))
        }
    }

    /// Encoding for sealed storage at rest. The bytes hold the secret share.
    pub fn secret_bytes(&self) -> zeroize::Zeroizing<Vec<u8>> {
        let mut w = Writer::default();
        w.u8(crate::wire::VERSION);
        w.u8(0x11);
        w.nested(&self.public);
        w.party(self.index);
        w.fixed(&self.secret.secret_bytes()[..]);
        zeroize::Zeroizing::new(w.into_bytes())
    }

    /// Strict decoding of [`KeyShare::secret_bytes`], validated against the public share.
    pub fn from_secret_bytes(bytes: &[u8]) -> Result<Self> {
        let mut r = Reader::new(bytes, "KeyShare");
        r.version()?;
        if r.u8()? != 0x11 {
            return Err(Error::input("KeyShare: unsupported version or wrong type"));
        }
        let public = r.nested::<KeyPublic>()?;
        let index = r.party()?;
        let secret = SecretScalar::from_secret_bytes(r.fixed(32)?)?;
        r.finish()?;
        let share = KeyShare {
            public,
            index,
            secret,
        };
        share.validate()?;
        Ok(share)
    }
}

impl core::fmt::Debug for KeyShare {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("KeyShare")
            .field("key_id", &self.public.key_id)
            .field("index", &self.index)
            .field("secret", &"<redacted>")
            .finish()
    }
}
