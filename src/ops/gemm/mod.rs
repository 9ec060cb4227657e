//! The grouped expert GEMM (math §5, `kernels/grouped_gemm.cu`): per expert e with rows
//! `[offsets[e], offsets[e+1])` of the grouped matrix,
//!
//! - [`forward`]: `C_e = A_e · B_e^T`, with the SwiGLU epilogue for `W1` and per-row combine weights;
//! - [`dgrad`]: `dA_e = dC_e · B_e`, optionally with the SwiGLU backward fused into its epilogue;
//! - [`wgrad`]: `dB_e = dC_e^T · A_e` in f32, for the experts of an [`ExpertMask`] only, replacing
//!   or accumulated into an existing gradient, or ([`WgradWrite::Sparse`]) computed and written
//!   only for the experts that got rows, which it records on the device ([`zero_unwritten`]
//!   makes such a gradient dense).
//!
//! Layouts (row-major): `B` is `[E, N, K]` (nn.Linear: `[E, out, in]`); the grouped matrices
//! (`C`, `dC`, `dA`, contiguous `A`) have [`Groups::rows`] rows, dispatch's
//! `MapConfig::sorted_rows_len`. Group sizes are read from device memory (`offsets`, i32
//! `[E + 1]`, dispatch's routing map); a group may be empty. **Gathered A**
//! ([`ARows::Gathered`]): row r of `A_e` is `X[sorted_rows[r] / top_k]` read straight from token
//! order (`X: [T, K]`), no permuted copy; a `-1` (padding) row reads as zeros and its output row
//! is still written (zeros for the plain store). Rows outside every group are not touched.
//!
//! **SwiGLU** (`W1: [E, 2h, d]`, gate rows `[0, h)`, up rows `[h, 2h)`, as in math §5 and nn.Linear
//! stacking): one CTA computes matching gate and up tiles and writes `H = silu(G) ⊙ U`
//! (`[rows, h]`), and, when asked, `GU = [G | U]` (`[rows, 2h]`, the dtype of A) for the backward.
//! **Row weights**: each output row r is multiplied by `weights[sorted_rows[r]]` (the combine
//! weight of its slot; 0 for a padding row), for GEMM2's output (SwiGLU: G and U are scaled).
//!
//! Paths: f16/bf16 on tensor cores (mma.sync m16n8k16, ldmatrix, 3-stage cp.async, 128x128x32
//! tiles of 8 warps; K and N multiples of 8, see **Alignment** below), f32 on 64x64 FMA tiles (any shape). When every
//! group has at most [`DECODE_MAX_ROWS`] rows (a host-known bound, [`Groups::max_group_rows`]),
//! the forward and dgrad take the decode kernels instead ([`GemmPath::Decode`], [`decode_plan`]):
//! each active expert's B streamed once through per-warp 16-byte `cp.async` rings, the
//! reduction split inside the block (summed in a fixed order) when few experts have rows.
//! [`GemmPath::Hopper`] runs the forward, dgrad and wgrad ([`wgrad_on_path`]) as persistent,
//! warp-specialised sm_90a kernels (wgmma fed by TMA and `cp.async` through a 4-stage mbarrier
//! ring; sm_90 GPUs and the emulator, f16/bf16 under the tiles' alignment); `Auto` does not
//! pick it yet. Every op is **one
//! launch** (none when `rows` is 0 for `forward` and `dgrad`, or the mask is empty for `wgrad`)
//! and never waits for the device. All sums run in a fixed order: results are bitwise
//! reproducible.
//!
//! **Alignment** (operands may be views, e.g. cudarc `CudaView`s, at any element; decided on
//! the host from the pointers, before anything launches): the f16/bf16 tensor-core tiles
//! stream their operands with 16-byte `cp.async` (forward `a` and `b`, dgrad `dc` and `b`,
//! wgrad `dc` and `a`), so those must start 16-byte aligned and N, K must be multiples of 8.
//! Otherwise the forward runs the decode kernel instead (any shape and alignment: right, but
//! slow for big groups; [`GemmPath::Tiled`] makes it an `Err`), and dgrad and wgrad return an
//! `Err` naming the operand (`a`, `b`, `dc`) or `shape.n` / `shape.k`. f32 takes any start and
//! any shape (16-byte loads only where every row is aligned). Outputs (`out`, `gu`, dA, dGU,
//! dB), the forward's saved `gu` and `row_weights` may start at any element in every dtype:
//! the epilogue stores two columns at once only at an address aligned for the pair.
mod backward;
mod decode;
mod forward;
mod hopper;

