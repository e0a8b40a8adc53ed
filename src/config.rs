//! The pool builder: every r2d2 `Builder` setter, with r2d2's defaults and panics.
//!
//! The crate's one import circle starts here, as in r2d2's `config.rs`: `Builder::build` makes
//! a `Pool`, and everything that makes a pool reads this module's `Config`.

use std::fmt;
use std::marker::PhantomData;
use std::os::fd::RawFd;
use std::sync::Arc;
use std::time::Duration;

use r2d2::{
    CustomizeConnection, HandleError, HandleEvent, LoggingErrorHandler, ManageConnection,
    NopConnectionCustomizer,
};
use scheduled_thread_pool::ScheduledThreadPool;

use crate::manager::Locator;
use crate::pool::Pool;

/// A builder for a [`Pool`], setter for setter the same as [`r2d2::Builder`].
///
/// ```
/// use diesel::r2d2::ConnectionManager;
/// use diesel::SqliteConnection;
/// use std::time::Duration;
///
/// let pool = forksafe_pool::Pool::builder()
///     .max_size(4)
///     .min_idle(Some(1))
///     .connection_timeout(Duration::from_secs(5))
///     .build(ConnectionManager::<SqliteConnection>::new(":memory:"))?;
/// assert_eq!(pool.max_size(), 4);
/// assert_eq!(pool.min_idle(), Some(1));
/// # Ok::<(), forksafe_pool::Error>(())
/// ```
#[must_use = "a builder does nothing until `build` is called"]
pub struct Builder<M: ManageConnection> {
    config: Config<M>,
    _manager: PhantomData<M>,
}

/// The checkout rules both inner pools follow: r2d2's in the building process, the child pool
/// in a forked one.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Settings {
    pub(crate) max_size: u32,
    pub(crate) min_idle: Option<u32>,
    pub(crate) test_on_check_out: bool,
    pub(crate) max_lifetime: Option<Duration>,
    pub(crate) idle_timeout: Option<Duration>,
    pub(crate) connection_timeout: Duration,
}

impl Settings {
    /// The connections a pool keeps idle, as r2d2 reads `min_idle`: all `max_size` when it is
    /// `None`.
    pub(crate) fn min_idle_or_max_size(&self) -> u32 {
        self.min_idle.unwrap_or(self.max_size)
    }
}

/// Everything needed to build — and, in a forked child, rebuild — the inner pool.
pub(crate) struct Config<M: ManageConnection> {
    pub(crate) settings: Settings,
    pub(crate) error_handler: Arc<dyn HandleError<M::Error>>,
    /// The user's handler: with one, the building process runs on r2d2, the only maker of
    /// r2d2's events (see `Builder::event_handler`).
    pub(crate) event_handler: Option<Arc<dyn HandleEvent>>,
    pub(crate) connection_customizer: Arc<dyn CustomizeConnection<M::Connection, M::Error>>,
    /// Where the building process opens connections and reaps old ones (a forked child's
    /// pool does that on threads of its own, see `process_pool::upkeep`).
    pub(crate) thread_pool: Option<Arc<ScheduledThreadPool>>,
    pub(crate) descriptor_locator: Option<Locator<M::Connection>>,
    pub(crate) on_fork: OnFork,
    /// How often idle connections are checked against `idle_timeout` and `max_lifetime`:
    /// r2d2's 30 s, shorter only in tests (`Builder::reaper_rate_for_tests`).
    pub(crate) reaper_rate: Duration,
}

/// What a [`Pool`] does when it is first used in a forked child; see [`Builder::on_fork`].
///
/// ```
/// use forksafe_pool::OnFork;
///
/// assert_eq!(OnFork::default(), OnFork::Rebuild);
/// ```
#[non_exhaustive]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum OnFork {
    /// Build the child's own pool from the saved configuration, transparently.
    #[default]
    Rebuild,
    /// Refuse: every `get` in the child fails at once with an `r2d2::Error` saying the pool
    /// crossed `fork()`. The inherited connections are still never used, and their sockets are
    /// still let go of.
    Fail,
}

