//! Expert statistics, load-balance losses and the bias update (math §3), all device-side:
//! loss values land in a one-element device buffer, nothing waits for the device.
//!
//! Float reductions over tokens run in a fixed order (no float atomics): the same inputs give
//! the same bits every run. Counts are exact integers (integer atomics, whose order does not
//! matter).
use super::{RouterConfig, Selection, invalid, row_launch, select_row_width, selection_len};
use crate::device::{KernelArgs, LaunchConfig};
use crate::ops::dispatch::{CountedMap, MapParams};
use crate::ops::{check_len, check_range, elements, grid_blocks};
use crate::{Device, DeviceBuffer, DeviceSlice, DeviceSliceMut, Error, Result};

/// Experts per block of the per-expert reduction kernels (one per lane); 8 warps a block.
const EXPERTS_PER_BLOCK: usize = 32;
const SLICE_THREADS: u32 = 256;
/// One block of the loss-value kernels.
const LOSS_THREADS: u32 = 256;
/// Threads per block of router_sum_chunks_f32 (one per expert).
const SUM_THREADS: u32 = 256;
/// CUDA's limit on grid.y (segments of the per-expert reductions).
const MAX_SEGMENTS: usize = 65535;

/// Tokens per block of the per-expert reductions: enough blocks to fill a GPU, at most
/// `MAX_CHUNKS` per segment (a second level adds the chunks' partial sums in order: one by one
/// for the statistics, in groups of 32 and then the groups for the losses).
const MIN_TOKENS_PER_CHUNK: usize = 64;
const MAX_CHUNKS: usize = 1024;

/// (chunks, tokens per chunk) of a segment of `tokens`: at least one chunk.
fn chunking(tokens: usize) -> (usize, usize) {
    let per_chunk = MIN_TOKENS_PER_CHUNK.max(tokens.div_ceil(MAX_CHUNKS));
    (tokens.div_ceil(per_chunk).max(1), per_chunk)
}

/// `[segments, chunks, E]` per-expert reductions: blocks of 32 experts by segments by chunks.
fn slice_launch(experts: usize, segments: usize, chunks: usize) -> LaunchConfig {
    LaunchConfig {
        grid: (
            experts.div_ceil(EXPERTS_PER_BLOCK) as u32,
            segments as u32,
            chunks as u32,
        ),
        block: (SLICE_THREADS, 1, 1),
        shared_bytes: 0,
    }
}

/// T of the `[T, k]` ids.
fn tokens_of_ids(config: &RouterConfig, ids: &impl DeviceSlice<i32>) -> Result<usize> {
    if ids.len() % config.k != 0 {
        return Err(Error::Shape {
            argument: "ids",
            expected: format!("[T, k] with k = {} (a multiple of {} i32 elements)", config.k, config.k),
            got: format!("{} elements", ids.len()),
        });
    }
    Ok(ids.len() / config.k)
}

/// Counts (zeroed here, then added per chunk) and, with weights, per-chunk weight sums
/// (`[segments, chunks, E]`) per (segment, expert); the `[T, k]` ids split into `segments` equal
/// segments.
fn launch_statistics<W: DeviceSlice<f32>, S: DeviceSliceMut<f32>>(
    device: &Device,
    config: &RouterConfig,
    (ids, weights): (&impl DeviceSlice<i32>, Option<&W>),
    segments: usize,
    counts: &mut impl DeviceSliceMut<i32>,
    weight_partials: Option<&mut S>,
) -> Result<()> {
    let tokens_per_segment = ids.len() / config.k / segments;
    let (chunks, tokens_per_chunk) = chunking(tokens_per_segment);
    device.fill_zeros(counts)?;
    // Matches the kernel's parameters, in order: router_expert_statistics_f32(ids, weights,
    // tokens_per_segment, tokens_per_chunk, k, E, counts, weight_partials).
    let args = KernelArgs::new(device)
        .input("ids", ids)
        .input_or_null("weights", weights)
        .scalar(tokens_per_segment as i64)
        .scalar(tokens_per_chunk as i64)
        .scalar(config.k as i32)
        .scalar(config.experts as i32)
        .output("counts", counts)
        .output_or_null("workspace", weight_partials);
    let grid = slice_launch(config.experts, segments, chunks);
    device.launch("router_expert_statistics_f32", grid, args)
}

