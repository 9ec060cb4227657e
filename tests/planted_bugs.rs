//! The emulator's tools against kernels with planted bugs (`kernels/planted_bugs.cu`). Each
//! test fails if its tool stopped catching its bug: the shuffled and run-ahead schedules
//! (missing barriers), copies landing only at `cp.async.wait_group`, ldmatrix reading each row
//! when its lane arrives, the race detector of the profiling build, deadlock and `__trap`
//! reporting, and the AddressSanitizer build.
#![cfg(feature = "emulator")]
use moe_kernels::device::emulator::{address_sanitizer, profiling_build};
use moe_kernels::device::{Device, EmulatorDevice, Schedule};
use moe_kernels::selftest::planted;
use moe_kernels::selftest::planted::races::{self, Tiling};
use moe_kernels::{Error, Result};
use std::fmt::Debug;
use std::process::Command;
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// The emulator on `schedule`, without the race detector even when MOE_EMU_RACECHECK=1 (these
/// tests look at what the bugs do to the values).
fn emulator(schedule: Schedule) -> Device {
    let emu = EmulatorDevice::from_env().expect("emulator").with_schedule(schedule);
    Device::Emulator(emu.with_racecheck(false).expect("the race detector off"))
}

/// The schedules that reorder the threads released together.
const SHUFFLED: [Schedule; 5] = [
    Schedule::Reverse,
    Schedule::Random { seed: 1 },
    Schedule::Random { seed: 2 },
    Schedule::Random { seed: 0x5EED },
    Schedule::RunAhead { seed: 7 },
];

/// Run-ahead with several seeds: each picks other warps to run ahead.
const RUN_AHEAD: [Schedule; 4] = [
    Schedule::RunAhead { seed: 1 },
    Schedule::RunAhead { seed: 2 },
    Schedule::RunAhead { seed: 3 },
    Schedule::RunAhead { seed: 4 },
];

fn every_schedule() -> impl Iterator<Item = Schedule> {
    std::iter::once(Schedule::InOrder).chain(SHUFFLED)
}

/// A different input seed for every launch of a test, so that no launch finds the right
/// values left in shared memory by an earlier one.
fn seeds(first: u64) -> impl FnMut() -> u64 {
    let mut next = first;
    move || {
        next += 1;
        next
    }
}

// ------------------------------------------------------------------------------------------
// Missing barriers: output differences.

const SHIFT_BLOCKS: u32 = 4;

#[test]
fn missing_syncthreads_hides_in_order_and_shows_under_shuffled_schedules() {
    let mut seed = seeds(100);
    // In order, thread t-1 runs to completion before thread t: the race cannot show.
    let in_order = planted::shift(&emulator(Schedule::InOrder), false, SHIFT_BLOCKS, seed()).unwrap();
    assert_eq!(
        in_order.differing(),
        0,
        "in-order execution is expected to hide the missing barrier"
    );
    for schedule in SHUFFLED {
        let out = planted::shift(&emulator(schedule), false, SHIFT_BLOCKS, seed()).unwrap();
        assert!(out.differing() > 0, "{schedule:?} hid the missing __syncthreads");
        if schedule == Schedule::Reverse {
            // Every thread but each block's first reads its neighbour's slot before it is written.
            assert_eq!(out.differing(), SHIFT_BLOCKS as usize * 255, "{schedule:?}");
        }
    }
}

#[test]
fn with_syncthreads_the_shift_is_right_under_every_schedule() {
    let mut seed = seeds(200);
    for schedule in every_schedule() {
        let out = planted::shift(&emulator(schedule), true, SHIFT_BLOCKS, seed()).unwrap();
        assert_eq!(out.got, out.expected, "{schedule:?}");
    }
}

const STAGE_BLOCKS: u32 = 3;
const STAGE_THREADS: u32 = 64;

