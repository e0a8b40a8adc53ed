//! How the demo writes a measured number.

/// The one number format of the table, the verdict and the chart: three significant
/// figures, no more than two decimals, none at or above 100.
pub fn figure(value: f64) -> String {
    let magnitude = value.abs();
    if magnitude >= 100.0 || magnitude == 0.0 {
        format!("{value:.0}")
    } else if magnitude >= 10.0 {
        format!("{value:.1}")
    } else {
        format!("{value:.2}")
    }
}
