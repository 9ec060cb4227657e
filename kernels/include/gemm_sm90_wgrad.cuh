// gemm_sm90_wgrad.cuh: the Hopper (sm_90a) weight gradient dB_e = dC_e^T A_e ([N, m_e] x
// [m_e, K], f32) for the experts listed in `active` (null: all), a K-grouped GEMM: its
// reduction runs over each group's rows. The machinery of gemm_sm90.cuh (persistent CTAs, a
// producer warpgroup filling the same 4-stage, 48 KiB ring, two consumer warpgroups on wgmma),
// with both operands copied by the producers: rows are gathered or padded, which TMA cannot
// bound at a group's end.
//
// Tile: 128 rows of dB_e (n) x 256 columns (k) x 64 of the group's rows per stage, both operands
//   MN-major (the reduction is their slow dimension), 128-byte swizzle:
//   wgmma A = dC_e^T, 128 n x 64 rows: row r of the stage is dC[start + r, n0 .. n0 + 127]
//     (256 bytes); consumer warpgroup w reads the 64-n block w (8 KiB);
//   wgmma B = A_e, 64 rows x 256 k: row r is A[source(start + r), k0 .. k0 + 255] (512 bytes).
//   A row absent from A (padding, a token routed nowhere) and rows past the group's end load
//   as zeros in both operands (0 * NaN would otherwise reach dB); n past N, k past K too.
// Schedule: tiles in order (active expert, n tile, k tile); CTA b takes tiles b, b + grid, ...
//   Each tile's whole reduction runs in one CTA, over the rows in order: bitwise deterministic,
//   no split and no atomics on dB. A tile whose group is empty runs no k-block: Replace writes
//   its zeros, Accumulate and Sparse skip it (producer and consumers decide alike).
// Thread mapping (384 threads, 1 CTA per SM):
//   warpgroup 0, the producer (setmaxnreg.dec 56): per stage, warp p copies rows p + 4i
//     (i < 16): lane l copies 16-byte chunk l of the row of A (one 512-byte request per row)
//     and lanes 0-15 chunk l of the row of dC (256 bytes), with cp.async; then, one stage
//     behind, wait, fence.proxy.async and arrive on the stage's full barrier (128 arrivals,
//     no TMA).
//   warpgroups 1-2, the consumers (setmaxnreg.inc 224): as in gemm_sm90.cuh, m64n256k16 with
//     both operands transposed (MN-major), one batch in flight; then each warp sends its 16
//     rows of dB (n0 + 64w + 16 warp ..) through its staging tile (epilogue_stage.cuh), 64
//     columns at a time, as 16-byte row segments, replaced or added (Sparse: one lane per warp
//     marks written[e] and learns which).
// Memory traffic: dC_e read once per k tile and A_e once per n tile (from L2 after the first:
//   the tiles of one expert are adjacent in the schedule), dB written (or read and written)
//   once in whole sectors; nothing for a skipped tile.
// Contract (checked on the host): f16/bf16, N and K multiples of 8, dC and A 16-byte aligned.
#pragma once
#include "gemm_sm90.cuh"

template <class T> struct Sm90Wgrad {
  const T* dc;
  GroupedRows<T> a;
  const int* offsets;
  const int* active;  // null: every expert
  int slots;          // active experts (gridDim's schedule runs over slots x n tiles x k tiles)
  int experts;
  i64 rows, n, kdim;
  float* db;
  int mode;
  unsigned* written;
  unsigned call;

  __device__ __forceinline__ int n_tiles() const { return int((n + sm90::kTileM - 1) / sm90::kTileM); }
  __device__ __forceinline__ int k_tiles() const { return int((kdim + sm90::kTileN - 1) / sm90::kTileN); }
  __device__ __forceinline__ i64 tiles() const { return i64(slots) * n_tiles() * k_tiles(); }

  // Tile t: its expert (-1: skipped), group, and corner (n0, k0).
  struct Tile {
    int e;
    GroupRange g;
    i64 n0, k0;
    __device__ __forceinline__ int k_blocks() const { return int((g.end - g.start + sm90::kTileK - 1) / sm90::kTileK); }
  };
  __device__ __forceinline__ Tile tile(i64 t) const {
    const i64 per_expert = i64(n_tiles()) * k_tiles();
    const int slot = int(t / per_expert), within = int(t % per_expert);
    int e = active != nullptr ? active[slot] : slot;
    GroupRange g{0, 0};
    if (e < 0 || e >= experts) e = -1;
    else g = group_range(offsets, e, rows);
    if (e >= 0 && g.end == g.start && mode != kWgradReplace) e = -1;
    return {e, g, i64(within % n_tiles()) * sm90::kTileM, i64(within / n_tiles()) * sm90::kTileN};
  }
};

