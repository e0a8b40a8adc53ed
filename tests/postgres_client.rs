//! PostgreSQL through r2d2_postgres (`postgres::Client`), plain and over TLS
//! (postgres-openssl), forked for real against a real server (`FORKSAFE_PG_URL`, default
//! `postgres://postgres@127.0.0.1:5432/test`; over the Unix socket `FORKSAFE_PG_SOCKET_URL`,
//! default `host=/var/run/postgresql user=postgres dbname=test`).
//!
//! A `harness = false` binary: the cases fork, so they run one after another in this process,
//! and every child is reaped with a deadline. Without a reachable server the binary prints why
//! and skips, unless `CI` is set: then it fails.
//!
//! Every shared scenario of `support/backend.rs` runs twice, once per transport (`plain::`,
//! `tls::`); the cases here are this client's own.

#[macro_use]
mod support;

use std::collections::BTreeSet;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use forksafe_pool::{HandleError, ManageConnection, Pool, PooledConnection};
use openssl::ssl::{SslConnector, SslMethod, SslVerifyMode};
use postgres_openssl::MakeTlsConnector;
use r2d2_postgres::postgres::{self, Client, Config, NoTls};
use r2d2_postgres::PostgresConnectionManager;
use support::backend::{self, Backend, SLACK};
use support::runner::{Case, Check};

type Plain = PostgresConnectionManager<NoTls>;
type Tls = PostgresConnectionManager<MakeTlsConnector>;

fn url() -> String {
    std::env::var("FORKSAFE_PG_URL")
        .ok()
        .filter(|url| !url.is_empty())
        .unwrap_or_else(|| String::from("postgres://postgres@127.0.0.1:5432/test"))
}

fn with_param(url: &str, param: &str) -> String {
    let separator = if url.contains('?') { '&' } else { '?' };
    format!("{url}{separator}{param}")
}

fn config(url: &str) -> Result<Config, String> {
    url.parse::<Config>()
        .map_err(|error| format!("postgres URL {url:?}: {error}"))
}

/// TLS without certificate checks: the test server has Debian's snakeoil certificate.
///
/// Built once per test process, as an application builds its connector once: making an
/// OpenSSL context (`SSL_CTX_new`) takes OpenSSL's global locks, and a fork while another thread
/// holds one leaves it held in the child, whose own TLS handshakes then wait forever (1 child in
/// ~300 of `forks_while_the_master_connects` when every pool made its own). The pool guards its
/// connects and closes against that; code outside them is the application's.
fn tls_connector() -> Result<MakeTlsConnector, String> {
    static CONNECTOR: OnceLock<Result<MakeTlsConnector, String>> = OnceLock::new();
    CONNECTOR
        .get_or_init(|| {
            let mut builder =
                SslConnector::builder(SslMethod::tls()).map_err(|error| error.to_string())?;
            builder.set_verify(SslVerifyMode::NONE);
            Ok(MakeTlsConnector::new(builder.build()))
        })
        .clone()
}

/// Echoes `value` and names the session (its backend pid); checks the echo, and that the
/// session runs over TLS exactly when `tls` says.
fn echo_on(client: &mut Client, value: &str, tls: bool) -> Result<i64, String> {
    let row = client
        .query_one(
            "SELECT $1::text AS value, pg_backend_pid() AS pid, \
             COALESCE((SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()), false) AS ssl",
            &[&value],
        )
        .map_err(|error| format!("query for {value:?}: {error}"))?;
    let answer: String = row.get("value");
    ensure!(
        answer == value,
        "asked for {value:?}, got {answer:?} (another process's answer?)"
    );
    let ssl: bool = row.get("ssl");
    ensure!(ssl == tls, "the session's TLS is {ssl}, expected {tls}");
    Ok(i64::from(row.get::<_, i32>("pid")))
}

fn observer() -> Result<Client, String> {
    Client::connect(&url(), NoTls).map_err(|error| format!("observer: {error}"))
}

/// `pg_stat_activity`'s client backends.
fn live_sessions(observer: &mut Client) -> Result<BTreeSet<i64>, String> {
    let rows = observer
        .query(
            "SELECT pid FROM pg_stat_activity WHERE backend_type = 'client backend'",
            &[],
        )
        .map_err(|error| format!("pg_stat_activity: {error}"))?;
    Ok(rows
        .iter()
        .map(|row| i64::from(row.get::<_, i32>(0)))
        .collect())
}

