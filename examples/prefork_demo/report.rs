//! The demo's outputs: the table, the JSON file, the SVG chart.

use std::fmt::Write as _;
use std::path::Path;

use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use serde_json::{json, Value};

use crate::driver::{ModeResult, RunConfig, RESPAWN_LIMIT};

fn optional(value: Option<f64>, decimals: usize) -> String {
    value.map_or_else(
        || String::from("n/a"),
        |value| format!("{value:.decimals$}"),
    )
}

/// The table, as Markdown so it can go straight into a README.
pub fn table(results: &[ModeResult]) -> String {
    let mut out = String::new();
    out += "| mode | requests ok | failed | wrong answers | hung workers | req/s | p99 latency | CPU seconds spent starting | respawn time | total PSS | PSS ratio to lazy |\n";
    out += "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n";
    for result in results {
        if let Some(error) = &result.server_error {
            let _ = writeln!(out, "| {} | server error: {error} |", result.mode);
            continue;
        }
        let started = if result.workers_serving_at_start < result.workers {
            format!(" ({} serving)", result.workers_serving_at_start)
        } else {
            String::new()
        };
        let _ = writeln!(
            out,
            "| {} | {} | {}{} | {} | {} | {:.0} | {:.1} ms | {:.2} s{} | {} | {:.0} MiB | {} |",
            result.mode,
            result.requests_ok,
            result.failed,
            if result.not_sent > 0 {
                format!(" ({} not sent)", result.not_sent)
            } else {
                String::new()
            },
            result.wrong_answers,
            result.hung_workers,
            result.req_per_s,
            result.p99_latency_ms,
            result.cpu_seconds_starting,
            started,
            result.respawn_time_ms.map_or_else(
                || format!("none in {} s", RESPAWN_LIMIT.as_secs()),
                |ms| format!("{ms:.1} ms")
            ),
            result.total_pss_mib,
            optional(result.pss_ratio_to_lazy, 2),
        );
    }
    out
}

/// The errors each mode's requests met, most frequent first.
pub fn errors(results: &[ModeResult]) -> String {
    let mut out = String::new();
    for result in results {
        for (message, count) in &result.errors {
            let _ = writeln!(out, "  {}: {count} × {message}", result.mode);
        }
    }
    out
}

/// Compares every mode with lazy on the targets.
pub fn ratios(results: &[ModeResult]) -> String {
    let Some(lazy) = results
        .iter()
        .find(|result| result.mode == "lazy" && result.server_error.is_none())
    else {
        return String::new();
    };
    let mut out = String::new();
    for result in results
        .iter()
        .filter(|result| result.mode != "lazy" && result.server_error.is_none())
    {
        let ratio = |value: f64, of: f64| {
            if of > 0.0 {
                format!("{:.2}×", value / of)
            } else {
                String::from("n/a")
            }
        };
        let _ = writeln!(
            out,
            "  {} vs lazy: total PSS {}, CPU spent starting {}, respawn time {}, req/s {}",
            result.mode,
            ratio(result.total_pss_mib, lazy.total_pss_mib),
            ratio(result.cpu_seconds_starting, lazy.cpu_seconds_starting),
            match (result.respawn_time_ms, lazy.respawn_time_ms) {
                (Some(mode), Some(lazy)) => ratio(mode, lazy),
                _ => String::from("n/a"),
            },
            ratio(result.req_per_s, lazy.req_per_s),
        );
    }
    out
}

