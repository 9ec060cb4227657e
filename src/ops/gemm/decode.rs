//! The launch plan of the decode kernels (`grouped_gemm_decode_*`, `grouped_gemm_decode_dgrad_*`,
//! `kernels/include/gemm_decode.cuh`), from host-known sizes only: the same on every device, and
//! no sync. A block is [`DECODE_WARPS`] warps; each lane owns an output column, each warp streams
//! its weight tile through a ring of [`DECODE_STAGES`] stages of 64 bytes per weight row and
//! splits the reduction `ksplit` ways inside the block.
use super::DECODE_MAX_ROWS;
use super::Groups;
use crate::DeviceSlice;
use crate::Result;
use crate::device::{KernelArgs, LaunchConfig};
use crate::ops::grid_blocks;

/// Warps per decode block (`DEC_WARPS`).
pub const DECODE_WARPS: usize = 4;
/// Threads of a decode block.
const DECODE_THREADS: u32 = (DECODE_WARPS * 32) as u32;
/// Stages of each warp's cp.async ring (`DEC_STAGES`).
const DECODE_STAGES: usize = 4;
/// Bytes of one weight row (or one row of the group) per ring stage (`DEC_CHUNK_BYTES`).
const CHUNK_BYTES: usize = 64;
/// Blocks the plan aims for before it splits the reduction: two per SM of an H100/H200 (132).
/// Only host-known sizes enter; the active experts are bounded by `min(E, rows)`.
pub const DECODE_TARGET_BLOCKS: usize = 264;

/// One decode launch: its grid, in-block split, rows per pass and dynamic shared memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecodePlan {
    /// Blocks along the output columns (the grid's y is the expert).
    pub column_blocks: u32,
    /// Reduction splits inside a block: 1, 2 or 4 (a fixed order: bitwise reproducible).
    pub ksplit: usize,
    /// Rows of a group per pass over the weights (B is streamed once per pass).
    pub rows_per_pass: usize,
    pub shared_bytes: u32,
}

/// The plan of a decode launch with `cols` output columns (forward: N, or N/2 for SwiGLU;
/// dgrad: K), a reduction of `reduction` elements of `elem_bytes` bytes (forward: K; dgrad: N),
/// `weight_rows_per_lane` weight rows per output column (2 for the SwiGLU forward, else 1),
/// `experts` groups over `rows` rows, no group over `max_group_rows` (host-known).
///
/// The split is the smallest of 1, 2, 4 that gives [`DECODE_TARGET_BLOCKS`] blocks over the
/// experts that can have rows (`min(E, rows)`), with no more splits than 64-byte chunks of the
/// reduction (a split may still get none: it adds zeros).
pub fn decode_plan(
    cols: usize,
    reduction: usize,
    elem_bytes: usize,
    weight_rows_per_lane: usize,
    experts: usize,
    rows: usize,
    max_group_rows: usize,
) -> Result<DecodePlan> {
    let active = experts.min(rows).max(1);
    let chunks = (reduction * elem_bytes).div_ceil(CHUNK_BYTES);
    let blocks = |ksplit: usize| cols.div_ceil(32 * DECODE_WARPS / ksplit).saturating_mul(active);
    let mut ksplit = 1;
    while ksplit < DECODE_WARPS && blocks(ksplit) < DECODE_TARGET_BLOCKS && chunks >= 2 * ksplit {
        ksplit *= 2;
    }
    let rows_per_pass = max_group_rows.min(rows).clamp(1, DECODE_MAX_ROWS);
    let stage = weight_rows_per_lane * 32 * CHUNK_BYTES + rows_per_pass * CHUNK_BYTES;
    let shared = DECODE_WARPS * DECODE_STAGES * stage + DECODE_MAX_ROWS * 8;
    Ok(DecodePlan {
        column_blocks: grid_blocks("shape", cols, 32 * DECODE_WARPS / ksplit)?,
        ksplit,
        rows_per_pass,
        shared_bytes: shared as u32,
    })
}

/// The launch of a decode kernel over `groups` (see [`decode_plan`] for the other arguments).
pub(super) fn decode_launch<I: DeviceSlice<i32>>(
    (cols, reduction, elem_bytes, weight_rows_per_lane): (usize, usize, usize, usize),
    experts: usize,
    groups: &Groups<'_, I>,
) -> Result<(LaunchConfig, DecodePlan)> {
    let plan = decode_plan(
        cols,
        reduction,
        elem_bytes,
        weight_rows_per_lane,
        experts,
        groups.rows,
        groups.max_group_rows,
    )?;
    let launch = LaunchConfig {
        grid: (plan.column_blocks, experts as u32, 1),
        block: (DECODE_THREADS, 1, 1),
        shared_bytes: plan.shared_bytes,
    };
    Ok((launch, plan))
}

/// The decode kernels' last two arguments (`ksplit`, `rows_cap`) after the tile kernels' list.
pub(super) fn with_decode_plan<'a>(args: KernelArgs<'a>, plan: Option<DecodePlan>) -> KernelArgs<'a> {
    match plan {
        Some(plan) => args.scalar(plan.ksplit as i32).scalar(plan.rows_per_pass as i32),
        None => args,
    }
}
