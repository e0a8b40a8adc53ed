//! The README's main command, shrunk: `prefork_demo` on embedded SQLite (no server needed), in
//! every mode and with both kinds of state memory, checked through its `--json` report.
//!
//! Runs the example binary that `cargo test` builds beside the tests
//! (`target/<profile>/examples/prefork_demo`); each run is a separate process tree that the demo
//! reaps itself, and is killed if it outlives its deadline.

use std::path::PathBuf;
use std::process::{Command, Stdio};
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
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for prefork_demo") {
            break status;
        }
        if started.elapsed() > DEADLINE {
            let _ = child.kill();
            let _ = child.wait();
            panic!("prefork_demo still running after {DEADLINE:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let output = child.wait_with_output().expect("prefork_demo's output");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        status.success(),
        "prefork_demo failed ({status}):\n{stdout}"
    );
    let text = std::fs::read_to_string(&json).expect("the --json report");
    serde_json::from_str(&text).expect("valid JSON")
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
