//! Operands as views at small element offsets (what a cudarc user's sub-slices are) and odd
//! sizes, on every device against the reference. The contract (`ops::gemm` docs): f32 is right
//! at any offset and any shape; the f16/bf16 tensor-core tiles need A, B and dC 16-byte
//! aligned (and N, K multiples of 8): otherwise the forward runs the decode kernel (an `Err`
//! with `GemmPath::Tiled`) and dgrad / wgrad return an `Err` naming the operand before anything
//! launches; outputs, GU and row weights may start at any element. Plus the edge sizes: no
//! rows, one expert, empty groups, k = E.
use super::common::{AtOffset, Rng, assert_close, assert_refused, devices};
use super::{DeviceGroups, Problem, to_f32, tolerance, values};
use half::{bf16, f16};
use moe_kernels::ops::FloatElement;
use moe_kernels::ops::gemm::{
    self, ARows, DgradConfig, DgradEpilogue, Epilogue, ForwardConfig, GemmPath, GemmShape, WgradWrite,
};
use moe_kernels::reference::gemm as reference;
use moe_kernels::{Device, Result};

/// Element offsets of each operand's view (0: the buffer's own 256-byte aligned start).
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Offsets {
    a: usize,
    b: usize,
    weights: usize,
    out: usize,
    gu: usize,
}

const fn at(a: usize, b: usize, weights: usize, out: usize, gu: usize) -> Offsets {
    Offsets { a, b, weights, out, gu }
}

/// The 16-bit inputs at 8 elements (16 bytes: aligned), everything else at odd elements.
pub(super) const ALIGNED_INPUTS_ODD_OUTPUTS: Offsets = at(8, 8, 1, 1, 3);
/// Every f32 operand off 16-byte alignment, each differently.
const F32_OFFSETS: [Offsets; 3] = [at(1, 0, 0, 1, 0), at(0, 3, 1, 2, 1), at(3, 1, 2, 3, 5)];

/// The forward with every operand a view at `off`; on success the output (and GU) must match
/// the reference and nothing outside the views may change. The op's error otherwise.
fn forward_at<T: FloatElement, O: FloatElement>(
    device: &Device,
    p: &Problem,
    config: ForwardConfig,
    off: Offsets,
    seed: u64,
) -> Result<()> {
    let mut rng = Rng::new(seed);
    let (n, k) = (p.shape.n, p.shape.k);
    let (a, a32) = values::<T>(&mut rng, p.a_rows(config.a_rows) * k, 0.5);
    let (b, b32) = values::<T>(&mut rng, p.shape.experts * n * k, 0.5);
    let w: Vec<f32> = (0..p.tokens * p.top_k).map(|_| rng.uniform(0.1, 1.0)).collect();
    let swiglu = config.epilogue == Epilogue::SwiGlu;
    let groups = DeviceGroups::new(device, p);
    let (a_d, b_d, w_d) = (
        AtOffset::upload(device, &a, off.a),
        AtOffset::upload(device, &b, off.b),
        AtOffset::upload(device, &w, off.weights),
    );
    let out_len = gemm::forward_out_len(&p.shape, p.rows(), config.epilogue)?;
    let mut out = AtOffset::<O>::zeros(device, out_len, off.out);
    let mut gu = AtOffset::<T>::zeros(device, p.rows() * n, off.gu);
    let before = device.stats();
    gemm::forward(
        device,
        &a_d.view(),
        &b_d.view(),
        p.shape,
        &groups.groups(p),
        &config,
        Some(&w_d.view()),
        &mut out.view_mut(),
        swiglu.then_some(&mut gu.view_mut()),
    )?;
    assert_eq!(device.stats().host_syncs, before.host_syncs, "forward synced the host");
    assert_eq!(device.stats().launches - before.launches, u64::from(p.rows() > 0));
    let (want, want_gu) = reference::forward(&a32, config.a_rows, &b32, p.shape, &p.host(), config.epilogue, Some(&w));
    let what = format!(
        "{} {}->{} {config:?} {off:?} {:?}",
        device.description(),
        T::NAME,
        O::NAME,
        p.shape
    );
    assert!(
        p.rows() == 0 || want.iter().any(|&v| v != 0.0),
        "{what}: a vacuous case"
    );
    assert_close(&what, &to_f32(&out.download(device)), &want, tolerance::<O>(k));
    if swiglu {
        assert_close(
            &format!("{what} gu"),
            &to_f32(&gu.download(device)),
            &want_gu,
            tolerance::<T>(k),
        );
    }
    Ok(())
}

