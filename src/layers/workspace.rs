//! Prefix views of work buffers: layers allocate every buffer once for `max_tokens` tokens
//! and hand the ops the first `len` elements, whose length then matches the call's shapes.
use crate::{BufferView, BufferViewMut, DeviceBuffer, Element, Error, Result};

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
) -> Result<BufferView<'a, T>> {
    check(argument, buffer.len(), len)?;
    buffer.slice(..len)
}

/// `buffer[..len]`, writable.
pub fn prefix_mut<'a, T: Element>(
    argument: &'static str,
    buffer: &'a mut DeviceBuffer<T>,
    len: usize,
) -> Result<BufferViewMut<'a, T>> {
    check(argument, buffer.len(), len)?;
    buffer.slice_mut(..len)
}
