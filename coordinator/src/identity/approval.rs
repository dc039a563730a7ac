//! Human approval of requests that policy marks `@approval("required")`.
//!
//! A request that needs approval becomes a [`Pending`] entry with an id and an expiry.
//! An approver approves or rejects it; the agent's call waits for that (bounded) or the
//! agent polls with the id. An approval is bound to the exact request — a digest of
//! agent, action, resource, scopes, lifetime, task, context and DPoP key — and is used
//! once (its retries excepted, see [`Stored::take`]).
//!
//! Entries live in the identity store ([`IdentityStore`]: redb, or PostgreSQL shared by
//! every coordinator), so an approval asked on one coordinator can be decided on another
//! and used on a third, and a restart forgets nothing. Every change is one atomic
//! read-modify-write of the entry ([`IdentityStore::approval_update`]) through the
//! transitions of [`Stored`]. A decision first *claims* the entry (pending → being
//! decided, which readers still see as pending), then records its audit event, then
//! *settles* it; if the event cannot be recorded the claim is released. A coordinator
//! that dies between the two leaves the entry claimed until it expires.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::sync::Notify;

use super::store::{IdentityStore, IdentityStoreError};

/// The longest an agent's call waits for an approval.
pub const MAX_WAIT: Duration = Duration::from_secs(300);
/// How long decided entries stay listable (seconds after their expiry).
pub const KEEP_DECIDED_SECONDS: i64 = 3600;
/// How often a waiting request looks at the store for a decision made elsewhere.
pub const POLL: Duration = Duration::from_millis(250);

/// Where a request stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    /// Waiting for an approver.
    Pending,
    /// Approved, not yet used.
    Approved,
    /// Rejected by an approver.
    Rejected,
    /// Nobody decided in time.
    Expired,
    /// Approved and used by the request it approved.
    Used,
}

impl State {
    /// Lower-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Approved => "approved",
            Self::Rejected => "rejected",
            Self::Expired => "expired",
            Self::Used => "used",
        }
    }
}

/// What is waiting for approval.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    /// The agent.
    pub agent: String,
    /// The Cedar action.
    pub action: String,
    /// The resource (`Audience::"prod"`).
    pub resource: String,
    /// Requested scopes.
    pub scopes: Vec<String>,
    /// Requested lifetime.
    pub ttl_seconds: u64,
    /// The task.
    pub task_id: Option<String>,
    /// Caller-supplied context.
    pub context: BTreeMap<String, String>,
    /// The DPoP key thumbprint the token will be bound to.
    pub jkt: Option<String>,
}

impl Request {
    /// Whether an approver's signed statement approves exactly this request (entry
    /// `id`); the error names the first member that differs.
    pub fn matches(
        &self,
        id: &str,
        st: &quorate_authz::bundle::ApprovalStatement,
    ) -> Result<(), String> {
        let differs = |what: &str| {
            Err(format!(
                "the approval statement's {what} differs from request {id}'s"
            ))
        };
        if st.approval_id != id {
            return differs("approval_id");
        }
        if st.sub != self.agent {
            return differs("sub");
        }
        if st.action != self.action {
            return differs("action");
        }
        if st.resource != self.resource {
            return differs("resource");
        }
        if st.scopes != self.scopes {
            return differs("scopes");
        }
        if st.ttl_seconds != self.ttl_seconds {
            return differs("ttl_seconds");
        }
        if st.task_id != self.task_id {
            return differs("task_id");
        }
        if st.context != self.context {
            return differs("context");
        }
        if st.jkt != self.jkt {
            return differs("jkt");
        }
        Ok(())
    }

    fn digest(&self) -> [u8; 32] {
        let mut h = Sha256::new();
        let mut field = |b: &[u8]| {
            h.update((b.len() as u64).to_be_bytes());
            h.update(b);
        };
        field(b"quorate-approval-v1");
        field(self.agent.as_bytes());
        field(self.action.as_bytes());
        field(self.resource.as_bytes());
        for s in &self.scopes {
            field(s.as_bytes());
        }
        field(b"|");
        field(&self.ttl_seconds.to_be_bytes());
        field(self.task_id.as_deref().unwrap_or("").as_bytes());
        for (k, v) in &self.context {
            field(k.as_bytes());
            field(v.as_bytes());
        }
        field(self.jkt.as_deref().unwrap_or("").as_bytes());
        h.finalize().into()
    }
}

