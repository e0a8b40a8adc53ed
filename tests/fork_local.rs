//! `ForkLocal<T>` across real forks: built once per process, a new value in every child, the
//! inherited value never dropped in a child, references taken before a fork, nested forks, and
//! a fork that catches another thread inside the initialiser.
//!
//! A `harness = false` binary (see `fork_core.rs`): cases run one after another, every child
//! is reaped with a deadline, and a hung child fails its case.

#[macro_use]
mod support;

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use forksafe_pool::ForkLocal;
use support::fork::{reap, run_child, spawn_child, ChildEnd};
use support::runner::{child_result, expect_exit, run_cases, Case, Check};

const DEADLINE: Duration = Duration::from_secs(20);

/// A value that knows which process built it and counts how often its initialiser ran.
#[derive(Debug)]
struct Built {
    by: u32,
}

fn counted_local(
    calls: &Arc<AtomicUsize>,
) -> ForkLocal<Built, Box<dyn Fn() -> Built + Send + Sync>> {
    let calls = Arc::clone(calls);
    ForkLocal::new(Box::new(move || {
        calls.fetch_add(1, Ordering::SeqCst);
        Built {
            by: std::process::id(),
        }
    }))
}

fn built_once_per_process() -> Check {
    let calls = Arc::new(AtomicUsize::new(0));
    let local = counted_local(&calls);
    let me = std::process::id();
    ensure!(local.get_if_built().is_none(), "built before first use");
    ensure!(
        local.get().by == me,
        "parent's value built by {}",
        local.get().by
    );
    ensure!(
        std::ptr::eq(local.get(), local.get()),
        "two values in one process"
    );
    ensure!(
        calls.load(Ordering::SeqCst) == 1,
        "initialiser ran {} times",
        calls.load(Ordering::SeqCst)
    );
    let parent_value = local.get() as *const Built as usize;

    let end = run_child(DEADLINE, || {
        child_result((|| {
            let child = std::process::id();
            ensure!(
                local.get_if_built().is_none(),
                "the child sees the parent's value as built"
            );
            let value = local.get();
            ensure!(value.by == child, "child got a value built by {}", value.by);
            ensure!(
                value as *const Built as usize != parent_value,
                "child got the parent's value"
            );
            for _ in 0..100 {
                ensure!(
                    std::ptr::eq(local.get(), value),
                    "child built a second value"
                );
            }
            // The counter is the child's copy: one call inherited, one made here.
            ensure!(
                calls.load(Ordering::SeqCst) == 2,
                "initialiser ran {} times",
                calls.load(Ordering::SeqCst)
            );
            Ok(())
        })())
    });
    expect_exit("child", end, 0)?;
    ensure!(local.get().by == me, "parent's value changed");
    ensure!(
        local.get() as *const Built as usize == parent_value,
        "parent's value was replaced"
    );
    ensure!(
        calls.load(Ordering::SeqCst) == 1,
        "parent's initialiser ran again"
    );
    Ok(())
}

fn a_static_forklocal_in_a_child() -> Check {
    static BUILT_BY: ForkLocal<u32> = ForkLocal::new(std::process::id);
    let me = *BUILT_BY.get();
    ensure!(me == std::process::id(), "static built by {me}");
    let end = run_child(DEADLINE, || {
        child_result((|| {
            ensure!(
                *BUILT_BY.get() == std::process::id(),
                "child's static value built by {}",
                BUILT_BY.get()
            );
            Ok(())
        })())
    });
    expect_exit("child", end, 0)?;
    ensure!(*BUILT_BY.get() == me, "parent's static value changed");
    Ok(())
}

/// Writes "built=<pid> dropped=<pid>" into a pipe when dropped, so the parent can see every
/// drop in every process.
struct DropRecorder {
    built_by: u32,
    pipe: Arc<File>,
}

impl Drop for DropRecorder {
    fn drop(&mut self) {
        let line = format!("built={} dropped={}\n", self.built_by, std::process::id());
        let _ = (&*self.pipe).write_all(line.as_bytes());
    }
}

