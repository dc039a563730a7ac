//! The example resource server against a real cluster (node and coordinator processes):
//! it discovers the coordinator's issuer over HTTPS with the cluster CA, and protects its
//! tool with tokens the cluster signs by threshold — challenges, scope, audience, altered
//! signatures, key rotation reaching it through a JWKS refetch on an unknown `kid`, and
//! RFC 9449 DPoP: a token the cluster binds to a client key is usable only with fresh
//! proofs by that key.
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
use quorate_proto::dpop::DpopKey;
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

/// One HTTP/1.1 request on a fresh connection, with a bearer token if given.
async fn call(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: &str,
) -> Reply {
    let auth = token.map(|t| format!("Bearer {t}"));
    call_with(addr, method, path, auth.as_deref(), &[], body).await
}

/// One HTTP/1.1 request on a fresh connection, with an `Authorization` value and one
/// `DPoP` header per proof.
async fn call_with(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    authorization: Option<&str>,
    proofs: &[&str],
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
    if let Some(a) = authorization {
        req = req.header(hyper::header::AUTHORIZATION, a);
    }
    for p in proofs {
        req = req.header("DPoP", *p);
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

/// The tool called with `Authorization: DPoP <token>` and the given proofs.
async fn echo_dpop(rs: &Proc, token: &str, proofs: &[&str], text: &str) -> Reply {
    call_with(
        rs.addr,
        "POST",
        "/tools/echo",
        Some(&format!("DPoP {token}")),
        proofs,
        &json!({ "text": text }).to_string(),
    )
    .await
}

fn token_request(attestation: &str, audience: &str, scopes: &[&str]) -> api::IssueTokenRequest {
    api::IssueTokenRequest {
        attestation: attestation.into(),
        audience: audience.into(),
        scopes: scopes.iter().map(|s| s.to_string()).collect(),
        ttl_seconds: 300,
        ..Default::default()
    }
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
        .issue_token(token_request(attestation, audience, scopes))
        .await
        .unwrap()
        .into_inner()
}

/// The claims of a JWT (no verification: the resource server does that).
fn claims_of(token: &str) -> Value {
    let payload = token.split('.').nth(1).unwrap();
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).unwrap()).unwrap()
}

/// Asserts a `401` with a DPoP `invalid_dpop_proof` challenge naming `want`.
fn assert_bad_proof(r: &Reply, want: &str) {
    assert_eq!(r.status, 401, "{r:?}");
    let c = r.challenge.as_deref().unwrap();
    assert!(c.starts_with("DPoP error=\"invalid_dpop_proof\""), "{r:?}");
    assert!(c.contains("algs=\"ES256\""), "{r:?}");
    assert_eq!(r.json["error"], "invalid_dpop_proof");
    assert!(
        r.json["error_description"].as_str().unwrap().contains(want),
        "{r:?} (want {want})"
    );
}

