//! Durable identity-plane state (DESIGN.md §5, §7): tasks, revoked token ids and
//! deprovisioned agents, in the coordinator's `identity.redb`. Nothing here is secret.
//!
//! Every write is committed before the call that caused it returns, so a revocation or
//! a task end holds across a coordinator restart. Records are JSON with a version field.

use std::path::Path;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

const TASKS: TableDefinition<&str, &[u8]> = TableDefinition::new("tasks");
const REVOKED_JTI: TableDefinition<&str, i64> = TableDefinition::new("revoked_jti");
const REVOKED_AGENTS: TableDefinition<&str, i64> = TableDefinition::new("revoked_agents");
const META: TableDefinition<&str, &str> = TableDefinition::new("meta");
/// The META entry holding the operator-signed policy bundle last applied.
const POLICY_BUNDLE: &str = "policy_bundle";

/// The only record version this build writes and reads.
const RECORD_VERSION: u32 = 1;

/// Identity store errors.
#[derive(Debug, thiserror::Error)]
#[error("identity store: {0}")]
pub struct IdentityStoreError(String);

impl<E: Into<redb::Error>> From<E> for IdentityStoreError {
    fn from(e: E) -> Self {
        IdentityStoreError(e.into().to_string())
    }
}

type Result<T> = core::result::Result<T, IdentityStoreError>;

/// A task: the window an agent's tokens may live in.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Task {
    /// Record version.
    pub v: u32,
    /// `task-` and 32 hex digits.
    pub id: String,
    /// The agent the task is bound to, if it was started with an attestation.
    pub agent: Option<String>,
    /// Unix seconds.
    pub created_at: i64,
    /// Unix seconds; no token for the task outlives it.
    pub expires_at: i64,
    /// Unix seconds, once ended.
    pub ended_at: Option<i64>,
    /// Free text from the operator.
    pub description: String,
}

impl Task {
    /// Whether the task is running at `now`.
    pub fn running(&self, now: i64) -> bool {
        self.ended_at.is_none() && now < self.expires_at
    }

    /// Why the task is not running at `now`, if it is not.
    pub fn why_not_running(&self, now: i64) -> Option<String> {
        if let Some(at) = self.ended_at {
            Some(format!("task {} ended at {at}", self.id))
        } else if now >= self.expires_at {
            Some(format!("task {} expired at {}", self.id, self.expires_at))
        } else {
            None
        }
    }
}

/// The identity store.
pub struct IdentityStore {
    db: Database,
}

impl IdentityStore {
    /// Opens or creates `path`.
    pub fn open(path: &Path) -> Result<Self> {
        let db = Database::create(path)?;
        let tx = db.begin_write()?;
        {
            tx.open_table(TASKS)?;
            tx.open_table(REVOKED_JTI)?;
            tx.open_table(REVOKED_AGENTS)?;
            tx.open_table(META)?;
        }
        tx.commit()?;
        Ok(IdentityStore { db })
    }

    /// Durably records the operator-signed policy bundle (compact JWS) just applied,
    /// which the coordinator decides under again after a restart.
    pub fn put_policy_bundle(&self, jws: &str) -> Result<()> {
        let tx = self.db.begin_write()?;
        {
            let mut t = tx.open_table(META)?;
            t.insert(POLICY_BUNDLE, jws)?;
        }
        tx.commit()?;
        Ok(())
    }

