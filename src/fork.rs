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
//! Where `MADV_WIPEONFORK` is missing, the cell is an ordinary page and the check also compares
//! `getpid()` with the pid that owns the epoch — a syscall, but still correct for forks that
//! bypass the atfork handlers.
//!
//! [`PerProcess`] builds on the epoch: it holds a value per process and is what the pool and
//! `ForkLocal` keep their per-process state in.
//!
//! [`DriverSection`] is the one thing the atfork *prepare* handler does: a libc `fork()` waits
//! (boundedly) for connects and closes running on other threads, because database drivers'
//! C libraries hold process-global locks while they connect and close, and a fork in that
//! instant leaves the lock held forever in the child (measured here: libpq's GSSAPI probe,
//! `gss_acquire_cred`, hung every later connect of 2 children within 300 forks).
//!
//! This module holds all of the crate's `unsafe` code: the `mmap`/`madvise` of the epoch page,
//! the `pthread_atfork` registration, the `extern "C"` handlers, the pointer handling of
//! `PerProcess`, and the `ManuallyDrop` of [`ForkWaitsForDrop`]; and, so that no other file
//! needs `unsafe`, the raw calls the rest of the crate makes: `pthread_create` for the child
//! pool's connect threads, `getsockopt` for the backends' socket lookup and the connect
//! window, and making r2d2's `Error` and `State` without r2d2.

use std::cell::Cell;
use std::fmt;
use std::mem::ManuallyDrop;
use std::ops::{Deref, DerefMut};
use std::ptr;
use std::sync::atomic::{AtomicPtr, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Identifies one process of a fork lineage; see the module docs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct Epoch(u64);

impl Epoch {
    /// The raw value, used to tag fork-aware lock words (never 0).
    pub(crate) fn get(self) -> u64 {
        self.0
    }
}

/// Source of fresh epoch values. It is inherited by a child, so a value taken after a fork is
/// larger than any epoch the child inherited.
static EPOCH_SOURCE: AtomicU64 = AtomicU64::new(0);

/// Points at this process's epoch cell once [`init`] has run; null before.
static EPOCH_CELL: AtomicPtr<AtomicU64> = AtomicPtr::new(ptr::null_mut());

/// The pid that owns the current epoch; only consulted when the cell does not wipe on fork.
static EPOCH_OWNER_PID: AtomicU32 = AtomicU32::new(0);

/// Forks noticed by the atfork child handler in this lineage (inherited, so it counts every
/// libc `fork()` between the first process and this one).
static ATFORK_CHILD_CALLS: AtomicU64 = AtomicU64::new(0);

/// Fallback cell, used when the wipe-on-fork page cannot be mapped.
static FALLBACK_CELL: AtomicU64 = AtomicU64::new(0);

/// Always 0: where [`FAST_CELL`] points until the wipe-on-fork page is set up, and forever
/// where it cannot be (so every check then takes the slow path, which compares pids).
static UNSET: AtomicU64 = AtomicU64::new(0);

/// What the hot path reads: the wipe-on-fork page once it is published, else [`UNSET`]. Never
/// null, so the hot path is two loads and a test.
static FAST_CELL: AtomicPtr<AtomicU64> = AtomicPtr::new(ptr::addr_of!(UNSET).cast_mut());

/// The epoch of the calling process.
///
/// Hot path: two loads and a test. The first call in a new process takes the slow path once and
/// hands out a fresh epoch; without a wipe-on-fork page every call takes it.
#[inline]
pub(crate) fn current_epoch() -> Epoch {
    // SAFETY: `FAST_CELL` always points at a live `AtomicU64`: `UNSET`, or the epoch page, which
    // is mapped once and never unmapped.
    let epoch = unsafe { &*FAST_CELL.load(Ordering::Acquire) }.load(Ordering::Acquire);
    if epoch != 0 {
        return Epoch(epoch);
    }
    claim_epoch()
}

/// How this process detects forks; see [`fork_detection`].
#[non_exhaustive]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ForkDetection {
    /// The epoch lives in a `MADV_WIPEONFORK` page: every fork, even a raw `SYS_fork` that skips
    /// the atfork handlers, is noticed with one load. When false, each check also calls
    /// `getpid()`.
    pub wipe_on_fork: bool,
    /// How many times the `pthread_atfork` child handler has run in this process's lineage
    /// (libc forks only: a raw fork syscall does not run it, and is still detected).
    pub atfork_child_calls: u64,
}

