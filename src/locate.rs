//! Building blocks for a [descriptor locator](crate::Builder::descriptor_locator): finding the
//! descriptors a connection owns, so that a forked child can let go of them.
//!
//! A locator answers one question right after each connect: which of this process's file
//! descriptors belong to the new connection, *for certain*. Each function here answers it for
//! one kind of connection and returns `None` whenever the answer is not certain; the crate's own
//! backends are built on them.
//!
//! - [`as_raw_fd`]: the driver names its descriptor (`AsRawFd`), TCP or Unix socket alike.
//! - [`tcp_socket`] (and [`tcp_socket_matching`]): the driver hides its socket, but the server
//!   can say how it sees the session — its client address and its own (PostgreSQL
//!   `inet_client_addr()`, MariaDB's processlist `HOST`, Redis `CLIENT INFO`). This process's
//!   descriptors are scanned (`/proc/self/fd` on Linux; elsewhere every number below the
//!   descriptor limit, when that is at most 65536) for TCP sockets whose own address
//!   (`getsockname`) and peer (`getpeername`) are that pair. A TCP address pair names at most
//!   one connection in a network namespace, so when the server's view is ours there is exactly
//!   one such socket: the connection's. No match, two descriptors for one socket, a proxy or
//!   NAT in between (the server then sees other addresses) or a non-TCP socket all give
//!   `None`. [`socket_addr`] parses the addresses servers print.
//! - [`file()`]: an embedded database's file, when exactly one descriptor of this process is
//!   open on it.
//!
//! A locator that returns `None` leaves the connection's descriptors open in a forked child
//! (counted in [`ForkStats::connections_leaked`](crate::ForkStats)); the child still never
//! writes on them. That is the safe side: replacing a descriptor that is not the connection's
//! would break whatever really owns it.
//!
//! ```
//! use std::net::{TcpListener, TcpStream};
//! use std::os::fd::AsRawFd;
//! use forksafe_pool::locate;
//!
//! let server = TcpListener::bind("127.0.0.1:0")?;
//! let client = TcpStream::connect(server.local_addr()?)?;
//! // What a server would report for this session: the client's end and its own.
//! let (_accepted, client_end) = server.accept()?;
//! let server_end = server.local_addr()?;
//! assert_eq!(locate::tcp_socket(client_end, server_end), Some(client.as_raw_fd()));
//! assert_eq!(locate::as_raw_fd(&client), Some(client.as_raw_fd()));
//! # Ok::<(), std::io::Error>(())
//! ```

