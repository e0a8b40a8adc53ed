//! The fork torture scenarios of `tests/torture.rs`, at CI length or full length.
//!
//! Every scenario forks for real while parent threads use the pool, reaps every child with a
//! deadline (a child still alive then is killed and counted as hung), checks in the child that
//! each answer belongs to its own request, and checks in the parent that its threads never
//! saw an error or a foreign answer. The FakeServer scenarios also check afterwards that no
//! process ever wrote on a connection another process opened.
use std::collections::VecDeque;
use std::fmt;
use std::os::unix::process::CommandExt;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::support::fake_server::{FakeManager, FakeServer};
use crate::support::fork::{reap, spawn_child, spawn_raw, ChildEnd};
use crate::support::no_io::{NoIoConnection, NoIoManager};
use diesel::pg::PgConnection;
use diesel::r2d2::ConnectionManager;
use diesel::sql_types::Integer;
use diesel::{QueryableByName, RunQueryDsl};
use forksafe_pool::Pool;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// How long a child may take before it counts as hung. Generous: a healthy child takes
/// milliseconds, so only a real hang (or a machine under extreme load) reaches it.
pub const CHILD_DEADLINE: Duration = Duration::from_secs(20);

/// Children alive at once in the storms.
const IN_FLIGHT: usize = 4;

/// Iteration counts of one run.
#[derive(Clone, Copy, Debug)]
pub struct Scale {
    pub postgres_storm: u64,
    pub fake_storm: u64,
    /// Children per way of ending (five ways).
    pub child_ends: u64,
    /// Chains of three nested forks.
    pub nested: u64,
    pub non_main_thread: u64,
    pub raw_fork: u64,
    pub fork_during_rebuild: u64,
    /// `Command::spawn` calls (half of them with `pre_exec`).
    pub command_spawn: u64,
    /// Workers that each fork [`GRANDCHILDREN`] while their pool's upkeep churns.
    pub upkeep_workers: u64,
}

impl Scale {
    /// What CI runs (`cargo test`): a few minutes on 2 cores.
    pub const CI: Scale = Scale {
        postgres_storm: 300,
        fake_storm: 3000,
        child_ends: 60,
        nested: 100,
        non_main_thread: 300,
        raw_fork: 1000,
        fork_during_rebuild: 300,
        command_spawn: 300,
        upkeep_workers: 30,
    };

    /// The full-length run of the example.
    pub const FULL: Scale = Scale {
        postgres_storm: 10_000,
        fake_storm: 20_000,
        child_ends: 1000,
        nested: 1000,
        non_main_thread: 3000,
        raw_fork: 10_000,
        fork_during_rebuild: 3000,
        command_spawn: 3000,
        upkeep_workers: 300,
    };
}

/// What one scenario saw.
#[derive(Debug, Default)]
pub struct Outcome {
    pub scenario: &'static str,
    /// Processes forked (for scenario 8: processes spawned).
    pub forks: u64,
    /// Children still alive at their deadline (killed).
    pub hung: u64,
    /// Children that ended other than expected, or whose answers were wrong.
    pub failed: u64,
    /// Errors or foreign answers seen by the parent's threads, and writes by one process on a
    /// connection another process opened.
    pub parent_errors: u64,
    /// Checkouts the parent's threads did meanwhile.
    pub parent_checkouts: u64,
    /// Why the scenario did not run.
    pub skipped: Option<String>,
    /// The first few problems, for the report.
    pub problems: Vec<String>,
    pub elapsed: Duration,
}

impl Outcome {
    fn new(scenario: &'static str) -> Outcome {
        Outcome {
            scenario,
            ..Outcome::default()
        }
    }

    fn problem(&mut self, what: String) {
        if self.problems.len() < 8 {
            self.problems.push(what);
        }
    }

    /// Records how a child ended; `expected` is its exit code (or `Err(signal)`).
    fn child_ended(&mut self, pid: Pid, end: ChildEnd, expected: Result<i32, Signal>) {
        self.forks += 1;
        match (end, expected) {
            (ChildEnd::Hung, _) => {
                self.hung += 1;
                self.problem(format!(
                    "child {pid} hung (killed after {CHILD_DEADLINE:?})"
                ));
            }
            (ChildEnd::Exited(code), Ok(want)) if code == want => {}
            (ChildEnd::Signaled(signal), Err(want)) if signal == want => {}
            (end, _) => {
                self.failed += 1;
                self.problem(format!(
                    "child {pid}: {end:?}, expected {expected:?} ({})",
                    describe(&end)
                ));
            }
        }
    }

