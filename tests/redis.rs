//! Redis through the redis crate's r2d2 support (`redis::Client` as the manager), forked for
//! real against a real server (`FORKSAFE_REDIS_URL`, default `redis://127.0.0.1:6379/`). The
//! requests go through `redis::cmd(..).query(&mut conn)`, pipelines and `Commands` on
//! forksafe-pool's guard, exactly as with r2d2's.
//!
//! A `harness = false` binary: the cases fork, so they run one after another in this process,
//! and every child is reaped with a deadline (a child still running then is killed and fails
//! its case). Without a reachable server the binary prints why and skips, unless `CI` is set:
//! then it fails.
//!
//! The scenarios it shares with MariaDB/MySQL are in `support/backend.rs`; the ones here are
//! Redis's own.

#[macro_use]
mod support;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use forksafe_pool::{Pool, PooledConnection};
use nix::unistd::Pid;
use redis::Commands;
use support::backend::{
    self, check_released, child_case, datagram_pair, expect_child_exit, expect_workers_exit,
    receive, run_requests, send, session_ids, Backend, KillOnDrop, DEADLINE, POOL_SIZE, SLACK,
};
use support::fork::spawn_child;
use support::runner::{skip_unless_ci, Check};

type Manager = redis::Client;

fn client(url: &str) -> Result<redis::Client, String> {
    redis::Client::open(url).map_err(|error| format!("redis URL {url:?}: {error}"))
}

/// `SET` and `GET` through `redis::Commands` on the guard, as with r2d2's.
fn set_and_get(conn: &mut PooledConnection<Manager>, key: &str, value: &str) -> Check {
    conn.set_ex::<_, _, ()>(key, value, 60)
        .map_err(|error| format!("SET {key}: {error}"))?;
    let stored: String = conn
        .get(key)
        .map_err(|error| format!("GET {key}: {error}"))?;
    ensure!(
        stored == value,
        "GET {key} gave {stored:?}, expected {value:?}"
    );
    let via_cmd: String = redis::cmd("GET")
        .arg(key)
        .query(conn)
        .map_err(|error| format!("GET {key}: {error}"))?;
    ensure!(
        via_cmd == value,
        "cmd GET {key} gave {via_cmd:?}, expected {value:?}"
    );
    Ok(())
}

impl Backend for Manager {
    type Observer = redis::Connection;

    fn url() -> String {
        std::env::var("FORKSAFE_REDIS_URL")
            .unwrap_or_else(|_| String::from("redis://127.0.0.1:6379/"))
    }

    fn manager(url: &str) -> Result<Manager, String> {
        client(url)
    }

    /// `ECHO` and `CLIENT ID` in one pipelined round trip.
    fn echo(conn: &mut PooledConnection<Manager>, value: &str) -> Result<i64, String> {
        let (answer, session): (String, i64) = redis::pipe()
            .cmd("ECHO")
            .arg(value)
            .cmd("CLIENT")
            .arg("ID")
            .query(conn)
            .map_err(|error| format!("ECHO {value:?}: {error}"))?;
        ensure!(
            answer == value,
            "asked for {value:?}, got {answer:?} (another process's answer?)"
        );
        Ok(session)
    }

    /// An echo; every tenth request also `SET`s and `GET`s a key of the worker's.
    fn request(
        conn: &mut PooledConnection<Manager>,
        request: usize,
        value: &str,
    ) -> Result<i64, String> {
        let session = Manager::echo(conn, value)?;
        if request.is_multiple_of(10) {
            let key = format!("forksafe-pool:test:{}", std::process::id());
            set_and_get(conn, &key, value)?;
        }
        Ok(session)
    }

    fn observer() -> Result<redis::Connection, String> {
        client(&Manager::url())?
            .get_connection()
            .map_err(|error| format!("observer: {error}"))
    }

    /// `CLIENT LIST`.
    fn live_sessions(observer: &mut redis::Connection) -> Result<BTreeSet<i64>, String> {
        let list: String = redis::cmd("CLIENT")
            .arg("LIST")
            .query(observer)
            .map_err(|error| format!("CLIENT LIST: {error}"))?;
        Ok(list
            .lines()
            .filter_map(|line| {
                line.split_whitespace()
                    .find_map(|field| field.strip_prefix("id=")?.parse().ok())
            })
            .collect())
    }
}

