//! Permute, combine and their backward passes against the reference, for every dtype, on maps
//! the device built; determinism; out-of-range indices.
use super::common::{Rng, Tolerance, assert_close, devices};
use super::{device_map, random_ids, with_shuffled_schedule};
use half::{bf16, f16};
use moe_kernels::ops::FloatElement;
use moe_kernels::ops::dispatch::{self, Capacity, MapConfig};
use moe_kernels::reference::dispatch as reference;
use moe_kernels::{Device, DeviceBuffer};
use proptest::prelude::*;
use proptest::test_runner::FileFailurePersistence;

fn upload_as<T: FloatElement>(device: &Device, values: &[f32]) -> DeviceBuffer<T> {
    let stored: Vec<T> = values.iter().map(|&v| T::from_f32(v)).collect();
    device.upload(&stored).unwrap()
}

fn download_f32<T: FloatElement>(device: &Device, buffer: &DeviceBuffer<T>) -> Vec<f32> {
    device
        .download(buffer)
        .unwrap()
        .into_iter()
        .map(|v| v.to_f32())
        .collect()
}

/// Values as stored in T (what the kernels read), in f32.
fn rounded<T: FloatElement>(values: Vec<f32>) -> Vec<f32> {
    values.into_iter().map(|v| T::from_f32(v).to_f32()).collect()
}

/// Every row mover on one map, against the reference; the map itself comes from the device.
fn check_rows<T: FloatElement>(device: &Device, tokens: usize, k: usize, d: usize, config: &MapConfig, seed: u64) {
    let mut rng = Rng::new(seed);
    let ids = random_ids(&mut rng, tokens, k, config.num_experts);
    let map_host = device_map(device, &ids, tokens, k, config);
    let sorted_rows = device.upload(&map_host.sorted_rows).unwrap();
    let inverse = device.upload(&map_host.inverse).unwrap();
    let rows = map_host.sorted_rows.len();
    let x = rounded::<T>(rng.normals(tokens * d, 1.0));
    let yp = rounded::<T>(rng.normals(rows * d, 1.0));
    let residual = rounded::<T>(rng.normals(tokens * d, 1.0));
    let dy = rounded::<T>(rng.normals(tokens * d, 1.0));
    let weights: Vec<f32> = (0..tokens * k).map(|_| rng.uniform(0.0, 1.0)).collect();
    let (x_d, yp_d, res_d, dy_d) = (
        upload_as::<T>(device, &x),
        upload_as::<T>(device, &yp),
        upload_as::<T>(device, &residual),
        upload_as::<T>(device, &dy),
    );
    let w_d = device.upload(&weights).unwrap();
    let what = format!("{} {} T={tokens} k={k} d={d}", device.description(), T::NAME);
    let tol = Tolerance::of::<T>();
    let before = device.stats();

    let mut xp = device.alloc_zeros::<T>(rows * d).unwrap();
    dispatch::permute(device, &x_d, &sorted_rows, &inverse, tokens, k, d, &mut xp).unwrap();
    let want = reference::permute(&x, &map_host.sorted_rows, tokens, k, d);
    assert_close(
        &format!("permute {what}"),
        &download_f32(device, &xp),
        &want,
        Tolerance { atol: 0.0, rtol: 0.0 },
    );

    for (weighted, with_residual) in [(true, true), (true, false), (false, true), (false, false)] {
        let mut y = device.alloc_zeros::<T>(tokens * d).unwrap();
        dispatch::combine(
            device,
            &yp_d,
            &inverse,
            weighted.then_some(&w_d),
            with_residual.then_some(&res_d),
            tokens,
            k,
            d,
            &mut y,
        )
        .unwrap();
        let want = reference::combine(
            &yp,
            &map_host.inverse,
            weighted.then_some(&weights[..]),
            with_residual.then_some(&residual[..]),
            tokens,
            k,
            d,
        );
        assert_close(
            &format!("combine w={weighted} r={with_residual} {what}"),
            &download_f32(device, &y),
            &want,
            tol.over(k + 1),
        );
    }

    let mut dx = device.alloc_zeros::<T>(tokens * d).unwrap();
    dispatch::permute_backward(device, &yp_d, &inverse, tokens, k, d, &mut dx).unwrap();
    let want = reference::permute_backward(&yp, &map_host.inverse, tokens, k, d);
    assert_close(
        &format!("permute_backward {what}"),
        &download_f32(device, &dx),
        &want,
        tol.over(k),
    );

    for weighted in [true, false] {
        let mut dyp = device.alloc_zeros::<T>(rows * d).unwrap();
        let mut dw = device.upload(&vec![f32::NAN; tokens * k]).unwrap(); // every slot must be written
        dispatch::combine_backward(
            device,
            &dy_d,
            Some(&yp_d),
            &sorted_rows,
            &inverse,
            weighted.then_some(&w_d),
            tokens,
            k,
            d,
            &mut dyp,
            Some(&mut dw),
        )
        .unwrap();
        let w = weighted.then_some(&weights[..]);
        let (want_dyp, want_dw) = reference::combine_backward(&dy, &yp, &map_host.sorted_rows, w, tokens, k, d);
        assert_close(
            &format!("combine_backward dyp w={weighted} {what}"),
            &download_f32(device, &dyp),
            &want_dyp,
            tol,
        );
        assert_close(
            &format!("combine_backward dw {what}"),
            &device.download(&dw).unwrap(),
            &want_dw,
            Tolerance::F32.over(d),
        );
    }
    // dyp alone (weights applied by the GEMM epilogue, no dw)
    let mut dyp = device.alloc_zeros::<T>(rows * d).unwrap();
    let no_dw: Option<&mut DeviceBuffer<f32>> = None;
    let no_yp: Option<&DeviceBuffer<T>> = None;
    dispatch::combine_backward(
        device,
        &dy_d,
        no_yp,
        &sorted_rows,
        &inverse,
        Some(&w_d),
        tokens,
        k,
        d,
        &mut dyp,
        no_dw,
    )
    .unwrap();
    let (want_dyp, _) = reference::combine_backward(&dy, &yp, &map_host.sorted_rows, Some(&weights), tokens, k, d);
    assert_close(
        &format!("combine_backward dyp only {what}"),
        &download_f32(device, &dyp),
        &want_dyp,
        tol,
    );

    let after = device.stats();
    assert_eq!(after.launches - before.launches, 1 + 4 + 1 + 3, "one launch per row op");
}

