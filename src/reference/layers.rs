//! Whole-layer references (math §2–§7), composed only of the per-family references: the same
//! stages as `crate::layers`, each intermediate rounded by `store` where the device stores it
//! in the layer's dtype (pass `|v| v as f32` for an f32 layer; logits, combine weights and their
//! gradients are always f32).
use super::dispatch::{self, RoutingMap};
use super::gate::{self, GateParams};
use super::gemm::{self, HostGroups};
use super::router;
use super::{codebook, mix};
use crate::layers::vq::{COMMITMENT_BETA, MIX_COEFFICIENT, VqWeights, discrete_config, mix_config};
use crate::layers::{HostWeights, MoeConfig, RouterKind};
use crate::ops::codebook::CodebookShape;
use crate::ops::gate::{GateForm, GateShape};
use crate::ops::gemm::{ARows, DgradEpilogue, Epilogue, GemmShape};

/// How a stored intermediate is rounded (to the layer's dtype, as an f32 value).
pub type Store<'a> = &'a dyn Fn(f64) -> f32;

fn stored(values: &[f64], store: Store) -> Vec<f32> {
    values.iter().map(|&v| store(v)).collect()
}

fn f32s(values: &[f64]) -> Vec<f32> {
    values.iter().map(|&v| v as f32).collect()
}

fn f64s(values: &[f32]) -> Vec<f64> {
    values.iter().map(|&v| v as f64).collect()
}

/// The gate tensors of `weights` as the gate reference takes them.
/// (Not used by the codebook router, whose only tensor is its codes.)
pub fn gate_params(config: &MoeConfig, weights: &HostWeights) -> GateParams {
    let t = |name: &str| f64s(weights.gate_tensor(name));
    // An optional tensor left out (or empty) is absent, as in the layers.
    let some = |name: &str| Some(t(name)).filter(|v| !v.is_empty());
    match config.gate_form() {
        GateForm::Linear => GateParams::Linear {
            w: t("w"),
            b: some("b"),
        },
        GateForm::LowRank => GateParams::LowRank {
            u: t("u"),
            v: t("v"),
            b: some("b"),
            c: some("c"),
        },
        GateForm::Symmetric => GateParams::Symmetric {
            u: t("u"),
            b: some("b"),
            c: some("c"),
        },
        GateForm::Attention => GateParams::Attention { wq: t("wq"), k: t("k") },
        GateForm::Full => GateParams::Full {
            a: t("a"),
            b: some("b"),
            c: some("c"),
        },
    }
}

/// Everything one routed pass computes (what the device layer keeps for backward, plus y).
#[derive(Debug, Clone)]
pub struct MoeForward {
    pub y: Vec<f64>,
    pub z: Vec<f32>,
    pub ids: Vec<i32>,
    pub weights: Vec<f32>,
    pub map: RoutingMap,
    pub gu: Vec<f32>,
    pub h: Vec<f32>,
    pub yp: Vec<f32>,
    /// The shared FFN's GU and H (empty without shared experts).
    pub shared_gu: Vec<f32>,
    pub shared_h: Vec<f32>,
    pub aux_loss: f64,
    pub z_loss: f64,
}

