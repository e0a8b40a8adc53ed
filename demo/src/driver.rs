//! The demo driver: starts the server in one mode, measures it, stops it.

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

use crate::app::Mode;
use crate::config::RunConfig;
use crate::load::{self, agent, request, Load, Outcome, TIMED_OUT};
use crate::progress::Progress;
use crate::results::ModeResult;

/// How long the driver waits for every worker to serve its first request.
const STARTUP_LIMIT: Duration = Duration::from_secs(15);
/// How long the driver waits for a killed worker's replacement to serve.
const RESPAWN_LIMIT: Duration = Duration::from_secs(5);

/// One worker slot as the master reported it.
#[derive(Clone, Copy, Debug)]
struct SlotStatus {
    /// When its request in progress started (master's clock, µs); 0 when idle.
    busy_since: u64,
}

/// What the master has said so far.
#[derive(Default)]
struct View {
    port: Option<u16>,
    master: Option<u32>,
    workers: BTreeMap<usize, u32>,
    ever: HashSet<u32>,
    /// When each worker's `spawned` line was read.
    spawned_at: BTreeMap<u32, Instant>,
    statuses: u64,
    status: Vec<SlotStatus>,
    status_now: u64,
    error: Option<String>,
    closed: bool,
    /// The last lines the server wrote to its standard error.
    stderr_tail: VecDeque<String>,
}

/// How many lines of the server's standard error a failed run reports.
const STDERR_TAIL: usize = 3;

/// A running `prefork_demo serve` process.
struct Server {
    child: Child,
    stdin: Option<ChildStdin>,
    view: Arc<(Mutex<View>, Condvar)>,
}

impl Server {
    fn start(mode: Mode, config: &RunConfig) -> Result<Server, String> {
        let exe = std::env::current_exe().map_err(|error| error.to_string())?;
        let mut log = match &config.server_log {
            Some(path) => Some(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .map_err(|error| format!("{}: {error}", path.display()))?,
            ),
            None => None,
        };
        let mut command = Command::new(exe);
        if let Some(cpus) = &config.cpus {
            cpus.for_servers(&mut command);
        }
        let mut child = command
            .args([
                "serve",
                "--mode",
                mode.name(),
                "--database",
                config.database.arg(),
            ])
            .args([
                "--workers",
                &config.workers.to_string(),
                "--state-mib",
                &config.table_mib.to_string(),
                "--state-memory",
                config.state_memory.name(),
            ])
            .args(["--pool-size", &config.pool_size.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|error| format!("cannot start the server: {error}"))?;
        let stdout = child.stdout.take().expect("piped");
        let stderr = child.stderr.take().expect("piped");
        let view = Arc::new((Mutex::new(View::default()), Condvar::new()));
        // The server's complaints: kept (the last few) for the report, and in the log if asked.
        let tail_view = Arc::clone(&view);
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if let Some(log) = &mut log {
                    let _ = writeln!(log, "{line}");
                }
                let mut view = tail_view.0.lock().unwrap();
                if view.stderr_tail.len() == STDERR_TAIL {
                    view.stderr_tail.pop_front();
                }
                view.stderr_tail.push_back(line);
            }
        });
        let reader_view = Arc::clone(&view);
        std::thread::spawn(move || {
            let (lock, changed) = &*reader_view;
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let mut view = lock.lock().unwrap();
                read_line(&mut view, &line);
                changed.notify_all();
            }
            lock.lock().unwrap().closed = true;
            changed.notify_all();
        });
        let stdin = child.stdin.take();
        Ok(Server { child, stdin, view })
    }

    /// Waits until `ready` finds what it wants in the view, or the deadline passes.
    fn wait_for<T>(
        &self,
        timeout: Duration,
        mut ready: impl FnMut(&View) -> Option<T>,
    ) -> Option<T> {
        let deadline = Instant::now() + timeout;
        let (lock, changed) = &*self.view;
        let mut view = lock.lock().unwrap();
        loop {
            if let Some(found) = ready(&view) {
                return Some(found);
            }
            let left = deadline.checked_duration_since(Instant::now())?;
            if view.closed {
                return None;
            }
            view = changed.wait_timeout(view, left).unwrap().0;
        }
    }

    fn with_view<T>(&self, read: impl FnOnce(&View) -> T) -> T {
        read(&self.view.0.lock().unwrap())
    }

    /// Asks the master for its clock (µs) and its workers' slots.
    fn status(&mut self) -> Option<(u64, Vec<SlotStatus>)> {
        let before = self.with_view(|view| view.statuses);
        writeln!(self.stdin.as_mut()?, "status").ok()?;
        self.wait_for(Duration::from_secs(5), |view| {
            (view.statuses > before).then(|| (view.status_now, view.status.clone()))
        })
    }

    /// Stops the master and its workers; kills them if they do not stop in time. Always reaps.
    fn stop(mut self) {
        if let Some(mut stdin) = self.stdin.take() {
            let _ = writeln!(stdin, "quit");
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match self.child.try_wait() {
                Ok(Some(_)) | Err(_) => break,
                Ok(None) if Instant::now() >= deadline => {
                    // The workers die with it (PR_SET_PDEATHSIG); this process reaps them as
                    // the subreaper.
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    break;
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(10)),
            }
        }
        // The master has exited, so each of its workers is gone, or reaped by the master, or
        // now a child of this process (a subreaper): killed and reaped here. Only the workers'
        // own pids are waited for: this process has other children (a private database).
        let workers: Vec<u32> = self.with_view(|view| view.ever.iter().copied().collect());
        for pid in workers {
            let pid = Pid::from_raw(pid as i32);
            if waitpid(pid, Some(WaitPidFlag::WNOHANG)) == Ok(WaitStatus::StillAlive) {
                let _ = kill(pid, Signal::SIGKILL);
                let _ = waitpid(pid, None);
            }
        }
    }
}