/// Every forward configuration: every path (the sm_90a one where `hopper`), both A modes, both
/// epilogues.
fn configs(p: &Problem, hopper: bool) -> Vec<ForwardConfig> {
    let mut all = vec![];
    let paths = [GemmPath::Tiled, GemmPath::Decode, GemmPath::Hopper];
    for path in paths.into_iter().filter(|&path| hopper || path != GemmPath::Hopper) {
        for a_rows in [ARows::Contiguous, p.gathered()] {
            for epilogue in [Epilogue::Store, Epilogue::SwiGlu] {
                all.push(ForwardConfig { a_rows, epilogue, path });
            }
        }
    }
    all
}

#[test]
fn forward_f32_at_odd_offsets_and_odd_sizes() {
    // N = 14 (even for SwiGLU, not a multiple of 4), K = 19; routed rows with -1 padding.
    let p = Problem::routed(21, 2, 5, 4, 14, 19, &mut Rng::new(1));
    for device in devices() {
        for (i, config) in configs(&p, false).into_iter().enumerate() {
            for off in F32_OFFSETS {
                forward_at::<f32, f32>(&device, &p, config, off, 10 + i as u64).unwrap();
            }
        }
        let plain = Problem::sized(&[5, 0, 2], 13, 7, &mut Rng::new(2));
        forward_at::<f32, f32>(&device, &plain, ForwardConfig::default(), at(1, 1, 1, 1, 0), 3).unwrap();
    }
}

/// 16-bit forward: outputs at odd elements are right on every path; A or B off 16 bytes is
/// refused on the tensor-core tiles (mma.sync and sm_90a) and right on the decode kernel,
/// which `Auto` falls back to.
fn forward_16bit<T: FloatElement>(device: &Device, p: &Problem, seed: u64) {
    for config in configs(p, device.runs_sm90a()) {
        let tiles = matches!(config.path, GemmPath::Tiled | GemmPath::Hopper);
        forward_at::<T, T>(device, p, config, ALIGNED_INPUTS_ODD_OUTPUTS, seed).unwrap();
        if config.epilogue == Epilogue::Store {
            forward_at::<T, f32>(device, p, config, ALIGNED_INPUTS_ODD_OUTPUTS, seed + 1).unwrap();
        }
        for (argument, off) in [
            ("a", at(1, 0, 0, 0, 0)),
            ("b", at(0, 4, 0, 0, 0)),
            ("a", at(7, 7, 1, 1, 1)),
        ] {
            if tiles {
                assert_refused(device, argument, || forward_at::<T, T>(device, p, config, off, seed));
            }
            let fallback = ForwardConfig {
                path: if tiles { GemmPath::Auto } else { config.path },
                ..config
            };
            // The tiles would fault on these operands (the emulator fails the launch).
            forward_at::<T, T>(device, p, fallback, off, seed + 2).unwrap();
        }
    }
}

#[test]
fn forward_16bit_outputs_at_any_offset_inputs_aligned_or_decode() {
    // Groups of up to 19 rows padded to 24: Auto picks decode anyway for aligned inputs, so the
    // big-group problem below checks that Auto falls back to decode for misaligned ones.
    let p = Problem::routed(19, 2, 4, 8, 24, 16, &mut Rng::new(20));
    let big = Problem::sized(&[70, 3], 16, 24, &mut Rng::new(22));
    for device in devices() {
        forward_16bit::<f16>(&device, &p, 21);
        forward_16bit::<bf16>(&device, &big, 23);
    }
}

#[test]
fn forward_16bit_sizes_off_a_multiple_of_8_run_decode_or_are_refused_on_tiles() {
    for device in devices() {
        for (n, k, argument) in [(20, 16, "shape.n"), (16, 12, "shape.k"), (13, 9, "shape.n")] {
            let p = Problem::sized(&[3, 40], n, k, &mut Rng::new(30));
            let off = at(1, 3, 1, 1, 1);
            let tiled = ForwardConfig {
                path: GemmPath::Tiled,
                ..ForwardConfig::default()
            };
            assert_refused(&device, argument, || {
                forward_at::<bf16, bf16>(&device, &p, tiled, off, 31)
            });
            if device.runs_sm90a() {
                let hopper = ForwardConfig {
                    path: GemmPath::Hopper,
                    ..tiled
                };
                assert_refused(&device, argument, || {
                    forward_at::<bf16, bf16>(&device, &p, hopper, Offsets::default(), 31)
                });
            }
            for config in [
                ForwardConfig::default(),
                ForwardConfig {
                    path: GemmPath::Decode,
                    ..tiled
                },
            ] {
                forward_at::<bf16, bf16>(&device, &p, config, off, 32).unwrap();
                forward_at::<f16, f32>(&device, &p, config, Offsets::default(), 33).unwrap();
            }
        }
    }
}

