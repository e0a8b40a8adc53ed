//! Which file descriptors belong to which connection, and how a child lets go of them.
//!
//! A forked child holds a copy of every descriptor of the parent, including the sockets of the
//! parent's database sessions. While the child keeps that copy, the server session outlives
//! the parent (a SIGKILLed master leaves its sessions open as long as any worker lives). The
//! child cannot `close` or `shutdown` through the driver — that sends a goodbye on the shared
//! stream — so it does what ActiveRecord does: `dup3` (elsewhere than Linux `dup2`, see
//! `sys::replace_descriptor`) a `/dev/null` descriptor over the socket's number. The number stays valid for anything still holding it, the child's reference to the
//! socket is gone, and a later write or close goes nowhere.
//!
//! Replacing a descriptor that is *not* the connection's socket would be far worse than
//! leaking it, so every descriptor is recorded with the device and inode it had when the
//! connection was opened, and the child only replaces it while `fstat` still shows both.
//!
//! The table is read in the child at whatever instant the fork froze it, so it is lock-free:
//! each slot is published with a state word that is written last.

use std::fs::OpenOptions;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicI32, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;

use crate::fork::ForkWaitingLease;
use crate::stats::{Counters, Discarded};

/// One descriptor and the identity it had when its connection was opened.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Descriptor {
    fd: RawFd,
    dev: u64,
    ino: u64,
}

impl Descriptor {
    /// Records what `fd` refers to now; `None` if it is not open.
    pub(crate) fn identify(fd: RawFd) -> Option<Descriptor> {
        let stat = nix::sys::stat::fstat(fd).ok()?;
        Some(Descriptor {
            fd,
            dev: stat.st_dev as u64,
            ino: stat.st_ino as u64,
        })
    }

    /// True while `fd` still refers to the file it referred to when identified.
    fn unchanged(&self) -> bool {
        Descriptor::identify(self.fd).is_some_and(|now| now == *self)
    }
}

const FREE: u8 = 0;
const WRITING: u8 = 1;
const READY: u8 = 2;
const RELEASED: u8 = 3;

#[derive(Default)]
struct Slot {
    state: AtomicU8,
    fd: AtomicI32,
    dev: AtomicU64,
    ino: AtomicU64,
}

/// Descriptors of one pool generation's live connections, plus the counts a child needs to
/// report what it discarded.
pub(crate) struct DescriptorTable {
    slots: Box<[Slot]>,
    /// Connections alive in this generation (idle or leased).
    live_connections: AtomicU64,
    /// Of those, connections whose sockets could not be identified (or found no free slot).
    unidentified_connections: AtomicU64,
    pub(crate) counters: Arc<Counters>,
}

impl DescriptorTable {
    /// A table for a pool of `max_size` connections: room for a few descriptors each (SQLite
    /// keeps the database, journal and WAL files open).
    pub(crate) fn new(max_size: u32, counters: Arc<Counters>) -> Arc<DescriptorTable> {
        let capacity = (max_size as usize).saturating_mul(4).clamp(8, 4096);
        Arc::new(DescriptorTable {
            slots: (0..capacity).map(|_| Slot::default()).collect(),
            live_connections: AtomicU64::new(0),
            unidentified_connections: AtomicU64::new(0),
            counters,
        })
    }

    /// Records a new connection's descriptors. `fds` is `None` when the backend cannot tell
    /// which descriptors the connection owns; such a connection is counted as unidentified.
    pub(crate) fn register(self: &Arc<Self>, fds: Option<Vec<RawFd>>) -> Registration {
        self.live_connections.fetch_add(1, Ordering::AcqRel);
        let mut slots = Vec::new();
        let mut identified = fds.is_some();
        for fd in fds.into_iter().flatten() {
            match Descriptor::identify(fd).and_then(|descriptor| self.publish(descriptor)) {
                Some(slot) => slots.push(slot),
                None => identified = false,
            }
        }
        if !identified {
            self.unidentified_connections.fetch_add(1, Ordering::AcqRel);
        }
        Registration {
            table: Arc::clone(self),
            slots,
            identified,
            fork_waits_while_checked_out: false,
            lease: None,
        }
    }

