//! P-256 point arithmetic from aws-lc, for `quorate-crypto`'s group layer (DESIGN.md §2,
//! `crypto/src/group.rs`).
//!
//! aws-lc is the library the TLS stack already links (through aws-lc-rs); on x86-64 and
//! AArch64 its P-256 is the assembly `nistz256` implementation, several times faster than
//! the pure-Rust `p256` crate for every group operation (BENCHMARKS.md, "P-256
//! backends"). This crate is the only one under `crypto/` with unsafe code: one foreign
//! call per `unsafe` block, each with the argument for why it is sound. What it offers is
//! deliberately small — a point type and the five operations the group layer builds its
//! multi-scalar multiplication from:
//!
//! | operation | aws-lc function | timing |
//! | --- | --- | --- |
//! | [`EcPoint::from_uncompressed`] | `EC_POINT_oct2point` (checks the curve equation) | public input |
//! | [`EcPoint::to_uncompressed`] | `EC_POINT_point2oct` | variable time |
//! | [`EcPoint::add_assign`], [`EcPoint::double`], [`EcPoint::negate`] | `EC_POINT_add`, `EC_POINT_dbl`, `EC_POINT_invert` | variable time (public points) |
//! | [`EcPoint::mul_base`] | `EC_POINT_mul` with `g_scalar` (`ec_point_mul_scalar_base`) | constant time |
//! | [`EcPoint::mul`] | `EC_POINT_mul` with `p_scalar` (`ec_point_mul_scalar`) | constant time |
//!
//! Scalars cross the boundary as 32-byte big-endian arrays, exactly the encoding of a
//! reduced scalar; aws-lc reads them through a fixed-width `BIGNUM`
//! (`BN_bin2bn` sizes it from the length, not the value), which is freed with
//! `BN_clear_free`. Points are freed with `EC_POINT_clear_free`, since a product with a
//! secret scalar can itself be secret (a Diffie–Hellman value).
//!
//! Every operation that aws-lc can refuse returns an [`Option`]; for valid inputs none
//! does, and callers keep the pure-Rust computation as the reference (the differential
//! tests in this crate and in `quorate-crypto` compare every operation).

use core::ptr::{self, NonNull};

use aws_lc_sys as ffi;

/// Length of an uncompressed SEC1 point (`04 || x || y`).
pub const UNCOMPRESSED_LEN: usize = 65;

/// The static P-256 group.
fn group() -> *const ffi::EC_GROUP {
    // SAFETY: `EC_group_p256` takes no arguments and returns a pointer to a statically
    // initialised group that lives for the whole process and is never freed.
    unsafe { ffi::EC_group_p256() }
}

/// Clears aws-lc's thread-local error queue after a refused call, so that no stale error
/// is left for the next user of the library on this thread (aws-lc-rs, rustls).
fn clear_errors() {
    // SAFETY: `ERR_clear_error` only empties the calling thread's error queue.
    unsafe { ffi::ERR_clear_error() }
}

/// Aborts the process the way the standard library does when an allocation fails.
fn out_of_memory() -> ! {
    std::alloc::handle_alloc_error(std::alloc::Layout::new::<[u64; 32]>())
}

/// A point of P-256 (possibly the identity) in aws-lc's Jacobian Montgomery form, owned
/// on aws-lc's heap.
pub struct EcPoint(NonNull<ffi::EC_POINT>);

// SAFETY: an `EC_POINT` is a plain owned value (its coordinates and a pointer to the
// static, immutable P-256 group); aws-lc keeps no thread affinity or interior state in
// it, so it may move to and be dropped on another thread.
unsafe impl Send for EcPoint {}
// SAFETY: every function called with a shared `&EcPoint` only reads it (`*const
// EC_POINT` arguments), so concurrent shared access is sound.
unsafe impl Sync for EcPoint {}

impl EcPoint {
    /// The identity (point at infinity).
    pub fn identity() -> EcPoint {
        // SAFETY: `group()` is the valid static P-256 group; `EC_POINT_new` returns a new
        // point set to the identity, or NULL if allocation failed (handled below).
        let raw = unsafe { ffi::EC_POINT_new(group()) };
        match NonNull::new(raw) {
            Some(p) => EcPoint(p),
            None => out_of_memory(),
        }
    }

