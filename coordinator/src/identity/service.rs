//! `IdentityService` over gRPC (STYLE.md §5): callers are cluster clients (the services
//! that issue agent identities, operators); the agent itself is named by its attestation.

use std::collections::BTreeMap;
use std::sync::Arc;

use quorate_proto::api::{
    self, approval_service_server::ApprovalService, audit_service_server::AuditService,
    identity_service_server::IdentityService, revoke_request::Target,
};
use quorate_proto::tls::Role;
use tonic::{Request, Response, Status};

use std::time::Duration;

use super::{
    CredentialAsk, CredentialRequester, ExchangeRequest, IdentityError, IdentityPlane,
    IssueOutcome, Issued, TokenRequest,
};
use crate::audit::record::Outcome;
use crate::authn::Attestation;
use crate::policy::Action;

/// The gRPC face of the identity plane.
#[derive(Clone)]
pub struct IdentityApi {
    plane: Arc<IdentityPlane>,
    agents: bool,
}

impl IdentityApi {
    /// The identity API for cluster clients (the public listener).
    pub fn new(plane: Arc<IdentityPlane>) -> Self {
        IdentityApi {
            plane,
            agents: false,
        }
    }

    /// The identity API of the agent listener: callers are agents authenticated by
    /// their X.509-SVID on the connection; they may only ask for tokens for themselves.
    pub fn for_agents(plane: Arc<IdentityPlane>) -> Self {
        IdentityApi {
            plane,
            agents: true,
        }
    }

    fn clients_only(&self) -> Result<(), Status> {
        if self.agents {
            Err(Status::permission_denied(
                "the agent listener only issues tokens to the calling agent; this call is for cluster clients",
            ))
        } else {
            Ok(())
        }
    }

    fn caller<T>(&self, req: &Request<T>) -> Result<String, Status> {
        self.clients_only()?;
        match quorate_proto::transport::peer_role_of(req, self.plane.domain())? {
            Role::Client(name) => Ok(name),
            other => Err(Status::permission_denied(format!(
                "the identity API is for clients; caller is {other}"
            ))),
        }
    }

    async fn admin<T>(&self, req: &Request<T>, what: &str) -> Result<String, Status> {
        let caller = self.caller(req)?;
        self.plane.require_admin(&caller, what).await?;
        Ok(caller)
    }

    /// The agent behind a request: its X.509-SVID on the agent listener (where the
    /// attestation field must be empty), else the attestation JWT from a cluster client.
    /// A refusal is audited.
    /// Who sent a retry-safe request, as its key's first part: the cluster client's id
    /// on the public API, a digest of the agent's X.509-SVID on the agent listener.
    fn retry_caller<T>(&self, request: &Request<T>) -> Result<String, Status> {
        if self.agents {
            let chain = quorate_proto::transport::peer_chain_of(request)
                .ok_or_else(|| Status::unauthenticated("no X.509-SVID on this connection"))?;
            let leaf = chain
                .first()
                .ok_or_else(|| Status::unauthenticated("no X.509-SVID on this connection"))?;
            Ok(format!(
                "svid:{}",
                hex::encode(<sha2::Sha256 as sha2::Digest>::digest(leaf.as_ref()))
            ))
        } else {
            Ok(format!("client:{}", self.caller(request)?))
        }
    }

    /// The retry identity of a token request ([`super::retry`]), if it has a
    /// `request_id`.
    fn retry_of<T>(
        &self,
        request: &Request<T>,
        request_id: &str,
        content: &super::retry::Content<'_>,
    ) -> Result<Option<super::retry::Retry>, Status> {
        if request_id.is_empty() {
            return Ok(None);
        }
        let caller = self.retry_caller(request)?;
        Ok(super::retry::Retry::new(&caller, request_id, content)?)
    }

