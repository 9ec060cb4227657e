//! Dispatch (SPEC §4) on every device against the CPU reference: routing maps exactly
//! (both map paths, capacity, padding, local ranges, invalid ids), permute / combine and their
//! backward passes within SPEC §9 tolerances, determinism, launch counts, no host syncs, bad
//! inputs, and 64-bit row offsets.
mod common;

use common::{Rng, Tolerance, assert_close, devices};
use half::{bf16, f16};
use moe_kernels::ops::FloatElement;
use moe_kernels::ops::dispatch::{
    self, Capacity, MapConfig, MapPath, RoutingMap, SMALL_MAP_MAX_SLOTS, STATUS_CAPACITY_DROPPED,
};
use moe_kernels::reference::dispatch as reference;
use moe_kernels::{Device, DeviceBuffer, Error};
use proptest::prelude::*;

const TILED_SMALL: MapPath = MapPath::Tiled { tile_slots: 256 };

/// The map the device builds, downloaded, after checking that building it launched `launches`
/// kernels (when given) and never synced the host.
fn device_map(device: &Device, ids: &[i32], tokens: usize, k: usize, config: &MapConfig) -> reference::RoutingMap {
    let ids_d = device.upload(ids).unwrap();
    let mut map = RoutingMap::alloc(device, tokens, k, config).unwrap();
    let mut workspace = device.alloc_zeros::<i32>(config.workspace_len(tokens, k)).unwrap();
    let before = device.stats();
    dispatch::routing_map(device, &ids_d, tokens, k, config, &mut map, &mut workspace).unwrap();
    let after = device.stats();
    assert_eq!(after.host_syncs, before.host_syncs, "routing_map synced the host");
    let expected_launches = match (config.tile_slots(tokens, k), config.capacity) {
        (None, _) => 1,
        (Some(_), None) => 2,
        (Some(_), Some(_)) => 4,
    };
    assert_eq!(
        after.launches - before.launches,
        expected_launches,
        "launches of routing_map"
    );
    let status = device.download(&map.status).unwrap();
    reference::RoutingMap {
        counts: device.download(&map.counts).unwrap(),
        offsets: device.download(&map.offsets).unwrap(),
        sorted_rows: device.download(&map.sorted_rows).unwrap(),
        inverse: device.download(&map.inverse).unwrap(),
        status: [status[0], status[1]],
    }
}

#[track_caller]
fn check_map(device: &Device, ids: &[i32], tokens: usize, k: usize, config: &MapConfig) -> reference::RoutingMap {
    let got = device_map(device, ids, tokens, k, config);
    let want = reference::routing_map(ids, tokens, k, config);
    assert_eq!(got, want, "{} T={tokens} k={k} {config:?}", device.description());
    got
}

/// Distinct experts per token (what a router produces), uniformly random.
fn random_ids(rng: &mut Rng, tokens: usize, k: usize, experts: usize) -> Vec<i32> {
    let mut ids = Vec::with_capacity(tokens * k);
    for _ in 0..tokens {
        let mut row: Vec<i32> = vec![];
        while row.len() < k {
            let e = rng.below(experts) as i32;
            if !row.contains(&e) {
                row.push(e);
            }
        }
        ids.extend(row);
    }
    ids
}

fn paths() -> [MapPath; 2] {
    [MapPath::SingleBlock, TILED_SMALL]
}

#[test]
fn map_edge_cases_match_reference() {
    let mut rng = Rng::new(11);
    for device in devices() {
        for path in paths() {
            let cfg = |e: usize| MapConfig {
                path,
                ..MapConfig::new(e)
            };
            check_map(&device, &[], 0, 2, &cfg(4)); // T = 0
            check_map(&device, &[3, 1], 1, 2, &cfg(4)); // one token
            check_map(&device, &vec![2; 300], 300, 1, &cfg(5)); // all tokens to one expert
            check_map(&device, &random_ids(&mut rng, 90, 3, 3), 90, 3, &cfg(3)); // k = E
            let sparse: Vec<i32> = (0..200).map(|t| [1, 6][t % 2]).collect(); // empty experts
            check_map(&device, &sparse, 100, 2, &cfg(8));
            let padded = MapConfig { align: 16, ..cfg(7) };
            check_map(&device, &random_ids(&mut rng, 70, 2, 7), 70, 2, &padded);
            let local = MapConfig {
                local_experts: Some(2..5),
                align: 4,
                ..cfg(9)
            };
            check_map(&device, &random_ids(&mut rng, 120, 3, 9), 120, 3, &local);
            let mut invalid = random_ids(&mut rng, 100, 2, 6);
            for (i, bad) in [(0, -1), (7, 6), (50, i32::MIN), (199, i32::MAX)] {
                invalid[i] = bad;
            }
            let map = check_map(&device, &invalid, 100, 2, &cfg(6));
            assert_eq!(map.status[dispatch::STATUS_INVALID_IDS], 4);
        }
    }
}

