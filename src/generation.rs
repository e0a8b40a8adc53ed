//! One generation of a [`Pool`](crate::Pool): the inner pool a single process checks out from.
//!
//! A `Pool` holds one generation per process (see `fork::PerProcess`). The process that
//! builds the `Pool` builds the first; a forked child builds its own on first use, and
//! `release_idle` on a pool on r2d2 retires the current one so that the next use builds
//! another. What a generation runs on depends only on where it is built ([`Site`]): r2d2 in
//! the building process of a pool with an event handler, this crate's `ProcessPool` everywhere
//! else, and no pool at all in a forked child of a pool built with `OnFork::Fail`.

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use r2d2::event::{AcquireEvent, CheckinEvent, CheckoutEvent, ReleaseEvent, TimeoutEvent};
use r2d2::{CustomizeConnection, HandleEvent, ManageConnection};
use scheduled_thread_pool::{OnPoolDropBehavior, ScheduledThreadPool};

use crate::config::Config;
use crate::descriptors::DescriptorTable;
use crate::generation_pool::GenerationPool;
use crate::manager::{
    ConnectError, CustomizerAdapter, ErrorHandlerAdapter, ForkSafeManager, Tracked,
};
use crate::process_pool::{Connector, Hooks, ProcessPool};
use crate::worker_threads::started_thread_pool;

pub(crate) struct Generation<M: ManageConnection> {
    /// This crate's pool on std's locks (see `process_pool`); r2d2's in the process that built a
    /// `Pool` with an event handler, since only r2d2 can make r2d2's events; none in a refusing
    /// child.
    pub(crate) pool: GenerationPool<M>,
    pub(crate) descriptors: Arc<DescriptorTable>,
    /// Set by `release_idle` on a generation on r2d2: it opens no connections and closes
    /// returned ones.
    retired: Arc<AtomicBool>,
    /// The open connections of a generation on r2d2, counted by its customizer
    /// (`R2d2GenerationCustomizer`); once retired, it is swept until none is left.
    r2d2_connections: Arc<AtomicU64>,
    /// The thread pool a generation on r2d2 runs its background work on: the user's, or one
    /// of its own that ends with its r2d2 pool (see `build_r2d2`).
    r2d2_threads: Option<Arc<ScheduledThreadPool>>,
}

/// Where a generation is built, which decides what it runs on.
pub(crate) enum Site {
    /// The process that built the `Pool`: r2d2 with an event handler, else a `ProcessPool` that
    /// connects on the configured thread pool. `wait_for_min_idle` is `Builder::build`'s wait.
    BuildingProcess { wait_for_min_idle: bool },
    /// A forked child: a `ProcessPool` that connects on short-lived raw threads and keeps
    /// itself on an upkeep thread of its own (see `process_pool`).
    ForkedChild,
    /// A forked child of a pool built with `OnFork::Fail`: every checkout fails with `refusal`.
    RefusingChild { refusal: String },
}

/// Everything [`Generation::build`] needs.
pub(crate) struct GenerationParts<'a, M: ManageConnection> {
    pub(crate) config: &'a Config<M>,
    pub(crate) manager: Arc<M>,
    pub(crate) descriptors: Arc<DescriptorTable>,
    pub(crate) site: Site,
    /// The process id, when this generation replaces one inherited across `fork()`: connect
    /// errors then say that the pool was rebuilt there.
    pub(crate) rebuilt_after_fork_in: Option<u32>,
}

