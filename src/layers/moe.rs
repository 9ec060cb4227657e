//! [`MoeLayer`]: one routed MoE layer with its weights, forward and backward.
use super::buffers::{Saved, Scratch, saved_bytes_per_token};
use super::graph::{EagerPass, LayerGraph, layer_graph_methods};
use super::params::{ExpertGrads, RouterGrads};
use super::pass::{Gradients, Pass};
use super::workspace::prefix;
use super::{HostWeights, LayerWeights, Mode, MoeConfig, RouterKind};
use crate::ops::FloatElement;
use crate::ops::gemm::ExpertMask;
use crate::ops::router;
use crate::{Device, DeviceBuffer, DeviceSlice, DeviceSliceMut, Error, Result};
use std::sync::Arc;

/// The router losses of the last forward, downloaded (0 where a loss is off).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LossValues {
    pub aux: f32,
    pub z: f32,
}

/// A routed Mixture-of-Experts layer (math §2–§5): `y = Σ_{i∈K(x)} w_i FFN_i(x) [+ FFN_shared(x)]`
/// with SwiGLU experts, weights held on the device as `T` (f32, f16 or bf16; routing and
/// accumulation in f32).
///
/// ```text
/// forward:  scores → select → routing map → GEMM1+SwiGLU (gathered X) → GEMM2 → combine (weights)
/// backward: combine⁻¹ → GEMM2 dgrad+SwiGLU⁻¹, dW2 → GEMM1 dgrad, dW1 → select⁻¹ (+losses) → gate⁻¹ → Σ into dx
/// ```
/// Launch counts are in the [module docs](super); the routed forward is at most 6 launches for
/// the linear and quadratic routers (no shared experts, no capacity, T·k <= 4096), and neither
/// direction waits for the device. The caller passes the same `x` to `forward` and `backward`
/// (like a framework that saved its input); everything else backward needs stays in the layer.
///
/// Training is in the [crate docs](crate#quick-start); serving uses a forward-only layer
/// ([`Mode::Inference`]), here in bf16 with DeepSeek-style sigmoid routing and a shared expert:
///
/// ```
/// use half::bf16;
/// use moe_kernels::Device;
/// use moe_kernels::layers::{HostWeights, Mode, MoeConfig, MoeLayer, RouterKind};
///
/// # fn main() -> moe_kernels::Result<()> {
/// let device = Device::best()?;
/// let config = MoeConfig {
///     router: RouterKind::Sigmoid { groups: 2, topk_groups: 1 },
///     normalize_topk: true,
///     route_scale: 2.5,
///     shared_experts: 1,
///     dim: 16,
///     hidden: 16,
///     max_tokens: 8,
///     ..MoeConfig::default()
/// };
/// let weights = HostWeights::random(&config, 7);
/// let mut layer = MoeLayer::<bf16>::with_mode(&device, config, &weights, Mode::Inference)?;
/// let x = device.upload(&vec![bf16::from_f32(0.25); 3 * config.dim])?;
/// let mut y = device.alloc_zeros::<bf16>(3 * config.dim)?;
/// layer.forward(&x, 3, &mut y)?; // 3 of the 8 tokens the buffers were sized for
/// let (ids, _weights) = layer.routing()?;
/// let ids = device.download(&ids)?;
/// // 8 experts in 2 groups of 4, one group searched per token: both choices share a group.
/// assert!(ids.chunks(2).all(|pair| pair[0] / 4 == pair[1] / 4 && pair[0] != pair[1]));
/// # Ok(())
/// # }
/// ```
pub struct MoeLayer<T: FloatElement> {
    device: Device,
    config: MoeConfig,
    /// Shared with other layers by [`from_shared_weights`](MoeLayer::from_shared_weights),
    /// read-only while it is.
    weights: Arc<LayerWeights<T>>,
    saved: Saved<T>,
    scratch: Scratch<T>,
    router_grads: RouterGrads,
    expert_grads: ExpertGrads,
    mask: Option<ExpertMask>,
    /// `y = x + MoE(x)` (see [`with_residual`](MoeLayer::with_residual)).
    residual: bool,
    mode: Mode,
    /// The captured pass, if any ([`capture`](MoeLayer::capture)).
    graph: Option<LayerGraph<T>>,
}

impl<T: FloatElement> MoeLayer<T> {
    /// A layer holding `weights` (uploaded once, rounded to `T`), with every work buffer sized
    /// for `config.max_tokens`.
    pub fn new(device: &Device, config: MoeConfig, weights: &HostWeights) -> Result<Self> {
        Self::with_mode(device, config, weights, Mode::Training)
    }

