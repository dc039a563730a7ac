//! The C ABI (PKCS#11 2.40): the one layer with `unsafe` code.
//!
//! Each entry point runs its body in [`guard`], which catches a panic and returns
//! `CKR_GENERAL_ERROR` instead of unwinding into C. Raw pointers become Rust references
//! and slices at the top of each body, checked for NULL once ([`out`], [`input`]); past
//! that, the calls go to the safe [`Module`]. Lengths follow the standard's two-call
//! convention (§5.2): a NULL output buffer asks for the length, a short one gets
//! `CKR_BUFFER_TOO_SMALL` with the length set.
#![allow(non_snake_case, reason = "the entry points keep the standard's names")]

use std::ffi::c_void;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, PoisonError, RwLock};

use cryptoki_sys::*;

use crate::config::SlotConfig;
use crate::object::Attribute;
use crate::token::{MECHANISMS, Module, refuse, rv_name};

/// The module while initialised (`C_Initialize` .. `C_Finalize`).
static MODULE: RwLock<Option<Arc<Module>>> = RwLock::new(None);

/// Cryptoki version implemented.
const CRYPTOKI_VERSION: CK_VERSION = CK_VERSION {
    major: 2,
    minor: 40,
};

/// This library's version (`CK_INFO.libraryVersion`, the slots' firmware version).
const LIBRARY_VERSION: CK_VERSION = CK_VERSION { major: 0, minor: 1 };

const MANUFACTURER: &str = "Quorate";

fn module() -> Result<Arc<Module>, CK_RV> {
    MODULE
        .read()
        .unwrap_or_else(PoisonError::into_inner)
        .clone()
        .ok_or(CKR_CRYPTOKI_NOT_INITIALIZED)
}

/// Initialises the module with these slots instead of reading the configuration: what
/// `C_Initialize` does after parsing its arguments.
///
/// # Errors
/// `CKR_CRYPTOKI_ALREADY_INITIALIZED`; `CKR_FUNCTION_FAILED` if the runtime cannot start.
pub fn initialize_with(slots: Vec<SlotConfig>) -> CK_RV {
    guard("initialize", || {
        let mut m = MODULE.write().unwrap_or_else(PoisonError::into_inner);
        if m.is_some() {
            return Err(CKR_CRYPTOKI_ALREADY_INITIALIZED);
        }
        *m = Some(Arc::new(Module::new(slots)?));
        Ok(())
    })
}

/// Runs an entry point's body; a panic becomes `CKR_GENERAL_ERROR` and never crosses
/// into C (the Rust runtime's panic message is printed to stderr as usual).
fn guard(call: &'static str, body: impl FnOnce() -> Result<(), CK_RV>) -> CK_RV {
    match std::panic::catch_unwind(AssertUnwindSafe(body)) {
        Ok(Ok(())) => CKR_OK,
        Ok(Err(rv)) => {
            tracing::debug!(call, rv = %rv_name(rv), "returns an error");
            rv
        }
        Err(_) => {
            tracing::error!(call, "panicked; returning CKR_GENERAL_ERROR");
            CKR_GENERAL_ERROR
        }
    }
}

/// `p` as a mutable reference, or `CKR_ARGUMENTS_BAD` naming `what`.
///
/// # Safety
/// If not NULL, `p` must point to a valid, writable, aligned `T` that nothing else uses
/// during the call (the caller's promise in every PKCS#11 function).
unsafe fn out<'a, T>(p: *mut T, what: &str) -> Result<&'a mut T, CK_RV> {
    // SAFETY: the caller guarantees that a non-NULL `p` is valid and unaliased;
    // `as_mut` handles NULL.
    unsafe { p.as_mut() }.ok_or_else(|| refuse(CKR_ARGUMENTS_BAD, format!("{what} is NULL")))
}

/// `len` bytes at `p` (NULL allowed when `len` is 0), or `CKR_ARGUMENTS_BAD`.
///
/// # Safety
/// If not NULL, `p` must point to `len` readable bytes that stay unchanged during the
/// call.
unsafe fn input<'a>(p: *const u8, len: CK_ULONG, what: &str) -> Result<&'a [u8], CK_RV> {
    if len == 0 {
        return Ok(&[]);
    }
    if p.is_null() {
        return Err(refuse(
            CKR_ARGUMENTS_BAD,
            format!("{what} is NULL with a length of {len}"),
        ));
    }
    let len = usize::try_from(len)
        .map_err(|_| refuse(CKR_ARGUMENTS_BAD, format!("{what}: length {len} too large")))?;
    // SAFETY: `p` is not NULL and, by the caller's promise, points to `len` readable
    // bytes that stay unchanged while the slice lives (this call).
    Ok(unsafe { std::slice::from_raw_parts(p, len) })
}

/// The template `count` attributes at `p`, as `(type, pValue, ulValueLen)` in place.
///
/// # Safety
/// If not NULL, `p` must point to `count` valid, writable `CK_ATTRIBUTE`s.
unsafe fn template<'a>(
    p: *mut CK_ATTRIBUTE,
    count: CK_ULONG,
) -> Result<&'a mut [CK_ATTRIBUTE], CK_RV> {
    if count == 0 {
        return Ok(&mut []);
    }
    if p.is_null() {
        return Err(refuse(
            CKR_ARGUMENTS_BAD,
            format!("pTemplate is NULL with {count} attributes"),
        ));
    }
    let count = usize::try_from(count).map_err(|_| CKR_ARGUMENTS_BAD)?;
    // SAFETY: `p` is not NULL and, by the caller's promise, points to `count` valid
    // attributes that nothing else touches during this call.
    Ok(unsafe { std::slice::from_raw_parts_mut(p, count) })
}

/// A search template of `count` attributes at `p`, read only: applications often pass a
/// `const` array (in read-only memory), so no mutable reference is made to it.
///
/// # Safety
/// If not NULL, `p` must point to `count` valid `CK_ATTRIBUTE`s.
unsafe fn search_template<'a>(
    p: *const CK_ATTRIBUTE,
    count: CK_ULONG,
) -> Result<&'a [CK_ATTRIBUTE], CK_RV> {
    if count == 0 {
        return Ok(&[]);
    }
    if p.is_null() {
        return Err(refuse(
            CKR_ARGUMENTS_BAD,
            format!("pTemplate is NULL with {count} attributes"),
        ));
    }
    let count = usize::try_from(count).map_err(|_| CKR_ARGUMENTS_BAD)?;
    // SAFETY: `p` is not NULL and, by the caller's promise, points to `count` valid
    // attributes that stay unchanged during this call.
    Ok(unsafe { std::slice::from_raw_parts(p, count) })
}

/// The caller's output array of `len` elements at `p` (not NULL).
///
/// # Safety
/// `p` must be non-NULL and point to `len` writable elements that nothing else uses
/// during the call.
unsafe fn out_array<'a, T>(p: *mut T, len: usize) -> &'a mut [T] {
    // SAFETY: the caller's promise, as above.
    unsafe { std::slice::from_raw_parts_mut(p, len) }
}

/// Copies `data` to a caller's buffer with the two-call convention: a NULL `buf` gets
/// only the length; a buffer shorter than `data` gets `CKR_BUFFER_TOO_SMALL` and the
/// length.
///
/// # Safety
/// If not NULL, `buf` must point to `*len` writable bytes.
unsafe fn write_out(buf: *mut u8, len: &mut CK_ULONG, data: &[u8]) -> Result<(), CK_RV> {
    let need = CK_ULONG::try_from(data.len()).map_err(|_| CKR_GENERAL_ERROR)?;
    if buf.is_null() {
        *len = need;
        return Ok(());
    }
    if *len < need {
        *len = need;
        return Err(CKR_BUFFER_TOO_SMALL);
    }
    // SAFETY: `buf` is not NULL and has `*len >= data.len()` writable bytes (caller's
    // promise); `data` is ours, so the two do not overlap.
    unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), buf, data.len()) };
    *len = need;
    Ok(())
}

