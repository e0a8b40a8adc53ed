//! The pool this crate runs on wherever it can: r2d2's checkout rules on std's `Mutex` and
//! `Condvar`. A forked child always runs on it; the process that built the `Pool` does too,
//! unless an event handler is set (r2d2's event types can only be made by r2d2, so such a pool
//! keeps an r2d2 pool there).
//!
//! In the building process it is r2d2 in all but its locks: connections are opened on the
//! pool's scheduled thread pool (the `thread_pool` setting, r2d2's three threads by default),
//! `build` waits for `min_idle` of them, a checkout that leaves fewer than `min_idle` idle
//! opens more in the background, and a job on the same thread pool closes idle connections
//! past `idle_timeout` or `max_lifetime` every 30 seconds, as r2d2's reaper does. A failed
//! attempt schedules a retry on the same thread pool once its back-off has passed, so the pool
//! reaches `min_idle` on its own when the server comes back, as r2d2's does (r2d2's worker
//! retries the very attempt that failed, until it succeeds; this pool tops up to `min_idle`,
//! which comes to the same unless a `get` started the attempt and `min_idle` is below
//! `max_size`). Where it differs from r2d2 on purpose is listed in `Pool`'s docs. It is also
//! cheaper than r2d2 per checkout: it reads the clock only when a setting needs the time
//! (r2d2 reads it four times per checkout and return, for its events, whether or not anyone
//! listens).
//!
//! The counts (`open`, `connecting`, the idle list) change together: a connection leaves
//! `connecting` and appears open and idle (or checked out) in one critical section, so a
//! `replenish` never sees it in neither place and starts a connect too many, and `build`
//! never returns with a connection counted open that is not yet idle.
//!
//! Why not a fresh r2d2 pool in a forked child? r2d2 keeps its state behind parking_lot 0.12
//! and runs on a scheduled-thread-pool (parking_lot 0.13). Both parking_lots keep a
//! process-global table of parked threads whose entries live in each thread's TLS. A child
//! inherits the table with entries of parent threads that were parked at the fork instant (an
//! idle r2d2 worker always is), and glibc gives the dead threads' stacks, TLS included, to the
//! child's next threads. A new r2d2 worker in the child therefore initialises its parking state
//! on top of an entry that is still linked into the table: the lists are cross-linked,
//! wake-ups are lost, and a table resize loops forever with every bucket locked. docs/parking-lot.md
//! has the measurements. std's `Mutex` and `Condvar` are
//! futex words inside the object and keep no registry of threads, so a pool made in the child
//! depends on nothing the fork left behind.
//!
//! Why not std threads in a child either? Every thread std spawns first locks a process-global
//! std mutex (the stack-overflow handler's thread-info map, `set_current_info`), which threads
//! also take when they exit. A fork while some parent thread starts or exits leaves it locked
//! in the child, and every std thread the child then spawns blocks before running a line of its
//! closure (measured: children whose connect threads never started, in the torture scenario
//! that forks during a rebuild). So in a child a `get` that needs a connection starts one
//! attempt on a short-lived thread made with `pthread_create` directly
//! (`sys::spawn_detached`), and waits for it no longer than its timeout: a connect that hangs
//! (a server that never answers) does not hold `get` past `connection_timeout`. A connection
//! that arrives after its caller gave up goes idle in the pool, as with r2d2's workers. Only if
//! no thread can be made at all does `get` connect on its own thread. A child's pool keeps no
//! `min_idle` in the background, retries nothing after a failure and reaps nothing (all need a
//! long-lived thread): it connects when a `get` or `warm_up` needs a connection, and stale
//! connections are closed when a checkout finds them. A connect that panics, here or on the
//! thread pool, counts as a failed attempt whose error is the panic's message, so its slot is
//! freed and the waiting `get` says why it got nothing.
//!
//! # Under contention
//!
//! Services run more threads than cores, so a thread that holds a lock, or the connection another
//! thread waits for, is most often a thread waiting for a core. A pool whose every checkout and
//! return takes one mutex (r2d2's) stalls whenever the holder is preempted inside it, and then pays
//! for futex waits, wakes and context switches to let it finish. So the common case takes no lock:
//! the idle connections live in one atomic slot each (`IdleSlots`), a checkout exchanges a full
//! slot for null and a return puts the connection back into the slot it owns. Nothing can be
//! preempted while holding anything another thread needs. The lock is left for what changes the
//! counts (connects, closes, `release_idle`, the reaper) and for waiting.
//!
//! The counts and the idle slots still agree, by construction and by four pairings in which each
//! side writes its atomic and then reads the other's (all sequentially consistent, so of two racing
//! threads at least one sees the other):
//! - A new connection becomes open and idle in one critical section (see above); a checkout or a
//!   return of an idle one changes no count.
//! - `full` (`open + connecting` has reached `max_size`): a checkout that finds it set needs no
//!   `min_idle` top-up, so it skips the lock. A close clears it before `replenish` counts the idle
//!   slots, and a checkout reads it after taking its slot: either the count misses the taken
//!   connection, or the checkout sees the flag cleared and tops up itself.
//! - `releases`: `release_idle` counts the release, then empties the slots; a return puts the
//!   connection back, then reads the count. A connection of an earlier release that slipped back
//!   in is taken out again by its returner, or by whichever checkout took it first; either closes
//!   it.
//! - `waiters`: a `get` about to wait counts itself, then looks at the slots once more; a return
//!   puts its connection back, then reads the count, and if someone waits takes the lock (so the
//!   waiter is asleep by then) and wakes one.
//!
//! The slots need no memory reclamation: a slot only ever holds the connection that owns its
//! number (numbers are handed out and taken back under the lock), so no pointer can be replaced by
//! another at the same address while a thread reads it (the ABA problem of lock-free stacks), and
//! every access is a single exchange that hands the box to exactly one thread.
//!
//! When the lock is needed and taken, a thread that finds it locked first retries after short
//! busy waits (2, 4 and 8 pauses, for a holder running on another core), then yields its core up to
//! `LOCK_YIELDS` times, and only then blocks in `Mutex::lock` — at once if other threads already
//! sleep there (`blocked_on_lock`), so that spinning newcomers cannot keep cutting in front of them
//! (parking_lot's mutex follows the same rule). A `get` that finds every connection checked out
//! and none being opened yields up to `WAIT_YIELDS` times before it waits.
//!
//! # Fairness
//!
//! A running thread takes a connection put back at once, before a woken waiter gets a core; r2d2
//! lets threads barge in the same way. So that a waiting `get` is not passed over for ever, the
//! pool keeps its waiting `get` calls in a queue, and the longest waiting one keeps time: once it
//! has waited `FAIR_AFTER` (500 µs, the interval of parking_lot's eventual fairness) it raises
//! `starving`, and the next connection put back is handed straight to it instead of into its
//! slot. The next handover comes no sooner than `FAIR_AFTER` later, so handing over, a context
//! switch each, stays the exception even when many threads wait for a few connections. Each
//! queued `get` sleeps on a condition variable of its own, so a connection put back or handed over
//! wakes one waiter, not all of them (which would then queue for the lock, one context switch
//! each, before the one it was for could run). `benches/contention.rs` (part `wait`) measures the
//! waits this leaves, p99 and maximum, and how evenly the threads were served, beside r2d2's.
//!
//! # Fork safety of all this
//!
//! It adds no state outside the pool: the slots and flags are atomics in the pool, `try_lock` is a
//! compare-and-swap on the mutex's own word, the pauses are `spin_loop` hints, and `yield_now` is
//! the `sched_yield` system call, which takes no lock in user space. Nothing is registered per
//! thread or per process (parking_lot's adaptive spinning comes with its process-global table of
//! parked threads, the hazard described above), so a fork that catches a parent thread anywhere in
//! the parent's pool leaves the child nothing to trip on: the child never touches that pool, and
//! its own pool starts empty and unlocked.