/// With heavy overflow, each expert keeps exactly the slots that come first in priority order
/// (j, then t), and the kept ones are laid out by source slot; checked directly, besides the
/// reference.
#[test]
fn capacity_keeps_the_priority_prefix() {
    let (tokens, k, experts) = (300, 3, 6);
    let mut rng = Rng::new(5);
    // Skewed: expert 0 and 1 are popular at every rank.
    let ids: Vec<i32> = (0..tokens)
        .flat_map(|_| {
            let mut row = vec![];
            while row.len() < k {
                let e = if rng.below(3) > 0 {
                    rng.below(2)
                } else {
                    rng.below(experts)
                } as i32;
                if !row.contains(&e) {
                    row.push(e);
                }
            }
            row
        })
        .collect();
    for device in devices() {
        for path in paths() {
            for local_experts in [None, Some(1..4)] {
                let config = MapConfig {
                    capacity: Some(Capacity {
                        factor: 0.6,
                        min_capacity: 4,
                    }),
                    local_experts: local_experts.clone(),
                    align: 8,
                    path,
                    ..MapConfig::new(experts)
                };
                let cap = config.capacity_per_expert(tokens, k).unwrap();
                let map = check_map(&device, &ids, tokens, k, &config);
                assert!(map.status[STATUS_CAPACITY_DROPPED] > 0, "the test must overflow");
                for (local, e) in config.local_range().enumerate() {
                    let priority = |s: usize| (s % k, s / k);
                    let mine: Vec<usize> = (0..tokens * k).filter(|&s| ids[s] == e as i32).collect();
                    let kept: Vec<usize> = mine.iter().copied().filter(|&s| map.inverse[s] >= 0).collect();
                    assert_eq!(kept.len(), mine.len().min(cap), "expert {e}");
                    assert_eq!(map.counts[local] as usize, kept.len());
                    let last_kept = kept.iter().map(|&s| priority(s)).max();
                    for &s in mine.iter().filter(|&&s| map.inverse[s] < 0) {
                        assert!(
                            Some(priority(s)) > last_kept,
                            "expert {e}: slot {s} dropped before a kept one"
                        );
                    }
                    let start = map.offsets[local] as usize;
                    let rows: Vec<usize> = map.sorted_rows[start..start + kept.len()]
                        .iter()
                        .map(|&s| s as usize)
                        .collect();
                    assert_eq!(rows, kept, "expert {e}: kept slots by source slot");
                }
            }
        }
    }
}

/// The largest E and k (the most buckets: shared memory per block at its maximum), and a
/// long prompt (T = 2^20: hundreds of tiles), on both paths where they apply.
#[test]
fn map_at_the_size_limits() {
    let mut rng = Rng::new(23);
    for device in devices() {
        let (tokens, k, experts) = (100, dispatch::MAX_TOP_K, dispatch::MAX_EXPERTS);
        let ids = random_ids(&mut rng, tokens, k, experts);
        for path in paths() {
            for capacity in [
                None,
                Some(Capacity {
                    factor: 0.5,
                    min_capacity: 1,
                }),
            ] {
                let config = MapConfig {
                    capacity,
                    align: 8,
                    path,
                    ..MapConfig::new(experts)
                };
                check_map(&device, &ids, tokens, k, &config);
            }
        }
        let (tokens, k, experts) = (1 << 20, 2, 16);
        let ids = random_ids(&mut rng, tokens, k, experts);
        let capacity = Some(Capacity {
            factor: 1.0,
            min_capacity: 0,
        });
        check_map(
            &device,
            &ids,
            tokens,
            k,
            &MapConfig {
                capacity,
                align: 128,
                ..MapConfig::new(experts)
            },
        );
    }
}

