//! Background presignature pools (DESIGN.md §8): one pool per (signing key, signing
//! set). A pool that falls below its low watermark is refilled until it reaches the high
//! watermark (hysteresis: refilling does not stop at the low mark). Up to
//! [`Watermarks::parallel`] presigning sessions run at once — on different pools, or
//! pipelined on the same one — so that the nodes' and the coordinator's rounds overlap
//! and every core works; sessions in flight count towards a pool's depth, so a pool is
//! never overfilled. A set whose nodes are down is retried later.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use quorate_crypto::keys::KeyId;
use quorate_crypto::params::PartySet;
use tokio::task::JoinSet;

use crate::cluster::Cluster;

/// Pool sizing.
#[derive(Clone, Copy, Debug)]
pub struct Watermarks {
    /// Refill when a pool holds fewer than this many.
    pub low: usize,
    /// Refill up to this many.
    pub high: usize,
    /// Most presignatures per batch.
    pub batch: u32,
    /// Most presigning sessions at once.
    pub parallel: usize,
}

/// How long the filler waits when nothing needs doing (a signature taking from a pool
/// wakes it at once).
const IDLE: Duration = Duration::from_millis(200);

/// How long a failing pool rests before it is tried again.
const RETRY_AFTER: Duration = Duration::from_secs(1);

type PoolId = (KeyId, PartySet);

/// Runs forever, keeping pools between the watermarks.
pub async fn fill_forever(cluster: Arc<Cluster>, marks: Watermarks) {
    let parallel = marks.parallel.max(1);
    // Presignatures being made per pool, and pools being refilled (below `high` after
    // having fallen below `low`).
    let mut in_flight: HashMap<PoolId, usize> = HashMap::new();
    let mut refilling: HashSet<PoolId> = HashSet::new();
    let mut resting: HashMap<PoolId, tokio::time::Instant> = HashMap::new();
    let mut sessions: JoinSet<(PoolId, usize, bool)> = JoinSet::new();
    loop {
        let needs = match cluster.pool_needs() {
            Ok(needs) => needs,
            Err(e) => {
                tracing::error!(error = %e, "pool check failed");
                Vec::new()
            }
        };
        let now = tokio::time::Instant::now();
        resting.retain(|_, until| *until > now);
        // Deepest need first: the emptiest pool gets the next session.
        let mut candidates: Vec<_> = needs
            .into_iter()
            .filter_map(|(key, mset, sset, depth)| {
                let id = (key.key_id, sset.clone());
                let flying = in_flight.get(&id).copied().unwrap_or(0);
                if depth < marks.low {
                    refilling.insert(id.clone());
                }
                if depth + flying >= marks.high {
                    refilling.remove(&id);
                }
                let wanted = refilling.contains(&id)
                    && !resting.contains_key(&id)
                    && mset.members().iter().all(|p| cluster.usable(*p));
                wanted.then_some((depth + flying, key, mset, sset, id))
            })
            .collect();
        candidates.sort_by_key(|c| c.0);
        for (have, key, mset, sset, id) in candidates {
            if sessions.len() >= parallel {
                break;
            }
            let want = marks.high.saturating_sub(have).max(1);
            let batch = u32::try_from(want).unwrap_or(u32::MAX).min(marks.batch);
            *in_flight.entry(id.clone()).or_default() += batch as usize;
            let c = cluster.clone();
            sessions.spawn(async move {
                match c.presign(&key, &mset, &sset, batch).await {
                    Ok(n) => {
                        tracing::debug!(key = %key.key_id, set = %sset, made = n, "presignatures pooled");
                        (id, batch as usize, true)
                    }
                    Err(e) => {
                        tracing::warn!(key = %key.key_id, set = %sset, error = %e, "presigning failed; will retry");
                        (id, batch as usize, false)
                    }
                }
            });
        }
        // Wait for a session to finish, a pool to be drawn from, or the idle tick.
        tokio::select! {
            Some(done) = sessions.join_next(), if !sessions.is_empty() => {
                if let Ok((id, batch, ok)) = done {
                    if let Some(f) = in_flight.get_mut(&id) {
                        *f = f.saturating_sub(batch);
                    }
                    if !ok {
                        resting.insert(id, tokio::time::Instant::now() + RETRY_AFTER);
                    }
                }
            }
            () = cluster.pool_drawn() => {}
            () = tokio::time::sleep(IDLE) => {}
        }
    }
}
