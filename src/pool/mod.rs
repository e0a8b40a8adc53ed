//! The pool: an inner pool per process, rebuilt lock-free in a forked child.
//!
//! A [`Pool`] points at one *generation*: an inner pool built in one process (its epoch) —
//! this crate's own (`process_pool`), or r2d2's for a pool with an event handler in the process
//! that built it. A forked child finds a generation from another epoch and, on first use,
//! builds a new one (see `generation`) from the saved configuration and swaps it in. The
//! inherited generation is never touched again — not its mutex, not its thread pool, not its
//! connections — and never dropped: dropping would run the drivers' goodbyes on sockets the
//! parent still uses, and the parent's locks may be frozen mid-use. Its sockets are pointed at
//! `/dev/null` instead (see `descriptors`).
//!
//! `mod.rs` holds the type, checkout and the getters; `rebuild.rs` finds or builds the calling
//! process's generation; `lifecycle.rs` the hooks around forks (`warm_up`, `release_idle`).

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use r2d2::ManageConnection;
use scheduled_thread_pool::OnPoolDropBehavior;

use crate::config::{Builder, Config};
use crate::connection::{Checkout, PooledConnection};
use crate::descriptors::DescriptorTable;
use crate::fork::{current_epoch, Epoch, PerProcess};
use crate::generation::{Generation, GenerationParts, Site};
use crate::generation_pool::GenerationPool;
use crate::r2d2_compat::r2d2_state;
use crate::stats::{Counters, ForkStats};
use crate::worker_threads::started_thread_pool;

mod lifecycle;
mod rebuild;

use rebuild::warn_if_no_backend;

