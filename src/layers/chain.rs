//! [`ChainOfExperts`] (math §7): C routed passes over one set of expert weights,
//! `x⁽ᵗ⁾ = x⁽ᵗ⁻¹⁾ + MoE_t(x⁽ᵗ⁻¹⁾)`, each iteration with its own router.
use super::buffers::{Saved, Scratch, saved_bytes_per_token};
use super::device_weights::LayerWeights;
use super::graph::{EagerPass, LayerGraph, layer_graph_methods};
use super::params::{ExpertGrads, RouterGrads, RouterWeights};
use super::pass::{Gradients, Pass};
use super::workspace::{prefix, prefix_mut};
use super::{HostWeights, Mode, MoeConfig};
use crate::ops::Dyn;
use crate::ops::gemm::ExpertMask;
use crate::ops::{FloatElement, check_len};
use crate::{Device, DeviceBuffer, DeviceSlice, DeviceSliceMut, Error, Result};

/// Chain-of-Experts: C iterations of a routed MoE with an inner residual, one router per
/// iteration (each with its own aux / z losses when configured), the routed and shared experts
/// shared by every iteration. Backward runs the iterations in reverse and accumulates the expert
/// weight gradients across them (the grouped GEMM's accumulate mode).
///
/// Memory: each iteration keeps only what its backward needs (its routing, SwiGLU's GU and H,
/// the expert outputs: [`saved_bytes_per_token_per_iteration`](Self::saved_bytes_per_token_per_iteration));
/// the work buffers of the passes are shared.
pub struct ChainOfExperts<T: FloatElement> {
    device: Device,
    config: MoeConfig,
    /// Iteration 1's router and the experts every iteration shares.
    weights: LayerWeights<T>,
    /// The routers of iterations 2..C.
    later_routers: Vec<RouterWeights<T>>,
    saved: Vec<Saved<T>>,
    /// x⁽¹⁾ .. x⁽ᶜ⁻¹⁾ (`[max_tokens, d]` each): the inputs of iterations 2..C.
    inputs: Vec<DeviceBuffer<T>>,
    /// dx⁽ᵗ⁾ between iterations, two buffers used in turn.
    carried: [DeviceBuffer<T>; 2],
    scratch: Scratch<T>,
    router_grads: Vec<RouterGrads>,
    expert_grads: ExpertGrads,
    mask: Option<ExpertMask>,
    mode: Mode,
    /// The captured pass, if any ([`capture`](ChainOfExperts::capture)).
    graph: Option<LayerGraph<T>>,
}

impl<T: FloatElement> ChainOfExperts<T> {
    /// `weights.len()` iterations: iteration t routes with `weights[t]`'s gate (and selection
    /// bias); the experts are `weights[0]`'s (the others' expert tensors are not read).
    pub fn new(device: &Device, config: MoeConfig, weights: &[HostWeights]) -> Result<Self> {
        Self::with_mode(device, config, weights, Mode::Training)
    }

    /// A chain for `mode` ([`new`](Self::new) is [`Mode::Training`]): a [`Mode::Inference`]
    /// chain runs every iteration's forward through one set of pass buffers, keeps nothing for
    /// backward, runs no router loss and holds no gradient.
    pub fn with_mode(device: &Device, config: MoeConfig, weights: &[HostWeights], mode: Mode) -> Result<Self> {
        let Some((first, later)) = weights.split_first() else {
            return Err(Error::InvalidArgument {
                argument: "weights",
                value: "[]".into(),
                expected: "one HostWeights per iteration (at least 1)".into(),
            });
        };
        let later_routers = (later.iter())
            .map(|w| RouterWeights::upload(device, &config, w))
            .collect::<Result<_>>()?;
        let weights = LayerWeights::upload(device, &config, first)?;
        Self::from_weights(device, config, weights, later_routers, mode)
    }

