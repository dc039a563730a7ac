//! Durable identity-plane state (DESIGN.md §5, §7): tasks, revoked token ids and
//! deprovisioned agents, the policy bundle last applied, and the one-use `jti`s of DPoP
//! proofs and client assertions. Nothing here is secret.
//!
//! [`IdentityStore`] is implemented by [`RedbIdentityStore`] (the coordinator's
//! `identity.redb`; one-use `jti`s in memory, as one process sees every request) and by
//! the PostgreSQL store (`coordinator/STORE.md`).
//!
//! Every write is committed before the call that caused it returns, so a revocation or
//! a task end holds across a coordinator restart. Records are JSON with a version field.

use std::path::Path;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use super::approval::{ApprovalError, KEEP_DECIDED_SECONDS, State, Stored};

const TASKS: TableDefinition<&str, &[u8]> = TableDefinition::new("tasks");
const REVOKED_JTI: TableDefinition<&str, i64> = TableDefinition::new("revoked_jti");
const REVOKED_AGENTS: TableDefinition<&str, i64> = TableDefinition::new("revoked_agents");
const META: TableDefinition<&str, &str> = TableDefinition::new("meta");
/// Retry-safe requests: key → JSON [`Issuance`].
const ISSUANCE: TableDefinition<&str, &str> = TableDefinition::new("issuance");
/// Approval requests: id → JSON [`Stored`].
const APPROVALS: TableDefinition<&str, &str> = TableDefinition::new("approvals");
/// The META entry holding the operator-signed policy bundle last applied.
const POLICY_BUNDLE: &str = "policy_bundle";

/// The only record version this build writes and reads.
const RECORD_VERSION: u32 = 1;

/// Identity store errors.
#[derive(Debug, thiserror::Error)]
#[error("identity store: {0}")]
pub struct IdentityStoreError(pub(crate) String);

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

/// The embedded identity store: redb, with one-use `jti`s in memory.
pub struct RedbIdentityStore {
    db: Database,
    dpop_seen: quorate_proto::dpop::ReplayCache,
    /// `(client_id, jti)` of the client assertions accepted, until they expire: each
    /// authenticates one request (RFC 7523 §3 item 7).
    assertions_seen: quorate_proto::dpop::ReplayCache,
}

impl RedbIdentityStore {
    /// Opens or creates `path`.
    pub fn open(path: &Path) -> Result<Self> {
        let db = Database::create(path)?;
        let tx = db.begin_write()?;
        {
            tx.open_table(TASKS)?;
            tx.open_table(REVOKED_JTI)?;
            tx.open_table(REVOKED_AGENTS)?;
            tx.open_table(META)?;
            tx.open_table(ISSUANCE)?;
            tx.open_table(APPROVALS)?;
        }
        tx.commit()?;
        Ok(RedbIdentityStore {
            db,
            dpop_seen: quorate_proto::dpop::ReplayCache::default(),
            assertions_seen: quorate_proto::dpop::ReplayCache::default(),
        })
    }
}

/// Which one-use tokens a `jti` belongs to ([`IdentityStore::first_use`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OneUse {
    /// DPoP proofs (RFC 9449 §11.1), scoped by the key's thumbprint.
    DpopProof,
    /// Registered clients' assertions (RFC 7523 §3 item 7), scoped by the client.
    ClientAssertion,
}

impl OneUse {
    /// Lower-case name, as stored.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::DpopProof => "dpop",
            Self::ClientAssertion => "client_assertion",
        }
    }
}

/// The identity plane's durable state (see the [module docs](self)).
pub trait IdentityStore: Send + Sync {
    /// Durably records the operator-signed policy bundle (compact JWS) just applied,
    /// which the coordinator decides under again after a restart.
    fn put_policy_bundle(&self, jws: &str) -> Result<()>;

    /// The policy bundle last applied, if any.
    fn policy_bundle(&self) -> Result<Option<String>>;

    /// Records a new task (durable before return).
    fn put_task(&self, task: &Task) -> Result<()>;

    /// A task by id.
    fn task(&self, id: &str) -> Result<Option<Task>>;

    /// Ends a task at `now` (idempotent: an ended task keeps its first end time).
    /// Returns the task, or `None` if there is no such task.
    fn end_task(&self, id: &str, now: i64) -> Result<Option<Task>>;

    /// Revokes a token id until `exp` (after which the token is dead anyway and the
    /// entry may be purged).
    fn revoke_jti(&self, jti: &str, exp: i64) -> Result<()>;

    /// Whether a token id is revoked.
    fn jti_revoked(&self, jti: &str) -> Result<bool>;

    /// Deprovisions an agent at `now`: its tokens issued until now are revoked, and it
    /// gets no new ones. Keeps the first revocation time.
    fn revoke_agent(&self, subject: &str, now: i64) -> Result<i64>;

