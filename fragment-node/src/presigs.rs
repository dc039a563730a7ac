//! Ephemeral presignatures (DESIGN.md §4.5, §5): a node's presignature shares live only
//! in the memory of the process that made them. Consumption is recorded in memory, under
//! the presignature's own shard lock, before its share leaves; a restart burns every
//! presignature; nothing about them is written to disk. So no backup, snapshot or
//! restored disk can bring a used presignature back to sign a second message.
//!
//! The book is split into [`SHARDS`] independently locked maps (by the first byte of the
//! id), so concurrent sign batches for different presignatures proceed in parallel;
//! only requests for presignatures in the same shard wait for each other, and only for
//! the in-memory check-and-mark (no I/O happens under a lock).
//!
//! The node's log of what it signed (its trust domain's evidence) is written by a
//! background thread ([`ReleaseLog`]) off the reply path: a crash may lose its last
//! entries, which the coordinator's audit chain also holds.

use std::collections::HashMap;
use std::sync::mpsc;
use std::sync::{Mutex, PoisonError};

use quorate_crypto::keys::{KeyId, KeyPublic};
use quorate_crypto::presign::{PresigId, PresignatureShare};
use quorate_crypto::sign::{self, ConsumedPresig, PresigRecord, SignRequest, SignStep};
use zeroize::Zeroizing;

use crate::store::{Release, Store};

/// How many independently locked shards the book has.
pub const SHARDS: usize = 64;

/// How many consumed records each shard keeps (the newest), so that a retried request
/// for the same digest gets the same share again. An older consumed presignature is
/// forgotten: a request for it is then refused as unknown, whatever its digest, so the
/// book stays bounded however many signatures a node makes.
pub const CONSUMED_PER_SHARD: usize = 1024;

/// What the book holds for one presignature, kept small: a node holds 100 000 of them
/// in memory (BENCHMARKS.md, "Storage").
enum Held {
    /// Never used: the share's secret encoding
    /// ([`PresignatureShare::secret_bytes`], about 200 bytes at (3,1)), zeroized on
    /// drop; decoded only when it signs. With the epoch of the key shares it was made
    /// from: a refresh or reshare burns the presignatures of older epochs, because a
    /// presignature share outliving a share refresh would let an adversary that
    /// corrupts `t` nodes before and others after combine them (DESIGN.md §4.3).
    Unused(u32, Zeroizing<Box<[u8]>>),
    /// Used for exactly one digest: public data only.
    Consumed(Box<ConsumedPresig>),
}

/// One shard: its records, and its consumed ids, oldest first.
#[derive(Default)]
struct Shard {
    records: HashMap<PresigId, Held>,
    consumed: std::collections::VecDeque<PresigId>,
}

/// The presignatures this process holds, unused or (recently) consumed.
pub struct PresigBook {
    shards: Vec<Mutex<Shard>>,
}

impl Default for PresigBook {
    fn default() -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Mutex::new(Shard::default())).collect(),
        }
    }
}

impl std::fmt::Debug for PresigBook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PresigBook")
            .field("unused", &self.unused())
            .finish_non_exhaustive()
    }
}

impl PresigBook {
    fn shard(&self, id: &PresigId) -> std::sync::MutexGuard<'_, Shard> {
        let i = usize::from(id.0[0]) % SHARDS;
        // Nothing panics while a shard lock is held, so a poisoned lock still guards a
        // consistent map.
        self.shards
            .get(i)
            .unwrap_or_else(|| unreachable_shard())
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Adds new presignature shares (unused), made from shares of the key's `epoch`.
    /// An id already held is left as it is.
    pub fn insert(&self, epoch: u32, shares: Vec<PresignatureShare>) {
        for s in shares {
            let bytes = Zeroizing::new(s.secret_bytes().to_vec().into_boxed_slice());
            self.shard(&s.id)
                .records
                .entry(s.id)
                .or_insert(Held::Unused(epoch, bytes));
        }
    }

    /// Burns (drops, zeroized) every unused presignature of `key` made before `epoch`.
    /// Returns how many.
    pub fn burn_older(&self, key: &KeyId, epoch: u32) -> u64 {
        let mut n = 0;
        for s in &self.shards {
            let mut s = s.lock().unwrap_or_else(PoisonError::into_inner);
            s.records.retain(|_, r| match r {
                Held::Unused(e, bytes)
                    if *e < epoch
                        && PresignatureShare::key_id_of(bytes).is_none_or(|k| &k == key) =>
                {
                    n += 1;
                    false
                }
                _ => true,
            });
        }
        n
    }

