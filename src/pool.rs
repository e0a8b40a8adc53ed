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

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use r2d2::ManageConnection;
use scheduled_thread_pool::OnPoolDropBehavior;

use crate::config::{Builder, Config, OnFork};
use crate::connection::{Checkout, PooledConnection};
use crate::descriptors::DescriptorTable;
use crate::error_kind::{CROSSED_FORK_ON_FORK_FAIL, WARM_UP_SHORT};
use crate::fork::{current_epoch, Epoch, PerProcess, Read};
use crate::generation::{Generation, GenerationParts, Site};
use crate::generation_pool::GenerationPool;
use crate::r2d2_compat::{r2d2_error, r2d2_state};
use crate::stats::{Counters, ForkStats};
use crate::worker_threads::started_thread_pool;

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

    /// Waits until this process's pool holds its `min_idle` connections (all `max_size` when
    /// `min_idle` is `None`), at most `connection_timeout` — rebuilding it first in a forked
    /// child. Call it in a worker right after `fork()` (uWSGI's `@postfork`, a gunicorn
    /// `post_fork` hook) so the first request does not pay for connecting; or in the master
    /// after [`Builder::build_unchecked`].
    ///
    /// ```
    /// use diesel::r2d2::ConnectionManager;
    /// use diesel::SqliteConnection;
    ///
    /// let pool = forksafe_pool::Pool::builder()
    ///     .max_size(3)
    ///     .min_idle(Some(2))
    ///     .build_unchecked(ConnectionManager::<SqliteConnection>::new(":memory:"));
    /// pool.warm_up()?;
    /// assert!(pool.state().connections >= 2);
    /// # Ok::<(), forksafe_pool::Error>(())
    /// ```
    ///
    /// # Errors
    ///
    /// r2d2's "timed out waiting for connection" error, with the last connection error, when
    /// the connections could not be opened in time; with [`OnFork::Fail`](crate::OnFork::Fail),
    /// in a forked child, the error `get` returns there.
    pub fn warm_up(&self) -> Result<(), r2d2::Error> {
        let generation = self.generation();
        if let Some(refusal) = generation.pool.refusal() {
            return Err(refusal);
        }
        let config = &self.shared.config;
        let wanted = config.settings.min_idle_or_max_size();
        let timeout = config.settings.connection_timeout;
        let deadline = Instant::now() + timeout;
        let opened_too_few = |opened: u32| {
            r2d2_error(format!(
                "{WARM_UP_SHORT} {opened} of {wanted} connections within {timeout:?}"
            ))
        };
        if let GenerationPool::Own(pool) = &generation.pool {
            // r2d2's own error carries the last connection error; without one (connects still
            // running at the deadline), say how far the pool got.
            return pool
                .warm_up(deadline)
                .map_err(|(last_error, opened)| match last_error {
                    Some(error) => r2d2_error(error),
                    None => opened_too_few(opened),
                });
        }
        // r2d2's pool keeps trying on its own worker threads. The wait holds r2d2's pool, not
        // the generation (see `checkout_elsewhere`).
        let GenerationPool::R2d2(pool) = &generation.pool else {
            unreachable!("a generation is this crate's pool, r2d2's or a refusing one");
        };
        let pool = pool.clone();
        drop(generation);
        while pool.state().connections < wanted {
            if Instant::now() >= deadline {
                let opened = pool.state().connections;
                return Err(match pool.get_timeout(Duration::from_nanos(1)) {
                    Err(error) => error,
                    Ok(_) => opened_too_few(opened),
                });
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        Ok(())
    }

    /// Closes this process's idle connections now, and every checked-out one when it is
    /// returned; the pool opens new ones only when it is next used. Call it in a master right
    /// before forking workers (Unicorn's `before_fork`): the children then inherit no
    /// connection at all, so there is nothing for them to discard, and the master's database
    /// sessions end now instead of lingering as long as some child holds a copy of their
    /// sockets. Returns how many idle connections were closed.
    ///
    /// ```
    /// use diesel::r2d2::ConnectionManager;
    /// use diesel::SqliteConnection;
    ///
    /// let pool = forksafe_pool::Pool::builder()
    ///     .max_size(2)
    ///     .build(ConnectionManager::<SqliteConnection>::new(":memory:"))?;
    /// assert_eq!(pool.release_idle(), 2);
    /// // ... fork the workers here ...
    /// assert!(pool.get().is_ok(), "the master can still use it: it reconnects on demand");
    /// # Ok::<(), forksafe_pool::Error>(())
    /// ```
    ///
    /// How: the pool tells connections apart by the `release_idle` call they were opened
    /// after. Every connection opened, or still being opened, before this call is closed when
    /// it is returned or when its connect finishes — never pooled — so once the work in flight
    /// has ended the released connections are all closed; each close runs inside a driver
    /// section, so a concurrent `fork()` waits for it. Until the pool is next used (`get`,
    /// `try_get`, `warm_up`) nothing is opened in the background, so a released pool stays
    /// empty; a `get` already waiting goes on waiting, for a new connection. The pool stays the
    /// same object: a call leaves no memory and no background job behind, and old and new
    /// connections together stay within `max_size`. In a forked child of a pool built with
    /// [`OnFork::Fail`](crate::OnFork::Fail) it does nothing and returns 0.
    ///
    /// A pool with an event handler runs on r2d2 in the process that built it, and r2d2
    /// reopens `min_idle` connections as soon as any are closed. There this process's r2d2 pool
    /// (its *generation*) is retired instead, and the next use builds a new one. A retired
    /// generation opens no connection and closes every connection that comes back to it or
    /// whose connect ends after the call, and a job on its thread pool closes what r2d2 parks
    /// in its idle list until none of its connections is open. A forked child releases what
    /// every retired generation still holds. The generation is freed once no thread is still
    /// inside a call that reached it (a `get` waiting on it holds only r2d2's pool, which lives
    /// as long as that wait and the connections it hands out), and r2d2's pool is dropped with
    /// its last connection. Without a [`thread_pool`](Builder::thread_pool) of yours, each
    /// generation runs on three threads of its own, as r2d2 would give it, which end with its
    /// r2d2 pool, and with them r2d2's jobs for it (its reaper, its retries of the reconnects
    /// the retired generation refuses). So nothing of a retired generation outlives its
    /// connections, and `release_idle` may be called as often as needed; each call costs the
    /// next use a new r2d2 pool and three new threads. With a thread pool of yours, r2d2
    /// leaves its reaper job on it for each retired generation, as dropping any `r2d2::Pool`
    /// does: a job every 30 seconds that finds its pool gone, about half a kilobyte each (5 MiB
    /// after 10 000 calls), so there call it before forking rather than in a loop. A thread
    /// that was waiting in `get` on a retired generation waits out its timeout and then tries
    /// the new one.
    pub fn release_idle(&self) -> u32 {
        let Some(generation) = self.shared.generation.read() else {
            return 0;
        };
        let closed = match &generation.pool {
            GenerationPool::Own(pool) => pool.release_idle(),
            GenerationPool::R2d2(_) => {
                drop(generation);
                self.retire_r2d2_generation()
            }
            GenerationPool::Refusing(_) => return 0,
        };
        tracing::debug!(
            pid = std::process::id(),
            closed,
            "forksafe-pool: idle connections released; the pool reconnects on next use"
        );
        closed
    }

    /// `release_idle` for a pool on r2d2, which would open `min_idle` connections again at
    /// once: its generation is retired and the next use builds another.
    fn retire_r2d2_generation(&self) -> u32 {
        match self.shared.generation.retire() {
            Some(retired) => retired.retire(),
            None => 0,
        }
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

    /// This process's generation, rebuilding it first if the pool came across a fork or
    /// `release_idle` retired it. Keep it briefly: a retired generation is freed only once
    /// every such borrow of it has ended.
    #[inline]
    fn generation(&self) -> Read<'_, Generation<M>> {
        match self.shared.generation.read() {
            Some(found) => found,
            None => self.rebuild(),
        }
    }

    #[cold]
    #[inline(never)]
    fn rebuild(&self) -> Read<'_, Generation<M>> {
        let shared = &*self.shared;
        let rebuilt = shared.generation.read_or_try_init(|inherited| {
            let here = current_epoch();
            // False after `release_idle` in this same process: then nothing crossed a fork.
            let crossed_fork = shared
                .latest_generation_in
                .swap(here.get(), Ordering::AcqRel)
                != here.get();
            // A parent that released its pool before forking left no generation; what its
            // retired generations still held is in the building process's table.
            let inherited_descriptors = inherited
                .map(|inherited| &inherited.descriptors)
                .or(crossed_fork.then_some(&shared.building_descriptors));
            if let Some(inherited) = inherited_descriptors {
                let discarded = inherited.release_inherited();
                shared.counters.record_rebuild(discarded);
                tracing::info!(
                    pid = std::process::id(),
                    connections = discarded.connections,
                    sockets_released = discarded.sockets_released,
                    leaked = discarded.connections_unidentified,
                    "forksafe-pool: discarded inherited connections after fork"
                );
                if discarded.connections_unidentified > 0 {
                    // Once per pool and process: the next generation of this process inherits
                    // nothing.
                    warn_if_no_backend::<M>(&shared.config, discarded.connections_unidentified);
                }
            }
            let site = if here == shared.built_in {
                Site::BuildingProcess {
                    wait_for_min_idle: false,
                }
            } else if shared.config.on_fork == OnFork::Fail {
                Site::RefusingChild {
                    refusal: format!(
                        "{CROSSED_FORK_ON_FORK_FAIL} into process {} and was built with \
                         OnFork::Fail, so it is not rebuilt there; build the pool after fork(), or \
                         use OnFork::Rebuild",
                        std::process::id()
                    ),
                }
            } else {
                Site::ForkedChild
            };
            let descriptors = if here == shared.built_in {
                Arc::clone(&shared.building_descriptors)
            } else {
                DescriptorTable::new(
                    shared.config.settings.max_size,
                    Arc::clone(&shared.counters),
                )
            };
            let generation = Generation::build(GenerationParts {
                config: &shared.config,
                manager: Arc::clone(&shared.manager),
                descriptors,
                site,
                rebuilt_after_fork_in: crossed_fork.then(std::process::id),
            });
            tracing::debug!(
                pid = std::process::id(),
                "forksafe-pool: fork detected, pool rebuilt"
            );
            generation
        });
        match rebuilt {
            Ok(generation) => generation,
            Err(_) => unreachable!("building without waiting cannot fail"),
        }
    }
}

/// Says loudly, in a child that left `leaked` inherited connections open, when no backend
/// knows their type (a missing feature, another major version of the driver) and no
/// `descriptor_locator` was given: every worker then keeps the master's sessions open.
fn warn_if_no_backend<M: ManageConnection>(config: &Config<M>, leaked: u64) {
    let connection = std::any::TypeId::of::<M::Connection>();
    if config.descriptor_locator.is_some() || crate::backends::knows(connection) {
        return;
    }
    let type_name = std::any::type_name::<M::Connection>();
    let remedy = match crate::backends::feature_for(type_name) {
        Some(feature) => format!(
            "enable forksafe-pool's feature \"{feature}\" (for this major version of the driver), \
             or see Builder::descriptor_locator"
        ),
        None => "no backend knows this type; see Builder::descriptor_locator".to_string(),
    };
    tracing::warn!(
        pid = std::process::id(),
        connection_type = type_name,
        leaked,
        "forksafe-pool: {leaked} inherited connections of type {type_name} cannot be released in \
         this process and stay open (ForkStats::connections_leaked): {remedy}"
    );
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
