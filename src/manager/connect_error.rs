//! The error of a connection attempt, as the pool sees it.

use std::error::Error as StdError;
use std::fmt;

use crate::error_kind::{REBUILT_SUFFIX_START, RETIRED};

/// The error of a connection attempt: the manager's own error, plus where it happened when the
/// pool was rebuilt in a forked child.
#[derive(Debug)]
pub(crate) struct ConnectError<E> {
    /// `None` when the generation was retired and refused to connect (not the user's error).
    pub(super) source: Option<E>,
    pub(super) rebuilt_after_fork_in: Option<u32>,
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
            return write!(
                f,
                "{RETIRED} by Pool::release_idle and opens no connections"
            );
        };
        match self.rebuilt_after_fork_in {
            Some(pid) => write!(
                f,
                "{source}{REBUILT_SUFFIX_START} in process {pid} and could not connect)",
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
