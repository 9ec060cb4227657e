// gemm_decode.cuh: the decode kernels of the grouped GEMM (kernels/grouped_gemm.cu): groups of
// few rows (<= DEC_ROWS per pass), where the work is streaming the expert's weights once.
//
// Algorithm: a lane owns one output column (SwiGLU forward: its gate and up weight rows) and
// accumulates the dot products of every live row of the group against it in f32 registers,
// over the warp's part of the reduction. Each warp streams its weight tile through its own
// DEC_STAGES-deep ring in shared memory with 16-byte cp.async (4 x 16 bytes of weights per
// lane per stage, four lanes per 64-byte run of a row: whole sectors; DEC_STAGES - 1 stages,
// 768 bytes per lane, in flight while one is consumed),
// together with the matching chunk of the group's rows (A or dC, converted to f32 where used,
// read as broadcasts). The ring is private to the warp: cp_async_wait + __syncwarp order it,
// no block barrier. Both operand orders:
//   forward  C = A · B^T: lane c's weight row B_e[c, k0 .. k0 + RC) is contiguous; stored in
//            16-byte units (piece q of the row of lane l at unit q * 32 + l: conflict-free reads);
//   dgrad    dA = dC · B: the warp's 32 output columns of B_e rows n0 .. n0 + RC (64 or 128
//            contiguous bytes each), row-major [RC][32]; lane l reads column l.
// Split-K inside the CTA: the block's DEC_WARPS warps are `ksplit` reduction splits (a fixed
// chunk range each) x DEC_WARPS / ksplit column groups of 32; after the mainloop the splits'
// partial sums meet in shared memory (reusing the rings) and the split-0 warps add them in
// split order and run the epilogue: a fixed order, so results are bitwise reproducible. ksplit
// comes from the host (ops/gemm: decode_plan), from host-known sizes only.
// Traffic: B_e read once per pass of DEC_ROWS rows of its group (once for <= rows_cap rows), by
//   exactly one warp (no redundancy); the rows' chunks once per column group (L2); C written once.
// Operands off 16-byte alignment (or K not a multiple of 16 bytes) fill the same ring with
// element loads: any shape, any alignment.
#pragma once
#include "gemm_group.cuh"
#include "ptx.cuh"

constexpr int DEC_WARPS = 4, DEC_ROWS = 32, DEC_STAGES = 4, DEC_CHUNK_BYTES = 64;
// 16-byte units of a chunk of one row, and bytes of one warp's B tile per column of a lane.
constexpr int DEC_PIECES = DEC_CHUNK_BYTES / 16, DEC_B_BYTES = 32 * DEC_CHUNK_BYTES;

template <class T> struct DecodeArgs {
  GroupedRows<T> rows_of;  // A (forward, gathered or not) or dC (dgrad, contiguous, ld N)
  const T* b;              // [E, N, K]
  const int* offsets;
  int experts;
  i64 rows;        // rows of the grouped matrix
  i64 n, kdim;     // B_e is [n, kdim]
  i64 red_len;     // the reduction: K (forward) or N (dgrad)
  i64 cols;        // output columns: N or h (SwiGLU) forward, K dgrad
  Epilogue<T> epi;
  int ksplit;      // 1, 2 or 4
  int rows_cap;    // rows per pass (<= DEC_ROWS): the A tile's rows
};

// Bytes of one warp's ring stage (the host mirrors it: ops/gemm/decode.rs, decode_plan).
__host__ __device__ constexpr int decode_stage_bytes(int cols, int rows_cap) {
  return cols * DEC_B_BYTES + rows_cap * DEC_CHUNK_BYTES;
}

