//! Training-side ops: quantize (gather + straight-through mix), the VQ losses and their
//! gradients, the token order by code, and the EMA codebook update.
//!
//! **Gradients of the straight-through mix.** `x̃ = x + c·sg(q − x)`: the value is
//! `(1 − c)·x + c·q`, the gradient is the identity to x (`dx = dx̃`) and nothing flows to C
//! through x̃; C learns from the codebook loss ([`losses_backward`]) or the EMA update
//! ([`ema_update`]). [`losses_backward`] adds `dx̃` to the commitment gradient in the same pass.
use super::{CodebookShape, THREADS};
use crate::device::{KernelArgs, LaunchConfig};
use crate::ops::dispatch::{MapConfig, RoutingMap, routing_map};
use crate::ops::{Dyn, DynMut};
use crate::ops::{FloatElement, check_len, grid_blocks};
use crate::{Device, DeviceBuffer, DeviceSlice, DeviceSliceMut, Error, Result};

/// Blocks of the grid-stride row kernels (quantize, loss partials, loss backward): enough to fill
/// a GPU, few enough that the loss's block sums stay small. Part of the loss's summation order.
const MAX_ROW_BLOCKS: usize = 1024;
/// Bytes of dynamic shared memory of a `block_sum` (one float per warp).
const BLOCK_SUM_SHARED: u32 = THREADS / 32 * 4;
/// The most buckets one counting-sort pass of dispatch handles (its `MAX_EXPERTS`).
const MAX_PASS_BUCKETS: usize = crate::ops::dispatch::MAX_EXPERTS;
/// Bits of the low digit when the codes need two passes.
const LOW_DIGIT_BITS: u32 = 8;

fn finite(argument: &'static str, value: f32, range: std::ops::RangeInclusive<f32>) -> Result<()> {
    if value.is_finite() && range.contains(&value) {
        return Ok(());
    }
    Err(Error::InvalidArgument {
        argument,
        value: value.to_string(),
        expected: format!("a finite value in {}..={}", range.start(), range.end()),
    })
}

/// Blocks of a grid-stride row kernel over `[T, d]` of `T` (runs of 16 bytes per thread).
fn row_blocks<T: FloatElement>(shape: &CodebookShape) -> usize {
    // Saturating: the clamp below caps the count anyway.
    let runs = shape.tokens.saturating_mul(shape.dim.div_ceil(16 / size_of::<T>()));
    runs.div_ceil(THREADS as usize).clamp(1, MAX_ROW_BLOCKS)
}

/// Checks x `[T, d]`, codes `[Nc, d]` and ids `[T]`.
fn check_rows<T: FloatElement>(
    shape: &CodebookShape,
    x: &impl DeviceSlice<T>,
    codes: &impl DeviceSlice<T>,
    ids: &impl DeviceSlice<i32>,
) -> Result<()> {
    shape.validate()?;
    let (t, d, nc) = (shape.tokens, shape.dim, shape.codes);
    check_len("x", x, shape.x_len()?, || format!("[T, d] = [{t}, {d}]"))?;
    check_len("codes", codes, shape.codebook_len()?, || {
        format!("[Nc, d] = [{nc}, {d}]")
    })?;
    check_len("ids", ids, t, || format!("[T] = [{t}]"))
}

/// `q = C[ids]` and the straight-through mix `x̃ = x + c·(q − x)` (`mix_coefficient` c in
/// [0, 1]; 1 is the classic VQ-VAE estimator), each `[T, d]` and written only when given (at
/// least one). `ids`: `[T]`, e.g. [`nearest`](super::nearest) with k = 1. One launch.
#[allow(clippy::too_many_arguments)]
pub fn quantize<'a, T: FloatElement>(
    device: &Device,
    shape: &CodebookShape,
    x: &impl DeviceSlice<T>,
    codes: &impl DeviceSlice<T>,
    ids: &impl DeviceSlice<i32>,
    mix_coefficient: f32,
    q: Option<&'a mut dyn DeviceSliceMut<T>>,
    mix: Option<&'a mut dyn DeviceSliceMut<T>>,
) -> Result<()> {
    check_rows(shape, x, codes, ids)?;
    finite("mix_coefficient", mix_coefficient, 0.0..=1.0)?;
    let (t, d) = (shape.tokens, shape.dim);
    let mut q = q.map(DynMut);
    let mut mix = mix.map(DynMut);
    if q.is_none() && mix.is_none() {
        return Err(Error::InvalidArgument {
            argument: "q",
            value: "None".into(),
            expected: "q or mix (or both)".into(),
        });
    }
    for (name, buffer) in [("q", &q), ("mix", &mix)] {
        if let Some(b) = buffer {
            check_len(name, b, shape.x_len()?, || format!("[T, d] = [{t}, {d}]"))?;
        }
    }
    if t == 0 {
        return Ok(());
    }
    // SAFETY of the argument list: codebook_quantize_<dt>(x, codes, ids, q, mix, tokens, d,
    // num_codes, c); every length checked above.
    let args = KernelArgs::new(device)
        .input("x", x)
        .input("codes", codes)
        .input("ids", ids)
        .output_or_null("q", q.as_mut())
        .output_or_null("mix", mix.as_mut())
        .scalar(t as i64)
        .scalar(d as i32)
        .scalar(shape.codes as i32)
        .scalar(mix_coefficient);
    let blocks = row_blocks::<T>(shape) as u32;
    device.launch(
        &format!("codebook_quantize_{}", T::NAME),
        LaunchConfig::linear(blocks, THREADS, 0),
        args,
    )
}

