//! Grouped expert GEMM benches (bf16): GEMM1 with the SwiGLU epilogue (A gathered from token
//! order), GEMM2 with row weights, and the backward (dGU through the fused SwiGLU backward, dX,
//! dW1, dW2), each beside its floor. Decode shapes (T = 1, 16) take the decode path.
//!
//! Floors (rows = Σm = T·k, s = 2 bytes): flops `2·Σm·N·K`; bytes: A, B and C each moved once
//! (A gathered: X's T rows; SwiGLU: C is H plus the saved GU; row weights and index arrays
//! neglected). Backward: dgrad reads dC and B, writes dA (with SwiGLU: also reads GU, writes dGU);
//! wgrad reads dC and A, writes dB in f32.
//!
//! Without a GPU: the CPU reference and the emulator at a small size. On a GPU,
//! `report_gpu_fraction` times every layer shape (`common::layer_shapes`), and a dense cuBLAS
//! GEMM of the same total size (M = Σm, N, K) is timed in the same run: a `MOE_BENCH` record
//! gives our time as a ratio to it.
mod common;

use common::{Floor, devices, gpu_seconds, layer_shapes, peak_bandwidth, report_gpu_fraction};
use criterion::{Criterion, criterion_group, criterion_main};
use half::bf16;
use moe_kernels::benchmarks::Record;
use moe_kernels::ops::gemm::{self, ARows, DgradEpilogue, Epilogue, ExpertMask, ForwardConfig, GemmShape, Groups};
use moe_kernels::reference::gemm::{self as reference, HostGroups};
use moe_kernels::{Device, DeviceBuffer, DeviceKind};

/// T tokens routed to k of E experts; model dimension d, expert hidden size h.
#[derive(Clone, Copy)]
struct Size {
    tokens: usize,
    k: usize,
    experts: usize,
    d: usize,
    h: usize,
}

