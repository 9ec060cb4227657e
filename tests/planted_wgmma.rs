//! The emulator's Hopper checks against kernels with planted wgmma and warpgroup bugs
//! (`kernels/planted_wgmma.cu`): wgmma operands read at the covering `wait_group`, poisoned
//! accumulators, the async-proxy fence check, and the warpgroup collectives' uniformity checks.
//! Each test fails if its check stopped catching its bug; the controls must pass everywhere.
#![cfg(feature = "emulator")]
use moe_kernels::device::{Device, EmulatorDevice, Schedule};
use moe_kernels::selftest::planted::wgmma::{self, PipelineBug, WarpgroupBug};
use moe_kernels::{Error, Result};
use std::fmt::Debug;

const SCHEDULES: [Schedule; 5] = [
    Schedule::InOrder,
    Schedule::Reverse,
    Schedule::Random { seed: 1 },
    Schedule::Random { seed: 0x5EED },
    Schedule::RunAhead { seed: 7 },
];

fn emulator(schedule: Schedule) -> Device {
    let emu = EmulatorDevice::from_env().expect("emulator").with_schedule(schedule);
    Device::Emulator(emu.with_racecheck(false).expect("the race detector off"))
}

/// The launch failed, naming `kernel` and every one of `expected`.
fn assert_launch_failed<T: Debug>(result: Result<T>, schedule: Schedule, kernel: &str, expected: &[&str]) {
    match result {
        Err(Error::LaunchFailed(msg)) => {
            assert!(msg.contains(kernel), "{schedule:?}: should name the kernel: {msg}");
            for word in expected {
                assert!(msg.contains(word), "{schedule:?}: should mention {word:?}: {msg}");
            }
        }
        other => panic!("{schedule:?}: expected a failed launch, got {other:?}"),
    }
}

#[test]
fn the_wgmma_pipeline_control_is_exact_under_every_schedule() {
    for (i, schedule) in SCHEDULES.into_iter().enumerate() {
        let out = wgmma::wgmma_pipeline(&emulator(schedule), PipelineBug::None, 10 + i as u64).unwrap();
        assert_eq!(out.differing(), 0, "{schedule:?}: {:?}", &out.got[..4]);
    }
}

#[test]
fn a_stage_refilled_before_its_wait_group_changes_the_product() {
    for (i, schedule) in SCHEDULES.into_iter().enumerate() {
        let device = emulator(schedule);
        let out = wgmma::wgmma_pipeline(&device, PipelineBug::StageReleasedBeforeWait, 20 + i as u64).unwrap();
        assert!(out.differing() > 0, "{schedule:?}: the early refill went unseen");
        assert!(
            out.got.iter().all(|v| v.is_finite()),
            "{schedule:?}: only the operands changed"
        );
    }
}

#[test]
fn accumulators_read_before_the_wait_are_nan() {
    for (i, schedule) in SCHEDULES.into_iter().enumerate() {
        let out = wgmma::wgmma_pipeline(
            &emulator(schedule),
            PipelineBug::AccumulatorReadBeforeWait,
            30 + i as u64,
        );
        let out = out.unwrap();
        assert!(out.got.iter().all(|v| v.is_nan()), "{schedule:?}: {:?}", &out.got[..4]);
    }
}

#[test]
fn a_missing_proxy_fence_fails_the_launch() {
    for (i, schedule) in SCHEDULES.into_iter().enumerate() {
        let result = wgmma::wgmma_pipeline(&emulator(schedule), PipelineBug::MissingProxyFence, 40 + i as u64);
        assert_launch_failed(
            result,
            schedule,
            "planted_wgmma_pipeline",
            &["fence.proxy.async", "wgmma"],
        );
    }
}

#[test]
fn the_warpgroup_control_passes_under_every_schedule() {
    for schedule in SCHEDULES {
        let out = wgmma::warpgroup(&emulator(schedule), WarpgroupBug::None).unwrap();
        assert_eq!(out.differing(), 0, "{schedule:?}");
    }
}

#[test]
fn a_misaligned_warpgroup_fails_the_launch() {
    for schedule in SCHEDULES {
        let result = wgmma::warpgroup(&emulator(schedule), WarpgroupBug::MisalignedWarpgroup);
        assert_launch_failed(result, schedule, "planted_warpgroup", &["warpgroup", "wgmma"]);
    }
}

#[test]
fn a_non_uniform_setmaxnreg_fails_the_launch() {
    for schedule in SCHEDULES {
        let result = wgmma::warpgroup(&emulator(schedule), WarpgroupBug::NonUniformSetmaxnreg);
        assert_launch_failed(result, schedule, "planted_warpgroup", &["setmaxnreg", "232", "240"]);
    }
}