/// Per-expert token counts `counts[e]` (`[E]`, exact) from `[T, k]` ids (ids outside `[0, E)`
/// count nowhere). A stream-ordered memset of `counts`, then one launch; no host sync.
pub fn expert_counts(
    device: &Device,
    config: &RouterConfig,
    ids: &impl DeviceSlice<i32>,
    counts: &mut impl DeviceSliceMut<i32>,
) -> Result<()> {
    config.validate()?;
    tokens_of_ids(config, ids)?;
    let e = config.experts;
    check_len("counts", counts, e, || format!("[E] = [{e}]"))?;
    launch_statistics::<DeviceBuffer<f32>, DeviceBuffer<f32>>(device, config, (ids, None), 1, counts, None)
}

/// Elements of the f32 workspace [`expert_statistics`] needs for `[T, k]` ids of `tokens` tokens:
/// one partial weight sum per expert and chunk of tokens.
pub fn expert_statistics_workspace_len(config: &RouterConfig, tokens: usize) -> Result<usize> {
    elements("tokens", chunking(tokens).0, config.experts)
}

/// Per-expert token counts (`[E]`, exact) and gate-weight sums `sum_t w_{t,e}` (`[E]`, f32, two
/// fixed-order levels: per chunk of tokens, then the chunks in order) from the `[T, k]` ids and
/// weights of [`select`](super::select). These feed the bias update and ESFT. A stream-ordered
/// memset of `counts`, then two launches; no host sync.
pub fn expert_statistics(
    device: &Device,
    config: &RouterConfig,
    ids: &impl DeviceSlice<i32>,
    weights: &impl DeviceSlice<f32>,
    workspace: &mut impl DeviceSliceMut<f32>,
    counts: &mut impl DeviceSliceMut<i32>,
    weight_sums: &mut impl DeviceSliceMut<f32>,
) -> Result<()> {
    config.validate()?;
    let tokens = tokens_of_ids(config, ids)?;
    let (e, k) = (config.experts, config.k);
    check_len("weights", weights, ids.len(), || format!("[T, k] = [{tokens}, {k}]"))?;
    let chunks = chunking(tokens).0;
    let partials = expert_statistics_workspace_len(config, tokens)?;
    check_len("workspace", workspace, partials, || {
        format!("[chunks, E] = [{chunks}, {e}]")
    })?;
    check_len("counts", counts, e, || format!("[E] = [{e}]"))?;
    check_len("weight_sums", weight_sums, e, || format!("[E] = [{e}]"))?;
    launch_statistics(device, config, (ids, Some(weights)), 1, counts, Some(&mut *workspace))?;
    // Matches the kernel's parameters, in order: router_sum_chunks_f32(partials, chunks, E, out).
    let args = KernelArgs::new(device)
        .input("workspace", &*workspace)
        .scalar(chunks as i32)
        .scalar(e as i32)
        .output("weight_sums", weight_sums);
    let grid = grid_blocks("experts", e, SUM_THREADS as usize)?;
    device.launch(
        "router_sum_chunks_f32",
        LaunchConfig::linear(grid, SUM_THREADS, 0),
        args,
    )
}

/// The Switch load-balancing loss (math §3): `L = alpha * E/k * sum_i f_i P_i`, with
/// `f_i = (1/T) sum_t 1[i in K_t]` and `P_i = (1/T) sum_t softmax(z_t)_i`; it equals `alpha`
/// when routing is perfectly balanced.
///
/// **Hugging Face convention.** Mixtral / Qwen-MoE's `load_balancing_loss_func` computes
/// `E * sum_i f_i P_i` with the same f (no 1/k), i.e. k times this loss: to reproduce a setup
/// with coefficient `alpha_hf`, pass `alpha = k * alpha_hf`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AuxLossConfig {
    /// The loss coefficient (typically 1e-2 .. 1e-3).
    pub alpha: f32,
    /// `None`: token level (f and P over the whole batch). `Some(L)`: sequence level (DeepSeek,
    /// CoE): the batch is `T / L` consecutive sequences of `L` tokens each (L must divide T);
    /// f and P are taken per sequence and the loss is averaged over sequences.
    pub sequence_length: Option<usize>,
}

impl Default for AuxLossConfig {
    fn default() -> Self {
        Self {
            alpha: 1e-2,
            sequence_length: None,
        }
    }
}

impl AuxLossConfig {
    /// Checks the fields for a batch of `tokens`; the error names the offending one.
    pub fn validate(&self, tokens: usize) -> Result<()> {
        if !self.alpha.is_finite() {
            return Err(invalid("alpha", self.alpha, "a finite number"));
        }
        if let Some(len) = self.sequence_length {
            check_range("sequence_length", len, 1..=usize::MAX)?;
            if tokens % len != 0 || tokens / len > MAX_SEGMENTS {
                return Err(invalid(
                    "sequence_length",
                    len,
                    format!("a divisor of T = {tokens} giving at most {MAX_SEGMENTS} sequences"),
                ));
            }
        }
        Ok(())
    }

