//! Parties, sets and threshold parameters (DESIGN.md §3).

use core::num::NonZeroU16;

use crate::error::{Error, Result};
use crate::group::{self, Scalar};

/// The largest supported cluster.
pub const MAX_PARTIES: u16 = 255;

/// A fragment node's index `i` in `1..=n`; polynomials are evaluated at `z = i`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PartyIndex(NonZeroU16);

impl PartyIndex {
    /// A party index; `None` for 0 or above [`MAX_PARTIES`].
    pub fn new(i: u16) -> Option<PartyIndex> {
        if i > MAX_PARTIES {
            return None;
        }
        NonZeroU16::new(i).map(PartyIndex)
    }

    /// The index as a number.
    pub fn get(self) -> u16 {
        self.0.get()
    }

    /// The index as a scalar (the evaluation point).
    pub fn scalar(self) -> Scalar {
        Scalar::from(u64::from(self.0.get()))
    }
}

impl core::fmt::Display for PartyIndex {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// The parties that hold a key, as a bit set over indices `1..=MAX_PARTIES` (so that
/// [`ThresholdParams`] stays `Copy`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct Holders([u64; 4]);

impl Holders {
    fn first(n: u16) -> Self {
        let mut h = Holders([0; 4]);
        for i in (1..=n).filter_map(PartyIndex::new) {
            h.insert(i);
        }
        h
    }

    fn insert(&mut self, p: PartyIndex) {
        let i = usize::from(p.get());
        if let Some(w) = self.0.get_mut(i / 64) {
            *w |= 1u64 << (i % 64);
        }
    }

    fn contains(&self, p: PartyIndex) -> bool {
        let i = usize::from(p.get());
        self.0
            .get(i / 64)
            .is_some_and(|w| w & (1u64 << (i % 64)) != 0)
    }

    fn len(&self) -> u16 {
        // At most 256 bits are set.
        u16::try_from(self.0.iter().map(|w| w.count_ones()).sum::<u32>()).unwrap_or(u16::MAX)
    }

    fn members(&self) -> Vec<PartyIndex> {
        (1..=MAX_PARTIES)
            .filter_map(PartyIndex::new)
            .filter(|p| self.contains(*p))
            .collect()
    }
}

/// `(n, t)` over a holder set: the `n` nodes that hold a key (indices `1..=n` unless the
/// cluster was resharded onto others, e.g. `{1, 3, 4}` after node 2 was replaced by node
/// 4), any `t` of which learn nothing; `n >= 2t + 1`, `t >= 1`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ThresholdParams {
    holders: Holders,
    t: u16,
}

impl ThresholdParams {
    /// Validated parameters over the holders `1..=n`.
    pub fn new(n: u16, t: u16) -> Result<Self> {
        if n > MAX_PARTIES {
            return Err(Error::input(format!(
                "at most {MAX_PARTIES} nodes are supported, got n = {n}"
            )));
        }
        Self::checked(Holders::first(n), t)
    }

    /// Validated parameters over any holder set (DESIGN.md §4.3 resharing to a new node
    /// set). Errors as [`Self::new`].
    pub fn with_holders(holders: &PartySet, t: u16) -> Result<Self> {
        let mut h = Holders([0; 4]);
        for p in holders.members() {
            h.insert(*p);
        }
        Self::checked(h, t)
    }

    fn checked(holders: Holders, t: u16) -> Result<Self> {
        let n = holders.len();
        if t == 0 {
            return Err(Error::input("threshold t must be at least 1"));
        }
        if u32::from(n) < 2 * u32::from(t) + 1 {
            return Err(Error::input(format!(
                "n = {n} nodes cannot hold threshold t = {t}: need n >= 2t + 1 = {}",
                2 * u32::from(t) + 1
            )));
        }
        Ok(ThresholdParams { holders, t })
    }

    /// Number of nodes holding the key.
    pub fn n(&self) -> u16 {
        self.holders.len()
    }

    /// Whether the holders are `1..=n` (the parameters of a cluster never resharded onto
    /// other indices; encodings keep their original short form for these).
    pub fn is_contiguous(&self) -> bool {
        self.holders == Holders::first(self.n())
    }

