//! dA (plain, row weights, the fused SwiGLU backward) and dB (expert mask, accumulate mode,
//! gathered A) on every device against the reference, plus finite differences of a whole
//! SwiGLU expert layer in f32.
use super::common::{Rng, assert_close, devices};
use super::forward::{assert_staged_epilogue, hopper_takes};
use super::unaligned::{ALIGNED_INPUTS_ODD_OUTPUTS, Offsets, dgrad_at};
use super::{DeviceGroups, Problem, tolerance, values};
use half::{bf16, f16};
use moe_kernels::Device;
use moe_kernels::device::EmulatorDevice;
use moe_kernels::ops::FloatElement;
use moe_kernels::ops::gemm::{
    self, ARows, DgradConfig, DgradEpilogue, Epilogue, ExpertMask, ForwardConfig, GemmPath, GemmShape, WgradWrite,
};
use moe_kernels::reference::gemm as reference;

/// dgrad on `device` vs the reference, on the buffers themselves (see `unaligned::dgrad_at`),
/// on the path `Auto` picks and on the sm_90a kernel (which must refuse f32, naming `dc`).
fn check_dgrad<T: FloatElement, O: FloatElement>(
    device: &Device,
    p: &Problem,
    epilogue: DgradEpilogue,
    weights: bool,
    seed: u64,
) {
    dgrad_at::<T, O>(device, p, epilogue, weights, Offsets::default(), seed).unwrap();
    if !device.runs_sm90a() {
        return;
    }
    let hopper = DgradConfig {
        epilogue,
        path: GemmPath::Hopper,
    };
    let result = dgrad_at::<T, O>(device, p, hopper, weights, Offsets::default(), seed);
    if hopper_takes::<T>(device) {
        result.unwrap();
    } else {
        let refusal = result.expect_err("the Hopper dgrad took f32");
        assert!(refusal.to_string().contains("`dc`"), "{refusal}");
    }
}

#[test]
fn hopper_dgrad_tiles_in_every_dimension() {
    // 128 x 256 tiles over K = 520 (3 column tiles), a reduction N = 200 of 4 ragged k-blocks,
    // groups of 1, 2 and 3 row tiles; the SwiGLU backward (h = 136) with row weights, with
    // outputs at odd element offsets (the epilogue's one-at-a-time stores) and without.
    let p = Problem::sized(&[130, 0, 300, 1], 200, 520, &mut Rng::new(118));
    let swiglu = Problem::routed(60, 2, 3, 8, 72, 136, &mut Rng::new(119));
    for device in devices().into_iter().filter(hopper_takes::<bf16>) {
        let config = |epilogue| DgradConfig {
            epilogue,
            path: GemmPath::Hopper,
        };
        dgrad_at::<bf16, bf16>(&device, &p, config(DgradEpilogue::Store), true, Offsets::default(), 120).unwrap();
        let sm90 = device.launch_configs()["grouped_gemm_dgrad_sm90_bf16"];
        assert_eq!(
            sm90.grid.0,
            device.multiprocessors().min(24),
            "one CTA per SM (24 tiles at most)"
        );
        let swiglu_bwd = config(DgradEpilogue::SwiGluBackward);
        dgrad_at::<f16, f32>(&device, &swiglu, swiglu_bwd, true, ALIGNED_INPUTS_ODD_OUTPUTS, 121).unwrap();
        dgrad_at::<bf16, bf16>(&device, &swiglu, swiglu_bwd, false, Offsets::default(), 122).unwrap();
        // Whole row segments: 16-byte dGU stores, and 8-byte reads of a 16-bit GU for f32 dGU.
        dgrad_at::<f16, f32>(&device, &swiglu, swiglu_bwd, true, Offsets::default(), 123).unwrap();
    }
}

#[test]
fn dgrad_plain_and_weighted_over_group_sizes() {
    let p = Problem::sized(&[0, 1, 7, 16, 129], 40, 24, &mut Rng::new(101));
    for device in devices() {
        for weights in [false, true] {
            check_dgrad::<f32, f32>(&device, &p, DgradEpilogue::Store, weights, 102);
            check_dgrad::<f16, f16>(&device, &p, DgradEpilogue::Store, weights, 103);
            check_dgrad::<bf16, f32>(&device, &p, DgradEpilogue::Store, weights, 104);
        }
    }
}

