//! Checks of the demo's `--json` report and its verdict lines.

use serde_json::Value;

use crate::run::Run;

pub fn mode<'a>(report: &'a Value, name: &str) -> &'a Value {
    report["modes"]
        .as_array()
        .expect("a modes array")
        .iter()
        .find(|mode| mode["mode"] == name)
        .unwrap_or_else(|| panic!("no {name} mode in {report}"))
}

/// Every request answered right, no worker hung, a replacement that served after the kill.
pub fn assert_served_everything(report: &Value, name: &str, requests: u64) {
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
pub fn assert_targets_judged(run: &Run) {
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
        let per_round = per_round(target);
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
pub fn assert_connections_spread_evenly(report: &Value, name: &str, workers: u64, clients: u64) {
    for round in each_round(report, name) {
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

/// `name`'s rounds, each with its own figures (the report's `each_round`).
pub fn each_round<'a>(report: &'a Value, name: &str) -> &'a [Value] {
    report["each_round"]
        .as_array()
        .and_then(|modes| modes.iter().find(|rounds| rounds[0]["mode"] == name))
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_else(|| panic!("{name}: no rounds in {report}"))
}

/// A verdict target's ratio of each round.
pub fn per_round(target: &Value) -> Vec<f64> {
    target["per_round"]
        .as_array()
        .expect("per-round ratios")
        .iter()
        .map(|ratio| ratio.as_f64().expect("a ratio"))
        .collect()
}
