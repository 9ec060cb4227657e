//! Prefix views of work buffers: layers allocate every buffer once for `max_tokens` tokens
//! and hand the ops the first `len` elements, whose length then matches the call's shapes.
use crate::device::memory::PtrGuard;
use crate::{Device, DeviceBuffer, DeviceSlice, DeviceSliceMut, Element, Error, Result};

/// The first `len` elements of a buffer, read-only.
pub struct Prefix<'a, T: Element> {
    buffer: &'a DeviceBuffer<T>,
    len: usize,
}

/// The first `len` elements of a buffer, writable.
pub struct PrefixMut<'a, T: Element> {
    buffer: &'a mut DeviceBuffer<T>,
    len: usize,
}

fn check(argument: &'static str, capacity: usize, len: usize) -> Result<()> {
    if len <= capacity {
        return Ok(());
    }
    Err(Error::Shape {
        argument,
        expected: format!("at most {capacity} elements (the buffer sized for max_tokens)"),
        got: format!("{len} elements"),
    })
}

/// `buffer[..len]`, or an error naming `argument` when the buffer is shorter.
pub fn prefix<'a, T: Element>(
    argument: &'static str,
    buffer: &'a DeviceBuffer<T>,
    len: usize,
) -> Result<Prefix<'a, T>> {
    check(argument, buffer.len(), len)?;
    Ok(Prefix { buffer, len })
}

/// `buffer[..len]`, writable.
pub fn prefix_mut<'a, T: Element>(
    argument: &'static str,
    buffer: &'a mut DeviceBuffer<T>,
    len: usize,
) -> Result<PrefixMut<'a, T>> {
    check(argument, buffer.len(), len)?;
    Ok(PrefixMut { buffer, len })
}

impl<T: Element> DeviceSlice<T> for Prefix<'_, T> {
    fn len(&self) -> usize {
        self.len
    }
    fn kernel_ptr<'a>(&'a self, device: &'a Device, argument: &'static str) -> Result<(u64, PtrGuard<'a>)> {
        // A prefix starts where its buffer does.
        self.buffer.kernel_ptr(device, argument)
    }
}

impl<T: Element> DeviceSlice<T> for PrefixMut<'_, T> {
    fn len(&self) -> usize {
        self.len
    }
    fn kernel_ptr<'a>(&'a self, device: &'a Device, argument: &'static str) -> Result<(u64, PtrGuard<'a>)> {
        self.buffer.kernel_ptr(device, argument)
    }
}

impl<T: Element> DeviceSliceMut<T> for PrefixMut<'_, T> {
    fn kernel_ptr_mut<'a>(&'a mut self, device: &'a Device, argument: &'static str) -> Result<(u64, PtrGuard<'a>)> {
        self.buffer.kernel_ptr_mut(device, argument)
    }
}
