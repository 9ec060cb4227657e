//! Expert-specialized fine-tuning (ESFT, math §8): which experts of a layer to train, from the
//! routing of a probe set. Kernels: `kernels/esft.cu`.
//!
//! Per expert i, over every accumulated token t (ids and weights `[T, k]` from the router):
//! - gate score `g_i = mean_t w_{t,i}` (0 where i was not selected);
//! - token score `r_i = mean_t 1[i in K_t] / k` (these sum to 1).
//!
//! Selection sorts experts by score, descending (ties: lower id first), and takes the shortest
//! prefix whose cumulative score is `>= p`. The gate scores need not sum to 1 (they sum to the
//! mean total weight of a token, e.g. 2.5 with DeepSeek-V3's route scale, or less than 1 without
//! renormalization): a `p` above the total is never reached and selects every expert.
//!
//! ```text
//! let mut stats = EsftScores::new(&device, experts, k)?;
//! for (ids, weights) in probe_batches {
//!     esft::accumulate(&device, &ids, &weights, &mut stats)?;           // 1 launch, no sync
//! }
//! let mut selection = EsftSelection::new(&device, experts)?;
//! esft::select(&device, &stats, ScoreKind::Token, 0.2, &mut selection)?;  // 1 launch, no sync
//! let train: Vec<bool> = selection.download_mask(&device)?;             // the one host sync
//! ```
//!
//! **Exact, order-free sums.** Counts are u64. Weight sums are 64-bit fixed point (2^32 units per
//! 1.0) added with integer atomics: exact in any order, so they are deterministic without a
//! fixed-order float reduction, and accumulating several batches gives the same bits as one batch
//! of their concatenation. Each weight is rounded to a multiple of 2^-32 (the mean moves by at
//! most 2^-33). The range: the total weight accumulated over all experts must stay below 2^31 in
//! magnitude (about 2 billion tokens of softmax weights summing to 1, or 850 million at
//! DeepSeek-V3's route scale 2.5); [`select`] adds the experts' sums in the same integers.
//! f64 running sums would need a fixed-order reduction per batch and would still depend on how
//! the probe set is split into batches.
//!
//! **Skipped slots.** A slot whose id is outside `[0, E)`, or whose weight is NaN, infinite or
//! larger than [`MAX_WEIGHT`] in magnitude, counts nowhere and adds nothing; it is counted in
//! [`EsftStatistics::skipped_slots`]. Its token still counts in T, so skipped slots lower the
//! scores' total below 1 (token) or the mean weight (gate).
//!
//! **Alignment.** `ids` and `weights` may be views at any element (they are read element by
//! element).
use super::router::MAX_EXPERTS;
use super::{check_len, check_range, elements, grid_blocks};
use crate::device::{KernelArgs, LaunchConfig};
use crate::{Device, DeviceBuffer, DeviceSlice, Error, Result};

/// Weight units per 1.0 in the device's fixed-point sums (`ESFT_FIXED_ONE` in esft.cu).
const FIXED_ONE: f64 = 4_294_967_296.0;
/// The largest weight magnitude a slot may carry to count (`ESFT_MAX_WEIGHT` in esft.cu).
pub const MAX_WEIGHT: f32 = 65536.0;

/// Threads per block of `esft_accumulate`, and the slots each thread takes at least: few blocks,
/// since each block adds its histogram to the state with 2 atomics per touched expert.
const ACCUMULATE_THREADS: u32 = 256;
const SLOTS_PER_THREAD: usize = 16;
const MAX_ACCUMULATE_BLOCKS: u32 = 128;

/// Which ESFT score ranks the experts (math §8).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ScoreKind {
    /// `g_i = mean_t w_{t,i}`: the average gate weight (ESFT-Gate; the paper uses p ≈ 0.1).
    #[default]
    Gate,
    /// `r_i = mean_t 1[i in K_t] / k`: the share of routed slots (ESFT-Token; p ≈ 0.2).
    Token,
}

impl ScoreKind {
    /// The kernel's code for this kind (`ESFT_TOKEN` in esft.cu is 1; 0 is the gate score).
    fn code(self) -> i32 {
        match self {
            ScoreKind::Gate => 0,
            ScoreKind::Token => 1,
        }
    }
}

