//! Router: top-k expert selection and its backward (math §2), expert statistics, balance
//! losses and the bias update (math §3, in [`balance`]). Kernels: `kernels/router.cu`.
//!
//! Logits `z` are `[T, E]` f32 row-major (T = `logits.len() / E`); ids `[T, k]` i32 in rank
//! order (best first); weights `[T, k]` f32.
//!
//! **Rules every op follows.** Ties go to the lower expert index. A NaN score ranks below
//! every number. The k ids of a finite row are distinct and in `[0, E)`. A row is *non-finite*
//! when one of its logits is NaN or +inf, or none is finite (all -inf / NaN); that covers a
//! non-finite input row, whose logits `ops::gate` makes NaN, and one whose logits overflow. Such a row is routed nowhere: all its ids are [`NO_EXPERT`] and all its
//! weights NaN, so dispatch lays it out for no expert and the combine makes its output row NaN
//! (the caller sees it); its probabilities are 0, it adds nothing to the losses, gets a zero
//! gradient, and [`select`] counts it. -inf logits in a row with finite ones are ordinary
//! (probability 0): that is how callers mask experts.
//!
//! **Backward without saved probabilities.** The backward ops take the logits and recompute
//! the row softmax (one extra read of `z`) rather than storing a dense `[T, E]` probability
//! tensor in the forward.
//!
//! **Alignment.** Every buffer may be a view at any element: rows of logits (and `dz`) are read
//! and written 16 bytes at a time only when E is a multiple of 4 and the buffer starts 16-byte
//! aligned, else element by element; everything else is accessed one element at a time.
//!
//! Nothing here waits for the device: every op only queues launches.
pub mod balance;

pub use balance::{
    AuxLossConfig, AuxLossTarget, AuxLossWorkspace, SelectedAuxLoss, ZLossTarget, ZLossWorkspace, aux_loss,
    aux_loss_backward, bias_update, expert_counts, expert_statistics, expert_statistics_workspace_len, losses,
    losses_backward, select_with_losses, z_loss, z_loss_backward,
};

use super::dispatch::{CountedMap, MapParams, no_count_args};
use super::{check_len, check_range, elements, grid_blocks};
use crate::device::{KernelArgs, LaunchConfig};
use crate::{Device, DeviceBuffer, DeviceSlice, DeviceSliceMut, Error, Result};

/// The most experts a router supports (a row lives in registers: 32 per lane, 32 lanes at most).
pub const MAX_EXPERTS: usize = 1024;
/// The id every slot of a non-finite row gets: routed to no expert (dispatch lays it out
/// nowhere and does not count it as an invalid id).
pub const NO_EXPERT: i32 = -1;
/// The most experts one token may be routed to (one per lane).
pub const MAX_K: usize = 32;
/// The most expert groups of group-limited routing (one per lane).
pub const MAX_GROUPS: usize = 32;

/// What the logits become before selection and weighting (math §2 `score_fn`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ScoreFunction {
    /// Softmax over all E logits (Switch, Mixtral, DeepSeek-V2).
    #[default]
    Softmax,
    /// Elementwise sigmoid (DeepSeek-V3).
    Sigmoid,
    /// The logits as given (math §2's `none`).
    Identity,
}

/// Where the softmax sits relative to top-k (math §2 `order`); only meaningful for
/// [`ScoreFunction::Softmax`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SelectionOrder {
    /// Select on the softmax probabilities (+ bias); weights are those probabilities.
    #[default]
    SoftmaxThenTopk,
    /// Select on the logits (+ bias); weights are a softmax over the k chosen logits
    /// (Mixtral). Already normalized: `renormalize` changes nothing.
    TopkThenSoftmax,
}

/// One router's selection options (math §2).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RouterConfig {
    /// E, the routed experts (1..=1024).
    pub experts: usize,
    /// Experts per token (1..=min(E, 32)).
    pub k: usize,
    pub score: ScoreFunction,
    pub order: SelectionOrder,
    /// Divide the k weights by their sum + 1e-20. With [`ScoreFunction::Identity`] the sum of
    /// signed logits may be near 0 (or -inf with masked experts): the weights are what that
    /// arithmetic gives.
    pub renormalize: bool,
    /// Multiplies the final weights (DeepSeek-V3 `route_scale` = 2.5).
    pub scale: f32,
    /// Group-limited routing: E splits into `groups` equal groups (1 = off; at most 32)...
    pub groups: usize,
    /// ...of which the `topk_groups` best (by the sum of their two best biased scores) are
    /// searched for the k experts.
    pub topk_groups: usize,
}

