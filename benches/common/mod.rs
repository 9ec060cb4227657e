//! What every op-family bench shares: the op's floor (the least memory traffic and math
//! any implementation must do), and on a GPU the fraction of that floor a run achieves.
//!
//! Without a GPU a bench times the CPU reference and the emulator only, and says so: it
//! never prints a GPU figure it did not measure.
#![allow(dead_code)]

use moe_kernels::benchmarks::Record;
use moe_kernels::device::{Device, DeviceKind, available_devices};

/// The least work of one call: every input read once, every output written once.
#[derive(Debug, Clone, Copy, Default)]
pub struct Floor {
    pub bytes: u64,
    pub flops: u64,
}

impl Floor {
    pub fn describe(&self) -> String {
        format!(
            "floor: {:.3} MB moved, {:.3} MFLOP",
            self.bytes as f64 / 1e6,
            self.flops as f64 / 1e6
        )
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
pub fn peak_bandwidth(device: &Device) -> Option<f64> {
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

/// On a GPU: times `run` from cold L2 ([`gpu_seconds`]), prints the
/// achieved time against the op's floor, and the [`Record`] line `scripts/gpu-validate.sh`
/// collects, and returns the seconds. Elsewhere: nothing (`None`).
pub fn report_gpu_fraction(op: &str, shape: &str, device: &Device, floor: Floor, run: impl FnMut()) -> Option<f64> {
    let bandwidth = peak_bandwidth(device)?;
    let seconds = gpu_seconds(device, run);
    let memory_floor = floor.bytes as f64 / bandwidth;
    let tensor_floor = peak_tensor_flops(device)
        .filter(|_| floor.flops > 0)
        .map(|flops| floor.flops as f64 / flops);
    let record = Record {
        op: op.into(),
        shape: shape.into(),
        micros: seconds * 1e6,
        floor_bytes: floor.bytes,
        floor_flops: floor.flops,
        bandwidth_fraction: memory_floor / seconds,
        tensor_fraction: tensor_floor.map(|t| t / seconds),
        versus: None,
    };
    println!(
        "{op} {shape} on {}: {:.2} us, {:.0}% of the bandwidth floor",
        device.description(),
        record.micros,
        100.0 * record.bandwidth_fraction
    );
    println!("{}", record.to_line());
    Some(seconds)
}

/// Mean GPU seconds of one call of `run`, from cold L2: before each call a memset twice the
/// size of L2 evicts the previous call's data (so a working set that fits in L2 cannot beat
/// the DRAM floor), and events around the call time the GPU, not the host's enqueueing
/// (the memset keeps the GPU busy while the host enqueues the call).
pub fn gpu_seconds(device: &Device, mut run: impl FnMut()) -> f64 {
    use cudarc::driver::sys::{CUdevice_attribute::CU_DEVICE_ATTRIBUTE_L2_CACHE_SIZE, CUevent_flags};
    const ITERS: usize = 20;
    let Device::Cuda(cuda) = device else {
        panic!("gpu_seconds needs the CUDA device")
    };
    let stream = cuda.stream();
    let l2_bytes = stream
        .context()
        .attribute(CU_DEVICE_ATTRIBUTE_L2_CACHE_SIZE)
        .expect("L2 size") as usize;
    let mut flush = device
        .alloc_zeros::<u8>(2 * l2_bytes.max(1 << 20))
        .expect("flush buffer");
    run();
    let mut events = Vec::with_capacity(ITERS);
    for _ in 0..ITERS {
        device.fill_zeros(&mut flush).expect("L2 flush");
        let start = stream
            .record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
            .expect("event");
        run();
        let end = stream
            .record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
            .expect("event");
        events.push((start, end));
    }
    device.synchronize().expect("sync");
    let total_ms: f64 = events
        .iter()
        .map(|(start, end)| start.elapsed_ms(end).expect("elapsed") as f64)
        .sum();
    total_ms / 1e3 / ITERS as f64
}

/// The MoE layer shapes benches run: on a GPU the realistic ones (a Mixtral-like
/// and a DeepSeek-like layer, at decode and prefill token counts); on the emulator one
/// small shape, since there only the CPU is timed.
#[derive(Debug, Clone, Copy)]
pub struct LayerShape {
    pub name: &'static str,
    pub tokens: usize,
    pub d: usize,
    pub h: usize,
    pub experts: usize,
    pub k: usize,
    /// Group-limited routing (groups, top groups), when the model uses it.
    pub groups: Option<(usize, usize)>,
}

impl LayerShape {
    pub fn label(&self) -> String {
        format!("{},T={}", self.name, self.tokens)
    }
}

pub fn layer_shapes(device: &Device) -> Vec<LayerShape> {
    let mixtral = LayerShape {
        name: "mixtral",
        tokens: 0,
        d: 4096,
        h: 14336,
        experts: 8,
        k: 2,
        groups: None,
    };
    let deepseek = LayerShape {
        name: "deepseek",
        tokens: 0,
        d: 7168,
        h: 2048,
        experts: 256,
        k: 8,
        groups: Some((8, 4)),
    };
    if device.kind() != DeviceKind::Cuda {
        return vec![LayerShape {
            name: "small",
            tokens: 64,
            d: 256,
            h: 128,
            experts: 16,
            k: 4,
            groups: Some((4, 2)),
        }];
    }
    let mut shapes = vec![];
    for base in [mixtral, deepseek] {
        for tokens in [1, 16, 64, 4096, 16384] {
            shapes.push(LayerShape { tokens, ..base });
        }
    }
    shapes
}
