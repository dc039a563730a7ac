//! The agent identity plane (DESIGN.md §7): attestation in, Cedar-decided, task-scoped
//! ES256 access tokens out — signed by the threshold cluster, never by a local key —
//! with tasks, revocation and introspection that take effect at once.
//!
//! [`IdentityPlane`] holds the logic; [`service`] serves it over gRPC and [`http`] serves
//! discovery, the JWKS, introspection and revocation over HTTPS.

pub mod http;
pub mod service;
pub mod store;
pub mod token;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use quorate_crypto::keys::KeyPublic;

use crate::authn::{Attestation, Authenticator, AuthnError};
use crate::cluster::{Cluster, CoordError};
use crate::policy::{
    Action, Decision, PolicyContext, PolicyEngine, PolicyRequest, Principal, Resource,
};
use store::{IdentityStore, Task};
use token::{AccessClaims, AttestationClaim, TokenError};

/// Longest token lifetime the service ever issues, whatever policy says (24 h).
pub const HARD_MAX_TTL_SECONDS: u64 = 24 * 3600;
/// Longest task.
pub const MAX_TASK_TTL_SECONDS: u64 = 7 * 24 * 3600;
/// Most scopes in one request.
pub const MAX_SCOPES: usize = 32;

/// Identity-plane settings.
#[derive(Clone, Debug)]
pub struct IdentityConfig {
    /// Our issuer URL (`iss` of every token; discovery lives under it).
    pub issuer: String,
    /// The cluster's trust domain (agent subjects live under it).
    pub domain: String,
    /// The name of the signing key for tokens.
    pub signing_key: String,
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
            IdentityError::Store(_) => tonic::Status::unavailable(msg),
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
}

