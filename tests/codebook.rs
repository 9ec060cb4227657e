//! Codebook nearest neighbour, quantize, VQ losses, code order and EMA (`ops::codebook`) on every
//! device against the f64 reference; the loss gradients against finite differences; ties, NaN
//! and inf rows; launch budgets, no host sync, determinism; every validation error.
mod common;

use common::{AtOffset, Rng, Tolerance, assert_close, assert_refused, devices, view_offset};
use half::{bf16, f16};
use moe_kernels::ops::FloatElement;
use moe_kernels::ops::codebook::{
    self, CodeOrder, CodebookShape, EmaConfig, EmaState, LossConfig, NearestConfig, NearestOutputs,
};
use moe_kernels::ops::router::NO_EXPERT;
use moe_kernels::reference::codebook as reference;
use moe_kernels::{Device, DeviceBuffer};
use proptest::prelude::*;

/// Host values exactly representable in `T` (device and reference see the same inputs).
fn values<T: FloatElement>(rng: &mut Rng, len: usize, scale: f32) -> Vec<f64> {
    rng.normals(len, scale)
        .into_iter()
        .map(|v| round::<T>(v as f64))
        .collect()
}

fn round<T: FloatElement>(v: f64) -> f64 {
    T::from_f32(v as f32).to_f32() as f64
}

fn upload<T: FloatElement>(device: &Device, v: &[f64]) -> DeviceBuffer<T> {
    device
        .upload(&v.iter().map(|&v| T::from_f32(v as f32)).collect::<Vec<_>>())
        .unwrap()
}

fn zeros<T: moe_kernels::Element>(device: &Device, len: usize) -> DeviceBuffer<T> {
    device.alloc_zeros(len).unwrap()
}

/// Tokens near random codes: `x_t = c_{j_t} + noise` (so the nearest code is usually clear),
/// every few rows a plain random row (so near ties happen too).
fn inputs<T: FloatElement>(shape: &CodebookShape, seed: u64) -> (Vec<f64>, Vec<f64>) {
    let mut rng = Rng::new(seed);
    let codes = values::<T>(&mut rng, shape.codebook_len().unwrap(), 1.0);
    let mut x = Vec::with_capacity(shape.x_len().unwrap());
    for t in 0..shape.tokens {
        let j = rng.below(shape.codes);
        for e in 0..shape.dim {
            let v = if t % 5 == 4 {
                rng.normal()
            } else {
                codes[j * shape.dim + e] as f32 + 0.1 * rng.normal()
            };
            x.push(round::<T>(v as f64));
        }
    }
    (x, codes)
}

/// What the device returned from [`codebook::nearest`].
#[derive(Debug, Clone, PartialEq)]
struct Found {
    ids: Vec<i32>,
    distances: Vec<f32>,
    experts: Vec<i32>,
    weights: Vec<f32>,
    nonfinite_rows: u32,
}

/// Norms + nearest on `device`, with every output asked for.
fn run_nearest<T: FloatElement>(
    device: &Device,
    shape: &CodebookShape,
    config: &NearestConfig,
    x: &[f64],
    codes: &[f64],
) -> Found {
    run_nearest_at::<T>(device, shape, config, x, codes, 0).unwrap()
}

/// [`run_nearest`] with every buffer a view at `off` (see [`view_offset`]); the ops' error if
/// they refuse it.
fn run_nearest_at<T: FloatElement>(
    device: &Device,
    shape: &CodebookShape,
    config: &NearestConfig,
    x: &[f64],
    codes: &[f64],
    off: usize,
) -> moe_kernels::Result<Found> {
    let at = |i| view_offset(off, i);
    let xd = upload_at::<T>(device, x, at(0));
    let cd = upload_at::<T>(device, codes, at(1));
    let mut norms = AtOffset::<f32>::zeros(device, shape.codes, at(2));
    codebook::code_norms(device, shape, &cd.view(), &mut norms.view_mut())?;
    let n = shape.tokens * config.k;
    let mut ids = AtOffset::<i32>::zeros(device, n, at(3));
    let mut distances = AtOffset::<f32>::zeros(device, n, at(4));
    let mut experts = AtOffset::<i32>::zeros(device, n, at(5));
    let mut workspace = AtOffset::<u32>::zeros(device, config.workspace_len(shape).unwrap(), at(6));
    let mut weights = AtOffset::<f32>::zeros(device, n, at(7));
    let mut nonfinite = AtOffset::<u32>::zeros(device, 1, at(8));
    let out = NearestOutputs {
        ids: &mut ids.view_mut(),
        distances: Some(&mut distances.view_mut()),
        experts: Some(&mut experts.view_mut()),
        weights: Some(&mut weights.view_mut()),
        nonfinite_rows: Some(&mut nonfinite.view_mut()),
    };
    let before = device.stats().host_syncs;
    codebook::nearest(
        device,
        shape,
        config,
        &xd.view(),
        &cd.view(),
        &norms.view(),
        out,
        &mut workspace.view_mut(),
    )?;
    assert_eq!(device.stats().host_syncs, before, "nearest synced the host");
    Ok(Found {
        ids: ids.download(device),
        distances: distances.download(device),
        experts: experts.download(device),
        weights: weights.download(device),
        nonfinite_rows: nonfinite.download(device)[0],
    })
}

