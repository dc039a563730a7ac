//! `quorate-opcount`: counts the elliptic-curve scalar multiplications of each protocol
//! phase and prints them as a markdown table.
//!
//! ```sh
//! cargo run --release -p quorate-bench --bin quorate-opcount
//! ```
//!
//! For each `(n, t)` it runs one DKG, then a presignature batch of [`BATCH`] (multiplication
//! set = the first `2t + 1` nodes, signing set = the first `t + 1`), one node's signing
//! step, the coordinator's combine, and one derivation over the first `t + 1` nodes,
//! resetting [`opcount`] before each and reading it after. Counts are summed over every
//! party the phase involves (the simulation runs them all in this process).
#![allow(
    clippy::print_stdout,
    reason = "a command-line report: the table on stdout is the program's output"
)]

use std::process::ExitCode;

use quorate_bench::{SignFixture, cluster, quorum, rng};
use quorate_crypto::keys::KeyPurpose;
use quorate_crypto::opcount::{self, OpCounts};
use quorate_crypto::sign;
use quorate_crypto::sim::Attack;

/// The `(n, t)` configurations counted.
const PARAMS: [(u16, u16); 3] = [(3, 1), (5, 2), (7, 3)];

/// Presignatures per counted batch.
const BATCH: u32 = 64;

/// Runs `f` between [`opcount::reset`] and [`opcount::snapshot`].
fn count<T>(f: impl FnOnce() -> quorate_bench::Result<T>) -> quorate_bench::Result<(T, OpCounts)> {
    opcount::reset();
    let out = f()?;
    Ok((out, opcount::snapshot()))
}

fn row(n: u16, t: u16, phase: &str, per: &str, c: OpCounts, divisor: u32) -> String {
    let d = f64::from(divisor);
    // Counts stay far below 2^52, so the conversion to f64 is exact.
    let f = |x: u64| format!("{:.1}", x as f64 / d);
    format!(
        "| ({n},{t}) | {phase} | {per} | {} | {} | {} | {} |",
        f(c.var_base),
        f(c.fixed_base),
        f(c.msm_calls),
        f(c.msm_terms)
    )
}

fn rows(n: u16, t: u16) -> quorate_bench::Result<Vec<String>> {
    let mut out = Vec::new();

    // DKG (of a derivation key, used below; the DKG does not depend on the purpose).
    let mut cl = cluster(n, t)?;
    let (dkey, c) = count(|| cl.dkg(KeyPurpose::Derive, Attack::None))?;
    out.push(row(n, t, "DKG, all n nodes + coordinator", "per key", c, 1));

    // Presign batch. The fixture's own one-presignature batch is not counted: it only
    // supplies a signing key and a presignature for the signing rows.
    let mut f = SignFixture::new(n, t, 1)?;
    let (m, s) = (quorate_bench::mset(t), quorate_bench::sset(t));
    let (batch, c) = count(|| f.cluster.presign(f.key.key_id, &m, &s, BATCH, Attack::None))?;
    if batch.len() != BATCH as usize {
        return Err(quorate_crypto::Error::Bug("the batch has the wrong size"));
    }
    out.push(row(
        n,
        t,
        &format!("presign (B={BATCH}), all 2t+1 of M + coordinator"),
        "per presignature",
        c,
        BATCH,
    ));

    // Signing with the fixture's presignature.
    let req = f.request();
    let j = f.first_signer()?;
    let (_, c) = count(|| sign::sign_step(&f.key, f.record(j)?, &req))?;
    out.push(row(n, t, "sign_step, one node", "per call", c, 1));

    let shares = f.shares()?;
    let mut r = rng(0xc0);
    let (sig, c) = count(|| sign::combine(&mut r, &f.key, &f.presig, &f.digest, &shares))?;
    if !sig.verify(&f.key.public_key(), &f.digest) {
        return Err(quorate_crypto::Error::Bug(
            "combine returned an invalid signature",
        ));
    }
    out.push(row(n, t, "combine + verify, coordinator", "per call", c, 1));

    // Derivation.
    let dkey = dkey.key_id;
    let q = quorum(t);
    let (_, c) = count(|| cl.derive(dkey, b"agent:bench/task:0001/scope:read", &q, Attack::None))?;
    out.push(row(
        n,
        t,
        "derive, requester + t+1 nodes + coordinator",
        "per call",
        c,
        1,
    ));
    Ok(out)
}

fn main() -> ExitCode {
    let mut lines = vec![
        "| (n,t) | phase | unit | var_base | fixed_base | msm_calls | msm_terms |".to_owned(),
        "| --- | --- | --- | ---: | ---: | ---: | ---: |".to_owned(),
    ];
    for (n, t) in PARAMS {
        match rows(n, t) {
            Ok(r) => lines.extend(r),
            Err(e) => {
                eprintln!("quorate-opcount: ({n},{t}) failed: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    if opcount::snapshot() == OpCounts::default() {
        eprintln!("quorate-opcount: all counts are zero; is the `op-count` feature enabled?");
        return ExitCode::FAILURE;
    }
    println!("{}", lines.join("\n"));
    ExitCode::SUCCESS
}
