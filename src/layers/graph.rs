//! A layer's pass captured into a [`Graph`] together with the buffers it reads and writes, so
//! replaying it is safe: the layer owns the graph, its input and output buffers, and every work
//! buffer the pass touched, and drops the graph before anything could move one of them.
use crate::device::{BufferView, BufferViewMut, Element, Graph};
use crate::{Device, DeviceBuffer, Error, Result};

/// What a captured pass runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Captures {
    /// The forward: `y` from `x`.
    Forward,
    /// A training step: the forward, then the backward from `dy` (`dx` and every gradient).
    ForwardBackward,
}

/// The buffers of a captured pass, `[T, d]` each (`dy`, `dx` empty for [`Captures::Forward`]):
/// write the next batch into `x` (and `dy`) in place, replay, then read `y` (and `dx`, and the
/// layer's gradients and routing as after an eager pass).
pub struct GraphIo<'a, T: Element> {
    pub x: BufferViewMut<'a, T>,
    pub dy: BufferViewMut<'a, T>,
    pub y: BufferView<'a, T>,
    pub dx: BufferView<'a, T>,
}

/// The layer-side buffers of a captured pass.
pub(crate) struct IoBuffers<T: Element> {
    pub(crate) x: DeviceBuffer<T>,
    pub(crate) dy: DeviceBuffer<T>,
    pub(crate) y: DeviceBuffer<T>,
    pub(crate) dx: DeviceBuffer<T>,
}

impl<T: Element> IoBuffers<T> {
    pub(crate) fn alloc(device: &Device, len: usize, captures: Captures) -> Result<Self> {
        let backward = if captures == Captures::ForwardBackward { len } else { 0 };
        Ok(Self {
            x: device.alloc_zeros(len)?,
            dy: device.alloc_zeros(backward)?,
            y: device.alloc_zeros(len)?,
            dx: device.alloc_zeros(backward)?,
        })
    }
}

/// A captured pass and its buffers.
pub(crate) struct LayerGraph<T: Element> {
    pub(crate) graph: Graph,
    pub(crate) tokens: usize,
    pub(crate) io: IoBuffers<T>,
}

impl<T: Element> LayerGraph<T> {
    pub(crate) fn io(&mut self) -> Result<GraphIo<'_, T>> {
        let IoBuffers { x, dy, y, dx } = &mut self.io;
        Ok(GraphIo {
            x: x.slice_mut(..)?,
            dy: dy.slice_mut(..)?,
            y: y.slice(..)?,
            dx: dx.slice(..)?,
        })
    }
}

/// The error of a replay (or I/O request) on a layer that holds no graph.
pub(crate) fn no_graph() -> Error {
    Error::InvalidArgument {
        argument: "graph",
        value: "none".into(),
        expected: "a graph from capture() (an eager pass, or a change to the layer, drops it)".into(),
    }
}
