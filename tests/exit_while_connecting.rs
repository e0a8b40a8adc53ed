//! A process that calls `exit` while the pool connects on other threads (uWSGI's
//! `--max-requests` and gunicorn's `max_requests` end workers with `exit`).
//!
//! `exit` runs the `atexit` handlers, OpenSSL's cleanup among them: it frees OpenSSL's global
//! state while a TLS handshake on another thread still uses it, and the process dies of a
//! signal. The pool's own `exit` handler runs before OpenSSL's: it waits (at most a second) for
//! connects and closes in progress on other threads, and keeps new ones from starting.
//!
//! - `exit_waits_for_a_connect_in_flight…`, `no_connect_starts_once_exit_has_begun…`,
//!   `exit_waits_for_a_validation_in_flight…`, `exit_waits_for_a_connect_thread_that_is_ending`:
//!   with a manager that reports when each connect
//!   (and validation) begins and ends, in the process that built the pool
//!   and in a forked child that rebuilds it. No server and no TLS: what they check does not
//!   depend on timing.
//! - `tls::…` (feature `diesel-postgres`), a measurement: children that start TLS connects with
//!   diesel's `PgConnection` (`sslmode=require`) on 4 threads and `exit(0)` soon after the first
//!   one returned, while the others run, counted by how they ended: plain r2d2 side by side with
//!   this crate's pool, in the process that built it and in forked children racing their first
//!   `get`. It checks that no child hangs and prints the counts; with `FORKSAFE_EXIT_RUNS` set
//!   (children per variant, default 40) it also checks that neither of this crate's variants died
//!   of a signal more often than plain r2d2 (a comparison of two counts of chance events, so it
//!   is left out of the plain test run, where only the deterministic cases above decide).
//!   Environment: `FORKSAFE_PG_URL` (default
//!   `postgres://postgres@127.0.0.1:5432/test`); without a server the case is skipped, unless
//!   `CI` is set.
//!
//! A `harness = false` binary (see `fork_core.rs`).

#[macro_use]
mod support;

use std::io::Read;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use forksafe_pool::Pool;
use support::fork::{reap, spawn_child, ChildEnd};
use support::runner::{run_cases, Check, NamedCase};

const DEADLINE: Duration = Duration::from_secs(20);

/// How long a reporting connect takes: long enough that `exit` surely begins while one runs.
const CONNECT_TAKES: Duration = Duration::from_millis(300);

/// A manager whose connects write `begin N` and `end N` lines to a pipe (with `write(2)`, so a
/// line is out before the next statement runs) and take [`CONNECT_TAKES`] in between; with
/// `slow_pings`, its validations (`is_valid`) write `ping begin N` and `ping end N` and take as
/// long. `N` counts connects and validations together.
#[derive(Clone)]
struct Reporting {
    to_test: RawFd,
    attempts: Arc<AtomicU32>,
    slow_pings: bool,
    /// Each connect leaves its thread a thread-local value whose destructor writes
    /// `thread end begin`, takes [`CONNECT_TAKES`], writes `thread end end` and counts itself in
    /// `attempts`: what a driver's thread-specific data (libkrb5's, OpenSSL's) does when the
    /// thread that connected ends.
    slow_thread_end: bool,
}

/// What a connect leaves its thread when `slow_thread_end` is set.
struct ThreadEnd(Reporting);

impl Drop for ThreadEnd {
    fn drop(&mut self) {
        self.0.attempts.fetch_add(1, Ordering::SeqCst);
        self.0.report("thread end begin");
        std::thread::sleep(CONNECT_TAKES);
        self.0.report("thread end end");
    }
}

thread_local! {
    static THREAD_END: std::cell::RefCell<Option<ThreadEnd>> = const { std::cell::RefCell::new(None) };
}

impl Reporting {
    fn report(&self, line: &str) {
        // SAFETY: the pipe's write end stays open in every process that uses this manager
        // (the test process closes its own only once its pool can no longer connect).
        let fd = unsafe { BorrowedFd::borrow_raw(self.to_test) };
        // A failed write shows as a missing line, which the test reports.
        let _ = nix::unistd::write(fd, format!("{line}\n").as_bytes());
    }
}

impl r2d2::ManageConnection for Reporting {
    type Connection = u32;
    type Error = std::io::Error;

