//! The P-256 group and its strict encodings (DESIGN.md §4 preamble).
//!
//! Points on the wire are 33-byte SEC1 compressed encodings; decoding rejects the
//! identity, off-curve points and any other length. Scalars are 32-byte big-endian and
//! rejected if `>= q`. A [`Point`] is never the identity, so every point that reaches
//! protocol code has passed these checks.
//!
//! All scalar multiplications go through [`mul`], [`mul_public`], [`mul_g`], [`msm`] and
//! `x_of_mul_public` (aws-lc-rs, for signing's re-randomisation) so that the benches can
//! count them ([`crate::opcount`]).

use elliptic_curve::group::{Group, GroupEncoding};
use elliptic_curve::ops::LinearCombination;
use elliptic_curve::{Field, PrimeField};
use p256::ProjectivePoint;
use rand_core::CryptoRng;

use crate::error::{Error, Result};
use crate::opcount;

/// A P-256 scalar (an integer mod q). Public values use this type directly; secret ones
/// are wrapped in [`crate::SecretScalar`].
pub use p256::Scalar;

/// Length of a compressed SEC1 point.
pub const POINT_LEN: usize = 33;
/// Length of an encoded scalar.
pub const SCALAR_LEN: usize = 32;

/// A P-256 point that is not the identity, kept in affine form so that encoding it
/// (for the wire and for every transcript hash) needs no field inversion.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Point(p256::AffinePoint);

impl Point {
    /// The generator `G`.
    pub const GENERATOR: Point = Point(p256::AffinePoint::GENERATOR);

    /// Wraps a projective point; `None` for the identity.
    pub fn new(p: ProjectivePoint) -> Option<Point> {
        if bool::from(p.is_identity()) {
            None
        } else {
            Some(Point(p.to_affine()))
        }
    }

    /// Wraps many points with one field inversion in all (batch normalisation); `None`
    /// if any is the identity.
    pub fn batch(points: &[ProjectivePoint]) -> Option<Vec<Point>> {
        use elliptic_curve::group::Curve;
        if points.iter().any(|p| bool::from(p.is_identity())) {
            return None;
        }
        let mut affine = vec![p256::AffinePoint::IDENTITY; points.len()];
        ProjectivePoint::batch_normalize(points, &mut affine);
        Some(affine.into_iter().map(Point).collect())
    }

    /// Wraps a computed point, returning `fault`-free [`Error::Bug`] context if it is the
    /// identity; callers map this to the right error.
    pub(crate) fn nonzero(p: ProjectivePoint, what: &'static str) -> Result<Point> {
        Point::new(p).ok_or(Error::Bug(what))
    }

    /// The underlying projective point.
    pub fn projective(&self) -> ProjectivePoint {
        ProjectivePoint::from(self.0)
    }

    /// Strict decoding: exactly 33 bytes, compressed SEC1, on the curve, not the identity.
    pub fn from_bytes(bytes: &[u8]) -> Result<Point> {
        let arr: [u8; POINT_LEN] = bytes.try_into().map_err(|_| {
            Error::input(format!(
                "point must be {POINT_LEN} bytes (compressed SEC1), got {}",
                bytes.len()
            ))
        })?;
        if arr[0] != 0x02 && arr[0] != 0x03 {
            return Err(Error::input(
                "point must be SEC1 compressed (first byte 0x02 or 0x03)",
            ));
        }
        let repr = p256::CompressedPoint::from(arr);
        let affine: Option<p256::AffinePoint> = p256::AffinePoint::from_bytes(&repr).into();
        let affine = affine.ok_or_else(|| Error::input("point is not on the P-256 curve"))?;
        if bool::from(affine.is_identity()) {
            return Err(Error::input("point is the identity"));
        }
        Ok(Point(affine))
    }

    /// The 33-byte compressed SEC1 encoding.
    pub fn to_bytes(&self) -> [u8; POINT_LEN] {
        let repr = self.0.to_bytes();
        let mut out = [0u8; POINT_LEN];
        out.copy_from_slice(repr.as_slice());
        out
    }

    /// The 65-byte uncompressed SEC1 encoding (`04 || x || y`), as verifiers and JWKs
    /// expect.
    pub fn to_uncompressed(&self) -> [u8; 65] {
        use elliptic_curve::sec1::ToSec1Point;
        let enc = self.0.to_sec1_point(false);
        let mut out = [0u8; 65];
        out.copy_from_slice(enc.as_bytes());
        out
    }

