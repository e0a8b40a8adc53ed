//! MariaDB/MySQL through diesel's `MysqlConnection` and `diesel::r2d2::ConnectionManager`,
//! forked for real against a real server (`FORKSAFE_MYSQL_URL`, default
//! `mysql://root@127.0.0.1:3306/test`; over the Unix socket `FORKSAFE_MYSQL_SOCKET_URL`, default
//! `mysql://root@localhost/test?unix_socket=/run/mysqld/mysqld.sock`).
//!
//! A `harness = false` binary: the cases fork, so they run one after another in this process,
//! and every child is reaped with a deadline (a child still running then is killed and fails
//! its case). Without a reachable server the binary prints why and skips, unless `CI` is set:
//! then it fails.

mod support;

use std::collections::BTreeSet;
use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

use diesel::prelude::*;
use diesel::r2d2::ConnectionManager;
use diesel::sql_types::{BigInt, Text};
use forksafe_pool::{ForkStats, Pool, PooledConnection};
use nix::sys::signal::{kill, raise, Signal};
use nix::unistd::Pid;
use support::{reap, spawn_child, ChildEnd};

type Manager = ConnectionManager<MysqlConnection>;
type Check = Result<(), String>;
type Case = (&'static str, fn() -> Check);

const DEADLINE: Duration = Duration::from_secs(30);
const POOL_SIZE: u32 = 4;
const WORKERS: usize = 4;
const REQUESTS: usize = 300;
/// How much later than `connection_timeout` a failing `get` or `build` may return.
const SLACK: Duration = Duration::from_secs(3);

macro_rules! ensure {
    ($cond:expr, $($msg:tt)+) => {
        if !$cond {
            return Err(format!($($msg)+));
        }
    };
}

fn url() -> String {
    std::env::var("FORKSAFE_MYSQL_URL")
        .unwrap_or_else(|_| String::from("mysql://root@127.0.0.1:3306/test"))
}

/// A pool like a pre-forking server's master builds: `POOL_SIZE` connections, all opened now.
fn warm_pool() -> Result<Pool<Manager>, String> {
    warm_pool_at(url())
}

fn warm_pool_at(url: String) -> Result<Pool<Manager>, String> {
    Pool::builder()
        .max_size(POOL_SIZE)
        .min_idle(Some(POOL_SIZE))
        .connection_timeout(Duration::from_secs(10))
        .build(ConnectionManager::new(url))
        .map_err(|error| format!("build: {error}"))
}

/// The server's Unix socket (`FORKSAFE_MYSQL_SOCKET_URL`).
fn socket_url() -> String {
    std::env::var("FORKSAFE_MYSQL_SOCKET_URL").unwrap_or_else(|_| {
        String::from("mysql://root@localhost/test?unix_socket=/run/mysqld/mysqld.sock")
    })
}

#[derive(QueryableByName)]
struct Echo {
    #[diesel(sql_type = Text)]
    value: String,
    #[diesel(sql_type = BigInt)]
    session: i64,
}

#[derive(QueryableByName)]
struct Session {
    #[diesel(sql_type = BigInt)]
    session: i64,
}

/// Asks the server to echo `value` and say which session answered; checks the echo.
fn echo(conn: &mut PooledConnection<Manager>, value: &str) -> Result<i64, String> {
    let answer: Echo = diesel::sql_query(
        "SELECT CAST(? AS CHAR) AS value, CAST(CONNECTION_ID() AS SIGNED) AS session",
    )
    .bind::<Text, _>(value)
    .get_result(conn)
    .map_err(|error| format!("query for {value:?}: {error}"))?;
    ensure!(
        answer.value == value,
        "asked for {value:?}, got {:?} (another process's answer?)",
        answer.value
    );
    Ok(answer.session)
}

/// Checks out every connection of the pool at once and returns their server session ids.
fn session_ids(pool: &Pool<Manager>) -> Result<BTreeSet<i64>, String> {
    let mut conns = (0..pool.max_size())
        .map(|_| pool.get_timeout(Duration::from_secs(10)))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|error| format!("get: {error}"))?;
    let me = std::process::id();
    conns
        .iter_mut()
        .enumerate()
        .map(|(n, conn)| echo(conn, &format!("ids-{me}-{n}")))
        .collect()
}