    pub fn passed(&self) -> bool {
        self.skipped.is_none() && self.hung == 0 && self.failed == 0 && self.parent_errors == 0
    }
}

/// The meaning of the children's exit codes.
fn describe(end: &ChildEnd) -> &'static str {
    match end {
        ChildEnd::Exited(2) => "get() failed",
        ChildEnd::Exited(3) => "query failed",
        ChildEnd::Exited(4) => "another process's answer or connection",
        ChildEnd::Exited(5) => "its own child failed or hung",
        ChildEnd::Exited(50..=57) => "its own child exited with the code minus 50",
        ChildEnd::Exited(58) => "its own child was killed by a signal",
        ChildEnd::Exited(59) => "its own child hung",
        ChildEnd::Exited(6) => "fork failed",
        ChildEnd::Exited(7) => "min_idle not reached in the background",
        ChildEnd::Exited(101) => "panicked",
        _ => "",
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.skipped {
            Some(why) => write!(f, "| {} | skipped: {why} | | | | |", self.scenario),
            None => write!(
                f,
                "| {} | {} | {} | {} | {} | {} ({:.1} s) |",
                self.scenario,
                self.forks,
                self.hung,
                self.failed,
                self.parent_errors,
                self.parent_checkouts,
                self.elapsed.as_secs_f64()
            ),
        }
    }
}

pub const TABLE_HEADER: &str = "| scenario | forks | hung | failed | parent errors | parent checkouts meanwhile |\n|---|---|---|---|---|---|";

type Scenario = fn(&Scale) -> Outcome;

/// Runs the scenarios whose number is in `only` (all when empty).
pub fn run_all(scale: &Scale, only: &[u32], mut report: impl FnMut(&Outcome)) -> Vec<Outcome> {
    let scenarios: [(u32, Scenario); 9] = [
        (1, postgres_storm),
        (2, fake_storm),
        (3, child_ends),
        (4, nested_forks),
        (5, fork_from_non_main_thread),
        (6, raw_fork_syscall),
        (7, fork_during_rebuild),
        (8, command_spawn),
        (9, fork_during_upkeep),
    ];
    let mut outcomes = Vec::new();
    for (number, scenario) in scenarios {
        if only.is_empty() || only.contains(&number) {
            let started = Instant::now();
            let mut outcome = scenario(scale);
            outcome.elapsed = started.elapsed();
            report(&outcome);
            outcomes.push(outcome);
        }
    }
    outcomes
}

// ---------------------------------------------------------------------------------------------
// Parent load

/// Three threads that check out, use and return connections until stopped.
struct Hammer {
    stop: Arc<AtomicBool>,
    checkouts: Arc<AtomicU64>,
    errors: Arc<AtomicU64>,
    first_errors: Arc<Mutex<Vec<String>>>,
    threads: Vec<JoinHandle<()>>,
}

impl Hammer {
    fn start(work: impl Fn(u64) -> Result<(), String> + Send + Sync + 'static) -> Hammer {
        let work = Arc::new(work);
        let stop = Arc::new(AtomicBool::new(false));
        let checkouts = Arc::new(AtomicU64::new(0));
        let errors = Arc::new(AtomicU64::new(0));
        let first_errors = Arc::new(Mutex::new(Vec::new()));
        let threads = (0..3)
            .map(|thread| {
                let (work, stop, checkouts, errors, first_errors) = (
                    Arc::clone(&work),
                    Arc::clone(&stop),
                    Arc::clone(&checkouts),
                    Arc::clone(&errors),
                    Arc::clone(&first_errors),
                );
                std::thread::spawn(move || {
                    let mut n = thread * 1_000_000_000;
                    while !stop.load(Ordering::Relaxed) {
                        n += 1;
                        if let Err(error) = work(n) {
                            errors.fetch_add(1, Ordering::Relaxed);
                            let mut first = first_errors.lock().unwrap();
                            if first.len() < 4 {
                                first.push(error);
                            }
                        }
                        checkouts.fetch_add(1, Ordering::Relaxed);
                    }
                })
            })
            .collect();
        Hammer {
            stop,
            checkouts,
            errors,
            first_errors,
            threads,
        }
    }

