//! The guard `Pool::get` returns: r2d2's guard, plus the process it was checked out in.
//!
//! r2d2's own guard returns its connection through the pool it came from, which locks that
//! pool's mutex. In a forked child that mutex may be frozen (held by a parent thread at the
//! fork instant), and the connection's socket is shared with the parent. So this guard knows
//! its epoch: in the process that checked it out it behaves exactly like r2d2's; in a child it
//! refuses to be used and, when dropped, forgets the connection without touching the parent's
//! pool and points its socket at `/dev/null`.

use std::fmt;
use std::ops::{Deref, DerefMut};

use r2d2::ManageConnection;

use crate::fork::{current_epoch, Epoch};
use crate::manager::{ForkSafeManager, Tracked};
use crate::process_pool::Lease;

/// What a generation hands out: a [`Lease`] of this crate's pool (see `process_pool`), or r2d2's
/// guard in the process that built a pool with an event handler.
pub(crate) enum Checkout<M: ManageConnection> {
    Own(Lease<M>),
    R2d2(r2d2::PooledConnection<ForkSafeManager<M>>),
}

impl<M: ManageConnection> Checkout<M> {
    fn tracked(&self) -> &Tracked<M::Connection> {
        match self {
            Checkout::R2d2(conn) => conn,
            Checkout::Own(lease) => lease,
        }
    }

    fn tracked_mut(&mut self) -> &mut Tracked<M::Connection> {
        match self {
            Checkout::R2d2(conn) => conn,
            Checkout::Own(lease) => lease,
        }
    }
}

impl<M: ManageConnection> From<r2d2::PooledConnection<ForkSafeManager<M>>> for Checkout<M> {
    fn from(conn: r2d2::PooledConnection<ForkSafeManager<M>>) -> Self {
        Checkout::R2d2(conn)
    }
}

impl<M: ManageConnection> From<Lease<M>> for Checkout<M> {
    fn from(lease: Lease<M>) -> Self {
        Checkout::Own(lease)
    }
}

/// A connection checked out of a [`Pool`](crate::Pool); returned to the pool when dropped.
///
/// Dereferences to the manager's connection, like [`r2d2::PooledConnection`]. With a
/// `diesel-*` feature it also implements diesel's connection traits, so `&mut conn` and
/// `conn.transaction(..)` work unchanged.
///
/// # SQLite and `fork()`
///
/// While a SQLite connection (diesel's `SqliteConnection`) is checked out, a libc `fork()` on
/// another thread waits until it is returned, and a checkout that starts while a fork is
/// pending waits for the fork; each waits one second at most. SQLite keeps one lock record per
/// database file per process, shared by all its connections, and a fork copies it as it is:
/// copied in the middle of a write, it makes the child's own connections meet locks nobody
/// holds ("database is locked", or a busy handler that waits for ever). Limits: a fork that
/// skips the atfork handlers (a raw `clone`/`SYS_fork` syscall, glibc's `_Fork`) does not
/// wait; a connection kept checked out for longer than a second (a long transaction, a
/// connection held for a thread's whole life) delays each fork by that second and is then
/// forked through, mid-write or not; so are SQLite connections the pool does not hand out.
/// The thread that forks never waits for connections it checked out itself: drop them (or
/// end their transactions) before forking.
///
/// # Panics
///
/// Dereferencing a guard in a process other than the one that checked it out — a connection
/// held across `fork()` and used in the child — panics with a message saying so. Its socket
/// is shared with the parent, so any use would corrupt the parent's session; failing loudly
/// is the only safe answer. Dropping such a guard is always fine.
pub struct PooledConnection<M: ManageConnection> {
    /// `None` only while dropping.
    inner: Option<Checkout<M>>,
    epoch: Epoch,
}

