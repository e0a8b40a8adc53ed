//! diesel `PgConnection` through forksafe-pool against a real PostgreSQL, over TCP with TLS
//! (libpq's default `sslmode=prefer`), over TCP with `sslmode=disable`, and over the Unix socket.
//!
//! A `harness = false` binary: the cases fork for real, one after another, and every child is
//! reaped with a deadline (a child still running then is killed and fails its case). The
//! scenarios every server backend runs are in `support/backend.rs`, run here once per
//! transport; the ones below are PostgreSQL's own (a server that goes away and comes back,
//! `release_idle` cycles).
//!
//! Environment: `FORKSAFE_PG_URL` (default `postgres://postgres@127.0.0.1:5432/test`) and
//! `FORKSAFE_PG_SOCKET_URL` (default `postgres:///test?host=/var/run/postgresql&user=postgres`).
//! Without a server the binary prints why and skips, unless `CI` is set: then it fails.

#[macro_use]
mod support;

use std::collections::BTreeSet;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use diesel::pg::PgConnection;
use diesel::r2d2::ConnectionManager;
use diesel::sql_types::{BigInt, Bool, Integer, Nullable, Text};
use diesel::{Connection, QueryableByName, RunQueryDsl};
use forksafe_pool::{Pool, PooledConnection};
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use support::backend::{self, At, Backend, Variant, DEADLINE, POOL_SIZE};
use support::fork::{reap, spawn_child};
use support::runner::{child_result, ci, expect_exit, Case, Check, NamedCase};

type Manager = ConnectionManager<PgConnection>;
type PgPool = Pool<Manager>;
type PgConn = PooledConnection<Manager>;

fn tcp_url() -> String {
    env_or("FORKSAFE_PG_URL", "postgres://postgres@127.0.0.1:5432/test")
}

/// TCP with `sslmode=disable`.
fn plain_url() -> String {
    with_param(&tcp_url(), "sslmode=disable")
}

fn env_or(name: &str, default: &str) -> String {
    std::env::var(name)
        .ok()
        .filter(|value| !value.is_empty())
        .unwrap_or_else(|| default.to_string())
}

fn with_param(url: &str, param: &str) -> String {
    let separator = if url.contains('?') { '&' } else { '?' };
    format!("{url}{separator}{param}")
}

/// TCP with `sslmode=disable`.
struct Plain;
/// The server's Unix socket.
struct Unix;

impl Variant for Plain {
    fn url() -> String {
        plain_url()
    }
}

impl Variant for Unix {
    fn url() -> String {
        env_or(
            "FORKSAFE_PG_SOCKET_URL",
            "postgres:///test?host=/var/run/postgresql&user=postgres",
        )
    }
}

#[derive(QueryableByName)]
struct Echo {
    #[diesel(sql_type = Text)]
    value: String,
    #[diesel(sql_type = Integer)]
    pid: i32,
}

#[derive(QueryableByName)]
struct Ssl {
    #[diesel(sql_type = Bool)]
    ssl: bool,
}

#[derive(QueryableByName)]
struct Session {
    #[diesel(sql_type = BigInt)]
    session: i64,
}

/// Sends `value` through the server; returns what came back and the serving backend's pid,
/// which names the session.
fn query_echo(conn: &mut PgConnection, value: &str) -> Result<(String, i64), String> {
    let row: Echo = diesel::sql_query("SELECT $1::text AS value, pg_backend_pid() AS pid")
        .bind::<Text, _>(value)
        .get_result(conn)
        .map_err(|error| format!("query {value:?}: {error}"))?;
    Ok((row.value, i64::from(row.pid)))
}

/// [`query_echo`], checking that `value` came back; returns the session.
fn echo(conn: &mut PgConnection, value: &str) -> Result<i64, String> {
    let (answer, session) = query_echo(conn, value)?;
    ensure!(
        answer == value,
        "asked {value:?}, got {answer:?} (another process's answer?)"
    );
    Ok(session)
}

