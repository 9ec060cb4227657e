//! Grouped expert GEMM benches (bf16): GEMM1 with the SwiGLU epilogue (A gathered from token
//! order), GEMM2 with row weights, and the backward (dGU through the fused SwiGLU backward, dX,
//! dW1, dW2), each beside its floor (`common::floors::ExpertGemms`: only the experts that get
//! rows count, for weights and weight gradients). Decode shapes (T <= 32) take the decode path.
//!
//! Without a GPU: the CPU reference and the emulator at a small size. On a GPU, every layer
//! shape (`common::layer_shapes`) on random inputs and a random top-k routing, with two peers
//! timed in the same run on the same shapes:
//! - `cublas_loop`: one cuBLAS GEMM per expert with rows, what a user without this crate
//!   writes. It gets its A rows already permuted, no SwiGLU or row weights, and writes bf16
//!   weight gradients (half our f32 bytes): every advantage is the peer's.
//! - `cublas_dense` (prefill, T > 64, only): one cuBLAS GEMM of equal flops over all rows
//!   against one weight matrix. At decode it would read one matrix where the grouped op reads
//!   one per active expert, so it is left out there.
mod common;

use common::blas::Op;
use common::floors::{ExpertGemms, active_experts};
use common::gpu::{cuda, cuda_mut};
use common::inputs::{grouped, random, random_bf16, routing_ids};
use common::{Floor, Gpu, LayerShape, devices, layer_shapes};
use criterion::{Criterion, criterion_group, criterion_main};
use cudarc::driver::CudaView;
use half::bf16;
use moe_kernels::ops::gemm::{
    self, ARows, DgradConfig, DgradEpilogue, Epilogue, ExpertMask, ForwardConfig, GemmPath, GemmShape, Groups,
    WgradWrite,
};
use moe_kernels::reference::gemm::{self as reference, HostGroups};
use moe_kernels::{Device, DeviceBuffer, DeviceKind};

/// T tokens routed to k of E experts; model dimension d, expert hidden size h.
type Size = LayerShape;

impl LayerShape {
    fn rows(&self) -> usize {
        self.tokens * self.k
    }
    fn gemm1(&self) -> GemmShape {
        GemmShape {
            experts: self.experts,
            n: 2 * self.h,
            k: self.d,
        }
    }
    fn gemm2(&self) -> GemmShape {
        GemmShape {
            experts: self.experts,
            n: self.d,
            k: self.h,
        }
    }
    fn floors(&self, offsets: &[i32]) -> ExpertGemms {
        ExpertGemms {
            tokens: self.tokens as u64,
            k: self.k as u64,
            d: self.d as u64,
            h: self.h as u64,
            active: active_experts(offsets) as u64,
        }
    }
}

/// The ops, in the order they run (each reads what the previous ones wrote).
const OPS: [&str; 6] = [
    "gemm/gemm1_swiglu_bf16",
    "gemm/gemm2_weighted_bf16",
    "gemm/dgrad2_swiglu_bwd_bf16",
    "gemm/dgrad1_bf16",
    "gemm/wgrad1_bf16",
    "gemm/wgrad2_bf16",
];

fn floor(f: &ExpertGemms, op: usize) -> Floor {
    match op {
        0 => f.gemm1_swiglu(),
        1 => f.gemm2_weighted(),
        2 => f.dgrad2_swiglu(),
        3 => f.dgrad1(),
        4 => f.wgrad1(),
        _ => f.wgrad2(),
    }
}

/// The layer's groups. Each token picks an expert at most once, so no group exceeds T rows.
fn groups<'a>(
    offsets: &'a DeviceBuffer<i32>,
    sorted: &'a DeviceBuffer<i32>,
    size: Size,
) -> Groups<'a, DeviceBuffer<i32>> {
    Groups {
        offsets,
        sorted_rows: Some(sorted),
        rows: size.rows(),
        max_group_rows: size.tokens,
    }
}

