//! `deploy/CERTIFICATES.md` end to end: its OpenSSL blocks run as the page says, each in a
//! directory standing for its own host (the offline CA, each node, the coordinator, the
//! admin), with only CSRs and certificates moving between them; then real node and
//! coordinator processes start with those files and the admin signs through them.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use aws_lc_rs::signature::{ECDSA_P256_SHA256_FIXED, UnparsedPublicKey};
use quorate_proto::api;
use quorate_proto::api::key_service_client::KeyServiceClient;
use quorate_proto::tls::{self, Identity, Role, Trust};
use quorate_proto::transport;
use quorate_tests::{Proc, TempDir, binary, free_port, spawn_ready};

/// A trust domain other than the harness's, so nothing falls back to a default.
const DOMAIN: &str = "quorate.example";
const N: u16 = 3;
const T: u16 = 1;

fn page() -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/CERTIFICATES.md");
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The body of the page's fenced block opened by "```sh step=<step>".
fn block(page: &str, step: &str) -> String {
    let fence = format!("```sh step={step}");
    let mut lines = page.lines().skip_while(|l| l.trim_end() != fence);
    assert!(
        lines.next().is_some(),
        "deploy/CERTIFICATES.md has no block {fence}"
    );
    let body: Vec<&str> = lines.take_while(|l| !l.starts_with("```")).collect();
    assert!(!body.is_empty(), "block {step} is empty");
    body.join("\n") + "\n"
}

/// Runs a block of the page with bash in `host`, with `vars` set; panics with its output
/// if it fails.
fn run(page: &str, step: &str, host: &Path, vars: &[(&str, &str)]) {
    let script = block(page, step);
    let out = Command::new("bash")
        .args(["-euo", "pipefail", "-c", &script])
        .current_dir(host)
        .env("DOMAIN", DOMAIN)
        .envs(vars.iter().copied())
        .output()
        .expect("bash");
    assert!(
        out.status.success(),
        "step {step} in {} with {vars:?} failed ({}):\n{}\n{}",
        host.display(),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// What travels between hosts: public files only.
fn carry(from: &Path, to: &Path, file: &str) {
    assert!(
        !file.ends_with("-key.pem") && file != "kek",
        "{file} must not leave its host"
    );
    std::fs::copy(from.join(file), to.join(file))
        .unwrap_or_else(|e| panic!("copy {file} from {}: {e}", from.display()));
}

/// Files in `dir` that hold a secret.
fn secrets_in(dir: &Path) -> BTreeSet<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|f| f.ends_with("-key.pem") || f == "kek")
        .collect()
}

fn mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