#[test]
fn dgrad_fused_swiglu_backward() {
    // GEMM2's dA: dY [rows, d = 32] x W2 [E, d, h = 24] -> dGU [rows, 48]; padding rows.
    let p = Problem::routed(30, 2, 5, 8, 32, 24, &mut Rng::new(111));
    for device in devices() {
        check_dgrad::<f32, f32>(&device, &p, DgradEpilogue::SwiGluBackward, true, 112);
        check_dgrad::<bf16, bf16>(&device, &p, DgradEpilogue::SwiGluBackward, false, 113);
        check_dgrad::<f16, f32>(&device, &p, DgradEpilogue::SwiGluBackward, true, 114);
    }
    let odd = Problem::sized(&[9, 0, 3], 13, 11, &mut Rng::new(115));
    for device in devices() {
        check_dgrad::<f32, f32>(&device, &odd, DgradEpilogue::SwiGluBackward, false, 116);
        check_dgrad::<f32, f32>(&device, &odd, DgradEpilogue::Store, true, 117);
    }
}

/// The wgrad kernels `device` runs for `T`: the row tiles, and the sm_90a kernel where it can.
fn wgrad_paths<T: FloatElement>(device: &Device) -> Vec<GemmPath> {
    let mut paths = vec![GemmPath::Auto];
    if hopper_takes::<T>(device) {
        paths.push(GemmPath::Hopper);
    }
    paths
}

/// wgrad on `device` vs the reference on every path, from a random initial `db`; masked
/// experts must keep their initial bits.
fn check_wgrad<T: FloatElement>(
    device: &Device,
    p: &Problem,
    a_rows: ARows,
    mask: Option<&[bool]>,
    accumulate: bool,
    seed: u64,
) {
    for path in wgrad_paths::<T>(device) {
        check_wgrad_on::<T>(device, p, a_rows, mask, accumulate, seed, path);
    }
}

fn check_wgrad_on<T: FloatElement>(
    device: &Device,
    p: &Problem,
    a_rows: ARows,
    mask: Option<&[bool]>,
    accumulate: bool,
    seed: u64,
    path: GemmPath,
) {
    let mut rng = Rng::new(seed);
    let GemmShape { experts, n, k } = p.shape;
    let (dc, dc32) = values::<T>(&mut rng, p.rows() * n, 0.5);
    let (a, a32) = values::<T>(&mut rng, p.a_rows(a_rows) * k, 0.5);
    let initial = rng.normals(experts * n * k, 1.0);
    let groups = DeviceGroups::new(device, p);
    let (dc_d, a_d) = (device.upload(&dc).unwrap(), device.upload(&a).unwrap());
    let mut db = device.upload(&initial).unwrap();
    let mask_d = mask.map(|m| ExpertMask::new(device, m).unwrap());
    let before = device.stats();
    gemm::wgrad_on_path(
        device,
        &dc_d,
        &a_d,
        a_rows,
        p.shape,
        &groups.groups(p),
        mask_d.as_ref(),
        WgradWrite::dense(accumulate),
        &mut db,
        path,
    )
    .unwrap();
    let after = device.stats();
    assert_eq!(after.host_syncs, before.host_syncs, "wgrad synced the host");
    let active = mask.map_or(experts, |m| m.iter().filter(|&&s| s).count());
    assert_eq!(
        after.launches - before.launches,
        u64::from(active > 0),
        "wgrad launches"
    );
    if path == GemmPath::Hopper && active > 0 {
        let kernel = format!("grouped_gemm_wgrad_sm90_{}", T::NAME);
        assert!(device.launch_configs().contains_key(&kernel), "{kernel} did not run");
    }
    let got = device.download(&db).unwrap();
    let want = reference::wgrad(&dc32, &a32, a_rows, p.shape, &p.host(), mask, accumulate, &initial);
    let what = format!(
        "{} wgrad {} {a_rows:?} mask {mask:?} accumulate {accumulate} on {path:?}",
        device.description(),
        T::NAME
    );
    let rows = p.max_group_rows.max(1);
    assert_close(&what, &got, &want, tolerance::<f32>(rows).scaled(4.0));
    if let Some(mask) = mask {
        for e in (0..experts).filter(|&e| !mask[e]) {
            let range = e * n * k..(e + 1) * n * k;
            let same = got[range.clone()]
                .iter()
                .zip(&initial[range])
                .all(|(g, i)| g.to_bits() == i.to_bits());
            assert!(same, "{what}: masked expert {e} was touched");
        }
    }
}

