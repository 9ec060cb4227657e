//! The forward: `C_e = A_e · B_e^T` with its epilogues (`grouped_gemm_fwd_*`, `grouped_gemm_decode_*`).
use super::decode::{decode_launch, with_decode_plan};
use super::hopper;
use super::{
    ARows, DECODE_MAX_ROWS, EPI_STORE, EPI_SWIGLU, GemmShape, Groups, TILE_THREADS, check_a_rows, check_aligned_16,
    check_out_type, i64_of, row_tiles, tile_shared,
};
use crate::device::{KernelArgs, LaunchConfig};
use crate::ops::{FloatElement, check_len, elements, grid_blocks};
use crate::{Device, DeviceSlice, DeviceSliceMut, Error, Result};

/// Bytes of the forward tile kernel's tables of A-row pointers and row scales (one each per
/// tile row, at most 128).
const ROW_TABLES: u32 = 128 * (8 + 4);

/// What the forward writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Epilogue {
    /// `C = A_e B_e^T`, `[rows, N]`.
    #[default]
    Store,
    /// `H = silu(G) ⊙ U`, `[rows, N/2]`, with G the first N/2 rows of `B_e` (gate) and U the last
    /// N/2 (up); N must be even.
    SwiGlu,
}

/// Which kernel the forward (and [`dgrad`](super::dgrad)) runs. `Auto` is right outside tests
/// and benches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum GemmPath {
    /// Decode when `groups.max_group_rows <= DECODE_MAX_ROWS`, else tiles; for the forward also
    /// decode when the f16/bf16 tiles cannot take the operands (A or B off 16-byte alignment, N or K not a
    /// multiple of 8): correct, but slow for big groups.
    #[default]
    Auto,
    /// Row tiles (tensor cores for f16/bf16, FMA tiles for f32); for f16/bf16 an `Err` naming
    /// `a`, `b`, `shape.n` or `shape.k` when the tiles cannot take the operands.
    Tiled,
    /// The decode kernel: B streamed once per pass of up to 32 rows of a group with 16-byte
    /// `cp.async` where aligned (element by element otherwise), any shape and alignment, any
    /// group size (slow for big groups).
    Decode,
    /// The sm_90a kernel (forward, dgrad and [`wgrad_on_path`](super::wgrad_on_path)):
    /// persistent, warp-specialised, `wgmma` on 128 x 256 tiles fed by TMA (weights) and
    /// `cp.async` (rows of A, dC) through a 4-stage mbarrier ring. f16/bf16 with the tiles' sizes and alignment, on an sm_90 GPU or
    /// the emulator; otherwise an `Err` naming `device`, `a`, `b`, `shape.n` or `shape.k`.
    /// `Auto` does not pick it yet: it becomes the default on sm_90 once a GPU run has
    /// validated and timed it.
    Hopper,
}

/// The kernel a forward runs.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kernel {
    Tiles,
    Decode,
    Sm90,
}

/// Options of [`forward`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ForwardConfig {
    pub a_rows: ARows,
    pub epilogue: Epilogue,
    pub path: GemmPath,
}

impl ForwardConfig {
    pub fn validate(&self, shape: &GemmShape) -> Result<()> {
        if self.epilogue == Epilogue::SwiGlu && shape.n % 2 != 0 {
            return Err(Error::InvalidArgument {
                argument: "shape.n",
                value: shape.n.to_string(),
                expected: "an even N (gate and up rows) for the SwiGLU epilogue".into(),
            });
        }
        Ok(())
    }
}

/// Elements of the forward's output: `rows · N`, or `rows · N/2` for SwiGLU (`gu`: `rows · N`).
pub fn forward_out_len(shape: &GemmShape, rows: usize, epilogue: Epilogue) -> Result<usize> {
    let cols = match epilogue {
        Epilogue::Store => shape.n,
        Epilogue::SwiGlu => shape.n / 2,
    };
    elements("out", rows, cols)
}