/// Options of the VQ losses.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LossConfig {
    /// β of the commitment loss (0.25 in VQ-VAE).
    pub beta: f32,
}

impl Default for LossConfig {
    fn default() -> Self {
        Self { beta: 0.25 }
    }
}

impl LossConfig {
    pub fn validate(&self) -> Result<()> {
        finite("config.beta", self.beta, 0.0..=f32::MAX)
    }
}

/// The f32 workspace of [`losses`]: one partial sum per block of its first kernel.
pub fn losses_workspace_len<T: FloatElement>(shape: &CodebookShape) -> usize {
    row_blocks::<T>(shape)
}

/// `losses[0]` = codebook loss `mean ‖sg(x) − q‖²`, `losses[1]` = commitment loss
/// `β·mean ‖x − sg(q)‖²` (means over the T'·d elements of the T' tokens with an id in
/// `[0, Nc)`, q = C\[ids\]: a token routed nowhere adds nothing and is not counted); f32, summed
/// in a fixed order (per-block sums, then one block). Launches: 2; no host sync. T' = 0 gives
/// NaN (an empty mean).
#[allow(clippy::too_many_arguments)]
pub fn losses<T: FloatElement>(
    device: &Device,
    shape: &CodebookShape,
    config: &LossConfig,
    x: &impl DeviceSlice<T>,
    codes: &impl DeviceSlice<T>,
    ids: &impl DeviceSlice<i32>,
    losses: &mut impl DeviceSliceMut<f32>,
    workspace: &mut impl DeviceSliceMut<f32>,
) -> Result<()> {
    check_rows(shape, x, codes, ids)?;
    config.validate()?;
    check_len("losses", losses, 2, || "[2]".into())?;
    let blocks = losses_workspace_len::<T>(shape);
    check_len("workspace", workspace, blocks, || {
        "[losses_workspace_len(shape)]".into()
    })?;
    // SAFETY of the argument list: codebook_loss_partial_<dt>(x, codes, ids, partial, tokens,
    // d, num_codes).
    let args = KernelArgs::new(device)
        .input("x", x)
        .input("codes", codes)
        .input("ids", ids)
        .output("workspace", workspace)
        .scalar(shape.tokens as i64)
        .scalar(shape.dim as i32)
        .scalar(shape.codes as i32);
    device.launch(
        &format!("codebook_loss_partial_{}", T::NAME),
        LaunchConfig::linear(blocks as u32, THREADS, BLOCK_SUM_SHARED),
        args,
    )?;
    // SAFETY of the argument list: codebook_loss_final(partial, ids, losses, blocks, tokens, d,
    // num_codes, beta).
    let args = KernelArgs::new(device)
        .input("workspace", workspace)
        .input("ids", ids)
        .output("losses", losses)
        .scalar(blocks as i32)
        .scalar(shape.tokens as i64)
        .scalar(shape.dim as i32)
        .scalar(shape.codes as i32)
        .scalar(config.beta);
    device.launch(
        "codebook_loss_final",
        LaunchConfig::linear(1, THREADS, BLOCK_SUM_SHARED),
        args,
    )
}

/// One pass of the radix sort by code: dispatch's stable counting sort over a digit.
struct SortPass {
    config: MapConfig,
    map: RoutingMap<DeviceBuffer<i32>>,
    workspace: DeviceBuffer<i32>,
    shift: i32,
}

