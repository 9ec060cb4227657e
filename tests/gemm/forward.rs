//! The forward on every device against the reference: every epilogue, both paths, both A modes.
use super::common::{Rng, assert_close, devices};
use super::{DeviceGroups, Problem, to_f32, tolerance, values};
use half::{bf16, f16};
use moe_kernels::Device;
use moe_kernels::device::EmulatorDevice;
use moe_kernels::device::profile::{Access, MemoryProfile, Space};
use moe_kernels::ops::FloatElement;
use moe_kernels::ops::gemm::{self, ARows, Epilogue, ForwardConfig, GemmPath, forward_out_len};
use moe_kernels::reference::gemm as reference;
use proptest::prelude::*;

#[derive(Debug, Clone, Copy)]
pub struct Case {
    pub a_rows: ARows,
    pub epilogue: Epilogue,
    pub path: GemmPath,
    pub weights: bool,
    pub save_gu: bool,
}

impl Case {
    pub fn plain(path: GemmPath) -> Case {
        Case {
            a_rows: ARows::Contiguous,
            epilogue: Epilogue::Store,
            path,
            weights: false,
            save_gu: false,
        }
    }
}

/// The forward's output (and GU) on `device`, as f32, after checking it took one launch and
/// no host sync; the inputs come from `seed`.
pub fn run<T: FloatElement, O: FloatElement>(
    device: &Device,
    p: &Problem,
    case: Case,
    seed: u64,
) -> (Vec<f32>, Vec<f32>) {
    try_run::<T, O>(device, p, case, seed).unwrap()
}

/// Whether `GemmPath::Hopper` takes T on `device` (f16/bf16 where sm_90a code runs).
pub fn hopper_takes<T: FloatElement>(device: &Device) -> bool {
    T::NAME != "f32" && device.runs_sm90a()
}

/// [`run`], or the forward's `Err`.
pub fn try_run<T: FloatElement, O: FloatElement>(
    device: &Device,
    p: &Problem,
    case: Case,
    seed: u64,
) -> moe_kernels::Result<(Vec<f32>, Vec<f32>)> {
    let mut rng = Rng::new(seed);
    let (n, k) = (p.shape.n, p.shape.k);
    let (a, _) = values::<T>(&mut rng, p.a_rows(case.a_rows) * k, 0.5);
    let (b, _) = values::<T>(&mut rng, p.shape.experts * n * k, 0.5);
    let w: Vec<f32> = (0..p.tokens * p.top_k).map(|_| rng.uniform(0.1, 1.0)).collect();
    let groups = DeviceGroups::new(device, p);
    let (a_d, b_d, w_d) = (
        device.upload(&a).unwrap(),
        device.upload(&b).unwrap(),
        device.upload(&w).unwrap(),
    );
    let mut out = device
        .alloc_zeros::<O>(forward_out_len(&p.shape, p.rows(), case.epilogue).unwrap())
        .unwrap();
    let mut gu = device.alloc_zeros::<T>(p.rows() * n).unwrap();
    let config = ForwardConfig {
        a_rows: case.a_rows,
        epilogue: case.epilogue,
        path: case.path,
    };
    let before = device.stats();
    gemm::forward(
        device,
        &a_d,
        &b_d,
        p.shape,
        &groups.groups(p),
        &config,
        case.weights.then_some(&w_d),
        &mut out,
        case.save_gu.then_some(&mut gu),
    )?;
    let after = device.stats();
    assert_eq!(after.host_syncs, before.host_syncs, "forward synced the host");
    assert_eq!(
        after.launches - before.launches,
        u64::from(p.rows() > 0),
        "forward launches"
    );
    Ok((
        to_f32(&device.download(&out).unwrap()),
        to_f32(&device.download(&gu).unwrap()),
    ))
}

