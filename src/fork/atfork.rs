//! The `pthread_atfork` handlers, registered once per lineage. Each only calls into the module
//! whose state it changes: the child handler into `epoch`, the prepare and parent handlers
//! into `driver_section`.
#![allow(unsafe_code)]

use super::{driver_section, epoch};

/// Runs in the child of every libc `fork()`. Async-signal-safe, as a handler that runs in the
/// child of a multi-threaded process must be (see `epoch::forget_epoch_in_child`).
extern "C" fn atfork_child() {
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

/// Registers the atfork handlers; called once per lineage by the thread that published the
/// cell (registrations are inherited by children, so they are never repeated).
pub(super) fn register() {
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
}