impl Size {
    fn rows(&self) -> usize {
        self.tokens * self.k
    }
    /// Router-like routing: k distinct experts per token, spread evenly; offsets and sorted_rows
    /// in dispatch's order (by expert, then slot).
    fn routing(&self) -> (Vec<i32>, Vec<i32>) {
        let mut by_expert = vec![vec![]; self.experts];
        for t in 0..self.tokens {
            for j in 0..self.k {
                by_expert[(t * 7 + j * 13) % self.experts].push((t * self.k + j) as i32);
            }
        }
        let mut offsets = vec![0];
        let mut sorted = vec![];
        for group in by_expert {
            sorted.extend(group);
            offsets.push(sorted.len() as i32);
        }
        (offsets, sorted)
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
    /// Experts that receive at least one row: only their weights need to be read (at decode,
    /// T·k of E).
    fn active_experts(&self) -> usize {
        let (offsets, _) = self.routing();
        offsets.windows(2).filter(|w| w[1] > w[0]).count()
    }
    /// A [a_rows, K] read, the B [N, K] of `weight_experts` experts read, `c_elems` written
    /// (s = 2 bytes), 2·rows·N·K flops.
    fn floor(&self, shape: GemmShape, a_rows: usize, c_elems: usize, weight_experts: usize) -> Floor {
        let (rows, n, k) = (self.rows() as u64, shape.n as u64, shape.k as u64);
        let weights = (weight_experts * shape.n * shape.k) as u64;
        Floor {
            bytes: 2 * (a_rows as u64 * k + weights + c_elems as u64),
            flops: 2 * rows * n * k,
        }
    }
}

fn host(v: &[f32]) -> Vec<bf16> {
    v.iter().map(|&x| bf16::from_f32(x)).collect()
}
fn pattern(len: usize, salt: usize) -> Vec<f32> {
    (0..len).map(|i| ((i * 31 + salt) % 97) as f32 / 97.0 - 0.5).collect()
}

/// The layer's groups. Each token picks an expert at most once, so no group exceeds T rows:
/// the forward takes the decode path at T <= 32.
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

/// One layer's buffers on one device.
struct Layer {
    size: Size,
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
    fn new(device: &Device, size: Size) -> Self {
        let Size {
            tokens,
            k,
            experts,
            d,
            h,
        } = size;
        let rows = size.rows();
        let (offsets, sorted) = size.routing();
        let up = |v: Vec<f32>| device.upload(&host(&v)).unwrap();
        Self {
            offsets: device.upload(&offsets).unwrap(),
            sorted: device.upload(&sorted).unwrap(),
            x: up(pattern(tokens * d, 1)),
            w1: up(pattern(experts * 2 * h * d, 2)),
            w2: up(pattern(experts * d * h, 3)),
            weights: device.upload(&vec![1.0 / k as f32; rows]).unwrap(),
            hid: device.alloc_zeros(rows * h).unwrap(),
            gu: device.alloc_zeros(rows * 2 * h).unwrap(),
            y: device.alloc_zeros(rows * d).unwrap(),
            dgu: device.alloc_zeros(rows * 2 * h).unwrap(),
            dxp: device.alloc_zeros(rows * d).unwrap(),
            dw1: device.alloc_zeros(experts * 2 * h * d).unwrap(),
            dw2: device.alloc_zeros(experts * d * h).unwrap(),
            size,
        }
    }
    fn gemm1(&mut self, device: &Device) {
        let config = ForwardConfig {
            a_rows: ARows::Gathered { top_k: self.size.k },
            epilogue: Epilogue::SwiGlu,
            ..ForwardConfig::default()
        };
        let groups = groups(&self.offsets, &self.sorted, self.size);
        let shape = self.size.gemm1();
        let none = None::<&DeviceBuffer<f32>>;
        gemm::forward(
            device,
            &self.x,
            &self.w1,
            shape,
            &groups,
            &config,
            none,
            &mut self.hid,
            Some(&mut self.gu),
        )
        .unwrap();
    }
    fn gemm2(&mut self, device: &Device) {
        let config = ForwardConfig::default();
        let groups = groups(&self.offsets, &self.sorted, self.size);
        let none = None::<&mut DeviceBuffer<bf16>>;
        let shape = self.size.gemm2();
        gemm::forward(
            device,
            &self.hid,
            &self.w2,
            shape,
            &groups,
            &config,
            Some(&self.weights),
            &mut self.y,
            none,
        )
        .unwrap();
    }
    fn dgrad2_swiglu(&mut self, device: &Device) {
        let groups = groups(&self.offsets, &self.sorted, self.size);
        let (shape, epilogue) = (self.size.gemm2(), DgradEpilogue::SwiGluBackward);
        gemm::dgrad(
            device,
            &self.y,
            &self.w2,
            shape,
            &groups,
            epilogue,
            Some(&self.weights),
            Some(&self.gu),
            &mut self.dgu,
        )
        .unwrap();
    }
    fn dgrad1(&mut self, device: &Device) {
        let groups = groups(&self.offsets, &self.sorted, self.size);
        let (none_w, none_gu) = (None::<&DeviceBuffer<f32>>, None::<&DeviceBuffer<bf16>>);
        let shape = self.size.gemm1();
        gemm::dgrad(
            device,
            &self.dgu,
            &self.w1,
            shape,
            &groups,
            DgradEpilogue::Store,
            none_w,
            none_gu,
            &mut self.dxp,
        )
        .unwrap();
    }
    fn wgrad1(&mut self, device: &Device) {
        let groups = groups(&self.offsets, &self.sorted, self.size);
        let a = ARows::Gathered { top_k: self.size.k };
        let shape = self.size.gemm1();
        gemm::wgrad(
            device,
            &self.dgu,
            &self.x,
            a,
            shape,
            &groups,
            None::<&ExpertMask>,
            false,
            &mut self.dw1,
        )
        .unwrap();
    }
    fn wgrad2(&mut self, device: &Device) {
        let groups = groups(&self.offsets, &self.sorted, self.size);
        let shape = self.size.gemm2();
        let a = ARows::Contiguous;
        gemm::wgrad(
            device,
            &self.y,
            &self.hid,
            a,
            shape,
            &groups,
            None::<&ExpertMask>,
            false,
            &mut self.dw2,
        )
        .unwrap();
    }
}

/// The floor of each op of a layer, by name.
fn floors(s: Size) -> [(&'static str, Floor); 6] {
    let (rows, d, h) = (s.rows(), s.d, s.h);
    let (g1, g2) = (s.gemm1(), s.gemm2());
    // Forward and dA read the weights of the experts that have rows; dB writes every expert's
    // f32 gradient (the `weights` term at 2 bytes plus 2 more).
    let active = s.active_experts();
    let mut dgrad2 = s.floor(g2, rows, rows * 2 * h, active);
    dgrad2.bytes += 2 * (rows * 2 * h) as u64; // GU read
    let mut wgrad1 = s.floor(g1, s.tokens, 0, g1.experts);
    wgrad1.bytes += 2 * (rows * 2 * h) as u64 + 2 * (g1.experts * g1.n * g1.k) as u64; // dGU read; dW f32
    let mut wgrad2 = s.floor(g2, rows, 0, g2.experts);
    wgrad2.bytes += 2 * (rows * d) as u64 + 2 * (g2.experts * g2.n * g2.k) as u64;
    [
        (
            "gemm/gemm1_swiglu_bf16",
            s.floor(g1, s.tokens, rows * h + rows * 2 * h, active),
        ),
        ("gemm/gemm2_weighted_bf16", s.floor(g2, rows, rows * d, active)),
        ("gemm/dgrad2_swiglu_bwd_bf16", dgrad2),
        ("gemm/dgrad1_bf16", s.floor(g1, rows, rows * d, active)),
        ("gemm/wgrad1_bf16", wgrad1),
        ("gemm/wgrad2_bf16", wgrad2),
    ]
}

fn run_op(layer: &mut Layer, device: &Device, op: usize) {
    match op {
        0 => layer.gemm1(device),
        1 => layer.gemm2(device),
        2 => layer.dgrad2_swiglu(device),
        3 => layer.dgrad1(device),
        4 => layer.wgrad1(device),
        _ => layer.wgrad2(device),
    }
}

/// On a GPU: a dense cuBLAS bf16 GEMM `[M, K] x [N, K]^T` (M = Σm) timed in the same run, and a
/// record of our time as a ratio to it.
fn compare_with_cublas(device: &Device, op: &str, label: &str, shape: GemmShape, rows: usize, floor: Floor, ours: f64) {
    use cudarc::cublas::{CudaBlas, Gemm, GemmConfig, sys::cublasOperation_t};
    let Device::Cuda(cuda) = device else { return };
    let stream = cuda.stream().clone();
    let Ok(blas) = CudaBlas::new(stream.clone()) else {
        println!("{op} {label}: cuBLAS could not be loaded, no comparison");
        return;
    };
    let (m, n, k) = (rows as i32, shape.n as i32, shape.k as i32);
    let a = stream.alloc_zeros::<bf16>(rows * shape.k).unwrap();
    let b = stream.alloc_zeros::<bf16>(shape.n * shape.k).unwrap();
    let mut c = stream.alloc_zeros::<bf16>(rows * shape.n).unwrap();
    // Row-major C [M, N] = A B^T is column-major C^T = B A^T: op(B) = T, op(A) = N.
    let config = GemmConfig {
        transa: cublasOperation_t::CUBLAS_OP_T,
        transb: cublasOperation_t::CUBLAS_OP_N,
        m: n,
        n: m,
        k,
        alpha: bf16::ONE,
        lda: k,
        ldb: k,
        beta: bf16::ZERO,
        ldc: n,
    };
    // SAFETY: a, b, c hold M·K, N·K and M·N elements, matching the dimensions and strides above.
    let dense = gpu_seconds(device, || unsafe { blas.gemm(config, &b, &a, &mut c).unwrap() });
    let record = Record {
        op: op.into(),
        shape: format!("{label},vs_cublas"),
        micros: ours * 1e6,
        floor_bytes: floor.bytes,
        floor_flops: floor.flops,
        bandwidth_fraction: peak_bandwidth(device).map_or(f64::NAN, |bw| floor.bytes as f64 / bw / ours),
        tensor_fraction: None,
        versus: Some(("cublas_dense_bf16".into(), ours / dense)),
    };
    println!(
        "{op} {label}: {:.2} us vs dense cuBLAS {:.2} us",
        ours * 1e6,
        dense * 1e6
    );
    println!("{}", record.to_line());
}

fn bench(c: &mut Criterion) {
    let small = Size {
        tokens: 64,
        k: 4,
        experts: 16,
        d: 256,
        h: 128,
    };
    for (op, floor) in floors(small) {
        eprintln!("{op} T=64 k=4 E=16 d=256 h=128: {}", floor.describe());
    }
    let mut group = c.benchmark_group("gemm");
    group.sample_size(10);
    let (offsets, sorted) = small.routing();
    let groups = HostGroups {
        offsets: &offsets,
        sorted_rows: Some(&sorted),
        rows: small.rows(),
    };
    let x = pattern(small.tokens * small.d, 1);
    let w1 = pattern(small.experts * 2 * small.h * small.d, 2);
    let gathered = ARows::Gathered { top_k: small.k };
    group.bench_function("gemm1_swiglu/reference", |b| {
        b.iter(|| reference::forward(&x, gathered, &w1, small.gemm1(), &groups, Epilogue::SwiGlu, None))
    });
    let dgu = pattern(small.rows() * 2 * small.h, 4);
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
            let mut layer = Layer::new(&device, small);
            for (i, (op, _)) in floors(small).iter().enumerate() {
                group.bench_function(format!("{}/emulator", &op[5..]), |b| {
                    b.iter(|| run_op(&mut layer, &device, i))
                });
            }
            let decode = Size { tokens: 4, ..small };
            let mut layer = Layer::new(&device, decode);
            group.bench_function("gemm1_swiglu_decode_T4/emulator", |b| b.iter(|| layer.gemm1(&device)));
        } else {
            for shape in layer_shapes(&device) {
                let size = Size {
                    tokens: shape.tokens,
                    k: shape.k,
                    experts: shape.experts,
                    d: shape.d,
                    h: shape.h,
                };
                let label = shape.label();
                let mut layer = Layer::new(&device, size);
                for (i, (op, floor)) in floors(size).into_iter().enumerate() {
                    let Some(ours) = report_gpu_fraction(op, &label, &device, floor, || run_op(&mut layer, &device, i))
                    else {
                        continue;
                    };
                    let dense = match i {
                        0 | 4 => size.gemm1(),
                        1 | 5 => size.gemm2(),
                        // dA = dC·B: M = Σm, N = K of the forward, reduction over the forward's N.
                        2 => GemmShape {
                            experts: 1,
                            n: size.h,
                            k: size.d,
                        },
                        _ => GemmShape {
                            experts: 1,
                            n: size.d,
                            k: 2 * size.h,
                        },
                    };
                    compare_with_cublas(&device, op, &label, dense, size.rows(), floor, ours);
                }
            }
        }
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