fn observer() -> Result<PgConnection, String> {
    PgConnection::establish(&plain_url()).map_err(|error| format!("observer: {error}"))
}

/// Client backends connected right now, from `pg_stat_activity`.
fn live_sessions(observer: &mut PgConnection) -> Result<BTreeSet<i64>, String> {
    let rows: Vec<Session> = diesel::sql_query(
        "SELECT pid::bigint AS session FROM pg_stat_activity WHERE backend_type = 'client backend'",
    )
    .load(observer)
    .map_err(|error| format!("pg_stat_activity: {error}"))?;
    Ok(rows.into_iter().map(|row| row.session).collect())
}

/// TCP with libpq's default `sslmode=prefer`, which must negotiate TLS with this server.
impl Backend for Manager {
    type Observer = PgConnection;

    /// libpq holds process-global locks for an instant of every connect and close (its GSSAPI
    /// probe under the default `gssencmode=prefer`, OpenSSL's setup and teardown); a fork in
    /// that instant must not leave one held in the child, and it takes many forks to hit it.
    const FORKS_WHILE_CONNECTING: usize = 150;
    const SLACK: Duration = Duration::from_secs(2);

    fn url() -> String {
        tcp_url()
    }

    fn manager(url: &str) -> Result<Self, String> {
        Ok(ConnectionManager::new(url))
    }

    fn echo(conn: &mut PooledConnection<Self>, value: &str) -> Result<i64, String> {
        echo(conn, value)
    }

    fn check_warm(conn: &mut PooledConnection<Self>) -> Check {
        let row: Ssl =
            diesel::sql_query("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
                .get_result(&mut **conn)
                .map_err(|error| format!("pg_stat_ssl: {error}"))?;
        ensure!(
            row.ssl,
            "libpq's default sslmode=prefer did not negotiate TLS with this server"
        );
        Ok(())
    }

    fn observer() -> Result<PgConnection, String> {
        observer()
    }

    fn live_sessions(observer: &mut PgConnection) -> Result<BTreeSet<i64>, String> {
        live_sessions(observer)
    }
}

impl<V: Variant> Backend for At<V, Manager> {
    type Observer = PgConnection;
    const FORKS_WHILE_CONNECTING: usize = Manager::FORKS_WHILE_CONNECTING;
    const SLACK: Duration = Manager::SLACK;

    fn url() -> String {
        V::url()
    }

    fn manager(url: &str) -> Result<Self, String> {
        Ok(At::new(ConnectionManager::new(url)))
    }

    fn echo(conn: &mut PooledConnection<Self>, value: &str) -> Result<i64, String> {
        echo(conn, value)
    }

    fn observer() -> Result<PgConnection, String> {
        observer()
    }

