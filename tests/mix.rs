//! The VQ-MoE mixing gate (math §6) on every available device against `reference::mix`, in f32,
//! f16 and bf16, on the 16-byte and the element-wise paths: forward, backward, the reference's
//! logit gradient against f64 finite differences, non-finite logits, determinism, every
//! validation error; one launch and no host sync per op.
mod common;

use common::{AtOffset, Rng, Tolerance, assert_close, devices, view_offset};
use moe_kernels::device::EmulatorDevice;
use moe_kernels::device::profile::{Access, Space};
use moe_kernels::ops::FloatElement;
use moe_kernels::ops::mix;
use moe_kernels::reference::mix as reference;
use moe_kernels::{Device, Error};
use proptest::prelude::*;

/// One case's inputs, already rounded to the dtype.
struct Case<T> {
    logits: Vec<f32>,
    y_cont: Vec<T>,
    y_disc: Vec<T>,
    dy: Vec<T>,
    d: usize,
    /// Every buffer a view at `common::view_offset(offset, i)` (0: the buffers themselves).
    offset: usize,
}

fn wide<T: FloatElement>(v: &[T]) -> Vec<f64> {
    v.iter().map(|&x| x.to_f32() as f64).collect()
}
fn narrow<T: FloatElement>(v: &[T]) -> Vec<f32> {
    v.iter().map(|&x| x.to_f32()).collect()
}

fn random_case<T: FloatElement>(rng: &mut Rng, tokens: usize, d: usize) -> Case<T> {
    let mut rows = |len| rng.normals(len, 1.0).into_iter().map(T::from_f32).collect::<Vec<T>>();
    let (y_cont, y_disc, dy) = (rows(tokens * d), rows(tokens * d), rows(tokens * d));
    Case {
        logits: rng.normals(2 * tokens, 3.0),
        y_cont,
        y_disc,
        dy,
        d,
        offset: 0,
    }
}

/// What one backward produced, downloaded.
#[derive(PartialEq, Debug)]
struct Gradients {
    dy_cont: Vec<f32>,
    dy_disc: Vec<f32>,
    dlogits: Vec<f32>,
}

/// Runs forward and backward once each (asserting one launch apiece and no host sync).
fn run<T: FloatElement>(device: &Device, case: &Case<T>) -> (Vec<f32>, Gradients) {
    let at = |i| view_offset(case.offset, i);
    let logits = AtOffset::upload(device, &case.logits, at(0));
    let (cont, disc, dy) = (
        AtOffset::upload(device, &case.y_cont, at(1)),
        AtOffset::upload(device, &case.y_disc, at(2)),
        AtOffset::upload(device, &case.dy, at(3)),
    );
    let n = case.y_cont.len();
    let mut y = AtOffset::<T>::zeros(device, n, at(4));
    let mut dcont = AtOffset::<T>::zeros(device, n, at(5));
    let mut ddisc = AtOffset::<T>::zeros(device, n, at(6));
    let mut dlogits = AtOffset::<f32>::zeros(device, case.logits.len(), at(7));
    let (logits_v, cont_v, disc_v, dy_v) = (logits.view(), cont.view(), disc.view(), dy.view());
    let before = device.stats();
    mix::forward(device, &logits_v, &cont_v, &disc_v, case.d, &mut y.view_mut()).unwrap();
    let between = device.stats();
    mix::backward(
        device,
        &logits_v,
        &cont_v,
        &disc_v,
        &dy_v,
        case.d,
        &mut dcont.view_mut(),
        &mut ddisc.view_mut(),
        &mut dlogits.view_mut(),
    )
    .unwrap();
    let after = device.stats();
    assert_eq!(between.launches - before.launches, 1, "forward is one launch");
    assert_eq!(after.launches - between.launches, 1, "backward is one launch");
    assert_eq!(after.host_syncs, before.host_syncs, "mix ops must not sync");
    let grads = Gradients {
        dy_cont: narrow(&dcont.download(device)),
        dy_disc: narrow(&ddisc.download(device)),
        dlogits: dlogits.download(device),
    };
    (narrow(&y.download(device)), grads)
}