    /// The affine x-coordinate as a 32-byte big-endian integer.
    pub fn x_bytes(&self) -> [u8; 32] {
        let enc = self.to_bytes();
        let mut x = [0u8; 32];
        x.copy_from_slice(enc.get(1..).unwrap_or(&[0u8; 32]));
        x
    }
}

impl core::fmt::Debug for Point {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "Point(")?;
        for b in self.to_bytes() {
            write!(f, "{b:02x}")?;
        }
        write!(f, ")")
    }
}

/// Strictly decodes a 32-byte big-endian scalar; rejects values `>= q`.
pub fn scalar_from_bytes(bytes: &[u8]) -> Result<Scalar> {
    let arr: [u8; SCALAR_LEN] = bytes.try_into().map_err(|_| {
        Error::input(format!(
            "scalar must be {SCALAR_LEN} bytes, got {}",
            bytes.len()
        ))
    })?;
    Option::from(Scalar::from_repr(arr.into()))
        .ok_or_else(|| Error::input("scalar is not reduced (>= group order q)"))
}

/// The 32-byte big-endian encoding of a scalar.
pub fn scalar_to_bytes(s: &Scalar) -> [u8; SCALAR_LEN] {
    let mut out = [0u8; SCALAR_LEN];
    out.copy_from_slice(s.to_repr().as_slice());
    out
}

/// A uniformly random non-zero scalar.
pub fn random_nonzero(rng: &mut (impl CryptoRng + ?Sized)) -> Scalar {
    loop {
        let s = Scalar::random(rng);
        if !bool::from(s.is_zero()) {
            return s;
        }
    }
}

/// Inverse of a scalar; `None` for zero.
pub fn invert(s: &Scalar) -> Option<Scalar> {
    Option::from(s.invert())
}

/// Inverse of a public scalar in variable time (crypto-bigint's safegcd), about twice as
/// fast as [`invert`]; `None` for zero. Only for public values: δ in signing, Lagrange
/// denominators made of party indices.
pub fn invert_public(s: &Scalar) -> Option<Scalar> {
    Option::from(s.invert_vartime())
}

/// `k·P`, constant time.
pub fn mul(p: &ProjectivePoint, k: &Scalar) -> ProjectivePoint {
    opcount::count_var_base();
    *p * k
}

/// `k·P` in variable time, for a public point and a public scalar only. (Signing's
/// re-randomisation needs only the x-coordinate and takes the faster aws-lc path,
/// `x_of_mul_public`, which the tests check against this function.)
pub fn mul_public(p: &ProjectivePoint, k: &Scalar) -> ProjectivePoint {
    opcount::count_var_base();
    p.mul_vartime(k)
}

/// `x(k·P)`, the affine x-coordinate of `k·P` as 32 big-endian bytes, for a public point
/// and a public non-zero scalar (the signing re-randomisation `r = x(δ·R)`).
///
/// This is exactly an ECDH P-256 shared secret with "private" scalar `k` and peer point
/// `P` (SEC 1 §3.3.1: the shared secret is the x-coordinate of `k·P`), so it is computed
/// with aws-lc-rs's `agreement` (assembly-optimised P-256), several times faster than
/// p256's [`mul_public`], which stays the reference in this module's tests. aws-lc
/// validates `P` again (on the curve) and rejects `k = 0` and `k >= q`; for a [`Point`]
/// (never the identity) and a non-zero reduced scalar none of that can fail and `k·P` is
/// never the identity (the group has prime order), so every error is an [`Error::Bug`].
/// Neither input is secret, so the messages could name them, but do not need to.
///
/// Counted as one variable-base multiplication ([`crate::opcount`]). aws-lc also derives
/// `k·G` when it imports `k` (its API computes the public key of every private key it
/// loads); that fixed-base step is internal to aws-lc and not counted.
pub(crate) fn x_of_mul_public(p: &Point, k: &Scalar) -> Result<[u8; 32]> {
    use aws_lc_rs::agreement::{ECDH_P256, PrivateKey, UnparsedPublicKey, agree};
    opcount::count_var_base();
    if bool::from(k.is_zero()) {
        return Err(Error::Bug("x(k·P) with k = 0"));
    }
    let key = PrivateKey::from_private_key(&ECDH_P256, &scalar_to_bytes(k))
        .map_err(|_| Error::Bug("aws-lc rejected a reduced non-zero P-256 scalar"))?;
    let peer = p.to_uncompressed();
    agree(
        &key,
        UnparsedPublicKey::new(&ECDH_P256, &peer),
        Error::Bug("aws-lc rejected a valid P-256 point for ECDH"),
        |secret| {
            <[u8; 32]>::try_from(secret)
                .map_err(|_| Error::Bug("aws-lc ECDH P-256 secret is not 32 bytes"))
        },
    )
}

