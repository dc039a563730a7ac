//! The public API (STYLE.md §5): KeyService and ClusterService. Callers must hold a
//! client certificate of the cluster CA (checked by the TLS config and again here).

use std::sync::Arc;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use quorate_crypto::Point;
use quorate_crypto::keys::{KeyPublic, KeyPurpose};
use quorate_crypto::tdh::DhInput;
use quorate_crypto::wire::Wire;
use quorate_proto::api::{
    self, cluster_service_server::ClusterService, key_service_server::KeyService,
};
use quorate_proto::tls::Role;
use sha2::Digest;
use tonic::{Request, Response, Status};

use crate::audit::AuditLog;
use crate::audit::record::{Fields, Outcome};
use crate::cluster::{Cluster, KeyProfile, KeyVersionInfo, TokenRules};
use crate::policy::{Action, PolicyContext, PolicyEngine, PolicyRequest, Principal, Resource};

/// The service state.
#[derive(Clone)]
pub struct Api {
    cluster: Arc<Cluster>,
    domain: String,
    policy: Arc<PolicyEngine>,
    audit: Arc<AuditLog>,
}

impl Api {
    /// Wraps the cluster; `policy` decides which client may use which key, and every
    /// decision goes to `audit` before its answer.
    pub fn new(
        cluster: Arc<Cluster>,
        domain: String,
        policy: Arc<PolicyEngine>,
        audit: Arc<AuditLog>,
    ) -> Self {
        Api {
            cluster,
            domain,
            policy,
            audit,
        }
    }

    /// Asks policy whether client `caller` may do `action` on key `name`
    /// (`Client::"<name>"`, e.g. `admin` for key creation and rotation), runs `op` if so,
    /// and records the decision and the outcome in the audit trail before answering.
    /// The audit event names the operation `what` (`create_key`, `sign`, ...).
    async fn audited<T, F>(
        &self,
        caller: &str,
        action: Action,
        what: &str,
        name: &str,
        op: F,
    ) -> Result<T, Status>
    where
        F: Future<Output = Result<(T, Vec<u16>), Status>>,
    {
        let d = self.policy.decide(&PolicyRequest {
            principal: Principal::Client {
                name: caller.to_owned(),
            },
            action,
            resource: Resource::Key(name.to_owned()),
            context: PolicyContext {
                now: crate::identity::now(),
                ..PolicyContext::default()
            },
        });
        let fields = |reason: Option<String>, nodes: Vec<u16>| Fields {
            kind: "key".into(),
            action: what.into(),
            caller: Some(caller.to_owned()),
            resource: Some(Resource::Key(name.to_owned()).to_string()),
            policy_ids: d.policy_ids.clone(),
            reason,
            key: Some(name.to_owned()),
            nodes,
            ..Fields::default()
        };
        if !d.allowed {
            let why = format!(
                "client {caller} may not {action} key {name}: {}",
                d.explain()
            );
            self.audit
                .append(Outcome::Deny, fields(Some(why.clone()), Vec::new()))
                .await?;
            return Err(Status::permission_denied(why));
        }
        match op.await {
            Ok((value, nodes)) => {
                self.audit
                    .append(Outcome::Allow, fields(None, nodes))
                    .await?;
                Ok(value)
            }
            Err(e) => {
                self.audit
                    .append(
                        Outcome::Error,
                        fields(Some(e.message().to_owned()), Vec::new()),
                    )
                    .await?;
                Err(e)
            }
        }
    }

    fn caller<T>(&self, req: &Request<T>) -> Result<String, Status> {
        match quorate_proto::transport::peer_role_of(req, &self.domain)? {
            Role::Client(name) => Ok(name),
            other => Err(Status::permission_denied(format!(
                "the key API is for clients; caller is {other}"
            ))),
        }
    }
}

fn purpose_from_api(p: i32) -> Result<KeyPurpose, Status> {
    match api::Purpose::try_from(p) {
        Ok(api::Purpose::Sign) | Ok(api::Purpose::Unspecified) => Ok(KeyPurpose::Sign),
        Ok(api::Purpose::Derive) => Ok(KeyPurpose::Derive),
        Ok(api::Purpose::Decrypt) => Ok(KeyPurpose::Decrypt),
        Err(_) => Err(Status::invalid_argument(
            "purpose must be sign, derive or decrypt",
        )),
    }
}

