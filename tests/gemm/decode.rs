//! The decode kernels (forward `A · B^T` and dgrad `dC · B`, `kernels/include/gemm_decode.cuh`)
//! against the reference: groups of 1 to 32 rows between empty ones, reductions split inside
//! the block with a remainder (the last split shorter, the last chunk partial), every epilogue,
//! both 16-bit dtypes and f32, bitwise determinism; the host's plan (`decode_plan`); and, in the
//! profiling build, that each weight byte is read once (load redundancy <= 1.05).
use super::Problem;
use super::common::{Rng, devices};
use super::forward::{Case, check, run};
use super::unaligned::{Offsets, dgrad_at};
use half::{bf16, f16};
use moe_kernels::Device;
use moe_kernels::device::EmulatorDevice;
use moe_kernels::ops::gemm::{DgradConfig, DgradEpilogue, Epilogue, GemmPath, decode_plan};

/// Groups of 1 to 32 rows with empty groups between them.
const SIZES: [usize; 7] = [1, 0, 5, 32, 0, 17, 2];

/// The plan of a problem's forward (`cols` output columns, reduction `k` of `elem` bytes).
fn ksplit(p: &Problem, cols: usize, reduction: usize, elem: usize, per_lane: usize) -> usize {
    decode_plan(
        cols,
        reduction,
        elem,
        per_lane,
        p.shape.experts,
        p.rows(),
        p.max_group_rows,
    )
    .unwrap()
    .ksplit
}

#[test]
fn plan_splits_few_experts_and_keeps_many_whole() {
    // Mixtral-like W2 forward at T = 1 (N = 4096, K = 14336, E = 8, two rows): 4 splits.
    let w2 = decode_plan(4096, 14336, 2, 1, 8, 2, 1).unwrap();
    assert_eq!((w2.ksplit, w2.column_blocks, w2.rows_per_pass), (4, 128, 1));
    // DeepSeek-like W1 forward at T = 64 (h = 2048 columns of gate+up, E = 256, 512 rows):
    // 16 x 256 blocks already, no split.
    let w1 = decode_plan(2048, 7168, 2, 2, 256, 512, 64).unwrap();
    assert_eq!((w1.ksplit, w1.column_blocks, w1.rows_per_pass), (1, 16, 32));
    // A reduction of one 64-byte chunk cannot split.
    assert_eq!(decode_plan(16, 32, 2, 1, 1, 4, 4).unwrap().ksplit, 1);
    // Three chunks: two splits at most (each split keeps a chunk).
    assert_eq!(decode_plan(16, 48, 2, 1, 1, 4, 4).unwrap().ksplit, 2);
}

#[test]
fn forward_1_to_32_rows_split_k_with_remainders() {
    // K = 200 (16-bit: 7 chunks of 32, the last of 8; 4 splits of 2, 2, 2, 1 chunks);
    // f32 K = 100 (7 chunks of 16, the last of 4).
    let p16 = Problem::sized(&SIZES, 48, 200, &mut Rng::new(201));
    let p32 = Problem::sized(&SIZES, 48, 100, &mut Rng::new(202));
    assert_eq!(ksplit(&p16, 48, 200, 2, 1), 4);
    assert_eq!(ksplit(&p32, 24, 100, 4, 2), 4);
    for device in devices() {
        for (epilogue, weights) in [(Epilogue::Store, false), (Epilogue::SwiGlu, true)] {
            let case = Case {
                a_rows: p16.gathered(),
                epilogue,
                path: GemmPath::Auto,
                weights,
                save_gu: epilogue == Epilogue::SwiGlu,
            };
            check::<f16, f16>(&device, &p16, case, 203);
            check::<bf16, f32>(&device, &p16, case, 204);
            check::<f32, f32>(
                &device,
                &p32,
                Case {
                    a_rows: p32.gathered(),
                    ..case
                },
                205,
            );
            assert!(
                device.launch_configs().contains_key("grouped_gemm_decode_bf16"),
                "Auto took the tiles for groups of at most 32 rows"
            );
        }
    }
}

