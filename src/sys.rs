//! Raw system calls the rest of the crate makes, each behind a safe function: `pthread_create`
//! for the child pool's connect threads and `getsockopt` for the backends' socket lookup.
#![allow(unsafe_code)]

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
#[cfg(any(target_os = "linux", target_os = "android"))]
pub(crate) fn socket_protocol(fd: std::os::fd::RawFd) -> Option<libc::c_int> {
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

#[cfg(not(any(target_os = "linux", target_os = "android")))]
pub(crate) fn socket_protocol(_fd: std::os::fd::RawFd) -> Option<libc::c_int> {
    None
}

/// The kernel's cookie of the socket `fd` refers to now (`SO_COOKIE`, Linux 4.12+): a 64-bit
/// number no other socket gets while the system runs. `None` for a descriptor that is closed or
/// not a socket, or where the kernel has no cookies. For telling the sockets a connect created
/// from those that were there before it (`connect_window`).
#[cfg(any(target_os = "linux", target_os = "android"))]
pub(crate) fn socket_cookie(fd: std::os::fd::RawFd) -> Option<u64> {
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

#[cfg(not(any(target_os = "linux", target_os = "android")))]
pub(crate) fn socket_cookie(_fd: std::os::fd::RawFd) -> Option<u64> {
    None
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