/// Each returned id's reference score must equal the reference's score at that rank within
/// `tol` (exactly the reference id when the scores are separated by more than rounding), the
/// ids of a row distinct, experts `id mod E`, weights 1, distances within tolerance. A row the
/// reference routes nowhere must be routed nowhere (ids and experts −1, weights and distances
/// NaN) and counted.
fn check_found(what: &str, shape: &CodebookShape, config: &NearestConfig, x: &[f64], codes: &[f64], got: &Found) {
    let (d, k) = (shape.dim, config.k);
    let want = reference::nearest(shape, x, codes, k, config.num_experts);
    assert_eq!(
        got.nonfinite_rows as usize, want.nonfinite_rows,
        "{what}: rows routed nowhere"
    );
    let routed = (0..shape.tokens).filter(|&t| want.ids[t * k] != NO_EXPERT);
    let magnitude: f64 = reference::code_norms(shape, codes)
        .iter()
        .fold(1.0f64, |m, &v| m.max(v))
        + routed
            .map(|t| x[t * d..][..d].iter().map(|v| v * v).sum::<f64>())
            .fold(0.0, f64::max);
    let tol = 2e-5 * magnitude * (d as f64).sqrt();
    for t in 0..shape.tokens {
        let slots = t * k..(t + 1) * k;
        if want.ids[t * k] == NO_EXPERT {
            let nowhere = got.ids[slots.clone()]
                .iter()
                .chain(&got.experts[slots.clone()])
                .all(|&i| i == NO_EXPERT)
                && got.weights[slots.clone()]
                    .iter()
                    .chain(&got.distances[slots])
                    .all(|v| v.is_nan());
            assert!(nowhere, "{what}: row {t} should be routed nowhere");
            continue;
        }
        assert!(got.weights[slots].iter().all(|&w| w == 1.0), "{what}: row {t}: weights");
        let row = &x[t * d..][..d];
        let all = reference::nearest_scores(row, codes, d, shape.codes);
        let score_of = |j: i32| all.iter().find(|(_, i)| *i == j as usize).unwrap().0;
        let got_row = &got.ids[t * k..][..k];
        for i in 0..k {
            let (g, w) = (got_row[i], want.ids[t * k + i]);
            assert!(g >= 0 && (g as usize) < shape.codes, "{what}: row {t} slot {i}: id {g}");
            assert!(!got_row[..i].contains(&g), "{what}: row {t}: id {g} twice");
            let (gs, ws) = (score_of(g), want.scores[t * k + i]);
            let same = g == w || (gs - ws).abs() <= tol;
            assert!(
                same,
                "{what}: row {t} slot {i}: got {g} (score {gs}), want {w} (score {ws}), tol {tol}"
            );
            assert_eq!(got.experts[t * k + i], g % config.num_experts as i32, "{what}: expert");
        }
    }
    let tol = Tolerance {
        atol: 4.0 * tol,
        rtol: 1e-4,
    };
    assert_close(&format!("{what}: distances"), &got.distances, &want.distances, tol);
}

fn check_nearest<T: FloatElement>(shape: &CodebookShape, config: &NearestConfig, seed: u64) {
    let (x, codes) = inputs::<T>(shape, seed);
    for device in devices() {
        let got = run_nearest::<T>(&device, shape, config, &x, &codes);
        check_found(
            &format!("{} {shape:?} {config:?}", T::NAME),
            shape,
            config,
            &x,
            &codes,
            &got,
        );
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 10, ..ProptestConfig::default() })]

    #[test]
    fn nearest_matches_reference(
        tokens in 0usize..140, dim in 1usize..72, codes in 1usize..200, k in 1usize..=8,
        experts_pick in 0usize..4, splits in 0usize..4, dtype in 0usize..3, seed in 0u64..1000,
    ) {
        // f16/bf16 rows go to the tensor cores in 16-byte copies: d a multiple of 8.
        let dim = if dtype == 0 { dim } else { dim.div_ceil(8) * 8 };
        let shape = CodebookShape { tokens, dim, codes };
        let divisors: Vec<usize> = (1..=codes).filter(|e| codes % e == 0).collect();
        let tiles = NearestConfig::max_splits(&shape);
        let config = NearestConfig {
            k: k.min(codes),
            num_experts: divisors[experts_pick % divisors.len()],
            splits: (splits > 0).then_some(splits.min(tiles)),
        };
        match dtype {
            0 => check_nearest::<f32>(&shape, &config, seed),
            1 => check_nearest::<f16>(&shape, &config, seed),
            _ => check_nearest::<bf16>(&shape, &config, seed),
        }
    }
}

/// Separated inputs: every row's best code beats the second by far more than rounding, so ids
/// must equal the reference exactly; T and d are not multiples of any tile (d = 37 for f32, 40
/// for the 16-bit types, whose rows must be 16 bytes); the result is bitwise the same for every
/// split and on a repeat.
fn exact_ids<T: FloatElement>() {
    let shape = CodebookShape {
        tokens: 70,
        dim: if size_of::<T>() == 4 { 37 } else { 40 },
        codes: 700,
    };
    let mut rng = Rng::new(11);
    let codes = values::<T>(&mut rng, shape.codebook_len().unwrap(), 1.0);
    let mut x = vec![];
    for t in 0..shape.tokens {
        let j = (t * 7) % shape.codes;
        x.extend((0..shape.dim).map(|e| round::<T>(codes[j * shape.dim + e] + 0.01 * rng.normal() as f64)));
    }
    let want = reference::nearest(&shape, &x, &codes, 2, 1);
    for t in 0..shape.tokens {
        assert!(
            want.scores[2 * t + 1] - want.scores[2 * t] > 1.0,
            "row {t} is not separated"
        );
    }
    for device in devices() {
        let mut previous: Option<Found> = None;
        for splits in [Some(1), Some(2), Some(5), None, None] {
            let config = NearestConfig {
                splits,
                ..NearestConfig::default()
            };
            let got = run_nearest::<T>(&device, &shape, &config, &x, &codes);
            let top1: Vec<i32> = want.ids.iter().step_by(2).copied().collect();
            assert_eq!(got.ids, top1, "{} splits {splits:?}", T::NAME);
            if let Some(p) = &previous {
                assert_eq!(p.ids, got.ids, "ids depend on the split");
                let bits = |f: &Found| f.distances.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(p), bits(&got), "distances are not bitwise reproducible");
            }
            previous = Some(got);
        }
    }
}

#[test]
fn nearest_ids_exact_when_separated() {
    exact_ids::<f32>();
    exact_ids::<f16>();
    exact_ids::<bf16>();
}

