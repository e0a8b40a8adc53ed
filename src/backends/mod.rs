//! What each backend feature adds: the connection traits of its client library for
//! [`PooledConnection`](crate::PooledConnection), and a way to find the descriptors each of its
//! connections owns, so a forked child can let go of them.

use std::any::{Any, TypeId};
use std::os::fd::RawFd;

use crate::connect_window::CreatedSockets;

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

/// Whether connects of `connection` (a connection type) are watched for the sockets they
/// create (`connect_window`), because its backend may need that to name the socket: a driver
/// that hides its socket, used through a proxy that hides the client's address from the server.
pub(crate) fn watches_connects(connection: TypeId) -> bool {
    #[cfg(feature = "diesel-postgres")]
    if connection == TypeId::of::<::diesel::PgConnection>() {
        return true;
    }
    let _ = connection;
    false
}

/// The descriptors `conn` owns, for the connection types of the enabled backend features;
/// `None` for any other type or when the backend cannot tell for certain. `created` is what the
/// connect window saw when [`watches_connects`] asked for one.
pub(crate) fn locate(conn: &mut dyn Any, created: Option<&CreatedSockets>) -> Option<Vec<RawFd>> {
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
        return postgres::locate(conn, created);
    }
    #[cfg(feature = "diesel-sqlite")]
    if let Some(conn) = conn.downcast_mut::<::diesel::SqliteConnection>() {
        return sqlite::locate(conn);
    }
    let _ = (conn, created);
    None
}