/// Reports how forks are detected in this process (setting detection up if no pool has yet).
///
/// ```
/// let detection = forksafe_pool::fork_detection();
/// # #[cfg(target_os = "linux")]
/// assert!(detection.wipe_on_fork, "Linux 4.14+ wipes the epoch page in every fork child");
/// ```
pub fn fork_detection() -> ForkDetection {
    let _ = current_epoch();
    ForkDetection {
        wipe_on_fork: cell_wipes_on_fork(cell()),
        atfork_child_calls: ATFORK_CHILD_CALLS.load(Ordering::Relaxed),
    }
}

/// Every cell but the fallback is a wipe-on-fork page. (Read off the cell itself, not a flag
/// stored beside it, so no thread can see the cell without knowing what it is.)
fn cell_wipes_on_fork(cell: &AtomicU64) -> bool {
    !ptr::eq(cell, &FALLBACK_CELL)
}

#[cold]
fn owner_pid_matches() -> bool {
    EPOCH_OWNER_PID.load(Ordering::Relaxed) == std::process::id()
}

/// Slow path: set up the cell if nobody has, then give this process an epoch if it has none.
#[cold]
#[inline(never)]
fn claim_epoch() -> Epoch {
    let cell = cell();
    let wipes = cell_wipes_on_fork(cell);
    loop {
        let seen = cell.load(Ordering::Acquire);
        let stale = seen != 0 && !wipes && !owner_pid_matches();
        if seen != 0 && !stale {
            return Epoch(seen);
        }
        let fresh = EPOCH_SOURCE.fetch_add(1, Ordering::AcqRel) + 1;
        // Racing threads of the same new process: one wins, the others adopt its epoch, so
        // nothing created in this process is ever mistaken for an inherited object.
        if cell
            .compare_exchange(seen, fresh, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            EPOCH_OWNER_PID.store(std::process::id(), Ordering::Relaxed);
            return Epoch(fresh);
        }
    }
}

/// The epoch cell, mapping it and registering the atfork handler on first use.
///
/// Lock-free on purpose: a `Once` or `OnceLock` caught mid-initialisation by a fork would stay
/// "running" in the child forever.
fn cell() -> &'static AtomicU64 {
    let existing = EPOCH_CELL.load(Ordering::Acquire);
    if !existing.is_null() {
        // SAFETY: see `current_epoch`: a published cell is never unmapped.
        return unsafe { &*existing };
    }
    let (candidate, wipes) = map_wipe_on_fork_page().map_or(
        (&FALLBACK_CELL as *const AtomicU64 as *mut AtomicU64, false),
        |page| (page, true),
    );
    match EPOCH_CELL.compare_exchange(
        ptr::null_mut(),
        candidate,
        Ordering::AcqRel,
        Ordering::Acquire,
    ) {
        Ok(_) => {
            if wipes {
                FAST_CELL.store(candidate, Ordering::Release);
            }
            register_atfork_handler();
            // SAFETY: `candidate` is `FALLBACK_CELL` or a freshly mapped page that is never unmapped.
            unsafe { &*candidate }
        }
        Err(winner) => {
            if wipes {
                unmap_page(candidate);
            }
            // SAFETY: the winner published a cell that is never unmapped.
            unsafe { &*winner }
        }
    }
}

const PAGE: usize = 4096;