fn purpose_to_api(p: KeyPurpose) -> api::Purpose {
    match p {
        KeyPurpose::Sign => api::Purpose::Sign,
        KeyPurpose::Derive => api::Purpose::Derive,
        KeyPurpose::Decrypt => api::Purpose::Decrypt,
    }
}

fn check_name(name: &str) -> Result<(), Status> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(Status::invalid_argument(
            "key name must be 1-64 characters: letters, digits, '-', '_' or '.'",
        ))
    }
}

fn key_info(v: &KeyVersionInfo) -> api::KeyInfo {
    let k = &v.public;
    api::KeyInfo {
        name: v.name.clone(),
        key_id: k.key_id.to_string(),
        purpose: purpose_to_api(k.purpose) as i32,
        n: u32::from(k.params.n()),
        t: u32::from(k.params.t()),
        epoch: k.epoch,
        public_key: k.public_key().to_bytes().to_vec(),
        token_rules: v.profile.token_rules().map(TokenRules::to_api),
        version: v.version,
        kid: v.kid(),
        profile: v.profile.to_api().0 as i32,
        renewed_at: 0,
        holders: k
            .params
            .all_parties()
            .members()
            .iter()
            .map(|p| u32::from(p.get()))
            .collect(),
    }
}

/// The profile of a CreateKey request: `profile` (with token rules for a token key), or,
/// when it is unspecified, the legacy `purpose` (sign → raw, or token with rules). A
/// checkpoint key is refused: the coordinator creates its own (`--audit-key`), so that
/// no client can add a key to the checkpoint JWKS.
fn profile_from_api(r: &api::CreateKeyRequest) -> Result<KeyProfile, Status> {
    // Unspecified: the profile follows from the legacy purpose and the rules.
    let wire = match (
        api::KeyProfile::try_from(r.profile),
        purpose_from_api(r.purpose),
    ) {
        (Ok(api::KeyProfile::Unspecified), Ok(KeyPurpose::Sign)) if r.token_rules.is_some() => {
            api::KeyProfile::Token as i32
        }
        (Ok(api::KeyProfile::Unspecified), Ok(KeyPurpose::Sign)) => api::KeyProfile::Raw as i32,
        (Ok(api::KeyProfile::Unspecified), Ok(KeyPurpose::Derive)) => {
            api::KeyProfile::Derive as i32
        }
        (Ok(api::KeyProfile::Unspecified), Ok(KeyPurpose::Decrypt)) => {
            api::KeyProfile::Decrypt as i32
        }
        (Ok(api::KeyProfile::Unspecified), Err(e)) => return Err(e),
        _ => r.profile,
    };
    let profile = KeyProfile::from_api(wire, r.token_rules.as_ref())
        .map_err(|e| Status::invalid_argument(e.to_string()))?;
    if profile == KeyProfile::Checkpoint {
        return Err(Status::invalid_argument(
            "checkpoint keys are created by the coordinator for its audit trail (--audit-key), not through the API",
        ));
    }
    Ok(profile)
}

/// The SPKI PEM of a public key.
pub fn spki_pem(x: &Point) -> Result<String, Status> {
    use p256::pkcs8::EncodePublicKey;
    let pk = p256::PublicKey::from_sec1_bytes(&x.to_bytes())
        .map_err(|_| Status::internal("public key does not encode"))?;
    pk.to_public_key_pem(p256::pkcs8::LineEnding::LF)
        .map_err(|_| Status::internal("public key does not encode"))
}

/// The RFC 7517 JWK of a key.
pub fn jwk(k: &KeyPublic) -> String {
    let u = k.public_key().to_uncompressed();
    let x = URL_SAFE_NO_PAD.encode(u.get(1..33).unwrap_or(&[]));
    let y = URL_SAFE_NO_PAD.encode(u.get(33..).unwrap_or(&[]));
    let usage = match k.purpose {
        KeyPurpose::Sign => r#","use":"sig","alg":"ES256""#,
        KeyPurpose::Decrypt => r#","use":"enc""#,
        KeyPurpose::Derive => "",
    };
    format!(
        r#"{{"kty":"EC","crv":"P-256","x":"{x}","y":"{y}","kid":"{}"{usage}}}"#,
        k.key_id
    )
}

impl Api {
    fn key_info_now(&self, v: &KeyVersionInfo) -> api::KeyInfo {
        let mut info = key_info(v);
        info.renewed_at = self
            .cluster
            .renewed_at(&v.public.key_id)
            .ok()
            .flatten()
            .unwrap_or(0);
        info
    }
}

