//! Small statistics over samples.

use std::time::Duration;

/// The median of `samples` (which it sorts).
pub fn median(samples: &mut [f64]) -> f64 {
    percentile(samples, 50.0)
}

/// Nearest-rank percentile of `samples` (which it sorts).
pub fn percentile(samples: &mut [f64], p: f64) -> f64 {
    assert!(!samples.is_empty(), "no samples");
    samples.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * samples.len() as f64).ceil() as usize;
    samples[rank.clamp(1, samples.len()) - 1]
}

pub fn micros(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

pub fn millis(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let mut samples = [5.0, 1.0, 4.0, 2.0, 3.0];
        assert_eq!(median(&mut samples), 3.0);
        assert_eq!(percentile(&mut samples, 99.0), 5.0);
        assert_eq!(percentile(&mut samples, 0.0), 1.0);
    }
}
