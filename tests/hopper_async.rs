//! Hopper's asynchronous data movement: the self-tests of `kernels/selftest_async.cu` on the
//! emulator under every schedule (and on an sm_90 GPU when there is one), the planted bugs of
//! `kernels/planted_async.cu` caught, and tensor maps refused where the driver refuses them.
use moe_kernels::device::{Device, Swizzle, TensorMapSpec, available_devices};
use moe_kernels::selftest::hopper::{self, hopper_capable};
use moe_kernels::selftest::{Check, planted};
use moe_kernels::{Error, Result};

fn assert_passed(device: &Device, check: Result<Check>) {
    match check {
        Ok(check) if check.passed => {}
        Ok(check) => panic!("on {}: {check}", device.description()),
        Err(e) => panic!("on {}: {e}", device.description()),
    }
}

/// Every device here that runs sm_90 instructions, and the emulator under each schedule.
fn hopper_devices() -> Vec<Device> {
    let list = available_devices().expect("device list");
    let mut devices: Vec<Device> = list.devices.into_iter().filter(hopper_capable).collect();
    #[cfg(feature = "emulator")]
    {
        use moe_kernels::device::{EmulatorDevice, Schedule};
        let emu = EmulatorDevice::from_env().expect("emulator");
        for schedule in [
            Schedule::Reverse,
            Schedule::Random { seed: 3 },
            Schedule::RunAhead { seed: 5 },
        ] {
            devices.push(Device::Emulator(emu.with_schedule(schedule)));
        }
    }
    assert!(!devices.is_empty(), "no device runs sm_90 instructions here");
    devices
}

#[test]
fn mbarrier_pipeline_over_many_stages() {
    for device in hopper_devices() {
        assert_passed(&device, hopper::mbarrier_pipeline(&device));
    }
}

#[test]
fn tma_boxes_at_the_edges_in_every_swizzle_mode() {
    for device in hopper_devices() {
        assert_passed(&device, hopper::tma_roundtrip(&device));
    }
}

// ------------------------------------------------------------------------------------------
// Planted bugs (emulator only).

#[cfg(feature = "emulator")]
mod planted_bugs {
    use super::*;
    use moe_kernels::device::{EmulatorDevice, Schedule};
    use planted::hopper::{self as bugs, TileMistake};

    fn emulator(schedule: Schedule) -> Device {
        let emu = EmulatorDevice::from_env().expect("emulator").with_schedule(schedule);
        Device::Emulator(emu.with_racecheck(false).expect("the race detector off"))
    }

    const SCHEDULES: [Schedule; 4] = [
        Schedule::InOrder,
        Schedule::Reverse,
        Schedule::Random { seed: 9 },
        Schedule::RunAhead { seed: 4 },
    ];

    /// `planted_tma_tile` with `mistake` fails the launch under every schedule, with a message
    /// that says each of `says`.
    fn assert_tile_fails(mistake: TileMistake, says: &[&str]) {
        for schedule in SCHEDULES {
            match bugs::tma_tile(&emulator(schedule), mistake, 8, 3) {
                Err(Error::LaunchFailed(message)) => {
                    for says in ["planted_tma_tile", "mbarrier"].iter().chain(says) {
                        assert!(message.contains(says), "{schedule:?}: `{message}` lacks `{says}`");
                    }
                }
                other => panic!("{mistake:?} under {schedule:?}: expected a launch failure, got {other:?}"),
            }
        }
    }

    #[test]
    fn a_tma_tile_read_without_the_mbarrier_wait_sees_poison() {
        for schedule in SCHEDULES {
            let device = emulator(schedule);
            // The box runs past the tensor's end in dimension 0 (zero fill) and 1.
            for c0 in [0, 60] {
                let control = bugs::tma_tile(&device, TileMistake::Control, c0, 1).unwrap();
                assert_eq!(control.differing(), 0, "{schedule:?} control at {c0}");
                let bug = bugs::tma_tile(&device, TileMistake::MissingWait, c0, 2).unwrap();
                assert!(
                    bug.got.iter().all(|&b| b == 0xFF),
                    "{schedule:?}: the tile read without the wait is not all poison"
                );
                assert!(
                    bug.differing() > bug.got.len() / 2,
                    "{schedule:?}: {} bytes differ",
                    bug.differing()
                );
            }
        }
    }

    #[test]
    fn an_expect_tx_announcing_too_many_bytes_is_a_deadlock_naming_the_barrier() {
        let says = ["deadlock", "planted_async.cu", "tx-count 16 bytes", "for parity 0"];
        assert_tile_fails(TileMistake::ExpectTooMany, &says);
    }

