//! Hybrid post-quantum sealing of shares to a recipient node (DESIGN.md §4.2).
//!
//! Seal to node `j` under context `ctx = (session id, round, dealer, recipient)`:
//! ML-KEM-768 encapsulation to `j`'s static key and an ephemeral P-256 ECDH with `j`'s
//! static ECDH key give `ss_mlkem` and `ss_ecdh`;
//! `HKDF-SHA256(ikm = ss_mlkem || ss_ecdh, info = "quorate/seal/v1" || kem_ct || epk || ctx)`
//! yields an AES-256-GCM key and nonce; the AAD is `ctx`. Each key is used once, so the
//! derived nonce is never reused. The confidentiality holds if either ML-KEM-768 or
//! P-256 ECDH holds.
//!
//! Opening with the wrong recipient key or under a different context fails
//! authentication; nothing of the plaintext is returned.

use aes_gcm::Aes256Gcm;
use aes_gcm::aead::{Aead, KeyInit, Payload};
use hkdf::Hkdf;
use ml_kem::MlKem768;
use ml_kem::kem::{Decapsulate, Encapsulate, FromSeed, KeyExport, TryKeyInit};
use sha2::Sha256;
use zeroize::Zeroizing;

use crate::error::{Error, Result};
use crate::group::{self, Point};
use crate::params::{PartyIndex, SessionId};
use crate::secret::SecretScalar;
use crate::wire::{Reader, Writer};

/// ML-KEM-768 encapsulation key length.
pub const MLKEM_EK_LEN: usize = 1184;
/// ML-KEM-768 ciphertext length.
pub const MLKEM_CT_LEN: usize = 1088;
const SEED_LEN: usize = 64;
const INFO_PREFIX: &[u8] = b"quorate/seal/v1";

/// Where a seal belongs: it opens only for this recipient, session, round and dealer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SealContext {
    /// The protocol run.
    pub session: SessionId,
    /// The round (a protocol-specific constant).
    pub round: u8,
    /// Who sealed it.
    pub dealer: PartyIndex,
    /// Who can open it.
    pub recipient: PartyIndex,
}

impl SealContext {
    fn to_bytes(self) -> Vec<u8> {
        let mut w = Writer::default();
        w.fixed(&self.session.0);
        w.u8(self.round);
        w.party(self.dealer);
        w.party(self.recipient);
        w.into_bytes()
    }
}

/// A node's static hybrid KEM secret key.
pub struct KemSecretKey {
    seed: Zeroizing<[u8; SEED_LEN]>,
    dk: ml_kem::DecapsulationKey<MlKem768>,
    ecdh: SecretScalar,
}

impl KemSecretKey {
    /// A fresh key.
    pub fn generate(rng: &mut (impl rand_core::CryptoRng + ?Sized)) -> Self {
        let mut seed = Zeroizing::new([0u8; SEED_LEN]);
        rng.fill_bytes(&mut seed[..]);
        let ecdh = SecretScalar::random(rng);
        Self::from_parts(seed, ecdh)
    }

    fn from_parts(seed: Zeroizing<[u8; SEED_LEN]>, ecdh: SecretScalar) -> Self {
        let (dk, _) = MlKem768::from_seed(&(*seed).into());
        KemSecretKey { seed, dk, ecdh }
    }

    /// The 96-byte secret encoding (ML-KEM seed || ECDH scalar), for storage at rest.
    pub fn secret_bytes(&self) -> Zeroizing<Vec<u8>> {
        let mut out = Zeroizing::new(Vec::with_capacity(SEED_LEN + 32));
        out.extend_from_slice(&self.seed[..]);
        out.extend_from_slice(&self.ecdh.secret_bytes()[..]);
        out
    }

    /// Strict decoding of [`KemSecretKey::secret_bytes`].
    pub fn from_secret_bytes(bytes: &[u8]) -> Result<Self> {
        if bytes.len() != SEED_LEN + 32 {
            return Err(Error::input(format!(
                "KEM secret key must be {} bytes",
                SEED_LEN + 32
            )));
        }
        let (s, e) = bytes.split_at(SEED_LEN);
        let mut seed = Zeroizing::new([0u8; SEED_LEN]);
        seed.copy_from_slice(s);
        Ok(Self::from_parts(seed, SecretScalar::from_secret_bytes(e)?))
    }

