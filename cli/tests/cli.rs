//! The `quorate` binary without a real cluster: help, `admin init`, exit codes for
//! usage errors, an unreachable cluster and refusals, and the client's handling of a
//! stand-in coordinator served in-process over the real post-quantum mTLS stack.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic,
    reason = "test helpers state their expectations"
)]

use std::net::SocketAddr;
use std::path::Path;
use std::process::Output;

use quorate_proto::api;
use quorate_proto::api::cluster_service_server::{ClusterService, ClusterServiceServer};
use quorate_proto::api::key_service_server::{KeyService, KeyServiceServer};
use quorate_proto::tls::{self, Identity, RoleKind, Trust};
use quorate_proto::transport;
use tonic::{Request, Response, Status};

const BIN: &str = env!("CARGO_BIN_EXE_quorate");

/// Runs `quorate` with `args`, no inherited QUORATE_* settings, and `env`.
async fn quorate(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = tokio::process::Command::new(BIN);
    cmd.args(args);
    for (key, _) in std::env::vars() {
        if key.starts_with("QUORATE_") {
            cmd.env_remove(key);
        }
    }
    cmd.envs(env.iter().copied());
    cmd.output().await.expect("run quorate")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn code(out: &Output) -> i32 {
    out.status.code().expect("exit code")
}

/// `quorate admin init` into `dir`.
async fn init(dir: &Path) -> Output {
    quorate(
        &[
            "admin",
            "init",
            "--dir",
            dir.to_str().unwrap(),
            "--nodes",
            "3",
            "--threshold",
            "1",
        ],
        &[],
    )
    .await
}

/// Client settings for the admin certificates in `dir`, pointed at `addr`.
fn admin_env(dir: &Path, addr: SocketAddr) -> Vec<(&'static str, String)> {
    vec![
        ("QUORATE_ADDR", addr.to_string()),
        ("QUORATE_CACERT", dir.join("ca.pem").display().to_string()),
        (
            "QUORATE_CERT",
            dir.join("client-admin.pem").display().to_string(),
        ),
        (
            "QUORATE_KEY",
            dir.join("client-admin-key.pem").display().to_string(),
        ),
    ]
}

fn borrow<'a>(env: &'a [(&'static str, String)]) -> Vec<(&'static str, &'a str)> {
    env.iter().map(|(k, v)| (*k, v.as_str())).collect()
}

#[tokio::test]
async fn help_lists_the_subcommands() {
    let out = quorate(&["--help"], &[]).await;
    assert_eq!(code(&out), 0);
    let help = text(&out.stdout);
    for sub in [
        "dev", "admin", "status", "key", "sign", "derive", "encrypt", "decrypt",
    ] {
        assert!(
            help.lines().any(|l| l.trim_start().starts_with(sub)),
            "`{sub}` missing from:\n{help}"
        );
    }
    let out = quorate(&["key", "--help"], &[]).await;
    let help = text(&out.stdout);
    for sub in ["create", "rotate", "list", "pubkey"] {
        assert!(help.contains(sub), "`{sub}` missing from:\n{help}");
    }
    let out = quorate(&["sign", "--help"], &[]).await;
    let help = text(&out.stdout);
    for flag in [
        "--in", "--digest", "--format", "--out", "--addr", "--cacert", "--cert", "--key",
        "--domain",
    ] {
        assert!(help.contains(flag), "`{flag}` missing from:\n{help}");
    }
}

#[tokio::test]
async fn bad_flags_exit_2() {
    let out = quorate(&["status", "--no-such-flag"], &[]).await;
    assert_eq!(code(&out), 2, "{}", text(&out.stderr));
    let out = quorate(&["sign", "default", "--in", "x", "--format", "pdf"], &[]).await;
    assert_eq!(code(&out), 2, "{}", text(&out.stderr));
    let out = quorate(&["frobnicate"], &[]).await;
    assert_eq!(code(&out), 2);
}

#[tokio::test]
async fn token_rule_flags_are_checked_before_connecting() {
    for (args, words) in [
        (&["--token-issuer", "https://i.test"][..], "go together"),
        (
            &["--token-issuer", "https://i.test", "--token-max-ttl", "15m"][..],
            "go together",
        ),
        (
            &[
                "--token-issuer",
                "https://i.test",
                "--token-max-ttl",
                "25h",
                "--token-typ",
                "at+jwt",
            ][..],
            "max_ttl_seconds must be between 1 and 86400",
        ),
        (
            &[
                "--token-issuer",
                "https://i.test",
                "--token-max-ttl",
                "15 min",
                "--token-typ",
                "at+jwt",
            ][..],
            "expected a positive duration",
        ),
        (
            &[
                "--purpose",
                "derive",
                "--token-issuer",
                "https://i.test",
                "--token-max-ttl",
                "900",
                "--token-typ",
                "at+jwt",
            ][..],
            "only to token keys",
        ),
    ] {
        let mut all = vec!["key", "create", "t"];
        all.extend_from_slice(args);
        let out = quorate(&all, &[]).await;
        assert_eq!(code(&out), 2, "{args:?}: {}", text(&out.stderr));
        assert!(
            text(&out.stderr).contains(words),
            "{args:?}: {} does not mention {words}",
            text(&out.stderr)
        );
    }
}

#[tokio::test]
async fn missing_settings_exit_2_and_say_what_to_set() {
    let out = quorate(&["status"], &[]).await;
    assert_eq!(code(&out), 2);
    let err = text(&out.stderr);
    for needle in [
        "QUORATE_ADDR",
        "QUORATE_CACERT",
        "QUORATE_CERT",
        "QUORATE_KEY",
        "quorate-dev/env",
    ] {
        assert!(err.contains(needle), "{needle} missing from: {err}");
    }
}

#[tokio::test]
async fn admin_init_writes_the_files_and_refuses_to_overwrite() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("cluster");
    let out = init(&dir).await;
    assert_eq!(code(&out), 0, "{}", text(&out.stderr));
    for f in [
        "ca.pem",
        "ca-key.pem",
        "node-1.pem",
        "node-1-key.pem",
        "node-3.pem",
        "node-3-key.pem",
        "coordinator.pem",
        "coordinator-key.pem",
        "client-admin.pem",
        "client-admin-key.pem",
    ] {
        assert!(dir.join(f).is_file(), "{f} not written");
    }
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(dir.join("ca-key.pem"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0, "CA key readable by others: {mode:o}");
    }
    let printed = text(&out.stdout);
    assert!(printed.contains("quorate-node --listen"), "{printed}");
    assert!(
        printed.contains("quorate-coordinator --listen"),
        "{printed}"
    );
    assert!(printed.contains("--node 3=NODE3_HOST:7103"), "{printed}");
    assert!(printed.contains("--threshold 1"), "{printed}");

    let ca_before = std::fs::read(dir.join("ca.pem")).unwrap();
    let out = init(&dir).await;
    assert_eq!(code(&out), 2, "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("--force"),
        "{}",
        text(&out.stderr)
    );
    assert_eq!(std::fs::read(dir.join("ca.pem")).unwrap(), ca_before);

    let out = quorate(
        &[
            "admin",
            "init",
            "--dir",
            dir.to_str().unwrap(),
            "--nodes",
            "3",
            "--threshold",
            "1",
            "--force",
        ],
        &[],
    )
    .await;
    assert_eq!(code(&out), 0, "{}", text(&out.stderr));
    assert_ne!(std::fs::read(dir.join("ca.pem")).unwrap(), ca_before);

    // n < 2t+1 is a usage error, and writes nothing.
    let other = tmp.path().join("other");
    let out = quorate(
        &[
            "admin",
            "init",
            "--dir",
            other.to_str().unwrap(),
            "--nodes",
            "2",
            "--threshold",
            "1",
        ],
        &[],
    )
    .await;
    assert_eq!(code(&out), 2);
    assert!(
        text(&out.stderr).contains("2t + 1"),
        "{}",
        text(&out.stderr)
    );
    assert!(!other.exists());
}

#[tokio::test]
async fn a_closed_port_exits_3_naming_the_address() {
    let tmp = tempfile::tempdir().unwrap();
    assert_eq!(code(&init(tmp.path()).await), 0);
    let addr = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap()
    };
    let env = admin_env(tmp.path(), addr);
    let out = quorate(&["status"], &borrow(&env)).await;
    assert_eq!(code(&out), 3, "{}", text(&out.stderr));
    let err = text(&out.stderr);
    assert!(err.contains(&addr.to_string()), "{err}");
    assert!(err.contains("quorate dev"), "{err}");
}

