//! Public-key encodings: X.509 SubjectPublicKeyInfo (PEM) and RFC 7517 JWK.
//!
//! Both are built from the 65-byte uncompressed SEC1 point. The SPKI DER of a P-256
//! key is a fixed 26-byte header (`id-ecPublicKey` with the `prime256v1` parameters,
//! then a BIT STRING of 66 bytes) followed by the point, so no ASN.1 library is needed;
//! the tests cross-check it against the `p256` crate.

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use quorate_crypto::Point;
use quorate_crypto::keys::KeyPurpose;

/// DER header of a P-256 SubjectPublicKeyInfo with an uncompressed point:
/// `SEQUENCE { SEQUENCE { OID 1.2.840.10045.2.1, OID 1.2.840.10045.3.1.7 },
/// BIT STRING (0 unused bits) ... }`.
const SPKI_P256_HEADER: [u8; 26] = [
    0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08, 0x2a,
    0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07, 0x03, 0x42, 0x00,
];

/// The DER SubjectPublicKeyInfo of `point` (91 bytes).
pub fn spki_der(point: &Point) -> Vec<u8> {
    let mut der = Vec::with_capacity(SPKI_P256_HEADER.len() + 65);
    der.extend_from_slice(&SPKI_P256_HEADER);
    der.extend_from_slice(&point.to_uncompressed());
    der
}

/// The SubjectPublicKeyInfo of `point` as PEM (`-----BEGIN PUBLIC KEY-----`), with
/// 64-character lines and a final newline; OpenSSL reads it
/// (`openssl dgst -sha256 -verify key.pem -signature sig.der FILE`).
pub fn spki_pem(point: &Point) -> String {
    let b64 = STANDARD.encode(spki_der(point));
    let mut pem = String::from("-----BEGIN PUBLIC KEY-----\n");
    let mut rest = b64.as_str();
    while !rest.is_empty() {
        let (line, tail) = rest.split_at(rest.len().min(64));
        pem.push_str(line);
        pem.push('\n');
        rest = tail;
    }
    pem.push_str("-----END PUBLIC KEY-----\n");
    pem
}

/// The RFC 7517 JWK of `point`: `kty` EC, `crv` P-256, `x`, `y` (base64url, 32 bytes
/// each), `kid`; signing keys also carry `use: sig` and `alg: ES256` (RFC 7518).
pub fn jwk(point: &Point, kid: &str, purpose: KeyPurpose) -> serde_json::Value {
    let [_tag, coords @ ..] = point.to_uncompressed();
    let (x, y) = coords.split_at(32);
    let mut jwk = serde_json::json!({
        "kty": "EC",
        "crv": "P-256",
        "x": URL_SAFE_NO_PAD.encode(x),
        "y": URL_SAFE_NO_PAD.encode(y),
        "kid": kid,
    });
    if purpose == KeyPurpose::Sign
        && let Some(map) = jwk.as_object_mut()
    {
        map.insert("use".to_owned(), "sig".into());
        map.insert("alg".to_owned(), "ES256".into());
    }
    jwk
}

#[cfg(test)]
mod tests {
    use super::*;
    use p256::pkcs8::DecodePublicKey as _;

    fn point() -> Point {
        // 7·G, a fixed test point.
        let s = quorate_crypto::group::scalar_from_bytes(&{
            let mut b = [0u8; 32];
            b[31] = 7;
            b
        })
        .unwrap();
        Point::new(quorate_crypto::group::mul_g(&s)).unwrap()
    }

    #[test]
    fn spki_matches_the_p256_crate() {
        let p = point();
        let pem = spki_pem(&p);
        let parsed = p256::PublicKey::from_public_key_pem(&pem).unwrap();
        let expected = p256::PublicKey::from_sec1_bytes(&p.to_bytes()).unwrap();
        assert_eq!(parsed, expected);
        let der = p256::PublicKey::from_public_key_der(&spki_der(&p)).unwrap();
        assert_eq!(der, expected);
        assert!(pem.lines().all(|l| l.len() <= 64));
    }

    #[test]
    fn jwk_has_the_coordinates_and_signing_parameters() {
        let p = point();
        let jwk = jwk(&p, "kid-1", KeyPurpose::Sign);
        let x = URL_SAFE_NO_PAD.decode(jwk["x"].as_str().unwrap()).unwrap();
        let y = URL_SAFE_NO_PAD.decode(jwk["y"].as_str().unwrap()).unwrap();
        let mut sec1 = vec![4u8];
        sec1.extend_from_slice(&x);
        sec1.extend_from_slice(&y);
        assert_eq!(sec1, p.to_uncompressed().to_vec());
        assert_eq!(jwk["alg"], "ES256");
        assert_eq!(jwk["kid"], "kid-1");
        let derive = super::jwk(&p, "kid-2", KeyPurpose::Derive);
        assert!(derive.get("alg").is_none());
    }
}