/// One layer's buffers on one device, every one random (inputs and outputs alike).
struct Layer {
    size: Size,
    offsets_host: Vec<i32>,
    offsets: DeviceBuffer<i32>,
    sorted: DeviceBuffer<i32>,
    x: DeviceBuffer<bf16>,
    w1: DeviceBuffer<bf16>,
    w2: DeviceBuffer<bf16>,
    weights: DeviceBuffer<f32>,
    hid: DeviceBuffer<bf16>,
    gu: DeviceBuffer<bf16>,
    y: DeviceBuffer<bf16>,
    dgu: DeviceBuffer<bf16>,
    dxp: DeviceBuffer<bf16>,
    dw1: DeviceBuffer<f32>,
    dw2: DeviceBuffer<f32>,
}

impl Layer {
    fn new(device: &Device, size: Size, seed: u64) -> Self {
        let Size { tokens, d, h, .. } = size;
        let rows = size.rows();
        let (offsets, sorted) = grouped(&routing_ids(tokens, size.k, size.experts, seed), size.experts);
        let bf = |len: usize, salt: u64, fan_in: usize| {
            random_bf16(device, len, seed ^ salt, (fan_in as f32).sqrt().recip())
        };
        Self {
            offsets: device.upload(&offsets).unwrap(),
            sorted: device.upload(&sorted).unwrap(),
            offsets_host: offsets,
            x: bf(tokens * d, 1, 1),
            w1: bf(size.experts * 2 * h * d, 2, d),
            w2: bf(size.experts * d * h, 3, h),
            weights: random(device, rows, seed ^ 4, 1.0),
            hid: bf(rows * h, 5, 1),
            gu: bf(rows * 2 * h, 6, 1),
            y: bf(rows * d, 7, 1),
            dgu: bf(rows * 2 * h, 8, 1),
            dxp: bf(rows * d, 9, 1),
            dw1: random(device, size.experts * 2 * h * d, seed ^ 10, 1.0),
            dw2: random(device, size.experts * d * h, seed ^ 11, 1.0),
            size,
        }
    }

    /// Op `op` on `path` (`Auto`, or `Hopper` for the sm_90a kernels).
    fn run(&mut self, device: &Device, op: usize, path: GemmPath) {
        let size = self.size;
        let groups = groups(&self.offsets, &self.sorted, size);
        let (g1, g2) = (size.gemm1(), size.gemm2());
        let gathered = ARows::Gathered { top_k: size.k };
        let (no_weights, no_gu) = (None::<&DeviceBuffer<f32>>, None::<&DeviceBuffer<bf16>>);
        let no_mask = None::<&ExpertMask>;
        match op {
            0 => {
                let config = ForwardConfig {
                    a_rows: gathered,
                    epilogue: Epilogue::SwiGlu,
                    path,
                };
                let out = (&mut self.hid, Some(&mut self.gu));
                gemm::forward(
                    device, &self.x, &self.w1, g1, &groups, &config, no_weights, out.0, out.1,
                )
            }
            1 => {
                let none = None::<&mut DeviceBuffer<bf16>>;
                let config = ForwardConfig {
                    path,
                    ..ForwardConfig::default()
                };
                gemm::forward(
                    device,
                    &self.hid,
                    &self.w2,
                    g2,
                    &groups,
                    &config,
                    Some(&self.weights),
                    &mut self.y,
                    none,
                )
            }
            2 => {
                let epilogue = DgradConfig {
                    epilogue: DgradEpilogue::SwiGluBackward,
                    path,
                };
                let (weights, gu) = (Some(&self.weights), Some(&self.gu));
                gemm::dgrad(
                    device,
                    &self.y,
                    &self.w2,
                    g2,
                    &groups,
                    epilogue,
                    weights,
                    gu,
                    &mut self.dgu,
                )
            }
            3 => gemm::dgrad(
                device,
                &self.dgu,
                &self.w1,
                g1,
                &groups,
                DgradConfig {
                    epilogue: DgradEpilogue::Store,
                    path,
                },
                no_weights,
                no_gu,
                &mut self.dxp,
            ),
            4 => gemm::wgrad_on_path(
                device,
                &self.dgu,
                &self.x,
                gathered,
                g1,
                &groups,
                no_mask,
                WgradWrite::Replace,
                &mut self.dw1,
                path,
            ),
            _ => gemm::wgrad_on_path(
                device,
                &self.y,
                &self.hid,
                ARows::Contiguous,
                g2,
                &groups,
                no_mask,
                WgradWrite::Replace,
                &mut self.dw2,
                path,
            ),
        }
        .unwrap()
    }
}

