//! The naming schemes: where a block's router, experts and shared experts are, and how they
//! stack into the layer's `[E, 2h, d]` and `[E, d, h]`.
use super::{Checkpoint, Tensor, problem};
use crate::layers::{DeviceWeights, LayerWeights, MoeConfig};
use crate::ops::FloatElement;
use crate::{Device, DeviceBuffer, Result};
use half::{bf16, f16};
use safetensors::Dtype;
use std::borrow::Cow;

/// Where a decoder layer's MoE block sits: Mixtral's `block_sparse_moe`, or the `mlp` of
/// Qwen3-MoE and DeepSeek.
const BLOCKS: [&str; 2] = ["block_sparse_moe", "mlp"];

/// The decoder layer whose router `name` is, if it is one.
pub(super) fn moe_layer_of(name: &str) -> Option<usize> {
    let (layer, rest) = name.strip_prefix("model.layers.")?.split_once('.')?;
    let router = BLOCKS.iter().any(|b| rest.strip_prefix(b) == Some(".gate.weight"));
    router.then(|| layer.parse().ok()).flatten()
}

/// `model.layers.{layer}.{block}.` for the block that has a router.
fn block(checkpoint: &Checkpoint, layer: usize) -> Result<String> {
    let prefixes = BLOCKS.map(|b| format!("model.layers.{layer}.{b}."));
    (prefixes.iter())
        .find(|p| checkpoint.contains(&format!("{p}gate.weight")))
        .cloned()
        .ok_or_else(|| {
            let name = format!("{}gate.weight", prefixes[1]);
            problem(
                name,
                format!("not in the checkpoint: layer {layer} has no routed MoE block"),
            )
        })
}

/// The dtype a `T` is stored as in safetensors.
pub(super) fn dtype_of<T: FloatElement>() -> Dtype {
    match T::NAME {
        "f16" => Dtype::F16,
        "bf16" => Dtype::BF16,
        _ => Dtype::F32,
    }
}

/// The values of `tensor` as `T`: borrowed from the mapping when it already holds `T` (aligned),
/// else converted (rounded to nearest even through f32).
fn values<'a, T: FloatElement>(tensor: &Tensor<'a>) -> Result<Cow<'a, [T]>> {
    let bytes = tensor.bytes;
    if tensor.dtype == dtype_of::<T>() && cfg!(target_endian = "little") {
        return Ok(match bytemuck::try_cast_slice(bytes) {
            Ok(values) => Cow::Borrowed(values),
            Err(_) => {
                let mut values = vec![T::zeroed(); bytes.len() / size_of::<T>()];
                bytemuck::cast_slice_mut::<T, u8>(&mut values).copy_from_slice(bytes);
                Cow::Owned(values)
            }
        });
    }
    let pairs = || bytes.chunks_exact(2).map(|b| u16::from_le_bytes([b[0], b[1]]));
    let converted: Vec<T> = match tensor.dtype {
        Dtype::F32 => (bytes.chunks_exact(4))
            .map(|b| T::from_f32(f32::from_le_bytes([b[0], b[1], b[2], b[3]])))
            .collect(),
        Dtype::BF16 => pairs().map(|b| T::from_f32(bf16::from_bits(b).to_f32())).collect(),
        Dtype::F16 => pairs().map(|b| T::from_f32(f16::from_bits(b).to_f32())).collect(),
        other => {
            return Err(problem(
                tensor.name,
                format!("dtype {other:?}: expected F32, F16 or BF16"),
            ));
        }
    };
    Ok(Cow::Owned(converted))
}

/// The tensor `name` as `T`, checked to have `shape`.
fn read<'a, T: FloatElement>(checkpoint: &'a Checkpoint, name: &'a str, shape: &[usize]) -> Result<Cow<'a, [T]>> {
    let tensor = checkpoint.tensor(name)?;
    if tensor.shape != shape {
        return Err(problem(name, format!("shape {:?}: expected {shape:?}", tensor.shape)));
    }
    values(&tensor)
}

/// The tensor `name` (shape `shape`) as a new `T` device buffer.
fn upload<T: FloatElement>(
    device: &Device,
    checkpoint: &Checkpoint,
    name: &str,
    shape: &[usize],
) -> Result<DeviceBuffer<T>> {
    device.upload(&read::<T>(checkpoint, name, shape)?)
}

/// One SwiGLU FFN of hidden size `h` stored as `{base}{gate|up|down}.weight` (`[h, d]`,
/// `[h, d]`, `[d, h]`): its gate rows then up rows appended to `w1`, its down rows to `w2`.
fn append_ffn<T: FloatElement>(
    checkpoint: &Checkpoint,
    base: &str,
    [gate, up, down]: [&str; 3],
    (h, d): (usize, usize),
    (w1, w2): (&mut Vec<T>, &mut Vec<T>),
) -> Result<()> {
    let name = |proj: &str| format!("{base}{proj}.weight");
    w1.extend_from_slice(&read::<T>(checkpoint, &name(gate), &[h, d])?);
    w1.extend_from_slice(&read::<T>(checkpoint, &name(up), &[h, d])?);
    w2.extend_from_slice(&read::<T>(checkpoint, &name(down), &[d, h])?);
    Ok(())
}