    fn live_sessions(observer: &mut PgConnection) -> Result<BTreeSet<i64>, String> {
        live_sessions(observer)
    }
}

/// Wrong database, unknown user, nothing listening, a malformed URL: r2d2's error naming the
/// cause, within `connection_timeout`, in the building process and in a forked child alike.
/// Without TLS: these pools keep trying to connect in the background after each check, and a
/// TLS handshake still running when this binary exits could crash it in OpenSSL's exit handler.
fn bad_input_is_a_clear_error_in_time() -> Check {
    backend::bad_input_fails_within_connection_timeout::<Manager>(|_| {
        let base = plain_url();
        // libpq lets query parameters override what the URL's path and user info say.
        vec![
            (
                "no such database",
                with_param(&base, "dbname=forksafe_no_such_database"),
                "forksafe_no_such_database",
            ),
            (
                "no such user",
                with_param(&base, "user=forksafe_no_such_user"),
                "forksafe_no_such_user",
            ),
            (
                "nothing listening",
                "postgres://postgres@127.0.0.1:1/test?connect_timeout=1".to_string(),
                "refused",
            ),
            (
                "not a URL",
                "not a url at all".to_string(),
                "connection info string",
            ),
        ]
    })
}

/// A stand-in for a server that goes down and comes back: a TCP forwarder to PostgreSQL in a
/// process of its own (this test binary, re-executed with `FORKSAFE_TEST_PROXY` set). Killing
/// it cuts every connection through it at once, like a server restart; starting it again on the
/// same port brings the "server" back. (Restarting the real server would disturb everything
/// else using it.)
struct Proxy {
    port: u16,
    upstream: SocketAddr,
    process: Option<std::process::Child>,
}

const PROXY_ENV: &str = "FORKSAFE_TEST_PROXY";

impl Proxy {
    fn start() -> Result<Proxy, String> {
        let mut conn = PgConnection::establish(&plain_url())
            .map_err(|error| format!("proxy upstream: {error}"))?;
        let row: ServerEnd = diesel::sql_query(
            "SELECT host(inet_server_addr()) AS addr, inet_server_port() AS port",
        )
        .get_result(&mut conn)
        .map_err(|error| format!("server address: {error}"))?;
        let (Some(addr), Some(port)) = (row.addr, row.port) else {
            return Err("FORKSAFE_PG_URL must be a TCP URL for the proxy tests".into());
        };
        let upstream = SocketAddr::new(
            addr.parse()
                .map_err(|_| format!("server address {addr:?}"))?,
            u16::try_from(port).map_err(|_| format!("server port {port}"))?,
        );
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|listener| listener.local_addr())
            .map_err(|error| format!("free port: {error}"))?
            .port();
        let mut proxy = Proxy {
            port,
            upstream,
            process: None,
        };
        proxy.up()?;
        Ok(proxy)
    }

    /// The URL of the database, reached through the proxy.
    fn url(&self) -> String {
        // Without TLS, so that no handshake with a pool still reconnecting in the background
        // can be running when this binary exits (OpenSSL's exit handler crashes then).
        with_param(&plain_url(), &format!("host=127.0.0.1&port={}", self.port))
    }

    fn up(&mut self) -> Check {
        let exe = std::env::current_exe().map_err(|error| format!("current_exe: {error}"))?;
        let child = std::process::Command::new(exe)
            .env(PROXY_ENV, format!("{},{}", self.port, self.upstream))
            .spawn()
            .map_err(|error| format!("start proxy: {error}"))?;
        self.process = Some(child);
        let until = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            ensure!(Instant::now() < until, "the proxy did not start listening");
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(())
    }

    fn down(&mut self) {
        if let Some(mut child) = self.process.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.down();
    }
}

#[derive(QueryableByName)]
struct ServerEnd {
    #[diesel(sql_type = Nullable<Text>)]
    addr: Option<String>,
    #[diesel(sql_type = Nullable<Integer>)]
    port: Option<i32>,
}

/// The proxy process: forwards every connection on `port` to `upstream` until killed.
fn run_proxy(spec: &str) -> ! {
    let _ = nix::sys::prctl::set_pdeathsig(Signal::SIGKILL);
    let (port, upstream) = spec.split_once(',').expect("port,upstream");
    let upstream: SocketAddr = upstream.parse().expect("upstream address");
    let listener =
        TcpListener::bind(("127.0.0.1", port.parse::<u16>().expect("port"))).expect("bind proxy");
    for client in listener.incoming() {
        let Ok(client) = client else { continue };
        let Ok(server) = TcpStream::connect(upstream) else {
            continue;
        };
        let (Ok(client_reader), Ok(server_reader)) = (client.try_clone(), server.try_clone())
        else {
            continue;
        };
        std::thread::spawn(move || forward(client_reader, server));
        std::thread::spawn(move || forward(server_reader, client));
    }
    std::process::exit(0)
}

fn forward(mut from: TcpStream, mut to: TcpStream) {
    let _ = std::io::copy(&mut from, &mut to);
    let _ = to.shutdown(std::net::Shutdown::Write);
}

