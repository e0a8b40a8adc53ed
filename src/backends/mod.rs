//! The descriptor locators of the backend features: for each connection type a feature names,
//! which descriptors a freshly opened connection owns, so a forked child can let go of them.
//! Each is built on [`crate::locate`] and follows its rule: certain, or `None` (left open in a
//! child and counted in `ForkStats::connections_leaked`).
//!
//! | feature | connection | what is released in a child |
//! |---|---|---|
//! | `diesel-postgres` | `diesel::PgConnection` | its socket, TCP (TLS or not) or Unix, direct or through PgBouncer: the server's view, else the connect window |
//! | `postgres` | `postgres::Client` (r2d2_postgres) | its socket, TCP (TLS or not) or Unix, direct or through PgBouncer: the server's view, else the connect window |
//! | `diesel-mysql` | `diesel::MysqlConnection` | TCP socket, found from the server's view |
//! | `mysql` | `mysql::Conn` (r2d2_mysql) | its socket, TCP or Unix, named by the driver |
//! | `diesel-sqlite` | `diesel::SqliteConnection` | database file descriptors: the connect window, else the only one on the file |
//! | `rusqlite` | `rusqlite::Connection` (r2d2_sqlite) | database file descriptors: the connect window, else the only one on the file |
//! | `redis` | `redis::Connection` | TCP socket, found from `CLIENT INFO` |
//!
//! Connections are recognised by type (`Any` downcast), so a user's own
//! [`descriptor_locator`](crate::Builder::descriptor_locator) replaces this dispatch entirely.

use std::any::{Any, TypeId};
use std::os::fd::RawFd;

use crate::connect_window::{CreatedSockets, Watch};

#[cfg(feature = "diesel-mysql")]
mod diesel_mysql;
#[cfg(feature = "diesel-postgres")]
mod diesel_postgres;
#[cfg(feature = "diesel-sqlite")]
mod diesel_sqlite;
#[cfg(feature = "mysql")]
mod mysql;
#[cfg(feature = "postgres")]
mod postgres;
#[cfg(any(feature = "diesel-postgres", feature = "postgres"))]
mod postgres_session;
#[cfg(feature = "redis")]
mod redis;
#[cfg(feature = "rusqlite")]
mod rusqlite;
#[cfg(any(feature = "diesel-sqlite", feature = "rusqlite"))]
mod sqlite_files;

/// What connects of `connection` (a connection type) are watched for (`connect_window`),
/// because its backend may need that: the sockets they create, for a driver that hides its
/// socket, used through a proxy that hides the client's address from the server; the files
/// they open, for SQLite, whose connections on one file cannot be told apart afterwards.
pub(crate) fn watches_connects(connection: TypeId) -> Option<Watch> {
    #[cfg(feature = "diesel-postgres")]
    if connection == TypeId::of::<diesel::PgConnection>() {
        return Some(Watch::Sockets);
    }
    #[cfg(feature = "postgres")]
    if connection == TypeId::of::<::postgres::Client>() {
        return Some(Watch::Sockets);
    }
    #[cfg(feature = "diesel-sqlite")]
    if connection == TypeId::of::<diesel::SqliteConnection>() {
        return Some(Watch::Files);
    }
    #[cfg(feature = "rusqlite")]
    if connection == TypeId::of::<::rusqlite::Connection>() {
        return Some(Watch::Files);
    }
    let _ = connection;
    None
}

/// The descriptors `conn` owns, for the connection types of the enabled backend features;
/// `None` for any other type or when the backend cannot tell for certain. `created` is what the
/// connect window saw when [`watches_connects`] asked for one.
pub(crate) fn locate(conn: &mut dyn Any, created: Option<&CreatedSockets>) -> Option<Vec<RawFd>> {
    #[cfg(feature = "mysql")]
    if let Some(conn) = conn.downcast_mut::<::mysql::Conn>() {
        return mysql::locate(conn);
    }
    #[cfg(feature = "postgres")]
    if let Some(conn) = conn.downcast_mut::<::postgres::Client>() {
        return postgres::locate(conn, created);
    }
    #[cfg(feature = "rusqlite")]
    if let Some(conn) = conn.downcast_mut::<::rusqlite::Connection>() {
        return rusqlite::locate(conn, created);
    }
    #[cfg(feature = "diesel-sqlite")]
    if let Some(conn) = conn.downcast_mut::<diesel::SqliteConnection>() {
        return diesel_sqlite::locate(conn, created);
    }
    #[cfg(feature = "diesel-mysql")]
    if let Some(conn) = conn.downcast_mut::<diesel::MysqlConnection>() {
        return diesel_mysql::locate(conn);
    }
    #[cfg(feature = "redis")]
    if let Some(conn) = conn.downcast_mut::<::redis::Connection>() {
        return redis::locate(conn);
    }
    #[cfg(feature = "diesel-postgres")]
    if let Some(conn) = conn.downcast_mut::<diesel::PgConnection>() {
        return diesel_postgres::locate(conn, created);
    }
    let _ = (conn, created);
    None
}

