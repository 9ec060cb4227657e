//! An MoE layer inside a candle model: candle makes the hidden states, the layer's forward runs
//! on them, candle carries on with the result (a residual and an RMS norm here).
//!
//! `cargo run --release --example candle_layer` runs on candle's CPU device (the layer on the
//! emulator). Built with `--features candle-cuda` (see the crate's features) and given `--cuda`,
//! it runs on candle's first GPU, zero copy on candle's stream.
use candle_core::{D, DType, Device as CandleDevice, Tensor};
use half::bf16;
use moe_kernels::candle::{device_for, forward};
use moe_kernels::layers::{MoeConfig, MoeLayer};

fn main() -> moe_kernels::Result<()> {
    let candle = if std::env::args().any(|a| a == "--cuda") {
        CandleDevice::new_cuda(0)?
    } else {
        CandleDevice::Cpu
    };
    let device = device_for(&candle)?;
    let config = MoeConfig {
        experts: 8,
        k: 2,
        dim: 128,
        hidden: 256,
        max_tokens: 64,
        ..MoeConfig::default()
    };
    let mut layer = MoeLayer::<bf16>::random(&device, config, 2026)?;

    // A batch of 4 sequences of 16 tokens, bf16, made by candle.
    let hidden = Tensor::randn(0f32, 1.0, (4, 16, config.dim), &candle)?.to_dtype(DType::BF16)?;
    let moe = forward(&mut layer, &hidden)?; // [4, 16, d] on the same device, no host sync
    let residual = (&hidden + &moe)?.to_dtype(DType::F32)?;
    let rms = residual.sqr()?.mean_keepdim(D::Minus1)?.sqrt()?;
    let normed = residual.broadcast_div(&rms)?;

    println!("device: {}", device.description());
    println!("hidden {:?} -> moe {:?} {:?}", hidden.dims(), moe.dims(), moe.dtype());
    let mean_abs = moe.to_dtype(DType::F32)?.abs()?.mean_all()?.to_scalar::<f32>()?;
    println!("mean |moe(x)| = {mean_abs:.4}");
    let rms_after = normed.sqr()?.mean_all()?.sqrt()?.to_scalar::<f32>()?;
    println!("rms of the normed residual = {rms_after:.4} (1 by construction)");
    assert!(
        mean_abs.is_finite() && mean_abs > 0.0,
        "the layer's output is {mean_abs} on average"
    );
    assert!(
        (rms_after - 1.0).abs() < 1e-3,
        "the normed residual's rms is {rms_after}"
    );
    println!("kernel launches: {}", device.stats().launches);
    Ok(())
}
