//! Raw and platform-specific system calls the rest of the crate makes, each behind a safe
//! function: `pthread_create` for the child pool's connect threads, `getsockopt` for the
//! backends' socket lookup, and listing and replacing this process's descriptors.
//!
//! Linux has faster or stronger calls for some of these (`/proc/self/fd`, `dup3`,
//! `SO_PROTOCOL`, `SO_COOKIE`); every other Unix gets a POSIX fallback, or `None` where there
//! is none. The fallbacks are what `--cfg forksafe_portable` selects on Linux too, so that the
//! test suite runs them here (`.ci/run` does, for the unit tests and `tests/fork_core.rs`).
#![allow(unsafe_code)]

use std::os::fd::RawFd;
use std::ptr;

/// Runs `job` on a new detached thread made with `pthread_create` directly; false (and `job`
/// dropped) if no thread could be made.
///
/// Not `std::thread::spawn`: every thread std starts first takes a process-global std mutex
/// (the stack-overflow handler's thread-info map) that threads also take when they exit, so a
/// fork while a parent thread starts or exits leaves it locked, and every std thread the child
/// then starts blocks before running a line. glibc's own thread-creation state is reset for the
/// child by `fork()`. A thread made here is a "foreign" thread to std, which std supports.
pub(crate) fn spawn_detached(job: Box<dyn FnOnce() + Send>) -> bool {
    extern "C" fn run(arg: *mut libc::c_void) -> *mut libc::c_void {
        // SAFETY: `arg` is the `Box<Box<dyn FnOnce() + Send>>` leaked by `spawn_detached` for
        // this thread alone, and this is the only place that takes it back.
        let job = unsafe { Box::from_raw(arg.cast::<Box<dyn FnOnce() + Send>>()) };
        // A panic must not unwind out of an `extern "C"` function (that aborts the process).
        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job));
        // What runs after this (the thread's thread-specific data destructors) is the drivers'
        // code too: `exit` must wait for it.
        crate::fork::connect_thread_ends();
        ptr::null_mut()
    }
    let arg = Box::into_raw(Box::new(job)).cast::<libc::c_void>();
    // SAFETY: `attr` is initialised by `pthread_attr_init` before any other use and destroyed
    // once after `pthread_create`; `thread` is written by `pthread_create`; `run` has the
    // signature pthread expects and takes ownership of `arg` only if the thread was created.
    unsafe {
        let mut attr = std::mem::MaybeUninit::<libc::pthread_attr_t>::uninit();
        if libc::pthread_attr_init(attr.as_mut_ptr()) != 0 {
            drop(Box::from_raw(arg.cast::<Box<dyn FnOnce() + Send>>()));
            return false;
        }
        libc::pthread_attr_setdetachstate(attr.as_mut_ptr(), libc::PTHREAD_CREATE_DETACHED);
        let mut thread = std::mem::MaybeUninit::<libc::pthread_t>::uninit();
        let rc = libc::pthread_create(thread.as_mut_ptr(), attr.as_ptr(), run, arg);
        libc::pthread_attr_destroy(attr.as_mut_ptr());
        if rc != 0 {
            drop(Box::from_raw(arg.cast::<Box<dyn FnOnce() + Send>>()));
        }
        rc == 0
    }
}

/// The protocol of the socket `fd` refers to now (`SO_PROTOCOL`: `IPPROTO_TCP` for a TCP
/// socket); `None` for a descriptor that is closed or not a socket. For the backends that find
/// a connection's socket by its addresses, which name one connection only for TCP. (The other
/// way to ask, this network namespace's `/proc/self/net/tcp`, walks every bucket of the
/// kernel's TCP hash tables: about 4 ms per connect here.)
#[cfg(all(
    any(target_os = "linux", target_os = "android"),
    not(forksafe_portable)
))]
pub(crate) fn socket_protocol(fd: RawFd) -> Option<libc::c_int> {
    let mut protocol: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `protocol` and `len` are live locals and `len` is the size of `protocol`; the
    // kernel checks `fd` itself (a closed descriptor or one that is not a socket is an error
    // return, nothing more), and nothing is borrowed from the descriptor.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_PROTOCOL,
            ptr::addr_of_mut!(protocol).cast(),
            &mut len,
        )
    };
    (rc == 0 && len as usize == std::mem::size_of::<libc::c_int>()).then_some(protocol)
}

