//! [`VqMoe`] (math §6, last bullet): a continuous path (an ordinary routed MoE) and a discrete
//! path (each token's nearest code picks its expert, applied to the straight-through mix x̃),
//! mixed per token by a 2-way softmax gate, `y = a0·y_cont + a1·y_disc`, plus the VQ losses.
use super::buffers::{Saved, Scratch};
use super::device_weights::LayerWeights;
use super::graph::{EagerPass, LayerGraph, layer_graph_methods};
use super::params::{ExpertGrads, RouterGrads, RouterWeights};
use super::pass::{Gradients, Pass, Routing, add_rows};
use super::weights::uniform;
use super::workspace::{prefix, prefix_mut};
use super::{HostWeights, Mode, MoeConfig, RouterKind};
use crate::ops::codebook::{self, CodeOrder, CodebookShape, LossConfig, NearestConfig, NearestOutputs};
use crate::ops::gate;
use crate::ops::{FloatElement, check_range, mix};
use crate::{Device, DeviceBuffer, DeviceSlice, DeviceSliceMut, Error, Result};

/// β of the commitment loss (VQ-VAE).
pub const COMMITMENT_BETA: f32 = 0.25;
/// c of the straight-through mix `x̃ = x + c·sg(q − x)`: 1 is the classic estimator (x̃ = q in
/// value, gradient 1 to x).
pub const MIX_COEFFICIENT: f32 = 1.0;

/// The weights of a VQ-MoE layer beyond the routed MoE's: the codebook (`[E, d]`, one code per
/// expert), and the mixing gate (`w [2, d]`, `b [2]` f32: logits of the continuous and discrete paths).
#[derive(Debug, Clone, PartialEq)]
pub struct VqWeights {
    pub moe: HostWeights,
    pub codebook: Vec<f32>,
    pub mix_w: Vec<f32>,
    pub mix_b: Vec<f32>,
}

impl VqWeights {
    /// Random weights from `seed` (codes uniform in [-1, 1), the mix gate scaled by 1/√d).
    pub fn random(config: &MoeConfig, seed: u64) -> Self {
        let d = config.dim;
        Self {
            moe: HostWeights::random(config, seed),
            codebook: uniform(seed ^ 0x7671, config.experts * d, 1.0),
            mix_w: uniform(seed ^ 0x6d69, 2 * d, 1.0 / (d as f32).sqrt()),
            mix_b: uniform(seed ^ 0x6d6a, 2, 0.1),
        }
    }

    /// The values a `T` layer holds (see [`HostWeights::rounded`]); the mix bias stays f32.
    pub fn rounded<T: FloatElement>(&self, config: &MoeConfig) -> Self {
        let round = |v: &[f32]| v.iter().map(|&x| T::from_f32(x).to_f32()).collect();
        Self {
            moe: self.moe.rounded::<T>(config),
            codebook: round(&self.codebook),
            mix_w: round(&self.mix_w),
            mix_b: self.mix_b.clone(),
        }
    }
}

/// The mixing gate as a linear router over 2 "experts" (the two paths).
pub fn mix_config(config: &MoeConfig) -> MoeConfig {
    MoeConfig {
        router: RouterKind::Linear,
        experts: 2,
        k: 1,
        shared_experts: 0,
        capacity_factor: None,
        aux_alpha: 0.0,
        z_loss: 0.0,
        normalize_topk: false,
        route_scale: 1.0,
        ..*config
    }
}

/// The discrete path: k = 1 (the code's expert, weight 1), no shared experts, no router losses.
pub fn discrete_config(config: &MoeConfig) -> MoeConfig {
    MoeConfig {
        router: RouterKind::Linear,
        k: 1,
        shared_experts: 0,
        capacity_factor: None,
        aux_alpha: 0.0,
        z_loss: 0.0,
        normalize_topk: false,
        route_scale: 1.0,
        ..*config
    }
}

/// Per-token `[max_tokens, d]` buffers of the two paths and the mix.
struct Rows<T: FloatElement> {
    x_mix: DeviceBuffer<T>,
    y_cont: DeviceBuffer<T>,
    y_disc: DeviceBuffer<T>,
    dy_cont: DeviceBuffer<T>,
    dy_disc: DeviceBuffer<T>,
    dx_cont: DeviceBuffer<T>,
    dx_mixed: DeviceBuffer<T>,
    dx_vq: DeviceBuffer<T>,
    dx_gate: DeviceBuffer<T>,
    sum: DeviceBuffer<T>,
}

