//! `GuardedPool`: fork protection for a plain `r2d2::Pool` that a library receives.
//!
//! A library handed an `r2d2::Pool` cannot rebuild it after a fork: r2d2 gives back neither
//! the manager nor the configuration. What it can do is never touch the inherited pool in a
//! forked child, and then either rebuild through a closure the application supplied or fail
//! with an error that says what happened.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use r2d2::ManageConnection;

use crate::error_kind::CROSSED_FORK_GUARDED;
use crate::fork::PerProcess;
use crate::r2d2_compat::{r2d2_error, r2d2_state};

/// Makes a new r2d2 pool in a forked child.
type Rebuild<M> = Box<dyn Fn() -> Result<r2d2::Pool<M>, r2d2::Error> + Send + Sync>;

/// A plain [`r2d2::Pool`] guarded against `fork()`: in the process that wrapped it, it is that
/// pool; in a forked child it never touches it.
///
/// For a library that is given an `r2d2::Pool` it did not build. In a forked child the
/// inherited pool's sockets are shared with the parent and its locks and worker threads are
/// the parent's, so a `GuardedPool` leaves it alone there (never locks it, never drops it) and
/// does one of two things on the child's first use:
///
/// * with a rebuild closure ([`rebuild_with`](GuardedPool::rebuild_with)), supplied by the
///   application, which knows the manager and the configuration, it builds the child's own
///   pool and carries on;
/// * without one ([`new`](GuardedPool::new) alone), every `get` fails at once with an
///   `r2d2::Error` whose message says the pool crossed `fork()` and how to fix that.
///
/// ```
/// use diesel::r2d2::{ConnectionManager, Pool};
/// use diesel::SqliteConnection;
/// use forksafe_pool::GuardedPool;
///
/// // The application builds a plain r2d2 pool and knows how to build another one...
/// let build = || Pool::builder().max_size(2).build(ConnectionManager::<SqliteConnection>::new(":memory:"));
///
/// // ...and hands the library a guarded pool, with the recipe for a forked child.
/// let guarded = GuardedPool::new(build()?).rebuild_with(build);
///
/// // The library uses it like the r2d2 pool: same guard, same error type.
/// let mut conn: r2d2::PooledConnection<ConnectionManager<SqliteConnection>> = guarded.get()?;
/// diesel::connection::SimpleConnection::batch_execute(&mut conn, "SELECT 1")?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
///
/// # Trade-offs
///
/// * **Errors stay `r2d2::Error`**, so a library's existing `?` conversions keep working. The
///   only message an `r2d2::Error` can carry follows r2d2's fixed prefix, so the "crossed fork"
///   error reads `timed out waiting for connection: forksafe-pool: ...` — but it is returned
///   at once, without waiting for any timeout and without running any r2d2 code in the child.
/// * **Connections are r2d2's own guard** ([`r2d2::PooledConnection`]), so code written for
///   the r2d2 pool — diesel's `&mut conn` included — compiles unchanged. The price: a
///   connection *checked out before* the fork and dropped in the child goes back through the
///   parent's pool, as it would without this wrapper. Don't hold connections across `fork()`
///   (a pre-forking master forks between requests, so it doesn't); [`Pool`](crate::Pool)'s own
///   guard protects that case too.
/// * **Inherited sockets stay open in the child.** The wrapper knows nothing about the
///   connections inside the received pool, so unlike [`Pool`](crate::Pool) it cannot point
///   their sockets at `/dev/null`; the parent's server sessions then end only when the parent
///   and every child have exited. Nothing is ever written on them by the child.
/// * **The rebuilt pool is an r2d2 pool**, built and run in the forked child. r2d2 parks its
///   threads on parking_lot, whose process-global table a fork can leave inconsistent (see the
///   crate docs, "How it works"); [`Pool`](crate::Pool) runs children on std primitives for
///   that reason. A `GuardedPool` is the safe way to *not* use a received pool after a fork;
///   for the strongest guarantees, have the application hand the library a
///   [`Pool`](crate::Pool) instead.
/// * **Wrap the pool in the process that built it.** The wrapper takes the process that calls
///   `new` as the owner: a pool built before a fork and wrapped in the child would look like
///   the child's own.
pub struct GuardedPool<M: ManageConnection> {
    shared: Arc<Shared<M>>,
}

