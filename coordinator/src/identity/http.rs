//! The HTTPS listener (DESIGN.md §6, §7): OpenID discovery and RFC 8414 metadata, the
//! JWKS, the OAuth token endpoint (RFC 6749 §3.2), RFC 7662 introspection and RFC 7009
//! revocation.
//!
//! Discovery and the JWKS are public: the listener prefers X25519MLKEM768 and also
//! accepts classic groups, because most deployed verifiers cannot yet speak hybrid TLS.
//! The token, introspection and revocation endpoints carry tokens: unless the operator
//! opted in with `--allow-classic-token-endpoints`, they need a connection that
//! negotiated the hybrid group — checked per request, so a classic connection still gets
//! the JWKS but a clear 403 on the others. Introspection and revocation also need a
//! cluster client certificate; the token endpoint authenticates agents by their
//! attestations, registered clients' assertions (`private_key_jwt`) or X.509-SVIDs
//! (`tls_client_auth`).

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::{Extension, Form, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use hyper_util::rt::TokioIo;
use quorate_proto::tls::{self, Role};
use tokio::net::TcpListener;
use tokio_stream::StreamExt;
use tower::ServiceExt;

use super::{IdentityError, IdentityPlane};

/// What the TLS handshake established about a connection.
#[derive(Clone, Debug)]
struct ConnInfo {
    group: Option<String>,
    /// A cluster client (its certificate re-verified against the cluster CA alone).
    client: Option<String>,
    /// An agent's X.509-SVID (`tls_client_auth`, RFC 8705 §2), verified against its
    /// trust domain's bundle alone; the refusal if the certificate is neither kind.
    agent: Option<Result<crate::authn::Attestation, String>>,
}

impl ConnInfo {
    /// Classifies the client certificate of a finished handshake. The handshake admitted
    /// a chain to the cluster CA *or* to an agent bundle; each is checked here against its
    /// own anchor, so a certificate from an agent CA never passes for a cluster role.
    fn of(session: &rustls::ServerConnection, trust: &tls::Trust, plane: &IdentityPlane) -> Self {
        let group = tls::negotiated_group_name(session);
        let Some(chain) = session.peer_certificates() else {
            return ConnInfo {
                group,
                client: None,
                agent: None,
            };
        };
        if let Ok(Role::Client(name)) = trust.verify_peer_chain(chain) {
            return ConnInfo {
                group,
                client: Some(name),
                agent: None,
            };
        }
        let agent = plane.authn().verify_svid(chain).map_err(|e| e.to_string());
        ConnInfo {
            group,
            client: None,
            agent: Some(agent),
        }
    }
}

#[derive(Clone)]
struct Http {
    plane: Arc<IdentityPlane>,
    allow_classic_token_endpoints: bool,
}

/// Serves the metadata listener on `listener` until the returned task is aborted.
pub fn serve(
    listener: TcpListener,
    tls_config: Arc<rustls::ServerConfig>,
    plane: Arc<IdentityPlane>,
    trust: tls::Trust,
    allow_classic_token_endpoints: bool,
) -> tokio::task::JoinHandle<()> {
    let state_plane = Arc::clone(&plane);
    let state = Http {
        plane,
        allow_classic_token_endpoints,
    };
    let app = Router::new()
        .route("/.well-known/openid-configuration", get(metadata))
        .route("/.well-known/oauth-authorization-server", get(metadata))
        .route("/jwks.json", get(jwks))
        .route(super::CHECKPOINT_JWKS_PATH, get(checkpoint_jwks))
        .route("/token", post(token))
        .route("/introspect", post(introspect))
        .route("/revoke", post(revoke))
        .with_state(state);
    tokio::spawn(async move {
        let mut conns = Box::pin(quorate_proto::transport::incoming(listener, tls_config));
        while let Some(conn) = conns.next().await {
            let Ok(tls) = conn else { continue };
            let (_, session) = tls.get_ref();
            let info = ConnInfo::of(session, &trust, &state_plane);
            let app = app.clone().layer(Extension(info));
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(
                    move |req: hyper::Request<hyper::body::Incoming>| {
                        app.clone().oneshot(req.map(axum::body::Body::new))
                    },
                );
                if let Err(e) = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tls), svc)
                    .await
                {
                    tracing::debug!(error = %e, "metadata connection ended with an error");
                }
            });
        }
    })
}