    /// Corruption threshold (polynomial degree).
    pub fn t(&self) -> u16 {
        self.t
    }

    /// Length of every commitment vector: `t + 1`.
    pub fn commitment_len(&self) -> usize {
        usize::from(self.t) + 1
    }

    /// All holders, in increasing order.
    pub fn all_parties(&self) -> PartySet {
        PartySet(self.holders.members())
    }

    /// Whether `p` holds the key.
    pub fn holds(&self, p: PartyIndex) -> bool {
        self.holders.contains(p)
    }

    /// Checks that `set` only names holders.
    pub fn check_members(&self, set: &PartySet) -> Result<()> {
        match set.0.iter().find(|p| !self.holders.contains(**p)) {
            Some(p) => Err(Error::input(format!(
                "party {p} is not one of the key's holders {}",
                self.all_parties()
            ))),
            None => Ok(()),
        }
    }

    /// Validates a signing set: `t + 1` members of this cluster.
    pub fn signing_set(&self, set: PartySet) -> Result<PartySet> {
        self.check_members(&set)?;
        if set.len() != usize::from(self.t) + 1 {
            return Err(Error::input(format!(
                "a signing set needs exactly t + 1 = {} members, got {}",
                self.t + 1,
                set.len()
            )));
        }
        Ok(set)
    }

    /// Validates a multiplication set: `2t + 1` members of this cluster.
    pub fn multiplication_set(&self, set: PartySet) -> Result<PartySet> {
        self.check_members(&set)?;
        if set.len() != 2 * usize::from(self.t) + 1 {
            return Err(Error::input(format!(
                "a multiplication set needs exactly 2t + 1 = {} members, got {}",
                2 * self.t + 1,
                set.len()
            )));
        }
        Ok(set)
    }

    /// Validates a quorum for threshold DH: at least `t + 1` members of this cluster.
    pub fn quorum(&self, set: PartySet) -> Result<PartySet> {
        self.check_members(&set)?;
        if set.len() <= usize::from(self.t) {
            return Err(Error::input(format!(
                "a quorum needs at least t + 1 = {} members, got {}",
                self.t + 1,
                set.len()
            )));
        }
        Ok(set)
    }
}

/// A non-empty, sorted set of distinct parties.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PartySet(Vec<PartyIndex>);

impl PartySet {
    /// A set from any order; rejects duplicates and emptiness.
    pub fn new(mut parties: Vec<PartyIndex>) -> Result<Self> {
        if parties.is_empty() {
            return Err(Error::input("party set is empty"));
        }
        parties.sort_unstable();
        let len = parties.len();
        parties.dedup();
        if parties.len() != len {
            return Err(Error::input("party set names a party twice"));
        }
        Ok(PartySet(parties))
    }

    /// A set from raw indices.
    pub fn from_indices(indices: &[u16]) -> Result<Self> {
        let parties = indices
            .iter()
            .map(|&i| {
                PartyIndex::new(i).ok_or_else(|| {
                    Error::input(format!("party index {i} is outside 1..={}", MAX_PARTIES))
                })
            })
            .collect::<Result<Vec<_>>>()?;
        PartySet::new(parties)
    }

    /// Members in increasing order.
    pub fn members(&self) -> &[PartyIndex] {
        &self.0
    }

    /// Number of members.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Always false: a set is never empty.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether `p` is a member.
    pub fn contains(&self, p: PartyIndex) -> bool {
        self.0.binary_search(&p).is_ok()
    }

    /// Whether every member of `self` is in `other`.
    pub fn is_subset_of(&self, other: &PartySet) -> bool {
        self.0.iter().all(|p| other.contains(*p))
    }

    /// Lagrange coefficient at zero for member `i`:
    /// `λ_i = Π_{j∈S, j≠i} j / (j − i) mod q`. Errors if `i` is not a member.
    pub fn lagrange(&self, i: PartyIndex) -> Result<Scalar> {
        if !self.contains(i) {
            return Err(Error::input(format!("party {i} is not in the set")));
        }
        let (num, den) = self.lagrange_fraction(i);
        // Members are distinct, so every factor j − i is non-zero and den is invertible.
        let inv = group::invert(&den).ok_or(Error::Bug("lagrange denominator is zero"))?;
        Ok(num * inv)
    }

