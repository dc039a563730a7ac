//! The dev OIDC issuer of `quorate dev`: an ES256 key in the cluster directory whose
//! JWKS the coordinator trusts, so `quorate dev attest` can hand an agent an
//! attestation like the ones Kubernetes or GitHub Actions give real agents.
//!
//! Files in `DIR`: `dev-issuer-key.pem` (0600), `dev-issuer-jwks.json`, `trust.json`
//! (the coordinator's `--trust-config`), `policy/dev.cedar` (written once), and the
//! keys that govern policy (DESIGN.md §9): `operator-key.pem` (0600) with
//! `operator.pub.pem`, which signs the policy bundle `policy-bundle.jws` made from
//! `policy/` at every start, and `approver-key.pem` (0600) with `approver.pub.pem`, the
//! bundle's one approver, `admin`. Edit `policy/`, then `quorate policy apply
//! DIR/policy` signs and applies it (DIR/env sets the keys).

use std::path::{Path, PathBuf};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use zeroize::Zeroizing;

use quorate_client::{Error, Result};

/// The audience dev attestations are for (the coordinator checks it).
pub const DEV_AUDIENCE: &str = "quorate";
/// The dev issuer's `name` in `trust.json` (agent subjects read
/// `spiffe://<domain>/agent/dev/<name>`).
pub const DEV_ISSUER_NAME: &str = "dev";
/// Longest attestation `quorate dev attest` makes.
pub const MAX_ATTESTATION_TTL: u64 = 3600;

/// The dev issuer's `iss`.
pub fn issuer_url(domain: &str) -> String {
    format!("https://dev-issuer.{domain}")
}

fn key_path(dir: &Path) -> PathBuf {
    dir.join("dev-issuer-key.pem")
}

/// `DIR/trust.json`.
pub fn trust_config_path(dir: &Path) -> PathBuf {
    dir.join("trust.json")
}

/// `DIR/policy`.
pub fn policy_dir(dir: &Path) -> PathBuf {
    dir.join("policy")
}

/// The operator's signing key in the dev directory (no cluster process reads it).
pub const OPERATOR_KEY_FILE: &str = "operator-key.pem";
/// Its public key, named by the nodes' ceiling and the coordinator.
pub const OPERATOR_PUBLIC_FILE: &str = "operator.pub.pem";
/// The dev approver's signing key.
pub const APPROVER_KEY_FILE: &str = "approver-key.pem";
/// Its public key, listed in the dev bundle.
pub const APPROVER_PUBLIC_FILE: &str = "approver.pub.pem";
/// The dev approver's name in the bundle (the admin client approves in dev).
pub const DEV_APPROVER: &str = "admin";
/// The signed dev bundle the coordinator starts with.
pub const POLICY_BUNDLE_FILE: &str = "policy-bundle.jws";

/// `DIR/operator.pub.pem`.
pub fn operator_public_path(dir: &Path) -> PathBuf {
    dir.join(OPERATOR_PUBLIC_FILE)
}

/// Makes a P-256 key pair as `DIR/<private>` (0600, PKCS#8 PEM) and `DIR/<public>` (SPKI
/// PEM) unless both exist.
fn ensure_key_pair(dir: &Path, private: &str, public: &str) -> Result<()> {
    let (sk, pk) = (dir.join(private), dir.join(public));
    if sk.is_file() && pk.is_file() {
        return Ok(());
    }
    let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
        .map_err(|e| Error::Other(format!("cannot make {private}: {e}")))?;
    let pem = Zeroizing::new(pair.serialize_pem());
    write_new(&sk, pem.as_bytes(), true)?;
    write_new(&pk, pair.public_key_pem().as_bytes(), false)
}

/// Signs `DIR/policy` as the dev bundle (seq: the current unix time, so a restart's
/// bundle is newer than any before) with the dev approver, into `out`.
pub fn sign_dev_bundle(dir: &Path, out: &Path) -> Result<()> {
    use quorate_authz::bundle as b;
    let key = b::signing_key_from_file(&dir.join(OPERATOR_KEY_FILE))
        .map_err(|e| Error::Config(e.to_string()))?;
    let approver = b::public_key_from_file(&dir.join(APPROVER_PUBLIC_FILE))
        .map_err(|e| Error::Config(e.to_string()))?;
    let policy = policy_dir(dir);
    let files = quorate_coordinator::policy::read_dir_files(&policy)
        .map_err(|e| Error::Config(format!("{}: {e}", policy.display())))?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let mut approvers = std::collections::BTreeMap::new();
    approvers.insert(DEV_APPROVER.to_owned(), approver);
    let bundle = b::PolicyBundle::sign(
        &key,
        now,
        i64::try_from(now).unwrap_or(i64::MAX),
        files,
        approvers,
    )
    .map_err(|e| Error::Config(format!("cannot sign the dev policy bundle: {e}")))?;
    write_new(out, format!("{}\n", bundle.jws()).as_bytes(), false)
}

