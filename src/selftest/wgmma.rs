//! The wgmma self-test (`kernels/wgmma_selftest.cu`): Hopper's warpgroup MMA with every shared
//! memory layout its matrix descriptor can name, and with A in registers.
use super::{Check, MmaInput, Report, Rng};
use crate::device::{Device, KernelArgs, LaunchConfig};
use crate::{Error, Result};
use half::{bf16, f16};

/// How one case lays out its operands (`mode_a`, `mode_b`, `flags` of the kernels).
#[derive(Clone, Copy)]
struct Layout {
    /// SwizzleMode of the A and B tiles: 0 none, 1 32 B, 2 64 B, 3 128 B.
    swizzle_a: i32,
    swizzle_b: i32,
    a_in_registers: bool,
    a_mn_major: bool,
    b_mn_major: bool,
}

impl Layout {
    const fn k_major(swizzle_a: i32, swizzle_b: i32) -> Self {
        Self {
            swizzle_a,
            swizzle_b,
            a_in_registers: false,
            a_mn_major: false,
            b_mn_major: false,
        }
    }

    const fn registers(self) -> Self {
        Self {
            a_in_registers: true,
            ..self
        }
    }

    const fn mn_major(self) -> Self {
        Self {
            a_mn_major: true,
            b_mn_major: true,
            ..self
        }
    }

    fn flags(self) -> i32 {
        i32::from(self.a_in_registers) | i32::from(self.a_mn_major) << 1 | i32::from(self.b_mn_major) << 2
    }

    fn label(self) -> String {
        const NAMES: [&str; 4] = ["none", "32B", "64B", "128B"];
        let major = |mn| if mn { "MN" } else { "K" };
        let a = if self.a_in_registers {
            "registers".to_string()
        } else {
            format!("{}-major {}", major(self.a_mn_major), NAMES[self.swizzle_a as usize])
        };
        format!(
            "A {a}, B {}-major {}",
            major(self.b_mn_major),
            NAMES[self.swizzle_b as usize]
        )
    }
}

/// `wgmma.mma_async` m64nNk16 through `selftest_wgmma_*`: every swizzle mode, K-major and
/// MN-major tiles, A from shared memory and from registers, bf16 and f16, N = 64, 128, 256,
/// against a CPU GEMM, exact on small integers. Needs sm_90a on a GPU
/// ([`Error::UnsupportedGpu`] elsewhere).
pub fn wgmma(device: &Device) -> Result<Check> {
    if let Device::Cuda(gpu) = device
        && gpu.arch() != 90
    {
        return Err(Error::UnsupportedGpu {
            found: gpu.arch(),
            needed: 90,
        });
    }
    let mut report = Report::new("wgmma");
    let mut rng = Rng::new(90);
    let every_swizzle = [0, 1, 2, 3].map(|s| Layout::k_major(s, s));
    for layout in every_swizzle {
        wgmma_case::<bf16>(
            device,
            &mut report,
            &mut rng,
            ("selftest_wgmma_bf16_n64", 64),
            layout,
            64,
        )?;
    }
    let more = [
        ("selftest_wgmma_bf16_n64", 64, Layout::k_major(3, 0).registers(), 128),
        ("selftest_wgmma_bf16_n64", 64, Layout::k_major(0, 0).mn_major(), 64),
        ("selftest_wgmma_bf16_n64", 64, Layout::k_major(3, 1).mn_major(), 64),
        ("selftest_wgmma_bf16_n256", 256, Layout::k_major(3, 3), 64),
        ("selftest_wgmma_bf16_n256", 256, Layout::k_major(0, 2).registers(), 64),
    ];
    for (kernel, n, layout, k) in more {
        wgmma_case::<bf16>(device, &mut report, &mut rng, (kernel, n), layout, k)?;
    }
    for layout in [
        Layout::k_major(3, 3),
        Layout::k_major(0, 1).registers(),
        Layout::k_major(2, 3).mn_major(),
    ] {
        wgmma_case::<f16>(
            device,
            &mut report,
            &mut rng,
            ("selftest_wgmma_f16_n128", 128),
            layout,
            64,
        )?;
    }
    Ok(report.finish())
}

/// One launch: D (64 x n) = A (64 x k) * B (k x n) on integers in -4..=4 (every sum exact).
fn wgmma_case<T: MmaInput>(
    device: &Device,
    report: &mut Report,
    rng: &mut Rng,
    (kernel, n): (&'static str, usize),
    layout: Layout,
    k: usize,
) -> Result<()> {
    report.case(format!(
        "{} n={n} k={k} {}",
        kernel.trim_start_matches("selftest_"),
        layout.label()
    ));
    let (a, bt) = (
        rng.vec(64 * k, |r| r.int(-4, 4) as f32),
        rng.vec(n * k, |r| r.int(-4, 4) as f32),
    );
    let round = |x: &[f32]| -> Vec<T> { x.iter().map(|&v| T::from_f32(v)).collect() };
    let (a_dev, bt_dev) = (device.upload(&round(&a))?, device.upload(&round(&bt))?);
    let mut d = device.alloc_zeros::<f32>(64 * n)?;
    let shared = 1024 + 2 * (64 + n) * k;
    let args = KernelArgs::new(device)
        .input("a", &a_dev)
        .input("bt", &bt_dev)
        .output("d", &mut d)
        .scalar(k as i32)
        .scalar(layout.swizzle_a)
        .scalar(layout.swizzle_b)
        .scalar(layout.flags());
    device.launch(kernel, LaunchConfig::linear(1, 128, shared as u32), args)?;
    let expected = gemm(&a, &bt, n, k);
    report.exact("d", &device.download(&d)?, &expected);
    Ok(())
}

/// d[m][j] = sum_kk a[m][kk] * bt[j][kk] for 64 rows (a plain reference GEMM).
pub(crate) fn gemm(a: &[f32], bt: &[f32], n: usize, k: usize) -> Vec<f32> {
    (0..64 * n)
        .map(|mn| {
            let (row, col) = (&a[mn / n * k..][..k], &bt[mn % n * k..][..k]);
            row.iter().zip(col).map(|(x, y)| x * y).sum()
        })
        .collect()
}
