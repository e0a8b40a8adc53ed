//! The `--plot` chart: one bar chart per figure, the modes side by side, in an SVG file.

use std::path::Path;

use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use crate::figure::figure;
use crate::results::ModeResult;

struct Metric {
    title: &'static str,
    /// The y axis: what is counted, and its unit.
    unit: &'static str,
    higher_is_better: bool,
    /// Whether the values are counts, labelled as whole numbers.
    count: bool,
    value: fn(&ModeResult) -> Option<f64>,
}

const METRICS: [Metric; 9] = [
    Metric {
        title: "throughput",
        unit: "requests per second",
        higher_is_better: true,
        count: false,
        value: |r| Some(r.req_per_s),
    },
    Metric {
        title: "p99 latency",
        unit: "milliseconds",
        higher_is_better: false,
        count: false,
        value: |r| Some(r.p99_latency_ms),
    },
    Metric {
        title: "hung workers (busy on one request after the load)",
        unit: "workers",
        higher_is_better: false,
        count: true,
        value: |r| Some(r.hung_workers as f64),
    },
    Metric {
        title: "failed (sent; error or timeout)",
        unit: "requests",
        higher_is_better: false,
        count: true,
        value: |r| Some(r.failed as f64),
    },
    Metric {
        title: "never sent (time limit, or server stopped answering)",
        unit: "requests",
        higher_is_better: false,
        count: true,
        value: |r| Some(r.not_sent as f64),
    },
    Metric {
        title: "wrong answers (another request's reply)",
        unit: "requests",
        higher_is_better: false,
        count: true,
        value: |r| Some(r.wrong_answers as f64),
    },
    Metric {
        title: "total memory, master + workers (PSS)",
        unit: "MiB",
        higher_is_better: false,
        count: false,
        value: |r| Some(r.total_pss_mib),
    },
    Metric {
        title: "CPU to start until every worker serves",
        unit: "CPU seconds",
        higher_is_better: false,
        count: false,
        value: |r| Some(r.cpu_seconds_starting),
    },
    Metric {
        title: "respawn: worker killed until replacement serves",
        unit: "milliseconds",
        higher_is_better: false,
        count: false,
        value: |r| r.respawn_time_ms,
    },
];

/// What the modes are, under the chart.
const CAPTION: [&str; 4] = [
    "naive: a plain r2d2::Pool built in the master before fork(); the workers inherit it",
    "forksafe: a forksafe_pool::Pool built in the master before fork(); the workers inherit it",
    "lazy: every worker builds its own application, pool and state after fork() (uWSGI --lazy-apps)",
    "Figures are medians over the rounds, counts are totals; naive runs once, before the rounds.",
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
    let root = SVGBackend::new(path, (1350, 1040)).into_drawing_area();
    root.fill(&WHITE)?;
    let root = root.titled(title, ("sans-serif", 20))?;
    let (panels, caption) = root.split_vertically(root.dim_in_pixel().1 - 96);
    for (panel, metric) in panels.split_evenly((3, 3)).iter().zip(&METRICS) {
        let values: Vec<Option<f64>> = results
            .iter()
            .map(|result| (metric.value)(result))
            .collect();
        let top = values.iter().flatten().copied().fold(0.0_f64, f64::max);
        // An all-zero panel (nothing failed) still gets a readable 0..1 axis; a count's axis
        // ends on a whole number, with a tick per number while they are few.
        let top = match (top > 0.0, metric.count) {
            (false, _) => 1.0,
            (true, false) => top * 1.2,
            (true, true) => (top * 1.2).ceil().max(top + 1.0),
        };
        let ticks = if metric.count && top <= 6.0 {
            top as usize + 1
        } else if top == 1.0 {
            2
        } else {
            6
        };
        let label = |value: f64| {
            if metric.count {
                format!("{value:.0}")
            } else {
                figure(value)
            }
        };
        let better = if metric.higher_is_better {
            "higher is better"
        } else {
            "lower is better"
        };
        let mut chart = ChartBuilder::on(panel)
            .caption(format!("{} ({better})", metric.title), ("sans-serif", 14))
            .margin(10)
            .x_label_area_size(34)
            .y_label_area_size(70)
            .build_cartesian_2d(
                (0..results.len().saturating_sub(1)).into_segmented(),
                0.0..top,
            )?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .light_line_style(TRANSPARENT)
            .y_labels(ticks)
            .y_desc(metric.unit)
            .axis_desc_style(("sans-serif", 13))
            .x_label_formatter(&|x| match x {
                SegmentValue::CenterOf(index) => results
                    .get(*index)
                    .map_or(String::new(), |r| r.mode.to_owned()),
                _ => String::new(),
            })
            .y_label_formatter(&|y| label(*y))
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
            let label = value.map_or_else(|| String::from("none"), label);
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
    for (line, text) in CAPTION.iter().enumerate() {
        caption.draw(&Text::new(
            *text,
            (20, 6 + 22 * line as i32),
            ("sans-serif", 14).into_font().color(&BLACK),
        ))?;
    }
    root.present()?;
    Ok(())
}