/// dgrad on `device` vs the reference with every operand a view at `off` (`a` is dC, `gu` the
/// forward's GU; `Offsets::default()`: the buffers themselves): `dc [rows, N]`, `b [E, N, K]`,
/// gu `[rows, 2K]` for SwiGLU, row weights when `weights`. One launch, no host sync. Returns
/// the output as f32.
pub(super) fn dgrad_at<T: FloatElement, O: FloatElement>(
    device: &Device,
    p: &Problem,
    config: impl Into<DgradConfig>,
    weights: bool,
    off: Offsets,
    seed: u64,
) -> Result<Vec<f32>> {
    let config = config.into();
    let epilogue = config.epilogue;
    let mut rng = Rng::new(seed);
    let GemmShape { experts, n, k } = p.shape;
    let (dc, dc32) = values::<T>(&mut rng, p.rows() * n, 0.5);
    let (b, b32) = values::<T>(&mut rng, experts * n * k, 0.5);
    let (gu, gu32) = values::<T>(&mut rng, p.rows() * 2 * k, 1.0);
    let w: Vec<f32> = (0..p.tokens * p.top_k).map(|_| rng.uniform(0.1, 1.0)).collect();
    let swiglu = epilogue == DgradEpilogue::SwiGluBackward;
    let groups = DeviceGroups::new(device, p);
    let (dc_d, b_d, gu_d, w_d) = (
        AtOffset::upload(device, &dc, off.a),
        AtOffset::upload(device, &b, off.b),
        AtOffset::upload(device, &gu, off.gu),
        AtOffset::upload(device, &w, off.weights),
    );
    let mut out = AtOffset::<O>::zeros(device, p.rows() * if swiglu { 2 * k } else { k }, off.out);
    let before = device.stats();
    gemm::dgrad(
        device,
        &dc_d.view(),
        &b_d.view(),
        p.shape,
        &groups.groups(p),
        config,
        weights.then_some(&w_d.view()),
        swiglu.then_some(&gu_d.view()),
        &mut out.view_mut(),
    )?;
    assert_eq!(device.stats().host_syncs, before.host_syncs, "dgrad synced the host");
    assert_eq!(device.stats().launches - before.launches, 1, "dgrad launches");
    let want = reference::dgrad(
        &dc32,
        &b32,
        p.shape,
        &p.host(),
        epilogue,
        weights.then_some(&w[..]),
        swiglu.then_some(&gu32[..]),
    );
    let what = format!(
        "{} dgrad {}->{} {config:?} {off:?} {:?}",
        device.description(),
        T::NAME,
        O::NAME,
        p.shape
    );
    assert!(want.iter().any(|&v| v != 0.0), "{what}: a vacuous case");
    let got = to_f32(&out.download(device));
    assert_close(&what, &got, &want, tolerance::<O>(n));
    Ok(got)
}

#[test]
fn dgrad_at_offsets() {
    let odd = Problem::sized(&[9, 0, 3], 13, 11, &mut Rng::new(40));
    let p = Problem::routed(17, 2, 3, 8, 16, 24, &mut Rng::new(41));
    for device in devices() {
        for epilogue in [DgradEpilogue::Store, DgradEpilogue::SwiGluBackward] {
            for off in F32_OFFSETS {
                dgrad_at::<f32, f32>(&device, &odd, epilogue, true, off, 42).unwrap();
            }
            dgrad_at::<bf16, bf16>(&device, &p, epilogue, true, ALIGNED_INPUTS_ODD_OUTPUTS, 43).unwrap();
            dgrad_at::<f16, f32>(&device, &p, epilogue, true, ALIGNED_INPUTS_ODD_OUTPUTS, 44).unwrap();
            for (argument, off) in [("dc", at(1, 0, 0, 0, 0)), ("b", at(0, 2, 0, 0, 0))] {
                assert_refused(&device, argument, || {
                    dgrad_at::<f16, f16>(&device, &p, epilogue, true, off, 45).map(drop)
                });
            }
            if device.runs_sm90a() {
                let hopper = DgradConfig {
                    epilogue,
                    path: GemmPath::Hopper,
                };
                dgrad_at::<bf16, bf16>(&device, &p, hopper, true, ALIGNED_INPUTS_ODD_OUTPUTS, 46).unwrap();
                dgrad_at::<f16, f32>(&device, &p, hopper, true, ALIGNED_INPUTS_ODD_OUTPUTS, 47).unwrap();
                for (argument, off) in [("dc", at(1, 0, 0, 0, 0)), ("b", at(0, 2, 0, 0, 0))] {
                    assert_refused(&device, argument, || {
                        dgrad_at::<bf16, bf16>(&device, &p, hopper, true, off, 48).map(drop)
                    });
                }
            }
        }
    }
}

