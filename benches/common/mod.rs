//! What every op-family bench shares: the op's floor (`floors`), random inputs (`inputs`),
//! the realistic shapes, and on a GPU the timer and peers (`gpu`, `blas`) that print the
//! `MOE_BENCH` records `scripts/gpu-validate.sh` collects.
//!
//! Without a GPU a bench times the CPU reference and the emulator only (criterion), and says
//! so: it never prints a GPU figure it did not measure.
//!
//! Environment, read on a GPU (the script sets them to split a run into parts):
//! `MOE_BENCH_MODELS` (comma list of `mixtral`, `deepseek`), `MOE_BENCH_TOKENS` (comma list
//! of token counts), `MOE_BENCH_GPU_ONLY=1` (leave the emulator out).
#![allow(dead_code)]

pub mod blas;
pub mod floors;
pub mod gpu;
pub mod inputs;
pub mod stats;
/// The tests' shared helpers: the benches draw from the same seeded generator.
#[path = "../../tests/common/mod.rs"]
mod tests_common;

#[allow(unused_imports)]
pub use floors::Floor;
pub use gpu::Gpu;

use moe_kernels::device::{Device, DeviceKind, available_devices};

fn env_list(name: &str) -> Option<Vec<String>> {
    let value = std::env::var(name).ok().filter(|v| !v.trim().is_empty())?;
    Some(value.split(',').map(|s| s.trim().to_string()).collect())
}

/// Every device available here (less the emulator under `MOE_BENCH_GPU_ONLY=1`); a missing
/// GPU is reported once per bench binary.
pub fn devices() -> Vec<Device> {
    let list = available_devices().expect("device list");
    for (kind, why) in &list.skipped {
        if *kind == DeviceKind::Cuda {
            eprintln!("no GPU here ({why}): benching the CPU reference and the emulator only");
        }
    }
    let gpu_only = std::env::var("MOE_BENCH_GPU_ONLY").is_ok_and(|v| v == "1");
    list.devices
        .into_iter()
        .filter(|d| !(gpu_only && d.kind() == DeviceKind::Emulator))
        .collect()
}

/// The MoE layer shapes benches run: on a GPU the realistic ones (a Mixtral-like and a
/// DeepSeek-like layer, at decode and prefill token counts); on the emulator one small shape,
/// since there only the CPU is timed.
#[derive(Debug, Clone, Copy)]
pub struct LayerShape {
    pub name: &'static str,
    pub tokens: usize,
    pub d: usize,
    pub h: usize,
    pub experts: usize,
    pub k: usize,
    /// Group-limited routing (groups, top groups), when the model uses it.
    pub groups: Option<(usize, usize)>,
}

impl LayerShape {
    pub fn label(&self) -> String {
        format!("{},T={}", self.name, self.tokens)
    }
}

pub const MIXTRAL: LayerShape = LayerShape {
    name: "mixtral",
    tokens: 0,
    d: 4096,
    h: 14336,
    experts: 8,
    k: 2,
    groups: None,
};

pub const DEEPSEEK: LayerShape = LayerShape {
    name: "deepseek",
    tokens: 0,
    d: 7168,
    h: 2048,
    experts: 256,
    k: 8,
    groups: Some((8, 4)),
};

pub const TOKENS: [usize; 5] = [1, 16, 64, 4096, 16384];

/// The models a GPU run covers (`MOE_BENCH_MODELS`, default both).
pub fn models() -> Vec<LayerShape> {
    let wanted = env_list("MOE_BENCH_MODELS");
    [MIXTRAL, DEEPSEEK]
        .into_iter()
        .filter(|m| wanted.as_ref().is_none_or(|w| w.iter().any(|n| n == m.name)))
        .collect()
}

/// The token counts a GPU run covers (`MOE_BENCH_TOKENS`, default [`TOKENS`]).
pub fn token_counts() -> Vec<usize> {
    match env_list("MOE_BENCH_TOKENS") {
        Some(list) => list
            .iter()
            .map(|t| {
                t.parse()
                    .unwrap_or_else(|_| panic!("MOE_BENCH_TOKENS: '{t}' is not a count"))
            })
            .collect(),
        None => TOKENS.to_vec(),
    }
}

pub fn layer_shapes(device: &Device) -> Vec<LayerShape> {
    if device.kind() != DeviceKind::Cuda {
        return vec![LayerShape {
            name: "small",
            tokens: 64,
            d: 256,
            h: 128,
            experts: 16,
            k: 4,
            groups: Some((4, 2)),
        }];
    }
    let mut shapes = vec![];
    for base in models() {
        for tokens in token_counts() {
            shapes.push(LayerShape { tokens, ..base });
        }
    }
    shapes
}
