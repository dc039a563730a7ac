//! Background presignature pools (DESIGN.md §8): one pool per (signing key, signing
//! set); whenever a pool falls below its low watermark, a batch is made to bring it
//! back towards the high watermark. A set whose nodes are down is retried later.

use std::sync::Arc;
use std::time::Duration;

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
}

/// Runs forever, keeping pools between the watermarks.
pub async fn fill_forever(cluster: Arc<Cluster>, marks: Watermarks) {
    loop {
        let mut worked = false;
        match cluster.pool_needs() {
            Ok(needs) => {
                for (key, mset, sset, depth) in needs {
                    if depth >= marks.low {
                        continue;
                    }
                    if !mset.members().iter().all(|p| cluster.usable(*p)) {
                        continue;
                    }
                    let want = (marks.high.saturating_sub(depth)).max(1);
                    let batch = u32::try_from(want).unwrap_or(u32::MAX).min(marks.batch);
                    match cluster.presign(&key, &mset, &sset, batch).await {
                        Ok(n) => {
                            worked = true;
                            tracing::debug!(key = %key.key_id, set = %sset, made = n, "presignatures pooled");
                        }
                        Err(e) => {
                            tracing::warn!(key = %key.key_id, set = %sset, error = %e, "presigning failed; will retry")
                        }
                    }
                }
            }
            Err(e) => tracing::error!(error = %e, "pool check failed"),
        }
        if !worked {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}
