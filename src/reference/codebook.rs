//! Codebook nearest neighbour, VQ losses and EMA update (math §6) on the host: f64, plain loops.
//! Layouts as in [`crate::ops::codebook`]; every tensor a flat row-major slice.
use crate::ops::codebook::{CodebookShape, EmaConfig};
use crate::ops::router::NO_EXPERT;
use std::cmp::Ordering;

/// `‖c_j‖²` for every code.
pub fn code_norms(shape: &CodebookShape, codes: &[f64]) -> Vec<f64> {
    codes.chunks(shape.dim).map(|c| c.iter().map(|v| v * v).sum()).collect()
}

/// The order of (score, code) entries: smaller score first, NaN after every number, then the
/// lower code index.
fn rank(a: (f64, usize), b: (f64, usize)) -> Ordering {
    match (a.0.is_nan(), b.0.is_nan()) {
        (false, true) => Ordering::Less,
        (true, false) => Ordering::Greater,
        (false, false) if a.0 != b.0 => a.0.partial_cmp(&b.0).unwrap(),
        _ => a.1.cmp(&b.1),
    }
}

/// The k nearest codes of one row: scores `‖c_j‖² − 2 x·c_j` (IEEE arithmetic, so an infinite
/// or NaN x gives infinite or NaN scores) sorted by `rank`.
pub fn nearest_scores(x: &[f64], codes: &[f64], dim: usize, k: usize) -> Vec<(f64, usize)> {
    let mut all: Vec<(f64, usize)> = codes
        .chunks(dim)
        .enumerate()
        .map(|(j, c)| {
            let norm: f64 = c.iter().map(|v| v * v).sum();
            let dot: f64 = x.iter().zip(c).map(|(a, b)| a * b).sum();
            (norm - 2.0 * dot, j)
        })
        .collect();
    all.sort_by(|a, b| rank(*a, *b));
    all.truncate(k);
    all
}

/// What [`nearest`] returns for every row, each `[T, k]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Nearest {
    pub ids: Vec<i32>,
    /// `‖x‖² + score`, clamped at 0.
    pub distances: Vec<f64>,
    /// `id mod E`.
    pub experts: Vec<i32>,
    /// The routing weights: 1, NaN for a row routed nowhere.
    pub weights: Vec<f64>,
    /// The scores `‖c‖² − 2 x·c` (without `‖x‖²`), for near-tie checks.
    pub scores: Vec<f64>,
    /// Rows routed nowhere.
    pub nonfinite_rows: usize,
}

/// Whether a row with `‖x‖² = x_norm` and nearest score `best` is routed nowhere: its nearest
/// distance is not finite in the kernels' f32 (a NaN or an infinity in x, or `‖x‖²` past f32's
/// range).
pub fn routed_nowhere(x_norm: f64, best: f64) -> bool {
    !(x_norm + best).is_finite() || x_norm > f32::MAX as f64
}

/// The k nearest codes of every row of `x`, with distances and experts.
pub fn nearest(shape: &CodebookShape, x: &[f64], codes: &[f64], k: usize, num_experts: usize) -> Nearest {
    let mut out = Nearest {
        ids: vec![],
        distances: vec![],
        experts: vec![],
        weights: vec![],
        scores: vec![],
        nonfinite_rows: 0,
    };
    for row in x.chunks(shape.dim).take(shape.tokens) {
        let x_norm: f64 = row.iter().map(|v| v * v).sum();
        let nearest = nearest_scores(row, codes, shape.dim, k);
        let nowhere = routed_nowhere(x_norm, nearest[0].0);
        out.nonfinite_rows += nowhere as usize;
        for (score, j) in nearest {
            let distance = x_norm + score;
            out.ids.push(if nowhere { NO_EXPERT } else { j as i32 });
            out.distances.push(if nowhere {
                f64::NAN
            } else if distance < 0.0 {
                0.0
            } else {
                distance
            });
            out.experts
                .push(if nowhere { NO_EXPERT } else { (j % num_experts) as i32 });
            out.weights.push(if nowhere { f64::NAN } else { 1.0 });
            out.scores.push(score);
        }
    }
    out
}

/// Row `id` of the codebook, or zeros for an id outside `[0, Nc)` (what the kernels read).
fn code(shape: &CodebookShape, codes: &[f64], id: i32) -> Vec<f64> {
    if id >= 0 && (id as usize) < shape.codes {
        codes[id as usize * shape.dim..][..shape.dim].to_vec()
    } else {
        vec![0.0; shape.dim]
    }
}

/// `(q, x̃)`: `q = C[ids]`, `x̃ = x + c·(q − x)`.
pub fn quantize(shape: &CodebookShape, x: &[f64], codes: &[f64], ids: &[i32], c: f64) -> (Vec<f64>, Vec<f64>) {
    let mut q = Vec::with_capacity(x.len());
    let mut mix = Vec::with_capacity(x.len());
    for (t, row) in x.chunks(shape.dim).take(shape.tokens).enumerate() {
        for (xv, qv) in row.iter().zip(code(shape, codes, ids[t])) {
            q.push(qv);
            mix.push(xv + c * (qv - xv));
        }
    }
    (q, mix)
}

