//! The `quorate-coordinator` binary's configuration handling: every problem is reported
//! at once, with exit code 2, before anything binds. (Having an integration test here
//! also makes `cargo test` build the binary that the process tests start.)

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::process::Command;

#[test]
fn bad_configuration_reports_every_problem_and_exits_2() {
    let out = Command::new(env!("CARGO_BIN_EXE_quorate-coordinator"))
        .args([
            "--data-dir",
            "/nonexistent/coord",
            "--cert",
            "/nonexistent/c.pem",
            "--key",
            "/nonexistent/k.pem",
            "--ca",
            "/nonexistent/ca.pem",
            "--node",
            "1=127.0.0.1:1",
            "--node",
            "two=nowhere",
            "--threshold",
            "1",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    for needle in [
        "--cert /nonexistent/c.pem",
        "--node two=nowhere",
        "--threshold 1",
    ] {
        assert!(err.contains(needle), "missing {needle:?} in: {err}");
    }
}
