//! The fast path: checking a connection out and putting it back, without the lock.
//!
//! A pool whose every checkout and return takes one mutex (r2d2's) stalls whenever the holder is
//! preempted inside it, and then pays for futex waits, wakes and context switches to let it
//! finish. Here a checkout exchanges a full slot for null and a return puts the connection back
//! into the slot it owns (`idle_slots`); the lock is taken only to close a connection, to keep
//! `min_idle` when the pool is not full, or to wake a waiting `get`. The clock is read only when
//! a setting needs the time (r2d2 reads it four times per checkout and return, for its events,
//! whether or not anyone listens).

use std::ops::{Deref, DerefMut};
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Instant;

use r2d2::ManageConnection;

use super::{Conn, Pooled, Shared};
use crate::r2d2_compat::{checkin_event, release_event};
use crate::sync::{self, Ordering};

/// A connection checked out of a [`ProcessPool`]; goes back when dropped.
pub(crate) struct Lease<M: ManageConnection> {
    pool: Arc<Shared<M>>,
    /// `None` only while dropping.
    conn: Option<Box<Pooled<M>>>,
}

impl<M: ManageConnection> Lease<M> {
    pub(crate) fn extensions(&self) -> &r2d2::Extensions {
        &self.pooled().extensions
    }

    pub(crate) fn extensions_mut(&mut self) -> &mut r2d2::Extensions {
        &mut self.pooled_mut().extensions
    }

    fn pooled(&self) -> &Pooled<M> {
        match &self.conn {
            Some(conn) => conn,
            None => unreachable!("the connection is only taken while dropping"),
        }
    }

    fn pooled_mut(&mut self) -> &mut Pooled<M> {
        match &mut self.conn {
            Some(conn) => conn,
            None => unreachable!("the connection is only taken while dropping"),
        }
    }
}

impl<M: ManageConnection> Deref for Lease<M> {
    type Target = Conn<M>;

    fn deref(&self) -> &Conn<M> {
        &self.pooled().conn
    }
}

impl<M: ManageConnection> DerefMut for Lease<M> {
    fn deref_mut(&mut self) -> &mut Conn<M> {
        &mut self.pooled_mut().conn
    }
}

impl<M: ManageConnection> Lease<M> {
    /// Notes when the connection was checked out, for its `CheckinEvent`; returns its id.
    pub(super) fn checked_out_at(&mut self, now: Instant) -> u64 {
        let pooled = self.pooled_mut();
        pooled.checked_out = Some(now);
        pooled.id
    }
}

impl<M: ManageConnection> Drop for Lease<M> {
    fn drop(&mut self) {
        if let Some(conn) = self.conn.take() {
            if let (Some(events), Some(since)) = (&self.pool.events, conn.checked_out) {
                // Before it can be handed out again, as r2d2 reports it.
                if let Some(event) = checkin_event(conn.id, sync::now() - since) {
                    events.handle_checkin(event);
                }
            }
            self.pool.put_back(conn);
        }
    }
}

impl<M: ManageConnection> Shared<M> {
    /// Whether a connection's age matters: only then is the clock read on checkout and
    /// return.
    pub(super) fn ages(&self) -> bool {
        self.settings.idle_timeout.is_some() || self.settings.max_lifetime.is_some()
    }

    pub(super) fn is_stale(&self, conn: &Pooled<M>, now: Instant) -> bool {
        let settings = &self.settings;
        settings
            .idle_timeout
            .zip(conn.idle_since)
            .is_some_and(|(timeout, since)| now - since >= timeout)
            || settings
                .max_lifetime
                .is_some_and(|lifetime| now - conn.birth >= lifetime)
    }

    /// Takes idle connections until one can be checked out (see `check_out`); `None` when
    /// none is idle.
    #[inline]
    pub(super) fn take_idle(self: &Arc<Self>) -> Option<Lease<M>> {
        loop {
            if let Some(lease) = self.check_out(self.idle.take_any()?) {
                return Some(lease);
            }
        }
    }

    /// Checks out a connection taken out of its slot or handed over, unless it is of an
    /// earlier release, stale or (with `test_on_check_out`) invalid: then it is closed and
    /// `None` returned. Takes the lock only to close it, or when the pool is not full (to keep
    /// `min_idle`, as r2d2 does after every checkout).
    #[inline]
    pub(super) fn check_out(self: &Arc<Self>, mut conn: Box<Pooled<M>>) -> Option<Lease<M>> {
        // Read after the connection was taken: a `release_idle` that emptied the slots before
        // this took it has counted the release by then.
        sync::seq_cst_pairing();
        let outdated = conn.releases != self.releases.load(Ordering::SeqCst);
        if outdated || (self.ages() && self.is_stale(&conn, sync::now())) {
            self.discard(*conn);
            return None;
        }
        // A connection of the latest release was opened while the pool was in use, so the
        // pool is not dormant: a checkout has nothing to clear. Read after the take, paired
        // with `closing`, which lowers it before `replenish` counts the idle slots.
        if !self.full.load(Ordering::SeqCst) {
            self.replenish(&mut self.lock());
        }
        if self.settings.test_on_check_out {
            // A panic in `is_valid` or the error handler closes the connection the way a failed
            // check does before it unwinds on, so that its count and slot are not lost.
            let checked = std::panic::catch_unwind(AssertUnwindSafe(|| {
                self.manager.is_valid(&mut conn.conn).map_err(|error| {
                    let message = error.to_string();
                    self.error_handler.handle_error(error);
                    message
                })
            }));
            match checked {
                Ok(Ok(())) => {}
                Ok(Err(message)) => {
                    self.lock().last_error = Some(message);
                    self.discard(*conn);
                    return None;
                }
                Err(panic) => {
                    self.discard(*conn);
                    std::panic::resume_unwind(panic);
                }
            }
        }
        Some(self.lease(conn))
    }

