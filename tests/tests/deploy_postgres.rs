//! The PostgreSQL deployments of `deploy/` run as processes.
//!
//! `deploy/compose/compose.postgres.yaml`: `init-secrets --postgres`
//! makes the files (its second coordinator's certificate comes from OpenSSL, not from
//! `quorate admin init`), and every Quorate service of the compose file starts with the
//! command line the file gives it — the `migrate` job, three nodes, two coordinators —
//! with only what a container runtime would change: the secrets' and configs' paths, the
//! listen addresses (loopback, free ports) and the nodes' addresses. The store is a real
//! PostgreSQL server started here (`quorate_tests::postgres`) with the TLS certificate,
//! key and password `init-secrets` made for the `db` service, TLS only over TCP. The
//! coordinators use the URL of `secrets/store.env` (`sslmode=verify-full`, the name
//! `db` checked against the certificate) with three changes: the port, the CA file's
//! path, and `hostaddr=127.0.0.1` for the name `db`; plus, because Debian 12's server
//! (OpenSSL 3.0) cannot negotiate X25519MLKEM768 as the file's PostgreSQL 18 image does,
//! `ssl_groups=X25519MLKEM768:P-256`: this test forces a classic key exchange.
//!
//! Then, as the admin the script made: a key by DKG through one coordinator, a
//! signature through the other, checked by aws-lc-rs.
//!
//! `deploy/k8s/overlays/n3-t1-postgres`, rendered by `kubectl kustomize`: the migrate
//! Job and both coordinator replicas, each through its init container's script and then
//! its container's arguments and environment (see the test's docs).
//!
//! The files are read with PyYAML (the parser `deploy/validate` uses). Skipped,
//! saying why, without PostgreSQL or PyYAML, or when not root (the script chowns the
//! files to the containers' users); under `CI` a missing PostgreSQL fails.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use aws_lc_rs::signature::{ECDSA_P256_SHA256_FIXED, UnparsedPublicKey};
use quorate_proto::api;
use quorate_proto::api::key_service_client::KeyServiceClient;
use quorate_proto::tls::{self, Identity, Role, Trust};
use quorate_proto::transport;
use quorate_tests::postgres::Postgres;
use quorate_tests::{Proc, TempDir, binary, spawn_ready};
use serde_json::Value;

/// The trust domain `init-secrets` gives `quorate admin init`.
const DOMAIN: &str = "quorate.local";

fn deploy() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

/// A Python with PyYAML: deploy/validate's virtualenv if CI made it, else `python3`.
fn python_with_yaml() -> Option<PathBuf> {
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/deploy-venv/bin/python");
    [venv, PathBuf::from("python3")].into_iter().find(|p| {
        Command::new(p)
            .args(["-c", "import yaml"])
            .output()
            .is_ok_and(|o| o.status.success())
    })
}