    fn connect(&self) -> std::io::Result<u32> {
        let n = self.attempts.fetch_add(1, Ordering::SeqCst);
        self.report(&format!("begin {n}"));
        std::thread::sleep(CONNECT_TAKES);
        self.report(&format!("end {n}"));
        if self.slow_thread_end {
            THREAD_END.with(|end| *end.borrow_mut() = Some(ThreadEnd(self.clone())));
        }
        Ok(n)
    }

    fn is_valid(&self, _: &mut u32) -> std::io::Result<()> {
        if self.slow_pings {
            let n = self.attempts.fetch_add(1, Ordering::SeqCst);
            self.report(&format!("ping begin {n}"));
            std::thread::sleep(CONNECT_TAKES);
            self.report(&format!("ping end {n}"));
        }
        Ok(())
    }

    fn has_broken(&self, _: &mut u32) -> bool {
        false
    }
}

/// Where the pool of the exiting process comes from.
#[derive(Clone, Copy, Debug)]
enum Built {
    /// Built by the process that exits.
    ByTheExitingProcess,
    /// Built by the test process and inherited: the exiting child rebuilds it.
    BeforeTheFork,
}

fn reporting_pool(manager: Reporting) -> Pool<Reporting> {
    Pool::builder()
        .max_size(2)
        .min_idle(Some(0))
        .connection_timeout(Duration::from_secs(5))
        .build(manager)
        .expect("a pool with min_idle 0 builds without connecting")
}

/// Forks a child that gets a pool (built as `built` says) and runs `child` with it, then leaves
/// through libc's `exit(0)`; returns how the child ended and the lines its connects wrote.
///
/// The test process itself never builds a pool, so that every child starts as a server's first
/// process does, with no thread pool inherited: a pool built "before the fork" is built in a
/// master, a child of the test process, which forks the exiting child.
fn exiting_child(
    built: Built,
    (slow_pings, slow_thread_end): (bool, bool),
    child: impl FnOnce(&Pool<Reporting>, &AtomicU32),
) -> Result<(ChildEnd, String), String> {
    let (read, write): (OwnedFd, OwnedFd) =
        nix::unistd::pipe().map_err(|error| format!("pipe: {error}"))?;
    let manager = Reporting {
        to_test: write.as_raw_fd(),
        attempts: Arc::new(AtomicU32::new(0)),
        slow_pings,
        slow_thread_end,
    };
    let exiting = |pool: &Pool<Reporting>| {
        child(pool, &manager.attempts);
        // SAFETY: ends the child through libc's `exit`, as a server's worker does; nothing
        // else runs `atexit` handlers in this child.
        unsafe { libc::exit(0) }
    };
    let pid = match built {
        Built::ByTheExitingProcess => spawn_child(|| exiting(&reporting_pool(manager.clone()))),
        Built::BeforeTheFork => spawn_child(|| {
            let pool = reporting_pool(manager.clone());
            let end = reap(spawn_child(|| exiting(&pool)), DEADLINE);
            manager.report(&format!("the exiting child ended {end:?}"));
            // The master's pool is never dropped: it ends with the master's `_exit`.
            std::mem::forget(pool);
            0
        }),
    };
    drop(write);
    let mut lines = String::new();
    // Ends once every copy of the write end is gone: the child (and its master) have exited.
    let _ = std::fs::File::from(read).read_to_string(&mut lines);
    let end = reap(pid, DEADLINE);
    Ok(match built {
        Built::ByTheExitingProcess => (end, lines),
        Built::BeforeTheFork => {
            ensure!(
                end == ChildEnd::Exited(0),
                "the master ended {end:?}: {lines:?}"
            );
            let (lines, last) = lines
                .trim_end_matches('\n')
                .rsplit_once('\n')
                .map(|(lines, last)| (format!("{lines}\n"), last.to_string()))
                .unwrap_or_else(|| (String::new(), lines.trim_end().to_string()));
            let end = match last.as_str() {
                "the exiting child ended Exited(0)" => ChildEnd::Exited(0),
                _ => return Err(format!("{last} (lines: {lines:?})")),
            };
            (end, lines)
        }
    })
}

/// Waits (bounded) until a connect has begun.
fn wait_for_a_begin(attempts: &AtomicU32) {
    wait_for_begins(attempts, 1);
}

