//! Domain-separated hashing (DESIGN.md §4 preamble).
//!
//! - [`h2s`]: RFC 9380 `hash_to_field` (expand_message_xmd with SHA-256, L = 48, one
//!   element) into a P-256 scalar, with DST `"QUORATE-V1-" || tag`.
//! - [`h2c`]: RFC 9380 `P256_XMD:SHA-256_SSWU_RO_` with DST
//!   `"QUORATE-V1-P256_XMD:SHA-256_SSWU_RO_-" || tag`.
//! - [`Transcript`]: an unambiguous, length-prefixed encoding of labelled fields that
//!   proofs and commitments hash, so no two different field lists collide.

use p256::hash2curve::{ExpandMsgXmd, GroupDigest};
use p256::{NistP256, ProjectivePoint};
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};
use crate::group::{Point, Scalar};
use crate::opcount;

use p256::elliptic_curve::consts::U48;
use p256::hash2curve;

/// Prefix of every Quorate domain-separation tag.
pub const DST_PREFIX: &[u8] = b"QUORATE-V1-";
/// Prefix of Quorate's hash-to-curve tags.
pub const H2C_DST_PREFIX: &[u8] = b"QUORATE-V1-P256_XMD:SHA-256_SSWU_RO_-";

/// Hash-to-scalar: `H2S(tag, msg)`.
pub fn h2s(tag: &str, msg: &[u8]) -> Scalar {
    // expand_message_xmd only fails for DSTs longer than 255 bytes or outputs longer
    // than 255 blocks; our tags are short constants and the output is 48 bytes.
    hash2curve::hash_to_scalar::<NistP256, ExpandMsgXmd<Sha256>, U48>(
        &[msg],
        &[DST_PREFIX, tag.as_bytes()],
    )
    .unwrap_or(Scalar::ZERO)
}

/// Hash-to-curve with Quorate's DST for `tag`.
pub fn h2c(tag: &str, msg: &[u8]) -> Result<Point> {
    hash_to_curve_with_dst(msg, &[H2C_DST_PREFIX, tag.as_bytes()])
}

/// RFC 9380 `P256_XMD:SHA-256_SSWU_RO_` with an explicit DST (given as concatenated
/// parts). Exposed for the known-answer tests.
pub fn hash_to_curve_with_dst(msg: &[u8], dst: &[&[u8]]) -> Result<Point> {
    opcount::count_fixed_base();
    let p: ProjectivePoint = NistP256::hash_from_bytes(&[msg], dst)
        .map_err(|_| Error::input("hash-to-curve domain separation tag is too long"))?;
    // The identity has negligible probability under the random-oracle map.
    Point::new(p).ok_or(Error::Bug("hash-to-curve produced the identity"))
}

/// SHA-256 of `data`.
pub fn sha256(data: &[u8]) -> [u8; 32] {
    Sha256::digest(data).into()
}

/// A length-prefixed, labelled list of fields, hashed to a scalar or a 32-byte digest.
///
/// Each field is encoded as `u16 label length || label || u32 data length || data`,
/// preceded by the protocol label, so the encoding is injective.
#[derive(Clone)]
pub struct Transcript {
    buf: Vec<u8>,
}

impl Transcript {
    /// A transcript for `protocol` (also used as the DST tag of [`Transcript::challenge`]).
    pub fn new(protocol: &str) -> Self {
        let mut t = Transcript {
            buf: Vec::with_capacity(256),
        };
        t.append("protocol", protocol.as_bytes());
        t
    }

    /// Appends a labelled byte string.
    pub fn append(&mut self, label: &str, data: &[u8]) -> &mut Self {
        let l = label.as_bytes();
        self.buf.extend_from_slice(&(l.len() as u16).to_be_bytes());
        self.buf.extend_from_slice(l);
        self.buf
            .extend_from_slice(&(data.len() as u32).to_be_bytes());
        self.buf.extend_from_slice(data);
        self
    }

    /// Appends a point.
    pub fn point(&mut self, label: &str, p: &Point) -> &mut Self {
        self.append(label, &p.to_bytes())
    }

    /// Appends a list of points.
    pub fn points(&mut self, label: &str, ps: &[Point]) -> &mut Self {
        let mut data = Vec::with_capacity(ps.len() * 33);
        for p in ps {
            data.extend_from_slice(&p.to_bytes());
        }
        self.append(label, &data)
    }

    /// Appends a scalar.
    pub fn scalar(&mut self, label: &str, s: &Scalar) -> &mut Self {
        self.append(label, &crate::group::scalar_to_bytes(s))
    }

    /// Appends a number.
    pub fn u64(&mut self, label: &str, v: u64) -> &mut Self {
        self.append(label, &v.to_be_bytes())
    }

    /// The challenge scalar `H2S(tag, transcript)`.
    pub fn challenge(&self, tag: &str) -> Scalar {
        h2s(tag, &self.buf)
    }

    /// SHA-256 of the transcript.
    pub fn digest(&self) -> [u8; 32] {
        sha256(&self.buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transcript_is_injective_on_boundaries() {
        let mut a = Transcript::new("t");
        a.append("x", b"ab").append("y", b"c");
        let mut b = Transcript::new("t");
        b.append("x", b"a").append("y", b"bc");
        assert_ne!(a.digest(), b.digest());
        assert_ne!(a.challenge("t"), b.challenge("t"));
    }

    #[test]
    fn tags_separate_domains() {
        assert_ne!(h2s("a", b"m"), h2s("b", b"m"));
        assert_ne!(h2c("a", b"m").unwrap(), h2c("b", b"m").unwrap());
    }
}
