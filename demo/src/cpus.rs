//! Which CPUs the load generator runs on, and which the servers under test and a private
//! database run on.
//!
//! Left to the scheduler, on a machine of two cores, the load generator's threads, the
//! workers and the database's backends land wherever the scheduler puts them when a server
//! starts, and mostly stay there while it runs: two servers started a second apart, each
//! keeping its own pace slice after slice, ran up to a third apart whatever their mode
//! (measured on 2 cores while other programs ran: the ratio of forksafe's req/s to lazy's
//! ranged 0.97–1.32 over 8 rounds). With the load generator on one half of the CPUs and the
//! servers with their database on the other, every start meets the same arrangement (8 rounds:
//! 0.99–1.03, and one round of 0.91 when another program took the CPU), and the load generator
//! takes no CPU time from the servers it measures: with 8 clients, 4 workers and a private
//! PostgreSQL on 2 cores, the servers' core runs at 99 % and the load generator's at about
//! half.

use std::os::unix::process::CommandExt;
use std::process::Command;

/// The CPUs of the two sides.
#[derive(Clone, Debug)]
pub struct Cpus {
    load: Vec<usize>,
    servers: Vec<usize>,
}

impl Cpus {
    /// The CPUs this process may run on, split in two: the first half (the larger) for the
    /// servers, the rest for the load generator. `None` with fewer than two.
    pub fn split() -> Option<Cpus> {
        let allowed = allowed_cpus()?;
        if allowed.len() < 2 {
            return None;
        }
        let (servers, load) = allowed.split_at(allowed.len().div_ceil(2));
        Some(Cpus {
            load: load.to_vec(),
            servers: servers.to_vec(),
        })
    }

    /// Pins the calling thread, and the threads it starts from now on, to the load
    /// generator's CPUs.
    pub fn pin_load_generator(&self) -> Result<(), String> {
        let set = cpu_set(&self.load);
        // SAFETY: `set` is an initialised `cpu_set_t` of the size given; pid 0 is this thread.
        let result =
            unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) };
        if result == 0 {
            Ok(())
        } else {
            Err(format!(
                "cannot choose CPUs: {}",
                std::io::Error::last_os_error()
            ))
        }
    }

    /// Makes the process `command` starts (and every process it starts) run on the servers'
    /// CPUs.
    pub fn for_servers(&self, command: &mut Command) {
        let set = cpu_set(&self.servers);
        // SAFETY: the closure runs in the child between fork and exec, where only
        // async-signal-safe calls are allowed: it makes one system call on a set computed
        // before the fork, and allocates and locks nothing. Should the call fail, the server
        // runs where the load generator may run too, as without a split.
        unsafe {
            command.pre_exec(move || {
                libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
                Ok(())
            });
        }
    }

    /// "servers and database on CPU 0, load generator on CPU 1".
    pub fn describe(&self) -> String {
        format!(
            "servers and database on {}, load generator on {}",
            list(&self.servers),
            list(&self.load)
        )
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::json!({ "servers": self.servers, "load_generator": self.load })
    }
}

/// The CPUs this thread may run on, in order.
fn allowed_cpus() -> Option<Vec<usize>> {
    // SAFETY: an all-zero `cpu_set_t` is a valid empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a `cpu_set_t` of the size given, for the kernel to fill.
    let result =
        unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) };
    if result != 0 {
        return None;
    }
    Some(
        (0..libc::CPU_SETSIZE as usize)
            // SAFETY: `cpu` is below CPU_SETSIZE, inside the set.
            .filter(|&cpu| unsafe { libc::CPU_ISSET(cpu, &set) })
            .collect(),
    )
}

fn cpu_set(cpus: &[usize]) -> libc::cpu_set_t {
    // SAFETY: an all-zero `cpu_set_t` is a valid empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    for &cpu in cpus {
        // SAFETY: `cpu` came from `allowed_cpus`, so it is below CPU_SETSIZE.
        unsafe { libc::CPU_SET(cpu, &mut set) };
    }
    set
}

/// "CPU 3", "CPUs 0, 1".
fn list(cpus: &[usize]) -> String {
    let names: Vec<String> = cpus.iter().map(usize::to_string).collect();
    match names.as_slice() {
        [one] => format!("CPU {one}"),
        _ => format!("CPUs {}", names.join(", ")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_servers_get_the_larger_half_and_both_sides_some() {
        let Some(cpus) = Cpus::split() else {
            assert!(allowed_cpus().is_some_and(|cpus| cpus.len() < 2));
            return;
        };
        let allowed = allowed_cpus().expect("the allowed CPUs");
        assert!(!cpus.load.is_empty() && cpus.servers.len() >= cpus.load.len());
        let mut both: Vec<usize> = cpus.servers.iter().chain(&cpus.load).copied().collect();
        both.sort_unstable();
        assert_eq!(both, allowed);
    }

    #[test]
    fn a_pinned_thread_and_a_started_process_run_where_they_were_put() {
        let Some(cpus) = Cpus::split() else { return };
        std::thread::spawn(move || {
            cpus.pin_load_generator().expect("pinned");
            assert_eq!(allowed_cpus(), Some(cpus.load.clone()));
            let mut command = Command::new("sh");
            command.args(["-c", "grep Cpus_allowed_list /proc/self/status"]);
            cpus.for_servers(&mut command);
            let output = command.output().expect("sh");
            let said = String::from_utf8_lossy(&output.stdout);
            let expected: Vec<String> = cpus.servers.iter().map(usize::to_string).collect();
            // The kernel lists ranges ("0-1") where it can; compare CPU by CPU.
            let listed: Vec<String> = said
                .split(':')
                .nth(1)
                .expect("a list")
                .trim()
                .split(',')
                .flat_map(|part| match part.split_once('-') {
                    Some((from, to)) => {
                        let (from, to): (usize, usize) =
                            (from.parse().expect("a CPU"), to.parse().expect("a CPU"));
                        (from..=to).map(|cpu| cpu.to_string()).collect::<Vec<_>>()
                    }
                    None => vec![part.to_owned()],
                })
                .collect();
            assert_eq!(listed, expected, "{said}");
        })
        .join()
        .expect("the pinned thread");
    }
}