struct Shared<M: ManageConnection> {
    /// The received pool, owned by the process that wrapped it; a rebuilt one in a child.
    pools: PerProcess<r2d2::Pool<M>>,
    rebuild: Option<Rebuild<M>>,
    /// The process that wrapped the received pool, for the error message.
    wrapped_in: u32,
}

impl<M: ManageConnection> GuardedPool<M> {
    /// Guards `pool`, which belongs to the calling process. Without a rebuild closure, any use
    /// in a forked child fails with an error saying the pool crossed `fork()`.
    ///
    /// ```
    /// use diesel::r2d2::{ConnectionManager, Pool};
    /// use diesel::SqliteConnection;
    /// use forksafe_pool::GuardedPool;
    ///
    /// let pool = Pool::new(ConnectionManager::<SqliteConnection>::new(":memory:"))?;
    /// let guarded = GuardedPool::new(pool);
    /// assert!(guarded.get().is_ok());
    /// # Ok::<(), r2d2::Error>(())
    /// ```
    pub fn new(pool: r2d2::Pool<M>) -> GuardedPool<M> {
        GuardedPool {
            shared: Arc::new(Shared {
                pools: PerProcess::new(pool),
                rebuild: None,
                wrapped_in: std::process::id(),
            }),
        }
    }

    /// Sets how a forked child makes its own pool: `rebuild` runs on the child's first use and
    /// again on later uses until it succeeds; its error is what `get` returns meanwhile.
    /// Returning `r2d2::Builder::build(..)` makes that first use wait for the new pool's
    /// `min_idle` connections; `build_unchecked` lets `get` wait for just one.
    ///
    /// The closure builds and runs an r2d2 pool in the forked child, on parking_lot, whose
    /// process-global state a fork can leave inconsistent: docs/parking-lot.md measures a child
    /// that builds, uses and drops such a pool hanging now and then (4 of 60, with no database
    /// at all). So this is a fallback for a library that can only receive an `r2d2::Pool`; a
    /// [`Pool`](crate::Pool) runs its children on std primitives instead. (The example does not
    /// fork for that reason: a test that forks through it could hang.)
    ///
    /// ```
    /// use diesel::r2d2::{ConnectionManager, Pool};
    /// use diesel::SqliteConnection;
    /// use forksafe_pool::GuardedPool;
    ///
    /// let url = String::from(":memory:");
    /// let manager = move || ConnectionManager::<SqliteConnection>::new(url.clone());
    /// let guarded = GuardedPool::new(Pool::builder().build(manager())?)
    ///     .rebuild_with(move || Ok(Pool::builder().build_unchecked(manager())));
    /// assert!(guarded.can_rebuild());
    /// # Ok::<(), r2d2::Error>(())
    /// ```
    ///
    /// # Panics
    ///
    /// If this `GuardedPool` has already been cloned: set the closure right after `new`.
    pub fn rebuild_with<F>(mut self, rebuild: F) -> GuardedPool<M>
    where
        F: Fn() -> Result<r2d2::Pool<M>, r2d2::Error> + Send + Sync + 'static,
    {
        match Arc::get_mut(&mut self.shared) {
            Some(shared) => shared.rebuild = Some(Box::new(rebuild)),
            None => {
                panic!("GuardedPool::rebuild_with must be called before the GuardedPool is cloned")
            }
        }
        self
    }

    /// Whether a forked child can rebuild this pool (a rebuild closure was given).
    pub fn can_rebuild(&self) -> bool {
        self.shared.rebuild.is_some()
    }

    /// Checks out a connection, like [`r2d2::Pool::get`]. In a forked child the first call
    /// rebuilds the pool, or fails if there is no rebuild closure.
    ///
    /// # Errors
    ///
    /// r2d2's own error from this process's pool; in a forked child, the rebuild closure's
    /// error, or — without a closure — an error saying the pool crossed `fork()`.
    pub fn get(&self) -> Result<r2d2::PooledConnection<M>, r2d2::Error> {
        self.pool()?.get()
    }

