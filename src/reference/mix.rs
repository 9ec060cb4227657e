//! The mixing gate's oracle (math §6, last bullet), in f64 over host slices: logits `[T, 2]`,
//! rows `[T, d]` given as f64. `[a0, a1] = softmax(l)` as `a0 = sigmoid(l0 - l1)`,
//! `a1 = sigmoid(l1 - l0)`: a NaN logit or two equal infinities give NaN weights (a NaN output
//! row, and a token the mix routes nowhere: exact zero gradients), one infinity against a finite
//! logit gives (1, 0) or (0, 1). A zero weight passes exactly zero gradient.

/// `[a0, a1]` of one token's logits.
pub fn weights(l0: f32, l1: f32) -> [f64; 2] {
    let diff = l0 as f64 - l1 as f64;
    [1.0 / (1.0 + (-diff).exp()), 1.0 / (1.0 + diff.exp())]
}

/// `y = a0·y_cont + a1·y_disc` per token.
pub fn forward(logits: &[f32], y_cont: &[f64], y_disc: &[f64], d: usize) -> Vec<f64> {
    let mut y = vec![0.0; y_cont.len()];
    for (t, l) in logits.chunks_exact(2).enumerate() {
        let [a0, a1] = weights(l[0], l[1]);
        for c in t * d..(t + 1) * d {
            y[c] = a0 * y_cont[c] + a1 * y_disc[c];
        }
    }
    y
}

/// `a · g`, exactly 0 when the weight `a` is (whatever `g` holds).
fn weighted(a: f64, g: f64) -> f64 {
    if a == 0.0 { 0.0 } else { a * g }
}

/// The backward of [`forward`]: `(dy_cont, dy_disc, dlogits)`, with
/// `dl0 = a0 a1 (<dy, y_cont> - <dy, y_disc>)` and `dl1 = -dl0`; a token with NaN weights gets
/// zeros.
pub fn backward(
    logits: &[f32],
    y_cont: &[f64],
    y_disc: &[f64],
    dy: &[f64],
    d: usize,
) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let (mut dy_cont, mut dy_disc) = (vec![0.0; dy.len()], vec![0.0; dy.len()]);
    let mut dlogits = vec![0.0; logits.len()];
    for (t, l) in logits.chunks_exact(2).enumerate() {
        let [a0, a1] = match weights(l[0], l[1]) {
            [a0, _] if a0.is_nan() => [0.0, 0.0],
            a => a,
        };
        let (mut da0, mut da1) = (0.0, 0.0);
        for c in t * d..(t + 1) * d {
            dy_cont[c] = weighted(a0, dy[c]);
            dy_disc[c] = weighted(a1, dy[c]);
            da0 += dy[c] * y_cont[c];
            da1 += dy[c] * y_disc[c];
        }
        let g = weighted(a0 * a1, da0 - da1);
        dlogits[2 * t] = g;
        dlogits[2 * t + 1] = -g;
    }
    (dy_cont, dy_disc, dlogits)
}