    /// A chain for `mode` over device buffers it takes over without a copy: iteration 1 routes
    /// with `weights`' router, iteration t + 2 with `later_routers[t]`, and every iteration runs
    /// `weights`' experts. Errors name the tensor (`gate.w`, `experts.w1`, ...), for a later
    /// router with its index in `later_routers`.
    pub fn from_weights(
        device: &Device,
        config: MoeConfig,
        weights: LayerWeights<T>,
        later_routers: Vec<RouterWeights<T>>,
        mode: Mode,
    ) -> Result<Self> {
        config.validate_for::<T>()?;
        weights.validate(&config)?;
        weights.check_device(device)?;
        for (i, router) in later_routers.iter().enumerate() {
            let checked = router.validate(&config).and_then(|()| router.check_device(device));
            checked.map_err(|e| Error::InvalidArgument {
                argument: "later_routers",
                value: format!("[{i}]: {e}"),
                expected: "routers checked as a layer's".into(),
            })?;
        }
        let rows = config.max_tokens * config.dim;
        let iterations = 1 + later_routers.len();
        let training = mode == Mode::Training;
        let carried = if training { rows } else { 0 };
        let router_grads = (0..iterations)
            .map(|t| RouterGrads::alloc_for(device, &config, router_of(&weights, &later_routers, t), mode))
            .collect::<Result<_>>()?;
        Ok(Self {
            device: device.clone(),
            config,
            weights,
            later_routers,
            saved: (0..if training { iterations } else { 1 })
                .map(|_| Saved::alloc(device, &config, mode))
                .collect::<Result<_>>()?,
            inputs: (1..iterations)
                .map(|_| device.alloc_zeros(rows))
                .collect::<Result<_>>()?,
            carried: [device.alloc_zeros(carried)?, device.alloc_zeros(carried)?],
            scratch: Scratch::alloc(device, &config, mode)?,
            router_grads,
            expert_grads: ExpertGrads::alloc(device, &config, mode)?,
            mask: None,
            mode,
            graph: None,
        })
    }

    /// `iterations` routers and one set of experts from [`HostWeights::random`] (seeds `seed + t`).
    pub fn random(device: &Device, config: MoeConfig, iterations: usize, seed: u64) -> Result<Self> {
        let weights: Vec<HostWeights> = (0..iterations)
            .map(|t| HostWeights::random(&config, seed + t as u64))
            .collect();
        Self::new(device, config, &weights)
    }

    /// The device the layer runs on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// What the layer was built with.
    pub fn config(&self) -> &MoeConfig {
        &self.config
    }

    /// What the chain was built for.
    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// What the last forward kept, per iteration (only the last one's in an inference chain).
    pub(crate) fn saved_iterations(&self) -> &[Saved<T>] {
        &self.saved
    }

    pub fn iterations(&self) -> usize {
        1 + self.later_routers.len()
    }

    /// Iteration 1's router and the experts, by name ([`LayerWeights::tensor`]).
    pub fn weights(&self) -> &LayerWeights<T> {
        &self.weights
    }

    /// Iteration 1's router and the experts, to step in place between passes; the next pass
    /// checks them again. Drops a captured graph (a buffer may be swapped).
    pub fn weights_mut(&mut self) -> &mut LayerWeights<T> {
        self.graph = None;
        &mut self.weights
    }

    /// Iteration `iteration`'s router (`0..iterations`; 0's is also `weights().router()`).
    pub fn router_weights(&self, iteration: usize) -> Result<&RouterWeights<T>> {
        crate::ops::check_range("iteration", iteration, 0..=self.later_routers.len())?;
        Ok(router_of(&self.weights, &self.later_routers, iteration))
    }

    /// Iteration `iteration`'s router, to step in place. Drops a captured graph.
    pub fn router_weights_mut(&mut self, iteration: usize) -> Result<&mut RouterWeights<T>> {
        crate::ops::check_range("iteration", iteration, 0..=self.later_routers.len())?;
        self.graph = None;
        Ok(match iteration {
            0 => self.weights.router_mut(),
            t => &mut self.later_routers[t - 1],
        })
    }

    /// The checks of [`from_weights`](Self::from_weights), again before a pass: a buffer handed
    /// out mutably may have been replaced.
    fn validate_weights(&self) -> Result<()> {
        self.weights.validate(&self.config)?;
        (self.later_routers.iter()).try_for_each(|router| router.validate(&self.config))
    }

    /// `y = x⁽ᶜ⁾` for `tokens` rows of `x` (`[tokens, d]`). No host sync. Drops a captured graph.
    pub fn forward(&mut self, x: &impl DeviceSlice<T>, tokens: usize, y: &mut impl DeviceSliceMut<T>) -> Result<()> {
        self.graph = None;
        self.run_forward(x, tokens, y)
    }

