//! The grouped expert GEMM (math §5) on every device against the CPU reference: forward with
//! every epilogue (contiguous and gathered A, -1 padding rows, row weights, f32 output), the
//! decode and tiled paths (the decode kernels' split-K and 1–32-row groups in `gemm/decode.rs`), group sizes 0, 1, 7, 16, 129, long reductions, dA (plain and the
//! fused SwiGLU backward), dB with the expert mask and accumulate mode, finite differences,
//! bad inputs, launch counts, no host syncs and bitwise determinism.
#[path = "gemm/backward.rs"]
mod backward;
#[path = "gemm/bad_inputs.rs"]
mod bad_inputs;
mod common;
#[path = "gemm/decode.rs"]
mod decode;
#[path = "gemm/forward.rs"]
mod forward;
#[path = "gemm/unaligned.rs"]
mod unaligned;

use common::{Rng, Tolerance};
use moe_kernels::ops::FloatElement;
use moe_kernels::ops::gemm::{ARows, GemmShape, Groups};
use moe_kernels::reference::gemm::HostGroups;
use moe_kernels::{Device, DeviceBuffer};

/// One grouped problem: the routing map on the host (offsets, sorted_rows) and the sizes.
#[derive(Debug, Clone)]
pub struct Problem {
    pub shape: GemmShape,
    pub offsets: Vec<i32>,
    /// The source slot of every row (-1 padding); slots index `[tokens · top_k]`.
    pub sorted_rows: Vec<i32>,
    pub tokens: usize,
    pub top_k: usize,
    /// The host-known bound on any group's rows.
    pub max_group_rows: usize,
}

impl Problem {
    /// Groups of exactly `sizes[e]` rows; one slot per row (top_k 1, tokens = rows) in a
    /// shuffled order, so gathering and row weights have something to look up.
    pub fn sized(sizes: &[usize], n: usize, k: usize, rng: &mut Rng) -> Problem {
        let rows: usize = sizes.iter().sum();
        let mut offsets = vec![0i32];
        for &s in sizes {
            offsets.push(offsets.last().unwrap() + s as i32);
        }
        let mut sorted_rows: Vec<i32> = (0..rows as i32).collect();
        for i in (1..rows).rev() {
            sorted_rows.swap(i, rng.below(i + 1));
        }
        Problem {
            shape: GemmShape {
                experts: sizes.len(),
                n,
                k,
            },
            offsets,
            sorted_rows,
            tokens: rows,
            top_k: 1,
            max_group_rows: sizes.iter().copied().max().unwrap_or(0),
        }
    }

    /// A router's output: each token picks `top_k` distinct experts; rows grouped by expert then
    /// slot (dispatch's order), each group padded with -1 rows up to a multiple of `align`.
    pub fn routed(
        tokens: usize,
        top_k: usize,
        experts: usize,
        align: usize,
        n: usize,
        k: usize,
        rng: &mut Rng,
    ) -> Problem {
        let mut by_expert = vec![vec![]; experts];
        for t in 0..tokens {
            let mut chosen = vec![];
            while chosen.len() < top_k {
                let e = rng.below(experts);
                if !chosen.contains(&e) {
                    chosen.push(e);
                }
            }
            for (j, &e) in chosen.iter().enumerate() {
                by_expert[e].push((t * top_k + j) as i32);
            }
        }
        let mut offsets = vec![0i32];
        let mut sorted_rows = vec![];
        for group in &by_expert {
            sorted_rows.extend(group);
            while sorted_rows.len() % align != 0 {
                sorted_rows.push(-1);
            }
            offsets.push(sorted_rows.len() as i32);
        }
        Problem {
            shape: GemmShape { experts, n, k },
            offsets,
            sorted_rows,
            tokens,
            top_k,
            max_group_rows: tokens.div_ceil(align) * align,
        }
    }

    pub fn rows(&self) -> usize {
        self.sorted_rows.len()
    }

    pub fn host(&self) -> HostGroups<'_> {
        HostGroups {
            offsets: &self.offsets,
            sorted_rows: Some(&self.sorted_rows),
            rows: self.rows(),
        }
    }

    /// Rows of A: the grouped rows, or the tokens when gathered.
    pub fn a_rows(&self, mode: ARows) -> usize {
        match mode {
            ARows::Contiguous => self.rows(),
            ARows::Gathered { .. } => self.tokens,
        }
    }

    pub fn gathered(&self) -> ARows {
        ARows::Gathered { top_k: self.top_k }
    }
}

/// The problem's routing map on a device.
pub struct DeviceGroups {
    pub offsets: DeviceBuffer<i32>,
    pub sorted_rows: DeviceBuffer<i32>,
}

impl DeviceGroups {
    pub fn new(device: &Device, p: &Problem) -> DeviceGroups {
        DeviceGroups {
            offsets: device.upload(&p.offsets).unwrap(),
            sorted_rows: device.upload(&p.sorted_rows).unwrap(),
        }
    }

    pub fn groups<'a>(&'a self, p: &Problem) -> Groups<'a, DeviceBuffer<i32>> {
        Groups {
            offsets: &self.offsets,
            sorted_rows: Some(&self.sorted_rows),
            rows: p.rows(),
            max_group_rows: p.max_group_rows,
        }
    }
}

/// `len` normal values scaled by `scale`, as stored in T, and their exact f32 values.
pub fn values<T: FloatElement>(rng: &mut Rng, len: usize, scale: f32) -> (Vec<T>, Vec<f32>) {
    let stored: Vec<T> = rng.normals(len, scale).into_iter().map(T::from_f32).collect();
    let exact = stored.iter().map(|v| v.to_f32()).collect();
    (stored, exact)
}

pub fn to_f32<T: FloatElement>(v: &[T]) -> Vec<f32> {
    v.iter().map(|x| x.to_f32()).collect()
}

/// The tolerance of a result stored as `O` over a reduction of `k` terms: products of stored
/// 16-bit inputs are exact in f32, so the error is f32 accumulation plus rounding to `O`.
pub fn tolerance<O: FloatElement>(k: usize) -> Tolerance {
    Tolerance::of::<O>().over(k)
}
