//! Checkout + return under contention: `forksafe_pool::Pool` against `r2d2::Pool`, measured
//! side by side in one run.
//!
//! `cargo bench --bench contention`
//!
//! Every thread checks a connection out and returns it at once, in a loop, for a fixed time; a
//! round counts the checkouts of all threads. Rounds of the two pools alternate (the order
//! flips every round) and each ratio is forksafe's median throughput over r2d2's. The manager
//! does no I/O and `test_on_check_out` is off, so what is measured is the pools themselves:
//! their locks, idle lists and wake-ups.
//!
//! Three parts:
//! - `parent`: threads 1, 2, 4, 8, 32, 128 against pools of 4 and of `threads` connections, both
//!   pools in this process (forksafe's runs on its own std-lock pool here, see src/process_pool/).
//! - `child`: the same grid with forksafe's pool in a forked child (the pool a pre-forked worker
//!   gets, rebuilt after the fork), against r2d2 in the parent. Each forksafe round is a new
//!   child with a deadline (SIGALRM), so a hang fails the run instead of stalling it.
//! - `wait`: 32 threads on a pool of 4 (and of 32), every checkout timed: median, p99 and
//!   maximum wait, and how many checkouts the least served thread got against the mean
//!   (fairness: nobody starved).
//!
//! Environment, all optional: `CONTENTION_PARTS` (comma-separated, default
//! `parent,child,wait`), `CONTENTION_THREADS` (default `1,2,4,8,32,128`), `CONTENTION_ROUNDS`
//! (per pool, default 5), `CONTENTION_ROUND_MS` (default 100), `CONTENTION_WAIT_ROUND_MS` (rounds
//! of the `wait` part, default 400). The default run takes about a minute.

use std::hint::black_box;
use std::io::{Read, Write};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

mod support;

use support::NoIoManager;

/// Both pools behind one face.
trait Checkouts: Send + Sync + 'static {
    fn checkout_and_return(&self);
}

impl Checkouts for r2d2::Pool<NoIoManager> {
    #[inline]
    fn checkout_and_return(&self) {
        black_box(*self.get().expect("r2d2 checkout"));
    }
}

impl Checkouts for forksafe_pool::Pool<NoIoManager> {
    #[inline]
    fn checkout_and_return(&self) {
        black_box(*self.get().expect("forksafe checkout"));
    }
}

fn r2d2_pool(size: u32) -> r2d2::Pool<NoIoManager> {
    r2d2::Pool::builder()
        .max_size(size)
        .test_on_check_out(false)
        .connection_timeout(Duration::from_secs(30))
        .build(NoIoManager)
        .expect("r2d2 pool")
}

fn forksafe_pool(size: u32) -> forksafe_pool::Pool<NoIoManager> {
    forksafe_pool::Pool::builder()
        .max_size(size)
        .test_on_check_out(false)
        .connection_timeout(Duration::from_secs(30))
        .build(NoIoManager)
        .expect("forksafe pool")
}

struct Options {
    parts: Vec<String>,
    threads: Vec<u32>,
    rounds: usize,
    round: Duration,
    wait_round: Duration,
}

impl Options {
    fn from_env() -> Self {
        let var = |name: &str| std::env::var(name).ok().filter(|value| !value.is_empty());
        let list = |value: String| -> Vec<String> {
            value
                .split(',')
                .map(|part| part.trim().to_owned())
                .collect()
        };
        Options {
            parts: var("CONTENTION_PARTS")
                .map(list)
                .unwrap_or_else(|| list("parent,child,wait".to_owned())),
            threads: var("CONTENTION_THREADS")
                .map(|value| {
                    list(value)
                        .iter()
                        .map(|n| n.parse().expect("CONTENTION_THREADS: numbers"))
                        .collect()
                })
                .unwrap_or_else(|| vec![1, 2, 4, 8, 32, 128]),
            rounds: var("CONTENTION_ROUNDS")
                .map(|n| n.parse().expect("CONTENTION_ROUNDS: a number"))
                .unwrap_or(5),
            round: Duration::from_millis(
                var("CONTENTION_ROUND_MS")
                    .map(|n| n.parse().expect("CONTENTION_ROUND_MS: a number"))
                    .unwrap_or(100),
            ),
            wait_round: Duration::from_millis(
                var("CONTENTION_WAIT_ROUND_MS")
                    .map(|n| n.parse().expect("CONTENTION_WAIT_ROUND_MS: a number"))
                    .unwrap_or(400),
            ),
        }
    }