/// Tokens grouped by code, stably (tokens ascending within a code), on the device:
/// `rows[offsets[j] .. offsets[j+1])` are the tokens whose id is j; `offsets[Nc]` counts the
/// valid ids; `rows` past it hold -1. Built by [`code_order`] with an LSD radix sort whose
/// passes are dispatch's stable counting sort ([`routing_map`], k = 1): one pass over the
/// code when Nc <= 1024, else two (the low 8 bits, then the rest). Launches per pass: a key
/// kernel + routing_map's (1 when T <= 4096, else 2 and a memset); then 1 to assemble
/// ([`CodeOrder::launches`]: 3 to 7).
pub struct CodeOrder {
    tokens: usize,
    codes: usize,
    /// `[T]`: the token at each sorted position.
    pub rows: DeviceBuffer<i32>,
    /// `[Nc + 1]`: where each code's tokens start in `rows`.
    pub offsets: DeviceBuffer<i32>,
    keys: DeviceBuffer<i32>,
    passes: Vec<SortPass>,
}

impl CodeOrder {
    /// Buffers for sorting `tokens` ids over `codes` codes (both validated like
    /// [`CodebookShape`]).
    pub fn alloc(device: &Device, tokens: usize, codes: usize) -> Result<Self> {
        CodebookShape { tokens, dim: 1, codes }.validate()?;
        let digits: Vec<(usize, i32)> = if codes <= MAX_PASS_BUCKETS {
            vec![(codes, 0)]
        } else {
            vec![
                (1 << LOW_DIGIT_BITS, 0),
                (codes.div_ceil(1 << LOW_DIGIT_BITS), LOW_DIGIT_BITS as i32),
            ]
        };
        let passes = digits
            .into_iter()
            .map(|(radix, shift)| {
                let config = MapConfig::new(radix);
                Ok(SortPass {
                    map: RoutingMap::alloc(device, tokens, 1, &config)?,
                    workspace: device.alloc_zeros(config.workspace_len(tokens, 1)?)?,
                    config,
                    shift,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            tokens,
            codes,
            rows: device.alloc_zeros(tokens)?,
            offsets: device.alloc_zeros(codes + 1)?,
            keys: device.alloc_zeros(tokens)?,
            passes,
        })
    }

    /// Launches of one [`code_order`] call: per radix pass a key kernel and routing_map's
    /// launches, then the assembly (0 for T = 0: a memset).
    pub fn launches(&self) -> usize {
        if self.tokens == 0 {
            return 0;
        }
        let map_launches = |p: &SortPass| {
            if p.config.tile_slots(self.tokens, 1).is_some() {
                2
            } else {
                1
            }
        };
        self.passes.iter().map(|p| 1 + map_launches(p)).sum::<usize>() + 1
    }

    /// (T, Nc) this order was allocated for.
    pub fn dims(&self) -> (usize, usize) {
        (self.tokens, self.codes)
    }

    fn check(&self, shape: &CodebookShape) -> Result<()> {
        if self.dims() == (shape.tokens, shape.codes) {
            return Ok(());
        }
        Err(Error::Shape {
            argument: "order",
            expected: format!("a CodeOrder for T = {}, Nc = {}", shape.tokens, shape.codes),
            got: format!("one for T = {}, Nc = {}", self.tokens, self.codes),
        })
    }
}

/// Sorts the tokens of `ids` (`[T]`, i32) by code into `order` (see [`CodeOrder`]); ids outside
/// `[0, Nc)` are left out. No host sync.
pub fn code_order(device: &Device, ids: &impl DeviceSlice<i32>, order: &mut CodeOrder) -> Result<()> {
    let (t, nc) = order.dims();
    check_len("ids", ids, t, || format!("[T] = [{t}]"))?;
    if t == 0 {
        return device.fill_zeros(&mut order.offsets);
    }
    let blocks = grid_blocks("ids", t, THREADS as usize)?;
    for p in 0..order.passes.len() {
        let (done, rest) = order.passes.split_at_mut(p);
        let pass = &mut rest[0];
        // SAFETY of the argument list: codebook_sort_keys(ids, src_rows, keys, n, shift, radix,
        // num_codes); src_rows is the previous pass's order ([T]) or null.
        let args = KernelArgs::new(device)
            .input("ids", ids)
            .input_or_null("order", done.last().map(|prev| &prev.map.sorted_rows))
            .output("order", &mut order.keys)
            .scalar(t as i32)
            .scalar(pass.shift)
            .scalar(pass.config.num_experts as i32)
            .scalar(nc as i32);
        device.launch("codebook_sort_keys", LaunchConfig::linear(blocks, THREADS, 0), args)?;
        routing_map(
            device,
            &order.keys,
            t,
            1,
            &pass.config,
            &mut pass.map,
            &mut pass.workspace,
        )?;
    }
    let first = &order.passes[0].map.sorted_rows;
    let second = order.passes.get(1).map(|p| &p.map.sorted_rows);
    // SAFETY of the argument list: codebook_segments(ids, first, second, rows, offsets, tokens,
    // num_codes); rows [T], offsets [Nc + 1] allocated with the order.
    let args = KernelArgs::new(device)
        .input("ids", ids)
        .input("order", first)
        .input_or_null("order", second)
        .output("order", &mut order.rows)
        .output("order", &mut order.offsets)
        .scalar(t as i32)
        .scalar(nc as i32);
    let blocks = grid_blocks("ids", t + 1, THREADS as usize)?;
    device.launch("codebook_segments", LaunchConfig::linear(blocks, THREADS, 0), args)
}

/// The grid of the per-code kernels: one block row per code, blocks of 256 16-byte runs.
fn per_code_launch<T: FloatElement>(shape: &CodebookShape) -> LaunchConfig {
    let runs = shape.dim.div_ceil(16 / size_of::<T>());
    LaunchConfig {
        grid: (shape.codes as u32, runs.div_ceil(THREADS as usize) as u32, 1),
        block: (THREADS, 1, 1),
        shared_bytes: 0,
    }
}

/// Gradients of `losses[0] + losses[1]` (each loss with upstream gradient 1), with T' the
/// tokens with an id in `[0, Nc)` (`order`'s count, read on the device):
/// - `dx = dmix + β·(2/(T'·d))·(x − q)` (`[T, d]`, X's dtype): the commitment gradient plus, when
///   given, the straight-through gradient `dmix` of the mix (identity to x); a token without a
///   code gets `dmix` alone;
/// - `dcodes_j = (2/(T'·d)) Σ_{t: id_t = j} (c_j − x_t)` (`[Nc, d]`, f32), summed over the
///   code's tokens in ascending order (`order` from [`code_order`] of the same ids): no atomics.
///
/// Launches: 2; no host sync.
#[allow(clippy::too_many_arguments)]
pub fn losses_backward<T: FloatElement>(
    device: &Device,
    shape: &CodebookShape,
    config: &LossConfig,
    x: &impl DeviceSlice<T>,
    codes: &impl DeviceSlice<T>,
    ids: &impl DeviceSlice<i32>,
    order: &CodeOrder,
    dmix: Option<&dyn DeviceSlice<T>>,
    dx: &mut impl DeviceSliceMut<T>,
    dcodes: &mut impl DeviceSliceMut<f32>,
) -> Result<()> {
    check_rows(shape, x, codes, ids)?;
    config.validate()?;
    order.check(shape)?;
    let (t, d, nc) = (shape.tokens, shape.dim, shape.codes);
    let dmix = dmix.map(Dyn);
    if let Some(b) = &dmix {
        check_len("dmix", b, shape.x_len()?, || format!("[T, d] = [{t}, {d}]"))?;
    }
    check_len("dx", dx, shape.x_len()?, || format!("[T, d] = [{t}, {d}]"))?;
    check_len("dcodes", dcodes, shape.codebook_len()?, || {
        format!("[Nc, d] = [{nc}, {d}]")
    })?;
    if t > 0 {
        // SAFETY of the argument list: codebook_loss_bwd_<dt>(x, codes, ids, offsets, dmix, dx,
        // tokens, d, num_codes, beta).
        let args = KernelArgs::new(device)
            .input("x", x)
            .input("codes", codes)
            .input("ids", ids)
            .input("order", &order.offsets)
            .input_or_null("dmix", dmix.as_ref())
            .output("dx", dx)
            .scalar(t as i64)
            .scalar(d as i32)
            .scalar(nc as i32)
            .scalar(config.beta);
        device.launch(
            &format!("codebook_loss_bwd_{}", T::NAME),
            LaunchConfig::linear(row_blocks::<T>(shape) as u32, THREADS, 0),
            args,
        )?;
    }
    // SAFETY of the argument list: codebook_code_grad_<dt>(x, codes, rows, offsets, dcodes, d);
    // rows/offsets of a CodeOrder for (T, Nc), checked above.
    let args = KernelArgs::new(device)
        .input("x", x)
        .input("codes", codes)
        .input("order", &order.rows)
        .input("order", &order.offsets)
        .output("dcodes", dcodes)
        .scalar(d as i32);
    device.launch(
        &format!("codebook_code_grad_{}", T::NAME),
        per_code_launch::<T>(shape),
        args,
    )
}

/// Options of [`ema_update`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EmaConfig {
    /// γ in [0, 1).
    pub decay: f32,
    /// Laplace smoothing ε > 0.
    pub eps: f32,
    /// A code whose EMA count `N_j` (after the update) is below this is reported dead.
    pub dead_threshold: f32,
}

impl Default for EmaConfig {
    fn default() -> Self {
        Self {
            decay: 0.99,
            eps: 1e-5,
            dead_threshold: 1e-3,
        }
    }
}

impl EmaConfig {
    pub fn validate(&self) -> Result<()> {
        finite("config.decay", self.decay, 0.0..=1.0)?;
        if self.decay == 1.0 {
            return Err(Error::InvalidArgument {
                argument: "config.decay",
                value: "1".into(),
                expected: "a decay below 1 (1 would never learn)".into(),
            });
        }
        finite("config.eps", self.eps, f32::MIN_POSITIVE..=f32::MAX)?;
        finite("config.dead_threshold", self.dead_threshold, 0.0..=f32::MAX)
    }
}

/// The EMA state and outputs of [`ema_update`], all on the device.
pub struct EmaState<'a> {
    /// `N` `[Nc]` f32, updated in place.
    pub counts: &'a mut dyn DeviceSliceMut<f32>,
    /// `M` `[Nc, d]` f32, updated in place.
    pub sums: &'a mut dyn DeviceSliceMut<f32>,
    /// `[Nc]` u8, written: 1 where `N_j < dead_threshold`.
    pub dead: &'a mut dyn DeviceSliceMut<u8>,
    /// `[1]` f32, written: `ΣN` after the update.
    pub total: &'a mut dyn DeviceSliceMut<f32>,
}