    /// When the agent was deprovisioned, if it was.
    fn agent_revoked_at(&self, subject: &str) -> Result<Option<i64>>;

    /// Drops revoked token ids whose tokens expired before `now`. Returns how many.
    fn purge_expired(&self, now: i64) -> Result<usize>;

    /// Records the first use of `jti` within `scope` (a DPoP key thumbprint, or a
    /// registered client's id) for one-use tokens of `kind`, remembered until
    /// `expires_at` (Unix seconds). `true`: first use, accept it. `false`: refuse it —
    /// a replay, or the store is full of live entries. `owner` is the key of the
    /// retry-safe request using it ([`Issuance`]), or empty: a `jti` first used by an
    /// owner is accepted again for that owner only (its retries), never for another.
    fn first_use(
        &self,
        kind: OneUse,
        scope: &str,
        jti: &str,
        owner: &str,
        expires_at: i64,
        now: i64,
    ) -> Result<bool>;

    /// Starts (or finds) the record of the retry-safe request `key`: stores
    /// `Issuance { digest, claims: None, reply: None, expires_at }` unless a record for
    /// `key` exists, and returns the stored one — the caller compares its digest.
    fn issuance_begin(&self, key: &str, digest: &str, expires_at: i64) -> Result<Issuance>;

    /// Sets the record's claims (JSON) unless it has some, and returns the stored ones,
    /// so every retry of one request, on any coordinator, signs the same claims (one
    /// `jti`). Errors if there is no record for `key`.
    fn issuance_claims(&self, key: &str, claims: &str) -> Result<String>;

    /// Sets the record's answer (JSON) unless it has one, and returns the stored one:
    /// every retry gets the first answer recorded. Errors if there is no record.
    fn issuance_reply(&self, key: &str, reply: &str) -> Result<String>;

    /// Stores a new approval entry.
    fn approval_insert(&self, entry: &Stored) -> Result<()>;

    /// An approval entry by id.
    fn approval(&self, id: &str) -> Result<Option<Stored>>;

    /// The approval entries: only those still pending if `open_only`.
    fn approvals(&self, open_only: bool) -> Result<Vec<Stored>>;

    /// The ids of pending entries whose expiry is at or before `now`.
    fn approvals_due(&self, now: i64) -> Result<Vec<String>>;

    /// Changes entry `id` atomically (no other change to it in between, on any
    /// coordinator): `change` sees the stored entry; if it succeeds, the changed entry is
    /// stored and returned. The outer error is the store's; the inner one `change`'s, or
    /// [`ApprovalError::Unknown`].
    fn approval_update(
        &self,
        id: &str,
        change: &mut dyn FnMut(&mut Stored) -> core::result::Result<(), ApprovalError>,
    ) -> Result<core::result::Result<Stored, ApprovalError>>;
}

/// Whether a decided approval entry is old enough to forget at `now`.
pub(crate) fn forgettable(s: &Stored, now: i64) -> bool {
    !matches!(s.entry.state, State::Pending | State::Approved)
        && now >= s.entry.expires_at.saturating_add(KEEP_DECIDED_SECONDS)
}

pub(crate) fn encode_approval(s: &Stored) -> Result<String> {
    serde_json::to_string(s).map_err(|e| IdentityStoreError(e.to_string()))
}

pub(crate) fn decode_approval(text: &str) -> Result<Stored> {
    serde_json::from_str(text).map_err(|e| IdentityStoreError(format!("approval record: {e}")))
}

/// What a retry-safe request (`IssueTokenRequest.request_id`) has come to, kept until
/// `expires_at` (Unix seconds) and dropped by [`IdentityStore::purge_expired`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Issuance {
    /// Hex SHA-256 of the request's content: a retry must send the same request.
    pub digest: String,
    /// The claims chosen for it (JSON), once chosen.
    pub claims: Option<String>,
    /// The answer given, once given: sealed by the request
    /// ([`Retry::seal`](super::retry::Retry::seal)), since it holds the token.
    pub reply: Option<String>,
    /// Unix seconds.
    pub expires_at: i64,
}

impl RedbIdentityStore {
    /// Reads, changes (when `change` returns a new record) and returns the record of
    /// `key`, in one write transaction.
    fn update_issuance(
        &self,
        key: &str,
        change: impl FnOnce(Option<Issuance>) -> Result<Issuance>,
    ) -> Result<Issuance> {
        let tx = self.db.begin_write()?;
        let record = {
            let mut t = tx.open_table(ISSUANCE)?;
            let current = match t.get(key)? {
                None => None,
                Some(v) => Some(decode_issuance(v.value())?),
            };
            let next = change(current.clone())?;
            if current.as_ref() != Some(&next) {
                t.insert(key, encode_issuance(&next)?.as_str())?;
            }
            next
        };
        tx.commit()?;
        Ok(record)
    }
}

