//! The counted map: `router::select_counted` (selection + the map's counting pass, one launch)
//! then `dispatch::place_counted` (one launch) give the ids and weights of `router::select` and
//! the map of the CPU reference, bit for bit, whatever the tiling, local range and padding.
use super::bad_inputs::argument_of;
use super::common::{Rng, assert_refused, devices};
use super::download_map;
use moe_kernels::ops::dispatch::{self, Capacity, CountedMap, MapConfig, MapPath, RoutingMap};
use moe_kernels::ops::router::{self, RouterConfig, ScoreFunction};
use moe_kernels::reference::dispatch as reference;
use moe_kernels::{Device, DeviceBuffer, DeviceSliceMut};

/// What one counted selection produced, downloaded.
#[derive(Debug, PartialEq)]
struct Routed {
    ids: Vec<i32>,
    weights: Vec<u32>,
    nonfinite_rows: u32,
    map: reference::RoutingMap,
}

/// Logits `[T, E]`: normal, with a few rows holding a NaN and a few ties.
fn logits(rng: &mut Rng, tokens: usize, experts: usize) -> Vec<f32> {
    let mut z = rng.normals(tokens * experts, 1.0);
    for t in (0..tokens).step_by(97) {
        z[t * experts + rng.below(experts)] = f32::NAN;
    }
    for t in (5..tokens).step_by(89) {
        z[t * experts] = z[t * experts + experts - 1];
    }
    z
}

/// How [`route`] runs the counted map.
#[derive(Clone, Copy, PartialEq)]
enum Counted {
    /// Count, then place: the workspace must be all zeros after. `zeroed` is passed on (the
    /// count's memset skipped).
    Placed { zeroed: bool },
    /// Count only (from a zeroed workspace): the per-tile prefixes stay in the workspace.
    Unplaced,
}

/// With a `workspace`: select_counted (+ place_counted) on `device`, as `counted` says. Without:
/// the selection alone and the reference map of its ids (also the map returned when unplaced).
/// Asserts the launches, memsets and no host sync.
fn route<W: DeviceSliceMut<i32>>(
    device: &Device,
    router_config: &RouterConfig,
    map_config: &MapConfig,
    z: &[f32],
    workspace: Option<&mut W>,
    counted: Counted,
) -> Routed {
    let (zeroed, place) = match counted {
        Counted::Placed { zeroed } => (zeroed, true),
        Counted::Unplaced => (false, false),
    };
    let tokens = z.len() / router_config.experts;
    let k = router_config.k;
    let z = device.upload(z).unwrap();
    let mut ids = device.alloc_zeros::<i32>(tokens * k).unwrap();
    let mut weights = device.alloc_zeros::<f32>(tokens * k).unwrap();
    let mut nonfinite = device.alloc_zeros::<u32>(1).unwrap();
    let no_bias = None::<&DeviceBuffer<f32>>;
    let mut map = RoutingMap::alloc(device, tokens, k, map_config).unwrap();
    let counting = workspace.is_some();
    let mut target = workspace.map(|workspace| CountedMap {
        config: map_config,
        map: &mut map,
        workspace,
        zeroed,
    });
    let before = device.stats();
    router::select_counted(
        device,
        router_config,
        &z,
        no_bias,
        &mut ids,
        &mut weights,
        &mut nonfinite,
        target.as_mut(),
    )
    .unwrap();
    if let Some(target) = target.as_mut().filter(|_| place) {
        dispatch::place_counted(device, &ids, tokens, k, target).unwrap();
    }
    let after = device.stats();
    assert_eq!(
        after.launches - before.launches,
        1 + (counting && place) as u64,
        "launches"
    );
    assert_eq!(after.memsets - before.memsets, (counting && !zeroed) as u64, "memsets");
    assert_eq!(after.host_syncs, before.host_syncs, "host syncs");
    if let Some(target) = target.as_ref().filter(|_| place) {
        let workspace = device.download(&*target.workspace).unwrap();
        assert!(
            workspace.iter().all(|&v| v == 0),
            "the workspace after the map: {workspace:?}"
        );
    }
    let map = if counting && place {
        download_map(device, &map)
    } else {
        reference::routing_map(&device.download(&ids).unwrap(), tokens, k, map_config)
    };
    Routed {
        ids: device.download(&ids).unwrap(),
        weights: device.download(&weights).unwrap().iter().map(|w| w.to_bits()).collect(),
        nonfinite_rows: device.download(&nonfinite).unwrap()[0],
        map,
    }
}

