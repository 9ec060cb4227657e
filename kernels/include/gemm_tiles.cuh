// gemm_tiles.cuh: the two CTA tiles the grouped-GEMM kernels are written against, behind one
// interface, so each kernel body (grouped_gemm.cu) exists once for every dtype:
//   MmaRowsTile  f16/bf16: GemmTile of mma_tile.cuh (128x128x32, 8 warps, 3-stage cp.async);
//   FmaRowsTile  f32: 64x64x16 FMA tile, 256 threads, thread (ty, tx) = (tid / 16, tid % 16)
//                owning rows ty + 16i (i < 4), columns 2tx + 32(j/2) + j%2 (j < 4: two adjacent
//                pairs); any shape, any alignment.
// Interface (Tile):
//   Tile::BM, BN, THREADS, SWIGLU_SPAN (B rows per gate/up span, see swiglu_weight_row);
//   Tile::smem_bytes<AM, BM2>(); Tile::Acc (accumulators, zero-initialised with {});
//   Tile::mainloop<AM, BM2>(acc, a_row, a_limit, b_row, b_limit, kdim, smem, fallback): the
//     operand-source contract of cta_tile_mainloop_mn (mma_tile.cuh);
//   Tile::each(acc, f): f(local row, local column, value) for every accumulator;
//   Tile::each_adjacent(acc, f): f(local row, local column c, value at c, value at c + 1), c even;
//   Tile::pairs(acc, f): f(local row, local output column, gate, up) for SwiGLU tiles.
#pragma once
#include "gemm_group.cuh"
#include "mma_tile.cuh"

struct MmaRowsTile {
  using Cfg = GemmTile;
  static constexpr int BM = Cfg::BM, BN = Cfg::BN, THREADS = Cfg::THREADS, SWIGLU_SPAN = Cfg::WN;
  typedef float Acc[Cfg::MI][Cfg::NI][4];
  template <Major AM, Major BM2> __host__ __device__ static constexpr int smem_bytes() {
    return Cfg::smem_bytes<AM, BM2>();
  }
  template <Major AM, Major BM2, class T, class ARow, class BRow>
  static __device__ __forceinline__ void mainloop(Acc& acc, ARow a_row, int a_limit, BRow b_row, int b_limit,
                                                  i64 kdim, void* smem, const T* fallback) {
    cta_tile_mainloop_mn<Cfg, AM, BM2>(acc, a_row, a_limit, b_row, b_limit, kdim, static_cast<T*>(smem), fallback);
  }
  template <class F> static __device__ __forceinline__ void each(const Acc& acc, F f) {
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    const AccCoord<Cfg> at(warp % Cfg::WARPS_M, warp / Cfg::WARPS_M, lane);
#pragma unroll
    for (int mi = 0; mi < Cfg::MI; ++mi)
#pragma unroll
      for (int ni = 0; ni < Cfg::NI; ++ni)
#pragma unroll
        for (int i = 0; i < 4; ++i) f(at.row(mi, i), at.col(ni, i), acc[mi][ni][i]);
  }
  // Elements i = 0, 1 (and 2, 3) of a fragment are columns c, c + 1 of one row.
  template <class F> static __device__ __forceinline__ void each_adjacent(const Acc& acc, F f) {
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    const AccCoord<Cfg> at(warp % Cfg::WARPS_M, warp / Cfg::WARPS_M, lane);
#pragma unroll
    for (int mi = 0; mi < Cfg::MI; ++mi)
#pragma unroll
      for (int ni = 0; ni < Cfg::NI; ++ni)
#pragma unroll
        for (int i = 0; i < 4; i += 2) f(at.row(mi, i), at.col(ni, i), acc[mi][ni][i], acc[mi][ni][i + 1]);
  }
  // Gate fragments ni < NI/2, up fragments ni + NI/2: output column warp_n * WN/2 + ni*8 + ...
  template <class F> static __device__ __forceinline__ void pairs(const Acc& acc, F f) {
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warp_n = warp / Cfg::WARPS_M;
    const AccCoord<Cfg> at(warp % Cfg::WARPS_M, warp_n, lane);
#pragma unroll
    for (int mi = 0; mi < Cfg::MI; ++mi)
#pragma unroll
      for (int ni = 0; ni < Cfg::NI / 2; ++ni)
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const int col = at.col(ni, i) - warp_n * (Cfg::WN / 2);
          f(at.row(mi, i), col, acc[mi][ni][i], acc[mi][ni + Cfg::NI / 2][i]);
        }
  }
};

