//! cuBLAS for the benches: the peers (a dense GEMM of equal flops, a per-expert loop, the
//! bf16 GEMM ceiling) and the L2 flush (a GEMV that reads a buffer). Row-major helpers over
//! cuBLAS's column-major API.
use cudarc::cublas::sys::cublasOperation_t::{CUBLAS_OP_N, CUBLAS_OP_T};
use cudarc::cublas::{CudaBlas, Gemm, GemmConfig, Gemv, GemvConfig};
use cudarc::driver::{CudaStream, DevicePtr, DevicePtrMut};
use half::bf16;
use std::sync::Arc;

/// Whether a row-major operand is used as stored (`N`) or transposed (`T`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    N,
    T,
}

pub struct Blas {
    handle: CudaBlas,
}

impl Blas {
    /// cuBLAS on `stream`; `Err` names why it could not be loaded.
    pub fn new(stream: Arc<CudaStream>) -> Result<Self, String> {
        CudaBlas::new(stream)
            .map(|handle| Self { handle })
            .map_err(|e| format!("cuBLAS could not be loaded: {e:?}"))
    }

    /// Row-major `C[m, n] = op_a(A) · op_b(B)` in bf16 with f32 accumulation, `lda`, `ldb`,
    /// `ldc` the stored row lengths. Column-major cuBLAS sees each row-major matrix
    /// transposed, so it computes `Cᵀ = op_b(B)ᵀ · op_a(A)ᵀ`.
    #[allow(clippy::too_many_arguments)]
    pub fn gemm_bf16(
        &self,
        (op_a, op_b): (Op, Op),
        (m, n, k): (usize, usize, usize),
        a: &impl DevicePtr<bf16>,
        lda: usize,
        b: &impl DevicePtr<bf16>,
        ldb: usize,
        c: &mut impl DevicePtrMut<bf16>,
        ldc: usize,
    ) {
        let op = |o: Op| if o == Op::N { CUBLAS_OP_N } else { CUBLAS_OP_T };
        let config = GemmConfig {
            transa: op(op_b),
            transb: op(op_a),
            m: n as i32,
            n: m as i32,
            k: k as i32,
            alpha: bf16::ONE,
            lda: ldb as i32,
            ldb: lda as i32,
            beta: bf16::ZERO,
            ldc: ldc as i32,
        };
        // SAFETY: the callers pass buffers holding the rows and row lengths given above.
        unsafe { self.handle.gemm(config, b, a, c) }.expect("cuBLAS bf16 GEMM");
    }

    /// `y[rows] = A x` for a row-major-contiguous buffer viewed column-major `[rows, cols]`:
    /// reads all of `a`, writes `rows` floats.
    pub fn gemv_f32(
        &self,
        (rows, cols): (usize, usize),
        a: &impl DevicePtr<f32>,
        x: &impl DevicePtr<f32>,
        y: &mut impl DevicePtrMut<f32>,
    ) {
        let config = GemvConfig {
            trans: CUBLAS_OP_N,
            m: rows as i32,
            n: cols as i32,
            alpha: 1.0,
            lda: rows as i32,
            incx: 1,
            beta: 0.0,
            incy: 1,
        };
        // SAFETY: a holds rows·cols floats, x cols, y rows (the caller's sizes).
        unsafe { self.handle.gemv(config, a, x, y) }.expect("cuBLAS GEMV");
    }
}
