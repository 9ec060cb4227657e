//! The routing step in one call (`gate::scores_and_select`): the gate with the router's
//! selection and the map's count fused gives the bits of `gate::scores` +
//! `router::select_counted`: z, ids, weights, the non-finite count and the whole map after
//! `place_counted`; `gate::route`, which also places the map (in the same launch at decode),
//! gives those bits too. Above T = 64 on the forward's tile (`gate_route_<form>_<dtype>_e<N>`:
//! the linear f16/bf16 tile at each row width N for E = 8, 48, 128, the linear f32 (split-tf32)
//! tile at E = 8, 64 and 128, every rank form at its tile's widest E in one dtype or another), at T <= 64 on the
//! decode kernel (`gate_decode_route_linear_<dtype>_e<N>`: every dtype, N = 32 ... 512, one to
//! four token blocks, one or two selection passes); softmax and top-k-then-softmax, sigmoid with
//! groups, a router bias, scale and renormalisation, rows routed nowhere (NaN and huge inputs),
//! with and without the count; one launch where it fuses, the two calls elsewhere (E past the
//! tile's experts above T = 64; E > 512, no map, or a rank form at T <= 64); bad inputs refused
//! naming the argument.
use super::*;
use moe_kernels::ops::dispatch::{self, CountedMap, MapConfig, MapPath, RoutingMap};
use moe_kernels::ops::gate::{
    DECODE_MAX_TOKENS, DECODE_ROUTE_MAX_EXPERTS, ROUTE_MAX_EXPERTS, route_is_fused, route_tile_max_experts,
};
use moe_kernels::ops::router::{self, RouterConfig, ScoreFunction, SelectionOrder};

/// What one routing step produced, downloaded (floats as bits).
#[derive(Debug, PartialEq)]
struct Routed {
    z: Vec<u32>,
    ids: Vec<i32>,
    weights: Vec<u32>,
    nonfinite_rows: u32,
    /// counts, offsets, sorted_rows, inverse, status after place_counted.
    map: Option<Vec<Vec<i32>>>,
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// The row of X that holds a NaN (routed nowhere), where there are 4 rows or more.
fn nan_row(tokens: usize) -> Option<usize> {
    (tokens > 3).then_some(3)
}

/// X of `case` with `nan_row` holding a NaN and row 70 a huge element (both routed nowhere).
fn inputs_with_bad_rows<T: FloatElement>(case: &Case) -> (GateParams, Vec<f64>) {
    let (host, mut x, _) = inputs::<T>(case);
    let d = case.shape.dim;
    if let Some(row) = nan_row(case.shape.tokens) {
        x[row * d + d / 2] = f64::NAN;
    }
    if case.shape.tokens > 70 {
        x[70 * d] = 1e30;
    }
    (host, x)
}

/// How a routing step runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    /// `gate::scores`, then `router::select_counted`.
    TwoCalls,
    /// `gate::scores_and_select`.
    Fused,
    /// `gate::route`: the map placed too (a map is required).
    Whole,
}

