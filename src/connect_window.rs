//! Naming the socket a connect created, for connections whose driver hides its socket and whose
//! server cannot name it either.
//!
//! diesel's `PgConnection` exposes no descriptor. Connected straight to PostgreSQL, the server's
//! view of the session names the socket (see `backends::postgres_session`); behind PgBouncer, or
//! any other proxy, the server sees the proxy's socket, and nothing in the session says which of
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
//!
//! # Files: SQLite
//!
//! The same window names a SQLite connection's database descriptor, which several connections
//! of one pool on one file otherwise make ambiguous ([`Watch::Files`]): the descriptors of
//! regular files are listed (number, device, inode), and the connection's descriptor of its
//! database file is the one descriptor of that file that appeared during the connect. Two
//! things differ from sockets. A new descriptor is not guaranteed: SQLite keeps a closed
//! connection's descriptor open while other connections of the process hold locks on the file,
//! and may give it to the next connect; then the one new descriptor of the file could be
//! another thread's (the application opening the file meanwhile). So the file is only
//! identified when every descriptor of it that was open before the connect belongs to a live
//! connection of the same pool — which is why a files window keeps the turn until the
//! connection is registered in the pool's descriptor table, so the next connect finds it
//! there. Descriptors are told apart by number, device and inode: a file descriptor has no
//! cookie, and none is needed, since a number reused for the same file during the window is
//! simply not new (and the connection is left unidentified).

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

/// What a connect window watches: the sockets a connect creates (PostgreSQL), or the
/// descriptors of regular files it opens (SQLite's database files).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Watch {
    #[cfg_attr(
        not(any(feature = "diesel-postgres", feature = "postgres")),
        allow(dead_code)
    )]
    Sockets,
    #[cfg_attr(
        not(any(feature = "diesel-sqlite", feature = "rusqlite")),
        allow(dead_code)
    )]
    Files,
}

/// A descriptor open on a regular file: its number, and the file's device and inode.
type FileDescriptor = (RawFd, u64, u64);

/// This process's sockets, or file descriptors, when a connect started; see the module docs.
pub(crate) struct ConnectWindow {
    /// `None` if the descriptors could not all be listed and told apart: nothing the connect
    /// makes is certain.
    before: Option<Listing>,
    turn: Option<Turn>,
}

enum Listing {
    /// The cookies of the sockets.
    Sockets(HashSet<u64>),
    Files(Vec<FileDescriptor>),
}

impl ConnectWindow {
    /// Takes the turn (or gives up waiting for it) and lists this process's sockets or file
    /// descriptors. Call it inside a `DriverSection`, right before the driver's connect.
    pub(crate) fn open(watch: Watch) -> ConnectWindow {
        let turn = Turn::take();
        let before = match watch {
            Watch::Sockets => sockets()
                .map(|sockets| Listing::Sockets(sockets.into_iter().map(|(_, c)| c).collect())),
            Watch::Files => file_descriptors().map(Listing::Files),
        };
        ConnectWindow { before, turn }
    }

    /// Whether this window got the turn (it connects without one after waiting too long).
    #[cfg(test)]
    pub(crate) fn holds_turn(&self) -> bool {
        self.turn.is_some()
    }

    /// Lists the descriptors again, right after the driver's connect returned. A sockets
    /// window gives the turn back now. A files window keeps it in the result until that is
    /// dropped, after the connection is registered: the next connect's listing then finds
    /// this connection's descriptor `accounted` for (see [`CreatedSockets::file_descriptor`]).
    ///
    /// `accounted` says whether a descriptor open before the connect belongs to a live
    /// connection of the same pool (it is in the pool's descriptor table).
    pub(crate) fn close(self, accounted: &dyn Fn(FileDescriptor) -> bool) -> CreatedSockets {
        let ConnectWindow { before, turn } = self;
        match before {
            None => CreatedSockets::empty(None),
            Some(Listing::Sockets(before)) => {
                let created = sockets().map(|after| {
                    after
                        .into_iter()
                        .filter(|(_, cookie)| !before.contains(cookie))
                        .collect()
                });
                // Only after the second listing: a connect that took the turn earlier could
                // make a socket of its own appear in this one.
                drop(turn);
                CreatedSockets {
                    sockets: created,
                    ..CreatedSockets::empty(None)
                }
            }
            Some(Listing::Files(before)) => {
                let files = file_descriptors().map(|after| {
                    let new: Vec<FileDescriptor> = after
                        .into_iter()
                        .filter(|descriptor| !before.contains(descriptor))
                        .collect();
                    // A file with a descriptor that was open before the connect and is no live
                    // connection's of the pool (SQLite keeps a closed connection's descriptor
                    // open while other connections hold locks, and may hand it to the next
                    // connect; or the application has the file open): our connection's
                    // descriptor may be that old one, and the one new descriptor someone
                    // else's.
                    let uncertain = new
                        .iter()
                        .filter(|&&(_, dev, ino)| {
                            before
                                .iter()
                                .any(|&(fd, d, i)| (d, i) == (dev, ino) && !accounted((fd, d, i)))
                        })
                        .map(|&(_, dev, ino)| (dev, ino))
                        .collect();
                    NewFiles { new, uncertain }
                });
                CreatedSockets {
                    files,
                    ..CreatedSockets::empty(turn)
                }
            }
        }
    }
}