/// Codes 5, 300 and 515 are the same vector (in three different splits of 256 codes): the lower
/// index wins and top-3 lists all three in index order.
fn duplicate_codes<T: FloatElement>() {
    let shape = CodebookShape {
        tokens: 9,
        dim: 24,
        codes: 520,
    };
    let (mut x, mut codes) = inputs::<T>(&shape, 3);
    let d = shape.dim;
    let source: Vec<f64> = codes[5 * d..6 * d].to_vec();
    for j in [300, 515] {
        codes[j * d..(j + 1) * d].copy_from_slice(&source);
    }
    for t in 0..shape.tokens {
        x[t * d..(t + 1) * d].copy_from_slice(&source);
    }
    for device in devices() {
        for splits in [Some(1), Some(3)] {
            let config = NearestConfig {
                k: 3,
                splits,
                ..NearestConfig::default()
            };
            let got = run_nearest::<T>(&device, &shape, &config, &x, &codes);
            for t in 0..shape.tokens {
                assert_eq!(&got.ids[3 * t..3 * t + 3], &[5, 300, 515], "{} row {t}", T::NAME);
            }
            let top1 = NearestConfig { k: 1, ..config };
            assert!(
                run_nearest::<T>(&device, &shape, &top1, &x, &codes)
                    .ids
                    .iter()
                    .all(|&i| i == 5)
            );
        }
    }
}

#[test]
fn ties_go_to_the_lower_code() {
    duplicate_codes::<f32>();
    duplicate_codes::<f16>();
    duplicate_codes::<bf16>();
}

/// A row holding a NaN or an infinity, or whose `‖x‖²` overflows f32 (1e30), is routed nowhere
/// and counted; the finite rows beside it are routed as usual.
fn non_finite_rows<T: FloatElement>() {
    let shape = CodebookShape {
        tokens: 7,
        dim: 24,
        codes: 200,
    };
    let (mut x, codes) = inputs::<T>(&shape, 5);
    let d = shape.dim;
    x[..d].fill(f64::NAN);
    x[2 * d + 7] = f64::NAN;
    x[3 * d] = f64::INFINITY;
    x[4 * d + 3] = f64::NEG_INFINITY;
    x[5 * d + 1] = round::<T>(1e30);
    for device in devices() {
        for splits in [Some(1), Some(2)] {
            let config = NearestConfig {
                k: 4,
                splits,
                ..NearestConfig::default()
            };
            let got = run_nearest::<T>(&device, &shape, &config, &x, &codes);
            assert_eq!(got.nonfinite_rows, 5, "{}", T::NAME);
            for t in [0, 2, 3, 4, 5] {
                assert_eq!(&got.ids[4 * t..4 * t + 4], &[NO_EXPERT; 4], "{} row {t}", T::NAME);
            }
            for t in [1, 6] {
                assert!(got.ids[4 * t..4 * t + 4].iter().all(|&i| i >= 0), "{} row {t}", T::NAME);
            }
            check_found(T::NAME, &shape, &config, &x, &codes, &got);
        }
    }
}

#[test]
fn nan_and_inf_rows() {
    non_finite_rows::<f32>();
    non_finite_rows::<f16>();
    non_finite_rows::<bf16>();
}

#[test]
fn a_single_code() {
    let shape = CodebookShape {
        tokens: 67,
        dim: 9,
        codes: 1,
    };
    check_nearest::<f32>(&shape, &NearestConfig::default(), 1);
    check_nearest::<bf16>(&CodebookShape { dim: 16, ..shape }, &NearestConfig::default(), 2);
}

/// One launch unsplit, two split (the merge); never a host sync; experts = code mod E.
#[test]
fn nearest_launch_budget_and_no_host_sync() {
    let shape = CodebookShape {
        tokens: 33,
        dim: 16,
        codes: 1024,
    };
    let (x, codes) = inputs::<f16>(&shape, 9);
    for device in devices() {
        let xd = upload::<f16>(&device, &x);
        let cd = upload::<f16>(&device, &codes);
        let mut norms = zeros::<f32>(&device, shape.codes);
        for (splits, launches) in [(Some(1), 1), (Some(8), 2), (None, 2)] {
            let config = NearestConfig {
                k: 2,
                num_experts: 8,
                splits,
            };
            assert_eq!(config.launches(&shape), launches);
            let mut ids = zeros::<i32>(&device, shape.tokens * 2);
            let mut experts = zeros::<i32>(&device, shape.tokens * 2);
            let mut workspace = zeros::<u32>(&device, config.workspace_len(&shape).unwrap());
            let before = device.stats();
            codebook::code_norms(&device, &shape, &cd, &mut norms).unwrap();
            let out = NearestOutputs {
                ids: &mut ids,
                distances: None,
                experts: Some(&mut experts),
                weights: None,
                nonfinite_rows: None,
            };
            codebook::nearest(&device, &shape, &config, &xd, &cd, &norms, out, &mut workspace).unwrap();
            let after = device.stats();
            assert_eq!(after.host_syncs, before.host_syncs, "nearest synced the host");
            assert_eq!(after.launches - before.launches, 1 + launches as u64, "launches");
            let ids = device.download(&ids).unwrap();
            let experts = device.download(&experts).unwrap();
            assert!(ids.iter().zip(&experts).all(|(i, e)| i % 8 == *e));
        }
    }
}

/// Ids with two invalid entries (read as zero codes by quantize and the losses).
fn ids_for(shape: &CodebookShape, seed: u64) -> Vec<i32> {
    let mut rng = Rng::new(seed);
    let mut ids: Vec<i32> = (0..shape.tokens).map(|_| rng.below(shape.codes) as i32).collect();
    if shape.tokens > 3 {
        ids[1] = -1;
        ids[3] = shape.codes as i32;
    }
    ids
}

