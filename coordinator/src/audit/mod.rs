//! The audit trail (DESIGN.md §1 invariant 6, §7): every decision — allow, deny,
//! pending, approval, revocation, key operation — is an [`record::Event`] appended to a
//! hash chain in the [`AuditStore`] (`audit.redb`, or PostgreSQL: `coordinator/STORE.md`)
//! and written to every configured sink *before* the effect
//! is returned. If the store or any sink fails, [`AuditLog::append`] fails and so does
//! the request (fail closed).
//!
//! Sinks ([`SinkSpec`]):
//! - **file**: JSON lines, appended and flushed per event. The file follows the store:
//!   if it missed events (it failed, or was added later), the missing ones are written
//!   first, so the file is always a whole chain that `quorate audit verify` can check;
//! - **stdout**: JSON lines;
//! - **syslog**: RFC 5424 over UDP or a Unix datagram socket; the message is the JSON
//!   line, with `[quorate@32473 seq= outcome= kind=]` structured data (32473 is the
//!   example enterprise number of RFC 5612: replace it when registering one).
//!
//! Checkpoints ([`AuditLog::checkpoint`]) sign the chain head with the threshold cluster.
//! Secrets and whole tokens never enter an event: tokens appear by `jti`, credentials by
//! a fingerprint of their public context.

pub mod checkpoint;
/// The event format, hash chaining and the offline verifier live in
/// [`quorate_proto::audit`], shared with `quorate audit verify`; this path keeps naming
/// them here, next to the writer that uses them.
pub use quorate_proto::audit as record;

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use tokio::sync::broadcast;

use record::{Event, Fields, GENESIS, Outcome};

const EVENTS: TableDefinition<u64, &str> = TableDefinition::new("audit_events");

/// Where the chain is kept: events by sequence number, as their JSON lines.
pub trait AuditStore: Send + Sync {
    /// The sequence number and JSON line of the newest event, if any.
    fn last(&self) -> Result<Option<(u64, String)>, String>;
    /// Writes a batch of chained events (each with its JSON line) in one durable
    /// transaction; their sequence numbers follow the stored head's. A store shared by
    /// several coordinators checks, under a lock on the head, that the batch follows
    /// its head, and answers [`CommitError::Behind`] with the head when another
    /// coordinator appended meanwhile.
    fn commit(&self, batch: &[(Event, String)]) -> Result<(), CommitError>;
    /// The JSON lines of events `from..to`, in order.
    fn lines(&self, from: u64, to: u64) -> Result<Vec<String>, String>;
    /// Whether [`AuditStore::commit`] checks the batch against its head. Then a failed
    /// commit leaves the trail usable (the next batch is chained again onto the stored
    /// head); otherwise the trail refuses every append until a restart.
    fn rechains(&self) -> bool {
        false
    }
}

/// Why [`AuditStore::commit`] wrote nothing.
#[derive(Debug)]
pub enum CommitError {
    /// The stored chain moved on: chain the batch again from `next` after `head`.
    Behind {
        /// The sequence number the batch must start at.
        next: u64,
        /// The hash its first event must chain to.
        head: String,
    },
    /// The store failed.
    Failed(String),
}

/// The embedded chain store: `audit_events` (sequence number → JSON line) in a redb file.
pub struct RedbAuditStore {
    db: Database,
    path: PathBuf,
}

impl RedbAuditStore {
    /// Opens (or creates) the store at `path`.
    pub fn open(path: &Path) -> Result<Self, String> {
        let db =
            Database::create(path).map_err(|e| format!("audit store {}: {e}", path.display()))?;
        let me = RedbAuditStore {
            db,
            path: path.to_owned(),
        };
        let tx = me.db.begin_write().map_err(|e| me.err(e.into()))?;
        tx.open_table(EVENTS).map_err(|e| me.err(e.into()))?;
        tx.commit().map_err(|e| me.err(e.into()))?;
        Ok(me)
    }

    fn err(&self, e: redb::Error) -> String {
        format!("audit store {}: {e}", self.path.display())
    }
}

