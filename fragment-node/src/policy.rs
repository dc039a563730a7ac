//! The operator-signed policy a node decides under (DESIGN.md §9, "Evidence"): a node
//! whose ceiling names the operator's public key holds one policy bundle, verified
//! against that key, and signs a token (or answers a credential derivation) only if
//! the Cedar request its evidence implies is allowed under that bundle, with an
//! approver-signed approval where policy asks for one.
//!
//! - **Install.** [`NodePolicy::install`] verifies the bundle, compiles its Cedar files,
//!   refuses one that is not newer than the held bundle (rollback), stores it durably
//!   and only then activates it. A node restarts with the stored bundle, verified again.
//! - **Tokens.** The Cedar request is rebuilt from what the node verified itself: the
//!   principal from the attestation, the resource from the token's `aud`, `scopes` and
//!   `task` from its claims, `on_behalf_of` and `actors` from the subject token and the
//!   token's `act`; the requested lifetime and the caller's `--context` pairs come with
//!   the evidence (the token's own lifetime may not exceed that lifetime).
//! - **Approvals.** Where the decision asks for approval, the evidence must carry a
//!   statement signed by an approver the bundle lists, matching the token exactly
//!   ([`quorate_authz::bundle::ApprovalStatement`]). A node lets one approval sign one
//!   token (by `jti`; repeats of that token are fine), so a coordinator cannot reuse
//!   it across signing sets, which always share a node.
//!
//! Limits: the `--context` pairs are facts the caller asserts, relayed by the
//! coordinator, which no node can check; a node remembers spent approvals in memory
//! only, so a restarted node accepts an unexpired approval once more; revocations and
//! task ends stay with the coordinator (they only narrow).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, PoisonError, RwLock};

use quorate_authz::authn::Attestation;
use quorate_authz::bundle::{ApprovalStatement, BUNDLE_MISMATCH, PolicyBundle};
use quorate_authz::credential::CredentialContext;
use quorate_authz::policy::{
    Action, PolicyContext, PolicyEngine, PolicyRequest, Principal, Resource,
};
use quorate_proto::fragment::{CredentialEvidence, TokenEvidence};
use quorate_proto::rules::CLOCK_SKEW_SECONDS;
use serde_json::{Map, Value};

use crate::evidence::Verified;

/// The bundle a node holds and decides under.
pub struct NodePolicy {
    operator: p256::PublicKey,
    held: RwLock<Option<Arc<PolicyEngine>>>,
    /// Serialises installs (verify, compare, persist, activate).
    installing: Mutex<()>,
    /// Approval id → (the jti it signed, its expiry), for approvals used on this node.
    spent: Mutex<HashMap<String, (String, i64)>>,
}

impl std::fmt::Debug for NodePolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodePolicy")
            .field("bundle", &self.held_id())
            .finish_non_exhaustive()
    }
}

impl NodePolicy {
    /// The policy of a node whose ceiling names `operator`, holding the bundle it stored
    /// before (verified again now; one that no longer verifies, e.g. after the operator
    /// key changed, is dropped with an error in the log and the node holds none).
    pub fn new(operator: p256::PublicKey, stored: Option<&str>) -> Self {
        let held = stored.and_then(|jws| {
            match PolicyBundle::verify(jws, &operator)
                .map_err(|e| e.to_string())
                .and_then(|b| PolicyEngine::from_bundle(b).map_err(|e| e.to_string()))
            {
                Ok(engine) => Some(Arc::new(engine)),
                Err(e) => {
                    tracing::error!(error = %e, "the stored policy bundle does not verify under this node's operator key; holding none until one is installed");
                    None
                }
            }
        });
        if let Some(e) = &held {
            tracing::info!(
                bundle = e.info().bundle.as_deref().unwrap_or("-"),
                "policy bundle loaded"
            );
        }
        Self {
            operator,
            held: RwLock::new(held),
            installing: Mutex::new(()),
            spent: Mutex::new(HashMap::new()),
        }
    }

