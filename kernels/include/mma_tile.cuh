// mma_tile.cuh: tensor-core CTA tile primitives (mma.sync m16n8k16, ldmatrix, cp.async),
// shared by the grouped expert GEMM (kernels/grouped_gemm.cu) and the codebook kernels.
//
// The CTA computes acc = A_tile · B_tile^T over a reduction dimension ("k") of 16-bit operands
// (f16 or bf16) with f32 accumulation. Few pieces, each usable alone:
//
//   MmaTile<BM, BN, BK, WARPS_M, WARPS_N, STAGES>   the geometry (a Config): CTA tile BM x BN,
//       k-tile BK, warps WARPS_M x WARPS_N each owning a WM x WN warp tile = MI x NI fragments
//       (m16 x n8), STAGES-deep cp.async pipeline. `GemmTile` (128x128x32, 8 warps of 64x32,
//       3 stages) is the default.
//   Major::K / Major::MN   how an operand tile is stored in shared memory:
//       K  : [ROWS][BK + 8]  a row per m (or n), k contiguous: what A·B^T with [M,K] x [N,K]
//            operands (nn.Linear weights) needs;
//       MN : [BK][ROWS + 8]  a row per k, m (or n) contiguous: operands whose global rows run
//            along the reduction (dA = dC·B reads B [N,K] with N as k; dB = dC^T·A).
//       The +8 halves of padding make every 8 consecutive rows start 16 bytes apart modulo
//       128: ldmatrix is bank-conflict free in both layouts.
//   tile_load_async<ROWS, COLS, LD, THREADS>(smem, row, col_limit, fallback)
//       cp.async (16 B) of a [ROWS x COLS] 16-bit tile: row(r) is a pointer to the tile's
//       first element of row r, or nullptr (the row is zero-filled: how gathers with -1
//       padding rows and rows past a group's end are loaded); 8-element chunks at columns
//       >= col_limit are zero-filled too. Sources must be 16-byte aligned (row strides and
//       offsets multiples of 8 elements). Issues copies only: commit and wait are the caller's.
//   ldm_a_k / ldm_a_mn     the A fragment (m16k16) of mma.sync from a K- or MN-major tile;
//   ldm_b_k / ldm_b_mn     two B fragments (n8k16 each, 16 columns) from a K- or MN-major tile
//                          (the MN form is the transposed load: ldmatrix .trans);
//   mma_16816(d, a, b, T*) (ptx.cuh) d += a·b in the precision of T (__half or __nv_bfloat16);
//   warp_tile_mma<Cfg, AM, BM2, T>(acc, As, Bs, warp_m, warp_n)  one k-tile for one warp;
//   AccCoord<Cfg>          row / column (inside the CTA tile) of accumulator acc[mi][ni][i];
//   cta_tile_mainloop<Cfg>(acc, a_row, b_row, K, smem)  the whole pipelined loop for
//       K-major A and B: acc (zeroed by the caller, or holding a previous sum) += Σ_k A(m,k)
//       B(n,k) for k < K, with a_row(m) / b_row(n) the start of row m / n (nullptr: zeros);
//       K a multiple of 8. `cta_tile_mainloop_mn` is the general form (MN-major operands).
//       Both begin with a __syncthreads (so a loop over tiles may call them back to back) and
//       end with every copy landed and a __syncthreads (the caller may reuse smem at once).
//   Cfg::smem_bytes<AM, BM2>()   dynamic shared memory the mainloop needs.
//
// Thread mapping: warp w sits at (warp_m, warp_n) = (w % WARPS_M, w / WARPS_M); lane l of a
// fragment holds rows g = l/4 (+8), columns 2t, 2t+1 (t = l%4), see ptx.cuh / AccCoord.
#pragma once
#include "ptx.cuh"

enum class Major { K, MN };

template <int BM_, int BN_, int BK_, int WARPS_M_, int WARPS_N_, int STAGES_>
struct MmaTile {
  static constexpr int BM = BM_, BN = BN_, BK = BK_, STAGES = STAGES_;
  static constexpr int WARPS_M = WARPS_M_, WARPS_N = WARPS_N_;
  static constexpr int THREADS = 32 * WARPS_M * WARPS_N;
  static constexpr int WM = BM / WARPS_M, WN = BN / WARPS_N;
  static constexpr int MI = WM / 16, NI = WN / 8;
  static_assert(BK % 16 == 0 && WM % 16 == 0 && WN % 16 == 0, "fragment multiples");
  // Halves of one stage of an operand with ROWS rows (m or n) in layout M.
  template <Major M, int ROWS> __host__ __device__ static constexpr int tile_halves() {
    return M == Major::K ? ROWS * (BK + 8) : BK * (ROWS + 8);
  }
  template <Major AM, Major BM2> __host__ __device__ static constexpr int smem_bytes() {
    return STAGES * (tile_halves<AM, BM>() + tile_halves<BM2, BN>()) * 2;
  }
};
using GemmTile = MmaTile<128, 128, 32, 2, 4, 3>;

