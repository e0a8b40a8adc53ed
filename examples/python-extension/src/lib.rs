//! `pooled_echo`: a Python extension module whose connection pool is a module global, built
//! and used while the module is imported.
//!
//! A uWSGI master (default, eager mode) or a `gunicorn --preload` master imports the WSGI app,
//! and with it this module, then forks its workers: every worker inherits the pool and the
//! connections the master opened. With `r2d2::Pool` the workers then talk on the master's
//! sockets and wait for r2d2 threads that do not exist in them; with `forksafe_pool::Pool` each
//! worker opens its own connections on first use and leaves the inherited ones alone. Nothing
//! else changes: no `--lazy-apps`, no post-fork hook.
//!
//! `POOLED_ECHO_POOL=r2d2` picks `r2d2::Pool` (to show the failure), anything else or unset
//! `forksafe_pool::Pool`; `DATABASE_URL` names the database (PostgreSQL on loopback by
//! default). Both are read once, at import.

use std::sync::OnceLock;
use std::time::Duration;

use diesel::pg::PgConnection;
use diesel::r2d2::ConnectionManager;
use diesel::sql_types::{Bool, Integer, Text};
use diesel::{QueryableByName, RunQueryDsl};
use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;

type Manager = ConnectionManager<PgConnection>;

/// Enough for one worker serving four threads.
const POOL_SIZE: u32 = 4;
/// How long `echo` waits for a connection before it raises: a worker stuck behind a pool
/// that can no longer open connections answers with r2d2's "timed out waiting for
/// connection" instead of hanging its request.
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(5);
const DEFAULT_DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/test";

/// The module's pool, built at import. The same settings and the same code serve both pool
/// types: `forksafe_pool::Pool` has r2d2's API.
enum AnyPool {
    ForkSafe(forksafe_pool::Pool<Manager>),
    R2d2(r2d2::Pool<Manager>),
}

static POOL: OnceLock<AnyPool> = OnceLock::new();

macro_rules! build_pool {
    ($pool:ty, $database_url:expr) => {
        <$pool>::builder()
            .max_size(POOL_SIZE)
            .connection_timeout(CONNECTION_TIMEOUT)
            .build(ConnectionManager::new($database_url))
    };
}

impl AnyPool {
    fn from_env() -> Result<AnyPool, String> {
        let database_url =
            std::env::var("DATABASE_URL").unwrap_or_else(|_| DEFAULT_DATABASE_URL.to_owned());
        let built = match std::env::var("POOLED_ECHO_POOL").as_deref() {
            Ok("r2d2") => build_pool!(r2d2::Pool<Manager>, database_url).map(AnyPool::R2d2),
            _ => build_pool!(forksafe_pool::Pool<Manager>, database_url).map(AnyPool::ForkSafe),
        };
        built.map_err(|error| format!("building the pool: {error}"))
    }

    fn kind(&self) -> &'static str {
        match self {
            AnyPool::ForkSafe(_) => "forksafe",
            AnyPool::R2d2(_) => "r2d2",
        }
    }

    fn echo(&self, token: &str) -> Result<Echo, String> {
        let checked_out = match self {
            AnyPool::ForkSafe(pool) => pool.get().map(|mut conn| query_echo(&mut conn, token)),
            AnyPool::R2d2(pool) => pool.get().map(|mut conn| query_echo(&mut conn, token)),
        };
        checked_out
            .map_err(|error| format!("checkout: {error}"))?
            .map_err(|error| format!("query: {error}"))
    }
}

/// The database's answer: the token it was sent, the server process that answered and
/// whether that session runs over TLS.
#[derive(QueryableByName)]
struct Echo {
    #[diesel(sql_type = Text)]
    token: String,
    #[diesel(sql_type = Integer)]
    backend_pid: i32,
    #[diesel(sql_type = Bool)]
    tls: bool,
}

fn query_echo(conn: &mut PgConnection, token: &str) -> diesel::QueryResult<Echo> {
    diesel::sql_query(
        "SELECT $1 AS token, pg_backend_pid() AS backend_pid, \
         coalesce((SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()), false) AS tls",
    )
    .bind::<Text, _>(token)
    .get_result(conn)
}

fn pool() -> PyResult<&'static AnyPool> {
    POOL.get()
        .ok_or_else(|| PyRuntimeError::new_err("pooled_echo: the pool was not built"))
}

/// Sends `token` through a pooled connection and returns what the database sent back, with
/// the PostgreSQL backend's pid and whether its session uses TLS: `(token, backend_pid, tls)`.
/// Raises `RuntimeError` on a failed
/// checkout or query. The GIL is released meanwhile, so a threaded worker's other threads run.
#[pyfunction]
fn echo(py: Python<'_>, token: String) -> PyResult<(String, i32, bool)> {
    let pool = pool()?;
    let answer = py
        .detach(|| pool.echo(&token))
        .map_err(PyRuntimeError::new_err)?;
    Ok((answer.token, answer.backend_pid, answer.tls))
}

/// `"forksafe"` or `"r2d2"`: the pool type chosen at import.
#[pyfunction]
fn pool_kind() -> PyResult<&'static str> {
    Ok(pool()?.kind())
}

/// Builds the pool and runs one query on it, as an app that reads its configuration from
/// the database at import does: the importing process holds open connections when it forks.
#[pymodule]
fn pooled_echo(module: &Bound<'_, PyModule>) -> PyResult<()> {
    if POOL.get().is_none() {
        let built = AnyPool::from_env().map_err(PyRuntimeError::new_err)?;
        // A module is initialised once per process; should two imports race, one pool wins.
        let _ = POOL.set(built);
    }
    pool()?.echo("import").map_err(PyRuntimeError::new_err)?;
    module.add_function(wrap_pyfunction!(echo, module)?)?;
    module.add_function(wrap_pyfunction!(pool_kind, module)?)?;
    Ok(())
}
