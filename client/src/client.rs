//! The typed async client.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use quorate_crypto::Point;
use quorate_crypto::ecies::{self, EciesCiphertext};
use quorate_crypto::keys::KeyPurpose;
use quorate_crypto::tdh::{self, Credential, DhResponse, Requester};
use quorate_crypto::wire::Wire as _;
use quorate_proto::api;
use quorate_proto::api::approval_service_client::ApprovalServiceClient;
use quorate_proto::api::audit_service_client::AuditServiceClient;
use quorate_proto::api::cluster_service_client::ClusterServiceClient;
use quorate_proto::api::identity_service_client::IdentityServiceClient;
use quorate_proto::api::key_service_client::KeyServiceClient;
use quorate_proto::profile::KeyProfile;
use quorate_proto::tls::{self, Identity, Role, TlsError, Trust};
use tonic::transport::Channel;
use zeroize::Zeroizing;

use crate::config::ClientConfig;
use crate::error::{Error, Result};
use crate::keyfmt;

mod failover;
pub mod identity;

use failover::{Endpoints, Failure, Retry};

/// How long a request may take before the client gives up, unless changed with
/// [`Client::with_timeout`].
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);

/// Largest reply accepted from the coordinator.
const MAX_REPLY: usize = 16 * 1024 * 1024;

/// What to sign.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SignInput {
    /// A message; the cluster hashes it with SHA-256.
    Message(Vec<u8>),
    /// A SHA-256 digest computed by the caller.
    Digest([u8; 32]),
}

/// Signature encoding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// `r || s`, 64 bytes (JWS ES256).
    Raw,
    /// ASN.1 DER `ECDSA-Sig-Value` (OpenSSL, X.509).
    Der,
}

/// A key's public data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyInfo {
    /// The key's name.
    pub name: String,
    /// The key's identifier (also the JWK `kid`).
    pub key_id: String,
    /// What the key may be used for.
    pub purpose: KeyPurpose,
    /// Number of fragment nodes holding shares.
    pub n: u32,
    /// Corruption threshold: any `t` nodes learn nothing; `t + 1` sign.
    pub t: u32,
    /// Share epoch (increases with each refresh).
    pub epoch: u32,
    /// The public key.
    pub public_key: Point,
    /// What the key may be used for; a token key carries its rules.
    pub profile: KeyProfile,
    /// 1 for a new key, +1 per rotation.
    pub version: u32,
    /// The JWS `kid` of this version.
    pub kid: String,
    /// When the shares were last renewed by refresh or reshare (Unix seconds); `None`
    /// if never since the key was created.
    pub renewed_at: Option<i64>,
    /// The indices of the `n` nodes holding the shares, increasing.
    pub holders: Vec<u32>,
}

/// A public key with its standard encodings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublicKey {
    /// The key.
    pub info: KeyInfo,
    /// SubjectPublicKeyInfo, PEM.
    pub spki_pem: String,
    /// RFC 7517 JWK, JSON.
    pub jwk_json: String,
}

/// A signature.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Signature {
    /// The signature in the requested [`Format`].
    pub signature: Vec<u8>,
    /// The identifier of the key that made it.
    pub key_id: String,
}

/// A fragment node as the coordinator sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeStatus {
    /// The node's index (1..=n).
    pub index: u32,
    /// Its address.
    pub address: String,
    /// Whether its last health check passed.
    pub healthy: bool,
    /// The last error, if unhealthy.
    pub error: String,
    /// The node's build version (empty if it did not answer).
    pub version: String,
}

/// A presignature pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolStatus {
    /// The key the pool signs for.
    pub key_name: String,
    /// The nodes that must all answer to use these presignatures.
    pub signing_set: Vec<u32>,
    /// How many presignatures are ready.
    pub depth: u64,
}

/// The cluster's state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterStatus {
    /// Number of fragment nodes.
    pub n: u32,
    /// Corruption threshold.
    pub t: u32,
    /// Every node.
    pub nodes: Vec<NodeStatus>,
    /// Every presignature pool.
    pub pools: Vec<PoolStatus>,
    /// Every key's current version (share epoch, last renewal).
    pub keys: Vec<KeyInfo>,
    /// Renewals decided but not yet active on every node.
    pub pending_activations: u32,
}

