//! The run's conclusion: how naive broke, whether forksafe answered every request right, and
//! forksafe's figures against lazy's, each with its target and how precisely it is known.
//!
//! forksafe and lazy run side by side in every round (see `driver/load.rs`), so a
//! round gives one ratio per figure, forksafe's to lazy's. The verdict gives the median of the
//! rounds' ratios and a confidence interval for it (see [`median`](crate::median)). A target
//! is met when the whole interval is on its side of the bound, NOT met when the whole interval
//! is on the other side, and within noise when the interval straddles the bound: then the run
//! could not tell, and more rounds might.

mod target;

use serde_json::{json, Value};

use crate::app::Database;
use crate::config::RunConfig;
use crate::median::{median, order_statistics};
use crate::results::ModeResult;
use target::{percent, Target};

/// What the driver's error message says, without the demo's own wrapping: the text a user
/// would search for.
fn searchable(message: &str) -> &str {
    let message = message.strip_prefix("HTTP 500: ").unwrap_or(message);
    let message = message
        .strip_prefix("query: ")
        .or_else(|| message.strip_prefix("checkout: "))
        .unwrap_or(message);
    message.trim()
}

/// `of / to`; `None` when `to` is not positive.
fn ratio(of: f64, to: f64) -> Option<f64> {
    (to > 0.0).then(|| of / to)
}

/// forksafe's req/s to lazy's in one round: the median of the ratios of the slices they ran
/// turn by turn (see `driver/load.rs`), so that a slice another program slowed down
/// moves the round's ratio no more than any other slice; the ratio of their req/s over the
/// round when there were no slices.
pub fn throughput_ratio(forksafe: &ModeResult, lazy: &ModeResult) -> Option<f64> {
    let slices: Vec<f64> = forksafe
        .slice_req_per_s
        .iter()
        .zip(&lazy.slice_req_per_s)
        .filter_map(|(&of, &to)| ratio(of, to))
        .collect();
    median(&slices).or_else(|| ratio(forksafe.req_per_s, lazy.req_per_s))
}

/// The run's conclusion, in a few plain lines.
#[derive(Clone, Debug)]
pub struct Verdict {
    /// Naive's outcome: `Some(true)` when it broke; `None` when it did not run.
    pub naive_broke: Option<bool>,
    /// The first error messages naive's requests met.
    pub naive_errors: Vec<String>,
    /// `Some(true)` when forksafe answered every request right and no worker hung.
    pub forksafe_all_right: Option<bool>,
    /// forksafe vs lazy; empty when either did not run.
    pub targets: Vec<Target>,
    lines: Vec<String>,
}

