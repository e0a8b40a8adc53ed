//! The counts under the pool's lock, and how the lock is taken.
//!
//! Services run more threads than cores, so a thread that holds a lock is most often a thread
//! waiting for a core. The counts change only when a connection opens or closes, on
//! `release_idle` and the reaper, and when a `get` waits; the common checkout and return take
//! no lock at all (`checkout`). When the lock is needed and taken, a thread that finds it locked
//! first retries after short busy waits (2, 4 and 8 pauses, for a holder running on another
//! core), then yields its core up to `LOCK_YIELDS` times, and only then blocks in `Mutex::lock`
//! — at once if other threads already sleep there (`blocked_on_lock`), so that spinning
//! newcomers cannot keep cutting in front of them (parking_lot's mutex follows the same rule).
//! The pauses are `spin_loop` hints and the yields `sched_yield`: nothing registered per thread
//! or per process, nothing a fork could leave behind.

use std::collections::VecDeque;
use std::sync::{Arc, PoisonError, TryLockError};
use std::time::Instant;

use r2d2::ManageConnection;

use super::waiting::Waiter;
use super::{Pooled, Shared};
use crate::sync::{self, MutexGuard, Ordering};

/// Contended lock: rounds of busy-waiting (2, 4, 8 pauses) before yielding the core.
const LOCK_SPINS: u32 = 3;

/// Contended lock: yields of the core before blocking in the kernel.
const LOCK_YIELDS: u32 = 7;

pub(super) struct State<M: ManageConnection> {
    /// Open connections, idle or checked out.
    pub(super) open: u32,
    /// Connection attempts running, on threads of their own (or on the thread of a `get` that
    /// could have none).
    pub(super) connecting: u32,
    /// The slot numbers no open connection owns; a new connection takes one.
    pub(super) free_slots: Vec<u32>,
    /// Connection attempts that have ended, either way; a waiting `get` starts another attempt
    /// only once one has ended since its last.
    pub(super) attempts_ended: u64,
    pub(super) last_error: Option<String>,
    /// Consecutive failed attempts, for r2d2's back-off (200 ms doubling, at most half the
    /// connection timeout).
    pub(super) failures: u32,
    /// No new attempt before this instant, after a failure.
    pub(super) retry_at: Option<Instant>,
    /// Set by `release_idle`, cleared by the next `get`, `try_get` or `warm_up`: until then
    /// nothing is opened in the background, so a released pool stays empty.
    pub(super) dormant: bool,
    /// `get` calls waiting for a connection, longest waiting first.
    pub(super) queue: VecDeque<Waiter>,
    /// Connections handed to a waiting `get` (by ticket) that has not picked them up yet.
    pub(super) handed: Vec<(u64, Box<Pooled<M>>)>,
    pub(super) next_ticket: u64,
    /// No connection is handed over before this instant (see `State::fair_turn`).
    pub(super) next_fair_turn: Instant,
}

impl<M: ManageConnection> Shared<M> {
    #[inline]
    pub(super) fn lock(&self) -> MutexGuard<'_, State<M>> {
        // Every critical section leaves the state consistent (user code runs unlocked), so a
        // panic elsewhere cannot leave it half-updated.
        match self.state.try_lock() {
            Ok(state) => state,
            Err(TryLockError::Poisoned(poisoned)) => poisoned.into_inner(),
            Err(TryLockError::WouldBlock) => self.lock_contended(),
        }
    }

    /// See the module docs, "Under contention".
    #[cold]
    #[inline(never)]
    pub(super) fn lock_contended(&self) -> MutexGuard<'_, State<M>> {
        for attempt in 0..LOCK_SPINS + LOCK_YIELDS {
            if self.blocked_on_lock.load(Ordering::Relaxed) > 0 {
                // Others already sleep on the mutex: queue up behind them rather than cut in.
                break;
            }
            if attempt < LOCK_SPINS {
                for _ in 0..(2 << attempt) {
                    sync::spin_loop();
                }
            } else {
                sync::yield_now();
            }
            match self.state.try_lock() {
                Ok(state) => return state,
                Err(TryLockError::Poisoned(poisoned)) => return poisoned.into_inner(),
                Err(TryLockError::WouldBlock) => {}
            }
        }
        self.blocked_on_lock.fetch_add(1, Ordering::Relaxed);
        let state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        self.blocked_on_lock.fetch_sub(1, Ordering::Relaxed);
        state
    }

    /// Counts one more attempt as running, reserved at the current release count (returned).
    pub(super) fn reserve_attempt(&self, state: &mut State<M>) -> u64 {
        state.connecting += 1;
        self.counts_changed(state);
        self.releases.load(Ordering::SeqCst)
    }

    /// `open` or `connecting` changed: whether the pool is full is read without the lock.
    pub(super) fn counts_changed(&self, state: &State<M>) {
        self.full.store(
            state.open + state.connecting >= self.settings.max_size,
            Ordering::SeqCst,
        );
    }

    /// Connections owning `slots` leave the pool, to be closed: their slots are free for new
    /// ones, they no longer count, and in the building process others are started to keep
    /// `min_idle`, as r2d2 does after every close.
    pub(super) fn closing(
        self: &Arc<Self>,
        state: &mut State<M>,
        slots: impl IntoIterator<Item = u32>,
    ) {
        for slot in slots {
            state.open -= 1;
            state.free_slots.push(slot);
        }
        self.counts_changed(state);
        self.replenish(state);
    }

    /// Wakes every waiting `get`, `build` and `warm_up`, if any.
    pub(super) fn wake_all(&self, state: MutexGuard<'_, State<M>>) {
        for waiter in &state.queue {
            waiter.wake.notify();
        }
        drop(state);
        if self.waiters.load(Ordering::SeqCst) > 0 {
            self.changed.notify_all();
        }
    }
}
