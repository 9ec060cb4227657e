//! The row movers: permute (gather by `sorted_rows`), combine (weighted sum by `inverse`) and
//! their backward passes. One launch each; f32 arithmetic whatever the storage type.
use super::MAX_TOP_K;
use crate::device::{KernelArgs, LaunchConfig};
use crate::ops::{FloatElement, check_len, check_range, elements, grid_blocks};
use crate::{Device, DeviceBuffer, DeviceSlice, DeviceSliceMut, Error, Result};

const ROW_THREADS: u32 = 256;
/// Grid-stride kernels: enough blocks to fill any GPU, few enough to keep the emulator's
/// per-block cost small.
const MAX_ROW_BLOCKS: u32 = 4096;

/// The sizes every row mover shares, checked once: T, k, d, and T·k below 2^31 (slot ids are i32).
#[derive(Clone, Copy)]
struct Rows {
    tokens: usize,
    k: usize,
    d: usize,
    slots: usize,
}

impl Rows {
    fn new(tokens: usize, k: usize, d: usize) -> Result<Self> {
        check_range("k", k, 1..=MAX_TOP_K)?;
        check_range("d", d, 1..=i32::MAX as usize)?;
        let slots = elements("tokens", tokens, k)?;
        check_range("tokens", slots, 0..=i32::MAX as usize).map_err(|_| Error::InvalidArgument {
            argument: "tokens",
            value: tokens.to_string(),
            expected: format!("T·k below 2^31 (k = {k})"),
        })?;
        Ok(Self { tokens, k, d, slots })
    }

    /// `[T, d]`.
    fn check_token_rows<T: FloatElement>(&self, argument: &'static str, buffer: &impl DeviceSlice<T>) -> Result<()> {
        let len = elements(argument, self.tokens, self.d)?;
        check_len(argument, buffer, len, || {
            format!("[T, d] = [{}, {}]", self.tokens, self.d)
        })
    }

    /// `[T·k]` (per slot).
    fn check_slots<E: crate::Element>(&self, argument: &'static str, buffer: &impl DeviceSlice<E>) -> Result<()> {
        check_len(argument, buffer, self.slots, || format!("[T·k] = [{}]", self.slots))
    }

    /// `[rows, d]` for the rows of `sorted_rows`.
    fn check_expert_rows<T: FloatElement>(
        &self,
        argument: &'static str,
        buffer: &impl DeviceSlice<T>,
        rows: usize,
    ) -> Result<()> {
        let len = elements(argument, rows, self.d)?;
        check_len(argument, buffer, len, || format!("[rows, d] = [{rows}, {}]", self.d))
    }

    /// Threads per row (a power of two up to the block): one per 16-byte chunk when d fills
    /// whole chunks, else one per element.
    fn lanes_per_row<T: FloatElement>(&self) -> i32 {
        let vector = 16 / size_of::<T>();
        let per_row = if self.d % vector == 0 { self.d / vector } else { self.d };
        per_row.next_power_of_two().min(ROW_THREADS as usize) as i32
    }

    /// A grid-stride launch over `rows` rows of `rows_per_block` each.
    fn launch_config(&self, rows: usize, rows_per_block: usize) -> Result<LaunchConfig> {
        let blocks = grid_blocks("rows", rows, rows_per_block)?.min(MAX_ROW_BLOCKS);
        Ok(LaunchConfig::linear(blocks, ROW_THREADS, 0))
    }
}

/// Permute (gather): `xp[r] = x[sorted_rows[r] / k]` for every row r of `sorted_rows`; rows
/// holding -1 (padding, unused) become zeros. `x: [tokens, d]`, `xp: [sorted_rows.len(), d]`.
/// `inverse` `[T·k]` is the same routing map's: the kernel runs token-major,
/// `xp[inverse[t·k + j]] = x[t]`, so each row of `x` is read once, however many rows it goes to.
#[allow(clippy::too_many_arguments)]
pub fn permute<T: FloatElement>(
    device: &Device,
    x: &impl DeviceSlice<T>,
    sorted_rows: &impl DeviceSlice<i32>,
    inverse: &impl DeviceSlice<i32>,
    tokens: usize,
    k: usize,
    d: usize,
    xp: &mut impl DeviceSliceMut<T>,
) -> Result<()> {
    let shape = Rows::new(tokens, k, d)?;
    let rows = sorted_rows.len();
    shape.check_token_rows("x", x)?;
    shape.check_slots("inverse", inverse)?;
    shape.check_expert_rows("xp", xp, rows)?;
    let lanes = shape.lanes_per_row::<T>();
    let per_block = ROW_THREADS as usize / lanes as usize;
    let config = LaunchConfig {
        shared_bytes: (per_block * k * size_of::<i32>()) as u32,
        ..shape.launch_config(rows.max(tokens), per_block)?
    };
    let args = KernelArgs::new(device)
        .input("x", x)
        .input("inverse", inverse)
        .input("sorted_rows", sorted_rows)
        .scalar(tokens as i64)
        .scalar(k as i32)
        .scalar(d as i32)
        .scalar(rows as i64)
        .scalar(lanes)
        .output("xp", xp);
    device.launch(&format!("dispatch_permute_{}", T::NAME), config, args)
}