/// One approval entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pending {
    /// `apr-` and random hex.
    pub id: String,
    /// The request.
    pub request: Request,
    /// The policies that asked for approval.
    pub policy_ids: Vec<String>,
    /// Unix seconds.
    pub created_at: i64,
    /// Unix seconds; a pending request expires then.
    pub expires_at: i64,
    /// Where it stands.
    pub state: State,
    /// The approver that decided.
    pub decided_by: Option<String>,
    /// The approver's reason.
    pub reason: Option<String>,
    /// The approver-signed statement (compact JWS) the fragment nodes check, when the
    /// policy came from a signed bundle.
    pub statement: Option<String>,
    /// The retry-safe request that used it (empty: a request without a `request_id`).
    pub used_by: Option<String>,
}

/// An entry as stored: the entry and whether an approver's decision is under way.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stored {
    /// The entry (still `Pending` while being decided).
    pub entry: Pending,
    /// Claimed by a decision whose audit event is being recorded.
    pub deciding: bool,
}

/// Why an approval cannot be used or decided.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum ApprovalError {
    /// No such id.
    #[error("no approval request {0}")]
    Unknown(String),
    /// The request differs from the one approved.
    #[error(
        "approval {0} was asked for a different request (agent, audience, scopes, lifetime, task, context and DPoP key must all match)"
    )]
    Mismatch(String),
    /// Not pending any more.
    #[error("approval {id} is {state}, not pending")]
    NotPending {
        /// The id.
        id: String,
        /// Its state.
        state: &'static str,
    },
    /// Another approver's decision on it is being recorded.
    #[error("approval {0} is being decided by another approver right now")]
    Deciding(String),
    /// The store failed.
    #[error("approval store: {0}")]
    Store(String),
}

impl From<IdentityStoreError> for ApprovalError {
    fn from(e: IdentityStoreError) -> Self {
        ApprovalError::Store(e.0)
    }
}

impl Stored {
    fn not_pending(&self) -> ApprovalError {
        ApprovalError::NotPending {
            id: self.entry.id.clone(),
            state: self.entry.state.as_str(),
        }
    }

    /// Whether it waits for a decision (being decided included).
    pub fn open(&self) -> bool {
        self.entry.state == State::Pending
    }

    /// Pending → expired at `now`, if due. `true` if it changed.
    pub fn expire(&mut self, now: i64) -> bool {
        if self.entry.state == State::Pending && now >= self.entry.expires_at {
            self.entry.state = State::Expired;
            self.deciding = false;
            true
        } else {
            false
        }
    }

    /// Claims a pending entry for a decision (see the [module docs](self)).
    pub fn claim(&mut self, now: i64) -> Result<(), ApprovalError> {
        self.expire(now);
        if self.entry.state != State::Pending {
            return Err(self.not_pending());
        }
        if self.deciding {
            return Err(ApprovalError::Deciding(self.entry.id.clone()));
        }
        self.deciding = true;
        Ok(())
    }

    /// Ends a claim: with the decided entry, or (`None`) releasing it as pending.
    pub fn settle(&mut self, decided: Option<&Pending>) -> Result<(), ApprovalError> {
        if !self.deciding || self.entry.state != State::Pending {
            return Err(self.not_pending());
        }
        self.deciding = false;
        if let Some(d) = decided {
            self.entry = d.clone();
        }
        Ok(())
    }

    /// Uses an approved entry once: approved → used, by the retry-safe request `owner`
    /// (empty: none). An entry used by a non-empty `owner` may be taken again by that
    /// owner only: its retries sign the same claims ([`super::retry`]), so they make no
    /// second token.
    pub fn take(&mut self, owner: &str) -> Result<(), ApprovalError> {
        if self.entry.state == State::Used
            && !owner.is_empty()
            && self.entry.used_by.as_deref() == Some(owner)
        {
            return Ok(());
        }
        if self.entry.state != State::Approved {
            return Err(self.not_pending());
        }
        self.entry.state = State::Used;
        self.entry.used_by = Some(owner.to_owned());
        Ok(())
    }
}

/// The approval book over the identity store; it wakes this process's waiting requests
/// when it changes an entry (decisions made on other coordinators are seen within
/// [`POLL`]).
#[derive(Default)]
pub struct Approvals {
    changed: Notify,
}

