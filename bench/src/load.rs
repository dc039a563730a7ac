//! The closed-loop load driver of `quorate-bench`.
//!
//! `concurrency` workers each run one operation after another for `warmup + duration`.
//! An operation that *starts* after the warm-up is measured: its latency goes into an
//! HDR histogram (nanoseconds, 3 significant digits) and it counts towards the
//! throughput, which is measured operations divided by the time from the end of the
//! warm-up to the last measured completion. An optional `max_ops` caps the operations
//! started, warm-up included (used to sign from a full pool without draining it). A failed operation is
//! counted and its first error kept; it is not in the histogram.
//!
//! Two drivers share that: [`run_async`] for network operations (tokio tasks on the
//! caller's runtime) and [`run_threads`] for in-process computations (one OS thread per
//! worker). A progress line on stderr shows elapsed time, operations and the current
//! rate once a second while a run lasts.

use std::future::Future;
use std::io::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

/// How long and how hard to drive an operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoadSpec {
    /// Workers running operations back to back.
    pub concurrency: usize,
    /// Unmeasured time first (fills caches, drains a pool to its steady state).
    pub warmup: Duration,
    /// Measured time.
    pub duration: Duration,
    /// Start at most this many operations, warm-up included, even if time is left
    /// (signing from a full pool stops before the pool runs dry).
    pub max_ops: Option<u64>,
}

/// The result of one driven run.
#[derive(Clone, Debug)]
pub struct Measured {
    /// What ran.
    pub name: String,
    /// Workers.
    pub concurrency: usize,
    /// Measured operations that succeeded.
    pub ops: u64,
    /// Measured operations that failed.
    pub errors: u64,
    /// The first failure, if any.
    pub first_error: Option<String>,
    /// From the end of the warm-up to the last measured completion.
    pub elapsed: Duration,
    /// Latency of the successful measured operations, in nanoseconds.
    pub latency: Histogram<u64>,
}

impl Measured {
    /// Successful operations per second.
    pub fn throughput(&self) -> f64 {
        let secs = self.elapsed.as_secs_f64();
        if secs > 0.0 {
            self.ops as f64 / secs
        } else {
            0.0
        }
    }

    /// The latency quantile `q` (0..=1) in microseconds; 0 with no samples.
    pub fn quantile_us(&self, q: f64) -> f64 {
        if self.latency.is_empty() {
            0.0
        } else {
            self.latency.value_at_quantile(q) as f64 / 1_000.0
        }
    }

    /// Mean latency in microseconds.
    pub fn mean_us(&self) -> f64 {
        self.latency.mean() / 1_000.0
    }
}

/// A new latency histogram: 1 ns to 10 minutes, 3 significant digits.
pub fn histogram() -> Result<Histogram<u64>, String> {
    Histogram::new_with_bounds(1, 600_000_000_000, 3)
        .map_err(|e| format!("cannot create a latency histogram: {e}"))
}

/// Counters shared by the workers and the progress line.
struct Shared {
    ops: AtomicU64,
    errors: AtomicU64,
    started: AtomicU64,
    stop: AtomicBool,
    first_error: Mutex<Option<String>>,
    last_done: Mutex<Option<Instant>>,
}

impl Shared {
    fn new() -> Self {
        Shared {
            ops: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            started: AtomicU64::new(0),
            stop: AtomicBool::new(false),
            first_error: Mutex::new(None),
            last_done: Mutex::new(None),
        }
    }

    /// The start of a worker's next operation and whether it is measured, or `None` when
    /// the run is over (time is up or `max_ops` reached).
    fn next(
        &self,
        spec: &LoadSpec,
        end: Instant,
        measure_from: Instant,
    ) -> Option<(Instant, bool)> {
        let t0 = Instant::now();
        (t0 < end && self.may_start(spec)).then_some((t0, t0 >= measure_from))
    }

    /// Claims an operation slot under `max_ops`; false once the limit is hit.
    fn may_start(&self, spec: &LoadSpec) -> bool {
        if self.stop.load(Ordering::Relaxed) {
            return false;
        }
        match spec.max_ops {
            Some(max) if self.started.fetch_add(1, Ordering::Relaxed) >= max => {
                self.stop.store(true, Ordering::Relaxed);
                false
            }
            _ => true,
        }
    }