impl AuditStore for RedbAuditStore {
    fn last(&self) -> Result<Option<(u64, String)>, String> {
        let tx = self.db.begin_read().map_err(|e| self.err(e.into()))?;
        let table = tx.open_table(EVENTS).map_err(|e| self.err(e.into()))?;
        let last = table.last().map_err(|e| self.err(e.into()))?;
        Ok(last.map(|(k, v)| (k.value(), v.value().to_owned())))
    }

    fn commit(&self, batch: &[(Event, String)]) -> Result<(), CommitError> {
        let store = |e: redb::Error| CommitError::Failed(format!("audit store: {e}"));
        let tx = self.db.begin_write().map_err(|e| store(e.into()))?;
        {
            let mut t = tx.open_table(EVENTS).map_err(|e| store(e.into()))?;
            for (ev, line) in batch {
                t.insert(ev.seq, line.as_str())
                    .map_err(|e| store(e.into()))?;
            }
        }
        tx.commit().map_err(|e| store(e.into()))
    }

    fn lines(&self, from: u64, to: u64) -> Result<Vec<String>, String> {
        let store = |e: redb::Error| format!("audit store: {e}");
        let tx = self.db.begin_read().map_err(|e| store(e.into()))?;
        let table = tx.open_table(EVENTS).map_err(|e| store(e.into()))?;
        let mut out = Vec::new();
        for row in table.range(from..to).map_err(|e| store(e.into()))? {
            let (_, v) = row.map_err(|e| store(e.into()))?;
            out.push(v.value().to_owned());
        }
        Ok(out)
    }
}

/// Why the audit trail could not take an event.
#[derive(Debug, thiserror::Error)]
#[error("audit trail unavailable, request refused: {0}")]
pub struct AuditError(pub String);

impl From<AuditError> for tonic::Status {
    fn from(e: AuditError) -> Self {
        tonic::Status::unavailable(e.to_string())
    }
}

/// Where events go besides the store.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SinkSpec {
    /// A JSON-lines file.
    File(PathBuf),
    /// Standard output.
    Stdout,
    /// RFC 5424 over UDP (`udp://host:port`).
    SyslogUdp(std::net::SocketAddr),
    /// RFC 5424 over a Unix datagram socket (`unix:/dev/log`).
    SyslogUnix(PathBuf),
}

impl std::str::FromStr for SinkSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s == "stdout" || s == "-" {
            Ok(Self::Stdout)
        } else if let Some(a) = s.strip_prefix("syslog+udp://") {
            a.parse()
                .map(Self::SyslogUdp)
                .map_err(|e| format!("audit sink {s:?}: {e} (want syslog+udp://HOST:PORT)"))
        } else if let Some(p) = s.strip_prefix("syslog+unix:") {
            Ok(Self::SyslogUnix(PathBuf::from(p)))
        } else if let Some(p) = s.strip_prefix("file:") {
            Ok(Self::File(PathBuf::from(p)))
        } else {
            Err(format!(
                "audit sink {s:?}: use file:PATH, stdout, syslog+udp://HOST:PORT or syslog+unix:PATH"
            ))
        }
    }
}

impl std::fmt::Display for SinkSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::File(p) => write!(f, "file:{}", p.display()),
            Self::Stdout => f.write_str("stdout"),
            Self::SyslogUdp(a) => write!(f, "syslog+udp://{a}"),
            Self::SyslogUnix(p) => write!(f, "syslog+unix:{}", p.display()),
        }
    }
}

enum Sink {
    File {
        path: PathBuf,
        file: std::fs::File,
        /// The next sequence number the file needs.
        next: u64,
    },
    Stdout,
    SyslogUdp {
        to: std::net::SocketAddr,
        socket: std::net::UdpSocket,
    },
    SyslogUnix {
        path: PathBuf,
        socket: std::os::unix::net::UnixDatagram,
    },
}

