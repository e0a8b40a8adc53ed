//! Opening connections: where the attempts run, `min_idle`, and failures.
//!
//! In the building process connections are opened on the pool's scheduled thread pool (the
//! `thread_pool` setting, r2d2's three threads by default): `build` waits for `min_idle` of
//! them, a checkout that leaves fewer than `min_idle` idle opens more in the background, and a
//! failed attempt schedules a retry once its back-off has passed, so the pool reaches `min_idle`
//! on its own when the server comes back, as r2d2's does (r2d2's worker retries the very
//! attempt that failed, until it succeeds; this pool tops up to `min_idle`, which comes to the
//! same unless a `get` started the attempt and `min_idle` is below `max_size`).
//!
//! In a forked child no std thread can be relied on (docs/how-it-works.md, "What a forked child
//! must not do") and the thread pool's
//! threads are the parent's, so each attempt runs on a short-lived thread made with
//! `pthread_create` directly (`sys::spawn_detached`), and the rest of r2d2's background work —
//! waking when a back-off ends, the reaper — on one long-lived thread per pool made the same
//! way (`upkeep`). The same rules then hold as in the building process: `min_idle` is kept
//! from the pool's first use in the child, and failed attempts are retried after their
//! back-off. A `get` waits for an attempt no longer than its timeout: a connect that hangs (a
//! server that never answers) does not hold `get` past `connection_timeout`. A connection that
//! arrives after its caller gave up goes idle in the pool, as with r2d2's workers. Only if no
//! thread can be made at all does `get` connect on its own thread. A connect that panics, here
//! or on the thread pool, counts as a failed attempt whose error is the panic's message, so its
//! slot is freed and the waiting `get` says why it got nothing.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use r2d2::ManageConnection;
use scheduled_thread_pool::ScheduledThreadPool;

use super::state::State;
use super::upkeep::UpkeepSignal;
use super::{next_connection_id, Pooled, Shared};
use crate::error_kind::CONNECT_PANICKED;
use crate::r2d2_compat::acquire_event;
use crate::sync::{self, MutexGuard, Ordering};

/// Where a pool opens its connections.
pub(crate) enum Connector {
    /// The process that built the `Pool`: on its scheduled thread pool, like r2d2, which also
    /// keeps `min_idle` up and reaps stale connections every `reaper_rate`.
    ThreadPool {
        threads: Arc<ScheduledThreadPool>,
        reaper_rate: Duration,
    },
    /// A forked child: each attempt on a short-lived thread of its own, the waits for a
    /// back-off and the reaper (every `reaper_rate`) on the pool's upkeep thread, which
    /// `upkeep` tells to stop when the pool is dropped (see the module docs).
    Detached {
        upkeep: Arc<UpkeepSignal>,
        reaper_rate: Duration,
    },
    /// A loom model's: each attempt on a thread of the model, keeping `min_idle` as the
    /// building process does, with no reaper and no retries (a model runs `reap` itself).
    #[cfg(forksafe_loom)]
    ModelThreads,
}

impl Connector {
    /// A forked child's connector, reaping every `reaper_rate`.
    pub(crate) fn detached(reaper_rate: Duration) -> Connector {
        Connector::Detached {
            upkeep: Arc::new(UpkeepSignal::new()),
            reaper_rate,
        }
    }

    /// Whether the pool keeps `min_idle` in the background.
    fn keeps_min_idle(&self) -> bool {
        match self {
            Connector::ThreadPool { .. } => true,
            Connector::Detached { .. } => true,
            #[cfg(forksafe_loom)]
            Connector::ModelThreads => true,
        }
    }
}

/// Where a new connection goes.
pub(super) enum Destination {
    /// To the thread that connected, checked out.
    Caller,
    /// Into the idle list, for whichever `get` wakes.
    Idle,
}

impl<M: ManageConnection> Shared<M> {
    /// The pool is used after `release_idle`: it keeps `min_idle` in the background again.
    pub(super) fn in_use_again(self: &Arc<Self>, state: &mut State<M>) {
        if state.dormant {
            state.dormant = false;
            self.replenish(state);
        }
    }

