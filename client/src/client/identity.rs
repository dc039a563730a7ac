//! The identity API: access tokens for agents, introspection, revocation, tasks and
//! policy (DESIGN.md §7).

use std::collections::HashMap;

use quorate_proto::api;

use std::time::Duration;

use quorate_crypto::tdh::{self, Requester};

use super::failover::Retry;
use super::{Client, approvals_api, audit_api, bug, identity_api, rng, unmask};
use crate::error::{Error, Result};

/// What to revoke.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RevokeTarget {
    /// One token, by its `jti`.
    Jti(String),
    /// Every token of an agent (by its Quorate subject), and its future issuance.
    Agent(String),
    /// A task: ends it.
    Task(String),
    /// A whole token.
    Token(String),
}

/// A token request.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TokenRequest {
    /// The agent's attestation (OIDC JWT).
    pub attestation: String,
    /// The audience.
    pub audience: String,
    /// Scopes.
    pub scopes: Vec<String>,
    /// Lifetime in seconds.
    pub ttl_seconds: u32,
    /// The task, if any.
    pub task_id: Option<String>,
    /// Policy context (`environment`, `tool`, `data_sensitivity`).
    pub context: HashMap<String, String>,
    /// An RFC 9449 DPoP proof (`POST <issuer>/token`): binds the token to its key.
    pub dpop_proof: Option<String>,
    /// If policy asks for human approval: seconds to wait for it (at most 300).
    pub wait_seconds: u32,
    /// Polls a pending approval (the same request, with its id).
    pub approval_id: Option<String>,
    /// Makes the request safe to retry: 16 to 64 characters of `[A-Za-z0-9_-]`, the same
    /// on every retry of one logical request. `None`: a fresh random one per call of
    /// [`Client::issue_token`], sent on each of its attempts (failover included).
    pub request_id: Option<String>,
}

/// An RFC 8693 token exchange: a token for a sub-agent. Its `Debug` leaves the token
/// and the attestation out.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct ExchangeRequest {
    /// The delegating agent's Quorate token.
    pub subject_token: String,
    /// The sub-agent's attestation.
    pub actor_attestation: String,
    /// Empty: the subject token's audience.
    pub audience: String,
    /// A subset of the subject token's scopes; empty: all of them.
    pub scopes: Vec<String>,
    /// Lifetime in seconds (capped by the subject token's expiry).
    pub ttl_seconds: u32,
    /// A DPoP proof, required when the subject token is DPoP-bound.
    pub dpop_proof: Option<String>,
    /// Policy context.
    pub context: HashMap<String, String>,
    /// As [`TokenRequest::request_id`].
    pub request_id: Option<String>,
}

impl std::fmt::Debug for ExchangeRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExchangeRequest")
            .field("subject_token", &"<redacted>")
            .field("actor_attestation", &"<redacted>")
            .field("audience", &self.audience)
            .field("scopes", &self.scopes)
            .field("ttl_seconds", &self.ttl_seconds)
            .field("request_id", &self.request_id)
            .finish_non_exhaustive()
    }
}

/// Who asks for a credential.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CredentialFor {
    /// An agent, by its attestation.
    Agent {
        /// The OIDC JWT.
        attestation: String,
    },
    /// A resource client that derives an agent's credential to check it.
    Resource {
        /// The agent's Quorate subject.
        agent: String,
        /// The agent's access token for the task, which it presented to the resource:
        /// fragment nodes that check evidence require it (DESIGN.md §9).
        agent_token: Option<String>,
    },
}

/// A confidential credential, unmasked here. The credential itself is zeroized on drop
/// and never printed by `Debug`.
#[derive(Debug)]
pub struct CredentialGrant {
    /// The credential.
    pub credential: tdh::Credential,
    /// The canonical context it is bound to.
    pub context: Vec<u8>,
    /// Start of its validity window (the task's start), unix seconds.
    pub not_before: i64,
    /// End of the window (the task's end).
    pub not_after: i64,
    /// The derivation key.
    pub key: String,
    /// The fragment nodes that answered.
    pub nodes: Vec<u32>,
    /// The policies that allowed it.
    pub policy_ids: Vec<String>,
}

impl Client {
    /// Asks for an access token for an attested agent.
    pub async fn issue_token(&self, r: TokenRequest) -> Result<api::IssueTokenReply> {
        let req = api::IssueTokenRequest {
            attestation: r.attestation,
            audience: r.audience,
            scopes: r.scopes,
            ttl_seconds: r.ttl_seconds,
            task_id: r.task_id.unwrap_or_default(),
            context: r.context,
            dpop_proof: r.dpop_proof.unwrap_or_default(),
            wait_seconds: r.wait_seconds,
            approval_id: r.approval_id.unwrap_or_default(),
            request_id: request_id(r.request_id)?,
        };
        // A call that waits for an approval may take that long.
        self.invoke_long(
            "issue a token",
            Retry::Idempotent,
            Duration::from_secs(u64::from(r.wait_seconds)),
            req,
            |ch, r| async move { identity_api(ch).issue_token(r).await },
        )
        .await
    }