/// `v` in `T`, as a view `offset` elements into its buffer.
fn upload_at<T: FloatElement>(device: &Device, v: &[f64], offset: usize) -> AtOffset<T> {
    AtOffset::upload(
        device,
        &v.iter().map(|&v| T::from_f32(v as f32)).collect::<Vec<_>>(),
        offset,
    )
}

fn download_at<T: FloatElement>(device: &Device, b: &AtOffset<T>) -> Vec<f32> {
    b.download(device).into_iter().map(|v| v.to_f32()).collect()
}

/// Quantize, losses, code order and the loss backward on every device against the reference,
/// with every buffer a view at `off` (see [`view_offset`]).
fn train_ops<T: FloatElement>(shape: &CodebookShape, off: usize) {
    let (x, codes) = inputs::<T>(shape, 21);
    let ids = ids_for(shape, 4);
    let mut rng = Rng::new(8);
    let dmix = values::<T>(&mut rng, shape.x_len().unwrap(), 1e-3);
    let config = LossConfig::default();
    let tol = Tolerance::of::<T>();
    let (want_q, want_mix) = reference::quantize(shape, &x, &codes, &ids, 0.75);
    let want_losses = reference::losses(shape, &x, &codes, &ids, config.beta as f64);
    let (want_dx, want_dc) = reference::losses_backward(shape, &x, &codes, &ids, config.beta as f64, Some(&dmix));
    let name = format!("{} {shape:?}", T::NAME);
    for device in devices() {
        let at = |i| view_offset(off, i);
        let (xa, ca, ida) = (
            upload_at::<T>(&device, &x, at(0)),
            upload_at::<T>(&device, &codes, at(1)),
            AtOffset::upload(&device, &ids, at(2)),
        );
        let (xd, cd, idd) = (xa.view(), ca.view(), ida.view());
        let (mut qa, mut mixa) = (
            AtOffset::<T>::zeros(&device, shape.x_len().unwrap(), at(3)),
            AtOffset::<T>::zeros(&device, shape.x_len().unwrap(), at(4)),
        );
        let before = device.stats();
        let launches = || device.stats().launches;
        let (q, mix) = (&mut qa.view_mut(), &mut mixa.view_mut());
        codebook::quantize(&device, shape, &xd, &cd, &idd, 0.75, Some(q), Some(mix)).unwrap();
        assert_eq!(launches() - before.launches, 1, "{name}: quantize launches");
        let mut losses = AtOffset::<f32>::zeros(&device, 2, at(5));
        let mut wsa = AtOffset::<f32>::zeros(&device, codebook::losses_workspace_len::<T>(shape), at(6));
        let mut run_losses = |out: &mut AtOffset<f32>| {
            let start = launches();
            codebook::losses(
                &device,
                shape,
                &config,
                &xd,
                &cd,
                &idd,
                &mut out.view_mut(),
                &mut wsa.view_mut(),
            )
            .unwrap();
            assert_eq!(launches() - start, 2, "{name}: losses launches");
        };
        run_losses(&mut losses);
        let mut again = AtOffset::<f32>::zeros(&device, 2, at(7));
        run_losses(&mut again);
        let mut order = CodeOrder::alloc(&device, shape.tokens, shape.codes).unwrap();
        codebook::code_order(&device, &idd, &mut order).unwrap();
        let dmixa = upload_at::<T>(&device, &dmix, at(8));
        let dmixd = dmixa.view();
        let start = launches();
        let (mut dxa, mut dca) = (
            AtOffset::<T>::zeros(&device, shape.x_len().unwrap(), at(9)),
            AtOffset::<f32>::zeros(&device, shape.codebook_len().unwrap(), at(10)),
        );

        codebook::losses_backward(
            &device,
            shape,
            &config,
            &xd,
            &cd,
            &idd,
            &order,
            Some(&dmixd),
            &mut dxa.view_mut(),
            &mut dca.view_mut(),
        )
        .unwrap();
        assert_eq!(launches() - start, 2, "{name}: losses_backward launches");
        assert_eq!(
            device.stats().host_syncs,
            before.host_syncs,
            "{name}: a training op synced the host"
        );
        let bits = |b: &AtOffset<f32>| b.download(&device).iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        assert_eq!(
            bits(&losses),
            bits(&again),
            "{name}: losses are not bitwise reproducible"
        );

        let q_ref: Vec<f64> = want_q.iter().map(|&v| round::<T>(v)).collect();
        assert_close(
            &format!("{name} q"),
            &download_at(&device, &qa),
            &q_ref,
            Tolerance::F32.scaled(0.0),
        );
        assert_close(
            &format!("{name} mix"),
            &download_at(&device, &mixa),
            &want_mix,
            tol.scaled(2.0),
        );
        let reduction = Tolerance::F32.over(shape.x_len().unwrap()).scaled(10.0);
        assert_close(
            &format!("{name} losses"),
            &losses.download(&device),
            &want_losses,
            reduction,
        );
        let grad_scale = 2.0 / shape.x_len().unwrap() as f64;
        let grad_tol = Tolerance {
            atol: tol.atol * 1e-3 + grad_scale * 1e-4,
            rtol: tol.rtol * 2.0,
        };
        assert_close(&format!("{name} dx"), &download_at(&device, &dxa), &want_dx, grad_tol);
        let dc_tol = Tolerance {
            atol: grad_scale * 1e-5 * (shape.tokens as f64).sqrt(),
            rtol: 1e-4,
        };
        assert_close(&format!("{name} dC"), &dca.download(&device), &want_dc, dc_tol);
    }
}

#[test]
fn quantize_losses_and_gradients_match_reference() {
    for (tokens, dim, codes) in [(50, 19, 7), (9, 64, 40), (130, 8, 3)] {
        let shape = CodebookShape { tokens, dim, codes };
        train_ops::<f32>(&shape, 0);
        train_ops::<f16>(&shape, 0);
        train_ops::<bf16>(&shape, 0);
    }
}