/// RFC 9449 against the cluster: the coordinator binds a token to the key of the proof
/// sent with the token request (`cnf.jkt`, `token_type` DPoP), and the resource server
/// accepts it only with a fresh proof by that key.
async fn dpop_bound_token_against_cluster(cluster: &TestCluster, rs: &Proc, agent: &str) {
    let holder = DpopKey::generate().unwrap();
    let token_url = format!("{}/token", cluster.issuer());
    let proof = holder.proof("POST", &token_url, None).unwrap();
    let mut req = token_request(agent, "dev", &["tools:run"]);
    req.dpop_proof = proof.clone();
    let bound = cluster
        .identity_api()
        .await
        .issue_token(req.clone())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(bound.token_type, "DPoP");
    assert_eq!(
        claims_of(&bound.access_token)["cnf"],
        json!({"jkt": holder.thumbprint()})
    );
    let token = bound.access_token.as_str();

    // The coordinator refuses the same token-request proof twice.
    let replayed = cluster.identity_api().await.issue_token(req).await;
    let status = replayed.expect_err("a replayed token-request proof is refused");
    assert!(status.message().contains("DPoP"), "{status:?}");

    let htu = format!("http://{}/tools/echo", rs.addr);
    let proof = holder.proof("POST", &htu, Some(token)).unwrap();
    let r = echo_dpop(rs, token, &[&proof], "bound").await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.json["echo"], "bound");
    assert_eq!(r.json["token_type"], "DPoP");
    assert_eq!(r.json["agent"], bound.subject);
    assert_eq!(r.json["jti"], bound.jti);

    // The same proof again: a replay.
    assert_bad_proof(
        &echo_dpop(rs, token, &[&proof], "again").await,
        "already used",
    );

    // No proof.
    assert_bad_proof(
        &echo_dpop(rs, token, &[], "no proof").await,
        "missing DPoP proof header",
    );

    // As a bearer token (a stolen token without its key).
    let r = echo(rs, Some(token), "as bearer").await;
    assert_eq!(r.status, 401, "{r:?}");
    assert!(
        r.challenge.as_deref().unwrap().starts_with(
            "Bearer error=\"invalid_token\", error_description=\"DPoP-bound token presented as a bearer token\""
        ),
        "{r:?}"
    );

    // A proof by another key.
    let thief = DpopKey::generate().unwrap();
    let p = thief.proof("POST", &htu, Some(token)).unwrap();
    assert_bad_proof(
        &echo_dpop(rs, token, &[&p], "other key").await,
        "does not match the token's key",
    );

    // A proof for another token of the same key (ath), and for another URL (htu).
    let p = holder
        .proof("POST", &htu, Some("another.access.token"))
        .unwrap();
    assert_bad_proof(&echo_dpop(rs, token, &[&p], "ath").await, "claim ath");
    let p = holder
        .proof(
            "POST",
            &format!("http://{}/tools/other", rs.addr),
            Some(token),
        )
        .unwrap();
    assert_bad_proof(&echo_dpop(rs, token, &[&p], "htu").await, "claim htu");

    // A fresh proof still works.
    let p = holder.proof("POST", &htu, Some(token)).unwrap();
    let r = echo_dpop(rs, token, &[&p], "fresh").await;
    assert_eq!(r.status, 200, "{r:?}");

    // An unbound token is refused with the DPoP scheme.
    let plain = issue(cluster, agent, "dev", &["tools:run"]).await;
    assert_eq!(plain.token_type, "Bearer");
    let p = holder
        .proof("POST", &htu, Some(&plain.access_token))
        .unwrap();
    let r = echo_dpop(rs, &plain.access_token, &[&p], "unbound").await;
    assert_eq!(r.status, 401, "{r:?}");
    assert!(
        r.challenge
            .as_deref()
            .unwrap()
            .starts_with("DPoP error=\"invalid_token\""),
        "{r:?}"
    );
}

/// `token` with one bit of its signature flipped.
/// The issuer's JWKS fetched as any verifier would: OIDC discovery over HTTPS (with
/// the cluster CA), then `jwks_uri`. Returns it and the discovery document.
async fn discover_jwks(cluster: &TestCluster) -> (Value, Value) {
    let pem = std::fs::read(cluster.dir.0.join("ca.pem")).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    use rustls::pki_types::pem::PemObject as _;
    for cert in rustls::pki_types::CertificateDer::pem_slice_iter(&pem) {
        roots.add(cert.unwrap()).unwrap();
    }
    let tls = quorate_proto::https::public_client_config(roots).unwrap();
    let get = |url: String| {
        let tls = tls.clone();
        async move {
            let r = quorate_proto::https::get(&url, tls).await.unwrap();
            assert!(r.is_success(), "{url}: {r:?}");
            serde_json::from_slice::<Value>(&r.body).unwrap()
        }
    };
    let meta = get(format!(
        "{}/.well-known/openid-configuration",
        cluster.issuer()
    ))
    .await;
    let jwks = get(meta["jwks_uri"].as_str().unwrap().to_owned()).await;
    (jwks, meta)
}

/// Whether jsonwebtoken, with the keys of `jwks` and RFC 9068 expectations (ES256,
/// issuer, audience), accepts `token` under any of them.
fn jsonwebtoken_accepts(jwks: &Value, token: &str, issuer: &str) -> bool {
    let set: jsonwebtoken::jwk::JwkSet = serde_json::from_value(jwks.clone()).unwrap();
    let mut v = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::ES256);
    v.set_issuer(&[issuer]);
    v.set_audience(&["dev"]);
    set.keys.iter().any(|k| {
        jsonwebtoken::DecodingKey::from_jwk(k)
            .ok()
            .is_some_and(|key| jsonwebtoken::decode::<Value>(token, &key, &v).is_ok())
    })
}

