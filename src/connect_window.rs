//! Naming the socket a connect created, for connections whose driver hides its socket and whose
//! server cannot name it either.
//!
//! diesel's `PgConnection` exposes no descriptor. Connected straight to PostgreSQL, the server's
//! view of the session names the socket (see `backends::postgres`); behind PgBouncer, or any
//! other proxy, the server sees the proxy's socket, and nothing in the session says which of
//! this process's sockets is the client end.
//!
//! What is certain instead: the connection's socket did not exist when its connect started, and
//! it is open when the connect returns (libpq makes a new socket for every connection and keeps
//! it until the connection is closed). So the manager lists this process's sockets right before
//! and right after the driver's connect ([`ConnectWindow`]). If exactly one socket appeared in
//! between — counting sockets of every kind, made by any thread — it is the connection's. If
//! two or more appeared (another thread opened a socket meanwhile), the connection is left
//! unidentified: its socket leaks in a forked child and is counted there
//! (`ForkStats::connections_leaked`), never guessed at.
//!
//! Sockets are told apart by their kernel cookie (`SO_COOKIE`, 64 bits, never reused while the
//! system runs), not by descriptor number or inode: a socket closed during the connect and
//! replaced by another under the same number is still a new socket.
//!
//! So that this process's own connects do not make each other ambiguous (r2d2 opens a pool's
//! connections on three threads at once), watched connects take turns: a connect holds the turn
//! from the first listing to the second. The turn is only taken inside a `DriverSection` (a libc
//! `fork()` waits for those), and its lock word holds the holder's epoch, so a child never
//! inherits it held. A connect waits for its turn at most [`TURN_WAIT_AT_MOST`] (the holder may
//! be stuck connecting to a host that does not answer); after that it connects without the
//! turn, which can only make windows ambiguous, never wrong.
//!
//! Watching costs two listings of `/proc/self/fd` per connect and the turns, so a pool stops
//! watching once the server's view has named one of its connections' sockets (a direct
//! connection: the server's view is enough), and starts again if that view then fails.
//!
//! Connects that do not take turns (another library connecting on another thread, a pool that
//! stopped watching) can overlap a watched connect; then both sockets are new, and the watched
//! connection is counted as unidentified.

use std::cell::Cell;
use std::collections::HashSet;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::fork::current_epoch;
use crate::sys::socket_cookie;

/// How long a connect waits for its turn before it connects without one.
pub(crate) const TURN_WAIT_AT_MOST: Duration = Duration::from_secs(2);

/// The epoch of the process whose thread holds the turn; 0 when free. A value of another epoch
/// was left by a thread of a parent process and reads as free.
static TURN: AtomicU64 = AtomicU64::new(0);

/// The sockets of this process when a connect started; see the module docs.
pub(crate) struct ConnectWindow {
    /// `None` if the sockets could not all be told apart: nothing the connect makes is certain.
    before: Option<HashSet<u64>>,
    turn: Option<Turn>,
}

impl ConnectWindow {
    /// Takes the turn (or gives up waiting for it) and lists this process's sockets. Call it
    /// inside a `DriverSection`, right before the driver's connect.
    pub(crate) fn open() -> ConnectWindow {
        let turn = Turn::take();
        let before =
            sockets().map(|sockets| sockets.into_iter().map(|(_, cookie)| cookie).collect());
        ConnectWindow { before, turn }
    }

    /// Whether this window got the turn (it connects without one after waiting too long).
    #[cfg(test)]
    pub(crate) fn holds_turn(&self) -> bool {
        self.turn.is_some()
    }

    /// Lists the sockets again, right after the driver's connect returned, and gives the turn
    /// back.
    pub(crate) fn close(self) -> CreatedSockets {
        let ConnectWindow { before, turn } = self;
        let created = before.and_then(|before| {
            let after = sockets()?;
            Some(
                after
                    .into_iter()
                    .filter(|(_, cookie)| !before.contains(cookie))
                    .collect(),
            )
        });
        drop(turn);
        CreatedSockets(created, Cell::new(false))
    }
}

/// The sockets that appeared during one connect: descriptor and cookie (`None` when the
/// listing failed), and whether the backend asked for them.
#[derive(Debug)]
pub(crate) struct CreatedSockets(
    #[cfg_attr(
        not(any(feature = "diesel-postgres", feature = "postgres")),
        allow(dead_code)
    )]
    Option<Vec<(RawFd, u64)>>,
    Cell<bool>,
);

impl CreatedSockets {
    /// Whether the backend asked for the connection's socket: false when it named the socket
    /// another way (the server's view) or found nothing to ask about.
    pub(crate) fn consulted(&self) -> bool {
        self.1.get()
    }

    /// The connection's socket (TCP or Unix): the one socket the connect window saw appear, if
    /// it saw exactly one and that one is still in place. Only the PostgreSQL backends ask.
    #[cfg_attr(
        not(any(feature = "diesel-postgres", feature = "postgres")),
        allow(dead_code)
    )]
    pub(crate) fn only_socket(&self) -> Option<RawFd> {
        self.1.set(true);
        let [(fd, cookie)] = self.0.as_deref()? else {
            return None;
        };
        (socket_cookie(*fd) == Some(*cookie)).then_some(*fd)
    }
}

