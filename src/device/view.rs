//! Sub-slices of a [`DeviceBuffer`]: [`BufferView`] (read) and [`BufferViewMut`] (write),
//! what `&buf[range]` and `&mut buf[range]` are for a `Vec`.
//!
//! A view starts at `base + start * size_of::<T>()`, on either device, so it can start at
//! any element: a 16-bit view at an odd element is 2 bytes off a 16-byte boundary, exactly
//! like the `CudaView`s cudarc users pass in. Ops check the alignment they need from the
//! pointer they are given (see each family's module docs), so views are how tests reach the
//! unaligned paths on the emulator.
//!
//! On the GPU a view hands out its buffer's pointer and cudarc's stream-ordering guard for
//! the whole buffer (conservative: a kernel that writes a view is ordered like one that
//! writes the buffer), moved by the view's offset.
use super::Device;
use super::memory::{DeviceBuffer, DeviceSlice, DeviceSliceMut, Element, PtrGuard};
use crate::{Error, Result};
use std::ops::{Bound, Range, RangeBounds};

/// `buffer[range]`, read-only.
pub struct BufferView<'a, T: Element> {
    buffer: &'a DeviceBuffer<T>,
    start: usize,
    len: usize,
}

/// `buffer[range]`, writable.
pub struct BufferViewMut<'a, T: Element> {
    buffer: &'a mut DeviceBuffer<T>,
    start: usize,
    len: usize,
}

/// The element range `range` selects in a slice of `len` elements, or an error naming `range`.
fn resolve(range: impl RangeBounds<usize>, len: usize) -> Result<Range<usize>> {
    let start = match range.start_bound() {
        Bound::Included(&s) => Some(s),
        Bound::Excluded(&s) => s.checked_add(1),
        Bound::Unbounded => Some(0),
    };
    let end = match range.end_bound() {
        Bound::Included(&e) => e.checked_add(1),
        Bound::Excluded(&e) => Some(e),
        Bound::Unbounded => Some(len),
    };
    match (start, end) {
        (Some(start), Some(end)) if start <= end && end <= len => Ok(start..end),
        _ => Err(Error::InvalidArgument {
            argument: "range",
            value: format!("{:?}..{:?}", range.start_bound(), range.end_bound()),
            expected: format!("a range of elements within 0..{len} with start <= end"),
        }),
    }
}

/// The kernel pointer of `start` elements past `base`'s.
fn offset<T: Element>(base: Result<(u64, PtrGuard<'_>)>, start: usize) -> Result<(u64, PtrGuard<'_>)> {
    // In bounds of a live allocation by construction, so the sum cannot overflow.
    base.map(|(ptr, guard)| (ptr + (start * size_of::<T>()) as u64, guard))
}

impl<T: Element> DeviceBuffer<T> {
    /// The elements `range` of this buffer, read-only; an error naming `range` when it is
    /// not within `0..len()`.
    pub fn slice(&self, range: impl RangeBounds<usize>) -> Result<BufferView<'_, T>> {
        let r = resolve(range, self.len())?;
        Ok(BufferView {
            buffer: self,
            start: r.start,
            len: r.len(),
        })
    }

    /// The elements `range` of this buffer, writable.
    pub fn slice_mut(&mut self, range: impl RangeBounds<usize>) -> Result<BufferViewMut<'_, T>> {
        let r = resolve(range, self.len())?;
        Ok(BufferViewMut {
            buffer: self,
            start: r.start,
            len: r.len(),
        })
    }
}

impl<'a, T: Element> BufferView<'a, T> {
    /// The first element's index in the buffer.
    pub fn start(&self) -> usize {
        self.start
    }

    /// A view of the elements `range` of this view.
    pub fn slice(&self, range: impl RangeBounds<usize>) -> Result<BufferView<'a, T>> {
        let r = resolve(range, self.len)?;
        Ok(BufferView {
            buffer: self.buffer,
            start: self.start + r.start,
            len: r.len(),
        })
    }
}