    /// Decodes `04 || x || y`; `None` if the coordinates are not reduced or the point is
    /// not on the curve (aws-lc checks both).
    pub fn from_uncompressed(bytes: &[u8; UNCOMPRESSED_LEN]) -> Option<EcPoint> {
        if bytes.first() != Some(&0x04) {
            return None;
        }
        let p = EcPoint::identity();
        // SAFETY: `p.0` is a valid, exclusively owned point of the P-256 group; `bytes`
        // is readable for `UNCOMPRESSED_LEN` bytes; a NULL `BN_CTX` makes aws-lc use its
        // own. aws-lc does not keep either pointer after the call.
        let ok = unsafe {
            ffi::EC_POINT_oct2point(
                group(),
                p.0.as_ptr(),
                bytes.as_ptr(),
                UNCOMPRESSED_LEN,
                ptr::null_mut(),
            )
        };
        if ok == 1 {
            Some(p)
        } else {
            clear_errors();
            None
        }
    }

    /// The uncompressed SEC1 encoding; `None` for the identity (which has none).
    pub fn to_uncompressed(&self) -> Option<[u8; UNCOMPRESSED_LEN]> {
        let mut out = [0u8; UNCOMPRESSED_LEN];
        // SAFETY: `self.0` is a valid point; `out` is writable for `UNCOMPRESSED_LEN`
        // bytes, the length passed; aws-lc writes at most that many and returns how many
        // it wrote (0 on error, e.g. for the identity).
        let written = unsafe {
            ffi::EC_POINT_point2oct(
                group(),
                self.0.as_ptr(),
                ffi::point_conversion_form_t::POINT_CONVERSION_UNCOMPRESSED,
                out.as_mut_ptr(),
                UNCOMPRESSED_LEN,
                ptr::null_mut(),
            )
        };
        if written == UNCOMPRESSED_LEN {
            Some(out)
        } else {
            clear_errors();
            None
        }
    }

    /// Whether this is the identity.
    pub fn is_identity(&self) -> bool {
        // SAFETY: `self.0` is a valid point of the P-256 group; the call only reads it.
        unsafe { ffi::EC_POINT_is_at_infinity(group(), self.0.as_ptr()) == 1 }
    }

    /// `self ← self + other`, in variable time. Complete: doubling, inverse pairs and the
    /// identity are handled (aws-lc's `nistz256` addition detects them).
    #[must_use = "false means aws-lc refused the addition"]
    pub fn add_assign(&mut self, other: &EcPoint) -> bool {
        // SAFETY: both points are valid points of the P-256 group; `self.0` is exclusively
        // borrowed and `other` is only read. aws-lc copies both inputs before it writes the
        // result, so `r` may alias `a` (and `b`, which it cannot here by borrowing rules).
        let ok = unsafe {
            ffi::EC_POINT_add(
                group(),
                self.0.as_ptr(),
                self.0.as_ptr(),
                other.0.as_ptr(),
                ptr::null_mut(),
            )
        };
        self.checked(ok)
    }

    /// `self ← 2·self`, in variable time.
    #[must_use = "false means aws-lc refused the doubling"]
    pub fn double(&mut self) -> bool {
        // SAFETY: `self.0` is a valid, exclusively borrowed point; aws-lc copies the input
        // before writing the result, so `r` may alias `a`.
        let ok = unsafe {
            ffi::EC_POINT_dbl(group(), self.0.as_ptr(), self.0.as_ptr(), ptr::null_mut())
        };
        self.checked(ok)
    }

    /// `self ← −self`.
    #[must_use = "false means aws-lc refused the negation"]
    pub fn negate(&mut self) -> bool {
        // SAFETY: `self.0` is a valid, exclusively borrowed point.
        let ok = unsafe { ffi::EC_POINT_invert(group(), self.0.as_ptr(), ptr::null_mut()) };
        self.checked(ok)
    }

    /// `k·G` for a 32-byte big-endian scalar `k`, in constant time (aws-lc's
    /// precomputed-table base-point multiplication). `k` may be secret.
    pub fn mul_base(k: &[u8; 32]) -> Option<EcPoint> {
        EcPoint::product(None, k)
    }

    /// `k·self` for a 32-byte big-endian scalar `k`, in constant time (aws-lc's fixed-window
    /// multiplication with constant-time table lookups; it checks that the result is on
    /// the curve). `k` may be secret.
    pub fn mul(&self, k: &[u8; 32]) -> Option<EcPoint> {
        EcPoint::product(Some(self), k)
    }