impl<M: ManageConnection> Generation<M> {
    /// Builds a generation; fails only when it waits for `min_idle` connections and they do
    /// not open within `connection_timeout`.
    pub(crate) fn build(parts: GenerationParts<'_, M>) -> Result<Generation<M>, r2d2::Error> {
        let GenerationParts {
            config,
            manager,
            descriptors,
            site,
            rebuilt_after_fork_in,
        } = parts;
        let (in_forked_child, wait) = match site {
            Site::RefusingChild { refusal } => {
                return Ok(Generation {
                    pool: GenerationPool::Refusing(refusal),
                    descriptors,
                    retired: Arc::default(),
                    r2d2_connections: Arc::default(),
                    r2d2_threads: None,
                })
            }
            // A process forked from one that started thread pools must not start any (see
            // `worker_threads`): the pool it builds connects as a forked child's does.
            Site::BuildingProcess { wait_for_min_idle } => (
                crate::worker_threads::an_ancestor_started_thread_pools(),
                wait_for_min_idle,
            ),
            Site::ForkedChild => (true, false),
        };
        let retired = Arc::new(AtomicBool::new(false));
        let manager = ForkSafeManager::new(
            manager,
            Arc::clone(&descriptors),
            config.descriptor_locator.clone(),
            rebuilt_after_fork_in,
            Arc::clone(&retired),
        );
        if !in_forked_child && config.event_handler.is_some() {
            return Generation::build_r2d2(config, manager, descriptors, retired, wait);
        }
        let connector = match &config.thread_pool {
            Some(threads) if !in_forked_child => Connector::ThreadPool {
                threads: Arc::clone(threads),
                reaper_rate: config.reaper_rate,
            },
            _ => Connector::detached(config.reaper_rate),
        };
        let pool = ProcessPool::new(
            manager,
            config.settings,
            connector,
            Hooks {
                error_handler: Box::new(ErrorHandlerAdapter(Arc::clone(&config.error_handler))),
                customizer: Box::new(CustomizerAdapter(Arc::clone(&config.connection_customizer))),
                // Only a forked child (or a process forked from one that started thread pools)
                // gets here with a handler (see above).
                events: config.event_handler.clone(),
            },
        );
        if wait {
            pool.wait_for_initial_connections(config.settings.connection_timeout)?;
        }
        Ok(Generation {
            pool: GenerationPool::Own(pool),
            descriptors,
            retired,
            r2d2_connections: Arc::default(),
            r2d2_threads: None,
        })
    }

    /// The generation of a pool with an event handler, in the process that built it.
    fn build_r2d2(
        config: &Config<M>,
        manager: ForkSafeManager<M>,
        descriptors: Arc<DescriptorTable>,
        retired: Arc<AtomicBool>,
        wait: bool,
    ) -> Result<Generation<M>, r2d2::Error> {
        let r2d2_connections = Arc::default();
        let mut builder = r2d2::Pool::builder()
            .max_size(config.settings.max_size)
            .min_idle(config.settings.min_idle)
            .test_on_check_out(config.settings.test_on_check_out)
            .max_lifetime(config.settings.max_lifetime)
            .idle_timeout(config.settings.idle_timeout)
            .connection_timeout(config.settings.connection_timeout)
            .error_handler(Box::new(ErrorHandlerAdapter(Arc::clone(
                &config.error_handler,
            ))))
            .connection_customizer(Box::new(R2d2GenerationCustomizer {
                user: CustomizerAdapter(Arc::clone(&config.connection_customizer)),
                retired: Arc::clone(&retired),
                open: Arc::clone(&r2d2_connections),
            }));
        if let Some(event_handler) = &config.event_handler {
            builder =
                builder.event_handler(Box::new(EventHandlerAdapter(Arc::clone(event_handler))));
        }
        let threads = match &config.thread_pool {
            Some(threads) => Arc::clone(threads),
            // r2d2's default (three threads), one per generation: r2d2 leaves jobs on its
            // thread pool that only the thread pool's end stops — its reaper, scheduled at a
            // fixed rate with a handle it drops, and its reconnect retries, which end only once
            // its pool is gone. The last owner of this generation's r2d2 pool drops it (see
            // `PerProcess` for when a retired generation is freed); pending jobs are then
            // discarded and the threads end.
            None => Arc::new(started_thread_pool(
                OnPoolDropBehavior::DiscardPendingScheduled,
            )),
        };
        builder = builder.thread_pool(Arc::clone(&threads));
        let pool = if wait {
            builder.build(manager)?
        } else {
            builder.build_unchecked(manager)
        };
        Ok(Generation {
            pool: GenerationPool::R2d2(pool),
            descriptors,
            retired,
            r2d2_connections,
            r2d2_threads: Some(threads),
        })
    }

    /// Set once `release_idle` has retired this generation.
    pub(crate) fn retired_flag(&self) -> &Arc<AtomicBool> {
        &self.retired
    }