/// The compose file as JSON (anchors and merge keys resolved).
fn compose_json(python: &Path, file: &Path) -> Value {
    let out = Command::new(python)
        .args([
            "-c",
            "import json, sys, yaml; json.dump(yaml.safe_load(open(sys.argv[1])), sys.stdout)",
        ])
        .arg(file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}: {}",
        file.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn is_root() -> bool {
    use std::os::unix::fs::MetadataExt as _;
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

/// What a container runtime does to one service: where each `/run/secrets/<target>`
/// and config target is on this host.
fn mounts(compose: &Value, service: &Value, compose_dir: &Path) -> BTreeMap<String, PathBuf> {
    let mut out = BTreeMap::new();
    for s in service["secrets"].as_array().into_iter().flatten() {
        let source = s["source"].as_str().unwrap();
        let file = compose["secrets"][source]["file"].as_str().unwrap();
        out.insert(
            format!("/run/secrets/{}", s["target"].as_str().unwrap()),
            compose_dir.join(file),
        );
    }
    for c in service["configs"].as_array().into_iter().flatten() {
        let source = c["source"].as_str().unwrap();
        let file = compose["configs"][source]["file"].as_str().unwrap();
        out.insert(
            c["target"].as_str().unwrap().to_owned(),
            compose_dir.join(file),
        );
    }
    out
}

/// The service's command line with its mounts, listeners and node addresses replaced.
fn command_of(
    compose: &Value,
    name: &str,
    compose_dir: &Path,
    data: &Path,
    nodes: &BTreeMap<String, SocketAddr>,
) -> Command {
    let service = &compose["services"][name];
    let mounts = mounts(compose, service, compose_dir);
    let argv: Vec<String> = service["command"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap().to_owned())
        .collect();
    let program = binary(&argv[0]);
    let mut cmd = Command::new(program);
    for arg in &argv[1..] {
        let (flag, value) = arg.split_once('=').unwrap_or((arg, ""));
        let value = match flag {
            "--listen" | "--metrics-listen" => "127.0.0.1:0".to_owned(),
            // The metadata listener takes no port 0: a free one.
            "--http-listen" => format!("127.0.0.1:{}", quorate_tests::free_port()),
            "--data-dir" => data.join(name).display().to_string(),
            // `--node=I=IP:PORT`: the address of the node service with that IP.
            "--node" => {
                let (i, ip_port) = value.split_once('=').unwrap();
                let ip = ip_port.rsplit_once(':').unwrap().0;
                format!("{i}={}", nodes[ip])
            }
            _ => match mounts.get(value) {
                Some(host) => host.display().to_string(),
                None => value.to_owned(),
            },
        };
        if value.is_empty() {
            cmd.arg(flag);
        } else {
            cmd.arg(format!("{flag}={value}"));
        }
    }
    for (k, v) in service["environment"].as_object().into_iter().flatten() {
        cmd.env(k, v.as_str().unwrap_or_default());
    }
    cmd.env("QUORATE_LOG", "warn");
    cmd
}

/// As the admin whose files are in `dir`: a key by DKG through the first coordinator,
/// then a signature through the second (it learns the key from the store, which it
/// reloads periodically, and signs from pools of its own), verified by aws-lc-rs.
async fn create_here_sign_there(coordinators: &[SocketAddr], dir: &Path, domain: &str) {
    let admin = Identity::from_pem_files(
        dir.join("client-admin.pem"),
        dir.join("client-admin-key.pem"),
    )
    .unwrap();
    let trust = Trust::from_pem_file(dir.join("ca.pem"), domain).unwrap();
    let mut clients = Vec::new();
    for addr in coordinators {
        let channel = transport::connect(
            *addr,
            &Role::Coordinator,
            domain,
            tls::client_config(&admin, &trust).unwrap(),
        )
        .await
        .unwrap();
        clients.push(KeyServiceClient::new(channel));
    }
    let key = clients[0]
        .create_key(api::CreateKeyRequest {
            name: "deploy-pg".into(),
            purpose: api::Purpose::Sign as i32,
            token_rules: None,
            profile: api::KeyProfile::Raw as i32,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((key.n, key.t), (3, 1));
    let msg = b"signed through the second coordinator";
    let deadline = Instant::now() + Duration::from_secs(120);
    let sig = loop {
        let r = clients[1]
            .sign(api::SignRequest {
                name: "deploy-pg".into(),
                input: Some(api::sign_request::Input::Message(msg.to_vec())),
                format: api::SignatureFormat::Raw as i32,
            })
            .await;
        match r {
            Ok(r) => break r.into_inner().signature,
            Err(e) if Instant::now() < deadline => {
                eprintln!("the second coordinator cannot sign yet: {}", e.message());
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => panic!("the second coordinator did not sign within 120 s: {e}"),
        }
    };
    let public = quorate_crypto::Point::from_bytes(&key.public_key).unwrap();
    UnparsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, public.to_uncompressed())
        .verify(msg, &sig)
        .expect("aws-lc-rs rejects the signature made through the second coordinator");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compose_postgres_runs_two_coordinators_over_one_store() {
    if !is_root() {
        eprintln!("SKIPPED: init-secrets chowns the files to the containers' users: needs root");
        return;
    }
    let Some(python) = python_with_yaml() else {
        eprintln!("SKIPPED: no Python with PyYAML (deploy/validate's virtualenv or python3)");
        return;
    };
    let Some(mut pg) = Postgres::start("deploy") else {
        return;
    };

    // The script, in a copy of deploy/compose (it writes secrets/ and ca-offline/ there).
    let work = TempDir::new("deploy-pg");
    let compose_dir = work.0.join("compose");
    std::fs::create_dir_all(&compose_dir).unwrap();
    for f in ["init-secrets", "compose.postgres.yaml", "node-ceiling.json"] {
        std::fs::copy(deploy().join("compose").join(f), compose_dir.join(f)).unwrap();
    }
    let out = Command::new(compose_dir.join("init-secrets"))
        .arg("--postgres")
        .env("QUORATE", binary("quorate"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "init-secrets --postgres: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let secrets = compose_dir.join("secrets");
    // The store URL (with the password) is only in store.env, mode 0400.
    let store_env = std::fs::read_to_string(secrets.join("store.env")).unwrap();
    let password = std::fs::read_to_string(secrets.join("db-password")).unwrap();
    assert!(
        store_env.starts_with("QUORATE_COORDINATOR_STORE=postgres://quorate:")
            && store_env.contains(&format!(":{password}@db:5432/quorate?sslmode=verify-full")),
        "{store_env}"
    );
    {
        use std::os::unix::fs::PermissionsExt as _;
        for f in [
            "store.env",
            "db-password",
            "db-key.pem",
            "coordinator-2-key.pem",
        ] {
            let mode = std::fs::metadata(secrets.join(f))
                .unwrap()
                .permissions()
                .mode()
                & 0o777;
            assert_eq!(mode, 0o400, "{f}");
        }
    }
    let compose = compose_json(&python, &compose_dir.join("compose.postgres.yaml"));
    let data = work.0.join("data");

    // The `db` service's TLS and password, on the test server; the URL of store.env.
    let read = |f: &str| std::fs::read_to_string(secrets.join(f)).unwrap();
    pg.listen_tls(
        &[],
        &read("db.pem"),
        &read("db-key.pem"),
        &read("db-ca.pem"),
        &password,
        "unused_cert_user",
    );
    pg.psql("CREATE DATABASE quorate");
    let store_url = format!(
        "{}&hostaddr=127.0.0.1&ssl_groups=X25519MLKEM768:P-256",
        store_env
            .trim()
            .strip_prefix("QUORATE_COORDINATOR_STORE=")
            .unwrap()
            .replace("@db:5432/", &format!("@db:{}/", pg.port))
            .replace(
                "sslrootcert=/run/secrets/db-ca.pem",
                &format!("sslrootcert={}", secrets.join("db-ca.pem").display())
            )
    );
    assert!(
        store_url.contains(&format!(
            "@db:{}/quorate?sslmode=verify-full&sslrootcert=/",
            pg.port
        )),
        "{store_url}"
    );

    // The migrate job, with the test server's URL (see the module docs).
    let mut migrate = command_of(&compose, "migrate", &compose_dir, &data, &BTreeMap::new());
    let out = migrate
        .env("QUORATE_COORDINATOR_STORE", &store_url)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "migrate: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    // The nodes, then both coordinators.
    let mut nodes: BTreeMap<String, SocketAddr> = BTreeMap::new();
    let mut procs: Vec<Proc> = Vec::new();
    for name in ["node-1", "node-2", "node-3"] {
        let p = spawn_ready(command_of(&compose, name, &compose_dir, &data, &nodes));
        let ip = compose["services"][name]["networks"]["quorate"]["ipv4_address"]
            .as_str()
            .unwrap()
            .to_owned();
        nodes.insert(ip, p.addr);
        procs.push(p);
    }
    let mut coordinators = Vec::new();
    for name in ["coordinator-1", "coordinator-2"] {
        let mut cmd = command_of(&compose, name, &compose_dir, &data, &nodes);
        cmd.env("QUORATE_COORDINATOR_STORE", &store_url).args([
            "--pool-low",
            "2",
            "--pool-high",
            "4",
            "--presign-batch",
            "4",
        ]);
        let p = spawn_ready(cmd);
        coordinators.push(p.addr);
        procs.push(p);
    }

    // Each coordinator presents its own certificate, both for the `coordinator` role.
    let trust = Trust::from_pem_file(secrets.join("ca.pem"), DOMAIN).unwrap();
    let id = Identity::from_pem_files(
        secrets.join("coordinator-2.pem"),
        secrets.join("coordinator-2-key.pem"),
    )
    .unwrap();
    assert_eq!(id.role(DOMAIN).unwrap(), Role::Coordinator);
    assert_eq!(
        trust.verify_peer_chain(id.cert_chain()).unwrap(),
        Role::Coordinator
    );
    assert_ne!(
        std::fs::read(secrets.join("coordinator.pem")).unwrap(),
        std::fs::read(secrets.join("coordinator-2.pem")).unwrap(),
        "the coordinators share a certificate"
    );

    create_here_sign_there(&coordinators, &secrets, DOMAIN).await;
    // From the server's side: every session of the coordinators is TLS 1.3.
    let sessions = pg.psql(
        "SELECT s.ssl, s.version FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) \
         WHERE a.datname = 'quorate' AND a.client_addr IS NOT NULL",
    );
    let lines: Vec<&str> = sessions.lines().collect();
    assert!(
        !lines.is_empty() && lines.iter().all(|l| *l == "t|TLSv1.3"),
        "{lines:?}"
    );
    drop(procs);
    drop(pg);
}

/// Every document of a multi-document YAML stream, as JSON.
fn yaml_docs(python: &Path, yaml: &[u8]) -> Vec<Value> {
    use std::io::Write as _;
    let mut child = Command::new(python)
        .args([
            "-c",
            "import json, sys, yaml; json.dump([d for d in yaml.safe_load_all(sys.stdin) if d], sys.stdout)",
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(yaml).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "PyYAML could not read the rendered overlay"
    );
    serde_json::from_slice::<Vec<Value>>(&out.stdout).unwrap()
}

fn object<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("the overlay renders no {kind} {name}"))
}

/// A container's environment as Kubernetes would set it: plain values with each text of
/// `expand` (e.g. `$(QUORATE_NODE_1_SERVICE_HOST):7101`) replaced by its value, ConfigMap
/// keys, and Secret keys from `secrets`.
fn container_env(
    docs: &[Value],
    container: &Value,
    expand: &BTreeMap<String, String>,
    secrets: &BTreeMap<(&str, &str), String>,
) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for e in container["env"].as_array().into_iter().flatten() {
        let name = e["name"].as_str().unwrap().to_owned();
        let value = if let Some(v) = e["value"].as_str() {
            let mut v = v.to_owned();
            for (text, val) in expand {
                v = v.replace(text, val);
            }
            v
        } else if let Some(r) = e["valueFrom"]["configMapKeyRef"].as_object() {
            let cm = object(docs, "ConfigMap", r["name"].as_str().unwrap());
            cm["data"][r["key"].as_str().unwrap()]
                .as_str()
                .unwrap()
                .to_owned()
        } else if let Some(r) = e["valueFrom"]["secretKeyRef"].as_object() {
            let key = (r["name"].as_str().unwrap(), r["key"].as_str().unwrap());
            secrets
                .get(&key)
                .unwrap_or_else(|| panic!("{name}: no Secret key {key:?} in this test"))
                .clone()
        } else {
            continue; // fieldRef (POD_NAME) is set by the caller
        };
        out.push((name, value));
    }
    out
}

/// `deploy/k8s/overlays/n3-t1-postgres`, rendered by `kubectl kustomize`, run as
/// processes: the `quorate-migrate` Job's container, then both replicas of the
/// coordinator StatefulSet, each first through its init container's script (with
/// `POD_NAME` set, `/secret` and `/run/quorate/identity` as directories here), then its
/// container's command, arguments and environment (ConfigMap and Secret keys resolved,
/// `$(QUORATE_NODE_<I>_SERVICE_HOST)` as the nodes' addresses, listeners on loopback).
/// The Secret `quorate-store`'s `url` is the local PostgreSQL's Unix socket (module docs).
/// Nodes are plain processes here.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn k8s_postgres_overlay_runs_two_coordinators_over_one_store() {
    let Some(python) = python_with_yaml() else {
        eprintln!("SKIPPED: no Python with PyYAML (deploy/validate's virtualenv or python3)");
        return;
    };
    let rendered = match Command::new("kubectl")
        .arg("kustomize")
        .arg(deploy().join("k8s/overlays/n3-t1-postgres"))
        .output()
    {
        Ok(o) if o.status.success() => o.stdout,
        Ok(o) => panic!("kubectl kustomize: {}", String::from_utf8_lossy(&o.stderr)),
        Err(e) => {
            assert!(
                std::env::var_os("CI").is_none(),
                "kubectl not found ({e}); CI needs it for deploy/validate too"
            );
            eprintln!("SKIPPED: kubectl not found ({e})");
            return;
        }
    };
    let docs = yaml_docs(&python, &rendered);
    let Some(pg) = Postgres::start("deploy-k8s") else {
        return;
    };
    let domain = object(&docs, "ConfigMap", "quorate-cluster")["data"]["domain"]
        .as_str()
        .unwrap()
        .to_owned();

    // What the operators would put into the Secrets: a cluster made here, and a second
    // coordinator certificate of its own (same role, same name coordinator.<domain>).
    let work = TempDir::new("deploy-k8s");
    let files = work.0.join("files");
    quorate_proto::pki::write_cluster(&files, &domain, 3, false).unwrap();
    let ca = quorate_proto::pki::ClusterCa::from_pem(
        &std::fs::read_to_string(files.join("ca.pem")).unwrap(),
        &std::fs::read_to_string(files.join("ca-key.pem")).unwrap(),
        &domain,
    )
    .unwrap();
    let second = ca.issue(&Role::Coordinator).unwrap();
    let secret_dir = work.0.join("secret-quorate-coordinator");
    std::fs::create_dir_all(&secret_dir).unwrap();
    for (to, from) in [
        ("coordinator-0.pem", "coordinator.pem"),
        ("coordinator-0-key.pem", "coordinator-key.pem"),
        ("ca.pem", "ca.pem"),
        ("metadata.pem", "metadata.pem"),
        ("metadata-key.pem", "metadata-key.pem"),
    ] {
        std::fs::copy(files.join(from), secret_dir.join(to)).unwrap();
    }
    std::fs::write(secret_dir.join("coordinator-1.pem"), &second.cert_pem).unwrap();
    std::fs::write(
        secret_dir.join("coordinator-1-key.pem"),
        second.key_pem.as_bytes(),
    )
    .unwrap();
    let url = pg.url();
    let secrets = BTreeMap::from([(("quorate-store", "url"), url.clone())]);

    // The migrate Job.
    let job = &object(&docs, "Job", "quorate-migrate")["spec"]["template"]["spec"]["containers"][0];
    let argv: Vec<&str> = job["command"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    let out = Command::new(binary(argv[0]))
        .args(&argv[1..])
        .envs(container_env(&docs, job, &BTreeMap::new(), &secrets))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "the migrate Job: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Three nodes.
    let mut procs: Vec<Proc> = Vec::new();
    let mut services = BTreeMap::new();
    for i in 1..=3u16 {
        let mut cmd = Command::new(binary("quorate-node"));
        cmd.args(["--listen", "127.0.0.1:0", "--domain", &domain])
            .arg("--data-dir")
            .arg(work.0.join(format!("node-{i}")))
            .arg("--cert")
            .arg(files.join(format!("node-{i}.pem")))
            .arg("--key")
            .arg(files.join(format!("node-{i}-key.pem")))
            .arg("--ca")
            .arg(files.join("ca.pem"))
            .arg("--init-kek")
            .env("QUORATE_LOG", "warn");
        let p = spawn_ready(cmd);
        // The node Service's address and port become the node's own.
        services.insert(
            format!("$(QUORATE_NODE_{i}_SERVICE_HOST):7101"),
            p.addr.to_string(),
        );
        procs.push(p);
    }

    // Both replicas of the coordinator StatefulSet.
    let sts = object(&docs, "StatefulSet", "quorate-coordinator");
    let replicas = sts["spec"]["replicas"].as_u64().unwrap();
    assert_eq!(replicas, 2);
    let pod = &sts["spec"]["template"]["spec"];
    let init = &pod["initContainers"][0];
    let container = &pod["containers"][0];
    let mut coordinators = Vec::new();
    for ordinal in 0..replicas {
        let identity = work.0.join(format!("identity-{ordinal}"));
        std::fs::create_dir_all(&identity).unwrap();
        let argv: Vec<String> = init["command"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| {
                a.as_str()
                    .unwrap()
                    .replace("/secret/", &format!("{}/", secret_dir.display()))
                    .replace("/run/quorate/identity", &identity.display().to_string())
            })
            .collect();
        let out = Command::new(&argv[0])
            .args(&argv[1..])
            .env("POD_NAME", format!("quorate-coordinator-{ordinal}"))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "init container of replica {ordinal}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut cmd = Command::new(binary(container["command"][0].as_str().unwrap()));
        for a in container["args"].as_array().unwrap() {
            let a = a.as_str().unwrap();
            let (flag, value) = a.split_once('=').unwrap_or((a, ""));
            let value = match flag {
                "--listen" | "--metrics-listen" => "127.0.0.1:0".to_owned(),
                "--http-listen" => format!("127.0.0.1:{}", quorate_tests::free_port()),
                _ => value.replace("/run/quorate/identity", &identity.display().to_string()),
            };
            cmd.arg(format!("{flag}={value}"));
        }
        cmd.envs(container_env(&docs, container, &services, &secrets))
            .env("QUORATE_LOG", "warn")
            .args([
                "--pool-low",
                "2",
                "--pool-high",
                "4",
                "--presign-batch",
                "4",
            ]);
        let p = spawn_ready(cmd);
        coordinators.push(p.addr);
        procs.push(p);
    }
    // Each replica installed its own pair.
    assert!(
        std::fs::read_to_string(work.0.join("identity-0/coordinator.pem")).unwrap()
            != std::fs::read_to_string(work.0.join("identity-1/coordinator.pem")).unwrap(),
        "both replicas installed the same coordinator certificate"
    );
    create_here_sign_there(&coordinators, &files, &domain).await;
    drop(procs);
    drop(pg);
}
