//! PostgreSQL, whatever the client (diesel's `PgConnection` over libpq, `postgres::Client`):
//! finding a session's socket, which neither client exposes.
//!
//! Right after connecting, the server is asked how it sees this session:
//! `inet_client_addr()`/`inet_client_port()` (our end) and `inet_server_addr()`/
//! `inet_server_port()` (its end). The connection's socket is then
//! [`locate::tcp_socket`](crate::locate::tcp_socket) of that pair: a TCP address pair names at
//! most one connection in a network namespace. That costs one round trip per new connection
//! (not per checkout), on the connection itself, before anyone else sees it. TLS changes
//! nothing: the socket under it has the same addresses.
//!
//! What is left unidentified (the socket leaks in a forked child, counted in
//! `ForkStats::connections_leaked`; the child still never writes on it):
//! - Unix-socket connections (`host=/var/run/postgresql`): the server reports no client
//!   address, and nothing the server or the socket API offers ties a session to one of our
//!   descriptors without guessing among the process's connections to the same socket path.
//! - Anything in between that changes addresses or ports (PgBouncer, a proxy, NAT, a Docker
//!   port mapping): the server's view then fits no socket of ours, or not one alone.
//! - A socket that was duplicated (two descriptors fit), and servers where the query fails.

use std::net::SocketAddr;
use std::os::fd::RawFd;

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
