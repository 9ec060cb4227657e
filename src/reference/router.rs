//! The router's oracle (math §2, §3): top-k selection and its backward, expert statistics,
//! the Switch aux loss, the z-loss and the bias update, as plain loops in f64 over host slices
//! (`[T, E]` row-major logits, `[T, k]` ids and weights). It follows the crate's
//! non-finite-row rule (`crate::ops::router`): a row with a NaN or +inf logit, or with no
//! finite logit, is routed nowhere (ids [`NO_EXPERT`], NaN weights) and gets zero
//! probabilities, no loss and no gradient.
use crate::ops::router::{AuxLossConfig, NO_EXPERT, RouterConfig, ScoreFunction, SelectionOrder};
use std::cmp::Ordering;

/// The result of [`select`]: ids `[T, k]` in rank order, weights `[T, k]`, and how many rows
/// were non-finite.
#[derive(Debug, Clone, PartialEq)]
pub struct Selection {
    pub ids: Vec<i32>,
    pub weights: Vec<f64>,
    pub nonfinite_rows: u32,
}

/// The non-finite-row rule: a NaN or +inf logit, or no finite logit at all.
pub fn row_is_nonfinite(row: &[f32]) -> bool {
    row.iter().any(|z| z.is_nan() || *z == f32::INFINITY) || !row.iter().any(|z| z.is_finite())
}

/// The routing order: `a` ranks above `b` (NaN below every number).
fn rank_cmp(a: f64, b: f64) -> Ordering {
    match (a.is_nan(), b.is_nan()) {
        (true, true) => Ordering::Equal,
        (true, false) => Ordering::Less,
        (false, true) => Ordering::Greater,
        _ => a.partial_cmp(&b).unwrap(),
    }
}

/// Indices of `keys` from best to worst; equal keys keep the lower index first.
pub fn ranked(keys: &[f64]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..keys.len()).collect();
    order.sort_by(|&a, &b| rank_cmp(keys[b], keys[a]));
    order
}

/// Softmax over the finite logits of a row: `exp(z - max) / sum` (0 for -inf).
fn softmax_finite(row: &[f32]) -> Vec<f64> {
    let max = row
        .iter()
        .filter(|z| z.is_finite())
        .fold(f64::NEG_INFINITY, |m, &z| m.max(z as f64));
    let terms: Vec<f64> = row
        .iter()
        .map(|&z| if z.is_finite() { (z as f64 - max).exp() } else { 0.0 })
        .collect();
    let sum: f64 = terms.iter().sum();
    terms.iter().map(|t| t / sum).collect()
}

/// Dense routing probabilities `softmax(z)` of a row (zeros for a non-finite row).
pub fn probabilities(row: &[f32]) -> Vec<f64> {
    if row_is_nonfinite(row) {
        return vec![0.0; row.len()];
    }
    softmax_finite(row)
}

fn sigmoid(z: f64) -> f64 {
    1.0 / (1.0 + (-z).exp())
}

/// The biased scores selection ranks: `score(z) + bias`, where the score is the softmax
/// probability (softmax_then_topk; -inf scores 0, NaN and +inf keep themselves), the logit
/// (topk_then_softmax, identity) or its sigmoid.
pub fn selection_keys(config: &RouterConfig, row: &[f32], bias: Option<&[f32]>) -> Vec<f64> {
    let probs = softmax_finite(row);
    (0..row.len())
        .map(|e| {
            let z = row[e] as f64;
            let score = match (config.score, config.order) {
                (ScoreFunction::Sigmoid, _) => sigmoid(z),
                (ScoreFunction::Identity, _) | (ScoreFunction::Softmax, SelectionOrder::TopkThenSoftmax) => z,
                (ScoreFunction::Softmax, SelectionOrder::SoftmaxThenTopk) if z.is_finite() => probs[e],
                _ if z == f64::NEG_INFINITY => 0.0,
                _ => z,
            };
            score + bias.map_or(0.0, |b| b[e] as f64)
        })
        .collect()
}

