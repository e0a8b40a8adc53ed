//! Stretches of code a libc `fork()` waits for: driver sections (connects and closes) and
//! fork-waiting leases (checkouts of connections such as SQLite's). `exit` waits for driver
//! sections too (see `exit_wait`).
#![allow(unsafe_code)]

use std::cell::Cell;
use std::fmt;
use std::mem::ManuallyDrop;
use std::ops::{Deref, DerefMut};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::epoch::{current_epoch, Epoch};

/// The atfork prepare handler's work, in the forking thread before every libc `fork()`:
/// marks a fork pending, then waits until no other thread of this process is inside a
/// [`DriverSection`] or holds a [`ForkWaitingLease`], for at most
/// [`FORK_WAITS_FOR_DRIVERS_AT_MOST`]. An ordinary (not async-signal) context, so it may read
/// the clock and sleep.
pub(super) fn wait_for_other_threads_before_fork() {
    let here = current_epoch();
    FORKS_PENDING.add(here);
    // A fork from inside a section (a customizer that forks), or from a thread that holds a
    // lease, must not wait for itself: those cannot end while this thread forks.
    let own_sections = SECTIONS_ON_THIS_THREAD.try_with(Cell::get).unwrap_or(0);
    let own_leases = LEASES_TAKEN_ON_THIS_THREAD
        .try_with(|taken| taken.get(here))
        .unwrap_or(0);
    let others_busy =
        || DRIVER_SECTIONS.get(here) > own_sections || FORK_WAITING_LEASES.get(here) > own_leases;
    if !others_busy() {
        return;
    }
    let deadline = Instant::now() + FORK_WAITS_FOR_DRIVERS_AT_MOST;
    while others_busy() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_micros(50));
    }
}

/// The atfork parent handler's work: sections and leases may start again.
pub(super) fn fork_done_in_parent() {
    FORKS_PENDING.sub(current_epoch());
}

/// The `atexit` handler's work (see `exit_wait`), on the thread that called `exit`: marks an
/// exit under way in this process, so that sections that would start on other threads wait,
/// then waits until no other thread of this process is inside a [`DriverSection`], at most
/// until `deadline` (see [`EXIT_WAITS_FOR_DRIVERS_AT_MOST`]). Fork-waiting leases are not
/// waited for: a checked-out connection is the application's, and the driver is not inside its
/// connect or close.
pub(super) fn wait_for_other_threads_at_exit(deadline: Instant) {
    let here = current_epoch();
    let _ = EXITING_ON_THIS_THREAD.try_with(|exiting| exiting.set(true));
    EXITS_PENDING.add(here);
    // `exit` called from inside a section (a customizer that exits) must not wait for itself.
    let own_sections = SECTIONS_ON_THIS_THREAD.try_with(Cell::get).unwrap_or(0);
    let others_busy = || DRIVER_SECTIONS.get(here) > own_sections;
    while others_busy() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_micros(50));
    }
}

/// Whether an `exit` is under way in the process of `epoch` (see `ending_threads`).
pub(super) fn exit_pending(epoch: Epoch) -> bool {
    EXITS_PENDING.get(epoch) > 0
}

/// How long `exit` waits for connects and closes in progress on other threads, and how long a
/// section that would start on another thread meanwhile waits: as long as a fork waits, for
/// the same reasons (a TLS or GSSAPI connect to a distant server ends well within it; a server
/// that never answers must not keep a process from ending).
pub(crate) const EXIT_WAITS_FOR_DRIVERS_AT_MOST: Duration = FORK_WAITS_FOR_DRIVERS_AT_MOST;

/// How long a libc `fork()` waits for connects and closes in progress on other threads (and for
/// fork-waiting leases to be returned). Long
/// enough for a TLS (and GSSAPI) connect to a distant server; short enough that a master
/// whose pool keeps retrying a dead server still forks. A connect that outlasts it is
/// forked through, as without this wait: a child whose driver then hangs on a lock the fork
/// froze gets `connection_timeout`'s clear error, not a hang.
pub(crate) const FORK_WAITS_FOR_DRIVERS_AT_MOST: Duration = Duration::from_secs(1);

