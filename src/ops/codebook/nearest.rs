//! Code norms and the fused nearest-code search (`codebook_norms_*`, `codebook_nearest_top*_*`,
//! `codebook_merge_top*_*`).
use super::{CodebookShape, MAX_K, THREADS};
use crate::device::{KernelArgs, LaunchConfig};
use crate::ops::DynMut;
use crate::ops::{FloatElement, check_len, check_range, elements, grid_blocks};
use crate::{Device, DeviceSlice, DeviceSliceMut, Error, Result};

/// Tokens per block of the nearest-code kernel (`CB_BM`).
const TOKEN_TILE: usize = 64;
/// Codes per column tile (`CB_BN`).
const CODE_TILE: usize = 128;
/// Floats per shared score row (`CB_SLD`).
const SCORE_ROW: usize = CODE_TILE + 1;
/// k-tile and pipeline depth of the 16-bit tile (`CbMmaTile` in codebook_nearest.cuh).
const MMA_K_TILE: usize = 32;
const MMA_STAGES: usize = 3;
/// Threads per block of the merge kernel.
const MERGE_THREADS: u32 = 128;
/// Below this many token blocks the auto split spreads the codes over more blocks.
const TARGET_BLOCKS: usize = 256;
/// The auto split gives each split at least this many column tiles.
const MIN_TILES_PER_SPLIT: usize = 4;

/// Options of [`nearest`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NearestConfig {
    /// Nearest codes per token, `1..=min(Nc, 8)`, ascending by distance (ties: lower index).
    pub k: usize,
    /// E for the `experts` output (`code mod E`): at least 1 and dividing Nc, so every expert
    /// owns the same number of codes (VQMoE: Nc = E).
    pub num_experts: usize,
    /// Blocks the codes are split over per token block, `1..=max_splits(shape)`; `None` picks
    /// from T and Nc (1 when there are enough token blocks to fill a GPU). Results do not
    /// depend on it.
    pub splits: Option<usize>,
}

impl Default for NearestConfig {
    fn default() -> Self {
        Self {
            k: 1,
            num_experts: 1,
            splits: None,
        }
    }
}

impl NearestConfig {
    pub fn validate(&self, shape: &CodebookShape) -> Result<()> {
        shape.validate()?;
        check_range("config.k", self.k, 1..=MAX_K.min(shape.codes))?;
        check_range("config.num_experts", self.num_experts, 1..=shape.codes)?;
        if shape.codes % self.num_experts != 0 {
            return Err(Error::InvalidArgument {
                argument: "config.num_experts",
                value: self.num_experts.to_string(),
                expected: format!("a divisor of the {} codes", shape.codes),
            });
        }
        if let Some(splits) = self.splits {
            check_range("config.splits", splits, 1..=column_tiles(shape))?;
        }
        elements("config.k", shape.tokens, self.k)?;
        Ok(())
    }

    /// The most splits `shape` allows: one per column tile of 128 codes.
    pub fn max_splits(shape: &CodebookShape) -> usize {
        column_tiles(shape)
    }

    /// The list length the kernels keep (`K` of the instantiated kernel).
    fn list_len(&self) -> usize {
        if self.k == 1 { 1 } else { MAX_K }
    }

    /// Column tiles per split and the number of splits that run.
    fn split_plan(&self, shape: &CodebookShape) -> (usize, usize) {
        let tiles = column_tiles(shape);
        let wanted = self.splits.unwrap_or_else(|| {
            let token_blocks = shape.tokens.div_ceil(TOKEN_TILE).max(1);
            (TARGET_BLOCKS / token_blocks).clamp(1, (tiles / MIN_TILES_PER_SPLIT).max(1))
        });
        // At least one tile per split, so an invalid shape (no codes) cannot divide by zero.
        let per_split = tiles.div_ceil(wanted.max(1)).max(1);
        (per_split, tiles.div_ceil(per_split))
    }

    /// The u32 workspace [`nearest`] needs: the splits' top-k lists, or 0 when Nc is not split;
    /// `Err` for a config or shape [`validate`](Self::validate) refuses.
    pub fn workspace_len(&self, shape: &CodebookShape) -> Result<usize> {
        self.validate(shape)?;
        let (_, splits) = self.split_plan(shape);
        if splits == 1 {
            return Ok(0);
        }
        // A (distance, index) pair per list entry.
        elements("shape.tokens", shape.tokens, splits * self.list_len() * 2)
    }

    /// Launches of one [`nearest`] call: 1, or 2 when the codes are split (T > 0).
    pub fn launches(&self, shape: &CodebookShape) -> usize {
        if shape.tokens == 0 {
            return 0;
        }
        if self.split_plan(shape).1 == 1 { 1 } else { 2 }
    }
}

