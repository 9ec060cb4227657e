//! Dispatch benches: the routing map, permute and combine (bf16), each beside its floor.
//!
//! Floors (s = bytes per element, rows = T·k without capacity or padding):
//! - routing map: read ids (T·k·4 B); write inverse (T·k·4), sorted_rows (rows·4), counts and
//!   offsets; no flops.
//! - permute: read X (T·d·s) and inverse (T·k·4); write Xp (rows·d·s); no flops (the kernel also
//!   reads sorted_rows, rows·4, to find the padding rows it zeroes).
//! - combine: read Yp (T·k·d·s), inverse and weights (T·k·8), the residual (T·d·s); write Y
//!   (T·d·s); 2·T·k·d flops (not tensor-core work, so only the bandwidth fraction is meaningful).
//!
//! Without a GPU: the CPU reference and the emulator at a small size. On a GPU,
//! `Gpu` times the realistic layer shapes (`common::layer_shapes`) and prints
//! the fraction of the floor.
mod common;

use common::{Floor, Gpu, devices, layer_shapes};
use criterion::{Criterion, criterion_group, criterion_main};
use half::bf16;
use moe_kernels::ops::dispatch::{self, MapConfig, RoutingMap};
use moe_kernels::reference::dispatch as reference;
use moe_kernels::{Device, DeviceBuffer, DeviceKind};

/// T tokens routed to k of E experts, model dimension d, bf16 rows.
#[derive(Clone, Copy)]
struct Size {
    tokens: usize,
    k: usize,
    experts: usize,
    d: usize,
}

impl Size {
    fn slots(&self) -> u64 {
        (self.tokens * self.k) as u64
    }
    fn map_floor(&self) -> Floor {
        let experts = self.experts as u64;
        Floor {
            bytes: self.slots() * 4 * 3 + (2 * experts + 1) * 4,
            flops: 0,
        }
    }
    fn permute_floor(&self) -> Floor {
        let (t, d, s) = (self.tokens as u64, self.d as u64, 2);
        Floor {
            bytes: t * d * s + self.slots() * 4 + self.slots() * d * s,
            flops: 0,
        }
    }
    fn combine_floor(&self) -> Floor {
        let (t, d, s) = (self.tokens as u64, self.d as u64, 2);
        Floor {
            bytes: self.slots() * d * s + self.slots() * 8 + 2 * t * d * s,
            flops: 2 * self.slots() * d,
        }
    }
    /// Router-like ids: k distinct experts per token, at random.
    fn ids(&self) -> Vec<i32> {
        common::inputs::routing_ids(self.tokens, self.k, self.experts, 0xd15)
    }
}

/// One problem's buffers on one device, with the map already built.
struct Problem {
    size: Size,
    config: MapConfig,
    ids: DeviceBuffer<i32>,
    map: RoutingMap<DeviceBuffer<i32>>,
    workspace: DeviceBuffer<i32>,
    x: DeviceBuffer<bf16>,
    xp: DeviceBuffer<bf16>,
    weights: DeviceBuffer<f32>,
    y: DeviceBuffer<bf16>,
}

