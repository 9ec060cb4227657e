//! The end-to-end Hopper demonstration (`kernels/hopper_demo.cu`): a bf16 GEMM whose tiles
//! are fed by TMA through a 3-stage mbarrier pipeline to wgmma, a producer warp beside a
//! consumer warpgroup. [`gemm`] launches it on any operands; [`gemm_demo`] checks it on a few
//! shapes against a CPU GEMM in f64 within the math §9 tolerance. It runs on the emulator and
//! on sm_90 GPUs (sm_90a code). [`gemm_releasing_early`] launches its planted-bug twin for the
//! race detector.
use super::{Check, Report, Rng};
use crate::device::{Device, DeviceKind, KernelArgs, LaunchConfig, Swizzle, TensorMapSpec};
use crate::selftest::hopper::require_hopper;
use crate::{Error, Result};
use half::bf16;

/// The kernel's tile of C (rows, columns) and its k-block, stage count and shared memory.
const TILE_M: usize = 64;
const TILE_N: usize = 128;
const TILE_K: u32 = 64;
const STAGES: u32 = 3;
const SHARED_BYTES: u32 = STAGES * 3 * 64 * 64 * 2 + 1024;

/// C (m x n, f32, row-major) = A (m x k) * B (k x n), both bf16 row-major, through
/// `hopper_demo_gemm_bf16`. `n` and `k` must be multiples of 8 (TMA's 16-byte row strides).
pub fn gemm(device: &Device, a: &[bf16], b: &[bf16], shape: (usize, usize, usize)) -> Result<Vec<f32>> {
    require_hopper(device, "hopper_demo_gemm_bf16")?;
    launch(device, "hopper_demo_gemm_bf16", a, b, shape)
}

/// [`gemm`] through `hopper_demo_planted_early_release`, whose consumer releases each stage
/// before the `wgmma.wait_group` that covers its reads: a race, which the race detector must
/// report. Emulator only (on a GPU it would compute garbage in silence).
pub fn gemm_releasing_early(device: &Device, a: &[bf16], b: &[bf16], shape: (usize, usize, usize)) -> Result<Vec<f32>> {
    if device.kind() != DeviceKind::Emulator {
        return Err(Error::InvalidArgument {
            argument: "device",
            value: device.description(),
            expected: "the emulator: hopper_demo_planted_early_release races on purpose".into(),
        });
    }
    launch(device, "hopper_demo_planted_early_release", a, b, shape)
}

fn launch(
    device: &Device,
    kernel: &'static str,
    a: &[bf16],
    b: &[bf16],
    (m, n, k): (usize, usize, usize),
) -> Result<Vec<f32>> {
    let invalid = |argument, value: String, expected: &str| Error::InvalidArgument {
        argument,
        value,
        expected: expected.to_string(),
    };
    for (argument, v) in [("m", m), ("n", n), ("k", k)] {
        if v == 0 || v > i32::MAX as usize {
            return Err(invalid(argument, v.to_string(), "1..=i32::MAX"));
        }
    }
    for (argument, v) in [("n", n), ("k", k)] {
        if v % 8 != 0 {
            return Err(invalid(
                argument,
                v.to_string(),
                "a multiple of 8 (16-byte rows for TMA)",
            ));
        }
    }
    if a.len() != m * k {
        return Err(invalid(
            "a",
            format!("{} elements", a.len()),
            &format!("m * k = {}", m * k),
        ));
    }
    if b.len() != k * n {
        return Err(invalid(
            "b",
            format!("{} elements", b.len()),
            &format!("k * n = {}", k * n),
        ));
    }
    let (a_dev, b_dev) = (device.upload(a)?, device.upload(b)?);
    let mut c = device.alloc_zeros::<f32>(m * n)?;
    // A over [K, M] (K contiguous), B over [N, K] (N contiguous): 64 x 64 boxes, 128-byte swizzle.
    let (a_dims, b_dims) = ([k as u64, m as u64], [n as u64, k as u64]);
    let (a_strides, b_strides) = ([2 * k as u64], [2 * n as u64]);
    let grid = (n.div_ceil(TILE_N) as u32, m.div_ceil(TILE_M) as u32, 1);
    let config = LaunchConfig {
        grid,
        block: (256, 1, 1),
        shared_bytes: SHARED_BYTES,
    };
    device.launch(
        kernel,
        config,
        KernelArgs::new(device)
            .tensor_map("a", &a_dev, &box_64x64(&a_dims, &a_strides))
            .tensor_map("b", &b_dev, &box_64x64(&b_dims, &b_strides))
            .output("c", &mut c)
            .scalar(m as i32)
            .scalar(n as i32)
            .scalar(k as i32),
    )?;
    device.download(&c)
}

/// A 2D tensor map moving 64 x 64 boxes with the 128-byte swizzle (rows of 128 bytes).
fn box_64x64<'a>(dims: &'a [u64], strides: &'a [u64]) -> TensorMapSpec<'a> {
    TensorMapSpec {
        dims,
        strides,
        box_dims: &[64, 64],
        swizzle: Swizzle::B128,
    }
}

/// [`gemm`] on one CTA's tile with K = 9 k-blocks (the 3-stage ring wraps three times) and on
/// a 2 x 2 grid with ragged M, N and K (TMA's zero fill at every edge), on random bf16 inputs
/// in [-1, 1), against an f64 GEMM of the same bf16 values: per element
/// |got - ref| <= sqrt(K) * eps_f32 * sum |a * b| + 1e-5 |ref| (math §9: f32 accumulation).
pub fn gemm_demo(device: &Device) -> Result<Check> {
    let mut report = Report::new("hopper_demo_gemm");
    let mut rng = Rng::new(1515);
    let blocks = |k: usize| k.div_ceil(TILE_K as usize);
    for (m, n, k) in [(64, 128, 9 * TILE_K as usize), (100, 200, 328)] {
        report.case(format!("{m} x {n} x {k} ({} k-blocks)", blocks(k)));
        let draw = |r: &mut Rng| bf16::from_f32(r.signed_unit());
        let (a, b) = (rng.vec(m * k, draw), rng.vec(k * n, draw));
        let c = gemm(device, &a, &b, (m, n, k))?;
        let (expected, tolerance) = reference(&a, &b, (m, n, k));
        report.within("c", &c, &expected, &tolerance);
    }
    Ok(report.finish())
}

/// The f64 GEMM of `a` and `b` and, per element, the math §9 tolerance of an f32 accumulation
/// over k terms: sqrt(k) * eps_f32 * sum_kk |a * b| + 1e-5 |c|.
pub fn reference(a: &[bf16], b: &[bf16], (m, n, k): (usize, usize, usize)) -> (Vec<f64>, Vec<f64>) {
    let mut c = vec![0.0f64; m * n];
    let mut magnitude = vec![0.0f64; m * n];
    for row in 0..m {
        for kk in 0..k {
            let x = a[row * k + kk].to_f64();
            for col in 0..n {
                let p = x * b[kk * n + col].to_f64();
                c[row * n + col] += p;
                magnitude[row * n + col] += p.abs();
            }
        }
    }
    let scale = (k as f64).sqrt() * f64::from(f32::EPSILON);
    let tolerance = c
        .iter()
        .zip(&magnitude)
        .map(|(&v, &s)| scale * s + 1e-5 * v.abs())
        .collect();
    (c, tolerance)
}
