//! diesel `PgConnection` and `postgres::Client` (plain, as r2d2_postgres's manager with `NoTls`
//! makes it) through PgBouncer, in session and in transaction pooling mode, forked for real: the
//! scenarios every backend runs (`support/backend.rs`) and the connect window's ambiguous case,
//! once per client and mode (`diesel::session::`, `postgres::transaction::`, ...).
//!
//! PgBouncer hides the client's address from PostgreSQL, so these connections' sockets are
//! named by the connect window (the one socket that appeared while the driver connected), not
//! by the server's view. A session is a PgBouncer *client* connection: each gets a unique
//! number as its `application_name`, which PgBouncer restores on whatever server connection
//! runs the client's next transaction, and which its admin console lists (`SHOW CLIENTS`) — so
//! "gone" means PgBouncer saw the client socket close, in either mode. Both clients are watched
//! through the same admin console; only the [`Driver`] differs.
//!
//! Environment: `FORKSAFE_PGBOUNCER_URL` (default `postgres://postgres@127.0.0.1:6432`), a
//! PgBouncer with the databases `test_session` (`pool_mode=session`) and `test_transaction`
//! (`pool_mode=transaction`) and an admin console that trusts user `postgres`, as
//! `scripts/test` starts it (without TLS, so `postgres::Client` connects with `NoTls`). `psql`
//! reads the admin console. Without it the binary prints why and skips, unless `CI` is set: then
//! it fails.

#[macro_use]
mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::marker::PhantomData;
use std::net::{TcpListener, TcpStream};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use diesel::connection::{CacheSize, Connection};
use diesel::pg::PgConnection;
use diesel::r2d2::R2D2Connection;
use diesel::sql_types::Text;
use diesel::{QueryableByName, RunQueryDsl};
use forksafe_pool::{ManageConnection, Pool, PooledConnection};
use r2d2_postgres::postgres::types::Type;
use r2d2_postgres::postgres::{Client, Config, NoTls, SimpleQueryMessage};
use support::backend::{self, Backend};
use support::runner::{Check, NamedCase};

/// A PgBouncer database, one per pooling mode.
trait Mode: Send + Sync + 'static {
    const DATABASE: &'static str;
    const NAME: &'static str;
}

struct SessionPooling;
struct TransactionPooling;

impl Mode for SessionPooling {
    const DATABASE: &'static str = "test_session";
    const NAME: &'static str = "session";
}

impl Mode for TransactionPooling {
    const DATABASE: &'static str = "test_transaction";
    const NAME: &'static str = "transaction";
}

/// A client library, used as its r2d2 manager uses it, set up for transaction pooling: no
/// named prepared statements (PgBouncer 1.18 runs a client's statements on whichever server
/// connection is free and does not carry them along).
trait Driver: Send + Sync + 'static {
    type Connection: Send + 'static;
    /// The first part of its cases' names.
    const NAME: &'static str;

    fn connect(url: &str) -> Result<Self::Connection, String>;

    /// The manager's `is_valid`.
    fn ping(conn: &mut Self::Connection) -> Result<(), String>;

    /// The manager's `has_broken`.
    fn is_broken(conn: &mut Self::Connection) -> bool;

    /// Asks for `value` back and for the session's `application_name`; returns both.
    fn echo(conn: &mut Self::Connection, value: &str) -> Result<(String, String), String>;
}

/// diesel's `PgConnection`, as `diesel::r2d2::ConnectionManager` makes it, with diesel's
/// statement cache off (see `Pool`'s docs, "Behind PgBouncer").
struct Diesel;

#[derive(QueryableByName)]
struct Echo {
    #[diesel(sql_type = Text)]
    value: String,
    #[diesel(sql_type = Text)]
    session: String,
}

impl Driver for Diesel {
    type Connection = PgConnection;
    const NAME: &'static str = "diesel";

    fn connect(url: &str) -> Result<PgConnection, String> {
        let mut conn = PgConnection::establish(url).map_err(|error| error.to_string())?;
        conn.set_prepared_statement_cache_size(CacheSize::Disabled);
        Ok(conn)
    }

