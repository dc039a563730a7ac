//! Secret values (STYLE.md §3).
//!
//! A [`SecretScalar`] zeroizes on drop, prints as `<redacted>`, is not `Copy`, has no
//! `PartialEq` (compare with [`subtle::ConstantTimeEq`]) and exposes its bytes only
//! through [`SecretScalar::secret_bytes`], whose callers are few and say why.

use subtle::{Choice, ConstantTimeEq};
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

use crate::error::Result;
use crate::group::{self, Scalar};

/// A secret scalar: a key share, a nonce share, a polynomial coefficient.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct SecretScalar(Scalar);

impl SecretScalar {
    /// Wraps a scalar that is secret from now on.
    pub(crate) fn new(s: Scalar) -> Self {
        SecretScalar(s)
    }

    /// A fresh uniformly random non-zero secret.
    pub fn random(rng: &mut (impl rand_core::CryptoRng + ?Sized)) -> Self {
        SecretScalar(group::random_nonzero(rng))
    }

    /// The value, for protocol arithmetic inside this crate.
    pub(crate) fn expose(&self) -> &Scalar {
        &self.0
    }

    /// The 32-byte big-endian encoding, for sealing at rest or to a recipient. The bytes
    /// zeroize on drop.
    pub fn secret_bytes(&self) -> Zeroizing<[u8; 32]> {
        Zeroizing::new(group::scalar_to_bytes(&self.0))
    }

    /// Strict decoding of [`SecretScalar::secret_bytes`] output.
    pub fn from_secret_bytes(bytes: &[u8]) -> Result<Self> {
        group::scalar_from_bytes(bytes).map(SecretScalar)
    }

    /// `self·G`: the public image of this secret.
    pub fn public_image(&self) -> p256::ProjectivePoint {
        group::mul_g(&self.0)
    }
}

impl ConstantTimeEq for SecretScalar {
    fn ct_eq(&self, other: &Self) -> Choice {
        self.0.ct_eq(&other.0)
    }
}

impl core::fmt::Debug for SecretScalar {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("SecretScalar(<redacted>)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_is_redacted() {
        let s = SecretScalar::new(Scalar::from(42u64));
        let shown = format!("{s:?}");
        assert_eq!(shown, "SecretScalar(<redacted>)");
        assert!(!shown.contains("2a"));
    }

    #[test]
    fn bytes_round_trip_and_ct_eq() {
        let mut rng = crate::sim::test_rng("secret");
        let s = SecretScalar::random(&mut rng);
        let t = SecretScalar::from_secret_bytes(&s.secret_bytes()[..]).unwrap();
        assert!(bool::from(s.ct_eq(&t)));
        assert!(!bool::from(s.ct_eq(&SecretScalar::random(&mut rng))));
    }
}
