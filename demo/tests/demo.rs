//! The README's demo command, shrunk: on its default private PostgreSQL server (naive breaks,
//! forksafe does not), on SQLite in every mode and with every kind of state memory, interrupted,
//! and given bad input; checked through its verdict lines and its `--json` report, and for
//! what it leaves behind (nothing) in its temporary directory.
//!
//! Each run is a separate process tree that the demo reaps itself, and is killed if it outlives
//! its deadline.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

const REQUESTS: u64 = 300;
const DEADLINE: Duration = Duration::from_secs(180);

fn demo_binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_prefork-demo"))
}

/// A directory the demo's own temporary files go to (`TMPDIR`), to check it leaves none.
fn scratch() -> tempfile::TempDir {
    tempfile::tempdir().expect("temporary directory")
}

/// What `dir` holds, by name.
fn entries(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .expect("read the directory")
        .map(|entry| {
            entry
                .expect("an entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .collect()
}

/// The demo, with `args`, temporary files under `tmp`, and no `DATABASE_URL`.
fn demo_command(args: &[&str], tmp: &Path) -> Command {
    let mut command = Command::new(demo_binary());
    command
        .args(args)
        .env_remove("DATABASE_URL")
        .env("TMPDIR", tmp)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    command
}

/// A finished run: its exit status, what it printed, and its JSON report.
struct Run {
    stdout: String,
    report: Value,
}

impl Run {
    /// The line of the verdict (the lines after `verdict:`) that starts with `prefix`.
    fn verdict_line(&self, prefix: &str) -> &str {
        self.stdout
            .lines()
            .skip_while(|line| *line != "verdict:")
            .find(|line| line.starts_with(prefix))
            .unwrap_or_else(|| panic!("no line starting {prefix:?} in:\n{}", self.stdout))
    }
}

/// Runs the demo with a small setup plus `extra`, checks it succeeded and left no temporary
/// file, and returns what it printed and its JSON report.
fn run_demo(database: Option<&str>, extra: &[&str]) -> Run {
    let tmp = scratch();
    let out = scratch();
    let json = out.path().join("report.json");
    let json_arg = json.display().to_string();
    let requests = REQUESTS.to_string();
    let small = [
        ["--workers", "2"],
        ["--state-mib", "8"],
        ["--clients", "2"],
        ["--requests", &requests],
    ];
    let mut args = vec!["--json", &json_arg];
    for [flag, value] in small {
        if !extra.contains(&flag) {
            args.extend([flag, value]);
        }
    }
    if let Some(database) = database {
        args.extend(["--database", database]);
    }
    args.extend(extra);
    let mut child = demo_command(&args, tmp.path())
        .spawn()
        .expect("start prefork-demo");
    let (status, stdout, stderr) = finish(&mut child, "prefork-demo");
    assert!(
        status.success(),
        "prefork-demo failed ({status}):\n{stdout}\n{stderr}"
    );
    assert_eq!(entries(tmp.path()), Vec::<String>::new(), "left behind");
    assert!(
        out.path().join("report.svg").is_file(),
        "no chart beside the JSON: {stdout}"
    );
    let text = std::fs::read_to_string(&json).expect("the --json report");
    Run {
        stdout,
        report: serde_json::from_str(&text).expect("valid JSON"),
    }
}

/// Waits for `child` (reading its output meanwhile); kills it and panics if it outlives the
/// deadline.
fn finish(child: &mut Child, what: &str) -> (ExitStatus, String, String) {
    let stdout = read_in_background(child.stdout.take());
    let stderr = read_in_background(child.stderr.take());
    let status = wait_with_deadline(child, what);
    let text = |reader: std::thread::JoinHandle<String>| reader.join().expect("reader");
    (status, text(stdout), text(stderr))
}

fn read_in_background(
    stream: Option<impl std::io::Read + Send + 'static>,
) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut text = String::new();
        if let Some(mut stream) = stream {
            let _ = stream.read_to_string(&mut text);
        }
        text
    })
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
fn assert_served_everything(report: &Value, name: &str, requests: u64) {
    let mode = mode(report, name);
    assert_eq!(mode["server_error"], Value::Null, "{name}: {mode}");
    assert_eq!(mode["requests_ok"], requests, "{name}: {mode}");
    assert_eq!(mode["failed"], 0, "{name}: {mode}");
    assert_eq!(mode["not_sent"], 0, "{name}: {mode}");
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

/// The verdict's four targets, in order: each with the median of its rounds' ratios, an
/// interval around it when there were rounds enough, and a verdict that follows from where
/// that interval lies against the bound; and a row for each under the `vs lazy:` heading.
fn assert_targets_judged(run: &Run) {
    let targets = run.report["verdict"]["targets"]
        .as_array()
        .expect("verdict targets");
    let names: Vec<&str> = targets
        .iter()
        .map(|target| target["name"].as_str().expect("a name"))
        .collect();
    assert_eq!(names, ["PSS", "start-up CPU", "respawn", "req/s"]);
    let rounds = run.report["rounds"].as_u64().expect("rounds");
    for target in targets {
        let per_round: Vec<f64> = target["per_round"]
            .as_array()
            .expect("per-round ratios")
            .iter()
            .map(|ratio| ratio.as_f64().expect("a ratio"))
            .collect();
        assert_eq!(per_round.len() as u64, rounds, "{target}");
        let ratio = target["ratio_to_lazy"].as_f64().expect("a ratio");
        let bound = target["bound"].as_f64().expect("a bound");
        let (low, high) = if rounds > 1 {
            let low = target["interval_low"].as_f64().expect("an interval");
            let high = target["interval_high"].as_f64().expect("an interval");
            assert!(low <= ratio && ratio <= high, "{target}");
            (low, high)
        } else {
            assert_eq!(target["interval_low"], Value::Null, "{target}");
            (ratio, ratio)
        };
        let keeps = |value: f64| {
            if target["at_most"] == true {
                value <= bound
            } else {
                value >= bound
            }
        };
        let verdict = match (keeps(low), keeps(high)) {
            (true, true) => "met",
            (false, false) => "not met",
            _ => "within noise",
        };
        assert_eq!(target["verdict"], verdict, "{target}");
        assert_eq!(target["met"], verdict == "met", "{target}");
        let name = target["name"].as_str().expect("a name");
        let row = run.verdict_line(&format!("          {name} "));
        let shown = if verdict == "not met" {
            "NOT met"
        } else {
            verdict
        };
        assert!(row.ends_with(shown), "{row}");
    }
    let heading = run.verdict_line("vs lazy:  forksafe's figure ÷ lazy's");
    assert!(heading.contains(&format!("{rounds} round")), "{heading}");
    run.verdict_line("          figure ");
    for line in run.stdout.lines().skip_while(|line| *line != "verdict:") {
        if !line.starts_with("wrote ") {
            assert!(line.chars().count() <= 100, "wider than 100: {line:?}");
        }
    }
}

/// Every round's connections were spread evenly over the workers: as many workers as
/// connections allow held some, and none held two more than another.
fn assert_connections_spread_evenly(report: &Value, name: &str, workers: u64, clients: u64) {
    let rounds = report["each_round"]
        .as_array()
        .and_then(|modes| modes.iter().find(|rounds| rounds[0]["mode"] == name))
        .and_then(Value::as_array)
        .unwrap_or_else(|| panic!("{name}: no rounds in {report}"));
    for round in rounds {
        let spread: Vec<u64> = round["connections_per_worker"]
            .as_array()
            .expect("connections per worker")
            .iter()
            .map(|count| count.as_u64().expect("a count"))
            .collect();
        assert_eq!(spread.len() as u64, workers.min(clients), "{name}: {round}");
        assert_eq!(spread.iter().sum::<u64>(), clients, "{name}: {round}");
        assert!(spread[0] - spread[spread.len() - 1] <= 1, "{name}: {round}");
    }
}

/// The SQLite file the demo runs on in these tests (it must exist or be named `sqlite://`).
fn sqlite_url(dir: &tempfile::TempDir) -> String {
    format!("sqlite://{}", dir.path().join("demo.db").display())
}

#[test]
fn every_mode_on_sqlite_with_heap_state() {
    let db = scratch();
    let run = run_demo(Some(&sqlite_url(&db)), &["--rounds", "1"]);
    let report = &run.report;
    assert_eq!(report["state_memory"], "heap");
    assert_served_everything(report, "forksafe", REQUESTS);
    assert_served_everything(report, "lazy", REQUESTS);
    for name in ["naive", "forksafe", "lazy"] {
        assert_connections_spread_evenly(report, name, 2, 2);
    }
    // Naive r2d2 survives SQLite, which shares no protocol stream; the verdict says why.
    assert_eq!(mode(report, "naive")["server_error"], Value::Null);
    assert_eq!(report["verdict"]["naive_broke"], false, "{report}");
    assert_eq!(report["verdict"]["forksafe_all_right"], true, "{report}");
    assert!(run
        .verdict_line("naive:    ")
        .contains("did not break: SQLite shares no connection stream"));
    assert_eq!(
        run.verdict_line("forksafe: "),
        format!(
            "forksafe: every request answered right ({REQUESTS} of {REQUESTS}), no worker hung"
        )
    );
    assert_targets_judged(&run);
    // Lazy workers each build their own state; pre-forked ones share the master's.
    let ratio = mode(report, "forksafe")["pss_ratio_to_lazy"]
        .as_f64()
        .expect("a PSS ratio");
    assert!(ratio < 1.0, "forksafe used {ratio} × lazy's memory");
    for line in run
        .stdout
        .lines()
        .skip_while(|line| !line.starts_with("mode "))
    {
        assert!(line.chars().count() <= 100, "wider than 100: {line:?}");
    }
}

/// forksafe and lazy, one round, with the state in `memory`: the report names it and both
/// modes serve every request.
fn forksafe_and_lazy_with_state_in(memory: &str) {
    let db = scratch();
    let run = run_demo(
        Some(&sqlite_url(&db)),
        &[
            "--modes",
            "forksafe,lazy",
            "--state-memory",
            memory,
            "--rounds",
            "1",
        ],
    );
    assert_eq!(run.report["state_memory"], memory);
    assert_served_everything(&run.report, "forksafe", REQUESTS);
    assert_served_everything(&run.report, "lazy", REQUESTS);
    assert_connections_spread_evenly(&run.report, "forksafe", 2, 2);
    assert_connections_spread_evenly(&run.report, "lazy", 2, 2);
}

#[test]
fn forksafe_and_lazy_with_shared_state() {
    forksafe_and_lazy_with_state_in("shared");
}

#[test]
fn forksafe_and_lazy_with_huge_page_state() {
    forksafe_and_lazy_with_state_in("huge");
}

#[test]
fn two_rounds_report_totals_and_medians_and_the_interval_of_their_ratios() {
    let db = scratch();
    let run = run_demo(Some(&sqlite_url(&db)), &["--rounds", "2"]);
    let report = &run.report;
    assert_eq!(report["rounds"], 2);
    // Naive runs once; forksafe and lazy once per round.
    assert_eq!(mode(report, "naive")["requests_ok"], REQUESTS);
    for name in ["forksafe", "lazy"] {
        let combined = mode(report, name);
        assert_served_everything(report, name, 2 * REQUESTS);
        assert_connections_spread_evenly(report, name, 2, 2);
        let rounds = report["each_round"]
            .as_array()
            .and_then(|modes| modes.iter().find(|rounds| rounds[0]["mode"] == name))
            .and_then(Value::as_array)
            .unwrap_or_else(|| panic!("{name}: no rounds in {report}"));
        assert_eq!(rounds.len(), 2, "{name}: {rounds:?}");
        let req_per_s: Vec<f64> = rounds
            .iter()
            .map(|round| round["req_per_s"].as_f64().expect("req/s"))
            .collect();
        // The median of two is their mean.
        let median = combined["req_per_s"].as_f64().expect("req/s");
        let mean = (req_per_s[0] + req_per_s[1]) / 2.0;
        assert!((median - mean).abs() < 1e-6, "{name}: {median} vs {mean}");
    }
    // Each round's ratio is the median of its slices' ratios, forksafe's to lazy's, turn by
    // turn; with two rounds the interval is their range, of 50 % confidence.
    let slices = |name: &str, round: usize| -> Vec<f64> {
        report["each_round"]
            .as_array()
            .and_then(|modes| modes.iter().find(|rounds| rounds[0]["mode"] == name))
            .and_then(|rounds| rounds[round]["slice_req_per_s"].as_array())
            .expect("slices")
            .iter()
            .map(|rate| rate.as_f64().expect("req/s"))
            .collect()
    };
    let ratios: Vec<f64> = (0..2)
        .map(|round| {
            let mut ratios: Vec<f64> = slices("forksafe", round)
                .iter()
                .zip(slices("lazy", round))
                .map(|(forksafe, lazy)| forksafe / lazy)
                .collect();
            assert_eq!(ratios.len(), 8, "{report}");
            ratios.sort_by(f64::total_cmp);
            (ratios[3] + ratios[4]) / 2.0
        })
        .collect();
    let req_per_s = &report["verdict"]["targets"][3];
    let reported: Vec<f64> = req_per_s["per_round"]
        .as_array()
        .expect("per-round ratios")
        .iter()
        .map(|ratio| ratio.as_f64().expect("a ratio"))
        .collect();
    assert_eq!(reported.len(), 2, "{req_per_s}");
    for (reported, ratio) in reported.iter().zip(&ratios) {
        assert!((reported - ratio).abs() < 1e-9, "{req_per_s}");
    }
    let low = req_per_s["interval_low"].as_f64().expect("low");
    let high = req_per_s["interval_high"].as_f64().expect("high");
    assert!((low - ratios[0].min(ratios[1])).abs() < 1e-9, "{req_per_s}");
    assert!(
        (high - ratios[0].max(ratios[1])).abs() < 1e-9,
        "{req_per_s}"
    );
    assert_eq!(req_per_s["confidence"], 0.5, "{req_per_s}");
    assert_targets_judged(&run);
    run.verdict_line("          figure         ratio  50 % interval  target  verdict");
}

/// The PostgreSQL server binaries the demo looks for, as it does (Debian's directory, `PATH`).
fn postgres_installed() -> bool {
    let debian = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .any(|entry| entry.path().join("bin/postgres").is_file());
    let on_path = std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .any(|dir| dir.join("postgres").is_file() && dir.join("initdb").is_file());
    if debian || on_path {
        return true;
    }
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "no PostgreSQL server binaries, and CI=true: install postgresql"
    );
    eprintln!("skipped: no PostgreSQL server binaries");
    false
}

/// The private server's port, from the database the report names.
fn private_port(report: &Value) -> u16 {
    let database = report["database"].as_str().expect("a database");
    let (_, after) = database.split_once("@127.0.0.1:").expect("a loopback URL");
    after[..after.find('/').expect("a path")]
        .parse()
        .expect("a port")
}

fn assert_nothing_listens(port: u16) {
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
        "something still listens on the private server's port {port}"
    );
}

