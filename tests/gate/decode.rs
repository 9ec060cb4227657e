//! The gate's decode kernels (`GatePath::Decode`, what `Auto` runs at T <= 64 for every form
//! but Full) against the reference and the tiled kernels: token counts around the 16-token
//! (linear) and 4-token (rank forms) blocks and the slice-count thresholds (8, 16, 32, 64),
//! expert counts off the 1, 2, 4 and 8 experts per block, d off the 16-byte chunk and spread
//! over several chunks per lane, ranks over one and two chunks of 4, every dtype, odd element
//! offsets (the element-by-element path), non-finite rows wherever the bad element sits,
//! bitwise determinism under every schedule, and what `Auto` picks.
use super::*;
use moe_kernels::ops::gate::{DECODE_MAX_TOKENS, GatePath};

/// z of `case` on `path`, from the host inputs `x`.
fn z_on_path<T: FloatElement>(device: &Device, case: &Case, host: &GateParams, x: &[f64], path: GatePath) -> Vec<f32> {
    let placed = upload_params::<T>(device, host, case.offset);
    let up: Vec<_> = placed.iter().map(|(n, p)| (*n, p.view())).collect();
    let w = weights(case.form, &up);
    let x_host: Vec<T> = x.iter().map(|&v| T::from_f32(v as f32)).collect();
    let x_dev = AtOffset::upload(device, &x_host, view_offset(case.offset, 5));
    let mut z = AtOffset::upload(
        device,
        &vec![f32::NAN; case.shape.z_len().unwrap()],
        view_offset(case.offset, 7),
    );
    let before = device.stats();
    gate::scores_on_path(device, &case.shape, &w, &x_dev.view(), &mut z.view_mut(), path)
        .unwrap_or_else(|e| panic!("{case:?} on {path:?}: {e}"));
    let after = device.stats();
    assert_eq!(
        after.launches - before.launches,
        u64::from(case.shape.tokens > 0),
        "{case:?}: launches"
    );
    assert_eq!(after.host_syncs, before.host_syncs, "{case:?}: host sync");
    z.download(device)
}

fn check_decode<T: FloatElement>(device: &Device, case: &Case) {
    let what = format!("{case:?} {} on {}", T::NAME, device.description());
    let (host, x, _) = inputs::<T>(case);
    let want = reference::scores(&case.shape, &host, &x);
    let tol = Tolerance::F32.over(case.shape.dim * case.terms()).scaled(4.0);
    for path in [GatePath::Decode, GatePath::Tiled] {
        let got = z_on_path::<T>(device, case, &host, &x, path);
        assert_close(&format!("{what}: z on {path:?}"), &got, &want, tol);
    }
}

#[test]
fn decode_matches_reference_and_tiles() {
    let shapes = [
        // (T, d, E): slices 8/4/2/1 at T <= 8/16/32/64, ragged last token block and expert block
        (1, 70, 3),
        (3, 300, 9),
        (8, 33, 17),
        (9, 5, 8),
        (16, 24, 5),
        (17, 1, 1),
        (33, 129, 11),
        (64, 16, 10),
        (65, 40, 7),
    ];
    for device in devices() {
        for (t, d, e) in shapes {
            for with_b in [true, false] {
                let case = Case {
                    with_b,
                    seed: (t * 131 + d) as u64,
                    ..Case::new(GateForm::Linear, t, d, e, 1)
                };
                check_decode::<f32>(&device, &case);
                check_decode::<f16>(&device, &case);
                check_decode::<bf16>(&device, &case);
            }
        }
    }
}

/// The rank forms: ranks within one chunk of 4 and over two, with and without B and c.
#[test]
fn rank_forms_decode_matches_reference_and_tiles() {
    let shapes = [
        (1, 70, 3, 4),
        (3, 300, 9, 6),
        (4, 33, 17, 1),
        (5, 24, 5, 3),
        (17, 40, 2, 8),
        (64, 16, 10, 2),
    ];
    for device in devices() {
        for form in [GateForm::LowRank, GateForm::Symmetric, GateForm::Attention] {
            for (i, (t, d, e, r)) in shapes.into_iter().enumerate() {
                let case = Case {
                    with_b: i % 2 == 0,
                    with_c: i % 3 != 0,
                    seed: (t * 131 + d + r) as u64,
                    ..Case::new(form, t, d, e, r)
                };
                match i % 3 {
                    0 => check_decode::<f32>(&device, &case),
                    1 => check_decode::<f16>(&device, &case),
                    _ => check_decode::<bf16>(&device, &case),
                }
            }
        }
    }
}

