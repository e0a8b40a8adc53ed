//! `GuardedPool` around a plain `r2d2::Pool` across real forks, against the fake server that
//! records which process wrote what on which connection: without a rebuild closure a child
//! gets a clear error at once; with one it gets its own pool; either way the child never
//! writes on the parent's connections and the parent carries on.
//!
//! A `harness = false` binary (see `fork_core.rs`).

#[macro_use]
mod support;

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use forksafe_pool::GuardedPool;
use support::fake_server::{only_we_wrote_on, refused_at_once, FakeManager, FakeServer};
use support::fork::{run_child, ChildEnd};
use support::runner::{child_result, expect_exit, run_cases, Case, Check};

const DEADLINE: Duration = Duration::from_secs(20);
const POOL_SIZE: u32 = 3;

/// A plain r2d2 pool of fake connections, all opened before it is returned.
fn plain_pool(manager: FakeManager) -> r2d2::Pool<FakeManager> {
    r2d2::Pool::builder()
        .max_size(POOL_SIZE)
        .min_idle(Some(POOL_SIZE))
        .connection_timeout(Duration::from_secs(5))
        .build(manager)
        .expect("plain r2d2 pool")
}

/// The server numbers of the parent's connections (checked out together, then returned).
fn parent_connections(pool: &GuardedPool<FakeManager>) -> Result<BTreeSet<u64>, String> {
    let conns: Vec<_> = (0..POOL_SIZE)
        .map(|_| pool.get().map_err(|error| format!("parent get: {error}")))
        .collect::<Result<_, _>>()?;
    Ok(conns.iter().map(|conn| conn.server_id).collect())
}

/// Nobody but the parent wrote on the parent's connections, and the parent can still use them.
fn parent_unharmed(
    server: &FakeServer,
    pool: &GuardedPool<FakeManager>,
    ids: &BTreeSet<u64>,
) -> Check {
    let me = std::process::id();
    for round in 0..POOL_SIZE * 2 {
        let mut conn = pool
            .get()
            .map_err(|error| format!("parent get after fork: {error}"))?;
        ensure!(
            conn.opened_by == me,
            "parent got a connection opened by {}",
            conn.opened_by
        );
        conn.echo(&format!("parent-{round}"))?;
    }
    only_we_wrote_on(server, ids).map_err(|error| format!("parent's connections: {error}"))
}

fn without_a_rebuild_closure_a_child_gets_a_clear_error_at_once() -> Check {
    let server = FakeServer::start();
    let pool = GuardedPool::new(plain_pool(server.manager()));
    ensure!(!pool.can_rebuild(), "can_rebuild without a closure");
    let ids = parent_connections(&pool)?;
    let parent = std::process::id();
    let end = run_child(DEADLINE, || {
        child_result((|| {
            refused_at_once(
                || pool.get(),
                &[
                    "crossed fork()",
                    &format!("wrapped in process {parent}"),
                    "GuardedPool::rebuild_with",
                ],
            )?;
            ensure!(
                pool.get_timeout(Duration::from_secs(3)).is_err(),
                "get_timeout succeeded"
            );
            ensure!(pool.try_get().is_none(), "try_get returned a connection");
            ensure!(pool.pool().is_err(), "pool() handed out the inherited pool");
            let state = pool.state();
            ensure!(
                state.connections == 0,
                "state counts the inherited pool: {state:?}"
            );
            Ok(())
        })())
    });
    expect_exit("child", end, 0)?;
    parent_unharmed(&server, &pool, &ids)
}