use std::collections::VecDeque;
use std::fmt;
use std::ops::{Deref, DerefMut};
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError, TryLockError, Weak};
use std::time::{Duration, Instant};

use r2d2::{CustomizeConnection, HandleError, ManageConnection};
use scheduled_thread_pool::ScheduledThreadPool;

use crate::config::Settings;
use crate::idle_slots::IdleSlots;
use crate::manager::{ConnectError, ForkSafeManager, Tracked};
use crate::r2d2_compat::{r2d2_error, r2d2_state};

type Conn<M> = Tracked<<M as ManageConnection>::Connection>;
type Error<M> = ConnectError<<M as ManageConnection>::Error>;

/// How often idle connections are checked against `idle_timeout` and `max_lifetime` in the
/// building process: r2d2's rate.
pub(crate) const REAPER_RATE: Duration = Duration::from_secs(30);

/// Contended lock: rounds of busy-waiting (2, 4, 8 pauses) before yielding the core.
const LOCK_SPINS: u32 = 3;
/// Contended lock: yields of the core before blocking in the kernel.
const LOCK_YIELDS: u32 = 7;
/// A `get` that finds every connection checked out: yields of the core before it waits.
const WAIT_YIELDS: u32 = 3;
/// A `get` that has waited this long is handed the next connection put back, and handovers
/// are at least this far apart (see the module docs, "Fairness").
const FAIR_AFTER: Duration = Duration::from_micros(500);

/// A pool on std's locks; cheap to clone, like r2d2's.
pub(crate) struct StdPool<M: ManageConnection> {
    shared: Arc<Shared<M>>,
}

/// Where a pool opens its connections.
pub(crate) enum Connector {
    /// The process that built the `Pool`: on its scheduled thread pool, like r2d2, which also
    /// keeps `min_idle` up and reaps stale connections every `reaper_rate`.
    ThreadPool {
        threads: Arc<ScheduledThreadPool>,
        reaper_rate: Duration,
    },
    /// A forked child: each attempt on a short-lived thread of its own (see the module docs).
    Detached,
}

struct Shared<M: ManageConnection> {
    manager: ForkSafeManager<M>,
    settings: Settings,
    connector: Connector,
    error_handler: Box<dyn HandleError<Error<M>>>,
    customizer: Box<dyn CustomizeConnection<Conn<M>, Error<M>>>,
    /// The idle connections, each in the slot it owns (`Pooled::slot`); taken and given back
    /// without the lock (see the module docs, "Under contention").
    idle: IdleSlots<Pooled<M>>,
    /// The counts and the rest; a checkout or return of an idle connection does not lock it.
    state: Mutex<State<M>>,
    /// Signalled, with every queued `get`'s own (`Waiter::wake`), when a connection opens, a
    /// slot frees up, or an attempt fails; `build` and `warm_up` wait on it.
    changed: Condvar,
    /// `get` calls waiting on `changed`: with none, nobody is woken (std's `notify_*` always
    /// makes a futex system call, which would double the cost of every checkin). Changed under
    /// the lock; read without it by a returning connection, after it is back in its slot.
    waiters: AtomicU32,
    /// How many times `release_idle` emptied the pool. A connection whose attempt was reserved
    /// before the latest release is closed when it arrives or comes back, never pooled (see
    /// `StdPool::release_idle`). Changed under the lock.
    releases: AtomicU64,
    /// Whether `open + connecting` has reached `max_size`, kept with the counts under the
    /// lock. A checkout that finds it so needs no lock: nothing can be opened to keep
    /// `min_idle`.
    full: AtomicBool,
    /// Whether a `get` has waited `FAIR_AFTER` or longer: a connection put back then goes to
    /// the longest waiting `get`, not into its slot (see the module docs, "Fairness").
    starving: AtomicBool,
    /// Threads blocked in `Mutex::lock` on `state`, past their spins and yields.
    blocked_on_lock: AtomicU32,
    /// `FAIR_AFTER`, except in tests that need fairness at once or never.
    fair_after: Duration,
}

struct State<M: ManageConnection> {
    /// Open connections, idle or checked out.
    open: u32,
    /// Connection attempts running, on threads of their own (or on the thread of a `get` that
    /// could have none).
    connecting: u32,
    /// The slot numbers no open connection owns; a new connection takes one.
    free_slots: Vec<u32>,
    /// Connection attempts that have ended, either way; a waiting `get` starts another attempt
    /// only once one has ended since its last.
    attempts_ended: u64,
    last_error: Option<String>,
    /// Consecutive failed attempts, for r2d2's back-off (200 ms doubling, at most half the
    /// connection timeout).
    failures: u32,
    /// No new attempt before this instant, after a failure.
    retry_at: Option<Instant>,
    /// Set by `release_idle`, cleared by the next `get`, `try_get` or `warm_up`: until then
    /// nothing is opened in the background, so a released pool stays empty.
    dormant: bool,
    /// `get` calls waiting for a connection, longest waiting first.
    queue: VecDeque<Waiter>,
    /// Connections handed to a waiting `get` (by ticket) that has not picked them up yet.
    handed: Vec<(u64, Box<Pooled<M>>)>,
    next_ticket: u64,
    /// No connection is handed over before this instant (see `State::fair_turn`).
    next_fair_turn: Instant,
}

/// Where a new connection goes.
enum Destination {
    /// To the thread that connected, checked out.
    Caller,
    /// Into the idle list, for whichever `get` wakes.
    Idle,
}

/// A `get` waiting for a connection.
#[derive(Clone)]
struct Waiter {
    ticket: u64,
    /// When it started to wait.
    since: Instant,
    /// Its own condition variable, so that a connection handed to it, or put back while it
    /// sleeps, wakes it alone: one shared by all would wake every waiter, and each would have
    /// to take the lock in turn before the one it was for could run.
    wake: Arc<Wake>,
}

struct Wake {
    condvar: Condvar,
    /// Set under the lock just before the waiter sleeps on `condvar`, cleared under the lock by
    /// whoever wakes it: a connection put back wakes a waiter that sleeps, never one that is
    /// awake already (and will look at the slots before it sleeps again).
    asleep: AtomicBool,
}

impl Wake {
    /// Wakes the waiter; under the lock.
    fn notify(&self) {
        self.asleep.store(false, Ordering::Relaxed);
        self.condvar.notify_one();
    }
}

/// A `get`'s place in the queue: it leaves the queue when the call returns or unwinds, so that
/// a panic in user code never leaves a dead ticket at the front (fairness would stop, and a
/// connection handed to it would be lost, counted open for ever).
struct Seat<'a, M: ManageConnection> {
    pool: &'a Arc<Shared<M>>,
    waiter: Option<Waiter>,
}