#[tokio::test]
async fn dev_without_the_service_binaries_says_how_to_build_them() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("dev");
    let out = quorate(
        &["dev", "--dir", dir.to_str().unwrap()],
        &[("QUORATE_NODE_BIN", "/nonexistent/quorate-node")],
    )
    .await;
    assert_eq!(code(&out), 1, "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("cargo build --release -p quorate-node -p quorate-coordinator"),
        "{}",
        text(&out.stderr)
    );
    let out = quorate(
        &["dev", "--dir", dir.to_str().unwrap(), "--nodes", "2"],
        &[],
    )
    .await;
    assert_eq!(code(&out), 2, "{}", text(&out.stderr));
}

// ---------------------------------------------------------------------------------------
// A stand-in coordinator
// ---------------------------------------------------------------------------------------

/// Answers like a coordinator holding one signing key, `default`, whose public key is
/// the generator; every other name is unknown, and `down` is unavailable.
#[derive(Clone, Copy)]
struct Fake;

fn default_key() -> api::KeyInfo {
    api::KeyInfo {
        name: "default".into(),
        key_id: "kid-default".into(),
        purpose: api::Purpose::Sign as i32,
        n: 3,
        t: 1,
        epoch: 1,
        public_key: quorate_crypto::Point::GENERATOR.to_bytes().to_vec(),
        token_rules: None,
        version: 1,
        kid: "kid-default".into(),
        profile: api::KeyProfile::Raw as i32,
        renewed_at: 0,
        holders: Vec::new(),
    }
}