/// Threads of this process inside a [`DriverSection`].
static DRIVER_SECTIONS: ProcessCount = ProcessCount::new();

/// Connections checked out as [`ForkWaitingLease`]s in this process.
static FORK_WAITING_LEASES: ProcessCount = ProcessCount::new();

/// libc `fork()`s of this process between their prepare and parent handlers.
static FORKS_PENDING: ProcessCount = ProcessCount::new();

/// Calls of `exit` under way in this process (never lowered: the process is ending).
static EXITS_PENDING: ProcessCount = ProcessCount::new();

/// A count that belongs to one process: the word holds the epoch of the process that last
/// changed it beside the count, and the count reads as 0 in any other process. So no child
/// inherits its parent's sections or pending forks — not even the child of a raw fork syscall,
/// which runs no atfork handler that could reset them.
struct ProcessCount(AtomicU64);

impl ProcessCount {
    /// Low bits: the count; high bits: the epoch (epochs count processes, far below 2^44).
    const COUNT_BITS: u32 = 20;
    const COUNT_MASK: u64 = (1 << Self::COUNT_BITS) - 1;

    const fn new() -> Self {
        ProcessCount(AtomicU64::new(0))
    }

    fn count_in(word: u64, here: Epoch) -> u64 {
        if word >> Self::COUNT_BITS == here.get() {
            word & Self::COUNT_MASK
        } else {
            0
        }
    }

    fn get(&self, here: Epoch) -> u64 {
        Self::count_in(self.0.load(Ordering::SeqCst), here)
    }

    fn add(&self, here: Epoch) {
        self.update(here, |count| (count + 1).min(Self::COUNT_MASK));
    }

    fn sub(&self, here: Epoch) {
        self.update(here, |count| count.saturating_sub(1));
    }

    fn update(&self, here: Epoch, change: impl Fn(u64) -> u64) {
        // Never fails: the closure always returns `Some`.
        let _ = self
            .0
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |word| {
                Some((here.get() << Self::COUNT_BITS) | change(Self::count_in(word, here)))
            });
    }
}

thread_local! {
    /// Sections the current thread is inside (0 or 1 unless a customizer nests them).
    static SECTIONS_ON_THIS_THREAD: Cell<u64> = const { Cell::new(0) };

    /// The leases this thread took that are still out. Each lease holds a handle to it, since
    /// a guard may be dropped on another thread; a `ProcessCount`, so that a forked child
    /// does not take its parent's leases for its own.
    static LEASES_TAKEN_ON_THIS_THREAD: Arc<ProcessCount> = Arc::new(ProcessCount::new());

    /// Whether this thread called `exit` (its own sections, in later `atexit` handlers or
    /// library destructors, do not wait for the exit).
    static EXITING_ON_THIS_THREAD: Cell<bool> = const { Cell::new(false) };
}

/// What a thread about to count itself in waits for.
#[derive(Clone, Copy)]
enum WaitsFor {
    /// A libc `fork()` pending in this process.
    Forks,
    /// A pending fork, or an `exit` under way on another thread.
    ForksAndExits,
}

impl WaitsFor {
    fn pending(self, epoch: Epoch) -> bool {
        FORKS_PENDING.get(epoch) > 0
            || (matches!(self, WaitsFor::ForksAndExits)
                && EXITS_PENDING.get(epoch) > 0
                && !EXITING_ON_THIS_THREAD.try_with(Cell::get).unwrap_or(true))
    }
}

