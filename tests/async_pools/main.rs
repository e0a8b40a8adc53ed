//! The async pools (`forksafe_pool::deadpool_postgres`, `forksafe_pool::bb8_postgres`) on a
//! `forksafe_pool::Runtime`, forked for real against a real PostgreSQL (`FORKSAFE_PG_URL`,
//! default `postgres://postgres@127.0.0.1:5432/test`), plain and over TLS (postgres-openssl).
//!
//! Every scenario runs for both pools and both transports: workers answer every query with
//! their own sessions, a SIGKILLed master leaves no session behind while its workers run, a
//! worker forks again, forks while the master's runtime has queries in flight, a client checked
//! out before the fork. The control, deadpool-postgres on tokio's own runtime inherited the
//! naive way, must fail in a worker (so the scenarios are real).
//!
//! `pools` holds the pools behind one trait and the checks; `one_off` the cases that run once.
//!
//! A `harness = false` binary: the cases fork, so they run one after another, and every child
//! is reaped with a deadline. Without a reachable server the binary prints why and skips,
//! unless `CI` is set: then it fails.

#[macro_use]
#[path = "../support/mod.rs"]
mod support;
mod one_off;
mod pools;

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use forksafe_pool::{ForkStats, Runtime};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use one_off::{bad_input_fails_clearly, naive_plain, naive_tls, taken_and_dedicated_connections};
use pools::{
    echo, expect_rebuilt, live_sessions, parse, serve, sessions, url, warm, words, AsyncPool, Bb8,
    Deadpool, Plain, Tls, DEADLINE, POOL_SIZE, WORKERS,
};
use support::backend::{become_subreaper, datagram_pair, receive, send, KillOnDrop};
use support::fork::{reap, run_child, spawn_child, ChildEnd};
use support::runner::{
    child_result, expect_exit, require_server, run_cases, Case, Check, NamedCase,
};

fn workers_answer_every_query<P: AsyncPool>() -> Check {
    let (runtime, pool, master) = warm::<P>()?;
    let workers: Vec<Pid> = (0..WORKERS)
        .map(|_| {
            spawn_child(|| {
                child_result(runtime.block_on(async {
                    serve(&pool, &master).await?;
                    expect_rebuilt(pool.fork_stats(), 1, POOL_SIZE as u64)
                }))
            })
        })
        .collect();
    for (n, pid) in workers.into_iter().enumerate() {
        expect_exit(&format!("worker {n}"), reap(pid, DEADLINE), 0)?;
    }
    let after = runtime.block_on(sessions(&pool))?;
    ensure!(
        after == master,
        "the master's sessions changed: {master:?} -> {after:?}"
    );
    ensure!(
        pool.fork_stats() == ForkStats::default(),
        "the master saw a fork"
    );
    Ok(())
}

fn a_worker_forks_again<P: AsyncPool>() -> Check {
    let (runtime, pool, master) = warm::<P>()?;
    let end = run_child(DEADLINE, || {
        child_result((|| {
            let own = runtime.block_on(sessions(&pool))?;
            let foreign: BTreeSet<i32> = master.union(&own).copied().collect();
            let grandchild = run_child(DEADLINE, || {
                child_result(runtime.block_on(async {
                    serve(&pool, &foreign).await?;
                    expect_rebuilt(pool.fork_stats(), 2, 2 * POOL_SIZE as u64)
                }))
            });
            expect_exit("the grandchild", grandchild, 0)?;
            let again = runtime.block_on(sessions(&pool))?;
            ensure!(
                again == own,
                "the worker's sessions changed: {own:?} -> {again:?}"
            );
            Ok(())
        })())
    });
    expect_exit("the worker", end, 0)
}

fn forks_while_the_runtime_is_busy<P: AsyncPool>() -> Check {
    let (runtime, pool, master) = warm::<P>()?;
    let stop = Arc::new(AtomicBool::new(false));
    let answered = Arc::new(AtomicU64::new(0));
    let tasks: Vec<_> = (0..2 * POOL_SIZE)
        .map(|task| {
            let (pool, stop, answered) = (pool.clone(), stop.clone(), answered.clone());
            runtime.spawn(async move {
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    echo(&pool, &format!("master-{task}-{n}")).await?;
                    answered.fetch_add(1, Ordering::Relaxed);
                    n += 1;
                }
                Ok::<(), String>(())
            })
        })
        .collect();
    let mut counts = Vec::new();
    for child in 0..10 {
        let before = answered.load(Ordering::Relaxed);
        let end = run_child(DEADLINE, || {
            child_result(runtime.block_on(async {
                serve(&pool, &master).await?;
                expect_rebuilt(pool.fork_stats(), 1, POOL_SIZE as u64)
            }))
        });
        expect_exit(&format!("child {child}"), end, 0)?;
        counts.push(answered.load(Ordering::Relaxed) - before);
    }
    stop.store(true, Ordering::Relaxed);
    for task in tasks {
        runtime
            .block_on(async { tokio::time::timeout(DEADLINE, task).await })
            .map_err(|_| String::from("a master task never ended"))?
            .map_err(|error| format!("a master task: {error}"))??;
    }
    // Queries were in flight at every fork: the master answered some while each child ran.
    ensure!(
        counts.iter().all(|&n| n > 0),
        "the master's queries per child's lifetime: {counts:?}"
    );
    Ok(())
}

