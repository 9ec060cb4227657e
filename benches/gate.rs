//! Router scoring: the linear gate against the low-rank quadratic gate at r = 4, forward and
//! backward, with f32 X (the linear forward on split-tf32 tensor cores, the quadratic one on FMA
//! tiles) and bf16 X (tensor-core forward). States each op's floor; benches the CPU reference and the emulator at a small size; on a GPU reports the fraction
//! of the floor at the realistic layer shapes (`common::layer_shapes`), with the whole routing
//! step (`gate::route`: scores, top-k and the complete routing map, one launch at decode) beside
//! the same step as separate calls, and above decode the step with the router losses
//! (`gate::route_with_losses`) beside the route and then the losses.
mod common;

use common::inputs::uniform_values;
use common::{Floor, Gpu, devices, layer_shapes};
use criterion::measurement::WallTime;
use criterion::{BenchmarkGroup, Criterion, criterion_group, criterion_main};
use half::bf16;
use moe_kernels::ops::FloatElement;
use moe_kernels::ops::dispatch::{self, CountedMap, MapConfig, RoutingMap};
use moe_kernels::ops::gate::{self, DECODE_MAX_TOKENS, GateForm, GateGrads, GatePath, GateShape, GateWeights};
use moe_kernels::ops::router::{
    self, AuxLossConfig, AuxLossTarget, AuxLossWorkspace, RouterConfig, SelectedAuxLoss, ZLossTarget, ZLossWorkspace,
};
use moe_kernels::reference::gate::{self as reference, GateParams};
use moe_kernels::{Device, DeviceBuffer, DeviceKind, DeviceSlice};

const SHAPE: GateShape = GateShape {
    tokens: 128,
    dim: 64,
    experts: 32,
    rank: 4,
};

/// Projection rows per expert the form reads (and multiplies X with).
fn rows_per_expert(form: GateForm, shape: &GateShape) -> u64 {
    match form {
        GateForm::Linear => 1,
        // U and V rows plus the linear row B.
        _ => 2 * shape.rank as u64 + 1,
    }
}

/// Forward floor: X and the weights (`size` bytes per element) and the f32 bias read once,
/// z (f32) written once; 2 flops per multiply-add of X against every projection row.
fn forward_floor(form: GateForm, shape: &GateShape, size: u64) -> Floor {
    let (t, d, e) = (shape.tokens as u64, shape.dim as u64, shape.experts as u64);
    let rows = e * rows_per_expert(form, shape);
    Floor {
        bytes: size * (t * d + rows * d) + 4 * (e + t * e),
        flops: 2 * t * d * rows,
    }
}

/// Backward floor: X, dz and the weights read once; dX (X's dtype) and every weight gradient
/// (f32) written once; the projections are recomputed (one forward GEMM) and two GEMMs of the
/// same size follow.
fn backward_floor(form: GateForm, shape: &GateShape, size: u64) -> Floor {
    let (t, d, e) = (shape.tokens as u64, shape.dim as u64, shape.experts as u64);
    let rows = e * rows_per_expert(form, shape);
    let recompute = if form == GateForm::Linear { 0 } else { 1 };
    Floor {
        bytes: size * (2 * t * d + rows * d) + 4 * (t * e + rows * d + e),
        flops: 2 * t * d * rows * (2 + recompute),
    }
}

fn params(form: GateForm, shape: &GateShape) -> GateParams {
    let (d, e, r) = (shape.dim, shape.experts, shape.rank);
    let s = 1.0 / (d as f64).sqrt();
    match form {
        GateForm::Linear => GateParams::Linear {
            w: uniform_values(1, e * d, s as f32),
            b: Some(uniform_values(2, e, 1.0)),
        },
        _ => GateParams::LowRank {
            u: uniform_values(3, e * r * d, s as f32),
            v: uniform_values(4, e * r * d, s as f32),
            b: Some(uniform_values(5, e * d, s as f32)),
            c: Some(uniform_values(6, e, 1.0)),
        },
    }
}

/// `v` rounded to `T` on `device`.
fn upload<T: FloatElement>(device: &Device, v: &[f64]) -> DeviceBuffer<T> {
    device
        .upload(&v.iter().map(|&v| T::from_f32(v as f32)).collect::<Vec<_>>())
        .expect("upload")
}