/// Without `SO_PROTOCOL` (macOS has none): a stream socket of the IPv4 or IPv6 family is TCP,
/// the one stream protocol of those families that a database driver connects with; anything
/// else, or a descriptor that is not a socket, is `None`.
#[cfg(any(
    not(any(target_os = "linux", target_os = "android")),
    forksafe_portable
))]
pub(crate) fn socket_protocol(fd: RawFd) -> Option<libc::c_int> {
    use nix::sys::socket::{getsockname, AddressFamily, SockaddrLike, SockaddrStorage};
    let mut kind: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: as in the Linux version: live locals, `len` the size of `kind`, and the kernel
    // checks `fd` itself.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_TYPE,
            ptr::addr_of_mut!(kind).cast(),
            &mut len,
        )
    };
    let stream = rc == 0 && kind == libc::SOCK_STREAM;
    let family = getsockname::<SockaddrStorage>(fd).ok()?.family()?;
    (stream && matches!(family, AddressFamily::Inet | AddressFamily::Inet6))
        .then_some(libc::IPPROTO_TCP)
}

/// The kernel's cookie of the socket `fd` refers to now (`SO_COOKIE`, Linux 4.12+): a 64-bit
/// number no other socket gets while the system runs. `None` for a descriptor that is closed or
/// not a socket, or where the kernel has no cookies. For telling the sockets a connect created
/// from those that were there before it (`connect_window`).
#[cfg(all(
    any(target_os = "linux", target_os = "android"),
    not(forksafe_portable)
))]
pub(crate) fn socket_cookie(fd: RawFd) -> Option<u64> {
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: `cookie` and `len` are live locals and `len` is the size of `cookie`; the kernel
    // checks `fd` itself (a closed descriptor or one that is not a socket is an error return,
    // nothing more), and nothing is borrowed from the descriptor.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_COOKIE,
            ptr::addr_of_mut!(cookie).cast(),
            &mut len,
        )
    };
    (rc == 0 && len as usize == std::mem::size_of::<u64>()).then_some(cookie)
}

/// Other kernels give sockets no number that is never reused (an inode number may be), so no
/// socket can be told new for certain.
#[cfg(any(
    not(any(target_os = "linux", target_os = "android")),
    forksafe_portable
))]
pub(crate) fn socket_cookie(_fd: RawFd) -> Option<u64> {
    None
}

/// This process's open descriptor numbers, from `/proc/self/fd` (including, briefly, the
/// directory handle used to list them); `None` if it cannot be read.
#[cfg(all(
    any(target_os = "linux", target_os = "android"),
    not(forksafe_portable)
))]
pub(crate) fn open_descriptors() -> Option<Vec<RawFd>> {
    let entries = std::fs::read_dir("/proc/self/fd").ok()?;
    Some(
        entries
            .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse().ok())
            .collect(),
    )
}

/// Descriptor numbers probed by [`open_descriptors`] at most, where there is no `/proc`.
#[cfg(any(
    not(any(target_os = "linux", target_os = "android")),
    forksafe_portable
))]
const PROBED_AT_MOST: libc::rlim_t = 1 << 16;

/// This process's open descriptor numbers, where there is no `/proc/self/fd`: every number
/// below the soft `RLIMIT_NOFILE` limit that `fcntl(F_GETFD)` accepts (no descriptor can be
/// opened at or above that limit; one opened before the limit was lowered is not seen). `None`
/// when the limit is above [`PROBED_AT_MOST`], where probing would cost too much per connect:
/// then nothing is identified. (`/dev/fd` is not used: without fdescfs, FreeBSD's lists only 0
/// to 2, and an incomplete list would make an ambiguous descriptor look certain.)
#[cfg(any(
    not(any(target_os = "linux", target_os = "android")),
    forksafe_portable
))]
pub(crate) fn open_descriptors() -> Option<Vec<RawFd>> {
    let mut limit = std::mem::MaybeUninit::<libc::rlimit>::uninit();
    // SAFETY: `limit` is a live local that `getrlimit` fills in; it is read only on success.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, limit.as_mut_ptr()) } != 0 {
        return None;
    }
    // SAFETY: `getrlimit` succeeded, so it wrote the whole struct.
    let soft = unsafe { limit.assume_init() }.rlim_cur;
    if soft > PROBED_AT_MOST {
        return None;
    }
    Some(
        (0..soft as RawFd)
            // SAFETY: `F_GETFD` only reads the descriptor's flags; an unused number is an
            // error return (EBADF), nothing more.
            .filter(|&fd| unsafe { libc::fcntl(fd, libc::F_GETFD) } != -1)
            .collect(),
    )
}

/// Makes descriptor number `target` refer to what `source` refers to, close-on-exec, in one
/// step that never leaves the number free (another thread cannot be given it in between).
/// False on failure (`target` then still refers to what it did).
#[cfg(all(target_os = "linux", not(forksafe_portable)))]
pub(crate) fn replace_descriptor(source: RawFd, target: RawFd) -> bool {
    nix::unistd::dup3(source, target, nix::fcntl::OFlag::O_CLOEXEC).is_ok()
}

