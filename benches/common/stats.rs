//! The summary of a run's samples: median, 10th and 90th percentile (nearest rank). Pure, so
//! `tests/bench_floors.rs` checks it too.

/// Seconds of one call.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Timing {
    pub median: f64,
    pub p10: f64,
    pub p90: f64,
}

/// The nearest-rank percentile `p` (0..=100) of sorted `samples`.
fn percentile(sorted: &[f64], p: usize) -> f64 {
    let rank = (p * sorted.len()).div_ceil(100).max(1);
    sorted[rank - 1]
}

/// Median, p10 and p90 of `samples` (at least one; NaNs sort last).
pub fn summarize(mut samples: Vec<f64>) -> Timing {
    assert!(!samples.is_empty(), "summarize needs at least one sample");
    samples.sort_by(f64::total_cmp);
    Timing {
        median: percentile(&samples, 50),
        p10: percentile(&samples, 10),
        p90: percentile(&samples, 90),
    }
}