fn read_line(view: &mut View, line: &str) {
    let mut words = line.split_whitespace();
    match words.next() {
        Some("listening") => {
            view.port = words.next().and_then(|port| port.parse().ok());
            view.master = words.next().and_then(|pid| pid.parse().ok());
        }
        Some("spawned") => {
            if let (Some(Ok(slot)), Some(Ok(pid))) =
                (words.next().map(str::parse), words.next().map(str::parse))
            {
                view.workers.insert(slot, pid);
                view.ever.insert(pid);
                view.spawned_at.insert(pid, Instant::now());
            }
        }
        Some("status") => {
            view.status_now = words.next().and_then(|now| now.parse().ok()).unwrap_or(0);
            view.status = words
                .filter_map(|slot| {
                    // slot:pid:busy_since:served
                    let busy_since = slot.split(':').nth(2)?.parse().ok()?;
                    Some(SlotStatus { busy_since })
                })
                .collect();
            view.statuses += 1;
        }
        Some("error") => view.error = Some(line["error ".len()..].to_owned()),
        _ => {}
    }
}

/// What a probe learnt.
enum Probe {
    /// This worker answered right.
    Served(u32),
    /// This worker answered, with an error.
    Answered(u32),
    /// No answer in time.
    TimedOut,
    /// Anything else: refused, wrong, unnamed.
    Other,
}

/// Sends one request on a fresh connection; the pid of the worker that answered, if any did.
/// Requests are numbered from a range the load never uses.
fn probe(port: u16, timeout: Duration, table_mib: usize) -> Probe {
    static NEXT: AtomicU64 = AtomicU64::new(9_000_000_000_000);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    match request(&agent(timeout, false), port, n, table_mib) {
        Outcome::Ok(answer) => Probe::Served(answer.pid),
        Outcome::ErrorAnswer { pid: Some(pid), .. } => Probe::Answered(pid),
        Outcome::Failed(error) if error == TIMED_OUT => Probe::TimedOut,
        Outcome::Wrong | Outcome::ErrorAnswer { pid: None, .. } | Outcome::Failed(_) => {
            Probe::Other
        }
    }
}

/// CPU seconds (user + system, all threads, live and exited) a process has used, to the
/// nanosecond: its process CPU-time clock (`clock_getcpuclockid`). `/proc/PID/stat` counts in
/// 10 ms ticks, too coarse for a master and four workers that start in a few dozen of them.
fn cpu_seconds(pid: u32) -> f64 {
    let mut clock: libc::clockid_t = 0;
    // SAFETY: `clock` is a valid place for the clock id; a pid that is not ours or is gone is
    // an error return, not undefined behaviour.
    if unsafe { libc::clock_getcpuclockid(pid as libc::pid_t, &mut clock) } != 0 {
        return 0.0;
    }
    let mut time = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `time` is a valid `timespec` to write; `clock` came from `clock_getcpuclockid`.
    if unsafe { libc::clock_gettime(clock, &mut time) } != 0 {
        return 0.0;
    }
    time.tv_sec as f64 + time.tv_nsec as f64 / 1e9
}