    fn finish(self, outcome: &mut Outcome) {
        self.stop.store(true, Ordering::Relaxed);
        for thread in self.threads {
            if thread.join().is_err() {
                outcome.parent_errors += 1;
                outcome.problem("a parent thread panicked".into());
            }
        }
        outcome.parent_checkouts += self.checkouts.load(Ordering::Relaxed);
        outcome.parent_errors += self.errors.load(Ordering::Relaxed);
        for error in self.first_errors.lock().unwrap().drain(..) {
            outcome.problem(format!("parent thread: {error}"));
        }
    }
}

/// Forks `count` children running `child(i)` (exit code 0 expected), at most [`IN_FLIGHT`]
/// alive at once, each reaped within [`CHILD_DEADLINE`] of its fork.
fn storm(outcome: &mut Outcome, count: u64, mut child: impl FnMut(u64) -> i32) {
    let mut alive: VecDeque<(Pid, Instant)> = VecDeque::new();
    for i in 0..count {
        if alive.len() >= IN_FLIGHT {
            reap_oldest(outcome, &mut alive);
        }
        let pid = spawn_child(|| child(i));
        alive.push_back((pid, Instant::now()));
    }
    while !alive.is_empty() {
        reap_oldest(outcome, &mut alive);
    }
}

fn reap_oldest(outcome: &mut Outcome, alive: &mut VecDeque<(Pid, Instant)>) {
    if let Some((pid, forked)) = alive.pop_front() {
        let end = reap(pid, CHILD_DEADLINE.saturating_sub(forked.elapsed()));
        outcome.child_ended(pid, end, Ok(0));
    }
}

// ---------------------------------------------------------------------------------------------
// Scenario 1: PostgreSQL

#[derive(QueryableByName)]
struct Echo {
    #[diesel(sql_type = Integer)]
    v: i32,
}

type PgPool = Pool<ConnectionManager<PgConnection>>;

