//! The user's error handler and customizer, fitted to what the pool hands them: the manager's
//! own errors and connections, not the pool's wrappers.

use std::error::Error as StdError;
use std::fmt;
use std::sync::Arc;

use r2d2::{CustomizeConnection, HandleError};

use super::{ConnectError, Tracked};
use crate::fork::DriverSection;

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