/// The sessions the server has open right now, seen from a connection of our own.
fn live_sessions(observer: &mut MysqlConnection) -> Result<BTreeSet<i64>, String> {
    let rows: Vec<Session> = diesel::sql_query(
        "SELECT CAST(ID AS SIGNED) AS session FROM information_schema.PROCESSLIST",
    )
    .load(observer)
    .map_err(|error| format!("processlist: {error}"))?;
    Ok(rows.into_iter().map(|row| row.session).collect())
}

/// In the master after its children: the same server sessions, all working.
fn check_master_intact(pool: &Pool<Manager>, before: &BTreeSet<i64>) -> Check {
    let after = session_ids(pool)?;
    ensure!(
        &after == before,
        "the master's sessions changed: {before:?} -> {after:?}"
    );
    ensure!(
        pool.fork_stats() == ForkStats::default(),
        "the master's fork stats changed: {:?}",
        pool.fork_stats()
    );
    Ok(())
}

/// In a child: `requests` checked echoes, none answered by one of `foreign` sessions; returns the
/// sessions that answered.
fn run_requests(
    pool: &Pool<Manager>,
    requests: usize,
    foreign: &BTreeSet<i64>,
) -> Result<BTreeSet<i64>, String> {
    let me = std::process::id();
    let mut own = BTreeSet::new();
    for request in 0..requests {
        let mut conn = pool
            .get()
            .map_err(|error| format!("request {request}: get: {error}"))?;
        let session = echo(&mut conn, &format!("worker-{me}-request-{request}"))
            .map_err(|e| format!("request {request}: {e}"))?;
        ensure!(
            !foreign.contains(&session),
            "request {request} was answered by the master's session {session}"
        );
        own.insert(session);
    }
    Ok(own)
}

/// In a child that found `inherited` connections: every one discarded, its socket released.
fn check_released(pool: &Pool<Manager>, inherited: u64, leased: u64) -> Check {
    let stats = pool.fork_stats();
    ensure!(
        stats.forks_crossed == 1
            && stats.connections_discarded == inherited
            && stats.sockets_released == inherited
            && stats.connections_leaked == 0
            && stats.leased_across_fork == leased,
        "expected {inherited} inherited connections discarded with their sockets released ({leased} leased), got {stats:?}"
    );
    Ok(())
}

/// Runs `case` in a forked child; its error, if any, comes back over `report`.
fn child_case(report: &UnixDatagram, case: impl FnOnce() -> Check) -> i32 {
    match case() {
        Ok(()) => 0,
        Err(message) => {
            let _ = report.send(format!("[child {}] {message}", std::process::id()).as_bytes());
            1
        }
    }
}

/// Every message the children sent, without waiting.
fn reports(report: &UnixDatagram) -> Vec<String> {
    let _ = report.set_nonblocking(true);
    let mut buf = vec![0; 64 * 1024];
    let mut messages = Vec::new();
    while let Ok(len) = report.recv(&mut buf) {
        messages.push(String::from_utf8_lossy(&buf[..len]).into_owned());
    }
    messages
}

fn expect_exits(
    children: Vec<(String, Pid, ChildEnd)>,
    expected: impl Fn(&str) -> ChildEnd,
    report: &UnixDatagram,
) -> Check {
    let wrong: Vec<String> = children
        .into_iter()
        .filter(|(name, _, end)| *end != expected(name))
        .map(|(name, pid, end)| format!("{name} ({pid}) ended {end:?}"))
        .collect();
    let messages = reports(report);
    ensure!(
        wrong.is_empty() && messages.is_empty(),
        "children: {wrong:?}; their errors: {messages:?}"
    );
    Ok(())
}