#[test]
fn wgrad_mask_and_accumulate_with_gathered_a() {
    let p = Problem::routed(40, 2, 6, 8, 24, 40, &mut Rng::new(121));
    let mask = [true, false, true, true, false, true];
    for device in devices() {
        for accumulate in [false, true] {
            for m in [None, Some(&mask[..])] {
                check_wgrad::<bf16>(&device, &p, p.gathered(), m, accumulate, 122);
                check_wgrad::<f32>(&device, &p, p.gathered(), m, accumulate, 123);
            }
            check_wgrad::<f16>(&device, &p, ARows::Contiguous, Some(&mask), accumulate, 124);
        }
        // An empty mask launches nothing and leaves every gradient as it was.
        check_wgrad::<bf16>(&device, &p, p.gathered(), Some(&[false; 6]), false, 125);
    }
}

/// A padding row (-1 in sorted_rows) is absent from A, so it is absent from dC too: NaN in dC
/// there must not reach dB (0 * NaN would), on every path; the gradient is the reference's over
/// the real rows.
#[test]
fn wgrad_ignores_dc_of_padding_rows() {
    let p = Problem::routed(30, 2, 3, 8, 16, 24, &mut Rng::new(181));
    assert!(p.sorted_rows.contains(&-1), "the problem should have padding rows");
    for device in devices() {
        for path in wgrad_paths::<bf16>(&device) {
            let mut rng = Rng::new(182);
            let GemmShape { experts, n, k } = p.shape;
            let (mut dc, mut dc32) = values::<bf16>(&mut rng, p.rows() * n, 0.5);
            for r in (0..p.rows()).filter(|&r| p.sorted_rows[r] < 0) {
                dc[r * n..(r + 1) * n].fill(bf16::NAN);
                dc32[r * n..(r + 1) * n].fill(0.0);
            }
            let (x, x32) = values::<bf16>(&mut rng, p.tokens * k, 0.5);
            let groups = DeviceGroups::new(&device, &p);
            let (dc_d, x_d) = (device.upload(&dc).unwrap(), device.upload(&x).unwrap());
            let mut db = device.alloc_zeros::<f32>(experts * n * k).unwrap();
            gemm::wgrad_on_path(
                &device,
                &dc_d,
                &x_d,
                p.gathered(),
                p.shape,
                &groups.groups(&p),
                None::<&ExpertMask>,
                WgradWrite::Replace,
                &mut db,
                path,
            )
            .unwrap();
            let got = device.download(&db).unwrap();
            let zeros = vec![0.0f32; experts * n * k];
            let want = reference::wgrad(&dc32, &x32, p.gathered(), p.shape, &p.host(), None, false, &zeros);
            let what = format!(
                "{} wgrad on {path:?} with NaN in padding rows of dC",
                device.description()
            );
            assert!(got.iter().all(|v| v.is_finite()), "{what}: NaN reached dB");
            assert_close(&what, &got, &want, tolerance::<f32>(p.max_group_rows).scaled(4.0));
        }
    }
}

