//! The demo on SQLite: every mode, every kind of state memory, and two rounds.

use serde_json::Value;

use crate::report::{
    assert_connections_spread_evenly, assert_served_everything, assert_targets_judged, each_round,
    mode, per_round,
};
use crate::run::{run_demo, scratch, sqlite_url, REQUESTS};

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
        let rounds = each_round(report, name);
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
        each_round(report, name)[round]["slice_req_per_s"]
            .as_array()
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
    let reported = per_round(req_per_s);
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
