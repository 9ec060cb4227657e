//! The gate's scores and the router's selection in one call (`kernels/gate.cu`): the routing
//! step of a layer, `z = score(X)` then the top-k of z (and the routing map's count), one launch
//! where the selection fits the scoring kernel. Above the decode threshold it is the forward's
//! tile wherever one block holds every expert of its 64 tokens
//! (`gate_route_<form>_<dtype>_e<N>`, [`route_tile_max_experts`]); at decode (T <= 64) the
//! linear gate's decode kernel, whose last block of each 16 tokens selects them once every block
//! has written its logits (`gate_decode_route_linear_<dtype>_e<N>`: its tickets live in the
//! map's workspace, so it needs the map).
use super::{
    DECODE_LINEAR_TOKENS, DECODE_MAX_TOKENS, GateForm, GateShape, GateWeights, ScoringTile, check_scores,
    decode_config, decode_slices, scores, scores_args, scoring_config,
};
use crate::ops::FloatElement;
use crate::ops::dispatch::{self, CountedMap, MapParams};
use crate::ops::router::{self, RouterConfig, Selection, select_row_width};
use crate::{Device, DeviceSlice, DeviceSliceMut, Error, Result};

/// The most experts a tile kernel fuses (T > 64), over every form and dtype: the linear gate's
/// tensor-core tile, whose block holds 128 experts of its 64 tokens ([`route_tile_max_experts`]
/// for each form and dtype).
pub const ROUTE_MAX_EXPERTS: usize = 128;
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
/// one block of its forward tile holds (`gate_route_<form>_<dtype>_e<N>`): the linear gate 128 on
/// tensor cores (f16/bf16) and 64 on FMA tiles (f32); the rank forms 16 and 32.
pub fn route_tile_max_experts<T: FloatElement>(form: GateForm) -> usize {
    ScoringTile::forward::<T>().of(form).0
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
    run_step(
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
        place,
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
    if run_step(
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
        Some(&mut *map),
        place,
    )? {
        return Ok(());
    }
    dispatch::place_counted(device, &*ids, shape.tokens, router.k, map)
}

/// Scores, selection and the map's count; with `place` the decode kernel also places the map.
/// Returns whether the map was placed.
#[allow(clippy::too_many_arguments)]
fn run_step<T: FloatElement, B: DeviceSlice<f32>, M: DeviceSliceMut<i32>, W: DeviceSliceMut<i32>>(
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
    place: bool,
) -> Result<bool> {
    if router.experts != shape.experts {
        return Err(Error::InvalidArgument {
            argument: "router.experts",
            value: router.experts.to_string(),
            expected: format!("the gate's experts, shape.experts = {}", shape.experts),
        });
    }
    let Some(fused) = fused_route(shape, gate, map.is_some()) else {
        scores(device, shape, gate, x, z)?;
        router::select_counted(device, router, &*z, bias, ids, weights, nonfinite_rows, map)?;
        return Ok(false);
    };
    check_scores(shape, gate, x, z)?;
    router.validate()?;
    let (o, form) = (gate.operands(), gate.form());
    // gate_[decode_]route_<form>_<dtype>_e<N>: GATE_SCORES_PARAMS, the router's bias and k,
    // then the selection's parameters after k and the map's (MapParams); the decode
    // kernel's slices last.
    let args = scores_args(device, shape, form, &o, x, z)
        .input_or_null("bias", bias)
        .scalar(router.k as i32);
    let selection = Selection {
        ids,
        weights,
        nonfinite_rows,
    };
    let params = match fused {
        FusedRoute::Tile => MapParams::CountOrNull,
        FusedRoute::Decode => MapParams::CountThenPlacement { place },
    };
    let (args, map_shared) = selection.args(device, router, shape.tokens, bias, args, map, params)?;
    let row = select_row_width(shape.experts);
    let (mut config, args, kernel) = match fused {
        FusedRoute::Tile => (
            scoring_config(form, shape, ScoringTile::forward::<T>())?,
            args,
            "gate_route",
        ),
        FusedRoute::Decode => (
            decode_config(shape, form)?,
            args.scalar(decode_slices(shape.tokens) as i32),
            "gate_decode_route",
        ),
    };
    config.shared_bytes = config.shared_bytes.max(map_shared);
    let name = format!("{kernel}_{}_{}_e{row}", form.kernel_name(), T::NAME);
    device.launch(&name, config, args)?;
    Ok(fused == FusedRoute::Decode && place)
}