template <class T, int COLS, bool DGRAD>
__device__ __forceinline__ void decode_stream(const DecodeArgs<T>& p) {
  constexpr int V = elems_per_16<T>, RC = DEC_CHUNK_BYTES / int(sizeof(T));
  DYN_SHARED(unsigned char, smem);
  const int e = blockIdx.y, lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  __shared__ i64 group[2];  // read once per block, not by every thread
  if (threadIdx.x == 0) {
    const GroupRange range = group_range(p.offsets, e, p.rows);
    group[0] = range.start;
    group[1] = range.end;
  }
  __syncthreads();
  const GroupRange g = {group[0], group[1]};
  if (g.start == g.end) return;  // uniform: the group is the block's
  const int groups_per_block = DEC_WARPS / p.ksplit, cg = warp % groups_per_block, split = warp / groups_per_block;
  const i64 warp_col0 = (i64(blockIdx.x) * groups_per_block + cg) * 32, c = warp_col0 + lane;
  const bool col_live = c < p.cols;
  const T* be = p.b + i64(e) * p.n * p.kdim;
  const i64 up = p.epi.mode == EPI_SWIGLU ? p.cols : 0;  // SwiGLU: the up row of column c is h + c
  // This lane's weight rows (forward, for the element-wise fill): column c, and its up row.
  const T* wrow[COLS];
#pragma unroll
  for (int j = 0; j < COLS; ++j) wrow[j] = !DGRAD && col_live ? be + (c + j * up) * p.kdim : nullptr;
  const bool vec = rows_aligned_16(p.b, p.kdim) && rows_aligned_16(p.rows_of.a, p.rows_of.ld);
  // The reduction chunks of this warp's split.
  const i64 chunks = (p.red_len + RC - 1) / RC, per_split = (chunks + p.ksplit - 1) / p.ksplit;
  const i64 chunk0 = min(chunks, split * per_split), count = min(chunks, chunk0 + per_split) - chunk0;
  const int stage_bytes = decode_stage_bytes(COLS, p.rows_cap);
  unsigned char* ring = smem + warp * DEC_STAGES * stage_bytes;
  const T** a_rows = reinterpret_cast<const T**>(smem + DEC_WARPS * DEC_STAGES * stage_bytes);

  // Stage `slot` <- chunk `chunk` of the weight tile and of the pass's rows [r0, r0 + live).
  auto load = [&](i64 chunk, int slot, int live) {
    unsigned char* bs = ring + slot * stage_bytes;
    T* as = reinterpret_cast<T*>(bs + COLS * DEC_B_BYTES);
    const i64 k0 = chunk * RC;  // first reduction index of the chunk
    if (vec) {
#pragma unroll
      for (int i = 0; i < COLS * DEC_PIECES; ++i) {
        const T* src;
        unsigned char* dst;
        if constexpr (DGRAD) {  // unit i * 32 + lane: row j of the tile, 16-byte part q
          constexpr int PARTS = 32 / V;
          const int unit = i * 32 + lane, j = unit / PARTS, q = unit % PARTS;
          const bool live_unit = k0 + j < p.red_len && warp_col0 + q * V < p.kdim;
          src = live_unit ? be + (k0 + j) * p.kdim + warp_col0 + q * V : nullptr;
          dst = bs + unit * 16;
        } else {  // piece q of weight row w of the warp's column j: 4 lanes per 64-byte run
          const int w = i / DEC_PIECES, unit = (i % DEC_PIECES) * 32 + lane, j = unit / DEC_PIECES,
                    q = unit % DEC_PIECES;
          const i64 cj = warp_col0 + j;
          const bool live_unit = cj < p.cols && k0 + q * V < p.red_len;
          src = live_unit ? be + (cj + w * up) * p.kdim + k0 + q * V : nullptr;
          dst = bs + ((w * DEC_PIECES + q) * 32 + j) * 16;
        }
        cp_async<16>(dst, src != nullptr ? src : p.b, src != nullptr ? 16 : 0);
      }
      for (int unit = lane; unit < live * DEC_PIECES; unit += 32) {
        const int r = unit / DEC_PIECES, q = unit % DEC_PIECES;
        const T* row = a_rows[r];
        const bool live_unit = row != nullptr && k0 + q * V < p.red_len;
        cp_async<16>(as + r * RC + q * V, live_unit ? row + k0 + q * V : p.b, live_unit ? 16 : 0);
      }
    } else {  // element by element into the same places
      T* bt = reinterpret_cast<T*>(bs);
#pragma unroll 1  // a fallback: no 32 hoisted row addresses (registers)
      for (int j = 0; j < RC; ++j) {
        const i64 k = k0 + j;
        if constexpr (DGRAD) {
          bt[j * 32 + lane] = k < p.red_len && col_live ? be[k * p.kdim + c] : from_f32<T>(0.0f);
        } else {
#pragma unroll
          for (int w = 0; w < COLS; ++w)
            bt[((w * DEC_PIECES + j / V) * 32 + lane) * V + j % V] =
                wrow[w] != nullptr && k < p.red_len ? wrow[w][k] : from_f32<T>(0.0f);
        }
      }
      for (int item = lane; item < live * RC; item += 32) {
        const int r = item / RC, j = item % RC;
        const T* row = a_rows[r];
        as[item] = row != nullptr && k0 + j < p.red_len ? row[k0 + j] : from_f32<T>(0.0f);
      }
    }
  };

  for (i64 r0 = g.start; r0 < g.end; r0 += p.rows_cap) {
    const int live = int(min(g.end - r0, i64(p.rows_cap)));
    __syncthreads();  // the previous pass's reduction has read the rings
    for (int r = threadIdx.x; r < live; r += DEC_WARPS * 32) a_rows[r] = p.rows_of.row(r0 + r);
    __syncthreads();
    float acc[COLS][DEC_ROWS] = {};
#pragma unroll
    for (int s = 0; s < DEC_STAGES - 1; ++s) {
      if (s < count) load(chunk0 + s, s, live);
      cp_async_commit();
    }
    for (i64 t = 0; t < count; ++t) {
      cp_async_wait<DEC_STAGES - 2>();  // chunk t has landed (this lane's copies)
      __syncwarp();                     // ... and every lane's; chunk t - 1 has been consumed
      if (t + DEC_STAGES - 1 < count) load(chunk0 + t + DEC_STAGES - 1, int((t + DEC_STAGES - 1) % DEC_STAGES), live);
      cp_async_commit();
      const unsigned char* bs = ring + int(t % DEC_STAGES) * stage_bytes;
      const T* as = reinterpret_cast<const T*>(bs + COLS * DEC_B_BYTES);
#pragma unroll 1  // one 16-byte step at a time: the rows' loads are not hoisted (registers)
      for (int j = 0; j < RC; j += V) {
        float bv[COLS][V];
        if constexpr (DGRAD) {
          const T* bt = reinterpret_cast<const T*>(bs);
#pragma unroll
          for (int q = 0; q < V; ++q) bv[0][q] = to_f32(bt[(j + q) * 32 + lane]);
        } else {
#pragma unroll
          for (int w = 0; w < COLS; ++w) {
            const Raw16 raw = load_128(reinterpret_cast<const Raw16*>(bs) + (w * DEC_PIECES + j / V) * 32 + lane);
#pragma unroll
            for (int q = 0; q < V; ++q) bv[w][q] = raw16_element(raw, q, static_cast<T*>(nullptr));
          }
        }
#pragma unroll
        for (int r = 0; r < DEC_ROWS; ++r) {
          if (r < live) {  // uniform; no break: acc stays indexed by constants (registers)
            const Raw16 raw = load_128(reinterpret_cast<const Raw16*>(as + r * RC + j));  // a broadcast
#pragma unroll
            for (int q = 0; q < V; ++q) {
              const float x = raw16_element(raw, q, static_cast<T*>(nullptr));
#pragma unroll
              for (int w = 0; w < COLS; ++w) acc[w][r] = fmaf(bv[w][q], x, acc[w][r]);
            }
          }
        }
      }
    }
    cp_async_wait<0>();  // only empty groups remain; nothing lands after the rings are reused
    // The splits' partial sums meet in shared memory: red[warp][w][r][lane].
    float* red = reinterpret_cast<float*>(smem);
    if (p.ksplit > 1) {
      __syncthreads();  // every warp has left its ring
#pragma unroll
      for (int w = 0; w < COLS; ++w)
#pragma unroll
        for (int r = 0; r < DEC_ROWS; ++r)
          if (r < live) red[((warp * COLS + w) * p.rows_cap + r) * 32 + lane] = acc[w][r];
      __syncthreads();
      if (split == 0) {
#pragma unroll
        for (int w = 0; w < COLS; ++w)
#pragma unroll
          for (int r = 0; r < DEC_ROWS; ++r) {
            if (r >= live) continue;
            float sum = red[((cg * COLS + w) * p.rows_cap + r) * 32 + lane];  // split 0's own
            for (int s = 1; s < p.ksplit; ++s) sum += red[(((s * groups_per_block + cg) * COLS + w) * p.rows_cap + r) * 32 + lane];
            acc[w][r] = sum;
          }
      }
    }
    if (split != 0 || !col_live) continue;
#pragma unroll
    for (int r = 0; r < DEC_ROWS; ++r) {
      if (r >= live) continue;
      const float s = p.epi.scale(r0 + r);
      if constexpr (COLS == 2) p.epi.pair(r0 + r, c, acc[0][r], acc[1][r], s);
      else p.epi.single(r0 + r, c, acc[0][r], s);
    }
  }
}
