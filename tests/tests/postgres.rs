//! Several coordinators over one PostgreSQL store (`coordinator/STORE.md`), against a
//! real PostgreSQL server started here (skipped, saying so, where it is not installed
//! and `CI` is not set).
//!
//! - `migrate` creates the schema once; a coordinator refuses an unmigrated database;
//! - two (then three) coordinators serve one cluster: tokens from each, also at once; a revocation by jti and a
//!   deprovisioned agent, done on one, are refused by the other;
//! - a retried request (same `request_id`) gets the same token from either coordinator,
//!   its DPoP proof is not its own replay but is anyone else's, and a different request
//!   under a used id is refused;
//! - an approval asked on one coordinator is decided on another and used once: the
//!   retries of the request that used it get its token, no other request gets one;
//! - the audit chain in the store verifies as one chain, with events of both;
//! - PostgreSQL restarts under a coordinator: requests fail as `UNAVAILABLE` meanwhile
//!   and succeed after, and the chain still verifies;
//! - a schema newer than the build's is refused by `migrate` and at start.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    missing_docs
)]

use std::time::{Duration, Instant};

use quorate_proto::api;
use quorate_proto::api::approval_service_client::ApprovalServiceClient;
use quorate_tests::postgres::{Postgres, SharedStoreSetup, migrate, stored_chain};
use quorate_tests::{Proc, TempDir, TestCluster, free_port, spawn_ready};
use serde_json::json;
use tonic::Code;

const POLICY: &str = r#"
@id("blue-team-tools")
@max_ttl_seconds("600")
permit (principal is Agent, action == Action::"issue_token", resource == Audience::"tools")
when { principal.hasTag("team") && principal.getTag("team") == "blue" };

@id("prod-approval")
@approval("required")
@max_ttl_seconds("300")
permit (principal is Agent, action == Action::"issue_token", resource == Audience::"prod")
when { principal.hasTag("team") && principal.getTag("team") == "blue" };

@id("admin-client")
permit (principal == Client::"admin", action, resource);
"#;

fn request(att: &str) -> api::IssueTokenRequest {
    api::IssueTokenRequest {
        attestation: att.into(),
        audience: "tools".into(),
        scopes: vec!["tools:read".into()],
        ttl_seconds: 300,
        ..Default::default()
    }
}

/// Talks to one of the coordinators: the harness's clients follow
/// `TestCluster::coordinator_addr`.
struct Coordinators {
    cluster: TestCluster,
    a: std::net::SocketAddr,
    b: std::net::SocketAddr,
    _b: Proc,
}

impl Coordinators {
    fn at(&mut self, which: char) -> &TestCluster {
        self.cluster.coordinator_addr = if which == 'a' { self.a } else { self.b };
        &self.cluster
    }

    async fn issue(
        &mut self,
        which: char,
        req: api::IssueTokenRequest,
    ) -> Result<api::IssueTokenReply, tonic::Status> {
        let mut c = self.at(which).identity_api().await;
        c.issue_token(req).await.map(|r| r.into_inner())
    }

