//! The pool one process checks out from: r2d2's checkout rules, on std's `Mutex` and
//! `Condvar` and a lock-free idle list. A forked child always runs on it (reporting r2d2's
//! events to an event handler, with event values made by `r2d2_compat`); the process that built
//! the `Pool` does too, unless an event handler is set (there such a pool keeps an r2d2 pool;
//! see `generation_pool`).
//!
//! Why not r2d2 in a forked child: a fork leaves parking_lot's process-global table of parked
//! threads as the parent's threads had it ([docs/parking-lot.md] has the story and its
//! measurements). Why no std thread in a child either: std's thread start takes a process-wide
//! lock a fork may have frozen ([docs/how-it-works.md], "What a forked child must not do").
//! This pool's own state is all inside the pool (atomics, a `Mutex`, `Condvar`s: futex words in
//! the object, no registry of threads), so a pool made in the child depends on nothing the fork
//! left behind, and a fork that catches a parent thread anywhere in the parent's pool leaves the
//! child nothing to trip on: the child never touches that pool.
//!
//! # The map
//!
//! | file | concept |
//! |---|---|
//! | `mod.rs` | [`ProcessPool`], the shared state and an open connection ([`Pooled`]) |
//! | `idle_slots.rs` | the idle connections, one atomic slot each, taken and given back without the lock |
//! | `checkout.rs` | the fast path: checkout, return ([`Lease`]), closing a connection |
//! | `state.rs` | the counts under the lock, and taking the lock under contention |
//! | `waiting.rs` | a `get` that waits: the queue, wake-ups and the fair handover |
//! | `connecting.rs` | opening connections: where ([`Connector`]), `min_idle`, failures and back-off |
//! | `upkeep.rs` | `build`'s and `warm_up`'s fill, the reaper, a forked child's upkeep thread, `release_idle` |
//! | `models.rs` | loom models of the lock-free parts (`--cfg forksafe_loom`, see `crate::sync`) |
//!
//! # The invariants
//!
//! 1. **Counts and places agree.** `open` counts the connections idle in a slot, checked out, or
//!    handed to a waiting `get`; `connecting` the attempts running. A new connection leaves
//!    `connecting` and appears open and idle (or checked out) in one critical section, so a
//!    `replenish` never sees it in neither place and starts a connect too many, and `build` never
//!    returns with a connection counted open that is not yet idle. A checkout or a return of an
//!    idle connection changes no count, which is why it needs no lock.
//! 2. **A slot holds only its owner.** Each open connection owns one slot number for its life
//!    (handed out and taken back under the lock), so a slot is filled only by that connection and
//!    every access is one exchange that hands the box to exactly one thread (`idle_slots`).
//! 3. **Three pairings** keep the lock-free side and the counts in agreement. In each, both
//!    sides write their own atomic and then read the other's, all sequentially consistent (so
//!    that of two racing threads at least one sees the other; `sync::seq_cst_pairing` marks each
//!    for the models):
//!    - `full` (`open + connecting` has reached `max_size`): a checkout that finds it set needs no
//!      `min_idle` top-up and skips the lock. A close clears it before `replenish` counts the idle
//!      slots; a checkout reads it after taking its slot.
//!    - `releases`: `release_idle` counts the release, then empties the slots; a return puts the
//!      connection back, then reads the count. Whoever takes a connection of an earlier release
//!      out of a slot (its returner, a checkout, the reaper) closes it; nobody puts one back.
//!    - `waiters`: a `get` about to wait counts itself, then looks at the slots once more; a
//!      return puts its connection back, then reads the count, and if someone waits takes the
//!      lock (so the waiter is asleep by then) and wakes one.
//!
//!    `starving` is only a hint: a return that reads it set hands its connection to the longest
//!    waiting `get` under the lock; one that misses it puts the connection back, and the
//!    `waiters` pairing wakes that `get`.
//! 4. **User code runs unlocked**, and a `get`'s place in the queue is a guard: a panic in a
//!    connect, `is_valid`, a customizer or an error handler leaves the counts, the queue and the
//!    slots consistent.
//!
//! [docs/parking-lot.md]: https://github.com/forksafe-pool/forksafe-pool/blob/main/docs/parking-lot.md
//! [docs/how-it-works.md]: https://github.com/forksafe-pool/forksafe-pool/blob/main/docs/how-it-works.md#what-a-forked-child-must-not-do-pool-or-no-pool