/// The scenario: a warm master pool, 4 forked workers with 300 checked requests each.
fn four_workers_get_their_own_answers() -> Check {
    let pool = warm_pool()?;
    let master = session_ids(&pool)?;
    ensure!(
        master.len() == POOL_SIZE as usize,
        "the master has {} sessions, expected {POOL_SIZE}",
        master.len()
    );
    let (report, child_report) = UnixDatagram::pair().map_err(|error| error.to_string())?;
    let pids: Vec<Pid> = (0..WORKERS)
        .map(|_| {
            spawn_child(|| {
                child_case(&child_report, || {
                    let own = run_requests(&pool, REQUESTS, &master)?;
                    ensure!(
                        !own.is_empty() && own.len() <= POOL_SIZE as usize,
                        "answered by sessions {own:?}"
                    );
                    check_released(&pool, u64::from(POOL_SIZE), 0)
                })
            })
        })
        .collect();
    let ends = pids
        .into_iter()
        .enumerate()
        .map(|(n, pid)| (format!("worker {n}"), pid, reap(pid, DEADLINE)))
        .collect();
    expect_exits(ends, |_| ChildEnd::Exited(0), &report)?;
    check_master_intact(&pool, &master)
}

/// A connection checked out when the master forks: the child drops it (discarded, never
/// returned), works on its own connections; the master keeps using it.
fn a_connection_leased_across_fork() -> Check {
    let pool = warm_pool()?;
    let master = session_ids(&pool)?;
    let mut leased = Some(pool.get().map_err(|error| format!("get: {error}"))?);
    let leased_session = echo(leased.as_mut().unwrap(), "before fork")?;
    let (report, child_report) = UnixDatagram::pair().map_err(|error| error.to_string())?;
    let pid = spawn_child(|| {
        child_case(&child_report, || {
            drop(leased.take());
            run_requests(&pool, 50, &master)?;
            check_released(&pool, u64::from(POOL_SIZE), 1)
        })
    });
    expect_exits(
        vec![(String::from("child"), pid, reap(pid, DEADLINE))],
        |_| ChildEnd::Exited(0),
        &report,
    )?;
    let mut leased = leased.ok_or("the master lost its leased connection")?;
    ensure!(
        echo(&mut leased, "after fork")? == leased_session,
        "the leased connection changed session"
    );
    drop(leased);
    check_master_intact(&pool, &master)
}

/// Children that end every way a worker ends; the master's sessions outlive them all.
fn children_end_by_return_exit_and_sigkill() -> Check {
    // The master's only handle, so a child that takes and drops it drops the whole pool.
    let mut owned = Some(warm_pool()?);
    let master = session_ids(owned.as_ref().unwrap())?;
    let (report, child_report) = UnixDatagram::pair().map_err(|error| error.to_string())?;
    let mut ends = Vec::new();
    for way in [
        "return, dropping its pool",
        "return, dropping its pool unused",
        "exit",
        "SIGKILL",
    ] {
        let pid = spawn_child(|| {
            child_case(&child_report, || {
                let pool = owned.take().ok_or("no pool")?;
                if way != "return, dropping its pool unused" {
                    run_requests(&pool, 20, &master)?;
                }
                match way {
                    "exit" => std::process::exit(0),
                    "SIGKILL" => {
                        let _ = raise(Signal::SIGKILL);
                        Err(String::from("still alive after SIGKILL"))
                    }
                    _ => {
                        drop(pool);
                        Ok(())
                    }
                }
            })
        });
        ends.push((way.to_string(), pid, reap(pid, DEADLINE)));
        // After each child, not only after all of them.
        let pool = owned.as_ref().ok_or("the master lost its pool")?;
        check_master_intact(pool, &master)
            .map_err(|error| format!("after a child's {way}: {error}"))?;
    }
    let expected = |way: &str| {
        if way == "SIGKILL" {
            ChildEnd::Signaled(Signal::SIGKILL)
        } else {
            ChildEnd::Exited(0)
        }
    };
    expect_exits(ends, expected, &report)
}

/// Sends one line over a datagram socket.
fn send(socket: &UnixDatagram, message: String) -> Check {
    socket
        .send(message.as_bytes())
        .map(drop)
        .map_err(|error| format!("send: {error}"))
}

fn receive(socket: &UnixDatagram, timeout: Duration) -> Result<String, String> {
    socket
        .set_read_timeout(Some(timeout))
        .map_err(|error| error.to_string())?;
    let mut buf = vec![0; 64 * 1024];
    let len = socket
        .recv(&mut buf)
        .map_err(|error| format!("no message within {timeout:?}: {error}"))?;
    Ok(String::from_utf8_lossy(&buf[..len]).into_owned())
}

fn parse_ids(words: &[&str]) -> BTreeSet<i64> {
    words.iter().filter_map(|word| word.parse().ok()).collect()
}

