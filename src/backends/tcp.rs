//! Finding the TCP socket of a connection whose driver does not expose it.
//!
//! The server knows the connection's client address as it sees it (MariaDB's processlist
//! `HOST`, Redis `CLIENT INFO`). This process's descriptors are scanned (`/proc/self/fd`) for
//! TCP sockets whose own address (`getsockname`) and peer (`getpeername`) fit what the server
//! said. A TCP address pair names at most one connection in a network namespace, so when the
//! server's view is ours there is exactly one such socket — the connection's. Anything else (no
//! match, two descriptors for one socket, a proxy or NAT in between, a non-TCP socket) is not
//! certain, and the caller gets `None`: the connection's socket is then leaked in a forked
//! child, never guessed at.

use std::fs;
use std::net::{IpAddr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::RawFd;

use nix::sys::socket::{getpeername, getsockname, SockaddrStorage};

/// The one descriptor of this process that is a connected TCP socket whose local and peer
/// addresses satisfy `fits(local, peer)`; `None` unless there is exactly one such descriptor.
pub(crate) fn unique_socket(fits: impl Fn(SocketAddr, SocketAddr) -> bool) -> Option<RawFd> {
    let mut found = None;
    for (fd, inode) in sockets() {
        let (Some(local), Some(peer)) = (local_addr(fd), peer_addr(fd)) else {
            continue;
        };
        if fits(local, peer) {
            if found.is_some() {
                // Two descriptors fit: one socket duplicated, or addresses that do not name a
                // single connection. Either way we cannot tell which one is the driver's.
                return None;
            }
            found = Some((fd, inode));
        }
    }
    let (fd, inode) = found?;
    // The address pair only names one connection for TCP, so make sure it is a TCP socket;
    // then that the descriptor was not closed and its number reused while we looked.
    let tcp = crate::sys::socket_protocol(fd) == Some(libc::IPPROTO_TCP);
    (tcp && socket_inode(fd) == Some(inode)).then_some(fd)
}

/// Parses `ip:port` or `[ip]:port`, as servers print client addresses.
pub(crate) fn parse_addr(text: &str) -> Option<SocketAddr> {
    let (ip, port) = text.rsplit_once(':')?;
    let ip = ip
        .strip_prefix('[')
        .and_then(|ip| ip.strip_suffix(']'))
        .unwrap_or(ip);
    Some(normalize(SocketAddr::new(
        ip.parse().ok()?,
        port.parse().ok()?,
    )))
}

/// An IPv4 address as itself, even when a dual-stack socket shows it IPv4-mapped.
pub(crate) fn normalize(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), v6.port()),
            None => addr,
        },
        SocketAddr::V4(_) => addr,
    }
}

/// This process's socket descriptors and their inode numbers.
fn sockets() -> Vec<(RawFd, u64)> {
    let Ok(entries) = fs::read_dir("/proc/self/fd") else {
        return Vec::new();
    };
    entries
        .filter_map(|entry| {
            let fd = entry.ok()?.file_name().to_str()?.parse::<RawFd>().ok()?;
            Some((fd, socket_inode(fd)?))
        })
        .collect()
}

/// The inode of the socket `fd` refers to now, from its `/proc/self/fd` link `socket:[N]`.
fn socket_inode(fd: RawFd) -> Option<u64> {
    let link = fs::read_link(format!("/proc/self/fd/{fd}")).ok()?;
    link.to_str()?
        .strip_prefix("socket:[")?
        .strip_suffix(']')?
        .parse()
        .ok()
}

fn local_addr(fd: RawFd) -> Option<SocketAddr> {
    inet(getsockname::<SockaddrStorage>(fd).ok()?)
}

fn peer_addr(fd: RawFd) -> Option<SocketAddr> {
    inet(getpeername::<SockaddrStorage>(fd).ok()?)
}

fn inet(addr: SockaddrStorage) -> Option<SocketAddr> {
    if let Some(v4) = addr.as_sockaddr_in() {
        return Some(SocketAddr::V4(SocketAddrV4::from(*v4)));
    }
    addr.as_sockaddr_in6()
        .map(|v6| normalize(SocketAddr::V6(SocketAddrV6::from(*v6))))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{TcpListener, TcpStream, UdpSocket};
    use std::os::fd::AsRawFd;

    fn exact(local: SocketAddr, peer: SocketAddr) -> impl Fn(SocketAddr, SocketAddr) -> bool {
        move |l, p| l == local && p == peer
    }

    #[test]
    fn finds_the_one_socket_with_the_servers_view_of_the_client() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (accepted, client_seen_by_server) = listener.accept().unwrap();
        let server_side = accepted.local_addr().unwrap();
        assert_eq!(
            unique_socket(exact(client_seen_by_server, server_side)),
            Some(client.as_raw_fd())
        );
        // The server's own end fits the reversed pair, and only that.
        assert_eq!(
            unique_socket(exact(server_side, client_seen_by_server)),
            Some(accepted.as_raw_fd())
        );
    }

    #[test]
    fn a_duplicated_socket_is_not_certain() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let _clone = client.try_clone().unwrap();
        let fits = exact(client.local_addr().unwrap(), client.peer_addr().unwrap());
        assert_eq!(unique_socket(fits), None);
    }

    #[test]
    fn no_fitting_socket_is_none() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let mut wrong_port = client.local_addr().unwrap();
        wrong_port.set_port(wrong_port.port().wrapping_add(1));
        assert_eq!(
            unique_socket(exact(wrong_port, client.peer_addr().unwrap())),
            None
        );
    }

    #[test]
    fn a_connected_udp_socket_with_the_same_addresses_is_not_taken() {
        let peer = UdpSocket::bind("127.0.0.1:0").unwrap();
        let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
        udp.connect(peer.local_addr().unwrap()).unwrap();
        let fits = exact(udp.local_addr().unwrap(), peer.local_addr().unwrap());
        assert_eq!(unique_socket(fits), None);
    }

    #[test]
    fn parses_server_printed_addresses() {
        assert_eq!(
            parse_addr("127.0.0.1:54321"),
            Some("127.0.0.1:54321".parse().unwrap())
        );
        assert_eq!(
            parse_addr("[::1]:6379"),
            Some("[::1]:6379".parse().unwrap())
        );
        assert_eq!(parse_addr("::1:6379"), Some("[::1]:6379".parse().unwrap()));
        assert_eq!(
            parse_addr("::ffff:127.0.0.1:80"),
            Some("127.0.0.1:80".parse().unwrap())
        );
        assert_eq!(parse_addr("/tmp/redis.sock:0"), None);
        assert_eq!(parse_addr("localhost:3306"), None);
        assert_eq!(parse_addr("localhost"), None);
    }
}