use std::collections::VecDeque;
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use r2d2::{CustomizeConnection, HandleError, HandleEvent, ManageConnection};

use crate::config::Settings;
use crate::manager::{ConnectError, ForkSafeManager, Tracked};
use crate::r2d2_compat::{checkout_event, r2d2_state, timeout_event};
use crate::sync::{self, AtomicBool, AtomicU32, AtomicU64, Condvar, Mutex};

mod checkout;
mod connecting;
mod idle_slots;
#[cfg(all(test, forksafe_loom))]
mod models;
mod state;
#[cfg(all(test, not(forksafe_loom)))]
mod test_support;
mod upkeep;
mod waiting;

pub(crate) use checkout::Lease;
pub(crate) use connecting::Connector;
use idle_slots::IdleSlots;
use state::State;
pub(crate) use upkeep::REAPER_RATE;
use waiting::FAIR_AFTER;

type Conn<M> = Tracked<<M as ManageConnection>::Connection>;

/// The next connection's number in this process, like r2d2's (which numbers connections
/// across all pools). A std atomic: a counter pairs with nothing the models check, and a loom
/// atomic cannot live in a static.
fn next_connection_id() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

type Error<M> = ConnectError<<M as ManageConnection>::Error>;

/// The user's code the pool calls, fitted to the pool's connection and error types.
pub(crate) struct Hooks<M: ManageConnection> {
    pub(crate) error_handler: Box<dyn HandleError<Error<M>>>,
    pub(crate) customizer: Box<dyn CustomizeConnection<Conn<M>, Error<M>>>,
    /// r2d2's events; only given in a forked child (the building process runs a pool with a
    /// handler on r2d2).
    pub(crate) events: Option<Arc<dyn HandleEvent>>,
}

/// A pool on std's locks; cheap to clone, like r2d2's.
pub(crate) struct ProcessPool<M: ManageConnection> {
    shared: Arc<Shared<M>>,
}

struct Shared<M: ManageConnection> {
    manager: ForkSafeManager<M>,
    settings: Settings,
    connector: Connector,
    error_handler: Box<dyn HandleError<Error<M>>>,
    customizer: Box<dyn CustomizeConnection<Conn<M>, Error<M>>>,
    /// The user's event handler, in a forked child (the building process runs a pool with one
    /// on r2d2): r2d2's events, made by `r2d2_compat`. Without one the clock is not read for
    /// events.
    events: Option<Arc<dyn HandleEvent>>,
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
    /// `ProcessPool::release_idle`). Changed under the lock.
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

/// An open connection, boxed once for its life: it moves between its idle slot and its leases
/// as a pointer.
struct Pooled<M: ManageConnection> {
    conn: Conn<M>,
    extensions: r2d2::Extensions,
    /// Its number in this process, for events (`next_connection_id`).
    id: u64,
    birth: Instant,
    /// When it was last checked out; only kept with an event handler (for `CheckinEvent`).
    checked_out: Option<Instant>,
    /// Whether its `ReleaseEvent` was reported (it is about to be closed).
    released: bool,
    /// When it went idle; only kept with an `idle_timeout`.
    idle_since: Option<Instant>,
    /// `Shared::releases` when its attempt was reserved.
    releases: u64,
    /// The idle slot it owns.
    slot: u32,
}

impl<M: ManageConnection> Drop for Shared<M> {
    fn drop(&mut self) {
        if let Connector::Detached { upkeep, .. } = &self.connector {
            upkeep.stop();
        }
    }
}

impl<M: ManageConnection> Clone for ProcessPool<M> {
    fn clone(&self) -> Self {
        ProcessPool {
            shared: Arc::clone(&self.shared),
        }
    }
}

impl<M: ManageConnection> fmt::Debug for ProcessPool<M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProcessPool")
            .field("settings", &self.shared.settings)
            .finish_non_exhaustive()
    }
}