/// `s` blank-padded (or cut at a character boundary) to a fixed-width PKCS#11 string.
fn padded<const N: usize>(s: &str) -> [u8; N] {
    let mut out = [b' '; N];
    let mut end = s.len().min(N);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    if let (Some(dst), Some(src)) = (out.get_mut(..end), s.as_bytes().get(..end)) {
        dst.copy_from_slice(src);
    }
    out
}

fn count(n: usize) -> CK_ULONG {
    CK_ULONG::try_from(n).unwrap_or(CK_UNAVAILABLE_INFORMATION)
}

/// Sets up logging to stderr once, filtered by `QUORATE_LOG` (default: warnings), unless
/// the application has its own `tracing` subscriber.
fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("QUORATE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _already = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .with_target(false)
        .try_init();
}

unsafe extern "C" fn C_Initialize(p_init_args: *mut c_void) -> CK_RV {
    guard("C_Initialize", || {
        init_logging();
        if !p_init_args.is_null() {
            // SAFETY: a non-NULL argument points to a CK_C_INITIALIZE_ARGS (§5.4).
            let args = unsafe { &*(p_init_args as *const CK_C_INITIALIZE_ARGS) };
            if !args.pReserved.is_null() {
                return Err(refuse(
                    CKR_ARGUMENTS_BAD,
                    "CK_C_INITIALIZE_ARGS.pReserved is not NULL",
                ));
            }
            let given = [
                args.CreateMutex.is_some(),
                args.DestroyMutex.is_some(),
                args.LockMutex.is_some(),
                args.UnlockMutex.is_some(),
            ];
            if given.iter().any(|g| *g) && !given.iter().all(|g| *g) {
                return Err(refuse(
                    CKR_ARGUMENTS_BAD,
                    "CK_C_INITIALIZE_ARGS gives some of the four mutex functions but not all",
                ));
            }
            if given.iter().all(|g| *g) && args.flags & CKF_OS_LOCKING_OK == 0 {
                return Err(refuse(
                    CKR_CANT_LOCK,
                    "the module locks with the operating system's primitives only: set CKF_OS_LOCKING_OK",
                ));
            }
            if args.flags & CKF_LIBRARY_CANT_CREATE_OS_THREADS != 0 {
                return Err(refuse(
                    CKR_NEED_TO_CREATE_THREADS,
                    "the module runs its network I/O on threads of its own, which \
                     CKF_LIBRARY_CANT_CREATE_OS_THREADS forbids",
                ));
            }
        }
        // Already initialised: say so before reading a configuration that may have
        // changed or gone since (`initialize_with` checks again under its lock).
        if module().is_ok() {
            return Err(CKR_CRYPTOKI_ALREADY_INITIALIZED);
        }
        let slots = crate::config::load().map_err(|e| refuse(CKR_FUNCTION_FAILED, e))?;
        match initialize_with(slots) {
            CKR_OK => Ok(()),
            rv => Err(rv),
        }
    })
}

unsafe extern "C" fn C_Finalize(p_reserved: *mut c_void) -> CK_RV {
    guard("C_Finalize", || {
        if !p_reserved.is_null() {
            return Err(refuse(
                CKR_ARGUMENTS_BAD,
                "C_Finalize: pReserved is not NULL",
            ));
        }
        let module = MODULE
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
            .ok_or(CKR_CRYPTOKI_NOT_INITIALIZED)?;
        // A call still running in another thread keeps the module until it returns
        // (then the runtime stops in the background as the module drops, on whatever
        // thread that is); otherwise stop it here.
        if let Ok(module) = Arc::try_unwrap(module) {
            module.shutdown();
        }
        Ok(())
    })
}

unsafe extern "C" fn C_GetInfo(p_info: *mut CK_INFO) -> CK_RV {
    guard("C_GetInfo", || {
        module()?;
        // SAFETY: pInfo is the caller's CK_INFO (or NULL, refused).
        let info = unsafe { out(p_info, "pInfo") }?;
        *info = CK_INFO {
            cryptokiVersion: CRYPTOKI_VERSION,
            manufacturerID: padded(MANUFACTURER),
            flags: 0,
            libraryDescription: padded("Quorate threshold P-256"),
            libraryVersion: LIBRARY_VERSION,
        };
        Ok(())
    })
}

unsafe extern "C" fn C_GetSlotList(
    _token_present: CK_BBOOL,
    p_slot_list: *mut CK_SLOT_ID,
    pul_count: *mut CK_ULONG,
) -> CK_RV {
    guard("C_GetSlotList", || {
        let m = module()?;
        // SAFETY: pulCount is the caller's CK_ULONG (or NULL, refused).
        let n = unsafe { out(pul_count, "pulCount") }?;
        let slots = m.slot_count();
        if p_slot_list.is_null() {
            *n = count(slots);
            return Ok(());
        }
        let room = usize::try_from(*n).unwrap_or(usize::MAX);
        *n = count(slots);
        if room < slots {
            return Err(CKR_BUFFER_TOO_SMALL);
        }
        // SAFETY: pSlotList is not NULL and has room for `room >= slots` ids (caller's
        // promise).
        let list = unsafe { out_array(p_slot_list, slots) };
        for (i, id) in list.iter_mut().enumerate() {
            *id = count(i);
        }
        Ok(())
    })
}

unsafe extern "C" fn C_GetSlotInfo(slot_id: CK_SLOT_ID, p_info: *mut CK_SLOT_INFO) -> CK_RV {
    guard("C_GetSlotInfo", || {
        let m = module()?;
        let slot = m.slot(slot_id)?;
        // SAFETY: pInfo is the caller's CK_SLOT_INFO (or NULL, refused).
        let info = unsafe { out(p_info, "pInfo") }?;
        *info = CK_SLOT_INFO {
            slotDescription: padded(&format!(
                "Quorate cluster {} at {}",
                slot.config.label, slot.config.client.addr
            )),
            manufacturerID: padded(MANUFACTURER),
            flags: CKF_TOKEN_PRESENT,
            hardwareVersion: LIBRARY_VERSION,
            firmwareVersion: LIBRARY_VERSION,
        };
        Ok(())
    })
}

unsafe extern "C" fn C_GetTokenInfo(slot_id: CK_SLOT_ID, p_info: *mut CK_TOKEN_INFO) -> CK_RV {
    guard("C_GetTokenInfo", || {
        let m = module()?;
        let slot = m.slot(slot_id)?;
        // SAFETY: pInfo is the caller's CK_TOKEN_INFO (or NULL, refused).
        let info = unsafe { out(p_info, "pInfo") }?;
        let (sessions, rw) = m.session_counts(slot_id);
        *info = CK_TOKEN_INFO {
            label: padded(&slot.config.label),
            manufacturerID: padded(MANUFACTURER),
            model: padded("threshold P-256"),
            serialNumber: padded(&format!("{slot_id}")),
            // No CKF_LOGIN_REQUIRED: the client certificate of the mutual TLS connection
            // is the authority, so there is no PIN (C_Login answers
            // CKR_USER_ALREADY_LOGGED_IN). No CKF_RNG, no CKF_CLOCK_ON_TOKEN.
            flags: CKF_TOKEN_INITIALIZED,
            ulMaxSessionCount: CK_EFFECTIVELY_INFINITE,
            ulSessionCount: count(sessions),
            ulMaxRwSessionCount: CK_EFFECTIVELY_INFINITE,
            ulRwSessionCount: count(rw),
            ulMaxPinLen: 0,
            ulMinPinLen: 0,
            ulTotalPublicMemory: CK_UNAVAILABLE_INFORMATION,
            ulFreePublicMemory: CK_UNAVAILABLE_INFORMATION,
            ulTotalPrivateMemory: CK_UNAVAILABLE_INFORMATION,
            ulFreePrivateMemory: CK_UNAVAILABLE_INFORMATION,
            hardwareVersion: LIBRARY_VERSION,
            firmwareVersion: LIBRARY_VERSION,
            utcTime: [b' '; 16],
        };
        Ok(())
    })
}

