//! `router::select_with_losses`: the selection (the map's count optional) and the losses of the ids
//! it selects in one launch have the bits of `router::select_counted` + `router::losses`: ids,
//! weights, the non-finite count, the whole map after `place_counted`, both losses, the aux
//! loss's counts, live rows and row LSEs, the z-loss's live rows and row LSEs; for every row
//! width (E = 3 ... 1000), score and group option, token and sequence level, one loss or both,
//! rows routed nowhere, an empty batch, and past one group of 32 chunks. One launch and no host
//! sync; a second launch on the same workspaces has the same bits (every ticket was reset).
use super::*;
use common::assert_refused;
use moe_kernels::ops::dispatch::place_counted;
use moe_kernels::ops::router::SelectedAuxLoss;

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// Which losses a case asks for.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Losses {
    Aux,
    Z,
    Both,
}

/// One case: the router, the batch and what is asked for.
struct Case<'a> {
    router: &'a RouterConfig,
    aux: &'a AuxLossConfig,
    losses: Losses,
    logits: &'a [f32],
    bias: Option<&'a [f32]>,
    with_map: bool,
}

/// Everything a routing step with losses leaves, downloaded (floats as bits).
#[derive(Debug, PartialEq)]
struct Outputs {
    ids: Vec<i32>,
    weights: Vec<u32>,
    nonfinite_rows: u32,
    /// counts, offsets, sorted_rows, inverse, status after place_counted.
    map: Option<Vec<Vec<i32>>>,
    /// aux loss, z-loss (NaN where not asked for).
    losses: [u32; 2],
    /// The aux workspace's counts, live rows and row LSEs; the z workspace's live rows and row LSEs.
    aux_state: Option<(Vec<i32>, Vec<i32>, Vec<u32>)>,
    z_state: Option<(Vec<i32>, Vec<u32>)>,
}

