//! The pool's explicit lifecycle across real forks, against the fake server that records which
//! process wrote what on which connection: `release_idle` before forking (Unicorn's
//! `before_fork`), `warm_up` right after (uWSGI's `@postfork`), and `OnFork::Fail`.
//!
//! A `harness = false` binary (see `fork_core.rs`).

#[macro_use]
mod support;

use std::collections::BTreeSet;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use forksafe_pool::{OnFork, Pool};
use scheduled_thread_pool::ScheduledThreadPool;
use support::fake_server::{
    fake_pool, only_we_wrote_on, refused_at_once, warm_connections, FakeConnection, FakeServer,
};
use support::fork::{reap, run_child, spawn_child, ChildEnd};
use support::inspect::{points_at_dev_null, resident_bytes, threads_named};
use support::no_io::NoIoManager;
use support::runner::{child_result, expect_exit, run_cases, Case, Check};

const DEADLINE: Duration = Duration::from_secs(20);

/// Waits until the server has seen every connection in `ids` closed by every process.
fn wait_closed(server: &FakeServer, ids: &BTreeSet<u64>) -> Check {
    let until = Instant::now() + Duration::from_secs(5);
    loop {
        let closed: BTreeSet<u64> = server.closed().into_iter().collect();
        if ids.is_subset(&closed) {
            return Ok(());
        }
        ensure!(
            Instant::now() < until,
            "connections {ids:?} still open; closed: {closed:?}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn release_idle_before_fork_leaves_children_nothing_to_discard() -> Check {
    let server = FakeServer::start();
    let pool = fake_pool(server.manager(), 4);
    let (ids, _) = warm_connections(&pool, 4)?;
    let closed = pool.release_idle();
    ensure!(
        closed == 4,
        "release_idle closed {closed} connections, expected 4"
    );
    // The master's sessions end now, with the driver's own goodbye from the master.
    wait_closed(&server, &ids)?;
    let me = std::process::id();
    let lines = server.lines();
    for id in &ids {
        let last = lines.get(id).and_then(|lines| lines.last());
        ensure!(
            last.is_some_and(|line| line.op == "goodbye" && line.pid == me),
            "connection {id} did not end with the master's goodbye: {last:?}"
        );
    }
    ensure!(
        pool.release_idle() == 0,
        "a second release_idle found something to close"
    );

    let end = run_child(DEADLINE, || {
        child_result((|| {
            let mut conn = pool.get().map_err(|error| format!("child get: {error}"))?;
            conn.check_own("child", &ids, "the master's")?;
            conn.echo("child")?;
            let stats = pool.fork_stats();
            ensure!(
                stats.forks_crossed == 1,
                "forks_crossed {}",
                stats.forks_crossed
            );
            ensure!(
                stats.connections_discarded == 0,
                "the child discarded {} connections",
                stats.connections_discarded
            );
            ensure!(
                stats.sockets_released == 0,
                "the child released {} sockets",
                stats.sockets_released
            );
            Ok(())
        })())
    });
    expect_exit("child", end, 0)?;

    // The master reconnects on demand, with new connections.
    let mut conn = pool
        .get()
        .map_err(|error| format!("master get after release: {error}"))?;
    conn.check_own("master", &ids, "a released")?;
    conn.echo("master")?;
    ensure!(
        pool.fork_stats().forks_crossed == 0,
        "the master counted a fork: {:?}",
        pool.fork_stats()
    );
    Ok(())
}

fn release_idle_closes_a_leased_connection_when_it_is_returned() -> Check {
    let server = FakeServer::start();
    let pool = fake_pool(server.manager(), 2);
    let (ids, _) = warm_connections(&pool, 2)?;
    let mut leased = pool.get().map_err(|error| format!("get: {error}"))?;
    let leased_id = leased.server_id;
    let closed = pool.release_idle();
    ensure!(
        closed == 1,
        "release_idle closed {closed} connections, expected the 1 idle one"
    );
    wait_closed(
        &server,
        &ids.iter().copied().filter(|id| *id != leased_id).collect(),
    )?;
    // Still usable while leased...
    leased.echo("still mine")?;
    ensure!(
        !server.closed().contains(&leased_id),
        "the leased connection was closed under its user"
    );
    // ...and closed, not pooled, once returned.
    drop(leased);
    wait_closed(&server, &ids)?;
    let conn = pool
        .get()
        .map_err(|error| format!("get after release: {error}"))?;
    ensure!(
        !ids.contains(&conn.server_id),
        "got a released connection {}",
        conn.server_id
    );
    Ok(())
}

/// A worker (whose pool is the one rebuilt after fork) releasing before it forks in turn.
fn release_idle_in_a_worker_before_it_forks() -> Check {
    let server = FakeServer::start();
    let pool = fake_pool(server.manager(), 2);
    warm_connections(&pool, 2)?;
    let worker = spawn_child(|| {
        child_result((|| {
            let (worker_ids, _) = warm_connections(&pool, 2)?;
            let closed = pool.release_idle();
            ensure!(closed == 2, "the worker's release_idle closed {closed}");
            let discarded_before = pool.fork_stats().connections_discarded;
            let grandchild = run_child(DEADLINE, || {
                child_result((|| {
                    let mut conn = pool
                        .get()
                        .map_err(|error| format!("grandchild get: {error}"))?;
                    ensure!(
                        conn.opened_by == std::process::id(),
                        "grandchild got {}'s connection",
                        conn.opened_by
                    );
                    conn.echo("grandchild")?;
                    let discarded = pool.fork_stats().connections_discarded - discarded_before;
                    ensure!(discarded == 0, "the grandchild discarded {discarded}");
                    Ok(())
                })())
            });
            ensure!(
                grandchild == ChildEnd::Exited(0),
                "grandchild ended {grandchild:?}"
            );
            // A forked process's pool opens connections on demand; warm_up opens `min_idle`.
            pool.warm_up()
                .map_err(|error| format!("worker warm_up after release: {error}"))?;
            let mut conn = pool
                .get()
                .map_err(|error| format!("worker get after release: {error}"))?;
            ensure!(
                !worker_ids.contains(&conn.server_id),
                "the worker got a released connection"
            );
            conn.echo("worker")?;
            Ok(())
        })())
    });
    expect_exit("worker", reap(worker, DEADLINE), 0)?;
    // The worker's first two connections ended with its own goodbye, before anything else
    // happened on them (the server only runs here, so the check is made here).
    let worker = worker.as_raw() as u32;
    let lines = server.lines();
    let mut opened: Vec<_> = lines
        .iter()
        .filter(|(_, lines)| lines.first().is_some_and(|line| line.pid == worker))
        .collect();
    opened.sort_by_key(|(id, _)| **id);
    // Two before the release, then the new pool's `min_idle` of two, opened by `warm_up`.
    ensure!(
        opened.len() == 4,
        "the worker opened {} connections, expected 4",
        opened.len()
    );
    for (id, lines) in &opened[..2] {
        let ops: Vec<_> = lines
            .iter()
            .map(|line| (line.pid, line.op.as_str()))
            .collect();
        ensure!(
            ops.last() == Some(&(worker, "goodbye")) && ops.iter().all(|(pid, _)| *pid == worker),
            "released connection {id}: {ops:?}"
        );
    }
    Ok(())
}

/// Which inner pool the building process runs on: this crate's own, or r2d2's (a pool with an
/// event handler).
#[derive(Clone, Copy, Debug)]
enum Inner {
    Std,
    R2d2,
}

impl Inner {
    fn builder<M: r2d2::ManageConnection>(self) -> forksafe_pool::Builder<M> {
        let builder = Pool::builder();
        match self {
            Inner::Std => builder,
            Inner::R2d2 => builder.event_handler(Box::new(forksafe_pool::NopEventHandler)),
        }
    }
}

/// A pool whose every `get` after `release_idle` races the background connects that bring it
/// back to `min_idle`.
fn no_io_pool(inner: Inner, manager: &NoIoManager) -> Result<Pool<NoIoManager>, String> {
    inner
        .builder()
        .max_size(3)
        .connection_timeout(Duration::from_secs(5))
        .build(manager.clone())
        .map_err(|error| format!("build: {error}"))
}

/// Connects still running when `release_idle` is called (the background top-ups to `min_idle`
/// a `get` started, a lease held across the call) end up closed, not parked in the pool.
fn release_idle_leaves_nothing_open_once_connects_in_flight_end(inner: Inner) -> Check {
    let manager = NoIoManager::default();
    let pool = no_io_pool(inner, &manager)?;
    let mut held = None;
    for cycle in 0..200 {
        pool.release_idle();
        let conn = pool
            .get()
            .map_err(|error| format!("cycle {cycle}: get: {error}"))?;
        // Every tenth lease stays out across the next `release_idle`.
        held = if cycle % 10 == 0 { Some(conn) } else { None };
    }
    drop(held);
    pool.release_idle();
    if let Err(live) = manager.all_closed_within(Duration::from_secs(5)) {
        return Err(format!(
            "{live} connections still open after the last release_idle; state {:?}",
            pool.state()
        ));
    }
    ensure!(
        pool.state().connections == 0,
        "the pool counts connections that are closed: {:?}",
        pool.state()
    );
    // And it still serves, within `max_size`.
    let conns: Vec<_> = (0..3)
        .map(|_| pool.get().map_err(|error| format!("get after: {error}")))
        .collect::<Result<_, _>>()?;
    ensure!(
        manager.live() <= 3,
        "{} open for max_size 3",
        manager.live()
    );
    drop(conns);
    Ok(())
}

/// `state` is no use of the pool: after `release_idle` it reports nothing open and opens
/// nothing, where a `get` would open `min_idle` connections again.
fn state_after_release_idle_opens_nothing(inner: Inner) -> Check {
    let manager = NoIoManager::default();
    let pool = no_io_pool(inner, &manager)?;
    pool.release_idle();
    manager
        .all_closed_within(Duration::from_secs(5))
        .map_err(|live| format!("{live} connections open after release_idle"))?;
    for _ in 0..10 {
        let state = pool.state();
        ensure!(
            state.connections == 0,
            "state after release_idle: {state:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    ensure!(
        manager.live() == 0,
        "{} connections opened after state()",
        manager.live()
    );
    drop(pool.get().map_err(|error| format!("get: {error}"))?);
    ensure!(manager.live() > 0, "get opened nothing");
    Ok(())
}

/// Each `release_idle` cycle costs no memory that outlives it. On r2d2 each cycle retires a
/// generation (an r2d2 pool and its threads) and the next `get` builds another.
fn release_idle_cycles_keep_memory_bounded(inner: Inner) -> Check {
    const CYCLES: usize = 10_000;
    // 420 bytes a cycle: less than one inner pool (its state, descriptor table, reaper job)
    // or a few connections kept per cycle, far more than allocator noise.
    const ALLOWED_GROWTH: u64 = 4 << 20;
    let manager = NoIoManager::default();
    let pool = no_io_pool(inner, &manager)?;
    let cycle = |cycle: usize| -> Check {
        pool.release_idle();
        pool.get()
            .map(drop)
            .map_err(|error| format!("cycle {cycle}: get: {error}"))
    };
    // Warm the allocator and the thread pool first, so the baseline holds their steady state.
    (0..1_000).try_for_each(cycle)?;
    let before = resident_bytes()?;
    (0..CYCLES).try_for_each(cycle)?;
    pool.release_idle();
    let after = resident_bytes()?;
    let growth = after.saturating_sub(before);
    println!(
        "  resident set over {CYCLES} release_idle cycles: {} -> {} KiB",
        before >> 10,
        after >> 10
    );
    ensure!(
        growth <= ALLOWED_GROWTH,
        "{CYCLES} release_idle cycles grew the resident set by {} KiB ({} -> {} KiB), {} \
         connections open",
        growth >> 10,
        before >> 10,
        after >> 10,
        manager.live()
    );
    Ok(())
}

/// Waits up to five seconds for `done`; `what` says what it waited for when it times out.
fn wait_until(what: impl Fn() -> String, done: impl Fn() -> bool) -> Check {
    let until = Instant::now() + Duration::from_secs(5);
    while !done() {
        ensure!(Instant::now() < until, "{}", what());
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(())
}

/// On r2d2 with a thread pool of the user's: every generation `release_idle` retired lets go
/// of its r2d2 pool once its connections are closed. An r2d2 pool keeps the thread pool in its
/// configuration, so the thread pool's reference count tells whether retired ones are alive;
/// r2d2's reconnect retries for a pool end once that pool is gone.
fn release_idle_on_r2d2_lets_each_retired_generation_go() -> Check {
    let threads = Arc::new(ScheduledThreadPool::new(2));
    let manager = NoIoManager::default();
    let pool = Inner::R2d2
        .builder()
        .max_size(3)
        .connection_timeout(Duration::from_secs(5))
        .thread_pool(Arc::clone(&threads))
        .build(manager.clone())
        .map_err(|error| format!("build: {error}"))?;
    // This test's reference, the pool's configuration, and what one generation holds.
    let one_generation = Arc::strong_count(&threads);
    // Two more threads check out and read the state meanwhile, so generations are retired
    // while other threads use them. (Without waiting: a `get` waiting in a generation that is
    // retired waits out its timeout.)
    let stop = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|scope| -> Check {
        let users: Vec<_> = (0..2)
            .map(|_| {
                scope.spawn(|| {
                    while !stop.load(Ordering::Relaxed) {
                        drop(pool.try_get());
                        std::hint::black_box(pool.state());
                    }
                })
            })
            .collect();
        let mut held = None;
        let cycles = (0..200).try_for_each(|cycle| {
            pool.release_idle();
            let conn = pool
                .get()
                .map_err(|error| format!("cycle {cycle}: get: {error}"))?;
            // Every tenth lease stays out across the next `release_idle`.
            held = if cycle % 10 == 0 { Some(conn) } else { None };
            Ok(())
        });
        drop(held);
        stop.store(true, Ordering::Relaxed);
        for user in users {
            user.join()
                .map_err(|_| "another thread panicked".to_string())?;
        }
        cycles
    })?;
    wait_until(
        || {
            format!(
                "{} references to the thread pool after 200 release_idle cycles, {} with one \
                 generation",
                Arc::strong_count(&threads),
                one_generation
            )
        },
        || Arc::strong_count(&threads) == one_generation,
    )?;
    pool.release_idle();
    wait_until(
        || {
            format!(
                "{} references to the thread pool after the last release_idle, expected 2 (this \
                 test's and the pool configuration's); {} connections open",
                Arc::strong_count(&threads),
                manager.live()
            )
        },
        || Arc::strong_count(&threads) == 2 && manager.live() == 0,
    )?;
    ensure!(pool.get().is_ok(), "the pool does not serve after it");
    Ok(())
}

/// On r2d2 with the default thread pool: the threads of a retired generation, and with them
/// the jobs r2d2 left on them (its reaper, its reconnect retries), end once its connections
/// are closed, so a released pool keeps no thread. Threads are told apart by their ids: those
/// of earlier cases' thread pools may still be ending.
fn release_idle_on_r2d2_leaves_no_r2d2_thread_behind() -> Check {
    let earlier = threads_named("r2d2-worker")?;
    let ours = || -> Result<usize, String> {
        Ok(threads_named("r2d2-worker")?.difference(&earlier).count())
    };
    let manager = NoIoManager::default();
    let pool = no_io_pool(Inner::R2d2, &manager)?;
    let mut most = ours()?;
    for cycle in 0..300 {
        pool.release_idle();
        pool.get()
            .map(drop)
            .map_err(|error| format!("cycle {cycle}: get: {error}"))?;
        most = most.max(ours()?);
    }
    println!("  at most {most} r2d2 worker threads over 300 release_idle cycles");
    pool.release_idle();
    let until = Instant::now() + Duration::from_secs(5);
    while ours()? > 0 || manager.live() > 0 {
        ensure!(
            Instant::now() < until,
            "{} r2d2 worker threads left after the last release_idle, {} connections open",
            ours()?,
            manager.live()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    ensure!(pool.get().is_ok(), "the pool does not serve after it");
    Ok(())
}

/// Children forked while another thread retires and rebuilds the r2d2 generation in a loop
/// (reads of it counted, retired ones freed as reads end) each build a pool of their own and
/// use it: a child never waits on the reader counts or the retired generations it inherits.
fn forks_while_release_idle_loops_on_r2d2() -> Check {
    const FORKS: usize = 100;
    let manager = NoIoManager::default();
    let pool = no_io_pool(Inner::R2d2, &manager)?;
    let stop = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|scope| {
        let cycling = scope.spawn(|| -> Result<usize, String> {
            let mut cycles = 0;
            while !stop.load(Ordering::Relaxed) {
                pool.release_idle();
                pool.get()
                    .map(drop)
                    .map_err(|error| format!("cycle {cycles}: get: {error}"))?;
                cycles += 1;
            }
            Ok(cycles)
        });
        let children = (0..FORKS).try_for_each(|fork| {
            let end = run_child(DEADLINE, || {
                child_result((|| {
                    let conn = pool.get().map_err(|error| format!("child get: {error}"))?;
                    ensure!(
                        conn.opened_by == std::process::id(),
                        "the child got {}'s connection",
                        conn.opened_by
                    );
                    Ok(())
                })())
            });
            expect_exit(&format!("child {fork}"), end, 0)
        });
        stop.store(true, Ordering::Relaxed);
        let cycles = cycling
            .join()
            .map_err(|_| "the cycling thread panicked".to_string())??;
        println!("  {FORKS} children forked during {cycles} release_idle cycles");
        children
    })
}

/// Connections from before several `release_idle` calls, still leased at the fork (the last
/// call right before it): the child lets go of every one of their sockets and counts them, and
/// the parent keeps using them.
fn a_child_releases_connections_leased_across_release_idle(inner: Inner) -> Check {
    let server = FakeServer::start();
    let manager = server.manager();
    let connects = std::sync::Arc::clone(&manager.connects);
    let pool = inner
        .builder()
        .max_size(3)
        .min_idle(Some(3))
        .connection_timeout(Duration::from_secs(5))
        .descriptor_locator(|conn: &mut FakeConnection| Some(vec![conn.fd()]))
        .build(manager)
        .map_err(|error| format!("build: {error}"))?;
    let mut leases = Vec::new();
    for round in 0..3 {
        leases.push(
            pool.get()
                .map_err(|error| format!("round {round}: get: {error}"))?,
        );
        pool.release_idle();
    }
    let ids: BTreeSet<u64> = leases.iter().map(|conn| conn.server_id).collect();
    let fds: Vec<_> = leases.iter().map(|conn| conn.fd()).collect();
    ensure!(ids.len() == 3, "leases share connections: {ids:?}");
    // Every other connection is closed, in this process too, before the fork, and no connect
    // is still on its way to the server (each one the manager started has said hello; a
    // retired pool refuses new attempts before they reach the manager); so the child inherits
    // exactly the three leases.
    let until = Instant::now() + Duration::from_secs(5);
    loop {
        let closed: BTreeSet<u64> = server.closed().into_iter().collect();
        let lines = server.lines();
        let arrived = lines.len() as u64;
        let open: BTreeSet<u64> = lines
            .into_keys()
            .filter(|id| !closed.contains(id))
            .collect();
        if open == ids && arrived == connects.load(std::sync::atomic::Ordering::SeqCst) {
            break;
        }
        ensure!(
            Instant::now() < until,
            "open connections {open:?}, expected only the leases {ids:?}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let end = run_child(DEADLINE, || {
        child_result((|| {
            let mut conn = pool.get().map_err(|error| format!("child get: {error}"))?;
            conn.check_own("child", &ids, "a leased")?;
            conn.echo("child")?;
            let stats = pool.fork_stats();
            ensure!(
                stats.connections_discarded == 3 && stats.sockets_released == 3,
                "the child counted {stats:?}, expected 3 discarded and 3 released"
            );
            ensure!(
                fds.iter().all(|fd| points_at_dev_null(*fd)),
                "a leased connection's socket is still open in the child"
            );
            Ok(())
        })())
    });
    expect_exit("child", end, 0)?;
    only_we_wrote_on(&server, &ids)?;
    for (index, conn) in leases.iter_mut().enumerate() {
        conn.echo(&format!("parent lease {index}"))?;
    }
    drop(leases);
    wait_closed(&server, &ids)
}

fn warm_up_after_fork_opens_the_connections_before_the_first_request() -> Check {
    let server = FakeServer::start();
    let manager = server.manager();
    let connects = std::sync::Arc::clone(&manager.connects);
    let pool = fake_pool(manager, 3);
    let (ids, _) = warm_connections(&pool, 3)?;
    let end = run_child(DEADLINE, || {
        child_result((|| {
            // The counter is the child's copy: it counts the child's connection attempts.
            let before = connects.load(Ordering::SeqCst);
            pool.warm_up()
                .map_err(|error| format!("warm_up: {error}"))?;
            let state = pool.state();
            ensure!(
                state.connections == 3 && state.idle_connections == 3,
                "after warm_up: {state:?}"
            );
            ensure!(
                connects.load(Ordering::SeqCst) == before + 3,
                "warm_up connected {} times",
                connects.load(Ordering::SeqCst) - before
            );
            let mut conn = pool
                .get()
                .map_err(|error| format!("first request: {error}"))?;
            ensure!(
                connects.load(Ordering::SeqCst) == before + 3,
                "the first request had to connect"
            );
            conn.check_own("child", &ids, "the parent's")?;
            conn.echo("warm child")?;
            ensure!(
                pool.fork_stats().connections_discarded == 3,
                "stats {:?}",
                pool.fork_stats()
            );
            Ok(())
        })())
    });
    expect_exit("child", end, 0)?;
    only_we_wrote_on(&server, &ids)
}

fn warm_up_in_the_building_process_and_when_it_cannot_connect() -> Check {
    let server = FakeServer::start();
    let pool = Pool::builder()
        .max_size(4)
        .min_idle(Some(2))
        .connection_timeout(Duration::from_secs(5))
        .build_unchecked(server.manager());
    pool.warm_up()
        .map_err(|error| format!("warm_up: {error}"))?;
    ensure!(
        pool.state().connections >= 2,
        "after warm_up: {:?}",
        pool.state()
    );

    let missing = FakeServer::start();
    let unreachable = missing.manager();
    drop(missing);
    let pool = Pool::builder()
        .max_size(2)
        .connection_timeout(Duration::from_millis(300))
        .error_handler(Box::new(forksafe_pool::NopErrorHandler))
        .build_unchecked(unreachable);
    let started = Instant::now();
    let error = match pool.warm_up() {
        Ok(()) => return Err("warm_up succeeded without a server".to_string()),
        Err(error) => error.to_string(),
    };
    ensure!(
        started.elapsed() < Duration::from_secs(3),
        "warm_up took {:?}",
        started.elapsed()
    );
    ensure!(
        error.starts_with("timed out waiting for connection"),
        "error: {error}"
    );
    ensure!(
        error.contains("No such file") || error.contains("refused"),
        "the connection error is missing: {error}"
    );
    Ok(())
}

fn on_fork_fail_refuses_in_a_child_at_once() -> Check {
    let server = FakeServer::start();
    let manager = server.manager();
    let connects = std::sync::Arc::clone(&manager.connects);
    let pool = Pool::builder()
        .max_size(2)
        .min_idle(Some(2))
        .connection_timeout(Duration::from_secs(5))
        .descriptor_locator(|conn: &mut FakeConnection| Some(vec![conn.fd()]))
        .on_fork(OnFork::Fail)
        .build(manager)
        .map_err(|error| format!("build: {error}"))?;
    let (ids, fds) = warm_connections(&pool, 2)?;
    let end = run_child(DEADLINE, || {
        child_result((|| {
            let before = connects.load(Ordering::SeqCst);
            refused_at_once(
                || pool.get(),
                &[
                    "crossed fork()",
                    "OnFork::Fail",
                    &format!("process {}", std::process::id()),
                ],
            )?;
            ensure!(
                pool.get_timeout(Duration::from_secs(3)).is_err(),
                "get_timeout succeeded"
            );
            ensure!(pool.try_get().is_none(), "try_get returned a connection");
            ensure!(pool.warm_up().is_err(), "warm_up succeeded");
            ensure!(pool.release_idle() == 0, "release_idle released something");
            ensure!(pool.get().is_err(), "get succeeded after release_idle");
            ensure!(pool.state().connections == 0, "state {:?}", pool.state());
            ensure!(
                connects.load(Ordering::SeqCst) == before,
                "the child tried to connect"
            );
            // The inherited connections are still discarded: their sockets let go of, unused.
            let stats = pool.fork_stats();
            ensure!(
                stats.forks_crossed == 1,
                "forks_crossed {}",
                stats.forks_crossed
            );
            ensure!(
                stats.connections_discarded == 2,
                "discarded {}",
                stats.connections_discarded
            );
            ensure!(
                fds.iter().all(|fd| points_at_dev_null(*fd)),
                "inherited sockets still open"
            );
            let grandchild = run_child(DEADLINE, || {
                child_result(if pool.get().is_err() {
                    Ok(())
                } else {
                    Err("grandchild got a connection".into())
                })
            });
            ensure!(
                grandchild == ChildEnd::Exited(0),
                "grandchild ended {grandchild:?}"
            );
            Ok(())
        })())
    });
    expect_exit("child", end, 0)?;
    only_we_wrote_on(&server, &ids)?;
    let mut conn = pool
        .get()
        .map_err(|error| format!("parent get after fork: {error}"))?;
    ensure!(ids.contains(&conn.server_id), "parent lost its connections");
    conn.echo("parent")?;
    drop(conn);

    // A master that released its connections before forking: its child has nothing inherited
    // to notice, and must refuse all the same.
    ensure!(pool.release_idle() == 2, "the parent's release_idle");
    let end = run_child(DEADLINE, || {
        child_result(match pool.get() {
            Ok(_) => Err("a child of a released OnFork::Fail pool got a connection".into()),
            Err(error) if error.to_string().contains("OnFork::Fail") => Ok(()),
            Err(error) => Err(format!("unexpected error: {error}")),
        })
    });
    expect_exit("child", end, 0)?;
    ensure!(
        pool.get().is_ok(),
        "the parent cannot reconnect after release_idle"
    );
    Ok(())
}

fn main() {
    let cases: [Case; 17] = [
        (
            "release_idle_before_fork_leaves_children_nothing_to_discard",
            release_idle_before_fork_leaves_children_nothing_to_discard,
        ),
        (
            "release_idle_closes_a_leased_connection_when_it_is_returned",
            release_idle_closes_a_leased_connection_when_it_is_returned,
        ),
        (
            "release_idle_in_a_worker_before_it_forks",
            release_idle_in_a_worker_before_it_forks,
        ),
        (
            "release_idle_leaves_nothing_open_once_connects_in_flight_end",
            || release_idle_leaves_nothing_open_once_connects_in_flight_end(Inner::Std),
        ),
        (
            "release_idle_leaves_nothing_open_once_connects_in_flight_end_on_r2d2",
            || release_idle_leaves_nothing_open_once_connects_in_flight_end(Inner::R2d2),
        ),
        ("state_after_release_idle_opens_nothing", || {
            state_after_release_idle_opens_nothing(Inner::Std)
        }),
        ("state_after_release_idle_opens_nothing_on_r2d2", || {
            state_after_release_idle_opens_nothing(Inner::R2d2)
        }),
        ("release_idle_cycles_keep_memory_bounded", || {
            release_idle_cycles_keep_memory_bounded(Inner::Std)
        }),
        ("release_idle_cycles_keep_memory_bounded_on_r2d2", || {
            release_idle_cycles_keep_memory_bounded(Inner::R2d2)
        }),
        (
            "release_idle_on_r2d2_lets_each_retired_generation_go",
            release_idle_on_r2d2_lets_each_retired_generation_go,
        ),
        (
            "release_idle_on_r2d2_leaves_no_r2d2_thread_behind",
            release_idle_on_r2d2_leaves_no_r2d2_thread_behind,
        ),
        (
            "forks_while_release_idle_loops_on_r2d2",
            forks_while_release_idle_loops_on_r2d2,
        ),
        (
            "a_child_releases_connections_leased_across_release_idle",
            || a_child_releases_connections_leased_across_release_idle(Inner::Std),
        ),
        (
            "a_child_releases_connections_leased_across_release_idle_on_r2d2",
            || a_child_releases_connections_leased_across_release_idle(Inner::R2d2),
        ),
        (
            "warm_up_after_fork_opens_the_connections_before_the_first_request",
            warm_up_after_fork_opens_the_connections_before_the_first_request,
        ),
        (
            "warm_up_in_the_building_process_and_when_it_cannot_connect",
            warm_up_in_the_building_process_and_when_it_cannot_connect,
        ),
        (
            "on_fork_fail_refuses_in_a_child_at_once",
            on_fork_fail_refuses_in_a_child_at_once,
        ),
    ];
    run_cases(cases);
}
