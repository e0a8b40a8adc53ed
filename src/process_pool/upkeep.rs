//! Keeping the pool: filling it for `build` and `warm_up`, closing stale idle connections
//! every `REAPER_RATE` (the reaper), the upkeep thread of a forked child's pool, and
//! `release_idle`.
//!
//! # The upkeep thread of a forked child
//!
//! The building process runs r2d2's background work on its scheduled thread pool, whose
//! threads a forked child does not have. A child's pool starts one thread of its own instead,
//! when the pool is built in that process (its first use there: `get`, `try_get`, `state`,
//! `warm_up`, …; never from the atfork handler, where nothing may be started). It is made with
//! `pthread_create` directly (`sys::spawn_detached`: a std thread start can block on a lock the
//! fork froze) and sleeps on a std `Condvar` (a futex word in the object, nothing registered
//! per thread). It holds only a `Weak` to the pool, and each round it:
//! - reaps every `reaper_rate` (r2d2's 30 s), like the building process's reaper;
//! - tops the pool up to `min_idle` (`replenish`; each attempt on a short-lived thread);
//! - sleeps until the next reaper run, or until a failed attempt's back-off ends
//!   (`Shared::failed` wakes it to learn the new time).
//!
//! The pool's `Drop` tells it to stop; a thread that finds the pool gone when it wakes stops
//! too. Between rounds it holds no strong reference, so a dropped pool's thread ends within
//! one round of its own and only ever touches the `UpkeepSignal` it shares. A fork that
//! catches it (in a round, holding the pool's lock or the signal's) leaves a grandchild that
//! never touches that pool: the grandchild builds a generation of its own, with its own thread.

use std::sync::{Arc, PoisonError, Weak};
use std::time::{Duration, Instant};

use r2d2::ManageConnection;

use super::connecting::{Connector, Destination};
use super::{ProcessPool, Shared};
use crate::r2d2_compat::r2d2_error;
use crate::sync::{self, Condvar, Mutex, Ordering};

/// How often idle connections are checked against `idle_timeout` and `max_lifetime`: r2d2's
/// rate.
pub(crate) const REAPER_RATE: Duration = Duration::from_secs(30);

/// What a forked child's pool and its upkeep thread share: whether the pool is gone, and
/// whether the thread should look again before its next planned wake-up.
pub(crate) struct UpkeepSignal {
    flags: Mutex<UpkeepFlags>,
    changed: Condvar,
}

struct UpkeepFlags {
    /// The pool was dropped: the thread ends.
    stopped: bool,
    /// Something changed the thread's next wake-up (a failure's back-off).
    kicked: bool,
}

impl UpkeepSignal {
    pub(super) fn new() -> UpkeepSignal {
        UpkeepSignal {
            flags: Mutex::new(UpkeepFlags {
                stopped: false,
                kicked: false,
            }),
            changed: Condvar::new(),
        }
    }

    /// Makes the thread start its next round now (or as soon as its current one ends).
    pub(super) fn kick(&self) {
        self.flags
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .kicked = true;
        self.changed.notify_one();
    }

    /// Makes the thread end.
    pub(super) fn stop(&self) {
        self.flags
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .stopped = true;
        self.changed.notify_one();
    }

    /// Sleeps until `until` or a kick; false once the pool is gone.
    fn sleep_until(&self, until: Instant) -> bool {
        let mut flags = self.flags.lock().unwrap_or_else(PoisonError::into_inner);
        loop {
            if flags.stopped {
                return false;
            }
            if flags.kicked {
                flags.kicked = false;
                return true;
            }
            let now = sync::now();
            if now >= until {
                return true;
            }
            flags = self
                .changed
                .wait_timeout(flags, until - now)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }
}

impl<M: ManageConnection> ProcessPool<M> {
    /// Waits until `min_idle` connections are open (all `max_size` when `None`), at most
    /// `timeout`, as r2d2's `build` does; r2d2's error, carrying the last connection error,
    /// when they are not.
    pub(crate) fn wait_for_initial_connections(
        &self,
        timeout: Duration,
    ) -> Result<(), r2d2::Error> {
        self.fill(sync::now() + timeout)
            .map_err(|(last_error, _)| r2d2_error(last_error))
    }

