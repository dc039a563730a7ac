//! Agent identity end to end (DESIGN.md §7), against real node and coordinator
//! processes: a test OIDC issuer (its key made here) attests agents; Cedar policy in a
//! watched directory decides; the cluster signs RFC 9068 tokens by threshold; the
//! tokens verify with jsonwebtoken against the JWKS found by OIDC discovery over HTTPS;
//! revocation, tasks, hot reload and key rotation take effect at once.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use quorate_proto::api;
use quorate_proto::https;
use quorate_proto::tls;
use quorate_tests::{DOMAIN, TEST_ISS, TempDir, TestCluster, TestIssuer};
use serde_json::{Value, json};
use tonic::Code;

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

const BASE_POLICY: &str = r#"
@id("blue-team-tools")
@max_ttl_seconds("600")
permit (principal is Agent, action == Action::"issue_token", resource == Audience::"tools")
when { principal.hasTag("team") && principal.getTag("team") == "blue" };

@id("no-prod-deletes")
forbid (principal, action == Action::"issue_token", resource)
when { context has environment && context.environment == "prod" && context.scopes.contains("delete") };

@id("delegate-tools")
permit (principal is Agent, action == Action::"exchange_token", resource == Audience::"tools")
when { context has on_behalf_of };

@id("admin-client")
permit (principal == Client::"admin", action, resource);
"#;

const RED_POLICY: &str = r#"
@id("red-team-tools")
@max_ttl_seconds("300")
permit (principal is Agent, action == Action::"issue_token", resource == Audience::"tools")
when { principal.hasTag("team") && principal.getTag("team") == "red" };
"#;

fn request(att: &str, ttl: u32) -> api::IssueTokenRequest {
    api::IssueTokenRequest {
        attestation: att.into(),
        audience: "tools".into(),
        scopes: vec!["tools:read".into(), "tools:write".into()],
        ttl_seconds: ttl,
        task_id: String::new(),
        ..Default::default()
    }
}

struct Env {
    cluster: TestCluster,
    issuer: TestIssuer,
    policy_dir: std::path::PathBuf,
    _cfg: TempDir,
}

impl Env {
    async fn start() -> Env {
        let cfg = TempDir::new("identity-cfg");
        let issuer = TestIssuer::new(&cfg.0);
        let policy_dir = cfg.0.join("policy");
        std::fs::create_dir_all(&policy_dir).unwrap();
        std::fs::write(policy_dir.join("base.cedar"), BASE_POLICY).unwrap();
        let pd = policy_dir.display().to_string();
        let tc = cfg.0.join("trust.json").display().to_string();
        let cluster = TestCluster::start(
            "identity",
            3,
            1,
            &[
                "--policy-dir",
                &pd,
                "--trust-config",
                &tc,
                "--policy-poll-ms",
                "100",
            ],
        );
        cluster.create_token_key("tokens", 900, 4).await;
        Env {
            cluster,
            issuer,
            policy_dir,
            _cfg: cfg,
        }
    }

    async fn issue(
        &self,
        req: api::IssueTokenRequest,
    ) -> Result<api::IssueTokenReply, tonic::Status> {
        let mut c = self.cluster.identity_api().await;
        c.issue_token(req).await.map(|r| r.into_inner())
    }

