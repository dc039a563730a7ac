//! Token rules and key versions on real processes: every fragment node enforces the
//! token rules it recorded when the key was created, whatever a (compromised)
//! coordinator asks; rotation adds a new key version that signs from then on.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_lc_rs::signature::{ECDSA_P256_SHA256_FIXED, UnparsedPublicKey};
use quorate_coordinator::store::KeyStore as _;
use quorate_crypto::keys::KeyPublic;
use quorate_crypto::presign::PresignaturePublic;
use quorate_crypto::sign::SignatureShare;
use quorate_crypto::wire::Wire;
use quorate_proto::api;
use quorate_proto::fragment::{self, sign_result::Result as SignOutcome};
use quorate_tests::{TestCluster, sign_batch};

const POOL_FLAGS: &[&str] = &[
    "--pool-low",
    "4",
    "--pool-high",
    "8",
    "--presign-batch",
    "8",
];

const ISSUER: &str = "https://issuer.test";

fn rules() -> api::TokenRules {
    api::TokenRules {
        max_ttl_seconds: 900,
        issuer: ISSUER.into(),
        typ: "at+jwt".into(),
    }
}

async fn create_key(
    c: &TestCluster,
    name: &str,
    purpose: api::Purpose,
    token_rules: Option<api::TokenRules>,
) -> Result<api::KeyInfo, tonic::Status> {
    c.keys()
        .await
        .create_key(api::CreateKeyRequest {
            name: name.into(),
            purpose: purpose as i32,
            token_rules,
            // Unspecified: the profile follows from the purpose and the rules.
            profile: api::KeyProfile::Unspecified as i32,
        })
        .await
        .map(tonic::Response::into_inner)
}

async fn rotate(c: &TestCluster, name: &str) -> Result<api::KeyInfo, tonic::Status> {
    c.keys()
        .await
        .rotate_key(api::RotateKeyRequest { name: name.into() })
        .await
        .map(tonic::Response::into_inner)
}

async fn sign(c: &TestCluster, name: &str, msg: &[u8]) -> Result<api::SignReply, tonic::Status> {
    c.keys()
        .await
        .sign(api::SignRequest {
            name: name.into(),
            input: Some(api::sign_request::Input::Message(msg.to_vec())),
            format: api::SignatureFormat::Raw as i32,
        })
        .await
        .map(tonic::Response::into_inner)
}

fn verify_aws(public_compressed: &[u8], msg: &[u8], sig: &[u8]) -> bool {
    let x = quorate_crypto::Point::from_bytes(public_compressed).unwrap();
    UnparsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, x.to_uncompressed())
        .verify(msg, sig)
        .is_ok()
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
        .try_into()
        .unwrap()
}

/// Unpadded base64url (RFC 4648 §5).
fn b64url(b: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in b.chunks(3) {
        let v = chunk
            .iter()
            .enumerate()
            .fold(0u32, |acc, (i, &x)| acc | u32::from(x) << (16 - 8 * i));
        for i in 0..=chunk.len() {
            out.push(char::from(A[((v >> (18 - 6 * i)) & 63) as usize]));
        }
    }
    out
}