/// A VQ-MoE layer: the continuous path is [`MoeLayer`](super::MoeLayer)'s routed pass (its
/// router, shared experts, losses); the discrete path sends token t to expert `j*_t mod E` (its
/// nearest code, Nc = E) with weight 1, applied to `x̃ = x + c·sg(q − x)`; both paths use the
/// same expert weights, whose gradients sum both paths. Losses: the router's (aux, z) and the
/// VQ codebook and commitment losses (`[2]`), all with upstream gradient 1 in backward.
///
/// Forward launches: code norms 1, nearest code 1, quantize 1, the routed pass (6 +
/// losses), the discrete pass (map, 2 GEMMs, combine: 4), mix logits 1, mix 1, VQ losses 2.
/// No host sync in either direction.
pub struct VqMoe<T: FloatElement> {
    device: Device,
    config: MoeConfig,
    discrete: MoeConfig,
    mix: MoeConfig,
    /// The continuous path's router and the experts both paths share.
    weights: LayerWeights<T>,
    mix_gate: RouterWeights<T>,
    codebook: DeviceBuffer<T>,
    norms: DeviceBuffer<f32>,
    codes: DeviceBuffer<i32>,
    saved: Saved<T>,
    saved_discrete: Saved<T>,
    scratch: Scratch<T>,
    scratch_discrete: Scratch<T>,
    rows: Rows<T>,
    logits: DeviceBuffer<f32>,
    dlogits: DeviceBuffer<f32>,
    loss_workspace: DeviceBuffer<f32>,
    /// Empty: the nearest-code search runs unsplit (one launch, no workspace).
    nearest_workspace: DeviceBuffer<u32>,
    vq_losses: DeviceBuffer<f32>,
    /// Tokens sorted by code for dC (sized per T: rebuilt when T changes).
    order: Option<CodeOrder>,
    router_grads: RouterGrads,
    mix_grads: RouterGrads,
    expert_grads: ExpertGrads,
    codebook_grad: DeviceBuffer<f32>,
    /// The captured pass, if any ([`capture`](VqMoe::capture)).
    graph: Option<LayerGraph<T>>,
}