/// A mask list built on the device may hold ids outside [0, E): those entries are skipped on
/// every path, and only the valid expert's gradient changes (the others keep their bits).
#[test]
fn wgrad_skips_mask_entries_outside_the_experts() {
    let p = Problem::sized(&[5, 9, 3], 16, 24, &mut Rng::new(191));
    let GemmShape { experts, n, k } = p.shape;
    for device in devices() {
        for path in wgrad_paths::<bf16>(&device) {
            let mut rng = Rng::new(192);
            let (dc, dc32) = values::<bf16>(&mut rng, p.rows() * n, 0.5);
            let (a, a32) = values::<bf16>(&mut rng, p.rows() * k, 0.5);
            let initial = rng.normals(experts * n * k, 1.0);
            let groups = DeviceGroups::new(&device, &p);
            let (dc_d, a_d) = (device.upload(&dc).unwrap(), device.upload(&a).unwrap());
            let mut db = device.upload(&initial).unwrap();
            let mask = ExpertMask {
                active: device.upload(&[experts as i32 + 3, 1, -2]).unwrap(),
                active_count: 3,
                experts,
            };
            gemm::wgrad_on_path(
                &device,
                &dc_d,
                &a_d,
                ARows::Contiguous,
                p.shape,
                &groups.groups(&p),
                Some(&mask),
                WgradWrite::Replace,
                &mut db,
                path,
            )
            .unwrap();
            let got = device.download(&db).unwrap();
            let selected = [false, true, false];
            let want = reference::wgrad(
                &dc32,
                &a32,
                ARows::Contiguous,
                p.shape,
                &p.host(),
                Some(&selected),
                false,
                &initial,
            );
            let what = format!(
                "{} wgrad on {path:?} with ids outside the experts",
                device.description()
            );
            assert_close(&what, &got, &want, tolerance::<f32>(9).scaled(4.0));
            for e in [0, 2] {
                let range = e * n * k..(e + 1) * n * k;
                let kept = got[range.clone()]
                    .iter()
                    .zip(&initial[range])
                    .all(|(g, i)| g.to_bits() == i.to_bits());
                assert!(kept, "{what}: expert {e} was touched");
            }
        }
    }
}

/// Sparse wgrad as a layer pass uses it, into a random initial dB: call 0 twice (dW1 and dW2 of
/// one iteration share the flags and the groups) over p0's groups, then call 1 over p1's (other
/// group sizes). An expert without rows in a call is neither computed nor written (its initial
/// bits survive while no call had rows for it), an expert first reached by call 1 is replaced
/// there (not added to the stale value), one reached by both is their sum; the flags say which
/// were written. Then zero_unwritten gives the dense gradient.
fn check_sparse_wgrad<T: FloatElement>(device: &Device, mask: Option<&[bool]>, seed: u64) {
    for path in wgrad_paths::<T>(device) {
        check_sparse_wgrad_on::<T>(device, mask, seed, path);
    }
}

fn check_sparse_wgrad_on<T: FloatElement>(device: &Device, mask: Option<&[bool]>, seed: u64, path: GemmPath) {
    let mut rng = Rng::new(seed);
    let calls = [
        Problem::sized(&[5, 0, 3, 0, 9], 16, 24, &mut rng),
        Problem::sized(&[0, 0, 4, 2, 1], 16, 24, &mut rng),
    ];
    let GemmShape { experts, n, k } = calls[0].shape;
    let initial = rng.normals(experts * n * k, 1.0);
    let mut dbs = [device.upload(&initial).unwrap(), device.upload(&initial).unwrap()];
    let mut written = device.alloc_zeros::<u32>(experts).unwrap();
    let mask_d = mask.map(|m| ExpertMask::new(device, m).unwrap());
    let mut want: Vec<f64> = initial.iter().map(|&v| v as f64).collect();
    let mut want_written = vec![false; experts];
    let what = format!(
        "{} sparse wgrad {} mask {mask:?} on {path:?}",
        device.description(),
        T::NAME
    );
    let mut states = vec![]; // (dB, written) after each call, the latest first
    for (call, p) in calls.iter().enumerate() {
        let (dc, dc32) = values::<T>(&mut rng, p.rows() * n, 0.5);
        let (a, a32) = values::<T>(&mut rng, p.rows() * k, 0.5);
        let groups = DeviceGroups::new(device, p);
        let (dc_d, a_d) = (device.upload(&dc).unwrap(), device.upload(&a).unwrap());
        // Call 0 writes both buffers (as dW1 and dW2 share a call); call 1 the first only.
        for db in dbs.iter_mut().take(2 - call) {
            let write = WgradWrite::Sparse {
                written: &mut written,
                call: call as u32,
            };
            let g = groups.groups(p);
            gemm::wgrad_on_path(
                device,
                &dc_d,
                &a_d,
                ARows::Contiguous,
                p.shape,
                &g,
                mask_d.as_ref(),
                write,
                db,
                path,
            )
            .unwrap();
        }
        let host = p.host();
        reference::wgrad_sparse(
            &dc32,
            &a32,
            ARows::Contiguous,
            p.shape,
            &host,
            mask,
            &mut want_written,
            &mut want,
        );
        let flags: Vec<bool> = device.download(&written).unwrap().iter().map(|&f| f != 0).collect();
        assert_eq!(flags, want_written, "{what}: written after call {call}");
        states.insert(0, (want.clone(), want_written.clone()));
    }
    // dbs[0] saw both calls, dbs[1] call 0 only.
    let tol = tolerance::<f32>(9).scaled(4.0);
    let slice = |e: usize| e * n * k..(e + 1) * n * k;
    for ((db, (want, want_written)), i) in dbs.iter().zip(&states).zip(0..) {
        let got = device.download(db).unwrap();
        for e in 0..experts {
            let what = format!("{what}: buffer {i} expert {e}");
            if want_written[e] {
                assert_close(&what, &got[slice(e)], &want[slice(e)], tol);
            } else {
                let kept = got[slice(e)]
                    .iter()
                    .zip(&initial[slice(e)])
                    .all(|(g, i)| g.to_bits() == i.to_bits());
                assert!(kept, "{what}: not written, yet changed");
            }
        }
    }
    let (want, want_written) = &states[0];
    gemm::zero_unwritten(device, &written, &mut dbs[0]).unwrap();
    let dense = device.download(&dbs[0]).unwrap();
    for e in 0..experts {
        if want_written[e] {
            assert_close(
                &format!("{what}: dense expert {e}"),
                &dense[slice(e)],
                &want[slice(e)],
                tol,
            );
        } else {
            assert!(
                dense[slice(e)].iter().all(|&v| v == 0.0),
                "{what}: unwritten expert {e} not zeroed"
            );
        }
    }
}

