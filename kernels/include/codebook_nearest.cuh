// codebook_nearest.cuh: the fused distance + top-k of the codebook family (kernels/codebook.cu).
//
// score(t, j) = ||c_j||^2 - 2 x_t . c_j   (||x_t||^2 is the same for every code: added back only
// when distances are written). Per block: 64 tokens x all (or one split's) column tiles of 128
// codes. Each column tile is a GEMM of the X tile against 128 code rows over k-tiles of d:
//   f32:      FMA tiles from gate_tile.cuh (16-wide k-tiles of f32 in shared memory; thread
//             (ty, tx) owns rows ty + 16 i, codes tx + 16 j, i < 4, j < 8);
//   f16/bf16: mma.sync m16n8k16 with f32 accumulation through mma_tile.cuh's pipelined
//             mainloop (cp.async 16-byte copies, 3 stages, ldmatrix); warp w owns rows
//             32 (w % 2) .. +32 and codes 32 (w / 2) .. +32. Needs d % 8 == 0
//             and 16-byte aligned X and C (the wrapper checks both).
// The epilogue writes the tile's scores to shared memory (never to global memory: the [T, Nc]
// matrix does not exist anywhere), and thread (row, quarter) = (tid / 4, tid % 4) folds
// columns 32 quarter .. +32 of its row into a running top-K list in registers. After the last
// column tile the four lists of a row are merged through shared memory by its quarter-0 thread.
//
// Order: entries compare by (score, code index), NaN scores after every number (a NaN never
// beats a number; NaN ties go to the lower index). It is a total order, so the lists do not
// depend on which thread or split saw a code first: the result is bitwise the same for any
// split of the codes, and ties go to the lower index.
#pragma once
#include "gate_tile.cuh"
#include "mma_tile.cuh"

constexpr int CB_THREADS = 256;
constexpr int CB_BM = 64;            // tokens per block
constexpr int CB_BN = 128;           // codes per column tile
constexpr int CB_SLD = CB_BN + 1;    // floats per shared score row (odd: fewer bank conflicts)
constexpr int CB_QUARTER = CB_BN / 4;  // columns each of a row's four threads folds
// The 16-bit score tile on mma_tile.cuh: 64 tokens x 128 codes, k-tiles of 32, 2 x 4 warps of
// 32 x 32 (two m16 by four n8 fragments: 4 ldmatrix.x4 feed 8 mma per k16 step), a 3-stage
// cp.async pipeline (45 KiB of shared memory, which the score tile reuses).
using CbMmaTile = MmaTile<CB_BM, CB_BN, 32, 2, 4, 3>;
static_assert(CbMmaTile::THREADS == CB_THREADS, "one thread count");

// True when (s, i) ranks before (u, j): smaller score, NaN last, then lower index.
__device__ __forceinline__ bool ranks_before(float s, int i, float u, int j) {
  const bool s_nan = s != s, u_nan = u != u;
  if (s_nan != u_nan) return u_nan;
  if (!s_nan && s != u) return s < u;
  return i < j;
}

// The K best (score, code) entries seen so far, sorted. An empty slot (NaN, INT_MAX) ranks
// after every real entry, a NaN one included.
template <int K> struct TopK {
  float score[K];
  int id[K];
  __device__ __forceinline__ void clear() {
#pragma unroll
    for (int i = 0; i < K; ++i) {
      score[i] = __int_as_float(0x7fc00000);
      id[i] = 0x7fffffff;
    }
  }
  // Inserts (s, j): it bubbles down the sorted list, pushing worse entries one place on.
  // Most candidates rank after the last entry: one comparison turns them away.
  __device__ __forceinline__ void push(float s, int j) {
    if (!ranks_before(s, j, score[K - 1], id[K - 1])) return;
#pragma unroll
    for (int i = 0; i < K; ++i) {
      if (ranks_before(s, j, score[i], id[i])) {
        const float ts = score[i];
        const int tj = id[i];
        score[i] = s;
        id[i] = j;
        s = ts;
        j = tj;
      }
    }
  }
};

// The outputs of one nearest-code call (nullable ones: not asked for).
struct NearestOut {
  int* ids;          // [T, k]
  float* distances;  // [T, k] or null
  int* experts;      // [T, k] or null
  float* weights;    // [T, k] or null: 1, or NaN for a row routed nowhere
  unsigned* nonfinite_rows;  // [1] or null: rows routed nowhere are added to it
  unsigned* partial; // [splits, T, K, 2] (score bits, id) when the codes are split, else null
};

