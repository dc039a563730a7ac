//! The P-256 group and its strict encodings (DESIGN.md §4 preamble).
//!
//! Points on the wire are 33-byte SEC1 compressed encodings; decoding rejects the
//! identity, off-curve points and any other length. Scalars are 32-byte big-endian and
//! rejected if `>= q`. A [`Point`] is never the identity, so every point that reaches
//! protocol code has passed these checks.
//!
//! All scalar multiplications go through [`mul`], [`mul_public`], [`mul_g`], [`msm`] and
//! `x_of_mul_public` so that the benches can count them ([`crate::opcount`]). They compute
//! on aws-lc's P-256 (the `quorate-p256-awslc` crate, the only unsafe code under
//! `crypto/`), several times faster than p256 for every operation (BENCHMARKS.md, "P-256
//! backends"); p256 keeps the types, the encodings, the scalar field, and serves as the
//! reference in the differential tests here and in that crate.

use elliptic_curve::group::{Group, GroupEncoding};
use elliptic_curve::ops::LinearCombination;
use elliptic_curve::{Field, PrimeField};
use p256::ProjectivePoint;
use quorate_p256_awslc::{EcPoint, UNCOMPRESSED_LEN};
use rand_core::CryptoRng;
use zeroize::Zeroizing;

use crate::error::{Error, Result};
use crate::opcount;

/// A P-256 scalar (an integer mod q). Public values use this type directly; secret ones
/// are wrapped in [`crate::SecretScalar`].
pub use p256::Scalar;