/// The peers' buffers: A rows already permuted, and bf16 outputs of the largest op.
struct PeerBuffers {
    xp: DeviceBuffer<bf16>,
    c: DeviceBuffer<bf16>,
    dw: DeviceBuffer<bf16>,
}

impl PeerBuffers {
    fn new(device: &Device, size: Size, seed: u64) -> Self {
        let (rows, d, h) = (size.rows(), size.d, size.h);
        Self {
            xp: random_bf16(device, rows * d, seed ^ 12, 1.0),
            c: random_bf16(device, rows * d.max(2 * h), seed ^ 13, 1.0),
            dw: random_bf16(device, size.experts * 2 * h * d, seed ^ 14, 1.0),
        }
    }
}

/// One cuBLAS GEMM of `op` over rows `first..first + m`, against expert `e`'s weights.
fn peer_gemm(gpu: &Gpu, layer: &Layer, peer: &mut PeerBuffers, op: usize, (first, m, e): (usize, usize, usize)) {
    let (d, h) = (layer.size.d, layer.size.h);
    let (w1, w2) = (cuda(&layer.w1), cuda(&layer.w2));
    let w1_e = w1.slice(e * 2 * h * d..(e + 1) * 2 * h * d);
    let w2_e = w2.slice(e * d * h..(e + 1) * d * h);
    fn rows_of(b: &DeviceBuffer<bf16>, first: usize, m: usize, width: usize) -> CudaView<'_, bf16> {
        cuda(b).slice(first * width..(first + m) * width)
    }
    let rows = |b, width| rows_of(b, first, m, width);
    // Each group's output rows at the group's own offset, as the grouped op writes them.
    let out_width = [2 * h, d, h, d].get(op).copied().unwrap_or(0);
    let c = &mut cuda_mut(&mut peer.c).slice_mut(first * out_width..(first + m) * out_width);
    let dw = cuda_mut(&mut peer.dw);
    let blas = &gpu.blas;
    match op {
        // Hp[m, 2h] = Xp[m, d] · W1ᵀ; Y[m, d] = H[m, h] · W2ᵀ
        0 => blas.gemm_bf16((Op::N, Op::T), (m, 2 * h, d), &rows(&peer.xp, d), d, &w1_e, d, c, 2 * h),
        1 => blas.gemm_bf16((Op::N, Op::T), (m, d, h), &rows(&layer.hid, h), h, &w2_e, h, c, d),
        // dH[m, h] = dY[m, d] · W2; dXp[m, d] = dGU[m, 2h] · W1
        2 => blas.gemm_bf16((Op::N, Op::N), (m, h, d), &rows(&layer.y, d), d, &w2_e, h, c, h),
        3 => blas.gemm_bf16(
            (Op::N, Op::N),
            (m, d, 2 * h),
            &rows(&layer.dgu, 2 * h),
            2 * h,
            &w1_e,
            d,
            c,
            d,
        ),
        // dW1[2h, d] = dGUᵀ · Xp; dW2[d, h] = dYᵀ · H, each expert into its own slot
        4 => {
            let mut out = dw.slice_mut(e * 2 * h * d..(e + 1) * 2 * h * d);
            blas.gemm_bf16(
                (Op::T, Op::N),
                (2 * h, d, m),
                &rows(&layer.dgu, 2 * h),
                2 * h,
                &rows(&peer.xp, d),
                d,
                &mut out,
                d,
            )
        }
        _ => {
            let mut out = dw.slice_mut(e * d * h..(e + 1) * d * h);
            blas.gemm_bf16(
                (Op::T, Op::N),
                (d, h, m),
                &rows(&layer.y, d),
                d,
                &rows(&layer.hid, h),
                h,
                &mut out,
                h,
            )
        }
    }
}