fn io_err(path: &Path) -> impl Fn(std::io::Error) -> Error + '_ {
    move |e| Error::Config(format!("{}: {e}", path.display()))
}

fn write_new(path: &Path, bytes: &[u8], secret: bool) -> Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(if secret { 0o600 } else { 0o644 })
        .open(path)
        .map_err(io_err(path))?;
    f.write_all(bytes).map_err(io_err(path))?;
    f.sync_all().map_err(io_err(path))
}

/// Creates the dev issuer's key, JWKS, `trust.json` and the default policy in `dir`
/// unless they exist.
pub fn ensure(dir: &Path, domain: &str) -> Result<()> {
    let key = key_path(dir);
    let jwks = dir.join("dev-issuer-jwks.json");
    if !key.is_file() || !jwks.is_file() {
        let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .map_err(|e| Error::Other(format!("cannot make the dev issuer key: {e}")))?;
        let pem = Zeroizing::new(pair.serialize_pem());
        let raw = pair.public_key_raw();
        let (x, y) = match (raw.get(1..33), raw.get(33..65)) {
            (Some(x), Some(y)) if raw.len() == 65 => (x, y),
            _ => return Err(Error::Other("dev issuer key: unexpected public key".into())),
        };
        let doc = serde_json::json!({ "keys": [{
            "kty": "EC", "crv": "P-256", "alg": "ES256", "use": "sig", "kid": "dev-1",
            "x": URL_SAFE_NO_PAD.encode(x), "y": URL_SAFE_NO_PAD.encode(y),
        }]});
        write_new(&key, pem.as_bytes(), true)?;
        write_new(&jwks, doc.to_string().as_bytes(), false)?;
    }
    let trust = trust_config_path(dir);
    if !trust.is_file() {
        let doc = serde_json::json!({
            "oidc": [{
                "name": DEV_ISSUER_NAME,
                "issuer": issuer_url(domain),
                "audiences": [DEV_AUDIENCE],
                "jwks_file": "dev-issuer-jwks.json",
                "algorithms": ["ES256"],
            }],
        });
        let text = serde_json::to_string_pretty(&doc)
            .map_err(|e| Error::Other(format!("trust.json: {e}")))?;
        write_new(&trust, text.as_bytes(), false)?;
    }
    ensure_key_pair(dir, OPERATOR_KEY_FILE, OPERATOR_PUBLIC_FILE)?;
    ensure_key_pair(dir, APPROVER_KEY_FILE, APPROVER_PUBLIC_FILE)?;
    let policy = policy_dir(dir);
    if !policy.is_dir() {
        std::fs::create_dir_all(&policy).map_err(io_err(&policy))?;
        quorate_coordinator::policy::write_dev_dir(&policy)
            .map_err(|e| Error::Config(format!("{}: {e}", policy.display())))?;
    }
    Ok(())
}

