//! Counts of elliptic-curve scalar multiplications, for the benchmark figures.
//!
//! Protocol cost is dominated by scalar multiplications, so the benches report how many
//! each protocol step performs. Counting is compiled in only with the `op-count` feature;
//! without it every function here is a no-op and [`snapshot`] returns zeros.

#[cfg(feature = "op-count")]
use core::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Scalar-multiplication counts since the last [`reset`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OpCounts {
    /// Variable-base multiplications `k·P` (constant time).
    pub var_base: u64,
    /// Fixed-base multiplications `k·G` (precomputed table).
    pub fixed_base: u64,
    /// Multi-scalar multiplications performed.
    pub msm_calls: u64,
    /// Total terms across all multi-scalar multiplications.
    pub msm_terms: u64,
}

#[cfg(feature = "op-count")]
static VAR_BASE: AtomicU64 = AtomicU64::new(0);
#[cfg(feature = "op-count")]
static FIXED_BASE: AtomicU64 = AtomicU64::new(0);
#[cfg(feature = "op-count")]
static MSM_CALLS: AtomicU64 = AtomicU64::new(0);
#[cfg(feature = "op-count")]
static MSM_TERMS: AtomicU64 = AtomicU64::new(0);

#[inline]
pub(crate) fn count_var_base() {
    #[cfg(feature = "op-count")]
    VAR_BASE.fetch_add(1, Relaxed);
}

#[inline]
pub(crate) fn count_fixed_base() {
    #[cfg(feature = "op-count")]
    FIXED_BASE.fetch_add(1, Relaxed);
}

#[inline]
pub(crate) fn count_msm(_terms: usize) {
    #[cfg(feature = "op-count")]
    {
        MSM_CALLS.fetch_add(1, Relaxed);
        MSM_TERMS.fetch_add(_terms as u64, Relaxed);
    }
}

/// Resets all counters to zero.
pub fn reset() {
    #[cfg(feature = "op-count")]
    for c in [&VAR_BASE, &FIXED_BASE, &MSM_CALLS, &MSM_TERMS] {
        c.store(0, Relaxed);
    }
}

/// The counts since the last [`reset`] (zeros without the `op-count` feature).
pub fn snapshot() -> OpCounts {
    #[cfg(feature = "op-count")]
    {
        OpCounts {
            var_base: VAR_BASE.load(Relaxed),
            fixed_base: FIXED_BASE.load(Relaxed),
            msm_calls: MSM_CALLS.load(Relaxed),
            msm_terms: MSM_TERMS.load(Relaxed),
        }
    }
    #[cfg(not(feature = "op-count"))]
    OpCounts::default()
}