// Where accumulator element i of fragment (mi, ni) of warp (warp_m, warp_n) sits in the CTA
// tile: row = warp_m*WM + mi*16 + lane/4 + 8*(i/2), column = warp_n*WN + ni*8 + 2*(lane%4) + i%2.
template <class Cfg> struct AccCoord {
  int row0, col0;  // of element 0 of fragment (0, 0) for this lane
  __device__ __forceinline__ AccCoord(int warp_m, int warp_n, int lane)
      : row0(warp_m * Cfg::WM + lane / 4), col0(warp_n * Cfg::WN + 2 * (lane % 4)) {}
  __device__ __forceinline__ int row(int mi, int i) const { return row0 + mi * 16 + 8 * (i / 2); }
  __device__ __forceinline__ int col(int ni, int i) const { return col0 + ni * 8 + i % 2; }
};

template <int ROWS, int COLS, int LD, int THREADS, class T, class RowFn>
__device__ __forceinline__ void tile_load_async(T* smem, RowFn row, int col_limit, const T* fallback) {
  constexpr int CHUNKS = COLS / 8;  // 16-byte chunks per row
  static_assert(COLS % 8 == 0, "16-byte chunks");
#pragma unroll
  for (int c = threadIdx.x; c < ROWS * CHUNKS; c += THREADS) {
    const int r = c / CHUNKS, col = (c % CHUNKS) * 8;
    const T* src = row(r);
    const bool live = src != nullptr && col < col_limit;
    cp_async<16>(smem + r * LD + col, live ? src + col : fallback, live ? 16 : 0);
  }
}

// A fragment of rows m0..m0+15, k0..k0+15. K-major: s[m * ld + k]; MN-major: s[k * ld + m].
template <class T>
__device__ __forceinline__ void ldm_a_k(uint32_t (&a)[4], const T* s, int ld, int m0, int k0) {
  const int lane = threadIdx.x % 32;
  ldmatrix_x4<false>(a, s + (m0 + lane % 16) * ld + k0 + (lane / 16) * 8);
}
template <class T>
__device__ __forceinline__ void ldm_a_mn(uint32_t (&a)[4], const T* s, int ld, int m0, int k0) {
  const int lane = threadIdx.x % 32;
  ldmatrix_x4<true>(a, s + (k0 + (lane / 16) * 8 + lane % 8) * ld + m0 + ((lane / 8) % 2) * 8);
}
// B fragments of columns n0..n0+7 (b[0]) and n0+8..n0+15 (b[1]), k0..k0+15.
// K-major: s[n * ld + k]; MN-major: s[k * ld + n].
template <class T>
__device__ __forceinline__ void ldm_b_k(uint32_t (&b)[2][2], const T* s, int ld, int n0, int k0) {
  const int lane = threadIdx.x % 32;
  uint32_t r[4];
  ldmatrix_x4<false>(r, s + (n0 + (lane / 16) * 8 + lane % 8) * ld + k0 + ((lane / 8) % 2) * 8);
  b[0][0] = r[0], b[0][1] = r[1], b[1][0] = r[2], b[1][1] = r[3];
}
template <class T>
__device__ __forceinline__ void ldm_b_mn(uint32_t (&b)[2][2], const T* s, int ld, int n0, int k0) {
  const int lane = threadIdx.x % 32;
  uint32_t r[4];
  ldmatrix_x4<true>(r, s + (k0 + ((lane / 8) % 2) * 8 + lane % 8) * ld + n0 + (lane / 16) * 8);
  b[0][0] = r[0], b[0][1] = r[1], b[1][0] = r[2], b[1][1] = r[3];
}

// acc[mi][ni] += the warp's MI x NI fragments over one BK k-tile held in As, Bs.
template <class Cfg, Major AM, Major BM2, class T>
__device__ __forceinline__ void warp_tile_mma(float (&acc)[Cfg::MI][Cfg::NI][4], const T* As, const T* Bs,
                                              int warp_m, int warp_n) {
  constexpr int LDA = AM == Major::K ? Cfg::BK + 8 : Cfg::BM + 8;
  constexpr int LDB = BM2 == Major::K ? Cfg::BK + 8 : Cfg::BN + 8;
#pragma unroll
  for (int ks = 0; ks < Cfg::BK; ks += 16) {
    uint32_t a[Cfg::MI][4];
#pragma unroll
    for (int mi = 0; mi < Cfg::MI; ++mi) {
      const int m0 = warp_m * Cfg::WM + mi * 16;
      if constexpr (AM == Major::K) ldm_a_k(a[mi], As, LDA, m0, ks);
      else ldm_a_mn(a[mi], As, LDA, m0, ks);
    }
#pragma unroll
    for (int nj = 0; nj < Cfg::NI / 2; ++nj) {
      uint32_t b[2][2];
      const int n0 = warp_n * Cfg::WN + nj * 16;
      if constexpr (BM2 == Major::K) ldm_b_k(b, Bs, LDB, n0, ks);
      else ldm_b_mn(b, Bs, LDB, n0, ks);
#pragma unroll
      for (int mi = 0; mi < Cfg::MI; ++mi) {
        mma_16816(acc[mi][2 * nj], a[mi], b[0], static_cast<T*>(nullptr));
        mma_16816(acc[mi][2 * nj + 1], a[mi], b[1], static_cast<T*>(nullptr));
      }
    }
  }
}

