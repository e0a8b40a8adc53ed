//! The pre-fork HTTP server, in the gunicorn / uWSGI mould.
//!
//! The master binds one listening socket, builds the application (eager modes), forks the
//! workers, and replaces any worker that dies. Every worker accepts on the inherited socket
//! and serves requests one at a time, like a gunicorn sync worker.
//!
//! The master talks to whoever started it over its standard streams, one line each:
//! it prints `listening <port> <master pid>`, `spawned <slot> <pid>`, `exited <slot> <pid>
//! <how>`, and answers the line `status` with `status <now µs> <slot>:<pid>:<busy since µs, 0
//! when idle>:<served> …`. The line `quit` (or end of input) stops every worker and the master.

use std::io::{BufRead, Write};
use std::net::TcpListener;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
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
#[derive(Default)]
struct Slot {
    pid: AtomicU32,
    /// When the request in progress started, in µs since the master's start plus one; 0 when
    /// the worker is waiting for a request.
    busy_since: AtomicU64,
    served: AtomicU64,
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
        // kernel (an all-zero `Slot` is `Slot::default()`: atomics of 0), never unmapped, and
        // only ever accessed through atomics, from this process and its forked workers.
        let slots = unsafe { std::slice::from_raw_parts(page.as_ptr().cast::<Slot>(), count) };
        Slots { slots }
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
    {
        let quitting = Arc::clone(&quitting);
        std::thread::spawn(move || control(slots.slots, start, &quitting));
    }
    let spawn = |slot| {
        spawn_worker(
            &config,
            slot,
            &listener,
            app.as_ref(),
            &slots,
            start,
            master,
        )
    };
    for slot in 0..config.workers {
        spawn(slot)?;
    }
    let mut failed_starts = 0;
    loop {
        let (pid, how) = match waitpid(None::<Pid>, None) {
            Ok(WaitStatus::Exited(pid, code)) => (pid, format!("exit:{code}")),
            Ok(WaitStatus::Signaled(pid, signal, _)) => (pid, format!("signal:{signal}")),
            Ok(_) => continue,
            Err(nix::errno::Errno::EINTR) => continue,
            // No children left: only after quit, since workers are replaced as they die.
            Err(_) => break,
        };
        let Some(slot) = slots
            .slots
            .iter()
            .position(|slot| slot.pid.load(Ordering::Acquire) == pid.as_raw() as u32)
        else {
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
        if quitting.load(Ordering::Acquire) {
            slots.slots[slot].pid.store(0, Ordering::Release);
            continue;
        }
        spawn(slot)?;
        if quitting.load(Ordering::Acquire) {
            // Quit arrived while this one was being made; the control thread may have missed it.
            let _ = kill(
                Pid::from_raw(slots.slots[slot].pid.load(Ordering::Acquire) as i32),
                Signal::SIGTERM,
            );
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

fn spawn_worker(
    config: &ServeConfig,
    slot: usize,
    listener: &TcpListener,
    app: Option<&Arc<App>>,
    slots: &Slots,
    start: Instant,
    master: Pid,
) -> Result<(), String> {
    // SAFETY: the child only runs `worker`, which never returns: it builds what it needs after
    // the fork (the point of this demo is what happens to a pool built before it) and ends
    // with `_exit`. The master's other thread (`control`) holds no lock the child needs: the
    // child never prints, and glibc's malloc is reset for the child by its own atfork handlers.
    match unsafe { fork() }.map_err(|error| format!("fork: {error}"))? {
        ForkResult::Parent { child } => {
            slots.slots[slot]
                .pid
                .store(child.as_raw() as u32, Ordering::Release);
            say(&format!("spawned {slot} {child}"));
            Ok(())
        }
        ForkResult::Child => {
            let code = match worker(config, &slots.slots[slot], listener, app, start, master) {
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