fn json_response(status: StatusCode, body: serde_json::Value) -> Response {
    let mut r = (status, Json(body)).into_response();
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

fn oauth_error(status: StatusCode, error: &str, description: &str) -> Response {
    json_response(
        status,
        serde_json::json!({ "error": error, "error_description": description }),
    )
}

async fn metadata(State(s): State<Http>) -> Response {
    let iss = s.plane.issuer().to_owned();
    let body = serde_json::json!({
        "issuer": iss,
        "jwks_uri": format!("{iss}/jwks.json"),
        // Not an OAuth field: the keys of the audit trail's signed checkpoints, kept
        // apart from the token keys so that no token verifier trusts them.
        "quorate_checkpoint_jwks_uri": format!("{iss}{}", super::CHECKPOINT_JWKS_PATH),
        "token_endpoint": format!("{iss}/token"),
        // jwt-bearer: the agent's attestation is the assertion (no client
        // authentication needed; a cluster client certificate is recorded as the
        // caller); token-exchange: the actor's attestation is the actor token;
        // client_credentials: the agent is a registered client with its own key
        // (private_key_jwt) or presents its X.509-SVID (tls_client_auth).
        "token_endpoint_auth_methods_supported": ["none", "private_key_jwt", "tls_client_auth"],
        "introspection_endpoint": format!("{iss}/introspect"),
        "revocation_endpoint": format!("{iss}/revoke"),
        "introspection_endpoint_auth_methods_supported": ["tls_client_auth"],
        "revocation_endpoint_auth_methods_supported": ["tls_client_auth"],
        "tls_client_certificate_bound_access_tokens": false,
        "response_types_supported": ["token"],
        "grant_types_supported": [JWT_BEARER, TOKEN_EXCHANGE, CLIENT_CREDENTIALS],
        "subject_types_supported": ["public"],
        "id_token_signing_alg_values_supported": ["ES256"],
        "token_endpoint_auth_signing_alg_values_supported": ["ES256"],
        "access_token_signing_alg_values_supported": ["ES256"],
        // DPoP proofs at issuance name `POST <issuer>/token` (this endpoint, or the gRPC
        // IssueToken call); no DPoP-Nonce is asked for.
        "dpop_signing_alg_values_supported": ["ES256"],
        "scopes_supported": [],
        "service_documentation": "https://github.com/quorate/quorate",
    });
    let mut r = (StatusCode::OK, Json(body)).into_response();
    r.headers_mut().insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("public, max-age=300"),
    );
    r
}

async fn jwks(State(s): State<Http>) -> Response {
    key_set(s.plane.jwks())
}

async fn checkpoint_jwks(State(s): State<Http>) -> Response {
    key_set(s.plane.checkpoint_jwks())
}

fn key_set(keys: super::Result<serde_json::Value>) -> Response {
    match keys {
        Ok(keys) => {
            // Short cache: a rotated key must reach verifiers well within a token TTL.
            let mut r = (StatusCode::OK, Json(keys)).into_response();
            r.headers_mut().insert(
                header::CACHE_CONTROL,
                HeaderValue::from_static("public, max-age=60"),
            );
            r
        }
        Err(e) => oauth_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "temporarily_unavailable",
            &e.to_string(),
        ),
    }
}

