//! The connection manager every generation runs on ([`ForkSafeManager`]): the user's manager
//! plus a record of each connection's descriptors, so a forked child can let go of them.
//!
//! `tracked.rs` holds a connection with its descriptor registration ([`Tracked`]),
//! `connect_error.rs` the error of an attempt ([`ConnectError`]), `adapters.rs` the user's
//! error handler and customizer fitted to both.

use std::any::{Any, TypeId};
use std::fmt;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use r2d2::ManageConnection;

use crate::connect_window::{ConnectWindow, CreatedSockets, Watch};
use crate::descriptors::DescriptorTable;
use crate::fork::{DriverSection, ForkWaitsForDrop};

/// Finds the descriptors a connection owns; `None` when it cannot say for certain.
pub(crate) type Locator<C> = Arc<dyn Fn(&mut C) -> Option<Vec<RawFd>> + Send + Sync>;

mod adapters;
mod connect_error;
mod tracked;

pub(crate) use adapters::{CustomizerAdapter, ErrorHandlerAdapter};
pub(crate) use connect_error::ConnectError;
pub(crate) use tracked::Tracked;

/// Wraps the user's manager for one pool generation.
pub(crate) struct ForkSafeManager<M: ManageConnection> {
    inner: Arc<M>,
    table: Arc<DescriptorTable>,
    locator: Option<Locator<M::Connection>>,
    rebuilt_after_fork_in: Option<u32>,
    /// Set when `Pool::release_idle` retires this generation: it opens no more connections,
    /// and every connection that comes back to it is closed instead of pooled.
    retired: Arc<AtomicBool>,
    /// What the backend may need connects watched for (the sockets or files they create).
    may_watch: Option<Watch>,
    /// Whether the next connect is watched; see `learn_whether_to_watch`.
    watch_connects: AtomicBool,
}

impl<M: ManageConnection> ForkSafeManager<M> {
    pub(crate) fn new(
        inner: Arc<M>,
        table: Arc<DescriptorTable>,
        locator: Option<Locator<M::Connection>>,
        rebuilt_after_fork_in: Option<u32>,
        retired: Arc<AtomicBool>,
    ) -> Self {
        let may_watch = locator
            .is_none()
            .then(|| crate::backends::watches_connects(TypeId::of::<M::Connection>()))
            .flatten();
        ForkSafeManager {
            inner,
            table,
            locator,
            rebuilt_after_fork_in,
            retired,
            may_watch,
            watch_connects: AtomicBool::new(may_watch.is_some()),
        }
    }

    fn wrap(&self, source: M::Error) -> ConnectError<M::Error> {
        ConnectError {
            source: Some(source),
            rebuilt_after_fork_in: self.rebuilt_after_fork_in,
        }
    }

    #[inline]
    pub(crate) fn is_retired(&self) -> bool {
        self.retired.load(Ordering::Acquire)
    }

    fn refuse(&self) -> ConnectError<M::Error> {
        ConnectError::retired()
    }

    fn locate(
        &self,
        conn: &mut M::Connection,
        created: Option<&CreatedSockets>,
    ) -> Option<Vec<RawFd>> {
        match &self.locator {
            Some(locator) => locator(conn),
            None => crate::backends::locate(conn as &mut dyn Any, created),
        }
    }

    /// After a connect of a backend that may need a connect window: watch no more once the
    /// backend named a socket without the window (the server's view works for this pool), and
    /// again once it could not name one without it (see `connect_window`).
    fn learn_whether_to_watch(&self, created: Option<&CreatedSockets>, named: bool) {
        if self.may_watch.is_none() {
            return;
        }
        let watch = match created {
            Some(created) => !named || created.consulted(),
            None => !named,
        };
        self.watch_connects.store(watch, Ordering::Relaxed);
    }
}

impl<M: ManageConnection> ManageConnection for ForkSafeManager<M> {
    type Connection = Tracked<M::Connection>;
    type Error = ConnectError<M::Error>;

    fn connect(&self) -> Result<Self::Connection, Self::Error> {
        if self.is_retired() {
            return Err(self.refuse());
        }
        // The section spans the locator too: it may query the server on the new session.
        let section = DriverSection::enter();
        let window = self
            .may_watch
            .filter(|_| self.watch_connects.load(Ordering::Relaxed))
            .map(ConnectWindow::open);
        let connected = self.inner.connect();
        let accounted = |(fd, dev, ino)| self.table.holds(fd, dev, ino);
        // Dropped after the registration below: a files window holds the turn until then.
        let created = window.map(|window| window.close(&accounted));
        let mut conn = connected.map_err(|error| self.wrap(error))?;
        let fds = self.locate(&mut conn, created.as_ref());
        self.learn_whether_to_watch(created.as_ref(), fds.is_some());
        let fork_waits = crate::backends::fork_waits_while_checked_out(&conn as &dyn Any);
        let conn = ForkWaitsForDrop::new(conn);
        drop(section);
        let mut registration = Box::new(self.table.register(fds));
        if fork_waits {
            registration.fork_waits_while_checked_out();
        }
        Ok(Tracked { registration, conn })
    }

    fn is_valid(&self, conn: &mut Self::Connection) -> Result<(), Self::Error> {
        if self.is_retired() {
            return Err(self.refuse());
        }
        // A validation is a query on the pool's behalf, through the same TLS code as a
        // connect: `exit` must wait for it before OpenSSL's cleanup, as for a connect.
        let _section = DriverSection::enter();
        self.inner
            .is_valid(&mut conn.conn)
            .map_err(|error| self.wrap(error))
    }

    fn has_broken(&self, conn: &mut Self::Connection) -> bool {
        self.is_retired() || self.inner.has_broken(&mut conn.conn)
    }
}

impl<M: ManageConnection> fmt::Debug for ForkSafeManager<M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ForkSafeManager").finish_non_exhaustive()
    }
}
