//! Random inputs for the benches (never zeros: tensor cores run faster on zeros than on
//! random data, and zeros hide unwritten outputs).
use half::bf16;
use moe_kernels::ops::FloatElement;
use moe_kernels::{Device, DeviceBuffer};

/// The tests' seeded generator (`tests/common`), with what the benches draw from it.
pub struct Rng(super::tests_common::Rng);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(super::tests_common::Rng::new(seed))
    }
    /// Uniform in `[-scale, scale)`.
    pub fn uniform(&mut self, scale: f32) -> f32 {
        self.0.uniform(-scale, scale)
    }
    pub fn below(&mut self, n: usize) -> usize {
        self.0.below(n)
    }
    pub fn fill(&mut self, len: usize, scale: f32) -> Vec<f32> {
        (0..len).map(|_| self.uniform(scale)).collect()
    }
}

/// `len` host values uniform in `[-scale, scale)` from `seed` (parameters the references read).
pub fn uniform_values(seed: u64, len: usize, scale: f32) -> Vec<f64> {
    Rng::new(seed).fill(len, scale).into_iter().map(f64::from).collect()
}

/// Elements generated on the host per random block; larger buffers repeat the block on the
/// device (the values stay random bits for the tensor cores, and the host does not spend the
/// lease generating tens of gigabytes).
const BLOCK: usize = 1 << 22;

/// `len` values uniform in `[-scale, scale)` from `seed`, as `T`, on `device`.
pub fn random<T: FloatElement>(device: &Device, len: usize, seed: u64, scale: f32) -> DeviceBuffer<T> {
    let host: Vec<T> = Rng::new(seed)
        .fill(len.min(BLOCK), scale)
        .into_iter()
        .map(T::from_f32)
        .collect();
    if len <= BLOCK {
        return device.upload(&host).expect("upload random input");
    }
    let Device::Cuda(cuda) = device else {
        let tiled: Vec<T> = host.iter().copied().cycle().take(len).collect();
        return device.upload(&tiled).expect("upload random input");
    };
    let stream = cuda.stream();
    let block = stream.clone_htod(&host).expect("upload random block");
    let mut out = stream.alloc_zeros::<T>(len).expect("alloc random input");
    let mut start = 0;
    while start < len {
        let n = BLOCK.min(len - start);
        let mut dst = out.slice_mut(start..start + n);
        stream
            .memcpy_dtod(&block.slice(0..n), &mut dst)
            .expect("tile random block");
        start += n;
    }
    DeviceBuffer::Cuda(out)
}

pub fn random_bf16(device: &Device, len: usize, seed: u64, scale: f32) -> DeviceBuffer<bf16> {
    random(device, len, seed, scale)
}

/// Router-like expert ids `[T, k]`: each token picks k distinct experts uniformly at random.
pub fn routing_ids(tokens: usize, k: usize, experts: usize, seed: u64) -> Vec<i32> {
    let mut rng = Rng::new(seed);
    let mut ids = Vec::with_capacity(tokens * k);
    for _ in 0..tokens {
        let row = ids.len();
        while ids.len() < row + k {
            let e = rng.below(experts) as i32;
            if !ids[row..].contains(&e) {
                ids.push(e);
            }
        }
    }
    ids
}

/// Dispatch's order of `ids`: per-expert offsets (`E + 1`) and the slots (`t·k + j`) sorted by
/// expert, then slot.
pub fn grouped(ids: &[i32], experts: usize) -> (Vec<i32>, Vec<i32>) {
    let mut by_expert = vec![vec![]; experts];
    for (slot, &e) in ids.iter().enumerate() {
        by_expert[e as usize].push(slot as i32);
    }
    let mut offsets = vec![0];
    let mut sorted = Vec::with_capacity(ids.len());
    for group in by_expert {
        sorted.extend(group);
        offsets.push(sorted.len() as i32);
    }
    (offsets, sorted)
}