impl<M: ManageConnection> PooledConnection<M> {
    /// `epoch` is the calling process's, as the pool just checked it.
    #[inline]
    pub(crate) fn new(inner: impl Into<Checkout<M>>, epoch: Epoch) -> Self {
        let mut inner = inner.into();
        inner.tracked_mut().registration.begin_checkout();
        PooledConnection {
            inner: Some(inner),
            epoch,
        }
    }

    /// The r2d2 connection extensions of this connection, like
    /// [`r2d2::PooledConnection::extensions`].
    pub fn extensions(this: &Self) -> &r2d2::Extensions {
        match this.checked() {
            Checkout::R2d2(conn) => r2d2::PooledConnection::extensions(conn),
            Checkout::Own(lease) => lease.extensions(),
        }
    }

    /// Mutable access to the connection extensions, like
    /// [`r2d2::PooledConnection::extensions_mut`].
    pub fn extensions_mut(this: &mut Self) -> &mut r2d2::Extensions {
        match this.checked_mut() {
            Checkout::R2d2(conn) => r2d2::PooledConnection::extensions_mut(conn),
            Checkout::Own(lease) => lease.extensions_mut(),
        }
    }

    #[inline]
    fn checked(&self) -> &Checkout<M> {
        self.assert_same_process();
        match &self.inner {
            Some(inner) => inner,
            None => unreachable!("the connection is only taken while dropping"),
        }
    }

    #[inline]
    fn checked_mut(&mut self) -> &mut Checkout<M> {
        self.assert_same_process();
        match &mut self.inner {
            Some(inner) => inner,
            None => unreachable!("the connection is only taken while dropping"),
        }
    }

    #[inline]
    fn assert_same_process(&self) {
        if self.epoch != current_epoch() {
            used_across_fork();
        }
    }
}

#[cold]
#[inline(never)]
#[track_caller]
pub(crate) fn used_across_fork() -> ! {
    panic!(
        "forksafe-pool: this connection was checked out before fork() and cannot be used in the \
         forked process {} (its socket belongs to the parent); drop it and check out a new one \
         with pool.get()",
        std::process::id()
    )
}

impl<M: ManageConnection> Deref for PooledConnection<M> {
    type Target = M::Connection;

    #[inline]
    fn deref(&self) -> &M::Connection {
        &self.checked().tracked().conn
    }
}

impl<M: ManageConnection> DerefMut for PooledConnection<M> {
    #[inline]
    fn deref_mut(&mut self) -> &mut M::Connection {
        &mut self.checked_mut().tracked_mut().conn
    }
}

impl<M> fmt::Debug for PooledConnection<M>
where
    M: ManageConnection,
    M::Connection: fmt::Debug,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.epoch == current_epoch() {
            f.debug_tuple("PooledConnection").field(&**self).finish()
        } else {
            f.write_str("PooledConnection(<checked out before fork()>)")
        }
    }
}

impl<M: ManageConnection> Drop for PooledConnection<M> {
    #[inline]
    fn drop(&mut self) {
        // In the process that checked it out, the field's own drop returns the connection to
        // its pool, in place (moving the guard out first would copy it on every checkin).
        if self.epoch != current_epoch() {
            if let Some(inner) = self.inner.take() {
                forget_across_fork(inner);
            }
        } else if let Some(inner) = &mut self.inner {
            inner.tracked_mut().registration.end_checkout();
        }
    }
}

/// A guard dropped in a forked child: never touch the parent's pool (its lock may be frozen),
/// never close through the driver (that writes on the shared socket). Let go of the socket and
/// leak the rest.
#[cold]
#[inline(never)]
fn forget_across_fork<M: ManageConnection>(inner: Checkout<M>) {
    // Both guards' Deref read the guard's own field; neither touches the pool.
    let registration = &inner.tracked().registration;
    let discarded = registration.release_inherited();
    registration.counters().record_leased(discarded);
    tracing::warn!(
        pid = std::process::id(),
        sockets_released = discarded.sockets_released,
        "forksafe-pool: a connection checked out before fork() was dropped in the child; it was discarded, not returned"
    );
    std::mem::forget(inner);
}
