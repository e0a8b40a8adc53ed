//! `forksafe_pool::Runtime` across real forks: a tokio runtime built in the master, and a
//! working runtime in every child — spawned tasks, timers, the blocking pool, a grandchild,
//! a `block_on` on the thread that forked from inside a runtime, a `Runtime` kept in a user's
//! struct. Beside each, the plain tokio counterpart, which must fail the same scenario (so the
//! scenario is real).
//!
//! A `harness = false` binary: the cases fork, so they run one after another, and every child
//! is reaped with a deadline (a hung child is a failed case).

#[macro_use]
mod support;

use std::time::Duration;

use forksafe_pool::{ForkLocal, Runtime};
use support::fork::{reap, run_child, spawn_child, ChildEnd};
use support::runner::{child_result, expect_exit, run_cases, Case, Check};

const DEADLINE: Duration = Duration::from_secs(20);
/// How long a child waits for work the inherited runtime would have to do before it calls
/// it lost.
const PATIENCE: Duration = Duration::from_secs(2);

fn main() {
    let cases: [Case; 10] = [
        (
            "tasks_timers_and_the_blocking_pool_work_in_a_child",
            tasks_timers_and_the_blocking_pool_work_in_a_child,
        ),
        (
            "an_inherited_tokio_runtime_runs_nothing_in_a_child",
            an_inherited_tokio_runtime_runs_nothing_in_a_child,
        ),
        (
            "a_grandchild_gets_its_own_runtime",
            a_grandchild_gets_its_own_runtime,
        ),
        (
            "block_on_works_on_a_thread_forked_inside_the_runtime",
            block_on_works_on_a_thread_forked_inside_the_runtime,
        ),
        (
            "block_on_works_on_a_thread_forked_inside_another_runtime",
            block_on_works_on_a_thread_forked_inside_another_runtime,
        ),
        (
            "a_fork_local_tokio_runtime_fails_on_a_thread_forked_inside",
            a_fork_local_tokio_runtime_fails_on_a_thread_forked_inside,
        ),
        (
            "a_current_thread_runtime_forked_inside_panics_with_the_reason",
            a_current_thread_runtime_forked_inside_panics_with_the_reason,
        ),
        (
            "a_runtime_kept_in_a_struct_works_in_a_child",
            a_runtime_kept_in_a_struct_works_in_a_child,
        ),
        (
            "a_handle_kept_from_the_parent_runs_nothing_in_a_child",
            a_handle_kept_from_the_parent_runs_nothing_in_a_child,
        ),
        (
            "the_master_keeps_its_runtime_while_children_come_and_go",
            the_master_keeps_its_runtime_while_children_come_and_go,
        ),
    ];
    run_cases(cases);
}

/// A runtime with work done on every part of it, as a master's would be at the fork.
fn busy_runtime() -> Result<Runtime, String> {
    let runtime = Runtime::new().map_err(|error| format!("runtime: {error}"))?;
    exercise(&runtime)?;
    Ok(runtime)
}

/// Spawned tasks, a timer, the blocking pool: each must finish, and in this process.
fn exercise(runtime: &Runtime) -> Check {
    let me = std::process::id();
    let result = runtime.block_on(async move {
        let spawned = tokio::spawn(async { std::process::id() });
        let blocking = tokio::task::spawn_blocking(std::process::id);
        let slept = tokio::time::timeout(PATIENCE, tokio::time::sleep(Duration::from_millis(5)));
        tokio::time::timeout(PATIENCE, async {
            (spawned.await, blocking.await, slept.await)
        })
        .await
    });
    match result {
        Ok((Ok(spawned), Ok(blocking), Ok(()))) => {
            ensure!(
                spawned == me && blocking == me,
                "work ran in {spawned} and {blocking}, not {me}"
            );
            Ok(())
        }
        other => Err(format!("the runtime did not do its work: {other:?}")),
    }
}

fn in_child(check: impl FnOnce() -> Check) -> ChildEnd {
    run_child(DEADLINE, || child_result(check()))
}

fn tasks_timers_and_the_blocking_pool_work_in_a_child() -> Check {
    let runtime = busy_runtime()?;
    let end = in_child(|| exercise(&runtime));
    expect_exit("the child", end, 0)?;
    exercise(&runtime)
}

/// The control: tokio's own runtime, built and used in the master, does nothing in a child.
fn an_inherited_tokio_runtime_runs_nothing_in_a_child() -> Check {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|error| format!("runtime: {error}"))?;
    runtime
        .block_on(async { tokio::spawn(async {}).await })
        .map_err(|e| e.to_string())?;
    let pid = spawn_child(|| {
        // Nothing drives the spawned task in the child: the block_on waits for ever.
        let _ = runtime.block_on(async { tokio::spawn(async {}).await });
        0
    });
    let end = reap(pid, PATIENCE * 2);
    ensure!(
        end == ChildEnd::Hung,
        "a child with the inherited tokio runtime ended {end:?}; the scenario expects it to hang"
    );
    Ok(())
}

fn a_grandchild_gets_its_own_runtime() -> Check {
    let runtime = busy_runtime()?;
    let end = in_child(|| {
        exercise(&runtime)?;
        let grandchild = in_child(|| exercise(&runtime));
        expect_exit("the grandchild", grandchild, 0)?;
        exercise(&runtime)
    });
    expect_exit("the child", end, 0)
}

