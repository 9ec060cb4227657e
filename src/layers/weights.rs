//! Host copies of a layer's weights: what constructors upload and what references read.
use super::{MoeConfig, RouterKind};
use crate::ops::FloatElement;
use crate::ops::gate::GateForm;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Every weight of a routed MoE layer as host f32 values (layouts of math §1 and `ops::gate`,
/// shapes in [`MoeConfig::weight_shapes`]): gate tensors by short name (`w`, `b` for the linear
/// gate; `u`, `v`, `b`, `c`, ... for the quadratic forms; `codes [E, d]` for the codebook
/// router), `w1 [E, 2h, d]` (gate rows, then up rows), `w2 [E, d, h]`, the shared FFN as one
/// expert of hidden size n·h (`[1, 2nh, d]`, `[1, d, nh]`, empty without shared experts) and the
/// selection bias (`[E]`, empty unless the router keeps one).
///
/// The gate's `b` and `c` are optional: leave them out of `gate` (or empty) for a gate without
/// them, e.g. Mixtral's bias-free linear router.
#[derive(Debug, Clone, PartialEq)]
pub struct HostWeights {
    pub gate: Vec<(&'static str, Vec<f32>)>,
    pub w1: Vec<f32>,
    pub w2: Vec<f32>,
    pub shared_w1: Vec<f32>,
    pub shared_w2: Vec<f32>,
    pub router_bias: Vec<f32>,
}

/// Whether a gate tensor is stored in f32 whatever the layer's dtype (`ops::gate` layouts: the
/// linear gate's bias and the quadratic forms' constant `c`).
pub(crate) fn gate_tensor_is_f32(form: GateForm, name: &str) -> bool {
    name == "c" || (form == GateForm::Linear && name == "b")
}

/// Whether a gate tensor may be left out (`ops::gate`: `b` and `c` are optional everywhere).
pub(crate) fn gate_tensor_is_optional(name: &str) -> bool {
    name == "b" || name == "c"
}

/// Names and shapes of every tensor of `config`'s gate, in `ops::gate` order.
fn gate_tensor_shapes(config: &MoeConfig) -> Vec<(&'static str, Vec<usize>)> {
    let shape = config.gate_shape(0);
    let (e, d, r) = (shape.experts, shape.dim, shape.rank);
    if config.router == RouterKind::Codebook {
        return vec![("codes", vec![e, d])];
    }
    match config.gate_form() {
        GateForm::Linear => vec![("w", vec![e, d]), ("b", vec![e])],
        GateForm::LowRank => vec![
            ("u", vec![e, r, d]),
            ("v", vec![e, r, d]),
            ("b", vec![e, d]),
            ("c", vec![e]),
        ],
        GateForm::Symmetric => vec![("u", vec![e, r, d]), ("b", vec![e, d]), ("c", vec![e])],
        GateForm::Attention => vec![("wq", vec![r, d]), ("k", vec![e, r, d])],
        GateForm::Full => vec![("a", vec![e, d, d]), ("b", vec![e, d]), ("c", vec![e])],
    }
}

/// Names and element counts of every tensor of `config`'s gate, in `ops::gate` order.
pub(crate) fn gate_tensor_lens(config: &MoeConfig) -> Vec<(&'static str, usize)> {
    gate_tensor_shapes(config)
        .into_iter()
        .map(|(name, dims)| (name, dims.iter().product()))
        .collect()
}

/// The full name of the gate tensor `short` (`"w"` → `"gate.w"`), as errors and
/// [`LayerWeights`](super::LayerWeights) name it.
pub(crate) fn gate_name(short: &str) -> &'static str {
    match short {
        "w" => "gate.w",
        "b" => "gate.b",
        "u" => "gate.u",
        "v" => "gate.v",
        "c" => "gate.c",
        "wq" => "gate.wq",
        "k" => "gate.k",
        "a" => "gate.a",
        "codes" => "gate.codes",
        _ => "gate",
    }
}

impl MoeConfig {
    /// Every tensor a layer of this config may hold, by full name, with its shape (row-major):
    /// the gate's (`gate.w [E, d]`, `gate.b [E]` for the linear gate; `gate.u`, `gate.v`,
    /// `gate.b`, `gate.c`, `gate.wq`, `gate.k`, `gate.a` for the quadratic forms as in
    /// `ops::gate`; `gate.codes [E, d]` for the codebook router), the selection bias
    /// `gate.selection_bias [E]` (sigmoid router), `experts.w1 [E, 2h, d]` (each expert's gate
    /// rows, then its up rows), `experts.w2 [E, d, h]` and, with shared experts,
    /// `shared.w1 [2nh, d]` and `shared.w2 [d, nh]`. Optional gate tensors (`b`, `c`) are listed.
    pub fn weight_shapes(&self) -> Vec<(&'static str, Vec<usize>)> {
        let (e, d, h, hs) = (self.experts, self.dim, self.hidden, self.shared_hidden());
        let mut shapes: Vec<_> = gate_tensor_shapes(self)
            .into_iter()
            .map(|(name, dims)| (gate_name(name), dims))
            .collect();
        if self.has_router_bias() {
            shapes.push(("gate.selection_bias", vec![e]));
        }
        shapes.push(("experts.w1", vec![e, 2 * h, d]));
        shapes.push(("experts.w2", vec![e, d, h]));
        if hs > 0 {
            shapes.push(("shared.w1", vec![2 * hs, d]));
            shapes.push(("shared.w2", vec![d, hs]));
        }
        shapes
    }
}

/// `len` values uniform in `[-scale, scale)` drawn from `rng`.
fn fill(rng: &mut ChaCha8Rng, len: usize, scale: f32) -> Vec<f32> {
    (0..len).map(|_| rng.random_range(-1.0f32..1.0) * scale).collect()
}

/// `len` values uniform in `[-scale, scale)` from `seed`: ChaCha8, whose stream is fixed for a
/// seed, so the same seed gives the same weights everywhere.
pub(crate) fn uniform(seed: u64, len: usize, scale: f32) -> Vec<f32> {
    fill(&mut ChaCha8Rng::seed_from_u64(seed), len, scale)
}

impl HostWeights {
    /// Uniform weights scaled by 1/√fan_in (biases 0.1), from `seed`; not yet rounded to a dtype.
    pub fn random(config: &MoeConfig, seed: u64) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let (e, d, h, hs) = (config.experts, config.dim, config.hidden, config.shared_hidden());
        let inv_sqrt = |n: usize| 1.0 / (n.max(1) as f32).sqrt();
        let gate = gate_tensor_lens(config)
            .into_iter()
            .map(|(name, len)| {
                let scale = match name {
                    "b" | "c" => 0.1,
                    "codes" => 1.0,
                    "a" => inv_sqrt(d * d),
                    _ => inv_sqrt(d),
                };
                (name, fill(&mut rng, len, scale))
            })
            .collect();
        Self {
            gate,
            w1: fill(&mut rng, e * 2 * h * d, inv_sqrt(d)),
            w2: fill(&mut rng, e * d * h, inv_sqrt(h)),
            shared_w1: fill(&mut rng, 2 * hs * d, inv_sqrt(d)),
            shared_w2: fill(&mut rng, d * hs, inv_sqrt(hs)),
            router_bias: if config.has_router_bias() {
                fill(&mut rng, e, 0.05)
            } else {
                vec![]
            },
        }
    }

    /// The values the layer holds once stored as `T`: every tensor rounded to `T`, except those
    /// kept in f32 (gate biases, the selection bias).
    pub fn rounded<T: FloatElement>(&self, config: &MoeConfig) -> Self {
        let round = |v: &Vec<f32>| v.iter().map(|&x| T::from_f32(x).to_f32()).collect::<Vec<f32>>();
        let form = config.gate_form();
        Self {
            gate: self
                .gate
                .iter()
                .map(|(name, v)| {
                    (
                        *name,
                        if gate_tensor_is_f32(form, name) {
                            v.clone()
                        } else {
                            round(v)
                        },
                    )
                })
                .collect(),
            w1: round(&self.w1),
            w2: round(&self.w2),
            shared_w1: round(&self.shared_w1),
            shared_w2: round(&self.shared_w2),
            router_bias: self.router_bias.clone(),
        }
    }

    /// The gate tensor `name` (short name, e.g. `"w"`; empty when absent).
    pub fn gate_tensor(&self, name: &str) -> &[f32] {
        self.gate.iter().find(|(n, _)| *n == name).map_or(&[], |(_, v)| v)
    }
}
