//! The routing map against the reference: edge cases, capacity priority, size limits, the
//! boundary between the two map paths, determinism, random configurations.
use super::common::{Rng, devices};
use super::{check_map, device_map, random_ids, reference, with_shuffled_schedule};
use moe_kernels::ops::dispatch::{self, Capacity, MapConfig, MapPath, SMALL_MAP_MAX_SLOTS, STATUS_CAPACITY_DROPPED};
use moe_kernels::ops::router;
use proptest::prelude::*;
use proptest::test_runner::FileFailurePersistence;

const TILED_SMALL: MapPath = MapPath::Tiled { tile_slots: 256 };

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
            for (i, bad) in [(3, -2), (7, 6), (50, i32::MIN), (199, i32::MAX)] {
                invalid[i] = bad;
            }
            // A token routed nowhere (the router's mark of a non-finite row): laid out nowhere,
            // not an invalid id.
            invalid[20..22].fill(router::NO_EXPERT);
            let map = check_map(&device, &invalid, 100, 2, &cfg(6));
            assert_eq!(map.status[dispatch::STATUS_INVALID_IDS], 4);
            assert_eq!(map.inverse[20..22], [-1, -1]);
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
/// long prompt (T > 2^20: hundreds of tiles), on both paths where they apply.
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
        let (tokens, k, experts) = ((1 << 20) + 1000, 2, 16); // 513 tiles: a partial batch in the scan
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
        for d in with_shuffled_schedule(&device) {
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
    // Failing cases are saved beside this file (proptest cannot find it from a test's submodule).
    #![proptest_config(ProptestConfig {
        cases: 24,
        failure_persistence: Some(Box::new(FileFailurePersistence::Direct("tests/dispatch/map.proptest-regressions"))),
        ..ProptestConfig::default()
    })]
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

/// `live_rows` marks exactly the tokens routed nowhere (first id NO_EXPERT) with -1, on every
/// device like the reference, at one and several blocks, and refuses a short `rows`.
#[test]
fn live_rows_mark_tokens_routed_nowhere() {
    let mut rng = Rng::new(4);
    for device in devices() {
        for (tokens, k) in [(0, 2), (1, 1), (300, 3)] {
            let mut ids = random_ids(&mut rng, tokens, k, 8);
            for t in (0..tokens).step_by(7) {
                ids[t * k..(t + 1) * k].fill(router::NO_EXPERT);
            }
            let ids_d = device.upload(&ids).unwrap();
            let mut rows = device.upload(&vec![i32::MIN; tokens]).unwrap();
            dispatch::live_rows(&device, &ids_d, tokens, k, &mut rows).unwrap();
            let want = reference::live_rows(&ids, tokens, k);
            assert_eq!(device.download(&rows).unwrap(), want, "T={tokens} k={k}");
            assert_eq!(want.iter().filter(|&&r| r < 0).count(), tokens.div_ceil(7));
        }
        let ids = device.upload(&[0i32; 4]).unwrap();
        let mut short = device.alloc_zeros::<i32>(1).unwrap();
        let err = dispatch::live_rows(&device, &ids, 2, 2, &mut short).unwrap_err();
        assert!(err.to_string().contains("rows"), "{err}");
    }
}