/// Waits (bounded) until `count` connects and validations have begun.
fn wait_for_begins(attempts: &AtomicU32, count: u32) {
    let until = Instant::now() + Duration::from_secs(5);
    while attempts.load(Ordering::SeqCst) < count && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Starts a thread that checks out a connection and holds it.
fn get_on_a_thread(pool: &Pool<Reporting>, after: Duration) {
    let pool = pool.clone();
    std::thread::spawn(move || {
        std::thread::sleep(after);
        let _held = pool.get();
        std::thread::sleep(Duration::from_secs(60));
    });
}

/// `exit` on the main thread while another thread is inside a connect: the connect ends (its
/// `end` line is written) before the process does.
fn exit_waits_for_a_connect_in_flight(built: Built) -> Check {
    let (end, lines) = exiting_child(built, (false, false), |pool, attempts| {
        get_on_a_thread(pool, Duration::ZERO);
        wait_for_a_begin(attempts);
    })?;
    ensure!(end == ChildEnd::Exited(0), "the child ended {end:?}");
    ensure!(
        lines == "begin 0\nend 0\n",
        "the connect in flight at exit did not end before the process did: {lines:?}"
    );
    Ok(())
}

/// A connect asked for after `exit` has begun (while `exit` waits for one in flight) does not
/// start: the driver's code would run against the state the `atexit` handlers free.
fn no_connect_starts_once_exit_has_begun(built: Built) -> Check {
    let (end, lines) = exiting_child(built, (false, false), |pool, attempts| {
        get_on_a_thread(pool, Duration::ZERO);
        wait_for_a_begin(attempts);
        // Asks a third of the way into the first connect, while exit waits for it.
        get_on_a_thread(pool, CONNECT_TAKES / 3);
    })?;
    ensure!(end == ChildEnd::Exited(0), "the child ended {end:?}");
    ensure!(
        lines == "begin 0\nend 0\n",
        "expected the connect in flight to end and no other to begin: {lines:?}"
    );
    Ok(())
}

/// `exit` while another thread validates a connection it is checking out (`is_valid`, a query
/// on the connection on the pool's behalf, the same TLS code as a connect): the validation ends
/// before the process does.
fn exit_waits_for_a_validation_in_flight(built: Built) -> Check {
    let (end, lines) = exiting_child(built, (true, false), |pool, attempts| {
        // Opens the connection (the pool may validate it on the way) and puts it back.
        drop(pool.get());
        let before = attempts.load(Ordering::SeqCst);
        get_on_a_thread(pool, Duration::ZERO);
        wait_for_begins(attempts, before + 1);
    })?;
    ensure!(end == ChildEnd::Exited(0), "the child ended {end:?}");
    let last = lines.lines().last().unwrap_or_default();
    ensure!(
        lines.starts_with("begin 0\nend 0\n") && last.starts_with("ping end "),
        "the validation in flight at exit did not end before the process did: {lines:?}"
    );
    Ok(())
}

/// `exit` while a thread the pool connected on is ending (its thread-specific data being
/// destroyed, which for libkrb5 and OpenSSL takes their global locks): it ends before the
/// process does. A forked child connects on threads of its own that end after each connect.
fn exit_waits_for_a_connect_thread_that_is_ending() -> Check {
    let (end, lines) = exiting_child(Built::BeforeTheFork, (false, true), |pool, attempts| {
        drop(pool.get());
        // The connect (1) and its thread's end (2) have begun.
        wait_for_begins(attempts, 2);
    })?;
    ensure!(end == ChildEnd::Exited(0), "the child ended {end:?}");
    ensure!(
        lines == "begin 0\nend 0\nthread end begin\nthread end end\n",
        "the connect thread ending at exit did not end before the process did: {lines:?}"
    );
    Ok(())
}

#[cfg(feature = "diesel-postgres")]
mod tls {
    //! Real TLS connects racing `exit`, counted; see the module docs of the binary.

    use std::time::Duration;

    use diesel::pg::PgConnection;
    use diesel::r2d2::ConnectionManager;
    use diesel::Connection;

    use nix::sys::signal::Signal;

    use super::support::fork::{reap, spawn_child, ChildEnd};
    use super::support::runner::{skip_unless_ci, Check, NamedCase};
    use super::DEADLINE;

    type Manager = ConnectionManager<PgConnection>;

    /// Threads that race their first `get` in each child.
    const THREADS: usize = 4;

    fn url() -> String {
        let base = std::env::var("FORKSAFE_PG_URL")
            .ok()
            .filter(|url| !url.is_empty())
            .unwrap_or_else(|| String::from("postgres://postgres@127.0.0.1:5432/test"));
        let separator = if base.contains('?') { '&' } else { '?' };
        format!("{base}{separator}sslmode=require")
    }

    /// Children per variant, and whether they were asked for (a measurement run).
    fn runs() -> (usize, bool) {
        match std::env::var("FORKSAFE_EXIT_RUNS")
            .ok()
            .and_then(|runs| runs.parse().ok())
        {
            Some(runs) => (runs, true),
            None => (40, false),
        }
    }

    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    enum Variant {
        /// Plain r2d2, built by the child that exits.
        R2d2,
        /// This crate's pool, built by the child that exits.
        OursBuilding,
        /// This crate's pool built by the test process; the child's threads race their first
        /// `get`, which rebuilds it in the child.
        OursInAForkedChild,
    }

    /// How the children of one variant ended.
    #[derive(Debug, Default)]
    struct Ends {
        exited: usize,
        signaled: usize,
        signals: std::collections::BTreeMap<String, usize>,
        other: Vec<String>,
    }

    /// Starts `THREADS` threads that each check out a connection (each a new TLS connect), and
    /// exits `delay` after the first checkout returned (at most 10 s after starting them): the
    /// other threads' connects are then in flight.
    fn race_then_exit<G>(get: G, delay: Duration) -> !
    where
        G: Fn() + Clone + Send + 'static,
    {
        let (got, first) = std::sync::mpsc::channel();
        for _ in 0..THREADS {
            let (get, got) = (get.clone(), got.clone());
            std::thread::spawn(move || {
                get();
                let _ = got.send(());
                std::thread::sleep(Duration::from_secs(60));
            });
        }
        let _ = first.recv_timeout(Duration::from_secs(10));
        std::thread::sleep(delay);
        // SAFETY: ends the child through libc's `exit`, as a server's worker does.
        unsafe { libc::exit(0) }
    }

    fn manager() -> Manager {
        Manager::new(url())
    }

    /// The child of one run: it races its first `get`s on `THREADS` threads and exits after
    /// `delay`. For [`Variant::OursInAForkedChild`] it is a master that builds and warms this
    /// crate's pool and forks that child, and exits with how it ended (0, or 100 + the signal
    /// that killed it, or 99): the test process itself keeps no pool, whose parked thread pool
    /// would make plain r2d2's thread pool unsafe to start in the other variants' children
    /// (docs/parking-lot.md).
    fn child(variant: Variant, delay: Duration) -> i32 {
        match variant {
            Variant::R2d2 => {
                let pool = r2d2::Pool::builder()
                    .max_size(THREADS as u32)
                    .min_idle(Some(0))
                    .build(manager())
                    .expect("build");
                race_then_exit(move || std::mem::forget(pool.get()), delay)
            }
            Variant::OursBuilding => {
                let pool = forksafe_pool::Pool::builder()
                    .max_size(THREADS as u32)
                    .min_idle(Some(0))
                    .build(manager())
                    .expect("build");
                race_then_exit(move || std::mem::forget(pool.get()), delay)
            }
            Variant::OursInAForkedChild => {
                let pool = forksafe_pool::Pool::builder()
                    .max_size(THREADS as u32)
                    .build(manager())
                    .expect("build");
                let pid = spawn_child(|| {
                    let pool = pool.clone();
                    race_then_exit(move || std::mem::forget(pool.get()), delay)
                });
                let end = reap(pid, DEADLINE);
                std::mem::forget(pool);
                match end {
                    ChildEnd::Exited(0) => 0,
                    ChildEnd::Signaled(signal) => 100 + signal as i32,
                    _ => 99,
                }
            }
        }
    }

    /// How a run's child ended, through its master for [`Variant::OursInAForkedChild`].
    fn run_end(variant: Variant, end: ChildEnd) -> ChildEnd {
        match (variant, end) {
            (Variant::OursInAForkedChild, ChildEnd::Exited(code)) if code > 100 => {
                Signal::try_from(code - 100).map_or(ChildEnd::Exited(code), ChildEnd::Signaled)
            }
            (Variant::OursInAForkedChild, ChildEnd::Exited(99)) => ChildEnd::Hung,
            (_, end) => end,
        }
    }

    /// Children of all three variants, interleaved so that each meets the same load: none may
    /// hang; in a measurement run neither of this crate's variants may die of a signal more
    /// often than plain r2d2's.
    fn exit_with_tls_connects_in_flight_crashes_no_more_than_r2d2() -> Check {
        if let Err(error) = PgConnection::establish(&url()) {
            return skip_unless_ci(
                &format!("PostgreSQL with TLS at {} is unreachable: {error}", url()),
                "set FORKSAFE_PG_URL",
            );
        }
        let variants = [
            Variant::R2d2,
            Variant::OursBuilding,
            Variant::OursInAForkedChild,
        ];
        let mut ends: Vec<Ends> = variants.iter().map(|_| Ends::default()).collect();
        let (runs, measuring) = runs();
        for run in 0..runs {
            // From right after the first checkout to well past the other connects (a TLS
            // connect takes a few ms on loopback).
            let delay = Duration::from_micros(250 * (run % 12) as u64);
            for (variant, ends) in variants.iter().zip(&mut ends) {
                let pid = spawn_child(|| child(*variant, delay));
                match run_end(*variant, reap(pid, DEADLINE)) {
                    ChildEnd::Exited(0) => ends.exited += 1,
                    ChildEnd::Signaled(signal) => {
                        ends.signaled += 1;
                        *ends.signals.entry(format!("{signal:?}")).or_default() += 1;
                    }
                    end => ends.other.push(format!("run {run}: {end:?}")),
                }
            }
        }
        for (variant, ends) in variants.iter().zip(&ends) {
            println!(
                "  {variant:?}: {} of {runs} died of a signal {:?}, {} exited 0, other: {:?}",
                ends.signaled, ends.signals, ends.exited, ends.other
            );
        }
        let r2d2 = ends[0].signaled;
        for (variant, ends) in variants.iter().zip(&ends) {
            ensure!(ends.other.is_empty(), "{variant:?}: {:?}", ends.other);
        }
        for (variant, ends) in variants.iter().zip(&ends).skip(1) {
            ensure!(
                !measuring || ends.signaled <= r2d2,
                "{variant:?}: {} of {runs} children died of a signal, plain r2d2's {r2d2}",
                ends.signaled
            );
        }
        Ok(())
    }

    pub fn cases() -> Vec<NamedCase> {
        vec![(
            String::from("tls::exit_with_tls_connects_in_flight_crashes_no_more_than_r2d2"),
            exit_with_tls_connects_in_flight_crashes_no_more_than_r2d2,
        )]
    }
}

fn main() {
    #[allow(unused_mut)]
    let mut cases: Vec<NamedCase> = vec![
        (String::from("exit_waits_for_a_connect_in_flight"), || {
            exit_waits_for_a_connect_in_flight(Built::ByTheExitingProcess)
        }),
        (
            String::from("exit_waits_for_a_connect_in_flight_in_a_forked_child"),
            || exit_waits_for_a_connect_in_flight(Built::BeforeTheFork),
        ),
        (
            String::from("no_connect_starts_once_exit_has_begun"),
            || no_connect_starts_once_exit_has_begun(Built::ByTheExitingProcess),
        ),
        (
            String::from("no_connect_starts_once_exit_has_begun_in_a_forked_child"),
            || no_connect_starts_once_exit_has_begun(Built::BeforeTheFork),
        ),
        (
            String::from("exit_waits_for_a_validation_in_flight"),
            || exit_waits_for_a_validation_in_flight(Built::ByTheExitingProcess),
        ),
        (
            String::from("exit_waits_for_a_validation_in_flight_in_a_forked_child"),
            || exit_waits_for_a_validation_in_flight(Built::BeforeTheFork),
        ),
        (
            String::from("exit_waits_for_a_connect_thread_that_is_ending"),
            exit_waits_for_a_connect_thread_that_is_ending,
        ),
    ];
    #[cfg(feature = "diesel-postgres")]
    cases.extend(tls::cases());
    run_cases(cases);
}
