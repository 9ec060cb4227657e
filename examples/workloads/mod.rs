//! One small run of every op family's ops, so that `kernel_report` learns the launch
//! configuration the crate uses for each kernel (occupancy needs it). Shapes are small (the
//! emulator runs them) but take every path: each router width, both dispatch map paths,
//! capacity, every row-mover dtype, every gate form in every dtype, and the layers (grouped
//! GEMM, codebook, mixing gate, ESFT) in every dtype.
use half::{bf16, f16};
use moe_kernels::layers::esft::EsftTracker;
use moe_kernels::layers::{MoeConfig, MoeLayer, RouterKind, VqMoe};
use moe_kernels::ops::FloatElement;
use moe_kernels::ops::dispatch::{self, Capacity, MapConfig, RoutingMap};
use moe_kernels::ops::esft::ScoreKind;
use moe_kernels::ops::gate::{self, GateForm, GateGrads, GateShape, GateWeights};
use moe_kernels::ops::router::{self, AuxLossConfig, AuxLossWorkspace, RouterConfig, ScoreFunction};
use moe_kernels::{Device, DeviceBuffer, DeviceSlice, Result};

/// Logits in [-2, 2) without ties, from a fixed recurrence.
fn values(len: usize) -> Vec<f32> {
    (0..len)
        .map(|i| ((i * 7919 % 1009) as f32 / 1009.0 - 0.5) * 4.0)
        .collect()
}

fn router_ops(device: &Device, experts: usize, k: usize, tokens: usize) -> Result<()> {
    let config = RouterConfig {
        experts,
        k,
        score: ScoreFunction::Softmax,
        ..RouterConfig::default()
    };
    let logits = device.upload(&values(tokens * experts))?;
    let mut ids = device.alloc_zeros::<i32>(tokens * k)?;
    let mut weights = device.alloc_zeros::<f32>(tokens * k)?;
    let mut nonfinite = device.alloc_zeros::<u32>(1)?;
    router::select(
        device,
        &config,
        &logits,
        None::<&DeviceBuffer<f32>>,
        &mut ids,
        &mut weights,
        &mut nonfinite,
    )?;
    let mut dz = device.alloc_zeros::<f32>(tokens * experts)?;
    router::select_backward(device, &config, &logits, &ids, &weights, &mut dz)?;
    let mut workspace = device.alloc_zeros::<f32>(router::expert_statistics_workspace_len(&config, tokens)?)?;
    let mut counts = device.alloc_zeros::<i32>(experts)?;
    let mut sums = device.alloc_zeros::<f32>(experts)?;
    router::expert_statistics(device, &config, &ids, &weights, &mut workspace, &mut counts, &mut sums)?;
    let aux = AuxLossConfig::default();
    let mut aux_workspace = AuxLossWorkspace::new(device, &config, &aux, tokens)?;
    let mut loss = device.alloc_zeros::<f32>(1)?;
    router::aux_loss(device, &config, &aux, &logits, &ids, &mut aux_workspace, &mut loss)?;
    router::aux_loss_backward(device, &config, &aux, &logits, &aux_workspace, &mut dz)?;
    let mut z_workspace = router::ZLossWorkspace::new(device, tokens)?;
    router::z_loss(device, &config, 1e-3, &logits, &mut z_workspace, &mut loss)?;
    router::z_loss_backward(device, &config, 1e-3, &logits, &z_workspace, &mut dz)?;
    let mut bias = device.alloc_zeros::<f32>(experts)?;
    router::bias_update(device, 1e-3, &counts, &mut bias)
}

