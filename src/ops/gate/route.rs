//! The gate's scores and the router's selection in one call (`kernels/gate.cu`): the routing
//! step of a layer, `z = score(X)` then the top-k of z (and the routing map's count), one launch
//! where the selection fits the scoring kernel. Above the decode threshold it is the forward's
//! tile (for the f16/bf16 linear gate past 128 experts, one twice as wide: 256, DeepSeek-V3's
//! router in one launch) wherever one block holds every expert of its 64 tokens
//! (`gate_route_<form>_<dtype>_e<N>`, [`route_tile_max_experts`]); at decode (T <= 64) the
//! linear gate's decode kernel, whose last block of each 16 tokens selects them once every block
//! has written its logits (`gate_decode_route_linear_<dtype>_e<N>`: its tickets live in the
//! map's workspace, so it needs the map). [`route_with_losses`] adds the router losses, in the
//! tile kernel's launch where their chunks are its tiles.
use super::{
    DECODE_LINEAR_TOKENS, DECODE_MAX_TOKENS, GateForm, GateShape, GateWeights, TILE, check_scores, decode_config,
    decode_slices, pair_tile, scores, scores_args, scoring_tile, tile_config,
};
use crate::ops::FloatElement;
use crate::ops::dispatch::{self, CountedMap, MapParams};
use crate::ops::router::balance::{check_loss_targets, loss_args, loss_chunks_are_tiles};
use crate::ops::router::{
    self, AuxLossTarget, RouterConfig, SelectedAuxLoss, Selection, ZLossTarget, select_row_width,
};
use crate::{Device, DeviceBuffer, DeviceSlice, DeviceSliceMut, Error, Result};

/// No router loss in a routing step's launch.
const NO_AUX: Option<SelectedAuxLoss<'static, DeviceBuffer<f32>>> = None;
const NO_Z_LOSS: Option<ZLossTarget<'static, DeviceBuffer<f32>>> = None;

/// The most experts a tile kernel fuses (T > 64), over every form and dtype: the f16/bf16 linear
/// gate's widest route tile, whose block holds 256 experts of its 64 tokens
/// ([`route_tile_max_experts`] for each form and dtype).
pub const ROUTE_MAX_EXPERTS: usize = WIDE_ROUTE_EXPERTS;
/// The experts of `gate_route_linear_<f16|bf16>_e256`'s tile: twice the scoring kernel's, for
/// the router widths of 129 to 256 experts (DeepSeek-V3's 256 among them).
const WIDE_ROUTE_EXPERTS: usize = 256;
/// The most experts the decode kernel fuses (T <= 64): the selection's row width of 512 at 16
/// slots a lane keeps it at 3 blocks per SM without spilling.
pub const DECODE_ROUTE_MAX_EXPERTS: usize = 512;

// The decode route's token blocks each take a ticket in the map workspace's header.
const _: () = assert!(DECODE_MAX_TOKENS.div_ceil(DECODE_LINEAR_TOKENS) <= dispatch::BLOCK_TICKETS);

/// The one-launch kernel of a routing step, if any.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FusedRoute {
    /// `gate_route_<form>_<dtype>_e<N>`: the forward's tile, T > 64.
    Tile,
    /// `gate_decode_route_linear_<dtype>_e<N>`: the decode kernel, 1 <= T <= 64, with the map.
    Decode,
}

/// The most experts the tile kernel of `form` with X of type `T` fuses above T = 64: the experts
/// one block of its route tile holds (`gate_route_<form>_<dtype>_e<N>`): the linear gate 256 in
/// f16/bf16 (a tile twice the scoring kernel's past 128) and 128 in f32 (split tf32), the rank
/// forms 16 (their pair tiles) in every dtype.
pub fn route_tile_max_experts<T: FloatElement>(form: GateForm) -> usize {
    route_tile::<T>(form, usize::MAX).0
}

/// The tile of the route kernel for `experts` experts: the forward's, except that the f16/bf16
/// linear gate takes its 256-expert tile past 128 (`gate_route_linear_<dtype>_e256`).
fn route_tile<T: FloatElement>(form: GateForm, experts: usize) -> (usize, usize) {
    let tile = scoring_tile::<T>(form);
    if form == GateForm::Linear && size_of::<T>() == 2 && experts > tile.0 {
        pair_tile(form, WIDE_ROUTE_EXPERTS)
    } else {
        tile
    }
}

