//! Layer benches: one MoE layer (linear router, SwiGLU experts, bf16) forward, and forward +
//! backward, beside its floor (`common::floors::MoeLayerFloor`: X, the gate and the weights of
//! the experts that get rows read, Y written; the backward adds dY, dX and the f32 gradients
//! of the gate and of those experts; routing metadata and intermediates are not part of a
//! floor, an ideal layer keeps them on chip).
//!
//! Without a GPU: the CPU reference and the emulator at a small size. On a GPU, the Mixtral-like
//! and DeepSeek-like layers of `common::models` at every token count: one layer per model,
//! built for the largest T, with random weights and inputs. The experts that get rows are
//! counted from the layer's own routing after a forward. The PyTorch peer (an HF-style block)
//! is `scripts/torch_peers.py`.
mod common;

use common::floors::MoeLayerFloor;
use common::inputs::{Rng, random_bf16};
use common::{Floor, Gpu, LayerShape, devices, models, token_counts};
use criterion::{Criterion, criterion_group, criterion_main};
use half::bf16;
use moe_kernels::layers::{Captures, HostWeights, MoeConfig, MoeLayer, RouterKind};
use moe_kernels::reference::layers as reference;
use moe_kernels::{Device, DeviceBuffer, DeviceKind};

fn config(shape: &LayerShape, max_tokens: usize) -> MoeConfig {
    MoeConfig {
        router: RouterKind::Linear,
        experts: shape.experts,
        k: shape.k,
        dim: shape.d,
        hidden: shape.h,
        max_tokens,
        ..MoeConfig::default()
    }
}

fn floor(c: &MoeConfig, tokens: usize, active: usize) -> MoeLayerFloor {
    MoeLayerFloor {
        tokens: tokens as u64,
        k: c.k as u64,
        experts: c.experts as u64,
        d: c.dim as u64,
        h: c.hidden as u64,
        active: active as u64,
    }
}

/// `len` values uniform in `[-scale, scale)`: a random block repeated, so that a DeepSeek-like
/// layer's 11 G expert weights cost the host a copy, not a generator call each.
fn tiled(rng: &mut Rng, len: usize, scale: f32) -> Vec<f32> {
    let block = rng.fill(len.min(1 << 20), scale);
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        let n = block.len().min(len - out.len());
        out.extend_from_slice(&block[..n]);
    }
    out
}

/// [`HostWeights::random`]'s layout and scales, from tiled random blocks.
fn weights(c: &MoeConfig, seed: u64) -> HostWeights {
    let mut rng = Rng::new(seed);
    let mut host = HostWeights::random(
        &MoeConfig {
            experts: c.experts,
            hidden: 1,
            ..*c
        },
        seed,
    );
    host.w1 = tiled(
        &mut rng,
        c.experts * 2 * c.hidden * c.dim,
        (c.dim as f32).sqrt().recip(),
    );
    host.w2 = tiled(&mut rng, c.experts * c.dim * c.hidden, (c.hidden as f32).sqrt().recip());
    host
}

/// Token counts up to which the GPU bench also times graph replays.
const GRAPH_TOKENS: usize = 64;

/// A layer and its buffers on one device.
struct Problem {
    layer: MoeLayer<bf16>,
    tokens: usize,
    x: DeviceBuffer<bf16>,
    y: DeviceBuffer<bf16>,
    dy: DeviceBuffer<bf16>,
    dx: DeviceBuffer<bf16>,
}