/// The reference loss gradients are the derivatives of the reference losses (each loss only
/// through its un-stopped argument: the codebook loss through C, the commitment loss through
/// x), and the device's f32 gradients match them.
#[test]
fn gradients_match_finite_differences() {
    let shape = CodebookShape {
        tokens: 6,
        dim: 5,
        codes: 4,
    };
    let (x, codes) = inputs::<f32>(&shape, 31);
    let ids = ids_for(&shape, 2);
    let beta = 0.25;
    let (dx, dc) = reference::losses_backward(&shape, &x, &codes, &ids, beta, None);
    let h = 1e-6;
    let fd = |f: &dyn Fn(f64) -> f64| (f(h) - f(-h)) / (2.0 * h);
    let num_dx: Vec<f64> = (0..x.len())
        .map(|i| {
            fd(&|step| {
                let mut xs = x.clone();
                xs[i] += step;
                reference::losses(&shape, &xs, &codes, &ids, beta)[1]
            })
        })
        .collect();
    let num_dc: Vec<f64> = (0..codes.len())
        .map(|i| {
            fd(&|step| {
                let mut cs = codes.clone();
                cs[i] += step;
                reference::losses(&shape, &x, &cs, &ids, beta)[0]
            })
        })
        .collect();
    let as_f32 = |v: &[f64]| v.iter().map(|&v| v as f32).collect::<Vec<_>>();
    let fd_tol = Tolerance { atol: 1e-6, rtol: 1e-5 };
    assert_close("reference dx vs finite differences", &as_f32(&dx), &num_dx, fd_tol);
    assert_close("reference dC vs finite differences", &as_f32(&dc), &num_dc, fd_tol);
    for device in devices() {
        let (xd, cd, idd) = (
            upload::<f32>(&device, &x),
            upload::<f32>(&device, &codes),
            device.upload(&ids).unwrap(),
        );
        let mut order = CodeOrder::alloc(&device, shape.tokens, shape.codes).unwrap();
        codebook::code_order(&device, &idd, &mut order).unwrap();
        let (mut gx, mut gc) = (zeros::<f32>(&device, x.len()), zeros::<f32>(&device, codes.len()));
        let config = LossConfig { beta: beta as f32 };
        codebook::losses_backward(&device, &shape, &config, &xd, &cd, &idd, &order, None, &mut gx, &mut gc).unwrap();
        assert_close(
            "device dx vs finite differences",
            &device.download(&gx).unwrap(),
            &num_dx,
            fd_tol,
        );
        assert_close(
            "device dC vs finite differences",
            &device.download(&gc).unwrap(),
            &num_dc,
            fd_tol,
        );
    }
}

/// The order by code equals a host stable sort, invalid ids left out: one radix pass
/// (Nc <= 1024), two passes (Nc > 1024), and dispatch's tiled path (T > 4096).
#[test]
fn code_order_is_a_stable_sort_by_code() {
    for (tokens, codes) in [(0, 5), (1, 1), (300, 17), (700, 3000), (4500, 1500)] {
        let shape = CodebookShape { tokens, dim: 1, codes };
        let ids = ids_for(&shape, tokens as u64);
        let mut want_rows: Vec<i32> = (0..tokens as i32)
            .filter(|&t| (0..codes as i32).contains(&ids[t as usize]))
            .collect();
        want_rows.sort_by_key(|&t| ids[t as usize]);
        let valid = want_rows.len();
        want_rows.resize(tokens, -1);
        let want_offsets: Vec<i32> = (0..=codes)
            .map(|j| {
                want_rows[..valid]
                    .iter()
                    .filter(|&&t| (ids[t as usize] as usize) < j)
                    .count() as i32
            })
            .collect();
        for device in devices() {
            let idd = device.upload(&ids).unwrap();
            let mut order = CodeOrder::alloc(&device, tokens, codes).unwrap();
            // Poisoned, as a reused order holds the last step's: every element must be written.
            order.offsets = device.upload(&vec![i32::MIN; codes + 1]).unwrap();
            order.rows = device.upload(&vec![i32::MIN; tokens]).unwrap();
            let before = device.stats();
            codebook::code_order(&device, &idd, &mut order).unwrap();
            let after = device.stats();
            assert_eq!(after.host_syncs, before.host_syncs, "code_order synced the host");
            assert_eq!(
                after.launches - before.launches,
                order.launches() as u64,
                "code_order launches"
            );
            assert_eq!(
                device.download(&order.offsets).unwrap(),
                want_offsets,
                "T {tokens} Nc {codes}: offsets"
            );
            let rows = device.download(&order.rows).unwrap();
            assert_eq!(&rows[..valid], &want_rows[..valid], "T {tokens} Nc {codes}: rows");
        }
    }
}