fn lookup(name: &str) -> Result<api::KeyInfo, Status> {
    match name {
        "default" => Ok(default_key()),
        "down" => Err(Status::unavailable(
            "no quorum of fragment nodes is reachable",
        )),
        other => Err(Status::not_found(format!("no key named `{other}`"))),
    }
}

#[tonic::async_trait]
impl KeyService for Fake {
    async fn refresh_key(
        &self,
        req: Request<api::RefreshKeyRequest>,
    ) -> Result<Response<api::KeyInfo>, Status> {
        let key = lookup(&req.into_inner().name)?;
        Ok(Response::new(api::KeyInfo {
            epoch: key.epoch + 1,
            ..key
        }))
    }

    async fn rotate_key(
        &self,
        req: Request<api::RotateKeyRequest>,
    ) -> Result<Response<api::KeyInfo>, Status> {
        let key = lookup(&req.into_inner().name)?;
        Ok(Response::new(api::KeyInfo {
            key_id: "kid-2".into(),
            version: key.version + 1,
            kid: "kid-2".into(),
            ..key
        }))
    }

    async fn create_key(
        &self,
        req: Request<api::CreateKeyRequest>,
    ) -> Result<Response<api::KeyInfo>, Status> {
        let req = req.into_inner();
        if req.name == "default" {
            return Err(Status::already_exists("key `default` exists"));
        }
        Ok(Response::new(api::KeyInfo {
            name: req.name,
            purpose: req.purpose,
            token_rules: req.token_rules,
            profile: req.profile,
            ..default_key()
        }))
    }

    async fn list_keys(
        &self,
        _req: Request<api::ListKeysRequest>,
    ) -> Result<Response<api::ListKeysReply>, Status> {
        Ok(Response::new(api::ListKeysReply {
            keys: vec![default_key()],
        }))
    }

    async fn get_public_key(
        &self,
        req: Request<api::GetPublicKeyRequest>,
    ) -> Result<Response<api::PublicKeyReply>, Status> {
        let key = lookup(&req.into_inner().name)?;
        // No encodings: the client computes them from the point.
        Ok(Response::new(api::PublicKeyReply {
            key: Some(key),
            spki_pem: String::new(),
            jwk_json: String::new(),
        }))
    }

    async fn sign(
        &self,
        req: Request<api::SignRequest>,
    ) -> Result<Response<api::SignReply>, Status> {
        let req = req.into_inner();
        lookup(&req.name)?;
        match req.input {
            Some(api::sign_request::Input::Digest(d)) if d.len() == 32 => {}
            Some(api::sign_request::Input::Message(m)) if m == b"hello" => {}
            _ => return Err(Status::invalid_argument("unexpected input")),
        }
        let signature = if req.format == api::SignatureFormat::Der as i32 {
            // SEQUENCE { INTEGER 1, INTEGER 2 }
            vec![0x30, 0x06, 0x02, 0x01, 0x01, 0x02, 0x01, 0x02]
        } else {
            vec![0x11; 64]
        };
        Ok(Response::new(api::SignReply {
            signature,
            key_id: "kid-default".into(),
        }))
    }

    async fn derive(
        &self,
        req: Request<api::DeriveRequest>,
    ) -> Result<Response<api::DeriveReply>, Status> {
        lookup(&req.into_inner().name)?;
        Err(Status::failed_precondition(
            "key `default` has purpose sign, not derive",
        ))
    }