    pub(super) fn lease(self: &Arc<Self>, conn: Box<Pooled<M>>) -> Lease<M> {
        Lease {
            pool: Arc::clone(self),
            conn: Some(conn),
        }
    }

    /// Closes a connection taken out of the pool, waking `get` calls that may use its slot.
    /// Its `ReleaseEvent` comes first, so that it precedes the acquire of a connection opened
    /// to replace it (r2d2 reports it after scheduling the replacement, which races).
    pub(super) fn discard(self: &Arc<Self>, mut conn: Pooled<M>) {
        self.report_release(&mut conn);
        let mut state = self.lock();
        self.closing(&mut state, [conn.slot]);
        self.wake_all(state);
        self.close(conn);
    }

    /// Takes a connection back, like r2d2's `put_back`: broken (or past `max_lifetime`) ones,
    /// and those opened before the latest `release_idle`, are closed through the customizer's
    /// `on_release`. Any other goes back into its slot without the lock; only a `get` waiting
    /// for it costs the lock and a wake-up.
    pub(super) fn put_back(self: &Arc<Self>, mut conn: Box<Pooled<M>>) {
        let now = self.ages().then(sync::now);
        let broken = self.manager.has_broken(&mut conn.conn)
            || self
                .settings
                .max_lifetime
                .zip(now)
                .is_some_and(|(lifetime, now)| now - conn.birth >= lifetime);
        if broken || conn.releases != self.releases.load(Ordering::SeqCst) {
            self.discard(*conn);
            return;
        }
        // Idle from now, whether it goes to its slot or to a waiting `get`, which judges it by
        // this.
        conn.idle_since = self.settings.idle_timeout.and(now);
        if self.starving.load(Ordering::SeqCst) {
            match self.hand_over(conn) {
                Some(unwanted) => conn = unwanted,
                None => return,
            }
        }
        self.put_idle(conn);
    }

    /// Puts a connection back into its slot, then closes it if a `release_idle` came first, or
    /// wakes a waiting `get`.
    pub(super) fn put_idle(self: &Arc<Self>, mut conn: Box<Pooled<M>>) {
        loop {
            let (slot, releases) = (conn.slot as usize, conn.releases);
            self.idle.put(slot, conn);
            sync::seq_cst_pairing();
            // Both read after the connection is back in its slot. A `release_idle` that emptied
            // the slots before then has counted the release: the connection is taken out again
            // and closed (unless a `get` or the reaper took it first; either closes it). A `get`
            // that counted itself as waiting before then is woken; one that counts itself later
            // sees the slot full and does not wait.
            if releases == self.releases.load(Ordering::SeqCst) {
                break;
            }
            match self.idle.take(slot) {
                None => return,
                // What the slot holds now may be a newer connection that was given the same
                // slot after ours was closed: that one stays.
                Some(taken) if taken.releases == self.releases.load(Ordering::SeqCst) => {
                    conn = taken;
                }
                Some(taken) => {
                    self.discard(*taken);
                    return;
                }
            }
        }
        if self.waiters.load(Ordering::SeqCst) > 0 {
            // Taking the lock makes sure a waiter, which counted itself under the lock, is
            // asleep by now. The longest waiting of those asleep is woken.
            let state = self.lock();
            if let Some(waiter) = state
                .queue
                .iter()
                .find(|waiter| waiter.wake.asleep.load(Ordering::Relaxed))
            {
                waiter.wake.notify();
            }
        }
    }

    /// Closes a connection through the customizer's `on_release`, after its `ReleaseEvent`
    /// unless that was reported already.
    pub(super) fn close(&self, mut conn: Pooled<M>) {
        self.report_release(&mut conn);
        self.customizer.on_release(conn.conn);
    }

    /// Reports a connection's `ReleaseEvent` to the event handler, once.
    fn report_release(&self, conn: &mut Pooled<M>) {
        if let Some(events) = &self.events {
            if !std::mem::replace(&mut conn.released, true) {
                if let Some(event) = release_event(conn.id, sync::now() - conn.birth) {
                    events.handle_release(event);
                }
            }
        }
    }
}

#[cfg(all(test, not(forksafe_loom)))]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    use super::super::test_support::*;

    /// Threads racing on the lock-free slots and the handover to waiting calls: every
    /// connection is back in its slot afterwards, none was opened twice, and every thread got
    /// a connection within its timeout (each checks out at least once).
    #[test]
    fn every_connection_comes_back_under_contention() {
        for (threads, size) in [(32u32, 32u32), (32, 4), (8, 2), (128, 4)] {
            let manager = Arc::new(Counting::default());
            let pool = reaping_pool(&manager, settings(size));
            pool.wait_for_initial_connections(Duration::from_secs(5))
                .expect("initial connections");
            let stop = Arc::new(AtomicBool::new(false));
            let workers: Vec<_> = (0..threads)
                .map(|_| {
                    let (pool, stop) = (pool.clone(), Arc::clone(&stop));
                    std::thread::spawn(move || {
                        let mut first = true;
                        while first || !stop.load(Ordering::Relaxed) {
                            drop(pool.get_timeout(Duration::from_secs(10)).expect("checkout"));
                            first = false;
                        }
                    })
                })
                .collect();
            std::thread::sleep(Duration::from_millis(200));
            stop.store(true, Ordering::Relaxed);
            for worker in workers {
                worker.join().expect("worker");
            }
            let state = pool.state();
            assert_eq!(
                (state.connections, state.idle_connections),
                (size, size),
                "{threads} threads, pool of {size}"
            );
            assert_eq!(manager.0.load(Ordering::SeqCst), size);
        }
    }
}