    /// `k·base`, or `k·G` without a base, through `EC_POINT_mul`.
    fn product(base: Option<&EcPoint>, k: &[u8; 32]) -> Option<EcPoint> {
        let r = EcPoint::identity();
        let scalar = ScalarBn::new(k)?;
        let k_ptr: *const ffi::BIGNUM = scalar.0.as_ptr();
        // `EC_POINT_mul(group, r, g_scalar, p, p_scalar, ctx)` computes
        // `g_scalar·G + p_scalar·p`; exactly one of the two terms is given here.
        let (g_scalar, p, p_scalar) = match base {
            None => (k_ptr, ptr::null(), ptr::null()),
            Some(b) => (ptr::null(), b.0.as_ptr().cast_const(), k_ptr),
        };
        // SAFETY: `r.0` is a valid, exclusively owned point, distinct from `base`, which
        // is only read; `scalar` (a valid BIGNUM) outlives the call; `p` and `p_scalar`
        // are both NULL or both valid, as aws-lc requires; a NULL `BN_CTX` makes aws-lc
        // use its own. aws-lc keeps none of the pointers.
        let ok = unsafe {
            ffi::EC_POINT_mul(
                group(),
                r.0.as_ptr(),
                g_scalar,
                p,
                p_scalar,
                ptr::null_mut(),
            )
        };
        r.if_ok(ok)
    }

    fn checked(&self, ok: core::ffi::c_int) -> bool {
        if ok == 1 {
            true
        } else {
            clear_errors();
            false
        }
    }

    fn if_ok(self, ok: core::ffi::c_int) -> Option<EcPoint> {
        if self.checked(ok) { Some(self) } else { None }
    }
}

impl Clone for EcPoint {
    fn clone(&self) -> EcPoint {
        // SAFETY: `self.0` is a valid point of the static P-256 group; `EC_POINT_dup`
        // returns a new independent copy, or NULL if allocation failed (handled below).
        let raw = unsafe { ffi::EC_POINT_dup(self.0.as_ptr(), group()) };
        match NonNull::new(raw) {
            Some(p) => EcPoint(p),
            None => out_of_memory(),
        }
    }
}

impl PartialEq for EcPoint {
    fn eq(&self, other: &EcPoint) -> bool {
        // SAFETY: both are valid points of the P-256 group, only read; `EC_POINT_cmp`
        // returns 0 for equal points (in any Jacobian representation), 1 for unequal and
        // -1 on error.
        let r = unsafe {
            ffi::EC_POINT_cmp(group(), self.0.as_ptr(), other.0.as_ptr(), ptr::null_mut())
        };
        if r < 0 {
            clear_errors();
        }
        r == 0
    }
}

impl Eq for EcPoint {}

impl core::fmt::Debug for EcPoint {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        // Points are not printed: one may be a Diffie–Hellman value.
        f.write_str("EcPoint(..)")
    }
}

impl Drop for EcPoint {
    fn drop(&mut self) {
        // SAFETY: `self.0` was returned by `EC_POINT_new` or `EC_POINT_dup`, is owned by
        // this value alone and is freed exactly once, here; `EC_POINT_clear_free` also
        // zeroes the coordinates.
        unsafe { ffi::EC_POINT_clear_free(self.0.as_ptr()) }
    }
}

/// A scalar as an aws-lc `BIGNUM`, cleared and freed on drop.
struct ScalarBn(NonNull<ffi::BIGNUM>);

impl ScalarBn {
    fn new(k: &[u8; 32]) -> Option<ScalarBn> {
        // SAFETY: `k` is readable for 32 bytes; with `ret` NULL, `BN_bin2bn` allocates a
        // new BIGNUM of 4 words (sized by the length, independent of the value) and
        // returns it, or NULL if allocation failed.
        let raw = unsafe { ffi::BN_bin2bn(k.as_ptr(), k.len(), ptr::null_mut()) };
        NonNull::new(raw).map(ScalarBn)
    }
}

impl Drop for ScalarBn {
    fn drop(&mut self) {
        // SAFETY: `self.0` was returned by `BN_bin2bn`, is owned by this value alone and
        // freed exactly once; `BN_clear_free` zeroes the words before freeing them.
        unsafe { ffi::BN_clear_free(self.0.as_ptr()) }
    }
}

#[cfg(test)]
mod tests;
