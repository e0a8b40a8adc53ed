//! A pooled connection together with its entry in the descriptor table.

use crate::descriptors::Registration;
use crate::fork::ForkWaitsForDrop;

/// A connection plus its entry in the descriptor table.
///
/// The fields are declared in the order they must be dropped (Rust drops fields in declaration
/// order): the registration first, then the connection. Whatever drops a `Tracked` — the pool
/// closing it, r2d2 dropping it after a failed `on_acquire`, a pool dropped with idle
/// connections — its descriptors leave the table before the driver closes them. The other way
/// round, the application could open a file in between and be given the freed number; a child
/// forked then would find the number still registered, on the same file (device and inode), and
/// point the application's descriptor at `/dev/null`.
pub(crate) struct Tracked<C> {
    /// Boxed (one allocation per connect, not per checkout) to keep r2d2's guard small: every
    /// checkout moves the guard several times, and past ~128 bytes those moves become `memcpy`
    /// calls that cost more than r2d2's own bookkeeping (see benches/checkout.rs).
    pub(crate) registration: Box<Registration>,
    /// Closed (dropped) inside a `DriverSection`, so a fork never freezes the driver's locks.
    pub(crate) conn: ForkWaitsForDrop<C>,
}

impl<C> Tracked<C> {
    /// Hands the connection back (for `on_release`, which must close it inside a
    /// `DriverSection`); dropping the registration removes it from the descriptor table.
    pub(super) fn into_inner(self) -> C {
        let Tracked { registration, conn } = self;
        drop(registration);
        conn.into_inner()
    }
}
