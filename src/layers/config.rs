//! The configuration of a routed MoE layer and what it implies for each op family.
use crate::ops::dispatch::{Capacity, MapConfig};
use crate::ops::gate::{GateForm, GateShape};
use crate::ops::gemm::ExpertMask;
use crate::ops::gemm::GemmShape;
use crate::ops::router::{AuxLossConfig, RouterConfig, ScoreFunction};
use crate::ops::{FloatElement, check_range, elements};
use crate::{Error, Result};

/// How tokens are scored before top-k selection.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RouterKind {
    /// `z = X Wg^T + bg`, softmax over E, top-k (Switch / DeepSeek-V2 style; Mixtral style with
    /// [`MoeConfig::normalize_topk`]).
    Linear,
    /// A quadratic gate (`GateForm::LowRank`, `Symmetric`, `Attention` or `Full`) of rank `rank`
    /// (ignored by `Full`), softmax over E, top-k.
    Quadratic { form: GateForm, rank: usize },
    /// DeepSeek-V3 style: a linear gate, sigmoid scores, a per-expert selection bias (selection
    /// only, updated by [`MoeLayer::update_bias`](super::MoeLayer::update_bias)), top-k inside the
    /// best `topk_groups` of `groups` groups, weights renormalized over the k when
    /// [`MoeConfig::normalize_topk`] is set (DeepSeek-V3's `norm_topk_prob = True`) and scaled by
    /// [`MoeConfig::route_scale`] (2.5 for DeepSeek-V3).
    Sigmoid { groups: usize, topk_groups: usize },
    /// VQ routing (math §6): each token goes to the expert of its nearest code (a codebook of E
    /// codes, `[E, d]`, one per expert) with weight 1; k = 1, no logits (so no aux or z-loss) and
    /// no router gradient (train the codes with `ops::codebook`'s losses or EMA, or use
    /// [`VqMoe`](super::VqMoe)).
    Codebook,
}

/// What a layer is built for, fixed at construction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mode {
    /// Forward keeps what backward needs (SwiGLU's GU among it) and runs the router losses; the
    /// layer holds f32 gradients of every weight and the backward's work buffers.
    #[default]
    Training,
    /// Forward only, for serving: no GU kept, no router losses (the routed forward is 6 launches,
    /// 5 or 4 where the linear gate fuses the routing, whatever the loss coefficients), no
    /// gradient or backward buffers; `backward` is refused.
    Inference,
}

impl Mode {
    /// `Ok` for a training layer; for an inference one an error naming `argument`, the
    /// training-only thing asked for.
    pub(crate) fn require_training(self, argument: &'static str) -> Result<()> {
        match self {
            Mode::Training => Ok(()),
            Mode::Inference => Err(invalid(
                argument,
                "a layer built for inference (Mode::Inference)",
                "a layer built for training",
            )),
        }
    }
}

/// A routed MoE layer: sizes, router, shared experts, capacity and loss coefficients.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MoeConfig {
    pub router: RouterKind,
    /// E: routed experts.
    pub experts: usize,
    /// Experts per token.
    pub k: usize,
    /// Divide the k weights of a softmax or sigmoid router by their sum, so they add to 1:
    /// Hugging Face's `norm_topk_prob` (Mixtral's top-k of the softmax renormalized is a softmax
    /// over the k chosen logits; DeepSeek-V3 renormalizes its k sigmoid scores). `false`: the
    /// weights are the probabilities or sigmoid scores themselves (Switch, DeepSeek-V2). The
    /// codebook router's weight is 1 either way.
    pub normalize_topk: bool,
    /// Multiplies the k combine weights of the linear, quadratic and sigmoid routers (DeepSeek's
    /// `routed_scaling_factor`: 2.5 for V3, 16 for V2; 1 for Switch and Mixtral). A codebook
    /// router's weight is 1: it needs 1 here.
    pub route_scale: f32,
    /// d: model dimension (a multiple of 8 for f16/bf16: tensor-core rows are 16 bytes).
    pub dim: usize,
    /// h: hidden size of each SwiGLU expert (a multiple of 8 for f16/bf16).
    pub hidden: usize,
    /// Shared experts run on every token; n of them are one SwiGLU FFN of hidden size n·h.
    pub shared_experts: usize,
    /// Expert capacity `ceil(factor · T·k / E)` (math §4); `None`: no token is dropped.
    pub capacity_factor: Option<f64>,
    /// Switch load-balancing loss coefficient α (0: off). Hugging Face's Mixtral convention is
    /// k times smaller: pass `α = k · α_hf` to reproduce it.
    pub aux_alpha: f32,
    /// Router z-loss coefficient (0: off).
    pub z_loss: f32,
    /// The most tokens one call may carry: every work buffer is sized for it once.
    pub max_tokens: usize,
}