    /// The policy bundle last applied, if any.
    pub fn policy_bundle(&self) -> Result<Option<String>> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(META)?;
        Ok(t.get(POLICY_BUNDLE)?.map(|v| v.value().to_owned()))
    }

    /// Records a new task (durable before return).
    pub fn put_task(&self, task: &Task) -> Result<()> {
        let bytes = serde_json::to_vec(task).map_err(|e| IdentityStoreError(e.to_string()))?;
        let tx = self.db.begin_write()?;
        {
            let mut t = tx.open_table(TASKS)?;
            t.insert(task.id.as_str(), bytes.as_slice())?;
        }
        tx.commit()?;
        Ok(())
    }

    /// A task by id.
    pub fn task(&self, id: &str) -> Result<Option<Task>> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(TASKS)?;
        match t.get(id)? {
            None => Ok(None),
            Some(v) => decode_task(id, v.value()).map(Some),
        }
    }

    /// Ends a task at `now` (idempotent: an ended task keeps its first end time).
    /// Returns the task, or `None` if there is no such task.
    pub fn end_task(&self, id: &str, now: i64) -> Result<Option<Task>> {
        let tx = self.db.begin_write()?;
        let task = {
            let mut t = tx.open_table(TASKS)?;
            let current = match t.get(id)? {
                None => None,
                Some(v) => Some(decode_task(id, v.value())?),
            };
            match current {
                None => None,
                Some(mut task) => {
                    if task.ended_at.is_none() {
                        task.ended_at = Some(now);
                        let bytes = serde_json::to_vec(&task)
                            .map_err(|e| IdentityStoreError(e.to_string()))?;
                        t.insert(id, bytes.as_slice())?;
                    }
                    Some(task)
                }
            }
        };
        tx.commit()?;
        Ok(task)
    }

    /// Revokes a token id until `exp` (after which the token is dead anyway and the
    /// entry may be purged).
    pub fn revoke_jti(&self, jti: &str, exp: i64) -> Result<()> {
        let tx = self.db.begin_write()?;
        {
            let mut t = tx.open_table(REVOKED_JTI)?;
            t.insert(jti, exp)?;
        }
        tx.commit()?;
        Ok(())
    }

    /// Whether a token id is revoked.
    pub fn jti_revoked(&self, jti: &str) -> Result<bool> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(REVOKED_JTI)?;
        Ok(t.get(jti)?.is_some())
    }

    /// Deprovisions an agent at `now`: its tokens issued until now are revoked, and it
    /// gets no new ones. Keeps the first revocation time.
    pub fn revoke_agent(&self, subject: &str, now: i64) -> Result<i64> {
        let tx = self.db.begin_write()?;
        let at = {
            let mut t = tx.open_table(REVOKED_AGENTS)?;
            let existing = t.get(subject)?.map(|v| v.value());
            match existing {
                Some(at) => at,
                None => {
                    t.insert(subject, now)?;
                    now
                }
            }
        };
        tx.commit()?;
        Ok(at)
    }

    /// When the agent was deprovisioned, if it was.
    pub fn agent_revoked_at(&self, subject: &str) -> Result<Option<i64>> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(REVOKED_AGENTS)?;
        Ok(t.get(subject)?.map(|v| v.value()))
    }

    /// Drops revoked token ids whose tokens expired before `now`. Returns how many.
    pub fn purge_expired(&self, now: i64) -> Result<usize> {
        let tx = self.db.begin_write()?;
        let n = {
            let mut t = tx.open_table(REVOKED_JTI)?;
            let dead: Vec<String> = t
                .iter()?
                .filter_map(|e| e.ok())
                .filter(|(_, exp)| exp.value() < now)
                .map(|(k, _)| k.value().to_owned())
                .collect();
            for k in &dead {
                t.remove(k.as_str())?;
            }
            dead.len()
        };
        tx.commit()?;
        Ok(n)
    }
}

fn decode_task(id: &str, bytes: &[u8]) -> Result<Task> {
    let task: Task =
        serde_json::from_slice(bytes).map_err(|e| IdentityStoreError(format!("task {id}: {e}")))?;
    if task.v != RECORD_VERSION {
        return Err(IdentityStoreError(format!(
            "task {id}: record version {} is not {RECORD_VERSION}",
            task.v
        )));
    }
    Ok(task)
}

/// A new task record.
pub fn new_task(
    id: String,
    agent: Option<String>,
    now: i64,
    ttl: i64,
    description: String,
) -> Task {
    Task {
        v: RECORD_VERSION,
        id,
        agent,
        created_at: now,
        expires_at: now.saturating_add(ttl),
        ended_at: None,
        description,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn tasks_and_revocations_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("identity.redb");
        {
            let s = IdentityStore::open(&path).unwrap();
            s.put_task(&new_task(
                "task-1".into(),
                Some("a".into()),
                100,
                60,
                "d".into(),
            ))
            .unwrap();
            assert!(s.task("task-1").unwrap().unwrap().running(120));
            let ended = s.end_task("task-1", 130).unwrap().unwrap();
            assert_eq!(ended.ended_at, Some(130));
            // Idempotent: the first end time stays.
            assert_eq!(
                s.end_task("task-1", 140).unwrap().unwrap().ended_at,
                Some(130)
            );
            assert!(s.end_task("task-nope", 140).unwrap().is_none());
            s.revoke_jti("j1", 500).unwrap();
            s.revoke_jti("j0", 50).unwrap();
            assert_eq!(s.revoke_agent("spiffe://d/agent/x", 200).unwrap(), 200);
            assert_eq!(s.revoke_agent("spiffe://d/agent/x", 300).unwrap(), 200);
        }
        let s = IdentityStore::open(&path).unwrap();
        let t = s.task("task-1").unwrap().unwrap();
        assert!(!t.running(131));
        assert!(t.why_not_running(131).unwrap().contains("ended"));
        assert!(s.jti_revoked("j1").unwrap());
        assert_eq!(s.purge_expired(100).unwrap(), 1);
        assert!(!s.jti_revoked("j0").unwrap());
        assert!(s.jti_revoked("j1").unwrap());
        assert_eq!(s.agent_revoked_at("spiffe://d/agent/x").unwrap(), Some(200));
        assert_eq!(s.agent_revoked_at("spiffe://d/agent/y").unwrap(), None);
    }
}
