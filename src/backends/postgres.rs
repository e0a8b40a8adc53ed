//! diesel `PgConnection`: finding each connection's socket, which diesel (and libpq through
//! it) does not expose.
//!
//! Right after connecting, the server is asked how it sees this session:
//! `inet_client_addr()`/`inet_client_port()` (our end) and `inet_server_addr()`/
//! `inet_server_port()` (its end). The connection's socket is the one TCP socket of this
//! process whose own address is the client end and whose peer is the server end: a TCP address
//! pair names at most one connection in a network namespace. That costs one round trip per new
//! connection (not per checkout), on the connection itself, before anyone else sees it.
//!
//! What is left unidentified (the socket leaks in a forked child, counted in
//! `ForkStats::connections_leaked`; the child still never writes on it):
//! - Unix-socket connections (`host=/var/run/postgresql`): the server reports no client
//!   address, and nothing the server or the socket API offers ties a session to one of our
//!   descriptors without guessing among the process's connections to the same socket path.
//! - Anything in between that changes addresses or ports (pgbouncer, a proxy, NAT, a Docker
//!   port mapping): the server's view then fits no socket of ours, or not one alone.
//! - A socket that was duplicated (two descriptors fit), and servers where the query fails.

use std::net::SocketAddr;
use std::os::fd::RawFd;

use diesel::sql_types::{Integer, Nullable, Text};
use diesel::{PgConnection, QueryableByName, RunQueryDsl};

use super::tcp;

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

/// The socket of a freshly opened `PgConnection`, when it can be told for certain.
pub(crate) fn locate(conn: &mut PgConnection) -> Option<Vec<RawFd>> {
    let rows: Vec<SessionEnds> = diesel::sql_query(SESSION_ENDS).load(conn).ok()?;
    let [ends] = rows.as_slice() else { return None };
    let client = socket_addr(ends.client_addr.as_deref()?, ends.client_port?)?;
    let server = socket_addr(ends.server_addr.as_deref()?, ends.server_port?)?;
    let fd = tcp::unique_socket(|local, peer| local == client && peer == server)?;
    Some(vec![fd])
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
