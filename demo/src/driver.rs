//! The demo driver: starts the server in one mode, measures it, stops it.

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::progress::Progress;
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

use crate::app::{Answer, Database, Mode, StateMemory};

/// How long the driver waits for every worker to serve its first request.
const STARTUP_LIMIT: Duration = Duration::from_secs(15);
/// How long the driver waits for a killed worker's replacement to serve.
const RESPAWN_LIMIT: Duration = Duration::from_secs(5);
/// The failure of a request that got no answer in time.
const TIMED_OUT: &str = "request timed out";

/// How the driver runs every mode.
#[derive(Clone, Debug)]
pub struct RunConfig {
    pub database: Database,
    pub workers: usize,
    pub table_mib: usize,
    pub state_memory: StateMemory,
    pub pool_size: u32,
    pub requests: u64,
    pub clients: usize,
    pub request_timeout: Duration,
    pub load_time_limit: Duration,
    pub hang_after: Duration,
    /// Where the servers' standard error goes too, if anywhere.
    pub server_log: Option<std::path::PathBuf>,
}

/// Everything measured for one mode; the table's columns.
#[derive(Clone, Debug, Default)]
pub struct ModeResult {
    pub mode: &'static str,
    pub workers: usize,
    pub requests_ok: u64,
    /// Requests sent that got an error or no answer in time.
    pub failed: u64,
    /// Requests not sent: the load time limit passed, or the server stopped answering.
    pub not_sent: u64,
    /// Whether the load stopped because every request in a row timed out.
    pub server_stopped_answering: bool,
    pub wrong_answers: u64,
    pub hung_workers: usize,
    pub req_per_s: f64,
    pub p99_latency_ms: f64,
    pub cpu_seconds_starting: f64,
    /// Workers that answered before the start-up deadline (all of them, normally).
    pub workers_serving_at_start: usize,
    pub respawn_time_ms: Option<f64>,
    /// When the master had forked the replacement (its `spawned` line arrived), for context.
    pub respawn_forked_ms: Option<f64>,
    pub total_pss_mib: f64,
    pub pss_ratio_to_lazy: Option<f64>,
    /// The error answers, with counts, in the order they first appeared.
    pub errors: Vec<(String, u64)>,
    /// Set when the server could not be run at all.
    pub server_error: Option<String>,
}

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
        let mut child = Command::new(exe)
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

/// What one load client saw: latencies, answers right, answers wrong, and errors with when
/// each request that met one was sent.
type ClientTally = (Vec<Duration>, u64, u64, Vec<(Instant, String)>);