fn bench_gpu(gpu: &Gpu) {
    let device = gpu.device.clone();
    for shape in layer_shapes(&device) {
        let size = shape;
        let label = shape.label();
        let mut layer = Layer::new(&device, size, 0x6e6d ^ shape.tokens as u64);
        let mut peer = PeerBuffers::new(&device, size, 0x7065);
        let floors = size.floors(&layer.offsets_host);
        let groups: Vec<(usize, usize, usize)> = layer
            .offsets_host
            .windows(2)
            .enumerate()
            .filter(|(_, w)| w[1] > w[0])
            .map(|(e, w)| (w[0] as usize, (w[1] - w[0]) as usize, e))
            .collect();
        for (op, name) in OPS.iter().enumerate() {
            let floor = floor(&floors, op);
            gpu.report(name, &label, floor, || layer.run(&device, op, GemmPath::Auto));
            if device.runs_sm90a() {
                // The sm_90a kernels, which Auto does not pick until they are validated here.
                gpu.record(name, &label, "moe-kernels sm90a", floor, || {
                    layer.run(&device, op, GemmPath::Hopper)
                });
            }
            let time_peer = |implementation: &str, calls: &[(usize, usize, usize)], peer: &mut PeerBuffers| {
                gpu.record(name, &label, implementation, floor, || {
                    for &call in calls {
                        peer_gemm(gpu, &layer, peer, op, call)
                    }
                });
            };
            time_peer("cublas_loop", &groups, &mut peer);
            if size.tokens > 64 {
                time_peer("cublas_dense", &[(0, size.rows(), 0)], &mut peer);
            }
        }
    }
}

fn bench(c: &mut Criterion) {
    let small = Size {
        name: "small",
        tokens: 64,
        k: 4,
        experts: 16,
        d: 256,
        h: 128,
        groups: None,
    };
    let mut group = c.benchmark_group("gemm");
    group.sample_size(10);
    let (offsets, sorted) = grouped(&routing_ids(small.tokens, small.k, small.experts, 1), small.experts);
    let floors = small.floors(&offsets);
    for (op, name) in OPS.iter().enumerate() {
        eprintln!("{name} T=64 k=4 E=16 d=256 h=128: {}", floor(&floors, op).describe());
    }
    let groups = HostGroups {
        offsets: &offsets,
        sorted_rows: Some(&sorted),
        rows: small.rows(),
    };
    let mut rng = common::inputs::Rng::new(2);
    let x = rng.fill(small.tokens * small.d, 1.0);
    let w1 = rng.fill(small.experts * 2 * small.h * small.d, 0.1);
    let gathered = ARows::Gathered { top_k: small.k };
    group.bench_function("gemm1_swiglu/reference", |b| {
        b.iter(|| reference::forward(&x, gathered, &w1, small.gemm1(), &groups, Epilogue::SwiGlu, None))
    });
    let dgu = rng.fill(small.rows() * 2 * small.h, 1.0);
    group.bench_function("wgrad1/reference", |b| {
        b.iter(|| {
            reference::wgrad(
                &dgu,
                &x,
                gathered,
                small.gemm1(),
                &groups,
                None,
                false,
                &vec![0.0; w1.len()],
            )
        })
    });
    for device in devices() {
        if device.kind() == DeviceKind::Emulator {
            let mut layer = Layer::new(&device, small, 1);
            for (op, name) in OPS.iter().enumerate() {
                group.bench_function(format!("{}/emulator", &name[5..]), |b| {
                    b.iter(|| layer.run(&device, op, GemmPath::Auto))
                });
            }
            let mut layer = Layer::new(&device, Size { tokens: 4, ..small }, 1);
            group.bench_function("gemm1_swiglu_decode_T4/emulator", |b| {
                b.iter(|| layer.run(&device, 0, GemmPath::Auto))
            });
        } else if let Some(gpu) = Gpu::new(&device) {
            bench_gpu(&gpu);
        }
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
