//! A future whose every poll, and whose drop, is a driver section.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use crate::fork::DriverSection;

/// `future`, with each poll and its drop inside a [`DriverSection`]: a libc `fork()` (or an
/// `exit`) on another thread waits until no such poll is running, and a poll that would start
/// while one is pending waits for it (each at most a second).
///
/// For a database connection's connect and its I/O task: their polls run the TLS library
/// (handshakes, reads, writes, and at the end the close), whose process-global locks a fork
/// must not copy held and whose state the exit-time cleanup frees. A poll is short (it never
/// blocks), so a fork waits microseconds. Boxed, so that the wrapper is `Unpin` without
/// `unsafe` projection; one allocation per connect or connection.
pub(crate) struct InDriverSections<F> {
    future: Option<Pin<Box<F>>>,
}

impl<F: Future> InDriverSections<F> {
    pub(crate) fn new(future: F) -> Self {
        InDriverSections {
            future: Some(Box::pin(future)),
        }
    }
}

impl<F: Future> Future for InDriverSections<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let _section = DriverSection::enter();
        match self.get_mut().future.as_mut() {
            Some(future) => future.as_mut().poll(cx),
            None => unreachable!("the future is only taken while dropping"),
        }
    }
}

impl<F> Drop for InDriverSections<F> {
    fn drop(&mut self) {
        if let Some(future) = self.future.take() {
            let _section = DriverSection::enter();
            drop(future);
        }
    }
}