impl<M: ManageConnection> Default for Builder<M> {
    /// r2d2's defaults: 10 connections, `min_idle` equal to `max_size`, a `SELECT 1`-style
    /// check on checkout, 30 minute lifetime, 10 minute idle timeout, 30 second wait, errors
    /// logged, no events, no customizer, three worker threads per pool.
    fn default() -> Self {
        Builder {
            config: Config {
                settings: Settings {
                    max_size: 10,
                    min_idle: None,
                    test_on_check_out: true,
                    max_lifetime: Some(Duration::from_secs(30 * 60)),
                    idle_timeout: Some(Duration::from_secs(10 * 60)),
                    connection_timeout: Duration::from_secs(30),
                },
                error_handler: Arc::new(LoggingErrorHandler),
                event_handler: None,
                connection_customizer: Arc::new(NopConnectionCustomizer),
                thread_pool: None,
                descriptor_locator: None,
                on_fork: OnFork::Rebuild,
                reaper_rate: crate::process_pool::REAPER_RATE,
            },
            _manager: PhantomData,
        }
    }
}

impl<M: ManageConnection> fmt::Debug for Builder<M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Builder")
            .field("max_size", &self.config.settings.max_size)
            .field("min_idle", &self.config.settings.min_idle)
            .field("test_on_check_out", &self.config.settings.test_on_check_out)
            .field("max_lifetime", &self.config.settings.max_lifetime)
            .field("idle_timeout", &self.config.settings.idle_timeout)
            .field(
                "connection_timeout",
                &self.config.settings.connection_timeout,
            )
            .field("on_fork", &self.config.on_fork)
            .finish_non_exhaustive()
    }
}

impl<M: ManageConnection> Builder<M> {
    /// A builder with r2d2's defaults.
    pub fn new() -> Self {
        Builder::default()
    }

    /// The most connections the pool keeps open at once.
    ///
    /// Defaults to 10.
    ///
    /// # Panics
    ///
    /// Panics if `max_size` is 0, with r2d2's message "max_size must be positive".
    pub fn max_size(mut self, max_size: u32) -> Self {
        assert!(max_size > 0, "max_size must be positive");
        self.config.settings.max_size = max_size;
        self
    }

    /// The fewest idle connections the pool tries to keep; `None` means `max_size`.
    ///
    /// Defaults to `None`.
    pub fn min_idle(mut self, min_idle: Option<u32>) -> Self {
        self.config.settings.min_idle = min_idle;
        self
    }

    /// Whether `is_valid` is called on a connection before it is handed out.
    ///
    /// Defaults to `true`. (A ping is not fork protection: it succeeds happily on a socket
    /// shared with another process. This crate never pings inherited connections.)
    pub fn test_on_check_out(mut self, test_on_check_out: bool) -> Self {
        self.config.settings.test_on_check_out = test_on_check_out;
        self
    }

    /// How long a connection may live before it is closed; `None` means forever.
    ///
    /// Defaults to 30 minutes.
    ///
    /// # Panics
    ///
    /// Panics on `Some(Duration::ZERO)`, with r2d2's message "max_lifetime must be positive".
    pub fn max_lifetime(mut self, max_lifetime: Option<Duration>) -> Self {
        assert_ne!(
            max_lifetime,
            Some(Duration::from_secs(0)),
            "max_lifetime must be positive"
        );
        self.config.settings.max_lifetime = max_lifetime;
        self
    }

    /// How long a connection may sit idle before it is closed; `None` means forever.
    ///
    /// Defaults to 10 minutes.
    ///
    /// # Panics
    ///
    /// Panics on `Some(Duration::ZERO)`, with r2d2's message "idle_timeout must be positive".
    pub fn idle_timeout(mut self, idle_timeout: Option<Duration>) -> Self {
        assert_ne!(
            idle_timeout,
            Some(Duration::from_secs(0)),
            "idle_timeout must be positive"
        );
        self.config.settings.idle_timeout = idle_timeout;
        self
    }

