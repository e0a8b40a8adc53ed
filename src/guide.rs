//! Guides: async servers, Python extensions, and what clones of a pool share across `fork()`.
//!
//! This module has no items; its examples run as tests wherever their dependencies are this
//! crate's own (those that need tokio, axum, actix-web or PyO3 are shown uncompiled, each with
//! a runnable analogue on std).
//!
//! # Async servers: axum, actix-web
//!
//! A pre-forking async server has three rules:
//!
//! 1. **The pool before the fork.** The master builds the pool (and the rest of the
//!    application's state) and binds the listening socket, then forks the workers. Each worker's
//!    first `get()` builds its own pool.
//! 2. **A runtime of each worker's own.** A tokio runtime must never cross `fork()`
//!    (tokio#4301): its worker threads do not exist in the child, and its I/O driver's epoll
//!    instance is shared with the parent, so the child's registrations change the parent's
//!    interest list. Either each worker builds its runtime (actix-web's `System`) after the
//!    fork, or the master keeps a `forksafe_pool::Runtime` (feature `tokio`), which gives each
//!    forked process a runtime of its own on first use and never touches the inherited one.
//! 3. **`get` on a blocking thread.** The pool is synchronous: `get` waits up to
//!    `connection_timeout` for a connection, and a query blocks on the socket. Run both inside
//!    `tokio::task::spawn_blocking` (actix-web: `web::block`), never on a runtime worker thread.
//!
//! [`Pool`](crate::Pool) is `Send + Sync + Clone` and `'static`, so it goes straight into axum's
//! `State` or actix-web's `web::Data`. With axum (tokio and axum are not dependencies of this
//! crate, so this block is not compiled):
//!
//! ```ignore
//! use axum::{extract::State, http::StatusCode, routing::get, Router};
//! use diesel::prelude::*;
//! use diesel::r2d2::ConnectionManager;
//!
//! type DbPool = forksafe_pool::Pool<ConnectionManager<PgConnection>>;
//!
//! async fn answer(State(pool): State<DbPool>) -> Result<String, StatusCode> {
//!     tokio::task::spawn_blocking(move || {
//!         let mut conn = pool.get().map_err(|_| StatusCode::SERVICE_UNAVAILABLE)?;
//!         diesel::select(42.into_sql::<diesel::sql_types::Integer>())
//!             .get_result::<i32>(&mut conn)
//!             .map(|n| n.to_string())
//!             .map_err(|_| StatusCode::INTERNAL_SERVER_ERROR)
//!     })
//!     .await
//!     .map_err(|_| StatusCode::INTERNAL_SERVER_ERROR)?
//! }
//!
//! // In the master: the pool and the listener, then the forks.
//! let pool: DbPool = forksafe_pool::Pool::builder().build(ConnectionManager::new(url))?;
//! let listener = std::net::TcpListener::bind("0.0.0.0:8080")?;
//! listener.set_nonblocking(true)?;
//! // ... fork the workers; in each worker, after the fork:
//! let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
//! runtime.block_on(async move {
//!     let app = Router::new().route("/", get(answer)).with_state(pool);
//!     axum::serve(tokio::net::TcpListener::from_std(listener)?, app).await
//! })?;
//! ```
//!
//! With the `deadpool-postgres` or `bb8-postgres` feature there is no blocking at all: the
//! async pools `forksafe_pool::deadpool_postgres::Pool` and `forksafe_pool::bb8_postgres::Pool`
//! are built in the master beside a `forksafe_pool::Runtime`, and a handler awaits
//! `pool.get()` as with deadpool or bb8 (see the crate docs' "Async" section).
//!
//! With actix-web the worker runs `actix_web::rt::System::new().block_on(..)` after the fork,
//! hands the pool to `App::new().app_data(web::Data::new(pool.clone()))`, serves the inherited
//! listener with `HttpServer::new(..).workers(1).listen(listener)?`, and its handlers check
//! out inside `web::block(move || { let mut conn = pool.get()?; .. })`.
//!
//! The same shape on std threads, runnable: the master builds and warms the pool, forks; the
//! worker starts its threads (the "runtime") only after the fork, and each handler checks out
//! on its own thread.
//!
//! ```
//! # #[cfg(feature = "diesel-sqlite")]
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use diesel::prelude::*;
//! use diesel::r2d2::ConnectionManager;
//! use forksafe_pool::Pool;
//! use nix::sys::wait::{waitpid, WaitStatus};
//! use nix::unistd::{fork, ForkResult};
//!
//! type DbPool = Pool<ConnectionManager<SqliteConnection>>;
//!
//! /// A request handler: runs on a thread that may block (`spawn_blocking`'s, in tokio).
//! fn answer(pool: &DbPool, n: i32) -> Result<i32, Box<dyn std::error::Error + Send + Sync>> {
//!     let mut conn = pool.get()?;
//!     Ok(diesel::select(n.into_sql::<diesel::sql_types::Integer>()).get_result(&mut conn)?)
//! }
//!
//! // The master: the pool before the fork, warmed; no runtime, no threads of its own.
//! let pool: DbPool = Pool::builder().max_size(2).build(ConnectionManager::new(":memory:"))?;
//! assert_eq!(answer(&pool, 1).map_err(|e| e.to_string())?, 1);
//!
//! // SAFETY (for the example): the child starts threads only after the fork, uses the pool,
//! // and leaves with `_exit`.
//! match unsafe { fork() }? {
//!     ForkResult::Child => {
//! #       // A deadline: a hung child dies of SIGALRM, so the test fails instead of hanging.
//! #       unsafe { libc::alarm(20) };
//!         // The worker's "runtime", started after the fork: four handlers at once.
//!         let handlers: Vec<_> = (0..4)
//!             .map(|n| {
//!                 let pool = pool.clone();
//!                 std::thread::spawn(move || answer(&pool, n).ok() == Some(n))
//!             })
//!             .collect();
//!         let all_answered = handlers.into_iter().all(|h| h.join().unwrap_or(false));
//!         let own_pool = pool.fork_stats().forks_crossed == 1;
//!         unsafe { libc::_exit(if all_answered && own_pool { 0 } else { 1 }) };
//!     }
//!     ForkResult::Parent { child } => {
//!         assert_eq!(waitpid(child, None)?, WaitStatus::Exited(child, 0));
//!         assert_eq!(answer(&pool, 2).map_err(|e| e.to_string())?, 2, "the master's pool works");
//!     }
//! }
//! # Ok(())
//! # }
//! # #[cfg(not(feature = "diesel-sqlite"))]
//! # fn main() {}
//! ```
//!
//! # Python extensions (PyO3): `build_unchecked` at import
//!
//! A uWSGI master (its default mode) and `gunicorn --preload` import the application, and with
//! it the extension module, before they fork the workers; a pool that is a module global built
//! at import is then inherited by every worker, which is what this crate makes safe. Build it
//! with [`Builder::build_unchecked`](crate::Builder::build_unchecked), not `build`: `build`
//! waits for `min_idle` connections, so with the database down (or slow) it blocks the import
//! for `connection_timeout` and then fails it, and the server does not start. With
//! `build_unchecked` the import succeeds at once; each worker's first `get` connects (or
//! returns the connect error) when a request needs the database. (PyO3 is not a dependency of
//! this crate, so this block is not compiled; `examples/python-extension` is a complete
//! module.)
//!
//! ```ignore
//! static POOL: OnceLock<forksafe_pool::Pool<ConnectionManager<PgConnection>>> = OnceLock::new();
//!
//! #[pymodule]
//! fn app_db(module: &Bound<'_, PyModule>) -> PyResult<()> {
//!     let manager = ConnectionManager::new(std::env::var("DATABASE_URL").unwrap_or_default());
//!     // Returns at once, database up or not: the import never waits for a connection.
//!     let _ = POOL.set(forksafe_pool::Pool::builder().max_size(4).build_unchecked(manager));
//!     module.add_function(wrap_pyfunction!(query, module)?)
//! }
//!
//! #[pyfunction]
//! fn query(py: Python<'_>) -> PyResult<i32> {
//!     // The GIL released while waiting for a connection and for the database.
//!     py.detach(|| {
//!         let mut conn = POOL.get().expect("built at import").get().map_err(to_py_err)?;
//!         diesel::select(42.into_sql::<Integer>()).get_result(&mut conn).map_err(to_py_err)
//!     })
//! }
//! ```
//!
//! What the two builds do with the database down, runnable (a manager whose every connect is
//! refused stands in for it):
//!
//! ```
//! use forksafe_pool::{ErrorExt, ErrorKind, ManageConnection, Pool};
//! use std::time::{Duration, Instant};
//!
//! #[derive(Debug)]
//! struct DatabaseDown;
//!
//! impl ManageConnection for DatabaseDown {
//!     type Connection = ();
//!     type Error = std::io::Error;
//!     fn connect(&self) -> std::io::Result<()> {
//!         Err(std::io::Error::other("connection refused"))
//!     }
//!     fn is_valid(&self, _: &mut ()) -> std::io::Result<()> {
//!         Ok(())
//!     }
//!     fn has_broken(&self, _: &mut ()) -> bool {
//!         false
//!     }
//! }
//!
//! let timeout = Duration::from_millis(300);
//! let builder = || Pool::builder().max_size(4).connection_timeout(timeout);
//!
//! // `build`: the import would wait the whole `connection_timeout`, then fail.
//! let started = Instant::now();
//! assert!(builder().build(DatabaseDown).is_err());
//! assert!(started.elapsed() >= timeout);
//!
//! // `build_unchecked`: the import goes on at once; a request gets the connect error.
//! let started = Instant::now();
//! let pool = builder().build_unchecked(DatabaseDown);
//! assert!(started.elapsed() < timeout);
//! let error = pool.get().unwrap_err();
//! assert_eq!(error.kind(), ErrorKind::ConnectFailed("connection refused".into()));
//! ```
//!
//! # Clones across `fork()`: what they share
//!
//! Clones of a [`Pool`](crate::Pool) are one pool, as with r2d2, in every process:
//!
//! - In the process that built it, every clone hands out the same connections.
//! - In a forked child, every clone the child inherited is again one pool: the *child's*. The
//!   first use through any of them builds it, and every clone then uses it (it is not built
//!   once per clone). It shares nothing with the parent's pool: no connection, no count.
//! - [`Pool::fork_stats`](crate::Pool::fork_stats) and [`Pool::state`](crate::Pool::state) are
//!   the same through every clone in a process.
//! - A guard checked out before the fork, through any clone, is the parent's connection: it
//!   must not be used in the child (see [`PooledConnection`](crate::PooledConnection)).
//!
//! ```
//! # #[cfg(feature = "diesel-sqlite")]
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use diesel::r2d2::ConnectionManager;
//! use diesel::SqliteConnection;
//! use forksafe_pool::{ForkStats, Pool};
//! use nix::sys::wait::{waitpid, WaitStatus};
//! use nix::unistd::{fork, ForkResult};
//!
//! let pool = Pool::builder().max_size(2).build(ConnectionManager::<SqliteConnection>::new(":memory:"))?;
//! let clone = pool.clone(); // e.g. the copy in a web framework's state
//! assert_eq!(pool.state().connections, 2);
//!
//! // SAFETY (for the example): the child only uses the pool and leaves with `_exit`.
//! match unsafe { fork() }? {
//!     ForkResult::Child => {
//! #       // A deadline: a hung child dies of SIGALRM, so the test fails instead of hanging.
//! #       unsafe { libc::alarm(20) };
//!         let held = clone.get(); // builds the child's pool, for both clones
//!         let state = (pool.state(), clone.state());
//!         let one_pool = held.is_ok()
//!             && state.0.connections == state.1.connections
//!             && state.0.idle_connections == state.1.idle_connections
//!             && state.0.idle_connections == state.0.connections - 1; // `held` is out
//!         let built_once = pool.fork_stats() == clone.fork_stats()
//!             && pool.fork_stats().forks_crossed == 1
//!             && pool.fork_stats().connections_discarded == 2; // the parent's, not used
//!         drop(held);
//!         unsafe { libc::_exit(if one_pool && built_once { 0 } else { 1 }) };
//!     }
//!     ForkResult::Parent { child } => {
//!         assert_eq!(waitpid(child, None)?, WaitStatus::Exited(child, 0));
//!         // The parent's pool: its own 2 connections, untouched by the child.
//!         assert_eq!(clone.state().connections, 2);
//!         assert_eq!(pool.fork_stats(), ForkStats::default());
//!     }
//! }
//! # Ok(())
//! # }
//! # #[cfg(not(feature = "diesel-sqlite"))]
//! # fn main() {}
//! ```