impl Default for RouterConfig {
    fn default() -> Self {
        Self {
            experts: 8,
            k: 2,
            score: ScoreFunction::Softmax,
            order: SelectionOrder::SoftmaxThenTopk,
            renormalize: false,
            scale: 1.0,
            groups: 1,
            topk_groups: 1,
        }
    }
}

impl RouterConfig {
    /// DeepSeek-V3's router: 256 experts, 8 per token, sigmoid scores renormalized over the
    /// chosen 8 and scaled by 2.5, the top 4 of 8 expert groups (use with a selection bias).
    pub fn deepseek_v3() -> Self {
        Self {
            experts: 256,
            k: 8,
            score: ScoreFunction::Sigmoid,
            renormalize: true,
            scale: 2.5,
            groups: 8,
            topk_groups: 4,
            ..Self::default()
        }
    }

    /// Mixtral's router: 8 experts, 2 per token, softmax over the two chosen logits.
    pub fn mixtral() -> Self {
        Self {
            experts: 8,
            k: 2,
            order: SelectionOrder::TopkThenSoftmax,
            ..Self::default()
        }
    }

    /// Checks every field; the error names the offending one.
    pub fn validate(&self) -> Result<()> {
        check_range("experts", self.experts, 1..=MAX_EXPERTS)?;
        check_range("k", self.k, 1..=self.experts.min(MAX_K))?;
        if !self.scale.is_finite() {
            return Err(invalid("scale", self.scale, "a finite number"));
        }
        if self.order == SelectionOrder::TopkThenSoftmax && self.score != ScoreFunction::Softmax {
            return Err(invalid(
                "order",
                "TopkThenSoftmax",
                "SoftmaxThenTopk unless score is Softmax",
            ));
        }
        check_range("groups", self.groups, 1..=MAX_GROUPS.min(self.experts))?;
        if self.experts % self.groups != 0 {
            return Err(invalid(
                "groups",
                self.groups,
                format!("a divisor of experts = {}", self.experts),
            ));
        }
        check_range("topk_groups", self.topk_groups, 1..=self.groups)?;
        let reachable = self.topk_groups * (self.experts / self.groups);
        if self.k > reachable {
            return Err(invalid(
                "k",
                self.k,
                format!("at most topk_groups * experts / groups = {reachable}"),
            ));
        }
        Ok(())
    }

    /// T of `logits`: its length over E, which must divide it.
    fn tokens(&self, logits: &impl DeviceSlice<f32>) -> Result<usize> {
        if logits.len() % self.experts != 0 {
            return Err(Error::Shape {
                argument: "logits",
                expected: format!(
                    "[T, E] with E = {} (a multiple of {} f32 elements)",
                    self.experts, self.experts
                ),
                got: format!("{} elements", logits.len()),
            });
        }
        Ok(logits.len() / self.experts)
    }

    /// The kernels' (score, topk_first, renormalize, scale) arguments.
    fn kernel_options<'a>(&self, args: KernelArgs<'a>) -> KernelArgs<'a> {
        let score = match self.score {
            ScoreFunction::Softmax => 0i32,
            ScoreFunction::Sigmoid => 1,
            ScoreFunction::Identity => 2,
        };
        args.scalar(score)
            .scalar((self.order == SelectionOrder::TopkThenSoftmax) as i32)
            .scalar(self.renormalize as i32)
            .scalar(self.scale)
    }
}

pub(crate) fn invalid(argument: &'static str, value: impl std::fmt::Display, expected: impl Into<String>) -> Error {
    Error::InvalidArgument {
        argument,
        value: value.to_string(),
        expected: expected.into(),
    }
}

/// Elements of the `[T, k]` ids and weights for `tokens` tokens.
pub fn selection_len(config: &RouterConfig, tokens: usize) -> Result<usize> {
    elements("tokens", tokens, config.k)
}

/// Rows (tokens) per block of the warp-per-row kernels: 4 warps of 32 threads.
const ROWS_PER_BLOCK: usize = 4;

