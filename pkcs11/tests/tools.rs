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

/// The module as `cargo test` built it: `target/<profile>/deps/libquorate_pkcs11.so`,
/// beside this test's executable (cargo copies a cdylib up to `target/<profile>/` only
/// for `cargo build`, so the copy there may be stale).
fn module_path() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let p = exe.parent().unwrap().join("libquorate_pkcs11.so");
    assert!(
        p.is_file(),
        "{} not found: run the tests with `cargo test -p quorate-pkcs11`",
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
        self.run_with(program, args, &[])
    }

    /// [`Fixture::run`] with extra environment variables.
    fn run_with(&self, program: &str, args: &[&str], env: &[(&str, &Path)]) -> Output {
        let d = &self.cluster.dir.0;
        let out = Command::new(program)
            .args(args)
            .env("QUORATE_ADDR", self.cluster.coordinator_addr.to_string())
            .env("QUORATE_CACERT", d.join("ca.pem"))
            .env("QUORATE_CERT", d.join("client-admin.pem"))
            .env("QUORATE_KEY", d.join("client-admin-key.pem"))
            .env("QUORATE_DOMAIN", DOMAIN)
            .env_remove("QUORATE_PKCS11_CONFIG")
            .envs(env.iter().copied())
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
    /// Checks with `openssl pkeyutl -verify` that `sig` (DER) signs the digest in the
    /// file `digest` under the public key in `pem`.
    fn verify_digest_signature(&self, pem: &Path, digest: &Path, sig: &Path) {
        let verified = self.ok(
            "openssl",
            &[
                "pkeyutl",
                "-verify",
                "-pubin",
                "-inkey",
                s(pem),
                "-in",
                s(digest),
                "-sigfile",
                s(sig),
            ],
        );
        assert!(
            verified.contains("Signature Verified Successfully"),
            "{verified}"
        );
    }

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
    f.verify_digest_signature(&cluster_pem, &digest, &sig);

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

    // CKM_ECDSA_SHA256 over a 200 kB message (the module hashes it), verified by
    // `openssl dgst`.
    let big = f.path("big.bin");
    let text: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    std::fs::write(&big, &text).unwrap();
    let sig = f.path("ecdsa-sha256.der");
    f.ok(
        "pkcs11-tool",
        &[
            "--module",
            module,
            "--sign",
            "--mechanism",
            "ECDSA-SHA256",
            "--label",
            RAW,
            "--signature-format",
            "openssl",
            "--input-file",
            s(&big),
            "--output-file",
            s(&sig),
        ],
    );
    let verified = f.ok(
        "openssl",
        &[
            "dgst",
            "-sha256",
            "-verify",
            s(&cluster_pem),
            "-signature",
            s(&sig),
            s(&big),
        ],
    );
    assert!(verified.contains("Verified OK"), "{verified}");

    // A refusal is a CKR_* code for the tool and a reason in the log: 65 bytes are no
    // digest.
    let long = f.path("long.bin");
    std::fs::write(&long, [7u8; 65]).unwrap();
    let out = f.run(
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
            s(&long),
            "--output-file",
            s(&f.path("no.sig")),
        ],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("CKR_DATA_LEN_RANGE"), "{stderr}");
    assert!(
        stderr.contains("CKM_ECDSA takes a digest of 1 to 64 bytes"),
        "{stderr}"
    );

    // QUORATE_PKCS11_CONFIG: one slot per entry (here two labels for the one cluster),
    // relative paths against the file's directory; signing picks the token by label.
    let d = &f.cluster.dir.0;
    let config = d.join("pkcs11.json");
    std::fs::write(
        &config,
        serde_json::json!({"slots": [
            {"label": "prod", "addr": f.cluster.coordinator_addr.to_string(),
             "cacert": "ca.pem", "cert": "client-admin.pem", "key": "client-admin-key.pem",
             "domain": DOMAIN},
            {"label": "staging", "addr": f.cluster.coordinator_addr.to_string(),
             "cacert": "ca.pem", "cert": "client-admin.pem", "key": "client-admin-key.pem",
             "domain": DOMAIN},
        ]})
        .to_string(),
    )
    .unwrap();
    let env = [("QUORATE_PKCS11_CONFIG", config.as_path())];
    let out = f.run_with(
        "pkcs11-tool",
        &["--module", module, "--list-token-slots"],
        &env,
    );
    let slots = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    assert!(slots.contains("token label        : prod"), "{slots}");
    assert!(slots.contains("token label        : staging"), "{slots}");
    let sig = f.path("staging.der");
    let out = f.run_with(
        "pkcs11-tool",
        &[
            "--module",
            module,
            "--token-label",
            "staging",
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
        &env,
    );
    assert!(out.status.success());
    f.verify_digest_signature(&cluster_pem, &digest, &sig);
}

