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
//! Each presignature is tagged with the coordinator instance that made it
//! (`PresignStart.coordinator_instance`): several coordinators share the nodes, each
//! with its own pool, and one that starts afresh discards only its own earlier ones
//! ([`PresigBook::discard`]). The tag decides nothing else: consumption stays once per
//! presignature, for one digest, whoever asks (DESIGN.md §4.5).
//!
//! The node's log of what it signed (its trust domain's evidence) is written by a
//! background thread ([`ReleaseLog`]) off the reply path: a crash may lose its last
//! entries, which the coordinator's audit chain also holds.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
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
    /// And the coordinator instance it was made for (shared by the batch; empty:
    /// untagged).
    Unused(u32, Arc<str>, Zeroizing<Box<[u8]>>),
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

    /// Adds new presignature shares (unused), made from shares of the key's `epoch`
    /// for coordinator instance `owner` (empty: untagged). An id already held, unused
    /// or consumed, is left as it is (tag included).
    pub fn insert(&self, epoch: u32, owner: &str, shares: Vec<PresignatureShare>) {
        let owner: Arc<str> = Arc::from(owner);
        for s in shares {
            let bytes = Zeroizing::new(s.secret_bytes().to_vec().into_boxed_slice());
            self.shard(&s.id)
                .records
                .entry(s.id)
                .or_insert_with(|| Held::Unused(epoch, Arc::clone(&owner), bytes));
        }
    }

    /// Burns (drops, zeroized) every unused presignature of `key` made before `epoch`.
    /// Returns how many.
    pub fn burn_older(&self, key: &KeyId, epoch: u32) -> u64 {
        let mut n = 0;
        for s in &self.shards {
            let mut s = s.lock().unwrap_or_else(PoisonError::into_inner);
            s.records.retain(|_, r| match r {
                Held::Unused(e, _, bytes)
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
            Held::Unused(epoch, _, _) if *epoch != key.epoch => {
                let epoch = *epoch;
                shard.records.remove(&r.presig_id);
                return Err(format!(
                    "unknown presignature {}: it was made from epoch {epoch} of the key's shares, which is now at epoch {}; a refresh burns older presignatures",
                    r.presig_id, key.epoch
                ));
            }
            Held::Unused(_, _, bytes) => PresigRecord::Unused(
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
                        Held::Unused(_, _, bytes) => Some(bytes.to_vec()),
                        Held::Consumed(_) => None,
                    })
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    /// How many unused presignatures are held per coordinator instance (the empty
    /// string: untagged).
    pub fn unused_by_owner(&self) -> BTreeMap<String, u64> {
        let mut out = BTreeMap::new();
        for s in &self.shards {
            let s = s.lock().unwrap_or_else(PoisonError::into_inner);
            for r in s.records.values() {
                if let Held::Unused(_, owner, _) = r {
                    *out.entry(owner.to_string()).or_insert(0) += 1;
                }
            }
        }
        out
    }

    /// Forgets (zeroized) the unused presignatures made for coordinator instance
    /// `owner`, and the untagged ones, which belong to a coordinator from before
    /// instance ids: such a coordinator ran alone, so once a tagged one starts, their
    /// public halves are gone. Other instances' pools and every consumed record stay:
    /// a consumed presignature stays refused for another digest. Returns how many.
    pub fn discard(&self, owner: &str) -> u64 {
        let mut n = 0;
        for s in &self.shards {
            let mut s = s.lock().unwrap_or_else(PoisonError::into_inner);
            s.records.retain(|_, r| match r {
                Held::Unused(_, o, _) if o.is_empty() || &**o == owner => {
                    n += 1;
                    false
                }
                _ => true,
            });
        }
        n
    }

    /// Forgets every presignature, used or not, of every coordinator instance (what a
    /// coordinator from before instance ids asks for when it starts).
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::indexing_slicing)]
    use super::*;
    use quorate_crypto::keys::KeyPurpose;
    use quorate_crypto::presign::PresignaturePublic;
    use quorate_crypto::sim::{Attack, Cluster, test_rng};

    /// Node 1's shares of a fresh batch made in the simulation, with their public halves.
    fn batch(
        sim: &mut Cluster,
        key: &KeyPublic,
        n: u32,
    ) -> (Vec<PresignatureShare>, Vec<PresignaturePublic>) {
        let public = sim
            .presign(key.key_id, &[1, 2, 3], &[1, 2], n, Attack::None)
            .unwrap();
        let shares = public
            .iter()
            .map(|p| match sim.nodes[0].presigs.get(&p.id).unwrap() {
                PresigRecord::Unused(s) => {
                    PresignatureShare::from_secret_bytes(&s.secret_bytes()).unwrap()
                }
                PresigRecord::Consumed(_) => unreachable!("a fresh batch"),
            })
            .collect();
        (shares, public)
    }

    fn request(key: &KeyPublic, p: &PresignaturePublic, digest: u8) -> SignRequest {
        SignRequest {
            key_id: key.key_id,
            presig_id: p.id,
            sset: p.sset.clone(),
            digest: [digest; 32],
        }
    }

    #[test]
    fn discard_drops_only_the_named_coordinators_unused_presignatures() {
        let mut sim = Cluster::new(3, 1, test_rng("presigs-discard")).unwrap();
        let key = sim.dkg(KeyPurpose::Sign, Attack::None).unwrap();
        let (a_shares, a_public) = batch(&mut sim, &key, 3);
        let (b_shares, b_public) = batch(&mut sim, &key, 2);
        let (old_shares, _) = batch(&mut sim, &key, 1);
        let book = PresigBook::default();
        book.insert(key.epoch, "coord-a", a_shares);
        book.insert(key.epoch, "coord-b", b_shares);
        book.insert(key.epoch, "", old_shares);
        let by = book.unused_by_owner();
        eprintln!("held before: {by:?}");
        assert_eq!(by.get("coord-a"), Some(&3));
        assert_eq!(by.get("coord-b"), Some(&2));
        assert_eq!(by.get(""), Some(&1));

        // Coordinator A used one of its own, and one of B's (any coordinator may, once).
        book.sign(&key, &request(&key, &a_public[0], 1)).unwrap();
        let b_used = book.sign(&key, &request(&key, &b_public[0], 2)).unwrap();
        assert_eq!(book.unused(), 4);

        // A restarts: its unused ones and the untagged one go; B's stay.
        assert_eq!(book.discard("coord-a"), 3);
        let by = book.unused_by_owner();
        eprintln!("held after coord-a's discard: {by:?}");
        assert_eq!(by.get("coord-a"), None);
        assert_eq!(by.get(""), None);
        assert_eq!(by.get("coord-b"), Some(&1));
        let e = book
            .sign(&key, &request(&key, &a_public[1], 3))
            .unwrap_err();
        assert!(e.contains("unknown presignature"), "{e}");
        // B's remaining presignature still signs.
        book.sign(&key, &request(&key, &b_public[1], 4)).unwrap();

        // The consume-once rule outlives any discard: a consumed presignature is
        // refused for a second digest, and repeats its share for the same digest.
        assert_eq!(book.discard("coord-b"), 0);
        let e = book
            .sign(&key, &request(&key, &b_public[0], 5))
            .unwrap_err();
        eprintln!("second digest after discard: {e}");
        let again = book.sign(&key, &request(&key, &b_public[0], 2)).unwrap();
        assert_eq!(again.share, b_used.share);
        assert!(!again.fresh);
        let e = book
            .sign(&key, &request(&key, &a_public[0], 6))
            .unwrap_err();
        assert!(!e.is_empty());

        // A re-inserted id keeps its first record and tag: a batch cannot re-tag, or
        // revive, a consumed presignature.
        let replay = match sim.nodes[0].presigs.get(&b_public[0].id).unwrap() {
            PresigRecord::Unused(s) => PresignatureShare::from_secret_bytes(&s.secret_bytes()),
            PresigRecord::Consumed(_) => unreachable!("the simulation did not sign"),
        }
        .unwrap();
        book.insert(key.epoch, "coord-c", vec![replay]);
        assert!(book.unused_by_owner().is_empty());
        assert!(book.sign(&key, &request(&key, &b_public[0], 7)).is_err());

        // An older coordinator's discard (no instance id) forgets everything, consumed
        // records (a0, b0, b1) included.
        assert_eq!(book.clear(), 3);
    }
}
