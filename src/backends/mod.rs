//! What each backend feature adds: the connection traits of its client library for
//! [`PooledConnection`](crate::PooledConnection), and a way to find the descriptors each of its
//! connections owns, so a forked child can let go of them.

use std::any::Any;
use std::os::fd::RawFd;

#[cfg(feature = "diesel")]
mod diesel;
#[cfg(feature = "diesel-mysql")]
mod mysql;
#[cfg(feature = "diesel-postgres")]
mod postgres;
#[cfg(feature = "redis")]
mod redis;
#[cfg(feature = "diesel-sqlite")]
mod sqlite;
#[cfg(any(
    feature = "diesel-mysql",
    feature = "diesel-postgres",
    feature = "redis"
))]
mod tcp;

/// The descriptors `conn` owns, for the connection types of the enabled backend features;
/// `None` for any other type or when the backend cannot tell for certain.
pub(crate) fn locate(conn: &mut dyn Any) -> Option<Vec<RawFd>> {
    #[cfg(feature = "diesel-mysql")]
    if let Some(conn) = conn.downcast_mut::<::diesel::MysqlConnection>() {
        return mysql::locate(conn);
    }
    #[cfg(feature = "redis")]
    if let Some(conn) = conn.downcast_mut::<::redis::Connection>() {
        return redis::locate(conn);
    }
    #[cfg(feature = "diesel-postgres")]
    if let Some(conn) = conn.downcast_mut::<::diesel::PgConnection>() {
        return postgres::locate(conn);
    }
    #[cfg(feature = "diesel-sqlite")]
    if let Some(conn) = conn.downcast_mut::<::diesel::SqliteConnection>() {
        return sqlite::locate(conn);
    }
    let _ = conn;
    None
}

/// Whether a libc `fork()` must wait while a connection like `conn` is checked out, because
/// its library keeps per-process state that a fork copies mid-use (see `ForkWaitingLease`).
/// A backend opts in with one line for its connection type.
pub(crate) fn fork_waits_while_checked_out(conn: &dyn Any) -> bool {
    #[cfg(feature = "diesel-sqlite")]
    if conn.is::<::diesel::SqliteConnection>() {
        return true;
    }
    let _ = conn;
    false
}
