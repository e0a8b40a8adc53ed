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

/// What an [`EventLog`] keeps of each event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    Acquire(u64),
    Release(u64),
    Checkout(u64),
    Checkin(u64),
    Timeout,
}

/// Records every pool event in order, with its connection id. Clones share the log; a forked
/// child's log starts as a copy of its parent's, so a child looks at what came after
/// [`len`](Self::len) at the fork.
#[derive(Clone, Debug, Default)]
pub struct EventLog(Arc<std::sync::Mutex<Vec<Event>>>);

impl EventLog {
    fn push(&self, event: Event) {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(event);
    }

    pub fn len(&self) -> usize {
        self.events().len()
    }

    pub fn events(&self) -> Vec<Event> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// The events from index `from` on.
    pub fn since(&self, from: usize) -> Vec<Event> {
        self.events().split_off(from)
    }
}

impl r2d2::HandleEvent for EventLog {
    fn handle_acquire(&self, event: r2d2::event::AcquireEvent) {
        self.push(Event::Acquire(event.connection_id()));
    }
    fn handle_release(&self, event: r2d2::event::ReleaseEvent) {
        self.push(Event::Release(event.connection_id()));
    }
    fn handle_checkout(&self, event: r2d2::event::CheckoutEvent) {
        self.push(Event::Checkout(event.connection_id()));
    }
    fn handle_checkin(&self, event: r2d2::event::CheckinEvent) {
        self.push(Event::Checkin(event.connection_id()));
    }
    fn handle_timeout(&self, _: r2d2::event::TimeoutEvent) {
        self.push(Event::Timeout);
    }
}