fn pipe() -> (File, Arc<File>) {
    let (read, write): (OwnedFd, OwnedFd) = nix::unistd::pipe().expect("pipe");
    let read = File::from(read);
    nix::fcntl::fcntl(
        read.as_raw_fd(),
        nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
    )
    .expect("O_NONBLOCK");
    (read, Arc::new(File::from(write)))
}

fn drain(mut read: &File) -> String {
    let mut out = String::new();
    let mut buf = [0u8; 4096];
    while let Ok(n) = read.read(&mut buf) {
        if n == 0 {
            break;
        }
        out.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    out
}

fn the_inherited_value_is_never_dropped_in_a_child() -> Check {
    let (read, write) = pipe();
    let recorder_pipe = Arc::clone(&write);
    let local = ForkLocal::new(move || DropRecorder {
        built_by: std::process::id(),
        pipe: Arc::clone(&recorder_pipe),
    });
    let parent = std::process::id();
    ensure!(
        local.get().built_by == parent,
        "parent's value built by {}",
        local.get().built_by
    );
    // Each child takes the ForkLocal out of its own copy of this slot and drops it there.
    let mut slot = Some(local);

    // Child 1 builds its own value, then drops the ForkLocal: only its own value may drop.
    let builds = spawn_child(|| {
        child_result((|| {
            let local = slot.take().ok_or("no ForkLocal")?;
            ensure!(
                local.get().built_by == std::process::id(),
                "child's value built by {}",
                local.get().built_by
            );
            drop(local);
            Ok(())
        })())
    });
    // Child 2 never asks for the value and drops the ForkLocal: nothing may drop.
    let never_asks = spawn_child(|| {
        drop(slot.take());
        0
    });
    expect_exit("child", reap(builds, DEADLINE), 0)?;
    let builder_pid = builds.as_raw() as u32;
    expect_exit("child", reap(never_asks, DEADLINE), 0)?;
    let seen = drain(&read);
    let expected = format!("built={builder_pid} dropped={builder_pid}\n");
    ensure!(
        seen == expected,
        "drops seen in the children: {seen:?}, expected only {expected:?}"
    );

    drop(slot.take());
    let seen = drain(&read);
    let expected = format!("built={parent} dropped={parent}\n");
    ensure!(
        seen == expected,
        "parent's drop: {seen:?}, expected {expected:?}"
    );
    drop(write);
    Ok(())
}

fn a_reference_taken_before_fork_still_points_at_the_parents_value() -> Check {
    let calls = Arc::new(AtomicUsize::new(0));
    let local = counted_local(&calls);
    let parent = std::process::id();
    let before: &Built = local.get();
    let end = run_child(DEADLINE, || {
        child_result((|| {
            // Valid memory, the parent's value: readable, but not the child's.
            ensure!(before.by == parent, "the old reference reads {}", before.by);
            let own = local.get();
            ensure!(
                own.by == std::process::id(),
                "child's value built by {}",
                own.by
            );
            ensure!(
                !std::ptr::eq(own, before),
                "get() in the child returned the parent's value"
            );
            // Still readable after the child replaced it: the parent's value is leaked, not freed.
            ensure!(
                before.by == parent,
                "the old reference changed to {}",
                before.by
            );
            Ok(())
        })())
    });
    expect_exit("child", end, 0)?;
    ensure!(std::ptr::eq(before, local.get()), "parent's value replaced");
    Ok(())
}

fn nested_forks_build_a_value_per_generation() -> Check {
    let calls = Arc::new(AtomicUsize::new(0));
    let local = counted_local(&calls);
    local.get();
    let end = run_child(DEADLINE, || {
        child_result((|| {
            let child = std::process::id();
            ensure!(
                local.get().by == child,
                "child's value built by {}",
                local.get().by
            );
            let grandchild = run_child(DEADLINE, || {
                child_result((|| {
                    ensure!(
                        local.get().by == std::process::id(),
                        "grandchild's value built by {}",
                        local.get().by
                    );
                    ensure!(
                        calls.load(Ordering::SeqCst) == 3,
                        "initialiser ran {} times in the lineage",
                        calls.load(Ordering::SeqCst)
                    );
                    Ok(())
                })())
            });
            ensure!(
                grandchild == ChildEnd::Exited(0),
                "grandchild ended {grandchild:?}"
            );
            ensure!(
                local.get().by == child,
                "child's value changed to {}",
                local.get().by
            );
            ensure!(
                calls.load(Ordering::SeqCst) == 2,
                "child's count {}",
                calls.load(Ordering::SeqCst)
            );
            Ok(())
        })())
    });
    expect_exit("child", end, 0)?;
    ensure!(
        calls.load(Ordering::SeqCst) == 1,
        "parent's initialiser ran again"
    );
    Ok(())
}

/// A fork while another parent thread is inside the initialiser (holding the install lock):
/// the child must not wait for a thread that does not exist there.
fn a_fork_during_another_threads_initialiser_does_not_block_the_child() -> Check {
    let entered = Arc::new(AtomicUsize::new(0));
    let entered_in_init = Arc::clone(&entered);
    let parent = std::process::id();
    let local = Arc::new(ForkLocal::new(move || {
        if std::process::id() == parent {
            entered_in_init.store(1, Ordering::SeqCst);
            std::thread::sleep(Duration::from_millis(500));
        }
        std::process::id()
    }));
    let builder = {
        let local = Arc::clone(&local);
        std::thread::spawn(move || *local.get())
    };
    while entered.load(Ordering::SeqCst) == 0 {
        std::thread::yield_now();
    }
    let end = run_child(DEADLINE, || {
        child_result((|| {
            let started = Instant::now();
            let value = *local.get();
            ensure!(value == std::process::id(), "child's value {value}");
            ensure!(
                started.elapsed() < Duration::from_secs(2),
                "child waited {:?}",
                started.elapsed()
            );
            Ok(())
        })())
    });
    expect_exit("child", end, 0)?;
    let built = builder
        .join()
        .map_err(|_| "builder thread panicked".to_string())?;
    ensure!(built == parent, "parent's value {built}");
    Ok(())
}

fn a_failing_initialiser_in_the_child_never_yields_the_parents_value() -> Check {
    let parent = std::process::id();
    let local = ForkLocal::try_new(move || {
        if std::process::id() == parent {
            Ok(parent)
        } else {
            Err(format!("cannot connect from {}", std::process::id()))
        }
    });
    ensure!(local.get_or_try() == Ok(&parent), "parent's value");
    let end = run_child(DEADLINE, || {
        child_result((|| {
            for _ in 0..3 {
                let expected = format!("cannot connect from {}", std::process::id());
                ensure!(
                    local.get_or_try() == Err(expected),
                    "child got {:?}",
                    local.get_or_try()
                );
            }
            ensure!(local.get_if_built().is_none(), "child has a value");
            Ok(())
        })())
    });
    expect_exit("child", end, 0)?;
    ensure!(local.get_or_try() == Ok(&parent), "parent's value changed");
    Ok(())
}

fn main() {
    let cases: [Case; 7] = [
        ("built_once_per_process", built_once_per_process),
        (
            "a_static_forklocal_in_a_child",
            a_static_forklocal_in_a_child,
        ),
        (
            "the_inherited_value_is_never_dropped_in_a_child",
            the_inherited_value_is_never_dropped_in_a_child,
        ),
        (
            "a_reference_taken_before_fork_still_points_at_the_parents_value",
            a_reference_taken_before_fork_still_points_at_the_parents_value,
        ),
        (
            "nested_forks_build_a_value_per_generation",
            nested_forks_build_a_value_per_generation,
        ),
        (
            "a_fork_during_another_threads_initialiser_does_not_block_the_child",
            a_fork_during_another_threads_initialiser_does_not_block_the_child,
        ),
        (
            "a_failing_initialiser_in_the_child_never_yields_the_parents_value",
            a_failing_initialiser_in_the_child_never_yields_the_parents_value,
        ),
    ];
    run_cases(cases);
}