/// The emulator (timed by criterion in `group`) or a GPU (timed by `gpu`, `group` None)
/// on X and weights of type T.
#[allow(clippy::too_many_arguments)]
fn bench_device<T: FloatElement>(
    group: Option<&mut BenchmarkGroup<'_, WallTime>>,
    gpu: Option<&Gpu>,
    device: &Device,
    form: GateForm,
    shape: &GateShape,
    host: &GateParams,
    x: &[f64],
    dz: &[f64],
    label: &str,
) {
    // The linear gate's bias and every c are f32; the other parameters are stored as T.
    let f32_bias = |name: &str| name == "c" || (form == GateForm::Linear && name == "b");
    let tensors = host.tensors();
    let typed: Vec<DeviceBuffer<T>> = tensors.iter().map(|(_, t)| upload::<T>(device, t)).collect();
    let float: Vec<DeviceBuffer<f32>> = tensors.iter().map(|(_, t)| upload::<f32>(device, t)).collect();
    let pick = |i: usize| (!f32_bias(tensors[i].0)).then(|| &typed[i] as &dyn DeviceSlice<T>);
    let pick_f32 = |i: usize| f32_bias(tensors[i].0).then(|| &float[i] as &dyn DeviceSlice<f32>);
    let weights = match form {
        GateForm::Linear => GateWeights::Linear {
            w: pick(0).expect("w"),
            b: pick_f32(1),
        },
        _ => GateWeights::LowRank {
            u: pick(0).expect("u"),
            v: pick(1).expect("v"),
            b: pick(2),
            c: pick_f32(3),
        },
    };
    let x_dev = upload::<T>(device, x);
    let dz_dev = upload::<f32>(device, dz);
    let mut z = device.alloc_zeros::<f32>(shape.z_len().unwrap()).expect("alloc");
    let mut dx = device.alloc_zeros::<T>(shape.x_len().unwrap()).expect("alloc");
    let mut grads: Vec<DeviceBuffer<f32>> = tensors
        .iter()
        .map(|(_, t)| device.alloc_zeros(t.len()).expect("alloc"))
        .collect();
    let ws_len = gate::backward_workspace_len(form, shape).expect("workspace");
    let mut ws = device.alloc_zeros::<f32>(ws_len).expect("alloc");
    let mut forward = || gate::scores(device, shape, &weights, &x_dev, &mut z).expect("scores");
    let mut backward = || {
        let g = match &mut grads[..] {
            [w, b] => GateGrads::Linear { w, b: Some(b) },
            [u, v, b, c] => GateGrads::LowRank {
                u,
                v,
                b: Some(b),
                c: Some(c),
            },
            _ => unreachable!("two or four gradients"),
        };
        gate::scores_backward(device, shape, &weights, &x_dev, &dz_dev, &mut dx, g, &mut ws).expect("backward")
    };
    let size = size_of::<T>() as u64;
    match group {
        Some(group) => {
            group.bench_function(format!("{:?} forward {}", device.kind(), T::NAME), |b| {
                b.iter(&mut forward)
            });
            group.bench_function(format!("{:?} backward {}", device.kind(), T::NAME), |b| {
                b.iter(&mut backward)
            });
        }
        None => {
            let gpu = gpu.expect("a GPU timer where criterion does not time");
            let op = |pass: &str| format!("gate/{form:?}_{pass}_{}", T::NAME);
            gpu.report(&op("forward"), label, forward_floor(form, shape, size), &mut forward);
            if form == GateForm::Linear && shape.tokens <= DECODE_MAX_TOKENS {
                // Auto ran the decode kernel: the tiles beside it, on the same shape.
                gpu.record(
                    &op("forward"),
                    label,
                    "moe-kernels tiled",
                    forward_floor(form, shape, size),
                    || gate::scores_on_path(device, shape, &weights, &x_dev, &mut z, GatePath::Tiled).expect("scores"),
                );
            }
            gpu.report(&op("backward"), label, backward_floor(form, shape, size), &mut backward);
        }
    }
}

/// The routing step's floor: the bf16 linear gate's forward, then ids and weights written, and
/// the routing map's sorted rows and inverse (4 bytes a slot each; the counts are negligible).
fn route_floor(shape: &GateShape, k: usize) -> Floor {
    let forward = forward_floor(GateForm::Linear, shape, 2);
    Floor {
        bytes: forward.bytes + 16 * (shape.tokens * k) as u64,
        flops: forward.flops,
    }
}

