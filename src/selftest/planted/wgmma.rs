//! Launchers for `kernels/planted_wgmma.cu`: wgmma pipelines and warpgroup collectives with
//! one bug each, which the emulator must catch (wrong values, NaN, or a failed launch).
use super::*;
use crate::selftest::wgmma::gemm;

/// The bugs of `planted_wgmma_pipeline`, in the kernel's numbering.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PipelineBug {
    /// The control: a correct two-stage pipeline.
    None = 0,
    /// A stage refilled while the wgmma reading it is still in flight (`wait_group 2`).
    StageReleasedBeforeWait = 1,
    /// The accumulators stored before the covering `wait_group`.
    AccumulatorReadBeforeWait = 2,
    /// The tiles written by ordinary stores with no `fence.proxy.async` before wgmma.
    MissingProxyFence = 3,
}

/// `planted_wgmma_pipeline`: d (64 x 64) = a (64 x 64) * bt^T through two stages, with `bug`.
/// Inputs are small integers from `seed`, so the control is exact.
pub fn wgmma_pipeline(device: &Device, bug: PipelineBug, seed: u64) -> Result<Outputs<f32>> {
    emulator_only(device, "planted_wgmma_pipeline")?;
    const K: usize = 64;
    let mut rng = Rng::new(seed);
    let (a, bt) = (
        rng.vec(64 * K, |r| r.int(-4, 4) as f32),
        rng.vec(64 * K, |r| r.int(-4, 4) as f32),
    );
    let to_bf16 = |x: &[f32]| -> Vec<bf16> { x.iter().map(|&v| bf16::from_f32(v)).collect() };
    let (a_dev, bt_dev) = (device.upload(&to_bf16(&a))?, device.upload(&to_bf16(&bt))?);
    let mut d = device.alloc_zeros::<f32>(64 * 64)?;
    device.launch(
        "planted_wgmma_pipeline",
        LaunchConfig::linear(1, 128, 1024 + 2 * 16 * 1024),
        KernelArgs::new(device)
            .input("a", &a_dev)
            .input("bt", &bt_dev)
            .output("d", &mut d)
            .scalar(bug as i32),
    )?;
    Ok(Outputs {
        got: device.download(&d)?,
        expected: gemm(&a, &bt, 64, K),
    })
}

/// The bugs of `planted_warpgroup`, in the kernel's numbering.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WarpgroupBug {
    /// The control: aligned warpgroups, uniform `setmaxnreg`.
    None = 0,
    /// wgmma collectives run by warps 1..4, which straddle two warpgroups.
    MisalignedWarpgroup = 1,
    /// `setmaxnreg.inc` with 232 registers in two warps and 240 in the other two.
    NonUniformSetmaxnreg = 2,
}

/// `planted_warpgroup` on one block of 256 threads: `out[t] = t` if the launch succeeds.
pub fn warpgroup(device: &Device, bug: WarpgroupBug) -> Result<Outputs<i32>> {
    emulator_only(device, "planted_warpgroup")?;
    let mut out = device.alloc_zeros::<i32>(256)?;
    device.launch(
        "planted_warpgroup",
        LaunchConfig::linear(1, 256, 0),
        KernelArgs::new(device).output("out", &mut out).scalar(bug as i32),
    )?;
    Ok(Outputs {
        got: device.download(&out)?,
        expected: (0..256).collect(),
    })
}
