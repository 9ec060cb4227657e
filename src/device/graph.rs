//! Graphs: the stream work of a pass (kernel launches and memsets) recorded once and replayed
//! as a unit, so a decode step pays one submission instead of one launch latency per kernel.
//!
//! - On a GPU, [`Device::capture`] wraps the closure in CUDA stream capture (relaxed mode) and
//!   instantiates the captured graph; [`Device::replay`] launches it on the device's stream.
//! - On the emulator the same calls record the launch list (kernel, configuration, argument
//!   bits) and the memsets, and replay runs them in order, through the same checks as an
//!   eager launch. Capture and replay are therefore tested on any machine.
//!
//! Neither device runs anything while capturing, so the recorded work must be pure stream
//! work: an allocation, upload, download or synchronize inside the closure is an `Err`
//! (it would run at capture time only, or break the capture). A replay reads and writes the
//! buffers the capture saw, by address: the graph does not keep them alive, hence
//! [`Device::replay`] is `unsafe`, and the layers wrap it safely by owning the graph together
//! with every buffer it touches.
// Without the emulator, the recorded work list is built for its counts only (a GPU's stream
// holds the work itself), so its contents and replay helpers go unread there.
#![cfg_attr(not(feature = "emulator"), allow(dead_code, unused_imports, unused_variables))]
use super::{Counters, Device, KernelArgs, LaunchConfig};
use crate::{Error, Result};

/// One recorded unit of stream work (emulator graphs).
#[derive(Debug, Clone)]
pub(crate) enum Recorded {
    Launch {
        name: String,
        config: LaunchConfig,
        values: Vec<u64>,
        sizes: Vec<u16>,
    },
    Memset {
        ptr: u64,
        bytes: usize,
    },
}

enum GraphKind {
    Cuda(cudarc::driver::CudaGraph),
    #[cfg(feature = "emulator")]
    Recorded(Vec<Recorded>),
}

/// Recorded stream work, replayable with [`Device::replay`] on the device that captured it.
pub struct Graph {
    kind: GraphKind,
    launches: u64,
    memsets: u64,
}

impl Graph {
    /// Kernel launches one replay runs.
    pub fn launches(&self) -> u64 {
        self.launches
    }

    /// Memsets one replay runs.
    pub fn memsets(&self) -> u64 {
        self.memsets
    }
}

/// What a device does with stream work while it captures.
#[derive(Debug, Default)]
pub(crate) enum CaptureState {
    #[default]
    Idle,
    /// Counting (and, on the emulator, recording) the work the closure issues.
    Capturing {
        work: Vec<Recorded>,
        launches: u64,
        memsets: u64,
    },
}

impl Device {
    /// Records the stream work `pass` issues on this device into a [`Graph`] instead of running
    /// it. Run the pass once eagerly before capturing it (the GPU loads each kernel's module on
    /// its first launch). `Err` when `pass` fails, when it allocates, copies or synchronizes,
    /// or when a capture is already under way on this device.
    pub fn capture(&self, pass: impl FnOnce() -> Result<()>) -> Result<Graph> {
        {
            let mut state = self.capture_state();
            if matches!(*state, CaptureState::Capturing { .. }) {
                return Err(capturing("capture"));
            }
            *state = CaptureState::Capturing {
                work: vec![],
                launches: 0,
                memsets: 0,
            };
        }
        let begun = match self {
            Device::Cuda(d) => d
                .stream()
                .begin_capture(cudarc::driver::sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED)
                .map_err(Error::from),
            #[cfg(feature = "emulator")]
            Device::Emulator(_) => Ok(()),
        };
        let ran = begun.and_then(|()| pass());
        let CaptureState::Capturing {
            work,
            launches,
            memsets,
        } = std::mem::take(&mut *self.capture_state())
        else {
            unreachable!("only capture() leaves the capturing state");
        };
        let kind = match self {
            Device::Cuda(d) => {
                // End the capture even when the pass failed, so the stream is usable again.
                let graph = d.stream().end_capture(cudarc::driver::sys::CUgraphInstantiate_flags(0));
                ran?;
                GraphKind::Cuda(graph?.ok_or_else(|| Error::LaunchFailed("the capture recorded no graph".into()))?)
            }
            #[cfg(feature = "emulator")]
            Device::Emulator(_) => {
                ran?;
                GraphKind::Recorded(work)
            }
        };
        Ok(Graph {
            kind,
            launches,
            memsets,
        })
    }