/// The master forks from inside `block_on` (an async `main` forking its workers): in the
/// child, that thread is still inside the parent's runtime as far as tokio knows.
fn block_on_works_on_a_thread_forked_inside_the_runtime() -> Check {
    let runtime = busy_runtime()?;
    let end = runtime.block_on(async {
        tokio::time::sleep(Duration::from_millis(1)).await;
        in_child(|| {
            ensure!(
                tokio::runtime::Handle::try_current().is_ok(),
                "the scenario needs a thread inside a runtime context"
            );
            exercise(&runtime)
        })
    });
    expect_exit("the child", end, 0)?;
    exercise(&runtime)
}

/// As above, under a runtime that is not the crate's (`#[tokio::main]`'s, say).
fn block_on_works_on_a_thread_forked_inside_another_runtime() -> Check {
    let runtime = busy_runtime()?;
    let main_runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|error| format!("runtime: {error}"))?;
    let end = main_runtime.block_on(async { in_child(|| exercise(&runtime)) });
    expect_exit("the child", end, 0)
}

/// Why a type of its own and not a `ForkLocal<tokio::runtime::Runtime>`: that gives a child a
/// runtime of its own too, but on the thread that forked from inside a runtime, tokio refuses
/// to `block_on` it (it panics: "Cannot start a runtime from within a runtime").
fn a_fork_local_tokio_runtime_fails_on_a_thread_forked_inside() -> Check {
    let local = ForkLocal::new(|| tokio::runtime::Runtime::new().expect("runtime"));
    local.get().block_on(async {});
    let end = local.get().block_on(async {
        in_child(|| {
            // tokio's panic is expected: keep its report out of the test's output.
            std::panic::set_hook(Box::new(|_| {}));
            local.get().block_on(async {});
            Ok(())
        })
    });
    ensure!(
        end == ChildEnd::Exited(101),
        "a ForkLocal runtime's block_on on the forking thread ended {end:?}; tokio's panic was expected"
    );
    Ok(())
}

/// A current-thread runtime cannot be driven from a thread tokio thinks is inside another
/// runtime: the documented panic, with its reason, rather than a hang.
fn a_current_thread_runtime_forked_inside_panics_with_the_reason() -> Check {
    let runtime = Runtime::with_builder(|| {
        let mut builder = tokio::runtime::Builder::new_current_thread();
        builder.enable_all();
        builder
    })
    .map_err(|error| format!("runtime: {error}"))?;
    let end = runtime.block_on(async {
        in_child(|| {
            std::panic::set_hook(Box::new(|_| {}));
            let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                runtime.block_on(async {})
            }));
            let message = caught
                .err()
                .and_then(|panic| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            ensure!(
                message.contains("forked from inside a tokio runtime"),
                "expected the documented panic, got {message:?}"
            );
            Ok(())
        })
    });
    expect_exit("the child", end, 0)
}

/// Application state holding the runtime, as a PyO3 module or a server keeps it.
struct AppState {
    runtime: Runtime,
    name: &'static str,
}

impl AppState {
    fn pid_from_a_task(&self) -> Result<u32, String> {
        let task = self.runtime.spawn(async { std::process::id() });
        self.runtime
            .block_on(async { tokio::time::timeout(PATIENCE, task).await })
            .map_err(|_| format!("{}: the task never ran", self.name))?
            .map_err(|error| error.to_string())
    }
}

fn a_runtime_kept_in_a_struct_works_in_a_child() -> Check {
    let state = AppState {
        runtime: busy_runtime()?,
        name: "app",
    };
    ensure!(state.pid_from_a_task()? == std::process::id(), "master");
    let end = in_child(|| {
        let pid = state.pid_from_a_task()?;
        ensure!(pid == std::process::id(), "the task ran in {pid}");
        Ok(())
    });
    expect_exit("the child", end, 0)
}

/// Why the docs say to keep the `Runtime`, not a `Handle`: a handle taken in the parent spawns
/// onto the parent's runtime, which runs nothing in the child.
fn a_handle_kept_from_the_parent_runs_nothing_in_a_child() -> Check {
    let runtime = busy_runtime()?;
    let kept = runtime.handle().clone();
    let end = in_child(|| {
        let stale = kept.spawn(async { std::process::id() });
        let waited = runtime.block_on(async { tokio::time::timeout(PATIENCE, stale).await });
        ensure!(
            waited.is_err(),
            "a task spawned on the parent's handle ran in the child: {waited:?}"
        );
        let fresh = runtime.handle().spawn(async { std::process::id() });
        let waited = runtime.block_on(async { tokio::time::timeout(PATIENCE, fresh).await });
        ensure!(
            matches!(waited, Ok(Ok(pid)) if pid == std::process::id()),
            "this process's handle: {waited:?}"
        );
        Ok(())
    });
    expect_exit("the child", end, 0)
}

fn the_master_keeps_its_runtime_while_children_come_and_go() -> Check {
    let runtime = busy_runtime()?;
    let background = runtime.spawn(async {
        let mut ticks = 0u32;
        loop {
            tokio::time::sleep(Duration::from_millis(1)).await;
            ticks += 1;
            if ticks == 200 {
                return ticks;
            }
        }
    });
    for child in 0..8 {
        let end = in_child(|| exercise(&runtime));
        expect_exit(&format!("child {child}"), end, 0)?;
    }
    let ticks = runtime
        .block_on(async { tokio::time::timeout(DEADLINE, background).await })
        .map_err(|_| String::from("the master's background task stopped"))?
        .map_err(|error| error.to_string())?;
    ensure!(ticks == 200, "ticks {ticks}");
    exercise(&runtime)
}
