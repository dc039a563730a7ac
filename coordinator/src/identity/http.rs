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
        "introspection_endpoint": format!("{iss}/introspect"),
        "revocation_endpoint": format!("{iss}/revoke"),
        "introspection_endpoint_auth_methods_supported": ["tls_client_auth"],
        "revocation_endpoint_auth_methods_supported": ["tls_client_auth"],
        "tls_client_certificate_bound_access_tokens": false,
        "response_types_supported": ["token"],
        "grant_types_supported": [],
        "subject_types_supported": ["public"],
        "id_token_signing_alg_values_supported": ["ES256"],
        "token_endpoint_auth_signing_alg_values_supported": ["ES256"],
        "access_token_signing_alg_values_supported": ["ES256"],
        // DPoP proofs at issuance name `POST <issuer>/token` (the gRPC IssueToken call).
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
