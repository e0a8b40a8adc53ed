//! The pool a forked child runs on: r2d2's checkout rules on std's `Mutex` and `Condvar`,
//! with no parking_lot, no std threads and no long-lived threads at all.
//!
//! Why not a fresh r2d2 pool? r2d2 keeps its state behind parking_lot 0.12 and runs on a
//! scheduled-thread-pool (parking_lot 0.13). Both parking_lots keep a process-global table of
//! parked threads whose entries live in each thread's TLS. A child inherits the table with
//! entries of parent threads that were parked at the fork instant (an idle r2d2 worker always
//! is), and glibc gives the dead threads' stacks, TLS included, to the child's next threads. A
//! new r2d2 worker in the child therefore initialises its parking state on top of an entry that
//! is still linked into the table: the lists are cross-linked, wake-ups are lost, and a table
//! resize loops forever with every bucket locked. The README's "Why children hung in
//! parking_lot" has the measurements. std's `Mutex` and `Condvar` are futex words inside the
//! object and keep no registry of threads, so a pool made in the child depends on nothing the
//! fork left behind.
//!
//! Why not std threads either? Every thread std spawns first locks a process-global std mutex
//! (the stack-overflow handler's thread-info map, `set_current_info`), which threads also take
//! when they exit. A fork while some parent thread starts or exits leaves it locked in the
//! child, and every std thread the child then spawns blocks before running a line of its
//! closure (measured: children whose connect threads never started, in the torture scenario
//! that forks during a rebuild). So a `get` that needs a connection starts one attempt on a
//! short-lived thread made with `pthread_create` directly (`fork::spawn_detached`), and waits
//! for it no longer than its timeout: a connect that hangs (a server that never answers) does
//! not hold `get` past `connection_timeout`. A connection that arrives after its caller gave up
//! goes idle in the pool, as with r2d2's workers. Only if no thread can be made at all does
//! `get` connect on its own thread.

use std::fmt;
use std::ops::{Deref, DerefMut};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use r2d2::{CustomizeConnection, HandleError, ManageConnection};

use crate::config::Settings;
use crate::connection::Checkout;
use crate::fork::{r2d2_error, r2d2_state};
use crate::manager::{ConnectError, ForkSafeManager, Tracked};

type Conn<M> = Tracked<<M as ManageConnection>::Connection>;
type Error<M> = ConnectError<<M as ManageConnection>::Error>;

/// A pool made in a forked child; cheap to clone, like r2d2's.
pub(crate) struct ChildPool<M: ManageConnection> {
    shared: Arc<Shared<M>>,
}

struct Shared<M: ManageConnection> {
    manager: ForkSafeManager<M>,
    settings: Settings,
    error_handler: Box<dyn HandleError<Error<M>>>,
    customizer: Box<dyn CustomizeConnection<Conn<M>, Error<M>>>,
    state: Mutex<State<M>>,
    /// Signalled when a connection becomes idle, a slot frees up, or an attempt fails.
    changed: Condvar,
}

struct State<M: ManageConnection> {
    idle: Vec<Idle<M>>,
    /// Open connections, idle or checked out.
    open: u32,
    /// Connection attempts running (each on the thread of a `get` that needed one).
    connecting: u32,
    /// `get` calls waiting on `changed`: with none, nobody is woken (std's `notify_*` always
    /// makes a futex system call, which would double the cost of every checkin).
    waiters: u32,
    /// Connection attempts that have ended, either way; a waiting `get` starts another attempt
    /// only once one has ended since its last.
    attempts_ended: u64,
    last_error: Option<String>,
    /// Consecutive failed attempts, for r2d2's back-off (200 ms doubling, at most half the
    /// connection timeout).
    failures: u32,
    /// No new attempt before this instant, after a failure.
    retry_at: Option<Instant>,
}

struct Idle<M: ManageConnection> {
    conn: Pooled<M>,
    since: Instant,
}

struct Pooled<M: ManageConnection> {
    conn: Conn<M>,
    extensions: r2d2::Extensions,
    birth: Instant,
}