/// Views at odd element offsets take the element-by-element loads.
#[test]
fn decode_at_odd_offsets() {
    for device in devices() {
        for offset in [1, 3] {
            let case = Case {
                offset,
                ..Case::new(GateForm::Linear, 11, 77, 6, 1)
            };
            check_decode::<f32>(&device, &case);
            check_decode::<bf16>(&device, &case);
            let low_rank = Case {
                offset,
                ..Case::new(GateForm::LowRank, 5, 77, 6, 5)
            };
            check_decode::<f16>(&device, &low_rank);
        }
    }
}

/// A row with a NaN, an infinity or an element of at least 2^64 gets NaN for every logit,
/// whichever warp's slice of d holds the bad element (first chunk, a middle one, the ragged
/// last element); the other rows are those of the batch without the bad values.
#[test]
fn decode_nonfinite_rows_get_nan_logits() {
    for form in [GateForm::Linear, GateForm::Attention] {
        check_nonfinite_rows(form);
    }
}

fn check_nonfinite_rows(form: GateForm) {
    let (t, d, e) = (12, 100, 5);
    let case = Case::new(form, t, d, e, 3);
    let (host, x, _) = inputs::<f32>(&case);
    let want = reference::scores(&case.shape, &host, &x);
    let bad = [
        (1, 0, f64::NAN),
        (4, 50, f64::INFINITY),
        (7, 99, -1.9e19),
        (11, 63, f64::NEG_INFINITY),
    ];
    let mut x_bad = x.clone();
    for &(row, col, v) in &bad {
        x_bad[row * d + col] = v;
    }
    for device in devices() {
        let got = z_on_path::<f32>(&device, &case, &host, &x_bad, GatePath::Decode);
        for row in 0..t {
            let logits = &got[row * e..(row + 1) * e];
            if bad.iter().any(|b| b.0 == row) {
                assert!(logits.iter().all(|v| v.is_nan()), "{form:?} row {row}: {logits:?}");
            } else {
                let tol = Tolerance::F32.over(d * case.terms()).scaled(4.0);
                assert_close(
                    &format!("{form:?} row {row}"),
                    logits,
                    &want[row * e..(row + 1) * e],
                    tol,
                );
            }
        }
    }
}

/// Each logit sums its slices in one order: bitwise the same on a second run and under every
/// emulator schedule.
#[test]
fn decode_is_bitwise_reproducible() {
    let emulator = EmulatorDevice::new();
    let case = Case::new(GateForm::Linear, 13, 517, 20, 1);
    let (host, x, _) = inputs::<bf16>(&case);
    for device in devices() {
        let first = z_on_path::<bf16>(&device, &case, &host, &x, GatePath::Decode);
        let again = z_on_path::<bf16>(&device, &case, &host, &x, GatePath::Decode);
        assert_eq!(bits(&again), bits(&first), "{}", device.description());
    }
    let first = z_on_path::<bf16>(&Device::Emulator(emulator.clone()), &case, &host, &x, GatePath::Decode);
    for schedule in [Schedule::Reverse, Schedule::Random { seed: 9 }] {
        let device = Device::Emulator(emulator.with_schedule(schedule));
        let got = z_on_path::<bf16>(&device, &case, &host, &x, GatePath::Decode);
        assert_eq!(bits(&got), bits(&first), "{schedule:?}");
    }
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|v| v.to_bits()).collect()
}

/// `Auto` runs the decode kernel (linear and low-rank here) up to `DECODE_MAX_TOKENS` tokens
/// and the tiles above: its z is bitwise that of the path it should pick, and the two paths differ on
/// these inputs (so the comparison tells them apart).
#[test]
fn auto_picks_decode_up_to_64_tokens() {
    for device in devices() {
        for (t, form) in [DECODE_MAX_TOKENS, DECODE_MAX_TOKENS + 1]
            .into_iter()
            .flat_map(|t| [(t, GateForm::Linear), (t, GateForm::LowRank)])
        {
            let case = Case::new(form, t, 300, 4, 2);
            let (host, x, _) = inputs::<f32>(&case);
            let auto = bits(&z_on_path::<f32>(&device, &case, &host, &x, GatePath::Auto));
            let decode = bits(&z_on_path::<f32>(&device, &case, &host, &x, GatePath::Decode));
            let tiled = bits(&z_on_path::<f32>(&device, &case, &host, &x, GatePath::Tiled));
            assert_ne!(
                decode, tiled,
                "{form:?} T = {t}: the paths should differ in some last bit"
            );
            let expected = if t <= DECODE_MAX_TOKENS { decode } else { tiled };
            assert_eq!(auto, expected, "{form:?} T = {t} on {}", device.description());
        }
    }
}