impl Sink {
    fn open(spec: &SinkSpec) -> Result<Self, String> {
        Ok(match spec {
            SinkSpec::File(path) => {
                let next = match std::fs::metadata(path) {
                    Ok(m) if m.is_file() => last_seq_in(path)?.map_or(0, |s| s.saturating_add(1)),
                    _ => 0,
                };
                let file = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .map_err(|e| format!("audit file {}: {e}", path.display()))?;
                Sink::File {
                    path: path.clone(),
                    file,
                    next,
                }
            }
            SinkSpec::Stdout => Sink::Stdout,
            SinkSpec::SyslogUdp(to) => {
                let bind = if to.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" };
                let socket = std::net::UdpSocket::bind(bind)
                    .map_err(|e| format!("audit syslog socket: {e}"))?;
                Sink::SyslogUdp { to: *to, socket }
            }
            SinkSpec::SyslogUnix(path) => {
                let socket = std::os::unix::net::UnixDatagram::unbound()
                    .map_err(|e| format!("audit syslog socket: {e}"))?;
                Sink::SyslogUnix {
                    path: path.clone(),
                    socket,
                }
            }
        })
    }

    fn name(&self) -> String {
        match self {
            Sink::File { path, .. } => format!("file {}", path.display()),
            Sink::Stdout => "stdout".into(),
            Sink::SyslogUdp { to, .. } => format!("syslog udp {to}"),
            Sink::SyslogUnix { path, .. } => format!("syslog {}", path.display()),
        }
    }

    /// Writes `ev`; a file first catches up on the events it missed (from `store`).
    fn write(&mut self, ev: &Event, line: &str, store: &dyn AuditStore) -> Result<(), String> {
        let name = self.name();
        let fail = |e: std::io::Error| format!("audit sink {name} failed: {e}");
        match self {
            Sink::File { file, next, .. } => {
                if *next > ev.seq {
                    return Err(format!(
                        "audit sink {name} already holds event {} and later: it belongs to another chain",
                        ev.seq
                    ));
                }
                let mut buf = String::new();
                if *next < ev.seq {
                    for l in store.lines(*next, ev.seq)? {
                        buf.push_str(&l);
                        buf.push('\n');
                    }
                }
                buf.push_str(line);
                buf.push('\n');
                file.write_all(buf.as_bytes()).map_err(fail)?;
                file.flush().map_err(fail)?;
                *next = ev.seq.saturating_add(1);
            }
            Sink::Stdout => {
                let mut out = std::io::stdout().lock();
                writeln!(out, "{line}").map_err(fail)?;
                out.flush().map_err(fail)?;
            }
            Sink::SyslogUdp { to, socket } => {
                socket
                    .send_to(syslog_message(ev, line).as_bytes(), *to)
                    .map_err(fail)?;
            }
            Sink::SyslogUnix { path, socket } => {
                socket
                    .send_to(syslog_message(ev, line).as_bytes(), &*path)
                    .map_err(fail)?;
            }
        }
        Ok(())
    }
}

/// The sequence number of the last event in a JSON-lines file, if any.
fn last_seq_in(path: &Path) -> Result<Option<u64>, String> {
    let text =
        std::fs::read_to_string(path).map_err(|e| format!("audit file {}: {e}", path.display()))?;
    let Some(last) = text.lines().rev().find(|l| !l.trim().is_empty()) else {
        return Ok(None);
    };
    let ev: Event = serde_json::from_str(last).map_err(|e| {
        format!(
            "audit file {}: its last line is not an audit event ({e}); move it aside",
            path.display()
        )
    })?;
    Ok(Some(ev.seq))
}

/// Chains `events` again, in order, from sequence number `next` after hash `prev`
/// (same ids, times and contents). Returns the next sequence number and the new head.
fn rechain(
    events: &mut [(Event, String)],
    mut next: u64,
    mut prev: String,
) -> Result<(u64, String), String> {
    for (ev, line) in events.iter_mut() {
        let again = Event::chain(
            next,
            std::mem::take(&mut ev.id),
            std::mem::take(&mut ev.time),
            ev.outcome,
            std::mem::take(&mut ev.fields),
            &prev,
        )?;
        *line = again.to_line()?;
        next = again.seq.saturating_add(1);
        prev = again.hash.clone();
        *ev = again;
    }
    Ok((next, prev))
}