    fn ping(conn: &mut PgConnection) -> Result<(), String> {
        conn.ping().map_err(|error| error.to_string())
    }

    fn is_broken(conn: &mut PgConnection) -> bool {
        conn.is_broken()
    }

    fn echo(conn: &mut PgConnection, value: &str) -> Result<(String, String), String> {
        let answer: Echo = diesel::sql_query(ECHO)
            .bind::<Text, _>(value)
            .get_result(conn)
            .map_err(|error| error.to_string())?;
        Ok((answer.value, answer.session))
    }
}

/// `postgres::Client`, as r2d2_postgres's `PostgresConnectionManager<NoTls>` makes it. Its
/// queries go through `query_typed` (one unnamed parse-bind-execute): `query` would prepare a
/// named statement in one round trip and run it in another.
struct Postgres;

impl Driver for Postgres {
    type Connection = Client;
    const NAME: &'static str = "postgres";

    fn connect(url: &str) -> Result<Client, String> {
        url.parse::<Config>()
            .and_then(|config| config.connect(NoTls))
            .map_err(|error| error.to_string())
    }

    fn ping(client: &mut Client) -> Result<(), String> {
        client
            .simple_query("")
            .map(drop)
            .map_err(|error| error.to_string())
    }

    fn is_broken(client: &mut Client) -> bool {
        client.is_closed()
    }

    fn echo(client: &mut Client, value: &str) -> Result<(String, String), String> {
        let row = client
            .query_typed_one(ECHO, &[(&value, Type::TEXT)])
            .map_err(|error| error.to_string())?;
        Ok((row.get("value"), row.get("session")))
    }
}

/// The echo both drivers run: the value, and the number of the client connection as the
/// server connection that ran the query has it.
const ECHO: &str = "SELECT $1::text AS value, current_setting('application_name') AS session";

/// A connection error of [`Bounced`]: the driver's, as text.
#[derive(Debug)]
struct Failed(String);

impl fmt::Display for Failed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Failed {}

/// When a connect opens an unrelated socket of its own (standing in for another thread that
/// connects somewhere at the same time).
#[derive(Clone, Copy, PartialEq, Eq)]
enum OtherSocket {
    None,
    /// Opened inside the connect and kept: two sockets appear, neither can be named.
    Kept,
    /// Opened inside the connect and closed before it returns (as a name lookup's socket is):
    /// only the connection's socket appears.
    Closed,
}

/// A manager of `D`'s connections to mode `M`'s database, plus what this test needs: a number
/// per connection (its `application_name`) and, on cue, an unrelated socket.
struct Bounced<M: Mode, D: Driver> {
    url: String,
    other_socket: OtherSocket,
    kind: PhantomData<fn() -> (M, D)>,
}

/// Connections made by this process so far (a forked child continues its parent's count, and
/// the pid keeps the numbers apart).
static CONNECTIONS: AtomicU64 = AtomicU64::new(0);

/// The unrelated sockets, kept open for as long as the test runs.
static OTHER_SOCKETS: Mutex<Vec<TcpStream>> = Mutex::new(Vec::new());

fn base_url() -> String {
    std::env::var("FORKSAFE_PGBOUNCER_URL")
        .ok()
        .filter(|url| !url.is_empty())
        .unwrap_or_else(|| String::from("postgres://postgres@127.0.0.1:6432"))
}

/// The URL of mode `M`'s database.
fn mode_url<M: Mode>() -> String {
    format!("{}/{}", base_url(), M::DATABASE)
}

fn open_other_socket(keep: bool) -> Result<(), Failed> {
    let stream = TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| TcpStream::connect(listener.local_addr()?))
        .map_err(|error| Failed(error.to_string()))?;
    if keep {
        OTHER_SOCKETS.lock().unwrap().push(stream);
    }
    Ok(())
}

impl<M: Mode, D: Driver> ManageConnection for Bounced<M, D> {
    type Connection = D::Connection;
    type Error = Failed;