#[test]
fn missing_cp_async_wait_shows_under_every_schedule() {
    let mut seed = seeds(300);
    for schedule in every_schedule() {
        let out = planted::cp_async_stage(&emulator(schedule), false, STAGE_BLOCKS, STAGE_THREADS, seed()).unwrap();
        // At least the first thread of each block to read finds its neighbour's copy pending.
        let block = 4 * STAGE_THREADS as usize;
        for (b, (got, expected)) in out.got.chunks(block).zip(out.expected.chunks(block)).enumerate() {
            assert_ne!(
                got, expected,
                "{schedule:?}: block {b} read shared memory before the copies landed, unseen"
            );
        }
        if schedule == Schedule::InOrder {
            // Each thread's copy lands when it exits: all but the last thread read a pending one.
            let stale_threads = STAGE_BLOCKS * (STAGE_THREADS - 1);
            assert_eq!(out.differing(), 4 * stale_threads as usize, "{schedule:?}");
        }
    }
}

#[test]
fn with_cp_async_wait_the_rotation_is_right_under_every_schedule() {
    let mut seed = seeds(400);
    for schedule in every_schedule() {
        let out = planted::cp_async_stage(&emulator(schedule), true, STAGE_BLOCKS, STAGE_THREADS, seed()).unwrap();
        assert_eq!(out.got, out.expected, "{schedule:?}");
    }
}

#[test]
fn missing_syncwarp_before_ldmatrix_shows_under_every_schedule() {
    let mut seed = seeds(500);
    for schedule in every_schedule() {
        // In order, lane 31 writes row 0 after lane 0's ldmatrix read it; reordered, more rows.
        let out = planted::ldmatrix_after_writes(&emulator(schedule), false, seed()).unwrap();
        assert!(out.differing() > 0, "{schedule:?} hid the missing __syncwarp");
    }
}

#[test]
fn with_syncwarp_ldmatrix_is_right_under_every_schedule() {
    let mut seed = seeds(600);
    for schedule in every_schedule() {
        let out = planted::ldmatrix_after_writes(&emulator(schedule), true, seed()).unwrap();
        assert_eq!(out.got, out.expected, "{schedule:?}");
    }
}

// ------------------------------------------------------------------------------------------
// Launch failures: reported as errors, and the emulator keeps working afterwards.

/// Runs `launch` on its own thread and gives up after a minute, so a hang fails the test
/// instead of stalling the run. Returns the launch's result and how long it took.
fn within_a_minute(launch: fn(&Device) -> Result<()>, schedule: Schedule) -> (Result<()>, Duration) {
    let (send, receive) = mpsc::channel();
    std::thread::spawn(move || {
        let start = Instant::now();
        let result = launch(&emulator(schedule));
        let _ = send.send((result, start.elapsed()));
    });
    receive
        .recv_timeout(Duration::from_secs(60))
        .expect("the launch hung: no result within 60 s")
}

/// After a failed launch the emulator still runs a correct kernel correctly.
fn assert_emulator_recovered(schedule: Schedule) {
    let out = planted::shift(&emulator(schedule), true, 2, 700).unwrap();
    assert_eq!(
        out.got, out.expected,
        "{schedule:?}: a correct launch after a failed one"
    );
}

#[test]
fn divergent_barrier_is_reported_as_a_deadlock() {
    for schedule in every_schedule() {
        let (result, took) = within_a_minute(planted::divergent_barrier, schedule);
        match result {
            Err(Error::LaunchFailed(msg)) => {
                assert!(msg.contains("deadlock"), "{schedule:?}: {msg}");
                assert!(
                    msg.contains("planted_divergent_barrier"),
                    "{schedule:?}: should name the kernel: {msg}"
                );
            }
            other => panic!("{schedule:?}: expected a deadlock error, got {other:?}"),
        }
        assert!(
            took < Duration::from_secs(5),
            "{schedule:?}: detecting the deadlock took {took:?}"
        );
        assert_emulator_recovered(schedule);
    }
}