impl Verdict {
    pub fn judge(results: &[ModeResult], runs: &[Vec<ModeResult>], config: &RunConfig) -> Verdict {
        let find = |name: &str| results.iter().find(|result| result.mode == name);
        let rounds_of = |name: &str| {
            runs.iter()
                .find(|rounds| rounds.first().is_some_and(|round| round.mode == name))
                .map_or(&[][..], Vec::as_slice)
        };
        let all_right = |result: &ModeResult| {
            result.server_error.is_none()
                && result.failed == 0
                && result.not_sent == 0
                && result.wrong_answers == 0
                && result.hung_workers == 0
        };
        let mut lines = Vec::new();
        let naive = find("naive");
        let naive_errors: Vec<String> = naive
            .map(|naive| {
                // The driver's own errors (the server's error answers) first: those are what
                // users search for; the client's timeouts only say that workers hung.
                let (driver, client): (Vec<_>, Vec<_>) = naive
                    .errors
                    .iter()
                    .partition(|(message, _)| message.starts_with("HTTP "));
                driver
                    .into_iter()
                    .chain(client)
                    .take(3)
                    .map(|(message, _)| searchable(message).to_owned())
                    .collect()
            })
            .unwrap_or_default();
        if let Some(naive) = naive {
            let sent = naive.requests_ok + naive.failed + naive.not_sent;
            if let Some(error) = &naive.server_error {
                lines.push(format!("naive:    BROKE: the server failed: {error}"));
            } else if all_right(naive) {
                lines.push(match config.database {
                    Database::Sqlite(_) => String::from(
                        "naive:    did not break: SQLite shares no connection stream between \
                         processes; PostgreSQL does",
                    ),
                    Database::Postgres(_) => format!(
                        "naive:    did not break this time: {} of {sent} requests right",
                        naive.requests_ok
                    ),
                });
            } else {
                lines.push(format!(
                    "naive:    BROKE: {} of {sent} requests right, {} wrong answers, {} of {} \
                     workers hung",
                    naive.requests_ok, naive.wrong_answers, naive.hung_workers, naive.workers
                ));
                if naive_errors
                    .iter()
                    .all(|message| message == "request timed out")
                {
                    lines.push(String::from(
                        "          no error message: its workers hung mid-request, and requests \
                         timed out",
                    ));
                } else {
                    let mut shown = String::from("          first errors:");
                    for (index, message) in naive_errors.iter().enumerate() {
                        let separator = if index == 0 { " " } else { ", " };
                        let room =
                            100_usize.saturating_sub(shown.chars().count() + separator.len() + 2);
                        let quoted = if message.chars().count() <= room {
                            format!("{separator}\"{message}\"")
                        } else if index == 0 {
                            // The first always shows, cut to fit.
                            let cut: String =
                                message.chars().take(room.saturating_sub(1)).collect();
                            format!("{separator}\"{cut}…\"")
                        } else {
                            break;
                        };
                        shown += &quoted;
                    }
                    lines.push(shown);
                }
            }
        }
        let forksafe = find("forksafe");
        if let Some(forksafe) = forksafe {
            let sent = forksafe.requests_ok + forksafe.failed + forksafe.not_sent;
            lines.push(if let Some(error) = &forksafe.server_error {
                format!("forksafe: FAILED: the server failed: {error}")
            } else if all_right(forksafe) {
                format!(
                    "forksafe: every request answered right ({} of {sent}), no worker hung",
                    forksafe.requests_ok
                )
            } else {
                format!(
                    "forksafe: FAILED: {} of {sent} right, {} failed, {} not sent, {} wrong, {} \
                     hung",
                    forksafe.requests_ok,
                    forksafe.failed,
                    forksafe.not_sent,
                    forksafe.wrong_answers,
                    forksafe.hung_workers
                )
            });
        }
        let lazy = find("lazy").filter(|lazy| lazy.server_error.is_none());
        let mut targets = Vec::new();
        if let (Some(_), Some(_)) = (forksafe, lazy) {
            let pairs: Vec<(&ModeResult, &ModeResult)> = rounds_of("forksafe")
                .iter()
                .zip(rounds_of("lazy"))
                .filter(|(forksafe, lazy)| {
                    forksafe.server_error.is_none() && lazy.server_error.is_none()
                })
                .collect();
            let target =
                |name, ratio: fn(&ModeResult, &ModeResult) -> Option<f64>, bound, at_most| Target {
                    name,
                    per_round: pairs
                        .iter()
                        .filter_map(|(forksafe, lazy)| ratio(forksafe, lazy))
                        .collect(),
                    bound,
                    at_most,
                };
            targets = vec![
                target(
                    "PSS",
                    |f, l| ratio(f.total_pss_mib, l.total_pss_mib),
                    0.35,
                    true,
                ),
                target(
                    "start-up CPU",
                    |f, l| ratio(f.cpu_seconds_starting, l.cpu_seconds_starting),
                    0.35,
                    true,
                ),
                target(
                    "respawn",
                    |f, l| ratio(f.respawn_time_ms?, l.respawn_time_ms?),
                    0.1,
                    true,
                ),
                target("req/s", throughput_ratio, 0.95, false),
            ];
            let rounds = pairs.len();
            let usual = order_statistics(rounds).map(|(_, confidence)| confidence);
            lines.push(match usual {
                Some(_) => {
                    format!("vs lazy:  forksafe's figure ÷ lazy's, the median of {rounds} rounds:")
                }
                None => format!(
                    "vs lazy:  forksafe's figure ÷ lazy's in {rounds} round (more rounds give a \
                     confidence interval):"
                ),
            });
            lines.push(format!(
                "          {:<13}{:>7}  {:<15}{:<8}verdict",
                "figure",
                "ratio",
                usual.map_or_else(
                    || String::from("interval"),
                    |usual| format!("{} interval", percent(usual))
                ),
                "target"
            ));
            lines.extend(targets.iter().map(|target| target.row(rounds, usual)));
        }
        Verdict {
            naive_broke: naive.map(|naive| !all_right(naive)),
            naive_errors,
            forksafe_all_right: forksafe.map(all_right),
            targets,
            lines,
        }
    }

    pub fn lines(&self) -> &[String] {
        &self.lines
    }