/// The full form's rank is d: on `GatePath::Decode` it is an `Err` naming `path`, before any
/// launch.
#[test]
fn decode_refuses_the_full_form() {
    for device in devices() {
        let case = Case::new(GateForm::Full, 4, 8, 3, 1);
        let (host, x, _) = inputs::<f32>(&case);
        let placed = upload_params::<f32>(&device, &host, 0);
        let up: Vec<_> = placed.iter().map(|(n, p)| (*n, p.view())).collect();
        let w = weights(case.form, &up);
        let x_dev = device.upload(&x.iter().map(|&v| v as f32).collect::<Vec<_>>()).unwrap();
        let mut z = device.alloc_zeros::<f32>(case.shape.z_len().unwrap()).unwrap();
        assert_refused(&device, "path", || {
            gate::scores_on_path(&device, &case.shape, &w, &x_dev, &mut z, GatePath::Decode)
        });
    }
}

/// The memory profile (profiling build) of the one launch of `case`'s forward on X of type `T`
/// on `path`.
fn forward_profile<T: FloatElement>(case: &Case, path: GatePath) -> moe_kernels::device::profile::MemoryProfile {
    let emulator = EmulatorDevice::from_env().unwrap().profiling().unwrap();
    let device = Device::Emulator(emulator.clone());
    let (host, x, _) = inputs::<T>(case);
    z_on_path::<T>(&device, case, &host, &x, path);
    let [p] = <[_; 1]>::try_from(emulator.take_profiles()).unwrap();
    p
}

/// The same for the linear gate without bias, T = `t`, d = `d`, E = `e`.
fn linear_profile<T: FloatElement>(
    t: usize,
    d: usize,
    e: usize,
    path: GatePath,
) -> moe_kernels::device::profile::MemoryProfile {
    let case = Case {
        with_b: false,
        ..Case::new(GateForm::Linear, t, d, e, 1)
    };
    forward_profile::<T>(&case, path)
}

/// Memory behaviour on the profiling build: every global load of W and X is a whole 512-byte
/// warp request (16 sectors: d = 2048 bf16 is 8 groups of 32 chunks, one per slice at T = 4),
/// and the kernel reads W and X once each and writes z once (the bytes it cannot avoid).
#[test]
#[cfg_attr(
    not(moe_emu_profile),
    ignore = "needs the profiling build: MOE_EMU_PROFILE=1 (clang-19); CI runs it"
)]
fn decode_loads_whole_sectors_once() {
    use moe_kernels::device::profile::{Access, Space};
    let (t, d, e) = (4usize, 2048usize, 8usize);
    let p = linear_profile::<bf16>(t, d, e, GatePath::Decode);
    assert_eq!(p.kernel, "gate_decode_linear_bf16");
    assert_eq!(p.traffic(Space::Global, Access::Load).sectors_per_request(), 16.0);
    assert_eq!(p.unique_global_load_bytes, (2 * (e * d + t * d)) as u64, "W and X");
    assert_eq!(p.unique_global_store_bytes, (4 * t * e) as u64, "z");
}

/// The same on the tensor-core tile (`GatePath::Tiled`, the prefill path), whose 3-slot
/// cp.async ring wraps at d = 256 (8 k-tiles): every global load of X and W is a whole 16-sector
/// request (a warp copies 8 rows' 64-byte runs of a k-tile); X and W are read once each by
/// bytes (the 2 token tiles each read all of W, from L2 on a GPU); z is written once; and no
/// shared read (ldmatrix, the huge-input check of the landed X tile) has a bank conflict: degree
/// 4 at most, the floor of a warp's 16-byte reads (512 bytes over 32 banks).
#[test]
#[cfg_attr(
    not(moe_emu_profile),
    ignore = "needs the profiling build: MOE_EMU_PROFILE=1 (clang-19); CI runs it"
)]
fn tile_ring_loads_whole_sectors_once() {
    use moe_kernels::device::profile::{Access, Space};
    let (t, d, e) = (128usize, 256usize, 8usize);
    let p = linear_profile::<bf16>(t, d, e, GatePath::Tiled);
    assert_eq!(p.kernel, "gate_scores_linear_bf16");
    let loads = p.traffic(Space::Global, Access::Load);
    assert_eq!(loads.sectors_per_request(), 16.0, "{loads:?}");
    assert_eq!(
        loads.bytes,
        (2 * (2 * e * d + t * d)) as u64,
        "X once, W once per token tile"
    );
    assert_eq!(p.unique_global_load_bytes, (2 * (e * d + t * d)) as u64, "W and X");
    assert_eq!(p.unique_global_store_bytes, (4 * t * e) as u64, "z");
    let shared = p.traffic(Space::Shared, Access::Load);
    assert!(shared.requests > 0);
    assert!(shared.max_bank_degree <= 4, "{shared:?}");
}