/// The token endpoints' gate: a cluster client certificate, and the hybrid group
/// unless the operator opted in to classic key exchange.
fn token_endpoint_caller(s: &Http, info: &ConnInfo) -> Result<String, Box<Response>> {
    let hybrid = info.group.as_deref() == Some(tls::HYBRID_GROUP);
    if !hybrid && !s.allow_classic_token_endpoints {
        return Err(Box::new(oauth_error(
            StatusCode::FORBIDDEN,
            "invalid_request",
            &format!(
                "this endpoint carries tokens and requires the post-quantum key exchange {}; this connection negotiated {}",
                tls::HYBRID_GROUP,
                info.group.as_deref().unwrap_or("an unknown group")
            ),
        )));
    }
    info.client.clone().ok_or_else(|| {
        Box::new(oauth_error(
            StatusCode::UNAUTHORIZED,
            "invalid_client",
            "present a client certificate of the cluster CA (tls_client_auth)",
        ))
    })
}

/// RFC 7523 §2.1 grant type: the assertion is the agent's attestation.
const JWT_BEARER: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";
/// RFC 6749 §4.4 grant type: the client is the agent, authenticated as a client.
const CLIENT_CREDENTIALS: &str = "client_credentials";
/// RFC 7523 §2.2 client assertion type (`private_key_jwt`).
const CLIENT_ASSERTION_JWT: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";
/// RFC 8693 §2.1 grant type.
const TOKEN_EXCHANGE: &str = "urn:ietf:params:oauth:grant-type:token-exchange";
/// Lifetime of a token whose request names no `ttl`.
const DEFAULT_TTL_SECONDS: u64 = 300;
/// RFC 8693 §3 token types.
const ACCESS_TOKEN_TYPE: &str = "urn:ietf:params:oauth:token-type:access_token";
const JWT_TOKEN_TYPE: &str = "urn:ietf:params:oauth:token-type:jwt";

fn bad_request(error: &str, description: &str) -> Response {
    oauth_error(StatusCode::BAD_REQUEST, error, description)
}

/// A token endpoint refusal as RFC 6749 §5.2 (and RFC 8693 §2.2.2, RFC 9449 §5) name it.
fn token_error(e: &IdentityError) -> Response {
    let text = e.to_string();
    match e {
        IdentityError::Unauthenticated(_) | IdentityError::Denied(_) => {
            bad_request("invalid_grant", &text)
        }
        IdentityError::Invalid(m) if m.starts_with("DPoP proof") => {
            bad_request("invalid_dpop_proof", &text)
        }
        IdentityError::Invalid(_) | IdentityError::NotFound(_) => {
            bad_request("invalid_request", &text)
        }
        IdentityError::Precondition(_)
        | IdentityError::Cluster(_)
        | IdentityError::Store(_)
        | IdentityError::Audit(_) => {
            let mut r = oauth_error(
                StatusCode::SERVICE_UNAVAILABLE,
                "temporarily_unavailable",
                &text,
            );
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            r
        }
    }
}

/// The token endpoint's form: each parameter at most once (RFC 6749 §3.2).
fn single_params(form: Vec<(String, String)>) -> Result<HashMap<String, String>, Box<Response>> {
    let mut out = HashMap::new();
    for (k, v) in form {
        if out.insert(k.clone(), v).is_some() {
            return Err(Box::new(bad_request(
                if k == "resource" {
                    "invalid_target"
                } else {
                    "invalid_request"
                },
                &format!("the parameter `{k}` is given more than once"),
            )));
        }
    }
    Ok(out)
}

/// The audience of the token: RFC 8707 `resource`, or RFC 8693 `audience`, not both.
fn audience(form: &HashMap<String, String>) -> Result<String, Box<Response>> {
    match (form.get("resource"), form.get("audience")) {
        (Some(_), Some(_)) => Err(Box::new(bad_request(
            "invalid_target",
            "give the audience as `resource` (RFC 8707) or `audience` (RFC 8693), not both",
        ))),
        (Some(r), None) if r.contains('#') => Err(Box::new(bad_request(
            "invalid_target",
            "`resource` must not contain a fragment (RFC 8707 §2)",
        ))),
        (Some(a), None) | (None, Some(a)) => Ok(a.clone()),
        (None, None) => Ok(String::new()),
    }
}