/// Whether an enabled backend feature knows the connection type `connection`: only then can
/// [`locate`] name its descriptors.
pub(crate) fn knows(connection: TypeId) -> bool {
    #[cfg(feature = "mysql")]
    if connection == TypeId::of::<::mysql::Conn>() {
        return true;
    }
    #[cfg(feature = "postgres")]
    if connection == TypeId::of::<::postgres::Client>() {
        return true;
    }
    #[cfg(feature = "rusqlite")]
    if connection == TypeId::of::<::rusqlite::Connection>() {
        return true;
    }
    #[cfg(feature = "diesel-sqlite")]
    if connection == TypeId::of::<::diesel::SqliteConnection>() {
        return true;
    }
    #[cfg(feature = "diesel-mysql")]
    if connection == TypeId::of::<::diesel::MysqlConnection>() {
        return true;
    }
    #[cfg(feature = "redis")]
    if connection == TypeId::of::<::redis::Connection>() {
        return true;
    }
    #[cfg(feature = "diesel-postgres")]
    if connection == TypeId::of::<::diesel::PgConnection>() {
        return true;
    }
    let _ = connection;
    false
}

/// The feature whose backend would release connections of the type named `type_name` (as
/// `std::any::type_name` spells it), read from the name: the type may be one of another major
/// version of its driver, which no feature of this version knows however it is named.
pub(crate) fn feature_for(type_name: &str) -> Option<&'static str> {
    let krate = type_name.split("::").next().unwrap_or_default();
    let last = type_name.rsplit("::").next().unwrap_or_default();
    match (krate, last) {
        ("diesel", "PgConnection") => Some("diesel-postgres"),
        ("diesel", "MysqlConnection") => Some("diesel-mysql"),
        ("diesel", "SqliteConnection") => Some("diesel-sqlite"),
        ("postgres", "Client") => Some("postgres"),
        ("mysql", "Conn") => Some("mysql"),
        ("rusqlite", "Connection") => Some("rusqlite"),
        ("redis", "Connection") => Some("redis"),
        _ => None,
    }
}

/// Whether a libc `fork()` must wait while a connection like `conn` is checked out, because
/// its library keeps per-process state that a fork copies mid-use (see `ForkWaitingLease`).
/// A backend opts in with one line for its connection type.
pub(crate) fn fork_waits_while_checked_out(conn: &dyn Any) -> bool {
    #[cfg(feature = "diesel-sqlite")]
    if conn.is::<diesel::SqliteConnection>() {
        return true;
    }
    #[cfg(feature = "rusqlite")]
    if conn.is::<::rusqlite::Connection>() {
        return true;
    }
    let _ = conn;
    false
}

#[cfg(test)]
mod tests {
    use super::feature_for;

    #[test]
    fn the_feature_is_read_from_the_type_name() {
        for (name, feature) in [
            (
                "diesel::pg::connection::PgConnection",
                Some("diesel-postgres"),
            ),
            (
                "diesel::mysql::connection::MysqlConnection",
                Some("diesel-mysql"),
            ),
            (
                "diesel::sqlite::connection::SqliteConnection",
                Some("diesel-sqlite"),
            ),
            ("postgres::client::Client", Some("postgres")),
            ("mysql::conn::Conn", Some("mysql")),
            ("rusqlite::Connection", Some("rusqlite")),
            ("redis::connection::Connection", Some("redis")),
            ("my_app::db::Connection", None),
            ("u32", None),
        ] {
            assert_eq!(feature_for(name), feature, "{name}");
        }
    }
}