pub(crate) fn encode_issuance(i: &Issuance) -> Result<String> {
    serde_json::to_string(i).map_err(|e| IdentityStoreError(e.to_string()))
}

pub(crate) fn decode_issuance(text: &str) -> Result<Issuance> {
    serde_json::from_str(text).map_err(|e| IdentityStoreError(format!("issuance record: {e}")))
}

/// No record for a retry-safe request key.
pub(crate) fn no_issuance(key: &str) -> IdentityStoreError {
    IdentityStoreError(format!("no record of request {key}"))
}

impl IdentityStore for RedbIdentityStore {
    fn put_policy_bundle(&self, jws: &str) -> Result<()> {
        let tx = self.db.begin_write()?;
        {
            let mut t = tx.open_table(META)?;
            t.insert(POLICY_BUNDLE, jws)?;
        }
        tx.commit()?;
        Ok(())
    }

    fn policy_bundle(&self) -> Result<Option<String>> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(META)?;
        Ok(t.get(POLICY_BUNDLE)?.map(|v| v.value().to_owned()))
    }

    fn put_task(&self, task: &Task) -> Result<()> {
        let bytes = encode_task(task)?;
        let tx = self.db.begin_write()?;
        {
            let mut t = tx.open_table(TASKS)?;
            t.insert(task.id.as_str(), bytes.as_bytes())?;
        }
        tx.commit()?;
        Ok(())
    }

    fn task(&self, id: &str) -> Result<Option<Task>> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(TASKS)?;
        match t.get(id)? {
            None => Ok(None),
            Some(v) => decode_task(id, v.value()).map(Some),
        }
    }

    fn end_task(&self, id: &str, now: i64) -> Result<Option<Task>> {
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
                        let bytes = encode_task(&task)?;
                        t.insert(id, bytes.as_bytes())?;
                    }
                    Some(task)
                }
            }
        };
        tx.commit()?;
        Ok(task)
    }

    fn revoke_jti(&self, jti: &str, exp: i64) -> Result<()> {
        let tx = self.db.begin_write()?;
        {
            let mut t = tx.open_table(REVOKED_JTI)?;
            t.insert(jti, exp)?;
        }
        tx.commit()?;
        Ok(())
    }

    fn jti_revoked(&self, jti: &str) -> Result<bool> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(REVOKED_JTI)?;
        Ok(t.get(jti)?.is_some())
    }

    fn revoke_agent(&self, subject: &str, now: i64) -> Result<i64> {
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

    fn agent_revoked_at(&self, subject: &str) -> Result<Option<i64>> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(REVOKED_AGENTS)?;
        Ok(t.get(subject)?.map(|v| v.value()))
    }

    fn purge_expired(&self, now: i64) -> Result<usize> {
        let tx = self.db.begin_write()?;
        {
            let mut t = tx.open_table(APPROVALS)?;
            let mut dead = Vec::new();
            for e in t.iter()? {
                let (k, v) = e?;
                if decode_approval(v.value()).is_ok_and(|s| forgettable(&s, now)) {
                    dead.push(k.value().to_owned());
                }
            }
            for k in &dead {
                t.remove(k.as_str())?;
            }
        }
        {
            let mut t = tx.open_table(ISSUANCE)?;
            let mut dead = Vec::new();
            for e in t.iter()? {
                let (k, v) = e?;
                if decode_issuance(v.value()).is_ok_and(|i| i.expires_at < now) {
                    dead.push(k.value().to_owned());
                }
            }
            for k in &dead {
                t.remove(k.as_str())?;
            }
        }
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

    fn first_use(
        &self,
        kind: OneUse,
        scope: &str,
        jti: &str,
        owner: &str,
        expires_at: i64,
        now: i64,
    ) -> Result<bool> {
        let cache = match kind {
            OneUse::DpopProof => &self.dpop_seen,
            OneUse::ClientAssertion => &self.assertions_seen,
        };
        Ok(cache.check_and_insert_for(scope, jti, owner, expires_at, now))
    }

    fn issuance_begin(&self, key: &str, digest: &str, expires_at: i64) -> Result<Issuance> {
        self.update_issuance(key, |current| {
            Ok(current.unwrap_or_else(|| Issuance {
                digest: digest.to_owned(),
                claims: None,
                reply: None,
                expires_at,
            }))
        })
    }

    fn issuance_claims(&self, key: &str, claims: &str) -> Result<String> {
        let r = self.update_issuance(key, |current| {
            let mut r = current.ok_or_else(|| no_issuance(key))?;
            r.claims.get_or_insert_with(|| claims.to_owned());
            Ok(r)
        })?;
        r.claims.ok_or_else(|| no_issuance(key))
    }

    fn issuance_reply(&self, key: &str, reply: &str) -> Result<String> {
        let r = self.update_issuance(key, |current| {
            let mut r = current.ok_or_else(|| no_issuance(key))?;
            r.reply.get_or_insert_with(|| reply.to_owned());
            Ok(r)
        })?;
        r.reply.ok_or_else(|| no_issuance(key))
    }

    fn approval_insert(&self, entry: &Stored) -> Result<()> {
        let text = encode_approval(entry)?;
        let tx = self.db.begin_write()?;
        {
            let mut t = tx.open_table(APPROVALS)?;
            if t.get(entry.entry.id.as_str())?.is_some() {
                return Err(IdentityStoreError(format!(
                    "approval {} exists already",
                    entry.entry.id
                )));
            }
            t.insert(entry.entry.id.as_str(), text.as_str())?;
        }
        tx.commit()?;
        Ok(())
    }

    fn approval(&self, id: &str) -> Result<Option<Stored>> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(APPROVALS)?;
        t.get(id)?.map(|v| decode_approval(v.value())).transpose()
    }

    fn approvals(&self, open_only: bool) -> Result<Vec<Stored>> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(APPROVALS)?;
        let mut out = Vec::new();
        for e in t.iter()? {
            let (_, v) = e?;
            let s = decode_approval(v.value())?;
            if !open_only || s.open() {
                out.push(s);
            }
        }
        Ok(out)
    }

    fn approvals_due(&self, now: i64) -> Result<Vec<String>> {
        Ok(self
            .approvals(true)?
            .into_iter()
            .filter(|s| now >= s.entry.expires_at)
            .map(|s| s.entry.id)
            .collect())
    }

    fn approval_update(
        &self,
        id: &str,
        change: &mut dyn FnMut(&mut Stored) -> core::result::Result<(), ApprovalError>,
    ) -> Result<core::result::Result<Stored, ApprovalError>> {
        let tx = self.db.begin_write()?;
        let outcome = {
            let mut t = tx.open_table(APPROVALS)?;
            let current = match t.get(id)? {
                None => None,
                Some(v) => Some(decode_approval(v.value())?),
            };
            match current {
                None => Err(ApprovalError::Unknown(id.to_owned())),
                Some(mut s) => match change(&mut s) {
                    Err(e) => Err(e),
                    Ok(()) => {
                        t.insert(id, encode_approval(&s)?.as_str())?;
                        Ok(s)
                    }
                },
            }
        };
        if outcome.is_ok() {
            tx.commit()?;
        } else {
            tx.abort()?;
        }
        Ok(outcome)
    }
}

