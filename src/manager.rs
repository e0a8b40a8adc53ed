//! The connection manager the inner r2d2 pool runs on: the user's manager plus a record of
//! each connection's descriptors, so a forked child can let go of them.

use std::any::{Any, TypeId};
use std::error::Error as StdError;
use std::fmt;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use r2d2::{CustomizeConnection, HandleError, ManageConnection};

use crate::connect_window::{ConnectWindow, CreatedSockets};
use crate::descriptors::{DescriptorTable, Registration};
use crate::fork::{DriverSection, ForkWaitsForDrop};

/// Finds the descriptors a connection owns; `None` when it cannot say for certain.
pub(crate) type Locator<C> = Arc<dyn Fn(&mut C) -> Option<Vec<RawFd>> + Send + Sync>;

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
    fn into_inner(self) -> C {
        let Tracked { registration, conn } = self;
        drop(registration);
        conn.into_inner()
    }
}

/// The error of a connection attempt: the manager's own error, plus where it happened when the
/// pool was rebuilt in a forked child.
#[derive(Debug)]
pub(crate) struct ConnectError<E> {
    /// `None` when the generation was retired and refused to connect (not the user's error).
    source: Option<E>,
    rebuilt_after_fork_in: Option<u32>,
}

impl<E> ConnectError<E> {
    /// The refusal of a retired generation.
    pub(crate) fn retired() -> Self {
        ConnectError {
            source: None,
            rebuilt_after_fork_in: None,
        }
    }
}

impl<E: fmt::Display> fmt::Display for ConnectError<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Some(source) = &self.source else {
            return f.write_str(
                "forksafe-pool: this generation of the pool was retired by Pool::release_idle and opens no connections",
            );
        };
        match self.rebuilt_after_fork_in {
            Some(pid) => write!(
                f,
                "{source} (forksafe-pool: the pool was rebuilt after fork() in process {pid} and could not connect)",
            ),
            None => source.fmt(f),
        }
    }
}

impl<E: StdError + 'static> StdError for ConnectError<E> {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        self.source
            .as_ref()
            .map(|source| source as &(dyn StdError + 'static))
    }
}

/// Wraps the user's manager for one pool generation.
pub(crate) struct ForkSafeManager<M: ManageConnection> {
    inner: Arc<M>,
    table: Arc<DescriptorTable>,
    locator: Option<Locator<M::Connection>>,
    rebuilt_after_fork_in: Option<u32>,
    /// Set when `Pool::release_idle` retires this generation: it opens no more connections,
    /// and every connection that comes back to it is closed instead of pooled.
    retired: Arc<AtomicBool>,
    /// Whether the backend may need connects watched for the sockets they create.
    may_watch: bool,
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
        let may_watch =
            locator.is_none() && crate::backends::watches_connects(TypeId::of::<M::Connection>());
        ForkSafeManager {
            inner,
            table,
            locator,
            rebuilt_after_fork_in,
            retired,
            may_watch,
            watch_connects: AtomicBool::new(may_watch),
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
        if !self.may_watch {
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
            .watch_connects
            .load(Ordering::Relaxed)
            .then(ConnectWindow::open);
        let connected = self.inner.connect();
        let created = window.map(ConnectWindow::close);
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

/// Hands the user's error handler the manager's own error type.
pub(crate) struct ErrorHandlerAdapter<E>(pub(crate) Arc<dyn HandleError<E>>);

impl<E> fmt::Debug for ErrorHandlerAdapter<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

impl<E: StdError + 'static> HandleError<ConnectError<E>> for ErrorHandlerAdapter<E> {
    fn handle_error(&self, error: ConnectError<E>) {
        // A retired generation's refusals are ours, not the user's connection errors.
        if let Some(source) = error.source {
            self.0.handle_error(source);
        }
    }
}

/// Hands the user's customizer the manager's own connection type.
pub(crate) struct CustomizerAdapter<C, E>(pub(crate) Arc<dyn CustomizeConnection<C, E>>);

impl<C, E> fmt::Debug for CustomizerAdapter<C, E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

impl<C, E> CustomizeConnection<Tracked<C>, ConnectError<E>> for CustomizerAdapter<C, E>
where
    C: Send + 'static,
    E: 'static,
{
    fn on_acquire(&self, conn: &mut Tracked<C>) -> Result<(), ConnectError<E>> {
        // The customizer runs on a connection that is not yet in a generation of a forked child,
        // so the error carries no fork context.
        self.0
            .on_acquire(&mut conn.conn)
            .map_err(|source| ConnectError {
                source: Some(source),
                rebuilt_after_fork_in: None,
            })
    }

    fn on_release(&self, conn: Tracked<C>) {
        // The user's customizer closes the connection (the default one by dropping it).
        let _section = DriverSection::enter();
        self.0.on_release(conn.into_inner());
    }
}
