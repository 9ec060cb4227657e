//! Validation of the emulator's memory profiler on kernels with hand-computed answers
//! (`kernels/profiler_probes.cu`). Needs the profiling build: `MOE_EMU_PROFILE=1` (CI runs it).
use moe_kernels::device::emulator::profiling_build;
use moe_kernels::device::profile::{Access, MemoryProfile, Space};
use moe_kernels::device::{Device, EmulatorDevice};
use moe_kernels::selftest::probes::{Probe, WARP};

const BLOCKS: u32 = 3;

/// The profile of one probe launch. Every test here is ignored (with the reason) outside the
/// profiling build (cfg `moe_emu_profile`, set by build.rs).
fn profile(probe: Probe) -> MemoryProfile {
    assert!(
        profiling_build(),
        "cfg moe_emu_profile is set by the profiling build only"
    );
    let emulator = EmulatorDevice::from_env().unwrap().profiling().unwrap();
    probe.run(&Device::Emulator(emulator.clone()), BLOCKS).unwrap();
    let mut profiles = emulator.take_profiles();
    assert_eq!(profiles.len(), 1);
    let p = profiles.pop().unwrap();
    assert_eq!(p.kernel, probe.kernel());
    p
}

fn global(p: &MemoryProfile, access: Access) -> (u64, f64) {
    let t = p.traffic(Space::Global, access);
    (t.requests, t.sectors_per_request())
}

#[test]
#[cfg_attr(
    not(moe_emu_profile),
    ignore = "needs the profiling build: MOE_EMU_PROFILE=1 (clang-19); CI runs it"
)]
fn coalesced_4_byte_accesses_touch_4_sectors_per_request() {
    let p = profile(Probe::Coalesced);
    assert_eq!(global(&p, Access::Load), (BLOCKS as u64, 4.0));
    assert_eq!(global(&p, Access::Store), (BLOCKS as u64, 4.0));
    assert_eq!(p.global_load_redundancy(), 1.0);
    assert_eq!(p.unique_global_load_bytes, (BLOCKS * WARP * 4) as u64);
}

#[test]
#[cfg_attr(
    not(moe_emu_profile),
    ignore = "needs the profiling build: MOE_EMU_PROFILE=1 (clang-19); CI runs it"
)]
fn vector_16_byte_accesses_touch_16_sectors_per_request() {
    let p = profile(Probe::Vector);
    assert_eq!(global(&p, Access::Load), (BLOCKS as u64, 16.0));
    assert_eq!(global(&p, Access::Store), (BLOCKS as u64, 16.0));
    assert_eq!(
        p.traffic(Space::Global, Access::Load).bytes,
        (BLOCKS * WARP * 16) as u64
    );
}

#[test]
#[cfg_attr(
    not(moe_emu_profile),
    ignore = "needs the profiling build: MOE_EMU_PROFILE=1 (clang-19); CI runs it"
)]
fn a_stride_of_32_floats_touches_32_sectors_per_request() {
    let p = profile(Probe::Strided);
    assert_eq!(global(&p, Access::Load), (BLOCKS as u64, 32.0));
    assert_eq!(global(&p, Access::Store), (BLOCKS as u64, 4.0));
}

#[test]
#[cfg_attr(
    not(moe_emu_profile),
    ignore = "needs the profiling build: MOE_EMU_PROFILE=1 (clang-19); CI runs it"
)]
fn a_broadcast_touches_1_sector() {
    let p = profile(Probe::Broadcast);
    assert_eq!(global(&p, Access::Load), (BLOCKS as u64, 1.0));
    assert_eq!(p.unique_global_load_bytes, 4);
    assert_eq!(p.global_load_redundancy(), (BLOCKS * WARP) as f64);
}

#[test]
#[cfg_attr(
    not(moe_emu_profile),
    ignore = "needs the profiling build: MOE_EMU_PROFILE=1 (clang-19); CI runs it"
)]
fn a_column_read_of_a_32x32_float_tile_is_a_32_way_bank_conflict() {
    let p = profile(Probe::SharedColumns);
    let loads = p.traffic(Space::Shared, Access::Load);
    let stores = p.traffic(Space::Shared, Access::Store);
    assert_eq!(loads.requests, 32 * BLOCKS as u64);
    assert_eq!((loads.bank_conflict_degree(), loads.max_bank_degree), (32.0, 32));
    assert_eq!((stores.bank_conflict_degree(), stores.max_bank_degree), (1.0, 1));
}

#[test]
#[cfg_attr(
    not(moe_emu_profile),
    ignore = "needs the profiling build: MOE_EMU_PROFILE=1 (clang-19); CI runs it"
)]
fn padding_the_tile_to_33_columns_removes_the_conflicts() {
    let p = profile(Probe::SharedColumnsPadded);
    let loads = p.traffic(Space::Shared, Access::Load);
    assert_eq!(loads.requests, 32 * BLOCKS as u64);
    assert_eq!((loads.bank_conflict_degree(), loads.max_bank_degree), (1.0, 1));
}

#[test]
#[cfg_attr(
    not(moe_emu_profile),
    ignore = "needs the profiling build: MOE_EMU_PROFILE=1 (clang-19); CI runs it"
)]
fn reading_the_input_twice_is_redundancy_2() {
    let p = profile(Probe::ReadTwice);
    assert_eq!(p.global_load_redundancy(), 2.0);
    assert_eq!(global(&p, Access::Load).0, 2 * BLOCKS as u64);
}

#[test]
#[cfg_attr(
    not(moe_emu_profile),
    ignore = "needs the profiling build: MOE_EMU_PROFILE=1 (clang-19); CI runs it"
)]
fn atomics_are_counted_per_lane() {
    let p = profile(Probe::Atomics);
    assert_eq!(p.atomics(), (BLOCKS * WARP) as u64);
    assert_eq!(p.traffic(Space::Global, Access::Atomic).requests, BLOCKS as u64);
}

#[test]
fn profiling_is_refused_outside_the_profiling_build() {
    let emulator = EmulatorDevice::new();
    match emulator.profiling() {
        Ok(_) => assert!(profiling_build()),
        Err(e) => {
            assert!(!profiling_build());
            assert!(e.to_string().contains("MOE_EMU_PROFILE=1"), "{e}");
        }
    }
}
