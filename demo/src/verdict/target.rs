//! One of forksafe's figures against lazy's: the rounds' ratios, the bound they must keep, and
//! where their median and its interval stand against it.

use serde_json::{json, Value};

use crate::figure::figure;
use crate::median::{median, median_interval, Interval};

/// Where a ratio stands against its target.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Standing {
    /// The whole interval keeps the bound.
    Met,
    /// The whole interval breaks it.
    NotMet,
    /// The interval straddles the bound.
    WithinNoise,
}

impl Standing {
    fn words(self) -> &'static str {
        match self {
            Standing::Met => "met",
            Standing::NotMet => "NOT met",
            Standing::WithinNoise => "within noise",
        }
    }
}

/// One of forksafe's figures against lazy's, and the bound the ratio must keep.
#[derive(Clone, Debug)]
pub struct Target {
    pub name: &'static str,
    /// Each round's forksafe figure divided by lazy's of the same round, where both exist.
    pub per_round: Vec<f64>,
    pub bound: f64,
    /// Whether the ratio must stay at or below the bound (else at or above).
    pub at_most: bool,
}

impl Target {
    /// The median of the rounds' ratios.
    pub fn ratio(&self) -> Option<f64> {
        median(&self.per_round)
    }

    pub fn interval(&self) -> Option<Interval> {
        median_interval(&self.per_round)
    }

    /// `None` without a ratio. With one round, the ratio alone decides.
    pub fn standing(&self) -> Option<Standing> {
        let ratio = self.ratio()?;
        let (low, high) = self
            .interval()
            .map_or((ratio, ratio), |interval| (interval.low, interval.high));
        let keeps = |value: f64| {
            if self.at_most {
                value <= self.bound
            } else {
                value >= self.bound
            }
        };
        Some(match (keeps(low), keeps(high)) {
            (true, true) => Standing::Met,
            (false, false) => Standing::NotMet,
            _ => Standing::WithinNoise,
        })
    }

    /// `value` in the usual format, with one more decimal if that format would show it equal
    /// to the bound when it is not: "0.949", not "0.95", beside "≥ 0.95".
    fn shown(&self, value: f64) -> String {
        let shown = figure(value);
        if shown != figure(self.bound) {
            return shown;
        }
        for decimals in 3..=6 {
            let more = format!("{value:.decimals$}");
            if more != format!("{:.decimals$}", self.bound) {
                return more;
            }
        }
        shown
    }

    /// One row under the `vs lazy:` heading, for a run of `rounds` rounds; the interval's
    /// confidence shown when it is not `usual`, the heading's (some rounds had no figure).
    pub fn row(&self, rounds: usize, usual: Option<f64>) -> String {
        let bound = format!(
            "{} {}",
            if self.at_most { "≤" } else { "≥" },
            figure(self.bound)
        );
        let (Some(ratio), Some(standing)) = (self.ratio(), self.standing()) else {
            return format!(
                "          {:<13}{:>7}  {:<15}{bound:<8}n/a",
                self.name, "n/a", ""
            );
        };
        let interval = match self.interval() {
            Some(interval) => {
                let range = format!("{}–{}", self.shown(interval.low), self.shown(interval.high));
                if usual.is_some_and(|usual| (usual - interval.confidence).abs() < 1e-9) {
                    range
                } else {
                    format!(
                        "{range} ({} of {rounds} rounds, {})",
                        self.per_round.len(),
                        percent(interval.confidence)
                    )
                }
            }
            None => String::from("–"),
        };
        format!(
            "          {:<13}{:>7}  {interval:<15}{bound:<8}{}",
            self.name,
            format!("{}×", self.shown(ratio)),
            standing.words()
        )
    }

    pub fn json(&self) -> Value {
        let interval = self.interval();
        json!({
            "name": self.name,
            "ratio_to_lazy": self.ratio(),
            "per_round": self.per_round,
            "interval_low": interval.map(|interval| interval.low),
            "interval_high": interval.map(|interval| interval.high),
            "confidence": interval.map(|interval| interval.confidence),
            "bound": self.bound,
            "at_most": self.at_most,
            "verdict": self.standing().map(|standing| match standing {
                Standing::Met => "met",
                Standing::NotMet => "not met",
                Standing::WithinNoise => "within noise",
            }),
            "met": self.standing() == Some(Standing::Met),
        })
    }
}

/// "93 %".
pub fn percent(confidence: f64) -> String {
    format!("{:.0} %", (confidence * 100.0).floor())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(per_round: &[f64], bound: f64, at_most: bool) -> Target {
        Target {
            name: "figure",
            per_round: per_round.to_vec(),
            bound,
            at_most,
        }
    }

    #[test]
    fn a_target_is_met_not_met_or_within_noise_by_where_its_interval_lies() {
        let at_least = |rounds: &[f64]| target(rounds, 0.95, false).standing();
        assert_eq!(
            at_least(&[0.97, 0.98, 0.99, 1.0, 1.01]),
            Some(Standing::Met)
        );
        assert_eq!(
            at_least(&[0.90, 0.91, 0.92, 0.93, 0.94]),
            Some(Standing::NotMet)
        );
        // The median (0.97) keeps the bound; the interval (0.93–0.99) does not.
        assert_eq!(
            at_least(&[0.93, 0.96, 0.97, 0.98, 0.99]),
            Some(Standing::WithinNoise)
        );
        // The bound itself keeps it.
        assert_eq!(at_least(&[0.95, 0.95]), Some(Standing::Met));
        let at_most = |rounds: &[f64]| target(rounds, 0.1, true).standing();
        assert_eq!(at_most(&[0.05, 0.06, 0.07]), Some(Standing::Met));
        assert_eq!(at_most(&[0.09, 0.11]), Some(Standing::WithinNoise));
        assert_eq!(at_most(&[0.2]), Some(Standing::NotMet));
        assert_eq!(at_most(&[0.08]), Some(Standing::Met));
        assert_eq!(at_most(&[]), None);
    }

    #[test]
    fn a_figure_next_to_its_bound_shows_a_decimal_more() {
        let row = target(&[0.9493, 0.96, 0.97, 0.98, 0.99], 0.95, false).row(5, Some(0.9375));
        assert!(row.contains(" 0.97×  0.949–0.99 "), "{row}");
        assert!(row.ends_with("≥ 0.95  within noise"), "{row}");
        let row = target(&[0.0996], 0.1, true).row(1, None);
        assert!(row.contains(" 0.0996×  – "), "{row}");
    }
}