    /// RFC 8693 token exchange: a token for a sub-agent, scopes only narrowing, with the
    /// actor chain in `act`.
    pub async fn exchange_token(&self, r: ExchangeRequest) -> Result<api::IssueTokenReply> {
        let req = api::ExchangeTokenRequest {
            subject_token: r.subject_token,
            actor_attestation: r.actor_attestation,
            audience: r.audience,
            scopes: r.scopes,
            ttl_seconds: r.ttl_seconds,
            dpop_proof: r.dpop_proof.unwrap_or_default(),
            context: r.context,
            request_id: request_id(r.request_id)?,
        };
        self.invoke(
            "exchange the token",
            Retry::Idempotent,
            req,
            |ch, r| async move { identity_api(ch).exchange_token(r).await },
        )
        .await
    }

    /// A confidential per-task credential for `target`: the reply is masked to a fresh
    /// key made here and unmasked here; the coordinator never sees the credential.
    pub async fn request_credential(
        &self,
        who: CredentialFor,
        target: &str,
        task_id: &str,
        context: HashMap<String, String>,
    ) -> Result<CredentialGrant> {
        let requester = Requester::new(&mut rng()?).map_err(bug)?;
        let (attestation, agent, agent_token) = match who {
            CredentialFor::Agent { attestation } => (attestation, String::new(), String::new()),
            CredentialFor::Resource { agent, agent_token } => {
                (String::new(), agent, agent_token.unwrap_or_default())
            }
        };
        let req = api::CredentialRequest {
            attestation,
            target: target.to_owned(),
            task_id: task_id.to_owned(),
            requester_public: requester.public().to_bytes().to_vec(),
            context,
            agent,
            agent_token,
        };
        let reply = self
            .invoke(
                "request the credential",
                Retry::Idempotent,
                req,
                |ch, r| async move { identity_api(ch).request_credential(r).await },
            )
            .await?;
        let shared = unmask(&requester, &reply.masked, "request the credential")?;
        let credential = tdh::derive_credential(&shared, &reply.context).map_err(bug)?;
        Ok(CredentialGrant {
            credential,
            context: reply.context,
            not_before: reply.not_before,
            not_after: reply.not_after,
            key: reply.key,
            nodes: reply.nodes,
            policy_ids: reply.policy_ids,
        })
    }

    /// Approval requests: pending ones, or with `all` also decided and expired ones.
    pub async fn list_approvals(&self, all: bool) -> Result<Vec<api::Approval>> {
        Ok(self
            .invoke(
                "list approvals",
                Retry::Idempotent,
                api::ListApprovalsRequest { all },
                |ch, r| async move { approvals_api(ch).list_approvals(r).await },
            )
            .await?
            .approvals)
    }

    /// Approves or rejects a pending request (approvers only).
    pub async fn decide_approval(
        &self,
        id: &str,
        approve: bool,
        reason: Option<String>,
        statement: Option<String>,
    ) -> Result<api::Approval> {
        let req = api::DecideApprovalRequest {
            id: id.to_owned(),
            approve,
            reason: reason.unwrap_or_default(),
            statement: statement.unwrap_or_default(),
        };
        self.invoke(
            "decide the approval",
            Retry::Unsent,
            req,
            |ch, r| async move { approvals_api(ch).decide_approval(r).await },
        )
        .await
    }

    /// Streams audit events: stored ones from `from` (if given), then new ones while
    /// `follow`. Not bounded by the client's timeout.
    pub async fn audit_tail(
        &self,
        from: Option<u64>,
        follow: bool,
    ) -> Result<tonic::Streaming<api::AuditRecord>> {
        let req = api::TailRequest {
            from_seq: from,
            follow,
        };
        // Only the reply's start is bounded: the stream runs as long as it is read.
        self.invoke(
            "tail the audit trail",
            Retry::Unsent,
            req,
            |ch, r| async move {
                audit_api(ch)
                    .tail(tonic::Request::new(r.into_inner()))
                    .await
            },
        )
        .await
    }

    /// RFC 7662 introspection: whether the token is active, and the response JSON.
    pub async fn introspect(&self, token: &str) -> Result<api::IntrospectReply> {
        let req = api::IntrospectRequest {
            token: token.to_owned(),
        };
        self.invoke(
            "introspect the token",
            Retry::Idempotent,
            req,
            |ch, r| async move { identity_api(ch).introspect(r).await },
        )
        .await
    }

