//! Telling the pool's errors apart while keeping `r2d2::Error` as the error type.
//!
//! r2d2's `Error` is a message and nothing else, and every one reads "timed out waiting for
//! connection", followed by ": " and a detail when there is one. Drop-in compatibility keeps that
//! type, so the kind of an error is read back from its detail. This module holds every detail
//! the crate writes that a kind depends on (the texts below), and [`ErrorExt::kind`] the one
//! reading of them; the unit tests here and the fork tests pin each text to the code that makes
//! it.

use std::fmt;

/// Detail of a pool built with `OnFork::Fail`, used in a forked child.
pub(crate) const CROSSED_FORK_ON_FORK_FAIL: &str = "forksafe-pool: this pool crossed fork()";
/// Detail of a `GuardedPool` without a rebuild closure, used in a forked child.
pub(crate) const CROSSED_FORK_GUARDED: &str =
    "forksafe-pool: this r2d2 pool was wrapped in process";
/// Detail of a child's pool that opened no connection and found none free in time (written by
/// `process_pool`).
pub(crate) const CHILD_NONE_FREE: &str =
    "forksafe-pool: no connection of the pool rebuilt after fork()";
/// Detail of `Pool::warm_up` when connects were still running at its deadline.
pub(crate) const WARM_UP_SHORT: &str = "forksafe-pool: warm_up opened";
/// Detail of a connect that panicked (written by `process_pool`), followed by the panic's message.
pub(crate) const CONNECT_PANICKED: &str = "forksafe-pool: connecting panicked: ";
/// Detail of a generation retired by `Pool::release_idle` that was asked to connect.
pub(crate) const RETIRED: &str = "forksafe-pool: this generation of the pool was retired";
/// What follows a connect error in a pool rebuilt in a forked child: " (forksafe-pool: the pool
/// was rebuilt after fork() in process {pid} and could not connect)".
pub(crate) const REBUILT_SUFFIX_START: &str = " (forksafe-pool: the pool was rebuilt after fork()";
/// Every detail this crate writes starts with this; a connect error never does.
const OURS: &str = "forksafe-pool: ";
/// r2d2's fixed text, the whole of an error without a detail.
const R2D2_TIMEOUT: &str = "timed out waiting for connection";

/// What went wrong, as [`ErrorExt::kind`] reads it from an [`r2d2::Error`].
///
/// ```
/// use forksafe_pool::{ErrorExt, ErrorKind, Pool};
/// use std::time::Duration;
///
/// #[derive(Debug)]
/// struct NoServer;
/// impl forksafe_pool::ManageConnection for NoServer {
///     type Connection = ();
///     type Error = std::io::Error;
///     fn connect(&self) -> Result<(), std::io::Error> {
///         Err(std::io::Error::other("connection refused"))
///     }
///     fn is_valid(&self, _: &mut ()) -> Result<(), std::io::Error> {
///         Ok(())
///     }
///     fn has_broken(&self, _: &mut ()) -> bool {
///         false
///     }
/// }
///
/// let pool = Pool::builder().min_idle(Some(0)).build_unchecked(NoServer);
/// let error = pool.get_timeout(Duration::from_millis(100)).unwrap_err();
/// assert_eq!(error.kind(), ErrorKind::ConnectFailed("connection refused".into()));
/// ```
#[non_exhaustive]
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// No connection became free in time, and no connect failed meanwhile (the pool is busy,
    /// or connects were still running at the deadline).
    TimedOut,
    /// The last connect failed, with this message (the manager's error, as it displays).
    ConnectFailed(String),
    /// The last connect panicked, with this message.
    ConnectPanicked(String),
    /// The pool crossed `fork()` and refuses to work in the child: built with
    /// `OnFork::Fail`, or a `GuardedPool` without a rebuild closure. Returned at once.
    CrossedFork,
    /// Anything else: a pool generation retired by `Pool::release_idle` that was asked to
    /// connect, or an error this crate did not make.
    Other,
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ErrorKind::TimedOut => f.write_str("timed out"),
            ErrorKind::ConnectFailed(message) => write!(f, "connect failed: {message}"),
            ErrorKind::ConnectPanicked(message) => write!(f, "connect panicked: {message}"),
            ErrorKind::CrossedFork => f.write_str("the pool crossed fork()"),
            ErrorKind::Other => f.write_str("other"),
        }
    }
}

/// [`ErrorKind`] for `r2d2::Error`, the pool's error type (kept for drop-in use). Sealed: it is
/// implemented for `r2d2::Error` only, so methods can be added to it in minor releases.
pub trait ErrorExt: sealed::Sealed {
    /// What went wrong: read from the error's message, which this crate writes.
    fn kind(&self) -> ErrorKind;
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for r2d2::Error {}
}

impl ErrorExt for r2d2::Error {
    fn kind(&self) -> ErrorKind {
        kind_of(&self.to_string())
    }
}