/// Maps one private anonymous page and asks the kernel to zero it in every fork child.
#[cfg(any(target_os = "linux", target_os = "android"))]
fn map_wipe_on_fork_page() -> Option<*mut AtomicU64> {
    // SAFETY: an anonymous private mapping with a null hint has no preconditions; the result is
    // checked against MAP_FAILED before use.
    let page = unsafe {
        libc::mmap(
            ptr::null_mut(),
            PAGE,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if page == libc::MAP_FAILED {
        return None;
    }
    // SAFETY: `page` is the start of a PAGE-sized mapping we own and nobody else references.
    if unsafe { libc::madvise(page, PAGE, libc::MADV_WIPEONFORK) } != 0 {
        unmap_page(page.cast());
        return None;
    }
    // A page is zeroed, page-aligned and large enough for an `AtomicU64`.
    Some(page.cast())
}

#[cfg(not(any(target_os = "linux", target_os = "android")))]
fn map_wipe_on_fork_page() -> Option<*mut AtomicU64> {
    None
}

fn unmap_page(page: *mut AtomicU64) {
    // SAFETY: only called with a page from `map_wipe_on_fork_page` that was never published, so
    // no reference to it exists.
    unsafe { libc::munmap(page.cast(), PAGE) };
}

/// Runs in the child of every libc `fork()`. Async-signal-safe: atomic operations on statics,
/// no allocation, no lock, no logging.
extern "C" fn atfork_child() {
    ATFORK_CHILD_CALLS.fetch_add(1, Ordering::Relaxed);
    let cell = EPOCH_CELL.load(Ordering::Relaxed);
    if !cell.is_null() {
        // SAFETY: a published cell is never unmapped (see `current_epoch`).
        unsafe { &*cell }.store(0, Ordering::Relaxed);
    }
}

/// Runs in the forking thread before every libc `fork()`: waits until no other thread of this
/// process is inside a [`DriverSection`], for at most [`FORK_WAITS_FOR_DRIVERS_AT_MOST`]. An
/// ordinary (not async-signal) context, so it may read the clock and sleep.
extern "C" fn atfork_prepare() {
    let here = current_epoch();
    FORKS_PENDING.add(here);
    // A fork from inside a section (a customizer that forks) must not wait for itself.
    let own = SECTIONS_ON_THIS_THREAD.try_with(Cell::get).unwrap_or(0);
    if DRIVER_SECTIONS.get(here) <= own {
        return;
    }
    let deadline = Instant::now() + FORK_WAITS_FOR_DRIVERS_AT_MOST;
    while DRIVER_SECTIONS.get(here) > own && Instant::now() < deadline {
        std::thread::sleep(Duration::from_micros(50));
    }
}

/// Runs in the parent after every libc `fork()`: sections may start again.
extern "C" fn atfork_parent() {
    FORKS_PENDING.sub(current_epoch());
}

/// Registers the atfork handlers; called once per lineage by the thread that published the
/// cell (registrations are inherited by children, so they are never repeated).
fn register_atfork_handler() {
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

/// How long a libc `fork()` waits for connects and closes in progress on other threads. Long
/// enough for a TLS (and GSSAPI) connect to a distant server; short enough that a master
/// whose pool keeps retrying a dead server still forks. A connect that outlasts it is
/// forked through, as without this wait: a child whose driver then hangs on a lock the fork
/// froze gets `connection_timeout`'s clear error, not a hang.
pub(crate) const FORK_WAITS_FOR_DRIVERS_AT_MOST: Duration = Duration::from_secs(1);

/// Threads of this process inside a [`DriverSection`].
static DRIVER_SECTIONS: ProcessCount = ProcessCount::new();

/// libc `fork()`s of this process between their prepare and parent handlers.
static FORKS_PENDING: ProcessCount = ProcessCount::new();

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
}

/// A stretch of driver code (a connect, a close) that a libc `fork()` waits for.
///
/// Drivers' C libraries take process-global locks inside connect and close: libpq's SSL
/// setup mutex, OpenSSL's global tables, MIT Kerberos' mechanism list (libpq's default
/// `gssencmode=prefer` asks GSSAPI for credentials on every TCP connect). A fork while another
/// thread holds one copies the lock, held, into a child where its owner does not exist, and
/// every connect the child then makes blocks on it forever. So the prepare handler waits until
/// no section is running (at most [`FORK_WAITS_FOR_DRIVERS_AT_MOST`]), and a section that
/// would start while a fork is pending waits for the fork (as long at most). Forks that bypass
/// the atfork handlers (a raw fork syscall) do not wait; nothing can make them. The counts are
/// [`ProcessCount`]s, so a child of any fork starts with none.
pub(crate) struct DriverSection {
    /// The process that entered, whose count this section is in.
    epoch: Epoch,
}

impl DriverSection {
    pub(crate) fn enter() -> Self {
        // Also registers the atfork handlers, if no pool has yet.
        let epoch = current_epoch();
        let mut deadline = None;
        loop {
            if FORKS_PENDING.get(epoch) == 0 {
                DRIVER_SECTIONS.add(epoch);
                // Seen by a prepare handler that raised FORKS_PENDING before this increment,
                // or this load sees its raise: one side always waits for the other.
                if FORKS_PENDING.get(epoch) == 0 {
                    break;
                }
                DRIVER_SECTIONS.sub(epoch);
            }
            let deadline =
                *deadline.get_or_insert_with(|| Instant::now() + FORK_WAITS_FOR_DRIVERS_AT_MOST);
            if Instant::now() >= deadline {
                DRIVER_SECTIONS.add(epoch);
                break;
            }
            std::thread::sleep(Duration::from_micros(50));
        }
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

/// A value per process: the value of the process that made it, replaced on first use in a
/// forked child by a value that child makes.
///
/// The inherited value is never dropped and never handed out in the child: it belongs to the
/// parent's resources (sockets, threads, locks that may be frozen). It is leaked instead — it
/// is the child's copy-on-write image of the parent's memory, so leaking costs nothing.
///
/// Lock-free for readers: a load, an epoch compare. Installing takes a fork-aware lock whose
/// word holds the installer's epoch, so a lock word left by a parent thread that the fork
/// caught mid-install reads as free in the child.
pub(crate) struct PerProcess<T> {
    current: AtomicPtr<Owned<T>>,
    installing: AtomicU64,
    /// Values retired with [`PerProcess::retire`], newest first, linked through
    /// `Owned::retired_next`; freed by `Drop` (those of other processes are leaked).
    retired: AtomicPtr<Owned<T>>,
}

struct Owned<T> {
    epoch: Epoch,
    value: T,
    /// The next older retired value; only written under the install lock, before this value
    /// is linked into `PerProcess::retired`.
    retired_next: AtomicPtr<Owned<T>>,
}

// SAFETY: a `PerProcess<T>` hands out `&T` to any thread (so `T: Sync`) and may drop its `T`
// on whichever thread drops it (so `T: Send`); that is the same contract as `OnceLock<T>`.
unsafe impl<T: Send + Sync> Sync for PerProcess<T> {}
// SAFETY: as above: moving the container moves ownership of the `T` it may drop.
unsafe impl<T: Send> Send for PerProcess<T> {}

impl<T> PerProcess<T> {
    /// Holds nothing yet: the first `get_or_try_init` in each process makes that process's
    /// value. `const`, so it can live in a `static`.
    pub(crate) const fn empty() -> Self {
        PerProcess {
            current: AtomicPtr::new(ptr::null_mut()),
            installing: AtomicU64::new(0),
            retired: AtomicPtr::new(ptr::null_mut()),
        }
    }

    /// Holds `value`, owned by the calling process.
    pub(crate) fn new(value: T) -> Self {
        PerProcess {
            current: AtomicPtr::new(Owned::boxed(value)),
            installing: AtomicU64::new(0),
            retired: AtomicPtr::new(ptr::null_mut()),
        }
    }

    /// The calling process's value, if it has one.
    #[inline]
    pub(crate) fn get(&self) -> Option<&T> {
        self.get_with_epoch().map(|(value, _)| value)
    }

    /// Like [`get`](Self::get), with the calling process's epoch, saving callers a second check.
    #[inline]
    pub(crate) fn get_with_epoch(&self) -> Option<(&T, Epoch)> {
        let owned = self.load()?;
        (owned.epoch == current_epoch()).then_some((&owned.value, owned.epoch))
    }

    /// The value as the calling process found it, even if a parent made it: only for reading
    /// what must be let go of (a table of atomics); never for using the parent's resources.
    pub(crate) fn get_even_inherited(&self) -> Option<&T> {
        self.load().map(|owned| &owned.value)
    }

    /// The calling process's value, made with `init` if it has none. `init` is given the value
    /// inherited from the parent, if any, to let go of what it holds.
    pub(crate) fn get_or_try_init<E>(
        &self,
        init: impl FnOnce(Option<&T>) -> Result<T, E>,
    ) -> Result<&T, E> {
        if let Some(value) = self.get() {
            return Ok(value);
        }
        self.install(init)
    }

    #[cold]
    fn install<E>(&self, init: impl FnOnce(Option<&T>) -> Result<T, E>) -> Result<&T, E> {
        let here = current_epoch();
        let _lock = InstallLock::acquire(&self.installing, here);
        // Another thread of this process may have installed while we waited.
        if let Some(value) = self.get() {
            return Ok(value);
        }
        let inherited = self.load().map(|owned| &owned.value);
        let fresh = Owned::boxed(init(inherited)?);
        // The previous value (inherited, or none) is leaked on purpose: see the type docs.
        self.current.store(fresh, Ordering::Release);
        // SAFETY: `fresh` came from `Box::into_raw` just now and is only freed by `Drop`,
        // which needs `&mut self`, so it outlives the returned borrow of `self`.
        Ok(unsafe { &(*fresh).value })
    }

    /// Takes the calling process's value out of service: `get` returns `None` until the next
    /// `get_or_try_init` makes a new one (which is given no inherited value). The retired value
    /// stays allocated, and is returned, because other threads may still hold borrows of it;
    /// it is dropped with the `PerProcess`. `None` if the calling process has no value.
    pub(crate) fn retire(&self) -> Option<&T> {
        let here = current_epoch();
        let _lock = InstallLock::acquire(&self.installing, here);
        let owned = self.current.load(Ordering::Acquire);
        // SAFETY: as in `load`: null, or a published `Owned<T>` that only `Drop` frees.
        let value = unsafe { owned.as_ref() }?;
        if value.epoch != here {
            return None;
        }
        // Linked before it is unpublished, under the install lock (the only writer of the
        // list), so `Drop` always finds it.
        value
            .retired_next
            .store(self.retired.load(Ordering::Acquire), Ordering::Release);
        self.retired.store(owned, Ordering::Release);
        self.current.store(ptr::null_mut(), Ordering::Release);
        Some(&value.value)
    }

    fn load(&self) -> Option<&Owned<T>> {
        let owned = self.current.load(Ordering::Acquire);
        // SAFETY: `current` is null or points at an `Owned<T>` from `Box::into_raw`, published
        // with `Release`. A published value is freed only by `Drop` (which has `&mut self`);
        // a replaced one is leaked. So the pointee outlives this borrow of `self`.
        unsafe { owned.as_ref() }
    }
}

impl<T> Owned<T> {
    fn boxed(value: T) -> *mut Owned<T> {
        Box::into_raw(Box::new(Owned {
            epoch: current_epoch(),
            value,
            retired_next: AtomicPtr::new(ptr::null_mut()),
        }))
    }
}

impl<T> Drop for PerProcess<T> {
    /// Drops the values only in the process that made them; inherited ones are leaked.
    fn drop(&mut self) {
        let here = current_epoch();
        let mut next = *self.retired.get_mut();
        while !next.is_null() {
            // SAFETY: every retired pointer came from `Box::into_raw` and was linked exactly
            // once; `&mut self` proves no borrow handed out by `get` or `retire` is alive.
            let owned = unsafe { Box::from_raw(next) };
            next = owned.retired_next.load(Ordering::Acquire);
            if owned.epoch != here {
                std::mem::forget(owned);
            }
        }
        let owned = *self.current.get_mut();
        if owned.is_null() {
            return;
        }
        // SAFETY: non-null `current` came from `Box::into_raw`; `&mut self` proves no borrow
        // handed out by `get` is alive, and nothing else frees it.
        let owned = unsafe { Box::from_raw(owned) };
        if owned.epoch != here {
            std::mem::forget(owned);
        }
    }
}

impl<T: fmt::Debug> fmt::Debug for PerProcess<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.get() {
            Some(value) => f.debug_tuple("PerProcess").field(value).finish(),
            None => f.write_str("PerProcess(<none in this process>)"),
        }
    }
}

/// The fork-aware lock behind [`PerProcess::install`]: the word holds the holder's epoch.
struct InstallLock<'a>(&'a AtomicU64);

impl<'a> InstallLock<'a> {
    fn acquire(word: &'a AtomicU64, here: Epoch) -> Self {
        let mut waits = 0u32;
        loop {
            let holder = word.load(Ordering::Acquire);
            // 0 is free; another epoch's value was left by a thread that does not exist here.
            if holder != here.get()
                && word
                    .compare_exchange(holder, here.get(), Ordering::AcqRel, Ordering::Acquire)
                    .is_ok()
            {
                return InstallLock(word);
            }
            // A thread of this process is installing. A pool generation installs without
            // connecting, so the wait is short; a `ForkLocal` or `GuardedPool` initialiser may
            // connect, so a longer wait sleeps instead of spinning.
            waits = waits.saturating_add(1);
            if waits < 100 {
                std::thread::yield_now();
            } else {
                std::thread::sleep(std::time::Duration::from_micros(200));
            }
        }
    }
}

impl Drop for InstallLock<'_> {
    /// Also runs if `init` panicked, so a failed install does not block the process.
    fn drop(&mut self) {
        self.0.store(0, Ordering::Release);
    }
}