    /// The public key.
    pub fn public(&self) -> KemPublicKey {
        let ek = self.dk.encapsulation_key().clone();
        let ecdh = Point::new(self.ecdh.public_image()).unwrap_or(Point::GENERATOR); // ecdh is non-zero, so its image is never O
        KemPublicKey { ek, ecdh }
    }
}

impl core::fmt::Debug for KemSecretKey {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("KemSecretKey(<redacted>)")
    }
}

/// A node's static hybrid KEM public key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KemPublicKey {
    ek: ml_kem::EncapsulationKey<MlKem768>,
    ecdh: Point,
}

impl KemPublicKey {
    /// Encoding: ML-KEM-768 encapsulation key (1184 bytes) || compressed ECDH point.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(MLKEM_EK_LEN + 33);
        out.extend_from_slice(self.ek.to_bytes().as_slice());
        out.extend_from_slice(&self.ecdh.to_bytes());
        out
    }

    /// Strict decoding of [`KemPublicKey::to_bytes`].
    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        if bytes.len() != MLKEM_EK_LEN + 33 {
            return Err(Error::input(format!(
                "KEM public key must be {} bytes",
                MLKEM_EK_LEN + 33
            )));
        }
        let (ek, ecdh) = bytes.split_at(MLKEM_EK_LEN);
        let ek = ml_kem::EncapsulationKey::<MlKem768>::new_from_slice(ek)
            .map_err(|_| Error::input("ML-KEM-768 encapsulation key is malformed"))?;
        Ok(KemPublicKey {
            ek,
            ecdh: Point::from_bytes(ecdh)?,
        })
    }
}

/// A sealed payload for one recipient.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sealed {
    kem_ct: Vec<u8>,
    epk: Point,
    ct: Vec<u8>,
}

fn derive_key(
    ss_kem: &[u8],
    ss_ecdh: &[u8],
    kem_ct: &[u8],
    epk: &Point,
    ctx: &[u8],
) -> Result<(Aes256Gcm, [u8; 12])> {
    let mut ikm = Zeroizing::new(Vec::with_capacity(64));
    ikm.extend_from_slice(ss_kem);
    ikm.extend_from_slice(ss_ecdh);
    let mut info = Vec::with_capacity(INFO_PREFIX.len() + kem_ct.len() + 33 + ctx.len());
    info.extend_from_slice(INFO_PREFIX);
    info.extend_from_slice(kem_ct);
    info.extend_from_slice(&epk.to_bytes());
    info.extend_from_slice(ctx);
    let mut okm = Zeroizing::new([0u8; 44]);
    Hkdf::<Sha256>::new(None, &ikm)
        .expand(&info, &mut okm[..])
        .map_err(|_| Error::Bug("HKDF output length"))?;
    let (key, nonce) = okm.split_at(32);
    let cipher =
        Aes256Gcm::new_from_slice(key).map_err(|_| Error::Bug("AES-256-GCM key length"))?;
    let mut n = [0u8; 12];
    n.copy_from_slice(nonce);
    Ok((cipher, n))
}

/// Seals `plaintext` to `recipient` under `ctx`.
pub fn seal(
    rng: &mut (impl rand_core::CryptoRng + ?Sized),
    recipient: &KemPublicKey,
    ctx: &SealContext,
    plaintext: &[u8],
) -> Result<Sealed> {
    let (kem_ct, ss_kem) = recipient.ek.encapsulate_with_rng(rng);
    let e = SecretScalar::random(rng);
    let epk = Point::nonzero(e.public_image(), "ephemeral key is the identity")?;
    let shared = Point::nonzero(
        group::mul(&recipient.ecdh, e.expose()),
        "ECDH result is the identity",
    )?;
    let ss_ecdh = Zeroizing::new(shared.x_bytes());
    let ctx_bytes = ctx.to_bytes();
    let (cipher, nonce) = derive_key(&ss_kem, &ss_ecdh[..], &kem_ct, &epk, &ctx_bytes)?;
    let ct = cipher
        .encrypt(
            (&nonce).into(),
            Payload {
                msg: plaintext,
                aad: &ctx_bytes,
            },
        )
        .map_err(|_| Error::Bug("AES-256-GCM encryption failed"))?;
    Ok(Sealed {
        kem_ct: kem_ct.to_vec(),
        epk,
        ct,
    })
}