/// Group scores of group-limited routing: the sum of each group's two best keys (its one key
/// when groups have one expert).
pub fn group_scores(config: &RouterConfig, keys: &[f64]) -> Vec<f64> {
    let size = config.experts / config.groups;
    keys.chunks(size)
        .map(|group| ranked(group).iter().take(2).map(|&i| group[i]).sum())
        .collect()
}

/// The experts selection may pick from: all, or those of the `topk_groups` best groups.
pub fn allowed_experts(config: &RouterConfig, keys: &[f64]) -> Vec<bool> {
    if config.groups <= 1 {
        return vec![true; keys.len()];
    }
    let size = config.experts / config.groups;
    let best = ranked(&group_scores(config, keys));
    let mut allowed = vec![false; keys.len()];
    for &g in &best[..config.topk_groups] {
        allowed[g * size..(g + 1) * size].fill(true);
    }
    allowed
}

/// The k weights of a row given its selected ids (math §2), `scale` included; NaN for a
/// non-finite row (routed nowhere).
pub fn weights_for(config: &RouterConfig, row: &[f32], ids: &[i32]) -> Vec<f64> {
    if row_is_nonfinite(row) {
        return vec![f64::NAN; ids.len()];
    }
    let z: Vec<f64> = ids.iter().map(|&i| row[i as usize] as f64).collect();
    let normalized: Vec<f64> = match (config.score, config.order) {
        (ScoreFunction::Softmax, SelectionOrder::TopkThenSoftmax) => {
            let top = z.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(v));
            if top == f64::NEG_INFINITY {
                vec![0.0; z.len()]
            } else {
                let terms: Vec<f64> = z.iter().map(|v| (v - top).exp()).collect();
                let sum: f64 = terms.iter().sum();
                terms.iter().map(|t| t / sum).collect()
            }
        }
        _ => {
            let probs = probabilities(row);
            let scores: Vec<f64> = ids
                .iter()
                .zip(&z)
                .map(|(&i, &v)| match config.score {
                    ScoreFunction::Softmax => probs[i as usize],
                    ScoreFunction::Sigmoid => sigmoid(v),
                    ScoreFunction::Identity => v,
                })
                .collect();
            if config.renormalize {
                let denom = scores.iter().sum::<f64>() + 1e-20;
                scores.iter().map(|s| s / denom).collect()
            } else {
                scores
            }
        }
    };
    normalized.iter().map(|w| w * config.scale as f64).collect()
}

/// Top-k selection of every row of `logits` `[T, E]` (math §2; `config.validate()` holds).
pub fn select(config: &RouterConfig, logits: &[f32], bias: Option<&[f32]>) -> Selection {
    let mut out = Selection {
        ids: vec![],
        weights: vec![],
        nonfinite_rows: 0,
    };
    for row in logits.chunks(config.experts) {
        if row_is_nonfinite(row) {
            let ids = vec![NO_EXPERT; config.k];
            out.weights.extend(weights_for(config, row, &ids));
            out.ids.extend(ids);
            out.nonfinite_rows += 1;
            continue;
        }
        let keys = selection_keys(config, row, bias);
        let allowed = allowed_experts(config, &keys);
        let ids: Vec<i32> = ranked(&keys)
            .into_iter()
            .filter(|&e| allowed[e])
            .take(config.k)
            .map(|e| e as i32)
            .collect();
        out.weights.extend(weights_for(config, row, &ids));
        out.ids.extend(ids);
    }
    out
}