    /// Starts attempts until `min_idle` connections are idle or being opened, within
    /// `max_size`, as r2d2 does after every checkout and close; none before a failure's
    /// back-off has passed, none while released and not used since, none for a retired
    /// generation. In a forked child, an attempt for which no thread can be made is given
    /// back; the upkeep thread tries again at the next reaper run or failure.
    pub(super) fn replenish(self: &Arc<Self>, state: &mut State<M>) {
        if !self.connector.keeps_min_idle() {
            return;
        }
        let wanted = self.settings.min_idle_or_max_size();
        // `full` was just written (`counts_changed`); the slots are read below: against a
        // checkout's "take a slot, then read `full`".
        sync::seq_cst_pairing();
        while state.open + state.connecting < self.settings.max_size
            && (self.idle.count() as u32) + state.connecting < wanted
            && state.retry_at.is_none_or(|at| at <= sync::now())
            && !state.dormant
            && !self.manager.is_retired()
        {
            let releases = self.reserve_attempt(state);
            // A thread pool takes every job; a forked child may have no thread to give.
            if !self.start_attempt(releases) {
                state.connecting -= 1;
                self.counts_changed(state);
                break;
            }
        }
    }

    /// Starts one attempt, counted in `connecting` by the caller at `releases`, whose
    /// connection goes idle; false if no thread could be had for it.
    pub(super) fn start_attempt(self: &Arc<Self>, releases: u64) -> bool {
        let shared = Arc::clone(self);
        match &self.connector {
            Connector::ThreadPool { threads, .. } => {
                threads.execute(move || {
                    shared.connect_one(Destination::Idle, releases);
                });
                true
            }
            Connector::Detached { .. } => crate::sys::spawn_detached(Box::new(move || {
                shared.connect_one(Destination::Idle, releases);
            })),
            #[cfg(forksafe_loom)]
            Connector::ModelThreads => {
                loom::thread::spawn(move || {
                    shared.connect_one(Destination::Idle, releases);
                });
                true
            }
        }
    }

    /// One connection attempt on the current thread, reserved by the caller (`connecting`
    /// counts it) when `Shared::releases` was `releases`. A new connection leaves `connecting`
    /// and counts as open in the same critical section that puts it where it goes, so no one
    /// counting the pool sees it in neither place (and starts a connect too many for
    /// `min_idle`, or finds it neither idle nor checked out). A connect that panics counts as
    /// a failed attempt whose error is the panic's message, so the slot it held is freed and
    /// the `get` waiting for it can say why.
    pub(super) fn connect_one(
        self: &Arc<Self>,
        destination: Destination,
        releases: u64,
    ) -> Option<Box<Pooled<M>>> {
        let result = std::panic::catch_unwind(AssertUnwindSafe(|| {
            self.manager
                .connect()
                .and_then(|mut conn| self.customizer.on_acquire(&mut conn).map(|()| conn))
        }));
        let id = next_connection_id();
        if let (Some(events), Ok(Ok(_))) = (&self.events, &result) {
            events.handle_acquire(acquire_event(id));
        }
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
                    id,
                    birth: sync::now(),
                    checked_out: None,
                    released: false,
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
                        conn.idle_since = self.settings.idle_timeout.map(|_| sync::now());
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
                self.failed(state, format!("{CONNECT_PANICKED}{message}"));
                // The panic hook has already reported it where panics go; the error of the
                // waiting `get` names it. The error handler takes only the manager's errors.
                return None;
            }
        };
        self.error_handler.handle_error(error);
        None
    }

    /// Records a failed attempt: its error for the `get` calls that wait, and r2d2's back-off
    /// (200 ms doubling, at most half of `connection_timeout`) before the next. The pool tries
    /// again on its own once the back-off has passed, as r2d2's workers do, so that `min_idle`
    /// is reached without any `get` (a pool used only through `try_get` fills up): on the thread
    /// pool in the building process, on the upkeep thread in a forked child.
    pub(super) fn failed(self: &Arc<Self>, mut state: MutexGuard<'_, State<M>>, message: String) {
        self.counts_changed(&state);
        state.last_error = Some(message);
        state.failures = state.failures.saturating_add(1);
        let backoff = Duration::from_millis(200)
            .saturating_mul(1 << state.failures.saturating_sub(1).min(16))
            .min(self.settings.connection_timeout / 2);
        state.retry_at = Some(sync::now() + backoff);
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
        if let Connector::Detached { upkeep, .. } = &self.connector {
            // Its next wake-up is at the latest `retry_at`.
            upkeep.kick();
        }
    }
}