/// What appeared during one connect: sockets (descriptor and cookie) or file descriptors
/// (`None` when not watched or the listing failed), and whether the backend asked for them.
#[derive(Debug)]
pub(crate) struct CreatedSockets {
    #[cfg_attr(
        not(any(feature = "diesel-postgres", feature = "postgres")),
        allow(dead_code)
    )]
    sockets: Option<Vec<(RawFd, u64)>>,
    #[cfg_attr(
        not(any(feature = "diesel-sqlite", feature = "rusqlite")),
        allow(dead_code)
    )]
    files: Option<NewFiles>,
    consulted: Cell<bool>,
    /// A files window's turn, held until the connection is registered.
    _turn: Option<Turn>,
}

/// The file descriptors that appeared during a connect, and the files (device, inode) whose
/// descriptors cannot be told apart.
#[derive(Debug)]
struct NewFiles {
    new: Vec<FileDescriptor>,
    uncertain: Vec<(u64, u64)>,
}

impl CreatedSockets {
    fn empty(turn: Option<Turn>) -> CreatedSockets {
        CreatedSockets {
            sockets: None,
            files: None,
            consulted: Cell::new(false),
            _turn: turn,
        }
    }

    /// Whether the backend asked for the connection's socket or file: false when it named
    /// the socket another way (the server's view) or found nothing to ask about.
    pub(crate) fn consulted(&self) -> bool {
        self.consulted.get()
    }

    /// The connection's socket (TCP or Unix): the one socket the connect window saw appear, if
    /// it saw exactly one and that one is still in place. Only the PostgreSQL backends ask.
    #[cfg_attr(
        not(any(feature = "diesel-postgres", feature = "postgres")),
        allow(dead_code)
    )]
    pub(crate) fn only_socket(&self) -> Option<RawFd> {
        self.consulted.set(true);
        let [(fd, cookie)] = self.sockets.as_deref()? else {
            return None;
        };
        (socket_cookie(*fd) == Some(*cookie)).then_some(*fd)
    }

    /// The connection's descriptor of the regular file `(dev, ino)`: the one descriptor of it
    /// that appeared during the connect, if exactly one did, every descriptor of the file that
    /// was open before belongs to a live connection of the pool, and it still refers to the
    /// file. Only the SQLite backends ask.
    #[cfg_attr(
        not(any(feature = "diesel-sqlite", feature = "rusqlite")),
        allow(dead_code)
    )]
    pub(crate) fn file_descriptor(&self, dev: u64, ino: u64) -> Option<RawFd> {
        self.consulted.set(true);
        let files = self.files.as_ref()?;
        if files.uncertain.contains(&(dev, ino)) {
            return None;
        }
        let mut of_file = files.new.iter().filter(|&&(_, d, i)| (d, i) == (dev, ino));
        let (Some(&(fd, _, _)), None) = (of_file.next(), of_file.next()) else {
            return None;
        };
        (regular_file(fd) == Some((dev, ino))).then_some(fd)
    }
}

/// This process's descriptors of regular files; `None` if the descriptors cannot be listed.
fn file_descriptors() -> Option<Vec<FileDescriptor>> {
    Some(
        crate::sys::open_descriptors()?
            .into_iter()
            .filter_map(|fd| {
                let (dev, ino) = regular_file(fd)?;
                Some((fd, dev, ino))
            })
            .collect(),
    )
}