template <class T>
__device__ __forceinline__ void sm90_wgrad_produce(const Sm90Wgrad<T>& p, TmaPipeline<sm90::kStages>& pipe,
                                                   unsigned char* stages) {
  using namespace sm90;
  const unsigned warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const WgmmaTile tile_dc{kTileM, kTileK, SwizzleMode::B128, true};
  const WgmmaTile tile_a{kTileN, kTileK, SwizzleMode::B128, true};
  PipelineState st{0, 0};
  CopyLanding landing;
  for (i64 t = blockIdx.x; t < p.tiles(); t += gridDim.x) {
    const typename Sm90Wgrad<T>::Tile w = p.tile(t);
    if (w.e < 0) continue;
    const int k_blocks = w.k_blocks();
    const bool dc_chunk = lane < 16 && w.n0 + 8 * lane < p.n;
    const bool a_chunk = w.k0 + 8 * lane < p.kdim;
    for (int kb = 0; kb < k_blocks; ++kb) {
      unsigned char* stage = stages + st.stage * kStageBytes;
      pipe.producer_acquire(st);
#pragma unroll 4
      for (int i = 0; i < kTileK / 4; ++i) {
        const unsigned r = warp + 4 * i;
        const i64 row = w.g.start + i64(kb) * kTileK + r;
        const i64 src = row < w.g.end ? p.a.source(row) : -1;
        const bool a_in = src >= 0 && a_chunk;
        cp_async<16>(stage + kABytes + tile_a.offset(8 * lane, r),
                     a_in ? p.a.a + src * p.a.ld + w.k0 + 8 * lane : p.a.a, a_in ? 16 : 0);
        if (lane < 16) {
          const bool dc_in = src >= 0 && dc_chunk;
          cp_async<16>(stage + tile_dc.offset(8 * lane, r), dc_in ? p.dc + row * p.n + w.n0 + 8 * lane : p.dc,
                       dc_in ? 16 : 0);
        }
      }
      landing.copied(pipe);
      st.advance<kStages>();
    }
  }
  landing.finish(pipe);
}

template <class T>
__device__ __forceinline__ void sm90_wgrad_consume(const Sm90Wgrad<T>& p, TmaPipeline<sm90::kStages>& pipe,
                                                   const unsigned char* stages, float* staging) {
  using namespace sm90;
  const unsigned wg = threadIdx.x / 128 - 1, t = threadIdx.x % 128, w = t / 32;
  const WarpStage warp_stage{staging + (4 * wg + w) * (stage::kWarpBytes / 4)};
  const WgmmaTile tile_dc{64, kTileK, SwizzleMode::B128, true};
  const WgmmaTile tile_a{kTileN, kTileK, SwizzleMode::B128, true};
  PipelineState read{0, 0}, release{0, 0};
  float acc[kTileN / 2];
  for (i64 next = blockIdx.x; next < p.tiles(); next += gridDim.x) {
    const typename Sm90Wgrad<T>::Tile tile = p.tile(next);
    if (tile.e < 0) continue;
    sm90_tile_mainloop<T, true, true>(acc, pipe, read, release, tile.k_blocks(), stages, tile_dc,
                                      wg * (kABytes / 2), tile_a);

    bool add = p.mode == kWgradAccumulate;
    if (p.mode == kWgradSparse) {
      unsigned added = 0;
      if (t % 32 == 0) added = wgrad_mark_written(p.written, tile.e, p.call);
      add = __shfl_sync(0xffffffffu, added, 0) != 0;
    }
    // This warp's 16 rows of dB_e through its staging tile, 64 columns at a time.
    const i64 r0 = tile.n0 + 64 * wg + 16 * w;
    const int rows = int(r0 < p.n ? (p.n - r0 < 16 ? p.n - r0 : 16) : 0);
    if (rows == 0) continue;
    float* dbe = p.db + i64(tile.e) * p.n * p.kdim;
#pragma unroll
    for (int piece = 0; piece < kTileN / 64; ++piece) {
      warp_stage.put_fragments([&](int j, int half, int i) { return acc[4 * (8 * piece + j) + 2 * half + i]; });
      warp_stage.store_rows(dbe, p.kdim, r0, rows, tile.k0 + 64 * piece, p.kdim, add);
    }
  }
}

template <class T>
__device__ __forceinline__ void grouped_gemm_wgrad_sm90(const Sm90Wgrad<T>& p, TmaPipeline<sm90::kStages>& pipe) {
#if defined(__CUDA_ARCH__) && !defined(MOE_SM90A)
  __trap();  // wgmma exists only in sm_90a code, and the host launches this kernel nowhere else
#else
  DYN_SHARED(unsigned char, raw);
  unsigned char* stages = align_1024(raw);
  if (threadIdx.x == 0) pipe.init(sm90::kConsumerWarps, sm90::kProducers, false);
  __syncthreads();
  if (threadIdx.x < sm90::kProducers) {
    setmaxnreg<false, sm90::kProducerRegs>();
    sm90_wgrad_produce(p, pipe, stages);
  } else {
    setmaxnreg<true, sm90::kConsumerRegs>();
    sm90_wgrad_consume(p, pipe, stages, sm90_staging(stages));
  }
#endif
}