impl Default for MoeConfig {
    fn default() -> Self {
        Self {
            router: RouterKind::Linear,
            experts: 8,
            k: 2,
            normalize_topk: false,
            route_scale: 1.0,
            dim: 64,
            hidden: 128,
            shared_experts: 0,
            capacity_factor: None,
            aux_alpha: 0.0,
            z_loss: 0.0,
            max_tokens: 1024,
        }
    }
}

fn invalid(argument: &'static str, value: impl std::fmt::Display, expected: impl Into<String>) -> Error {
    Error::InvalidArgument {
        argument,
        value: value.to_string(),
        expected: expected.into(),
    }
}

impl MoeConfig {
    /// An ESFT expert mask fits this layer: it covers `experts` experts (`None` always fits).
    pub fn check_mask(&self, mask: Option<&ExpertMask>) -> Result<()> {
        match mask {
            Some(m) if m.experts != self.experts => Err(invalid(
                "mask",
                format!("a mask of {} experts", m.experts),
                format!("{} experts", self.experts),
            )),
            _ => Ok(()),
        }
    }

    /// Checks every field; the error names the offending one (`k`, `groups`, `rank`, ...).
    pub fn validate(&self) -> Result<()> {
        check_range("experts", self.experts, 1..=crate::ops::router::MAX_EXPERTS)?;
        check_range("k", self.k, 1..=self.experts.min(crate::ops::router::MAX_K))?;
        check_range("dim", self.dim, 1..=i32::MAX as usize)?;
        check_range("hidden", self.hidden, 1..=i32::MAX as usize)?;
        check_range("max_tokens", self.max_tokens, 1..=i32::MAX as usize)?;
        if let RouterKind::Quadratic { form, rank } = self.router {
            if form == GateForm::Linear {
                return Err(invalid(
                    "router.form",
                    "Linear",
                    "a quadratic form (use RouterKind::Linear)",
                ));
            }
            if rank == 0 && form != GateForm::Full {
                return Err(invalid("router.rank", rank, "a rank of at least 1"));
            }
        }
        if !self.route_scale.is_finite() {
            return Err(invalid("route_scale", self.route_scale, "a finite factor"));
        }
        if self.router == RouterKind::Codebook {
            if self.k != 1 {
                return Err(invalid("k", self.k, "1 for the codebook router"));
            }
            if self.route_scale != 1.0 {
                return Err(invalid(
                    "route_scale",
                    self.route_scale,
                    "1 for the codebook router (weight 1)",
                ));
            }
            for (argument, value) in [("aux_alpha", self.aux_alpha), ("z_loss", self.z_loss)] {
                if value != 0.0 {
                    return Err(invalid(argument, value, "0 for the codebook router (it has no logits)"));
                }
            }
        }
        self.router_config().validate()?;
        self.gate_shape(self.max_tokens).validate()?;
        if let Some(factor) = self.capacity_factor {
            Capacity {
                factor,
                min_capacity: 0,
            }
            .validate()?;
        }
        for (argument, value) in [("aux_alpha", self.aux_alpha), ("z_loss", self.z_loss)] {
            if !(value.is_finite() && value >= 0.0) {
                return Err(invalid(argument, value, "a finite coefficient >= 0"));
            }
        }
        self.map_config().validate()?;
        self.check_buffer_sizes()
    }