    /// (threads, pool size) pairs: every thread count against a pool of 4 and a pool of as
    /// many connections as threads.
    fn grid(&self) -> Vec<(u32, u32)> {
        let mut grid = Vec::new();
        for &threads in &self.threads {
            grid.push((threads, 4));
            if threads != 4 {
                grid.push((threads, threads));
            }
        }
        grid
    }
}

/// One round: `threads` threads check out and return for `length`; checkouts per second. With
/// `timed`, every checkout is timed and the waits (ns) of all threads are returned too, with
/// each thread's count.
///
/// The workers first all count themselves ready, then spin until this thread lets them go; it
/// reads the clock just before it lets them go and just before it stops them, so only
/// checkouts inside the window count. (A `Barrier` would let the fastest workers start while
/// the others still queue for its mutex: with a pool whose threads never block they then wait
/// behind the running workers for a core, for hundreds of milliseconds, and this thread too,
/// before it reads the clock while their checkouts already count.)
fn round<P: Checkouts>(
    pool: &Arc<P>,
    threads: u32,
    length: Duration,
    timed: bool,
) -> (f64, Vec<u64>, Vec<u64>) {
    let go = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let ready = Arc::new(AtomicU32::new(0));
    let workers: Vec<_> = (0..threads)
        .map(|_| {
            let (pool, go, stop, ready) = (
                Arc::clone(pool),
                Arc::clone(&go),
                Arc::clone(&stop),
                Arc::clone(&ready),
            );
            std::thread::spawn(move || {
                let mut waits = Vec::new();
                let mut count = 0u64;
                ready.fetch_add(1, Ordering::AcqRel);
                while !go.load(Ordering::Acquire) {
                    std::thread::yield_now();
                }
                while !stop.load(Ordering::Relaxed) {
                    if timed {
                        let before = Instant::now();
                        pool.checkout_and_return();
                        waits.push(before.elapsed().as_nanos() as u64);
                    } else {
                        pool.checkout_and_return();
                    }
                    count += 1;
                }
                (count, waits)
            })
        })
        .collect();
    while ready.load(Ordering::Acquire) < threads {
        std::thread::yield_now();
    }
    let began = Instant::now();
    go.store(true, Ordering::Release);
    std::thread::sleep(length);
    let elapsed = began.elapsed();
    stop.store(true, Ordering::Relaxed);
    let mut counts = Vec::new();
    let mut waits = Vec::new();
    for worker in workers {
        let (count, mut thread_waits) = worker.join().expect("worker");
        counts.push(count);
        waits.append(&mut thread_waits);
    }
    let total: u64 = counts.iter().sum();
    (total as f64 / elapsed.as_secs_f64(), waits, counts)
}

/// A forksafe round in a forked child: the child rebuilds the pool (a first checkout on every
/// thread warms it to its size), runs the round, writes its throughput to a pipe and `_exit`s.
/// A child that has not finished within 60 s dies of SIGALRM and fails the run.
fn round_in_child(
    pool: &Arc<forksafe_pool::Pool<NoIoManager>>,
    threads: u32,
    length: Duration,
) -> f64 {
    let (read_end, write_end) = nix::unistd::pipe().expect("pipe");
    // SAFETY: the parent has no other threads running pool code at this point (every round
    // joins its threads; r2d2's workers sit idle), and the child only uses its own rebuilt
    // pool, std threads and the pipe before `_exit`.
    match unsafe { nix::unistd::fork() }.expect("fork") {
        nix::unistd::ForkResult::Child => {
            drop(read_end);
            nix::unistd::alarm::set(60);
            pool.warm_up().expect("warm_up in the child");
            let (throughput, _, _) = round(pool, threads, length, false);
            let mut pipe = std::fs::File::from(write_end);
            let _ = pipe.write_all(&throughput.to_le_bytes());
            // SAFETY: `_exit` has no preconditions.
            unsafe { libc::_exit(0) }
        }
        nix::unistd::ForkResult::Parent { child } => {
            drop(write_end);
            let mut bytes = [0u8; 8];
            let read = std::fs::File::from(read_end).read_exact(&mut bytes);
            let status = nix::sys::wait::waitpid(child, None).expect("waitpid");
            assert!(
                matches!(status, nix::sys::wait::WaitStatus::Exited(_, 0)) && read.is_ok(),
                "the forked child's round failed: {status:?}"
            );
            f64::from_le_bytes(bytes)
        }
    }
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(|a, b| a.total_cmp(b));
    let middle = values.len() / 2;
    if values.len() % 2 == 1 {
        values[middle]
    } else {
        (values[middle - 1] + values[middle]) / 2.0
    }
}