    async fn introspect(&self, token: &str) -> bool {
        let mut c = self.cluster.identity_api().await;
        c.introspect(api::IntrospectRequest {
            token: token.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .active
    }

    async fn revoke(&self, target: api::revoke_request::Target) -> String {
        let mut c = self.cluster.identity_api().await;
        c.revoke(api::RevokeRequest {
            target: Some(target),
        })
        .await
        .unwrap()
        .into_inner()
        .revoked
    }

    fn roots(&self) -> rustls::RootCertStore {
        let (_, trust) = self.cluster.identity("client-admin");
        let mut roots = rustls::RootCertStore::empty();
        roots.add(trust.ca_der().clone()).unwrap();
        roots
    }

    /// JWKS by OIDC discovery, over HTTPS with a public-endpoint client.
    async fn discover_jwks(&self) -> jsonwebtoken::jwk::JwkSet {
        let tls = https::public_client_config(self.roots()).unwrap();
        let url = format!("{}/.well-known/openid-configuration", self.cluster.issuer());
        let meta = https::get(&url, Arc::clone(&tls)).await.unwrap();
        assert_eq!(meta.status, 200, "{}", String::from_utf8_lossy(&meta.body));
        let meta: Value = serde_json::from_slice(&meta.body).unwrap();
        assert_eq!(meta["issuer"], self.cluster.issuer());
        let jwks_uri = meta["jwks_uri"].as_str().unwrap();
        let jwks = https::get(jwks_uri, tls).await.unwrap();
        assert_eq!(jwks.status, 200);
        serde_json::from_slice(&jwks.body).unwrap()
    }

    /// Verifies an access token with jsonwebtoken against the discovered JWKS.
    async fn verify(&self, token: &str) -> Value {
        let header = jsonwebtoken::decode_header(token).unwrap();
        assert_eq!(header.alg, Algorithm::ES256);
        assert_eq!(header.typ.as_deref(), Some("at+jwt"));
        let kid = header.kid.unwrap();
        let jwks = self.discover_jwks().await;
        let jwk = jwks.find(&kid).expect("the token's kid is in the JWKS");
        let key = DecodingKey::from_jwk(jwk).unwrap();
        let mut v = Validation::new(Algorithm::ES256);
        v.set_audience(&["tools"]);
        v.set_issuer(&[self.cluster.issuer()]);
        jsonwebtoken::decode::<Value>(token, &key, &v)
            .unwrap()
            .claims
    }

    /// HTTPS introspection as the admin client over the hybrid group.
    async fn introspect_https(&self, token: &str) -> Value {
        let (id, trust) = self.cluster.identity("client-admin");
        let tls = tls::metadata_client_config(&id, &trust).unwrap();
        let r = https::post_form(
            &format!("{}/introspect", self.cluster.issuer()),
            tls,
            &[("token", token)],
        )
        .await
        .unwrap();
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        serde_json::from_slice(&r.body).unwrap()
    }

    async fn wait_for<F, Fut>(&self, what: &str, mut check: F)
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = bool>,
    {
        let deadline = Instant::now() + Duration::from_secs(15);
        while !check().await {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

fn denied(r: Result<api::IssueTokenReply, tonic::Status>, code: Code, words: &[&str]) {
    let s = r.expect_err("the request must be refused");
    assert_eq!(s.code(), code, "{s:?}");
    for w in words {
        assert!(
            s.message().to_lowercase().contains(&w.to_lowercase()),
            "`{}` does not mention {w}",
            s.message()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_identity_end_to_end() {
    let env = Env::start().await;
    let blue = env
        .issuer
        .attest("agent-1", json!({"team": "blue", "repository": "acme/app"}));

    // Policy allows: an RFC 9068 token, threshold-signed, verified by jsonwebtoken
    // with the JWKS found through OIDC discovery over HTTPS.
    let reply = env.issue(request(&blue, 300)).await.unwrap();
    assert_eq!(reply.policy_ids, vec!["blue-team-tools".to_string()]);
    let claims = env.verify(&reply.access_token).await;
    let sub = format!("spiffe://{DOMAIN}/agent/test/agent-1");
    assert_eq!(claims["sub"], sub);
    assert_eq!(claims["client_id"], sub);
    assert_eq!(claims["aud"], "tools");
    assert_eq!(claims["scope"], "tools:read tools:write");
    assert_eq!(claims["jti"], reply.jti);
    assert_eq!(claims["attestation"]["iss"], TEST_ISS);
    assert_eq!(claims["attestation"]["sub"], "agent-1");
    let (iat, exp) = (
        claims["iat"].as_i64().unwrap(),
        claims["exp"].as_i64().unwrap(),
    );
    assert_eq!(exp - iat, 300);
    assert_eq!(claims["nbf"].as_i64().unwrap(), iat);
    // A one-character change to the payload breaks the signature.
    let mut parts: Vec<String> = reply.access_token.split('.').map(str::to_owned).collect();
    let payload = String::from_utf8(URL_SAFE_NO_PAD.decode(&parts[1]).unwrap()).unwrap();
    assert!(payload.contains("tools:read"));
    parts[1] = URL_SAFE_NO_PAD.encode(payload.replacen("tools:read", "tools:reaD", 1));
    let jwks = env.discover_jwks().await;
    let key = DecodingKey::from_jwk(jwks.find(&reply.kid).unwrap()).unwrap();
    let mut v = Validation::new(Algorithm::ES256);
    v.validate_aud = false;
    assert!(jsonwebtoken::decode::<Value>(&parts.join("."), &key, &v).is_err());

    // Policy denies, naming the deciding forbid; no permit → says so.
    let mut prod = request(&blue, 300);
    prod.scopes.push("delete".into());
    prod.context.insert("environment".into(), "prod".into());
    denied(
        env.issue(prod).await,
        Code::PermissionDenied,
        &["no-prod-deletes"],
    );
    let red = env.issuer.attest("agent-red", json!({"team": "red"}));
    denied(
        env.issue(request(&red, 60)).await,
        Code::PermissionDenied,
        &["no policy permits"],
    );
    let mut bad_ctx = request(&blue, 60);
    bad_ctx.context.insert("colour".into(), "blue".into());
    denied(env.issue(bad_ctx).await, Code::InvalidArgument, &["colour"]);

    // TTL above the policy's cap.
    denied(
        env.issue(request(&blue, 1200)).await,
        Code::PermissionDenied,
        &["1200", "600", "blue-team-tools"],
    );

    // Attestations that must not authenticate anyone.
    let now = now();
    let cases: Vec<(&str, String, &[&str])> = vec![
        (
            "expired",
            env.issuer.sign(&env.issuer.claims(
                "a",
                json!({"team": "blue", "iat": now - 7200, "nbf": now - 7200, "exp": now - 3600}),
            )),
            &["expired"],
        ),
        (
            "not yet valid",
            env.issuer.sign(&env.issuer.claims(
                "a",
                json!({"team": "blue", "nbf": now + 3600, "exp": now + 7200}),
            )),
            &["not valid yet"],
        ),
        (
            "wrong audience",
            env.issuer.sign(
                &env.issuer
                    .claims("a", json!({"team": "blue", "aud": "someone-else"})),
            ),
            &["audience"],
        ),
        (
            "wrong issuer",
            env.issuer.sign(
                &env.issuer
                    .claims("a", json!({"team": "blue", "iss": "https://evil.test"})),
            ),
            &["https://evil.test"],
        ),
        (
            "alg none",
            format!(
                "{}.{}.",
                URL_SAFE_NO_PAD.encode(br#"{"alg":"none","typ":"JWT"}"#),
                URL_SAFE_NO_PAD.encode(env.issuer.claims("a", json!({"team": "blue"})).to_string())
            ),
            &["none"],
        ),
        (
            "HS256 keyed with the issuer's public key",
            {
                let mut h = Header::new(Algorithm::HS256);
                h.kid = Some("k1".into());
                jsonwebtoken::encode(
                    &h,
                    &env.issuer.claims("a", json!({"team": "blue"})),
                    &EncodingKey::from_secret(env.issuer.spki_pem.as_bytes()).unwrap(),
                )
                .unwrap()
            },
            &["HS256"],
        ),
    ];
    for (what, att, words) in cases {
        let r = env.issue(request(&att, 60)).await;
        let s = r.expect_err(what);
        assert_eq!(s.code(), Code::Unauthenticated, "{what}: {s:?}");
        for w in words {
            assert!(
                s.message().contains(w),
                "{what}: `{}` does not mention {w}",
                s.message()
            );
        }
    }

    // Hot reload from the watched directory changes a decision without a restart.
    std::fs::write(env.policy_dir.join("red.cedar"), RED_POLICY).unwrap();
    env.wait_for("the red policy to load", || async {
        env.issue(request(&red, 60)).await.is_ok()
    })
    .await;
    let digest = |info: api::PolicyInfo| info.digest;
    let mut idc = env.cluster.identity_api().await;
    let with_red = digest(
        idc.get_policy(api::GetPolicyRequest {})
            .await
            .unwrap()
            .into_inner(),
    );
    // A broken file is refused; the previous set still decides.
    std::fs::write(env.policy_dir.join("broken.cedar"), "permit (principal,").unwrap();
    tokio::time::sleep(Duration::from_millis(600)).await;
    let still = digest(
        idc.get_policy(api::GetPolicyRequest {})
            .await
            .unwrap()
            .into_inner(),
    );
    assert_eq!(
        still, with_red,
        "a broken directory must not replace the active set"
    );
    assert!(env.issue(request(&red, 60)).await.is_ok());
    assert!(env.issue(request(&blue, 60)).await.is_ok());
    // Back to the base set through the directory (quiet afterwards, so the watcher
    // does not race the RPCs below).
    std::fs::remove_file(env.policy_dir.join("broken.cedar")).unwrap();
    std::fs::remove_file(env.policy_dir.join("red.cedar")).unwrap();
    env.wait_for("the red policy to go", || async {
        env.issue(request(&red, 60)).await.is_err()
    })
    .await;
    // Through the admin RPC: an invalid set is refused naming the problem, the old one
    // stays; a valid one with the red permit takes over at once.
    let refused = idc
        .apply_policy(api::ApplyPolicyRequest {
            bundle: String::new(),
            files: vec![api::PolicyFile {
                name: "bad.cedar".into(),
                text: "permit (principal, action, resource) when { principal.nosuch == 1 };".into(),
            }],
        })
        .await
        .expect_err("an invalid policy set must be refused");
    assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
    assert!(refused.message().contains("nosuch"), "{refused:?}");
    assert!(env.issue(request(&blue, 60)).await.is_ok());
    denied(
        env.issue(request(&red, 60)).await,
        Code::PermissionDenied,
        &["no policy permits"],
    );
    idc.apply_policy(api::ApplyPolicyRequest {
        bundle: String::new(),
        files: vec![
            api::PolicyFile {
                name: "base.cedar".into(),
                text: BASE_POLICY.into(),
            },
            api::PolicyFile {
                name: "red.cedar".into(),
                text: RED_POLICY.into(),
            },
        ],
    })
    .await
    .unwrap();
    assert!(env.issue(request(&red, 60)).await.is_ok());

    // Revocation by jti: introspection (gRPC and HTTPS) flips at once.
    let t1 = env.issue(request(&blue, 300)).await.unwrap();
    assert!(env.introspect(&t1.access_token).await);
    let body = env.introspect_https(&t1.access_token).await;
    assert_eq!(body["active"], true);
    assert_eq!(body["sub"], sub);
    assert_eq!(body["scope"], "tools:read tools:write");
    env.revoke(api::revoke_request::Target::Jti(t1.jti.clone()))
        .await;
    assert!(!env.introspect(&t1.access_token).await);
    assert_eq!(
        env.introspect_https(&t1.access_token).await,
        json!({"active": false})
    );
    // Another token of the same agent is unaffected.
    let t1b = env.issue(request(&blue, 300)).await.unwrap();
    assert!(env.introspect(&t1b.access_token).await);

    // Revocation by agent: its tokens die and it gets no new ones; others are unaffected.
    let blue2 = env.issuer.attest("agent-2", json!({"team": "blue"}));
    let t2 = env.issue(request(&blue2, 300)).await.unwrap();
    assert!(env.introspect(&t2.access_token).await);
    env.revoke(api::revoke_request::Target::Agent(t2.subject.clone()))
        .await;
    assert!(!env.introspect(&t2.access_token).await);
    denied(
        env.issue(request(&blue2, 60)).await,
        Code::PermissionDenied,
        &["deprovisioned"],
    );
    assert!(env.introspect(&t1b.access_token).await);

    // Tasks: a token for a task dies with it; ending the task stops issuance for it.
    let blue3 = env.issuer.attest("agent-3", json!({"team": "blue"}));
    let task = idc
        .start_task(api::StartTaskRequest {
            attestation: blue3.clone(),
            ttl_seconds: 120,
            description: "triage ticket 42".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(task.agent, format!("spiffe://{DOMAIN}/agent/test/agent-3"));
    let mut for_task = request(&blue3, 300);
    for_task.task_id = task.task_id.clone();
    let t3 = env.issue(for_task.clone()).await.unwrap();
    let c3 = env.verify(&t3.access_token).await;
    assert_eq!(c3["task_id"], task.task_id);
    assert!(
        c3["exp"].as_i64().unwrap() <= task.expires_at,
        "a token never outlives its task"
    );
    // Another agent cannot use the task.
    let mut stolen = request(&blue, 60);
    stolen.task_id = task.task_id.clone();
    denied(
        env.issue(stolen).await,
        Code::PermissionDenied,
        &["belongs to"],
    );
    assert!(env.introspect(&t3.access_token).await);
    env.revoke(api::revoke_request::Target::TaskId(task.task_id.clone()))
        .await;
    assert!(!env.introspect(&t3.access_token).await);
    denied(
        env.issue(for_task).await,
        Code::PermissionDenied,
        &["ended"],
    );
    // EndTask does the same for another task.
    let task2 = idc
        .start_task(api::StartTaskRequest {
            attestation: String::new(),
            ttl_seconds: 120,
            description: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let mut for_task2 = request(&blue, 60);
    for_task2.task_id = task2.task_id.clone();
    let t4 = env.issue(for_task2.clone()).await.unwrap();
    idc.end_task(api::EndTaskRequest {
        task_id: task2.task_id.clone(),
    })
    .await
    .unwrap();
    assert!(!env.introspect(&t4.access_token).await);
    denied(
        env.issue(for_task2).await,
        Code::PermissionDenied,
        &["ended"],
    );

    // Key rotation: new tokens use the new version; old ones still verify.
    let old = env.issue(request(&blue, 300)).await.unwrap();
    let mut keys = env.cluster.keys().await;
    let rotated = keys
        .rotate_key(api::RotateKeyRequest {
            name: "tokens".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(rotated.version, 2);
    assert_ne!(rotated.kid, old.kid);
    env.cluster
        .wait_pools("tokens", 2, Duration::from_secs(120))
        .await;
    let new = env.issue(request(&blue, 300)).await.unwrap();
    assert_eq!(new.kid, rotated.kid);
    let jwks = env.discover_jwks().await;
    assert!(jwks.find(&old.kid).is_some() && jwks.find(&new.kid).is_some());
    env.verify(&old.access_token).await;
    env.verify(&new.access_token).await;
    assert!(env.introspect(&old.access_token).await);
}

/// The metadata listener serves discovery and the JWKS to classic-TLS verifiers, but
/// token-carrying endpoints demand the hybrid group and a cluster client certificate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metadata_listener_transport_rules() {
    let cfg = TempDir::new("identity-meta");
    let _issuer = TestIssuer::new(&cfg.0);
    let tc = cfg.0.join("trust.json").display().to_string();
    let cluster = TestCluster::start("identity-meta", 3, 1, &["--trust-config", &tc]);
    let d = &cluster.dir.0;
    let (_, trust) = cluster.identity("client-admin");
    let mut roots = rustls::RootCertStore::empty();
    roots.add(trust.ca_der().clone()).unwrap();

    // A classic-only verifier (X25519) gets discovery and the JWKS.
    let classic = classic_client(&roots, None);
    let r = https::get(
        &format!("{}/jwks.json", cluster.issuer()),
        Arc::clone(&classic),
    )
    .await
    .unwrap();
    assert_eq!(r.status, 200);
    let jwks: Value = serde_json::from_slice(&r.body).unwrap();
    assert!(jwks["keys"].is_array());
    let r = https::get(
        &format!(
            "{}/.well-known/oauth-authorization-server",
            cluster.issuer()
        ),
        classic,
    )
    .await
    .unwrap();
    assert_eq!(r.status, 200);

    // Introspection over classic key exchange, even with the admin certificate: 403.
    let admin = (d.join("client-admin.pem"), d.join("client-admin-key.pem"));
    let classic_admin = classic_client(&roots, Some(&admin));
    let r = https::post_form(
        &format!("{}/introspect", cluster.issuer()),
        classic_admin,
        &[("token", "x")],
    )
    .await
    .unwrap();
    assert_eq!(r.status, 403, "{}", String::from_utf8_lossy(&r.body));
    assert!(String::from_utf8_lossy(&r.body).contains("X25519MLKEM768"));

    // Hybrid but no client certificate: 401.
    let anon = https::public_client_config(roots.clone()).unwrap();
    let r = https::post_form(
        &format!("{}/introspect", cluster.issuer()),
        anon,
        &[("token", "x")],
    )
    .await
    .unwrap();
    assert_eq!(r.status, 401, "{}", String::from_utf8_lossy(&r.body));

    // Hybrid with the admin certificate: a garbage token is simply inactive.
    let (id, trust) = cluster.identity("client-admin");
    let ok = tls::metadata_client_config(&id, &trust).unwrap();
    let r = https::post_form(
        &format!("{}/introspect", cluster.issuer()),
        ok,
        &[("token", "not-a-token")],
    )
    .await
    .unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(
        serde_json::from_slice::<Value>(&r.body).unwrap(),
        json!({"active": false})
    );
}

fn classic_client(
    roots: &rustls::RootCertStore,
    cert: Option<&(std::path::PathBuf, std::path::PathBuf)>,
) -> Arc<rustls::ClientConfig> {
    use rustls::pki_types::pem::PemObject as _;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let mut provider = rustls::crypto::aws_lc_rs::default_provider();
    provider.kx_groups = vec![rustls::crypto::aws_lc_rs::kx_group::X25519];
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(provider))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots.clone());
    let mut config = match cert {
        None => builder.with_no_client_auth(),
        Some((c, k)) => builder
            .with_client_auth_cert(
                CertificateDer::pem_file_iter(c)
                    .unwrap()
                    .map(|c| c.unwrap())
                    .collect(),
                PrivateKeyDer::from_pem_file(k).unwrap(),
            )
            .unwrap(),
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(config)
}

/// A test SPIFFE trust domain: a CA and X.509-SVIDs it issues.
struct SvidCa {
    cert_der: Vec<u8>,
    cert_pem: String,
    key: rcgen::KeyPair,
}

impl SvidCa {
    fn new() -> Self {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        p.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
        ];
        let cert = p.self_signed(&key).unwrap();
        SvidCa {
            cert_der: cert.der().to_vec(),
            cert_pem: cert.pem(),
            key,
        }
    }

    /// (certificate PEM, key PEM) of an SVID for `id`.
    fn svid(&self, id: &str) -> (String, String) {
        self.svid_with(id, vec![rcgen::KeyUsagePurpose::DigitalSignature])
    }

    /// (certificate PEM, key PEM) of an SVID for `id` with these key usages (none: no
    /// keyUsage extension).
    fn svid_with(&self, id: &str, usages: Vec<rcgen::KeyUsagePurpose>) -> (String, String) {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        p.subject_alt_names = vec![rcgen::SanType::URI(id.try_into().unwrap())];
        p.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        p.key_usages = usages;
        let issuer =
            rcgen::Issuer::from_ca_cert_der(&self.cert_der.clone().into(), &self.key).unwrap();
        let cert = p.signed_by(&key, &issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }
}

/// Agents that hold an X.509-SVID authenticate with it on the agent listener and get
/// tokens for themselves; nothing else is open to them, and certificates from other
/// CAs (including the cluster's own) do not get in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn svid_agents_get_tokens_on_the_agent_listener() {
    let cfg = TempDir::new("identity-svid");
    let _oidc = TestIssuer::new(&cfg.0);
    let ca = SvidCa::new();
    std::fs::write(cfg.0.join("bundle.pem"), &ca.cert_pem).unwrap();
    let mut trust: Value =
        serde_json::from_slice(&std::fs::read(cfg.0.join("trust.json")).unwrap()).unwrap();
    trust["svid"] = json!([{ "trust_domain": "agents.test", "bundle_file": "bundle.pem" }]);
    std::fs::write(cfg.0.join("trust.json"), trust.to_string()).unwrap();
    let policy_dir = cfg.0.join("policy");
    std::fs::create_dir_all(&policy_dir).unwrap();
    std::fs::write(
        policy_dir.join("svid.cedar"),
        r#"@id("svid-agents")
permit (principal is Agent, action == Action::"issue_token", resource == Audience::"tools")
when { principal.method == "x509-svid" };
@id("admin-client")
permit (principal == Client::"admin", action, resource);
"#,
    )
    .unwrap();
    let agent_port = quorate_tests::free_port();
    let agent_addr: std::net::SocketAddr = format!("127.0.0.1:{agent_port}").parse().unwrap();
    let (pd, tc, al) = (
        policy_dir.display().to_string(),
        cfg.0.join("trust.json").display().to_string(),
        agent_addr.to_string(),
    );
    let cluster = TestCluster::start(
        "identity-svid",
        3,
        1,
        &[
            "--policy-dir",
            &pd,
            "--trust-config",
            &tc,
            "--agent-listen",
            &al,
        ],
    );
    cluster.create_token_key("tokens", 900, 2).await;
    let (_, cluster_trust) = cluster.identity("client-admin");
    let connect = |cert: String, key: String| {
        let trust = cluster_trust.clone();
        async move {
            let id = tls::Identity::from_pem(&cert, &key).unwrap();
            let cfg = tls::client_config(&id, &trust).unwrap();
            quorate_proto::transport::connect(agent_addr, &tls::Role::Coordinator, DOMAIN, cfg)
                .await
        }
    };

    // The SVID is the attestation.
    let (cert, key) = ca.svid("spiffe://agents.test/ci/job-1");
    let ch = connect(cert, key).await.unwrap();
    let mut agent = api::identity_service_client::IdentityServiceClient::new(ch);
    let reply = agent
        .issue_token(request("", 120))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.subject, "spiffe://agents.test/ci/job-1");
    assert_eq!(reply.policy_ids, vec!["svid-agents".to_string()]);
    let payload: Value = serde_json::from_slice(
        &URL_SAFE_NO_PAD
            .decode(reply.access_token.split('.').nth(1).unwrap())
            .unwrap(),
    )
    .unwrap();
    assert_eq!(payload["attestation"]["method"], "x509-svid");
    assert_eq!(payload["attestation"]["iss"], "spiffe://agents.test");
    // Nothing but its own tokens: no revocation, no tasks, no policy.
    let s = agent
        .revoke(api::RevokeRequest {
            target: Some(api::revoke_request::Target::Jti("x".into())),
        })
        .await
        .expect_err("agents may not revoke");
    assert_eq!(s.code(), Code::PermissionDenied, "{s:?}");
    let s = agent
        .issue_token(request("an-attestation", 60))
        .await
        .expect_err("the SVID is the only attestation here");
    assert_eq!(s.code(), Code::InvalidArgument, "{s:?}");

    // Leaves outside the X.509-SVID profile's key usage (SPIFFE X.509-SVID §4.3, §5.2):
    // the trusted CA signed them and TLS lets them in, but the service refuses them,
    // naming the key usage.
    use rcgen::KeyUsagePurpose as Ku;
    for (usages, words) in [
        (vec![Ku::KeyCertSign], "keyUsage asserts keyCertSign"),
        (vec![Ku::CrlSign], "keyUsage asserts cRLSign"),
        (
            vec![Ku::KeyEncipherment, Ku::KeyAgreement],
            "keyUsage lacks digitalSignature",
        ),
        (vec![], "has no keyUsage extension"),
    ] {
        let (cert, key) = ca.svid_with("spiffe://agents.test/ci/job-ku", usages.clone());
        let ch = connect(cert, key).await.unwrap();
        let mut agent = api::identity_service_client::IdentityServiceClient::new(ch);
        let s = agent
            .issue_token(request("", 60))
            .await
            .expect_err("a leaf outside the SVID profile must be refused");
        assert_eq!(s.code(), Code::Unauthenticated, "{usages:?}: {s:?}");
        assert!(s.message().contains(words), "{usages:?}: {}", s.message());
    }

    // An SVID from a CA the cluster does not trust, and the cluster's own admin
    // certificate, are refused, and the agent hears why (a TLS alert would carry no
    // reason).
    let other = SvidCa::new();
    let (cert, key) = other.svid("spiffe://agents.test/ci/job-2");
    refused(connect(cert, key).await, "agents.test").await;
    let d = &cluster.dir.0;
    let admin = (
        std::fs::read_to_string(d.join("client-admin.pem")).unwrap(),
        std::fs::read_to_string(d.join("client-admin-key.pem")).unwrap(),
    );
    refused(connect(admin.0, admin.1).await, DOMAIN).await;
}

/// Attestations that verify cryptographically but break the JWT rules are refused,
/// naming what is wrong: `iat` in the future, `iat` not a number, a claim given twice
/// (whose last value would otherwise become the policy tag).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_attestations_are_refused_naming_the_problem() {
    let env = Env::start().await;
    let header = r#"{"alg":"ES256","kid":"k1"}"#;
    let payload = |extra: &str| {
        let now = now();
        format!(
            r#"{{"iss":"{TEST_ISS}","sub":"agent-x","aud":"quorate","iat":{now},"nbf":{now},"exp":{}{extra}}}"#,
            now + 600
        )
    };
    // The baseline, made the same way, gets a token: each refusal below is about its
    // one defect.
    let good = env.issuer.sign_raw(header, &payload(r#","team":"blue""#));
    env.issue(request(&good, 60)).await.unwrap();

    let future = env
        .issuer
        .attest("agent-x", json!({"team": "blue", "iat": now() + 3600}));
    denied(
        env.issue(request(&future, 60)).await,
        Code::Unauthenticated,
        &["issued in the future", "iat"],
    );
    let string_iat = env
        .issuer
        .attest("agent-x", json!({"team": "blue", "iat": now().to_string()}));
    denied(
        env.issue(request(&string_iat, 60)).await,
        Code::Unauthenticated,
        &["claim `iat` must be a JSON number"],
    );
    // `red` would not get a token; with the last value winning it would have been
    // `blue`.
    let twice = env
        .issuer
        .sign_raw(header, &payload(r#","team":"red","team":"blue""#));
    denied(
        env.issue(request(&twice, 60)).await,
        Code::Unauthenticated,
        &["member \"team\" appears twice"],
    );
}

/// POSTs `form` to `url` and returns the status and the JSON body (null if none).
async fn post_form(
    url: &str,
    tls: Arc<rustls::ClientConfig>,
    form: Vec<(&'static str, String)>,
) -> (u16, Value) {
    let pairs: Vec<(&str, &str)> = form.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let r = https::post_form(url, tls, &pairs).await.unwrap();
    let body: Value = serde_json::from_slice(&r.body).unwrap_or(Value::Null);
    eprintln!("{} {body}", r.status);
    (r.status, body)
}

/// A certificate from outside the SVID bundles gets through the handshake (the listener
/// judges chains per request) and is refused with the reason, `words`.
async fn refused(ch: Result<tonic::transport::Channel, quorate_proto::tls::TlsError>, words: &str) {
    let mut c = api::identity_service_client::IdentityServiceClient::new(ch.unwrap());
    let s = c
        .issue_token(request("", 60))
        .await
        .expect_err("a certificate from outside the SVID bundles must not get in");
    assert_eq!(s.code(), Code::Unauthenticated, "{s:?}");
    assert!(
        s.message().contains(words),
        "{words:?} not in {:?}",
        s.message()
    );
}

/// The OAuth token endpoint (RFC 6749 §3.2) on the HTTPS listener decides as the gRPC
/// API does: the jwt-bearer grant (RFC 7523, the attestation as assertion, RFC 8707
/// `resource` as audience) and token exchange (RFC 8693), with RFC 6749 §5.2 errors.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_endpoint_grants_and_errors() {
    const JWT_BEARER: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";
    const EXCHANGE: &str = "urn:ietf:params:oauth:grant-type:token-exchange";
    let env = Env::start().await;
    let url = format!("{}/token", env.cluster.issuer());
    // No client certificate: the assertion is the credential.
    let tls = https::public_client_config(env.roots()).unwrap();
    let post = |form: Vec<(&'static str, String)>| post_form(&url, Arc::clone(&tls), form);
    let meta = https::get(
        &format!(
            "{}/.well-known/oauth-authorization-server",
            env.cluster.issuer()
        ),
        Arc::clone(&tls),
    )
    .await
    .unwrap();
    let meta: Value = serde_json::from_slice(&meta.body).unwrap();
    assert_eq!(meta["token_endpoint"], url);
    assert_eq!(
        meta["grant_types_supported"],
        json!([JWT_BEARER, EXCHANGE, "client_credentials"])
    );

    let blue = env.issuer.attest("agent-1", json!({"team": "blue"}));
    let (status, body) = post(vec![
        ("grant_type", JWT_BEARER.into()),
        ("assertion", blue.clone()),
        ("resource", "tools".into()),
        ("scope", "tools:read tools:write".into()),
        ("ttl", "300".into()),
    ])
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["token_type"], "Bearer");
    assert_eq!(body["scope"], "tools:read tools:write");
    let expires_in = body["expires_in"].as_i64().unwrap();
    assert!((290..=300).contains(&expires_in), "{expires_in}");
    let token = body["access_token"].as_str().unwrap().to_owned();
    let claims = env.verify(&token).await;
    assert_eq!(
        claims["sub"],
        format!("spiffe://{DOMAIN}/agent/test/agent-1")
    );
    assert_eq!(claims["aud"], "tools");
    assert!(env.introspect(&token).await);

    // Token exchange: a sub-agent acts for agent-1.
    let helper = env.issuer.attest("helper", json!({"team": "blue"}));
    let (status, body) = post(vec![
        ("grant_type", EXCHANGE.into()),
        ("subject_token", token.clone()),
        (
            "subject_token_type",
            "urn:ietf:params:oauth:token-type:access_token".into(),
        ),
        ("actor_token", helper.clone()),
        (
            "actor_token_type",
            "urn:ietf:params:oauth:token-type:jwt".into(),
        ),
        ("scope", "tools:read".into()),
    ])
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body["issued_token_type"],
        "urn:ietf:params:oauth:token-type:access_token"
    );
    let delegated = env.verify(body["access_token"].as_str().unwrap()).await;
    assert_eq!(delegated["sub"], claims["sub"]);
    assert_eq!(
        delegated["act"]["sub"],
        format!("spiffe://{DOMAIN}/agent/test/helper")
    );
    assert_eq!(delegated["scope"], "tools:read");

    // Refusals, as RFC 6749 §5.2 names them.
    let red = env.issuer.attest("agent-red", json!({"team": "red"}));
    for (form, error) in [
        (
            vec![
                ("grant_type", JWT_BEARER.into()),
                ("assertion", red),
                ("resource", "tools".into()),
            ],
            "invalid_grant",
        ),
        (
            vec![
                ("grant_type", JWT_BEARER.into()),
                ("assertion", "not.a.jwt".into()),
                ("resource", "tools".into()),
            ],
            "invalid_grant",
        ),
        (
            vec![
                ("grant_type", JWT_BEARER.into()),
                ("resource", "tools".into()),
            ],
            "invalid_request",
        ),
        (
            vec![
                ("grant_type", JWT_BEARER.into()),
                ("assertion", blue.clone()),
            ],
            "invalid_target",
        ),
        (
            vec![
                ("grant_type", JWT_BEARER.into()),
                ("assertion", blue.clone()),
                ("resource", "tools".into()),
                ("audience", "tools".into()),
            ],
            "invalid_target",
        ),
        (
            vec![
                ("grant_type", JWT_BEARER.into()),
                ("assertion", blue.clone()),
                ("resource", "tools".into()),
                ("scope", "a".into()),
                ("scope", "b".into()),
            ],
            "invalid_request",
        ),
        (
            vec![("grant_type", "password".into())],
            "unsupported_grant_type",
        ),
        (vec![("assertion", blue.clone())], "invalid_request"),
        (
            vec![
                ("grant_type", EXCHANGE.into()),
                ("subject_token", token.clone()),
                (
                    "subject_token_type",
                    "urn:ietf:params:oauth:token-type:access_token".into(),
                ),
                ("actor_token", helper),
                (
                    "actor_token_type",
                    "urn:ietf:params:oauth:token-type:id_token".into(),
                ),
            ],
            "invalid_request",
        ),
    ] {
        let (status, body) = post(form).await;
        assert_eq!(status, 400, "{body}");
        assert_eq!(body["error"], error, "{body}");
        assert!(
            body["error_description"]
                .as_str()
                .is_some_and(|d| !d.is_empty()),
            "{body}"
        );
    }
}

/// `client_credentials` at the token endpoint (RFC 6749 §4.4): a registered client
/// authenticates with its own key (`private_key_jwt`, RFC 7523 §2.2), each assertion
/// once; an agent with an X.509-SVID authenticates with it on the connection
/// (`tls_client_auth`, RFC 8705 §2) and names its SPIFFE ID as `client_id`. Everything
/// else is `invalid_client` (401), naming what is wrong.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_credentials_by_private_key_jwt_and_tls_client_auth() {
    const CC: &str = "client_credentials";
    const ASSERTION: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";
    let cfg = TempDir::new("identity-cc");
    let oidc = TestIssuer::new(&cfg.0);
    // The SVID trust domain, and the registered client `ci-bot` with its JWKS.
    let ca = SvidCa::new();
    std::fs::write(cfg.0.join("bundle.pem"), &ca.cert_pem).unwrap();
    let bot = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let raw = bot.public_key_raw();
    let jwks = json!({"keys": [{
        "kty": "EC", "crv": "P-256", "alg": "ES256", "use": "sig", "kid": "bot-1",
        "x": URL_SAFE_NO_PAD.encode(&raw[1..33]), "y": URL_SAFE_NO_PAD.encode(&raw[33..65]),
    }]});
    std::fs::write(cfg.0.join("ci-bot.jwks.json"), jwks.to_string()).unwrap();
    let mut trust: Value =
        serde_json::from_slice(&std::fs::read(cfg.0.join("trust.json")).unwrap()).unwrap();
    trust["svid"] = json!([{ "trust_domain": "agents.test", "bundle_file": "bundle.pem" }]);
    trust["clients"] = json!([{ "client_id": "ci-bot", "jwks_file": "ci-bot.jwks.json" }]);
    std::fs::write(cfg.0.join("trust.json"), trust.to_string()).unwrap();
    let policy_dir = cfg.0.join("policy");
    std::fs::create_dir_all(&policy_dir).unwrap();
    std::fs::write(
        policy_dir.join("clients.cedar"),
        r#"@id("clients")
permit (principal is Agent, action == Action::"issue_token", resource == Audience::"tools")
when { principal.method == "private-key-jwt" || principal.method == "x509-svid" };
@id("admin-client")
permit (principal == Client::"admin", action, resource);
"#,
    )
    .unwrap();
    let (pd, tc) = (
        policy_dir.display().to_string(),
        cfg.0.join("trust.json").display().to_string(),
    );
    let cluster = TestCluster::start(
        "identity-cc",
        3,
        1,
        &["--policy-dir", &pd, "--trust-config", &tc],
    );
    cluster.create_token_key("tokens", 900, 4).await;
    let issuer = cluster.issuer();
    let url = format!("{issuer}/token");
    let (_, cluster_trust) = cluster.identity("client-admin");
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cluster_trust.ca_der().clone()).unwrap();
    let public = https::public_client_config(roots).unwrap();
    let post = |tls: Arc<rustls::ClientConfig>, form: Vec<(&'static str, String)>| {
        post_form(&url, tls, form)
    };
    let claims = |token: &str| -> Value {
        serde_json::from_slice(
            &URL_SAFE_NO_PAD
                .decode(token.split('.').nth(1).unwrap())
                .unwrap(),
        )
        .unwrap()
    };
    let meta = https::get(
        &format!("{issuer}/.well-known/oauth-authorization-server"),
        Arc::clone(&public),
    )
    .await
    .unwrap();
    let meta: Value = serde_json::from_slice(&meta.body).unwrap();
    assert!(
        meta["grant_types_supported"]
            .as_array()
            .unwrap()
            .contains(&json!(CC)),
        "{meta}"
    );
    assert_eq!(
        meta["token_endpoint_auth_methods_supported"],
        json!(["none", "private_key_jwt", "tls_client_auth"])
    );

    // private_key_jwt: iss = sub = client_id, aud = the token endpoint, short-lived, jti.
    let bot_key = EncodingKey::from_ec_der(&bot.serialize_der());
    let mut n = 0;
    let mut assertion = |aud: &str, lifetime: i64| {
        n += 1;
        let mut h = Header::new(Algorithm::ES256);
        h.kid = Some("bot-1".into());
        let now = now();
        let c = json!({"iss": "ci-bot", "sub": "ci-bot", "aud": aud, "iat": now,
                       "exp": now + lifetime, "jti": format!("a-{n}")});
        jsonwebtoken::encode(&h, &c, &bot_key).unwrap()
    };
    let cc_form = |assertion: String| {
        vec![
            ("grant_type", CC.to_owned()),
            ("client_id", "ci-bot".to_owned()),
            ("client_assertion_type", ASSERTION.to_owned()),
            ("client_assertion", assertion),
            ("resource", "tools".to_owned()),
        ]
    };
    let first = assertion(&url, 60);
    let (status, body) = post(Arc::clone(&public), cc_form(first.clone())).await;
    assert_eq!(status, 200, "{body}");
    let c = claims(body["access_token"].as_str().unwrap());
    assert_eq!(c["sub"], format!("spiffe://{DOMAIN}/client/ci-bot"));
    assert_eq!(c["client_id"], c["sub"]);
    assert_eq!(c["aud"], "tools");
    // The issuer URL is an audience too (RFC 7523 §3).
    let (status, body) = post(Arc::clone(&public), cc_form(assertion(&issuer, 60))).await;
    assert_eq!(status, 200, "{body}");

    // Each assertion authenticates one request.
    let (status, body) = post(Arc::clone(&public), cc_form(first)).await;
    assert_eq!((status, &body["error"]), (401, &json!("invalid_client")));
    assert!(
        body["error_description"]
            .as_str()
            .unwrap()
            .contains("already used"),
        "{body}"
    );
    // Another audience, a lifetime over 300 s, another client_id, an agent's
    // attestation in place of a client assertion, another assertion type: all refused.
    for (form, words) in [
        (
            cc_form(assertion("https://elsewhere.test/token", 60)),
            "aud",
        ),
        (cc_form(assertion(&url, 3600)), "300"),
        (
            {
                let mut f = cc_form(assertion(&url, 60));
                f[1].1 = "other-bot".into();
                f
            },
            "client_id",
        ),
        (
            cc_form(oidc.attest("agent-1", json!({"team": "blue"}))),
            "registered client",
        ),
        (
            {
                let mut f = cc_form(assertion(&url, 60));
                f[2].1 = "urn:example:saml".into();
                f
            },
            "client_assertion_type",
        ),
        (
            vec![
                ("grant_type", CC.to_owned()),
                ("resource", "tools".to_owned()),
            ],
            "private_key_jwt",
        ),
    ] {
        let (status, body) = post(Arc::clone(&public), form).await;
        assert_eq!((status, &body["error"]), (401, &json!("invalid_client")));
        let text = body["error_description"].as_str().unwrap();
        assert!(text.contains(words), "{words:?} not in {text:?}");
    }
    // A client assertion belongs to client_credentials only.
    let (status, body) = post(
        Arc::clone(&public),
        vec![
            (
                "grant_type",
                "urn:ietf:params:oauth:grant-type:jwt-bearer".into(),
            ),
            ("assertion", oidc.attest("agent-1", json!({"team": "blue"}))),
            ("resource", "tools".into()),
            ("client_assertion_type", ASSERTION.into()),
            ("client_assertion", assertion(&url, 60)),
        ],
    )
    .await;
    assert_eq!((status, &body["error"]), (400, &json!("invalid_request")));

    // tls_client_auth: the X.509-SVID on the connection, its SPIFFE ID as client_id.
    let svid_tls = |(cert, key): (String, String)| {
        let id = tls::Identity::from_pem(&cert, &key).unwrap();
        tls::metadata_client_config(&id, &cluster_trust).unwrap()
    };
    let job = "spiffe://agents.test/ci/job-1";
    let agent = svid_tls(ca.svid(job));
    let svid_form = |client_id: &str| {
        vec![
            ("grant_type", CC.to_owned()),
            ("client_id", client_id.to_owned()),
            ("resource", "tools".to_owned()),
        ]
    };
    let (status, body) = post(Arc::clone(&agent), svid_form(job)).await;
    assert_eq!(status, 200, "{body}");
    let c = claims(body["access_token"].as_str().unwrap());
    assert_eq!(c["sub"], job);
    assert_eq!(c["attestation"]["method"], "x509-svid");
    for (tls, client_id, words) in [
        (
            Arc::clone(&agent),
            "spiffe://agents.test/ci/job-2",
            "not the SPIFFE ID",
        ),
        (Arc::clone(&agent), "", "needs `client_id`"),
        // A leaf outside the SVID profile passes the handshake, not the service.
        (
            svid_tls(ca.svid_with(job, vec![rcgen::KeyUsagePurpose::KeyCertSign])),
            job,
            "keyCertSign",
        ),
        // The cluster's own client certificate is no agent.
        (
            {
                let (id, trust) = cluster.identity("client-admin");
                tls::metadata_client_config(&id, &trust).unwrap()
            },
            job,
            "cluster client certificate",
        ),
    ] {
        let (status, body) = post(tls, svid_form(client_id)).await;
        assert_eq!((status, &body["error"]), (401, &json!("invalid_client")));
        let text = body["error_description"].as_str().unwrap();
        assert!(text.contains(words), "{words:?} not in {text:?}");
    }
    // An SVID from a CA nobody trusts: the handshake admits it, the endpoint refuses it
    // and says why.
    let stranger = svid_tls(SvidCa::new().svid(job));
    let (status, body) = post(stranger, svid_form(job)).await;
    assert_eq!((status, &body["error"]), (401, &json!("invalid_client")));
    let text = body["error_description"].as_str().unwrap();
    assert!(text.contains("agents.test"), "{text:?}");
}