/// Proportional set size of a process in MiB, from /proc/PID/smaps_rollup.
fn pss_mib(pid: u32) -> f64 {
    let Ok(rollup) = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")) else {
        return 0.0;
    };
    rollup
        .lines()
        .find_map(|line| line.strip_prefix("Pss:"))
        .and_then(|rest| {
            rest.trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<f64>()
                .ok()
        })
        .map_or(0.0, |kib| kib / 1024.0)
}

/// A server of a round that started: the master's port and pid.
struct Running {
    server: Server,
    port: u16,
    master: u32,
}

/// Runs one round: starts a server per mode (one after the other), loads them side by side
/// (see [`load`]), then measures and stops each. The results are in the order of
/// `modes`; `index` numbers the first mode's run among all of the demo's, the rest follow.
pub fn run_round(
    modes: &[Mode],
    index: u64,
    config: &RunConfig,
    bar: &Progress,
) -> Vec<ModeResult> {
    let phase = |mode: Mode, what: &str| {
        if modes.len() > 1 {
            bar.phase(&format!("{}: {what}", mode.name()));
        } else {
            bar.phase(what);
        }
    };
    let mut results: Vec<ModeResult> = modes
        .iter()
        .map(|mode| ModeResult {
            mode: mode.name(),
            workers: config.workers,
            ..ModeResult::default()
        })
        .collect();
    let mut running: Vec<Option<Running>> = Vec::new();
    for (&mode, result) in modes.iter().zip(&mut results) {
        phase(mode, "starting");
        running.push(match Server::start(mode, config) {
            Ok(mut server) => {
                match start_up(config, &mut server, result, &|what| phase(mode, what)) {
                    Ok((port, master)) => Some(Running {
                        server,
                        port,
                        master,
                    }),
                    Err(error) => {
                        fail(server, result, error);
                        None
                    }
                }
            }
            Err(error) => {
                result.server_error = Some(error);
                None
            }
        });
    }

    // Load: every server that started, side by side.
    bar.phase("load");
    let (mut loads, loaded): (Vec<Load>, Vec<usize>) = running
        .iter()
        .enumerate()
        .filter_map(|(at, running)| {
            let running = running.as_ref()?;
            let load = Load::new(running.port, config.workers, index + at as u64, bar);
            Some((load, at))
        })
        .unzip();
    load::run(&mut loads, config);
    for (load, at) in loads.into_iter().zip(loaded) {
        let result = &mut results[at];
        result.requests_ok = load.tally.ok;
        result.wrong_answers = load.tally.wrong;
        result.failed = load.tally.errors.len() as u64;
        result.not_sent = config.requests.saturating_sub(load.sent);
        bar.advance(result.not_sent);
        result.server_stopped_answering = load.stopped_answering;
        result.req_per_s = load.req_per_s();
        result.slice_req_per_s = load.slice_req_per_s;
        result.p99_latency_ms = load.tally.p99_ms();
        result.connections_per_worker = load.connections_per_worker;
        result.errors = load.tally.errors_in_order();
        result.errors.truncate(4);
    }

    for ((&mode, result), running) in modes.iter().zip(&mut results).zip(running) {
        let Some(mut running) = running else { continue };
        let outcome = after_load(config, &mut running, result, &|what| phase(mode, what));
        phase(mode, "stopping");
        match outcome {
            Ok(()) => running.server.stop(),
            Err(error) => fail(running.server, result, error),
        }
    }
    results
}

/// Stops a server that failed, and says why in its result, with the last words of its
/// standard error.
fn fail(server: Server, result: &mut ModeResult, error: String) {
    let view = Arc::clone(&server.view);
    server.stop();
    let last = view
        .0
        .lock()
        .unwrap()
        .stderr_tail
        .iter()
        .cloned()
        .collect::<Vec<_>>()
        .join(" / ");
    result.server_error = Some(if last.is_empty() {
        error
    } else {
        format!("{error} (server said: {last})")
    });
}

