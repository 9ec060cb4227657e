//! The sm_90a forward, dgrad and wgrad (`grouped_gemm_{fwd,dgrad,wgrad}_sm90_*`,
//! `kernels/include/gemm_sm90.cuh` and `gemm_sm90_wgrad.cuh`): one persistent CTA per SM, a
//! producer warpgroup filling a 4-stage ring (the weights by TMA, the rows of A or dC,
//! gathered or not, by 16-byte `cp.async`; wgrad copies both of its row operands) for two
//! consumer warpgroups that run `wgmma` on 128 x 256 x 64 tiles, tile by tile of each expert
//! so that CTAs running at once share its operands in L2. f16/bf16, on sm_90 GPUs and the
//! emulator.
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
/// The ring of 4 stages (+ alignment), then each consumer warp's 4 KiB epilogue staging tile.
const SHARED_BYTES: u32 = 4 * (128 * 64 * 2 + 2 * 128 * 64 * 2) + 1024 + 8 * 16 * 64 * 4;

/// Which sm_90a kernel: the forward (its column tiles are 256 output columns, or 128 for
/// SwiGLU's gate and up rows) or dgrad (256 columns of K).
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Sm90Op {
    Forward { swiglu: bool },
    Dgrad,
}

impl Sm90Op {
    fn col_tiles(self, shape: &GemmShape) -> usize {
        match self {
            Sm90Op::Forward { swiglu: true } => (shape.n / 2).div_ceil(BOX_ROWS),
            Sm90Op::Forward { swiglu: false } => shape.n.div_ceil(TILE_N),
            Sm90Op::Dgrad => shape.k.div_ceil(TILE_N),
        }
    }
}

/// `Ok` when the sm_90a kernels can take the operands, else an `Err` naming what they lack: a
/// device that runs sm_90a code, f16/bf16, the tensor-core tile sizes and alignment (N, K
/// multiples of 8; both operands, `a` or `dc` and `b` or `a`, 16-byte aligned) and, where B
/// comes by TMA (`weights_by_tma`: forward and dgrad), weight rows TMA's 32-bit coordinates
/// reach.
pub(super) fn check_operands<T: FloatElement>(
    device: &Device,
    shape: &GemmShape,
    (left_name, left): (&'static str, &impl DeviceSlice<T>),
    (right_name, right): (&'static str, &impl DeviceSlice<T>),
    weights_by_tma: bool,
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
            argument: left_name,
            value: "f32".into(),
            expected: "f16 or bf16 on GemmPath::Hopper (wgmma)".into(),
        });
    }
    shape.check_tile_sizes::<T>()?;
    check_aligned_16(device, left_name, left)?;
    check_aligned_16(device, right_name, right)?;
    if weights_by_tma && shape.experts * shape.n + 2 * TILE_N > i32::MAX as usize {
        return Err(Error::InvalidArgument {
            argument: "shape.n",
            value: shape.n.to_string(),
            expected: format!("E·N below 2^31 - {} on GemmPath::Hopper (TMA coordinates)", 2 * TILE_N),
        });
    }
    Ok(())
}

/// One CTA per SM, or fewer when the schedule has fewer tiles than that under any offsets:
/// `(ceil(rows / 128) + E) · column tiles` bounds them.
pub(super) fn launch_config(device: &Device, shape: &GemmShape, rows: usize, op: Sm90Op) -> Result<LaunchConfig> {
    let row_tiles = grid_blocks("groups.rows", rows + shape.experts * TILE_M, TILE_M)? as usize;
    let tiles = row_tiles.saturating_mul(op.col_tiles(shape));
    Ok(LaunchConfig {
        grid: (tiles.min(device.multiprocessors() as usize).max(1) as u32, 1, 1),
        block: (THREADS, 1, 1),
        shared_bytes: SHARED_BYTES,
    })
}

/// wgrad: one CTA per SM, or one per tile when fewer: `slots` active experts x ceil(N / 128) x
/// ceil(K / 256) output tiles.
pub(super) fn wgrad_launch_config(device: &Device, shape: &GemmShape, slots: usize) -> Result<LaunchConfig> {
    let tiles = slots
        .saturating_mul(shape.n.div_ceil(TILE_M))
        .saturating_mul(shape.k.div_ceil(TILE_N));
    Ok(LaunchConfig {
        grid: (tiles.min(device.multiprocessors() as usize).max(1) as u32, 1, 1),
        block: (THREADS, 1, 1),
        shared_bytes: SHARED_BYTES,
    })
}

/// The tensor map of `b` (`[E, N, K]`), 128-byte swizzle: for the forward E·N rows of K in
/// boxes of 128 rows by 64 of K (wgmma's K-major layout); for dgrad `[E][N][K]` in boxes of 64
/// columns of K by 64 rows of one expert (MN-major; rows past N zero-filled, never the next
/// expert's).
pub(super) struct WeightMap {
    dims: [u64; 3],
    strides: [u64; 2],
    op: Sm90Op,
}

impl WeightMap {
    pub(super) fn new(shape: &GemmShape, op: Sm90Op) -> WeightMap {
        let (k, n, e) = (shape.k as u64, shape.n as u64, shape.experts as u64);
        let (dims, strides) = match op {
            Sm90Op::Forward { .. } => ([k, e * n, 1], [2 * k, 2 * k * e * n]), // 2D: the first two
            Sm90Op::Dgrad => ([k, n, e], [2 * k, 2 * k * n]),
        };
        WeightMap { dims, strides, op }
    }

    pub(super) fn spec(&self) -> TensorMapSpec<'_> {
        match self.op {
            Sm90Op::Forward { .. } => TensorMapSpec {
                dims: &self.dims[..2],
                strides: &self.strides[..1],
                box_dims: &[TILE_K, BOX_ROWS as u32],
                swizzle: Swizzle::B128,
            },
            Sm90Op::Dgrad => TensorMapSpec {
                dims: &self.dims,
                strides: &self.strides,
                box_dims: &[64, TILE_K, 1],
                swizzle: Swizzle::B128,
            },
        }
    }
}
