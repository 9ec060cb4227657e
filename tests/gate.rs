//! Router scoring (`ops::gate`) on every device against the f64 reference, the reference
//! against finite differences, launch budgets, and every validation error.
mod common;
#[path = "gate/decode.rs"]
mod decode;
#[path = "gate/route.rs"]
mod route;
#[path = "gate/route_losses.rs"]
mod route_losses;

use common::{AtOffset, Rng, Tolerance, assert_close, assert_refused, devices, view_offset};
use half::{bf16, f16};
use moe_kernels::device::{EmulatorDevice, Schedule};
use moe_kernels::ops::FloatElement;
use moe_kernels::ops::gate::{self, GateForm, GateGrads, GateShape, GateWeights};
use moe_kernels::reference::gate::{self as reference, GateParams};
use moe_kernels::{BufferView, BufferViewMut, Device, DeviceBuffer};
use proptest::prelude::*;

/// One test case: a form, its sizes, and which optional parameters it has.
#[derive(Debug, Clone, Copy)]
struct Case {
    form: GateForm,
    shape: GateShape,
    with_b: bool,
    with_c: bool,
    seed: u64,
    /// Every buffer a view at `common::view_offset(offset, i)` (0: the buffers themselves).
    offset: usize,
    /// The shape splits every weight gradient's sum over tokens (one more launch each).
    split_dw: bool,
}

impl Case {
    fn new(form: GateForm, tokens: usize, dim: usize, experts: usize, rank: usize) -> Self {
        Case {
            form,
            shape: GateShape {
                tokens,
                dim,
                experts,
                rank,
            },
            with_b: true,
            with_c: true,
            seed: 7,
            offset: 0,
            split_dw: false,
        }
    }

    /// The rank the form really has (d for the full form).
    fn terms(&self) -> usize {
        match self.form {
            GateForm::Linear => 1,
            GateForm::Full => self.shape.dim,
            _ => self.shape.rank,
        }
    }
}

/// Host values exactly representable in `T` (so device and reference see the same inputs).
fn values<T: FloatElement>(rng: &mut Rng, len: usize, scale: f32) -> Vec<f64> {
    rng.normals(len, scale)
        .into_iter()
        .map(|v| T::from_f32(v).to_f32() as f64)
        .collect()
}

/// The case's parameters: weights scaled so that each projection is O(1) for unit-size x.
fn params<T: FloatElement>(case: &Case, rng: &mut Rng) -> GateParams {
    let GateShape {
        dim: d,
        experts: e,
        rank: r,
        ..
    } = case.shape;
    let s = 1.0 / (d as f32).sqrt();
    let b_typed = |rng: &mut Rng| case.with_b.then(|| values::<T>(rng, e * d, s));
    let c = |rng: &mut Rng| case.with_c.then(|| values::<f32>(rng, e, 1.0));
    match case.form {
        GateForm::Linear => GateParams::Linear {
            w: values::<T>(rng, e * d, s),
            b: case.with_b.then(|| values::<f32>(rng, e, 1.0)),
        },
        GateForm::LowRank => GateParams::LowRank {
            u: values::<T>(rng, e * r * d, s),
            v: values::<T>(rng, e * r * d, s),
            b: b_typed(rng),
            c: c(rng),
        },
        GateForm::Symmetric => GateParams::Symmetric {
            u: values::<T>(rng, e * r * d, s),
            b: b_typed(rng),
            c: c(rng),
        },
        GateForm::Attention => GateParams::Attention {
            wq: values::<T>(rng, r * d, s),
            k: values::<T>(rng, e * r * d, s),
        },
        GateForm::Full => GateParams::Full {
            a: values::<T>(rng, e * d * d, s),
            b: b_typed(rng),
            c: c(rng),
        },
    }
}

/// Whether a parameter is stored in f32 rather than X's dtype.
fn is_f32(form: GateForm, name: &str) -> bool {
    name == "c" || (form == GateForm::Linear && name == "b")
}

/// A parameter uploaded in its storage type, `offset` elements into its buffer.
enum Placed<T: moe_kernels::Element> {
    Typed(AtOffset<T>),
    F32(AtOffset<f32>),
}

/// A view of a [`Placed`] parameter.
enum Uploaded<'a, T: moe_kernels::Element> {
    Typed(BufferView<'a, T>),
    F32(BufferView<'a, f32>),
}

impl<T: moe_kernels::Element> Placed<T> {
    fn view(&self) -> Uploaded<'_, T> {
        match self {
            Placed::Typed(b) => Uploaded::Typed(b.view()),
            Placed::F32(b) => Uploaded::F32(b.view()),
        }
    }
}