pub use backward::{
    DgradConfig, DgradEpilogue, ExpertMask, MAX_WGRAD_CALL, WgradWrite, dgrad, wgrad, wgrad_on_path, zero_unwritten,
};
pub use decode::{DECODE_TARGET_BLOCKS, DecodePlan, decode_plan};
pub use forward::{Epilogue, ForwardConfig, GemmPath, forward, forward_out_len};

use super::{FloatElement, check_len, check_range, elements};
use crate::{Device, DeviceSlice, Error, Result};

/// The forward picks the decode kernel when no group can exceed this many rows.
pub const DECODE_MAX_ROWS: usize = 32;
/// Rows per tile of the tensor-core and FMA kernels (`GemmTile::BM`, `FmaRowsTile::BM`).
const MMA_TILE: usize = 128;
const FMA_TILE: usize = 64;
/// Threads of the tile kernels.
const TILE_THREADS: u32 = 256;
/// Epilogue modes (`EpilogueMode` in gemm_group.cuh).
const EPI_STORE: i32 = 0;
const EPI_SWIGLU: i32 = 1;
const EPI_SWIGLU_BWD: i32 = 2;

/// The sizes of a grouped GEMM: E experts, each `B_e` of `n` rows by `k`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GemmShape {
    pub experts: usize,
    /// N: rows of each `B_e` (output columns of the forward; `2h` for SwiGLU).
    pub n: usize,
    /// K: the forward's reduction length (columns of A and B).
    pub k: usize,
}

impl GemmShape {
    /// Elements of `B`: `E·N·K`.
    pub fn weight_len(&self) -> Result<usize> {
        elements("b", elements("b", self.experts, self.n)?, self.k)
    }

    fn validate(&self) -> Result<()> {
        check_range("shape.experts", self.experts, 1..=crate::ops::dispatch::MAX_EXPERTS)?;
        check_range("shape.n", self.n, 1..=i32::MAX as usize)?;
        check_range("shape.k", self.k, 1..=i32::MAX as usize)?;
        Ok(())
    }

    /// What the f16/bf16 tensor-core tiles need of the sizes: N and K multiples of 8, so every
    /// row of a 16-byte aligned operand starts 16-byte aligned (f32 tiles take any shape).
    fn check_tile_sizes<T: FloatElement>(&self) -> Result<()> {
        if T::NAME != "f32" {
            for (argument, value) in [("shape.n", self.n), ("shape.k", self.k)] {
                if value % 8 != 0 {
                    return Err(Error::InvalidArgument {
                        argument,
                        value: value.to_string(),
                        expected: format!("a multiple of 8 on the {} tensor-core path (16-byte rows)", T::NAME),
                    });
                }
            }
        }
        Ok(())
    }
}

/// How rows of the grouped operand A are read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ARows {
    /// A is the grouped matrix itself, `[rows, K]`.
    #[default]
    Contiguous,
    /// A is `X: [T, K]` in token order; row r is `X[sorted_rows[r] / top_k]`, -1 a zero row.
    Gathered { top_k: usize },
}

/// The groups, as dispatch's routing map holds them (all i32, on the device).
pub struct Groups<'a, I> {
    /// `[E + 1]`: group e is rows `[offsets[e], offsets[e+1])` (clamped to `[0, rows)` on the device).
    pub offsets: &'a I,
    /// `[rows]`: the source slot of each row, -1 for padding. Needed to gather A and for row weights.
    pub sorted_rows: Option<&'a I>,
    /// Rows of the grouped matrix (`MapConfig::sorted_rows_len`).
    pub rows: usize,
    /// A bound the host knows on any group's row count (e.g. T when every token picks an
    /// expert at most once); it picks the decode path. `rows` is always a valid bound.
    pub max_group_rows: usize,
}

