//! Keeping the pool: filling it for `build` and `warm_up`, closing stale idle connections
//! every `REAPER_RATE` (the reaper, in the building process), and `release_idle`.

use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use r2d2::ManageConnection;

use super::connecting::{Connector, Destination};
use super::{ProcessPool, Shared};
use crate::r2d2_compat::r2d2_error;
use crate::sync::{self, Ordering};

/// How often idle connections are checked against `idle_timeout` and `max_lifetime` in the
/// building process: r2d2's rate.
pub(crate) const REAPER_RATE: Duration = Duration::from_secs(30);

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
    /// In the building process, closes idle connections past `idle_timeout` or
    /// `max_lifetime` every `REAPER_RATE`, like r2d2's reaper, until the pool is dropped.
    pub(super) fn start_reaper(self: &Arc<Self>) {
        let Connector::ThreadPool {
            threads,
            reaper_rate,
        } = &self.connector
        else {
            return;
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
}