/// A launch of one warp per row.
pub(crate) fn row_launch(tokens: usize) -> Result<LaunchConfig> {
    Ok(LaunchConfig::linear(
        grid_blocks("tokens", tokens, ROWS_PER_BLOCK)?,
        32 * ROWS_PER_BLOCK as u32,
        0,
    ))
}

/// Threads per block of the selection kernels.
const SELECT_THREADS: usize = 128;

/// The selection kernel for E experts: its row width N (E <= N; it runs N / 32 lanes per row) and
/// name; `counted`: the one that also counts the routing map; `prefix`: "router_select", or the
/// dev-tools warp-per-row twin's.
fn select_kernel(experts: usize, counted: bool, prefix: &str) -> (usize, String) {
    let row = select_row_width(experts);
    let variant = if counted { "_counted" } else { "" };
    (row, format!("{prefix}{variant}_e{row}_f32"))
}

/// Fused top-k selection (math §2): `ids` and `weights` `[T, k]` from `logits` `[T, E]`.
///
/// `bias` (`[E]`, DeepSeek-V3's load-balancing bias) is added to the scores for selection only;
/// the weights come from the unbiased scores. `nonfinite_rows` (one `u32`) has the number of
/// non-finite rows *added* to it, so one counter can cover several calls: zero it with
/// [`Device::fill_zeros`] to count one. One launch; no host sync.
///
/// ```
/// use moe_kernels::Device;
/// use moe_kernels::ops::router::{self, RouterConfig};
///
/// # fn main() -> moe_kernels::Result<()> {
/// let device = Device::emulator()?;
/// let config = RouterConfig { experts: 4, k: 2, ..RouterConfig::default() };
/// // Two tokens; the second row is a tie between experts 1 and 3: the lower id wins.
/// let logits = device.upload(&[0.0f32, 3.0, 1.0, 2.0, /**/ 0.0, 5.0, 1.0, 5.0])?;
/// let mut ids = device.alloc_zeros::<i32>(4)?;
/// let mut weights = device.alloc_zeros::<f32>(4)?;
/// let mut nonfinite = device.alloc_zeros::<u32>(1)?;
/// let no_bias = None::<&moe_kernels::DeviceBuffer<f32>>;
/// router::select(&device, &config, &logits, no_bias, &mut ids, &mut weights, &mut nonfinite)?;
/// assert_eq!(device.download(&ids)?, [1, 3, 1, 3]);
/// let w = device.download(&weights)?; // softmax probabilities of the chosen experts
/// assert!(w[0] > w[1] && (w[2] - w[3]).abs() < 1e-6);
/// assert_eq!(device.download(&nonfinite)?, [0]);
/// # Ok(())
/// # }
/// ```
pub fn select<B: DeviceSlice<f32>>(
    device: &Device,
    config: &RouterConfig,
    logits: &impl DeviceSlice<f32>,
    bias: Option<&B>,
    ids: &mut impl DeviceSliceMut<i32>,
    weights: &mut impl DeviceSliceMut<f32>,
    nonfinite_rows: &mut impl DeviceSliceMut<u32>,
) -> Result<()> {
    let no_map = None::<&mut CountedMap<'_, DeviceBuffer<i32>, DeviceBuffer<i32>>>;
    select_counted(device, config, logits, bias, ids, weights, nonfinite_rows, no_map)
}

/// [`select`] that also runs the counting pass of the routing map of the ids it writes, when
/// `map` is given (`map.config.num_experts` must be E; no capacity):
/// [`place_counted`](super::dispatch::place_counted) with the same `ids` and `map` then completes
/// the map, the same map [`routing_map`](super::dispatch::routing_map) builds, in one launch
/// fewer. One launch and one memset (of `map.workspace`; none when `map.zeroed`); no host sync.
/// `None`: [`select`].
#[allow(clippy::too_many_arguments)]
pub fn select_counted<B: DeviceSlice<f32>, M: DeviceSliceMut<i32>, W: DeviceSliceMut<i32>>(
    device: &Device,
    config: &RouterConfig,
    logits: &impl DeviceSlice<f32>,
    bias: Option<&B>,
    ids: &mut impl DeviceSliceMut<i32>,
    weights: &mut impl DeviceSliceMut<f32>,
    nonfinite_rows: &mut impl DeviceSliceMut<u32>,
    map: Option<&mut CountedMap<'_, M, W>>,
) -> Result<()> {
    launch_select(device, config, logits, bias, ids, weights, nonfinite_rows, map, SELECT)
}