fn with_a_rebuild_closure_a_child_gets_its_own_pool() -> Check {
    let server = FakeServer::start();
    let manager = server.manager();
    let rebuilds = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&rebuilds);
    let pool = GuardedPool::new(plain_pool(manager.clone())).rebuild_with(move || {
        counted.fetch_add(1, Ordering::SeqCst);
        Ok(plain_pool(manager.clone()))
    });
    ensure!(pool.can_rebuild(), "can_rebuild with a closure");
    let ids = parent_connections(&pool)?;
    let end = run_child(DEADLINE, || {
        child_result((|| {
            let me = std::process::id();
            for round in 0..10 {
                let mut conn = pool.get().map_err(|error| format!("child get: {error}"))?;
                conn.check_own("child", &ids, "the parent's")?;
                let value = format!("child-{round}");
                let reply = conn
                    .query(&value)
                    .map_err(|error| format!("child query: {error}"))?;
                ensure!(reply.ends_with(&value), "child asked {value}, got {reply}");
            }
            ensure!(
                rebuilds.load(Ordering::SeqCst) == 1,
                "rebuilt {} times",
                rebuilds.load(Ordering::SeqCst)
            );
            ensure!(
                pool.state().connections == POOL_SIZE,
                "child's state {:?}",
                pool.state()
            );
            // Clones share the rebuilt pool.
            let clone = pool.clone();
            ensure!(
                clone.get().is_ok_and(|conn| conn.opened_by == me),
                "a clone in the child"
            );
            ensure!(
                rebuilds.load(Ordering::SeqCst) == 1,
                "a clone rebuilt again"
            );
            // And a grandchild rebuilds once more.
            let grandchild = run_child(DEADLINE, || {
                child_result((|| {
                    let conn = pool
                        .get()
                        .map_err(|error| format!("grandchild get: {error}"))?;
                    ensure!(
                        conn.opened_by == std::process::id(),
                        "grandchild got {}'s connection",
                        conn.opened_by
                    );
                    ensure!(
                        rebuilds.load(Ordering::SeqCst) == 2,
                        "lineage rebuilt {} times",
                        rebuilds.load(Ordering::SeqCst)
                    );
                    Ok(())
                })())
            });
            ensure!(
                grandchild == ChildEnd::Exited(0),
                "grandchild ended {grandchild:?}"
            );
            Ok(())
        })())
    });
    expect_exit("child", end, 0)?;
    ensure!(rebuilds.load(Ordering::SeqCst) == 0, "the parent rebuilt");
    parent_unharmed(&server, &pool, &ids)
}

fn a_failing_rebuild_returns_its_error_and_is_retried() -> Check {
    let server = FakeServer::start();
    let missing = FakeServer::start();
    let unreachable = missing.manager();
    drop(missing); // removes the socket: connecting fails
    let attempts = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&attempts);
    let pool = GuardedPool::new(plain_pool(server.manager())).rebuild_with(move || {
        counted.fetch_add(1, Ordering::SeqCst);
        r2d2::Pool::builder()
            .max_size(1)
            .connection_timeout(Duration::from_millis(300))
            .error_handler(Box::new(r2d2::NopErrorHandler))
            .build(unreachable.clone())
    });
    let ids = parent_connections(&pool)?;
    let end = run_child(DEADLINE, || {
        child_result((|| {
            for attempt in 1..=2 {
                let error = match pool.get() {
                    Ok(_) => return Err("child got a connection".to_string()),
                    Err(error) => error.to_string(),
                };
                ensure!(
                    error.starts_with("timed out waiting for connection"),
                    "not r2d2's error: {error}"
                );
                ensure!(
                    attempts.load(Ordering::SeqCst) == attempt,
                    "rebuild ran {} times",
                    attempts.load(Ordering::SeqCst)
                );
            }
            Ok(())
        })())
    });
    expect_exit("child", end, 0)?;
    parent_unharmed(&server, &pool, &ids)
}

fn main() {
    let cases: [Case; 3] = [
        (
            "without_a_rebuild_closure_a_child_gets_a_clear_error_at_once",
            without_a_rebuild_closure_a_child_gets_a_clear_error_at_once,
        ),
        (
            "with_a_rebuild_closure_a_child_gets_its_own_pool",
            with_a_rebuild_closure_a_child_gets_its_own_pool,
        ),
        (
            "a_failing_rebuild_returns_its_error_and_is_retried",
            a_failing_rebuild_returns_its_error_and_is_retried,
        ),
    ];
    run_cases(cases);
}
