//! The one launch path: an op builds a [`KernelArgs`] and a [`LaunchConfig`] once, and
//! `Device::launch` hands them to whichever device runs it.
//!
//! Arguments are packed as `cuLaunchKernel` wants them (`kernelParams`: one pointer per
//! argument, pointing at its value), which is also what the emulator's launchers take.
//! Every value sits in its own 8-byte slot; a 4-byte scalar occupies the low half, which is
//! where a little-endian reader of 4 bytes finds it. A tensor map (128 bytes) fills 16 slots,
//! so a recorded launch (graph) keeps it with the other bits.
use super::Device;
use super::memory::{DeviceSlice, DeviceSliceMut, Element, PtrGuard};
use super::tensor_map::{self, TensorMap, TensorMapSpec};
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
    /// Where `param_pointers` copies each tensor map (its 16 slots in `values`) so that the
    /// kernel reads it 64-byte aligned.
    maps: Vec<TensorMap>,
    guards: Vec<PtrGuard<'a>>,
    error: Option<Error>,
}

impl<'a> KernelArgs<'a> {
    pub fn new(device: &'a Device) -> Self {
        Self {
            device,
            values: vec![],
            sizes: vec![],
            maps: vec![],
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
            maps: vec![],
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

    /// A `const __grid_constant__ TensorMap` parameter over `buffer` (TMA loads), checked and
    /// encoded by [`tensor_map::encode`].
    pub fn tensor_map<T: Element>(
        self,
        argument: &'static str,
        buffer: &'a impl DeviceSlice<T>,
        spec: &TensorMapSpec<'_>,
    ) -> Self {
        let device = self.device;
        let bytes = (buffer.len() * size_of::<T>()) as u64;
        self.map(argument, T::NAME, bytes, spec, buffer.kernel_ptr(device, argument))
    }

    /// A tensor map over a buffer the kernel writes (TMA stores).
    pub fn tensor_map_mut<T: Element>(
        self,
        argument: &'static str,
        buffer: &'a mut impl DeviceSliceMut<T>,
        spec: &TensorMapSpec<'_>,
    ) -> Self {
        let device = self.device;
        let bytes = (buffer.len() * size_of::<T>()) as u64;
        self.map(argument, T::NAME, bytes, spec, buffer.kernel_ptr_mut(device, argument))
    }

    fn map(
        mut self,
        argument: &'static str,
        element: &str,
        bytes: u64,
        spec: &TensorMapSpec<'_>,
        ptr: Result<(u64, PtrGuard<'a>)>,
    ) -> Self {
        let map = ptr.and_then(|(address, guard)| {
            self.guards.push(guard);
            tensor_map::encode(self.device, argument, element, address, bytes, spec)
        });
        let words = map.unwrap_or_else(|e| {
            self.error.get_or_insert(e);
            TensorMap([0; 16])
        });
        self.values.extend(words.0); // 16 slots: a recorded launch (graph) keeps the map
        self.sizes.push(size_of::<TensorMap>() as u16);
        self
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
    /// A tensor map (128 bytes) takes 16 slots; its pointer is to an aligned copy in `maps`.
    pub(super) fn param_pointers(&mut self) -> Vec<*mut std::ffi::c_void> {
        const MAP: u16 = size_of::<TensorMap>() as u16;
        self.maps.clear();
        // No reallocation below: the pointers into `maps` stay valid.
        self.maps
            .reserve_exact(self.sizes.iter().filter(|&&size| size == MAP).count());
        let mut slot = 0;
        let mut pointers = Vec::with_capacity(self.sizes.len());
        for &size in &self.sizes {
            if size == MAP {
                let mut map = TensorMap([0; 16]);
                map.0.copy_from_slice(&self.values[slot..slot + 16]);
                self.maps.push(map);
                pointers.push((self.maps.last_mut().expect("just pushed") as *mut TensorMap).cast());
                slot += 16;
            } else {
                pointers.push((&mut self.values[slot] as *mut u64).cast());
                slot += 1;
            }
        }
        pointers
    }
}

#[cfg(all(test, feature = "emulator"))]
mod tests {
    use super::*;
    use crate::device::tensor_map::Swizzle;

    #[test]
    fn a_tensor_map_is_passed_aligned_and_survives_recording() {
        let device = Device::emulator().unwrap();
        let buffer = device.alloc_zeros::<u16>(4096).unwrap();
        let spec = TensorMapSpec {
            dims: &[128, 32],
            strides: &[256],
            box_dims: &[64, 16],
            swizzle: Swizzle::B128,
        };
        let (address, _guard) = buffer.kernel_ptr(&device, "map").unwrap();
        let expected = tensor_map::encode(&device, "map", "u16", address, 8192, &spec).unwrap();
        let mut args = KernelArgs::new(&device)
            .scalar(7i32)
            .tensor_map("map", &buffer, &spec)
            .scalar(9u64);
        args.check().unwrap();
        assert_eq!(args.sizes, [4, 128, 8]);
        let mut replayed = KernelArgs::recorded(&device, args.values.clone(), args.sizes.clone());
        for a in [&mut args, &mut replayed] {
            let p = a.param_pointers();
            assert_eq!(p.len(), 3);
            assert_eq!(p[1] as usize % 64, 0, "the map is not 64-byte aligned");
            // SAFETY: param_pointers points at a live i32 slot, TensorMap and u64 slot of `a`.
            unsafe {
                assert_eq!(*(p[0] as *const i32), 7);
                assert_eq!(*(p[1] as *const TensorMap), expected);
                assert_eq!(*(p[2] as *const u64), 9);
            }
        }
    }
}
