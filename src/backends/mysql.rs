//! `mysql::Conn` (the connection of r2d2_mysql): the driver names its socket (`AsRawFd`), over
//! TCP and over a Unix socket alike, so nothing is asked of the server.

use std::os::fd::RawFd;

use crate::locate;

/// The socket of a freshly opened `mysql::Conn`.
pub(crate) fn locate(conn: &mut mysql::Conn) -> Option<Vec<RawFd>> {
    Some(vec![locate::as_raw_fd(conn)?])
}