/// One mode's rounds as one result: the median of every figure, the total of every count, the
/// most hung workers and the fewest serving at start any round saw. One round is itself.
pub fn combine(rounds: &[ModeResult]) -> ModeResult {
    if let [only] = rounds {
        return only.clone();
    }
    let median = |value: fn(&ModeResult) -> Option<f64>| {
        let mut values: Vec<f64> = rounds.iter().filter_map(value).collect();
        values.sort_by(f64::total_cmp);
        match values.len() {
            0 => None,
            n if n % 2 == 1 => Some(values[n / 2]),
            n => Some((values[n / 2 - 1] + values[n / 2]) / 2.0),
        }
    };
    let mut errors: Vec<(String, u64)> = Vec::new();
    for (message, count) in rounds.iter().flat_map(|round| &round.errors) {
        match errors.iter_mut().find(|(seen, _)| seen == message) {
            Some((_, total)) => *total += count,
            None => errors.push((message.clone(), *count)),
        }
    }
    errors.sort_by_key(|(_, count)| std::cmp::Reverse(*count));
    ModeResult {
        mode: rounds[0].mode,
        workers: rounds[0].workers,
        requests_ok: rounds.iter().map(|round| round.requests_ok).sum(),
        failed: rounds.iter().map(|round| round.failed).sum(),
        not_sent: rounds.iter().map(|round| round.not_sent).sum(),
        wrong_answers: rounds.iter().map(|round| round.wrong_answers).sum(),
        hung_workers: rounds
            .iter()
            .map(|round| round.hung_workers)
            .max()
            .unwrap_or(0),
        req_per_s: median(|round| Some(round.req_per_s)).unwrap_or(0.0),
        p99_latency_ms: median(|round| Some(round.p99_latency_ms)).unwrap_or(0.0),
        cpu_seconds_starting: median(|round| Some(round.cpu_seconds_starting)).unwrap_or(0.0),
        workers_serving_at_start: rounds
            .iter()
            .map(|round| round.workers_serving_at_start)
            .min()
            .unwrap_or(0),
        respawn_time_ms: median(|round| round.respawn_time_ms),
        respawn_forked_ms: median(|round| round.respawn_forked_ms),
        total_pss_mib: median(|round| Some(round.total_pss_mib)).unwrap_or(0.0),
        pss_ratio_to_lazy: None,
        errors,
        server_error: rounds.iter().find_map(|round| round.server_error.clone()),
    }
}

/// The JSON document: the run's settings, one object per mode under `"modes"` (each round
/// combined), and each round's main figures under `"each_round"`.
pub fn json(
    results: &[ModeResult],
    runs: &[Vec<ModeResult>],
    config: &RunConfig,
    machine: &Value,
) -> Value {
    let modes: Vec<Value> = results
        .iter()
        .map(|result| {
            json!({
                "mode": result.mode,
                "requests_ok": result.requests_ok,
                "failed": result.failed,
                "not_sent": result.not_sent,
                "wrong_answers": result.wrong_answers,
                "hung_workers": result.hung_workers,
                "req_per_s": result.req_per_s,
                "p99_latency_ms": result.p99_latency_ms,
                "cpu_seconds_starting": result.cpu_seconds_starting,
                "workers_serving_at_start": result.workers_serving_at_start,
                "respawn_time_ms": result.respawn_time_ms,
                "respawn_forked_ms": result.respawn_forked_ms,
                "total_pss_mib": result.total_pss_mib,
                "pss_ratio_to_lazy": result.pss_ratio_to_lazy,
                "errors": result.errors.iter().map(|(message, count)| json!({"message": message, "count": count})).collect::<Vec<_>>(),
                "server_error": result.server_error,
            })
        })
        .collect();
    json!({
        "database": config.database.describe(),
        "workers": config.workers,
        "state_mib": config.table_mib,
        "state_memory": config.state_memory.name(),
        "pool_size": config.pool_size,
        "requests": config.requests,
        "clients": config.clients,
        "request_timeout_ms": config.request_timeout.as_millis() as u64,
        "machine": machine,
        "rounds": runs.first().map_or(0, Vec::len),
        "modes": modes,
        "each_round": runs
            .iter()
            .map(|rounds| {
                rounds
                    .iter()
                    .map(|round| {
                        json!({
                            "mode": round.mode,
                            "req_per_s": round.req_per_s,
                            "cpu_seconds_starting": round.cpu_seconds_starting,
                            "respawn_time_ms": round.respawn_time_ms,
                            "total_pss_mib": round.total_pss_mib,
                        })
                    })
                    .collect::<Vec<_>>()
            })
            .collect::<Vec<_>>(),
    })
}