    async fn active(&mut self, which: char, token: &str) -> bool {
        let mut c = self.at(which).identity_api().await;
        c.introspect(api::IntrospectRequest {
            token: token.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .active
    }

    async fn revoke(&mut self, which: char, target: api::revoke_request::Target) {
        let mut c = self.at(which).identity_api().await;
        c.revoke(api::RevokeRequest {
            target: Some(target),
        })
        .await
        .unwrap();
    }
}

fn verify_chain(text: &str) -> u64 {
    let none = jsonwebtoken::jwk::JwkSet { keys: vec![] };
    quorate_proto::audit::verify_chain(text, &none)
        .unwrap_or_else(|e| panic!("the stored chain does not verify: {e}"))
        .events
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_coordinators_share_one_postgresql_store() {
    let Some(mut pg) = Postgres::start("two") else {
        return;
    };
    let url = pg.url();

    // Before `migrate` a coordinator refuses the database, naming the command.
    let setup = SharedStoreSetup::new("pg-cfg", POLICY);
    let issuer = &setup.issuer;
    let flags = setup.flags(&url);
    {
        let probe = TempDir::new("pg-probe");
        quorate_proto::pki::write_cluster(&probe.0, quorate_tests::DOMAIN, 3, false).unwrap();
        let d = &probe.0;
        let out = std::process::Command::new(quorate_tests::binary("quorate-coordinator"))
            .args(["--store", &url, "--listen", "127.0.0.1:0"])
            .args(["--domain", quorate_tests::DOMAIN])
            .arg("--cert")
            .arg(d.join("coordinator.pem"))
            .arg("--key")
            .arg(d.join("coordinator-key.pem"))
            .arg("--ca")
            .arg(d.join("ca.pem"))
            .args(["--node", "1=127.0.0.1:1", "--node", "2=127.0.0.1:2"])
            .args(["--node", "3=127.0.0.1:3"])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "started on an unmigrated database");
        assert!(
            err.contains("no coordinator schema") && err.contains("migrate"),
            "{err}"
        );
    }
    let (ok, said) = migrate(&url);
    assert!(ok && said.contains("applied migrations 1"), "{said}");
    let (ok, said) = migrate(&url);
    assert!(ok && said.contains("schema is current"), "{said}");

    // Coordinator A, a token key with pools; then coordinator B on the same store.
    let cluster = TestCluster::start("pg-two", 3, 1, &flags);
    cluster.create_token_key("tokens", 900, 2).await;
    let a = cluster.coordinator_addr;
    let b = spawn_ready(cluster.coordinator_command_on("127.0.0.1:0", free_port()));
    let mut cs = Coordinators {
        a,
        b: b.addr,
        _b: b,
        cluster,
    };
    cs.at('b')
        .wait_pools("tokens", 2, Duration::from_secs(120))
        .await;

    // A third coordinator; all three issue at once, so their appends to the one chain
    // interleave (each commit is chained onto whatever head another wrote first).
    let c = spawn_ready(
        cs.cluster
            .coordinator_command_on("127.0.0.1:0", free_port()),
    );
    let mut clients = Vec::new();
    for addr in [cs.a, cs.b, c.addr] {
        cs.cluster.coordinator_addr = addr;
        cs.cluster
            .wait_pools("tokens", 2, Duration::from_secs(120))
            .await;
        clients.push(cs.cluster.identity_api().await);
    }
    let blue = issuer.attest("agent-1", json!({"team": "blue"}));
    let mut tasks = Vec::new();
    for (k, client) in clients.into_iter().enumerate() {
        for _ in 0..4 {
            let mut client = client.clone();
            let req = request(&blue);
            tasks.push(tokio::spawn(async move {
                let t = client.issue_token(req).await.unwrap().into_inner();
                (k, t.jti)
            }));
        }
    }
    let mut concurrent = Vec::new();
    for t in tasks {
        concurrent.push(t.await.unwrap());
    }
    drop(c);

    // Tokens from both.
    let t_a = cs.issue('a', request(&blue)).await.unwrap();
    let t_b = cs.issue('b', request(&blue)).await.unwrap();
    assert_ne!(t_a.jti, t_b.jti);
    for which in ['a', 'b'] {
        assert!(cs.active(which, &t_a.access_token).await);
        assert!(cs.active(which, &t_b.access_token).await);
    }

    // A retried request (same request_id) gets the same token, on either coordinator,
    // and no second signature; its DPoP proof is not refused as its own replay, but is
    // for any other request. A different request under a used id is refused.
    let dpop = quorate_proto::dpop::DpopKey::generate().unwrap();
    let proof = dpop
        .proof("POST", &format!("{}/token", cs.cluster.issuer()), None)
        .unwrap();
    let retried = api::IssueTokenRequest {
        dpop_proof: proof.clone(),
        request_id: "retry-0123456789abcdef".into(),
        ..request(&blue)
    };
    let first = cs.issue('a', retried.clone()).await.unwrap();
    let again = cs.issue('b', retried.clone()).await.unwrap();
    let third = cs.issue('a', retried.clone()).await.unwrap();
    assert_eq!(first.token_type, "DPoP");
    assert_eq!(
        (&again.access_token, &again.jti),
        (&first.access_token, &first.jti)
    );
    assert_eq!(third.access_token, first.access_token);
    // The store keeps the answer sealed: no token in it.
    {
        let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
            .await
            .unwrap();
        let conn = tokio::spawn(conn);
        let rows = client
            .query("SELECT coalesce(reply, '') FROM issuance", &[])
            .await
            .unwrap();
        drop(client);
        let _ = conn.await;
        assert!(!rows.is_empty());
        for r in rows {
            let reply: &str = r.get(0);
            assert!(!reply.contains(&first.access_token), "a token in the store");
            assert!(!reply.contains(&first.jti), "an answer in the clear");
        }
    }
    let replay = cs
        .issue(
            'b',
            api::IssueTokenRequest {
                request_id: "other-0123456789abcdef".into(),
                ..retried.clone()
            },
        )
        .await
        .unwrap_err();
    assert!(replay.message().contains("already used"), "{replay:?}");
    let reused = cs
        .issue(
            'b',
            api::IssueTokenRequest {
                scopes: vec!["tools:write".into()],
                ..retried.clone()
            },
        )
        .await
        .unwrap_err();
    assert_eq!(reused.code(), Code::InvalidArgument, "{reused:?}");
    assert!(reused.message().contains("different request"), "{reused:?}");
    let bad_id = cs
        .issue(
            'a',
            api::IssueTokenRequest {
                request_id: "short".into(),
                ..request(&blue)
            },
        )
        .await
        .unwrap_err();
    assert_eq!(bad_id.code(), Code::InvalidArgument, "{bad_id:?}");

    // An approval asked on A is listed and decided on B, and used on A; a retry of the
    // request that used it (on B) gets the same token; another request gets nothing.
    let prod = api::IssueTokenRequest {
        audience: "prod".into(),
        request_id: "approve-0123456789abcdef".into(),
        ..request(&blue)
    };
    let asked = cs.issue('a', prod.clone()).await.unwrap();
    assert!(asked.access_token.is_empty() && !asked.pending_approval.is_empty());
    let mut approvals_b = ApprovalServiceClient::new(cs.at('b').api_channel().await);
    let listed = approvals_b
        .list_approvals(api::ListApprovalsRequest { all: false })
        .await
        .unwrap()
        .into_inner();
    assert!(
        listed
            .approvals
            .iter()
            .any(|a| a.id == asked.pending_approval),
        "{listed:?}"
    );
    approvals_b
        .decide_approval(api::DecideApprovalRequest {
            id: asked.pending_approval.clone(),
            approve: true,
            ..Default::default()
        })
        .await
        .unwrap();
    let poll = api::IssueTokenRequest {
        approval_id: asked.pending_approval.clone(),
        ..prod.clone()
    };
    let approved = cs.issue('a', poll.clone()).await.unwrap();
    assert!(!approved.access_token.is_empty(), "{approved:?}");
    let retried = cs.issue('b', poll.clone()).await.unwrap();
    assert_eq!(retried.access_token, approved.access_token);
    let second = cs
        .issue(
            'b',
            api::IssueTokenRequest {
                request_id: "approve-another-0123456789".into(),
                ..poll.clone()
            },
        )
        .await
        .unwrap_err();
    assert_eq!(second.code(), Code::PermissionDenied, "{second:?}");
    assert!(second.message().contains("already used"), "{second:?}");

    // A revocation on A is seen by B at once, and one on B by A. Measured: B
    // introspects the token in a loop while A revokes it; every introspection B started
    // after A's revoke returned must say inactive (the bound is A's commit).
    let mut watcher = cs.at('b').identity_api().await;
    let watched = t_b.access_token.clone();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop_w = std::sync::Arc::clone(&stop);
    let watch = tokio::spawn(async move {
        let mut seen = Vec::new();
        while !stop_w.load(std::sync::atomic::Ordering::Relaxed) {
            let started = Instant::now();
            let active = watcher
                .introspect(api::IntrospectRequest {
                    token: watched.clone(),
                })
                .await
                .unwrap()
                .into_inner()
                .active;
            seen.push((started, Instant::now(), active));
        }
        seen
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let revoking = Instant::now();
    cs.revoke('a', api::revoke_request::Target::Jti(t_b.jti.clone()))
        .await;
    let revoked = Instant::now();
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let seen = watch.await.unwrap();
    let late: Vec<_> = seen
        .iter()
        .filter(|(started, _, active)| *started >= revoked && *active)
        .collect();
    assert!(
        late.is_empty(),
        "B still saw the token active after A's revoke returned"
    );
    let first_refusal = seen
        .iter()
        .find(|(_, _, active)| !*active)
        .map(|(_, done, _)| done.saturating_duration_since(revoked));
    eprintln!(
        "revocation: A's revoke took {} ms; B made {} introspections, all {} started after it returned refused; B's first refusal came {:?} after it returned",
        revoked.duration_since(revoking).as_millis(),
        seen.len(),
        seen.iter().filter(|(s, _, _)| *s >= revoked).count(),
        first_refusal
    );
    assert!(!cs.active('b', &t_b.access_token).await);
    cs.revoke('b', api::revoke_request::Target::Jti(t_a.jti.clone()))
        .await;
    assert!(!cs.active('a', &t_a.access_token).await);
    // A deprovisioned agent gets nothing from the other coordinator.
    let green = issuer.attest("agent-2", json!({"team": "blue"}));
    let t_g = cs.issue('b', request(&green)).await.unwrap();
    cs.revoke('a', api::revoke_request::Target::Agent(t_g.subject.clone()))
        .await;
    let refused = cs.issue('b', request(&green)).await.unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
    assert!(refused.message().contains("deprovisioned"), "{refused:?}");

    // One chain, from both coordinators: every sequence number once, each event linked
    // to the one before (verify_chain), and both coordinators' issuances in it.
    let text = stored_chain(&url).await;
    let events = verify_chain(&text);
    eprintln!("stored chain: {events} events");
    for jti in [&t_a.jti, &t_b.jti, &t_g.jti] {
        assert!(
            text.contains(jti.as_str()),
            "token {jti} is not in the chain"
        );
    }
    // The retried request: one signed issuance, then two answers of the same token.
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| l.contains(first.jti.as_str()))
        .collect();
    assert_eq!(lines.len(), 3, "{lines:#?}");
    assert_eq!(
        lines
            .iter()
            .filter(|l| l.contains("an earlier attempt issued"))
            .count(),
        2,
        "{lines:#?}"
    );
    for (k, jti) in &concurrent {
        assert!(
            text.contains(jti.as_str()),
            "token {jti} of coordinator {k} is not in the chain"
        );
    }

    // PostgreSQL restarts under coordinator A: refused as retryable meanwhile.
    let before = text;
    pg.stop();
    let down = cs.issue('a', request(&blue)).await.unwrap_err();
    assert_eq!(down.code(), Code::Unavailable, "{down:?}");
    eprintln!("while PostgreSQL is down: {}", down.message());
    pg.resume();
    let deadline = Instant::now() + Duration::from_secs(60);
    let after = loop {
        match cs.issue('a', request(&blue)).await {
            Ok(t) => break t,
            Err(s) if s.code() == Code::Unavailable && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(s) => panic!("after PostgreSQL restarted: {s:?}"),
        }
    };
    let t_b2 = cs.issue('b', request(&blue)).await.unwrap();
    let text = stored_chain(&url).await;
    let after_events = verify_chain(&text);
    assert!(after_events > events, "{after_events} <= {events}");
    for jti in [&after.jti, &t_b2.jti] {
        assert!(
            text.contains(jti.as_str()),
            "token {jti} is not in the chain"
        );
    }
    // Nothing from before the restart was lost or changed.
    assert!(text.starts_with(&before));

    // A schema newer than this build's is refused, by `migrate` and at start.
    let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    let conn = tokio::spawn(conn);
    client
        .execute("INSERT INTO schema_version (version) VALUES (99)", &[])
        .await
        .unwrap();
    drop(client);
    let _ = conn.await;
    let (ok, said) = migrate(&url);
    assert!(!ok && said.contains("version 99, newer"), "{said}");
    let out = cs
        .cluster
        .coordinator_command_on("127.0.0.1:0", free_port())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("version 99, newer"),
        "{err}"
    );
}
