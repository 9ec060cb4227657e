//! Hugging Face checkpoints (feature `checkpoint`, on by default): a model directory's
//! `config.json` mapped onto [`MoeConfig`], and one MoE block's tensors from its safetensors
//! files (memory-mapped; stored as the layer's `T`, so bf16 stays bf16) as
//! [`LayerWeights`], for the Mixtral, Qwen3-MoE and DeepSeek-V3 naming schemes.
//!
//! ```no_run
//! use half::bf16;
//! use moe_kernels::Device;
//! use moe_kernels::checkpoint::Checkpoint;
//! use moe_kernels::layers::Mode;
//!
//! # fn main() -> moe_kernels::Result<()> {
//! let device = Device::best()?;
//! let checkpoint = Checkpoint::open("Qwen3-30B-A3B")?; // config.json + *.safetensors
//! let first = checkpoint.moe_layers()[0];
//! let mut layer = checkpoint.layer::<bf16>(&device, first, 512, Mode::Inference)?;
//! # Ok(())
//! # }
//! ```
//!
//! What a block may hold (`{p}` is `model.layers.{i}.block_sparse_moe.` or
//! `model.layers.{i}.mlp.`):
//! - the router `{p}gate.weight [E, d]`, an optional `{p}gate.bias [E]`, and for the sigmoid
//!   router `{p}gate.e_score_correction_bias [E]` (the selection bias);
//! - the experts, fused as `{p}experts.gate_up_proj [E, 2h, d]` (each expert's gate rows, then
//!   its up rows) and `{p}experts.down_proj [E, d, h]`, or one by one as
//!   `{p}experts.{e}.w1/w3/w2.weight` (Mixtral: gate, up, down) or
//!   `{p}experts.{e}.gate_proj/up_proj/down_proj.weight`;
//! - DeepSeek's shared experts, `{p}shared_experts.gate_proj/up_proj/down_proj.weight`.
//!
//! Every missing tensor, wrong shape or unsupported dtype is an [`Error::Checkpoint`] naming it.
mod config;
pub mod esft;
mod layout;
#[cfg(feature = "dev-tools")]
pub mod tiny;

use crate::layers::{LayerWeights, Mode, MoeConfig, MoeLayer};
use crate::ops::FloatElement;
use crate::{Device, Error, Result};
use memmap2::Mmap;
use safetensors::tensor::{Metadata, TensorInfo};
use safetensors::{Dtype, SafeTensors};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

pub use config::moe_config;

fn problem(name: impl Into<String>, problem: impl Into<String>) -> Error {
    Error::Checkpoint {
        name: name.into(),
        problem: problem.into(),
    }
}

/// One safetensors file, mapped, with its parsed header.
struct File {
    map: Mmap,
    header_len: usize,
    metadata: Metadata,
}

/// A model directory: its `config.json` and every safetensors file (`model.safetensors`, or
/// the shards `model.safetensors.index.json` lists), memory-mapped; tensors are read from the
/// mappings only when a layer is loaded.
pub struct Checkpoint {
    config: serde_json::Value,
    files: Vec<File>,
    /// Tensor name → index in `files`.
    tensors: HashMap<String, usize>,
}

/// A tensor's bytes in the mapping, with its dtype and shape.
pub(crate) struct Tensor<'a> {
    pub(crate) name: &'a str,
    pub(crate) dtype: Dtype,
    pub(crate) shape: &'a [usize],
    pub(crate) bytes: &'a [u8],
}

impl Checkpoint {
    /// Opens the model directory `dir` (or a single `.safetensors` file, with `config.json`
    /// beside it).
    ///
    /// The files are memory-mapped: they must not be modified while the checkpoint is open.
    pub fn open(dir: impl AsRef<Path>) -> Result<Self> {
        let path = dir.as_ref();
        let (dir, files) = if path.is_file() {
            let dir = path.parent().unwrap_or(Path::new(".")).to_path_buf();
            (dir, vec![path.to_path_buf()])
        } else {
            (path.to_path_buf(), shard_files(path)?)
        };
        let config_path = dir.join("config.json");
        let text = std::fs::read_to_string(&config_path)
            .map_err(|e| problem(config_path.display().to_string(), e.to_string()))?;
        let config =
            serde_json::from_str(&text).map_err(|e| problem(config_path.display().to_string(), e.to_string()))?;
        let mut checkpoint = Self {
            config,
            files: vec![],
            tensors: HashMap::new(),
        };
        for file in files {
            checkpoint.map(&file)?;
        }
        Ok(checkpoint)
    }