/// A connection to the public API of a cluster's coordinators.
///
/// Cheap to clone; clones share the connections. Every call is bounded by the client's
/// timeout ([`DEFAULT_TIMEOUT`] unless set with [`Client::with_timeout`]), retries
/// included.
///
/// **Failover.** Given several coordinator addresses ([`ClientConfig::addrs`]), the
/// client sends each call to the coordinator that answered last and, on a retryable
/// failure, sends it again to the next one: reads, `sign`, `derive`, `decrypt`,
/// `issue_token` and `exchange_token` (with one `request_id` for every attempt), revoke
/// and end task after a lost connection or `UNAVAILABLE`; calls that create something
/// (keys, tasks, policies, approval decisions) only when the request provably never
/// reached a coordinator (connection refused, TLS handshake not completed). A
/// coordinator's own refusal (`PERMISSION_DENIED`, `INVALID_ARGUMENT`, ...) is never
/// retried. After every coordinator has failed once, each further round waits a short
/// jittered backoff (50 ms, doubling); a call makes at most three rounds. The error of
/// a call that failed on several coordinators names each of them and why.
#[derive(Debug, Clone)]
pub struct Client {
    endpoints: Arc<Endpoints>,
    timeout: Duration,
}

impl Client {
    /// Connects to the coordinator over post-quantum mutual TLS.
    ///
    /// Loads the CA and the client certificate and key (a [`Error::Config`] names the
    /// file at fault), checks that the certificate is a client's, and completes the TLS
    /// handshake now: the coordinator must present `coordinator.<domain>`'s
    /// certificate from the cluster CA. Failing to connect is [`Error::Unreachable`].
    pub async fn connect(config: &ClientConfig) -> Result<Self> {
        let config_error = |e: TlsError| Error::Config(e.to_string());
        let identity = Identity::from_pem_files(&config.cert, &config.key).map_err(config_error)?;
        match identity.role(&config.domain) {
            Ok(Role::Client(_)) => {}
            Ok(other) => {
                return Err(Error::Config(format!(
                    "{} is the certificate of {other}, but the coordinator's public API accepts \
                     only client certificates: use client-admin.pem (and client-admin-key.pem) \
                     from `quorate admin init`",
                    config.cert.display()
                )));
            }
            Err(e) => {
                return Err(Error::Config(format!(
                    "{}: {e} (if the cluster uses another trust domain, pass --domain or set QUORATE_DOMAIN)",
                    config.cert.display()
                )));
            }
        }
        let trust = Trust::from_pem_file(&config.ca, &config.domain).map_err(config_error)?;
        Self::open(&config.addrs(), &identity, &trust, &config.domain).await
    }

    /// Connects to the coordinator's agent listener (`--agent-listen`) as an agent that
    /// authenticates with its X.509-SVID (`svid_cert`: the SVID and any intermediates,
    /// PEM; `svid_key`: its PKCS#8 key). The coordinator must present
    /// `coordinator.<domain>`'s certificate from the cluster CA `ca`, as on the public
    /// API.
    ///
    /// Only [`Client::issue_token`] (with an empty attestation: the SVID is the
    /// attestation) and [`Client::exchange_token`] are open to an agent; the coordinator
    /// refuses everything else with `PermissionDenied`. A refused SVID is refused per
    /// request, with its reason ([`Error::Refused`]).
    ///
    /// Errors: [`Error::Config`] naming the file at fault; [`Error::Unreachable`].
    pub async fn connect_agent(
        addr: SocketAddr,
        ca: &std::path::Path,
        domain: &str,
        svid_cert: &std::path::Path,
        svid_key: &std::path::Path,
    ) -> Result<Self> {
        let config_error = |e: TlsError| Error::Config(e.to_string());
        let identity = Identity::from_pem_files(svid_cert, svid_key).map_err(config_error)?;
        let trust = Trust::from_pem_file(ca, domain).map_err(config_error)?;
        Self::open(&[addr], &identity, &trust, domain).await
    }