/// Whether token `t` has a code (an id in `[0, Nc)`); the VQ means count only those.
fn has_code(shape: &CodebookShape, ids: &[i32], t: usize) -> bool {
    (0..shape.codes as i32).contains(&ids[t])
}

/// Tokens with a code: T' of the VQ means.
fn live_tokens(shape: &CodebookShape, ids: &[i32]) -> usize {
    (0..shape.tokens).filter(|&t| has_code(shape, ids, t)).count()
}

/// `[codebook loss, commitment loss]` = `[mean (x − q)², β·mean (x − q)²]` over the T'·d
/// elements of the tokens with a code (NaN when there is none).
pub fn losses(shape: &CodebookShape, x: &[f64], codes: &[f64], ids: &[i32], beta: f64) -> [f64; 2] {
    let (q, _) = quantize(shape, x, codes, ids, 1.0);
    let d = shape.dim;
    let sum: f64 = (0..shape.tokens)
        .filter(|&t| has_code(shape, ids, t))
        .flat_map(|t| t * d..(t + 1) * d)
        .map(|i| (x[i] - q[i]) * (x[i] - q[i]))
        .sum();
    let mean = sum / (live_tokens(shape, ids) * d) as f64;
    [mean, beta * mean]
}

/// `(dx, dC)` of `losses[0] + losses[1]`: `dx = dmix + β(2/(T'·d))(x − q)` (`dmix` alone for a
/// token without a code), `dC_j = (2/(T'·d)) Σ_{t: id_t = j} (c_j − x_t)`.
pub fn losses_backward(
    shape: &CodebookShape,
    x: &[f64],
    codes: &[f64],
    ids: &[i32],
    beta: f64,
    dmix: Option<&[f64]>,
) -> (Vec<f64>, Vec<f64>) {
    let d = shape.dim;
    let live = live_tokens(shape, ids);
    let scale = if live == 0 { 0.0 } else { 2.0 / (live * d) as f64 };
    let (q, _) = quantize(shape, x, codes, ids, 1.0);
    let dx = (0..shape.tokens * d)
        .map(|i| {
            let commitment = if has_code(shape, ids, i / d) {
                beta * scale * (x[i] - q[i])
            } else {
                0.0
            };
            dmix.map_or(0.0, |g| g[i]) + commitment
        })
        .collect();
    let mut dcodes = vec![0.0; shape.codes * d];
    for (t, &id) in ids.iter().enumerate().take(shape.tokens) {
        if id < 0 || id as usize >= shape.codes {
            continue;
        }
        let j = id as usize;
        for e in 0..d {
            dcodes[j * d + e] += scale * (codes[j * d + e] - x[t * d + e]);
        }
    }
    (dx, dcodes)
}

/// The EMA state after one step, as [`crate::ops::codebook::ema_update`] leaves it.
#[derive(Debug, Clone, PartialEq)]
pub struct Ema {
    pub counts: Vec<f64>,
    pub sums: Vec<f64>,
    pub codes: Vec<f64>,
    pub dead: Vec<bool>,
    pub total: f64,
}

/// One EMA step from `counts` `[Nc]` and `sums` `[Nc, d]` with this step's tokens and ids.
pub fn ema_update(
    shape: &CodebookShape,
    config: &EmaConfig,
    x: &[f64],
    ids: &[i32],
    counts: &[f64],
    sums: &[f64],
) -> Ema {
    let (d, nc) = (shape.dim, shape.codes);
    let (gamma, eps) = (config.decay as f64, config.eps as f64);
    let mut n = vec![0.0; nc];
    let mut m = vec![0.0; nc * d];
    for (t, &id) in ids.iter().enumerate().take(shape.tokens) {
        if id < 0 || id as usize >= nc {
            continue;
        }
        n[id as usize] += 1.0;
        for e in 0..d {
            m[id as usize * d + e] += x[t * d + e];
        }
    }
    let counts: Vec<f64> = (0..nc).map(|j| gamma * counts[j] + (1.0 - gamma) * n[j]).collect();
    let sums: Vec<f64> = (0..nc * d).map(|i| gamma * sums[i] + (1.0 - gamma) * m[i]).collect();
    let total: f64 = counts.iter().sum();
    let codes = (0..nc * d)
        .map(|i| {
            let smoothed = (counts[i / d] + eps) / (total + nc as f64 * eps) * total;
            sums[i] / smoothed
        })
        .collect();
    let dead = counts.iter().map(|&c| c < config.dead_threshold as f64).collect();
    Ema {
        counts,
        sums,
        codes,
        dead,
        total,
    }
}
