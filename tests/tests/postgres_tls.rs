//! A coordinator reaching its PostgreSQL store over the network (`coordinator/STORE.md`,
//! "Connecting"), against a real PostgreSQL server that listens on 127.0.0.1 with TLS
//! only (skipped, saying so, where PostgreSQL is not installed and `CI` is not set):
//!
//! - by default the coordinator offers only X25519MLKEM768; Debian 12's server (OpenSSL
//!   3.0) cannot negotiate it, so the handshake fails and the error says what to change;
//! - with `ssl_groups=X25519MLKEM768:P-256` the link falls back to a classic key
//!   exchange (this test forces classic because the server cannot do better), and
//!   `migrate`, SCRAM with channel binding (`channel_binding=require`) and a coordinator
//!   serving keys work over TLS 1.3, as `pg_stat_ssl` shows from the server's side;
//! - a server certificate from another CA, or not naming the host connected to, is
//!   refused; a client certificate (PostgreSQL's `cert` authentication) logs in, and its
//!   absence does not;
//! - a coordinator on another host (a network namespace) that vanishes without closing
//!   its connection (its link goes down) loses its instance and job locks within
//!   seconds: the election session's server-side keepalives end its session.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    missing_docs
)]

use std::path::Path;

use quorate_proto::api;
use quorate_tests::postgres::{Postgres, USER, migrate};
use quorate_tests::{POOL_FLAGS, TempDir, TestCluster};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, PKCS_ECDSA_P256_SHA256,
};

const PASSWORD: &str = "correct-horse-battery";
const CERT_USER: &str = "quorate_cert";

/// A CA: its certificate (PEM) and its issuer.
struct Ca {
    pem: String,
    issuer: Issuer<'static, KeyPair>,
}

fn ca(name: &str) -> Ca {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let mut p = CertificateParams::default();
    p.distinguished_name.push(DnType::CommonName, name);
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let cert = p.self_signed(&key).unwrap();
    Ca {
        pem: cert.pem(),
        issuer: Issuer::new(p, key),
    }
}

/// A leaf certified by `ca`: (certificate PEM, key PEM).
fn leaf(ca: &Ca, cn: &str, dns: &[&str], eku: ExtendedKeyUsagePurpose) -> (String, String) {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let mut p =
        CertificateParams::new(dns.iter().map(|d| d.to_string()).collect::<Vec<_>>()).unwrap();
    p.distinguished_name.push(DnType::CommonName, cn);
    p.is_ca = IsCa::ExplicitNoCa;
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![eku];
    let cert = p.signed_by(&key, &ca.issuer).unwrap();
    (cert.pem(), key.serialize_pem())
}