/// The directory OpenSSL loads engines from (`openssl version -e`).
fn engines_dir() -> Option<PathBuf> {
    let out = Command::new("openssl")
        .args(["version", "-e"])
        .output()
        .ok()?;
    let text = String::from_utf8(out.stdout).ok()?;
    let dir = text.split('"').nth(1)?;
    Some(PathBuf::from(dir))
}

/// OpenSSL signs through the `pkcs11` engine of `libengine-pkcs11-openssl` (libp11),
/// naming the key with an RFC 7512 `pkcs11:` URI, and verifies the signature with the
/// cluster's public key; OpenSSH's `ssh-keygen -D` prints the same key as an SSH
/// public key.
#[test]
fn openssl_engine_signs_and_ssh_keygen_prints_the_key() {
    let engine = engines_dir().map(|d| d.join("pkcs11.so"));
    let Some(engine) = engine.filter(|e| e.is_file()) else {
        return unavailable(
            "the OpenSSL pkcs11 engine (Debian package libengine-pkcs11-openssl) is not installed",
        )
        .unwrap_or(());
    };
    if !have("ssh-keygen") {
        return unavailable("`ssh-keygen` (Debian package openssh-client) is not on PATH")
            .unwrap_or(());
    }
    let f = Fixture::start("p11-ossl");
    let module = module_path();
    let cluster_pem = f.public_pem();

    // An OpenSSL configuration that loads the engine with this module.
    let conf = f.path("openssl.cnf");
    std::fs::write(
        &conf,
        format!(
            "openssl_conf = openssl_init\n\
             [openssl_init]\nengines = engine_section\n\
             [engine_section]\npkcs11 = pkcs11_section\n\
             [pkcs11_section]\nengine_id = pkcs11\ndynamic_path = {}\nMODULE_PATH = {}\ninit = 0\n",
            engine.display(),
            module.display()
        ),
    )
    .unwrap();
    let msg = f.path("msg.txt");
    std::fs::write(&msg, b"signed by OpenSSL through libquorate_pkcs11.so\n").unwrap();
    let digest = f.path("msg.sha256");
    f.ok(
        "openssl",
        &["dgst", "-sha256", "-binary", "-out", s(&digest), s(&msg)],
    );
    let sig = f.path("engine.der");
    let uri = format!("pkcs11:token=quorate;object={RAW};type=private");
    let out = Command::new("openssl")
        .args([
            "pkeyutl",
            "-engine",
            "pkcs11",
            "-keyform",
            "engine",
            "-inkey",
            &uri,
            "-sign",
            "-in",
            s(&digest),
            "-out",
            s(&sig),
        ])
        .env("OPENSSL_CONF", &conf)
        .env("QUORATE_ADDR", f.cluster.coordinator_addr.to_string())
        .env("QUORATE_CACERT", f.cluster.dir.0.join("ca.pem"))
        .env("QUORATE_CERT", f.cluster.dir.0.join("client-admin.pem"))
        .env("QUORATE_KEY", f.cluster.dir.0.join("client-admin-key.pem"))
        .env("QUORATE_DOMAIN", DOMAIN)
        .output()
        .unwrap();
    eprintln!(
        "$ openssl pkeyutl -engine pkcs11 -inkey {uri} -sign: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "the engine did not sign (output above)"
    );
    f.verify_digest_signature(&cluster_pem, &digest, &sig);

    // ssh-keygen -D: the key as OpenSSH sees it, compared with the cluster's public key
    // converted by ssh-keygen itself.
    let listed = f.ok("ssh-keygen", &["-D", s(&module)]);
    let expected = f.ok("ssh-keygen", &["-i", "-m", "PKCS8", "-f", s(&cluster_pem)]);
    let blob = |line: &str| -> String {
        let mut words = line.split_whitespace();
        assert_eq!(words.next(), Some("ecdsa-sha2-nistp256"), "{line}");
        words.next().unwrap().to_owned()
    };
    let want = blob(expected.lines().next().unwrap());
    let keys: Vec<String> = listed
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(blob)
        .collect();
    assert_eq!(keys, vec![want], "ssh-keygen -D lists exactly the raw key");
}