    fn held(&self) -> Option<Arc<PolicyEngine>> {
        self.held
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The id of the bundle held, if any.
    pub fn held_id(&self) -> Option<String> {
        self.held().and_then(|e| e.info().bundle)
    }

    /// Verifies, compiles and (if newer) durably stores and activates a bundle; returns
    /// the bundle now held. `persist` writes the JWS to the node's store.
    pub fn install(
        &self,
        jws: &str,
        persist: impl FnOnce(&str) -> Result<(), String>,
    ) -> Result<Arc<PolicyBundle>, String> {
        let _one = self
            .installing
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let bundle = PolicyBundle::verify(jws, &self.operator).map_err(|e| e.to_string())?;
        if let Some(held) = self.held().and_then(|e| e.bundle()) {
            if held.id() == bundle.id() {
                return Ok(held);
            }
            held.may_move_to(&bundle).map_err(|e| e.to_string())?;
        }
        let engine = PolicyEngine::from_bundle(bundle.clone()).map_err(|e| e.to_string())?;
        persist(bundle.jws())?;
        *self.held.write().unwrap_or_else(PoisonError::into_inner) = Some(Arc::new(engine));
        tracing::info!(bundle = bundle.id(), "policy bundle installed");
        Ok(Arc::new(bundle))
    }

    /// The engine and bundle of the held bundle, which must be the one `asked` names.
    fn engine_for(&self, asked: &str) -> Result<(Arc<PolicyEngine>, Arc<PolicyBundle>), String> {
        let engine = self.held().ok_or(
            "policy: this node holds no policy bundle; the operator signs one (`quorate policy apply --operator-key`)",
        )?;
        let bundle = engine
            .bundle()
            .ok_or("policy: this node's policy came from no bundle")?;
        if asked != bundle.id() {
            return Err(format!(
                "policy: {BUNDLE_MISMATCH} {}, but the request was decided under {}",
                bundle.id(),
                if asked.is_empty() {
                    "no signed bundle"
                } else {
                    asked
                }
            ));
        }
        Ok((engine, bundle))
    }

    /// Decides a token again under the held bundle (see the module docs). `claims`
    /// passed the key's rules; `verified` is what the node verified of the evidence.
    pub fn decide_token(
        &self,
        claims: &Map<String, Value>,
        verified: &Verified,
        ev: &TokenEvidence,
        now: i64,
    ) -> Result<(), String> {
        let (engine, bundle) = self.engine_for(&ev.policy_bundle)?;
        let string = |name: &str| match claims.get(name) {
            Some(Value::String(s)) => Ok(s.clone()),
            _ => Err(format!("policy: the token has no string \"{name}\"")),
        };
        let int = |name: &str| {
            claims
                .get(name)
                .and_then(Value::as_i64)
                .ok_or_else(|| format!("policy: the token has no integer \"{name}\""))
        };
        let aud = string("aud")?;
        let scopes: Vec<String> = match claims.get("scope") {
            None => Vec::new(),
            Some(Value::String(s)) => s
                .split(' ')
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .collect(),
            Some(_) => return Err("policy: the token's scope is not a string".into()),
        };
        let task = match claims.get("task_id") {
            None => None,
            Some(Value::String(s)) => Some(s.clone()),
            Some(_) => return Err("policy: the token's task_id is not a string".into()),
        };
        let lifetime = int("exp")?.saturating_sub(int("iat")?);
        if ev.ttl_seconds == 0 {
            return Err("policy: the evidence names no requested lifetime".into());
        }
        if lifetime > i64::from(ev.ttl_seconds) {
            return Err(format!(
                "policy: the token lives {lifetime} s, longer than the {} s policy decided on",
                ev.ttl_seconds
            ));
        }
        let (action, on_behalf_of, actors) = match &verified.subject {
            None => (Action::IssueToken, None, None),
            Some(subject) => {
                let sub = subject
                    .get("sub")
                    .and_then(Value::as_str)
                    .ok_or("policy: the subject token has no sub")?;
                (
                    Action::ExchangeToken,
                    Some(sub.to_owned()),
                    Some(actor_chain(claims)),
                )
            }
        };
        let pairs: BTreeMap<String, String> = ev.context.clone().into_iter().collect();
        let context = PolicyContext {
            scopes: scopes.clone(),
            ttl_seconds: u64::from(ev.ttl_seconds),
            task: task.clone(),
            now,
            on_behalf_of,
            actors,
            ..PolicyContext::default()
        }
        .with_pairs(&pairs)
        .map_err(|e| format!("policy: {e}"))?;
        let resource = Resource::Audience(aud);
        let decision = engine.decide(&PolicyRequest {
            principal: Principal::agent(&verified.agent),
            action,
            resource: resource.clone(),
            context,
        });
        allowed(&bundle, &decision)?;
        if let Some(cap) = decision.max_ttl_seconds
            && u64::from(ev.ttl_seconds) > cap
        {
            return Err(format!(
                "policy bundle {}: a lifetime of {} s exceeds the {cap} s cap set by policy {}",
                bundle.id(),
                ev.ttl_seconds,
                decision.policy_ids.join(", ")
            ));
        }
        if !decision.approval_required {
            return Ok(());
        }
        if action != Action::IssueToken {
            return Err(format!(
                "policy bundle {}: policy {} asks for approval, which token exchange does not support",
                bundle.id(),
                decision.policy_ids.join(", ")
            ));
        }
        if ev.approval.trim().is_empty() {
            return Err(format!(
                "policy bundle {}: policy {} holds this request for a human, and it carries no signed approval",
                bundle.id(),
                decision.policy_ids.join(", ")
            ));
        }
        let st = ApprovalStatement::verify(&ev.approval, &bundle, now, CLOCK_SKEW_SECONDS)
            .map_err(|e| format!("policy: {e}"))?;
        let jkt = claims
            .get("cnf")
            .and_then(|c| c.get("jkt"))
            .and_then(Value::as_str)
            .map(str::to_owned);
        let mismatch = |what: &str| {
            Err(format!(
                "policy: approval {} was given for another request (mismatch in {what})",
                st.approval_id
            ))
        };
        if st.sub != string("sub")? {
            return mismatch("agent");
        }
        if st.action != Action::IssueToken.as_str() {
            return mismatch("action");
        }
        if st.resource != resource.to_string() {
            return mismatch("resource");
        }
        if st.scopes != scopes {
            return mismatch("scopes");
        }
        if st.ttl_seconds != u64::from(ev.ttl_seconds) {
            return mismatch("lifetime");
        }
        if st.task_id != task {
            return mismatch("task");
        }
        if st.context != pairs {
            return mismatch("context");
        }
        if st.jkt != jkt {
            return mismatch("DPoP key");
        }
        self.spend(&st, &string("jti")?, now)
    }

    /// Lets approval `st` sign the token `jti` only (repeats of it are fine).
    fn spend(&self, st: &ApprovalStatement, jti: &str, now: i64) -> Result<(), String> {
        let mut spent = self.spent.lock().unwrap_or_else(PoisonError::into_inner);
        spent.retain(|_, (_, exp)| exp.saturating_add(CLOCK_SKEW_SECONDS) > now);
        match spent.get(&st.approval_id) {
            Some((used_for, _)) if used_for != jti => Err(format!(
                "policy: approval {} was already used for another token on this node",
                st.approval_id
            )),
            Some(_) => Ok(()),
            None => {
                spent.insert(st.approval_id.clone(), (jti.to_owned(), st.exp));
                Ok(())
            }
        }
    }

    /// Decides an agent's request for its own credential again under the held bundle:
    /// `request_credential` on `Target::"<target>"` for the task the context names.
    pub fn decide_credential(
        &self,
        ctx: &CredentialContext,
        agent: &Attestation,
        ev: &CredentialEvidence,
        now: i64,
    ) -> Result<(), String> {
        let (engine, bundle) = self.engine_for(&ev.policy_bundle)?;
        let pairs: BTreeMap<String, String> = ev.context.clone().into_iter().collect();
        let context = PolicyContext {
            task: Some(ctx.task_id.clone()),
            now,
            ..PolicyContext::default()
        }
        .with_pairs(&pairs)
        .map_err(|e| format!("policy: {e}"))?;
        let decision = engine.decide(&PolicyRequest {
            principal: Principal::agent(agent),
            action: Action::RequestCredential,
            resource: Resource::Target(ctx.target.clone()),
            context,
        });
        allowed(&bundle, &decision)?;
        if decision.approval_required {
            return Err(format!(
                "policy bundle {}: policy {} asks for approval, which credential requests do not support",
                bundle.id(),
                decision.policy_ids.join(", ")
            ));
        }
        Ok(())
    }
}

/// A denial as a refusal naming the bundle, the deciding policies and any evaluation
/// error.
fn allowed(
    bundle: &PolicyBundle,
    decision: &quorate_authz::policy::Decision,
) -> Result<(), String> {
    if decision.allowed {
        Ok(())
    } else {
        Err(format!(
            "policy bundle {}: {}",
            bundle.id(),
            decision.explain()
        ))
    }
}

/// The actors of a delegated token, outermost first: `act.sub`, `act.act.sub`, ...
fn actor_chain(claims: &Map<String, Value>) -> Vec<String> {
    let mut chain = Vec::new();
    let mut at = claims.get("act");
    while let Some(Value::Object(act)) = at {
        if let Some(Value::String(sub)) = act.get("sub") {
            chain.push(sub.clone());
        }
        at = act.get("act");
    }
    chain
}
