//! A forked worker's pool is the whole pool: r2d2's events, `min_idle` kept from the
//! first touch, and the reaper, all in the background, for the worker's own connections only.
//! Written once for any manager: the no-I/O binary and every server backend run it.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use forksafe_pool::{ManageConnection, Pool};

use super::events::{Event, EventLog};
use super::runner::Check;

/// The reaper's rate in these scenarios (r2d2's 30 s would make each one wait that long).
pub const REAPER_RATE: Duration = Duration::from_millis(50);
pub const IDLE_TIMEOUT: Duration = Duration::from_millis(400);
pub const MIN_IDLE: u32 = 2;
pub const MAX_SIZE: u32 = 3;

/// The master's pool: an event handler (so the master runs on r2d2), `min_idle` 2 of 3, a
/// short idle timeout and reaper rate. One connection was checked out and back.
pub fn master_pool<M: ManageConnection>(manager: M, events: &EventLog) -> Result<Pool<M>, String> {
    let pool = Pool::builder()
        .max_size(MAX_SIZE)
        .min_idle(Some(MIN_IDLE))
        .idle_timeout(Some(IDLE_TIMEOUT))
        .reaper_rate_for_tests(REAPER_RATE)
        .connection_timeout(Duration::from_secs(10))
        .event_handler(Box::new(events.clone()))
        .build(manager)
        .map_err(|error| format!("build: {error}"))?;
    drop(pool.get().map_err(|error| format!("master get: {error}"))?);
    // The checkout left one idle of `min_idle` 2, so r2d2 opens a third on its own threads:
    // a fork before that is logged could catch the log's lock held. (r2d2 reports an acquire
    // before counting the connection.)
    eventually(
        "the master's pool did not settle",
        Duration::from_secs(10),
        || {
            let acquired = events
                .events()
                .iter()
                .filter(|event| matches!(event, Event::Acquire(_)))
                .count();
            pool.state().connections == MAX_SIZE && acquired == MAX_SIZE as usize
        },
    )?;
    Ok(pool)
}

/// Waits until `done` holds, at most `within`; `what` says what did not happen.
pub fn eventually(what: &str, within: Duration, mut done: impl FnMut() -> bool) -> Check {
    let until = Instant::now() + within;
    while !done() {
        ensure!(Instant::now() < until, "{what} (within {within:?})");
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(())
}

/// In a forked worker of [`master_pool`]'s pool (`events` is its log; the worker looks at what
/// comes after the entries it inherited): a quiet worker's first touch (`state`) opens `min_idle` connections in
/// the background (reported as acquires), `try_get` finds one without any `get`; checkouts,
/// checkins and a timeout are reported; left alone, the idle connections pass `idle_timeout`
/// and are closed in the background (releases) and replaced. Every event names a connection
/// this worker acquired: none is for an inherited one.
pub fn a_worker_keeps_the_whole_pool<M: ManageConnection>(
    pool: &Pool<M>,
    events: &EventLog,
) -> Check {
    let at_fork = events.len();
    let state = pool.state();
    ensure!(
        state.connections <= MIN_IDLE,
        "the worker's pool started with {state:?}"
    );
    eventually(
        "min_idle not reached without a get",
        Duration::from_secs(10),
        || pool.state().idle_connections >= MIN_IDLE,
    )?;
    let first = pool.try_get().ok_or("try_get found nothing idle")?;
    drop(first);
    let leases = (0..MAX_SIZE)
        .map(|n| pool.get().map_err(|error| format!("get {n}: {error}")))
        .collect::<Result<Vec<_>, _>>()?;
    ensure!(
        pool.get_timeout(Duration::from_millis(100)).is_err(),
        "a fourth connection out of {MAX_SIZE}"
    );
    drop(leases);
    // Quiet now: the reaper closes the idle ones once past `idle_timeout` and `min_idle` brings
    // new ones.
    eventually(
        "no idle connection was reaped in the background",
        Duration::from_secs(10),
        || {
            events
                .since(at_fork)
                .iter()
                .filter(|event| matches!(event, Event::Release(_)))
                .count()
                >= MIN_IDLE as usize
        },
    )?;
    eventually(
        "min_idle not kept after reaping",
        Duration::from_secs(10),
        || pool.state().idle_connections >= MIN_IDLE,
    )?;
    let seen = events.since(at_fork);
    let count = |kind: fn(&Event) -> bool| seen.iter().filter(|event| kind(event)).count();
    ensure!(
        count(|event| matches!(event, Event::Checkout(_))) == MAX_SIZE as usize
            && count(|event| matches!(event, Event::Checkin(_))) == MAX_SIZE as usize + 1
            && count(|event| matches!(event, Event::Timeout)) == 1
            // `MAX_SIZE` for the checkouts, and at least one to replace a reaped one.
            && count(|event| matches!(event, Event::Acquire(_))) > MAX_SIZE as usize,
        "expected {MAX_SIZE} checkouts, {} checkins (try_get's too), a timeout, more than \
         {MAX_SIZE} acquires: {seen:?}",
        MAX_SIZE + 1
    );
    let mut acquired = BTreeSet::new();
    for event in &seen {
        match *event {
            Event::Acquire(id) => {
                ensure!(
                    acquired.insert(id),
                    "connection {id} acquired twice: {seen:?}"
                );
            }
            Event::Release(id) | Event::Checkout(id) | Event::Checkin(id) => ensure!(
                acquired.contains(&id),
                "an event for connection {id}, not acquired in this worker: {seen:?}"
            ),
            Event::Timeout => {}
        }
    }
    Ok(())
}