impl<M: ManageConnection> Clone for ChildPool<M> {
    fn clone(&self) -> Self {
        ChildPool {
            shared: Arc::clone(&self.shared),
        }
    }
}

impl<M: ManageConnection> fmt::Debug for ChildPool<M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChildPool")
            .field("settings", &self.shared.settings)
            .finish_non_exhaustive()
    }
}

impl<M: ManageConnection> ChildPool<M> {
    /// Makes the pool without connecting, like r2d2's `build_unchecked`; connections are
    /// opened on demand (`min_idle` is not kept up in the background: that needs a thread).
    pub(crate) fn new(
        manager: ForkSafeManager<M>,
        settings: Settings,
        error_handler: Box<dyn HandleError<Error<M>>>,
        customizer: Box<dyn CustomizeConnection<Conn<M>, Error<M>>>,
    ) -> Self {
        ChildPool {
            shared: Arc::new(Shared {
                manager,
                settings,
                error_handler,
                customizer,
                state: Mutex::new(State {
                    idle: Vec::new(),
                    open: 0,
                    connecting: 0,
                    waiters: 0,
                    attempts_ended: 0,
                    last_error: None,
                    failures: 0,
                    retry_at: None,
                }),
                changed: Condvar::new(),
            }),
        }
    }

    /// Checks out a connection, waiting at most `timeout`, like `r2d2::Pool::get_timeout`.
    pub(crate) fn get_timeout(&self, timeout: Duration) -> Result<Lease<M>, r2d2::Error> {
        let deadline = Instant::now() + timeout;
        let shared = &self.shared;
        let mut my_attempt: Option<u64> = None;
        let mut state = shared.lock();
        loop {
            match shared.take_idle(state) {
                Ok(lease) => return Ok(lease),
                Err(again) => state = again,
            }
            let now = Instant::now();
            // One attempt per waiting call at a time: another only once some attempt ended.
            let may_start = my_attempt.is_none_or(|ended| state.attempts_ended != ended);
            if may_start
                && state.open + state.connecting < shared.settings.max_size
                && state.retry_at.is_none_or(|at| at <= now)
            {
                state.connecting += 1;
                my_attempt = Some(state.attempts_ended);
                drop(state);
                // Connect on a thread of its own, so this call still waits no longer than
                // `timeout` when a connect hangs (a server that never answers).
                let background = Arc::clone(shared);
                let spawned =
                    crate::fork::spawn_detached(Box::new(move || background.connect_into_idle()));
                if !spawned {
                    // No thread to be had: connect here; the wait is then the connect's.
                    if let Some(conn) = shared.connect_one() {
                        return Ok(Lease {
                            pool: Arc::clone(shared),
                            conn: Some(conn),
                        });
                    }
                }
                state = shared.lock();
                continue;
            }
            if now >= deadline {
                let message = state.last_error.take().unwrap_or_else(|| {
                    format!(
                        "forksafe-pool: no connection of the pool rebuilt after fork() in process {} \
                         became free within {timeout:?}",
                        std::process::id()
                    )
                });
                return Err(r2d2_error(message));
            }
            let wake = match state.retry_at {
                Some(at) if at > now && state.connecting == 0 => at.min(deadline),
                _ => deadline,
            };
            state.waiters += 1;
            state = shared
                .changed
                .wait_timeout(state, wake.saturating_duration_since(now))
                .unwrap_or_else(PoisonError::into_inner)
                .0;
            state.waiters -= 1;
        }
    }

    /// Opens connections on this thread until `min_idle` (all `max_size` when `None`) are
    /// open or `deadline` passes; for `Pool::warm_up`, since nothing opens them in the
    /// background.
    pub(crate) fn open_until(&self, deadline: Instant) {
        let shared = &self.shared;
        let wanted = shared
            .settings
            .min_idle
            .unwrap_or(shared.settings.max_size)
            .min(shared.settings.max_size);
        loop {
            let mut state = shared.lock();
            let now = Instant::now();
            if state.open >= wanted || now >= deadline {
                return;
            }
            if let Some(at) = state.retry_at.filter(|at| *at > now) {
                drop(state);
                std::thread::sleep(at.min(deadline) - now);
                continue;
            }
            if state.open + state.connecting >= shared.settings.max_size {
                return;
            }
            state.connecting += 1;
            drop(state);
            if let Some(conn) = shared.connect_one() {
                shared.put_back(conn);
            }
        }
    }

