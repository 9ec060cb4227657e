//! The benches' floors and timing summary, checked on small cases by hand: a floor that
//! counted idle experts (or forgot active ones) would misstate every % of floor.
#[allow(dead_code)] // the benches' descriptions
#[path = "../benches/common/floors.rs"]
mod floors;
#[path = "../benches/common/stats.rs"]
mod stats;

use floors::{ExpertGemms, MoeLayerFloor, active_experts};
use stats::summarize;

/// 8 experts; only experts 0, 2 and 5 get rows (3, 2 and 3 of them).
const OFFSETS: [i32; 9] = [0, 3, 3, 5, 5, 5, 8, 8, 8];

#[test]
fn only_experts_with_rows_are_active() {
    assert_eq!(active_experts(&OFFSETS), 3);
    assert_eq!(active_experts(&[0, 0, 0]), 0);
    assert_eq!(active_experts(&[0, 4]), 1);
}

#[test]
fn grouped_gemm_floors_count_only_active_experts() {
    // T = 4 tokens, k = 2 (8 rows), d = 16, h = 8: W1 is [16, 16] and W2 [16, 8] per expert.
    let (t, rows, d, h) = (4u64, 8u64, 16u64, 8u64);
    let f = ExpertGemms {
        tokens: t,
        k: 2,
        d,
        h,
        active: active_experts(&OFFSETS) as u64,
    };
    let (w1, w2) = (3 * 2 * h * d, 3 * d * h);
    assert_eq!(f.gemm1_swiglu().bytes, 2 * (t * d + w1 + rows * h + rows * 2 * h));
    assert_eq!(f.gemm1_swiglu().flops, 2 * rows * 2 * h * d);
    assert_eq!(f.gemm2_weighted().bytes, 2 * (rows * h + w2 + rows * d));
    assert_eq!(f.dgrad2_swiglu().bytes, 2 * (rows * d + w2 + 2 * rows * 2 * h));
    assert_eq!(f.dgrad1().bytes, 2 * (rows * 2 * h + w1 + rows * d));
    // Weight gradients: f32 for the 3 active experts only, not for all 8.
    assert_eq!(f.wgrad1().bytes, 2 * (rows * 2 * h + t * d) + 4 * w1);
    assert_eq!(f.wgrad2().bytes, 2 * (rows * d + rows * h) + 4 * w2);
    let every = ExpertGemms { active: 8, ..f };
    assert_eq!(
        every.wgrad1().bytes - f.wgrad1().bytes,
        4 * 5 * 2 * h * d,
        "each idle expert would add its f32 dW1"
    );
    // Flops do not depend on the experts: they follow the rows.
    assert_eq!(every.wgrad2().flops, f.wgrad2().flops);
}

#[test]
fn decode_floor_reads_one_weight_set_per_active_expert() {
    // T = 1, k = 2 of E = 8: two experts' weights, whatever E is.
    let f = ExpertGemms {
        tokens: 1,
        k: 2,
        d: 64,
        h: 32,
        active: 2,
    };
    let weights = 2 * 2 * (2 * 32 * 64);
    assert_eq!(f.gemm1_swiglu().bytes, 2 * 64 + weights + 2 * (2 * 32 + 2 * 2 * 32));
}

#[test]
fn layer_floor_counts_active_experts_and_the_gate() {
    let f = MoeLayerFloor {
        tokens: 2,
        k: 2,
        experts: 8,
        d: 16,
        h: 8,
        active: 3,
    };
    let forward = f.forward();
    assert_eq!(forward.bytes, 2 * (2 * 2 * 16 + 8 * 16 + 3 * 3 * 8 * 16));
    assert_eq!(forward.flops, 2 * 2 * 8 * 16 + 2 * 2 * 2 * 3 * 8 * 16);
    let training = f.forward_backward();
    assert_eq!(
        training.bytes,
        forward.bytes + 2 * 2 * 2 * 16 + 4 * (8 * 16 + 3 * 3 * 8 * 16)
    );
    assert_eq!(training.flops, 3 * forward.flops);
}

#[test]
fn timing_is_the_median_and_nearest_rank_percentiles() {
    let samples: Vec<f64> = (1..=20).rev().map(f64::from).collect();
    let t = summarize(samples);
    assert_eq!((t.p10, t.median, t.p90), (2.0, 10.0, 18.0));
    let one = summarize(vec![5.0]);
    assert_eq!((one.p10, one.median, one.p90), (5.0, 5.0, 5.0));
    // An outlier moves the mean, not the median.
    let t = summarize(vec![1.0, 1.0, 1.0, 1.0, 100.0]);
    assert_eq!(t.median, 1.0);
}
