//! Fork detection: which process am I, and has it changed since this object was made?
//!
//! Every object that must not cross `fork()` records the [`Epoch`] it was created in. An epoch
//! is a number that is different in every process of a lineage: a child's epoch is larger than
//! every epoch present in the memory it inherited, so `object.epoch == current_epoch()` is true
//! exactly in the process that made the object.
//!
//! Two mechanisms notice a fork, because neither alone catches every fork cheaply:
//!
//! * A `pthread_atfork` child handler, registered once per process, stores 0 in the epoch cell.
//!   It does nothing else: in the child of a multi-threaded process only async-signal-safe code
//!   is defined, so the handler must not allocate, lock or log.
//! * The epoch cell lives in a page marked `MADV_WIPEONFORK` (Linux 4.14+). The kernel hands
//!   every fork child a zeroed copy of that page, whatever made the fork: libc `fork()`, glibc
//!   `_Fork`, a raw `clone`/`SYS_fork`. So the hot path is one load and one compare.
//!   `posix_spawn` and `vfork` share the parent's memory and exec straight away; they never
//!   wipe the page, and the parent sees nothing.
//!
//! Where `MADV_WIPEONFORK` is missing, the cell is an ordinary static that holds the owner's pid
//! beside the epoch, and the check also compares `getpid()` with that pid — a syscall, but
//! still correct for forks that bypass the atfork handlers. Epoch and pid share one word so that
//! a process claims its epoch and its ownership in one compare-and-swap: no racing thread can
//! see the new epoch beside the parent's pid, judge it stale and claim a second one.
//!
//! [`PerProcess`] builds on the epoch: it holds a value per process and is what the pool and
//! `ForkLocal` keep their per-process state in. It can also retire a value and free it once no
//! thread reads it any more; `grace` holds the reader counts that tell when.
//!
//! [`DriverSection`] is the one thing the atfork *prepare* handler does: a libc `fork()` waits
//! (boundedly) for connects and closes running on other threads, because database drivers'
//! C libraries hold process-global locks while they connect and close, and a fork in that
//! instant leaves the lock held forever in the child (measured here: libpq's GSSAPI probe,
//! `gss_acquire_cred`, hung every later connect of 2 children within 300 forks). The same wait
//! covers [`ForkWaitingLease`]s: checkouts of connections whose library keeps per-process state
//! a fork must not copy mid-use (SQLite's lock records).
//!
//! `exit` waits for driver sections as a fork does, at most as long: the `atexit` cleanup of
//! OpenSSL and the destructors of other C libraries free the state a connect on another thread
//! is using, and the process dies of a signal.
//!
//! One concept per file: `epoch` (the epoch and fork detection), `atfork` (the handlers and their
//! registration), `per_process` ([`PerProcess`]), `install_lock` (its fork-aware lock), `grace`
//! (the reader counts of retired values), `driver_section` ([`DriverSection`],
//! [`ForkWaitingLease`], [`ForkWaitsForDrop`]), `exit_wait` (the `atexit` handler that makes `exit`
//! wait for driver sections), `once_per_lineage` (the claim both registrations use),
//! `ending_threads` (the pool's connect threads that are ending, which `exit` waits for too),
//! `models` (loom models of retirement; see `crate::sync`). Each file that needs `unsafe` allows it
//! for itself (the crate root denies it); every block says why it is sound.

mod atfork;
mod driver_section;
mod ending_threads;
mod epoch;
mod exit_wait;
mod grace;
mod install_lock;
#[cfg(all(test, forksafe_loom))]
mod models;
mod once_per_lineage;
mod per_process;

pub(crate) use driver_section::{DriverSection, ForkWaitingLease, ForkWaitsForDrop};
pub(crate) use ending_threads::connect_thread_ends;
pub(crate) use epoch::{current_epoch, Epoch};
pub use epoch::{fork_detection, ForkDetection};
pub(crate) use per_process::{PerProcess, Read};
