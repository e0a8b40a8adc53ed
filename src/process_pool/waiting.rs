//! A `get` that finds no idle connection: it starts an attempt if it may, and waits.
//!
//! A running thread takes a connection put back at once, before a woken waiter gets a core; r2d2
//! lets threads barge in the same way. So that a waiting `get` is not passed over for ever, the
//! pool keeps its waiting `get` calls in a queue, and the longest waiting one keeps time: once it
//! has waited `FAIR_AFTER` (500 µs, the interval of parking_lot's eventual fairness) it raises
//! `starving`, and the next connection put back is handed straight to it instead of into its
//! slot. The next handover comes no sooner than `FAIR_AFTER` later, so handing over, a context
//! switch each, stays the exception even when many threads wait for a few connections. Each
//! queued `get` sleeps on a condition variable of its own, so a connection put back or handed
//! over wakes one waiter, not all of them (which would then queue for the lock, one context
//! switch each, before the one it was for could run). `benches/contention.rs` (part `wait`)
//! measures the waits this leaves, p99 and maximum, beside r2d2's.
//!
//! A `get` that finds every connection checked out and none being opened yields up to
//! `WAIT_YIELDS` times before it waits: the connection it needs is most often held by a thread
//! waiting for a core.

use std::sync::{Arc, PoisonError};
use std::time::{Duration, Instant};

use r2d2::ManageConnection;

use super::checkout::Lease;
use super::connecting::{Connector, Destination};
use super::state::State;
use super::{Pooled, Shared};
use crate::error_kind::CHILD_NONE_FREE;
use crate::r2d2_compat::r2d2_error;
use crate::sync::{self, AtomicBool, Condvar, MutexGuard, Ordering};

/// A `get` that finds every connection checked out: yields of the core before it waits.
pub(super) const WAIT_YIELDS: u32 = 3;

/// A `get` that has waited this long is handed the next connection put back, and handovers
/// are at least this far apart (see the module docs, "Fairness").
pub(super) const FAIR_AFTER: Duration = Duration::from_micros(500);

/// A `get` waiting for a connection.
#[derive(Clone)]
pub(super) struct Waiter {
    pub(super) ticket: u64,
    /// When it started to wait.
    pub(super) since: Instant,
    /// Its own condition variable, so that a connection handed to it, or put back while it
    /// sleeps, wakes it alone: one shared by all would wake every waiter, and each would have
    /// to take the lock in turn before the one it was for could run.
    pub(super) wake: Arc<Wake>,
}

pub(super) struct Wake {
    pub(super) condvar: Condvar,
    /// Set under the lock just before the waiter sleeps on `condvar`, cleared under the lock by
    /// whoever wakes it: a connection put back wakes a waiter that sleeps, never one that is
    /// awake already (and will look at the slots before it sleeps again).
    pub(super) asleep: AtomicBool,
}

impl Wake {
    /// Wakes the waiter; under the lock.
    pub(super) fn notify(&self) {
        self.asleep.store(false, Ordering::Relaxed);
        self.condvar.notify_one();
    }
}

/// A `get`'s place in the queue: it leaves the queue when the call returns or unwinds, so that
/// a panic in user code never leaves a dead ticket at the front (fairness would stop, and a
/// connection handed to it would be lost, counted open for ever).
struct Seat<'a, M: ManageConnection> {
    pool: &'a Arc<Shared<M>>,
    waiter: Option<Waiter>,
}

impl<M: ManageConnection> Seat<'_, M> {
    fn leave(&mut self) {
        if let Some(waiter) = self.waiter.take() {
            self.pool.leave_queue(waiter.ticket);
        }
    }
}

impl<M: ManageConnection> Drop for Seat<'_, M> {
    fn drop(&mut self) {
        self.leave();
    }
}

impl<M: ManageConnection> State<M> {
    /// Queues a `get` that is about to wait.
    pub(super) fn enqueue(&mut self, now: Instant) -> Waiter {
        let waiter = Waiter {
            ticket: self.next_ticket,
            since: now,
            wake: Arc::new(Wake {
                condvar: Condvar::new(),
                asleep: AtomicBool::new(false),
            }),
        };
        self.next_ticket += 1;
        self.queue.push_back(waiter.clone());
        waiter
    }

