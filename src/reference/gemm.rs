//! The grouped expert GEMM (math §5) in f64 loops: forward with its epilogues, `dA`, `dB`.
//! Inputs are host f32 values (16-bit inputs converted exactly); the same layouts as
//! `ops::gemm`. Rows outside every group are left at 0.
use crate::ops::gemm::{ARows, DgradEpilogue, Epilogue, GemmShape};

/// The groups on the host: `offsets [E + 1]`, `sorted_rows [rows]` (optional), `rows`.
pub struct HostGroups<'a> {
    pub offsets: &'a [i32],
    pub sorted_rows: Option<&'a [i32]>,
    pub rows: usize,
}

impl HostGroups<'_> {
    /// The rows of group e, clamped to `[0, rows)` as the kernels do.
    pub fn range(&self, e: usize) -> std::ops::Range<usize> {
        let clamp = |v: i32| (v.max(0) as usize).min(self.rows);
        let start = clamp(self.offsets[e]);
        start..clamp(self.offsets[e + 1]).max(start)
    }

    /// The A row of grouped row r: itself, or the token of its slot; `None` for padding.
    fn a_row(&self, r: usize, mode: ARows, a_rows: usize) -> Option<usize> {
        let source = match mode {
            ARows::Contiguous => r,
            ARows::Gathered { top_k } => {
                let slot = self.sorted_rows.expect("gathered A needs sorted_rows")[r];
                if slot < 0 {
                    return None;
                }
                slot as usize / top_k
            }
        };
        (source < a_rows).then_some(source)
    }

    /// The weight of row r: `weights[sorted_rows[r]]`, 0 for padding; 1 without weights.
    fn weight(&self, r: usize, weights: Option<&[f32]>) -> f64 {
        let Some(w) = weights else { return 1.0 };
        let slot = self.sorted_rows.expect("row weights need sorted_rows")[r];
        if slot < 0 || slot as usize >= w.len() {
            0.0
        } else {
            w[slot as usize] as f64
        }
    }
}

fn dot(x: &[f32], y: &[f32]) -> f64 {
    x.iter().zip(y).map(|(&p, &q)| p as f64 * q as f64).sum()
}

fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

/// The forward's output (`[rows, N]`, or `[rows, N/2]` for SwiGLU) and, for SwiGLU, `GU [rows, N]`.
pub fn forward(
    a: &[f32],
    mode: ARows,
    b: &[f32],
    shape: GemmShape,
    groups: &HostGroups,
    epilogue: Epilogue,
    weights: Option<&[f32]>,
) -> (Vec<f64>, Vec<f64>) {
    let GemmShape { experts, n, k } = shape;
    let a_rows = a.len() / k;
    let h = n / 2;
    let out_cols = if epilogue == Epilogue::SwiGlu { h } else { n };
    let mut out = vec![0.0; groups.rows * out_cols];
    let mut gu = vec![
        0.0;
        if epilogue == Epilogue::SwiGlu {
            groups.rows * n
        } else {
            0
        }
    ];
    for e in 0..experts {
        for r in groups.range(e) {
            let s = groups.weight(r, weights);
            let c: Vec<f64> = (0..n)
                .map(|j| match groups.a_row(r, mode, a_rows) {
                    Some(src) => s * dot(&a[src * k..][..k], &b[(e * n + j) * k..][..k]),
                    None => 0.0,
                })
                .collect();
            match epilogue {
                Epilogue::Store => out[r * n..][..n].copy_from_slice(&c),
                Epilogue::SwiGlu => {
                    for j in 0..h {
                        let (g, u) = (c[j], c[h + j]);
                        out[r * h + j] = g * sigmoid(g) * u;
                    }
                    gu[r * n..][..n].copy_from_slice(&c);
                }
            }
        }
    }
    (out, gu)
}