fn row_movers<T: FloatElement>(
    device: &Device,
    map: &RoutingMap<DeviceBuffer<i32>>,
    shape: (usize, usize, usize),
) -> Result<()> {
    let (tokens, k, d) = shape;
    let rows = map.sorted_rows.len();
    let x = device.upload(&values(tokens * d).into_iter().map(T::from_f32).collect::<Vec<T>>())?;
    let mut xp = device.alloc_zeros::<T>(rows * d)?;
    dispatch::permute(device, &x, &map.sorted_rows, &map.inverse, tokens, k, d, &mut xp)?;
    let weights = device.upload(&vec![0.5f32; tokens * k])?;
    let mut y = device.alloc_zeros::<T>(tokens * d)?;
    dispatch::combine(
        device,
        &xp,
        &map.inverse,
        Some(&weights),
        Some(&x),
        tokens,
        k,
        d,
        &mut y,
    )?;
    let mut dx = device.alloc_zeros::<T>(tokens * d)?;
    dispatch::permute_backward(device, &xp, &map.inverse, tokens, k, d, &mut dx)?;
    let mut dw = device.alloc_zeros::<f32>(tokens * k)?;
    let mut dxp = device.alloc_zeros::<T>(rows * d)?;
    dispatch::combine_backward(
        device,
        &y,
        Some(&xp),
        &map.sorted_rows,
        &map.inverse,
        Some(&weights),
        tokens,
        k,
        d,
        &mut dxp,
        Some(&mut dw),
    )
}

fn dispatch_ops(device: &Device, tokens: usize, capacity: Option<Capacity>) -> Result<()> {
    let (experts, k, d) = (16, 4, 64);
    let config = MapConfig {
        capacity,
        ..MapConfig::new(experts)
    };
    let ids: Vec<i32> = (0..tokens * k)
        .map(|s| ((s / k * 7 + s % k * 5) % experts) as i32)
        .collect();
    let ids = device.upload(&ids)?;
    let mut map = RoutingMap::alloc(device, tokens, k, &config)?;
    let mut workspace = device.alloc_zeros::<i32>(config.workspace_len(tokens, k)?)?;
    dispatch::routing_map(device, &ids, tokens, k, &config, &mut map, &mut workspace)?;
    row_movers::<f32>(device, &map, (tokens, k, d))?;
    row_movers::<f16>(device, &map, (tokens, k, d))?;
    row_movers::<bf16>(device, &map, (tokens, k, d))
}

fn upload<T: FloatElement>(device: &Device, len: usize) -> Result<DeviceBuffer<T>> {
    device.upload(
        &values(len)
            .into_iter()
            .map(|v| T::from_f32(v * 0.1))
            .collect::<Vec<T>>(),
    )
}

/// Forward and backward of `form` with X and weights in `T`; every optional term present.
fn gate_ops<T: FloatElement>(device: &Device, form: GateForm) -> Result<()> {
    let shape = GateShape {
        tokens: 70,
        dim: 24,
        experts: 20,
        rank: 4,
    };
    let (e, d, r) = (shape.experts, shape.dim, shape.rank);
    let (left, right, linear) = (
        upload::<T>(device, e * r * d)?,
        upload::<T>(device, e * r * d)?,
        upload::<T>(device, e * d)?,
    );
    let (query, full) = (upload::<T>(device, r * d)?, upload::<T>(device, e * d * d)?);
    let bias = upload::<f32>(device, e)?;
    let weights = match form {
        GateForm::Linear => GateWeights::Linear {
            w: t(&linear),
            b: Some(&bias),
        },
        GateForm::LowRank => GateWeights::LowRank {
            u: t(&left),
            v: t(&right),
            b: Some(t(&linear)),
            c: Some(&bias),
        },
        GateForm::Symmetric => GateWeights::Symmetric {
            u: t(&left),
            b: Some(t(&linear)),
            c: Some(&bias),
        },
        GateForm::Attention => GateWeights::Attention {
            wq: t(&query),
            k: t(&left),
        },
        GateForm::Full => GateWeights::Full {
            a: t(&full),
            b: Some(t(&linear)),
            c: Some(&bias),
        },
    };
    let x = upload::<T>(device, shape.x_len()?)?;
    let mut z = device.alloc_zeros::<f32>(shape.z_len()?)?;
    gate::scores(device, &shape, &weights, &x, &mut z)?;
    let mut dx = device.alloc_zeros::<T>(shape.x_len()?)?;
    let mut grads: Vec<DeviceBuffer<f32>> = weights
        .params(&shape)
        .iter()
        .map(|p| device.alloc_zeros(p.dims[..p.ndim].iter().product()))
        .collect::<Result<_>>()?;
    let grads = match (form, &mut grads[..]) {
        (GateForm::Linear, [w, b]) => GateGrads::Linear { w, b: Some(b) },
        (GateForm::LowRank, [u, v, b, c]) => GateGrads::LowRank {
            u,
            v,
            b: Some(b),
            c: Some(c),
        },
        (GateForm::Symmetric, [u, b, c]) => GateGrads::Symmetric {
            u,
            b: Some(b),
            c: Some(c),
        },
        (GateForm::Attention, [wq, k]) => GateGrads::Attention { wq, k },
        (GateForm::Full, [a, b, c]) => GateGrads::Full {
            a,
            b: Some(b),
            c: Some(c),
        },
        _ => unreachable!("GateWeights::params lists each present tensor of the form"),
    };
    let mut workspace = device.alloc_zeros::<f32>(gate::backward_workspace_len(form, &shape)?)?;
    gate::scores_backward(device, &shape, &weights, &x, &z, &mut dx, grads, &mut workspace)
}