/// One HTTP request's outcome.
enum Outcome {
    Ok(Answer),
    Wrong,
    /// The worker answered with an error; the pid it named, if it did.
    ErrorAnswer {
        message: String,
        pid: Option<u32>,
    },
    /// No answer (a timeout, a closed connection).
    Failed(String),
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

fn agent(timeout: Duration, keep_alive: bool) -> ureq::Agent {
    let config = ureq::Agent::config_builder()
        .timeout_global(Some(timeout))
        .http_status_as_error(false)
        .max_idle_connections(if keep_alive { 4 } else { 0 })
        .max_idle_connections_per_host(if keep_alive { 4 } else { 0 })
        .build();
    config.into()
}

fn request(agent: &ureq::Agent, port: u16, n: u64, table_mib: usize) -> Outcome {
    let response = agent.get(&format!("http://127.0.0.1:{port}/?n={n}")).call();
    let mut response = match response {
        Ok(response) => response,
        Err(ureq::Error::Timeout(_)) => return Outcome::Failed(String::from(TIMED_OUT)),
        Err(error) => return Outcome::Failed(format!("http: {error}")),
    };
    let status = response.status().as_u16();
    let body = match response.body_mut().read_to_string() {
        Ok(body) => body,
        Err(ureq::Error::Timeout(_)) => return Outcome::Failed(String::from(TIMED_OUT)),
        Err(error) => return Outcome::Failed(format!("http: {error}")),
    };
    if status != 200 {
        // "query: <driver error> pid=123": keep the error, drop the pid, so messages group.
        let (message, pid) = match body.trim().rsplit_once(" pid=") {
            Some((message, pid)) => (message, pid.parse().ok()),
            None => (body.trim(), None),
        };
        // On one line, although drivers (libpq) spread their messages over several.
        let message = message.split_whitespace().collect::<Vec<_>>().join(" ");
        return Outcome::ErrorAnswer {
            message: format!("HTTP {status}: {message}"),
            pid,
        };
    }
    match Answer::parse(&body) {
        Some(answer) if answer.is_for(n, table_mib) => Outcome::Ok(answer),
        _ => Outcome::Wrong,
    }
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

/// Starts the server in `mode`, measures it, stops it.
pub fn run_mode(mode: Mode, index: u64, config: &RunConfig, bar: &Progress) -> ModeResult {
    let mut result = ModeResult {
        mode: mode.name(),
        workers: config.workers,
        ..ModeResult::default()
    };
    bar.phase("starting");
    let mut server = match Server::start(mode, config) {
        Ok(server) => server,
        Err(error) => {
            result.server_error = Some(error);
            return result;
        }
    };
    let outcome = measure(index, config, bar, &mut server, &mut result);

    bar.phase("stopping");
    let view = Arc::clone(&server.view);
    server.stop();
    if let Err(error) = outcome {
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
    result
}

fn measure(
    index: u64,
    config: &RunConfig,
    bar: &Progress,
    server: &mut Server,
    result: &mut ModeResult,
) -> Result<(), String> {
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

    // Start-up: until every worker has answered a request (an error answer counts: the
    // worker is up, and the load measures what its answers are worth). Two probes in a row
    // without an answer mean hung workers, which no longer wait will bring back.
    bar.phase("waiting for every worker to serve");
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

    // Load: a fixed number of requests over keep-alive connections, bounded in time, and
    // stopped once the server has stopped answering: when every worker is hung, waiting out
    // the rest of the time limit would show nothing more.
    bar.phase("load");
    let next = AtomicU64::new(0);
    let timeouts_in_a_row = AtomicU64::new(0);
    let unanswered_limit = 2 * config.clients as u64;
    let load_deadline = Instant::now() + config.load_time_limit;
    let base = (index + 1) * 1_000_000_000_000;
    let load_start = Instant::now();
    let per_client: Vec<ClientTally> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..config.clients)
            .map(|_| {
                scope.spawn(|| {
                    let agent = agent(config.request_timeout, true);
                    let (mut latencies, mut ok, mut wrong, mut errors) =
                        (Vec::new(), 0, 0, Vec::new());
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= config.requests
                            || Instant::now() >= load_deadline
                            || timeouts_in_a_row.load(Ordering::Relaxed) >= unanswered_limit
                        {
                            break;
                        }
                        let sent = Instant::now();
                        let outcome = request(&agent, port, base + i, config.table_mib);
                        if matches!(&outcome, Outcome::Failed(error) if error == TIMED_OUT) {
                            timeouts_in_a_row.fetch_add(1, Ordering::Relaxed);
                        } else {
                            timeouts_in_a_row.store(0, Ordering::Relaxed);
                        }
                        match outcome {
                            Outcome::Ok(_) => ok += 1,
                            Outcome::Wrong => wrong += 1,
                            Outcome::ErrorAnswer { message, .. } | Outcome::Failed(message) => {
                                errors.push((sent, message))
                            }
                        }
                        latencies.push(sent.elapsed());
                        bar.advance(1);
                    }
                    (latencies, ok, wrong, errors)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|handle| handle.join().expect("client thread"))
            .collect()
    });
    let load_time = load_start.elapsed();
    let mut latencies = Vec::new();
    // Each message: its count and when it was first seen.
    let mut errors: BTreeMap<String, (u64, Instant)> = BTreeMap::new();
    for (client_latencies, ok, wrong, client_errors) in per_client {
        latencies.extend(client_latencies);
        result.requests_ok += ok;
        result.wrong_answers += wrong;
        result.failed += client_errors.len() as u64;
        for (at, error) in client_errors {
            let (count, first) = errors.entry(error).or_insert((0, at));
            *count += 1;
            *first = (*first).min(at);
        }
    }
    let sent = latencies.len() as u64;
    result.not_sent = config.requests.saturating_sub(sent);
    result.server_stopped_answering = timeouts_in_a_row.load(Ordering::Relaxed) >= unanswered_limit;
    bar.advance(result.not_sent);
    let mut errors: Vec<(String, (u64, Instant))> = errors.into_iter().collect();
    errors.sort_by_key(|(_, (_, first))| *first);
    errors.truncate(4);
    result.errors = errors
        .into_iter()
        .map(|(message, (count, _))| (message, count))
        .collect();
    result.req_per_s = result.requests_ok as f64 / load_time.as_secs_f64();
    latencies.sort();
    if !latencies.is_empty() {
        let rank = ((latencies.len() as f64) * 0.99).ceil() as usize;
        result.p99_latency_ms =
            latencies[rank.clamp(1, latencies.len()) - 1].as_secs_f64() * 1000.0;
    }

    // Hung workers: still busy on one request `hang_after` after the load stopped.
    bar.phase("looking for hung workers");
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
    result.total_pss_mib = pss_mib(master) + workers.iter().map(|&pid| pss_mib(pid)).sum::<f64>();

    // Respawn: kill one worker; time until its replacement has served a request. One prober
    // per worker keeps requests coming, as live traffic would: a lone prober, answered by a
    // survivor each time, would leave the replacement queued behind the survivors in
    // `accept` for several round trips after it was ready.
    if result.server_stopped_answering {
        // Nothing would answer a probe either.
        return Ok(());
    }
    bar.phase("respawn");
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
