//! The guard around a connection an async pool handed out.

use std::fmt;
use std::ops::{Deref, DerefMut};
use std::sync::Arc;

use crate::fork::{current_epoch, Epoch};
use crate::stats::{Counters, Discarded};

/// A connection checked out of this process's pool: used as the pool library's own guard in
/// the process that checked it out. In a forked child it is the parent's — its socket, its
/// pool, its connection task on the parent's runtime — so there a use panics (as the sync
/// pool's [`PooledConnection`](crate::PooledConnection) does) and a drop forgets it: it is
/// never returned to the inherited pool (whose lock a parent thread may have held at the fork)
/// and never closed through the driver (which would write on the parent's stream).
pub(crate) struct Leased<C> {
    conn: Option<C>,
    epoch: Epoch,
    counters: Arc<Counters>,
}

impl<C> Leased<C> {
    pub(crate) fn new(conn: C, epoch: Epoch, counters: Arc<Counters>) -> Self {
        Leased {
            conn: Some(conn),
            epoch,
            counters,
        }
    }

    /// The library's guard itself, for what only it can do (deadpool's `Object::take`).
    ///
    /// # Panics
    ///
    /// In a process other than the one that checked it out.
    #[cfg(feature = "deadpool-postgres")]
    pub(crate) fn into_inner(mut self) -> C {
        self.assert_same_process();
        match self.conn.take() {
            Some(conn) => conn,
            None => unreachable!("the connection is only taken while dropping"),
        }
    }

    #[inline]
    fn assert_same_process(&self) {
        if self.epoch != current_epoch() {
            crate::connection::used_across_fork();
        }
    }
}

impl<C> Deref for Leased<C> {
    type Target = C;

    #[inline]
    fn deref(&self) -> &C {
        self.assert_same_process();
        match &self.conn {
            Some(conn) => conn,
            None => unreachable!("the connection is only taken while dropping"),
        }
    }
}

impl<C> DerefMut for Leased<C> {
    #[inline]
    fn deref_mut(&mut self) -> &mut C {
        self.assert_same_process();
        match &mut self.conn {
            Some(conn) => conn,
            None => unreachable!("the connection is only taken while dropping"),
        }
    }
}

impl<C> Drop for Leased<C> {
    fn drop(&mut self) {
        if self.epoch == current_epoch() {
            return; // the library's own guard returns it to this process's pool
        }
        // Inherited: its socket is released with the rest of its generation when this child
        // builds its own pool.
        std::mem::forget(self.conn.take());
        self.counters.record_leased(Discarded::default());
    }
}

impl<C> fmt::Debug for Leased<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Leased")
            .field("checked_out_here", &(self.epoch == current_epoch()))
            .finish_non_exhaustive()
    }
}