/// `dz` `[T, E]` of the selection weights, given the forward's ids and `d_weights` `[T, k]`
/// (math §2 backward; ids are distinct and in range).
pub fn select_backward(config: &RouterConfig, logits: &[f32], ids: &[i32], d_weights: &[f32]) -> Vec<f64> {
    let (e_count, k) = (config.experts, config.k);
    let rho = config.scale as f64;
    let mut dz = vec![0.0; logits.len()];
    for (t, row) in logits.chunks(e_count).enumerate() {
        if row_is_nonfinite(row) {
            continue;
        }
        let ids = &ids[t * k..(t + 1) * k];
        let dw: Vec<f64> = d_weights[t * k..(t + 1) * k].iter().map(|&v| v as f64).collect();
        let out = &mut dz[t * e_count..(t + 1) * e_count];
        let restricted = config.order == SelectionOrder::TopkThenSoftmax || config.renormalize;
        match config.score {
            ScoreFunction::Softmax if !restricted => {
                // dz = rho p (m - <p, m>), m = dw on the selected experts.
                let p = probabilities(row);
                let mut m = vec![0.0; e_count];
                for (&i, &g) in ids.iter().zip(&dw) {
                    m[i as usize] = g;
                }
                let dot: f64 = p.iter().zip(&m).map(|(a, b)| a * b).sum();
                for e in 0..e_count {
                    out[e] = rho * p[e] * (m[e] - dot);
                }
            }
            ScoreFunction::Softmax => {
                // The softmax over the k selected logits: dz_j = w_j (rho dw_j - sum_i w_i rho dw_i).
                let w: Vec<f64> = weights_for(config, row, ids).iter().map(|w| w / rho).collect();
                let dot: f64 = w.iter().zip(&dw).map(|(a, b)| a * b).sum();
                for j in 0..k {
                    out[ids[j] as usize] = w[j] * rho * (dw[j] - dot);
                }
            }
            ScoreFunction::Sigmoid | ScoreFunction::Identity => {
                let s: Vec<f64> = ids
                    .iter()
                    .map(|&i| {
                        let z = row[i as usize] as f64;
                        if config.score == ScoreFunction::Sigmoid {
                            sigmoid(z)
                        } else {
                            z
                        }
                    })
                    .collect();
                let ds: Vec<f64> = if config.renormalize {
                    let sum = s.iter().sum::<f64>() + 1e-20;
                    let dot: f64 = s.iter().zip(&dw).map(|(a, b)| a / sum * b).sum();
                    dw.iter().map(|g| rho / sum * (g - dot)).collect()
                } else {
                    dw.iter().map(|g| rho * g).collect()
                };
                for j in 0..k {
                    let local = if config.score == ScoreFunction::Sigmoid {
                        s[j] * (1.0 - s[j])
                    } else {
                        1.0
                    };
                    out[ids[j] as usize] = ds[j] * local;
                }
            }
        }
    }
    dz
}

/// Per-expert token counts over `[T, k]` ids (ids outside `[0, E)` count nowhere).
pub fn expert_counts(experts: usize, ids: &[i32]) -> Vec<i32> {
    let mut counts = vec![0; experts];
    for &id in ids.iter().filter(|&&id| (0..experts as i32).contains(&id)) {
        counts[id as usize] += 1;
    }
    counts
}

/// Per-expert gate-weight sums over `[T, k]` slots (ids outside `[0, E)` add nowhere).
pub fn expert_weight_sums(experts: usize, ids: &[i32], weights: &[f32]) -> Vec<f64> {
    let mut sums = vec![0.0; experts];
    for (&id, &w) in ids.iter().zip(weights) {
        if (0..experts as i32).contains(&id) {
            sums[id as usize] += w as f64;
        }
    }
    sums
}

/// Tokens per segment of the aux loss: the sequence length, or all T tokens.
fn segment_len(aux: &AuxLossConfig, tokens: usize) -> usize {
    aux.sequence_length.unwrap_or(tokens)
}

/// Rows of `logits` that are routed somewhere (not non-finite): the count every mean over
/// tokens divides by, so a token routed nowhere changes no other token's gradient.
fn live_rows(experts: usize, logits: &[f32]) -> usize {
    logits.chunks(experts).filter(|row| !row_is_nonfinite(row)).count()
}

/// `dL_aux/dp_{t,e}` for every token (its segment's `alpha E / (k S L'^2) c_{s,e}`, with `L'`
/// the segment's tokens routed somewhere).
fn aux_loss_prob_grad(router: &RouterConfig, aux: &AuxLossConfig, logits: &[f32], ids: &[i32]) -> Vec<f64> {
    let e_count = router.experts;
    let tokens = logits.len() / e_count;
    let len = segment_len(aux, tokens);
    let segments = tokens / len.max(1);
    let mut grad = vec![0.0; logits.len()];
    for s in 0..segments {
        let counts = expert_counts(e_count, &ids[s * len * router.k..(s + 1) * len * router.k]);
        let live = live_rows(e_count, &logits[s * len * e_count..(s + 1) * len * e_count]);
        if live == 0 {
            continue;
        }
        let coefficient = aux.alpha as f64 * e_count as f64 / (router.k * segments * live * live) as f64;
        for t in s * len..(s + 1) * len {
            for e in 0..e_count {
                grad[t * e_count + e] = coefficient * counts[e] as f64;
            }
        }
    }
    grad
}

