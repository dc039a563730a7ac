//! Governance end to end (issue: governance), against real node and coordinator
//! processes: every decision lands in the hash-chained audit trail before its answer;
//! checkpoints are threshold-signed and verify with the JWKS; `quorate audit verify`
//! names the first tampered event; a failing sink fails requests; human approval;
//! confidential credentials through two quorums; RFC 8693 delegation.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use quorate_crypto::tdh::{self, DhResponse, Requester};
use quorate_crypto::wire::Wire as _;
use quorate_proto::api;
use quorate_proto::api::approval_service_client::ApprovalServiceClient;
use quorate_proto::api::identity_service_client::IdentityServiceClient;
use quorate_proto::audit;
use quorate_proto::https;
use quorate_tests::{TempDir, TestCluster, TestIssuer, binary};
use serde_json::{Value, json};
use tonic::Code;

const SUBJECT_PREFIX: &str = "spiffe://quorate.test/agent/test/";

const POLICY: &str = r#"
@id("blue-tools")
@max_ttl_seconds("600")
permit (principal is Agent, action == Action::"issue_token", resource == Audience::"tools")
when { principal.hasTag("team") && principal.getTag("team") == "blue" };

@id("no-prod-deletes")
forbid (principal, action == Action::"issue_token", resource)
when { context has environment && context.environment == "prod" && context.scopes.contains("delete") };

@id("prod-approval")
@approval("required")
@max_ttl_seconds("300")
permit (principal is Agent, action == Action::"issue_token", resource == Audience::"prod");

@id("delegate-tools")
permit (principal is Agent, action == Action::"exchange_token", resource == Audience::"tools")
when { context has on_behalf_of };

@id("no-helper3")
forbid (principal, action == Action::"exchange_token", resource)
when { context has actors && context.actors.contains("spiffe://quorate.test/agent/test/helper3") };

@id("agent-credentials")
permit (principal is Agent, action == Action::"request_credential", resource == Target::"orders-db")
when { context has task };

@id("db-verifies")
permit (principal == Client::"db", action == Action::"request_credential", resource == Target::"orders-db");

@id("admin-client")
permit (principal == Client::"admin", action, resource);
"#;

fn events(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// The newest event of `kind`/`action` in the audit file, read right after a response:
/// the event must already be there.
fn last(path: &Path, kind: &str, action: &str) -> Value {
    events(path)
        .into_iter()
        .rev()
        .find(|e| e["kind"] == kind && e["action"] == action)
        .unwrap_or_else(|| panic!("no {kind}/{action} event in the audit file"))
}

fn policy_ids(e: &Value) -> Vec<String> {
    e["policy_ids"]
        .as_array()
        .map(|a| a.iter().map(|v| v.as_str().unwrap().to_owned()).collect())
        .unwrap_or_default()
}

fn token_request(att: &str, aud: &str, scopes: &[&str], ttl: u32) -> api::IssueTokenRequest {
    api::IssueTokenRequest {
        attestation: att.into(),
        audience: aud.into(),
        scopes: scopes.iter().map(|s| (*s).to_owned()).collect(),
        ttl_seconds: ttl,
        ..Default::default()
    }
}

fn claims_of(token: &str) -> Value {
    use base64::Engine as _;
    let payload = token.split('.').nth(1).unwrap();
    serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(payload)
            .unwrap(),
    )
    .unwrap()
}

struct Gov {
    cluster: TestCluster,
    issuer: TestIssuer,
    audit_file: PathBuf,
    relay_file: PathBuf,
    cfg: TempDir,
}

impl Gov {
    async fn identity(&self) -> IdentityServiceClient<tonic::transport::Channel> {
        self.cluster.identity_api().await
    }

    async fn approvals_as(&self, client: &str) -> ApprovalServiceClient<tonic::transport::Channel> {
        ApprovalServiceClient::new(self.cluster.channel_as(client).await)
    }

    /// The issuer's JWKS (token keys).
    async fn jwks(&self) -> (String, jsonwebtoken::jwk::JwkSet) {
        self.key_set("/jwks.json").await
    }

    /// The checkpoint JWKS (the audit key, never in the issuer's).
    async fn checkpoint_jwks(&self) -> (String, jsonwebtoken::jwk::JwkSet) {
        self.key_set("/checkpoint-jwks.json").await
    }

    async fn key_set(&self, path: &str) -> (String, jsonwebtoken::jwk::JwkSet) {
        let (_, trust) = self.cluster.identity("client-admin");
        let mut roots = rustls::RootCertStore::empty();
        roots.add(trust.ca_der().clone()).unwrap();
        let tls = https::public_client_config(roots).unwrap();
        let r = https::get(&format!("{}{path}", self.cluster.issuer()), tls)
            .await
            .unwrap();
        assert_eq!(r.status, 200);
        let text = String::from_utf8(r.body).unwrap();
        let set = serde_json::from_str(&text).unwrap();
        (text, set)
    }

    async fn verify_token(&self, token: &str, aud: &str) -> Value {
        let kid = jsonwebtoken::decode_header(token).unwrap().kid.unwrap();
        let (_, jwks) = self.jwks().await;
        let key = DecodingKey::from_jwk(jwks.find(&kid).unwrap()).unwrap();
        let mut v = Validation::new(Algorithm::ES256);
        v.set_audience(&[aud]);
        v.set_issuer(&[self.cluster.issuer()]);
        jsonwebtoken::decode::<Value>(token, &key, &v)
            .unwrap()
            .claims
    }