    /// Opens connections until `min_idle` (all `max_size` when `None`) are open or `deadline`
    /// passes, trying again after each failure's back-off, as `build` does; for
    /// `Pool::warm_up`, which also runs in a forked child. On failure, the last connection
    /// error and how many connections were open.
    pub(crate) fn warm_up(&self, deadline: Instant) -> Result<(), (Option<String>, u32)> {
        self.fill(deadline)
    }

    /// `build` and `warm_up`: starts attempts until `min_idle` (all `max_size` when `None`)
    /// connections are open or being opened, each on a thread of its own (the thread pool's in
    /// the building process), and waits for them until `deadline`. An attempt that fails makes
    /// way for another once the back-off has passed.
    pub(super) fn fill(&self, deadline: Instant) -> Result<(), (Option<String>, u32)> {
        let shared = &self.shared;
        let wanted = shared
            .settings
            .min_idle_or_max_size()
            .min(shared.settings.max_size);
        let mut state = shared.lock();
        state.dormant = false;
        loop {
            if state.open >= wanted {
                return Ok(());
            }
            let now = sync::now();
            if now >= deadline {
                return Err((state.last_error.take(), state.open));
            }
            while state.open + state.connecting < wanted
                && state.retry_at.is_none_or(|at| at <= now)
            {
                let releases = shared.reserve_attempt(&mut state);
                drop(state);
                if !shared.start_attempt(releases) {
                    // No thread to be had: connect here.
                    shared.connect_one(Destination::Idle, releases);
                }
                state = shared.lock();
            }
            if state.open < wanted {
                state = shared.wait_until(state, sync::now(), deadline, None);
            }
        }
    }

    /// Closes every idle connection now, and makes every connection opened (or being opened)
    /// before this call close, inside a driver section, when it comes back or arrives, instead
    /// of going idle; opens nothing in the background until the pool is next used. Returns how
    /// many idle connections it closed.
    ///
    /// The pool stays the same object: connections are told apart by the release count at the
    /// time their attempt was reserved, so a release costs no memory and leaves no second
    /// reaper behind, and old and new connections together stay within `max_size`.
    pub(crate) fn release_idle(&self) -> u32 {
        let shared = &self.shared;
        let mut state = shared.lock();
        // Counted before the slots are emptied; a connection put back into its slot meanwhile
        // reads the count after, and takes itself out again (see `put_back`).
        shared.releases.fetch_add(1, Ordering::SeqCst);
        sync::seq_cst_pairing();
        state.dormant = true;
        let idle = shared.idle.take_all();
        shared.closing(&mut state, idle.iter().map(|conn| conn.slot));
        // A waiting `get` may use the freed slots.
        shared.wake_all(state);
        let closed = idle.len() as u32;
        for conn in idle {
            shared.close(*conn);
        }
        closed
    }
}

impl<M: ManageConnection> Shared<M> {
    /// Starts the background work r2d2 does on its threads, until the pool is dropped: in the
    /// building process the reaper, which closes idle connections past `idle_timeout` or
    /// `max_lifetime` every `REAPER_RATE`; in a forked child the upkeep thread (see the module
    /// docs), which also keeps `min_idle` and retries failed attempts.
    pub(super) fn start_upkeep(self: &Arc<Self>) {
        let (threads, reaper_rate) = match &self.connector {
            Connector::ThreadPool {
                threads,
                reaper_rate,
            } => (threads, reaper_rate),
            Connector::Detached {
                upkeep,
                reaper_rate,
            } => {
                let (pool, signal, rate) = (Arc::downgrade(self), Arc::clone(upkeep), *reaper_rate);
                if !crate::sys::spawn_detached(Box::new(move || keep(&pool, &signal, rate))) {
                    tracing::warn!(
                        pid = std::process::id(),
                        "forksafe-pool: no thread could be made for the pool's upkeep in this \
                         process: min_idle is kept and failed connects retried only when a get \
                         needs a connection, and stale idle connections closed only at checkout"
                    );
                }
                return;
            }
            #[cfg(forksafe_loom)]
            Connector::ModelThreads => return,
        };
        if !self.ages() {
            return;
        }
        let pool = Arc::downgrade(self);
        let rate = *reaper_rate;
        threads.execute_at_dynamic_rate(rate, move || {
            Weak::upgrade(&pool)?.reap();
            Some(rate)
        });
    }

