//! The README's main command, shrunk: `prefork_demo` on embedded SQLite (no server needed), in
//! every mode and with both kinds of state memory, checked through its `--json` report.
//!
//! Runs the example binary that `cargo test` builds beside the tests
//! (`target/<profile>/examples/prefork_demo`); each run is a separate process tree that the demo
//! reaps itself, and is killed if it outlives its deadline.

use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

const REQUESTS: u64 = 300;
const DEADLINE: Duration = Duration::from_secs(120);

/// The example binary `cargo test` built for this profile.
fn demo_binary() -> PathBuf {
    let test_binary = std::env::current_exe().expect("the test binary's path");
    // target/<profile>/deps/prefork_demo-<hash> -> target/<profile>/examples/prefork_demo
    let profile_dir = test_binary
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target/<profile>/deps");
    let binary = profile_dir.join("examples").join("prefork_demo");
    assert!(
        binary.exists(),
        "{} is missing: run the whole suite (`cargo test --all-features` builds the examples)",
        binary.display()
    );
    binary
}

/// Runs the demo with `extra` arguments on a small SQLite setup and returns its JSON report.
fn run_demo(extra: &[&str]) -> Value {
    let dir = tempfile::tempdir().expect("temporary directory");
    let json = dir.path().join("report.json");
    let mut child = Command::new(demo_binary())
        .args([
            "--database",
            &dir.path().join("demo.db").display().to_string(),
        ])
        .args(["--workers", "2", "--state-mib", "8", "--clients", "2"])
        .args(["--requests", &REQUESTS.to_string()])
        .args(["--json", &json.display().to_string()])
        .args(extra)
        // Without this the demo would use PostgreSQL when the environment names one.
        .env_remove("DATABASE_URL")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start prefork_demo");
    let status = wait_with_deadline(&mut child, "prefork_demo");
    let output = child.wait_with_output().expect("prefork_demo's output");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        status.success(),
        "prefork_demo failed ({status}):\n{stdout}"
    );
    let text = std::fs::read_to_string(&json).expect("the --json report");
    serde_json::from_str(&text).expect("valid JSON")
}