/// The step on `device`, fused (`select_with_losses`, asserting one launch, no memset, no host
/// sync) or as the two calls; `runs` times on the same workspaces, each run's outputs.
fn step(device: &Device, case: &Case<'_>, fused: bool, runs: usize) -> Vec<Outputs> {
    let router = case.router;
    let tokens = case.logits.len() / router.experts;
    let slots = tokens * router.k;
    let z = device.upload(case.logits).unwrap();
    let bias = case.bias.map(|b| device.upload(b).unwrap());
    let map_config = MapConfig::new(router.experts);
    let mut map = RoutingMap::alloc(device, tokens, router.k, &map_config).unwrap();
    let mut map_ws = device
        .alloc_zeros::<i32>(map_config.counted_workspace_len(tokens, router.k).unwrap())
        .unwrap();
    let has_aux = case.losses != Losses::Z;
    let has_z = case.losses != Losses::Aux;
    let mut aux_ws = AuxLossWorkspace::new(device, router, case.aux, tokens).unwrap();
    let mut z_ws = ZLossWorkspace::new(device, tokens).unwrap();
    let coefficient = 1e-3;
    (0..runs)
        .map(|_| {
            let mut ids = device.upload(&vec![-7; slots]).unwrap();
            let mut weights = device.upload(&vec![f32::NAN; slots]).unwrap();
            let mut nonfinite = device.alloc_zeros::<u32>(1).unwrap();
            let mut aux_loss = device.upload(&[f32::NAN]).unwrap();
            let mut z_loss = device.upload(&[f32::NAN]).unwrap();
            let mut target = CountedMap {
                config: &map_config,
                map: &mut map,
                workspace: &mut map_ws,
                zeroed: true,
            };
            let z_target = has_z.then_some(ZLossTarget {
                coefficient,
                workspace: &mut z_ws,
                loss: &mut z_loss,
            });
            let before = device.stats();
            if fused {
                let aux = has_aux.then_some(SelectedAuxLoss {
                    config: case.aux,
                    workspace: &mut aux_ws,
                    loss: &mut aux_loss,
                });
                router::select_with_losses(
                    device,
                    router,
                    &z,
                    bias.as_ref(),
                    &mut ids,
                    &mut weights,
                    &mut nonfinite,
                    case.with_map.then_some(&mut target),
                    aux,
                    z_target,
                )
                .unwrap();
                let after = device.stats();
                assert_eq!(after.launches - before.launches, 1, "launches");
                assert_eq!((after.host_syncs, after.memsets), (before.host_syncs, before.memsets));
            } else {
                let map = case.with_map.then_some(&mut target);
                router::select_counted(
                    device,
                    router,
                    &z,
                    bias.as_ref(),
                    &mut ids,
                    &mut weights,
                    &mut nonfinite,
                    map,
                )
                .unwrap();
                let aux = has_aux.then_some(AuxLossTarget {
                    config: case.aux,
                    ids: &ids,
                    workspace: &mut aux_ws,
                    loss: &mut aux_loss,
                });
                router::losses(device, router, &z, aux, z_target).unwrap();
            }
            let map = case.with_map.then(|| {
                place_counted(device, &ids, tokens, router.k, &mut target).unwrap();
                let m = &*target.map;
                [&m.counts, &m.offsets, &m.sorted_rows, &m.inverse, &m.status]
                    .map(|b| device.download(b).unwrap())
                    .to_vec()
            });
            let lse = |b: &DeviceBuffer<f32>| bits(&device.download(b).unwrap()[..tokens]);
            Outputs {
                ids: device.download(&ids).unwrap(),
                weights: bits(&device.download(&weights).unwrap()),
                nonfinite_rows: device.download(&nonfinite).unwrap()[0],
                map,
                losses: [
                    device.download(&aux_loss).unwrap()[0],
                    device.download(&z_loss).unwrap()[0],
                ]
                .map(f32::to_bits),
                aux_state: has_aux.then(|| {
                    (
                        device.download(aux_ws.counts()).unwrap(),
                        device.download(aux_ws.live_rows()).unwrap(),
                        lse(aux_ws.row_lse()),
                    )
                }),
                z_state: has_z.then(|| (device.download(z_ws.live_rows()).unwrap(), lse(z_ws.row_lse()))),
            }
        })
        .collect()
}