    /// (segments, tokens per segment) of a batch: one segment of T tokens at token level (and
    /// for an empty batch, so that every launch has a grid).
    fn segments(&self, tokens: usize) -> (usize, usize) {
        match self.sequence_length {
            Some(len) if tokens > 0 => (tokens / len, len),
            _ => (1, tokens),
        }
    }

    /// `alpha E / (k S)`: a segment's `dL/dp_{t,i}` is it times `c_{s,i} / live_s^2`, with
    /// `live_s` the segment's tokens not routed nowhere (counted on the device).
    fn scale(&self, router: &RouterConfig, tokens: usize) -> f64 {
        let (segments, _) = self.segments(tokens);
        self.alpha as f64 * router.experts as f64 / (router.k as f64 * segments as f64)
    }
}

/// Per-chunk partial results of one [`losses`] launch, which it adds in three levels (groups of
/// 32 chunks, then each segment's groups, then the segments, each in order): the rows with a
/// finite log-sum-exp and the sum of their squared LSEs `[S, chunks]`, the groups' and the
/// segments' arrival tickets (one slot a chunk: a group's first, a segment's last) and the
/// grid's (all zero between launches: each level's last block resets its own).
struct ChunkPartials {
    live: DeviceBuffer<i32>,
    lse_squares: DeviceBuffer<f32>,
    group_tickets: DeviceBuffer<i32>,
    ticket: DeviceBuffer<i32>,
}

impl ChunkPartials {
    fn new(device: &Device, chunks: usize) -> Result<Self> {
        Ok(Self {
            live: device.alloc_zeros(chunks)?,
            lse_squares: device.alloc_zeros(chunks)?,
            group_tickets: device.alloc_zeros(chunks)?,
            ticket: device.alloc_zeros(1)?,
        })
    }
}

/// What [`aux_loss`] keeps for [`aux_loss_backward`]: per-row log-sum-exp `[T]`, per-sequence
/// counts `[S, E]` and the tokens routed somewhere per sequence `[S]`; and the per-chunk partials
/// its launch adds up (counts and probability sums `[S, chunks, E]`; the rows with a finite LSE
/// and the sum of their squares `[S, chunks]`) with the launch's ticket.
pub struct AuxLossWorkspace {
    row_lse: DeviceBuffer<f32>,
    counts: DeviceBuffer<i32>,
    live_rows: DeviceBuffer<i32>,
    chunk_counts: DeviceBuffer<i32>,
    prob_sums: DeviceBuffer<f32>,
    partials: ChunkPartials,
    tokens: usize,
    experts: usize,
    segments: usize,
}

impl AuxLossWorkspace {
    /// Buffers for a batch of `tokens` under `router` and `aux` (both validated).
    pub fn new(device: &Device, router: &RouterConfig, aux: &AuxLossConfig, tokens: usize) -> Result<Self> {
        router.validate()?;
        aux.validate(tokens)?;
        let (segments, len) = aux.segments(tokens);
        let per_segment = elements("tokens", segments, router.experts)?;
        let chunks = elements("tokens", segments, chunking(len).0)?;
        let per_chunk = elements("tokens", chunks, router.experts)?;
        Ok(Self {
            row_lse: device.alloc_zeros(tokens)?,
            counts: device.alloc_zeros(per_segment)?,
            live_rows: device.alloc_zeros(segments)?,
            chunk_counts: device.alloc_zeros(per_chunk)?,
            prob_sums: device.alloc_zeros(per_chunk)?,
            partials: ChunkPartials::new(device, chunks)?,
            tokens,
            experts: router.experts,
            segments,
        })
    }

    /// The per-row log-sum-exp of the last [`aux_loss`] (`[T]`; NaN for a non-finite row).
    pub fn row_lse(&self) -> &DeviceBuffer<f32> {
        &self.row_lse
    }

    /// The per-(sequence, expert) token counts of the last [`aux_loss`] (`[S, E]`).
    pub fn counts(&self) -> &DeviceBuffer<i32> {
        &self.counts
    }

    /// The tokens of each sequence that the last [`aux_loss`] averaged over (`[S]`): those not
    /// routed nowhere (a non-finite row of logits adds to no count and no mean).
    pub fn live_rows(&self) -> &DeviceBuffer<i32> {
        &self.live_rows
    }

    fn check(&self, router: &RouterConfig, aux: &AuxLossConfig, tokens: usize) -> Result<()> {
        if (self.tokens, self.experts, self.segments) != (tokens, router.experts, aux.segments(tokens).0) {
            return Err(Error::Shape {
                argument: "workspace",
                expected: format!(
                    "a workspace for T = {tokens}, E = {}, {:?}",
                    router.experts, aux.sequence_length
                ),
                got: format!("T = {}, E = {}, {} segments", self.tokens, self.experts, self.segments),
            });
        }
        Ok(())
    }
}