/// An RFC 5424 message: facility `authpriv` (10); severity notice for refusals and
/// errors, informational otherwise.
fn syslog_message(ev: &Event, line: &str) -> String {
    let severity = match ev.outcome {
        Outcome::Deny | Outcome::Rejected | Outcome::Expired | Outcome::Error => 5,
        _ => 6,
    };
    let pri = 10 * 8 + severity;
    let host = hostname();
    format!(
        "<{pri}>1 {} {host} quorate-coordinator {} {} [quorate@32473 seq=\"{}\" outcome=\"{}\" kind=\"{}\"] {line}",
        ev.time,
        std::process::id(),
        sd_safe(&ev.fields.action),
        ev.seq,
        ev.outcome.as_str(),
        sd_escape(&ev.fields.kind),
    )
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| sd_safe(h.trim()))
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "-".into())
}

/// PRINTUSASCII without spaces, at most 32 characters (MSGID, HOSTNAME).
fn sd_safe(s: &str) -> String {
    let v: String = s
        .chars()
        .filter(|c| c.is_ascii_graphic())
        .take(32)
        .collect();
    if v.is_empty() { "-".into() } else { v }
}

/// Escapes `"`, `\` and `]` in a structured-data value.
fn sd_escape(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        if matches!(c, '"' | '\\' | ']') {
            o.push('\\');
        }
        o.push(c);
    }
    o
}

/// The chain as events are appended: the next sequence number, the newest hash, and
/// the chained events waiting for the next group commit.
struct Chain {
    next: u64,
    prev: String,
    queue: Vec<(Event, String)>,
    /// Set when a commit failed: the in-memory chain then runs ahead of the store, so
    /// every later append fails until a restart reloads the head from the store.
    broken: Option<String>,
}

/// What is durable, and the sinks (written by one committer at a time, in order).
struct Committed {
    next: u64,
    head: String,
    sinks: Vec<Sink>,
    /// The newest event a checkpoint covers.
    checkpointed: Option<u64>,
    /// Outcomes of committed events (by event id) whose appenders have not collected
    /// them yet.
    results: std::collections::HashMap<String, Result<Event, String>>,
}

/// The audit trail: the chain store, the sinks and the live feed.
pub struct AuditLog {
    store: Box<dyn AuditStore>,
    chain: Mutex<Chain>,
    committed: Mutex<Committed>,
    feed: broadcast::Sender<Arc<Event>>,
    rng: Mutex<rand::rngs::StdRng>,
}

impl AuditLog {
    /// Opens (or creates) the redb chain at `path`, checks its last link, and opens
    /// `sinks`.
    pub fn open(path: &Path, sinks: &[SinkSpec]) -> Result<Self, String> {
        Self::with_store(Box::new(RedbAuditStore::open(path)?), sinks)
    }

    /// The trail over `store`: checks its last link, and opens `sinks`.
    pub fn with_store(store: Box<dyn AuditStore>, sinks: &[SinkSpec]) -> Result<Self, String> {
        use rand::SeedableRng as _;
        let (next, prev, checkpointed) = match store.last()? {
            None => (0, GENESIS.to_owned(), None),
            Some((seq, line)) => {
                let ev: Event = serde_json::from_str(&line)
                    .map_err(|e| format!("audit store: last event does not parse: {e}"))?;
                if ev.seq != seq || ev.compute_hash()? != ev.hash {
                    return Err(format!(
                        "audit store: the last event (seq {seq}) does not match its hash"
                    ));
                }
                let covered = ev.fields.checkpoint.as_ref().map(|c| c.seq);
                (ev.seq.saturating_add(1), ev.hash, covered)
            }
        };
        let sinks = sinks
            .iter()
            .map(Sink::open)
            .collect::<Result<Vec<_>, _>>()?;
        let rng = rand::rngs::StdRng::try_from_rng(&mut rand::rngs::SysRng)
            .map_err(|e| format!("system RNG failed: {e}"))?;
        let (feed, _) = broadcast::channel(4096);
        Ok(AuditLog {
            store,
            chain: Mutex::new(Chain {
                next,
                prev: prev.clone(),
                queue: Vec::new(),
                broken: None,
            }),
            committed: Mutex::new(Committed {
                next,
                head: prev,
                sinks,
                checkpointed,
                results: std::collections::HashMap::new(),
            }),
            feed,
            rng: Mutex::new(rng),
        })
    }