    fn record(
        &self,
        hist: &mut Histogram<u64>,
        started: Instant,
        result: Result<(), String>,
        measured: bool,
    ) {
        let done = Instant::now();
        if !measured {
            if let Err(e) = result {
                // Warm-up failures still matter: a run that only fails is reported.
                self.keep_error(format!("during warm-up: {e}"));
            }
            return;
        }
        match result {
            Ok(()) => {
                let nanos = u64::try_from(done.duration_since(started).as_nanos())
                    .unwrap_or(u64::MAX)
                    .max(1);
                hist.saturating_record(nanos);
                self.ops.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                self.errors.fetch_add(1, Ordering::Relaxed);
                self.keep_error(e);
            }
        }
        if let Ok(mut last) = self.last_done.lock() {
            *last = Some(last.map_or(done, |l| l.max(done)));
        }
    }

    fn keep_error(&self, e: String) {
        if let Ok(mut first) = self.first_error.lock()
            && first.is_none()
        {
            *first = Some(e);
        }
    }

    fn finish(
        self,
        name: &str,
        spec: &LoadSpec,
        measure_from: Instant,
        hists: Vec<Histogram<u64>>,
    ) -> Result<Measured, String> {
        let mut latency = histogram()?;
        for h in hists {
            latency
                .add(h)
                .map_err(|e| format!("cannot merge latency histograms: {e}"))?;
        }
        let last = self.last_done.lock().ok().and_then(|l| *l);
        Ok(Measured {
            name: name.to_owned(),
            concurrency: spec.concurrency,
            ops: self.ops.load(Ordering::Relaxed),
            errors: self.errors.load(Ordering::Relaxed),
            first_error: self.first_error.lock().ok().and_then(|e| e.clone()),
            elapsed: last.map_or(Duration::ZERO, |l| {
                l.saturating_duration_since(measure_from)
            }),
            latency,
        })
    }
}

/// Extra text for the progress line (for example the pool depth), refreshed by the
/// caller while a run lasts.
pub type StatusLine = Arc<Mutex<String>>;

/// Prints `\r[name] …` on stderr once a second until `stop` is set.
fn progress(
    name: String,
    spec: LoadSpec,
    shared: Arc<Shared>,
    status: Option<StatusLine>,
    started: Instant,
    done: Arc<AtomicBool>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let total = spec.warmup + spec.duration;
        let mut last_ops = 0u64;
        let mut last_at = Instant::now();
        while !done.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(200));
            if last_at.elapsed() < Duration::from_secs(1) {
                continue;
            }
            let now = Instant::now();
            let ops = shared.ops.load(Ordering::Relaxed);
            let rate =
                (ops.saturating_sub(last_ops)) as f64 / now.duration_since(last_at).as_secs_f64();
            last_ops = ops;
            last_at = now;
            let elapsed = started.elapsed();
            let phase = if elapsed < spec.warmup {
                "warm-up"
            } else {
                "measuring"
            };
            let extra = status
                .as_ref()
                .and_then(|s| s.lock().ok().map(|s| s.clone()))
                .unwrap_or_default();
            let mut err = std::io::stderr().lock();
            let _ = write!(
                err,
                "\r[{name}] {phase} {:>5.1}/{:.0} s  ops {ops:>8}  {rate:>9.1}/s  errors {:>4}  {extra}   ",
                elapsed.as_secs_f64(),
                total.as_secs_f64(),
                shared.errors.load(Ordering::Relaxed),
            );
            let _ = err.flush();
        }
        let _ = writeln!(std::io::stderr());
    })
}

/// One run's clock, counters and progress line.
struct Run {
    name: String,
    spec: LoadSpec,
    shared: Arc<Shared>,
    measure_from: Instant,
    end: Instant,
    done: Arc<AtomicBool>,
    printer: std::thread::JoinHandle<()>,
}

impl Run {
    fn start(name: &str, spec: LoadSpec, status: Option<StatusLine>) -> Run {
        let shared = Arc::new(Shared::new());
        let started = Instant::now();
        let measure_from = started + spec.warmup;
        let done = Arc::new(AtomicBool::new(false));
        let printer = progress(
            name.to_owned(),
            spec,
            shared.clone(),
            status,
            started,
            done.clone(),
        );
        Run {
            name: name.to_owned(),
            spec,
            shared,
            measure_from,
            end: measure_from + spec.duration,
            done,
            printer,
        }
    }

    /// Stops the progress line and merges the workers' histograms.
    fn finish(self, hists: Vec<Histogram<u64>>) -> Result<Measured, String> {
        self.done.store(true, Ordering::Relaxed);
        let _ = self.printer.join();
        Arc::into_inner(self.shared)
            .ok_or_else(|| "load counters still shared after the run".to_owned())?
            .finish(&self.name, &self.spec, self.measure_from, hists)
    }
}