/// Validates the router, the aux config and the logits / ids shapes; returns T.
fn check_aux_inputs(
    router: &RouterConfig,
    aux: &AuxLossConfig,
    logits: &impl DeviceSlice<f32>,
    ids: Option<&impl DeviceSlice<i32>>,
) -> Result<usize> {
    router.validate()?;
    let tokens = router.tokens(logits)?;
    aux.validate(tokens)?;
    if let Some(ids) = ids {
        let k = router.k;
        check_len("ids", ids, selection_len(router, tokens)?, || {
            format!("[T, k] = [{tokens}, {k}]")
        })?;
    }
    Ok(tokens)
}

/// The aux loss of one [`losses`] launch: its config, the `[T, k]` ids selected from the logits,
/// the workspace [`aux_loss_backward`] reads, and the `[1]` buffer the loss lands in.
pub struct AuxLossTarget<'a, I, L> {
    pub config: &'a AuxLossConfig,
    pub ids: &'a I,
    pub workspace: &'a mut AuxLossWorkspace,
    pub loss: &'a mut L,
}

/// The z-loss of one [`losses`] launch: its coefficient, the workspace [`z_loss_backward`]
/// reads, and the `[1]` buffer the loss lands in.
pub struct ZLossTarget<'a, L> {
    pub coefficient: f32,
    pub workspace: &'a mut ZLossWorkspace,
    pub loss: &'a mut L,
}

/// The aux loss, the z-loss or both of `logits` `[T, E]` in **one launch** (`router_losses_f32`):
/// each row's log-sum-exp is taken once for both, the counts come from the ids in the same pass,
/// the last block of each group of 32 chunks adds the group's partials, and the launch's last
/// block adds the groups' sums (each level in a fixed order) and writes the losses. Each
/// target's workspace is filled for its backward. With neither target it launches nothing. No
/// host sync. A launch that fails part-way (on the emulator, a sanitizer or race report) may
/// leave a workspace's tickets (its groups' or the grid's) counted: make new workspaces after
/// such an error.
///
/// Results: [`aux_loss`]'s and [`z_loss`]'s definitions; a non-finite row of logits adds to no
/// count, no mean and no sum. Each loss has the bits of its call alone, except the z-loss beside a
/// sequence-level aux loss: the launch then splits the rows into chunks per sequence, so the
/// z-loss's sum takes another (still fixed) order.
pub fn losses<I, LA, LZ>(
    device: &Device,
    router: &RouterConfig,
    logits: &impl DeviceSlice<f32>,
    aux: Option<AuxLossTarget<'_, I, LA>>,
    z: Option<ZLossTarget<'_, LZ>>,
) -> Result<()>
where
    I: DeviceSlice<i32>,
    LA: DeviceSliceMut<f32>,
    LZ: DeviceSliceMut<f32>,
{
    let tokens = router.validate().and_then(|()| router.tokens(logits))?;
    if let Some(a) = &aux {
        check_aux_inputs(router, a.config, logits, Some(a.ids))?;
    }
    if aux.is_none() && z.is_none() {
        return Ok(());
    }
    let (ids, aux) = match aux {
        Some(a) => (
            Some(a.ids),
            Some(SelectedAuxLoss {
                config: a.config,
                workspace: a.workspace,
                loss: a.loss,
            }),
        ),
        None => (None, None),
    };
    check_loss_targets(router, logits, tokens, &aux, &z)?;
    // router_losses_f32(z, ids, E, k, ROUTER_LOSS_PARAMS).
    let args = KernelArgs::new(device)
        .input("logits", logits)
        .input_or_null("ids", ids)
        .scalar(router.experts as i32)
        .scalar(router.k as i32);
    let (args, launch) = loss_args(router, tokens, args, aux, z)?;
    device.launch("router_losses_f32", launch, args)
}

/// The aux loss of [`select_with_losses`]: an [`AuxLossTarget`] whose ids are the ones the
/// selection writes.
pub struct SelectedAuxLoss<'a, L> {
    pub config: &'a AuxLossConfig,
    pub workspace: &'a mut AuxLossWorkspace,
    pub loss: &'a mut L,
}

