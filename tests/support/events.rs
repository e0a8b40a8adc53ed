//! A pool event handler that counts what r2d2 reports.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Counts the pool events r2d2 reports. Clones share the counts: a test hands one to
/// `Builder::event_handler` and reads them through another.
#[derive(Clone, Debug, Default)]
pub struct EventCounts(Arc<[AtomicU64; 4]>);

impl EventCounts {
    const ACQUIRE: usize = 0;
    const CHECKOUT: usize = 1;
    const CHECKIN: usize = 2;
    const TIMEOUT: usize = 3;

    fn count(&self, event: usize) {
        self.0[event].fetch_add(1, Ordering::SeqCst);
    }

    /// Acquires, checkouts, checkins and timeouts so far.
    pub fn seen(&self) -> [u64; 4] {
        std::array::from_fn(|event| self.0[event].load(Ordering::SeqCst))
    }

    pub fn checkouts(&self) -> u64 {
        self.seen()[Self::CHECKOUT]
    }
}

impl r2d2::HandleEvent for EventCounts {
    fn handle_acquire(&self, _: r2d2::event::AcquireEvent) {
        self.count(Self::ACQUIRE);
    }
    fn handle_checkout(&self, _: r2d2::event::CheckoutEvent) {
        self.count(Self::CHECKOUT);
    }
    fn handle_checkin(&self, _: r2d2::event::CheckinEvent) {
        self.count(Self::CHECKIN);
    }
    fn handle_timeout(&self, _: r2d2::event::TimeoutEvent) {
        self.count(Self::TIMEOUT);
    }
}