struct Metric {
    title: &'static str,
    value: fn(&ModeResult) -> Option<f64>,
    format: fn(f64) -> String,
}

const METRICS: [Metric; 6] = [
    Metric {
        title: "requests per second (higher is better)",
        value: |r| Some(r.req_per_s),
        format: |v| format!("{v:.0}"),
    },
    Metric {
        title: "failed + wrong answers",
        value: |r| Some((r.failed + r.wrong_answers) as f64),
        format: |v| format!("{v:.0}"),
    },
    Metric {
        title: "total PSS, MiB",
        value: |r| Some(r.total_pss_mib),
        format: |v| format!("{v:.0}"),
    },
    Metric {
        title: "CPU seconds spent starting",
        value: |r| Some(r.cpu_seconds_starting),
        format: |v| format!("{v:.2}"),
    },
    Metric {
        title: "respawn time, ms",
        value: |r| r.respawn_time_ms,
        format: |v| format!("{v:.1}"),
    },
    Metric {
        title: "p99 latency, ms",
        value: |r| Some(r.p99_latency_ms),
        format: |v| format!("{v:.1}"),
    },
];

fn color(mode: &str) -> RGBColor {
    match mode {
        "naive" => RGBColor(0xd6, 0x45, 0x45),
        "forksafe" => RGBColor(0x2e, 0x8b, 0x57),
        _ => RGBColor(0x6b, 0x7b, 0x8c),
    }
}

/// Draws one bar chart per metric, the modes side by side, into an SVG file.
pub fn plot(
    results: &[ModeResult],
    title: &str,
    path: &Path,
) -> Result<(), Box<dyn std::error::Error>> {
    let results: Vec<&ModeResult> = results
        .iter()
        .filter(|result| result.server_error.is_none())
        .collect();
    let root = SVGBackend::new(path, (1200, 720)).into_drawing_area();
    root.fill(&WHITE)?;
    let root = root.titled(title, ("sans-serif", 20))?;
    for (panel, metric) in root.split_evenly((2, 3)).iter().zip(&METRICS) {
        let values: Vec<Option<f64>> = results
            .iter()
            .map(|result| (metric.value)(result))
            .collect();
        let top = values.iter().flatten().copied().fold(0.0_f64, f64::max);
        // An all-zero panel (no failures) still gets a readable 0..1 axis.
        let top = if top > 0.0 { top * 1.2 } else { 1.0 };
        let mut chart = ChartBuilder::on(panel)
            .caption(metric.title, ("sans-serif", 15))
            .margin(12)
            .x_label_area_size(28)
            .y_label_area_size(56)
            .build_cartesian_2d(
                (0..results.len().saturating_sub(1)).into_segmented(),
                0.0..top,
            )?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .light_line_style(TRANSPARENT)
            .y_labels(if top == 1.0 { 2 } else { 6 })
            .x_label_formatter(&|x| match x {
                SegmentValue::CenterOf(index) => results
                    .get(*index)
                    .map_or(String::new(), |r| r.mode.to_owned()),
                _ => String::new(),
            })
            .y_label_formatter(&|y| (metric.format)(*y))
            .draw()?;
        chart.draw_series(results.iter().zip(&values).enumerate().map(
            |(index, (result, value))| {
                let mut bar = Rectangle::new(
                    [
                        (SegmentValue::Exact(index), 0.0),
                        (SegmentValue::Exact(index + 1), value.unwrap_or(0.0)),
                    ],
                    color(result.mode).filled(),
                );
                bar.set_margin(0, 0, 14, 14);
                bar
            },
        ))?;
        chart.draw_series(values.iter().enumerate().map(|(index, value)| {
            let label = value.map_or_else(|| String::from("none"), metric.format);
            let y = value.unwrap_or(0.0) + top * 0.02;
            Text::new(
                label,
                (SegmentValue::CenterOf(index), y),
                ("sans-serif", 13)
                    .into_font()
                    .color(&BLACK)
                    .pos(Pos::new(HPos::Center, VPos::Bottom)),
            )
        }))?;
    }
    root.present()?;
    Ok(())
}
