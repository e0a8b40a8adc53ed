//! The threads that watch the master's workers, one per slot waiting for its worker's death
//! and one reaping, and how the master starts a thread so that no fork catches it starting.

use std::sync::atomic::Ordering;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::time::Duration;

use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::Pid;

use super::slots::Slot;

/// What the master's loop hears about.
pub enum Event {
    /// A worker's `LifeLock` came free: it is dying.
    Dying { slot: usize, pid: u32 },
    /// `waitpid` reaped a worker.
    Reaped { pid: u32, how: String },
    /// `quit` (or the end of input) arrived.
    Quit,
}

/// Waits, for one slot, for each worker it is told of to die, and says so. Lives as long as the
/// master, so that no thread starts or ends while the master forks.
pub fn watch_slot(slot_index: usize, slot: &Slot, workers: &Receiver<u32>, events: &Sender<Event>) {
    for pid in workers {
        // The worker takes the lock first thing; wait until it has, unless it is gone already
        // (then `waitpid` tells).
        while slot.life.holder() != pid {
            if slot.pid.load(Ordering::Acquire) != pid {
                break;
            }
            std::thread::sleep(Duration::from_micros(50));
        }
        if slot.life.holder() != pid {
            continue;
        }
        // `pid`: the master forks no replacement for a worker that held the lock before this
        // thread has had it back, so no other worker can take it in between.
        if let Some(dead) = slot.life.wait_for_holder_death() {
            let _ = events.send(Event::Dying {
                slot: slot_index,
                pid: dead,
            });
        }
    }
}

/// Starts `run` on a new thread of the master named `name`, and returns once that thread runs.
///
/// Every std thread takes a process-global std mutex as it starts (the stack-overflow
/// handler's thread-info map), and again as it ends. A fork while a thread of the master holds
/// it leaves it locked in the worker for good, and every thread the worker then starts blocks
/// before it runs a line: such a worker accepts connections and never answers them. A thread
/// runs its closure only after std's start has let go of that mutex, and the master's threads
/// never end, so a master that forks only once its threads run forks with the mutex free.
pub fn start_thread(
    name: &str,
    run: impl FnOnce() + Send + 'static,
) -> Result<std::thread::JoinHandle<()>, String> {
    let (running, started) = channel();
    let thread = std::thread::Builder::new()
        .name(name.to_owned())
        .spawn(move || {
            let _ = running.send(());
            run();
        })
        .map_err(|error| format!("cannot start the {name} thread: {error}"))?;
    started
        .recv()
        .map_err(|_| format!("the {name} thread ended before it ran"))?;
    Ok(thread)
}

/// Reaps workers for the master's loop. `waitpid` fails only while there is no child: between
/// a last worker's death and its replacement, or after `quit`.
pub fn reap(events: &Sender<Event>) {
    loop {
        let (pid, how) = match waitpid(None::<Pid>, None) {
            Ok(WaitStatus::Exited(pid, code)) => (pid, format!("exit:{code}")),
            Ok(WaitStatus::Signaled(pid, signal, _)) => (pid, format!("signal:{signal}")),
            Ok(_) | Err(nix::errno::Errno::EINTR) => continue,
            Err(_) => {
                std::thread::sleep(Duration::from_millis(5));
                continue;
            }
        };
        let _ = events.send(Event::Reaped {
            pid: pid.as_raw() as u32,
            how,
        });
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::thread::JoinHandleExt;

    use super::*;

    /// The name the kernel has for `thread`.
    fn kernel_name(thread: &std::thread::JoinHandle<()>) -> String {
        let mut name = [0 as libc::c_char; 16];
        // SAFETY: the thread is alive (it never returns); `name` is a buffer of the size given.
        let result =
            unsafe { libc::pthread_getname_np(thread.as_pthread_t(), name.as_mut_ptr(), 16) };
        assert_eq!(result, 0, "pthread_getname_np");
        // SAFETY: `pthread_getname_np` wrote a NUL-terminated name into `name`.
        unsafe { std::ffi::CStr::from_ptr(name.as_ptr()) }
            .to_string_lossy()
            .into_owned()
    }

    /// std gives a thread its name in the kernel as it starts, before the thread's closure
    /// runs: a thread without its name has not finished starting, which is when a fork copies
    /// std's thread-start mutex locked.
    #[test]
    fn a_started_thread_has_finished_starting_when_start_thread_returns() {
        let mut not_yet = Vec::new();
        for index in 0..200 {
            let name = format!("started-{index}");
            let thread = start_thread(&name, || loop {
                std::thread::park();
            })
            .expect("a thread");
            if kernel_name(&thread) != name {
                not_yet.push(name);
            }
        }
        assert_eq!(not_yet, Vec::<String>::new(), "not finished starting");
    }
}
