//! A drop-in replacement for [`r2d2::Pool`] that is safe across `fork()`.
//!
//! Pre-forking servers (uWSGI's default mode, gunicorn `--preload`, Unicorn and Puma with
//! `preload_app`, any Rust master/worker server) build the application and its connection pool
//! in a master process, then `fork()` workers. With a plain `r2d2::Pool` every worker inherits
//! the master's open database sockets, and two processes end up speaking one protocol stream:
//! TLS errors ("SSL error: decryption failed or bad record mac"), "lost synchronization with
//! server", "Commands out of sync", "timed out waiting for connection" in every worker, or, worst,
//! one process silently reading another process's rows.
//!
//! [`Pool`] is `r2d2::Pool` with the same builder and methods. In a forked child it discards
//! every inherited connection, idle or checked out, without writing a byte on the shared socket,
//! lets go of the child's copy of that socket, and opens fresh connections on a pool of the
//! child's own. The master keeps its sessions, and the application keeps eager pre-forking, with
//! its copy-on-write memory sharing and fast worker start-up.
//!
//! # Drop-in use
//!
//! A service written for r2d2 changes one import:
//!
//! ```
//! # #[cfg(feature = "diesel-sqlite")]
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use diesel::prelude::*;
//! use diesel::r2d2::ConnectionManager;
//! use forksafe_pool::Pool; // was: use diesel::r2d2::Pool;
//!
//! let manager = ConnectionManager::<SqliteConnection>::new(":memory:");
//! let pool = Pool::builder().max_size(1).build(manager)?;
//!
//! let mut conn = pool.get()?;
//! let answer: i32 =
//!     diesel::select(40.into_sql::<diesel::sql_types::Integer>() + 2).get_result(&mut conn)?;
//! conn.transaction(|conn| diesel::sql_query("CREATE TABLE t (x INTEGER)").execute(conn))?;
//! assert_eq!(answer, 42);
//! # Ok(())
//! # }
//! # #[cfg(not(feature = "diesel-sqlite"))]
//! # fn main() {}
//! ```
//!
//! Then build the pool in the master, warm it, and fork as many workers as you like. The first
//! `get()` in a worker builds the worker's own pool:
//!
//! ```
//! # #[cfg(feature = "diesel-sqlite")]
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use diesel::prelude::*;
//! use diesel::r2d2::ConnectionManager;
//! use forksafe_pool::{ForkStats, Pool};
//! use nix::sys::wait::{waitpid, WaitStatus};
//! use nix::unistd::{fork, ForkResult};
//!
//! let dir = std::env::temp_dir().join(format!("forksafe-doc-{}", std::process::id()));
//! std::fs::create_dir_all(&dir)?;
//! let url = dir.join("app.db").to_string_lossy().into_owned();
//! let pool = Pool::builder().max_size(2).build(ConnectionManager::<SqliteConnection>::new(url))?;
//! diesel::sql_query("SELECT 1").execute(&mut pool.get()?)?; // the master warms its pool
//!
//! // SAFETY (for the example): the child only uses the pool and leaves with `_exit`.
//! match unsafe { fork() }? {
//!     ForkResult::Child => {
//! #       // A deadline: a hung child dies of SIGALRM, so the test fails instead of hanging.
//! #       unsafe { libc::alarm(20) };
//!         let ok = diesel::sql_query("SELECT 1").execute(&mut pool.get().unwrap()).is_ok();
//!         let stats = pool.fork_stats();
//!         let own_pool = stats.forks_crossed == 1 && stats.connections_discarded >= 1;
//!         unsafe { libc::_exit(if ok && own_pool { 0 } else { 1 }) };
//!     }
//!     ForkResult::Parent { child } => {
//!         assert_eq!(waitpid(child, None)?, WaitStatus::Exited(child, 0));
//!         diesel::sql_query("SELECT 1").execute(&mut pool.get()?)?; // the master still works
//!         assert_eq!(pool.fork_stats(), ForkStats::default());
//!     }
//! }
//! # std::fs::remove_dir_all(&dir)?;
//! # Ok(())
//! # }
//! # #[cfg(not(feature = "diesel-sqlite"))]
//! # fn main() {}
//! ```
//!
//! What stays the same: [`Pool::new`], [`Pool::builder`], every [`Builder`] setter
//! (`max_size`, `min_idle`, `test_on_check_out`, `max_lifetime`, `idle_timeout`,
//! `connection_timeout`, `error_handler`, `event_handler`, `connection_customizer`,
//! `thread_pool`), `build`, `build_unchecked`, `get`, `get_timeout`, `try_get`, `state`, the
//! getters, [`r2d2::Error`] as the error type (re-exported as [`Error`]), and a
//! [`PooledConnection`] that is `'static` and `Send`. With a `diesel-*` feature, diesel's
//! connection traits are implemented for [`PooledConnection`], so `&mut conn` and
//! `conn.transaction(..)` work unchanged; redis's `ConnectionLike` works through redis's own
//! impl for anything that dereferences to a connection.
//!
//! What is added: [`Pool::fork_stats`], [`Builder::descriptor_locator`], [`fork_detection`], the
//! lifecycle hooks [`Pool::release_idle`], [`Pool::warm_up`] and [`OnFork::Fail`], and, beyond
//! one pool, [`GuardedPool`] for a plain `r2d2::Pool` a library receives and [`ForkLocal`] for
//! any other per-process value.
//!
//! # Migrating from r2d2
//!
//! | where code names | change it to |
//! |---|---|
//! | `r2d2::Pool<M>`, `diesel::r2d2::Pool<M>` | [`forksafe_pool::Pool<M>`](Pool); `Pool::builder()`, every setter and `build` as before |
//! | `r2d2::PooledConnection<M>` (a `type DbConn = ...` alias, `fn f(conn: &mut r2d2::PooledConnection<M>)`) | [`forksafe_pool::PooledConnection<M>`](PooledConnection): another type, with the same `Deref`/`DerefMut`, `extensions` and, with a `diesel-*` feature, diesel's connection traits |
//! | `diesel::r2d2::PoolTransactionManager<T>` | `forksafe_pool::PooledTransactionManager<T>` (feature `diesel`) |
//! | `r2d2::Error`, `r2d2::State` | nothing: they are the pool's own types, re-exported as [`Error`] and [`State`] |
//! | `r2d2::ManageConnection`, `CustomizeConnection`, `HandleError`, `HandleEvent`, `r2d2::event::*`, `Extensions`, the `Nop…` and `Logging…` types | `forksafe_pool::` the same names (re-exported; [`event`] is r2d2's module): the direct `r2d2` dependency can go |
//! | an `r2d2::Pool` your code is handed and cannot build | wrap it: [`GuardedPool::new`] |
//!
//! A function that takes the connection itself (`&mut PgConnection`) needs no change: `&mut
//! conn` still coerces through `DerefMut`. Generic code bounded on diesel's traits
//! (`C: Connection<Backend = Pg>`, `LoadConnection`) takes `&mut conn` as before, because the
//! traits are implemented for [`PooledConnection`] itself. To tell errors apart without
//! parsing messages, [`ErrorExt::kind`] reads an [`ErrorKind`] from the `r2d2::Error`.
//!
//! ```
//! # #[cfg(feature = "diesel-sqlite")]
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use diesel::connection::AnsiTransactionManager;
//! use diesel::prelude::*;
//! use diesel::r2d2::ConnectionManager;
//! use forksafe_pool::{Pool, PooledConnection, PooledTransactionManager};
//!
//! // was: type DbConn = r2d2::PooledConnection<ConnectionManager<SqliteConnection>>;
//! type DbConn = PooledConnection<ConnectionManager<SqliteConnection>>;
//!
//! fn one() -> diesel::dsl::select<diesel::dsl::AsExprOf<i32, diesel::sql_types::Integer>> {
//!     diesel::select(1.into_sql::<diesel::sql_types::Integer>())
//! }
//! fn by_alias(conn: &mut DbConn) -> QueryResult<i32> {
//!     one().get_result(conn)
//! }
//! fn by_connection(conn: &mut SqliteConnection) -> QueryResult<i32> {
//!     one().get_result(conn)
//! }
//! // was: C: Connection<TransactionManager = diesel::r2d2::PoolTransactionManager<AnsiTransactionManager>>
//! fn by_transaction_manager<C>(conn: &mut C) -> QueryResult<i32>
//! where
//!     C: Connection<TransactionManager = PooledTransactionManager<AnsiTransactionManager>>,
//! {
//!     conn.transaction(|conn| conn.batch_execute("SELECT 1").map(|()| 1))
//! }
//!
//! let pool = Pool::builder().max_size(1).build(ConnectionManager::new(":memory:"))?;
//! let mut conn = pool.get()?;
//! assert_eq!(by_alias(&mut conn)? + by_connection(&mut conn)?, 2);
//! assert_eq!(by_transaction_manager(&mut conn)?, 1);
//! # Ok(())
//! # }
//! # #[cfg(not(feature = "diesel-sqlite"))]
//! # fn main() {}
//! ```
//!
//! # Differences from r2d2
//!
//! - A [`PooledConnection`] checked out *before* a fork panics if the child dereferences it: its
//!   socket is the parent's, and any use would corrupt the parent's session. Dropping it in the
//!   child is silent and harmless. Check out a new connection in the child instead.
//! - The pool is not r2d2's own but follows its rules on std's `Mutex` and `Condvar`, because
//!   r2d2 cannot run safely in a forked child. In the process that built it, it does r2d2's
//!   background work on the builder's thread pool (opening connections, keeping `min_idle`,
//!   retrying failed connects after r2d2's back-off, reaping idle and expired connections every
//!   30 s). A pool with an `event_handler` is an `r2d2::Pool` in that process, since only r2d2
//!   can make r2d2's events. Where its behaviour differs from r2d2's on purpose (stale
//!   connections closed at checkout, panicking connects), [`Pool`'s docs](Pool#differences-from-r2d2)
//!   say why.
//! - In a forked child the pool does r2d2's background work too, for its own connections
//!   (events, `min_idle`, retries, the reaper; see [`Pool`'s docs](Pool#in-a-forked-child)),
//!   but not on a `thread_pool` you passed (its threads do not exist in the child): on one
//!   thread per pool of its own, started by the pool's first use in the child, and a
//!   short-lived thread per connection attempt.
//! - The manager is shared by the pool of every process it is rebuilt in (a manager holds a URL,
//!   not connections), so it needs no `Clone`.
//!
//! # Every public item at a glance
//!
//! | item | what it is |
//! |---|---|
//! | [`Pool`] | the pool: `new`, `builder`, `get`, `get_timeout`, `try_get`, `state`, the getters, `fork_stats`, `warm_up`, `release_idle` |
//! | [`Builder`] | every r2d2 setter, plus `descriptor_locator` and `on_fork`; `build`, `build_unchecked` |
//! | [`PooledConnection`] | what `get` returns; derefs to the connection, diesel's traits with `diesel-*` |
//! | [`ForkStats`] | what the pool has seen of forks ([`Pool::fork_stats`]) |
//! | [`OnFork`] | `Rebuild` (the default) or `Fail`: what a forked child does with the pool |
//! | [`fork_detection`], [`ForkDetection`] | how this process detects forks |
//! | [`ForkLocal`] | any value, built once per process |
//! | [`GuardedPool`] | fork protection for a plain `r2d2::Pool` a library receives |
//! | [`guide`] | no items: async servers (axum, actix-web), PyO3 modules, clones across `fork()` |
//! | `Runtime` | with `tokio`: a tokio runtime per process ([Async](#async-tokio-runtimes-and-async-pools)) |
//! | `deadpool_postgres`, `bb8_postgres` | with `deadpool-postgres`, `bb8-postgres`: the async pools, one per process |
//! | [`ErrorKind`], [`ErrorExt`] | what kind of error an `r2d2::Error` of the pool is: `error.kind()` |
//! | `PooledTransactionManager` | with `diesel`: the `TransactionManager` of [`PooledConnection`] |
//! | [`Error`], [`State`], [`ManageConnection`], [`HandleError`], [`HandleEvent`], [`event`], [`Extensions`], [`CustomizeConnection`], [`LoggingErrorHandler`], [`NopErrorHandler`], [`NopEventHandler`], [`NopConnectionCustomizer`] | r2d2's, re-exported |
//!
//! ```
//! # #[cfg(feature = "diesel-sqlite")]
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use diesel::r2d2::ConnectionManager;
//! use diesel::SqliteConnection;
//! use forksafe_pool::{fork_detection, ForkLocal, ForkStats, GuardedPool, OnFork, Pool, PooledConnection};
//!
//! let manager = || ConnectionManager::<SqliteConnection>::new(":memory:");
//! let pool: Pool<_> = Pool::builder().max_size(2).on_fork(OnFork::Rebuild).build(manager())?;
//! pool.warm_up()?;
//! let mut conn: PooledConnection<_> = pool.get()?;
//! PooledConnection::extensions_mut(&mut conn).insert(7_u32);
//! assert_eq!(PooledConnection::extensions(&conn).get::<u32>(), Some(&7));
//! drop(conn);
//! assert_eq!(pool.fork_stats(), ForkStats::default());
//! assert_eq!(pool.release_idle(), 2);
//! assert!(fork_detection().atfork_child_calls < u64::MAX);
//!
//! static BUILT_IN: ForkLocal<u32> = ForkLocal::new(std::process::id);
//! assert_eq!(*BUILT_IN.get(), std::process::id());
//!
//! let received = GuardedPool::new(r2d2::Pool::builder().max_size(1).build(manager())?);
//! assert!(received.get().is_ok());
//! # Ok(())
//! # }
//! # #[cfg(not(feature = "diesel-sqlite"))]
//! # fn main() {}
//! ```
//!
//! # Using it from library code
//!
//! **A library that builds its own pool** uses `forksafe_pool::Pool` instead of `r2d2::Pool`
//! and is done: its types can be created in a master and used in every worker.
//!
//! ```
//! # #[cfg(feature = "diesel-sqlite")]
//! # mod library {
//! use diesel::prelude::*;
//! use diesel::r2d2::ConnectionManager;
//!
//! /// A library's public type: safe to create before fork() and keep in every worker.
//! pub struct Repository {
//!     pool: forksafe_pool::Pool<ConnectionManager<SqliteConnection>>, // was: r2d2::Pool<...>
//! }
//!
//! impl Repository {
//!     pub fn open(url: &str) -> Result<Self, forksafe_pool::Error> {
//!         let pool = forksafe_pool::Pool::builder().max_size(4).build(ConnectionManager::new(url))?;
//!         Ok(Repository { pool })
//!     }
//!
//!     pub fn answer(&self) -> Result<i32, Box<dyn std::error::Error>> {
//!         let mut conn = self.pool.get()?;
//!         Ok(diesel::select(42.into_sql::<diesel::sql_types::Integer>()).get_result(&mut conn)?)
//!     }
//! }
//! # }
//! # #[cfg(feature = "diesel-sqlite")]
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # let repo = library::Repository::open(":memory:")?;
//! # assert_eq!(repo.answer()?, 42);
//! # Ok(())
//! # }
//! # #[cfg(not(feature = "diesel-sqlite"))]
//! # fn main() {}
//! ```
//!
//! **A library that is handed an `r2d2::Pool`** cannot rebuild it: r2d2 gives back neither the
//! manager nor the configuration. Wrap it in a [`GuardedPool`] in the process that built it. In
//! a forked child the guard never touches the inherited pool (not its lock, not its
//! connections, not even its `Drop`); it fails every `get` at once with an [`r2d2::Error`]
//! that says the pool crossed `fork()` ([`ErrorKind::CrossedFork`]), or rebuilds through a
//! closure the application supplied ([`GuardedPool::rebuild_with`]). That closure builds an
//! r2d2 pool in the child, which [docs/parking-lot.md] measures hanging now and then (4 of 60
//! children that built and dropped one): so the example below forks only with the refusing
//! guard, and a library that can ask for a [`Pool`] instead should.
//!
//! [docs/parking-lot.md]: https://github.com/forksafe-pool/forksafe-pool/blob/main/docs/parking-lot.md
//!
//! ```
//! # #[cfg(feature = "diesel-sqlite")]
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use diesel::r2d2::{ConnectionManager, Pool};
//! use diesel::SqliteConnection;
//! use forksafe_pool::{ErrorExt, ErrorKind, GuardedPool};
//! use nix::sys::wait::{waitpid, WaitStatus};
//! use nix::unistd::{fork, ForkResult};
//!
//! // The application knows how its pool is built; the library only receives the result.
//! let build = || {
//!     Pool::builder().max_size(1).build(ConnectionManager::<SqliteConnection>::new(":memory:"))
//! };
//! let strict = GuardedPool::new(build()?);
//! let rebuilding = GuardedPool::new(build()?).rebuild_with(build);
//! assert!(rebuilding.can_rebuild() && rebuilding.get().is_ok());
//!
//! // SAFETY (for the example): the child only uses the refusing pool and leaves with `_exit`.
//! match unsafe { fork() }? {
//!     ForkResult::Child => {
//! #       // A deadline: a hung child dies of SIGALRM, so the test fails instead of hanging.
//! #       unsafe { libc::alarm(20) };
//!         let refused = strict.get().is_err_and(|error| error.kind() == ErrorKind::CrossedFork);
//!         unsafe { libc::_exit(if refused { 0 } else { 1 }) };
//!     }
//!     ForkResult::Parent { child } => {
//!         assert_eq!(waitpid(child, None)?, WaitStatus::Exited(child, 0));
//!         assert!(strict.get().is_ok(), "the parent's pool works");
//!     }
//! }
//! # Ok(())
//! # }
//! # #[cfg(not(feature = "diesel-sqlite"))]
//! # fn main() {}
//! ```
//!
//! The trade-offs, against [`Pool`]:
//!
//! | | [`Pool`] | [`GuardedPool`] around an `r2d2::Pool` |
//! |---|---|---|
//! | after a fork | rebuilds itself | rebuilds through the application's closure, or fails at once |
//! | error type | `r2d2::Error` | `r2d2::Error` (the "crossed fork" one reads `timed out waiting for connection: forksafe-pool: ...`, r2d2's fixed prefix, and is returned without waiting) |
//! | guard | fork-aware [`PooledConnection`] | r2d2's own `PooledConnection`, so the library's code is unchanged; one checked out *before* the fork and dropped in the child goes back through the parent's pool, so don't hold connections across `fork()` |
//! | inherited sockets | pointed at `/dev/null` in the child | left open in the child (nothing is written on them; the parent's sessions end when the last copy closes) |
//! | pool in the child | built on std primitives | whatever the closure builds: an r2d2 pool, with r2d2's own exposure to what a fork leaves behind in parking_lot |
//! | forks during a connect | wait (at most 1 s) for the master's connects and closes in progress, so no driver lock is frozen held in a child | not held up: the guard never sees the master's connects, so a fork during one can leave the driver's lock held in the child |
//!
//! # Lifecycle hooks
//!
//! For servers that want control:
//!
//! - [`Pool::release_idle`] in the master right before forking (Unicorn's `before_fork`) closes
//!   the idle connections now and checked-out ones when they come back; the pool reconnects on
//!   its next use. Children inherit no connection, so they have nothing to discard, and the
//!   master's sessions end now rather than when the last worker exits.
//! - [`Pool::warm_up`] in a worker right after the fork (uWSGI's `@postfork`, gunicorn's
//!   `post_fork`) builds the worker's pool and waits, at most `connection_timeout`, for its
//!   `min_idle` connections, so the first request does not pay for connecting.
//! - [`Builder::on_fork`]`(`[`OnFork::Fail`]`)` turns the automatic rebuild off: any use in a
//!   forked child fails at once with an [`r2d2::Error`] saying the pool crossed `fork()` and was
//!   built with `OnFork::Fail`. The inherited connections are still never used and their sockets
//!   still let go of.
//!
//! ```
//! # #[cfg(feature = "diesel-sqlite")]
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use diesel::r2d2::ConnectionManager;
//! use diesel::SqliteConnection;
//! use forksafe_pool::{ErrorExt, ErrorKind, OnFork, Pool};
//! use nix::sys::wait::{waitpid, WaitStatus};
//! use nix::unistd::{fork, ForkResult};
//!
//! let manager = || ConnectionManager::<SqliteConnection>::new(":memory:");
//! let pool = Pool::builder().max_size(2).build(manager())?;
//! let strict = Pool::builder().max_size(1).on_fork(OnFork::Fail).build(manager())?;
//!
//! assert_eq!(pool.release_idle(), 2); // before_fork: the children inherit nothing
//! // SAFETY (for the example): the child only uses the pools and leaves with `_exit`.
//! match unsafe { fork() }? {
//!     ForkResult::Child => {
//! #       // A deadline: a hung child dies of SIGALRM, so the test fails instead of hanging.
//! #       unsafe { libc::alarm(20) };
//!         let warmed = pool.warm_up().is_ok() && pool.state().idle_connections == 2; // postfork
//!         let nothing_discarded = pool.fork_stats().connections_discarded == 0;
//!         let refused = strict.get().is_err_and(|error| {
//!             error.to_string().contains("OnFork::Fail") && error.kind() == ErrorKind::CrossedFork
//!         });
//!         unsafe { libc::_exit(if warmed && nothing_discarded && refused { 0 } else { 1 }) };
//!     }
//!     ForkResult::Parent { child } => {
//!         assert_eq!(waitpid(child, None)?, WaitStatus::Exited(child, 0));
//!         assert!(pool.get().is_ok() && strict.get().is_ok(), "both still work in the master");
//!     }
//! }
//! # Ok(())
//! # }
//! # #[cfg(not(feature = "diesel-sqlite"))]
//! # fn main() {}
//! ```
//!
//! # Beyond pools: `ForkLocal`
//!
//! Pools are not the only per-process state: a Redis or HTTP client with an open socket, a
//! random generator's state (two workers must not produce the same "random" tokens), a cache of
//! prepared statements. A [`ForkLocal`] holds any such value: built lazily, once per process,
//! with the initialiser it was given. A forked child's first `get()` builds the child's own
//! value, and the value inherited from the parent is never dropped or touched in the child. It
//! uses the pool's fork detection (one load and one compare), is `Sync`, and can be a `static`:
//!
//! ```
//! use forksafe_pool::ForkLocal;
//! use nix::sys::wait::{waitpid, WaitStatus};
//! use nix::unistd::{fork, ForkResult};
//! use std::collections::hash_map::RandomState;
//! use std::hash::BuildHasher;
//!
//! /// Per-process random state: a worker never repeats its master's (or a sibling's) sequence.
//! static TOKEN_KEY: ForkLocal<RandomState> = ForkLocal::new(RandomState::new);
//! /// Per-process identity, built from a closure.
//! static BUILT_BY: ForkLocal<u32> = ForkLocal::new(|| std::process::id());
//!
//! fn token(n: u64) -> u64 {
//!     TOKEN_KEY.get().hash_one(n)
//! }
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let master_token = token(1);
//! assert_eq!(token(1), master_token, "one value per process");
//! assert_eq!(*BUILT_BY.get(), std::process::id());
//!
//! // SAFETY (for the example): the child only reads the statics and leaves with `_exit`.
//! match unsafe { fork() }? {
//!     ForkResult::Child => {
//! #       // A deadline: a hung child dies of SIGALRM, so the test fails instead of hanging.
//! #       unsafe { libc::alarm(20) };
//!         let own = *BUILT_BY.get() == std::process::id() && token(1) != master_token;
//!         unsafe { libc::_exit(if own { 0 } else { 1 }) };
//!     }
//!     ForkResult::Parent { child } => {
//!         assert_eq!(waitpid(child, None)?, WaitStatus::Exited(child, 0));
//!         assert_eq!(token(1), master_token, "the master keeps its value");
//!     }
//! }
//! # Ok(())
//! # }
//! ```
//!
//! Fallible initialisers use [`ForkLocal::try_new`] and [`ForkLocal::get_or_try`], which
//! returns the initialiser's own error unchanged and stores nothing, so the next call tries
//! again:
//!
//! ```
//! use forksafe_pool::ForkLocal;
//!
//! let port = ForkLocal::try_new(|| std::env::var("APP_PORT").unwrap_or("8080".into()).parse::<u16>());
//! assert_eq!(port.get_or_try(), Ok(&8080));
//! ```
//!
//! **References taken before a fork.** A `&T` obtained in the parent and still held in the
//! child points at the parent's value. The child never frees or drops that value (it is the
//! child's copy-on-write image of the parent's memory), so the reference stays valid memory, but
//! what the value refers to is the parent's: a socket shared with the parent, threads that do not
//! exist in the child, locks that may be frozen. Don't use such a reference in the child; call
//! `get()` again.
//!
//! **Initialisers are not driver sections.** A fork does not wait for a `ForkLocal` initialiser
//! running on another thread (it may run any code for any time). If it connects through a C
//! library, a libpq or MySQL client say, a fork in that instant can leave the library's lock held
//! in the child; build such values before forking, or through a [`Pool`], whose connects the
//! fork does wait for.
//!
//! # Async: tokio runtimes and async pools
//!
//! A tokio runtime does not survive `fork()`: the child has none of its threads, and its epoll
//! instance is the parent's, so a child that drives or drops it changes the parent's interest
//! list. An async pool built before the fork is worse off still: its clients' connection tasks
//! belong to the parent's runtime, so in the child every query waits for ever, with no error
//! (deadpool-postgres on a tokio runtime, both built and used in a master: its worker's query
//! is never answered, in `tests/async_pools/`). Three types, each behind its feature, give
//! every process its own, with the same detection and the same discard-and-release as
//! [`Pool`]:
//!
//! - `Runtime` (`tokio`): the runtime of the process that built it; a forked child's first use
//!   builds the child's own from the same recipe and never touches the inherited one. Unlike a
//!   [`ForkLocal`] of a tokio runtime, its `block_on` also works on the thread that forked from
//!   inside a runtime (an async `main` forking its workers).
//! - `deadpool_postgres::Pool` (`deadpool-postgres`) and `bb8_postgres::Pool` with
//!   `bb8_postgres::PostgresConnectionManager` (`bb8-postgres`): the libraries' pools, one per
//!   process, the one-line swap of a `use`. In a child, inherited clients are never used,
//!   recycled, returned or dropped, and their sockets are released; the parent's sessions are
//!   untouched.
//!
//! ```ignore
//! use forksafe_pool::deadpool_postgres::{tokio_postgres::NoTls, Pool}; // was: deadpool_postgres::Pool
//! use forksafe_pool::Runtime;
//!
//! // In the master (a PyO3 module's import, a server's start-up):
//! let runtime = Runtime::new()?;
//! let pool = Pool::builder("host=127.0.0.1 user=app".parse()?, NoTls).max_size(8).build()?;
//! // In any process, the master or a forked worker:
//! let answer = runtime.block_on(async {
//!     let client = pool.get().await?;
//!     client.query_one("SELECT 42", &[]).await
//! })?;
//! ```
//!
//! The `Runtime` type's docs have a runnable forking example; each pool module's docs say
//! what differs from the library.
//!
//! # Feature flags
//!
//! No feature is on by default: without one, the pool works with every [`ManageConnection`],
//! and [`Builder::descriptor_locator`] tells it which descriptors a connection owns (otherwise
//! inherited sockets are left open in the child and counted in
//! [`ForkStats::connections_leaked`]). Each backend feature adds what its manager needs:
//!
//! | feature | what it adds |
//! |---|---|
//! | `diesel` | diesel's connection traits for [`PooledConnection`], so `&mut conn` and `conn.transaction(..)` work unchanged; `PooledTransactionManager` |
//! | `diesel-postgres` | diesel `PgConnection` (links libpq); inherited sockets released in the child: TCP with or without TLS, Unix, direct or through PgBouncer |
//! | `postgres` | `postgres::Client` (r2d2_postgres, plain or over postgres-openssl / postgres-native-tls); inherited sockets released as for `diesel-postgres` |
//! | `diesel-mysql` | diesel `MysqlConnection` (links libmysqlclient or MariaDB Connector/C); sockets of inherited TCP connections released in the child (a Unix socket is left open and counted) |
//! | `mysql` | `mysql::Conn` (r2d2_mysql); its socket, TCP or Unix, released in the child |
//! | `diesel-sqlite` | diesel `SqliteConnection`, SQLite compiled in; each inherited connection's database descriptor released in the child (unless another pool or the application also has the file open); a libc `fork()` waits while a SQLite connection is checked out on another thread |
//! | `rusqlite` | `rusqlite::Connection` (r2d2_sqlite); as `diesel-sqlite`, with rusqlite's own choice of bundled or system SQLite |
//! | `redis` | `Pool<redis::Client>` through the redis crate's r2d2 support; sockets of inherited TCP connections released in the child (a Unix socket is left open and counted) |
//! | `tokio` | `Runtime`, a tokio runtime per process |
//! | `deadpool-postgres` | `deadpool_postgres::Pool`, deadpool-postgres pools per process (with `tokio`); sockets of inherited TCP connections, TLS or not, released in the child |
//! | `bb8-postgres` | `bb8_postgres::Pool`, bb8 pools of tokio-postgres clients per process (with `tokio`, and bb8 without parking_lot); as `deadpool-postgres` |
//!
//! Which connections each backend can identify, and why the others are left open, is in
//! [docs/backends.md](https://github.com/forksafe-pool/forksafe-pool/blob/main/docs/backends.md).
//!
//! # Platforms
//!
//! - **Linux 4.14 and later**: a fork is detected with one memory load, whatever made it (libc
//!   `fork()`, a raw `clone`/`SYS_fork`), through a page marked `MADV_WIPEONFORK`.
//! - **Older Linux**: each check also compares `getpid()`, a system call per check.
//! - **macOS, the BSDs and other Unix systems**: the `getpid()` comparison too. Descriptors are
//!   listed by probing every number below the descriptor limit (nothing is identified when
//!   that is above 65536) and replaced with `dup2` and `FD_CLOEXEC`; no socket cookie tells a
//!   socket new, so sockets only a connect window names (PostgreSQL over a Unix socket or
//!   through PgBouncer) are left open in a child and counted as leaked. These code paths are
//!   tested on Linux with `--cfg forksafe_portable`; CI compiles the library for macOS and
//!   FreeBSD but runs nothing there.
//! - **Windows** has no `fork()`, and the crate does not build there.
//!
//! # How it works
//!
//! Every object that must not cross a fork records the *epoch* of the process that made it. A
//! [`Pool`] keeps one inner pool per process; a forked child's first use builds its own from the
//! saved configuration, on std's `Mutex` and `Condvar` rather than on r2d2, whose parking_lot
//! state a fork corrupts. The inherited inner pool is never touched or dropped (dropping would
//! run each driver's goodbye on the parent's socket); the descriptors of its connections, recorded
//! at connect time, are pointed at `/dev/null` with `dup3` (`dup2` elsewhere). A libc `fork()`
//! waits, at most one second, for connects and closes running on other threads, so no driver
//! lock is copied held into a child. The details, and the reasons for each choice, are in
//! [docs/how-it-works.md](https://github.com/forksafe-pool/forksafe-pool/blob/main/docs/how-it-works.md)
//! and [docs/parking-lot.md](https://github.com/forksafe-pool/forksafe-pool/blob/main/docs/parking-lot.md);
//! measurements, each with the command that reproduces it, in
//! [docs/measurements.md](https://github.com/forksafe-pool/forksafe-pool/blob/main/docs/measurements.md).
//!
//! # Unsafe code
//!
//! Fork detection and the child's pool need raw system calls that no safe wrapper offers:
//! mapping and `madvise`-ing the epoch page, registering `pthread_atfork` handlers, starting the
//! child pool's connect threads with `pthread_create`, asking a socket's protocol and cookie
//! with `getsockopt`, probing descriptors with `fcntl` where there is no `/proc`, and making
//! `r2d2::Error` and `r2d2::State` values without running r2d2; the pool's idle connections sit
//! in atomic pointer slots (`Box::into_raw`/`from_raw`), so that a checkout takes no lock. The
//! crate denies `unsafe_code` and allows it only in the modules that need it: `fork`'s files,
//! `sys`, `r2d2_compat` and `process_pool::idle_slots` (and, in tests, a raw-fork test of `connect_window`).
//! Every `unsafe` block carries a `// SAFETY:` comment naming each precondition; the crate
//! denies `clippy::undocumented_unsafe_blocks` and `unsafe_op_in_unsafe_fn`.
//!
//! # Minimum supported Rust version
//!
//! Rust 1.88 (`rust-version` in Cargo.toml): diesel 2.3 needs 1.86, redis 1.x needs 1.88.
// `unsafe` only in the modules that allow it for themselves: `fork`'s files, `sys`,
// `r2d2_compat` and `idle_slots` (and one raw-fork unit test in `connect_window`).
#![deny(
    unsafe_code,
    unsafe_op_in_unsafe_fn,
    clippy::undocumented_unsafe_blocks
)]
#![warn(missing_docs, missing_debug_implementations, rust_2018_idioms)]

