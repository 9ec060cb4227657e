//! ESFT deltas (math §8): a safetensors file holding only the experts (and, if it was trained,
//! the gate) that expert-specialized fine-tuning changed, named as in the base checkpoint, and
//! applied back onto a layer's weights.
//!
//! Tensor names follow the base checkpoint's per-expert scheme under the block's prefix `{p}`
//! (`model.layers.{i}.mlp.` or `model.layers.{i}.block_sparse_moe.`): each tuned expert `e` is
//! `{p}experts.{e}.gate_proj/up_proj/down_proj.weight` (`[h, d]`, `[h, d]`, `[d, h]`), or
//! Mixtral's `{p}experts.{e}.w1/w3/w2.weight` under `block_sparse_moe`; a trained gate is
//! `{p}gate.weight` (`[E, d]`) and, when the layer has one, `{p}gate.bias` (`[E]`, f32). Tensors
//! keep the layer's dtype, so export then apply gives back the tuned bits exactly. The metadata
//! records the format, the prefix (which names the layer), the expert ids, whether the gate is
//! included, the dtype and the tensor names.
use super::layout::dtype_of;
use super::problem;
use crate::layers::{LayerWeights, MoeConfig};
use crate::ops::FloatElement;
use crate::{Device, Error, Result};
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};
use std::collections::HashMap;
use std::path::Path;

/// The `format` metadata of an ESFT file.
pub const FORMAT: &str = "moe-kernels-esft/1";

/// What an ESFT file holds (its metadata, checked against its tensors).
#[derive(Debug, Clone, PartialEq)]
pub struct TunedExperts {
    /// The block's tensor-name prefix, e.g. `model.layers.3.mlp.`.
    pub prefix: String,
    /// The tuned experts, ascending.
    pub experts: Vec<usize>,
    /// Whether the gate is included.
    pub gate: bool,
    /// Every tensor name, as in the base checkpoint.
    pub tensors: Vec<String>,
    /// Bytes of the tensors.
    pub tuned_bytes: u64,
}

impl TunedExperts {
    /// Tuned bytes over the bytes of every tensor of `weights` (the layer the experts belong
    /// to): what shipping only the tuned experts saves.
    pub fn storage_ratio<T: FloatElement>(&self, weights: &LayerWeights<T>) -> f64 {
        let full: usize = (weights.names().into_iter())
            .map(|name| match weights.tensor(name) {
                Ok(t) => t.len() * size_of::<T>(),
                Err(_) => weights.tensor_f32(name).map_or(0, |t| t.len() * size_of::<f32>()),
            })
            .sum();
        self.tuned_bytes as f64 / full.max(1) as f64
    }
}

/// One tensor of an ESFT file and where it lives in the layer: `len` elements of the layer
/// tensor `source` from element `start`.
struct DeltaTensor {
    name: String,
    dtype: Dtype,
    shape: Vec<usize>,
    source: &'static str,
    start: usize,
}

impl DeltaTensor {
    fn len(&self) -> usize {
        self.shape.iter().product()
    }
}

/// The tensors of a delta of `experts` (and the gate when `gate`; its f32 bias when
/// `gate_bias`) under `prefix`, for a layer of `config` stored as `T`: each expert's gate, up
/// and down projections, then the gate.
fn delta_tensors<T: FloatElement>(
    config: &MoeConfig,
    prefix: &str,
    experts: &[usize],
    (gate, gate_bias): (bool, bool),
) -> Vec<DeltaTensor> {
    let (e, d, h) = (config.experts, config.dim, config.hidden);
    let [gate_proj, up_proj, down_proj] = if prefix.contains("block_sparse_moe") {
        ["w1", "w3", "w2"]
    } else {
        ["gate_proj", "up_proj", "down_proj"]
    };
    let tensor = |name: String, shape: Vec<usize>, source, start| DeltaTensor {
        name,
        dtype: if source == "gate.b" {
            Dtype::F32
        } else {
            dtype_of::<T>()
        },
        shape,
        source,
        start,
    };
    let mut tensors = vec![];
    for &id in experts {
        let name = |proj: &str| format!("{prefix}experts.{id}.{proj}.weight");
        let rows = id * 2 * h * d;
        tensors.push(tensor(name(gate_proj), vec![h, d], "experts.w1", rows));
        tensors.push(tensor(name(up_proj), vec![h, d], "experts.w1", rows + h * d));
        tensors.push(tensor(name(down_proj), vec![d, h], "experts.w2", id * d * h));
    }
    if gate {
        tensors.push(tensor(format!("{prefix}gate.weight"), vec![e, d], "gate.w", 0));
    }
    if gate && gate_bias {
        tensors.push(tensor(format!("{prefix}gate.bias"), vec![e], "gate.b", 0));
    }
    tensors
}

