//! Loom models of the pool's lock-free parts: every interleaving of a few threads, up to a
//! bound of preemptions, on the shipped code (`crate::sync` hands it loom's primitives). Run by
//! `scripts/loom`, which CI runs:
//!
//! ```text
//! RUSTFLAGS="--cfg forksafe_loom" LOOM_MAX_PREEMPTIONS=3 cargo test --lib --release -- models_
//! ```
//!
//! Each model starts from a pool in a known state (connections opened by the model's own
//! threads: `Connector::ModelThreads`), runs the racing calls on threads of the model, and then
//! checks the invariants of the module docs: counts and places agree, nothing of an earlier
//! `release_idle` is left idle, no connection of the latest release is closed, nobody waits for
//! nothing (loom reports a deadlock when every thread sleeps), and `min_idle` is kept.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool as StdAtomicBool, AtomicU32 as StdAtomicU32};
use std::sync::{Arc, Mutex as StdMutex};
use std::time::Duration;

use loom::thread;
use r2d2::{CustomizeConnection, ManageConnection};

use super::{Connector, Hooks, ProcessPool};
use crate::config::Settings;
use crate::descriptors::DescriptorTable;
use crate::manager::{CustomizerAdapter, ErrorHandlerAdapter, ForkSafeManager};
use crate::stats::Counters;
use crate::sync::{model_clock, Ordering};

/// Longer than any model runs on its clock: a `get` that is not meant to time out.
const LONG: Duration = Duration::from_secs(3600);

/// Connections are numbers, in the order they were opened; a connection is broken while
/// `broken` is set. (std atomics: bookkeeping of the model, not part of what is checked.)
#[derive(Debug, Default)]
struct Numbered {
    opened: StdAtomicU32,
    broken: StdAtomicBool,
}

impl ManageConnection for Numbered {
    type Connection = u32;
    type Error = std::io::Error;