/// Length of a compressed SEC1 point.
pub const POINT_LEN: usize = 33;
/// Length of an uncompressed SEC1 point.
pub const UNCOMPRESSED_POINT_LEN: usize = 65;
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

    /// Strict decoding of the uncompressed form: exactly 65 bytes, `04 || x || y`, both
    /// coordinates reduced, on the curve (the identity has no such encoding). Costs a
    /// curve-equation check, no square root.
    pub fn from_uncompressed(bytes: &[u8]) -> Result<Point> {
        use elliptic_curve::sec1::FromSec1Point;
        let arr: [u8; UNCOMPRESSED_POINT_LEN] = bytes.try_into().map_err(|_| {
            Error::input(format!(
                "point must be {UNCOMPRESSED_POINT_LEN} bytes (uncompressed SEC1), got {}",
                bytes.len()
            ))
        })?;
        if arr[0] != 0x04 {
            return Err(Error::input(
                "point must be SEC1 uncompressed (first byte 0x04)",
            ));
        }
        let enc = p256::Sec1Point::from_bytes(arr)
            .map_err(|_| Error::input("point is not a SEC1 encoding"))?;
        let affine: Option<p256::AffinePoint> = p256::AffinePoint::from_sec1_point(&enc).into();
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
    /// expect, and as [`crate::wire`] carries points.
    pub fn to_uncompressed(&self) -> [u8; UNCOMPRESSED_POINT_LEN] {
        use elliptic_curve::sec1::ToSec1Point;
        let enc = self.0.to_sec1_point(false);
        let mut out = [0u8; UNCOMPRESSED_POINT_LEN];
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

/// The 32-byte big-endian encoding of a possibly secret scalar, zeroized on drop.
fn secret_bytes(k: &Scalar) -> Zeroizing<[u8; SCALAR_LEN]> {
    Zeroizing::new(scalar_to_bytes(k))
}

/// A p256 affine point in aws-lc's form. `None` only if aws-lc refused a valid point.
fn to_ec(p: &p256::AffinePoint) -> Option<EcPoint> {
    use elliptic_curve::sec1::ToSec1Point;
    if bool::from(p.is_identity()) {
        return Some(EcPoint::identity());
    }
    let enc = p.to_sec1_point(false);
    let bytes: &[u8; UNCOMPRESSED_LEN] = enc.as_bytes().try_into().ok()?;
    EcPoint::from_uncompressed(bytes)
}

/// An aws-lc point in p256's form (p256 checks the curve equation once more). `None`
/// only if aws-lc refused the conversion of a valid point.
fn from_ec(p: &EcPoint) -> Option<ProjectivePoint> {
    use elliptic_curve::sec1::FromSec1Point;
    if p.is_identity() {
        return Some(ProjectivePoint::IDENTITY);
    }
    let bytes = p.to_uncompressed()?;
    let enc = p256::Sec1Point::from_bytes(bytes).ok()?;
    Option::<p256::AffinePoint>::from(p256::AffinePoint::from_sec1_point(&enc))
        .map(ProjectivePoint::from)
}

/// `k·P`, constant time (aws-lc; p256 if aws-lc refuses, which it does for no valid
/// input).
pub fn mul(p: &Point, k: &Scalar) -> ProjectivePoint {
    opcount::count_var_base();
    let k_bytes = secret_bytes(k);
    to_ec(&p.0)
        .and_then(|e| e.mul(&k_bytes))
        .and_then(|r| from_ec(&r))
        .unwrap_or_else(|| p.projective() * k)
}

/// `k·P` with p256's variable-time multiplication, for a public point and a public
/// scalar only; the reference that the tests hold the aws-lc paths to.
pub fn mul_public(p: &ProjectivePoint, k: &Scalar) -> ProjectivePoint {
    opcount::count_var_base();
    p.mul_vartime(k)
}

/// `x(k·P)`, the affine x-coordinate of `k·P` as 32 big-endian bytes, for a public point
/// and a public non-zero scalar (the signing re-randomisation `r = x(δ·R)`), with aws-lc's
/// multiplication and one conversion to affine coordinates.
///
/// For a [`Point`] (never the identity) and a non-zero scalar, `k·P` is never the
/// identity (the group has prime order); so every error is an [`Error::Bug`].
pub(crate) fn x_of_mul_public(p: &Point, k: &Scalar) -> Result<[u8; 32]> {
    opcount::count_var_base();
    if bool::from(k.is_zero()) {
        return Err(Error::Bug("x(k·P) with k = 0"));
    }
    let product = to_ec(&p.0)
        .and_then(|e| e.mul(&scalar_to_bytes(k)))
        .ok_or(Error::Bug("aws-lc refused a P-256 multiplication"))?;
    let enc = product
        .to_uncompressed()
        .ok_or(Error::Bug("x(k·P): k·P is the identity"))?;
    let mut x = [0u8; 32];
    x.copy_from_slice(enc.get(1..33).ok_or(Error::Bug("short SEC1 encoding"))?);
    Ok(x)
}

/// `k·G`, constant time (aws-lc's precomputed base-point table; p256's if aws-lc
/// refuses, which it does for no valid input).
pub fn mul_g(k: &Scalar) -> ProjectivePoint {
    opcount::count_fixed_base();
    EcPoint::mul_base(&secret_bytes(k))
        .and_then(|r| from_ec(&r))
        .unwrap_or_else(|| ProjectivePoint::mul_by_generator(k))
}

/// From this many terms on, [`msm`] uses the bucket method; below, interleaved wNAF
/// (Straus). Measured on aws-lc's additions (BENCHMARKS.md, "P-256 backends").
const PIPPENGER_MIN: usize = 192;

/// Width of the wNAF digits of [`straus`]: 8 precomputed odd multiples per term.
const WNAF_WIDTH: u32 = 5;

/// `Σ k_i·P_i` in variable time. Only for public points and public scalars
/// (verification, public shares, random linear combinations chosen by the verifier).
///
/// Computed on aws-lc's point arithmetic (p256 if aws-lc refuses, which it does for no
/// valid input): interleaved wNAF below [`PIPPENGER_MIN`] terms, the bucket method from
/// there on.
pub fn msm(terms: &[(ProjectivePoint, Scalar)]) -> ProjectivePoint {
    if terms.is_empty() {
        return ProjectivePoint::IDENTITY;
    }
    opcount::count_msm(terms.len());
    msm_awslc(terms)
        .and_then(|sum| from_ec(&sum))
        .unwrap_or_else(|| ProjectivePoint::lincomb_vartime(terms))
}

/// [`msm`] with the sum as a [`Point`], `None` for the identity: the affine result comes
/// straight from aws-lc, without the field inversion of [`Point::new`].
pub fn msm_point(terms: &[(ProjectivePoint, Scalar)]) -> Option<Point> {
    if terms.is_empty() {
        return None;
    }
    opcount::count_msm(terms.len());
    match msm_awslc(terms) {
        Some(sum) if sum.is_identity() => None,
        Some(sum) => sum
            .to_uncompressed()
            .and_then(|b| Point::from_uncompressed(&b).ok())
            .or_else(|| Point::new(ProjectivePoint::lincomb_vartime(terms))),
        None => Point::new(ProjectivePoint::lincomb_vartime(terms)),
    }
}

/// The sum on aws-lc; `None` only if aws-lc refused an operation on valid input.
fn msm_awslc(terms: &[(ProjectivePoint, Scalar)]) -> Option<EcPoint> {
    use elliptic_curve::group::Curve;
    let projective: Vec<ProjectivePoint> = terms.iter().map(|(p, _)| *p).collect();
    let mut affine = vec![p256::AffinePoint::IDENTITY; terms.len()];
    ProjectivePoint::batch_normalize(&projective, &mut affine);
    let points = affine.iter().map(to_ec).collect::<Option<Vec<EcPoint>>>()?;
    let scalars: Vec<Scalar> = terms.iter().map(|(_, s)| *s).collect();
    if terms.len() < PIPPENGER_MIN {
        straus(&points, &scalars)
    } else {
        pippenger(&points, &scalars)
    }
}

/// A scalar as four little-endian 64-bit limbs.
fn limbs(s: &Scalar) -> [u64; 4] {
    let bytes = s.to_repr();
    let mut out = [0u64; 4];
    for (l, chunk) in out.iter_mut().zip(bytes.as_slice().rchunks(8)) {
        let mut b = [0u8; 8];
        b.copy_from_slice(chunk);
        *l = u64::from_be_bytes(b);
    }
    out
}

/// The width-`w` non-adjacent form of `s`, least significant digit first: every non-zero
/// digit odd and in `(−2^(w−1), 2^(w−1))`, any two non-zero digits at least `w` apart;
/// 257 digits hold any 256-bit value.
fn wnaf(s: &Scalar, w: u32) -> [i8; 257] {
    let mut k = [0u64; 5];
    k[..4].copy_from_slice(&limbs(s));
    let mut out = [0i8; 257];
    let window = 1u64 << w;
    for digit in out.iter_mut() {
        if k.iter().all(|&l| l == 0) {
            break;
        }
        if k[0] & 1 == 1 {
            let m = k[0] & (window - 1);
            // m ∈ [0, 2^w); the digit is m or m − 2^w, whichever is in (−2^(w−1), 2^(w−1)).
            if m >= window / 2 {
                add_small(&mut k, window - m);
                *digit = (m as i64 - window as i64) as i8;
            } else {
                sub_small(&mut k, m);
                *digit = m as i8;
            }
        }
        let mut carry = 0u64;
        for l in k.iter_mut().rev() {
            let low = *l & 1;
            *l = (*l >> 1) | (carry << 63);
            carry = low;
        }
    }
    out
}

fn add_small(k: &mut [u64; 5], v: u64) {
    let mut carry = v;
    for l in k.iter_mut() {
        let (s, c) = l.overflowing_add(carry);
        *l = s;
        carry = u64::from(c);
        if carry == 0 {
            break;
        }
    }
}

fn sub_small(k: &mut [u64; 5], v: u64) {
    let mut borrow = v;
    for l in k.iter_mut() {
        let (s, b) = l.overflowing_sub(borrow);
        *l = s;
        borrow = u64::from(b);
        if borrow == 0 {
            break;
        }
    }
}

/// Interleaved wNAF multi-scalar multiplication (Straus): per term, the odd multiples
/// `P, 3P, …, (2^(w−1)−1)·P` and their negatives; then 256 shared doublings and about
/// `256/(w+1)` additions per term.
fn straus(points: &[EcPoint], scalars: &[Scalar]) -> Option<EcPoint> {
    let half = 1usize << (WNAF_WIDTH - 2);
    let mut tables: Vec<(Vec<EcPoint>, Vec<EcPoint>)> = Vec::with_capacity(points.len());
    for p in points {
        let mut twice = p.clone();
        ok(twice.double())?;
        let mut pos = Vec::with_capacity(half);
        let mut cur = p.clone();
        for _ in 0..half {
            let next = {
                let mut n = cur.clone();
                ok(n.add_assign(&twice))?;
                n
            };
            pos.push(cur);
            cur = next;
        }
        let neg = pos
            .iter()
            .map(|q| {
                let mut n = q.clone();
                ok(n.negate()).map(|()| n)
            })
            .collect::<Option<Vec<_>>>()?;
        tables.push((pos, neg));
    }
    let digits: Vec<[i8; 257]> = scalars.iter().map(|s| wnaf(s, WNAF_WIDTH)).collect();
    let top = digits
        .iter()
        .filter_map(|d| d.iter().rposition(|&x| x != 0))
        .max();
    let mut acc = EcPoint::identity();
    let Some(top) = top else {
        return Some(acc);
    };
    for i in (0..=top).rev() {
        if i != top {
            ok(acc.double())?;
        }
        for ((pos, neg), d) in tables.iter().zip(&digits) {
            let digit = d.get(i).copied().unwrap_or(0);
            let entry = match digit {
                0 => None,
                x if x > 0 => pos.get((x as usize - 1) / 2),
                x => neg.get((x.unsigned_abs() as usize - 1) / 2),
            };
            if let Some(e) = entry {
                ok(acc.add_assign(e))?;
            }
        }
    }
    Some(acc)
}

fn ok(done: bool) -> Option<()> {
    done.then_some(())
}

/// Pippenger's bucket method with signed digits. For `n` terms and window `c` it costs
/// about `(256 / c)·(n + 2^c)` additions plus 256 doublings, against about `n·256/6`
/// additions for [`straus`]: the large batch checks of a presignature batch are where
/// this pays.
fn pippenger(points: &[EcPoint], scalars: &[Scalar]) -> Option<EcPoint> {
    let n = points.len();
    let c: usize = match n {
        0..=127 => 5,
        128..=511 => 7,
        512..=2047 => 8,
        2048..=8191 => 10,
        8192..=32767 => 12,
        _ => 13,
    };
    let negated = points
        .iter()
        .map(|p| {
            let mut q = p.clone();
            ok(q.negate()).map(|()| q)
        })
        .collect::<Option<Vec<_>>>()?;
    let digits: Vec<Vec<i32>> = scalars.iter().map(|s| signed_digits(s, c)).collect();
    let windows = digits.first().map_or(0, Vec::len);
    let half = 1usize << (c - 1);
    let mut acc = EcPoint::identity();
    let mut buckets: Vec<EcPoint> = (0..half).map(|_| EcPoint::identity()).collect();
    for w in (0..windows).rev() {
        for _ in 0..c {
            ok(acc.double())?;
        }
        buckets.iter_mut().for_each(|b| *b = EcPoint::identity());
        for ((pt, neg), ds) in points.iter().zip(&negated).zip(&digits) {
            let d = ds.get(w).copied().unwrap_or(0);
            let (bucket, addend) = match d {
                0 => continue,
                d if d > 0 => (buckets.get_mut(d as usize - 1), pt),
                d => (buckets.get_mut(d.unsigned_abs() as usize - 1), neg),
            };
            if let Some(b) = bucket {
                ok(b.add_assign(addend))?;
            }
        }
        // Σ_k k·bucket_k by running sums.
        let mut running = EcPoint::identity();
        let mut total = EcPoint::identity();
        for b in buckets.iter().rev() {
            ok(running.add_assign(b))?;
            ok(total.add_assign(&running))?;
        }
        ok(acc.add_assign(&total))?;
    }
    Some(acc)
}

/// Signed radix-`2^c` digits of `s` (least significant first), each in
/// `[-2^(c-1), 2^(c-1)]`.
fn signed_digits(s: &Scalar, c: usize) -> Vec<i32> {
    let limbs = limbs(s);
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
    fn uncompressed_round_trip_and_rejections() {
        let mut rng = crate::sim::test_rng("uncompressed");
        for p in [
            Point::GENERATOR,
            point_with_x_at_least_q(),
            Point::new(mul_g(&random_nonzero(&mut rng))).unwrap(),
        ] {
            let enc = p.to_uncompressed();
            assert_eq!(Point::from_uncompressed(&enc).ok(), Some(p));
            // The compressed decoder refuses it and vice versa: one form per field.
            assert!(Point::from_bytes(&enc).is_err());
            assert!(Point::from_uncompressed(&p.to_bytes()).is_err());
            // y + 1 is off the curve.
            let mut off = enc;
            off[64] ^= 1;
            assert!(Point::from_uncompressed(&off).is_err());
            // Any other tag.
            for tag in [0x00u8, 0x02, 0x03, 0x06, 0x07] {
                let mut t = enc;
                t[0] = tag;
                assert!(Point::from_uncompressed(&t).is_err(), "tag {tag:#x}");
            }
            assert!(Point::from_uncompressed(&enc[..64]).is_err());
        }
        let mut zero = [0u8; 65];
        zero[0] = 0x04;
        assert!(Point::from_uncompressed(&zero).is_err());
        // x = p, unreduced.
        let mut unreduced = Point::GENERATOR.to_uncompressed();
        unreduced[1..33].copy_from_slice(&[
            0xff, 0xff, 0xff, 0xff, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff,
            0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
        ]);
        assert!(Point::from_uncompressed(&unreduced).is_err());
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

    fn naive(terms: &[(ProjectivePoint, Scalar)]) -> ProjectivePoint {
        terms.iter().fold(ProjectivePoint::IDENTITY, |acc, (p, s)| {
            acc + p.mul_vartime(s)
        })
    }

    /// Random terms with the edge scalars 0, 1, −1 (= q − 1), 2 and the identity point,
    /// and a repeated point with opposite scalars (cancelling terms).
    fn edge_terms(rng: &mut impl rand_core::CryptoRng, n: usize) -> Vec<(ProjectivePoint, Scalar)> {
        let mut terms: Vec<_> = (0..n.max(6))
            .map(|_| (mul_g(&random_nonzero(rng)), random_nonzero(rng)))
            .collect();
        terms[0].1 = Scalar::ZERO;
        terms[1].1 = Scalar::ONE;
        terms[2].1 = -Scalar::ONE;
        terms[3].0 = ProjectivePoint::IDENTITY;
        terms[4].1 = Scalar::from(2u64);
        terms[5] = (terms[4].0, -terms[4].1);
        terms.truncate(n);
        terms
    }

    #[test]
    fn both_msm_methods_match_naive_across_sizes_and_windows() {
        let mut rng = crate::sim::test_rng("msm-methods");
        for n in [1usize, 2, 3, 6, 48, 130, 300, 600] {
            let terms = edge_terms(&mut rng, n);
            let want = naive(&terms);
            let mut affine = vec![p256::AffinePoint::IDENTITY; n];
            let projective: Vec<_> = terms.iter().map(|(p, _)| *p).collect();
            elliptic_curve::group::Curve::batch_normalize(&projective[..], &mut affine[..]);
            let points: Vec<EcPoint> = affine.iter().map(|a| to_ec(a).unwrap()).collect();
            let scalars: Vec<Scalar> = terms.iter().map(|(_, s)| *s).collect();
            assert_eq!(
                from_ec(&straus(&points, &scalars).unwrap()),
                Some(want),
                "straus n = {n}"
            );
            assert_eq!(
                from_ec(&pippenger(&points, &scalars).unwrap()),
                Some(want),
                "pippenger n = {n}"
            );
            assert_eq!(msm(&terms), want, "msm n = {n}");
            assert_eq!(msm_point(&terms), Point::new(want), "msm_point n = {n}");
        }
        // All-zero scalars and all-identity points sum to the identity.
        let zeros = vec![(ProjectivePoint::GENERATOR, Scalar::ZERO); 3];
        assert_eq!(msm(&zeros), ProjectivePoint::IDENTITY);
        assert_eq!(msm_point(&zeros), None);
        let ids = vec![(ProjectivePoint::IDENTITY, Scalar::ONE); 300];
        assert_eq!(msm(&ids), ProjectivePoint::IDENTITY);
    }

    /// Where [`PIPPENGER_MIN`] comes from: median time of each method per size, printed
    /// as a table. Not a test of anything; run on demand:
    /// `cargo test --release -p quorate-crypto --lib msm_crossover -- --ignored --nocapture`.
    #[test]
    #[ignore = "a measurement, run on demand"]
    #[allow(
        clippy::print_stdout,
        reason = "the table on stdout is the measurement"
    )]
    fn msm_crossover() {
        use std::time::Instant;
        let mut rng = crate::sim::test_rng("msm-crossover");
        println!("| terms | Straus (wNAF 5) µs | Pippenger µs | p256 lincomb µs |");
        println!("| ---: | ---: | ---: | ---: |");
        for n in [2usize, 8, 32, 81, 128, 192, 256, 384, 512, 768] {
            let terms: Vec<_> = (0..n)
                .map(|_| (mul_g(&random_nonzero(&mut rng)), random_nonzero(&mut rng)))
                .collect();
            let points: Vec<EcPoint> = terms
                .iter()
                .map(|(p, _)| to_ec(&p.to_affine()).unwrap())
                .collect();
            let scalars: Vec<Scalar> = terms.iter().map(|(_, s)| *s).collect();
            let median = |f: &dyn Fn()| {
                let mut t: Vec<f64> = (0..9)
                    .map(|_| {
                        let start = Instant::now();
                        f();
                        start.elapsed().as_secs_f64() * 1e6
                    })
                    .collect();
                t.sort_by(f64::total_cmp);
                t[4]
            };
            let a = median(&|| {
                std::hint::black_box(straus(&points, &scalars));
            });
            let b = median(&|| {
                std::hint::black_box(pippenger(&points, &scalars));
            });
            let c = median(&|| {
                std::hint::black_box(ProjectivePoint::lincomb_vartime(&terms[..]));
            });
            println!("| {n} | {a:.0} | {b:.0} | {c:.0} |");
        }
    }

    #[test]
    fn wnaf_digits_recompose_the_scalar() {
        let mut rng = crate::sim::test_rng("wnaf");
        let mut cases = vec![
            Scalar::ZERO,
            Scalar::ONE,
            -Scalar::ONE,
            Scalar::from(u64::MAX),
        ];
        cases.extend((0..200).map(|_| random_nonzero(&mut rng)));
        for s in cases {
            let digits = wnaf(&s, WNAF_WIDTH);
            let mut acc = Scalar::ZERO;
            let mut last_nonzero: Option<usize> = None;
            for (i, &d) in digits.iter().enumerate().rev() {
                acc = acc.double();
                if d != 0 {
                    assert!(d % 2 != 0 && d.unsigned_abs() < 16, "digit {d}");
                    if let Some(j) = last_nonzero {
                        assert!(j - i >= WNAF_WIDTH as usize, "digits {j} and {i} too close");
                    }
                    last_nonzero = Some(i);
                    let m = Scalar::from(u64::from(d.unsigned_abs()));
                    acc = if d > 0 { acc + m } else { acc - m };
                }
            }
            assert_eq!(acc, s);
        }
    }

    #[test]
    fn mul_and_mul_g_match_p256() {
        let mut rng = crate::sim::test_rng("mul");
        let mut scalars = vec![Scalar::ZERO, Scalar::ONE, -Scalar::ONE, Scalar::from(2u64)];
        scalars.extend((0..50).map(|_| random_nonzero(&mut rng)));
        let points = [
            Point::GENERATOR,
            Point::new(-ProjectivePoint::GENERATOR).unwrap(),
            point_with_x_at_least_q(),
            Point::new(mul_g(&random_nonzero(&mut rng))).unwrap(),
        ];
        for k in &scalars {
            assert_eq!(mul_g(k), ProjectivePoint::mul_by_generator(k));
            for p in &points {
                assert_eq!(mul(p, k), p.projective() * k);
            }
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
        let p = Point::new(mul(&big_x, &invert(&k).unwrap())).unwrap();
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
}
