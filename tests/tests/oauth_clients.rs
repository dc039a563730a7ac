//! The token endpoint and the metadata listener (DESIGN.md §6, §7) against OAuth clients
//! Quorate did not write, run as child processes the way their users run them:
//!
//! - Node: `openid-client` (discovery, the jwt-bearer grant with a library-made DPoP key,
//!   token exchange) and `jose` (discovery, a remote JWKS, `jwtVerify`);
//! - Python: Authlib's `OAuth2Session` with `PrivateKeyJWT` client authentication.
//!
//! The scripts and their pinned versions are in `tests/oauth-clients/`; `.ci/run` installs
//! them (`npm ci` there, and a virtualenv at `target/oauth-venv`). Each script prints one
//! JSON line; the tests assert on it and then check the results again on the Rust side:
//! signatures against the JWKS, claims, and RFC 7662 introspection over hybrid TLS.
//!
//! Debian's Node 20 and Python 3.11 link OpenSSL 3.0, which cannot negotiate
//! X25519MLKEM768. The clusters that issue tokens to them therefore run with
//! `--allow-classic-token-endpoints`, and one test shows what happens without it.
//!
//! Where the clients are missing, the tests fail if `CI` is set and skip (saying so)
//! otherwise.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use quorate_proto::{https, tls};
use quorate_tests::{DOMAIN, TempDir, TestCluster, TestIssuer};
use serde_json::{Value, json};
use sha2::Digest as _;

/// The resource server the tokens are for: an absolute URI, as RFC 8707 §2 asks of
/// `resource`.
const AUDIENCE: &str = "https://tools.quorate.test";

/// Blue-team agents get tokens for [`AUDIENCE`]; a sub-agent may act for one. The admin
/// client (the test itself) manages keys.
const AGENT_POLICY: &str = r#"
@id("admin-client")
permit (principal == Client::"admin", action, resource);

@id("blue-team-tools")
@max_ttl_seconds("600")
permit (principal is Agent, action == Action::"issue_token", resource == Audience::"https://tools.quorate.test")
when { principal.hasTag("team") && principal.getTag("team") == "blue" };

@id("delegate-tools")
permit (principal is Agent, action == Action::"exchange_token", resource == Audience::"https://tools.quorate.test")
when { context has on_behalf_of };
"#;

/// Any principal — the registered OAuth client among them — gets tokens for [`AUDIENCE`].
/// The admin client (the test itself) manages keys.
const CLIENT_POLICY: &str = r#"
@id("admin-client")
permit (principal == Client::"admin", action, resource);

@id("tools-for-all")
@max_ttl_seconds("600")
permit (principal, action == Action::"issue_token", resource == Audience::"https://tools.quorate.test");
"#;

/// Why the clusters serving these clients accept classic key exchange on the token
/// endpoint.
const CLASSIC_NOTE: &str = "these clients force classic key exchange: Node 20 and Python 3.11 \
     link OpenSSL 3.0, which cannot negotiate X25519MLKEM768, so the cluster runs with \
     --allow-classic-token-endpoints";

/// How long a client script may take (discovery, a grant or two, verification).
const SCRIPT_LIMIT: Duration = Duration::from_secs(90);

/// The workspace root.
fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// `None` (after saying why) where clients are missing outside CI; a failure in CI.
fn unavailable<T>(what: String) -> Option<T> {
    if std::env::var_os("CI").is_some_and(|v| !v.is_empty()) {
        panic!(
            "{what}. CI is set, so this is a failure: .ci/run installs the clients before `cargo test`"
        );
    }
    eprintln!(
        "SKIPPED: {what}. Install them with `npm ci --prefix tests/oauth-clients` and \
         `python3 -m venv target/oauth-venv && target/oauth-venv/bin/pip install -r \
         tests/oauth-clients/requirements.txt` (as .ci/run does)"
    );
    None
}

