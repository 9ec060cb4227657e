//! The sm_90a forward (`grouped_gemm_fwd_sm90_*`, `kernels/include/gemm_sm90.cuh`): one
//! persistent CTA per SM, a producer warpgroup filling a 4-stage ring (the weights by TMA, the
//! rows of A, gathered or not, by 16-byte `cp.async`) for two consumer warpgroups that run
//! `wgmma` on 128 x 256 x 64 tiles, column tile by column tile of each expert so that CTAs
//! running at once share the weights in L2. f16/bf16, on sm_90 GPUs and the emulator.
use super::{GemmShape, check_aligned_16};
use crate::device::{LaunchConfig, Swizzle, TensorMapSpec};
use crate::ops::{FloatElement, grid_blocks};
use crate::{Device, DeviceSlice, Error, Result};

/// `sm90::kTileM`, `kTileN`, `kBoxRows`, `kTileK`, `kThreads`, `kSharedBytes` of gemm_sm90.cuh.
const TILE_M: usize = 128;
const TILE_N: usize = 256;
const BOX_ROWS: usize = 128;
const TILE_K: u32 = 64;
const THREADS: u32 = 384;
const SHARED_BYTES: u32 = 4 * (128 * 64 * 2 + 2 * 128 * 64 * 2) + 1024;

/// `Ok` when the sm_90a kernel can take the operands, else an `Err` naming what it lacks: a
/// device that runs sm_90a code, f16/bf16, the tensor-core tile sizes and alignment (N, K
/// multiples of 8; `a` and `b` 16-byte aligned) and weight rows TMA's 32-bit coordinates reach.
pub(super) fn check_operands<T: FloatElement>(
    device: &Device,
    shape: &GemmShape,
    a: &impl DeviceSlice<T>,
    b: &impl DeviceSlice<T>,
) -> Result<()> {
    if !device.runs_sm90a() {
        return Err(Error::InvalidArgument {
            argument: "device",
            value: device.description(),
            expected: "the emulator or an sm_90 GPU for GemmPath::Hopper".into(),
        });
    }
    if T::NAME == "f32" {
        return Err(Error::InvalidArgument {
            argument: "a",
            value: "f32".into(),
            expected: "f16 or bf16 on GemmPath::Hopper (wgmma)".into(),
        });
    }
    shape.check_tile_sizes::<T>()?;
    check_aligned_16(device, "a", a)?;
    check_aligned_16(device, "b", b)?;
    if shape.experts * shape.n + 2 * TILE_N > i32::MAX as usize {
        return Err(Error::InvalidArgument {
            argument: "shape.n",
            value: shape.n.to_string(),
            expected: format!("E·N below 2^31 - {} on GemmPath::Hopper (TMA coordinates)", 2 * TILE_N),
        });
    }
    Ok(())
}

/// Column tiles of the kernel: 256 output columns, or 128 for SwiGLU (gate and up rows).
fn col_tiles(shape: &GemmShape, swiglu: bool) -> usize {
    if swiglu {
        (shape.n / 2).div_ceil(BOX_ROWS)
    } else {
        shape.n.div_ceil(TILE_N)
    }
}

/// One CTA per SM, or fewer when the schedule has fewer tiles than that under any offsets:
/// `(ceil(rows / 128) + E) · column tiles` bounds them.
pub(super) fn launch_config(device: &Device, shape: &GemmShape, rows: usize, swiglu: bool) -> Result<LaunchConfig> {
    let row_tiles = grid_blocks("groups.rows", rows + shape.experts * TILE_M, TILE_M)? as usize;
    let tiles = row_tiles.saturating_mul(col_tiles(shape, swiglu));
    Ok(LaunchConfig {
        grid: (tiles.min(device.multiprocessors() as usize).max(1) as u32, 1, 1),
        block: (THREADS, 1, 1),
        shared_bytes: SHARED_BYTES,
    })
}

/// The tensor map of `b` (`[E, N, K]` as E·N rows of K): boxes of 128 rows by 64 of K, the
/// 128-byte swizzle (wgmma's K-major layout).
pub(super) struct WeightMap {
    dims: [u64; 2],
    strides: [u64; 1],
}

impl WeightMap {
    pub(super) fn new(shape: &GemmShape) -> WeightMap {
        WeightMap {
            dims: [shape.k as u64, (shape.experts * shape.n) as u64],
            strides: [2 * shape.k as u64],
        }
    }

    pub(super) fn spec(&self) -> TensorMapSpec<'_> {
        TensorMapSpec {
            dims: &self.dims,
            strides: &self.strides,
            box_dims: &[TILE_K, BOX_ROWS as u32],
            swizzle: Swizzle::B128,
        }
    }
}