fn fused_route<T: FloatElement>(shape: &GateShape, weights: &GateWeights<'_, T>, counted: bool) -> Option<FusedRoute> {
    let (t, form) = (shape.tokens, weights.form());
    if t > DECODE_MAX_TOKENS {
        (shape.experts <= route_tile_max_experts::<T>(form)).then_some(FusedRoute::Tile)
    } else {
        let fits = form == GateForm::Linear && shape.experts <= DECODE_ROUTE_MAX_EXPERTS;
        (counted && t > 0 && fits).then_some(FusedRoute::Decode)
    }
}

/// Whether [`scores_and_select`] runs as one launch (`counted`: a map is given):
/// - above the decode threshold (T > 64), every form and dtype with E <=
///   [`route_tile_max_experts`] (one block of the forward's tile holds every expert);
/// - at 1 <= T <= 64, the linear gate in any dtype with E <= [`DECODE_ROUTE_MAX_EXPERTS`], when
///   counting a map (the decode kernel's blocks meet on tickets in the map's workspace).
///
/// Elsewhere it is the two calls.
pub fn route_is_fused<T: FloatElement>(shape: &GateShape, weights: &GateWeights<'_, T>, counted: bool) -> bool {
    fused_route(shape, weights, counted).is_some()
}

/// `z = score(X)` ([`scores`]), then the top-k selection of z ([`router::select_counted`]: `ids`,
/// `weights` and `nonfinite_rows`, and the count of `map` when given), with the bits of those
/// two calls. Where [`route_is_fused`] holds it is one launch: above T = 64 each block scores its
/// 64 tokens against every expert on the forward's tile, writes their logits to z, and selects them
/// (and counts the map) as the selection kernel would, reading them back from L1/L2; at T <= 64
/// the decode kernel writes z and the last block of each 16 tokens selects and counts them. Else
/// the two calls. `router.experts` must be `shape.experts`. No host sync.
#[allow(clippy::too_many_arguments)]
pub fn scores_and_select<T: FloatElement, B: DeviceSlice<f32>, M: DeviceSliceMut<i32>, W: DeviceSliceMut<i32>>(
    device: &Device,
    shape: &GateShape,
    gate: &GateWeights<'_, T>,
    x: &impl DeviceSlice<T>,
    z: &mut impl DeviceSliceMut<f32>,
    router: &RouterConfig,
    bias: Option<&B>,
    ids: &mut impl DeviceSliceMut<i32>,
    weights: &mut impl DeviceSliceMut<f32>,
    nonfinite_rows: &mut impl DeviceSliceMut<u32>,
    map: Option<&mut CountedMap<'_, M, W>>,
) -> Result<()> {
    let place = false;
    let selection = Selection {
        ids,
        weights,
        nonfinite_rows,
    };
    run_step(
        device, shape, gate, x, z, router, bias, selection, map, place, NO_AUX, NO_Z_LOSS,
    )
    .map(|_| ())
}

/// The whole routing step into a complete routing map: [`scores_and_select`] with `map`'s count,
/// then its placement ([`dispatch::place_counted`]), with the bits of those calls. At decode
/// (1 <= T <= 64, E <= [`DECODE_ROUTE_MAX_EXPERTS`], the linear gate) it is one launch (and
/// the count's memset, none when `map.zeroed`): the block that completes the count also places
/// every slot. Elsewhere 2 launches where [`route_is_fused`] holds, else 3. Every way leaves
/// `map.workspace` zeroed for the next route. No host sync.
#[allow(clippy::too_many_arguments)]
pub fn route<T: FloatElement, B: DeviceSlice<f32>, M: DeviceSliceMut<i32>, W: DeviceSliceMut<i32>>(
    device: &Device,
    shape: &GateShape,
    gate: &GateWeights<'_, T>,
    x: &impl DeviceSlice<T>,
    z: &mut impl DeviceSliceMut<f32>,
    router: &RouterConfig,
    bias: Option<&B>,
    ids: &mut impl DeviceSliceMut<i32>,
    weights: &mut impl DeviceSliceMut<f32>,
    nonfinite_rows: &mut impl DeviceSliceMut<u32>,
    map: &mut CountedMap<'_, M, W>,
) -> Result<()> {
    let place = true;
    let selection = Selection {
        ids: &mut *ids,
        weights,
        nonfinite_rows,
    };
    let map_ref = Some(&mut *map);
    if run_step(
        device, shape, gate, x, z, router, bias, selection, map_ref, place, NO_AUX, NO_Z_LOSS,
    )? {
        return Ok(());
    }
    dispatch::place_counted(device, &*ids, shape.tokens, router.k, map)
}

