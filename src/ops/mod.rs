//! Safe wrappers of the kernels: one module per op family (`kernels/<family>.cu`).
//!
//! Each op validates every argument (shape, range, dtype) before anything is launched and
//! returns an [`Error`] that names the argument; it then picks the launch configuration and
//! builds the kernel's argument list once, for whichever [`Device`] runs it.
//! Ops never wait for the device: outputs are caller-provided buffers, sized by the
//! family's `*_len` / `*_workspace` helpers.
use crate::device::memory::PtrGuard;
use crate::{Device, DeviceSlice, DeviceSliceMut, Element, Error, Result};

pub mod codebook;
pub mod dispatch;
pub mod esft;
pub mod gate;
pub mod gemm;
pub mod mix;
pub mod router;

/// The floating-point element types kernels read and write: `f32`, `f16`, `bf16`.
/// Kernels compute in f32 whatever the storage type.
pub trait FloatElement: Element {
    fn to_f32(self) -> f32;
    /// Rounds to nearest, ties to even (what the kernels' conversions do).
    fn from_f32(value: f32) -> Self;
}

impl FloatElement for f32 {
    fn to_f32(self) -> f32 {
        self
    }
    fn from_f32(value: f32) -> Self {
        value
    }
}

impl FloatElement for half::f16 {
    fn to_f32(self) -> f32 {
        half::f16::to_f32(self)
    }
    fn from_f32(value: f32) -> Self {
        half::f16::from_f32(value)
    }
}

impl FloatElement for half::bf16 {
    fn to_f32(self) -> f32 {
        half::bf16::to_f32(self)
    }
    fn from_f32(value: f32) -> Self {
        half::bf16::from_f32(value)
    }
}

impl Device {
    /// A new `T` buffer holding `values` rounded to `T` (to nearest, ties to even): f32 host
    /// data into a bf16 or f16 device buffer in one upload.
    ///
    /// ```
    /// # fn main() -> moe_kernels::Result<()> {
    /// let device = moe_kernels::Device::emulator()?;
    /// let weights = device.upload_from_f32::<half::bf16>(&[1.0, 0.1, -3.5])?;
    /// assert_eq!(device.download(&weights)?[1], half::bf16::from_f32(0.1));
    /// # Ok(())
    /// # }
    /// ```
    pub fn upload_from_f32<T: FloatElement>(&self, values: &[f32]) -> Result<crate::DeviceBuffer<T>> {
        self.upload(&values.iter().map(|&v| T::from_f32(v)).collect::<Vec<T>>())
    }
}

/// `Err(Shape)` unless `buffer` holds exactly `expected` elements; `layout` says what the
/// argument is, e.g. `"[T, E] = [5, 8]"`.
pub(crate) fn check_len<T: Element>(
    argument: &'static str,
    buffer: &impl DeviceSlice<T>,
    expected: usize,
    layout: impl FnOnce() -> String,
) -> Result<()> {
    if buffer.len() == expected {
        return Ok(());
    }
    Err(Error::Shape {
        argument,
        expected: format!("{} ({expected} elements of {})", layout(), T::NAME),
        got: format!("{} elements", buffer.len()),
    })
}

/// `Err(InvalidArgument)` unless `value` lies in `range`.
pub(crate) fn check_range<V: PartialOrd + std::fmt::Display>(
    argument: &'static str,
    value: V,
    range: std::ops::RangeInclusive<V>,
) -> Result<()> {
    if range.contains(&value) {
        return Ok(());
    }
    Err(Error::InvalidArgument {
        argument,
        value: value.to_string(),
        expected: format!("a value in {}..={}", range.start(), range.end()),
    })
}

/// `rows * cols` as an element count, or an error naming `argument` when it overflows.
pub(crate) fn elements(argument: &'static str, rows: usize, cols: usize) -> Result<usize> {
    rows.checked_mul(cols).ok_or_else(|| Error::InvalidArgument {
        argument,
        value: format!("{rows} x {cols}"),
        expected: "a tensor whose element count fits in usize".into(),
    })
}

/// Blocks needed to cover `items` with `per_block` items each, within CUDA's grid limit.
pub(crate) fn grid_blocks(argument: &'static str, items: usize, per_block: usize) -> Result<u32> {
    let blocks = items.div_ceil(per_block).max(1);
    u32::try_from(blocks)
        .ok()
        .filter(|&b| b <= i32::MAX as u32)
        .ok_or_else(|| Error::InvalidArgument {
            argument,
            value: items.to_string(),
            expected: format!("at most {} items", (i32::MAX as usize) * per_block),
        })
}

/// A borrowed `dyn` device slice usable where the launch path wants `impl DeviceSlice`.
pub(crate) struct Dyn<'a, T>(pub(crate) &'a dyn DeviceSlice<T>);

// SAFETY: forwards both methods to one implementation.
unsafe impl<T: Element> DeviceSlice<T> for Dyn<'_, T> {
    fn len(&self) -> usize {
        self.0.len()
    }
    fn kernel_ptr<'b>(&'b self, device: &'b Device, argument: &'static str) -> Result<(u64, PtrGuard<'b>)> {
        self.0.kernel_ptr(device, argument)
    }
}

/// A borrowed `dyn` mutable device slice usable where the launch path wants `impl DeviceSliceMut`.
pub(crate) struct DynMut<'a, T>(&'a mut dyn DeviceSliceMut<T>);

// SAFETY: forwards both methods to one implementation.
unsafe impl<T: Element> DeviceSlice<T> for DynMut<'_, T> {
    fn len(&self) -> usize {
        self.0.len()
    }
    fn kernel_ptr<'b>(&'b self, device: &'b Device, argument: &'static str) -> Result<(u64, PtrGuard<'b>)> {
        self.0.kernel_ptr(device, argument)
    }
}

// SAFETY: forwards to one implementation.
unsafe impl<T: Element> DeviceSliceMut<T> for DynMut<'_, T> {
    fn kernel_ptr_mut<'b>(&'b mut self, device: &'b Device, argument: &'static str) -> Result<(u64, PtrGuard<'b>)> {
        self.0.kernel_ptr_mut(device, argument)
    }
}