impl Approvals {
    /// A new pending entry, not yet listed: record it in the audit trail, then
    /// [`Self::insert`] it, so no approver sees a request before its event exists.
    pub fn pending(
        id: String,
        request: Request,
        policy_ids: Vec<String>,
        now: i64,
        ttl_seconds: i64,
    ) -> Pending {
        Pending {
            id,
            request,
            policy_ids,
            created_at: now,
            expires_at: now.saturating_add(ttl_seconds),
            state: State::Pending,
            decided_by: None,
            reason: None,
            statement: None,
            used_by: None,
        }
    }

    /// Lists a pending entry.
    pub fn insert(&self, store: &dyn IdentityStore, p: Pending) -> Result<(), ApprovalError> {
        store.approval_insert(&Stored {
            entry: p,
            deciding: false,
        })?;
        Ok(())
    }

    /// Marks pending entries past their expiry as expired and returns the ones this
    /// call expired (for the audit trail; each once, across coordinators).
    pub fn expire_due(
        &self,
        store: &dyn IdentityStore,
        now: i64,
    ) -> Result<Vec<Pending>, ApprovalError> {
        let mut expired = Vec::new();
        for id in store.approvals_due(now)? {
            let mut changed = false;
            let s = store.approval_update(&id, &mut |s| {
                changed = s.expire(now);
                Ok(())
            })??;
            if changed {
                expired.push(s.entry);
            }
        }
        if !expired.is_empty() {
            self.changed.notify_waiters();
        }
        Ok(expired)
    }

    /// Every entry (only pending ones unless `all`), oldest first.
    pub fn list(
        &self,
        store: &dyn IdentityStore,
        all: bool,
    ) -> Result<Vec<Pending>, ApprovalError> {
        let mut v: Vec<Pending> = store
            .approvals(!all)?
            .into_iter()
            .filter(|s| all || s.open())
            .map(|s| s.entry)
            .collect();
        v.sort_by(|a, b| a.created_at.cmp(&b.created_at).then(a.id.cmp(&b.id)));
        Ok(v)
    }

    /// An approver's decision on a pending entry. `record` sees the decided entry
    /// before anyone else can: only if it succeeds (the audit event is durable) does the
    /// decision take effect and wake the waiting request.
    #[allow(clippy::too_many_arguments)]
    pub fn decide<E: From<ApprovalError>>(
        &self,
        store: &dyn IdentityStore,
        id: &str,
        approve: bool,
        approver: &str,
        reason: Option<String>,
        statement: Option<String>,
        now: i64,
        record: impl FnOnce(&Pending) -> Result<(), E>,
    ) -> Result<Pending, E> {
        let claimed = store
            .approval_update(id, &mut |s| s.claim(now))
            .map_err(ApprovalError::from)??;
        let mut decided = claimed.entry;
        decided.state = if approve {
            State::Approved
        } else {
            State::Rejected
        };
        decided.decided_by = Some(approver.to_owned());
        decided.reason = reason;
        decided.statement = statement;
        if let Err(e) = record(&decided) {
            if let Err(release) = store
                .approval_update(id, &mut |s| s.settle(None))
                .map_err(ApprovalError::from)
                .and_then(|r| r)
            {
                tracing::error!(approval = %id, error = %release, "could not release the claim on an approval after its decision failed; it stays claimed until it expires");
            }
            return Err(e);
        }
        store
            .approval_update(id, &mut |s| s.settle(Some(&decided)))
            .map_err(ApprovalError::from)??;
        self.changed.notify_waiters();
        Ok(decided)
    }

    /// The entry `id` for `request`, and a handle that is notified when this process
    /// changes an entry.
    pub fn get(
        &self,
        store: &dyn IdentityStore,
        id: &str,
        request: &Request,
    ) -> Result<(Pending, &Notify), ApprovalError> {
        let s = store
            .approval(id)?
            .ok_or_else(|| ApprovalError::Unknown(id.to_owned()))?;
        if s.entry.request.digest() != request.digest() {
            return Err(ApprovalError::Mismatch(id.to_owned()));
        }
        Ok((s.entry, &self.changed))
    }

    /// Uses an approved entry once ([`Stored::take`]). Returns its signed statement,
    /// if it has one.
    pub fn take(
        &self,
        store: &dyn IdentityStore,
        id: &str,
        owner: &str,
    ) -> Result<Option<String>, ApprovalError> {
        let s = store.approval_update(id, &mut |s| s.take(owner))??;
        Ok(s.entry.statement)
    }

