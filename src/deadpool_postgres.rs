//! A deadpool-postgres pool that is safe across `fork()`: the same `get().await`, a pool of its
//! own in every process.
//!
//! A `deadpool_postgres::Pool` built before a fork is useless in the child and harmful to the
//! parent: each pooled client's connection is a task of the parent's runtime (which does not
//! run in the child, so every query waits for ever), its socket is shared with the parent, and
//! returning or recycling an object goes through the parent's pool state. [`Pool`] keeps one
//! deadpool pool per process. In a forked child, the first [`get`](Pool::get) lets go of the
//! child's copies of the inherited connections' sockets (never writing a byte on them), then
//! builds the child's own deadpool pool from the same settings; the inherited pool and its
//! objects are never used, recycled, returned or dropped there. The parent's sessions are
//! untouched.
//!
//! ```no_run
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! // was: use deadpool_postgres::{Object, Pool};
//! use forksafe_pool::deadpool_postgres::{tokio_postgres, Object, Pool};
//!
//! let config: tokio_postgres::Config = "host=127.0.0.1 user=postgres dbname=test".parse()?;
//! let pool = Pool::builder(config, tokio_postgres::NoTls).max_size(8).build()?;
//!
//! let client: Object = pool.get().await?;
//! let row = client.query_one("SELECT $1::text", &[&"hello"]).await?;
//! assert_eq!(row.get::<_, String>(0), "hello");
//! # Ok(())
//! # }
//! ```
//!
//! Use it from a runtime of the calling process — a [`Runtime`](crate::Runtime), or one the
//! process built after the fork: the child's pool starts its connections' tasks on the runtime
//! that polls `get`. A pool built with a `deadpool_postgres::Config` is
//! [`Pool::from_config`] (what `Config::create_pool` was).
//!
//! Differences from deadpool-postgres:
//! - [`Object`] is this module's guard. It dereferences to `deadpool_postgres::Object` (so to
//!   `ClientWrapper` and `tokio_postgres::Client`, with `prepare_cached`), and `&object`
//!   coerces where a `&deadpool_postgres::Client` is expected. One checked out before a fork
//!   panics if the child uses it, and dropping it in the child forgets it.
//! - The connection is opened over TCP by this crate and handed to tokio-postgres
//!   (`Config::connect_raw`), so that its socket is known: Unix-socket hosts, `hostaddr` and
//!   `target_session_attrs` are not supported, and `cancel_token().cancel_query` is not
//!   available (`cancel_query_raw` is). TLS is whatever [`MakeTls`] you pass (`NoTls`,
//!   postgres-openssl, postgres-native-tls), as `sslmode` says.
//! - Not offered: deadpool's hooks (`post_create`, `pre_recycle`, `post_recycle`), and the
//!   pool's `resize`, `retain`, `weak` and `manager` (each process's pool is rebuilt from the
//!   builder's settings, which they would change in one process only). `Object::take` is
//!   [`Object::take`]; `deadpool_postgres::Object::metrics(&object)` works through `Deref`.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, PoolConfig, QueueMode, Runtime, Timeouts};
use tokio::task::JoinHandle;

use crate::async_pool::postgres_connect::{self, ConnectionTask};
use crate::async_pool::{Leased, PoolPerProcess};
use crate::descriptors::DescriptorTable;
use crate::stats::{Counters, ForkStats};

pub use crate::async_pool::postgres_connect::MakeTls;
pub use deadpool_postgres::tokio_postgres;
pub use deadpool_postgres::{
    BuildError, ConfigError, CreatePoolError, PoolError, RecyclingMethod, Status,
};

/// A deadpool-postgres pool per process; see the [module docs](self). A cheap `Clone`.
#[derive(Clone)]
pub struct Pool {
    pools: Arc<PoolPerProcess<deadpool_postgres::Pool>>,
}

/// A client checked out of a [`Pool`]; dereferences to `deadpool_postgres::Object`, and goes
/// back to the pool when dropped (in the process that checked it out; see the
/// [module docs](self)).
pub struct Object {
    inner: Leased<deadpool_postgres::Object>,
}

/// deadpool-postgres's name for the guard, kept for code that uses it.
pub type Client = Object;

