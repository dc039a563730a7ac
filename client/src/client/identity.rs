//! The identity API: access tokens for agents, introspection, revocation, tasks and
//! policy (DESIGN.md §7).

use std::collections::HashMap;

use quorate_proto::api;

use std::time::Duration;

use quorate_crypto::tdh::{self, Requester};

use super::{Client, bug, rng, unmask};
use crate::error::Result;

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
}

impl std::fmt::Debug for ExchangeRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExchangeRequest")
            .field("subject_token", &"<redacted>")
            .field("actor_attestation", &"<redacted>")
            .field("audience", &self.audience)
            .field("scopes", &self.scopes)
            .field("ttl_seconds", &self.ttl_seconds)
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
            request_id: String::new(),
        };
        let mut c = self.identity.clone();
        // A call that waits for an approval may take that long.
        let mut call = self.request(req);
        call.set_timeout(self.timeout + Duration::from_secs(u64::from(r.wait_seconds)));
        self.call_long(
            "issue a token",
            Duration::from_secs(u64::from(r.wait_seconds)),
            c.issue_token(call),
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
            request_id: String::new(),
        };
        let mut c = self.identity.clone();
        self.call("exchange the token", c.exchange_token(self.request(req)))
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
        let mut c = self.identity.clone();
        let reply = self
            .call(
                "request the credential",
                c.request_credential(self.request(req)),
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
        let mut c = self.approvals.clone();
        Ok(self
            .call(
                "list approvals",
                c.list_approvals(self.request(api::ListApprovalsRequest { all })),
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
        let mut c = self.approvals.clone();
        self.call("decide the approval", c.decide_approval(self.request(req)))
            .await
    }

    /// Streams audit events: stored ones from `from` (if given), then new ones while
    /// `follow`. Not bounded by the client's timeout.
    pub async fn audit_tail(
        &self,
        from: Option<u64>,
        follow: bool,
    ) -> Result<tonic::Streaming<api::AuditRecord>> {
        let mut c = self.audit.clone();
        let req = tonic::Request::new(api::TailRequest {
            from_seq: from,
            follow,
        });
        self.call("tail the audit trail", c.tail(req)).await
    }

    /// RFC 7662 introspection: whether the token is active, and the response JSON.
    pub async fn introspect(&self, token: &str) -> Result<api::IntrospectReply> {
        let req = api::IntrospectRequest {
            token: token.to_owned(),
        };
        let mut c = self.identity.clone();
        self.call("introspect the token", c.introspect(self.request(req)))
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
        let mut c = self.identity.clone();
        Ok(self
            .call("revoke", c.revoke(self.request(req)))
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
        let mut c = self.identity.clone();
        self.call("start the task", c.start_task(self.request(req)))
            .await
    }

    /// Ends a task.
    pub async fn end_task(&self, task_id: &str) -> Result<api::TaskInfo> {
        let req = api::EndTaskRequest {
            task_id: task_id.to_owned(),
        };
        let mut c = self.identity.clone();
        self.call("end the task", c.end_task(self.request(req)))
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
        let mut c = self.identity.clone();
        self.call("apply the policy", c.apply_policy(self.request(req)))
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
        let mut c = self.identity.clone();
        self.call("apply the policy bundle", c.apply_policy(self.request(req)))
            .await
    }

    /// The active policy set.
    pub async fn policy(&self) -> Result<api::PolicyInfo> {
        let mut c = self.identity.clone();
        self.call(
            "get the policy",
            c.get_policy(self.request(api::GetPolicyRequest {})),
        )
        .await
    }
}