fn scopes(form: &HashMap<String, String>) -> Vec<String> {
    form.get("scope")
        .map(|s| {
            s.split(' ')
                .filter(|x| !x.is_empty())
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default()
}

/// The agent an attestation proves, or the refusal (recorded in the audit trail) as a
/// token endpoint error.
async fn authenticated(
    s: &Http,
    attestation: &str,
    kind: &str,
    action: crate::policy::Action,
    caller: Option<&str>,
) -> Result<crate::authn::Attestation, Box<Response>> {
    match s.plane.authenticate(attestation).await {
        Ok(a) => Ok(a),
        Err(e) => {
            let e = s.plane.refuse(kind, action, caller, e).await;
            Err(Box::new(token_error(&e)))
        }
    }
}

fn token_success(issued: &super::Issued, exchanged: bool) -> Response {
    let token_type = if issued.claims.cnf.is_some() {
        "DPoP"
    } else {
        "Bearer"
    };
    let mut body = serde_json::json!({
        "access_token": issued.token,
        "token_type": token_type,
        "expires_in": (issued.claims.exp - super::now()).max(0),
        "scope": issued.claims.scope,
    });
    if exchanged && let Some(o) = body.as_object_mut() {
        o.insert("issued_token_type".into(), ACCESS_TOKEN_TYPE.into());
    }
    json_response(StatusCode::OK, body)
}

/// Issues a token for `agent` (the jwt-bearer and client_credentials grants) and answers
/// as RFC 6749 §5.1, or `authorization_pending` while a human decides.
async fn issue(
    s: &Http,
    agent: crate::authn::Attestation,
    audience: String,
    ttl_seconds: u64,
    form: &HashMap<String, String>,
    caller: Option<String>,
    dpop: Option<String>,
) -> Response {
    let param = |k: &str| form.get(k).filter(|v| !v.is_empty()).cloned();
    let outcome = s
        .plane
        .issue(super::TokenRequest {
            agent,
            audience,
            scopes: scopes(form),
            ttl_seconds,
            task_id: param("task_id"),
            context: std::collections::BTreeMap::new(),
            caller,
            dpop_proof: dpop,
            wait: std::time::Duration::ZERO,
            approval_id: param("approval_id"),
            retry: None,
        })
        .await;
    match outcome {
        Ok(super::IssueOutcome::Issued(issued)) => token_success(&issued, false),
        Ok(super::IssueOutcome::Pending { id, expires_at }) => json_response(
            StatusCode::BAD_REQUEST,
            serde_json::json!({
                "error": "authorization_pending",
                "error_description": "policy requires a human's approval; repeat the request with approval_id until it is decided",
                "approval_id": id,
                "approval_expires_at": expires_at,
                "interval": 5,
            }),
        ),
        Err(e) => token_error(&e),
    }
}

/// RFC 6749 §5.2 `invalid_client`, with status 401.
fn invalid_client(description: &str) -> Box<Response> {
    Box::new(oauth_error(
        StatusCode::UNAUTHORIZED,
        "invalid_client",
        description,
    ))
}

/// The agent behind a `client_credentials` request, authenticated as an OAuth client
/// (RFC 6749 §2.3) by `private_key_jwt` (a registered client's assertion, RFC 7523 §2.2,
/// one use each) or `tls_client_auth` (its X.509-SVID on this connection, RFC 8705 §2,
/// with `client_id` its SPIFFE ID). Refusals are recorded in the audit trail and answer
/// `invalid_client` (401).
async fn client_authentication(
    s: &Http,
    info: &ConnInfo,
    headers: &axum::http::HeaderMap,
    form: &HashMap<String, String>,
    caller: &Option<String>,
) -> Result<crate::authn::Attestation, Box<Response>> {
    use crate::authn::AuthMethod;
    let action = crate::policy::Action::IssueToken;
    if headers.contains_key(header::AUTHORIZATION) {
        let mut r = invalid_client(
            "client secrets (client_secret_basic) are not supported: authenticate with private_key_jwt (client_assertion) or tls_client_auth (an X.509-SVID client certificate)",
        );
        r.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Basic realm=\"quorate\""),
        );
        return Err(r);
    }
    let client_id = form.get("client_id").filter(|c| !c.is_empty());
    if let Some(kind) = form.get("client_assertion_type") {
        if kind != CLIENT_ASSERTION_JWT {
            return Err(invalid_client(&format!(
                "`client_assertion_type` must be {CLIENT_ASSERTION_JWT} (private_key_jwt)"
            )));
        }
        let Some(assertion) = form.get("client_assertion").filter(|a| !a.is_empty()) else {
            return Err(invalid_client(
                "`client_assertion_type` is given but `client_assertion` is missing",
            ));
        };
        let agent = match s.plane.authenticate(assertion).await {
            Ok(a) if a.method == AuthMethod::PrivateKeyJwt => a,
            Ok(a) => {
                let e = super::IdentityError::Invalid(format!(
                    "`client_assertion` is a {} attestation, not a client assertion: a registered client signs its own (iss and sub its client_id)",
                    a.method
                ));
                s.plane.refuse("token", action, caller.as_deref(), e).await;
                return Err(invalid_client(
                    "`client_assertion` must be signed by a registered client with iss = sub = its client_id (private_key_jwt); pass agent attestations with the jwt-bearer grant",
                ));
            }
            Err(e) => {
                let e = s.plane.refuse("token", action, caller.as_deref(), e).await;
                return Err(invalid_client(&e.to_string()));
            }
        };
        if let Some(id) = client_id
            && *id != agent.external_subject
        {
            return Err(invalid_client(&format!(
                "`client_id` {id:?} is not the client the assertion names ({:?})",
                agent.external_subject
            )));
        }
        return Ok(agent);
    }
    match &info.agent {
        Some(Ok(agent)) => match client_id {
            Some(id) if *id == agent.subject => Ok(agent.clone()),
            Some(id) => Err(invalid_client(&format!(
                "`client_id` {id:?} is not the SPIFFE ID of the client certificate ({}) (tls_client_auth, RFC 8705 §2)",
                agent.subject
            ))),
            None => Err(invalid_client(&format!(
                "tls_client_auth needs `client_id`: the SPIFFE ID of the client certificate ({}) (RFC 8705 §2)",
                agent.subject
            ))),
        },
        Some(Err(why)) => {
            let e = super::IdentityError::Invalid(format!("X.509-SVID refused: {why}"));
            let e = s.plane.refuse("token", action, caller.as_deref(), e).await;
            Err(invalid_client(&e.to_string()))
        }
        None if caller.is_some() => Err(invalid_client(
            "a cluster client certificate does not authenticate an agent: client_credentials needs private_key_jwt or an agent's X.509-SVID (tls_client_auth)",
        )),
        None => Err(invalid_client(
            "authenticate the client with private_key_jwt (`client_assertion_type` and `client_assertion`) or tls_client_auth (an X.509-SVID client certificate and `client_id`)",
        )),
    }
}