/// Kills, then reaps, every process it holds unless told they are done with.
struct KillOnDrop(Vec<Pid>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        for &pid in &self.0 {
            let _ = kill(pid, Signal::SIGKILL);
            let _ = reap(pid, Duration::from_secs(5));
        }
    }
}

/// The master (a forked child of this test) warms its pool and forks 2 workers that use their
/// own pools and stay alive; the master is SIGKILLed. Its sessions must be gone within 2 s —
/// the workers released their copies of its sockets — while the workers' sessions keep working.
fn master_sigkill_leaves_no_sessions_behind() -> Check {
    let (to_test, from_master) = UnixDatagram::pair().map_err(|error| error.to_string())?;
    let (go_sender, go_receiver) = UnixDatagram::pair().map_err(|error| error.to_string())?;
    let master_pid = spawn_child(|| {
        let run = || -> Check {
            let pool = warm_pool()?;
            let ids = session_ids(&pool)?;
            send(&to_test, format!("master {}", join(&ids)))?;
            for _ in 0..2 {
                let (pool, ids, to_test, go) = (&pool, &ids, &to_test, &go_receiver);
                spawn_child(move || {
                    let run = || -> Check {
                        let own = session_ids(pool)?;
                        ensure!(
                            own.is_disjoint(ids),
                            "a worker got the master's sessions: {own:?}"
                        );
                        send(
                            to_test,
                            format!("worker {} {}", std::process::id(), join(&own)),
                        )?;
                        receive(go, DEADLINE)?;
                        let answered = run_requests(pool, 50, ids)?;
                        ensure!(
                            answered.is_subset(&own),
                            "worker sessions changed: {own:?} -> {answered:?}"
                        );
                        // Checked last, so the master's sessions are checked on the server first.
                        check_released(pool, u64::from(POOL_SIZE), 0)?;
                        send(to_test, format!("done {}", std::process::id()))
                    };
                    match run() {
                        Ok(()) => 0,
                        Err(message) => {
                            let _ = send(
                                to_test,
                                format!("error worker {}: {message}", std::process::id()),
                            );
                            1
                        }
                    }
                });
            }
            // Stay alive with the pool until killed (bounded, so a broken test leaves nothing).
            std::thread::sleep(DEADLINE * 2);
            Err(String::from("the master was never killed"))
        };
        match run() {
            Ok(()) => 0,
            Err(message) => {
                let _ = send(&to_test, format!("error master: {message}"));
                1
            }
        }
    });
    let mut cleanup = KillOnDrop(vec![master_pid]);
    let mut master_ids = BTreeSet::new();
    let mut workers = Vec::new();
    while master_ids.is_empty() || workers.len() < 2 {
        let message = receive(&from_master, DEADLINE)?;
        let words: Vec<&str> = message.split_whitespace().collect();
        match words.as_slice() {
            ["master", ids @ ..] => master_ids = parse_ids(ids),
            ["worker", pid, ids @ ..] => {
                let pid = Pid::from_raw(
                    pid.parse()
                        .map_err(|_| format!("bad message {message:?}"))?,
                );
                cleanup.0.push(pid);
                workers.push((pid, parse_ids(ids)));
            }
            _ => return Err(message),
        }
    }
    ensure!(
        master_ids.len() == POOL_SIZE as usize,
        "the master reported sessions {master_ids:?}"
    );
    let mut observer =
        MysqlConnection::establish(&url()).map_err(|error| format!("observer: {error}"))?;
    let live = live_sessions(&mut observer)?;
    ensure!(
        master_ids.is_subset(&live),
        "the master's sessions {master_ids:?} are not all live: {live:?}"
    );

    kill(master_pid, Signal::SIGKILL).map_err(|error| format!("kill master: {error}"))?;
    let killed_at = Instant::now();
    let end = reap(master_pid, DEADLINE);
    ensure!(
        end == ChildEnd::Signaled(Signal::SIGKILL),
        "the master ended {end:?}"
    );
    cleanup.0.retain(|&pid| pid != master_pid);
    let mut left = master_ids.clone();
    while !left.is_empty() && killed_at.elapsed() < Duration::from_secs(2) {
        std::thread::sleep(Duration::from_millis(20));
        left = live_sessions(&mut observer)?
            .intersection(&master_ids)
            .copied()
            .collect();
    }
    ensure!(
        left.is_empty(),
        "2 s after the master's SIGKILL its sessions {left:?} are still open"
    );
    let live = live_sessions(&mut observer)?;
    for (pid, own) in &workers {
        ensure!(
            own.is_subset(&live),
            "worker {pid}'s sessions {own:?} are gone: {live:?}"
        );
    }

    for _ in &workers {
        send(&go_sender, String::from("go"))?;
    }
    let mut done = 0;
    while done < workers.len() {
        let message = receive(&from_master, DEADLINE)?;
        ensure!(message.starts_with("done "), "{message}");
        done += 1;
    }
    for (pid, _) in std::mem::take(&mut workers) {
        cleanup.0.retain(|&p| p != pid);
        let end = reap(pid, DEADLINE);
        ensure!(end == ChildEnd::Exited(0), "worker {pid} ended {end:?}");
    }
    Ok(())
}