    /// A layer for `mode`: [`new`](Self::new) is [`Mode::Training`]; a [`Mode::Inference`]
    /// layer holds the weights and the forward's buffers only (no gradients, no GU, no
    /// backward buffers), and its forward runs no router loss.
    pub fn with_mode(device: &Device, config: MoeConfig, weights: &HostWeights, mode: Mode) -> Result<Self> {
        config.validate_for::<T>()?;
        Self::from_weights(device, config, LayerWeights::upload(device, &config, weights)?, mode)
    }

    /// A layer for `mode` holding `weights`, device buffers it takes over without a copy
    /// (see [`LayerWeights::new`]; an engine loads a checkpoint's bf16 tensors once and hands
    /// them here). Given the same values, it computes bitwise what [`with_mode`](Self::with_mode)
    /// does.
    ///
    /// ```
    /// use half::bf16;
    /// use moe_kernels::Device;
    /// use moe_kernels::layers::{DeviceWeights, LayerWeights, Mode, MoeConfig, MoeLayer};
    ///
    /// # fn main() -> moe_kernels::Result<()> {
    /// let device = Device::best()?;
    /// let config = MoeConfig { experts: 4, k: 2, dim: 8, hidden: 16, max_tokens: 4, ..MoeConfig::default() };
    /// let (e, d, h) = (config.experts, config.dim, config.hidden);
    /// // Mixtral's router: a gate without a bias.
    /// let weights = DeviceWeights {
    ///     gate: vec![("w", device.upload_from_f32::<bf16>(&vec![0.1; e * d])?)],
    ///     gate_f32: vec![],
    ///     selection_bias: None,
    ///     w1: device.upload_from_f32(&vec![0.01; e * 2 * h * d])?,
    ///     w2: device.upload_from_f32(&vec![0.02; e * d * h])?,
    ///     shared: None,
    /// };
    /// let weights = LayerWeights::new(&config, weights)?;
    /// let mut layer = MoeLayer::<bf16>::from_weights(&device, config, weights, Mode::Inference)?;
    /// let x = device.upload_from_f32::<bf16>(&vec![1.0; 2 * d])?;
    /// let mut y = device.alloc_zeros::<bf16>(2 * d)?;
    /// layer.forward(&x, 2, &mut y)?;
    /// assert_eq!(layer.weights().names(), ["gate.w", "experts.w1", "experts.w2"]);
    /// # Ok(())
    /// # }
    /// ```
    pub fn from_weights(device: &Device, config: MoeConfig, weights: LayerWeights<T>, mode: Mode) -> Result<Self> {
        Self::from_shared_weights(device, config, Arc::new(weights), mode)
    }

    /// A layer for `mode` reading `weights` that other layers may hold too, with no copy: an
    /// engine loads a checkpoint's tensors once and builds over them, say, a decode layer
    /// (`max_tokens` 8, [`Mode::Inference`]) and a prefill layer (`max_tokens` 4096); each layer
    /// owns only its work buffers. While the weights are shared they are read-only:
    /// [`weights_mut`](Self::weights_mut), [`update_bias`](Self::update_bias) and
    /// [`into_weights`](Self::into_weights) refuse. Each pass reads the weights when its stream
    /// runs it: run the sharing layers on one [`Device`] (one stream), or order their streams
    /// yourself before stepping weights that a layer on another stream has just read.
    pub fn from_shared_weights(
        device: &Device,
        config: MoeConfig,
        weights: Arc<LayerWeights<T>>,
        mode: Mode,
    ) -> Result<Self> {
        config.validate_for::<T>()?;
        weights.validate(&config)?;
        weights.check_device(device)?;
        Ok(Self {
            device: device.clone(),
            config,
            saved: Saved::alloc(device, &config, mode)?,
            scratch: Scratch::alloc(device, &config, mode)?,
            router_grads: RouterGrads::alloc_for(device, &config, &weights.router, mode)?,
            expert_grads: ExpertGrads::alloc(device, &config, mode)?,
            weights,
            mask: None,
            residual: false,
            mode,
            graph: None,
        })
    }

    /// What the layer was built for.
    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// With `on`, the forward returns `x + MoE(x)`: the block's residual added by the combine
    /// (no extra launch), and backward adds `dy` to dx (one launch). This is Chain-of-Experts
    /// with one iteration.
    pub fn with_residual(mut self, on: bool) -> Self {
        self.graph = None;
        self.residual = on;
        self
    }

