//! The epoch: which process of a fork lineage this is, noticed with one load.
//!
//! See the module docs of `fork` for the two mechanisms (the wipe-on-fork page and the
//! atfork child handler) and the fallback where the page is missing.
#![allow(unsafe_code)]

use std::ptr;
use std::sync::atomic::{AtomicPtr, AtomicU64, Ordering};

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

/// Forks noticed by the atfork child handler in this lineage (inherited, so it counts every
/// libc `fork()` between the first process and this one).
static ATFORK_CHILD_CALLS: AtomicU64 = AtomicU64::new(0);

/// Fallback cell, used when the wipe-on-fork page cannot be mapped. It holds the owner's pid
/// beside the epoch (see [`pack_owned_epoch`]), so that claiming an epoch and owning it are one
/// compare-and-swap: no thread can see a new epoch with the previous owner's pid.
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
    cell_wipes_on_fork_ptr(cell)
}

fn cell_wipes_on_fork_ptr(cell: *const AtomicU64) -> bool {
    !ptr::eq(cell, &FALLBACK_CELL)
}

/// Slow path: set up the cell if nobody has, then give this process an epoch if it has none.
#[cold]
#[inline(never)]
fn claim_epoch() -> Epoch {
    let cell = cell();
    if cell_wipes_on_fork(cell) {
        claim_wiped_epoch(cell)
    } else {
        claim_owned_epoch(cell, std::process::id())
    }
}

/// The epoch in a wipe-on-fork cell: every fork child finds the cell zeroed, so any other value
/// is this process's.
fn claim_wiped_epoch(cell: &AtomicU64) -> Epoch {
    loop {
        let seen = cell.load(Ordering::Acquire);
        if seen != 0 {
            return Epoch(seen);
        }
        let fresh = EPOCH_SOURCE.fetch_add(1, Ordering::AcqRel) + 1;
        // Racing threads of the same new process: one wins, the others adopt its epoch, so
        // nothing created in this process is ever mistaken for an inherited object.
        if cell
            .compare_exchange(0, fresh, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            return Epoch(fresh);
        }
    }
}

/// The epoch in the fallback cell, which a raw fork child inherits unchanged: it is this
/// process's only while the pid packed beside it is `pid`.
fn claim_owned_epoch(cell: &AtomicU64, pid: u32) -> Epoch {
    loop {
        let seen = cell.load(Ordering::Acquire);
        if let Some(epoch) = owned_epoch(seen, pid) {
            return epoch;
        }
        let fresh = EPOCH_SOURCE.fetch_add(1, Ordering::AcqRel) + 1;
        // One step: a thread that loses sees the winner's word, whose pid is ours.
        if cell
            .compare_exchange(
                seen,
                pack_owned_epoch(pid, fresh),
                Ordering::AcqRel,
                Ordering::Acquire,
            )
            .is_ok()
        {
            return Epoch(fresh & OWNED_EPOCH_MASK);
        }
    }
}

/// The low bits of a fallback word hold the epoch. Epochs count the processes of one lineage
/// that claimed one, so 2^32 of them is out of reach (the driver-section counts already assume
/// fewer than 2^44).
const OWNED_EPOCH_MASK: u64 = u32::MAX as u64;

/// A fallback word: `pid` in the high half, the epoch in the low half (never 0).
fn pack_owned_epoch(pid: u32, epoch: u64) -> u64 {
    (u64::from(pid) << 32) | (epoch & OWNED_EPOCH_MASK)
}

/// The epoch of a fallback word, if `pid` owns it.
fn owned_epoch(word: u64, pid: u32) -> Option<Epoch> {
    let epoch = word & OWNED_EPOCH_MASK;
    (epoch != 0 && word >> 32 == u64::from(pid)).then_some(Epoch(epoch))
}

