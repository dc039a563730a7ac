//! The HTTPS metadata listener (DESIGN.md §6, §7): OpenID discovery and RFC 8414
//! metadata, the JWKS, RFC 7662 introspection and RFC 7009 revocation.
//!
//! Discovery and the JWKS are public: the listener prefers X25519MLKEM768 and also
//! accepts classic groups, because most deployed verifiers cannot yet speak hybrid TLS.
//! Introspection and revocation carry tokens: they require a cluster client certificate
//! (`tls_client_auth`) and, unless the operator opted in with
//! `--allow-classic-token-endpoints`, a connection that negotiated the hybrid group —
//! checked per request, so a classic connection still gets the JWKS but a clear 403 on
//! the token endpoints.

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
    client: Option<String>,
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
    allow_classic_token_endpoints: bool,
) -> tokio::task::JoinHandle<()> {
    let domain = plane.domain().to_owned();
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
            let info = ConnInfo {
                group: tls::negotiated_group_name(session),
                client: session
                    .peer_certificates()
                    .and_then(|c| tls::peer_role(c, &domain).ok())
                    .and_then(|r| match r {
                        Role::Client(name) => Some(name),
                        _ => None,
                    }),
            };
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
        // caller); token-exchange: the actor's attestation is the actor token.
        "token_endpoint_auth_methods_supported": ["none", "tls_client_auth"],
        "introspection_endpoint": format!("{iss}/introspect"),
        "revocation_endpoint": format!("{iss}/revoke"),
        "introspection_endpoint_auth_methods_supported": ["tls_client_auth"],
        "revocation_endpoint_auth_methods_supported": ["tls_client_auth"],
        "tls_client_certificate_bound_access_tokens": false,
        "response_types_supported": ["token"],
        "grant_types_supported": [JWT_BEARER, TOKEN_EXCHANGE],
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

/// `POST /token` (RFC 6749 §3.2), deciding as the gRPC API does (same policy, evidence
/// and audit trail): `jwt-bearer` (RFC 7523, the agent's attestation as `assertion`)
/// and `token-exchange` (RFC 8693, the sub-agent's attestation as `actor_token`).
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
    match form.get("grant_type").map(String::as_str) {
        Some(JWT_BEARER) => {
            let Some(assertion) = param("assertion") else {
                return bad_request(
                    "invalid_request",
                    "the jwt-bearer grant needs `assertion`: the agent's attestation (RFC 7523 §2.1)",
                );
            };
            if audience.is_empty() {
                return bad_request(
                    "invalid_target",
                    "name the token's audience with `resource` (RFC 8707) or `audience`",
                );
            }
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
            let outcome = s
                .plane
                .issue(super::TokenRequest {
                    agent,
                    audience,
                    scopes: scopes(&form),
                    ttl_seconds,
                    task_id: param("task_id"),
                    context: std::collections::BTreeMap::new(),
                    caller,
                    dpop_proof: dpop,
                    wait: std::time::Duration::ZERO,
                    approval_id: param("approval_id"),
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
                })
                .await;
            match issued {
                Ok(issued) => token_success(&issued, true),
                Err(e) => token_error(&e),
            }
        }
        Some(other) => bad_request(
            "unsupported_grant_type",
            &format!("grant type {other:?} is not supported: use {JWT_BEARER} or {TOKEN_EXCHANGE}"),
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