/// The routing step of `case` on `device`, run as `step`; with `counted` the map's count,
/// completed by `place_counted` (by `gate::route` itself for `Step::Whole`; the map's rows and
/// inverse start as garbage). Returns the outputs and the launches the step took.
fn route<T: FloatElement>(
    device: &Device,
    case: &Case,
    router: &RouterConfig,
    bias: Option<&[f32]>,
    map_config: &MapConfig,
    counted: bool,
    step: Step,
) -> (Routed, u64) {
    let (host, x) = inputs_with_bad_rows::<T>(case);
    let placed = upload_params::<T>(device, &host, 0);
    let up: Vec<_> = placed.iter().map(|(n, p)| (*n, p.view())).collect();
    let w = weights(case.form, &up);
    let x_host: Vec<T> = x.iter().map(|&v| T::from_f32(v as f32)).collect();
    let x = device.upload(&x_host).unwrap();
    let (tokens, k) = (case.shape.tokens, router.k);
    let mut z = device.upload(&vec![f32::NAN; tokens * router.experts]).unwrap();
    let mut ids = device.alloc_zeros::<i32>(tokens * k).unwrap();
    let mut weights_out = device.alloc_zeros::<f32>(tokens * k).unwrap();
    let mut nonfinite = device.alloc_zeros::<u32>(1).unwrap();
    let bias = bias.map(|b| device.upload(b).unwrap());
    let mut map = RoutingMap::alloc(device, tokens, k, map_config).unwrap();
    device
        .upload_into(&vec![7777; map.sorted_rows.len()], &mut map.sorted_rows)
        .unwrap();
    device
        .upload_into(&vec![7777; map.inverse.len()], &mut map.inverse)
        .unwrap();
    let mut workspace = device
        .alloc_zeros::<i32>(map_config.counted_workspace_len(tokens, k).unwrap())
        .unwrap();
    let mut target = counted.then_some(CountedMap {
        config: map_config,
        map: &mut map,
        workspace: &mut workspace,
        zeroed: true, // fresh
    });
    let before = device.stats();
    if step == Step::Whole {
        gate::route(
            device,
            &case.shape,
            &w,
            &x,
            &mut z,
            router,
            bias.as_ref(),
            &mut ids,
            &mut weights_out,
            &mut nonfinite,
            target.as_mut().expect("gate::route places a map"),
        )
        .unwrap();
    } else if step == Step::Fused {
        gate::scores_and_select(
            device,
            &case.shape,
            &w,
            &x,
            &mut z,
            router,
            bias.as_ref(),
            &mut ids,
            &mut weights_out,
            &mut nonfinite,
            target.as_mut(),
        )
        .unwrap();
    } else {
        gate::scores(device, &case.shape, &w, &x, &mut z).unwrap();
        router::select_counted(
            device,
            router,
            &z,
            bias.as_ref(),
            &mut ids,
            &mut weights_out,
            &mut nonfinite,
            target.as_mut(),
        )
        .unwrap();
    }
    let launches = device.stats().launches - before.launches;
    assert_eq!(device.stats().host_syncs, before.host_syncs, "host syncs");
    if let Some(target) = &target {
        // The tickets before the per-tile counts are 0 again (each reset by its last taker).
        let header = &device.download(&*target.workspace).unwrap()[..8];
        assert_eq!(header, [0; 8], "the map workspace's tickets after the pass");
    }
    if let Some(target) = target.as_mut().filter(|_| step != Step::Whole) {
        dispatch::place_counted(device, &ids, tokens, k, target).unwrap();
    }
    if let Some(target) = &target {
        // The placement cleared every tile's counts: the next count needs no memset.
        let workspace = device.download(&*target.workspace).unwrap();
        assert!(
            workspace.iter().all(|&v| v == 0),
            "the map workspace after the map: {workspace:?}"
        );
    }
    let map = counted.then(|| {
        [&map.counts, &map.offsets, &map.sorted_rows, &map.inverse, &map.status]
            .iter()
            .map(|b| device.download(*b).unwrap())
            .collect()
    });
    let routed = Routed {
        z: bits(&device.download(&z).unwrap()),
        ids: device.download(&ids).unwrap(),
        weights: bits(&device.download(&weights_out).unwrap()),
        nonfinite_rows: device.download(&nonfinite).unwrap()[0],
        map,
    };
    (routed, launches)
}

/// The map of E experts in tiles of 256 slots: the count and the placement cross tiles at the
/// larger shapes.
fn tiled_map(experts: usize) -> MapConfig {
    MapConfig {
        path: MapPath::Tiled { tile_slots: 256 },
        ..MapConfig::new(experts)
    }
}

/// [`check_route_into`] the map of every expert ([`tiled_map`]).
fn check_route<T: FloatElement>(device: &Device, case: &Case, router: &RouterConfig, bias: Option<&[f32]>) -> bool {
    check_route_into::<T>(device, case, router, bias, &tiled_map(router.experts))
}

/// [`check_route`], which must fuse the step with the map.
fn check_fused<T: FloatElement>(device: &Device, case: &Case, router: &RouterConfig, bias: Option<&[f32]>) {
    check_fused_into::<T>(device, case, router, bias, &tiled_map(router.experts));
}

/// [`check_route_into`], which must fuse the step with the map.
fn check_fused_into<T: FloatElement>(
    device: &Device,
    case: &Case,
    router: &RouterConfig,
    bias: Option<&[f32]>,
    map_config: &MapConfig,
) {
    assert!(
        check_route_into::<T>(device, case, router, bias, map_config),
        "{case:?} fuses"
    );
}

/// [`check_route`], which must take the separate calls.
fn check_unfused<T: FloatElement>(device: &Device, case: &Case, router: &RouterConfig, bias: Option<&[f32]>) {
    assert!(!check_route::<T>(device, case, router, bias), "{case:?} does not fuse");
}