/// `k·G` using the precomputed basepoint table, constant time.
pub fn mul_g(k: &Scalar) -> ProjectivePoint {
    opcount::count_fixed_base();
    ProjectivePoint::mul_by_generator(k)
}

/// Below this many terms, [`msm`] uses p256's interleaved wNAF; from here on, the
/// bucket method.
const PIPPENGER_MIN: usize = 48;

/// `Σ k_i·P_i` in variable time. Only for public points and public scalars
/// (verification, public shares, random linear combinations chosen by the verifier).
pub fn msm(terms: &[(ProjectivePoint, Scalar)]) -> ProjectivePoint {
    match terms.len() {
        0 => ProjectivePoint::IDENTITY,
        n => {
            opcount::count_msm(n);
            if n < PIPPENGER_MIN {
                ProjectivePoint::lincomb_vartime(terms)
            } else {
                pippenger(terms)
            }
        }
    }
}

/// Pippenger's bucket method with signed digits, on affine points (one batch inversion)
/// so that every bucket addition is a mixed addition. For `n` terms and window `c` it
/// costs about `(256 / c)·(n + 2^c)` additions plus 256 doublings, against roughly
/// `60·n` additions for per-point wNAF tables: the large batch checks of a presignature
/// batch are where this pays.
fn pippenger(terms: &[(ProjectivePoint, Scalar)]) -> ProjectivePoint {
    use elliptic_curve::group::Curve;
    let n = terms.len();
    let c: usize = match n {
        0..=127 => 5,
        128..=511 => 7,
        512..=2047 => 8,
        2048..=8191 => 10,
        8192..=32767 => 12,
        _ => 13,
    };
    let projective: Vec<ProjectivePoint> = terms.iter().map(|(p, _)| *p).collect();
    let mut affine = vec![p256::AffinePoint::IDENTITY; n];
    ProjectivePoint::batch_normalize(&projective, &mut affine);
    let digits: Vec<Vec<i32>> = terms.iter().map(|(_, s)| signed_digits(s, c)).collect();
    let windows = digits.first().map_or(0, Vec::len);
    let half = 1usize << (c - 1);
    let mut acc = ProjectivePoint::IDENTITY;
    let mut buckets = vec![ProjectivePoint::IDENTITY; half];
    for w in (0..windows).rev() {
        for _ in 0..c {
            acc = acc.double();
        }
        buckets
            .iter_mut()
            .for_each(|b| *b = ProjectivePoint::IDENTITY);
        for (pt, ds) in affine.iter().zip(&digits) {
            let d = ds.get(w).copied().unwrap_or(0);
            if d > 0
                && let Some(b) = buckets.get_mut(d as usize - 1)
            {
                *b += pt;
            } else if d < 0
                && let Some(b) = buckets.get_mut((-d) as usize - 1)
            {
                *b -= pt;
            }
        }
        // Σ_k k·bucket_k by running sums.
        let mut running = ProjectivePoint::IDENTITY;
        let mut total = ProjectivePoint::IDENTITY;
        for b in buckets.iter().rev() {
            running += b;
            total += running;
        }
        acc += total;
    }
    acc
}

/// Signed radix-`2^c` digits of `s` (least significant first), each in
/// `[-2^(c-1), 2^(c-1)]`.
fn signed_digits(s: &Scalar, c: usize) -> Vec<i32> {
    let bytes = s.to_repr();
    let mut limbs = [0u64; 4];
    for (i, chunk) in bytes.as_slice().rchunks(8).enumerate() {
        let mut b = [0u8; 8];
        b.copy_from_slice(chunk);
        if let Some(l) = limbs.get_mut(i) {
            *l = u64::from_be_bytes(b);
        }
    }
    let bit = |i: usize| -> u64 { limbs.get(i / 64).map_or(0, |l| (l >> (i % 64)) & 1) };
    let windows = 256usize.div_ceil(c) + 1;
    let radix = 1i64 << c;
    let mut out = Vec::with_capacity(windows);
    let mut carry = 0i64;
    for w in 0..windows {
        let mut v = 0i64;
        for k in 0..c {
            v |= (bit(w * c + k) as i64) << k;
        }
        v += carry;
        if v > radix / 2 {
            v -= radix;
            carry = 1;
        } else {
            carry = 0;
        }
        out.push(v as i32);
    }
    out
}