    /// A credential through RequestCredential, unmasked here.
    async fn credential(
        &self,
        attestation: Option<&str>,
        agent: Option<&str>,
        client: &str,
        task: &str,
    ) -> Result<([u8; 32], Vec<u32>, Vec<u8>), tonic::Status> {
        use rand::SeedableRng as _;
        let mut rng = rand::rngs::StdRng::try_from_rng(&mut rand::rngs::SysRng).unwrap();
        let requester = Requester::new(&mut rng).unwrap();
        let mut c = IdentityServiceClient::new(self.cluster.channel_as(client).await);
        let reply = c
            .request_credential(api::CredentialRequest {
                attestation: attestation.unwrap_or_default().into(),
                agent: agent.unwrap_or_default().into(),
                target: "orders-db".into(),
                task_id: task.into(),
                requester_public: requester.public().to_bytes().to_vec(),
                ..Default::default()
            })
            .await?
            .into_inner();
        let resp = DhResponse::from_bytes(&reply.masked).unwrap();
        let shared = requester.unmask(&resp).unwrap();
        let cred = tdh::derive_credential(&shared, &reply.context).unwrap();
        Ok((*cred.secret_bytes(), reply.nodes, reply.context))
    }
}

async fn start() -> Gov {
    let cfg = TempDir::new("governance-cfg");
    let issuer = TestIssuer::new(&cfg.0);
    let policy_dir = cfg.0.join("policy");
    std::fs::create_dir_all(&policy_dir).unwrap();
    std::fs::write(policy_dir.join("gov.cedar"), POLICY).unwrap();
    let audit_file = cfg.0.join("audit.jsonl");
    let relay_file = cfg.0.join("relay.bin");
    let flags = [
        "--policy-dir".to_owned(),
        policy_dir.display().to_string(),
        "--trust-config".to_owned(),
        cfg.0.join("trust.json").display().to_string(),
        "--audit-sink".to_owned(),
        format!("file:{}", audit_file.display()),
        "--audit-checkpoint-secs".to_owned(),
        "1".to_owned(),
        "--approval-ttl-secs".to_owned(),
        "5".to_owned(),
        "--record-relay".to_owned(),
        relay_file.display().to_string(),
    ];
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let cluster = TestCluster::start("governance", 3, 1, &flags);
    cluster.add_client("ops");
    cluster.add_client("db");
    cluster.create_token_key("tokens", 900, 4).await;
    Gov {
        cluster,
        issuer,
        audit_file,
        relay_file,
        cfg,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn governance_end_to_end() {
    let mut g = start().await;
    let blue = g.issuer.attest("blue", json!({"team": "blue"}));
    let mut id = g.identity().await;

    // --- Every decision is in the audit trail, with its deciding policies, by the
    // time the answer arrives.
    let ok = id
        .issue_token(token_request(
            &blue,
            "tools",
            &["tools:read", "tools:write"],
            300,
        ))
        .await
        .unwrap()
        .into_inner();
    let e = last(&g.audit_file, "token", "issue_token");
    assert_eq!(e["outcome"], "allow");
    assert_eq!(e["jti"], ok.jti.as_str());
    assert_eq!(policy_ids(&e), ["blue-tools"]);
    assert_eq!(e["subject"], format!("{SUBJECT_PREFIX}blue"));
    assert_eq!(e["authn_method"], "oidc");
    assert_eq!(e["attestation_issuer"], quorate_tests::TEST_ISS);
    assert_eq!(e["resource"], "Audience::\"tools\"");
    assert_eq!(e["caller"], "admin");
    assert_eq!(e["nodes"].as_array().unwrap().len(), 2, "{e}");
    assert_eq!(e["context"]["scopes"], "tools:read tools:write");
    // The token itself never enters the trail.
    let trail = std::fs::read_to_string(&g.audit_file).unwrap();
    assert!(!trail.contains(&ok.access_token));
    assert!(!trail.contains(ok.access_token.split('.').nth(2).unwrap()));
    assert!(!trail.contains(&blue));

    let mut prod = token_request(&blue, "tools", &["delete"], 60);
    prod.context.insert("environment".into(), "prod".into());
    let s = id.issue_token(prod).await.unwrap_err();
    assert_eq!(s.code(), Code::PermissionDenied);
    let e = last(&g.audit_file, "token", "issue_token");
    assert_eq!(e["outcome"], "deny");
    assert_eq!(policy_ids(&e), ["no-prod-deletes"]);
    assert!(e["reason"].as_str().unwrap().contains("no-prod-deletes"));

    let red = g.issuer.attest("red", json!({"team": "red"}));
    id.issue_token(token_request(&red, "tools", &[], 60))
        .await
        .unwrap_err();
    let e = last(&g.audit_file, "token", "issue_token");
    assert_eq!(
        (e["outcome"].as_str(), e["subject"].as_str()),
        (Some("deny"), Some(&*format!("{SUBJECT_PREFIX}red")))
    );
    assert!(e["reason"].as_str().unwrap().contains("no policy permits"));

    // An attestation that does not verify is a decision too.
    id.issue_token(token_request("not-a-jwt", "tools", &[], 60))
        .await
        .unwrap_err();
    let e = last(&g.audit_file, "token", "issue_token");
    assert_eq!(e["outcome"], "deny");
    assert!(e["reason"].as_str().unwrap().contains("attestation"), "{e}");

    // Revocation and key operations.
    id.revoke(api::RevokeRequest {
        target: Some(api::revoke_request::Target::Jti("some-jti".into())),
    })
    .await
    .unwrap();
    let e = last(&g.audit_file, "revocation", "revoke_jti");
    assert_eq!(
        (e["outcome"].as_str(), e["jti"].as_str()),
        (Some("allow"), Some("some-jti"))
    );
    let mut ops_keys =
        api::key_service_client::KeyServiceClient::new(g.cluster.channel_as("ops").await);
    let s = ops_keys
        .create_key(api::CreateKeyRequest {
            name: "ops-key".into(),
            purpose: api::Purpose::Sign as i32,
            token_rules: None,
            profile: api::KeyProfile::Unspecified as i32,
        })
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::PermissionDenied);
    let e = last(&g.audit_file, "key", "create_key");
    assert_eq!(
        (e["outcome"].as_str(), e["caller"].as_str()),
        (Some("deny"), Some("ops"))
    );

    // --- Delegation: RFC 8693 token exchange.
    let helper = g.issuer.attest("helper", json!({}));
    let delegated = id
        .exchange_token(api::ExchangeTokenRequest {
            subject_token: ok.access_token.clone(),
            actor_attestation: helper.clone(),
            scopes: vec!["tools:read".into()],
            ttl_seconds: 120,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let c = g.verify_token(&delegated.access_token, "tools").await;
    assert_eq!(c["sub"], format!("{SUBJECT_PREFIX}blue"));
    assert_eq!(c["act"], json!({"sub": format!("{SUBJECT_PREFIX}helper")}));
    assert_eq!(c["scope"], "tools:read");
    assert!(c["exp"].as_i64().unwrap() <= claims_of(&ok.access_token)["exp"].as_i64().unwrap());
    let e = last(&g.audit_file, "exchange", "exchange_token");
    assert_eq!(policy_ids(&e), ["delegate-tools"]);
    assert_eq!(e["context"]["actors"], format!("{SUBJECT_PREFIX}helper"));
    // A second hop nests the chain.
    let helper2 = g.issuer.attest("helper2", json!({}));
    let nested = id
        .exchange_token(api::ExchangeTokenRequest {
            subject_token: delegated.access_token.clone(),
            actor_attestation: helper2.clone(),
            ttl_seconds: 60,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let c = g.verify_token(&nested.access_token, "tools").await;
    assert_eq!(
        c["act"],
        json!({"sub": format!("{SUBJECT_PREFIX}helper2"), "act": {"sub": format!("{SUBJECT_PREFIX}helper")}})
    );
    assert_eq!(c["scope"], "tools:read");
    // Scopes only narrow; the audience cannot change.
    for (scopes, audience, words) in [
        (vec!["tools:write".to_owned()], "", "only narrow"),
        (vec!["tools:admin".to_owned()], "", "only narrow"),
        (vec![], "prod", "cannot widen its audience"),
    ] {
        let s = id
            .exchange_token(api::ExchangeTokenRequest {
                subject_token: delegated.access_token.clone(),
                actor_attestation: helper2.clone(),
                scopes,
                audience: audience.into(),
                ttl_seconds: 60,
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(s.code(), Code::PermissionDenied, "{s:?}");
        assert!(s.message().contains(words), "{}", s.message());
    }
    // Policy sees the chain: helper3 anywhere in it is refused.
    let helper3 = g.issuer.attest("helper3", json!({}));
    let s = id
        .exchange_token(api::ExchangeTokenRequest {
            subject_token: delegated.access_token.clone(),
            actor_attestation: helper3,
            ttl_seconds: 60,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert!(s.message().contains("no-helper3"), "{}", s.message());
    assert_eq!(
        policy_ids(&last(&g.audit_file, "exchange", "exchange_token")),
        ["no-helper3"]
    );

    // A DPoP-bound token is delegated only by its key holder, and stays bound.
    let key = quorate_proto::dpop::DpopKey::generate().unwrap();
    let token_url = format!("{}/token", g.cluster.issuer());
    let mut bound = token_request(&blue, "tools", &["tools:read"], 300);
    bound.dpop_proof = key.proof("POST", &token_url, None).unwrap();
    let bound = id.issue_token(bound).await.unwrap().into_inner();
    assert_eq!(bound.token_type, "DPoP");
    assert_eq!(
        claims_of(&bound.access_token)["cnf"]["jkt"],
        key.thumbprint().as_str()
    );
    assert_eq!(
        last(&g.audit_file, "token", "issue_token")["context"]["dpop_jkt"],
        key.thumbprint().as_str()
    );
    let other_key = quorate_proto::dpop::DpopKey::generate().unwrap();
    let delegate = |proof: String| api::ExchangeTokenRequest {
        subject_token: bound.access_token.clone(),
        actor_attestation: helper.clone(),
        ttl_seconds: 60,
        dpop_proof: proof,
        ..Default::default()
    };
    for (proof, words) in [
        (String::new(), "DPoP-bound"),
        (
            other_key.proof("POST", &token_url, None).unwrap(),
            "not by the key",
        ),
    ] {
        let s = id.exchange_token(delegate(proof)).await.unwrap_err();
        assert!(s.message().contains(words), "{}", s.message());
    }
    let proof = key.proof("POST", &token_url, None).unwrap();
    let hop = id
        .exchange_token(delegate(proof.clone()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        claims_of(&hop.access_token)["cnf"]["jkt"],
        key.thumbprint().as_str()
    );
    // The same proof twice is a replay.
    let s = id.exchange_token(delegate(proof)).await.unwrap_err();
    assert!(s.message().contains("already used"), "{}", s.message());

    // --- Human approval.
    let agent = blue.clone();
    let mut waiting_client = g.identity().await;
    let waiting = tokio::spawn(async move {
        let mut r = token_request(&agent, "prod", &["deploy"], 120);
        r.wait_seconds = 30;
        waiting_client.issue_token(r).await
    });
    let pending = wait_pending(&g, 1).await;
    let apr = pending[0].clone();
    assert_eq!(apr.policy_ids, ["prod-approval"]);
    assert_eq!(apr.agent, format!("{SUBJECT_PREFIX}blue"));
    let e = last(&g.audit_file, "approval", "request");
    assert_eq!(
        (e["outcome"].as_str(), e["approval_id"].as_str()),
        (Some("pending"), Some(apr.id.as_str()))
    );
    // A client that is not an approver cannot approve.
    let s = g
        .approvals_as("ops")
        .await
        .decide_approval(api::DecideApprovalRequest {
            id: apr.id.clone(),
            approve: true,
            reason: String::new(),
            statement: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::PermissionDenied, "{s:?}");
    assert_eq!(last(&g.audit_file, "admin", "approve")["caller"], "ops");
    assert!(!waiting.is_finished(), "the request must still wait");
    let decided = g
        .approvals_as("admin")
        .await
        .decide_approval(api::DecideApprovalRequest {
            id: apr.id.clone(),
            approve: true,
            reason: "change ticket 42".into(),
            statement: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (decided.state.as_str(), decided.decided_by.as_str()),
        ("approved", "admin")
    );
    let granted = waiting.await.unwrap().unwrap().into_inner();
    assert!(granted.pending_approval.is_empty());
    let c = g.verify_token(&granted.access_token, "prod").await;
    assert_eq!(c["scope"], "deploy");
    let e = last(&g.audit_file, "token", "issue_token");
    assert_eq!(
        (e["outcome"].as_str(), e["approval_id"].as_str()),
        (Some("allow"), Some(apr.id.as_str()))
    );
    assert_eq!(
        last(&g.audit_file, "approval", "approve")["outcome"],
        "approved"
    );

    // Rejected: the agent polls and is refused.
    let mut r = token_request(&blue, "prod", &["deploy"], 120);
    let first = id.issue_token(r.clone()).await.unwrap().into_inner();
    assert!(first.access_token.is_empty() && !first.pending_approval.is_empty());
    assert_eq!(
        last(&g.audit_file, "token", "issue_token")["outcome"],
        "pending"
    );
    // (The approver uses the CLI here.)
    let listed = cli(&g)
        .args(["approval", "list"])
        .env("QUORATE_ADDR", g.cluster.coordinator_addr.to_string())
        .output()
        .unwrap();
    assert!(
        listed.status.success(),
        "{}",
        String::from_utf8_lossy(&listed.stderr)
    );
    assert!(String::from_utf8_lossy(&listed.stdout).contains(&first.pending_approval));
    let denied = cli(&g)
        .args([
            "approval",
            "deny",
            &first.pending_approval,
            "--reason",
            "not today",
        ])
        .env("QUORATE_ADDR", g.cluster.coordinator_addr.to_string())
        .output()
        .unwrap();
    assert!(
        denied.status.success(),
        "{}",
        String::from_utf8_lossy(&denied.stderr)
    );
    assert!(String::from_utf8_lossy(&denied.stdout).contains("rejected by admin"));
    r.approval_id = first.pending_approval.clone();
    let s = id.issue_token(r.clone()).await.unwrap_err();
    assert_eq!(s.code(), Code::PermissionDenied);
    assert!(
        s.message().contains("rejected by admin: not today"),
        "{}",
        s.message()
    );
    // An approval is bound to its request: other scopes do not ride on it.
    let mut other = token_request(&blue, "prod", &["deploy", "admin"], 120);
    other.approval_id = first.pending_approval.clone();
    assert!(
        id.issue_token(other)
            .await
            .unwrap_err()
            .message()
            .contains("different request")
    );

    // Expired: nobody decides within --approval-ttl-secs.
    let mut r = token_request(&blue, "prod", &["read"], 60);
    let p = id.issue_token(r.clone()).await.unwrap().into_inner();
    tokio::time::sleep(Duration::from_millis(5500)).await;
    r.approval_id = p.pending_approval.clone();
    let s = id.issue_token(r).await.unwrap_err();
    assert!(s.message().contains("expired"), "{}", s.message());
    let e = last(&g.audit_file, "approval", "expire");
    assert_eq!(
        (e["outcome"].as_str(), e["approval_id"].as_str()),
        (Some("expired"), Some(p.pending_approval.as_str()))
    );

    // --- Confidential credentials.
    let mut keys = g.cluster.keys().await;
    keys.create_key(api::CreateKeyRequest {
        name: "credentials".into(),
        purpose: api::Purpose::Derive as i32,
        token_rules: None,
        profile: api::KeyProfile::Unspecified as i32,
    })
    .await
    .unwrap();
    let task = id
        .start_task(api::StartTaskRequest {
            attestation: blue.clone(),
            ttl_seconds: 600,
            description: "orders report".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .task_id;
    let (c1, nodes1, ctx) = g
        .credential(Some(&blue), None, "admin", &task)
        .await
        .unwrap();
    let e = last(&g.audit_file, "credential", "request_credential");
    assert_eq!(policy_ids(&e), ["agent-credentials"]);
    let fingerprint = e["credential"].as_str().unwrap().to_owned();
    assert!(fingerprint.starts_with("cred-"));
    // Another quorum: node 1 is down.
    g.cluster.kill_node(1);
    let (c2, nodes2, _) = g
        .credential(Some(&blue), None, "admin", &task)
        .await
        .unwrap();
    assert_ne!(
        nodes1, nodes2,
        "the second credential must come from another quorum"
    );
    assert_eq!(c1, c2, "two quorums must give the same credential");
    // The resource that shares the target derives the same credential to check it.
    let (c3, _, _) = g
        .credential(None, Some(&format!("{SUBJECT_PREFIX}blue")), "db", &task)
        .await
        .unwrap();
    assert_eq!(c1, c3);
    // The CLI unmasks the same credential locally.
    let d = g.cluster.coordinator_dir();
    let dir = d.parent().unwrap();
    let got = cli(&g)
        .args([
            "credential",
            "get",
            "--target",
            "orders-db",
            "--task",
            &task,
            "--agent",
        ])
        .arg(format!("{SUBJECT_PREFIX}blue"))
        .env("QUORATE_ADDR", g.cluster.coordinator_addr.to_string())
        .env("QUORATE_CERT", dir.join("client-db.pem"))
        .env("QUORATE_KEY", dir.join("client-db-key.pem"))
        .output()
        .unwrap();
    assert!(
        got.status.success(),
        "{}",
        String::from_utf8_lossy(&got.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&got.stdout).trim(), hex::encode(c1));
    assert_eq!(
        policy_ids(&last(&g.audit_file, "credential", "request_credential")),
        ["db-verifies"]
    );
    // ...but a client policy does not name may not.
    let s = g
        .credential(None, Some(&format!("{SUBJECT_PREFIX}blue")), "ops", &task)
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::PermissionDenied);
    g.cluster.restart_node(1, None);
    // The coordinator never saw the credential: not in the relayed traffic it recorded,
    // not in the audit trail, not in its store.
    let hexed = hex::encode(c1);
    for path in [
        g.relay_file.clone(),
        g.audit_file.clone(),
        g.cluster.coordinator_dir().join("audit.redb"),
    ] {
        let bytes = std::fs::read(&path).unwrap();
        assert!(!bytes.is_empty(), "{} is empty", path.display());
        assert!(
            !contains(&bytes, &c1),
            "{} holds the credential",
            path.display()
        );
        assert!(
            !contains(&bytes, hexed.as_bytes()),
            "{} holds the credential in hex",
            path.display()
        );
    }
    assert!(
        contains(&std::fs::read(&g.relay_file).unwrap(), &ctx),
        "the relay recording covers DH traffic"
    );
    // Ending the task closes the credential.
    id.end_task(api::EndTaskRequest {
        task_id: task.clone(),
    })
    .await
    .unwrap();
    let s = g
        .credential(Some(&blue), None, "admin", &task)
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::PermissionDenied);
    assert!(s.message().contains("ended"), "{}", s.message());
    assert_eq!(
        last(&g.audit_file, "credential", "request_credential")["outcome"],
        "deny"
    );

    // --- Checkpoints: signed by the cluster, verified with the JWKS, offline.
    let head = events(&g.audit_file).len() as u64 - 1;
    let deadline = Instant::now() + Duration::from_secs(60);
    let checkpoint = loop {
        let cp = events(&g.audit_file).into_iter().rev().find(|e| {
            e["kind"] == "checkpoint" && e["checkpoint"]["seq"].as_u64().unwrap() >= head
        });
        if let Some(cp) = cp {
            break cp;
        }
        assert!(
            Instant::now() < deadline,
            "no checkpoint covers event {head}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let (jwks_text, jwks) = g.checkpoint_jwks().await;
    let (_, issuer_jwks) = g.jwks().await;
    let kid = jsonwebtoken::decode_header(checkpoint["checkpoint"]["jws"].as_str().unwrap())
        .unwrap()
        .kid
        .unwrap();
    assert!(
        issuer_jwks.find(&kid).is_none(),
        "the checkpoint key is in the issuer's JWKS"
    );
    let claims =
        audit::verify_checkpoint(checkpoint["checkpoint"]["jws"].as_str().unwrap(), &jwks).unwrap();
    assert_eq!(claims.iss, g.cluster.issuer());
    // And with plain jsonwebtoken, as any verifier would.
    let jws = checkpoint["checkpoint"]["jws"].as_str().unwrap();
    let kid = jsonwebtoken::decode_header(jws).unwrap().kid.unwrap();
    let mut v = Validation::new(Algorithm::ES256);
    v.required_spec_claims.clear();
    v.validate_exp = false;
    let payload: Value = jsonwebtoken::decode(
        jws,
        &DecodingKey::from_jwk(jwks.find(&kid).unwrap()).unwrap(),
        &v,
    )
    .unwrap()
    .claims;
    assert_eq!(payload["head"], checkpoint["checkpoint"]["head"]);

    // `quorate audit verify` over the file the sink wrote, and over the chain exported
    // from the store with `audit tail`: the same bytes.
    let jwks_file = g.cfg.0.join("jwks.json.cluster");
    std::fs::write(&jwks_file, &jwks_text).unwrap();
    let text = std::fs::read_to_string(&g.audit_file).unwrap();
    let cut = text
        .rfind(&format!(
            "\"id\":\"{}\"",
            checkpoint["id"].as_str().unwrap()
        ))
        .unwrap();
    let upto = &text[..cut + text[cut..].find('\n').unwrap() + 1];
    let chain = g.cfg.0.join("chain.jsonl");
    std::fs::write(&chain, upto).unwrap();
    let good = run_verify(&g, &chain, &jwks_file);
    assert!(
        good.status.success(),
        "{}",
        String::from_utf8_lossy(&good.stderr)
    );
    let said = String::from_utf8_lossy(&good.stdout);
    assert!(
        said.contains("chain intact") && said.contains("checkpoints verified"),
        "{said}"
    );
    let exported = export_chain(&g);
    assert!(
        exported.starts_with(upto),
        "the store and the file sink hold the same chain"
    );

    // Tampering with any byte is caught, at the tampered event or the link after it.
    let lines: Vec<&str> = upto.lines().collect();
    let mut offset = 0;
    for (i, line) in lines.iter().enumerate() {
        for pos in [
            0,
            line.len() / 3,
            line.len() / 2,
            line.len() - 2,
            line.len() - 1,
        ] {
            let mut bytes = upto.as_bytes().to_vec();
            bytes[offset + pos] ^= 0x04;
            let Ok(tampered) = String::from_utf8(bytes) else {
                continue;
            };
            let broken = audit::verify_chain(&tampered, &jwks).expect_err(&format!(
                "a flip in line {} byte {pos} went unnoticed",
                i + 1
            ));
            assert!(
                broken.line == i + 1 || broken.line == i + 2,
                "flip in line {}: {broken}",
                i + 1
            );
        }
        offset += line.len() + 1;
    }
    // The CLI names the first broken event.
    let victim = lines.len() / 2;
    let mut altered: Vec<String> = lines.iter().map(|l| (*l).to_owned()).collect();
    altered[victim] = altered[victim].replacen("\"outcome\":\"", "\"outcome\":\"x", 1);
    std::fs::write(&chain, altered.join("\n") + "\n").unwrap();
    let bad = run_verify(&g, &chain, &jwks_file);
    assert_eq!(bad.status.code(), Some(4));
    let err = String::from_utf8_lossy(&bad.stderr);
    let seq = victim;
    assert!(
        err.contains(&format!("line {} (event seq {seq}", victim + 1)),
        "{err}"
    );
    // Rewriting hashes after the change is caught by the checkpoint signature.
    let mut forged = String::new();
    let mut prev = audit::GENESIS.to_owned();
    for (i, l) in lines.iter().enumerate() {
        let mut ev: audit::Event = serde_json::from_str(l).unwrap();
        if i == victim {
            ev.fields.reason = Some("nothing to see".into());
        }
        ev.prev = prev.clone();
        ev.hash = ev.compute_hash().unwrap();
        prev = ev.hash.clone();
        forged.push_str(&ev.to_line().unwrap());
        forged.push('\n');
    }
    let broken = audit::verify_chain(&forged, &jwks).unwrap_err();
    assert!(
        broken.why.contains("signed head") || broken.why.contains("checkpoint"),
        "{broken}"
    );

    // Let the cluster shut down cleanly.
    drop(id);
    let _ = g.cluster.cluster().await;
}

/// Cedar skips a policy whose evaluation errors, so an erroring forbid would let a
/// permit win. Here it denies, and the refusal and the audit event name the policy and
/// the error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_that_fails_to_evaluate_denies() {
    let g = start().await;
    let mut id = g.identity().await;
    let pair = r#"
@id("x-agents")
permit (principal is Agent, action == Action::"issue_token", resource == Audience::"x");

@id("ttl-overflow")
forbid (principal is Agent, action == Action::"issue_token", resource == Audience::"x")
when { context.ttl_seconds * 9223372036854775807 > 0 };
"#;
    id.apply_policy(api::ApplyPolicyRequest {
        bundle: String::new(),
        files: vec![
            api::PolicyFile {
                name: "pair.cedar".into(),
                text: pair.into(),
            },
            // Keeps the cluster administrable; it says nothing about agents.
            api::PolicyFile {
                name: "admin.cedar".into(),
                text: r#"@id("admin-client") permit (principal == Client::"admin", action, resource);"#
                    .into(),
            },
        ],
    })
    .await
    .unwrap();
    let agent = g.issuer.attest("agent-x", json!({}));

    // ttl 300 s: the forbid overflows. Cedar alone would skip it and allow by x-agents.
    let s = id
        .issue_token(token_request(&agent, "x", &[], 300))
        .await
        .expect_err("an erroring forbid must deny");
    assert_eq!(s.code(), Code::PermissionDenied, "{s:?}");
    for words in [
        "ttl-overflow",
        "overflow while attempting to multiply",
        "evaluation failed",
    ] {
        assert!(
            s.message().contains(words),
            "`{words}` not in {}",
            s.message()
        );
    }
    let e = last(&g.audit_file, "token", "issue_token");
    assert_eq!(e["outcome"], "deny", "{e}");
    assert_eq!(policy_ids(&e), ["ttl-overflow"], "{e}");
    let reason = e["reason"].as_str().unwrap();
    assert!(
        reason.contains("ttl-overflow") && reason.contains("overflow while attempting"),
        "{reason}"
    );
    assert!(e["jti"].is_null(), "no token: {e}");

    // ttl 1 s: no overflow; the forbid holds and denies as written.
    let s = id
        .issue_token(token_request(&agent, "x", &[], 1))
        .await
        .expect_err("the forbid denies");
    assert_eq!(s.code(), Code::PermissionDenied, "{s:?}");
    assert!(
        s.message().contains("denied by policy ttl-overflow")
            && !s.message().contains("evaluation failed"),
        "{}",
        s.message()
    );
    let e = last(&g.audit_file, "token", "issue_token");
    assert_eq!(
        (e["outcome"].as_str(), policy_ids(&e)),
        (Some("deny"), vec!["ttl-overflow".to_owned()])
    );
}

/// Revocation by agent deprovisions it: every path refuses it, naming the
/// deprovisioning — token issuance, task start, approval of its pending request,
/// credentials (its own and a resource client's for it), and token exchange with it as
/// the subject or the actor. Other agents are unaffected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deprovisioned_agents_get_nothing() {
    let g = start().await;
    let mut id = g.identity().await;
    let gone = g.issuer.attest("gone", json!({"team": "blue"}));
    let gone_subject = format!("{SUBJECT_PREFIX}gone");
    let other = g.issuer.attest("other", json!({"team": "blue"}));
    let helper = g.issuer.attest("helper", json!({}));
    let mut keys = g.cluster.keys().await;
    keys.create_key(api::CreateKeyRequest {
        name: "credentials".into(),
        purpose: api::Purpose::Derive as i32,
        ..Default::default()
    })
    .await
    .unwrap();

    // Before: every path works for `gone`.
    let held = id
        .issue_token(token_request(&gone, "tools", &["tools:read"], 300))
        .await
        .unwrap()
        .into_inner();
    let start_task = |att: &str| api::StartTaskRequest {
        attestation: att.into(),
        ttl_seconds: 600,
        description: String::new(),
    };
    let task = id
        .start_task(start_task(&gone))
        .await
        .unwrap()
        .into_inner()
        .task_id;
    g.credential(Some(&gone), None, "admin", &task)
        .await
        .unwrap();
    g.credential(None, Some(&gone_subject), "db", &task)
        .await
        .unwrap();
    let exchange = |subject_token: &str, actor: &str| api::ExchangeTokenRequest {
        subject_token: subject_token.into(),
        actor_attestation: actor.into(),
        ttl_seconds: 60,
        ..Default::default()
    };
    id.exchange_token(exchange(&held.access_token, &helper))
        .await
        .unwrap();
    let others = id
        .issue_token(token_request(&other, "tools", &["tools:read"], 300))
        .await
        .unwrap()
        .into_inner();
    id.exchange_token(exchange(&others.access_token, &gone))
        .await
        .unwrap();
    // A request of `gone` waits for approval (approvals expire after 5 s here).
    let pending = id
        .issue_token(token_request(&gone, "prod", &["deploy"], 120))
        .await
        .unwrap()
        .into_inner()
        .pending_approval;
    assert!(!pending.is_empty());

    let revoked = id
        .revoke(api::RevokeRequest {
            target: Some(api::revoke_request::Target::Agent(gone_subject.clone())),
        })
        .await
        .unwrap()
        .into_inner()
        .revoked;
    assert!(revoked.contains("deprovisioned"), "{revoked}");

    // Approving its pending request is refused, saying why; the request stays
    // undecided (an approver may still reject it).
    let s = g
        .approvals_as("admin")
        .await
        .decide_approval(api::DecideApprovalRequest {
            id: pending.clone(),
            approve: true,
            reason: String::new(),
            statement: String::new(),
        })
        .await
        .expect_err("a deprovisioned agent's request cannot be approved");
    assert_eq!(s.code(), Code::PermissionDenied, "{s:?}");
    for words in ["cannot be approved", "deprovisioned", gone_subject.as_str()] {
        assert!(
            s.message().contains(words),
            "`{words}` not in {}",
            s.message()
        );
    }
    let e = last(&g.audit_file, "approval", "approve");
    assert_eq!(e["outcome"], "deny", "{e}");
    assert!(
        e["reason"].as_str().unwrap().contains("deprovisioned"),
        "{e}"
    );

    let refused = |r: Result<(), tonic::Status>, what: &str| {
        let s = r.expect_err(what);
        assert_eq!(s.code(), Code::PermissionDenied, "{what}: {s:?}");
        assert!(
            s.message().contains("deprovisioned"),
            "{what}: {}",
            s.message()
        );
    };
    refused(
        id.issue_token(token_request(&gone, "tools", &["tools:read"], 60))
            .await
            .map(drop),
        "issue token",
    );
    refused(
        id.start_task(start_task(&gone)).await.map(drop),
        "start a task bound to it",
    );
    refused(
        g.credential(Some(&gone), None, "admin", &task)
            .await
            .map(drop),
        "its credential",
    );
    refused(
        g.credential(None, Some(&gone_subject), "db", &task)
            .await
            .map(drop),
        "a resource client's credential for it",
    );
    refused(
        id.exchange_token(exchange(&held.access_token, &helper))
            .await
            .map(drop),
        "exchange with it as the subject",
    );
    refused(
        id.exchange_token(exchange(&others.access_token, &gone))
            .await
            .map(drop),
        "exchange with it as the actor",
    );
    let e = last(&g.audit_file, "exchange", "exchange_token");
    assert_eq!(e["outcome"], "deny", "{e}");

    // Everyone else is unaffected.
    id.issue_token(token_request(&other, "tools", &["tools:read"], 60))
        .await
        .unwrap();
    id.start_task(start_task(&other)).await.unwrap();
    id.exchange_token(exchange(&others.access_token, &helper))
        .await
        .unwrap();
}

async fn wait_pending(g: &Gov, n: usize) -> Vec<api::Approval> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let list = g
            .approvals_as("admin")
            .await
            .list_approvals(api::ListApprovalsRequest { all: false })
            .await
            .unwrap()
            .into_inner()
            .approvals;
        if list.len() >= n {
            return list;
        }
        assert!(Instant::now() < deadline, "no pending approval appeared");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

fn cli(g: &Gov) -> std::process::Command {
    let d = g.cluster.coordinator_dir();
    let dir = d.parent().unwrap();
    let mut c = std::process::Command::new(binary("quorate"));
    c.env("QUORATE_CACERT", dir.join("ca.pem"))
        .env("QUORATE_CERT", dir.join("client-admin.pem"))
        .env("QUORATE_KEY", dir.join("client-admin-key.pem"))
        .env("QUORATE_DOMAIN", quorate_tests::DOMAIN);
    c
}

fn run_verify(g: &Gov, chain: &Path, jwks: &Path) -> std::process::Output {
    cli(g)
        .arg("audit")
        .arg("verify")
        .arg(chain)
        .arg("--jwks")
        .arg(jwks)
        .output()
        .unwrap()
}

fn export_chain(g: &Gov) -> String {
    let out = cli(g)
        .args(["audit", "tail", "--from", "0", "--no-follow"])
        .env("QUORATE_ADDR", g.cluster.coordinator_addr.to_string())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// A sink that fails makes requests fail; the chain in the store stays whole, and
/// syslog receives RFC 5424 messages while it works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_audit_sink_fails_requests() {
    let cfg = TempDir::new("audit-sink-cfg");
    let sock_path = cfg.0.join("syslog.sock");
    let syslog = std::os::unix::net::UnixDatagram::bind(&sock_path).unwrap();
    syslog
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let sink = format!("syslog+unix:{}", sock_path.display());
    let cluster = TestCluster::start("audit-sink", 3, 1, &["--audit-sink", &sink]);
    let mut keys = cluster.keys().await;
    let create = |name: &str| api::CreateKeyRequest {
        name: name.into(),
        purpose: api::Purpose::Derive as i32,
        token_rules: None,
        profile: api::KeyProfile::Unspecified as i32,
    };
    keys.create_key(create("k1")).await.unwrap();
    let mut buf = vec![0u8; 65536];
    let n = syslog.recv(&mut buf).unwrap();
    let msg = String::from_utf8_lossy(&buf[..n]).to_string();
    assert!(msg.starts_with("<86>1 "), "{msg}");
    assert!(msg.contains("quorate-coordinator"), "{msg}");
    assert!(
        msg.contains("[quorate@32473 seq=\"0\" outcome=\"allow\" kind=\"key\"]"),
        "{msg}"
    );
    let json = &msg[msg.find("] {").unwrap() + 2..];
    let ev: Value = serde_json::from_str(json).unwrap();
    assert_eq!(ev["action"], "create_key");
    assert_eq!(ev["key"], "k1");

    // The collector goes away: requests fail closed, naming the audit trail.
    drop(syslog);
    std::fs::remove_file(&sock_path).unwrap();
    let s = keys.create_key(create("k2")).await.unwrap_err();
    assert_eq!(s.code(), Code::Unavailable, "{s:?}");
    assert!(s.message().contains("audit"), "{}", s.message());
    let s = cluster
        .identity_api()
        .await
        .issue_token(token_request("x", "tools", &[], 60))
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::Unavailable, "{s:?}");

    // It comes back: requests pass again, and the store's chain is whole.
    let syslog = std::os::unix::net::UnixDatagram::bind(&sock_path).unwrap();
    syslog
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    keys.create_key(create("k3")).await.unwrap();
    let n = syslog.recv(&mut buf).unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).contains("\"key\":\"k3\""));
    let mut tail = api::audit_service_client::AuditServiceClient::new(cluster.api_channel().await);
    let mut stream = tail
        .tail(api::TailRequest {
            from_seq: Some(0),
            follow: false,
        })
        .await
        .unwrap()
        .into_inner();
    let mut text = String::new();
    while let Some(r) = stream.message().await.unwrap() {
        text.push_str(&r.json);
        text.push('\n');
    }
    let v = audit::verify_chain(&text, &jsonwebtoken::jwk::JwkSet { keys: vec![] }).unwrap();
    assert!(v.events >= 4, "{v:?}");
    assert!(
        text.contains("\"key\":\"k2\""),
        "the refused request's event is in the store"
    );
}