#[test]
fn trap_is_reported_as_a_launch_failure() {
    for schedule in every_schedule() {
        let (result, _) = within_a_minute(planted::trap, schedule);
        match result {
            Err(Error::LaunchFailed(msg)) => assert!(msg.contains("__trap"), "{schedule:?}: {msg}"),
            other => panic!("{schedule:?}: expected a __trap error, got {other:?}"),
        }
        assert_emulator_recovered(schedule);
    }
}

/// A tf32 mma fed raw f32 bits (no cvt.rna.tf32.f32) fails the launch; rounded, it runs.
#[test]
fn raw_f32_bits_in_a_tf32_mma_fail_the_launch() {
    for schedule in every_schedule() {
        let device = emulator(schedule);
        match planted::raw_tf32_operand(&device, true) {
            Err(Error::LaunchFailed(msg)) => assert!(msg.contains("not a tf32 value"), "{schedule:?}: {msg}"),
            other => panic!("{schedule:?}: expected a tf32 operand error, got {other:?}"),
        }
        planted::raw_tf32_operand(&device, false).unwrap_or_else(|e| panic!("{schedule:?}: the control failed: {e}"));
    }
}

// ------------------------------------------------------------------------------------------
// Misaligned accesses: the GPU faults ("misaligned address"); the emulator fails the launch
// with the access, the address and the alignment it needs.

/// What the emulator names each planted access in its message.
fn access_name(access: planted::MisalignedAccess) -> &'static str {
    use planted::MisalignedAccess::*;
    match access {
        Load128 => "load_128",
        Store128 => "store_128",
        CpAsync16Source => "cp.async (16 bytes) global source",
        CpAsync16Destination => "cp.async (16 bytes) shared destination",
        CpAsync8 => "cp.async (8 bytes) global source",
        CpAsync4 => "cp.async (4 bytes) global source",
        LdMatrixRow => "ldmatrix row",
        Float2Load => "float2",
        U32Store => "store to",
        AtomicAdd => "atomic",
        LdgFloat4 => "__ldg",
        Load64 => "load_64",
        Store64 => "store_64",
    }
}

#[test]
fn misaligned_accesses_fail_the_launch_with_the_access_address_and_alignment() {
    let device = emulator(Schedule::InOrder);
    for access in planted::MisalignedAccess::ALL {
        let alignment = access.alignment();
        // Aligned: the control runs (at 0 and at the access's own width).
        for offset in [0, alignment % 16] {
            planted::misaligned_access(&device, access, offset)
                .unwrap_or_else(|e| panic!("{access:?} at offset {offset}: {e}"));
        }
        if access == planted::MisalignedAccess::Float2Load && profiling_build() {
            // clang (the profiling build) checks scalar accesses and member accesses, not
            // copies of a whole struct through a cast pointer; gcc (every other build) does.
            eprintln!("skipped: {access:?} is not checked in the profiling build");
            continue;
        }
        for offset in [alignment / 2, 1] {
            match planted::misaligned_access(&device, access, offset) {
                Err(Error::LaunchFailed(message)) => {
                    for expected in [
                        "planted_misaligned_access",
                        "misaligned address",
                        access_name(access),
                        &format!("needs {alignment}-byte alignment"),
                    ] {
                        assert!(
                            message.contains(expected),
                            "{access:?} at offset {offset}: `{message}` lacks `{expected}`"
                        );
                    }
                }
                other => panic!("{access:?} at offset {offset}: expected a launch failure, got {other:?}"),
            }
        }
    }
    assert_emulator_recovered(Schedule::InOrder);
}

// ------------------------------------------------------------------------------------------
// An array of known size indexed past its end: undefined behaviour on the GPU; the emulated
// kernels are compiled with bounds checks that fail the launch.

