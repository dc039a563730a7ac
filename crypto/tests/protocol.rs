//! End to end through the simulation: DKG, presignature batches, one-round signing with
//! every signature checked by two independent verifiers (aws-lc-rs and p256), a JWS
//! ES256 token checked by the jsonwebtoken crate, derivation and decryption.

// Tests state expectations with unwrap/expect/panic/indexing.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use aws_lc_rs::signature::{ECDSA_P256_SHA256_FIXED, UnparsedPublicKey};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use p256::ecdsa::signature::hazmat::PrehashVerifier;
use quorate_crypto::Point;
use quorate_crypto::ecies;
use quorate_crypto::hash::sha256;
use quorate_crypto::keys::KeyPurpose;
use quorate_crypto::sign::Signature;
use quorate_crypto::sim::{Attack, Cluster, test_rng};

/// Signatures per setting: the issue asks for at least 1,000.
const SIGNATURES: u32 = 1000;

fn verify_independently(x: &Point, msg: &[u8], sig: &Signature) {
    let raw = sig.to_raw();
    UnparsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, x.to_uncompressed())
        .verify(msg, &raw)
        .expect("aws-lc-rs rejects a threshold signature");
    let vk = p256::ecdsa::VerifyingKey::from_sec1_bytes(&x.to_bytes()).unwrap();
    let s = p256::ecdsa::Signature::from_slice(&raw).unwrap();
    vk.verify_prehash(&sha256(msg), &s)
        .expect("p256 rejects a threshold signature");
    assert!(s.normalize_s() == s, "signature is not low-s");
    // DER form parses and matches
    let der = sig.to_der().unwrap();
    assert_eq!(p256::ecdsa::Signature::from_der(&der).unwrap(), s);
}

fn run_setting(n: u16, t: u16) {
    let mut c = Cluster::new(n, t, test_rng(&format!("protocol-{n}-{t}"))).unwrap();
    let key = c.dkg(KeyPurpose::Sign, Attack::None).unwrap();
    let x = key.public_key();
    // Two different (M, S) pairs, half the batch each, so pools for several sets work.
    let m1: Vec<u16> = (1..=2 * t + 1).collect();
    let s1: Vec<u16> = m1[..usize::from(t) + 1].to_vec();
    let m2: Vec<u16> = (n - 2 * t..=n).collect();
    let s2: Vec<u16> = m2[usize::from(t)..].to_vec();
    c.presign(key.key_id, &m1, &s1, SIGNATURES / 2, Attack::None)
        .unwrap();
    c.presign(
        key.key_id,
        &m2,
        &s2,
        SIGNATURES - SIGNATURES / 2,
        Attack::None,
    )
    .unwrap();
    for k in 0..SIGNATURES {
        let msg = format!("message {k} for ({n},{t})");
        let sig = c
            .sign(key.key_id, sha256(msg.as_bytes()), Attack::None)
            .unwrap();
        verify_independently(&x, msg.as_bytes(), &sig);
    }
    assert!(c.pools[&key.key_id].is_empty());
}

#[test]
fn threshold_signatures_3_1() {
    run_setting(3, 1);
}

#[test]
fn threshold_signatures_5_1() {
    run_setting(5, 1);
}

#[test]
fn threshold_signatures_5_2() {
    run_setting(5, 2);
}

#[test]
fn threshold_signatures_7_3() {
    run_setting(7, 3);
}

#[derive(serde::Serialize, serde::Deserialize, Debug, PartialEq)]
struct Claims {
    iss: String,
    sub: String,
    aud: String,
    exp: u64,
    iat: u64,
    jti: String,
}

#[test]
fn jws_es256_token_verifies_with_jsonwebtoken() {
    let mut c = Cluster::new(3, 1, test_rng("jws")).unwrap();
    let key = c.dkg(KeyPurpose::Sign, Attack::None).unwrap();
    c.presign(key.key_id, &[1, 2, 3], &[2, 3], 2, Attack::None)
        .unwrap();
    let now = 1_900_000_000u64;
    let claims = Claims {
        iss: "https://quorate.test".into(),
        sub: "spiffe://quorate.test/agent/dev/alice".into(),
        aud: "dev".into(),
        iat: now,
        exp: now + 300,
        jti: "jti-1".into(),
    };
    let header =
        serde_json::json!({"alg": "ES256", "typ": "at+jwt", "kid": key.key_id.to_string()});
    let input = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(serde_json::to_vec(&header).unwrap()),
        URL_SAFE_NO_PAD.encode(serde_json::to_vec(&claims).unwrap())
    );
    let sig = c
        .sign(key.key_id, sha256(input.as_bytes()), Attack::None)
        .unwrap();
    let token = format!("{input}.{}", URL_SAFE_NO_PAD.encode(sig.to_raw()));

    let unc = key.public_key().to_uncompressed();
    let dk = jsonwebtoken::DecodingKey::from_ec_components(
        &URL_SAFE_NO_PAD.encode(&unc[1..33]),
        &URL_SAFE_NO_PAD.encode(&unc[33..]),
    )
    .unwrap();
    let mut v = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::ES256);
    v.set_audience(&["dev"]);
    v.set_issuer(&["https://quorate.test"]);
    v.validate_exp = false;
    let decoded = jsonwebtoken::decode::<Claims>(&token, &dk, &v).unwrap();
    assert_eq!(decoded.claims, claims);

    // A token with one payload byte changed must not verify.
    let mut bad = token.clone().into_bytes();
    let pos = input.find('.').unwrap() + 3;
    bad[pos] = if bad[pos] == b'A' { b'B' } else { b'A' };
    assert!(jsonwebtoken::decode::<Claims>(std::str::from_utf8(&bad).unwrap(), &dk, &v).is_err());
}

#[test]
fn derive_is_quorum_independent_and_decrypt_round_trips() {
    let mut c = Cluster::new(5, 2, test_rng("derive")).unwrap();
    let dkey = c.dkg(KeyPurpose::Derive, Attack::None).unwrap();
    let ctx = b"quorate/derive/v1|target=db|agent=alice|task=42";
    let a = c
        .derive(dkey.key_id, ctx, &[1, 2, 3], Attack::None)
        .unwrap();
    let b = c
        .derive(dkey.key_id, ctx, &[3, 4, 5], Attack::None)
        .unwrap();
    let all = c
        .derive(dkey.key_id, ctx, &[1, 2, 3, 4, 5], Attack::None)
        .unwrap();
    assert_eq!(a.secret_bytes(), b.secret_bytes());
    assert_eq!(a.secret_bytes(), all.secret_bytes());
    let other = c
        .derive(dkey.key_id, b"another context", &[1, 2, 3], Attack::None)
        .unwrap();
    assert_ne!(a.secret_bytes(), other.secret_bytes());

    let ekey = c.dkg(KeyPurpose::Decrypt, Attack::None).unwrap();
    let mut rng = test_rng("ecies");
    let ct = ecies::encrypt(&mut rng, &ekey.public_key(), b"agent secret", b"aad").unwrap();
    let pt = c.decrypt(ekey.key_id, &ct, b"aad", &[2, 4, 5]).unwrap();
    assert_eq!(&pt[..], b"agent secret");
    assert!(
        c.decrypt(ekey.key_id, &ct, b"other aad", &[1, 2, 3])
            .is_err()
    );
}
