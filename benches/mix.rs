//! Mixing-gate benches: `forward` (y from the two paths) and `backward` (both paths' gradients
//! and the logits'), in bf16 and f32. Memory-bound (a few flops per element): the floor is
//! bytes only.
//!
//! Here: the CPU reference and the emulator at a small shape. On a GPU: the fraction of the
//! memory floor at the realistic layer shapes of `common::layer_shapes`.
mod common;

use common::{Floor, Gpu, LayerShape, devices, layer_shapes};
use criterion::{Criterion, criterion_group, criterion_main};
use moe_kernels::ops::{FloatElement, mix};
use moe_kernels::reference::mix as reference;
use moe_kernels::{Device, DeviceBuffer, DeviceKind};

/// forward: logits, y_cont and y_disc read, y written.
fn forward_floor<T: FloatElement>(s: &LayerShape) -> Floor {
    let row = (s.tokens * s.d * size_of::<T>()) as u64;
    Floor {
        bytes: 3 * row + (s.tokens * 8) as u64,
        flops: 0,
    }
}

/// backward: logits, y_cont, y_disc and dy read; dy_cont, dy_disc and dlogits written.
fn backward_floor<T: FloatElement>(s: &LayerShape) -> Floor {
    let row = (s.tokens * s.d * size_of::<T>()) as u64;
    Floor {
        bytes: 5 * row + (s.tokens * 16) as u64,
        flops: 0,
    }
}

/// Random values in [-0.5, 0.5).
fn values(len: usize, salt: usize) -> Vec<f32> {
    common::inputs::Rng::new(salt as u64).fill(len, 0.5)
}

struct Buffers<T: FloatElement> {
    logits: DeviceBuffer<f32>,
    rows: [DeviceBuffer<T>; 3],
    outputs: [DeviceBuffer<T>; 3],
    dlogits: DeviceBuffer<f32>,
    d: usize,
}

impl<T: FloatElement> Buffers<T> {
    fn new(device: &Device, s: &LayerShape) -> Self {
        let n = s.tokens * s.d;
        let row = |salt| {
            device
                .upload(&values(n, salt).into_iter().map(T::from_f32).collect::<Vec<T>>())
                .unwrap()
        };
        Self {
            logits: device.upload(&values(2 * s.tokens, 3)).unwrap(),
            rows: [row(1), row(2), row(4)],
            outputs: [0, 1, 2].map(|_| device.alloc_zeros(n).unwrap()),
            dlogits: device.alloc_zeros(2 * s.tokens).unwrap(),
            d: s.d,
        }
    }

    fn forward(&mut self, device: &Device) {
        let [cont, disc, _] = &self.rows;
        mix::forward(device, &self.logits, cont, disc, self.d, &mut self.outputs[0]).unwrap()
    }

    fn backward(&mut self, device: &Device) {
        let [cont, disc, dy] = &self.rows;
        let [dcont, ddisc, _] = &mut self.outputs;
        mix::backward(
            device,
            &self.logits,
            cont,
            disc,
            dy,
            self.d,
            dcont,
            ddisc,
            &mut self.dlogits,
        )
        .unwrap()
    }
}

fn bench_dtype<T: FloatElement>(crit: &mut Criterion, devices: &[Device]) {
    let emulator = devices.iter().find(|d| d.kind() == DeviceKind::Emulator);
    if let Some(small) = emulator.map(|d| layer_shapes(d)[0]) {
        let n = small.tokens * small.d;
        let logits = values(2 * small.tokens, 3);
        let [cont, disc, dy] = [1, 2, 4].map(|salt| values(n, salt).into_iter().map(f64::from).collect::<Vec<_>>());
        let mut group = crit.benchmark_group(format!("mix_{}", T::NAME));
        group.sample_size(10);
        println!("forward {}: {}", small.label(), forward_floor::<T>(&small).describe());
        println!("backward {}: {}", small.label(), backward_floor::<T>(&small).describe());
        group.bench_function("forward/reference", |b| {
            b.iter(|| reference::forward(&logits, &cont, &disc, small.d))
        });
        group.bench_function("backward/reference", |b| {
            b.iter(|| reference::backward(&logits, &cont, &disc, &dy, small.d))
        });
        for device in devices {
            let mut buffers = Buffers::<T>::new(device, &small);
            let kind = device.kind();
            group.bench_function(format!("forward/{kind:?}"), |b| b.iter(|| buffers.forward(device)));
            group.bench_function(format!("backward/{kind:?}"), |b| b.iter(|| buffers.backward(device)));
        }
        group.finish();
    }
    for device in devices.iter().filter(|d| d.kind() == DeviceKind::Cuda) {
        let Some(gpu) = Gpu::new(device) else { continue };
        for shape in layer_shapes(device) {
            let mut buffers = Buffers::<T>::new(device, &shape);
            let op = |name| format!("mix/{name}_{}", T::NAME);
            gpu.report(&op("forward"), &shape.label(), forward_floor::<T>(&shape), || {
                buffers.forward(device)
            });
            gpu.report(&op("backward"), &shape.label(), backward_floor::<T>(&shape), || {
                buffers.backward(device)
            });
        }
    }
}

fn bench_mix(crit: &mut Criterion) {
    let devices = devices();
    bench_dtype::<half::bf16>(crit, &devices);
    bench_dtype::<f32>(crit, &devices);
}

criterion_group!(benches, bench_mix);
criterion_main!(benches);
