//! Codebook nearest neighbour for VQ routing (math §6), `kernels/codebook.cu`.
//!
//! X `[T, d]` and the codebook C `[Nc, d]` share one dtype (f32, f16, bf16); everything is
//! computed in f32. The ops, in the order a VQ layer calls them:
//!
//! | op | computes | launches |
//! |---|---|---|
//! | [`code_norms`] | `‖c_j‖²` `[Nc]` f32, once per codebook | 1 |
//! | [`nearest`] | the k ≤ 8 nearest codes `[T, k]`, optionally distances and experts | 1, or 2 when Nc is split |
//! | [`quantize`] | `q = C[id]`, `x̃ = x + c·(q − x)` | 1 |
//! | [`losses`] | codebook and commitment losses `[2]` f32 | 2 |
//! | [`code_order`] | tokens sorted by code (stable) + per-code offsets | 3 to 7 ([`CodeOrder::launches`]) |
//! | [`losses_backward`] | `dx`, `dC` | 2 |
//! | [`ema_update`] | EMA counts, sums, new codebook, dead codes | 2 |
//!
//! **Nearest code.** `j* = argmin_j ‖x − c_j‖² = argmin_j (‖c_j‖² − 2 x·c_j)`: one fused kernel
//! per 64-token block computes 64×128 score tiles (f16/bf16 on tensor cores, `mma.sync`
//! m16n8k16 with f32 accumulation; f32 on FMA tiles), adds `‖c_j‖²` in the epilogue and folds
//! each tile into per-row running top-k lists. The `[T, Nc]` score matrix is never written to
//! memory. When T is small, the codes are split across `splits` blocks per token block (more
//! parallelism), each writes its top-k list to a host-sized workspace and a second tiny kernel
//! merges the lists in split order. Ties go to the lower code index; a NaN score never beats a
//! number, so a row with NaN (e.g. x holding NaN) gets codes `0..k` with distance NaN. The
//! result is bitwise the same for every split.
//!
//! f32 takes any d (rows whose starts are 16-byte aligned are read with 16-byte loads, others
//! element by element). f16/bf16 [`nearest`] streams rows into the tensor-core tile with 16-byte
//! `cp.async` copies (`kernels/include/mma_tile.cuh`): it needs d % 8 == 0 and 16-byte aligned
//! X and C, and refuses other inputs with an error naming `shape.dim`, `x` or `codes`. The
//! other ops take any d in every dtype.
//!
//! **Alignment.** Apart from X and C of 16-bit [`nearest`], every buffer may be a view at any
//! element (norms, ids, distances, experts, workspaces, q, x̃, dx, dC, the EMA state, and X and
//! C of the other ops): each kernel reads and writes 16-byte runs only where all the rows it
//! touches start 16-byte aligned, and element by element otherwise.
//!
//! **Ids from the device.** Ops that take ids cannot reject an id outside `[0, Nc)` without a
//! host sync: [`quantize`], [`losses`] and [`losses_backward`] read such a token's code as a
//! zero row, and [`code_order`] leaves it out of every segment (no dC or EMA contribution).
//! No kernel indexes memory with it.
mod nearest;
mod train;

pub use nearest::{NearestConfig, NearestOutputs, code_norms, nearest};
pub use train::{
    CodeOrder, EmaConfig, EmaState, LossConfig, code_order, ema_update, losses, losses_backward, losses_workspace_len,
    quantize,
};

use super::{check_range, elements};
use crate::Result;

/// The largest d.
pub const MAX_DIM: usize = 1 << 16;
/// The largest codebook (the token sort by code runs two 8-bit-and-rest radix passes of
/// dispatch's counting sort, whose bucket limit is 1024: 256 · 1024 codes).
pub const MAX_CODES: usize = 1 << 18;
/// The largest k of [`nearest`].
pub const MAX_K: usize = 8;

/// Threads per block of every codebook kernel but the merge (`CB_THREADS`).
const THREADS: u32 = 256;

/// The sizes of one codebook call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CodebookShape {
    /// T: rows of X.
    pub tokens: usize,
    /// d: the width of X and of the codes.
    pub dim: usize,
    /// Nc: codes in the codebook.
    pub codes: usize,
}

impl Default for CodebookShape {
    fn default() -> Self {
        Self {
            tokens: 0,
            dim: 1,
            codes: 1,
        }
    }
}

impl CodebookShape {
    /// `dim` in `1..=MAX_DIM`, `codes` in `1..=MAX_CODES`, `tokens` below 2^31 and `[T, d]`,
    /// `[Nc, d]` element counts that fit in memory.
    pub fn validate(&self) -> Result<()> {
        check_range("shape.dim", self.dim, 1..=MAX_DIM)?;
        check_range("shape.codes", self.codes, 1..=MAX_CODES)?;
        check_range("shape.tokens", self.tokens, 0..=i32::MAX as usize - 1)?;
        elements("shape.tokens", self.tokens, self.dim)?;
        elements("shape.codes", self.codes, self.dim)?;
        Ok(())
    }

    /// Elements of X, x̃, q, dx (`[T, d]`); `Err` when the count overflows `usize`.
    pub fn x_len(&self) -> Result<usize> {
        elements("shape.tokens", self.tokens, self.dim)
    }

    /// Elements of the codebook and its gradient and EMA sums (`[Nc, d]`); `Err` when the count
    /// overflows `usize`.
    pub fn codebook_len(&self) -> Result<usize> {
        elements("shape.codes", self.codes, self.dim)
    }
}