#[test]
fn counted_map_matches_select_and_the_reference_map() {
    let mut rng = Rng::new(0xc0a7ed);
    // (T, k, map): one tile, several with a partial last tile, small tiles, an expert-parallel
    // range with padding, E past one warp's registers, a single token.
    let tiles = |tile_slots| MapPath::Tiled { tile_slots };
    let cases = [
        (37, 2, MapConfig::new(8)),
        (2051, 2, MapConfig::new(6)),
        (
            300,
            4,
            MapConfig {
                path: tiles(256),
                ..MapConfig::new(16)
            },
        ),
        (
            257,
            3,
            MapConfig {
                local_experts: Some(4..11),
                align: 8,
                path: tiles(512),
                ..MapConfig::new(16)
            },
        ),
        (
            129,
            8,
            MapConfig {
                local_experts: Some(0..150),
                align: 4,
                path: tiles(256),
                ..MapConfig::new(300)
            },
        ),
        (
            1,
            4,
            MapConfig {
                path: MapPath::SingleBlock,
                ..MapConfig::new(4)
            },
        ),
    ];
    for device in devices() {
        for (tokens, k, map_config) in &cases {
            let (tokens, k, experts) = (*tokens, *k, map_config.num_experts);
            let router_config = RouterConfig {
                experts,
                k,
                score: [ScoreFunction::Softmax, ScoreFunction::Sigmoid][rng.below(2)],
                ..RouterConfig::default()
            };
            let mut workspace = device
                .alloc_zeros::<i32>(map_config.counted_workspace_len(tokens, k).unwrap())
                .unwrap();
            // Twice on one workspace: the second map must not see the first one's counts. The
            // first count zeroes the workspace (a memset); the second trusts the first map to
            // have left it zeroed (none).
            for zeroed in [false, true] {
                let z = logits(&mut rng, tokens, experts);
                let got = route(
                    &device,
                    &router_config,
                    map_config,
                    &z,
                    Some(&mut workspace),
                    Counted::Placed { zeroed },
                );
                let want = route(
                    &device,
                    &router_config,
                    map_config,
                    &z,
                    None::<&mut DeviceBuffer<i32>>,
                    Counted::Unplaced,
                );
                assert_eq!(
                    got,
                    want,
                    "{} T={tokens} E={experts} k={k} {map_config:?}",
                    device.description()
                );
            }
        }
    }
}

/// T·k filling its tiles exactly (the tile count must not round up past them): the map is the
/// reference's, and nothing is written past the workspace, which ends where a guard begins.
#[test]
fn counted_map_stays_inside_its_workspace_when_the_tiles_are_full() {
    const GUARD: i32 = 0x5a5a_5a5a;
    let mut rng = Rng::new(0xf011);
    let (tokens, k, experts) = (256, 2, 16);
    let map_config = MapConfig {
        path: MapPath::Tiled { tile_slots: 256 },
        ..MapConfig::new(experts)
    };
    let router_config = RouterConfig {
        experts,
        k,
        ..RouterConfig::default()
    };
    let len = map_config.counted_workspace_len(tokens, k).unwrap();
    for device in devices() {
        let z = logits(&mut rng, tokens, experts);
        let mut guarded = device.upload(&vec![GUARD; len + 64]).unwrap();
        let got = {
            let mut workspace = guarded.slice_mut(..len).unwrap();
            route(
                &device,
                &router_config,
                &map_config,
                &z,
                Some(&mut workspace),
                Counted::Placed { zeroed: false },
            )
        };
        let want = route(
            &device,
            &router_config,
            &map_config,
            &z,
            None::<&mut DeviceBuffer<i32>>,
            Counted::Unplaced,
        );
        assert_eq!(got, want, "{}", device.description());
        let after = device.download(&guarded).unwrap();
        assert!(
            after[len..].iter().all(|&v| v == GUARD),
            "{}: the counted selection wrote past its workspace",
            device.description()
        );
    }
}