/// A JWS signing input `BASE64URL(header).BASE64URL(payload)`.
fn token(typ: &str, iss: &str, iat: i64, exp: i64) -> Vec<u8> {
    let header = format!(r#"{{"alg":"ES256","typ":"{typ}","kid":"test"}}"#);
    let payload =
        format!(r#"{{"iss":"{iss}","sub":"agent-1","aud":"mcp","iat":{iat},"exp":{exp}}}"#);
    format!(
        "{}.{}",
        b64url(header.as_bytes()),
        b64url(payload.as_bytes())
    )
    .into_bytes()
}

fn digest(input: &[u8]) -> [u8; 32] {
    quorate_crypto::hash::sha256(input)
}

/// Asks node `i` directly, as the coordinator would.
async fn ask(c: &TestCluster, i: u16, b: fragment::SignBatch) -> SignOutcome {
    let reply = c
        .node_as_coordinator(i)
        .await
        .sign(b)
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.results.len(), 1);
    reply.results[0].result.clone().unwrap()
}

fn refused(outcome: SignOutcome, words: &str) {
    match outcome {
        SignOutcome::Refused(why) => assert!(
            why.contains(words),
            "refusal {why:?} does not mention {words:?}"
        ),
        SignOutcome::Share(_) => panic!("the node signed; expected a refusal naming {words:?}"),
    }
}

/// Key profiles and node ceilings against a compromised coordinator (DESIGN.md §9):
/// a token key outside any node's own ceiling is refused at DKG by that node, naming
/// the ceiling; the audit checkpoint key signs neither a raw digest nor an access
/// token, node by node, and no presignature is used by the refusals; a token key cannot
/// be narrowed into a checkpoint key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn profiles_and_ceilings_hold_whatever_the_coordinator_asks() {
    let mut flags = POOL_FLAGS.to_vec();
    flags.extend(["--audit-checkpoint-secs", "1"]);
    let mut c = TestCluster::start("profiles", 3, 1, &flags);

    // Node 3's operator allows tokens of at most 10 minutes.
    let mut ceiling = c.default_ceiling();
    ceiling["max_token_ttl_seconds"] = 600.into();
    std::fs::write(c.ceiling_path(3), ceiling.to_string()).unwrap();
    c.restart_node(3, None);

    let s = create_key(&c, "long", api::Purpose::Sign, Some(rules()))
        .await
        .unwrap_err();
    assert_eq!(s.code(), tonic::Code::PermissionDenied, "{s:?}");
    assert!(
        s.message().contains("node 3")
            && s.message()
                .contains("900 s exceeds this node's ceiling of 600 s"),
        "{s:?}"
    );
    let foreign = api::TokenRules {
        issuer: "https://evil.test".into(),
        max_ttl_seconds: 300,
        ..rules()
    };
    let s = create_key(&c, "foreign", api::Purpose::Sign, Some(foreign))
        .await
        .unwrap_err();
    assert_eq!(s.code(), tonic::Code::PermissionDenied, "{s:?}");
    assert!(
        s.message()
            .contains("issuer \"https://evil.test\" is not among this node's token issuers"),
        "{s:?}"
    );
    let fits = api::TokenRules {
        max_ttl_seconds: 600,
        ..rules()
    };
    let info = create_key(&c, "tokens", api::Purpose::Sign, Some(fits))
        .await
        .unwrap();
    assert_eq!(info.profile, api::KeyProfile::Token as i32);
    let token_key = info.key_id;

    // The coordinator creates its checkpoint key at the first checkpoint.
    c.wait_pools("audit", 1, Duration::from_secs(120)).await;
    // The public API: no raw signature with it.
    let s = sign(&c, "audit", b"anything").await.unwrap_err();
    assert!(s.message().contains("checkpoint profile"), "{s:?}");

    // From here on the test is the coordinator.
    let (named, presigs) = c.presign_as_coordinator("audit", 4).await;
    assert_eq!(
        named.versions[0].profile,
        quorate_proto::profile::KeyProfile::Checkpoint
    );
    let key = named.public;
    let p = presigs.first().expect("no pooled presignature").clone();
    let t0 = now();
    let access = token("at+jwt", &c.issuer(), t0, t0 + 300);
    for j in p.sset.members().iter().map(|m| m.get()) {
        refused(
            ask(&c, j, sign_batch(&key, &p, [7; 32], None)).await,
            "has the checkpoint profile: it signs only JWS statements of its profile",
        );
        refused(
            ask(&c, j, sign_batch(&key, &p, digest(&access), Some(&access))).await,
            "this key signs only audit checkpoints",
        );
    }
    // Neither refusal used the presignature: a checkpoint statement gets its shares.
    let statement = format!(
        "{}.{}",
        b64url(br#"{"alg":"ES256","typ":"quorate-audit-checkpoint+jwt"}"#),
        b64url(
            format!(
                r#"{{"iss":"x","seq":3,"head":"{}","iat":{t0}}}"#,
                "0f".repeat(32)
            )
            .as_bytes()
        )
    )
    .into_bytes();
    for j in p.sset.members().iter().map(|m| m.get()) {
        match ask(
            &c,
            j,
            sign_batch(&key, &p, digest(&statement), Some(&statement)),
        )
        .await
        {
            SignOutcome::Share(_) => {}
            SignOutcome::Refused(why) => panic!("node {j} refused a checkpoint: {why}"),
        }
    }

    // No node narrows a token key into anything else.
    for j in 1..=3u16 {
        let s = c
            .node_as_coordinator(j)
            .await
            .narrow_profile(fragment::NarrowProfileRequest {
                key_id: hex::decode(&token_key).unwrap(),
                profile: fragment::KeyProfile::Checkpoint as i32,
            })
            .await
            .unwrap_err();
        assert_eq!(s.code(), tonic::Code::FailedPrecondition, "{s:?}");
        assert!(s.message().contains("cannot become checkpoint"), "{s:?}");
    }
}

/// A coordinator that asks nodes to sign outside a key's token rules is refused by
/// every node, without using up the presignature; a token within the rules gets shares
/// that combine into a signature an independent verifier accepts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_enforce_token_rules_whatever_the_coordinator_asks() {
    let mut c = TestCluster::start("token-rules", 3, 1, POOL_FLAGS);
    let info = create_key(&c, "tokens", api::Purpose::Sign, Some(rules()))
        .await
        .unwrap();
    assert_eq!(info.token_rules, Some(rules()));
    assert_eq!(info.version, 1);
    assert_eq!(info.kid, info.key_id);

    // Bad rules are refused with the field named.
    for (purpose, r, words) in [
        (api::Purpose::Derive, rules(), "only to token keys"),
        (
            api::Purpose::Sign,
            api::TokenRules {
                max_ttl_seconds: 86_401,
                ..rules()
            },
            "max_ttl_seconds",
        ),
        (
            api::Purpose::Sign,
            api::TokenRules {
                issuer: String::new(),
                ..rules()
            },
            "issuer",
        ),
    ] {
        let s = create_key(&c, "bad", purpose, Some(r)).await.unwrap_err();
        assert_eq!(s.code(), tonic::Code::InvalidArgument, "{s:?}");
        assert!(
            s.message().contains(words),
            "{s:?} does not mention {words}"
        );
    }

    c.wait_pools("tokens", 4, Duration::from_secs(120)).await;
    // The public Sign API does not sign raw messages with a token key.
    let s = sign(&c, "tokens", b"not a token").await.unwrap_err();
    assert_eq!(s.code(), tonic::Code::PermissionDenied, "{s:?}");
    assert!(
        s.message()
            .contains("sign only JWS tokens issued by the identity service"),
        "{s:?}"
    );

    // From here on the test is the coordinator.
    let (named, presigs) = c.presign_as_coordinator("tokens", 4).await;
    assert_eq!(named.versions.len(), 1);
    assert_eq!(
        named.versions[0].profile.token_rules().map(|r| r.to_api()),
        Some(rules())
    );
    let key = named.public;
    let p = presigs.first().expect("no pooled presignature").clone();
    let members: Vec<u16> = p.sset.members().iter().map(|m| m.get()).collect();
    let first = members[0];
    let t0 = now();

    // A day-long token.
    let long = token("at+jwt", ISSUER, t0, t0 + 86_400);
    refused(
        ask(&c, first, sign_batch(&key, &p, digest(&long), Some(&long))).await,
        "exp - iat = 86400 s exceeds this key's maximum token lifetime of 900 s",
    );
    // Another issuer.
    let foreign = token("at+jwt", "https://evil.test", t0, t0 + 300);
    refused(
        ask(
            &c,
            first,
            sign_batch(&key, &p, digest(&foreign), Some(&foreign)),
        )
        .await,
        "iss is \"https://evil.test\"",
    );
    // Another typ.
    let jwt = token("JWT", ISSUER, t0, t0 + 300);
    refused(
        ask(&c, first, sign_batch(&key, &p, digest(&jwt), Some(&jwt))).await,
        "typ is \"JWT\"",
    );
    // A bare digest.
    refused(
        ask(&c, first, sign_batch(&key, &p, [7; 32], None)).await,
        "signs only JWS statements of its profile",
    );
    // A valid token, but the digest is of something else.
    let good = token("at+jwt", ISSUER, t0, t0 + 600);
    refused(
        ask(&c, first, sign_batch(&key, &p, [7; 32], Some(&good))).await,
        "does not hash",
    );

    // None of that used the presignature: the valid token gets a share from every node
    // of the set, and the shares combine into a signature over the signing input.
    let d = digest(&good);
    let mut shares = Vec::new();
    for &j in &members {
        match ask(&c, j, sign_batch(&key, &p, d, Some(&good))).await {
            SignOutcome::Share(b) => shares.push(SignatureShare::from_bytes(&b).unwrap()),
            SignOutcome::Refused(why) => panic!("node {j} refused a valid token: {why}"),
        }
    }
    let mut rng = quorate_crypto::sim::test_rng("token-rules");
    let sig = quorate_crypto::sign::combine(&mut rng, &key, &p, &d, &shares).unwrap();
    assert!(verify_aws(
        &key.public_key().to_bytes(),
        &good,
        &sig.to_raw()
    ));
    // Now it is used: another valid token is refused for this presignature.
    let other = token("at+jwt", ISSUER, t0, t0 + 300);
    refused(
        ask(
            &c,
            first,
            sign_batch(&key, &p, digest(&other), Some(&other)),
        )
        .await,
        "already used",
    );
}

