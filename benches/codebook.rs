//! Codebook nearest neighbour (VQ routing): the fused distance + top-1 search with f32 (FMA
//! tiles) and bf16 (tensor cores) inputs. States the floor (2·T·Nc·d flops; X, C, norms read
//! once, ids written once) and the bytes of every buffer the op is given, against the `[T, Nc]`
//! distance matrix it never allocates; benches the CPU reference and the emulator at a small
//! size; on a GPU, the layer shapes of `common::layer_shapes` with one code per expert
//! (VQ routing: Nc = E over the model dimension d).
mod common;

use common::inputs::uniform_values;
use common::{Floor, Gpu, devices, layer_shapes};
use criterion::{Criterion, criterion_group, criterion_main};
use half::bf16;
use moe_kernels::ops::FloatElement;
use moe_kernels::ops::codebook::{self, CodebookShape, NearestConfig, NearestOutputs};
use moe_kernels::reference::codebook as reference;
use moe_kernels::{Device, DeviceBuffer, DeviceKind};

const SMALL: CodebookShape = CodebookShape {
    tokens: 128,
    dim: 64,
    codes: 256,
};

/// X and C (`size` bytes per element) and the f32 norms read once, i32 ids written once;
/// 2 flops per multiply-add of every token with every code.
fn floor(shape: &CodebookShape, size: u64) -> Floor {
    let (t, d, nc) = (shape.tokens as u64, shape.dim as u64, shape.codes as u64);
    Floor {
        bytes: size * (t * d + nc * d) + 4 * nc + 4 * t,
        flops: 2 * t * nc * d,
    }
}

fn upload<T: FloatElement>(device: &Device, v: &[f64]) -> DeviceBuffer<T> {
    device
        .upload(&v.iter().map(|&v| T::from_f32(v as f32)).collect::<Vec<_>>())
        .expect("upload")
}

/// The buffers of one top-1 search on `device`, and the op as a closure to time.
struct Search<T: FloatElement> {
    shape: CodebookShape,
    config: NearestConfig,
    x: DeviceBuffer<T>,
    codes: DeviceBuffer<T>,
    norms: DeviceBuffer<f32>,
    ids: DeviceBuffer<i32>,
    workspace: DeviceBuffer<u32>,
}

impl<T: FloatElement> Search<T> {
    fn new(device: &Device, shape: CodebookShape) -> Self {
        let config = NearestConfig::default();
        let x = upload::<T>(device, &uniform_values(1, shape.x_len().unwrap(), 0.5));
        let codes = upload::<T>(device, &uniform_values(2, shape.codebook_len().unwrap(), 0.5));
        let mut norms = device.alloc_zeros(shape.codes).expect("alloc");
        codebook::code_norms(device, &shape, &codes, &mut norms).expect("norms");
        Self {
            shape,
            config,
            x,
            codes,
            norms,
            ids: device.alloc_zeros(shape.tokens).expect("alloc"),
            workspace: device
                .alloc_zeros(config.workspace_len(&shape).unwrap())
                .expect("alloc"),
        }
    }

    fn run(&mut self, device: &Device) {
        let out = NearestOutputs {
            ids: &mut self.ids,
            distances: None,
            experts: None,
            weights: None,
            nonfinite_rows: None,
        };
        codebook::nearest(
            device,
            &self.shape,
            &self.config,
            &self.x,
            &self.codes,
            &self.norms,
            out,
            &mut self.workspace,
        )
        .expect("nearest");
    }

    /// Bytes of every buffer beside the inputs X and C that the op is given (norms, ids, the
    /// split workspace): all it could hold intermediate results in. They stay below the
    /// `[T, Nc]` f32 distance matrix a two-pass implementation would write.
    fn scratch_bytes(&self) -> usize {
        4 * (self.norms.len() + self.ids.len() + self.workspace.len())
    }

    fn report_memory(&self) {
        let matrix = 4 * self.shape.tokens * self.shape.codes;
        let inputs = (self.x.len() + self.codes.len()) * size_of::<T>();
        println!(
            "codebook nearest {} {:?}: X + C {inputs} bytes; norms + ids + workspace {} bytes; a [T, Nc] f32 matrix would be {matrix} bytes",
            T::NAME,
            self.shape,
            self.scratch_bytes(),
        );
        assert!(self.scratch_bytes() < matrix, "a [T, Nc]-sized buffer crept in");
    }
}

fn bench(c: &mut Criterion) {
    let devices = devices();
    for size in [4, 2] {
        println!(
            "codebook nearest {SMALL:?}, {size}-byte X and C: {}",
            floor(&SMALL, size).describe()
        );
    }
    let (x, codes) = (
        uniform_values(1, SMALL.x_len().unwrap(), 0.5),
        uniform_values(2, SMALL.codebook_len().unwrap(), 0.5),
    );
    let mut group = c.benchmark_group(format!("codebook nearest {SMALL:?}"));
    group.sample_size(10);
    group.bench_function("reference top-1", |b| {
        b.iter(|| reference::nearest(&SMALL, &x, &codes, 1, 1))
    });
    for device in devices.iter().filter(|d| d.kind() == DeviceKind::Emulator) {
        let mut f32_search = Search::<f32>::new(device, SMALL);
        let mut bf16_search = Search::<bf16>::new(device, SMALL);
        f32_search.report_memory();
        bf16_search.report_memory();
        group.bench_function("Emulator top-1 f32", |b| b.iter(|| f32_search.run(device)));
        group.bench_function("Emulator top-1 bf16", |b| b.iter(|| bf16_search.run(device)));
    }
    group.finish();
    for device in devices.iter().filter(|d| d.kind() == DeviceKind::Cuda) {
        let Some(gpu) = Gpu::new(device) else { continue };
        // VQ routing: one code per expert, over the model dimension.
        for layer in layer_shapes(device) {
            let shape = CodebookShape {
                tokens: layer.tokens,
                dim: layer.d,
                codes: layer.experts,
            };
            let mut search = Search::<bf16>::new(device, shape);
            search.report_memory();
            gpu.report("codebook/nearest_bf16", &layer.label(), floor(&shape, 2), || {
                search.run(device)
            });
        }
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