// r2d2's `Error` and `State` for the pool this crate runs on (`std_pool`), which must not run
// r2d2's code in a forked child: r2d2 has no public constructor for either, and the only r2d2
// paths that make them park on parking_lot, whose global state a fork leaves corrupted (see
// `std_pool`).

/// An `r2d2::Error` reading "timed out waiting for connection", followed by ": {message}" when
/// there is one, made without r2d2.
pub(crate) fn r2d2_error(message: impl Into<Option<String>>) -> r2d2::Error {
    // SAFETY: r2d2 0.8.10 (pinned with `=` in Cargo.toml) declares `pub struct
    // Error(Option<String>)`, and any `Option<String>` is a valid value of it (r2d2 only formats
    // it). `transmute` checks at compile time that both types have the same size, so the one
    // field sits at offset 0 and covers every byte: the bytes of an `Option<String>` are exactly
    // an `Error`. A unit test checks the result formats as r2d2's own errors do.
    unsafe { std::mem::transmute::<Option<String>, r2d2::Error>(message.into()) }
}

/// An `r2d2::State` with the given counts, made without r2d2.
pub(crate) fn r2d2_state(connections: u32, idle_connections: u32) -> r2d2::State {
    // SAFETY: r2d2 0.8.10's (pinned) `State` is two `u32`s and a private `()`; all-zero bytes are a valid
    // value of each, and r2d2 attaches no meaning to the private field. The public fields are
    // then set by name, so their order in memory does not matter.
    let mut state: r2d2::State = unsafe { std::mem::zeroed() };
    state.connections = connections;
    state.idle_connections = idle_connections;
    state
}

