//! What each backend feature adds: the connection traits of its client library for
//! [`PooledConnection`](crate::PooledConnection), and a way to find the descriptors each of its
//! connections owns, so a forked child can let go of them.

use std::any::Any;
use std::os::fd::RawFd;

#[cfg(feature = "diesel")]
mod diesel;

/// The descriptors `conn` owns, for the connection types of the enabled backend features;
/// `None` for any other type or when the backend cannot tell for certain.
pub(crate) fn locate(conn: &mut dyn Any) -> Option<Vec<RawFd>> {
    let _ = conn;
    None
}