/// A fork-safe, drop-in replacement for [`r2d2::Pool`].
///
/// Cloning is cheap and every clone shares the same connections, as with r2d2. Build it once
/// in a master process, warm it, fork: every worker gets a fresh pool of its own on first use,
/// and the master keeps its connections.
///
/// ```
/// # // `&mut conn` as a diesel connection needs the `diesel` feature.
/// # #[cfg(feature = "diesel")] {
/// use diesel::r2d2::ConnectionManager;
/// use diesel::{RunQueryDsl, SqliteConnection};
///
/// let pool = forksafe_pool::Pool::new(ConnectionManager::<SqliteConnection>::new(":memory:"))?;
/// let mut conn = pool.get()?;
/// diesel::sql_query("CREATE TABLE t (x INTEGER)").execute(&mut conn)?;
/// assert_eq!(pool.fork_stats().forks_crossed, 0);
/// # }
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
///
/// # Differences from r2d2
///
/// The process that builds the pool runs r2d2's rules (on std's locks, see the crate docs),
/// with r2d2's background work on the `thread_pool`: `build` waits for `min_idle`
/// connections, checkouts and closes that leave fewer than `min_idle` idle open more, failed
/// connects are retried after r2d2's back-off (200 ms doubling, at most half of
/// `connection_timeout`), and stale idle connections are reaped every 30 seconds. Where it
/// differs, it is on purpose:
///
/// - **A stale idle connection is not handed out.** One past `idle_timeout` or `max_lifetime`
///   is closed when a checkout finds it, and the checkout takes (or opens) another; r2d2 hands
///   it out until its reaper, every 30 seconds, closes it. Those limits exist because servers,
///   proxies and firewalls drop sessions left idle too long (MySQL's `wait_timeout`, a NAT's
///   idle timer), so r2d2 can hand out a connection that is already dead. The clock is read
///   only when one of the two is set.
/// - **A connection returned past `max_lifetime` is closed**, not put back: r2d2 keeps it idle
///   (and hands it out again) until its reaper runs. The lifetime is a limit the user chose (a
///   credential rotation, a load balancer that should rebalance), so it holds from the moment
///   it passes.
/// - **Failed connects are retried until `min_idle` is reached**, where r2d2 retries every
///   failed attempt until it succeeds — including one a `get` started and then stopped waiting
///   for. Both fill a pool whose server comes back without any `get` (one used only through
///   `try_get` too); with `min_idle` below `max_size` this pool does not open, after the
///   server returns, a connection nobody is waiting for.
/// - **A connect that panics frees its slot.** Its message becomes the error of the `get`
///   that waited for it ("timed out waiting for connection: forksafe-pool: connecting
///   panicked: …") and the pool retries after the back-off. In r2d2 the thread pool catches
///   the panic, but the attempt's slot stays taken for the pool's lifetime (a `max_size(1)`
///   pool never connects again) and `get` times out without a message.
/// - [`warm_up`](Self::warm_up), [`release_idle`](Self::release_idle) and
///   [`fork_stats`](Self::fork_stats) are this crate's own.
///
/// # In a forked child
///
/// A child's pool is r2d2's pool for the connections it opens itself: its `event_handler` gets
/// acquire, release, checkout, checkin and timeout events (never for an inherited
/// connection), `min_idle` is reached and kept in the background, failed connects are retried
/// after r2d2's back-off until it is, and idle connections past `idle_timeout` or
/// `max_lifetime` are closed every 30 seconds, as r2d2's reaper does.
///
/// - **It starts at the pool's first use in the child** (`get`, `try_get`, `state`,
///   `warm_up`, …), not at the fork: nothing may be started from inside a fork handler, and a
///   child that never uses the pool then costs nothing. A worker that wants its connections
///   before its first request touches the pool (or calls [`warm_up`](Self::warm_up), which also
///   waits for them) right after the fork.
/// - **It runs on threads of its own**, not on a `thread_pool` you passed (its threads are the
///   parent's): one long-lived thread per pool, which sleeps until the next reaper run or the
///   end of a back-off, and a short-lived thread per connection attempt, all made with
///   `pthread_create` directly (a std thread start in a child can block for ever on a lock the
///   fork froze). A pool dropped in the child ends its thread.
/// - **It is fork-safe itself**: a child that forks again leaves a grandchild that never
///   touches the child's pool and starts its own on first use.
/// # Behind PgBouncer
///
/// diesel's `PgConnection` and `postgres::Client` through PgBouncer work in session and in
/// transaction pooling mode, and a forked child releases its copies of the parent's sockets as
/// with a direct connection: PostgreSQL cannot name them then (it sees PgBouncer's socket), so
/// each connect is watched for the one socket that appears in this process while the driver
/// connects. Connects of these connections in one process take turns for that; a connect made
/// meanwhile outside this crate's pools makes the socket uncertain, and it is then left open in
/// the child and counted in [`ForkStats::connections_leaked`]. What the pool asks of a new
/// session leaves no prepared statement behind, in either mode.
///
/// In `pool_mode = transaction`, PgBouncer before 1.21 (Debian 12 ships 1.18) runs a client's
/// statements on whichever server connection is free, and does not carry named prepared
/// statements along. diesel caches its queries as named prepared statements per connection,
/// which then fail with errors such as "prepared statement \"__diesel_stmt_1\" already
/// exists" (or "does not exist"). Turn diesel's cache off on every new connection; diesel 2.3
/// then sends each query as one unnamed parse-bind-execute, which PgBouncer keeps on one server
/// connection:
///
/// ```
/// # #[cfg(feature = "diesel-postgres")] {
/// use diesel::connection::{CacheSize, Connection};
/// use diesel::r2d2::ConnectionManager;
/// use diesel::PgConnection;
///
/// #[derive(Debug)]
/// struct NoStatementCache;
///
/// impl forksafe_pool::CustomizeConnection<PgConnection, diesel::r2d2::Error> for NoStatementCache {
///     fn on_acquire(&self, conn: &mut PgConnection) -> Result<(), diesel::r2d2::Error> {
///         conn.set_prepared_statement_cache_size(CacheSize::Disabled);
///         Ok(())
///     }
/// }
///
/// let url = "postgres://app@127.0.0.1:6432/app";
/// let pool = forksafe_pool::Pool::builder()
///     .connection_customizer(Box::new(NoStatementCache))
///     .build_unchecked(ConnectionManager::<PgConnection>::new(url));
/// # drop(pool);
/// # }
/// ```
///
/// `postgres::Client` has no statement cache, but its `query`, `query_one` and `execute` with a
/// `&str` prepare a named statement in one round trip and run it in another, which PgBouncer
/// may send to different server connections. In that mode use `query_typed` (one unnamed
/// parse-bind-execute, with the parameters' types given) or `simple_query`.
///
/// Session state (`SET`, advisory locks, `LISTEN`, temporary tables) does not last past a
/// transaction in that mode; that is PgBouncer's rule.
pub struct Pool<M: ManageConnection> {
    shared: Arc<Shared<M>>,
}

struct Shared<M: ManageConnection> {
    config: Config<M>,
    /// The manager given to `build`, shared by every generation: managers are `Sync` and hold
    /// configuration (a URL), not connections, so a child can open its own with it.
    manager: Arc<M>,
    /// This process's generation; a forked child builds its own on first use.
    generation: PerProcess<Generation<M>>,
    counters: Arc<Counters>,
    /// The process that built the pool: with `OnFork::Fail`, every other process refuses.
    built_in: Epoch,
    /// The process that built the latest generation (inherited, so a child sees its parent's).
    latest_generation_in: AtomicU64,
    /// The descriptor table of every generation of the building process, retired ones
    /// included. A child releases it whatever generation it finds: one the parent retired
    /// may still hold connections (leased, or connecting when it was retired), and a parent
    /// that released its pool before forking leaves the child no generation at all.
    building_descriptors: Arc<DescriptorTable>,
}