    /// An idle connection if there is one, without waiting, like `r2d2::Pool::try_get`.
    pub(crate) fn try_get(&self) -> Option<Lease<M>> {
        self.shared.take_idle(self.shared.lock()).ok()
    }

    /// Connection counts, like `r2d2::Pool::state`.
    pub(crate) fn state(&self) -> r2d2::State {
        let state = self.shared.lock();
        r2d2_state(state.open, state.idle.len() as u32)
    }
}

impl<M: ManageConnection> Shared<M> {
    fn lock(&self) -> MutexGuard<'_, State<M>> {
        // Every critical section leaves the state consistent (user code runs unlocked), so a
        // panic elsewhere cannot leave it half-updated.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Pops idle connections until one is fresh and (with `test_on_check_out`) valid; gives
    /// the lock back when there is none. Closes the stale ones unlocked.
    fn take_idle<'a>(
        self: &'a Arc<Self>,
        mut state: MutexGuard<'a, State<M>>,
    ) -> Result<Lease<M>, MutexGuard<'a, State<M>>> {
        loop {
            let Some(idle) = state.idle.pop() else {
                return Err(state);
            };
            let now = Instant::now();
            let stale = self
                .settings
                .idle_timeout
                .is_some_and(|t| now - idle.since >= t)
                || self
                    .settings
                    .max_lifetime
                    .is_some_and(|t| now - idle.conn.birth >= t);
            if stale {
                state.open -= 1;
                drop(state);
                self.close(idle.conn);
                state = self.lock();
                continue;
            }
            drop(state);
            let mut conn = idle.conn;
            if self.settings.test_on_check_out {
                if let Err(error) = self.manager.is_valid(&mut conn.conn) {
                    let message = error.to_string();
                    self.error_handler.handle_error(error);
                    let mut relocked = self.lock();
                    relocked.open -= 1;
                    relocked.last_error = Some(message);
                    drop(relocked);
                    self.close(conn);
                    state = self.lock();
                    continue;
                }
            }
            return Ok(Lease {
                pool: Arc::clone(self),
                conn: Some(conn),
            });
        }
    }

    /// One connection attempt on the current thread, reserved by the caller (`connecting`
    /// counts it). The new connection counts as open and is handed to the caller.
    fn connect_one(&self) -> Option<Pooled<M>> {
        let result = self
            .manager
            .connect()
            .and_then(|mut conn| self.customizer.on_acquire(&mut conn).map(|()| conn));
        let mut state = self.lock();
        state.connecting -= 1;
        state.attempts_ended += 1;
        match result {
            Ok(conn) => {
                state.open += 1;
                state.last_error = None;
                state.failures = 0;
                state.retry_at = None;
                Some(Pooled {
                    conn,
                    extensions: r2d2::Extensions::new(),
                    birth: Instant::now(),
                })
            }
            Err(error) => {
                state.last_error = Some(error.to_string());
                state.failures = state.failures.saturating_add(1);
                let backoff = Duration::from_millis(200)
                    .saturating_mul(1 << state.failures.saturating_sub(1).min(16))
                    .min(self.settings.connection_timeout / 2);
                state.retry_at = Some(Instant::now() + backoff);
                // A waiter may take the freed slot (after the back-off).
                self.wake_all(state);
                self.error_handler.handle_error(error);
                None
            }
        }
    }

    /// One attempt on a thread of its own: the connection goes idle for whichever `get` wakes.
    fn connect_into_idle(&self) {
        if let Some(conn) = self.connect_one() {
            let mut state = self.lock();
            state.idle.push(Idle {
                conn,
                since: Instant::now(),
            });
            self.wake_all(state);
        }
    }

    /// Wakes every waiting `get`, if any.
    fn wake_all(&self, state: MutexGuard<'_, State<M>>) {
        self.wake(state, Condvar::notify_all);
    }

    /// Wakes one waiting `get`, if any.
    fn wake_one(&self, state: MutexGuard<'_, State<M>>) {
        self.wake(state, Condvar::notify_one);
    }

    /// Unlocks, then notifies only if a `get` waits. The count is read under the lock, so a
    /// `get` about to wait has either registered (and is woken) or will see the change before
    /// it waits.
    fn wake(&self, state: MutexGuard<'_, State<M>>, notify: fn(&Condvar)) {
        let waiting = state.waiters > 0;
        drop(state);
        if waiting {
            notify(&self.changed);
        }
    }

    /// Takes a connection back, like r2d2's `put_back`: broken (or past `max_lifetime`) ones
    /// are closed through the customizer's `on_release`.
    fn put_back(&self, mut conn: Pooled<M>) {
        let broken = self.manager.has_broken(&mut conn.conn)
            || self
                .settings
                .max_lifetime
                .is_some_and(|t| conn.birth.elapsed() >= t);
        let mut state = self.lock();
        if broken {
            state.open -= 1;
            self.wake_all(state);
            self.close(conn);
        } else {
            state.idle.push(Idle {
                conn,
                since: Instant::now(),
            });
            self.wake_one(state);
        }
    }

    fn close(&self, conn: Pooled<M>) {
        self.customizer.on_release(conn.conn);
    }
}

