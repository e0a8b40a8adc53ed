//! A pool built in a forked child (a worker that builds its own pool, a test's forked master)
//! of a process whose pools' threads are parked.
//!
//! The building process's thread pool (scheduled-thread-pool, r2d2's) parks its idle threads
//! in parking_lot's process-global table. A child inherits that table with the parent's parked
//! threads still linked in, and its own new threads reuse those threads' stacks (glibc hands a
//! child the stacks of the threads it lost), thread-local parking data included: a thread pool
//! started in the child then corrupts the table, and `build` waits for ever
//! (docs/parking-lot.md has the mechanism). A test's forked master is such a child:
//! `master_sigkill_leaves_no_sessions_behind` (tests/support/backend.rs) failed with "no message
//! within 30s" when its master hung in `warm_pool`'s `build` this way.
//!
//! A `harness = false` binary (see `fork_core.rs`).

#[macro_use]
mod support;

use std::time::Duration;

use forksafe_pool::Pool;
use support::fork::{reap, spawn_child, ChildEnd};
use support::no_io::NoIoManager;
use support::runner::{run_cases, Case, Check};

/// Children built, one after another.
const CHILDREN: usize = 40;

fn a_pool_built_in_a_forked_child_never_hangs() -> Check {
    // A pool of the test process whose thread pool's threads are parked, waiting for work.
    let parent = Pool::builder()
        .max_size(4)
        .build(NoIoManager::default())
        .map_err(|error| format!("build: {error}"))?;
    let mut ends = Vec::new();
    for _ in 0..CHILDREN {
        let pid = spawn_child(|| {
            let pool = match Pool::builder().max_size(4).build(NoIoManager::default()) {
                Ok(pool) => pool,
                Err(_) => return 2,
            };
            match pool.get() {
                Ok(_conn) => 0,
                Err(_) => 3,
            }
        });
        ends.push(reap(pid, Duration::from_secs(10)));
    }
    drop(parent);
    let failed: Vec<(usize, &ChildEnd)> = ends
        .iter()
        .enumerate()
        .filter(|(_, end)| **end != ChildEnd::Exited(0))
        .collect();
    ensure!(
        failed.is_empty(),
        "{} of {CHILDREN} children failed or hung building a pool: {failed:?}",
        failed.len()
    );
    Ok(())
}

fn main() {
    let cases: [Case; 1] = [(
        "a_pool_built_in_a_forked_child_never_hangs",
        a_pool_built_in_a_forked_child_never_hangs,
    )];
    run_cases(cases);
}