/// Every output against the reference: rows within the dtype's rounding (one rounding of an
/// f32 result), the logit gradient within f32 rounding of two length-d dot products.
fn check<T: FloatElement>(device: &Device, case: &Case<T>) {
    let what = format!("{device:?} {} T={} d={}", T::NAME, case.logits.len() / 2, case.d);
    let (cont, disc, dy) = (wide(&case.y_cont), wide(&case.y_disc), wide(&case.dy));
    let (y, grads) = run(device, case);
    let tol = Tolerance::of::<T>();
    assert_close(
        &format!("{what} y"),
        &y,
        &reference::forward(&case.logits, &cont, &disc, case.d),
        tol,
    );
    let (want_cont, want_disc, want_dl) = reference::backward(&case.logits, &cont, &disc, &dy, case.d);
    assert_close(&format!("{what} dy_cont"), &grads.dy_cont, &want_cont, tol);
    assert_close(&format!("{what} dy_disc"), &grads.dy_disc, &want_disc, tol);
    // |dy|, |y| ~ 1: each dot product's rounding grows like sqrt(d) eps.
    assert_close(
        &format!("{what} dlogits"),
        &grads.dlogits,
        &want_dl,
        Tolerance::F32.over(case.d).scaled(4.0),
    );
}

fn check_all_dtypes(tokens: usize, d: usize, seed: u64) {
    let mut rng = Rng::new(seed);
    let f32_case = random_case::<f32>(&mut rng, tokens, d);
    let f16_case = random_case::<half::f16>(&mut rng, tokens, d);
    let bf16_case = random_case::<half::bf16>(&mut rng, tokens, d);
    for device in devices() {
        check(&device, &f32_case);
        check(&device, &f16_case);
        check(&device, &bf16_case);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]

    /// d from 1 to 80: multiples of 4 and 8 take the 16-byte path (f32, 16-bit), others the
    /// element-wise one; T = 0 is an empty launch.
    #[test]
    fn forward_and_backward_match_the_reference(tokens in 0usize..=20, d in 1usize..=80, seed in any::<u64>()) {
        check_all_dtypes(tokens, d, seed);
    }
}

/// Rows wider than one pass of the warp's 32 lanes (each lane takes several chunks), on the
/// 16-byte path (d = 1024) and the element-wise one (d = 1029).
#[test]
fn wide_rows_on_both_paths() {
    check_all_dtypes(3, 1024, 5);
    check_all_dtypes(3, 1029, 6);
}

/// The reference's logit gradient against central differences of `L = <dy, y>` in f64.
#[test]
fn reference_gradient_matches_finite_differences() {
    let mut rng = Rng::new(9);
    let (tokens, d) = (4, 7);
    let case = random_case::<f32>(&mut rng, tokens, d);
    let (cont, disc, dy) = (wide(&case.y_cont), wide(&case.y_disc), wide(&case.dy));
    let loss = |logits: &[f32]| -> f64 {
        let y = reference::forward(logits, &cont, &disc, d);
        y.iter().zip(&dy).map(|(a, b)| a * b).sum()
    };
    let (_, _, dl) = reference::backward(&case.logits, &cont, &disc, &dy, d);
    for i in 0..case.logits.len() {
        // The logits are f32: step by a power of two so that l ± h is exact.
        let h = 2f32.powi(-10);
        let (mut plus, mut minus) = (case.logits.clone(), case.logits.clone());
        plus[i] += h;
        minus[i] -= h;
        let numeric = (loss(&plus) - loss(&minus)) / (2.0 * h as f64);
        assert!(
            (numeric - dl[i]).abs() <= 1e-5 * (1.0 + dl[i].abs()),
            "dl[{i}]: analytic {} numeric {numeric}",
            dl[i]
        );
    }
}

