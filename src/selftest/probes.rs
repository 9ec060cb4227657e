//! Launchers for `kernels/profiler_probes.cu`: kernels whose memory behaviour is known by
//! hand, to validate the emulator's memory profiler (`tests/profiler.rs`). Each launches
//! `blocks` blocks of one warp (32 threads) on fresh buffers.
use crate::Result;
use crate::device::{Device, KernelArgs, LaunchConfig};

/// The probe kernels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Probe {
    Coalesced,
    Vector,
    Strided,
    Broadcast,
    SharedColumns,
    SharedColumnsPadded,
    ReadTwice,
    Atomics,
}

pub const WARP: u32 = 32;

impl Probe {
    pub const ALL: [Probe; 8] = [
        Probe::Coalesced,
        Probe::Vector,
        Probe::Strided,
        Probe::Broadcast,
        Probe::SharedColumns,
        Probe::SharedColumnsPadded,
        Probe::ReadTwice,
        Probe::Atomics,
    ];

    pub fn kernel(self) -> &'static str {
        match self {
            Probe::Coalesced => "probe_coalesced",
            Probe::Vector => "probe_vector",
            Probe::Strided => "probe_strided",
            Probe::Broadcast => "probe_broadcast",
            Probe::SharedColumns => "probe_shared_columns",
            Probe::SharedColumnsPadded => "probe_shared_columns_padded",
            Probe::ReadTwice => "probe_read_twice",
            Probe::Atomics => "probe_atomics",
        }
    }

    /// Floats read and written per thread of the grid (input and output buffer sizes).
    fn floats_per_thread(self) -> (usize, usize) {
        match self {
            Probe::Vector => (4, 4),
            Probe::Strided => (32, 1),
            Probe::SharedColumns | Probe::SharedColumnsPadded => (32, 32),
            _ => (1, 1),
        }
    }

    /// Launches the probe over `blocks` warps.
    pub fn run(self, device: &Device, blocks: u32) -> Result<()> {
        let threads = (blocks * WARP) as usize;
        let (ins, outs) = self.floats_per_thread();
        let x = device.upload(&(0..threads * ins).map(|i| i as f32).collect::<Vec<f32>>())?;
        let mut y = device.alloc_zeros::<f32>(threads * outs)?;
        let mut counter = device.alloc_zeros::<i32>(1)?;
        let config = LaunchConfig::linear(blocks, WARP, 0);
        let args = match self {
            Probe::Atomics => KernelArgs::new(device).output("counter", &mut counter),
            Probe::ReadTwice => KernelArgs::new(device)
                .input("x", &x)
                .output("y", &mut y)
                .scalar(threads as i64),
            _ => KernelArgs::new(device).input("x", &x).output("y", &mut y),
        };
        device.launch(self.kernel(), config, args)
    }
}

/// Every probe, `blocks` warps each.
pub fn run_all(device: &Device, blocks: u32) -> Result<()> {
    Probe::ALL.iter().try_for_each(|p| p.run(device, blocks))
}
