//! `libquorate_pkcs11.so` against a real cluster (node and coordinator processes, hybrid
//! post-quantum mutual TLS), driven by software Quorate did not write, run as its users
//! run it: OpenSC's `pkcs11-tool`, OpenSSL with `libengine-pkcs11-openssl`, OpenSSH's
//! `ssh-keygen -D`, and `python-pkcs11` from 8 threads. Every signature is checked by
//! `openssl` or aws-lc-rs against the cluster's public key.
//!
//! The module finds its cluster through the `QUORATE_*` variables set on each child
//! process. Where a tool is missing, a test fails if `CI` is set (`.ci/run` installs the
//! Debian packages and the virtualenv `target/pkcs11-venv`) and skips, saying so,
//! otherwise.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use quorate_client::{Client, ClientConfig, KeyProfile};
use quorate_tests::{DOMAIN, POOL_FLAGS, TempDir, TestCluster};

/// The `raw` key the tests sign with.
const RAW: &str = "p11-raw";
/// A token key: not an object of the token.
const TOKEN: &str = "p11-token";

/// The module as `cargo test` built it (`target/<profile>/libquorate_pkcs11.so`).
fn module_path() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let profile = exe.parent().and_then(Path::parent).unwrap();
    let p = profile.join("libquorate_pkcs11.so");
    assert!(
        p.is_file(),
        "{} not found: build it with `cargo build --release -p quorate-pkcs11`",
        p.display()
    );
    p
}

/// `None` (after saying why) where a tool is missing outside CI; a failure in CI.
fn unavailable<T>(what: &str) -> Option<T> {
    if std::env::var_os("CI").is_some_and(|v| !v.is_empty()) {
        panic!("{what}. CI is set, so this is a failure: .ci/run installs it before `cargo test`");
    }
    eprintln!("SKIPPED: {what}. Install it as .ci/run does (apt-get install {APT_PACKAGES})");
    None
}

const APT_PACKAGES: &str = "opensc libengine-pkcs11-openssl openssh-client";

/// Whether `program` runs at all.
fn have(program: &str) -> bool {
    Command::new(program)
        .arg("--help")
        .output()
        .is_ok_and(|_| true)
}

/// A cluster with a `raw` key (pools filled) and a token key, and the
/// environment that points the module at it.
struct Fixture {
    cluster: TestCluster,
    /// The raw key's public key, SPKI PEM, as the cluster gives it.
    spki_pem: String,
    /// The raw key's public point, SEC1 uncompressed.
    point: Vec<u8>,
    /// Scratch files.
    work: TempDir,
}