    /// `(Π_{j≠i} j, Π_{j≠i} (j − i))`, the numerator and denominator of `λ_i`.
    fn lagrange_fraction(&self, i: PartyIndex) -> (Scalar, Scalar) {
        let xi = i.scalar();
        let mut num = Scalar::ONE;
        let mut den = Scalar::ONE;
        for &j in self.0.iter().filter(|&&j| j != i) {
            let xj = j.scalar();
            num *= xj;
            den *= xj - xi;
        }
        (num, den)
    }

    /// All Lagrange coefficients, in member order: the values of [`Self::lagrange`], with
    /// one inversion for the whole set instead of one per member (Montgomery's trick),
    /// and a variable-time one, since party indices are public. (The coordinator's
    /// `sign::combine` calls this on every signature.)
    pub fn lagrange_all(&self) -> Result<Vec<(PartyIndex, Scalar)>> {
        // λ_i = num_i / den_i with num_i = Π_{j≠i} j and den_i = Π_{j≠i} (j − i).
        let mut fractions = Vec::with_capacity(self.0.len());
        for &i in &self.0 {
            let (num, den) = self.lagrange_fraction(i);
            fractions.push((i, num, den));
        }
        // prefix_k = den_0 ⋯ den_{k−1}; total = den_0 ⋯ den_{m−1}.
        let mut prefix = Vec::with_capacity(fractions.len());
        let mut total = Scalar::ONE;
        for (_, _, den) in &fractions {
            prefix.push(total);
            total *= den;
        }
        // Members are distinct, so every factor j − i is non-zero and total is invertible.
        let mut inv =
            group::invert_public(&total).ok_or(Error::Bug("lagrange denominator is zero"))?;
        // Walking down, inv = 1 / (den_0 ⋯ den_k), so 1 / den_k = inv · prefix_k.
        let mut out = Vec::with_capacity(fractions.len());
        for ((i, num, den), pre) in fractions.iter().zip(&prefix).rev() {
            out.push((*i, *num * inv * pre));
            inv *= den;
        }
        out.reverse();
        Ok(out)
    }
}

impl core::fmt::Display for PartySet {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "{{")?;
        for (k, p) in self.0.iter().enumerate() {
            if k > 0 {
                write!(f, ",")?;
            }
            write!(f, "{p}")?;
        }
        write!(f, "}}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn params_validation() {
        assert!(ThresholdParams::new(3, 1).is_ok());
        assert!(ThresholdParams::new(2, 1).is_err());
        assert!(ThresholdParams::new(5, 0).is_err());
        assert!(ThresholdParams::new(7, 3).is_ok());
        assert!(ThresholdParams::new(6, 3).is_err());
        assert!(ThresholdParams::new(300, 3).is_err());
    }

    #[test]
    fn holder_sets() {
        let p =
            ThresholdParams::with_holders(&PartySet::from_indices(&[1, 3, 4]).unwrap(), 1).unwrap();
        assert_eq!(p.n(), 3);
        assert!(!p.is_contiguous());
        assert_eq!(p.all_parties(), PartySet::from_indices(&[1, 3, 4]).unwrap());
        assert!(
            p.signing_set(PartySet::from_indices(&[3, 4]).unwrap())
                .is_ok()
        );
        let e = p
            .signing_set(PartySet::from_indices(&[1, 2]).unwrap())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("party 2 is not one of the key's holders {1,3,4}"),
            "{e}"
        );
        assert!(
            ThresholdParams::with_holders(&PartySet::from_indices(&[1, 255]).unwrap(), 1).is_err()
        );
        let wide =
            ThresholdParams::with_holders(&PartySet::from_indices(&[64, 128, 255]).unwrap(), 1)
                .unwrap();
        assert_eq!(
            wide.all_parties().members().last().map(|p| p.get()),
            Some(255)
        );
        let c =
            ThresholdParams::with_holders(&PartySet::from_indices(&[1, 2, 3]).unwrap(), 1).unwrap();
        assert!(c.is_contiguous());
        assert_eq!(c, ThresholdParams::new(3, 1).unwrap());
    }

    #[test]
    fn set_validation() {
        assert!(PartySet::from_indices(&[]).is_err());
        assert!(PartySet::from_indices(&[1, 1]).is_err());
        assert!(PartySet::from_indices(&[0, 1]).is_err());
        let s = PartySet::from_indices(&[3, 1]).unwrap();
        assert_eq!(s.members()[0].get(), 1);
        let p = ThresholdParams::new(3, 1).unwrap();
        assert!(p.signing_set(s.clone()).is_ok());
        assert!(
            p.signing_set(PartySet::from_indices(&[1, 2, 3]).unwrap())
                .is_err()
        );
        assert!(
            p.signing_set(PartySet::from_indices(&[1, 4]).unwrap())
                .is_err()
        );
    }

    #[test]
    fn lagrange_interpolates_a_line() {
        // f(z) = 5 + 3z; shares at 2 and 5 interpolate f(0) = 5.
        let s = PartySet::from_indices(&[2, 5]).unwrap();
        let f = |z: u64| Scalar::from(5u64) + Scalar::from(3u64) * Scalar::from(z);
        let sum: Scalar = s
            .lagrange_all()
            .unwrap()
            .into_iter()
            .map(|(i, l)| l * f(u64::from(i.get())))
            .sum();
        assert_eq!(sum, Scalar::from(5u64));
    }

    #[test]
    fn lagrange_all_matches_lagrange() {
        let sets: [&[u16]; 6] = [
            &[7],
            &[1, 2],
            &[2, 5],
            &[1, 2, 3],
            &[3, 9, 17, 200, 255],
            &[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13],
        ];
        for set in sets {
            let s = PartySet::from_indices(set).unwrap();
            let all = s.lagrange_all().unwrap();
            assert_eq!(all.len(), s.len());
            for ((i, l), m) in all.iter().zip(s.members()) {
                assert_eq!(i, m);
                assert_eq!(*l, s.lagrange(*i).unwrap(), "set {set:?}, member {i}");
            }
            // They interpolate a constant.
            assert_eq!(all.iter().map(|(_, l)| *l).sum::<Scalar>(), Scalar::ONE);
        }
    }
}

