//! The two ceilings every percentage of a GPU run is of, measured in the same run:
//! - the copy bandwidth: a 2 GiB device-to-device copy, counting bytes read plus written;
//! - the bf16 tensor rate: a cuBLAS GEMM 8192³ on random data (zeros run faster).
//!
//! Each is timed like every op (`common::Gpu`: cold L2, CUDA events, median) and printed as a
//! `MOE_CEILING` line beside the datasheet's value for the part, when we know it. Without a GPU
//! it says so and measures nothing (there is no CPU ceiling to compare the emulator with).
mod common;

use common::Gpu;
use common::blas::Op;
use common::gpu::{cuda, cuda_mut};
use common::inputs::random_bf16;
use moe_kernels::benchmarks::{BANDWIDTH, Ceiling, TENSOR, ceiling_line, datasheet};
use moe_kernels::device::{Device, DeviceKind};

const COPY_BYTES: usize = 2 << 30;
const GEMM_N: usize = 8192;

fn measure(gpu: &Gpu) {
    let Device::Cuda(cuda_device) = &gpu.device else { return };
    let stream = cuda_device.stream().clone();
    let (bandwidth_sheet, tensor_sheet) = datasheet(&gpu.device.description()).unzip();

    let src = random_bf16(&gpu.device, COPY_BYTES / 2, 1, 1.0);
    let mut dst = random_bf16(&gpu.device, COPY_BYTES / 2, 2, 1.0);
    let copy = gpu.time(|| stream.memcpy_dtod(cuda(&src), cuda_mut(&mut dst)).expect("copy"));
    let bandwidth = Ceiling {
        measured: 2.0 * COPY_BYTES as f64 / copy.median,
        datasheet: bandwidth_sheet,
    };
    drop((src, dst));

    let n = GEMM_N;
    let a = random_bf16(&gpu.device, n * n, 3, 1.0);
    let b = random_bf16(&gpu.device, n * n, 4, 1.0);
    let mut c = random_bf16(&gpu.device, n * n, 5, 1.0);
    let gemm = gpu.time(|| {
        gpu.blas
            .gemm_bf16((Op::N, Op::T), (n, n, n), cuda(&a), n, cuda(&b), n, cuda_mut(&mut c), n)
    });
    let tensor = Ceiling {
        measured: 2.0 * (n as f64).powi(3) / gemm.median,
        datasheet: tensor_sheet,
    };

    let sheet = |v: Option<f64>, scale: f64| v.map_or_else(|| "unknown".into(), |v| format!("{:.0}", v / scale));
    println!(
        "ceilings on {}: copy {:.0} GB/s (read + write; datasheet {}), bf16 GEMM {n}³ {:.0} TFLOP/s on random data (datasheet {})",
        gpu.device.description(),
        bandwidth.measured / 1e9,
        sheet(bandwidth_sheet, 1e9),
        tensor.measured / 1e12,
        sheet(tensor_sheet, 1e12)
    );
    println!("{}", ceiling_line(BANDWIDTH, &bandwidth));
    println!("{}", ceiling_line(TENSOR, &tensor));
}

fn main() {
    let devices = common::devices();
    let gpus: Vec<Gpu> = devices
        .iter()
        .filter(|d| d.kind() == DeviceKind::Cuda)
        .filter_map(Gpu::new)
        .collect();
    if gpus.is_empty() {
        println!("ceilings: no GPU here, nothing measured (the ceilings are a GPU's)");
    }
    for gpu in &gpus {
        measure(gpu);
    }
}