fn write(dir: &Path, name: &str, text: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p.display().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_store_is_reached_over_verified_tls() {
    let Some(mut pg) = Postgres::start("tls") else {
        return;
    };
    let files = TempDir::new("pg-tls-files");
    let server_ca = ca("PostgreSQL server CA");
    let client_ca = ca("PostgreSQL client CA");
    let other_ca = ca("Someone else's CA");
    let (server_pem, server_key) = leaf(
        &server_ca,
        "localhost",
        &["localhost"],
        ExtendedKeyUsagePurpose::ServerAuth,
    );
    pg.listen_tls(
        &[],
        &server_pem,
        &server_key,
        &client_ca.pem,
        PASSWORD,
        CERT_USER,
    );
    let root = write(&files.0, "server-ca.pem", &server_ca.pem);
    let other = write(&files.0, "other-ca.pem", &other_ca.pem);
    let port = pg.port;
    // `localhost` is the name checked against the certificate; `hostaddr` pins IPv4,
    // where the server listens.
    let url = |host: &str, user: &str, db: &str, extra: &str| {
        format!(
            "postgres://{user}:{PASSWORD}@{host}:{port}/{db}?hostaddr=127.0.0.1&sslmode=verify-full{extra}"
        )
    };
    const CLASSIC: &str = "&ssl_groups=X25519MLKEM768:P-256";

    // The default offers only the hybrid group, which this server cannot negotiate.
    let (ok, said) = migrate(&url(
        "localhost",
        USER,
        "postgres",
        &format!("&sslrootcert={root}"),
    ));
    assert!(
        !ok,
        "the handshake succeeded without X25519MLKEM768: {said}"
    );
    assert!(
        said.contains("TLS handshake")
            && said.contains("X25519MLKEM768")
            && said.contains("ssl_groups=X25519MLKEM768:P-256"),
        "{said}"
    );
    assert!(
        !said.contains(PASSWORD),
        "the error shows the password: {said}"
    );
    eprintln!("hybrid only: {said}");

    // The classic fallback, forced because Debian 12's server has OpenSSL 3.0; SCRAM
    // bound to the TLS channel (tls-server-end-point).
    let good = url(
        "localhost",
        USER,
        "postgres",
        &format!("&sslrootcert={root}{CLASSIC}&channel_binding=require"),
    );
    let (ok, said) = migrate(&good);
    assert!(ok && said.contains("applied migrations"), "{said}");

    // A certificate from another CA, or one that does not name the host: refused.
    let (ok, said) = migrate(&url(
        "localhost",
        USER,
        "postgres",
        &format!("&sslrootcert={other}{CLASSIC}"),
    ));
    assert!(!ok && said.contains("UnknownIssuer"), "{said}");
    let (ok, said) = migrate(&url(
        "127.0.0.1",
        USER,
        "postgres",
        &format!("&sslrootcert={root}{CLASSIC}"),
    ));
    assert!(!ok && said.contains("not valid for name"), "{said}");

    // The server takes TCP connections over TLS only.
    let (ok, said) = migrate(&format!(
        "postgres://{USER}:{PASSWORD}@127.0.0.1:{port}/postgres?sslmode=disable"
    ));
    assert!(!ok && said.contains("pg_hba.conf rejects"), "{said}");

    // PostgreSQL's `cert` authentication: the client certificate's CN is the user.
    let (client_pem, client_key) = leaf(
        &client_ca,
        CERT_USER,
        &[],
        ExtendedKeyUsagePurpose::ClientAuth,
    );
    let cert = write(&files.0, "client.pem", &client_pem);
    let key = write(&files.0, "client-key.pem", &client_key);
    let (ok, said) = migrate(&format!(
        "postgres://{CERT_USER}@localhost:{port}/{CERT_USER}?hostaddr=127.0.0.1&sslmode=verify-full&sslrootcert={root}{CLASSIC}&sslcert={cert}&sslkey={key}"
    ));
    assert!(ok && said.contains("applied migrations"), "{said}");
    let (ok, said) = migrate(&format!(
        "postgres://{CERT_USER}@localhost:{port}/{CERT_USER}?hostaddr=127.0.0.1&sslmode=verify-full&sslrootcert={root}{CLASSIC}"
    ));
    assert!(!ok && said.contains("certificate"), "{said}");

    // A coordinator on the TLS store serves a key, and every session it holds is TLS 1.3.
    let mut flags = vec!["--store", good.as_str()];
    flags.extend_from_slice(POOL_FLAGS);
    let cluster = TestCluster::start("pg-tls", 3, 1, &flags);
    let key = cluster.create_key("over-tls", api::Purpose::Sign).await;
    let sig = cluster.sign("over-tls", b"stored over TLS").await.unwrap();
    quorate_tests::verify_es256(&key.public_key, b"stored over TLS", &sig);
    let sessions = pg.psql(&format!(
        "SELECT s.ssl, s.version FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) \
         WHERE a.usename = '{USER}' AND a.client_addr IS NOT NULL"
    ));
    let lines: Vec<&str> = sessions.lines().collect();
    eprintln!("coordinator sessions (ssl|version): {lines:?}");
    assert!(!lines.is_empty(), "no TCP session of the coordinator");
    assert!(lines.iter().all(|l| *l == "t|TLSv1.3"), "{lines:?}");
}

/// Advisory locks held by sessions from `addr`.
fn locks_from(pg: &Postgres, addr: std::net::Ipv4Addr) -> u64 {
    pg.psql(&format!(
        "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid \
         WHERE l.locktype = 'advisory' AND l.granted AND a.client_addr = '{addr}'"
    ))
    .trim()
    .parse()
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vanished_coordinator_host_releases_its_locks() {
    if !quorate_tests::netns::skip_unless_available(
        "a_vanished_coordinator_host_releases_its_locks",
    ) {
        return;
    }
    let Some(mut pg) = Postgres::start("hostloss") else {
        return;
    };
    let hosts = quorate_tests::netns::Hosts::create(1).unwrap();
    let h = hosts.host(0);
    let files = TempDir::new("pg-hostloss");
    let server_ca = ca("PostgreSQL server CA");
    let gateway = h.gateway.to_string();
    let (server_pem, server_key) = leaf(
        &server_ca,
        "db",
        &[gateway.as_str()],
        ExtendedKeyUsagePurpose::ServerAuth,
    );
    pg.listen_tls(
        &[h.gateway.into()],
        &server_pem,
        &server_key,
        &server_ca.pem,
        PASSWORD,
        CERT_USER,
    );
    let root = write(&files.0, "server-ca.pem", &server_ca.pem);
    // The coordinator's host reaches the server at its gateway, over TLS (classic: the
    // server is Debian 12's).
    let url = format!(
        "postgres://{USER}:{PASSWORD}@{gateway}:{}/postgres?sslmode=verify-full&sslrootcert={root}&ssl_groups=X25519MLKEM768:P-256",
        pg.port
    );
    let (ok, said) = migrate(&url);
    assert!(ok, "{said}");

    // A coordinator on that host. Its nodes are nowhere (it only has to campaign).
    quorate_proto::pki::write_cluster(&files.0, quorate_tests::DOMAIN, 3, false).unwrap();
    let d = &files.0;
    let mut cmd = h.command(quorate_tests::binary("quorate-coordinator"));
    cmd.args(["--store", &url, "--listen", &format!("{}:7100", h.addr)])
        .args(["--domain", quorate_tests::DOMAIN, "--instance-id", "far"])
        .arg("--cert")
        .arg(d.join("coordinator.pem"))
        .arg("--key")
        .arg(d.join("coordinator-key.pem"))
        .arg("--ca")
        .arg(d.join("ca.pem"));
    for i in 1..=3 {
        cmd.args(["--node", &format!("{i}={gateway}:{i}")]);
    }
    cmd.env("QUORATE_LOG", "warn");
    let mut far = quorate_tests::spawn_ready(cmd);
    // Its instance id and the three jobs.
    let t = std::time::Instant::now();
    while locks_from(&pg, h.addr) < 4 {
        assert!(
            t.elapsed() < std::time::Duration::from_secs(30),
            "the coordinator holds {} advisory locks, not 4",
            locks_from(&pg, h.addr)
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }

    // The host vanishes: its link goes down, so no FIN and no RST ever reach the server.
    let out = h
        .command("ip")
        .args(["link", "set", "eth0", "down"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let t = std::time::Instant::now();
    // Without keepalives the server would hold the session (and every lock) until the
    // kernel's default keepalive time, two hours.
    let limit = std::time::Duration::from_secs(60);
    while locks_from(&pg, h.addr) > 0 {
        assert!(
            t.elapsed() < limit,
            "the vanished coordinator still holds its locks after {} s",
            limit.as_secs()
        );
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    }
    eprintln!(
        "the vanished coordinator's locks were released {} ms after its link went down",
        t.elapsed().as_millis()
    );
    far.kill();
}