impl<T: FloatElement> VqMoe<T> {
    /// A layer holding `weights`, uploaded once and rounded to `T` (the mix bias kept f32).
    pub fn new(device: &Device, config: MoeConfig, weights: &VqWeights) -> Result<Self> {
        config.validate_for::<T>()?;
        let (e, d) = (config.experts, config.dim);
        let check = |argument: &'static str, values: &[f32], len: usize| {
            if values.len() == len {
                return Ok(());
            }
            Err(Error::Shape {
                argument,
                expected: format!("{len} elements"),
                got: format!("{} elements", values.len()),
            })
        };
        check("weights.codebook", &weights.codebook, e * d)?;
        check("weights.mix_w", &weights.mix_w, 2 * d)?;
        check("weights.mix_b", &weights.mix_b, 2)?;
        let mix_gate = RouterWeights::new(
            &mix_config(&config),
            vec![("w", device.upload_from_f32(&weights.mix_w)?)],
            vec![("b", device.upload(&weights.mix_b)?)],
            None,
        )?;
        Self::from_weights(
            device,
            config,
            LayerWeights::upload(device, &config, &weights.moe)?,
            device.upload_from_f32(&weights.codebook)?,
            mix_gate,
        )
    }

    /// A layer over device buffers it takes over without a copy: `weights` (the continuous
    /// path's router and the experts), the `codebook` (`[E, d]`, in `T`) and the mixing gate
    /// (a linear router of [`mix_config`]: `gate.w [2, d]` in `T`, `gate.b [2]` f32). Errors
    /// name the tensor.
    pub fn from_weights(
        device: &Device,
        config: MoeConfig,
        weights: LayerWeights<T>,
        codebook: DeviceBuffer<T>,
        mix_gate: RouterWeights<T>,
    ) -> Result<Self> {
        config.validate_for::<T>()?;
        let (e, d, max) = (config.experts, config.dim, config.max_tokens);
        let (discrete, mix) = (discrete_config(&config), mix_config(&config));
        weights.validate(&config)?;
        weights.check_device(device)?;
        mix_gate.validate(&mix).map_err(in_mix_gate)?;
        mix_gate.check_device(device).map_err(in_mix_gate)?;
        check_codebook(&codebook, &config)?;
        if codebook.kind() != device.kind() {
            return Err(Error::WrongDevice {
                argument: "codebook",
                expected: device.kind().name(),
                found: codebook.kind().name(),
            });
        }
        let rows = |device: &Device| device.alloc_zeros::<T>(max * d);
        let shape = CodebookShape {
            tokens: max,
            dim: d,
            codes: e,
        };
        // The discrete path's routing weights (1, NaN for a row routed nowhere) are written by
        // the nearest-code search of each forward.
        let saved_discrete = Saved::alloc(device, &discrete, Mode::Training)?;
        Ok(Self {
            device: device.clone(),
            config,
            discrete,
            mix,
            weights,
            mix_gate,
            codebook,
            norms: device.alloc_zeros(e)?,
            codes: device.alloc_zeros(max)?,
            saved: Saved::alloc(device, &config, Mode::Training)?,
            saved_discrete,
            scratch: Scratch::alloc(device, &config, Mode::Training)?,
            scratch_discrete: Scratch::alloc(device, &discrete, Mode::Training)?,
            rows: Rows {
                x_mix: rows(device)?,
                y_cont: rows(device)?,
                y_disc: rows(device)?,
                dy_cont: rows(device)?,
                dy_disc: rows(device)?,
                dx_cont: rows(device)?,
                dx_mixed: rows(device)?,
                dx_vq: rows(device)?,
                dx_gate: rows(device)?,
                sum: rows(device)?,
            },
            logits: device.alloc_zeros(2 * max)?,
            dlogits: device.alloc_zeros(2 * max)?,
            loss_workspace: device.alloc_zeros(codebook::losses_workspace_len::<T>(&shape))?,
            nearest_workspace: device.alloc_zeros(0)?,
            vq_losses: device.alloc_zeros(2)?,
            order: None,
            router_grads: RouterGrads::alloc(device, &config, Mode::Training)?,
            mix_grads: RouterGrads::alloc(device, &mix, Mode::Training)?,
            expert_grads: ExpertGrads::alloc(device, &config, Mode::Training)?,
            codebook_grad: device.alloc_zeros(e * d)?,
            graph: None,
        })
    }

    pub fn random(device: &Device, config: MoeConfig, seed: u64) -> Result<Self> {
        Self::new(device, config, &VqWeights::random(&config, seed))
    }

    /// The device the layer runs on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// What the layer was built with.
    pub fn config(&self) -> &MoeConfig {
        &self.config
    }

    /// The continuous path's router and the experts, by name ([`LayerWeights::tensor`]).
    pub fn weights(&self) -> &LayerWeights<T> {
        &self.weights
    }

    /// The router and experts, to step in place between passes; the next pass checks them
    /// again. Drops a captured graph (a buffer may be swapped).
    pub fn weights_mut(&mut self) -> &mut LayerWeights<T> {
        self.graph = None;
        &mut self.weights
    }

    /// The codebook (`[E, d]`).
    pub fn codebook(&self) -> &DeviceBuffer<T> {
        &self.codebook
    }

    /// The codebook, to step in place (same length). Drops a captured graph.
    pub fn codebook_mut(&mut self) -> &mut DeviceBuffer<T> {
        self.graph = None;
        &mut self.codebook
    }

    /// The mixing gate (`gate.w [2, d]`, `gate.b [2]` f32).
    pub fn mix_weights(&self) -> &RouterWeights<T> {
        &self.mix_gate
    }

    /// The mixing gate, to step in place. Drops a captured graph.
    pub fn mix_weights_mut(&mut self) -> &mut RouterWeights<T> {
        self.graph = None;
        &mut self.mix_gate
    }

    /// The checks of [`from_weights`](Self::from_weights), again before a pass: a buffer handed
    /// out mutably may have been replaced.
    fn validate_weights(&self) -> Result<()> {
        self.weights.validate(&self.config)?;
        self.mix_gate.validate(&self.mix).map_err(in_mix_gate)?;
        check_codebook(&self.codebook, &self.config)
    }

    /// What the continuous path's last forward kept (the routing reports read it).
    pub(crate) fn saved(&self) -> &Saved<T> {
        &self.saved
    }

    fn shape(&self, tokens: usize) -> CodebookShape {
        CodebookShape {
            tokens,
            dim: self.config.dim,
            codes: self.config.experts,
        }
    }

    /// `y = a0·MoE(x) + a1·FFN_{code(x) mod E}(x̃)` for `tokens` rows. No host sync.
    /// Drops a captured graph.
    pub fn forward(&mut self, x: &impl DeviceSlice<T>, tokens: usize, y: &mut impl DeviceSliceMut<T>) -> Result<()> {
        self.graph = None;
        self.run_forward(x, tokens, y)
    }

    fn run_forward(&mut self, x: &impl DeviceSlice<T>, tokens: usize, y: &mut impl DeviceSliceMut<T>) -> Result<()> {
        check_range("tokens", tokens, 1..=self.config.max_tokens)?;
        let device = &self.device;
        let (e, len) = (self.config.experts, tokens * self.config.dim);
        let shape = self.shape(tokens);
        let layout = || format!("[T, d] = [{tokens}, {}]", self.config.dim);
        crate::ops::check_len("x", x, len, layout)?;
        crate::ops::check_len("y", y, len, layout)?;
        self.validate_weights()?;
        codebook::code_norms(device, &shape, &self.codebook, &mut self.norms)?;
        let nearest = NearestConfig {
            k: 1,
            num_experts: e,
            splits: Some(1),
        };
        let mut codes = prefix_mut("codes", &mut self.codes, tokens)?;
        let mut experts = prefix_mut("ids", &mut self.saved_discrete.ids, tokens)?;
        let mut weights = prefix_mut("weights", &mut self.saved_discrete.weights, tokens)?;
        let out = NearestOutputs {
            ids: &mut codes,
            distances: None,
            experts: Some(&mut experts),
            weights: Some(&mut weights),
            nonfinite_rows: Some(&mut self.scratch_discrete.nonfinite_rows),
        };
        let (codebook, norms) = (&self.codebook, &self.norms);
        codebook::nearest(
            device,
            &shape,
            &nearest,
            x,
            codebook,
            norms,
            out,
            &mut self.nearest_workspace,
        )?;
        let codes = prefix("codes", &self.codes, tokens)?;
        let mut x_mix = prefix_mut("x_mix", &mut self.rows.x_mix, len)?;
        codebook::quantize(
            device,
            &shape,
            x,
            &self.codebook,
            &codes,
            MIX_COEFFICIENT,
            None,
            Some(&mut x_mix),
        )?;

        let mut y_cont = prefix_mut("y_cont", &mut self.rows.y_cont, len)?;
        let mut continuous = Pass {
            device,
            config: &self.config,
            router: self.weights.router(),
            experts: &self.weights.experts,
            scratch: &mut self.scratch,
            mode: Mode::Training,
            stages: None,
        };
        continuous.forward(&mut self.saved, x, tokens, None, &mut y_cont)?;
        let x_mix = prefix("x_mix", &self.rows.x_mix, len)?;
        let mut y_disc = prefix_mut("y_disc", &mut self.rows.y_disc, len)?;
        let mut discrete = Pass {
            device,
            config: &self.discrete,
            router: self.weights.router(),
            experts: &self.weights.experts,
            scratch: &mut self.scratch_discrete,
            mode: Mode::Training,
            stages: None,
        };
        discrete.forward_routed(
            &mut self.saved_discrete,
            &x_mix,
            tokens,
            Routing::Given,
            None,
            &mut y_disc,
        )?;

        let mut logits = prefix_mut("logits", &mut self.logits, 2 * tokens)?;
        gate::scores(
            device,
            &self.mix.gate_shape(tokens),
            &self.mix_gate.weights(),
            x,
            &mut logits,
        )?;
        let logits = prefix("logits", &self.logits, 2 * tokens)?;
        let y_cont = prefix("y_cont", &self.rows.y_cont, len)?;
        let y_disc = prefix("y_disc", &self.rows.y_disc, len)?;
        mix::forward(device, &logits, &y_cont, &y_disc, self.config.dim, y)?;
        let workspace_len = codebook::losses_workspace_len::<T>(&shape);
        let mut workspace = prefix_mut("loss_workspace", &mut self.loss_workspace, workspace_len)?;
        let config = LossConfig { beta: COMMITMENT_BETA };
        codebook::losses(
            device,
            &shape,
            &config,
            x,
            &self.codebook,
            &codes,
            &mut self.vq_losses,
            &mut workspace,
        )
    }

    /// Backward of the last forward (same `x`) for the total loss `<y, dy>` + router losses + VQ
    /// losses: dx (`[T, d]`), the router's and the mixing gate's gradients, the expert gradients
    /// (both paths summed) and the codebook's (codebook loss; the straight-through path gives the
    /// codes no gradient). No host sync. Drops a captured graph.
    pub fn backward(
        &mut self,
        x: &impl DeviceSlice<T>,
        dy: &impl DeviceSlice<T>,
        dx: &mut impl DeviceSliceMut<T>,
    ) -> Result<()> {
        self.graph = None;
        self.run_backward(x, dy, dx)
    }

    fn run_backward(
        &mut self,
        x: &impl DeviceSlice<T>,
        dy: &impl DeviceSlice<T>,
        dx: &mut impl DeviceSliceMut<T>,
    ) -> Result<()> {
        let tokens = self.saved.tokens;
        if tokens == 0 {
            return Err(Error::InvalidArgument {
                argument: "backward",
                value: "no forward".into(),
                expected: "a forward before each backward".into(),
            });
        }
        let device = &self.device;
        let (d, len) = (self.config.dim, tokens * self.config.dim);
        let layout = || format!("[T, d] = [{tokens}, {d}] (T of the last forward)");
        crate::ops::check_len("x", x, len, layout)?;
        crate::ops::check_len("dy", dy, len, layout)?;
        crate::ops::check_len("dx", dx, len, layout)?;
        self.validate_weights()?;
        let shape = self.shape(tokens);
        let rows = &mut self.rows;
        let logits = prefix("logits", &self.logits, 2 * tokens)?;
        let (y_cont, y_disc) = (
            prefix("y_cont", &rows.y_cont, len)?,
            prefix("y_disc", &rows.y_disc, len)?,
        );
        let mut dy_cont = prefix_mut("dy_cont", &mut rows.dy_cont, len)?;
        let mut dy_disc = prefix_mut("dy_disc", &mut rows.dy_disc, len)?;
        let mut dlogits = prefix_mut("dlogits", &mut self.dlogits, 2 * tokens)?;
        mix::backward(
            device,
            &logits,
            &y_cont,
            &y_disc,
            dy,
            d,
            &mut dy_cont,
            &mut dy_disc,
            &mut dlogits,
        )?;

        let dy_cont = prefix("dy_cont", &rows.dy_cont, len)?;
        let mut dx_cont = prefix_mut("dx_cont", &mut rows.dx_cont, len)?;
        let mut continuous = Pass {
            device,
            config: &self.config,
            router: self.weights.router(),
            experts: &self.weights.experts,
            scratch: &mut self.scratch,
            mode: Mode::Training,
            stages: None,
        };
        let grads = Gradients {
            router: Some(&mut self.router_grads),
            experts: &mut self.expert_grads,
            mask: None,
            call: 0,
        };
        continuous.backward(&self.saved, x, &dy_cont, false, &mut dx_cont, grads)?;
        let (x_mix, dy_disc) = (
            prefix("x_mix", &rows.x_mix, len)?,
            prefix("dy_disc", &rows.dy_disc, len)?,
        );
        let mut dx_mixed = prefix_mut("dx_mixed", &mut rows.dx_mixed, len)?;
        let mut discrete = Pass {
            device,
            config: &self.discrete,
            router: self.weights.router(),
            experts: &self.weights.experts,
            scratch: &mut self.scratch_discrete,
            mode: Mode::Training,
            stages: None,
        };
        let grads = Gradients {
            router: None,
            experts: &mut self.expert_grads,
            mask: None,
            call: 1,
        };
        discrete.backward(&self.saved_discrete, &x_mix, &dy_disc, false, &mut dx_mixed, grads)?;

        // The VQ losses' gradients, with the straight-through gradient of x̃ passed to x.
        if self.order.as_ref().is_none_or(|o| o.dims().0 != tokens) {
            self.order = Some(CodeOrder::alloc(device, tokens, self.config.experts)?);
        }
        let order = self.order.as_mut().expect("allocated above");
        let codes = prefix("codes", &self.codes, tokens)?;
        codebook::code_order(device, &codes, order)?;
        let dx_mixed = prefix("dx_mixed", &rows.dx_mixed, len)?;
        let mut dx_vq = prefix_mut("dx_vq", &mut rows.dx_vq, len)?;
        let config = LossConfig { beta: COMMITMENT_BETA };
        let dmix: &dyn DeviceSlice<T> = &dx_mixed;
        let (codebook, codebook_grad) = (&self.codebook, &mut self.codebook_grad);
        codebook::losses_backward(
            device,
            &shape,
            &config,
            x,
            codebook,
            &codes,
            order,
            Some(dmix),
            &mut dx_vq,
            codebook_grad,
        )?;

        // The mixing gate's backward, then dx = dx_gate + (dx_vq + dx_cont).
        let dlogits = prefix("dlogits", &self.dlogits, 2 * tokens)?;
        let mut dx_gate = prefix_mut("dx_gate", &mut rows.dx_gate, len)?;
        let mut no_workspace = prefix_mut("workspace", &mut self.loss_workspace, 0)?;
        let mix_shape = self.mix.gate_shape(tokens);
        let mix_grads = self.mix_grads.as_gate_grads();
        gate::scores_backward(
            device,
            &mix_shape,
            &self.mix_gate.weights(),
            x,
            &dlogits,
            &mut dx_gate,
            mix_grads,
            &mut no_workspace,
        )?;
        let identity = &self.scratch.identity;
        let (dx_vq, dx_cont) = (
            prefix("dx_vq", &rows.dx_vq, len)?,
            prefix("dx_cont", &rows.dx_cont, len)?,
        );
        let mut sum = prefix_mut("sum", &mut rows.sum, len)?;
        add_rows(device, identity, (tokens, d), &dx_vq, &dx_cont, &mut sum)?;
        let (dx_gate, sum) = (prefix("dx_gate", &rows.dx_gate, len)?, prefix("sum", &rows.sum, len)?);
        add_rows(device, identity, (tokens, d), &dx_gate, &sum, dx)
    }

    /// The continuous router's gradients.
    pub fn router_grads(&self) -> &RouterGrads {
        &self.router_grads
    }

    /// The mixing gate's gradients (`w [2, d]`, `b [2]`).
    pub fn mix_grads(&self) -> &RouterGrads {
        &self.mix_grads
    }

    /// Expert weight gradients (both paths).
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

    /// The codebook's gradient (`[E, d]`, f32).
    pub fn codebook_grad(&self) -> &DeviceBuffer<f32> {
        &self.codebook_grad
    }

    /// `[codebook loss, commitment loss]` of the last forward, on the device.
    pub fn vq_losses(&self) -> &DeviceBuffer<f32> {
        &self.vq_losses
    }

    /// The continuous router's `[aux]`, `[z]` loss buffers.
    pub fn router_losses(&self) -> (&DeviceBuffer<f32>, &DeviceBuffer<f32>) {
        (&self.saved.aux_loss, &self.saved.z_loss)
    }

    /// Tokens routed nowhere, summed over every forward so far (one u32 each, on the device):
    /// `(router, codebook)`, by the continuous path's router (non-finite logits) and by the
    /// nearest-code search (a nearest distance that is not finite; its code is -1). Such a
    /// token's output row is NaN and it adds nothing to any gradient or VQ loss.
    pub fn nonfinite_rows(&self) -> (&DeviceBuffer<u32>, &DeviceBuffer<u32>) {
        (&self.scratch.nonfinite_rows, &self.scratch_discrete.nonfinite_rows)
    }

    /// Each token's nearest code (`[T]`, i32; -1 for a token routed nowhere) from the last
    /// forward.
    pub fn codes(&self) -> Result<impl DeviceSlice<i32> + '_> {
        prefix("codes", &self.codes, self.saved.tokens)
    }
}