    /// One round of the upkeep thread: reaps if `next_reap` has come (and moves it on), tops
    /// the pool up to `min_idle`; returns when the next round is due.
    fn upkeep_round(self: &Arc<Self>, next_reap: &mut Instant, rate: Duration) -> Instant {
        let now = sync::now();
        if now >= *next_reap {
            *next_reap = now + rate;
            if self.ages() {
                // Its `closing` tops the pool up again.
                self.reap();
            }
        }
        let mut state = self.lock();
        self.replenish(&mut state);
        // A back-off in the past starts nothing more (`replenish` just ran): no earlier round.
        match state.retry_at {
            Some(at) if at > now => at.min(*next_reap),
            _ => *next_reap,
        }
    }

    /// Closes the idle connections that are stale or of an earlier release. Each is taken out of its slot to be looked
    /// at; fresh ones go straight back, so a checkout meanwhile may miss one and wait on the
    /// lock held here, then find it.
    pub(super) fn reap(self: &Arc<Self>) {
        let mut state = self.lock();
        let now = sync::now();
        // Stable while the lock is held: only `release_idle` changes it, under the lock.
        let releases = self.releases.load(Ordering::SeqCst);
        let mut stale = Vec::new();
        for conn in self.idle.take_all() {
            // A connection of an earlier release that its returner put back just before the
            // release's count (see `put_idle`) closes here too: put back, it would outlive the
            // release and be inherited by the next fork.
            if conn.releases != releases || self.is_stale(&conn, now) {
                stale.push(conn);
            } else {
                self.idle.put(conn.slot as usize, conn);
            }
        }
        self.closing(&mut state, stale.iter().map(|conn| conn.slot));
        drop(state);
        for conn in stale {
            self.close(*conn);
        }
    }
}

/// The upkeep thread of a forked child's pool (see the module docs): rounds until the pool is
/// gone.
fn keep<M: ManageConnection>(pool: &Weak<Shared<M>>, signal: &UpkeepSignal, rate: Duration) {
    let mut next_reap = sync::now() + rate;
    loop {
        let wake_at = match pool.upgrade() {
            // The last reference may be this one: the pool is then dropped here, and its `Drop`
            // stops this thread at `sleep_until`.
            Some(pool) => pool.upkeep_round(&mut next_reap, rate),
            None => return,
        };
        if !signal.sleep_until(wake_at) {
            return;
        }
    }
}

#[cfg(all(test, not(forksafe_loom)))]
mod tests {
    use std::sync::atomic::Ordering;
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use super::super::test_support::*;
    use crate::config::Settings;

