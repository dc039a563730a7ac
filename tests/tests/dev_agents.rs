//! The README's agent walk-through, run as a user runs it: `quorate dev` as a process
//! (with `--agent-listen` and `--allow-classic-token-endpoints`), the `quorate` CLI with
//! the env file it writes, and Debian's `curl` at the token endpoint.
//!
//! - `quorate token issue --dpop-key` binds the token to the key `quorate dpop keygen`
//!   made: the printed thumbprint is the token's `cnf.jkt`; `token exchange` keeps it.
//! - `quorate dev svid` issues an X.509-SVID and `token issue --svid-cert/--svid-key`
//!   gets a token with it from the agent listener; the cluster's own client certificate
//!   is refused there, and the CLI says why.
//! - The README's `curl` token request, as Bearer and with a DPoP proof made by
//!   `quorate dpop proof`. Debian 12's curl links OpenSSL 3.0, which cannot negotiate
//!   X25519MLKEM768: that is why the cluster runs with `--allow-classic-token-endpoints`.
//!   Without `curl` the curl part fails if `CI` is set and is skipped (saying so)
//!   otherwise.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::collections::HashMap;
use std::io::{BufRead as _, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use quorate_tests::{TempDir, binary};
use serde_json::Value;

/// `quorate dev` as a child process; SIGTERM (then SIGKILL) on drop.
struct Dev {
    child: Child,
    env: HashMap<String, String>,
}

impl Drop for Dev {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        for _ in 0..200 {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `quorate dev --dir DIR` with `flags` and waits for its ready line; reads the
/// env file it names.
fn start_dev(dir: &Path, flags: &[&str]) -> Dev {
    let mut child = Command::new(binary("quorate"))
        .arg("dev")
        .arg("--dir")
        .arg(dir)
        .args(["--pool-target", "4"])
        .args(flags)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            eprintln!("[dev] {line}");
            if let Some(env) = line.strip_prefix("QUORATE_READY dev env=") {
                let _ = tx.send(PathBuf::from(env));
            }
        }
    });
    let env_file = rx
        .recv_timeout(Duration::from_secs(180))
        .expect("quorate dev did not report ready");
    let mut env = HashMap::new();
    for line in std::fs::read_to_string(env_file).unwrap().lines() {
        if let Some((k, v)) = line
            .strip_prefix("export ")
            .and_then(|kv| kv.split_once('='))
        {
            // The test directory has no characters that need quoting.
            env.insert(k.to_owned(), v.trim_matches('\'').to_owned());
        }
    }
    Dev { child, env }
}

