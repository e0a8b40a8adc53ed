//! Reader counts that tell when a value taken out of service can be freed.
//!
//! [`PerProcess::retire`](super::PerProcess::retire) unpublishes a value while other threads
//! may still be using it. The value may be freed once every read that could have seen it has
//! ended: a grace period, as in the kernel's sleepable RCU (SRCU). A read enters one of two
//! counters, then loads the published pointer, uses the value and leaves the counter. The
//! reclaimer unpublishes first; from then on a counter seen at zero proves that every read
//! that entered it before has ended, so a value unpublished before both counters were seen at
//! zero is unreachable. New reads enter the counter a phase number names; the reclaimer flips
//! the phase whenever the other counter is empty, so that the one in use drains in turn even
//! while reads never stop.
//!
//! Nobody waits: the reclaimer only looks ([`ReaderCounts::drained`]) and keeps what it cannot
//! free yet for a later look. That keeps it fork-safe: counters inherited across `fork()` may
//! count reads of parent threads that do not exist in the child, and a child must never wait
//! for them — it never looks at them at all (see `PerProcess`).
//!
//! Why one look at each counter suffices: entering, loading the pointer, unpublishing and
//! looking are all sequentially consistent, so they fall in one total order. A read that saw
//! the value loaded it before it was unpublished, and entered its counter before that load;
//! a look after the unpublishing that finds the counter at zero therefore comes after that
//! read's exit, and reads from it (an acquire of the exit's release), so everything the read
//! did with the value happens before the value is freed.

use crate::sync::{self, AtomicUsize, Ordering};

/// The two reader counters and the phase that picks the one new reads enter.
pub(super) struct ReaderCounts {
    phase: AtomicUsize,
    readers: [AtomicUsize; 2],
}

/// Which of the two counters were seen at zero, one bit each.
pub(super) type Drained = u8;

/// Both counters seen at zero.
pub(super) const BOTH_DRAINED: Drained = 0b11;

impl ReaderCounts {
    crate::sync::const_fn_unless_loom! {
        pub(super) fn new() -> Self {
            ReaderCounts {
                phase: AtomicUsize::new(0),
                readers: [AtomicUsize::new(0), AtomicUsize::new(0)],
            }
        }
    }

    /// Starts a read; the counter entered must be handed to [`exit`](Self::exit). Call it
    /// before loading the pointer the read will use.
    #[inline]
    pub(super) fn enter(&self) -> usize {
        // Any counter is correct; the phase only spreads reads so that each counter drains.
        let counter = self.phase.load(Ordering::Relaxed) & 1;
        self.readers[counter].fetch_add(1, Ordering::SeqCst);
        // "Enter, then load the pointer", against a reclaimer's "unpublish, then look at the
        // counters" (`drained`).
        sync::seq_cst_pairing();
        counter
    }

    /// Ends a read started with [`enter`](Self::enter), after its last use of the value.
    #[inline]
    pub(super) fn exit(&self, counter: usize) {
        // Release: the read's uses happen before a reclaimer's look that sees the count drop.
        self.readers[counter].fetch_sub(1, Ordering::SeqCst);
    }

    /// Looks at both counters once: bit `i` is set when counter `i` is at zero, which means
    /// that every read that entered it before this call has ended. When the counter new reads
    /// do not enter is empty, new reads are sent to it, so that the other one drains. Called by
    /// one reclaimer at a time (the caller's lock).
    pub(super) fn drained(&self) -> Drained {
        sync::seq_cst_pairing();
        let mut drained = 0;
        for (counter, readers) in self.readers.iter().enumerate() {
            if readers.load(Ordering::SeqCst) == 0 {
                drained |= 1 << counter;
            }
        }
        let idle = (self.phase.load(Ordering::Relaxed) & 1) ^ 1;
        if drained & (1 << idle) != 0 {
            self.phase.fetch_add(1, Ordering::Relaxed);
        }
        drained
    }
}

#[cfg(all(test, not(forksafe_loom)))]
mod tests {
    use super::*;

    #[test]
    fn a_counter_drains_once_its_reads_end_while_new_reads_enter_the_other() {
        let counts = ReaderCounts::new();
        assert_eq!(counts.drained(), BOTH_DRAINED);
        let long = counts.enter();
        // The read is counted until it exits, however often the phase flips.
        for _ in 0..4 {
            assert_eq!(counts.drained() & (1 << long), 0);
        }
        // New reads go to the other counter, which drains on its own.
        let short = counts.enter();
        assert_ne!(
            short, long,
            "new reads enter the counter that is not draining"
        );
        assert_eq!(counts.drained(), 0);
        counts.exit(short);
        assert_eq!(counts.drained(), 1 << short);
        counts.exit(long);
        assert_eq!(counts.drained(), BOTH_DRAINED);
    }
}
