//! PostgreSQL, whatever the client (diesel's `PgConnection` over libpq, `postgres::Client`):
//! finding a session's socket, which neither client exposes. Two ways, each certain on its own;
//! the first that names a socket wins.
//!
//! 1. The server's view. Right after connecting, the server is asked how it sees this session:
//!    `inet_client_addr()`/`inet_client_port()` (our end) and `inet_server_addr()`/
//!    `inet_server_port()` (its end). The connection's socket is then
//!    [`locate::tcp_socket`](crate::locate::tcp_socket) of that pair: a TCP address pair names
//!    at most one connection in a network namespace. One round trip per new connection (not per
//!    checkout), on the connection itself, before anyone else sees it, with no named prepared
//!    statement (PgBouncer in transaction pooling may run each round trip on another server
//!    connection, and would leave one behind). TLS changes nothing: the socket under it has the
//!    same addresses.
//! 2. The connect window (`connect_window`), when the server's view names no socket of ours:
//!    through PgBouncer or another proxy (the server sees the proxy's socket) and over a Unix
//!    socket (the server sees no address). The one socket that appeared in this process while
//!    the driver connected, if exactly one did. It asks nothing of the session, so it works in
//!    every PgBouncer pooling mode.
//!
//! What is left unidentified (the socket leaks in a forked child, counted in
//! `ForkStats::connections_leaked`; the child still never writes on it):
//! - A connection whose connect overlapped another socket's creation in this process (a connect
//!   outside this crate's pools, say) and that the server's view cannot name: two sockets are
//!   new, and neither is taken.
//! - A socket that was duplicated (two descriptors fit the server's view).
//!
//! Transaction pooling with diesel needs its statement cache off; see `Pool`'s docs.

use std::net::SocketAddr;
use std::os::fd::RawFd;

use crate::connect_window::CreatedSockets;
use crate::locate;

/// The query: all `NULL` over a Unix socket. `host()` prints a bare address (no `/32`).
pub(crate) const SESSION_ENDS: &str = "SELECT host(inet_client_addr()) AS client_addr, inet_client_port() AS client_port, \
                                       host(inet_server_addr()) AS server_addr, inet_server_port() AS server_port";

/// One row of [`SESSION_ENDS`], as the client library decoded it.
pub(crate) struct SessionEnds {
    pub(crate) client_addr: Option<String>,
    pub(crate) client_port: Option<i32>,
    pub(crate) server_addr: Option<String>,
    pub(crate) server_port: Option<i32>,
}

impl SessionEnds {
    /// The session's socket, when these ends name exactly one of this process's TCP sockets.
    pub(crate) fn locate(&self) -> Option<Vec<RawFd>> {
        let client = socket_addr(self.client_addr.as_deref()?, self.client_port?)?;
        let server = socket_addr(self.server_addr.as_deref()?, self.server_port?)?;
        Some(vec![locate::tcp_socket(client, server)?])
    }
}

/// The session's socket: the one the server's view (`ends`, when the query worked) names,
/// else the one the connect window saw created.
pub(crate) fn socket(
    ends: Option<SessionEnds>,
    created: Option<&CreatedSockets>,
) -> Option<Vec<RawFd>> {
    ends.and_then(|ends| ends.locate())
        .or_else(|| Some(vec![created?.only_socket()?]))
}

/// Ports come as `int4`. Bracketed, so that an IPv6 address reads as `[addr]:port` like every
/// other server-printed address.
fn socket_addr(host: &str, port: i32) -> Option<SocketAddr> {
    let port = u16::try_from(port).ok()?;
    locate::socket_addr(&format!("[{host}]:{port}"))
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

    #[test]
    fn a_unix_socket_session_is_not_located() {
        let unix = SessionEnds {
            client_addr: None,
            client_port: None,
            server_addr: None,
            server_port: None,
        };
        assert_eq!(unix.locate(), None);
    }
}
