//! Router scoring (math §1) on the host: z = score(X) and its gradients, f64, plain loops.
//! Layouts as in [`crate::ops::gate`]; every tensor a flat row-major slice.
use crate::ops::gate::{GateForm, GateShape};

/// The parameters of one gate as host values (layouts in `ops::gate`).
#[derive(Debug, Clone)]
pub enum GateParams {
    Linear {
        w: Vec<f64>,
        b: Option<Vec<f64>>,
    },
    LowRank {
        u: Vec<f64>,
        v: Vec<f64>,
        b: Option<Vec<f64>>,
        c: Option<Vec<f64>>,
    },
    Symmetric {
        u: Vec<f64>,
        b: Option<Vec<f64>>,
        c: Option<Vec<f64>>,
    },
    Attention {
        wq: Vec<f64>,
        k: Vec<f64>,
    },
    Full {
        a: Vec<f64>,
        b: Option<Vec<f64>>,
        c: Option<Vec<f64>>,
    },
}

impl GateParams {
    pub fn form(&self) -> GateForm {
        match self {
            GateParams::Linear { .. } => GateForm::Linear,
            GateParams::LowRank { .. } => GateForm::LowRank,
            GateParams::Symmetric { .. } => GateForm::Symmetric,
            GateParams::Attention { .. } => GateForm::Attention,
            GateParams::Full { .. } => GateForm::Full,
        }
    }

    /// Every tensor present, by name, in declaration order (the order of `ops::gate`'s params).
    pub fn tensors(&self) -> Vec<(&'static str, &Vec<f64>)> {
        let all: Vec<(&'static str, Option<&Vec<f64>>)> = match self {
            GateParams::Linear { w, b } => vec![("w", Some(w)), ("b", b.as_ref())],
            GateParams::LowRank { u, v, b, c } => {
                vec![("u", Some(u)), ("v", Some(v)), ("b", b.as_ref()), ("c", c.as_ref())]
            }
            GateParams::Symmetric { u, b, c } => vec![("u", Some(u)), ("b", b.as_ref()), ("c", c.as_ref())],
            GateParams::Attention { wq, k } => vec![("wq", Some(wq)), ("k", Some(k))],
            GateParams::Full { a, b, c } => vec![("a", Some(a)), ("b", b.as_ref()), ("c", c.as_ref())],
        };
        all.into_iter().filter_map(|(name, t)| Some((name, t?))).collect()
    }

    /// The same tensors, mutably, in the same order (for finite differences).
    pub fn tensors_mut(&mut self) -> Vec<(&'static str, &mut Vec<f64>)> {
        let all: Vec<(&'static str, Option<&mut Vec<f64>>)> = match self {
            GateParams::Linear { w, b } => vec![("w", Some(w)), ("b", b.as_mut())],
            GateParams::LowRank { u, v, b, c } => {
                vec![("u", Some(u)), ("v", Some(v)), ("b", b.as_mut()), ("c", c.as_mut())]
            }
            GateParams::Symmetric { u, b, c } => vec![("u", Some(u)), ("b", b.as_mut()), ("c", c.as_mut())],
            GateParams::Attention { wq, k } => vec![("wq", Some(wq)), ("k", Some(k))],
            GateParams::Full { a, b, c } => vec![("a", Some(a)), ("b", b.as_mut()), ("c", c.as_mut())],
        };
        all.into_iter().filter_map(|(name, t)| Some((name, t?))).collect()
    }
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(a, b)| a * b).sum()
}

/// Row `i` of a row-major matrix with `n` columns.
fn row(m: &[f64], i: usize, n: usize) -> &[f64] {
    &m[i * n..(i + 1) * n]
}

/// An input element that makes its row non-finite (math §1): NaN, ±∞, or a magnitude of at
/// least 2^64, whose square overflows f32.
pub fn is_huge_input(v: f64) -> bool {
    v.is_nan() || v.abs() >= 18446744073709551616.0
}

/// z `[T, E]` of every form; NaN rows for rows of `x` with an [`is_huge_input`] element.
pub fn scores(shape: &GateShape, params: &GateParams, x: &[f64]) -> Vec<f64> {
    let (d, e_count, r) = (shape.dim, shape.experts, shape.rank);
    let mut z = vec![0.0; shape.tokens * e_count];
    for t in 0..shape.tokens {
        let x_t = row(x, t, d);
        if x_t.iter().any(|&v| is_huge_input(v)) {
            z[t * e_count..(t + 1) * e_count].fill(f64::NAN);
            continue;
        }
        for e in 0..e_count {
            let linear = |b: &Option<Vec<f64>>, c: &Option<Vec<f64>>| {
                b.as_ref().map_or(0.0, |b| dot(row(b, e, d), x_t)) + c.as_ref().map_or(0.0, |c| c[e])
            };
            z[t * e_count + e] = match params {
                GateParams::Linear { w, b } => dot(row(w, e, d), x_t) + b.as_ref().map_or(0.0, |b| b[e]),
                GateParams::LowRank { u, v, b, c } => {
                    let quad: f64 = (0..r)
                        .map(|j| dot(row(u, e * r + j, d), x_t) * dot(row(v, e * r + j, d), x_t))
                        .sum();
                    quad + linear(b, c)
                }
                GateParams::Symmetric { u, b, c } => {
                    let quad: f64 = (0..r).map(|j| dot(row(u, e * r + j, d), x_t).powi(2)).sum();
                    quad + linear(b, c)
                }
                GateParams::Attention { wq, k } => {
                    let qk: f64 = (0..r)
                        .map(|j| dot(row(wq, j, d), x_t) * dot(row(k, e * r + j, d), x_t))
                        .sum();
                    qk / (r as f64).sqrt()
                }
                GateParams::Full { a, b, c } => {
                    let quad: f64 = (0..d).map(|j| x_t[j] * dot(row(a, e * d + j, d), x_t)).sum();
                    quad + linear(b, c)
                }
            };
        }
    }
    z
}

