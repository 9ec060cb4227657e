//! What every op-family bench shares: the op's floor (the least memory traffic and math
//! any implementation must do), and on a GPU the fraction of that floor a run achieves.
//!
//! Without a GPU a bench times the CPU reference and the emulator only, and says so: it
//! never prints a GPU figure it did not measure.
#![allow(dead_code)]

use moe_kernels::device::{Device, DeviceKind, available_devices};
use std::time::Instant;

/// The least work of one call: every input read once, every output written once.
#[derive(Debug, Clone, Copy, Default)]
pub struct Floor {
    pub bytes: u64,
    pub flops: u64,
}

impl Floor {
    pub fn describe(&self) -> String {
        format!("floor: {:.3} MB moved, {:.3} MFLOP", self.bytes as f64 / 1e6, self.flops as f64 / 1e6)
    }
}

/// Every device available here; a missing GPU is reported once per bench binary.
pub fn devices() -> Vec<Device> {
    let list = available_devices().expect("device list");
    for (kind, why) in &list.skipped {
        if *kind == DeviceKind::Cuda {
            eprintln!("no GPU here ({why}): benching the CPU reference and the emulator only");
        }
    }
    list.devices
}

/// The GPU's peak DRAM bandwidth in bytes/s, from the driver's memory clock and bus width
/// (double data rate).
fn peak_bandwidth(device: &Device) -> Option<f64> {
    use cudarc::driver::sys::CUdevice_attribute::*;
    let Device::Cuda(cuda) = device else { return None };
    let ctx = cuda.stream().context();
    let clock_khz = ctx.attribute(CU_DEVICE_ATTRIBUTE_MEMORY_CLOCK_RATE).ok()? as f64;
    let bus_bits = ctx.attribute(CU_DEVICE_ATTRIBUTE_GLOBAL_MEMORY_BUS_WIDTH).ok()? as f64;
    Some(2.0 * clock_khz * 1e3 * bus_bits / 8.0)
}

/// Dense bf16/f16 tensor-core peak in flop/s, by architecture, from NVIDIA's data sheets
/// (A100 SXM: 312 TFLOP/s; H100 SXM: 989 TFLOP/s). Other parts report bandwidth only.
fn peak_tensor_flops(device: &Device) -> Option<f64> {
    let Device::Cuda(cuda) = device else { return None };
    match cuda.arch() {
        80 => Some(312e12),
        90 => Some(989e12),
        _ => None,
    }
}

/// On a GPU: times `op` (after a warm-up, with one sync around the batch) and prints the
/// achieved time and the fraction of the bandwidth and tensor-core floors. Elsewhere: nothing.
pub fn report_gpu_fraction(name: &str, device: &Device, floor: Floor, mut op: impl FnMut()) {
    let Some(bandwidth) = peak_bandwidth(device) else { return };
    const ITERS: u32 = 50;
    op();
    device.synchronize().expect("sync");
    let start = Instant::now();
    for _ in 0..ITERS {
        op();
    }
    device.synchronize().expect("sync");
    let seconds = start.elapsed().as_secs_f64() / ITERS as f64;
    let memory_floor = floor.bytes as f64 / bandwidth;
    let mut line = format!(
        "{name} on {}: {:.2} us; memory floor {:.2} us ({:.0}% of peak bandwidth)",
        device.description(),
        seconds * 1e6,
        memory_floor * 1e6,
        100.0 * memory_floor / seconds
    );
    if let Some(flops) = peak_tensor_flops(device).filter(|_| floor.flops > 0) {
        let math_floor = floor.flops as f64 / flops;
        line += &format!(
            "; tensor-core floor {:.2} us ({:.0}% of peak)",
            math_floor * 1e6,
            100.0 * math_floor / seconds
        );
    }
    println!("{line}");
}