/// A 32-byte session id binding every message of one protocol run (chosen by the
/// coordinator, fresh per run).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SessionId(pub [u8; 32]);

impl SessionId {
    /// A fresh random session id.
    pub fn random(rng: &mut (impl rand_core::CryptoRng + ?Sized)) -> Self {
        let mut b = [0u8; 32];
        rng.fill_bytes(&mut b);
        SessionId(b)
    }

    /// A sub-session id derived from this one and a label (e.g. one presignature of a
    /// batch).
    pub fn derive(&self, label: &str, index: u64) -> SessionId {
        let mut t = crate::hash::Transcript::new("session-derive");
        t.append("sid", &self.0)
            .append("label", label.as_bytes())
            .u64("index", index);
        SessionId(t.digest())
    }
}

/// Picks exactly one message from each member of `expected`, in member order.
///
/// A second message from a member blames it ([`crate::Fault::Duplicate`]); a message from
/// outside the set blames its sender ([`crate::Fault::UnexpectedSender`]); members
/// without a message are blamed together ([`crate::Fault::Missing`]).
pub fn one_from_each<'a, T>(
    msgs: &'a [T],
    expected: &PartySet,
    sender: impl Fn(&T) -> PartyIndex,
) -> Result<Vec<&'a T>> {
    use crate::error::Fault;
    let mut slots: Vec<Option<&'a T>> = vec![None; expected.len()];
    for m in msgs {
        let s = sender(m);
        let pos = expected
            .members()
            .binary_search(&s)
            .map_err(|_| Error::blame_one(s, Fault::UnexpectedSender))?;
        let slot = slots
            .get_mut(pos)
            .ok_or(Error::Bug("slot index out of range"))?;
        if slot.replace(m).is_some() {
            return Err(Error::blame_one(s, Fault::Duplicate));
        }
    }
    let missing: Vec<PartyIndex> = expected
        .members()
        .iter()
        .zip(&slots)
        .filter(|(_, s)| s.is_none())
        .map(|(p, _)| *p)
        .collect();
    if !missing.is_empty() {
        return Err(Error::blame(missing, Fault::Missing));
    }
    Ok(slots.into_iter().flatten().collect())
}