impl Problem {
    fn new(device: &Device, size: Size) -> Self {
        let Size { tokens, k, d, .. } = size;
        let config = MapConfig::new(size.experts);
        let rows = config.sorted_rows_len(tokens, k).unwrap();
        let mut rng = common::inputs::Rng::new(0xd16);
        let x: Vec<bf16> = (0..tokens * d).map(|_| bf16::from_f32(rng.uniform(1.0))).collect();
        let mut p = Self {
            ids: device.upload(&size.ids()).unwrap(),
            map: RoutingMap::alloc(device, tokens, k, &config).unwrap(),
            workspace: device.alloc_zeros(config.workspace_len(tokens, k).unwrap()).unwrap(),
            x: device.upload(&x).unwrap(),
            xp: device.alloc_zeros(rows * d).unwrap(),
            weights: device.upload(&vec![1.0 / k as f32; tokens * k]).unwrap(),
            y: device.alloc_zeros(tokens * d).unwrap(),
            size,
            config,
        };
        p.map(device);
        p
    }
    fn map(&mut self, device: &Device) {
        let Size { tokens, k, .. } = self.size;
        dispatch::routing_map(
            device,
            &self.ids,
            tokens,
            k,
            &self.config,
            &mut self.map,
            &mut self.workspace,
        )
        .unwrap();
    }
    fn permute(&mut self, device: &Device) {
        let Size { tokens, k, d, .. } = self.size;
        dispatch::permute(
            device,
            &self.x,
            &self.map.sorted_rows,
            &self.map.inverse,
            tokens,
            k,
            d,
            &mut self.xp,
        )
        .unwrap();
    }
    fn combine(&mut self, device: &Device) {
        let Size { tokens, k, d, .. } = self.size;
        let (weights, residual) = (Some(&self.weights), Some(&self.x));
        dispatch::combine(
            device,
            &self.xp,
            &self.map.inverse,
            weights,
            residual,
            tokens,
            k,
            d,
            &mut self.y,
        )
        .unwrap();
    }
}

fn bench(c: &mut Criterion) {
    let small = Size {
        tokens: 256,
        k: 4,
        experts: 16,
        d: 256,
    };
    eprintln!(
        "dispatch T={} k={} E={} d={} bf16: map {}; permute {}; combine {}",
        small.tokens,
        small.k,
        small.experts,
        small.d,
        small.map_floor().describe(),
        small.permute_floor().describe(),
        small.combine_floor().describe()
    );
    let mut group = c.benchmark_group("dispatch");
    group.sample_size(10);
    let config = MapConfig::new(small.experts);
    let ids = small.ids();
    let host_map = reference::routing_map(&ids, small.tokens, small.k, &config);
    let x = common::inputs::Rng::new(3).fill(small.tokens * small.d, 1.0);
    let yp = reference::permute(&x, &host_map.sorted_rows, small.tokens, small.k, small.d);
    let yp: Vec<f32> = yp.iter().map(|&v| v as f32).collect();
    let w = vec![0.25f32; small.tokens * small.k];
    group.bench_function("map/reference", |b| {
        b.iter(|| reference::routing_map(&ids, small.tokens, small.k, &config))
    });
    group.bench_function("permute/reference", |b| {
        b.iter(|| reference::permute(&x, &host_map.sorted_rows, small.tokens, small.k, small.d))
    });
    group.bench_function("combine/reference", |b| {
        b.iter(|| {
            reference::combine(
                &yp,
                &host_map.inverse,
                Some(&w),
                Some(&x),
                small.tokens,
                small.k,
                small.d,
            )
        })
    });
    for device in devices() {
        if device.kind() == DeviceKind::Emulator {
            let mut p = Problem::new(&device, small);
            group.bench_function("map/emulator", |b| b.iter(|| p.map(&device)));
            group.bench_function("permute/emulator", |b| b.iter(|| p.permute(&device)));
            group.bench_function("combine/emulator", |b| b.iter(|| p.combine(&device)));
        } else {
            let Some(gpu) = Gpu::new(&device) else { continue };
            for shape in layer_shapes(&device) {
                let size = Size {
                    tokens: shape.tokens,
                    k: shape.k,
                    experts: shape.experts,
                    d: shape.d,
                };
                let label = shape.label();
                let mut p = Problem::new(&device, size);
                gpu.report("dispatch/map", &label, size.map_floor(), || p.map(&device));
                gpu.report("dispatch/permute_bf16", &label, size.permute_floor(), || {
                    p.permute(&device)
                });
                // Combine's flops are FMAs on CUDA cores, not tensor-core work: bandwidth only.
                let combine = Floor {
                    flops: 0,
                    ..size.combine_floor()
                };
                gpu.report("dispatch/combine_bf16", &label, combine, || p.combine(&device));
            }
        }
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