/// The workspace's `target/` directory (where `.ci/run` makes `pkcs11-venv`).
fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    exe.ancestors().nth(3).unwrap().to_path_buf()
}

/// `python-pkcs11` signs from 8 threads at once, each with a session of its own over the
/// slot's one connection; every signature verifies (aws-lc-rs) under the key whose
/// `CKA_EC_POINT` Python read, which is the cluster's.
#[test]
fn python_pkcs11_signs_from_eight_threads_at_once() {
    const THREADS: usize = 8;
    const PER_THREAD: usize = 4;
    let python = target_dir().join("pkcs11-venv/bin/python");
    let has_lib = python.is_file()
        && Command::new(&python)
            .args(["-c", "import pkcs11"])
            .status()
            .is_ok_and(|s| s.success());
    if !has_lib {
        return unavailable(&format!(
            "python-pkcs11 is not installed in {} (python3 -m venv target/pkcs11-venv && \
             target/pkcs11-venv/bin/pip install -r pkcs11/tests/python/requirements.txt)",
            python.display()
        ))
        .unwrap_or(());
    }
    let f = Fixture::start("p11-py");
    let module = module_path();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/sign_threads.py");
    let out = f.ok(
        s(&python),
        &[
            s(&script),
            s(&module),
            "quorate",
            RAW,
            &THREADS.to_string(),
            &PER_THREAD.to_string(),
        ],
    );
    let report: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(report["errors"], serde_json::json!([]), "{report}");
    let ec_point = hex::decode(report["ec_point"].as_str().unwrap()).unwrap();
    assert_eq!(
        &ec_point[..2],
        &[0x04, 0x41],
        "a DER OCTET STRING of 65 bytes"
    );
    assert_eq!(
        &ec_point[2..],
        &f.point[..],
        "Python reads the cluster's public key"
    );

    use aws_lc_rs::signature::{ECDSA_P256_SHA256_FIXED, UnparsedPublicKey};
    let key = UnparsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, &ec_point[2..]);
    let signatures = report["signatures"].as_array().unwrap();
    assert_eq!(signatures.len(), THREADS * PER_THREAD);
    let mut messages = std::collections::BTreeSet::new();
    for entry in signatures {
        let message = hex::decode(entry["message"].as_str().unwrap()).unwrap();
        let signature = hex::decode(entry["signature"].as_str().unwrap()).unwrap();
        assert_eq!(signature.len(), 64);
        key.verify(&message, &signature).unwrap_or_else(|_| {
            panic!(
                "invalid signature on {:?}",
                String::from_utf8_lossy(&message)
            )
        });
        messages.insert(message);
    }
    assert_eq!(
        messages.len(),
        THREADS * PER_THREAD,
        "every message signed once"
    );
}

/// Calls a function of the module's list. Each call site passes pointers to live locals
/// of the sizes it gives, or NULL where the standard allows it.
macro_rules! call {
    ($f:ident . $name:ident ( $($arg:expr),* )) => {{
        let function = $f.$name.unwrap();
        // SAFETY: the arguments are valid for `function`, as each call site says.
        unsafe { function($($arg),*) }
    }};
}

