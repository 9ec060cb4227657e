// gate_tf32.cuh: the gate family's f32-accurate GEMM tile on tensor cores (kernels/gate.cu: the f32
// linear forward gate_scores_linear_tf32, gate_dx, gate_dw).
//
// C[m][n] += sum_k A(m, k) B(k, n) over one GATE_BK k-tile held in shared memory as f32,
// k-major, exactly as gate_tile.cuh's layouts store it: As[k][m] (m < 64, row stride TF32_LDA)
// and Bs[k][n] (n < 128, row stride TF32_LDB), in one of two slots (tf32_k_loop, at the bottom). The strides are 8 words past a multiple of 32, so each fragment
// read below (lane (g, t) at k = t, m or n = g) touches 32 distinct banks.
//
// Precision: mma.sync m16n8k8 tf32 multiplies 11-bit significands exactly and accumulates in f32.
// An f32 operand v is split into two tf32 terms, hi = rna(v) and lo = rna(v - hi) (v - hi is exact
// in f32), and a product is hi_a hi_b + lo_a hi_b + hi_a lo_b: the dropped lo_a lo_b is below
// 2^-22 of it, so the tile agrees with an f32 FMA GEMM to accumulation-order noise. The
// coefficient operand (A) is always f32 and split; B widened from f16/bf16 is already a tf32
// value (its low 13 bits are zero), so it is one term: 2 mmas per fragment pair, 3 for f32 B.
//
// Warps (8): warp w owns rows 32 (w % 2) .. +32 and columns 32 (w / 2) .. +32 of the 64 x 128
// tile: 2 x 4 m16n8 fragments, acc[mf][nf][i] at row 16 mf + g + 8 (i >= 2), column
// 8 nf + 2t + (i & 1) of the warp's sub-tile (g = lane / 4, t = lane % 4).
#pragma once
#include "gate_tile.cuh"
#include "ptx.cuh"

constexpr int TF32_BM = 64, TF32_BN = 128;  // the block's C tile
constexpr int TF32_LDA = TF32_BM + 8, TF32_LDB = TF32_BN + 8;
constexpr int TF32_SLOT_FLOATS = GATE_BK * (TF32_LDA + TF32_LDB);  // As then Bs
constexpr int TF32_SHARED_BYTES = STAGED_SLOTS * TF32_SLOT_FLOATS * int(sizeof(float));

// v as tf32 terms: hi, and with Split the remainder lo (else v must already be a tf32 value).
template <bool Split>
__device__ __forceinline__ void tf32_terms(uint32_t& hi, uint32_t& lo, float v) {
  if (Split) {
    hi = cvt_rna_tf32(v);
    lo = cvt_rna_tf32(v - __uint_as_float(hi));
  } else {
    hi = __float_as_uint(v);
  }
}

// acc += a b for one m16n8k8 fragment pair given as tf32 terms (tf32_terms): the small products
// first, added to the running sum before the large one; a_lo b_lo is dropped. SplitB: b has a
// low term (f32 data, not widened 16-bit).
template <bool SplitB>
__device__ __forceinline__ void mma_tf32_terms(float (&acc)[4], const uint32_t (&a_hi)[4], const uint32_t (&a_lo)[4],
                                               const uint32_t (&b_hi)[2], const uint32_t (&b_lo)[2]) {
  mma_m16n8k8_tf32(acc, a_lo, b_hi, acc);
  if (SplitB) mma_m16n8k8_tf32(acc, a_hi, b_lo, acc);
  mma_m16n8k8_tf32(acc, a_hi, b_hi, acc);
}

// acc += A B over one k-tile (see the top). SplitB: B holds f32 data (not widened 16-bit).
template <bool SplitB>
__device__ __forceinline__ void tile_mma_tf32(float (&acc)[2][4][4], const float* As, const float* Bs) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, g = lane / 4, t = lane % 4;
  const float* a = As + (warp % 2) * 32 + g;
  const float* b = Bs + (warp / 2) * 32 + g;
#pragma unroll
  for (int kk = 0; kk < GATE_BK; kk += 8) {
    uint32_t a_hi[2][4], a_lo[2][4], b_hi[4][2], b_lo[4][2];
#pragma unroll
    for (int mf = 0; mf < 2; ++mf)
#pragma unroll
      for (int i = 0; i < 4; ++i)
        tf32_terms<true>(a_hi[mf][i], a_lo[mf][i], a[(kk + t + 4 * (i >> 1)) * TF32_LDA + 16 * mf + 8 * (i & 1)]);
#pragma unroll
    for (int nf = 0; nf < 4; ++nf)
#pragma unroll
      for (int i = 0; i < 2; ++i) tf32_terms<SplitB>(b_hi[nf][i], b_lo[nf][i], b[(kk + t + 4 * i) * TF32_LDB + 8 * nf]);
#pragma unroll
    for (int mf = 0; mf < 2; ++mf)
#pragma unroll
      for (int nf = 0; nf < 4; ++nf) mma_tf32_terms<SplitB>(acc[mf][nf], a_hi[mf], a_lo[mf], b_hi[nf], b_lo[nf]);
  }
}

// Calls f(m, n, value) for every accumulator of this thread, (m, n) in the block's 64 x 128 tile.
template <class F>
__device__ __forceinline__ void for_each_tf32_acc(const float (&acc)[2][4][4], F f) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, g = lane / 4, t = lane % 4;
#pragma unroll
  for (int mf = 0; mf < 2; ++mf)
#pragma unroll
    for (int nf = 0; nf < 4; ++nf)
#pragma unroll
      for (int i = 0; i < 4; ++i)
        f((warp % 2) * 32 + 16 * mf + g + 8 * (i >> 1), (warp / 2) * 32 + 8 * nf + 2 * t + (i & 1), acc[mf][nf][i]);
}

// acc += A B over the k-tiles k0 = begin, begin + GATE_BK, ... < end, double-buffered through
// registers (staged_k_loop): fetch(k0) reads k-tile k0 into the caller's TileStages, store(As, Bs, k0)
// writes them to a slot.
template <bool SplitB, class Fetch, class Store>
__device__ __forceinline__ void tf32_k_loop(float (&acc)[2][4][4], float* smem, int& step, i64 begin,
                                            i64 end, Fetch fetch, Store store) {
  staged_k_loop(smem, TF32_SLOT_FLOATS, GATE_BK * TF32_LDA, step, begin, end, fetch, store,
                [&](const float* As, const float* Bs) { tile_mma_tf32<SplitB>(acc, As, Bs); });
}