#[cfg(any(feature = "deadpool-postgres", feature = "bb8-postgres"))]
mod async_pool;
mod backends;
#[cfg(feature = "bb8-postgres")]
pub mod bb8_postgres;
mod config;
mod connect_window;
mod connection;
#[cfg(feature = "deadpool-postgres")]
pub mod deadpool_postgres;
mod descriptors;
#[cfg(feature = "diesel")]
mod diesel_connection;
mod error_kind;
mod fork;
mod fork_local;
mod generation;
mod generation_pool;
mod guarded;
pub mod guide;
pub mod locate;
mod manager;
mod pool;
mod process_pool;
mod r2d2_compat;
#[cfg(feature = "tokio")]
mod runtime;
mod stats;
mod sync;
mod sys;
mod worker_threads;

pub use crate::config::{Builder, OnFork};
pub use crate::connection::PooledConnection;
#[cfg(feature = "diesel")]
pub use crate::diesel_connection::PooledTransactionManager;
pub use crate::error_kind::{ErrorExt, ErrorKind};
pub use crate::fork::{fork_detection, ForkDetection};
pub use crate::fork_local::ForkLocal;
pub use crate::guarded::GuardedPool;
pub use crate::pool::Pool;
#[cfg(feature = "tokio")]
pub use crate::runtime::Runtime;
pub use crate::stats::ForkStats;
pub use r2d2::{
    event, CustomizeConnection, Error, Extensions, HandleError, HandleEvent, LoggingErrorHandler,
    ManageConnection, NopConnectionCustomizer, NopErrorHandler, NopEventHandler, State,
};