    fn event_id(&self) -> Result<String, AuditError> {
        let mut rng = self
            .rng
            .lock()
            .map_err(|_| AuditError("RNG lock poisoned".into()))?;
        let mut b = [0u8; 12];
        rand::Rng::fill_bytes(&mut *rng, &mut b);
        Ok(format!("ev-{}", hex::encode(b)))
    }

    /// Chains an event, commits it durably, writes it to every sink and publishes it to
    /// tails. Any failure is returned: the caller must then not let the effect through.
    ///
    /// Group commit: concurrent appends are chained in order under a short lock, and
    /// whichever appender next holds the commit lock writes every waiting event in one
    /// store transaction (one fsync) and to the sinks, in sequence order.
    pub fn append_blocking(&self, outcome: Outcome, fields: Fields) -> Result<Event, AuditError> {
        let id = self.event_id()?;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
            .unwrap_or(0);
        {
            let mut chain = self.lock_chain()?;
            if let Some(why) = &chain.broken {
                return Err(AuditError(format!(
                    "the audit store failed earlier ({why}); restart the coordinator"
                )));
            }
            let ev = Event::chain(
                chain.next,
                id.clone(),
                record::rfc3339_millis(now),
                outcome,
                fields,
                &chain.prev,
            )
            .map_err(AuditError)?;
            let line = ev.to_line().map_err(AuditError)?;
            chain.next = ev.seq.saturating_add(1);
            chain.prev = ev.hash.clone();
            chain.queue.push((ev, line));
        }
        let mut committed = self
            .committed
            .lock()
            .map_err(|_| AuditError("audit lock poisoned".into()))?;
        if let Some(result) = committed.results.remove(&id) {
            return result.map_err(AuditError);
        }
        let mut batch = std::mem::take(&mut self.lock_chain()?.queue);
        if let Err(why) = self.commit(&mut batch) {
            if !self.store.rechains() {
                self.lock_chain()?.broken = Some(why.clone());
            }
            for (queued, _) in &batch {
                committed
                    .results
                    .insert(queued.id.clone(), Err(why.clone()));
            }
        } else {
            for (queued, line) in batch {
                let mut failed = Vec::new();
                for s in &mut committed.sinks {
                    if let Err(e) = s.write(&queued, &line, &*self.store) {
                        failed.push(e);
                    }
                }
                if let Some(cp) = &queued.fields.checkpoint {
                    committed.checkpointed = Some(cp.seq);
                }
                committed.next = queued.seq.saturating_add(1);
                committed.head = queued.hash.clone();
                let result = if failed.is_empty() {
                    Ok(queued.clone())
                } else {
                    let why = failed.join("; ");
                    tracing::error!(seq = queued.seq, errors = %why, "audit sink failed");
                    Err(why)
                };
                committed.results.insert(queued.id.clone(), result);
                let _ = self.feed.send(Arc::new(queued));
            }
        }
        committed
            .results
            .remove(&id)
            .unwrap_or_else(|| Err("internal error: an audit event was not committed".to_owned()))
            .map_err(AuditError)
    }