    fn publish(&self, descriptor: Descriptor) -> Option<usize> {
        let index = self.slots.iter().position(|slot| {
            slot.state
                .compare_exchange(FREE, WRITING, Ordering::Acquire, Ordering::Relaxed)
                .is_ok()
        })?;
        let slot = &self.slots[index];
        slot.fd.store(descriptor.fd, Ordering::Relaxed);
        slot.dev.store(descriptor.dev, Ordering::Relaxed);
        slot.ino.store(descriptor.ino, Ordering::Relaxed);
        slot.state.store(READY, Ordering::Release);
        Some(index)
    }

    /// Whether a live connection of this table recorded descriptor `fd` on `(dev, ino)`.
    pub(crate) fn holds(&self, fd: RawFd, dev: u64, ino: u64) -> bool {
        let wanted = Descriptor { fd, dev, ino };
        (0..self.slots.len()).any(|index| self.ready_descriptor(index) == Some(wanted))
    }

    fn ready_descriptor(&self, index: usize) -> Option<Descriptor> {
        let slot = &self.slots[index];
        (slot.state.load(Ordering::Acquire) == READY).then(|| Descriptor {
            fd: slot.fd.load(Ordering::Relaxed),
            dev: slot.dev.load(Ordering::Relaxed),
            ino: slot.ino.load(Ordering::Relaxed),
        })
    }

    /// In a child: replaces every recorded descriptor of this (inherited) generation that is
    /// still the connection's socket with `/dev/null`, and reports what was discarded.
    pub(crate) fn release_inherited(&self) -> Discarded {
        let mut released = 0;
        let null = DevNull::open();
        for index in 0..self.slots.len() {
            if release_slot(
                &self.slots[index],
                self.ready_descriptor(index),
                null.as_ref(),
            ) {
                released += 1;
            }
        }
        let discarded = Discarded {
            connections: self.live_connections.load(Ordering::Acquire),
            sockets_released: released,
            connections_unidentified: self.unidentified_connections.load(Ordering::Acquire),
        };
        // Counted once: a second release of the same table (a later rebuild, a leased guard)
        // finds nothing left.
        self.live_connections.store(0, Ordering::Release);
        self.unidentified_connections.store(0, Ordering::Release);
        discarded
    }
}

/// A connection's entries in its generation's [`DescriptorTable`].
pub(crate) struct Registration {
    table: Arc<DescriptorTable>,
    slots: Vec<usize>,
    identified: bool,
    /// Set when the backend says a fork must not copy the connection while it is in use (see
    /// `backends::fork_waits_while_checked_out`): its checkouts are [`ForkWaitingLease`]s.
    fork_waits_while_checked_out: bool,
    /// Present while such a connection is checked out.
    lease: Option<ForkWaitingLease>,
}

impl Drop for Registration {
    /// In the owning process, when the connection is closed normally. (Inherited connections
    /// are never dropped in a child, so this never runs on an inherited registration.)
    fn drop(&mut self) {
        for index in self.slots.drain(..) {
            self.table.slots[index].state.store(FREE, Ordering::Release);
        }
        if !self.identified {
            decrement(&self.table.unidentified_connections);
        }
        decrement(&self.table.live_connections);
    }
}

impl Registration {
    /// In a child, for one inherited connection (a guard leased across the fork): releases its
    /// sockets now rather than at the next rebuild. Returns what it discarded.
    pub(crate) fn release_inherited(&self) -> Discarded {
        let null = DevNull::open();
        let released = self
            .slots
            .iter()
            .filter(|&&index| {
                release_slot(
                    &self.table.slots[index],
                    self.table.ready_descriptor(index),
                    null.as_ref(),
                )
            })
            .count() as u64;
        // Only count the connection if a rebuild has not already counted its generation.
        let counted = decrement(&self.table.live_connections);
        let unidentified = !self.identified && decrement(&self.table.unidentified_connections);
        Discarded {
            connections: u64::from(counted),
            sockets_released: released,
            connections_unidentified: u64::from(unidentified),
        }
    }

    pub(crate) fn counters(&self) -> &Counters {
        &self.table.counters
    }

    /// Makes every checkout of this connection a [`ForkWaitingLease`].
    pub(crate) fn fork_waits_while_checked_out(&mut self) {
        self.fork_waits_while_checked_out = true;
    }

