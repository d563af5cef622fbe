//! The learning-rate schedule: linear warm-up, then cosine decay to zero.

/// Learning rate of optimizer step `step` (from 0) of `total`: rises linearly over the first
/// `ceil(warmup_ratio * total)` steps to `peak`, then follows a half cosine down to 0.
pub fn learning_rate(step: u64, total: u64, peak: f64, warmup_ratio: f64) -> f64 {
    let warmup = (warmup_ratio * total as f64).ceil() as u64;
    if step < warmup {
        return peak * (step + 1) as f64 / warmup as f64;
    }
    let decay_steps = total.saturating_sub(warmup).max(1);
    let progress = ((step - warmup) as f64 / decay_steps as f64).min(1.0);
    peak * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
}

#[cfg(test)]
mod tests {
    use super::learning_rate;

    #[test]
    fn warms_up_linearly_then_decays_along_a_cosine() {
        let (total, peak) = (100, 2e-3);
        // 3 warm-up steps: peak/3, 2·peak/3, peak.
        for s in 0..3 {
            let expected = peak * (s + 1) as f64 / 3.0;
            assert!((learning_rate(s, total, peak, 0.03) - expected).abs() < 1e-15);
        }
        assert!((learning_rate(3, total, peak, 0.03) - peak).abs() < 1e-15);
        // Halfway through the decay the rate is half the peak; it falls monotonically.
        let mid = 3 + 97 / 2;
        let half = learning_rate(mid, total, peak, 0.03);
        assert!((half / peak - 0.5).abs() < 0.02, "{half}");
        let rates: Vec<f64> = (3..total).map(|s| learning_rate(s, total, peak, 0.03)).collect();
        assert!(rates.windows(2).all(|w| w[1] <= w[0]));
        assert!(rates[rates.len() - 1] < peak * 0.001);
    }

    #[test]
    fn no_warmup_starts_at_the_peak() {
        assert_eq!(learning_rate(0, 10, 1.0, 0.0), 1.0);
    }
}