/// DESIGN.md invariant 7, as a compromised client would try it: a hand-built access token
/// (any subject, a year long, an admin scope) signed with a key the client may use —
/// a raw key it creates, a new key created as `quorate key create k` does, or the audit
/// checkpoint key — must not be accepted by the resource server, nor by jsonwebtoken
/// with the keys OIDC discovery leads to.
async fn forged_tokens_are_refused(cluster: &TestCluster, rs: &Proc) {
    let mut keys = cluster.keys().await;
    for (name, profile) in [
        ("forge-raw", api::KeyProfile::Raw),
        // As `quorate key create k` sends it: purpose sign, no profile.
        ("forge-new", api::KeyProfile::Unspecified),
    ] {
        keys.create_key(api::CreateKeyRequest {
            name: name.into(),
            purpose: api::Purpose::Sign as i32,
            token_rules: None,
            profile: profile as i32,
        })
        .await
        .unwrap();
    }
    cluster
        .wait_pools("forge-raw", 1, Duration::from_secs(120))
        .await;
    cluster
        .wait_pools("forge-new", 1, Duration::from_secs(120))
        .await;
    // The audit key exists once the first checkpoint is signed (every second here).
    let deadline = Instant::now() + Duration::from_secs(60);
    let audit = loop {
        let listed = keys
            .list_keys(api::ListKeysRequest {})
            .await
            .unwrap()
            .into_inner();
        if let Some(k) = listed.keys.into_iter().find(|k| k.name == "audit") {
            break k;
        }
        assert!(
            Instant::now() < deadline,
            "no audit checkpoint key appeared"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    assert_eq!(audit.profile, api::KeyProfile::Checkpoint as i32);

    let (jwks, meta) = discover_jwks(cluster).await;
    let published: Vec<&str> = jwks["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["kid"].as_str().unwrap())
        .collect();
    let listed = keys
        .list_keys(api::ListKeysRequest {})
        .await
        .unwrap()
        .into_inner()
        .keys;
    for k in &listed {
        let is_token = k.profile == api::KeyProfile::Token as i32;
        assert_eq!(
            published.contains(&k.kid.as_str()),
            is_token,
            "key {} (profile {}) in the issuer JWKS: {published:?}",
            k.name,
            k.profile
        );
    }
    // The checkpoint key has its own JWKS, outside the issuer's.
    let ck_url = meta["quorate_checkpoint_jwks_uri"].as_str().unwrap();
    assert!(ck_url.ends_with("/checkpoint-jwks.json"), "{ck_url}");

    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    // The server refetches its JWKS for an unknown kid at most once per 10 s: past that,
    // a refusal below is the issuer's JWKS speaking, not the server's cache.
    tokio::time::sleep(Duration::from_secs(11)).await;
    for (name, kid) in [
        (
            "forge-raw",
            listed
                .iter()
                .find(|k| k.name == "forge-raw")
                .unwrap()
                .kid
                .clone(),
        ),
        (
            "forge-new",
            listed
                .iter()
                .find(|k| k.name == "forge-new")
                .unwrap()
                .kid
                .clone(),
        ),
        ("audit", audit.kid.clone()),
    ] {
        let header = json!({"alg": "ES256", "typ": "at+jwt", "kid": kid});
        let payload = json!({
            "iss": cluster.issuer(), "sub": "spiffe://anyone/agent/forged", "aud": "dev",
            "client_id": "forged", "iat": now, "nbf": now, "exp": now + 365 * 86_400,
            "jti": format!("forged-{name}"), "scope": "tools:run admin",
        });
        let input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(payload.to_string())
        );
        let signed = keys
            .sign(api::SignRequest {
                name: name.into(),
                input: Some(api::sign_request::Input::Message(
                    input.clone().into_bytes(),
                )),
                format: api::SignatureFormat::Raw as i32,
            })
            .await;
        let sig = match signed {
            Ok(r) => r.into_inner().signature,
            Err(s) => {
                // The checkpoint key does not sign raw messages at all.
                assert_eq!(name, "audit", "{name}: {s:?}");
                assert!(s.message().contains("checkpoint profile"), "{s:?}");
                continue;
            }
        };
        assert_ne!(name, "audit", "the checkpoint key signed a raw message");
        let forged = format!("{input}.{}", URL_SAFE_NO_PAD.encode(sig));
        let r = echo(rs, Some(&forged), "forged").await;
        assert_eq!(r.status, 401, "{name}: {r:?}");
        assert_eq!(r.json["error"], "invalid_token", "{name}: {r:?}");
        assert_eq!(
            r.json["error_description"], "unknown signing key",
            "{name}: {r:?}"
        );
        assert!(
            !jsonwebtoken_accepts(&jwks, &forged, &cluster.issuer()),
            "{name}: jsonwebtoken accepted a forged token through discovery"
        );
    }
}

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
        &[
            "--policy-dir",
            &pd,
            "--trust-config",
            &tc,
            "--audit-checkpoint-secs",
            "1",
        ],
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
    assert_eq!(
        meta.json["dpop_signing_alg_values_supported"],
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

    dpop_bound_token_against_cluster(&cluster, &rs, &agent).await;
    forged_tokens_are_refused(&cluster, &rs).await;

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