    async fn agent<T>(
        &self,
        request: &Request<T>,
        attestation: &str,
        kind: &str,
        action: Action,
        retry: Option<&super::retry::Retry>,
    ) -> Result<(Option<String>, Attestation), Status> {
        if self.agents {
            let verified = match quorate_proto::transport::peer_chain_of(request) {
                None => Err(IdentityError::Invalid("no X.509-SVID on this connection".into())),
                Some(chain) => self
                    .plane
                    .authn()
                    .verify_svid(&chain)
                    .map_err(IdentityError::from),
            }
            .and_then(|a| {
                if attestation.is_empty() {
                    Ok(a)
                } else {
                    Err(IdentityError::Invalid(
                        "on the agent listener the X.509-SVID is the attestation: leave the attestation field empty".into(),
                    ))
                }
            });
            match verified {
                Ok(a) => Ok((None, a)),
                Err(e) => Err(self.plane.refuse(kind, action, None, e).await.into()),
            }
        } else {
            let caller = self.caller(request)?;
            match self.plane.authenticate_for(attestation, retry).await {
                Ok(a) => Ok((Some(caller), a)),
                Err(e) => Err(self
                    .plane
                    .refuse(kind, action, Some(&caller), e)
                    .await
                    .into()),
            }
        }
    }
}

fn policy_info(i: crate::policy::PolicyInfo) -> api::PolicyInfo {
    api::PolicyInfo {
        digest: i.digest,
        policy_ids: i.policy_ids,
        activated_at: i.activated_at,
        bundle_seq: i
            .bundle
            .as_deref()
            .and_then(|b| b.split_once('-'))
            .and_then(|(seq, _)| seq.parse().ok())
            .unwrap_or(0),
        bundle: i.bundle.unwrap_or_default(),
        source: i.source,
        node_reports: Vec::new(),
    }
}

fn non_empty(s: String) -> Option<String> {
    (!s.is_empty()).then_some(s)
}

fn token_reply(issued: Issued) -> api::IssueTokenReply {
    let token_type = if issued.claims.cnf.is_some() {
        "DPoP"
    } else {
        "Bearer"
    };
    api::IssueTokenReply {
        access_token: issued.token,
        jti: issued.claims.jti,
        expires_at: issued.claims.exp,
        subject: issued.claims.sub,
        kid: issued.kid,
        policy_ids: issued.policy_ids,
        token_type: token_type.into(),
        ..Default::default()
    }
}

fn task_info(t: super::store::Task) -> api::TaskInfo {
    api::TaskInfo {
        task_id: t.id,
        agent: t.agent.unwrap_or_default(),
        expires_at: t.expires_at,
        ended: t.ended_at.is_some(),
        description: t.description,
    }
}

#[tonic::async_trait]
impl IdentityService for IdentityApi {
    #[tracing::instrument(skip(self, request))]
    async fn issue_token(
        &self,
        request: Request<api::IssueTokenRequest>,
    ) -> Result<Response<api::IssueTokenReply>, Status> {
        let attestation = request.get_ref().attestation.clone();
        let context: BTreeMap<String, String> = request
            .get_ref()
            .context
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let retry = {
            let r = request.get_ref();
            self.retry_of(
                &request,
                &r.request_id,
                &super::retry::Content {
                    kind: "issue",
                    credentials: &[&r.attestation],
                    audience: &r.audience,
                    scopes: &r.scopes,
                    ttl_seconds: u64::from(r.ttl_seconds),
                    task_id: &r.task_id,
                    context: &context,
                    dpop_proof: &r.dpop_proof,
                },
            )?
        };
        let (caller, agent) = self
            .agent(
                &request,
                &attestation,
                "token",
                Action::IssueToken,
                retry.as_ref(),
            )
            .await?;
        let r = request.into_inner();
        let outcome = self
            .plane
            .issue(TokenRequest {
                agent,
                audience: r.audience,
                scopes: r.scopes,
                ttl_seconds: u64::from(r.ttl_seconds),
                task_id: non_empty(r.task_id),
                context,
                caller,
                dpop_proof: non_empty(r.dpop_proof),
                wait: Duration::from_secs(u64::from(r.wait_seconds)),
                approval_id: non_empty(r.approval_id),
                retry,
            })
            .await?;
        Ok(Response::new(match outcome {
            IssueOutcome::Issued(issued) => token_reply(*issued),
            IssueOutcome::Pending { id, expires_at } => api::IssueTokenReply {
                pending_approval: id,
                approval_expires_at: expires_at,
                ..Default::default()
            },
        }))
    }