fn join(ids: &BTreeSet<i64>) -> String {
    ids.iter().map(i64::to_string).collect::<Vec<_>>().join(" ")
}

/// Over the Unix socket nothing ties a session to one of our descriptors, so the inherited
/// sockets are leaked in the child, and counted as such; the child still gets its own
/// connections and the master keeps its sessions.
fn unix_socket_connections_are_counted_as_leaked() -> Check {
    if let Err(error) = MysqlConnection::establish(&socket_url()) {
        let reason = format!(
            "the server's Unix socket ({}) is unreachable: {error}",
            socket_url()
        );
        if ci() {
            return Err(format!("{reason} (CI is set, so it is required)"));
        }
        println!("skipping: {reason} (set FORKSAFE_MYSQL_SOCKET_URL; with CI set this fails)");
        return Ok(());
    }
    let pool = warm_pool_at(socket_url()).map_err(|error| format!("{} ({error})", socket_url()))?;
    let master = session_ids(&pool)?;
    let (report, child_report) = UnixDatagram::pair().map_err(|error| error.to_string())?;
    let pid = spawn_child(|| {
        child_case(&child_report, || {
            run_requests(&pool, 50, &master)?;
            let stats = pool.fork_stats();
            let expected = u64::from(POOL_SIZE);
            ensure!(
                stats.connections_discarded == expected
                    && stats.connections_leaked == expected
                    && stats.sockets_released == 0,
                "expected {expected} connections discarded and leaked, none released: {stats:?}"
            );
            Ok(())
        })
    });
    let ends = vec![(String::from("child"), pid, reap(pid, DEADLINE))];
    expect_exits(ends, |_| ChildEnd::Exited(0), &report)?;
    check_master_intact(&pool, &master)
}