// The pipelined mainloop over k < kdim in k-tiles of BK.
// Operand sources (X = a or b, ROWS = BM or BN):
//   Major::K : x_row(r) = start of row r (k = 0), or nullptr; x_limit unused (kdim bounds k).
//   Major::MN: x_row(k) = the tile's first element of reduction row k (nullptr past the end),
//              x_limit = valid columns of the tile (m or n past it load as zeros).
// `fallback`: any 16-byte aligned global address (the source operand's base), named by the
// zero-filling copies.
template <class Cfg, Major AM, Major BM2, class T, class ARow, class BRow>
__device__ __forceinline__ void cta_tile_mainloop_mn(float (&acc)[Cfg::MI][Cfg::NI][4], ARow a_row, int a_limit,
                                                     BRow b_row, int b_limit, i64 kdim, T* smem,
                                                     const T* fallback) {
  constexpr int A_HALVES = Cfg::template tile_halves<AM, Cfg::BM>();
  constexpr int B_HALVES = Cfg::template tile_halves<BM2, Cfg::BN>();
  const int warp = threadIdx.x / 32, warp_m = warp % Cfg::WARPS_M, warp_n = warp / Cfg::WARPS_M;
  const int ktiles = int((kdim + Cfg::BK - 1) / Cfg::BK);
  auto load = [&](int kt) {
    T* As = smem + (kt % Cfg::STAGES) * (A_HALVES + B_HALVES);
    T* Bs = As + A_HALVES;
    const i64 k0 = i64(kt) * Cfg::BK;
    const int klimit = kdim - k0 < Cfg::BK ? int(kdim - k0) : Cfg::BK;
    if constexpr (AM == Major::K) {
      tile_load_async<Cfg::BM, Cfg::BK, Cfg::BK + 8, Cfg::THREADS>(
          As, [&](int r) -> const T* { const T* p = a_row(r); return p ? p + k0 : nullptr; }, klimit, fallback);
    } else {
      tile_load_async<Cfg::BK, Cfg::BM, Cfg::BM + 8, Cfg::THREADS>(
          As, [&](int r) -> const T* { return r < klimit ? a_row(k0 + r) : nullptr; }, a_limit, fallback);
    }
    if constexpr (BM2 == Major::K) {
      tile_load_async<Cfg::BN, Cfg::BK, Cfg::BK + 8, Cfg::THREADS>(
          Bs, [&](int r) -> const T* { const T* p = b_row(r); return p ? p + k0 : nullptr; }, klimit, fallback);
    } else {
      tile_load_async<Cfg::BK, Cfg::BN, Cfg::BN + 8, Cfg::THREADS>(
          Bs, [&](int r) -> const T* { return r < klimit ? b_row(k0 + r) : nullptr; }, b_limit, fallback);
    }
  };
  __syncthreads();  // a previous user of smem is done with it
#pragma unroll
  for (int s = 0; s < Cfg::STAGES - 1; ++s) {
    if (s < ktiles) load(s);
    cp_async_commit();
  }
  for (int kt = 0; kt < ktiles; ++kt) {
    cp_async_wait<Cfg::STAGES - 2>();  // k-tile kt has landed (this thread's copies)
    __syncthreads();                   // everyone's copies; the slot of kt - 1 is free
    if (kt + Cfg::STAGES - 1 < ktiles) load(kt + Cfg::STAGES - 1);
    cp_async_commit();
    const T* As = smem + (kt % Cfg::STAGES) * (A_HALVES + B_HALVES);
    warp_tile_mma<Cfg, AM, BM2>(acc, As, As + A_HALVES, warp_m, warp_n);
  }
  cp_async_wait<0>();
  __syncthreads();
}

// K-major A and B (C = A·B^T): a_row(m), b_row(n) the starts of rows m and n, or nullptr.
template <class Cfg, class T, class ARow, class BRow>
__device__ __forceinline__ void cta_tile_mainloop(float (&acc)[Cfg::MI][Cfg::NI][4], ARow a_row, BRow b_row,
                                                  i64 kdim, T* smem, const T* fallback) {
  cta_tile_mainloop_mn<Cfg, Major::K, Major::K>(acc, a_row, 0, b_row, 0, kdim, smem, fallback);
}