impl<M: ManageConnection> Clone for Pool<M> {
    fn clone(&self) -> Self {
        Pool {
            shared: Arc::clone(&self.shared),
        }
    }
}

impl<M: ManageConnection> fmt::Debug for Pool<M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut out = f.debug_struct("Pool");
        out.field("max_size", &self.shared.config.settings.max_size)
            .field("fork_stats", &self.fork_stats());
        if let Some(generation) = self.shared.generation.read() {
            out.field("state", &generation.pool.state());
        }
        out.finish_non_exhaustive()
    }
}

impl<M: ManageConnection> Pool<M> {
    /// A pool with r2d2's default configuration, waiting for its connections like
    /// [`r2d2::Pool::new`].
    ///
    /// # Errors
    ///
    /// r2d2's error when the initial connections cannot be opened in `connection_timeout`.
    pub fn new(manager: M) -> Result<Pool<M>, r2d2::Error> {
        Pool::builder().build(manager)
    }
}

impl<M: ManageConnection> Pool<M> {
    /// A [`Builder`] with r2d2's defaults.
    pub fn builder() -> Builder<M> {
        Builder::new()
    }

    pub(crate) fn from_config(
        mut config: Config<M>,
        manager: M,
        wait: bool,
    ) -> Result<Pool<M>, r2d2::Error> {
        // r2d2's default, three threads, for this crate's pool in this process. A pool on r2d2
        // (one with an event handler) without a thread pool of the user's gives each of its
        // generations one of its own instead, which ends with it (see `generation`). None in a
        // process forked from one that started thread pools (see `worker_threads`).
        if config.thread_pool.is_none()
            && config.event_handler.is_none()
            && !crate::worker_threads::an_ancestor_started_thread_pools()
        {
            config.thread_pool = Some(Arc::new(started_thread_pool(
                OnPoolDropBehavior::CompletePendingScheduled,
            )));
        }
        let counters = Arc::new(Counters::default());
        let manager = Arc::new(manager);
        // On r2d2, retired generations' connections live beside the current one's, and
        // `release_idle` retires generations, which are freed once no thread reads them.
        let on_r2d2 = config.event_handler.is_some();
        let generations_at_once = if on_r2d2 { 2 } else { 1 };
        let building_descriptors = DescriptorTable::new(
            config.settings.max_size.saturating_mul(generations_at_once),
            Arc::clone(&counters),
        );
        let generation = Generation::build(GenerationParts {
            config: &config,
            manager: Arc::clone(&manager),
            descriptors: Arc::clone(&building_descriptors),
            site: Site::BuildingProcess {
                wait_for_min_idle: wait,
            },
            rebuilt_after_fork_in: None,
        })?;
        Ok(Pool {
            shared: Arc::new(Shared {
                config,
                manager,
                generation: if on_r2d2 {
                    PerProcess::new_retirable(generation)
                } else {
                    PerProcess::new(generation)
                },
                counters,
                built_in: current_epoch(),
                latest_generation_in: AtomicU64::new(current_epoch().get()),
                building_descriptors,
            }),
        })
    }

    /// Checks out a connection, waiting up to `connection_timeout`, like [`r2d2::Pool::get`].
    ///
    /// In a forked child the first call rebuilds the pool (see the crate docs) and so waits for
    /// a new connection, still no longer than `connection_timeout`.
    ///
    /// # Errors
    ///
    /// r2d2's "timed out waiting for connection" error, with the last connection error; after a
    /// fork it says that the pool was rebuilt in this process and why it could not connect.
    pub fn get(&self) -> Result<PooledConnection<M>, r2d2::Error> {
        self.checkout(self.shared.config.settings.connection_timeout)
    }

    /// Like [`get`](Self::get), waiting at most `timeout`.
    ///
    /// # Errors
    ///
    /// As for `get`.
    pub fn get_timeout(&self, timeout: Duration) -> Result<PooledConnection<M>, r2d2::Error> {
        self.checkout(timeout)
    }

    // Always inlined: behind a call, r2d2's ~120-byte guard would be copied once more on the
    // way out. The cold paths return a `Checkout`, not this function's `Result`, so that no
    // call is handed the return slot: the hot path stays a load, a branch and the inner pool's
    // checkout (benches/checkout.rs measures it against r2d2's).
    #[inline(always)]
    fn checkout(&self, timeout: Duration) -> Result<PooledConnection<M>, r2d2::Error> {
        // This crate's pool in a generation that is never retired, borrowed without counting;
        // everything else (a forked child's first use, a pool on r2d2, a refusing child) takes
        // the cold path.
        let found = self.shared.generation.get_with_epoch();
        let Some((GenerationPool::Own(pool), epoch)) =
            found.map(|(found, epoch)| (&found.pool, epoch))
        else {
            return self
                .checkout_elsewhere(timeout, true)
                .map(|(checkout, epoch)| PooledConnection::new(checkout, epoch));
        };
        pool.get_timeout(timeout)
            .map(|lease| PooledConnection::new(Checkout::Own(lease), epoch))
    }