/// `POST /token` (RFC 6749 §3.2), deciding as the gRPC API does (same policy, evidence
/// and audit trail): `jwt-bearer` (RFC 7523, the agent's attestation as `assertion`),
/// `token-exchange` (RFC 8693, the sub-agent's attestation as `actor_token`) and
/// `client_credentials` (RFC 6749 §4.4; see [`client_authentication`]).
/// `resource` (RFC 8707) or `audience` sets the audience; `scope`, and the extensions
/// `ttl` (seconds, default 300), `task_id` and `approval_id`. A `DPoP` header (RFC 9449 §5) binds the
/// token to its key. A request that needs a human's approval answers
/// `authorization_pending` with the `approval_id` to poll with (as RFC 8628 §3.5
/// polls). Same transport gate as introspection: the hybrid group unless the operator
/// allowed classic; a cluster client certificate is optional here and, if present,
/// recorded as the caller.
async fn token(
    State(s): State<Http>,
    Extension(info): Extension<ConnInfo>,
    headers: axum::http::HeaderMap,
    form: Result<Form<Vec<(String, String)>>, axum::extract::rejection::FormRejection>,
) -> Response {
    let hybrid = info.group.as_deref() == Some(tls::HYBRID_GROUP);
    if !hybrid && !s.allow_classic_token_endpoints {
        return oauth_error(
            StatusCode::FORBIDDEN,
            "invalid_request",
            &format!(
                "the token endpoint requires the post-quantum key exchange {}; this connection negotiated {}",
                tls::HYBRID_GROUP,
                info.group.as_deref().unwrap_or("an unknown group")
            ),
        );
    }
    let Ok(Form(form)) = form else {
        return bad_request(
            "invalid_request",
            "the body must be application/x-www-form-urlencoded (RFC 6749 §3.2)",
        );
    };
    let form = match single_params(form) {
        Ok(f) => f,
        Err(r) => return *r,
    };
    let dpop = match headers
        .get_all("dpop")
        .iter()
        .collect::<Vec<_>>()
        .as_slice()
    {
        [] => None,
        [one] => match one.to_str() {
            Ok(v) => Some(v.to_owned()),
            Err(_) => return bad_request("invalid_dpop_proof", "the DPoP header is not ASCII"),
        },
        _ => {
            return bad_request(
                "invalid_dpop_proof",
                "more than one DPoP header (RFC 9449 §4.3)",
            );
        }
    };
    let audience = match audience(&form) {
        Ok(a) => a,
        Err(r) => return *r,
    };
    let ttl_seconds = match form.get("ttl").map(|t| t.parse::<u64>()) {
        // As the CLI's default; policy and the key's rules may cap it.
        None => DEFAULT_TTL_SECONDS,
        Some(Ok(t)) => t,
        Some(Err(_)) => return bad_request("invalid_request", "`ttl` must be whole seconds"),
    };
    let caller = info.client.clone();
    let param = |k: &str| form.get(k).filter(|v| !v.is_empty()).cloned();
    let grant = form.get("grant_type").map(String::as_str);
    if grant != Some(CLIENT_CREDENTIALS)
        && (form.contains_key("client_assertion") || form.contains_key("client_assertion_type"))
    {
        return bad_request(
            "invalid_request",
            "client authentication (`client_assertion`) is used with the client_credentials grant only; in the jwt-bearer and token-exchange grants the agent's attestation authenticates it",
        );
    }
    if matches!(grant, Some(JWT_BEARER | CLIENT_CREDENTIALS)) && audience.is_empty() {
        return bad_request(
            "invalid_target",
            "name the token's audience with `resource` (RFC 8707) or `audience`",
        );
    }
    match grant {
        Some(JWT_BEARER) => {
            let Some(assertion) = param("assertion") else {
                return bad_request(
                    "invalid_request",
                    "the jwt-bearer grant needs `assertion`: the agent's attestation (RFC 7523 §2.1)",
                );
            };
            let agent = match authenticated(
                &s,
                &assertion,
                "token",
                crate::policy::Action::IssueToken,
                caller.as_deref(),
            )
            .await
            {
                Ok(a) => a,
                Err(r) => return *r,
            };
            issue(&s, agent, audience, ttl_seconds, &form, caller, dpop).await
        }
        Some(CLIENT_CREDENTIALS) => {
            let agent = match client_authentication(&s, &info, &headers, &form, &caller).await {
                Ok(a) => a,
                Err(r) => return *r,
            };
            issue(&s, agent, audience, ttl_seconds, &form, caller, dpop).await
        }
        Some(TOKEN_EXCHANGE) => {
            let (Some(subject), Some(actor)) = (param("subject_token"), param("actor_token"))
            else {
                return bad_request(
                    "invalid_request",
                    "token exchange needs `subject_token` (the delegating agent's Quorate token) and `actor_token` (the sub-agent's attestation)",
                );
            };
            if !matches!(
                form.get("subject_token_type").map(String::as_str),
                Some(ACCESS_TOKEN_TYPE | JWT_TOKEN_TYPE)
            ) {
                return bad_request(
                    "invalid_request",
                    &format!(
                        "`subject_token_type` must be {ACCESS_TOKEN_TYPE} or {JWT_TOKEN_TYPE}"
                    ),
                );
            }
            if form.get("actor_token_type").map(String::as_str) != Some(JWT_TOKEN_TYPE) {
                return bad_request(
                    "invalid_request",
                    &format!(
                        "`actor_token_type` must be {JWT_TOKEN_TYPE} (the sub-agent's attestation)"
                    ),
                );
            }
            if let Some(t) = form.get("requested_token_type")
                && t != ACCESS_TOKEN_TYPE
            {
                return bad_request(
                    "invalid_request",
                    &format!("only {ACCESS_TOKEN_TYPE} can be issued"),
                );
            }
            let actor = match authenticated(
                &s,
                &actor,
                "exchange",
                crate::policy::Action::ExchangeToken,
                caller.as_deref(),
            )
            .await
            {
                Ok(a) => a,
                Err(r) => return *r,
            };
            let issued = s
                .plane
                .exchange(super::ExchangeRequest {
                    subject_token: subject,
                    actor,
                    audience,
                    scopes: scopes(&form),
                    ttl_seconds,
                    dpop_proof: dpop,
                    context: std::collections::BTreeMap::new(),
                    caller,
                    retry: None,
                })
                .await;
            match issued {
                Ok(issued) => token_success(&issued, true),
                Err(e) => token_error(&e),
            }
        }
        Some(other) => bad_request(
            "unsupported_grant_type",
            &format!(
                "grant type {other:?} is not supported: use {JWT_BEARER}, {TOKEN_EXCHANGE} or {CLIENT_CREDENTIALS}"
            ),
        ),
        None => bad_request("invalid_request", "the form has no `grant_type`"),
    }
}