    /// Every buffer a layer allocates for `max_tokens` (grouped rows by 2h, the shared FFN's
    /// `[T, 2·n·h]`, the expert weights) has an element count that fits the kernels' 64-bit
    /// offsets, so the layers' size arithmetic cannot overflow.
    fn check_buffer_sizes(&self) -> Result<()> {
        let shared = elements("shared_experts", self.shared_experts, self.hidden)?;
        check_range("shared_experts", shared, 0..=i32::MAX as usize / 2)?;
        let rows = self.map_config().sorted_rows_len(self.max_tokens, self.k)?;
        elements("max_tokens", rows, 2 * self.hidden.max(self.dim))?;
        elements("max_tokens", self.max_tokens, 2 * shared)?;
        let experts = GemmShape {
            experts: self.experts,
            n: 2 * self.hidden,
            k: self.dim,
        };
        experts.weight_len().map(drop)
    }

    /// [`validate`](Self::validate) plus the storage type's limits: the tensor-core GEMMs of
    /// f16/bf16 need d and h (and the shared hidden size) in multiples of 8.
    pub fn validate_for<T: FloatElement>(&self) -> Result<()> {
        self.validate()?;
        if T::NAME != "f32" {
            for (argument, value) in [("dim", self.dim), ("hidden", self.hidden)] {
                if value % 8 != 0 {
                    return Err(invalid(argument, value, format!("a multiple of 8 for {}", T::NAME)));
                }
            }
        }
        Ok(())
    }

    /// The gate's form.
    pub fn gate_form(&self) -> GateForm {
        match self.router {
            RouterKind::Quadratic { form, .. } => form,
            _ => GateForm::Linear,
        }
    }

    /// The scoring shape for `tokens` tokens.
    pub fn gate_shape(&self, tokens: usize) -> GateShape {
        let rank = match self.router {
            RouterKind::Quadratic { rank, .. } => rank.max(1),
            _ => 1,
        };
        GateShape {
            tokens,
            dim: self.dim,
            experts: self.experts,
            rank,
        }
    }

    /// The top-k selection options the router kind implies.
    pub fn router_config(&self) -> RouterConfig {
        let base = RouterConfig {
            experts: self.experts,
            k: self.k,
            renormalize: self.normalize_topk,
            scale: self.route_scale,
            ..RouterConfig::default()
        };
        match self.router {
            RouterKind::Sigmoid { groups, topk_groups } => RouterConfig {
                score: ScoreFunction::Sigmoid,
                groups,
                topk_groups,
                ..base
            },
            _ => base,
        }
    }

    /// Whether the router keeps a selection bias (`[E]` f32).
    pub fn has_router_bias(&self) -> bool {
        matches!(self.router, RouterKind::Sigmoid { .. })
    }

    /// The dispatch of `[T, k]` ids: every expert local, no padding, capacity as configured.
    pub fn map_config(&self) -> MapConfig {
        MapConfig {
            capacity: self.capacity_factor.map(|factor| Capacity {
                factor,
                min_capacity: 0,
            }),
            ..MapConfig::new(self.experts)
        }
    }

    /// The aux loss options, when the loss is on.
    pub fn aux_config(&self) -> Option<AuxLossConfig> {
        (self.aux_alpha > 0.0).then_some(AuxLossConfig {
            alpha: self.aux_alpha,
            sequence_length: None,
        })
    }

    /// Hidden size of the shared FFN (n·h; 0 without shared experts).
    pub fn shared_hidden(&self) -> usize {
        // Saturating: `validate` refuses anything near the limit.
        self.shared_experts.saturating_mul(self.hidden)
    }
}
