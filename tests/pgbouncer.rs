//! diesel `PgConnection` through PgBouncer, in session and in transaction pooling mode, forked
//! for real: the scenarios every backend runs (`support/backend.rs`), once per mode, and the
//! connect window's ambiguous case.
//!
//! PgBouncer hides the client's address from PostgreSQL, so these connections' sockets are
//! named by the connect window (the one socket that appeared while libpq connected), not by the
//! server's view. A session is a PgBouncer *client* connection: each gets a unique number as
//! its `application_name`, which PgBouncer restores on whatever server connection runs the
//! client's next transaction, and which its admin console lists (`SHOW CLIENTS`) — so "gone"
//! means PgBouncer saw the client socket close, in either mode.
//!
//! Environment: `FORKSAFE_PGBOUNCER_URL` (default `postgres://postgres@127.0.0.1:6432`), a
//! PgBouncer with the databases `test_session` (`pool_mode=session`) and `test_transaction`
//! (`pool_mode=transaction`) and an admin console that trusts user `postgres`, as
//! `scripts/test` starts it. `psql` reads the admin console. Without it the binary prints why
//! and skips, unless `CI` is set: then it fails.

#[macro_use]
mod support;

use std::collections::BTreeSet;
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
use support::backend::{self, Backend};
use support::fork::spawn_child;
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

/// diesel's `PgConnection` as `diesel::r2d2::ConnectionManager` makes it, plus what this test
/// needs: a number per connection (its `application_name`) and diesel's statement cache off,
/// as transaction pooling requires (see `backends::postgres` in the crate).
struct Bounced<M: Mode> {
    url: String,
    other_socket: OtherSocket,
    mode: PhantomData<M>,
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

fn open_other_socket(keep: bool) -> Result<(), diesel::r2d2::Error> {
    let listener = TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| TcpStream::connect(listener.local_addr()?));
    let stream = listener.map_err(|error| {
        diesel::r2d2::Error::ConnectionError(diesel::ConnectionError::BadConnection(
            error.to_string(),
        ))
    })?;
    if keep {
        OTHER_SOCKETS.lock().unwrap().push(stream);
    }
    Ok(())
}

impl<M: Mode> ManageConnection for Bounced<M> {
    type Connection = PgConnection;
    type Error = diesel::r2d2::Error;

    fn connect(&self) -> Result<PgConnection, Self::Error> {
        let number =
            u64::from(std::process::id()) * 1_000_000 + CONNECTIONS.fetch_add(1, Ordering::Relaxed);
        let separator = if self.url.contains('?') { '&' } else { '?' };
        let url = format!("{}{separator}application_name={number}", self.url);
        let mut conn =
            PgConnection::establish(&url).map_err(diesel::r2d2::Error::ConnectionError)?;
        match self.other_socket {
            OtherSocket::None => {}
            OtherSocket::Kept => open_other_socket(true)?,
            OtherSocket::Closed => open_other_socket(false)?,
        }
        conn.set_prepared_statement_cache_size(CacheSize::Disabled);
        Ok(conn)
    }

    fn is_valid(&self, conn: &mut PgConnection) -> Result<(), Self::Error> {
        conn.ping().map_err(diesel::r2d2::Error::QueryError)
    }

    fn has_broken(&self, conn: &mut PgConnection) -> bool {
        conn.is_broken()
    }
}

#[derive(QueryableByName)]
struct Echo {
    #[diesel(sql_type = Text)]
    value: String,
    #[diesel(sql_type = Text)]
    session: String,
}

impl<M: Mode> Backend for Bounced<M> {
    /// The admin console is read with `psql`; nothing to keep open.
    type Observer = ();

    fn url() -> String {
        format!("{}/{}", base_url(), M::DATABASE)
    }

    fn manager(url: &str) -> Result<Self, String> {
        Ok(Bounced {
            url: url.to_string(),
            other_socket: OtherSocket::None,
            mode: PhantomData,
        })
    }

    /// The client connection's number, as the server connection that ran the query has it.
    fn echo(conn: &mut PooledConnection<Self>, value: &str) -> Result<i64, String> {
        let answer: Echo = diesel::sql_query(
            "SELECT $1::text AS value, current_setting('application_name') AS session",
        )
        .bind::<Text, _>(value)
        .get_result(conn)
        .map_err(|error| format!("query for {value:?}: {error}"))?;
        ensure!(
            answer.value == value,
            "asked for {value:?}, got {:?} (another process's answer?)",
            answer.value
        );
        answer
            .session
            .parse()
            .map_err(|_| format!("application_name {:?} is not ours", answer.session))
    }