/// The running per-expert statistics of a probe set, on the device: counts, fixed-point weight
/// sums, tokens and skipped slots. Allocated once per layer (zeroed), added to by [`accumulate`],
/// read by [`select`].
pub struct EsftScores {
    counts: DeviceBuffer<u64>,
    weight_sums: DeviceBuffer<i64>,
    /// `[tokens, skipped slots]`.
    totals: DeviceBuffer<u64>,
    experts: usize,
    k: usize,
}

/// A host copy of [`EsftScores`] (from [`EsftScores::download`]).
#[derive(Debug, Clone, PartialEq)]
pub struct EsftStatistics {
    /// Slots routed to each expert `[E]` (exact).
    pub counts: Vec<u64>,
    /// Sum of those slots' weights `[E]` (each weight rounded to a multiple of 2^-32).
    pub weight_sums: Vec<f64>,
    /// Tokens accumulated (T summed over batches).
    pub tokens: u64,
    /// Slots that counted nowhere: an id outside `[0, E)` or an unusable weight.
    pub skipped_slots: u64,
}

impl EsftScores {
    /// Zeroed statistics for `experts` (1..=1024) experts with `k` (1..=E) experts per token.
    pub fn new(device: &Device, experts: usize, k: usize) -> Result<Self> {
        check_range("experts", experts, 1..=MAX_EXPERTS)?;
        check_range("k", k, 1..=experts)?;
        Ok(Self {
            counts: device.alloc_zeros(experts)?,
            weight_sums: device.alloc_zeros(experts)?,
            totals: device.alloc_zeros(2)?,
            experts,
            k,
        })
    }

    pub fn experts(&self) -> usize {
        self.experts
    }

    pub fn k(&self) -> usize {
        self.k
    }

    /// Forgets every accumulated batch (three stream-ordered memsets, no host sync).
    pub fn reset(&mut self, device: &Device) -> Result<()> {
        device.fill_zeros(&mut self.counts)?;
        device.fill_zeros(&mut self.weight_sums)?;
        device.fill_zeros(&mut self.totals)
    }

    /// Copies the statistics to the host. **Waits for the device** (three downloads): for
    /// inspection and logging, not for the training loop.
    pub fn download(&self, device: &Device) -> Result<EsftStatistics> {
        let totals = device.download(&self.totals)?;
        Ok(EsftStatistics {
            counts: device.download(&self.counts)?,
            weight_sums: device
                .download(&self.weight_sums)?
                .into_iter()
                .map(|units| units as f64 / FIXED_ONE)
                .collect(),
            tokens: totals[0],
            skipped_slots: totals[1],
        })
    }
}

/// Adds one batch of routing, ids `[T, k]` (i32) and weights `[T, k]` (f32), to `scores`.
/// Deterministic (integer adds only). One launch; no host sync.
pub fn accumulate(
    device: &Device,
    ids: &impl DeviceSlice<i32>,
    weights: &impl DeviceSlice<f32>,
    scores: &mut EsftScores,
) -> Result<()> {
    let (e, k) = (scores.experts, scores.k);
    if ids.len() % k != 0 {
        return Err(Error::Shape {
            argument: "ids",
            expected: format!("[T, k] with k = {k} (a multiple of {k} i32 elements)"),
            got: format!("{} elements", ids.len()),
        });
    }
    let tokens = ids.len() / k;
    check_len("weights", weights, ids.len(), || format!("[T, k] = [{tokens}, {k}]"))?;
    let blocks = grid_blocks("ids", ids.len(), ACCUMULATE_THREADS as usize * SLOTS_PER_THREAD)?;
    let shared = elements("experts", 2 * e, size_of::<u64>())?;
    // Matches the kernel's parameters, in order: esft_accumulate(ids, weights, tokens, k, E,
    // counts, weight_sums, totals). weight_sums is i64 here, unsigned long long there: the same
    // two's complement bits.
    let args = KernelArgs::new(device)
        .input("ids", ids)
        .input("weights", weights)
        .scalar(tokens as i64)
        .scalar(k as i32)
        .scalar(e as i32)
        .output("counts", &mut scores.counts)
        .output("weight_sums", &mut scores.weight_sums)
        .output("totals", &mut scores.totals);
    let config = LaunchConfig::linear(blocks.min(MAX_ACCUMULATE_BLOCKS), ACCUMULATE_THREADS, shared as u32);
    device.launch("esft_accumulate", config, args)
}

