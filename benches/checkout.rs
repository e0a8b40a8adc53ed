//! Checkout + return on a warm pool: `forksafe_pool::Pool` against `r2d2::Pool`, same run.
//!
//! The manager does no I/O and `test_on_check_out` is off, so what is measured is the pools'
//! own bookkeeping: each pool's mutex, idle list, guard and clock reads, plus, for
//! forksafe-pool, the epoch checks on `get()` and on the guard's drop. Target: forksafe ≤ 1.03 ×
//! r2d2 (measured: about 0.55 ×, see docs/measurements.md).
//!
//! `cargo bench --bench checkout`
//!
//! Noisy machine? Count instructions instead: `CHECKOUT_PROFILE=forksafe` (or `r2d2`) makes the
//! bench binary run 1 000 000 checkouts without criterion, for `valgrind --tool=callgrind`:
//! `CHECKOUT_PROFILE=forksafe valgrind --tool=callgrind target/release/deps/checkout-<hash>`.
//! `CHECKOUT_PROFILE=ab` times alternating batches of both pools and prints the best of each
//! (`ab-sqlite` the same with SQLite `:memory:` connections, whose checkouts a fork waits for);
//! `CHECKOUT_PROFILE=child` times r2d2 here and forksafe's pool in a forked child.

use std::hint::black_box;

use criterion::{criterion_group, Criterion};

mod support;

use support::NoIoManager;

const POOL_SIZE: u32 = 4;

fn checkout(c: &mut Criterion) {
    let r2d2_pool = r2d2::Pool::builder()
        .max_size(POOL_SIZE)
        .test_on_check_out(false)
        .build(NoIoManager)
        .expect("r2d2 pool");
    let forksafe_pool = forksafe_pool::Pool::builder()
        .max_size(POOL_SIZE)
        .test_on_check_out(false)
        .build(NoIoManager)
        .expect("forksafe pool");

    let mut group = c.benchmark_group("checkout");
    group.bench_function("r2d2", |b| {
        b.iter(|| {
            let conn = r2d2_pool.get().expect("checkout");
            black_box(*conn);
        })
    });
    group.bench_function("forksafe", |b| {
        b.iter(|| {
            let conn = forksafe_pool.get().expect("checkout");
            black_box(*conn);
        })
    });
    group.finish();
}