/// The fused step against the two calls (bitwise), and against the references: ids exact or a
/// near-tie (two keys that round alike in f32 may rank either way against the f64 reference, as
/// in the router's own tests), losses close to the reference's for the ids the device chose.
fn check(case: &Case<'_>, what: &str) {
    let router = case.router;
    let (e, k) = (router.experts, router.k);
    let tokens = case.logits.len() / e;
    let want_ids = reference::select(router, case.logits, case.bias).ids;
    for device in devices() {
        let fused = step(&device, case, true, 2);
        let two_calls = step(&device, case, false, 1);
        assert_eq!(fused[0], two_calls[0], "{what}: fused vs the two calls");
        assert_eq!(fused[0], fused[1], "{what}: a second fused launch differs");
        let ids = &fused[0].ids;
        for (t, row) in case.logits.chunks(e).enumerate() {
            let (got, want) = (&ids[t * k..(t + 1) * k], &want_ids[t * k..(t + 1) * k]);
            if got != want {
                let nowhere = reference::row_is_nonfinite(row);
                assert!(!nowhere, "{what}: row {t} routed nowhere, ids {got:?} vs {want:?}");
                super::assert_near_tie(
                    router,
                    row,
                    case.bias,
                    got,
                    &format!("{what}: row {t}: {got:?} vs {want:?}"),
                );
            }
        }
        if tokens > 0 {
            let losses = fused[0].losses.map(f32::from_bits);
            let tol = Tolerance { atol: 1e-7, rtol: 1e-4 };
            if case.losses != Losses::Z {
                let want = reference::aux_loss(router, case.aux, case.logits, ids);
                assert_close(&format!("{what}: aux loss"), &losses[..1], &[want], tol);
            }
            if case.losses != Losses::Aux {
                let want = reference::z_loss(router.experts, 1e-3, case.logits);
                assert_close(&format!("{what}: z-loss"), &losses[1..], &[want], tol);
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(12))]

    #[test]
    fn select_with_losses_has_the_bits_of_the_two_calls(
        experts in prop::sample::select(vec![3usize, 60, 256, 1000]),
        segments in 0usize..=3,
        segment_len in prop::sample::select(vec![1usize, 9, 70]),
        sequence_level in any::<bool>(),
        losses in prop::sample::select(vec![Losses::Aux, Losses::Z, Losses::Both]),
        with_map in any::<bool>(),
        seed in any::<u64>(),
    ) {
        let mut rng = Rng::new(seed);
        let router = random_config(&mut rng, experts);
        let tokens = segments * segment_len;
        let aux = AuxLossConfig { alpha: 0.02, sequence_length: sequence_level.then_some(segment_len) };
        let logits = random_logits(&mut rng, &router, tokens, Rows::WithSpecials);
        let bias = (rng.below(2) == 0).then(|| rng.normals(experts, 0.5));
        let case = Case { router: &router, aux: &aux, losses, logits: &logits, bias: bias.as_deref(), with_map };
        check(&case, &format!("{router:?}, {segments} x {segment_len}, sequence level {sequence_level}, {losses:?}"));
    }
}

/// Past one group of 32 chunks (64 rows a chunk): 33 chunks at token level, and two sequences
/// of 34 chunks, both losses, with the map.
#[test]
fn select_with_losses_past_one_group_of_chunks() {
    for (segments, segment_len, sequence_level) in [(1, 33 * 64, false), (2, 34 * 64, true)] {
        let mut rng = Rng::new(segment_len as u64);
        let router = RouterConfig {
            experts: 8,
            k: 2,
            ..RouterConfig::default()
        };
        let aux = AuxLossConfig {
            alpha: 0.02,
            sequence_length: sequence_level.then_some(segment_len),
        };
        let logits = random_logits(&mut rng, &router, segments * segment_len, Rows::WithSpecials);
        let case = Case {
            router: &router,
            aux: &aux,
            losses: Losses::Both,
            logits: &logits,
            bias: None,
            with_map: true,
        };
        check(&case, &format!("{segments} x {segment_len}"));
    }
}

/// The fused step reads the logits once where the two calls read them twice: its launch's
/// unique global loads are the selection's and the losses' launches' less one copy of z and one
/// of the ids (which the fused launch reads back from its own writes, where the losses launch
/// reads them again). Same batch, map and targets; E = 64 over 34 chunks of 64 rows.
#[test]
#[cfg_attr(
    not(moe_emu_profile),
    ignore = "needs the profiling build: MOE_EMU_PROFILE=1 (clang-19); CI runs it"
)]
fn select_with_losses_reads_the_logits_once() {
    let emulator = EmulatorDevice::from_env().unwrap().profiling().unwrap();
    let device = Device::Emulator(emulator.clone());
    let (tokens, e, k) = (34 * 64u64, 64u64, 4u64);
    let router = RouterConfig {
        experts: e as usize,
        k: k as usize,
        ..RouterConfig::default()
    };
    let aux = AuxLossConfig::default();
    let logits = random_logits(&mut Rng::new(29), &router, tokens as usize, Rows::Finite);
    let case = Case {
        router: &router,
        aux: &aux,
        losses: Losses::Both,
        logits: &logits,
        bias: None,
        with_map: true,
    };
    let unique_loads = |fused: bool| {
        emulator.take_profiles();
        step(&device, &case, fused, 1);
        let profiles = emulator.take_profiles();
        let kernels: Vec<_> = profiles.iter().map(|p| p.kernel.as_str()).collect();
        let step_launches = if fused { 1 } else { 2 };
        let loads = profiles[..step_launches]
            .iter()
            .map(|p| p.unique_global_load_bytes)
            .sum::<u64>();
        (kernels[..step_launches].join(" + "), loads)
    };
    let (fused_kernel, fused) = unique_loads(true);
    let (two_kernels, two_calls) = unique_loads(false);
    assert_eq!(fused_kernel, "router_select_losses_e64_f32");
    assert_eq!(two_kernels, "router_select_counted_e64_f32 + router_losses_f32");
    assert_eq!(
        fused,
        two_calls - 4 * tokens * e - 4 * tokens * k,
        "unique global load bytes"
    );
}

