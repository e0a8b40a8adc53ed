//! Core fork behaviour, proven with real forks against a fake server that records which process
//! wrote what on which connection.
//!
//! A `harness = false` binary: atfork registrations and threads are process-wide, so the cases
//! run one after another in this process, and every child is reaped with a deadline (a child
//! still running then is killed and fails its case).

#[macro_use]
mod support;

use std::collections::{BTreeSet, HashSet};
use std::os::fd::RawFd;
use std::os::unix::process::CommandExt;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use forksafe_pool::{ErrorExt, ErrorKind, ForkStats, Pool};
use support::fake_server::{
    fake_pool, only_we_wrote_on, warm_connections, FakeManager, FakeServer,
};
use support::fork::{reap, run_child, spawn_child, spawn_raw, ChildEnd};
use support::inspect::points_at_dev_null;
use support::no_io::NoIoManager;
use support::runner::{child_result, expect_exit, run_cases, Case, Check};

const DEADLINE: Duration = Duration::from_secs(20);
const POOL_SIZE: u32 = 4;

/// A way for a child to end: name, the child's body, how the parent must see it end.
type Ending = (&'static str, fn(Pool<FakeManager>) -> i32, ChildEnd);

/// The parent's view of its warm pool: which server connections it holds and on which fds.
struct Warm {
    server: FakeServer,
    pool: Pool<FakeManager>,
    server_ids: BTreeSet<u64>,
    fds: Vec<RawFd>,
}

fn warm_pool() -> Result<Warm, String> {
    let server = FakeServer::start();
    let pool = fake_pool(server.manager(), POOL_SIZE);
    let (server_ids, fds) = warm_connections(&pool, POOL_SIZE)?;
    Ok(Warm {
        server,
        pool,
        server_ids,
        fds,
    })
}

/// In a child: checks out connections, checks each is the child's own, echoes a value.
fn use_pool_in_child(pool: &Pool<FakeManager>, rounds: usize) -> Check {
    let me = std::process::id();
    for round in 0..rounds {
        let mut conn = pool.get().map_err(|error| format!("child get: {error}"))?;
        ensure!(
            conn.opened_by == me,
            "child got a connection opened by {}",
            conn.opened_by
        );
        let value = format!("child-{me}-{round}");
        let reply = conn
            .query(&value)
            .map_err(|error| format!("child query: {error}"))?;
        ensure!(reply.ends_with(&value), "child asked {value}, got {reply}");
    }
    Ok(())
}

/// In the parent after the children: every connection it had is the same server connection,
/// works, and no other process ever wrote on it (no query, ping or goodbye).
fn check_parent_intact(warm: &Warm) -> Check {
    let me = std::process::id();
    let conns: Vec<_> = (0..POOL_SIZE)
        .map(|_| warm.pool.get_timeout(Duration::from_secs(5)))
        .collect::<Result<_, _>>()
        .map_err(|error| format!("parent get: {error}"))?;
    let ids: BTreeSet<u64> = conns.iter().map(|conn| conn.server_id).collect();
    ensure!(
        ids == warm.server_ids,
        "parent's server connections changed: {:?} -> {ids:?}",
        warm.server_ids
    );
    for mut conn in conns {
        let value = format!("parent-{me}-{}", conn.server_id);
        conn.echo(&value)?;
    }
    only_we_wrote_on(&warm.server, &warm.server_ids)
        .map_err(|error| format!("parent's connections: {error}"))?;
    ensure!(
        warm.pool.fork_stats() == ForkStats::default(),
        "parent's fork stats changed: {:?}",
        warm.pool.fork_stats()
    );
    Ok(())
}

fn inherited_idle_connections_are_discarded_never_used() -> Check {
    let warm = warm_pool()?;
    let fds = warm.fds.clone();
    let end = run_child(DEADLINE, || {
        child_result((|| {
            use_pool_in_child(&warm.pool, 20)?;
            let stats = warm.pool.fork_stats();
            ensure!(
                stats.forks_crossed == 1,
                "forks_crossed {}",
                stats.forks_crossed
            );
            ensure!(
                stats.connections_discarded == 4,
                "discarded {}",
                stats.connections_discarded
            );
            ensure!(
                stats.sockets_released == 4,
                "released {}",
                stats.sockets_released
            );
            ensure!(
                stats.connections_leaked == 0,
                "leaked {}",
                stats.connections_leaked
            );
            for fd in &fds {
                ensure!(
                    points_at_dev_null(*fd),
                    "inherited socket fd {fd} still open in the child"
                );
            }
            Ok(())
        })())
    });
    expect_exit("child", end, 0)?;
    check_parent_intact(&warm)
}

/// A pool with an event handler runs on r2d2 in the building process (only r2d2 makes its
/// events): across a fork it behaves like any other pool, and the parent keeps hearing events.
fn a_pool_with_an_event_handler_crosses_fork() -> Check {
    let server = FakeServer::start();
    let events = support::events::EventCounts::default();
    let pool = Pool::builder()
        .max_size(POOL_SIZE)
        .min_idle(Some(POOL_SIZE))
        .connection_timeout(Duration::from_secs(5))
        .descriptor_locator(|conn: &mut support::fake_server::FakeConnection| Some(vec![conn.fd()]))
        .event_handler(Box::new(events.clone()))
        .build(server.manager())
        .map_err(|error| format!("build: {error}"))?;
    let (server_ids, fds) = warm_connections(&pool, POOL_SIZE)?;
    let heard_before = events.checkouts();
    ensure!(
        heard_before == u64::from(POOL_SIZE),
        "{heard_before} checkout events for {POOL_SIZE} checkouts"
    );
    let warm = Warm {
        server,
        pool,
        server_ids,
        fds,
    };
    let end = run_child(DEADLINE, || {
        child_result((|| {
            use_pool_in_child(&warm.pool, 20)?;
            let stats = warm.pool.fork_stats();
            ensure!(
                stats.connections_discarded == POOL_SIZE as u64,
                "discarded {}",
                stats.connections_discarded
            );
            for fd in &warm.fds {
                ensure!(points_at_dev_null(*fd), "inherited fd {fd} still open");
            }
            Ok(())
        })())
    });
    expect_exit("child", end, 0)?;
    check_parent_intact(&warm)?;
    let heard = events.checkouts();
    ensure!(
        heard == heard_before + u64::from(POOL_SIZE),
        "the parent heard {heard} checkout events, expected {}",
        heard_before + u64::from(POOL_SIZE)
    );
    Ok(())
}

fn parent_survives_every_way_a_child_ends() -> Check {
    let warm = warm_pool()?;
    let ways: [Ending; 5] = [
        (
            "return, dropping the pool",
            |pool| child_result(use_pool_in_child(&pool, 3)),
            ChildEnd::Exited(0),
        ),
        (
            "drop without use",
            |pool| {
                drop(pool);
                0
            },
            ChildEnd::Exited(0),
        ),
        (
            "exit",
            |pool| {
                let _ = use_pool_in_child(&pool, 3);
                std::process::exit(7)
            },
            ChildEnd::Exited(7),
        ),
        (
            "panic",
            |pool| {
                std::panic::set_hook(Box::new(|_| {}));
                let _conn = pool.get();
                panic!("child panics holding a connection")
            },
            ChildEnd::Exited(101),
        ),
        (
            "SIGKILL",
            |pool| {
                let _conn = pool.get();
                let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
                0
            },
            ChildEnd::Signaled(nix::sys::signal::Signal::SIGKILL),
        ),
    ];
    for (how, child, expected) in ways {
        let pool = warm.pool.clone();
        let end = run_child(DEADLINE, move || child(pool));
        ensure!(
            end == expected,
            "child ending by {how}: {end:?}, expected {expected:?}"
        );
        check_parent_intact(&warm)
            .map_err(|error| format!("after a child ended by {how}: {error}"))?;
    }
    Ok(())
}

fn a_connection_leased_across_fork() -> Check {
    let warm = warm_pool()?;
    let leased = std::cell::RefCell::new(Some(warm.pool.get().unwrap()));
    let leased_fd = leased.borrow().as_ref().unwrap().fd();
    let end = run_child(DEADLINE, || {
        // The child's copy of the guard; the parent keeps its own.
        let mut leased = leased.borrow_mut().take().unwrap();
        child_result((|| {
            // Using it would write on the parent's socket: it must fail loudly instead.
            std::panic::set_hook(Box::new(|_| {}));
            let used = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                leased.query("steal").is_ok()
            }));
            let message = used
                .err()
                .and_then(|panic| panic.downcast::<String>().ok())
                .unwrap_or_default();
            ensure!(
                message.contains("checked out before fork()"),
                "using a leased connection did not panic clearly: {message:?}"
            );
            drop(leased);
            let stats = warm.pool.fork_stats();
            ensure!(
                stats.leased_across_fork == 1,
                "leased_across_fork {}",
                stats.leased_across_fork
            );
            ensure!(
                points_at_dev_null(leased_fd),
                "leased socket still open in the child"
            );
            use_pool_in_child(&warm.pool, 5)?;
            let stats = warm.pool.fork_stats();
            // One leased (counted when dropped) plus three idle (counted at the rebuild).
            ensure!(
                stats.connections_discarded == 4,
                "discarded {}",
                stats.connections_discarded
            );
            Ok(())
        })())
    });
    expect_exit("child", end, 0)?;
    let mut leased = leased.borrow_mut().take().unwrap();
    let reply = leased
        .query("still mine")
        .map_err(|error| format!("parent's leased connection broke: {error}"))?;
    ensure!(
        reply.ends_with("still mine"),
        "parent's leased connection answered {reply}"
    );
    drop(leased);
    check_parent_intact(&warm)
}