// ||x_t||^2 in f32 by the 4 adjacent lanes (quarter = lane % 4) that own row t: lane q sums
// the 16-byte runs q, q + 4, ... in order, then two xor shuffles add the four partial sums (the
// same bits in every lane: the additions commute). Both the unsplit kernel and the merge call
// it, so split and unsplit distances are bitwise equal. All 32 lanes must call it; a lane with
// live == false adds 0.
template <class T>
__device__ __forceinline__ float row_norm_quad(const T* x, i64 t, int d, int quarter, bool live) {
  constexpr int V = elems_per_16<T>;
  const bool vec = rows_aligned_16(x, d);
  float s = 0.0f;
  for (i64 k = i64(quarter) * V; live && k < d; k += 4 * V) {
    float v[V];
    read_run<T>(v, x + t * d, k, d, vec);
#pragma unroll
    for (int q = 0; q < V; ++q) s += v[q] * v[q];
  }
  s += __shfl_xor_sync(0xffffffffu, s, 1);
  s += __shfl_xor_sync(0xffffffffu, s, 2);
  return s;
}

// Writes the first k entries of a finished row t: ids, distances (score + ||x||^2 = xn, clamped
// at 0), experts (id mod E), weights (1). A row whose nearest distance is not finite (x holds a
// NaN or an infinity, or ||x||^2 overflows f32) is routed nowhere, as a non-finite row of logits
// is: ids and experts kNoExpert, distances and weights NaN, and it is counted.
template <int K>
__device__ __forceinline__ void write_row(const TopK<K>& best, float xn, i64 t, int k, int num_experts,
                                          const NearestOut& out) {
  const float nearest = best.score[0] + xn;
  const bool nowhere = !(nearest - nearest == 0.0f);  // NaN or an infinity
  const float nan = __uint_as_float(kQuietNaN);
  if (nowhere && out.nonfinite_rows) atomicAdd(out.nonfinite_rows, 1u);
#pragma unroll
  for (int i = 0; i < K; ++i) {
    if (i >= k) break;
    out.ids[t * k + i] = nowhere ? kNoExpert : best.id[i];
    if (out.distances) {
      const float dist = best.score[i] + xn;
      out.distances[t * k + i] = nowhere ? nan : dist < 0.0f ? 0.0f : dist;
    }
    if (out.experts) out.experts[t * k + i] = nowhere ? kNoExpert : best.id[i] % num_experts;
    if (out.weights) out.weights[t * k + i] = nowhere ? nan : 1.0f;
  }
}

// Fills scores[r * CB_SLD + c] = ||c_{c0+c}||^2 - 2 x_{t0+r} . c_{c0+c} for the 64 x 128 tile
// (rows past T and codes past Nc load as zero rows; nobody reads their scores).
// Ends with a barrier: the scores are visible to every thread. `scores` and the k-tile staging
// `operands` may overlap: the staging is dead once the tile's sums are in registers.
template <class T>
__device__ __forceinline__ void score_tile(float* scores, void* operands, const T* x, const T* codes,
                                           const float* norms, i64 t0, int c0, i64 tokens,
                                           int num_codes, int d, bool vec) {
  auto x_row = [&](int m) -> const T* { return t0 + m < tokens ? x + (t0 + m) * d : nullptr; };
  auto code_row = [&](int n) -> const T* {
    return c0 + n < num_codes ? codes + i64(c0 + n) * d : nullptr;
  };
  if constexpr (sizeof(T) == 4) {
    float* As = static_cast<float*>(operands);  // [GATE_BK][64] X
    float* Bs = As + GATE_BK * CB_BM;           // [GATE_BK][128] codes
    const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
    float acc[4][8] = {};
    for (i64 k0 = 0; k0 < d; k0 += GATE_BK) {
      __syncthreads();  // the previous k-tile (and the previous column tile's scores) consumed
      load_tile_k_contiguous<T>(As, CB_BM, CB_BM, x_row, k0, d, vec);
      load_tile_k_contiguous<T>(Bs, CB_BN, CB_BN, code_row, k0, d, vec);
      __syncthreads();
      tile_fma<4, 8, 1>(acc, As, CB_BM, Bs, CB_BN, ty, tx);
    }
    __syncthreads();  // every thread is done with the staging the scores overwrite
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const int n = tx + 16 * j;
      const float norm = c0 + n < num_codes ? norms[c0 + n] : 0.0f;
#pragma unroll
      for (int i = 0; i < 4; ++i) scores[(ty + 16 * i) * CB_SLD + n] = norm - 2.0f * acc[i][j];
    }
  } else {
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    float acc[CbMmaTile::MI][CbMmaTile::NI][4] = {};
    cta_tile_mainloop<CbMmaTile>(acc, x_row, code_row, d, static_cast<T*>(operands), x);
    const AccCoord<CbMmaTile> at(warp % CbMmaTile::WARPS_M, warp / CbMmaTile::WARPS_M, lane);
#pragma unroll
    for (int ni = 0; ni < CbMmaTile::NI; ++ni) {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int n = at.col(ni, i);
        const float norm = c0 + n < num_codes ? norms[c0 + n] : 0.0f;
#pragma unroll
        for (int mi = 0; mi < CbMmaTile::MI; ++mi)
          scores[at.row(mi, i) * CB_SLD + n] = norm - 2.0f * acc[mi][ni][i];
      }
    }
  }
  __syncthreads();
}