/// wgrad (accumulating into a random initial dB) with every operand a view at `off` (`b` is dC).
fn wgrad_at<T: FloatElement>(device: &Device, p: &Problem, a_mode: ARows, off: Offsets, seed: u64) -> Result<()> {
    let mut rng = Rng::new(seed);
    let GemmShape { experts, n, k } = p.shape;
    let (dc, dc32) = values::<T>(&mut rng, p.rows() * n, 0.5);
    let (a, a32) = values::<T>(&mut rng, p.a_rows(a_mode) * k, 0.5);
    let initial = rng.normals(experts * n * k, 1.0);
    let groups = DeviceGroups::new(device, p);
    let (dc_d, a_d) = (
        AtOffset::upload(device, &dc, off.b),
        AtOffset::upload(device, &a, off.a),
    );
    let mut db = AtOffset::upload(device, &initial, off.out);
    let before = device.stats();
    gemm::wgrad(
        device,
        &dc_d.view(),
        &a_d.view(),
        a_mode,
        p.shape,
        &groups.groups(p),
        None::<&gemm::ExpertMask>,
        WgradWrite::Accumulate,
        &mut db.view_mut(),
    )?;
    assert_eq!(device.stats().host_syncs, before.host_syncs, "wgrad synced the host");
    assert_eq!(device.stats().launches - before.launches, 1, "wgrad launches");
    let want = reference::wgrad(&dc32, &a32, a_mode, p.shape, &p.host(), None, true, &initial);
    let what = format!(
        "{} wgrad {} {a_mode:?} {off:?} {:?}",
        device.description(),
        T::NAME,
        p.shape
    );
    assert_close(&what, &db.download(device), &want, tolerance::<f32>(p.rows()));
    Ok(())
}

#[test]
fn wgrad_at_offsets() {
    let odd = Problem::routed(13, 3, 4, 1, 7, 9, &mut Rng::new(50));
    let p = Problem::routed(13, 2, 3, 8, 16, 8, &mut Rng::new(51));
    for device in devices() {
        for a_mode in [ARows::Contiguous, odd.gathered()] {
            for off in F32_OFFSETS {
                wgrad_at::<f32>(&device, &odd, a_mode, off, 52).unwrap();
            }
        }
        for a_mode in [ARows::Contiguous, p.gathered()] {
            wgrad_at::<bf16>(&device, &p, a_mode, ALIGNED_INPUTS_ODD_OUTPUTS, 53).unwrap();
            for (argument, off) in [("a", at(3, 0, 0, 0, 0)), ("dc", at(0, 1, 0, 0, 0))] {
                assert_refused(&device, argument, || wgrad_at::<f16>(&device, &p, a_mode, off, 54));
            }
        }
    }
}

#[test]
fn edge_sizes_no_rows_one_expert_empty_groups_k_equals_e() {
    for device in devices() {
        // No rows at all (T = 0): nothing launches, nothing is written.
        let empty = Problem::sized(&[0, 0, 0], 8, 8, &mut Rng::new(60));
        for config in configs(&empty, false) {
            forward_at::<f32, f32>(&device, &empty, config, at(1, 1, 1, 1, 1), 61).unwrap();
        }
        // One expert; groups of zero rows between full ones; every token picks every expert.
        let one = Problem::sized(&[37], 16, 24, &mut Rng::new(62));
        let holes = Problem::sized(&[0, 4, 0, 0, 33, 0], 16, 8, &mut Rng::new(63));
        let all = Problem::routed(11, 3, 3, 1, 16, 16, &mut Rng::new(64));
        for p in [&one, &holes, &all] {
            for config in configs(p, device.runs_sm90a()) {
                forward_at::<f16, f16>(&device, p, config, ALIGNED_INPUTS_ODD_OUTPUTS, 65).unwrap();
            }
            dgrad_at::<bf16, f32>(&device, p, DgradEpilogue::Store, true, ALIGNED_INPUTS_ODD_OUTPUTS, 66).unwrap();
            wgrad_at::<f32>(&device, p, p.gathered(), at(1, 1, 0, 1, 0), 67).unwrap();
        }
    }
}
