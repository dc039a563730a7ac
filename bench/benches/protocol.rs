//! Criterion benches of Quorate's protocol phases, one group per phase with one
//! benchmark per `(n, t)`, and single-key ES256 baselines in the same run.
//!
//! ```sh
//! cargo bench -p quorate-bench --bench protocol
//! ```
//!
//! Every phase runs through the in-process [`Cluster`] simulation, on one thread, with
//! every message round-tripped through its wire encoding. A phase that involves several
//! parties (DKG, presign, derive) is timed as the sum of all their work.
#![allow(
    clippy::unwrap_used,
    reason = "a bench has no caller to report to: a setup or protocol failure should abort it"
)]

use std::hint::black_box;
use std::time::{Duration, Instant};

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair};
use criterion::{
    BenchmarkId, Criterion, SamplingMode, Throughput, criterion_group, criterion_main,
};
use p256::ecdsa::signature::{Signer, Verifier};
use p256::ecdsa::{Signature as P256Signature, SigningKey};
use p256::elliptic_curve::Generate;
use quorate_bench::{SignFixture, cluster, forget_all_but, message, mset, quorum, rng, sset};
use quorate_crypto::keys::KeyPurpose;
use quorate_crypto::sign;
use quorate_crypto::sim::{Attack, Cluster};

/// The `(n, t)` configurations measured.
const PARAMS: [(u16, u16); 2] = [(3, 1), (5, 2)];

/// Presignatures per benchmarked batch.
const BATCH: u32 = 32;

/// Samples for the slow, multi-party phases (criterion's minimum is 10, its default 100).
const SLOW_SAMPLES: usize = 20;

fn id(n: u16, t: u16) -> BenchmarkId {
    BenchmarkId::from_parameter(format!("{n}-{t}"))
}

/// Times `iters` runs of `run`, calling `cleanup` with each result after its clock stops.
fn timed<T>(
    cluster: &mut Cluster,
    iters: u64,
    mut run: impl FnMut(&mut Cluster) -> T,
    mut cleanup: impl FnMut(&mut Cluster, T),
) -> Duration {
    let mut total = Duration::ZERO;
    for _ in 0..iters {
        let start = Instant::now();
        let out = black_box(run(cluster));
        total += start.elapsed();
        cleanup(cluster, out);
    }
    total
}

fn dkg(c: &mut Criterion) {
    let mut g = c.benchmark_group("dkg");
    g.sampling_mode(SamplingMode::Flat)
        .sample_size(SLOW_SAMPLES);
    for (n, t) in PARAMS {
        // Node keys are generated here, outside the timing.
        let mut cluster = cluster(n, t).unwrap();
        g.bench_function(id(n, t), |b| {
            b.iter_custom(|iters| {
                timed(
                    &mut cluster,
                    iters,
                    |c| c.dkg(KeyPurpose::Sign, Attack::None).unwrap(),
                    |c, _key| forget_all_but(c, None),
                )
            });
        });
    }
    g.finish();
}

fn presign(c: &mut Criterion) {
    let mut g = c.benchmark_group("presign");
    g.sampling_mode(SamplingMode::Flat)
        .sample_size(SLOW_SAMPLES)
        // Criterion prints the time and rate per presignature as well as per batch.
        .throughput(Throughput::Elements(u64::from(BATCH)));
    for (n, t) in PARAMS {
        let mut cluster = cluster(n, t).unwrap();
        let key = cluster.dkg(KeyPurpose::Sign, Attack::None).unwrap().key_id;
        let (m, s) = (mset(t), sset(t));
        g.bench_function(id(n, t), |b| {
            b.iter_custom(|iters| {
                timed(
                    &mut cluster,
                    iters,
                    |c| c.presign(key, &m, &s, BATCH, Attack::None).unwrap(),
                    |c, _batch| forget_all_but(c, Some(key)),
                )
            });
        });
    }
    g.finish();
}

fn sign_share(c: &mut Criterion) {
    let mut g = c.benchmark_group("sign_share");
    for (n, t) in PARAMS {
        let f = SignFixture::new(n, t, 1).unwrap();
        let req = f.request();
        let j = f.first_signer().unwrap();
        let record = f.record(j).unwrap();
        g.bench_function(id(n, t), |b| {
            // `sign_step` only reads the record, so the same unused record serves every
            // iteration; the node would persist the returned `Consumed` record.
            b.iter(|| sign::sign_step(&f.key, black_box(record), black_box(&req)).unwrap());
        });
    }
    g.finish();
}

fn combine_verify(c: &mut Criterion) {
    let mut g = c.benchmark_group("combine_verify");
    for (n, t) in PARAMS {
        let f = SignFixture::new(n, t, 1).unwrap();
        let shares = f.shares().unwrap();
        let mut rng = rng(0xc0);
        g.bench_function(id(n, t), |b| {
            b.iter(|| {
                sign::combine(
                    &mut rng,
                    &f.key,
                    &f.presig,
                    black_box(&f.digest),
                    black_box(&shares),
                )
                .unwrap()
            });
        });
    }
    g.finish();
}

fn derive(c: &mut Criterion) {
    let mut g = c.benchmark_group("derive");
    for (n, t) in PARAMS {
        let mut cluster = cluster(n, t).unwrap();
        let key = cluster
            .dkg(KeyPurpose::Derive, Attack::None)
            .unwrap()
            .key_id;
        let q = quorum(t);
        let context = b"agent:bench/task:0001/scope:read";
        g.bench_function(id(n, t), |b| {
            b.iter(|| {
                cluster
                    .derive(key, black_box(context), &q, Attack::None)
                    .unwrap()
            });
        });
    }
    g.finish();
}

fn baseline(c: &mut Criterion) {
    let msg = message();
    let mut g = c.benchmark_group("baseline");

    let aws_rng = SystemRandom::new();
    let aws_key = EcdsaKeyPair::generate(&ECDSA_P256_SHA256_FIXED_SIGNING).unwrap();
    g.bench_function("aws-lc-rs-es256-sign", |b| {
        b.iter(|| aws_key.sign(&aws_rng, black_box(&msg)).unwrap());
    });

    let p256_key = SigningKey::generate_from_rng(&mut rng(0xba5e));
    g.bench_function("p256-ecdsa-sign", |b| {
        b.iter(|| -> P256Signature { p256_key.sign(black_box(&msg)) });
    });

    let vk = *p256_key.verifying_key();
    let sig: P256Signature = p256_key.sign(&msg);
    g.bench_function("p256-verify", |b| {
        b.iter(|| vk.verify(black_box(&msg), black_box(&sig)).unwrap());
    });

    g.finish();
}

criterion_group!(
    benches,
    baseline,
    sign_share,
    combine_verify,
    derive,
    presign,
    dkg
);
criterion_main!(benches);
