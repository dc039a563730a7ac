//! The `quorate-node` binary's configuration handling: every problem is reported at
//! once, with exit code 2, before anything binds or opens. (Having an integration test
//! here also makes `cargo test` build the binary that the process tests start.)

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::process::Command;

#[test]
fn bad_configuration_reports_every_problem_and_exits_2() {
    let out = Command::new(env!("CARGO_BIN_EXE_quorate-node"))
        .args([
            "--data-dir",
            "/nonexistent/quorate-node-test",
            "--cert",
            "/nonexistent/cert.pem",
            "--key",
            "/nonexistent/key.pem",
            "--ca",
            "/nonexistent/ca.pem",
            "--fail-point",
            "bogus",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    for needle in [
        "--cert /nonexistent/cert.pem",
        "--key /nonexistent/key.pem",
        "--ca /nonexistent/ca.pem",
        "--fail-point bogus",
    ] {
        assert!(err.contains(needle), "missing {needle:?} in: {err}");
    }
}

#[test]
fn help_names_the_flags() {
    let out = Command::new(env!("CARGO_BIN_EXE_quorate-node"))
        .arg("--help")
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for flag in ["--listen", "--data-dir", "--kek-file", "--metrics-listen"] {
        assert!(text.contains(flag), "{flag} missing from --help");
    }
}