    /// How long `get` waits for a connection before it returns an error. A forked child's
    /// first `get`, which rebuilds the pool and opens a connection, waits no longer than this
    /// either.
    ///
    /// Defaults to 30 seconds.
    ///
    /// # Panics
    ///
    /// Panics if `connection_timeout` is zero, with r2d2's message "connection_timeout must be
    /// positive".
    pub fn connection_timeout(mut self, connection_timeout: Duration) -> Self {
        assert!(
            connection_timeout > Duration::from_secs(0),
            "connection_timeout must be positive"
        );
        self.config.settings.connection_timeout = connection_timeout;
        self
    }

    /// Receives the errors of connection attempts. In a forked child it receives them too, from
    /// the rebuilt pool.
    ///
    /// Defaults to r2d2's `LoggingErrorHandler`.
    pub fn error_handler(mut self, error_handler: Box<dyn HandleError<M::Error>>) -> Self {
        self.config.error_handler = Arc::from(error_handler);
        self
    }

    /// Receives r2d2's pool events (acquire, release, checkout, checkin, timeout).
    ///
    /// Defaults to none. Only r2d2 can run r2d2's event code, so a pool with a handler runs
    /// on an `r2d2::Pool` in the process that built it: its checkouts cost what r2d2's do,
    /// which docs/measurements.md ("Checkout cost") measures at nearly twice this crate's own
    /// pool's. The pool rebuilt in a forked child reports the same events for the connections
    /// it opens (never for inherited ones), on this crate's own pool.
    pub fn event_handler(mut self, event_handler: Box<dyn HandleEvent>) -> Self {
        self.config.event_handler = Some(Arc::from(event_handler));
        self
    }

    /// Runs on every new connection (`on_acquire`) and every closed one (`on_release`). It is
    /// never called for a connection inherited across `fork()`: those are not closed at all.
    ///
    /// Defaults to r2d2's `NopConnectionCustomizer`.
    pub fn connection_customizer(
        mut self,
        connection_customizer: Box<dyn CustomizeConnection<M::Connection, M::Error>>,
    ) -> Self {
        self.config.connection_customizer = Arc::from(connection_customizer);
        self
    }

    /// The thread pool that opens connections and reaps old ones, in the process that built the
    /// pool. Its threads do not exist in a forked child; the pool rebuilt there does the same
    /// work on one thread of its own and a short-lived thread per connection attempt (see
    /// [`Pool`'s docs](crate::Pool#in-a-forked-child)).
    ///
    /// Defaults to a new pool of three threads per pool, as in r2d2; for a pool with an
    /// [`event_handler`](Builder::event_handler), to three threads per r2d2 pool it builds (a
    /// new one after each [`Pool::release_idle`](crate::Pool::release_idle)), which end with it.
    /// A default thread pool's threads are all running before `build` returns (or the first
    /// use after `release_idle` goes on), so that a fork right afterwards cannot catch one
    /// starting: a child that did could never start a thread of its own. A thread pool of yours
    /// is yours to start: run a job on each of its threads before you fork.
    pub fn thread_pool(mut self, thread_pool: Arc<ScheduledThreadPool>) -> Self {
        self.config.thread_pool = Some(thread_pool);
        self
    }

    /// Not part of the API: how often the pool closes idle connections past `idle_timeout` or
    /// `max_lifetime` in the background, so that tests need not wait r2d2's 30 s. A pool with
    /// an event handler keeps r2d2's own rate in the process that built it.
    ///
    /// Defaults to 30 seconds, r2d2's rate.
    ///
    /// # Panics
    ///
    /// Panics if `rate` is zero.
    #[doc(hidden)]
    pub fn reaper_rate_for_tests(mut self, rate: Duration) -> Self {
        assert!(rate > Duration::ZERO, "reaper_rate must be positive");
        self.config.reaper_rate = rate;
        self
    }