/// Runs `case` on `device` and compares with the reference; where the Hopper path cannot take
/// T on `device`, checks that it refuses, naming the dtype's operand or the device.
#[track_caller]
pub fn check<T: FloatElement, O: FloatElement>(device: &Device, p: &Problem, case: Case, seed: u64) {
    if case.path == GemmPath::Hopper && !hopper_takes::<T>(device) {
        let refusal = try_run::<T, O>(device, p, case, seed).expect_err("the Hopper path took what it cannot");
        let named = if device.runs_sm90a() { "`a`" } else { "`device`" };
        assert!(refusal.to_string().contains(named), "{refusal}");
        return;
    }
    let (got, got_gu) = run::<T, O>(device, p, case, seed);
    let mut rng = Rng::new(seed);
    let (n, k) = (p.shape.n, p.shape.k);
    let (_, a) = values::<T>(&mut rng, p.a_rows(case.a_rows) * k, 0.5);
    let (_, b) = values::<T>(&mut rng, p.shape.experts * n * k, 0.5);
    let w: Vec<f32> = (0..p.tokens * p.top_k).map(|_| rng.uniform(0.1, 1.0)).collect();
    let weights = case.weights.then_some(&w[..]);
    let (want, want_gu) = reference::forward(&a, case.a_rows, &b, p.shape, &p.host(), case.epilogue, weights);
    let what = format!(
        "{} {}->{} {case:?} {:?}",
        device.description(),
        T::NAME,
        O::NAME,
        p.shape
    );
    assert!(
        p.rows() == 0 || want.iter().any(|&v| v != 0.0),
        "{what}: a vacuous case"
    );
    assert_close(&what, &got, &want, tolerance::<O>(k));
    if case.save_gu {
        assert_close(&format!("{what} gu"), &got_gu, &want_gu, tolerance::<T>(k));
    }
}

const PATHS: [GemmPath; 3] = [GemmPath::Tiled, GemmPath::Decode, GemmPath::Hopper];

#[test]
fn group_sizes_0_1_7_16_129_on_every_path() {
    let p = Problem::sized(&[0, 1, 7, 16, 129, 0, 3], 24, 40, &mut Rng::new(1));
    for device in devices() {
        for path in PATHS {
            check::<f32, f32>(&device, &p, Case::plain(path), 11);
            check::<f16, f16>(&device, &p, Case::plain(path), 12);
            check::<bf16, bf16>(&device, &p, Case::plain(path), 13);
        }
    }
}

#[test]
fn gathered_swiglu_with_weights_and_saved_gate_up() {
    // 40 tokens, top-2 of 6 experts, groups padded to 8 with -1 rows; W1 [6, 2h = 40, 32]:
    // h = 20 ends inside a 16-byte segment of a 16-bit output row (the staged epilogue's last
    // segment of each row goes element by element).
    let p = Problem::routed(40, 2, 6, 8, 40, 32, &mut Rng::new(2));
    let case = |path| Case {
        a_rows: p.gathered(),
        epilogue: Epilogue::SwiGlu,
        path,
        weights: true,
        save_gu: true,
    };
    for device in devices() {
        for path in PATHS {
            check::<f32, f32>(&device, &p, case(path), 21);
            check::<f16, f16>(&device, &p, case(path), 22);
            check::<bf16, bf16>(&device, &p, case(path), 23);
            check::<bf16, f32>(&device, &p, case(path), 24);
        }
    }
}

#[test]
fn gathered_store_with_padding_rows_and_f32_output() {
    let p = Problem::routed(50, 3, 5, 16, 40, 24, &mut Rng::new(3));
    for device in devices() {
        for path in PATHS {
            for weights in [false, true] {
                let case = Case {
                    a_rows: p.gathered(),
                    weights,
                    ..Case::plain(path)
                };
                check::<f16, f32>(&device, &p, case, 31);
                check::<bf16, bf16>(&device, &p, case, 32);
                check::<f32, f32>(&device, &p, case, 33);
            }
        }
    }
}

#[test]
fn long_reduction_k_1024() {
    let p = Problem::sized(&[5, 20], 16, 1024, &mut Rng::new(4));
    for device in devices() {
        for path in PATHS {
            check::<f32, f32>(&device, &p, Case::plain(path), 41);
            check::<f16, f32>(&device, &p, Case::plain(path), 42);
            check::<bf16, bf16>(&device, &p, Case::plain(path), 43);
        }
    }
}

#[test]
fn f32_takes_any_shape() {
    let p = Problem::sized(&[3, 0, 70], 14, 37, &mut Rng::new(5));
    for device in devices() {
        for path in PATHS {
            check::<f32, f32>(&device, &p, Case::plain(path), 51);
            let swiglu = Case {
                epilogue: Epilogue::SwiGlu,
                save_gu: true,
                weights: true,
                ..Case::plain(path)
            };
            check::<f32, f32>(&device, &p, swiglu, 52);
        }
    }
}

