//! The gate's scores and the router's selection in one call (`gate_route_linear_<dtype>_e<N>`,
//! `kernels/gate.cu`): the routing step of a layer, `z = score(X)` then the top-k of z (and the
//! routing map's count), one launch where the selection fits the scoring kernel's tile.
use super::{
    DECODE_MAX_TOKENS, GateForm, GateShape, GateWeights, ScoringTile, check_scores, scores, scores_args, scoring_config,
};
use crate::ops::FloatElement;
use crate::ops::dispatch::CountedMap;
use crate::ops::router::{self, RouterConfig, Selection, select_row_width};
use crate::{Device, DeviceSlice, DeviceSliceMut, Error, Result};

/// The most experts [`scores_and_select`] fuses: the linear gate's tensor-core tile, whose block
/// holds every expert of its 64 tokens.
pub const ROUTE_MAX_EXPERTS: usize = 128;

/// Whether [`scores_and_select`] runs as one launch: the linear gate on tensor cores (f16/bf16)
/// with E <= [`ROUTE_MAX_EXPERTS`], above the decode threshold (at T <= 64 the gate's decode
/// kernel, which spreads the weights over many blocks, beats one 64-token tile streaming them
/// all, and the selection stays a second launch).
pub fn route_is_fused<T: FloatElement>(shape: &GateShape, weights: &GateWeights<'_, T>) -> bool {
    weights.form() == GateForm::Linear
        && size_of::<T>() == 2
        && shape.experts <= ROUTE_MAX_EXPERTS
        && shape.tokens > DECODE_MAX_TOKENS
}

/// `z = score(X)` ([`scores`]), then the top-k selection of z ([`router::select_counted`]: `ids`,
/// `weights` and `nonfinite_rows`, and the count of `map` when given), with the bits of those
/// two calls. Where [`route_is_fused`] holds it is one launch: each block scores its 64 tokens against
/// every expert on tensor cores, writes their logits to z, and selects them (and counts the
/// map) as the selection kernel would, reading them back from L1/L2; else the two calls.
/// `router.experts` must be `shape.experts`. No host sync.
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
    if router.experts != shape.experts {
        return Err(Error::InvalidArgument {
            argument: "router.experts",
            value: router.experts.to_string(),
            expected: format!("the gate's experts, shape.experts = {}", shape.experts),
        });
    }
    if !route_is_fused(shape, gate) {
        scores(device, shape, gate, x, z)?;
        return router::select_counted(device, router, &*z, bias, ids, weights, nonfinite_rows, map);
    }
    check_scores(shape, gate, x, z)?;
    router.validate()?;
    let o = gate.operands();
    // gate_route_linear_<dtype>_e<N>: GATE_SCORES_PARAMS, the router's bias and k, then the
    // selection's parameters after k and the count's (null without a map).
    let args = scores_args(device, shape, GateForm::Linear, &o, x, z)
        .input_or_null("bias", bias)
        .scalar(router.k as i32);
    let selection = Selection {
        ids,
        weights,
        nonfinite_rows,
    };
    let (args, count_shared) = selection.args(device, router, shape.tokens, bias, args, map, true)?;
    let mut config = scoring_config(GateForm::Linear, shape, ScoringTile::TensorCores)?;
    config.shared_bytes = config.shared_bytes.max(count_shared);
    let row = select_row_width(shape.experts);
    device.launch(&format!("gate_route_linear_{}_e{row}", T::NAME), config, args)
}