    fn run_forward(&mut self, x: &impl DeviceSlice<T>, tokens: usize, y: &mut impl DeviceSliceMut<T>) -> Result<()> {
        crate::ops::check_range("tokens", tokens, 1..=self.config.max_tokens)?;
        let len = tokens * self.config.dim;
        // Every argument is checked before the first iteration launches anything.
        let layout = || format!("[T, d] = [{tokens}, {}]", self.config.dim);
        check_len("x", x, len, layout)?;
        check_len("y", y, len, layout)?;
        self.validate_weights()?;
        let last = self.later_routers.len();
        for t in 0..=last {
            let (before, after) = self.inputs.split_at_mut(t);
            let held;
            let input: Dyn<'_, T> = if t == 0 {
                Dyn(x)
            } else {
                held = prefix("x(t)", &before[t - 1], len)?;
                Dyn(&held)
            };
            let mut pass = Pass {
                device: &self.device,
                config: &self.config,
                router: router_of(&self.weights, &self.later_routers, t),
                experts: &self.weights.experts,
                scratch: &mut self.scratch,
                mode: self.mode,
                stages: None,
            };
            // An inference chain has one set of saved buffers, which every iteration reuses.
            let kept = t.min(self.saved.len() - 1);
            let saved = &mut self.saved[kept];
            if t == last {
                pass.forward(saved, &input, tokens, Some(&input), y)?;
            } else {
                let mut output = prefix_mut("x(t)", &mut after[0], len)?;
                pass.forward(saved, &input, tokens, Some(&input), &mut output)?;
            }
        }
        Ok(())
    }

    /// Backward of the last forward (same `x`): `dx`, each iteration's router gradients and the
    /// expert gradients summed over iterations (experts outside the mask untouched). No host sync.
    /// Drops a captured graph.
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
        self.mode.require_training("backward")?;
        let tokens = self.saved[0].tokens;
        let len = tokens * self.config.dim;
        if tokens > 0 {
            let layout = || format!("[T, d] = [{tokens}, {}] (T of the last forward)", self.config.dim);
            check_len("x", x, len, layout)?;
            check_len("dy", dy, len, layout)?;
            check_len("dx", dx, len, layout)?;
        }
        self.validate_weights()?;
        let last = self.later_routers.len();
        let [first, second] = &mut self.carried;
        let (mut incoming, mut outgoing) = (first, second);
        for t in (0..=last).rev() {
            let held_input;
            let input: Dyn<'_, T> = if t == 0 {
                Dyn(x)
            } else {
                held_input = prefix("x(t)", &self.inputs[t - 1], len)?;
                Dyn(&held_input)
            };
            let held_upstream;
            let upstream: Dyn<'_, T> = if t == last {
                Dyn(dy)
            } else {
                held_upstream = prefix("dx(t)", incoming, len)?;
                Dyn(&held_upstream)
            };
            let mut pass = Pass {
                device: &self.device,
                config: &self.config,
                router: router_of(&self.weights, &self.later_routers, t),
                experts: &self.weights.experts,
                scratch: &mut self.scratch,
                mode: self.mode,
                stages: None,
            };
            let grads = Gradients {
                router: Some(&mut self.router_grads[t]),
                experts: &mut self.expert_grads,
                mask: self.mask.as_ref(),
                call: (last - t) as u32,
            };
            if t == 0 {
                pass.backward(&self.saved[t], &input, &upstream, true, dx, grads)?;
            } else {
                let mut output = prefix_mut("dx(t)", outgoing, len)?;
                pass.backward(&self.saved[t], &input, &upstream, true, &mut output, grads)?;
            }
            std::mem::swap(&mut incoming, &mut outgoing);
        }
        Ok(())
    }

    /// As [`MoeLayer::set_expert_mask`](super::MoeLayer::set_expert_mask).
    pub fn set_expert_mask(&mut self, mask: Option<ExpertMask>) -> Result<()> {
        self.config.check_mask(mask.as_ref())?;
        self.graph = None;
        self.mask = mask;
        Ok(())
    }

    layer_graph_methods!();

    /// What iteration `t`'s forward kept: every iteration's in a training chain, only the last
    /// one's in an inference chain (its iterations share one set of buffers).
    fn saved_of(&self, iteration: usize) -> Result<&Saved<T>> {
        let last = self.later_routers.len();
        crate::ops::check_range("iteration", iteration, 0..=last)?;
        if self.saved.len() == 1 && iteration != last {
            return Err(Error::InvalidArgument {
                argument: "iteration",
                value: iteration.to_string(),
                expected: format!("{last}, the last: an inference chain keeps only its routing"),
            });
        }
        Ok(&self.saved[iteration.min(self.saved.len() - 1)])
    }

    /// Iteration `t`'s routing in the last forward: selected ids (`[T, k]`, i32) and combine
    /// weights (`[T, k]`, f32), on the device. An inference chain keeps the last iteration's only.
    pub fn routing(&self, iteration: usize) -> Result<(impl DeviceSlice<i32> + '_, impl DeviceSlice<f32> + '_)> {
        let saved = self.saved_of(iteration)?;
        let slots = saved.tokens * self.config.k;
        Ok((
            prefix("ids", &saved.ids, slots)?,
            prefix("weights", &saved.weights, slots)?,
        ))
    }

    /// Iteration `t`'s router logits in the last forward (`[T, E]`, f32, on the device); as
    /// [`routing`](Self::routing), the last iteration only in an inference chain.
    pub fn router_logits(&self, iteration: usize) -> Result<impl DeviceSlice<f32> + '_> {
        let saved = self.saved_of(iteration)?;
        if self.config.router == super::RouterKind::Codebook {
            return Err(Error::InvalidArgument {
                argument: "router_logits",
                value: "a codebook router".into(),
                expected: "a router with logits".into(),
            });
        }
        prefix("z", &saved.z, saved.tokens * self.config.experts)
    }

    /// The input `x⁽ᵗ⁾` of iteration `t` in the last forward (`[T, d]`, on the device), for
    /// `t` in `1..iterations` (iteration 0's is the caller's `x`).
    pub fn input(&self, iteration: usize) -> Result<impl DeviceSlice<T> + '_> {
        crate::ops::check_range("iteration", iteration, 1..=self.inputs.len())?;
        let tokens = self.saved[0].tokens;
        prefix("x(t)", &self.inputs[iteration - 1], tokens * self.config.dim)
    }

    /// Iteration t's router gradients.
    pub fn router_grads(&self, iteration: usize) -> Option<&RouterGrads> {
        self.router_grads.get(iteration)
    }

    /// Expert weight gradients summed over iterations.
    pub fn expert_grads(&self) -> &ExpertGrads {
        &self.expert_grads
    }

    /// The expert weight gradients, mutable: for an optimizer that steps from them in place, or
    /// for [`ExpertGrads::zero_unwritten`].
    pub fn expert_grads_mut(&mut self) -> &mut ExpertGrads {
        self.graph = None; // the caller may swap a buffer the graph writes
        &mut self.expert_grads
    }

    /// Tokens routed nowhere (one u32 on the device), summed over every iteration of every forward
    /// so far: a token whose input row is not finite is counted once per iteration, since its
    /// row stays non-finite through the residual. Such a token's output row is NaN and it adds
    /// nothing to any gradient or loss.
    pub fn nonfinite_rows(&self) -> &DeviceBuffer<u32> {
        &self.scratch.nonfinite_rows
    }

    /// Iteration t's loss buffers (`[aux]`, `[z]`).
    pub fn loss_buffers(&self, iteration: usize) -> Option<(&DeviceBuffer<f32>, &DeviceBuffer<f32>)> {
        self.saved.get(iteration).map(|s| (&s.aux_loss, &s.z_loss))
    }

    /// Bytes each iteration keeps for its backward, per token: the routed pass's
    /// (`4E + 16k + k·(3h + d)·s + 3·n·h·s (+4 with the z-loss)`, s = `size_of::<T>()`) plus
    /// its input `x⁽ᵗ⁻¹⁾` (`d·s`). The first iteration's input is the caller's `x`, so the chain
    /// holds `C·this − d·s` bytes per token ([`held_bytes_per_token`](Self::held_bytes_per_token)).
    /// `Err` for a config [`MoeConfig::validate`] refuses (whose sizes could overflow).
    pub fn saved_bytes_per_token_per_iteration(config: &MoeConfig) -> Result<usize> {
        config.validate()?;
        Ok(saved_bytes_per_token(config, size_of::<T>()) + config.dim * size_of::<T>())
    }

    /// What the chain's buffers for backward actually hold per token (sized for `max_tokens`).
    pub fn held_bytes_per_token(&self) -> usize {
        let max = self.config.max_tokens;
        let saved: usize = self.saved.iter().map(|s| s.bytes_per_token(max)).sum();
        let inputs: usize = self.inputs.iter().map(|b| b.len() * size_of::<T>()).sum();
        saved + inputs / max
    }
}

impl<T: FloatElement> EagerPass<T> for ChainOfExperts<T> {
    fn trains(&self) -> bool {
        self.mode == Mode::Training
    }
    fn eager_forward(&mut self, x: &DeviceBuffer<T>, tokens: usize, y: &mut DeviceBuffer<T>) -> Result<()> {
        self.run_forward(x, tokens, y)
    }
    fn eager_backward(&mut self, x: &DeviceBuffer<T>, dy: &DeviceBuffer<T>, dx: &mut DeviceBuffer<T>) -> Result<()> {
        self.run_backward(x, dy, dx)
    }
    fn forget_zeroed_workspaces(&mut self) {
        self.scratch.forget_zeroed();
    }
}

/// Iteration `t`'s router: the first is `weights`' own.
fn router_of<'a, T: FloatElement>(
    weights: &'a LayerWeights<T>,
    later_routers: &'a [RouterWeights<T>],
    t: usize,
) -> &'a RouterWeights<T> {
    match t {
        0 => weights.router(),
        t => &later_routers[t - 1],
    }
}