struct Host {
    dir: PathBuf,
    name: String,
    id: String,
    role: Role,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_from_the_deploy_page_run_a_cluster() {
    let page = page();
    let root = TempDir::new("deploy-certs");
    let mkdir = |name: &str| {
        let d = root.0.join(name);
        std::fs::create_dir_all(&d).unwrap();
        d
    };
    let ca = mkdir("ca-host");
    let mut hosts: Vec<Host> = (1..=N)
        .map(|i| Host {
            dir: mkdir(&format!("node-{i}-host")),
            name: format!("node-{i}"),
            id: format!("node/{i}"),
            role: Role::Node(i),
        })
        .collect();
    hosts.push(Host {
        dir: mkdir("coordinator-host"),
        name: "coordinator".into(),
        id: "coordinator".into(),
        role: Role::Coordinator,
    });
    hosts.push(Host {
        dir: mkdir("admin-host"),
        name: "client-admin".into(),
        id: "client/admin".into(),
        role: Role::Client("admin".into()),
    });

    // The page, in its order: the CA once; then per process a key and CSR on its own
    // host (and a node's KEK), signed on the CA host; the metadata certificate last.
    run(&page, "ca-init", &ca, &[]);
    for h in &hosts {
        let vars = [("NAME", h.name.as_str()), ("ID", h.id.as_str())];
        run(&page, "key-csr", &h.dir, &vars);
        if matches!(h.role, Role::Node(_)) {
            run(&page, "kek", &h.dir, &[]);
        }
        carry(&h.dir, &ca, &format!("{}.csr", h.name));
        run(&page, "sign-role", &ca, &vars);
        carry(&ca, &h.dir, &format!("{}.pem", h.name));
        carry(&ca, &h.dir, "ca.pem");
    }
    let coordinator = &hosts[usize::from(N)].dir;
    let issuer_host = [("ISSUER_HOST", "localhost")];
    run(&page, "web-csr", coordinator, &issuer_host);
    carry(coordinator, &ca, "metadata.csr");
    run(&page, "web-sign", &ca, &issuer_host);
    carry(&ca, coordinator, "metadata.pem");

    // Every private key stayed where it was made, with mode 0600.
    assert_eq!(secrets_in(&ca), BTreeSet::from(["ca-key.pem".to_owned()]));
    for h in &hosts {
        let mut expected = BTreeSet::from([format!("{}-key.pem", h.name)]);
        match h.role {
            Role::Node(_) => {
                expected.insert("kek".into());
            }
            Role::Coordinator => {
                expected.insert("metadata-key.pem".into());
            }
            Role::Client(_) => {}
        }
        assert_eq!(secrets_in(&h.dir), expected, "in {}", h.dir.display());
        for s in &expected {
            assert_eq!(mode(&h.dir.join(s)), 0o600, "{s} on {}", h.dir.display());
        }
    }

    // Quorate reads each certificate as the role it was made for, chained to the CA.
    let trust = Trust::from_pem_file(ca.join("ca.pem"), DOMAIN).unwrap();
    for h in &hosts {
        let id = Identity::from_pem_files(
            h.dir.join(format!("{}.pem", h.name)),
            h.dir.join(format!("{}-key.pem", h.name)),
        )
        .unwrap();
        assert_eq!(id.role(DOMAIN).unwrap(), h.role);
        assert_eq!(trust.verify_peer_chain(id.cert_chain()).unwrap(), h.role);
    }

    // Real processes with nothing but those files.
    let mut nodes: Vec<Proc> = Vec::new();
    for h in hosts.iter().filter(|h| matches!(h.role, Role::Node(_))) {
        let d = &h.dir;
        let mut cmd = Command::new(binary("quorate-node"));
        cmd.arg("--listen")
            .arg("127.0.0.1:0")
            .arg("--data-dir")
            .arg(d.join("data"))
            .arg("--cert")
            .arg(d.join(format!("{}.pem", h.name)))
            .arg("--key")
            .arg(d.join(format!("{}-key.pem", h.name)))
            .arg("--ca")
            .arg(d.join("ca.pem"))
            .arg("--kek-file")
            .arg(d.join("kek"))
            .arg("--domain")
            .arg(DOMAIN)
            .env("QUORATE_LOG", "warn");
        nodes.push(spawn_ready(cmd));
    }
    let http_port = free_port();
    let mut cmd = Command::new(binary("quorate-coordinator"));
    cmd.arg("--listen")
        .arg("127.0.0.1:0")
        .arg("--data-dir")
        .arg(coordinator.join("data"))
        .arg("--cert")
        .arg(coordinator.join("coordinator.pem"))
        .arg("--key")
        .arg(coordinator.join("coordinator-key.pem"))
        .arg("--ca")
        .arg(coordinator.join("ca.pem"))
        .arg("--http-cert")
        .arg(coordinator.join("metadata.pem"))
        .arg("--http-key")
        .arg(coordinator.join("metadata-key.pem"))
        .arg("--http-listen")
        .arg(format!("127.0.0.1:{http_port}"))
        .arg("--issuer-url")
        .arg(format!("https://localhost:{http_port}"))
        .arg("--domain")
        .arg(DOMAIN)
        .arg("--threshold")
        .arg(T.to_string())
        .args([
            "--pool-low",
            "2",
            "--pool-high",
            "4",
            "--presign-batch",
            "4",
        ])
        .env("QUORATE_LOG", "warn");
    for (k, p) in nodes.iter().enumerate() {
        cmd.arg("--node").arg(format!("{}={}", k + 1, p.addr));
    }
    let coordinator_proc = spawn_ready(cmd);

    // The admin, with its OpenSSL-made certificate: a key by DKG across the three
    // nodes, then a threshold signature that an independent verifier accepts.
    let admin = &hosts[usize::from(N) + 1].dir;
    let id = Identity::from_pem_files(
        admin.join("client-admin.pem"),
        admin.join("client-admin-key.pem"),
    )
    .unwrap();
    let trust = Trust::from_pem_file(admin.join("ca.pem"), DOMAIN).unwrap();
    let channel = transport::connect(
        coordinator_proc.addr,
        &Role::Coordinator,
        DOMAIN,
        tls::client_config(&id, &trust).unwrap(),
    )
    .await
    .unwrap();
    let mut keys = KeyServiceClient::new(channel);
    let key = keys
        .create_key(api::CreateKeyRequest {
            name: "deploy".into(),
            purpose: api::Purpose::Sign as i32,
            token_rules: None,
            profile: api::KeyProfile::Raw as i32,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((key.n, key.t), (u32::from(N), u32::from(T)));
    let msg = b"signed by nodes whose keys never left their hosts";
    let sig = tokio::time::timeout(
        Duration::from_secs(120),
        keys.sign(api::SignRequest {
            name: "deploy".into(),
            input: Some(api::sign_request::Input::Message(msg.to_vec())),
            format: api::SignatureFormat::Raw as i32,
        }),
    )
    .await
    .expect("no signature within 120 s")
    .unwrap()
    .into_inner()
    .signature;
    let public = quorate_crypto::Point::from_bytes(&key.public_key).unwrap();
    UnparsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, public.to_uncompressed())
        .verify(msg, &sig)
        .expect("aws-lc-rs rejects the cluster's signature");
    drop(coordinator_proc);
    drop(nodes);
}