/// The whole routing step for the bf16 linear gate with the layer's router, as the layer runs
/// it (`gate::route`: scores, top-k and the complete routing map, one launch at decode); beside
/// it the same step as separate calls (`scores`, `router::select_counted` with the map's count,
/// `dispatch::place_counted`), on the same inputs.
fn bench_route(gpu: &Gpu, device: &Device, shape: &GateShape, config: &RouterConfig, x: &[f64], label: &str) {
    let host = params(GateForm::Linear, shape);
    let tensors = host.tensors();
    let w = upload::<bf16>(device, tensors[0].1);
    let b = upload::<f32>(device, tensors[1].1);
    let gate_weights = GateWeights::Linear { w: &w, b: Some(&b) };
    let x_dev = upload::<bf16>(device, x);
    let (tokens, k) = (shape.tokens, config.k);
    let mut z = device.alloc_zeros::<f32>(shape.z_len().unwrap()).expect("alloc");
    let mut ids = device.alloc_zeros::<i32>(tokens * k).expect("alloc");
    let mut weights = device.alloc_zeros::<f32>(tokens * k).expect("alloc");
    let mut nonfinite = device.alloc_zeros::<u32>(1).expect("alloc");
    let map_config = MapConfig::new(config.experts);
    let mut map = RoutingMap::alloc(device, tokens, k, &map_config).expect("alloc");
    let ws_len = map_config.counted_workspace_len(tokens, k).expect("workspace");
    let mut workspace = device.alloc_zeros::<i32>(ws_len).expect("alloc");
    let mut target = CountedMap {
        config: &map_config,
        map: &mut map,
        workspace: &mut workspace,
        zeroed: true, // every run completes its map, which leaves the workspace zeroed
    };
    let no_bias = None::<&DeviceBuffer<f32>>;
    let floor = route_floor(shape, k);
    let fused = gate::route_is_fused(shape, &gate_weights, true);
    println!("gate/route_bf16 {label}: the selection fused into the gate: {fused}");
    let mut step = |separate: bool| {
        if separate {
            gate::scores(device, shape, &gate_weights, &x_dev, &mut z).expect("scores");
            router::select_counted(
                device,
                config,
                &z,
                no_bias,
                &mut ids,
                &mut weights,
                &mut nonfinite,
                Some(&mut target),
            )
            .expect("select");
            dispatch::place_counted(device, &ids, tokens, k, &mut target).expect("place");
        } else {
            gate::route(
                device,
                shape,
                &gate_weights,
                &x_dev,
                &mut z,
                config,
                no_bias,
                &mut ids,
                &mut weights,
                &mut nonfinite,
                &mut target,
            )
            .expect("route");
        }
    };
    gpu.report("gate/route_bf16", label, floor, || step(false));
    gpu.record("gate/route_bf16", label, "moe-kernels separate calls", floor, || {
        step(true)
    });
    if tokens <= DECODE_MAX_TOKENS {
        // Decode is launch-bound: the step replayed from a graph too, as a decode loop runs it.
        let (ours, separate) = ("moe-kernels graph replay", "moe-kernels separate calls, graph replay");
        gpu.record_graph("gate/route_bf16", label, ours, floor, || step(false));
        gpu.record_graph("gate/route_bf16", label, separate, floor, || step(true));
        return;
    }
    // Training: the step with both router losses (token level), as the layer runs it
    // (`gate::route_with_losses`: in the tile kernel's launch where it selects), beside
    // `gate::route` then `router::losses`. The floor adds the rows' LSEs written (4 bytes a row).
    let aux_config = AuxLossConfig::default();
    let mut aux_workspace = AuxLossWorkspace::new(device, config, &aux_config, tokens).expect("alloc");
    let mut z_workspace = ZLossWorkspace::new(device, tokens).expect("alloc");
    let mut aux_loss = device.alloc_zeros::<f32>(1).expect("alloc");
    let mut z_loss = device.alloc_zeros::<f32>(1).expect("alloc");
    let floor = Floor {
        bytes: floor.bytes + 4 * tokens as u64,
        flops: floor.flops,
    };
    println!(
        "gate/route_losses_bf16 {label}: the selection fused into the gate: {fused}, the losses too: {}",
        fused && tokens <= 65536
    );
    let mut step = |separate: bool| {
        let z_target = Some(ZLossTarget {
            coefficient: 1e-3,
            workspace: &mut z_workspace,
            loss: &mut z_loss,
        });
        if separate {
            gate::route(
                device,
                shape,
                &gate_weights,
                &x_dev,
                &mut z,
                config,
                no_bias,
                &mut ids,
                &mut weights,
                &mut nonfinite,
                &mut target,
            )
            .expect("route");
            let aux = Some(AuxLossTarget {
                config: &aux_config,
                ids: &ids,
                workspace: &mut aux_workspace,
                loss: &mut aux_loss,
            });
            router::losses(device, config, &z, aux, z_target).expect("losses");
        } else {
            let aux = Some(SelectedAuxLoss {
                config: &aux_config,
                workspace: &mut aux_workspace,
                loss: &mut aux_loss,
            });
            gate::route_with_losses(
                device,
                shape,
                &gate_weights,
                &x_dev,
                &mut z,
                config,
                no_bias,
                &mut ids,
                &mut weights,
                &mut nonfinite,
                &mut target,
                aux,
                z_target,
            )
            .expect("route with losses");
        }
    };
    gpu.report("gate/route_losses_bf16", label, floor, || step(false));
    gpu.record(
        "gate/route_losses_bf16",
        label,
        "moe-kernels route, then losses",
        floor,
        || step(true),
    );
}