    /// When `waiter`, if it is the longest waiting `get`, may have the next connection put back
    /// handed to it: once it has waited `FAIR_AFTER`, and no sooner than `FAIR_AFTER` after
    /// the last handover, so that handing over (a context switch each) stays the exception.
    pub(super) fn fair_turn(&self, waiter: &Waiter, fair_after: Duration) -> Option<Instant> {
        let front = self.queue.front()?;
        (front.ticket == waiter.ticket)
            .then(|| (waiter.since + fair_after).max(self.next_fair_turn))
    }

    /// Wakes the longest waiting `get` if it sleeps, so that it keeps time for fairness.
    pub(super) fn wake_front(&self) {
        if let Some(front) = self.queue.front() {
            if front.wake.asleep.load(Ordering::Relaxed) {
                front.wake.notify();
            }
        }
    }

    /// The connection handed to the `get` holding `ticket`, if any.
    pub(super) fn take_handed(&mut self, ticket: u64) -> Option<Box<Pooled<M>>> {
        let index = self.handed.iter().position(|&(to, _)| to == ticket)?;
        Some(self.handed.swap_remove(index).1)
    }
}

impl<M: ManageConnection> Shared<M> {
    /// Waits, counted as a waiter (see `put_back`), until `deadline` — or, when a failure's
    /// back-off ends sooner and a slot is free for another attempt, until then, so that the
    /// caller can start it (an attempt still running, which may hang, would wake us only when
    /// it ends). A queued `get` (`waiter`) sleeps on its own condition variable, and not at all
    /// if a connection is idle by the time it counts itself as a waiter: one put back before
    /// then may have seen no waiter to wake. `build` and `warm_up` sleep on `changed`.
    pub(super) fn wait_until<'a>(
        &'a self,
        state: MutexGuard<'a, State<M>>,
        now: Instant,
        deadline: Instant,
        waiter: Option<&Wake>,
    ) -> MutexGuard<'a, State<M>> {
        let wake = match state.retry_at {
            Some(at) if at > now && state.open + state.connecting < self.settings.max_size => {
                at.min(deadline)
            }
            _ => deadline,
        };
        self.waiters.fetch_add(1, Ordering::SeqCst);
        // "Count myself, then look at the slots", against a return's "put back, then look at
        // the count".
        sync::seq_cst_pairing();
        let state = match waiter {
            Some(_) if self.idle.any() => state,
            Some(waiter) => {
                waiter.asleep.store(true, Ordering::Relaxed);
                let state = waiter
                    .condvar
                    .wait_timeout(state, wake - now)
                    .unwrap_or_else(PoisonError::into_inner)
                    .0;
                waiter.asleep.store(false, Ordering::Relaxed);
                state
            }
            None => {
                self.changed
                    .wait_timeout(state, wake - now)
                    .unwrap_or_else(PoisonError::into_inner)
                    .0
            }
        };
        self.waiters.fetch_sub(1, Ordering::SeqCst);
        state
    }

    /// The slow half of `get_timeout`: no idle connection was fresh. Starts attempts and waits
    /// for a connection until `deadline`.
    #[cold]
    #[inline(never)]
    pub(super) fn wait_for_connection(
        self: &Arc<Self>,
        deadline: Instant,
        timeout: Duration,
    ) -> Result<Lease<M>, r2d2::Error> {
        // This call's place in the queue, once it has waited; declared before the lock so that
        // a panic in user code (a connect, `is_valid`, a customizer, an error handler) leaves
        // the queue with the lock released.
        let mut seat = Seat {
            pool: self,
            waiter: None,
        };
        let mut state = self.lock();
        self.in_use_again(&mut state);
        let mut my_attempt: Option<u64> = None;
        let mut yields_left = WAIT_YIELDS;
        loop {
            if let Some(conn) = seat
                .waiter
                .as_ref()
                .and_then(|waiter| state.take_handed(waiter.ticket))
            {
                // The handover took it out of the queue.
                seat.waiter = None;
                drop(state);
                if let Some(lease) = self.check_out(conn) {
                    return Ok(lease);
                }
                state = self.lock();
                continue;
            }
            let now = sync::now();
            // One attempt per waiting call at a time: another only once some attempt ended.
            let may_start = my_attempt.is_none_or(|ended| state.attempts_ended != ended);
            if may_start
                && state.open + state.connecting < self.settings.max_size
                && state.retry_at.is_none_or(|at| at <= now)
            {
                my_attempt = Some(state.attempts_ended);
                let releases = self.reserve_attempt(&mut state);
                drop(state);
                // Connect on another thread, so this call still waits no longer than
                // `timeout` when a connect hangs (a server that never answers).
                if !self.start_attempt(releases) {
                    // No thread to be had: connect here; the wait is then the connect's.
                    if let Some(conn) = self.connect_one(Destination::Caller, releases) {
                        seat.leave();
                        return Ok(self.lease(conn));
                    }
                }
            } else if now >= deadline {
                let message = state.last_error.take().or_else(|| {
                    matches!(self.connector, Connector::Detached { .. }).then(|| {
                        format!(
                            "{CHILD_NONE_FREE} in process {} became free within {timeout:?}",
                            std::process::id()
                        )
                    })
                });
                drop(state);
                seat.leave();
                return Err(r2d2_error(message));
            } else if yields_left > 0
                && state.connecting == 0
                && state.open >= self.settings.max_size
            {
                // Every connection is checked out and none is being opened: one comes back
                // soon, most often from a thread waiting for a core. Give it the core (see the
                // module docs, "Under contention").
                yields_left -= 1;
                drop(state);
                sync::yield_now();
            } else {
                let waiter = seat
                    .waiter
                    .get_or_insert_with(|| state.enqueue(now))
                    .clone();
                // Only the longest waiting `get` keeps time for fairness; the others sleep until
                // they are woken or time out, and it wakes the next when it leaves the queue.
                let until = match state.fair_turn(&waiter, self.fair_after) {
                    Some(turn) if turn > now => turn.min(deadline),
                    _ => deadline,
                };
                state = self.wait_until(state, now, until, Some(&waiter.wake));
                if state
                    .fair_turn(&waiter, self.fair_after)
                    .is_some_and(|turn| turn <= sync::now())
                {
                    self.starving.store(true, Ordering::SeqCst);
                }
                drop(state);
            }
            if let Some(lease) = self.take_idle() {
                seat.leave();
                return Ok(lease);
            }
            state = self.lock();
        }
    }

    /// A waiting `get` leaves the queue, taking back any connection handed to it meanwhile.
    pub(super) fn leave_queue(self: &Arc<Self>, ticket: u64) {
        let mut state = self.lock();
        let was_front = state
            .queue
            .front()
            .is_some_and(|front| front.ticket == ticket);
        state.queue.retain(|waiter| waiter.ticket != ticket);
        if was_front {
            // Whatever it raised was for itself: the next in line keeps its own time.
            self.starving.store(false, Ordering::SeqCst);
            state.wake_front();
        }
        let handed = state.take_handed(ticket);
        drop(state);
        if let Some(conn) = handed {
            self.put_back(conn);
        }
    }

    /// Hands a connection put back to the longest waiting `get`; gives it back if none waits.
    #[cold]
    #[inline(never)]
    pub(super) fn hand_over(&self, conn: Box<Pooled<M>>) -> Option<Box<Pooled<M>>> {
        let mut state = self.lock();
        self.starving.store(false, Ordering::SeqCst);
        let Some(waiter) = state.queue.pop_front() else {
            return Some(conn);
        };
        state.handed.push((waiter.ticket, conn));
        state.next_fair_turn = sync::now() + self.fair_after;
        waiter.wake.notify();
        state.wake_front();
        None
    }
}