    fn connect(&self) -> Result<D::Connection, Failed> {
        let number =
            u64::from(std::process::id()) * 1_000_000 + CONNECTIONS.fetch_add(1, Ordering::Relaxed);
        let separator = if self.url.contains('?') { '&' } else { '?' };
        let url = format!("{}{separator}application_name={number}", self.url);
        let conn = D::connect(&url).map_err(Failed)?;
        match self.other_socket {
            OtherSocket::None => {}
            OtherSocket::Kept => open_other_socket(true)?,
            OtherSocket::Closed => open_other_socket(false)?,
        }
        Ok(conn)
    }

    fn is_valid(&self, conn: &mut D::Connection) -> Result<(), Failed> {
        D::ping(conn).map_err(Failed)
    }

    fn has_broken(&self, conn: &mut D::Connection) -> bool {
        D::is_broken(conn)
    }
}

impl<M: Mode, D: Driver> Backend for Bounced<M, D> {
    /// The admin console is read with `psql`; nothing to keep open.
    type Observer = ();

    fn url() -> String {
        mode_url::<M>()
    }

    fn manager(url: &str) -> Result<Self, String> {
        Ok(Bounced {
            url: url.to_string(),
            other_socket: OtherSocket::None,
            kind: PhantomData,
        })
    }

    /// The client connection's number, as the server connection that ran the query has it.
    fn echo(conn: &mut PooledConnection<Self>, value: &str) -> Result<i64, String> {
        let (answer, session) =
            D::echo(conn, value).map_err(|error| format!("query for {value:?}: {error}"))?;
        ensure!(
            answer == value,
            "asked for {value:?}, got {answer:?} (another process's answer?)"
        );
        session
            .parse()
            .map_err(|_| format!("application_name {session:?} is not ours"))
    }

    fn observer() -> Result<(), String> {
        Ok(())
    }

    /// PgBouncer's clients, by `application_name`.
    fn live_sessions(_: &mut ()) -> Result<BTreeSet<i64>, String> {
        Ok(admin_console("SHOW CLIENTS")?
            .iter()
            .filter_map(|client| client.get("application_name")?.parse().ok())
            .collect())
    }
}