/// Drives `op` (given the worker's operation number) from `spec.concurrency` tokio tasks.
pub async fn run_async<F, Fut>(
    name: &str,
    spec: LoadSpec,
    status: Option<StatusLine>,
    op: F,
) -> Result<Measured, String>
where
    F: Fn(u64) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<(), String>> + Send + 'static,
{
    let run = Run::start(name, spec, status);
    let (shared, end, measure_from) = (run.shared.clone(), run.end, run.measure_from);
    let mut workers = tokio::task::JoinSet::new();
    for w in 0..spec.concurrency {
        let shared = shared.clone();
        let op = op.clone();
        let mut hist = histogram()?;
        workers.spawn(async move {
            let mut i = (w as u64) << 40;
            while let Some((t0, measured)) = shared.next(&spec, end, measure_from) {
                let result = op(i).await;
                shared.record(&mut hist, t0, result, measured);
                i += 1;
            }
            hist
        });
    }
    let mut hists = Vec::with_capacity(spec.concurrency);
    while let Some(h) = workers.join_next().await {
        hists.push(h.map_err(|e| format!("a load worker failed: {e}"))?);
    }
    drop(shared);
    run.finish(hists)
}

/// One in-process worker: called with the operation number.
pub type Worker = Box<dyn FnMut(u64) -> Result<(), String> + Send>;

/// Drives in-process work from `spec.concurrency` OS threads; `make(w)` builds worker
/// `w`'s state before the clock starts.
pub fn run_threads(
    name: &str,
    spec: LoadSpec,
    make: impl Fn(usize) -> Result<Worker, String>,
) -> Result<Measured, String> {
    let workers = (0..spec.concurrency)
        .map(&make)
        .collect::<Result<Vec<_>, _>>()?;
    let run = Run::start(name, spec, None);
    let (shared, end, measure_from) = (run.shared.clone(), run.end, run.measure_from);
    let hists = std::thread::scope(|scope| {
        let handles = workers
            .into_iter()
            .enumerate()
            .map(|(w, mut work)| {
                let shared = shared.clone();
                scope.spawn(move || -> Result<Histogram<u64>, String> {
                    let mut hist = histogram()?;
                    let mut i = (w as u64) << 40;
                    while let Some((t0, measured)) = shared.next(&spec, end, measure_from) {
                        let result = work(i);
                        shared.record(&mut hist, t0, result, measured);
                        i += 1;
                    }
                    Ok(hist)
                })
            })
            .collect::<Vec<_>>();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .map_err(|_| "a load thread panicked".to_owned())
                    .and_then(|r| r)
            })
            .collect::<Result<Vec<_>, String>>()
    });
    drop(shared);
    run.finish(hists?)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use super::*;

    fn spec(concurrency: usize, max_ops: Option<u64>) -> LoadSpec {
        LoadSpec {
            concurrency,
            warmup: Duration::from_millis(50),
            duration: Duration::from_millis(300),
            max_ops,
        }
    }

    #[test]
    fn threads_measure_latency_and_count_errors() {
        let m = run_threads("t", spec(2, None), |_| {
            Ok(Box::new(|i| {
                std::thread::sleep(Duration::from_millis(2));
                if i % 10 == 3 {
                    Err(format!("op {i} failed"))
                } else {
                    Ok(())
                }
            }))
        })
        .unwrap();
        assert!(m.ops > 20, "{m:?}");
        assert!(m.errors > 0);
        assert!(m.first_error.as_deref().unwrap().contains("failed"));
        // Every successful op slept 2 ms: the median cannot be below that.
        assert!(m.quantile_us(0.5) >= 2_000.0, "{}", m.quantile_us(0.5));
        assert!(m.elapsed >= Duration::from_millis(250));
        assert!(m.throughput() > 0.0);
    }

    #[test]
    fn max_ops_stops_the_run_early() {
        let mut s = spec(3, Some(7));
        s.warmup = Duration::ZERO;
        let m = run_threads("t", s, |_| Ok(Box::new(|_| Ok(())))).unwrap();
        assert_eq!(m.ops, 7);
        // The cap counts warm-up operations too.
        let m = run_threads("t", spec(3, Some(7)), |_| Ok(Box::new(|_| Ok(())))).unwrap();
        assert_eq!(m.ops, 0);
    }

    #[tokio::test]
    async fn async_driver_runs_every_worker() {
        let seen = Arc::new(Mutex::new(std::collections::BTreeSet::new()));
        let s = seen.clone();
        let m = run_async("a", spec(4, None), None, move |i| {
            let s = s.clone();
            async move {
                s.lock().unwrap().insert(i >> 40);
                tokio::time::sleep(Duration::from_millis(1)).await;
                Ok(())
            }
        })
        .await
        .unwrap();
        assert_eq!(seen.lock().unwrap().len(), 4);
        assert!(m.ops > 0 && m.errors == 0);
    }
}
