//! diesel `PgConnection`: finding each connection's socket, which diesel (and libpq through
//! it) does not expose. Two ways, each certain on its own; the first that names a socket wins.
//!
//! 1. The server's view. Right after connecting, the server is asked how it sees this session:
//!    `inet_client_addr()`/`inet_client_port()` (our end) and `inet_server_addr()`/
//!    `inet_server_port()` (its end). The connection's socket is the one TCP socket of this
//!    process whose own address is the client end and whose peer is the server end: a TCP
//!    address pair names at most one connection in a network namespace. One round trip per new
//!    connection (not per checkout), on the connection itself, before anyone else sees it.
//! 2. The connect window (see `connect_window`), when the server's view names no socket of
//!    ours: through PgBouncer or another proxy (the server sees the proxy's socket), and over a
//!    Unix socket (the server sees no address). The one socket that appeared in this process
//!    while libpq connected, if exactly one did. It asks nothing of the session, so it works in
//!    every PgBouncer pooling mode.
//!
//! What is left unidentified (the socket leaks in a forked child, counted in
//! `ForkStats::connections_leaked`; the child still never writes on it):
//! - A connection whose connect overlapped another socket's creation in this process (a
//!   connect outside this crate's pools, say) and that the server's view cannot name: two
//!   sockets are new, and neither is taken.
//! - A socket that was duplicated (two descriptors fit the server's view).
//!
//! Transaction pooling needs diesel's statement cache off; see `Pool`'s docs.

use std::net::SocketAddr;
use std::os::fd::RawFd;

use diesel::sql_types::{Integer, Nullable, Text};
use diesel::{PgConnection, QueryableByName, RunQueryDsl};

use super::tcp;
use crate::connect_window::CreatedSockets;

/// How the server sees this session's two ends; all `NULL` over a Unix socket.
#[derive(QueryableByName)]
struct SessionEnds {
    #[diesel(sql_type = Nullable<Text>)]
    client_addr: Option<String>,
    #[diesel(sql_type = Nullable<Integer>)]
    client_port: Option<i32>,
    #[diesel(sql_type = Nullable<Text>)]
    server_addr: Option<String>,
    #[diesel(sql_type = Nullable<Integer>)]
    server_port: Option<i32>,
}

const SESSION_ENDS: &str = "SELECT host(inet_client_addr()) AS client_addr, inet_client_port() AS client_port, \
                            host(inet_server_addr()) AS server_addr, inet_server_port() AS server_port";

/// The socket of a freshly opened `PgConnection`, when it can be told for certain; `created`
/// is what the connect window saw.
pub(crate) fn locate(
    conn: &mut PgConnection,
    created: Option<&CreatedSockets>,
) -> Option<Vec<RawFd>> {
    let fd = seen_by_server(conn).or_else(|| created?.only_socket())?;
    Some(vec![fd])
}

/// The one socket of this process that fits the server's view of the session's two ends.
fn seen_by_server(conn: &mut PgConnection) -> Option<RawFd> {
    let rows: Vec<SessionEnds> = diesel::sql_query(SESSION_ENDS).load(conn).ok()?;
    let [ends] = rows.as_slice() else { return None };
    let client = socket_addr(ends.client_addr.as_deref()?, ends.client_port?)?;
    let server = socket_addr(ends.server_addr.as_deref()?, ends.server_port?)?;
    tcp::unique_socket(|local, peer| local == client && peer == server)
}

/// `host()` prints a bare address (no `/32`); ports come as `int4`. Bracketed, so that an IPv6
/// address reads as `[addr]:port` like every other server-printed address.
fn socket_addr(host: &str, port: i32) -> Option<SocketAddr> {
    let port = u16::try_from(port).ok()?;
    tcp::parse_addr(&format!("[{host}]:{port}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_printed_ends_become_socket_addresses() {
        assert_eq!(
            socket_addr("127.0.0.1", 5432),
            Some("127.0.0.1:5432".parse().unwrap())
        );
        assert_eq!(
            socket_addr("::1", 40000),
            Some("[::1]:40000".parse().unwrap())
        );
        assert_eq!(
            socket_addr("::ffff:127.0.0.1", 1),
            Some("127.0.0.1:1".parse().unwrap())
        );
        assert_eq!(socket_addr("127.0.0.1/32", 1), None);
        assert_eq!(socket_addr("127.0.0.1", -1), None);
        assert_eq!(socket_addr("127.0.0.1", 70000), None);
    }
}