/// The gradients of one routed pass.
#[derive(Debug, Clone)]
pub struct MoeGradients {
    pub dx: Vec<f64>,
    /// Gate tensor gradients by name.
    pub gate: Vec<(&'static str, Vec<f64>)>,
    pub w1: Vec<f64>,
    pub w2: Vec<f64>,
    pub shared_w1: Vec<f64>,
    pub shared_w2: Vec<f64>,
}

struct Shapes {
    gemm1: GemmShape,
    gemm2: GemmShape,
    shared1: GemmShape,
    shared2: GemmShape,
    rows: usize,
}

fn shapes(config: &MoeConfig, tokens: usize) -> Shapes {
    let (e, d, h, hs) = (config.experts, config.dim, config.hidden, config.shared_hidden());
    Shapes {
        gemm1: GemmShape {
            experts: e,
            n: 2 * h,
            k: d,
        },
        gemm2: GemmShape { experts: e, n: d, k: h },
        shared1: GemmShape {
            experts: 1,
            n: 2 * hs,
            k: d,
        },
        shared2: GemmShape {
            experts: 1,
            n: d,
            k: hs,
        },
        rows: config
            .map_config()
            .sorted_rows_len(tokens, config.k)
            .expect("the reference runs validated configs only"),
    }
}

/// `a + b`, rounded once (the device's one-to-one combine).
fn add(a: &[f32], b: &[f32], tokens: usize, d: usize, store: Store) -> Vec<f32> {
    let identity: Vec<i32> = (0..tokens as i32).collect();
    stored(&dispatch::combine(a, &identity, None, Some(b), tokens, 1, d), store)
}

/// One routed pass: `y = Σ_j w_j FFN_{id_j}(x) [+ FFN_shared(x)] [+ residual]`, and the losses.
pub fn moe_forward(
    config: &MoeConfig,
    weights: &HostWeights,
    x: &[f32],
    tokens: usize,
    residual: Option<&[f32]>,
    store: Store,
) -> MoeForward {
    if config.router == RouterKind::Codebook {
        // Nearest code (Nc = E: the code is the expert), weight 1 (NaN for a row routed
        // nowhere); no logits, no losses.
        let shape = CodebookShape {
            tokens,
            dim: config.dim,
            codes: config.experts,
        };
        let codes = f64s(weights.gate_tensor("codes"));
        let nearest = codebook::nearest(&shape, &f64s(x), &codes, 1, config.experts);
        return routed_forward(
            config,
            weights,
            x,
            tokens,
            nearest.experts,
            f32s(&nearest.weights),
            residual,
            store,
        );
    }
    let z = f32s(&gate::scores(
        &config.gate_shape(tokens),
        &gate_params(config, weights),
        &f64s(x),
    ));
    let router_config = config.router_config();
    let bias = (!weights.router_bias.is_empty()).then_some(&weights.router_bias[..]);
    let selection = router::select(&router_config, &z, bias);
    let aux_loss = config
        .aux_config()
        .map_or(0.0, |aux| router::aux_loss(&router_config, &aux, &z, &selection.ids));
    let z_loss = if config.z_loss > 0.0 {
        router::z_loss(config.experts, config.z_loss, &z)
    } else {
        0.0
    };
    MoeForward {
        z,
        aux_loss,
        z_loss,
        ..routed_forward(
            config,
            weights,
            x,
            tokens,
            selection.ids,
            f32s(&selection.weights),
            residual,
            store,
        )
    }
}

/// The pass after routing, with the ids and combine weights given (`[T, k]`): dispatch, the
/// experts, shared experts, combine. `z` is left empty and the losses 0 (no router).
#[allow(clippy::too_many_arguments)]
pub fn routed_forward(
    config: &MoeConfig,
    weights: &HostWeights,
    x: &[f32],
    tokens: usize,
    ids: Vec<i32>,
    combine_weights: Vec<f32>,
    residual: Option<&[f32]>,
    store: Store,
) -> MoeForward {
    let (k, d) = (config.k, config.dim);
    let s = shapes(config, tokens);
    let map = dispatch::routing_map(&ids, tokens, k, &config.map_config());
    let groups = HostGroups {
        offsets: &map.offsets,
        sorted_rows: Some(&map.sorted_rows),
        rows: s.rows,
    };
    let gathered = ARows::Gathered { top_k: k };
    let (h, gu) = gemm::forward(x, gathered, &weights.w1, s.gemm1, &groups, Epilogue::SwiGlu, None);
    let (h, gu) = (stored(&h, store), stored(&gu, store));
    let (yp, _) = gemm::forward(
        &h,
        ARows::Contiguous,
        &weights.w2,
        s.gemm2,
        &groups,
        Epilogue::Store,
        None,
    );
    let yp = stored(&yp, store);
    let (mut shared_gu, mut shared_h) = (vec![], vec![]);
    let shared_y = (config.shared_experts > 0).then(|| {
        let offsets = [0, tokens as i32];
        let one = HostGroups {
            offsets: &offsets,
            sorted_rows: None,
            rows: tokens,
        };
        let (h, gu) = gemm::forward(
            x,
            ARows::Contiguous,
            &weights.shared_w1,
            s.shared1,
            &one,
            Epilogue::SwiGlu,
            None,
        );
        (shared_h, shared_gu) = (stored(&h, store), stored(&gu, store));
        let (y, _) = gemm::forward(
            &shared_h,
            ARows::Contiguous,
            &weights.shared_w2,
            s.shared2,
            &one,
            Epilogue::Store,
            None,
        );
        stored(&y, store)
    });
    let total_residual = match (shared_y, residual) {
        (None, r) => r.map(|r| r.to_vec()),
        (Some(y), None) => Some(y),
        (Some(y), Some(r)) => Some(add(&y, r, tokens, d, store)),
    };
    let y = dispatch::combine(
        &yp,
        &map.inverse,
        Some(&combine_weights),
        total_residual.as_deref(),
        tokens,
        k,
        d,
    );
    MoeForward {
        y,
        z: vec![],
        ids,
        weights: combine_weights,
        map,
        gu,
        h,
        yp,
        shared_gu,
        shared_h,
        aux_loss: 0.0,
        z_loss: 0.0,
    }
}

/// Backward of [`moe_forward`] for the total loss `<y, dy> + aux + z`: dx (plus `dy` when the
/// forward added `x` as its residual), gate, expert (only `selected` experts; others 0) and
/// shared-expert gradients.
#[allow(clippy::too_many_arguments)]
pub fn moe_backward(
    config: &MoeConfig,
    weights: &HostWeights,
    x: &[f32],
    forward: &MoeForward,
    dy: &[f32],
    residual_grad: bool,
    selected: Option<&[bool]>,
    store: Store,
) -> MoeGradients {
    let (k, d) = (config.k, config.dim);
    let tokens = x.len() / d;
    let s = shapes(config, tokens);
    let map = &forward.map;
    let groups = HostGroups {
        offsets: &map.offsets,
        sorted_rows: Some(&map.sorted_rows),
        rows: s.rows,
    };
    let (dyp, dw) = dispatch::combine_backward(dy, &forward.yp, &map.sorted_rows, Some(&forward.weights), tokens, k, d);
    let (dyp, dw) = (stored(&dyp, store), f32s(&dw));
    let swiglu_bwd = DgradEpilogue::SwiGluBackward;
    let dgu = stored(
        &gemm::dgrad(&dyp, &weights.w2, s.gemm2, &groups, swiglu_bwd, None, Some(&forward.gu)),
        store,
    );
    let zeros2 = vec![0.0; weights.w2.len()];
    let w2 = gemm::wgrad(
        &dyp,
        &forward.h,
        ARows::Contiguous,
        s.gemm2,
        &groups,
        selected,
        false,
        &zeros2,
    );
    let dxp = stored(
        &gemm::dgrad(&dgu, &weights.w1, s.gemm1, &groups, DgradEpilogue::Store, None, None),
        store,
    );
    let zeros1 = vec![0.0; weights.w1.len()];
    let gathered = ARows::Gathered { top_k: k };
    let w1 = gemm::wgrad(&dgu, x, gathered, s.gemm1, &groups, selected, false, &zeros1);

    // The router's backward, unless the routing was given (no logits).
    let (gate_grads, dx_gate) = if forward.z.is_empty() {
        (vec![], None)
    } else {
        let router_config = config.router_config();
        let mut dz = router::select_backward(&router_config, &forward.z, &forward.ids, &dw);
        if let Some(aux) = config.aux_config() {
            router::aux_loss_backward(&router_config, &aux, &forward.z, &forward.ids, &mut dz);
        }
        if config.z_loss > 0.0 {
            router::z_loss_backward(config.experts, config.z_loss, &forward.z, &mut dz);
        }
        let dz = f64s(&f32s(&dz));
        let grads = gate::scores_backward(&config.gate_shape(tokens), &gate_params(config, weights), &f64s(x), &dz);
        (grads.params, Some(stored(&grads.dx, store)))
    };

    let (mut shared_w1, mut shared_w2, mut shared_dx) = (vec![], vec![], None);
    if config.shared_experts > 0 {
        let offsets = [0, tokens as i32];
        let one = HostGroups {
            offsets: &offsets,
            sorted_rows: None,
            rows: tokens,
        };
        let dgu = gemm::dgrad(
            dy,
            &weights.shared_w2,
            s.shared2,
            &one,
            swiglu_bwd,
            None,
            Some(&forward.shared_gu),
        );
        let dgu = stored(&dgu, store);
        // Tokens routed nowhere are padding in the weight gradients' row list.
        let live = dispatch::live_rows(&forward.ids, tokens, k);
        let live_rows = HostGroups {
            sorted_rows: Some(&live),
            ..one
        };
        let gathered = ARows::Gathered { top_k: 1 };
        let zeros = vec![0.0; weights.shared_w2.len()];
        shared_w2 = gemm::wgrad(
            dy,
            &forward.shared_h,
            gathered,
            s.shared2,
            &live_rows,
            None,
            false,
            &zeros,
        );
        let dx = gemm::dgrad(
            &dgu,
            &weights.shared_w1,
            s.shared1,
            &one,
            DgradEpilogue::Store,
            None,
            None,
        );
        shared_dx = Some(stored(&dx, store));
        let zeros = vec![0.0; weights.shared_w1.len()];
        shared_w1 = gemm::wgrad(&dgu, x, gathered, s.shared1, &live_rows, None, false, &zeros);
    }
    // dx = Σ_j dXp[inverse] + dx_gate [+ dx_shared] [+ dy], rounded where the device stores.
    let mut terms: Vec<&[f32]> = shared_dx.as_deref().into_iter().collect();
    if residual_grad {
        terms.push(dy);
    }
    let mut dx = dispatch::combine(&dxp, &map.inverse, None, dx_gate.as_deref(), tokens, k, d);
    for term in terms {
        let identity: Vec<i32> = (0..tokens as i32).collect();
        dx = dispatch::combine(term, &identity, None, Some(&stored(&dx, store)), tokens, 1, d);
    }
    MoeGradients {
        dx,
        gate: gate_grads,
        w1,
        w2,
        shared_w1,
        shared_w2,
    }
}

/// A Chain-of-Experts forward and backward (math §7).
#[derive(Debug, Clone)]
pub struct ChainResult {
    /// x⁽ᶜ⁾.
    pub y: Vec<f64>,
    /// Each iteration's routed pass.
    pub iterations: Vec<MoeForward>,
    /// dx, the expert gradients summed over iterations and, in `routers`, each iteration's gate
    /// gradients (`gate` holds the first iteration's).
    pub grads: MoeGradients,
    pub routers: Vec<Vec<(&'static str, Vec<f64>)>>,
}

/// C = `weights.len()` iterations `x⁽ᵗ⁾ = x⁽ᵗ⁻¹⁾ + MoE_t(x⁽ᵗ⁻¹⁾)`, iteration t routing with
/// `weights[t]`'s gate and bias, every iteration using `weights[0]`'s experts; backward in
/// reverse with the expert gradients summed (only `selected` experts).
pub fn chain(
    config: &MoeConfig,
    weights: &[HostWeights],
    x: &[f32],
    dy: &[f32],
    selected: Option<&[bool]>,
    store: Store,
) -> ChainResult {
    let tokens = x.len() / config.dim;
    let per_iteration: Vec<HostWeights> = weights
        .iter()
        .map(|w| HostWeights {
            gate: w.gate.clone(),
            router_bias: w.router_bias.clone(),
            ..weights[0].clone()
        })
        .collect();
    let mut inputs = vec![x.to_vec()];
    let mut iterations: Vec<MoeForward> = vec![];
    for w in &per_iteration {
        let input = inputs.last().expect("x");
        let forward = moe_forward(config, w, input, tokens, Some(input), store);
        inputs.push(stored(&forward.y, store));
        iterations.push(forward);
    }
    let y = iterations.last().expect("at least one iteration").y.clone();
    let mut upstream = dy.to_vec();
    let mut total: Option<MoeGradients> = None;
    let mut routers = vec![];
    for t in (0..per_iteration.len()).rev() {
        let g = moe_backward(
            config,
            &per_iteration[t],
            &inputs[t],
            &iterations[t],
            &upstream,
            true,
            selected,
            store,
        );
        upstream = stored(&g.dx, store);
        routers.push(g.gate.clone());
        total = Some(match total {
            None => g,
            Some(sum) => {
                let add = |a: Vec<f64>, b: &[f64]| a.iter().zip(b).map(|(x, y)| x + y).collect::<Vec<f64>>();
                MoeGradients {
                    dx: g.dx,
                    gate: g.gate,
                    w1: add(sum.w1, &g.w1),
                    w2: add(sum.w2, &g.w2),
                    shared_w1: add(sum.shared_w1, &g.shared_w1),
                    shared_w2: add(sum.shared_w2, &g.shared_w2),
                }
            }
        });
    }
    routers.reverse();
    ChainResult {
        y,
        iterations,
        grads: total.expect("at least one iteration"),
        routers,
    }
}

/// A VQ-MoE forward (math §6): both paths, the mix, the VQ losses.
#[derive(Debug, Clone)]
pub struct VqForward {
    pub y: Vec<f64>,
    pub continuous: MoeForward,
    pub discrete: MoeForward,
    /// Each token's nearest code.
    pub codes: Vec<i32>,
    pub x_mix: Vec<f32>,
    pub logits: Vec<f32>,
    pub y_cont: Vec<f32>,
    pub y_disc: Vec<f32>,
    /// `[codebook loss, commitment loss]`.
    pub vq_losses: [f64; 2],
}

/// Gradients of a VQ-MoE layer for `<y, dy>` + router losses + VQ losses.
#[derive(Debug, Clone)]
pub struct VqGradients {
    pub dx: Vec<f64>,
    pub router: Vec<(&'static str, Vec<f64>)>,
    pub mix: Vec<(&'static str, Vec<f64>)>,
    pub w1: Vec<f64>,
    pub w2: Vec<f64>,
    pub shared_w1: Vec<f64>,
    pub shared_w2: Vec<f64>,
    pub codebook: Vec<f64>,
}

fn vq_shapes(config: &MoeConfig, tokens: usize) -> (CodebookShape, GateShape) {
    let shape = CodebookShape {
        tokens,
        dim: config.dim,
        codes: config.experts,
    };
    (shape, mix_config(config).gate_shape(tokens))
}

fn mix_params(weights: &VqWeights) -> GateParams {
    GateParams::Linear {
        w: f64s(&weights.mix_w),
        b: Some(f64s(&weights.mix_b)),
    }
}

/// `y = a0·MoE(x) + a1·FFN_{code(x) mod E}(x̃)`, `[a0, a1] = softmax(Wc x + bc)`.
pub fn vq_forward(config: &MoeConfig, weights: &VqWeights, x: &[f32], tokens: usize, store: Store) -> VqForward {
    let (shape, mix_shape) = vq_shapes(config, tokens);
    let (x64, codes64) = (f64s(x), f64s(&weights.codebook));
    let nearest = codebook::nearest(&shape, &x64, &codes64, 1, config.experts);
    let (_, mixed) = codebook::quantize(&shape, &x64, &codes64, &nearest.ids, MIX_COEFFICIENT as f64);
    let x_mix = stored(&mixed, store);
    let continuous = moe_forward(config, &weights.moe, x, tokens, None, store);
    let discrete_config = discrete_config(config);
    let discrete = routed_forward(
        &discrete_config,
        &weights.moe,
        &x_mix,
        tokens,
        nearest.experts,
        f32s(&nearest.weights),
        None,
        store,
    );
    let logits = f32s(&gate::scores(&mix_shape, &mix_params(weights), &x64));
    let (y_cont, y_disc) = (stored(&continuous.y, store), stored(&discrete.y, store));
    VqForward {
        y: mix::forward(&logits, &f64s(&y_cont), &f64s(&y_disc), config.dim),
        vq_losses: codebook::losses(&shape, &x64, &codes64, &nearest.ids, COMMITMENT_BETA as f64),
        continuous,
        discrete,
        codes: nearest.ids,
        x_mix,
        logits,
        y_cont,
        y_disc,
    }
}

/// Backward of [`vq_forward`].
pub fn vq_backward(
    config: &MoeConfig,
    weights: &VqWeights,
    x: &[f32],
    forward: &VqForward,
    dy: &[f32],
    store: Store,
) -> VqGradients {
    let (d, tokens) = (config.dim, x.len() / config.dim);
    let (shape, mix_shape) = vq_shapes(config, tokens);
    let (dy_cont, dy_disc, dlogits) = mix::backward(
        &forward.logits,
        &f64s(&forward.y_cont),
        &f64s(&forward.y_disc),
        &f64s(dy),
        d,
    );
    let continuous = moe_backward(
        config,
        &weights.moe,
        x,
        &forward.continuous,
        &stored(&dy_cont, store),
        false,
        None,
        store,
    );
    let discrete_config = discrete_config(config);
    let dy_disc = stored(&dy_disc, store);
    let discrete = moe_backward(
        &discrete_config,
        &weights.moe,
        &forward.x_mix,
        &forward.discrete,
        &dy_disc,
        false,
        None,
        store,
    );
    let dx_mixed = f64s(&stored(&discrete.dx, store));
    let (x64, codes64) = (f64s(x), f64s(&weights.codebook));
    let beta = COMMITMENT_BETA as f64;
    let (dx_vq, dcodes) = codebook::losses_backward(&shape, &x64, &codes64, &forward.codes, beta, Some(&dx_mixed));
    let dlogits = f64s(&f32s(&dlogits));
    let mix_grads = gate::scores_backward(&mix_shape, &mix_params(weights), &x64, &dlogits);
    let sum = add(&stored(&dx_vq, store), &stored(&continuous.dx, store), tokens, d, store);
    let identity: Vec<i32> = (0..tokens as i32).collect();
    let dx = dispatch::combine(&stored(&mix_grads.dx, store), &identity, None, Some(&sum), tokens, 1, d);
    let sum2 = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(x, y)| x + y).collect::<Vec<f64>>();
    VqGradients {
        dx,
        router: continuous.gate,
        mix: mix_grads.params,
        w1: sum2(&continuous.w1, &discrete.w1),
        w2: sum2(&continuous.w2, &discrete.w2),
        shared_w1: continuous.shared_w1,
        shared_w2: continuous.shared_w2,
        codebook: dcodes,
    }
}