/// Counts this thread into `count` once nothing `waits_for` names is pending in this process,
/// waiting for it at most [`FORK_WAITS_FOR_DRIVERS_AT_MOST`]. A thread that already holds a
/// section or a lease does not wait: the pending fork (or exit) is waiting for that one, and
/// would only time out.
fn count_in_unless_pending(count: &ProcessCount, epoch: Epoch, waits_for: WaitsFor) {
    let holds_some = SECTIONS_ON_THIS_THREAD.try_with(Cell::get).unwrap_or(0) > 0
        || LEASES_TAKEN_ON_THIS_THREAD
            .try_with(|taken| taken.get(epoch))
            .unwrap_or(0)
            > 0;
    let mut deadline = None;
    loop {
        if holds_some || !waits_for.pending(epoch) {
            count.add(epoch);
            // Seen by a prepare (or exit) handler that raised its count before this
            // increment, or this load sees its raise: one side always waits for the other.
            if holds_some || !waits_for.pending(epoch) {
                return;
            }
            count.sub(epoch);
        }
        let deadline =
            *deadline.get_or_insert_with(|| Instant::now() + FORK_WAITS_FOR_DRIVERS_AT_MOST);
        if Instant::now() >= deadline {
            count.add(epoch);
            return;
        }
        std::thread::sleep(Duration::from_micros(50));
    }
}

/// A stretch of driver code (a connect, a close) that a libc `fork()` waits for.
///
/// Drivers' C libraries take process-global locks inside connect and close: libpq's SSL
/// setup mutex, OpenSSL's global tables, MIT Kerberos' mechanism list (libpq's default
/// `gssencmode=prefer` asks GSSAPI for credentials on every TCP connect). A fork while another
/// thread holds one copies the lock, held, into a child where its owner does not exist, and
/// every connect the child then makes blocks on it forever. So the prepare handler waits until
/// no section is running (at most [`FORK_WAITS_FOR_DRIVERS_AT_MOST`]), and a section that
/// would start while a fork is pending waits for the fork (as long at most). `exit` waits for
/// sections in the same way, and a section that would start on another thread during an `exit`
/// waits too (see `exit_wait`): the C libraries' exit-time cleanup frees the state a connect
/// uses. Forks that bypass the atfork handlers (a raw fork syscall) do not wait; nothing can
/// make them. The counts are [`ProcessCount`]s, so a child of any fork starts with none.
pub(crate) struct DriverSection {
    /// The process that entered, whose count this section is in.
    epoch: Epoch,
}

impl DriverSection {
    pub(crate) fn enter() -> Self {
        // Also registers the atfork handlers, if no pool has yet.
        let epoch = current_epoch();
        count_in_unless_pending(&DRIVER_SECTIONS, epoch, WaitsFor::ForksAndExits);
        // Inside the section: registering may initialise OpenSSL, whose locks a fork must not
        // copy held.
        super::exit_wait::register(epoch);
        // `try_with`: a close may run in a thread-local's destructor, after this one is gone.
        let _ = SECTIONS_ON_THIS_THREAD.try_with(|sections| sections.set(sections.get() + 1));
        DriverSection { epoch }
    }
}

impl Drop for DriverSection {
    fn drop(&mut self) {
        let _ = SECTIONS_ON_THIS_THREAD
            .try_with(|sections| sections.set(sections.get().saturating_sub(1)));
        // In a child that inherited this section from the forking thread, the count is the
        // child's own, which never included it.
        let here = current_epoch();
        if here == self.epoch {
            DRIVER_SECTIONS.sub(here);
        }
    }
}

/// A checkout of a connection whose library keeps per-process state that a fork must not copy
/// while the connection is in use: a libc `fork()` waits until no such lease is out on another
/// thread, and a lease taken while a fork is pending waits for the fork — each at most
/// [`FORK_WAITS_FOR_DRIVERS_AT_MOST`], like a [`DriverSection`].
///
/// SQLite is the case in point. Its Unix VFS keeps one lock record per database file per
/// process, shared by every connection of the process. A fork while another thread is inside
/// a write copies the record mid-write, and the child's *new* connections join the copy: they
/// meet locks no process holds ("database is locked", or a busy handler that waits for ever).
/// Writes can only happen while a connection is checked out (connects and closes are driver
/// sections), so a fork that waits for checkouts never copies a write in progress.
///
/// Waiting for checkouts rather than for writes: SQLite reports no "a write is running" that
/// another thread could read without taking the connection's own mutex, and a transaction
/// holds its locks between statements too. A checkout is the one boundary the pool sees.
pub(crate) struct ForkWaitingLease {
    /// The process that took the lease, whose count it is in.
    epoch: Epoch,
    /// The count of the thread that took it (`None` if it was taken while that thread's
    /// locals were being destroyed).
    taker: Option<Arc<ProcessCount>>,
}

