//! The identity API: access tokens for agents, introspection, revocation, tasks and
//! policy (DESIGN.md §7).

use std::collections::HashMap;

use quorate_proto::api;

use super::Client;
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
        };
        let mut c = self.identity.clone();
        self.call("issue a token", c.issue_token(self.request(req)))
            .await
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
        };
        let mut c = self.identity.clone();
        self.call("apply the policy", c.apply_policy(self.request(req)))
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
