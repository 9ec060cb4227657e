//! The self-test kernels (`kernels/selftest.cu`) on every device here, the emulator under
//! every schedule, and the launch path's refusals of wrong launches.
use moe_kernels::device::{Device, DeviceKind, LaunchConfig, available_devices};
use moe_kernels::selftest::{self, Check, planted};
use moe_kernels::{Error, Result};

type SelfTest = fn(&Device) -> Result<Check>;

fn devices() -> Vec<Device> {
    let list = available_devices().expect("device list");
    for (kind, why) in &list.skipped {
        eprintln!("skipped {}: {why}", kind.name());
    }
    assert!(!list.devices.is_empty(), "no device to test on");
    list.devices
}

/// Asserts that the checks ran and passed on `device`.
fn assert_all_passed(device: &Device, checks: Result<Vec<Check>>) {
    let checks = checks.unwrap_or_else(|e| panic!("on {}: {e}", device.description()));
    for check in checks {
        assert!(
            check.passed,
            "{} on {}: {}",
            check.name,
            device.description(),
            check.detail
        );
    }
}

/// Runs one self-test on every available device.
fn on_every_device(test: SelfTest) {
    for device in devices() {
        assert_all_passed(&device, test(&device).map(|check| vec![check]));
    }
}

#[test]
fn block_reduce() {
    on_every_device(selftest::block_reduce);
}

#[test]
fn shuffles() {
    on_every_device(selftest::shuffles);
}

#[test]
fn votes() {
    on_every_device(selftest::votes);
}

#[test]
fn atomics() {
    on_every_device(selftest::atomics);
}

#[test]
fn mma() {
    on_every_device(selftest::mma);
}

#[test]
fn convert_tf32() {
    on_every_device(selftest::convert_tf32);
}

#[test]
fn ldmatrix() {
    on_every_device(selftest::ldmatrix);
}

#[test]
fn cp_async() {
    on_every_device(selftest::cp_async);
}

#[test]
fn dynamic_shared() {
    on_every_device(selftest::dynamic_shared);
}

#[test]
fn barrier_reduce() {
    on_every_device(selftest::barrier_reduce);
}

#[test]
fn float_minmax() {
    on_every_device(selftest::float_minmax);
}

#[test]
fn convert_16bit() {
    on_every_device(selftest::convert_16bit);
}

/// Runs the wgmma self-test on `device`; a GPU without sm_90a is listed as skipped.
fn wgmma_on(device: &Device) {
    match selftest::wgmma(device) {
        Err(Error::UnsupportedGpu { found, .. }) => {
            eprintln!("skipped wgmma on {}: sm_{found} has no wgmma", device.description());
        }
        result => assert_all_passed(device, result.map(|check| vec![check])),
    }
}

#[test]
fn wgmma() {
    for device in devices() {
        wgmma_on(&device);
    }
}

#[test]
fn run_all_reports_every_check_once() {
    let device = Device::best().expect("a device");
    let names: Vec<&str> = selftest::run_all(&device).unwrap().iter().map(|c| c.name).collect();
    let expected = [
        "block_reduce",
        "shuffles",
        "votes",
        "atomics",
        "mma",
        "ldmatrix",
        "cp_async",
        "dynamic_shared",
        "convert_16bit",
        "convert_tf32",
        "barrier_reduce",
        "float_minmax",
    ];
    assert_eq!(names, expected);
}

// ------------------------------------------------------------------------------------------
// Correct kernels pass under every schedule of the emulator.

#[cfg(feature = "emulator")]
mod schedules {
    use super::*;
    use moe_kernels::device::{EmulatorDevice, Schedule};

    fn every_check_passes(schedule: Schedule) {
        let device = Device::Emulator(EmulatorDevice::from_env().expect("emulator").with_schedule(schedule));
        assert_all_passed(&device, selftest::run_all(&device));
        wgmma_on(&device);
    }

    #[test]
    fn in_order() {
        every_check_passes(Schedule::InOrder);
    }

    #[test]
    fn reverse() {
        every_check_passes(Schedule::Reverse);
    }

    #[test]
    fn random() {
        for seed in [1, 7, 0xC0FFEE] {
            every_check_passes(Schedule::Random { seed });
        }
    }

    #[test]
    fn run_ahead() {
        for seed in [1, 7] {
            every_check_passes(Schedule::RunAhead { seed });
        }
    }
}

// ------------------------------------------------------------------------------------------
// The launch path refuses wrong launches with an error that says what is wrong.

#[cfg(feature = "emulator")]
#[test]
fn a_wrong_argument_list_is_a_signature_error() {
    let device = Device::emulator().unwrap();
    for mistake in [
        planted::ArgumentMistake::MissingScalar,
        planted::ArgumentMistake::WideScalar,
    ] {
        match planted::launch_with_wrong_arguments(&device, mistake) {
            Err(Error::KernelSignature { kernel, detail }) => {
                assert_eq!(kernel, "selftest_dynamic_shared");
                assert!(
                    detail.contains("[8, 4]"),
                    "{mistake:?}: the detail should list the kernel's sizes: {detail}"
                );
            }
            other => panic!("{mistake:?}: expected a signature error, got {other:?}"),
        }
    }
}

/// Launches a valid kernel with `config` on every device: the emulator must refuse it with a
/// message containing `reason_says`; a GPU must refuse it too (its driver's words).
fn invalid_config_is_refused(config: LaunchConfig, reason_says: &str) {
    for device in devices() {
        match planted::launch_with_config(&device, config) {
            Err(Error::InvalidLaunch { kernel, reason }) => {
                assert!(
                    reason.contains(reason_says),
                    "{config:?}: `{reason}` should say `{reason_says}`"
                );
                assert_eq!(kernel, "selftest_dynamic_shared");
            }
            other => panic!(
                "{config:?} on {}: expected a refusal, got {other:?}",
                device.description()
            ),
        }
    }
}

#[test]
fn a_block_of_2048_threads_is_refused() {
    invalid_config_is_refused(LaunchConfig::linear(1, 2048, 0), "must have 1 to 1024 threads");
}

#[test]
fn a_block_of_0_threads_is_refused() {
    invalid_config_is_refused(LaunchConfig::linear(1, 0, 0), "must have 1 to 1024 threads");
}

#[test]
fn a_grid_of_0_blocks_is_refused() {
    invalid_config_is_refused(LaunchConfig::linear(0, 32, 128), "grid (0,1,1) must be");
}

#[test]
fn too_much_dynamic_shared_memory_is_refused() {
    invalid_config_is_refused(
        LaunchConfig::linear(1, 32, 256 * 1024),
        "dynamic shared memory of 262144 bytes",
    );
}

#[test]
#[ignore = "needs a CUDA GPU: run `cargo test -- --include-ignored` where there is one"]
fn a_buffer_from_another_device_is_refused() {
    let devices = devices();
    let (Some(emulator), Some(cuda)) = (
        devices.iter().find(|d| d.kind() == DeviceKind::Emulator),
        devices.iter().find(|d| d.kind() == DeviceKind::Cuda),
    ) else {
        panic!("this test needs both the emulator and a CUDA device");
    };
    for (device, other) in [(emulator, cuda), (cuda, emulator)] {
        match planted::launch_with_buffer_from(device, other) {
            Err(Error::WrongDevice {
                argument: "out",
                expected,
                found,
            }) => {
                assert_eq!((expected, found), (device.kind().name(), other.kind().name()));
            }
            result => panic!("a buffer from {other:?} launched on {device:?}: {result:?}"),
        }
    }
}