#[derive(QueryableByName)]
struct Count {
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    count: i64,
}

/// Sessions the server has open under `application_name`, seen from a fresh connection (which
/// goes by another name).
fn sessions_named(application_name: &str) -> Result<i64, String> {
    let mut conn =
        PgConnection::establish(&plain_url()).map_err(|error| format!("observer: {error}"))?;
    let row: Count = diesel::sql_query(
        "SELECT count(*) AS count FROM pg_stat_activity WHERE application_name = $1",
    )
    .bind::<Text, _>(application_name)
    .get_result(&mut conn)
    .map_err(|error| format!("pg_stat_activity: {error}"))?;
    Ok(row.count)
}

/// `release_idle` between checkouts while the pool reopens `min_idle` in the background: once
/// the last release's connects in flight have ended, the server has no session of the pool's
/// left. `on_r2d2`: a pool with an event handler, whose every release retires an r2d2 pool.
fn release_idle_cycles_leave_no_session_open(on_r2d2: bool) -> Check {
    let application_name = format!(
        "forksafe-release-idle-{}{}",
        std::process::id(),
        if on_r2d2 { "-r2d2" } else { "" }
    );
    let url = with_param(
        &plain_url(),
        &format!("application_name={application_name}"),
    );
    let mut builder = Pool::builder();
    if on_r2d2 {
        builder = builder.event_handler(Box::new(forksafe_pool::NopEventHandler));
    }
    let pool = builder
        .max_size(3)
        .connection_timeout(Duration::from_secs(10))
        .build(ConnectionManager::<PgConnection>::new(url))
        .map_err(|error| format!("pool: {error}"))?;
    ensure!(
        sessions_named(&application_name)? == 3,
        "the pool's sessions are not named {application_name}"
    );
    for cycle in 0..10 {
        pool.release_idle();
        let mut conn = pool
            .get()
            .map_err(|error| format!("cycle {cycle}: get: {error}"))?;
        let value = format!("cycle-{cycle}");
        echo(&mut conn, &value)?;
    }
    pool.release_idle();
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        let open = sessions_named(&application_name)?;
        if open == 0 {
            break;
        }
        ensure!(
            Instant::now() < until,
            "{open} sessions still open 10 s after the last release_idle; pool {:?}",
            pool.state()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // The pool still serves.
    let mut conn = pool.get().map_err(|error| format!("get after: {error}"))?;
    echo(&mut conn, "after").map(drop)
}

/// Gets a connection, retrying until `within`: the pool must recover once the server is back.
fn get_within(pool: &PgPool, within: Duration) -> Result<PgConn, String> {
    let until = Instant::now() + within;
    loop {
        match pool.get() {
            Ok(conn) => return Ok(conn),
            Err(error) if Instant::now() >= until => {
                return Err(format!(
                    "no connection {within:?} after the server came back: {error}"
                ))
            }
            Err(_) => {}
        }
    }
}

/// A pool of `size` connections through `proxy`, all open, one of them checked to answer.
fn warm_pool_through(proxy: &Proxy, size: u32, timeout: Duration) -> Result<PgPool, String> {
    let pool: PgPool = Pool::builder()
        .max_size(size)
        .min_idle(Some(size))
        .connection_timeout(timeout)
        .build(ConnectionManager::new(proxy.url()))
        .map_err(|error| format!("pool through the proxy: {error}"))?;
    let mut conn = pool.get().map_err(|error| format!("warm: {error}"))?;
    echo(&mut conn, "warm")?;
    drop(conn);
    Ok(pool)
}

/// The server is down when a worker is forked: its first `get()` is a clear error within
/// `connection_timeout`; once the server is back, the worker's pool and the master's both work.
fn server_down_at_fork_and_back_later() -> Check {
    let timeout = Duration::from_millis(1500);
    let mut proxy = Proxy::start()?;
    let pool = warm_pool_through(&proxy, 2, timeout)?;
    let dir = scratch_dir("down-at-fork")?;
    let back = dir.join("back");
    proxy.down();
    let child = spawn_child(|| {
        child_result((|| {
            let started = Instant::now();
            let error = match pool.get() {
                Ok(_) => return Err("got a connection with the server down".into()),
                Err(error) => error.to_string(),
            };
            let waited = started.elapsed();
            ensure!(
                waited < timeout + Duration::from_secs(2),
                "get() took {waited:?}"
            );
            ensure!(
                error.contains("timed out waiting for connection") && error.contains("refused"),
                "not a clear error: {error}"
            );
            write_atomically(&dir.join("saw-error"), "yes")?;
            wait_for_file(&back, Duration::from_secs(30))?;
            let mut conn = get_within(&pool, Duration::from_secs(10))?;
            echo(&mut conn, "child is back")?;
            drop(conn);
            backend::run_requests(&pool, 50, &BTreeSet::new()).map(drop)
        })())
    });
    let result = (|| {
        read_when_written(&dir.join("saw-error"))?;
        proxy.up()?;
        write_atomically(&back, "back")?;
        expect_exit("child", reap(child, DEADLINE), 0)?;
        let mut conn = get_within(&pool, Duration::from_secs(10))?;
        echo(&mut conn, "master is back")?;
        Ok(())
    })();
    kill_if_running(child);
    let _ = std::fs::remove_dir_all(&dir);
    result
}

/// The server goes away (for longer than `connection_timeout`) and comes back while workers
/// run requests in a loop: requests fail meanwhile but none hangs (each ends within
/// `connection_timeout` and a bit), and every worker's requests succeed again once it is back.
fn server_restarted_while_workers_run() -> Check {
    let timeout = Duration::from_millis(1500);
    let mut proxy = Proxy::start()?;
    let pool = warm_pool_through(&proxy, POOL_SIZE, timeout)?;
    let dir = scratch_dir("restart")?;
    let back = dir.join("back");
    let workers: Vec<Pid> = (0..2)
        .map(|index| {
            let (running, back) = (dir.join(format!("running-{index}")), back.clone());
            let pool = pool.clone();
            spawn_child(move || {
                child_result((|| {
                    let until = Instant::now() + Duration::from_secs(30);
                    let (mut failed, mut ok_since_back) = (0, 0);
                    for request in 0.. {
                        ensure!(
                            Instant::now() < until,
                            "not recovered: {failed} failed, {ok_since_back} ok since back"
                        );
                        let is_back = back.exists();
                        let started = Instant::now();
                        let value = format!("worker {} request {request}", std::process::id());
                        let outcome = pool
                            .get()
                            .map_err(|error| error.to_string())
                            .and_then(|mut conn| query_echo(&mut conn, &value));
                        let took = started.elapsed();
                        ensure!(
                            took < timeout + Duration::from_secs(2),
                            "request {request} took {took:?}"
                        );
                        match outcome {
                            Ok((answer, _)) => {
                                ensure!(
                                    answer == value,
                                    "request {request}: asked {value:?}, got {answer:?}"
                                );
                                ok_since_back += usize::from(is_back);
                            }
                            Err(_) => {
                                failed += 1;
                                ok_since_back = 0;
                            }
                        }
                        if request == 10 {
                            write_atomically(&running, "running")?;
                        }
                        if ok_since_back >= 50 {
                            // The server was away for longer than `connection_timeout`.
                            ensure!(failed > 0, "no request failed while the server was down");
                            break;
                        }
                        std::thread::sleep(Duration::from_millis(2));
                    }
                    Ok(())
                })())
            })
        })
        .collect();
    let result = (|| {
        for index in 0..2 {
            read_when_written(&dir.join(format!("running-{index}")))?;
        }
        std::thread::sleep(Duration::from_millis(200));
        proxy.down();
        std::thread::sleep(timeout + Duration::from_millis(1000));
        proxy.up()?;
        write_atomically(&back, "back")?;
        for (index, worker) in workers.iter().enumerate() {
            expect_exit(&format!("worker {index}"), reap(*worker, DEADLINE), 0)?;
        }
        let mut conn = get_within(&pool, Duration::from_secs(10))?;
        echo(&mut conn, "master is back")?;
        Ok(())
    })();
    workers.into_iter().for_each(kill_if_running);
    let _ = std::fs::remove_dir_all(&dir);
    result
}

/// Kills and reaps `pid` if it is a child of ours that is still running (after a failed case).
fn kill_if_running(pid: Pid) {
    if waitpid(pid, Some(WaitPidFlag::WNOHANG)) == Ok(WaitStatus::StillAlive) {
        let _ = kill(pid, Signal::SIGKILL);
        let _ = waitpid(pid, None);
    }
}

fn scratch_dir(name: &str) -> Result<PathBuf, String> {
    let dir = std::env::temp_dir().join(format!("forksafe-pg-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).map_err(|error| format!("mkdir {dir:?}: {error}"))?;
    Ok(dir)
}

fn write_atomically(path: &Path, text: &str) -> Check {
    let partial = path.with_extension("partial");
    std::fs::write(&partial, text).map_err(|error| format!("write {partial:?}: {error}"))?;
    std::fs::rename(&partial, path).map_err(|error| format!("rename {partial:?}: {error}"))
}

fn wait_for_file(path: &Path, timeout: Duration) -> Check {
    let until = Instant::now() + timeout;
    while !path.exists() {
        ensure!(
            Instant::now() < until,
            "{path:?} did not appear in {timeout:?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

fn read_when_written(path: &Path) -> Result<String, String> {
    wait_for_file(path, Duration::from_secs(30))?;
    std::fs::read_to_string(path).map_err(|error| format!("read {path:?}: {error}"))
}

/// Whether the server answers at `url` at all; the reason when it does not.
fn server_reachable(url: &str) -> Result<(), String> {
    let url = with_param(url, "connect_timeout=3");
    PgConnection::establish(&url)
        .map(drop)
        .map_err(|error| format!("PostgreSQL at {url}: {error}"))
}

/// The shared scenarios for `B`, named `prefix::…`, if its server answers (under `CI` always:
/// then an unreachable transport fails its cases).
fn scenarios_if_reachable<B: Backend>(prefix: &str) -> Vec<NamedCase> {
    if let Err(reason) = server_reachable(&B::url()) {
        if !ci() {
            println!("skipping the {prefix} cases: {reason} (set CI=true to make this a failure)");
            return Vec::new();
        }
    }
    backend::scenarios::<B>(&format!("{prefix}::"))
}

fn main() {
    if let Ok(spec) = std::env::var(PROXY_ENV) {
        run_proxy(&spec);
    }
    let own: [Case; 5] = [
        (
            "bad_input_is_a_clear_error_in_time",
            bad_input_is_a_clear_error_in_time,
        ),
        ("release_idle_cycles_leave_no_session_open", || {
            release_idle_cycles_leave_no_session_open(false)
        }),
        ("release_idle_cycles_leave_no_session_open_on_r2d2", || {
            release_idle_cycles_leave_no_session_open(true)
        }),
        (
            "server_down_at_fork_and_back_later",
            server_down_at_fork_and_back_later,
        ),
        (
            "server_restarted_while_workers_run",
            server_restarted_while_workers_run,
        ),
    ];
    let cases = scenarios_if_reachable::<Manager>("tls")
        .into_iter()
        .chain(scenarios_if_reachable::<At<Plain, Manager>>("plain"))
        .chain(scenarios_if_reachable::<At<Unix, Manager>>("unix"))
        .chain(own.into_iter().map(|(name, case)| (name.to_string(), case)));
    backend::run_all(
        "PostgreSQL",
        server_reachable(&plain_url()),
        "set FORKSAFE_PG_URL",
        cases,
    );
}