/// The EMA update on every device against the reference, every buffer a view at `off`.
fn ema<T: FloatElement>(off: usize) {
    let shape = CodebookShape {
        tokens: 50,
        dim: 21,
        codes: 40,
    };
    let config = EmaConfig {
        decay: 0.9,
        eps: 1e-3,
        dead_threshold: 0.05,
    };
    let (x, _) = inputs::<T>(&shape, 41);
    let mut rng = Rng::new(6);
    // Codes 30.. get no tokens; codes 35.. also start at 0 (dead), 30..35 stay alive.
    let mut ids: Vec<i32> = (0..shape.tokens).map(|_| rng.below(30) as i32).collect();
    ids[7] = -3;
    let counts: Vec<f64> = (0..shape.codes)
        .map(|j| if j < 35 { 1.0 + j as f64 / 8.0 } else { 0.0 })
        .collect();
    let sums = values::<f32>(&mut rng, shape.codebook_len().unwrap(), 1.0);
    let want = reference::ema_update(&shape, &config, &x, &ids, &counts, &sums);
    assert!(want.dead[35..].iter().all(|&d| d) && !want.dead[..35].iter().any(|&d| d));
    let tol = Tolerance::F32.scaled(10.0);
    for device in devices() {
        let at = |i| view_offset(off, i);
        let xd = upload_at::<T>(&device, &x, at(0));
        let idd = AtOffset::upload(&device, &ids, at(1));
        let mut order = CodeOrder::alloc(&device, shape.tokens, shape.codes).unwrap();
        let (mut n, mut m) = (
            upload_at::<f32>(&device, &counts, at(2)),
            upload_at::<f32>(&device, &sums, at(3)),
        );
        let mut dead = AtOffset::<u8>::zeros(&device, shape.codes, at(4));
        let mut total = AtOffset::<f32>::zeros(&device, 1, at(5));
        let mut codes = AtOffset::<T>::zeros(&device, shape.codebook_len().unwrap(), at(6));
        let before = device.stats();
        codebook::code_order(&device, &idd.view(), &mut order).unwrap();
        let state = EmaState {
            counts: &mut n.view_mut(),
            sums: &mut m.view_mut(),
            dead: &mut dead.view_mut(),
            total: &mut total.view_mut(),
        };
        let start = device.stats().launches;
        codebook::ema_update(
            &device,
            &shape,
            &config,
            &xd.view(),
            &order,
            state,
            &mut codes.view_mut(),
        )
        .unwrap();
        assert_eq!(device.stats().launches - start, 2, "ema_update launches");
        assert_eq!(device.stats().host_syncs, before.host_syncs, "ema synced the host");
        let name = T::NAME;
        assert_close(&format!("{name} N"), &n.download(&device), &want.counts, tol);
        assert_close(&format!("{name} M"), &m.download(&device), &want.sums, tol);
        assert_close(&format!("{name} total"), &total.download(&device), &[want.total], tol);
        let want_codes: Vec<f64> = want.codes.iter().map(|&v| round::<T>(v)).collect();
        assert_close(
            &format!("{name} codes"),
            &download_at(&device, &codes),
            &want_codes,
            Tolerance::of::<T>(),
        );
        let dead: Vec<bool> = dead.download(&device).iter().map(|&d| d == 1).collect();
        assert_eq!(dead, want.dead, "{name} dead codes");
    }
}

#[test]
fn ema_update_matches_reference() {
    ema::<f32>(0);
    ema::<bf16>(0);
}

#[test]
fn nearest_refuses_bad_inputs() {
    let device = &devices()[0];
    let shape = CodebookShape {
        tokens: 3,
        dim: 5,
        codes: 12,
    };
    let (x, c) = (zeros::<f32>(device, 15), zeros::<f32>(device, 60));
    let ok = NearestConfig::default();
    let run = |shape: CodebookShape, config: NearestConfig, lens: [usize; 6]| {
        let (x2, c2, n2) = (
            zeros::<f32>(device, lens[0]),
            zeros::<f32>(device, lens[1]),
            zeros::<f32>(device, lens[2]),
        );
        let (mut ids, mut dist) = (zeros::<i32>(device, lens[3]), zeros::<f32>(device, lens[4]));
        let mut ws = zeros::<u32>(device, lens[5]);
        let out = NearestOutputs {
            ids: &mut ids,
            distances: Some(&mut dist),
            experts: None,
            weights: None,
            nonfinite_rows: None,
        };
        codebook::nearest(device, &shape, &config, &x2, &c2, &n2, out, &mut ws)
    };
    let good = [15, 60, 12, 3, 3, 0];
    run(shape, ok, good).unwrap();
    let with = |i: usize, v: usize| {
        let mut l = good;
        l[i] = v;
        l
    };
    assert_refused(device, "x", || run(shape, ok, with(0, 14)));
    assert_refused(device, "codes", || run(shape, ok, with(1, 61)));
    assert_refused(device, "norms", || run(shape, ok, with(2, 11)));
    assert_refused(device, "ids", || run(shape, ok, with(3, 4)));
    assert_refused(device, "distances", || run(shape, ok, with(4, 2)));
    assert_refused(device, "workspace", || run(shape, ok, with(5, 1)));
    for (argument, config) in [
        ("config.k", NearestConfig { k: 0, ..ok }),
        ("config.k", NearestConfig { k: 9, ..ok }),
        ("config.num_experts", NearestConfig { num_experts: 0, ..ok }),
        ("config.num_experts", NearestConfig { num_experts: 5, ..ok }),
        ("config.splits", NearestConfig { splits: Some(0), ..ok }),
        ("config.splits", NearestConfig { splits: Some(2), ..ok }),
    ] {
        assert_refused(device, argument, || run(shape, config, good));
    }
    let small = CodebookShape { codes: 2, ..shape };
    assert_refused(device, "config.k", || {
        run(small, NearestConfig { k: 3, ..ok }, [15, 10, 2, 9, 9, 0])
    });
    assert_refused(device, "shape.dim", || {
        run(CodebookShape { dim: 0, ..shape }, ok, [0, 0, 12, 3, 3, 0])
    });
    assert_refused(device, "shape.codes", || {
        run(CodebookShape { codes: 0, ..shape }, ok, [15, 0, 0, 3, 3, 0])
    });
    let (x16, c16) = (zeros::<f16>(device, 3 * 12), zeros::<f16>(device, 12 * 12));
    let (mut ids, mut ws) = (zeros::<i32>(device, 3), zeros::<u32>(device, 0));
    let out = NearestOutputs {
        ids: &mut ids,
        distances: None,
        experts: None,
        weights: None,
        nonfinite_rows: None,
    };
    let d12 = CodebookShape { dim: 12, ..shape };
    assert_refused(device, "shape.dim", || {
        codebook::nearest(device, &d12, &ok, &x16, &c16, &zeros::<f32>(device, 12), out, &mut ws)
    });
    let mut bad_norms = zeros::<f32>(device, 11);
    assert_refused(device, "norms", || {
        codebook::code_norms(device, &shape, &c, &mut bad_norms)
    });
    assert_refused(device, "codes", || {
        codebook::code_norms(device, &shape, &x, &mut bad_norms)
    });
}