    fn connect(&self) -> Result<u32, std::io::Error> {
        Ok(self
            .opened
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst))
    }

    fn is_valid(&self, _: &mut u32) -> Result<(), std::io::Error> {
        Ok(())
    }

    fn has_broken(&self, _: &mut u32) -> bool {
        self.broken.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// Records the numbers of the connections the pool closes. (A std mutex: loom runs one thread
/// at a time and switches only at its own primitives, so it is never contended.)
#[derive(Debug, Default)]
struct Closed(StdMutex<BTreeSet<u32>>);

impl CustomizeConnection<u32, std::io::Error> for Closed {
    fn on_release(&self, conn: u32) {
        self.0.lock().unwrap().insert(conn);
    }
}

impl Closed {
    fn numbers(&self) -> BTreeSet<u32> {
        self.0.lock().unwrap().clone()
    }
}

struct Model {
    pool: ProcessPool<Numbered>,
    manager: Arc<Numbered>,
    closed: Arc<Closed>,
}

/// A pool of at most `max_size` that keeps `min_idle` on the model's threads and hands a
/// connection over to a `get` that has waited `fair_after` on the model's clock.
fn model(max_size: u32, min_idle: u32, fair_after: Duration) -> Model {
    let manager = Arc::new(Numbered::default());
    let closed = Arc::new(Closed::default());
    let settings = Settings {
        max_size,
        min_idle: Some(min_idle),
        test_on_check_out: false,
        max_lifetime: None,
        idle_timeout: None,
        connection_timeout: LONG,
    };
    let pool = ProcessPool::with_fairness(
        ForkSafeManager::new(
            Arc::clone(&manager),
            DescriptorTable::new(max_size, Arc::new(Counters::default())),
            None,
            None,
            Arc::new(std::sync::atomic::AtomicBool::new(false)),
        ),
        settings,
        Connector::ModelThreads,
        Hooks {
            error_handler: Box::new(ErrorHandlerAdapter(Arc::new(r2d2::NopErrorHandler))),
            customizer: Box::new(CustomizerAdapter(
                Arc::clone(&closed) as Arc<dyn CustomizeConnection<u32, std::io::Error>>
            )),
            events: None,
        },
        fair_after,
    );
    Model {
        pool,
        manager,
        closed,
    }
}

impl Model {
    /// Waits (yielding to the model's other threads) until no attempt is running.
    fn settle(&self) {
        while self.pool.shared.lock().connecting > 0 {
            thread::yield_now();
        }
    }

    /// The counts agree with the places: every open connection is idle in its own slot or one
    /// of `leased`, nothing is handed to a `get` that left, nobody is queued, and `full` says
    /// what the counts say.
    fn check_counts(&self, leased: u32) {
        let shared = &self.pool.shared;
        let state = shared.lock();
        let idle = shared.idle.count() as u32;
        assert_eq!(state.open, idle + leased, "open {} idle {idle}", state.open);
        assert!(state.open <= shared.settings.max_size);
        assert!(state.queue.is_empty(), "a get is still queued");
        assert!(state.handed.is_empty(), "a connection was handed to nobody");
        assert_eq!(
            shared.full.load(Ordering::SeqCst),
            state.open + state.connecting >= shared.settings.max_size
        );
        assert_eq!(
            state.open + state.free_slots.len() as u32,
            shared.settings.max_size,
            "a slot number was lost or given twice"
        );
    }

    /// Every idle connection, taken out to be looked at and put back.
    fn idle_numbers_and_releases(&self) -> Vec<(u32, u64)> {
        let shared = &self.pool.shared;
        let taken = shared.idle.take_all();
        let seen = taken
            .iter()
            .map(|conn| (*conn.conn.conn, conn.releases))
            .collect();
        for conn in taken {
            shared.idle.put(conn.slot as usize, conn);
        }
        seen
    }
}

/// A `get` waits for the only connection; the main thread returns it while another thread
/// barges in on the fast path. No interleaving leaves the waiter asleep beside an idle
/// connection, and the counts agree afterwards.
fn a_return_reaches_a_waiting_get_past_a_barging_thread(fair_after: Duration) {
    loom::model(move || {
        let model = model(1, 0, fair_after);
        let held = model.pool.get_timeout(LONG).expect("first connection");
        let waiter = {
            let pool = model.pool.clone();
            thread::spawn(move || drop(pool.get_timeout(LONG).expect("a waiting get")))
        };
        let barging = {
            let pool = model.pool.clone();
            thread::spawn(move || drop(pool.try_get()))
        };
        drop(held);
        waiter.join().unwrap();
        barging.join().unwrap();
        model.check_counts(0);
        assert_eq!(
            model
                .manager
                .opened
                .load(std::sync::atomic::Ordering::SeqCst),
            1
        );
    });
}

/// Without fairness: the return puts the connection back into its slot.
#[test]
fn models_a_return_reaches_a_waiting_get_past_a_barging_thread() {
    a_return_reaches_a_waiting_get_past_a_barging_thread(LONG);
}

/// With fairness at once: the waiter asks for a handover as soon as it wakes, and the return
/// may hand its connection over instead of putting it back.
#[test]
fn models_a_handover_reaches_a_waiting_get_past_a_barging_thread() {
    a_return_reaches_a_waiting_get_past_a_barging_thread(Duration::ZERO);
}

/// A handover to a `get` whose deadline passes meanwhile (the model's timer moves the clock past
/// it and wakes the waiters, as a timeout would): whether the `get` takes the connection or gives
/// up, the connection ends idle in its slot and the `get` leaves the queue.
#[test]
fn models_a_handover_to_a_get_that_times_out() {
    loom::model(|| {
        let model = model(1, 0, Duration::ZERO);
        let held = model.pool.get_timeout(LONG).expect("first connection");
        let waiter = {
            let pool = model.pool.clone();
            thread::spawn(move || drop(pool.get_timeout(Duration::from_secs(1))))
        };
        let timer = {
            let pool = model.pool.clone();
            thread::spawn(move || {
                model_clock::advance(Duration::from_secs(2));
                pool.shared.wake_all(pool.shared.lock());
            })
        };
        drop(held);
        waiter.join().unwrap();
        timer.join().unwrap();
        model.check_counts(0);
        assert_eq!(model.pool.state().idle_connections, 1);
    });
}

/// A return racing `release_idle` and the reaper: the connection, opened before the release,
/// is closed whoever takes it last, and nothing of the earlier release is left idle (to be
/// inherited by the next fork).
#[test]
fn models_a_return_racing_release_idle_and_the_reaper() {
    loom::model(|| {
        let model = model(1, 0, LONG);
        let held = model.pool.get_timeout(LONG).expect("first connection");
        let returner = thread::spawn(move || drop(held));
        let releaser = {
            let pool = model.pool.clone();
            thread::spawn(move || {
                pool.release_idle();
            })
        };
        model.pool.shared.reap();
        returner.join().unwrap();
        releaser.join().unwrap();
        let releases = model.pool.shared.releases.load(Ordering::SeqCst);
        for (number, of_release) in model.idle_numbers_and_releases() {
            assert_eq!(
                of_release, releases,
                "connection {number} of an earlier release is idle"
            );
        }
        model.check_counts(0);
        assert_eq!(model.closed.numbers(), BTreeSet::from([0]));
    });
}

/// A return racing `release_idle` and a `get` after it: a returner that finds its slot taken
/// again after the release closes its own connection, never the newer one the `get` opened
/// into the same slot.
#[test]
fn models_a_returner_leaves_a_newer_connection_in_its_slot() {
    loom::model(|| {
        let model = model(1, 0, LONG);
        let held = model.pool.get_timeout(LONG).expect("first connection");
        let pool = model.pool.clone();
        let user = thread::spawn(move || {
            pool.release_idle();
            drop(
                pool.get_timeout(LONG)
                    .expect("a connection after the release"),
            );
        });
        // The returner is the main thread: loom allows five threads, the attempts take two
        // (three when the newer connection is closed by mistake).
        drop(held);
        user.join().unwrap();
        model.settle();
        model.check_counts(0);
        assert!(
            model.closed.numbers().iter().all(|&number| number == 0),
            "a connection of the latest release was closed: {:?}",
            model.closed.numbers()
        );
    });
}

/// A checkout that leaves fewer than `min_idle` idle racing the close of a broken connection:
/// whichever way they interleave, someone tops the pool up, so `min_idle` holds once the
/// attempts have ended.
#[test]
fn models_min_idle_kept_when_a_checkout_races_a_close() {
    loom::model(|| {
        let model = model(2, 1, LONG);
        let first = model.pool.get_timeout(LONG).expect("first connection");
        model.settle();
        // Now: one checked out, one idle (`min_idle`), the pool full. (The close runs on the
        // model's main thread: loom allows five threads, and the attempts take three.)
        let pool = model.pool.clone();
        let checkout = thread::spawn(move || pool.try_get());
        model
            .manager
            .broken
            .store(true, std::sync::atomic::Ordering::SeqCst);
        drop(first);
        let second = checkout.join().unwrap();
        model
            .manager
            .broken
            .store(false, std::sync::atomic::Ordering::SeqCst);
        model.settle();
        let leased = u32::from(second.is_some());
        model.check_counts(leased);
        assert!(
            model.pool.shared.idle.count() >= 1,
            "min_idle not kept: {:?}",
            model.pool.state()
        );
        drop(second);
    });
}