impl<M: ManageConnection> ProcessPool<M> {
    /// Makes the pool without waiting for connections, like r2d2's `build_unchecked`, and
    /// starts opening `min_idle` connections and reaping stale ones in the background, as r2d2
    /// does: on the thread pool in the building process, on an upkeep thread of its own in a
    /// forked child (see `upkeep`).
    pub(crate) fn new(
        manager: ForkSafeManager<M>,
        settings: Settings,
        connector: Connector,
        hooks: Hooks<M>,
    ) -> Self {
        Self::with_fairness(manager, settings, connector, hooks, FAIR_AFTER)
    }

    /// `new`, with the wait after which a `get` is handed the next connection put back.
    pub(super) fn with_fairness(
        manager: ForkSafeManager<M>,
        settings: Settings,
        connector: Connector,
        hooks: Hooks<M>,
        fair_after: Duration,
    ) -> Self {
        let Hooks {
            error_handler,
            customizer,
            events,
        } = hooks;
        let pool = ProcessPool {
            shared: Arc::new(Shared {
                manager,
                settings,
                connector,
                error_handler,
                customizer,
                events,
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
                    next_fair_turn: sync::now(),
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
        pool.shared.start_upkeep();
        pool
    }

    /// Checks out a connection, waiting at most `timeout`, like `r2d2::Pool::get_timeout`.
    #[inline]
    pub(crate) fn get_timeout(&self, timeout: Duration) -> Result<Lease<M>, r2d2::Error> {
        if self.shared.events.is_some() {
            return self.get_timeout_with_events(timeout);
        }
        match self.shared.take_idle() {
            Some(lease) => Ok(lease),
            None => self
                .shared
                .wait_for_connection(sync::now() + timeout, timeout),
        }
    }

    /// `get_timeout` with an event handler: a `CheckoutEvent` with the wait, or a
    /// `TimeoutEvent`, as r2d2 reports them.
    #[cold]
    #[inline(never)]
    fn get_timeout_with_events(&self, timeout: Duration) -> Result<Lease<M>, r2d2::Error> {
        let start = sync::now();
        let result = match self.shared.take_idle() {
            Some(lease) => Ok(lease),
            None => self.shared.wait_for_connection(start + timeout, timeout),
        };
        let Some(events) = &self.shared.events else {
            return result;
        };
        match result {
            Ok(mut lease) => {
                let now = sync::now();
                let id = lease.checked_out_at(now);
                if let Some(event) = checkout_event(id, now - start) {
                    events.handle_checkout(event);
                }
                Ok(lease)
            }
            Err(error) => {
                events.handle_timeout(timeout_event(timeout));
                Err(error)
            }
        }
    }

    /// An idle connection if there is one, without waiting, like `r2d2::Pool::try_get` (which
    /// reports no checkout event).
    pub(crate) fn try_get(&self) -> Option<Lease<M>> {
        let mut lease = self.shared.take_idle();
        match &mut lease {
            None => self.shared.in_use_again(&mut self.shared.lock()),
            Some(lease) if self.shared.events.is_some() => {
                lease.checked_out_at(sync::now());
            }
            Some(_) => {}
        }
        lease
    }

    /// Connection counts, like `r2d2::Pool::state`.
    pub(crate) fn state(&self) -> r2d2::State {
        let state = self.shared.lock();
        r2d2_state(state.open, self.shared.idle.count() as u32)
    }
}
