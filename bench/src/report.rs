//! What `quorate-bench` prints: a markdown table on stdout, and the same as JSON.

use std::fmt::Write as _;

use serde::Serialize;

use crate::load::Measured;
use crate::local::{CpuUse, DepthPoint, Sampled};

/// One measured operation.
#[derive(Clone, Debug, Serialize)]
pub struct Row {
    /// What ran (`token`, `sign (full pool)`, `baseline: aws-lc-rs JWT`, …).
    pub name: String,
    /// `cluster` (real processes, gRPC over PQ mTLS) or `in-process`.
    pub kind: &'static str,
    /// `(n,t)` where it applies.
    pub params: Option<String>,
    /// Workers.
    pub concurrency: usize,
    /// Measured operations that succeeded.
    pub ops: u64,
    /// Measured operations that failed.
    pub errors: u64,
    /// The first failure.
    pub first_error: Option<String>,
    /// Measured seconds.
    pub seconds: f64,
    /// Units (tokens, signatures) per operation: the in-process presign+sign operation is
    /// a whole batch.
    pub units_per_op: u64,
    /// Units per second.
    pub per_second: f64,
    /// Latency of one operation, microseconds.
    pub p50_us: f64,
    /// 90th percentile.
    pub p90_us: f64,
    /// 99th percentile.
    pub p99_us: f64,
    /// 99.9th percentile.
    pub p999_us: f64,
    /// Mean.
    pub mean_us: f64,
    /// Presignatures the cluster made per second during the run.
    pub presigs_per_sec: Option<f64>,
    /// CPU per process during the run.
    pub cpu: Vec<CpuUse>,
    /// Pool depth of the key driven, once a second.
    pub pool_depth: Vec<DepthPoint>,
}

impl Row {
    /// A row from a run and what was sampled alongside it.
    pub fn new(
        m: &Measured,
        kind: &'static str,
        params: Option<(u16, u16)>,
        units_per_op: u64,
        sampled: Option<Sampled>,
    ) -> Row {
        let sampled = sampled.unwrap_or_default();
        Row {
            name: m.name.clone(),
            kind,
            params: params.map(|(n, t)| format!("({n},{t})")),
            concurrency: m.concurrency,
            ops: m.ops,
            errors: m.errors,
            first_error: m.first_error.clone(),
            seconds: m.elapsed.as_secs_f64(),
            units_per_op,
            per_second: m.throughput() * units_per_op as f64,
            p50_us: m.quantile_us(0.5),
            p90_us: m.quantile_us(0.9),
            p99_us: m.quantile_us(0.99),
            p999_us: m.quantile_us(0.999),
            mean_us: m.mean_us(),
            presigs_per_sec: sampled.presigs_per_sec,
            cpu: sampled.cpu,
            pool_depth: sampled.depth,
        }
    }
}

/// A target of the benchmark issue and how this run did against it.
#[derive(Clone, Debug, Serialize)]
pub struct Verdict {
    /// The target, in words.
    pub target: String,
    /// The measured ratio.
    pub ratio: f64,
    /// How the ratio is formed.
    pub formula: String,
    /// Whether it is met.
    pub met: bool,
}

impl Verdict {
    /// `ratio >= at_least`.
    pub fn at_least(target: &str, formula: String, ratio: f64, at_least: f64) -> Verdict {
        Verdict {
            target: target.to_owned(),
            ratio,
            formula,
            met: ratio >= at_least,
        }
    }

    /// `ratio <= at_most`.
    pub fn at_most(target: &str, formula: String, ratio: f64, at_most: f64) -> Verdict {
        Verdict {
            target: target.to_owned(),
            ratio,
            formula,
            met: ratio <= at_most,
        }
    }
}

fn us(v: f64) -> String {
    if v >= 10_000.0 {
        format!("{:.1} ms", v / 1_000.0)
    } else if v >= 1_000.0 {
        format!("{:.2} ms", v / 1_000.0)
    } else {
        format!("{v:.1} µs")
    }
}

fn rate(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 1.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.3}")
    }
}

/// The rows as a markdown table.
pub fn table(rows: &[Row]) -> String {
    let mut out = String::new();
    out.push_str(
        "| operation | kind | (n,t) | conc. | ops | errors | per second | p50 | p90 | p99 | p99.9 | presigs/s |\n\
         | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n",
    );
    for r in rows {
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            r.name,
            r.kind,
            r.params.as_deref().unwrap_or("—"),
            r.concurrency,
            r.ops,
            r.errors,
            rate(r.per_second),
            us(r.p50_us),
            us(r.p90_us),
            us(r.p99_us),
            us(r.p999_us),
            r.presigs_per_sec.map_or("—".to_owned(), rate),
        );
    }
    let errors: Vec<&Row> = rows.iter().filter(|r| r.first_error.is_some()).collect();
    for r in errors {
        let _ = writeln!(
            out,
            "\n{}: first error: {}",
            r.name,
            r.first_error.as_deref().unwrap_or_default()
        );
    }
    out
}

/// CPU per process of the rows that have it, as a markdown table.
pub fn cpu_table(rows: &[Row]) -> String {
    let mut out = String::new();
    for r in rows.iter().filter(|r| !r.cpu.is_empty()) {
        let _ = writeln!(out, "\nCPU during `{}` (100 % = one core):\n", r.name);
        out.push_str("| process | CPU s | % of a core | RSS MiB |\n| --- | ---: | ---: | ---: |\n");
        for c in &r.cpu {
            let _ = writeln!(
                out,
                "| {} | {:.2} | {:.0} | {:.1} |",
                c.process, c.cpu_seconds, c.percent_of_core, c.rss_mib
            );
        }
    }
    out
}

/// The verdicts as a markdown table.
pub fn verdict_table(verdicts: &[Verdict]) -> String {
    let mut out = String::from("| target | measured | ratio | met |\n| --- | --- | ---: | --- |\n");
    for v in verdicts {
        let _ = writeln!(
            out,
            "| {} | {} | {:.3} | {} |",
            v.target,
            v.formula,
            v.ratio,
            if v.met { "yes" } else { "**no**" }
        );
    }
    out
}

/// Pool depth over time of a row, compactly (`t:depth` pairs).
pub fn depth_series(r: &Row) -> String {
    r.pool_depth
        .iter()
        .map(|p| format!("{:.0}s:{}", p.t, p.depth))
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_row_scales_units_and_renders() {
        let mut latency = crate::load::histogram().unwrap();
        for v in [1_000u64, 2_000, 3_000, 4_000] {
            latency.record(v * 1_000).unwrap();
        }
        let m = Measured {
            name: "x".into(),
            concurrency: 2,
            ops: 4,
            errors: 1,
            first_error: Some("boom".into()),
            elapsed: Duration::from_secs(2),
            latency,
        };
        let r = Row::new(&m, "in-process", Some((3, 1)), 32, None);
        assert!((r.per_second - 64.0).abs() < 1e-9);
        assert!(r.p50_us >= 1_999.0 && r.p50_us <= 2_001.0, "{}", r.p50_us);
        let t = table(&[r]);
        assert!(
            t.contains("| x | in-process | (3,1) | 2 | 4 | 1 | 64.0 |"),
            "{t}"
        );
        assert!(t.contains("first error: boom"));
        let v = Verdict::at_most("p50", "a/b".into(), 2.5, 2.0);
        assert!(!v.met);
        assert!(verdict_table(&[v]).contains("**no**"));
    }
}