impl<M: ManageConnection> Seat<'_, M> {
    fn leave(&mut self) {
        if let Some(waiter) = self.waiter.take() {
            self.pool.leave_queue(waiter.ticket);
        }
    }
}

impl<M: ManageConnection> Drop for Seat<'_, M> {
    fn drop(&mut self) {
        self.leave();
    }
}

impl<M: ManageConnection> State<M> {
    /// Queues a `get` that is about to wait.
    fn enqueue(&mut self, now: Instant) -> Waiter {
        let waiter = Waiter {
            ticket: self.next_ticket,
            since: now,
            wake: Arc::new(Wake {
                condvar: Condvar::new(),
                asleep: AtomicBool::new(false),
            }),
        };
        self.next_ticket += 1;
        self.queue.push_back(waiter.clone());
        waiter
    }

    /// When `waiter`, if it is the longest waiting `get`, may have the next connection put back
    /// handed to it: once it has waited `FAIR_AFTER`, and no sooner than `FAIR_AFTER` after
    /// the last handover, so that handing over (a context switch each) stays the exception.
    fn fair_turn(&self, waiter: &Waiter, fair_after: Duration) -> Option<Instant> {
        let front = self.queue.front()?;
        (front.ticket == waiter.ticket)
            .then(|| (waiter.since + fair_after).max(self.next_fair_turn))
    }

    /// Wakes the longest waiting `get` if it sleeps, so that it keeps time for fairness.
    fn wake_front(&self) {
        if let Some(front) = self.queue.front() {
            if front.wake.asleep.load(Ordering::Relaxed) {
                front.wake.notify();
            }
        }
    }

    /// The connection handed to the `get` holding `ticket`, if any.
    fn take_handed(&mut self, ticket: u64) -> Option<Box<Pooled<M>>> {
        let index = self.handed.iter().position(|&(to, _)| to == ticket)?;
        Some(self.handed.swap_remove(index).1)
    }
}

/// An open connection, boxed once for its life: it moves between its idle slot and its leases
/// as a pointer.
struct Pooled<M: ManageConnection> {
    conn: Conn<M>,
    extensions: r2d2::Extensions,
    birth: Instant,
    /// When it went idle; only kept with an `idle_timeout`.
    idle_since: Option<Instant>,
    /// `Shared::releases` when its attempt was reserved.
    releases: u64,
    /// The idle slot it owns.
    slot: u32,
}

impl<M: ManageConnection> Clone for StdPool<M> {
    fn clone(&self) -> Self {
        StdPool {
            shared: Arc::clone(&self.shared),
        }
    }
}

impl<M: ManageConnection> fmt::Debug for StdPool<M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StdPool")
            .field("settings", &self.shared.settings)
            .finish_non_exhaustive()
    }
}

impl<M: ManageConnection> StdPool<M> {
    /// Makes the pool without waiting for connections, like r2d2's `build_unchecked`. With a
    /// thread pool (the building process) it starts opening `min_idle` connections and
    /// reaping stale ones in the background, as r2d2 does; a child's pool opens connections
    /// only when a `get` needs one.
    pub(crate) fn new(
        manager: ForkSafeManager<M>,
        settings: Settings,
        connector: Connector,
        error_handler: Box<dyn HandleError<Error<M>>>,
        customizer: Box<dyn CustomizeConnection<Conn<M>, Error<M>>>,
    ) -> Self {
        Self::with_fairness(
            manager,
            settings,
            connector,
            error_handler,
            customizer,
            FAIR_AFTER,
        )
    }

    /// `new`, with the wait after which a `get` is handed the next connection put back.
    fn with_fairness(
        manager: ForkSafeManager<M>,
        settings: Settings,
        connector: Connector,
        error_handler: Box<dyn HandleError<Error<M>>>,
        customizer: Box<dyn CustomizeConnection<Conn<M>, Error<M>>>,
        fair_after: Duration,
    ) -> Self {
        let pool = StdPool {
            shared: Arc::new(Shared {
                manager,
                settings,
                connector,
                error_handler,
                customizer,
                idle: IdleSlots::new(settings.max_size as usize),
                state: Mutex::new(State {
                    open: 0,
                    connecting: 0,
                    // Popped from the end: the lowest numbers first.
                    free_slots: (0..settings.max_size).rev().collect(),
                    attempts_ended: 0,
                    last_error: None,
                    failures: 0,
                    retry_at: None,
                    dormant: false,
                    queue: VecDeque::new(),
                    handed: Vec::new(),
                    next_ticket: 0,
                    next_fair_turn: Instant::now(),
                }),
                changed: Condvar::new(),
                waiters: AtomicU32::new(0),
                releases: AtomicU64::new(0),
                full: AtomicBool::new(false),
                starving: AtomicBool::new(false),
                blocked_on_lock: AtomicU32::new(0),
                fair_after,
            }),
        };
        pool.shared.replenish(&mut pool.shared.lock());
        pool.shared.start_reaper();
        pool
    }

    /// Waits until `min_idle` connections are open (all `max_size` when `None`), at most
    /// `timeout`, as r2d2's `build` does; r2d2's error, carrying the last connection error,
    /// when they are not.
    pub(crate) fn wait_for_initial_connections(
        &self,
        timeout: Duration,
    ) -> Result<(), r2d2::Error> {
        self.fill(Instant::now() + timeout)
            .map_err(|(last_error, _)| r2d2_error(last_error))
    }

    /// Checks out a connection, waiting at most `timeout`, like `r2d2::Pool::get_timeout`.
    #[inline]
    pub(crate) fn get_timeout(&self, timeout: Duration) -> Result<Lease<M>, r2d2::Error> {
        match self.shared.take_idle() {
            Some(lease) => Ok(lease),
            None => self
                .shared
                .wait_for_connection(Instant::now() + timeout, timeout),
        }
    }

    /// Opens connections until `min_idle` (all `max_size` when `None`) are open or `deadline`
    /// passes, trying again after each failure's back-off, as `build` does; for
    /// `Pool::warm_up`, which also runs in a forked child. On failure, the last connection
    /// error and how many connections were open.
    pub(crate) fn warm_up(&self, deadline: Instant) -> Result<(), (Option<String>, u32)> {
        self.fill(deadline)
    }

    /// `build` and `warm_up`: starts attempts until `min_idle` (all `max_size` when `None`)
    /// connections are open or being opened, each on a thread of its own (the thread pool's in
    /// the building process), and waits for them until `deadline`. An attempt that fails makes
    /// way for another once the back-off has passed.
    fn fill(&self, deadline: Instant) -> Result<(), (Option<String>, u32)> {
        let shared = &self.shared;
        let wanted = shared
            .settings
            .min_idle_or_max_size()
            .min(shared.settings.max_size);
        let mut state = shared.lock();
        state.dormant = false;
        loop {
            if state.open >= wanted {
                return Ok(());
            }
            let now = Instant::now();
            if now >= deadline {
                return Err((state.last_error.take(), state.open));
            }
            while state.open + state.connecting < wanted
                && state.retry_at.is_none_or(|at| at <= now)
            {
                let releases = shared.reserve_attempt(&mut state);
                drop(state);
                if !shared.start_attempt(releases) {
                    // No thread to be had: connect here.
                    shared.connect_one(Destination::Idle, releases);
                }
                state = shared.lock();
            }
            if state.open < wanted {
                state = shared.wait_until(state, Instant::now(), deadline, None);
            }
        }
    }