/// Checks the loss targets for `tokens` rows of `logits`.
pub(crate) fn check_loss_targets<LA: DeviceSliceMut<f32>, LZ: DeviceSliceMut<f32>>(
    router: &RouterConfig,
    logits: &impl DeviceSlice<f32>,
    tokens: usize,
    aux: &Option<SelectedAuxLoss<'_, LA>>,
    z: &Option<ZLossTarget<'_, LZ>>,
) -> Result<()> {
    if let Some(a) = aux {
        check_aux_inputs(router, a.config, logits, None::<&DeviceBuffer<i32>>)?;
        a.workspace.check(router, a.config, tokens)?;
        check_len("loss", &*a.loss, 1, || "[1]".into())?;
    }
    if let Some(z) = z {
        check_z_loss(router, z.coefficient, logits, z.workspace)?;
        check_len("loss", &*z.loss, 1, || "[1]".into())?;
    }
    Ok(())
}

/// Whether the losses' chunks of `tokens` rows (with the aux loss of `aux`, if any) are the
/// `tile`-token tiles of a kernel whose block b owns rows `[b tile, (b + 1) tile)`: chunks of
/// `tile` rows, each segment starting a tile (one segment, or segments a multiple of `tile`
/// long). Such a kernel can run the losses' body on its tile (`gate_route_<form>_<dtype>_e<N>`).
pub(crate) fn loss_chunks_are_tiles(aux: Option<&AuxLossConfig>, tokens: usize, tile: usize) -> bool {
    let len = aux.map_or(tokens, |a| a.segments(tokens).1);
    chunking(len).1 == tile && (len == tokens || len % tile == 0)
}

/// Appends the loss kernels' parameters after z, ids, E and k for checked targets
/// (`ROUTER_LOSS_PARAMS` in `kernels/include/router_losses.cuh`: the chunking, the workspaces
/// and the losses; null pointers for neither loss); returns them with the launch of
/// `router_losses_f32` (one block per chunk of each segment, the aux loss's histogram as dynamic
/// shared memory).
pub(crate) fn loss_args<'k, LA: DeviceSliceMut<f32>, LZ: DeviceSliceMut<f32>>(
    router: &RouterConfig,
    tokens: usize,
    args: KernelArgs<'k>,
    aux: Option<SelectedAuxLoss<'k, LA>>,
    z: Option<ZLossTarget<'k, LZ>>,
) -> Result<(KernelArgs<'k>, LaunchConfig)> {
    let (segments, len) = aux.as_ref().map_or((1, tokens), |a| a.config.segments(tokens));
    let (chunks, tokens_per_chunk) = chunking(len);
    let scale = aux.as_ref().map_or(0.0, |a| a.config.scale(router, tokens));
    let has_aux = aux.is_some();
    let (aux_lse, aux_partials, chunk_counts, prob_sums, counts, live_rows, aux_loss) = match aux {
        Some(SelectedAuxLoss {
            workspace:
                AuxLossWorkspace {
                    row_lse,
                    counts,
                    live_rows,
                    chunk_counts,
                    prob_sums,
                    partials,
                    ..
                },
            loss,
            ..
        }) => (
            Some(row_lse),
            Some(partials),
            Some(chunk_counts),
            Some(prob_sums),
            Some(counts),
            Some(live_rows),
            Some(loss),
        ),
        None => (None, None, None, None, None, None, None),
    };
    let coefficient = z.as_ref().map_or(0.0, |z| z.coefficient);
    let (z_lse, z_partials, z_live, z_loss) = match z {
        Some(ZLossTarget {
            workspace:
                ZLossWorkspace {
                    row_lse,
                    live_rows,
                    partials,
                },
            loss,
            ..
        }) => (Some(row_lse), Some(partials), Some(live_rows), Some(loss)),
        None => (None, None, None, None),
    };
    // The aux loss's buffers when it is asked for (its chunking), the z-loss's otherwise.
    let (row_lse, row_lse_copy) = match aux_lse {
        Some(lse) => (Some(lse), z_lse),
        None => (z_lse, None),
    };
    let (live, lse_squares, group_tickets, ticket) = match aux_partials.or(z_partials) {
        Some(p) => (
            Some(&mut p.live),
            Some(&mut p.lse_squares),
            Some(&mut p.group_tickets),
            Some(&mut p.ticket),
        ),
        None => (None, None, None, None),
    };
    // ROUTER_LOSS_PARAMS: tokens_per_segment, tokens_per_chunk, row_lse, row_lse_copy, chunk_live,
    // chunk_lse_squares, chunk_counts, chunk_prob_sums, group_tickets, ticket, aux_scale,
    // segment_counts, live_rows, aux_loss, z_loss_coefficient, z_live, z_loss.
    let args = args
        .scalar(len as i64)
        .scalar(tokens_per_chunk as i64)
        .output_or_null("workspace", row_lse)
        .output_or_null("workspace", row_lse_copy)
        .output_or_null("workspace", live)
        .output_or_null("workspace", lse_squares)
        .output_or_null("workspace", chunk_counts)
        .output_or_null("workspace", prob_sums)
        .output_or_null("workspace", group_tickets)
        .output_or_null("workspace", ticket)
        .scalar(scale)
        .output_or_null("workspace", counts)
        .output_or_null("workspace", live_rows)
        .output_or_null("loss", aux_loss)
        .scalar(coefficient)
        .output_or_null("workspace", z_live)
        .output_or_null("loss", z_loss);
    let histogram = if has_aux { router.experts * 4 } else { 0 };
    let launch = LaunchConfig {
        grid: (1, segments as u32, chunks as u32),
        block: (LOSS_THREADS, 1, 1),
        shared_bytes: histogram as u32,
    };
    Ok((args, launch))
}