// The body of codebook_nearest_top<K>_<dtype>: see codebook.cu for the launch contract.
template <class T, int K>
__device__ __forceinline__ void nearest_body(const T* x, const T* codes, const float* norms, NearestOut out,
                                             i64 tokens, int d, int num_codes, int k, int num_experts,
                                             int tiles_per_split) {
  DYN_SHARED(float, smem);
  float* scores = smem;  // [64][CB_SLD], over the k-tile staging of score_tile
  void* operands = smem;
  const i64 t0 = i64(blockIdx.x) * CB_BM;
  const int col_tiles = (num_codes + CB_BN - 1) / CB_BN;
  const int tile_begin = blockIdx.y * tiles_per_split;
  const int tile_end = min(col_tiles, tile_begin + tiles_per_split);
  const bool vec = rows_aligned_16(x, d) && rows_aligned_16(codes, d);
  const int row = threadIdx.x / 4, quarter = threadIdx.x % 4;

  TopK<K> best;
  best.clear();
  for (int tile = tile_begin; tile < tile_end; ++tile) {
    const int c0 = tile * CB_BN;
    score_tile<T>(scores, operands, x, codes, norms, t0, c0, tokens, num_codes, d, vec);
    for (int c = 0; c < CB_QUARTER; ++c) {
      const int n = quarter * CB_QUARTER + c;
      if (c0 + n < num_codes) best.push(scores[row * CB_SLD + n], c0 + n);
    }
  }

  // Merge the four quarter lists of each row: [row][quarter][K] scores, then ids.
  __syncthreads();  // every thread is done with the last score tile
  float* list_score = smem;
  int* list_id = reinterpret_cast<int*>(smem + CB_BM * 4 * K);
#pragma unroll
  for (int i = 0; i < K; ++i) {
    list_score[(row * 4 + quarter) * K + i] = best.score[i];
    list_id[(row * 4 + quarter) * K + i] = best.id[i];
  }
  __syncthreads();
  const i64 t = t0 + row;
  const bool finish = out.partial == nullptr;  // uniform: one split writes the outputs
  const float xn = finish ? row_norm_quad(x, t, d, quarter, t < tokens) : 0.0f;
  if (quarter != 0 || t >= tokens) return;
  for (int q = 1; q < 4; ++q) {
#pragma unroll
    for (int i = 0; i < K; ++i) best.push(list_score[(row * 4 + q) * K + i], list_id[(row * 4 + q) * K + i]);
  }
  if (finish) {
    write_row<K>(best, xn, t, k, num_experts, out);
    return;
  }
  unsigned* mine = out.partial + (i64(blockIdx.y) * tokens + t) * (2 * K);
#pragma unroll
  for (int i = 0; i < K; ++i) {
    mine[2 * i] = __float_as_uint(best.score[i]);
    mine[2 * i + 1] = unsigned(best.id[i]);
  }
}

// The body of codebook_merge_top<K>_<dtype>: the 4 threads of row t (global thread / 4) compute
// ||x_t||^2; the first merges the splits' lists of row t in
// split order and finishes the row.
template <class T, int K>
__device__ __forceinline__ void merge_body(const T* x, const unsigned* partial, NearestOut out, i64 tokens,
                                           int d, int k, int num_experts, int splits) {
  const i64 t = global_thread_x() / 4;
  const int quarter = threadIdx.x % 4;
  const float xn = row_norm_quad(x, t, d, quarter, t < tokens);
  if (quarter != 0 || t >= tokens) return;
  TopK<K> best;
  best.clear();
  for (int s = 0; s < splits; ++s) {
    const unsigned* list = partial + (i64(s) * tokens + t) * (2 * K);
#pragma unroll
    for (int i = 0; i < K; ++i) best.push(__uint_as_float(list[2 * i]), int(list[2 * i + 1]));
  }
  write_row<K>(best, xn, t, k, num_experts, out);
}
