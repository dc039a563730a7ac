//! The module's state in safe Rust: slots (one per cluster), their objects, sessions,
//! and the find and sign operations. `abi.rs` turns C arguments into these calls.
//!
//! Locking (`CKF_OS_LOCKING_OK`): the session table and each slot's object table are
//! behind their own mutexes, held only to look up or update them; each session's
//! operations are behind a mutex of their own, held for the length of one call on the
//! session (a session's slot and flags never change). A signature's round trip to
//! the cluster therefore blocks only its own session, and any number of sessions sign at
//! once over the slot's one shared client connection (gRPC over HTTP/2 multiplexes them).

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use cryptoki_sys::*;
use quorate_client::{Client, Format, KeyInfo, KeyProfile, SignInput};
use sha2::{Digest as _, Sha256};

use crate::config::SlotConfig;
use crate::object::{Object, ObjectKind};

/// Length of a P-256 signature `r || s` as `CKM_ECDSA` returns it (PKCS#11 2.40 §2.3.1).
pub const SIGNATURE_LEN: usize = 64;

/// The mechanisms every token offers, in `C_GetMechanismList` order.
pub const MECHANISMS: [CK_MECHANISM_TYPE; 2] = [CKM_ECDSA, CKM_ECDSA_SHA256];

/// Longest input `CKM_ECDSA` takes: a SHA-512 digest. Longer input is surely a message
/// given where a digest belongs.
pub const MAX_ECDSA_INPUT: usize = 64;

/// Logs why a call fails (the reason never holds secret material) and returns its code.
pub fn refuse(rv: CK_RV, reason: impl std::fmt::Display) -> CK_RV {
    tracing::warn!(rv = %rv_name(rv), "{reason}");
    rv
}

/// A lock that outlives a panic in another thread: every critical section leaves the
/// data consistent before anything that can panic, so the data is still good.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A cluster and the token that stands for it.
pub struct Slot {
    /// Its label and client settings.
    pub config: SlotConfig,
    client: Mutex<Option<Client>>,
    objects: Mutex<Objects>,
}

#[derive(Default)]
struct Objects {
    by_handle: BTreeMap<CK_OBJECT_HANDLE, Arc<Object>>,
    by_key: HashMap<(String, ObjectKind), CK_OBJECT_HANDLE>,
}

/// What a sign operation signs with, and what it has been given so far.
enum SignOp {
    /// `CKM_ECDSA`: one call with the digest.
    Ecdsa { key: String },
    /// `CKM_ECDSA_SHA256`: the message, hashed here as it arrives.
    EcdsaSha256 {
        key: String,
        hash: Sha256,
        /// Whether `C_SignUpdate` has been called (then only `C_SignFinal` may end it).
        multi_part: bool,
    },
}

/// A session: its slot and flags, fixed when it opens, and its operations, behind a
/// lock held for one call on the session.
struct Session {
    slot: CK_SLOT_ID,
    flags: CK_FLAGS,
    ops: Mutex<Operations>,
}

#[derive(Default)]
struct Operations {
    find: Option<VecDeque<CK_OBJECT_HANDLE>>,
    sign: Option<SignOp>,
}

/// An initialised module: what `C_Initialize` makes and `C_Finalize` drops.
pub struct Module {
    /// The runtime of the module's network I/O; `None` only while it drops.
    runtime: Option<tokio::runtime::Runtime>,
    slots: Vec<Slot>,
    sessions: Mutex<HashMap<CK_SESSION_HANDLE, Arc<Session>>>,
    next_session: AtomicU64,
    next_object: AtomicU64,
}