    pub fn json(&self) -> Value {
        json!({
            "naive_broke": self.naive_broke,
            "naive_first_errors": self.naive_errors,
            "forksafe_all_right": self.forksafe_all_right,
            "targets": self.targets.iter().map(Target::json).collect::<Vec<_>>(),
            "lines": self.lines,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::target::Standing;
    use super::*;
    use crate::results::combine;

    fn config() -> RunConfig {
        RunConfig {
            requests: 1000,
            ..RunConfig::for_tests()
        }
    }

    fn round(mode: &'static str, req_per_s: f64, respawn_ms: f64) -> ModeResult {
        ModeResult {
            mode,
            workers: 4,
            requests_ok: 1000,
            req_per_s,
            cpu_seconds_starting: 1.0,
            respawn_time_ms: Some(respawn_ms),
            total_pss_mib: 100.0,
            ..ModeResult::default()
        }
    }

    /// The machine slows down round after round; forksafe keeps 0.98 of lazy's pace in each.
    /// Paired by round the ratios agree; taken apart, the rounds would range 0.49–1.96.
    #[test]
    fn each_round_pairs_forksafe_with_lazy_of_the_same_round() {
        let lazy_req_per_s = [2000.0, 1800.0, 1500.0, 1200.0, 1000.0];
        let runs = vec![
            lazy_req_per_s
                .iter()
                .map(|&lazy| round("forksafe", 0.98 * lazy, 40.0))
                .collect::<Vec<_>>(),
            lazy_req_per_s
                .iter()
                .map(|&lazy| round("lazy", lazy, 500.0))
                .collect::<Vec<_>>(),
        ];
        let results: Vec<ModeResult> = runs.iter().map(|rounds| combine(rounds)).collect();
        let verdict = Verdict::judge(&results, &runs, &config());
        let req_per_s = &verdict.targets[3];
        assert_eq!(req_per_s.name, "req/s");
        assert_eq!(req_per_s.per_round.len(), 5);
        for ratio in &req_per_s.per_round {
            assert!((ratio - 0.98).abs() < 1e-12, "{:?}", req_per_s.per_round);
        }
        assert_eq!(req_per_s.standing(), Some(Standing::Met));
        let respawn = &verdict.targets[2];
        assert_eq!(respawn.standing(), Some(Standing::Met), "{respawn:?}");
        let lines = verdict.lines();
        assert_eq!(
            lines[lines.len() - 6..],
            [
                "vs lazy:  forksafe's figure ÷ lazy's, the median of 5 rounds:",
                "          figure         ratio  93 % interval  target  verdict",
                "          PSS            1.00×  1.00–1.00      ≤ 0.35  NOT met",
                "          start-up CPU   1.00×  1.00–1.00      ≤ 0.35  NOT met",
                "          respawn        0.08×  0.08–0.08      ≤ 0.10  met",
                "          req/s          0.98×  0.98–0.98      ≥ 0.95  met",
            ]
        );
    }

    /// Another program that slows down one slice of forksafe's moves the round's req/s ratio
    /// no more than any other slice does.
    #[test]
    fn a_round_s_throughput_ratio_is_the_median_of_its_slices() {
        let mut forksafe = round("forksafe", 0.0, 40.0);
        let mut lazy = round("lazy", 0.0, 500.0);
        forksafe.slice_req_per_s = vec![980.0, 990.0, 300.0, 985.0, 975.0, 995.0, 990.0, 980.0];
        lazy.slice_req_per_s = vec![1000.0; 8];
        // Over the whole round, the slow slice would have cost forksafe a tenth.
        forksafe.req_per_s = 880.0;
        lazy.req_per_s = 1000.0;
        let close = |ratio: Option<f64>, expected: f64| {
            assert!(
                ratio.is_some_and(|ratio| (ratio - expected).abs() < 1e-12),
                "{ratio:?}"
            );
        };
        close(throughput_ratio(&forksafe, &lazy), 0.9825);
        // Without slices, the round's figures.
        forksafe.slice_req_per_s.clear();
        close(throughput_ratio(&forksafe, &lazy), 0.88);
        lazy.req_per_s = 0.0;
        assert_eq!(throughput_ratio(&forksafe, &lazy), None);
    }

    /// A round without a respawn figure leaves that target fewer rounds, and its row says so;
    /// no line is wider than 100 columns, whatever the figures.
    #[test]
    fn rows_fit_100_columns_and_name_a_target_with_fewer_rounds() {
        let mut forksafe: Vec<ModeResult> = (0..7)
            .map(|_| round("forksafe", 123_456.0, 0.123))
            .collect();
        forksafe[3].respawn_time_ms = None;
        forksafe[5].req_per_s = 1.0;
        let lazy: Vec<ModeResult> = (0..7).map(|_| round("lazy", 1.0, 1234.0)).collect();
        let runs = vec![forksafe, lazy];
        let results: Vec<ModeResult> = runs.iter().map(|rounds| combine(rounds)).collect();
        let verdict = Verdict::judge(&results, &runs, &config());
        let respawn = verdict
            .lines()
            .iter()
            .find(|line| line.trim_start().starts_with("respawn"))
            .expect("a respawn row");
        assert!(respawn.contains("(6 of 7 rounds, 96 %)"), "{respawn}");
        for line in verdict.lines() {
            assert!(line.chars().count() <= 100, "wider than 100: {line:?}");
        }
    }
}
