//! The demo driver: starts the server in one mode, measures it, stops it.
//!
//! One concept per file: `serve_process` (a `prefork-demo serve` process, started, read and
//! stopped), `load` (the load: connections spread evenly, servers in turns), `client` (one
//! request, its outcome, and the tally of them), `measure` (probes, CPU time, memory). This
//! file runs a round with them.

mod client;
mod load;
mod measure;
mod serve_process;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::app::Mode;
use crate::config::RunConfig;
use crate::progress::Progress;
use crate::results::ModeResult;
use load::Load;
use measure::{cpu_seconds, probe, pss_mib, Probe};
use serve_process::Server;

/// How long the driver waits for every worker to serve its first request.
const STARTUP_LIMIT: Duration = Duration::from_secs(15);
/// How long the driver waits for a killed worker's replacement to serve.
const RESPAWN_LIMIT: Duration = Duration::from_secs(5);

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
    let last = server.stop_for_last_words();
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