unsafe extern "C" fn C_GetMechanismList(
    slot_id: CK_SLOT_ID,
    p_mechanism_list: *mut CK_MECHANISM_TYPE,
    pul_count: *mut CK_ULONG,
) -> CK_RV {
    guard("C_GetMechanismList", || {
        module()?.slot(slot_id)?;
        // SAFETY: pulCount is the caller's CK_ULONG (or NULL, refused).
        let n = unsafe { out(pul_count, "pulCount") }?;
        if p_mechanism_list.is_null() {
            *n = count(MECHANISMS.len());
            return Ok(());
        }
        let room = usize::try_from(*n).unwrap_or(usize::MAX);
        *n = count(MECHANISMS.len());
        if room < MECHANISMS.len() {
            return Err(CKR_BUFFER_TOO_SMALL);
        }
        // SAFETY: the list is not NULL and has room for `room >= MECHANISMS.len()`
        // entries (caller's promise).
        let list = unsafe { out_array(p_mechanism_list, MECHANISMS.len()) };
        list.copy_from_slice(&MECHANISMS);
        Ok(())
    })
}

unsafe extern "C" fn C_GetMechanismInfo(
    slot_id: CK_SLOT_ID,
    mechanism: CK_MECHANISM_TYPE,
    p_info: *mut CK_MECHANISM_INFO,
) -> CK_RV {
    guard("C_GetMechanismInfo", || {
        module()?.slot(slot_id)?;
        if !MECHANISMS.contains(&mechanism) {
            return Err(refuse(
                CKR_MECHANISM_INVALID,
                format!("mechanism {mechanism:#x} is not supported"),
            ));
        }
        // SAFETY: pInfo is the caller's CK_MECHANISM_INFO (or NULL, refused).
        let info = unsafe { out(p_info, "pInfo") }?;
        *info = CK_MECHANISM_INFO {
            ulMinKeySize: 256,
            ulMaxKeySize: 256,
            flags: CKF_SIGN | CKF_EC_F_P | CKF_EC_NAMEDCURVE | CKF_EC_UNCOMPRESS,
        };
        Ok(())
    })
}

unsafe extern "C" fn C_OpenSession(
    slot_id: CK_SLOT_ID,
    flags: CK_FLAGS,
    _p_application: *mut c_void,
    _notify: CK_NOTIFY,
    ph_session: *mut CK_SESSION_HANDLE,
) -> CK_RV {
    guard("C_OpenSession", || {
        let m = module()?;
        // SAFETY: phSession is the caller's CK_SESSION_HANDLE (or NULL, refused).
        let h = unsafe { out(ph_session, "phSession") }?;
        *h = m.open_session(slot_id, flags)?;
        Ok(())
    })
}

unsafe extern "C" fn C_CloseSession(h_session: CK_SESSION_HANDLE) -> CK_RV {
    guard("C_CloseSession", || module()?.close_session(h_session))
}

unsafe extern "C" fn C_CloseAllSessions(slot_id: CK_SLOT_ID) -> CK_RV {
    guard("C_CloseAllSessions", || {
        module()?.close_all_sessions(slot_id)
    })
}

unsafe extern "C" fn C_GetSessionInfo(
    h_session: CK_SESSION_HANDLE,
    p_info: *mut CK_SESSION_INFO,
) -> CK_RV {
    guard("C_GetSessionInfo", || {
        let (slot, state, flags) = module()?.session_info(h_session)?;
        // SAFETY: pInfo is the caller's CK_SESSION_INFO (or NULL, refused).
        let info = unsafe { out(p_info, "pInfo") }?;
        *info = CK_SESSION_INFO {
            slotID: slot,
            state,
            flags,
            ulDeviceError: 0,
        };
        Ok(())
    })
}

unsafe extern "C" fn C_Login(
    h_session: CK_SESSION_HANDLE,
    user_type: CK_USER_TYPE,
    _p_pin: *mut CK_UTF8CHAR,
    _ul_pin_len: CK_ULONG,
) -> CK_RV {
    guard("C_Login", || {
        module()?.check_session(h_session)?;
        if ![CKU_SO, CKU_USER, CKU_CONTEXT_SPECIFIC].contains(&user_type) {
            return Err(refuse(
                CKR_USER_TYPE_INVALID,
                format!("user type {user_type}"),
            ));
        }
        tracing::info!(
            "C_Login: no PIN is used; the client certificate of the TLS connection is the authority"
        );
        Err(CKR_USER_ALREADY_LOGGED_IN)
    })
}

unsafe extern "C" fn C_Logout(h_session: CK_SESSION_HANDLE) -> CK_RV {
    guard("C_Logout", || module()?.check_session(h_session))
}

unsafe extern "C" fn C_GetAttributeValue(
    h_session: CK_SESSION_HANDLE,
    h_object: CK_OBJECT_HANDLE,
    p_template: *mut CK_ATTRIBUTE,
    ul_count: CK_ULONG,
) -> CK_RV {
    guard("C_GetAttributeValue", || {
        let object = module()?.object(h_session, h_object)?;
        // SAFETY: pTemplate is the caller's array of ulCount attributes (or NULL, refused).
        let attrs = unsafe { template(p_template, ul_count) }?;
        // §5.7: every attribute is processed; the call returns the last of the errors.
        let mut rv = CKR_OK;
        for attr in attrs.iter_mut() {
            match object.attribute(attr.type_) {
                Attribute::Value(v) => {
                    // SAFETY: a non-NULL pValue has ulValueLen writable bytes (§5.7).
                    match unsafe { write_out(attr.pValue.cast::<u8>(), &mut attr.ulValueLen, &v) } {
                        Ok(()) => {}
                        Err(e) => {
                            attr.ulValueLen = CK_UNAVAILABLE_INFORMATION;
                            rv = e;
                        }
                    }
                }
                Attribute::Sensitive => {
                    attr.ulValueLen = CK_UNAVAILABLE_INFORMATION;
                    rv = CKR_ATTRIBUTE_SENSITIVE;
                }
                Attribute::Invalid => {
                    attr.ulValueLen = CK_UNAVAILABLE_INFORMATION;
                    rv = CKR_ATTRIBUTE_TYPE_INVALID;
                }
            }
        }
        if rv == CKR_OK { Ok(()) } else { Err(rv) }
    })
}

unsafe extern "C" fn C_FindObjectsInit(
    h_session: CK_SESSION_HANDLE,
    p_template: *mut CK_ATTRIBUTE,
    ul_count: CK_ULONG,
) -> CK_RV {
    guard("C_FindObjectsInit", || {
        let m = module()?;
        m.check_session(h_session)?;
        // SAFETY: pTemplate is the caller's array of ulCount attributes (or NULL, refused).
        let attrs = unsafe { search_template(p_template, ul_count) }?;
        let mut wanted = Vec::with_capacity(attrs.len());
        for a in attrs.iter() {
            // SAFETY: each attribute's pValue holds ulValueLen readable bytes (§5.7).
            let value = unsafe { input(a.pValue.cast::<u8>(), a.ulValueLen, "pTemplate pValue") }?;
            wanted.push((a.type_, value.to_vec()));
        }
        m.find_init(h_session, &wanted)
    })
}

unsafe extern "C" fn C_FindObjects(
    h_session: CK_SESSION_HANDLE,
    ph_object: *mut CK_OBJECT_HANDLE,
    ul_max_object_count: CK_ULONG,
    pul_object_count: *mut CK_ULONG,
) -> CK_RV {
    guard("C_FindObjects", || {
        let m = module()?;
        // SAFETY: pulObjectCount is the caller's CK_ULONG (or NULL, refused).
        let n = unsafe { out(pul_object_count, "pulObjectCount") }?;
        if ph_object.is_null() && ul_max_object_count > 0 {
            return Err(refuse(CKR_ARGUMENTS_BAD, "phObject is NULL"));
        }
        let max = usize::try_from(ul_max_object_count).unwrap_or(usize::MAX);
        let found = m.find(h_session, max)?;
        if !found.is_empty() {
            // SAFETY: phObject is not NULL (checked above, as `max > 0`) and has room for
            // ulMaxObjectCount handles; `found.len() <= ulMaxObjectCount`.
            let out = unsafe { out_array(ph_object, found.len()) };
            out.copy_from_slice(&found);
        }
        *n = count(found.len());
        Ok(())
    })
}

