//! A forked worker's pool is the whole pool, on the no-I/O manager: r2d2's events,
//! `min_idle` from the first touch, the reaper and retries in the background, after a libc or a
//! raw fork, in a grandchild forked while the worker's upkeep runs; and the warning for
//! inherited connections no backend can release. Every backend runs the same worker scenario
//! (`support::backend`).
//!
//! A `harness = false` binary (see `fork_core.rs`).

#[macro_use]
mod support;

use std::time::{Duration, Instant};

use forksafe_pool::Pool;
use support::backend::{child_case, datagram_pair, expect_child_exit, in_child};
use support::events::EventLog;
use support::fork::spawn_raw;
use support::log_capture::Captured;
use support::no_io::NoIoManager;
use support::runner::{run_cases, Case, Check};
use support::scripted::ScriptedManager;
use support::worker_pool::{a_worker_keeps_the_whole_pool, eventually, master_pool};

fn a_worker_keeps_the_whole_pool_no_io() -> Check {
    let events = EventLog::default();
    let pool = master_pool(NoIoManager::default(), &events)?;
    in_child(|| a_worker_keeps_the_whole_pool(&pool, &events))
}

/// The same after a raw `SYS_fork`, which runs no atfork handler.
fn a_worker_of_a_raw_fork_keeps_the_whole_pool() -> Check {
    let events = EventLog::default();
    let pool = master_pool(NoIoManager::default(), &events)?;
    let (report, child_report) = datagram_pair()?;
    let pid = spawn_raw(|| {
        child_case(&child_report, || {
            a_worker_keeps_the_whole_pool(&pool, &events)
        })
    });
    expect_child_exit("raw-forked worker", pid, &report)
}

/// A worker whose pool's upkeep is busy (connections reaped and reopened every few
/// milliseconds) forks a grandchild, 20 times: each grandchild gets the whole pool too.
fn a_grandchild_forked_during_upkeep_keeps_the_whole_pool() -> Check {
    let events = EventLog::default();
    let pool = master_pool(NoIoManager::default(), &events)?;
    in_child(|| {
        drop(pool.get().map_err(|error| format!("worker get: {error}"))?);
        for round in 0..20 {
            in_child(|| a_worker_keeps_the_whole_pool(&pool, &events))
                .map_err(|error| format!("grandchild {round}: {error}"))?;
        }
        Ok(())
    })
}

/// A worker whose first connects fail reaches `min_idle` in the background, trying again
/// after r2d2's back-off, without any `get`.
fn a_worker_retries_failed_connects_until_min_idle() -> Check {
    let manager = ScriptedManager::default();
    let pool = Pool::builder()
        .max_size(3)
        .min_idle(Some(2))
        .connection_timeout(Duration::from_millis(800))
        .build(manager.clone())
        .map_err(|error| format!("build: {error}"))?;
    in_child(|| {
        manager
            .script()
            .fail_next
            .store(3, std::sync::atomic::Ordering::SeqCst);
        let attempts_before = manager.attempts();
        let began = Instant::now();
        let _ = pool.state();
        eventually(
            "min_idle not reached after failures",
            Duration::from_secs(10),
            || pool.state().idle_connections == 2,
        )?;
        let attempts = manager.attempts() - attempts_before;
        // Two attempts start at once and fail; the back-off (200 ms, then 400 ms = half the
        // timeout) spaces the next.
        ensure!(
            attempts == 5,
            "{attempts} attempts for 3 failures and 2 connections"
        );
        ensure!(
            began.elapsed() >= Duration::from_millis(200),
            "retried without back-off: {:?}",
            began.elapsed()
        );
        ensure!(pool.try_get().is_some(), "try_get found nothing");
        Ok(())
    })
}

/// A worker that inherits connections no backend knows (here the no-I/O manager's, which has
/// no descriptors to name) says so once at `warn` level, naming the type and what to do, however
/// often it uses the pool; a pool with a `descriptor_locator` says nothing.
fn unreleasable_inherited_connections_are_reported_once() -> Check {
    let pool = Pool::builder()
        .max_size(2)
        .build(NoIoManager::default())
        .map_err(|error| format!("build: {error}"))?;
    let located = Pool::builder()
        .max_size(2)
        .descriptor_locator(|_: &mut support::no_io::NoIoConnection| None)
        .build(NoIoManager::default())
        .map_err(|error| format!("build: {error}"))?;
    in_child(|| {
        let captured = Captured::install();
        let _ = pool.state();
        drop(pool.get().map_err(|error| format!("get: {error}"))?);
        pool.release_idle();
        drop(pool.get().map_err(|error| format!("get again: {error}"))?);
        drop(located.get().map_err(|error| format!("get: {error}"))?);
        let warnings = captured.at(tracing::Level::WARN);
        ensure!(
            pool.fork_stats().connections_leaked == 2
                && located.fork_stats().connections_leaked == 2,
            "leaked: {:?} and {:?}",
            pool.fork_stats(),
            located.fork_stats()
        );
        ensure!(
            warnings.len() == 1
                && warnings[0].contains("2 inherited connections of type")
                && warnings[0].contains("NoIoConnection")
                && warnings[0]
                    .contains("no backend knows this type; see Builder::descriptor_locator"),
            "warnings: {warnings:?}"
        );
        Ok(())
    })
}

fn main() {
    let cases: Vec<Case> = vec![
        (
            "a_worker_keeps_the_whole_pool_no_io",
            a_worker_keeps_the_whole_pool_no_io,
        ),
        (
            "a_worker_of_a_raw_fork_keeps_the_whole_pool",
            a_worker_of_a_raw_fork_keeps_the_whole_pool,
        ),
        (
            "a_grandchild_forked_during_upkeep_keeps_the_whole_pool",
            a_grandchild_forked_during_upkeep_keeps_the_whole_pool,
        ),
        (
            "a_worker_retries_failed_connects_until_min_idle",
            a_worker_retries_failed_connects_until_min_idle,
        ),
        (
            "unreleasable_inherited_connections_are_reported_once",
            unreleasable_inherited_connections_are_reported_once,
        ),
    ];
    run_cases(cases);
}