/// An attestation JWT for `agent` from the dev issuer of `dir`, with extra string
/// claims, valid for `ttl_seconds`.
pub fn attest(
    dir: &Path,
    domain: &str,
    agent: &str,
    claims: &[(String, String)],
    ttl_seconds: u64,
) -> Result<String> {
    let agent_ok = !agent.is_empty()
        && agent.len() <= 128
        && agent
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '@'));
    if !agent_ok {
        return Err(Error::Usage(format!(
            "--agent {agent:?}: 1-128 of letters, digits, '-', '_', '.', '@'"
        )));
    }
    if ttl_seconds == 0 || ttl_seconds > MAX_ATTESTATION_TTL {
        return Err(Error::Usage(format!(
            "--ttl: 1 s to {MAX_ATTESTATION_TTL} s"
        )));
    }
    let key = key_path(dir);
    let pem = Zeroizing::new(std::fs::read(&key).map_err(|e| {
        Error::Config(format!(
            "{}: {e} (run `quorate dev --dir {}` first)",
            key.display(),
            dir.display()
        ))
    })?);
    let pem = std::str::from_utf8(&pem)
        .map_err(|_| Error::Config(format!("{}: not a PEM file", key.display())))?;
    let pair = rcgen::KeyPair::from_pem(pem)
        .map_err(|e| Error::Config(format!("{}: {e}", key.display())))?;
    let der = Zeroizing::new(pair.serialize_der());
    let signer = jsonwebtoken::EncodingKey::from_ec_der(&der);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let mut body = serde_json::Map::new();
    for (k, v) in claims {
        if matches!(
            k.as_str(),
            "iss" | "sub" | "aud" | "exp" | "nbf" | "iat" | "jti"
        ) {
            return Err(Error::Usage(format!(
                "--claim {k}: a registered claim that the dev issuer sets itself"
            )));
        }
        body.insert(k.clone(), serde_json::Value::String(v.clone()));
    }
    body.insert("iss".into(), issuer_url(domain).into());
    body.insert("sub".into(), agent.into());
    body.insert("aud".into(), DEV_AUDIENCE.into());
    body.insert("iat".into(), now.into());
    body.insert("nbf".into(), now.into());
    body.insert("exp".into(), (now + ttl_seconds).into());
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
    header.kid = Some("dev-1".into());
    jsonwebtoken::encode(&header, &serde_json::Value::Object(body), &signer)
        .map_err(|e| Error::Other(format!("cannot sign the attestation: {e}")))
}

/// Writes `DIR/<stem>.pem` and `DIR/<stem>-key.pem` (0600).
pub fn write_secret_and_cert(
    dir: &Path,
    stem: &str,
    cert: &quorate_proto::pki::IssuedCert,
) -> Result<()> {
    write_new(
        &dir.join(format!("{stem}-key.pem")),
        cert.key_pem.as_bytes(),
        true,
    )?;
    write_new(
        &dir.join(format!("{stem}.pem")),
        cert.cert_pem.as_bytes(),
        false,
    )
}

/// The dev cluster's metadata port: chosen once per directory (kept in
/// `DIR/http-port`) so the issuer URL — and the token key's rules, which name it — stay
/// the same across runs.
pub fn http_port(dir: &Path) -> Result<u16> {
    persisted_port(&dir.join("http-port"))
}

/// The dev cluster's agent listener port (`quorate dev --agent-listen`): chosen once
/// per directory (kept in `DIR/agent-port`), like [`http_port`].
pub fn agent_port(dir: &Path) -> Result<u16> {
    persisted_port(&dir.join("agent-port"))
}

/// A free loopback port, chosen once and kept in `path`.
fn persisted_port(path: &Path) -> Result<u16> {
    if let Ok(text) = std::fs::read_to_string(path) {
        return text.trim().parse().map_err(|_| {
            Error::Config(format!(
                "{}: expected a port number, found {:?}",
                path.display(),
                text.trim()
            ))
        });
    }
    let probe = std::net::TcpListener::bind("127.0.0.1:0").map_err(io_err(path))?;
    let port = probe.local_addr().map_err(io_err(path))?.port();
    drop(probe);
    write_new(path, format!("{port}\n").as_bytes(), false)?;
    Ok(port)
}

/// The dev cluster's agents' SPIFFE trust domain: `agents.<domain>`, apart from the
/// cluster's own (the agent listener refuses the cluster CA's certificates).
pub fn agents_domain(domain: &str) -> String {
    format!("agents.{domain}")
}

/// The dev SVID CA's certificate: the X.509 bundle of [`agents_domain`].
pub const SVID_CA_FILE: &str = "dev-svid-ca.pem";
/// The dev SVID CA's private key (0600).
const SVID_CA_KEY_FILE: &str = "dev-svid-ca-key.pem";