/// NaN logits and equal infinities make NaN weights: a NaN output row, and exact zero gradients
/// (the mix routes the token nowhere), even where dy is NaN; one infinity picks a path; huge
/// finite logits saturate without overflow. Other tokens are untouched.
#[test]
fn non_finite_logits_follow_the_documented_rule() {
    let (inf, nan) = (f32::INFINITY, f32::NAN);
    let logits = [
        nan, 1.0, 0.5, nan, inf, inf, -inf, -inf, inf, 1.0, -inf, 1.0, 1e30, -1e30, -80.0, 80.0, 0.3, -0.2,
    ];
    let tokens = logits.len() / 2;
    let mut rng = Rng::new(13);
    let mut case = random_case::<f32>(&mut rng, tokens, 12);
    case.logits = logits.to_vec();
    case.dy[..case.d].fill(f32::NAN);
    let nan_rows = [0usize, 1, 2, 3];
    for device in devices() {
        check(&device, &case);
        let (y, g) = run(&device, &case);
        for t in 0..tokens {
            let row = &y[t * case.d..(t + 1) * case.d];
            let nan_row = nan_rows.contains(&t);
            assert_eq!(row.iter().all(|v| v.is_nan()), nan_row, "{device:?}: token {t} y");
            if nan_row {
                let rows = g.dy_cont[t * case.d..][..case.d]
                    .iter()
                    .chain(&g.dy_disc[t * case.d..][..case.d]);
                let zero = rows.chain(&g.dlogits[2 * t..2 * t + 2]).all(|&v| v == 0.0);
                assert!(zero, "{device:?}: token {t} routed nowhere has a gradient");
            }
            assert!(g.dlogits[2 * t].is_finite(), "{device:?}: token {t} dl");
        }
    }
}

#[test]
fn repeated_calls_give_the_same_bits() {
    let mut rng = Rng::new(17);
    let case = random_case::<half::bf16>(&mut rng, 9, 200);
    for device in devices() {
        let (y1, g1) = run(&device, &case);
        let (y2, g2) = run(&device, &case);
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<u32>>();
        assert_eq!(bits(&y1), bits(&y2), "{device:?}: y");
        assert_eq!(bits(&g1.dlogits), bits(&g2.dlogits), "{device:?}: dlogits");
        assert_eq!(g1, g2, "{device:?}: gradients");
    }
}

/// In the profiling build (`MOE_EMU_PROFILE=1`): forward and backward touch exactly the bytes of
/// their floor, and the forward's stores are whole 16-byte-per-lane warp requests (16 sectors).
#[test]
#[cfg_attr(
    not(moe_emu_profile),
    ignore = "needs the profiling build: MOE_EMU_PROFILE=1 (clang-19); CI runs it"
)]
fn forward_and_backward_touch_only_their_floor_bytes() {
    let emulator = EmulatorDevice::from_env().unwrap().profiling().unwrap();
    let device = Device::Emulator(emulator.clone());
    let (tokens, d) = (8u64, 256u64);
    let case = random_case::<half::bf16>(&mut Rng::new(23), tokens as usize, d as usize);
    let row_bytes = 2 * tokens * d;
    run(&device, &case);
    let [forward, backward] = <[_; 2]>::try_from(emulator.take_profiles()).unwrap();
    assert_eq!(forward.kernel, "mix_forward_bf16");
    assert_eq!(
        forward.unique_global_load_bytes,
        8 * tokens + 2 * row_bytes,
        "logits, y_cont, y_disc"
    );
    assert_eq!(forward.unique_global_store_bytes, row_bytes, "y");
    assert_eq!(
        forward.traffic(Space::Global, Access::Store).sectors_per_request(),
        16.0
    );
    assert_eq!(backward.kernel, "mix_backward_bf16");
    assert_eq!(
        backward.unique_global_load_bytes,
        8 * tokens + 3 * row_bytes,
        "logits, y_cont, y_disc, dy"
    );
    assert_eq!(
        backward.unique_global_store_bytes,
        2 * row_bytes + 8 * tokens,
        "dy_cont, dy_disc, dlogits"
    );
}