pub fn postgres_url() -> String {
    std::env::var("FORKSAFE_PG_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

/// Runs `SELECT $1` and checks that the answer is ours.
fn pg_echo(
    conn: &mut forksafe_pool::PooledConnection<ConnectionManager<PgConnection>>,
    value: i32,
) -> Result<(), String> {
    let row: Echo = diesel::sql_query("SELECT $1::int4 AS v")
        .bind::<Integer, _>(value)
        .get_result(conn)
        .map_err(|error| format!("query: {error}"))?;
    if row.v != value {
        return Err(format!(
            "asked for {value}, got {} (another process's answer)",
            row.v
        ));
    }
    Ok(())
}

fn postgres_storm(scale: &Scale) -> Outcome {
    let mut outcome = Outcome::new("1. fork storm, PostgreSQL (diesel PgConnection, TLS)");
    let pool: PgPool = match Pool::builder()
        .max_size(4)
        .min_idle(Some(2))
        .connection_timeout(Duration::from_secs(10))
        .build(ConnectionManager::<PgConnection>::new(postgres_url()))
    {
        Ok(pool) => pool,
        Err(error) => {
            let why = format!("no PostgreSQL at {}: {error}", postgres_url());
            if std::env::var_os("CI").is_some() {
                outcome.failed += 1;
                outcome.problem(format!("CI is set, so a missing server fails: {why}"));
            } else {
                outcome.skipped = Some(why);
            }
            return outcome;
        }
    };
    let hammer = {
        let pool = pool.clone();
        Hammer::start(move |n| {
            let mut conn = pool.get().map_err(|error| format!("get: {error}"))?;
            pg_echo(&mut conn, (n % 1_000_000_007) as i32)
        })
    };
    storm(&mut outcome, scale.postgres_storm, |i| {
        let value = (std::process::id() as i32)
            .wrapping_mul(7)
            .wrapping_add(i as i32);
        let mut conn = match pool.get() {
            Ok(conn) => conn,
            Err(error) => {
                eprintln!("process {}: get: {error}", std::process::id());
                return 2;
            }
        };
        match pg_echo(&mut conn, value) {
            Ok(()) => 0,
            Err(error) => {
                eprintln!("process {}: {error}", std::process::id());
                if error.starts_with("query") {
                    3
                } else {
                    4
                }
            }
        }
    });
    hammer.finish(&mut outcome);
    outcome
}

// ---------------------------------------------------------------------------------------------
// Scenario 2: no I/O at all, to hunt lock states

/// Parent load on a no-I/O pool: every checkout must be a connection this process opened.
/// Nothing is allocated unless a checkout goes wrong.
fn no_io_hammer(pool: &Pool<NoIoManager>) -> Hammer {
    let pool = pool.clone();
    let parent = std::process::id();
    Hammer::start(move |_| match pool.get() {
        Ok(conn) if conn.opened_by == parent => Ok(()),
        Ok(_) => Err("a connection another process opened".into()),
        Err(error) => Err(format!("get: {error}")),
    })
}

fn no_io_pool() -> Pool<NoIoManager> {
    Pool::builder()
        .max_size(4)
        .connection_timeout(Duration::from_secs(10))
        .descriptor_locator(|_: &mut NoIoConnection| Some(Vec::new()))
        .build(NoIoManager::default())
        .expect("no-I/O pool")
}

fn fake_storm(scale: &Scale) -> Outcome {
    let mut outcome = Outcome::new("2. fork storm, no-I/O manager");
    let pool = no_io_pool();
    let parent = std::process::id();
    let hammer = {
        let pool = pool.clone();
        Hammer::start(move |_| {
            let conn = pool.get().map_err(|error| format!("get: {error}"))?;
            if conn.opened_by != parent {
                return Err(format!("a connection opened by process {}", conn.opened_by));
            }
            Ok(())
        })
    };
    storm(&mut outcome, scale.fake_storm, |_| {
        let Ok(conn) = pool.get() else { return 2 };
        if conn.opened_by != std::process::id() {
            return 4;
        }
        // A second checkout while holding the first: the child's pool opens another one.
        let Ok(second) = pool.get() else { return 2 };
        if second.opened_by != std::process::id() {
            return 4;
        }
        0
    });
    hammer.finish(&mut outcome);
    outcome
}

// ---------------------------------------------------------------------------------------------
// FakeServer helpers (scenarios 3-8): every line on the wire says which process wrote it.

type FakePool = Pool<FakeManager>;

fn fake_pool(server: &FakeServer) -> FakePool {
    Pool::builder()
        .max_size(4)
        .min_idle(Some(2))
        .connection_timeout(Duration::from_secs(10))
        .descriptor_locator(|conn: &mut crate::support::fake_server::FakeConnection| {
            Some(vec![conn.fd()])
        })
        .build(server.manager())
        .expect("fake pool")
}

/// Checks out, sends a unique request and checks that the echo is ours, on a connection
/// this process opened. Exit-code style: 0, 2, 3 or 4.
fn use_fake(pool: &FakePool, tag: &str) -> i32 {
    let mut conn = match pool.get() {
        Ok(conn) => conn,
        Err(error) => {
            eprintln!("process {}: get: {error}", std::process::id());
            if std::env::var_os("FORKSAFE_TORTURE_GDB").is_some() {
                let me = std::process::id().to_string();
                if let Ok(out) = Command::new("gdb")
                    .args(["-p", &me, "-batch", "-ex", "thread apply all bt"])
                    .output()
                {
                    let path = format!("/tmp/forksafe-getfail-{me}.txt");
                    let _ = std::fs::write(&path, [out.stdout, out.stderr].concat());
                    eprintln!("process {me}: backtraces in {path}");
                }
            }
            return 2;
        }
    };
    if conn.opened_by != std::process::id() {
        return 4;
    }
    let request = format!("{tag}-{}", std::process::id());
    match conn.query(&request) {
        Ok(reply) if reply == format!("{} {request}", conn.server_id) => 0,
        Ok(_) => 4,
        Err(_) => 3,
    }
}

/// Parent threads on a FakeServer pool. They pause 50 µs between checkouts: the server keeps
/// every line it receives, and unthrottled threads record millions per minute, which makes the
/// test process gigabytes large and every fork slow.
fn fake_hammer(pool: &FakePool) -> Hammer {
    let pool = pool.clone();
    Hammer::start(move |n| {
        std::thread::sleep(Duration::from_micros(50));
        let mut conn = pool.get().map_err(|error| format!("get: {error}"))?;
        let request = format!("p{n}");
        let reply = conn
            .query(&request)
            .map_err(|error| format!("query: {error}"))?;
        if reply != format!("{} {request}", conn.server_id) {
            return Err(format!("asked {request:?}, got {reply:?}"));
        }
        Ok(())
    })
}

/// Runs `forks` against a FakeServer pool while three parent threads hammer it, then adds what
/// the hammer saw and what the server recorded (every line written by the process that opened
/// its connection) to the outcome.
fn under_fake_load(
    name: &'static str,
    forks: impl FnOnce(&FakeServer, &FakePool, &mut Outcome),
) -> Outcome {
    let mut outcome = Outcome::new(name);
    let server = FakeServer::start();
    let pool = fake_pool(&server);
    let hammer = fake_hammer(&pool);
    forks(&server, &pool, &mut outcome);
    hammer.finish(&mut outcome);
    check_wire(&server, &mut outcome);
    outcome
}

/// Every connection must carry lines of the process that opened it (its "hello") only.
fn check_wire(server: &FakeServer, outcome: &mut Outcome) {
    // Let the server threads record the last lines.
    std::thread::sleep(Duration::from_millis(200));
    for (id, lines) in server.lines() {
        let Some(owner) = lines.first().map(|line| line.pid) else {
            continue;
        };
        for (n, line) in lines.iter().enumerate() {
            // A writer that `_exit`s or is killed in the middle of a line leaves a truncated
            // last line (no "<pid> " prefix, read as pid 0); anywhere else it would mean two
            // processes' writes interleaved.
            let truncated_last = line.pid == 0 && n + 1 == lines.len();
            if line.pid != owner && !truncated_last {
                outcome.parent_errors += 1;
                outcome.problem(format!(
                    "connection {id} opened by {owner} carried {:?} from process {}",
                    line.op, line.pid
                ));
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Scenario 3: every way a child can end

#[derive(Clone, Copy, Debug)]
enum End {
    /// Drops its guard and a pool only it holds (the rebuilt pool is dropped for real), then
    /// exits normally.
    DropAndReturn,
    /// `exit(0)` with everything still alive: the C library's exit (atexit handlers, stdio).
    ///
    /// Not `std::process::exit`: its runtime cleanup (`rt::cleanup` → the main thread's
    /// stack-overflow handler → `thread_info::delete_current_info`) takes the process-global
    /// std mutex that every thread start and exit takes, so a fork while any parent thread
    /// starts or exits — the FakeServer starts one per connection — makes the child hang
    /// there (caught with gdb: 1 child in 5000). That is std's, not the pool's;
    /// docs/how-it-works.md describes it.
    Exit,
    UnderscoreExit,
    Panic,
    SigKill,
}

/// The C library's `exit(0)`; see [`End::Exit`].
fn exit_like_c() -> ! {
    // SAFETY: `exit` runs the atexit handlers and flushes stdio, then ends the process; nothing
    // of this process is used afterwards.
    unsafe { libc::exit(0) }
}

fn child_ends(scale: &Scale) -> Outcome {
    under_fake_load(
        "3. children drop / exit / _exit / panic / SIGKILL",
        |server, pool, outcome| {
            let ends = [
                End::DropAndReturn,
                End::Exit,
                End::UnderscoreExit,
                End::Panic,
                End::SigKill,
            ];
            // A second pool only the main thread holds, so that a child's drop really drops it
            // (and the pool it rebuilt).
            let mut own_pool = Some(fake_pool(server));
            for i in 0..scale.child_ends * ends.len() as u64 {
                let end = ends[(i % ends.len() as u64) as usize];
                let pid = spawn_child(|| {
                    let code = use_fake(pool, "end");
                    if code != 0 {
                        return code;
                    }
                    let Some(own) = own_pool.take() else { return 5 };
                    let guard = own.get();
                    match end {
                        End::DropAndReturn => {
                            drop(guard);
                            drop(own);
                            exit_like_c()
                        }
                        End::Exit => exit_like_c(),
                        End::UnderscoreExit => 0,
                        End::Panic => {
                            // Expected: keep its message out of the report.
                            std::panic::set_hook(Box::new(|_| {}));
                            panic!("a child that panics while holding a connection")
                        }
                        End::SigKill => {
                            let _ = kill(Pid::this(), Signal::SIGKILL);
                            6
                        }
                    }
                });
                let expected = match end {
                    End::Panic => Ok(101),
                    End::SigKill => Err(Signal::SIGKILL),
                    _ => Ok(0),
                };
                outcome.child_ended(pid, reap(pid, CHILD_DEADLINE), expected);
            }
        },
    )
}

// ---------------------------------------------------------------------------------------------
// Scenario 4: three levels of nested forks

/// The exit code a child passes up when a process it forked did not exit 0: 5x when that one
/// exited with x, 59 when it hung, 58 when a signal killed it.
fn failure_below(end: ChildEnd) -> Option<i32> {
    match end {
        ChildEnd::Exited(0) => None,
        ChildEnd::Exited(below) => Some(50 + below.min(9)),
        ChildEnd::Hung => Some(59),
        ChildEnd::Signaled(_) => Some(58),
    }
}

fn nested_forks(scale: &Scale) -> Outcome {
    under_fake_load("4. nested forks, three levels", |_, pool, outcome| {
        fn level(pool: &FakePool, depth: u32) -> i32 {
            let code = use_fake(pool, &format!("level{depth}"));
            if code != 0 || depth == 3 {
                return code;
            }
            let pid = spawn_child(|| level(pool, depth + 1));
            // Use the pool while the child runs, then again after.
            let code = use_fake(pool, &format!("level{depth}-during"));
            if let Some(failed_below) = failure_below(reap(pid, CHILD_DEADLINE / 2)) {
                return failed_below;
            }
            if code != 0 {
                return code;
            }
            use_fake(pool, &format!("level{depth}-after"))
        }
        for _ in 0..scale.nested {
            let pid = spawn_child(|| level(pool, 1));
            outcome.child_ended(pid, reap(pid, CHILD_DEADLINE), Ok(0));
            // The two forks below the first are counted too.
            outcome.forks += 2;
        }
    })
}

// ---------------------------------------------------------------------------------------------
// Scenario 5: fork from another thread while the main thread holds a connection

fn fork_from_non_main_thread(scale: &Scale) -> Outcome {
    under_fake_load(
        "5. fork from a non-main thread, main holds a connection",
        |_, pool, outcome| {
            for i in 0..scale.non_main_thread {
                let mut held = pool.get().expect("main thread checkout");
                let forker = {
                    let pool = pool.clone();
                    std::thread::spawn(move || {
                        let pid = spawn_child(|| use_fake(&pool, "from-thread"));
                        (pid, reap(pid, CHILD_DEADLINE))
                    })
                };
                let (pid, end) = forker.join().expect("forking thread");
                outcome.child_ended(pid, end, Ok(0));
                let request = format!("held{i}");
                match held.query(&request) {
                    Ok(reply) if reply == format!("{} {request}", held.server_id) => {}
                    other => {
                        outcome.parent_errors += 1;
                        outcome.problem(format!(
                            "main thread's held connection after the fork: {other:?}"
                        ));
                    }
                }
            }
        },
    )
}

// ---------------------------------------------------------------------------------------------
// Scenario 6: a raw fork syscall, which runs no atfork handler

/// A raw `fork` skips glibc's own fork handling too: its malloc arena locks are copied as they
/// are, so a child whose first `malloc` meets an arena a parent thread held at that instant
/// waits forever, before any pool code runs (measured: with a FakeServer, whose threads
/// allocate for every line, 2 of 1000 children hung in `malloc`, 1 more failed its `get` after
/// `connection_timeout`, its connect thread stuck in `malloc`). No allocating library can
/// avoid that, so here the parent's threads do not allocate while they hammer (no-I/O
/// connections, no reaper job); what is tested is what the crate promises: the fork is
/// noticed without atfork handlers and the child never gets its parent's connection.
fn raw_fork_syscall(scale: &Scale) -> Outcome {
    let mut outcome = Outcome::new("6. raw fork syscall (no atfork handlers)");
    let pool: Pool<NoIoManager> = Pool::builder()
        .max_size(4)
        .max_lifetime(None)
        .idle_timeout(None)
        .connection_timeout(Duration::from_secs(10))
        .descriptor_locator(|_: &mut NoIoConnection| Some(Vec::new()))
        .build(NoIoManager::default())
        .expect("no-I/O pool");
    let hammer = no_io_hammer(&pool);
    for _ in 0..scale.raw_fork {
        let pid = spawn_raw(|| {
            let conn = match pool.get() {
                Ok(conn) => conn,
                Err(error) => {
                    eprintln!("process {}: get: {error}", std::process::id());
                    return 2;
                }
            };
            if conn.opened_by != std::process::id() {
                return 4;
            }
            0
        });
        outcome.child_ended(pid, reap(pid, CHILD_DEADLINE), Ok(0));
    }
    hammer.finish(&mut outcome);
    if pool.fork_stats().forks_crossed != 0 {
        outcome.parent_errors += 1;
        outcome.problem("the parent's pool counted a fork crossing".into());
    }
    outcome
}

// ---------------------------------------------------------------------------------------------
// Scenario 7: a child forks while its own rebuilt pool is being built

/// The child's first `get()` rebuilds the pool and connects (1 ms per connect here) on a thread
/// of its own, while the child's main thread forks a grandchild at varying instants.
///
/// No FakeServer here: its threads start and exit with every connection, and a fork at such an
/// instant leaves a std-internal mutex locked in the child (the one every new std thread takes
/// first, see `child_pool`), so the child's own `thread::spawn` below could hang for reasons
/// that have nothing to do with the pool. The crate itself spawns no thread in a child.
fn fork_during_rebuild(scale: &Scale) -> Outcome {
    let mut outcome = Outcome::new("7. a child forks during its own first get()");
    let manager = NoIoManager::with_connect_delay(Duration::from_millis(1));
    let pool: Pool<NoIoManager> = Pool::builder()
        .max_size(4)
        .connection_timeout(Duration::from_secs(10))
        .descriptor_locator(|_: &mut NoIoConnection| Some(Vec::new()))
        .build(manager)
        .expect("no-I/O pool");
    let hammer = no_io_hammer(&pool);
    fn use_own(pool: &Pool<NoIoManager>) -> i32 {
        match pool.get() {
            Ok(conn) if conn.opened_by == std::process::id() => 0,
            Ok(_) => 4,
            Err(error) => {
                eprintln!("process {}: get: {error}", std::process::id());
                2
            }
        }
    }
    for i in 0..scale.fork_during_rebuild {
        let pid = spawn_child(|| {
            let first = {
                let pool = pool.clone();
                std::thread::spawn(move || use_own(&pool))
            };
            // Vary the instant of the fork across the rebuild and the first connect.
            std::thread::sleep(Duration::from_micros(i % 9 * 150));
            let grandchild = spawn_child(|| use_own(&pool));
            let grandchild_end = reap(grandchild, CHILD_DEADLINE / 2);
            let first = first.join().unwrap_or(101);
            if let Some(failed_below) = failure_below(grandchild_end) {
                return failed_below;
            }
            if first != 0 {
                return first;
            }
            use_own(&pool)
        });
        outcome.child_ended(pid, reap(pid, CHILD_DEADLINE), Ok(0));
        outcome.forks += 1;
    }
    hammer.finish(&mut outcome);
    outcome
}

// ---------------------------------------------------------------------------------------------
// Scenario 8: Command::spawn, with and without pre_exec

fn command_spawn(scale: &Scale) -> Outcome {
    let mut outcome = Outcome::new("8. Command::spawn from a thread (half with pre_exec)");
    let server = FakeServer::start();
    let manager = server.manager();
    let connects = Arc::clone(&manager.connects);
    let pool: FakePool = Pool::builder()
        .max_size(4)
        .connection_timeout(Duration::from_secs(10))
        .descriptor_locator(|conn: &mut crate::support::fake_server::FakeConnection| {
            Some(vec![conn.fd()])
        })
        .build(manager)
        .expect("fake pool");
    let stats_before = pool.fork_stats();
    let connects_before = connects.load(Ordering::Relaxed);
    let hammer = fake_hammer(&pool);
    let spawner = std::thread::spawn({
        let count = scale.command_spawn;
        move || {
            let mut results = Vec::new();
            for i in 0..count {
                let mut command = Command::new("true");
                if i % 2 == 1 {
                    // SAFETY: the hook does nothing; it only makes std fork instead of using
                    // posix_spawn, which is the case under test.
                    unsafe {
                        command.pre_exec(|| Ok(()));
                    }
                }
                let started = Instant::now();
                let result = match command.spawn() {
                    Ok(mut child) => loop {
                        match child.try_wait() {
                            Ok(Some(status)) if status.success() => break Ok(()),
                            Ok(Some(status)) => break Err(format!("`true` ended with {status}")),
                            Ok(None) if started.elapsed() > CHILD_DEADLINE => {
                                let _ = child.kill();
                                let _ = child.wait();
                                break Err("hung".to_string());
                            }
                            Ok(None) => std::thread::sleep(Duration::from_micros(200)),
                            Err(error) => break Err(format!("wait: {error}")),
                        }
                    },
                    Err(error) => Err(format!("spawn: {error}")),
                };
                results.push(result);
            }
            results
        }
    });
    for result in spawner.join().expect("spawning thread") {
        outcome.forks += 1;
        match result {
            Ok(()) => {}
            Err(error) if error == "hung" => outcome.hung += 1,
            Err(error) => {
                outcome.failed += 1;
                outcome.problem(error);
            }
        }
    }
    hammer.finish(&mut outcome);
    let stats_after = pool.fork_stats();
    if stats_after != stats_before {
        outcome.parent_errors += 1;
        outcome.problem(format!(
            "the parent's fork stats changed: {stats_before:?} -> {stats_after:?}"
        ));
    }
    let connects_after = connects.load(Ordering::Relaxed);
    if connects_after != connects_before {
        outcome.parent_errors += 1;
        outcome.problem(format!(
            "the parent opened {} connections while spawning (it must neither rebuild nor discard)",
            connects_after - connects_before
        ));
    }
    check_wire(&server, &mut outcome);
    outcome
}

// ---------------------------------------------------------------------------------------------
// Scenario 9: a worker forks while its pool's upkeep runs

/// Grandchildren each worker of scenario 9 forks.
const GRANDCHILDREN: u64 = 10;

/// Workers whose pool keeps busy in the background (`min_idle` 2, connections idle for 2 ms
/// reaped every millisecond and reopened on connect threads of 200 µs each) fork grandchildren
/// at varying instants, so that forks catch the upkeep thread in a round, holding the pool's
/// lock or its own, and connect threads mid-connect. Every grandchild must reach `min_idle` in
/// the background from its first touch (`try_get`) and check out a connection of its own, as
/// must the worker between forks.
fn fork_during_upkeep(scale: &Scale) -> Outcome {
    let mut outcome = Outcome::new("9. a worker forks while its pool's upkeep runs");
    let pool: Pool<NoIoManager> = Pool::builder()
        .max_size(4)
        .min_idle(Some(2))
        .idle_timeout(Some(Duration::from_millis(2)))
        .reaper_rate_for_tests(Duration::from_millis(1))
        .connection_timeout(Duration::from_secs(10))
        .descriptor_locator(|_: &mut NoIoConnection| Some(Vec::new()))
        .build(NoIoManager::with_connect_delay(Duration::from_micros(200)))
        .expect("no-I/O pool");
    for _ in 0..scale.upkeep_workers {
        let pid = spawn_child(|| upkeep_worker(&pool));
        outcome.child_ended(pid, reap(pid, CHILD_DEADLINE), Ok(0));
        // The grandchildren are counted too.
        outcome.forks += GRANDCHILDREN;
    }
    outcome
}

fn upkeep_worker(pool: &Pool<NoIoManager>) -> i32 {
    let code = serves_its_own(pool);
    if code != 0 {
        return code;
    }
    for i in 0..GRANDCHILDREN {
        std::thread::sleep(Duration::from_micros(i * 370 % 2000));
        let pid = spawn_child(|| serves_its_own(pool));
        if let Some(failed_below) = failure_below(reap(pid, CHILD_DEADLINE / 2)) {
            return failed_below;
        }
        let code = serves_its_own(pool);
        if code != 0 {
            return code;
        }
    }
    0
}

/// `min_idle` is reached without a `get` (the first touch may be this `try_get`), then a
/// checkout gets a connection this process opened.
fn serves_its_own(pool: &Pool<NoIoManager>) -> i32 {
    let until = Instant::now() + Duration::from_secs(5);
    loop {
        match pool.try_get() {
            Some(conn) if conn.opened_by != std::process::id() => return 4,
            Some(_) => break,
            None if Instant::now() >= until => return 7,
            None => std::thread::sleep(Duration::from_millis(1)),
        }
    }
    match pool.get() {
        Ok(conn) if conn.opened_by == std::process::id() => 0,
        Ok(_) => 4,
        Err(error) => {
            eprintln!("process {}: get: {error}", std::process::id());
            2
        }
    }
}