#[test]
fn by_default_naive_breaks_on_a_private_postgres_and_forksafe_does_not() {
    if !postgres_installed() {
        return;
    }
    // A timeout long enough that forksafe's answers arrive in time on a busy machine; naive's
    // hung workers still end its load after a few of them.
    let run = run_demo(
        None,
        &[
            "--rounds",
            "1",
            // Clients enough for every worker to hold connections, so that they use the
            // connections they share at the same time, as they do in production.
            "--workers",
            "3",
            "--clients",
            "8",
            "--timeout-ms",
            "5000",
            "--load-time-limit-s",
            "60",
        ],
    );
    let report = &run.report;
    assert!(
        report["database"]
            .as_str()
            .is_some_and(|database| database.starts_with("PostgreSQL (postgres://")),
        "{report}"
    );
    assert!(run.stdout.contains("TLS on"), "{}", run.stdout);
    assert_eq!(report["verdict"]["naive_broke"], true, "{report}");
    assert_eq!(report["verdict"]["forksafe_all_right"], true, "{report}");
    let naive = run.verdict_line("naive:    ");
    assert!(naive.starts_with("naive:    BROKE: "), "{naive}");
    let first_errors = report["verdict"]["naive_first_errors"]
        .as_array()
        .expect("naive's first errors");
    assert!(!first_errors.is_empty(), "{report}");
    // The driver's words, or, when its workers hung without one, that they hung.
    let first = first_errors[0].as_str().expect("a message");
    if first == "request timed out" {
        run.verdict_line("          no error message: its workers hung mid-request");
    } else {
        // Shown whole, or cut to fit 100 columns.
        let shown = run.verdict_line("          first errors: \"");
        let start: String = first.chars().take(40).collect();
        assert!(shown.contains(&start), "{}", run.stdout);
        assert!(shown.chars().count() <= 100, "{shown}");
    }
    assert_eq!(
        run.verdict_line("forksafe: "),
        format!(
            "forksafe: every request answered right ({REQUESTS} of {REQUESTS}), no worker hung"
        )
    );
    assert_served_everything(report, "forksafe", REQUESTS);
    assert_connections_spread_evenly(report, "forksafe", 3, 8);
    assert_connections_spread_evenly(report, "lazy", 3, 8);
    assert_targets_judged(&run);
    assert_nothing_listens(private_port(report));
}

