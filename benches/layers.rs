//! Layer benches: one MoE layer (linear router, SwiGLU experts, bf16) forward, and forward +
//! backward, beside its floor.
//!
//! Floors (s = 2 bytes per bf16 element; the routing metadata and intermediates are not part of
//! a floor: an ideal layer keeps them on chip):
//! - forward: read X (T·d·s), the gate (E·d·s) and the weights of the experts that get rows,
//!   at most min(E, T·k) of them (3h·d·s each); write Y (T·d·s). Flops: the gate 2·T·E·d plus
//!   the experts 2·T·k·3h·d.
//! - forward + backward: the forward, plus read dY (T·d·s), write dX (T·d·s) and every f32
//!   weight gradient (E·3h·d·4 + E·d·4: outputs, written even for experts without rows); flops
//!   three times the forward's (dgrad and wgrad).
//!
//! Without a GPU: the CPU reference and the emulator at a small size. On a GPU,
//! `report_gpu_fraction` times the Mixtral-like shapes of `common::layer_shapes` (the DeepSeek-like
//! layer's f32 expert gradients alone exceed an 80 GB GPU, so it is left out).
mod common;

use common::{Floor, devices, layer_shapes, report_gpu_fraction};
use criterion::{Criterion, criterion_group, criterion_main};
use half::bf16;
use moe_kernels::layers::{HostWeights, MoeConfig, MoeLayer, RouterKind};
use moe_kernels::reference::layers as reference;
use moe_kernels::{Device, DeviceBuffer, DeviceKind};

fn forward_floor(c: &MoeConfig, tokens: usize) -> Floor {
    let (t, d, h, e, k, s) = (
        tokens as u64,
        c.dim as u64,
        c.hidden as u64,
        c.experts as u64,
        c.k as u64,
        2,
    );
    let used = e.min(t * k);
    Floor {
        bytes: 2 * t * d * s + e * d * s + used * 3 * h * d * s,
        flops: 2 * t * e * d + 2 * t * k * 3 * h * d,
    }
}

fn training_floor(c: &MoeConfig, tokens: usize) -> Floor {
    let forward = forward_floor(c, tokens);
    let (t, d, h, e) = (tokens as u64, c.dim as u64, c.hidden as u64, c.experts as u64);
    Floor {
        bytes: forward.bytes + 2 * t * d * 2 + (e * 3 * h * d + e * d) * 4,
        flops: 3 * forward.flops,
    }
}

/// A layer and its buffers on one device.
struct Problem {
    layer: MoeLayer<bf16>,
    tokens: usize,
    x: DeviceBuffer<bf16>,
    y: DeviceBuffer<bf16>,
    dx: DeviceBuffer<bf16>,
}

impl Problem {
    fn new(device: &Device, config: MoeConfig, tokens: usize) -> Self {
        let x: Vec<bf16> = (0..tokens * config.dim)
            .map(|i| bf16::from_f32(((i * 37) % 101) as f32 / 50.0 - 1.0))
            .collect();
        Self {
            layer: MoeLayer::random(device, config, 7).unwrap(),
            tokens,
            x: device.upload(&x).unwrap(),
            y: device.alloc_zeros(tokens * config.dim).unwrap(),
            dx: device.alloc_zeros(tokens * config.dim).unwrap(),
        }
    }
    fn forward(&mut self) {
        self.layer.forward(&self.x, self.tokens, &mut self.y).unwrap();
    }
    fn train(&mut self) {
        self.forward();
        // dY = X: any [T, d] tensor will do for timing.
        self.layer.backward(&self.x, &self.x, &mut self.dx).unwrap();
    }
}

fn bench(c: &mut Criterion) {
    let small = MoeConfig {
        router: RouterKind::Linear,
        experts: 8,
        k: 2,
        dim: 128,
        hidden: 256,
        max_tokens: 64,
        ..MoeConfig::default()
    };
    let tokens = small.max_tokens;
    eprintln!(
        "layers T={tokens} E={} k={} d={} h={} bf16: forward {}; forward + backward {}",
        small.experts,
        small.k,
        small.dim,
        small.hidden,
        forward_floor(&small, tokens).describe(),
        training_floor(&small, tokens).describe()
    );
    let mut group = c.benchmark_group("layers");
    group.sample_size(10);
    let weights = HostWeights::random(&small, 7).rounded::<bf16>(&small);
    let x: Vec<f32> = (0..tokens * small.dim)
        .map(|i| ((i * 37) % 101) as f32 / 50.0 - 1.0)
        .collect();
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
            let mut p = Problem::new(&device, small, tokens);
            group.bench_function("moe_forward/emulator", |b| b.iter(|| p.forward()));
            group.bench_function("moe_forward_backward/emulator", |b| b.iter(|| p.train()));
        } else {
            for shape in layer_shapes(&device).into_iter().filter(|s| s.name == "mixtral") {
                let config = MoeConfig {
                    router: RouterKind::Linear,
                    experts: shape.experts,
                    k: shape.k,
                    dim: shape.d,
                    hidden: shape.h,
                    max_tokens: shape.tokens,
                    ..MoeConfig::default()
                };
                let label = shape.label();
                let mut p = Problem::new(&device, config, shape.tokens);
                report_gpu_fraction(
                    "layers/moe_forward_bf16",
                    &label,
                    &device,
                    forward_floor(&config, shape.tokens),
                    || p.forward(),
                );
                let floor = training_floor(&config, shape.tokens);
                report_gpu_fraction("layers/moe_forward_backward_bf16", &label, &device, floor, || p.train());
            }
        }
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