#[cfg(all(test, not(forksafe_loom)))]
mod tests {
    use std::sync::atomic::Ordering;
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use super::super::test_support::*;
    use crate::config::Settings;

    /// A connection handed to a starving `get` is idle from its return, not from before its
    /// last checkout: with `idle_timeout` 50 ms, a lease held 100 ms while a `get` waits (and,
    /// after 10 ms, asks for a handover) goes to that `get` as it is, and nothing is opened a
    /// second time.
    #[test]
    fn a_connection_handed_over_is_judged_idle_from_its_return() {
        let manager = Arc::new(Counting::default());
        let pool = pool(
            &manager,
            Settings {
                idle_timeout: Some(Duration::from_millis(50)),
                ..settings(1)
            },
            Duration::from_secs(3600),
            Duration::from_millis(10),
        );
        pool.wait_for_initial_connections(Duration::from_secs(5))
            .expect("initial connection");
        let held = pool.get_timeout(Duration::from_secs(1)).expect("checkout");
        let waiter = {
            let pool = pool.clone();
            std::thread::spawn(move || {
                let lease = pool.get_timeout(Duration::from_secs(5)).expect("get");
                *(*lease).conn
            })
        };
        until_queued(&pool, 1);
        // The waiter raises `starving` after 10 ms: the return hands the connection to it.
        let deadline = Instant::now() + Duration::from_secs(5);
        while !pool.shared.starving.load(Ordering::SeqCst) {
            assert!(
                Instant::now() < deadline,
                "the waiter never asked for a handover"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        std::thread::sleep(Duration::from_millis(100));
        let first = *(*held).conn;
        drop(held);
        assert_eq!(
            waiter.join().expect("waiter"),
            first,
            "the waiter got a new one"
        );
        assert_eq!(manager.0.load(Ordering::SeqCst), 1, "connected twice");
    }

    /// A `get` that panics in user code while queued (here `is_valid`, on the connection it was
    /// woken for, just after raising `starving`) leaves the queue and closes what it held: the
    /// next connection put back goes to the slot, not to a dead ticket, and the pool keeps its
    /// full size.
    #[test]
    fn a_get_that_panics_while_queued_leaves_the_queue() {
        let manager = Arc::new(PanickyCheck::default());
        let pool = pool(
            &manager,
            Settings {
                test_on_check_out: true,
                ..settings(2)
            },
            Duration::from_secs(3600),
            Duration::ZERO,
        );
        pool.wait_for_initial_connections(Duration::from_secs(5))
            .expect("initial connections");
        let first = pool.get_timeout(Duration::from_secs(1)).expect("checkout");
        let second = pool.get_timeout(Duration::from_secs(1)).expect("checkout");
        let waiter = {
            let pool = pool.clone();
            std::thread::spawn(move || drop(pool.get_timeout(Duration::from_secs(5))))
        };
        until_queued(&pool, 1);
        manager.panics.store(true, Ordering::SeqCst);
        drop(first);
        assert!(
            waiter.join().is_err(),
            "is_valid did not panic in the waiter"
        );
        manager.panics.store(false, Ordering::SeqCst);
        drop(second);
        {
            let state = pool.shared.lock();
            assert!(state.queue.is_empty(), "a dead get stays queued");
            assert!(state.handed.is_empty(), "a connection went to a dead get");
        }
        assert!(!pool.shared.starving.load(Ordering::SeqCst));
        let both = [
            pool.get_timeout(Duration::from_secs(1)),
            pool.get_timeout(Duration::from_secs(1)),
        ];
        assert!(both.iter().all(Result::is_ok), "the pool lost a connection");
    }

    /// A connection put back while `get` calls wait reaches one of them (woken by the return,
    /// or at the latest by the longest waiting one's fairness timer), never left idle while
    /// they sleep out their 10 s timeout; 300 times, the return racing the waiters' going to
    /// sleep.
    #[test]
    fn a_connection_put_back_wakes_a_waiting_get() {
        let manager = Arc::new(Counting::default());
        let pool = reaping_pool(&manager, settings(1));
        pool.wait_for_initial_connections(Duration::from_secs(5))
            .expect("initial connection");
        for round in 0..300u64 {
            let held = pool.get_timeout(Duration::from_secs(1)).expect("checkout");
            let waiters: Vec<_> = (0..2)
                .map(|_| {
                    let pool = pool.clone();
                    std::thread::spawn(move || {
                        let began = Instant::now();
                        drop(pool.get_timeout(Duration::from_secs(10)).expect("checkout"));
                        began.elapsed()
                    })
                })
                .collect();
            // From "before the waiters sleep" to "long after".
            std::thread::sleep(Duration::from_micros(round % 30 * 50));
            drop(held);
            for waiter in waiters {
                let waited = waiter.join().expect("waiter");
                assert!(
                    waited < Duration::from_secs(2),
                    "round {round}: a get waited {waited:?} for a connection put back"
                );
            }
        }
    }
}