    fn map(&mut self, path: &Path) -> Result<()> {
        let name = path.display().to_string();
        let file = std::fs::File::open(path).map_err(|e| problem(&name, e.to_string()))?;
        // SAFETY: the mapping is read-only and lives as long as `self`; `open` documents that
        // the files must not change meanwhile (the one thing memory-mapping cannot check).
        let map = unsafe { Mmap::map(&file) }.map_err(|e| problem(&name, e.to_string()))?;
        let (header_len, metadata) = SafeTensors::read_metadata(&map).map_err(|e| problem(&name, e.to_string()))?;
        let index = self.files.len();
        for tensor in metadata.tensors().into_keys() {
            self.tensors.insert(tensor, index);
        }
        self.files.push(File {
            map,
            header_len,
            metadata,
        });
        Ok(())
    }

    /// The parsed `config.json`.
    pub fn config_json(&self) -> &serde_json::Value {
        &self.config
    }

    /// The layer configuration `config.json` describes ([`moe_config`]), with work buffers for
    /// `max_tokens` tokens.
    pub fn moe_config(&self, max_tokens: usize) -> Result<MoeConfig> {
        moe_config(&self.config, max_tokens)
    }

    /// Whether the checkpoint holds the tensor `name`.
    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// The decoder layers that hold a routed MoE block (a router `gate.weight` under one of the
    /// schemes' prefixes), in order.
    pub fn moe_layers(&self) -> Vec<usize> {
        let mut layers: Vec<usize> = (self.tensors.keys())
            .filter_map(|name| layout::moe_layer_of(name))
            .collect();
        layers.sort_unstable();
        layers.dedup();
        layers
    }

    /// The tensor `name`, or an error naming it.
    pub(crate) fn tensor<'a>(&'a self, name: &'a str) -> Result<Tensor<'a>> {
        let missing = || problem(name, "not in the checkpoint");
        let file = &self.files[*self.tensors.get(name).ok_or_else(missing)?];
        let info: &TensorInfo = file.metadata.info(name).ok_or_else(missing)?;
        // The data follow the header's 8-byte length and the header; `read_metadata` checked
        // that every tensor's offsets lie inside them.
        let start = 8 + file.header_len;
        let (begin, end) = info.data_offsets;
        Ok(Tensor {
            name,
            dtype: info.dtype,
            shape: &info.shape,
            bytes: &file.map[start + begin..start + end],
        })
    }

    /// Decoder layer `layer`'s MoE block as device weights stored as `T`, checked against
    /// `config` (from [`moe_config`](Self::moe_config)).
    pub fn layer_weights<T: FloatElement>(
        &self,
        device: &Device,
        layer: usize,
        config: &MoeConfig,
    ) -> Result<LayerWeights<T>> {
        layout::layer_weights(self, device, layer, config)
    }

    /// Decoder layer `layer`'s MoE block as a layer for `mode`, sized for `max_tokens` tokens.
    pub fn layer<T: FloatElement>(
        &self,
        device: &Device,
        layer: usize,
        max_tokens: usize,
        mode: Mode,
    ) -> Result<MoeLayer<T>> {
        let config = self.moe_config(max_tokens)?;
        let weights = self.layer_weights(device, layer, &config)?;
        MoeLayer::from_weights(device, config, weights, mode)
    }
}

/// The safetensors files of a model directory: the shards of `model.safetensors.index.json`,
/// or else every `*.safetensors` file.
fn shard_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let index = dir.join("model.safetensors.index.json");
    let name = |p: &Path| p.display().to_string();
    if index.is_file() {
        let text = std::fs::read_to_string(&index).map_err(|e| problem(name(&index), e.to_string()))?;
        let json: serde_json::Value = serde_json::from_str(&text).map_err(|e| problem(name(&index), e.to_string()))?;
        let map = json["weight_map"]
            .as_object()
            .ok_or_else(|| problem(name(&index), "no `weight_map` object"))?;
        let mut files: Vec<PathBuf> = (map.values()).filter_map(|v| v.as_str()).map(|f| dir.join(f)).collect();
        files.sort();
        files.dedup();
        return Ok(files);
    }
    let entries = std::fs::read_dir(dir).map_err(|e| problem(name(dir), e.to_string()))?;
    let mut files: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(problem(
            name(dir),
            "no .safetensors file and no model.safetensors.index.json",
        ));
    }
    Ok(files)
}