    fn observer() -> Result<(), String> {
        Ok(())
    }

    /// PgBouncer's clients, by `application_name`.
    fn live_sessions(_: &mut ()) -> Result<BTreeSet<i64>, String> {
        Ok(show_clients()?
            .iter()
            .filter_map(|client| client.rsplit('|').next()?.parse().ok())
            .collect())
    }
}

/// `SHOW CLIENTS` on PgBouncer's admin console, one `|`-separated line per client.
fn show_clients() -> Result<Vec<String>, String> {
    let admin = format!("{}/pgbouncer", base_url());
    let output = Command::new("psql")
        .args([admin.as_str(), "-Atc", "SHOW CLIENTS"])
        .output()
        .map_err(|error| format!("psql: {error}"))?;
    ensure!(
        output.status.success(),
        "psql {admin} SHOW CLIENTS: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(str::to_string)
        .collect())
}

fn pool_with<M: Mode>(other_socket: OtherSocket) -> Result<Pool<Bounced<M>>, String> {
    let manager = Bounced::<M> {
        other_socket,
        ..Bounced::manager(&Bounced::<M>::url())?
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
fn an_ambiguous_connect_is_left_open_and_counted<M: Mode>() -> Check {
    for (other_socket, leaked) in [(OtherSocket::Kept, 1), (OtherSocket::Closed, 0)] {
        let pool = pool_with::<M>(other_socket)?;
        let master = backend::session_ids(&pool)?;
        let (report, child_report) = backend::datagram_pair()?;
        let pid = spawn_child(|| {
            backend::child_case(&child_report, || {
                backend::run_requests(&pool, 10, &master)?;
                let stats = pool.fork_stats();
                ensure!(
                    stats.connections_discarded == 1
                        && stats.connections_leaked == leaked
                        && stats.sockets_released == 1 - leaked,
                    "expected 1 connection discarded, {leaked} leaked: {stats:?}"
                );
                Ok(())
            })
        });
        backend::expect_child_exit("child", pid, &report)?;
        backend::check_master_intact(&pool, &master)?;
        let live = Bounced::<M>::live_sessions(&mut ())?;
        ensure!(
            master.is_subset(&live),
            "the master's session {master:?} is gone from PgBouncer: {live:?}"
        );
    }
    Ok(())
}

/// Why `Pool`'s docs tell diesel users to turn the statement cache off for transaction pooling:
/// two clients take turns running one cacheable query. With the cache on, each prepares
/// `__diesel_stmt_0` on whichever server connection PgBouncer lends it, and the name collides
/// or is missing; with it off, every query succeeds.
fn transaction_pooling_needs_the_statement_cache_off() -> Check {
    use diesel::{IntoSql, QueryResult};
    let url = Bounced::<TransactionPooling>::url();
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

/// The shared scenarios and this file's own, for one pooling mode.
fn cases<M: Mode>() -> Vec<NamedCase> {
    let prefix = format!("{}::", M::NAME);
    let own: NamedCase = (
        format!("{prefix}an_ambiguous_connect_is_left_open_and_counted"),
        an_ambiguous_connect_is_left_open_and_counted::<M>,
    );
    let mut cases = backend::scenarios::<Bounced<M>>(&prefix);
    cases.push(own);
    cases
}

fn main() {
    let reachable = show_clients().and_then(|_| {
        PgConnection::establish(&Bounced::<TransactionPooling>::url())
            .map(drop)
            .map_err(|error| {
                format!(
                    "PgBouncer at {} is unreachable: {error}",
                    Bounced::<TransactionPooling>::url()
                )
            })
    });
    let statement_cache: NamedCase = (
        String::from("transaction::pooling_needs_the_statement_cache_off"),
        transaction_pooling_needs_the_statement_cache_off,
    );
    backend::run_all(
        "PgBouncer",
        reachable,
        "run scripts/test, which starts it, or set FORKSAFE_PGBOUNCER_URL",
        cases::<SessionPooling>()
            .into_iter()
            .chain(cases::<TransactionPooling>())
            .chain([statement_cache]),
    );
}