/// Runs `job` on a new detached thread made with `pthread_create` directly; false (and `job`
/// dropped) if no thread could be made.
///
/// Not `std::thread::spawn`: every thread std starts first takes a process-global std mutex
/// (the stack-overflow handler's thread-info map) that threads also take when they exit, so a
/// fork while a parent thread starts or exits leaves it locked, and every std thread the child
/// then starts blocks before running a line. glibc's own thread-creation state is reset for the
/// child by `fork()`. A thread made here is a "foreign" thread to std, which std supports.
pub(crate) fn spawn_detached(job: Box<dyn FnOnce() + Send>) -> bool {
    extern "C" fn run(arg: *mut libc::c_void) -> *mut libc::c_void {
        // SAFETY: `arg` is the `Box<Box<dyn FnOnce() + Send>>` leaked by `spawn_detached` for
        // this thread alone, and this is the only place that takes it back.
        let job = unsafe { Box::from_raw(arg.cast::<Box<dyn FnOnce() + Send>>()) };
        // A panic must not unwind out of an `extern "C"` function (that aborts the process).
        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job));
        ptr::null_mut()
    }
    let arg = Box::into_raw(Box::new(job)).cast::<libc::c_void>();
    // SAFETY: `attr` is initialised by `pthread_attr_init` before any other use and destroyed
    // once after `pthread_create`; `thread` is written by `pthread_create`; `run` has the
    // signature pthread expects and takes ownership of `arg` only if the thread was created.
    unsafe {
        let mut attr = std::mem::MaybeUninit::<libc::pthread_attr_t>::uninit();
        if libc::pthread_attr_init(attr.as_mut_ptr()) != 0 {
            drop(Box::from_raw(arg.cast::<Box<dyn FnOnce() + Send>>()));
            return false;
        }
        libc::pthread_attr_setdetachstate(attr.as_mut_ptr(), libc::PTHREAD_CREATE_DETACHED);
        let mut thread = std::mem::MaybeUninit::<libc::pthread_t>::uninit();
        let rc = libc::pthread_create(thread.as_mut_ptr(), attr.as_ptr(), run, arg);
        libc::pthread_attr_destroy(attr.as_mut_ptr());
        if rc != 0 {
            drop(Box::from_raw(arg.cast::<Box<dyn FnOnce() + Send>>()));
        }
        rc == 0
    }
}

