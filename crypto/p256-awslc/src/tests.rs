//! Differential tests: every operation against the pure-Rust `p256` crate, on random and
//! edge inputs (scalars 0, 1, 2, q−1, (q±1)/2; the identity; doubling and inverse pairs;
//! encodings off the curve, unreduced and malformed).

use elliptic_curve::PrimeField;
use elliptic_curve::group::Group;
use elliptic_curve::sec1::{FromSec1Point, ToSec1Point};
use p256::{AffinePoint, ProjectivePoint, Scalar};
use proptest::prelude::*;

use super::*;

fn to_aws(p: &ProjectivePoint) -> EcPoint {
    if bool::from(p.is_identity()) {
        return EcPoint::identity();
    }
    let enc = p.to_affine().to_sec1_point(false);
    let bytes: [u8; UNCOMPRESSED_LEN] = enc.as_bytes().try_into().unwrap();
    EcPoint::from_uncompressed(&bytes).unwrap()
}

fn from_aws(p: &EcPoint) -> ProjectivePoint {
    match p.to_uncompressed() {
        None => {
            assert!(p.is_identity());
            ProjectivePoint::IDENTITY
        }
        Some(bytes) => {
            let enc = p256::Sec1Point::from_bytes(bytes).unwrap();
            let a: Option<AffinePoint> = AffinePoint::from_sec1_point(&enc).into();
            ProjectivePoint::from(a.unwrap())
        }
    }
}

fn bytes(s: &Scalar) -> [u8; 32] {
    s.to_repr().into()
}

/// 0, 1, 2, 3, q−1, q−2, (q−1)/2, (q+1)/2 and 2^64−1.
fn edge_scalars() -> Vec<Scalar> {
    let half = -Scalar::ONE * Scalar::from(2u64).invert().unwrap();
    vec![
        Scalar::ZERO,
        Scalar::ONE,
        Scalar::from(2u64),
        Scalar::from(3u64),
        -Scalar::ONE,
        -Scalar::from(2u64),
        half,
        half + Scalar::ONE,
        Scalar::from(u64::MAX),
    ]
}

fn edge_points() -> Vec<ProjectivePoint> {
    let g = ProjectivePoint::GENERATOR;
    vec![
        ProjectivePoint::IDENTITY,
        g,
        -g,
        g.double(),
        g * (-Scalar::from(2u64)),
    ]
}

fn scalar_strategy() -> impl Strategy<Value = Scalar> {
    prop_oneof![
        4 => any::<[u8; 32]>().prop_map(|b| {
            Option::<Scalar>::from(Scalar::from_repr(b.into())).unwrap_or(Scalar::ONE)
        }),
        1 => (0usize..9).prop_map(|i| edge_scalars()[i]),
    ]
}

