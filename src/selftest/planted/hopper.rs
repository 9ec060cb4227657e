//! Launchers for the planted asynchronous-copy bugs of `kernels/planted_async.cu`: a TMA tile
//! read without its mbarrier wait, expect_tx byte counts off by 16, and a wait on the wrong
//! parity.
use super::*;
use crate::device::{Swizzle, TensorMapSpec};
use crate::selftest::hopper::{
    BoxCase, box_elements, padded_strides, pipeline_expected, reach_elements, swizzled_offset,
};

/// What `planted_tma_tile` does wrong (the kernel's `mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TileMistake {
    /// None: the control.
    Control,
    /// Reads the tile without waiting on its mbarrier.
    MissingWait,
    /// Announces 16 bytes more than the copy brings: the phase never completes.
    ExpectTooMany,
    /// Announces 16 bytes fewer than the copy brings.
    ExpectTooFew,
}

/// `planted_tma_tile`: a 64 x 8 box of u16 (128-byte swizzle) at (`c0`, 20) of a 100 x 30
/// tensor, copied out of shared memory after `mistake`.
pub fn tma_tile(device: &Device, mistake: TileMistake, c0: i32, seed: u64) -> Result<Outputs<u8>> {
    emulator_only(device, "planted_tma_tile")?;
    let case = BoxCase {
        dims: vec![100, 30],
        box_dims: vec![64, 8],
        swizzle: Swizzle::B128,
        load: vec![c0, 20],
        store: vec![],
    };
    let strides = padded_strides(&case.dims, 2);
    let mut rng = Rng::new(seed);
    let src = rng.vec(reach_elements(&case.dims, &strides, 2), |r| {
        (r.next_u32() % 0xffff) as u16
    });
    let src_dev = device.upload(&src)?;
    let box_bytes = 64 * 8 * 2;
    let mut out = device.alloc_zeros::<u8>(box_bytes)?;
    let spec = TensorMapSpec {
        dims: &case.dims,
        strides: &strides,
        box_dims: &case.box_dims,
        swizzle: case.swizzle,
    };
    device.launch(
        "planted_tma_tile",
        LaunchConfig::linear(1, 64, box_bytes as u32 + 1024),
        KernelArgs::new(device)
            .tensor_map("map", &src_dev, &spec)
            .scalar(c0)
            .scalar(20i32)
            .scalar(box_bytes as u32)
            .scalar(mistake as i32)
            .output("out", &mut out),
    )?;
    let mut expected = vec![0u8; box_bytes];
    for (e, at) in box_elements(&case, &case.load, &strides, 2).into_iter().enumerate() {
        let value = at.map_or(0, |i| src[i]);
        let o = swizzled_offset(2 * e, case.swizzle);
        expected[o..o + 2].copy_from_slice(&value.to_le_bytes());
    }
    Ok(Outputs {
        got: device.download(&out)?,
        expected,
    })
}

/// `planted_mbarrier_parity`: `rounds` rows of 32 u32 through one bulk-copied stage; with
/// `flip` the last round waits for the wrong parity.
pub fn mbarrier_parity(device: &Device, flip: bool, rounds: usize, seed: u64) -> Result<Outputs<u32>> {
    emulator_only(device, "planted_mbarrier_parity")?;
    let src = Rng::new(seed).vec(32 * rounds, Rng::next_u32);
    let src_dev = device.upload(&src)?;
    let mut out = device.alloc_zeros::<u32>(32)?;
    device.launch(
        "planted_mbarrier_parity",
        LaunchConfig::linear(1, 32, 128),
        KernelArgs::new(device)
            .input("src", &src_dev)
            .scalar(rounds as i32)
            .scalar(i32::from(flip))
            .output("out", &mut out),
    )?;
    Ok(Outputs {
        got: device.download(&out)?,
        expected: pipeline_expected(&src, 32, rounds),
    })
}

/// `planted_tma_tile` (the control mode) with a tensor map of `spec` over a buffer of `len`
/// u16: for the tests of the maps that [`tensor_map::encode`](crate::device::tensor_map::encode)
/// must refuse before anything is launched.
pub fn tma_tile_with_map(device: &Device, spec: &TensorMapSpec<'_>, len: usize) -> Result<()> {
    emulator_only(device, "planted_tma_tile")?;
    let src = device.alloc_zeros::<u16>(len)?;
    let box_bytes: u32 = spec.box_dims.iter().product::<u32>() * 2;
    let mut out = device.alloc_zeros::<u8>(box_bytes as usize)?;
    device.launch(
        "planted_tma_tile",
        LaunchConfig::linear(1, 32, box_bytes + 1024),
        KernelArgs::new(device)
            .tensor_map("map", &src, spec)
            .scalar(0i32)
            .scalar(0i32)
            .scalar(box_bytes)
            .scalar(TileMistake::Control as i32)
            .output("out", &mut out),
    )
}
