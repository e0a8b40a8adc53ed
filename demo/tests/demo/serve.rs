//! `prefork-demo serve` on its own: the master replaces each killed worker once.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::run::{demo_binary, lines_of, sqlite_url, wait_with_deadline, DEADLINE};

/// `prefork-demo serve`, read line by line, with a deadline on every wait.
struct Served {
    master: std::process::Child,
    lines: std::sync::mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Served {
    fn start(extra: &[&str]) -> (Served, tempfile::TempDir) {
        let dir = tempfile::tempdir().expect("temporary directory");
        let mut master = Command::new(demo_binary())
            .arg("serve")
            .args(["--database", &sqlite_url(&dir)])
            .args(extra)
            .env_remove("DATABASE_URL")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start prefork-demo serve");
        let lines = lines_of(master.stdout.take().expect("piped stdout"));
        let served = Served {
            master,
            lines,
            seen: Vec::new(),
        };
        (served, dir)
    }

    /// Reads lines until one starts with `prefix`; panics (after killing the master) if none
    /// comes within the deadline.
    fn expect(&mut self, prefix: &str) -> Vec<String> {
        let from = self.seen.len();
        self.read_until(&format!("a {prefix:?} line"), |seen| {
            seen[from..].iter().any(|line| line.starts_with(prefix))
        });
        let line = self.seen.last().expect("the line just read");
        line.split_whitespace().map(str::to_owned).collect()
    }

    /// Reads lines until `done` holds for all read so far; panics (after killing the master)
    /// if it does not within the deadline, naming `what` it waited for.
    fn read_until(&mut self, what: &str, done: impl Fn(&[String]) -> bool) {
        let deadline = Instant::now() + DEADLINE;
        while !done(&self.seen) {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => self.seen.push(line),
                Err(_) => {
                    let _ = self.master.kill();
                    let _ = self.master.wait();
                    panic!(
                        "no {what} within {DEADLINE:?}; the master said {:?}",
                        self.seen
                    );
                }
            }
        }
    }

    /// The pid in each slot, from the master's `status` line.
    fn slot_pids(&mut self) -> Vec<u32> {
        self.say("status");
        self.expect("status")[2..]
            .iter()
            .map(|slot| {
                slot.split(':')
                    .nth(1)
                    .and_then(|pid| pid.parse().ok())
                    .expect("slot:pid")
            })
            .collect()
    }

    fn say(&mut self, line: &str) {
        use std::io::Write;
        let stdin = self.master.stdin.as_mut().expect("piped stdin");
        writeln!(stdin, "{line}").expect("the master's stdin");
    }

    /// Sends `quit`; the master must say `stopped` and exit cleanly.
    fn quit(mut self) {
        self.say("quit");
        self.expect("stopped");
        let status = wait_with_deadline(&mut self.master, "the master");
        assert!(status.success(), "master: {status}; said {:?}", self.seen);
    }
}

/// One request on a connection of its own; the pid of the worker that answered it.
fn answering_pid(port: u16) -> Option<u32> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    stream
        .write_all(b"GET /?n=7 HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
        .ok()?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer).ok()?;
    let (_, pid) = answer.split_once("pid=")?;
    pid.split_whitespace().next()?.parse().ok()
}

fn pid_of(words: &[String]) -> u32 {
    words[2].parse().expect("a pid")
}

#[test]
fn the_master_replaces_a_killed_worker_once_on_its_death_notice() {
    let (mut served, _dir) = Served::start(&["--workers", "2", "--state-mib", "8"]);
    let port: u16 = served.expect("listening")[1].parse().expect("a port");
    let first = [served.expect("spawned"), served.expect("spawned")];
    let victim = first
        .iter()
        .find(|words| words[1] == "0")
        .map(|words| pid_of(words))
        .expect("a worker in slot 0");
    // A worker takes its life lock before anything else, so one that has answered holds it.
    let deadline = Instant::now() + DEADLINE;
    while answering_pid(port) != Some(victim) {
        assert!(Instant::now() < deadline, "worker {victim} never answered");
    }
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(victim as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill the worker");

    // Told by its life lock, reaped, replaced: in whatever order, since the notice and the
    // reaping come from two threads of the master, and either may trigger the replacement.
    let dying = format!("dying 0 {victim}");
    let exited = format!("exited 0 {victim} ");
    let from = served.seen.len();
    served.read_until("the victim's notice, reaping and replacement", |seen| {
        let since_kill = &seen[from..];
        let has = |prefix: &str| since_kill.iter().any(|line| line.starts_with(prefix));
        has(&dying) && has(&exited) && has("spawned 0 ")
    });
    let line_after_kill = |prefix: &str| -> Vec<String> {
        served.seen[from..]
            .iter()
            .find(|line| line.starts_with(prefix))
            .map(|line| line.split_whitespace().map(str::to_owned).collect())
            .expect("read above")
    };
    assert_eq!(line_after_kill(&exited)[3], "signal:SIGKILL");
    let replacement = line_after_kill("spawned 0 ");
    assert_ne!(pid_of(&replacement), victim);
    // … and replaced once, not once per notice: the other slot kept its worker.
    let pids = served.slot_pids();
    assert_eq!(pids.len(), 2, "{pids:?}");
    assert!(pids.contains(&pid_of(&replacement)), "{pids:?}");
    assert!(!pids.contains(&victim), "{pids:?}");
    let spawned_for_slot_0 = served
        .seen
        .iter()
        .filter(|line| line.starts_with("spawned 0 "))
        .count();
    assert_eq!(spawned_for_slot_0, 2, "{:?}", served.seen);
    served.quit();
}

#[test]
fn a_storm_of_kills_leaves_one_worker_per_slot() {
    let (mut served, _dir) = Served::start(&["--workers", "3", "--state-mib", "8"]);
    served.expect("listening");
    served.read_until("three workers", |seen| {
        seen.iter()
            .filter(|line| line.starts_with("spawned "))
            .count()
            == 3
    });
    // Kill whatever the slots hold, ten times over without waiting: some victims are dying
    // already, some replacements are killed before they take their life lock.
    let mut killed = std::collections::BTreeSet::new();
    for _ in 0..10 {
        for pid in served.slot_pids() {
            if killed.insert(pid) {
                nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid as i32),
                    nix::sys::signal::Signal::SIGKILL,
                )
                .expect("kill a worker");
            }
        }
    }
    // Every victim reaped and replaced (the master says `exited` before it forks the
    // replacement, so wait for both) …
    let replaced = 3 + killed.len();
    served.read_until("every victim reaped and replaced", |seen| {
        let spawned = seen
            .iter()
            .filter(|line| line.starts_with("spawned "))
            .count();
        spawned >= replaced
            && killed.iter().all(|pid| {
                seen.iter().any(|line| {
                    let words: Vec<&str> = line.split_whitespace().collect();
                    words.first() == Some(&"exited")
                        && words.get(2) == Some(&pid.to_string().as_str())
                })
            })
    });
    // … exactly once: three live workers, none of them a victim, and one fork per victim
    // beyond the first three.
    let pids = served.slot_pids();
    assert_eq!(pids.len(), 3, "{pids:?}");
    for pid in &pids {
        assert!(
            !killed.contains(pid),
            "{pid} was killed: {pids:?}; {:?}",
            served.seen
        );
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(*pid as i32), None)
            .unwrap_or_else(|error| panic!("worker {pid}: {error}"));
    }
    let spawned = served
        .seen
        .iter()
        .filter(|line| line.starts_with("spawned "))
        .count();
    assert_eq!(spawned, replaced, "{:?}", served.seen);
    served.quit();
}