    async fn decrypt(
        &self,
        req: Request<api::DecryptRequest>,
    ) -> Result<Response<api::DecryptReply>, Status> {
        lookup(&req.into_inner().name)?;
        Err(Status::failed_precondition(
            "key `default` has purpose sign, not decrypt",
        ))
    }
}

#[tonic::async_trait]
impl ClusterService for Fake {
    async fn repair_node(
        &self,
        _req: Request<api::RepairNodeRequest>,
    ) -> Result<Response<api::RepairNodeReply>, Status> {
        Err(Status::unavailable("node 3 is unreachable"))
    }

    async fn status(
        &self,
        _req: Request<api::StatusRequest>,
    ) -> Result<Response<api::StatusReply>, Status> {
        Ok(Response::new(api::StatusReply {
            n: 3,
            t: 1,
            nodes: (1..=3)
                .map(|i| api::NodeStatus {
                    index: i,
                    address: format!("127.0.0.1:{}", 7100 + i),
                    healthy: i != 3,
                    error: if i == 3 {
                        "connection refused".into()
                    } else {
                        String::new()
                    },
                    version: "0.1.0".into(),
                })
                .collect(),
            pools: vec![api::PoolStatus {
                key_name: "default".into(),
                signing_set: vec![1, 2],
                depth: 42,
            }],
            keys: vec![default_key()],
            pending_activations: 0,
        }))
    }
}