/// `case` routed every way (with and without the map of `map_config`) is bitwise the same; one
/// launch when it fuses (then the fused kernel of E's row width ran), two otherwise; the whole
/// step (`gate::route`) one at decode, else 2 or 3. Returns whether the step with the map fused.
fn check_route_into<T: FloatElement>(
    device: &Device,
    case: &Case,
    router: &RouterConfig,
    bias: Option<&[f32]>,
    map_config: &MapConfig,
) -> bool {
    let what = format!("{case:?} {router:?} {} on {}", T::NAME, device.description());
    let placed = upload_params::<T>(device, &inputs::<T>(case).0, 0);
    let up: Vec<_> = placed.iter().map(|(n, p)| (*n, p.view())).collect();
    let row = case.shape.experts.next_power_of_two().max(32);
    let kernel = if case.shape.tokens > DECODE_MAX_TOKENS {
        format!("gate_route_{}_{}_e{row}", form_name(case.form), T::NAME)
    } else {
        format!("gate_decode_route_linear_{}_e{row}", T::NAME)
    };
    let mut fused_with_map = false;
    for counted in [false, true] {
        let fuses = route_is_fused(&case.shape, &weights::<T>(case.form, &up), counted);
        let (want, two) = route::<T>(device, case, router, bias, map_config, counted, Step::TwoCalls);
        let (got, launches) = route::<T>(device, case, router, bias, map_config, counted, Step::Fused);
        assert_eq!(got, want, "{what}, counted {counted}");
        assert_eq!(two, 2, "{what}: the two calls");
        assert_eq!(
            launches,
            if fuses { 1 } else { 2 },
            "{what}, counted {counted}: launches"
        );
        if fuses {
            assert!(
                device.launch_configs().contains_key(kernel.as_str()),
                "{what}: {kernel} ran"
            );
        }
        if let Some(row) = nan_row(case.shape.tokens) {
            assert!(want.nonfinite_rows >= 1, "{what}: the NaN row is routed nowhere");
            assert_eq!(want.ids[row * router.k], -1, "{what}: the NaN row's ids");
        }
        if counted {
            // The whole step: at decode the fused kernel places the map too (one launch).
            let (whole, launches) = route::<T>(device, case, router, bias, map_config, true, Step::Whole);
            assert_eq!(whole, want, "{what}: gate::route");
            let placed_in_kernel = fuses && case.shape.tokens <= DECODE_MAX_TOKENS;
            let expected = if placed_in_kernel { 1 } else { 3 - u64::from(fuses) };
            assert_eq!(launches, expected, "{what}: gate::route's launches");
            fused_with_map = fuses;
        }
    }
    fused_with_map
}

/// The form's name in its kernels' names.
fn form_name(form: GateForm) -> &'static str {
    match form {
        GateForm::Linear => "linear",
        GateForm::LowRank => "lowrank",
        GateForm::Symmetric => "symmetric",
        GateForm::Attention => "attention",
        GateForm::Full => "full",
    }
}

fn linear(tokens: usize, dim: usize, experts: usize) -> Case {
    Case::new(GateForm::Linear, tokens, dim, experts, 1)
}

/// Softmax over `experts`, 1 a token.
fn top_1(experts: usize) -> RouterConfig {
    softmax_k(experts, 1)
}

/// Softmax over `experts`, `k` a token.
fn softmax_k(experts: usize, k: usize) -> RouterConfig {
    RouterConfig {
        experts,
        k,
        ..RouterConfig::default()
    }
}

/// [`grouped_48`]'s options over `experts` in 8 groups.
fn grouped(experts: usize) -> RouterConfig {
    RouterConfig {
        experts,
        k: 4,
        ..grouped_48()
    }
}

/// Softmax over 8 experts, 2 a token.
fn softmax_8() -> RouterConfig {
    softmax_k(8, 2)
}

/// Sigmoid over 48 experts in 8 groups (the top 4 kept), 6 a token, renormalised and scaled.
fn grouped_48() -> RouterConfig {
    RouterConfig {
        experts: 48,
        k: 6,
        score: ScoreFunction::Sigmoid,
        renormalize: true,
        scale: 2.5,
        groups: 8,
        topk_groups: 4,
        ..RouterConfig::default()
    }
}