/// Rotation adds version 2 with a new key id (kid); signing uses it from then on; a
/// token key keeps its rules, which every node enforces on the new version too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_adds_a_version_that_signs_from_then_on() {
    let mut c = TestCluster::start("rotation", 3, 1, POOL_FLAGS);
    let v1 = create_key(&c, "plain", api::Purpose::Sign, None)
        .await
        .unwrap();
    assert_eq!((v1.version, v1.token_rules.as_ref()), (1, None));
    c.wait_pools("plain", 4, Duration::from_secs(120)).await;
    let before = sign(&c, "plain", b"before").await.unwrap();
    assert_eq!(before.key_id, v1.key_id);
    assert!(verify_aws(&v1.public_key, b"before", &before.signature));

    let v2 = rotate(&c, "plain").await.unwrap();
    assert_eq!(v2.version, 2);
    assert_ne!(v2.kid, v1.kid);
    assert_eq!(v2.kid, v2.key_id);
    assert_ne!(v2.public_key, v1.public_key);
    let listed = c
        .keys()
        .await
        .list_keys(api::ListKeysRequest {})
        .await
        .unwrap()
        .into_inner();
    let plain = listed.keys.iter().find(|k| k.name == "plain").unwrap();
    assert_eq!((plain.version, &plain.kid), (2, &v2.kid));

    c.wait_pools("plain", 4, Duration::from_secs(120)).await;
    let after = sign(&c, "plain", b"after").await.unwrap();
    assert_eq!(after.key_id, v2.key_id);
    assert!(verify_aws(&v2.public_key, b"after", &after.signature));
    assert!(!verify_aws(&v1.public_key, b"after", &after.signature));

    // Every node holds the new version's share (and still the old one).
    for i in 1..=3u16 {
        let inv = c
            .node_as_coordinator(i)
            .await
            .inventory(fragment::InventoryRequest {})
            .await
            .unwrap()
            .into_inner();
        let held: Vec<String> = inv.keys.iter().map(|k| hex::encode(&k.key_id)).collect();
        assert!(held.contains(&v2.key_id), "node {i} lacks version 2");
        assert!(held.contains(&v1.key_id), "node {i} dropped version 1");
    }

    // Only signing keys rotate; unknown names are not found.
    create_key(&c, "creds", api::Purpose::Derive, None)
        .await
        .unwrap();
    let s = rotate(&c, "creds").await.unwrap_err();
    assert_eq!(s.code(), tonic::Code::FailedPrecondition, "{s:?}");
    assert!(s.message().contains("only signing keys rotate"), "{s:?}");
    let s = rotate(&c, "nope").await.unwrap_err();
    assert_eq!(s.code(), tonic::Code::NotFound, "{s:?}");

    // A token key keeps its rules across rotation, and the nodes enforce them on the
    // new version.
    let t1 = create_key(&c, "tokens", api::Purpose::Sign, Some(rules()))
        .await
        .unwrap();
    let t2 = rotate(&c, "tokens").await.unwrap();
    assert_eq!((t2.version, t2.token_rules.clone()), (2, Some(rules())));
    assert_ne!(t2.kid, t1.kid);
    c.wait_pools("tokens", 4, Duration::from_secs(120)).await;
    let (named, presigs) = c.presign_as_coordinator("tokens", 4).await;
    let versions: Vec<_> = named.versions.iter().map(|v| v.version).collect();
    assert_eq!(versions.len(), 2);
    assert_eq!(versions[0].version, 1);
    assert!(versions[0].retired_at.is_some());
    assert_eq!(versions[1].version, 2);
    assert_eq!(versions[1].retired_at, None);
    assert_eq!(named.public.key_id.to_string(), t2.key_id);
    assert!(
        named
            .versions
            .iter()
            .all(|v| v.profile.token_rules().map(|r| r.to_api()) == Some(rules()))
    );
    // Only the current version has pooled presignatures.
    assert!(!presigs.is_empty());
    let p = &presigs[0];
    let j = p.sset.members()[0].get();
    refused(
        ask(&c, j, sign_batch(&named.public, p, [9; 32], None)).await,
        "signs only JWS statements of its profile",
    );
    let long = token("at+jwt", ISSUER, now(), now() + 3600);
    refused(
        ask(
            &c,
            j,
            sign_batch(&named.public, p, digest(&long), Some(&long)),
        )
        .await,
        "exceeds this key's maximum token lifetime of 900 s",
    );

    // A store written before key versions and token rules existed (names and key data
    // only, as `put_key` writes them) loads: its key is version 1, current, no rules.
    let old = quorate_tests::TempDir::new("legacy-store");
    let store = quorate_coordinator::store::Store::open(&old.0.join("c.redb")).unwrap();
    store.put_key("legacy", &named.public).unwrap();
    let keys = store.keys().unwrap();
    assert_eq!(keys.len(), 1);
    assert_eq!(keys[0].public.key_id, named.public.key_id);
    let v = &keys[0].versions;
    assert_eq!(v.len(), 1);
    assert_eq!((v[0].version.version, v[0].version.retired_at), (1, None));
    assert_eq!(v[0].profile, quorate_proto::profile::KeyProfile::Raw);
}

