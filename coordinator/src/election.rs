//! Elected singletons (coordinator/STORE.md, "Singletons"): background work that must
//! run once across every coordinator of a shared PostgreSQL store — audit checkpoints,
//! the purge of expired revocations, and key lifecycle (resuming pending activations,
//! scheduled refresh) — runs only on the coordinator that holds that job's
//! session-level advisory lock (`pg_try_advisory_lock`, PostgreSQL §9.27.10).
//!
//! The locks are taken on one dedicated connection, never a pooled one: a session-level
//! lock lives exactly as long as its session, so a coordinator that crashes (or loses
//! its connection) releases every job at once, and another takes each over at its next
//! [`TICK`]. Each tick a coordinator checks its session is alive (holding on) or tries
//! the locks it lacks; a failed check or a lost connection means "not leader" for every
//! job until a new session acquires them again. A job that was already running when its
//! lock was lost finishes that one run: the overlap is at most one run, plus the time
//! to notice (one tick, or the query time limit of [`CHECK_TIMEOUT`]).
//!
//! The same session holds a lock on the coordinator's instance id ([`instance_key`]),
//! taken before anything else at start: a second coordinator given an id in use waits
//! up to [`INSTANCE_WAIT`] and then refuses to start, before it could discard the first
//! one's presignatures on the nodes. Like every store session it asks the server for TCP
//! keepalives ([`crate::pg::SERVER_KEEPALIVES`]), so that the session of a coordinator
//! whose host vanished without closing its socket ends, and its locks pass on, within
//! seconds rather than the operating system's default two hours.
//!
//! With the embedded redb store there is one coordinator: [`Election::always`] leads
//! every job.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// How often a coordinator checks or tries its locks.
pub const TICK: Duration = Duration::from_secs(1);

/// The time limit of connecting and of each check.
pub const CHECK_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a starting coordinator waits for its instance id's lock before refusing to
/// start: longer than the server takes to end the session of a coordinator that died
/// with its host ([`crate::pg::SERVER_KEEPALIVES`]: about 5 s).
pub const INSTANCE_WAIT: Duration = Duration::from_secs(8);

/// The advisory lock key of coordinator instance `instance`: the first 8 bytes of
/// SHA-256 over a fixed label and the id, so distinct ids collide with each other or
/// with [`Job::lock_key`] with probability about 2^-64.
pub fn instance_key(instance: &str) -> i64 {
    use sha2::Digest as _;
    let d = sha2::Sha256::new()
        .chain_update(b"quorate coordinator instance\0")
        .chain_update(instance.as_bytes())
        .finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(d.get(..8).unwrap_or(&[0; 8]));
    i64::from_be_bytes(first)
}

/// A background job that runs on one coordinator at a time.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Job {
    /// Threshold-signed audit checkpoints (`audit::checkpoint`).
    Checkpoint,
    /// Forgetting revocations of expired tokens.
    Purge,
    /// Resuming pending key activations and scheduled share refresh (`lifecycle`).
    Lifecycle,
}

impl Job {
    /// Every job.
    pub const ALL: [Job; 3] = [Job::Checkpoint, Job::Purge, Job::Lifecycle];

    /// The job's name in logs and metrics.
    pub fn name(self) -> &'static str {
        match self {
            Job::Checkpoint => "audit-checkpoint",
            Job::Purge => "revocation-purge",
            Job::Lifecycle => "key-lifecycle",
        }
    }

    /// The job's advisory lock key: `"QRTE"` in the high 32 bits (so that other users
    /// of advisory locks in the same database are unlikely to collide), the job's
    /// number in the low ones. Migrations use transaction-level locks on other keys.
    pub fn lock_key(self) -> i64 {
        const PREFIX: i64 = 0x5152_5445 << 32;
        PREFIX
            | match self {
                Job::Checkpoint => 1,
                Job::Purge => 2,
                Job::Lifecycle => 3,
            }
    }

    fn slot(self) -> usize {
        match self {
            Job::Checkpoint => 0,
            Job::Purge => 1,
            Job::Lifecycle => 2,
        }
    }
}

struct Inner {
    /// The redb store: every job is led here.
    always: bool,
    /// Whether this coordinator holds each job's lock, by [`Job::slot`].
    held: [AtomicBool; 3],
    /// This coordinator's instance id, for logs and metrics.
    instance: String,
}

