//! The demo on its default private PostgreSQL server: naive breaks and forksafe does not, and
//! an interrupted run still stops the server and removes its files.

use std::time::Instant;

use serde_json::Value;

use crate::report::{
    assert_connections_spread_evenly, assert_served_everything, assert_targets_judged,
};
use crate::run::{
    demo_command, entries, lines_of, run_demo, scratch, wait_with_deadline, DEADLINE, REQUESTS,
};

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
    let lines = lines_of(child.stdout.take().expect("piped"));
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
