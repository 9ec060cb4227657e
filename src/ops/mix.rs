//! The VQ-MoE mixing gate (math §6, last bullet): a 2-way softmax over per-token logits
//! `l [T, 2]` (f32; the gate family's linear form with E = 2 produces them) mixes a continuous
//! and a discrete path: `y = a0·y_cont + a1·y_disc` with `[a0, a1] = softmax(l)`, rows `[T, d]`
//! of f32, f16 or bf16 (f32 arithmetic, output in the input dtype). Kernels: `kernels/mix.cu`.
//!
//! Backward: `dy_cont = a0·dy`, `dy_disc = a1·dy`, and the logits' gradient
//! `dl0 = a0 a1 (<dy, y_cont> - <dy, y_disc>)`, `dl1 = -dl0` (f32), each dot product reduced in a
//! fixed order (deterministic). The backward recomputes `a` from the logits.
//!
//! **Non-finite logits.** `a0 = sigmoid(l0 - l1)`, `a1 = sigmoid(l1 - l0)`: a NaN logit, or two
//! equal infinities, gives `a0 = a1 = NaN`: the token's output row is NaN and the mix routes it
//! nowhere, so its `dy_cont`, `dy_disc` and `dlogits` are exact zeros (it adds nothing to either
//! path's or the gate's gradients). One infinite logit against a finite one gives the limit
//! `(1, 0)` or `(0, 1)`; a weight of exactly 0 passes exactly 0 gradient, whatever `dy` holds.
//!
//! **Alignment.** Any row tensor may be a view at any element: rows move 16 bytes at a time only
//! when d is a multiple of the 16-byte vector and every row tensor of the call starts 16-byte
//! aligned, else element by element.
//!
//! One launch per op; no host sync.
use super::{FloatElement, check_len, check_range, elements, grid_blocks};
use crate::device::{KernelArgs, LaunchConfig};
use crate::{Device, DeviceSlice, DeviceSliceMut, Error, Result};

/// One warp per token, 8 tokens per block.
const THREADS: u32 = 256;
const TOKENS_PER_BLOCK: usize = THREADS as usize / 32;

/// Elements of one `[T, d]` row tensor of the mix.
pub fn rows_len(tokens: usize, d: usize) -> Result<usize> {
    elements("d", tokens, d)
}

/// Checks the logits `[T, 2]`, d, and that every row tensor holds `[T, d]`; returns T.
fn check_shapes<T: FloatElement>(
    logits: &impl DeviceSlice<f32>,
    d: usize,
    rows: &[(&'static str, usize)],
) -> Result<usize> {
    if logits.len() % 2 != 0 {
        return Err(Error::Shape {
            argument: "logits",
            expected: "[T, 2] (an even number of f32 elements)".into(),
            got: format!("{} elements", logits.len()),
        });
    }
    check_range("d", d, 1..=i32::MAX as usize)?;
    let tokens = logits.len() / 2;
    let expected = rows_len(tokens, d)?;
    for &(argument, len) in rows {
        if len != expected {
            return Err(Error::Shape {
                argument,
                expected: format!("[T, d] = [{tokens}, {d}] ({expected} elements of {})", T::NAME),
                got: format!("{len} elements"),
            });
        }
    }
    Ok(tokens)
}

fn launch_config(tokens: usize) -> Result<LaunchConfig> {
    Ok(LaunchConfig::linear(
        grid_blocks("logits", tokens, TOKENS_PER_BLOCK)?,
        THREADS,
        0,
    ))
}

/// `y = a0·y_cont + a1·y_disc` per token, `[a0, a1] = softmax(logits[t])`. `logits` `[T, 2]`;
/// `y_cont`, `y_disc`, `y` `[T, d]`. One launch; no host sync.
pub fn forward<T: FloatElement>(
    device: &Device,
    logits: &impl DeviceSlice<f32>,
    y_cont: &impl DeviceSlice<T>,
    y_disc: &impl DeviceSlice<T>,
    d: usize,
    y: &mut impl DeviceSliceMut<T>,
) -> Result<()> {
    let tokens = check_shapes::<T>(logits, d, &[("y_cont", y_cont.len()), ("y_disc", y_disc.len())])?;
    check_len("y", y, tokens * d, || format!("[T, d] = [{tokens}, {d}]"))?;
    // Matches the kernel's parameters, in order: mix_forward_<T>(logits, y_cont, y_disc, tokens, d, y).
    let args = KernelArgs::new(device)
        .input("logits", logits)
        .input("y_cont", y_cont)
        .input("y_disc", y_disc)
        .scalar(tokens as i64)
        .scalar(d as i32)
        .output("y", y);
    device.launch(&format!("mix_forward_{}", T::NAME), launch_config(tokens)?, args)
}

/// The gradients of [`forward`]'s inputs: `dy_cont = a0·dy`, `dy_disc = a1·dy` (`[T, d]`) and
/// `dlogits` (`[T, 2]`, f32, overwritten). One launch; no host sync.
#[allow(clippy::too_many_arguments)] // the op's inputs and outputs, each a tensor
pub fn backward<T: FloatElement>(
    device: &Device,
    logits: &impl DeviceSlice<f32>,
    y_cont: &impl DeviceSlice<T>,
    y_disc: &impl DeviceSlice<T>,
    dy: &impl DeviceSlice<T>,
    d: usize,
    dy_cont: &mut impl DeviceSliceMut<T>,
    dy_disc: &mut impl DeviceSliceMut<T>,
    dlogits: &mut impl DeviceSliceMut<f32>,
) -> Result<()> {
    let inputs = [("y_cont", y_cont.len()), ("y_disc", y_disc.len()), ("dy", dy.len())];
    let tokens = check_shapes::<T>(logits, d, &inputs)?;
    check_len("dy_cont", dy_cont, tokens * d, || format!("[T, d] = [{tokens}, {d}]"))?;
    check_len("dy_disc", dy_disc, tokens * d, || format!("[T, d] = [{tokens}, {d}]"))?;
    check_len("dlogits", dlogits, logits.len(), || format!("[T, 2] = [{tokens}, 2]"))?;
    // Matches the kernel's parameters, in order: mix_backward_<T>(logits, y_cont, y_disc, dy,
    // tokens, d, dy_cont, dy_disc, dlogits).
    let args = KernelArgs::new(device)
        .input("logits", logits)
        .input("y_cont", y_cont)
        .input("y_disc", y_disc)
        .input("dy", dy)
        .scalar(tokens as i64)
        .scalar(d as i32)
        .output("dy_cont", dy_cont)
        .output("dy_disc", dy_disc)
        .output("dlogits", dlogits);
    device.launch(&format!("mix_backward_{}", T::NAME), launch_config(tokens)?, args)
}