/// Gradients of `Σ dz ⊙ z`: dX `[T, d]` and each parameter's gradient, named and ordered
/// like [`GateParams::tensors`].
pub struct GateGradients {
    pub dx: Vec<f64>,
    pub params: Vec<(&'static str, Vec<f64>)>,
}

/// Backward of [`scores`] (math §1): every gradient from dz `[T, E]`.
pub fn scores_backward(shape: &GateShape, params: &GateParams, x: &[f64], dz: &[f64]) -> GateGradients {
    let (d, e_count, r) = (shape.dim, shape.experts, shape.rank);
    let mut dx = vec![0.0; shape.tokens * d];
    let mut grads: Vec<(&'static str, Vec<f64>)> = params
        .tensors()
        .into_iter()
        .map(|(name, t)| (name, vec![0.0; t.len()]))
        .collect();
    let index = |name: &str| grads.iter().position(|(n, _)| *n == name);
    let (iw, ib, iu, iv, ic, iq, ik, ia) = (
        index("w"),
        index("b"),
        index("u"),
        index("v"),
        index("c"),
        index("wq"),
        index("k"),
        index("a"),
    );
    // grad[slot][row n of width d] += s · x_t;  dx_t += s · weight row.
    fn axpy(out: &mut [f64], s: f64, v: &[f64]) {
        for (o, v) in out.iter_mut().zip(v) {
            *o += s * v;
        }
    }
    for t in 0..shape.tokens {
        let x_t = row(x, t, d).to_vec();
        let dx_t = &mut dx[t * d..(t + 1) * d];
        for e in 0..e_count {
            let g = dz[t * e_count + e];
            if g == 0.0 {
                // Every term is linear in g: nothing to add, even where the row's projections
                // are not finite (a row routed nowhere, math §2, has dz = 0 and may be NaN).
                continue;
            }
            // The linear term B_e·x + c_e (b of the linear gate is a bias, handled there).
            let linear = |b: &Option<Vec<f64>>, dx_t: &mut [f64], grads: &mut Vec<(&'static str, Vec<f64>)>| {
                if let (Some(b), Some(ib)) = (b, ib) {
                    axpy(dx_t, g, row(b, e, d));
                    axpy(&mut grads[ib].1[e * d..(e + 1) * d], g, &x_t);
                }
                if let Some(ic) = ic {
                    grads[ic].1[e] += g;
                }
            };
            match params {
                GateParams::Linear { w, .. } => {
                    axpy(dx_t, g, row(w, e, d));
                    axpy(&mut grads[iw.unwrap()].1[e * d..(e + 1) * d], g, &x_t);
                    if let Some(ib) = ib {
                        grads[ib].1[e] += g;
                    }
                }
                GateParams::LowRank { u, v, b, .. } => {
                    for j in 0..r {
                        let n = e * r + j;
                        let (p, q) = (dot(row(u, n, d), &x_t), dot(row(v, n, d), &x_t));
                        axpy(dx_t, g * q, row(u, n, d));
                        axpy(dx_t, g * p, row(v, n, d));
                        axpy(&mut grads[iu.unwrap()].1[n * d..(n + 1) * d], g * q, &x_t);
                        axpy(&mut grads[iv.unwrap()].1[n * d..(n + 1) * d], g * p, &x_t);
                    }
                    linear(b, dx_t, &mut grads);
                }
                GateParams::Symmetric { u, b, .. } => {
                    for j in 0..r {
                        let n = e * r + j;
                        let p = dot(row(u, n, d), &x_t);
                        axpy(dx_t, 2.0 * g * p, row(u, n, d));
                        axpy(&mut grads[iu.unwrap()].1[n * d..(n + 1) * d], 2.0 * g * p, &x_t);
                    }
                    linear(b, dx_t, &mut grads);
                }
                GateParams::Attention { wq, k } => {
                    let s = g / (r as f64).sqrt();
                    for j in 0..r {
                        let n = e * r + j;
                        let (q, kx) = (dot(row(wq, j, d), &x_t), dot(row(k, n, d), &x_t));
                        axpy(dx_t, s * kx, row(wq, j, d));
                        axpy(dx_t, s * q, row(k, n, d));
                        axpy(&mut grads[iq.unwrap()].1[j * d..(j + 1) * d], s * kx, &x_t);
                        axpy(&mut grads[ik.unwrap()].1[n * d..(n + 1) * d], s * q, &x_t);
                    }
                }
                GateParams::Full { a, b, .. } => {
                    let a_e = &a[e * d * d..(e + 1) * d * d];
                    for j in 0..d {
                        for l in 0..d {
                            // z ∋ x_j A[j][l] x_l
                            dx_t[j] += g * a_e[j * d + l] * x_t[l];
                            dx_t[l] += g * a_e[j * d + l] * x_t[j];
                            grads[ia.unwrap()].1[e * d * d + j * d + l] += g * x_t[j] * x_t[l];
                        }
                    }
                    linear(b, dx_t, &mut grads);
                }
            }
        }
    }
    GateGradients { dx, params: grads }
}
