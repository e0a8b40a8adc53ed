//! The median of a figure's rounds, and a confidence interval for it that assumes nothing
//! about how the rounds spread.
//!
//! With the n values sorted, the interval from the k-th lowest to the k-th highest misses the
//! true median only if k or more of them fall on one side of it, which happens with
//! probability 2·P(Binomial(n, ½) < k). k is the largest that leaves the interval at least
//! 90 % confidence (5 rounds: the whole range, 93 %; 8 rounds: all but the lowest and highest,
//! 92 %); with 4 rounds or fewer even the whole range falls short, and the confidence says by
//! how much.

/// The confidence the interval is chosen for, at least.
const CONFIDENCE: f64 = 0.9;

/// The median of `values`; `None` for none.
pub fn median(values: &[f64]) -> Option<f64> {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    match sorted.len() {
        0 => None,
        n if n % 2 == 1 => Some(sorted[n / 2]),
        n => Some((sorted[n / 2 - 1] + sorted[n / 2]) / 2.0),
    }
}

/// P(Binomial(n, ½) ≤ j).
fn binomial_half_cdf(n: usize, j: usize) -> f64 {
    // C(n, i) / 2^n, from i = 0 up.
    let mut term = 0.5_f64.powi(n as i32);
    let mut sum = term;
    for i in 1..=j.min(n) {
        term *= (n - i + 1) as f64 / i as f64;
        sum += term;
    }
    sum
}

/// A confidence interval for a median.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Interval {
    pub low: f64,
    pub high: f64,
    /// The probability that the interval holds the true median, 0 to 1.
    pub confidence: f64,
}

/// For n values: which order statistics bound the interval for their median (the k-th lowest
/// and the k-th highest), and its confidence. k is the largest that keeps the confidence at
/// 90 % or more, or 1 (the whole range) when none does. `None` for fewer than two values.
pub fn order_statistics(n: usize) -> Option<(usize, f64)> {
    if n < 2 {
        return None;
    }
    let confidence = |k: usize| 1.0 - 2.0 * binomial_half_cdf(n, k - 1);
    let mut k = 1;
    while k < n / 2 && confidence(k + 1) >= CONFIDENCE {
        k += 1;
    }
    Some((k, confidence(k)))
}

/// The confidence interval of [`order_statistics`] for the median of `values`.
pub fn median_interval(values: &[f64]) -> Option<Interval> {
    let (k, confidence) = order_statistics(values.len())?;
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    Some(Interval {
        low: sorted[k - 1],
        high: sorted[values.len() - k],
        confidence,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The probability that the k-th lowest to the k-th highest of n values misses their true
    /// median, counted over every way the n values can fall below or above it.
    fn missed(n: usize, k: usize) -> f64 {
        let misses = (0_u32..1 << n)
            .filter(|below| {
                let below = below.count_ones() as usize;
                below < k || below > n - k
            })
            .count();
        misses as f64 / f64::from(1_u32 << n)
    }

    #[test]
    fn the_interval_is_the_narrowest_of_at_least_90_percent_or_the_whole_range() {
        assert_eq!(order_statistics(0), None);
        assert_eq!(order_statistics(1), None);
        for n in 2..=16 {
            let (k, confidence) = order_statistics(n).expect("an interval");
            assert!(
                (confidence - (1.0 - missed(n, k))).abs() < 1e-12,
                "n={n} k={k}"
            );
            assert!(confidence >= 0.9 || k == 1, "n={n} k={k} {confidence}");
            assert!(
                k == n / 2 || 1.0 - missed(n, k + 1) < 0.9,
                "n={n}: k={} would do",
                k + 1
            );
        }
        // The figures the documentation quotes.
        assert_eq!(order_statistics(5), Some((1, 0.9375)));
        assert_eq!(order_statistics(8), Some((2, 1.0 - 18.0 / 256.0)));
        assert_eq!(order_statistics(4), Some((1, 0.875)));
    }

    #[test]
    fn the_interval_takes_those_order_statistics_of_the_values() {
        let values = [1.04, 0.97, 1.10, 0.99, 0.80, 1.01, 1.00, 0.98];
        let interval = median_interval(&values).expect("an interval");
        // Sorted: 0.80 0.97 0.98 0.99 1.00 1.01 1.04 1.10; 8 values: the 2nd lowest and highest.
        assert_eq!((interval.low, interval.high), (0.97, 1.04));
        assert_eq!(median(&values), Some(0.995));
        assert_eq!(median_interval(&[0.5]), None);
    }
}