    #[tracing::instrument(skip(self, request))]
    async fn exchange_token(
        &self,
        request: Request<api::ExchangeTokenRequest>,
    ) -> Result<Response<api::IssueTokenReply>, Status> {
        let attestation = request.get_ref().actor_attestation.clone();
        let context: BTreeMap<String, String> = request
            .get_ref()
            .context
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let retry = {
            let r = request.get_ref();
            self.retry_of(
                &request,
                &r.request_id,
                &super::retry::Content {
                    kind: "exchange",
                    credentials: &[&r.subject_token, &r.actor_attestation],
                    audience: &r.audience,
                    scopes: &r.scopes,
                    ttl_seconds: u64::from(r.ttl_seconds),
                    task_id: "",
                    context: &context,
                    dpop_proof: &r.dpop_proof,
                },
            )?
        };
        let (caller, actor) = self
            .agent(
                &request,
                &attestation,
                "exchange",
                Action::ExchangeToken,
                retry.as_ref(),
            )
            .await?;
        let r = request.into_inner();
        let issued = self
            .plane
            .exchange(ExchangeRequest {
                subject_token: r.subject_token,
                actor,
                audience: r.audience,
                scopes: r.scopes,
                ttl_seconds: u64::from(r.ttl_seconds),
                dpop_proof: non_empty(r.dpop_proof),
                context,
                caller,
                retry,
            })
            .await?;
        Ok(Response::new(token_reply(issued)))
    }

    #[tracing::instrument(skip(self, request))]
    async fn request_credential(
        &self,
        request: Request<api::CredentialRequest>,
    ) -> Result<Response<api::CredentialReply>, Status> {
        let requester_public =
            quorate_crypto::Point::from_bytes(&request.get_ref().requester_public)
                .map_err(|e| Status::invalid_argument(format!("requester_public: {e}")))?;
        let (caller, requester) = if !self.agents && !request.get_ref().agent.is_empty() {
            if !request.get_ref().attestation.is_empty() {
                return Err(Status::invalid_argument(
                    "give either an attestation (an agent asks) or an agent (a resource derives the agent's credential), not both",
                ));
            }
            let client = self.caller(&request)?;
            (
                Some(client.clone()),
                CredentialRequester::Resource {
                    client,
                    agent: request.get_ref().agent.clone(),
                    agent_token: non_empty(request.get_ref().agent_token.clone()),
                },
            )
        } else {
            let attestation = request.get_ref().attestation.clone();
            let (caller, agent) = self
                .agent(
                    &request,
                    &attestation,
                    "credential",
                    Action::RequestCredential,
                    None,
                )
                .await?;
            (caller, CredentialRequester::Agent(agent))
        };
        let r = request.into_inner();
        let grant = self
            .plane
            .request_credential(CredentialAsk {
                requester,
                caller,
                target: r.target,
                task_id: r.task_id,
                requester_public,
                context: r.context.into_iter().collect(),
            })
            .await?;
        Ok(Response::new(api::CredentialReply {
            masked: grant.masked,
            context: grant.context,
            not_before: grant.not_before,
            not_after: grant.not_after,
            key: grant.key,
            nodes: grant.nodes.into_iter().map(u32::from).collect(),
            policy_ids: grant.policy_ids,
        }))
    }

    async fn introspect(
        &self,
        request: Request<api::IntrospectRequest>,
    ) -> Result<Response<api::IntrospectReply>, Status> {
        self.caller(&request)?;
        let body = self.plane.introspect(&request.into_inner().token)?;
        let active = body.get("active").and_then(|v| v.as_bool()) == Some(true);
        Ok(Response::new(api::IntrospectReply {
            active,
            json: body.to_string(),
        }))
    }