#[test]
fn array_indexed_past_its_end_fails_the_launch() {
    let device = emulator(Schedule::InOrder);
    for shared in [false, true] {
        for index in 0..8 {
            let out = planted::bounds::array_overrun(&device, index, shared).unwrap();
            assert_eq!(out.got, out.expected, "index {index}, shared {shared}");
        }
        for index in [8, -1] {
            match planted::bounds::array_overrun(&device, index, shared) {
                Err(Error::LaunchFailed(message)) => {
                    for expected in [
                        "planted_array_overrun",
                        &format!("index {index} out of bounds"),
                        "planted_bugs.cu",
                    ] {
                        assert!(message.contains(expected), "`{message}` lacks `{expected}`");
                    }
                }
                other => panic!("index {index}, shared {shared}: expected a launch failure, got {other:?}"),
            }
        }
    }
    assert_emulator_recovered(Schedule::InOrder);
}

// ------------------------------------------------------------------------------------------
// Memory errors: only the AddressSanitizer build sees them, and it aborts the process, so the
// bad kernel runs in a child process: this same test binary, running only the same test.

/// Set in the child to the test whose bad kernel it must launch.
const CHILD: &str = "MOE_PLANTED_CHILD";

/// The test `test` launches `bad` in a child process and asserts that AddressSanitizer reported
/// `error` and that the emulator named the CUDA `thread` (as "(x,y,z) of block (x,y,z)").
fn caught_by_address_sanitizer(test: &str, bad: fn(&Device) -> Result<()>, error: &str, thread: &str) {
    // Never launch the bad kernel without the sanitizer: it would corrupt this process's memory.
    assert!(
        address_sanitizer(),
        "needs the AddressSanitizer build (MOE_EMU_SANITIZE=address)"
    );
    if std::env::var(CHILD).is_ok_and(|v| v == test) {
        let result = bad(&emulator(Schedule::InOrder));
        panic!("AddressSanitizer let the planted bug through (the launch returned {result:?})");
    }
    let child = Command::new(std::env::current_exe().expect("the test binary"))
        .args(["--exact", test, "--nocapture", "--test-threads=1"])
        .env(CHILD, test)
        .env("ASAN_OPTIONS", "detect_leaks=0")
        .output()
        .expect("running the test binary again");
    let stderr = String::from_utf8_lossy(&child.stderr);
    assert!(
        !child.status.success(),
        "the child survived the planted bug; its stderr:\n{stderr}"
    );
    for expected in [
        "AddressSanitizer",
        error,
        "cuemu: the report above comes from CUDA thread",
        thread,
    ] {
        assert!(
            stderr.contains(expected),
            "the child's stderr lacks `{expected}`:\n{stderr}"
        );
    }
}

#[test]
#[cfg_attr(
    not(moe_emu_asan),
    ignore = "needs the AddressSanitizer build: MOE_EMU_SANITIZE=address; CI runs it"
)]
fn out_of_bounds_global_write_is_caught_by_address_sanitizer() {
    caught_by_address_sanitizer(
        "out_of_bounds_global_write_is_caught_by_address_sanitizer",
        planted::out_of_bounds_write,
        "heap-buffer-overflow",
        "(100,0,0) of block (0,0,0)",
    );
}

#[test]
#[cfg_attr(
    not(moe_emu_asan),
    ignore = "needs the AddressSanitizer build: MOE_EMU_SANITIZE=address; CI runs it"
)]
fn static_shared_overrun_is_caught_by_address_sanitizer() {
    caught_by_address_sanitizer(
        "static_shared_overrun_is_caught_by_address_sanitizer",
        planted::static_shared_overrun,
        "global-buffer-overflow",
        "(63,0,0) of block (0,0,0)",
    );
}

// ------------------------------------------------------------------------------------------
// Races the schedules hide: a dropped "tile consumed" barrier before ldmatrix-fed k-tiles
// (shown by run-ahead) and a dropped __syncwarp between ballot-ranked count updates (shown by
// no schedule). The race detector (profiling build, MOE_EMU_RACECHECK) reports both.

/// The emulator on `schedule` with the race detector (the tests that call it are ignored outside
/// the profiling build, which has it).
fn race_detector(schedule: Schedule) -> Device {
    let emu = EmulatorDevice::from_env().expect("emulator").with_schedule(schedule);
    Device::Emulator(emu.with_racecheck(true).expect("the race detector (MOE_EMU_PROFILE=1)"))
}