/// The coordinator's own JWS path, in process against the test cluster's real nodes:
/// `current_signing_key` + `sign_jws` sign a token within the rules; a token outside
/// them is refused at once with the nodes' reason (permission denied) and its
/// presignature goes back to the pool; a stale kid after rotation is `Rotated`; the
/// JWKS set keeps the retired version for its tokens' lifetime only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coordinator_signs_jws_within_the_rules_and_reports_refusals() {
    use quorate_coordinator::cluster::{Cluster, CoordError, KeyProfile, TokenRules};
    use quorate_crypto::params::{PartyIndex, ThresholdParams};
    use quorate_proto::tls::{self, Role};

    // The process coordinator runs too, but this test drives its own `Cluster` (with
    // its own store) over the nodes, as the coordinator's identity.
    let c = TestCluster::start("jws", 3, 1, POOL_FLAGS);
    let dir = quorate_tests::TempDir::new("jws-coordinator");
    let (id, trust) = c.identity("coordinator");
    let cfg = tls::client_config(&id, &trust).unwrap();
    let mut channels = Vec::new();
    for i in 1..=3u16 {
        let addr = c.node_addrs[usize::from(i) - 1];
        let ch = quorate_proto::transport::connect(
            addr,
            &Role::Node(i),
            quorate_tests::DOMAIN,
            cfg.clone(),
        )
        .await
        .unwrap();
        channels.push((PartyIndex::new(i).unwrap(), addr, ch));
    }
    let store = quorate_coordinator::store::Store::open(&dir.0.join("c.redb")).unwrap();
    let cluster = Cluster::new(
        ThresholdParams::new(3, 1).unwrap(),
        trust,
        channels,
        std::sync::Arc::new(store),
        None,
    )
    .unwrap();

    let rules = TokenRules::new(900, ISSUER, "at+jwt").unwrap();
    // (A derive key with token rules cannot even be written down: `KeyProfile`.)
    let v1 = cluster
        .create_key("tokens", KeyProfile::Token(rules.clone()))
        .await
        .unwrap();
    let fill = |key: KeyPublic| {
        let cluster = cluster.clone();
        async move {
            for (mset, sset) in cluster.sets() {
                cluster.presign(&key, &mset, &sset, 4).await.unwrap();
            }
        }
    };
    fill(v1.clone()).await;
    let depth = || -> usize {
        cluster
            .pool_depths()
            .unwrap()
            .iter()
            .map(|(_, _, d)| d)
            .sum()
    };
    assert_eq!(depth(), 12);

    // The caller builds the header with the current kid, then signs.
    let key = cluster.current_signing_key("tokens").unwrap();
    assert_eq!(key.key_id, v1.key_id);
    let t0 = now();
    let good = token("at+jwt", ISSUER, t0, t0 + 600);
    let (sig, signer, _) = cluster
        .sign_jws("tokens", key.key_id, &good, None)
        .await
        .unwrap();
    assert_eq!(signer.key_id, v1.key_id);
    assert!(verify_aws(
        &v1.public_key().to_bytes(),
        &good,
        &sig.to_raw()
    ));
    assert_eq!(depth(), 11);

    // Outside the rules: refused at once, with the reason, presignature kept.
    let long = token("at+jwt", ISSUER, t0, t0 + 86_400);
    let e = cluster
        .sign_jws("tokens", key.key_id, &long, None)
        .await
        .unwrap_err();
    let CoordError::Refused(why) = &e else {
        panic!("expected a rules refusal, got {e:?}");
    };
    assert!(
        why.contains("exp - iat = 86400 s exceeds this key's maximum token lifetime of 900 s"),
        "{why}"
    );
    let status = tonic::Status::from(e);
    assert_eq!(status.code(), tonic::Code::PermissionDenied);
    assert_eq!(depth(), 11, "a refused token used up a presignature");
    // A raw digest: refused by the coordinator before any node is asked.
    let e = cluster.sign("tokens", [1; 32]).await.unwrap_err();
    assert!(matches!(e, CoordError::Refused(_)), "{e:?}");
    assert_eq!(depth(), 11);

    // Rotation: the old kid is stale, the new version signs, the JWKS set keeps the
    // retired version for max_ttl + skew.
    let v2 = cluster.rotate_key("tokens").await.unwrap();
    assert_eq!(v2.version, 2);
    assert_eq!(v2.profile.token_rules(), Some(&rules));
    assert_eq!(depth(), 0, "the retired version's pools are dropped");
    let e = cluster
        .sign_jws("tokens", v1.key_id, &good, None)
        .await
        .unwrap_err();
    assert!(matches!(e, CoordError::Rotated(_)), "{e:?}");
    assert_eq!(tonic::Status::from(e).code(), tonic::Code::Aborted);
    fill(v2.public.clone()).await;
    let key = cluster.current_signing_key("tokens").unwrap();
    assert_eq!(key.key_id, v2.public.key_id);
    let fresh = token("at+jwt", ISSUER, now(), now() + 300);
    let (sig, signer, _) = cluster
        .sign_jws("tokens", key.key_id, &fresh, None)
        .await
        .unwrap();
    assert_eq!(signer.key_id, v2.public.key_id);
    assert!(verify_aws(
        &v2.public.public_key().to_bytes(),
        &fresh,
        &sig.to_raw()
    ));

    let versions = cluster.key_versions("tokens").unwrap();
    assert_eq!(versions.len(), 2);
    let retired = versions[0].retired_at.unwrap();
    let kids = |at: i64| -> Vec<String> {
        cluster
            .jwks_keys(at)
            .unwrap()
            .iter()
            .map(|v| v.kid())
            .collect()
    };
    assert_eq!(kids(retired), vec![v2.kid(), v1.key_id.to_string()]);
    assert_eq!(kids(retired + 959), vec![v2.kid(), v1.key_id.to_string()]);
    assert_eq!(kids(retired + 960), vec![v2.kid()]);
}

/// Agents may get tokens for `Audience::"dev"`; the admin client may do everything.
const EVIDENCE_POLICY: &str = r#"
@id("agents-dev")
permit (principal is Agent, action == Action::"issue_token", resource == Audience::"dev");

@id("delegation-dev")
permit (principal is Agent, action == Action::"exchange_token", resource == Audience::"dev");

@id("admin-client")
permit (principal == Client::"admin", action, resource);
"#;

/// A token signing input for `sub` (also its `client_id`) from this cluster's issuer.
fn agent_token(issuer: &str, sub: &str, t0: i64) -> Vec<u8> {
    token_with(
        issuer,
        t0,
        serde_json::json!({
            "sub": sub, "client_id": sub, "aud": "dev", "scope": "admin",
            "jti": format!("j-{sub}-{t0}"),
        }),
    )
}