/// Opens a seal addressed to the holder of `sk` under `ctx`. Fails (without detail, to
/// give no oracle) if the seal was made for another recipient or context or was altered.
pub fn open(sk: &KemSecretKey, ctx: &SealContext, sealed: &Sealed) -> Result<Zeroizing<Vec<u8>>> {
    let ss_kem = sk
        .dk
        .decapsulate_slice(&sealed.kem_ct)
        .map_err(|_| Error::input("sealed payload has a malformed ML-KEM ciphertext"))?;
    let shared = Point::nonzero(
        group::mul(&sealed.epk, sk.ecdh.expose()),
        "ECDH result is the identity",
    )?;
    let ss_ecdh = Zeroizing::new(shared.x_bytes());
    let ctx_bytes = ctx.to_bytes();
    let (cipher, nonce) = derive_key(
        &ss_kem,
        &ss_ecdh[..],
        &sealed.kem_ct,
        &sealed.epk,
        &ctx_bytes,
    )?;
    cipher
        .decrypt(
            (&nonce).into(),
            Payload {
                msg: &sealed.ct,
                aad: &ctx_bytes,
            },
        )
        .map(Zeroizing::new)
        .map_err(|_| Error::input("sealed payload does not open for this recipient and context"))
}

impl Sealed {
    /// Encodes the seal.
    pub fn encode(&self, w: &mut Writer) {
        w.fixed(&self.kem_ct);
        w.point(&self.epk);
        w.bytes(&self.ct);
    }

    /// Decodes a seal.
    pub fn decode(r: &mut Reader<'_>) -> Result<Self> {
        Ok(Sealed {
            kem_ct: r.fixed(MLKEM_CT_LEN)?.to_vec(),
            epk: r.point()?,
            ct: r.bytes()?.to_vec(),
        })
    }

    /// Test support: flips one bit of the AEAD ciphertext.
    #[cfg(any(test, feature = "test-support"))]
    pub fn tamper(&mut self) {
        if let Some(b) = self.ct.first_mut() {
            *b ^= 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx(d: u16, r: u16) -> SealContext {
        SealContext {
            session: SessionId([7u8; 32]),
            round: 1,
            dealer: PartyIndex::new(d).unwrap(),
            recipient: PartyIndex::new(r).unwrap(),
        }
    }

    #[test]
    fn seal_round_trip() {
        let mut rng = crate::sim::test_rng("seal");
        let sk = KemSecretKey::generate(&mut rng);
        let pk = KemPublicKey::from_bytes(&sk.public().to_bytes()).unwrap();
        let sealed = seal(&mut rng, &pk, &ctx(1, 2), b"share bytes").unwrap();
        let mut w = Writer::default();
        sealed.encode(&mut w);
        let bytes = w.into_bytes();
        let mut r = Reader::new(&bytes, "Sealed");
        let back = Sealed::decode(&mut r).unwrap();
        r.finish().unwrap();
        assert_eq!(&open(&sk, &ctx(1, 2), &back).unwrap()[..], b"share bytes");
        // secret key survives its encoding
        let sk2 = KemSecretKey::from_secret_bytes(&sk.secret_bytes()).unwrap();
        assert_eq!(&open(&sk2, &ctx(1, 2), &back).unwrap()[..], b"share bytes");
    }

    #[test]
    fn seal_rejects_tamper_wrong_recipient_and_context() {
        let mut rng = crate::sim::test_rng("seal-bad");
        let sk = KemSecretKey::generate(&mut rng);
        let other = KemSecretKey::generate(&mut rng);
        let sealed = seal(&mut rng, &sk.public(), &ctx(1, 2), b"x").unwrap();
        assert!(open(&other, &ctx(1, 2), &sealed).is_err());
        assert!(open(&sk, &ctx(1, 3), &sealed).is_err());
        assert!(open(&sk, &ctx(2, 2), &sealed).is_err());
        let mut t = sealed.clone();
        t.tamper();
        assert!(open(&sk, &ctx(1, 2), &t).is_err());
        let mut t = sealed;
        t.epk = Point::GENERATOR;
        assert!(open(&sk, &ctx(1, 2), &t).is_err());
    }
}