impl ForkWaitingLease {
    #[cold]
    #[inline(never)]
    pub(crate) fn take() -> Self {
        let epoch = current_epoch();
        count_in_unless_pending(&FORK_WAITING_LEASES, epoch, WaitsFor::Forks);
        let taker = LEASES_TAKEN_ON_THIS_THREAD.try_with(Arc::clone).ok();
        if let Some(taker) = &taker {
            taker.add(epoch);
        }
        ForkWaitingLease { epoch, taker }
    }
}

impl Drop for ForkWaitingLease {
    fn drop(&mut self) {
        // A lease inherited by a child is never dropped there (its guard is forgotten); the
        // check keeps a child's counts its own regardless.
        let here = current_epoch();
        if here == self.epoch {
            if let Some(taker) = &self.taker {
                taker.sub(here);
            }
            FORK_WAITING_LEASES.sub(here);
        }
    }
}

impl fmt::Debug for ForkWaitingLease {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ForkWaitingLease")
            .field("epoch", &self.epoch)
            .finish_non_exhaustive()
    }
}

/// A driver's connection whose drop (the driver's close) runs inside a [`DriverSection`].
/// Derefs to the connection at no cost.
pub(crate) struct ForkWaitsForDrop<C>(ManuallyDrop<C>);

impl<C> ForkWaitsForDrop<C> {
    pub(crate) fn new(conn: C) -> Self {
        ForkWaitsForDrop(ManuallyDrop::new(conn))
    }

    /// Hands the connection back, to be closed by its new owner (who should hold a
    /// [`DriverSection`] while it does).
    pub(crate) fn into_inner(self) -> C {
        let mut this = ManuallyDrop::new(self);
        // SAFETY: `this` is never used again and its `Drop` never runs (it is in a
        // `ManuallyDrop`), so the connection is taken out exactly once.
        unsafe { ManuallyDrop::take(&mut this.0) }
    }
}

impl<C> Deref for ForkWaitsForDrop<C> {
    type Target = C;

    #[inline]
    fn deref(&self) -> &C {
        &self.0
    }
}

impl<C> DerefMut for ForkWaitsForDrop<C> {
    #[inline]
    fn deref_mut(&mut self) -> &mut C {
        &mut self.0
    }
}

impl<C> Drop for ForkWaitsForDrop<C> {
    fn drop(&mut self) {
        let _section = DriverSection::enter();
        // SAFETY: `Drop` runs once and `into_inner` (the only other taker) skips it, so the
        // connection is dropped exactly once and never used after.
        unsafe { ManuallyDrop::drop(&mut self.0) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // `SYS_fork` is Linux's.
    #[cfg(any(target_os = "linux", target_os = "android"))]
    #[test]
    fn a_raw_fork_child_inherits_no_section_and_no_pending_fork() {
        let here = current_epoch();
        // As a raw fork could find them: a thread inside a section, a libc fork in progress.
        let section = DriverSection::enter();
        FORKS_PENDING.add(here);
        // SAFETY: a raw fork; the child allocates nothing, takes no lock, and leaves with
        // `_exit`, so what the fork copied mid-operation in other threads is never touched.
        let pid = unsafe { libc::syscall(libc::SYS_fork) };
        if pid == 0 {
            let started = Instant::now();
            let child_section = DriverSection::enter();
            let child = current_epoch();
            let fresh = DRIVER_SECTIONS.get(child) == 1 && FORKS_PENDING.get(child) == 0;
            let at_once = started.elapsed() < Duration::from_millis(500);
            drop(child_section);
            let code = if fresh && at_once && DRIVER_SECTIONS.get(child) == 0 {
                0
            } else {
                1
            };
            // SAFETY: `_exit` has no preconditions and ends the child at once.
            unsafe { libc::_exit(code) };
        }
        FORKS_PENDING.sub(here);
        drop(section);
        let status = crate::sys::reap_raw_child(pid);
        assert!(
            libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
            "the child saw its parent's section or pending fork (status {status})"
        );
    }
}
