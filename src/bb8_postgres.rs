//! A bb8 pool of tokio-postgres clients that is safe across `fork()`: bb8's API, a pool of its
//! own in every process.
//!
//! A `bb8::Pool` built before a fork breaks in the child the way every async pool does (its
//! clients' connection tasks belong to the parent's runtime, their sockets to the parent's
//! sessions, its background tasks do not run), and returning an inherited connection goes
//! through the parent's pool state. [`Pool`] keeps one bb8 pool per process: in a forked child
//! the first [`get`](Pool::get) lets go of the child's copies of the inherited sockets (without
//! writing on them) and builds the child's own bb8 pool with the same settings, on the runtime
//! that polls it. The inherited pool and its connections are never used, returned or dropped
//! there; the parent's sessions are untouched.
//!
//! ```no_run
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! // was: use bb8::Pool; use bb8_postgres::PostgresConnectionManager;
//! use forksafe_pool::bb8_postgres::{tokio_postgres::NoTls, Pool, PostgresConnectionManager};
//!
//! let manager =
//!     PostgresConnectionManager::new_from_stringlike("host=127.0.0.1 user=postgres", NoTls)?;
//! let pool = Pool::builder().max_size(8).build(manager).await?;
//!
//! let conn = pool.get().await?;
//! let row = conn.query_one("SELECT 1::int4", &[]).await?;
//! assert_eq!(row.get::<_, i32>(0), 1);
//! # Ok(())
//! # }
//! ```
//!
//! Differences from bb8 and bb8-postgres:
//! - [`PooledConnection`] is this module's guard, dereferencing to the `tokio_postgres::Client`
//!   as bb8's does. One checked out before a fork panics if the child uses it, and dropping it
//!   in the child forgets it.
//! - The manager opens the TCP connection itself and hands it to tokio-postgres, so the socket
//!   is known (see `deadpool_postgres` for what that leaves out:
//!   Unix-socket hosts, `hostaddr`, `target_session_attrs`, `cancel_query`).
//! - The builder offers bb8's settings except `connection_customizer`; the pool has no `add`
//!   (a connection made elsewhere has no recorded socket).
//! - In a forked child, the child's pool is built by the first call that needs it, on the
//!   current tokio runtime: a [`state`](Pool::state) before any `get` in a child must run
//!   inside one, as bb8's own `build_unchecked` must.
//!
//! # parking_lot
//!
//! bb8's default feature `parking_lot` makes bb8 *and tokio* lock with parking_lot, whose
//! process-global table of parked threads a fork corrupts when parent threads are parked in
//! it ([docs/parking-lot.md](https://github.com/forksafe-pool/forksafe-pool/blob/main/docs/parking-lot.md)).
//! This crate depends on bb8 without it; if another crate of yours turns it on, a child's pool
//! and runtime run on parking_lot again. `cargo tree -e features -i parking_lot` tells.

use std::fmt;
use std::marker::PhantomData;
use std::sync::Arc;
use std::time::Duration;

use crate::async_pool::postgres_connect;
use crate::async_pool::{Leased, PoolPerProcess};
use crate::descriptors::DescriptorTable;
use crate::stats::{Counters, ForkStats};

pub use crate::async_pool::postgres_connect::MakeTls;
pub use bb8::{ErrorSink, QueueStrategy, RunError, State};
pub use tokio_postgres;

/// A bb8 manager of tokio-postgres clients whose sockets a forked child can let go of:
/// bb8-postgres's `PostgresConnectionManager`, with the same constructors.
#[derive(Clone)]
pub struct PostgresConnectionManager<Tls> {
    config: tokio_postgres::Config,
    tls: Tls,
    descriptors: Arc<DescriptorTable>,
}

impl<Tls: MakeTls> PostgresConnectionManager<Tls> {
    /// A manager connecting to `config` over `tls`.
    pub fn new(config: tokio_postgres::Config, tls: Tls) -> Self {
        PostgresConnectionManager {
            config,
            tls,
            // Replaced by each pool generation's own table; this one serves a manager used
            // outside a `Pool`.
            descriptors: DescriptorTable::new(1, Arc::new(Counters::default())),
        }
    }

    /// A manager connecting to the connection string `params` (`"host=... user=..."` or a
    /// `postgres://` URL) over `tls`.
    ///
    /// # Errors
    ///
    /// If `params` does not parse.
    pub fn new_from_stringlike(
        params: impl ToString,
        tls: Tls,
    ) -> Result<Self, tokio_postgres::Error> {
        Ok(PostgresConnectionManager::new(
            params.to_string().parse()?,
            tls,
        ))
    }
}

impl<Tls: MakeTls> bb8::ManageConnection for PostgresConnectionManager<Tls> {
    type Connection = tokio_postgres::Client;
    type Error = tokio_postgres::Error;

    async fn connect(&self) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
        let (client, task) =
            postgres_connect::connect(&self.config, &self.tls, &self.descriptors).await?;
        tokio::spawn(task);
        Ok(client)
    }

    async fn is_valid(
        &self,
        conn: &mut tokio_postgres::Client,
    ) -> Result<(), tokio_postgres::Error> {
        conn.simple_query("").await.map(|_| ())
    }

    fn has_broken(&self, conn: &mut tokio_postgres::Client) -> bool {
        conn.is_closed()
    }
}

