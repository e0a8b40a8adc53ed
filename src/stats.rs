//! What a pool has seen of forks, readable with [`Pool::fork_stats`](crate::Pool::fork_stats).

use std::sync::atomic::{AtomicU64, Ordering};

/// Fork statistics of one pool, as seen by the calling process.
///
/// The counts are inherited across `fork()` like the rest of the pool, so a worker's numbers
/// include what its ancestors saw; the parent's numbers never change because of its children.
#[non_exhaustive]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ForkStats {
    /// How many times this pool found itself in a new process and rebuilt itself.
    pub forks_crossed: u64,
    /// Inherited connections, idle or leased, that were discarded without being used, pinged,
    /// returned to a pool or closed through the driver.
    pub connections_discarded: u64,
    /// Of those, connections that were checked out when the fork happened and whose guard was
    /// dropped in the child.
    pub leased_across_fork: u64,
    /// Inherited sockets (and SQLite file descriptors) replaced by `/dev/null` in the child, so
    /// the parent's server sessions belong to the parent alone.
    pub sockets_released: u64,
    /// Inherited connections whose descriptors could not be identified with certainty and were
    /// therefore left open (leaked) in the child rather than risk touching the wrong one.
    pub connections_leaked: u64,
}

/// What a child found when it let go of an inherited generation (or of one connection leased
/// across the fork): the record the descriptor table hands to [`Counters`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Discarded {
    pub(crate) connections: u64,
    pub(crate) sockets_released: u64,
    pub(crate) connections_unidentified: u64,
}

/// The live counters behind [`ForkStats`]; atomics, because the child may read them at any
/// instant the fork froze them.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    forks_crossed: AtomicU64,
    connections_discarded: AtomicU64,
    leased_across_fork: AtomicU64,
    sockets_released: AtomicU64,
    connections_leaked: AtomicU64,
}

impl Counters {
    pub(crate) fn record_rebuild(&self, discarded: Discarded) {
        self.forks_crossed.fetch_add(1, Ordering::Relaxed);
        self.record_discarded(discarded);
    }

    pub(crate) fn record_leased(&self, discarded: Discarded) {
        self.leased_across_fork.fetch_add(1, Ordering::Relaxed);
        self.record_discarded(discarded);
    }

    fn record_discarded(&self, discarded: Discarded) {
        self.connections_discarded
            .fetch_add(discarded.connections, Ordering::Relaxed);
        self.sockets_released
            .fetch_add(discarded.sockets_released, Ordering::Relaxed);
        self.connections_leaked
            .fetch_add(discarded.connections_unidentified, Ordering::Relaxed);
    }

    pub(crate) fn snapshot(&self) -> ForkStats {
        ForkStats {
            forks_crossed: self.forks_crossed.load(Ordering::Relaxed),
            connections_discarded: self.connections_discarded.load(Ordering::Relaxed),
            leased_across_fork: self.leased_across_fork.load(Ordering::Relaxed),
            sockets_released: self.sockets_released.load(Ordering::Relaxed),
            connections_leaked: self.connections_leaked.load(Ordering::Relaxed),
        }
    }
}