#[test]
fn an_interrupted_run_stops_its_private_postgres_and_removes_its_files() {
    if !postgres_installed() {
        return;
    }
    let tmp = scratch();
    let mut child = demo_command(&["--workers", "2", "--state-mib", "8"], tmp.path())
        .spawn()
        .expect("start prefork-demo");
    let stdout = child.stdout.take().expect("piped");
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
    // Interrupted in the middle of naive's load, with the server and the workers busy.
    let mut seen = Vec::new();
    let deadline = Instant::now() + DEADLINE;
    while !seen
        .iter()
        .any(|line: &String| line.starts_with("naive") && line.contains("load"))
    {
        match lines.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(line) => seen.push(line),
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("the load never started: {seen:?}");
            }
        }
    }
    assert!(
        !entries(tmp.path()).is_empty(),
        "no private server directory: {seen:?}"
    );
    let port: u16 = seen
        .iter()
        .find_map(|line| {
            let (_, after) = line.split_once("@127.0.0.1:")?;
            after.split('/').next()?.parse().ok()
        })
        .unwrap_or_else(|| panic!("no server URL in {seen:?}"));
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .expect("interrupt the demo");
    let status = wait_with_deadline(&mut child, "the interrupted demo");
    assert_eq!(status.code(), Some(128 + 2), "{status}; said {seen:?}");
    assert_eq!(entries(tmp.path()), Vec::<String>::new(), "left behind");
    assert_nothing_listens(port);
}

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
    const AT_LEAST_1: &str = "--workers and --pool-size must be at least 1";
    const NOT_A_DATABASE: &str = "neither a postgres:// or postgresql:// URL, nor a sqlite:// or \
                                  file: name, nor an existing SQLite file";
    let refused: [(&[&str], &str); 14] = [
        (&["--workers", "0"], AT_LEAST_1),
        (&["--pool-size", "0"], AT_LEAST_1),
        (
            &["--workers", "100000"],
            "--workers 100000: at most 512 (each worker copies the master's page tables)",
        ),
        (
            &["--rounds", "0"],
            "--clients and --rounds must be at least 1",
        ),
        (
            &["--clients", "0"],
            "--clients and --rounds must be at least 1",
        ),
        (&["--requests", "many"], "--requests: not a number: many"),
        (
            &["--state-memory", "disk"],
            "unknown state memory \"disk\" (heap, huge or shared)",
        ),
        (&["--modes", "eager"], "unknown mode \"eager\""),
        (&["--frobnicate"], "unknown argument \"--frobnicate\""),
        (
            &["--database", "mysql://root:secret@127.0.0.1/test"],
            &format!("--database \"mysql://root:***@127.0.0.1/test\": {NOT_A_DATABASE}"),
        ),
        (
            &["--database", "this is not a url"],
            &format!("--database \"this is not a url\": {NOT_A_DATABASE}"),
        ),
        (
            &[
                "serve",
                "--workers",
                "0",
                "--database",
                "sqlite://unused.db",
            ],
            AT_LEAST_1,
        ),
        (
            &[
                "serve",
                "--pool-size",
                "0",
                "--database",
                "sqlite://unused.db",
            ],
            AT_LEAST_1,
        ),
        (
            &["serve", "--database", "unused.db"],
            &format!("--database \"unused.db\": {NOT_A_DATABASE}"),
        ),
    ];
    for (args, message) in refused {
        // Run where a file created by mistake would show.
        let cwd = scratch();
        let tmp = scratch();
        let mut command = demo_command(args, tmp.path());
        let mut child = command
            .current_dir(cwd.path())
            .spawn()
            .expect("start prefork-demo");
        let (status, _, stderr) = finish(&mut child, "prefork-demo");
        assert_eq!(status.code(), Some(2), "{args:?}: {status}; {stderr}");
        assert_eq!(
            stderr.lines().next(),
            Some(format!("prefork-demo: {message}").as_str()),
            "{args:?}"
        );
        assert!(!stderr.contains("secret"), "{stderr}");
        assert_eq!(
            entries(cwd.path()),
            Vec::<String>::new(),
            "{args:?} made files"
        );
        assert_eq!(
            entries(tmp.path()),
            Vec::<String>::new(),
            "{args:?} left files"
        );
    }
}

#[test]
fn a_run_time_error_is_one_line_without_the_password() {
    let tmp = scratch();
    // Nothing listens on port 1 of the loopback address: the connection is refused at once.
    let mut child = demo_command(
        &[
            "--database",
            "postgres://demo:secret@127.0.0.1:1/demo?password=secret2",
        ],
        tmp.path(),
    )
    .spawn()
    .expect("start prefork-demo");
    let (status, stdout, stderr) = finish(&mut child, "prefork-demo");
    assert_eq!(status.code(), Some(1), "{status}; {stdout}; {stderr}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 1, "{stdout}");
    assert!(lines[0].contains("Connection refused"), "{stdout}");
    assert!(
        lines[0].starts_with(
            "prefork-demo: cannot prepare PostgreSQL \
             (postgres://demo:***@127.0.0.1:1/demo?password=***): "
        ),
        "{stdout}"
    );
    assert!(
        !stdout.contains("secret") && !stderr.contains("secret"),
        "{stdout}{stderr}"
    );
    assert!(
        !stdout.contains("USAGE") && !stderr.contains("USAGE"),
        "{stdout}{stderr}"
    );
    assert_eq!(entries(tmp.path()), Vec::<String>::new(), "left behind");
}