#[test]
fn sparse_wgrad_writes_only_experts_with_rows() {
    for device in devices() {
        check_sparse_wgrad::<bf16>(&device, None, 171);
        check_sparse_wgrad::<f32>(&device, Some(&[true, true, false, true, true]), 172);
        check_sparse_wgrad::<f16>(&device, Some(&[true, false, true, true, true]), 173);
    }
}

#[test]
fn several_tiles_in_every_dimension() {
    // dA: 3 column tiles of K = 264, reduction N = 144 (5 k-tiles); dB: 2 x 3 tiles of [N, K],
    // reduction over 300 rows (10 k-tiles).
    let p = Problem::sized(&[130, 300], 144, 264, &mut Rng::new(161));
    for device in devices() {
        check_dgrad::<bf16, f32>(&device, &p, DgradEpilogue::Store, true, 162);
        check_dgrad::<f32, f32>(&device, &p, DgradEpilogue::SwiGluBackward, false, 163);
        check_wgrad::<bf16>(&device, &p, p.gathered(), Some(&[false, true]), true, 164);
        check_wgrad::<f32>(&device, &p, ARows::Contiguous, None, false, 165);
    }
}

#[test]
fn wgrad_group_sizes_and_odd_f32_shapes() {
    let p = Problem::sized(&[0, 1, 7, 16, 129], 16, 24, &mut Rng::new(131));
    let odd = Problem::sized(&[5, 0, 70], 13, 19, &mut Rng::new(132));
    for device in devices() {
        check_wgrad::<bf16>(&device, &p, ARows::Contiguous, None, false, 133);
        check_wgrad::<f32>(&device, &p, ARows::Contiguous, None, true, 134);
        check_wgrad::<f32>(&device, &odd, odd.gathered(), Some(&[true, true, false]), false, 135);
    }
}

