//! The routing step with the router losses (`gate::route_with_losses`) has the bits of
//! `gate::route` then `router::losses`: z, ids, weights, the non-finite count, the whole map, both
//! losses, the aux loss's counts, live rows and row LSEs, the z-loss's live rows and row LSEs.
//! Where the gate's tile kernel selects (T > 64) and the losses' chunks are its 64-token tiles
//! (token level, or sequences a multiple of 64 long) the losses run in its launch: 2 launches
//! with the placement; at decode the one-launch route and then the losses (2); elsewhere the
//! scores, the selection with the losses and the placement (3). A second step on the same
//! workspaces has the same bits (every ticket was reset), and no step syncs with the host.
use super::*;
use moe_kernels::ops::dispatch::{CountedMap, MapConfig, RoutingMap};
use moe_kernels::ops::gate::ROUTE_MAX_EXPERTS;
use moe_kernels::ops::router::{
    self, AuxLossConfig, AuxLossTarget, AuxLossWorkspace, RouterConfig, ScoreFunction, SelectedAuxLoss, ZLossTarget,
    ZLossWorkspace,
};

/// Which losses a case asks for.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Losses {
    Aux,
    Z,
    Both,
}

/// Everything a routing step with losses leaves, downloaded (floats as bits).
#[derive(Debug, PartialEq)]
struct Outputs {
    z: Vec<u32>,
    ids: Vec<i32>,
    weights: Vec<u32>,
    nonfinite_rows: u32,
    /// counts, offsets, sorted_rows, inverse, status.
    map: Vec<Vec<i32>>,
    /// aux loss, z-loss (NaN where not asked for).
    losses: [u32; 2],
    /// The aux workspace's counts, live rows and row LSEs; the z workspace's live rows and LSEs.
    aux_state: Option<(Vec<i32>, Vec<i32>, Vec<u32>)>,
    z_state: Option<(Vec<i32>, Vec<u32>)>,
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// `runs` routing steps of `case` on the same workspaces, each with `gate::route_with_losses`
/// (`fused`) or `gate::route` then `router::losses`; each run's outputs and launches. Row 3 of X
/// holds a NaN (routed nowhere).
fn steps<T: FloatElement>(
    device: &Device,
    case: &Case,
    router: &RouterConfig,
    aux_config: &AuxLossConfig,
    losses: Losses,
    fused: bool,
    runs: usize,
) -> Vec<(Outputs, u64)> {
    let (host, mut x, _) = inputs::<T>(case);
    let (tokens, d, k) = (case.shape.tokens, case.shape.dim, router.k);
    x[3 * d + 1] = f64::NAN;
    let placed = upload_params::<T>(device, &host, 0);
    let up: Vec<_> = placed.iter().map(|(n, p)| (*n, p.view())).collect();
    let w = weights(case.form, &up);
    let x_host: Vec<T> = x.iter().map(|&v| T::from_f32(v as f32)).collect();
    let x = device.upload(&x_host).unwrap();
    let map_config = MapConfig::new(router.experts);
    let mut map = RoutingMap::alloc(device, tokens, k, &map_config).unwrap();
    let mut map_workspace = device
        .alloc_zeros::<i32>(map_config.counted_workspace_len(tokens, k).unwrap())
        .unwrap();
    let (has_aux, has_z) = (losses != Losses::Z, losses != Losses::Aux);
    let mut aux_workspace = AuxLossWorkspace::new(device, router, aux_config, tokens).unwrap();
    let mut z_workspace = ZLossWorkspace::new(device, tokens).unwrap();
    (0..runs)
        .map(|_| {
            let mut z = device.upload(&vec![f32::NAN; tokens * router.experts]).unwrap();
            let mut ids = device.upload(&vec![-7; tokens * k]).unwrap();
            let mut weights_out = device.upload(&vec![f32::NAN; tokens * k]).unwrap();
            let mut nonfinite = device.alloc_zeros::<u32>(1).unwrap();
            let mut aux_loss = device.upload(&[f32::NAN]).unwrap();
            let mut z_loss = device.upload(&[f32::NAN]).unwrap();
            let mut target = CountedMap {
                config: &map_config,
                map: &mut map,
                workspace: &mut map_workspace,
                zeroed: true,
            };
            let z_target = has_z.then_some(ZLossTarget {
                coefficient: 1e-3,
                workspace: &mut z_workspace,
                loss: &mut z_loss,
            });
            let no_bias = None::<&DeviceBuffer<f32>>;
            let before = device.stats();
            if fused {
                let aux = has_aux.then_some(SelectedAuxLoss {
                    config: aux_config,
                    workspace: &mut aux_workspace,
                    loss: &mut aux_loss,
                });
                gate::route_with_losses(
                    device,
                    &case.shape,
                    &w,
                    &x,
                    &mut z,
                    router,
                    no_bias,
                    &mut ids,
                    &mut weights_out,
                    &mut nonfinite,
                    &mut target,
                    aux,
                    z_target,
                )
                .unwrap();
            } else {
                gate::route(
                    device,
                    &case.shape,
                    &w,
                    &x,
                    &mut z,
                    router,
                    no_bias,
                    &mut ids,
                    &mut weights_out,
                    &mut nonfinite,
                    &mut target,
                )
                .unwrap();
                let aux = has_aux.then_some(AuxLossTarget {
                    config: aux_config,
                    ids: &ids,
                    workspace: &mut aux_workspace,
                    loss: &mut aux_loss,
                });
                router::losses(device, router, &z, aux, z_target).unwrap();
            }
            let after = device.stats();
            assert_eq!(after.host_syncs, before.host_syncs, "host syncs");
            let m = &*target.map;
            let lse = |b: &DeviceBuffer<f32>| bits(&device.download(b).unwrap()[..tokens]);
            let outputs = Outputs {
                z: bits(&device.download(&z).unwrap()),
                ids: device.download(&ids).unwrap(),
                weights: bits(&device.download(&weights_out).unwrap()),
                nonfinite_rows: device.download(&nonfinite).unwrap()[0],
                map: [&m.counts, &m.offsets, &m.sorted_rows, &m.inverse, &m.status]
                    .map(|b| device.download(b).unwrap())
                    .to_vec(),
                losses: [
                    device.download(&aux_loss).unwrap()[0],
                    device.download(&z_loss).unwrap()[0],
                ]
                .map(f32::to_bits),
                aux_state: has_aux.then(|| {
                    (
                        device.download(aux_workspace.counts()).unwrap(),
                        device.download(aux_workspace.live_rows()).unwrap(),
                        lse(aux_workspace.row_lse()),
                    )
                }),
                z_state: has_z.then(|| {
                    (
                        device.download(z_workspace.live_rows()).unwrap(),
                        lse(z_workspace.row_lse()),
                    )
                }),
            };
            (outputs, after.launches - before.launches)
        })
        .collect()
}

/// `case` with losses, fused against the separate calls (bitwise), twice on the same
/// workspaces; `launches` for the fused step; the losses asked for are finite.
fn check<T: FloatElement>(case: &Case, router: &RouterConfig, aux: &AuxLossConfig, losses: Losses, launches: u64) {
    for device in devices() {
        let what = format!(
            "{case:?} {router:?} {aux:?} {losses:?} {} on {}",
            T::NAME,
            device.description()
        );
        let fused = steps::<T>(&device, case, router, aux, losses, true, 2);
        let (separate, _) = &steps::<T>(&device, case, router, aux, losses, false, 1)[0];
        assert_eq!(&fused[0].0, separate, "{what}: fused vs route + losses");
        assert_eq!(fused[0].0, fused[1].0, "{what}: a second step differs");
        assert_eq!(fused[0].1, launches, "{what}: launches");
        assert_eq!(separate.ids[3 * router.k], -1, "{what}: the NaN row is routed nowhere");
        let asked = [losses != Losses::Z, losses != Losses::Aux];
        for (loss, asked) in separate.losses.iter().zip(asked) {
            assert_eq!(f32::from_bits(*loss).is_finite(), asked, "{what}: {losses:?}");
        }
    }
}

fn router(experts: usize, k: usize) -> RouterConfig {
    RouterConfig {
        experts,
        k,
        ..RouterConfig::default()
    }
}

/// Above T = 64 the tile kernel runs the losses where their chunks are its tiles: token level
/// over 4 tiles (the last ragged) with both losses; 3 sequences of 64 (aux only, sigmoid with
/// groups, the f32 split-tf32 tile); the z-loss alone on the low-rank f16 tile; DeepSeek-V3's
/// router (E = 256: the wide bf16 tile, 16 lanes a row) over 2 sequences of 64 with both losses.
#[test]
fn tile_route_runs_the_losses_in_its_launch() {
    let token_level = AuxLossConfig::default();
    let sequences_of_64 = AuxLossConfig {
        sequence_length: Some(64),
        ..AuxLossConfig::default()
    };
    let grouped = RouterConfig {
        score: ScoreFunction::Sigmoid,
        renormalize: true,
        groups: 8,
        topk_groups: 4,
        ..router(48, 6)
    };
    let linear = |tokens, experts| Case::new(GateForm::Linear, tokens, 24, experts, 1);
    check::<bf16>(&linear(200, 8), &router(8, 2), &token_level, Losses::Both, 2);
    check::<f32>(&linear(192, 48), &grouped, &sequences_of_64, Losses::Aux, 2);
    let low_rank = Case::new(GateForm::LowRank, 130, 16, 16, 2);
    check::<f16>(&low_rank, &router(16, 4), &token_level, Losses::Z, 2);
    let deepseek = RouterConfig::deepseek_v3();
    check::<bf16>(
        &linear(128, deepseek.experts),
        &deepseek,
        &sequences_of_64,
        Losses::Both,
        2,
    );
}

/// Elsewhere the same bits in more launches: sequences of 75 tokens (chunks that are not the
/// tiles) and E past the tile's experts take the selection's own losses (3 launches); at decode
/// the one-launch route, then the losses (2).
#[test]
fn other_routes_keep_the_bits_with_losses() {
    let sequences_of_75 = AuxLossConfig {
        sequence_length: Some(75),
        ..AuxLossConfig::default()
    };
    let linear = |tokens, experts| Case::new(GateForm::Linear, tokens, 16, experts, 1);
    check::<bf16>(&linear(150, 8), &router(8, 2), &sequences_of_75, Losses::Both, 3);
    let past = ROUTE_MAX_EXPERTS + 1;
    check::<bf16>(
        &linear(100, past),
        &router(past, 4),
        &AuxLossConfig::default(),
        Losses::Aux,
        3,
    );
    check::<f32>(
        &linear(40, 8),
        &router(8, 2),
        &AuxLossConfig::default(),
        Losses::Both,
        2,
    );
}

/// Bad inputs are refused naming the argument before anything launches, whichever way the step
/// would run (the tile kernel, decode, the separate calls): an aux workspace for another batch,
/// a z-loss of two elements, short ids.
#[test]
fn route_with_losses_refuses_bad_inputs_before_launching() {
    for device in devices() {
        for (tokens, experts) in [(100, 8), (40, 8), (100, ROUTE_MAX_EXPERTS + 1)] {
            let case = Case::new(GateForm::Linear, tokens, 16, experts, 1);
            let router = router(experts, 2);
            let aux_config = AuxLossConfig::default();
            let placed = upload_params::<bf16>(&device, &inputs::<bf16>(&case).0, 0);
            let up: Vec<_> = placed.iter().map(|(n, p)| (*n, p.view())).collect();
            let w = weights::<bf16>(case.form, &up);
            let x = zeros::<bf16>(&device, tokens * 16);
            let mut z = zeros::<f32>(&device, tokens * experts);
            let mut weights_out = zeros::<f32>(&device, tokens * 2);
            let mut nonfinite = zeros::<u32>(&device, 1);
            let map_config = MapConfig::new(experts);
            let mut map = RoutingMap::alloc(&device, tokens, 2, &map_config).unwrap();
            let mut map_workspace = zeros::<i32>(&device, map_config.counted_workspace_len(tokens, 2).unwrap());
            let mut other_batch = AuxLossWorkspace::new(&device, &router, &aux_config, tokens + 1).unwrap();
            let mut aux_workspace = AuxLossWorkspace::new(&device, &router, &aux_config, tokens).unwrap();
            let mut z_workspace = ZLossWorkspace::new(&device, tokens).unwrap();
            let (mut aux_loss, mut z_loss, mut two) =
                (zeros::<f32>(&device, 1), zeros::<f32>(&device, 1), zeros(&device, 2));
            let (mut ids, mut short_ids) = (zeros::<i32>(&device, tokens * 2), zeros::<i32>(&device, tokens * 2 - 1));
            let mut refused = |argument: &str,
                               ids: &mut DeviceBuffer<i32>,
                               aux_workspace: &mut AuxLossWorkspace,
                               z_loss: &mut DeviceBuffer<f32>| {
                let mut target = CountedMap {
                    config: &map_config,
                    map: &mut map,
                    workspace: &mut map_workspace,
                    zeroed: true,
                };
                let aux = Some(SelectedAuxLoss {
                    config: &aux_config,
                    workspace: aux_workspace,
                    loss: &mut aux_loss,
                });
                let z_target = Some(ZLossTarget {
                    coefficient: 1e-3,
                    workspace: &mut z_workspace,
                    loss: z_loss,
                });
                assert_refused(&device, argument, || {
                    gate::route_with_losses(
                        &device,
                        &case.shape,
                        &w,
                        &x,
                        &mut z,
                        &router,
                        None::<&DeviceBuffer<f32>>,
                        ids,
                        &mut weights_out,
                        &mut nonfinite,
                        &mut target,
                        aux,
                        z_target,
                    )
                });
            };
            refused("workspace", &mut ids, &mut other_batch, &mut z_loss);
            refused("loss", &mut ids, &mut aux_workspace, &mut two);
            refused("ids", &mut short_ids, &mut aux_workspace, &mut z_loss);
        }
    }
}
