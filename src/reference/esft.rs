//! ESFT's oracle (math §8): per-expert statistics of routing batches, the gate and token scores,
//! and the shortest-prefix selection, in f64 over host slices. It follows the op's rules
//! (`crate::ops::esft`): a slot with an id outside `[0, E)` or a weight that is not finite or
//! exceeds `MAX_WEIGHT` in magnitude is skipped; `p = 0` selects nothing; a `p` the total score
//! never reaches selects every expert.
use crate::ops::esft::{MAX_WEIGHT, ScoreKind};

/// Statistics of every batch given to [`statistics`].
#[derive(Debug, Clone, PartialEq)]
pub struct Statistics {
    pub counts: Vec<u64>,
    pub weight_sums: Vec<f64>,
    pub tokens: u64,
    pub skipped_slots: u64,
}

/// Per-expert counts and weight sums over `batches` of (ids `[T, k]`, weights `[T, k]`).
pub fn statistics(batches: &[(&[i32], &[f32])], experts: usize, k: usize) -> Statistics {
    let mut s = Statistics {
        counts: vec![0; experts],
        weight_sums: vec![0.0; experts],
        tokens: 0,
        skipped_slots: 0,
    };
    for (ids, weights) in batches {
        s.tokens += (ids.len() / k) as u64;
        for (&id, &w) in ids.iter().zip(weights.iter()) {
            let usable = w.is_finite() && w.abs() <= MAX_WEIGHT;
            if id < 0 || id as usize >= experts || !usable {
                s.skipped_slots += 1;
                continue;
            }
            s.counts[id as usize] += 1;
            s.weight_sums[id as usize] += w as f64;
        }
    }
    s
}

/// The `kind` score of every expert: gate `g_i = sum_w_i / T`, token `r_i = count_i / (T k)`;
/// 0 when no token was accumulated.
pub fn scores(stats: &Statistics, k: usize, kind: ScoreKind) -> Vec<f64> {
    let tokens = stats.tokens as f64;
    (0..stats.counts.len())
        .map(|i| match (stats.tokens, kind) {
            (0, _) => 0.0,
            (_, ScoreKind::Gate) => stats.weight_sums[i] / tokens,
            (_, ScoreKind::Token) => stats.counts[i] as f64 / (tokens * k as f64),
        })
        .collect()
}

/// Expert ids by score, descending; equal scores keep the lower id first.
pub fn ranked(scores: &[f64]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
    order
}

/// The selected ids, in rank order: the shortest prefix of the ranking by `kind` score whose
/// cumulative score is `>= p`, tested on the numerators (`sum counts >= p T k`, or
/// `sum weight_sums >= p T`) as the op does; empty for `p <= 0`; every expert if the total never
/// reaches `p` (or no token was accumulated).
pub fn select(stats: &Statistics, k: usize, kind: ScoreKind, p: f64) -> Vec<usize> {
    let order = ranked(&scores(stats, k, kind));
    if p <= 0.0 {
        return vec![];
    }
    let (numerators, denominator): (Vec<f64>, f64) = match kind {
        ScoreKind::Gate => (stats.weight_sums.clone(), stats.tokens as f64),
        ScoreKind::Token => (
            stats.counts.iter().map(|&c| c as f64).collect(),
            (stats.tokens * k as u64) as f64,
        ),
    };
    let mut cumulative = 0.0;
    for (n, &id) in order.iter().enumerate() {
        cumulative += numerators[id];
        if denominator > 0.0 && cumulative >= p * denominator {
            return order[..=n].to_vec();
        }
    }
    order
}