/// Waits for the master and its workers, then until every worker has answered a request (an
/// error answer counts: the worker is up, and the load measures what its answers are worth);
/// measures the CPU that took. Two probes in a row without an answer mean hung workers, which
/// no longer wait will bring back. The master's port and pid.
fn start_up(
    config: &RunConfig,
    server: &mut Server,
    result: &mut ModeResult,
    phase: &dyn Fn(&str),
) -> Result<(u16, u32), String> {
    let wanted = config.workers;
    let started = server.wait_for(Duration::from_secs(120), |view| {
        if let Some(error) = &view.error {
            return Some(Err(error.clone()));
        }
        match (view.port, view.master) {
            (Some(port), Some(master)) if view.workers.len() == wanted => Some(Ok((port, master))),
            _ => None,
        }
    });
    let (port, master) = match started {
        Some(Ok(found)) => found,
        Some(Err(error)) => return Err(error),
        None => return Err(String::from("the server did not start in 120 s")),
    };

    phase("waiting for every worker to serve");
    let workers: Vec<u32> = server.with_view(|view| view.workers.values().copied().collect());
    let mut answered = HashSet::new();
    let mut serving = HashSet::new();
    let mut timeouts_in_a_row = 0;
    let deadline = Instant::now() + STARTUP_LIMIT;
    while answered.len() < workers.len() && Instant::now() < deadline && timeouts_in_a_row < 2 {
        match probe(port, Duration::from_secs(2), config.table_mib) {
            Probe::Served(pid) => {
                answered.insert(pid);
                serving.insert(pid);
                timeouts_in_a_row = 0;
            }
            Probe::Answered(pid) => {
                answered.insert(pid);
                timeouts_in_a_row = 0;
            }
            Probe::TimedOut => timeouts_in_a_row += 1,
            Probe::Other => {}
        }
    }
    result.workers_serving_at_start = workers.iter().filter(|pid| serving.contains(pid)).count();
    result.cpu_seconds_starting =
        cpu_seconds(master) + workers.iter().map(|&pid| cpu_seconds(pid)).sum::<f64>();
    Ok((port, master))
}

/// After the load: hung workers, memory, and the time to replace a killed worker.
fn after_load(
    config: &RunConfig,
    running: &mut Running,
    result: &mut ModeResult,
    phase: &dyn Fn(&str),
) -> Result<(), String> {
    // Hung workers: still busy on one request `hang_after` after the load stopped.
    phase("looking for hung workers");
    let server = &mut running.server;
    let checked_from = Instant::now();
    while let Some((now, slots)) = server.status() {
        let busy: Vec<u64> = slots
            .iter()
            .filter(|slot| slot.busy_since != 0)
            .map(|slot| now.saturating_sub(slot.busy_since))
            .collect();
        let hang_us = config.hang_after.as_micros() as u64;
        if busy.is_empty() || checked_from.elapsed() >= config.hang_after {
            result.hung_workers = busy.iter().filter(|&&busy_us| busy_us >= hang_us).count();
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }

    // Memory: master + workers, after serving.
    let workers: Vec<u32> = server.with_view(|view| view.workers.values().copied().collect());
    result.total_pss_mib =
        pss_mib(running.master) + workers.iter().map(|&pid| pss_mib(pid)).sum::<f64>();

    // Respawn: kill one worker; time until its replacement has served a request. One prober
    // per worker keeps requests coming, as live traffic would: a lone prober, answered by a
    // survivor each time, would leave the replacement queued behind the survivors in
    // `accept` for several round trips after it was ready.
    if result.server_stopped_answering {
        // Nothing would answer a probe either.
        return Ok(());
    }
    phase("respawn");
    let port = running.port;
    let known: HashSet<u32> = server.with_view(|view| view.ever.clone());
    let victim = workers[0];
    let killed_at = Instant::now();
    kill(Pid::from_raw(victim as i32), Signal::SIGKILL)
        .map_err(|error| format!("kill worker: {error}"))?;
    let respawn_deadline = killed_at + RESPAWN_LIMIT;
    let replacement: std::sync::OnceLock<(u32, Duration)> = std::sync::OnceLock::new();
    std::thread::scope(|scope| {
        for _ in 0..config.workers {
            scope.spawn(|| {
                while replacement.get().is_none() && Instant::now() < respawn_deadline {
                    match probe(port, Duration::from_millis(300), config.table_mib) {
                        Probe::Served(pid) if !known.contains(&pid) => {
                            let _ = replacement.set((pid, killed_at.elapsed()));
                        }
                        _ => std::thread::sleep(Duration::from_micros(500)),
                    }
                }
            });
        }
    });
    if let Some(&(pid, after)) = replacement.get() {
        result.respawn_time_ms = Some(after.as_secs_f64() * 1000.0);
        result.respawn_forked_ms = server
            .with_view(|view| view.spawned_at.get(&pid).copied())
            .map(|at| at.saturating_duration_since(killed_at).as_secs_f64() * 1000.0);
    }
    Ok(())
}