/// [`select`] on the warp-per-row twins of its kernels (test-only kernels, `kernels/router_warp_rows.cu`):
/// one warp per row, the mapping whose sums the kernels of [`select`] reproduce bit for bit
/// with fewer lanes per row. Tests compare the two.
#[cfg(feature = "dev-tools")]
pub fn select_warp_per_row<B: DeviceSlice<f32>>(
    device: &Device,
    config: &RouterConfig,
    logits: &impl DeviceSlice<f32>,
    bias: Option<&B>,
    ids: &mut impl DeviceSliceMut<i32>,
    weights: &mut impl DeviceSliceMut<f32>,
    nonfinite_rows: &mut impl DeviceSliceMut<u32>,
) -> Result<()> {
    let no_map = None::<&mut CountedMap<'_, DeviceBuffer<i32>, DeviceBuffer<i32>>>;
    launch_select(
        device,
        config,
        logits,
        bias,
        ids,
        weights,
        nonfinite_rows,
        no_map,
        WARP_PER_ROW,
    )
}

/// The kernel name prefixes: the selection kernels, and their warp-per-row twins.
const SELECT: &str = "router_select";
const WARP_PER_ROW: &str = "router_select_warp_per_row";

/// Validates and launches a selection kernel of `kernel_prefix` ([`select_counted`]).
#[allow(clippy::too_many_arguments)]
fn launch_select<B: DeviceSlice<f32>, M: DeviceSliceMut<i32>, W: DeviceSliceMut<i32>>(
    device: &Device,
    config: &RouterConfig,
    logits: &impl DeviceSlice<f32>,
    bias: Option<&B>,
    ids: &mut impl DeviceSliceMut<i32>,
    weights: &mut impl DeviceSliceMut<f32>,
    nonfinite_rows: &mut impl DeviceSliceMut<u32>,
    map: Option<&mut CountedMap<'_, M, W>>,
    kernel_prefix: &str,
) -> Result<()> {
    config.validate()?;
    let tokens = config.tokens(logits)?;
    // Matches the kernel's parameters, in order: router_select_e<N>_f32(z, bias, T, E, k, score,
    // topk_first, renormalize, scale, groups, topk_groups, ids, weights, nonfinite_rows), and for
    // router_select_counted_e<N>_f32 the map count's (CountedMap::count_args).
    let args = KernelArgs::new(device)
        .input("logits", logits)
        .input_or_null("bias", bias)
        .scalar(tokens as i64)
        .scalar(config.experts as i32)
        .scalar(config.k as i32);
    let counted = map.is_some();
    let selection = Selection {
        ids,
        weights,
        nonfinite_rows,
    };
    let (args, shared_bytes) = selection.args(device, config, tokens, bias, args, map, MapParams::Count)?;
    let (row, name) = select_kernel(config.experts, counted, kernel_prefix);
    let lanes_per_row = if kernel_prefix == WARP_PER_ROW { 32 } else { row / 32 };
    let rows_per_block = SELECT_THREADS / lanes_per_row;
    let launch = LaunchConfig::linear(
        grid_blocks("tokens", tokens, rows_per_block)?,
        SELECT_THREADS as u32,
        shared_bytes,
    );
    device.launch(&name, launch, args)
}

/// The outputs of a selection kernel: those of `router_select_e<N>_f32` and of the gate's fused
/// route kernel (`gate::scores_and_select`).
pub(crate) struct Selection<'o, I, Wt, C> {
    pub ids: &'o mut I,
    pub weights: &'o mut Wt,
    pub nonfinite_rows: &'o mut C,
}

impl<'o, I: DeviceSliceMut<i32>, Wt: DeviceSliceMut<f32>, C: DeviceSliceMut<u32>> Selection<'o, I, Wt, C> {
    /// Checks the outputs and `bias` for `tokens` rows of `config`.
    pub(crate) fn check<B: DeviceSlice<f32>>(
        &self,
        config: &RouterConfig,
        tokens: usize,
        bias: Option<&B>,
    ) -> Result<()> {
        let (e, k) = (config.experts, config.k);
        if let Some(bias) = bias {
            check_len("bias", bias, e, || format!("[E] = [{e}]"))?;
        }
        let slots = selection_len(config, tokens)?;
        check_len("ids", self.ids, slots, || format!("[T, k] = [{tokens}, {k}]"))?;
        check_len("weights", self.weights, slots, || format!("[T, k] = [{tokens}, {k}]"))?;
        check_len("nonfinite_rows", self.nonfinite_rows, 1, || "[1]".into())
    }

