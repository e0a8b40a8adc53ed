//! What the pool's unit tests share: managers whose connections are numbers, and pools of them.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use r2d2::ManageConnection;
use scheduled_thread_pool::ScheduledThreadPool;

use super::{Connector, Hooks, ProcessPool, FAIR_AFTER};
use crate::config::Settings;
use crate::descriptors::DescriptorTable;
use crate::manager::{CustomizerAdapter, ErrorHandlerAdapter, ForkSafeManager};
use crate::stats::Counters;

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

/// `Counting` connections whose `is_valid` panics while `panics` is set.
#[derive(Debug, Default)]
pub(super) struct PanickyCheck {
    pub(super) connects: Counting,
    pub(super) panics: AtomicBool,
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

/// `Counting` connections whose first `fail_first` connects fail.
#[derive(Debug, Default)]
pub(super) struct FailingFirst {
    pub(super) connects: Counting,
    pub(super) fail_first: AtomicU32,
    pub(super) attempts: AtomicU32,
}

impl ManageConnection for FailingFirst {
    type Connection = u32;
    type Error = std::io::Error;

    fn connect(&self) -> Result<u32, std::io::Error> {
        self.attempts.fetch_add(1, Ordering::SeqCst);
        let failing = self
            .fail_first
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |left| {
                left.checked_sub(1)
            })
            .is_ok();
        if failing {
            return Err(std::io::Error::other("no server yet"));
        }
        self.connects.connect()
    }

    fn is_valid(&self, _: &mut u32) -> Result<(), std::io::Error> {
        Ok(())
    }

    fn has_broken(&self, _: &mut u32) -> bool {
        false
    }
}

/// Waits until `done` holds, at most 5 s; panics with `what` otherwise.
pub(super) fn eventually(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !done() {
        assert!(Instant::now() < deadline, "{what}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// `size` connections at most, nothing else set.
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

/// A building-process pool (one connect thread) that reaps every `reaper_rate` and hands a
/// connection over to a `get` that has waited `fair_after`.
pub(super) fn pool<M: ManageConnection>(
    manager: &Arc<M>,
    settings: Settings,
    reaper_rate: Duration,
    fair_after: Duration,
) -> ProcessPool<M> {
    let connector = Connector::ThreadPool {
        threads: Arc::new(ScheduledThreadPool::new(1)),
        reaper_rate,
    };
    pool_on(manager, settings, connector, fair_after)
}

/// A forked child's kind of pool (attempts on detached threads, an upkeep thread) that reaps
/// every `reaper_rate`; it works the same in the test process.
pub(super) fn child_pool<M: ManageConnection>(
    manager: &Arc<M>,
    settings: Settings,
    reaper_rate: Duration,
) -> ProcessPool<M> {
    pool_on(
        manager,
        settings,
        Connector::detached(reaper_rate),
        FAIR_AFTER,
    )
}

fn pool_on<M: ManageConnection>(
    manager: &Arc<M>,
    settings: Settings,
    connector: Connector,
    fair_after: Duration,
) -> ProcessPool<M> {
    let manager = ForkSafeManager::new(
        Arc::clone(manager),
        DescriptorTable::new(settings.max_size, Arc::new(Counters::default())),
        None,
        None,
        Arc::new(AtomicBool::new(false)),
    );
    ProcessPool::with_fairness(
        manager,
        settings,
        connector,
        Hooks {
            error_handler: Box::new(ErrorHandlerAdapter(Arc::new(r2d2::NopErrorHandler))),
            customizer: Box::new(CustomizerAdapter(Arc::new(r2d2::NopConnectionCustomizer))),
            events: None,
        },
        fair_after,
    )
}

/// A building-process pool of `Counting` connections that reaps every 20 ms.
pub(super) fn reaping_pool(manager: &Arc<Counting>, settings: Settings) -> ProcessPool<Counting> {
    pool(manager, settings, Duration::from_millis(20), FAIR_AFTER)
}

/// Waits until `count` `get` calls are queued.
pub(super) fn until_queued<M: ManageConnection>(pool: &ProcessPool<M>, count: usize) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while pool.shared.lock().queue.len() < count {
        assert!(Instant::now() < deadline, "no get queued");
        std::thread::sleep(Duration::from_millis(1));
    }
}