#[test]
fn backward_is_bitwise_deterministic() {
    let p = Problem::routed(40, 2, 4, 8, 32, 32, &mut Rng::new(141));
    for device in devices() {
        let run = || {
            let mut rng = Rng::new(142);
            let (dc, _) = values::<bf16>(&mut rng, p.rows() * 32, 0.5);
            let (x, _) = values::<bf16>(&mut rng, p.tokens * 32, 0.5);
            let groups = DeviceGroups::new(&device, &p);
            let (dc_d, x_d) = (device.upload(&dc).unwrap(), device.upload(&x).unwrap());
            let mut db = device.alloc_zeros::<f32>(4 * 32 * 32).unwrap();
            let mut da = device.alloc_zeros::<f32>(p.rows() * 32).unwrap();
            let g = groups.groups(&p);
            gemm::wgrad(
                &device,
                &dc_d,
                &x_d,
                p.gathered(),
                p.shape,
                &g,
                None::<&ExpertMask>,
                WgradWrite::Replace,
                &mut db,
            )
            .unwrap();
            let none = None::<&moe_kernels::DeviceBuffer<f32>>;
            let w = device.upload(&vec![bf16::from_f32(0.25); 4 * 32 * 32]).unwrap();
            let no_gu = None::<&moe_kernels::DeviceBuffer<bf16>>;
            gemm::dgrad(
                &device,
                &dc_d,
                &w,
                p.shape,
                &g,
                DgradEpilogue::Store,
                none,
                no_gu,
                &mut da,
            )
            .unwrap();
            (device.download(&db).unwrap(), device.download(&da).unwrap())
        };
        assert!(run() == run(), "{}: two backward runs differ", device.description());
    }
}

/// A SwiGLU expert layer `Y = GEMM2(SwiGLU(GEMM1(gather X)))` in f32, loss `L = Σ Y ⊙ R`:
/// the device backward (dgrad with the fused SwiGLU backward, dgrad, wgrad x2) against central
/// differences of the f64 reference forward.
#[test]
fn finite_differences_of_a_swiglu_expert_layer() {
    let (d, h) = (8, 8);
    let p1 = Problem::routed(6, 2, 3, 4, 2 * h, d, &mut Rng::new(151));
    let p2 = Problem {
        shape: GemmShape { experts: 3, n: d, k: h },
        ..p1.clone()
    };
    let mut rng = Rng::new(152);
    let x = rng.normals(p1.tokens * d, 0.7);
    let w1 = rng.normals(3 * 2 * h * d, 0.5);
    let w2 = rng.normals(3 * d * h, 0.5);
    let r = rng.normals(p1.rows() * d, 1.0);
    let loss = |x: &[f32], w1: &[f32], w2: &[f32]| -> f64 {
        let (hid, _) = reference::forward(x, p1.gathered(), w1, p1.shape, &p1.host(), Epilogue::SwiGlu, None);
        let hid: Vec<f32> = hid.iter().map(|&v| v as f32).collect();
        let (y, _) = reference::forward(&hid, ARows::Contiguous, w2, p2.shape, &p2.host(), Epilogue::Store, None);
        y.iter().zip(&r).map(|(y, r)| y * *r as f64).sum()
    };
    for device in devices() {
        let groups = DeviceGroups::new(&device, &p1);
        let g = groups.groups(&p1);
        let up = |v: &[f32]| device.upload(v).unwrap();
        let (x_d, w1_d, w2_d, r_d) = (up(&x), up(&w1), up(&w2), up(&r));
        let mut hid = device.alloc_zeros::<f32>(p1.rows() * h).unwrap();
        let mut gu = device.alloc_zeros::<f32>(p1.rows() * 2 * h).unwrap();
        let none = None::<&moe_kernels::DeviceBuffer<f32>>;
        let config = ForwardConfig {
            a_rows: p1.gathered(),
            epilogue: Epilogue::SwiGlu,
            path: GemmPath::Tiled,
        };
        gemm::forward(
            &device,
            &x_d,
            &w1_d,
            p1.shape,
            &g,
            &config,
            none,
            &mut hid,
            Some(&mut gu),
        )
        .unwrap();
        let mut dgu = device.alloc_zeros::<f32>(p1.rows() * 2 * h).unwrap();
        gemm::dgrad(
            &device,
            &r_d,
            &w2_d,
            p2.shape,
            &g,
            DgradEpilogue::SwiGluBackward,
            none,
            Some(&gu),
            &mut dgu,
        )
        .unwrap();
        let mut dxp = device.alloc_zeros::<f32>(p1.rows() * d).unwrap();
        gemm::dgrad(
            &device,
            &dgu,
            &w1_d,
            p1.shape,
            &g,
            DgradEpilogue::Store,
            none,
            none,
            &mut dxp,
        )
        .unwrap();
        let mut dw1 = device.alloc_zeros::<f32>(w1.len()).unwrap();
        gemm::wgrad(
            &device,
            &dgu,
            &x_d,
            p1.gathered(),
            p1.shape,
            &g,
            None::<&ExpertMask>,
            WgradWrite::Replace,
            &mut dw1,
        )
        .unwrap();
        let mut dw2 = device.alloc_zeros::<f32>(w2.len()).unwrap();
        gemm::wgrad(
            &device,
            &r_d,
            &hid,
            ARows::Contiguous,
            p2.shape,
            &g,
            None::<&ExpertMask>,
            WgradWrite::Replace,
            &mut dw2,
        )
        .unwrap();
        let dxp = device.download(&dxp).unwrap();
        // dX[t] = Σ over the rows gathered from token t of dXp[row].
        let mut dx = vec![0.0f32; x.len()];
        for (row, &slot) in p1.sorted_rows.iter().enumerate() {
            if slot >= 0 {
                let t = slot as usize / p1.top_k;
                for c in 0..d {
                    dx[t * d + c] += dxp[row * d + c];
                }
            }
        }
        let fd = |which: usize, i: usize| -> f64 {
            let eps = 1e-2f32;
            let mut inputs = [x.clone(), w1.clone(), w2.clone()];
            inputs[which][i] += eps;
            let plus = loss(&inputs[0], &inputs[1], &inputs[2]);
            inputs[which][i] -= 2.0 * eps;
            let minus = loss(&inputs[0], &inputs[1], &inputs[2]);
            (plus - minus) / (2.0 * eps as f64)
        };
        let dw1 = device.download(&dw1).unwrap();
        let dw2 = device.download(&dw2).unwrap();
        for (which, got) in [(0, &dx), (1, &dw1), (2, &dw2)] {
            let want: Vec<f64> = (0..got.len()).map(|i| fd(which, i)).collect();
            assert!(want.iter().any(|&v| v.abs() > 1e-3), "input {which}: vacuous gradient");
            let tol = super::common::Tolerance { atol: 2e-3, rtol: 2e-3 };
            assert_close(&format!("{} d(input {which})", device.description()), got, &want, tol);
        }
    }
}