    #[test]
    fn an_expect_tx_announcing_too_few_bytes_is_an_error() {
        assert_tile_fails(
            TileMistake::ExpectTooFew,
            &["16 bytes more than arrive.expect_tx announced"],
        );
    }

    #[test]
    fn a_wait_on_the_wrong_parity_reads_the_stage_before_it_lands() {
        for schedule in SCHEDULES {
            let device = emulator(schedule);
            let control = bugs::mbarrier_parity(&device, false, 6, 5).unwrap();
            assert_eq!(control.differing(), 0, "{schedule:?} control");
            let bug = bugs::mbarrier_parity(&device, true, 6, 6).unwrap();
            assert_eq!(
                bug.differing(),
                32,
                "{schedule:?}: every lane read the last row too early"
            );
        }
    }
}

// ------------------------------------------------------------------------------------------
// Tensor maps the driver refuses.

#[cfg(feature = "emulator")]
#[test]
fn tensor_maps_the_driver_refuses_are_errors_naming_the_field() {
    let device = Device::emulator().expect("emulator");
    let dims = [128u64, 32];
    let ok = TensorMapSpec {
        dims: &dims,
        strides: &[256],
        box_dims: &[64, 16],
        swizzle: Swizzle::B128,
    };
    // The control: the map over a buffer that holds the tensor is accepted and the kernel runs.
    planted::hopper::tma_tile_with_map(&device, &ok, 4096).expect("a valid tensor map");
    let cases: [(TensorMapSpec<'_>, usize, &str); 8] = [
        (
            TensorMapSpec {
                box_dims: &[64, 300],
                ..ok
            },
            4096,
            "box_dims[1] = 300",
        ),
        (
            TensorMapSpec {
                box_dims: &[128, 16],
                ..ok
            },
            4096,
            "inner box row of 256 bytes",
        ),
        (
            TensorMapSpec {
                box_dims: &[20, 16],
                swizzle: Swizzle::None,
                ..ok
            },
            4096,
            "inner box row of 40 bytes",
        ),
        (TensorMapSpec { strides: &[264], ..ok }, 4224, "strides[0] = 264"),
        (
            TensorMapSpec {
                dims: &[128],
                strides: &[],
                box_dims: &[64],
                ..ok
            },
            4096,
            "of rank 1",
        ),
        (TensorMapSpec { dims: &[128, 0], ..ok }, 4096, "dims[1] = 0"),
        (
            TensorMapSpec {
                strides: &[256, 512],
                ..ok
            },
            4096,
            "with 2 strides and 2 box dims",
        ),
        (ok, 4095, "spanning 8192 bytes"),
    ];
    for (spec, len, says) in cases {
        match planted::hopper::tma_tile_with_map(&device, &spec, len) {
            Err(e @ Error::InvalidArgument { argument: "map", .. }) => {
                let message = e.to_string();
                assert!(message.contains(says), "`{message}` lacks `{says}`");
            }
            other => panic!("{spec:?}: expected the tensor map refused, got {other:?}"),
        }
    }
}

// ------------------------------------------------------------------------------------------
// The memory profiler counts TMA traffic.

#[cfg(feature = "emulator")]
#[test]
#[cfg_attr(
    not(moe_emu_profile),
    ignore = "needs the profiling build: MOE_EMU_PROFILE=1 (clang-19); CI runs it"
)]
fn the_memory_profiler_counts_a_tma_load_row_by_row() {
    use moe_kernels::device::EmulatorDevice;
    use moe_kernels::device::profile::{Access, Space};
    let emulator = EmulatorDevice::from_env().unwrap().profiling().unwrap();
    // A 64 x 8 box of u16 at (60, 20) of a 100 x 30 tensor: 8 rows of 40 elements inside.
    let tile = planted::hopper::tma_tile(
        &Device::Emulator(emulator.clone()),
        planted::hopper::TileMistake::Control,
        60,
        7,
    )
    .unwrap();
    assert_eq!(tile.differing(), 0);
    let profiles = emulator.take_profiles();
    assert_eq!(profiles.len(), 1);
    let p = &profiles[0];
    let loads = p.traffic(Space::Global, Access::Load);
    assert_eq!(
        (loads.requests, loads.bytes),
        (8, 8 * 40 * 2),
        "global loads: {loads:?}"
    );
    assert_eq!(p.unique_global_load_bytes, 8 * 40 * 2);
    // The tile lands as one request of the whole box (the kernel itself stores nothing there).
    let tile_stores = p.traffic(Space::Shared, Access::Store);
    assert_eq!(
        (tile_stores.requests, tile_stores.bytes),
        (1, 64 * 8 * 2),
        "shared stores: {tile_stores:?}"
    );
}