/// RESP3 connections (`?protocol=resp3`), where `CLIENT INFO` comes back as a verbatim string:
/// their sockets are identified and released all the same.
fn resp3_connections_are_released_too() -> Check {
    let url = Manager::url();
    let separator = if url.contains('?') { '&' } else { '?' };
    let pool = backend::warm_pool_at::<Manager>(&format!("{url}{separator}protocol=resp3"))?;
    let master = session_ids(&pool)?;
    let mut conn = pool.get().map_err(|error| format!("get: {error}"))?;
    let info: String = redis::cmd("CLIENT")
        .arg("INFO")
        .query(&mut conn)
        .map_err(|error| format!("CLIENT INFO: {error}"))?;
    ensure!(info.contains(" resp=3"), "not a RESP3 connection: {info}");
    drop(conn);
    backend::in_child(|| {
        run_requests(&pool, 50, &master)?;
        check_released(&pool, u64::from(POOL_SIZE), 0)
    })?;
    backend::check_master_intact(&pool, &master)
}

/// A Redis server of the test's own on a free loopback port, so it can be stopped and restarted.
struct PrivateServer {
    port: u16,
    process: Option<std::process::Child>,
}

impl PrivateServer {
    /// A new server; `None` when `redis-server` is not installed and `CI` is unset.
    fn start() -> Result<Option<PrivateServer>, String> {
        match std::process::Command::new("redis-server")
            .arg("--version")
            .output()
        {
            Ok(_) => {}
            Err(error) => {
                let reason = format!("cannot run redis-server for a private server: {error}");
                skip_unless_ci(&reason, "install redis-server")?;
                return Ok(None);
            }
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|listener| listener.local_addr())
            .map_err(|error| format!("no free port: {error}"))?
            .port();
        let mut server = PrivateServer {
            port,
            process: None,
        };
        server.restart()?;
        Ok(Some(server))
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// A pool of 2 connections to this server, both opened now.
    fn pool(&self, timeout: Duration) -> Result<Pool<Manager>, String> {
        Pool::builder()
            .max_size(2)
            .min_idle(Some(2))
            .connection_timeout(timeout)
            .build(client(&self.url())?)
            .map_err(|error| format!("build: {error}"))
    }

    fn restart(&mut self) -> Check {
        let process = std::process::Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--port", &self.port.to_string()])
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
            .stdout(std::process::Stdio::null())
            .spawn()
            .map_err(|error| format!("redis-server: {error}"))?;
        self.process = Some(process);
        let started = Instant::now();
        let client = client(&self.url())?;
        while client
            .get_connection_with_timeout(Duration::from_secs(1))
            .and_then(|mut conn| redis::cmd("PING").query::<String>(&mut conn))
            .is_err()
        {
            ensure!(
                started.elapsed() < Duration::from_secs(10),
                "redis-server on port {} did not start within 10 s",
                self.port
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    fn stop(&mut self) {
        if let Some(mut process) = self.process.take() {
            let _ = process.kill();
            let _ = process.wait();
        }
    }
}

impl Drop for PrivateServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Checks out a connection, retrying until `within` has passed: a pool recovering from a
/// restarted server may first hand out errors, never hang.
fn get_eventually(
    pool: &Pool<Manager>,
    within: Duration,
) -> Result<PooledConnection<Manager>, String> {
    let started = Instant::now();
    loop {
        let attempt = Instant::now();
        match pool.get() {
            Ok(conn) => return Ok(conn),
            Err(error) => {
                ensure!(
                    attempt.elapsed() < pool.connection_timeout() + SLACK,
                    "a failing get took {:?}",
                    attempt.elapsed()
                );
                ensure!(
                    started.elapsed() < within,
                    "no connection within {within:?}: {error}"
                );
            }
        }
    }
}

/// The server is down when the master forks: the child's first `get()` fails within
/// `connection_timeout` naming the cause, and once the server is back the child and the master
/// both get working connections again.
fn server_down_at_fork_and_back_later() -> Check {
    let Some(mut server) = PrivateServer::start()? else {
        return Ok(());
    };
    let timeout = Duration::from_millis(1500);
    let pool = server.pool(timeout)?;
    session_ids(&pool)?;
    server.stop();
    let (report, child_report) = datagram_pair()?;
    let (to_child, from_parent) = datagram_pair()?;
    let pid = spawn_child(|| {
        child_case(&child_report, || {
            let started = Instant::now();
            let error = pool
                .get()
                .err()
                .ok_or("get succeeded with the server down")?
                .to_string();
            ensure!(
                started.elapsed() < timeout + SLACK,
                "get took {:?}",
                started.elapsed()
            );
            ensure!(
                error.contains("Connection refused") && error.contains("rebuilt after fork()"),
                "get error {error:?} does not say the connection was refused after fork()"
            );
            send(&child_report, String::from("down"))?;
            receive(&from_parent, DEADLINE)?;
            let mut conn = get_eventually(&pool, Duration::from_secs(10))?;
            Manager::echo(
                &mut conn,
                &format!("child-{}-after-restart", std::process::id()),
            )?;
            drop(conn);
            check_released(&pool, 2, 0)
        })
    });
    let mut cleanup = KillOnDrop(vec![pid]);
    let message = receive(&report, DEADLINE)?;
    ensure!(message == "down", "{message}");
    server.restart()?;
    send(&to_child, String::from("back"))?;
    cleanup.0.clear();
    expect_child_exit("child", pid, &report)?;
    let mut conn = get_eventually(&pool, Duration::from_secs(10))?;
    Manager::echo(&mut conn, "master-after-restart").map(drop)
}

/// The server restarts while 2 workers run requests: requests may fail while it is down, but
/// none hangs, and every worker gets answers again once it is back.
fn server_restarted_while_workers_run() -> Check {
    let Some(mut server) = PrivateServer::start()? else {
        return Ok(());
    };
    let timeout = Duration::from_millis(1500);
    let pool = server.pool(timeout)?;
    session_ids(&pool)?;
    let (report, child_report) = datagram_pair()?;
    let (to_workers, from_parent) = datagram_pair()?;
    let workers = 2;
    let pids: Vec<Pid> = (0..workers)
        .map(|_| {
            spawn_child(|| {
                child_case(&child_report, || {
                    let me = std::process::id();
                    run_requests(&pool, 20, &BTreeSet::new())?;
                    send(&child_report, String::from("running"))?;
                    from_parent
                        .set_nonblocking(true)
                        .map_err(|error| error.to_string())?;
                    // Requests until told the server is back; errors allowed, hangs not.
                    let mut request = 0;
                    while from_parent.recv(&mut [0; 16]).is_err() {
                        let attempt = Instant::now();
                        if let Ok(mut conn) = pool.get() {
                            let _ = Manager::echo(&mut conn, &format!("worker-{me}-{request}"));
                        }
                        ensure!(
                            attempt.elapsed() < timeout + SLACK,
                            "request {request} took {:?}",
                            attempt.elapsed()
                        );
                        request += 1;
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    // Back: answers again, each one its own.
                    drop(get_eventually(&pool, Duration::from_secs(10))?);
                    run_requests(&pool, 50, &BTreeSet::new()).map(drop)
                })
            })
        })
        .collect();
    let mut cleanup = KillOnDrop(pids.clone());
    for _ in 0..workers {
        let message = receive(&report, DEADLINE)?;
        ensure!(message == "running", "{message}");
    }
    server.stop();
    std::thread::sleep(Duration::from_millis(300));
    server.restart()?;
    for _ in 0..workers {
        send(&to_workers, String::from("back"))?;
    }
    cleanup.0.clear();
    expect_workers_exit(pids, &report)
}

/// Bad configuration fails fast with r2d2's error and the cause, never hangs: in the process
/// that built the pool, and in a forked child that rebuilds it. (A URL the redis crate cannot
/// parse never reaches a pool: `redis::Client::open` rejects it.)
fn bad_input_fails_within_connection_timeout() -> Check {
    ensure!(
        redis::Client::open("not-a-url").is_err(),
        "redis::Client::open accepted \"not-a-url\""
    );
    let good = Manager::url();
    let with_password = good.replacen("redis://", "redis://:wrong-password@", 1);
    let base = good.trim_end_matches('/');
    backend::bad_input_fails_within_connection_timeout::<Manager>(|silent_port| {
        vec![
            (
                "wrong password",
                with_password,
                "Password authentication failed",
            ),
            (
                "database out of range",
                format!("{base}/4000"),
                "DB index is out of range",
            ),
            (
                "unreachable port",
                String::from("redis://127.0.0.1:1/"),
                "Connection refused",
            ),
            (
                "a server that never answers",
                format!("redis://127.0.0.1:{silent_port}/"),
                "timed out waiting for connection",
            ),
        ]
    })
}

fn main() {
    let reachable = client(&Manager::url()).and_then(|client| {
        let mut conn = client
            .get_connection_with_timeout(Duration::from_secs(5))
            .map_err(|error| error.to_string())?;
        redis::cmd("PING")
            .query::<String>(&mut conn)
            .map(drop)
            .map_err(|error| error.to_string())
    });
    let reachable =
        reachable.map_err(|error| format!("Redis at {} is unreachable: {error}", Manager::url()));
    backend::run::<Manager>(
        "Redis",
        reachable,
        "set FORKSAFE_REDIS_URL",
        [
            (
                "resp3_connections_are_released_too",
                resp3_connections_are_released_too as fn() -> Check,
            ),
            (
                "server_down_at_fork_and_back_later",
                server_down_at_fork_and_back_later,
            ),
            (
                "server_restarted_while_workers_run",
                server_restarted_while_workers_run,
            ),
            (
                "bad_input_fails_within_connection_timeout",
                bad_input_fails_within_connection_timeout,
            ),
        ],
    );
}