#[test]
fn fused_route_has_the_bits_of_scores_then_select() {
    let (softmax, grouped) = (softmax_8(), grouped_48());
    let mixtral = RouterConfig {
        experts: 128,
        k: 8,
        order: SelectionOrder::TopkThenSoftmax,
        ..RouterConfig::default()
    };
    let deepseek = RouterConfig::deepseek_v3();
    assert_eq!(deepseek.experts, ROUTE_MAX_EXPERTS);
    let bias: Vec<f32> = (0..ROUTE_MAX_EXPERTS).map(|e| (e % 5) as f32 * 0.01).collect();
    for device in devices() {
        // E = 8 (N = 32) over 4 token tiles, the last ragged, and 5 k-tiles (d = 136: the
        // scoring tile's cp.async ring wraps); E = 48 (N = 64) with a router bias; E = 128
        // (N = 128) one token past a tile; on the 256-expert tile (N = 256, 16 lanes a row)
        // DeepSeek-V3's router (sigmoid, 8 groups, top 4 groups, k = 8, a bias) at E = 256 over 2
        // tiles and 3 k-tiles (d = 80: the ring wraps), and E = 200 (a ragged row of the tile).
        check_fused::<bf16>(&device, &linear(200, 136, 8), &softmax, None);
        check_fused::<f16>(&device, &linear(130, 24, 48), &grouped, Some(&bias[..48]));
        check_fused::<bf16>(&device, &linear(65, 16, 128), &mixtral, None);
        check_fused::<bf16>(&device, &linear(100, 80, ROUTE_MAX_EXPERTS), &deepseek, Some(&bias));
        check_fused::<f16>(&device, &linear(70, 16, 200), &top_1(200), None);
    }
}

/// The linear f32 tile (split tf32, 128 experts a block) and the rank forms' pair tiles (16
/// experts a block) fuse the selection too, at the widest E their block holds: the linear f32
/// gate at E = 8 over 4 token tiles (d = 136: 5 k-tiles), at E = 64 (N = 64) with groups and a
/// bias, and at E = 128 (N = 128) over a ragged k-tile (d = 20); low-rank (rank 6: two chunks)
/// and symmetric on f16/bf16 at E = 16; attention and full on f32 at E = 16 and 8.
#[test]
fn every_form_fuses_where_its_tile_holds_every_expert() {
    // The experts one block of each route tile holds: the linear gate 128 (f32, split tf32) or
    // 256 (f16/bf16), the rank forms' pair tiles 16 in every dtype.
    for form in GateForm::ALL {
        let (f32_tile, tensor_cores) = if form == GateForm::Linear {
            (128, ROUTE_MAX_EXPERTS)
        } else {
            (16, 16)
        };
        assert_eq!(route_tile_max_experts::<f32>(form), f32_tile, "{form:?} f32");
        assert_eq!(route_tile_max_experts::<f16>(form), tensor_cores, "{form:?} f16");
        assert_eq!(route_tile_max_experts::<bf16>(form), tensor_cores, "{form:?} bf16");
    }
    let grouped_64 = RouterConfig {
        experts: 64,
        ..grouped_48()
    };
    let bias: Vec<f32> = (0..64).map(|e| (e % 7) as f32 * 0.01).collect();
    for device in devices() {
        check_fused::<f32>(&device, &linear(200, 136, 8), &softmax_8(), None);
        check_fused::<f32>(&device, &linear(70, 24, 64), &grouped_64, Some(&bias));
        check_fused::<f32>(&device, &linear(66, 20, 128), &top_1(128), None);
        check_fused::<bf16>(&device, &Case::new(GateForm::LowRank, 100, 24, 16, 6), &top_1(16), None);
        let symmetric = Case::new(GateForm::Symmetric, 66, 16, 16, 2);
        check_fused::<f16>(&device, &symmetric, &grouped(16), Some(&bias[..16]));
        let attention = Case::new(GateForm::Attention, 80, 16, 16, 3);
        check_fused::<f32>(&device, &attention, &softmax_k(16, 4), None);
        check_fused::<f32>(&device, &Case::new(GateForm::Full, 65, 8, 8, 1), &softmax_8(), None);
    }
}