/// The parameters on `device`, parameter i at `view_offset(offset, i)`.
fn upload_params<T: FloatElement>(
    device: &Device,
    params: &GateParams,
    offset: usize,
) -> Vec<(&'static str, Placed<T>)> {
    let form = params.form();
    params
        .tensors()
        .into_iter()
        .enumerate()
        .map(|(i, (name, v))| {
            let at = view_offset(offset, i);
            let buffer = if is_f32(form, name) {
                Placed::F32(AtOffset::upload(
                    device,
                    &v.iter().map(|&v| v as f32).collect::<Vec<_>>(),
                    at,
                ))
            } else {
                Placed::Typed(AtOffset::upload(
                    device,
                    &v.iter().map(|&v| T::from_f32(v as f32)).collect::<Vec<_>>(),
                    at,
                ))
            };
            (name, buffer)
        })
        .collect()
}

/// The device weights of `form` from uploaded parameters.
fn weights<'a, T: FloatElement>(form: GateForm, up: &'a [(&'static str, Uploaded<'a, T>)]) -> GateWeights<'a, T> {
    let typed = |name: &str| {
        up.iter().find(|(n, _)| *n == name).map(|(_, b)| match b {
            Uploaded::Typed(b) => b as &dyn moe_kernels::DeviceSlice<T>,
            Uploaded::F32(_) => panic!("{name} is f32"),
        })
    };
    let float = |name: &str| {
        up.iter().find(|(n, _)| *n == name).map(|(_, b)| match b {
            Uploaded::F32(b) => b as &dyn moe_kernels::DeviceSlice<f32>,
            Uploaded::Typed(_) => panic!("{name} is typed"),
        })
    };
    match form {
        GateForm::Linear => GateWeights::Linear {
            w: typed("w").unwrap(),
            b: float("b"),
        },
        GateForm::LowRank => GateWeights::LowRank {
            u: typed("u").unwrap(),
            v: typed("v").unwrap(),
            b: typed("b"),
            c: float("c"),
        },
        GateForm::Symmetric => GateWeights::Symmetric {
            u: typed("u").unwrap(),
            b: typed("b"),
            c: float("c"),
        },
        GateForm::Attention => GateWeights::Attention {
            wq: typed("wq").unwrap(),
            k: typed("k").unwrap(),
        },
        GateForm::Full => GateWeights::Full {
            a: typed("a").unwrap(),
            b: typed("b"),
            c: float("c"),
        },
    }
}

/// Gradient views of `bufs` (named like the weights, in `params` order) for `form`.
fn grads<'a, 'b: 'a>(form: GateForm, bufs: &'a mut [(&'static str, BufferViewMut<'b, f32>)]) -> GateGrads<'a> {
    let mut map: Vec<(&'static str, Option<&'a mut BufferViewMut<'b, f32>>)> =
        bufs.iter_mut().map(|(n, b)| (*n, Some(b))).collect();
    let mut take = |name: &str| -> Option<&'a mut dyn moe_kernels::DeviceSliceMut<f32>> {
        map.iter_mut()
            .find(|(n, _)| *n == name)
            .and_then(|(_, b)| b.take())
            .map(|b| b as &mut dyn moe_kernels::DeviceSliceMut<f32>)
    };
    match form {
        GateForm::Linear => GateGrads::Linear {
            w: take("w").unwrap(),
            b: take("b"),
        },
        GateForm::LowRank => GateGrads::LowRank {
            u: take("u").unwrap(),
            v: take("v").unwrap(),
            b: take("b"),
            c: take("c"),
        },
        GateForm::Symmetric => GateGrads::Symmetric {
            u: take("u").unwrap(),
            b: take("b"),
            c: take("c"),
        },
        GateForm::Attention => GateGrads::Attention {
            wq: take("wq").unwrap(),
            k: take("k").unwrap(),
        },
        GateForm::Full => GateGrads::Full {
            a: take("a").unwrap(),
            b: take("b"),
            c: take("c"),
        },
    }
}

fn to_f32<T: FloatElement>(v: &[T]) -> Vec<f32> {
    v.iter().map(|v| v.to_f32()).collect()
}

