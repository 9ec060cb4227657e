//! Every buffer a view at odd element offsets (what a cudarc user's sub-slices are): the
//! routing map from a view of ids into views, and every row mover with 16-bit rows 2 bytes off
//! 16-byte alignment, at d that would take the 16-byte path when aligned and at odd d, on every
//! device against the reference. Edge sizes: no tokens, one expert, k = E.
use super::common::{AtOffset, Rng, Tolerance, assert_close, devices, view_offset};
use super::random_ids;
use half::{bf16, f16};
use moe_kernels::Device;
use moe_kernels::ops::FloatElement;
use moe_kernels::ops::dispatch::{self, Capacity, MapConfig, MapPath, RoutingMap};
use moe_kernels::reference::dispatch as reference;

/// The routing map built from a view of `ids` into views (argument i at `view_offset(offset, i)`).
fn map_at(
    device: &Device,
    ids: &[i32],
    tokens: usize,
    k: usize,
    config: &MapConfig,
    offset: usize,
) -> reference::RoutingMap {
    let at = |i| view_offset(offset, i);
    let local = config.local_count();
    let ids_d = AtOffset::upload(device, ids, at(0));
    let mut counts = AtOffset::<i32>::zeros(device, local, at(1));
    let mut offsets = AtOffset::<i32>::zeros(device, local + 1, at(2));
    let mut sorted = AtOffset::<i32>::zeros(device, config.sorted_rows_len(tokens, k).unwrap(), at(3));
    let mut inverse = AtOffset::<i32>::zeros(device, tokens * k, at(4));
    let mut status = AtOffset::<i32>::zeros(device, 2, at(5));
    let mut workspace = AtOffset::<i32>::zeros(device, config.workspace_len(tokens, k).unwrap(), at(6));
    let mut map = RoutingMap {
        counts: counts.view_mut(),
        offsets: offsets.view_mut(),
        sorted_rows: sorted.view_mut(),
        inverse: inverse.view_mut(),
        status: status.view_mut(),
    };
    let before = device.stats().host_syncs;
    dispatch::routing_map(
        device,
        &ids_d.view(),
        tokens,
        k,
        config,
        &mut map,
        &mut workspace.view_mut(),
    )
    .unwrap();
    assert_eq!(device.stats().host_syncs, before, "routing_map synced the host");
    let status = status.download(device);
    reference::RoutingMap {
        counts: counts.download(device),
        offsets: offsets.download(device),
        sorted_rows: sorted.download(device),
        inverse: inverse.download(device),
        status: [status[0], status[1]],
    }
}

fn upload_at<T: FloatElement>(device: &Device, values: &[f32], offset: usize) -> AtOffset<T> {
    AtOffset::upload(
        device,
        &values.iter().map(|&v| T::from_f32(v)).collect::<Vec<_>>(),
        offset,
    )
}

fn download_f32<T: FloatElement>(device: &Device, b: &AtOffset<T>) -> Vec<f32> {
    b.download(device).into_iter().map(|v| v.to_f32()).collect()
}

/// Values as stored in T, in f32.
fn rounded<T: FloatElement>(values: Vec<f32>) -> Vec<f32> {
    values.into_iter().map(|v| T::from_f32(v).to_f32()).collect()
}

