//! The example resource server against a real cluster (node and coordinator processes):
//! it discovers the coordinator's issuer over HTTPS with the cluster CA, and protects its
//! tool with tokens the cluster signs by threshold — challenges, scope, audience, altered
//! signatures, and key rotation reaching it through a JWKS refetch on an unknown `kid`.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use http_body_util::{BodyExt as _, Full};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use quorate_proto::api;
use quorate_tests::{Proc, TempDir, TestCluster, TestIssuer, spawn_ready};
use serde_json::{Value, json};

const META_PATH: &str = "/.well-known/oauth-protected-resource";

/// Agents may get tokens for the audiences "dev" (this server's) and "other"; the
/// admin client (creating and rotating the token key) may do everything.
const POLICY: &str = r#"
@id("agents-dev")
permit (principal is Agent, action == Action::"issue_token", resource == Audience::"dev");

@id("agents-other")
permit (principal is Agent, action == Action::"issue_token", resource == Audience::"other");

@id("admin-client")
permit (principal == Client::"admin", action, resource);
"#;

/// A response: status, `WWW-Authenticate` (if any), JSON body (`null` if not JSON).
#[derive(Debug)]
struct Reply {
    status: u16,
    challenge: Option<String>,
    json: Value,
}

/// One HTTP/1.1 request on a fresh connection.
async fn call(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: &str,
) -> Reply {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .unwrap();
    let driver = tokio::spawn(conn);
    let mut req = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header(hyper::header::HOST, addr.to_string())
        .header(hyper::header::CONTENT_TYPE, "application/json");
    if let Some(t) = token {
        req = req.header(hyper::header::AUTHORIZATION, format!("Bearer {t}"));
    }
    let req = req
        .body(Full::new(Bytes::from(body.as_bytes().to_vec())))
        .unwrap();
    let response = sender.send_request(req).await.unwrap();
    let status = response.status().as_u16();
    let challenge = response
        .headers()
        .get(hyper::header::WWW_AUTHENTICATE)
        .map(|v| v.to_str().unwrap().to_owned());
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    driver.abort();
    Reply {
        status,
        challenge,
        json: serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    }
}

async fn echo(rs: &Proc, token: Option<&str>, text: &str) -> Reply {
    call(
        rs.addr,
        "POST",
        "/tools/echo",
        token,
        &json!({ "text": text }).to_string(),
    )
    .await
}

async fn issue(
    cluster: &TestCluster,
    attestation: &str,
    audience: &str,
    scopes: &[&str],
) -> api::IssueTokenReply {
    cluster
        .identity_api()
        .await
        .issue_token(api::IssueTokenRequest {
            attestation: attestation.into(),
            audience: audience.into(),
            scopes: scopes.iter().map(|s| s.to_string()).collect(),
            ttl_seconds: 300,
            task_id: String::new(),
            context: Default::default(),
        })
        .await
        .unwrap()
        .into_inner()
}

/// `token` with one bit of its signature flipped.
fn alter_signature(token: &str) -> String {
    let (input, sig) = token.rsplit_once('.').unwrap();
    let mut sig = URL_SAFE_NO_PAD.decode(sig).unwrap();
    sig[10] ^= 0x01;
    format!("{input}.{}", URL_SAFE_NO_PAD.encode(sig))
}

