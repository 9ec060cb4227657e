//! One routed pass (math §2–§5) and its backward, shared by [`MoeLayer`](super::MoeLayer),
//! [`ChainOfExperts`](super::ChainOfExperts) and [`VqMoe`](super::VqMoe): the parameters are in
//! [`params`](super::params), the buffers in [`buffers`](super::buffers).
//!
//! Forward launches (linear or quadratic router, no shared experts, no capacity, any T): scores
//! 1, selection with the routing map's count 1, the map's placement 1, GEMM1 + SwiGLU (gathered
//! rows) 1, GEMM2 1, combine (weights and residual) 1 = **6**, and no memset (the placement
//! clears the map workspace's per-tile counts, so the next count finds it zeroed). The codebook
//! router's code norms and nearest code take the place of scores and selection, and the map is
//! `ops::dispatch::routing_map` (1 launch up to T·k = 4096, else 2); with capacity selection
//! and `routing_map` run apart too. Shared experts add 2 GEMMs (+1 combine when a residual is
//! added too); the router losses add 1 (aux and z together).
//!
//! Backward launches: combine backward 1, GEMM2 dgrad with the SwiGLU backward 1, wgrad(W2) 1,
//! GEMM1 dgrad 1, wgrad(W1) 1 (none for an empty expert mask), select backward 1 (+1 for the
//! losses), gate backward 3 for the linear gate (dX, dW, Σ dz) or `ops::gate::scores_backward`'s count
//! for a quadratic one (6 for low-rank), the sum into dx 1: **10** for the linear router. Shared
//! experts add 4 GEMMs, 1 sum and the live-row list that keeps tokens routed nowhere out of
//! their weight gradients (`ops::dispatch::live_rows`), a residual gradient (Chain-of-Experts)
//! 1 sum. The first backward of a layer's pass adds one memset: the `[E]` flags of the experts
//! whose routed weight gradients it writes (`ops::gemm::WgradWrite::Sparse`: an expert without
//! rows is neither computed nor written).
//!
//! **Non-finite rows** (math §2): a token whose logits are non-finite (the gate makes every
//! logit NaN for an input row with a NaN, an infinity or an element of at least 2^64), or, with
//! the codebook router, whose nearest distance is not finite, is routed nowhere: no expert sees
//! it, its output row is NaN, its dz row is zero so the gate's gradients skip it, and the shared
//! experts' weight gradients gather the tokens through a list where it is padding. The aux and
//! z losses average over the other tokens only. Every other token's output and every gradient
//! are then bitwise what the batch without it gives. The router counts such rows in
//! `nonfinite_rows`.
use super::buffers::{Saved, Scratch, Sizes};
use super::params::{ExpertGrads, Experts, RouterGrads, RouterWeights};
use super::workspace::{prefix, prefix_mut};
use super::{Mode, MoeConfig, RouterKind};
use crate::ops::Dyn;
use crate::ops::codebook::{self, CodebookShape, NearestConfig, NearestOutputs};
use crate::ops::dispatch::{self, CountedMap, RoutingMap, STATUS_LEN, combine, combine_backward, routing_map};
use crate::ops::gate;
use crate::ops::gemm::{self, ARows, DgradEpilogue, Epilogue, ExpertMask, ForwardConfig, Groups, WgradWrite};
use crate::ops::router::{
    self, AuxLossConfig, AuxLossTarget, AuxLossWorkspace, SelectedAuxLoss, ZLossTarget, ZLossWorkspace,
};
use crate::ops::{FloatElement, check_len};
use crate::{Device, DeviceBuffer, DeviceSlice, DeviceSliceMut, Error, Result};

/// `out = a + b` (`[tokens, d]` each) in one launch: a combine with k = 1, the identity
/// inverse (`identity`, `0..max_tokens`) and `b` as its residual (f32 sum, one rounding).
pub(crate) fn add_rows<T: FloatElement>(
    device: &Device,
    identity: &DeviceBuffer<i32>,
    (tokens, d): (usize, usize),
    a: &impl DeviceSlice<T>,
    b: &impl DeviceSlice<T>,
    out: &mut impl DeviceSliceMut<T>,
) -> Result<()> {
    let inverse = prefix("identity", identity, tokens)?;
    combine(
        device,
        a,
        &inverse,
        None::<&DeviceBuffer<f32>>,
        Some(b),
        tokens,
        1,
        d,
        out,
    )
}

