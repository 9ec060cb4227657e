//! Floors: the least work of one call of an op, as any implementation must do it: every input
//! read once, every output written once, and only the weights and weight gradients of the
//! experts that get rows. Pure arithmetic, so `tests/bench_floors.rs` checks it on small cases.

/// The least work of one call: DRAM bytes, and tensor-core flops (0 for an op that is not
/// matrix work).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Floor {
    pub bytes: u64,
    pub flops: u64,
}

impl Floor {
    pub fn describe(&self) -> String {
        format!(
            "floor: {:.3} MB moved, {:.3} MFLOP",
            self.bytes as f64 / 1e6,
            self.flops as f64 / 1e6
        )
    }
}

/// Experts that receive at least one row, from dispatch's offsets (`E + 1` prefix sums).
pub fn active_experts(offsets: &[i32]) -> usize {
    offsets.windows(2).filter(|w| w[1] > w[0]).count()
}

/// The grouped GEMMs of one SwiGLU expert layer in bf16 (2 bytes per element): T tokens, each
/// routed to k experts (rows = T·k), model dimension d, expert hidden size h, and `active`
/// experts with rows. GEMM1 is `[rows, d] x [2h, d]^T` (A gathered from X's T rows), GEMM2
/// `[rows, h] x [d, h]^T`. Weight gradients are f32.
#[derive(Debug, Clone, Copy)]
pub struct ExpertGemms {
    pub tokens: u64,
    pub k: u64,
    pub d: u64,
    pub h: u64,
    pub active: u64,
}

const BF16: u64 = 2;
const F32: u64 = 4;

impl ExpertGemms {
    fn rows(&self) -> u64 {
        self.tokens * self.k
    }
    /// The active experts' W1 (`[2h, d]` each) or W2 (`[d, h]`) elements.
    fn w1(&self) -> u64 {
        self.active * 2 * self.h * self.d
    }
    fn w2(&self) -> u64 {
        self.active * self.d * self.h
    }
    /// GEMM1 + SwiGLU: X (T rows) and W1 read; H `[rows, h]` and the saved GU `[rows, 2h]`
    /// written.
    pub fn gemm1_swiglu(&self) -> Floor {
        let (t, rows, d, h) = (self.tokens, self.rows(), self.d, self.h);
        Floor {
            bytes: BF16 * (t * d + self.w1() + rows * h + rows * 2 * h),
            flops: 2 * rows * 2 * h * d,
        }
    }
    /// GEMM2 with row weights: H and W2 read, Yp `[rows, d]` written.
    pub fn gemm2_weighted(&self) -> Floor {
        let (rows, d, h) = (self.rows(), self.d, self.h);
        Floor {
            bytes: BF16 * (rows * h + self.w2() + rows * d),
            flops: 2 * rows * d * h,
        }
    }
    /// GEMM2's dgrad with the SwiGLU backward: dYp, W2 and GU read, dGU written.
    pub fn dgrad2_swiglu(&self) -> Floor {
        let (rows, d, h) = (self.rows(), self.d, self.h);
        Floor {
            bytes: BF16 * (rows * d + self.w2() + 2 * rows * 2 * h),
            flops: 2 * rows * d * h,
        }
    }
    /// GEMM1's dgrad: dGU and W1 read, dXp `[rows, d]` written.
    pub fn dgrad1(&self) -> Floor {
        let (rows, d, h) = (self.rows(), self.d, self.h);
        Floor {
            bytes: BF16 * (rows * 2 * h + self.w1() + rows * d),
            flops: 2 * rows * 2 * h * d,
        }
    }
    /// GEMM1's wgrad: dGU and X (T rows, gathered) read, the active experts' f32 dW1 written.
    pub fn wgrad1(&self) -> Floor {
        let (t, rows, d, h) = (self.tokens, self.rows(), self.d, self.h);
        Floor {
            bytes: BF16 * (rows * 2 * h + t * d) + F32 * self.w1(),
            flops: 2 * rows * 2 * h * d,
        }
    }
    /// GEMM2's wgrad: dYp and H read, the active experts' f32 dW2 written.
    pub fn wgrad2(&self) -> Floor {
        let (rows, d, h) = (self.rows(), self.d, self.h);
        Floor {
            bytes: BF16 * (rows * d + rows * h) + F32 * self.w2(),
            flops: 2 * rows * d * h,
        }
    }
}

/// A whole MoE layer in bf16 (linear gate `[E, d]`, SwiGLU experts), T tokens to k of E
/// experts, `active` of them with rows. Routing metadata and intermediates are not part of
/// the floor: an ideal layer keeps them on chip.
#[derive(Debug, Clone, Copy)]
pub struct MoeLayerFloor {
    pub tokens: u64,
    pub k: u64,
    pub experts: u64,
    pub d: u64,
    pub h: u64,
    pub active: u64,
}

impl MoeLayerFloor {
    /// X, the gate and the active experts' W1 and W2 read; Y written. Flops: the gate and
    /// the experts' GEMMs.
    pub fn forward(&self) -> Floor {
        let (t, k, e, d, h) = (self.tokens, self.k, self.experts, self.d, self.h);
        Floor {
            bytes: BF16 * (2 * t * d + e * d + self.active * 3 * h * d),
            flops: 2 * t * e * d + 2 * t * k * 3 * h * d,
        }
    }
    /// The forward, plus dY read, dX written, and the f32 gradients of the gate and of the
    /// active experts' weights written; the backward's flops are twice the forward's (dgrad
    /// and wgrad).
    pub fn forward_backward(&self) -> Floor {
        let forward = self.forward();
        let (t, e, d, h) = (self.tokens, self.experts, self.d, self.h);
        Floor {
            bytes: forward.bytes + BF16 * 2 * t * d + F32 * (e * d + self.active * 3 * h * d),
            flops: 3 * forward.flops,
        }
    }
}
