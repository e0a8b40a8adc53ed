//! The no-I/O manager: connections that touch no socket and allocate nothing, for pool logic
//! and for fork storms where a parent thread must not hold a libc lock (malloc's) at a fork.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A manager whose connections do no I/O and count themselves: [`live`](Self::live) is how
/// many exist right now in this process, so a test sees every connection a pool still holds,
/// idle, leased or parked anywhere. Each connection remembers the process that opened it.
#[derive(Clone, Debug, Default)]
pub struct NoIoManager {
    live: Arc<AtomicU64>,
    connect_delay: Duration,
}

/// A connection of a [`NoIoManager`]; dropping it closes it.
#[derive(Debug)]
pub struct NoIoConnection {
    pub opened_by: u32,
    live: Arc<AtomicU64>,
}

impl NoIoManager {
    /// A manager whose every connect takes `delay`, to widen a race.
    pub fn with_connect_delay(delay: Duration) -> NoIoManager {
        NoIoManager {
            connect_delay: delay,
            ..NoIoManager::default()
        }
    }

    /// Connections opened and not yet dropped.
    pub fn live(&self) -> u64 {
        self.live.load(Ordering::SeqCst)
    }

    /// Waits until no connection is open, at most `timeout`; the number still open otherwise.
    pub fn all_closed_within(&self, timeout: Duration) -> Result<(), u64> {
        let until = Instant::now() + timeout;
        loop {
            match self.live() {
                0 => return Ok(()),
                live if Instant::now() >= until => return Err(live),
                _ => std::thread::sleep(Duration::from_millis(5)),
            }
        }
    }
}

impl Drop for NoIoConnection {
    fn drop(&mut self) {
        self.live.fetch_sub(1, Ordering::SeqCst);
    }
}

impl r2d2::ManageConnection for NoIoManager {
    type Connection = NoIoConnection;
    type Error = std::io::Error;

    fn connect(&self) -> std::io::Result<NoIoConnection> {
        if !self.connect_delay.is_zero() {
            std::thread::sleep(self.connect_delay);
        }
        self.live.fetch_add(1, Ordering::SeqCst);
        Ok(NoIoConnection {
            opened_by: std::process::id(),
            live: Arc::clone(&self.live),
        })
    }

    fn is_valid(&self, _: &mut NoIoConnection) -> std::io::Result<()> {
        Ok(())
    }

    fn has_broken(&self, _: &mut NoIoConnection) -> bool {
        false
    }
}