fn fork_while_threads_hammer_the_pool() -> Check {
    let warm = warm_pool()?;
    let stop = Arc::new(AtomicBool::new(false));
    let errors = Arc::new(AtomicU64::new(0));
    let hammers: Vec<_> = (0..3)
        .map(|thread| {
            let (pool, stop, errors) = (warm.pool.clone(), Arc::clone(&stop), Arc::clone(&errors));
            std::thread::spawn(move || {
                let mut round = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    round += 1;
                    let value = format!("hammer-{thread}-{round}");
                    let ok = pool
                        .get()
                        .ok()
                        .and_then(|mut conn| conn.query(&value).ok())
                        .is_some_and(|reply| reply.ends_with(&value));
                    if !ok {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    let forks = 200;
    let mut failures = Vec::new();
    for fork in 0..forks {
        let pool = warm.pool.clone();
        let end = run_child(DEADLINE, move || child_result(use_pool_in_child(&pool, 2)));
        if end != ChildEnd::Exited(0) {
            failures.push(format!("fork {fork}: {end:?}"));
        }
    }
    stop.store(true, Ordering::Relaxed);
    for hammer in hammers {
        hammer
            .join()
            .map_err(|_| "a hammer thread panicked".to_string())?;
    }
    ensure!(
        failures.is_empty(),
        "{} of {forks} children failed or hung: {failures:?}",
        failures.len()
    );
    ensure!(
        errors.load(Ordering::Relaxed) == 0,
        "the parent's threads saw {} errors",
        errors.load(Ordering::Relaxed)
    );
    check_parent_intact(&warm)
}

fn nested_fork() -> Check {
    let warm = warm_pool()?;
    let end = run_child(DEADLINE, || {
        child_result((|| {
            use_pool_in_child(&warm.pool, 3)?;
            let child_pool = warm.pool.clone();
            let grandchild = run_child(DEADLINE, move || {
                child_result((|| {
                    use_pool_in_child(&child_pool, 3)?;
                    let stats = child_pool.fork_stats();
                    ensure!(
                        stats.forks_crossed == 2,
                        "grandchild forks_crossed {}",
                        stats.forks_crossed
                    );
                    Ok(())
                })())
            });
            ensure!(
                grandchild == ChildEnd::Exited(0),
                "grandchild ended {grandchild:?}"
            );
            // The child's own connections are untouched by its child.
            use_pool_in_child(&warm.pool, 3)?;
            ensure!(
                warm.pool.fork_stats().forks_crossed == 1,
                "child rebuilt twice"
            );
            Ok(())
        })())
    });
    expect_exit("child", end, 0)?;
    check_parent_intact(&warm)
}

fn fork_from_a_non_main_thread() -> Check {
    let warm = warm_pool()?;
    let mut held = warm.pool.get().unwrap();
    let pool = warm.pool.clone();
    let end = std::thread::spawn(move || {
        run_child(DEADLINE, move || child_result(use_pool_in_child(&pool, 5)))
    })
    .join()
    .map_err(|_| "forking thread panicked".to_string())?;
    expect_exit("child", end, 0)?;
    ensure!(
        held.query("main")
            .is_ok_and(|reply| reply.ends_with("main")),
        "main thread's connection broke"
    );
    drop(held);
    check_parent_intact(&warm)
}

fn raw_fork_syscall_bypassing_atfork() -> Check {
    let warm = warm_pool()?;
    let atfork_before = forksafe_pool::fork_detection().atfork_child_calls;
    // This test keeps no other thread busy, so no libc lock is held at the raw fork.
    let pid = spawn_raw(|| {
        child_result((|| {
            let detection = forksafe_pool::fork_detection();
            ensure!(
                detection.atfork_child_calls == atfork_before,
                "the atfork handler ran for a raw fork"
            );
            use_pool_in_child(&warm.pool, 5)?;
            ensure!(
                warm.pool.fork_stats().forks_crossed == 1,
                "raw fork not detected"
            );
            Ok(())
        })())
    });
    expect_exit("child", reap(pid, DEADLINE), 0)?;
    check_parent_intact(&warm)
}

fn command_spawn_does_not_rebuild_the_parent() -> Check {
    let warm = warm_pool()?;
    for with_pre_exec in [false, true] {
        let mut command = Command::new("true");
        if with_pre_exec {
            // SAFETY: the closure only returns; it runs between fork and exec.
            unsafe { command.pre_exec(|| Ok(())) };
        }
        let status = command
            .status()
            .map_err(|error| format!("spawn: {error}"))?;
        ensure!(status.success(), "`true` failed");
        check_parent_intact(&warm).map_err(|error| format!("pre_exec {with_pre_exec}: {error}"))?;
    }
    Ok(())
}

fn a_child_never_rebuilds_twice_under_racing_threads() -> Check {
    let warm = warm_pool()?;
    let end = run_child(DEADLINE, || {
        let pool = warm.pool.clone();
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let pool = pool.clone();
                std::thread::spawn(move || use_pool_in_child(&pool, 10))
            })
            .collect();
        let results: Vec<Check> = threads
            .into_iter()
            .map(|t| t.join().unwrap_or(Err("panicked".into())))
            .collect();
        child_result((|| {
            for result in results {
                result?;
            }
            ensure!(
                pool.fork_stats().forks_crossed == 1,
                "rebuilt {} times",
                pool.fork_stats().forks_crossed
            );
            let opened_here: HashSet<u32> = (0..2).map(|_| pool.get().unwrap().opened_by).collect();
            ensure!(
                opened_here == HashSet::from([std::process::id()]),
                "{opened_here:?}"
            );
            Ok(())
        })())
    });
    expect_exit("child", end, 0)?;
    check_parent_intact(&warm)
}

fn many_children_at_once() -> Check {
    let warm = warm_pool()?;
    let children: Vec<_> = (0..8)
        .map(|_| {
            let pool = warm.pool.clone();
            spawn_child(move || child_result(use_pool_in_child(&pool, 50)))
        })
        .collect();
    for child in children {
        expect_exit("child", reap(child, DEADLINE), 0)?;
    }
    check_parent_intact(&warm)
}

fn a_child_that_cannot_connect_gets_a_clear_error_in_time() -> Check {
    let server = FakeServer::start();
    let timeout = Duration::from_millis(500);
    let pool = forksafe_pool::Pool::builder()
        .max_size(2)
        .connection_timeout(timeout)
        .descriptor_locator(|conn: &mut support::fake_server::FakeConnection| Some(vec![conn.fd()]))
        .build(server.manager())
        .map_err(|error| format!("build: {error}"))?;
    let path = server.path.clone();
    let end = run_child(DEADLINE, || {
        child_result((|| {
            // The server is gone for this child: its socket file is removed.
            std::fs::remove_file(&path).map_err(|error| format!("remove: {error}"))?;
            let started = std::time::Instant::now();
            let error = match pool.get() {
                Ok(_) => return Err("got a connection with the server gone".into()),
                Err(error) => error,
            };
            let kind = error.kind();
            let error = error.to_string();
            ensure!(
                matches!(&kind, ErrorKind::ConnectFailed(message)
                    if !message.is_empty() && error.contains(message.as_str()) && !message.contains("forksafe-pool")),
                "not told as a failed connect with the manager's message: {kind:?} from {error}"
            );
            let waited = started.elapsed();
            ensure!(
                waited >= timeout && waited < timeout * 4,
                "waited {waited:?} for a {timeout:?} timeout"
            );
            ensure!(
                error.contains("timed out waiting for connection"),
                "not r2d2's error: {error}"
            );
            ensure!(
                error.contains(&format!(
                    "rebuilt after fork() in process {}",
                    std::process::id()
                )),
                "error does not say the pool was rebuilt after fork: {error}"
            );
            Ok(())
        })())
    });
    expect_exit("child", end, 0)?;
    let mut conn = pool.get().map_err(|error| format!("parent get: {error}"))?;
    ensure!(
        conn.query("parent").is_ok(),
        "parent's idle connection broke"
    );
    Ok(())
}

/// A connect that panics in a forked child is reported as that panic by the `get` that waited
/// for it, frees its slot (the next `get` connects once the driver behaves), and leaves the
/// parent's pool alone.
fn a_connect_that_panics_in_a_child_is_reported_as_the_panic() -> Check {
    support::scripted::quiet_scripted_panics();
    let manager = support::scripted::ScriptedManager::default();
    let pool = forksafe_pool::Pool::builder()
        .max_size(1)
        .connection_timeout(Duration::from_secs(1))
        .build(manager.clone())
        .map_err(|error| format!("build: {error}"))?;
    let end = run_child(DEADLINE, || {
        child_result((|| {
            // The child's copy of the script: the parent's manager is unaffected.
            manager
                .script()
                .panic_next
                .store(u32::MAX, Ordering::SeqCst);
            let error = match pool.get() {
                Ok(_) => return Err("a connect that panics gave a connection".into()),
                Err(error) => error,
            };
            let kind = error.kind();
            ensure!(
                matches!(&kind, ErrorKind::ConnectPanicked(message) if message.contains(support::scripted::SCRIPTED_PANIC)),
                "not told as a panicked connect: {kind:?}"
            );
            let error = error.to_string();
            ensure!(
                error.starts_with("timed out waiting for connection: "),
                "not r2d2's error: {error}"
            );
            ensure!(
                error.contains(support::scripted::SCRIPTED_PANIC),
                "the error does not name the panic: {error}"
            );
            manager.script().panic_next.store(0, Ordering::SeqCst);
            pool.get_timeout(Duration::from_secs(5))
                .map_err(|error| format!("the panicked connect kept its slot: {error}"))?;
            Ok(())
        })())
    });
    expect_exit("child", end, 0)?;
    ensure!(
        manager.attempts() == 1,
        "the parent connected {} times",
        manager.attempts()
    );
    pool.get().map_err(|error| format!("parent get: {error}"))?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Driver locks: a C driver holds process-global locks while it connects and closes (libpq's
// GSSAPI probe, OpenSSL's tables). A fork in that instant copies the lock, held, into a child
// where nobody will release it. These cases stand such a lock in with a static mutex.

/// The stand-in for a driver library's process-global lock.
static DRIVER_LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
/// True while some thread holds [`DRIVER_LOCK`] inside a connect or a close.
static IN_DRIVER: AtomicBool = AtomicBool::new(false);

/// A manager whose connect, and whose connections' close, hold [`DRIVER_LOCK`] for a while.
#[derive(Debug)]
struct LockingDriver {
    connect_holds: Duration,
    close_holds: Duration,
}

#[derive(Debug)]
struct LockingConnection {
    opened_by: u32,
    close_holds: Duration,
}

fn hold_driver_lock(duration: Duration) {
    let _lock = DRIVER_LOCK
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    IN_DRIVER.store(true, Ordering::SeqCst);
    std::thread::sleep(duration);
    IN_DRIVER.store(false, Ordering::SeqCst);
}

impl r2d2::ManageConnection for LockingDriver {
    type Connection = LockingConnection;
    type Error = std::io::Error;

    fn connect(&self) -> std::io::Result<LockingConnection> {
        hold_driver_lock(self.connect_holds);
        Ok(LockingConnection {
            opened_by: std::process::id(),
            close_holds: self.close_holds,
        })
    }

    fn is_valid(&self, _: &mut LockingConnection) -> std::io::Result<()> {
        Ok(())
    }

    fn has_broken(&self, _: &mut LockingConnection) -> bool {
        false
    }
}

impl Drop for LockingConnection {
    fn drop(&mut self) {
        hold_driver_lock(self.close_holds);
    }
}

fn locking_pool(
    connect_holds: Duration,
    close_holds: Duration,
    connection_timeout: Duration,
) -> Result<Pool<LockingDriver>, String> {
    Pool::builder()
        .max_size(2)
        .min_idle(Some(0))
        .connection_timeout(connection_timeout)
        .descriptor_locator(|_: &mut LockingConnection| Some(Vec::new()))
        .build(LockingDriver {
            connect_holds,
            close_holds,
        })
        .map_err(|error| format!("build: {error}"))
}

/// Waits (at most 5 s) until another thread is inside the driver.
fn wait_until_in_driver() -> Check {
    let until = std::time::Instant::now() + Duration::from_secs(5);
    while !IN_DRIVER.load(Ordering::SeqCst) {
        ensure!(
            std::time::Instant::now() < until,
            "no thread entered the driver"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    Ok(())
}

/// In a child: one connection of the child's own, within the pool's timeout.
fn child_connects(pool: &Pool<LockingDriver>) -> Check {
    let conn = pool.get().map_err(|error| format!("child get: {error}"))?;
    ensure!(
        conn.opened_by == std::process::id(),
        "child got a connection opened by {}",
        conn.opened_by
    );
    Ok(())
}

/// A thread that checks out one connection (so the pool connects on one of its threads); joins
/// to the pid that opened it.
fn connect_in_background(
    pool: &Pool<LockingDriver>,
) -> std::thread::JoinHandle<Result<u32, String>> {
    let pool = pool.clone();
    std::thread::spawn(move || {
        pool.get()
            .map(|conn| conn.opened_by)
            .map_err(|error| error.to_string())
    })
}

fn a_fork_waits_for_a_connect_in_progress() -> Check {
    let pool = locking_pool(
        Duration::from_millis(300),
        Duration::ZERO,
        Duration::from_secs(3),
    )?;
    let connecting = connect_in_background(&pool);
    wait_until_in_driver()?;
    let child_pool = pool.clone();
    let end = run_child(DEADLINE, move || child_result(child_connects(&child_pool)));
    let parent = connecting
        .join()
        .map_err(|_| "the connecting thread panicked".to_string())?;
    ensure!(
        parent == Ok(std::process::id()),
        "the parent's connect: {parent:?}"
    );
    expect_exit("child", end, 0)
}

fn a_fork_waits_for_a_close_in_progress() -> Check {
    let closing = locking_pool(Duration::ZERO, Duration::from_millis(300), DEADLINE)?;
    drop(closing.get().map_err(|error| format!("get: {error}"))?);
    // The only handle: the thread that drops it closes the pool's idle connection.
    let closer = std::thread::spawn(move || drop(closing));
    let other = locking_pool(Duration::ZERO, Duration::ZERO, Duration::from_secs(3))?;
    wait_until_in_driver()?;
    let end = run_child(DEADLINE, move || child_result(child_connects(&other)));
    closer
        .join()
        .map_err(|_| "the closing thread panicked".to_string())?;
    expect_exit("child", end, 0)
}

fn a_fork_waits_for_a_slow_connect_a_second_at_most() -> Check {
    let pool = locking_pool(
        Duration::from_millis(2500),
        Duration::ZERO,
        Duration::from_millis(500),
    )?;
    let connecting = connect_in_background(&pool);
    wait_until_in_driver()?;
    let started = std::time::Instant::now();
    // The fork happens while the driver still holds its lock: the child's connect blocks on
    // the copy the fork froze, and the child's `get` must still end, with the pool's error.
    let child_pool = pool.clone();
    let child = spawn_child(move || {
        child_result((|| {
            ensure!(
                pool_get_fails_in_time(&child_pool),
                "the child's get did not fail within its timeout"
            );
            Ok(())
        })())
    });
    let fork_took = started.elapsed();
    let end = reap(child, DEADLINE);
    let _ = connecting.join();
    ensure!(
        fork_took >= Duration::from_millis(900) && fork_took < Duration::from_millis(2000),
        "fork() took {fork_took:?}: it must wait for the connect, but a second at most"
    );
    expect_exit("child", end, 0)
}

/// `get` fails (the driver is stuck) in about the pool's 500 ms timeout, with the pool's error.
fn pool_get_fails_in_time(pool: &Pool<LockingDriver>) -> bool {
    let started = std::time::Instant::now();
    match pool.get() {
        Ok(_) => false,
        Err(error) => {
            let waited = started.elapsed();
            waited < Duration::from_secs(2) && error.to_string().contains("rebuilt after fork()")
        }
    }
}

// A connection's descriptor number is freed when its driver closes it, and the application may
// be given it by its very next `open`. The pool must have forgotten the number by then: a child
// forked in that instant would otherwise find it registered, on the same file, and point the
// application's descriptor at /dev/null.

/// Runs once, right after a [`FileConnection`] closed its file, with the freed number.
type AfterClose = Box<dyn FnOnce(RawFd) + Send>;
static AFTER_CLOSE: std::sync::Mutex<Option<AfterClose>> = std::sync::Mutex::new(None);

/// A "connection" that is an open file, like an SQLite connection's database descriptor.
#[derive(Debug)]
struct FileConnection {
    file: Option<std::fs::File>,
}

impl FileConnection {
    fn fd(&self) -> RawFd {
        use std::os::fd::AsRawFd;
        self.file.as_ref().map_or(-1, |file| file.as_raw_fd())
    }
}

impl Drop for FileConnection {
    fn drop(&mut self) {
        let fd = self.fd();
        drop(self.file.take());
        let after_close = AFTER_CLOSE
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .take();
        if let Some(after_close) = after_close {
            after_close(fd);
        }
    }
}

#[derive(Debug)]
struct FileManager {
    path: std::path::PathBuf,
}

impl r2d2::ManageConnection for FileManager {
    type Connection = FileConnection;
    type Error = std::io::Error;

    fn connect(&self) -> std::io::Result<FileConnection> {
        let file = std::fs::File::options().append(true).open(&self.path)?;
        Ok(FileConnection { file: Some(file) })
    }

    fn is_valid(&self, _: &mut FileConnection) -> std::io::Result<()> {
        Ok(())
    }

    fn has_broken(&self, _: &mut FileConnection) -> bool {
        false
    }
}

/// Fails `on_acquire` once, so the pool drops that new connection directly.
#[derive(Debug)]
struct FailFirstAcquire(AtomicBool);

impl r2d2::CustomizeConnection<FileConnection, std::io::Error> for FailFirstAcquire {
    fn on_acquire(&self, _: &mut FileConnection) -> std::io::Result<()> {
        if self.0.swap(false, Ordering::SeqCst) {
            return Err(std::io::Error::other("first on_acquire fails"));
        }
        Ok(())
    }
}

/// Whether `fd` is open on the file at `path`.
fn is_open_on(fd: RawFd, path: &std::path::Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    let (Ok(file), Ok(stat)) = (std::fs::metadata(path), nix::sys::stat::fstat(fd)) else {
        return false;
    };
    (stat.st_dev, stat.st_ino) == (file.dev(), file.ino())
}

fn a_descriptor_number_reused_by_the_application_is_never_released() -> Check {
    let path = std::env::temp_dir().join(format!("forksafe-reuse-{}.log", std::process::id()));
    std::fs::write(&path, b"").map_err(|error| format!("create {path:?}: {error}"))?;
    let pool = Pool::builder()
        .max_size(1)
        .min_idle(Some(0))
        .connection_timeout(Duration::from_secs(5))
        .descriptor_locator(|conn: &mut FileConnection| Some(vec![conn.fd()]))
        .connection_customizer(Box::new(FailFirstAcquire(AtomicBool::new(true))))
        .build(FileManager { path: path.clone() })
        .map_err(|error| format!("build: {error}"))?;
    let (report, reported) = std::sync::mpsc::channel();
    let child_pool = pool.clone();
    let app_path = path.clone();
    *AFTER_CLOSE
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(Box::new(move |freed: RawFd| {
        // The application opens the same file and is given the number just freed.
        let opened = std::fs::File::options().append(true).open(&app_path);
        let app = match opened {
            Ok(file) => std::os::fd::IntoRawFd::into_raw_fd(file),
            Err(error) => return drop(report.send(Err(format!("reopen: {error}")))),
        };
        if app != freed {
            let moved = nix::unistd::dup2(app, freed);
            let _ = nix::unistd::close(app);
            if let Err(error) = moved {
                return drop(report.send(Err(format!("dup2: {error}"))));
            }
        }
        let end = run_child(DEADLINE, move || {
            child_result((|| {
                // The rebuild lets go of every descriptor the parent's generation registered.
                drop(
                    child_pool
                        .get()
                        .map_err(|error| format!("child get: {error}"))?,
                );
                ensure!(
                    !points_at_dev_null(freed),
                    "the child pointed the application's descriptor {freed} at /dev/null"
                );
                ensure!(
                    is_open_on(freed, &app_path),
                    "descriptor {freed} no longer refers to the application's file"
                );
                Ok(())
            })())
        });
        let _ = report.send(Ok((freed, end)));
    }));
    // The first connect fails in `on_acquire`, and its connection is dropped on a thread of the
    // pool; the retry, after the pool's back-off, gives us this one.
    drop(pool.get().map_err(|error| format!("get: {error}"))?);
    let outcome = reported
        .recv_timeout(DEADLINE)
        .map_err(|_| "no connection was closed after a failed on_acquire".to_string())?;
    let checked = outcome.and_then(|(fd, end)| {
        let parent_kept = is_open_on(fd, &path);
        let _ = nix::unistd::close(fd);
        ensure!(parent_kept, "the parent's descriptor {fd} changed");
        expect_exit("child", end, 0)
    });
    let _ = std::fs::remove_file(&path);
    checked
}

/// A master that builds its pool and forks at once: the pool's worker threads must all have
/// started by then, or a child may inherit std's thread start-up lock held and never start a
/// thread of its own. 1 000 builds, each followed by a fork whose child starts one std thread.
/// A fork during a thread's exit is the same hazard, so pools are dropped only in batches, and
/// the next fork waits until their threads are gone.
fn a_child_forked_right_after_build_can_start_threads() -> Check {
    const BUILDS: usize = 1_000;
    const BATCH: usize = 50;
    let threads_before = thread_count()?;
    let mut hung = 0;
    for _ in 0..BUILDS / BATCH {
        let mut pools = Vec::with_capacity(BATCH);
        for _ in 0..BATCH {
            // No time limits: no reaper job, so nothing keeps a dropped pool's threads.
            let pool = Pool::builder()
                .max_size(1)
                .idle_timeout(None)
                .max_lifetime(None)
                .build(NoIoManager::default())
                .map_err(|error| format!("build: {error}"))?;
            let end = run_child(Duration::from_secs(2), || {
                match std::thread::spawn(|| ()).join() {
                    Ok(()) => 0,
                    Err(_) => 1,
                }
            });
            match end {
                ChildEnd::Exited(0) => {}
                ChildEnd::Hung => hung += 1,
                other => return Err(format!("a child ended {other:?}")),
            }
            pools.push(pool);
        }
        drop(pools);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while thread_count()? > threads_before {
            ensure!(
                std::time::Instant::now() < deadline,
                "the dropped pools' threads did not end"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    ensure!(
        hung == 0,
        "{hung} of {BUILDS} children forked right after build could not start a thread"
    );
    Ok(())
}

/// The threads of this process.
fn thread_count() -> Result<usize, String> {
    std::fs::read_dir("/proc/self/task")
        .map(Iterator::count)
        .map_err(|error| format!("/proc/self/task: {error}"))
}

fn main() {
    let cases: [Case; 18] = [
        (
            "inherited_idle_connections_are_discarded_never_used",
            inherited_idle_connections_are_discarded_never_used,
        ),
        (
            "a_pool_with_an_event_handler_crosses_fork",
            a_pool_with_an_event_handler_crosses_fork,
        ),
        (
            "parent_survives_every_way_a_child_ends",
            parent_survives_every_way_a_child_ends,
        ),
        (
            "a_connection_leased_across_fork",
            a_connection_leased_across_fork,
        ),
        (
            "fork_while_threads_hammer_the_pool",
            fork_while_threads_hammer_the_pool,
        ),
        ("nested_fork", nested_fork),
        ("fork_from_a_non_main_thread", fork_from_a_non_main_thread),
        (
            "raw_fork_syscall_bypassing_atfork",
            raw_fork_syscall_bypassing_atfork,
        ),
        (
            "command_spawn_does_not_rebuild_the_parent",
            command_spawn_does_not_rebuild_the_parent,
        ),
        (
            "a_child_never_rebuilds_twice_under_racing_threads",
            a_child_never_rebuilds_twice_under_racing_threads,
        ),
        ("many_children_at_once", many_children_at_once),
        (
            "a_child_that_cannot_connect_gets_a_clear_error_in_time",
            a_child_that_cannot_connect_gets_a_clear_error_in_time,
        ),
        (
            "a_connect_that_panics_in_a_child_is_reported_as_the_panic",
            a_connect_that_panics_in_a_child_is_reported_as_the_panic,
        ),
        (
            "a_fork_waits_for_a_connect_in_progress",
            a_fork_waits_for_a_connect_in_progress,
        ),
        (
            "a_fork_waits_for_a_close_in_progress",
            a_fork_waits_for_a_close_in_progress,
        ),
        (
            "a_fork_waits_for_a_slow_connect_a_second_at_most",
            a_fork_waits_for_a_slow_connect_a_second_at_most,
        ),
        (
            "a_descriptor_number_reused_by_the_application_is_never_released",
            a_descriptor_number_reused_by_the_application_is_never_released,
        ),
        (
            "a_child_forked_right_after_build_can_start_threads",
            a_child_forked_right_after_build_can_start_threads,
        ),
    ];
    run_cases(cases);
}
