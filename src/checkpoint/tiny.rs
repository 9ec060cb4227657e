//! Tiny checkpoints in each naming scheme, written from [`HostWeights`] (feature `dev-tools`):
//! what the tests load and compare with the reference, and what the `load_checkpoint` example
//! runs when given no checkpoint.
use super::problem;
use crate::Result;
use crate::layers::{HostWeights, MoeConfig};
use half::{bf16, f16};
use safetensors::Dtype;
use safetensors::tensor::TensorView;
use serde_json::{Value, json};
use std::path::Path;

/// How a model family names its MoE block's tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    /// `block_sparse_moe.gate`, `block_sparse_moe.experts.{e}.w1/w3/w2`.
    Mixtral,
    /// `mlp.gate`, `mlp.experts.{e}.gate_proj/up_proj/down_proj`.
    Qwen3Moe,
    /// Qwen3-MoE's names plus `mlp.gate.e_score_correction_bias` and `mlp.shared_experts.*`,
    /// sigmoid routing in groups; decoder layer 0 is dense (`first_k_dense_replace = 1`).
    DeepseekV3,
    /// `mlp.experts.gate_up_proj [E, 2h, d]` and `mlp.experts.down_proj [E, d, h]`, with a
    /// router bias `mlp.gate.bias`.
    Fused,
}

impl Scheme {
    pub const ALL: [Scheme; 4] = [Scheme::Mixtral, Scheme::Qwen3Moe, Scheme::DeepseekV3, Scheme::Fused];

    /// A small `config.json` of the family (d = 16).
    pub fn config_json(self) -> Value {
        match self {
            Scheme::Mixtral => json!({
                "model_type": "mixtral", "hidden_size": 16, "intermediate_size": 16,
                "num_local_experts": 4, "num_experts_per_tok": 2, "num_hidden_layers": 2,
            }),
            Scheme::Qwen3Moe | Scheme::Fused => json!({
                "model_type": "qwen3_moe", "hidden_size": 16, "moe_intermediate_size": 8,
                "num_experts": 6, "num_experts_per_tok": 2, "norm_topk_prob": self == Scheme::Qwen3Moe,
                "num_hidden_layers": 2,
            }),
            Scheme::DeepseekV3 => json!({
                "model_type": "deepseek_v3", "hidden_size": 16, "moe_intermediate_size": 8,
                "n_routed_experts": 8, "num_experts_per_tok": 3, "n_group": 4, "topk_group": 2,
                "n_shared_experts": 2, "routed_scaling_factor": 2.5, "norm_topk_prob": false,
                "scoring_func": "sigmoid", "first_k_dense_replace": 1, "num_hidden_layers": 3,
            }),
        }
    }

    /// The decoder layers of [`write()`] that hold an MoE block.
    pub fn moe_layers(self, blocks: usize) -> Vec<usize> {
        let first = usize::from(self == Scheme::DeepseekV3);
        (first..first + blocks).collect()
    }

    /// Every tensor of `weights` (for `config`) as this scheme names it in decoder layer `layer`.
    pub fn tensors(
        self,
        config: &MoeConfig,
        weights: &HostWeights,
        layer: usize,
    ) -> Vec<(String, Vec<usize>, Vec<f32>)> {
        let block = if self == Scheme::Mixtral {
            "block_sparse_moe"
        } else {
            "mlp"
        };
        let p = format!("model.layers.{layer}.{block}.");
        let (e, d, h, hs) = (config.experts, config.dim, config.hidden, config.shared_hidden());
        let mut out = vec![(format!("{p}gate.weight"), vec![e, d], weights.gate_tensor("w").to_vec())];
        let bias = weights.gate_tensor("b");
        if !bias.is_empty() {
            out.push((format!("{p}gate.bias"), vec![e], bias.to_vec()));
        }
        if !weights.router_bias.is_empty() {
            out.push((
                format!("{p}gate.e_score_correction_bias"),
                vec![e],
                weights.router_bias.clone(),
            ));
        }
        if self == Scheme::Fused {
            out.push((
                format!("{p}experts.gate_up_proj"),
                vec![e, 2 * h, d],
                weights.w1.clone(),
            ));
            out.push((format!("{p}experts.down_proj"), vec![e, d, h], weights.w2.clone()));
            return out;
        }
        let names = if self == Scheme::Mixtral {
            ["w1", "w3", "w2"]
        } else {
            ["gate_proj", "up_proj", "down_proj"]
        };
        let ffn = |base: &str, h: usize, w1: &[f32], w2: &[f32]| {
            let name = |proj: &str| format!("{base}{proj}.weight");
            [
                (name(names[0]), vec![h, d], w1[..h * d].to_vec()),
                (name(names[1]), vec![h, d], w1[h * d..].to_vec()),
                (name(names[2]), vec![d, h], w2.to_vec()),
            ]
        };
        for i in 0..e {
            let (w1, w2) = (
                &weights.w1[i * 2 * h * d..][..2 * h * d],
                &weights.w2[i * d * h..][..d * h],
            );
            out.extend(ffn(&format!("{p}experts.{i}."), h, w1, w2));
        }
        if hs > 0 {
            out.extend(ffn(
                &format!("{p}shared_experts."),
                hs,
                &weights.shared_w1,
                &weights.shared_w2,
            ));
        }
        out
    }
}

