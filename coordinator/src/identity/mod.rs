//! The agent identity plane (DESIGN.md §7): attestation in, Cedar-decided, task-scoped
//! ES256 access tokens out — signed by the threshold cluster, never by a local key —
//! with tasks, revocation and introspection that take effect at once.
//!
//! [`IdentityPlane`] holds the logic; [`service`] serves it over gRPC and [`http`] serves
//! discovery, the JWKS, introspection and revocation over HTTPS.
//!
//! # Deprovisioning
//!
//! Revocation by agent (`quorate token revoke --agent S`, [`IdentityPlane::revoke_agent`])
//! deprovisions the agent subject `S` at a time `T`, durably, the way deleting a SPIRE
//! registration entry or disabling a Vault entity does: the identity is gone, not just
//! its current tokens.
//! - Every token in which `S` takes part and that was issued at or before `T` — as `sub`,
//!   as `client_id`, or anywhere in the `act` chain — is dead: introspection answers
//!   `active: false` and token exchange refuses it as a subject token.
//! - From `T` on, every request from or for `S` is refused, naming the deprovisioning:
//!   issuing a token; starting a task bound to `S`; approving `S`'s pending request (an
//!   approver may still reject it); a confidential credential, whether `S` asks or a
//!   resource client derives `S`'s; token exchange with `S` as the subject, the actor, or
//!   an earlier actor of the chain. A request that was waiting for approval is checked
//!   again once approved.
//! - It does not lapse: there is no expiry, and a coordinator restart keeps it. This
//!   version has no way to lift it; an agent that is to come back gets a new identity
//!   (another OIDC `sub` or SPIFFE ID), which is what a compromised identity needs anyway.

pub mod approval;
pub mod http;
pub mod retry;
pub mod service;
pub mod store;
pub mod token;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use quorate_crypto::keys::KeyPublic;
use sha2::Digest as _;

use crate::audit::AuditLog;
use crate::audit::record::{Fields, Outcome};
use crate::authn::{Attestation, AuthMethod, Authenticator, AuthnError};
use crate::cluster::{Cluster, CoordError};
use quorate_proto::fragment::TokenEvidence;

use crate::policy::{
    Action, Decision, PolicyContext, PolicyEngine, PolicyInfo, PolicyRequest, Principal, Resource,
};
use store::{IdentityStore, OneUse, Task};
use token::{AccessClaims, Actor, AttestationClaim, Confirmation, TokenError};

/// Longest token lifetime the service ever issues, whatever policy says (24 h).
pub const HARD_MAX_TTL_SECONDS: u64 = 24 * 3600;
/// Longest task.
pub const MAX_TASK_TTL_SECONDS: u64 = 7 * 24 * 3600;
/// Most scopes in one request.
pub const MAX_SCOPES: usize = 32;
/// Most actors in a delegation chain.
pub const MAX_DELEGATION_DEPTH: usize = 8;
/// How old a DPoP proof may be (RFC 9449 §11.1).
pub const DPOP_MAX_AGE_SECONDS: i64 = 60;

/// Where the HTTPS listener serves the checkpoint JWKS (below the issuer URL).
pub const CHECKPOINT_JWKS_PATH: &str = "/checkpoint-jwks.json";

/// Identity-plane settings.
#[derive(Clone, Debug)]
pub struct IdentityConfig {
    /// Our issuer URL (`iss` of every token; discovery lives under it).
    pub issuer: String,
    /// The cluster's trust domain (agent subjects live under it).
    pub domain: String,
    /// The name of the signing key for tokens.
    pub signing_key: String,
    /// The name of the derivation key for confidential credentials.
    pub credential_key: String,
    /// How long a request waits for a human approval before it expires.
    pub approval_ttl_seconds: i64,
    /// The operator's public key (`--operator-public-key`): policy then comes only from
    /// bundles it signed, and approvals are statements signed by the bundle's approvers
    /// (DESIGN.md §9).
    pub operator_key: Option<p256::PublicKey>,
}

/// Why a request was refused.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// The attestation did not verify.
    #[error("attestation refused: {0}")]
    Unauthenticated(#[from] AuthnError),
    /// Policy or a revocation said no.
    #[error("{0}")]
    Denied(String),
    /// Malformed request.
    #[error("{0}")]
    Invalid(String),
    /// No such task.
    #[error("{0}")]
    NotFound(String),
    /// The service is not set up for this (no signing key, …).
    #[error("{0}")]
    Precondition(String),
    /// The cluster failed.
    #[error(transparent)]
    Cluster(#[from] CoordError),
    /// Local storage failed.
    #[error("{0}")]
    Store(String),
    /// The audit trail refused the event: the request fails closed.
    #[error(transparent)]
    Audit(#[from] crate::audit::AuditError),
}

impl IdentityError {
    /// The audit outcome of a refusal: `deny` for the caller's fault or policy's, `error`
    /// for the service's.
    fn outcome(&self) -> Outcome {
        match self {
            IdentityError::Unauthenticated(_)
            | IdentityError::Denied(_)
            | IdentityError::Invalid(_)
            | IdentityError::NotFound(_) => Outcome::Deny,
            _ => Outcome::Error,
        }
    }
}

impl From<approval::ApprovalError> for IdentityError {
    fn from(e: approval::ApprovalError) -> Self {
        match e {
            approval::ApprovalError::Unknown(_) => IdentityError::NotFound(e.to_string()),
            approval::ApprovalError::Store(_) => IdentityError::Store(e.to_string()),
            _ => IdentityError::Denied(e.to_string()),
        }
    }
}

impl From<store::IdentityStoreError> for IdentityError {
    fn from(e: store::IdentityStoreError) -> Self {
        IdentityError::Store(e.to_string())
    }
}

impl From<IdentityError> for tonic::Status {
    fn from(e: IdentityError) -> Self {
        let msg = e.to_string();
        match e {
            IdentityError::Unauthenticated(_) => tonic::Status::unauthenticated(msg),
            IdentityError::Denied(_) => tonic::Status::permission_denied(msg),
            IdentityError::Invalid(_) => tonic::Status::invalid_argument(msg),
            IdentityError::NotFound(_) => tonic::Status::not_found(msg),
            IdentityError::Precondition(_) => tonic::Status::failed_precondition(msg),
            IdentityError::Cluster(c) => c.into(),
            IdentityError::Store(_) | IdentityError::Audit(_) => tonic::Status::unavailable(msg),
        }
    }
}

type Result<T> = core::result::Result<T, IdentityError>;

/// A token request after authentication.
#[derive(Debug)]
pub struct TokenRequest {
    /// Who the agent is.
    pub agent: Attestation,
    /// The audience.
    pub audience: String,
    /// Requested scopes.
    pub scopes: Vec<String>,
    /// Requested lifetime.
    pub ttl_seconds: u64,
    /// The task, if any.
    pub task_id: Option<String>,
    /// Extra policy context (`environment`, `tool`, `data_sensitivity`).
    pub context: BTreeMap<String, String>,
    /// The cluster client that asked, if any (for the audit trail).
    pub caller: Option<String>,
    /// An RFC 9449 DPoP proof for the token endpoint: the token is bound to its key.
    pub dpop_proof: Option<String>,
    /// How long to wait for a human approval, if policy asks for one.
    pub wait: std::time::Duration,
    /// Polls this pending approval.
    pub approval_id: Option<String>,
    /// Makes the request safe to retry ([`retry`]).
    pub retry: Option<retry::Retry>,
}

/// What an issuance request came to.
#[derive(Debug)]
pub enum IssueOutcome {
    /// A token.
    Issued(Box<Issued>),
    /// Waiting for a human approval: poll with the id.
    Pending {
        /// The approval id.
        id: String,
        /// When the approval request expires (unix seconds).
        expires_at: i64,
    },
}

/// A token exchange (RFC 8693) after the actor is authenticated. Its `Debug` leaves
/// the subject token out.
pub struct ExchangeRequest {
    /// The delegating agent's Quorate token.
    pub subject_token: String,
    /// The sub-agent.
    pub actor: Attestation,
    /// The audience (empty: the subject token's).
    pub audience: String,
    /// Scopes (empty: all of the subject token's).
    pub scopes: Vec<String>,
    /// Requested lifetime.
    pub ttl_seconds: u64,
    /// A DPoP proof; required if the subject token is DPoP-bound.
    pub dpop_proof: Option<String>,
    /// Extra policy context.
    pub context: BTreeMap<String, String>,
    /// The cluster client that asked, if any.
    pub caller: Option<String>,
    /// Makes the exchange safe to retry ([`retry`]).
    pub retry: Option<retry::Retry>,
}

impl std::fmt::Debug for ExchangeRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExchangeRequest")
            .field("subject_token", &"<redacted>")
            .field("actor", &self.actor.subject)
            .field("audience", &self.audience)
            .field("scopes", &self.scopes)
            .field("ttl_seconds", &self.ttl_seconds)
            .field("caller", &self.caller)
            .finish_non_exhaustive()
    }
}