/// Bad configuration fails fast with r2d2's error and the cause, never hangs: in the process
/// that built the pool, and in a forked child that rebuilds it.
fn bad_input_fails_within_connection_timeout() -> Check {
    let good = url();
    let (base, database) = good
        .rsplit_once('/')
        .ok_or("FORKSAFE_MYSQL_URL has no database")?;
    let with_password = base.replacen("mysql://root@", "mysql://root:wrong-password@", 1);
    // Completes TCP handshakes (the kernel does) but never answers: connects block.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").map_err(|error| error.to_string())?;
    let silent_port = silent
        .local_addr()
        .map_err(|error| error.to_string())?
        .port();
    let cases = [
        (
            "not a URL",
            String::from("not-a-url"),
            "connection URLs must be in the form",
        ),
        (
            "wrong password",
            format!("{with_password}/{database}"),
            "Access denied",
        ),
        (
            "unknown database",
            format!("{base}/forksafe_no_such_database"),
            "Unknown database",
        ),
        (
            "unreachable port",
            String::from("mysql://root@127.0.0.1:1/test"),
            "Can't connect",
        ),
        (
            "a server that never answers",
            format!("mysql://root@127.0.0.1:{silent_port}/test"),
            "timed out waiting for connection",
        ),
    ];
    // Long enough for a first connection attempt to fail even on a loaded machine (r2d2 names the
    // cause only when an attempt has failed by then); a hang would still show.
    let timeout = Duration::from_millis(1500);
    for (what, url, cause) in cases {
        let builder = || Pool::builder().max_size(2).connection_timeout(timeout);
        let started = Instant::now();
        let error = match builder().build(ConnectionManager::<MysqlConnection>::new(url.clone())) {
            Ok(_) => return Err(format!("{what}: build succeeded")),
            Err(error) => error.to_string(),
        };
        ensure!(
            started.elapsed() < timeout + SLACK,
            "{what}: build took {:?}",
            started.elapsed()
        );
        ensure!(
            error.contains(cause),
            "{what}: build error {error:?} does not say {cause:?}"
        );

        let pool = builder().build_unchecked(ConnectionManager::<MysqlConnection>::new(url));
        let started = Instant::now();
        let error = pool
            .get()
            .err()
            .ok_or(format!("{what}: get succeeded"))?
            .to_string();
        ensure!(
            started.elapsed() < timeout + SLACK,
            "{what}: get took {:?}",
            started.elapsed()
        );
        ensure!(
            error.contains(cause),
            "{what}: get error {error:?} does not say {cause:?}"
        );

        let (report, child_report) = UnixDatagram::pair().map_err(|error| error.to_string())?;
        let pid = spawn_child(|| {
            child_case(&child_report, || {
                let started = Instant::now();
                let error = pool.get().err().ok_or("get succeeded")?.to_string();
                ensure!(
                    started.elapsed() < timeout + SLACK,
                    "get took {:?}",
                    started.elapsed()
                );
                ensure!(
                    error.contains(cause) && error.contains("rebuilt after fork()"),
                    "get error {error:?} does not say {cause:?} and that the pool was rebuilt after fork()"
                );
                Ok(())
            })
        });
        expect_exits(
            vec![(what.to_string(), pid, reap(pid, DEADLINE))],
            |_| ChildEnd::Exited(0),
            &report,
        )?;
    }
    Ok(())
}

/// With `CI` set a missing server fails the tests instead of skipping them.
fn ci() -> bool {
    std::env::var_os("CI").is_some_and(|ci| !ci.is_empty())
}

fn main() {
    if let Err(error) = MysqlConnection::establish(&url()) {
        let reason = format!("MariaDB/MySQL at {} is unreachable: {error}", url());
        if ci() {
            println!("test result: FAILED. {reason} (CI is set, so the server is required)");
            std::process::exit(1);
        }
        println!("skipping the MariaDB/MySQL tests: {reason} (set FORKSAFE_MYSQL_URL; with CI set this fails)");
        return;
    }
    // Workers of a SIGKILLed master are reparented to this process, so it can reap them.
    nix::sys::prctl::set_child_subreaper(true).expect("PR_SET_CHILD_SUBREAPER");

    let cases: [Case; 6] = [
        (
            "four_workers_get_their_own_answers",
            four_workers_get_their_own_answers,
        ),
        (
            "a_connection_leased_across_fork",
            a_connection_leased_across_fork,
        ),
        (
            "children_end_by_return_exit_and_sigkill",
            children_end_by_return_exit_and_sigkill,
        ),
        (
            "master_sigkill_leaves_no_sessions_behind",
            master_sigkill_leaves_no_sessions_behind,
        ),
        (
            "unix_socket_connections_are_counted_as_leaked",
            unix_socket_connections_are_counted_as_leaked,
        ),
        (
            "bad_input_fails_within_connection_timeout",
            bad_input_fails_within_connection_timeout,
        ),
    ];
    let filter: Vec<String> = std::env::args()
        .skip(1)
        .filter(|arg| !arg.starts_with('-'))
        .collect();
    let (mut passed, mut failed) = (0, 0);
    for (name, case) in cases {
        if !filter.is_empty() && !filter.iter().any(|f| name.contains(f.as_str())) {
            continue;
        }
        let started = Instant::now();
        match case() {
            Ok(()) => {
                println!("test {name} ... ok ({:.1?})", started.elapsed());
                passed += 1;
            }
            Err(message) => {
                println!("test {name} ... FAILED: {message}");
                failed += 1;
            }
        }
    }
    println!(
        "\ntest result: {}. {passed} passed; {failed} failed",
        if failed == 0 { "ok" } else { "FAILED" }
    );
    if failed > 0 {
        std::process::exit(1);
    }
}
