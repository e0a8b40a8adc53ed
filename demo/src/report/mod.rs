//! The demo's outputs: the table, the JSON file, the SVG chart.
//!
//! This file holds the text the demo prints (the table, a run's summary, the errors); `json`
//! the `--json` document, `chart` the `--plot` chart.

mod chart;
mod json;

use std::fmt::Write as _;

use crate::figure::figure;
use crate::results::ModeResult;
pub use chart::plot;
pub use json::json;

/// The table, in plain aligned columns no wider than 100 characters.
pub fn table(results: &[ModeResult]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<9}{:>7}{:>8}{:>10}{:>7}{:>6}{:>8}{:>8}{:>12}{:>12}{:>9}",
        "mode",
        "ok",
        "failed",
        "not sent",
        "wrong",
        "hung",
        "req/s",
        "p99 ms",
        "start CPU s",
        "respawn ms",
        "PSS MiB"
    );
    for result in results {
        if let Some(error) = &result.server_error {
            let _ = writeln!(out, "{:<9}server error: {error}", result.mode);
            continue;
        }
        let _ = writeln!(
            out,
            "{:<9}{:>7}{:>8}{:>10}{:>7}{:>6}{:>8}{:>8}{:>12}{:>12}{:>9}",
            result.mode,
            result.requests_ok,
            result.failed,
            result.not_sent,
            result.wrong_answers,
            format!("{}/{}", result.hung_workers, result.workers),
            figure(result.req_per_s),
            figure(result.p99_latency_ms),
            figure(result.cpu_seconds_starting),
            result
                .respawn_time_ms
                .map_or_else(|| String::from("none"), figure),
            figure(result.total_pss_mib),
        );
    }
    let _ = writeln!(
        out,
        "(hung: workers still busy on one request after the load; start CPU: master and workers \
         until\n every worker has served; respawn: from killing a worker until its replacement \
         serves)"
    );
    out
}

/// One run in a few words, for its progress bar or line.
pub fn summary(result: &ModeResult) -> String {
    match &result.server_error {
        Some(error) => format!("server error: {error}"),
        None => format!(
            "{} ok, {} failed, {} not sent, {} wrong, {} hung",
            result.requests_ok,
            result.failed,
            result.not_sent,
            result.wrong_answers,
            result.hung_workers
        ),
    }
}

/// The errors each mode's requests met, in the order they first appeared.
pub fn errors(results: &[ModeResult]) -> String {
    let mut out = String::new();
    for result in results {
        for (message, count) in &result.errors {
            let _ = writeln!(out, "  {}: {count} × {message}", result.mode);
        }
    }
    out
}