#[test]
fn auto_path_boundary_between_single_block_and_tiles() {
    let mut rng = Rng::new(3);
    let k = 4;
    for device in devices() {
        for tokens in [SMALL_MAP_MAX_SLOTS / k, SMALL_MAP_MAX_SLOTS / k + 1] {
            let ids = random_ids(&mut rng, tokens, k, 37);
            for capacity in [
                None,
                Some(Capacity {
                    factor: 1.0,
                    min_capacity: 0,
                }),
            ] {
                let config = MapConfig {
                    capacity,
                    align: 8,
                    ..MapConfig::new(37)
                };
                assert_eq!(
                    config.tile_slots(tokens, k).is_none(),
                    tokens * k <= SMALL_MAP_MAX_SLOTS
                );
                check_map(&device, &ids, tokens, k, &config);
            }
        }
    }
}

/// Same input twice: bitwise-equal maps; on the emulator also under a shuffled schedule.
#[test]
fn map_is_deterministic() {
    let mut rng = Rng::new(17);
    let (tokens, k) = (700, 4);
    let ids = random_ids(&mut rng, tokens, k, 50);
    let mut runs = vec![];
    for device in devices() {
        let mut variants = vec![device.clone()];
        #[cfg(feature = "emulator")]
        if let Device::Emulator(emu) = &device {
            use moe_kernels::device::Schedule;
            variants.push(Device::Emulator(emu.with_schedule(Schedule::Random { seed: 99 })));
        }
        for d in variants {
            for path in paths() {
                let config = MapConfig {
                    capacity: Some(Capacity {
                        factor: 1.0,
                        min_capacity: 0,
                    }),
                    align: 4,
                    path,
                    ..MapConfig::new(50)
                };
                runs.push(device_map(&d, &ids, tokens, k, &config));
                runs.push(device_map(&d, &ids, tokens, k, &config));
            }
        }
    }
    assert!(runs.windows(2).all(|w| w[0] == w[1]), "maps differ between runs");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]
    #[test]
    fn map_matches_reference(
        experts in 1usize..70,
        k_pick in 1usize..6,
        tokens in 0usize..260,
        align in prop::sample::select(vec![1usize, 2, 3, 8, 32]),
        local_pick in prop::option::of((0usize..70, 1usize..70)),
        capacity in prop::option::of((0.0f64..2.0, 0usize..5)),
        tiled in any::<bool>(),
        invalid_every in prop::option::of(5usize..40),
        seed in any::<u64>(),
    ) {
        let k = k_pick.min(experts);
        let mut rng = Rng::new(seed);
        let mut ids = random_ids(&mut rng, tokens, k, experts);
        if let Some(every) = invalid_every {
            for i in (0..ids.len()).step_by(every) {
                ids[i] = if i % 2 == 0 { -3 } else { experts as i32 + i as i32 };
            }
        }
        let local_experts = local_pick.map(|(a, len)| {
            let begin = a % experts;
            begin..(begin + len).min(experts)
        });
        let config = MapConfig {
            local_experts,
            align,
            capacity: capacity.map(|(factor, min_capacity)| Capacity { factor, min_capacity }),
            path: if tiled { TILED_SMALL } else { MapPath::SingleBlock },
            ..MapConfig::new(experts)
        };
        for device in devices() {
            check_map(&device, &ids, tokens, k, &config);
        }
    }
}

// ------------------------------------------------------------------------------------------
// Row movers.

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
    dispatch::permute(device, &x_d, &sorted_rows, tokens, k, d, &mut xp).unwrap();
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
    #![proptest_config(ProptestConfig { cases: 12, ..ProptestConfig::default() })]
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
    let mut outputs: Vec<Vec<u32>> = vec![];
    for device in devices() {
        let mut variants = vec![device.clone()];
        #[cfg(feature = "emulator")]
        if let Device::Emulator(emu) = &device {
            use moe_kernels::device::Schedule;
            variants.push(Device::Emulator(emu.with_schedule(Schedule::Random { seed: 7 })));
        }
        for device in variants {
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
                dispatch::permute(&device, &dy_d, &sorted_rows, tokens, k, d, &mut xp).unwrap();
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
    }
    assert!(
        outputs.windows(2).all(|w| w[0] == w[1]),
        "row movers differ between runs"
    );
}