/// The Node clients' directory, if `node` runs and `npm ci` installed the packages.
fn node_clients() -> Option<PathBuf> {
    let dir = workspace().join("tests/oauth-clients");
    let node = std::process::Command::new("node")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !node {
        return unavailable("`node` is not on PATH".into());
    }
    for package in ["openid-client", "jose"] {
        let manifest = dir.join("node_modules").join(package).join("package.json");
        if !manifest.is_file() {
            return unavailable(format!("{} is missing", manifest.display()));
        }
    }
    Some(dir)
}

/// The virtualenv's Python, if Authlib is installed there.
fn python_client() -> Option<PathBuf> {
    let python = workspace().join("target/oauth-venv/bin/python");
    let installed = std::process::Command::new(&python)
        .args(["-c", "import authlib, requests"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !installed {
        return unavailable(format!(
            "{} with authlib and requests is missing",
            python.display()
        ));
    }
    Some(python)
}

/// A client script with its arguments, trusting `ca`, and nothing from the environment
/// that would loosen or replace that trust.
fn script(program: &Path, script: &Path, ca: &Path) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(program);
    cmd.arg(script)
        .env("NODE_EXTRA_CA_CERTS", ca)
        .env_remove("NODE_TLS_REJECT_UNAUTHORIZED")
        .env_remove("NODE_OPTIONS")
        .env_remove("REQUESTS_CA_BUNDLE")
        .env_remove("CURL_CA_BUNDLE")
        .env_remove("SSL_CERT_FILE")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    if let Some(dir) = script.parent() {
        cmd.current_dir(dir);
    }
    cmd
}

/// Runs a client script to its end and returns its JSON line; fails the test if it
/// exits non-zero, takes longer than [`SCRIPT_LIMIT`] or prints no JSON.
async fn run(label: &str, mut cmd: tokio::process::Command) -> Value {
    let out = tokio::time::timeout(SCRIPT_LIMIT, cmd.output())
        .await
        .unwrap_or_else(|_| panic!("{label} did not finish within {SCRIPT_LIMIT:?}"))
        .unwrap_or_else(|e| panic!("{label} did not start: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    for line in stderr.lines() {
        eprintln!("[{label}] {line}");
    }
    assert!(
        out.status.success(),
        "{label} failed ({}):\n{stdout}{stderr}",
        out.status
    );
    let line = stdout
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or_else(|| panic!("{label} printed nothing"));
    eprintln!("[{label}] {line}");
    serde_json::from_str(line).unwrap_or_else(|e| panic!("{label} printed no JSON ({e}): {line}"))
}

/// The RFC 7638 SHA-256 thumbprint of an EC public JWK, computed here: the required
/// members in lexicographic order, no whitespace.
fn thumbprint(jwk: &Value) -> String {
    assert_eq!(jwk["kty"], "EC", "{jwk}");
    let canonical = format!(
        r#"{{"crv":"{}","kty":"EC","x":"{}","y":"{}"}}"#,
        jwk["crv"].as_str().unwrap(),
        jwk["x"].as_str().unwrap(),
        jwk["y"].as_str().unwrap()
    );
    URL_SAFE_NO_PAD.encode(sha2::Sha256::digest(canonical.as_bytes()))
}

/// A cluster with a test OIDC issuer, a policy and a token key.
struct Env {
    cluster: TestCluster,
    issuer: TestIssuer,
    _cfg: TempDir,
}

impl Env {
    /// Starts a cluster whose trust configuration is [`TestIssuer`]'s with `trust_extra`'s
    /// members added (and `files` written beside it), governed by `policy`, with `flags`
    /// for the coordinator.
    async fn start(
        label: &str,
        policy: &str,
        trust_extra: Value,
        files: &[(&str, String)],
        flags: &[&str],
    ) -> Env {
        let cfg = TempDir::new(label);
        let issuer = TestIssuer::new(&cfg.0);
        for (name, text) in files {
            std::fs::write(cfg.0.join(name), text).unwrap();
        }
        let trust_path = cfg.0.join("trust.json");
        let mut trust: Value =
            serde_json::from_str(&std::fs::read_to_string(&trust_path).unwrap()).unwrap();
        for (k, v) in trust_extra.as_object().unwrap() {
            trust[k] = v.clone();
        }
        std::fs::write(&trust_path, trust.to_string()).unwrap();
        let policy_dir = cfg.0.join("policy");
        std::fs::create_dir_all(&policy_dir).unwrap();
        std::fs::write(policy_dir.join("base.cedar"), policy).unwrap();
        let pd = policy_dir.display().to_string();
        let tc = trust_path.display().to_string();
        let mut args = vec!["--policy-dir", &pd, "--trust-config", &tc];
        args.extend_from_slice(flags);
        let cluster = TestCluster::start(label, 3, 1, &args);
        cluster.create_token_key("tokens", 900, 2).await;
        Env {
            cluster,
            issuer,
            _cfg: cfg,
        }
    }

    /// The cluster CA, which the clients trust.
    fn ca(&self) -> PathBuf {
        self.cluster.dir.0.join("ca.pem")
    }

    fn roots(&self) -> rustls::RootCertStore {
        let (_, trust) = self.cluster.identity("client-admin");
        let mut roots = rustls::RootCertStore::empty();
        roots.add(trust.ca_der().clone()).unwrap();
        roots
    }

    /// Verifies an access token in Rust (jsonwebtoken) with the key the JWKS names:
    /// ES256, `typ` at+jwt, issuer and [`AUDIENCE`]. Returns the claims.
    async fn verify(&self, token: &str) -> Value {
        let header = jsonwebtoken::decode_header(token).unwrap();
        assert_eq!(header.alg, Algorithm::ES256);
        assert_eq!(header.typ.as_deref(), Some("at+jwt"));
        let tls = https::public_client_config(self.roots()).unwrap();
        let r = https::get(&format!("{}/jwks.json", self.cluster.issuer()), tls)
            .await
            .unwrap();
        assert_eq!(r.status, 200);
        let jwks: jsonwebtoken::jwk::JwkSet = serde_json::from_slice(&r.body).unwrap();
        let jwk = jwks
            .find(&header.kid.unwrap())
            .expect("the token's kid is in the JWKS");
        let mut v = Validation::new(Algorithm::ES256);
        v.set_audience(&[AUDIENCE]);
        v.set_issuer(&[self.cluster.issuer()]);
        jsonwebtoken::decode::<Value>(token, &DecodingKey::from_jwk(jwk).unwrap(), &v)
            .unwrap()
            .claims
    }

    /// RFC 7662 introspection as the admin client, over the hybrid group.
    async fn introspect(&self, token: &str) -> Value {
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
}

/// The agent's SPIFFE ID for an attestation of [`TestIssuer`] (issuer name `test`).
fn agent_id(sub: &str) -> String {
    format!("spiffe://{DOMAIN}/agent/test/{sub}")
}

/// openid-client gets a DPoP-bound token with the jwt-bearer grant and exchanges it for a
/// sub-agent; jose verifies both through discovery and refuses a tampered token. One
/// cluster for the three cases.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openid_client_and_jose_against_the_token_endpoint() {
    let Some(node) = node_clients() else { return };
    // The clients force classic key exchange (OpenSSL 3.0 cannot do X25519MLKEM768).
    eprintln!("{CLASSIC_NOTE}");
    let env = Env::start(
        "oauth-node",
        AGENT_POLICY,
        json!({}),
        &[],
        &["--allow-classic-token-endpoints"],
    )
    .await;
    let issuer = env.cluster.issuer();
    let ca = env.ca();
    let agent = env.issuer.attest("agent-1", json!({"team": "blue"}));
    let helper = env.issuer.attest("helper", json!({"team": "blue"}));

    let mut cmd = script(
        Path::new("node"),
        &node.join("openid-client-grants.mjs"),
        &ca,
    );
    cmd.args(["--issuer", issuer.as_str(), "--assertion", agent.as_str()])
        .args(["--resource", AUDIENCE, "--scope", "tools:read tools:write"])
        .args([
            "--actor-assertion",
            helper.as_str(),
            "--exchange-scope",
            "tools:read",
        ]);
    let out = run("openid-client", cmd).await;
    assert_eq!(out["issuer"], issuer);
    assert_eq!(out["token_endpoint"], format!("{issuer}/token"));

    // 1. jwt-bearer with DPoP: bound to the key the library made.
    let jkt = out["dpop_jkt"]
        .as_str()
        .expect("jose computed a thumbprint");
    assert_eq!(
        thumbprint(&out["dpop_jwk"]),
        jkt,
        "jose's thumbprint of the DPoP key differs from RFC 7638 computed here"
    );
    let bearer = &out["jwt_bearer"]["ok"];
    assert!(bearer.is_object(), "jwt-bearer grant refused: {out}");
    assert_eq!(bearer["token_type_on_wire"], "DPoP", "RFC 9449 §5");
    assert_eq!(bearer["token_type"], "dpop", "as openid-client reports it");
    assert_eq!(bearer["scope"], "tools:read tools:write");
    assert_eq!(bearer["claims"]["cnf"]["jkt"], jkt);
    let token = bearer["access_token"].as_str().unwrap();
    let claims = env.verify(token).await;
    assert_eq!(
        claims["cnf"]["jkt"], jkt,
        "the token is not bound to the script's DPoP key"
    );
    assert_eq!(claims["sub"], agent_id("agent-1"));
    assert_eq!(claims["aud"], AUDIENCE);
    assert_eq!(claims["iss"], issuer);
    let seen = env.introspect(token).await;
    assert_eq!(seen["active"], true, "{seen}");
    assert_eq!(seen["cnf"]["jkt"], jkt, "{seen}");
    assert_eq!(seen["token_type"], "DPoP", "RFC 9449 §6.2: {seen}");
    assert_eq!(seen["jti"], claims["jti"]);

    // 2. Token exchange of that token for a sub-agent, with a proof by the same key.
    let exchanged = &out["exchange"]["ok"];
    assert!(exchanged.is_object(), "token exchange refused: {out}");
    assert_eq!(
        exchanged["issued_token_type"],
        "urn:ietf:params:oauth:token-type:access_token"
    );
    assert_eq!(exchanged["token_type_on_wire"], "DPoP");
    assert_eq!(exchanged["claims"]["act"]["sub"], agent_id("helper"));
    let delegated_token = exchanged["access_token"].as_str().unwrap();
    let delegated = env.verify(delegated_token).await;
    assert_eq!(delegated["sub"], agent_id("agent-1"));
    assert_eq!(delegated["act"]["sub"], agent_id("helper"));
    assert_eq!(delegated["scope"], "tools:read", "scope only narrows");
    assert_eq!(delegated["cnf"]["jkt"], jkt, "still bound to the same key");
    assert_ne!(delegated["jti"], claims["jti"]);
    assert_eq!(env.introspect(delegated_token).await["active"], true);

    // 3. jose, as a resource server: discovery, remote JWKS, jwtVerify.
    let mut cmd = script(Path::new("node"), &node.join("jose-verify.mjs"), &ca);
    cmd.args(["--issuer", issuer.as_str(), "--audience", AUDIENCE])
        .args(["--token", token, "--token", delegated_token]);
    let out = run("jose", cmd).await;
    assert_eq!(out["jwks_uri"], format!("{issuer}/jwks.json"));
    let kids: Vec<&str> = out["keys"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|k| k["kid"].as_str())
        .collect();
    for kid in out["kids_used"].as_array().unwrap() {
        assert!(kids.contains(&kid.as_str().unwrap()), "{out}");
    }
    for (result, expected) in out["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .zip([&claims, &delegated])
    {
        let payload = &result["ok"]["payload"];
        assert!(
            payload.is_object(),
            "jose refused a Quorate token: {result}"
        );
        assert_eq!(result["ok"]["header"]["typ"], "at+jwt");
        assert_eq!(
            payload, expected,
            "jose and jsonwebtoken read different claims"
        );
    }
    assert_eq!(out["tokens"].as_array().unwrap().len(), 2);
    assert_eq!(
        out["tampered"]["refused"]["code"], "ERR_JWS_SIGNATURE_VERIFICATION_FAILED",
        "a token with a changed sub must not verify: {out}"
    );
    assert_eq!(
        out["other_audience"]["refused"]["code"], "ERR_JWT_CLAIM_VALIDATION_FAILED",
        "{out}"
    );
}

/// A P-256 client key: the private key as PKCS#8 PEM (for the client) and the public
/// key as a JWKS (for the trust configuration).
fn client_key(kid: &str) -> (String, Value) {
    let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let raw = pair.public_key_raw();
    let jwks = json!({"keys": [{
        "kty": "EC", "crv": "P-256", "alg": "ES256", "use": "sig", "kid": kid,
        "x": URL_SAFE_NO_PAD.encode(&raw[1..33]), "y": URL_SAFE_NO_PAD.encode(&raw[33..65]),
    }]});
    (pair.serialize_pem(), jwks)
}

/// Authlib's OAuth2Session with private_key_jwt (RFC 7523 §2.2) gets a token with the
/// client_credentials grant for a client registered in the trust configuration; an
/// assertion signed by another key is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authlib_client_credentials_with_private_key_jwt() {
    let Some(python) = python_client() else {
        return;
    };
    let dir = workspace().join("tests/oauth-clients");
    // The client forces classic key exchange (OpenSSL 3.0 cannot do X25519MLKEM768).
    eprintln!("{CLASSIC_NOTE}");
    let keys = TempDir::new("oauth-ci-bot-keys");
    let (pem, jwks) = client_key("ci-bot-1");
    let key_file = keys.0.join("ci-bot.pem");
    std::fs::write(&key_file, pem).unwrap();
    let (other_pem, _) = client_key("ci-bot-1");
    let other_key_file = keys.0.join("not-ci-bot.pem");
    std::fs::write(&other_key_file, other_pem).unwrap();
    // The registered client's public keys sit beside trust.json, which names them.
    let env = Env::start(
        "oauth-python",
        CLIENT_POLICY,
        json!({"clients": [{"client_id": "ci-bot", "jwks_file": "ci-bot.jwks.json"}]}),
        &[("ci-bot.jwks.json", jwks.to_string())],
        &["--allow-classic-token-endpoints"],
    )
    .await;
    let issuer = env.cluster.issuer();
    let ca = env.ca();
    let authlib = |key: &Path| {
        let mut cmd = script(&python, &dir.join("client_credentials.py"), &ca);
        cmd.args(["--issuer", issuer.as_str(), "--client-id", "ci-bot"])
            .arg("--key")
            .arg(key)
            .args(["--kid", "ci-bot-1", "--resource", AUDIENCE])
            .args(["--scope", "tools:read"])
            .arg("--ca")
            .arg(&ca);
        cmd
    };

    let out = run("authlib", authlib(&key_file)).await;
    assert_eq!(out["token_endpoint"], format!("{issuer}/token"));
    // RFC 8414 §2: the metadata lists what the token endpoint accepts.
    assert!(
        out["grant_types_supported"]
            .as_array()
            .unwrap()
            .contains(&json!("client_credentials")),
        "{out}"
    );
    assert!(
        out["token_endpoint_auth_methods_supported"]
            .as_array()
            .unwrap()
            .contains(&json!("private_key_jwt")),
        "{out}"
    );
    let token = &out["token"]["ok"];
    assert!(token.is_object(), "client_credentials refused: {out}");
    assert_eq!(out["token"]["status"], 200);
    assert_eq!(token["token_type"], "Bearer");
    let access_token = token["access_token"].as_str().unwrap();
    let claims = env.verify(access_token).await;
    let client = format!("spiffe://{DOMAIN}/client/ci-bot");
    assert_eq!(claims["sub"], client);
    assert_eq!(claims["client_id"], client);
    assert_eq!(claims["aud"], AUDIENCE);
    assert_eq!(claims["scope"], "tools:read");
    let seen = env.introspect(access_token).await;
    assert_eq!(seen["active"], true, "{seen}");
    assert_eq!(seen["client_id"], client);

    // The same client_id with an assertion signed by a key it did not register.
    let out = run("authlib (wrong key)", authlib(&other_key_file)).await;
    let refused = &out["token"]["refused"];
    assert_eq!(refused["error"], "invalid_client", "RFC 6749 §5.2: {out}");
    assert!(
        matches!(refused["status"].as_u64(), Some(400 | 401)),
        "{out}"
    );
}

/// Without `--allow-classic-token-endpoints`, a classic-TLS client still gets discovery
/// and the JWKS, but the token endpoint answers 403 `invalid_request` naming
/// X25519MLKEM768 — to openid-client and to Authlib alike.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn classic_clients_are_refused_at_the_token_endpoint_without_the_flag() {
    let Some(dir) = node_clients() else { return };
    let Some(python) = python_client() else {
        return;
    };
    eprintln!(
        "no --allow-classic-token-endpoints: these clients (OpenSSL 3.0) can only offer \
         classic key exchange, so the token endpoint must refuse them"
    );
    let env = Env::start("oauth-classic", AGENT_POLICY, json!({}), &[], &[]).await;
    let issuer = env.cluster.issuer();
    let ca = env.ca();
    let refused_for_classic = |refused: &Value, who: &str| {
        assert_eq!(refused["status"], 403, "{who}: {refused}");
        assert_eq!(refused["error"], "invalid_request", "{who}: {refused}");
        let why = refused["error_description"].as_str().unwrap_or_default();
        assert!(why.contains("X25519MLKEM768"), "{who}: {why}");
        assert!(why.contains("negotiated X25519"), "{who}: {why}");
    };

    // jose: discovery and the JWKS work over classic TLS.
    let mut cmd = script(Path::new("node"), &dir.join("jose-verify.mjs"), &ca);
    cmd.args(["--issuer", issuer.as_str(), "--audience", AUDIENCE]);
    let out = run("jose (classic)", cmd).await;
    assert_eq!(out["issuer"], issuer);
    assert!(
        !out["keys"].as_array().unwrap().is_empty(),
        "the JWKS has the token key: {out}"
    );

    // openid-client: discovery works, the grant is refused.
    let agent = env.issuer.attest("agent-1", json!({"team": "blue"}));
    let mut cmd = script(
        Path::new("node"),
        &dir.join("openid-client-grants.mjs"),
        &ca,
    );
    cmd.args(["--issuer", issuer.as_str(), "--assertion", agent.as_str()])
        .args(["--resource", AUDIENCE]);
    let out = run("openid-client (classic)", cmd).await;
    assert_eq!(out["token_endpoint"], format!("{issuer}/token"));
    assert!(out["jwt_bearer"]["ok"].is_null(), "{out}");
    refused_for_classic(&out["jwt_bearer"]["refused"], "openid-client");

    // Authlib: discovery and the JWKS work, the token request is refused before the
    // client (not registered here) is even looked at.
    let keys = TempDir::new("oauth-classic-keys");
    let (pem, _) = client_key("k");
    std::fs::write(keys.0.join("key.pem"), pem).unwrap();
    let mut cmd = script(&python, &dir.join("client_credentials.py"), &ca);
    cmd.args(["--issuer", issuer.as_str(), "--client-id", "ci-bot"])
        .arg("--key")
        .arg(keys.0.join("key.pem"))
        .args(["--kid", "k", "--resource", AUDIENCE])
        .arg("--ca")
        .arg(&ca);
    let out = run("authlib (classic)", cmd).await;
    assert_eq!(out["issuer"], issuer);
    assert!(!out["jwks_kids"].as_array().unwrap().is_empty(), "{out}");
    refused_for_classic(&out["token"]["refused"], "authlib");
}