    /// Revokes a token, an agent or a task; returns what was revoked.
    pub async fn revoke(&self, target: RevokeTarget) -> Result<String> {
        use api::revoke_request::Target;
        let target = match target {
            RevokeTarget::Jti(j) => Target::Jti(j),
            RevokeTarget::Agent(a) => Target::Agent(a),
            RevokeTarget::Task(t) => Target::TaskId(t),
            RevokeTarget::Token(t) => Target::Token(t),
        };
        let req = api::RevokeRequest {
            target: Some(target),
        };
        Ok(self
            .invoke("revoke", Retry::Idempotent, req, |ch, r| async move {
                identity_api(ch).revoke(r).await
            })
            .await?
            .revoked)
    }

    /// Starts a task, bound to the attested agent if an attestation is given.
    pub async fn start_task(
        &self,
        attestation: Option<String>,
        ttl_seconds: u32,
        description: String,
    ) -> Result<api::TaskInfo> {
        let req = api::StartTaskRequest {
            attestation: attestation.unwrap_or_default(),
            ttl_seconds,
            description,
        };
        self.invoke("start the task", Retry::Unsent, req, |ch, r| async move {
            identity_api(ch).start_task(r).await
        })
        .await
    }

    /// Ends a task.
    pub async fn end_task(&self, task_id: &str) -> Result<api::TaskInfo> {
        let req = api::EndTaskRequest {
            task_id: task_id.to_owned(),
        };
        self.invoke("end the task", Retry::Idempotent, req, |ch, r| async move {
            identity_api(ch).end_task(r).await
        })
        .await
    }

    /// Validates and activates a policy set: `(file name, text)` pairs.
    pub async fn apply_policy(&self, files: Vec<(String, String)>) -> Result<api::PolicyInfo> {
        let req = api::ApplyPolicyRequest {
            files: files
                .into_iter()
                .map(|(name, text)| api::PolicyFile { name, text })
                .collect(),
            bundle: String::new(),
        };
        self.invoke("apply the policy", Retry::Unsent, req, |ch, r| async move {
            identity_api(ch).apply_policy(r).await
        })
        .await
    }

    /// Applies an operator-signed policy bundle (compact JWS): every node verifies it
    /// against its own operator key first (DESIGN.md §9). The reply's `node_reports`
    /// say where each node stands.
    pub async fn apply_policy_bundle(&self, jws: &str) -> Result<api::PolicyInfo> {
        let req = api::ApplyPolicyRequest {
            files: Vec::new(),
            bundle: jws.to_owned(),
        };
        self.invoke(
            "apply the policy bundle",
            Retry::Unsent,
            req,
            |ch, r| async move { identity_api(ch).apply_policy(r).await },
        )
        .await
    }

    /// The active policy set.
    pub async fn policy(&self) -> Result<api::PolicyInfo> {
        self.invoke(
            "get the policy",
            Retry::Idempotent,
            api::GetPolicyRequest {},
            |ch, r| async move { identity_api(ch).get_policy(r).await },
        )
        .await
    }
}

/// Length of a generated request id: 16 random bytes, base64url without padding.
const REQUEST_ID_BYTES: usize = 16;

/// The caller's request id, checked (16 to 64 characters of `[A-Za-z0-9_-]`), or a
/// fresh random one.
pub(crate) fn request_id(given: Option<String>) -> Result<String> {
    use base64::Engine as _;
    use rand::Rng as _;
    match given {
        Some(id) => {
            let ok = (16..=64).contains(&id.len())
                && id
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
            if ok {
                Ok(id)
            } else {
                Err(Error::Usage(format!(
                    "request id `{id}`: expected 16 to 64 characters of [A-Za-z0-9_-] \
                     (the same on every retry of one request)"
                )))
            }
        }
        None => {
            let mut bytes = [0u8; REQUEST_ID_BYTES];
            rng()?.fill_bytes(&mut bytes);
            Ok(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids_are_fresh_or_checked() {
        let a = request_id(None).unwrap();
        let b = request_id(None).unwrap();
        assert_ne!(a, b);
        assert_eq!(a.len(), 22);
        assert_eq!(request_id(Some(a.clone())).unwrap(), a);
        for bad in ["short", "has space in it, sixteen+", &"x".repeat(65)] {
            let e = request_id(Some(bad.to_owned())).unwrap_err();
            assert_eq!(e.exit_code(), 2);
            assert!(e.to_string().contains("16 to 64"), "{e}");
        }
    }
}