#[tonic::async_trait]
impl KeyService for Api {
    #[tracing::instrument(skip(self, request))]
    async fn refresh_key(
        &self,
        request: Request<api::RefreshKeyRequest>,
    ) -> Result<Response<api::KeyInfo>, Status> {
        let caller = self.caller(&request)?;
        let r = request.into_inner();
        check_name(&r.name)?;
        let all = self.cluster.all_nodes();
        let version = self
            .audited(&caller, Action::Admin, "refresh_key", &r.name, async {
                Ok((self.cluster.refresh_key(&r.name).await?, all))
            })
            .await?;
        tracing::info!(%caller, key = r.name, epoch = version.public.epoch, "RefreshKey");
        Ok(Response::new(self.key_info_now(&version)))
    }

    #[tracing::instrument(skip(self, request))]
    async fn rotate_key(
        &self,
        request: Request<api::RotateKeyRequest>,
    ) -> Result<Response<api::KeyInfo>, Status> {
        let caller = self.caller(&request)?;
        let r = request.into_inner();
        check_name(&r.name)?;
        let all = self.cluster.all_nodes();
        let version = self
            .audited(&caller, Action::Admin, "rotate_key", &r.name, async {
                Ok((self.cluster.rotate_key(&r.name).await?, all))
            })
            .await?;
        tracing::info!(%caller, key = r.name, version = version.version, "RotateKey");
        Ok(Response::new(key_info(&version)))
    }

    #[tracing::instrument(skip(self, request))]
    async fn create_key(
        &self,
        request: Request<api::CreateKeyRequest>,
    ) -> Result<Response<api::KeyInfo>, Status> {
        let caller = self.caller(&request)?;
        let r = request.into_inner();
        check_name(&r.name)?;
        let profile = profile_from_api(&r)?;
        let all = self.cluster.all_nodes();
        let version = self
            .audited(&caller, Action::Admin, "create_key", &r.name, async {
                self.cluster.create_key(&r.name, profile).await?;
                Ok((self.cluster.current_version(&r.name)?, all))
            })
            .await?;
        tracing::info!(%caller, key = r.name, "CreateKey");
        Ok(Response::new(key_info(&version)))
    }

    async fn list_keys(
        &self,
        request: Request<api::ListKeysRequest>,
    ) -> Result<Response<api::ListKeysReply>, Status> {
        self.caller(&request)?;
        let keys = self.cluster.current_versions()?;
        Ok(Response::new(api::ListKeysReply {
            keys: keys.iter().map(|k| self.key_info_now(k)).collect(),
        }))
    }

    async fn get_public_key(
        &self,
        request: Request<api::GetPublicKeyRequest>,
    ) -> Result<Response<api::PublicKeyReply>, Status> {
        self.caller(&request)?;
        let name = request.into_inner().name;
        let v = self.cluster.current_version(&name)?;
        Ok(Response::new(api::PublicKeyReply {
            key: Some(self.key_info_now(&v)),
            spki_pem: spki_pem(&v.public.public_key())?,
            jwk_json: jwk(&v.public),
        }))
    }

    #[tracing::instrument(skip(self, request))]
    async fn sign(
        &self,
        request: Request<api::SignRequest>,
    ) -> Result<Response<api::SignReply>, Status> {
        let caller = self.caller(&request)?;
        let r = request.into_inner();
        let digest: [u8; 32] = match r.input {
            Some(api::sign_request::Input::Message(m)) => sha2::Sha256::digest(&m).into(),
            Some(api::sign_request::Input::Digest(d)) => d.as_slice().try_into().map_err(|_| {
                Status::invalid_argument(format!(
                    "digest must be 32 bytes (SHA-256), got {}",
                    d.len()
                ))
            })?,
            None => {
                return Err(Status::invalid_argument(
                    "give a message or a digest to sign",
                ));
            }
        };
        let sig = self
            .audited(&caller, Action::Sign, "sign", &r.name, async {
                Ok(self.cluster.sign(&r.name, digest).await?)
            })
            .await?;
        let signature = match api::SignatureFormat::try_from(r.format) {
            Ok(api::SignatureFormat::Der) => {
                sig.to_der().map_err(|e| Status::internal(e.to_string()))?
            }
            Ok(_) => sig.to_raw().to_vec(),
            Err(_) => return Err(Status::invalid_argument("format must be raw or der")),
        };
        let key = self.cluster.key(&r.name)?;
        tracing::info!(%caller, key = r.name, "Sign");
        Ok(Response::new(api::SignReply {
            signature,
            key_id: key.key_id.to_string(),
        }))
    }