struct FmaRowsTile {
  static constexpr int BM = 64, BN = 64, BK = 16, THREADS = 256, SWIGLU_SPAN = BN;
  typedef float Acc[4][4];
  template <Major, Major> __host__ __device__ static constexpr int smem_bytes() { return BK * (BM + BN) * 4; }

  // tile[k * ROWS + m] = operand(m, k0 + k) as f32; 0 outside (null rows, k >= kdim, m >= limit).
  template <Major M, int ROWS, class T, class Row>
  static __device__ __forceinline__ void fill(float* tile, Row row, int limit, i64 k0, i64 kdim) {
    for (int item = threadIdx.x; item < ROWS * BK; item += THREADS) {
      const int m = M == Major::K ? item / BK : item % ROWS;
      const int k = M == Major::K ? item % BK : item / ROWS;
      float v = 0.0f;
      if (k0 + k < kdim) {
        if constexpr (M == Major::K) {
          const T* p = row(m);
          if (p != nullptr) v = to_f32(p[k0 + k]);
        } else {
          const T* p = row(k0 + k);
          if (p != nullptr && m < limit) v = to_f32(p[m]);
        }
      }
      tile[k * ROWS + m] = v;
    }
  }
  template <Major AM, Major BM2, class T, class ARow, class BRow>
  static __device__ __forceinline__ void mainloop(Acc& acc, ARow a_row, int a_limit, BRow b_row, int b_limit,
                                                  i64 kdim, void* smem, const T*) {
    float* As = static_cast<float*>(smem);
    float* Bs = As + BK * BM;
    const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
    for (i64 k0 = 0; k0 < kdim; k0 += BK) {
      __syncthreads();  // the previous k-tile (or smem's previous user) is done
      fill<AM, BM, T>(As, a_row, a_limit, k0, kdim);
      fill<BM2, BN, T>(Bs, b_row, b_limit, k0, kdim);
      __syncthreads();
#pragma unroll 4
      for (int k = 0; k < BK; ++k) {
        float a[4], b[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) a[i] = As[k * BM + ty + 16 * i];
#pragma unroll
        for (int j = 0; j < 4; ++j) b[j] = Bs[k * BN + col(tx, j)];
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
          for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
      }
    }
    __syncthreads();
  }
  static __device__ __forceinline__ int col(int tx, int j) { return 2 * tx + 32 * (j / 2) + j % 2; }
  template <class F> static __device__ __forceinline__ void each(const Acc& acc, F f) {
    const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) f(ty + 16 * i, col(tx, j), acc[i][j]);
  }
  template <class F> static __device__ __forceinline__ void each_adjacent(const Acc& acc, F f) {
    const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 4; j += 2) f(ty + 16 * i, col(tx, j), acc[i][j], acc[i][j + 1]);
  }
  // Columns 2tx + j (j < 2) are gate values, 2tx + j + 32 the matching up values.
  template <class F> static __device__ __forceinline__ void pairs(const Acc& acc, F f) {
    const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j) f(ty + 16 * i, col(tx, j), acc[i][j], acc[i][j + 2]);
  }
};

template <class T> struct RowsTileOf {
  using type = MmaRowsTile;
};
template <> struct RowsTileOf<float> {
  using type = FmaRowsTile;
};