impl Backend for Plain {
    type Observer = Client;

    fn url() -> String {
        with_param(&url(), "sslmode=disable")
    }

    fn manager(url: &str) -> Result<Self, String> {
        Ok(PostgresConnectionManager::new(config(url)?, NoTls))
    }

    fn echo(conn: &mut PooledConnection<Self>, value: &str) -> Result<i64, String> {
        echo_on(conn, value, false)
    }

    fn observer() -> Result<Client, String> {
        observer()
    }

    fn live_sessions(observer: &mut Client) -> Result<BTreeSet<i64>, String> {
        live_sessions(observer)
    }
}

impl Backend for Tls {
    type Observer = Client;

    fn url() -> String {
        with_param(&url(), "sslmode=require")
    }

    fn manager(url: &str) -> Result<Self, String> {
        Ok(PostgresConnectionManager::new(
            config(url)?,
            tls_connector()?,
        ))
    }

    fn echo(conn: &mut PooledConnection<Self>, value: &str) -> Result<i64, String> {
        echo_on(conn, value, true)
    }

    fn observer() -> Result<Client, String> {
        observer()
    }

    fn live_sessions(observer: &mut Client) -> Result<BTreeSet<i64>, String> {
        live_sessions(observer)
    }
}

/// The server's message of every connect error the pool reports to its error handler.
#[derive(Clone, Debug, Default)]
struct ServerMessages(Arc<Mutex<Vec<String>>>);

impl HandleError<postgres::Error> for ServerMessages {
    fn handle_error(&self, error: postgres::Error) {
        let message = match error.as_db_error() {
            Some(db) => db.message().to_string(),
            None => error.to_string(),
        };
        self.0.lock().unwrap().push(message);
    }
}

/// Bad configuration gives the driver's error within the timeout, in the building process and
/// in a forked child (wrong database, unknown user, a closed port, a server that never
/// answers); a string that is no URL is refused by the driver before there is a pool.
/// The driver's `Display` of a server error is only "db error"; the server's own message
/// reaches the pool's error handler.
fn bad_input_gives_the_drivers_error_in_time() -> Check {
    let base = Plain::url();
    let not_a_url = Plain::manager("not a url at all").err();
    ensure!(
        not_a_url
            .as_deref()
            .is_some_and(|error| error.contains("invalid")),
        "a string that is no URL gave {not_a_url:?}"
    );
    let messages = ServerMessages::default();
    let no_database = with_param(&base, "dbname=forksafe_no_such_database");
    let error = Pool::builder()
        .max_size(1)
        .connection_timeout(Duration::from_millis(1500))
        .error_handler(Box::new(messages.clone()))
        .build(Plain::manager(&no_database)?)
        .err()
        .ok_or("a pool on a database that does not exist was built")?;
    let seen = messages.0.lock().unwrap().clone();
    ensure!(
        seen.iter()
            .any(|message| message.contains("forksafe_no_such_database")),
        "the error handler did not get the server's message (pool error {error}): {seen:?}"
    );
    backend::bad_input_fails_within_connection_timeout::<Plain>(|silent_port| {
        vec![
            (
                "unknown database",
                no_database.clone(),
                "db error",
            ),
            (
                "unknown user",
                with_param(&base, "user=forksafe_no_such_user"),
                "db error",
            ),
            (
                "closed port",
                String::from("postgres://postgres@127.0.0.1:1/test?sslmode=disable"),
                "error connecting to server",
            ),
            (
                "a server that never answers",
                format!(
                    "postgres://postgres@127.0.0.1:{silent_port}/test?sslmode=disable&connect_timeout=1"
                ),
                "timed out waiting for connection",
            ),
        ]
    })
}