/// A bb8 manager a [`Pool`] can use: one whose connects record their sockets, so that a forked
/// child can let go of them. [`PostgresConnectionManager`] is one; the trait is sealed.
pub trait RecordsSockets: bb8::ManageConnection + Clone + sealed::Sealed {}

impl<Tls: MakeTls> RecordsSockets for PostgresConnectionManager<Tls> {}

mod sealed {
    use super::*;

    /// A pool generation's descriptor table, as the sealed trait's methods see it.
    pub struct Descriptors(pub(crate) Arc<DescriptorTable>);

    impl fmt::Debug for Descriptors {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.debug_struct("Descriptors").finish_non_exhaustive()
        }
    }

    pub trait Sealed {
        /// This manager, recording its connections' sockets in `descriptors`.
        fn recording_in(&self, descriptors: &Descriptors) -> Self;
    }

    impl<Tls: Clone> Sealed for PostgresConnectionManager<Tls> {
        fn recording_in(&self, descriptors: &Descriptors) -> Self {
            PostgresConnectionManager {
                config: self.config.clone(),
                tls: self.tls.clone(),
                descriptors: Arc::clone(&descriptors.0),
            }
        }
    }
}

/// A bb8 pool per process; see the [module docs](self). A cheap `Clone`.
pub struct Pool<M: RecordsSockets> {
    pools: Arc<PoolPerProcess<bb8::Pool<M>>>,
}

/// A connection checked out of a [`Pool`]: dereferences to the connection (a
/// `tokio_postgres::Client`) and goes back to the pool when dropped, in the process that
/// checked it out (see the [module docs](self)).
pub struct PooledConnection<'a, M: RecordsSockets> {
    inner: Leased<bb8::PooledConnection<'a, M>>,
}

type Setting<M> = Box<dyn Fn(bb8::Builder<M>) -> bb8::Builder<M> + Send + Sync>;

/// bb8's builder, kept so that every process builds its pool with the same settings; from
/// [`Pool::builder`]. Each setter is bb8's.
pub struct Builder<M: RecordsSockets> {
    settings: Vec<Setting<M>>,
    max_size: u32,
    _manager: PhantomData<fn() -> M>,
}

/// bb8's default `max_size`.
const BB8_DEFAULT_MAX_SIZE: u32 = 10;

impl<M: RecordsSockets> Pool<M> {
    /// A builder with bb8's defaults.
    pub fn builder() -> Builder<M> {
        Builder {
            settings: Vec::new(),
            max_size: BB8_DEFAULT_MAX_SIZE,
            _manager: PhantomData,
        }
    }

    /// Checks a connection out of this process's pool, as bb8's `get`. In a forked child the
    /// first call builds the child's pool on the current runtime.
    ///
    /// # Errors
    ///
    /// bb8's: a timeout, or the manager's error.
    pub async fn get(&self) -> Result<PooledConnection<'_, M>, RunError<M::Error>> {
        let (pool, epoch) = self.pools.current();
        let conn = pool.get().await?;
        Ok(PooledConnection {
            inner: self.pools.lease(conn, epoch),
        })
    }

    /// As [`get`](Pool::get), a connection that does not borrow the pool (bb8's `get_owned`).
    ///
    /// # Errors
    ///
    /// As [`get`](Pool::get).
    pub async fn get_owned(&self) -> Result<PooledConnection<'static, M>, RunError<M::Error>> {
        let (pool, epoch) = self.pools.current();
        let conn = pool.get_owned().await?;
        Ok(PooledConnection {
            inner: self.pools.lease(conn, epoch),
        })
    }

    /// A new connection outside the pool, as bb8's `dedicated_connection`. Its socket is
    /// released in a forked child like the pool's, but the connection itself is yours: do not
    /// carry it into a child.
    ///
    /// # Errors
    ///
    /// The manager's error.
    pub async fn dedicated_connection(&self) -> Result<M::Connection, M::Error> {
        self.pools.current().0.dedicated_connection().await
    }

    /// The state of this process's pool (bb8's `State`).
    ///
    /// # Panics
    ///
    /// In a forked child that has not used the pool yet, outside a tokio runtime (the child's
    /// pool is built here, and bb8 starts its tasks on the current runtime).
    pub fn state(&self) -> State {
        self.pools.current().0.state()
    }

    /// What this pool has seen of forks in this process.
    pub fn fork_stats(&self) -> ForkStats {
        self.pools.fork_stats()
    }
}

impl<M: RecordsSockets> Builder<M> {
    fn set(
        mut self,
        setting: impl Fn(bb8::Builder<M>) -> bb8::Builder<M> + Send + Sync + 'static,
    ) -> Self {
        self.settings.push(Box::new(setting));
        self
    }

    /// bb8's `max_size`.
    pub fn max_size(mut self, max_size: u32) -> Self {
        self.max_size = max_size;
        self.set(move |builder| builder.max_size(max_size))
    }