#[test]
fn row_movers_match_reference_for_every_dtype() {
    for device in devices() {
        let config = MapConfig {
            align: 4,
            capacity: Some(Capacity {
                factor: 1.0,
                min_capacity: 2,
            }),
            local_experts: Some(1..7),
            ..MapConfig::new(8)
        };
        for (d, seed) in [(64, 1), (24, 2), (7, 3), (1, 4)] {
            check_rows::<f32>(&device, 37, 3, d, &config, seed);
            check_rows::<f16>(&device, 37, 3, d, &config, seed);
            check_rows::<bf16>(&device, 37, 3, d, &config, seed);
        }
        // A wide model dimension: the row spans many 16-byte chunks per lane.
        check_rows::<bf16>(&device, 3, 2, 16384, &MapConfig::new(4), 5);
        check_rows::<f32>(&device, 2, 2, 16384 + 4, &MapConfig::new(4), 6);
    }
}

proptest! {
    // Failing cases are saved beside this file (proptest cannot find it from a test's submodule).
    #![proptest_config(ProptestConfig {
        cases: 12,
        failure_persistence: Some(Box::new(FileFailurePersistence::Direct("tests/dispatch/rows.proptest-regressions"))),
        ..ProptestConfig::default()
    })]
    #[test]
    fn row_movers_match_reference(
        tokens in 0usize..40,
        experts in 1usize..12,
        k_pick in 1usize..5,
        d in prop::sample::select(vec![1usize, 2, 5, 8, 16, 40, 72, 130]),
        align in prop::sample::select(vec![1usize, 4, 16]),
        dtype in 0usize..3,
        seed in any::<u64>(),
    ) {
        let k = k_pick.min(experts);
        let config = MapConfig { align, ..MapConfig::new(experts) };
        for device in devices() {
            match dtype {
                0 => check_rows::<f32>(&device, tokens, k, d, &config, seed),
                1 => check_rows::<f16>(&device, tokens, k, d, &config, seed),
                _ => check_rows::<bf16>(&device, tokens, k, d, &config, seed),
            }
        }
    }
}

/// The row movers run twice on the same input give the same bits (on the emulator also under a
/// shuffled schedule), and none of them syncs the host.
#[test]
fn row_movers_are_deterministic_and_never_sync() {
    let (tokens, k, d) = (50, 4, 40);
    let config = MapConfig {
        align: 8,
        ..MapConfig::new(9)
    };
    let mut rng = Rng::new(31);
    let ids = random_ids(&mut rng, tokens, k, 9);
    let map_host = reference::routing_map(&ids, tokens, k, &config);
    let rows = map_host.sorted_rows.len();
    let (yp, dy) = (rng.normals(rows * d, 1.0), rng.normals(tokens * d, 1.0));
    let weights: Vec<f32> = (0..tokens * k).map(|_| rng.uniform(0.0, 1.0)).collect();
    // Bitwise equality holds per device (runs and emulator schedules), not across devices:
    // nvcc contracts a*b+c into FMAs, the emulator's host compiler need not.
    for device in devices() {
        let mut outputs: Vec<Vec<u32>> = vec![];
        for device in with_shuffled_schedule(&device) {
            let sorted_rows = device.upload(&map_host.sorted_rows).unwrap();
            let inverse = device.upload(&map_host.inverse).unwrap();
            let (yp_d, dy_d, w_d) = (
                device.upload(&yp).unwrap(),
                device.upload(&dy).unwrap(),
                device.upload(&weights).unwrap(),
            );
            for _ in 0..2 {
                let mut y = device.alloc_zeros::<f32>(tokens * d).unwrap();
                let mut xp = device.alloc_zeros::<f32>(rows * d).unwrap();
                let mut dyp = device.alloc_zeros::<f32>(rows * d).unwrap();
                let mut dw = device.alloc_zeros::<f32>(tokens * k).unwrap();
                let before = device.stats();
                dispatch::combine(&device, &yp_d, &inverse, Some(&w_d), Some(&dy_d), tokens, k, d, &mut y).unwrap();
                dispatch::permute(&device, &dy_d, &sorted_rows, &inverse, tokens, k, d, &mut xp).unwrap();
                dispatch::combine_backward(
                    &device,
                    &dy_d,
                    Some(&yp_d),
                    &sorted_rows,
                    &inverse,
                    Some(&w_d),
                    tokens,
                    k,
                    d,
                    &mut dyp,
                    Some(&mut dw),
                )
                .unwrap();
                assert_eq!(device.stats().host_syncs, before.host_syncs, "a row op synced the host");
                let bits = |b: &DeviceBuffer<f32>| -> Vec<u32> {
                    device.download(b).unwrap().iter().map(|v| v.to_bits()).collect()
                };
                outputs.push([bits(&y), bits(&xp), bits(&dyp), bits(&dw)].concat());
            }
        }
        assert!(
            outputs.windows(2).all(|w| w[0] == w[1]),
            "row movers differ between runs on {}",
            device.description()
        );
    }
}

