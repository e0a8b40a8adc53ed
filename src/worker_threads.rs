//! The scheduled thread pools this crate makes itself (r2d2's default: three threads), started
//! so that a `fork()` never copies one of their threads mid-start.
//!
//! Every thread std spawns locks a process-global std mutex while it starts (docs/how-it-works.md,
//! "What a forked child must not do"). A fork that catches a thread there leaves that mutex locked in the child for
//! ever, and every std thread the child then spawns blocks before running a line: an
//! application that builds its pool and forks its workers at once would get, now and then, a
//! worker whose threads never start (measured: 4 to 9 of 1 000 children forked right after a
//! `build` hung in `std::thread::spawn`, in each of four runs). So a thread pool is returned only
//! once each of its threads has run a job, and a libc `fork()` from another thread meanwhile
//! waits for that (the start-up runs inside a driver section).
//!
//! The same lock is taken while a thread exits, and nothing here waits for that: a fork while a
//! thread pool's threads end (right after a `Pool` is dropped, or when a retired generation of a
//! pool with an event handler is freed) can still catch one.
//!
//! No thread pool is started in a process whose ancestor started one
//! ([`an_ancestor_started_thread_pools`]): scheduled-thread-pool parks its idle threads in
//! parking_lot's process-global table, which a child inherits with the parent's parked threads
//! still linked in; the child's new threads reuse those threads' stacks (glibc gives a child the
//! stacks of the threads it lost), thread-local parking data included, and starting a thread
//! pool there cross-links the table: `build` then waits for ever (measured: 1 to 8 of 40
//! children that built a pool while their parent's pool idled, in each of four runs of
//! `tests/build_in_forked_child.rs`; it is also what silenced the forked master of
//! `tests/pgbouncer.rs`'s `master_sigkill_leaves_no_sessions_behind`). A pool built in such a
//! process connects as a forked child's does (see `process_pool`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant};

use scheduled_thread_pool::{OnPoolDropBehavior, ScheduledThreadPool};

use crate::fork::{current_epoch, DriverSection};

/// The epoch of the first process of this lineage that started a thread pool here; 0 if none
/// has. Inherited, so a child sees its ancestor's.
static FIRST_STARTED_IN: AtomicU64 = AtomicU64::new(0);

/// Whether a process this one was forked from (directly or not) started a thread pool of this
/// crate, whose threads may have been parked in parking_lot's table at the fork: then this
/// process must not start one (see the module docs).
pub(crate) fn an_ancestor_started_thread_pools() -> bool {
    let first = FIRST_STARTED_IN.load(Ordering::Acquire);
    first != 0 && first != current_epoch().get()
}

/// r2d2's default number of threads.
const THREADS: usize = 3;

/// How long a new thread pool may take to have all its threads running; past it, the pool is
/// used as it is (a fork may then catch a thread starting, as without this wait).
const START_AT_MOST: Duration = Duration::from_secs(1);

/// r2d2's default thread pool, its threads all running; `on_drop` says what becomes of the jobs
/// still scheduled when it is dropped.
pub(crate) fn started_thread_pool(on_drop: OnPoolDropBehavior) -> ScheduledThreadPool {
    let _section = DriverSection::enter();
    // Before the threads start, so that a child forked from now on sees it.
    let _ = FIRST_STARTED_IN.compare_exchange(
        0,
        current_epoch().get(),
        Ordering::AcqRel,
        Ordering::Acquire,
    );
    let threads = ScheduledThreadPool::builder()
        .num_threads(THREADS)
        .thread_name_pattern("r2d2-worker-{}")
        .on_drop_behavior(on_drop)
        .build();
    wait_until_running(&threads, THREADS, Instant::now() + START_AT_MOST);
    threads
}

/// Gives each of the `count` threads a job that waits until all `count` jobs run, so that each
/// runs on a thread of its own; returns once they all run, or at `deadline`.
fn wait_until_running(threads: &ScheduledThreadPool, count: usize, deadline: Instant) {
    let running = Arc::new((Mutex::new(0usize), Condvar::new()));
    for _ in 0..count {
        let running = Arc::clone(&running);
        threads.execute(move || {
            let (started, changed) = &*running;
            let mut started = started.lock().unwrap_or_else(PoisonError::into_inner);
            *started += 1;
            changed.notify_all();
            wait_for_count(changed, started, count, deadline);
        });
    }
    let (started, changed) = &*running;
    let started = started.lock().unwrap_or_else(PoisonError::into_inner);
    wait_for_count(changed, started, count, deadline);
}

fn wait_for_count(
    changed: &Condvar,
    mut started: std::sync::MutexGuard<'_, usize>,
    count: usize,
    deadline: Instant,
) {
    while *started < count {
        let Some(left) = deadline.checked_duration_since(Instant::now()) else {
            return;
        };
        started = changed
            .wait_timeout(started, left)
            .unwrap_or_else(PoisonError::into_inner)
            .0;
    }
}