/// What [`select`] writes, on the device, for E experts.
pub struct EsftSelection {
    scores: DeviceBuffer<f32>,
    mask: DeviceBuffer<i32>,
    selected: DeviceBuffer<i32>,
    count: DeviceBuffer<i32>,
}

impl EsftSelection {
    /// Output buffers for `experts` (1..=1024) experts.
    pub fn new(device: &Device, experts: usize) -> Result<Self> {
        check_range("experts", experts, 1..=MAX_EXPERTS)?;
        Ok(Self {
            scores: device.alloc_zeros(experts)?,
            mask: device.alloc_zeros(experts)?,
            selected: device.alloc_zeros(experts)?,
            count: device.alloc_zeros(1)?,
        })
    }

    /// Each expert's score `[E]` (f32) of the kind selected on.
    pub fn scores(&self) -> &DeviceBuffer<f32> {
        &self.scores
    }

    /// `[E]`: 1 for an expert to train, 0 for a frozen one.
    pub fn mask(&self) -> &DeviceBuffer<i32> {
        &self.mask
    }

    /// `[E]`: the selected ids in selection order (best score first, ties lower id first),
    /// then -1.
    pub fn selected(&self) -> &DeviceBuffer<i32> {
        &self.selected
    }

    /// `[1]`: how many experts were selected.
    pub fn count(&self) -> &DeviceBuffer<i32> {
        &self.count
    }

    /// The mask as host booleans (`true` = train), which is what the grouped GEMM's expert mask
    /// is built from. **Waits for the device** (one download): call it once, after [`select`].
    pub fn download_mask(&self, device: &Device) -> Result<Vec<bool>> {
        Ok(device.download(&self.mask)?.into_iter().map(|m| m != 0).collect())
    }
}

/// The math §8 selection from `scores`: ranks the experts by the `kind` score (descending, ties to
/// the lower id) and selects the shortest prefix whose cumulative score is `>= p`:
/// - `p = 0` selects no expert (the empty prefix already reaches it);
/// - `p` above the total score (or no token accumulated, every score 0) selects every expert.
///
/// Ranking compares the exact integer statistics, so equal scores tie exactly; the cumulative
/// test is on the exact integer numerators, `sum counts >= p T k` (token) or
/// `sum weight_sums >= p T` (gate), so p = 1 over token scores is reached exactly at the last
/// expert that received a slot, not one rounding step earlier or later. Writes `selection` (scores, mask, ids in order, count). One
/// launch; no host sync.
pub fn select(
    device: &Device,
    scores: &EsftScores,
    kind: ScoreKind,
    p: f64,
    selection: &mut EsftSelection,
) -> Result<()> {
    if !(p.is_finite() && p >= 0.0) {
        return Err(Error::InvalidArgument {
            argument: "p",
            value: p.to_string(),
            expected: "a finite cumulative score >= 0".into(),
        });
    }
    let e = scores.experts;
    if selection.mask.len() != e {
        return Err(Error::Shape {
            argument: "selection",
            expected: format!("an EsftSelection for E = {e} experts"),
            got: format!("one for {} experts", selection.mask.len()),
        });
    }
    let threads = e.next_multiple_of(32) as u32;
    let shared = e * (2 * size_of::<i64>() + size_of::<i32>());
    // Matches the kernel's parameters, in order: esft_select(counts, weight_sums, totals, E, k,
    // kind, p, scores, mask, selected, selected_count).
    let args = KernelArgs::new(device)
        .input("counts", &scores.counts)
        .input("weight_sums", &scores.weight_sums)
        .input("totals", &scores.totals)
        .scalar(e as i32)
        .scalar(scores.k as i32)
        .scalar(kind.code())
        .scalar(p)
        .output("scores", &mut selection.scores)
        .output("mask", &mut selection.mask)
        .output("selected", &mut selection.selected)
        .output("count", &mut selection.count);
    device.launch("esft_select", LaunchConfig::linear(1, threads, shared as u32), args)
}