/// The README's code, compiled by `cargo test --doc` so that it cannot go stale.
#[cfg(all(doctest, feature = "diesel-postgres", feature = "deadpool-postgres"))]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;

/// What actix's `web::Data`, axum's `State` and every thread pool need of a pool and its
/// guard, checked for every manager when the crate compiles (this function is never called;
/// type-checking its body is the assertion), so that a change which loses one fails here
/// rather than in users' builds.
#[allow(dead_code)]
fn pool_types_cross_threads<M: ManageConnection, T: Send + Sync>() {
    fn send_sync_clone<X: Send + Sync + Clone + 'static>() {}
    fn send_static<X: Send + 'static>() {}
    fn send_sync<X: Send + Sync>() {}
    send_sync_clone::<Pool<M>>();
    send_static::<PooledConnection<M>>();
    send_sync_clone::<GuardedPool<M>>();
    send_sync::<ForkLocal<T>>();
    send_sync::<Error>();
    #[cfg(feature = "tokio")]
    send_sync_clone::<Runtime>();
    #[cfg(feature = "deadpool-postgres")]
    {
        send_sync_clone::<deadpool_postgres::Pool>();
        send_static::<deadpool_postgres::Object>();
    }
    #[cfg(feature = "bb8-postgres")]
    {
        type Manager = bb8_postgres::PostgresConnectionManager<tokio_postgres::NoTls>;
        send_sync_clone::<bb8_postgres::Pool<Manager>>();
        send_static::<bb8_postgres::PooledConnection<'static, Manager>>();
    }
}