impl<T: FloatElement> EagerPass<T> for VqMoe<T> {
    fn trains(&self) -> bool {
        true
    }
    fn eager_forward(&mut self, x: &DeviceBuffer<T>, tokens: usize, y: &mut DeviceBuffer<T>) -> Result<()> {
        self.run_forward(x, tokens, y)
    }
    fn eager_backward(&mut self, x: &DeviceBuffer<T>, dy: &DeviceBuffer<T>, dx: &mut DeviceBuffer<T>) -> Result<()> {
        self.run_backward(x, dy, dx)
    }
    fn forget_zeroed_workspaces(&mut self) {
        self.scratch.forget_zeroed();
        self.scratch_discrete.forget_zeroed();
    }
}

/// A mixing-gate error, marked as the mixing gate's (its tensors share the router's names).
fn in_mix_gate(e: Error) -> Error {
    Error::InvalidArgument {
        argument: "mix_gate",
        value: e.to_string(),
        expected: "a linear router of mix_config (2 experts): gate.w [2, d], gate.b [2] f32".into(),
    }
}

fn check_codebook<T: FloatElement>(codebook: &DeviceBuffer<T>, config: &MoeConfig) -> Result<()> {
    let len = config.experts * config.dim;
    if codebook.len() == len {
        return Ok(());
    }
    Err(Error::Shape {
        argument: "codebook",
        expected: format!("[E, d] = [{}, {}] ({len} elements)", config.experts, config.dim),
        got: format!("{} elements", codebook.len()),
    })
}