    /// One signing step on presignature `r.presig_id` of `key`: checks and marks it
    /// consumed for `r.digest` atomically (the secret shares `w_j, v_j` are dropped,
    /// zeroized, as the record is replaced), or repeats the share of an earlier request
    /// for the same digest. The error is a sentence.
    pub fn sign(&self, key: &KeyPublic, r: &SignRequest) -> Result<SignStep, String> {
        let mut shard = self.shard(&r.presig_id);
        let record = shard.records.get(&r.presig_id).ok_or_else(|| {
            format!(
                "unknown presignature {} (this node holds presignatures only in memory: a restart burns them, and a long-used one is forgotten)",
                r.presig_id
            )
        })?;
        let record = match record {
            Held::Unused(epoch, _) if *epoch != key.epoch => {
                let epoch = *epoch;
                shard.records.remove(&r.presig_id);
                return Err(format!(
                    "unknown presignature {}: it was made from epoch {epoch} of the key's shares, which is now at epoch {}; a refresh burns older presignatures",
                    r.presig_id, key.epoch
                ));
            }
            Held::Unused(_, bytes) => PresigRecord::Unused(
                PresignatureShare::from_secret_bytes(bytes)
                    .map_err(|e| format!("presignature {}: {e}", r.presig_id))?,
            ),
            Held::Consumed(c) => PresigRecord::Consumed(ConsumedPresig::clone(c)),
        };
        let step = sign::sign_step(key, &record, r).map_err(|e| e.to_string())?;
        if step.fresh {
            shard
                .records
                .insert(r.presig_id, Held::Consumed(Box::new(step.record.clone())));
            shard.consumed.push_back(r.presig_id);
            while shard.consumed.len() > CONSUMED_PER_SHARD {
                if let Some(old) = shard.consumed.pop_front() {
                    shard.records.remove(&old);
                }
            }
        }
        Ok(step)
    }

    /// How many unused presignatures are held.
    pub fn unused(&self) -> u64 {
        self.shards
            .iter()
            .map(|s| {
                s.lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .records
                    .values()
                    .filter(|r| matches!(r, Held::Unused(..)))
                    .count() as u64
            })
            .sum()
    }

    /// The secret encodings of the unused shares (for a test's dump only).
    pub fn unused_secrets(&self) -> Vec<Vec<u8>> {
        self.shards
            .iter()
            .flat_map(|s| {
                s.lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .records
                    .values()
                    .filter_map(|r| match r {
                        Held::Unused(_, bytes) => Some(bytes.to_vec()),
                        Held::Consumed(_) => None,
                    })
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    /// Forgets every presignature, used or not (a coordinator that starts afresh holds
    /// none of their public halves).
    pub fn clear(&self) -> u64 {
        let mut n = 0;
        for s in &self.shards {
            let mut s = s.lock().unwrap_or_else(PoisonError::into_inner);
            n += s.records.len() as u64;
            s.records.clear();
            s.consumed.clear();
        }
        n
    }
}

#[cold]
fn unreachable_shard() -> ! {
    // `id.0[0] % SHARDS` is always a valid index into `SHARDS` shards.
    std::process::abort()
}

/// The node's release log, written by a background thread in group commits. A batch
/// that fails to commit is lost (and logged); the failure marks the store unhealthy
/// ([`Store::fault`]) until its recovery thread sees a write commit again.
pub struct ReleaseLog {
    tx: Mutex<mpsc::Sender<Vec<Release>>>,
}

impl ReleaseLog {
    /// Starts the writer over `store` (shared with the node).
    pub fn start(store: std::sync::Arc<Store>) -> Self {
        let (tx, rx) = mpsc::channel::<Vec<Release>>();
        std::thread::Builder::new()
            .name("release-log".into())
            .spawn(move || {
                while let Ok(first) = rx.recv() {
                    let mut batch = first;
                    while let Ok(more) = rx.try_recv() {
                        batch.extend(more);
                    }
                    if let Err(e) = store.log_releases(&batch) {
                        tracing::error!(error = %e, lost = batch.len(), "cannot append to the release log");
                    }
                }
            })
            .map_or_else(
                |e| tracing::error!(error = %e, "cannot start the release log writer"),
                |_| (),
            );
        Self { tx: Mutex::new(tx) }
    }

    /// Queues releases for the log; never blocks on I/O.
    pub fn append(&self, releases: Vec<Release>) {
        if releases.is_empty() {
            return;
        }
        let tx = self.tx.lock().unwrap_or_else(PoisonError::into_inner);
        if tx.send(releases).is_err() {
            tracing::error!("the release log writer stopped; releases are not logged");
        }
    }
}
