//! Threshold-signed checkpoints of the audit chain head.
//!
//! Every interval, if events were appended since the last checkpoint, the coordinator
//! has the cluster sign `{iss, seq, head, iat}` as a compact JWS (ES256, typ
//! [`record::CHECKPOINT_TYP`]) with the audit key — a plain signing key without token
//! rules, created by DKG on first use — and appends the signature as a `checkpoint`
//! event. The audit key's public JWK is in the cluster's JWKS, so `quorate audit verify
//! --jwks` checks checkpoints offline with any JOSE library.

use std::sync::Arc;
use std::time::Duration;

use super::AuditLog;
use super::record::{self, Checkpoint, CheckpointClaims, Fields, Outcome};
use crate::cluster::{Cluster, CoordError, KeyProfile};
use crate::election::{Election, Job};

/// Signs the current head if no checkpoint covers it yet. Returns the checkpoint event,
/// or `None` when there was nothing new.
pub async fn checkpoint(
    log: &Arc<AuditLog>,
    cluster: &Cluster,
    key_name: &str,
    issuer: &str,
) -> Result<Option<record::Event>, String> {
    let Some((seq, head, covered)) = log.checkpoint_head()? else {
        return Ok(None);
    };
    // The newest event is itself the last checkpoint: nothing new to sign.
    if covered.is_some_and(|c| c.saturating_add(1) >= seq) {
        return Ok(None);
    }
    let key = match cluster.current_signing_key(key_name) {
        Ok(k) => {
            // A store from before key profiles holds the audit key as a raw key.
            cluster
                .narrow_to_checkpoint(key_name)
                .await
                .map_err(|e| format!("audit key {key_name}: {e}"))?;
            k
        }
        Err(CoordError::NotFound(_)) => {
            let k = cluster
                .create_key(key_name, KeyProfile::Checkpoint)
                .await
                .map_err(|e| format!("creating audit key {key_name}: {e}"))?;
            log.append(
                Outcome::Allow,
                Fields {
                    kind: "key".into(),
                    action: "create_key".into(),
                    caller: Some("coordinator".into()),
                    reason: Some("audit checkpoint key created".into()),
                    key: Some(key_name.to_owned()),
                    nodes: cluster.all_nodes(),
                    ..Fields::default()
                },
            )
            .await
            .map_err(|e| e.to_string())?;
            k
        }
        Err(e) => return Err(format!("audit key {key_name}: {e}")),
    };
    let claims = CheckpointClaims {
        iss: issuer.to_owned(),
        seq,
        head: head.clone(),
        iat: crate::identity::now(),
    };
    let kid = key.key_id.to_string();
    let input = record::checkpoint_signing_input(&kid, &claims)?;
    let (sig, _, nodes) = cluster
        .sign_jws(key_name, key.key_id, input.as_bytes(), None)
        .await
        .map_err(|e| format!("signing the audit checkpoint: {e}"))?;
    let jws = format!(
        "{input}.{}",
        base64::Engine::encode(
            &base64::engine::general_purpose::URL_SAFE_NO_PAD,
            sig.to_raw()
        )
    );
    let ev = log
        .append(
            Outcome::Signed,
            Fields {
                kind: "checkpoint".into(),
                action: "checkpoint".into(),
                caller: Some("coordinator".into()),
                // Which coordinator of a shared store signed it (one at a time does:
                // the election's `audit-checkpoint` job).
                reason: (!cluster.instance().is_empty())
                    .then(|| format!("coordinator instance {}", cluster.instance())),
                key: Some(key_name.to_owned()),
                nodes,
                checkpoint: Some(Checkpoint { seq, head, jws }),
                ..Fields::default()
            },
        )
        .await
        .map_err(|e| e.to_string())?;
    Ok(Some(ev))
}

/// Checkpoints every `every` until the process ends, while this coordinator leads the
/// `audit-checkpoint` job ([`Job::Checkpoint`]); failures are logged and retried.
pub fn spawn(
    log: Arc<AuditLog>,
    cluster: Arc<Cluster>,
    key_name: String,
    issuer: String,
    every: Duration,
    election: Election,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tick.tick().await;
            if !election.is_leader(Job::Checkpoint) {
                continue;
            }
            match checkpoint(&log, &cluster, &key_name, &issuer).await {
                Ok(Some(ev)) => tracing::debug!(seq = ev.seq, "audit checkpoint signed"),
                Ok(None) => {}
                Err(e) => tracing::warn!(error = %e, "audit checkpoint failed; will retry"),
            }
        }
    })
}