/// In the profiling build: dgrad's plain store, its SwiGLU backward and wgrad's dB (accumulated
/// into) leave the sm_90a kernels through the staging tiles, in whole sectors without bank
/// conflicts.
#[test]
#[cfg_attr(
    not(moe_emu_profile),
    ignore = "needs the profiling build: MOE_EMU_PROFILE=1 (clang-19); CI runs it"
)]
fn hopper_dgrad_and_wgrad_epilogues_store_whole_sectors() {
    let emulator = EmulatorDevice::from_env().unwrap().profiling().unwrap();
    let device = Device::Emulator(emulator.clone());
    let p = Problem::sized(&[32, 0, 16], 128, 256, &mut Rng::new(261));
    let hopper = DgradConfig {
        epilogue: DgradEpilogue::Store,
        path: GemmPath::Hopper,
    };
    dgrad_at::<bf16, bf16>(&device, &p, hopper, true, Offsets::default(), 262).unwrap();
    let swiglu_bwd = DgradConfig {
        epilogue: DgradEpilogue::SwiGluBackward,
        ..hopper
    };
    dgrad_at::<bf16, bf16>(&device, &p, swiglu_bwd, true, Offsets::default(), 264).unwrap();
    check_wgrad_on::<bf16>(&device, &p, ARows::Contiguous, None, true, 263, GemmPath::Hopper);
    let profiles = emulator.take_profiles();
    let dgrad = "grouped_gemm_dgrad_sm90_bf16";
    assert_eq!(
        profiles.iter().filter(|p| p.kernel == dgrad).count(),
        2,
        "both dgrad launches"
    );
    for kernel in [dgrad, "grouped_gemm_wgrad_sm90_bf16"] {
        for profile in profiles.iter().filter(|p| p.kernel == kernel) {
            assert_staged_epilogue(profile);
        }
    }
    assert!(
        profiles.iter().any(|p| p.kernel.starts_with("grouped_gemm_wgrad_sm90")),
        "wgrad ran"
    );
}