    #[tracing::instrument(skip(self, request))]
    async fn revoke(
        &self,
        request: Request<api::RevokeRequest>,
    ) -> Result<Response<api::RevokeReply>, Status> {
        let caller = self.admin(&request, "revoke").await?;
        let revoked = match request.into_inner().target {
            Some(Target::Jti(j)) => self.plane.revoke_jti(&caller, &j).await?,
            Some(Target::Agent(a)) => self.plane.revoke_agent(&caller, &a).await?,
            Some(Target::TaskId(t)) => {
                let task = self.plane.end_task(&caller, &t).await?;
                format!("task {} ended", task.id)
            }
            Some(Target::Token(t)) => self.plane.revoke_token(&caller, &t).await?,
            None => {
                return Err(Status::invalid_argument(
                    "name what to revoke: a jti, an agent, a task id or a token",
                ));
            }
        };
        Ok(Response::new(api::RevokeReply { revoked }))
    }

    #[tracing::instrument(skip(self, request))]
    async fn start_task(
        &self,
        request: Request<api::StartTaskRequest>,
    ) -> Result<Response<api::TaskInfo>, Status> {
        let caller = self.admin(&request, "start_task").await?;
        let r = request.into_inner();
        let agent = if r.attestation.trim().is_empty() {
            None
        } else {
            Some(self.plane.authenticate(&r.attestation).await?.subject)
        };
        let task = self
            .plane
            .start_task(&caller, agent, u64::from(r.ttl_seconds), r.description)
            .await?;
        Ok(Response::new(task_info(task)))
    }

    #[tracing::instrument(skip(self, request))]
    async fn end_task(
        &self,
        request: Request<api::EndTaskRequest>,
    ) -> Result<Response<api::TaskInfo>, Status> {
        let caller = self.admin(&request, "end_task").await?;
        let task = self
            .plane
            .end_task(&caller, &request.into_inner().task_id)
            .await?;
        Ok(Response::new(task_info(task)))
    }

    #[tracing::instrument(skip(self, request))]
    async fn apply_policy(
        &self,
        request: Request<api::ApplyPolicyRequest>,
    ) -> Result<Response<api::PolicyInfo>, Status> {
        let caller = self.admin(&request, "apply_policy").await?;
        let r = request.into_inner();
        if !r.bundle.trim().is_empty() {
            if !r.files.is_empty() {
                return Err(Status::invalid_argument(
                    "give a signed bundle or files, not both",
                ));
            }
            let (info, reports) = self.plane.apply_bundle(&caller, &r.bundle).await?;
            tracing::info!(%caller, bundle = info.bundle.as_deref().unwrap_or("-"), "policy bundle applied");
            let mut reply = policy_info(info);
            reply.node_reports = reports;
            return Ok(Response::new(reply));
        }
        if self.plane.config().operator_key.is_some() {
            return Err(Status::failed_precondition(
                "this coordinator takes only operator-signed policy bundles (--operator-public-key): sign the set with `quorate policy apply DIR --operator-key FILE`",
            ));
        }
        let files = r.files.into_iter().map(|f| (f.name, f.text)).collect();
        let applied = self
            .plane
            .policy()
            .apply_files(files, &format!("ApplyPolicy by {caller}"));
        let (outcome, reason) = match &applied {
            Ok(info) => (
                Outcome::Allow,
                format!("policy set {} activated", info.digest),
            ),
            Err(e) => (Outcome::Deny, format!("policy set refused: {e}")),
        };
        self.plane
            .record_admin("policy", "apply_policy", &caller, outcome, |f| {
                f.reason = Some(reason);
            })
            .await?;
        let info = applied.map_err(|e| {
            Status::invalid_argument(format!("policy set refused, the active one stays: {e}"))
        })?;
        tracing::info!(%caller, digest = %info.digest, "policy applied");
        Ok(Response::new(policy_info(info)))
    }

    async fn get_policy(
        &self,
        request: Request<api::GetPolicyRequest>,
    ) -> Result<Response<api::PolicyInfo>, Status> {
        self.caller(&request)?;
        Ok(Response::new(policy_info(self.plane.policy().info())))
    }
}

