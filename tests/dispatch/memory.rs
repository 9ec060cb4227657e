//! Memory behaviour of the row movers on the emulator's profiling build (`MOE_EMU_PROFILE=1`;
//! skipped elsewhere): every output byte written once, in whole 16-byte lanes (16 sectors of 32
//! bytes per warp request), and the permute's input read once per token (load redundancy <= 1.05).
use super::common::Rng;
use super::random_ids;
use half::bf16;
use moe_kernels::DeviceBuffer;
use moe_kernels::device::profile::{Access, MemoryProfile, Space};
use moe_kernels::device::{Device, EmulatorDevice};
use moe_kernels::ops::dispatch::{self, MapConfig};
use moe_kernels::reference::dispatch as reference;

fn profile_of(emulator: &EmulatorDevice, kernel: &str) -> MemoryProfile {
    let profiles = emulator.take_profiles();
    profiles
        .into_iter()
        .find(|p| p.kernel == kernel)
        .unwrap_or_else(|| panic!("no profile of {kernel}"))
}

#[test]
fn row_movers_write_whole_sectors_once() {
    if !moe_kernels::device::emulator::profiling_build() {
        eprintln!("skipped: needs the profiling build (MOE_EMU_PROFILE=1)");
        return;
    }
    // bf16 rows of 256 elements: 32 lanes x 16 bytes, one warp request per row.
    let (tokens, k, d, experts) = (64, 2, 256, 8);
    let config = MapConfig::new(experts);
    let map = reference::routing_map(&random_ids(&mut Rng::new(4), tokens, k, experts), tokens, k, &config);
    let rows = map.sorted_rows.len();
    let emulator = EmulatorDevice::new().profiling().unwrap();
    let device = Device::Emulator(emulator.clone());
    let x: Vec<bf16> = (0..tokens * d).map(|i| bf16::from_f32(i as f32)).collect();
    let x = device.upload(&x).unwrap();
    let sorted_rows = device.upload(&map.sorted_rows).unwrap();
    let inverse = device.upload(&map.inverse).unwrap();
    let mut xp = device.alloc_zeros::<bf16>(rows * d).unwrap();
    let mut y = device.alloc_zeros::<bf16>(tokens * d).unwrap();
    let row_bytes = (d * 2) as u64;

    dispatch::permute(&device, &x, &sorted_rows, &inverse, tokens, k, d, &mut xp).unwrap();
    let p = profile_of(&emulator, "dispatch_permute_bf16");
    let stores = p.traffic(Space::Global, Access::Store);
    assert_eq!(
        (stores.bytes, p.unique_global_store_bytes),
        (rows as u64 * row_bytes, rows as u64 * row_bytes)
    );
    assert_eq!(stores.sectors_per_request(), 16.0, "{stores:?}");
    let loads = p.traffic(Space::Global, Access::Load);
    // Token-major: each X row once (every token is routed), inverse and sorted_rows once.
    let (tokens_u, slots) = (tokens as u64, (tokens * k) as u64);
    assert_eq!(
        loads.bytes,
        tokens_u * row_bytes + 4 * slots + 4 * rows as u64,
        "{loads:?}"
    );
    assert!(p.global_load_redundancy() <= 1.05, "{}", p.global_load_redundancy());

    let no_weights: Option<&DeviceBuffer<f32>> = None;
    dispatch::combine(&device, &xp, &inverse, no_weights, Some(&x), tokens, k, d, &mut y).unwrap();
    let p = profile_of(&emulator, "dispatch_combine_bf16");
    let stores = p.traffic(Space::Global, Access::Store);
    assert_eq!(
        (stores.bytes, p.unique_global_store_bytes),
        (tokens as u64 * row_bytes, tokens as u64 * row_bytes)
    );
    assert_eq!(stores.sectors_per_request(), 16.0, "{stores:?}");
}