/// The identity plane.
pub struct IdentityPlane {
    cluster: Arc<Cluster>,
    policy: Arc<PolicyEngine>,
    authn: Arc<Authenticator>,
    store: IdentityStore,
    cfg: IdentityConfig,
    rng: Mutex<rand::rngs::StdRng>,
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
        store: IdentityStore,
        cfg: IdentityConfig,
    ) -> std::result::Result<Self, String> {
        use rand::SeedableRng as _;
        let rng = rand::rngs::StdRng::try_from_rng(&mut rand::rngs::SysRng)
            .map_err(|e| format!("system RNG failed: {e}"))?;
        Ok(IdentityPlane {
            cluster,
            policy,
            authn,
            store,
            cfg,
            rng: Mutex::new(rng),
        })
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

    /// Every signing key version a verifier may meet: current ones and those retired
    /// less than their maximum token lifetime ago.
    fn verification_keys(&self) -> Result<Vec<KeyPublic>> {
        Ok(self
            .cluster
            .jwks_keys(now())?
            .into_iter()
            .map(|k| k.public)
            .collect())
    }

    /// The JWKS document.
    pub fn jwks(&self) -> Result<serde_json::Value> {
        let keys: Vec<serde_json::Value> =
            self.verification_keys()?.iter().map(token::jwk).collect();
        Ok(serde_json::json!({ "keys": keys }))
    }

    /// Decides a request; refusals name the deciding policies.
    pub fn decide(&self, req: &PolicyRequest) -> Result<Decision> {
        let d = self.policy.decide(req);
        if d.allowed {
            Ok(d)
        } else {
            let mut why = d.explain();
            if !d.errors.is_empty() {
                why.push_str(&format!(" ({})", d.errors.join("; ")));
            }
            Err(IdentityError::Denied(why))
        }
    }

    /// Admin actions by a cluster client: allowed only if policy permits `admin` on the
    /// cluster for `Client::"<name>"`.
    pub fn require_admin(&self, client: &str) -> Result<Decision> {
        self.decide(&PolicyRequest {
            principal: Principal::Client {
                name: client.to_owned(),
            },
            action: Action::Admin,
            resource: Resource::Cluster,
            context: base_context(now()),
        })
    }

    /// Authenticates an OIDC attestation JWT.
    pub async fn authenticate(&self, attestation: &str) -> Result<Attestation> {
        if attestation.trim().is_empty() {
            return Err(IdentityError::Invalid(
                "no attestation: pass the agent's OIDC JWT".into(),
            ));
        }
        Ok(self.authn.verify_jwt(attestation.trim()).await?)
    }

    /// Issues a token: checks deprovisioning and the task, asks policy, caps the
    /// lifetime (policy, key rules, task end), and has the cluster sign it.
    pub async fn issue(&self, req: TokenRequest) -> Result<Issued> {
        let now = now();
        let agent = &req.agent;
        if let Some(at) = self.store.agent_revoked_at(&agent.subject)? {
            return Err(IdentityError::Denied(format!(
                "agent {} was deprovisioned at {at}; it gets no tokens",
                agent.subject
            )));
        }
        validate_audience(&req.audience)?;
        if req.scopes.len() > MAX_SCOPES {
            return Err(IdentityError::Invalid(format!(
                "{} scopes requested; at most {MAX_SCOPES}",
                req.scopes.len()
            )));
        }
        for s in &req.scopes {
            if !token::valid_scope(s) {
                return Err(IdentityError::Invalid(format!(
                    "scope {s:?} is not a valid OAuth scope token (printable ASCII, no space, quote or backslash, at most 128 characters)"
                )));
            }
        }
        if req.ttl_seconds == 0 || req.ttl_seconds > HARD_MAX_TTL_SECONDS {
            return Err(IdentityError::Invalid(format!(
                "ttl {} s: must be 1 s to {HARD_MAX_TTL_SECONDS} s",
                req.ttl_seconds
            )));
        }
        let task = match &req.task_id {
            None => None,
            Some(id) => Some(self.running_task(id, &agent.subject, now)?),
        };
        let context = base_context(now);
        let context = PolicyContext {
            scopes: req.scopes.clone(),
            ttl_seconds: req.ttl_seconds,
            task: req.task_id.clone(),
            ..context
        }
        .with_pairs(&req.context)
        .map_err(IdentityError::Invalid)?;
        let decision = self.decide(&PolicyRequest {
            principal: principal_of(agent),
            action: Action::IssueToken,
            resource: Resource::Audience(req.audience.clone()),
            context,
        })?;
        if let Some(cap) = decision.max_ttl_seconds
            && req.ttl_seconds > cap
        {
            return Err(IdentityError::Denied(format!(
                "requested ttl {} s exceeds the {cap} s cap set by policy {}",
                req.ttl_seconds,
                decision.policy_ids.join(", ")
            )));
        }
        let ttl = i64::try_from(req.ttl_seconds).unwrap_or(i64::MAX);
        let mut exp = now.saturating_add(ttl);
        if let Some(t) = &task {
            // A token never outlives its task.
            exp = exp.min(t.expires_at);
        }
        let jti = self.random_id()?;
        let claims = AccessClaims {
            iss: self.cfg.issuer.clone(),
            sub: agent.subject.clone(),
            aud: req.audience.clone(),
            client_id: agent.subject.clone(),
            iat: now,
            nbf: now,
            exp,
            jti,
            scope: req.scopes.join(" "),
            task_id: req.task_id.clone(),
            attestation: AttestationClaim {
                iss: agent.issuer.clone(),
                sub: agent.external_subject.clone(),
                method: agent.method.to_string(),
            },
        };
        let (token, kid) = self.sign(&claims).await?;
        tracing::info!(
            sub = %claims.sub, aud = %claims.aud, jti = %claims.jti, exp = claims.exp,
            task = claims.task_id.as_deref().unwrap_or("-"),
            policies = %decision.policy_ids.join(","),
            "token issued"
        );
        Ok(Issued {
            token,
            claims,
            kid,
            policy_ids: decision.policy_ids,
        })
    }

    /// Threshold-signs `claims` under the current version of the token key (one retry
    /// if the key rotates between building the header and signing).
    async fn sign(&self, claims: &AccessClaims) -> Result<(String, String)> {
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
            if key.public.purpose != quorate_crypto::keys::KeyPurpose::Sign {
                return Err(IdentityError::Precondition(format!(
                    "key {name} is not a signing key"
                )));
            }
            let kid = key.kid();
            if let Some(rules) = &key.rules {
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
            let input = token::signing_input(&kid, claims).map_err(IdentityError::Invalid)?;
            match self
                .cluster
                .sign_jws(name, key.public.key_id, input.as_bytes())
                .await
            {
                Ok((sig, _)) => return Ok((token::assemble(&input, &sig.to_raw()), kid)),
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
            o.insert("token_type".into(), "Bearer".into());
        }
        Ok(body)
    }

    /// Why a valid token is nevertheless dead: revoked by jti, its agent deprovisioned
    /// at or after issuance, or its task ended.
    fn why_revoked(&self, c: &AccessClaims, now: i64) -> Result<Option<String>> {
        if self.store.jti_revoked(&c.jti)? {
            return Ok(Some(format!("token {} revoked", c.jti)));
        }
        if let Some(at) = self.store.agent_revoked_at(&c.sub)?
            && at >= c.iat
        {
            return Ok(Some(format!("agent {} deprovisioned at {at}", c.sub)));
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
    pub fn revoke_token(&self, caller: &str, token: &str) -> Result<String> {
        let claims = token::verify(token.trim(), &self.verification_keys()?, &self.cfg.issuer)
            .map_err(|e| IdentityError::Invalid(e.to_string()))?;
        self.store.revoke_jti(&claims.jti, claims.exp)?;
        tracing::info!(%caller, jti = %claims.jti, "token revoked");
        Ok(format!("token {} revoked", claims.jti))
    }

    /// Revokes a token id.
    pub fn revoke_jti(&self, caller: &str, jti: &str) -> Result<String> {
        if jti.is_empty() || jti.len() > 64 {
            return Err(IdentityError::Invalid("jti must be 1-64 characters".into()));
        }
        // Kept until the longest lifetime a token could have.
        let until = now().saturating_add(i64::try_from(HARD_MAX_TTL_SECONDS).unwrap_or(0));
        self.store.revoke_jti(jti, until)?;
        tracing::info!(%caller, %jti, "token id revoked");
        Ok(format!("token {jti} revoked"))
    }

    /// Deprovisions an agent: its tokens stop introspecting as active and it gets no new
    /// ones.
    pub fn revoke_agent(&self, caller: &str, subject: &str) -> Result<String> {
        if !subject.starts_with("spiffe://") {
            return Err(IdentityError::Invalid(format!(
                "agent {subject:?}: give the agent's subject, spiffe://{}/agent/<issuer>/<subject>",
                self.cfg.domain
            )));
        }
        let at = self.store.revoke_agent(subject, now())?;
        tracing::info!(%caller, agent = %subject, at, "agent deprovisioned");
        Ok(format!("agent {subject} deprovisioned at {at}"))
    }

    /// Starts a task, optionally bound to the attested agent.
    pub fn start_task(
        &self,
        caller: &str,
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
        tracing::info!(%caller, task = %task.id, exp = task.expires_at, "task started");
        Ok(task)
    }

    /// Ends a task: its tokens stop introspecting as active, no new ones are issued.
    pub fn end_task(&self, caller: &str, id: &str) -> Result<Task> {
        let task = self
            .store
            .end_task(id, now())?
            .ok_or_else(|| IdentityError::NotFound(format!("no task {id}")))?;
        tracing::info!(%caller, task = %id, "task ended");
        Ok(task)
    }
}

fn base_context(now: i64) -> PolicyContext {
    PolicyContext {
        scopes: Vec::new(),
        ttl_seconds: 0,
        task: None,
        environment: None,
        tool: None,
        data_sensitivity: None,
        now,
    }
}

fn principal_of(a: &Attestation) -> Principal {
    Principal::Agent {
        subject: a.subject.clone(),
        issuer: a.issuer.clone(),
        external_subject: a.external_subject.clone(),
        method: a.method.to_string(),
        claims: a.claims.clone(),
    }
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