/// The epoch cell, mapping it and registering the atfork handler on first use.
///
/// Lock-free on purpose: a `Once` or `OnceLock` caught mid-initialisation by a fork would stay
/// "running" in the child forever.
fn cell() -> &'static AtomicU64 {
    let existing = EPOCH_CELL.load(Ordering::Acquire);
    if !existing.is_null() {
        // Only the slow path gets here. A parent may have forked between publishing the cell
        // and the two steps after it, which the child then takes itself: without them the
        // child's lineage would stay on the slow path, or have no atfork handlers.
        if cell_wipes_on_fork_ptr(existing) && FAST_CELL.load(Ordering::Acquire) != existing {
            FAST_CELL.store(existing, Ordering::Release);
        }
        super::atfork::ensure_registered();
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
            super::atfork::ensure_registered();
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
/// (`--cfg forksafe_portable` takes the other systems' path on Linux too, so that the test suite
/// runs it: see Cargo.toml.)
#[cfg(all(
    any(target_os = "linux", target_os = "android"),
    not(forksafe_portable)
))]
fn map_wipe_on_fork_page() -> Option<*mut AtomicU64> {
    #[cfg(test)]
    if std::env::var_os(tests::NO_WIPE_ON_FORK).is_some() {
        return None;
    }
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

#[cfg(not(all(
    any(target_os = "linux", target_os = "android"),
    not(forksafe_portable)
)))]
fn map_wipe_on_fork_page() -> Option<*mut AtomicU64> {
    None
}

fn unmap_page(page: *mut AtomicU64) {
    // SAFETY: only called with a page from `map_wipe_on_fork_page` that was never published, so
    // no reference to it exists.
    unsafe { libc::munmap(page.cast(), PAGE) };
}