    /// An idle connection if there is one, without waiting, like `r2d2::Pool::try_get`.
    pub(crate) fn try_get(&self) -> Option<Lease<M>> {
        let lease = self.shared.take_idle();
        if lease.is_none() {
            self.shared.in_use_again(&mut self.shared.lock());
        }
        lease
    }

    /// Closes every idle connection now, and makes every connection opened (or being opened)
    /// before this call close, inside a driver section, when it comes back or arrives, instead
    /// of going idle; opens nothing in the background until the pool is next used. Returns how
    /// many idle connections it closed.
    ///
    /// The pool stays the same object: connections are told apart by the release count at the
    /// time their attempt was reserved, so a release costs no memory and leaves no second
    /// reaper behind, and old and new connections together stay within `max_size`.
    pub(crate) fn release_idle(&self) -> u32 {
        let shared = &self.shared;
        let mut state = shared.lock();
        // Counted before the slots are emptied; a connection put back into its slot meanwhile
        // reads the count after, and takes itself out again (see `put_back`).
        shared.releases.fetch_add(1, Ordering::SeqCst);
        state.dormant = true;
        let idle = shared.idle.take_all();
        shared.closing(&mut state, idle.iter().map(|conn| conn.slot));
        // A waiting `get` may use the freed slots.
        shared.wake_all(state);
        let closed = idle.len() as u32;
        for conn in idle {
            shared.close(*conn);
        }
        closed
    }

    /// Connection counts, like `r2d2::Pool::state`.
    pub(crate) fn state(&self) -> r2d2::State {
        let state = self.shared.lock();
        r2d2_state(state.open, self.shared.idle.count() as u32)
    }
}