/// [`select_counted`](super::select_counted) (`map` optional) and [`losses`] of the ids it
/// selects, in **one launch** (`router_select_losses_e<N>_f32`): each block selects one chunk of
/// rows of the losses' chunking (reading the logits from memory), then computes that chunk's
/// losses partials from the rows it just read (from cache) and the ids it just wrote, and the
/// launch's last blocks finish the map's count and the losses as the two calls do. `ids`,
/// `weights`, `nonfinite_rows`, the map and both losses with their workspaces have the bits of
/// those two calls (the aux loss's ids being these ids). With neither loss it is
/// [`select_counted`](super::select_counted). One launch (and the count's memset unless
/// `map.zeroed`); no host sync. As with [`losses`], a launch that fails part-way may leave the
/// workspaces' tickets counted.
#[allow(clippy::too_many_arguments)]
pub fn select_with_losses<B, M, W, LA, LZ>(
    device: &Device,
    router: &RouterConfig,
    logits: &impl DeviceSlice<f32>,
    bias: Option<&B>,
    ids: &mut impl DeviceSliceMut<i32>,
    weights: &mut impl DeviceSliceMut<f32>,
    nonfinite_rows: &mut impl DeviceSliceMut<u32>,
    map: Option<&mut CountedMap<'_, M, W>>,
    aux: Option<SelectedAuxLoss<'_, LA>>,
    z: Option<ZLossTarget<'_, LZ>>,
) -> Result<()>
where
    B: DeviceSlice<f32>,
    M: DeviceSliceMut<i32>,
    W: DeviceSliceMut<i32>,
    LA: DeviceSliceMut<f32>,
    LZ: DeviceSliceMut<f32>,
{
    if aux.is_none() && z.is_none() {
        return super::select_counted(device, router, logits, bias, ids, weights, nonfinite_rows, map);
    }
    let tokens = router.validate().and_then(|()| router.tokens(logits))?;
    check_loss_targets(router, logits, tokens, &aux, &z)?;
    // router_select_losses_e<N>_f32(ROUTER_SELECT_PARAMS, the map's count or nulls,
    // ROUTER_LOSS_PARAMS).
    let args = KernelArgs::new(device)
        .input("logits", logits)
        .input_or_null("bias", bias)
        .scalar(tokens as i64)
        .scalar(router.experts as i32)
        .scalar(router.k as i32);
    let selection = Selection {
        ids,
        weights,
        nonfinite_rows,
    };
    let (args, map_shared) = selection.args(device, router, tokens, bias, args, map, MapParams::CountOrNull)?;
    let (args, mut launch) = loss_args(router, tokens, args, aux, z)?;
    launch.shared_bytes = launch.shared_bytes.max(map_shared);
    let row = select_row_width(router.experts);
    device.launch(&format!("router_select_losses_e{row}_f32"), launch, args)
}

/// The Switch aux loss of `logits` `[T, E]` and the `ids` `[T, k]` selected from them, into
/// `loss` (`[1]`). Fills `workspace` for [`aux_loss_backward`]. One launch ([`losses`]); no host
/// sync.
pub fn aux_loss(
    device: &Device,
    router: &RouterConfig,
    config: &AuxLossConfig,
    logits: &impl DeviceSlice<f32>,
    ids: &impl DeviceSlice<i32>,
    workspace: &mut AuxLossWorkspace,
    loss: &mut impl DeviceSliceMut<f32>,
) -> Result<()> {
    let aux = AuxLossTarget {
        config,
        ids,
        workspace,
        loss,
    };
    losses(
        device,
        router,
        logits,
        Some(aux),
        None::<ZLossTarget<'_, DeviceBuffer<f32>>>,
    )
}