use std::fs;
use std::net::{IpAddr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use nix::sys::socket::{getpeername, getsockname, SockaddrStorage};
use nix::sys::stat::{fstat, SFlag};

/// The one TCP socket of this process whose own address is `local` and whose peer is `peer`;
/// `None` unless there is exactly one.
///
/// Pass the session's two ends as the *server* reports them: its client address is our
/// `local`, its own address our `peer`. IPv4-mapped IPv6 addresses (`::ffff:127.0.0.1`, as a
/// dual-stack server prints them) match their IPv4 form.
///
/// Scans this process's descriptors (`/proc/self/fd` on Linux), so it costs a few system calls
/// per open descriptor: call it once per connect (as a locator runs), not per checkout. Returns
/// `None` where the descriptors cannot be listed (no `/proc`, and a descriptor limit above
/// 65536).
pub fn tcp_socket(local: SocketAddr, peer: SocketAddr) -> Option<RawFd> {
    let (local, peer) = (normalize(local), normalize(peer));
    tcp_socket_matching(|l, p| l == local && p == peer)
}

/// The one TCP socket of this process whose own and peer addresses satisfy
/// `fits(local, peer)`; `None` unless there is exactly one. For servers that report less than
/// the whole pair (e.g. a client port and the server's port, but a host name for the address).
/// The addresses passed to `fits` are normalized as in [`tcp_socket`].
///
/// `fits` must name at most one connection; a loose predicate that fits two sockets gives
/// `None`, never a guess.
pub fn tcp_socket_matching(fits: impl Fn(SocketAddr, SocketAddr) -> bool) -> Option<RawFd> {
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
    // then that the descriptor was not closed and its number reused while we looked (by its
    // inode, and by its addresses again where a kernel's socket inodes say little).
    let tcp = crate::sys::socket_protocol(fd) == Some(libc::IPPROTO_TCP);
    let same = socket_inode(fd) == Some(inode)
        && matches!((local_addr(fd), peer_addr(fd)), (Some(local), Some(peer)) if fits(local, peer));
    (tcp && same).then_some(fd)
}

/// Parses an address as servers print them: `ip:port`, `[ip]:port`, or an IPv6 address
/// followed by `:port` without brackets (MariaDB's processlist). IPv4-mapped IPv6 addresses come
/// back as IPv4. `None` for anything else: a host name, a Unix socket path.
///
/// ```
/// use forksafe_pool::locate::socket_addr;
///
/// assert_eq!(socket_addr("127.0.0.1:5432"), Some("127.0.0.1:5432".parse().unwrap()));
/// assert_eq!(socket_addr("::1:6379"), Some("[::1]:6379".parse().unwrap()));
/// assert_eq!(socket_addr("::ffff:127.0.0.1:80"), Some("127.0.0.1:80".parse().unwrap()));
/// assert_eq!(socket_addr("localhost:3306"), None);
/// ```
pub fn socket_addr(text: &str) -> Option<SocketAddr> {
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

/// The descriptor of a connection that names it (`AsRawFd`, like `mysql::Conn` or a
/// `std::net::TcpStream`), as long as it is open; `None` if it is not.
///
/// ```
/// use forksafe_pool::locate;
/// use std::os::fd::AsRawFd;
/// use std::os::unix::net::UnixStream;
///
/// let (ours, _theirs) = UnixStream::pair()?;
/// assert_eq!(locate::as_raw_fd(&ours), Some(ours.as_raw_fd()));
/// # Ok::<(), std::io::Error>(())
/// ```
pub fn as_raw_fd(conn: &impl AsRawFd) -> Option<RawFd> {
    let fd = conn.as_raw_fd();
    (fd >= 0 && fstat(fd).is_ok()).then_some(fd)
}

/// The one descriptor of this process open on the regular file at `path` (the same device and
/// inode); `None` if there is none or more than one, or `path` is not a regular file.
///
/// More than one is the rule, not the exception, when several connections open one database
/// file: nothing then tells which descriptor is whose, so the answer is `None`. The scan (as in
/// [`tcp_socket`]) costs a system call per open descriptor.
///
/// ```
/// use forksafe_pool::locate;
/// use std::os::fd::AsRawFd;
///
/// let path = std::env::temp_dir().join(format!("locate-file-doc-{}", std::process::id()));
/// let file = std::fs::File::create(&path)?;
/// assert_eq!(locate::file(&path), Some(file.as_raw_fd()));
/// let second = std::fs::File::open(&path)?;
/// assert_eq!(locate::file(&path), None, "two descriptors: not certain");
/// # drop((file, second));
/// # std::fs::remove_file(&path)?;
/// # Ok::<(), std::io::Error>(())
/// ```
pub fn file(path: impl AsRef<Path>) -> Option<RawFd> {
    let meta = fs::metadata(path).ok()?;
    meta.is_file().then_some(())?;
    only_descriptor_of(meta.dev(), meta.ino())
}

/// The one descriptor of this process open on the regular file `(dev, ino)`; `None` if there
/// are none or several.
// `st_dev` and `st_ino` are `u64` on some targets and not on others (macOS: `i32` and `u64`).
#[allow(clippy::unnecessary_cast)]
fn only_descriptor_of(dev: u64, ino: u64) -> Option<RawFd> {
    let mut found = None;
    for fd in descriptors() {
        let Ok(stat) = fstat(fd) else { continue };
        let regular =
            SFlag::from_bits_truncate(stat.st_mode & SFlag::S_IFMT.bits()) == SFlag::S_IFREG;
        if regular && stat.st_dev as u64 == dev && stat.st_ino as u64 == ino {
            if found.is_some() {
                return None;
            }
            found = Some(fd);
        }
    }
    found
}

/// This process's open descriptor numbers (on Linux including, briefly, the directory handle
/// used to list them, which is a directory and never matches a file or a socket); none when
/// they cannot be listed, so nothing is found.
fn descriptors() -> Vec<RawFd> {
    crate::sys::open_descriptors().unwrap_or_default()
}

/// An IPv4 address as itself, even when a dual-stack socket shows it IPv4-mapped.
fn normalize(addr: SocketAddr) -> SocketAddr {
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
    descriptors()
        .into_iter()
        .filter_map(|fd| Some((fd, socket_inode(fd)?)))
        .collect()
}

/// The inode of the socket `fd` refers to now (`fstat`; on Linux the `N` of its
/// `/proc/self/fd` link `socket:[N]`); `None` if it is closed or not a socket.
fn socket_inode(fd: RawFd) -> Option<u64> {
    let stat = fstat(fd).ok()?;
    let socket = SFlag::from_bits_truncate(stat.st_mode & SFlag::S_IFMT.bits()) == SFlag::S_IFSOCK;
    socket.then_some(stat.st_ino as u64)
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
            tcp_socket_matching(exact(client_seen_by_server, server_side)),
            Some(client.as_raw_fd())
        );
        // The server's own end fits the reversed pair, and only that.
        assert_eq!(
            tcp_socket_matching(exact(server_side, client_seen_by_server)),
            Some(accepted.as_raw_fd())
        );
    }

    #[test]
    fn tcp_socket_takes_the_servers_ipv4_mapped_view() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (_accepted, client_end) = listener.accept().unwrap();
        let mapped = |addr: SocketAddr| match addr {
            SocketAddr::V4(v4) => SocketAddr::new(IpAddr::V6(v4.ip().to_ipv6_mapped()), v4.port()),
            SocketAddr::V6(_) => addr,
        };
        let server_end = listener.local_addr().unwrap();
        assert_eq!(
            tcp_socket(mapped(client_end), mapped(server_end)),
            Some(client.as_raw_fd())
        );
        assert_eq!(
            tcp_socket(server_end, client_end),
            Some(_accepted.as_raw_fd())
        );
    }

    #[test]
    fn as_raw_fd_refuses_a_closed_descriptor() {
        struct Named(RawFd);
        impl AsRawFd for Named {
            fn as_raw_fd(&self) -> RawFd {
                self.0
            }
        }
        let (ours, _theirs) = std::os::unix::net::UnixStream::pair().unwrap();
        assert_eq!(as_raw_fd(&ours), Some(ours.as_raw_fd()));
        assert_eq!(as_raw_fd(&Named(-1)), None);
        // A number far above any open descriptor of this test process.
        assert_eq!(as_raw_fd(&Named(1 << 20)), None);
    }

    #[test]
    fn a_file_is_found_only_while_one_descriptor_is_open_on_it() {
        let path =
            std::env::temp_dir().join(format!("forksafe-locate-unit-{}-file", std::process::id()));
        let file = fs::File::create(&path).unwrap();
        let meta = fs::metadata(&path).unwrap();
        assert_eq!(super::file(&path), Some(file.as_raw_fd()));
        // Same inode number on a device no open file is on. (Not `ino + 1`: tests run in
        // parallel threads, and another test's temporary file may well have the next inode.)
        assert_eq!(only_descriptor_of(u64::MAX, meta.ino()), None);
        let second = fs::File::open(&path).unwrap();
        assert_eq!(super::file(&path), None);
        drop(second);
        assert_eq!(super::file(&path), Some(file.as_raw_fd()));
        drop(file);
        assert_eq!(super::file(&path), None);
        assert_eq!(super::file(std::env::temp_dir()), None, "a directory");
        let _ = fs::remove_file(&path);
    }

    #[test]
    fn a_duplicated_socket_is_not_certain() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let _clone = client.try_clone().unwrap();
        let fits = exact(client.local_addr().unwrap(), client.peer_addr().unwrap());
        assert_eq!(tcp_socket_matching(fits), None);
    }

    #[test]
    fn no_fitting_socket_is_none() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let mut wrong_port = client.local_addr().unwrap();
        wrong_port.set_port(wrong_port.port().wrapping_add(1));
        assert_eq!(
            tcp_socket_matching(exact(wrong_port, client.peer_addr().unwrap())),
            None
        );
    }

    #[test]
    fn a_connected_udp_socket_with_the_same_addresses_is_not_taken() {
        let peer = UdpSocket::bind("127.0.0.1:0").unwrap();
        let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
        udp.connect(peer.local_addr().unwrap()).unwrap();
        let fits = exact(udp.local_addr().unwrap(), peer.local_addr().unwrap());
        assert_eq!(tcp_socket_matching(fits), None);
    }

    #[test]
    fn parses_server_printed_addresses() {
        assert_eq!(
            socket_addr("127.0.0.1:54321"),
            Some("127.0.0.1:54321".parse().unwrap())
        );
        assert_eq!(
            socket_addr("[::1]:6379"),
            Some("[::1]:6379".parse().unwrap())
        );
        assert_eq!(socket_addr("::1:6379"), Some("[::1]:6379".parse().unwrap()));
        assert_eq!(
            socket_addr("::ffff:127.0.0.1:80"),
            Some("127.0.0.1:80".parse().unwrap())
        );
        assert_eq!(socket_addr("/tmp/redis.sock:0"), None);
        assert_eq!(socket_addr("localhost:3306"), None);
        assert_eq!(socket_addr("localhost"), None);
    }
}