/// Who asks for a credential.
#[derive(Debug)]
pub enum CredentialRequester {
    /// The agent itself.
    Agent(Attestation),
    /// A resource client that derives an agent's credential to check it.
    Resource {
        /// The client's name.
        client: String,
        /// The agent's subject.
        agent: String,
        /// The agent's access token for the task, which the agent presented to the
        /// resource: the evidence nodes that check evidence need.
        agent_token: Option<String>,
    },
}

/// A confidential credential request.
#[derive(Debug)]
pub struct CredentialAsk {
    /// Who asks.
    pub requester: CredentialRequester,
    /// The cluster client that made the call, if any.
    pub caller: Option<String>,
    /// The target.
    pub target: String,
    /// The task.
    pub task_id: String,
    /// The requester's ephemeral key `A`.
    pub requester_public: quorate_crypto::Point,
    /// Extra policy context.
    pub context: BTreeMap<String, String>,
}

/// A credential, masked to the requester.
#[derive(Debug)]
pub struct CredentialGrant {
    /// The masked DH response (`DhResponse` encoding).
    pub masked: Vec<u8>,
    /// The canonical context: the HKDF info.
    pub context: Vec<u8>,
    /// Validity window (the task's), unix seconds.
    pub not_before: i64,
    /// End of the window.
    pub not_after: i64,
    /// The derivation key.
    pub key: String,
    /// The nodes that answered.
    pub nodes: Vec<u16>,
    /// The policies that allowed it.
    pub policy_ids: Vec<String>,
}

/// An issued token.
#[derive(Debug)]
pub struct Issued {
    /// The compact JWS.
    pub token: String,
    /// Its claims.
    pub claims: AccessClaims,
    /// The signing key version's kid.
    pub kid: String,
    /// The policies that permitted it.
    pub policy_ids: Vec<String>,
    /// The fragment nodes that signed it.
    pub nodes: Vec<u16>,
}

/// The identity plane.
pub struct IdentityPlane {
    cluster: Arc<Cluster>,
    policy: Arc<PolicyEngine>,
    authn: Arc<Authenticator>,
    store: Box<dyn IdentityStore>,
    cfg: IdentityConfig,
    rng: Mutex<rand::rngs::StdRng>,
    audit: Arc<AuditLog>,
    approvals: approval::Approvals,
}

/// Unix seconds now.
pub fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

impl IdentityPlane {
    /// Wires the plane together.
    pub fn new(
        cluster: Arc<Cluster>,
        policy: Arc<PolicyEngine>,
        authn: Arc<Authenticator>,
        store: Box<dyn IdentityStore>,
        cfg: IdentityConfig,
        audit: Arc<AuditLog>,
    ) -> std::result::Result<Self, String> {
        use rand::SeedableRng as _;
        let rng = rand::rngs::StdRng::try_from_rng(&mut rand::rngs::SysRng)
            .map_err(|e| format!("system RNG failed: {e}"))?;
        let authn = with_client_assertion_audiences(authn, &cfg.issuer);
        Ok(IdentityPlane {
            cluster,
            policy,
            authn,
            store,
            cfg,
            rng: Mutex::new(rng),
            audit,
            approvals: approval::Approvals::default(),
        })
    }

    /// The audit trail.
    pub fn audit(&self) -> &Arc<AuditLog> {
        &self.audit
    }

    /// Our issuer URL.
    pub fn issuer(&self) -> &str {
        &self.cfg.issuer
    }

    /// The trust domain.
    pub fn domain(&self) -> &str {
        &self.cfg.domain
    }

    /// The policy engine.
    pub fn policy(&self) -> &Arc<PolicyEngine> {
        &self.policy
    }

    /// The authenticator.
    pub fn authn(&self) -> &Arc<Authenticator> {
        &self.authn
    }

    /// The settings.
    pub fn config(&self) -> &IdentityConfig {
        &self.cfg
    }

    fn random_id(&self) -> Result<String> {
        let mut rng = self
            .rng
            .lock()
            .map_err(|_| IdentityError::Store("RNG lock poisoned".into()))?;
        Ok(token::new_jti(&mut *rng))
    }

    fn random_bytes(&self) -> Result<[u8; 16]> {
        let mut rng = self
            .rng
            .lock()
            .map_err(|_| IdentityError::Store("RNG lock poisoned".into()))?;
        let mut b = [0u8; 16];
        rand::Rng::fill_bytes(&mut *rng, &mut b);
        Ok(b)
    }

    /// Every token key version a verifier may meet: current ones and those retired
    /// less than their maximum token lifetime ago.
    fn verification_keys(&self) -> Result<Vec<KeyPublic>> {
        Ok(self
            .cluster
            .jwks_keys(now())?
            .into_iter()
            .map(|k| k.public)
            .collect())
    }

    /// The issuer's JWKS document: token keys only (DESIGN.md invariant 7).
    pub fn jwks(&self) -> Result<serde_json::Value> {
        let keys: Vec<serde_json::Value> =
            self.verification_keys()?.iter().map(token::jwk).collect();
        Ok(serde_json::json!({ "keys": keys }))
    }

    /// The checkpoint JWKS document ([`CHECKPOINT_JWKS_PATH`]): every version of every
    /// checkpoint key, for `quorate audit verify`. Never the issuer's JWKS, so that no
    /// token verifier trusts a checkpoint key.
    pub fn checkpoint_jwks(&self) -> Result<serde_json::Value> {
        let keys: Vec<serde_json::Value> = self
            .cluster
            .checkpoint_jwks_keys()?
            .iter()
            .map(|k| token::jwk(&k.public))
            .collect();
        Ok(serde_json::json!({ "keys": keys }))
    }

    /// Decides `req` and notes the deciding policies in `trail`, whatever the outcome;
    /// a refusal names them.
    fn decide_noted(&self, req: &PolicyRequest, trail: &mut Fields) -> Result<Decision> {
        let d = self.policy.decide(req);
        trail.policy_ids = d.policy_ids.clone();
        if d.allowed { Ok(d) } else { Err(denial(&d)) }
    }

    /// Appends the outcome of a request to the audit trail before it is answered: the
    /// result passes through only if the event is durable (fail closed).
    async fn record<T: Audited>(&self, result: Result<T>, mut trail: Fields) -> Result<T> {
        let outcome = match &result {
            Ok(v) => v.outcome(),
            Err(e) => {
                trail.reason = Some(e.to_string());
                e.outcome()
            }
        };
        if let Ok(v) = &result {
            v.note(&mut trail);
        }
        self.audit.append(outcome, trail).await?;
        result
    }

    /// Records a refusal that happened before a request reached the plane (an
    /// attestation that did not verify, a caller that may not use this API) and returns
    /// it.
    pub async fn refuse(
        &self,
        kind: &str,
        action: Action,
        caller: Option<&str>,
        error: IdentityError,
    ) -> IdentityError {
        let trail = Fields {
            kind: kind.to_owned(),
            action: action.as_str().to_owned(),
            caller: caller.map(str::to_owned),
            ..Fields::default()
        };
        self.record_refusal(error, trail).await
    }

    /// Records a refusal; returns it, or the audit failure if it could not be recorded.
    async fn record_refusal(&self, error: IdentityError, trail: Fields) -> IdentityError {
        match self.record::<()>(Err(error), trail).await {
            Err(e) => e,
            Ok(()) => IdentityError::Store("internal error: a refusal passed".into()),
        }
    }

    /// The audit fields every agent request starts with.
    fn trail(
        &self,
        kind: &str,
        action: Action,
        caller: Option<&str>,
        agent: &Attestation,
    ) -> Fields {
        Fields {
            kind: kind.to_owned(),
            action: action.as_str().to_owned(),
            subject: Some(agent.subject.clone()),
            caller: caller.map(str::to_owned),
            authn_method: Some(agent.method.to_string()),
            attestation_issuer: Some(agent.issuer.clone()),
            ..Fields::default()
        }
    }

    /// Admin actions by a cluster client: allowed only if policy permits `admin` on the
    /// cluster for `Client::"<name>"`. A refusal is audited as `what`.
    pub async fn require_admin(&self, client: &str, what: &str) -> Result<Decision> {
        self.require_client(client, Action::Admin, what).await
    }

    async fn require_client(&self, client: &str, action: Action, what: &str) -> Result<Decision> {
        let req = PolicyRequest {
            principal: Principal::Client {
                name: client.to_owned(),
            },
            action,
            resource: Resource::Cluster,
            context: base_context(now()),
        };
        let mut trail = Fields {
            kind: "admin".into(),
            action: what.to_owned(),
            caller: Some(client.to_owned()),
            resource: Some(Resource::Cluster.to_string()),
            ..Fields::default()
        };
        match self.decide_noted(&req, &mut trail) {
            Ok(d) => Ok(d),
            Err(e) => Err(self.record_refusal(e, trail).await),
        }
    }