/// The routed experts as the layer's `w1 [E, 2h, d]` and `w2 [E, d, h]`: fused tensors as they
/// are, per-expert ones stacked.
fn experts<T: FloatElement>(
    checkpoint: &Checkpoint,
    device: &Device,
    block: &str,
    config: &MoeConfig,
) -> Result<(DeviceBuffer<T>, DeviceBuffer<T>)> {
    let (e, d, h) = (config.experts, config.dim, config.hidden);
    let fused = [
        format!("{block}experts.gate_up_proj"),
        format!("{block}experts.gate_up_proj.weight"),
    ];
    if let Some(gate_up) = fused.iter().find(|n| checkpoint.contains(n)) {
        let down = gate_up.replace("gate_up_proj", "down_proj");
        let w1 = upload(device, checkpoint, gate_up, &[e, 2 * h, d])?;
        return Ok((w1, upload(device, checkpoint, &down, &[e, d, h])?));
    }
    let names = if checkpoint.contains(&format!("{block}experts.0.w1.weight")) {
        ["w1", "w3", "w2"]
    } else {
        ["gate_proj", "up_proj", "down_proj"]
    };
    let (mut w1, mut w2) = (Vec::with_capacity(e * 2 * h * d), Vec::with_capacity(e * d * h));
    for i in 0..e {
        let base = format!("{block}experts.{i}.");
        append_ffn(checkpoint, &base, names, (h, d), (&mut w1, &mut w2))?;
    }
    Ok((device.upload(&w1)?, device.upload(&w2)?))
}

/// DeepSeek's shared experts as one FFN of hidden size n·h (`None` without them).
fn shared<T: FloatElement>(
    checkpoint: &Checkpoint,
    device: &Device,
    block: &str,
    config: &MoeConfig,
) -> Result<Option<(DeviceBuffer<T>, DeviceBuffer<T>)>> {
    let base = format!("{block}shared_experts.");
    let qwen2 = format!("{block}shared_expert.gate_proj.weight");
    if checkpoint.contains(&qwen2) {
        return Err(problem(qwen2, "a gated shared expert (Qwen2-MoE): not supported"));
    }
    let names = ["gate_proj", "up_proj", "down_proj"];
    if config.shared_experts == 0 {
        let stray = format!("{base}gate_proj.weight");
        if checkpoint.contains(&stray) {
            return Err(problem(
                stray,
                "shared experts, but config.json has no n_shared_experts",
            ));
        }
        return Ok(None);
    }
    let (hs, d) = (config.shared_hidden(), config.dim);
    let (mut w1, mut w2) = (Vec::with_capacity(2 * hs * d), Vec::with_capacity(d * hs));
    append_ffn(checkpoint, &base, names, (hs, d), (&mut w1, &mut w2))?;
    Ok(Some((device.upload(&w1)?, device.upload(&w2)?)))
}

/// Decoder layer `layer`'s block as the layer's weights.
pub(super) fn layer_weights<T: FloatElement>(
    checkpoint: &Checkpoint,
    device: &Device,
    layer: usize,
    config: &MoeConfig,
) -> Result<LayerWeights<T>> {
    let block = block(checkpoint, layer)?;
    let e = config.experts;
    let gate = upload(device, checkpoint, &format!("{block}gate.weight"), &[e, config.dim])?;
    let f32_tensor = |name: &str| -> Result<DeviceBuffer<f32>> { upload(device, checkpoint, name, &[e]) };
    let bias = format!("{block}gate.bias");
    let gate_f32 = if checkpoint.contains(&bias) {
        vec![("b", f32_tensor(&bias)?)]
    } else {
        vec![]
    };
    let correction = format!("{block}gate.e_score_correction_bias");
    let selection_bias = match (config.has_router_bias(), checkpoint.contains(&correction)) {
        (true, _) => Some(f32_tensor(&correction)?),
        (false, false) => None,
        (false, true) => {
            return Err(problem(
                correction,
                "a selection bias, but config.json describes a softmax router",
            ));
        }
    };
    let (w1, w2) = experts(checkpoint, device, &block, config)?;
    let weights = DeviceWeights {
        gate: vec![("w", gate)],
        gate_f32,
        selection_bias,
        w1,
        w2,
        shared: shared(checkpoint, device, &block, config)?,
    };
    LayerWeights::new(config, weights)
}
