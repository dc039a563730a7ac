//! Test support: a seeded RNG and an in-process simulation of a whole cluster.
//!
//! The simulation drives the same round functions that fragment nodes and the
//! coordinator call, and round-trips every message through its wire encoding
//! ([`crate::wire::Wire`]) between parties, like round-based's `Simulation`.

use rand::SeedableRng;
use rand::rngs::StdRng;
use rand_core::TryRng;

/// A seeded RNG for tests. The seed is `QUORATE_TEST_SEED` if set, otherwise fresh; it
/// is printed (with `label`) so that a failing run can be replayed.
pub fn test_rng(label: &str) -> StdRng {
    let seed = match std::env::var("QUORATE_TEST_SEED") {
        Ok(s) => s.parse().unwrap_or(0),
        Err(_) => {
            let mut b = [0u8; 8];
            rand::rngs::SysRng
                .try_fill_bytes(&mut b)
                .map(|()| u64::from_le_bytes(b))
                .unwrap_or(0)
        }
    };
    eprintln!("[{label}] QUORATE_TEST_SEED={seed}");
    StdRng::seed_from_u64(seed)
}