/// The protocol of the socket `fd` refers to now (`SO_PROTOCOL`: `IPPROTO_TCP` for a TCP
/// socket); `None` for a descriptor that is closed or not a socket. For the backends that find
/// a connection's socket by its addresses, which name one connection only for TCP. (The other
/// way to ask, this network namespace's `/proc/self/net/tcp`, walks every bucket of the
/// kernel's TCP hash tables: about 4 ms per connect here.)
#[cfg(any(target_os = "linux", target_os = "android"))]
pub(crate) fn socket_protocol(fd: std::os::fd::RawFd) -> Option<libc::c_int> {
    let mut protocol: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `protocol` and `len` are live locals and `len` is the size of `protocol`; the
    // kernel checks `fd` itself (a closed descriptor or one that is not a socket is an error
    // return, nothing more), and nothing is borrowed from the descriptor.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_PROTOCOL,
            ptr::addr_of_mut!(protocol).cast(),
            &mut len,
        )
    };
    (rc == 0 && len as usize == std::mem::size_of::<libc::c_int>()).then_some(protocol)
}

#[cfg(not(any(target_os = "linux", target_os = "android")))]
pub(crate) fn socket_protocol(_fd: std::os::fd::RawFd) -> Option<libc::c_int> {
    None
}

/// The kernel's cookie of the socket `fd` refers to now (`SO_COOKIE`, Linux 4.12+): a 64-bit
/// number no other socket gets while the system runs. `None` for a descriptor that is closed or
/// not a socket, or where the kernel has no cookies. For telling the sockets a connect created
/// from those that were there before it (`connect_window`).
#[cfg(any(target_os = "linux", target_os = "android"))]
pub(crate) fn socket_cookie(fd: std::os::fd::RawFd) -> Option<u64> {
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: `cookie` and `len` are live locals and `len` is the size of `cookie`; the kernel
    // checks `fd` itself (a closed descriptor or one that is not a socket is an error return,
    // nothing more), and nothing is borrowed from the descriptor.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_COOKIE,
            ptr::addr_of_mut!(cookie).cast(),
            &mut len,
        )
    };
    (rc == 0 && len as usize == std::mem::size_of::<u64>()).then_some(cookie)
}

