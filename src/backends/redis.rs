//! `redis::Connection` (the connection of `redis::Client`'s r2d2 support): finding each
//! connection's socket, which the redis crate does not expose.
//!
//! Right after connecting, the server is asked `CLIENT INFO` (Redis 6.2 and later), which
//! reports this connection's client address (`addr=127.0.0.1:54321`) and the server's own end
//! of it (`laddr=127.0.0.1:6379`). The connection's socket is the one TCP socket of this process
//! whose own address is `addr` and whose peer is `laddr`. Unix-socket connections, servers
//! older than 6.2 and anything that changes addresses in between (a proxy, NAT) are left
//! unidentified: their sockets leak in a forked child, counted in `ForkStats::connections_leaked`.
//!
//! Nothing else is needed for drop-in use: the redis crate implements `ConnectionLike` (and so
//! `Commands`) for every `DerefMut` to a connection, which includes
//! [`PooledConnection`](crate::PooledConnection), so `cmd.query(&mut conn)` and `conn.get(..)`
//! work as with r2d2's guard. (Implementing it here as well would conflict with that impl.)

use std::net::SocketAddr;
use std::os::fd::RawFd;

use crate::locate;

/// The socket of a freshly opened `redis::Connection`, when it can be told for certain.
pub(crate) fn locate(conn: &mut redis::Connection) -> Option<Vec<RawFd>> {
    let info: String = redis::cmd("CLIENT").arg("INFO").query(conn).ok()?;
    let (client, server) = ends(&info)?;
    let fd = locate::tcp_socket(client, server)?;
    Some(vec![fd])
}

/// The client and server ends of the connection a `CLIENT INFO` line describes.
fn ends(info: &str) -> Option<(SocketAddr, SocketAddr)> {
    let field = |name: &str| {
        info.split_whitespace()
            .find_map(|pair| pair.strip_prefix(name)?.strip_prefix('='))
    };
    Some((
        locate::socket_addr(field("addr")?)?,
        locate::socket_addr(field("laddr")?)?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_info_ends() {
        let tcp =
            "id=6 addr=127.0.0.1:34710 laddr=127.0.0.1:6379 fd=8 name= age=0 idle=0 flags=N db=0\n";
        let addr = |text: &str| text.parse::<SocketAddr>().unwrap();
        assert_eq!(
            ends(tcp),
            Some((addr("127.0.0.1:34710"), addr("127.0.0.1:6379")))
        );
        let v6 = "id=7 addr=[::1]:40000 laddr=[::1]:6379 fd=9";
        assert_eq!(ends(v6), Some((addr("[::1]:40000"), addr("[::1]:6379"))));
        let unix = "id=8 addr=/run/redis/redis.sock:0 laddr=/run/redis/redis.sock:0 fd=10";
        assert_eq!(ends(unix), None);
        // Before 6.2 there is no laddr.
        assert_eq!(ends("id=9 addr=127.0.0.1:34711 fd=11"), None);
    }
}