impl<I: DeviceSlice<i32>> Groups<'_, I> {
    fn validate(&self, shape: &GemmShape) -> Result<()> {
        check_range("groups.rows", self.rows, 0..=i32::MAX as usize)?;
        check_len("groups.offsets", self.offsets, shape.experts + 1, || "[E + 1]".into())?;
        if let Some(sorted) = self.sorted_rows {
            check_len("groups.sorted_rows", sorted, self.rows, || "[rows]".into())?;
        }
        Ok(())
    }

    fn sorted_rows(&self, why: &str) -> Result<&I> {
        self.sorted_rows.ok_or_else(|| Error::InvalidArgument {
            argument: "groups.sorted_rows",
            value: "None".into(),
            expected: format!("the routing map's sorted_rows ({why})"),
        })
    }
}

/// Rows of the A operand and the number of slots its gather reads (`T·k`), checking `a`'s length.
fn check_a_rows<T: FloatElement, I: DeviceSlice<i32>>(
    a: &impl DeviceSlice<T>,
    mode: ARows,
    shape: &GemmShape,
    groups: &Groups<'_, I>,
) -> Result<(usize, usize)> {
    match mode {
        ARows::Contiguous => {
            check_len("a", a, elements("a", groups.rows, shape.k)?, || {
                format!("[rows, K] = [{}, {}]", groups.rows, shape.k)
            })?;
            Ok((groups.rows, 0))
        }
        ARows::Gathered { top_k } => {
            check_range("top_k", top_k, 1..=crate::ops::dispatch::MAX_TOP_K)?;
            groups.sorted_rows("gathered A")?;
            if a.len() % shape.k != 0 {
                return Err(Error::Shape {
                    argument: "a",
                    expected: format!("[T, K] with K = {} ({})", shape.k, T::NAME),
                    got: format!("{} elements", a.len()),
                });
            }
            let tokens = a.len() / shape.k;
            Ok((tokens, elements("a", tokens, top_k)?))
        }
    }
}

/// The f32 element type as a kernel-name suffix check: outputs are `T` or f32.
fn check_out_type<T: FloatElement, O: FloatElement>(argument: &'static str) -> Result<i32> {
    if O::NAME == T::NAME {
        return Ok(i32::from(O::NAME == "f32"));
    }
    if O::NAME == "f32" {
        return Ok(1);
    }
    Err(Error::InvalidArgument {
        argument,
        value: O::NAME.into(),
        expected: format!("{} (the input dtype) or f32", T::NAME),
    })
}

/// Row tiles of the tile kernels' grid: enough for every group's tiles under any offsets
/// (`Σ ceil(m_e / BM) <= rows / BM + E`); the tiles past the last group's exit at once.
fn row_tiles<T: FloatElement>(rows: usize, experts: usize) -> Result<u32> {
    super::grid_blocks("groups.rows", rows + experts * tile_rows::<T>(), tile_rows::<T>())
}

fn tile_rows<T: FloatElement>() -> usize {
    if T::NAME == "f32" { FMA_TILE } else { MMA_TILE }
}

/// Dynamic shared memory of the tile kernels (`MmaTile::smem_bytes`, `FmaRowsTile::smem_bytes`):
/// 3 stages of two 16-bit operand tiles, each 128 rows of 40 halves (K-major) or 32 rows of 136
/// halves (MN-major); f32: two 16 x 64 f32 tiles.
fn tile_shared<T: FloatElement>(a_k_major: bool, b_k_major: bool) -> u32 {
    if T::NAME == "f32" {
        return 16 * 128 * 4;
    }
    let halves = |k_major: bool| if k_major { 128 * 40 } else { 32 * 136 };
    (3 * (halves(a_k_major) + halves(b_k_major)) * 2) as u32
}

/// `Err` unless `buffer` starts 16-byte aligned on the tensor-core path (f16/bf16), whose
/// loaders move rows with 16-byte `cp.async` (K and N multiples of 8 keep every row aligned).
fn check_aligned_16<T: FloatElement>(
    device: &Device,
    argument: &'static str,
    buffer: &impl DeviceSlice<T>,
) -> Result<()> {
    if T::NAME == "f32" || buffer.is_empty() {
        return Ok(());
    }
    let (address, _guard) = buffer.kernel_ptr(device, argument)?;
    if address % 16 == 0 {
        return Ok(());
    }
    Err(Error::InvalidArgument {
        argument,
        value: format!("a buffer at {address:#x}"),
        expected: "a 16-byte aligned start on the f16/bf16 path".into(),
    })
}

/// The i64 scalar of a size.
fn i64_of(value: usize) -> i64 {
    value as i64
}