impl Problem {
    fn new(device: &Device, layer: MoeLayer<bf16>, tokens: usize) -> Self {
        let d = layer.config().dim;
        Self {
            x: random_bf16(device, tokens * d, 0x78 ^ tokens as u64, 1.0),
            y: random_bf16(device, tokens * d, 0x79, 1.0),
            dy: random_bf16(device, tokens * d, 0x7a ^ tokens as u64, 1.0),
            dx: random_bf16(device, tokens * d, 0x7b, 1.0),
            layer,
            tokens,
        }
    }
    fn forward(&mut self) {
        self.layer.forward(&self.x, self.tokens, &mut self.y).unwrap();
    }
    fn train(&mut self) {
        self.forward();
        self.layer.backward(&self.x, &self.dy, &mut self.dx).unwrap();
    }
    /// Captures the layer's pass into a graph fed with this problem's x (and dy), so
    /// [`replay`](Self::replay) does the work of `forward` (or `train`) in one submission.
    fn capture(&mut self, captures: Captures) {
        let device = self.layer.device().clone();
        let (x, dy) = (device.download(&self.x).unwrap(), device.download(&self.dy).unwrap());
        self.layer.capture(self.tokens, captures).unwrap();
        let mut io = self.layer.graph_io().unwrap();
        device.upload_into(&x, &mut io.x).unwrap();
        if captures == Captures::ForwardBackward {
            device.upload_into(&dy, &mut io.dy).unwrap();
        }
    }
    fn replay(&mut self) {
        self.layer.replay().unwrap();
    }
    /// Experts the last forward's routing gave rows (downloads the counts: not in a timed region).
    fn active_experts(&self) -> usize {
        let counts = self.layer.device().download(self.layer.expert_counts()).unwrap();
        counts.iter().filter(|&&c| c > 0).count()
    }
    fn into_layer(self) -> MoeLayer<bf16> {
        self.layer
    }
}

fn bench_gpu(gpu: &Gpu) {
    let device = &gpu.device;
    let tokens = token_counts();
    let Some(&max_tokens) = tokens.iter().max() else { return };
    for shape in models() {
        let config = config(&shape, max_tokens);
        let mut layer = MoeLayer::<bf16>::new(device, config, &weights(&config, 7)).unwrap();
        for &t in &tokens {
            let label = LayerShape { tokens: t, ..shape }.label();
            let mut p = Problem::new(device, layer, t);
            p.forward();
            let f = floor(&config, t, p.active_experts());
            gpu.report("layers/moe_forward_bf16", &label, f.forward(), || p.forward());
            gpu.report("layers/moe_forward_backward_bf16", &label, f.forward_backward(), || {
                p.train()
            });
            // Decode is launch-bound: the same passes replayed from a graph.
            if t <= GRAPH_TOKENS {
                p.capture(Captures::Forward);
                gpu.report("layers/moe_forward_graph_bf16", &label, f.forward(), || p.replay());
                p.capture(Captures::ForwardBackward);
                gpu.report(
                    "layers/moe_forward_backward_graph_bf16",
                    &label,
                    f.forward_backward(),
                    || p.replay(),
                );
            }
            layer = p.into_layer();
        }
    }
}

fn bench(c: &mut Criterion) {
    let small = config(
        &LayerShape {
            name: "small",
            tokens: 64,
            d: 128,
            h: 256,
            experts: 8,
            k: 2,
            groups: None,
        },
        64,
    );
    let tokens = small.max_tokens;
    let upper: Floor = floor(&small, tokens, small.experts).forward_backward();
    eprintln!(
        "layers T={tokens} E={} k={} d={} h={} bf16: forward {}; forward + backward, every expert active, {}",
        small.experts,
        small.k,
        small.dim,
        small.hidden,
        floor(&small, tokens, small.experts).forward().describe(),
        upper.describe()
    );
    let mut group = c.benchmark_group("layers");
    group.sample_size(10);
    let weights = HostWeights::random(&small, 7).rounded::<bf16>(&small);
    let x = Rng::new(8).fill(tokens * small.dim, 1.0);
    let store = |v: f64| bf16::from_f32(v as f32).to_f32();
    group.bench_function("moe_forward/reference", |b| {
        b.iter(|| reference::moe_forward(&small, &weights, &x, tokens, None, &store))
    });
    group.bench_function("moe_forward_backward/reference", |b| {
        b.iter(|| {
            let f = reference::moe_forward(&small, &weights, &x, tokens, None, &store);
            reference::moe_backward(&small, &weights, &x, &f, &x, false, None, &store)
        })
    });
    for device in devices() {
        if device.kind() == DeviceKind::Emulator {
            let layer = MoeLayer::random(&device, small, 7).unwrap();
            let mut p = Problem::new(&device, layer, tokens);
            group.bench_function("moe_forward/emulator", |b| b.iter(|| p.forward()));
            group.bench_function("moe_forward_backward/emulator", |b| b.iter(|| p.train()));
        } else if let Some(gpu) = Gpu::new(&device) {
            bench_gpu(&gpu);
        }
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