impl Module {
    /// A module offering `slots`; connects to nothing yet (a slot connects on its first
    /// use of the cluster).
    ///
    /// # Errors
    /// `CKR_FUNCTION_FAILED` if the async runtime cannot start (logged).
    pub fn new(slots: Vec<SlotConfig>) -> Result<Self, CK_RV> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("quorate-pkcs11")
            .enable_all()
            .build()
            .map_err(|e| {
                refuse(
                    CKR_FUNCTION_FAILED,
                    format!("cannot start the runtime: {e}"),
                )
            })?;
        Ok(Module {
            runtime: Some(runtime),
            slots: slots
                .into_iter()
                .map(|config| Slot {
                    config,
                    client: Mutex::new(None),
                    objects: Mutex::new(Objects::default()),
                })
                .collect(),
            sessions: Mutex::new(HashMap::new()),
            next_session: AtomicU64::new(1),
            next_object: AtomicU64::new(1),
        })
    }

    /// Stops the runtime without waiting for its threads (`C_Finalize`): safe to call
    /// from any thread, also one inside the application's own async runtime, where
    /// waiting would not be allowed. Connections close as their tasks are dropped.
    pub fn shutdown(self) {
        drop(self);
    }

    /// Runs `work` on the module's runtime and waits for it. A thread that drives an
    /// async runtime of the application's (a tokio task calling the module) must not
    /// start a runtime there, so the wait then happens on a short-lived thread of its
    /// own while the calling thread blocks, as any blocking PKCS#11 call does.
    ///
    /// # Errors
    /// `CKR_HOST_MEMORY` if no thread can be started; `CKR_GENERAL_ERROR` if `work`
    /// panics.
    fn wait<F>(&self, work: F) -> Result<F::Output, CK_RV>
    where
        F: std::future::Future + Send,
        F::Output: Send,
    {
        let runtime = self
            .runtime
            .as_ref()
            .ok_or_else(|| refuse(CKR_GENERAL_ERROR, "the module is shutting down"))?;
        if tokio::runtime::Handle::try_current().is_err() {
            return Ok(runtime.block_on(work));
        }
        std::thread::scope(|scope| {
            let waiter = std::thread::Builder::new()
                .name("quorate-pkcs11-wait".into())
                .spawn_scoped(scope, || runtime.block_on(work))
                .map_err(|e| {
                    refuse(
                        CKR_HOST_MEMORY,
                        format!("cannot start a thread to wait on: {e}"),
                    )
                })?;
            waiter
                .join()
                .map_err(|_| refuse(CKR_GENERAL_ERROR, "the network call panicked"))
        })
    }

    /// Number of slots; slot ids are `0..count`.
    pub fn slot_count(&self) -> usize {
        self.slots.len()
    }

    /// Slot `id`.
    ///
    /// # Errors
    /// `CKR_SLOT_ID_INVALID`.
    pub fn slot(&self, id: CK_SLOT_ID) -> Result<&Slot, CK_RV> {
        usize::try_from(id)
            .ok()
            .and_then(|i| self.slots.get(i))
            .ok_or_else(|| {
                refuse(
                    CKR_SLOT_ID_INVALID,
                    format!("no slot {id}: there are {}", self.slots.len()),
                )
            })
    }

    /// The slot's shared client, connecting it on first use.
    fn client(&self, id: CK_SLOT_ID) -> Result<Client, CK_RV> {
        let slot = self.slot(id)?;
        let mut client = lock(&slot.client);
        if let Some(c) = client.as_ref() {
            return Ok(c.clone());
        }
        let c = self
            .wait(Client::connect(&slot.config.client))?
            .map_err(|e| {
                client_error(&e, &format!("slot {id} ({}): connect", slot.config.label))
            })?;
        *client = Some(c.clone());
        Ok(c)
    }

    /// Re-reads the slot's keys: a `raw` key is a private-key object that signs and a
    /// public-key object; keys of any other profile are not objects of the token.
    /// Handles stay the same for a key across refreshes and are never reused.
    fn refresh(&self, id: CK_SLOT_ID) -> Result<(), CK_RV> {
        let client = self.client(id)?;
        let slot = self.slot(id)?;
        let keys = self
            .wait(client.list_keys())?
            .map_err(|e| client_error(&e, &format!("slot {id}: list keys")))?;
        let raw: Vec<KeyInfo> = keys
            .into_iter()
            .filter(|k| k.profile == KeyProfile::Raw)
            .collect();
        let mut objects = lock(&slot.objects);
        let mut live = HashSet::with_capacity(raw.len() * 2);
        for key in raw {
            for kind in [ObjectKind::PrivateKey, ObjectKind::PublicKey] {
                let entry = (key.name.clone(), kind);
                let handle = match objects.by_key.get(&entry) {
                    Some(h) => *h,
                    None => {
                        let h = self.next_object.fetch_add(1, Ordering::Relaxed);
                        objects.by_key.insert(entry, h);
                        h
                    }
                };
                objects
                    .by_handle
                    .insert(handle, Arc::new(Object::new(handle, kind, &key)));
                live.insert(handle);
            }
        }
        objects.by_handle.retain(|h, _| live.contains(h));
        objects.by_key.retain(|_, h| live.contains(h));
        Ok(())
    }

    /// Opens a session on slot `id` (`CKF_SERIAL_SESSION` must be set; `CKF_RW_SESSION`
    /// is accepted, though nothing on the token can be written).
    ///
    /// # Errors
    /// `CKR_SLOT_ID_INVALID`, `CKR_SESSION_PARALLEL_NOT_SUPPORTED`.
    pub fn open_session(
        &self,
        id: CK_SLOT_ID,
        flags: CK_FLAGS,
    ) -> Result<CK_SESSION_HANDLE, CK_RV> {
        self.slot(id)?;
        if flags & CKF_SERIAL_SESSION == 0 {
            return Err(refuse(
                CKR_SESSION_PARALLEL_NOT_SUPPORTED,
                "C_OpenSession without CKF_SERIAL_SESSION (required since PKCS#11 2.20)",
            ));
        }
        let handle = self.next_session.fetch_add(1, Ordering::Relaxed);
        let session = Session {
            slot: id,
            flags: flags & (CKF_SERIAL_SESSION | CKF_RW_SESSION),
            ops: Mutex::new(Operations::default()),
        };
        lock(&self.sessions).insert(handle, Arc::new(session));
        Ok(handle)
    }

    fn session(&self, h: CK_SESSION_HANDLE) -> Result<Arc<Session>, CK_RV> {
        lock(&self.sessions)
            .get(&h)
            .cloned()
            .ok_or_else(|| refuse(CKR_SESSION_HANDLE_INVALID, format!("no open session {h}")))
    }

    /// Checks that session `h` is open.
    ///
    /// # Errors
    /// `CKR_SESSION_HANDLE_INVALID`.
    pub fn check_session(&self, h: CK_SESSION_HANDLE) -> Result<(), CK_RV> {
        self.session(h).map(|_| ())
    }

    /// Closes session `h`, ending its operations.
    ///
    /// # Errors
    /// `CKR_SESSION_HANDLE_INVALID`.
    pub fn close_session(&self, h: CK_SESSION_HANDLE) -> Result<(), CK_RV> {
        lock(&self.sessions)
            .remove(&h)
            .map(|_| ())
            .ok_or_else(|| refuse(CKR_SESSION_HANDLE_INVALID, format!("no open session {h}")))
    }

    /// Closes every session of slot `id`.
    ///
    /// # Errors
    /// `CKR_SLOT_ID_INVALID`.
    pub fn close_all_sessions(&self, id: CK_SLOT_ID) -> Result<(), CK_RV> {
        self.slot(id)?;
        lock(&self.sessions).retain(|_, s| s.slot != id);
        Ok(())
    }

    /// Number of open sessions on slot `id`, and how many of them are read/write.
    pub fn session_counts(&self, id: CK_SLOT_ID) -> (usize, usize) {
        let sessions = lock(&self.sessions);
        let mut all = 0;
        let mut rw = 0;
        for s in sessions.values() {
            if s.slot == id {
                all += 1;
                if s.flags & CKF_RW_SESSION != 0 {
                    rw += 1;
                }
            }
        }
        (all, rw)
    }

    /// Session `h`'s slot, state and flags (`CK_SESSION_INFO`). Every session acts for
    /// the client whose certificate authenticates the connection, so its state is one of
    /// the "user functions" states without `C_Login`.
    ///
    /// # Errors
    /// `CKR_SESSION_HANDLE_INVALID`.
    pub fn session_info(
        &self,
        h: CK_SESSION_HANDLE,
    ) -> Result<(CK_SLOT_ID, CK_STATE, CK_FLAGS), CK_RV> {
        let s = self.session(h)?;
        let state = if s.flags & CKF_RW_SESSION != 0 {
            CKS_RW_USER_FUNCTIONS
        } else {
            CKS_RO_USER_FUNCTIONS
        };
        Ok((s.slot, state, s.flags))
    }

    /// Starts a search for the objects having every `(type, value)` of `template`
    /// (values compared as bytes). Re-reads the cluster's keys first.
    ///
    /// # Errors
    /// `CKR_SESSION_HANDLE_INVALID`, `CKR_OPERATION_ACTIVE`, or the cluster's failure.
    pub fn find_init(
        &self,
        h: CK_SESSION_HANDLE,
        template: &[(CK_ATTRIBUTE_TYPE, Vec<u8>)],
    ) -> Result<(), CK_RV> {
        let session = self.session(h)?;
        let mut s = lock(&session.ops);
        if s.find.is_some() {
            return Err(refuse(
                CKR_OPERATION_ACTIVE,
                "C_FindObjectsInit while a search is active: call C_FindObjectsFinal first",
            ));
        }
        self.refresh(session.slot)?;
        let slot = self.slot(session.slot)?;
        let found = lock(&slot.objects)
            .by_handle
            .values()
            .filter(|o| o.matches(template))
            .map(|o| o.handle)
            .collect();
        s.find = Some(found);
        Ok(())
    }

    /// Up to `max` more handles of the active search.
    ///
    /// # Errors
    /// `CKR_SESSION_HANDLE_INVALID`, `CKR_OPERATION_NOT_INITIALIZED`.
    pub fn find(&self, h: CK_SESSION_HANDLE, max: usize) -> Result<Vec<CK_OBJECT_HANDLE>, CK_RV> {
        let session = self.session(h)?;
        let mut s = lock(&session.ops);
        let found = s.find.as_mut().ok_or_else(|| {
            refuse(
                CKR_OPERATION_NOT_INITIALIZED,
                "C_FindObjects before C_FindObjectsInit",
            )
        })?;
        let n = max.min(found.len());
        Ok(found.drain(..n).collect())
    }

    /// Ends the active search.
    ///
    /// # Errors
    /// `CKR_SESSION_HANDLE_INVALID`, `CKR_OPERATION_NOT_INITIALIZED`.
    pub fn find_final(&self, h: CK_SESSION_HANDLE) -> Result<(), CK_RV> {
        let session = self.session(h)?;
        let mut s = lock(&session.ops);
        s.find.take().map(|_| ()).ok_or_else(|| {
            refuse(
                CKR_OPERATION_NOT_INITIALIZED,
                "C_FindObjectsFinal without C_FindObjectsInit",
            )
        })
    }

    /// Object `o` as session `h` sees it.
    ///
    /// # Errors
    /// `CKR_SESSION_HANDLE_INVALID`, `CKR_OBJECT_HANDLE_INVALID`.
    pub fn object(&self, h: CK_SESSION_HANDLE, o: CK_OBJECT_HANDLE) -> Result<Arc<Object>, CK_RV> {
        let session = self.session(h)?;
        let slot_id = session.slot;
        let slot = self.slot(slot_id)?;
        let found = lock(&slot.objects).by_handle.get(&o).cloned();
        match found {
            Some(obj) => Ok(obj),
            None => Err(refuse(
                CKR_OBJECT_HANDLE_INVALID,
                format!("no object {o} on slot {slot_id} (find the objects first)"),
            )),
        }
    }

    /// Starts signing with `mechanism` (no parameters) and private key `key`.
    ///
    /// # Errors
    /// `CKR_SESSION_HANDLE_INVALID`, `CKR_OPERATION_ACTIVE`, `CKR_MECHANISM_INVALID`,
    /// `CKR_MECHANISM_PARAM_INVALID`, `CKR_KEY_HANDLE_INVALID`,
    /// `CKR_KEY_FUNCTION_NOT_PERMITTED` (a public key).
    pub fn sign_init(
        &self,
        h: CK_SESSION_HANDLE,
        mechanism: CK_MECHANISM_TYPE,
        has_parameter: bool,
        key: CK_OBJECT_HANDLE,
    ) -> Result<(), CK_RV> {
        let session = self.session(h)?;
        let mut s = lock(&session.ops);
        if s.sign.is_some() {
            return Err(refuse(
                CKR_OPERATION_ACTIVE,
                "C_SignInit while a sign operation is active: finish it with C_Sign or C_SignFinal",
            ));
        }
        if !MECHANISMS.contains(&mechanism) {
            return Err(refuse(
                CKR_MECHANISM_INVALID,
                format!(
                    "mechanism {mechanism:#x} is not supported: a Quorate token signs with \
                     CKM_ECDSA (0x1041) or CKM_ECDSA_SHA256 (0x1044)"
                ),
            ));
        }
        if has_parameter {
            return Err(refuse(
                CKR_MECHANISM_PARAM_INVALID,
                "CKM_ECDSA and CKM_ECDSA_SHA256 take no parameter",
            ));
        }
        let slot = self.slot(session.slot)?;
        let object = lock(&slot.objects).by_handle.get(&key).cloned();
        let object = object.ok_or_else(|| {
            refuse(
                CKR_KEY_HANDLE_INVALID,
                format!("no key object {key} on slot {}", session.slot),
            )
        })?;
        if object.kind != ObjectKind::PrivateKey {
            return Err(refuse(
                CKR_KEY_FUNCTION_NOT_PERMITTED,
                format!(
                    "object {key} is the public key of `{}`: sign with its private-key object",
                    object.name
                ),
            ));
        }
        let name = object.name.clone();
        s.sign = Some(if mechanism == CKM_ECDSA {
            SignOp::Ecdsa { key: name }
        } else {
            SignOp::EcdsaSha256 {
                key: name,
                hash: Sha256::new(),
                multi_part: false,
            }
        });
        Ok(())
    }

    /// Checks that a sign operation is active in session `h`, for a size query: the
    /// signature will have [`SIGNATURE_LEN`] bytes.
    ///
    /// # Errors
    /// `CKR_SESSION_HANDLE_INVALID`, `CKR_OPERATION_NOT_INITIALIZED`.
    pub fn sign_pending(&self, h: CK_SESSION_HANDLE) -> Result<usize, CK_RV> {
        let session = self.session(h)?;
        let s = lock(&session.ops);
        match s.sign {
            Some(_) => Ok(SIGNATURE_LEN),
            None => Err(not_initialized("C_Sign or C_SignFinal")),
        }
    }

    /// Ends the sign operation of session `h` without signing (a failed call ends it).
    pub fn sign_abort(&self, h: CK_SESSION_HANDLE) {
        if let Ok(session) = self.session(h) {
            lock(&session.ops).sign = None;
        }
    }

    /// Single-part signing (`C_Sign`): `data` is the digest (`CKM_ECDSA`) or the message
    /// (`CKM_ECDSA_SHA256`); returns `r || s`. Ends the operation, also on failure.
    ///
    /// # Errors
    /// `CKR_SESSION_HANDLE_INVALID`, `CKR_OPERATION_NOT_INITIALIZED`,
    /// `CKR_DATA_LEN_RANGE` (a `CKM_ECDSA` input of 0 or more than 64 bytes), or the
    /// cluster's refusal.
    pub fn sign(&self, h: CK_SESSION_HANDLE, data: &[u8]) -> Result<Vec<u8>, CK_RV> {
        let session = self.session(h)?;
        let mut s = lock(&session.ops);
        let op = s.sign.take().ok_or_else(|| not_initialized("C_Sign"))?;
        let (key, digest) = match op {
            SignOp::Ecdsa { key } => (key, ecdsa_input(data)?),
            SignOp::EcdsaSha256 {
                key,
                mut hash,
                multi_part,
            } => {
                if multi_part {
                    return Err(refuse(
                        CKR_FUNCTION_FAILED,
                        "C_Sign after C_SignUpdate: a multi-part operation ends with C_SignFinal",
                    ));
                }
                hash.update(data);
                (key, hash.finalize().into())
            }
        };
        let slot = session.slot;
        drop(s);
        self.sign_digest(slot, &key, digest)
    }

    /// Multi-part signing (`C_SignUpdate`): more of the message for `CKM_ECDSA_SHA256`.
    ///
    /// # Errors
    /// `CKR_SESSION_HANDLE_INVALID`, `CKR_OPERATION_NOT_INITIALIZED`,
    /// `CKR_FUNCTION_NOT_SUPPORTED` for `CKM_ECDSA`, which is single-part only (PKCS#11
    /// 2.40 §2.3.1); the operation then ends.
    pub fn sign_update(&self, h: CK_SESSION_HANDLE, data: &[u8]) -> Result<(), CK_RV> {
        let session = self.session(h)?;
        let mut s = lock(&session.ops);
        match s.sign.as_mut() {
            None => Err(not_initialized("C_SignUpdate")),
            Some(SignOp::Ecdsa { .. }) => {
                s.sign = None;
                Err(refuse(
                    CKR_FUNCTION_NOT_SUPPORTED,
                    "CKM_ECDSA is single-part: use C_Sign, or CKM_ECDSA_SHA256 for a message in parts",
                ))
            }
            Some(SignOp::EcdsaSha256 {
                hash, multi_part, ..
            }) => {
                hash.update(data);
                *multi_part = true;
                Ok(())
            }
        }
    }

    /// Ends multi-part signing (`C_SignFinal`) and returns `r || s`.
    ///
    /// # Errors
    /// As [`Module::sign_update`], or the cluster's refusal.
    pub fn sign_final(&self, h: CK_SESSION_HANDLE) -> Result<Vec<u8>, CK_RV> {
        let session = self.session(h)?;
        let mut s = lock(&session.ops);
        let (key, digest) = match s.sign.take() {
            None => return Err(not_initialized("C_SignFinal")),
            Some(SignOp::Ecdsa { .. }) => {
                return Err(refuse(
                    CKR_FUNCTION_NOT_SUPPORTED,
                    "CKM_ECDSA is single-part: use C_Sign",
                ));
            }
            Some(SignOp::EcdsaSha256 { key, hash, .. }) => (key, hash.finalize().into()),
        };
        let slot = session.slot;
        drop(s);
        self.sign_digest(slot, &key, digest)
    }

    fn sign_digest(&self, slot: CK_SLOT_ID, key: &str, digest: [u8; 32]) -> Result<Vec<u8>, CK_RV> {
        let client = self.client(slot)?;
        let sig = self
            .wait(client.sign(key, SignInput::Digest(digest), Format::Raw))?
            .map_err(|e| client_error(&e, &format!("slot {slot}: sign with `{key}`")))?;
        if sig.signature.len() != SIGNATURE_LEN {
            return Err(refuse(
                CKR_DEVICE_ERROR,
                format!("the cluster sent a {}-byte signature", sig.signature.len()),
            ));
        }
        Ok(sig.signature)
    }

    /// `C_DeriveKey`: refused. Threshold DH (DESIGN.md §4.6) answers a `decrypt` key only
    /// for an ECIES ciphertext, masked to a requester key, and never hands out the bare
    /// shared point that `CKM_ECDH1_DERIVE` would put into a secret-key object.
    ///
    /// # Errors
    /// `CKR_SESSION_HANDLE_INVALID`, then always `CKR_MECHANISM_INVALID`.
    pub fn derive(&self, h: CK_SESSION_HANDLE, mechanism: CK_MECHANISM_TYPE) -> Result<(), CK_RV> {
        self.check_session(h)?;
        let why = if mechanism == CKM_ECDH1_DERIVE {
            "CKM_ECDH1_DERIVE is not offered: a Quorate decrypt key answers only ECIES \
             ciphertexts with a masked reply (DESIGN.md §4.6), never a bare ECDH secret; \
             use `quorate decrypt` or the client library's Client::decrypt"
        } else {
            "no key derivation mechanism is offered"
        };
        Err(refuse(
            CKR_MECHANISM_INVALID,
            format!("mechanism {mechanism:#x}: {why}"),
        ))
    }
}