    /// [`check`](Self::check)s the outputs and `bias`, and appends the kernel parameters that
    /// follow `k` (score, topk_first, renormalize, scale, groups, topk_groups, ids, weights,
    /// nonfinite_rows), then the map's as `params` says: with `map` the count's
    /// (CountedMap::count_args) and for the decode route the placement's; without, none, or for
    /// kernels whose count is optional a null map workspace and zeros in their place. Returns the
    /// arguments and the dynamic shared bytes the map's work needs.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn args<'k, B: DeviceSlice<f32>, M: DeviceSliceMut<i32>, W: DeviceSliceMut<i32>>(
        self,
        device: &Device,
        config: &RouterConfig,
        tokens: usize,
        bias: Option<&B>,
        args: KernelArgs<'k>,
        map: Option<&'k mut CountedMap<'_, M, W>>,
        params: MapParams,
    ) -> Result<(KernelArgs<'k>, u32)>
    where
        'o: 'k,
    {
        let (e, k) = (config.experts, config.k);
        self.check(config, tokens, bias)?;
        let args = config
            .kernel_options(args)
            .scalar(config.groups as i32)
            .scalar(config.topk_groups as i32)
            .output("ids", self.ids)
            .output("weights", self.weights)
            .output("nonfinite_rows", self.nonfinite_rows);
        match (map, params) {
            (Some(map), _) => map.count_args(device, e, tokens, k, args, params),
            (None, MapParams::Count) => Ok((args, 0)),
            (None, MapParams::CountOrNull) => Ok((no_count_args(args), 0)),
            (None, MapParams::CountThenPlacement { .. }) => Err(Error::InvalidArgument {
                argument: "map",
                value: "None".into(),
                expected: "a counted map (the decode route's tickets live in its workspace)".into(),
            }),
        }
    }
}

/// The row width N of the selection kernels for E experts (`router_select_e<N>_f32`).
pub(crate) fn select_row_width(experts: usize) -> usize {
    match experts {
        ..=32 => 32,
        33..=64 => 64,
        65..=128 => 128,
        129..=256 => 256,
        257..=512 => 512,
        _ => 1024,
    }
}

/// Selection backward (math §2): writes `dz` `[T, E]` (every element) from `d_weights`
/// `[T, k]`, the forward's `ids` and the `logits` (the softmax is recomputed). Slots whose id is
/// outside `[0, E)` or repeats an earlier slot's id get no gradient (the forward never makes
/// them). Loss gradients ([`aux_loss_backward`], [`z_loss_backward`]) add into `dz` afterwards.
/// One launch; no host sync.
pub fn select_backward(
    device: &Device,
    config: &RouterConfig,
    logits: &impl DeviceSlice<f32>,
    ids: &impl DeviceSlice<i32>,
    d_weights: &impl DeviceSlice<f32>,
    dz: &mut impl DeviceSliceMut<f32>,
) -> Result<()> {
    config.validate()?;
    let tokens = config.tokens(logits)?;
    let (e, k) = (config.experts, config.k);
    let slots = selection_len(config, tokens)?;
    check_len("ids", ids, slots, || format!("[T, k] = [{tokens}, {k}]"))?;
    check_len("d_weights", d_weights, slots, || format!("[T, k] = [{tokens}, {k}]"))?;
    check_len("dz", dz, logits.len(), || format!("[T, E] = [{tokens}, {e}]"))?;
    // Matches the kernel's parameters, in order: router_select_backward_f32(z, ids, d_weights, T, E,
    // k, score, topk_first, renormalize, scale, dz).
    let args = KernelArgs::new(device)
        .input("logits", logits)
        .input("ids", ids)
        .input("d_weights", d_weights)
        .scalar(tokens as i64)
        .scalar(e as i32)
        .scalar(k as i32);
    let args = config.kernel_options(args).output("dz", dz);
    device.launch("router_select_backward_f32", row_launch(tokens)?, args)
}
