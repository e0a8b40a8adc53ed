//! Forking for tests: a child that never hangs the suite (every child is reaped with a
//! deadline, and killed after it), through libc's `fork` or the raw system call.

use std::process::Command;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::{fork, ForkResult, Pid};

/// How a forked child ended.
#[derive(Debug, PartialEq, Eq)]
pub enum ChildEnd {
    Exited(i32),
    Signaled(Signal),
    /// Still running at the deadline; it was killed.
    Hung,
}

/// Forks; the child runs `child` and `_exit`s with its return value (a panic is 101). The
/// parent gets the child's pid.
pub fn spawn_child(child: impl FnOnce() -> i32) -> Pid {
    // SAFETY: the child only runs test code and leaves with `_exit`, never returning into the
    // test harness.
    match unsafe { fork() }.expect("fork") {
        ForkResult::Child => {
            let code = std::panic::catch_unwind(std::panic::AssertUnwindSafe(child)).unwrap_or(101);
            // SAFETY: `_exit` is async-signal-safe and ends the process at once.
            unsafe { libc::_exit(code) }
        }
        ForkResult::Parent { child } => child,
    }
}

/// Waits for `pid` until `deadline`; kills it and reports [`ChildEnd::Hung`] after that. With
/// `FORKSAFE_TORTURE_GDB=1` a hung child's threads are first written out with gdb
/// (`/tmp/forksafe-hung-PID.txt`), which is how a hang is diagnosed.
pub fn reap(pid: Pid, deadline: Duration) -> ChildEnd {
    let until = Instant::now() + deadline;
    loop {
        match waitpid(pid, Some(WaitPidFlag::WNOHANG)).expect("waitpid") {
            WaitStatus::Exited(_, code) => return ChildEnd::Exited(code),
            WaitStatus::Signaled(_, signal, _) => return ChildEnd::Signaled(signal),
            _ if Instant::now() >= until => {
                if std::env::var_os("FORKSAFE_TORTURE_GDB").is_some() {
                    dump_threads(pid);
                }
                let _ = kill(pid, Signal::SIGKILL);
                let _ = waitpid(pid, None);
                return ChildEnd::Hung;
            }
            _ => std::thread::sleep(Duration::from_millis(1)),
        }
    }
}

/// Writes every thread of `pid` (kernel stacks and gdb backtraces) to
/// `/tmp/forksafe-hung-PID.txt`.
pub fn dump_threads(pid: Pid) {
    let path = format!("/tmp/forksafe-hung-{pid}.txt");
    let mut tasks = String::new();
    if let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for task in dir.flatten() {
            let read =
                |name: &str| std::fs::read_to_string(task.path().join(name)).unwrap_or_default();
            tasks += &format!(
                "task {:?}: {} wchan={}\n{}\n",
                task.file_name(),
                read("stat"),
                read("wchan"),
                read("stack")
            );
        }
    }
    let gdb = Command::new("gdb")
        .args([
            "-p",
            &pid.to_string(),
            "-batch",
            "-ex",
            "thread apply all bt",
        ])
        .output();
    if let Ok(out) = gdb {
        let _ = std::fs::write(&path, [tasks.into_bytes(), out.stdout, out.stderr].concat());
        eprintln!("hung child {pid}: backtraces in {path}");
    }
}

/// Forks with the raw `fork` system call, which runs no atfork handler (neither the crate's nor
/// glibc's own); the child runs `child` and `_exit`s with its result (a panic is 101).
pub fn spawn_raw(child: impl FnOnce() -> i32) -> Pid {
    // SAFETY: the raw syscall skips libc's fork bookkeeping on purpose (that is what the callers
    // test); the child only runs `child` and leaves with `_exit`.
    let pid = unsafe { libc::syscall(libc::SYS_fork) };
    assert!(
        pid >= 0,
        "raw fork failed: {}",
        std::io::Error::last_os_error()
    );
    if pid == 0 {
        let code = std::panic::catch_unwind(std::panic::AssertUnwindSafe(child)).unwrap_or(101);
        // SAFETY: `_exit` ends the process at once, without running the parent's handlers.
        unsafe { libc::_exit(code) }
    }
    Pid::from_raw(pid as i32)
}

/// Forks, runs `child` there, and reaps it within `deadline`.
pub fn run_child(deadline: Duration, child: impl FnOnce() -> i32) -> ChildEnd {
    reap(spawn_child(child), deadline)
}

/// Forks `forks` children, one after another, while two master threads keep building a pool of
/// one connection with `manager` and dropping it — a connect and a close each time. Each child
/// runs `child` and exits with its result; every one must exit 0 within `deadline`, and the
/// master must have connected throughout (at least one connect per two forks).
pub fn fork_while_connecting<M: r2d2::ManageConnection>(
    manager: impl Fn() -> Result<M, String> + Send + Sync + 'static,
    forks: usize,
    deadline: Duration,
    child: impl Fn() -> i32,
) -> Result<(), String> {
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    // One thread pool for every connector pool: a pool of its own each would start and stop
    // three threads per connect, thousands a second with a fast server.
    let shared = Arc::new(scheduled_thread_pool::ScheduledThreadPool::new(2));
    let manager = Arc::new(manager);
    let connectors: Vec<std::thread::JoinHandle<Result<u64, String>>> = (0..2)
        .map(|_| {
            let (stop, shared, manager) =
                (Arc::clone(&stop), Arc::clone(&shared), Arc::clone(&manager));
            std::thread::spawn(move || {
                let mut connects = 0;
                while !stop.load(Ordering::Relaxed) {
                    let one = forksafe_pool::Pool::builder()
                        .max_size(1)
                        .min_idle(Some(1))
                        .connection_timeout(Duration::from_secs(10))
                        .thread_pool(Arc::clone(&shared))
                        .build(manager()?)
                        .map_err(|error| format!("connector pool: {error}"))?;
                    drop(one);
                    connects += 1;
                }
                Ok(connects)
            })
        })
        .collect();
    let failures: Vec<String> = (0..forks)
        .filter_map(|fork| match run_child(deadline, &child) {
            ChildEnd::Exited(0) => None,
            end => Some(format!("fork {fork}: {end:?}")),
        })
        .collect();
    stop.store(true, Ordering::Relaxed);
    let mut connects = 0;
    for connector in connectors {
        connects += connector
            .join()
            .map_err(|_| "a connecting thread panicked".to_string())??;
    }
    ensure!(
        failures.is_empty(),
        "{} of {forks} children failed or hung: {failures:?}",
        failures.len()
    );
    // Evidence the forks raced with connects.
    ensure!(
        connects >= forks as u64 / 2,
        "only {connects} connects in the master during {forks} forks"
    );
    Ok(())
}
