//! Key lifecycle in the background (DESIGN.md §4.3): finishes renewals that were
//! decided but not activated on every node (a coordinator that died midway, a node that
//! was unreachable at activation), and refreshes keys on a schedule when
//! `--refresh-interval-secs` is set.

use std::sync::Arc;
use std::time::Duration;

use crate::cluster::Cluster;
use crate::election::{Election, Job};

/// How often a pending activation is retried.
const RETRY_PENDING: Duration = Duration::from_secs(2);

/// The longest pause between schedule checks.
const CHECK_AT_MOST: Duration = Duration::from_secs(60);

/// How often every node is asked how it is.
const HEARTBEAT: Duration = Duration::from_secs(1);

/// Runs [`Cluster::heartbeat`] forever.
pub async fn heartbeat_forever(cluster: Arc<Cluster>) {
    loop {
        cluster.heartbeat().await;
        tokio::time::sleep(HEARTBEAT).await;
    }
}

/// Runs forever while this coordinator leads the `key-lifecycle` job
/// ([`Job::Lifecycle`]): pending activations first, then due refreshes.
pub async fn run_forever(
    cluster: Arc<Cluster>,
    refresh_every: Option<Duration>,
    election: Election,
) {
    let tick = refresh_every.map_or(CHECK_AT_MOST, |d| {
        (d / 4).clamp(Duration::from_secs(1), CHECK_AT_MOST)
    });
    loop {
        if !election.is_leader(Job::Lifecycle) {
            if let Err(e) = cluster.forget_finished_renewals() {
                tracing::warn!(error = %e, "cannot read pending key activations");
            }
            tokio::time::sleep(RETRY_PENDING).await;
            continue;
        }
        let left = match cluster.resume_activations().await {
            Ok(left) => left,
            Err(e) => {
                tracing::error!(error = %e, "cannot resume pending key activations");
                1
            }
        };
        if left == 0
            && let Some(every) = refresh_every
        {
            refresh_due(&cluster, every).await;
        }
        tokio::time::sleep(if left > 0 { RETRY_PENDING } else { tick }).await;
    }
}

/// Refreshes every key whose shares are older than `every`.
async fn refresh_due(cluster: &Cluster, every: Duration) {
    let now = crate::cluster::unix_now();
    let versions = match cluster.current_versions() {
        Ok(v) => v,
        Err(e) => {
            tracing::error!(error = %e, "cannot list keys for scheduled refresh");
            return;
        }
    };
    let every = i64::try_from(every.as_secs()).unwrap_or(i64::MAX);
    for v in versions {
        let since = cluster
            .renewed_at(&v.public.key_id)
            .ok()
            .flatten()
            .unwrap_or(v.created_at);
        if now.saturating_sub(since) < every {
            continue;
        }
        match cluster.refresh_key(&v.name).await {
            Ok(k) => {
                tracing::info!(
                    key = v.name,
                    epoch = k.public.epoch,
                    "scheduled refresh done"
                );
            }
            Err(e) => {
                tracing::warn!(key = v.name, error = %e, "scheduled refresh failed; retried at the next check");
            }
        }
    }
}
