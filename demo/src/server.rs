//! The pre-fork HTTP server, in the gunicorn / uWSGI mould.
//!
//! The master binds one listening socket, builds the application (eager modes), forks the
//! workers, and replaces any worker that dies. Every worker accepts on the inherited socket
//! and serves requests one at a time, like a gunicorn sync worker.
//!
//! The master learns of a death before `waitpid` can tell it: each worker holds a robust
//! process-shared mutex (its [`LifeLock`]) for as long as it lives, and a master thread per
//! slot waits on it. The kernel releases a dead thread's robust mutexes (and wakes their
//! waiters) as the first step of tearing down its memory, and reports the exit to `waitpid`
//! only after the last step. For a worker that maps the application's 256 MiB copy-on-write,
//! that teardown is 65 536 page-table entries, as long as the fork that replaces it, so the
//! master forks the replacement while the kernel is still cleaning up after the dead one.
//! A worker that dies before it holds its lock is replaced when `waitpid` reports it. Both
//! eager and lazy modes run this same master.
//!
//! The master talks to whoever started it over its standard streams, one line each: it prints
//! `listening <port> <master pid>`, `spawned <slot> <pid>`, `dying <slot> <pid>` (a worker's
//! life lock came free), `exited <slot> <pid> <how>` (reaped), and answers the line `status`
//! with `status <now µs> <slot>:<pid>:<busy since µs, 0 when idle>:<served> …`. The line `quit`
//! (or end of input) stops every worker and the master.

use std::cell::UnsafeCell;
use std::collections::HashMap;
use std::io::{BufRead, Write};
use std::net::TcpListener;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::{fork, getppid, ForkResult, Pid};

use crate::app::{map_shared_anonymous, App, Database, Mode, StateMemory};
use crate::http;

/// What `prefork_demo serve` is told.
#[derive(Clone, Debug)]
pub struct ServeConfig {
    pub mode: Mode,
    pub database: Database,
    pub workers: usize,
    pub table_mib: usize,
    pub state_memory: StateMemory,
    pub pool_size: u32,
    pub port: u16,
}

/// One worker's live figures, in memory shared by the master and every worker.
struct Slot {
    pid: AtomicU32,
    /// When the request in progress started, in µs since the master's start plus one; 0 when
    /// the worker is waiting for a request.
    busy_since: AtomicU64,
    served: AtomicU64,
    /// Held by the slot's worker for as long as it lives.
    life: LifeLock,
}

/// A robust, process-shared mutex: the worker that holds it dies, and the master's thread
/// waiting for it gets it with `EOWNERDEAD` (see the module docs for why not just `waitpid`).
struct LifeLock {
    mutex: UnsafeCell<libc::pthread_mutex_t>,
    /// The pid of the worker holding `mutex`, stored once it holds it.
    holder: AtomicU32,
}

// SAFETY: the mutex is only ever touched through pthread calls, which are made for use by
// several threads (and, being process-shared, several processes) at once.
unsafe impl Sync for LifeLock {}

impl LifeLock {
    /// Makes the (zeroed) mutex robust and process-shared; before any process can use it.
    fn init(&self) -> Result<(), String> {
        // SAFETY: `attributes` is initialised by `pthread_mutexattr_init` before use and
        // destroyed after; the mutex lives in memory nothing else uses yet, and is initialised
        // once.
        unsafe {
            let mut attributes: libc::pthread_mutexattr_t = std::mem::zeroed();
            let mut result = libc::pthread_mutexattr_init(&mut attributes);
            if result == 0 {
                result = libc::pthread_mutexattr_setpshared(
                    &mut attributes,
                    libc::PTHREAD_PROCESS_SHARED,
                );
            }
            if result == 0 {
                result =
                    libc::pthread_mutexattr_setrobust(&mut attributes, libc::PTHREAD_MUTEX_ROBUST);
            }
            if result == 0 {
                result = libc::pthread_mutex_init(self.mutex.get(), &attributes);
            }
            libc::pthread_mutexattr_destroy(&mut attributes);
            match result {
                0 => Ok(()),
                error => Err(format!(
                    "robust mutex: {}",
                    std::io::Error::from_raw_os_error(error)
                )),
            }
        }
    }

    /// In a worker, on the thread that lives as long as the process: holds the lock until the
    /// process dies. If it cannot be taken, the master only has `waitpid`.
    fn hold_for_life(&self) {
        // SAFETY: an initialised mutex, never destroyed; the master unlocks it after a death
        // before forking the next holder, so this hardly waits. Should this worker get it
        // first from a dead holder, it owns it and may mark it consistent.
        let held = unsafe {
            match libc::pthread_mutex_lock(self.mutex.get()) {
                0 => true,
                libc::EOWNERDEAD => libc::pthread_mutex_consistent(self.mutex.get()) == 0,
                _ => false,
            }
        };
        if held {
            self.holder.store(std::process::id(), Ordering::Release);
        }
    }