#[test]
fn decode_route_has_the_bits_of_scores_then_select() {
    let (softmax, grouped) = (softmax_8(), grouped_48());
    let deepseek = RouterConfig::deepseek_v3();
    let widest = RouterConfig {
        experts: 300,
        k: 32,
        order: SelectionOrder::TopkThenSoftmax,
        ..RouterConfig::default()
    };
    let bias: Vec<f32> = (0..256).map(|e| (e % 5) as f32 * 0.01).collect();
    for device in devices() {
        check_fused::<f32>(&device, &linear(1, 24, 8), &softmax, None);
        check_fused::<bf16>(&device, &linear(5, 40, 48), &grouped, Some(&bias[..48]));
        check_fused::<f16>(&device, &linear(40, 16, 8), &softmax, None);
        check_fused::<bf16>(&device, &linear(DECODE_MAX_TOKENS, 24, 256), &deepseek, Some(&bias));
        check_fused::<f32>(&device, &linear(20, 8, 300), &widest, None);
        // E = 126 (N = 128, 8 lanes a row; rows of 126 floats take the scalar layout), k = 1,
        // one token past a token block.
        check_fused::<bf16>(&device, &linear(17, 16, 126), &top_1(126), None);
        // Experts 40..104 of 126 dispatched here, each group padded to 8 rows.
        let local = MapConfig {
            local_experts: Some(40..104),
            align: 8,
            ..tiled_map(126)
        };
        check_fused_into::<f16>(&device, &linear(16, 16, 126), &top_1(126), None, &local);
    }
}

#[test]
fn unfused_shapes_take_the_two_calls() {
    let router = |experts| RouterConfig {
        experts,
        k: 4,
        ..RouterConfig::default()
    };
    for device in devices() {
        // One expert past a block of each tile.
        let past_f32 = route_tile_max_experts::<f32>(GateForm::Linear) + 1;
        check_unfused::<f32>(&device, &linear(100, 24, past_f32), &router(past_f32), None);
        let past = ROUTE_MAX_EXPERTS + 1;
        check_unfused::<bf16>(&device, &linear(100, 24, past), &router(past), None);
        check_unfused::<bf16>(
            &device,
            &Case::new(GateForm::LowRank, 100, 24, 17, 2),
            &router(17),
            None,
        );
        check_unfused::<f32>(
            &device,
            &Case::new(GateForm::Symmetric, 70, 8, 17, 1),
            &router(17),
            None,
        );
        let wide = DECODE_ROUTE_MAX_EXPERTS + 1;
        check_unfused::<bf16>(&device, &linear(6, 8, wide), &router(wide), None);
        let low_rank_decode = Case::new(GateForm::LowRank, 9, 24, 8, 2);
        check_unfused::<bf16>(&device, &low_rank_decode, &router(8), None);
    }
}

#[test]
fn fused_route_refuses_bad_inputs() {
    let case = linear(100, 16, 8);
    let router = RouterConfig {
        experts: 8,
        k: 2,
        ..RouterConfig::default()
    };
    for device in devices() {
        let placed = upload_params::<bf16>(&device, &inputs::<bf16>(&case).0, 0);
        let up: Vec<_> = placed.iter().map(|(n, p)| (*n, p.view())).collect();
        let w = weights::<bf16>(case.form, &up);
        let x = zeros::<bf16>(&device, 100 * 16);
        let mut z = zeros::<f32>(&device, 100 * 8);
        let mut ids = zeros::<i32>(&device, 100 * 2);
        let mut short_ids = zeros::<i32>(&device, 100 * 2 - 1);
        let mut weights_out = zeros::<f32>(&device, 100 * 2);
        let mut nonfinite = zeros::<u32>(&device, 1);
        let wrong_experts = RouterConfig { experts: 9, ..router };
        let short_bias = zeros::<f32>(&device, 7);
        let mut refused =
            |argument: &str, router: &RouterConfig, bias: Option<&DeviceBuffer<f32>>, ids: &mut DeviceBuffer<i32>| {
                let no_map = None::<&mut CountedMap<'_, DeviceBuffer<i32>, DeviceBuffer<i32>>>;
                assert_refused(&device, argument, || {
                    gate::scores_and_select(
                        &device,
                        &case.shape,
                        &w,
                        &x,
                        &mut z,
                        router,
                        bias,
                        ids,
                        &mut weights_out,
                        &mut nonfinite,
                        no_map,
                    )
                });
            };
        refused("router.experts", &wrong_experts, None, &mut ids);
        refused("bias", &router, Some(&short_bias), &mut ids);
        refused("ids", &router, None, &mut short_ids);
    }
}
