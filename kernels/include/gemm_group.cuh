// gemm_group.cuh: what every grouped-GEMM kernel (kernels/grouped_gemm.cu) shares: the groups
// read from device memory, the A-row source (contiguous or gathered through sorted_rows), the
// tile scheduler over all groups' row tiles, and the epilogues.
//
// Robustness: offsets and sorted_rows live on the device, so no kernel trusts them. A group's
// rows are clamped to [0, rows); a gathered row whose slot is -1 (padding) or outside the
// operand reads as zeros; a weight whose slot is outside [0, slots) is 0. No index read from
// memory can make a kernel touch memory outside its buffers.
#pragma once
#include "gate_tile.cuh"

// Per-tile tables in shared memory, after the mainloop's buffers, filled before the mainloop
// (whose opening barrier publishes them): tables[m] = f(m) for m < BM.
template <int BM, int THREADS, class V, class F>
__device__ __forceinline__ void fill_tile_table(V* table, F f) {
  for (int m = threadIdx.x; m < BM; m += THREADS) table[m] = f(m);
}

// Rows [start, end) of group e, clamped to [0, rows).
struct GroupRange {
  i64 start, end;
};
__device__ __forceinline__ GroupRange group_range(const int* offsets, int e, i64 rows) {
  const i64 lo = min(max(i64(offsets[e]), i64(0)), rows);
  const i64 hi = min(max(i64(offsets[e + 1]), lo), rows);
  return {lo, hi};
}

// The grouped operand A: row r of the grouped matrix is A[r] (top_k == 0) or, gathered,
// A[sorted_rows[r] / top_k] (the token of slot sorted_rows[r]); nullptr for a -1 (padding)
// slot or a row outside A's a_rows rows.
template <class T> struct GroupedRows {
  const T* a;
  i64 a_rows;
  const int* sorted_rows;
  int top_k;
  i64 ld;  // elements per row of A
  // The row of A that grouped row r reads, or -1.
  __device__ __forceinline__ i64 source(i64 r) const {
    i64 src = r;
    if (top_k > 0) {
      const int slot = sorted_rows[r];
      src = slot < 0 ? -1 : slot / top_k;
    }
    return (src >= 0 && src < a_rows) ? src : -1;
  }
  __device__ __forceinline__ const T* row(i64 r) const {
    const i64 src = source(r);
    return src >= 0 ? a + src * ld : nullptr;
  }
};

// One tile of the grouped schedule: rows [row0, min(row0 + bm, row_end)) of group e, column
// tile col; e = -1 past the last tile.
struct GroupTile {
  int e;
  i64 row0, row_end;
  int col;
};

// The tile scheduler: tiles are numbered group after group (an empty group has none); group
// e has ceil(m_e / bm) row tiles times col_tiles column tiles, numbered column tile by column
// tile with the row tiles inside, so consecutive tiles (running at once on neighbouring CTAs)
// share B_e's column tile. Warp-collective (a converged warp; every lane gets the answer):
// each lane sums the tiles of ceil(E/32) consecutive groups, a warp scan finds the lane that
// holds `tile`, which resolves it and broadcasts. Cost: 2 ceil(E/32) offsets per lane.
__device__ __forceinline__ GroupTile grouped_tile_at(const int* offsets, int experts, i64 rows, int bm, int col_tiles,
                                                     i64 tile) {
  const int lane = threadIdx.x % 32, per = (experts + 31) / 32;
  const int e_begin = min(lane * per, experts), e_end = min(e_begin + per, experts);
  i64 mine = 0;
  for (int e = e_begin; e < e_end; ++e) {
    const GroupRange g = group_range(offsets, e, rows);
    mine += (g.end - g.start + bm - 1) / bm * col_tiles;
  }
  i64 inclusive = mine;
#pragma unroll
  for (int d = 1; d < 32; d *= 2) {
    const i64 up = __shfl_up_sync(0xffffffffu, inclusive, d);
    if (lane >= d) inclusive += up;
  }
  const i64 before = inclusive - mine;
  const unsigned owner = __ballot_sync(0xffffffffu, tile >= before && tile < inclusive);
  GroupTile found{-1, 0, 0, 0};
  if (owner == 0) return found;
  if (lane == __ffs(int(owner)) - 1) {
    i64 t = tile - before;
    for (int e = e_begin; e < e_end; ++e) {
      const GroupRange g = group_range(offsets, e, rows);
      const i64 row_tiles = (g.end - g.start + bm - 1) / bm;
      if (t < row_tiles * col_tiles) {
        found = {e, g.start + t % row_tiles * bm, g.end, int(t / row_tiles)};
        break;
      }
      t -= row_tiles * col_tiles;
    }
  }
  const int src = __ffs(int(owner)) - 1;
  return {__shfl_sync(0xffffffffu, found.e, src), __shfl_sync(0xffffffffu, found.row0, src),
          __shfl_sync(0xffffffffu, found.row_end, src), __shfl_sync(0xffffffffu, found.col, src)};
}

// grouped_tile_at for the kernels that give each row tile its own block (column tiles in
// blockIdx.y): warp 0 writes found = {e, first row, end row} into shared memory (e = -1 past
// the last tile); the caller synchronizes before reading it.
__device__ __forceinline__ void find_group_tile(int* found, const int* offsets, int experts, i64 rows, int bm,
                                                i64 tile) {
  if (threadIdx.x >= 32) return;
  const GroupTile t = grouped_tile_at(offsets, experts, rows, bm, 1, tile);
  if (threadIdx.x == 0) {
    found[0] = t.e;
    found[1] = int(t.row0);
    found[2] = int(t.row_end);
  }
}