#[test]
fn training_ops_refuse_bad_inputs() {
    let device = &devices()[0];
    let shape = CodebookShape {
        tokens: 4,
        dim: 3,
        codes: 5,
    };
    let (x, c) = (zeros::<f32>(device, 12), zeros::<f32>(device, 15));
    let (ids, short_ids) = (zeros::<i32>(device, 4), zeros::<i32>(device, 3));
    let (mut q, mut bad) = (zeros::<f32>(device, 12), zeros::<f32>(device, 11));
    assert_refused(device, "ids", || {
        codebook::quantize(device, &shape, &x, &c, &short_ids, 1.0, Some(&mut q), None)
    });
    assert_refused(device, "q", || {
        codebook::quantize(device, &shape, &x, &c, &ids, 1.0, None, None)
    });
    assert_refused(device, "mix", || {
        codebook::quantize(device, &shape, &x, &c, &ids, 1.0, None, Some(&mut bad))
    });
    assert_refused(device, "mix_coefficient", || {
        codebook::quantize(device, &shape, &x, &c, &ids, f32::NAN, Some(&mut q), None)
    });
    let (mut losses, mut ws) = (
        zeros::<f32>(device, 2),
        zeros::<f32>(device, codebook::losses_workspace_len::<f32>(&shape)),
    );
    let beta = LossConfig { beta: -1.0 };
    assert_refused(device, "config.beta", || {
        codebook::losses(device, &shape, &beta, &x, &c, &ids, &mut losses, &mut ws)
    });
    let ok = LossConfig::default();
    assert_refused(device, "losses", || {
        codebook::losses(device, &shape, &ok, &x, &c, &ids, &mut bad, &mut ws)
    });
    assert_refused(device, "workspace", || {
        codebook::losses(device, &shape, &ok, &x, &c, &ids, &mut losses, &mut bad)
    });
    let other = CodeOrder::alloc(device, 4, 6).unwrap();
    let order = CodeOrder::alloc(device, 4, 5).unwrap();
    let (mut dx, mut dc) = (zeros::<f32>(device, 12), zeros::<f32>(device, 15));
    assert_refused(device, "order", || {
        codebook::losses_backward(device, &shape, &ok, &x, &c, &ids, &other, None, &mut dx, &mut dc)
    });
    assert_refused(device, "dcodes", || {
        codebook::losses_backward(device, &shape, &ok, &x, &c, &ids, &order, None, &mut dx, &mut bad)
    });
    let mut order = order;
    assert_refused(device, "ids", || codebook::code_order(device, &short_ids, &mut order));
    let (mut n, mut m, mut dead, mut total) = (
        zeros::<f32>(device, 5),
        zeros::<f32>(device, 15),
        zeros::<u8>(device, 5),
        zeros::<f32>(device, 1),
    );
    let mut codes = zeros::<f32>(device, 15);
    let mut ema = |config: EmaConfig, n: &mut DeviceBuffer<f32>| {
        let state = EmaState {
            counts: n,
            sums: &mut m,
            dead: &mut dead,
            total: &mut total,
        };
        codebook::ema_update(device, &shape, &config, &x, &order, state, &mut codes)
    };
    let ema_ok = EmaConfig::default();
    assert_refused(device, "config.decay", || {
        ema(EmaConfig { decay: 1.0, ..ema_ok }, &mut n)
    });
    assert_refused(device, "config.eps", || ema(EmaConfig { eps: 0.0, ..ema_ok }, &mut n));
    assert_refused(device, "config.dead_threshold", || {
        ema(
            EmaConfig {
                dead_threshold: f32::INFINITY,
                ..ema_ok
            },
            &mut n,
        )
    });
    assert_refused(device, "state.counts", || ema(ema_ok, &mut zeros::<f32>(device, 4)));
    ema(ema_ok, &mut n).unwrap();
    assert_refused(device, "shape.codes", || {
        CodeOrder::alloc(device, 4, codebook::MAX_CODES + 1).map(drop)
    });
}

/// Every buffer a view at odd element offsets (cudarc sub-slices) and odd d: f32 everywhere
/// and the 16-bit row ops are right; 16-bit `nearest` (tensor cores) refuses X and C off
/// 16-byte alignment with an error naming them. Edge sizes: no tokens, one code.
mod unaligned {
    use super::*;

    #[test]
    fn row_ops_at_odd_offsets_and_odd_dims() {
        for (tokens, dim, codes) in [(37, 13, 6), (9, 24, 5)] {
            let shape = CodebookShape { tokens, dim, codes };
            for off in [1, 2] {
                train_ops::<f32>(&shape, off);
                train_ops::<bf16>(&shape, off);
            }
            train_ops::<f16>(&shape, 3);
        }
        ema::<f32>(1);
        ema::<f16>(3);
    }

    #[test]
    fn nearest_f32_at_odd_offsets_and_odd_dims() {
        for (tokens, dim, codes, k) in [(29, 7, 20, 3), (5, 33, 300, 1)] {
            let shape = CodebookShape { tokens, dim, codes };
            let config = NearestConfig {
                k,
                num_experts: 4,
                ..NearestConfig::default()
            };
            let (x, c) = inputs::<f32>(&shape, 70);
            for device in devices() {
                for off in [1, 2, 5] {
                    let got = run_nearest_at::<f32>(&device, &shape, &config, &x, &c, off).unwrap();
                    check_found(&format!("f32 at {off} {shape:?}"), &shape, &config, &x, &c, &got);
                }
            }
        }
    }