/// Settings of a [`Pool`], the same in every process; from [`Pool::builder`].
pub struct PoolBuilder {
    pg_config: tokio_postgres::Config,
    connect: Arc<dyn MakeManager>,
    pool_config: PoolConfig,
    manager_config: ManagerConfig,
}

/// Makes a generation's manager, whose connects record their sockets in that generation's
/// table.
trait MakeManager: Send + Sync {
    fn manager(
        &self,
        pg_config: &tokio_postgres::Config,
        manager_config: &ManagerConfig,
        descriptors: &Arc<DescriptorTable>,
    ) -> Manager;
}

struct RecordingConnect<T> {
    tls: T,
    descriptors: Arc<DescriptorTable>,
}

struct WithTls<T>(T);

impl<T: MakeTls> MakeManager for WithTls<T> {
    fn manager(
        &self,
        pg_config: &tokio_postgres::Config,
        manager_config: &ManagerConfig,
        descriptors: &Arc<DescriptorTable>,
    ) -> Manager {
        let connect = RecordingConnect {
            tls: self.0.clone(),
            descriptors: Arc::clone(descriptors),
        };
        Manager::from_connect(pg_config.clone(), connect, manager_config.clone())
    }
}

impl<T: MakeTls> deadpool_postgres::Connect for RecordingConnect<T> {
    fn connect(
        &self,
        pg_config: &tokio_postgres::Config,
    ) -> std::pin::Pin<
        Box<
            dyn std::future::Future<
                    Output = Result<
                        (tokio_postgres::Client, JoinHandle<()>),
                        tokio_postgres::Error,
                    >,
                > + Send
                + '_,
        >,
    > {
        let pg_config = pg_config.clone();
        Box::pin(async move {
            let (client, task): (_, ConnectionTask) =
                postgres_connect::connect(&pg_config, &self.tls, &self.descriptors).await?;
            Ok((client, tokio::spawn(task)))
        })
    }
}

impl Pool {
    /// Settings for a pool of connections to `pg_config`, over `tls` (`tokio_postgres::NoTls`,
    /// or a postgres-openssl or postgres-native-tls connector), starting from deadpool's
    /// defaults (`PoolConfig::default()`: no timeouts).
    pub fn builder<T: MakeTls>(pg_config: tokio_postgres::Config, tls: T) -> PoolBuilder {
        PoolBuilder {
            pg_config,
            connect: Arc::new(WithTls(tls)),
            pool_config: PoolConfig::default(),
            manager_config: ManagerConfig::default(),
        }
    }

    /// The pool a `deadpool_postgres::Config` describes (what `config.create_pool(..)` builds),
    /// with tokio for its timeouts.
    ///
    /// # Errors
    ///
    /// As `Config::create_pool`: the configuration is invalid, or the pool cannot be built.
    pub fn from_config<T: MakeTls>(
        config: &deadpool_postgres::Config,
        tls: T,
    ) -> Result<Pool, CreatePoolError> {
        let pg_config = config.get_pg_config().map_err(CreatePoolError::Config)?;
        let mut builder = Pool::builder(pg_config, tls);
        builder.pool_config = config.get_pool_config();
        builder.manager_config = config.get_manager_config();
        builder.build().map_err(CreatePoolError::Build)
    }

    /// Checks a client out of this process's pool, waiting as deadpool does (at most the wait
    /// timeout, if one was set). In a forked child the first call builds the child's pool.
    ///
    /// # Errors
    ///
    /// deadpool's: a timeout, a failed connect or recycle, a closed pool.
    pub async fn get(&self) -> Result<Object, PoolError> {
        let (pool, epoch) = self.pools.current();
        let object = pool.get().await?;
        Ok(Object {
            inner: self.pools.lease(object, epoch),
        })
    }

    /// As [`get`](Pool::get), with these timeouts instead of the pool's.
    ///
    /// # Errors
    ///
    /// As [`get`](Pool::get).
    pub async fn timeout_get(&self, timeouts: &Timeouts) -> Result<Object, PoolError> {
        let (pool, epoch) = self.pools.current();
        let object = pool.timeout_get(timeouts).await?;
        Ok(Object {
            inner: self.pools.lease(object, epoch),
        })
    }