#[track_caller]
fn assert_invalid(result: Result<(), Error>, name: &str) {
    match result.err() {
        Some(Error::InvalidArgument { argument, .. }) | Some(Error::Shape { argument, .. }) if argument == name => {}
        other => panic!("expected an error naming `{name}`, got {other:?} (None: Ok)"),
    }
}

#[test]
fn bad_inputs_are_errors_naming_the_argument() {
    let (tokens, d) = (3, 8);
    for device in devices() {
        let dev = &device;
        let launches = dev.stats().launches;
        let logits = dev.alloc_zeros::<f32>(2 * tokens).unwrap();
        let odd = dev.alloc_zeros::<f32>(2 * tokens + 1).unwrap();
        let rows = dev.alloc_zeros::<f32>(tokens * d).unwrap();
        let short = dev.alloc_zeros::<f32>(tokens * d - 1).unwrap();
        let mut out = dev.alloc_zeros::<f32>(tokens * d).unwrap();
        let mut out2 = dev.alloc_zeros::<f32>(tokens * d).unwrap();
        let mut short_out = dev.alloc_zeros::<f32>(tokens * d - 1).unwrap();
        let mut dl = dev.alloc_zeros::<f32>(2 * tokens).unwrap();
        let mut short_dl = dev.alloc_zeros::<f32>(2 * tokens - 1).unwrap();
        assert_invalid(mix::forward(dev, &odd, &rows, &rows, d, &mut out), "logits");
        assert_invalid(mix::forward(dev, &logits, &rows, &rows, 0, &mut out), "d");
        assert_invalid(mix::forward(dev, &logits, &short, &rows, d, &mut out), "y_cont");
        assert_invalid(mix::forward(dev, &logits, &rows, &short, d, &mut out), "y_disc");
        assert_invalid(mix::forward(dev, &logits, &rows, &rows, d, &mut short_out), "y");
        let bwd = |logits, cont, disc, dy, d, dc: &mut _, dd: &mut _, dl: &mut _| {
            mix::backward::<f32>(dev, logits, cont, disc, dy, d, dc, dd, dl)
        };
        assert_invalid(
            bwd(&odd, &rows, &rows, &rows, d, &mut out, &mut out2, &mut dl),
            "logits",
        );
        assert_invalid(
            bwd(&logits, &rows, &rows, &short, d, &mut out, &mut out2, &mut dl),
            "dy",
        );
        assert_invalid(
            bwd(&logits, &rows, &rows, &rows, d, &mut short_out, &mut out2, &mut dl),
            "dy_cont",
        );
        assert_invalid(
            bwd(&logits, &rows, &rows, &rows, d, &mut out, &mut short_out, &mut dl),
            "dy_disc",
        );
        assert_invalid(
            bwd(&logits, &rows, &rows, &rows, d, &mut out, &mut out2, &mut short_dl),
            "dlogits",
        );
        assert_eq!(
            dev.stats().launches,
            launches,
            "{device:?}: a rejected call launched a kernel"
        );
    }
}

/// Every buffer a view at odd element offsets (cudarc sub-slices; the 16-bit rows 2 bytes off
/// 16-byte alignment), d a multiple of 8 (which would take the 16-byte path if aligned) and odd:
/// right on every device, through the element-wise path.
mod unaligned {
    use super::*;

    fn at_offset<T: FloatElement>(rng: &mut Rng, tokens: usize, d: usize, offset: usize) -> Case<T> {
        Case {
            offset,
            ..random_case(rng, tokens, d)
        }
    }

    #[test]
    fn rows_at_odd_offsets() {
        let mut rng = Rng::new(90);
        for (tokens, d) in [(13, 64), (7, 37), (0, 8), (1, 1)] {
            for offset in [1, 2, 4] {
                let cases = (
                    at_offset::<f32>(&mut rng, tokens, d, offset),
                    at_offset::<half::f16>(&mut rng, tokens, d, offset),
                    at_offset::<half::bf16>(&mut rng, tokens, d, offset),
                );
                for device in devices() {
                    check(&device, &cases.0);
                    check(&device, &cases.1);
                    check(&device, &cases.2);
                }
            }
        }
    }
}