    /// bb8's `min_idle`.
    pub fn min_idle(self, min_idle: impl Into<Option<u32>>) -> Self {
        let min_idle = min_idle.into();
        self.set(move |builder| builder.min_idle(min_idle))
    }

    /// bb8's `test_on_check_out`.
    pub fn test_on_check_out(self, test: bool) -> Self {
        self.set(move |builder| builder.test_on_check_out(test))
    }

    /// bb8's `max_lifetime`.
    pub fn max_lifetime(self, max_lifetime: impl Into<Option<Duration>>) -> Self {
        let max_lifetime = max_lifetime.into();
        self.set(move |builder| builder.max_lifetime(max_lifetime))
    }

    /// bb8's `idle_timeout`.
    pub fn idle_timeout(self, idle_timeout: impl Into<Option<Duration>>) -> Self {
        let idle_timeout = idle_timeout.into();
        self.set(move |builder| builder.idle_timeout(idle_timeout))
    }

    /// bb8's `connection_timeout`.
    pub fn connection_timeout(self, timeout: Duration) -> Self {
        self.set(move |builder| builder.connection_timeout(timeout))
    }

    /// bb8's `retry_connection`.
    pub fn retry_connection(self, retry: bool) -> Self {
        self.set(move |builder| builder.retry_connection(retry))
    }

    /// bb8's `reaper_rate`.
    pub fn reaper_rate(self, rate: Duration) -> Self {
        self.set(move |builder| builder.reaper_rate(rate))
    }

    /// bb8's `queue_strategy`.
    pub fn queue_strategy(self, strategy: QueueStrategy) -> Self {
        self.set(move |builder| builder.queue_strategy(strategy))
    }

    /// bb8's `error_sink`; each process's pool gets a `boxed_clone` of it.
    pub fn error_sink(self, sink: Box<dyn ErrorSink<M::Error>>) -> Self {
        self.set(move |builder| builder.error_sink(sink.boxed_clone()))
    }

    fn bb8_builder(&self) -> bb8::Builder<M> {
        self.settings
            .iter()
            .fold(bb8::Pool::builder(), |builder, setting| setting(builder))
    }

    /// Builds this process's pool and opens its `min_idle` connections, as bb8's `build`.
    ///
    /// # Errors
    ///
    /// The manager's error if a connection cannot be opened.
    pub async fn build(self, manager: M) -> Result<Pool<M>, M::Error> {
        let counters = Arc::new(Counters::default());
        let descriptors =
            PoolPerProcess::<bb8::Pool<M>>::descriptor_table(self.max_size, &counters);
        let first = self
            .bb8_builder()
            .build(manager.recording_in(&sealed::Descriptors(Arc::clone(&descriptors))))
            .await?;
        Ok(self.into_pool(first, descriptors, counters, manager))
    }

    /// Builds this process's pool without opening a connection, as bb8's `build_unchecked`
    /// (which must run inside a tokio runtime).
    pub fn build_unchecked(self, manager: M) -> Pool<M> {
        let counters = Arc::new(Counters::default());
        let descriptors =
            PoolPerProcess::<bb8::Pool<M>>::descriptor_table(self.max_size, &counters);
        let first = self
            .bb8_builder()
            .build_unchecked(manager.recording_in(&sealed::Descriptors(Arc::clone(&descriptors))));
        self.into_pool(first, descriptors, counters, manager)
    }

    fn into_pool(
        self,
        first: bb8::Pool<M>,
        descriptors: Arc<DescriptorTable>,
        counters: Arc<Counters>,
        manager: M,
    ) -> Pool<M> {
        let max_size = self.max_size;
        let pools = PoolPerProcess::new(first, descriptors, counters, max_size, move |table| {
            self.bb8_builder()
                .build_unchecked(manager.recording_in(&sealed::Descriptors(Arc::clone(table))))
        });
        Pool {
            pools: Arc::new(pools),
        }
    }
}

impl<M: RecordsSockets> Clone for Pool<M> {
    fn clone(&self) -> Self {
        Pool {
            pools: Arc::clone(&self.pools),
        }
    }
}

impl<'a, M: RecordsSockets> std::ops::Deref for PooledConnection<'a, M> {
    type Target = M::Connection;

    #[inline]
    fn deref(&self) -> &M::Connection {
        &self.inner
    }
}

impl<'a, M: RecordsSockets> std::ops::DerefMut for PooledConnection<'a, M> {
    #[inline]
    fn deref_mut(&mut self) -> &mut M::Connection {
        &mut self.inner
    }
}

impl<M: RecordsSockets> fmt::Debug for Pool<M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pool")
            .field("fork_stats", &self.fork_stats())
            .finish_non_exhaustive()
    }
}

impl<M: RecordsSockets> fmt::Debug for PooledConnection<'_, M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PooledConnection")
            .field("inner", &self.inner)
            .finish()
    }
}

impl<M: RecordsSockets> fmt::Debug for Builder<M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Builder")
            .field("max_size", &self.max_size)
            .field("settings", &self.settings.len())
            .finish()
    }
}

impl<Tls> fmt::Debug for PostgresConnectionManager<Tls> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresConnectionManager")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}