/// Alternating rounds of both pools on one grid point; forksafe's rounds run in a forked child
/// when `in_child`.
fn compare(options: &Options, threads: u32, size: u32, in_child: bool) {
    let r2d2 = Arc::new(r2d2_pool(size));
    let forksafe = Arc::new(forksafe_pool(size));
    // Warm both to their full size, so no round pays for connects.
    forksafe.warm_up().expect("warm_up");
    while r2d2.state().idle_connections < size {
        std::thread::sleep(Duration::from_millis(1));
    }
    let (mut ours, mut theirs) = (Vec::new(), Vec::new());
    for index in 0..options.rounds {
        let forksafe_round = || {
            if in_child {
                round_in_child(&forksafe, threads, options.round)
            } else {
                round(&forksafe, threads, options.round, false).0
            }
        };
        if index % 2 == 0 {
            ours.push(forksafe_round());
            theirs.push(round(&r2d2, threads, options.round, false).0);
        } else {
            theirs.push(round(&r2d2, threads, options.round, false).0);
            ours.push(forksafe_round());
        }
    }
    let (ours, theirs) = (median(&mut ours), median(&mut theirs));
    println!(
        "{:>7} {threads:>7} {size:>5} {:>14.2} {:>14.2} {:>7.3}",
        if in_child { "child" } else { "parent" },
        ours / 1e6,
        theirs / 1e6,
        ours / theirs
    );
}

/// Waits and fairness with every checkout timed, alternating rounds as in `compare`.
fn waits(options: &Options, threads: u32, size: u32) {
    let r2d2 = Arc::new(r2d2_pool(size));
    let forksafe = Arc::new(forksafe_pool(size));
    forksafe.warm_up().expect("warm_up");
    while r2d2.state().idle_connections < size {
        std::thread::sleep(Duration::from_millis(1));
    }
    struct Summary {
        p50: Vec<f64>,
        p99: Vec<f64>,
        max: Vec<f64>,
        least_served: Vec<f64>,
    }
    let mut summaries = [0, 1].map(|_| Summary {
        p50: Vec::new(),
        p99: Vec::new(),
        max: Vec::new(),
        least_served: Vec::new(),
    });
    for index in 0..options.rounds {
        for which in if index % 2 == 0 { [0, 1] } else { [1, 0] } {
            let (_, mut waits, counts) = if which == 0 {
                round(&forksafe, threads, options.wait_round, true)
            } else {
                round(&r2d2, threads, options.wait_round, true)
            };
            waits.sort_unstable();
            let at = |quantile: f64| waits[((waits.len() - 1) as f64 * quantile) as usize] as f64;
            let mean = counts.iter().sum::<u64>() as f64 / counts.len() as f64;
            let summary = &mut summaries[which];
            summary.p50.push(at(0.5));
            summary.p99.push(at(0.99));
            summary.max.push(*waits.last().expect("a checkout") as f64);
            summary
                .least_served
                .push(*counts.iter().min().expect("a thread") as f64 / mean);
        }
    }
    for (name, summary) in ["forksafe", "r2d2"].iter().zip(&mut summaries) {
        println!(
            "{name:>9} {threads:>7} {size:>5} {:>10.1} {:>10.1} {:>10.1} {:>12.2}",
            median(&mut summary.p50) / 1e3,
            median(&mut summary.p99) / 1e3,
            median(&mut summary.max) / 1e3,
            median(&mut summary.least_served),
        );
    }
}

fn main() {
    // `cargo bench` passes `--bench`; this harness takes its options from the environment.
    let options = Options::from_env();
    println!(
        "{} rounds of {:?} per pool and point, alternating; medians (load: {})",
        options.rounds,
        options.round,
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .trim()
    );
    for part in &options.parts {
        match part.as_str() {
            "parent" | "child" => {
                println!(
                    "\n{:>7} {:>7} {:>5} {:>14} {:>14} {:>7}",
                    "where", "threads", "pool", "forksafe M/s", "r2d2 M/s", "ratio"
                );
                for (threads, size) in options.grid() {
                    compare(&options, threads, size, part == "child");
                }
            }
            "wait" => {
                println!(
                    "\nwait per checkout, µs (median of rounds); least served thread / mean\n\
                     {:>9} {:>7} {:>5} {:>10} {:>10} {:>10} {:>12}",
                    "pool", "threads", "size", "p50", "p99", "max", "least/mean"
                );
                waits(&options, 32, 4);
                waits(&options, 32, 32);
            }
            other => panic!("CONTENTION_PARTS: parent, child or wait, not {other:?}"),
        }
    }
}