/// [`route`] and the router losses of the ids it selects ([`router::select_with_losses`]'s
/// targets: the aux loss, the z-loss or both, with their workspaces), with the bits of
/// [`route`] then [`router::losses`]:
/// - above T = 64 where [`route_is_fused`] holds and the losses' chunks are the tile's 64 tokens
///   (T <= 65536 a segment, and one segment or segments a multiple of 64 long): the losses run in
///   the tile's launch, 2 launches with the placement;
/// - at decode where [`route_is_fused`] holds: the one-launch [`route`], then [`router::losses`];
/// - elsewhere [`scores`], [`router::select_with_losses`] (with the map's count) and
///   [`dispatch::place_counted`]: 3 launches.
///
/// With neither loss it is [`route`]. Every way leaves `map.workspace` zeroed for the next
/// route. No host sync.
#[allow(clippy::too_many_arguments)]
pub fn route_with_losses<T, B, M, W, LA, LZ>(
    device: &Device,
    shape: &GateShape,
    gate: &GateWeights<'_, T>,
    x: &impl DeviceSlice<T>,
    z: &mut impl DeviceSliceMut<f32>,
    router: &RouterConfig,
    bias: Option<&B>,
    ids: &mut impl DeviceSliceMut<i32>,
    weights: &mut impl DeviceSliceMut<f32>,
    nonfinite_rows: &mut impl DeviceSliceMut<u32>,
    map: &mut CountedMap<'_, M, W>,
    aux: Option<SelectedAuxLoss<'_, LA>>,
    z_loss: Option<ZLossTarget<'_, LZ>>,
) -> Result<()>
where
    T: FloatElement,
    B: DeviceSlice<f32>,
    M: DeviceSliceMut<i32>,
    W: DeviceSliceMut<i32>,
    LA: DeviceSliceMut<f32>,
    LZ: DeviceSliceMut<f32>,
{
    let tokens = shape.tokens;
    let selection = Selection {
        ids: &mut *ids,
        weights: &mut *weights,
        nonfinite_rows: &mut *nonfinite_rows,
    };
    check_step(shape, gate, x, z, router, bias, &selection, Some(&*map))?;
    check_loss_targets(router, &*z, tokens, &aux, &z_loss)?;
    let fused = fused_route(shape, gate, true);
    if (aux.is_none() && z_loss.is_none()) || fused == Some(FusedRoute::Decode) {
        route(
            device,
            shape,
            gate,
            x,
            z,
            router,
            bias,
            ids,
            weights,
            nonfinite_rows,
            map,
        )?;
        let aux = aux.map(|a| AuxLossTarget {
            config: a.config,
            ids: &*ids,
            workspace: a.workspace,
            loss: a.loss,
        });
        return router::losses(device, router, &*z, aux, z_loss); // nothing without a loss
    }
    match fused {
        Some(FusedRoute::Tile) if loss_chunks_are_tiles(aux.as_ref().map(|a| a.config), tokens, TILE) => {
            let selection = Selection {
                ids: &mut *ids,
                weights,
                nonfinite_rows,
            };
            let place = false;
            run_step(
                device,
                shape,
                gate,
                x,
                z,
                router,
                bias,
                selection,
                Some(&mut *map),
                place,
                aux,
                z_loss,
            )?;
            dispatch::place_counted(device, &*ids, tokens, router.k, map)
        }
        _ => {
            scores(device, shape, gate, x, z)?;
            let counted = Some(&mut *map);
            router::select_with_losses(
                device,
                router,
                &*z,
                bias,
                &mut *ids,
                weights,
                nonfinite_rows,
                counted,
                aux,
                z_loss,
            )?;
            dispatch::place_counted(device, &*ids, tokens, router.k, map)
        }
    }
}