impl Drop for Module {
    /// Stops the runtime without waiting for its threads, so the module may drop on any
    /// thread, also one inside an async runtime of the application's (where waiting would
    /// panic): the last call still running when `C_Finalize` returned drops it there.
    /// Connections close as their tasks are dropped.
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

fn not_initialized(call: &str) -> CK_RV {
    refuse(
        CKR_OPERATION_NOT_INITIALIZED,
        format!("{call} without C_SignInit"),
    )
}

/// The 32-byte integer that ECDSA signs for a `CKM_ECDSA` input (FIPS 186-5 §6.4.1
/// `bits2int`): a longer digest keeps its leftmost 32 bytes, a shorter one is the same
/// integer left-padded with zeros.
///
/// # Errors
/// `CKR_DATA_LEN_RANGE` for an empty input or one over [`MAX_ECDSA_INPUT`] bytes.
pub fn ecdsa_input(data: &[u8]) -> Result<[u8; 32], CK_RV> {
    if data.is_empty() || data.len() > MAX_ECDSA_INPUT {
        return Err(refuse(
            CKR_DATA_LEN_RANGE,
            format!(
                "CKM_ECDSA takes a digest of 1 to {MAX_ECDSA_INPUT} bytes (SHA-256: 32), got {} \
                 bytes; to sign a message use CKM_ECDSA_SHA256",
                data.len()
            ),
        ));
    }
    let mut out = [0u8; 32];
    let take = data.len().min(32);
    let (Some(dst), Some(src)) = (out.get_mut(32 - take..), data.get(..take)) else {
        return Err(CKR_GENERAL_ERROR);
    };
    dst.copy_from_slice(src);
    Ok(out)
}

/// The `CKR_*` code for a client library error; the error's text goes to the log.
fn client_error(e: &quorate_client::Error, what: &str) -> CK_RV {
    use quorate_client::Error;
    use tonic::Code;
    let rv = match e {
        Error::Usage(_) => CKR_ARGUMENTS_BAD,
        Error::Config(_) => CKR_GENERAL_ERROR,
        Error::Unreachable { .. } => CKR_DEVICE_ERROR,
        Error::Pending(_) | Error::Inactive => CKR_FUNCTION_REJECTED,
        Error::Refused { code, .. } => match *code {
            Code::NotFound => CKR_KEY_HANDLE_INVALID,
            Code::PermissionDenied | Code::Unauthenticated => CKR_FUNCTION_REJECTED,
            Code::FailedPrecondition => CKR_KEY_FUNCTION_NOT_PERMITTED,
            Code::InvalidArgument => CKR_DATA_INVALID,
            Code::ResourceExhausted => CKR_DEVICE_MEMORY,
            Code::Unavailable | Code::DeadlineExceeded => CKR_DEVICE_ERROR,
            _ => CKR_FUNCTION_FAILED,
        },
        _ => CKR_FUNCTION_FAILED,
    };
    refuse(rv, format!("{what}: {e}"))
}

/// The standard name of a return code, for the log.
pub fn rv_name(rv: CK_RV) -> String {
    let name = match rv {
        CKR_OK => "CKR_OK",
        CKR_ARGUMENTS_BAD => "CKR_ARGUMENTS_BAD",
        CKR_GENERAL_ERROR => "CKR_GENERAL_ERROR",
        CKR_FUNCTION_FAILED => "CKR_FUNCTION_FAILED",
        CKR_DEVICE_ERROR => "CKR_DEVICE_ERROR",
        CKR_DEVICE_MEMORY => "CKR_DEVICE_MEMORY",
        CKR_HOST_MEMORY => "CKR_HOST_MEMORY",
        CKR_DATA_INVALID => "CKR_DATA_INVALID",
        CKR_DATA_LEN_RANGE => "CKR_DATA_LEN_RANGE",
        CKR_FUNCTION_REJECTED => "CKR_FUNCTION_REJECTED",
        CKR_FUNCTION_NOT_SUPPORTED => "CKR_FUNCTION_NOT_SUPPORTED",
        CKR_KEY_HANDLE_INVALID => "CKR_KEY_HANDLE_INVALID",
        CKR_KEY_FUNCTION_NOT_PERMITTED => "CKR_KEY_FUNCTION_NOT_PERMITTED",
        CKR_MECHANISM_INVALID => "CKR_MECHANISM_INVALID",
        CKR_MECHANISM_PARAM_INVALID => "CKR_MECHANISM_PARAM_INVALID",
        CKR_OBJECT_HANDLE_INVALID => "CKR_OBJECT_HANDLE_INVALID",
        CKR_OPERATION_ACTIVE => "CKR_OPERATION_ACTIVE",
        CKR_OPERATION_NOT_INITIALIZED => "CKR_OPERATION_NOT_INITIALIZED",
        CKR_SESSION_HANDLE_INVALID => "CKR_SESSION_HANDLE_INVALID",
        CKR_SESSION_PARALLEL_NOT_SUPPORTED => "CKR_SESSION_PARALLEL_NOT_SUPPORTED",
        CKR_SLOT_ID_INVALID => "CKR_SLOT_ID_INVALID",
        CKR_BUFFER_TOO_SMALL => "CKR_BUFFER_TOO_SMALL",
        CKR_CRYPTOKI_NOT_INITIALIZED => "CKR_CRYPTOKI_NOT_INITIALIZED",
        CKR_CRYPTOKI_ALREADY_INITIALIZED => "CKR_CRYPTOKI_ALREADY_INITIALIZED",
        CKR_USER_ALREADY_LOGGED_IN => "CKR_USER_ALREADY_LOGGED_IN",
        CKR_CANT_LOCK => "CKR_CANT_LOCK",
        CKR_NEED_TO_CREATE_THREADS => "CKR_NEED_TO_CREATE_THREADS",
        CKR_ATTRIBUTE_TYPE_INVALID => "CKR_ATTRIBUTE_TYPE_INVALID",
        CKR_ATTRIBUTE_SENSITIVE => "CKR_ATTRIBUTE_SENSITIVE",
        _ => return format!("CKR {rv:#x}"),
    };
    name.to_owned()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use super::*;

    /// After `C_Finalize`, a call still running in another thread holds the last
    /// reference and drops the module when it returns; that thread may be a task of the
    /// application's own async runtime, where a runtime that waits for its threads
    /// panics as it drops.
    #[test]
    fn the_module_drops_inside_an_async_runtime() {
        let app = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let module = Module::new(Vec::new()).unwrap();
        let dropped = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            app.block_on(async { drop(module) });
        }));
        assert!(dropped.is_ok(), "dropping the module panicked");
    }

    #[test]
    fn ecdsa_inputs_follow_bits2int() {
        let d32: Vec<u8> = (1..=32).collect();
        assert_eq!(ecdsa_input(&d32).unwrap().to_vec(), d32);
        let d48: Vec<u8> = (1..=48).collect();
        assert_eq!(ecdsa_input(&d48).unwrap().to_vec(), d32);
        let d20: Vec<u8> = (1..=20).collect();
        let mut padded = vec![0u8; 12];
        padded.extend_from_slice(&d20);
        assert_eq!(ecdsa_input(&d20).unwrap().to_vec(), padded);
        assert_eq!(ecdsa_input(&[]), Err(CKR_DATA_LEN_RANGE));
        assert_eq!(ecdsa_input(&[0u8; 65]), Err(CKR_DATA_LEN_RANGE));
    }
}