/// `out[r] = A_e[r] · B_e^T` for every row r of every group e, through the epilogue.
///
/// - `a`: `[rows, K]` ([`ARows::Contiguous`]) or `[T, K]` ([`ARows::Gathered`]);
/// - `b`: `[E, N, K]`;
/// - `row_weights`: `[slots]` f32 (T·k when gathered), row r scaled by `row_weights[sorted_rows[r]]`;
/// - `out`: `[rows, N]` or, SwiGLU, `[rows, N/2]`, of A's dtype or f32;
/// - `gu`: SwiGLU only, `[rows, N]` of A's dtype: the (scaled) gate and up values for the backward.
///
/// One launch (none when `groups.rows` is 0), no host sync.
#[allow(clippy::too_many_arguments)]
pub fn forward<T: FloatElement, O: FloatElement, I: DeviceSlice<i32>>(
    device: &Device,
    a: &impl DeviceSlice<T>,
    b: &impl DeviceSlice<T>,
    shape: GemmShape,
    groups: &Groups<'_, I>,
    config: &ForwardConfig,
    row_weights: Option<&impl DeviceSlice<f32>>,
    out: &mut impl DeviceSliceMut<O>,
    gu: Option<&mut impl DeviceSliceMut<T>>,
) -> Result<()> {
    shape.validate()?;
    if config.path == GemmPath::Tiled {
        shape.check_tile_sizes::<T>()?;
    }
    config.validate(&shape)?;
    groups.validate(&shape)?;
    let (a_rows, gather_slots) = check_a_rows(a, config.a_rows, &shape, groups)?;
    check_len("b", b, shape.weight_len()?, || {
        format!("[E, N, K] = [{}, {}, {}]", shape.experts, shape.n, shape.k)
    })?;
    // The tiles stream A and B with 16-byte cp.async; the decode kernel reads any layout.
    let tiles_take_operands = shape
        .check_tile_sizes::<T>()
        .and_then(|()| check_aligned_16(device, "a", a))
        .and_then(|()| check_aligned_16(device, "b", b));
    let kernel = match config.path {
        GemmPath::Auto if groups.max_group_rows.min(groups.rows) <= DECODE_MAX_ROWS || tiles_take_operands.is_err() => {
            Kernel::Decode
        }
        GemmPath::Auto => Kernel::Tiles,
        GemmPath::Tiled => {
            tiles_take_operands?;
            Kernel::Tiles
        }
        GemmPath::Decode => Kernel::Decode,
        GemmPath::Hopper => {
            hopper::check_operands(device, &shape, ("a", a), ("b", b), true)?;
            Kernel::Sm90
        }
    };
    let out_f32 = check_out_type::<T, O>("out")?;
    let out_len = forward_out_len(&shape, groups.rows, config.epilogue)?;
    check_len("out", out, out_len, || "[rows, N] (SwiGLU: [rows, N/2])".into())?;
    let slots = match row_weights {
        Some(w) => {
            groups.sorted_rows("row weights")?;
            if gather_slots > 0 {
                check_len("row_weights", w, gather_slots, || "[T·top_k]".into())?;
            }
            w.len()
        }
        None => 0,
    };
    if let Some(gu) = &gu {
        if config.epilogue != Epilogue::SwiGlu {
            return Err(Error::InvalidArgument {
                argument: "gu",
                value: "Some".into(),
                expected: "None unless the epilogue is SwiGlu".into(),
            });
        }
        check_len("gu", *gu, elements("gu", groups.rows, shape.n)?, || "[rows, N]".into())?;
    }
    if groups.rows == 0 {
        return Ok(());
    }
    let (mode, out_cols) = match config.epilogue {
        Epilogue::Store => (EPI_STORE, shape.n),
        Epilogue::SwiGlu => (EPI_SWIGLU, shape.n / 2),
    };
    let sm90_op = hopper::Sm90Op::Forward {
        swiglu: mode == EPI_SWIGLU,
    };
    let (name, launch, plan) = match kernel {
        Kernel::Decode => {
            let per_lane = if mode == EPI_SWIGLU { 2 } else { 1 };
            let (config, plan) = decode_launch((out_cols, shape.k, size_of::<T>(), per_lane), shape.experts, groups)?;
            (format!("grouped_gemm_decode_{}", T::NAME), config, Some(plan))
        }
        Kernel::Sm90 => {
            let config = hopper::launch_config(device, &shape, groups.rows, sm90_op)?;
            (format!("grouped_gemm_fwd_sm90_{}", T::NAME), config, None)
        }
        Kernel::Tiles => {
            let tile_cols = if T::NAME == "f32" { 64 } else { 128 };
            let per_block = if mode == EPI_SWIGLU { tile_cols / 2 } else { tile_cols };
            let config = LaunchConfig {
                grid: (
                    row_tiles::<T>(groups.rows, shape.experts)?,
                    grid_blocks("shape.n", out_cols, per_block)?,
                    1,
                ),
                block: (TILE_THREADS, 1, 1),
                shared_bytes: tile_shared::<T>(true, true) + ROW_TABLES,
            };
            (format!("grouped_gemm_fwd_{}", T::NAME), config, None)
        }
    };
    check_grid_y(launch.grid.1)?;
    let top_k = match config.a_rows {
        ARows::Contiguous => 0,
        ARows::Gathered { top_k } => top_k as i32,
    };
    // SAFETY of the argument list: FWD_PARAMS in grouped_gemm.cu, in order (the sm90 kernel
    // takes b's tensor map first).
    let weight_map = hopper::WeightMap::new(&shape, sm90_op);
    let args = KernelArgs::new(device);
    let args = if kernel == Kernel::Sm90 {
        args.tensor_map("b", b, &weight_map.spec())
    } else {
        args
    };
    let args = args
        .input("a", a)
        .scalar(i64_of(a_rows))
        .input_or_null("groups.sorted_rows", groups.sorted_rows)
        .scalar(top_k)
        .input("b", b)
        .input("groups.offsets", groups.offsets)
        .scalar(shape.experts as i32)
        .scalar(i64_of(groups.rows))
        .scalar(i64_of(shape.n))
        .scalar(i64_of(shape.k))
        .output("out", out)
        .scalar(out_f32)
        .scalar(mode)
        .input_or_null("row_weights", row_weights)
        .scalar(i64_of(slots))
        .output_or_null("gu", gu);
    device.launch(&name, launch, with_decode_plan(args, plan))
}

/// CUDA's grid limit in y (column tiles).
pub(super) fn check_grid_y(blocks: u32) -> Result<()> {
    if blocks <= 65535 {
        return Ok(());
    }
    Err(Error::InvalidArgument {
        argument: "shape",
        value: format!("{blocks} column tiles"),
        expected: "at most 65535 column tiles".into(),
    })
}