    /// The pid of the worker that took the lock last (0 before any did).
    fn holder(&self) -> u32 {
        self.holder.load(Ordering::Acquire)
    }

    /// In the master: waits until the holder dies, then frees the lock for the next one and
    /// returns the pid of the worker that held it. None if the lock was free (workers never
    /// let go of it alive).
    fn wait_for_holder_death(&self) -> Option<u32> {
        // SAFETY: an initialised mutex, never destroyed. After `EOWNERDEAD` this thread owns it
        // and marks it consistent, so the next worker can take it; unlocking is this thread's
        // to do in every case where the lock was taken.
        unsafe {
            match libc::pthread_mutex_lock(self.mutex.get()) {
                libc::EOWNERDEAD => {
                    // Read while this thread holds the lock, so no new holder has stored its
                    // pid yet: the last to store it is the one that died (or, if that one died
                    // before storing, its predecessor, which died holding it too).
                    let dead = self.holder();
                    libc::pthread_mutex_consistent(self.mutex.get());
                    libc::pthread_mutex_unlock(self.mutex.get());
                    Some(dead)
                }
                0 => {
                    libc::pthread_mutex_unlock(self.mutex.get());
                    None
                }
                _ => None,
            }
        }
    }
}

/// The slots, in a `MAP_SHARED` anonymous mapping made before the first fork.
struct Slots {
    slots: &'static [Slot],
}

impl Slots {
    fn new(count: usize) -> Slots {
        let bytes = std::mem::size_of::<Slot>() * count;
        let page = map_shared_anonymous(bytes)
            .unwrap_or_else(|error| panic!("mapping the worker slots: {error}"));
        // SAFETY: the mapping is `bytes` long, page-aligned (so aligned for `Slot`), zeroed by the
        // kernel (atomics of 0, and a mutex that `LifeLock::init` initialises next), never
        // unmapped, and only ever accessed through atomics and pthread calls, from this process
        // and its forked workers.
        let slots = unsafe { std::slice::from_raw_parts(page.as_ptr().cast::<Slot>(), count) };
        for slot in slots {
            slot.life
                .init()
                .unwrap_or_else(|error| panic!("the worker slots: {error}"));
        }
        Slots { slots }
    }
}

/// What the master's loop hears about.
enum Event {
    /// A worker's `LifeLock` came free: it is dying.
    Dying { slot: usize, pid: u32 },
    /// `waitpid` reaped a worker.
    Reaped { pid: u32, how: String },
    /// `quit` (or the end of input) arrived.
    Quit,
}

/// Waits, for one slot, for each worker it is told of to die, and says so. Lives as long as the
/// master, so that no thread starts or ends while the master forks.
fn watch_slot(slot_index: usize, slot: &Slot, workers: &Receiver<u32>, events: &Sender<Event>) {
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
fn start_thread(
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
fn reap(events: &Sender<Event>) {
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

/// µs since `start`, plus one so that 0 can mean "idle".
fn stamp(start: Instant) -> u64 {
    start.elapsed().as_micros() as u64 + 1
}

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

fn worker(
    config: &ServeConfig,
    slot: &Slot,
    listener: &TcpListener,
    app: Option<&Arc<App>>,
    start: Instant,
    master: Pid,
) -> Result<(), String> {
    nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(|error| error.to_string())?;
    if getppid() != master {
        return Err(String::from("the master died before this worker started"));
    }
    slot.busy_since.store(0, Ordering::Release);
    let built;
    let app = match app {
        Some(app) => &**app,
        None => {
            built = App::build(
                config.mode,
                &config.database,
                config.pool_size,
                config.table_mib,
                config.state_memory,
            )?;
            &built
        }
    };
    // One request at a time, like a gunicorn sync worker; each keep-alive connection has a
    // thread that waits for its next request.
    let serving = Mutex::new(());
    std::thread::scope(|scope| loop {
        let stream = match listener.accept() {
            Ok((stream, _)) => stream,
            Err(error) if error.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(error) => return Err(format!("accept: {error}")),
        };
        let serving = &serving;
        scope.spawn(move || {
            // A client that gave up has closed its connection; nothing to do about it.
            let _ = http::serve_connection(stream, |path| {
                let _one_at_a_time = serving
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner());
                slot.busy_since.store(stamp(start), Ordering::Release);
                let answer = answer(app, path);
                slot.served.fetch_add(1, Ordering::AcqRel);
                slot.busy_since.store(0, Ordering::Release);
                answer
            });
        });
    })
}

/// `GET /?n=<number>`: the application's answer, or an error naming this worker.
fn answer(app: &App, path: &str) -> (u16, String) {
    let n = path
        .split_once("n=")
        .and_then(|(_, rest)| rest.split('&').next())
        .and_then(|n| n.parse::<u64>().ok());
    match n.map(|n| app.handle(n)) {
        Some(Ok(body)) => (200, body),
        Some(Err(error)) => (500, format!("{error} pid={}\n", std::process::id())),
        None => (400, String::from("usage: GET /?n=<number>\n")),
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