/// `dA_e = s_r dC_e B_e` (`[rows, K]`), or through the SwiGLU backward with `gu [rows, 2K]`:
/// `dGU = [dH U silu'(G) | dH silu(G)]` (`[rows, 2K]`).
#[allow(clippy::too_many_arguments)]
pub fn dgrad(
    dc: &[f32],
    b: &[f32],
    shape: GemmShape,
    groups: &HostGroups,
    epilogue: DgradEpilogue,
    weights: Option<&[f32]>,
    gu: Option<&[f32]>,
) -> Vec<f64> {
    let GemmShape { experts, n, k } = shape;
    let cols = if epilogue == DgradEpilogue::SwiGluBackward {
        2 * k
    } else {
        k
    };
    let mut out = vec![0.0; groups.rows * cols];
    for e in 0..experts {
        for r in groups.range(e) {
            let s = groups.weight(r, weights);
            for c in 0..k {
                let dh = s
                    * (0..n)
                        .map(|j| dc[r * n + j] as f64 * b[(e * n + j) * k + c] as f64)
                        .sum::<f64>();
                match epilogue {
                    DgradEpilogue::Store => out[r * k + c] = dh,
                    DgradEpilogue::SwiGluBackward => {
                        let gu = gu.expect("SwiGluBackward needs gu");
                        let (g, u) = (gu[r * 2 * k + c] as f64, gu[r * 2 * k + k + c] as f64);
                        let sg = sigmoid(g);
                        out[r * 2 * k + c] = dh * u * sg * (1.0 + g * (1.0 - sg));
                        out[r * 2 * k + k + c] = dh * g * sg;
                    }
                }
            }
        }
    }
    out
}

/// `dB_e = dC_e^T A_e` (`[E, N, K]`) for experts with `selected[e]` (all when `None`), added to
/// `initial` (accumulate mode) or replacing it; unselected experts keep `initial`.
#[allow(clippy::too_many_arguments)]
pub fn wgrad(
    dc: &[f32],
    a: &[f32],
    mode: ARows,
    shape: GemmShape,
    groups: &HostGroups,
    selected: Option<&[bool]>,
    accumulate: bool,
    initial: &[f32],
) -> Vec<f64> {
    let GemmShape { experts, n, k } = shape;
    let a_rows = a.len() / k;
    let mut db: Vec<f64> = initial.iter().map(|&v| v as f64).collect();
    for e in 0..experts {
        if selected.is_some_and(|s| !s[e]) {
            continue;
        }
        for j in 0..n {
            for c in 0..k {
                let sum: f64 = groups
                    .range(e)
                    .filter_map(|r| groups.a_row(r, mode, a_rows).map(|src| (r, src)))
                    .map(|(r, src)| dc[r * n + j] as f64 * a[src * k + c] as f64)
                    .sum();
                let slot = &mut db[(e * n + j) * k + c];
                *slot = if accumulate { *slot + sum } else { sum };
            }
        }
    }
    db
}

/// [`wgrad`] in the sparse mode of a pass (`ops::gemm::WgradWrite::Sparse`), one call: an expert
/// without rows (or not `selected`) keeps `db` and its `written` flag; any other is replaced when
/// its flag is false, else added to, and its flag set. `db` (`[E, N, K]`) and `written` (`[E]`)
/// are the pass's state, updated in place.
#[allow(clippy::too_many_arguments)]
pub fn wgrad_sparse(
    dc: &[f32],
    a: &[f32],
    mode: ARows,
    shape: GemmShape,
    groups: &HostGroups,
    selected: Option<&[bool]>,
    written: &mut [bool],
    db: &mut [f64],
) {
    let per_expert = shape.n * shape.k;
    let zeros = vec![0.0f32; shape.experts * per_expert];
    let fresh = wgrad(dc, a, mode, shape, groups, selected, false, &zeros);
    for e in 0..shape.experts {
        if groups.range(e).is_empty() || selected.is_some_and(|s| !s[e]) {
            continue;
        }
        let range = e * per_expert..(e + 1) * per_expert;
        for (slot, v) in db[range.clone()].iter_mut().zip(&fresh[range]) {
            *slot = if written[e] { *slot + v } else { *v };
        }
        written[e] = true;
    }
}