/// The parameters and buffers of one pass.
pub(crate) struct Pass<'a, T: FloatElement> {
    pub(crate) device: &'a Device,
    pub(crate) config: &'a MoeConfig,
    pub(crate) router: &'a RouterWeights<T>,
    pub(crate) experts: &'a Experts<T>,
    pub(crate) scratch: &'a mut Scratch<T>,
    /// Inference: forward keeps nothing for backward and runs no loss.
    pub(crate) mode: Mode,
    /// Called with a stage's name once its launches are queued (timing in the example).
    pub(crate) stages: Option<&'a mut dyn FnMut(&'static str)>,
}

/// Where a pass's routing comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Routing {
    /// The pass's router scores and selects (and its losses run).
    Router,
    /// The caller wrote the ids and weights (VQ-MoE's discrete path: the code's expert).
    Given,
}

/// Tells the stage observer, if any, that `stage` is queued.
fn mark(stages: &mut Option<&mut dyn FnMut(&'static str)>, stage: &'static str) {
    if let Some(observer) = stages {
        observer(stage);
    }
}

impl<T: FloatElement> Pass<'_, T> {
    /// `y = Σ_j w_j FFN_{id_j}(x) [+ FFN_shared(x)] [+ residual]` for `tokens` rows of `x`,
    /// keeping in `saved` what [`backward`](Self::backward) needs. No host sync.
    pub(crate) fn forward(
        &mut self,
        saved: &mut Saved<T>,
        x: &impl DeviceSlice<T>,
        tokens: usize,
        residual: Option<&dyn DeviceSlice<T>>,
        y: &mut impl DeviceSliceMut<T>,
    ) -> Result<()> {
        self.forward_routed(saved, x, tokens, Routing::Router, residual, y)
    }

    /// [`forward`](Self::forward), with the routing either computed by the router or `Given`: the
    /// caller has written `saved.ids` and `saved.weights` (`[T, k]`) and no router loss runs.
    pub(crate) fn forward_routed(
        &mut self,
        saved: &mut Saved<T>,
        x: &impl DeviceSlice<T>,
        tokens: usize,
        routing: Routing,
        residual: Option<&dyn DeviceSlice<T>>,
        y: &mut impl DeviceSliceMut<T>,
    ) -> Result<()> {
        let (device, config) = (self.device, self.config);
        let s = Sizes::new(config, tokens)?;
        let layout = || format!("[T, d] = [{tokens}, {}]", s.d);
        check_len("x", x, s.token_rows(), layout)?;
        check_len("y", y, s.token_rows(), layout)?;
        if let Some(r) = residual {
            check_len("residual", &Dyn(r), s.token_rows(), layout)?;
        }
        saved.tokens = 0;
        let mut stages = self.stages.take();
        let gate_shape = config.gate_shape(tokens);
        let router_config = config.router_config();
        let map_config = config.map_config();
        let by_router = routing == Routing::Router && config.router != RouterKind::Codebook;
        if routing == Routing::Router && !by_router {
            self.route_by_code(saved, &s, x)?;
            mark(&mut stages, "route: nearest code");
        }
        let mut map = RoutingMap {
            counts: prefix_mut("counts", &mut saved.counts, s.experts)?,
            offsets: prefix_mut("offsets", &mut saved.offsets, s.experts + 1)?,
            sorted_rows: prefix_mut("sorted_rows", &mut saved.sorted_rows, s.rows)?,
            inverse: prefix_mut("inverse", &mut saved.inverse, s.slots)?,
            status: prefix_mut("status", &mut saved.status, STATUS_LEN)?,
        };
        // Without capacity the router's selection also counts the map (CountedMap), and
        // gate::route completes it (in the same launch at decode, else with place_counted): one
        // launch fewer than selection + routing_map, two at decode.
        let counted = by_router && map_config.capacity.is_none();
        let workspace_len = if counted {
            map_config.counted_workspace_len(s.tokens, s.k)?
        } else {
            map_config.workspace_len(s.tokens, s.k)?
        };
        let scratch = &mut *self.scratch;
        // Not known to be zeroed (a pass failed part-way, perhaps at another T with a longer
        // prefix): all of it is cleared here, once, so the count skips its memset. The flag is
        // false while the map is under way, so a pass that fails part-way leaves it false.
        if !std::mem::replace(&mut scratch.map_workspace_zeroed, false) {
            device.fill_zeros(&mut scratch.map_workspace)?;
        }
        let mut workspace = prefix_mut("map_workspace", &mut scratch.map_workspace, workspace_len)?;
        let mut target = CountedMap {
            config: &map_config,
            map: &mut map,
            workspace: &mut workspace,
            zeroed: true,
        };
        let training = self.mode == Mode::Training;
        // The router losses ride in the selection's launch: the gate's tile kernel where the
        // losses' chunks are its tiles, else the selection's own (router::select_with_losses);
        // after the one-launch decode route they take a launch of their own
        // (gate::route_with_losses).
        let wants_losses = training && (config.aux_config().is_some() || config.z_loss > 0.0);
        let mut losses_done = false;
        if by_router {
            let mut z = prefix_mut("z", &mut saved.z, s.tokens * s.experts)?;
            let mut ids = prefix_mut("ids", &mut saved.ids, s.slots)?;
            let mut weights = prefix_mut("weights", &mut saved.weights, s.slots)?;
            let bias = self.router.bias.as_ref();
            let nonfinite = &mut scratch.nonfinite_rows;
            let gate_weights = self.router.weights();
            let fused = gate::route_is_fused(&gate_shape, &gate_weights, counted);
            let buffers = LossBuffers {
                aux: &mut saved.aux,
                aux_loss: &mut saved.aux_loss,
                z_workspace: &mut saved.z_workspace,
                z_loss: &mut saved.z_loss,
            };
            let aux_config = config.aux_config();
            let (aux, z_loss) = if wants_losses {
                loss_targets(device, config, &aux_config, s.tokens, buffers)?
            } else {
                (None, None)
            };
            if counted {
                // The whole routing step: one launch at decode, where the gate's kernel places
                // the map too; the losses where the selection runs, or after the decode route.
                gate::route_with_losses(
                    device,
                    &gate_shape,
                    &gate_weights,
                    x,
                    &mut z,
                    &router_config,
                    bias,
                    &mut ids,
                    &mut weights,
                    nonfinite,
                    &mut target,
                    aux,
                    z_loss,
                )?;
                mark(&mut stages, "route: scores + top-k + routing map (+ router losses)");
                losses_done = wants_losses;
            } else if wants_losses && !fused {
                gate::scores(device, &gate_shape, &gate_weights, x, &mut z)?;
                let no_map = None::<&mut CountedMap<'_, DeviceBuffer<i32>, DeviceBuffer<i32>>>;
                router::select_with_losses(
                    device,
                    &router_config,
                    &z,
                    bias,
                    &mut ids,
                    &mut weights,
                    nonfinite,
                    no_map,
                    aux,
                    z_loss,
                )?;
                mark(&mut stages, "route: scores, then top-k + router losses");
                losses_done = true;
            } else {
                let no_map = None::<&mut CountedMap<'_, DeviceBuffer<i32>, DeviceBuffer<i32>>>;
                gate::scores_and_select(
                    device,
                    &gate_shape,
                    &gate_weights,
                    x,
                    &mut z,
                    &router_config,
                    bias,
                    &mut ids,
                    &mut weights,
                    nonfinite,
                    no_map,
                )?;
                mark(&mut stages, "route: scores + top-k");
            }
        }
        if !counted {
            let ids = prefix("ids", &saved.ids, s.slots)?;
            routing_map(device, &ids, s.tokens, s.k, &map_config, target.map, target.workspace)?;
            mark(&mut stages, "dispatch: routing map");
        }
        // Every completed map leaves a zeroed workspace zeroed.
        scratch.map_workspace_zeroed = true;

        let offsets = prefix("offsets", &saved.offsets, s.experts + 1)?;
        let sorted_rows = prefix("sorted_rows", &saved.sorted_rows, s.rows)?;
        let groups = Groups {
            offsets: &offsets,
            sorted_rows: Some(&sorted_rows),
            rows: s.rows,
            max_group_rows: s.tokens,
        };
        let no_weights = None::<&DeviceBuffer<f32>>;
        let gathered = ForwardConfig {
            a_rows: ARows::Gathered { top_k: s.k },
            epilogue: Epilogue::SwiGlu,
            ..ForwardConfig::default()
        };
        let mut h = prefix_mut("h", &mut saved.h, s.rows * s.h)?;
        let mut gu = training
            .then(|| prefix_mut("gu", &mut saved.gu, s.rows * 2 * s.h))
            .transpose()?;
        gemm::forward(
            device,
            x,
            &self.experts.w1,
            s.gemm1(),
            &groups,
            &gathered,
            no_weights,
            &mut h,
            gu.as_mut(),
        )?;
        mark(&mut stages, "GEMM1 + SwiGLU (gathered rows)");
        let h = prefix("h", &saved.h, s.rows * s.h)?;
        let mut yp = prefix_mut("yp", &mut saved.yp, s.rows * s.d)?;
        let plain = ForwardConfig::default();
        let no_gu = None::<&mut DeviceBuffer<T>>;
        gemm::forward(
            device,
            &h,
            &self.experts.w2,
            s.gemm2(),
            &groups,
            &plain,
            no_weights,
            &mut yp,
            no_gu,
        )?;
        mark(&mut stages, "GEMM2");
        let shared = self.shared_forward(saved, &s, x)?;
        if shared {
            mark(&mut stages, "shared experts");
        }
        // The combine's residual: the caller's, the shared FFN's output, or their sum.
        let scratch = &mut *self.scratch;
        if let (true, Some(r)) = (shared, residual) {
            let shared_y = prefix("shared_y", &scratch.shared_y, s.token_rows())?;
            let mut sum = prefix_mut("sum_a", &mut scratch.sum_a, s.token_rows())?;
            add_rows(device, &scratch.identity, (s.tokens, s.d), &shared_y, &Dyn(r), &mut sum)?;
        }
        let shared_y = if shared {
            Some(prefix("shared_y", &scratch.shared_y, s.token_rows())?)
        } else {
            None
        };
        let sum = prefix("sum_a", &scratch.sum_a, s.token_rows())?;
        let residual: Option<Dyn<'_, T>> = match (&shared_y, residual) {
            (None, r) => r.map(Dyn),
            (Some(shared_y), None) => Some(Dyn(shared_y)),
            (Some(_), Some(_)) => Some(Dyn(&sum)),
        };
        let yp = prefix("yp", &saved.yp, s.rows * s.d)?;
        let inverse = prefix("inverse", &saved.inverse, s.slots)?;
        let weights = prefix("weights", &saved.weights, s.slots)?;
        combine(
            device,
            &yp,
            &inverse,
            Some(&weights),
            residual.as_ref(),
            s.tokens,
            s.k,
            s.d,
            y,
        )?;
        mark(&mut stages, "combine");
        if training && routing == Routing::Router && !losses_done && self.losses(saved, &s)? {
            mark(&mut stages, "router losses");
        }
        saved.tokens = tokens;
        Ok(())
    }

    /// Codebook routing (math §6): each token's nearest code (Nc = E, so the code is the expert)
    /// into `saved.ids`, weight 1 into `saved.weights`; a row whose distance is not finite is
    /// routed nowhere (weight NaN) and counted in `scratch.nonfinite_rows`. 2 launches.
    fn route_by_code(&mut self, saved: &mut Saved<T>, s: &Sizes, x: &impl DeviceSlice<T>) -> Result<()> {
        let codes = self.router.codebook().expect("a codebook router holds its codes");
        let shape = CodebookShape {
            tokens: s.tokens,
            dim: s.d,
            codes: s.experts,
        };
        let scratch = &mut *self.scratch;
        codebook::code_norms(self.device, &shape, codes, &mut scratch.code_norms)?;
        let nearest = NearestConfig {
            k: 1,
            num_experts: s.experts,
            splits: Some(1),
        };
        let mut ids = prefix_mut("ids", &mut saved.ids, s.slots)?;
        let mut weights = prefix_mut("weights", &mut saved.weights, s.slots)?;
        let out = NearestOutputs {
            ids: &mut ids,
            distances: None,
            experts: None,
            weights: Some(&mut weights),
            nonfinite_rows: Some(&mut scratch.nonfinite_rows),
        };
        let (norms, workspace) = (&scratch.code_norms, &mut scratch.nearest_workspace);
        codebook::nearest(self.device, &shape, &nearest, x, codes, norms, out, workspace)
    }

    /// The shared FFN on every token (two GEMMs over one group of T rows) into
    /// `scratch.shared_y`, keeping its GU and H; `false` without shared experts.
    fn shared_forward(&mut self, saved: &mut Saved<T>, s: &Sizes, x: &impl DeviceSlice<T>) -> Result<bool> {
        let (Some((w1, w2)), true) = (&self.experts.shared, s.hs > 0) else {
            return Ok(false);
        };
        let device = self.device;
        let offsets = &self.scratch.shared_offsets;
        let groups = Groups::<DeviceBuffer<i32>> {
            offsets,
            sorted_rows: None,
            rows: s.tokens,
            max_group_rows: s.tokens,
        };
        let swiglu = ForwardConfig {
            epilogue: Epilogue::SwiGlu,
            ..ForwardConfig::default()
        };
        let no_weights = None::<&DeviceBuffer<f32>>;
        let mut h = prefix_mut("shared_h", &mut saved.shared_h, s.tokens * s.hs)?;
        let mut gu = (self.mode == Mode::Training)
            .then(|| prefix_mut("shared_gu", &mut saved.shared_gu, s.tokens * 2 * s.hs))
            .transpose()?;
        gemm::forward(
            device,
            x,
            w1,
            s.shared1(),
            &groups,
            &swiglu,
            no_weights,
            &mut h,
            gu.as_mut(),
        )?;
        let h = prefix("shared_h", &saved.shared_h, s.tokens * s.hs)?;
        let mut y = prefix_mut("shared_y", &mut self.scratch.shared_y, s.token_rows())?;
        let plain = ForwardConfig::default();
        let no_gu = None::<&mut DeviceBuffer<T>>;
        gemm::forward(device, &h, w2, s.shared2(), &groups, &plain, no_weights, &mut y, no_gu)?;
        Ok(true)
    }

    /// The aux loss and the z-loss, each when its coefficient is set, in one launch
    /// (`router::losses`); whether any ran.
    fn losses(&mut self, saved: &mut Saved<T>, s: &Sizes) -> Result<bool> {
        let (device, config) = (self.device, self.config);
        let router_config = config.router_config();
        let z = prefix("z", &saved.z, s.tokens * s.experts)?;
        let ids = prefix("ids", &saved.ids, s.slots)?;
        let aux_config = config.aux_config();
        let buffers = LossBuffers {
            aux: &mut saved.aux,
            aux_loss: &mut saved.aux_loss,
            z_workspace: &mut saved.z_workspace,
            z_loss: &mut saved.z_loss,
        };
        let (aux, z_loss) = loss_targets(device, config, &aux_config, s.tokens, buffers)?;
        let aux = aux.map(|a| AuxLossTarget {
            config: a.config,
            ids: &ids,
            workspace: a.workspace,
            loss: a.loss,
        });
        let any = aux.is_some() || z_loss.is_some();
        router::losses(device, &router_config, &z, aux, z_loss)?;
        Ok(any)
    }
}

