//! Known-answer tests: RFC 9380 hash-to-curve, Quorate's hash-to-scalar (vectors from an
//! independent Python implementation), RFC 5869 HKDF, and sealing.

// Tests state expectations with unwrap/expect/panic/indexing.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use quorate_crypto::hash::{h2s, hash_to_curve_with_dst};
use quorate_crypto::params::{PartyIndex, SessionId};
use quorate_crypto::seal::{self, KemSecretKey, SealContext, Sealed};
use quorate_crypto::wire::{Reader, Writer};
use serde::Deserialize;

fn load<T: for<'de> Deserialize<'de>>(name: &str) -> T {
    let path = format!("{}/tests/vectors/{name}", env!("CARGO_MANIFEST_DIR"));
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

#[derive(Deserialize)]
struct H2cFile {
    dst: String,
    vectors: Vec<H2cVector>,
}
#[derive(Deserialize)]
struct H2cVector {
    msg: String,
    p_x: String,
    p_y: String,
}

#[test]
fn rfc9380_p256_xmd_sha256_sswu_ro() {
    let f: H2cFile = load("h2c_p256_xmd_sha256_sswu_ro.json");
    assert_eq!(f.vectors.len(), 5);
    for v in &f.vectors {
        let p = hash_to_curve_with_dst(v.msg.as_bytes(), &[f.dst.as_bytes()]).unwrap();
        let unc = p.to_uncompressed();
        assert_eq!(hex::encode(&unc[1..33]), v.p_x, "x for msg {:?}", v.msg);
        assert_eq!(hex::encode(&unc[33..]), v.p_y, "y for msg {:?}", v.msg);
    }
}

#[derive(Deserialize)]
struct H2sFile {
    vectors: Vec<H2sVector>,
}
#[derive(Deserialize)]
struct H2sVector {
    tag: String,
    msg_hex: String,
    scalar_hex: String,
}

#[test]
fn hash_to_scalar_matches_independent_vectors() {
    let f: H2sFile = load("h2s_quorate_v1.json");
    assert!(f.vectors.len() >= 8);
    for v in &f.vectors {
        let s = h2s(&v.tag, &hex::decode(&v.msg_hex).unwrap());
        assert_eq!(
            hex::encode(quorate_crypto::group::scalar_to_bytes(&s)),
            v.scalar_hex,
            "tag {} msg {}",
            v.tag,
            v.msg_hex
        );
    }
}

#[derive(Deserialize)]
struct HkdfFile {
    vectors: Vec<HkdfVector>,
}
#[derive(Deserialize)]
struct HkdfVector {
    ikm: String,
    salt: String,
    info: String,
    l: usize,
    okm: String,
}

#[test]
fn rfc5869_hkdf_sha256() {
    let f: HkdfFile = load("hkdf_sha256_rfc5869.json");
    assert_eq!(f.vectors.len(), 3);
    for v in &f.vectors {
        let salt = hex::decode(&v.salt).unwrap();
        let ikm = hex::decode(&v.ikm).unwrap();
        let info = hex::decode(&v.info).unwrap();
        let h = hkdf::Hkdf::<sha2::Sha256>::new((!salt.is_empty()).then_some(&salt[..]), &ikm);
        let mut okm = vec![0u8; v.l];
        h.expand(&info, &mut okm).unwrap();
        assert_eq!(hex::encode(&okm), v.okm);
    }
}

#[test]
fn seal_round_trip_with_fixed_keys() {
    // A fixed recipient key (96 secret bytes: ML-KEM seed || ECDH scalar).
    let mut sk_bytes = [0u8; 96];
    for (i, b) in sk_bytes.iter_mut().enumerate() {
        *b = i as u8;
    }
    let sk = KemSecretKey::from_secret_bytes(&sk_bytes).unwrap();
    assert_eq!(&sk.secret_bytes()[..], &sk_bytes[..]);
    let pk_bytes = sk.public().to_bytes();
    assert_eq!(pk_bytes.len(), seal::MLKEM_EK_LEN + 33);
    // Deterministic from the seed: the same seed always gives the same public key.
    let again = KemSecretKey::from_secret_bytes(&sk_bytes).unwrap();
    assert_eq!(again.public().to_bytes(), pk_bytes);

    let ctx = SealContext {
        session: SessionId([0x5a; 32]),
        round: 7,
        dealer: PartyIndex::new(1).unwrap(),
        recipient: PartyIndex::new(2).unwrap(),
    };
    let mut rng = quorate_crypto::sim::test_rng("kat-seal");
    let msg: Vec<u8> = (0..=255u8).collect();
    let sealed = seal::seal(&mut rng, &sk.public(), &ctx, &msg).unwrap();
    let mut w = Writer::default();
    sealed.encode(&mut w);
    let bytes = w.into_bytes();
    // ML-KEM ciphertext, ephemeral point (uncompressed on the wire), length-prefixed AEAD
    // output with 16-byte tag.
    assert_eq!(bytes.len(), seal::MLKEM_CT_LEN + 65 + 4 + msg.len() + 16);
    let mut r = Reader::new(&bytes, "Sealed");
    let back = Sealed::decode(&mut r).unwrap();
    r.finish().unwrap();
    assert_eq!(&seal::open(&sk, &ctx, &back).unwrap()[..], &msg[..]);
    // A different recipient context does not open.
    let wrong = SealContext {
        recipient: PartyIndex::new(3).unwrap(),
        ..ctx
    };
    assert!(seal::open(&sk, &wrong, &back).is_err());
}
