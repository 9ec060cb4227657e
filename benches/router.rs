//! Router benches: selection (DeepSeek-V3 style and Mixtral style), selection with the routing
//! map (`select_and_map`: select + `dispatch::routing_map`; `select_counted`: the same map with
//! its count fused into the selection, + `dispatch::place_counted`), its backward, expert
//! statistics, the aux loss and the z-loss. Each states its floor; every router op is
//! memory-bound (a few flops per logit), so the floor is bytes only.
//!
//! Here: the CPU reference and the emulator at a small shape. On a GPU: the fraction of the
//! memory floor at the realistic layer shapes of `common::layer_shapes`.
mod common;

use common::{Floor, Gpu, devices, layer_shapes};
use criterion::{Criterion, criterion_group, criterion_main};
use moe_kernels::ops::dispatch::{self, CountedMap, MapConfig, RoutingMap};
use moe_kernels::ops::router::{self, AuxLossConfig, AuxLossTarget, AuxLossWorkspace, RouterConfig, ZLossTarget};
use moe_kernels::reference::dispatch as reference_dispatch;
use moe_kernels::reference::router as reference;
use moe_kernels::{Device, DeviceBuffer, DeviceKind};

/// The shape the CPU reference and the emulator run (small: the emulator is slow).
const SMALL_TOKENS: usize = 64;

/// Random logits in [-2, 2).
fn logits(tokens: usize, experts: usize) -> Vec<f32> {
    common::inputs::Rng::new(0x2047).fill(tokens * experts, 2.0)
}

/// Bytes of `[rows, cols]` 4-byte elements.
fn bytes(rows: usize, cols: usize) -> u64 {
    (rows * cols * 4) as u64
}

/// select: z (+ bias) read, ids and weights written.
fn select_floor(c: &RouterConfig, tokens: usize) -> Floor {
    Floor {
        bytes: bytes(tokens, c.experts) + bytes(1, c.experts) + 2 * bytes(tokens, c.k),
        flops: 0,
    }
}

/// select with the routing map: select's floor, then the ids read once more and the map written
/// (counts, offsets, sorted rows and inverse; the tile counts are the implementation's).
fn select_and_map_floor(c: &RouterConfig, tokens: usize) -> Floor {
    Floor {
        bytes: select_floor(c, tokens).bytes + 3 * bytes(tokens, c.k) + 2 * bytes(1, c.experts),
        flops: 0,
    }
}

/// select_backward: z, ids, d_weights read, dz written.
fn backward_floor(c: &RouterConfig, tokens: usize) -> Floor {
    Floor {
        bytes: 2 * bytes(tokens, c.experts) + 2 * bytes(tokens, c.k),
        flops: 0,
    }
}

/// expert_statistics: ids and weights read, counts and sums written (the per-chunk partials
/// are not counted: they are the implementation's, not the op's).
fn statistics_floor(c: &RouterConfig, tokens: usize) -> Floor {
    Floor {
        bytes: 2 * bytes(tokens, c.k) + 2 * bytes(1, c.experts),
        flops: 0,
    }
}

/// aux_loss: z and ids read, the loss written.
fn aux_floor(c: &RouterConfig, tokens: usize) -> Floor {
    Floor {
        bytes: bytes(tokens, c.experts) + bytes(tokens, c.k) + 4,
        flops: 0,
    }
}

/// aux_loss_backward: z, row LSE and counts read, dz read and written.
fn aux_backward_floor(c: &RouterConfig, tokens: usize) -> Floor {
    Floor {
        bytes: 3 * bytes(tokens, c.experts) + bytes(tokens, 1) + bytes(1, c.experts),
        flops: 0,
    }
}

/// z_loss_backward: z and row LSE read, dz read and written.
fn z_backward_floor(c: &RouterConfig, tokens: usize) -> Floor {
    Floor {
        bytes: 3 * bytes(tokens, c.experts) + bytes(tokens, 1),
        flops: 0,
    }
}

/// bias_update: counts read, the bias read and written.
fn bias_update_floor(c: &RouterConfig) -> Floor {
    Floor {
        bytes: 3 * bytes(1, c.experts),
        flops: 0,
    }
}

/// z_loss: z read, row LSE and the loss written.
fn z_loss_floor(c: &RouterConfig, tokens: usize) -> Floor {
    Floor {
        bytes: bytes(tokens, c.experts) + bytes(tokens, 1) + 4,
        flops: 0,
    }
}

/// losses (the aux loss and the z-loss in one launch): z and ids read, the row LSE and both
/// losses written (the LSE's copy into the second workspace is the implementation's).
fn losses_floor(c: &RouterConfig, tokens: usize) -> Floor {
    Floor {
        bytes: bytes(tokens, c.experts) + bytes(tokens, c.k) + bytes(tokens, 1) + 8,
        flops: 0,
    }
}

/// losses_backward (both gradients in one launch): z and the row LSE read, dz read and written.
fn losses_backward_floor(c: &RouterConfig, tokens: usize) -> Floor {
    z_backward_floor(c, tokens)
}