fn approval_info(p: super::approval::Pending) -> api::Approval {
    api::Approval {
        id: p.id,
        agent: p.request.agent,
        action: p.request.action,
        resource: p.request.resource,
        scopes: p.request.scopes,
        ttl_seconds: u32::try_from(p.request.ttl_seconds).unwrap_or(u32::MAX),
        task_id: p.request.task_id.unwrap_or_default(),
        context: p.request.context.into_iter().collect(),
        policy_ids: p.policy_ids,
        created_at: p.created_at,
        expires_at: p.expires_at,
        state: p.state.as_str().into(),
        decided_by: p.decided_by.unwrap_or_default(),
        reason: p.reason.unwrap_or_default(),
        jkt: p.request.jkt.unwrap_or_default(),
    }
}

#[tonic::async_trait]
impl ApprovalService for IdentityApi {
    async fn list_approvals(
        &self,
        request: Request<api::ListApprovalsRequest>,
    ) -> Result<Response<api::ListApprovalsReply>, Status> {
        let caller = self.caller(&request)?;
        let all = request.into_inner().all;
        let approvals = self.plane.list_approvals(&caller, all).await?;
        Ok(Response::new(api::ListApprovalsReply {
            approvals: approvals.into_iter().map(approval_info).collect(),
        }))
    }

    #[tracing::instrument(skip(self, request))]
    async fn decide_approval(
        &self,
        request: Request<api::DecideApprovalRequest>,
    ) -> Result<Response<api::Approval>, Status> {
        let caller = self.caller(&request)?;
        let r = request.into_inner();
        if r.reason.len() > 1024 {
            return Err(Status::invalid_argument(
                "the reason is longer than 1024 bytes",
            ));
        }
        let p = self
            .plane
            .decide_approval(
                &caller,
                &r.id,
                r.approve,
                non_empty(r.reason),
                non_empty(r.statement),
            )
            .await?;
        Ok(Response::new(approval_info(p)))
    }
}

type TailStream =
    std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<api::AuditRecord, Status>> + Send>>;

#[tonic::async_trait]
impl AuditService for IdentityApi {
    type TailStream = TailStream;

    async fn tail(
        &self,
        request: Request<api::TailRequest>,
    ) -> Result<Response<Self::TailStream>, Status> {
        self.admin(&request, "audit_tail").await?;
        let r = request.into_inner();
        let audit = std::sync::Arc::clone(self.plane.audit());
        // Subscribe first, then read the store up to where the feed starts: no gap.
        let (mut feed, start) = audit.subscribe()?;
        let backlog = match r.from_seq {
            Some(from) if from < start => audit.lines(from, start)?,
            _ => Vec::new(),
        };
        let mut next = r.from_seq.map_or(start, |f| f.max(start));
        let first = r.from_seq.unwrap_or(start);
        let follow = r.follow;
        let (tx, rx) = tokio::sync::mpsc::channel(256);
        tokio::spawn(async move {
            for (i, json) in backlog.into_iter().enumerate() {
                let rec = api::AuditRecord {
                    seq: first + i as u64,
                    json,
                };
                if tx.send(Ok(rec)).await.is_err() {
                    return;
                }
            }
            if !follow {
                return;
            }
            loop {
                match feed.recv().await {
                    Ok(ev) if ev.seq < next => {}
                    Ok(ev) => {
                        next = ev.seq + 1;
                        let json = match ev.to_line() {
                            Ok(j) => j,
                            Err(e) => {
                                let _ = tx.send(Err(Status::internal(e))).await;
                                return;
                            }
                        };
                        if tx
                            .send(Ok(api::AuditRecord { seq: ev.seq, json }))
                            .await
                            .is_err()
                        {
                            return;
                        }
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                        let _ = tx
                            .send(Err(Status::resource_exhausted(format!(
                                "the tail fell behind the audit trail; resume with --from {next}"
                            ))))
                            .await;
                        return;
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }
}
