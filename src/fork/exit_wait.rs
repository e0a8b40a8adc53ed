//! The `atexit` handler by which `exit()` waits for connects and closes in progress on other
//! threads before the C libraries' exit-time cleanup runs.
//!
//! `exit()` (and so `std::process::exit` and a return from `main`) runs the `atexit` handlers,
//! last registered first, then the shared libraries' destructors, while the process's other
//! threads keep running. OpenSSL's handler (`OPENSSL_cleanup`, registered when OpenSSL first
//! initialises) frees its global locks and tables, and MIT Kerberos' library destructor (libpq
//! asks GSSAPI for credentials on every TCP connect) destroys its mutexes: a TLS handshake or a
//! GSSAPI probe on another thread at that instant uses freed state, and the process dies of a
//! signal (SIGSEGV in `CRYPTO_THREAD_write_lock` under `PQconnectPoll`, SIGABRT on
//! `k5_mutex_lock`'s assertion). A pool starts connects on threads of its own (the building
//! process's thread pool, a forked child's connect threads), so any worker that ends with `exit`
//! while its pool connects can crash: uWSGI's `--max-requests` and gunicorn's `max_requests`
//! end workers that way.
//!
//! So the first [`DriverSection`](super::DriverSection) of a lineage registers [`wait_at_exit`]
//! with `atexit`, once, after making sure OpenSSL's own handler is registered: OpenSSL, when the
//! process has it loaded, is initialised first (a no-op if it already is), so that this handler,
//! registered later, runs earlier. The handler waits, at most
//! [`EXIT_WAITS_FOR_DRIVERS_AT_MOST`](super::driver_section::EXIT_WAITS_FOR_DRIVERS_AT_MOST),
//! until no other thread is inside a driver section, and from then on a section that would start
//! on another thread waits (as long at most, so that no `atexit` handler that joins threads can
//! deadlock on it) — by then the process has ended. It then waits, within the same second, for
//! the pool's own connect threads that are ending (`ending_threads`): their thread-specific
//! data destructors take the same libraries' locks. The library destructors run after every
//! `atexit` handler, so they are covered whatever the order.
//!
//! A child of `fork()` inherits the registration; its counts are its own (see
//! `driver_section`). `_exit` runs no handler and waits for nothing. Not covered: an OpenSSL the
//! dynamic linker cannot name (linked statically, its symbols not exported) that initialises only
//! after the pool's first section: its handler then runs before this one.
#![allow(unsafe_code)]

use std::ffi::{c_int, c_void};

use super::driver_section::EXIT_WAITS_FOR_DRIVERS_AT_MOST;
use super::epoch::Epoch;
use super::once_per_lineage::OncePerLineage;

/// Whether this lineage's `atexit` has the handler (inherited by every child forked after the
/// registration, with the registration itself).
static REGISTRATION: OncePerLineage = OncePerLineage::new();

/// Registers [`wait_at_exit`] unless this lineage has; `here` is the caller's epoch. The fast
/// path is one load. A fork that catches another thread in the middle of registering leaves
/// the child a claim of another epoch, which the child then takes over (at worst the handler is
/// registered twice, and the second run finds nothing to wait for).
#[inline]
pub(super) fn register(here: Epoch) {
    if !REGISTRATION.is_done() {
        register_slow(here);
    }
}

#[cold]
#[inline(never)]
fn register_slow(here: Epoch) {
    if !REGISTRATION.claim(here.get()) {
        return;
    }
    openssl_registers_its_cleanup_first();
    // SAFETY: `wait_at_exit` is an `extern "C" fn()` that stays valid for the life of the
    // process and never unwinds.
    let rc = unsafe { libc::atexit(wait_at_exit) };
    if rc != 0 {
        // Only without memory; exit then simply does not wait, as before.
        tracing::warn!(
            rc,
            "atexit failed; exit will not wait for connects in progress"
        );
    }
    REGISTRATION.done();
}

/// OpenSSL's `OPENSSL_INIT_ADD_ALL_CIPHERS | OPENSSL_INIT_ADD_ALL_DIGESTS` (the same values in
/// 1.1 and 3.x): part of what `OPENSSL_init_ssl`, and so every TLS client, asks for anyway.
/// Any option but `OPENSSL_INIT_BASE_ONLY` makes OpenSSL register its `atexit` cleanup; none
/// (0) would return before doing anything.
const OPENSSL_INIT_ADD_ALL_CIPHERS_AND_DIGESTS: u64 = 0x0000_0004 | 0x0000_0008;

/// If the process has OpenSSL loaded (libpq, libmysqlclient and the `openssl` crate link it
/// dynamically), initialises it now, which registers its `atexit` cleanup now if it is not yet
/// registered: before this module's handler, which therefore runs first. OpenSSL's
/// initialisation runs once per process however often it is asked for, so racing a driver's
/// own initialisation on another thread is safe, and afterwards the driver's is a no-op.
fn openssl_registers_its_cleanup_first() {
    type InitCrypto = unsafe extern "C" fn(u64, *const c_void) -> c_int;
    // SAFETY: `dlsym` with glibc's `RTLD_DEFAULT` (a null handle: search the global scope) and
    // a NUL-terminated name only looks the symbol up.
    let init = unsafe { libc::dlsym(std::ptr::null_mut(), c"OPENSSL_init_crypto".as_ptr()) };
    if init.is_null() {
        return;
    }
    // SAFETY: `OPENSSL_init_crypto` has this signature in every OpenSSL since 1.1.0, the first
    // that has the function (`int OPENSSL_init_crypto(uint64_t, const OPENSSL_INIT_SETTINGS *)`),
    // and a null settings pointer means the defaults.
    let init = unsafe { std::mem::transmute::<*mut c_void, InitCrypto>(init) };
    // SAFETY: see above; the call may be made from any thread at any time before OpenSSL's
    // cleanup. Its result does not matter here: if OpenSSL cannot initialise, its drivers
    // cannot either.
    let _ = unsafe { init(OPENSSL_INIT_ADD_ALL_CIPHERS_AND_DIGESTS, std::ptr::null()) };
}

/// The `atexit` handler: see the module docs. Runs on the thread that called `exit`, in an
/// ordinary (not async-signal) context, so it may read the clock and sleep; it never unwinds.
extern "C" fn wait_at_exit() {
    let deadline = std::time::Instant::now() + EXIT_WAITS_FOR_DRIVERS_AT_MOST;
    super::driver_section::wait_for_other_threads_at_exit(deadline);
    // Then for the connect threads whose sections ended and that are ending themselves.
    super::ending_threads::wait_until_gone(deadline);
}