    /// What the pool does on its first use in a forked child: rebuild itself
    /// ([`OnFork::Rebuild`]), or fail loudly ([`OnFork::Fail`]) for programs that must not use
    /// a pool across `fork()` and want to hear about it when they do.
    ///
    /// With `OnFork::Fail`, `get` and `get_timeout` in a child return an [`r2d2::Error`] at
    /// once — no wait for `connection_timeout`, no connection attempt — reading "timed out
    /// waiting for connection: forksafe-pool: this pool crossed fork() ..." (r2d2's error always
    /// starts with its fixed prefix). `try_get` returns `None`, `state` counts nothing, and
    /// [`Pool::warm_up`] fails the same way. The pool stays usable in the process that built it.
    ///
    /// ```
    /// use diesel::r2d2::ConnectionManager;
    /// use diesel::SqliteConnection;
    /// use forksafe_pool::OnFork;
    ///
    /// let pool = forksafe_pool::Pool::builder()
    ///     .on_fork(OnFork::Fail)
    ///     .build(ConnectionManager::<SqliteConnection>::new(":memory:"))?;
    /// assert!(pool.get().is_ok(), "the building process uses it as usual");
    /// # Ok::<(), forksafe_pool::Error>(())
    /// ```
    ///
    /// Defaults to [`OnFork::Rebuild`].
    pub fn on_fork(mut self, on_fork: OnFork) -> Self {
        self.config.on_fork = on_fork;
        self
    }