/// This process's socket descriptors and their cookies; `None` if any socket's cookie cannot
/// be read (then a socket could look new without being new: everywhere but Linux) or the
/// descriptors cannot be listed.
fn sockets() -> Option<Vec<(RawFd, u64)>> {
    let mut sockets = Vec::new();
    for fd in crate::sys::open_descriptors()? {
        if !is_socket(fd) {
            // Not a socket, or closed since the listing: in neither listing's way.
            continue;
        }
        match socket_cookie(fd) {
            Some(cookie) => sockets.push((fd, cookie)),
            // Closed, or replaced by something that is not a socket, since the link was read.
            None if !is_socket(fd) => continue,
            None => return None,
        }
    }
    Some(sockets)
}

fn is_socket(fd: RawFd) -> bool {
    nix::sys::stat::fstat(fd).is_ok_and(|stat| stat.st_mode & libc::S_IFMT == libc::S_IFSOCK)
}

/// Holding the turn; see the module docs.
struct Turn;

impl Turn {
    /// `None` when the wait timed out.
    fn take() -> Option<Turn> {
        let here = current_epoch().get();
        let deadline = Instant::now() + TURN_WAIT_AT_MOST;
        loop {
            let holder = TURN.load(Ordering::Acquire);
            if holder != here
                && TURN
                    .compare_exchange(holder, here, Ordering::AcqRel, Ordering::Acquire)
                    .is_ok()
            {
                return Some(Turn);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    }
}

impl Drop for Turn {
    fn drop(&mut self) {
        TURN.store(0, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{TcpListener, TcpStream};

    // A raw fork needs `unsafe`; the child only lists its own descriptors and leaves with
    // `_exit`. (`SYS_fork` is Linux's.)
    #[allow(unsafe_code)]
    #[cfg(any(target_os = "linux", target_os = "android"))]
    #[test]
    fn a_child_never_waits_for_a_connect_turn_its_parent_held() {
        use std::time::{Duration, Instant};
        // The turn held, as a raw fork (or a libc fork that gave up waiting for the sections)
        // can find it.
        let window = ConnectWindow::open();
        assert!(window.holds_turn());
        // SAFETY: a raw fork; the child only lists its own descriptors (glibc's allocator works
        // in the child of a fork) and leaves with `_exit`, touching nothing other threads of
        // the parent may have been changing.
        let pid = unsafe { libc::syscall(libc::SYS_fork) };
        if pid == 0 {
            let started = Instant::now();
            let child_window = ConnectWindow::open();
            let at_once = started.elapsed() < Duration::from_millis(500);
            let code = i32::from(!(child_window.holds_turn() && at_once));
            drop(child_window.close());
            // SAFETY: `_exit` has no preconditions and ends the child at once.
            unsafe { libc::_exit(code) };
        }
        drop(window.close());
        let status = crate::sys::reap_raw_child(pid);
        assert!(
            libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
            "the child waited for its parent's turn (status {status})"
        );
    }
    use std::os::fd::AsRawFd;
    use std::os::unix::net::UnixStream;

    #[test]
    fn the_one_socket_made_during_the_window_is_named() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let window = ConnectWindow::open();
        let stream = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let created = window.close();
        // Other tests of this binary may open sockets on other threads meanwhile; then the
        // window must not name anything.
        match created.0.as_deref().map(<[_]>::len) {
            Some(1) => assert_eq!(created.only_socket(), Some(stream.as_raw_fd())),
            _ => assert_eq!(created.only_socket(), None),
        }
    }

    #[test]
    fn two_new_sockets_name_nothing() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let window = ConnectWindow::open();
        let _ours = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let _someone_elses = UnixStream::pair().unwrap();
        assert_eq!(window.close().only_socket(), None);
    }

    #[test]
    fn a_unix_socket_is_named_too() {
        let window = ConnectWindow::open();
        let (ours, theirs) = UnixStream::pair().unwrap();
        drop(theirs);
        let created = window.close();
        if created.0.as_deref().map(<[_]>::len) == Some(1) {
            assert_eq!(created.only_socket(), Some(ours.as_raw_fd()));
        }
    }

    #[test]
    fn a_socket_replaced_after_the_window_is_not_taken() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let window = ConnectWindow::open();
        let stream = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let created = window.close();
        // Same number, another socket: the cookie no longer fits.
        let other = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        nix::unistd::dup2(other.as_raw_fd(), stream.as_raw_fd()).unwrap();
        assert_eq!(created.only_socket(), None);
    }

    #[test]
    fn the_turn_is_free_again_after_a_window() {
        drop(ConnectWindow::open().close());
        let started = Instant::now();
        let window = ConnectWindow::open();
        assert!(window.holds_turn());
        assert!(started.elapsed() < TURN_WAIT_AT_MOST);
        drop(window.close());
    }
}
