//! Host copies of a layer's weights: what constructors upload and what references read.
use super::{MoeConfig, RouterKind};
use crate::ops::FloatElement;
use crate::ops::gate::GateForm;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Every weight of a routed MoE layer as host f32 values (layouts of math §1 and `ops::gate`):
/// gate tensors by name (`w`, `b` for the linear gate; `u`, `v`, `b`, `c`, ... for the
/// quadratic forms, every optional tensor present), `w1 [E, 2h, d]` (gate rows, then up rows),
/// `w2 [E, d, h]`, the codebook router's `codes [E, d]`, the shared FFN as one expert of hidden size n·h (`[1, 2nh, d]`, `[1, d, nh]`,
/// empty without shared experts) and the selection bias (`[E]`, empty unless the router keeps one).
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

/// Names and element counts of every tensor of `config`'s gate, in `ops::gate` order.
pub(crate) fn gate_tensor_lens(config: &MoeConfig) -> Vec<(&'static str, usize)> {
    let shape = config.gate_shape(0);
    let (e, d, r) = (shape.experts, shape.dim, shape.rank);
    if config.router == RouterKind::Codebook {
        return vec![("codes", e * d)];
    }
    match config.gate_form() {
        GateForm::Linear => vec![("w", e * d), ("b", e)],
        GateForm::LowRank => vec![("u", e * r * d), ("v", e * r * d), ("b", e * d), ("c", e)],
        GateForm::Symmetric => vec![("u", e * r * d), ("b", e * d), ("c", e)],
        GateForm::Attention => vec![("wq", r * d), ("k", e * r * d)],
        GateForm::Full => vec![("a", e * d * d), ("b", e * d), ("c", e)],
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

    /// The gate tensor `name` (empty when absent).
    pub fn gate_tensor(&self, name: &str) -> &[f32] {
        self.gate.iter().find(|(n, _)| *n == name).map_or(&[], |(_, v)| v)
    }
}