    /// A layer with [`HostWeights::random`] weights from `seed`.
    pub fn random(device: &Device, config: MoeConfig, seed: u64) -> Result<Self> {
        Self::new(device, config, &HostWeights::random(&config, seed))
    }

    pub fn config(&self) -> &MoeConfig {
        &self.config
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// `y = MoE(x)` for `tokens` rows (`x`, `y`: `[tokens, d]`, tokens in `1..=max_tokens`);
    /// keeps what [`backward`](Self::backward) needs. No host sync.
    pub fn forward(&mut self, x: &impl DeviceSlice<T>, tokens: usize, y: &mut impl DeviceSliceMut<T>) -> Result<()> {
        self.forward_observed(x, tokens, y, None)
    }

    /// [`forward`](Self::forward), calling `stages` with each stage's name once its launches are
    /// queued (the example times stages with it). Drops a captured graph.
    pub fn forward_observed(
        &mut self,
        x: &impl DeviceSlice<T>,
        tokens: usize,
        y: &mut impl DeviceSliceMut<T>,
        stages: Option<&mut dyn FnMut(&'static str)>,
    ) -> Result<()> {
        self.graph = None;
        self.run_forward(x, tokens, y, stages)
    }

    fn run_forward(
        &mut self,
        x: &impl DeviceSlice<T>,
        tokens: usize,
        y: &mut impl DeviceSliceMut<T>,
        mut stages: Option<&mut dyn FnMut(&'static str)>,
    ) -> Result<()> {
        self.weights.validate(&self.config)?;
        let mut pass = Pass {
            device: &self.device,
            config: &self.config,
            router: &self.weights.router,
            experts: &self.weights.experts,
            scratch: &mut self.scratch,
            mode: self.mode,
            stages: match stages.as_mut() {
                Some(observer) => Some(&mut **observer),
                None => None,
            },
        };
        let residual = self.residual.then_some(x as &dyn DeviceSlice<T>);
        pass.forward(&mut self.saved, x, tokens, residual, y)
    }

    /// Backward of the last forward (same `x`): `dx` (`[T, d]`) from `dy`, the router gradients
    /// ([`router_grads`](Self::router_grads), overwritten), the expert gradients
    /// ([`expert_grads`](Self::expert_grads), overwritten except for experts outside the
    /// [`expert mask`](Self::set_expert_mask), which are not touched), with the router losses'
    /// gradients included (the total loss is `<y, dy> + aux + z`). No host sync.
    pub fn backward(
        &mut self,
        x: &impl DeviceSlice<T>,
        dy: &impl DeviceSlice<T>,
        dx: &mut impl DeviceSliceMut<T>,
    ) -> Result<()> {
        self.backward_observed(x, dy, dx, None)
    }

    /// [`backward`](Self::backward) with a stage observer, as in [`forward_observed`](Self::forward_observed).
    /// Drops a captured graph.
    pub fn backward_observed(
        &mut self,
        x: &impl DeviceSlice<T>,
        dy: &impl DeviceSlice<T>,
        dx: &mut impl DeviceSliceMut<T>,
        stages: Option<&mut dyn FnMut(&'static str)>,
    ) -> Result<()> {
        self.graph = None;
        self.run_backward(x, dy, dx, stages)
    }

    fn run_backward(
        &mut self,
        x: &impl DeviceSlice<T>,
        dy: &impl DeviceSlice<T>,
        dx: &mut impl DeviceSliceMut<T>,
        mut stages: Option<&mut dyn FnMut(&'static str)>,
    ) -> Result<()> {
        let grads = Gradients {
            router: Some(&mut self.router_grads),
            experts: &mut self.expert_grads,
            mask: self.mask.as_ref(),
            call: 0,
        };
        self.weights.validate(&self.config)?;
        let mut pass = Pass {
            device: &self.device,
            config: &self.config,
            router: &self.weights.router,
            experts: &self.weights.experts,
            scratch: &mut self.scratch,
            mode: self.mode,
            stages: match stages.as_mut() {
                Some(observer) => Some(&mut **observer),
                None => None,
            },
        };
        pass.backward(&self.saved, x, dy, self.residual, dx, grads)
    }

    /// Restricts the routed experts' weight gradients to `mask`'s experts (ESFT, math §8); `None`:
    /// all experts. Frozen experts cost no weight-gradient work and their gradients are not touched.
    pub fn set_expert_mask(&mut self, mask: Option<ExpertMask>) -> Result<()> {
        self.config.check_mask(mask.as_ref())?;
        self.graph = None;
        self.mask = mask;
        Ok(())
    }

    pub fn expert_mask(&self) -> Option<&ExpertMask> {
        self.mask.as_ref()
    }

    /// The weights, by name ([`LayerWeights::tensor`]).
    pub fn weights(&self) -> &LayerWeights<T> {
        &self.weights
    }

    /// The weights as shared ([`from_shared_weights`](Self::from_shared_weights)): another
    /// layer built over this `Arc` reads the same buffers.
    pub fn shared_weights(&self) -> &Arc<LayerWeights<T>> {
        &self.weights
    }

    /// The weights, to step in place between passes ([`LayerWeights::tensor_mut`]); the next
    /// forward reads what is there. Drops a captured graph (a buffer may be swapped). `Err`
    /// while another layer shares them.
    pub fn weights_mut(&mut self) -> Result<&mut LayerWeights<T>> {
        let weights = Arc::get_mut(&mut self.weights).ok_or_else(|| shared("weights_mut"))?;
        self.graph = None;
        Ok(weights)
    }

    /// The weights back, as they are now. `Err` while another layer shares them (they stay
    /// with the other holders).
    pub fn into_weights(self) -> Result<LayerWeights<T>> {
        Arc::try_unwrap(self.weights).map_err(|_| shared("into_weights"))
    }

    /// The gradient of the weight `name` from the last backward (f32, the weight's shape:
    /// [`MoeConfig::weight_shapes`]): `gate.w`, ..., `experts.w1`, `experts.w2`, `shared.w1`,
    /// `shared.w2`. The selection bias and a codebook's codes have none; an inference layer
    /// holds none. A routed expert that received no rows keeps what its slice held
    /// ([`ExpertGrads::written`], [`ExpertGrads::zero_unwritten`]).
    pub fn grad(&self, name: &str) -> Result<&DeviceBuffer<f32>> {
        let g = &self.expert_grads;
        let experts = [
            ("experts.w1", Some(&g.w1)),
            ("experts.w2", Some(&g.w2)),
            ("shared.w1", g.shared_w1.as_ref()),
            ("shared.w2", g.shared_w2.as_ref()),
        ];
        let gate = self
            .router_grads
            .tensors()
            .iter()
            .map(|(n, b)| (super::weights::gate_name(n), Some(b)));
        let all: Vec<(&'static str, &DeviceBuffer<f32>)> = (experts.into_iter().chain(gate))
            .filter_map(|(n, b)| b.map(|b| (n, b)))
            .filter(|_| self.mode == Mode::Training)
            .collect();
        match all.iter().find(|(n, _)| *n == name) {
            Some((_, b)) => Ok(b),
            None => Err(Error::InvalidArgument {
                argument: "name",
                value: name.into(),
                expected: format!(
                    "a weight with a gradient: one of {:?}",
                    all.iter().map(|(n, _)| n).collect::<Vec<_>>()
                ),
            }),
        }
    }

    /// Gradients of the gate tensors from the last backward.
    pub fn router_grads(&self) -> &RouterGrads {
        &self.router_grads
    }

    /// Gradients of the expert weights from the last backward.
    pub fn expert_grads(&self) -> &ExpertGrads {
        &self.expert_grads
    }

    /// The expert weight gradients, mutable: for an optimizer that steps from them in place, or
    /// for [`ExpertGrads::zero_unwritten`].
    pub fn expert_grads_mut(&mut self) -> &mut ExpertGrads {
        self.graph = None; // the caller may swap a buffer the graph writes
        &mut self.expert_grads
    }

    layer_graph_methods!();

    /// The last forward's selected ids (`[T, k]`, i32) and combine weights (`[T, k]`, f32).
    pub fn routing(&self) -> Result<(impl DeviceSlice<i32> + '_, impl DeviceSlice<f32> + '_)> {
        let slots = self.saved.tokens * self.config.k;
        Ok((
            prefix("ids", &self.saved.ids, slots)?,
            prefix("weights", &self.saved.weights, slots)?,
        ))
    }

    /// The router's logits of the last forward, on the device (`[T, E]`, f32): the gate's
    /// scores before softmax or sigmoid (Hugging Face's `router_logits`). A codebook router
    /// has none: an error.
    pub fn router_logits(&self) -> Result<impl DeviceSlice<f32> + '_> {
        if self.config.router == RouterKind::Codebook {
            return Err(Error::InvalidArgument {
                argument: "router_logits",
                value: "a codebook router".into(),
                expected: "a router with logits (linear, quadratic or sigmoid)".into(),
            });
        }
        prefix("z", &self.saved.z, self.saved.tokens * self.config.experts)
    }

    /// Rows each expert received in the last forward (`[E]`, after capacity).
    pub fn expert_counts(&self) -> &DeviceBuffer<i32> {
        &self.saved.counts
    }

    /// What the last forward kept (the routing reports read it).
    pub(crate) fn saved(&self) -> &Saved<T> {
        &self.saved
    }

    /// Whether the forward adds the residual ([`with_residual`](Self::with_residual)).
    pub fn residual(&self) -> bool {
        self.residual
    }

    /// Tokens of the last forward (0 before the first).
    pub fn tokens(&self) -> usize {
        self.saved.tokens
    }

    /// The loss values of the last forward, on the device: `[aux]` and `[z]` (f32, one element each).
    pub fn loss_buffers(&self) -> (&DeviceBuffer<f32>, &DeviceBuffer<f32>) {
        (&self.saved.aux_loss, &self.saved.z_loss)
    }

    /// Downloads the loss values (a host sync: for reports, not inside a training step). An
    /// inference layer computes none: an error.
    pub fn losses(&self) -> Result<LossValues> {
        self.mode.require_training("losses")?;
        Ok(LossValues {
            aux: self.device.download(&self.saved.aux_loss)?[0],
            z: self.device.download(&self.saved.z_loss)?[0],
        })
    }

    /// Non-finite router rows summed over every forward so far (one u32 on the device): the
    /// tokens routed nowhere (math §2), whose output rows are NaN and which add nothing to any
    /// gradient; a NaN, an infinity or an element of at least 2^64 in a token's input row
    /// makes it one.
    pub fn nonfinite_rows(&self) -> &DeviceBuffer<u32> {
        &self.scratch.nonfinite_rows
    }

    /// DeepSeek-V3 auxiliary-loss-free balancing after a step: `bias += γ·sign(mean(c) − c)` with
    /// the last forward's expert counts. Only for routers with a selection bias. One launch.
    pub fn update_bias(&mut self, gamma: f32) -> Result<()> {
        let kind = self.config.router;
        let no_bias = || Error::InvalidArgument {
            argument: "router",
            value: format!("{kind:?}"),
            expected: "a router with a selection bias (RouterKind::Sigmoid)".into(),
        };
        if self.weights.router.bias.is_none() {
            return Err(no_bias());
        }
        let weights = Arc::get_mut(&mut self.weights).ok_or_else(|| shared("update_bias"))?;
        let Some(bias) = weights.router.bias.as_mut() else {
            return Err(no_bias());
        };
        router::bias_update(&self.device, gamma, &self.saved.counts, bias)
    }

    /// Bytes per token the layer keeps for backward (buffers sized for `max_tokens`).
    pub fn saved_bytes_per_token(&self) -> usize {
        self.saved.bytes_per_token(self.config.max_tokens)
    }

    /// The documented formula for [`saved_bytes_per_token`](Self::saved_bytes_per_token); `Err`
    /// for a config [`MoeConfig::validate`] refuses (whose sizes could overflow).
    pub fn saved_bytes_per_token_formula(config: &MoeConfig) -> Result<usize> {
        config.validate()?;
        Ok(saved_bytes_per_token(config, size_of::<T>()))
    }
}

impl<T: FloatElement> EagerPass<T> for MoeLayer<T> {
    fn trains(&self) -> bool {
        self.mode == Mode::Training
    }
    fn eager_forward(&mut self, x: &DeviceBuffer<T>, tokens: usize, y: &mut DeviceBuffer<T>) -> Result<()> {
        self.run_forward(x, tokens, y, None)
    }
    fn eager_backward(&mut self, x: &DeviceBuffer<T>, dy: &DeviceBuffer<T>, dx: &mut DeviceBuffer<T>) -> Result<()> {
        self.run_backward(x, dy, dx, None)
    }
    fn forget_zeroed_workspaces(&mut self) {
        self.scratch.forget_zeroed();
    }
}

/// What refuses to change weights another layer shares.
fn shared(operation: &str) -> Error {
    Error::InvalidArgument {
        argument: "weights",
        value: format!("{operation} on weights other layers share"),
        expected: "weights held by this layer alone (drop the other layers, or build it with from_weights)".into(),
    }
}
