//! What the demo must not leave behind: its temporary directories and the private database
//! server, removed and stopped when the demo ends, whether it finishes, fails, panics or is
//! interrupted (Ctrl-C, `SIGTERM`, `SIGHUP`).
//!
//! Everything to clean up is registered here as soon as it exists, so an interruption at any
//! point finds it. The demo blocks the terminating signals on its main thread before it starts
//! any other thread (threads inherit the mask); one thread waits for them with `sigwait` and
//! cleans up from ordinary code, outside any signal handler. Child processes inherit the mask
//! through `exec`: the demo's own `serve` processes unblock them first thing (see
//! [`unblock_interrupt_signals`]), PostgreSQL sets its own mask, and the short helpers are
//! killed with `SIGKILL`.

use std::path::PathBuf;
use std::process::Child;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, SigSet, SigmaskHow, Signal};
use nix::unistd::Pid;
use tempfile::TempDir;

/// How long a database server gets to shut down before it is killed.
const SERVER_STOP_LIMIT: Duration = Duration::from_secs(10);

struct Leftovers {
    /// A database server this process started, with how to stop it gracefully.
    server: Option<(Child, Signal)>,
    /// A short-lived helper (`initdb`, `openssl`) running now.
    helper: Option<u32>,
    /// Removed last, once nothing runs in them.
    dirs: Vec<PathBuf>,
}

static LEFTOVERS: Mutex<Leftovers> = Mutex::new(Leftovers {
    server: None,
    helper: None,
    dirs: Vec::new(),
});

fn leftovers() -> std::sync::MutexGuard<'static, Leftovers> {
    LEFTOVERS
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Removes `dir` (recursively) when the demo ends; returns its path.
pub fn remove_at_exit(dir: TempDir) -> PathBuf {
    let path = dir.keep();
    leftovers().dirs.push(path.clone());
    path
}

/// Stops `server` with `graceful` (then `SIGKILL` if it lingers) when the demo ends.
pub fn stop_at_exit(server: Child, graceful: Signal) {
    leftovers().server = Some((server, graceful));
}

/// Whether the registered server is still running; `false` when it has exited (or none is).
pub fn server_running() -> bool {
    match &mut leftovers().server {
        Some((child, _)) => matches!(child.try_wait(), Ok(None)),
        None => false,
    }
}

/// Runs a helper command to completion, killed if the demo is interrupted meanwhile.
pub fn run_helper(command: &mut std::process::Command) -> std::io::Result<std::process::Output> {
    let child = command
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    leftovers().helper = Some(child.id());
    let output = child.wait_with_output();
    leftovers().helper = None;
    output
}

/// Stops the registered server, if any: its graceful signal, then `SIGKILL` after a while.
pub fn stop_server() {
    let server = leftovers().server.take();
    if let Some((mut server, graceful)) = server {
        let _ = kill(Pid::from_raw(server.id() as i32), graceful);
        let deadline = Instant::now() + SERVER_STOP_LIMIT;
        loop {
            match server.try_wait() {
                Ok(Some(_)) | Err(_) => break,
                Ok(None) if Instant::now() >= deadline => {
                    let _ = server.kill();
                    let _ = server.wait();
                    break;
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }
}

/// Kills a running helper, stops the server, removes the directories. Idempotent.
pub fn clean_up() {
    if let Some(pid) = leftovers().helper.take() {
        let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
    }
    stop_server();
    let mut leftovers = leftovers();
    for dir in leftovers.dirs.drain(..) {
        // A helper killed above may still create a file for an instant, which makes one pass
        // of the removal fail.
        let deadline = Instant::now() + Duration::from_secs(2);
        while dir.exists() && std::fs::remove_dir_all(&dir).is_err() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

fn interrupt_signals() -> SigSet {
    let mut signals = SigSet::empty();
    signals.add(Signal::SIGINT);
    signals.add(Signal::SIGTERM);
    signals.add(Signal::SIGHUP);
    signals
}

/// Undoes, in a process started by the demo, the blocking of the interrupt signals it
/// inherited, so that they end it as usual. Call before any other thread exists.
pub fn unblock_interrupt_signals() -> Result<(), String> {
    nix::sys::signal::pthread_sigmask(SigmaskHow::SIG_UNBLOCK, Some(&interrupt_signals()), None)
        .map_err(|error| format!("cannot unblock the interrupt signals: {error}"))
}

/// Blocks `SIGINT`, `SIGTERM` and `SIGHUP` on this thread and every thread it starts later,
/// and starts the thread that, on any of them, cleans up and exits with 128 + the signal.
/// Call before any other thread exists.
pub fn on_interrupt_clean_up_and_exit() -> Result<(), String> {
    let signals = interrupt_signals();
    nix::sys::signal::pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&signals), None)
        .map_err(|error| format!("cannot block the interrupt signals: {error}"))?;
    std::thread::Builder::new()
        .name(String::from("interrupt"))
        .spawn(move || {
            let Ok(signal) = signals.wait() else { return };
            println!("\nprefork-demo: {signal}: stopping the servers and removing temporary files");
            clean_up();
            std::process::exit(128 + signal as i32);
        })
        .map_err(|error| format!("cannot start the interrupt thread: {error}"))?;
    Ok(())
}