unsafe extern "C" fn C_FindObjectsFinal(h_session: CK_SESSION_HANDLE) -> CK_RV {
    guard("C_FindObjectsFinal", || module()?.find_final(h_session))
}

unsafe extern "C" fn C_SignInit(
    h_session: CK_SESSION_HANDLE,
    p_mechanism: *mut CK_MECHANISM,
    h_key: CK_OBJECT_HANDLE,
) -> CK_RV {
    guard("C_SignInit", || {
        let m = module()?;
        m.check_session(h_session)?;
        // SAFETY: pMechanism is the caller's CK_MECHANISM (or NULL, refused).
        let mech = unsafe { out(p_mechanism, "pMechanism") }?;
        let has_parameter = !mech.pParameter.is_null() || mech.ulParameterLen != 0;
        m.sign_init(h_session, mech.mechanism, has_parameter, h_key)
    })
}

/// `C_Sign` and `C_SignFinal` after their input: the size query, the short buffer,
/// or the signature. Any error but `CKR_BUFFER_TOO_SMALL` ends the operation (§5.12).
///
/// # Safety
/// As for `C_Sign`'s `pSignature` and `pulSignatureLen`.
unsafe fn signature_out(
    m: &Module,
    h: CK_SESSION_HANDLE,
    p_signature: *mut u8,
    pul_signature_len: *mut CK_ULONG,
    sign: impl FnOnce(&Module) -> Result<Vec<u8>, CK_RV>,
) -> Result<(), CK_RV> {
    let result = (|| {
        // SAFETY: pulSignatureLen is the caller's CK_ULONG (or NULL, refused).
        let len = unsafe { out(pul_signature_len, "pulSignatureLen") }?;
        let need = m.sign_pending(h)?;
        let need_ul = count(need);
        if p_signature.is_null() {
            *len = need_ul;
            return Ok(());
        }
        if *len < need_ul {
            *len = need_ul;
            return Err(CKR_BUFFER_TOO_SMALL);
        }
        let sig = sign(m)?;
        // SAFETY: pSignature has `*len >= SIGNATURE_LEN` writable bytes.
        unsafe { write_out(p_signature, len, &sig) }
    })();
    if let Err(rv) = result
        && rv != CKR_BUFFER_TOO_SMALL
    {
        m.sign_abort(h);
    }
    result
}

unsafe extern "C" fn C_Sign(
    h_session: CK_SESSION_HANDLE,
    p_data: *mut CK_BYTE,
    ul_data_len: CK_ULONG,
    p_signature: *mut CK_BYTE,
    pul_signature_len: *mut CK_ULONG,
) -> CK_RV {
    guard("C_Sign", || {
        let m = module()?;
        // SAFETY: pData holds ulDataLen readable bytes (or is NULL, refused).
        let data = match unsafe { input(p_data, ul_data_len, "pData") } {
            Ok(d) => d,
            Err(rv) => {
                m.sign_abort(h_session);
                return Err(rv);
            }
        };
        // SAFETY: the caller's output arguments, passed through.
        unsafe {
            signature_out(&m, h_session, p_signature, pul_signature_len, |m| {
                m.sign(h_session, data)
            })
        }
    })
}

unsafe extern "C" fn C_SignUpdate(
    h_session: CK_SESSION_HANDLE,
    p_part: *mut CK_BYTE,
    ul_part_len: CK_ULONG,
) -> CK_RV {
    guard("C_SignUpdate", || {
        let m = module()?;
        // SAFETY: pPart holds ulPartLen readable bytes (or is NULL, refused).
        let part = match unsafe { input(p_part, ul_part_len, "pPart") } {
            Ok(p) => p,
            Err(rv) => {
                m.sign_abort(h_session);
                return Err(rv);
            }
        };
        m.sign_update(h_session, part)
    })
}

unsafe extern "C" fn C_SignFinal(
    h_session: CK_SESSION_HANDLE,
    p_signature: *mut CK_BYTE,
    pul_signature_len: *mut CK_ULONG,
) -> CK_RV {
    guard("C_SignFinal", || {
        let m = module()?;
        // SAFETY: the caller's output arguments, passed through.
        unsafe {
            signature_out(&m, h_session, p_signature, pul_signature_len, |m| {
                m.sign_final(h_session)
            })
        }
    })
}

unsafe extern "C" fn C_DeriveKey(
    h_session: CK_SESSION_HANDLE,
    p_mechanism: *mut CK_MECHANISM,
    _h_base_key: CK_OBJECT_HANDLE,
    _p_template: *mut CK_ATTRIBUTE,
    _ul_attribute_count: CK_ULONG,
    _ph_key: *mut CK_OBJECT_HANDLE,
) -> CK_RV {
    guard("C_DeriveKey", || {
        let m = module()?;
        m.check_session(h_session)?;
        // SAFETY: pMechanism is the caller's CK_MECHANISM (or NULL, refused).
        let mech = unsafe { out(p_mechanism, "pMechanism") }?;
        m.derive(h_session, mech.mechanism)
    })
}

unsafe extern "C" fn C_GetFunctionStatus(h_session: CK_SESSION_HANDLE) -> CK_RV {
    guard("C_GetFunctionStatus", || {
        module()?.check_session(h_session)?;
        Err(CKR_FUNCTION_NOT_PARALLEL)
    })
}

unsafe extern "C" fn C_CancelFunction(h_session: CK_SESSION_HANDLE) -> CK_RV {
    guard("C_CancelFunction", || {
        module()?.check_session(h_session)?;
        Err(CKR_FUNCTION_NOT_PARALLEL)
    })
}

/// The token has no random number generator (no `CKF_RNG`; §5.15).
unsafe extern "C" fn C_SeedRandom(
    h_session: CK_SESSION_HANDLE,
    _seed: *mut CK_BYTE,
    _len: CK_ULONG,
) -> CK_RV {
    guard("C_SeedRandom", || {
        module()?.check_session(h_session)?;
        Err(CKR_RANDOM_NO_RNG)
    })
}

/// As [`C_SeedRandom`].
unsafe extern "C" fn C_GenerateRandom(
    h_session: CK_SESSION_HANDLE,
    _data: *mut CK_BYTE,
    _len: CK_ULONG,
) -> CK_RV {
    guard("C_GenerateRandom", || {
        module()?.check_session(h_session)?;
        Err(CKR_RANDOM_NO_RNG)
    })
}

/// Functions the token does not offer: `CKR_CRYPTOKI_NOT_INITIALIZED` before
/// `C_Initialize`, then `CKR_FUNCTION_NOT_SUPPORTED` (§5: "any function ... may return
/// CKR_FUNCTION_NOT_SUPPORTED"). Writing objects, PINs, verification, encryption, digests
/// and random numbers are not the token's: a key is created by a distributed key
/// generation (`quorate key create NAME --profile raw`), and public operations belong to
/// any software library.
macro_rules! not_supported {
    ($($name:ident($($arg:ty),*);)*) => {$(
        unsafe extern "C" fn $name($(_: $arg),*) -> CK_RV {
            guard(stringify!($name), || {
                module()?;
                Err(CKR_FUNCTION_NOT_SUPPORTED)
            })
        }
    )*};
}