/// The buffers of `Saved` the router losses write (fields borrowed apart from z and the ids).
struct LossBuffers<'a> {
    aux: &'a mut Option<(usize, AuxLossWorkspace)>,
    aux_loss: &'a mut DeviceBuffer<f32>,
    z_workspace: &'a mut ZLossWorkspace,
    z_loss: &'a mut DeviceBuffer<f32>,
}

/// The losses' targets (the aux loss's without its ids, which are the selection's), each when
/// its coefficient is set; the aux loss's workspace is rebuilt when T changed.
#[allow(clippy::type_complexity)]
fn loss_targets<'a>(
    device: &Device,
    config: &MoeConfig,
    aux_config: &'a Option<AuxLossConfig>,
    tokens: usize,
    buffers: LossBuffers<'a>,
) -> Result<(
    Option<SelectedAuxLoss<'a, DeviceBuffer<f32>>>,
    Option<ZLossTarget<'a, DeviceBuffer<f32>>>,
)> {
    let LossBuffers {
        aux,
        aux_loss,
        z_workspace,
        z_loss,
    } = buffers;
    if let Some(aux_config) = aux_config {
        if aux.as_ref().is_none_or(|(t, _)| *t != tokens) {
            let workspace = AuxLossWorkspace::new(device, &config.router_config(), aux_config, tokens)?;
            *aux = Some((tokens, workspace));
        }
    }
    let aux = match (aux_config, aux.as_mut()) {
        (Some(config), Some((_, workspace))) => Some(SelectedAuxLoss {
            config,
            workspace,
            loss: aux_loss,
        }),
        _ => None,
    };
    let z_loss = (config.z_loss > 0.0).then_some(ZLossTarget {
        coefficient: config.z_loss,
        workspace: z_workspace,
        loss: z_loss,
    });
    Ok((aux, z_loss))
}