/// `result` is the race detector's report, naming `kernel` and containing each of `expected`.
fn assert_race<T: Debug>(result: Result<T>, kernel: &str, expected: &[&str]) {
    match result {
        Err(Error::LaunchFailed(message)) => {
            eprintln!("the report: {message}");
            for part in [kernel, "shared-memory race"].iter().chain(expected) {
                assert!(message.contains(part), "`{message}` lacks `{part}`");
            }
            // Both accesses are named by thread, warp and lane.
            assert_eq!(message.matches(" (warp ").count(), 2, "{message}");
            if cfg!(debug_assertions) {
                // Test builds carry debug information: the sites are source lines.
                assert!(
                    message.matches(".cu:").count() + message.matches(".cuh:").count() >= 2,
                    "{message}"
                );
            }
        }
        other => panic!("expected the race detector to fail the launch, got {other:?}"),
    }
}

#[test]
fn dropped_tile_barrier_hides_in_first_in_first_out_schedules_and_shows_running_ahead() {
    let mut seed = seeds(800);
    for schedule in every_schedule().filter(|s| !matches!(s, Schedule::RunAhead { .. })) {
        // Warps stay within one collective of each other: every warp has read tile kt before
        // any overwrites it, so the values come out right.
        let out = races::tile_barrier(&emulator(schedule), Tiling::OneBufferNoConsumedBarrier, seed()).unwrap();
        assert_eq!(
            out.got, out.expected,
            "{schedule:?} is expected to hide the dropped barrier"
        );
    }
    for schedule in RUN_AHEAD {
        let out = races::tile_barrier(&emulator(schedule), Tiling::OneBufferNoConsumedBarrier, seed()).unwrap();
        assert!(
            out.differing() > 0,
            "{schedule:?} hid the dropped \"tile consumed\" barrier"
        );
    }
}

#[test]
#[cfg_attr(
    not(moe_emu_profile),
    ignore = "needs the race detector of the profiling build: MOE_EMU_PROFILE=1 (clang-19); CI runs it"
)]
fn dropped_tile_barrier_is_caught_by_the_race_detector() {
    let mut seed = seeds(1000);
    for schedule in every_schedule() {
        let device = race_detector(schedule);
        // A warp's store of tile kt + 1 against the other warp's ldmatrix of tile kt, in
        // either order.
        assert_race(
            races::tile_barrier(&device, Tiling::OneBufferNoConsumedBarrier, seed()),
            "planted_tile_barrier",
            &[
                "ldmatrix row read of 16 bytes",
                "store of 16 bytes",
                "static __shared__ offset",
            ],
        );
    }
}

/// The race-free tilings on `device(schedule)` under every schedule: right, and no report.
fn race_free_tilings_on(device: fn(Schedule) -> Device, mut seed: impl FnMut() -> u64) {
    for tiling in Tiling::RACE_FREE {
        for schedule in every_schedule().chain(RUN_AHEAD) {
            let out = races::tile_barrier(&device(schedule), tiling, seed())
                .unwrap_or_else(|e| panic!("{tiling:?} under {schedule:?}: {e}"));
            assert_eq!(out.got, out.expected, "{tiling:?} under {schedule:?}");
        }
    }
}

#[test]
fn race_free_tilings_are_right_under_every_schedule() {
    race_free_tilings_on(emulator, seeds(900));
}

#[test]
#[cfg_attr(
    not(moe_emu_profile),
    ignore = "needs the race detector of the profiling build: MOE_EMU_PROFILE=1 (clang-19); CI runs it"
)]
fn race_free_tilings_raise_no_race_report() {
    race_free_tilings_on(race_detector, seeds(950));
}

#[test]
fn dropped_syncwarp_between_ballot_ranks_hides_under_every_schedule() {
    let mut seed = seeds(1200);
    for schedule in every_schedule() {
        // The emulated ballots wait for every lane, so they order what a GPU leaves unordered.
        let out = races::warp_rank(&emulator(schedule), false, seed()).unwrap();
        assert_eq!(out.got, out.expected, "{schedule:?}");
    }
}

