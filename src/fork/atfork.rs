//! The `pthread_atfork` handlers, registered once per lineage. Each only calls into the module
//! whose state it changes: the child handler into `epoch`, the prepare and parent handlers
//! into `driver_section`.
#![allow(unsafe_code)]

use super::once_per_lineage::OncePerLineage;
use super::{driver_section, epoch};

/// Whether this lineage has the handlers. The claimant is the registering process's pid: the
/// registration is part of setting up the epoch, so there is no epoch yet to tell processes
/// apart. (A pid can be reused: a child whose pid is that of an ancestor that forked while
/// registering would take the claim for its own and not register. Its epoch checks still see
/// every fork; it would miss the atfork counter and the fork's wait for driver sections.)
static REGISTRATION: OncePerLineage = OncePerLineage::new();

/// Runs in the child of every libc `fork()`. Async-signal-safe, as a handler that runs in the
/// child of a multi-threaded process must be (see `epoch::forget_epoch_in_child`).
extern "C" fn atfork_child() {
    // That it runs proves the handlers are registered in this lineage, even if the fork
    // caught the registering thread before it could say so.
    REGISTRATION.done();
    epoch::forget_epoch_in_child();
}

/// Runs in the forking thread before every libc `fork()`, in an ordinary (not async-signal)
/// context.
extern "C" fn atfork_prepare() {
    driver_section::wait_for_other_threads_before_fork();
}

/// Runs in the parent after every libc `fork()`.
extern "C" fn atfork_parent() {
    driver_section::fork_done_in_parent();
}

/// Registers the atfork handlers unless this lineage has them: once per lineage (registrations
/// are inherited by children, so they are never repeated), and again in a child whose parent
/// forked in the middle of registering, found on the child's first slow-path epoch check. A
/// compare-and-swap picks the registering thread; no thread waits for another, so a fork at any
/// instant leaves nothing to wait for.
///
/// One window remains: a raw fork (which runs no handler) after the parent's `pthread_atfork`
/// returned and before it stored `DONE` leaves a child that registers a second time, so that
/// its lineage's handlers run twice per libc fork: the child handler's work is idempotent, the
/// prepare and parent handlers wait for driver sections twice.
pub(super) fn ensure_registered() {
    if !REGISTRATION.claim(u64::from(std::process::id())) {
        // Registered, or a thread of this process is registering now.
        return;
    }
    // SAFETY: the three handlers are `extern "C" fn()`s that stay valid for the life of the
    // process and never unwind; `atfork_child` is async-signal-safe, as a handler that runs in
    // the child of a multi-threaded process must be.
    let rc = unsafe {
        libc::pthread_atfork(
            Some(atfork_prepare),
            Some(atfork_parent),
            Some(atfork_child),
        )
    };
    // pthread_atfork only fails with ENOMEM; the wipe-on-fork page or the pid check still
    // detect every fork, so the failure costs the counter and the wait for driver sections.
    if rc != 0 {
        tracing::warn!(
            rc,
            "pthread_atfork failed; forks are still detected by the epoch check"
        );
    }
    REGISTRATION.done();
}

/// Whether this lineage has its handlers (a test's view of [`REGISTRATION`]).
#[cfg(all(test, target_os = "linux", not(forksafe_portable)))]
pub(super) fn registered() -> bool {
    REGISTRATION.is_done()
}

/// Makes this process look like the child of a parent that forked while registering: the
/// registration is pending in another process.
#[cfg(all(test, target_os = "linux", not(forksafe_portable)))]
pub(super) fn pretend_a_parent_was_registering() {
    REGISTRATION.pretend_claimed_by(u64::from(std::process::id()).wrapping_add(1));
}