    /// Tells the pool which file descriptors a connection owns, for a connection type that
    /// none of this crate's backend features knows (or to replace what a feature does). In a
    /// forked child those descriptors are pointed at `/dev/null` (never closed through the
    /// driver, which would say goodbye on the parent's session), so the parent's server sessions
    /// end when the parent does. [`locate`](crate::locate) has the building blocks: a socket the
    /// driver names (`AsRawFd`), a TCP socket from the server's view of the session, a file.
    ///
    /// # The contract
    ///
    /// Return the descriptors only when you are certain; return `None` when unsure. A
    /// descriptor that is left open is harmless (the child never writes on it; the parent's
    /// session merely outlives the parent while the child lives, counted in
    /// [`ForkStats::connections_leaked`](crate::ForkStats)); replacing a descriptor that belongs
    /// to something else breaks that something.
    ///
    /// **`Some(vec![])` is an answer, not a shrug**: it says "this connection owns no
    /// descriptor" and counts the connection as identified. Return it only for connections
    /// that really own none (an in-memory database); for a socket you could not find, it hides
    /// the leak that `None` would have counted.
    ///
    /// # When and where it runs
    ///
    /// - Right after each successful connect, before the connection is handed to
    ///   `on_acquire` or to anyone else: never on checkout, never on a connection the pool
    ///   already has.
    /// - On the thread that opened the connection: one of the pool's connector threads in the
    ///   building process (r2d2's, or [`thread_pool`](Builder::thread_pool)'s), and in a forked
    ///   child the thread whose `get` opened it (the child's pool runs no long-lived threads).
    ///   So it must be `Send + Sync`, and must not panic.
    /// - In children too: every connection a child opens is located, so a grandchild forked
    ///   from a worker releases the worker's sockets in turn.
    /// - It may query the session: the connection is its own until the locator returns (the
    ///   crate's PostgreSQL, MariaDB and Redis backends ask the server how it sees the
    ///   session). A query error should give `None`. A libc `fork()` on another thread waits
    ///   (up to a second) while a locator runs, as it waits for every connect, so keep it to a
    ///   round trip.
    ///
    /// # Example
    ///
    /// A client that hides its socket but can ask the server for the session's two ends (as
    /// `SELECT inet_client_addr(), inet_client_port(), inet_server_addr(), inet_server_port()`
    /// does on PostgreSQL); a client whose connection is `AsRawFd` needs only
    /// `|conn| Some(vec![locate::as_raw_fd(conn)?])`.
    ///
    /// ```
    /// use std::net::{SocketAddr, TcpListener, TcpStream};
    /// use forksafe_pool::{locate, ManageConnection, Pool};
    ///
    /// /// Some client library's connection: the socket is private.
    /// pub struct Client {
    ///     stream: TcpStream,
    /// }
    ///
    /// impl Client {
    ///     /// The session's two ends as the server reports them: ours, then its own.
    ///     pub fn session_ends(&mut self) -> std::io::Result<(SocketAddr, SocketAddr)> {
    ///         // (A real client asks the server; this one reads its socket.)
    ///         Ok((self.stream.local_addr()?, self.stream.peer_addr()?))
    ///     }
    /// }
    ///
    /// struct Manager(SocketAddr);
    ///
    /// impl ManageConnection for Manager {
    ///     type Connection = Client;
    ///     type Error = std::io::Error;
    ///     fn connect(&self) -> std::io::Result<Client> {
    ///         Ok(Client { stream: TcpStream::connect(self.0)? })
    ///     }
    ///     fn is_valid(&self, _: &mut Client) -> std::io::Result<()> {
    ///         Ok(())
    ///     }
    ///     fn has_broken(&self, _: &mut Client) -> bool {
    ///         false
    ///     }
    /// }
    ///
    /// let server = TcpListener::bind("127.0.0.1:0")?;
    /// let pool = Pool::builder()
    ///     .max_size(2)
    ///     .descriptor_locator(|client: &mut Client| {
    ///         let (ours, theirs) = client.session_ends().ok()?;
    ///         Some(vec![locate::tcp_socket(ours, theirs)?])
    ///     })
    ///     .build(Manager(server.local_addr()?))
    ///     .expect("pool");
    /// assert_eq!(pool.state().connections, 2);
    ///
    /// // A worker: its first `get` discards the 2 inherited connections and releases their
    /// // sockets, because the locator named them; none is left open.
    /// use nix::sys::wait::{waitpid, WaitStatus};
    /// use nix::unistd::{fork, ForkResult};
    /// // SAFETY: the child uses nothing but the pool, made for use after fork(), and leaves
    /// // with `_exit` (std's `exit` takes a lock a fork may have frozen; see the README's
    /// // Limits).
    /// match unsafe { fork() }.expect("fork") {
    ///     ForkResult::Child => {
    /// #       // A deadline: a hung child dies of SIGALRM, so the test fails instead of hanging.
    /// #       unsafe { libc::alarm(20) };
    ///         let own = pool.get().is_ok();
    ///         let stats = pool.fork_stats();
    ///         let released = stats.sockets_released == 2 && stats.connections_leaked == 0;
    ///         unsafe { libc::_exit(if own && released { 0 } else { 1 }) };
    ///     }
    ///     ForkResult::Parent { child } => {
    ///         assert_eq!(waitpid(child, None)?, WaitStatus::Exited(child, 0));
    ///     }
    /// }
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    ///
    /// Defaults to the built-in backends (see the crate's feature flags); connections of other
    /// types are counted in [`ForkStats::connections_leaked`](crate::ForkStats) in a child.
    pub fn descriptor_locator<F>(mut self, locator: F) -> Self
    where
        F: Fn(&mut M::Connection) -> Option<Vec<RawFd>> + Send + Sync + 'static,
    {
        self.config.descriptor_locator = Some(Arc::new(locator));
        self
    }

    /// Builds the pool and waits up to `connection_timeout` for `min_idle` connections, like
    /// [`r2d2::Builder::build`].
    ///
    /// # Errors
    ///
    /// The `r2d2::Error` r2d2 returns when the connections could not be opened in time.
    ///
    /// # Panics
    ///
    /// Panics if `min_idle` is larger than `max_size`, with r2d2's message.
    pub fn build(self, manager: M) -> Result<Pool<M>, r2d2::Error> {
        self.check();
        Pool::from_config(self.config, manager, true)
    }

    /// Builds the pool without waiting for connections, like [`r2d2::Builder::build_unchecked`].
    ///
    /// # Panics
    ///
    /// Panics if `min_idle` is larger than `max_size`, with r2d2's message.
    pub fn build_unchecked(self, manager: M) -> Pool<M> {
        self.check();
        match Pool::from_config(self.config, manager, false) {
            Ok(pool) => pool,
            Err(_) => unreachable!("building without waiting cannot fail"),
        }
    }

    fn check(&self) {
        if let Some(min_idle) = self.config.settings.min_idle {
            assert!(
                self.config.settings.max_size >= min_idle,
                "min_idle must be no larger than max_size"
            );
        }
    }
}