#[cfg(not(any(target_os = "linux", target_os = "android")))]
pub(crate) fn socket_cookie(_fd: std::os::fd::RawFd) -> Option<u64> {
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epoch_is_stable_within_a_process() {
        let first = current_epoch();
        let from_threads: Vec<Epoch> = (0..4)
            .map(|_| std::thread::spawn(current_epoch))
            .map(|handle| handle.join().unwrap())
            .collect();
        assert!(from_threads.iter().all(|epoch| *epoch == first));
        assert_ne!(first.get(), 0);
    }

    #[test]
    fn retired_values_stay_valid_and_are_dropped_with_the_container() {
        use std::sync::atomic::AtomicUsize;
        static DROPS: AtomicUsize = AtomicUsize::new(0);
        struct Counted(u32);
        impl Drop for Counted {
            fn drop(&mut self) {
                DROPS.fetch_add(1, Ordering::SeqCst);
            }
        }
        let slot = PerProcess::new(Counted(1));
        let retired = slot.retire().expect("a value to retire");
        assert!(slot.get().is_none());
        assert!(slot.retire().is_none(), "nothing left to retire");
        let fresh = slot.get_or_try_init(|inherited| {
            assert!(inherited.is_none(), "a retired value is not inherited");
            Ok::<_, ()>(Counted(2))
        });
        assert_eq!(fresh.map(|value| value.0), Ok(2));
        assert_eq!(retired.0, 1, "still readable after its replacement");
        assert!(slot.retire().is_some());
        assert_eq!(DROPS.load(Ordering::SeqCst), 0);
        drop(slot);
        assert_eq!(DROPS.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn this_kernel_wipes_on_fork() {
        // The CI machine runs Linux >= 4.14; a fallback here would mean a getpid() per checkout.
        assert!(fork_detection().wipe_on_fork);
    }

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
        assert!(pid > 0, "fork failed");
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut status = 0;
        // SAFETY: `status` is a live local; `pid` is our child.
        while unsafe { libc::waitpid(pid as libc::pid_t, &mut status, libc::WNOHANG) } == 0 {
            if Instant::now() > deadline {
                // SAFETY: our own child, still unreaped.
                unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
                panic!("the raw-fork child hung");
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        assert!(
            libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
            "the child saw its parent's section or pending fork (status {status})"
        );
    }

    #[test]
    fn a_child_never_waits_for_a_connect_turn_its_parent_held() {
        // The turn held, as a raw fork (or a libc fork that gave up waiting for the sections)
        // can find it.
        let window = crate::connect_window::ConnectWindow::open();
        assert!(window.holds_turn());
        // SAFETY: a raw fork; the child only lists its own descriptors (glibc's allocator works
        // in the child of a fork) and leaves with `_exit`, touching nothing other threads of
        // the parent may have been changing.
        let pid = unsafe { libc::syscall(libc::SYS_fork) };
        if pid == 0 {
            let started = Instant::now();
            let child_window = crate::connect_window::ConnectWindow::open();
            let at_once = started.elapsed() < Duration::from_millis(500);
            let code = i32::from(!(child_window.holds_turn() && at_once));
            drop(child_window.close());
            // SAFETY: `_exit` has no preconditions and ends the child at once.
            unsafe { libc::_exit(code) };
        }
        drop(window.close());
        assert!(pid > 0, "fork failed");
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut status = 0;
        // SAFETY: `status` is a live local; `pid` is our child.
        while unsafe { libc::waitpid(pid as libc::pid_t, &mut status, libc::WNOHANG) } == 0 {
            if Instant::now() > deadline {
                // SAFETY: our own child, still unreaped.
                unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
                panic!("the raw-fork child hung");
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        assert!(
            libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
            "the child waited for its parent's turn (status {status})"
        );
    }

    #[test]
    fn r2d2_values_made_outside_r2d2() {
        let error = r2d2_error("rebuilt after fork: refused".to_string());
        assert_eq!(
            error.to_string(),
            "timed out waiting for connection: rebuilt after fork: refused"
        );
        assert_eq!(
            r2d2_error(None).to_string(),
            "timed out waiting for connection"
        );
        let state = r2d2_state(3, 2);
        assert_eq!((state.connections, state.idle_connections), (3, 2));
    }
}
