//! `async_echo`: a Python extension module that builds a tokio runtime and an async PostgreSQL
//! pool (deadpool-postgres) at import, and whose functions `block_on` queries through them.
//!
//! A uWSGI master (default, eager mode), a `gunicorn --preload` master or a Celery prefork
//! master imports the app, and with it this module, then forks its workers: every worker
//! inherits the runtime, the pool and the connection the master opened. A tokio runtime does
//! not survive `fork()`: the child has none of its threads, so with a plain
//! `tokio::runtime::Runtime` and `deadpool_postgres::Pool` nothing ever drives the inherited
//! connection's I/O or the timers, and a worker's first query waits for ever (its timeout is a
//! timer of the same dead runtime). With `forksafe_pool::Runtime` and
//! `forksafe_pool::deadpool_postgres::Pool` each worker builds its own runtime and its own pool
//! on first use and leaves the inherited ones alone. Nothing else changes: no `--lazy-apps`, no
//! post-fork hook.
//!
//! `ASYNC_ECHO_POOL=naive` picks the plain tokio runtime and deadpool pool (to show the
//! failure), `forksafe` or unset the fork-safe pair; `DATABASE_URL` names the database
//! (PostgreSQL on loopback by default; its `sslmode` decides TLS: `disable`, `prefer` or
//! `require`, certificates not verified). Both are read once, at import.

use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

use openssl::ssl::{SslConnector, SslMethod, SslVerifyMode};
use postgres_openssl::MakeTlsConnector;
use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;

/// Enough for one worker serving four threads.
const POOL_SIZE: usize = 4;
/// How long `echo` may take, checkout and query together, before it raises. Waiting on the
/// runtime's own timer: a runtime whose threads are gone never fires it.
const ECHO_TIMEOUT: Duration = Duration::from_secs(5);
/// deadpool's own bounds on waiting for a free object and on opening a connection.
const POOL_TIMEOUT: Duration = Duration::from_secs(5);
const DEFAULT_DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/test";

/// The session's answer: the token, the server process that answered and whether its session
/// uses TLS.
const ECHO_SQL: &str = "SELECT $1::text, pg_backend_pid(), \
     coalesce((SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()), false)";

struct Echo {
    token: String,
    backend_pid: i32,
    tls: bool,
}

/// The module's runtime and pool, built at import. Both variants run the same code
/// (`echo_on!`); only the two types differ.
enum Runtimes {
    Naive {
        runtime: tokio::runtime::Runtime,
        pool: deadpool_postgres::Pool,
    },
    ForkSafe {
        runtime: forksafe_pool::Runtime,
        pool: forksafe_pool::deadpool_postgres::Pool,
    },
}

static RUNTIMES: OnceLock<Runtimes> = OnceLock::new();
/// The PostgreSQL session of the query run at import: in a forked worker, the master's.
static IMPORT_BACKEND_PID: AtomicI32 = AtomicI32::new(0);

/// Checks a connection out of `$pool` and echoes `$token` through it, on `$runtime`, within
/// `ECHO_TIMEOUT`.
macro_rules! echo_on {
    ($runtime:expr, $pool:expr, $token:expr) => {
        $runtime.block_on(async {
            let echo = async {
                let client = $pool
                    .get()
                    .await
                    .map_err(|error| format!("checkout: {error}"))?;
                let row = client
                    .query_one(ECHO_SQL, &[&$token])
                    .await
                    .map_err(|error| format!("query: {error}"))?;
                Ok::<_, String>(Echo {
                    token: row.get(0),
                    backend_pid: row.get(1),
                    tls: row.get(2),
                })
            };
            tokio::time::timeout(ECHO_TIMEOUT, echo)
                .await
                .map_err(|_| format!("no answer within {ECHO_TIMEOUT:?}"))?
        })
    };
}

/// TLS as `sslmode` asks (tokio-postgres reads it from the URL), without certificate checks:
/// the test server's certificate is Debian's self-signed one.
fn tls_connector() -> Result<MakeTlsConnector, String> {
    let mut builder = SslConnector::builder(SslMethod::tls())
        .map_err(|error| format!("building the TLS connector: {error}"))?;
    builder.set_verify(SslVerifyMode::NONE);
    Ok(MakeTlsConnector::new(builder.build()))
}

