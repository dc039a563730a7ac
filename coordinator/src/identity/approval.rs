//! Human approval of requests that policy marks `@approval("required")`.
//!
//! A request that needs approval becomes a [`Pending`] entry with an id and an expiry.
//! An approver approves or rejects it; the agent's call waits for that (bounded) or the
//! agent polls with the id. An approval is bound to the exact request — a digest of
//! agent, action, resource, scopes, lifetime, task, context and DPoP key — and is used
//! once. Entries live in memory: a restart of the coordinator forgets pending requests
//! (their agents get "no pending request" and ask again).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use sha2::{Digest, Sha256};
use tokio::sync::Notify;

/// The longest an agent's call waits for an approval.
pub const MAX_WAIT: Duration = Duration::from_secs(300);
/// How long decided entries stay listable.
const KEEP_DECIDED_SECONDS: i64 = 3600;

/// Where a request stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
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
#[derive(Clone, Debug, PartialEq, Eq)]
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
#[derive(Clone, Debug)]
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
    digest: [u8; 32],
    changed: Arc<Notify>,
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
}

/// The approval book.
#[derive(Default)]
pub struct Approvals {
    entries: Mutex<HashMap<String, Pending>>,
}

/// What became of a request (after [`Approvals::expire_due`]).
pub type Transition = (Pending, State);

impl Approvals {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Pending>> {
        self.entries.lock().unwrap_or_else(PoisonError::into_inner)
    }

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
            digest: request.digest(),
            request,
            policy_ids,
            created_at: now,
            expires_at: now.saturating_add(ttl_seconds),
            state: State::Pending,
            decided_by: None,
            reason: None,
            statement: None,
            changed: Arc::new(Notify::new()),
        }
    }

    /// Lists a pending entry.
    pub fn insert(&self, p: Pending) {
        self.lock().insert(p.id.clone(), p);
    }

    /// Marks pending entries past their expiry as expired, forgets long-decided ones,
    /// and returns the ones that just expired (for the audit trail).
    pub fn expire_due(&self, now: i64) -> Vec<Pending> {
        let mut m = self.lock();
        let mut expired = Vec::new();
        for p in m.values_mut() {
            if p.state == State::Pending && now >= p.expires_at {
                p.state = State::Expired;
                p.changed.notify_waiters();
                expired.push(p.clone());
            }
        }
        m.retain(|_, p| {
            p.state == State::Pending
                || p.state == State::Approved
                || now < p.expires_at.saturating_add(KEEP_DECIDED_SECONDS)
        });
        expired
    }

    /// Every entry (only pending ones unless `all`), oldest first.
    pub fn list(&self, all: bool) -> Vec<Pending> {
        let mut v: Vec<Pending> = self
            .lock()
            .values()
            .filter(|p| all || p.state == State::Pending)
            .cloned()
            .collect();
        v.sort_by(|a, b| a.created_at.cmp(&b.created_at).then(a.id.cmp(&b.id)));
        v
    }

    /// An approver's decision on a pending entry. `record` sees the decided entry
    /// before anyone else can: only if it succeeds (the audit event is durable) does the
    /// decision take effect and wake the waiting request.
    pub fn decide<E: From<ApprovalError>>(
        &self,
        id: &str,
        approve: bool,
        approver: &str,
        reason: Option<String>,
        statement: Option<String>,
        record: impl FnOnce(&Pending) -> Result<(), E>,
    ) -> Result<Pending, E> {
        let mut m = self.lock();
        let p = m
            .get_mut(id)
            .ok_or_else(|| ApprovalError::Unknown(id.to_owned()))?;
        if p.state != State::Pending {
            return Err(ApprovalError::NotPending {
                id: id.to_owned(),
                state: p.state.as_str(),
            }
            .into());
        }
        let mut decided = p.clone();
        decided.state = if approve {
            State::Approved
        } else {
            State::Rejected
        };
        decided.decided_by = Some(approver.to_owned());
        decided.reason = reason;
        decided.statement = statement;
        record(&decided)?;
        *p = decided.clone();
        p.changed.notify_waiters();
        Ok(decided)
    }

    /// The entry `id` for `request`, and a handle that is notified when it changes.
    pub fn get(
        &self,
        id: &str,
        request: &Request,
    ) -> Result<(Pending, Arc<Notify>), ApprovalError> {
        let m = self.lock();
        let p = m
            .get(id)
            .ok_or_else(|| ApprovalError::Unknown(id.to_owned()))?;
        if p.digest != request.digest() {
            return Err(ApprovalError::Mismatch(id.to_owned()));
        }
        Ok((p.clone(), Arc::clone(&p.changed)))
    }

    /// Uses an approved entry once: approved → used. Returns its signed statement, if
    /// it has one.
    pub fn take(&self, id: &str) -> Result<Option<String>, ApprovalError> {
        let mut m = self.lock();
        let p = m
            .get_mut(id)
            .ok_or_else(|| ApprovalError::Unknown(id.to_owned()))?;
        if p.state != State::Approved {
            return Err(ApprovalError::NotPending {
                id: id.to_owned(),
                state: p.state.as_str(),
            });
        }
        p.state = State::Used;
        Ok(p.statement.clone())
    }

    /// The pending entry `id`, if any.
    pub fn peek(&self, id: &str) -> Option<Pending> {
        self.lock().get(id).cloned()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

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

    #[test]
    fn an_approval_is_bound_to_its_request_and_used_once() {
        let a = Approvals::default();
        a.insert(Approvals::pending(
            "apr-1".into(),
            req("read"),
            vec!["p".into()],
            100,
            60,
        ));
        assert_eq!(
            a.get("apr-1", &req("write")).unwrap_err(),
            ApprovalError::Mismatch("apr-1".into())
        );
        assert_eq!(
            a.get("apr-1", &req("read")).unwrap().0.state,
            State::Pending
        );
        let fail = |_: &Pending| Err(ApprovalError::Unknown("audit".into()));
        assert!(a.decide("apr-1", true, "admin", None, None, fail).is_err());
        assert_eq!(
            a.get("apr-1", &req("read")).unwrap().0.state,
            State::Pending
        );
        a.decide("apr-1", true, "admin", None, None, |_| {
            Ok::<_, ApprovalError>(())
        })
        .unwrap();
        assert!(
            a.decide("apr-1", false, "admin", None, None, |_| Ok::<
                _,
                ApprovalError,
            >(()))
            .is_err()
        );
        a.take("apr-1").unwrap();
        assert!(a.take("apr-1").is_err());
    }

    #[test]
    fn pending_requests_expire() {
        let a = Approvals::default();
        a.insert(Approvals::pending(
            "apr-1".into(),
            req("read"),
            vec![],
            100,
            60,
        ));
        assert!(a.expire_due(159).is_empty());
        assert_eq!(a.expire_due(160).len(), 1);
        assert_eq!(
            a.get("apr-1", &req("read")).unwrap().0.state,
            State::Expired
        );
        assert!(
            a.decide(
                "apr-1",
                true,
                "admin",
                None,
                None,
                |_| Ok::<_, ApprovalError>(())
            )
            .is_err()
        );
        assert!(a.list(false).is_empty());
        assert_eq!(a.list(true).len(), 1);
    }
}