fn check_prefix(prefix: &str) -> Result<()> {
    let layer = prefix
        .strip_prefix("model.layers.")
        .and_then(|rest| rest.split_once('.'));
    let block = layer.map(|(_, block)| block);
    let ok = layer.is_some_and(|(i, _)| i.parse::<usize>().is_ok())
        && matches!(block, Some("mlp.") | Some("block_sparse_moe."));
    if ok {
        return Ok(());
    }
    Err(Error::InvalidArgument {
        argument: "prefix",
        value: prefix.into(),
        expected: "a block prefix `model.layers.{i}.mlp.` or `model.layers.{i}.block_sparse_moe.`".into(),
    })
}

fn check_experts(experts: &[usize], config: &MoeConfig) -> Result<()> {
    let ascending = experts.windows(2).all(|w| w[0] < w[1]);
    if ascending && experts.iter().all(|&e| e < config.experts) {
        return Ok(());
    }
    Err(Error::InvalidArgument {
        argument: "experts",
        value: format!("{experts:?}"),
        expected: format!("distinct expert ids in 0..{}, ascending", config.experts),
    })
}

/// Writes the tuned `experts` of `weights` (and its gate when `gate`) to `path` under the
/// block prefix `prefix`. Downloads the expert and gate tensors (host syncs: after training,
/// not inside a step). Only a linear or sigmoid router's gate has checkpoint names.
#[allow(clippy::too_many_arguments)]
pub fn export_tuned<T: FloatElement>(
    device: &Device,
    config: &MoeConfig,
    weights: &LayerWeights<T>,
    prefix: &str,
    experts: &[usize],
    gate: bool,
    path: &Path,
) -> Result<TunedExperts> {
    check_prefix(prefix)?;
    check_experts(experts, config)?;
    if gate && weights.tensor("gate.w").is_err() {
        return Err(Error::InvalidArgument {
            argument: "gate",
            value: format!("true for a {:?} router", config.router),
            expected: "a linear or sigmoid router (`gate.w`, the checkpoint's `gate.weight`)".into(),
        });
    }
    let gate_bias = weights.tensor_f32("gate.b").is_ok();
    let delta = delta_tensors::<T>(config, prefix, experts, (gate, gate_bias));
    // Each layer tensor a delta reads, downloaded once, as bytes.
    let mut downloaded: HashMap<&'static str, Vec<u8>> = HashMap::new();
    for t in &delta {
        if !downloaded.contains_key(t.source) {
            let bytes = match t.source {
                "gate.b" => bytemuck::cast_slice(&device.download(weights.tensor_f32(t.source)?)?).to_vec(),
                _ => bytemuck::cast_slice(&device.download(weights.tensor(t.source)?)?).to_vec(),
            };
            downloaded.insert(t.source, bytes);
        }
    }
    let tensors: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = (delta.iter())
        .map(|t| {
            let size = t.dtype.bitsize() / 8;
            let bytes = &downloaded[t.source][t.start * size..(t.start + t.len()) * size];
            (t.name.clone(), t.dtype, t.shape.clone(), bytes.to_vec())
        })
        .collect();
    let names: Vec<String> = tensors.iter().map(|t| t.0.clone()).collect();
    let metadata = HashMap::from([
        ("format".to_string(), FORMAT.to_string()),
        ("prefix".into(), prefix.into()),
        ("experts".into(), serde_json::json!(experts).to_string()),
        ("gate".into(), gate.to_string()),
        ("dtype".into(), T::NAME.into()),
        ("tensors".into(), serde_json::json!(names).to_string()),
    ]);
    let file = path.display().to_string();
    let views: Vec<(String, TensorView<'_>)> = (tensors.iter())
        .map(|(name, dtype, shape, data)| {
            let view = TensorView::new(*dtype, shape.clone(), data).map_err(|e| problem(name, e.to_string()))?;
            Ok((name.clone(), view))
        })
        .collect::<Result<_>>()?;
    safetensors::serialize_to_file(views, Some(metadata), path).map_err(|e| problem(&file, e.to_string()))?;
    Ok(TunedExperts {
        prefix: prefix.into(),
        experts: experts.to_vec(),
        gate,
        tuned_bytes: tensors.iter().map(|t| t.3.len() as u64).sum(),
        tensors: names,
    })
}

/// The metadata entry `key` of the file `file`, parsed as JSON.
fn entry(file: &str, metadata: &HashMap<String, String>, key: &str) -> Result<serde_json::Value> {
    let what = || format!("{file}: metadata `{key}`");
    let value = metadata.get(key).ok_or_else(|| problem(what(), "missing"))?;
    serde_json::from_str(value).map_err(|e| problem(what(), e.to_string()))
}

/// The expert ids of the metadata entry `experts`.
fn expert_ids(file: &str, metadata: &HashMap<String, String>) -> Result<Vec<usize>> {
    let value = entry(file, metadata, "experts")?;
    let ids: Option<Vec<usize>> =
        (value.as_array()).and_then(|ids| ids.iter().map(|id| id.as_u64().map(|id| id as usize)).collect());
    ids.ok_or_else(|| {
        problem(
            format!("{file}: metadata `experts`"),
            format!("{value}: expected a list of ids"),
        )
    })
}

/// `len` elements from little-endian `bytes` (checked to be `len` elements long).
fn from_bytes<E: bytemuck::Pod>(bytes: &[u8], len: usize) -> Vec<E> {
    let mut values = vec![E::zeroed(); len];
    bytemuck::cast_slice_mut::<E, u8>(&mut values).copy_from_slice(bytes);
    values
}

/// Reads the ESFT file `path` and writes its tensors into `weights` (a layer of `config` stored
/// as `T`). Everything is checked before anything is written, so a wrong file leaves `weights`
/// as they were: every error is an [`Error::Checkpoint`] naming the tensor (missing, of another
/// dtype or shape, or not expected) or the metadata entry.
pub fn apply_tuned<T: FloatElement>(
    device: &Device,
    config: &MoeConfig,
    weights: &mut LayerWeights<T>,
    path: &Path,
) -> Result<TunedExperts> {
    let file = path.display().to_string();
    let bytes = std::fs::read(path).map_err(|e| problem(&file, e.to_string()))?;
    let (_, header) = SafeTensors::read_metadata(&bytes).map_err(|e| problem(&file, e.to_string()))?;
    let tensors = SafeTensors::deserialize(&bytes).map_err(|e| problem(&file, e.to_string()))?;
    let metadata = header.metadata().clone().unwrap_or_default();
    if metadata.get("format").map(String::as_str) != Some(FORMAT) {
        return Err(problem(
            format!("{file}: metadata `format`"),
            format!("{:?}: expected {FORMAT:?}", metadata.get("format")),
        ));
    }
    let prefix = metadata.get("prefix").cloned().unwrap_or_default();
    check_prefix(&prefix).map_err(|e| problem(format!("{file}: metadata `prefix`"), e.to_string()))?;
    let experts = expert_ids(&file, &metadata)?;
    check_experts(&experts, config).map_err(|e| problem(format!("{file}: metadata `experts`"), e.to_string()))?;
    let gate = entry(&file, &metadata, "gate")?
        .as_bool()
        .ok_or_else(|| problem(format!("{file}: metadata `gate`"), "expected true or false"))?;

    let gate_bias = weights.tensor_f32("gate.b").is_ok();
    let expected = delta_tensors::<T>(config, &prefix, &experts, (gate, gate_bias));
    for name in tensors.names() {
        if !expected.iter().any(|x| x.name == name) {
            return Err(problem(name, "not a tensor this file's metadata names (experts, gate)"));
        }
    }
    let mut views = Vec::with_capacity(expected.len());
    for DeltaTensor { name, dtype, shape, .. } in &expected {
        let view = tensors
            .tensor(name)
            .map_err(|_| problem(name, "missing from the ESFT file"))?;
        if view.dtype() != *dtype || view.shape() != shape.as_slice() {
            return Err(problem(
                name,
                format!("{:?} {:?}: expected {dtype:?} {shape:?}", view.dtype(), view.shape()),
            ));
        }
        views.push(view);
    }
    for (t, view) in expected.iter().zip(&views) {
        let range = t.start..t.start + t.len();
        if t.source == "gate.b" {
            let target = weights.tensor_f32_mut(t.source)?;
            device.upload_into(&from_bytes::<f32>(view.data(), t.len()), &mut target.slice_mut(range)?)?;
        } else {
            let target = weights.tensor_mut(t.source)?;
            device.upload_into(&from_bytes::<T>(view.data(), t.len()), &mut target.slice_mut(range)?)?;
        }
    }
    Ok(TunedExperts {
        prefix,
        experts,
        gate,
        tuned_bytes: views.iter().map(|v| v.data().len() as u64).sum(),
        tensors: expected.into_iter().map(|x| x.name).collect(),
    })
}
