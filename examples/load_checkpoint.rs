//! One MoE block of a Hugging Face checkpoint as a layer, run forward in bf16 on the best device
//! here:
//!
//!     cargo run --release --example load_checkpoint -- <model dir> [decoder layer]
//!
//! The directory holds `config.json` and the safetensors files (Mixtral, Qwen3-MoE or
//! DeepSeek-V3 naming, per-expert or fused experts). Without arguments it writes a tiny
//! DeepSeek-V3-style checkpoint to a temporary directory and runs that, checking the output
//! against the CPU reference. Prints the config read from `config.json`, each expert's load and
//! the router logits of the first token.
use half::bf16;
use moe_kernels::checkpoint::Checkpoint;
use moe_kernels::checkpoint::tiny::{self, Scheme};
use moe_kernels::layers::{HostWeights, Mode};
use moe_kernels::reference::layers as reference;
use moe_kernels::{Device, Error, Result};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use safetensors::Dtype;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

const TOKENS: usize = 16;

/// Writes the tiny checkpoint into `dir`; returns the host weights of its first MoE block.
fn write_tiny(dir: &Path) -> Result<HostWeights> {
    let scheme = Scheme::DeepseekV3;
    let json = scheme.config_json();
    let config = moe_kernels::checkpoint::moe_config(&json, TOKENS)?;
    let weights = HostWeights::random(&config, 2026).rounded::<bf16>(&config);
    tiny::write(dir, scheme, &json, &config, std::slice::from_ref(&weights), Dtype::BF16)?;
    Ok(weights)
}

/// Loads decoder layer `layer` (the first MoE block when `None`) of `dir` and runs `TOKENS`
/// random tokens through it; with `expected` weights, also checks y against the reference.
/// Returns the largest difference from the reference (0 without one).
fn run(dir: &Path, layer: Option<usize>, expected: Option<&HostWeights>) -> Result<f64> {
    let device = Device::best()?;
    println!("device: {}", device.description());
    let checkpoint = Checkpoint::open(dir)?;
    let layers = checkpoint.moe_layers();
    let layer = match layer.or(layers.first().copied()) {
        Some(layer) => layer,
        None => {
            return Err(Error::Checkpoint {
                name: dir.display().to_string(),
                problem: "no MoE block".into(),
            });
        }
    };
    let mut moe = checkpoint.layer::<bf16>(&device, layer, TOKENS, Mode::Inference)?;
    let config = *moe.config();
    println!("MoE layers {layers:?}; layer {layer}: {config:?}");
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let x: Vec<f32> = (0..TOKENS * config.dim)
        .map(|_| bf16::from_f32(rng.random_range(-1.0..1.0)).to_f32())
        .collect();
    let x_device = device.upload_from_f32::<bf16>(&x)?;
    let mut y = device.alloc_zeros::<bf16>(TOKENS * config.dim)?;
    moe.forward(&x_device, TOKENS, &mut y)?;
    println!("tokens per expert: {:?}", device.download(moe.expert_counts())?);
    let logits = device.download(&moe.router_logits()?)?;
    println!("router logits of token 0: {:?}", &logits[..config.experts]);
    let y: Vec<f32> = device.download(&y)?.iter().map(|v| v.to_f32()).collect();
    let Some(weights) = expected else {
        println!("|y| = {:.4}", y.iter().map(|v| v * v).sum::<f32>().sqrt());
        return Ok(0.0);
    };
    let store = |v: f64| bf16::from_f64(v).to_f32();
    let want = reference::moe_forward(&config, weights, &x, TOKENS, None, &store);
    let diff = (y.iter().zip(&want.y))
        .map(|(&a, &b)| (a as f64 - b).abs())
        .fold(0.0, f64::max);
    println!("largest |y - reference|: {diff:.2e}");
    Ok(diff)
}

/// The generated checkpoint, run and checked; `Err` when y strays from the reference.
fn run_tiny() -> Result<()> {
    let dir: PathBuf = std::env::temp_dir().join(format!("moe-kernels-load-checkpoint-{}", std::process::id()));
    let weights = write_tiny(&dir)?;
    println!("wrote a tiny DeepSeek-V3-style checkpoint to {}", dir.display());
    let diff = run(&dir, None, Some(&weights));
    let _ = std::fs::remove_dir_all(&dir);
    // bf16 outputs: a couple of units in the last place of values around 1.
    if diff? > 0.05 {
        return Err(Error::Checkpoint {
            name: "y".into(),
            problem: "far from the reference".into(),
        });
    }
    Ok(())
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.as_slice() {
        [] => run_tiny(),
        [dir] => run(Path::new(dir), None, None).map(drop),
        [dir, layer] => match layer.parse() {
            Ok(layer) => run(Path::new(dir), Some(layer), None).map(drop),
            Err(_) => {
                eprintln!("decoder layer `{layer}`: expected a number");
                return ExitCode::FAILURE;
            }
        },
        _ => {
            eprintln!("usage: load_checkpoint [<model dir> [decoder layer]]");
            return ExitCode::FAILURE;
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    /// The example with no arguments: the generated checkpoint loads and matches the reference.
    #[test]
    fn runs_on_a_generated_checkpoint() {
        super::run_tiny().unwrap();
    }
}
