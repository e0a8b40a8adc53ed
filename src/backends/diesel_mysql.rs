//! diesel `MysqlConnection`: finding each connection's socket, which diesel does not expose.
//!
//! Right after connecting, the server is asked for this session's client address
//! (`information_schema.PROCESSLIST.HOST` of `CONNECTION_ID()`, e.g. `127.0.0.1:54321`) and
//! for its port (`@@port`). The connection's socket is the one TCP socket of this process
//! whose own address is that client address and whose peer port is the server's port.
//!
//! What is left unidentified (the socket leaks in a forked child, counted in
//! `ForkStats::connections_leaked`):
//! - Unix-socket connections (`localhost` without a port in `HOST`): neither the server nor the
//!   socket API ties a session to one of our descriptors without guessing, and diesel gives no
//!   access to the client library's handle (libmysqlclient's `mysql_get_socket` would name the
//!   descriptor, but `MysqlConnection` keeps its `MYSQL*` private). The `mysql` feature's
//!   `mysql::Conn` names its socket, Unix or TCP.
//! - A `HOST` that is a name other than `localhost` (a server resolving client names, i.e.
//!   without `skip_name_resolve`); `localhost` is accepted for a loopback socket.
//! - Anything in between that changes addresses or ports (a proxy, NAT, Docker port mapping),
//!   and servers where the query fails.

use std::net::SocketAddr;
use std::os::fd::RawFd;

use diesel::sql_types::Text;
use diesel::{MysqlConnection, QueryableByName, RunQueryDsl};

use crate::locate;

/// The server's view of this session's client end, and the port it listens on.
#[derive(QueryableByName)]
struct ClientEnd {
    #[diesel(sql_type = Text)]
    host: String,
    #[diesel(sql_type = Text)]
    server_port: String,
}

const CLIENT_END: &str = "SELECT HOST AS host, CAST(@@port AS CHAR) AS server_port \
                          FROM information_schema.PROCESSLIST WHERE ID = CONNECTION_ID()";

/// The socket of a freshly opened `MysqlConnection`, when it can be told for certain.
pub(crate) fn locate(conn: &mut MysqlConnection) -> Option<Vec<RawFd>> {
    let rows: Vec<ClientEnd> = diesel::sql_query(CLIENT_END).load(conn).ok()?;
    let [end] = rows.as_slice() else { return None };
    let client = ClientHost::parse(&end.host)?;
    let server_port: u16 = end.server_port.trim().parse().ok()?;
    let fd =
        locate::tcp_socket_matching(|local, peer| client.is(local) && peer.port() == server_port)?;
    Some(vec![fd])
}

/// A processlist `HOST`: `ip:port`, or `localhost:port` when the server resolves names.
#[derive(Debug, PartialEq, Eq)]
enum ClientHost {
    Addr(SocketAddr),
    Loopback(u16),
}

impl ClientHost {
    fn parse(host: &str) -> Option<ClientHost> {
        if let Some(addr) = locate::socket_addr(host) {
            return Some(ClientHost::Addr(addr));
        }
        let (name, port) = host.rsplit_once(':')?;
        (name == "localhost").then_some(())?;
        Some(ClientHost::Loopback(port.parse().ok()?))
    }

    /// True if `local`, a socket's own address, is the client end the server described.
    fn is(&self, local: SocketAddr) -> bool {
        match *self {
            ClientHost::Addr(addr) => local == addr,
            ClientHost::Loopback(port) => local.port() == port && local.ip().is_loopback(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn processlist_hosts() {
        let addr = |text: &str| text.parse::<SocketAddr>().unwrap();
        assert_eq!(
            ClientHost::parse("127.0.0.1:54321"),
            Some(ClientHost::Addr(addr("127.0.0.1:54321")))
        );
        assert_eq!(
            ClientHost::parse("::1:54321"),
            Some(ClientHost::Addr(addr("[::1]:54321")))
        );
        assert_eq!(
            ClientHost::parse("localhost:54321"),
            Some(ClientHost::Loopback(54321))
        );
        // A Unix-socket session, and a resolved name we cannot check without guessing.
        assert_eq!(ClientHost::parse("localhost"), None);
        assert_eq!(ClientHost::parse("app-1.example:54321"), None);

        let loopback = ClientHost::Loopback(54321);
        assert!(loopback.is(addr("127.0.0.1:54321")));
        assert!(loopback.is(addr("127.0.0.2:54321")));
        assert!(loopback.is(addr("[::1]:54321")));
        assert!(!loopback.is(addr("10.0.0.1:54321")));
        assert!(!loopback.is(addr("127.0.0.1:54322")));
        assert!(ClientHost::Addr(addr("10.0.0.1:5")).is(addr("10.0.0.1:5")));
        assert!(!ClientHost::Addr(addr("10.0.0.1:5")).is(addr("10.0.0.2:5")));
    }
}