/// One EMA codebook step (math §6) for the tokens in `order` ([`code_order`] of this step's ids)
/// with rows `x`: `n_j`, `m_j` = count and sum of the code's tokens (in token order);
/// `N ← γN + (1−γ)n`, `M ← γM + (1−γ)m`; `codes_j = M_j / N̂_j` with
/// `N̂_j = (N_j + ε)/(ΣN + Nc·ε)·ΣN` (written in X's dtype, in place); dead codes and `ΣN`
/// (summed in a fixed order on the device). Needs `ΣN > 0` after the update (true whenever a
/// valid id exists or N was positive). Launches: 2; no host sync.
pub fn ema_update<T: FloatElement>(
    device: &Device,
    shape: &CodebookShape,
    config: &EmaConfig,
    x: &impl DeviceSlice<T>,
    order: &CodeOrder,
    state: EmaState<'_>,
    codes: &mut impl DeviceSliceMut<T>,
) -> Result<()> {
    shape.validate()?;
    config.validate()?;
    order.check(shape)?;
    let (t, d, nc) = (shape.tokens, shape.dim, shape.codes);
    check_len("x", x, shape.x_len()?, || format!("[T, d] = [{t}, {d}]"))?;
    check_len("codes", codes, shape.codebook_len()?, || {
        format!("[Nc, d] = [{nc}, {d}]")
    })?;
    let mut counts = DynMut(state.counts);
    let mut sums = DynMut(state.sums);
    let mut dead = DynMut(state.dead);
    let mut total = DynMut(state.total);
    check_len("state.counts", &counts, nc, || format!("[Nc] = [{nc}]"))?;
    check_len("state.sums", &sums, shape.codebook_len()?, || {
        format!("[Nc, d] = [{nc}, {d}]")
    })?;
    check_len("state.dead", &dead, nc, || format!("[Nc] = [{nc}]"))?;
    check_len("state.total", &total, 1, || "[1]".into())?;
    // SAFETY of the argument list: codebook_ema_counts(offsets, counts, dead, total, num_codes,
    // decay, threshold).
    let args = KernelArgs::new(device)
        .input("order", &order.offsets)
        .output("state.counts", &mut counts)
        .output("state.dead", &mut dead)
        .output("state.total", &mut total)
        .scalar(nc as i32)
        .scalar(config.decay)
        .scalar(config.dead_threshold);
    device.launch(
        "codebook_ema_counts",
        LaunchConfig::linear(1, THREADS, BLOCK_SUM_SHARED),
        args,
    )?;
    // SAFETY of the argument list: codebook_ema_codes_<dt>(x, rows, offsets, counts, total, sums,
    // codes, num_codes, d, decay, eps).
    let args = KernelArgs::new(device)
        .input("x", x)
        .input("order", &order.rows)
        .input("order", &order.offsets)
        .input("state.counts", &counts)
        .input("state.total", &total)
        .output("state.sums", &mut sums)
        .output("codes", codes)
        .scalar(nc as i32)
        .scalar(d as i32)
        .scalar(config.decay)
        .scalar(config.eps);
    device.launch(
        &format!("codebook_ema_codes_{}", T::NAME),
        per_code_launch::<T>(shape),
        args,
    )
}