/// The device and inode of the regular file `fd` refers to now; `None` for anything else.
fn regular_file(fd: RawFd) -> Option<(u64, u64)> {
    let stat = nix::sys::stat::fstat(fd).ok()?;
    (stat.st_mode & libc::S_IFMT == libc::S_IFREG)
        .then_some((stat.st_dev as u64, stat.st_ino as u64))
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
#[derive(Debug)]
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
        let window = ConnectWindow::open(Watch::Sockets);
        assert!(window.holds_turn());
        // SAFETY: a raw fork; the child only lists its own descriptors (glibc's allocator works
        // in the child of a fork) and leaves with `_exit`, touching nothing other threads of
        // the parent may have been changing.
        let pid = unsafe { libc::syscall(libc::SYS_fork) };
        if pid == 0 {
            let started = Instant::now();
            let child_window = ConnectWindow::open(Watch::Sockets);
            let at_once = started.elapsed() < Duration::from_millis(500);
            let code = i32::from(!(child_window.holds_turn() && at_once));
            drop(child_window.close(&|_| true));
            // SAFETY: `_exit` has no preconditions and ends the child at once.
            unsafe { libc::_exit(code) };
        }
        drop(window.close(&|_| true));
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
        let window = ConnectWindow::open(Watch::Sockets);
        let stream = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let created = window.close(&|_| true);
        // Other tests of this binary may open sockets on other threads meanwhile; then the
        // window must not name anything.
        match created.sockets.as_deref().map(<[_]>::len) {
            Some(1) => assert_eq!(created.only_socket(), Some(stream.as_raw_fd())),
            _ => assert_eq!(created.only_socket(), None),
        }
    }

    #[test]
    fn two_new_sockets_name_nothing() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let window = ConnectWindow::open(Watch::Sockets);
        let _ours = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let _someone_elses = UnixStream::pair().unwrap();
        assert_eq!(window.close(&|_| true).only_socket(), None);
    }

    #[test]
    fn a_unix_socket_is_named_too() {
        let window = ConnectWindow::open(Watch::Sockets);
        let (ours, theirs) = UnixStream::pair().unwrap();
        drop(theirs);
        let created = window.close(&|_| true);
        if created.sockets.as_deref().map(<[_]>::len) == Some(1) {
            assert_eq!(created.only_socket(), Some(ours.as_raw_fd()));
        }
    }

    #[test]
    fn a_socket_replaced_after_the_window_is_not_taken() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let window = ConnectWindow::open(Watch::Sockets);
        let stream = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let created = window.close(&|_| true);
        // Same number, another socket: the cookie no longer fits.
        let other = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        nix::unistd::dup2(other.as_raw_fd(), stream.as_raw_fd()).unwrap();
        assert_eq!(created.only_socket(), None);
    }

    #[test]
    fn the_turn_is_free_again_after_a_window() {
        drop(ConnectWindow::open(Watch::Sockets).close(&|_| true));
        let started = Instant::now();
        let window = ConnectWindow::open(Watch::Sockets);
        assert!(window.holds_turn());
        assert!(started.elapsed() < TURN_WAIT_AT_MOST);
        drop(window.close(&|_| true));
    }

    #[test]
    fn the_one_descriptor_of_a_file_opened_during_the_window_is_named() {
        use std::os::unix::fs::MetadataExt;
        let path =
            std::env::temp_dir().join(format!("forksafe-window-unit-{}-files", std::process::id()));
        let first = std::fs::File::create(&path).unwrap();
        let meta = std::fs::metadata(&path).unwrap();
        let (dev, ino) = (meta.dev(), meta.ino());
        let pools = |fds: &'static [RawFd]| move |(fd, _, _): FileDescriptor| fds.contains(&fd);
        let first_fd: &'static [RawFd] = Vec::leak(vec![first.as_raw_fd()]);

        // The pool's first connection is accounted for; the one new descriptor is named.
        let window = ConnectWindow::open(Watch::Files);
        let second = std::fs::File::open(&path).unwrap();
        let created = window.close(&pools(first_fd));
        assert_eq!(created.file_descriptor(dev, ino), Some(second.as_raw_fd()));
        drop(created);

        // A descriptor open before that is no connection's of the pool: nothing is certain.
        let window = ConnectWindow::open(Watch::Files);
        let third = std::fs::File::open(&path).unwrap();
        let created = window.close(&pools(first_fd));
        assert_eq!(created.file_descriptor(dev, ino), None);
        drop(created);

        // Two new descriptors of the file: neither is taken.
        let window = ConnectWindow::open(Watch::Files);
        let fourth = std::fs::File::open(&path).unwrap();
        let fifth = std::fs::File::open(&path).unwrap();
        let created = window.close(&|_| true);
        assert_eq!(created.file_descriptor(dev, ino), None);
        assert!(created.consulted());
        drop(created);

        // Nothing new on the file.
        let window = ConnectWindow::open(Watch::Files);
        let created = window.close(&|_| true);
        assert_eq!(created.file_descriptor(dev, ino), None);
        drop((first, second, third, fourth, fifth));
        let _ = std::fs::remove_file(&path);
    }
}