    #[test]
    fn the_reaper_replaces_idle_connections_past_idle_timeout() {
        let manager = Arc::new(Counting::default());
        let pool = reaping_pool(
            &manager,
            Settings {
                min_idle: Some(2),
                idle_timeout: Some(Duration::from_millis(50)),
                ..settings(2)
            },
        );
        pool.wait_for_initial_connections(Duration::from_secs(5))
            .expect("initial connections");
        assert_eq!(manager.0.load(Ordering::SeqCst), 2);
        let deadline = Instant::now() + Duration::from_secs(5);
        // Untouched, the idle pair times out, is reaped, and `min_idle` opens another pair.
        while manager.0.load(Ordering::SeqCst) < 4 {
            assert!(Instant::now() < deadline, "nothing reaped");
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(pool.state().connections <= 2, "{:?}", pool.state());
    }

    #[test]
    fn without_a_time_limit_nothing_is_reaped_nor_timestamped() {
        let manager = Arc::new(Counting::default());
        let pool = reaping_pool(&manager, settings(1));
        pool.wait_for_initial_connections(Duration::from_secs(5))
            .expect("initial connection");
        drop(pool.get_timeout(Duration::from_secs(1)).expect("checkout"));
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(
            manager.0.load(Ordering::SeqCst),
            1,
            "a connection was replaced"
        );
        let idle = pool.shared.idle.take_all();
        assert_eq!(idle.len(), 1);
        assert!(idle.iter().all(|conn| conn.idle_since.is_none()));
    }

    #[test]
    fn a_child_pool_reaches_min_idle_without_a_get() {
        let manager = Arc::new(Counting::default());
        let pool = child_pool(
            &manager,
            Settings {
                min_idle: Some(2),
                ..settings(4)
            },
            Duration::from_secs(30),
        );
        eventually("min_idle not reached", || {
            pool.state().idle_connections == 2
        });
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(manager.0.load(Ordering::SeqCst), 2, "more than min_idle");
        assert!(pool.try_get().is_some());
    }

    #[test]
    fn a_child_pool_retries_failed_connects_until_min_idle() {
        let manager = Arc::new(FailingFirst::default());
        manager.fail_first.store(3, Ordering::SeqCst);
        let pool = child_pool(
            &manager,
            Settings {
                min_idle: Some(1),
                connection_timeout: Duration::from_millis(400),
                ..settings(2)
            },
            Duration::from_secs(30),
        );
        let began = Instant::now();
        eventually("min_idle not reached after failures", || {
            pool.state().idle_connections == 1
        });
        assert_eq!(manager.attempts.load(Ordering::SeqCst), 4);
        // Back-off: 200 ms, then twice at most half the connection timeout (200 ms).
        assert!(
            began.elapsed() >= Duration::from_millis(550),
            "retried without back-off: {:?}",
            began.elapsed()
        );
    }

    #[test]
    fn a_child_pool_reaps_idle_connections_in_the_background() {
        let manager = Arc::new(Counting::default());
        let pool = child_pool(
            &manager,
            Settings {
                min_idle: Some(1),
                idle_timeout: Some(Duration::from_millis(50)),
                ..settings(2)
            },
            Duration::from_millis(20),
        );
        // Untouched, the idle one times out, is reaped, and `min_idle` opens another.
        eventually("nothing reaped", || manager.0.load(Ordering::SeqCst) >= 3);
        assert!(pool.state().connections <= 1, "{:?}", pool.state());
    }

    #[test]
    fn a_dropped_child_pool_ends_its_upkeep_thread() {
        let manager = Arc::new(Counting::default());
        let pool = child_pool(
            &manager,
            Settings {
                min_idle: Some(1),
                idle_timeout: Some(Duration::from_secs(60)),
                ..settings(1)
            },
            Duration::from_secs(3600),
        );
        let super::Connector::Detached { upkeep, .. } = &pool.shared.connector else {
            unreachable!("a child pool");
        };
        let signal = Arc::clone(upkeep);
        eventually("min_idle not reached", || {
            pool.state().idle_connections == 1
        });
        drop(pool);
        // The thread held the other reference; it lets go as it ends, long before its hour.
        eventually("the upkeep thread still runs", || {
            Arc::strong_count(&signal) == 1
        });
    }

    /// A kick that comes while the upkeep thread is in a round is not lost: its next sleep
    /// ends at once; a stop ends it for good.
    #[test]
    fn the_upkeep_signal_keeps_a_kick_and_a_stop() {
        let signal = super::UpkeepSignal::new();
        let hour = Instant::now() + Duration::from_secs(3600);
        signal.kick();
        let began = Instant::now();
        assert!(signal.sleep_until(hour), "a kick ended the thread");
        assert!(
            began.elapsed() < Duration::from_secs(1),
            "the kick was lost"
        );
        assert!(signal.sleep_until(Instant::now() + Duration::from_millis(10)));
        signal.stop();
        assert!(!signal.sleep_until(hour), "a stop did not end the thread");
    }
}