/// `select_with_losses` with `ids_len` ids, a map not known zeroed and these targets is refused
/// naming `argument`, with no launch and no memset.
fn assert_fused_refused(
    device: &Device,
    argument: &str,
    (router, z, ids_len): (&RouterConfig, &DeviceBuffer<f32>, usize),
    aux: Option<SelectedAuxLoss<'_, DeviceBuffer<f32>>>,
    z_loss: Option<ZLossTarget<'_, DeviceBuffer<f32>>>,
) {
    let tokens = z.len() / router.experts;
    let map_config = MapConfig::new(router.experts);
    let mut map = RoutingMap::alloc(device, tokens, router.k, &map_config).unwrap();
    let mut map_ws = device
        .alloc_zeros::<i32>(map_config.counted_workspace_len(tokens, router.k).unwrap())
        .unwrap();
    let mut target = CountedMap {
        config: &map_config,
        map: &mut map,
        workspace: &mut map_ws,
        zeroed: false,
    };
    let mut ids = device.alloc_zeros::<i32>(ids_len).unwrap();
    let mut weights = device.alloc_zeros::<f32>(tokens * router.k).unwrap();
    let mut nonfinite = device.alloc_zeros::<u32>(1).unwrap();
    let memsets = device.stats().memsets;
    assert_refused(device, argument, || {
        router::select_with_losses(
            device,
            router,
            z,
            NO_BIAS,
            &mut ids,
            &mut weights,
            &mut nonfinite,
            Some(&mut target),
            aux,
            z_loss,
        )
    });
    assert_eq!(
        device.stats().memsets,
        memsets,
        "{argument}: a memset before the refusal"
    );
}

/// Bad inputs are refused by name before anything launches or the map's memset runs: a
/// workspace made for another T, a loss buffer of the wrong length, ids of the wrong length, a
/// non-finite z-loss coefficient.
#[test]
fn select_with_losses_refuses_bad_inputs() {
    let router = RouterConfig {
        experts: 16,
        k: 2,
        ..RouterConfig::default()
    };
    let aux = AuxLossConfig::default();
    let tokens = 10;
    let logits = random_logits(&mut Rng::new(5), &router, tokens, Rows::Finite);
    for device in devices() {
        let z = device.upload(&logits).unwrap();
        let mut aux_ws = AuxLossWorkspace::new(&device, &router, &aux, tokens).unwrap();
        let mut other_ws = AuxLossWorkspace::new(&device, &router, &aux, tokens + 1).unwrap();
        let mut z_ws = ZLossWorkspace::new(&device, tokens).unwrap();
        let mut loss = device.alloc_zeros::<f32>(1).unwrap();
        let mut long_loss = device.alloc_zeros::<f32>(2).unwrap();
        let batch = (&router, &z, tokens * router.k);
        let aux_of = |workspace, loss| {
            Some(SelectedAuxLoss {
                config: &aux,
                workspace,
                loss,
            })
        };
        assert_fused_refused(&device, "workspace", batch, aux_of(&mut other_ws, &mut loss), None);
        assert_fused_refused(&device, "loss", batch, aux_of(&mut aux_ws, &mut long_loss), None);
        for (argument, ids_len, coefficient) in [("ids", batch.2 - 1, 1e-3), ("coefficient", batch.2, f32::NAN)] {
            let z_loss = ZLossTarget {
                coefficient,
                workspace: &mut z_ws,
                loss: &mut loss,
            };
            assert_fused_refused(&device, argument, (&router, &z, ids_len), None, Some(z_loss));
        }
    }
}