/// A `SHOW` command on PgBouncer's admin console (read with `psql`): one map from column name
/// to value per row.
fn admin_console(command: &str) -> Result<Vec<BTreeMap<String, String>>, String> {
    let admin = format!("{}/pgbouncer", base_url());
    let output = Command::new("psql")
        .args([admin.as_str(), "-A", "-P", "footer=off", "-c", command])
        .output()
        .map_err(|error| format!("psql: {error}"))?;
    ensure!(
        output.status.success(),
        "psql {admin} {command}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let text = String::from_utf8_lossy(&output.stdout);
    let mut lines = text.lines();
    let columns: Vec<&str> = lines.next().unwrap_or_default().split('|').collect();
    Ok(lines
        .map(|line| {
            columns
                .iter()
                .zip(line.split('|'))
                .map(|(column, value)| (column.to_string(), value.to_string()))
                .collect()
        })
        .collect())
}

fn pool_with<M: Mode, D: Driver>(other_socket: OtherSocket) -> Result<Pool<Bounced<M, D>>, String> {
    let manager = Bounced::<M, D> {
        other_socket,
        ..Bounced::manager(&mode_url::<M>())?
    };
    Pool::builder()
        .max_size(1)
        .min_idle(Some(1))
        .build(manager)
        .map_err(|error| format!("build: {error}"))
}

/// A connect during which a second socket appeared (and stayed) cannot name its socket: the
/// child counts the inherited connection as leaked and releases nothing, still gets its own
/// connection, and the master's session lives on. The same connect with the other socket
/// closed before the connect returns names its socket, and the child releases it.
fn an_ambiguous_connect_is_left_open_and_counted<M: Mode, D: Driver>() -> Check {
    for (other_socket, leaked) in [(OtherSocket::Kept, 1), (OtherSocket::Closed, 0)] {
        let pool = pool_with::<M, D>(other_socket)?;
        let master = backend::session_ids(&pool)?;
        backend::in_child(|| {
            backend::run_requests(&pool, 10, &master)?;
            backend::expect_fork_stats(&pool.fork_stats(), 1, 1 - leaked, leaked)
        })?;
        backend::check_master_intact(&pool, &master)?;
        let live = Bounced::<M, D>::live_sessions(&mut ())?;
        ensure!(
            master.is_subset(&live),
            "the master's session {master:?} is gone from PgBouncer: {live:?}"
        );
    }
    Ok(())
}

/// In transaction pooling PgBouncer runs each of a client's round trips on whichever server
/// connection is free, so a named prepared statement made in one round trip and closed in a
/// later one can stay behind on a server connection the client no longer holds, for as long as
/// that server connection lives. What the pool asks of a new session (to name its socket) must
/// leave nothing there: after 4 threads made 100 connections at once, each answering a query,
/// no server connection of the database has a prepared statement made since the case began.
fn connects_leave_no_prepared_statements_behind<D: Driver>() -> Check {
    let began = first_column(&mut probe_client()?, "SELECT clock_timestamp()::text")?
        .pop()
        .ok_or("the server's clock gave no row")?;
    let threads: Vec<_> = (0..4)
        .map(|thread| {
            std::thread::spawn(move || -> Check {
                for round in 0..25 {
                    let pool = pool_with::<TransactionPooling, D>(OtherSocket::None)?;
                    let mut conn = pool.get().map_err(|error| format!("get: {error}"))?;
                    Bounced::echo(&mut conn, &format!("thread {thread} round {round}"))?;
                }
                Ok(())
            })
        })
        .collect();
    for thread in threads {
        thread
            .join()
            .map_err(|_| String::from("a connecting thread panicked"))??;
    }
    let left = prepared_statements_since(&began)?;
    ensure!(
        left.is_empty(),
        "{} prepared statements left on PgBouncer's server connections: {left:?}",
        left.len()
    );
    Ok(())
}

/// A plain `postgres::Client` of the transaction-pooling database, outside any pool.
fn probe_client() -> Result<Client, String> {
    Client::connect(&mode_url::<TransactionPooling>(), NoTls)
        .map_err(|error| format!("probe: {error}"))
}

/// The first column of every row of `query`, run as a simple query (one round trip, no
/// prepared statement).
fn first_column(client: &mut Client, query: &str) -> Result<Vec<String>, String> {
    let messages = client
        .simple_query(query)
        .map_err(|error| format!("{query}: {error}"))?;
    Ok(messages
        .iter()
        .filter_map(|message| match message {
            SimpleQueryMessage::Row(row) => Some(row.get(0).unwrap_or("NULL").to_string()),
            _ => None,
        })
        .collect())
}

/// The prepared statements (`name: statement`) made since `began` (a server timestamp) on any
/// server connection of the transaction-pooling database: as many probes as PgBouncer may open
/// server connections for it each hold one in a transaction of its own, so together they hold
/// every one.
fn prepared_statements_since(began: &str) -> Result<Vec<String>, String> {
    let database = admin_console("SHOW DATABASES")?
        .into_iter()
        .find(|database| {
            database.get("name").map(String::as_str) == Some(TransactionPooling::DATABASE)
        })
        .ok_or("PgBouncer lists no transaction-pooling database")?;
    let size = |column: &str| -> Result<usize, String> {
        database
            .get(column)
            .and_then(|value| value.parse().ok())
            .ok_or(format!("SHOW DATABASES has no {column}: {database:?}"))
    };
    let servers = size("pool_size")? + size("reserve_pool")?;
    let mut probes = (0..servers)
        .map(|_| probe_client())
        .collect::<Result<Vec<_>, _>>()?;
    let mut held = BTreeSet::new();
    for probe in &mut probes {
        first_column(probe, "BEGIN")?;
        held.extend(first_column(probe, "SELECT pg_backend_pid()")?);
    }
    ensure!(
        held.len() == servers,
        "{servers} probes hold {} server connections: {held:?}",
        held.len()
    );
    let mut statements = Vec::new();
    for probe in &mut probes {
        statements.extend(first_column(
            probe,
            &format!(
                "SELECT name || ': ' || statement FROM pg_prepared_statements \
                 WHERE prepare_time >= '{began}'::timestamptz"
            ),
        )?);
        first_column(probe, "COMMIT")?;
    }
    Ok(statements)
}

/// Why `Pool`'s docs tell diesel users to turn the statement cache off for transaction pooling:
/// two clients take turns running one cacheable query. With the cache on, each prepares
/// `__diesel_stmt_0` on whichever server connection PgBouncer lends it, and the name collides
/// or is missing; with it off, every query succeeds.
fn transaction_pooling_needs_the_statement_cache_off() -> Check {
    use diesel::{IntoSql, QueryResult};
    let url = mode_url::<TransactionPooling>();
    let run = |cache: CacheSize| -> Result<Vec<String>, String> {
        let mut clients = (0..2)
            .map(|_| PgConnection::establish(&url))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|error| format!("connect: {error}"))?;
        let mut errors = Vec::new();
        for client in &mut clients {
            client.set_prepared_statement_cache_size(cache);
        }
        for round in 0..10 {
            for client in &mut clients {
                let answer: QueryResult<i32> =
                    diesel::select(round.into_sql::<diesel::sql_types::Integer>())
                        .get_result(client);
                match answer {
                    Ok(answer) if answer == round => {}
                    Ok(answer) => return Err(format!("asked for {round}, got {answer}")),
                    Err(error) => errors.push(error.to_string()),
                }
            }
        }
        Ok(errors)
    };
    let with_cache = run(CacheSize::Unbounded)?;
    ensure!(
        with_cache
            .iter()
            .any(|error| error.contains("prepared statement")),
        "with diesel's statement cache on, transaction pooling gave no prepared-statement error: {with_cache:?}"
    );
    let without_cache = run(CacheSize::Disabled)?;
    ensure!(
        without_cache.is_empty(),
        "with the cache off: {without_cache:?}"
    );
    Ok(())
}