impl<M: ManageConnection> Shared<M> {
    #[inline]
    fn lock(&self) -> MutexGuard<'_, State<M>> {
        // Every critical section leaves the state consistent (user code runs unlocked), so a
        // panic elsewhere cannot leave it half-updated.
        match self.state.try_lock() {
            Ok(state) => state,
            Err(TryLockError::Poisoned(poisoned)) => poisoned.into_inner(),
            Err(TryLockError::WouldBlock) => self.lock_contended(),
        }
    }

    /// See the module docs, "Under contention".
    #[cold]
    #[inline(never)]
    fn lock_contended(&self) -> MutexGuard<'_, State<M>> {
        for attempt in 0..LOCK_SPINS + LOCK_YIELDS {
            if self.blocked_on_lock.load(Ordering::Relaxed) > 0 {
                // Others already sleep on the mutex: queue up behind them rather than cut in.
                break;
            }
            if attempt < LOCK_SPINS {
                for _ in 0..(2 << attempt) {
                    std::hint::spin_loop();
                }
            } else {
                std::thread::yield_now();
            }
            match self.state.try_lock() {
                Ok(state) => return state,
                Err(TryLockError::Poisoned(poisoned)) => return poisoned.into_inner(),
                Err(TryLockError::WouldBlock) => {}
            }
        }
        self.blocked_on_lock.fetch_add(1, Ordering::Relaxed);
        let state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        self.blocked_on_lock.fetch_sub(1, Ordering::Relaxed);
        state
    }

    /// Counts one more attempt as running, reserved at the current release count (returned).
    fn reserve_attempt(&self, state: &mut State<M>) -> u64 {
        state.connecting += 1;
        self.counts_changed(state);
        self.releases.load(Ordering::SeqCst)
    }

    /// `open` or `connecting` changed: whether the pool is full is read without the lock.
    fn counts_changed(&self, state: &State<M>) {
        self.full.store(
            state.open + state.connecting >= self.settings.max_size,
            Ordering::SeqCst,
        );
    }

    /// Waits, counted as a waiter (see `put_back`), until `deadline` — or, when a failure's
    /// back-off ends sooner and a slot is free for another attempt, until then, so that the
    /// caller can start it (an attempt still running, which may hang, would wake us only when
    /// it ends). A queued `get` (`waiter`) sleeps on its own condition variable, and not at all
    /// if a connection is idle by the time it counts itself as a waiter: one put back before
    /// then may have seen no waiter to wake. `build` and `warm_up` sleep on `changed`.
    fn wait_until<'a>(
        &'a self,
        state: MutexGuard<'a, State<M>>,
        now: Instant,
        deadline: Instant,
        waiter: Option<&Wake>,
    ) -> MutexGuard<'a, State<M>> {
        let wake = match state.retry_at {
            Some(at) if at > now && state.open + state.connecting < self.settings.max_size => {
                at.min(deadline)
            }
            _ => deadline,
        };
        self.waiters.fetch_add(1, Ordering::SeqCst);
        let state = match waiter {
            Some(_) if self.idle.any() => state,
            Some(waiter) => {
                waiter.asleep.store(true, Ordering::Relaxed);
                let state = waiter
                    .condvar
                    .wait_timeout(state, wake - now)
                    .unwrap_or_else(PoisonError::into_inner)
                    .0;
                waiter.asleep.store(false, Ordering::Relaxed);
                state
            }
            None => {
                self.changed
                    .wait_timeout(state, wake - now)
                    .unwrap_or_else(PoisonError::into_inner)
                    .0
            }
        };
        self.waiters.fetch_sub(1, Ordering::SeqCst);
        state
    }

    /// Connections owning `slots` leave the pool, to be closed: their slots are free for new
    /// ones, they no longer count, and in the building process others are started to keep
    /// `min_idle`, as r2d2 does after every close.
    fn closing(self: &Arc<Self>, state: &mut State<M>, slots: impl IntoIterator<Item = u32>) {
        for slot in slots {
            state.open -= 1;
            state.free_slots.push(slot);
        }
        self.counts_changed(state);
        self.replenish(state);
    }

    /// Whether a connection's age matters: only then is the clock read on checkout and
    /// return.
    fn ages(&self) -> bool {
        self.settings.idle_timeout.is_some() || self.settings.max_lifetime.is_some()
    }

    fn is_stale(&self, conn: &Pooled<M>, now: Instant) -> bool {
        let settings = &self.settings;
        settings
            .idle_timeout
            .zip(conn.idle_since)
            .is_some_and(|(timeout, since)| now - since >= timeout)
            || settings
                .max_lifetime
                .is_some_and(|lifetime| now - conn.birth >= lifetime)
    }

    /// The slow half of `get_timeout`: no idle connection was fresh. Starts attempts and waits
    /// for a connection until `deadline`.
    #[cold]
    #[inline(never)]
    fn wait_for_connection(
        self: &Arc<Self>,
        deadline: Instant,
        timeout: Duration,
    ) -> Result<Lease<M>, r2d2::Error> {
        // This call's place in the queue, once it has waited; declared before the lock so that
        // a panic in user code (a connect, `is_valid`, a customizer, an error handler) leaves
        // the queue with the lock released.
        let mut seat = Seat {
            pool: self,
            waiter: None,
        };
        let mut state = self.lock();
        self.in_use_again(&mut state);
        let mut my_attempt: Option<u64> = None;
        let mut yields_left = WAIT_YIELDS;
        loop {
            if let Some(conn) = seat
                .waiter
                .as_ref()
                .and_then(|waiter| state.take_handed(waiter.ticket))
            {
                // The handover took it out of the queue.
                seat.waiter = None;
                drop(state);
                if let Some(lease) = self.check_out(conn) {
                    return Ok(lease);
                }
                state = self.lock();
                continue;
            }
            let now = Instant::now();
            // One attempt per waiting call at a time: another only once some attempt ended.
            let may_start = my_attempt.is_none_or(|ended| state.attempts_ended != ended);
            if may_start
                && state.open + state.connecting < self.settings.max_size
                && state.retry_at.is_none_or(|at| at <= now)
            {
                my_attempt = Some(state.attempts_ended);
                let releases = self.reserve_attempt(&mut state);
                drop(state);
                // Connect on another thread, so this call still waits no longer than
                // `timeout` when a connect hangs (a server that never answers).
                if !self.start_attempt(releases) {
                    // No thread to be had: connect here; the wait is then the connect's.
                    if let Some(conn) = self.connect_one(Destination::Caller, releases) {
                        seat.leave();
                        return Ok(self.lease(conn));
                    }
                }
            } else if now >= deadline {
                let message = state.last_error.take().or_else(|| {
                    matches!(self.connector, Connector::Detached).then(|| {
                        format!(
                            "forksafe-pool: no connection of the pool rebuilt after fork() in \
                             process {} became free within {timeout:?}",
                            std::process::id()
                        )
                    })
                });
                drop(state);
                seat.leave();
                return Err(r2d2_error(message));
            } else if yields_left > 0
                && state.connecting == 0
                && state.open >= self.settings.max_size
            {
                // Every connection is checked out and none is being opened: one comes back
                // soon, most often from a thread waiting for a core. Give it the core (see the
                // module docs, "Under contention").
                yields_left -= 1;
                drop(state);
                std::thread::yield_now();
            } else {
                let waiter = seat
                    .waiter
                    .get_or_insert_with(|| state.enqueue(now))
                    .clone();
                // Only the longest waiting `get` keeps time for fairness; the others sleep until
                // they are woken or time out, and it wakes the next when it leaves the queue.
                let until = match state.fair_turn(&waiter, self.fair_after) {
                    Some(turn) if turn > now => turn.min(deadline),
                    _ => deadline,
                };
                state = self.wait_until(state, now, until, Some(&waiter.wake));
                if state
                    .fair_turn(&waiter, self.fair_after)
                    .is_some_and(|turn| turn <= Instant::now())
                {
                    self.starving.store(true, Ordering::SeqCst);
                }
                drop(state);
            }
            if let Some(lease) = self.take_idle() {
                seat.leave();
                return Ok(lease);
            }
            state = self.lock();
        }
    }

    /// A waiting `get` leaves the queue, taking back any connection handed to it meanwhile.
    fn leave_queue(self: &Arc<Self>, ticket: u64) {
        let mut state = self.lock();
        let was_front = state
            .queue
            .front()
            .is_some_and(|front| front.ticket == ticket);
        state.queue.retain(|waiter| waiter.ticket != ticket);
        if was_front {
            // Whatever it raised was for itself: the next in line keeps its own time.
            self.starving.store(false, Ordering::SeqCst);
            state.wake_front();
        }
        let handed = state.take_handed(ticket);
        drop(state);
        if let Some(conn) = handed {
            self.put_back(conn);
        }
    }

    /// Takes idle connections until one can be checked out (see `check_out`); `None` when
    /// none is idle.
    #[inline]
    fn take_idle(self: &Arc<Self>) -> Option<Lease<M>> {
        loop {
            if let Some(lease) = self.check_out(self.idle.take_any()?) {
                return Some(lease);
            }
        }
    }

    /// Checks out a connection taken out of its slot or handed over, unless it is of an
    /// earlier release, stale or (with `test_on_check_out`) invalid: then it is closed and
    /// `None` returned. Takes the lock only to close it, or when the pool is not full (to keep
    /// `min_idle`, as r2d2 does after every checkout).
    #[inline]
    fn check_out(self: &Arc<Self>, mut conn: Box<Pooled<M>>) -> Option<Lease<M>> {
        // Read after the connection was taken: a `release_idle` that emptied the slots before
        // this took it has counted the release by then.
        let outdated = conn.releases != self.releases.load(Ordering::SeqCst);
        if outdated || (self.ages() && self.is_stale(&conn, Instant::now())) {
            self.discard(*conn);
            return None;
        }
        // A connection of the latest release was opened while the pool was in use, so the
        // pool is not dormant: a checkout has nothing to clear. Read after the take, paired
        // with `closing`, which lowers it before `replenish` counts the idle slots.
        if !self.full.load(Ordering::SeqCst) {
            self.replenish(&mut self.lock());
        }
        if self.settings.test_on_check_out {
            // A panic in `is_valid` or the error handler closes the connection the way a failed
            // check does before it unwinds on, so that its count and slot are not lost.
            let checked = std::panic::catch_unwind(AssertUnwindSafe(|| {
                self.manager.is_valid(&mut conn.conn).map_err(|error| {
                    let message = error.to_string();
                    self.error_handler.handle_error(error);
                    message
                })
            }));
            match checked {
                Ok(Ok(())) => {}
                Ok(Err(message)) => {
                    self.lock().last_error = Some(message);
                    self.discard(*conn);
                    return None;
                }
                Err(panic) => {
                    self.discard(*conn);
                    std::panic::resume_unwind(panic);
                }
            }
        }
        Some(self.lease(conn))
    }

    fn lease(self: &Arc<Self>, conn: Box<Pooled<M>>) -> Lease<M> {
        Lease {
            pool: Arc::clone(self),
            conn: Some(conn),
        }
    }

    /// Closes a connection taken out of the pool, waking `get` calls that may use its slot.
    fn discard(self: &Arc<Self>, conn: Pooled<M>) {
        let mut state = self.lock();
        self.closing(&mut state, [conn.slot]);
        self.wake_all(state);
        self.close(conn);
    }

    /// The pool is used after `release_idle`: it keeps `min_idle` in the background again.
    fn in_use_again(self: &Arc<Self>, state: &mut State<M>) {
        if state.dormant {
            state.dormant = false;
            self.replenish(state);
        }
    }

    /// In the building process, starts attempts until `min_idle` connections are idle or
    /// being opened, within `max_size`, as r2d2 does after every checkout and close; none
    /// before a failure's back-off has passed, none while released and not used since, none
    /// for a retired generation.
    fn replenish(self: &Arc<Self>, state: &mut State<M>) {
        if !matches!(self.connector, Connector::ThreadPool { .. }) {
            return;
        }
        let wanted = self.settings.min_idle_or_max_size();
        while state.open + state.connecting < self.settings.max_size
            && (self.idle.count() as u32) + state.connecting < wanted
            && state.retry_at.is_none_or(|at| at <= Instant::now())
            && !state.dormant
            && !self.manager.is_retired()
        {
            let releases = self.reserve_attempt(state);
            // Always started: a thread pool takes every job.
            self.start_attempt(releases);
        }
    }

    /// Starts one attempt, counted in `connecting` by the caller at `releases`, whose
    /// connection goes idle; false if no thread could be had for it.
    fn start_attempt(self: &Arc<Self>, releases: u64) -> bool {
        let shared = Arc::clone(self);
        match &self.connector {
            Connector::ThreadPool { threads, .. } => {
                threads.execute(move || {
                    shared.connect_one(Destination::Idle, releases);
                });
                true
            }
            Connector::Detached => crate::sys::spawn_detached(Box::new(move || {
                shared.connect_one(Destination::Idle, releases);
            })),
        }
    }

    /// In the building process, closes idle connections past `idle_timeout` or
    /// `max_lifetime` every `REAPER_RATE`, like r2d2's reaper, until the pool is dropped.
    fn start_reaper(self: &Arc<Self>) {
        let Connector::ThreadPool {
            threads,
            reaper_rate,
        } = &self.connector
        else {
            return;
        };
        if !self.ages() {
            return;
        }
        let pool = Arc::downgrade(self);
        let rate = *reaper_rate;
        threads.execute_at_dynamic_rate(rate, move || {
            Weak::upgrade(&pool)?.reap();
            Some(rate)
        });
    }

    /// Closes the idle connections that are stale or of an earlier release. Each is taken out of its slot to be looked
    /// at; fresh ones go straight back, so a checkout meanwhile may miss one and wait on the
    /// lock held here, then find it.
    fn reap(self: &Arc<Self>) {
        let mut state = self.lock();
        let now = Instant::now();
        // Stable while the lock is held: only `release_idle` changes it, under the lock.
        let releases = self.releases.load(Ordering::SeqCst);
        let mut stale = Vec::new();
        for conn in self.idle.take_all() {
            // A connection of an earlier release that its returner put back just before the
            // release's count (see `put_idle`) closes here too: put back, it would outlive the
            // release and be inherited by the next fork.
            if conn.releases != releases || self.is_stale(&conn, now) {
                stale.push(conn);
            } else {
                self.idle.put(conn.slot as usize, conn);
            }
        }
        self.closing(&mut state, stale.iter().map(|conn| conn.slot));
        drop(state);
        for conn in stale {
            self.close(*conn);
        }
    }

    /// One connection attempt on the current thread, reserved by the caller (`connecting`
    /// counts it) when `Shared::releases` was `releases`. A new connection leaves `connecting`
    /// and counts as open in the same critical section that puts it where it goes, so no one
    /// counting the pool sees it in neither place (and starts a connect too many for
    /// `min_idle`, or finds it neither idle nor checked out). A connect that panics counts as
    /// a failed attempt whose error is the panic's message, so the slot it held is freed and
    /// the `get` waiting for it can say why.
    fn connect_one(
        self: &Arc<Self>,
        destination: Destination,
        releases: u64,
    ) -> Option<Box<Pooled<M>>> {
        let result = std::panic::catch_unwind(AssertUnwindSafe(|| {
            self.manager
                .connect()
                .and_then(|mut conn| self.customizer.on_acquire(&mut conn).map(|()| conn))
        }));
        let mut state = self.lock();
        state.connecting -= 1;
        state.attempts_ended += 1;
        let error = match result {
            Ok(Ok(conn)) => {
                state.open += 1;
                state.last_error = None;
                state.failures = 0;
                state.retry_at = None;
                let slot = state
                    .free_slots
                    .pop()
                    .expect("an open connection within max_size has a free slot");
                let conn = Box::new(Pooled {
                    conn,
                    extensions: r2d2::Extensions::new(),
                    birth: Instant::now(),
                    idle_since: None,
                    releases,
                    slot,
                });
                return match destination {
                    Destination::Caller => Some(conn),
                    // `release_idle` was called since the attempt was reserved: the connection
                    // belongs to what was released, so it is closed instead of going idle.
                    Destination::Idle if releases != self.releases.load(Ordering::SeqCst) => {
                        self.closing(&mut state, [slot]);
                        self.wake_all(state);
                        self.close(*conn);
                        None
                    }
                    Destination::Idle => {
                        let mut conn = conn;
                        conn.idle_since = self.settings.idle_timeout.map(|_| Instant::now());
                        self.idle.put(slot as usize, conn);
                        self.wake_all(state);
                        None
                    }
                };
            }
            Ok(Err(error)) => {
                self.failed(state, error.to_string());
                error
            }
            Err(panic) => {
                let message = panic
                    .downcast_ref::<&str>()
                    .copied()
                    .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
                    .unwrap_or("a panic without a message");
                self.failed(
                    state,
                    format!("forksafe-pool: connecting panicked: {message}"),
                );
                // The panic hook has already reported it where panics go; the error of the
                // waiting `get` names it. The error handler takes only the manager's errors.
                return None;
            }
        };
        self.error_handler.handle_error(error);
        None
    }

    /// Records a failed attempt: its error for the `get` calls that wait, and r2d2's back-off
    /// (200 ms doubling, at most half of `connection_timeout`) before the next. In the building
    /// process the pool tries again on its own once the back-off has passed, as r2d2's
    /// workers do, so that `min_idle` is reached without any `get` (a pool used only through
    /// `try_get` fills up). A forked child's pool has no thread to wait on; it tries again when
    /// a `get` or `warm_up` needs a connection.
    fn failed(self: &Arc<Self>, mut state: MutexGuard<'_, State<M>>, message: String) {
        self.counts_changed(&state);
        state.last_error = Some(message);
        state.failures = state.failures.saturating_add(1);
        let backoff = Duration::from_millis(200)
            .saturating_mul(1 << state.failures.saturating_sub(1).min(16))
            .min(self.settings.connection_timeout / 2);
        state.retry_at = Some(Instant::now() + backoff);
        if let Connector::ThreadPool { threads, .. } = &self.connector {
            // Each failure schedules one retry at the end of its back-off; one whose time comes
            // while a later failure's back-off still runs starts nothing (`replenish` waits for
            // `retry_at`), and neither does one of a dropped pool or a retired generation.
            let pool = Arc::downgrade(self);
            threads.execute_after(backoff, move || {
                if let Some(pool) = pool.upgrade() {
                    pool.replenish(&mut pool.lock());
                }
            });
        }
        // A waiter may take the freed slot (after the back-off).
        self.wake_all(state);
    }

    /// Wakes every waiting `get`, `build` and `warm_up`, if any.
    fn wake_all(&self, state: MutexGuard<'_, State<M>>) {
        for waiter in &state.queue {
            waiter.wake.notify();
        }
        drop(state);
        if self.waiters.load(Ordering::SeqCst) > 0 {
            self.changed.notify_all();
        }
    }

    /// Takes a connection back, like r2d2's `put_back`: broken (or past `max_lifetime`) ones,
    /// and those opened before the latest `release_idle`, are closed through the customizer's
    /// `on_release`. Any other goes back into its slot without the lock; only a `get` waiting
    /// for it costs the lock and a wake-up.
    fn put_back(self: &Arc<Self>, mut conn: Box<Pooled<M>>) {
        let now = self.ages().then(Instant::now);
        let broken = self.manager.has_broken(&mut conn.conn)
            || self
                .settings
                .max_lifetime
                .zip(now)
                .is_some_and(|(lifetime, now)| now - conn.birth >= lifetime);
        if broken || conn.releases != self.releases.load(Ordering::SeqCst) {
            self.discard(*conn);
            return;
        }
        // Idle from now, whether it goes to its slot or to a waiting `get`, which judges it by
        // this.
        conn.idle_since = self.settings.idle_timeout.and(now);
        if self.starving.load(Ordering::SeqCst) {
            match self.hand_over(conn) {
                Some(unwanted) => conn = unwanted,
                None => return,
            }
        }
        self.put_idle(conn);
    }

    /// Puts a connection back into its slot, then closes it if a `release_idle` came first, or
    /// wakes a waiting `get`.
    fn put_idle(self: &Arc<Self>, mut conn: Box<Pooled<M>>) {
        loop {
            let (slot, releases) = (conn.slot as usize, conn.releases);
            self.idle.put(slot, conn);
            // Both read after the connection is back in its slot. A `release_idle` that emptied
            // the slots before then has counted the release: the connection is taken out again
            // and closed (unless a `get` or the reaper took it first; either closes it). A `get`
            // that counted itself as waiting before then is woken; one that counts itself later
            // sees the slot full and does not wait.
            if releases == self.releases.load(Ordering::SeqCst) {
                break;
            }
            match self.idle.take(slot) {
                None => return,
                // What the slot holds now may be a newer connection that was given the same
                // slot after ours was closed: that one stays.
                Some(taken) if taken.releases == self.releases.load(Ordering::SeqCst) => {
                    conn = taken;
                }
                Some(taken) => {
                    self.discard(*taken);
                    return;
                }
            }
        }
        if self.waiters.load(Ordering::SeqCst) > 0 {
            // Taking the lock makes sure a waiter, which counted itself under the lock, is
            // asleep by now. The longest waiting of those asleep is woken.
            let state = self.lock();
            if let Some(waiter) = state
                .queue
                .iter()
                .find(|waiter| waiter.wake.asleep.load(Ordering::Relaxed))
            {
                waiter.wake.notify();
            }
        }
    }

    /// Hands a connection put back to the longest waiting `get`; gives it back if none waits.
    #[cold]
    #[inline(never)]
    fn hand_over(&self, conn: Box<Pooled<M>>) -> Option<Box<Pooled<M>>> {
        let mut state = self.lock();
        self.starving.store(false, Ordering::SeqCst);
        let Some(waiter) = state.queue.pop_front() else {
            return Some(conn);
        };
        state.handed.push((waiter.ticket, conn));
        state.next_fair_turn = Instant::now() + self.fair_after;
        waiter.wake.notify();
        state.wake_front();
        None
    }

    fn close(&self, conn: Pooled<M>) {
        self.customizer.on_release(conn.conn);
    }
}