#[test]
fn auto_picks_decode_for_small_groups_and_tiles_for_large() {
    // Same results whichever path Auto picks; the bound decides (32 rows), not the data.
    let small = Problem::routed(12, 2, 4, 1, 16, 16, &mut Rng::new(6));
    let large = Problem::sized(&[40, 2], 16, 16, &mut Rng::new(7));
    for device in devices() {
        check::<bf16, bf16>(&device, &small, Case::plain(GemmPath::Auto), 61);
        let launched = device.launch_configs();
        assert!(
            launched.contains_key("grouped_gemm_decode_bf16"),
            "Auto took the tiles for groups of at most 12 rows"
        );
        assert!(!launched.contains_key("grouped_gemm_fwd_bf16"));
        check::<bf16, bf16>(&device, &large, Case::plain(GemmPath::Auto), 62);
        assert!(
            device.launch_configs().contains_key("grouped_gemm_fwd_bf16"),
            "Auto decoded 40-row groups"
        );
    }
}

#[test]
fn forward_is_bitwise_deterministic() {
    let p = Problem::routed(48, 2, 4, 8, 32, 64, &mut Rng::new(8));
    for device in devices() {
        for path in PATHS {
            let case = Case {
                a_rows: p.gathered(),
                epilogue: Epilogue::SwiGlu,
                path,
                weights: true,
                save_gu: true,
            };
            let first = run::<bf16, f32>(&device, &p, case, 81);
            let second = run::<bf16, f32>(&device, &p, case, 81);
            assert!(first == second, "{path:?}: two runs differ");
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 6, ..ProptestConfig::default() })]
    #[test]
    fn forward_sweep(
        sizes in proptest::collection::vec(prop_oneof![Just(0usize), 1usize..20, 120usize..140], 1..5),
        n8 in 1usize..5, k8 in 1usize..7, dtype in 0usize..3, swiglu in any::<bool>(), path in 0usize..3,
        seed in any::<u64>(),
    ) {
        let p = Problem::sized(&sizes, 16 * n8, 8 * k8, &mut Rng::new(seed));
        let case = Case {
            a_rows: if seed % 2 == 0 { p.gathered() } else { ARows::Contiguous },
            epilogue: if swiglu { Epilogue::SwiGlu } else { Epilogue::Store },
            weights: seed % 3 == 0,
            save_gu: swiglu,
            ..Case::plain(PATHS[path])
        };
        for device in devices() {
            match dtype {
                0 => check::<f32, f32>(&device, &p, case, seed),
                1 => check::<f16, f16>(&device, &p, case, seed),
                _ => check::<bf16, bf16>(&device, &p, case, seed),
            }
        }
    }
}

#[test]
fn several_row_column_and_k_tiles() {
    // 3 column tiles of the plain store (N = 272 > 2 x 128), 3 of SwiGLU (h = 144 > 2 x 64),
    // groups of 2 and 3 row tiles, 5 k-tiles (more than the 3 pipeline stages).
    let p = Problem::sized(&[130, 0, 300], 272, 160, &mut Rng::new(9));
    let swiglu = Problem::sized(&[200, 5], 288, 40, &mut Rng::new(10));
    for device in devices() {
        check::<bf16, bf16>(&device, &p, Case::plain(GemmPath::Tiled), 91);
        check::<f32, f32>(&device, &p, Case::plain(GemmPath::Tiled), 92);
        let case = Case {
            epilogue: Epilogue::SwiGlu,
            save_gu: true,
            ..Case::plain(GemmPath::Tiled)
        };
        check::<f16, f16>(&device, &swiglu, case, 93);
        check::<f32, f32>(&device, &swiglu, case, 94);
    }
}