#[test]
fn dgrad_1_to_32_rows_split_k_with_remainders() {
    // The reduction is N: 200 (16-bit) and 100 (f32, with K = 37: rows off 16 bytes, the
    // element-wise fill of the ring); output columns K.
    let p16 = Problem::sized(&SIZES, 200, 40, &mut Rng::new(211));
    let p32 = Problem::sized(&SIZES, 100, 37, &mut Rng::new(212));
    assert_eq!(ksplit(&p16, 40, 200, 2, 1), 4);
    assert_eq!(ksplit(&p32, 37, 100, 4, 1), 4);
    let decode = |epilogue| DgradConfig {
        epilogue,
        path: GemmPath::Decode,
    };
    for device in devices() {
        for (epilogue, weights) in [(DgradEpilogue::Store, true), (DgradEpilogue::SwiGluBackward, false)] {
            dgrad_at::<f16, f16>(&device, &p16, decode(epilogue), weights, Offsets::default(), 213).unwrap();
            dgrad_at::<bf16, f32>(&device, &p16, epilogue, weights, Offsets::default(), 214).unwrap();
            dgrad_at::<f32, f32>(&device, &p32, decode(epilogue), !weights, Offsets::default(), 215).unwrap();
        }
        assert!(
            device.launch_configs().contains_key("grouped_gemm_decode_dgrad_bf16"),
            "Auto took the tiles for dgrad over groups of at most 32 rows"
        );
    }
}

#[test]
fn dgrad_paths_agree_on_big_groups() {
    // Decode forced on groups over 32 rows (several passes over B) against the reference, and
    // Auto's tile kernel on the same problem.
    let p = Problem::sized(&[70, 0, 3], 64, 24, &mut Rng::new(221));
    for device in devices() {
        let decode = DgradConfig {
            epilogue: DgradEpilogue::Store,
            path: GemmPath::Decode,
        };
        dgrad_at::<bf16, f32>(&device, &p, decode, true, Offsets::default(), 222).unwrap();
        dgrad_at::<bf16, f32>(&device, &p, DgradEpilogue::Store, true, Offsets::default(), 222).unwrap();
        assert!(device.launch_configs().contains_key("grouped_gemm_dgrad_bf16"));
    }
}

#[test]
fn decode_is_bitwise_deterministic() {
    let p = Problem::sized(&SIZES, 200, 40, &mut Rng::new(231));
    for device in devices() {
        let case = Case {
            a_rows: p.gathered(),
            epilogue: Epilogue::SwiGlu,
            path: GemmPath::Decode,
            weights: true,
            save_gu: true,
        };
        assert!(run::<bf16, f32>(&device, &p, case, 232) == run::<bf16, f32>(&device, &p, case, 232));
        let dgrad = || dgrad_at::<f16, f32>(&device, &p, DgradEpilogue::Store, true, Offsets::default(), 233).unwrap();
        assert!(dgrad() == dgrad(), "two dgrad runs differ");
    }
}

#[test]
#[cfg_attr(
    not(moe_emu_profile),
    ignore = "needs the profiling build: MOE_EMU_PROFILE=1 (clang-19); CI runs it"
)]
fn decode_kernels_read_the_weights_once() {
    let emulator = EmulatorDevice::from_env().unwrap().profiling().unwrap();
    let device = Device::Emulator(emulator.clone());
    // T = 1, top-2 of 8 experts: two groups of one row; B [8, 256, 512], 4 splits.
    let p = Problem::sized(&[0, 1, 0, 0, 1, 0, 0, 0], 256, 512, &mut Rng::new(241));
    run::<bf16, bf16>(&device, &p, Case::plain(GemmPath::Decode), 242);
    let decode = DgradConfig {
        epilogue: DgradEpilogue::Store,
        path: GemmPath::Decode,
    };
    let transposed = Problem::sized(&[0, 1, 0, 0, 1, 0, 0, 0], 512, 256, &mut Rng::new(243));
    dgrad_at::<bf16, bf16>(&device, &transposed, decode, false, Offsets::default(), 244).unwrap();
    let mut seen = vec![];
    for profile in emulator.take_profiles() {
        let redundancy = profile.global_load_redundancy();
        assert!(redundancy <= 1.05, "{}: load redundancy {redundancy}", profile.kernel);
        seen.push(profile.kernel);
    }
    assert_eq!(seen, ["grouped_gemm_decode_bf16", "grouped_gemm_decode_dgrad_bf16"]);
}