/// Combine (un-permute): `y[t] = Σ_j w[t, j] · yp[inverse[t·k + j]] (+ residual[t])`, summed in
/// f32 for j = 0..k-1 in order (deterministic). Slots with `inverse = -1` contribute nothing.
/// `weights: [T, k]` f32, or `None` when the expert GEMM's epilogue already applied them.
/// `yp: [rows, d]` (any row count), `residual`, `y: [T, d]`.
#[allow(clippy::too_many_arguments)]
pub fn combine<T: FloatElement, W: DeviceSlice<f32>, R: DeviceSlice<T>>(
    device: &Device,
    yp: &impl DeviceSlice<T>,
    inverse: &impl DeviceSlice<i32>,
    weights: Option<&W>,
    residual: Option<&R>,
    tokens: usize,
    k: usize,
    d: usize,
    y: &mut impl DeviceSliceMut<T>,
) -> Result<()> {
    let shape = Rows::new(tokens, k, d)?;
    shape.check_slots("inverse", inverse)?;
    if let Some(w) = weights {
        shape.check_slots("weights", w)?;
    }
    if let Some(r) = residual {
        shape.check_token_rows("residual", r)?;
    }
    shape.check_token_rows("y", y)?;
    combine_launch(device, shape, yp, inverse, weights, residual, y)
}

/// Permute backward: `dx[t] = Σ_j dxp[inverse[t·k + j]]` in j order (the combine without
/// weights). `dxp: [rows, d]`, `dx: [T, d]`.
pub fn permute_backward<T: FloatElement>(
    device: &Device,
    dxp: &impl DeviceSlice<T>,
    inverse: &impl DeviceSlice<i32>,
    tokens: usize,
    k: usize,
    d: usize,
    dx: &mut impl DeviceSliceMut<T>,
) -> Result<()> {
    let shape = Rows::new(tokens, k, d)?;
    shape.check_slots("inverse", inverse)?;
    shape.check_token_rows("dx", dx)?;
    let no_weights: Option<&DeviceBuffer<f32>> = None;
    let no_residual: Option<&DeviceBuffer<T>> = None;
    combine_launch(device, shape, dxp, inverse, no_weights, no_residual, dx)
}

fn combine_launch<T: FloatElement, W: DeviceSlice<f32>, R: DeviceSlice<T>>(
    device: &Device,
    shape: Rows,
    yp: &impl DeviceSlice<T>,
    inverse: &impl DeviceSlice<i32>,
    weights: Option<&W>,
    residual: Option<&R>,
    y: &mut impl DeviceSliceMut<T>,
) -> Result<()> {
    if yp.len() % shape.d != 0 {
        return Err(Error::Shape {
            argument: "yp",
            expected: format!("[rows, d] with d = {}", shape.d),
            got: format!("{} elements", yp.len()),
        });
    }
    let lanes = shape.lanes_per_row::<T>();
    let config = shape.launch_config(shape.tokens, ROW_THREADS as usize / lanes as usize)?;
    let args = KernelArgs::new(device)
        .input("yp", yp)
        .input("inverse", inverse)
        .input_or_null("weights", weights)
        .input_or_null("residual", residual)
        .scalar(shape.tokens as i32)
        .scalar(shape.k as i32)
        .scalar(shape.d as i32)
        .scalar((yp.len() / shape.d) as i64)
        .scalar(lanes)
        .output("y", y);
    device.launch(&format!("dispatch_combine_{}", T::NAME), config, args)
}

/// Combine backward, one launch: `dyp[r] = w[s] · dy[s / k]` for each row r holding slot
/// s = `sorted_rows[r]` (zeros for padding rows; `w` = 1 when `weights` is `None`, i.e. the
/// forward combine did not apply them), and, when `dw` is given, `dw[s] = <dy[s / k], yp[r]>`
/// in f32 (one warp per row, fixed reduction order), 0 for slots not laid out.
/// `dy: [T, d]`, `yp`, `dyp: [sorted_rows.len(), d]`, `inverse`, `weights`, `dw: [T·k]`.
#[allow(clippy::too_many_arguments)]
pub fn combine_backward<T: FloatElement, Y: DeviceSlice<T>, W: DeviceSlice<f32>, G: DeviceSliceMut<f32>>(
    device: &Device,
    dy: &impl DeviceSlice<T>,
    yp: Option<&Y>,
    sorted_rows: &impl DeviceSlice<i32>,
    inverse: &impl DeviceSlice<i32>,
    weights: Option<&W>,
    tokens: usize,
    k: usize,
    d: usize,
    dyp: &mut impl DeviceSliceMut<T>,
    dw: Option<&mut G>,
) -> Result<()> {
    let shape = Rows::new(tokens, k, d)?;
    let rows = sorted_rows.len();
    shape.check_token_rows("dy", dy)?;
    shape.check_slots("inverse", inverse)?;
    if let Some(w) = weights {
        shape.check_slots("weights", w)?;
    }
    shape.check_expert_rows("dyp", dyp, rows)?;
    match (&yp, &dw) {
        (Some(yp), _) => shape.check_expert_rows("yp", *yp, rows)?,
        (None, Some(_)) => {
            return Err(Error::InvalidArgument {
                argument: "yp",
                value: "None".into(),
                expected: "the expert outputs, to compute dw".into(),
            });
        }
        (None, None) => {}
    }
    if let Some(dw) = &dw {
        shape.check_slots("dw", *dw)?;
    }
    let config = shape.launch_config(rows.max(shape.slots), ROW_THREADS as usize / 32)?;
    let args = KernelArgs::new(device)
        .input("dy", dy)
        .input_or_null("yp", yp)
        .input("sorted_rows", sorted_rows)
        .input("inverse", inverse)
        .input_or_null("weights", weights)
        .scalar(shape.slots as i32)
        .scalar(k as i32)
        .scalar(d as i32)
        .scalar(rows as i64)
        .output("dyp", dyp)
        .output_or_null("dw", dw);
    device.launch(&format!("dispatch_combine_bwd_{}", T::NAME), config, args)
}