not_supported! {
    C_InitToken(CK_SLOT_ID, *mut CK_UTF8CHAR, CK_ULONG, *mut CK_UTF8CHAR);
    C_InitPIN(CK_SESSION_HANDLE, *mut CK_UTF8CHAR, CK_ULONG);
    C_SetPIN(CK_SESSION_HANDLE, *mut CK_UTF8CHAR, CK_ULONG, *mut CK_UTF8CHAR, CK_ULONG);
    C_GetOperationState(CK_SESSION_HANDLE, *mut CK_BYTE, *mut CK_ULONG);
    C_SetOperationState(CK_SESSION_HANDLE, *mut CK_BYTE, CK_ULONG, CK_OBJECT_HANDLE, CK_OBJECT_HANDLE);
    C_CreateObject(CK_SESSION_HANDLE, *mut CK_ATTRIBUTE, CK_ULONG, *mut CK_OBJECT_HANDLE);
    C_CopyObject(CK_SESSION_HANDLE, CK_OBJECT_HANDLE, *mut CK_ATTRIBUTE, CK_ULONG, *mut CK_OBJECT_HANDLE);
    C_DestroyObject(CK_SESSION_HANDLE, CK_OBJECT_HANDLE);
    C_GetObjectSize(CK_SESSION_HANDLE, CK_OBJECT_HANDLE, *mut CK_ULONG);
    C_SetAttributeValue(CK_SESSION_HANDLE, CK_OBJECT_HANDLE, *mut CK_ATTRIBUTE, CK_ULONG);
    C_EncryptInit(CK_SESSION_HANDLE, *mut CK_MECHANISM, CK_OBJECT_HANDLE);
    C_Encrypt(CK_SESSION_HANDLE, *mut CK_BYTE, CK_ULONG, *mut CK_BYTE, *mut CK_ULONG);
    C_EncryptUpdate(CK_SESSION_HANDLE, *mut CK_BYTE, CK_ULONG, *mut CK_BYTE, *mut CK_ULONG);
    C_EncryptFinal(CK_SESSION_HANDLE, *mut CK_BYTE, *mut CK_ULONG);
    C_DecryptInit(CK_SESSION_HANDLE, *mut CK_MECHANISM, CK_OBJECT_HANDLE);
    C_Decrypt(CK_SESSION_HANDLE, *mut CK_BYTE, CK_ULONG, *mut CK_BYTE, *mut CK_ULONG);
    C_DecryptUpdate(CK_SESSION_HANDLE, *mut CK_BYTE, CK_ULONG, *mut CK_BYTE, *mut CK_ULONG);
    C_DecryptFinal(CK_SESSION_HANDLE, *mut CK_BYTE, *mut CK_ULONG);
    C_DigestInit(CK_SESSION_HANDLE, *mut CK_MECHANISM);
    C_Digest(CK_SESSION_HANDLE, *mut CK_BYTE, CK_ULONG, *mut CK_BYTE, *mut CK_ULONG);
    C_DigestUpdate(CK_SESSION_HANDLE, *mut CK_BYTE, CK_ULONG);
    C_DigestKey(CK_SESSION_HANDLE, CK_OBJECT_HANDLE);
    C_DigestFinal(CK_SESSION_HANDLE, *mut CK_BYTE, *mut CK_ULONG);
    C_SignRecoverInit(CK_SESSION_HANDLE, *mut CK_MECHANISM, CK_OBJECT_HANDLE);
    C_SignRecover(CK_SESSION_HANDLE, *mut CK_BYTE, CK_ULONG, *mut CK_BYTE, *mut CK_ULONG);
    C_VerifyInit(CK_SESSION_HANDLE, *mut CK_MECHANISM, CK_OBJECT_HANDLE);
    C_Verify(CK_SESSION_HANDLE, *mut CK_BYTE, CK_ULONG, *mut CK_BYTE, CK_ULONG);
    C_VerifyUpdate(CK_SESSION_HANDLE, *mut CK_BYTE, CK_ULONG);
    C_VerifyFinal(CK_SESSION_HANDLE, *mut CK_BYTE, CK_ULONG);
    C_VerifyRecoverInit(CK_SESSION_HANDLE, *mut CK_MECHANISM, CK_OBJECT_HANDLE);
    C_VerifyRecover(CK_SESSION_HANDLE, *mut CK_BYTE, CK_ULONG, *mut CK_BYTE, *mut CK_ULONG);
    C_DigestEncryptUpdate(CK_SESSION_HANDLE, *mut CK_BYTE, CK_ULONG, *mut CK_BYTE, *mut CK_ULONG);
    C_DecryptDigestUpdate(CK_SESSION_HANDLE, *mut CK_BYTE, CK_ULONG, *mut CK_BYTE, *mut CK_ULONG);
    C_SignEncryptUpdate(CK_SESSION_HANDLE, *mut CK_BYTE, CK_ULONG, *mut CK_BYTE, *mut CK_ULONG);
    C_DecryptVerifyUpdate(CK_SESSION_HANDLE, *mut CK_BYTE, CK_ULONG, *mut CK_BYTE, *mut CK_ULONG);
    C_GenerateKey(CK_SESSION_HANDLE, *mut CK_MECHANISM, *mut CK_ATTRIBUTE, CK_ULONG, *mut CK_OBJECT_HANDLE);
    C_GenerateKeyPair(CK_SESSION_HANDLE, *mut CK_MECHANISM, *mut CK_ATTRIBUTE, CK_ULONG, *mut CK_ATTRIBUTE, CK_ULONG, *mut CK_OBJECT_HANDLE, *mut CK_OBJECT_HANDLE);
    C_WrapKey(CK_SESSION_HANDLE, *mut CK_MECHANISM, CK_OBJECT_HANDLE, CK_OBJECT_HANDLE, *mut CK_BYTE, *mut CK_ULONG);
    C_UnwrapKey(CK_SESSION_HANDLE, *mut CK_MECHANISM, CK_OBJECT_HANDLE, *mut CK_BYTE, CK_ULONG, *mut CK_ATTRIBUTE, CK_ULONG, *mut CK_OBJECT_HANDLE);
    C_WaitForSlotEvent(CK_FLAGS, *mut CK_SLOT_ID, *mut c_void);
}