/// As on Linux, but with `dup2` and then `FD_CLOEXEC` (macOS and nix's other targets lack
/// `dup3`). `dup2` replaces the number in one step just as `dup3` does; only the
/// close-on-exec flag comes a moment later. A thread that forks and execs in that moment passes
/// the new program a descriptor of `/dev/null` (the only `source` this crate uses), never the
/// socket the number referred to: harmless, so the two steps are acceptable.
#[cfg(any(not(target_os = "linux"), forksafe_portable))]
pub(crate) fn replace_descriptor(source: RawFd, target: RawFd) -> bool {
    use nix::fcntl::{fcntl, FcntlArg, FdFlag};
    nix::unistd::dup2(source, target).is_ok()
        && fcntl(target, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC)).is_ok()
}

/// Waits for the child of a raw fork (`pid` as `syscall` returned it) at most 10 s, and returns
/// its wait status; a hung child is killed and fails the test.
#[cfg(test)]
pub(crate) fn reap_raw_child(pid: libc::c_long) -> libc::c_int {
    use std::time::{Duration, Instant};
    assert!(pid > 0, "fork failed");
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut status = 0;
    // SAFETY: `status` is a live local; `pid` is our child.
    while unsafe { libc::waitpid(pid as libc::pid_t, &mut status, libc::WNOHANG) } == 0 {
        if Instant::now() > deadline {
            // SAFETY: our own child, still unreaped.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
            panic!("the raw-fork child hung");
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    status
}

/// Whether the calling thread could be one that a `fork()` copied: in a forked child only the
/// forking thread is copied, and on Linux it becomes the thread whose id is the process id.
/// Elsewhere there is no such test, and every thread may be.
#[cfg(all(
    feature = "tokio",
    any(target_os = "linux", target_os = "android"),
    not(forksafe_portable)
))]
pub(crate) fn thread_existed_at_fork() -> bool {
    nix::unistd::gettid() == nix::unistd::getpid()
}

/// See the Linux version: without a thread id to compare, every thread may have been copied.
#[cfg(all(
    feature = "tokio",
    any(
        not(any(target_os = "linux", target_os = "android")),
        forksafe_portable
    )
))]
pub(crate) fn thread_existed_at_fork() -> bool {
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{TcpListener, TcpStream, UdpSocket};
    use std::os::fd::AsRawFd;
    use std::os::unix::net::UnixStream;

    #[test]
    fn open_descriptors_lists_the_open_ones() {
        let (ours, theirs) = UnixStream::pair().unwrap();
        let file = std::fs::File::open("/dev/null").unwrap();
        let listed = open_descriptors().expect("this machine's limit is probed or /proc read");
        for fd in [ours.as_raw_fd(), theirs.as_raw_fd(), file.as_raw_fd()] {
            assert!(listed.contains(&fd), "{fd} not in {listed:?}");
        }
        // (That a closed number is left out cannot be checked here: another test's thread may
        // be given the number at any moment.)
        assert!(listed.iter().all(|&fd| fd >= 0));
    }

    #[test]
    fn replace_descriptor_points_the_number_elsewhere_close_on_exec() {
        use nix::fcntl::{fcntl, FcntlArg, FdFlag};
        let (ours, _theirs) = UnixStream::pair().unwrap();
        let null = std::fs::File::open("/dev/null").unwrap();
        assert!(replace_descriptor(null.as_raw_fd(), ours.as_raw_fd()));
        let now = nix::sys::stat::fstat(ours.as_raw_fd()).unwrap();
        let expected = nix::sys::stat::fstat(null.as_raw_fd()).unwrap();
        assert_eq!((now.st_dev, now.st_ino), (expected.st_dev, expected.st_ino));
        let flags = FdFlag::from_bits_truncate(fcntl(ours.as_raw_fd(), FcntlArg::F_GETFD).unwrap());
        assert!(flags.contains(FdFlag::FD_CLOEXEC));
    }

    #[test]
    fn only_tcp_sockets_are_tcp() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let tcp = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
        let (unix, _peer) = UnixStream::pair().unwrap();
        let file = std::fs::File::open("/dev/null").unwrap();
        assert_eq!(socket_protocol(tcp.as_raw_fd()), Some(libc::IPPROTO_TCP));
        assert_eq!(
            socket_protocol(listener.as_raw_fd()),
            Some(libc::IPPROTO_TCP)
        );
        for other in [udp.as_raw_fd(), unix.as_raw_fd(), file.as_raw_fd()] {
            assert_ne!(socket_protocol(other), Some(libc::IPPROTO_TCP));
        }
    }
}