/// sorted_rows and inverse live on the device; entries outside their valid range are treated
/// as -1 (no out-of-bounds access, which the ASan build would report).
#[test]
fn row_movers_ignore_out_of_range_indices() {
    let (tokens, k, d) = (4, 2, 8);
    let mut rng = Rng::new(8);
    let sorted = vec![3, -1, 8, 7, i32::MAX, 0, -7, 5];
    let inverse = vec![0, 8, -1, 2, i32::MIN, 5, 100, 7];
    let x = rng.normals(tokens * d, 1.0);
    let yp = rng.normals(sorted.len() * d, 1.0);
    for device in devices() {
        let (sorted_d, inverse_d) = (device.upload(&sorted).unwrap(), device.upload(&inverse).unwrap());
        let (x_d, yp_d) = (device.upload(&x).unwrap(), device.upload(&yp).unwrap());
        let mut xp = device.alloc_zeros::<f32>(sorted.len() * d).unwrap();
        dispatch::permute(&device, &x_d, &sorted_d, tokens, k, d, &mut xp).unwrap();
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

// ------------------------------------------------------------------------------------------
// Bad inputs: every validation error names its argument, and nothing is launched.

fn argument_of(e: Error) -> &'static str {
    match e {
        Error::Shape { argument, .. } | Error::InvalidArgument { argument, .. } => argument,
        other => panic!("unexpected error {other}"),
    }
}

#[test]
fn bad_map_inputs_are_errors_naming_the_argument() {
    for device in devices() {
        let (tokens, k) = (10, 2);
        let good = MapConfig::new(4);
        let ids = device.upload(&vec![0i32; tokens * k]).unwrap();
        let run = |config: &MapConfig, ids: &DeviceBuffer<i32>, tokens: usize, k: usize| {
            let mut map = RoutingMap::alloc(&device, tokens, k, &good).unwrap();
            let mut ws = device.alloc_zeros::<i32>(good.workspace_len(tokens, k)).unwrap();
            let launches = device.stats().launches;
            let e = dispatch::routing_map(&device, ids, tokens, k, config, &mut map, &mut ws).unwrap_err();
            assert_eq!(device.stats().launches, launches, "launched despite {e}");
            argument_of(e)
        };
        let with = |f: &dyn Fn(&mut MapConfig)| {
            let mut c = good.clone();
            f(&mut c);
            c
        };
        assert_eq!(run(&with(&|c| c.num_experts = 0), &ids, tokens, k), "num_experts");
        assert_eq!(run(&with(&|c| c.num_experts = 1025), &ids, tokens, k), "num_experts");
        assert_eq!(run(&with(&|c| c.align = 0), &ids, tokens, k), "align");
        assert_eq!(
            run(&with(&|c| c.local_experts = Some(2..2)), &ids, tokens, k),
            "local_experts"
        );
        assert_eq!(
            run(&with(&|c| c.local_experts = Some(1..5)), &ids, tokens, k),
            "local_experts"
        );
        let nan = Capacity {
            factor: f64::NAN,
            min_capacity: 0,
        };
        assert_eq!(
            run(&with(&|c| c.capacity = Some(nan)), &ids, tokens, k),
            "capacity.factor"
        );
        assert_eq!(
            run(&with(&|c| c.path = MapPath::Tiled { tile_slots: 100 }), &ids, tokens, k),
            "path.tile_slots"
        );
        assert_eq!(run(&good, &ids, tokens, 5), "k"); // k > E
        assert_eq!(run(&good, &ids, tokens, 0), "k");
        assert_eq!(run(&good, &ids, tokens + 1, k), "ids");
        // Output buffers of the wrong length, one at a time (the map was sized for `good`).
        let padded = with(&|c| c.align = 4);
        assert_eq!(run(&padded, &ids, tokens, k), "sorted_rows");
        let local = with(&|c| c.local_experts = Some(0..3));
        assert_eq!(run(&local, &ids, tokens, k), "counts");
        let mut map = RoutingMap::alloc(&device, tokens, k, &good).unwrap();
        let mut ws = device.alloc_zeros::<i32>(good.workspace_len(tokens, k)).unwrap();
        map.inverse = device.alloc_zeros(3).unwrap();
        let e = dispatch::routing_map(&device, &ids, tokens, k, &good, &mut map, &mut ws).unwrap_err();
        assert_eq!(argument_of(e), "inverse");
        let mut map = RoutingMap::alloc(&device, tokens, k, &good).unwrap();
        map.offsets = device.alloc_zeros(4).unwrap();
        let e = dispatch::routing_map(&device, &ids, tokens, k, &good, &mut map, &mut ws).unwrap_err();
        assert_eq!(argument_of(e), "offsets");
        let mut map = RoutingMap::alloc(&device, tokens, k, &good).unwrap();
        map.status = device.alloc_zeros(1).unwrap();
        let e = dispatch::routing_map(&device, &ids, tokens, k, &good, &mut map, &mut ws).unwrap_err();
        assert_eq!(argument_of(e), "status");
        let tiled = with(&|c| c.path = TILED_SMALL);
        let mut map = RoutingMap::alloc(&device, tokens, k, &good).unwrap();
        let e = dispatch::routing_map(&device, &ids, tokens, k, &tiled, &mut map, &mut ws).unwrap_err();
        assert_eq!(argument_of(e), "workspace");
        // T·k beyond i32: refused before any buffer is looked at.
        let mut map = RoutingMap::alloc(&device, tokens, k, &good).unwrap();
        let e = dispatch::routing_map(&device, &ids, 1 << 30, k, &good, &mut map, &mut ws).unwrap_err();
        assert_eq!(argument_of(e), "tokens");
    }
}

#[test]
fn bad_row_inputs_are_errors_naming_the_argument() {
    let (tokens, k, d) = (5, 2, 8);
    for device in devices() {
        let f = |n: usize| device.alloc_zeros::<f32>(n).unwrap();
        let i = |n: usize| device.alloc_zeros::<i32>(n).unwrap();
        let (x, sorted, inverse, w) = (f(tokens * d), i(12), i(tokens * k), f(tokens * k));
        let launches = device.stats().launches;
        let permute = |x: &DeviceBuffer<f32>, xp_len: usize, k: usize, d: usize| {
            let mut xp = f(xp_len);
            argument_of(dispatch::permute(&device, x, &sorted, tokens, k, d, &mut xp).unwrap_err())
        };
        assert_eq!(permute(&x, 12 * d, 0, d), "k");
        assert_eq!(permute(&x, 12 * d, 33, d), "k");
        assert_eq!(permute(&x, 0, k, 0), "d");
        assert_eq!(permute(&f(3), 12 * d, k, d), "x");
        assert_eq!(permute(&x, 11 * d, k, d), "xp");
        let combine =
            |inverse: &DeviceBuffer<i32>, w: &DeviceBuffer<f32>, r: &DeviceBuffer<f32>, y_len: usize, yp_len: usize| {
                let (mut y, yp) = (f(y_len), f(yp_len));
                argument_of(
                    dispatch::combine(&device, &yp, inverse, Some(w), Some(r), tokens, k, d, &mut y).unwrap_err(),
                )
            };
        assert_eq!(combine(&i(3), &w, &x, tokens * d, 12 * d), "inverse");
        assert_eq!(combine(&inverse, &f(3), &x, tokens * d, 12 * d), "weights");
        assert_eq!(combine(&inverse, &w, &f(3), tokens * d, 12 * d), "residual");
        assert_eq!(combine(&inverse, &w, &x, 3, 12 * d), "y");
        assert_eq!(combine(&inverse, &w, &x, tokens * d, 12 * d + 1), "yp");
        let mut dx = f(3);
        let e = dispatch::permute_backward(&device, &f(12 * d), &inverse, tokens, k, d, &mut dx).unwrap_err();
        assert_eq!(argument_of(e), "dx");
        let bwd = |dy_len: usize, yp: Option<&DeviceBuffer<f32>>, dyp_len: usize, dw_len: Option<usize>| {
            let (dy, mut dyp) = (f(dy_len), f(dyp_len));
            let mut dw = dw_len.map(f);
            argument_of(
                dispatch::combine_backward(
                    &device,
                    &dy,
                    yp,
                    &sorted,
                    &inverse,
                    Some(&w),
                    tokens,
                    k,
                    d,
                    &mut dyp,
                    dw.as_mut(),
                )
                .unwrap_err(),
            )
        };
        let yp = f(12 * d);
        assert_eq!(bwd(3, Some(&yp), 12 * d, Some(tokens * k)), "dy");
        assert_eq!(bwd(tokens * d, Some(&yp), 3, Some(tokens * k)), "dyp");
        assert_eq!(bwd(tokens * d, Some(&f(3)), 12 * d, Some(tokens * k)), "yp");
        assert_eq!(bwd(tokens * d, None, 12 * d, Some(tokens * k)), "yp");
        assert_eq!(bwd(tokens * d, Some(&yp), 12 * d, Some(3)), "dw");
        assert_eq!(device.stats().launches, launches, "a rejected call launched");
    }
}

// ------------------------------------------------------------------------------------------
// 64-bit offsets: T·k·d > 2^31 elements in the permuted rows.

/// The rows of a buffer as f32, without a copy on the emulator (the permuted buffer is 4 GiB).
fn with_host_view<T: FloatElement, R>(device: &Device, buffer: &DeviceBuffer<T>, f: impl FnOnce(&[T]) -> R) -> R {
    match buffer {
        DeviceBuffer::Host(h) => f(h.as_slice()),
        DeviceBuffer::Cuda(_) => f(&device.download(buffer).unwrap()),
    }
}

#[test]
fn permute_and_combine_use_64_bit_row_offsets() {
    // rows · d = (2^23 + 32) · 256 > 2^31: Xp is 4 GiB of bf16.
    let (k, d) = (32usize, 256usize);
    let tokens = (1usize << 18) + 1;
    let slots = tokens * k;
    assert!(slots * d > 1 << 31);
    // A map with every slot kept: token-major rows reversed within each block of 8 rows, so
    // the gather really permutes.
    let sorted_rows: Vec<i32> = (0..slots).map(|r| (r ^ 7) as i32).collect();
    let mut inverse = vec![0i32; slots];
    for (r, &s) in sorted_rows.iter().enumerate() {
        inverse[s as usize] = r as i32;
    }
    let value = |t: usize, c: usize| ((t * 31 + c * 7) % 251) as f32 - 125.0; // exact in bf16
    let token_row = |t: usize| -> Vec<f32> { (0..d).map(|c| value(t, c)).collect() };
    for device in devices() {
        let x: Vec<bf16> = (0..tokens * d).map(|i| bf16::from_f32(value(i / d, i % d))).collect();
        let x_d = device.upload(&x).unwrap();
        drop(x);
        let sorted_d = device.upload(&sorted_rows).unwrap();
        let inverse_d = device.upload(&inverse).unwrap();
        let mut xp = device.alloc_zeros::<bf16>(slots * d).unwrap();
        dispatch::permute(&device, &x_d, &sorted_d, tokens, k, d, &mut xp).unwrap();
        // Rows spread over the buffer, the last ones past 2^31 elements included.
        let sample: Vec<usize> = (0..64).map(|i| i * (slots / 64) + i).chain(slots - 9..slots).collect();
        with_host_view(&device, &xp, |xp| {
            for &r in &sample {
                let got: Vec<f32> = xp[r * d..(r + 1) * d].iter().map(|v| v.to_f32()).collect();
                assert_eq!(got, token_row(sorted_rows[r] as usize / k), "row {r}");
            }
        });
        // The combine reads the rows back through inverse: y[t] = sum_j xp[inverse[t, j]] + x[t],
        // and every one of those rows is x[t].
        let mut y = device.alloc_zeros::<bf16>(tokens * d).unwrap();
        let no_weights: Option<&DeviceBuffer<f32>> = None;
        dispatch::combine(&device, &xp, &inverse_d, no_weights, Some(&x_d), tokens, k, d, &mut y).unwrap();
        drop(xp);
        let y = device.download(&y).unwrap();
        for t in (0..tokens).step_by(tokens / 61).chain(tokens - 3..tokens) {
            let got: Vec<f32> = y[t * d..(t + 1) * d].iter().map(|v| v.to_f32()).collect();
            let want = reference::combine(&token_row(t), &vec![0; k], None, Some(&token_row(t)), 1, k, d);
            assert_close(&format!("combine row {t}"), &got, &want, Tolerance::BF16);
        }
    }
}