    /// Records an administrative decision (a policy change).
    pub async fn record_admin(
        &self,
        kind: &str,
        action: &str,
        caller: &str,
        outcome: Outcome,
        fill: impl FnOnce(&mut Fields),
    ) -> Result<()> {
        let mut trail = Fields {
            kind: kind.to_owned(),
            action: action.to_owned(),
            caller: Some(caller.to_owned()),
            ..Fields::default()
        };
        fill(&mut trail);
        self.audit.append(outcome, trail).await?;
        Ok(())
    }

    /// Authenticates an attestation JWT: an OIDC JWT, a JWT-SVID, or a registered
    /// client's assertion, which authenticates one request only (its `jti` is
    /// remembered until it expires).
    pub async fn authenticate(&self, attestation: &str) -> Result<Attestation> {
        self.authenticate_for(attestation, None).await
    }

    /// [`Self::authenticate`] for a retry-safe request: a client assertion it already
    /// spent is accepted again for it (its retries), never for another request.
    pub async fn authenticate_for(
        &self,
        attestation: &str,
        retry: Option<&retry::Retry>,
    ) -> Result<Attestation> {
        if attestation.trim().is_empty() {
            return Err(IdentityError::Invalid(
                "no attestation: pass the agent's OIDC JWT, JWT-SVID or client assertion".into(),
            ));
        }
        let agent = self.authn.verify_jwt(attestation.trim()).await?;
        if agent.method == AuthMethod::PrivateKeyJwt {
            let now = now();
            let jti = agent.jti.as_deref().unwrap_or_default();
            // Valid until `exp` plus the leeway the verifier allows.
            let until = agent
                .expires_at
                .unwrap_or(now)
                .saturating_add(i64::try_from(crate::authn::LEEWAY_SECONDS).unwrap_or(0));
            if !self.store.first_use(
                OneUse::ClientAssertion,
                &agent.external_subject,
                jti,
                owner(retry),
                until,
                now,
            )? {
                return Err(AuthnError::ClientAssertion(format!(
                    "jti `{}` of client `{}` was already used: sign a new assertion, with a new jti, for every request (RFC 7523 §3 item 7)",
                    jti.escape_debug(),
                    agent.external_subject
                ))
                .into());
            }
        }
        Ok(agent)
    }

    /// Issues a token: checks deprovisioning and the task, asks policy (waiting for a
    /// human if policy says so), caps the lifetime (policy, key rules, task end), binds
    /// it to a DPoP key if asked, has the cluster sign it, and records the decision in
    /// the audit trail before answering.
    pub async fn issue(&self, req: TokenRequest) -> Result<IssueOutcome> {
        let mut trail = self.trail(
            "token",
            Action::IssueToken,
            req.caller.as_deref(),
            &req.agent,
        );
        trail.resource = Some(Resource::Audience(req.audience.clone()).to_string());
        trail.context = request_context(&req.scopes, req.ttl_seconds, &req.context);
        trail.task_id = req.task_id.clone();
        trail.approval_id = req.approval_id.clone();
        let result = self.issue_inner(&req, &mut trail).await;
        self.record(result, trail).await
    }

    /// Starts or finds the record of a retry-safe request: `Some` answer if an earlier
    /// attempt already gave one (the same token, not signed again).
    fn begin_retry(
        &self,
        retry: Option<&retry::Retry>,
        now: i64,
        trail: &mut Fields,
    ) -> Result<Option<Issued>> {
        let Some(r) = retry else {
            return Ok(None);
        };
        trail
            .context
            .insert("request_id".into(), r.request_id.clone());
        let rec = self.store.issuance_begin(
            &r.key,
            &r.digest,
            now.saturating_add(retry::RETRY_WINDOW_SECONDS),
        )?;
        if rec.digest != r.digest {
            return Err(r.reused());
        }
        let Some(reply) = rec.reply else {
            return Ok(None);
        };
        trail.context.insert(
            "retry".into(),
            "answered with the token an earlier attempt issued".into(),
        );
        let mut issued = decode_issued(&r.open(&reply)?)?;
        // Nothing was signed for this answer.
        issued.nodes.clear();
        Ok(Some(issued))
    }

    /// The claims of a retry-safe request: the first chosen by any attempt.
    fn retry_claims(
        &self,
        retry: Option<&retry::Retry>,
        claims: AccessClaims,
    ) -> Result<AccessClaims> {
        let Some(r) = retry else {
            return Ok(claims);
        };
        let mine = serde_json::to_string(&claims)
            .map_err(|e| IdentityError::Invalid(format!("token claims: {e}")))?;
        let stored = self.store.issuance_claims(&r.key, &mine)?;
        serde_json::from_str(&stored).map_err(|e| {
            IdentityError::Store(format!("request {}: stored claims: {e}", r.request_id))
        })
    }

    /// The answer of a retry-safe request: the first recorded by any attempt.
    fn retry_answer(&self, retry: Option<&retry::Retry>, issued: Issued) -> Result<Issued> {
        let Some(r) = retry else {
            return Ok(issued);
        };
        let mut nonce = [0u8; 12];
        nonce.copy_from_slice(&self.random_bytes()?[..12]);
        let mine = r.seal(&encode_issued(&issued)?, nonce)?;
        let stored = self.store.issuance_reply(&r.key, &mine)?;
        if stored == mine {
            return Ok(issued);
        }
        // Another attempt answered first: give the same answer.
        let mut first = decode_issued(&r.open(&stored)?)?;
        first.nodes.clear();
        Ok(first)
    }

    async fn issue_inner(&self, req: &TokenRequest, trail: &mut Fields) -> Result<IssueOutcome> {
        let now = now();
        if let Some(answered) = self.begin_retry(req.retry.as_ref(), now, trail)? {
            return Ok(IssueOutcome::Issued(Box::new(answered)));
        }
        let agent = &req.agent;
        self.not_deprovisioned(&agent.subject)?;
        validate_audience(&req.audience)?;
        validate_scopes(&req.scopes)?;
        validate_ttl(req.ttl_seconds)?;
        if let Some(id) = &req.task_id {
            self.running_task(id, &agent.subject, now)?;
        }
        let jkt = match &req.dpop_proof {
            Some(proof) => Some(self.check_dpop(proof, now, None, req.retry.as_ref())?),
            None => None,
        };
        let context = PolicyContext {
            scopes: req.scopes.clone(),
            ttl_seconds: req.ttl_seconds,
            task: req.task_id.clone(),
            ..base_context(now)
        }
        .with_pairs(&req.context)
        .map_err(IdentityError::Invalid)?;
        let resource = Resource::Audience(req.audience.clone());
        let decision = self.decide_noted(
            &PolicyRequest {
                principal: principal_of(agent),
                action: Action::IssueToken,
                resource: resource.clone(),
                context,
            },
            trail,
        )?;
        check_ttl_cap(&decision, req.ttl_seconds)?;
        if decision.approval_required {
            let pending = approval::Request {
                agent: agent.subject.clone(),
                action: Action::IssueToken.as_str().to_owned(),
                resource: resource.to_string(),
                scopes: req.scopes.clone(),
                ttl_seconds: req.ttl_seconds,
                task_id: req.task_id.clone(),
                context: req.context.clone(),
                jkt: jkt.clone(),
            };
            let id = match &req.approval_id {
                Some(id) => id.clone(),
                None => {
                    self.open_approval(pending.clone(), &decision, req.caller.as_deref())
                        .await?
                }
            };
            trail.approval_id = Some(id.clone());
            if let Some(expires_at) = self
                .await_approval(&id, &pending, req.wait, owner(req.retry.as_ref()))
                .await?
            {
                return Ok(IssueOutcome::Pending { id, expires_at });
            }
            // The wait may have been long: the agent (and, in `issue_signed`, its task)
            // must still be live, and the token's lifetime starts now.
            self.not_deprovisioned(&agent.subject)?;
            let now = self::now();
            return self.issue_signed(req, &decision, trail, now, jkt).await;
        } else if let Some(id) = &req.approval_id {
            return Err(IdentityError::Invalid(format!(
                "approval {id} given, but policy does not ask for approval of this request"
            )));
        }
        self.issue_signed(req, &decision, trail, now, jkt).await
    }

