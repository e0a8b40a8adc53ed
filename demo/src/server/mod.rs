//! The pre-fork HTTP server, in the gunicorn / uWSGI mould.
//!
//! The master binds one listening socket, builds the application (eager modes), forks the
//! workers, and replaces any worker that dies. Every worker accepts on the inherited socket
//! and serves requests one at a time, like a gunicorn sync worker.
//!
//! The master learns of a death before `waitpid` can tell it: each worker holds a robust
//! process-shared mutex (its [`LifeLock`](slots::LifeLock)) for as long as it lives, and a master
//! thread per slot waits on it. The kernel releases a dead thread's robust mutexes (and wakes their
//! waiters) as the first step of tearing down its memory, and reports the exit to `waitpid` only
//! after the last step. For a worker that maps the application's 256 MiB copy-on-write, that
//! teardown is 65 536 page-table entries, as long as the fork that replaces it, so the master forks
//! the replacement while the kernel is still cleaning up after the dead one. A worker that dies
//! before it holds its lock is replaced when `waitpid` reports it. Both eager and lazy modes run
//! this same master.
//!
//! The master talks to whoever started it over its standard streams, one line each: it prints
//! `listening <port> <master pid>`, `spawned <slot> <pid>`, `dying <slot> <pid>` (a worker's
//! life lock came free), `exited <slot> <pid> <how>` (reaped), and answers the line `status`
//! with `status <now µs> <slot>:<pid>:<busy since µs, 0 when idle>:<served> …`. The line `quit`
//! (or end of input) stops every worker and the master.
//!
//! One concept per file: `slots` (each worker's live figures and life lock, in shared memory),
//! `master_threads` (the threads that watch the workers, and how the master starts a thread
//! safely before forking), `worker` (a worker's life after the fork), `http` (the workers'
//! HTTP/1.1). This file is the master: its loop, its control thread, and the fork.

pub mod http;
mod master_threads;
mod slots;
mod worker;

use std::collections::HashMap;
use std::io::{BufRead, Write};
use std::net::TcpListener;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::{fork, ForkResult, Pid};

use crate::app::App;
use crate::config::ServeConfig;
use master_threads::{reap, start_thread, watch_slot, Event};
use slots::{stamp, Slot, Slots};
use worker::worker;

/// Runs the master; returns when every worker has been reaped after `quit`.
pub fn serve(config: ServeConfig) -> Result<(), String> {
    // The master dies with the driver that started it; its workers die with the master.
    nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(|error| error.to_string())?;
    let start = Instant::now();
    // Idempotent; the driver has done it already, a standalone `serve` has not.
    config.database.prepare()?;
    let listener =
        TcpListener::bind(("127.0.0.1", config.port)).map_err(|error| error.to_string())?;
    let port = listener
        .local_addr()
        .map_err(|error| error.to_string())?
        .port();
    let app = if config.mode.eager() {
        Some(Arc::new(App::build(
            config.mode,
            &config.database,
            config.pool_size,
            config.table_mib,
            config.state_memory,
        )?))
    } else {
        None
    };
    let slots = Slots::new(config.workers);
    let master = Pid::this();
    say(&format!("listening {port} {master}"));

    let quitting = Arc::new(AtomicBool::new(false));
    let (events, happened) = channel();
    {
        let quitting = Arc::clone(&quitting);
        let events = events.clone();
        start_thread("control", move || {
            control(slots.slots, start, &quitting);
            let _ = events.send(Event::Quit);
        })?;
    }
    // Every thread of the master starts here, and runs, before the first fork (see
    // `start_thread` and `watch_slot`).
    let watchers: Vec<Sender<u32>> = slots
        .slots
        .iter()
        .enumerate()
        .map(|(index, slot)| {
            let (watcher, workers) = channel();
            let events = events.clone();
            start_thread(&format!("watch-slot-{index}"), move || {
                watch_slot(index, slot, &workers, &events);
            })?;
            Ok(watcher)
        })
        .collect::<Result<_, String>>()?;
    start_thread("reap", move || reap(&events))?;

    // Unreaped workers, and the slot each was forked for.
    let mut live: HashMap<u32, usize> = HashMap::new();
    let spawn = |slot: usize, live: &mut HashMap<u32, usize>| -> Result<(), String> {
        let pid = spawn_worker(
            &config,
            slot,
            &listener,
            app.as_ref(),
            &slots,
            start,
            master,
        )?;
        live.insert(pid, slot);
        let _ = watchers[slot].send(pid);
        if quitting.load(Ordering::Acquire) {
            // Quit arrived while this one was being made; the control thread may have missed it.
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGTERM);
        }
        Ok(())
    };
    for slot in 0..config.workers {
        spawn(slot, &mut live)?;
    }
    let mut failed_starts = 0;
    for event in happened {
        match event {
            // Replace it now; `waitpid` reports it once its memory is gone.
            Event::Dying { slot, pid } => {
                say(&format!("dying {slot} {pid}"));
                if slots.slots[slot].pid.load(Ordering::Acquire) == pid
                    && !quitting.load(Ordering::Acquire)
                {
                    spawn(slot, &mut live)?;
                }
            }
            Event::Reaped { pid, how } => {
                let Some(slot) = live.remove(&pid) else {
                    continue;
                };
                say(&format!("exited {slot} {pid} {how}"));
                if how != "exit:0" && how.starts_with("exit:") {
                    failed_starts += 1;
                    if failed_starts > 3 * config.workers {
                        // Workers that cannot even start would be respawned forever.
                        say("error workers keep failing to start");
                        quitting.store(true, Ordering::Release);
                        signal_workers(slots.slots, Signal::SIGTERM);
                    }
                }
                let worker_slot = &slots.slots[slot];
                if worker_slot.pid.load(Ordering::Acquire) == pid {
                    if quitting.load(Ordering::Acquire) {
                        worker_slot.pid.store(0, Ordering::Release);
                    } else if worker_slot.life.holder() != pid {
                        // It died before it held its life lock: no notice will come.
                        spawn(slot, &mut live)?;
                    }
                    // Otherwise the kernel woke its watcher as it died, and the replacement is
                    // forked on that notice: one forked now could take the dead worker's lock
                    // before the watcher does, and the notice would be lost.
                }
            }
            Event::Quit => {}
        }
        if quitting.load(Ordering::Acquire) && live.is_empty() {
            break;
        }
    }
    say("stopped");
    Ok(())
}

fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// The master's control thread: answers `status`, and stops the workers on `quit`.
fn control(slots: &'static [Slot], start: Instant, quitting: &AtomicBool) {
    let stdin = std::io::stdin();
    for line in stdin.lock().lines() {
        let Ok(line) = line else { break };
        match line.trim() {
            "status" => {
                let mut status = format!("status {}", stamp(start));
                for (index, slot) in slots.iter().enumerate() {
                    status += &format!(
                        " {index}:{}:{}:{}",
                        slot.pid.load(Ordering::Acquire),
                        slot.busy_since.load(Ordering::Acquire),
                        slot.served.load(Ordering::Acquire)
                    );
                }
                say(&status);
            }
            "quit" => break,
            _ => {}
        }
    }
    quitting.store(true, Ordering::Release);
    signal_workers(slots, Signal::SIGTERM);
    // A worker stuck in a system call still dies of SIGTERM; SIGKILL is the backstop.
    std::thread::sleep(Duration::from_secs(2));
    signal_workers(slots, Signal::SIGKILL);
}

fn signal_workers(slots: &[Slot], signal: Signal) {
    for slot in slots {
        let pid = slot.pid.load(Ordering::Acquire);
        if pid != 0 {
            let _ = kill(Pid::from_raw(pid as i32), signal);
        }
    }
}

/// Forks a worker for `slot`; returns its pid.
fn spawn_worker(
    config: &ServeConfig,
    slot: usize,
    listener: &TcpListener,
    app: Option<&Arc<App>>,
    slots: &Slots,
    start: Instant,
    master: Pid,
) -> Result<u32, String> {
    let slot_index = slot;
    let slot = &slots.slots[slot];
    // SAFETY: the child only runs `worker`, which never returns: it builds what it needs after
    // the fork (the point of this demo is what happens to a pool built before it) and ends
    // with `_exit`. The master's other threads (`control`, `reap`, `watch_slot`) hold no lock
    // the child needs: the child never prints, and glibc's malloc is reset for the child by its
    // own atfork handlers.
    match unsafe { fork() }.map_err(|error| format!("fork: {error}"))? {
        ForkResult::Parent { child } => {
            let pid = child.as_raw() as u32;
            slot.pid.store(pid, Ordering::Release);
            say(&format!("spawned {slot_index} {child}"));
            Ok(pid)
        }
        ForkResult::Child => {
            slot.life.hold_for_life();
            let code = match worker(config, slot, listener, app, start, master) {
                Ok(()) => 0,
                Err(error) => {
                    eprintln!("worker {}: {error}", std::process::id());
                    1
                }
            };
            // SAFETY: `_exit` has no preconditions; it skips the master's atexit handlers and
            // destructors, which belong to the master.
            unsafe { libc::_exit(code) }
        }
    }
}
