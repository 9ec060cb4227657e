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

/// A layer's eager passes, run on a captured pass's own buffers (the layer's public `forward`
/// and `backward` drop its graph first; these do not).
pub(crate) trait EagerPass<T: Element> {
    /// Whether the layer may capture a backward ([`Captures::ForwardBackward`]).
    fn trains(&self) -> bool;
    fn eager_forward(&mut self, x: &DeviceBuffer<T>, tokens: usize, y: &mut DeviceBuffer<T>) -> Result<()>;
    fn eager_backward(&mut self, x: &DeviceBuffer<T>, dy: &DeviceBuffer<T>, dx: &mut DeviceBuffer<T>) -> Result<()>;
    /// After a replay that failed part-way: the layer's map workspaces may hold a count, so the
    /// next pass must clear them (`Scratch::forget_zeroed`).
    fn forget_zeroed_workspaces(&mut self);
}

/// A layer's `capture`: checks `tokens` (`1..=max_tokens`) and that a backward is only captured
/// by a layer that trains, allocates the I/O buffers (`[tokens, dim]`), runs the pass once eagerly
/// (loading every kernel, sizing every workspace), then captures it: no allocation and no host
/// sync inside.
pub(crate) fn capture_pass<T: Element, L: EagerPass<T>>(
    layer: &mut L,
    device: &Device,
    (tokens, max_tokens, dim): (usize, usize, usize),
    captures: Captures,
) -> Result<LayerGraph<T>> {
    crate::ops::check_range("tokens", tokens, 1..=max_tokens)?;
    if captures == Captures::ForwardBackward && !layer.trains() {
        return Err(Error::InvalidArgument {
            argument: "captures",
            value: "ForwardBackward".into(),
            expected: "Forward for a Mode::Inference layer".into(),
        });
    }
    let mut io = IoBuffers::alloc(device, tokens * dim, captures)?;
    let pass = |layer: &mut L, io: &mut IoBuffers<T>| -> Result<()> {
        layer.eager_forward(&io.x, tokens, &mut io.y)?;
        if captures == Captures::ForwardBackward {
            layer.eager_backward(&io.x, &io.dy, &mut io.dx)?;
        }
        Ok(())
    };
    pass(layer, &mut io)?;
    let graph = device.capture(|| pass(layer, &mut io))?;
    Ok(LayerGraph { graph, tokens, io })
}

/// A layer's `replay` of its graph (an `Err` when it holds none).
///
/// # Safety
/// Every buffer the captured pass touched is still where it was at the capture: the layer owns
/// them (or `graph` does: its I/O) and drops `graph` before replacing any.
pub(crate) unsafe fn replay_graph<T: Element>(device: &Device, graph: Option<&LayerGraph<T>>) -> Result<()> {
    let graph = graph.ok_or_else(no_graph)?;
    // SAFETY: the caller's contract.
    unsafe { device.replay(&graph.graph) }
}

/// The error of a replay (or I/O request) on a layer that holds no graph.
pub(crate) fn no_graph() -> Error {
    Error::InvalidArgument {
        argument: "graph",
        value: "none".into(),
        expected: "a graph from capture() (an eager pass, or a change to the layer, drops it)".into(),
    }
}

/// The graph API every layer shares (`capture`, `graph_io`, `replay`, `graph_tokens`), expanded
/// inside the `impl` of a layer with fields `device`, `config` and `graph: Option<LayerGraph<T>>`
/// that implements [`EagerPass`] and drops `graph` in every method that could replace a buffer
/// the pass touches (its eager passes, a new mask, mutable weights or gradients).
macro_rules! layer_graph_methods {
    () => {
        /// Captures a pass over `tokens` tokens into a graph the layer keeps, with its own `x`,
        /// `y` (and `dy`, `dx`) buffers ([`graph_io`](Self::graph_io)):
        /// [`replay`](Self::replay) then runs the whole pass as one submission, reading whatever
        /// those buffers hold, with the results (outputs, routing, gradients, losses) exactly
        /// those of an eager pass on the same inputs. At decode, where every launch costs more
        /// than its work, this removes the launch gaps. The layer runs the pass once eagerly
        /// first (loading every kernel, sizing every workspace), then captures it: no
        /// allocation and no host sync inside. An eager `forward`/`backward`, a new mask, or
        /// handing out the weights or gradients mutably drops the graph.
        /// [`Captures::ForwardBackward`](crate::layers::Captures::ForwardBackward) needs a
        /// layer that trains ([`Mode::Training`](crate::layers::Mode::Training)).
        pub fn capture(&mut self, tokens: usize, captures: crate::layers::Captures) -> crate::Result<()> {
            self.graph = None;
            let device = self.device.clone();
            let sizes = (tokens, self.config.max_tokens, self.config.dim);
            self.graph = Some(crate::layers::graph::capture_pass(
                self, &device, sizes, captures,
            )?);
            Ok(())
        }

        /// The captured pass's buffers: write the next batch into `x` (and `dy`), read `y`
        /// (and `dx`).
        pub fn graph_io(&mut self) -> crate::Result<crate::layers::GraphIo<'_, T>> {
            self.graph
                .as_mut()
                .ok_or_else(crate::layers::graph::no_graph)?
                .io()
        }

        /// Runs the captured pass again on what its buffers hold now. No host sync. A replay
        /// that fails drops the graph: it may have left a routing map half built, which the
        /// graph (captured with its workspace known zeroed) would not clear.
        pub fn replay(&mut self) -> crate::Result<()> {
            // SAFETY: every buffer the captured pass touched is owned by this layer (weights,
            // work buffers, gradients, mask) or by the graph (its I/O), and none has been
            // replaced since the capture: every method that could replace one drops the graph
            // first (the contract of this macro).
            let replayed = unsafe { crate::layers::graph::replay_graph(&self.device, self.graph.as_ref()) };
            if replayed.is_err() && self.graph.take().is_some() {
                crate::layers::graph::EagerPass::<T>::forget_zeroed_workspaces(self);
            }
            replayed
        }

        /// The token count of the captured pass, if there is one.
        pub fn graph_tokens(&self) -> Option<usize> {
            self.graph.as_ref().map(|g| g.tokens)
        }
    };
}
pub(crate) use layer_graph_methods;