/// The whole of the atfork child handler's work on the epoch: counts the fork and zeroes the
/// cell, so the child claims a fresh epoch on first use. Async-signal-safe: atomic operations
/// on statics, no allocation, no lock, no logging.
pub(super) fn forget_epoch_in_child() {
    ATFORK_CHILD_CALLS.fetch_add(1, Ordering::Relaxed);
    let cell = EPOCH_CELL.load(Ordering::Relaxed);
    if !cell.is_null() {
        // SAFETY: a published cell is never unmapped (see `current_epoch`).
        unsafe { &*cell }.store(0, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

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

    /// Set in the environment of a test process whose epoch cell must be the fallback.
    pub(super) const NO_WIPE_ON_FORK: &str = "FORKSAFE_POOL_TEST_NO_WIPE_ON_FORK";

    /// Runs the test `name` again in a process of its own whose epoch cell is the fallback,
    /// and checks it passed there.
    fn rerun_without_wipe_on_fork(name: &str) {
        let mut child = std::process::Command::new(std::env::current_exe().unwrap())
            .args([name, "--exact", "--test-threads=1"])
            .env(NO_WIPE_ON_FORK, "1")
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("run the test binary again");
        let deadline = Instant::now() + Duration::from_secs(60);
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("{name} hung without wipe-on-fork");
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        let mut output = String::new();
        std::io::Read::read_to_string(&mut child.stdout.take().unwrap(), &mut output).unwrap();
        assert!(
            status.success() && output.contains("1 passed"),
            "{name} without wipe-on-fork: {status}\n{output}"
        );
    }

    /// What a raw fork child (which runs no atfork handler) finds in the fallback cell: the
    /// parent's epoch, owned by the parent's pid.
    fn make_the_fallback_epoch_stale(parent_pid: u32, parent_epoch: u64) {
        let cell = cell();
        assert!(!cell_wipes_on_fork(cell));
        cell.store(pack_owned_epoch(parent_pid, parent_epoch), Ordering::SeqCst);
    }

    #[test]
    fn without_wipe_on_fork_racing_threads_claim_one_epoch() {
        const NAME: &str =
            "fork::epoch::tests::without_wipe_on_fork_racing_threads_claim_one_epoch";
        if std::env::var_os(NO_WIPE_ON_FORK).is_none() {
            return rerun_without_wipe_on_fork(NAME);
        }
        assert!(
            !fork_detection().wipe_on_fork,
            "the test hook did not apply"
        );
        const THREADS: usize = 4;
        const ROUNDS: usize = 20_000;
        let barrier = std::sync::Barrier::new(THREADS + 1);
        let claimed: Vec<std::sync::Mutex<Vec<Epoch>>> =
            (0..THREADS).map(|_| Default::default()).collect();
        let mut settled = Vec::with_capacity(ROUNDS);
        std::thread::scope(|scope| {
            for claimed in &claimed {
                let barrier = &barrier;
                scope.spawn(move || {
                    for _ in 0..ROUNDS {
                        barrier.wait();
                        let epoch = current_epoch();
                        claimed.lock().unwrap().push(epoch);
                        barrier.wait();
                    }
                });
            }
            let me = std::process::id();
            for round in 0..ROUNDS {
                let previous = current_epoch();
                // A pid that is not ours and an epoch this process has not used.
                make_the_fallback_epoch_stale(me.wrapping_add(1), previous.get() + 1);
                barrier.wait();
                barrier.wait();
                settled.push((round, current_epoch()));
            }
        });
        let claimed: Vec<Vec<Epoch>> = claimed
            .into_iter()
            .map(|claimed| claimed.into_inner().unwrap())
            .collect();
        for (round, epoch) in settled {
            for (thread, claimed) in claimed.iter().enumerate() {
                assert_eq!(
                    claimed[round], epoch,
                    "round {round}: thread {thread} claimed another epoch than the process kept"
                );
            }
        }
    }

    #[cfg(any(target_os = "linux", target_os = "android"))]
    #[test]
    fn without_wipe_on_fork_a_raw_fork_child_claims_an_epoch_of_its_own() {
        const NAME: &str =
            "fork::epoch::tests::without_wipe_on_fork_a_raw_fork_child_claims_an_epoch_of_its_own";
        if std::env::var_os(NO_WIPE_ON_FORK).is_none() {
            return rerun_without_wipe_on_fork(NAME);
        }
        assert!(
            !fork_detection().wipe_on_fork,
            "the test hook did not apply"
        );
        let parent = current_epoch();
        // SAFETY: a raw fork; the child allocates nothing, takes no lock, and leaves with
        // `_exit`.
        let pid = unsafe { libc::syscall(libc::SYS_fork) };
        if pid == 0 {
            let child = current_epoch();
            let code = i32::from(!(child > parent && current_epoch() == child));
            // SAFETY: `_exit` has no preconditions and ends the child at once.
            unsafe { libc::_exit(code) };
        }
        let status = crate::sys::reap_raw_child(pid);
        assert!(
            libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
            "the raw-fork child kept its parent's epoch (status {status})"
        );
        assert_eq!(current_epoch(), parent);
    }

    /// A parent that forks after publishing the epoch cell but before publishing the fast
    /// cell and registering the atfork handlers (simulated in the child, which finds the state
    /// such a fork leaves) has a child that completes both on its first check.
    #[cfg(all(target_os = "linux", not(forksafe_portable)))]
    #[test]
    fn a_child_forked_while_the_cell_was_set_up_completes_the_set_up() {
        let parent = current_epoch();
        assert!(fork_detection().wipe_on_fork);
        // SAFETY: the child only touches atomics and leaves with `_exit`.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            // What the fork would have left: the page published, the rest not done.
            FAST_CELL.store(ptr::addr_of!(UNSET).cast_mut(), Ordering::SeqCst);
            super::super::atfork::pretend_a_parent_was_registering();
            let child = current_epoch();
            let fast = FAST_CELL.load(Ordering::SeqCst) == EPOCH_CELL.load(Ordering::SeqCst);
            let registered = super::super::atfork::registered();
            let code = i32::from(!(child > parent && fast)) | (i32::from(!registered) << 1);
            // SAFETY: `_exit` has no preconditions and ends the child at once.
            unsafe { libc::_exit(code) };
        }
        let status = crate::sys::reap_raw_child(pid.into());
        assert!(
            libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
            "exit code {} (1: the lineage stays on the slow path; 2: without atfork handlers)",
            libc::WEXITSTATUS(status)
        );
    }

    #[cfg(all(target_os = "linux", not(forksafe_portable)))]
    #[test]
    fn this_kernel_wipes_on_fork() {
        // The CI machine runs Linux >= 4.14; a fallback here would mean a getpid() per checkout.
        assert!(fork_detection().wipe_on_fork);
    }
}