fn resource_server(cluster: &TestCluster, ca: bool) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_quorate-resource-server"));
    cmd.arg("--issuer")
        .arg(cluster.issuer())
        .arg("--audience")
        .arg("dev")
        .arg("--listen")
        .arg("127.0.0.1:0")
        .env_remove("QUORATE_CACERT")
        .env_remove("QUORATE_ISSUER")
        .env("QUORATE_LOG", "warn");
    if ca {
        cmd.arg("--ca").arg(cluster.dir.0.join("ca.pem"));
    }
    cmd
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resource_server_against_cluster() {
    let cfg = TempDir::new("rs-cfg");
    let attester = TestIssuer::new(&cfg.0);
    let policy_dir = cfg.0.join("policy");
    std::fs::create_dir_all(&policy_dir).unwrap();
    std::fs::write(policy_dir.join("agents.cedar"), POLICY).unwrap();
    let pd = policy_dir.display().to_string();
    let tc = cfg.0.join("trust.json").display().to_string();
    let cluster = TestCluster::start(
        "resource-server",
        3,
        1,
        &["--policy-dir", &pd, "--trust-config", &tc],
    );
    cluster.create_token_key("tokens", 900, 4).await;

    // Without the cluster CA, discovery cannot verify the issuer's certificate: exit 3
    // with a message that says no root was given.
    let out = resource_server(&cluster, false)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    assert!(stderr.contains("no --ca or QUORATE_CACERT"), "{stderr}");

    let rs = spawn_ready(resource_server(&cluster, true));
    let resource = format!("http://{}", rs.addr);
    let metadata_url = format!("{resource}{META_PATH}");

    // RFC 9728 metadata names this resource and the cluster as its authorization server.
    let meta = call(rs.addr, "GET", META_PATH, None, "").await;
    assert_eq!(meta.status, 200);
    assert_eq!(meta.json["resource"], resource);
    assert_eq!(
        meta.json["authorization_servers"],
        json!([cluster.issuer()])
    );
    assert_eq!(meta.json["scopes_supported"], json!(["tools:run"]));
    assert_eq!(meta.json["bearer_methods_supported"], json!(["header"]));
    assert_eq!(
        meta.json["resource_signing_alg_values_supported"],
        json!(["ES256"])
    );

    // No token: 401 pointing at the metadata (how an MCP client finds the issuer).
    let r = echo(&rs, None, "hi").await;
    assert_eq!(r.status, 401);
    assert_eq!(
        r.challenge.as_deref(),
        Some(format!("Bearer resource_metadata=\"{metadata_url}\"").as_str())
    );

    // A token with the tool's scope: 200, and the echo names the agent.
    let agent = attester.attest("agent-1", json!({}));
    let good = issue(&cluster, &agent, "dev", &["tools:run"]).await;
    let r = echo(&rs, Some(&good.access_token), "hello tool").await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.json["echo"], "hello tool");
    assert_eq!(r.json["agent"], good.subject);
    assert!(
        good.subject.ends_with("/agent/test/agent-1"),
        "{}",
        good.subject
    );
    assert_eq!(r.json["jti"], good.jti);
    assert_eq!(r.json["scope"], "tools:run");
    assert_eq!(r.json["task_id"], Value::Null);

    // A valid token without the scope: 403 insufficient_scope.
    let narrow = issue(&cluster, &agent, "dev", &["tools:read"]).await;
    let r = echo(&rs, Some(&narrow.access_token), "hi").await;
    assert_eq!(r.status, 403, "{r:?}");
    assert_eq!(
        r.challenge.as_deref(),
        Some(
            format!(
                "Bearer error=\"insufficient_scope\", scope=\"tools:run\", resource_metadata=\"{metadata_url}\""
            )
            .as_str()
        )
    );

    // A token for another audience: 401 invalid_token.
    let other = issue(&cluster, &agent, "other", &["tools:run"]).await;
    let r = echo(&rs, Some(&other.access_token), "hi").await;
    assert_eq!(r.status, 401, "{r:?}");
    assert_eq!(
        r.challenge.as_deref(),
        Some(
            format!(
                "Bearer error=\"invalid_token\", error_description=\"wrong audience\", resource_metadata=\"{metadata_url}\""
            )
            .as_str()
        )
    );

    // An altered signature: 401 invalid_token.
    let r = echo(&rs, Some(&alter_signature(&good.access_token)), "hi").await;
    assert_eq!(r.status, 401, "{r:?}");
    assert!(
        r.challenge
            .as_deref()
            .unwrap()
            .contains("error=\"invalid_token\", error_description=\"bad signature\""),
        "{r:?}"
    );
    assert_eq!(r.json["error"], "invalid_token");

    // Rotation: the new key version signs from now on; the server learns its kid by
    // refetching the JWKS (at most once per 10 s since its last fetch, so allow for that).
    let rotated = cluster
        .keys()
        .await
        .rotate_key(api::RotateKeyRequest {
            name: "tokens".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_ne!(rotated.kid, good.kid);
    cluster
        .wait_pools("tokens", 2, Duration::from_secs(120))
        .await;
    let fresh = issue(&cluster, &agent, "dev", &["tools:run"]).await;
    assert_eq!(fresh.kid, rotated.kid);
    let deadline = Instant::now() + Duration::from_secs(20);
    let r = loop {
        let r = echo(&rs, Some(&fresh.access_token), "after rotation").await;
        let rate_limited = r.status == 401
            && r.json["error_description"] == "unknown signing key"
            && Instant::now() < deadline;
        if !rate_limited {
            break r;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.json["jti"], fresh.jti);
    // The token signed before the rotation is still good for its lifetime.
    let r = echo(&rs, Some(&good.access_token), "old key").await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.json["agent"], good.subject);
}