/// What a backward writes besides dx.
pub(crate) struct Gradients<'a> {
    /// `None`: the routing was given (no router to differentiate).
    pub(crate) router: Option<&'a mut RouterGrads>,
    pub(crate) experts: &'a mut ExpertGrads,
    /// Weight gradients only for these experts (ESFT); `None`: all.
    pub(crate) mask: Option<&'a ExpertMask>,
    /// Which backward of the layer's pass this is, from 0: the first clears
    /// `experts.written` and replaces the shared experts' gradients; later ones (Chain-of-Experts
    /// iterations, VQ-MoE's second path) add to the gradients the pass already wrote.
    pub(crate) call: u32,
}

impl<T: FloatElement> Pass<'_, T> {
    /// Backward of [`forward`](Self::forward) with the same `x`: `dx` from `dy` (plus `dy` itself
    /// when the forward added `x` as its residual), the router's gradients (overwritten) and the
    /// expert gradients. The losses' gradients (coefficient 1 in the total loss) enter dz. No host sync.
    pub(crate) fn backward(
        &mut self,
        saved: &Saved<T>,
        x: &impl DeviceSlice<T>,
        dy: &impl DeviceSlice<T>,
        residual_grad: bool,
        dx: &mut impl DeviceSliceMut<T>,
        grads: Gradients<'_>,
    ) -> Result<()> {
        let (device, config) = (self.device, self.config);
        self.mode.require_training("backward")?;
        if saved.tokens == 0 {
            return Err(Error::InvalidArgument {
                argument: "backward",
                value: "no forward".into(),
                expected: "a forward before each backward".into(),
            });
        }
        let s = Sizes::new(config, saved.tokens)?;
        let layout = || format!("[T, d] = [{}, {}] (T of the last forward)", s.tokens, s.d);
        check_len("x", x, s.token_rows(), layout)?;
        check_len("dy", dy, s.token_rows(), layout)?;
        check_len("dx", dx, s.token_rows(), layout)?;
        let mut stages = self.stages.take();
        let scratch = &mut *self.scratch;
        let offsets = prefix("offsets", &saved.offsets, s.experts + 1)?;
        let sorted_rows = prefix("sorted_rows", &saved.sorted_rows, s.rows)?;
        let inverse = prefix("inverse", &saved.inverse, s.slots)?;
        let weights = prefix("weights", &saved.weights, s.slots)?;
        let groups = Groups {
            offsets: &offsets,
            sorted_rows: Some(&sorted_rows),
            rows: s.rows,
            max_group_rows: s.tokens,
        };
        let no_weights = None::<&DeviceBuffer<f32>>;
        let no_gu = None::<&DeviceBuffer<T>>;

        // Combine backward: dYp = w · dy per row, dw = <dy, Yp>.
        let yp = prefix("yp", &saved.yp, s.rows * s.d)?;
        let mut dyp = prefix_mut("dyp", &mut scratch.dyp, s.rows * s.d)?;
        let mut dw = prefix_mut("dw", &mut scratch.dw, s.slots)?;
        combine_backward(
            device,
            dy,
            Some(&yp),
            &sorted_rows,
            &inverse,
            Some(&weights),
            s.tokens,
            s.k,
            s.d,
            &mut dyp,
            Some(&mut dw),
        )?;
        mark(&mut stages, "combine backward");
        // GEMM2: dGU through the fused SwiGLU backward, and dW2 = dYp^T H.
        let dyp = prefix("dyp", &scratch.dyp, s.rows * s.d)?;
        let gu = prefix("gu", &saved.gu, s.rows * 2 * s.h)?;
        let mut dgu = prefix_mut("dgu", &mut scratch.dgu, s.rows * 2 * s.h)?;
        let swiglu_bwd = DgradEpilogue::SwiGluBackward;
        gemm::dgrad(
            device,
            &dyp,
            &self.experts.w2,
            s.gemm2(),
            &groups,
            swiglu_bwd,
            no_weights,
            Some(&gu),
            &mut dgu,
        )?;
        let h = prefix("h", &saved.h, s.rows * s.h)?;
        let (mask, call) = (grads.mask, grads.call);
        if call == 0 {
            device.fill_zeros(&mut grads.experts.written)?;
        }
        let contiguous = ARows::Contiguous;
        gemm::wgrad(
            device,
            &dyp,
            &h,
            contiguous,
            s.gemm2(),
            &groups,
            mask,
            WgradWrite::Sparse {
                written: &mut grads.experts.written,
                call,
            },
            &mut grads.experts.w2,
        )?;
        mark(&mut stages, "GEMM2 backward (dgrad + SwiGLU backward, wgrad)");
        // GEMM1: dXp = dGU W1, and dW1 = dGU^T X (X gathered through sorted_rows).
        let dgu = prefix("dgu", &scratch.dgu, s.rows * 2 * s.h)?;
        let mut dxp = prefix_mut("dxp", &mut scratch.dxp, s.rows * s.d)?;
        let store = DgradEpilogue::Store;
        gemm::dgrad(
            device,
            &dgu,
            &self.experts.w1,
            s.gemm1(),
            &groups,
            store,
            no_weights,
            no_gu,
            &mut dxp,
        )?;
        let gathered = ARows::Gathered { top_k: s.k };
        gemm::wgrad(
            device,
            &dgu,
            x,
            gathered,
            s.gemm1(),
            &groups,
            mask,
            WgradWrite::Sparse {
                written: &mut grads.experts.written,
                call,
            },
            &mut grads.experts.w1,
        )?;

        mark(&mut stages, "GEMM1 backward (dgrad, wgrad)");
        // Router: dz from the combine weights' gradient and the losses, then the gate.
        // A code-routed pass has no router gradient: its weights are 1 and the code is discrete.
        let routed = grads.router.is_some() && config.router != RouterKind::Codebook;
        if let (Some(router_grads), true) = (grads.router, routed) {
            self.router_backward(saved, &s, x, router_grads)?;
            mark(&mut stages, "router backward (top-k, losses, gate)");
        }
        let shared = self.shared_backward(saved, &s, x, dy, grads.experts, call > 0)?;
        if shared {
            mark(&mut stages, "shared experts backward");
        }
        // dx = Σ_j dXp[inverse] + dx_gate [+ dx_shared] [+ dy], in that order (fixed).
        let scratch = &mut *self.scratch;
        let dxp = prefix("dxp", &scratch.dxp, s.rows * s.d)?;
        let dx_gate = if routed {
            Some(prefix("dx_gate", &scratch.dx_gate, s.token_rows())?)
        } else {
            None
        };
        let mut extra: Vec<&dyn DeviceSlice<T>> = vec![];
        let shared_dx = if shared {
            Some(prefix("shared_dx", &scratch.shared_dx, s.token_rows())?)
        } else {
            None
        };
        if let Some(shared_dx) = &shared_dx {
            extra.push(shared_dx);
        }
        if residual_grad {
            extra.push(dy);
        }
        let Some((last, middle)) = extra.split_last() else {
            combine(
                device,
                &dxp,
                &inverse,
                no_weights,
                dx_gate.as_ref(),
                s.tokens,
                s.k,
                s.d,
                dx,
            )?;
            mark(&mut stages, "sum into dx");
            return Ok(());
        };
        let mut sum_a = prefix_mut("sum_a", &mut scratch.sum_a, s.token_rows())?;
        combine(
            device,
            &dxp,
            &inverse,
            no_weights,
            dx_gate.as_ref(),
            s.tokens,
            s.k,
            s.d,
            &mut sum_a,
        )?;
        let mut partial = &mut scratch.sum_a;
        let mut spare = &mut scratch.sum_b;
        for term in middle {
            let current = prefix("partial", partial, s.token_rows())?;
            let mut next = prefix_mut("partial", spare, s.token_rows())?;
            add_rows(
                device,
                &scratch.identity,
                (s.tokens, s.d),
                &Dyn(*term),
                &current,
                &mut next,
            )?;
            std::mem::swap(&mut partial, &mut spare);
        }
        let current = prefix("partial", partial, s.token_rows())?;
        add_rows(device, &scratch.identity, (s.tokens, s.d), &Dyn(*last), &current, dx)?;
        mark(&mut stages, "sum into dx");
        Ok(())
    }

    /// dz from the combine weights' gradient (in `scratch.dw`) and the router losses, then the
    /// gate's backward: `scratch.dx_gate` and the gate gradients.
    fn router_backward(
        &mut self,
        saved: &Saved<T>,
        s: &Sizes,
        x: &impl DeviceSlice<T>,
        router_grads: &mut RouterGrads,
    ) -> Result<()> {
        let (device, config) = (self.device, self.config);
        let scratch = &mut *self.scratch;
        let router_config = config.router_config();
        let z = prefix("z", &saved.z, s.tokens * s.experts)?;
        let ids = prefix("ids", &saved.ids, s.slots)?;
        let dw = prefix("dw", &scratch.dw, s.slots)?;
        let mut dz = prefix_mut("dz", &mut scratch.dz, s.tokens * s.experts)?;
        router::select_backward(device, &router_config, &z, &ids, &dw, &mut dz)?;
        let aux_config = config.aux_config();
        let aux = match (&aux_config, &saved.aux) {
            (Some(aux), Some((_, workspace))) => Some((aux, workspace)),
            _ => None,
        };
        let z_loss = (config.z_loss > 0.0).then_some((config.z_loss, &saved.z_workspace));
        // Both losses' gradients in one launch (none without a loss).
        router::losses_backward(device, &router_config, &z, aux, z_loss, &mut dz)?;
        let dz = prefix("dz", &scratch.dz, s.tokens * s.experts)?;
        let gate_shape = config.gate_shape(s.tokens);
        let workspace_len = gate::backward_workspace_len(config.gate_form(), &gate_shape)?;
        let mut workspace = prefix_mut("gate_workspace", &mut scratch.gate_workspace, workspace_len)?;
        let mut dx_gate = prefix_mut("dx_gate", &mut scratch.dx_gate, s.token_rows())?;
        let weights = self.router.weights();
        let gate_grads = router_grads.as_gate_grads();
        gate::scores_backward(
            device,
            &gate_shape,
            &weights,
            x,
            &dz,
            &mut dx_gate,
            gate_grads,
            &mut workspace,
        )?;

        Ok(())
    }

    /// The shared FFN's backward: dGU, dW2s, dX_shared (into `scratch.shared_dx`), dW1s; `false`
    /// without shared experts.
    fn shared_backward(
        &mut self,
        saved: &Saved<T>,
        s: &Sizes,
        x: &impl DeviceSlice<T>,
        dy: &impl DeviceSlice<T>,
        grads: &mut ExpertGrads,
        accumulate: bool,
    ) -> Result<bool> {
        let (Some((w1, w2)), Some(dw1), Some(dw2), true) = (
            &self.experts.shared,
            grads.shared_w1.as_mut(),
            grads.shared_w2.as_mut(),
            s.hs > 0,
        ) else {
            return Ok(false);
        };
        let device = self.device;
        let scratch = &mut *self.scratch;
        // A token routed nowhere (a non-finite row) must add nothing to dW1s and dW2s: the
        // weight gradients gather the tokens through a list where it is padding.
        let ids = prefix("ids", &saved.ids, s.slots)?;
        let mut live = prefix_mut("shared_live_rows", &mut scratch.shared_live_rows, s.tokens)?;
        dispatch::live_rows(device, &ids, s.tokens, s.k, &mut live)?;
        let live = prefix("shared_live_rows", &scratch.shared_live_rows, s.tokens)?;
        let groups = Groups::<DeviceBuffer<i32>> {
            offsets: &scratch.shared_offsets,
            sorted_rows: None,
            rows: s.tokens,
            max_group_rows: s.tokens,
        };
        let offsets = prefix("shared_offsets", &scratch.shared_offsets, 2)?;
        let live_groups = Groups {
            offsets: &offsets,
            sorted_rows: Some(&live),
            rows: s.tokens,
            max_group_rows: s.tokens,
        };
        let no_weights = None::<&DeviceBuffer<f32>>;
        let no_gu = None::<&DeviceBuffer<T>>;
        let gathered = ARows::Gathered { top_k: 1 };
        let no_mask = None::<&ExpertMask>;
        let gu = prefix("shared_gu", &saved.shared_gu, s.tokens * 2 * s.hs)?;
        let mut dgu = prefix_mut("shared_dgu", &mut scratch.shared_dgu, s.tokens * 2 * s.hs)?;
        let swiglu_bwd = DgradEpilogue::SwiGluBackward;
        gemm::dgrad(
            device,
            dy,
            w2,
            s.shared2(),
            &groups,
            swiglu_bwd,
            no_weights,
            Some(&gu),
            &mut dgu,
        )?;
        let h = prefix("shared_h", &saved.shared_h, s.tokens * s.hs)?;
        gemm::wgrad(
            device,
            dy,
            &h,
            gathered,
            s.shared2(),
            &live_groups,
            no_mask,
            WgradWrite::dense(accumulate),
            dw2,
        )?;
        let dgu = prefix("shared_dgu", &scratch.shared_dgu, s.tokens * 2 * s.hs)?;
        let mut dx = prefix_mut("shared_dx", &mut scratch.shared_dx, s.token_rows())?;
        let store = DgradEpilogue::Store;
        gemm::dgrad(
            device,
            &dgu,
            w1,
            s.shared1(),
            &groups,
            store,
            no_weights,
            no_gu,
            &mut dx,
        )?;
        gemm::wgrad(
            device,
            &dgu,
            x,
            gathered,
            s.shared1(),
            &live_groups,
            no_mask,
            WgradWrite::dense(accumulate),
            dw1,
        )?;
        Ok(true)
    }
}
