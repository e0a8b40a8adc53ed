//! The workers' slots: their live figures and life locks, in memory the master shares with
//! every worker.

use std::cell::UnsafeCell;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Instant;

use crate::app::map_shared_anonymous;

/// One worker's live figures, in memory shared by the master and every worker.
pub struct Slot {
    pub pid: AtomicU32,
    /// When the request in progress started, in µs since the master's start plus one; 0 when
    /// the worker is waiting for a request.
    pub busy_since: AtomicU64,
    pub served: AtomicU64,
    /// Held by the slot's worker for as long as it lives.
    pub life: LifeLock,
}

/// A robust, process-shared mutex: the worker that holds it dies, and the master's thread
/// waiting for it gets it with `EOWNERDEAD` (see the [`server`](super) module docs for why not
/// just `waitpid`).
pub struct LifeLock {
    mutex: UnsafeCell<libc::pthread_mutex_t>,
    /// The pid of the worker holding `mutex`, stored once it holds it.
    holder: AtomicU32,
}

// SAFETY: the mutex is only ever touched through pthread calls, which are made for use by
// several threads (and, being process-shared, several processes) at once.
unsafe impl Sync for LifeLock {}

impl LifeLock {
    /// Makes the (zeroed) mutex robust and process-shared; before any process can use it.
    fn init(&self) -> Result<(), String> {
        // SAFETY: `attributes` is initialised by `pthread_mutexattr_init` before use and
        // destroyed after; the mutex lives in memory nothing else uses yet, and is initialised
        // once.
        unsafe {
            let mut attributes: libc::pthread_mutexattr_t = std::mem::zeroed();
            let mut result = libc::pthread_mutexattr_init(&mut attributes);
            if result == 0 {
                result = libc::pthread_mutexattr_setpshared(
                    &mut attributes,
                    libc::PTHREAD_PROCESS_SHARED,
                );
            }
            if result == 0 {
                result =
                    libc::pthread_mutexattr_setrobust(&mut attributes, libc::PTHREAD_MUTEX_ROBUST);
            }
            if result == 0 {
                result = libc::pthread_mutex_init(self.mutex.get(), &attributes);
            }
            libc::pthread_mutexattr_destroy(&mut attributes);
            match result {
                0 => Ok(()),
                error => Err(format!(
                    "robust mutex: {}",
                    std::io::Error::from_raw_os_error(error)
                )),
            }
        }
    }

    /// In a worker, on the thread that lives as long as the process: holds the lock until the
    /// process dies. If it cannot be taken, the master only has `waitpid`.
    pub fn hold_for_life(&self) {
        // SAFETY: an initialised mutex, never destroyed; the master unlocks it after a death
        // before forking the next holder, so this hardly waits. Should this worker get it
        // first from a dead holder, it owns it and may mark it consistent.
        let held = unsafe {
            match libc::pthread_mutex_lock(self.mutex.get()) {
                0 => true,
                libc::EOWNERDEAD => libc::pthread_mutex_consistent(self.mutex.get()) == 0,
                _ => false,
            }
        };
        if held {
            self.holder.store(std::process::id(), Ordering::Release);
        }
    }

    /// The pid of the worker that took the lock last (0 before any did).
    pub fn holder(&self) -> u32 {
        self.holder.load(Ordering::Acquire)
    }

    /// In the master: waits until the holder dies, then frees the lock for the next one and
    /// returns the pid of the worker that held it. None if the lock was free (workers never
    /// let go of it alive).
    pub fn wait_for_holder_death(&self) -> Option<u32> {
        // SAFETY: an initialised mutex, never destroyed. After `EOWNERDEAD` this thread owns it
        // and marks it consistent, so the next worker can take it; unlocking is this thread's
        // to do in every case where the lock was taken.
        unsafe {
            match libc::pthread_mutex_lock(self.mutex.get()) {
                libc::EOWNERDEAD => {
                    // Read while this thread holds the lock, so no new holder has stored its
                    // pid yet: the last to store it is the one that died (or, if that one died
                    // before storing, its predecessor, which died holding it too).
                    let dead = self.holder();
                    libc::pthread_mutex_consistent(self.mutex.get());
                    libc::pthread_mutex_unlock(self.mutex.get());
                    Some(dead)
                }
                0 => {
                    libc::pthread_mutex_unlock(self.mutex.get());
                    None
                }
                _ => None,
            }
        }
    }
}

/// The slots, in a `MAP_SHARED` anonymous mapping made before the first fork.
pub struct Slots {
    pub slots: &'static [Slot],
}

impl Slots {
    pub fn new(count: usize) -> Slots {
        let bytes = std::mem::size_of::<Slot>() * count;
        let page = map_shared_anonymous(bytes)
            .unwrap_or_else(|error| panic!("mapping the worker slots: {error}"));
        // SAFETY: the mapping is `bytes` long, page-aligned (so aligned for `Slot`), zeroed by the
        // kernel (atomics of 0, and a mutex that `LifeLock::init` initialises next), never
        // unmapped, and only ever accessed through atomics and pthread calls, from this process
        // and its forked workers.
        let slots = unsafe { std::slice::from_raw_parts(page.as_ptr().cast::<Slot>(), count) };
        for slot in slots {
            slot.life
                .init()
                .unwrap_or_else(|error| panic!("the worker slots: {error}"));
        }
        Slots { slots }
    }
}

/// µs since `start`, plus one so that 0 can mean "idle".
pub fn stamp(start: Instant) -> u64 {
    start.elapsed().as_micros() as u64 + 1
}