/// `values` encoded as `dtype` (F32, F16 or BF16), little-endian.
fn encode(values: &[f32], dtype: Dtype) -> Vec<u8> {
    match dtype {
        Dtype::BF16 => values.iter().flat_map(|&v| bf16::from_f32(v).to_le_bytes()).collect(),
        Dtype::F16 => values.iter().flat_map(|&v| f16::from_f32(v).to_le_bytes()).collect(),
        _ => values.iter().flat_map(|&v| v.to_le_bytes()).collect(),
    }
}

/// Writes `dir/config.json` (`json`) and `dir/model.safetensors`: one MoE block per element of
/// `blocks`, in decoder layers [`Scheme::moe_layers`] (DeepSeek-V3's layer 0 a dense MLP),
/// every tensor stored as `dtype` except the biases the layer keeps in f32 (the selection bias,
/// as DeepSeek stores it, and the router bias).
pub fn write(
    dir: &Path,
    scheme: Scheme,
    json: &Value,
    config: &MoeConfig,
    blocks: &[HostWeights],
    dtype: Dtype,
) -> Result<()> {
    let io = |e: std::io::Error| problem(dir.display().to_string(), e.to_string());
    std::fs::create_dir_all(dir).map_err(io)?;
    std::fs::write(dir.join("config.json"), json.to_string()).map_err(io)?;
    let mut tensors: Vec<(String, Vec<usize>, Vec<f32>)> = vec![];
    for (layer, weights) in scheme.moe_layers(blocks.len()).into_iter().zip(blocks) {
        tensors.extend(scheme.tensors(config, weights, layer));
    }
    if scheme == Scheme::DeepseekV3 {
        let (d, h) = (config.dim, 2 * config.hidden);
        let dense =
            |proj: &str, shape: Vec<usize>| (format!("model.layers.0.mlp.{proj}.weight"), shape, vec![0.01; d * h]);
        tensors.extend([
            dense("gate_proj", vec![h, d]),
            dense("up_proj", vec![h, d]),
            dense("down_proj", vec![d, h]),
        ]);
    }
    let encoded: Vec<(String, Vec<usize>, Dtype, Vec<u8>)> = (tensors.into_iter())
        .map(|(name, shape, values)| {
            let kept_f32 = name.ends_with("e_score_correction_bias") || name.ends_with("gate.bias");
            let dtype = if kept_f32 { Dtype::F32 } else { dtype };
            (name, shape, dtype, encode(&values, dtype))
        })
        .collect();
    let views = (encoded.iter())
        .map(|(name, shape, dtype, bytes)| {
            Ok((
                name.as_str(),
                TensorView::new(*dtype, shape.clone(), bytes).map_err(|e| problem(name, e.to_string()))?,
            ))
        })
        .collect::<Result<Vec<_>>>()?;
    let path = dir.join("model.safetensors");
    safetensors::serialize_to_file(views, None, &path).map_err(|e| problem(path.display().to_string(), e.to_string()))
}