fn kind_of(message: &str) -> ErrorKind {
    let Some(rest) = message.strip_prefix(R2D2_TIMEOUT) else {
        return ErrorKind::Other;
    };
    if rest.is_empty() {
        return ErrorKind::TimedOut;
    }
    let Some(detail) = rest.strip_prefix(": ") else {
        return ErrorKind::Other;
    };
    if detail.starts_with(CROSSED_FORK_ON_FORK_FAIL) || detail.starts_with(CROSSED_FORK_GUARDED) {
        ErrorKind::CrossedFork
    } else if detail.starts_with(CHILD_NONE_FREE) || detail.starts_with(WARM_UP_SHORT) {
        ErrorKind::TimedOut
    } else if let Some(panic) = detail.strip_prefix(CONNECT_PANICKED) {
        ErrorKind::ConnectPanicked(panic.to_owned())
    } else if detail.starts_with(OURS) {
        ErrorKind::Other
    } else {
        let connect_error = match detail.rfind(REBUILT_SUFFIX_START) {
            Some(at) if detail.ends_with(" and could not connect)") => &detail[..at],
            _ => detail,
        };
        ErrorKind::ConnectFailed(connect_error.to_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::r2d2_compat::r2d2_error;
    use std::time::Duration;

    #[derive(Debug)]
    struct Refusing;

    impl r2d2::ManageConnection for Refusing {
        type Connection = ();
        type Error = std::io::Error;

        fn connect(&self) -> Result<(), std::io::Error> {
            Err(std::io::Error::other(
                "refused: (not a forksafe-pool: text)",
            ))
        }

        fn is_valid(&self, _: &mut ()) -> Result<(), std::io::Error> {
            Ok(())
        }

        fn has_broken(&self, _: &mut ()) -> bool {
            false
        }
    }

    #[derive(Debug)]
    struct Single;

    impl r2d2::ManageConnection for Single {
        type Connection = ();
        type Error = std::io::Error;

        fn connect(&self) -> Result<(), std::io::Error> {
            Ok(())
        }

        fn is_valid(&self, _: &mut ()) -> Result<(), std::io::Error> {
            Ok(())
        }

        fn has_broken(&self, _: &mut ()) -> bool {
            false
        }
    }

    #[test]
    fn a_failed_connect_is_told_with_its_message() {
        let pool = crate::Pool::builder()
            .min_idle(Some(0))
            .build_unchecked(Refusing);
        let error = pool.get_timeout(Duration::from_millis(200)).unwrap_err();
        assert_eq!(
            error.kind(),
            ErrorKind::ConnectFailed("refused: (not a forksafe-pool: text)".into())
        );
    }

    #[test]
    fn a_busy_pool_times_out() {
        let pool = crate::Pool::builder().max_size(1).build(Single).unwrap();
        let _held = pool.get().unwrap();
        let error = pool.get_timeout(Duration::from_millis(50)).unwrap_err();
        assert_eq!(error.kind(), ErrorKind::TimedOut);
    }

    #[test]
    fn a_short_warm_up_times_out() {
        let error = r2d2_error(format!("{WARM_UP_SHORT} 1 of 2 connections within 1s"));
        assert_eq!(error.kind(), ErrorKind::TimedOut);
    }

    #[test]
    fn every_detail_the_crate_writes_has_its_kind() {
        let cases = [
            (None, ErrorKind::TimedOut),
            (
                Some(format!(
                    "{CHILD_NONE_FREE} in process 7 became free within 1s"
                )),
                ErrorKind::TimedOut,
            ),
            (
                Some(format!(
                    "{CROSSED_FORK_ON_FORK_FAIL} into process 7 and was built with OnFork::Fail"
                )),
                ErrorKind::CrossedFork,
            ),
            (
                Some(format!(
                    "{CROSSED_FORK_GUARDED} 6 and crossed fork() into process 7"
                )),
                ErrorKind::CrossedFork,
            ),
            (
                Some(format!("{CONNECT_PANICKED}boom")),
                ErrorKind::ConnectPanicked("boom".into()),
            ),
            (
                Some(format!(
                    "{RETIRED} by Pool::release_idle and opens no connections"
                )),
                ErrorKind::Other,
            ),
            (
                Some(format!(
                    "no such host{REBUILT_SUFFIX_START} in process 7 and could not connect)"
                )),
                ErrorKind::ConnectFailed("no such host".into()),
            ),
            (
                Some("password authentication failed".into()),
                ErrorKind::ConnectFailed("password authentication failed".into()),
            ),
        ];
        for (detail, kind) in cases {
            assert_eq!(r2d2_error(detail.clone()).kind(), kind, "{detail:?}");
        }
    }

    #[test]
    fn the_crates_own_texts_start_with_its_details() {
        // The texts made where this module can name them; `process_pool`'s are pinned by the fork
        // tests (a child that cannot connect, a connect that panics).
        let retired = crate::manager::ConnectError::<std::io::Error>::retired().to_string();
        assert!(retired.starts_with(RETIRED), "{retired}");
    }
}