    /// The state of this process's pool (deadpool's `Status`).
    pub fn status(&self) -> Status {
        self.pools.current().0.status()
    }

    /// Closes this process's pool, as deadpool's `close`: waiting `get`s fail, idle clients are
    /// dropped. A child forked later builds a pool of its own as usual.
    pub fn close(&self) {
        self.pools.current().0.close();
    }

    /// What this pool has seen of forks in this process.
    pub fn fork_stats(&self) -> ForkStats {
        self.pools.fork_stats()
    }
}

impl PoolBuilder {
    /// The most clients open at once (deadpool's `max_size`).
    pub fn max_size(mut self, max_size: usize) -> Self {
        self.pool_config.max_size = max_size;
        self
    }

    /// How long a `get` waits for a free client; `None` waits as long as it takes.
    pub fn wait_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.pool_config.timeouts.wait = timeout;
        self
    }

    /// How long opening a connection may take.
    pub fn create_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.pool_config.timeouts.create = timeout;
        self
    }

    /// How long recycling a client may take.
    pub fn recycle_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.pool_config.timeouts.recycle = timeout;
        self
    }

    /// Which free client a `get` takes first.
    pub fn queue_mode(mut self, queue_mode: QueueMode) -> Self {
        self.pool_config.queue_mode = queue_mode;
        self
    }

    /// How a client is checked before it is handed out again.
    pub fn recycling_method(mut self, method: RecyclingMethod) -> Self {
        self.manager_config.recycling_method = method;
        self
    }

    /// Builds the pool of this process (no connection is opened until a `get` needs one).
    ///
    /// # Errors
    ///
    /// deadpool's `BuildError`.
    pub fn build(self) -> Result<Pool, BuildError> {
        let counters = Arc::new(Counters::default());
        let max_size = u32::try_from(self.pool_config.max_size).unwrap_or(u32::MAX);
        let descriptors =
            PoolPerProcess::<deadpool_postgres::Pool>::descriptor_table(max_size, &counters);
        let settings = Arc::new(self);
        let first = settings.pool(&descriptors)?;
        let pools = PoolPerProcess::new(first, descriptors, counters, max_size, move |table| {
            // The same settings built once already; they cannot fail now.
            match settings.pool(table) {
                Ok(pool) => pool,
                Err(error) => unreachable!("settings that built a pool once failed: {error}"),
            }
        });
        Ok(Pool {
            pools: Arc::new(pools),
        })
    }

    fn pool(
        &self,
        descriptors: &Arc<DescriptorTable>,
    ) -> Result<deadpool_postgres::Pool, BuildError> {
        let manager = self
            .connect
            .manager(&self.pg_config, &self.manager_config, descriptors);
        deadpool_postgres::Pool::builder(manager)
            .config(self.pool_config)
            .runtime(Runtime::Tokio1)
            .build()
    }
}

impl Object {
    /// Takes the client out of the pool for good, as deadpool's `Object::take`: the pool opens
    /// another in its place, and the client is closed when dropped.
    ///
    /// # Panics
    ///
    /// In a forked child, for a client checked out before the fork (it is the parent's).
    pub fn take(this: Self) -> deadpool_postgres::ClientWrapper {
        deadpool_postgres::Object::take(this.inner.into_inner())
    }
}

impl std::ops::Deref for Object {
    type Target = deadpool_postgres::Object;

    #[inline]
    fn deref(&self) -> &deadpool_postgres::Object {
        &self.inner
    }
}

impl std::ops::DerefMut for Object {
    #[inline]
    fn deref_mut(&mut self) -> &mut deadpool_postgres::Object {
        &mut self.inner
    }
}

impl fmt::Debug for Pool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pool")
            .field("fork_stats", &self.fork_stats())
            .finish_non_exhaustive()
    }
}

impl fmt::Debug for Object {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Object")
            .field("inner", &self.inner)
            .finish()
    }
}

impl fmt::Debug for PoolBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PoolBuilder")
            .field("pg_config", &self.pg_config)
            .field("pool_config", &self.pool_config)
            .field("manager_config", &self.manager_config)
            .finish_non_exhaustive()
    }
}