    /// Runs `graph`'s work again, with whatever the buffers it touches hold now. No host sync.
    ///
    /// # Safety
    /// Every buffer the captured pass touched must still be alive, at the same address and with
    /// at least the length it had, and `graph` must come from this device's
    /// [`capture`](Self::capture). The layers' `capture` / `replay` methods guarantee this by owning the
    /// graph and those buffers together.
    pub unsafe fn replay(&self, graph: &Graph) -> Result<()> {
        if matches!(*self.capture_state(), CaptureState::Capturing { .. }) {
            return Err(capturing("replay"));
        }
        let counters = self.counters();
        match (&graph.kind, self) {
            (GraphKind::Cuda(g), Device::Cuda(_)) => {
                g.launch()?;
                counters
                    .launches
                    .fetch_add(graph.launches, std::sync::atomic::Ordering::Relaxed);
                counters
                    .memsets
                    .fetch_add(graph.memsets, std::sync::atomic::Ordering::Relaxed);
                Ok(())
            }
            #[cfg(feature = "emulator")]
            (GraphKind::Recorded(work), Device::Emulator(d)) => {
                for item in work {
                    match item {
                        Recorded::Launch {
                            name,
                            config,
                            values,
                            sizes,
                        } => {
                            let index = Counters::bump(&counters.launches);
                            let mut args = KernelArgs::recorded(self, values.clone(), sizes.clone());
                            d.launch(name, *config, &mut args, index)?;
                        }
                        Recorded::Memset { ptr, bytes } => {
                            Counters::bump(&counters.memsets);
                            // SAFETY: the caller guarantees the captured buffers are alive; this
                            // address held `bytes` writable bytes at capture time.
                            unsafe { std::ptr::write_bytes(*ptr as *mut u8, 0, *bytes) };
                        }
                    }
                }
                Ok(())
            }
            #[cfg(feature = "emulator")]
            _ => Err(Error::InvalidArgument {
                argument: "graph",
                value: "a graph captured on another kind of device".into(),
                expected: format!("a graph captured on {}", self.description()),
            }),
        }
    }

    fn capture_state(&self) -> std::sync::MutexGuard<'_, CaptureState> {
        self.counters().capture.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `Err` when a capture is under way: `operation` cannot be part of a graph.
    pub(super) fn refuse_while_capturing(&self, operation: &'static str) -> Result<()> {
        match *self.capture_state() {
            CaptureState::Capturing { .. } => Err(capturing(operation)),
            CaptureState::Idle => Ok(()),
        }
    }

    /// Counts a launch or memset into the capture under way, if any, and says what the caller
    /// does with it (`work` is built only when a capture needs it).
    pub(super) fn record(&self, work: impl FnOnce() -> Recorded) -> Captured {
        let mut state = self.capture_state();
        let CaptureState::Capturing {
            work: list,
            launches,
            memsets,
        } = &mut *state
        else {
            return Captured::No;
        };
        let work = work();
        match &work {
            Recorded::Launch { .. } => *launches += 1,
            Recorded::Memset { .. } => *memsets += 1,
        }
        match self {
            Device::Cuda(_) => Captured::ByStream,
            #[cfg(feature = "emulator")]
            Device::Emulator(_) => {
                list.push(work);
                Captured::Recorded
            }
        }
    }
}

/// What happens to a launch or memset issued while a device may be capturing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Captured {
    /// No capture: run it and count it.
    No,
    /// The GPU's stream captures it: issue it, but do not count it as run.
    ByStream,
    /// The emulator recorded it: do not run it.
    Recorded,
}

fn capturing(operation: &'static str) -> Error {
    Error::InvalidArgument {
        argument: "capture",
        value: format!("{operation} while a graph capture is under way"),
        expected: "only kernel launches and memsets inside Device::capture".into(),
    }
}