/// Creates the dev SVID CA in `dir` unless it exists, and makes `trust.json` trust it
/// for [`agents_domain`] (an `svid` entry with its `bundle_file`) unless it already
/// names that trust domain. For `quorate dev --agent-listen`.
pub fn ensure_svid_ca(dir: &Path, domain: &str) -> Result<()> {
    let agents = agents_domain(domain);
    let cert = dir.join(SVID_CA_FILE);
    let key = dir.join(SVID_CA_KEY_FILE);
    if !cert.is_file() || !key.is_file() {
        let ca = quorate_proto::pki::ClusterCa::generate(&agents)
            .map_err(|e| Error::Other(format!("cannot make the dev SVID CA: {e}")))?;
        write_new(&key, ca.secret_key_pem().as_bytes(), true)?;
        write_new(&cert, ca.cert_pem().as_bytes(), false)?;
    }
    let trust = trust_config_path(dir);
    let text = std::fs::read_to_string(&trust).map_err(io_err(&trust))?;
    let mut doc: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| Error::Config(format!("{}: {e}", trust.display())))?;
    let obj = doc
        .as_object_mut()
        .ok_or_else(|| Error::Config(format!("{}: not a JSON object", trust.display())))?;
    let entries = obj
        .entry("svid")
        .or_insert_with(|| serde_json::Value::Array(Vec::new()))
        .as_array_mut()
        .ok_or_else(|| Error::Config(format!("{}: `svid` is not an array", trust.display())))?;
    let present = entries
        .iter()
        .any(|e| e.get("trust_domain").and_then(|d| d.as_str()) == Some(agents.as_str()));
    if !present {
        entries.push(serde_json::json!({ "trust_domain": agents, "bundle_file": SVID_CA_FILE }));
        let text = serde_json::to_string_pretty(&doc)
            .map_err(|e| Error::Other(format!("trust.json: {e}")))?;
        let tmp = trust.with_extension("json.tmp");
        remove_file_if_exists(&tmp)?;
        write_new(&tmp, text.as_bytes(), false)?;
        std::fs::rename(&tmp, &trust).map_err(io_err(&trust))?;
    }
    Ok(())
}

/// Issues an X.509-SVID `spiffe://agents.<domain>/<name>` from the dev SVID CA into
/// `DIR/svid/<name>.pem` and `DIR/svid/<name>-key.pem` (0600), replacing earlier ones;
/// returns (certificate, key) paths.
pub fn issue_svid(dir: &Path, domain: &str, name: &str) -> Result<(PathBuf, PathBuf)> {
    let read = |file: &str| {
        let path = dir.join(file);
        std::fs::read_to_string(&path).map_err(|e| {
            Error::Config(format!(
                "{}: {e} (run `quorate dev --agent-listen --dir {}` first)",
                path.display(),
                dir.display()
            ))
        })
    };
    let key_pem = Zeroizing::new(read(SVID_CA_KEY_FILE)?);
    let ca = quorate_proto::pki::ClusterCa::from_pem(
        &read(SVID_CA_FILE)?,
        &key_pem,
        &agents_domain(domain),
    )
    .map_err(|e| Error::Config(format!("the dev SVID CA in {}: {e}", dir.display())))?;
    let issued = ca
        .issue_svid(name)
        .map_err(|e| Error::Usage(format!("--agent {name:?}: {e}")))?;
    let out = dir.join("svid");
    std::fs::create_dir_all(&out).map_err(io_err(&out))?;
    let stem = name.replace('/', "_");
    let (cert, key) = (
        out.join(format!("{stem}.pem")),
        out.join(format!("{stem}-key.pem")),
    );
    remove_file_if_exists(&cert)?;
    remove_file_if_exists(&key)?;
    write_new(&key, issued.key_pem.as_bytes(), true)?;
    write_new(&cert, issued.cert_pem.as_bytes(), false)?;
    Ok((cert, key))
}

fn remove_file_if_exists(path: &Path) -> Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io_err(path)(e)),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn attestations_verify_with_the_written_jwks() {
        let dir = tempfile::tempdir().unwrap();
        ensure(dir.path(), "quorate.test").unwrap();
        let jwt = attest(
            dir.path(),
            "quorate.test",
            "agent-7",
            &[("repo".into(), "acme/app".into())],
            60,
        )
        .unwrap();
        let jwks: jsonwebtoken::jwk::JwkSet = serde_json::from_slice(
            &std::fs::read(dir.path().join("dev-issuer-jwks.json")).unwrap(),
        )
        .unwrap();
        let key = jsonwebtoken::DecodingKey::from_jwk(&jwks.keys[0]).unwrap();
        let mut v = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::ES256);
        v.set_audience(&[DEV_AUDIENCE]);
        v.set_issuer(&[issuer_url("quorate.test")]);
        let data = jsonwebtoken::decode::<serde_json::Value>(&jwt, &key, &v).unwrap();
        assert_eq!(data.claims["sub"], "agent-7");
        assert_eq!(data.claims["repo"], "acme/app");
        assert!(attest(dir.path(), "quorate.test", "bad agent", &[], 60).is_err());
        assert!(
            attest(
                dir.path(),
                "quorate.test",
                "a",
                &[("sub".into(), "x".into())],
                60
            )
            .is_err()
        );
        // Stable port per directory.
        assert_eq!(
            http_port(dir.path()).unwrap(),
            http_port(dir.path()).unwrap()
        );
    }
}