/// sorted_rows and inverse live on the device; entries outside their valid range are treated
/// as -1 (no out-of-bounds access, which the ASan build would report). The valid entries are
/// one map's (the permute reads both).
#[test]
fn row_movers_ignore_out_of_range_indices() {
    let (tokens, k, d) = (4, 2, 8);
    let mut rng = Rng::new(8);
    let sorted = vec![3, -1, 8, 7, i32::MAX, 0, -7, 5];
    let inverse = vec![5, 8, -1, 0, i32::MIN, 7, 100, 3];
    let x = rng.normals(tokens * d, 1.0);
    let yp = rng.normals(sorted.len() * d, 1.0);
    for device in devices() {
        let (sorted_d, inverse_d) = (device.upload(&sorted).unwrap(), device.upload(&inverse).unwrap());
        let (x_d, yp_d) = (device.upload(&x).unwrap(), device.upload(&yp).unwrap());
        let mut xp = device.alloc_zeros::<f32>(sorted.len() * d).unwrap();
        dispatch::permute(&device, &x_d, &sorted_d, &inverse_d, tokens, k, d, &mut xp).unwrap();
        let want = reference::permute(&x, &sorted, tokens, k, d);
        assert_close(
            "permute",
            &device.download(&xp).unwrap(),
            &want,
            Tolerance { atol: 0.0, rtol: 0.0 },
        );
        let mut dx = device.alloc_zeros::<f32>(tokens * d).unwrap();
        dispatch::permute_backward(&device, &yp_d, &inverse_d, tokens, k, d, &mut dx).unwrap();
        let want = reference::permute_backward(&yp, &inverse, tokens, k, d);
        assert_close(
            "permute_backward",
            &device.download(&dx).unwrap(),
            &want,
            Tolerance::F32.over(k),
        );
    }
}

/// A token routed nowhere (slots not laid out, NaN weights: the router's non-finite row) gets a
/// NaN output row; a slot not laid out with a finite weight (dropped by capacity) adds nothing;
/// every other row is the reference's, with and without a residual, at both row widths.
#[test]
fn combine_marks_tokens_routed_nowhere() {
    let (tokens, k) = (4, 2);
    let mut rng = Rng::new(9);
    // Token 1 routed nowhere; token 2's second slot dropped; the others laid out.
    let inverse = vec![0, 1, -1, -1, 2, -1, 3, 4];
    let mut weights = rng.normals(tokens * k, 1.0);
    weights[2..4].fill(f32::NAN);
    for d in [8, 3] {
        let yp = rng.normals(5 * d, 1.0);
        let residual = rng.normals(tokens * d, 1.0);
        for device in devices() {
            let (yp_d, inverse_d) = (device.upload(&yp).unwrap(), device.upload(&inverse).unwrap());
            let (w_d, r_d) = (device.upload(&weights).unwrap(), device.upload(&residual).unwrap());
            for with_residual in [false, true] {
                let mut y = device.alloc_zeros::<f32>(tokens * d).unwrap();
                let r = with_residual.then_some(&r_d);
                dispatch::combine(&device, &yp_d, &inverse_d, Some(&w_d), r, tokens, k, d, &mut y).unwrap();
                let got = device.download(&y).unwrap();
                let r_host = with_residual.then_some(&residual[..]);
                let want = reference::combine(&yp, &inverse, Some(&weights), r_host, tokens, k, d);
                assert!(want[d..2 * d].iter().all(|v| v.is_nan()), "the reference marks token 1");
                assert!(
                    want[2 * d..3 * d].iter().all(|v| v.is_finite()),
                    "a dropped slot adds nothing"
                );
                assert_close("combine", &got, &want, Tolerance::F32.over(k));
            }
        }
    }
}