/// A connection checked out of a [`StdPool`]; goes back when dropped.
pub(crate) struct Lease<M: ManageConnection> {
    pool: Arc<Shared<M>>,
    /// `None` only while dropping.
    conn: Option<Box<Pooled<M>>>,
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

#[cfg(test)]
mod tests_support {
    pub(super) use super::tests::{reaping_pool, Counting};
    use super::*;
    pub(super) fn settings(size: u32) -> Settings {
        Settings {
            max_size: size,
            min_idle: None,
            test_on_check_out: false,
            max_lifetime: None,
            idle_timeout: None,
            connection_timeout: Duration::from_secs(5),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::descriptors::DescriptorTable;
    use crate::manager::{CustomizerAdapter, ErrorHandlerAdapter};
    use crate::stats::Counters;
    use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

    /// Connections are numbers; counts every connect.
    #[derive(Debug, Default)]
    pub(super) struct Counting(pub(super) AtomicU32);

    impl ManageConnection for Counting {
        type Connection = u32;
        type Error = std::io::Error;

        fn connect(&self) -> Result<u32, std::io::Error> {
            Ok(self.0.fetch_add(1, Ordering::SeqCst))
        }

        fn is_valid(&self, _: &mut u32) -> Result<(), std::io::Error> {
            Ok(())
        }

        fn has_broken(&self, _: &mut u32) -> bool {
            false
        }
    }

    /// A building-process pool of `Counting` connections that reaps every 20 ms.
    pub(super) fn reaping_pool(manager: &Arc<Counting>, settings: Settings) -> StdPool<Counting> {
        let manager = ForkSafeManager::new(
            Arc::clone(manager),
            DescriptorTable::new(settings.max_size, Arc::new(Counters::default())),
            None,
            None,
            Arc::new(AtomicBool::new(false)),
        );
        StdPool::new(
            manager,
            settings,
            Connector::ThreadPool {
                threads: Arc::new(ScheduledThreadPool::new(1)),
                reaper_rate: Duration::from_millis(20),
            },
            Box::new(ErrorHandlerAdapter(Arc::new(r2d2::NopErrorHandler))),
            Box::new(CustomizerAdapter(Arc::new(r2d2::NopConnectionCustomizer))),
        )
    }

    #[test]
    fn the_reaper_replaces_idle_connections_past_idle_timeout() {
        let manager = Arc::new(Counting::default());
        let pool = reaping_pool(
            &manager,
            Settings {
                max_size: 2,
                min_idle: Some(2),
                test_on_check_out: false,
                max_lifetime: None,
                idle_timeout: Some(Duration::from_millis(50)),
                connection_timeout: Duration::from_secs(5),
            },
        );
        pool.wait_for_initial_connections(Duration::from_secs(5))
            .expect("initial connections");
        assert_eq!(manager.0.load(Ordering::SeqCst), 2);
        let deadline = Instant::now() + Duration::from_secs(5);
        // Untouched, the idle pair times out, is reaped, and `min_idle` opens another pair.
        while manager.0.load(Ordering::SeqCst) < 4 {
            assert!(Instant::now() < deadline, "nothing reaped");
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(pool.state().connections <= 2, "{:?}", pool.state());
    }

    #[test]
    fn without_a_time_limit_nothing_is_reaped_nor_timestamped() {
        let manager = Arc::new(Counting::default());
        let pool = reaping_pool(
            &manager,
            Settings {
                max_size: 1,
                min_idle: None,
                test_on_check_out: false,
                max_lifetime: None,
                idle_timeout: None,
                connection_timeout: Duration::from_secs(5),
            },
        );
        pool.wait_for_initial_connections(Duration::from_secs(5))
            .expect("initial connection");
        drop(pool.get_timeout(Duration::from_secs(1)).expect("checkout"));
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(
            manager.0.load(Ordering::SeqCst),
            1,
            "a connection was replaced"
        );
        let idle = pool.shared.idle.take_all();
        assert_eq!(idle.len(), 1);
        assert!(idle.iter().all(|conn| conn.idle_since.is_none()));
    }
}

#[cfg(test)]
mod review_tests {
    use super::tests::Counting;
    use super::tests_support::settings;
    use super::*;
    use crate::descriptors::DescriptorTable;
    use crate::manager::{CustomizerAdapter, ErrorHandlerAdapter};
    use crate::stats::Counters;

    /// `Counting` connections whose `is_valid` panics while `panics` is set.
    #[derive(Debug, Default)]
    struct PanickyCheck {
        connects: Counting,
        panics: AtomicBool,
    }

    impl ManageConnection for PanickyCheck {
        type Connection = u32;
        type Error = std::io::Error;

        fn connect(&self) -> Result<u32, std::io::Error> {
            self.connects.connect()
        }

        fn is_valid(&self, _: &mut u32) -> Result<(), std::io::Error> {
            assert!(!self.panics.load(Ordering::SeqCst), "is_valid panics");
            Ok(())
        }

        fn has_broken(&self, _: &mut u32) -> bool {
            false
        }
    }

    fn pool<M: ManageConnection>(
        manager: &Arc<M>,
        settings: Settings,
        fair_after: Duration,
    ) -> StdPool<M> {
        let manager = ForkSafeManager::new(
            Arc::clone(manager),
            DescriptorTable::new(settings.max_size, Arc::new(Counters::default())),
            None,
            None,
            Arc::new(AtomicBool::new(false)),
        );
        StdPool::with_fairness(
            manager,
            settings,
            Connector::ThreadPool {
                threads: Arc::new(ScheduledThreadPool::new(1)),
                reaper_rate: Duration::from_secs(3600),
            },
            Box::new(ErrorHandlerAdapter(Arc::new(r2d2::NopErrorHandler))),
            Box::new(CustomizerAdapter(Arc::new(r2d2::NopConnectionCustomizer))),
            fair_after,
        )
    }

    /// Waits until `count` `get` calls are queued.
    fn until_queued<M: ManageConnection>(pool: &StdPool<M>, count: usize) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while pool.shared.lock().queue.len() < count {
            assert!(Instant::now() < deadline, "no get queued");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// A connection handed to a starving `get` is idle from its return, not from before its
    /// last checkout: with `idle_timeout` 50 ms, a lease held 100 ms while a `get` waits (and,
    /// after 10 ms, asks for a handover) goes to that `get` as it is, and nothing is opened a
    /// second time.
    #[test]
    fn a_connection_handed_over_is_judged_idle_from_its_return() {
        let manager = Arc::new(Counting::default());
        let pool = pool(
            &manager,
            Settings {
                idle_timeout: Some(Duration::from_millis(50)),
                ..settings(1)
            },
            Duration::from_millis(10),
        );
        pool.wait_for_initial_connections(Duration::from_secs(5))
            .expect("initial connection");
        let held = pool.get_timeout(Duration::from_secs(1)).expect("checkout");
        let waiter = {
            let pool = pool.clone();
            std::thread::spawn(move || {
                let lease = pool.get_timeout(Duration::from_secs(5)).expect("get");
                *(*lease).conn
            })
        };
        until_queued(&pool, 1);
        // The waiter raises `starving` after 10 ms: the return hands the connection to it.
        let deadline = Instant::now() + Duration::from_secs(5);
        while !pool.shared.starving.load(Ordering::SeqCst) {
            assert!(
                Instant::now() < deadline,
                "the waiter never asked for a handover"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        std::thread::sleep(Duration::from_millis(100));
        let first = *(*held).conn;
        drop(held);
        assert_eq!(
            waiter.join().expect("waiter"),
            first,
            "the waiter got a new one"
        );
        assert_eq!(manager.0.load(Ordering::SeqCst), 1, "connected twice");
    }

    /// A `get` that panics in user code while queued (here `is_valid`, on the connection it was
    /// woken for, just after raising `starving`) leaves the queue and closes what it held: the
    /// next connection put back goes to the slot, not to a dead ticket, and the pool keeps its
    /// full size.
    #[test]
    fn a_get_that_panics_while_queued_leaves_the_queue() {
        let manager = Arc::new(PanickyCheck::default());
        let pool = pool(
            &manager,
            Settings {
                test_on_check_out: true,
                ..settings(2)
            },
            Duration::ZERO,
        );
        pool.wait_for_initial_connections(Duration::from_secs(5))
            .expect("initial connections");
        let first = pool.get_timeout(Duration::from_secs(1)).expect("checkout");
        let second = pool.get_timeout(Duration::from_secs(1)).expect("checkout");
        let waiter = {
            let pool = pool.clone();
            std::thread::spawn(move || drop(pool.get_timeout(Duration::from_secs(5))))
        };
        until_queued(&pool, 1);
        manager.panics.store(true, Ordering::SeqCst);
        drop(first);
        assert!(
            waiter.join().is_err(),
            "is_valid did not panic in the waiter"
        );
        manager.panics.store(false, Ordering::SeqCst);
        drop(second);
        {
            let state = pool.shared.lock();
            assert!(state.queue.is_empty(), "a dead get stays queued");
            assert!(state.handed.is_empty(), "a connection went to a dead get");
        }
        assert!(!pool.shared.starving.load(Ordering::SeqCst));
        let both = [
            pool.get_timeout(Duration::from_secs(1)),
            pool.get_timeout(Duration::from_secs(1)),
        ];
        assert!(both.iter().all(Result::is_ok), "the pool lost a connection");
    }
}

#[cfg(test)]
mod contention_tests {
    use super::tests_support::*;
    use super::*;

    /// Threads racing on the lock-free slots and the handover to waiting calls: every
    /// connection is back in its slot afterwards, none was opened twice, and every thread got
    /// a connection within its timeout (each checks out at least once).
    #[test]
    fn every_connection_comes_back_under_contention() {
        for (threads, size) in [(32u32, 32u32), (32, 4), (8, 2), (128, 4)] {
            let manager = Arc::new(Counting::default());
            let pool = reaping_pool(&manager, settings(size));
            pool.wait_for_initial_connections(Duration::from_secs(5))
                .expect("initial connections");
            let stop = Arc::new(AtomicBool::new(false));
            let workers: Vec<_> = (0..threads)
                .map(|_| {
                    let (pool, stop) = (pool.clone(), Arc::clone(&stop));
                    std::thread::spawn(move || {
                        let mut first = true;
                        while first || !stop.load(Ordering::Relaxed) {
                            drop(pool.get_timeout(Duration::from_secs(10)).expect("checkout"));
                            first = false;
                        }
                    })
                })
                .collect();
            std::thread::sleep(Duration::from_millis(200));
            stop.store(true, Ordering::Relaxed);
            for worker in workers {
                worker.join().expect("worker");
            }
            let state = pool.state();
            assert_eq!(
                (state.connections, state.idle_connections),
                (size, size),
                "{threads} threads, pool of {size}"
            );
            assert_eq!(manager.0.load(Ordering::SeqCst), size);
        }
    }

    /// A connection put back while `get` calls wait reaches one of them (woken by the return,
    /// or at the latest by the longest waiting one's fairness timer), never left idle while
    /// they sleep out their 10 s timeout; 300 times, the return racing the waiters' going to
    /// sleep.
    #[test]
    fn a_connection_put_back_wakes_a_waiting_get() {
        let manager = Arc::new(Counting::default());
        let pool = reaping_pool(&manager, settings(1));
        pool.wait_for_initial_connections(Duration::from_secs(5))
            .expect("initial connection");
        for round in 0..300u64 {
            let held = pool.get_timeout(Duration::from_secs(1)).expect("checkout");
            let waiters: Vec<_> = (0..2)
                .map(|_| {
                    let pool = pool.clone();
                    std::thread::spawn(move || {
                        let began = Instant::now();
                        drop(pool.get_timeout(Duration::from_secs(10)).expect("checkout"));
                        began.elapsed()
                    })
                })
                .collect();
            // From "before the waiters sleep" to "long after".
            std::thread::sleep(Duration::from_micros(round % 30 * 50));
            drop(held);
            for waiter in waiters {
                let waited = waiter.join().expect("waiter");
                assert!(
                    waited < Duration::from_secs(2),
                    "round {round}: a get waited {waited:?} for a connection put back"
                );
            }
        }
    }
}