enum EpilogueMode { EPI_STORE = 0, EPI_SWIGLU = 1, EPI_SWIGLU_BWD = 2 };

// What happens to an accumulated value v of output row r, column c (r < rows, c < cols):
//   EPI_STORE       out[r, c] = s_r v
//   EPI_SWIGLU      (pairs) out[r, c] = silu(s_r g) (s_r u), with g, u the accumulated gate
//                   and up values of column c; gu [rows, 2h] (optional) keeps s_r g at c and
//                   s_r u at h + c
//   EPI_SWIGLU_BWD  dh = s_r v; reads g = gu[r, c], u = gu[r, h + c] and writes
//                   out[r, c] = dh u silu'(g), out[r, h + c] = dh silu(g)  (out is dGU [rows, 2h])
// s_r = weights[sorted_rows[r]] when weights are given (0 for a padding row), else 1: scale(r),
// which callers evaluate once per row and pass in. out holds T or, with out_f32, float; ld is
// its row stride.
template <class T> struct Epilogue {
  int mode;
  void* out;
  int out_f32;
  i64 ld;
  const float* weights;
  const int* sorted_rows;
  i64 slots;
  T* gu;
  i64 h;

  __device__ __forceinline__ float scale(i64 r) const {
    if (weights == nullptr) return 1.0f;
    const int slot = sorted_rows[r];
    return (slot >= 0 && slot < slots) ? weights[slot] : 0.0f;
  }
  __device__ __forceinline__ void put(i64 i, float v) const {
    if (out_f32) static_cast<float*>(out)[i] = v;
    else static_cast<T*>(out)[i] = from_f32<T>(v);
  }
  // EPI_STORE and EPI_SWIGLU_BWD.
  __device__ __forceinline__ void single(i64 r, i64 c, float v, float s) const {
    v *= s;
    if (mode == EPI_STORE) {
      put(r * ld + c, v);
      return;
    }
    const float g = to_f32(gu[r * 2 * h + c]), u = to_f32(gu[r * 2 * h + h + c]);
    const float sg = sigmoidf_(g);
    put(r * ld + c, v * u * sg * (1.0f + g * (1.0f - sg)));
    put(r * ld + h + c, v * g * sg);
  }
  // Columns c and c + 1 of row r, those below cols: one 2-element store where it can (plain
  // store, both inside, an address aligned to the pair: out may be a view at any element),
  // else one at a time.
  __device__ __forceinline__ void adjacent(i64 r, i64 c, float v0, float v1, float s, i64 cols) const {
    const i64 i = r * ld + c;
    const uintptr_t address = reinterpret_cast<uintptr_t>(out) + uintptr_t(i) * (out_f32 ? 4 : sizeof(T));
    if (mode == EPI_STORE && c + 1 < cols && address % (out_f32 ? 8 : 2 * sizeof(T)) == 0) {
      if (out_f32) {
        *reinterpret_cast<float2*>(static_cast<float*>(out) + i) = make_float2(v0 * s, v1 * s);
      } else {
        *reinterpret_cast<uint32_t*>(static_cast<T*>(out) + i) = f32_to_bits<T>(v0 * s) | (f32_to_bits<T>(v1 * s) << 16);
      }
      return;
    }
    if (c < cols) single(r, c, v0, s);
    if (c + 1 < cols) single(r, c + 1, v1, s);
  }
  // EPI_SWIGLU.
  __device__ __forceinline__ void pair(i64 r, i64 c, float g, float u, float s) const {
    g *= s;
    u *= s;
    if (gu != nullptr) {
      gu[r * 2 * h + c] = from_f32<T>(g);
      gu[r * 2 * h + h + c] = from_f32<T>(u);
    }
    put(r * ld + c, g * sigmoidf_(g) * u);
  }
};

// SwiGLU tiles: within each span of `span` B rows of a tile, the first half are gate rows and
// the second half the matching up rows, so one thread holds both values of an output column.
// Local B row n of a tile whose output columns start at c0 -> weight row (gate c or up h + c),
// or -1 past h.
__device__ __forceinline__ i64 swiglu_weight_row(int n, int span, i64 c0, i64 h) {
  const i64 c = c0 + (n / span) * (span / 2) + n % (span / 2);
  if (c >= h) return -1;
  return (n % span) < span / 2 ? c : h + c;
}

// How wgrad writes dB_e (grouped_gemm.cu has the contract of each mode).
enum WgradMode : int { kWgradReplace = 0, kWgradAccumulate = 1, kWgradSparse = 2 };

// Sparse mode: whether this call adds to dB_e (an earlier call of the pass wrote it), recorded
// in written[e] on the way. Called by one thread per block of expert e (the sm_90a kernel: one
// lane per consumer warp and tile); every caller of one launch gets the same answer, in any
// order, since each writes the same mark and recovers `added` from a mark of its own call.
__device__ __forceinline__ bool wgrad_mark_written(unsigned* written, int e, unsigned call) {
  const unsigned mark = (call + 1u) << 1;
  const unsigned seen = atomicOr(&written[e], 0u);  // an atomic read: other blocks write it
  const bool added = (seen & ~1u) == mark ? (seen & 1u) != 0 : seen != 0;
  atomicExch(&written[e], mark | unsigned(added));
  return added;
}
