//! `IdentityService` over gRPC (STYLE.md §5): callers are cluster clients (the services
//! that issue agent identities, operators); the agent itself is named by its attestation.

use std::collections::BTreeMap;
use std::sync::Arc;

use quorate_proto::api::{self, identity_service_server::IdentityService, revoke_request::Target};
use quorate_proto::tls::Role;
use tonic::{Request, Response, Status};

use super::{IdentityPlane, TokenRequest};

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

    fn admin<T>(&self, req: &Request<T>) -> Result<String, Status> {
        let caller = self.caller(req)?;
        self.plane.require_admin(&caller)?;
        Ok(caller)
    }
}

fn policy_info(i: crate::policy::PolicyInfo) -> api::PolicyInfo {
    api::PolicyInfo {
        digest: i.digest,
        policy_ids: i.policy_ids,
        activated_at: i.activated_at,
        source: i.source,
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
        let (caller, agent) = if self.agents {
            let chain = quorate_proto::transport::peer_chain_of(&request)
                .ok_or_else(|| Status::unauthenticated("no X.509-SVID on this connection"))?;
            let agent = self
                .plane
                .authn()
                .verify_svid(&chain)
                .map_err(|e| Status::from(super::IdentityError::from(e)))?;
            if !request.get_ref().attestation.is_empty() {
                return Err(Status::invalid_argument(
                    "on the agent listener the X.509-SVID is the attestation: leave `attestation` empty",
                ));
            }
            (agent.subject.clone(), agent)
        } else {
            let caller = self.caller(&request)?;
            let agent = self
                .plane
                .authenticate(&request.get_ref().attestation)
                .await?;
            (caller, agent)
        };
        let r = request.into_inner();
        let issued = self
            .plane
            .issue(TokenRequest {
                agent,
                audience: r.audience,
                scopes: r.scopes,
                ttl_seconds: u64::from(r.ttl_seconds),
                task_id: (!r.task_id.is_empty()).then_some(r.task_id),
                context: r.context.into_iter().collect::<BTreeMap<_, _>>(),
            })
            .await?;
        tracing::debug!(%caller, jti = %issued.claims.jti, "IssueToken");
        Ok(Response::new(api::IssueTokenReply {
            access_token: issued.token,
            jti: issued.claims.jti,
            expires_at: issued.claims.exp,
            subject: issued.claims.sub,
            kid: issued.kid,
            policy_ids: issued.policy_ids,
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
        let caller = self.admin(&request)?;
        let revoked = match request.into_inner().target {
            Some(Target::Jti(j)) => self.plane.revoke_jti(&caller, &j)?,
            Some(Target::Agent(a)) => self.plane.revoke_agent(&caller, &a)?,
            Some(Target::TaskId(t)) => {
                let task = self.plane.end_task(&caller, &t)?;
                format!("task {} ended", task.id)
            }
            Some(Target::Token(t)) => self.plane.revoke_token(&caller, &t)?,
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
        let caller = self.admin(&request)?;
        let r = request.into_inner();
        let agent = if r.attestation.trim().is_empty() {
            None
        } else {
            Some(self.plane.authenticate(&r.attestation).await?.subject)
        };
        let task =
            self.plane
                .start_task(&caller, agent, u64::from(r.ttl_seconds), r.description)?;
        Ok(Response::new(task_info(task)))
    }

    #[tracing::instrument(skip(self, request))]
    async fn end_task(
        &self,
        request: Request<api::EndTaskRequest>,
    ) -> Result<Response<api::TaskInfo>, Status> {
        let caller = self.admin(&request)?;
        let task = self
            .plane
            .end_task(&caller, &request.into_inner().task_id)?;
        Ok(Response::new(task_info(task)))
    }

    #[tracing::instrument(skip(self, request))]
    async fn apply_policy(
        &self,
        request: Request<api::ApplyPolicyRequest>,
    ) -> Result<Response<api::PolicyInfo>, Status> {
        let caller = self.admin(&request)?;
        let files = request
            .into_inner()
            .files
            .into_iter()
            .map(|f| (f.name, f.text))
            .collect();
        let info = self
            .plane
            .policy()
            .apply_files(files, &format!("ApplyPolicy by {caller}"))
            .map_err(|e| {
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