/// The C ABI in this process against the real cluster: finding the key by class and
/// label, attribute size queries, the two-call signature length, single- and
/// multi-part signing, and the codes for misuse and for a cluster that stopped
/// answering.
#[test]
fn the_c_abi_signs_through_the_cluster() {
    use quorate_pkcs11::cryptoki_sys::*;
    use std::ptr::null_mut;

    let mut f = Fixture::start("p11-abi");
    let slot = quorate_pkcs11::config::SlotConfig {
        label: "abi".into(),
        client: ClientConfig::admin(&f.cluster.dir.0, f.cluster.coordinator_addr, DOMAIN),
    };
    assert_eq!(quorate_pkcs11::initialize_with(vec![slot]), CKR_OK);
    let mut list: *mut CK_FUNCTION_LIST = null_mut();
    // SAFETY: `list` is a valid place for the pointer.
    let rv = unsafe { quorate_pkcs11::C_GetFunctionList(&mut list) };
    assert_eq!(rv, CKR_OK);
    // SAFETY: the module set it to its static function list.
    let fl = unsafe { &*list };

    let mut h: CK_SESSION_HANDLE = 0;
    // Valid: `h` is an output.
    assert_eq!(
        call!(fl.C_OpenSession(0, CKF_SERIAL_SESSION, null_mut(), None, &mut h)),
        CKR_OK
    );

    let find = |class: CK_OBJECT_CLASS| -> Vec<CK_OBJECT_HANDLE> {
        let mut class = class;
        let mut label = RAW.as_bytes().to_vec();
        let mut template = [
            CK_ATTRIBUTE {
                type_: CKA_CLASS,
                pValue: (&raw mut class).cast(),
                ulValueLen: std::mem::size_of::<CK_OBJECT_CLASS>() as CK_ULONG,
            },
            CK_ATTRIBUTE {
                type_: CKA_LABEL,
                pValue: label.as_mut_ptr().cast(),
                ulValueLen: label.len() as CK_ULONG,
            },
        ];
        // Valid: a template of 2 attributes pointing at live locals.
        assert_eq!(
            call!(fl.C_FindObjectsInit(h, template.as_mut_ptr(), 2)),
            CKR_OK
        );
        let mut found = [0 as CK_OBJECT_HANDLE; 8];
        let mut n: CK_ULONG = 0;
        // Valid: room for 8 handles.
        assert_eq!(
            call!(fl.C_FindObjects(h, found.as_mut_ptr(), 8, &mut n)),
            CKR_OK
        );
        // Valid: a handle only.
        assert_eq!(call!(fl.C_FindObjectsFinal(h)), CKR_OK);
        found[..n as usize].to_vec()
    };
    let private = find(CKO_PRIVATE_KEY);
    let public = find(CKO_PUBLIC_KEY);
    assert_eq!(
        (private.len(), public.len()),
        (1, 1),
        "one object of each class"
    );
    let (private, public) = (private[0], public[0]);

    // Several attributes in one call: an invalid type in the middle is reported and the
    // others are still answered (§5.7).
    let mut id = [0u8; 64];
    let mut class: CK_OBJECT_CLASS = CK_UNAVAILABLE_INFORMATION;
    let mut attrs = [
        CK_ATTRIBUTE {
            type_: CKA_LABEL,
            pValue: null_mut(),
            ulValueLen: 0,
        },
        CK_ATTRIBUTE {
            type_: CKA_MODULUS,
            pValue: null_mut(),
            ulValueLen: 0,
        },
        CK_ATTRIBUTE {
            type_: CKA_CLASS,
            pValue: (&raw mut class).cast(),
            ulValueLen: std::mem::size_of::<CK_OBJECT_CLASS>() as CK_ULONG,
        },
        CK_ATTRIBUTE {
            type_: CKA_ID,
            pValue: id.as_mut_ptr().cast(),
            ulValueLen: id.len() as CK_ULONG,
        },
    ];
    // Valid: 4 attributes: a size query, an invalid type, and room for a class and 64 bytes.
    assert_eq!(
        call!(fl.C_GetAttributeValue(h, private, attrs.as_mut_ptr(), 4)),
        CKR_ATTRIBUTE_TYPE_INVALID
    );
    assert_eq!(attrs[0].ulValueLen, RAW.len() as CK_ULONG);
    assert_eq!(attrs[1].ulValueLen, CK_UNAVAILABLE_INFORMATION);
    assert_eq!(class, CKO_PRIVATE_KEY);
    let id_len = attrs[3].ulValueLen as usize;
    assert!(id_len > 0 && id_len < id.len(), "CKA_ID of {id_len} bytes");

    // Finding by CKA_ID and CKA_KEY_TYPE: both objects of the key; another key type: none.
    let find_by = |key_type: CK_KEY_TYPE, id: &mut [u8]| -> Vec<CK_OBJECT_HANDLE> {
        let mut key_type = key_type;
        let mut template = [
            CK_ATTRIBUTE {
                type_: CKA_KEY_TYPE,
                pValue: (&raw mut key_type).cast(),
                ulValueLen: std::mem::size_of::<CK_KEY_TYPE>() as CK_ULONG,
            },
            CK_ATTRIBUTE {
                type_: CKA_ID,
                pValue: id.as_mut_ptr().cast(),
                ulValueLen: id.len() as CK_ULONG,
            },
        ];
        // Valid: a template of 2 attributes pointing at live locals.
        assert_eq!(
            call!(fl.C_FindObjectsInit(h, template.as_mut_ptr(), 2)),
            CKR_OK
        );
        // Valid: an empty template; a search is active.
        assert_eq!(
            call!(fl.C_FindObjectsInit(h, null_mut(), 0)),
            CKR_OPERATION_ACTIVE
        );
        let mut found = [0 as CK_OBJECT_HANDLE; 8];
        let mut n: CK_ULONG = 0;
        // Valid: room for 8 handles.
        assert_eq!(
            call!(fl.C_FindObjects(h, found.as_mut_ptr(), 8, &mut n)),
            CKR_OK
        );
        // Valid: a handle only.
        assert_eq!(call!(fl.C_FindObjectsFinal(h)), CKR_OK);
        let mut found = found[..n as usize].to_vec();
        found.sort_unstable();
        found
    };
    let mut both = vec![private, public];
    both.sort_unstable();
    assert_eq!(find_by(CKK_EC, &mut id[..id_len]), both);
    assert!(find_by(CKK_RSA, &mut id[..id_len]).is_empty());
    let mut other_id = id[..id_len].to_vec();
    other_id[0] ^= 1;
    assert!(find_by(CKK_EC, &mut other_id).is_empty());

    // CKA_EC_POINT: size query, short buffer, value; CKA_VALUE is sensitive.
    let mut point = [0u8; 80];
    let mut attrs = [
        CK_ATTRIBUTE {
            type_: CKA_EC_POINT,
            pValue: null_mut(),
            ulValueLen: 0,
        },
        CK_ATTRIBUTE {
            type_: CKA_VALUE,
            pValue: null_mut(),
            ulValueLen: 0,
        },
    ];
    // Valid: 2 attributes with NULL values (size queries).
    assert_eq!(
        call!(fl.C_GetAttributeValue(h, private, attrs.as_mut_ptr(), 2)),
        CKR_ATTRIBUTE_SENSITIVE
    );
    assert_eq!(attrs[0].ulValueLen, 67);
    assert_eq!(attrs[1].ulValueLen, CK_UNAVAILABLE_INFORMATION);
    attrs[0].pValue = point.as_mut_ptr().cast();
    attrs[0].ulValueLen = 10;
    // Valid: `point` has room for the 10 bytes given.
    assert_eq!(
        call!(fl.C_GetAttributeValue(h, public, attrs.as_mut_ptr(), 1)),
        CKR_BUFFER_TOO_SMALL
    );
    assert_eq!(attrs[0].ulValueLen, CK_UNAVAILABLE_INFORMATION);
    attrs[0].ulValueLen = 80;
    // Valid: `point` has room for 80 bytes.
    assert_eq!(
        call!(fl.C_GetAttributeValue(h, public, attrs.as_mut_ptr(), 1)),
        CKR_OK
    );
    assert_eq!(attrs[0].ulValueLen, 67);
    assert_eq!(&point[..3], &[0x04, 0x41, 0x04]);
    assert_eq!(&point[2..67], &f.point[..]);

    use aws_lc_rs::signature::{ECDSA_P256_SHA256_FIXED, UnparsedPublicKey};
    let verify = |msg: &[u8], sig: &[u8]| {
        UnparsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, &f.point)
            .verify(msg, sig)
            .expect("aws-lc-rs rejects the module's signature");
    };
    let mut ecdsa = CK_MECHANISM {
        mechanism: CKM_ECDSA,
        pParameter: null_mut(),
        ulParameterLen: 0,
    };
    let mut ecdsa_sha256 = CK_MECHANISM {
        mechanism: CKM_ECDSA_SHA256,
        ..ecdsa
    };

    // A public key does not sign.
    // Valid: `ecdsa` is a mechanism without parameter.
    assert_eq!(
        call!(fl.C_SignInit(h, &mut ecdsa, public)),
        CKR_KEY_FUNCTION_NOT_PERMITTED
    );

    // CKM_ECDSA: the length by a NULL buffer, then a short buffer, then the signature.
    let msg = b"one digest, three calls";
    let mut digest: [u8; 32] = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, msg)
        .as_ref()
        .try_into()
        .unwrap();
    let mut sig = [0u8; 72];
    let mut len: CK_ULONG = 0;
    // Valid: `ecdsa` is a mechanism without parameter.
    assert_eq!(call!(fl.C_SignInit(h, &mut ecdsa, private)), CKR_OK);
    // Valid: as above; an operation is active, and stays so.
    assert_eq!(
        call!(fl.C_SignInit(h, &mut ecdsa_sha256, private)),
        CKR_OPERATION_ACTIVE
    );
    // Valid: 32 digest bytes; NULL signature asks for the length.
    assert_eq!(
        call!(fl.C_Sign(h, digest.as_mut_ptr(), 32, null_mut(), &mut len)),
        CKR_OK
    );
    assert_eq!(len, 64);
    len = 10;
    // Valid: `sig` has room for the 10 bytes given.
    assert_eq!(
        call!(fl.C_Sign(h, digest.as_mut_ptr(), 32, sig.as_mut_ptr(), &mut len)),
        CKR_BUFFER_TOO_SMALL
    );
    assert_eq!(len, 64, "the needed length is set");
    len = 72;
    // Valid: `sig` has room for 72 bytes; the operation is still active.
    assert_eq!(
        call!(fl.C_Sign(h, digest.as_mut_ptr(), 32, sig.as_mut_ptr(), &mut len)),
        CKR_OK
    );
    assert_eq!(len, 64);
    verify(msg, &sig[..64]);
    // Valid: the operation ended with the signature.
    assert_eq!(
        call!(fl.C_Sign(h, digest.as_mut_ptr(), 32, sig.as_mut_ptr(), &mut len)),
        CKR_OPERATION_NOT_INITIALIZED
    );

    // CKM_ECDSA_SHA256 in three parts.
    let parts: [&[u8]; 3] = [b"a message ", b"in three ", b"parts"];
    // Valid: a mechanism without parameter.
    assert_eq!(call!(fl.C_SignInit(h, &mut ecdsa_sha256, private)), CKR_OK);
    for part in parts {
        let mut part = part.to_vec();
        // Valid: `part` holds its length.
        assert_eq!(
            call!(fl.C_SignUpdate(h, part.as_mut_ptr(), part.len() as CK_ULONG)),
            CKR_OK
        );
    }
    len = 0;
    // Valid: NULL signature asks for the length.
    assert_eq!(call!(fl.C_SignFinal(h, null_mut(), &mut len)), CKR_OK);
    assert_eq!(len, 64);
    // Valid: `sig` has room for 64 bytes.
    assert_eq!(call!(fl.C_SignFinal(h, sig.as_mut_ptr(), &mut len)), CKR_OK);
    verify(&parts.concat(), &sig[..64]);

    // CKM_ECDSA_SHA256 in one part.
    let mut whole = parts.concat();
    // Valid: a mechanism without parameter.
    assert_eq!(call!(fl.C_SignInit(h, &mut ecdsa_sha256, private)), CKR_OK);
    len = 64;
    // Valid: `whole` holds its length; `sig` has room for 64 bytes.
    assert_eq!(
        call!(fl.C_Sign(
            h,
            whole.as_mut_ptr(),
            whole.len() as CK_ULONG,
            sig.as_mut_ptr(),
            &mut len
        )),
        CKR_OK
    );
    verify(&whole, &sig[..64]);

    // CKM_ECDSA is single-part: C_SignUpdate fails and ends the operation.
    // Valid: a mechanism without parameter.
    assert_eq!(call!(fl.C_SignInit(h, &mut ecdsa, private)), CKR_OK);
    // Valid: 32 digest bytes.
    assert_eq!(
        call!(fl.C_SignUpdate(h, digest.as_mut_ptr(), 32)),
        CKR_FUNCTION_NOT_SUPPORTED
    );
    // Valid: as above.
    assert_eq!(
        call!(fl.C_Sign(h, digest.as_mut_ptr(), 32, sig.as_mut_ptr(), &mut len)),
        CKR_OPERATION_NOT_INITIALIZED
    );

    // A digest of 65 bytes is out of range, and ends the operation.
    let mut long = [7u8; 65];
    // Valid: a mechanism without parameter.
    assert_eq!(call!(fl.C_SignInit(h, &mut ecdsa, private)), CKR_OK);
    len = 64;
    // Valid: `long` holds 65 bytes; `sig` has room for 64.
    assert_eq!(
        call!(fl.C_Sign(h, long.as_mut_ptr(), 65, sig.as_mut_ptr(), &mut len)),
        CKR_DATA_LEN_RANGE
    );
    // Valid: a mechanism without parameter; nothing is active any more.
    assert_eq!(call!(fl.C_SignInit(h, &mut ecdsa, private)), CKR_OK);
    // Valid: a handle only: C_Finalize is not the place to end it, C_Sign below is.
    assert_eq!(call!(fl.C_CloseSession(h)), CKR_OK);

    // An application that is itself async (a Rust service on tokio, as with the
    // `cryptoki` crate) calls the module from a task of its own runtime: the blocking
    // calls work there too, on both kinds of runtime.
    let current = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let multi = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    for (kind, rt) in [("current-thread", &current), ("multi-thread", &multi)] {
        let msg = format!("signed from a {kind} runtime's task");
        let sig = rt.block_on(async {
            let mut h: CK_SESSION_HANDLE = 0;
            // Valid: `h` is an output.
            assert_eq!(
                call!(fl.C_OpenSession(0, CKF_SERIAL_SESSION, null_mut(), None, &mut h)),
                CKR_OK
            );
            let mut class = CKO_PRIVATE_KEY;
            let mut template = [CK_ATTRIBUTE {
                type_: CKA_CLASS,
                pValue: (&raw mut class).cast(),
                ulValueLen: std::mem::size_of::<CK_OBJECT_CLASS>() as CK_ULONG,
            }];
            // Valid: a template of 1 attribute pointing at a live local.
            let rv = call!(fl.C_FindObjectsInit(h, template.as_mut_ptr(), 1));
            assert_eq!(rv, CKR_OK, "{kind}: C_FindObjectsInit: rv {rv:#x}");
            // Valid: a handle only.
            assert_eq!(call!(fl.C_FindObjectsFinal(h)), CKR_OK);
            let mut mech = CK_MECHANISM {
                mechanism: CKM_ECDSA_SHA256,
                pParameter: null_mut(),
                ulParameterLen: 0,
            };
            // Valid: a mechanism without parameter.
            assert_eq!(call!(fl.C_SignInit(h, &mut mech, private)), CKR_OK);
            let mut data = msg.clone().into_bytes();
            let mut sig = [0u8; 64];
            let mut len: CK_ULONG = 64;
            // Valid: `data` holds its length; `sig` has room for 64 bytes.
            let rv = call!(fl.C_Sign(
                h,
                data.as_mut_ptr(),
                data.len() as CK_ULONG,
                sig.as_mut_ptr(),
                &mut len
            ));
            assert_eq!(rv, CKR_OK, "{kind}: C_Sign: rv {rv:#x}");
            // Valid: a handle only.
            assert_eq!(call!(fl.C_CloseSession(h)), CKR_OK);
            sig
        });
        verify(msg.as_bytes(), &sig);
    }
    drop((current, multi));
    // Valid: `h` is an output.
    assert_eq!(
        call!(fl.C_OpenSession(0, CKF_SERIAL_SESSION, null_mut(), None, &mut h)),
        CKR_OK
    );
    // Valid: a mechanism without parameter.
    assert_eq!(call!(fl.C_SignInit(h, &mut ecdsa, private)), CKR_OK);

    // The cluster stops answering: a code, not a panic or a hang.
    if let Some(mut p) = f.cluster.coordinator.take() {
        p.kill();
    }
    len = 64;
    // Valid: 32 digest bytes; `sig` has room for 64.
    let rv = call!(fl.C_Sign(h, digest.as_mut_ptr(), 32, sig.as_mut_ptr(), &mut len));
    assert_eq!(rv, CKR_DEVICE_ERROR, "rv {rv:#x}");

    // Valid: a handle only.
    assert_eq!(call!(fl.C_CloseSession(h)), CKR_OK);
    // Valid: NULL is the required argument.
    assert_eq!(call!(fl.C_Finalize(null_mut())), CKR_OK);
}