/// Runs `iterations` checkouts of one pool, for an instruction profiler.
fn profile(which: &str, iterations: u64) {
    let r2d2_pool = r2d2::Pool::builder()
        .max_size(POOL_SIZE)
        .test_on_check_out(false)
        .build(NoIoManager);
    let forksafe_pool = forksafe_pool::Pool::builder()
        .max_size(POOL_SIZE)
        .test_on_check_out(false)
        .build(NoIoManager);
    match which {
        "r2d2" => {
            let pool = r2d2_pool.expect("r2d2 pool");
            for _ in 0..iterations {
                black_box(*pool.get().expect("checkout"));
            }
        }
        "forksafe" => {
            let pool = forksafe_pool.expect("forksafe pool");
            for _ in 0..iterations {
                black_box(*pool.get().expect("checkout"));
            }
        }
        "ab" => {
            let (r2d2_pool, forksafe_pool) = (
                r2d2_pool.expect("r2d2 pool"),
                forksafe_pool.expect("forksafe pool"),
            );
            alternate(
                iterations,
                "",
                || {
                    black_box(*r2d2_pool.get().expect("checkout"));
                },
                || {
                    black_box(*forksafe_pool.get().expect("checkout"));
                },
            );
        }
        "ab-sqlite" => {
            // SQLite connections are checked out as leases a libc fork() waits for: this is
            // what that bookkeeping costs per checkout and return.
            use diesel::r2d2::ConnectionManager;
            use diesel::SqliteConnection;
            let manager = || ConnectionManager::<SqliteConnection>::new(":memory:");
            let r2d2_pool = r2d2::Pool::builder()
                .max_size(POOL_SIZE)
                .test_on_check_out(false)
                .build(manager())
                .expect("r2d2 pool");
            let forksafe_pool = forksafe_pool::Pool::builder()
                .max_size(POOL_SIZE)
                .test_on_check_out(false)
                .build(manager())
                .expect("forksafe pool");
            alternate(
                iterations,
                " (SQLite :memory: connections)",
                || drop(black_box(r2d2_pool.get().expect("checkout"))),
                || drop(black_box(forksafe_pool.get().expect("checkout"))),
            );
        }
        "child" => {
            // The pool a forked worker runs on: r2d2's best batch here, then forksafe's best
            // batch in a forked child (where r2d2 never runs, see process_pool/).
            let (r2d2_pool, forksafe_pool) = (
                r2d2_pool.expect("r2d2 pool"),
                forksafe_pool.expect("forksafe pool"),
            );
            let batch = iterations / 100;
            let best_of = |checkout: &dyn Fn()| {
                (0..100)
                    .map(|_| {
                        let start = std::time::Instant::now();
                        for _ in 0..batch {
                            checkout();
                        }
                        start.elapsed().as_nanos() as f64 / batch as f64
                    })
                    .fold(f64::MAX, f64::min)
            };
            let best_r2d2 = best_of(&|| {
                black_box(*r2d2_pool.get().expect("checkout"));
            });
            // SAFETY: the child only checks out of its own rebuilt pool, prints, and `_exit`s.
            match unsafe { nix::unistd::fork() }.expect("fork") {
                nix::unistd::ForkResult::Child => {
                    // A deadline: a child that hangs dies of SIGALRM instead of stalling the run.
                    nix::unistd::alarm::set(120);
                    let best_child = best_of(&|| {
                        black_box(*forksafe_pool.get().expect("checkout"));
                    });
                    println!(
                        "best of 100 batches of {batch}: r2d2 {best_r2d2:.1} ns in the parent, \
                         forksafe {best_child:.1} ns in a forked child, ratio {:.3}",
                        best_child / best_r2d2
                    );
                    // What the child's pool costs besides: its threads (the main thread and
                    // the pool's upkeep thread) and resident memory.
                    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
                    let field = |name: &str| {
                        status
                            .lines()
                            .find(|line| line.starts_with(name))
                            .map_or("?", |line| line[name.len()..].trim())
                            .to_string()
                    };
                    println!(
                        "the child: {} threads, VmRSS {}",
                        field("Threads:"),
                        field("VmRSS:")
                    );
                    // `_exit` skips std's flush of stdout, which is line-buffered only on a
                    // terminal.
                    let _ = std::io::Write::flush(&mut std::io::stdout());
                    // SAFETY: `_exit` has no preconditions.
                    unsafe { libc::_exit(0) }
                }
                nix::unistd::ForkResult::Parent { child } => {
                    nix::sys::wait::waitpid(child, None).expect("waitpid");
                }
            }
        }
        other => {
            panic!("CHECKOUT_PROFILE must be r2d2, forksafe, ab, ab-sqlite or child, not {other:?}")
        }
    }
}

/// Times alternating batches of both checkouts and prints the best of each: robust against
/// other jobs on a shared machine.
fn alternate(iterations: u64, what: &str, r2d2: impl Fn(), forksafe: impl Fn()) {
    let (mut best_r2d2, mut best_forksafe) = (f64::MAX, f64::MAX);
    let batch = iterations / 100;
    for _ in 0..100 {
        let start = std::time::Instant::now();
        for _ in 0..batch {
            r2d2();
        }
        best_r2d2 = best_r2d2.min(start.elapsed().as_nanos() as f64 / batch as f64);
        let start = std::time::Instant::now();
        for _ in 0..batch {
            forksafe();
        }
        best_forksafe = best_forksafe.min(start.elapsed().as_nanos() as f64 / batch as f64);
    }
    println!(
        "best of 100 alternating batches of {batch}{what}: r2d2 {best_r2d2:.1} ns, forksafe {best_forksafe:.1} ns, ratio {:.3}",
        best_forksafe / best_r2d2
    );
}

criterion_group!(benches, checkout);

fn main() {
    if let Ok(which) = std::env::var("CHECKOUT_PROFILE") {
        profile(
            &which,
            if which.starts_with("ab") || which == "child" {
                20_000_000
            } else {
                1_000_000
            },
        );
        return;
    }
    benches();
    Criterion::default().configure_from_args().final_summary();
}