    /// Commits `batch`; when another coordinator appended first, chains the batch (and
    /// the events queued behind it) again onto the stored head and retries.
    fn commit(&self, batch: &mut [(Event, String)]) -> Result<(), String> {
        const ATTEMPTS: usize = 16;
        for _ in 0..ATTEMPTS {
            match self.store.commit(batch) {
                Ok(()) => return Ok(()),
                Err(CommitError::Failed(why)) => return Err(why),
                Err(CommitError::Behind { next, head }) => {
                    let (next, head) = rechain(batch, next, head)?;
                    let mut chain = self.lock_chain().map_err(|e| e.0)?;
                    let (next, head) = rechain(&mut chain.queue, next, head)?;
                    chain.next = next;
                    chain.prev = head;
                }
            }
        }
        Err(format!(
            "the audit chain moved on {ATTEMPTS} times in a row under this append; retry"
        ))
    }

    fn lock_chain(&self) -> Result<std::sync::MutexGuard<'_, Chain>, AuditError> {
        self.chain
            .lock()
            .map_err(|_| AuditError("audit lock poisoned".into()))
    }

    /// [`Self::append_blocking`] off the async workers.
    pub async fn append(
        self: &Arc<Self>,
        outcome: Outcome,
        fields: Fields,
    ) -> Result<Event, AuditError> {
        let me = Arc::clone(self);
        tokio::task::spawn_blocking(move || me.append_blocking(outcome, fields))
            .await
            .map_err(|e| AuditError(format!("audit task failed: {e}")))?
    }

    /// The sequence number and hash of the newest durable event, and the newest event a
    /// checkpoint covers.
    pub fn head(&self) -> Option<(u64, String, Option<u64>)> {
        let c = self.committed.lock().ok()?;
        let last = c.next.checked_sub(1)?;
        Some((last, c.head.clone(), c.checkpointed))
    }

    /// The head a checkpoint should cover, as [`AuditLog::head`]. Over a store that
    /// several coordinators append to ([`AuditStore::rechains`]), read from the store:
    /// this process's own view lags the others' appends, and the last stored event
    /// tells whether a checkpoint (by any coordinator) already covers it.
    pub fn checkpoint_head(&self) -> Result<Option<(u64, String, Option<u64>)>, String> {
        if !self.store.rechains() {
            return Ok(self.head());
        }
        let Some((seq, line)) = self.store.last()? else {
            return Ok(None);
        };
        let ev: Event = serde_json::from_str(&line)
            .map_err(|e| format!("audit store: event {seq} does not parse: {e}"))?;
        let covered = ev.fields.checkpoint.as_ref().map(|c| c.seq);
        Ok(Some((seq, ev.hash, covered)))
    }

    /// Stored events `from..to` as JSON lines.
    pub fn lines(&self, from: u64, to: u64) -> Result<Vec<String>, AuditError> {
        self.store.lines(from, to).map_err(AuditError)
    }

    /// Subscribes to new events, returning the next sequence number not yet published
    /// (events below it are in the store).
    pub fn subscribe(&self) -> Result<(broadcast::Receiver<Arc<Event>>, u64), AuditError> {
        let c = self
            .committed
            .lock()
            .map_err(|_| AuditError("audit lock poisoned".into()))?;
        Ok((self.feed.subscribe(), c.next))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::indexing_slicing)]
    use super::*;

    struct Dir(PathBuf);
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    fn dir(label: &str) -> Dir {
        let d = std::env::temp_dir().join(format!("quorate-audit-{label}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        Dir(d)
    }
    fn fields(action: &str) -> Fields {
        Fields {
            kind: "test".into(),
            action: action.into(),
            ..Fields::default()
        }
    }
    fn none() -> jsonwebtoken::jwk::JwkSet {
        jsonwebtoken::jwk::JwkSet { keys: vec![] }
    }

    #[test]
    fn a_sink_that_cannot_write_fails_the_append_and_the_store_keeps_the_event() {
        let d = dir("full");
        let log =
            AuditLog::open(&d.0.join("a.redb"), &[SinkSpec::File("/dev/full".into())]).unwrap();
        let e = log
            .append_blocking(Outcome::Allow, fields("x"))
            .unwrap_err();
        assert!(e.to_string().contains("/dev/full"), "{e}");
        assert_eq!(log.head().unwrap().0, 0);
        assert_eq!(log.lines(0, 1).unwrap().len(), 1);
    }

    #[test]
    fn a_file_added_later_is_backfilled_and_the_chain_survives_a_restart() {
        let d = dir("backfill");
        let db = d.0.join("a.redb");
        let file = d.0.join("audit.jsonl");
        {
            let log = AuditLog::open(&db, &[]).unwrap();
            log.append_blocking(Outcome::Allow, fields("a")).unwrap();
            log.append_blocking(Outcome::Deny, fields("b")).unwrap();
        }
        {
            let log = AuditLog::open(&db, &[SinkSpec::File(file.clone())]).unwrap();
            log.append_blocking(Outcome::Pending, fields("c")).unwrap();
        }
        let log = AuditLog::open(&db, &[SinkSpec::File(file.clone())]).unwrap();
        log.append_blocking(Outcome::Allow, fields("d")).unwrap();
        let text = std::fs::read_to_string(&file).unwrap();
        let v = record::verify_chain(&text, &none()).unwrap();
        assert_eq!(v.events, 4);
        assert_eq!(text, log.lines(0, 4).unwrap().join("\n") + "\n");
    }

    #[test]
    fn concurrent_appends_form_one_chain_in_the_store_and_the_file() {
        let d = dir("concurrent");
        let file = d.0.join("audit.jsonl");
        let log =
            Arc::new(AuditLog::open(&d.0.join("a.redb"), &[SinkSpec::File(file.clone())]).unwrap());
        let threads: Vec<_> = (0..8)
            .map(|t| {
                let log = Arc::clone(&log);
                std::thread::spawn(move || {
                    for i in 0..40 {
                        let ev = log
                            .append_blocking(Outcome::Allow, fields(&format!("t{t}-{i}")))
                            .unwrap();
                        assert_eq!(ev.fields.action, format!("t{t}-{i}"));
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let text = std::fs::read_to_string(&file).unwrap();
        assert_eq!(record::verify_chain(&text, &none()).unwrap().events, 320);
        assert_eq!(text, log.lines(0, 320).unwrap().join("\n") + "\n");
        assert_eq!(log.head().unwrap().0, 319);
    }

    #[test]
    fn syslog_over_udp_is_rfc_5424() {
        let d = dir("udp");
        let rx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        rx.set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        let spec: SinkSpec = format!("syslog+udp://{}", rx.local_addr().unwrap())
            .parse()
            .unwrap();
        let log = AuditLog::open(&d.0.join("a.redb"), &[spec]).unwrap();
        log.append_blocking(Outcome::Deny, fields("issue_token"))
            .unwrap();
        let mut buf = [0u8; 4096];
        let n = rx.recv(&mut buf).unwrap();
        let msg = std::str::from_utf8(&buf[..n]).unwrap();
        // <authpriv.notice>1 TIMESTAMP HOST APP PROCID MSGID [SD] MSG
        let parts: Vec<&str> = msg.splitn(8, ' ').collect();
        assert_eq!(parts[0], "<85>1");
        assert!(parts[1].ends_with('Z') && parts[1].contains('T'), "{msg}");
        assert_eq!(parts[3], "quorate-coordinator");
        assert_eq!(parts[5], "issue_token");
        assert!(parts[6].starts_with("[quorate@32473"), "{msg}");
        assert!(msg.ends_with(&log.lines(0, 1).unwrap()[0]), "{msg}");
    }

    #[test]
    fn sink_specs_parse_and_name_the_bad_ones() {
        assert_eq!("stdout".parse::<SinkSpec>().unwrap(), SinkSpec::Stdout);
        assert_eq!(
            "file:/var/log/q.jsonl".parse::<SinkSpec>().unwrap(),
            SinkSpec::File("/var/log/q.jsonl".into())
        );
        assert!("syslog+udp://nohost".parse::<SinkSpec>().is_err());
        let e = "kafka://x".parse::<SinkSpec>().unwrap_err();
        assert!(e.contains("file:PATH"), "{e}");
    }
}