fn a_client_checked_out_before_the_fork<P: AsyncPool>() -> Check {
    let (runtime, pool, master) = warm::<P>()?;
    // Taken out of its place in the child only: the master keeps it.
    let mut held = Some(runtime.block_on(pool.get())?);
    let end = run_child(DEADLINE, || {
        child_result((|| {
            let guard = held.take().ok_or("no guard")?;
            // The panic is expected: keep its report out of the test's output.
            std::panic::set_hook(Box::new(|_| {}));
            let used = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                P::client(&guard).is_closed()
            }));
            let message = used
                .err()
                .and_then(|panic| panic.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            ensure!(
                message.contains("checked out before fork()"),
                "using the parent's client in the child: expected the documented panic, got {message:?}"
            );
            drop(guard);
            runtime.block_on(serve(&pool, &master))?;
            let stats = pool.fork_stats();
            ensure!(stats.leased_across_fork == 1, "fork stats {stats:?}");
            expect_rebuilt(stats, 1, POOL_SIZE as u64)
        })())
    });
    expect_exit("the child", end, 0)?;
    let guard = held.ok_or("the master lost its guard")?;
    runtime.block_on(async {
        P::client(&guard)
            .query_one("SELECT 1", &[])
            .await
            .map_err(|error| format!("the master's client after the fork: {error}"))
    })?;
    Ok(())
}

/// The master is SIGKILLed while its workers run: its sessions must end at once (no worker
/// keeps a copy of its sockets), the workers' must not.
fn a_killed_masters_sessions_end<P: AsyncPool>() -> Check {
    let (to_test, from_master) = datagram_pair()?;
    let (go_sender, go) = datagram_pair()?;
    let master_pid = spawn_child(|| {
        let run = || -> Check {
            let (runtime, pool, master) = warm::<P>()?;
            send(&to_test, format!("master {}", words(&master)))?;
            for _ in 0..2 {
                let (runtime, pool, to_test, go) = (&runtime, &pool, &to_test, &go);
                spawn_child(move || {
                    child_result(runtime.block_on(async {
                        let own = sessions(pool).await?;
                        send(
                            to_test,
                            format!("worker {} {}", std::process::id(), words(&own)),
                        )?;
                        receive(go, DEADLINE)?;
                        serve(pool, &BTreeSet::new()).await?;
                        send(to_test, format!("done {}", std::process::id()))
                    }))
                });
            }
            std::thread::sleep(DEADLINE * 2);
            Err(String::from("the master was never killed"))
        };
        child_result(run())
    });
    let mut cleanup = KillOnDrop(vec![master_pid]);
    let (mut master, mut workers) = (BTreeSet::new(), Vec::new());
    while master.is_empty() || workers.len() < 2 {
        let message = receive(&from_master, DEADLINE)?;
        match message.split_whitespace().collect::<Vec<_>>().as_slice() {
            ["master", ids @ ..] => master = parse(ids),
            ["worker", pid, ids @ ..] => {
                let pid = Pid::from_raw(pid.parse().map_err(|_| message.clone())?);
                workers.push((pid, parse(ids)));
            }
            _ => return Err(message),
        }
    }
    ensure!(
        master.is_subset(&live_sessions()?),
        "the master's sessions are not live"
    );
    kill(master_pid, Signal::SIGKILL).map_err(|error| format!("kill: {error}"))?;
    let end = reap(master_pid, DEADLINE);
    ensure!(
        end == ChildEnd::Signaled(Signal::SIGKILL),
        "the master ended {end:?}"
    );
    // The workers are this process's children now (it is their subreaper).
    cleanup.0 = workers.iter().map(|(pid, _)| *pid).collect();
    let killed = Instant::now();
    let mut left = master.clone();
    while !left.is_empty() && killed.elapsed() < Duration::from_secs(2) {
        std::thread::sleep(Duration::from_millis(20));
        left = live_sessions()?.intersection(&master).copied().collect();
    }
    ensure!(
        left.is_empty(),
        "2 s after the master's SIGKILL its sessions {left:?} live on"
    );
    let live = live_sessions()?;
    for (pid, own) in &workers {
        ensure!(
            own.is_subset(&live),
            "worker {pid}'s sessions {own:?} are gone"
        );
        send(&go_sender, String::from("go"))?;
    }
    for (pid, _) in workers {
        let message = receive(&from_master, DEADLINE)?;
        ensure!(message.starts_with("done "), "{message}");
        cleanup.0.retain(|&p| p != pid);
        expect_exit(&format!("worker {pid}"), reap(pid, DEADLINE), 0)?;
    }
    Ok(())
}

