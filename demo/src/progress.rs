//! Progress of one mode's run: a bar that stays on a terminal, and a line per phase elsewhere
//! (a CI log, a pipe), so that a minute-long run is never silent.

use std::io::IsTerminal;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};

/// Whether progress is drawn as bars (standard error is a terminal) or printed as lines.
pub fn on_terminal() -> bool {
    std::io::stderr().is_terminal()
}

pub enum Progress {
    Bar(ProgressBar),
    Lines {
        label: String,
        total: u64,
        done: AtomicU64,
        /// Quarters of the load already announced.
        quarters: AtomicU64,
    },
}

impl Progress {
    /// Progress for `label`'s run of `total` requests.
    pub fn new(label: String, total: u64) -> Progress {
        if on_terminal() {
            let style = ProgressStyle::with_template(
                "{prefix:>11} [{bar:32}] {pos}/{len} {msg} ({elapsed})",
            )
            .expect("valid template")
            .progress_chars("=> ");
            let bar = ProgressBar::new(total).with_style(style).with_prefix(label);
            bar.enable_steady_tick(Duration::from_millis(200));
            Progress::Bar(bar)
        } else {
            Progress::Lines {
                label,
                total,
                done: AtomicU64::new(0),
                quarters: AtomicU64::new(0),
            }
        }
    }

    /// A new phase of the run: `starting`, `load`, `respawn`, …
    pub fn phase(&self, name: &str) {
        match self {
            Progress::Bar(bar) => bar.set_message(name.to_owned()),
            Progress::Lines { label, .. } => println!("{label}: {name}"),
        }
    }

    /// `count` more requests done (answered, failed, or given up).
    pub fn advance(&self, count: u64) {
        match self {
            Progress::Bar(bar) => bar.inc(count),
            Progress::Lines {
                label,
                total,
                done,
                quarters,
            } => {
                let done = done.fetch_add(count, Ordering::Relaxed) + count;
                let reached = (done * 4).checked_div(*total).unwrap_or(4).min(4);
                let before = quarters.fetch_max(reached, Ordering::Relaxed);
                for quarter in before + 1..=reached {
                    println!("{label}: load {} %", quarter * 25);
                }
            }
        }
    }

    /// The run is over; a bar stays on screen with `summary`.
    pub fn finish(&self, summary: &str) {
        match self {
            Progress::Bar(bar) => bar.finish_with_message(summary.to_owned()),
            Progress::Lines { label, .. } => println!("{label}: done, {summary}"),
        }
    }
}