    /// Retires a generation on r2d2 (which would reopen `min_idle` connections at once if they
    /// were only closed): it opens no more connections, its idle ones are closed now and the
    /// rest as they come back, by a job on its thread pool that ends once none is open.
    /// Returns how many idle connections were closed now.
    pub(crate) fn retire(&self) -> u32 {
        // Sequentially consistent with the customizer's count and check: a connection either
        // is counted before the sweep below reads the count, or sees the generation retired.
        self.retired.store(true, Ordering::SeqCst);
        let idle_before = self.pool.state().idle_connections;
        close_idle(&self.pool);
        let closed = idle_before.saturating_sub(self.pool.state().idle_connections);
        // Connections still leased, or past the customizer but not yet in r2d2's idle list,
        // come back later: r2d2 parks the latter as idle, so a job on the thread pool keeps
        // closing idle ones until the generation has none open, then ends. (A connect not yet
        // past the customizer is refused there; none open now means none later.)
        if self.r2d2_connections.load(Ordering::SeqCst) == 0 {
            return closed;
        }
        if let (GenerationPool::R2d2(pool), Some(threads)) = (&self.pool, &self.r2d2_threads) {
            let pool = GenerationPool::R2d2(pool.clone());
            let open = Arc::clone(&self.r2d2_connections);
            let mut pause = Duration::from_millis(1);
            threads.execute_at_dynamic_rate(pause, move || {
                close_idle(&pool);
                if open.load(Ordering::SeqCst) == 0 {
                    return None;
                }
                pause = (pause * 2).min(Duration::from_secs(1));
                Some(pause)
            });
        }
        closed
    }
}

/// Closes a retired generation's idle connections: each comes back as broken and is closed.
/// (With `test_on_check_out`, r2d2 closes each one inside `try_get` already.)
fn close_idle<M: ManageConnection>(retired: &GenerationPool<M>) {
    while let Some(conn) = retired.try_get() {
        drop(conn);
    }
}

/// The customizer of a generation on r2d2: counts its open connections, so that once retired
/// it can be swept until none is left, and closes every connection that arrives after its
/// retirement (r2d2 drops a connection its customizer refuses; the drop runs in a driver
/// section).
struct R2d2GenerationCustomizer<C, E> {
    user: CustomizerAdapter<C, E>,
    retired: Arc<AtomicBool>,
    open: Arc<AtomicU64>,
}

impl<C, E> fmt::Debug for R2d2GenerationCustomizer<C, E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.user, f)
    }
}

impl<C, E> CustomizeConnection<Tracked<C>, ConnectError<E>> for R2d2GenerationCustomizer<C, E>
where
    C: Send + 'static,
    E: 'static,
{
    fn on_acquire(&self, conn: &mut Tracked<C>) -> Result<(), ConnectError<E>> {
        // Counted before the retirement check (see `retire_r2d2_generation`).
        self.open.fetch_add(1, Ordering::SeqCst);
        let accepted = self.user.on_acquire(conn).and_then(|()| {
            if self.retired.load(Ordering::SeqCst) {
                Err(ConnectError::retired())
            } else {
                Ok(())
            }
        });
        if accepted.is_err() {
            self.open.fetch_sub(1, Ordering::SeqCst);
        }
        accepted
    }

    fn on_release(&self, conn: Tracked<C>) {
        self.user.on_release(conn);
        self.open.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Hands r2d2's events to the user's handler, kept in an `Arc` so every generation shares it.
#[derive(Debug)]
struct EventHandlerAdapter(Arc<dyn HandleEvent>);

impl HandleEvent for EventHandlerAdapter {
    fn handle_acquire(&self, event: AcquireEvent) {
        self.0.handle_acquire(event);
    }
    fn handle_release(&self, event: ReleaseEvent) {
        self.0.handle_release(event);
    }
    fn handle_checkout(&self, event: CheckoutEvent) {
        self.0.handle_checkout(event);
    }
    fn handle_timeout(&self, event: TimeoutEvent) {
        self.0.handle_timeout(event);
    }
    fn handle_checkin(&self, event: CheckinEvent) {
        self.0.handle_checkin(event);
    }
}