    /// The entry `id`, if any.
    pub fn peek(
        &self,
        store: &dyn IdentityStore,
        id: &str,
    ) -> Result<Option<Pending>, ApprovalError> {
        Ok(store.approval(id)?.map(|s| s.entry))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::identity::store::RedbIdentityStore;

    fn req(scope: &str) -> Request {
        Request {
            agent: "spiffe://d/agent/x/a".into(),
            action: "issue_token".into(),
            resource: "Audience::\"prod\"".into(),
            scopes: vec![scope.into()],
            ttl_seconds: 60,
            task_id: None,
            context: BTreeMap::new(),
            jkt: None,
        }
    }

    fn store() -> (tempfile::TempDir, RedbIdentityStore) {
        let dir = tempfile::tempdir().unwrap();
        let s = RedbIdentityStore::open(&dir.path().join("identity.redb")).unwrap();
        (dir, s)
    }

    #[test]
    fn an_approval_is_bound_to_its_request_and_used_once() {
        let (_d, s) = store();
        let a = Approvals::default();
        a.insert(
            &s,
            Approvals::pending("apr-1".into(), req("read"), vec!["p".into()], 100, 60),
        )
        .unwrap();
        assert_eq!(
            a.get(&s, "apr-1", &req("write")).unwrap_err(),
            ApprovalError::Mismatch("apr-1".into())
        );
        assert_eq!(
            a.get(&s, "apr-1", &req("read")).unwrap().0.state,
            State::Pending
        );
        // A decision whose audit event fails does not take effect, and frees the entry.
        let fail = |_: &Pending| Err(ApprovalError::Unknown("audit".into()));
        assert!(
            a.decide(&s, "apr-1", true, "admin", None, None, 110, fail)
                .is_err()
        );
        assert_eq!(
            a.get(&s, "apr-1", &req("read")).unwrap().0.state,
            State::Pending
        );
        // While one decision is being recorded, another is refused.
        let nested = a.decide(&s, "apr-1", true, "admin", None, None, 110, |_| {
            let second = a.decide(&s, "apr-1", false, "other", None, None, 110, |_| {
                Ok::<_, ApprovalError>(())
            });
            assert_eq!(second.unwrap_err(), ApprovalError::Deciding("apr-1".into()));
            assert_eq!(
                a.list(&s, false).unwrap().len(),
                1,
                "still listed as pending"
            );
            Ok::<_, ApprovalError>(())
        });
        assert_eq!(nested.unwrap().state, State::Approved);
        assert!(
            a.decide(&s, "apr-1", false, "admin", None, None, 111, |_| Ok::<
                _,
                ApprovalError,
            >(
                ()
            ))
            .is_err()
        );
        a.take(&s, "apr-1", "").unwrap();
        assert!(a.take(&s, "apr-1", "").is_err());
    }

    #[test]
    fn a_retry_safe_request_may_take_its_approval_again() {
        let (_d, s) = store();
        let a = Approvals::default();
        a.insert(
            &s,
            Approvals::pending("apr-2".into(), req("read"), vec![], 100, 60),
        )
        .unwrap();
        a.decide(&s, "apr-2", true, "admin", None, None, 101, |_| {
            Ok::<_, ApprovalError>(())
        })
        .unwrap();
        a.take(&s, "apr-2", "request-key").unwrap();
        a.take(&s, "apr-2", "request-key").unwrap();
        assert!(a.take(&s, "apr-2", "another").is_err());
        assert!(a.take(&s, "apr-2", "").is_err());
    }

    #[test]
    fn pending_requests_expire() {
        let (_d, s) = store();
        let a = Approvals::default();
        a.insert(
            &s,
            Approvals::pending("apr-1".into(), req("read"), vec![], 100, 60),
        )
        .unwrap();
        assert!(a.expire_due(&s, 159).unwrap().is_empty());
        assert_eq!(a.expire_due(&s, 160).unwrap().len(), 1);
        assert!(a.expire_due(&s, 161).unwrap().is_empty(), "expired once");
        assert_eq!(
            a.get(&s, "apr-1", &req("read")).unwrap().0.state,
            State::Expired
        );
        assert!(
            a.decide(&s, "apr-1", true, "admin", None, None, 162, |_| Ok::<
                _,
                ApprovalError,
            >(
                ()
            ))
            .is_err()
        );
        assert!(a.list(&s, false).unwrap().is_empty());
        assert_eq!(a.list(&s, true).unwrap().len(), 1);
    }
}