/// Device buffers for one shape.
struct Buffers {
    z: DeviceBuffer<f32>,
    bias: DeviceBuffer<f32>,
    ids: DeviceBuffer<i32>,
    weights: DeviceBuffer<f32>,
    counter: DeviceBuffer<u32>,
    dz: DeviceBuffer<f32>,
    counts: DeviceBuffer<i32>,
    sums: DeviceBuffer<f32>,
    workspace: DeviceBuffer<f32>,
    z_workspace: router::ZLossWorkspace,
    loss: DeviceBuffer<f32>,
    z_loss: DeviceBuffer<f32>,
    aux: AuxLossWorkspace,
    map: RoutingMap<DeviceBuffer<i32>>,
    /// The workspaces of `routing_map` and of the counted map.
    map_workspace: DeviceBuffer<i32>,
    counted_workspace: DeviceBuffer<i32>,
    tokens: usize,
}

impl Buffers {
    fn new(device: &Device, c: &RouterConfig, tokens: usize) -> Self {
        let host_z = logits(tokens, c.experts);
        let reference = reference::select(c, &host_z, None);
        let weights: Vec<f32> = reference.weights.iter().map(|&w| w as f32).collect();
        let map_config = MapConfig::new(c.experts);
        let mut buffers = Self {
            z: device.upload(&host_z).unwrap(),
            bias: device.alloc_zeros(c.experts).unwrap(),
            ids: device.upload(&reference.ids).unwrap(),
            weights: device.upload(&weights).unwrap(),
            counter: device.alloc_zeros(1).unwrap(),
            dz: device.alloc_zeros(tokens * c.experts).unwrap(),
            counts: device.alloc_zeros(c.experts).unwrap(),
            sums: device.alloc_zeros(c.experts).unwrap(),
            workspace: device
                .alloc_zeros(router::expert_statistics_workspace_len(c, tokens).unwrap())
                .unwrap(),
            z_workspace: router::ZLossWorkspace::new(device, tokens).unwrap(),
            loss: device.alloc_zeros(1).unwrap(),
            z_loss: device.alloc_zeros(1).unwrap(),
            aux: AuxLossWorkspace::new(device, c, &AuxLossConfig::default(), tokens).unwrap(),
            map: RoutingMap::alloc(device, tokens, c.k, &map_config).unwrap(),
            map_workspace: device
                .alloc_zeros(map_config.workspace_len(tokens, c.k).unwrap())
                .unwrap(),
            counted_workspace: device
                .alloc_zeros(map_config.counted_workspace_len(tokens, c.k).unwrap())
                .unwrap(),
            tokens,
        };
        // What the backward ops and the bias update read: the forward's LSE, counts.
        for op in ["aux_loss", "z_loss", "expert_statistics"] {
            run(op, device, c, &mut buffers);
        }
        buffers
    }
}

/// The router ops by name, each one call on `b`.
const OPS: [&str; 12] = [
    "select",
    "select_and_map",
    "select_counted",
    "select_backward",
    "expert_statistics",
    "aux_loss",
    "aux_loss_backward",
    "z_loss",
    "z_loss_backward",
    "losses",
    "losses_backward",
    "bias_update",
];

fn run(op: &str, device: &Device, c: &RouterConfig, b: &mut Buffers) {
    let aux = AuxLossConfig::default();
    match op {
        "select" | "select_and_map" | "select_counted" => select_with_map(op, device, c, b),
        "select_backward" => router::select_backward(device, c, &b.z, &b.ids, &b.weights, &mut b.dz),
        "expert_statistics" => router::expert_statistics(
            device,
            c,
            &b.ids,
            &b.weights,
            &mut b.workspace,
            &mut b.counts,
            &mut b.sums,
        ),
        "aux_loss" => router::aux_loss(device, c, &aux, &b.z, &b.ids, &mut b.aux, &mut b.loss),
        "aux_loss_backward" => router::aux_loss_backward(device, c, &aux, &b.z, &b.aux, &mut b.dz),
        "z_loss" => router::z_loss(device, c, 1e-3, &b.z, &mut b.z_workspace, &mut b.loss),
        "z_loss_backward" => router::z_loss_backward(device, c, 1e-3, &b.z, &b.z_workspace, &mut b.dz),
        "losses_backward" => {
            let aux = Some((&aux, &b.aux));
            router::losses_backward(device, c, &b.z, aux, Some((1e-3, &b.z_workspace)), &mut b.dz)
        }
        "losses" => router::losses(
            device,
            c,
            &b.z,
            Some(AuxLossTarget {
                config: &aux,
                ids: &b.ids,
                workspace: &mut b.aux,
                loss: &mut b.loss,
            }),
            Some(ZLossTarget {
                coefficient: 1e-3,
                workspace: &mut b.z_workspace,
                loss: &mut b.z_loss,
            }),
        ),
        _ => router::bias_update(device, 1e-3, &b.counts, &mut b.bias),
    }
    .unwrap()
}