/// Switch load-balancing loss `alpha E/k sum_i f_i P_i`, averaged over segments
/// (math §3; token level when `sequence_length` is `None`).
pub fn aux_loss(router: &RouterConfig, aux: &AuxLossConfig, logits: &[f32], ids: &[i32]) -> f64 {
    let grad = aux_loss_prob_grad(router, aux, logits, ids);
    let e_count = router.experts;
    let mut loss = 0.0;
    for (t, row) in logits.chunks(e_count).enumerate() {
        let p = probabilities(row);
        loss += (0..e_count).map(|e| grad[t * e_count + e] * p[e]).sum::<f64>();
    }
    loss
}

/// Adds the aux loss gradient to `dz` (the dense softmax backward of `dL/dp`).
pub fn aux_loss_backward(router: &RouterConfig, aux: &AuxLossConfig, logits: &[f32], ids: &[i32], dz: &mut [f64]) {
    let grad = aux_loss_prob_grad(router, aux, logits, ids);
    softmax_backward_add(router.experts, logits, &grad, dz);
}

/// `dz += p (g - <p, g>)` row by row.
fn softmax_backward_add(experts: usize, logits: &[f32], grad_p: &[f64], dz: &mut [f64]) {
    for (t, row) in logits.chunks(experts).enumerate() {
        let p = probabilities(row);
        let g = &grad_p[t * experts..(t + 1) * experts];
        let dot: f64 = p.iter().zip(g).map(|(a, b)| a * b).sum();
        for e in 0..experts {
            dz[t * experts + e] += p[e] * (g[e] - dot);
        }
    }
}

/// Log-sum-exp of a row (None for a non-finite row).
pub fn row_logsumexp(row: &[f32]) -> Option<f64> {
    if row_is_nonfinite(row) {
        return None;
    }
    let max = row
        .iter()
        .filter(|z| z.is_finite())
        .fold(f64::NEG_INFINITY, |m, &z| m.max(z as f64));
    Some(max + row.iter().map(|&z| (z as f64 - max).exp()).sum::<f64>().ln())
}

/// Router z-loss `c/T' sum_t LSE_t^2` (non-finite rows add nothing, and `T'` counts the others).
pub fn z_loss(experts: usize, coefficient: f32, logits: &[f32]) -> f64 {
    let tokens = live_rows(experts, logits);
    let sum: f64 = logits.chunks(experts).filter_map(row_logsumexp).map(|l| l * l).sum();
    if tokens == 0 {
        0.0
    } else {
        coefficient as f64 * sum / tokens as f64
    }
}

/// Adds the z-loss gradient `(2c/T') LSE_t p_{t,e}` to `dz`.
pub fn z_loss_backward(experts: usize, coefficient: f32, logits: &[f32], dz: &mut [f64]) {
    let tokens = live_rows(experts, logits);
    for (t, row) in logits.chunks(experts).enumerate() {
        if let Some(lse) = row_logsumexp(row) {
            let p = probabilities(row);
            for e in 0..experts {
                dz[t * experts + e] += 2.0 * coefficient as f64 / tokens as f64 * lse * p[e];
            }
        }
    }
}

/// DeepSeek-V3 auxiliary-loss-free balancing: `b_i + gamma sign(mean(c) - c_i)`.
pub fn bias_update(gamma: f32, counts: &[i32], bias: &[f32]) -> Vec<f32> {
    let mean = counts.iter().map(|&c| c as f64).sum::<f64>() / counts.len() as f64;
    counts
        .iter()
        .zip(bias)
        .map(|(&c, &b)| match mean.partial_cmp(&(c as f64)) {
            Some(Ordering::Greater) => b + gamma,
            Some(Ordering::Less) => b - gamma,
            _ => b,
        })
        .collect()
}