/// The f32 linear gate's split-tf32 tile (`GatePath::Tiled`) at d = 48 (3 k-tiles: both staging
/// slots reused) over 2 token tiles: every global load of X and W is a whole 16-sector request (a
/// warp's 16-byte loads cover 8 rows' 64-byte runs of a k-tile); X and W are read once each by
/// bytes (each token tile reads all of W, from L2 on a GPU); z is written once; every shared
/// store (the interleaved k rows) and every fragment read hits 32 distinct banks.
#[test]
#[cfg_attr(
    not(moe_emu_profile),
    ignore = "needs the profiling build: MOE_EMU_PROFILE=1 (clang-19); CI runs it"
)]
fn split_tf32_tile_loads_whole_sectors_once() {
    use moe_kernels::device::profile::{Access, Space};
    let (t, d, e) = (128usize, 48usize, 8usize);
    let p = linear_profile::<f32>(t, d, e, GatePath::Tiled);
    assert_eq!(p.kernel, "gate_scores_linear_f32");
    let loads = p.traffic(Space::Global, Access::Load);
    assert_eq!(loads.sectors_per_request(), 16.0, "{loads:?}");
    assert_eq!(
        loads.bytes,
        (4 * (2 * e * d + t * d)) as u64,
        "X once, W once per token tile"
    );
    assert_eq!(p.unique_global_load_bytes, (4 * (e * d + t * d)) as u64, "W and X");
    assert_eq!(p.unique_global_store_bytes, (4 * t * e) as u64, "z");
    for access in [Access::Load, Access::Store] {
        let shared = p.traffic(Space::Shared, access);
        assert!(shared.requests > 0);
        assert_eq!(shared.max_bank_degree, 1, "{access:?}: {shared:?}");
    }
}

/// The f32 pair tile (split tf32, `gate_mma.cuh`) of the low-rank gate at rank 4 (one chunk),
/// without c (a bias read per element), at d = 64 (4 k-tiles: the 3-slot ring wraps) over 2
/// token tiles: every global load of X, U, V and B is a whole 16-sector request (a warp's
/// 16-byte copies cover 8 rows' 64-byte runs of a k-tile); X is read once, the weights once per
/// token tile; z is written once; no shared read passes degree 4 (the floor of the huge-input
/// check's 16-byte reads; the fragment reads of B are 2-way at most).
#[test]
#[cfg_attr(
    not(moe_emu_profile),
    ignore = "needs the profiling build: MOE_EMU_PROFILE=1 (clang-19); CI runs it"
)]
fn f32_pair_tile_loads_whole_sectors_once() {
    use moe_kernels::device::profile::{Access, Space};
    let (t, d, e, r) = (128usize, 64usize, 8usize, 4usize);
    let case = Case {
        with_c: false,
        ..Case::new(GateForm::LowRank, t, d, e, r)
    };
    assert!(case.with_b);
    let p = forward_profile::<f32>(&case, GatePath::Tiled);
    assert_eq!(p.kernel, "gate_scores_lowrank_f32");
    let weights = (2 * e * r + e) * d;
    let loads = p.traffic(Space::Global, Access::Load);
    assert_eq!(loads.sectors_per_request(), 16.0, "{loads:?}");
    assert_eq!(
        loads.bytes,
        (4 * (2 * weights + t * d)) as u64,
        "X once, the weights once per token tile"
    );
    assert_eq!(
        p.unique_global_load_bytes,
        (4 * (weights + t * d)) as u64,
        "the weights and X"
    );
    assert_eq!(p.unique_global_store_bytes, (4 * t * e) as u64, "z");
    let shared = p.traffic(Space::Shared, Access::Load);
    assert!(shared.requests > 0);
    assert!(shared.max_bank_degree <= 4, "{shared:?}");
}
