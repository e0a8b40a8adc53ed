//! What the driver measures outside the load: a probe request on a connection of its own, a
//! process's CPU time, and its memory.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use super::client::{agent, request, Outcome, TIMED_OUT};

/// What a probe learnt.
pub enum Probe {
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
pub fn probe(port: u16, timeout: Duration, table_mib: usize) -> Probe {
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
pub fn cpu_seconds(pid: u32) -> f64 {
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
pub fn pss_mib(pid: u32) -> f64 {
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
