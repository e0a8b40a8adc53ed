//! A registration made once per lineage: by the first process that needs it, inherited by every
//! child forked after it, and made again by a child whose parent forked in the middle of it.

use std::sync::atomic::{AtomicU64, Ordering};

/// Where a lineage's registration stands: nobody has claimed it, a process has claimed it (the
/// word holds that process's claimant tag: its pid, or its epoch), or it is done. Inherited by
/// children like the registration itself.
///
/// A compare-and-swap picks the one thread that registers; no thread waits for another, so a
/// fork at any instant leaves nothing to wait for. A child that inherits a claim of another
/// process (the fork copied the word, but not the registering thread, and whether that
/// thread's registration came before the fork is unknown) claims it again and registers a
/// second time; callers make a second registration harmless.
pub(super) struct OncePerLineage(AtomicU64);

const UNCLAIMED: u64 = 0;
const DONE: u64 = u64::MAX;

impl OncePerLineage {
    pub(super) const fn new() -> Self {
        OncePerLineage(AtomicU64::new(UNCLAIMED))
    }

    /// The fast path: one load.
    #[inline]
    pub(super) fn is_done(&self) -> bool {
        self.0.load(Ordering::Acquire) == DONE
    }

    /// True if the calling thread is to register now, for the process `claimant` (neither 0
    /// nor `u64::MAX`), and then call [`done`](Self::done). False when the registration is
    /// done, when a thread of the claimant's process is registering, or when another thread
    /// claimed it first.
    pub(super) fn claim(&self, claimant: u64) -> bool {
        debug_assert!(claimant != UNCLAIMED && claimant != DONE);
        let seen = self.0.load(Ordering::Acquire);
        if seen == DONE || seen == claimant {
            return false;
        }
        self.0
            .compare_exchange(seen, claimant, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }

    /// The registration is made (in this process and every child forked from now on). A plain
    /// atomic store, so an async-signal-safe handler may call it.
    pub(super) fn done(&self) {
        self.0.store(DONE, Ordering::Release);
    }

    /// Makes the registration look claimed by the process `claimant`, as in the child of a
    /// parent that forked while registering.
    #[cfg(all(test, target_os = "linux", not(forksafe_portable)))]
    pub(super) fn pretend_claimed_by(&self, claimant: u64) {
        self.0.store(claimant, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_claim_per_process_and_none_once_done() {
        let registration = OncePerLineage::new();
        assert!(!registration.is_done());
        assert!(registration.claim(7), "the first claim wins");
        assert!(
            !registration.claim(7),
            "another thread of the same process does not"
        );
        assert!(
            registration.claim(8),
            "a child that inherited process 7's claim takes it over"
        );
        registration.done();
        assert!(registration.is_done());
        assert!(!registration.claim(9), "nobody claims a done registration");
    }
}