fn point_strategy() -> impl Strategy<Value = ProjectivePoint> {
    prop_oneof![
        4 => scalar_strategy().prop_map(|k| ProjectivePoint::mul_by_generator(&k)),
        1 => (0usize..5).prop_map(|i| edge_points()[i]),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn encoding_round_trips(p in point_strategy()) {
        prop_assert_eq!(from_aws(&to_aws(&p)), p);
    }

    #[test]
    fn addition_matches_p256(a in point_strategy(), b in point_strategy()) {
        let mut x = to_aws(&a);
        prop_assert!(x.add_assign(&to_aws(&b)));
        prop_assert_eq!(from_aws(&x), a + b);
    }

    #[test]
    fn doubling_and_self_addition_match_p256(a in point_strategy()) {
        let mut d = to_aws(&a);
        prop_assert!(d.double());
        prop_assert_eq!(from_aws(&d), a.double());
        // a + a through the addition formula (its doubling case).
        let mut s = to_aws(&a);
        let same = s.clone();
        prop_assert!(s.add_assign(&same));
        prop_assert_eq!(from_aws(&s), a.double());
        // a + (−a) = O (its inverse case).
        let mut z = to_aws(&a);
        let mut neg = to_aws(&a);
        prop_assert!(neg.negate());
        prop_assert_eq!(from_aws(&neg), -a);
        prop_assert!(z.add_assign(&neg));
        prop_assert!(z.is_identity());
    }

    #[test]
    fn base_multiplication_matches_p256(k in scalar_strategy()) {
        let r = EcPoint::mul_base(&bytes(&k)).unwrap();
        prop_assert_eq!(from_aws(&r), ProjectivePoint::mul_by_generator(&k));
    }

    #[test]
    fn variable_base_multiplication_matches_p256(p in point_strategy(), k in scalar_strategy()) {
        let r = to_aws(&p).mul(&bytes(&k)).unwrap();
        prop_assert_eq!(from_aws(&r), p * k);
    }

    #[test]
    fn equality_matches_p256(a in point_strategy(), b in point_strategy()) {
        prop_assert_eq!(to_aws(&a) == to_aws(&b), a == b);
        // Equal points in different Jacobian representations compare equal.
        let mut twice = to_aws(&a);
        prop_assert!(twice.double());
        let mut sum = to_aws(&a);
        prop_assert!(sum.add_assign(&to_aws(&a)));
        prop_assert!(twice == sum);
    }
}

#[test]
fn every_edge_scalar_times_every_edge_point() {
    for p in edge_points() {
        let ap = to_aws(&p);
        for k in edge_scalars() {
            assert_eq!(from_aws(&ap.mul(&bytes(&k)).unwrap()), p * k);
        }
    }
    for k in edge_scalars() {
        assert_eq!(
            from_aws(&EcPoint::mul_base(&bytes(&k)).unwrap()),
            ProjectivePoint::mul_by_generator(&k)
        );
    }
}

#[test]
fn the_identity_has_no_encoding_and_is_neutral() {
    let o = EcPoint::identity();
    assert!(o.is_identity());
    assert_eq!(o.to_uncompressed(), None);
    let mut g = to_aws(&ProjectivePoint::GENERATOR);
    assert!(g.add_assign(&o));
    assert_eq!(from_aws(&g), ProjectivePoint::GENERATOR);
    let mut o2 = EcPoint::identity();
    assert!(o2.add_assign(&g));
    assert_eq!(from_aws(&o2), ProjectivePoint::GENERATOR);
    let mut o3 = EcPoint::identity();
    assert!(o3.double());
    assert!(o3.is_identity());
    assert!(o3.negate());
    assert!(o3.is_identity());
    assert_eq!(o, EcPoint::identity());
}

#[test]
fn decoding_rejects_what_is_not_a_curve_point() {
    let g = ProjectivePoint::GENERATOR.to_affine().to_sec1_point(false);
    let good: [u8; 65] = g.as_bytes().try_into().unwrap();
    assert!(EcPoint::from_uncompressed(&good).is_some());
    // y + 1: off the curve.
    let mut off = good;
    off[64] ^= 1;
    assert!(EcPoint::from_uncompressed(&off).is_none());
    // Any tag but 04.
    for tag in [0x00u8, 0x02, 0x03, 0x05, 0x06, 0x07] {
        let mut t = good;
        t[0] = tag;
        assert!(EcPoint::from_uncompressed(&t).is_none(), "tag {tag:#x}");
    }
    // The all-zero body (no point has x = y = 0 on P-256).
    let mut zero = [0u8; 65];
    zero[0] = 0x04;
    assert!(EcPoint::from_uncompressed(&zero).is_none());
    // x = p (unreduced) with G's y.
    let p_bytes = hex_array("ffffffff00000001000000000000000000000000ffffffffffffffffffffffff");
    let mut unreduced = good;
    unreduced[1..33].copy_from_slice(&p_bytes);
    assert!(EcPoint::from_uncompressed(&unreduced).is_none());
    // x + p for G's x would overflow 256 bits, so check y + p: y_G + p < 2^256.
    let y = &good[33..65];
    let mut y_plus_p = [0u8; 32];
    let mut carry = 0u16;
    for i in (0..32).rev() {
        let s = u16::from(y[i]) + u16::from(p_bytes[i]) + carry;
        y_plus_p[i] = (s & 0xff) as u8;
        carry = s >> 8;
    }
    if carry == 0 {
        let mut t = good;
        t[33..65].copy_from_slice(&y_plus_p);
        assert!(EcPoint::from_uncompressed(&t).is_none());
    }
}

#[test]
fn unreduced_scalars_are_taken_mod_q() {
    // aws-lc reduces a scalar >= q; the group layer never passes one, but the behaviour
    // is defined: q·G = O and (q+1)·G = G.
    let q = hex_array("ffffffff00000000ffffffffffffffffbce6faada7179e84f3b9cac2fc632551");
    assert!(EcPoint::mul_base(&q).unwrap().is_identity());
    let mut q1 = q;
    q1[31] += 1;
    assert_eq!(
        from_aws(&EcPoint::mul_base(&q1).unwrap()),
        ProjectivePoint::GENERATOR
    );
}

#[test]
fn points_move_between_threads() {
    let g = to_aws(&ProjectivePoint::GENERATOR);
    let twice = std::thread::spawn(move || {
        let mut t = g;
        assert!(t.double());
        t
    })
    .join()
    .unwrap();
    assert_eq!(from_aws(&twice), ProjectivePoint::GENERATOR.double());
}

fn hex_array(s: &str) -> [u8; 32] {
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).unwrap();
    }
    out
}