    /// Builds the claims of an allowed request (lifetime capped by its task), spends its
    /// approval if it had one, and has the cluster sign them.
    async fn issue_signed(
        &self,
        req: &TokenRequest,
        decision: &Decision,
        trail: &Fields,
        now: i64,
        jkt: Option<String>,
    ) -> Result<IssueOutcome> {
        let agent = &req.agent;
        let task = match &req.task_id {
            None => None,
            Some(id) => Some(self.running_task(id, &agent.subject, now)?),
        };
        let ttl = i64::try_from(req.ttl_seconds).unwrap_or(i64::MAX);
        let mut exp = now.saturating_add(ttl);
        if let Some(t) = &task {
            // A token never outlives its task.
            exp = exp.min(t.expires_at);
        }
        let claims = AccessClaims {
            iss: self.cfg.issuer.clone(),
            sub: agent.subject.clone(),
            aud: req.audience.clone(),
            client_id: agent.subject.clone(),
            iat: now,
            nbf: now,
            exp,
            jti: self.random_id()?,
            scope: req.scopes.join(" "),
            task_id: req.task_id.clone(),
            attestation: attestation_claim(agent),
            act: None,
            cnf: jkt.map(|jkt| Confirmation { jkt }),
        };
        let claims = self.retry_claims(req.retry.as_ref(), claims)?;
        let mut statement = None;
        if decision.approval_required
            && let Some(id) = &trail.approval_id
        {
            // Spent before signing, so that two polls cannot both get a token (the
            // retries of one request share it: they sign one set of claims).
            statement = self
                .approvals
                .take(&*self.store, id, owner(req.retry.as_ref()))?;
        }
        let evidence = TokenEvidence {
            approval: statement.unwrap_or_default(),
            ..evidence_of(agent, None, decision, req.ttl_seconds, &req.context)
        };
        let issued = self
            .sign(claims, decision.policy_ids.clone(), evidence)
            .await?;
        Ok(IssueOutcome::Issued(Box::new(
            self.retry_answer(req.retry.as_ref(), issued)?,
        )))
    }

    /// Refuses a deprovisioned agent (see the [module docs](self#deprovisioning)).
    fn not_deprovisioned(&self, subject: &str) -> Result<()> {
        match self.store.agent_revoked_at(subject)? {
            Some(at) => Err(IdentityError::Denied(format!(
                "agent {subject} was deprovisioned at {at}; it gets nothing"
            ))),
            None => Ok(()),
        }
    }

    /// Verifies a DPoP proof for the token endpoint (`POST <issuer>/token`), or for the
    /// token `ath` names, refuses a replayed one, and returns its key's thumbprint.
    fn check_dpop(
        &self,
        proof: &str,
        now: i64,
        access_token: Option<&str>,
        retry: Option<&retry::Retry>,
    ) -> Result<String> {
        let htu = format!("{}/token", self.cfg.issuer);
        let p = quorate_proto::dpop::verify(
            proof.trim(),
            &quorate_proto::dpop::Expect {
                htm: "POST",
                htu: &htu,
                now,
                max_age_seconds: DPOP_MAX_AGE_SECONDS,
                access_token,
            },
        )
        .map_err(|e| IdentityError::Invalid(format!("DPoP proof refused: {e}")))?;
        let until = p.iat.saturating_add(DPOP_MAX_AGE_SECONDS);
        if !self
            .store
            .first_use(OneUse::DpopProof, &p.jkt, &p.jti, owner(retry), until, now)?
        {
            return Err(IdentityError::Invalid(
                "DPoP proof refused: its jti was already used (RFC 9449 §11.1); make a fresh proof"
                    .into(),
            ));
        }
        Ok(p.jkt)
    }

    async fn open_approval(
        &self,
        request: approval::Request,
        decision: &Decision,
        caller: Option<&str>,
    ) -> Result<String> {
        let id = format!("apr-{}", hex::encode(self.random_bytes()?));
        let p = approval::Approvals::pending(
            id.clone(),
            request,
            decision.policy_ids.clone(),
            now(),
            self.cfg.approval_ttl_seconds,
        );
        self.audit
            .append(Outcome::Pending, approval_fields(&p, "request", caller))
            .await?;
        self.approvals.insert(&*self.store, p.clone())?;
        tracing::info!(approval = %id, agent = %p.request.agent, "request waits for approval");
        Ok(id)
    }