/// The selection alone (`select`), or with the routing map of its ids, unfused
/// (`select_and_map`) or counted (`select_counted`).
fn select_with_map(op: &str, device: &Device, c: &RouterConfig, b: &mut Buffers) -> moe_kernels::Result<()> {
    let config = MapConfig::new(c.experts);
    let mut target = CountedMap {
        config: &config,
        map: &mut b.map,
        workspace: &mut b.counted_workspace,
        zeroed: true, // every run completes its map, which leaves the workspace zeroed
    };
    let counted = (op == "select_counted").then_some(&mut target);
    router::select_counted(
        device,
        c,
        &b.z,
        Some(&b.bias),
        &mut b.ids,
        &mut b.weights,
        &mut b.counter,
        counted,
    )?;
    match op {
        "select" => Ok(()),
        "select_counted" => dispatch::place_counted(device, &b.ids, b.tokens, c.k, &mut target),
        _ => dispatch::routing_map(device, &b.ids, b.tokens, c.k, &config, target.map, &mut b.map_workspace),
    }
}

fn reference_op(op: &str, c: &RouterConfig, z: &[f32], ids: &[i32], weights: &[f32]) {
    let aux = AuxLossConfig::default();
    match op {
        "select" => drop(reference::select(c, z, None)),
        "select_and_map" | "select_counted" => {
            let selection = reference::select(c, z, None);
            let tokens = z.len() / c.experts;
            drop(reference_dispatch::routing_map(
                &selection.ids,
                tokens,
                c.k,
                &MapConfig::new(c.experts),
            ))
        }
        "select_backward" => drop(reference::select_backward(c, z, ids, weights)),
        "expert_statistics" => drop(reference::expert_weight_sums(c.experts, ids, weights)),
        "aux_loss" => drop(reference::aux_loss(c, &aux, z, ids)),
        "aux_loss_backward" => reference::aux_loss_backward(c, &aux, z, ids, &mut vec![0.0; z.len()]),
        "z_loss" => drop(reference::z_loss(c.experts, 1e-3, z)),
        "z_loss_backward" => reference::z_loss_backward(c.experts, 1e-3, z, &mut vec![0.0; z.len()]),
        "losses" => drop((
            reference::aux_loss(c, &aux, z, ids),
            reference::z_loss(c.experts, 1e-3, z),
        )),
        _ => drop(reference::bias_update(
            1e-3,
            &reference::expert_counts(c.experts, ids),
            &vec![0.0; c.experts],
        )),
    }
}

fn floor(op: &str, c: &RouterConfig, tokens: usize) -> Floor {
    match op {
        "select" => select_floor(c, tokens),
        "select_and_map" | "select_counted" => select_and_map_floor(c, tokens),
        "select_backward" => backward_floor(c, tokens),
        "expert_statistics" => statistics_floor(c, tokens),
        "aux_loss" => aux_floor(c, tokens),
        "aux_loss_backward" => aux_backward_floor(c, tokens),
        "z_loss" => z_loss_floor(c, tokens),
        "z_loss_backward" => z_backward_floor(c, tokens),
        "losses" => losses_floor(c, tokens),
        "losses_backward" => losses_backward_floor(c, tokens),
        _ => bias_update_floor(c),
    }
}

fn bench_router(crit: &mut Criterion) {
    let devices = devices();
    for (name, c) in [
        ("deepseek_v3", RouterConfig::deepseek_v3()),
        ("mixtral", RouterConfig::mixtral()),
    ] {
        let host_z = logits(SMALL_TOKENS, c.experts);
        let selection = reference::select(&c, &host_z, None);
        let weights: Vec<f32> = selection.weights.iter().map(|&w| w as f32).collect();
        let mut group = crit.benchmark_group(format!("router_{name}"));
        group.sample_size(10);
        for op in OPS {
            println!(
                "{name} {op} at T = {SMALL_TOKENS}: {}",
                floor(op, &c, SMALL_TOKENS).describe()
            );
            group.bench_function(format!("{op}/reference"), |b| {
                b.iter(|| reference_op(op, &c, &host_z, &selection.ids, &weights))
            });
            for device in &devices {
                let mut buffers = Buffers::new(device, &c, SMALL_TOKENS);
                let label = format!("{op}/{:?}", device.kind());
                group.bench_function(label, |b| b.iter(|| run(op, device, &c, &mut buffers)));
            }
        }
        group.finish();
    }
    for device in devices.iter().filter(|d| d.kind() == DeviceKind::Cuda) {
        let Some(gpu) = Gpu::new(device) else { continue };
        for shape in layer_shapes(device) {
            let c = if shape.name == "deepseek" {
                RouterConfig::deepseek_v3()
            } else {
                RouterConfig::mixtral()
            };
            let mut buffers = Buffers::new(device, &c, shape.tokens);
            for op in OPS {
                let floor = floor(op, &c, shape.tokens);
                gpu.report(&format!("router/{op}"), &shape.label(), floor, || {
                    run(op, device, &c, &mut buffers)
                });
            }
        }
    }
}

criterion_group!(benches, bench_router);
criterion_main!(benches);