/// Waits for `child` to exit; kills it, reaps it and panics if it outlives the deadline.
fn wait_with_deadline(child: &mut Child, what: &str) -> ExitStatus {
    let started = Instant::now();
    loop {
        if let Some(status) = child.try_wait().expect("wait for a child") {
            return status;
        }
        if started.elapsed() > DEADLINE {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what} still running after {DEADLINE:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn mode<'a>(report: &'a Value, name: &str) -> &'a Value {
    report["modes"]
        .as_array()
        .expect("a modes array")
        .iter()
        .find(|mode| mode["mode"] == name)
        .unwrap_or_else(|| panic!("no {name} mode in {report}"))
}

/// Every request answered right, no worker hung, a replacement that served after the kill.
fn assert_served_everything(report: &Value, name: &str) {
    let mode = mode(report, name);
    assert_eq!(mode["server_error"], Value::Null, "{name}: {mode}");
    assert_eq!(mode["requests_ok"], REQUESTS, "{name}: {mode}");
    assert_eq!(mode["failed"], 0, "{name}: {mode}");
    assert_eq!(mode["wrong_answers"], 0, "{name}: {mode}");
    assert_eq!(mode["hung_workers"], 0, "{name}: {mode}");
    assert!(
        mode["respawn_time_ms"].as_f64().is_some_and(|ms| ms > 0.0),
        "{name}: no replacement served after the kill: {mode}"
    );
    assert!(
        mode["total_pss_mib"].as_f64().is_some_and(|mib| mib > 0.0),
        "{name}: {mode}"
    );
}

#[test]
fn every_mode_on_sqlite_with_heap_state() {
    let report = run_demo(&[]);
    assert_eq!(report["state_memory"], "heap");
    assert_served_everything(&report, "forksafe");
    assert_served_everything(&report, "lazy");
    // Naive r2d2 happens to survive read-only SQLite (see the README); it must still finish.
    assert_eq!(mode(&report, "naive")["server_error"], Value::Null);
    // Lazy workers each build their own state; pre-forked ones share the master's.
    let ratio = mode(&report, "forksafe")["pss_ratio_to_lazy"]
        .as_f64()
        .expect("a PSS ratio");
    assert!(ratio < 1.0, "forksafe used {ratio} × lazy's memory");
}

#[test]
fn forksafe_and_lazy_with_shared_state() {
    let report = run_demo(&["--modes", "forksafe,lazy", "--state-memory", "shared"]);
    assert_eq!(report["state_memory"], "shared");
    assert_served_everything(&report, "forksafe");
    assert_served_everything(&report, "lazy");
}

#[test]
fn forksafe_and_lazy_with_huge_page_state() {
    let report = run_demo(&["--modes", "forksafe,lazy", "--state-memory", "huge"]);
    assert_eq!(report["state_memory"], "huge");
    assert_served_everything(&report, "forksafe");
    assert_served_everything(&report, "lazy");
}

#[test]
fn two_rounds_report_totals_and_medians() {
    let report = run_demo(&["--modes", "forksafe,lazy", "--rounds", "2"]);
    assert_eq!(report["rounds"], 2);
    for name in ["forksafe", "lazy"] {
        let combined = mode(&report, name);
        assert_eq!(combined["requests_ok"], 2 * REQUESTS, "{name}: {combined}");
        assert_eq!(combined["failed"], 0, "{name}: {combined}");
        assert_eq!(combined["wrong_answers"], 0, "{name}: {combined}");
        let rounds = report["each_round"]
            .as_array()
            .and_then(|modes| modes.iter().find(|rounds| rounds[0]["mode"] == name))
            .and_then(Value::as_array)
            .unwrap_or_else(|| panic!("{name}: no rounds in {report}"));
        assert_eq!(rounds.len(), 2, "{name}: {rounds:?}");
        // The median of two is their mean.
        let mean = rounds
            .iter()
            .map(|round| round["req_per_s"].as_f64().expect("req/s"))
            .sum::<f64>()
            / 2.0;
        let median = combined["req_per_s"].as_f64().expect("req/s");
        assert!((median - mean).abs() < 1e-6, "{name}: {median} vs {mean}");
    }
}

/// `prefork_demo serve`, read line by line, with a deadline on every wait.
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
            .args([
                "--database",
                &dir.path().join("demo.db").display().to_string(),
            ])
            .args(extra)
            .env_remove("DATABASE_URL")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start prefork_demo serve");
        let stdout = master.stdout.take().expect("piped stdout");
        let (sender, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
            {
                if sender.send(line).is_err() {
                    break;
                }
            }
        });
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

#[test]
fn bad_arguments_are_refused_with_a_clear_message() {
    const AT_LEAST_1: &str = "--workers, --pool-size, --clients and --rounds must be at least 1";
    const SERVE_AT_LEAST_1: &str = "--workers and --pool-size must be at least 1";
    let refused: [(&[&str], &str); 10] = [
        (&["--workers", "0"], AT_LEAST_1),
        (&["--pool-size", "0"], AT_LEAST_1),
        (&["--rounds", "0"], AT_LEAST_1),
        (&["--clients", "0"], AT_LEAST_1),
        (&["--requests", "many"], "--requests: not a number: many"),
        (
            &["--state-memory", "disk"],
            "unknown state memory \"disk\" (heap, huge or shared)",
        ),
        (&["--modes", "eager"], "unknown mode \"eager\""),
        (&["--frobnicate"], "unknown argument \"--frobnicate\""),
        (
            &["serve", "--workers", "0", "--database", "unused.db"],
            SERVE_AT_LEAST_1,
        ),
        (
            &["serve", "--pool-size", "0", "--database", "unused.db"],
            SERVE_AT_LEAST_1,
        ),
    ];
    for (args, message) in refused {
        let mut child = Command::new(demo_binary())
            .args(args)
            .env_remove("DATABASE_URL")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start prefork_demo");
        let status = wait_with_deadline(&mut child, "prefork_demo");
        let mut stderr = String::new();
        std::io::Read::read_to_string(&mut child.stderr.take().expect("piped"), &mut stderr)
            .expect("its standard error");
        assert_eq!(status.code(), Some(2), "{args:?}: {status}; {stderr}");
        assert_eq!(
            stderr.lines().next(),
            Some(format!("prefork_demo: {message}").as_str()),
            "{args:?}"
        );
    }
}