/// The 16-bit path copies 16-byte chunks of rows with cp.async: d must be a multiple of 8 and
/// X and C must start 16-byte aligned (every buffer this crate allocates does).
fn check_tensor_core_rows<T: FloatElement>(
    device: &Device,
    shape: &CodebookShape,
    x: &impl DeviceSlice<T>,
    codes: &impl DeviceSlice<T>,
) -> Result<()> {
    if shape.dim % 8 != 0 {
        return Err(Error::InvalidArgument {
            argument: "shape.dim",
            value: shape.dim.to_string(),
            expected: format!(
                "a multiple of 8 for {} (16-byte rows for the tensor-core tile)",
                T::NAME
            ),
        });
    }
    for (argument, address) in [
        ("x", x.kernel_ptr(device, "x")?.0),
        ("codes", codes.kernel_ptr(device, "codes")?.0),
    ] {
        if address % 16 != 0 {
            return Err(Error::InvalidArgument {
                argument,
                value: format!("address {address:#x}"),
                expected: "a 16-byte aligned start for f16/bf16".into(),
            });
        }
    }
    Ok(())
}

fn column_tiles(shape: &CodebookShape) -> usize {
    shape.codes.div_ceil(CODE_TILE)
}

/// `norms[j] = ‖c_j‖²` (`[Nc]`, f32) for `codes` `[Nc, d]`. One launch (`shape.tokens` unused).
pub fn code_norms<T: FloatElement>(
    device: &Device,
    shape: &CodebookShape,
    codes: &impl DeviceSlice<T>,
    norms: &mut impl DeviceSliceMut<f32>,
) -> Result<()> {
    shape.validate()?;
    let (nc, d) = (shape.codes, shape.dim);
    check_len("codes", codes, shape.codebook_len()?, || {
        format!("[Nc, d] = [{nc}, {d}]")
    })?;
    check_len("norms", norms, nc, || format!("[Nc] = [{nc}]"))?;
    // SAFETY of the argument list: codebook_norms_<dt>(codes, norms, num_codes, d).
    let args = KernelArgs::new(device)
        .input("codes", codes)
        .output("norms", norms)
        .scalar(nc as i32)
        .scalar(d as i32);
    let blocks = grid_blocks("shape.codes", nc, THREADS as usize / 32)?;
    device.launch(
        &format!("codebook_norms_{}", T::NAME),
        LaunchConfig::linear(blocks, THREADS, 0),
        args,
    )
}

/// Where [`nearest`] writes, `[T, k]` unless said: `ids` (i32) always; when given, `distances`
/// (f32, `‖x − c‖²` = score + `‖x‖²`, clamped at 0), `experts` (i32, `id mod E`), `weights`
/// (f32 routing weights: 1, the hard VQ route) and `nonfinite_rows` (`[1]` u32, caller-zeroed).
///
/// **Non-finite rows.** A row whose nearest distance is not finite (x holds a NaN or an
/// infinity, or `‖x‖²` overflows f32) is routed nowhere, as [`router::select`] routes a
/// non-finite row of logits: ids and experts [`NO_EXPERT`], distances and weights NaN (so the
/// combine makes its output row NaN), and it is added to `nonfinite_rows`. The VQ ops that take
/// ids leave such a row out of every loss, mean and code gradient.
///
/// [`router::select`]: crate::ops::router::select
/// [`NO_EXPERT`]: crate::ops::router::NO_EXPERT
pub struct NearestOutputs<'a> {
    pub ids: &'a mut dyn DeviceSliceMut<i32>,
    pub distances: Option<&'a mut dyn DeviceSliceMut<f32>>,
    pub experts: Option<&'a mut dyn DeviceSliceMut<i32>>,
    pub weights: Option<&'a mut dyn DeviceSliceMut<f32>>,
    pub nonfinite_rows: Option<&'a mut dyn DeviceSliceMut<u32>>,
}