pub(crate) fn encode_task(task: &Task) -> Result<String> {
    serde_json::to_string(task).map_err(|e| IdentityStoreError(e.to_string()))
}

pub(crate) fn decode_task(id: &str, bytes: &[u8]) -> Result<Task> {
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
            let s = RedbIdentityStore::open(&path).unwrap();
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
        let s = RedbIdentityStore::open(&path).unwrap();
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

    #[test]
    fn a_retry_safe_request_keeps_its_first_claims_and_answer() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("identity.redb");
        {
            let s = RedbIdentityStore::open(&path).unwrap();
            assert!(s.issuance_claims("k", "{}").is_err(), "no record yet");
            let r = s.issuance_begin("k", "d1", 1000).unwrap();
            assert_eq!((r.digest.as_str(), r.claims, r.reply), ("d1", None, None));
            // A second begin finds the first record, digest included.
            assert_eq!(s.issuance_begin("k", "d2", 2000).unwrap().digest, "d1");
            assert_eq!(s.issuance_claims("k", "c1").unwrap(), "c1");
            assert_eq!(s.issuance_claims("k", "c2").unwrap(), "c1");
            assert_eq!(s.issuance_reply("k", "r1").unwrap(), "r1");
            // One-use jtis: the owner may use its own again, nobody else may.
            let use_ = |owner: &str| {
                s.first_use(OneUse::DpopProof, "jkt", "j", owner, 500, 100)
                    .unwrap()
            };
            assert!(use_("k"));
            assert!(use_("k"));
            assert!(!use_("other"));
            assert!(!use_(""));
        }
        let s = RedbIdentityStore::open(&path).unwrap();
        assert_eq!(s.issuance_reply("k", "r2").unwrap(), "r1");
        s.purge_expired(999).unwrap();
        assert_eq!(s.issuance_begin("k", "d3", 3000).unwrap().digest, "d1");
        s.purge_expired(1001).unwrap();
        assert_eq!(s.issuance_begin("k", "d3", 3000).unwrap().digest, "d3");
    }
}