/// The function list `C_GetFunctionList` hands out; it lives as long as the library.
static FUNCTION_LIST: CK_FUNCTION_LIST = CK_FUNCTION_LIST {
    version: CRYPTOKI_VERSION,
    C_Initialize: Some(C_Initialize),
    C_Finalize: Some(C_Finalize),
    C_GetInfo: Some(C_GetInfo),
    C_GetFunctionList: Some(C_GetFunctionList),
    C_GetSlotList: Some(C_GetSlotList),
    C_GetSlotInfo: Some(C_GetSlotInfo),
    C_GetTokenInfo: Some(C_GetTokenInfo),
    C_GetMechanismList: Some(C_GetMechanismList),
    C_GetMechanismInfo: Some(C_GetMechanismInfo),
    C_InitToken: Some(C_InitToken),
    C_InitPIN: Some(C_InitPIN),
    C_SetPIN: Some(C_SetPIN),
    C_OpenSession: Some(C_OpenSession),
    C_CloseSession: Some(C_CloseSession),
    C_CloseAllSessions: Some(C_CloseAllSessions),
    C_GetSessionInfo: Some(C_GetSessionInfo),
    C_GetOperationState: Some(C_GetOperationState),
    C_SetOperationState: Some(C_SetOperationState),
    C_Login: Some(C_Login),
    C_Logout: Some(C_Logout),
    C_CreateObject: Some(C_CreateObject),
    C_CopyObject: Some(C_CopyObject),
    C_DestroyObject: Some(C_DestroyObject),
    C_GetObjectSize: Some(C_GetObjectSize),
    C_GetAttributeValue: Some(C_GetAttributeValue),
    C_SetAttributeValue: Some(C_SetAttributeValue),
    C_FindObjectsInit: Some(C_FindObjectsInit),
    C_FindObjects: Some(C_FindObjects),
    C_FindObjectsFinal: Some(C_FindObjectsFinal),
    C_EncryptInit: Some(C_EncryptInit),
    C_Encrypt: Some(C_Encrypt),
    C_EncryptUpdate: Some(C_EncryptUpdate),
    C_EncryptFinal: Some(C_EncryptFinal),
    C_DecryptInit: Some(C_DecryptInit),
    C_Decrypt: Some(C_Decrypt),
    C_DecryptUpdate: Some(C_DecryptUpdate),
    C_DecryptFinal: Some(C_DecryptFinal),
    C_DigestInit: Some(C_DigestInit),
    C_Digest: Some(C_Digest),
    C_DigestUpdate: Some(C_DigestUpdate),
    C_DigestKey: Some(C_DigestKey),
    C_DigestFinal: Some(C_DigestFinal),
    C_SignInit: Some(C_SignInit),
    C_Sign: Some(C_Sign),
    C_SignUpdate: Some(C_SignUpdate),
    C_SignFinal: Some(C_SignFinal),
    C_SignRecoverInit: Some(C_SignRecoverInit),
    C_SignRecover: Some(C_SignRecover),
    C_VerifyInit: Some(C_VerifyInit),
    C_Verify: Some(C_Verify),
    C_VerifyUpdate: Some(C_VerifyUpdate),
    C_VerifyFinal: Some(C_VerifyFinal),
    C_VerifyRecoverInit: Some(C_VerifyRecoverInit),
    C_VerifyRecover: Some(C_VerifyRecover),
    C_DigestEncryptUpdate: Some(C_DigestEncryptUpdate),
    C_DecryptDigestUpdate: Some(C_DecryptDigestUpdate),
    C_SignEncryptUpdate: Some(C_SignEncryptUpdate),
    C_DecryptVerifyUpdate: Some(C_DecryptVerifyUpdate),
    C_GenerateKey: Some(C_GenerateKey),
    C_GenerateKeyPair: Some(C_GenerateKeyPair),
    C_WrapKey: Some(C_WrapKey),
    C_UnwrapKey: Some(C_UnwrapKey),
    C_DeriveKey: Some(C_DeriveKey),
    C_SeedRandom: Some(C_SeedRandom),
    C_GenerateRandom: Some(C_GenerateRandom),
    C_GetFunctionStatus: Some(C_GetFunctionStatus),
    C_CancelFunction: Some(C_CancelFunction),
    C_WaitForSlotEvent: Some(C_WaitForSlotEvent),
};