/// Children per variant in [`exit_while_connects_run`].
const EXITS: usize = 20;

/// A process that calls `exit` while its runtime's threads are in the middle of queries and
/// connects (TLS ones over `tls::`), as a worker ended by `max_requests` does: no child may hang
/// (`exit` waits for polls in progress, and polls that would start during it wait) or die of a
/// signal. With the driver sections removed, no child died either (0 of 160, over both pools):
/// rust-openssl initialises OpenSSL without its `atexit` cleanup, which is what kills such
/// processes elsewhere; the sections matter when another library in the process (libpq)
/// registered it.
fn exit_while_connects_run<P: AsyncPool>() -> Check {
    let mut ends = Vec::new();
    for _ in 0..EXITS {
        let pid = spawn_child(|| {
            let Ok(runtime) = Runtime::new() else {
                return 2;
            };
            let Ok(pool) = P::build(&runtime) else {
                return 3;
            };
            runtime.block_on(async {
                let connects: Vec<_> = (0..2 * POOL_SIZE)
                    .map(|task| {
                        let pool = pool.clone();
                        tokio::spawn(async move {
                            for n in 0.. {
                                if echo(&pool, &format!("{task}-{n}")).await.is_err() {
                                    break;
                                }
                            }
                        })
                    })
                    .collect();
                tokio::time::sleep(Duration::from_millis(30)).await;
                drop(connects);
            });
            // SAFETY: `exit` runs the atexit handlers on purpose: that is what is tested.
            unsafe { libc::exit(0) }
        });
        ends.push(reap(pid, DEADLINE));
    }
    let bad: Vec<_> = ends
        .iter()
        .filter(|end| **end != ChildEnd::Exited(0))
        .collect();
    ensure!(
        bad.is_empty(),
        "of {EXITS} children that exited while connecting: {bad:?}"
    );
    Ok(())
}

fn cases_for<P: AsyncPool>(prefix: &str) -> Vec<NamedCase> {
    let cases: [Case; 6] = [
        (
            "workers_answer_every_query",
            workers_answer_every_query::<P>,
        ),
        (
            "a_killed_masters_sessions_end",
            a_killed_masters_sessions_end::<P>,
        ),
        ("a_worker_forks_again", a_worker_forks_again::<P>),
        (
            "forks_while_the_runtime_is_busy",
            forks_while_the_runtime_is_busy::<P>,
        ),
        (
            "a_client_checked_out_before_the_fork",
            a_client_checked_out_before_the_fork::<P>,
        ),
        ("exit_while_connects_run", exit_while_connects_run::<P>),
    ];
    cases
        .into_iter()
        .map(|(name, case)| (format!("{prefix}{name}"), case))
        .collect()
}

fn main() {
    let reachable =
        r2d2_postgres::postgres::Client::connect(&url(), r2d2_postgres::postgres::NoTls)
            .map(drop)
            .map_err(|error| format!("PostgreSQL at {}: {error}", url()));
    require_server("async pool", reachable, "set FORKSAFE_PG_URL");
    become_subreaper();
    let mut cases = Vec::new();
    cases.extend(cases_for::<Deadpool<Plain>>("deadpool::plain::"));
    cases.extend(cases_for::<Deadpool<Tls>>("deadpool::tls::"));
    cases.extend(cases_for::<Bb8<Plain>>("bb8::plain::"));
    cases.extend(cases_for::<Bb8<Tls>>("bb8::tls::"));
    let controls: [Case; 4] = [
        (
            "taken_and_dedicated_connections",
            taken_and_dedicated_connections,
        ),
        ("bad_input_fails_clearly", bad_input_fails_clearly),
        (
            "naive::plain::runtime_and_pool_fail_in_a_worker",
            naive_plain,
        ),
        ("naive::tls::runtime_and_pool_fail_in_a_worker", naive_tls),
    ];
    cases.extend(
        controls
            .into_iter()
            .map(|(name, case)| (name.to_string(), case)),
    );
    run_cases(cases);
}