impl<T: Element> BufferViewMut<'_, T> {
    /// The first element's index in the buffer.
    pub fn start(&self) -> usize {
        self.start
    }

    /// A writable view of the elements `range` of this view.
    pub fn slice_mut(&mut self, range: impl RangeBounds<usize>) -> Result<BufferViewMut<'_, T>> {
        let r = resolve(range, self.len)?;
        Ok(BufferViewMut {
            buffer: &mut *self.buffer,
            start: self.start + r.start,
            len: r.len(),
        })
    }
}

// SAFETY: `resolve` kept `start..start + len` within the buffer, which the view borrows.
unsafe impl<T: Element> DeviceSlice<T> for BufferView<'_, T> {
    fn len(&self) -> usize {
        self.len
    }
    fn kernel_ptr<'a>(&'a self, device: &'a Device, argument: &'static str) -> Result<(u64, PtrGuard<'a>)> {
        offset::<T>(self.buffer.kernel_ptr(device, argument), self.start)
    }
}

// SAFETY: as for `BufferView`.
unsafe impl<T: Element> DeviceSlice<T> for BufferViewMut<'_, T> {
    fn len(&self) -> usize {
        self.len
    }
    fn kernel_ptr<'a>(&'a self, device: &'a Device, argument: &'static str) -> Result<(u64, PtrGuard<'a>)> {
        offset::<T>(self.buffer.kernel_ptr(device, argument), self.start)
    }
}

// SAFETY: as for `BufferView`; the view borrows its buffer mutably.
unsafe impl<T: Element> DeviceSliceMut<T> for BufferViewMut<'_, T> {
    fn kernel_ptr_mut<'a>(&'a mut self, device: &'a Device, argument: &'static str) -> Result<(u64, PtrGuard<'a>)> {
        offset::<T>(self.buffer.kernel_ptr_mut(device, argument), self.start)
    }
}

#[cfg(all(test, feature = "emulator"))]
mod tests {
    use super::*;

    fn emulator() -> Device {
        Device::emulator().expect("the emulator is compiled in")
    }

    fn address(device: &Device, slice: &impl DeviceSlice<f32>) -> u64 {
        slice.kernel_ptr(device, "slice").expect("pointer").0
    }

    #[test]
    fn a_view_starts_at_its_element() {
        let device = emulator();
        let data: Vec<f32> = (0..10).map(|i| i as f32).collect();
        let buffer = device.upload(&data).unwrap();
        let view = buffer.slice(3..7).unwrap();
        assert_eq!((view.start(), view.len()), (3, 4));
        assert_eq!(address(&device, &view), address(&device, &buffer) + 12);
        assert_eq!(device.download(&view).unwrap(), &data[3..7]);
        let inner = view.slice(1..=2).unwrap();
        assert_eq!((inner.start(), inner.len()), (4, 2));
        assert_eq!(device.download(&inner).unwrap(), &data[4..6]);
        assert_eq!(device.download(&buffer.slice(..).unwrap()).unwrap(), data);
        assert!(buffer.slice(10..).unwrap().is_empty());
    }

    #[test]
    fn writes_through_a_view_land_in_its_range_only() {
        let device = emulator();
        let mut buffer = device.upload(&[1.0f32; 8]).unwrap();
        let mut view = buffer.slice_mut(2..6).unwrap();
        device.fill_zeros(&mut view.slice_mut(1..).unwrap()).unwrap();
        assert_eq!(view.start(), 2);
        assert_eq!(device.download(&view).unwrap(), [1.0, 0.0, 0.0, 0.0]);
        assert_eq!(
            device.download(&buffer).unwrap(),
            [1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 1.0, 1.0]
        );
    }

    #[test]
    fn a_range_outside_the_buffer_is_an_error_naming_it() {
        let device = emulator();
        let mut buffer = device.alloc_zeros::<f32>(4).unwrap();
        #[allow(clippy::reversed_empty_ranges)]
        let bad = [
            buffer.slice(2..5).err(),
            buffer.slice(5..).err(),
            buffer.slice(3..2).err(),
            buffer.slice(..=4).err(),
            buffer.slice((Bound::Excluded(usize::MAX), Bound::Unbounded)).err(),
            buffer.slice(1..3).unwrap().slice(1..3).err(),
            buffer.slice_mut(0..5).err(),
        ];
        for err in bad {
            assert!(
                matches!(err, Some(Error::InvalidArgument { argument: "range", .. })),
                "{err:?}"
            );
        }
    }
}