/// What one forward and backward call produced, downloaded (dx widened to f32).
#[derive(Debug, PartialEq)]
struct Outputs {
    z: Vec<u32>,
    dx: Vec<u32>,
    grads: Vec<(&'static str, Vec<u32>)>,
}

impl Outputs {
    fn floats(bits: &[u32]) -> Vec<f32> {
        bits.iter().map(|&b| f32::from_bits(b)).collect()
    }
}

/// Runs forward and backward of `case` on `device` with the given host inputs. Checks the
/// launch budget (forward: one launch; backward: the coefficient kernel and the sum over
/// experts where the form needs them, dX, and one launch per parameter gradient), that no
/// op syncs the host, and the parameter list of the size helper.
fn run_case<T: FloatElement>(device: &Device, case: &Case, host: &GateParams, x: &[f64], dz: &[f64]) -> Outputs {
    let shape = case.shape;
    let what = format!("{case:?} {} on {}", T::NAME, device.description());
    let placed = upload_params::<T>(device, host, case.offset);
    let up: Vec<_> = placed.iter().map(|(n, p)| (*n, p.view())).collect();
    let w = weights(case.form, &up);
    let at = |i| view_offset(case.offset, i + 5);
    let x_dev = AtOffset::upload(
        device,
        &x.iter().map(|&v| T::from_f32(v as f32)).collect::<Vec<_>>(),
        at(0),
    );
    let dz_dev = AtOffset::upload(device, &dz.iter().map(|&v| v as f32).collect::<Vec<_>>(), at(1));
    // Outputs start as garbage so an element the kernels never write shows.
    let mut z = AtOffset::upload(device, &vec![f32::NAN; shape.z_len().unwrap()], at(2));
    let mut dx = AtOffset::upload(device, &vec![T::from_f32(f32::NAN); shape.x_len().unwrap()], at(3));
    let mut grad_bufs: Vec<(&'static str, AtOffset<f32>)> = host
        .tensors()
        .into_iter()
        .enumerate()
        .map(|(i, (n, t))| (n, AtOffset::upload(device, &vec![f32::NAN; t.len()], at(4 + i))))
        .collect();
    // The size helper lists exactly the parameters the case holds, with their lengths.
    let listed: Vec<(&str, usize)> = w
        .params(&shape)
        .iter()
        .map(|p| (p.name, p.dims[..p.ndim].iter().product()))
        .collect();
    let held: Vec<(&str, usize)> = host.tensors().iter().map(|(n, t)| (*n, t.len())).collect();
    assert_eq!(listed, held, "{what}: GateWeights::params");
    let ws_len = gate::backward_workspace_len(case.form, &shape).unwrap();
    let mut ws = AtOffset::upload(device, &vec![f32::NAN; ws_len], at(9));

    let mut grad_views: Vec<_> = grad_bufs.iter_mut().map(|(n, b)| (*n, b.view_mut())).collect();
    let before = device.stats();
    gate::scores(device, &shape, &w, &x_dev.view(), &mut z.view_mut()).unwrap_or_else(|e| panic!("{what}: {e}"));
    let after_forward = device.stats();
    let has_tokens = u64::from(shape.tokens > 0);
    assert_eq!(
        after_forward.launches - before.launches,
        has_tokens,
        "{what}: forward launches"
    );
    gate::scores_backward(
        device,
        &shape,
        &w,
        &x_dev.view(),
        &dz_dev.view(),
        &mut dx.view_mut(),
        grads(case.form, &mut grad_views),
        &mut ws.view_mut(),
    )
    .unwrap_or_else(|e| panic!("{what}: {e}"));
    drop(grad_views);
    let coef = u64::from(case.form != GateForm::Linear);
    let sum_over_experts = u64::from(matches!(case.form, GateForm::Attention | GateForm::Full));
    let bias = if case.form == GateForm::Linear { "b" } else { "c" };
    let weight_grads = grad_bufs.iter().filter(|(n, _)| *n != bias).count() as u64;
    let slice_sums = if case.split_dw { weight_grads } else { 0 };
    let backward_launches = has_tokens * (coef + sum_over_experts + 1) + grad_bufs.len() as u64 + slice_sums;
    assert_eq!(
        device.stats().launches - after_forward.launches,
        backward_launches,
        "{what}: backward launches"
    );
    assert_eq!(
        device.stats().host_syncs,
        before.host_syncs,
        "{what}: an op synced the host"
    );

    let bits = |v: Vec<f32>| v.into_iter().map(f32::to_bits).collect::<Vec<_>>();
    Outputs {
        z: bits(z.download(device)),
        dx: bits(to_f32(&dx.download(device))),
        grads: grad_bufs.iter().map(|(n, b)| (*n, bits(b.download(device)))).collect(),
    }
}

/// The host inputs of `case`: parameters, X and dz, all exactly representable in `T`.
fn inputs<T: FloatElement>(case: &Case) -> (GateParams, Vec<f64>, Vec<f64>) {
    let mut rng = Rng::new(case.seed);
    let host = params::<T>(case, &mut rng);
    let x = values::<T>(&mut rng, case.shape.x_len().unwrap(), 1.0);
    let dz = values::<f32>(&mut rng, case.shape.z_len().unwrap(), 1.0);
    (host, x, dz)
}

/// Forward and backward of `case` on `device`, compared with the reference.
fn check_case<T: FloatElement>(device: &Device, case: &Case) {
    let shape = case.shape;
    let what = format!("{case:?} {} on {}", T::NAME, device.description());
    let (host, x, dz) = inputs::<T>(case);
    let got = run_case::<T>(device, case, &host, &x, &dz);

    // The device saw exactly `x` and the parameters: f32 rounding is the only difference.
    let terms = case.terms();
    let z_ref = reference::scores(&shape, &host, &x);
    let z_tol = Tolerance::F32.over(shape.dim * terms).scaled(4.0);
    assert_close(&format!("{what}: z"), &Outputs::floats(&got.z), &z_ref, z_tol);

    let g_ref = reference::scores_backward(&shape, &host, &x, &dz);
    let dx_tol = Tolerance::of::<T>().over(shape.experts * terms * 2).scaled(4.0);
    assert_close(&format!("{what}: dx"), &Outputs::floats(&got.dx), &g_ref.dx, dx_tol);
    let dw_tol = Tolerance::F32.over(shape.tokens * shape.dim.max(terms) * 2).scaled(4.0);
    for ((name, bits), (ref_name, want)) in got.grads.iter().zip(&g_ref.params) {
        assert_eq!(name, ref_name);
        assert_close(&format!("{what}: d{name}"), &Outputs::floats(bits), want, dw_tol);
    }
}

fn check_all_dtypes(case: &Case, dtype: usize) {
    for device in devices() {
        match dtype {
            0 => check_case::<f32>(&device, case),
            1 => check_case::<f16>(&device, case),
            _ => check_case::<bf16>(&device, case),
        }
    }
}

const TOKENS: [usize; 4] = [0, 1, 7, 97];
const EXPERTS: [usize; 7] = [1, 3, 8, 60, 64, 256, 1000];
/// d values off the 16-wide k-tile and 64-wide column tile, and aligned ones.
const DIMS: [usize; 6] = [1, 5, 16, 24, 33, 70];

fn case_strategy(form: GateForm, ranks: &'static [usize]) -> impl Strategy<Value = (Case, usize)> {
    (
        prop::sample::select(&TOKENS[..]),
        prop::sample::select(&EXPERTS[..]),
        prop::sample::select(&DIMS[..]),
        prop::sample::select(ranks),
        any::<bool>(),
        any::<bool>(),
        0..3usize,
        any::<u64>(),
    )
        .prop_map(move |(t, e, d, r, with_b, with_c, dtype, seed)| {
            // Keep emulated work small: the biggest expert counts only with few tokens.
            let t = if e >= 256 { t.min(7) } else { t };
            let case = Case {
                with_b,
                with_c,
                seed,
                ..Case::new(form, t, d, e, r)
            };
            (case, dtype)
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn linear_matches_reference((case, dtype) in case_strategy(GateForm::Linear, &[1])) {
        check_all_dtypes(&case, dtype);
    }

    #[test]
    fn low_rank_matches_reference((case, dtype) in case_strategy(GateForm::LowRank, &[1, 2, 3, 4, 6, 8])) {
        check_all_dtypes(&case, dtype);
    }

    #[test]
    fn symmetric_matches_reference((case, dtype) in case_strategy(GateForm::Symmetric, &[1, 2, 3, 4, 6, 8])) {
        check_all_dtypes(&case, dtype);
    }

    #[test]
    fn attention_matches_reference((case, dtype) in case_strategy(GateForm::Attention, &[1, 2, 3, 4, 6, 8])) {
        check_all_dtypes(&case, dtype);
    }

    #[test]
    fn full_matches_reference(
        t in prop::sample::select(&TOKENS[..]),
        e in prop::sample::select(&[1usize, 3, 8, 20][..]),
        d in prop::sample::select(&[1usize, 3, 6, 9][..]),
        with_b in any::<bool>(),
        with_c in any::<bool>(),
        dtype in 0..3usize,
        seed in any::<u64>(),
    ) {
        let case = Case { with_b, with_c, seed, ..Case::new(GateForm::Full, t, d, e, 1) };
        check_all_dtypes(&case, dtype);
    }
}

/// Every form in every dtype at a larger size (several token, expert and k tiles): T = 200,
/// d = 40, E = 130 (the tensor-core tiles' 128 + a ragged one), r = 4; the full form smaller.
#[test]
fn every_form_at_a_larger_size() {
    for dtype in 0..3 {
        for form in [
            GateForm::Linear,
            GateForm::LowRank,
            GateForm::Symmetric,
            GateForm::Attention,
        ] {
            check_all_dtypes(&Case::new(form, 200, 40, 130, 4), dtype);
        }
        check_all_dtypes(&Case::new(GateForm::Full, 130, 12, 8, 1), dtype);
    }
}

/// Every forward is one launch, at every rank (ranks above 4 loop inside the kernel).
#[test]
fn every_forward_is_one_launch() {
    for form in GateForm::ALL {
        for rank in [1, 4, 8] {
            let case = Case::new(form, 5, 9, 3, rank);
            for device in devices() {
                // check_case asserts one forward launch and no host sync.
                check_case::<f32>(&device, &case);
            }
        }
    }
}

/// Fixed reduction orders: every output is bitwise the same on a second run and under every
/// emulator schedule (a float atomic or a schedule-dependent sum would differ).
#[test]
fn results_are_bitwise_reproducible() {
    for form in GateForm::ALL {
        assert_bitwise_reproducible(&Case::new(form, 70, 19, 37, 6));
    }
}

fn assert_bitwise_reproducible(case: &Case) {
    let emulator = EmulatorDevice::new();
    let schedules = [Schedule::InOrder, Schedule::Reverse, Schedule::Random { seed: 5 }];
    let (host, x, dz) = inputs::<bf16>(case);
    let form = case.form;
    // Per device: nvcc contracts multiply-adds into FMAs where the emulator's host
    // compiler need not, so the GPU and the emulator may differ in the last bit.
    for device in devices() {
        let first = run_case::<bf16>(&device, case, &host, &x, &dz);
        assert_eq!(
            run_case::<bf16>(&device, case, &host, &x, &dz),
            first,
            "{form:?} on {}",
            device.description()
        );
    }
    let first = run_case::<bf16>(&Device::Emulator(emulator.clone()), case, &host, &x, &dz);
    for schedule in schedules {
        let device = Device::Emulator(emulator.with_schedule(schedule));
        assert_eq!(
            run_case::<bf16>(&device, case, &host, &x, &dz),
            first,
            "{form:?} under {schedule:?}"
        );
    }
}

/// dW's sum over tokens split in slices (split-K), the slices then added in slice order: at
/// 600 tokens and one 64 x 128 tile per gradient, each weight gradient takes 3 slices of 208
/// tokens, so one more launch each (run_case counts them). Every form and dtype against the
/// reference, and bitwise the same on a second run and under every schedule.
#[test]
fn weight_gradients_split_over_tokens() {
    for form in GateForm::ALL {
        let mut case = Case::new(form, 600, 20, 3, 2);
        case.split_dw = true;
        for dtype in 0..3 {
            check_all_dtypes(&case, dtype);
        }
        assert_bitwise_reproducible(&case);
    }
}

/// Non-finite input rows (math §1) get NaN logits and, routed nowhere (§2), add nothing to the
/// gate's gradients: a batch whose last rows hold a NaN, an infinity, values of at least 2^64
/// (that overflow the projections) and one such value alone (at element 13: past the first
/// 16-byte run of its k-tile in every dtype, so only a check of every run flags it; its linear
/// logits stay finite), each with a zero dz row (what the router's backward
/// gives them), has NaN z there, weight gradients bitwise equal to the batch without those
/// rows, every one finite, and the same z and dX on the other rows. The rows are
/// last so that every other row keeps its place in the fixed summation orders (tokens in order
/// for dW; 8 strided lanes for the bias sums), which is what makes "bitwise" the right test:
/// the extra rows only add exact zeros. The reference (which skips zero dz) agrees. At 41
/// tokens and d = 19 (the decode kernels, but for the full form: one k-tile), and at 71 tokens
/// (the tiles, whose 16-bit forward flags such rows itself) over d = 131 (rows not 16-byte
/// aligned in f16/bf16: element-by-element fills) and d = 136 (16-byte aligned rows: cp.async
/// fills), both five k-tiles, so the tensor-core tile's 3-slot ring wraps; the NaN and the
/// infinity sit near the row's end (the last k-tile).
#[test]
fn rows_routed_nowhere_add_nothing_to_gradients() {
    fn check<T: FloatElement>(device: &Device, form: GateForm, rank: usize, good: usize, d: usize) {
        let full = Case::new(form, good + 4, d, 9, rank);
        let kept = Case::new(form, good, d, 9, rank);
        let (host, mut x, mut dz) = inputs::<T>(&full);
        let e = full.shape.experts;
        x[good * d + d - 3] = f64::NAN;
        x[(good + 1) * d + d - 1] = f64::NEG_INFINITY;
        x[(good + 2) * d..(good + 3) * d].fill(3e38);
        x[(good + 3) * d + 13] = 3e38;
        dz[good * e..].fill(0.0);
        let what = format!(
            "{form:?} rank {rank} T {} d {d} {} on {}",
            good + 4,
            T::NAME,
            device.description()
        );
        let got = run_case::<T>(device, &full, &host, &x, &dz);
        let want = run_case::<T>(device, &kept, &host, &x[..good * d], &dz[..good * e]);
        assert_eq!(got.grads, want.grads, "{what}: weight gradients");
        assert_eq!(got.z[..good * e], want.z[..], "{what}: z");
        let z_ref = reference::scores(&kept.shape, &host, &x[..good * d]);
        let z_tol = Tolerance::F32.over(d * kept.terms()).scaled(4.0);
        assert_close(
            &format!("{what}: reference z"),
            &Outputs::floats(&got.z[..good * e]),
            &z_ref,
            z_tol,
        );
        assert!(
            Outputs::floats(&got.z[good * e..]).iter().all(|v| v.is_nan()),
            "{what}: NaN z"
        );
        assert_eq!(got.dx[..good * d], want.dx[..], "{what}: dx");
        for (name, bits) in &got.grads {
            assert!(Outputs::floats(bits).iter().all(|v| v.is_finite()), "{what}: d{name}");
        }
        let g_ref = reference::scores_backward(&full.shape, &host, &x, &dz);
        let dw_tol = Tolerance::F32.over(full.shape.tokens * d * 2).scaled(4.0);
        for ((name, bits), (_, want)) in got.grads.iter().zip(&g_ref.params) {
            assert_close(
                &format!("{what}: reference d{name}"),
                &Outputs::floats(bits),
                want,
                dw_tol,
            );
        }
    }
    for device in devices() {
        for form in GateForm::ALL {
            let rank = if form == GateForm::Linear || form == GateForm::Full {
                1
            } else {
                3
            };
            // 41 tokens: the decode kernels (but for the full form); 71: the tiles.
            for (good, d) in [(37, 19), (67, 131), (67, 136)] {
                check::<f32>(&device, form, rank, good, d);
                check::<f16>(&device, form, rank, good, d);
                check::<bf16>(&device, form, rank, good, d);
            }
        }
    }
}

/// `L = Σ dz ⊙ z`: the reference's gradients against central differences of its scores.
#[test]
fn reference_gradients_match_finite_differences() {
    let forms = GateForm::ALL;
    for form in forms {
        let case = Case::new(form, 3, 4, 3, 2);
        let shape = case.shape;
        let mut rng = Rng::new(11);
        let mut params = params::<f32>(&case, &mut rng);
        let x = values::<f32>(&mut rng, shape.x_len().unwrap(), 1.0);
        let dz = values::<f32>(&mut rng, shape.z_len().unwrap(), 1.0);
        let loss = |p: &GateParams, x: &[f64]| -> f64 {
            reference::scores(&shape, p, x)
                .iter()
                .zip(&dz)
                .map(|(z, g)| z * g)
                .sum()
        };
        let grads = reference::scores_backward(&shape, &params, &x, &dz);
        let h = 1e-6;
        let numeric_dx: Vec<f64> = (0..x.len())
            .map(|i| {
                let (mut up, mut down) = (x.clone(), x.clone());
                up[i] += h;
                down[i] -= h;
                (loss(&params, &up) - loss(&params, &down)) / (2.0 * h)
            })
            .collect();
        let tol = Tolerance { atol: 1e-6, rtol: 1e-6 };
        let as_f32 = |v: &[f64]| v.iter().map(|&v| v as f32).collect::<Vec<_>>();
        assert_close(
            &format!("{form:?} dx"),
            &as_f32(&grads.dx),
            &numeric_dx,
            tol.scaled(10.0),
        );
        for (k, (name, analytic)) in grads.params.iter().enumerate() {
            let mut numeric = vec![0.0; analytic.len()];
            for (i, slot) in numeric.iter_mut().enumerate() {
                let original = params.tensors_mut()[k].1[i];
                params.tensors_mut()[k].1[i] = original + h;
                let up = loss(&params, &x);
                params.tensors_mut()[k].1[i] = original - h;
                let down = loss(&params, &x);
                params.tensors_mut()[k].1[i] = original;
                *slot = (up - down) / (2.0 * h);
            }
            assert_close(
                &format!("{form:?} d{name}"),
                &as_f32(analytic),
                &numeric,
                tol.scaled(10.0),
            );
        }
    }
}

fn zeros<T: moe_kernels::Element>(device: &Device, len: usize) -> DeviceBuffer<T> {
    device.alloc_zeros(len).unwrap()
}

#[test]
fn forward_refuses_bad_inputs() {
    let device = &devices()[0];
    let shape = GateShape {
        tokens: 3,
        dim: 5,
        experts: 4,
        rank: 2,
    };
    let (t, d, e, r) = (3, 5, 4, 2);
    let x = zeros::<f32>(device, t * d);
    let mut z = zeros::<f32>(device, t * e);
    let (w, b) = (zeros::<f32>(device, e * d), zeros::<f32>(device, e));
    let (u, v, bt) = (
        zeros::<f32>(device, e * r * d),
        zeros::<f32>(device, e * r * d),
        zeros::<f32>(device, e * d),
    );
    let (wq, a) = (zeros::<f32>(device, r * d), zeros::<f32>(device, e * d * d));
    let short = zeros::<f32>(device, 1);
    let linear = GateWeights::Linear { w: &w, b: Some(&b) };
    gate::scores(device, &shape, &linear, &x, &mut z).expect("the valid call works");

    for (argument, bad) in [
        ("shape.dim", GateShape { dim: 0, ..shape }),
        (
            "shape.dim",
            GateShape {
                dim: 65535 * 64 + 1,
                ..shape
            },
        ),
        ("shape.experts", GateShape { experts: 0, ..shape }),
        ("shape.rank", GateShape { rank: 0, ..shape }),
    ] {
        assert_refused(device, argument, || gate::scores(device, &bad, &linear, &x, &mut z));
    }
    let many = GateShape {
        experts: 65535 * 16 + 1,
        ..shape
    };
    let low_rank = GateWeights::LowRank {
        u: &u,
        v: &v,
        b: Some(&bt),
        c: Some(&b),
    };
    assert_refused(device, "shape.experts", || {
        gate::scores(device, &many, &low_rank, &x, &mut z)
    });
    let overflow = GateShape {
        experts: 1 << 20,
        rank: 1 << 12,
        ..shape
    };
    assert_refused(device, "shape.experts * rank", || {
        gate::scores(device, &overflow, &low_rank, &x, &mut z)
    });
    assert_refused(device, "x", || gate::scores(device, &shape, &linear, &short, &mut z));
    let mut short_z = zeros::<f32>(device, 1);
    assert_refused(device, "z", || gate::scores(device, &shape, &linear, &x, &mut short_z));

    let bad_weights: [(&str, GateWeights<'_, f32>); 10] = [
        ("weights.w", GateWeights::Linear { w: &short, b: None }),
        ("weights.b", GateWeights::Linear { w: &w, b: Some(&short) }),
        (
            "weights.u",
            GateWeights::LowRank {
                u: &short,
                v: &v,
                b: None,
                c: None,
            },
        ),
        (
            "weights.v",
            GateWeights::LowRank {
                u: &u,
                v: &short,
                b: None,
                c: None,
            },
        ),
        (
            "weights.b",
            GateWeights::LowRank {
                u: &u,
                v: &v,
                b: Some(&short),
                c: None,
            },
        ),
        (
            "weights.c",
            GateWeights::Symmetric {
                u: &u,
                b: None,
                c: Some(&short),
            },
        ),
        ("weights.wq", GateWeights::Attention { wq: &short, k: &u }),
        ("weights.k", GateWeights::Attention { wq: &wq, k: &short }),
        (
            "weights.a",
            GateWeights::Full {
                a: &short,
                b: None,
                c: None,
            },
        ),
        (
            "weights.b",
            GateWeights::Full {
                a: &a,
                b: Some(&short),
                c: None,
            },
        ),
    ];
    for (argument, weights) in &bad_weights {
        assert_refused(device, argument, || gate::scores(device, &shape, weights, &x, &mut z));
    }
}

#[test]
fn backward_refuses_bad_inputs() {
    let device = &devices()[0];
    let shape = GateShape {
        tokens: 3,
        dim: 5,
        experts: 4,
        rank: 2,
    };
    let (t, d, e, r) = (3, 5, 4, 2);
    let x = zeros::<f32>(device, t * d);
    let dz = zeros::<f32>(device, t * e);
    let mut dx = zeros::<f32>(device, t * d);
    let (u, v, c) = (
        zeros::<f32>(device, e * r * d),
        zeros::<f32>(device, e * r * d),
        zeros::<f32>(device, e),
    );
    let weights = GateWeights::LowRank {
        u: &u,
        v: &v,
        b: None,
        c: Some(&c),
    };
    let ws_len = gate::backward_workspace_len(GateForm::LowRank, &shape).unwrap();
    let mut ws = zeros::<f32>(device, ws_len);
    let (mut du, mut dv, mut dc) = (
        zeros::<f32>(device, e * r * d),
        zeros::<f32>(device, e * r * d),
        zeros::<f32>(device, e),
    );
    let mut short = zeros::<f32>(device, 1);
    let mut short_ws = zeros::<f32>(device, ws_len - 1);
    let short_in = zeros::<f32>(device, 1);
    gate::scores_backward(
        device,
        &shape,
        &weights,
        &x,
        &dz,
        &mut dx,
        GateGrads::LowRank {
            u: &mut du,
            v: &mut dv,
            b: None,
            c: Some(&mut dc),
        },
        &mut ws,
    )
    .expect("the valid call works");

    macro_rules! refused {
        ($argument:expr, $x:expr, $dz:expr, $dx:expr, $grads:expr, $ws:expr) => {
            assert_refused(device, $argument, || {
                gate::scores_backward(device, &shape, &weights, $x, $dz, $dx, $grads, $ws)
            })
        };
    }
    refused!(
        "grads",
        &x,
        &dz,
        &mut dx,
        GateGrads::Symmetric {
            u: &mut du,
            b: None,
            c: Some(&mut dc)
        },
        &mut ws
    );
    refused!(
        "grads.c",
        &x,
        &dz,
        &mut dx,
        GateGrads::LowRank {
            u: &mut du,
            v: &mut dv,
            b: None,
            c: None
        },
        &mut ws
    );
    refused!(
        "grads.b",
        &x,
        &dz,
        &mut dx,
        GateGrads::LowRank {
            u: &mut du,
            v: &mut dv,
            b: Some(&mut short),
            c: Some(&mut dc)
        },
        &mut ws
    );
    refused!(
        "grads.u",
        &x,
        &dz,
        &mut dx,
        GateGrads::LowRank {
            u: &mut short,
            v: &mut dv,
            b: None,
            c: Some(&mut dc)
        },
        &mut ws
    );
    refused!(
        "x",
        &short_in,
        &dz,
        &mut dx,
        GateGrads::LowRank {
            u: &mut du,
            v: &mut dv,
            b: None,
            c: Some(&mut dc)
        },
        &mut ws
    );
    refused!(
        "dz",
        &x,
        &short_in,
        &mut dx,
        GateGrads::LowRank {
            u: &mut du,
            v: &mut dv,
            b: None,
            c: Some(&mut dc)
        },
        &mut ws
    );
    refused!(
        "dx",
        &x,
        &dz,
        &mut short,
        GateGrads::LowRank {
            u: &mut du,
            v: &mut dv,
            b: None,
            c: Some(&mut dc)
        },
        &mut ws
    );
    refused!(
        "workspace",
        &x,
        &dz,
        &mut dx,
        GateGrads::LowRank {
            u: &mut du,
            v: &mut dv,
            b: None,
            c: Some(&mut dc)
        },
        &mut short_ws
    );
}

/// Every buffer a view at odd element offsets (cudarc sub-slices; 2 bytes off 16-byte
/// alignment for 16-bit X and weights) with odd d: every form, forward and backward, in every
/// dtype, right on every device (the kernels fall back to element-wise loads). Edge sizes: no
/// tokens, one expert.
mod unaligned {
    use super::*;

    #[test]
    fn every_form_at_odd_offsets() {
        for offset in [1, 2] {
            for dtype in 0..3 {
                for form in [
                    GateForm::Linear,
                    GateForm::LowRank,
                    GateForm::Symmetric,
                    GateForm::Attention,
                ] {
                    let case = Case {
                        offset,
                        ..Case::new(form, 70, 19, 37, 5)
                    };
                    check_all_dtypes(&case, dtype);
                }
                check_all_dtypes(
                    &Case {
                        offset,
                        ..Case::new(GateForm::Full, 33, 9, 5, 1)
                    },
                    dtype,
                );
            }
        }
    }

    #[test]
    fn aligned_16bit_sizes_at_odd_offsets_no_tokens_and_one_expert() {
        for (tokens, dim, experts) in [(66, 32, 130), (0, 24, 8), (9, 16, 1), (0, 5, 1)] {
            for form in GateForm::ALL {
                let case = Case {
                    offset: 3,
                    ..Case::new(
                        form,
                        tokens,
                        dim.min(if form == GateForm::Full { 8 } else { dim }),
                        experts,
                        4,
                    )
                };
                check_all_dtypes(&case, 1);
                check_all_dtypes(&case, 2);
            }
        }
    }
}