    /// Like [`get`](Self::get), waiting at most `timeout`, like [`r2d2::Pool::get_timeout`].
    ///
    /// # Errors
    ///
    /// As for `get`.
    pub fn get_timeout(&self, timeout: Duration) -> Result<r2d2::PooledConnection<M>, r2d2::Error> {
        self.pool()?.get_timeout(timeout)
    }

    /// An idle connection if there is one, without waiting, like [`r2d2::Pool::try_get`];
    /// `None` in a forked child that cannot (yet) rebuild.
    pub fn try_get(&self) -> Option<r2d2::PooledConnection<M>> {
        self.pool().ok()?.try_get()
    }

    /// The connection counts of this process's pool, like [`r2d2::Pool::state`]; all zero in
    /// a forked child that has not rebuilt (the inherited pool is not looked at).
    pub fn state(&self) -> r2d2::State {
        match self.shared.pools.get() {
            Some(pool) => pool.state(),
            None => r2d2_state(0, 0),
        }
    }

    /// This process's r2d2 pool: the wrapped one in the process that wrapped it, the rebuilt
    /// one in a forked child (rebuilding it on first use).
    ///
    /// ```
    /// use diesel::r2d2::{ConnectionManager, Pool};
    /// use diesel::SqliteConnection;
    ///
    /// let pool = Pool::builder().max_size(3).build(ConnectionManager::<SqliteConnection>::new(":memory:"))?;
    /// let guarded = forksafe_pool::GuardedPool::new(pool);
    /// assert_eq!(guarded.pool()?.max_size(), 3);
    /// # Ok::<(), r2d2::Error>(())
    /// ```
    ///
    /// # Errors
    ///
    /// In a forked child, as for [`get`](Self::get).
    #[inline]
    pub fn pool(&self) -> Result<&r2d2::Pool<M>, r2d2::Error> {
        match self.shared.pools.get() {
            Some(pool) => Ok(pool),
            None => self.pool_after_fork(),
        }
    }

    #[cold]
    #[inline(never)]
    fn pool_after_fork(&self) -> Result<&r2d2::Pool<M>, r2d2::Error> {
        let shared = &*self.shared;
        match &shared.rebuild {
            // The inherited pool is handed to the closure by `PerProcess` and ignored here.
            Some(rebuild) => shared.pools.get_or_try_init(|_inherited| {
                let rebuilt = rebuild();
                match &rebuilt {
                    Ok(_) => tracing::debug!(pid = std::process::id(), "forksafe-pool: guarded r2d2 pool rebuilt after fork"),
                    Err(error) => tracing::warn!(pid = std::process::id(), %error, "forksafe-pool: rebuilding a guarded r2d2 pool after fork failed"),
                }
                rebuilt
            }),
            None => Err(r2d2_error(format!(
                "{CROSSED_FORK_GUARDED} {} and crossed fork() into process {}, \
                 where it must not be used (its sockets and locks are the parent's); give the GuardedPool \
                 a rebuild closure with GuardedPool::rebuild_with, or build the pool after fork()",
                shared.wrapped_in,
                std::process::id()
            ))),
        }
    }
}

impl<M: ManageConnection> From<r2d2::Pool<M>> for GuardedPool<M> {
    /// Same as [`GuardedPool::new`]: no rebuild closure.
    fn from(pool: r2d2::Pool<M>) -> Self {
        GuardedPool::new(pool)
    }
}

impl<M: ManageConnection> Clone for GuardedPool<M> {
    /// Cheap; every clone shares the same pool (and the same rebuilt pool in a child).
    fn clone(&self) -> Self {
        GuardedPool {
            shared: Arc::clone(&self.shared),
        }
    }
}

impl<M: ManageConnection> fmt::Debug for GuardedPool<M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut out = f.debug_struct("GuardedPool");
        out.field("wrapped_in", &self.shared.wrapped_in)
            .field("can_rebuild", &self.can_rebuild());
        match self.shared.pools.get() {
            Some(pool) => out.field("state", &pool.state()),
            None => out.field("state", &"<crossed fork(), not rebuilt in this process>"),
        };
        out.finish()
    }
}