/// Runs `quorate ARGS` in `cwd` with the dev env file's variables.
fn quorate(dev: &Dev, cwd: &Path, args: &[&str]) -> Output {
    let out = Command::new(binary("quorate"))
        .args(args)
        .current_dir(cwd)
        .envs(&dev.env)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    eprintln!(
        "$ quorate {}\n  exit {:?}\n  stderr: {}",
        args.join(" "),
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    out
}

fn stdout(out: &Output) -> String {
    assert!(
        out.status.success(),
        "failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone())
        .unwrap()
        .trim()
        .to_owned()
}

fn claims(token: &str) -> Value {
    serde_json::from_slice(
        &URL_SAFE_NO_PAD
            .decode(token.split('.').nth(1).expect("a JWT"))
            .unwrap(),
    )
    .unwrap()
}

/// Whether `curl` runs here; without it, fails under CI and skips (saying so) otherwise.
fn have_curl() -> bool {
    let ok = Command::new("curl")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        assert!(
            std::env::var_os("CI").is_none(),
            "curl is missing; .ci/run installs it"
        );
        eprintln!("SKIPPED the curl part: curl is not installed");
    }
    ok
}

#[test]
fn the_cli_binds_tokens_to_dpop_keys_and_agents_use_their_svids() {
    let tmp = TempDir::new("dev-agents");
    let dir = tmp.0.join("quorate-dev");
    let dev = start_dev(&dir, &["--agent-listen", "--allow-classic-token-endpoints"]);
    assert!(dev.env.contains_key("QUORATE_AGENT_ADDR"), "{:?}", dev.env);
    let cwd = &tmp.0;

    // A DPoP key, and a token bound to it.
    let jkt = stdout(&quorate(&dev, cwd, &["dpop", "keygen", "dpop.pem"]));
    assert_eq!(jkt.len(), 43, "a base64url SHA-256 thumbprint: {jkt}");
    let again = quorate(&dev, cwd, &["dpop", "keygen", "dpop.pem"]);
    assert_eq!(
        again.status.code(),
        Some(2),
        "an existing key is never replaced"
    );
    let dpop_mode = std::fs::metadata(cwd.join("dpop.pem")).unwrap();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&dpop_mode.permissions()) & 0o777,
        0o600
    );
    let att = stdout(&quorate(
        &dev,
        cwd,
        &["dev", "attest", "--agent", "triage-bot"],
    ));
    std::fs::write(cwd.join("agent.jwt"), &att).unwrap();
    let issued = quorate(
        &dev,
        cwd,
        &[
            "token",
            "issue",
            "--attestation",
            "agent.jwt",
            "--audience",
            "dev",
            "--scope",
            "tools:run",
            "--dpop-key",
            "dpop.pem",
        ],
    );
    let token = stdout(&issued);
    assert_eq!(claims(&token)["cnf"]["jkt"], jkt.as_str());
    assert!(
        String::from_utf8_lossy(&issued.stderr).contains(&format!("bound to DPoP key {jkt}")),
        "the CLI names the key the token is bound to"
    );
    std::fs::write(cwd.join("token.jwt"), &token).unwrap();

    // A delegated token stays bound to the same key (the proof must be by it).
    let sub_att = stdout(&quorate(
        &dev,
        cwd,
        &["dev", "attest", "--agent", "helper-bot"],
    ));
    std::fs::write(cwd.join("helper.jwt"), &sub_att).unwrap();
    let exchange = |key: &str| {
        quorate(
            &dev,
            cwd,
            &[
                "token",
                "exchange",
                "--subject-token",
                "token.jwt",
                "--actor-attestation",
                "helper.jwt",
                "--dpop-key",
                key,
            ],
        )
    };
    let delegated = stdout(&exchange("dpop.pem"));
    assert_eq!(claims(&delegated)["cnf"]["jkt"], jkt.as_str());
    // Another key cannot take over a bound token.
    stdout(&quorate(&dev, cwd, &["dpop", "keygen", "other.pem"]));
    let stolen = exchange("other.pem");
    assert_eq!(
        stolen.status.code(),
        Some(4),
        "a bound token needs its own key's proof"
    );

    // Bad key files are named, with what to do.
    let missing = quorate(
        &dev,
        cwd,
        &[
            "token",
            "issue",
            "--attestation",
            "agent.jwt",
            "--audience",
            "dev",
            "--dpop-key",
            "nope.pem",
        ],
    );
    assert_eq!(missing.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&missing.stderr).contains("quorate dpop keygen nope.pem"),
        "{}",
        String::from_utf8_lossy(&missing.stderr)
    );

    // An agent with an X.509-SVID gets its token on the agent listener.
    let flags = stdout(&quorate(&dev, cwd, &["dev", "svid", "--agent", "ci/job-1"]));
    let flags: Vec<&str> = flags.split_whitespace().collect();
    assert_eq!(flags.len(), 4, "{flags:?}");
    let mut args = vec!["token", "issue", "--audience", "dev"];
    args.extend(&flags);
    let svid_token = stdout(&quorate(&dev, cwd, &args));
    let c = claims(&svid_token);
    assert_eq!(c["sub"], "spiffe://agents.quorate.local/ci/job-1");
    assert_eq!(c["attestation"]["method"], "x509-svid");
    // The cluster's own client certificate is no SVID of the agents' trust domain: the
    // refusal says so rather than "transport error".
    let admin = quorate(
        &dev,
        cwd,
        &[
            "token",
            "issue",
            "--audience",
            "dev",
            "--svid-cert",
            &dev.env["QUORATE_CERT"],
            "--svid-key",
            &dev.env["QUORATE_KEY"],
        ],
    );
    assert_ne!(admin.status.code(), Some(0));
    let why = String::from_utf8_lossy(&admin.stderr);
    assert!(!why.contains("Unknown: transport error"), "{why}");
    assert!(why.contains("cluster's own trust domain"), "{why}");
    assert!(
        why.contains("quorate dev svid"),
        "the hint is about SVIDs: {why}"
    );

    // The README's curl request at the token endpoint, Bearer and DPoP.
    if !have_curl() {
        return;
    }
    let issuer = dev.env["QUORATE_ISSUER"].clone();
    let curl = |extra: &[&str]| {
        let out = Command::new("curl")
            .args(["-s", "--cacert", &dev.env["QUORATE_CACERT"]])
            .arg(format!("{issuer}/token"))
            .args([
                "-d",
                "grant_type=urn:ietf:params:oauth:grant-type:jwt-bearer",
                "-d",
                &format!("assertion={att}"),
                "-d",
                "resource=dev",
                "-d",
                "scope=tools:run",
                "-d",
                "ttl=300",
            ])
            .args(extra)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        eprintln!("curl: {text}");
        serde_json::from_str::<Value>(&text).unwrap()
    };
    let bearer = curl(&[]);
    assert_eq!(bearer["token_type"], "Bearer");
    assert_eq!(bearer["expires_in"], 300);
    assert_eq!(bearer["scope"], "tools:run");
    assert_eq!(
        claims(bearer["access_token"].as_str().unwrap())["aud"],
        "dev"
    );
    let proof = stdout(&quorate(
        &dev,
        cwd,
        &[
            "dpop",
            "proof",
            "--key",
            "dpop.pem",
            "--method",
            "POST",
            "--url",
            &format!("{issuer}/token"),
        ],
    ));
    let bound = curl(&["-H", &format!("DPoP: {proof}")]);
    assert_eq!(bound["token_type"], "DPoP");
    assert_eq!(
        claims(bound["access_token"].as_str().unwrap())["cnf"]["jkt"],
        jkt.as_str()
    );
    // The same proof twice is a replay (RFC 9449 §11.1).
    let replayed = curl(&["-H", &format!("DPoP: {proof}")]);
    assert_eq!(replayed["error"], "invalid_dpop_proof", "{replayed}");
}
