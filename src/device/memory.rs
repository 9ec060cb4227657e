//! Typed device memory: [`DeviceBuffer`] (owned, on either device), the [`Element`] types
//! that may live in it, and the [`DeviceSlice`] traits through which ops accept both our
//! buffers and cudarc's own `CudaSlice` / `CudaView` / `CudaViewMut`.
use super::{Device, DeviceKind};
use crate::{Error, Result};
use cudarc::driver::{
    CudaSlice, CudaView, CudaViewMut, DevicePtr, DevicePtrMut, DeviceRepr, SyncOnDrop, ValidAsZeroBits,
};
use std::alloc::Layout;
use std::ptr::NonNull;

mod sealed {
    pub trait Sealed {}
}

/// A type that may live in device memory and cross to a kernel: plain bits, any pattern
/// valid, zero valid.
pub trait Element: sealed::Sealed + bytemuck::Pod + DeviceRepr + ValidAsZeroBits + Send + Sync + 'static {
    /// The name kernels use for it (`f32`, `bf16`, ...).
    const NAME: &'static str;
}
macro_rules! element {
    ($($t:ty => $name:literal),*) => {$(
        impl sealed::Sealed for $t {}
        impl Element for $t { const NAME: &'static str = $name; }
    )*};
}
element!(f32 => "f32", half::f16 => "f16", half::bf16 => "bf16", f64 => "f64", i32 => "i32", u32 => "u32",
         i64 => "i64", u64 => "u64", u8 => "u8", u16 => "u16");

/// Host memory that stands in for device memory on the emulator: zeroed, aligned to 256
/// bytes like `cuMemAlloc`, so kernels' 16-byte vector accesses are aligned.
pub struct HostBuffer<T: Element> {
    ptr: NonNull<T>,
    len: usize,
}

// SAFETY: a HostBuffer owns plain-old-data memory, like Vec<T>.
unsafe impl<T: Element> Send for HostBuffer<T> {}
unsafe impl<T: Element> Sync for HostBuffer<T> {}

const HOST_ALIGN: usize = 256;

/// The bytes of `len` elements of `T`, or an error naming `len` when the count overflows
/// `isize` (no allocation, host or device, can be larger).
pub(crate) fn byte_len<T: Element>(len: usize) -> Result<usize> {
    len.checked_mul(size_of::<T>())
        .filter(|&bytes| bytes <= isize::MAX as usize)
        .ok_or_else(|| Error::InvalidArgument {
            argument: "len",
            value: len.to_string(),
            expected: format!(
                "a buffer of at most {} elements of {}",
                isize::MAX as usize / size_of::<T>(),
                T::NAME
            ),
        })
}

impl<T: Element> HostBuffer<T> {
    fn layout(len: usize) -> Result<Layout> {
        let bytes = byte_len::<T>(len)?;
        Layout::from_size_align(bytes.max(1), HOST_ALIGN).map_err(|e| Error::InvalidArgument {
            argument: "len",
            value: len.to_string(),
            expected: e.to_string(),
        })
    }

    #[cfg_attr(not(feature = "emulator"), allow(dead_code))] // only the emulator allocates these
    pub(crate) fn zeroed(len: usize) -> Result<Self> {
        let layout = Self::layout(len)?;
        // SAFETY: the layout has a non-zero size.
        let raw = unsafe { std::alloc::alloc_zeroed(layout) };
        #[cfg(moe_emu_profile)]
        // SAFETY: registers a live allocation; unregistered in Drop.
        unsafe {
            super::profile::ffi::cuemu_register_buffer(raw.cast(), layout.size())
        };
        let ptr = NonNull::new(raw.cast::<T>()).ok_or_else(|| Error::InvalidArgument {
            argument: "len",
            value: len.to_string(),
            expected: format!("an allocation the host can satisfy ({} bytes failed)", layout.size()),
        })?;
        Ok(Self { ptr, len })
    }

    pub fn as_slice(&self) -> &[T] {
        // SAFETY: ptr is valid for len initialised (zeroed or written) elements.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    pub fn as_mut_slice(&mut self) -> &mut [T] {
        // SAFETY: as above, and &mut self gives exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl<T: Element> Drop for HostBuffer<T> {
    fn drop(&mut self) {
        let layout = Self::layout(self.len).expect("layout was valid at allocation");
        #[cfg(moe_emu_profile)]
        // SAFETY: the allocation was registered in `zeroed`.
        unsafe {
            super::profile::ffi::cuemu_unregister_buffer(self.ptr.as_ptr().cast())
        };
        // SAFETY: allocated in `zeroed` with this layout.
        unsafe { std::alloc::dealloc(self.ptr.as_ptr().cast(), layout) }
    }
}

/// An owned array of `T` on one device; [`slice`](Self::slice) and [`slice_mut`](Self::slice_mut)
/// view a range of it (`src/device/view.rs`), and a range outside it is an error:
///
/// ```
/// # fn main() -> moe_kernels::Result<()> {
/// let device = moe_kernels::Device::emulator()?;
/// let buffer = device.alloc_zeros::<half::bf16>(6)?;
/// let view = buffer.slice(2..5)?; // any element: a view may start unaligned
/// assert_eq!((view.start(), moe_kernels::DeviceSlice::len(&view)), (2, 3));
/// assert!(buffer.slice(4..7).is_err());
/// # Ok(())
/// # }
/// ```
pub enum DeviceBuffer<T: Element> {
    Cuda(CudaSlice<T>),
    Host(HostBuffer<T>),
}

impl<T: Element> DeviceBuffer<T> {
    pub fn len(&self) -> usize {
        match self {
            DeviceBuffer::Cuda(s) => s.len(),
            DeviceBuffer::Host(h) => h.len,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The device kind this buffer lives on.
    pub fn kind(&self) -> DeviceKind {
        match self {
            DeviceBuffer::Cuda(_) => DeviceKind::Cuda,
            DeviceBuffer::Host(_) => DeviceKind::Emulator,
        }
    }
}

impl<T: Element> From<CudaSlice<T>> for DeviceBuffer<T> {
    fn from(s: CudaSlice<T>) -> Self {
        DeviceBuffer::Cuda(s)
    }
}

/// Keeps cudarc's stream-ordering bookkeeping alive until the launch that uses a pointer
/// has been enqueued.
pub struct PtrGuard<'a>(#[allow(dead_code)] Option<SyncOnDrop<'a>>);

/// Read access to device memory for a kernel argument.
///
/// Implemented for [`DeviceBuffer`], its views ([`BufferView`](super::BufferView),
/// [`BufferViewMut`](super::BufferViewMut)) and cudarc's `CudaSlice`, `CudaView` and
/// `CudaViewMut`. Ops and [`Device::download`] read `len()` elements from the address
/// [`kernel_ptr`](Self::kernel_ptr) returns, trusting both without a check they could make:
/// hence an `unsafe trait`.
///
/// # Safety
///
/// An implementation promises, for every `device` on which `kernel_ptr` returns `Ok((ptr, guard))`:
/// - `ptr` is the address of `len()` consecutive, initialised `T`s that stay allocated and
///   are not written by anyone else while `guard` and the borrow of `self` live: device memory
///   in `device`'s context on the CUDA device, host memory on the emulator;
/// - `ptr` is aligned to `align_of::<T>()`;
/// - `len()` returns the same value for as long as `self` is borrowed.
///
/// A wrapper that forwards `kernel_ptr` to another implementation but reports a larger `len()`
/// breaks this contract, and is exactly what the `unsafe` is for:
///
/// ```compile_fail,E0200
/// use moe_kernels::{Device, DeviceBuffer, DeviceSlice, Result};
/// use moe_kernels::device::memory::PtrGuard;
///
/// struct Liar(DeviceBuffer<f32>);
/// // Without `unsafe impl` this does not compile: a safe impl cannot lie about its length.
/// impl DeviceSlice<f32> for Liar {
///     fn len(&self) -> usize {
///         1 << 40
///     }
///     fn kernel_ptr<'a>(&'a self, device: &'a Device, argument: &'static str) -> Result<(u64, PtrGuard<'a>)> {
///         self.0.kernel_ptr(device, argument)
///     }
/// }
/// ```
pub unsafe trait DeviceSlice<T: Element> {
    /// The number of `T` elements at [`kernel_ptr`](Self::kernel_ptr).
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The address a kernel on `device` reads this memory at.
    fn kernel_ptr<'a>(&'a self, device: &'a Device, argument: &'static str) -> Result<(u64, PtrGuard<'a>)>;
}

/// Write access to device memory for a kernel argument.
///
/// # Safety
///
/// The [`DeviceSlice`] contract, for [`kernel_ptr_mut`](Self::kernel_ptr_mut) too, and: the
/// `len()` elements at the address it returns may be written by a kernel on `device` while the
/// returned guard and the mutable borrow of `self` live, and nothing else reads or writes them
/// meanwhile.
pub unsafe trait DeviceSliceMut<T: Element>: DeviceSlice<T> {
    /// The address a kernel on `device` writes this memory at.
    fn kernel_ptr_mut<'a>(&'a mut self, device: &'a Device, argument: &'static str) -> Result<(u64, PtrGuard<'a>)>;
}

fn wrong_device(argument: &'static str, device: &Device, found: DeviceKind) -> Error {
    Error::WrongDevice {
        argument,
        expected: device.kind().name(),
        found: found.name(),
    }
}

// SAFETY: `len` is the allocation's length; a host buffer's pointer is handed out only to the
// emulator, a CUDA buffer's through cudarc (which checks the stream's context).
unsafe impl<T: Element> DeviceSlice<T> for DeviceBuffer<T> {
    fn len(&self) -> usize {
        DeviceBuffer::len(self)
    }
    fn kernel_ptr<'a>(&'a self, device: &'a Device, argument: &'static str) -> Result<(u64, PtrGuard<'a>)> {
        match self {
            DeviceBuffer::Cuda(s) => s.kernel_ptr(device, argument),
            DeviceBuffer::Host(h) if device.kind() == DeviceKind::Emulator => {
                Ok((h.ptr.as_ptr() as u64, PtrGuard(None)))
            }
            DeviceBuffer::Host(_) => Err(wrong_device(argument, device, DeviceKind::Emulator)),
        }
    }
}

// SAFETY: as for `DeviceSlice`; `&mut self` makes the access exclusive.
unsafe impl<T: Element> DeviceSliceMut<T> for DeviceBuffer<T> {
    fn kernel_ptr_mut<'a>(&'a mut self, device: &'a Device, argument: &'static str) -> Result<(u64, PtrGuard<'a>)> {
        match self {
            DeviceBuffer::Cuda(s) => s.kernel_ptr_mut(device, argument),
            DeviceBuffer::Host(h) if device.kind() == DeviceKind::Emulator => {
                Ok((h.ptr.as_ptr() as u64, PtrGuard(None)))
            }
            DeviceBuffer::Host(_) => Err(wrong_device(argument, device, DeviceKind::Emulator)),
        }
    }
}

// cudarc's own types: what a cudarc user already holds, usable on the CUDA device.
macro_rules! cudarc_slice {
    ($($ty:ty),*) => {$(
        // SAFETY: cudarc's length and device pointer of the same slice, with its stream guard.
        unsafe impl<T: Element> DeviceSlice<T> for $ty {
            fn len(&self) -> usize {
                cudarc::driver::DeviceSlice::len(self)
            }
            fn kernel_ptr<'a>(&'a self, device: &'a Device, argument: &'static str) -> Result<(u64, PtrGuard<'a>)> {
                let stream = device.cuda_stream().ok_or_else(|| wrong_device(argument, device, DeviceKind::Cuda))?;
                let (ptr, guard) = self.device_ptr(stream);
                Ok((ptr, PtrGuard(Some(guard))))
            }
        }
    )*};
}
macro_rules! cudarc_slice_mut {
    ($($ty:ty),*) => {$(
        // SAFETY: as above, through a mutable borrow.
        unsafe impl<T: Element> DeviceSliceMut<T> for $ty {
            fn kernel_ptr_mut<'a>(&'a mut self, device: &'a Device, argument: &'static str) -> Result<(u64, PtrGuard<'a>)> {
                let stream = device.cuda_stream().ok_or_else(|| wrong_device(argument, device, DeviceKind::Cuda))?;
                let (ptr, guard) = self.device_ptr_mut(stream);
                Ok((ptr, PtrGuard(Some(guard))))
            }
        }
    )*};
}
cudarc_slice!(CudaSlice<T>, CudaView<'_, T>, CudaViewMut<'_, T>);
cudarc_slice_mut!(CudaSlice<T>, CudaViewMut<'_, T>);