#[test]
fn bad_counted_maps_are_refused_before_any_launch() {
    let (tokens, experts, k) = (40, 8, 2);
    let router_config = RouterConfig {
        experts,
        k,
        ..RouterConfig::default()
    };
    let good = MapConfig::new(experts);
    for device in devices() {
        let z = device.upload(&vec![0.5f32; tokens * experts]).unwrap();
        let refused = |map_config: &MapConfig, workspace_len: usize| {
            let mut ids = device.alloc_zeros::<i32>(tokens * k).unwrap();
            let mut weights = device.alloc_zeros::<f32>(tokens * k).unwrap();
            let mut nonfinite = device.alloc_zeros::<u32>(1).unwrap();
            let mut map = RoutingMap::alloc(&device, tokens, k, &good).unwrap();
            let mut workspace = device.alloc_zeros::<i32>(workspace_len).unwrap();
            let mut target = CountedMap {
                config: map_config,
                map: &mut map,
                workspace: &mut workspace,
                zeroed: false,
            };
            let before = device.stats();
            let no_bias = None::<&DeviceBuffer<f32>>;
            let select = router::select_counted(
                &device,
                &router_config,
                &z,
                no_bias,
                &mut ids,
                &mut weights,
                &mut nonfinite,
                Some(&mut target),
            );
            let place = dispatch::place_counted(&device, &ids, tokens, k, &mut target);
            let after = device.stats();
            assert_eq!((after.launches, after.memsets), (before.launches, before.memsets));
            (argument_of(select.unwrap_err()), argument_of(place.unwrap_err()))
        };
        let ws = good.counted_workspace_len(tokens, k).unwrap();
        let capacity = MapConfig {
            capacity: Some(Capacity::default()),
            ..good.clone()
        };
        assert_eq!(refused(&capacity, ws), ("config.capacity", "config.capacity"));
        // place_counted has no router to compare E with: the map's lengths disagree instead.
        assert_eq!(
            refused(&MapConfig::new(experts + 1), ws),
            ("config.num_experts", "counts")
        );
        assert_eq!(refused(&good, ws - 1), ("workspace", "workspace"));
        let padded = MapConfig {
            align: 4,
            ..good.clone()
        };
        assert_eq!(
            refused(&padded, padded.counted_workspace_len(tokens, k).unwrap()),
            ("sorted_rows", "sorted_rows")
        );
        let local = MapConfig {
            local_experts: Some(0..3),
            ..good.clone()
        };
        assert_eq!(
            refused(&local, local.counted_workspace_len(tokens, k).unwrap()),
            ("counts", "counts")
        );
        let short_ids = device.alloc_zeros::<i32>(tokens * k - 1).unwrap();
        let mut map = RoutingMap::alloc(&device, tokens, k, &good).unwrap();
        let mut workspace = device.alloc_zeros::<i32>(ws).unwrap();
        let mut target = CountedMap {
            config: &good,
            map: &mut map,
            workspace: &mut workspace,
            zeroed: false,
        };
        assert_refused(&device, "ids", || {
            dispatch::place_counted(&device, &short_ids, tokens, k, &mut target)
        });
    }
}

/// A placement after the count of other ids (a misuse) gives a wrong map, but every write stays
/// inside its buffers (the ASan run checks that) and every row it names is a real one.
#[test]
fn a_mismatched_placement_stays_in_bounds() {
    let mut rng = Rng::new(7);
    let (experts, k) = (8, 2);
    let router_config = RouterConfig {
        experts,
        k,
        ..RouterConfig::default()
    };
    let config = MapConfig {
        path: MapPath::Tiled { tile_slots: 256 },
        ..MapConfig::new(experts)
    };
    for device in devices() {
        // Count 600 tokens whose every slot goes to expert 0, then place 300 other tokens with
        // the stale counts still in the workspace.
        let mut z = vec![-5.0f32; 600 * experts];
        for t in 0..600 {
            z[t * experts] = 5.0;
            z[t * experts + 1] = 4.0;
        }
        let mut workspace = device
            .alloc_zeros::<i32>(config.counted_workspace_len(600, k).unwrap())
            .unwrap();
        route(
            &device,
            &router_config,
            &config,
            &z,
            Some(&mut workspace),
            Counted::Unplaced,
        );
        let tokens = 300;
        let ids: Vec<i32> = (0..tokens * k).map(|_| rng.below(experts) as i32).collect();
        let ids_d = device.upload(&ids).unwrap();
        let mut map = RoutingMap::alloc(&device, tokens, k, &config).unwrap();
        let len = config.counted_workspace_len(tokens, k).unwrap();
        let stale_counts = device.download(&workspace).unwrap()[..len].to_vec();
        assert!(
            stale_counts.iter().any(|&c| c != 0),
            "the count left no prefix to misuse"
        );
        let mut stale = device.upload(&stale_counts).unwrap();
        let mut target = CountedMap {
            config: &config,
            map: &mut map,
            workspace: &mut stale,
            zeroed: false,
        };
        dispatch::place_counted(&device, &ids_d, tokens, k, &mut target).unwrap();
        let got = download_map(&device, &map);
        let rows = got.sorted_rows.len() as i32;
        let slots = (tokens * k) as i32;
        assert!(
            got.inverse.iter().all(|&r| (-1..rows).contains(&r)),
            "inverse outside its rows"
        );
        assert!(
            got.sorted_rows.iter().all(|&s| (-1..slots).contains(&s)),
            "sorted_rows outside the slots"
        );
    }
}