#[test]
fn hopper_tiles_in_every_dimension() {
    // The sm_90a kernel's tiles are 128 rows x 256 columns (SwiGLU: 128 output columns) x 64
    // of K through a 4-stage ring: 3 column tiles of the store (N = 520), 2 of SwiGLU
    // (h = 136), groups of 1, 2 and 3 row tiles, 6 k-blocks (the ring wraps), a ragged K; the
    // emulator's 3 CTAs walk several tiles each.
    let p = Problem::sized(&[130, 0, 300, 1], 520, 328, &mut Rng::new(95));
    let swiglu = Problem::routed(60, 2, 3, 8, 272, 72, &mut Rng::new(96));
    for device in devices().into_iter().filter(hopper_takes::<bf16>) {
        check::<bf16, bf16>(&device, &p, Case::plain(GemmPath::Hopper), 97);
        let launched = device.launch_configs();
        let sm90 = launched
            .get("grouped_gemm_fwd_sm90_bf16")
            .expect("GemmPath::Hopper ran the sm90 kernel");
        assert_eq!(
            sm90.grid.0,
            device.multiprocessors().min(24),
            "one CTA per SM (24 tiles at most)"
        );
        let case = Case {
            a_rows: swiglu.gathered(),
            epilogue: Epilogue::SwiGlu,
            weights: true,
            save_gu: true,
            path: GemmPath::Hopper,
        };
        check::<f16, f32>(&device, &swiglu, case, 98);
        check::<bf16, bf16>(&device, &swiglu, case, 99);
    }
}

/// The profile of an sm_90a launch whose epilogue went through the warps' staging tiles
/// (epilogue_stage.cuh), on shapes whose rows come in 16s and columns in 64s (no partial
/// segment): every global store fills whole 32-byte sectors, and the tile's fragment writes
/// (8 bytes a lane) and row reads (16 bytes a lane) have the least bank-conflict degree the
/// emulator's model allows (2 and 4: the distinct words per bank over the warp's request).
pub fn assert_staged_epilogue(profile: &MemoryProfile) {
    let stores = profile.traffic(Space::Global, Access::Store);
    assert!(stores.requests > 0, "{}: no global stores", profile.kernel);
    assert_eq!(
        stores.sectors * 32,
        stores.bytes,
        "{}: whole sectors: {stores:?}",
        profile.kernel
    );
    let (mut fragment_writes, mut row_reads) = (0, 0);
    for site in profile.sites.iter().filter(|s| s.space == Space::Shared) {
        let t = &site.traffic;
        match (site.access, t.bytes / t.lane_accesses.max(1)) {
            (Access::Store, 8) => {
                assert_eq!(
                    t.bank_degree_sum,
                    2 * t.requests,
                    "{}: fragment writes: {t:?}",
                    profile.kernel
                );
                fragment_writes += t.requests;
            }
            (Access::Load, 16) => {
                assert_eq!(
                    t.bank_degree_sum,
                    4 * t.requests,
                    "{}: row reads: {t:?}",
                    profile.kernel
                );
                row_reads += t.requests;
            }
            _ => {}
        }
    }
    assert!(
        fragment_writes > 0 && row_reads > 0,
        "{}: no staging tile",
        profile.kernel
    );
}

/// In the profiling build: the sm_90a forward's staged epilogue (`assert_staged_epilogue`) for
/// the plain store (bf16 and f32 outputs) and SwiGLU with row weights and GU saved (its three
/// outputs).
#[test]
#[cfg_attr(
    not(moe_emu_profile),
    ignore = "needs the profiling build: MOE_EMU_PROFILE=1 (clang-19); CI runs it"
)]
fn hopper_epilogue_stores_whole_sectors_without_bank_conflicts() {
    let emulator = EmulatorDevice::from_env().unwrap().profiling().unwrap();
    let device = Device::Emulator(emulator.clone());
    let p = Problem::sized(&[32, 0, 16], 256, 64, &mut Rng::new(231));
    run::<bf16, bf16>(&device, &p, Case::plain(GemmPath::Hopper), 232);
    run::<bf16, f32>(&device, &p, Case::plain(GemmPath::Hopper), 233);
    let swiglu = Case {
        epilogue: Epilogue::SwiGlu,
        weights: true,
        save_gu: true,
        ..Case::plain(GemmPath::Hopper)
    };
    run::<bf16, bf16>(&device, &p, swiglu, 234);
    let profiles = emulator.take_profiles();
    let kernels: Vec<&str> = profiles.iter().map(|p| p.kernel.as_str()).collect();
    assert_eq!(kernels, ["grouped_gemm_fwd_sm90_bf16"; 3]);
    profiles.iter().for_each(assert_staged_epilogue);
}