fn bench(c: &mut Criterion) {
    let devices = devices();
    let x = uniform_values(7, SHAPE.x_len().unwrap(), 1.0);
    let dz = uniform_values(8, SHAPE.z_len().unwrap(), 1.0);
    for form in [GateForm::Linear, GateForm::LowRank] {
        let host = params(form, &SHAPE);
        let rank = if form == GateForm::Linear {
            String::new()
        } else {
            format!(" r={}", SHAPE.rank)
        };
        let label = format!("{form:?} T={} d={} E={}{rank}", SHAPE.tokens, SHAPE.dim, SHAPE.experts);
        for size in [4, 2] {
            println!(
                "gate forward {label}, {size}-byte X: {}",
                forward_floor(form, &SHAPE, size).describe()
            );
            println!(
                "gate backward {label}, {size}-byte X: {}",
                backward_floor(form, &SHAPE, size).describe()
            );
        }
        let mut group = c.benchmark_group(format!("gate {label}"));
        group.sample_size(10);
        group.bench_function("reference forward", |b| b.iter(|| reference::scores(&SHAPE, &host, &x)));
        group.bench_function("reference backward", |b| {
            b.iter(|| reference::scores_backward(&SHAPE, &host, &x, &dz))
        });
        for device in devices.iter().filter(|d| d.kind() == DeviceKind::Emulator) {
            bench_device::<f32>(Some(&mut group), None, device, form, &SHAPE, &host, &x, &dz, &label);
            bench_device::<bf16>(Some(&mut group), None, device, form, &SHAPE, &host, &x, &dz, &label);
        }
        group.finish();
    }
    for device in devices.iter().filter(|d| d.kind() == DeviceKind::Cuda) {
        let Some(gpu) = Gpu::new(device) else { continue };
        for layer in layer_shapes(device) {
            let shape = GateShape {
                tokens: layer.tokens,
                dim: layer.d,
                experts: layer.experts,
                rank: SHAPE.rank,
            };
            let (x, dz) = (
                uniform_values(7, shape.x_len().unwrap(), 1.0),
                uniform_values(8, shape.z_len().unwrap(), 1.0),
            );
            for form in [GateForm::Linear, GateForm::LowRank] {
                let host = params(form, &shape);
                let label = match form {
                    GateForm::Linear => layer.label(),
                    _ => format!("{},r={}", layer.label(), shape.rank),
                };
                bench_device::<f32>(None, Some(&gpu), device, form, &shape, &host, &x, &dz, &label);
                bench_device::<bf16>(None, Some(&gpu), device, form, &shape, &host, &x, &dz, &label);
            }
            let config = if layer.name == "deepseek" {
                RouterConfig::deepseek_v3()
            } else {
                RouterConfig::mixtral()
            };
            bench_route(&gpu, device, &shape, &config, &x, &layer.label());
        }
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
