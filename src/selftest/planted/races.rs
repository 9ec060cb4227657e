//! Launchers for the race-detector kernels of `kernels/planted_bugs.cu`: a dropped "tile
//! consumed" barrier before ldmatrix-fed k-tiles, a dropped `__syncwarp` between ballot-ranked
//! count updates, and the race-free idioms the detector must accept.
use super::*;

/// How `planted_tile_barrier` tiles its k loop (the kernel's `mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tiling {
    /// One tile buffer, a barrier before loading each k-tile and one after.
    OneBuffer,
    /// Planted: one tile buffer without the barrier before each load ("tile consumed").
    OneBufferNoConsumedBarrier,
    /// Two tile buffers, one barrier per k-tile.
    TwoBuffers,
    /// Two tile buffers filled by cp.async one k-tile ahead.
    CpAsyncPipeline,
}

impl Tiling {
    pub const RACE_FREE: [Tiling; 3] = [Self::OneBuffer, Self::TwoBuffers, Self::CpAsyncPipeline];
}

/// The k-tiles of `planted_tile_barrier`: enough for a warp to overwrite a tile the other
/// still reads several times.
pub const K_TILES: usize = 4;

/// `planted_tile_barrier`: out = A · B^T (16 x 16) with A, B 16 x 64 f16 of small integers from
/// `seed` (every product and sum exact), through ldmatrix-fed shared k-tiles tiled as `tiling`.
pub fn tile_barrier(device: &Device, tiling: Tiling, seed: u64) -> Result<Outputs<f32>> {
    emulator_only(device, "planted_tile_barrier")?;
    let k = 16 * K_TILES;
    let mut rng = Rng::new(seed);
    let a = rng.vec(16 * k, |r| r.int(-4, 4));
    let b = rng.vec(16 * k, |r| r.int(-4, 4));
    let to_f16 = |v: &[i32]| v.iter().map(|&x| f16::from_f32(x as f32)).collect::<Vec<_>>();
    let (a_dev, b_dev) = (device.upload(&to_f16(&a))?, device.upload(&to_f16(&b))?);
    let mut out = device.alloc_zeros::<f32>(16 * 16)?;
    device.launch(
        "planted_tile_barrier",
        LaunchConfig::linear(1, 64, 0),
        KernelArgs::new(device)
            .input("a", &a_dev)
            .input("b", &b_dev)
            .output("out", &mut out)
            .scalar(K_TILES as i32)
            .scalar(tiling as i32),
    )?;
    let expected = (0..16 * 16)
        .map(|i| {
            let (r, c) = (i / 16, i % 16);
            (0..k).map(|j| a[r * k + j] * b[c * k + j]).sum::<i32>() as f32
        })
        .collect();
    Ok(Outputs {
        got: device.download(&out)?,
        expected,
    })
}

/// `planted_warp_rank`: the rank of each of 100 keys in 0..8 (from `seed`) among the equal keys
/// before it, by one warp with ballots; `sync` keeps the `__syncwarp` after each count advance.
pub fn warp_rank(device: &Device, sync: bool, seed: u64) -> Result<Outputs<i32>> {
    emulator_only(device, "planted_warp_rank")?;
    let keys = Rng::new(seed).vec(100, |r| r.int(0, 7));
    let keys_dev = device.upload(&keys)?;
    let mut rank = device.alloc_zeros::<i32>(keys.len())?;
    device.launch(
        "planted_warp_rank",
        LaunchConfig::linear(1, 32, 0),
        KernelArgs::new(device)
            .input("keys", &keys_dev)
            .output("rank", &mut rank)
            .scalar(keys.len() as i32)
            .scalar(i32::from(sync)),
    )?;
    let expected = (0..keys.len())
        .map(|i| keys[..i].iter().filter(|&&k| k == keys[i]).count() as i32)
        .collect();
    Ok(Outputs {
        got: device.download(&rank)?,
        expected,
    })
}

/// `planted_race_free_idioms`: warp-private scratch behind `__syncwarp`, shared atomics then a
/// barrier then reads, and two threads storing the two halves of one word.
pub fn race_free_idioms(device: &Device) -> Result<Outputs<i32>> {
    emulator_only(device, "planted_race_free_idioms")?;
    let mut out = device.alloc_zeros::<i32>(64 + 8 + 64)?;
    device.launch(
        "planted_race_free_idioms",
        LaunchConfig::linear(1, 64, 0),
        KernelArgs::new(device).output("out", &mut out),
    )?;
    let scratch = (0..64).map(|t| t / 32 * 32 + (t % 32 + 1) % 32);
    let histogram = std::iter::repeat_n(8, 8);
    let halves = (0..64).map(|t| t ^ 1);
    Ok(Outputs {
        got: device.download(&out)?,
        expected: scratch.chain(histogram).chain(halves).collect(),
    })
}
