//! Token objects: each `raw` key of a cluster is a private-key object (it signs) and a
//! public-key object, both `CKK_EC` on P-256 (PKCS#11 2.40 §2.3.3–2.3.4).
//!
//! | attribute | private key | public key |
//! | --- | --- | --- |
//! | `CKA_CLASS` | `CKO_PRIVATE_KEY` | `CKO_PUBLIC_KEY` |
//! | `CKA_KEY_TYPE` | `CKK_EC` | `CKK_EC` |
//! | `CKA_LABEL` | the key's name | the key's name |
//! | `CKA_ID` | the key id (hex-decoded) | the same |
//! | `CKA_EC_PARAMS` | DER OID `prime256v1` (1.2.840.10045.3.1.7) | the same |
//! | `CKA_EC_POINT` | DER OCTET STRING of the uncompressed point (also here, for tools that read it from the private key) | the same |
//! | `CKA_SIGN` | true | — |
//! | `CKA_SENSITIVE`, `CKA_ALWAYS_SENSITIVE`, `CKA_NEVER_EXTRACTABLE` | true | — |
//! | `CKA_EXTRACTABLE`, `CKA_DECRYPT`, `CKA_DERIVE`, `CKA_UNWRAP`, `CKA_SIGN_RECOVER` | false | — |
//! | `CKA_VERIFY`, `CKA_ENCRYPT`, `CKA_WRAP`, `CKA_DERIVE` | — | false (the module does not verify) |
//! | `CKA_TOKEN`, `CKA_LOCAL` | true | true |
//! | `CKA_PRIVATE`, `CKA_MODIFIABLE`, `CKA_COPYABLE`, `CKA_DESTROYABLE` | false | false |
//! | `CKA_VALUE` | sensitive: no part of the key is anywhere but in the nodes' shares | — |
//!
//! Any other attribute is `CKR_ATTRIBUTE_TYPE_INVALID`.

use cryptoki_sys::*;
use quorate_client::KeyInfo;

/// DER of the named curve P-256: `OBJECT IDENTIFIER 1.2.840.10045.3.1.7`
/// (RFC 5480 §2.1.1.1).
pub const P256_EC_PARAMS: [u8; 10] = [0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];

/// Which of a key's two objects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ObjectKind {
    /// `CKO_PRIVATE_KEY`: signs through the cluster.
    PrivateKey,
    /// `CKO_PUBLIC_KEY`.
    PublicKey,
}

/// An attribute's value as `C_GetAttributeValue` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attribute {
    /// The value's bytes.
    Value(Vec<u8>),
    /// The object has it, but it cannot be revealed (`CKR_ATTRIBUTE_SENSITIVE`).
    Sensitive,
    /// The object has no such attribute (`CKR_ATTRIBUTE_TYPE_INVALID`).
    Invalid,
}

/// An object of a token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Object {
    /// Its handle (unique in the module, never reused).
    pub handle: CK_OBJECT_HANDLE,
    /// Private or public key.
    pub kind: ObjectKind,
    /// The key's name (`CKA_LABEL`), which signing requests name.
    pub name: String,
    /// `CKA_ID`.
    pub id: Vec<u8>,
    /// `CKA_EC_POINT`: `04 41 04 || X || Y`.
    pub ec_point: Vec<u8>,
}

fn ulong(v: CK_ULONG) -> Attribute {
    Attribute::Value(v.to_ne_bytes().to_vec())
}

fn flag(v: bool) -> Attribute {
    Attribute::Value(vec![if v { CK_TRUE } else { CK_FALSE }])
}

impl Object {
    /// The `kind` object of `key`.
    pub fn new(handle: CK_OBJECT_HANDLE, kind: ObjectKind, key: &KeyInfo) -> Self {
        let point = key.public_key.to_uncompressed();
        let mut ec_point = Vec::with_capacity(point.len() + 2);
        ec_point.push(0x04); // OCTET STRING
        ec_point.push(point.len() as u8); // 65: short-form length
        ec_point.extend_from_slice(&point);
        let id = hex::decode(&key.key_id).unwrap_or_else(|_| key.key_id.as_bytes().to_vec());
        Object {
            handle,
            kind,
            name: key.name.clone(),
            id,
            ec_point,
        }
    }

    /// Attribute `ty` of this object.
    pub fn attribute(&self, ty: CK_ATTRIBUTE_TYPE) -> Attribute {
        let private = self.kind == ObjectKind::PrivateKey;
        match ty {
            CKA_CLASS => ulong(if private {
                CKO_PRIVATE_KEY
            } else {
                CKO_PUBLIC_KEY
            }),
            CKA_KEY_TYPE => ulong(CKK_EC),
            CKA_LABEL => Attribute::Value(self.name.as_bytes().to_vec()),
            CKA_ID => Attribute::Value(self.id.clone()),
            CKA_EC_PARAMS => Attribute::Value(P256_EC_PARAMS.to_vec()),
            CKA_EC_POINT => Attribute::Value(self.ec_point.clone()),
            CKA_KEY_GEN_MECHANISM => ulong(CKM_EC_KEY_PAIR_GEN),
            CKA_TOKEN | CKA_LOCAL => flag(true),
            CKA_PRIVATE | CKA_MODIFIABLE | CKA_COPYABLE | CKA_DESTROYABLE | CKA_DERIVE => {
                flag(false)
            }
            CKA_SUBJECT | CKA_START_DATE | CKA_END_DATE => Attribute::Value(Vec::new()),
            CKA_ALLOWED_MECHANISMS if private => {
                let mut v = CKM_ECDSA.to_ne_bytes().to_vec();
                v.extend_from_slice(&CKM_ECDSA_SHA256.to_ne_bytes());
                Attribute::Value(v)
            }
            CKA_SIGN | CKA_SENSITIVE | CKA_ALWAYS_SENSITIVE | CKA_NEVER_EXTRACTABLE if private => {
                flag(true)
            }
            CKA_EXTRACTABLE
            | CKA_DECRYPT
            | CKA_UNWRAP
            | CKA_SIGN_RECOVER
            | CKA_ALWAYS_AUTHENTICATE
            | CKA_WRAP_WITH_TRUSTED
                if private =>
            {
                flag(false)
            }
            CKA_VALUE if private => Attribute::Sensitive,
            CKA_VERIFY | CKA_VERIFY_RECOVER | CKA_ENCRYPT | CKA_WRAP | CKA_TRUSTED if !private => {
                flag(false)
            }
            _ => Attribute::Invalid,
        }
    }

    /// Whether the object has every `(type, value)` of `template`.
    pub fn matches(&self, template: &[(CK_ATTRIBUTE_TYPE, Vec<u8>)]) -> bool {
        template
            .iter()
            .all(|(ty, want)| matches!(self.attribute(*ty), Attribute::Value(v) if v == *want))
    }
}