/// Which singleton jobs this coordinator leads. Cheap to clone; asked by each job's
/// loop at every tick of its own.
#[derive(Clone)]
pub struct Election {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Election {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let held: Vec<&str> = Job::ALL
            .iter()
            .filter(|j| self.is_leader(**j))
            .map(|j| j.name())
            .collect();
        f.debug_struct("Election")
            .field("instance", &self.inner.instance)
            .field("leads", &held)
            .finish()
    }
}

impl Election {
    /// The single coordinator of a redb store: leads every job.
    pub fn always(instance: &str) -> Self {
        Self {
            inner: Arc::new(Inner {
                always: true,
                held: [const { AtomicBool::new(true) }; 3],
                instance: instance.to_owned(),
            }),
        }
    }

    /// Claims `instance` and campaigns for every job over a dedicated PostgreSQL session
    /// made from `cfg` (the `--store` URL's settings), in a background task for the life
    /// of the runtime. Leads nothing until the first job lock is taken.
    ///
    /// Errors: the store cannot be reached, or another running coordinator of the store
    /// holds `instance` for all of [`INSTANCE_WAIT`].
    pub async fn postgres(cfg: crate::pg::Target, instance: &str) -> Result<Self, String> {
        let key = instance_key(instance);
        let s = connect(&cfg).await?;
        let deadline = tokio::time::Instant::now() + INSTANCE_WAIT;
        while !try_lock(&s, key).await? {
            if tokio::time::Instant::now() >= deadline {
                return Err(format!(
                    "coordinator instance id `{instance}` is in use: another running coordinator of this store holds it (advisory lock {key}) and has for {} s; give each coordinator its own --instance-id (QUORATE_COORDINATOR_INSTANCE)",
                    INSTANCE_WAIT.as_secs()
                ));
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        let e = Self {
            inner: Arc::new(Inner {
                always: false,
                held: [const { AtomicBool::new(false) }; 3],
                instance: instance.to_owned(),
            }),
        };
        tokio::spawn(campaign(Arc::clone(&e.inner), cfg, s, key));
        Ok(e)
    }

    /// Whether this coordinator holds `job`'s lock now (as of its last check).
    pub fn is_leader(&self, job: Job) -> bool {
        self.inner
            .held
            .get(job.slot())
            .is_some_and(|h| h.load(Ordering::Acquire))
    }

    /// `quorate_coordinator_leader{job, instance}`: 1 for each job this coordinator
    /// leads, 0 for the others (Prometheus text format).
    pub fn render_metrics(&self) -> String {
        let mut m = quorate_proto::metrics::Exposition::default();
        m.family(
            "quorate_coordinator_leader",
            "gauge",
            "1 if this coordinator runs the singleton job (it holds the job's lock in the shared store), else 0.",
        );
        for job in Job::ALL {
            m.sample(
                "quorate_coordinator_leader",
                &[("job", job.name()), ("instance", &self.inner.instance)],
                u64::from(self.is_leader(job)),
            );
        }
        m.finish()
    }
}

fn set(inner: &Inner, job: Job, leads: bool) {
    if inner.always {
        return;
    }
    let Some(h) = inner.held.get(job.slot()) else {
        return;
    };
    let was = h.swap(leads, Ordering::AcqRel);
    if was != leads {
        if leads {
            tracing::info!(
                job = job.name(),
                instance = %inner.instance,
                "this coordinator now runs the job"
            );
        } else {
            tracing::warn!(
                job = job.name(),
                instance = %inner.instance,
                "this coordinator no longer runs the job (its store session is gone)"
            );
        }
    }
}

fn lose_all(inner: &Inner) {
    for job in Job::ALL {
        set(inner, job, false);
    }
}

/// One dedicated session and the task driving its connection.
struct Session {
    client: tokio_postgres::Client,
    conn: tokio::task::JoinHandle<()>,
}

impl Drop for Session {
    fn drop(&mut self) {
        // Closing the socket ends the session on the server, releasing its locks.
        self.conn.abort();
    }
}

async fn connect(cfg: &crate::pg::Target) -> Result<Session, String> {
    let (client, conn) = tokio::time::timeout(CHECK_TIMEOUT, cfg.connect())
        .await
        .map_err(|_| format!("no connection within {} s", CHECK_TIMEOUT.as_secs()))?
        .map_err(|e| e.to_string())?;
    Ok(Session { client, conn })
}

/// `pg_try_advisory_lock(key)` on the session: whether it holds the lock now.
async fn try_lock(s: &Session, key: i64) -> Result<bool, String> {
    let row = tokio::time::timeout(
        CHECK_TIMEOUT,
        s.client
            .query_one("SELECT pg_try_advisory_lock($1)", &[&key]),
    )
    .await
    .map_err(|_| format!("no answer within {} s", CHECK_TIMEOUT.as_secs()))?
    .map_err(|e| e.to_string())?;
    row.try_get::<_, bool>(0).map_err(|e| e.to_string())
}

/// One check: takes each lock not yet held (`pg_try_advisory_lock` never waits), or,
/// if every lock is held, proves the session alive. Returns the jobs now led.
async fn check(s: &Session, inner: &Inner) -> Result<Vec<(Job, bool)>, String> {
    let mut out = Vec::new();
    let mut asked = false;
    for job in Job::ALL {
        let held = inner
            .held
            .get(job.slot())
            .is_some_and(|h| h.load(Ordering::Acquire));
        if held {
            out.push((job, true));
            continue;
        }
        let row = s
            .client
            .query_one("SELECT pg_try_advisory_lock($1)", &[&job.lock_key()])
            .await
            .map_err(|e| e.to_string())?;
        asked = true;
        out.push((job, row.try_get::<_, bool>(0).map_err(|e| e.to_string())?));
    }
    if !asked {
        s.client
            .simple_query("SELECT 1")
            .await
            .map_err(|e| e.to_string())?;
    }
    Ok(out)
}

async fn campaign(inner: Arc<Inner>, cfg: crate::pg::Target, first: Session, instance_key: i64) {
    let mut session: Option<Session> = Some(first);
    let mut failing = false;
    let mut taken = false;
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if session.as_ref().is_some_and(|s| s.conn.is_finished()) {
            session = None;
            lose_all(&inner);
        }
        let s = match session.take() {
            Some(s) => s,
            None => match connect(&cfg).await {
                // A new session holds nothing: the instance id first, as at start.
                Ok(s) => match try_lock(&s, instance_key).await {
                    Ok(true) => {
                        taken = false;
                        s
                    }
                    Ok(false) => {
                        if !taken {
                            tracing::error!(
                                instance = %inner.instance,
                                "another coordinator of this store now runs under this instance id (it took the id while this one's store session was lost); leading no singleton job until it is free. Give each coordinator its own --instance-id"
                            );
                            taken = true;
                        }
                        continue;
                    }
                    Err(e) => {
                        if !failing {
                            tracing::warn!(error = %e, "the election's new store session failed; leading no singleton job until one opens");
                            failing = true;
                        }
                        continue;
                    }
                },
                Err(e) => {
                    if !failing {
                        tracing::warn!(error = %e, "cannot open the election's store session; leading no singleton job until it opens");
                        failing = true;
                    }
                    continue;
                }
            },
        };
        match tokio::time::timeout(CHECK_TIMEOUT, check(&s, &inner)).await {
            Ok(Ok(led)) => {
                if failing {
                    tracing::info!("the election's store session is open again");
                    failing = false;
                }
                for (job, leads) in led {
                    set(&inner, job, leads);
                }
                session = Some(s);
            }
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "the election's store session failed; leading no singleton job until a new one takes the locks");
                lose_all(&inner);
                failing = true;
            }
            Err(_) => {
                tracing::warn!(
                    "the election's store session did not answer within {} s; leading no singleton job until a new one takes the locks",
                    CHECK_TIMEOUT.as_secs()
                );
                lose_all(&inner);
                failing = true;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_redb_coordinator_leads_every_job_and_lock_keys_differ() {
        let e = Election::always("solo");
        for job in Job::ALL {
            assert!(e.is_leader(job));
        }
        // Losing a session is meaningless without one.
        set(&e.inner, Job::Checkpoint, false);
        assert!(e.is_leader(Job::Checkpoint));
        let mut keys: std::collections::HashSet<i64> =
            Job::ALL.iter().map(|j| j.lock_key()).collect();
        for id in ["coord-a", "coord-b", "host-7100", ""] {
            keys.insert(instance_key(id));
        }
        assert_eq!(keys.len(), Job::ALL.len() + 4);
        assert_eq!(instance_key("coord-a"), instance_key("coord-a"));
        let m = e.render_metrics();
        assert!(
            m.contains(r#"quorate_coordinator_leader{job="audit-checkpoint",instance="solo"} 1"#),
            "{m}"
        );
    }
}