    /// Every checkout but the hot path's: a forked child's first (which rebuilds the pool),
    /// one from r2d2's pool (a pool with an event handler, in the process that built it), and
    /// a refusing child's. Returns the checkout and the epoch of the generation it came from.
    /// `once_more`: after `release_idle` retired the generation it waited on, it waits once
    /// more, on the new one.
    #[cold]
    #[inline(never)]
    fn checkout_elsewhere(
        &self,
        timeout: Duration,
        once_more: bool,
    ) -> Result<(Checkout<M>, Epoch), r2d2::Error> {
        let generation = self.generation();
        let epoch = generation.epoch();
        let GenerationPool::R2d2(pool) = &generation.pool else {
            return generation
                .pool
                .get_timeout(timeout)
                .map(|checkout| (checkout, epoch));
        };
        // The wait can be long (up to `timeout`): it holds r2d2's pool, not the generation, so
        // that a generation `release_idle` retires meanwhile can be freed at once; r2d2's pool
        // lives on as long as this wait and the connections it hands out.
        let (pool, retired) = (pool.clone(), Arc::clone(generation.retired_flag()));
        drop(generation);
        match pool.get_timeout(timeout) {
            Ok(conn) => Ok((Checkout::R2d2(conn), epoch)),
            Err(_) if once_more && retired.load(Ordering::Acquire) => {
                drop(pool);
                self.checkout_elsewhere(timeout, false)
            }
            Err(error) => Err(error),
        }
    }

    /// Checks out an idle connection if there is one, without waiting, like
    /// [`r2d2::Pool::try_get`]. `None` in a forked child of a pool built with
    /// [`OnFork::Fail`](crate::OnFork::Fail).
    pub fn try_get(&self) -> Option<PooledConnection<M>> {
        let generation = self.generation();
        generation
            .pool
            .try_get()
            .map(|conn| PooledConnection::new(conn, generation.epoch()))
    }

    /// The connection counts of this process's pool, like [`r2d2::Pool::state`]. Reading them
    /// is no use of the pool: a pool with an event handler that [`release_idle`](Self::release_idle)
    /// emptied, and that has not been used since, reports no connections and opens none (the
    /// connections still checked out then are closed when they come back). In a forked child
    /// the first call rebuilds the pool, as the first `get` would.
    pub fn state(&self) -> r2d2::State {
        match self.shared.generation.read() {
            Some(generation) => generation.pool.state(),
            None if self.shared.latest_generation_in.load(Ordering::Acquire)
                == current_epoch().get() =>
            {
                r2d2_state(0, 0)
            }
            None => self.generation().pool.state(),
        }
    }

    /// What this pool has seen of forks.
    pub fn fork_stats(&self) -> ForkStats {
        self.shared.counters.snapshot()
    }

    /// The configured maximum number of connections.
    pub fn max_size(&self) -> u32 {
        self.shared.config.settings.max_size
    }

    /// The configured minimum number of idle connections (`None` means `max_size`).
    pub fn min_idle(&self) -> Option<u32> {
        self.shared.config.settings.min_idle
    }

    /// Whether connections are checked with `is_valid` before they are handed out.
    pub fn test_on_check_out(&self) -> bool {
        self.shared.config.settings.test_on_check_out
    }

    /// The configured maximum lifetime of a connection.
    pub fn max_lifetime(&self) -> Option<Duration> {
        self.shared.config.settings.max_lifetime
    }

    /// The configured idle timeout of a connection.
    pub fn idle_timeout(&self) -> Option<Duration> {
        self.shared.config.settings.idle_timeout
    }

    /// The configured time `get` waits for a connection.
    pub fn connection_timeout(&self) -> Duration {
        self.shared.config.settings.connection_timeout
    }
}

impl<M: ManageConnection> Drop for Shared<M> {
    /// A pool dropped in a child that never used it still lets go of the inherited sockets;
    /// `PerProcess` then leaks the inherited generation instead of dropping it.
    fn drop(&mut self) {
        if self.generation.read().is_some() {
            return;
        }
        let inherited = match self.generation.get_even_inherited() {
            Some(inherited) => &inherited.descriptors,
            // Released before the fork (see `building_descriptors`); in the building process
            // itself there is nothing inherited.
            None if current_epoch() != self.built_in => &self.building_descriptors,
            None => return,
        };
        let discarded = inherited.release_inherited();
        self.counters.record_rebuild(discarded);
        if discarded.connections_unidentified > 0 {
            warn_if_no_backend::<M>(&self.config, discarded.connections_unidentified);
        }
    }
}
