//! JWT-SVIDs and registered clients' `private_key_jwt` assertions end to end (DESIGN.md
//! §7, §9), against real node and coordinator processes whose trust configuration — the
//! coordinator's `--trust-config` and every node's ceiling `trust_config` — names a
//! SPIFFE trust domain with a JWT bundle and a registered client: the cluster issues
//! threshold-signed tokens over gRPC to a JWT-SVID agent (`sub` = its SPIFFE ID) and to
//! a client, every node verifying the JWT itself; a JWT-SVID signed by a key outside the
//! bundle, a replayed client assertion and, node by node, evidence the node cannot
//! verify are refused.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::path::Path;
use std::sync::Arc;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use quorate_proto::api;
use quorate_proto::fragment::{self, sign_result::Result as SignOutcome};
use quorate_proto::https;
use quorate_tests::{DOMAIN, POOL_FLAGS, TempDir, TestCluster, sign_batch};
use serde_json::{Value, json};
use tonic::Code;

/// The agents' trust domain.
const TRUST_DOMAIN: &str = "workloads.test";
/// The JWT-SVID agent.
const WORKLOAD: &str = "spiffe://workloads.test/ns/agents/sa/summariser";
/// The audience JWT-SVIDs for the cluster carry.
const SVID_AUD: &str = "quorate";
/// The registered client.
const CLIENT: &str = "billing-bot";

/// JWT-SVID agents of the trust domain get `svids` tokens; the registered client gets
/// `billing` tokens; neither gets the other's (policy tells the methods apart).
const POLICY: &str = r#"
@id("workload-svids")
permit (principal is Agent, action == Action::"issue_token", resource == Audience::"svids")
when { principal.method == "jwt-svid" && principal.issuer == "spiffe://workloads.test" };

@id("billing-client")
permit (principal is Agent, action == Action::"issue_token", resource == Audience::"billing")
when { principal.method == "private-key-jwt" && principal.external_subject == "billing-bot" };

@id("admin-client")
permit (principal == Client::"admin", action, resource);
"#;

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        .try_into()
        .unwrap()
}

/// An ES256 signing key with its public JWK (kid `kid`, `use` as given).
struct SigningKey {
    kid: String,
    der: Vec<u8>,
    jwk: Value,
}

impl SigningKey {
    fn new(kid: &str, use_: &str) -> Self {
        let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let raw = pair.public_key_raw();
        SigningKey {
            kid: kid.to_owned(),
            der: pair.serialize_der(),
            jwk: json!({
                "kty": "EC", "crv": "P-256", "use": use_, "kid": kid,
                "x": URL_SAFE_NO_PAD.encode(&raw[1..33]), "y": URL_SAFE_NO_PAD.encode(&raw[33..65]),
            }),
        }
    }

    fn sign(&self, claims: &Value) -> String {
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some(self.kid.clone());
        jsonwebtoken::encode(&header, claims, &EncodingKey::from_ec_der(&self.der)).unwrap()
    }
}

/// Writes the SPIFFE bundle, the client's JWKS and `trust.json` into `dir`.
fn write_trust(dir: &Path, authority: &SigningKey, client: &SigningKey) {
    let bundle =
        json!({ "spiffe_sequence": 1, "spiffe_refresh_hint": 300, "keys": [authority.jwk] });
    std::fs::write(dir.join("bundle.json"), bundle.to_string()).unwrap();
    let jwks = json!({ "keys": [client.jwk] });
    std::fs::write(dir.join("billing-bot.jwks.json"), jwks.to_string()).unwrap();
    let trust = json!({
        "svid": [ { "trust_domain": TRUST_DOMAIN, "jwt_bundle_file": "bundle.json",
                    "audiences": [SVID_AUD], "algorithms": ["ES256"] } ],
        "clients": [ { "client_id": CLIENT, "jwks_file": "billing-bot.jwks.json",
                       "algorithms": ["ES256"] } ],
    });
    std::fs::write(dir.join("trust.json"), trust.to_string()).unwrap();
}

fn svid_claims(sub: &str) -> Value {
    let now = now();
    json!({ "sub": sub, "aud": SVID_AUD, "iat": now, "exp": now + 300 })
}

/// A client assertion to `aud` with `jti`, valid for 120 s.
fn assertion_claims(aud: &str, jti: &str) -> Value {
    let now = now();
    json!({ "iss": CLIENT, "sub": CLIENT, "aud": aud, "iat": now, "exp": now + 120,
            "jti": jti })
}

fn request(attestation: &str, audience: &str) -> api::IssueTokenRequest {
    api::IssueTokenRequest {
        attestation: attestation.into(),
        audience: audience.into(),
        scopes: vec!["read".into()],
        ttl_seconds: 300,
        ..Default::default()
    }
}