    #[tracing::instrument(skip(self, request))]
    async fn derive(
        &self,
        request: Request<api::DeriveRequest>,
    ) -> Result<Response<api::DeriveReply>, Status> {
        let caller = self.caller(&request)?;
        let r = request.into_inner();
        let a = Point::from_bytes(&r.requester_public)
            .map_err(|e| Status::invalid_argument(format!("requester_public: {e}")))?;
        if quorate_authz::credential::CredentialContext::claims_to_be(&r.context) {
            return Err(Status::invalid_argument(
                "context: a context starting with QUORATE-CREDENTIAL-V1 names an agent's credential; ask for it with RequestCredential (`quorate credential get`)",
            ));
        }
        let resp = self
            .audited(&caller, Action::Derive, "derive", &r.name, async {
                Ok(self
                    .cluster
                    .dh(&r.name, DhInput::Derive { context: r.context }, a, None)
                    .await?)
            })
            .await?;
        tracing::info!(%caller, key = r.name, "Derive");
        Ok(Response::new(api::DeriveReply {
            masked: resp.to_bytes(),
        }))
    }

    #[tracing::instrument(skip(self, request))]
    async fn decrypt(
        &self,
        request: Request<api::DecryptRequest>,
    ) -> Result<Response<api::DecryptReply>, Status> {
        let caller = self.caller(&request)?;
        let r = request.into_inner();
        let a = Point::from_bytes(&r.requester_public)
            .map_err(|e| Status::invalid_argument(format!("requester_public: {e}")))?;
        let ct = quorate_crypto::ecies::EciesCiphertext::from_bytes(&r.ciphertext)
            .map_err(|e| Status::invalid_argument(format!("ciphertext: {e}")))?;
        let resp = self
            .audited(&caller, Action::Decrypt, "decrypt", &r.name, async {
                Ok(self
                    .cluster
                    .dh(
                        &r.name,
                        DhInput::Decrypt {
                            point: ct.ephemeral,
                        },
                        a,
                        None,
                    )
                    .await?)
            })
            .await?;
        tracing::info!(%caller, key = r.name, "Decrypt");
        Ok(Response::new(api::DecryptReply {
            masked: resp.to_bytes(),
        }))
    }
}

#[tonic::async_trait]
impl ClusterService for Api {
    #[tracing::instrument(skip(self, request))]
    async fn repair_node(
        &self,
        request: Request<api::RepairNodeRequest>,
    ) -> Result<Response<api::RepairNodeReply>, Status> {
        let caller = self.caller(&request)?;
        let index = u16::try_from(request.into_inner().index)
            .map_err(|_| Status::invalid_argument("node index out of range"))?;
        let all = self.cluster.all_nodes();
        let resource = format!("node-{index}");
        let done = self
            .audited(&caller, Action::Admin, "repair_node", &resource, async {
                Ok((self.cluster.repair_node(index).await?, all))
            })
            .await?;
        tracing::info!(%caller, node = index, keys = done.len(), "RepairNode");
        let keys = self
            .cluster
            .current_versions()?
            .iter()
            .map(|v| self.key_info_now(v))
            .collect();
        Ok(Response::new(api::RepairNodeReply { keys }))
    }

    async fn status(
        &self,
        request: Request<api::StatusRequest>,
    ) -> Result<Response<api::StatusReply>, Status> {
        self.caller(&request)?;
        let params = self.cluster.params();
        let nodes = self
            .cluster
            .node_views()
            .await
            .into_iter()
            .map(|v| api::NodeStatus {
                index: u32::from(v.index),
                address: v.addr.to_string(),
                healthy: v.healthy,
                error: v.error,
                version: v.version,
            })
            .collect();
        let pools = self
            .cluster
            .pool_depths()?
            .into_iter()
            .map(|(key_name, set, depth)| api::PoolStatus {
                key_name,
                signing_set: set.members().iter().map(|p| u32::from(p.get())).collect(),
                depth: depth as u64,
            })
            .collect();
        let keys = self
            .cluster
            .current_versions()?
            .iter()
            .map(|v| self.key_info_now(v))
            .collect();
        Ok(Response::new(api::StatusReply {
            n: u32::from(params.n()),
            t: u32::from(params.t()),
            nodes,
            pools,
            keys,
            pending_activations: self.cluster.pending_activations(),
        }))
    }
}