/// The caller and the `token` form parameter of a token endpoint request.
fn token_endpoint_request<'f>(
    s: &Http,
    info: &ConnInfo,
    form: &'f HashMap<String, String>,
) -> Result<(String, &'f String), Box<Response>> {
    let caller = token_endpoint_caller(s, info)?;
    let token = form.get("token").ok_or_else(|| {
        Box::new(oauth_error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "the form has no `token` parameter",
        ))
    })?;
    Ok((caller, token))
}

async fn introspect(
    State(s): State<Http>,
    Extension(info): Extension<ConnInfo>,
    Form(form): Form<HashMap<String, String>>,
) -> Response {
    let (caller, token) = match token_endpoint_request(&s, &info, &form) {
        Ok(ct) => ct,
        Err(r) => return *r,
    };
    match s.plane.introspect(token) {
        Ok(body) => {
            tracing::debug!(%caller, "introspection over HTTPS");
            json_response(StatusCode::OK, body)
        }
        Err(e) => oauth_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "temporarily_unavailable",
            &e.to_string(),
        ),
    }
}

async fn revoke(
    State(s): State<Http>,
    Extension(info): Extension<ConnInfo>,
    Form(form): Form<HashMap<String, String>>,
) -> Response {
    let (caller, token) = match token_endpoint_request(&s, &info, &form) {
        Ok(ct) => ct,
        Err(r) => return *r,
    };
    match s.plane.revoke_token(&caller, token).await {
        // RFC 7009 §2.2: invalid tokens also get 200.
        Ok(_) | Err(IdentityError::Invalid(_)) => StatusCode::OK.into_response(),
        Err(e) => oauth_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "temporarily_unavailable",
            &e.to_string(),
        ),
    }
}