    /// Waits up to `wait` for approval `id`: `None` once approved, `Some(expiry)` if
    /// still pending; an error if it was rejected, expired or used.
    async fn await_approval(
        &self,
        id: &str,
        request: &approval::Request,
        wait: std::time::Duration,
        owner: &str,
    ) -> Result<Option<i64>> {
        let deadline = tokio::time::Instant::now() + wait.min(approval::MAX_WAIT);
        loop {
            self.sweep_approvals().await?;
            let (p, changed) = self.approvals.get(&*self.store, id, request)?;
            match p.state {
                approval::State::Approved => return Ok(None),
                approval::State::Pending => {}
                approval::State::Rejected => {
                    return Err(IdentityError::Denied(format!(
                        "approval {id} was rejected by {}{}",
                        p.decided_by.as_deref().unwrap_or("an approver"),
                        p.reason.map(|r| format!(": {r}")).unwrap_or_default()
                    )));
                }
                approval::State::Expired => {
                    return Err(IdentityError::Denied(format!(
                        "approval {id} expired at {} before an approver decided",
                        p.expires_at
                    )));
                }
                approval::State::Used
                    if !owner.is_empty() && p.used_by.as_deref() == Some(owner) =>
                {
                    // A retry of the request that used it.
                    return Ok(None);
                }
                approval::State::Used => {
                    return Err(IdentityError::Denied(format!(
                        "approval {id} was already used"
                    )));
                }
            }
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                return Ok(Some(p.expires_at));
            }
            // A decision on another coordinator is seen at the next look.
            let step = left.min(approval::POLL);
            let _ = tokio::time::timeout(step, changed.notified()).await;
        }
    }

    /// Expires due approval requests and records each in the audit trail.
    pub async fn sweep_approvals(&self) -> Result<()> {
        for p in self.approvals.expire_due(&*self.store, now())? {
            self.audit
                .append(Outcome::Expired, approval_fields(&p, "expire", None))
                .await?;
        }
        Ok(())
    }

    /// Approval requests (pending only unless `all`), for an approver.
    pub async fn list_approvals(&self, caller: &str, all: bool) -> Result<Vec<approval::Pending>> {
        self.require_client(caller, Action::Approve, "list_approvals")
            .await?;
        self.sweep_approvals().await?;
        Ok(self.approvals.list(&*self.store, all)?)
    }

    /// An approver approves or rejects a pending request.
    pub async fn decide_approval(
        &self,
        caller: &str,
        id: &str,
        approve: bool,
        reason: Option<String>,
        statement: Option<String>,
    ) -> Result<approval::Pending> {
        let what = if approve { "approve" } else { "reject" };
        let d = self.require_client(caller, Action::Approve, what).await?;
        self.sweep_approvals().await?;
        let statement = match (approve, statement.filter(|s| !s.trim().is_empty())) {
            (false, _) => None,
            (true, given) => self.check_statement(id, given)?,
        };
        let outcome = if approve {
            Outcome::Approved
        } else {
            Outcome::Rejected
        };
        // The event is appended (a short blocking commit, under the approvals lock)
        // before the decision wakes the waiting request.
        let decided = self.approvals.decide(
            &*self.store,
            id,
            approve,
            caller,
            reason,
            statement,
            now(),
            |p| {
                if approve {
                    // A deprovisioned agent gets nothing, approved or not; rejecting its
                    // request stays possible.
                    self.not_deprovisioned(&p.request.agent).map_err(|e| {
                        IdentityError::Denied(format!("approval {id} cannot be approved: {e}"))
                    })?;
                }
                let mut fields = approval_fields(p, what, Some(caller));
                fields.policy_ids = d.policy_ids.clone();
                self.audit
                    .append_blocking(outcome, fields)
                    .map(|_| ())
                    .map_err(IdentityError::from)
            },
        );
        let p = match decided {
            Ok(p) => p,
            Err(e @ IdentityError::Audit(_)) => return Err(e),
            Err(e) => {
                let trail = Fields {
                    kind: "approval".into(),
                    action: what.into(),
                    caller: Some(caller.to_owned()),
                    approval_id: Some(id.to_owned()),
                    policy_ids: d.policy_ids,
                    ..Fields::default()
                };
                return Err(self.record_refusal(e, trail).await);
            }
        };
        tracing::info!(approval = %id, approver = %caller, approve, "approval decided");
        Ok(p)
    }

    /// Under a signed bundle, an approval must be a statement signed by one of the
    /// bundle's approvers that matches the pending request exactly (the nodes check it
    /// again); without one, a statement is refused as meaningless.
    fn check_statement(&self, id: &str, given: Option<String>) -> Result<Option<String>> {
        let Some(bundle) = self.policy.bundle() else {
            return match given {
                None => Ok(None),
                Some(_) => Err(IdentityError::Invalid(
                    "an approval statement was given, but policy comes from no signed bundle, so nothing would check it".into(),
                )),
            };
        };
        let Some(jws) = given else {
            return Err(IdentityError::Denied(format!(
                "policy bundle {} is in force: approving needs a statement signed by one of its approvers ({}); sign it with `quorate approval approve {id} --approver-key FILE`",
                bundle.id(),
                bundle
                    .approvers()
                    .keys()
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        };
        let st = quorate_authz::bundle::ApprovalStatement::verify(
            &jws,
            &bundle,
            now(),
            quorate_proto::rules::CLOCK_SKEW_SECONDS,
        )
        .map_err(|e| IdentityError::Denied(e.to_string()))?;
        let pending = self
            .approvals
            .peek(&*self.store, id)?
            .ok_or_else(|| IdentityError::NotFound(format!("no approval request {id}")))?;
        pending
            .request
            .matches(id, &st)
            .map_err(IdentityError::Denied)?;
        Ok(Some(jws))
    }

    /// Applies an operator-signed policy bundle: verified here when the coordinator
    /// knows the operator key, then installed on every node (each verifies it against
    /// its own operator key), and activated here only if no node refused it. Returns
    /// the active set's info and one line per node.
    pub async fn apply_bundle(&self, caller: &str, jws: &str) -> Result<(PolicyInfo, Vec<String>)> {
        let mut trail = self.admin_trail("policy", "apply_policy", caller);
        let result = self.apply_bundle_inner(caller, jws, &mut trail).await;
        match result {
            Ok(ok) => {
                trail.reason = Some(format!(
                    "bundle {}",
                    ok.0.bundle.clone().unwrap_or_default()
                ));
                self.audit
                    .append(Outcome::Allow, trail)
                    .await
                    .map_err(IdentityError::from)?;
                Ok(ok)
            }
            Err(e) => Err(self.record_refusal(e, trail).await),
        }
    }

    async fn apply_bundle_inner(
        &self,
        caller: &str,
        jws: &str,
        trail: &mut Fields,
    ) -> Result<(PolicyInfo, Vec<String>)> {
        let d = self
            .require_client(caller, Action::Admin, "apply_policy")
            .await?;
        trail.policy_ids = d.policy_ids;
        let Some(operator) = &self.cfg.operator_key else {
            return Err(IdentityError::Precondition(
                "this coordinator takes no signed bundles: start it with --operator-public-key"
                    .into(),
            ));
        };
        let bundle = quorate_authz::bundle::PolicyBundle::verify(jws, operator)
            .map_err(|e| IdentityError::Denied(e.to_string()))?;
        // Compile it before any node sees it, and refuse a rollback here too.
        PolicyEngine::from_bundle(bundle.clone())
            .map_err(|e| IdentityError::Invalid(e.to_string()))?;
        if let Some(held) = self.policy.bundle() {
            held.may_move_to(&bundle)
                .map_err(|e| IdentityError::Denied(e.to_string()))?;
        }
        let reports = self.cluster.install_policy(bundle.id(), bundle.jws()).await;
        let refused: Vec<String> = reports
            .iter()
            .filter_map(|(i, r)| match r {
                crate::cluster::BundleReport::Refused(why) => Some(format!("node {i}: {why}")),
                _ => None,
            })
            .collect();
        let lines = reports
            .iter()
            .map(|(i, r)| match r {
                crate::cluster::BundleReport::Holds(id) => format!("node {i}: holds {id}"),
                crate::cluster::BundleReport::NotEnforcing => {
                    format!("node {i}: checks no signed policy (no operator key in its ceiling)")
                }
                crate::cluster::BundleReport::Refused(why) => format!("node {i}: refused: {why}"),
                crate::cluster::BundleReport::Unreachable(why) => {
                    format!(
                        "node {i}: unreachable ({why}); it gets the bundle before it next signs"
                    )
                }
            })
            .collect();
        if !refused.is_empty() {
            return Err(IdentityError::Denied(format!(
                "policy bundle {} refused by {}; the coordinator keeps deciding under its current policy",
                bundle.id(),
                refused.join("; ")
            )));
        }
        self.store.put_policy_bundle(bundle.jws())?;
        let id = bundle.id().to_owned();
        let jws = bundle.jws().to_owned();
        let info = self
            .policy
            .apply_bundle(bundle)
            .map_err(|e| IdentityError::Invalid(e.to_string()))?;
        self.cluster.set_policy_bundle(Some((id, jws)));
        Ok((info, lines))
    }

    /// RFC 8693 token exchange: a token for a sub-agent, on behalf of the subject token's
    /// subject, with scopes that only narrow, a lifetime within the subject token's, and
    /// the actor chain nested in `act`. Policy decides `exchange_token` for the actor
    /// and sees the chain (`context.on_behalf_of`, `context.actors`).
    pub async fn exchange(&self, req: ExchangeRequest) -> Result<Issued> {
        let mut trail = self.trail(
            "exchange",
            Action::ExchangeToken,
            req.caller.as_deref(),
            &req.actor,
        );
        trail.authn_method = Some(format!("token-exchange+{}", req.actor.method));
        trail.context = request_context(&req.scopes, req.ttl_seconds, &req.context);
        let result = self.exchange_inner(&req, &mut trail).await;
        if let Ok(i) = &result {
            trail.context.insert(
                "actors".into(),
                i.claims
                    .act
                    .as_ref()
                    .map(|a| a.chain().join(" "))
                    .unwrap_or_default(),
            );
            trail
                .context
                .insert("on_behalf_of".into(), i.claims.sub.clone());
        }
        self.record(result, trail).await
    }

    async fn exchange_inner(&self, req: &ExchangeRequest, trail: &mut Fields) -> Result<Issued> {
        let now = now();
        if let Some(answered) = self.begin_retry(req.retry.as_ref(), now, trail)? {
            return Ok(answered);
        }
        let subject = token::verify(
            req.subject_token.trim(),
            &self.verification_keys()?,
            &self.cfg.issuer,
        )
        .map_err(|e| IdentityError::Denied(format!("subject token refused: {e}")))?;
        trail.jti = Some(subject.jti.clone());
        if let Some(why) = self.why_revoked(&subject, now)? {
            return Err(IdentityError::Denied(format!(
                "subject token refused: {why}"
            )));
        }
        let actor = &req.actor;
        self.not_deprovisioned(&actor.subject)?;
        self.not_deprovisioned(&subject.sub)?;
        for earlier in subject.act.as_ref().map(Actor::chain).unwrap_or_default() {
            self.not_deprovisioned(&earlier)?;
        }
        let audience = if req.audience.is_empty() {
            subject.aud.clone()
        } else {
            req.audience.clone()
        };
        trail.resource = Some(Resource::Audience(audience.clone()).to_string());
        trail.task_id = subject.task_id.clone();
        if audience != subject.aud {
            return Err(IdentityError::Denied(format!(
                "audience {audience:?} differs from the subject token's {:?}: a delegated token cannot widen its audience",
                subject.aud
            )));
        }
        let held: Vec<&str> = subject.scope.split(' ').filter(|s| !s.is_empty()).collect();
        let scopes: Vec<String> = if req.scopes.is_empty() {
            held.iter().map(|s| (*s).to_owned()).collect()
        } else {
            req.scopes.clone()
        };
        validate_scopes(&scopes)?;
        if let Some(wider) = scopes.iter().find(|s| !held.contains(&s.as_str())) {
            return Err(IdentityError::Denied(format!(
                "scope {wider:?} is not in the subject token's scopes ({}): a delegated token can only narrow",
                subject.scope
            )));
        }
        validate_ttl(req.ttl_seconds)?;
        let mut chain = subject.act.as_ref().map(Actor::chain).unwrap_or_default();
        chain.insert(0, actor.subject.clone());
        if chain.len() > MAX_DELEGATION_DEPTH {
            return Err(IdentityError::Denied(format!(
                "delegation chain of {} actors; at most {MAX_DELEGATION_DEPTH}",
                chain.len()
            )));
        }
        let jkt = match (&subject.cnf, &req.dpop_proof) {
            (Some(cnf), Some(proof)) => {
                let jkt = self.check_dpop(proof, now, None, req.retry.as_ref())?;
                if jkt != cnf.jkt {
                    return Err(IdentityError::Denied(
                        "the DPoP proof is not by the key the subject token is bound to".into(),
                    ));
                }
                Some(jkt)
            }
            (Some(_), None) => {
                return Err(IdentityError::Denied(
                    "the subject token is DPoP-bound: prove possession of its key with a DPoP proof".into(),
                ));
            }
            (None, Some(proof)) => Some(self.check_dpop(proof, now, None, req.retry.as_ref())?),
            (None, None) => None,
        };
        let context = PolicyContext {
            scopes: scopes.clone(),
            ttl_seconds: req.ttl_seconds,
            task: subject.task_id.clone(),
            on_behalf_of: Some(subject.sub.clone()),
            actors: Some(chain),
            ..base_context(now)
        }
        .with_pairs(&req.context)
        .map_err(IdentityError::Invalid)?;
        let decision = self.decide_noted(
            &PolicyRequest {
                principal: principal_of(actor),
                action: Action::ExchangeToken,
                resource: Resource::Audience(audience.clone()),
                context,
            },
            trail,
        )?;
        if decision.approval_required {
            return Err(IdentityError::Denied(format!(
                "policy {} asks for approval, which token exchange does not support: ask for a token with IssueToken",
                decision.policy_ids.join(", ")
            )));
        }
        check_ttl_cap(&decision, req.ttl_seconds)?;
        let ttl = i64::try_from(req.ttl_seconds).unwrap_or(i64::MAX);
        let claims = AccessClaims {
            iss: self.cfg.issuer.clone(),
            sub: subject.sub.clone(),
            aud: audience,
            client_id: actor.subject.clone(),
            iat: now,
            nbf: now,
            exp: now.saturating_add(ttl).min(subject.exp),
            jti: self.random_id()?,
            scope: scopes.join(" "),
            task_id: subject.task_id.clone(),
            attestation: attestation_claim(actor),
            act: Some(Actor {
                sub: actor.subject.clone(),
                act: subject.act.clone().map(Box::new),
            }),
            cnf: jkt.map(|jkt| Confirmation { jkt }),
        };
        let evidence = evidence_of(
            actor,
            Some(&req.subject_token),
            &decision,
            req.ttl_seconds,
            &req.context,
        );
        let claims = self.retry_claims(req.retry.as_ref(), claims)?;
        let issued = self.sign(claims, decision.policy_ids, evidence).await?;
        self.retry_answer(req.retry.as_ref(), issued)
    }

    /// A confidential credential (DESIGN.md §4.6) for (key, target, agent, task, the
    /// task's window): policy decides `request_credential` on `Target::"<target>"`, the
    /// cluster answers a threshold DH masked to the requester's key. The coordinator
    /// never sees the credential; the audit names it by a fingerprint of its context.
    pub async fn request_credential(&self, ask: CredentialAsk) -> Result<CredentialGrant> {
        let mut trail = match &ask.requester {
            CredentialRequester::Agent(a) => self.trail(
                "credential",
                Action::RequestCredential,
                ask.caller.as_deref(),
                a,
            ),
            CredentialRequester::Resource { client, agent, .. } => Fields {
                kind: "credential".into(),
                action: Action::RequestCredential.as_str().into(),
                subject: Some(agent.clone()),
                caller: Some(client.clone()),
                authn_method: Some("client-certificate".into()),
                ..Fields::default()
            },
        };
        trail.resource = Some(Resource::Target(ask.target.clone()).to_string());
        trail.task_id = Some(ask.task_id.clone());
        trail.context = ask.context.clone();
        let result = self.credential_inner(&ask, &mut trail).await;
        self.record(result, trail).await
    }

    async fn credential_inner(
        &self,
        ask: &CredentialAsk,
        trail: &mut Fields,
    ) -> Result<CredentialGrant> {
        let now = now();
        validate_target(&ask.target)?;
        let (principal, agent) = match &ask.requester {
            CredentialRequester::Agent(a) => (principal_of(a), a.subject.clone()),
            CredentialRequester::Resource { client, agent, .. } => (
                Principal::Client {
                    name: client.clone(),
                },
                agent.clone(),
            ),
        };
        self.not_deprovisioned(&agent)?;
        let task = self.running_task(&ask.task_id, &agent, now)?;
        let resource_agent = match &ask.requester {
            CredentialRequester::Resource { agent, .. } => Some(agent.clone()),
            CredentialRequester::Agent(_) => None,
        };
        let context = PolicyContext {
            task: Some(task.id.clone()),
            agent: resource_agent,
            ..base_context(now)
        }
        .with_pairs(&ask.context)
        .map_err(IdentityError::Invalid)?;
        let decision = self.decide_noted(
            &PolicyRequest {
                principal,
                action: Action::RequestCredential,
                resource: Resource::Target(ask.target.clone()),
                context,
            },
            trail,
        )?;
        if decision.approval_required {
            return Err(IdentityError::Denied(format!(
                "policy {} asks for approval, which credential requests do not support yet",
                decision.policy_ids.join(", ")
            )));
        }
        let name = &self.cfg.credential_key;
        let key = self.cluster.key(name).map_err(|e| match e {
            CoordError::NotFound(_) => IdentityError::Precondition(format!(
                "no credential key named {name}: create it with `quorate key create {name} --purpose derive`"
            )),
            other => other.into(),
        })?;
        let ctx = credential_context(name, &key.key_id.to_string(), &ask.target, &agent, &task);
        trail.credential = Some(credential_fingerprint(&ctx));
        trail.key = Some(name.clone());
        let evidence = quorate_proto::fragment::CredentialEvidence {
            attestation: match &ask.requester {
                CredentialRequester::Agent(a) => a
                    .presented
                    .as_ref()
                    .map(|p| p.as_str().to_owned())
                    .unwrap_or_default(),
                CredentialRequester::Resource { .. } => String::new(),
            },
            agent_token: match &ask.requester {
                CredentialRequester::Resource { agent_token, .. } => {
                    agent_token.clone().unwrap_or_default()
                }
                CredentialRequester::Agent(_) => String::new(),
            },
            policy_bundle: decision.bundle.clone().unwrap_or_default(),
            context: ask.context.clone().into_iter().collect(),
        };
        let (resp, nodes) = self
            .cluster
            .dh(
                name,
                quorate_crypto::tdh::DhInput::Derive {
                    context: ctx.clone(),
                },
                ask.requester_public,
                Some(evidence),
            )
            .await?;
        use quorate_crypto::wire::Wire as _;
        Ok(CredentialGrant {
            masked: resp.to_bytes(),
            context: ctx,
            not_before: task.created_at,
            not_after: task.expires_at,
            key: name.clone(),
            nodes,
            policy_ids: decision.policy_ids,
        })
    }

    /// Threshold-signs `claims` under the current version of the token key (one retry
    /// if the key rotates between building the header and signing).
    async fn sign(
        &self,
        claims: AccessClaims,
        policy_ids: Vec<String>,
        evidence: TokenEvidence,
    ) -> Result<Issued> {
        let name = &self.cfg.signing_key;
        let mut last = None;
        for _ in 0..2 {
            let key = self.cluster.current_version(name).map_err(|e| match e {
                CoordError::NotFound(_) => IdentityError::Precondition(format!(
                    "no token signing key named {name}: create it with `quorate key create {name} --token-issuer {} --token-max-ttl 1h --token-typ at+jwt`",
                    self.cfg.issuer
                )),
                other => other.into(),
            })?;
            let kid = key.kid();
            let Some(rules) = key.profile.token_rules() else {
                return Err(IdentityError::Precondition(format!(
                    "key {name} has the {} profile; tokens are signed only by a key of the token profile \
                     (`quorate key create {name} --profile token --token-issuer {} --token-max-ttl 1h --token-typ at+jwt`)",
                    key.profile.name(),
                    self.cfg.issuer
                )));
            };
            {
                if rules.issuer() != self.cfg.issuer {
                    return Err(IdentityError::Precondition(format!(
                        "token key {name} is bound to issuer {} but this coordinator issues as {}: the nodes would refuse every token",
                        rules.issuer(),
                        self.cfg.issuer
                    )));
                }
                let life = claims.exp.saturating_sub(claims.iat);
                if life > i64::from(rules.max_ttl_seconds()) {
                    return Err(IdentityError::Denied(format!(
                        "requested ttl {life} s exceeds token key {name}'s maximum of {} s, which the fragment nodes enforce",
                        rules.max_ttl_seconds()
                    )));
                }
            }
            let input = token::signing_input(&kid, &claims).map_err(IdentityError::Invalid)?;
            match self
                .cluster
                .sign_jws(name, key.public.key_id, input.as_bytes(), Some(&evidence))
                .await
            {
                Ok((sig, _, nodes)) => {
                    tracing::info!(
                        sub = %claims.sub, aud = %claims.aud, jti = %claims.jti, exp = claims.exp,
                        task = claims.task_id.as_deref().unwrap_or("-"),
                        policies = %policy_ids.join(","),
                        "token issued"
                    );
                    return Ok(Issued {
                        token: token::assemble(&input, &sig.to_raw()),
                        claims,
                        kid,
                        policy_ids,
                        nodes,
                    });
                }
                Err(CoordError::Rotated(why)) => last = Some(CoordError::Rotated(why)),
                Err(e) => return Err(e.into()),
            }
        }
        Err(last
            .map(IdentityError::from)
            .unwrap_or_else(|| IdentityError::Precondition("signing key kept rotating".into())))
    }

    fn running_task(&self, id: &str, agent: &str, now: i64) -> Result<Task> {
        let task = self
            .store
            .task(id)?
            .ok_or_else(|| IdentityError::NotFound(format!("no task {id}")))?;
        if let Some(why) = task.why_not_running(now) {
            return Err(IdentityError::Denied(format!("{why}: no tokens for it")));
        }
        if let Some(owner) = &task.agent
            && owner != agent
        {
            return Err(IdentityError::Denied(format!(
                "task {id} belongs to agent {owner}, not {agent}"
            )));
        }
        Ok(task)
    }

    /// RFC 7662: `{"active": false}` for anything not a live token of ours; otherwise
    /// its claims with `active: true`.
    pub fn introspect(&self, token: &str) -> Result<serde_json::Value> {
        let inactive = serde_json::json!({ "active": false });
        let claims = match token::verify(token.trim(), &self.verification_keys()?, &self.cfg.issuer)
        {
            Ok(c) => c,
            Err(TokenError::Malformed(_) | TokenError::UnknownKey(_) | TokenError::Invalid(_)) => {
                return Ok(inactive);
            }
        };
        if let Some(why) = self.why_revoked(&claims, now())? {
            tracing::debug!(jti = %claims.jti, %why, "introspection: inactive");
            return Ok(inactive);
        }
        let mut body = serde_json::to_value(&claims)
            .map_err(|e| IdentityError::Store(format!("claims do not encode: {e}")))?;
        if let Some(o) = body.as_object_mut() {
            o.insert("active".into(), serde_json::Value::Bool(true));
            // RFC 9449 §6.2: a token bound to a DPoP key is of type DPoP.
            let token_type = if claims.cnf.is_some() {
                "DPoP"
            } else {
                "Bearer"
            };
            o.insert("token_type".into(), token_type.into());
        }
        Ok(body)
    }

    /// Why a valid token is nevertheless dead: revoked by jti, an agent in it (`sub`,
    /// `client_id` or an actor of `act`) deprovisioned at or after issuance, or its task
    /// ended.
    fn why_revoked(&self, c: &AccessClaims, now: i64) -> Result<Option<String>> {
        if self.store.jti_revoked(&c.jti)? {
            return Ok(Some(format!("token {} revoked", c.jti)));
        }
        let mut agents = vec![c.sub.clone(), c.client_id.clone()];
        agents.extend(c.act.as_ref().map(Actor::chain).unwrap_or_default());
        for agent in agents {
            if let Some(at) = self.store.agent_revoked_at(&agent)?
                && at >= c.iat
            {
                return Ok(Some(format!("agent {agent} deprovisioned at {at}")));
            }
        }
        if let Some(id) = &c.task_id {
            match self.store.task(id)? {
                None => return Ok(Some(format!("unknown task {id}"))),
                Some(t) => {
                    if let Some(why) = t.why_not_running(now) {
                        return Ok(Some(why));
                    }
                }
            }
        }
        Ok(None)
    }

    /// Forgets revoked token ids whose tokens have expired anyway.
    pub fn purge_expired(&self) -> Result<usize> {
        Ok(self.store.purge_expired(now())?)
    }

    /// RFC 7009 revocation of a whole token (its jti). A token that is not ours is
    /// `Invalid` (the HTTP endpoint answers 200 anyway, as the RFC asks).
    pub async fn revoke_token(&self, caller: &str, token: &str) -> Result<String> {
        let mut trail = self.admin_trail("revocation", "revoke_token", caller);
        let result = match token::verify(token.trim(), &self.verification_keys()?, &self.cfg.issuer)
        {
            Err(e) => Err(IdentityError::Invalid(e.to_string())),
            Ok(claims) => {
                trail.jti = Some(claims.jti.clone());
                trail.subject = Some(claims.sub.clone());
                self.store
                    .revoke_jti(&claims.jti, claims.exp)
                    .map(|()| format!("token {} revoked", claims.jti))
                    .map_err(IdentityError::from)
            }
        };
        self.record_string(result, trail).await
    }

    /// Revokes a token id.
    pub async fn revoke_jti(&self, caller: &str, jti: &str) -> Result<String> {
        let mut trail = self.admin_trail("revocation", "revoke_jti", caller);
        trail.jti = Some(jti.chars().take(64).collect());
        let result = if jti.is_empty() || jti.len() > 64 {
            Err(IdentityError::Invalid("jti must be 1-64 characters".into()))
        } else {
            // Kept until the longest lifetime a token could have.
            let until = now().saturating_add(i64::try_from(HARD_MAX_TTL_SECONDS).unwrap_or(0));
            self.store
                .revoke_jti(jti, until)
                .map(|()| format!("token {jti} revoked"))
                .map_err(IdentityError::from)
        };
        self.record_string(result, trail).await
    }

    /// Deprovisions an agent: its tokens stop introspecting as active and every later
    /// request from or for it is refused (see the [module docs](self#deprovisioning)).
    pub async fn revoke_agent(&self, caller: &str, subject: &str) -> Result<String> {
        let mut trail = self.admin_trail("revocation", "revoke_agent", caller);
        trail.subject = Some(subject.chars().take(512).collect());
        let result = if subject.starts_with("spiffe://") {
            self.store
                .revoke_agent(subject, now())
                .map(|at| format!("agent {subject} deprovisioned at {at}"))
                .map_err(IdentityError::from)
        } else {
            Err(IdentityError::Invalid(format!(
                "agent {subject:?}: give the agent's subject, spiffe://{}/agent/<issuer>/<subject>",
                self.cfg.domain
            )))
        };
        self.record_string(result, trail).await
    }

    fn admin_trail(&self, kind: &str, action: &str, caller: &str) -> Fields {
        Fields {
            kind: kind.to_owned(),
            action: action.to_owned(),
            caller: Some(caller.to_owned()),
            ..Fields::default()
        }
    }

    async fn record_string(&self, result: Result<String>, mut trail: Fields) -> Result<String> {
        if let Ok(what) = &result {
            tracing::info!(caller = trail.caller.as_deref().unwrap_or("-"), %what, "revocation");
            trail.reason = Some(what.clone());
        }
        self.record(result.map(Said), trail).await.map(|s| s.0)
    }

    /// Starts a task, optionally bound to the attested agent.
    pub async fn start_task(
        &self,
        caller: &str,
        agent: Option<String>,
        ttl_seconds: u64,
        description: String,
    ) -> Result<Task> {
        let mut trail = self.admin_trail("task", "start_task", caller);
        trail.subject = agent.clone();
        let result = match &agent {
            Some(subject) => self.not_deprovisioned(subject),
            None => Ok(()),
        }
        .and_then(|()| self.start_task_inner(agent, ttl_seconds, description));
        self.record(result, trail).await
    }

    fn start_task_inner(
        &self,
        agent: Option<String>,
        ttl_seconds: u64,
        description: String,
    ) -> Result<Task> {
        if ttl_seconds == 0 || ttl_seconds > MAX_TASK_TTL_SECONDS {
            return Err(IdentityError::Invalid(format!(
                "task ttl {ttl_seconds} s: must be 1 s to {MAX_TASK_TTL_SECONDS} s"
            )));
        }
        if description.len() > 1024 {
            return Err(IdentityError::Invalid(
                "task description is longer than 1024 bytes".into(),
            ));
        }
        let id = format!("task-{}", self.random_id()?);
        let ttl = i64::try_from(ttl_seconds).unwrap_or(i64::MAX);
        let task = store::new_task(id, agent, now(), ttl, description);
        self.store.put_task(&task)?;
        tracing::info!(task = %task.id, exp = task.expires_at, "task started");
        Ok(task)
    }

    /// Ends a task: its tokens stop introspecting as active, no new ones are issued, and
    /// its credentials are refused.
    pub async fn end_task(&self, caller: &str, id: &str) -> Result<Task> {
        let mut trail = self.admin_trail("task", "end_task", caller);
        trail.task_id = Some(id.chars().take(128).collect());
        let result = self
            .store
            .end_task(id, now())
            .map_err(IdentityError::from)
            .and_then(|t| t.ok_or_else(|| IdentityError::NotFound(format!("no task {id}"))));
        self.record(result, trail).await
    }
}

/// A plain confirmation the audit trail records as the event's reason.
struct Said(String);

impl Audited for Said {}

/// A policy refusal naming the deciding policies and, when a policy failed to evaluate
/// (which denies), the policy and its error ([`Decision::explain`]).
/// The one-use owner of a retry-safe request (empty: none).
fn owner(retry: Option<&retry::Retry>) -> &str {
    retry.map_or("", |r| r.key.as_str())
}

/// An issued token as a retry-safe request's recorded answer.
#[derive(serde::Serialize, serde::Deserialize)]
struct IssuedRecord {
    token: String,
    claims: AccessClaims,
    kid: String,
    policy_ids: Vec<String>,
    nodes: Vec<u16>,
}

fn encode_issued(i: &Issued) -> Result<String> {
    serde_json::to_string(&IssuedRecord {
        token: i.token.clone(),
        claims: i.claims.clone(),
        kid: i.kid.clone(),
        policy_ids: i.policy_ids.clone(),
        nodes: i.nodes.clone(),
    })
    .map_err(|e| IdentityError::Invalid(format!("token record: {e}")))
}

fn decode_issued(text: &str) -> Result<Issued> {
    let r: IssuedRecord = serde_json::from_str(text)
        .map_err(|e| IdentityError::Store(format!("recorded token answer: {e}")))?;
    Ok(Issued {
        token: r.token,
        claims: r.claims,
        kid: r.kid,
        policy_ids: r.policy_ids,
        nodes: r.nodes,
    })
}

fn denial(d: &Decision) -> IdentityError {
    IdentityError::Denied(d.explain())
}

fn base_context(now: i64) -> PolicyContext {
    PolicyContext {
        now,
        ..PolicyContext::default()
    }
}

/// A result the audit trail records: its outcome and what it adds to the event.
trait Audited {
    fn outcome(&self) -> Outcome {
        Outcome::Allow
    }
    fn note(&self, _trail: &mut Fields) {}
}

impl Audited for () {}

impl Audited for Issued {
    fn note(&self, trail: &mut Fields) {
        trail.jti = Some(self.claims.jti.clone());
        trail.nodes = self.nodes.clone();
        trail.key = Some(self.kid.clone());
        if let Some(cnf) = &self.claims.cnf {
            trail.context.insert("dpop_jkt".into(), cnf.jkt.clone());
        }
    }
}

impl Audited for IssueOutcome {
    fn outcome(&self) -> Outcome {
        match self {
            IssueOutcome::Issued(_) => Outcome::Allow,
            IssueOutcome::Pending { .. } => Outcome::Pending,
        }
    }
    fn note(&self, trail: &mut Fields) {
        match self {
            IssueOutcome::Issued(i) => i.note(trail),
            IssueOutcome::Pending { id, .. } => trail.approval_id = Some(id.clone()),
        }
    }
}

impl Audited for CredentialGrant {
    fn note(&self, trail: &mut Fields) {
        trail.nodes = self.nodes.clone();
    }
}

impl Audited for approval::Pending {}

impl Audited for Task {
    fn note(&self, trail: &mut Fields) {
        trail.task_id = Some(self.id.clone());
    }
}

/// The audit context of a token request: scopes, lifetime and the caller's facts.
fn request_context(
    scopes: &[String],
    ttl_seconds: u64,
    extra: &BTreeMap<String, String>,
) -> BTreeMap<String, String> {
    let mut c = extra.clone();
    c.insert("scopes".into(), scopes.join(" "));
    c.insert("ttl_seconds".into(), ttl_seconds.to_string());
    c
}

fn approval_fields(p: &approval::Pending, action: &str, caller: Option<&str>) -> Fields {
    Fields {
        kind: "approval".into(),
        action: action.to_owned(),
        subject: Some(p.request.agent.clone()),
        caller: caller.map(str::to_owned),
        resource: Some(p.request.resource.clone()),
        context: request_context(&p.request.scopes, p.request.ttl_seconds, &p.request.context),
        policy_ids: p.policy_ids.clone(),
        reason: p.reason.clone(),
        task_id: p.request.task_id.clone(),
        approval_id: Some(p.id.clone()),
        ..Fields::default()
    }
}

fn attestation_claim(a: &Attestation) -> AttestationClaim {
    AttestationClaim {
        iss: a.issuer.clone(),
        sub: a.external_subject.clone(),
        method: a.method.to_string(),
    }
}

fn validate_scopes(scopes: &[String]) -> Result<()> {
    if scopes.len() > MAX_SCOPES {
        return Err(IdentityError::Invalid(format!(
            "{} scopes requested; at most {MAX_SCOPES}",
            scopes.len()
        )));
    }
    for s in scopes {
        if !token::valid_scope(s) {
            return Err(IdentityError::Invalid(format!(
                "scope {s:?} is not a valid OAuth scope token (printable ASCII, no space, quote or backslash, at most 128 characters)"
            )));
        }
    }
    Ok(())
}

fn validate_ttl(ttl_seconds: u64) -> Result<()> {
    if ttl_seconds == 0 || ttl_seconds > HARD_MAX_TTL_SECONDS {
        return Err(IdentityError::Invalid(format!(
            "ttl {ttl_seconds} s: must be 1 s to {HARD_MAX_TTL_SECONDS} s"
        )));
    }
    Ok(())
}

fn check_ttl_cap(decision: &Decision, ttl_seconds: u64) -> Result<()> {
    match decision.max_ttl_seconds {
        Some(cap) if ttl_seconds > cap => Err(IdentityError::Denied(format!(
            "requested ttl {ttl_seconds} s exceeds the {cap} s cap set by policy {}",
            decision.policy_ids.join(", ")
        ))),
        _ => Ok(()),
    }
}

fn validate_target(target: &str) -> Result<()> {
    let ok = !target.is_empty()
        && target.len() <= 256
        && target
            .chars()
            .all(|c| !c.is_control() && !c.is_whitespace());
    if ok {
        Ok(())
    } else {
        Err(IdentityError::Invalid(
            "credential target must be 1-256 characters without spaces".into(),
        ))
    }
}

/// The canonical, versioned context of a credential (DESIGN.md §4.6), as
/// [`quorate_authz::credential::CredentialContext::encode`] writes it.
pub fn credential_context(
    key_name: &str,
    key_id: &str,
    target: &str,
    agent: &str,
    task: &Task,
) -> Vec<u8> {
    quorate_authz::credential::CredentialContext {
        key_name: key_name.to_owned(),
        key_id: key_id.to_owned(),
        target: target.to_owned(),
        agent: agent.to_owned(),
        task_id: task.id.clone(),
        not_before: task.created_at,
        not_after: task.expires_at,
    }
    .encode()
}

/// Names a credential in the audit trail without revealing it: a digest of its public
/// context (the coordinator never holds the credential itself).
pub fn credential_fingerprint(context: &[u8]) -> String {
    let d = sha2::Sha256::digest(context);
    format!("cred-{}", hex::encode(d.get(..16).unwrap_or(&[])))
}

/// The evidence the fragment nodes verify themselves before signing a token (DESIGN.md
/// §9): the attestation the agent (or, for an exchange, the actor) presented, the
/// subject token of an exchange, the bundle policy decided under, and the requested
/// lifetime and context policy saw. An X.509-SVID leaves the attestation empty: it is
/// no evidence a node can check.
fn evidence_of(
    agent: &Attestation,
    subject_token: Option<&str>,
    decision: &Decision,
    ttl_seconds: u64,
    context: &BTreeMap<String, String>,
) -> TokenEvidence {
    TokenEvidence {
        attestation: agent
            .presented
            .as_ref()
            .map(|p| p.as_str().to_owned())
            .unwrap_or_default(),
        subject_token: subject_token.unwrap_or_default().to_owned(),
        policy_bundle: decision.bundle.clone().unwrap_or_default(),
        ttl_seconds: u32::try_from(ttl_seconds).unwrap_or(u32::MAX),
        context: context.clone().into_iter().collect(),
        approval: String::new(),
    }
}

/// The authenticator with the audiences client assertions to this coordinator carry:
/// its issuer URL and token endpoint ([`crate::authn::client_assertion_audiences_for`]),
/// unless the embedding process set its own. An authenticator shared elsewhere cannot
/// be changed; it then keeps refusing client assertions, which is logged.
fn with_client_assertion_audiences(authn: Arc<Authenticator>, issuer: &str) -> Arc<Authenticator> {
    if !authn.client_assertion_audiences().is_empty() {
        return authn;
    }
    let audiences = crate::authn::client_assertion_audiences_for([issuer]);
    match Arc::try_unwrap(authn) {
        Ok(a) => Arc::new(a.with_client_assertion_audiences(audiences)),
        Err(shared) => {
            if !shared.clients().is_empty() {
                tracing::warn!(
                    "the authenticator is shared and names no client-assertion audience: registered clients' assertions will be refused"
                );
            }
            shared
        }
    }
}

fn principal_of(a: &Attestation) -> Principal {
    Principal::agent(a)
}

fn validate_audience(aud: &str) -> Result<()> {
    let ok = !aud.is_empty()
        && aud.len() <= 256
        && aud.chars().all(|c| !c.is_control() && !c.is_whitespace());
    if ok {
        Ok(())
    } else {
        Err(IdentityError::Invalid(
            "audience must be 1-256 characters without spaces (a resource server's URI or name)"
                .into(),
        ))
    }
}
