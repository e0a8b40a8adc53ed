//! The lock that serialises installing and retiring `PerProcess` values: a word holding the
//! holder's epoch, so that a lock left held by a parent thread the fork caught reads as free in
//! the child.

use super::epoch::Epoch;
use crate::sync::{self, AtomicU64, Ordering};

/// The fork-aware lock behind [`PerProcess::install`]: the word holds the holder's epoch.
pub(super) struct InstallLock<'a>(&'a AtomicU64);

impl<'a> InstallLock<'a> {
    pub(super) fn acquire(word: &'a AtomicU64, here: Epoch) -> Self {
        let mut waits = 0u32;
        loop {
            if let Some(lock) = InstallLock::try_acquire(word, here) {
                return lock;
            }
            // A thread of this process is installing. A pool generation installs without
            // connecting, so the wait is short; a `ForkLocal` or `GuardedPool` initialiser may
            // connect, so a longer wait sleeps instead of spinning.
            waits = waits.saturating_add(1);
            if waits < 100 || cfg!(forksafe_loom) {
                sync::yield_now();
            } else {
                std::thread::sleep(std::time::Duration::from_micros(200));
            }
        }
    }

    pub(super) fn try_acquire(word: &'a AtomicU64, here: Epoch) -> Option<Self> {
        let holder = word.load(Ordering::Acquire);
        // 0 is free; another epoch's value was left by a thread that does not exist here.
        let taken = holder != here.get()
            && word
                .compare_exchange(holder, here.get(), Ordering::AcqRel, Ordering::Acquire)
                .is_ok();
        // Made only once taken: dropping a lock releases it.
        taken.then(|| InstallLock(word))
    }
}

impl Drop for InstallLock<'_> {
    /// Also runs if `init` panicked, so a failed install does not block the process.
    fn drop(&mut self) {
        self.0.store(0, Ordering::Release);
    }
}