/// The shared scenarios and this file's own, for one client and pooling mode.
fn cases<M: Mode, D: Driver>() -> Vec<NamedCase> {
    let prefix = format!("{}::{}::", D::NAME, M::NAME);
    let own: NamedCase = (
        format!("{prefix}an_ambiguous_connect_is_left_open_and_counted"),
        an_ambiguous_connect_is_left_open_and_counted::<M, D>,
    );
    let mut cases = backend::scenarios::<Bounced<M, D>>(&prefix);
    cases.push(own);
    cases
}

fn main() {
    let url = mode_url::<TransactionPooling>();
    let reachable = admin_console("SHOW CLIENTS").and_then(|_| {
        PgConnection::establish(&url)
            .map(drop)
            .map_err(|error| format!("PgBouncer at {url} is unreachable: {error}"))
    });
    let statement_cache: NamedCase = (
        String::from("diesel::transaction::pooling_needs_the_statement_cache_off"),
        transaction_pooling_needs_the_statement_cache_off,
    );
    let no_statements_left: [NamedCase; 2] = [
        (
            String::from("diesel::transaction::connects_leave_no_prepared_statements_behind"),
            connects_leave_no_prepared_statements_behind::<Diesel>,
        ),
        (
            String::from("postgres::transaction::connects_leave_no_prepared_statements_behind"),
            connects_leave_no_prepared_statements_behind::<Postgres>,
        ),
    ];
    backend::run_all(
        "PgBouncer",
        reachable,
        "run scripts/test, which starts it, or set FORKSAFE_PGBOUNCER_URL",
        cases::<SessionPooling, Diesel>()
            .into_iter()
            .chain(cases::<TransactionPooling, Diesel>())
            .chain([statement_cache])
            .chain(cases::<SessionPooling, Postgres>())
            .chain(cases::<TransactionPooling, Postgres>())
            .chain(no_statements_left),
    );
}