/// `Σ_k j^k·C_k`: evaluates a committed polynomial at `j` in the exponent.
pub fn eval_in_exponent(commitments: &[Point], j: Scalar) -> ProjectivePoint {
    let mut terms = Vec::with_capacity(commitments.len());
    let mut pow = Scalar::ONE;
    for c in commitments {
        terms.push((c.projective(), pow));
        pow *= j;
    }
    msm(&terms)
}

/// Reduces a 32-byte big-endian digest to a scalar (ECDSA bits2int then mod q; for
/// P-256 with SHA-256 the bit lengths agree, so no truncation is needed).
pub fn reduce_digest(digest: &[u8; 32]) -> Scalar {
    use elliptic_curve::ops::Reduce;
    <Scalar as Reduce<p256::FieldBytes>>::reduce(&(*digest).into())
}

/// Whether `s > q/2` (ECDSA "high s").
pub fn is_high(s: &Scalar) -> bool {
    use elliptic_curve::scalar::IsHigh;
    bool::from(s.is_high())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn point_round_trip_and_rejections() {
        let p = Point::GENERATOR;
        let enc = p.to_bytes();
        assert_eq!(Point::from_bytes(&enc).ok(), Some(p));
        // wrong length
        assert!(Point::from_bytes(&enc[..32]).is_err());
        // uncompressed tag
        let mut bad = enc;
        bad[0] = 0x04;
        assert!(Point::from_bytes(&bad).is_err());
        // identity encodings
        assert!(Point::from_bytes(&[0u8; 33]).is_err());
        assert!(Point::from_bytes(&[0u8]).is_err());
        // off-curve: x = 0 with tag 02 has no square root on P-256? Search one that fails.
        let mut found_off_curve = false;
        for x in 0u8..=255 {
            let mut b = [0u8; 33];
            b[0] = 0x02;
            b[32] = x;
            if Point::from_bytes(&b).is_err() {
                found_off_curve = true;
                break;
            }
        }
        assert!(found_off_curve);
        // x >= p is rejected
        let mut b = [0xffu8; 33];
        b[0] = 0x02;
        assert!(Point::from_bytes(&b).is_err());
    }

    #[test]
    fn scalar_rejects_unreduced() {
        let q_minus_1 = -Scalar::ONE;
        let enc = scalar_to_bytes(&q_minus_1);
        assert_eq!(scalar_from_bytes(&enc).ok(), Some(q_minus_1));
        // q itself
        let q = hex_literal_q();
        assert!(scalar_from_bytes(&q).is_err());
        assert!(scalar_from_bytes(&[0xff; 32]).is_err());
        assert!(scalar_from_bytes(&[1u8; 31]).is_err());
    }

    fn hex_literal_q() -> [u8; 32] {
        let s = "ffffffff00000000ffffffffffffffffbce6faada7179e84f3b9cac2fc632551";
        let mut out = [0u8; 32];
        for (i, o) in out.iter_mut().enumerate() {
            *o = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).unwrap();
        }
        out
    }

    #[test]
    fn pippenger_matches_naive_across_windows() {
        let mut rng = crate::sim::test_rng("pippenger");
        for n in [48usize, 130, 600] {
            let mut terms: Vec<_> = (0..n)
                .map(|_| (mul_g(&random_nonzero(&mut rng)), random_nonzero(&mut rng)))
                .collect();
            // Edge scalars: 0, 1, -1 (= q - 1), and the identity point.
            terms[0].1 = Scalar::ZERO;
            terms[1].1 = Scalar::ONE;
            terms[2].1 = -Scalar::ONE;
            terms[3].0 = ProjectivePoint::IDENTITY;
            let naive = terms
                .iter()
                .fold(ProjectivePoint::IDENTITY, |acc, (p, s)| acc + mul(p, s));
            assert_eq!(pippenger(&terms), naive, "n = {n}");
            assert_eq!(msm(&terms), naive);
        }
    }

    /// The p256 reference for [`x_of_mul_public`]: `x(k·P)` by [`mul_public`], `None` for
    /// the identity.
    fn x_of_mul_public_p256(p: &Point, k: &Scalar) -> Option<[u8; 32]> {
        Point::new(mul_public(&p.projective(), k)).map(|q| q.x_bytes())
    }

    /// A point whose x-coordinate is `>= q` (a non-canonical `r` before reduction): the
    /// first `x = q + i` that is on the curve.
    fn point_with_x_at_least_q() -> Point {
        let q = hex_literal_q();
        (0u8..=255)
            .find_map(|i| {
                let mut b = [0u8; 33];
                b[0] = 0x02;
                b[1..].copy_from_slice(&q);
                b[32] = b[32].wrapping_add(i);
                Point::from_bytes(&b).ok()
            })
            .unwrap()
    }

    #[test]
    fn x_of_mul_public_matches_p256_reference() {
        let mut rng = crate::sim::test_rng("x_of_mul_public");
        let big_x = point_with_x_at_least_q();
        assert!(big_x.x_bytes() >= hex_literal_q());
        let half = (-Scalar::ONE) * invert(&Scalar::from(2u64)).unwrap(); // (q - 1) / 2
        let special_scalars = [
            Scalar::ONE,
            Scalar::from(2u64),
            Scalar::from(3u64),
            -Scalar::ONE,
            -Scalar::from(2u64),
            half,
            half + Scalar::ONE,
            Scalar::from(u64::MAX),
        ];
        let mut special_points = vec![
            Point::GENERATOR,
            Point::new(-ProjectivePoint::GENERATOR).unwrap(),
            Point::new(mul_g(&Scalar::from(2u64))).unwrap(),
            Point::new(mul_g(&-Scalar::from(2u64))).unwrap(),
            big_x,
            crate::hash::h2c("test", b"special").unwrap(),
        ];
        // k·P whose result is the point with x >= q, for a random k: checks that aws-lc
        // returns the full x-coordinate, not one reduced mod q.
        let k = random_nonzero(&mut rng);
        let p = Point::new(mul(&big_x.projective(), &invert(&k).unwrap())).unwrap();
        assert_eq!(x_of_mul_public(&p, &k).unwrap(), big_x.x_bytes());
        special_points.push(p);

        let mut cases: Vec<(Point, Scalar)> = Vec::new();
        for p in &special_points {
            for k in &special_scalars {
                cases.push((*p, *k));
            }
            cases.push((*p, random_nonzero(&mut rng)));
        }
        for _ in 0..500 {
            let p = Point::new(mul_g(&random_nonzero(&mut rng))).unwrap();
            cases.push((p, random_nonzero(&mut rng)));
            cases.push((p, special_scalars[cases.len() % special_scalars.len()]));
        }
        for (p, k) in &cases {
            let want = x_of_mul_public_p256(p, k).unwrap();
            assert_eq!(x_of_mul_public(p, k).unwrap(), want, "P = {p:?}");
        }
        // x(1·P) = x(P) and x(−k·P) = x(k·P).
        assert_eq!(
            x_of_mul_public(&big_x, &Scalar::ONE).unwrap(),
            big_x.x_bytes()
        );
        let g = Point::GENERATOR;
        assert_eq!(
            x_of_mul_public(&g, &-Scalar::from(5u64)).unwrap(),
            x_of_mul_public(&g, &Scalar::from(5u64)).unwrap()
        );
    }

    #[test]
    fn invert_public_matches_invert() {
        let mut rng = crate::sim::test_rng("invert_public");
        assert_eq!(invert_public(&Scalar::ZERO), None);
        let mut cases = vec![Scalar::ONE, -Scalar::ONE, Scalar::from(2u64)];
        cases.extend((0..200).map(|_| random_nonzero(&mut rng)));
        for s in &cases {
            let inv = invert_public(s).unwrap();
            assert_eq!(Some(inv), invert(s));
            assert_eq!(inv * s, Scalar::ONE);
        }
    }

    #[test]
    fn x_of_mul_public_rejects_zero_scalar_as_a_bug() {
        assert!(matches!(
            x_of_mul_public(&Point::GENERATOR, &Scalar::ZERO),
            Err(Error::Bug(_))
        ));
    }

    #[test]
    fn msm_matches_naive() {
        let mut rng = crate::sim::test_rng("msm");
        let terms: Vec<_> = (0..7)
            .map(|_| (mul_g(&random_nonzero(&mut rng)), random_nonzero(&mut rng)))
            .collect();
        let naive = terms
            .iter()
            .fold(ProjectivePoint::IDENTITY, |acc, (p, s)| acc + mul(p, s));
        assert_eq!(msm(&terms), naive);
    }
}
