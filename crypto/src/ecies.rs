//! ECIES encryption to a threshold key, decrypted by threshold DH (DESIGN.md §4.6).
//!
//! Encrypt to public key `X`: draw `e`, `E = e·G`, shared point `S = e·X`;
//! `HKDF-SHA256(ikm = S, info = "quorate/ecies/v1" || E || X)` gives an AES-256-GCM key
//! and nonce (single use). The holder side never sees `x`: a requester obtains `x·E`
//! through [`crate::tdh`] and calls [`decrypt_with_shared`].

use aes_gcm::Aes256Gcm;
use aes_gcm::aead::{Aead, KeyInit, Payload};
use hkdf::Hkdf;
use rand_core::CryptoRng;
use sha2::Sha256;
use zeroize::Zeroizing;

use crate::error::{Error, Result};
use crate::group::{self, Point};
use crate::secret::SecretScalar;
use crate::tdh::SharedPoint;
use crate::wire::{Reader, Wire, Writer};

const INFO: &[u8] = b"quorate/ecies/v1";

/// An ECIES ciphertext.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EciesCiphertext {
    /// The ephemeral public key `E` (the threshold-DH input point).
    pub ephemeral: Point,
    ct: Vec<u8>,
}

fn cipher(shared: &[u8; 33], e: &Point, x: &Point) -> Result<(Aes256Gcm, [u8; 12])> {
    let mut info = Vec::with_capacity(INFO.len() + 66);
    info.extend_from_slice(INFO);
    info.extend_from_slice(&e.to_bytes());
    info.extend_from_slice(&x.to_bytes());
    let mut okm = Zeroizing::new([0u8; 44]);
    Hkdf::<Sha256>::new(None, shared)
        .expand(&info, &mut okm[..])
        .map_err(|_| Error::Bug("HKDF output length"))?;
    let (k, n) = okm.split_at(32);
    let c = Aes256Gcm::new_from_slice(k).map_err(|_| Error::Bug("AES key length"))?;
    let mut nonce = [0u8; 12];
    nonce.copy_from_slice(n);
    Ok((c, nonce))
}

/// Encrypts `plaintext` (with associated data `aad`) to the threshold public key `x`.
pub fn encrypt(
    rng: &mut (impl CryptoRng + ?Sized),
    x: &Point,
    plaintext: &[u8],
    aad: &[u8],
) -> Result<EciesCiphertext> {
    let e = SecretScalar::random(rng);
    let ephemeral = Point::nonzero(e.public_image(), "ephemeral is the identity")?;
    let shared = Point::nonzero(group::mul(x, e.expose()), "shared point is the identity")?;
    let (c, nonce) = cipher(&shared.to_bytes(), &ephemeral, x)?;
    let ct = c
        .encrypt(
            (&nonce).into(),
            Payload {
                msg: plaintext,
                aad,
            },
        )
        .map_err(|_| Error::Bug("AES-GCM encryption"))?;
    Ok(EciesCiphertext { ephemeral, ct })
}

/// Decrypts with the shared point `x·E` obtained by threshold DH.
pub fn decrypt_with_shared(
    shared: &SharedPoint,
    x: &Point,
    ct: &EciesCiphertext,
    aad: &[u8],
) -> Result<Zeroizing<Vec<u8>>> {
    let (c, nonce) = cipher(shared.secret_bytes(), &ct.ephemeral, x)?;
    c.decrypt((&nonce).into(), Payload { msg: &ct.ct, aad })
        .map(Zeroizing::new)
        .map_err(|_| Error::input("ciphertext does not decrypt under this key (wrong key, tampered, or wrong associated data)"))
}

impl Wire for EciesCiphertext {
    const TAG: u8 = 0x71;
    const NAME: &'static str = "EciesCiphertext";
    fn encode_body(&self, w: &mut Writer) {
        w.point(&self.ephemeral);
        w.bytes(&self.ct);
    }
    fn decode_body(r: &mut Reader<'_>) -> Result<Self> {
        Ok(EciesCiphertext {
            ephemeral: r.point()?,
            ct: r.bytes()?.to_vec(),
        })
    }
}
