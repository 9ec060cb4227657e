//! The one launch path: an op builds a [`KernelArgs`] and a [`LaunchConfig`] once, and
//! `Device::launch` hands them to whichever device runs it.
//!
//! Arguments are packed as `cuLaunchKernel` wants them (`kernelParams`: one pointer per
//! argument, pointing at its value), which is also what the emulator's launchers take.
//! Every value sits in its own 8-byte slot; a 4-byte scalar occupies the low half, which is
//! where a little-endian reader of 4 bytes finds it.
use super::Device;
use super::memory::{DeviceSlice, DeviceSliceMut, Element, PtrGuard};
use crate::{Error, Result};

/// Grid, block and dynamic shared memory of one launch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LaunchConfig {
    pub grid: (u32, u32, u32),
    pub block: (u32, u32, u32),
    pub shared_bytes: u32,
}

impl LaunchConfig {
    /// A 1-D launch: `blocks` blocks of `threads` threads.
    pub fn linear(blocks: u32, threads: u32, shared_bytes: u32) -> Self {
        Self {
            grid: (blocks, 1, 1),
            block: (threads, 1, 1),
            shared_bytes,
        }
    }

    /// Checks CUDA's limits (the same on every device: sm_80 and newer), with the device's
    /// own ceiling on shared memory per block, which `static_shared_bytes` (the kernel's
    /// `__shared__` arrays) and the dynamic shared memory share. The reason names the
    /// offending value.
    pub(super) fn validate(&self, static_shared_bytes: u32, max_shared_bytes: u32) -> std::result::Result<(), String> {
        let (bx, by, bz) = self.block;
        let threads = bx as u64 * by as u64 * bz as u64;
        if threads == 0 || threads > 1024 || bz > 64 {
            return Err(format!(
                "block ({bx},{by},{bz}) must have 1 to 1024 threads and z <= 64"
            ));
        }
        let (gx, gy, gz) = self.grid;
        if gx == 0 || gx > i32::MAX as u32 || gy == 0 || gy > 65535 || gz == 0 || gz > 65535 {
            return Err(format!(
                "grid ({gx},{gy},{gz}) must be 1..2^31-1 in x and 1..65535 in y and z"
            ));
        }
        if self.shared_bytes as u64 + static_shared_bytes as u64 > max_shared_bytes as u64 {
            return Err(format!(
                "dynamic shared memory of {} bytes (+ {static_shared_bytes} static) exceeds the device's {max_shared_bytes}",
                self.shared_bytes
            ));
        }
        Ok(())
    }
}

/// A scalar kernel argument: its bits and its size as the kernel declares it.
pub trait KernelScalar: Copy {
    fn bits(self) -> (u64, u16);
}
macro_rules! scalar {
    ($($t:ty => |$v:ident| $bits:expr),*) => {$(
        impl KernelScalar for $t { fn bits(self) -> (u64, u16) { let $v = self; ($bits, size_of::<$t>() as u16) } }
    )*};
}
scalar!(i32 => |v| v as u32 as u64, u32 => |v| v as u64, i64 => |v| v as u64, u64 => |v| v,
        f32 => |v| v.to_bits() as u64, f64 => |v| v.to_bits());

/// The argument list of one launch, in the kernel's parameter order.
pub struct KernelArgs<'a> {
    device: &'a Device,
    pub(super) values: Vec<u64>,
    pub(super) sizes: Vec<u16>,
    guards: Vec<PtrGuard<'a>>,
    error: Option<Error>,
}

impl<'a> KernelArgs<'a> {
    pub fn new(device: &'a Device) -> Self {
        Self {
            device,
            values: vec![],
            sizes: vec![],
            guards: vec![],
            error: None,
        }
    }

    /// The argument list of a recorded launch (graph replay): raw bits, no borrows.
    #[cfg(feature = "emulator")]
    pub(super) fn recorded(device: &'a Device, values: Vec<u64>, sizes: Vec<u16>) -> Self {
        Self {
            device,
            values,
            sizes,
            guards: vec![],
            error: None,
        }
    }

    fn pointer(mut self, ptr: Result<(u64, PtrGuard<'a>)>) -> Self {
        match ptr {
            Ok((p, guard)) => {
                self.values.push(p);
                self.sizes.push(8);
                self.guards.push(guard);
            }
            Err(e) => {
                self.error.get_or_insert(e);
                self.values.push(0);
                self.sizes.push(8);
            }
        }
        self
    }

    /// A `const T*` parameter.
    pub fn input<T: Element>(self, argument: &'static str, buffer: &'a impl DeviceSlice<T>) -> Self {
        let device = self.device;
        self.pointer(buffer.kernel_ptr(device, argument))
    }

    /// A `T*` parameter the kernel writes.
    pub fn output<T: Element>(self, argument: &'static str, buffer: &'a mut impl DeviceSliceMut<T>) -> Self {
        let device = self.device;
        self.pointer(buffer.kernel_ptr_mut(device, argument))
    }

    /// An optional `const T*` parameter: the null pointer when `buffer` is `None`.
    pub fn input_or_null<T: Element, S: DeviceSlice<T>>(self, argument: &'static str, buffer: Option<&'a S>) -> Self {
        match buffer {
            Some(b) => self.input(argument, b),
            None => self.scalar(0u64),
        }
    }

    /// An optional `T*` parameter the kernel writes: the null pointer when `buffer` is `None`.
    pub fn output_or_null<T: Element, S: DeviceSliceMut<T>>(
        self,
        argument: &'static str,
        buffer: Option<&'a mut S>,
    ) -> Self {
        match buffer {
            Some(b) => self.output(argument, b),
            None => self.scalar(0u64),
        }
    }

    /// A scalar parameter; its Rust type must match the kernel's (i32 for `int`, ...).
    pub fn scalar(mut self, value: impl KernelScalar) -> Self {
        let (bits, size) = value.bits();
        self.values.push(bits);
        self.sizes.push(size);
        self
    }

    /// The first error met while adding arguments (a buffer on the wrong device).
    pub(super) fn check(&mut self) -> Result<()> {
        self.error.take().map_or(Ok(()), Err)
    }

    /// `kernelParams`: pointers to each value. Valid while `self` is neither moved nor changed.
    pub(super) fn param_pointers(&mut self) -> Vec<*mut std::ffi::c_void> {
        self.values.iter_mut().map(|v| (v as *mut u64).cast()).collect()
    }
}