    fn nearest_16bit<T: FloatElement>() {
        let shape = CodebookShape {
            tokens: 21,
            dim: 16,
            codes: 70,
        };
        let config = NearestConfig {
            k: 2,
            num_experts: 5,
            ..NearestConfig::default()
        };
        let (x, c) = inputs::<T>(&shape, 71);
        for device in devices() {
            // X and C 16 bytes in (aligned), the outputs at odd elements: right.
            let xa = upload_at::<T>(&device, &x, 8);
            let ca = upload_at::<T>(&device, &c, 16);
            let mut norms = AtOffset::<f32>::zeros(&device, shape.codes, 3);
            codebook::code_norms(&device, &shape, &ca.view(), &mut norms.view_mut()).unwrap();
            let n = shape.tokens * config.k;
            let mut ids = AtOffset::<i32>::zeros(&device, n, 1);
            let mut distances = AtOffset::<f32>::zeros(&device, n, 5);
            let mut experts = AtOffset::<i32>::zeros(&device, n, 7);
            let mut workspace = AtOffset::<u32>::zeros(&device, config.workspace_len(&shape).unwrap(), 3);
            let mut weights = AtOffset::<f32>::zeros(&device, n, 9);
            let mut nonfinite = AtOffset::<u32>::zeros(&device, 1, 2);
            let out = NearestOutputs {
                ids: &mut ids.view_mut(),
                distances: Some(&mut distances.view_mut()),
                experts: Some(&mut experts.view_mut()),
                weights: Some(&mut weights.view_mut()),
                nonfinite_rows: Some(&mut nonfinite.view_mut()),
            };
            let (xv, cv, nv) = (xa.view(), ca.view(), norms.view());
            codebook::nearest(&device, &shape, &config, &xv, &cv, &nv, out, &mut workspace.view_mut()).unwrap();
            let got = Found {
                ids: ids.download(&device),
                distances: distances.download(&device),
                experts: experts.download(&device),
                weights: weights.download(&device),
                nonfinite_rows: nonfinite.download(&device)[0],
            };
            check_found(&format!("{} aligned inputs", T::NAME), &shape, &config, &x, &c, &got);
            // X or C off 16 bytes: refused, naming it.
            for (argument, x_off, c_off) in [("x", 1, 0), ("codes", 0, 3), ("x", 4, 4)] {
                let (xa, ca) = (upload_at::<T>(&device, &x, x_off), upload_at::<T>(&device, &c, c_off));
                let mut ws = AtOffset::<u32>::zeros(&device, config.workspace_len(&shape).unwrap(), 0);
                let mut ids = AtOffset::<i32>::zeros(&device, n, 0);
                let out = NearestOutputs {
                    ids: &mut ids.view_mut(),
                    distances: None,
                    experts: None,
                    weights: None,
                    nonfinite_rows: None,
                };
                let (xv, cv, nv) = (xa.view(), ca.view(), norms.view());
                assert_refused(&device, argument, || {
                    codebook::nearest(&device, &shape, &config, &xv, &cv, &nv, out, &mut ws.view_mut())
                });
            }
        }
    }

    #[test]
    fn nearest_16bit_outputs_at_any_offset_inputs_aligned_or_refused() {
        nearest_16bit::<f16>();
        nearest_16bit::<bf16>();
    }

    #[test]
    fn no_tokens_and_a_single_code() {
        for device in devices() {
            for (tokens, codes) in [(0, 5), (0, 1), (6, 1)] {
                let shape = CodebookShape { tokens, dim: 9, codes };
                let config = NearestConfig::default();
                let (x, c) = inputs::<f32>(&shape, 72);
                let got = run_nearest_at::<f32>(&device, &shape, &config, &x, &c, 1).unwrap();
                check_found(&format!("{shape:?}"), &shape, &config, &x, &c, &got);
                assert_eq!(got.ids.len(), tokens);
            }
        }
        train_ops::<bf16>(
            &CodebookShape {
                tokens: 7,
                dim: 9,
                codes: 1,
            },
            1,
        );
    }

    /// T = 0: every training op succeeds; the losses are NaN (means over nothing) and dC zero, as
    /// in the reference.
    #[test]
    fn training_ops_with_no_tokens() {
        let shape = CodebookShape {
            tokens: 0,
            dim: 9,
            codes: 4,
        };
        let config = LossConfig::default();
        for device in devices() {
            let (x, ids) = (
                AtOffset::<f32>::zeros(&device, 0, 1),
                AtOffset::<i32>::zeros(&device, 0, 1),
            );
            let codes = upload_at::<f32>(&device, &[1.0; 36], 1);
            let mut q = AtOffset::<f32>::zeros(&device, 0, 1);
            let (xv, cv, idv) = (x.view(), codes.view(), ids.view());
            codebook::quantize(&device, &shape, &xv, &cv, &idv, 1.0, Some(&mut q.view_mut()), None).unwrap();
            let mut losses = upload_at::<f32>(&device, &[7.0, 7.0], 1);
            let mut ws = AtOffset::<f32>::zeros(&device, codebook::losses_workspace_len::<f32>(&shape), 1);
            codebook::losses(
                &device,
                &shape,
                &config,
                &xv,
                &cv,
                &idv,
                &mut losses.view_mut(),
                &mut ws.view_mut(),
            )
            .unwrap();
            let mut order = CodeOrder::alloc(&device, 0, shape.codes).unwrap();
            codebook::code_order(&device, &idv, &mut order).unwrap();
            let mut dx = AtOffset::<f32>::zeros(&device, 0, 1);
            let mut dc = upload_at::<f32>(&device, &[7.0; 36], 1);
            let no_dmix = None;
            codebook::losses_backward(
                &device,
                &shape,
                &config,
                &xv,
                &cv,
                &idv,
                &order,
                no_dmix,
                &mut dx.view_mut(),
                &mut dc.view_mut(),
            )
            .unwrap();
            // A mean over no elements is NaN, as in the reference (and torch's mse_loss).
            let want = reference::losses(&shape, &[], &[1.0; 36], &[], config.beta as f64);
            assert!(want.iter().all(|v| v.is_nan()));
            assert_close("T = 0 losses", &losses.download(&device), &want, Tolerance::F32);
            let (_, want_dc) = reference::losses_backward(&shape, &[], &[1.0; 36], &[], config.beta as f64, None);
            assert_close("T = 0 dC", &dc.download(&device), &want_dc, Tolerance::F32);
            assert!(q.download(&device).is_empty() && dx.download(&device).is_empty());
        }
    }
}