/// DESIGN.md §9 "Evidence", as a compromised coordinator would try it against real
/// nodes whose ceilings name a trust configuration: a token with no attestation, with
/// another subject's attestation, with an expired one, with one signed by a key the
/// nodes do not trust, with one from an issuer they do not trust, and with no
/// attestation but an X.509-SVID subject — every node refuses each, and none of it uses
/// the presignature, which then signs the token the attestation does back. Through the
/// coordinator, an attested agent gets its token as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_check_evidence_whatever_the_coordinator_asks() {
    use quorate_tests::{TempDir, TestIssuer};
    let cfg = TempDir::new("evidence-cfg");
    let attester = TestIssuer::new(&cfg.0);
    let stranger_dir = TempDir::new("evidence-stranger");
    // Same `iss`, another key: what a forger who knows the issuer's name would sign with.
    let stranger = TestIssuer::new(&stranger_dir.0);
    let policy_dir = cfg.0.join("policy");
    std::fs::create_dir_all(&policy_dir).unwrap();
    std::fs::write(policy_dir.join("agents.cedar"), EVIDENCE_POLICY).unwrap();
    let pd = policy_dir.display().to_string();
    let tc = cfg.0.join("trust.json").display().to_string();
    let mut flags = POOL_FLAGS.to_vec();
    flags.extend(["--policy-dir", &pd, "--trust-config", &tc]);
    let mut c = TestCluster::start("evidence", 3, 1, &flags);
    for i in 1..=3 {
        let mut ceiling = c.default_ceiling();
        ceiling["trust_config"] = tc.clone().into();
        std::fs::write(c.ceiling_path(i), ceiling.to_string()).unwrap();
        c.restart_node(i, None);
    }
    c.create_token_key("tokens", 900, 4).await;

    // Through the coordinator: every node of the set verified the attestation itself.
    let att = attester.attest("agent-1", serde_json::json!({}));
    let reply = c
        .identity_api()
        .await
        .issue_token(api::IssueTokenRequest {
            attestation: att.clone(),
            audience: "dev".into(),
            scopes: vec!["tools:run".into()],
            ttl_seconds: 300,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let agent = format!("spiffe://{}/agent/test/agent-1", quorate_tests::DOMAIN);
    assert_eq!(reply.subject, agent);
    // Delegation: every node verifies the subject token under its own token key and
    // the actor's attestation, and checks sub, client_id and act.
    let helper = attester.attest("helper-1", serde_json::json!({}));
    let delegated = c
        .identity_api()
        .await
        .exchange_token(api::ExchangeTokenRequest {
            subject_token: reply.access_token.clone(),
            actor_attestation: helper.clone(),
            ttl_seconds: 60,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(delegated.subject, agent);

    // From here on the test is the coordinator.
    let issuer = c.issuer();
    let (named, presigs) = c.presign_as_coordinator("tokens", 4).await;
    let key = named.public;
    let p = presigs.first().expect("no pooled presignature").clone();
    let members: Vec<u16> = p.sset.members().iter().map(|m| m.get()).collect();
    let t0 = now();
    let evidence = |attestation: &str| fragment::TokenEvidence {
        attestation: attestation.into(),
        subject_token: String::new(),
        ..Default::default()
    };
    let with = |input: &[u8], ev: Option<fragment::TokenEvidence>| {
        let mut b = sign_batch(&key, &p, digest(input), Some(input));
        b.evidence = ev.into_iter().collect();
        b
    };
    let mine = agent_token(&issuer, &agent, t0);
    let someone_else = agent_token(
        &issuer,
        &format!("spiffe://{}/agent/test/agent-2", quorate_tests::DOMAIN),
        t0,
    );
    let expired = attester.attest(
        "agent-1",
        serde_json::json!({"iat": t0 - 7200, "nbf": t0 - 7200, "exp": t0 - 3600}),
    );
    let forged = stranger.attest("agent-1", serde_json::json!({}));
    let foreign = attester.sign(&serde_json::json!({
        "iss": "https://elsewhere.test", "sub": "agent-1", "aud": quorate_tests::TEST_AUD,
        "iat": t0, "nbf": t0, "exp": t0 + 600,
    }));
    // Exchange: the subject token the coordinator issued above, the helper as actor.
    let helper_id = format!("spiffe://{}/agent/test/helper-1", quorate_tests::DOMAIN);
    let delegation = |act: serde_json::Value| {
        let header = r#"{"alg":"ES256","typ":"at+jwt","kid":"test"}"#;
        let payload = serde_json::json!({
            "iss": issuer, "sub": agent, "client_id": helper_id, "aud": "dev",
            "scope": "tools:run", "iat": t0, "nbf": t0, "exp": t0 + 60, "jti": "x",
            "act": act,
        });
        format!(
            "{}.{}",
            b64url(header.as_bytes()),
            b64url(payload.to_string().as_bytes())
        )
        .into_bytes()
    };
    let exchange = |subject_token: &str| fragment::TokenEvidence {
        attestation: helper.clone(),
        subject_token: subject_token.into(),
        ..Default::default()
    };
    let (signed, sig) = reply.access_token.rsplit_once('.').unwrap();
    let mut bad_sig = sig.to_owned().into_bytes();
    bad_sig[5] = if bad_sig[5] == b'A' { b'B' } else { b'A' };
    let altered = format!("{signed}.{}", String::from_utf8(bad_sig).unwrap());
    let someone = format!("spiffe://{}/agent/test/someone", quorate_tests::DOMAIN);
    let cases: Vec<(&str, fragment::SignBatch, &str)> = vec![
        (
            "an act naming someone else",
            with(
                &delegation(serde_json::json!({ "sub": someone })),
                Some(exchange(&reply.access_token)),
            ),
            "act must name the actor",
        ),
        (
            "an altered subject token",
            with(
                &delegation(serde_json::json!({ "sub": helper_id })),
                Some(exchange(&altered)),
            ),
            "subject token has a signature that does not verify",
        ),
        ("no evidence", with(&mine, None), "the request carries none"),
        (
            "no attestation",
            with(&mine, Some(evidence(""))),
            "no attestation",
        ),
        (
            "another subject's attestation",
            with(&someone_else, Some(evidence(&att))),
            "the token's sub is",
        ),
        (
            "an expired attestation",
            with(&mine, Some(evidence(&expired))),
            "does not verify on this node",
        ),
        (
            "an attestation signed by an untrusted key",
            with(&mine, Some(evidence(&forged))),
            "does not verify on this node",
        ),
        (
            "an attestation of an untrusted issuer",
            with(&mine, Some(evidence(&foreign))),
            "does not verify on this node",
        ),
    ];
    for (what, b, words) in cases {
        for &j in &members {
            match ask(&c, j, b.clone()).await {
                SignOutcome::Refused(why) => assert!(
                    why.contains("evidence: ") && why.contains(words),
                    "node {j}, {what}: {why:?} does not name {words:?}"
                ),
                SignOutcome::Share(_) => panic!("node {j} signed a token with {what}"),
            }
        }
    }
    // None of that used the presignature: the attested token gets a share from every
    // node of the set, and they combine into a signature over it.
    let d = digest(&mine);
    let mut shares = Vec::new();
    for &j in &members {
        match ask(&c, j, with(&mine, Some(evidence(&att)))).await {
            SignOutcome::Share(b) => shares.push(SignatureShare::from_bytes(&b).unwrap()),
            SignOutcome::Refused(why) => panic!("node {j} refused an attested token: {why}"),
        }
    }
    let mut rng = quorate_crypto::sim::test_rng("evidence");
    let sig = quorate_crypto::sign::combine(&mut rng, &key, &p, &d, &shares).unwrap();
    assert!(verify_aws(
        &key.public_key().to_bytes(),
        &mine,
        &sig.to_raw()
    ));
}

/// A store from before key profiles held the audit checkpoint key as a plain signing
/// key. Here a raw key named `audit` stands for it: once checkpoints run, the coordinator
/// narrows it to the checkpoint profile on every node and in its own store; from then
/// on the nodes refuse raw signatures with it, it is published in the checkpoint JWKS,
/// and the checkpoints it signs verify there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_raw_audit_key_from_before_profiles_becomes_a_checkpoint_key() {
    let mut flags = POOL_FLAGS.to_vec();
    flags.extend(["--audit-checkpoint-secs", "3600"]);
    let mut c = TestCluster::start("audit-migration", 3, 1, &flags);
    let info = create_key(&c, "audit", api::Purpose::Sign, None)
        .await
        .unwrap();
    assert_eq!(info.profile, api::KeyProfile::Raw as i32);
    c.wait_pools("audit", 1, Duration::from_secs(120)).await;
    sign(&c, "audit", b"a raw signature, as before")
        .await
        .unwrap();

    // Restart the coordinator with checkpoints every second.
    if let Some(mut p) = c.coordinator.take() {
        p.terminate();
    }
    let n = c.coordinator_flags.len();
    c.coordinator_flags[n - 1] = "1".into();
    c.start_coordinator();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let keys = c
            .keys()
            .await
            .list_keys(api::ListKeysRequest {})
            .await
            .unwrap()
            .into_inner()
            .keys;
        let audit = keys.iter().find(|k| k.name == "audit").unwrap();
        if audit.profile == api::KeyProfile::Checkpoint as i32 {
            assert_eq!(audit.key_id, info.key_id, "the same key, narrowed");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the audit key was not narrowed: {audit:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let s = sign(&c, "audit", b"no longer").await.unwrap_err();
    assert!(s.message().contains("checkpoint profile"), "{s:?}");

    // The nodes themselves refuse a raw digest with it now, and refuse to widen it back.
    c.wait_pools("audit", 1, Duration::from_secs(120)).await;
    let (named, presigs) = c.presign_as_coordinator("audit", 4).await;
    assert_eq!(
        named.versions[0].profile,
        quorate_proto::profile::KeyProfile::Checkpoint
    );
    let p = presigs.first().expect("no pooled presignature").clone();
    for j in p.sset.members().iter().map(|m| m.get()) {
        refused(
            ask(&c, j, sign_batch(&named.public, &p, [3; 32], None)).await,
            "has the checkpoint profile",
        );
        let s = c
            .node_as_coordinator(j)
            .await
            .narrow_profile(fragment::NarrowProfileRequest {
                key_id: named.public.key_id.0.to_vec(),
                profile: fragment::KeyProfile::Raw as i32,
            })
            .await
            .unwrap_err();
        assert!(s.message().contains("cannot become raw"), "{s:?}");
    }
}

/// The operator-signed policy of the test below: agents may get `tools:run` tokens for
/// `Audience::"dev"` living at most 600 s; `Audience::"prod"` waits for an approver;
/// agents may get their `orders-db` credential; the admin client does everything.
const SIGNED_POLICY: &str = r#"
@id("agents-dev")
@max_ttl_seconds("600")
permit (principal is Agent, action == Action::"issue_token", resource == Audience::"dev")
when { ["tools:run"].containsAll(context.scopes) };

@id("prod-approval")
@approval("required")
permit (principal is Agent, action == Action::"issue_token", resource == Audience::"prod");

@id("credentials")
permit (principal is Agent, action == Action::"request_credential", resource == Target::"orders-db");

@id("admin-client")
permit (principal == Client::"admin", action, resource);
"#;

/// A token signing input with the given claims (`iss`, `iat`, `nbf`, `exp` = iat + 300
/// and `jti` filled in unless given).
fn token_with(issuer: &str, t0: i64, claims: serde_json::Value) -> Vec<u8> {
    let header = r#"{"alg":"ES256","typ":"at+jwt","kid":"test"}"#;
    let mut payload = serde_json::json!({
        "iss": issuer, "iat": t0, "nbf": t0, "exp": t0 + 300, "jti": format!("j-{t0}"),
    });
    for (k, v) in claims.as_object().unwrap() {
        payload[k] = v.clone();
    }
    format!(
        "{}.{}",
        b64url(header.as_bytes()),
        b64url(payload.to_string().as_bytes())
    )
    .into_bytes()
}

/// DESIGN.md §9, the operator-signed policy bundle and signed approvals, as a
/// compromised coordinator (its certificate and store) would try them against real
/// nodes whose ceilings name a trust configuration and the operator's key:
/// - through the coordinator, a dev token and, once an approver signs, a prod token;
///   an unsigned policy set and a tampered bundle are refused by `ApplyPolicy`;
/// - node by node: scopes, an audience and a lifetime the bundle does not allow,
///   evidence naming another bundle, a prod token with no approval, with one signed by
///   a key the bundle does not list, or with one for another request — all refused by
///   every node, and none of it uses the presignature, which then signs the approved
///   token; the approval cannot sign a second token;
/// - a tampered, an unsigned (`alg: none`) and an older bundle are refused by
///   `InstallPolicy` on every node, which keeps its bundle;
/// - a credential derivation for an agent with no evidence or with another agent's
///   attestation is refused by every node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_decide_under_the_signed_policy_whatever_the_coordinator_asks() {
    use quorate_authz::bundle::{self as b, ApprovalStatement, PolicyBundle};
    use quorate_tests::{TempDir, TestIssuer};
    let cfg = TempDir::new("signed-policy-cfg");
    let attester = TestIssuer::new(&cfg.0);
    let operator = p256::ecdsa::SigningKey::from_slice(&[7; 32]).unwrap();
    let approver = p256::ecdsa::SigningKey::from_slice(&[8; 32]).unwrap();
    let stranger = p256::ecdsa::SigningKey::from_slice(&[9; 32]).unwrap();
    let op_pub = cfg.0.join("operator.pub.pem");
    std::fs::write(&op_pub, b::public_key_pem(&b::public_of(&operator))).unwrap();
    let files = vec![("signed.cedar".to_owned(), SIGNED_POLICY.to_owned())];
    let approvers: std::collections::BTreeMap<String, p256::PublicKey> =
        [("alice".to_owned(), b::public_of(&approver))].into();
    let t0 = now();
    let bundle = PolicyBundle::sign(&operator, 10, t0, files.clone(), approvers.clone()).unwrap();
    let bundle_file = cfg.0.join("bundle.jws");
    std::fs::write(&bundle_file, bundle.jws()).unwrap();
    let tc = cfg.0.join("trust.json").display().to_string();
    let (opk, bf) = (
        op_pub.display().to_string(),
        bundle_file.display().to_string(),
    );
    let mut flags = POOL_FLAGS.to_vec();
    flags.extend([
        "--trust-config",
        &tc,
        "--operator-public-key",
        &opk,
        "--policy-bundle",
        &bf,
    ]);
    let mut c = TestCluster::start("signed-policy", 3, 1, &flags);
    for i in 1..=3 {
        let mut ceiling = c.default_ceiling();
        ceiling["trust_config"] = tc.clone().into();
        ceiling["operator_public_key_file"] = opk.clone().into();
        std::fs::write(c.ceiling_path(i), ceiling.to_string()).unwrap();
        c.restart_node(i, None);
    }
    c.create_token_key("tokens", 900, 4).await;
    create_key(&c, "credentials", api::Purpose::Derive, None)
        .await
        .unwrap();

    // Through the coordinator: a dev token, decided again by every node of the set.
    let att = attester.attest("agent-1", serde_json::json!({}));
    let agent = format!("spiffe://{}/agent/test/agent-1", quorate_tests::DOMAIN);
    let ask_token = |audience: &str, approval_id: &str| api::IssueTokenRequest {
        attestation: att.clone(),
        audience: audience.into(),
        scopes: vec!["tools:run".into()],
        ttl_seconds: 300,
        approval_id: approval_id.into(),
        ..Default::default()
    };
    let dev = c
        .identity_api()
        .await
        .issue_token(ask_token("dev", ""))
        .await;
    assert_eq!(dev.unwrap().into_inner().subject, agent);
    // A prod token waits for an approver; the admin's bare "approve" is not enough
    // under a signed bundle, a statement signed by alice is.
    let pending = c
        .identity_api()
        .await
        .issue_token(ask_token("prod", ""))
        .await
        .unwrap()
        .into_inner();
    assert!(pending.access_token.is_empty());
    let apr = pending.pending_approval.clone();
    let mut approvals =
        api::approval_service_client::ApprovalServiceClient::new(c.api_channel().await);
    let decide = |statement: String| api::DecideApprovalRequest {
        id: apr.clone(),
        approve: true,
        reason: String::new(),
        statement,
    };
    let e = approvals
        .decide_approval(decide(String::new()))
        .await
        .unwrap_err();
    assert!(
        e.message().contains("signed by one of its approvers"),
        "{e:?}"
    );
    let statement = ApprovalStatement {
        approval_id: apr.clone(),
        approver: "alice".into(),
        sub: agent.clone(),
        action: "issue_token".into(),
        resource: "Audience::\"prod\"".into(),
        scopes: vec!["tools:run".into()],
        ttl_seconds: 300,
        task_id: None,
        context: Default::default(),
        jkt: None,
        iat: t0,
        exp: t0 + 600,
    };
    let e = approvals
        .decide_approval(decide(statement.sign(&stranger)))
        .await
        .unwrap_err();
    assert!(e.message().contains("does not verify"), "{e:?}");
    approvals
        .decide_approval(decide(statement.sign(&approver)))
        .await
        .unwrap();
    let prod = c
        .identity_api()
        .await
        .issue_token(ask_token("prod", &apr))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(prod.subject, agent);
    // ApplyPolicy: an unsigned set, and a bundle whose payload was swapped.
    let unsigned = c
        .identity_api()
        .await
        .apply_policy(api::ApplyPolicyRequest {
            files: vec![api::PolicyFile {
                name: "all.cedar".into(),
                text: "permit (principal, action, resource);".into(),
            }],
            bundle: String::new(),
        })
        .await
        .unwrap_err();
    assert!(
        unsigned.message().contains("operator-signed"),
        "{unsigned:?}"
    );
    let permissive = PolicyBundle::sign(
        &stranger,
        11,
        t0,
        vec![(
            "all.cedar".to_owned(),
            "permit (principal, action, resource);".to_owned(),
        )],
        Default::default(),
    )
    .unwrap();
    let (h, _) = bundle.jws().split_once('.').unwrap();
    let (_, rest) = permissive.jws().split_once('.').unwrap();
    let tampered = format!("{h}.{rest}");
    let e = c
        .identity_api()
        .await
        .apply_policy(api::ApplyPolicyRequest {
            files: Vec::new(),
            bundle: tampered.clone(),
        })
        .await
        .unwrap_err();
    assert!(e.message().contains("does not verify"), "{e:?}");

    // From here on the test is the coordinator.
    let issuer = c.issuer();
    let (named, presigs) = c.presign_as_coordinator("tokens", 4).await;
    let key = named.public;
    let p = presigs.first().expect("no pooled presignature").clone();
    let p2 = presigs.get(1).expect("a second presignature").clone();
    let members: Vec<u16> = p.sset.members().iter().map(|m| m.get()).collect();
    let t0 = now();
    let ev = |ttl: u32, approval: &str| fragment::TokenEvidence {
        attestation: att.clone(),
        policy_bundle: bundle.id().to_owned(),
        ttl_seconds: ttl,
        approval: approval.to_owned(),
        ..Default::default()
    };
    let on = |p: &PresignaturePublic, input: &[u8], e: fragment::TokenEvidence| {
        let mut batch = sign_batch(&key, p, digest(input), Some(input));
        batch.evidence = vec![e];
        batch
    };
    let claims = |aud: &str, scope: &str, jti: &str| {
        token_with(
            &issuer,
            t0,
            serde_json::json!({"sub": agent, "client_id": agent, "aud": aud, "scope": scope, "jti": jti}),
        )
    };
    let approved = claims("prod", "tools:run", "j-prod");
    // The approval the coordinator used above is spent on these nodes; the coordinator
    // (or anyone with its certificate) cannot have it sign another token.
    let spent = statement.sign(&approver);
    let direct = ApprovalStatement {
        approval_id: "apr-direct".into(),
        ..statement.clone()
    };
    let other_request = ApprovalStatement {
        scopes: vec!["tools:run".into(), "admin".into()],
        ..direct.clone()
    };
    let cases: Vec<(&str, fragment::SignBatch, &str)> = vec![
        (
            "a scope the bundle does not allow",
            on(&p, &claims("dev", "tools:run admin", "j1"), ev(300, "")),
            "no policy permits",
        ),
        (
            "an audience the bundle does not allow",
            on(&p, &claims("elsewhere", "tools:run", "j2"), ev(300, "")),
            "no policy permits",
        ),
        (
            "a lifetime over the bundle's cap",
            on(
                &p,
                &token_with(
                    &issuer,
                    t0,
                    serde_json::json!({"sub": agent, "client_id": agent, "aud": "dev", "scope": "tools:run", "exp": t0 + 700}),
                ),
                ev(700, ""),
            ),
            "exceeds the 600 s cap",
        ),
        (
            "a token longer than the lifetime policy saw",
            on(&p, &claims("dev", "tools:run", "j3"), ev(100, "")),
            "longer than the 100 s",
        ),
        (
            "evidence naming another bundle",
            on(
                &p,
                &claims("dev", "tools:run", "j4"),
                fragment::TokenEvidence {
                    policy_bundle: "9-0000000000000000".into(),
                    ..ev(300, "")
                },
            ),
            "this node holds policy bundle",
        ),
        (
            "a prod token with no approval",
            on(&p, &approved, ev(300, "")),
            "carries no signed approval",
        ),
        (
            "a prod token with an approval by a key the bundle does not list",
            on(&p, &approved, ev(300, &statement.sign(&stranger))),
            "does not verify",
        ),
        (
            "a prod token with an approval for another request",
            on(&p, &approved, ev(300, &other_request.sign(&approver))),
            "another request (mismatch in scopes)",
        ),
    ];
    for (what, batch, words) in cases {
        for &j in &members {
            match ask(&c, j, batch.clone()).await {
                SignOutcome::Refused(why) => assert!(
                    why.contains("policy") && why.contains(words),
                    "node {j}, {what}: {why:?} does not name {words:?}"
                ),
                SignOutcome::Share(_) => panic!("node {j} signed {what}"),
            }
        }
    }
    // The spent approval: any two signing sets share a node, and every node that signed
    // the coordinator's prod token refuses it for another, so no set can sign with it.
    let mut refusals = 0;
    for &j in &members {
        if let SignOutcome::Refused(why) = ask(&c, j, on(&p, &approved, ev(300, &spent))).await {
            assert!(
                why.contains("already used for another token"),
                "node {j}: {why}"
            );
            refusals += 1;
        }
    }
    assert!(
        refusals >= 1,
        "no node of {members:?} remembered the spent approval"
    );
    // Bundles a compromised coordinator might install: tampered, unsigned, older.
    let none = format!(
        "{}.{}.",
        b64url(br#"{"alg":"none","typ":"quorate-policy-bundle+jwt","kid":"x"}"#),
        rest.split_once('.').unwrap().0
    );
    let older = PolicyBundle::sign(&operator, 9, t0, files, approvers).unwrap();
    for (what, jws, words) in [
        ("tampered", tampered.as_str(), "does not verify"),
        ("unsigned", none.as_str(), "ES256"),
        ("older", older.jws(), "rollback"),
    ] {
        for j in 1..=3 {
            let e = c
                .node_as_coordinator(j)
                .await
                .install_policy(fragment::PolicyBundle { jws: jws.into() })
                .await
                .unwrap_err();
            assert!(
                e.message().contains(words),
                "node {j}, {what} bundle: {e:?} does not name {words:?}"
            );
        }
    }
    // None of that used the presignature or moved the nodes off the bundle: the
    // approved token gets a share from every node of the set.
    let good = direct.sign(&approver);
    let d = digest(&approved);
    let mut shares = Vec::new();
    for &j in &members {
        match ask(&c, j, on(&p, &approved, ev(300, &good))).await {
            SignOutcome::Share(b) => shares.push(SignatureShare::from_bytes(&b).unwrap()),
            SignOutcome::Refused(why) => panic!("node {j} refused the approved token: {why}"),
        }
    }
    let mut rng = quorate_crypto::sim::test_rng("signed-policy");
    let sig = quorate_crypto::sign::combine(&mut rng, &key, &p, &d, &shares).unwrap();
    assert!(verify_aws(
        &key.public_key().to_bytes(),
        &approved,
        &sig.to_raw()
    ));
    // The approval signed one token: another (another jti) is refused.
    let second = claims("prod", "tools:run", "j-prod-2");
    for &j in &members {
        if p2.sset.members().iter().any(|m| m.get() == j) {
            refused(
                ask(&c, j, on(&p2, &second, ev(300, &good))).await,
                "already used for another token",
            );
        }
    }

    // A credential for agent-1's task, derived by a coordinator for its own key.
    let cred_key = quorate_coordinator::store::Store::open(
        &c.dir.0.join("coordinator").join("coordinator.redb"),
    )
    .unwrap()
    .keys()
    .unwrap()
    .into_iter()
    .find(|k| k.name == "credentials")
    .unwrap()
    .public;
    let context = quorate_authz::credential::CredentialContext {
        key_name: "credentials".into(),
        key_id: cred_key.key_id.to_string(),
        target: "orders-db".into(),
        agent: agent.clone(),
        task_id: "task-x".into(),
        not_before: t0,
        not_after: t0 + 600,
    }
    .encode();
    let dh = |evidence: Option<fragment::CredentialEvidence>| fragment::DhCall {
        request: quorate_crypto::tdh::DhRequest {
            key_id: cred_key.key_id,
            input: quorate_crypto::tdh::DhInput::Derive {
                context: context.clone(),
            },
            requester: quorate_crypto::Point::GENERATOR,
        }
        .to_bytes(),
        evidence,
    };
    let other = attester.attest("agent-2", serde_json::json!({}));
    for (what, call, words) in [
        ("no evidence", dh(None), "carries no evidence"),
        (
            "another agent's attestation",
            dh(Some(fragment::CredentialEvidence {
                attestation: other,
                policy_bundle: bundle.id().to_owned(),
                ..Default::default()
            })),
            "attestation is spiffe://",
        ),
        (
            "a target the bundle does not allow",
            dh(Some(fragment::CredentialEvidence {
                attestation: att.clone(),
                policy_bundle: bundle.id().to_owned(),
                ..Default::default()
            })),
            "",
        ),
    ] {
        if words.is_empty() {
            // orders-db is allowed: the node answers.
            for j in 1..=3 {
                c.node_as_coordinator(j)
                    .await
                    .threshold_dh(call.clone())
                    .await
                    .unwrap();
            }
            continue;
        }
        for j in 1..=3 {
            let e = c
                .node_as_coordinator(j)
                .await
                .threshold_dh(call.clone())
                .await
                .unwrap_err();
            assert_eq!(e.code(), tonic::Code::PermissionDenied, "node {j}, {what}");
            assert!(e.message().contains(words), "node {j}, {what}: {e:?}");
        }
    }
}