impl Fixture {
    fn start(label: &str) -> Self {
        let cluster = TestCluster::start(label, 3, 1, POOL_FLAGS);
        let rt = tokio::runtime::Runtime::new().unwrap();
        let (spki_pem, point) = rt.block_on(async {
            let config = ClientConfig::admin(&cluster.dir.0, cluster.coordinator_addr, DOMAIN);
            let client = Client::connect(&config).await.unwrap();
            client
                .create_key_with_profile(RAW, &KeyProfile::Raw)
                .await
                .unwrap();
            cluster.create_token_key(TOKEN, 600, 1).await;
            cluster.wait_pools(RAW, 4, Duration::from_secs(120)).await;
            let public = client.public_key(RAW).await.unwrap();
            (
                public.spki_pem,
                public.info.public_key.to_uncompressed().to_vec(),
            )
        });
        Fixture {
            cluster,
            spki_pem,
            point,
            work: TempDir::new(&format!("{label}-work")),
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.work.0.join(name)
    }

    /// `program args` with the module's `QUORATE_*` variables; its output is printed.
    fn run(&self, program: &str, args: &[&str]) -> Output {
        let d = &self.cluster.dir.0;
        let out = Command::new(program)
            .args(args)
            .env("QUORATE_ADDR", self.cluster.coordinator_addr.to_string())
            .env("QUORATE_CACERT", d.join("ca.pem"))
            .env("QUORATE_CERT", d.join("client-admin.pem"))
            .env("QUORATE_KEY", d.join("client-admin-key.pem"))
            .env("QUORATE_DOMAIN", DOMAIN)
            .env_remove("QUORATE_PKCS11_CONFIG")
            .output()
            .unwrap();
        eprintln!(
            "$ {program} {}\n{}\n{}{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    /// As [`Fixture::run`], asserting success; returns stdout.
    fn ok(&self, program: &str, args: &[&str]) -> String {
        let out = self.run(program, args);
        assert!(out.status.success(), "{program} failed (output above)");
        String::from_utf8(out.stdout).unwrap()
    }

    /// The raw key's public key as a PEM file.
    fn public_pem(&self) -> PathBuf {
        let p = self.path("cluster-pub.pem");
        std::fs::write(&p, &self.spki_pem).unwrap();
        p
    }
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// `pkcs11-tool` lists the raw key's two objects (and not the token key), reads
/// the public key the cluster reports, and signs with `ECDSA` (a SHA-256 digest) and
/// `ECDSA-SHA256` (a message); `openssl` verifies both signatures.
#[test]
fn pkcs11_tool_lists_and_signs_and_openssl_verifies() {
    if !have("pkcs11-tool") {
        return unavailable("`pkcs11-tool` (Debian package opensc) is not on PATH").unwrap_or(());
    }
    let f = Fixture::start("p11-tool");
    let module = module_path();
    let module = s(&module);

    let listed = f.ok("pkcs11-tool", &["--module", module, "--list-objects"]);
    assert!(listed.contains("Private Key Object; EC"), "{listed}");
    assert!(listed.contains("Public Key Object; EC"), "{listed}");
    assert!(listed.contains(&format!("label:      {RAW}")), "{listed}");
    assert!(listed.contains("sign"), "{listed}");
    assert!(
        !listed.contains(TOKEN),
        "a token key must not be an object: {listed}"
    );
    let slots = f.ok("pkcs11-tool", &["--module", module, "--list-token-slots"]);
    assert!(slots.contains("token label        : quorate"), "{slots}");
    assert!(!slots.contains("login required"), "{slots}");

    // The public key as pkcs11-tool builds it from CKA_EC_PARAMS and CKA_EC_POINT is the
    // cluster's.
    let pub_der = f.path("pub.der");
    f.ok(
        "pkcs11-tool",
        &[
            "--module",
            module,
            "--read-object",
            "--type",
            "pubkey",
            "--label",
            RAW,
            "-o",
            s(&pub_der),
        ],
    );
    let pub_pem = f.path("pub.pem");
    f.ok(
        "openssl",
        &[
            "pkey",
            "-pubin",
            "-inform",
            "DER",
            "-in",
            s(&pub_der),
            "-out",
            s(&pub_pem),
        ],
    );
    assert_eq!(
        std::fs::read_to_string(&pub_pem).unwrap().trim(),
        f.spki_pem.trim(),
        "the token's public key differs from the cluster's"
    );
    let cluster_pem = f.public_pem();

    // CKM_ECDSA over a SHA-256 digest made by openssl.
    let msg = f.path("msg.txt");
    std::fs::write(&msg, b"signed through PKCS#11 by a threshold key\n").unwrap();
    let digest = f.path("msg.sha256");
    f.ok(
        "openssl",
        &["dgst", "-sha256", "-binary", "-out", s(&digest), s(&msg)],
    );
    let sig = f.path("ecdsa.der");
    f.ok(
        "pkcs11-tool",
        &[
            "--module",
            module,
            "--sign",
            "--mechanism",
            "ECDSA",
            "--label",
            RAW,
            "--signature-format",
            "openssl",
            "--input-file",
            s(&digest),
            "--output-file",
            s(&sig),
        ],
    );
    let verified = f.ok(
        "openssl",
        &[
            "pkeyutl",
            "-verify",
            "-pubin",
            "-inkey",
            s(&cluster_pem),
            "-in",
            s(&digest),
            "-sigfile",
            s(&sig),
        ],
    );
    assert!(
        verified.contains("Signature Verified Successfully"),
        "{verified}"
    );

    // CKM_ECDSA without a format option: r || s, 64 bytes.
    let raw_sig = f.path("ecdsa.raw");
    f.ok(
        "pkcs11-tool",
        &[
            "--module",
            module,
            "--sign",
            "--mechanism",
            "ECDSA",
            "--label",
            RAW,
            "--input-file",
            s(&digest),
            "--output-file",
            s(&raw_sig),
        ],
    );
    let rs = std::fs::read(&raw_sig).unwrap();
    assert_eq!(rs.len(), 64);
    use aws_lc_rs::signature::{ECDSA_P256_SHA256_FIXED, UnparsedPublicKey};
    UnparsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, &f.point)
        .verify(&std::fs::read(&msg).unwrap(), &rs)
        .expect("aws-lc-rs rejects the r || s signature");
}