#[test]
#[cfg_attr(
    not(moe_emu_profile),
    ignore = "needs the race detector of the profiling build: MOE_EMU_PROFILE=1 (clang-19); CI runs it"
)]
fn dropped_syncwarp_between_ballot_ranks_is_caught_by_the_race_detector() {
    let mut seed = seeds(1300);
    for schedule in every_schedule() {
        let device = race_detector(schedule);
        // A lowest peer's count advance, then another lane's read of it in the next chunk.
        assert_race(
            races::warp_rank(&device, false, seed()),
            "planted_warp_rank",
            &["store of 4 bytes", "load of 4 bytes", "__syncwarp"],
        );
        let out = races::warp_rank(&device, true, seed()).unwrap();
        assert_eq!(out.got, out.expected, "{schedule:?}: with the __syncwarp");
    }
}

#[test]
fn race_free_idioms_are_right_under_every_schedule() {
    for schedule in every_schedule() {
        let out = races::race_free_idioms(&emulator(schedule)).unwrap();
        assert_eq!(out.got, out.expected, "{schedule:?}");
    }
}

#[test]
#[cfg_attr(
    not(moe_emu_profile),
    ignore = "needs the race detector of the profiling build: MOE_EMU_PROFILE=1 (clang-19); CI runs it"
)]
fn race_free_idioms_raise_no_race_report() {
    for schedule in every_schedule() {
        let out = races::race_free_idioms(&race_detector(schedule)).unwrap_or_else(|e| panic!("{schedule:?}: {e}"));
        assert_eq!(out.got, out.expected, "{schedule:?}");
    }
}

#[test]
#[cfg_attr(
    not(moe_emu_profile),
    ignore = "needs the race detector of the profiling build: MOE_EMU_PROFILE=1 (clang-19); CI runs it"
)]
fn the_race_detector_catches_the_older_planted_races_and_passes_their_controls() {
    let mut seed = seeds(1400);
    for schedule in every_schedule() {
        let device = race_detector(schedule);
        // In order too: the detector does not need the schedule to expose the race.
        assert_race(
            planted::shift(&device, false, SHIFT_BLOCKS, seed()),
            "planted_missing_syncthreads",
            &["store of 4 bytes", "load of 4 bytes"],
        );
        assert_race(
            planted::ldmatrix_after_writes(&device, false, seed()),
            "planted_missing_syncwarp",
            &["store of 2 bytes", "ldmatrix row read of 16 bytes"],
        );
        assert_race(
            planted::cp_async_stage(&device, false, STAGE_BLOCKS, STAGE_THREADS, seed()),
            "planted_missing_cp_async_wait",
            &["cp.async copy of 16 bytes", "load of 16 bytes"],
        );
        let shift = planted::shift(&device, true, SHIFT_BLOCKS, seed()).unwrap();
        assert_eq!(shift.got, shift.expected, "{schedule:?}");
        let rows = planted::ldmatrix_after_writes(&device, true, seed()).unwrap();
        assert_eq!(rows.got, rows.expected, "{schedule:?}");
        let stage = planted::cp_async_stage(&device, true, STAGE_BLOCKS, STAGE_THREADS, seed()).unwrap();
        assert_eq!(stage.got, stage.expected, "{schedule:?}");
    }
}

#[test]
fn the_race_detector_is_refused_without_the_profiling_build() {
    let result = EmulatorDevice::new().with_racecheck(true);
    if profiling_build() {
        assert!(result.is_ok_and(|d| d.racecheck()));
    } else {
        match result {
            Err(Error::Environment { name, expected, .. }) => {
                assert_eq!(name, "MOE_EMU_RACECHECK");
                assert!(expected.contains("MOE_EMU_PROFILE=1"), "{expected}");
            }
            other => panic!("expected a refusal, got {other:?}"),
        }
    }
}