async fn issue(
    c: &TestCluster,
    req: api::IssueTokenRequest,
) -> Result<api::IssueTokenReply, tonic::Status> {
    c.identity_api()
        .await
        .issue_token(req)
        .await
        .map(tonic::Response::into_inner)
}

fn unauthenticated(r: Result<api::IssueTokenReply, tonic::Status>, words: &str) {
    let s = r.expect_err("the request must be refused");
    assert_eq!(s.code(), Code::Unauthenticated, "{s:?}");
    assert!(
        s.message().contains(words),
        "`{}` does not mention {words:?}",
        s.message()
    );
}

/// Verifies an access token of the cluster with jsonwebtoken against the JWKS found by
/// OIDC discovery over HTTPS; returns its claims.
async fn verify_access_token(c: &TestCluster, token: &str, aud: &str) -> Value {
    let (_, trust) = c.identity("client-admin");
    let mut roots = rustls::RootCertStore::empty();
    roots.add(trust.ca_der().clone()).unwrap();
    let tls = https::public_client_config(roots).unwrap();
    let meta = https::get(
        &format!("{}/.well-known/openid-configuration", c.issuer()),
        Arc::clone(&tls),
    )
    .await
    .unwrap();
    let meta: Value = serde_json::from_slice(&meta.body).unwrap();
    let jwks = https::get(meta["jwks_uri"].as_str().unwrap(), tls)
        .await
        .unwrap();
    let jwks: jsonwebtoken::jwk::JwkSet = serde_json::from_slice(&jwks.body).unwrap();
    let kid = jsonwebtoken::decode_header(token).unwrap().kid.unwrap();
    let key = DecodingKey::from_jwk(jwks.find(&kid).unwrap()).unwrap();
    let mut v = Validation::new(Algorithm::ES256);
    v.set_audience(&[aud]);
    v.set_issuer(&[c.issuer()]);
    jsonwebtoken::decode::<Value>(token, &key, &v)
        .unwrap()
        .claims
}