/// Adds the aux loss gradient to `dz` `[T, E]`: `dL/dp_{t,i} = alpha (E/k) f_i / T'` (per
/// sequence at sequence level; `T'` the tokens not routed nowhere) through the dense softmax
/// backward. `workspace` must hold the [`aux_loss`] of the same logits and ids. One launch
/// ([`losses_backward`]); no host sync.
pub fn aux_loss_backward(
    device: &Device,
    router: &RouterConfig,
    aux: &AuxLossConfig,
    logits: &impl DeviceSlice<f32>,
    workspace: &AuxLossWorkspace,
    dz: &mut impl DeviceSliceMut<f32>,
) -> Result<()> {
    losses_backward(device, router, logits, Some((aux, workspace)), None, dz)
}

/// The gradients of the aux loss, the z-loss or both (each as its own `*_backward` defines it),
/// added into `dz` `[T, E]` in **one launch** (`router_losses_backward_f32`): one pass over the
/// logits and `dz`, where two launches would take two. Each workspace must hold its loss's forward
/// of the same logits (from [`losses`], [`aux_loss`] or [`z_loss`]). `dz` gets the bits of the
/// two single-loss calls, aux first. With neither loss it launches nothing. No host sync.
pub fn losses_backward(
    device: &Device,
    router: &RouterConfig,
    logits: &impl DeviceSlice<f32>,
    aux: Option<(&AuxLossConfig, &AuxLossWorkspace)>,
    z: Option<(f32, &ZLossWorkspace)>,
    dz: &mut impl DeviceSliceMut<f32>,
) -> Result<()> {
    let tokens = router.validate().and_then(|()| router.tokens(logits))?;
    if let Some((config, workspace)) = aux {
        check_aux_inputs(router, config, logits, None::<&DeviceBuffer<i32>>)?;
        workspace.check(router, config, tokens)?;
    }
    if let Some((coefficient, workspace)) = z {
        check_z_loss(router, coefficient, logits, workspace)?;
    }
    let e = router.experts;
    check_len("dz", dz, logits.len(), || format!("[T, E] = [{tokens}, {e}]"))?;
    let (row_lse, len, scale) = match (aux, z) {
        (Some((config, workspace)), _) => (
            &workspace.row_lse,
            config.segments(tokens).1,
            config.scale(router, tokens),
        ),
        (None, Some((_, workspace))) => (&workspace.row_lse, tokens, 0.0),
        (None, None) => return Ok(()),
    };
    // Matches the kernel's parameters, in order: router_losses_backward_f32(z, lse, counts, live,
    // T, tokens_per_segment, E, aux_scale, z_live, z_coefficient, dz).
    let args = KernelArgs::new(device)
        .input("logits", logits)
        .input("workspace", row_lse)
        .input_or_null("workspace", aux.map(|(_, w)| &w.counts))
        .input_or_null("workspace", aux.map(|(_, w)| &w.live_rows))
        .scalar(tokens as i64)
        .scalar(len.max(1) as i64)
        .scalar(e as i32)
        .scalar(scale)
        .input_or_null("workspace", z.map(|(_, w)| &w.live_rows))
        .scalar(z.map_or(0.0, |(coefficient, _)| coefficient))
        .output("dz", dz);
    device.launch("router_losses_backward_f32", row_launch(tokens)?, args)
}

/// What [`z_loss`] keeps for [`z_loss_backward`]: the per-row log-sum-exp (NaN for a non-finite
/// row; room for `max_tokens` rows, a batch of T uses the first T) and the number of rows with a
/// finite one `[1]`, the mean's denominator; and the per-chunk partials of its launch.
pub struct ZLossWorkspace {
    row_lse: DeviceBuffer<f32>,
    live_rows: DeviceBuffer<i32>,
    partials: ChunkPartials,
}

impl ZLossWorkspace {
    /// Buffers for batches of up to `max_tokens` rows.
    pub fn new(device: &Device, max_tokens: usize) -> Result<Self> {
        // chunking(T).0 <= min(MAX_CHUNKS, ceil(T / MIN_TOKENS_PER_CHUNK)) for every T, and that
        // bound grows with T (chunking itself does not: T = 65537 takes fewer chunks than 65536).
        let chunks = MAX_CHUNKS.min(max_tokens.div_ceil(MIN_TOKENS_PER_CHUNK)).max(1);
        Ok(Self {
            row_lse: device.alloc_zeros(max_tokens)?,
            live_rows: device.alloc_zeros(1)?,
            partials: ChunkPartials::new(device, chunks)?,
        })
    }

    /// The per-row log-sum-exp of the last [`z_loss`] (its first T elements; NaN for a
    /// non-finite row).
    pub fn row_lse(&self) -> &DeviceBuffer<f32> {
        &self.row_lse
    }

    /// The rows the last [`z_loss`] averaged over (`[1]`): those with finite logits.
    pub fn live_rows(&self) -> &DeviceBuffer<i32> {
        &self.live_rows
    }
}