/// Over a Unix socket the server names no client address; the connect window names each
/// connection's socket instead, so the child releases every inherited one and gets its own
/// sessions, and the master's stay intact.
fn unix_socket_connections_are_released() -> Check {
    let socket_url = std::env::var("FORKSAFE_PG_SOCKET_URL")
        .unwrap_or_else(|_| String::from("host=/var/run/postgresql user=postgres dbname=test"));
    if let Err(error) = Client::connect(&socket_url, NoTls) {
        return support::runner::skip_unless_ci(
            &format!("the server's Unix socket is unreachable: {error}"),
            "set FORKSAFE_PG_SOCKET_URL",
        );
    }
    let pool = backend::warm_pool_at::<Plain>(&socket_url)?;
    let master = backend::session_ids(&pool)?;
    backend::in_child(|| {
        backend::run_requests(&pool, 50, &master)?;
        let inherited = u64::from(backend::POOL_SIZE);
        backend::expect_fork_stats(&pool.fork_stats(), inherited, inherited, 0)
    })?;
    backend::check_master_intact(&pool, &master)
}

/// A user's own locator replaces the built-in one: a locator that names nothing
/// (`Some(vec![])`) hides the leak — the child counts the connections as identified, releases
/// nothing, and the master's sessions would outlive it. The pitfall the builder's docs warn of.
fn an_empty_locator_answer_hides_the_leak() -> Check {
    let pool = Pool::builder()
        .max_size(2)
        .descriptor_locator(|_: &mut Client| Some(vec![]))
        .build(Plain::manager(&Plain::url())?)
        .map_err(|error| format!("build: {error}"))?;
    backend::in_child(|| {
        let started = Instant::now();
        pool.get().map_err(|error| format!("get: {error}"))?;
        ensure!(
            started.elapsed() < Duration::from_secs(10) + SLACK,
            "get took {:?}",
            started.elapsed()
        );
        backend::expect_fork_stats(&pool.fork_stats(), 2, 0, 0)
    })
}

/// r2d2_postgres's manager, plus a socket pair of its own made (and kept) during every connect:
/// the connect window sees three new sockets and names none.
struct ExtraSockets(Plain);

/// The extra sockets, kept open for as long as the test runs.
static EXTRA_SOCKETS: Mutex<Vec<(UnixStream, UnixStream)>> = Mutex::new(Vec::new());

impl ManageConnection for ExtraSockets {
    type Connection = Client;
    type Error = postgres::Error;

    fn connect(&self) -> Result<Client, postgres::Error> {
        let client = self.0.connect()?;
        let pair = UnixStream::pair().expect("a socket pair");
        EXTRA_SOCKETS.lock().unwrap().push(pair);
        Ok(client)
    }

    fn is_valid(&self, client: &mut Client) -> Result<(), postgres::Error> {
        self.0.is_valid(client)
    }

    fn has_broken(&self, client: &mut Client) -> bool {
        self.0.has_broken(client)
    }
}

/// Over TCP the server's view alone names each connection's socket: with the connect window
/// of every connect ambiguous, the child still releases every inherited socket and counts
/// none as leaked.
fn the_servers_view_names_a_tcp_connection() -> Check {
    let pool = Pool::builder()
        .max_size(2)
        .min_idle(Some(2))
        .build(ExtraSockets(Plain::manager(&Plain::url())?))
        .map_err(|error| format!("build: {error}"))?;
    backend::in_child(|| {
        let mut client = pool.get().map_err(|error| format!("get: {error}"))?;
        echo_on(&mut client, "after fork", false)?;
        backend::expect_fork_stats(&pool.fork_stats(), 2, 2, 0)
    })
}

fn main() {
    let reachable = Client::connect(&Plain::url(), NoTls)
        .map(drop)
        .map_err(|error| format!("PostgreSQL at {} is unreachable: {error}", url()));
    let own: [Case; 4] = [
        (
            "bad_input_gives_the_drivers_error_in_time",
            bad_input_gives_the_drivers_error_in_time,
        ),
        (
            "unix_socket_connections_are_released",
            unix_socket_connections_are_released,
        ),
        (
            "an_empty_locator_answer_hides_the_leak",
            an_empty_locator_answer_hides_the_leak,
        ),
        (
            "the_servers_view_names_a_tcp_connection",
            the_servers_view_names_a_tcp_connection,
        ),
    ];
    let cases = backend::scenarios::<Plain>("plain::")
        .into_iter()
        .chain(backend::scenarios::<Tls>("tls::"))
        .chain(own.map(|(name, case)| (name.to_string(), case)));
    backend::run_all(
        "PostgreSQL (postgres::Client)",
        reachable,
        "set FORKSAFE_PG_URL",
        cases,
    );
}