/// The k nearest codes of every row of `x` (`[T, d]`) in `codes` (`[Nc, d]`, with `norms` from
/// [`code_norms`]), into `out`. `workspace`: `config.workspace_len(shape)` u32 (may be empty).
/// Launches: `config.launches(shape)` (1, or 2 when the codes are split); no host sync.
#[allow(clippy::too_many_arguments)]
pub fn nearest<T: FloatElement>(
    device: &Device,
    shape: &CodebookShape,
    config: &NearestConfig,
    x: &impl DeviceSlice<T>,
    codes: &impl DeviceSlice<T>,
    norms: &impl DeviceSlice<f32>,
    out: NearestOutputs<'_>,
    workspace: &mut impl DeviceSliceMut<u32>,
) -> Result<()> {
    config.validate(shape)?;
    let (t, d, nc, k) = (shape.tokens, shape.dim, shape.codes, config.k);
    check_len("x", x, shape.x_len()?, || format!("[T, d] = [{t}, {d}]"))?;
    check_len("codes", codes, shape.codebook_len()?, || {
        format!("[Nc, d] = [{nc}, {d}]")
    })?;
    check_len("norms", norms, nc, || format!("[Nc] = [{nc}]"))?;
    if size_of::<T>() == 2 {
        check_tensor_core_rows(device, shape, x, codes)?;
    }
    let mut ids = DynMut(out.ids);
    let mut distances = out.distances.map(DynMut);
    let mut experts = out.experts.map(DynMut);
    let mut weights = out.weights.map(DynMut);
    let mut nonfinite_rows = out.nonfinite_rows.map(DynMut);
    let per_slot = || format!("[T, k] = [{t}, {k}]");
    check_len("ids", &ids, t * k, per_slot)?;
    if let Some(buffer) = &distances {
        check_len("distances", buffer, t * k, per_slot)?;
    }
    if let Some(buffer) = &experts {
        check_len("experts", buffer, t * k, per_slot)?;
    }
    if let Some(buffer) = &weights {
        check_len("weights", buffer, t * k, per_slot)?;
    }
    if let Some(buffer) = &nonfinite_rows {
        check_len("nonfinite_rows", buffer, 1, || "[1]".into())?;
    }
    check_len("workspace", workspace, config.workspace_len(shape)?, || {
        "[config.workspace_len(shape)]".into()
    })?;
    if t == 0 {
        return Ok(());
    }
    let (per_split, splits) = config.split_plan(shape);
    let list = config.list_len();
    // The score tile reuses the k-tile staging (f32: X and code k-tiles [16][64 + 128]; 16-bit:
    // per stage X [64][32 + 8] and codes [128][32 + 8] halves).
    let staging = if size_of::<T>() == 4 {
        16 * (TOKEN_TILE + CODE_TILE) * 4
    } else {
        MMA_STAGES * (TOKEN_TILE + CODE_TILE) * (MMA_K_TILE + 8) * 2
    };
    let shared = (TOKEN_TILE * SCORE_ROW * 4).max(staging);
    let launch = LaunchConfig {
        grid: (grid_blocks("shape.tokens", t, TOKEN_TILE)?, splits as u32, 1),
        block: (THREADS, 1, 1),
        shared_bytes: shared as u32,
    };
    // SAFETY of the argument list: NEAREST_PARAMS in codebook.cu (x, codes, norms, ids,
    // distances, experts, weights, nonfinite_rows, partial, tokens, d, num_codes, k,
    // num_experts, tiles_per_split);
    // lengths checked above; partial is null exactly when there is one split.
    let args = KernelArgs::new(device)
        .input("x", x)
        .input("codes", codes)
        .input("norms", norms);
    let args = if splits == 1 {
        args.output("ids", &mut ids)
            .output_or_null("distances", distances.as_mut())
            .output_or_null("experts", experts.as_mut())
            .output_or_null("weights", weights.as_mut())
            .output_or_null("nonfinite_rows", nonfinite_rows.as_mut())
            .scalar(0u64)
    } else {
        (0..5)
            .fold(args, |args, _| args.scalar(0u64))
            .output("workspace", workspace)
    };
    let args = args
        .scalar(t as i64)
        .scalar(d as i32)
        .scalar(nc as i32)
        .scalar(k as i32)
        .scalar(config.num_experts as i32)
        .scalar(per_split as i32);
    device.launch(&format!("codebook_nearest_top{list}_{}", T::NAME), launch, args)?;
    if splits == 1 {
        return Ok(());
    }
    // SAFETY of the argument list: MERGE_PARAMS in codebook.cu (x, partial, ids, distances,
    // experts, weights, nonfinite_rows, tokens, d, k, num_experts, splits).
    let args = KernelArgs::new(device)
        .input("x", x)
        .input("workspace", workspace)
        .output("ids", &mut ids)
        .output_or_null("distances", distances.as_mut())
        .output_or_null("experts", experts.as_mut())
        .output_or_null("weights", weights.as_mut())
        .output_or_null("nonfinite_rows", nonfinite_rows.as_mut())
        .scalar(t as i64)
        .scalar(d as i32)
        .scalar(k as i32)
        .scalar(config.num_experts as i32)
        .scalar(splits as i32);
    // Four threads per row (`codebook_merge_top*`).
    let blocks = grid_blocks("shape.tokens", t, MERGE_THREADS as usize / 4)?;
    device.launch(
        &format!("codebook_merge_top{list}_{}", T::NAME),
        LaunchConfig::linear(blocks, MERGE_THREADS, 0),
        args,
    )
}