impl Runtimes {
    fn from_env() -> Result<Runtimes, String> {
        let database_url =
            std::env::var("DATABASE_URL").unwrap_or_else(|_| DEFAULT_DATABASE_URL.to_owned());
        let config: tokio_postgres::Config = database_url
            .parse()
            .map_err(|error| format!("DATABASE_URL: {error}"))?;
        let tls = tls_connector()?;
        match std::env::var("ASYNC_ECHO_POOL").as_deref() {
            Ok("naive") => {
                let runtime = tokio::runtime::Builder::new_multi_thread()
                    .enable_all()
                    .build()
                    .map_err(|error| format!("building the runtime: {error}"))?;
                let manager = deadpool_postgres::Manager::new(config, tls);
                let pool = deadpool_postgres::Pool::builder(manager)
                    .runtime(deadpool_postgres::Runtime::Tokio1)
                    .max_size(POOL_SIZE)
                    .wait_timeout(Some(POOL_TIMEOUT))
                    .create_timeout(Some(POOL_TIMEOUT))
                    .build()
                    .map_err(|error| format!("building the pool: {error}"))?;
                Ok(Runtimes::Naive { runtime, pool })
            }
            Ok("forksafe") | Err(_) => {
                let runtime = forksafe_pool::Runtime::new()
                    .map_err(|error| format!("building the runtime: {error}"))?;
                let pool = forksafe_pool::deadpool_postgres::Pool::builder(config, tls)
                    .max_size(POOL_SIZE)
                    .wait_timeout(Some(POOL_TIMEOUT))
                    .create_timeout(Some(POOL_TIMEOUT))
                    .build()
                    .map_err(|error| format!("building the pool: {error}"))?;
                Ok(Runtimes::ForkSafe { runtime, pool })
            }
            other => Err(format!(
                "ASYNC_ECHO_POOL={other:?}: expected naive or forksafe"
            )),
        }
    }

    fn kind(&self) -> &'static str {
        match self {
            Runtimes::Naive { .. } => "naive",
            Runtimes::ForkSafe { .. } => "forksafe",
        }
    }

    fn echo(&self, token: &str) -> Result<Echo, String> {
        match self {
            Runtimes::Naive { runtime, pool } => echo_on!(runtime, pool, token),
            Runtimes::ForkSafe { runtime, pool } => echo_on!(runtime, pool, token),
        }
    }
}

fn runtimes() -> PyResult<&'static Runtimes> {
    RUNTIMES
        .get()
        .ok_or_else(|| PyRuntimeError::new_err("async_echo: the pool was not built"))
}

/// Sends `token` through a pooled connection and returns what the database sent back, with
/// the PostgreSQL backend's pid and whether its session uses TLS: `(token, backend_pid, tls)`.
/// Raises `RuntimeError` on a failed checkout or query, or after 5 s without an answer. The
/// GIL is released meanwhile, so a threaded worker's other threads run.
#[pyfunction]
fn echo(py: Python<'_>, token: String) -> PyResult<(String, i32, bool)> {
    let runtimes = runtimes()?;
    let answer = py
        .detach(|| runtimes.echo(&token))
        .map_err(PyRuntimeError::new_err)?;
    Ok((answer.token, answer.backend_pid, answer.tls))
}

/// The PostgreSQL backend pid of the session the import-time query ran on. In a worker forked
/// after the import it is the master's session, which the worker must never use.
#[pyfunction]
fn import_backend_pid() -> i32 {
    IMPORT_BACKEND_PID.load(Ordering::Relaxed)
}

/// `"forksafe"` or `"naive"`: the runtime and pool types chosen at import.
#[pyfunction]
fn pool_kind() -> PyResult<&'static str> {
    Ok(runtimes()?.kind())
}

/// Builds the runtime and the pool and runs one query on them, as an app that reads its
/// configuration from the database at import does: the importing process has a running
/// runtime and an open connection when it forks.
#[pymodule]
fn async_echo(module: &Bound<'_, PyModule>) -> PyResult<()> {
    if RUNTIMES.get().is_none() {
        let built = Runtimes::from_env().map_err(PyRuntimeError::new_err)?;
        // A module is initialised once per process; should two imports race, one set wins.
        let _ = RUNTIMES.set(built);
    }
    let py = module.py();
    let runtimes = runtimes()?;
    let imported = py
        .detach(|| runtimes.echo("import"))
        .map_err(PyRuntimeError::new_err)?;
    IMPORT_BACKEND_PID.store(imported.backend_pid, Ordering::Relaxed);
    module.add_function(wrap_pyfunction!(echo, module)?)?;
    module.add_function(wrap_pyfunction!(import_backend_pid, module)?)?;
    module.add_function(wrap_pyfunction!(pool_kind, module)?)?;
    Ok(())
}