/// Serves [`Fake`] with the coordinator certificate of `dir` on 127.0.0.1.
async fn serve_fake(dir: &Path) -> SocketAddr {
    let identity =
        Identity::from_pem_files(dir.join("coordinator.pem"), dir.join("coordinator-key.pem"))
            .unwrap();
    let trust = Trust::from_pem_file(dir.join("ca.pem"), "quorate.local").unwrap();
    let config = tls::server_config(&identity, &trust, &[RoleKind::Client]).unwrap();
    let (listener, addr) = transport::bind("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(KeyServiceServer::new(Fake))
            .add_service(ClusterServiceServer::new(Fake))
            .serve_with_incoming(transport::incoming(listener, config)),
    );
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_against_a_stand_in_coordinator() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    assert_eq!(code(&init(dir).await), 0);
    let addr = serve_fake(dir).await;
    let env = admin_env(dir, addr);
    let env = borrow(&env);

    let out = quorate(&["status"], &env).await;
    assert_eq!(code(&out), 0, "{}", text(&out.stderr));
    let status = text(&out.stdout);
    assert!(status.contains("threshold t = 1"), "{status}");
    assert!(status.contains("UNHEALTHY: connection refused"), "{status}");
    assert!(status.contains("signing set {1,2}  42 ready"), "{status}");

    let out = quorate(&["key", "list"], &env).await;
    assert_eq!(code(&out), 0, "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("kid-default"),
        "{}",
        text(&out.stdout)
    );

    // PEM computed by the client from the point: the generator.
    let out = quorate(&["key", "pubkey", "default", "--format", "pem"], &env).await;
    assert_eq!(code(&out), 0, "{}", text(&out.stderr));
    use p256::pkcs8::DecodePublicKey as _;
    let key = p256::PublicKey::from_public_key_pem(&text(&out.stdout)).unwrap();
    assert_eq!(
        key,
        p256::PublicKey::from_sec1_bytes(&quorate_crypto::Point::GENERATOR.to_bytes()).unwrap()
    );
    let out = quorate(&["key", "pubkey", "default", "--format", "jwk"], &env).await;
    assert_eq!(code(&out), 0, "{}", text(&out.stderr));
    let jwk: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(jwk["crv"], "P-256");
    assert_eq!(jwk["alg"], "ES256");
    assert_eq!(jwk["kid"], "kid-default");

    // Sign: hex on stdout, bytes to --out, digest files raw or hex.
    let msg = dir.join("msg.txt");
    std::fs::write(&msg, b"hello").unwrap();
    let msg = msg.to_str().unwrap();
    let out = quorate(&["sign", "default", "--in", msg, "--format", "raw"], &env).await;
    assert_eq!(code(&out), 0, "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).trim(), "11".repeat(64));
    let sig = dir.join("msg.sig");
    let out = quorate(
        &[
            "sign",
            "default",
            "--in",
            msg,
            "--format",
            "der",
            "--out",
            sig.to_str().unwrap(),
        ],
        &env,
    )
    .await;
    assert_eq!(code(&out), 0, "{}", text(&out.stderr));
    assert_eq!(
        std::fs::read(&sig).unwrap(),
        [0x30, 0x06, 0x02, 0x01, 0x01, 0x02, 0x01, 0x02]
    );
    let digest = dir.join("digest");
    std::fs::write(&digest, format!("{}  msg.txt\n", "ab".repeat(32))).unwrap();
    let out = quorate(
        &[
            "sign",
            "default",
            "--in",
            digest.to_str().unwrap(),
            "--digest",
            "--format",
            "raw",
        ],
        &env,
    )
    .await;
    assert_eq!(code(&out), 0, "{}", text(&out.stderr));

    // A wrong-length digest is a usage error, found before connecting.
    let out = quorate(
        &[
            "sign", "default", "--in", msg, "--digest", "--format", "raw",
        ],
        &env,
    )
    .await;
    assert_eq!(code(&out), 2, "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("32 bytes"),
        "{}",
        text(&out.stderr)
    );

    // Refusals exit 4 and show the cluster's message and a hint.
    let out = quorate(&["sign", "nope", "--in", msg, "--format", "raw"], &env).await;
    assert_eq!(code(&out), 4, "{}", text(&out.stderr));
    let err = text(&out.stderr);
    assert!(
        err.contains("no key named `nope`") && err.contains("quorate key list"),
        "{err}"
    );
    let out = quorate(&["derive", "default", "--context", "task-1"], &env).await;
    assert_eq!(code(&out), 4, "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("purpose sign"),
        "{}",
        text(&out.stderr)
    );
    let out = quorate(&["key", "create", "default"], &env).await;
    assert_eq!(code(&out), 4, "{}", text(&out.stderr));

    // Token rules travel with the request; `1h` is 3600 s.
    let out = quorate(
        &[
            "key",
            "create",
            "tokens",
            "--token-issuer",
            "https://i.test",
            "--token-max-ttl",
            "1h",
            "--token-typ",
            "at+jwt",
        ],
        &env,
    )
    .await;
    assert_eq!(code(&out), 0, "{}", text(&out.stderr));
    assert!(
        text(&out.stdout)
            .contains("token rules: typ at+jwt, issuer https://i.test, tokens of at most 3600 s"),
        "{}",
        text(&out.stdout)
    );
    let out = quorate(&["key", "rotate", "default"], &env).await;
    assert_eq!(code(&out), 0, "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("rotated key `default`")
            && text(&out.stdout).contains("version 2 (JWS kid kid-2)"),
        "{}",
        text(&out.stdout)
    );
    let out = quorate(&["key", "rotate", "nope"], &env).await;
    assert_eq!(code(&out), 4, "{}", text(&out.stderr));

    // Unavailable from the cluster is "unreachable".
    let out = quorate(&["sign", "down", "--in", msg, "--format", "raw"], &env).await;
    assert_eq!(code(&out), 3, "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("no quorum"),
        "{}",
        text(&out.stderr)
    );

    // Encrypting to a signing key is refused locally.
    let out = quorate(&["encrypt", "default", "--in", msg], &env).await;
    assert_eq!(code(&out), 2, "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("--purpose decrypt"),
        "{}",
        text(&out.stderr)
    );

    // Garbage is not a ciphertext.
    let out = quorate(&["decrypt", "default", "--in", msg], &env).await;
    assert_eq!(code(&out), 2, "{}", text(&out.stderr));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificate_problems_are_explained() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("a");
    let other = tmp.path().join("b");
    assert_eq!(code(&init(&dir).await), 0);
    assert_eq!(code(&init(&other).await), 0);
    let addr = serve_fake(&dir).await;

    // A node's certificate is not a client's.
    let mut env = admin_env(&dir, addr);
    env[2].1 = dir.join("node-1.pem").display().to_string();
    env[3].1 = dir.join("node-1-key.pem").display().to_string();
    let out = quorate(&["status"], &borrow(&env)).await;
    assert_eq!(code(&out), 2, "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("client certificates"),
        "{}",
        text(&out.stderr)
    );

    // Another cluster's CA: the handshake fails, and the hint is about certificates.
    let mut env = admin_env(&dir, addr);
    env[1].1 = other.join("ca.pem").display().to_string();
    let out = quorate(&["status"], &borrow(&env)).await;
    assert_eq!(code(&out), 3, "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("--cacert"),
        "{}",
        text(&out.stderr)
    );

    // Another trust domain.
    let env = admin_env(&dir, addr);
    let mut env = borrow(&env);
    env.push(("QUORATE_DOMAIN", "elsewhere.local"));
    let out = quorate(&["status"], &env).await;
    assert_eq!(code(&out), 2, "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("--domain"),
        "{}",
        text(&out.stderr)
    );
}