/// The map, permute, weighted combine with a residual, permute backward and combine backward
/// (with dw), every buffer a view at `offset`, against the reference.
fn rows_at<T: FloatElement>(device: &Device, tokens: usize, k: usize, d: usize, config: &MapConfig, offset: usize) {
    let mut rng = Rng::new((tokens * 131 + k * 17 + d) as u64);
    let at = |i| view_offset(offset, i);
    let ids = random_ids(&mut rng, tokens, k, config.num_experts);
    let map = map_at(device, &ids, tokens, k, config, offset);
    assert_eq!(
        map,
        reference::routing_map(&ids, tokens, k, config),
        "map at {offset} {config:?}"
    );
    let rows = map.sorted_rows.len();
    let x = rounded::<T>(rng.normals(tokens * d, 1.0));
    let yp = rounded::<T>(rng.normals(rows * d, 1.0));
    let residual = rounded::<T>(rng.normals(tokens * d, 1.0));
    let dy = rounded::<T>(rng.normals(tokens * d, 1.0));
    let weights: Vec<f32> = (0..tokens * k).map(|_| rng.uniform(0.0, 1.0)).collect();
    let (sorted_d, inverse_d) = (
        AtOffset::upload(device, &map.sorted_rows, at(0)),
        AtOffset::upload(device, &map.inverse, at(1)),
    );
    let (sorted_v, inverse_v) = (sorted_d.view(), inverse_d.view());
    let (x_d, yp_d, res_d, dy_d) = (
        upload_at::<T>(device, &x, at(2)),
        upload_at::<T>(device, &yp, at(3)),
        upload_at::<T>(device, &residual, at(4)),
        upload_at::<T>(device, &dy, at(5)),
    );
    let w_d = AtOffset::upload(device, &weights, at(6));
    let (yp_v, w_v) = (yp_d.view(), w_d.view());
    let what = format!(
        "{} {} T={tokens} k={k} d={d} at {offset}",
        device.description(),
        T::NAME
    );
    let tol = Tolerance::of::<T>();
    let (mut xp, mut y, mut dx, mut dyp) = (
        AtOffset::<T>::zeros(device, rows * d, at(7)),
        AtOffset::<T>::zeros(device, tokens * d, at(8)),
        AtOffset::<T>::zeros(device, tokens * d, at(9)),
        AtOffset::<T>::zeros(device, rows * d, at(10)),
    );
    let mut dw = AtOffset::upload(device, &vec![f32::NAN; tokens * k], at(11));
    let before = device.stats().host_syncs;
    dispatch::permute(
        device,
        &x_d.view(),
        &sorted_v,
        &inverse_v,
        tokens,
        k,
        d,
        &mut xp.view_mut(),
    )
    .unwrap();
    let res_v = res_d.view();
    dispatch::combine(
        device,
        &yp_v,
        &inverse_v,
        Some(&w_v),
        Some(&res_v),
        tokens,
        k,
        d,
        &mut y.view_mut(),
    )
    .unwrap();
    dispatch::permute_backward(device, &yp_v, &inverse_v, tokens, k, d, &mut dx.view_mut()).unwrap();
    dispatch::combine_backward(
        device,
        &dy_d.view(),
        Some(&yp_v),
        &sorted_v,
        &inverse_v,
        Some(&w_v),
        tokens,
        k,
        d,
        &mut dyp.view_mut(),
        Some(&mut dw.view_mut()),
    )
    .unwrap();
    assert_eq!(device.stats().host_syncs, before, "{what}: a row op synced the host");

    let want = reference::permute(&x, &map.sorted_rows, tokens, k, d);
    assert_close(
        &format!("permute {what}"),
        &download_f32(device, &xp),
        &want,
        Tolerance { atol: 0.0, rtol: 0.0 },
    );
    let want = reference::combine(&yp, &map.inverse, Some(&weights), Some(&residual), tokens, k, d);
    assert_close(
        &format!("combine {what}"),
        &download_f32(device, &y),
        &want,
        tol.over(k + 1),
    );
    let want = reference::permute_backward(&yp, &map.inverse, tokens, k, d);
    assert_close(
        &format!("permute_backward {what}"),
        &download_f32(device, &dx),
        &want,
        tol.over(k),
    );
    let (want_dyp, want_dw) = reference::combine_backward(&dy, &yp, &map.sorted_rows, Some(&weights), tokens, k, d);
    assert_close(
        &format!("combine_backward dyp {what}"),
        &download_f32(device, &dyp),
        &want_dyp,
        tol,
    );
    assert_close(
        &format!("combine_backward dw {what}"),
        &dw.download(device),
        &want_dw,
        Tolerance::F32.over(d),
    );
}

fn every_dtype(device: &Device, tokens: usize, k: usize, d: usize, config: &MapConfig, offset: usize) {
    rows_at::<f32>(device, tokens, k, d, config, offset);
    rows_at::<f16>(device, tokens, k, d, config, offset);
    rows_at::<bf16>(device, tokens, k, d, config, offset);
}

#[test]
fn rows_at_odd_offsets_on_vector_and_odd_widths() {
    let padded = MapConfig {
        align: 8,
        ..MapConfig::new(5)
    };
    for device in devices() {
        for d in [8, 64, 13] {
            for offset in [1, 2, 3] {
                every_dtype(&device, 21, 2, d, &padded, offset);
            }
        }
    }
}

#[test]
fn maps_at_odd_offsets_on_both_paths_with_capacity() {
    let tiled = MapConfig {
        path: MapPath::Tiled { tile_slots: 256 },
        ..MapConfig::new(7)
    };
    let capped = MapConfig {
        capacity: Some(Capacity {
            factor: 0.7,
            min_capacity: 1,
        }),
        ..tiled.clone()
    };
    for device in devices() {
        for config in [MapConfig::new(7), tiled.clone(), capped.clone()] {
            let ids = random_ids(&mut Rng::new(7), 300, 3, 7);
            let want = reference::routing_map(&ids, 300, 3, &config);
            assert_eq!(map_at(&device, &ids, 300, 3, &config, 1), want, "{config:?}");
        }
    }
}

#[test]
fn edge_sizes_no_tokens_one_expert_k_equals_e() {
    for device in devices() {
        every_dtype(&device, 0, 2, 16, &MapConfig::new(4), 1);
        every_dtype(&device, 9, 1, 16, &MapConfig::new(1), 3);
        every_dtype(&device, 11, 6, 24, &MapConfig::new(6), 1);
    }
}