/// A buffer as the trait object `GateWeights` holds.
fn t<T: FloatElement>(buffer: &DeviceBuffer<T>) -> &dyn DeviceSlice<T> {
    buffer
}

fn gate_all<T: FloatElement>(device: &Device) -> Result<()> {
    for form in GateForm::ALL {
        gate_ops::<T>(device, form)?;
    }
    Ok(())
}

/// A layer's forward and backward: the grouped GEMM's tile kernels (forward, dA, dB), the decode
/// kernel (4 tokens: at most 4 rows per expert), the shared expert, the losses; the VQ-MoE adds
/// the codebook search, quantize, VQ losses and the mixing gate; ESFT its statistics, selection
/// and the masked dB grid.
fn layer_ops<T: FloatElement>(device: &Device) -> Result<()> {
    let config = MoeConfig {
        router: RouterKind::Quadratic {
            form: GateForm::LowRank,
            rank: 4,
        },
        experts: 8,
        k: 2,
        dim: 64,
        hidden: 64,
        shared_experts: 1,
        aux_alpha: 0.01,
        z_loss: 0.001,
        max_tokens: 64,
        ..MoeConfig::default()
    };
    let rows = |tokens: usize| upload::<T>(device, tokens * config.dim);
    let mut tracker = EsftTracker::new(device, config.experts, config.k)?;
    let mut layer = MoeLayer::<T>::random(device, config, 1)?;
    for tokens in [64, 4] {
        let (x, dy, mut y, mut dx) = (rows(tokens)?, rows(tokens)?, rows(tokens)?, rows(tokens)?);
        layer.forward(&x, tokens, &mut y)?;
        tracker.accumulate(&layer)?;
        layer.set_expert_mask(Some(tracker.select(0.5, ScoreKind::Gate)?))?;
        layer.backward(&x, &dy, &mut dx)?;
    }
    let mut vq = VqMoe::<T>::random(device, config, 2)?;
    let (x, dy, mut y, mut dx) = (rows(64)?, rows(64)?, rows(64)?, rows(64)?);
    vq.forward(&x, 64, &mut y)?;
    vq.backward(&x, &dy, &mut dx)
}

/// Runs every op family once on `device`.
pub fn run_all(device: &Device) -> Result<()> {
    for experts in [8, 64, 128, 256, 512, 1024] {
        router_ops(device, experts, 4, 33)?;
    }
    dispatch_ops(device, 64, None)?;
    dispatch_ops(device, 2048, None)?;
    dispatch_ops(device, 2048, Some(Capacity::default()))?;
    gate_all::<f32>(device)?;
    gate_all::<f16>(device)?;
    gate_all::<bf16>(device)?;
    layer_ops::<f32>(device)?;
    layer_ops::<f16>(device)?;
    layer_ops::<bf16>(device)
}