/// Scores, selection and the map's count; with `place` the decode kernel also places the map;
/// with a loss target the tile kernel also runs the losses (the caller has checked that their
/// chunks are its tiles: [`loss_chunks_are_tiles`]). Returns whether the map was placed.
#[allow(clippy::too_many_arguments)]
fn run_step<T, B, I, Wt, C, M, W, LA, LZ>(
    device: &Device,
    shape: &GateShape,
    gate: &GateWeights<'_, T>,
    x: &impl DeviceSlice<T>,
    z: &mut impl DeviceSliceMut<f32>,
    router: &RouterConfig,
    bias: Option<&B>,
    selection: Selection<'_, I, Wt, C>,
    map: Option<&mut CountedMap<'_, M, W>>,
    place: bool,
    aux: Option<SelectedAuxLoss<'_, LA>>,
    z_loss: Option<ZLossTarget<'_, LZ>>,
) -> Result<bool>
where
    T: FloatElement,
    B: DeviceSlice<f32>,
    I: DeviceSliceMut<i32>,
    Wt: DeviceSliceMut<f32>,
    C: DeviceSliceMut<u32>,
    M: DeviceSliceMut<i32>,
    W: DeviceSliceMut<i32>,
    LA: DeviceSliceMut<f32>,
    LZ: DeviceSliceMut<f32>,
{
    check_step(shape, gate, x, z, router, bias, &selection, map.as_deref())?;
    let Some(fused) = fused_route(shape, gate, map.is_some()) else {
        scores(device, shape, gate, x, z)?;
        let Selection {
            ids,
            weights,
            nonfinite_rows,
        } = selection;
        router::select_counted(device, router, &*z, bias, ids, weights, nonfinite_rows, map)?;
        return Ok(false);
    };
    let tokens = shape.tokens;
    check_loss_targets(router, &*z, tokens, &aux, &z_loss)?;
    let (o, form) = (gate.operands(), gate.form());
    // gate_[decode_]route_<form>_<dtype>_e<N>: GATE_SCORES_PARAMS, the router's bias and k,
    // then the selection's parameters after k and the map's (MapParams); then the tile
    // kernel's losses (ROUTER_LOSS_PARAMS), the decode kernel's slices.
    let args = scores_args(device, shape, form, &o, x, z)
        .input_or_null("bias", bias)
        .scalar(router.k as i32);
    let params = match fused {
        FusedRoute::Tile => MapParams::CountOrNull,
        FusedRoute::Decode => MapParams::CountThenPlacement { place },
    };
    let (args, map_shared) = selection.args(device, router, tokens, bias, args, map, params)?;
    let (mut config, args, kernel) = match fused {
        FusedRoute::Tile => {
            let (args, losses) = loss_args(router, tokens, args, aux, z_loss)?;
            let mut config = tile_config(shape, route_tile::<T>(form, shape.experts))?;
            config.shared_bytes = config.shared_bytes.max(losses.shared_bytes);
            (config, args, "gate_route")
        }
        FusedRoute::Decode => (
            decode_config(shape, form)?,
            args.scalar(decode_slices(tokens) as i32),
            "gate_decode_route",
        ),
    };
    config.shared_bytes = config.shared_bytes.max(map_shared);
    let row = select_row_width(shape.experts);
    let name = format!("{kernel}_{}_{}_e{row}", form.kernel_name(), T::NAME);
    device.launch(&name, config, args)?;
    Ok(fused == FusedRoute::Decode && place)
}

/// Every check of a routing step's inputs and outputs (the gate's, the router's, the
/// selection's and the map's), before anything launches: a refusal launches nothing, whichever
/// way the step runs.
#[allow(clippy::too_many_arguments)]
fn check_step<T, B, I, Wt, C, M, W>(
    shape: &GateShape,
    gate: &GateWeights<'_, T>,
    x: &impl DeviceSlice<T>,
    z: &impl DeviceSlice<f32>,
    router: &RouterConfig,
    bias: Option<&B>,
    selection: &Selection<'_, I, Wt, C>,
    map: Option<&CountedMap<'_, M, W>>,
) -> Result<()>
where
    T: FloatElement,
    B: DeviceSlice<f32>,
    I: DeviceSliceMut<i32>,
    Wt: DeviceSliceMut<f32>,
    C: DeviceSliceMut<u32>,
    M: DeviceSliceMut<i32>,
    W: DeviceSliceMut<i32>,
{
    check_scores(shape, gate, x, z)?;
    if router.experts != shape.experts {
        return Err(Error::InvalidArgument {
            argument: "router.experts",
            value: router.experts.to_string(),
            expected: format!("the gate's experts, shape.experts = {}", shape.experts),
        });
    }
    router.validate()?;
    selection.check(router, shape.tokens, bias)?;
    map.map_or(Ok(()), |m| m.check(router.experts, shape.tokens, router.k))
}
