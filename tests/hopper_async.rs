//! Hopper's asynchronous data movement: the self-tests of `kernels/selftest_async.cu` and the
//! end-to-end demonstration GEMM of `kernels/hopper_demo.cu` on the emulator under every
//! schedule (and on an sm_90 GPU when there is one), the planted bugs of
//! `kernels/planted_async.cu` caught, and tensor maps refused where the driver refuses them.
use half::bf16;
use moe_kernels::device::{Device, DeviceKind, Swizzle, TensorMapSpec, available_devices};
use moe_kernels::selftest::hopper::{self, hopper_capable};
use moe_kernels::selftest::hopper_demo;
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
    hopper_devices_under_more_schedules(false)
}

/// [`hopper_devices`], and with `more` the emulator also in order and under more shuffles and
/// run-aheads (the end-to-end demonstration's pipeline).
fn hopper_devices_under_more_schedules(more: bool) -> Vec<Device> {
    let list = available_devices().expect("device list");
    let mut devices: Vec<Device> = list.devices.into_iter().filter(hopper_capable).collect();
    #[cfg(feature = "emulator")]
    {
        use moe_kernels::device::{EmulatorDevice, Schedule};
        let emu = EmulatorDevice::from_env().expect("emulator");
        let basic = [
            Schedule::Reverse,
            Schedule::Random { seed: 3 },
            Schedule::RunAhead { seed: 5 },
        ];
        let extra = [
            Schedule::InOrder,
            Schedule::Random { seed: 20261123 },
            Schedule::Random { seed: 0x5EED },
            Schedule::RunAhead { seed: 12 },
        ];
        for schedule in basic.into_iter().chain(extra.into_iter().filter(|_| more)) {
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
// The end-to-end demonstration: TMA -> 3-stage mbarrier ring -> wgmma, warp-specialised.

#[test]
fn the_demo_gemm_matches_the_f64_reference_under_every_schedule() {
    for device in hopper_devices_under_more_schedules(true) {
        assert_passed(&device, hopper_demo::gemm_demo(&device));
    }
}

#[cfg(feature = "emulator")]
#[test]
fn the_demo_gemm_refuses_shapes_tma_cannot_take() {
    let device = Device::emulator().expect("emulator");
    let (a, b) = (vec![bf16::ONE; 64 * 64], vec![bf16::ONE; 64 * 64]);
    // (m, n, k), the elements of a and b passed, the argument refused, what the error says.
    let cases = [
        ((64, 60, 64), 64 * 64, 64 * 60, "n", "a multiple of 8"),
        ((64, 64, 60), 64 * 60, 60 * 64, "k", "a multiple of 8"),
        ((64, 64, 64), 64, 64 * 64, "a", "m * k = 4096"),
        ((64, 64, 0), 0, 0, "k", "1..=i32::MAX"),
    ];
    for (shape, a_len, b_len, argument, says) in cases {
        match hopper_demo::gemm(&device, &a[..a_len], &b[..b_len], shape) {
            Err(e @ Error::InvalidArgument { .. }) => {
                let message = e.to_string();
                assert!(
                    matches!(e, Error::InvalidArgument { argument: got, .. } if got == argument),
                    "{shape:?}: `{message}` should name `{argument}`"
                );
                assert!(message.contains(says), "{shape:?}: `{message}` lacks `{says}`");
            }
            other => panic!("{shape:?}: expected `{argument}` refused, got {other:?}"),
        }
    }
}

/// On an H100 or H200: the GPU's result matches the emulator's within the math §9 tolerance of
/// an f32 accumulation (the two accumulate in different orders).
#[cfg(feature = "emulator")]
#[test]
#[ignore = "needs an sm_90 GPU: run `cargo test -- --include-ignored` where there is one"]
fn the_demo_gemm_on_an_sm90_gpu_matches_the_emulator() {
    let list = available_devices().expect("device list");
    let gpu = list
        .devices
        .iter()
        .find(|d| d.kind() == DeviceKind::Cuda && hopper_capable(d))
        .expect("this test needs an sm_90 GPU");
    let emulator = Device::emulator().expect("emulator");
    let (m, n, k) = (192, 256, 1024);
    let draw = |i: usize| bf16::from_f32(((i * 7919 % 2003) as f32 / 1001.0) - 1.0);
    let a: Vec<bf16> = (0..m * k).map(draw).collect();
    let b: Vec<bf16> = (0..k * n).map(|i| draw(i + 1)).collect();
    let on_gpu = hopper_demo::gemm(gpu, &a, &b, (m, n, k)).expect("the demo on the GPU");
    let on_emulator = hopper_demo::gemm(&emulator, &a, &b, (m, n, k)).expect("the demo on the emulator");
    let (_, tolerance) = hopper_demo::reference(&a, &b, (m, n, k));
    for (i, ((g, e), t)) in on_gpu.iter().zip(&on_emulator).zip(&tolerance).enumerate() {
        let error = (f64::from(*g) - f64::from(*e)).abs();
        assert!(
            error <= 2.0 * t,
            "[{i}]: GPU {g}, emulator {e}, difference {error:.2e} > 2 x {t:.2e}"
        );
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

// ------------------------------------------------------------------------------------------
// The race detector (profiling build) follows Hopper's synchronisation: the demonstration and
// the Hopper self-tests are clean, the demonstration with a stage released early is a race.

#[cfg(feature = "emulator")]
mod race_detector {
    use super::*;
    use moe_kernels::device::{EmulatorDevice, Schedule};

    const SCHEDULES: [Schedule; 4] = [
        Schedule::InOrder,
        Schedule::Reverse,
        Schedule::Random { seed: 21 },
        Schedule::RunAhead { seed: 22 },
    ];

    fn checked(schedule: Schedule) -> Device {
        let emu = EmulatorDevice::from_env().expect("emulator").with_schedule(schedule);
        Device::Emulator(emu.with_racecheck(true).expect("the race detector (MOE_EMU_PROFILE=1)"))
    }

    #[test]
    #[cfg_attr(
        not(moe_emu_profile),
        ignore = "needs the race detector of the profiling build: MOE_EMU_PROFILE=1 (clang-19); CI runs it"
    )]
    fn the_demo_and_the_hopper_self_tests_are_race_free() {
        for schedule in SCHEDULES {
            let device = checked(schedule);
            assert_passed(&device, hopper_demo::gemm_demo(&device));
            assert_passed(&device, hopper::mbarrier_pipeline(&device));
            assert_passed(&device, hopper::tma_roundtrip(&device));
            assert_passed(&device, moe_kernels::selftest::wgmma(&device));
        }
    }

    #[test]
    #[cfg_attr(
        not(moe_emu_profile),
        ignore = "needs the race detector of the profiling build: MOE_EMU_PROFILE=1 (clang-19); CI runs it"
    )]
    fn a_stage_released_before_its_wait_group_is_a_race_under_every_schedule() {
        let (m, n, k) = (64, 128, 6 * 64);
        let draw = |i: usize| bf16::from_f32((i % 7) as f32 - 3.0);
        let (a, b): (Vec<bf16>, Vec<bf16>) = ((0..m * k).map(draw).collect(), (0..k * n).map(draw).collect());
        for schedule in SCHEDULES {
            match hopper_demo::gemm_releasing_early(&checked(schedule), &a, &b, (m, n, k)) {
                Err(Error::LaunchFailed(message)) => {
                    for part in [
                        "hopper_demo_planted_early_release",
                        "shared-memory race",
                        "TMA/bulk load landing",
                        "async-proxy read",
                    ] {
                        assert!(message.contains(part), "{schedule:?}: `{message}` lacks `{part}`");
                    }
                }
                other => panic!("{schedule:?}: expected the race detector to fail the launch, got {other:?}"),
            }
        }
    }
}