fn check_z_loss(
    router: &RouterConfig,
    coefficient: f32,
    logits: &impl DeviceSlice<f32>,
    workspace: &ZLossWorkspace,
) -> Result<usize> {
    router.validate()?;
    if !coefficient.is_finite() {
        return Err(invalid("coefficient", coefficient, "a finite number"));
    }
    let tokens = router.tokens(logits)?;
    if workspace.row_lse.len() < tokens {
        return Err(Error::Shape {
            argument: "workspace",
            expected: format!("a z-loss workspace for at least T = {tokens} rows"),
            got: format!("one for {}", workspace.row_lse.len()),
        });
    }
    Ok(tokens)
}

/// The router z-loss (ST-MoE, math §3) `coefficient / T' * sum_t LSE_t^2` of `logits` `[T, E]`
/// into `loss` (`[1]`), where the sum and its count `T'` take only the rows with finite logits (a
/// non-finite row is routed nowhere and adds nothing: the other rows' gradients are bitwise those
/// of the batch without it). Keeps the per-row LSE and `T'` in `workspace` for
/// [`z_loss_backward`]. One launch ([`losses`]); no host sync.
pub fn z_loss(
    device: &Device,
    router: &RouterConfig,
    coefficient: f32,
    logits: &impl DeviceSlice<f32>,
    workspace: &mut ZLossWorkspace,
    loss: &mut impl DeviceSliceMut<f32>,
) -> Result<()> {
    let z = ZLossTarget {
        coefficient,
        workspace,
        loss,
    };
    losses(
        device,
        router,
        logits,
        None::<AuxLossTarget<'_, DeviceBuffer<i32>, DeviceBuffer<f32>>>,
        Some(z),
    )
}

/// Adds the z-loss gradient `(2 coefficient / T') LSE_t p_{t,j}` to `dz` `[T, E]`; `workspace`
/// holds the [`z_loss`] of these logits. One launch ([`losses_backward`]); no host sync.
pub fn z_loss_backward(
    device: &Device,
    router: &RouterConfig,
    coefficient: f32,
    logits: &impl DeviceSlice<f32>,
    workspace: &ZLossWorkspace,
    dz: &mut impl DeviceSliceMut<f32>,
) -> Result<()> {
    losses_backward(device, router, logits, None, Some((coefficient, workspace)), dz)
}

/// DeepSeek-V3 auxiliary-loss-free balancing: `bias[i] += gamma * sign(mean(c) - c_i)` with the
/// per-expert token counts `counts` (`[E]`, from [`expert_counts`]). The sign is exact (taken in
/// integers). No gradient. One launch; no host sync.
pub fn bias_update(
    device: &Device,
    gamma: f32,
    counts: &impl DeviceSlice<i32>,
    bias: &mut impl DeviceSliceMut<f32>,
) -> Result<()> {
    if !gamma.is_finite() {
        return Err(invalid("gamma", gamma, "a finite number"));
    }
    let e = bias.len();
    check_range("bias", e, 1..=i32::MAX as usize)?;
    check_len("counts", counts, e, || format!("[E] = [{e}]"))?;
    // Matches the kernel's parameters, in order: router_bias_update_f32(counts, E, gamma, bias).
    let args = KernelArgs::new(device)
        .input("counts", counts)
        .scalar(e as i32)
        .scalar(gamma)
        .output("bias", bias);
    device.launch("router_bias_update_f32", LaunchConfig::linear(1, LOSS_THREADS, 0), args)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The losses' chunks are 64-token tiles up to 65536 tokens a segment (1024 chunks of 64),
    /// when every segment starts a tile.
    #[test]
    fn loss_chunks_are_tiles_while_chunks_are_64_tokens_from_each_segment_start() {
        assert!(loss_chunks_are_tiles(None, 65, 64));
        assert!(loss_chunks_are_tiles(None, 64 * MAX_CHUNKS, 64));
        assert!(!loss_chunks_are_tiles(None, 64 * MAX_CHUNKS + 1, 64), "65-token chunks");
        let sequences = |len| AuxLossConfig {
            sequence_length: Some(len),
            ..AuxLossConfig::default()
        };
        assert!(loss_chunks_are_tiles(Some(&sequences(128)), 384, 64));
        assert!(loss_chunks_are_tiles(Some(&sequences(384)), 384, 64));
        assert!(
            !loss_chunks_are_tiles(Some(&sequences(96)), 384, 64),
            "segments start mid-tile"
        );
        let long = 64 * MAX_CHUNKS * 2;
        assert!(
            !loss_chunks_are_tiles(Some(&sequences(long)), long, 64),
            "128-token chunks"
        );
    }
}