    /// The connection is being checked out: for a connection marked with
    /// [`fork_waits_while_checked_out`](Self::fork_waits_while_checked_out), a lease that a
    /// libc `fork()` waits for (this may wait for a pending fork).
    #[inline]
    pub(crate) fn begin_checkout(&mut self) {
        if self.fork_waits_while_checked_out {
            self.lease = Some(ForkWaitingLease::take());
        }
    }

    /// The checkout is over, in the process that made it.
    #[inline]
    pub(crate) fn end_checkout(&mut self) {
        if self.lease.is_some() {
            self.lease = None;
        }
    }
}

/// Decrements a counter that is never allowed below zero; false if it was already zero.
fn decrement(counter: &AtomicU64) -> bool {
    counter
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
        .is_ok()
}

fn release_slot(slot: &Slot, descriptor: Option<Descriptor>, null: Option<&DevNull>) -> bool {
    let (Some(descriptor), Some(null)) = (descriptor, null) else {
        return false;
    };
    if !descriptor.unchanged() {
        return false;
    }
    if slot
        .state
        .compare_exchange(READY, RELEASED, Ordering::AcqRel, Ordering::Acquire)
        .is_err()
    {
        return false;
    }
    crate::sys::replace_descriptor(null.fd(), descriptor.fd)
}

/// An open `/dev/null`, the target every released socket number is pointed at.
struct DevNull(std::fs::File);

impl DevNull {
    fn open() -> Option<DevNull> {
        match OpenOptions::new().read(true).write(true).open("/dev/null") {
            Ok(file) => Some(DevNull(file)),
            Err(error) => {
                tracing::warn!(%error, "cannot open /dev/null; inherited sockets stay open in this process");
                None
            }
        }
    }

    fn fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;

    fn table() -> Arc<DescriptorTable> {
        DescriptorTable::new(2, Arc::default())
    }

    #[test]
    fn release_points_the_socket_number_at_dev_null() {
        let (ours, mut theirs) = UnixStream::pair().unwrap();
        let table = table();
        let _registration = table.register(Some(vec![ours.as_raw_fd()]));
        let discarded = table.release_inherited();
        assert_eq!(
            discarded,
            Discarded {
                connections: 1,
                sockets_released: 1,
                connections_unidentified: 0
            }
        );
        // The peer sees end-of-file: our reference to the socket is gone, nothing was written.
        use std::io::Read;
        let mut buf = [0u8; 1];
        assert_eq!(theirs.read(&mut buf).unwrap(), 0);
        let null = std::fs::metadata("/dev/null").unwrap();
        let now = Descriptor::identify(ours.as_raw_fd()).unwrap();
        use std::os::unix::fs::MetadataExt;
        assert_eq!((now.dev, now.ino), (null.dev(), null.ino()));
    }

    #[test]
    fn a_reused_descriptor_number_is_left_alone() {
        let (ours, _theirs) = UnixStream::pair().unwrap();
        let fd = ours.as_raw_fd();
        let table = table();
        let _registration = table.register(Some(vec![fd]));
        // The number now refers to another file. (Replaced in one `dup2`, so no test running
        // in another thread can take the number in between.) It must not be touched.
        let file = std::fs::File::open(std::env::current_exe().unwrap()).unwrap();
        nix::unistd::dup2(file.as_raw_fd(), fd).unwrap();
        let before = Descriptor::identify(fd).unwrap();
        let discarded = table.release_inherited();
        assert_eq!(discarded.sockets_released, 0);
        assert_eq!(Descriptor::identify(fd), Some(before));
        drop(ours);
    }

    #[test]
    fn unidentified_connections_are_counted_and_unregistered() {
        let table = table();
        let unknown = table.register(None);
        let discarded_before = Discarded {
            connections: 1,
            sockets_released: 0,
            connections_unidentified: 1,
        };
        assert_eq!(unknown.table.live_connections.load(Ordering::Relaxed), 1);
        drop(unknown);
        assert_eq!(table.release_inherited(), Discarded::default());
        let _again = table.register(None);
        assert_eq!(table.release_inherited(), discarded_before);
    }
}
