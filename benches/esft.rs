//! ESFT benches: `accumulate` (one batch of routing into the running statistics) and `select`
//! (the expert mask from them). Both are tiny next to a layer's GEMMs and memory-bound: the
//! floor is bytes only.
//!
//! Here: the CPU reference and the emulator at a small shape. On a GPU: the fraction of the
//! memory floor at the realistic layer shapes of `common::layer_shapes`.
mod common;

use common::{Floor, Gpu, LayerShape, devices, layer_shapes};
use criterion::{Criterion, criterion_group, criterion_main};
use moe_kernels::ops::esft::{self, EsftScores, EsftSelection, ScoreKind};
use moe_kernels::reference::esft as reference;
use moe_kernels::{Device, DeviceBuffer, DeviceKind};

/// Routing of `tokens` tokens: k distinct random ids per token and random weights in
/// (0, 1/k].
fn routing(tokens: usize, experts: usize, k: usize) -> (Vec<i32>, Vec<f32>) {
    let ids = common::inputs::routing_ids(tokens, k, experts, 0xe5f7);
    let mut rng = common::inputs::Rng::new(0xe5f8);
    let weights = (0..tokens * k)
        .map(|_| (1.0 + rng.uniform(1.0)) / (2 * k) as f32)
        .collect();
    (ids, weights)
}

/// accumulate: ids and weights read; counts, sums and totals read and written.
fn accumulate_floor(s: &LayerShape) -> Floor {
    Floor {
        bytes: (s.tokens * s.k * 8 + 2 * (s.experts * 16 + 16)) as u64,
        flops: 0,
    }
}

/// select: counts, sums and totals read; scores, mask, ids and the count written.
fn select_floor(s: &LayerShape) -> Floor {
    Floor {
        bytes: (s.experts * 16 + 16 + s.experts * 12 + 4) as u64,
        flops: 0,
    }
}

struct Buffers {
    ids: DeviceBuffer<i32>,
    weights: DeviceBuffer<f32>,
    scores: EsftScores,
    selection: EsftSelection,
}

impl Buffers {
    fn new(device: &Device, s: &LayerShape) -> Self {
        let (ids, weights) = routing(s.tokens, s.experts, s.k);
        Self {
            ids: device.upload(&ids).unwrap(),
            weights: device.upload(&weights).unwrap(),
            scores: EsftScores::new(device, s.experts, s.k).unwrap(),
            selection: EsftSelection::new(device, s.experts).unwrap(),
        }
    }

    fn accumulate(&mut self, device: &Device) {
        esft::accumulate(device, &self.ids, &self.weights, &mut self.scores).unwrap()
    }

    fn select(&mut self, device: &Device) {
        esft::select(device, &self.scores, ScoreKind::Gate, 0.1, &mut self.selection).unwrap()
    }
}

fn bench_esft(crit: &mut Criterion) {
    let devices = devices();
    let emulator = devices.iter().find(|d| d.kind() == DeviceKind::Emulator);
    if let Some(small) = emulator.map(|d| layer_shapes(d)[0]) {
        let (ids, weights) = routing(small.tokens, small.experts, small.k);
        let mut group = crit.benchmark_group("esft");
        group.sample_size(10);
        println!("accumulate {}: {}", small.label(), accumulate_floor(&small).describe());
        println!("select {}: {}", small.label(), select_floor(&small).describe());
        group.bench_function("accumulate/reference", |b| {
            b.iter(|| reference::statistics(&[(&ids, &weights)], small.experts, small.k))
        });
        let stats = reference::statistics(&[(&ids, &weights)], small.experts, small.k);
        group.bench_function("select/reference", |b| {
            b.iter(|| reference::select(&stats, small.k, ScoreKind::Gate, 0.1))
        });
        for device in &devices {
            let mut buffers = Buffers::new(device, &small);
            buffers.accumulate(device);
            let kind = device.kind();
            group.bench_function(format!("accumulate/{kind:?}"), |b| {
                b.iter(|| buffers.accumulate(device))
            });
            group.bench_function(format!("select/{kind:?}"), |b| b.iter(|| buffers.select(device)));
        }
        group.finish();
    }
    for device in devices.iter().filter(|d| d.kind() == DeviceKind::Cuda) {
        let Some(gpu) = Gpu::new(device) else { continue };
        for shape in layer_shapes(device) {
            let mut buffers = Buffers::new(device, &shape);
            gpu.report("esft/accumulate", &shape.label(), accumulate_floor(&shape), || {
                buffers.accumulate(device)
            });
            gpu.report("esft/select", &shape.label(), select_floor(&shape), || {
                buffers.select(device)
            });
        }
    }
}

criterion_group!(benches, bench_esft);
criterion_main!(benches);