/// The module's one exported entry point (PKCS#11 2.40 §5.4): sets `*ppFunctionList` to
/// the module's function list, which stays valid while the library is loaded and which
/// the caller must not modify.
///
/// Returns `CKR_ARGUMENTS_BAD` if `ppFunctionList` is NULL, else `CKR_OK`; callable
/// before `C_Initialize`.
///
/// # Safety
/// `pp_function_list` must be NULL or point to a writable `CK_FUNCTION_LIST_PTR`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn C_GetFunctionList(pp_function_list: *mut *mut CK_FUNCTION_LIST) -> CK_RV {
    guard("C_GetFunctionList", || {
        // SAFETY: ppFunctionList is the caller's pointer slot (or NULL, refused).
        let slot = unsafe { out(pp_function_list, "ppFunctionList") }?;
        // The list is never written through this pointer: the standard's type is
        // non-const, but callers only read it (§5.4).
        *slot = (&raw const FUNCTION_LIST).cast_mut();
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    //! The C ABI without a cluster: sessions open without connecting (a slot connects on
    //! its first find or sign), so argument checks, handles, operation states and
    //! mechanisms are all reachable. The tests share the one module, so they take turns.
    #![allow(clippy::unwrap_used, reason = "tests")]
    use std::ptr::{null, null_mut};
    use std::sync::Mutex;

    use quorate_client::ClientConfig;

    use super::*;

    /// Calls a function of the list. Every test passes NULL only where the module must
    /// refuse it before any access, and otherwise pointers to live locals of the sizes
    /// given (the comment at each call says which).
    macro_rules! call {
        ($f:ident . $name:ident ( $($arg:expr),* )) => {{
            let function = $f.$name.unwrap();
            // SAFETY: the arguments are valid for `function`, as each call site says.
            unsafe { function($($arg),*) }
        }};
    }

    static TURN: Mutex<()> = Mutex::new(());

    fn functions() -> &'static CK_FUNCTION_LIST {
        let mut list: *mut CK_FUNCTION_LIST = null_mut();
        // SAFETY: `list` is a valid place for the pointer.
        let rv = unsafe { C_GetFunctionList(&mut list) };
        assert_eq!(rv, CKR_OK);
        // SAFETY: C_GetFunctionList set it to the static list, which lives forever.
        unsafe { &*list }
    }

    /// Runs `test` with the module initialised with two slots whose cluster does not
    /// exist (nothing connects unless a test finds or signs).
    fn with_module(test: impl FnOnce(&CK_FUNCTION_LIST)) {
        let _turn = TURN.lock().unwrap_or_else(PoisonError::into_inner);
        let slot = |label: &str| SlotConfig {
            label: label.to_owned(),
            client: ClientConfig::admin(
                Path::new("/nonexistent"),
                "127.0.0.1:9".parse().unwrap(),
                "quorate.test",
            ),
        };
        assert_eq!(initialize_with(vec![slot("a"), slot("b")]), CKR_OK);
        let f = functions();
        test(f);
        // Valid: NULL is the required argument.
        assert_eq!(call!(f.C_Finalize(null_mut())), CKR_OK);
    }

    use std::path::Path;

    fn open(f: &CK_FUNCTION_LIST) -> CK_SESSION_HANDLE {
        let mut h = 0;
        // Valid: `h` is a valid output.
        let rv = call!(f.C_OpenSession(0, CKF_SERIAL_SESSION, null_mut(), None, &mut h));
        assert_eq!(rv, CKR_OK);
        h
    }

    fn mechanism(ty: CK_MECHANISM_TYPE) -> CK_MECHANISM {
        CK_MECHANISM {
            mechanism: ty,
            pParameter: null_mut(),
            ulParameterLen: 0,
        }
    }

    #[test]
    fn calls_before_c_initialize_are_refused() {
        let _turn = TURN.lock().unwrap_or_else(PoisonError::into_inner);
        let f = functions();
        let mut info = CK_INFO::default();
        // Valid: `info` is a valid output.
        assert_eq!(call!(f.C_GetInfo(&mut info)), CKR_CRYPTOKI_NOT_INITIALIZED);
        // Valid: NULL is the required argument.
        assert_eq!(
            call!(f.C_Finalize(null_mut())),
            CKR_CRYPTOKI_NOT_INITIALIZED
        );
        // Valid: a handle only.
        assert_eq!(call!(f.C_CloseSession(1)), CKR_CRYPTOKI_NOT_INITIALIZED);
        // SAFETY: NULL output is refused before any write.
        let rv = unsafe { C_GetFunctionList(null_mut()) };
        assert_eq!(rv, CKR_ARGUMENTS_BAD);
    }

    #[test]
    fn c_initialize_checks_its_arguments() {
        let _turn = TURN.lock().unwrap_or_else(PoisonError::into_inner);
        let f = functions();
        let init = |args: &mut CK_C_INITIALIZE_ARGS| {
            // Valid: `args` is a valid CK_C_INITIALIZE_ARGS.
            call!(f.C_Initialize((args as *mut CK_C_INITIALIZE_ARGS).cast()))
        };
        let mut reserved = 0u8;
        let mut args = CK_C_INITIALIZE_ARGS {
            pReserved: (&raw mut reserved).cast(),
            ..Default::default()
        };
        assert_eq!(init(&mut args), CKR_ARGUMENTS_BAD);

        unsafe extern "C" fn create(_: *mut *mut c_void) -> CK_RV {
            CKR_OK
        }
        unsafe extern "C" fn other(_: *mut c_void) -> CK_RV {
            CKR_OK
        }
        let mut args = CK_C_INITIALIZE_ARGS {
            CreateMutex: Some(create),
            ..Default::default()
        };
        assert_eq!(
            init(&mut args),
            CKR_ARGUMENTS_BAD,
            "one mutex function of four"
        );
        args.DestroyMutex = Some(other);
        args.LockMutex = Some(other);
        args.UnlockMutex = Some(other);
        assert_eq!(
            init(&mut args),
            CKR_CANT_LOCK,
            "only the application's mutexes"
        );
        let mut args = CK_C_INITIALIZE_ARGS {
            flags: CKF_LIBRARY_CANT_CREATE_OS_THREADS | CKF_OS_LOCKING_OK,
            ..Default::default()
        };
        assert_eq!(init(&mut args), CKR_NEED_TO_CREATE_THREADS);
        assert!(
            module().is_err(),
            "a refused C_Initialize leaves the module uninitialised"
        );
    }

    /// A second `C_Initialize` is `CKR_CRYPTOKI_ALREADY_INITIALIZED` whatever the
    /// configuration says now (here the test's environment has no usable one), and
    /// leaves the module as it was.
    #[test]
    fn a_second_c_initialize_is_already_initialized() {
        with_module(|f| {
            // Valid: NULL arguments.
            assert_eq!(
                call!(f.C_Initialize(null_mut())),
                CKR_CRYPTOKI_ALREADY_INITIALIZED
            );
            let mut n: CK_ULONG = 0;
            // Valid: NULL list asks for the count, written to `n`.
            assert_eq!(call!(f.C_GetSlotList(CK_TRUE, null_mut(), &mut n)), CKR_OK);
            assert_eq!(n, 2, "the first initialisation's slots");
        });
    }

    /// The fixed-width strings are blank-padded with no NUL (§3.2), the versions and flags
    /// are what the module offers, and the session counts follow C_OpenSession,
    /// C_CloseSession and C_CloseAllSessions per slot.
    #[test]
    fn infos_are_padded_and_count_the_sessions() {
        fn text(field: &[u8]) -> &str {
            assert!(!field.contains(&0), "a NUL in {field:?}");
            std::str::from_utf8(field).unwrap().trim_end_matches(' ')
        }
        with_module(|f| {
            let mut info = CK_INFO::default();
            // Valid: `info` is a valid output.
            assert_eq!(call!(f.C_GetInfo(&mut info)), CKR_OK);
            assert_eq!(
                (info.cryptokiVersion.major, info.cryptokiVersion.minor),
                (2, 40)
            );
            assert_eq!(text(&info.manufacturerID), "Quorate");
            assert_eq!(text(&info.libraryDescription), "Quorate threshold P-256");
            assert_eq!(info.flags, 0);

            let mut slot = CK_SLOT_INFO::default();
            // Valid: `slot` is a valid output.
            assert_eq!(call!(f.C_GetSlotInfo(1, &mut slot)), CKR_OK);
            assert_eq!(
                text(&slot.slotDescription),
                "Quorate cluster b at 127.0.0.1:9"
            );
            assert_eq!(slot.flags, CKF_TOKEN_PRESENT);

            let token = |id: CK_SLOT_ID| {
                let mut t = CK_TOKEN_INFO::default();
                // Valid: `t` is a valid output.
                assert_eq!(call!(f.C_GetTokenInfo(id, &mut t)), CKR_OK);
                t
            };
            let t = token(0);
            assert_eq!(text(&t.label), "a");
            assert_eq!(text(&t.manufacturerID), "Quorate");
            assert_eq!(text(&t.model), "threshold P-256");
            assert_eq!(text(&t.serialNumber), "0");
            assert_eq!(t.flags, CKF_TOKEN_INITIALIZED, "no RNG, no login, no clock");
            assert_eq!((t.ulSessionCount, t.ulRwSessionCount), (0, 0));

            let a1 = open(f);
            let mut a2 = 0;
            // Valid: `a2` is a valid output.
            assert_eq!(
                call!(f.C_OpenSession(
                    0,
                    CKF_SERIAL_SESSION | CKF_RW_SESSION,
                    null_mut(),
                    None,
                    &mut a2
                )),
                CKR_OK
            );
            let mut b = 0;
            // Valid: `b` is a valid output.
            assert_eq!(
                call!(f.C_OpenSession(1, CKF_SERIAL_SESSION, null_mut(), None, &mut b)),
                CKR_OK
            );
            assert!(a1 != 0 && a2 != 0 && b != 0, "0 is never a session handle");
            let t = token(0);
            assert_eq!((t.ulSessionCount, t.ulRwSessionCount), (2, 1));
            assert_eq!(token(1).ulSessionCount, 1);

            // Valid: a slot id only.
            assert_eq!(call!(f.C_CloseAllSessions(0)), CKR_OK);
            assert_eq!(token(0).ulSessionCount, 0);
            // Valid: handles only.
            assert_eq!(call!(f.C_CloseSession(a2)), CKR_SESSION_HANDLE_INVALID);
            let mut s = CK_SESSION_INFO::default();
            // Valid: `s` is a valid output.
            assert_eq!(call!(f.C_GetSessionInfo(b, &mut s)), CKR_OK);
            assert_eq!(s.slotID, 1, "the other slot's session stays open");
            // Valid: a handle only.
            assert_eq!(call!(f.C_CloseSession(0)), CKR_SESSION_HANDLE_INVALID);
            // Valid: a slot id only.
            assert_eq!(call!(f.C_CloseAllSessions(2)), CKR_SLOT_ID_INVALID);
        });
    }

    #[test]
    fn null_pointers_are_arguments_bad() {
        with_module(|f| {
            // Valid: each call passes NULL where the module must refuse it before any
            // access.
            assert_eq!(call!(f.C_GetInfo(null_mut())), CKR_ARGUMENTS_BAD);
            // Valid: as above.
            assert_eq!(
                call!(f.C_GetSlotList(CK_TRUE, null_mut(), null_mut())),
                CKR_ARGUMENTS_BAD
            );
            // Valid: as above.
            assert_eq!(call!(f.C_GetTokenInfo(0, null_mut())), CKR_ARGUMENTS_BAD);
            // Valid: as above.
            assert_eq!(
                call!(f.C_OpenSession(0, CKF_SERIAL_SESSION, null_mut(), None, null_mut())),
                CKR_ARGUMENTS_BAD
            );
            let h = open(f);
            // Valid: as above.
            assert_eq!(call!(f.C_SignInit(h, null_mut(), 1)), CKR_ARGUMENTS_BAD);
            // Valid: as above: a template of 2 attributes at NULL.
            assert_eq!(
                call!(f.C_FindObjectsInit(h, null_mut(), 2)),
                CKR_ARGUMENTS_BAD
            );
            // Valid: as above: 5 data bytes at NULL.
            assert_eq!(
                call!(f.C_Sign(h, null_mut(), 5, null_mut(), null_mut())),
                CKR_ARGUMENTS_BAD
            );
            // Valid: as above.
            assert_eq!(call!(f.C_GetSessionInfo(h, null_mut())), CKR_ARGUMENTS_BAD);
        });
    }

    #[test]
    fn short_buffers_get_buffer_too_small_and_the_size() {
        with_module(|f| {
            let mut n: CK_ULONG = 0;
            // Valid: NULL list asks for the count, written to `n`.
            assert_eq!(call!(f.C_GetSlotList(CK_TRUE, null_mut(), &mut n)), CKR_OK);
            assert_eq!(n, 2);
            let mut slots = [CK_SLOT_ID::MAX; 2];
            n = 1;
            // Valid: `slots` has room for `n` = 1 id.
            assert_eq!(
                call!(f.C_GetSlotList(CK_TRUE, slots.as_mut_ptr(), &mut n)),
                CKR_BUFFER_TOO_SMALL
            );
            assert_eq!(n, 2);
            assert_eq!(
                slots,
                [CK_SLOT_ID::MAX; 2],
                "nothing written to a short buffer"
            );
            // Valid: `slots` has room for `n` = 2 ids.
            assert_eq!(
                call!(f.C_GetSlotList(CK_TRUE, slots.as_mut_ptr(), &mut n)),
                CKR_OK
            );
            assert_eq!(slots, [0, 1]);

            let mut mechs = [0 as CK_MECHANISM_TYPE; 2];
            n = 1;
            // Valid: `mechs` has room for `n` = 1 mechanism.
            assert_eq!(
                call!(f.C_GetMechanismList(0, mechs.as_mut_ptr(), &mut n)),
                CKR_BUFFER_TOO_SMALL
            );
            assert_eq!(n, 2);
            // Valid: `mechs` has room for `n` = 2 mechanisms.
            assert_eq!(
                call!(f.C_GetMechanismList(0, mechs.as_mut_ptr(), &mut n)),
                CKR_OK
            );
            assert_eq!(mechs, [CKM_ECDSA, CKM_ECDSA_SHA256]);
        });
    }

    #[test]
    fn wrong_handles_are_refused() {
        with_module(|f| {
            let h = open(f);
            let wrong = h + 1000;
            let mut mech = mechanism(CKM_ECDSA);
            // Valid: handles only.
            assert_eq!(call!(f.C_CloseSession(wrong)), CKR_SESSION_HANDLE_INVALID);
            // Valid: `mech` is valid.
            assert_eq!(
                call!(f.C_SignInit(wrong, &mut mech, 1)),
                CKR_SESSION_HANDLE_INVALID
            );
            // Valid: an empty template.
            assert_eq!(
                call!(f.C_FindObjectsInit(wrong, null_mut(), 0)),
                CKR_SESSION_HANDLE_INVALID
            );
            // Valid: `mech` is valid; the key handle is checked after the mechanism.
            assert_eq!(
                call!(f.C_SignInit(h, &mut mech, 12345)),
                CKR_KEY_HANDLE_INVALID
            );
            let mut info = CK_SLOT_INFO::default();
            // Valid: `info` is a valid output.
            assert_eq!(call!(f.C_GetSlotInfo(7, &mut info)), CKR_SLOT_ID_INVALID);
            // Valid: a handle only.
            assert_eq!(call!(f.C_CloseSession(h)), CKR_OK);
            // Valid: a handle only.
            assert_eq!(
                call!(f.C_CloseSession(h)),
                CKR_SESSION_HANDLE_INVALID,
                "closed"
            );
            let mut s = 0;
            // Valid: `s` is a valid output.
            assert_eq!(
                call!(f.C_OpenSession(0, 0, null_mut(), None, &mut s)),
                CKR_SESSION_PARALLEL_NOT_SUPPORTED
            );
        });
    }

    #[test]
    fn operations_must_be_initialised_first() {
        with_module(|f| {
            let h = open(f);
            let mut data = [0u8; 32];
            let mut sig = [0u8; 64];
            let mut len: CK_ULONG = 64;
            // Valid: `data`, `sig` and `len` are valid for their lengths.
            assert_eq!(
                call!(f.C_Sign(h, data.as_mut_ptr(), 32, sig.as_mut_ptr(), &mut len)),
                CKR_OPERATION_NOT_INITIALIZED
            );
            // Valid: a NULL signature asks for the length.
            assert_eq!(
                call!(f.C_Sign(h, data.as_mut_ptr(), 32, null_mut(), &mut len)),
                CKR_OPERATION_NOT_INITIALIZED
            );
            // Valid: `data` holds 32 bytes.
            assert_eq!(
                call!(f.C_SignUpdate(h, data.as_mut_ptr(), 32)),
                CKR_OPERATION_NOT_INITIALIZED
            );
            // Valid: `sig` and `len` are valid.
            assert_eq!(
                call!(f.C_SignFinal(h, sig.as_mut_ptr(), &mut len)),
                CKR_OPERATION_NOT_INITIALIZED
            );
            let mut found = [0 as CK_OBJECT_HANDLE; 4];
            let mut n: CK_ULONG = 0;
            // Valid: `found` has room for 4 handles.
            assert_eq!(
                call!(f.C_FindObjects(h, found.as_mut_ptr(), 4, &mut n)),
                CKR_OPERATION_NOT_INITIALIZED
            );
            // Valid: a handle only.
            assert_eq!(
                call!(f.C_FindObjectsFinal(h)),
                CKR_OPERATION_NOT_INITIALIZED
            );
        });
    }

    #[test]
    fn unsupported_mechanisms_and_functions_say_so() {
        with_module(|f| {
            let h = open(f);
            let mut rsa = mechanism(CKM_RSA_PKCS);
            // Valid: `rsa` is valid.
            assert_eq!(call!(f.C_SignInit(h, &mut rsa, 1)), CKR_MECHANISM_INVALID);
            let mut with_param = mechanism(CKM_ECDSA);
            let mut param = 0u8;
            with_param.pParameter = (&raw mut param).cast();
            with_param.ulParameterLen = 1;
            // Valid: `with_param` is valid.
            assert_eq!(
                call!(f.C_SignInit(h, &mut with_param, 1)),
                CKR_MECHANISM_PARAM_INVALID
            );
            let mut info = CK_MECHANISM_INFO::default();
            // Valid: `info` is a valid output.
            assert_eq!(
                call!(f.C_GetMechanismInfo(0, CKM_RSA_PKCS, &mut info)),
                CKR_MECHANISM_INVALID
            );
            // Valid: `info` is a valid output.
            assert_eq!(call!(f.C_GetMechanismInfo(0, CKM_ECDSA, &mut info)), CKR_OK);
            assert_eq!((info.ulMinKeySize, info.ulMaxKeySize), (256, 256));
            assert_ne!(info.flags & CKF_SIGN, 0);
            let mut ecdh = mechanism(CKM_ECDH1_DERIVE);
            let mut key = 0;
            // Valid: `ecdh` and `key` are valid; the template is empty.
            assert_eq!(
                call!(f.C_DeriveKey(h, &mut ecdh, 1, null_mut(), 0, &mut key)),
                CKR_MECHANISM_INVALID
            );
            let mut ecdsa = mechanism(CKM_ECDSA);
            // Valid: `ecdsa` is valid.
            assert_eq!(
                call!(f.C_VerifyInit(h, &mut ecdsa, 1)),
                CKR_FUNCTION_NOT_SUPPORTED
            );
            // Valid: an empty template.
            assert_eq!(
                call!(f.C_CreateObject(h, null_mut(), 0, &mut key)),
                CKR_FUNCTION_NOT_SUPPORTED
            );
            // Valid: a handle only.
            assert_eq!(call!(f.C_GetFunctionStatus(h)), CKR_FUNCTION_NOT_PARALLEL);
            let mut random = [0u8; 16];
            // Valid: `random` holds 16 bytes.
            assert_eq!(
                call!(f.C_GenerateRandom(h, random.as_mut_ptr(), 16)),
                CKR_RANDOM_NO_RNG
            );
        });
    }

    #[test]
    fn no_login_is_required_and_the_token_says_so() {
        with_module(|f| {
            let mut info = CK_TOKEN_INFO::default();
            // Valid: `info` is a valid output.
            assert_eq!(call!(f.C_GetTokenInfo(1, &mut info)), CKR_OK);
            assert_eq!(info.flags & CKF_LOGIN_REQUIRED, 0);
            assert_ne!(info.flags & CKF_TOKEN_INITIALIZED, 0);
            assert_eq!(&info.label[..2], b"b ");
            let h = open(f);
            let pin = null::<u8>().cast_mut();
            // Valid: no PIN (NULL, length 0).
            assert_eq!(
                call!(f.C_Login(h, CKU_USER, pin, 0)),
                CKR_USER_ALREADY_LOGGED_IN
            );
            let mut s = CK_SESSION_INFO::default();
            // Valid: `s` is a valid output.
            assert_eq!(call!(f.C_GetSessionInfo(h, &mut s)), CKR_OK);
            assert_eq!(s.state, CKS_RO_USER_FUNCTIONS);
        });
    }
}