/// A token signing input of this cluster's issuer for `sub` (also its `client_id`).
fn token_input(issuer: &str, sub: &str, aud: &str) -> Vec<u8> {
    let t0 = now();
    let header = r#"{"alg":"ES256","typ":"at+jwt","kid":"test"}"#;
    let payload = json!({
        "iss": issuer, "sub": sub, "client_id": sub, "aud": aud, "scope": "read",
        "iat": t0, "nbf": t0, "exp": t0 + 300, "jti": format!("j-{t0}"),
    });
    format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header),
        URL_SAFE_NO_PAD.encode(payload.to_string())
    )
    .into_bytes()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwt_svids_and_client_assertions_get_tokens() {
    let cfg = TempDir::new("jwt-svid-cfg");
    let authority = SigningKey::new("authority-1", "jwt-svid");
    let client = SigningKey::new("billing-1", "sig");
    // Same kid as the authority, another key: what a forger who knows the bundle signs with.
    let stranger = SigningKey::new("authority-1", "jwt-svid");
    write_trust(&cfg.0, &authority, &client);
    let policy_dir = cfg.0.join("policy");
    std::fs::create_dir_all(&policy_dir).unwrap();
    std::fs::write(policy_dir.join("agents.cedar"), POLICY).unwrap();
    let (pd, tc) = (
        policy_dir.display().to_string(),
        cfg.0.join("trust.json").display().to_string(),
    );
    let mut flags = POOL_FLAGS.to_vec();
    flags.extend(["--policy-dir", &pd, "--trust-config", &tc]);
    let mut c = TestCluster::start("jwt-svid", 3, 1, &flags);
    // Every node verifies the evidence of every token itself, against the same file.
    for i in 1..=3 {
        let mut ceiling = c.default_ceiling();
        ceiling["trust_config"] = tc.clone().into();
        std::fs::write(c.ceiling_path(i), ceiling.to_string()).unwrap();
        c.restart_node(i, None);
    }
    c.create_token_key("tokens", 900, 4).await;

    // A JWT-SVID agent: the token's sub and client_id are its SPIFFE ID.
    let svid = authority.sign(&svid_claims(WORKLOAD));
    let reply = issue(&c, request(&svid, "svids")).await.unwrap();
    assert_eq!(reply.subject, WORKLOAD);
    assert_eq!(reply.policy_ids, ["workload-svids"]);
    let claims = verify_access_token(&c, &reply.access_token, "svids").await;
    assert_eq!(claims["sub"], WORKLOAD);
    assert_eq!(claims["client_id"], WORKLOAD);
    assert_eq!(claims["attestation"]["iss"], "spiffe://workloads.test");
    assert_eq!(claims["attestation"]["method"], "jwt-svid");
    // Policy tells it from a client: no billing token for a workload.
    let denied = issue(&c, request(&svid, "billing")).await.unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied, "{denied:?}");

    // A registered client, with an assertion to the coordinator's token endpoint.
    let client_subject = format!("spiffe://{DOMAIN}/client/{CLIENT}");
    let token_endpoint = format!("{}/token", c.issuer());
    let assertion = client.sign(&assertion_claims(&token_endpoint, "a-1"));
    let reply = issue(&c, request(&assertion, "billing")).await.unwrap();
    assert_eq!(reply.subject, client_subject);
    assert_eq!(reply.policy_ids, ["billing-client"]);
    let claims = verify_access_token(&c, &reply.access_token, "billing").await;
    assert_eq!(claims["sub"], client_subject);
    assert_eq!(claims["client_id"], client_subject);
    assert_eq!(claims["attestation"]["iss"], CLIENT);
    assert_eq!(claims["attestation"]["method"], "private-key-jwt");
    // One request per assertion; a new one (new jti), to the issuer itself, is fine.
    unauthenticated(
        issue(&c, request(&assertion, "billing")).await,
        "jti `a-1` of client `billing-bot` was already used",
    );
    let again = client.sign(&assertion_claims(&c.issuer(), "a-2"));
    issue(&c, request(&again, "billing")).await.unwrap();

    // Refused by the coordinator, naming why.
    let forged = stranger.sign(&svid_claims(WORKLOAD));
    unauthenticated(
        issue(&c, request(&forged, "svids")).await,
        "signature does not verify",
    );
    let elsewhere = authority.sign(&svid_claims("spiffe://elsewhere.test/a"));
    unauthenticated(
        issue(&c, request(&elsewhere, "svids")).await,
        "trust domain `elsewhere.test`",
    );
    let long = {
        let mut claims = assertion_claims(&token_endpoint, "a-3");
        claims["exp"] = json!(claims["iat"].as_i64().unwrap() + 3600);
        client.sign(&claims)
    };
    unauthenticated(
        issue(&c, request(&long, "billing")).await,
        "client assertion lifetime 3600 s exceeds 300 s",
    );

    // Node by node, as the coordinator: each node of the set verifies the JWT itself.
    let issuer = c.issuer();
    let (named, presigs) = c.presign_as_coordinator("tokens", 4).await;
    let [first, second, ..] = presigs.as_slice() else {
        panic!("fewer than two pooled presignatures")
    };
    let ask = |p: &quorate_crypto::presign::PresignaturePublic, input: &[u8], attestation: &str| {
        let mut batch = sign_batch(
            &named.public,
            p,
            quorate_crypto::hash::sha256(input),
            Some(input),
        );
        batch.evidence = vec![fragment::TokenEvidence {
            attestation: attestation.into(),
            ..Default::default()
        }];
        let members: Vec<u16> = p.sset.members().iter().map(|m| m.get()).collect();
        (members, batch)
    };
    let for_workload = token_input(&issuer, WORKLOAD, "svids");
    let for_client = token_input(&issuer, &client_subject, "billing");
    // To an audience that is no token service of these nodes.
    let misaddressed = client.sign(&assertion_claims("https://elsewhere.test/token", "a-4"));
    let cases = [
        (
            "a forged JWT-SVID",
            ask(first, &for_workload, &forged),
            "signature does not verify",
        ),
        (
            "a misaddressed client assertion",
            ask(first, &for_client, &misaddressed),
            "client assertion audience is not accepted",
        ),
    ];
    for (what, (members, batch), words) in cases {
        for &j in &members {
            let reply = c
                .node_as_coordinator(j)
                .await
                .sign(batch.clone())
                .await
                .unwrap();
            match reply.into_inner().results[0].result.clone().unwrap() {
                SignOutcome::Refused(why) => assert!(
                    why.contains("does not verify on this node") && why.contains(words),
                    "node {j}, {what}: {why:?} does not name {words:?}"
                ),
                SignOutcome::Share(_) => panic!("node {j} signed a token with {what}"),
            }
        }
    }
    // The refusals used no presignature. The genuine JWT-SVID gets a share from every
    // node of its set, and so does a client assertion the coordinator has already
    // accepted once (one-time use is the coordinator's check, not the nodes').
    for (what, (members, batch)) in [
        ("the JWT-SVID", ask(first, &for_workload, &svid)),
        ("the client assertion", ask(second, &for_client, &again)),
    ] {
        for &j in &members {
            let reply = c
                .node_as_coordinator(j)
                .await
                .sign(batch.clone())
                .await
                .unwrap();
            match reply.into_inner().results[0].result.clone().unwrap() {
                SignOutcome::Share(_) => {}
                SignOutcome::Refused(why) => panic!("node {j} refused {what}: {why}"),
            }
        }
    }
}