    /// Completes the TLS handshake with `coordinator.<domain>` at the first of `addrs`
    /// that answers, as `identity`; the others are connected on first use.
    async fn open(
        addrs: &[SocketAddr],
        identity: &Identity,
        trust: &Trust,
        domain: &str,
    ) -> Result<Self> {
        let config_error = |e: TlsError| Error::Config(e.to_string());
        let tls = tls::client_config(identity, trust).map_err(config_error)?;
        let endpoints = Endpoints::new(addrs, tls, domain);
        let mut tried = Vec::new();
        let mut last = None;
        for i in 0..endpoints.len() {
            let Some(addr) = endpoints.addr(i) else {
                break;
            };
            match endpoints.channel(i, DEFAULT_TIMEOUT).await {
                Ok(_) => {
                    endpoints.prefer(i);
                    return Ok(Client {
                        endpoints: Arc::new(endpoints),
                        timeout: DEFAULT_TIMEOUT,
                    });
                }
                Err(e) => {
                    tried.push((addr, e.reason.clone()));
                    last = Some(Error::connect(addr, e.reason));
                }
            }
        }
        Err(failover::name_tried(
            last.unwrap_or_else(|| Error::Config("no coordinator address".to_owned())),
            &tried,
        ))
    }

    /// Sets how long each call may take.
    #[must_use]
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// A bare unary round trip: the standard gRPC health check (`grpc.health.v1`) on
    /// the same post-quantum mTLS channel as every other call. The coordinator answers
    /// it without touching a node, so it is the floor under any operation's latency.
    pub async fn ping(&self) -> Result<()> {
        use tonic_health::pb::health_check_response::ServingStatus;
        let req = tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        };
        let reply = self
            .invoke("health check", Retry::Idempotent, req, |ch, r| async move {
                tonic_health::pb::health_client::HealthClient::new(ch)
                    .check(r)
                    .await
            })
            .await?;
        if reply.status == ServingStatus::Serving as i32 {
            Ok(())
        } else {
            Err(malformed("health check", "a status other than SERVING"))
        }
    }

    /// The address of the coordinator calls go to first: the one that answered last.
    pub fn addr(&self) -> SocketAddr {
        let i = self.endpoints.preferred();
        // `Endpoints` always holds at least one address (`open` connected to one).
        self.endpoints
            .addr(i)
            .unwrap_or(SocketAddr::from(([0, 0, 0, 0], 0)))
    }

    /// How many times this client (and its clones) sent a call again after a retryable
    /// failure, to the next coordinator (or the same one, if it is the only one).
    pub fn retries(&self) -> u64 {
        self.endpoints.retries()
    }

    /// Every coordinator address this client may send to, in failover order from the
    /// first configured.
    pub fn addrs(&self) -> Vec<SocketAddr> {
        (0..self.endpoints.len())
            .filter_map(|i| self.endpoints.addr(i))
            .collect()
    }

    /// Creates a key with a fresh distributed key generation across all nodes: a signing
    /// key of the raw profile, or a derive or decrypt key.
    pub async fn create_key(&self, name: &str, purpose: KeyPurpose) -> Result<KeyInfo> {
        self.create_key_with_profile(name, &KeyProfile::legacy(purpose, None))
            .await
    }

    /// Creates a key of `profile` (DESIGN.md §9), fixed for the key's lifetime and every
    /// version; every fragment node refuses any other use. A token key's rules must fit
    /// every node's ceiling.
    pub async fn create_key_with_profile(
        &self,
        name: &str,
        profile: &KeyProfile,
    ) -> Result<KeyInfo> {
        let (wire, rules) = profile.to_api();
        let req = api::CreateKeyRequest {
            name: name.to_owned(),
            purpose: purpose_to_wire(profile.purpose()) as i32,
            token_rules: rules,
            profile: wire as i32,
        };
        let info = self
            .invoke("create the key", Retry::Unsent, req, |ch, r| async move {
                keys_api(ch).create_key(r).await
            })
            .await?;
        key_info(info)
    }

    /// Adds a new version of a signing key (a fresh distributed key generation under the
    /// same name and rules) and returns it; the previous version stays verifiable for
    /// its tokens' lifetime.
    pub async fn rotate_key(&self, name: &str) -> Result<KeyInfo> {
        let req = api::RotateKeyRequest {
            name: name.to_owned(),
        };
        let info = self
            .invoke("rotate the key", Retry::Unsent, req, |ch, r| async move {
                keys_api(ch).rotate_key(r).await
            })
            .await?;
        key_info(info)
    }

    /// Proactive refresh of a key's shares (DESIGN.md §4.3): same key id, public key
    /// and JWKS entry; the returned key has the next epoch. Needs every node up.
    pub async fn refresh_key(&self, name: &str) -> Result<KeyInfo> {
        let req = api::RefreshKeyRequest {
            name: name.to_owned(),
        };
        let info = self
            .invoke("refresh the key", Retry::Unsent, req, |ch, r| async move {
                keys_api(ch).refresh_key(r).await
            })
            .await?;
        key_info(info)
    }

    /// Gives node `index` (a lost disk, a replacement under the same index) a share of
    /// every key again by resharing (DESIGN.md §4.3); returns every key's current
    /// version after it. Needs every node up.
    pub async fn repair_node(&self, index: u16) -> Result<Vec<KeyInfo>> {
        let req = api::RepairNodeRequest {
            index: u32::from(index),
        };
        let reply = self
            .invoke("repair the node", Retry::Unsent, req, |ch, r| async move {
                cluster_api(ch).repair_node(r).await
            })
            .await?;
        reply.keys.into_iter().map(key_info).collect()
    }

    /// Lists every key.
    pub async fn list_keys(&self) -> Result<Vec<KeyInfo>> {
        let reply = self
            .invoke(
                "list keys",
                Retry::Idempotent,
                api::ListKeysRequest {},
                |ch, r| async move { keys_api(ch).list_keys(r).await },
            )
            .await?;
        reply.keys.into_iter().map(key_info).collect()
    }

    /// A key's public key, as SPKI PEM and JWK.
    ///
    /// The encodings are the coordinator's; if it sends none, they are computed here
    /// from the public point ([`keyfmt`]).
    pub async fn public_key(&self, name: &str) -> Result<PublicKey> {
        let req = api::GetPublicKeyRequest {
            name: name.to_owned(),
        };
        let reply = self
            .invoke(
                "get the public key",
                Retry::Idempotent,
                req,
                |ch, r| async move { keys_api(ch).get_public_key(r).await },
            )
            .await?;
        let info = key_info(
            reply
                .key
                .ok_or_else(|| malformed("get the public key", "the reply names no key"))?,
        )?;
        let spki_pem = if reply.spki_pem.trim().is_empty() {
            keyfmt::spki_pem(&info.public_key)
        } else {
            reply.spki_pem
        };
        let jwk_json = if reply.jwk_json.trim().is_empty() {
            keyfmt::jwk(&info.public_key, &info.key_id, info.purpose).to_string()
        } else {
            reply.jwk_json
        };
        Ok(PublicKey {
            info,
            spki_pem,
            jwk_json,
        })
    }

    /// Signs a message or a SHA-256 digest with an ES256 key.
    pub async fn sign(&self, name: &str, input: SignInput, format: Format) -> Result<Signature> {
        let input = match input {
            SignInput::Message(m) => api::sign_request::Input::Message(m),
            SignInput::Digest(d) => api::sign_request::Input::Digest(d.to_vec()),
        };
        let req = api::SignRequest {
            name: name.to_owned(),
            input: Some(input),
            format: match format {
                Format::Raw => api::SignatureFormat::Raw,
                Format::Der => api::SignatureFormat::Der,
            } as i32,
        };
        let reply = self
            .invoke("sign", Retry::Idempotent, req, |ch, r| async move {
                keys_api(ch).sign(r).await
            })
            .await?;
        let well_formed = match format {
            Format::Raw => reply.signature.len() == 64,
            Format::Der => (8..=72).contains(&reply.signature.len()),
        };
        if !well_formed {
            return Err(malformed(
                "sign",
                &format!("a {format:?} signature of {} bytes", reply.signature.len()),
            ));
        }
        Ok(Signature {
            signature: reply.signature,
            key_id: reply.key_id,
        })
    }

    /// Derives the credential for `context` from a derivation key.
    ///
    /// The reply is masked to a fresh requester key made here; only this client can
    /// unmask it. The credential is `HKDF-SHA256(x·H2C(context), info = context)`.
    pub async fn derive(&self, name: &str, context: &[u8]) -> Result<Credential> {
        if context.is_empty() || context.len() > tdh::MAX_CONTEXT {
            return Err(Error::Usage(format!(
                "a derivation context has 1 to {} bytes, got {}",
                tdh::MAX_CONTEXT,
                context.len()
            )));
        }
        let requester = Requester::new(&mut rng()?).map_err(bug)?;
        let req = api::DeriveRequest {
            name: name.to_owned(),
            context: context.to_vec(),
            requester_public: requester.public().to_bytes().to_vec(),
        };
        let reply = self
            .invoke("derive", Retry::Idempotent, req, |ch, r| async move {
                keys_api(ch).derive(r).await
            })
            .await?;
        let shared = unmask(&requester, &reply.masked, "derive")?;
        tdh::derive_credential(&shared, context).map_err(bug)
    }

    /// Encrypts `plaintext` to a decryption key (ECIES; DESIGN.md §4.6) and returns the
    /// ciphertext encoding that [`Client::decrypt`] takes. Only the public key is
    /// fetched from the cluster: the plaintext never leaves this process.
    pub async fn encrypt(&self, name: &str, plaintext: &[u8], aad: &[u8]) -> Result<Vec<u8>> {
        let key = self.public_key(name).await?.info;
        if key.purpose != KeyPurpose::Decrypt {
            return Err(Error::Usage(format!(
                "key `{name}` is a {} key; encrypt to a key created with \
                 `quorate key create NAME --purpose decrypt`",
                key.purpose.name()
            )));
        }
        let ct = ecies::encrypt(&mut rng()?, &key.public_key, plaintext, aad).map_err(bug)?;
        Ok(ct.to_bytes())
    }

    /// Decrypts a ciphertext made by [`Client::encrypt`] with the same `aad`.
    ///
    /// The nodes compute the masked shared point; only this client can unmask it and
    /// decrypt, so the plaintext never leaves this process.
    pub async fn decrypt(
        &self,
        name: &str,
        ciphertext: &[u8],
        aad: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>> {
        let ct = EciesCiphertext::from_bytes(ciphertext).map_err(|e| {
            Error::Usage(format!(
                "the input is not a Quorate ciphertext ({e}): decrypt the output of `quorate encrypt`"
            ))
        })?;
        let key = self.public_key(name).await?.info;
        let requester = Requester::new(&mut rng()?).map_err(bug)?;
        let req = api::DecryptRequest {
            name: name.to_owned(),
            ciphertext: ciphertext.to_vec(),
            requester_public: requester.public().to_bytes().to_vec(),
        };
        let reply = self
            .invoke("decrypt", Retry::Idempotent, req, |ch, r| async move {
                keys_api(ch).decrypt(r).await
            })
            .await?;
        let shared = unmask(&requester, &reply.masked, "decrypt")?;
        ecies::decrypt_with_shared(&shared, &key.public_key, &ct, aad).map_err(|_| {
            Error::Other(format!(
                "the ciphertext does not decrypt under key `{name}`: it was encrypted to \
                 another key, altered, or with other associated data (check --aad)"
            ))
        })
    }

    /// The cluster's state: nodes' health and presignature pool depths.
    pub async fn status(&self) -> Result<ClusterStatus> {
        let reply = self
            .invoke(
                "report status",
                Retry::Idempotent,
                api::StatusRequest {},
                |ch, r| async move { cluster_api(ch).status(r).await },
            )
            .await?;
        Ok(ClusterStatus {
            n: reply.n,
            t: reply.t,
            nodes: reply
                .nodes
                .into_iter()
                .map(|n| NodeStatus {
                    index: n.index,
                    address: n.address,
                    healthy: n.healthy,
                    error: n.error,
                    version: n.version,
                })
                .collect(),
            pools: reply
                .pools
                .into_iter()
                .map(|p| PoolStatus {
                    key_name: p.key_name,
                    signing_set: p.signing_set,
                    depth: p.depth,
                })
                .collect(),
            keys: reply
                .keys
                .into_iter()
                .map(key_info)
                .collect::<Result<_>>()?,
            pending_activations: reply.pending_activations,
        })
    }

    /// Sends `req` with `send` to the coordinators, failing over as [`Retry`] allows,
    /// all within the client's timeout; classifies the last failure.
    async fn invoke<Req, R, F, Fut>(
        &self,
        op: &'static str,
        retry: Retry,
        req: Req,
        send: F,
    ) -> Result<R>
    where
        Req: Clone,
        F: Fn(Channel, tonic::Request<Req>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<R>, tonic::Status>>,
    {
        self.invoke_long(op, retry, Duration::ZERO, req, send).await
    }

    /// [`Self::invoke`] for a call that may legitimately take `extra` longer.
    async fn invoke_long<Req, R, F, Fut>(
        &self,
        op: &'static str,
        retry: Retry,
        extra: Duration,
        req: Req,
        send: F,
    ) -> Result<R>
    where
        Req: Clone,
        F: Fn(Channel, tonic::Request<Req>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<R>, tonic::Status>>,
    {
        let budget = self.timeout.saturating_add(extra);
        let start = Instant::now();
        // A little more than the budget locally, so the server's own deadline error
        // arrives first when it can.
        let give_up = start + budget.saturating_add(Duration::from_secs(1));
        let n = self.endpoints.len();
        let first = self.endpoints.preferred();
        let mut tried: Vec<(SocketAddr, String)> = Vec::new();
        let mut attempt = 0;
        loop {
            let i = (first + attempt) % n.max(1);
            let addr = self
                .endpoints
                .addr(i)
                .unwrap_or(SocketAddr::from(([0, 0, 0, 0], 0)));
            let remaining = budget.saturating_sub(start.elapsed());
            let (error, failure) = match self.endpoints.channel(i, remaining).await {
                Err(e) => {
                    tried.push((addr, e.reason.clone()));
                    (Error::connect(addr, e.reason), e.failure)
                }
                Ok(channel) => {
                    let mut request = tonic::Request::new(req.clone());
                    request.set_timeout(budget.saturating_sub(start.elapsed()));
                    let limit = give_up.saturating_duration_since(Instant::now());
                    match tokio::time::timeout(limit, send(channel, request)).await {
                        Err(_elapsed) => {
                            tried.push((addr, "no answer in time".to_owned()));
                            let e = Error::timeout(op, addr, budget);
                            return Err(failover::name_tried(e, &tried));
                        }
                        Ok(Ok(reply)) => {
                            if attempt > 0 {
                                tracing::debug!(op, %addr, attempt, "answered after failing over");
                            }
                            self.endpoints.prefer(i);
                            return Ok(reply.into_inner());
                        }
                        Ok(Err(status)) => {
                            let failure = failover::classify(&status);
                            let why = match status.code() {
                                tonic::Code::Unknown | tonic::Code::Internal
                                    if failure != Failure::Final =>
                                {
                                    "connection lost".to_owned()
                                }
                                code => format!("{code:?}"),
                            };
                            tried.push((addr, why));
                            (Error::from_status(op, addr, &status), failure)
                        }
                    }
                }
            };
            attempt += 1;
            let pause = failover::backoff(attempt, n, jitter());
            let out_of_time = start.elapsed().saturating_add(pause) >= budget;
            if !failure.allows(retry) || attempt >= failover::max_attempts(n) || out_of_time {
                return Err(failover::name_tried(error, &tried));
            }
            tracing::debug!(op, %addr, attempt, "retrying on the next coordinator");
            self.endpoints.count_retry();
            if !pause.is_zero() {
                tokio::time::sleep(pause).await;
            }
        }
    }
}

/// A random number for backoff jitter (not secret).
fn jitter() -> u64 {
    use rand::Rng as _;
    rng().map(|mut r| r.next_u64()).unwrap_or(0)
}

fn keys_api(ch: Channel) -> KeyServiceClient<Channel> {
    KeyServiceClient::new(ch).max_decoding_message_size(MAX_REPLY)
}

fn cluster_api(ch: Channel) -> ClusterServiceClient<Channel> {
    ClusterServiceClient::new(ch).max_decoding_message_size(MAX_REPLY)
}

pub(crate) fn identity_api(ch: Channel) -> IdentityServiceClient<Channel> {
    IdentityServiceClient::new(ch).max_decoding_message_size(MAX_REPLY)
}

pub(crate) fn approvals_api(ch: Channel) -> ApprovalServiceClient<Channel> {
    ApprovalServiceClient::new(ch).max_decoding_message_size(MAX_REPLY)
}

pub(crate) fn audit_api(ch: Channel) -> AuditServiceClient<Channel> {
    AuditServiceClient::new(ch).max_decoding_message_size(MAX_REPLY)
}

fn purpose_to_wire(p: KeyPurpose) -> api::Purpose {
    match p {
        KeyPurpose::Sign => api::Purpose::Sign,
        KeyPurpose::Derive => api::Purpose::Derive,
        KeyPurpose::Decrypt => api::Purpose::Decrypt,
    }
}

fn key_info(k: api::KeyInfo) -> Result<KeyInfo> {
    let purpose = match api::Purpose::try_from(k.purpose) {
        Ok(api::Purpose::Sign) => KeyPurpose::Sign,
        Ok(api::Purpose::Derive) => KeyPurpose::Derive,
        Ok(api::Purpose::Decrypt) => KeyPurpose::Decrypt,
        Ok(api::Purpose::Unspecified) | Err(_) => {
            return Err(malformed(
                "describe the key",
                &format!("key `{}` with unknown purpose {}", k.name, k.purpose),
            ));
        }
    };
    let public_key = Point::from_bytes(&k.public_key).map_err(|e| {
        malformed(
            "describe the key",
            &format!("key `{}` with an invalid public key ({e})", k.name),
        )
    })?;
    let profile = KeyProfile::from_api(k.profile, k.token_rules.as_ref()).map_err(|e| {
        malformed(
            "describe the key",
            &format!("key `{}` with an invalid profile ({e})", k.name),
        )
    })?;
    Ok(KeyInfo {
        name: k.name,
        key_id: k.key_id,
        purpose,
        n: k.n,
        t: k.t,
        epoch: k.epoch,
        public_key,
        profile,
        version: k.version,
        kid: k.kid,
        renewed_at: (k.renewed_at > 0).then_some(k.renewed_at),
        holders: if k.holders.is_empty() {
            (1..=k.n).collect()
        } else {
            k.holders
        },
    })
}

pub(crate) fn unmask(requester: &Requester, masked: &[u8], op: &str) -> Result<tdh::SharedPoint> {
    let resp = DhResponse::from_bytes(masked)
        .map_err(|e| malformed(op, &format!("a masked response that does not decode ({e})")))?;
    requester.unmask(&resp).map_err(bug)
}

fn malformed(op: &str, what: &str) -> Error {
    Error::Other(format!(
        "the coordinator answered `{op}` with {what}: check that the client and cluster versions match"
    ))
}

pub(crate) fn bug(e: quorate_crypto::Error) -> Error {
    Error::Other(format!("internal error in the client: {e}"))
}

/// A fresh CSPRNG seeded from the operating system.
pub(crate) fn rng() -> Result<rand::rngs::StdRng> {
    use rand::SeedableRng as _;
    rand::rngs::StdRng::try_from_rng(&mut rand::rngs::SysRng)
        .map_err(|e| Error::Other(format!("the system random number generator failed: {e}")))
}