/// A connection checked out of a [`ChildPool`]; goes back when dropped.
pub(crate) struct Lease<M: ManageConnection> {
    pool: Arc<Shared<M>>,
    /// `None` only while dropping.
    conn: Option<Pooled<M>>,
}

impl<M: ManageConnection> Lease<M> {
    pub(crate) fn extensions(&self) -> &r2d2::Extensions {
        &self.pooled().extensions
    }

    pub(crate) fn extensions_mut(&mut self) -> &mut r2d2::Extensions {
        &mut self.pooled_mut().extensions
    }

    fn pooled(&self) -> &Pooled<M> {
        match &self.conn {
            Some(conn) => conn,
            None => unreachable!("the connection is only taken while dropping"),
        }
    }

    fn pooled_mut(&mut self) -> &mut Pooled<M> {
        match &mut self.conn {
            Some(conn) => conn,
            None => unreachable!("the connection is only taken while dropping"),
        }
    }
}

impl<M: ManageConnection> Deref for Lease<M> {
    type Target = Conn<M>;

    fn deref(&self) -> &Conn<M> {
        &self.pooled().conn
    }
}

impl<M: ManageConnection> DerefMut for Lease<M> {
    fn deref_mut(&mut self) -> &mut Conn<M> {
        &mut self.pooled_mut().conn
    }
}

impl<M: ManageConnection> Drop for Lease<M> {
    fn drop(&mut self) {
        if let Some(conn) = self.conn.take() {
            self.pool.put_back(conn);
        }
    }
}

/// The pool of one generation: r2d2's in the process that built the `Pool`, a [`ChildPool`]
/// in every forked process.
pub(crate) enum AnyPool<M: ManageConnection> {
    R2d2(r2d2::Pool<ForkSafeManager<M>>),
    Child(ChildPool<M>),
}

impl<M: ManageConnection> AnyPool<M> {
    // Inlined so the guard is built in place instead of being copied once more per checkout.
    #[inline]
    pub(crate) fn get_timeout(&self, timeout: Duration) -> Result<Checkout<M>, r2d2::Error> {
        match self {
            AnyPool::R2d2(pool) => pool.get_timeout(timeout).map(Checkout::R2d2),
            AnyPool::Child(pool) => pool.get_timeout(timeout).map(Checkout::Child),
        }
    }

    pub(crate) fn try_get(&self) -> Option<Checkout<M>> {
        match self {
            AnyPool::R2d2(pool) => pool.try_get().map(Checkout::R2d2),
            AnyPool::Child(pool) => pool.try_get().map(Checkout::Child),
        }
    }

    pub(crate) fn state(&self) -> r2d2::State {
        match self {
            AnyPool::R2d2(pool) => pool.state(),
            AnyPool::Child(pool) => pool.state(),
        }
    }
}
