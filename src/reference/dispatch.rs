//! Dispatch (math §4) on the CPU: the routing map by plain loops over experts and slots, and
//! the row movers with f64 accumulation. Same argument order as `ops::dispatch`.
use crate::ops::dispatch::{MapConfig, STATUS_CAPACITY_DROPPED, STATUS_INVALID_IDS, STATUS_LEN};
use crate::ops::router::NO_EXPERT;

/// The routing map on the host; fields as in `ops::dispatch::RoutingMap`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoutingMap {
    pub counts: Vec<i32>,
    pub offsets: Vec<i32>,
    pub sorted_rows: Vec<i32>,
    pub inverse: Vec<i32>,
    pub status: [i32; STATUS_LEN],
}

/// The map of `ids` (`[tokens, k]`).
/// 1. Slot s = t·k + j with an id outside `[0, E)`: never laid out; counted as invalid unless it
///    is [`NO_EXPERT`] (routed nowhere).
/// 2. Capacity C: each local expert keeps its first C slots visiting j = 0, 1, ... and, within
///    one j, t = 0, 1, ...; the rest are dropped and counted.
/// 3. Each local expert in order: its kept slots in increasing s, then -1 up to a multiple of
///    `align`. Rows after the last group, up to `config.sorted_rows_len`, hold -1.
///
/// # Panics
///
/// When `config.sorted_rows_len(tokens, k)` is an `Err` (a config the device op refuses too).
pub fn routing_map(ids: &[i32], tokens: usize, k: usize, config: &MapConfig) -> RoutingMap {
    let slots = tokens * k;
    assert_eq!(ids.len(), slots, "ids: [T, k]");
    let local = config.local_range();
    let mut status = [0i32; STATUS_LEN];
    status[STATUS_INVALID_IDS] = ids
        .iter()
        .filter(|&&e| e != NO_EXPERT && (e < 0 || e as usize >= config.num_experts))
        .count() as i32;

    let mut kept = vec![false; slots];
    for e in local.clone() {
        let capacity = config.capacity_per_expert(tokens, k).unwrap_or(slots);
        let mut taken = 0;
        for j in 0..k {
            for t in 0..tokens {
                let s = t * k + j;
                if ids[s] == e as i32 {
                    if taken < capacity {
                        kept[s] = true;
                        taken += 1;
                    } else {
                        status[STATUS_CAPACITY_DROPPED] += 1;
                    }
                }
            }
        }
    }

    let mut counts = vec![];
    let mut offsets = vec![0i32];
    let mut sorted_rows = vec![];
    let mut inverse = vec![-1i32; slots];
    for e in local {
        let group: Vec<usize> = (0..slots).filter(|&s| kept[s] && ids[s] == e as i32).collect();
        counts.push(group.len() as i32);
        for s in group {
            inverse[s] = sorted_rows.len() as i32;
            sorted_rows.push(s as i32);
        }
        while sorted_rows.len() % config.align != 0 {
            sorted_rows.push(-1);
        }
        offsets.push(sorted_rows.len() as i32);
    }
    let rows = config
        .sorted_rows_len(tokens, k)
        .expect("the reference maps valid configs only");
    sorted_rows.resize(rows, -1);
    RoutingMap {
        counts,
        offsets,
        sorted_rows,
        inverse,
        status,
    }
}

/// `rows[t] = t`, or -1 for a token routed nowhere (its first id is [`NO_EXPERT`]).
pub fn live_rows(ids: &[i32], tokens: usize, k: usize) -> Vec<i32> {
    (0..tokens)
        .map(|t| if ids[t * k] == NO_EXPERT { -1 } else { t as i32 })
        .collect()
}

/// Row `r` of `rows` (`[n, d]`), or None for an index outside it.
fn row(rows: &[f32], index: i32, d: usize) -> Option<&[f32]> {
    let start = usize::try_from(index).ok()? * d;
    rows.get(start..start + d)
}

/// `xp[r] = x[sorted_rows[r] / k]`, zeros where `sorted_rows[r]` is not a slot.
pub fn permute(x: &[f32], sorted_rows: &[i32], tokens: usize, k: usize, d: usize) -> Vec<f64> {
    let mut xp = vec![0.0; sorted_rows.len() * d];
    for (r, &s) in sorted_rows.iter().enumerate() {
        if s >= 0 && (s as usize) < tokens * k {
            let token = row(x, s / k as i32, d).expect("x: [T, d]");
            for (o, &v) in xp[r * d..(r + 1) * d].iter_mut().zip(token) {
                *o = v as f64;
            }
        }
    }
    xp
}

/// `y[t] = Σ_j w[t, j] · yp[inverse[t·k + j]] + residual[t]`; slots whose inverse is not a row
/// of `yp` contribute nothing, unless their weight is NaN (a row routed nowhere): then `y[t]` is
/// NaN; no weights means 1.
pub fn combine(
    yp: &[f32],
    inverse: &[i32],
    weights: Option<&[f32]>,
    residual: Option<&[f32]>,
    tokens: usize,
    k: usize,
    d: usize,
) -> Vec<f64> {
    let mut y = vec![0.0; tokens * d];
    for t in 0..tokens {
        let out = &mut y[t * d..(t + 1) * d];
        for j in 0..k {
            let s = t * k + j;
            let w = weights.map_or(1.0, |w| w[s] as f64);
            let Some(expert_row) = row(yp, inverse[s], d) else {
                if w.is_nan() {
                    out.fill(f64::NAN);
                }
                continue;
            };
            for (o, &v) in out.iter_mut().zip(expert_row) {
                *o += w * v as f64;
            }
        }
        if let Some(residual) = residual {
            for (o, &v) in out.iter_mut().zip(&residual[t * d..(t + 1) * d]) {
                *o += v as f64;
            }
        }
    }
    y
}

/// `dx[t] = Σ_j dxp[inverse[t·k + j]]`.
pub fn permute_backward(dxp: &[f32], inverse: &[i32], tokens: usize, k: usize, d: usize) -> Vec<f64> {
    combine(dxp, inverse, None, None, tokens, k, d)
}

/// `dyp[r] = w[s] · dy[s / k]` for s = `sorted_rows[r]` (zeros for non-slots) and
/// `dw[s] = <dy[s / k], yp[r]>` (0 for slots in no row). Returns `(dyp, dw)`.
pub fn combine_backward(
    dy: &[f32],
    yp: &[f32],
    sorted_rows: &[i32],
    weights: Option<&[f32]>,
    tokens: usize,
    k: usize,
    d: usize,
) -> (Vec<f64>, Vec<f64>) {
    let mut dyp = vec![0.0; sorted_rows.len() * d];
    let mut dw = vec![0.0; tokens * k];
    for (r, &s) in sorted_rows.iter().enumerate() {
        if s < 0 || s as usize >= tokens * k {
            continue;
        }
        let s = s as usize;
        let grad = row(dy, (s / k) as i32, d).expect("dy: [T, d]");
        let w = weights.map_or(1.0, |w| w[s] as f64);
        for (o, &g) in dyp[r * d..(r + 1) * d].iter_mut().zip(grad) {
            *o = w * g as f64;
        }
        if let Some(expert_row) = row(yp, r as i32, d) {
            dw[s] = grad.iter().zip(expert_row).map(|(&g, &v)| g as f64 * v as f64).sum();
        }
    }
    (dyp, dw)
}
