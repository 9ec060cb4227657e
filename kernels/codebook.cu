// codebook.cu: codebook nearest neighbour for VQ routing (math §6), its losses and EMA update.
//
// Layouts: X [T, d] and the codebook C [Nc, d] row-major in one dtype (f32, f16, bf16); norms,
// distances, losses, gradients of C and the EMA state in f32; ids, experts, sort orders i32.
// Every sum is f32 in a fixed order; no kernel here uses atomics (the code order's counting
// sort is dispatch's routing_map, whose integer atomics only count).
//
// Kernels:
//   codebook_norms_<dt>          norms[j] = ||c_j||^2
//   codebook_nearest_top{1,8}_<dt>  fused score GEMM + running top-K (codebook_nearest.cuh)
//   codebook_merge_top{1,8}_<dt> merges the per-split lists when Nc was split across blocks
//   codebook_quantize_<dt>       q = C[id], x~ = x + c (q - x)
//   codebook_loss_partial_<dt>   per-block sums of (x - C[id])^2
//   codebook_loss_final          the VQ losses from the block sums
//   codebook_loss_bwd_<dt>       dx = dx~ + s (x - C[id])
//   codebook_sort_keys           radix digits of the ids for a stable sort by code
//   codebook_segments            token order by code and per-code offsets from the sort passes
//   codebook_code_grad_<dt>      dC_j = s * sum_{t: id_t = j} (c_j - x_t)
//   codebook_ema_counts          N_j <- g N_j + (1-g) n_j, dead codes, sum N
//   codebook_ema_codes_<dt>      M_j <- g M_j + (1-g) m_j, c_j = M_j / N^_j
#include "include/codebook_nearest.cuh"
#include "include/codebook_rows.cuh"

// ------------------------------------------------------------------------------------------
// codebook_norms_<dt>: norms[j] = sum_e c_j[e]^2.
// Mapping: a warp per code; lane l sums runs l, l + 32, ... of 16 bytes in order, then a
//   shuffle tree. Traffic: C read once, norms written once.
// Launch: grid ceil(Nc / 8), 256 threads, no shared memory.
template <class T>
__device__ __forceinline__ void norms_body(const T* codes, float* norms, int num_codes, int d) {
  constexpr int V = elems_per_16<T>;
  const int lane = threadIdx.x % 32;
  const i64 j = global_thread_x() / 32;
  if (j >= num_codes) return;  // whole warps leave together
  const bool vec = rows_aligned_16(codes, d);
  float s = 0.0f;
  for (i64 k = i64(lane) * V; k < d; k += 32 * V) {
    float v[V];
    read_run<T>(v, codes + j * d, k, d, vec);
#pragma unroll
    for (int q = 0; q < V; ++q) s += v[q] * v[q];
  }
  for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
  if (lane == 0) norms[j] = s;
}
#define NORMS(T, dt)                                                                          \
  extern "C" __global__ void codebook_norms_##dt(const T* codes, float* norms, int num_codes,  \
                                                 int d) {                                     \
    norms_body<T>(codes, norms, num_codes, d);                                                \
  }
NORMS(float, f32)
EMU_EXPORT(codebook_norms_f32)
NORMS(__half, f16)
EMU_EXPORT(codebook_norms_f16)
NORMS(__nv_bfloat16, bf16)
EMU_EXPORT(codebook_norms_bf16)

// ------------------------------------------------------------------------------------------
// codebook_nearest_top<K>_<dt>: the k <= K nearest codes of each token (codebook_nearest.cuh).
// Algorithm: per 64-token block, column tiles of 128 codes in order (this block's split: tiles
//   [y * tiles_per_split, +tiles_per_split)); scores of a tile go to shared memory and into
//   per-thread top-K lists; lists are merged per row at the end.
// Traffic: X tile read once per column tile (L2 after the first), C once per token block,
//   norms once per token block, X once more for ||x||^2 (L2-hot); outputs written once. Never a
//   [T, Nc] buffer.
// Output: partial == null (one split): ids [T, k], distances [T, k] (optional: ||x||^2 +
//   score, clamped >= 0), experts [T, k] (optional: id mod E), weights [T, k] (optional: 1);
//   a row whose nearest distance is not finite is routed nowhere (write_row) and added to
//   nonfinite_rows (optional). Else partial [splits, T, K, 2] (score bits, id) for
//   codebook_merge_top<K>_<dt>.
// Registers: top-1 capped at 128 for 2 blocks (16 warps) per SM; top-8 (16 more live values)
//   runs at one block per SM rather than spill (__launch_bounds__).
// Launch: grid (ceil(T / 64), splits), 256 threads, dynamic shared: the larger of the score
//   tile (64 * 129 * 4 bytes) and the k-tile staging it reuses (f32: 16 * (64 + 128) * 4;
//   f16/bf16: 3 stages * (64 + 128) * 40 * 2).
#define NEAREST_PARAMS(T)                                                                     \
  const T *x, const T *codes, const float *norms, int *ids, float *distances, int *experts,   \
      float *weights, unsigned *nonfinite_rows, unsigned *partial, long long tokens, int d,   \
      int num_codes, int k, int num_experts, int tiles_per_split
#define NEAREST(T, dt, K)                                                                     \
  extern "C" __global__ void __launch_bounds__(CB_THREADS, K == 1 ? 2 : 1)                   \
      codebook_nearest_top##K##_##dt(NEAREST_PARAMS(T)) {                                     \
    nearest_body<T, K>(x, codes, norms,                                                       \
                       NearestOut{ids, distances, experts, weights, nonfinite_rows, partial},  \
                       tokens, d, num_codes, k, num_experts, tiles_per_split);                \
  }
NEAREST(float, f32, 1)
EMU_EXPORT(codebook_nearest_top1_f32)
NEAREST(float, f32, 8)
EMU_EXPORT(codebook_nearest_top8_f32)
NEAREST(__half, f16, 1)
EMU_EXPORT(codebook_nearest_top1_f16)
NEAREST(__half, f16, 8)
EMU_EXPORT(codebook_nearest_top8_f16)
NEAREST(__nv_bfloat16, bf16, 1)
EMU_EXPORT(codebook_nearest_top1_bf16)
NEAREST(__nv_bfloat16, bf16, 8)
EMU_EXPORT(codebook_nearest_top8_bf16)

// codebook_merge_top<K>_<dt>: 4 threads per row t: ||x_t||^2, then the first merges the
// `splits` lists of row t (split order) and writes the row like the unsplit kernel.
// Traffic: partial read once, X once, outputs written once.
// Launch: grid ceil(4 T / 128), 128 threads.
#define MERGE_PARAMS(T)                                                                       \
  const T *x, const unsigned *partial, int *ids, float *distances, int *experts,              \
      float *weights, unsigned *nonfinite_rows, long long tokens, int d, int k, int num_experts, \
      int splits
#define MERGE(T, dt, K)                                                                       \
  extern "C" __global__ void codebook_merge_top##K##_##dt(MERGE_PARAMS(T)) {                  \
    merge_body<T, K>(x, partial, NearestOut{ids, distances, experts, weights, nonfinite_rows, \
                                            nullptr},                                         \
                     tokens, d, k, num_experts, splits);                                      \
  }
MERGE(float, f32, 1)
EMU_EXPORT(codebook_merge_top1_f32)
MERGE(float, f32, 8)
EMU_EXPORT(codebook_merge_top8_f32)
MERGE(__half, f16, 1)
EMU_EXPORT(codebook_merge_top1_f16)
MERGE(__half, f16, 8)
EMU_EXPORT(codebook_merge_top8_f16)
MERGE(__nv_bfloat16, bf16, 1)
EMU_EXPORT(codebook_merge_top1_bf16)
MERGE(__nv_bfloat16, bf16, 8)
EMU_EXPORT(codebook_merge_top8_bf16)

// ------------------------------------------------------------------------------------------
// codebook_quantize_<dt>: q[t] = C[ids[t]] and mix[t] = x[t] + c (q[t] - x[t]) (either optional).
// An id outside [0, Nc) reads a zero code row. Mapping: one thread per 16-byte run of a row,
// grid-stride. Traffic: ids, X (only for mix) and the chosen code rows read once, q/mix written
// once. Launch: any grid, 256 threads.
template <class T>
__device__ __forceinline__ void quantize_body(const T* x, const T* codes, const int* ids, T* q_out, T* mix,
                                              i64 tokens, int d, int num_codes, float c) {
  constexpr int V = elems_per_16<T>;
  const bool vec = rows_aligned_16(x, d) && rows_aligned_16(codes, d) && rows_aligned_16(q_out, d) &&
                   rows_aligned_16(mix, d);
  for_each_run<T>(tokens, d, [&](i64 t, i64 k) {
    float q[V], xv[V];
    read_run<T>(q, code_row(codes, ids[t], num_codes, d), k, d, vec);
    if (q_out) write_run<T>(q_out + t * d, k, d, vec, q);
    if (mix == nullptr) return;
    read_run<T>(xv, x + t * d, k, d, vec);
#pragma unroll
    for (int i = 0; i < V; ++i) xv[i] += c * (q[i] - xv[i]);
    write_run<T>(mix + t * d, k, d, vec, xv);
  });
}
#define QUANTIZE(T, dt)                                                                       \
  extern "C" __global__ void codebook_quantize_##dt(const T* x, const T* codes, const int* ids, \
                                                    T* q, T* mix, long long tokens, int d,    \
                                                    int num_codes, float c) {                 \
    quantize_body<T>(x, codes, ids, q, mix, tokens, d, num_codes, c);                         \
  }
QUANTIZE(float, f32)
EMU_EXPORT(codebook_quantize_f32)
QUANTIZE(__half, f16)
EMU_EXPORT(codebook_quantize_f16)
QUANTIZE(__nv_bfloat16, bf16)
EMU_EXPORT(codebook_quantize_bf16)

// ------------------------------------------------------------------------------------------
// The VQ means run over the tokens with a code (an id in [0, Nc)): a token routed nowhere (id
// kNoExpert, a non-finite row) adds nothing to a sum and is not counted, so it changes no other
// token's gradient. 2 / (live d), the gradient scale of a mean of squares over live rows of d
// (0 for none).
__device__ __forceinline__ double mean_square_gradient(i64 live, int d) {
  return live == 0 ? 0.0 : 2.0 / (double(live) * double(d));
}

// codebook_loss_partial_<dt>: partial[b] = sum over block b's runs of (x - C[id])^2 (f32; the
//   runs of a thread in grid-stride order, then block_sum), the tokens with a code only. The
//   grid size is part of the summation order: the wrapper derives it from the shape only.
// codebook_loss_final: one block; live = the tokens with a code (counted from ids);
//   losses[0] = S / (live d) (codebook), losses[1] = beta S / (live d) (commitment), S the sum of
//   partial[0 .. blocks) (strided per thread, then block_sum). No live token: NaN (an empty mean).
// Launch: partial: grid `blocks`, 256 threads, 32 bytes dynamic shared; final: 1 x 256, 32 bytes.
template <class T>
__device__ __forceinline__ void loss_partial_body(const T* x, const T* codes, const int* ids, float* partial,
                                                  i64 tokens, int d, int num_codes) {
  constexpr int V = elems_per_16<T>;
  const bool vec = rows_aligned_16(x, d) && rows_aligned_16(codes, d);
  float s = 0.0f;
  for_each_run<T>(tokens, d, [&](i64 t, i64 k) {
    const T* code = code_row(codes, ids[t], num_codes, d);
    if (code == nullptr) return;
    float q[V], xv[V];
    read_run<T>(q, code, k, d, vec);
    read_run<T>(xv, x + t * d, k, d, vec);
#pragma unroll
    for (int i = 0; i < V; ++i) s += (xv[i] - q[i]) * (xv[i] - q[i]);
  });
  s = block_sum(s);
  if (threadIdx.x == 0) partial[blockIdx.x] = s;
}
#define LOSS_PARTIAL(T, dt)                                                                   \
  extern "C" __global__ void codebook_loss_partial_##dt(const T* x, const T* codes,           \
                                                        const int* ids, float* partial,       \
                                                        long long tokens, int d, int num_codes) { \
    loss_partial_body<T>(x, codes, ids, partial, tokens, d, num_codes);                       \
  }
LOSS_PARTIAL(float, f32)
EMU_EXPORT(codebook_loss_partial_f32)
LOSS_PARTIAL(__half, f16)
EMU_EXPORT(codebook_loss_partial_f16)
LOSS_PARTIAL(__nv_bfloat16, bf16)
EMU_EXPORT(codebook_loss_partial_bf16)

extern "C" __global__ void codebook_loss_final(const float* partial, const int* ids, float* losses, int blocks,
                                               long long tokens, int d, int num_codes, float beta) {
  float s = 0.0f;
  for (int b = threadIdx.x; b < blocks; b += blockDim.x) s += partial[b];
  s = block_sum(s);
  // Integer counts: exact in any order (float block_sum of 0/1 would lose counts past 2^24).
  __shared__ unsigned long long live;
  if (threadIdx.x == 0) live = 0;
  __syncthreads();
  unsigned long long mine = 0;
  for (i64 t = threadIdx.x; t < tokens; t += blockDim.x) mine += ids[t] >= 0 && ids[t] < num_codes;
  atomicAdd(&live, mine);
  __syncthreads();
  if (threadIdx.x != 0) return;
  const float inv_count = float(1.0 / (double(live) * double(d)));  // inf for no live token
  losses[0] = s * inv_count;
  losses[1] = beta * s * inv_count;
}
EMU_EXPORT(codebook_loss_final)

// codebook_loss_bwd_<dt>: dx = dmix + scale (x - C[id]) with scale = beta * 2 / (live d), live =
//   offsets[Nc] of the code order (its count of tokens with a code); dmix is optional (the
//   straight-through gradient of the mix, passed to x unchanged), and a token without a code
//   gets dmix only. Mapping and launch as codebook_quantize.
template <class T>
__device__ __forceinline__ void loss_bwd_body(const T* x, const T* codes, const int* ids, const int* offsets,
                                              const T* dmix, T* dx, i64 tokens, int d, int num_codes, float beta) {
  constexpr int V = elems_per_16<T>;
  const bool vec = rows_aligned_16(x, d) && rows_aligned_16(codes, d) && rows_aligned_16(dmix, d) &&
                   rows_aligned_16(dx, d);
  const float scale = float(double(beta) * mean_square_gradient(offsets[num_codes], d));
  for_each_run<T>(tokens, d, [&](i64 t, i64 k) {
    float q[V], xv[V], g[V];
    const T* code = code_row(codes, ids[t], num_codes, d);
    read_run<T>(g, dmix ? dmix + t * d : nullptr, k, d, vec);
    if (code != nullptr) {
      read_run<T>(q, code, k, d, vec);
      read_run<T>(xv, x + t * d, k, d, vec);
#pragma unroll
      for (int i = 0; i < V; ++i) g[i] += scale * (xv[i] - q[i]);
    }
    write_run<T>(dx + t * d, k, d, vec, g);
  });
}
#define LOSS_BWD(T, dt)                                                                       \
  extern "C" __global__ void codebook_loss_bwd_##dt(const T* x, const T* codes, const int* ids, \
                                                    const int* offsets, const T* dmix, T* dx, \
                                                    long long tokens, int d, int num_codes,   \
                                                    float beta) {                             \
    loss_bwd_body<T>(x, codes, ids, offsets, dmix, dx, tokens, d, num_codes, beta);           \
  }
LOSS_BWD(float, f32)
EMU_EXPORT(codebook_loss_bwd_f32)
LOSS_BWD(__half, f16)
EMU_EXPORT(codebook_loss_bwd_f16)
LOSS_BWD(__nv_bfloat16, bf16)
EMU_EXPORT(codebook_loss_bwd_bf16)

// ------------------------------------------------------------------------------------------
// The token order by code: an LSD radix sort whose passes are dispatch's stable counting sort
// (routing_map, k = 1) over digit keys, so ties keep token order.
// codebook_sort_keys: keys[r] = (ids[src] >> shift) % radix with src = src_rows[r] (or r when
//   src_rows is null); radix (a dropped key) for src < 0 or an id outside [0, Nc).
//   Launch: grid ceil(n / 256), 256 threads.
extern "C" __global__ void codebook_sort_keys(const int* ids, const int* src_rows, int* keys, int n,
                                              int shift, int radix, int num_codes) {
  const i64 r = global_thread_x();
  if (r >= n) return;
  const int src = src_rows ? src_rows[r] : int(r);
  const int id = src >= 0 ? ids[src] : -1;
  keys[r] = (id >= 0 && id < num_codes) ? (id >> shift) % radix : radix;
}
EMU_EXPORT(codebook_sort_keys)

// codebook_segments: rows[r] = first[second[r]] (or first[r] without a second pass): the token
//   at sorted position r, -1 past the valid ids; offsets[j] = the first position whose code is
//   >= j, offsets[Nc] = the number of valid ids. Thread r (0..T) writes offsets[j] for j in
//   (code(r - 1), code(r)] (code(-1) = -1, code(T) = Nc, Nc for -1 rows): each exactly once.
//   Launch: grid ceil((T + 1) / 256), 256 threads.
__device__ __forceinline__ int sorted_token(const int* first, const int* second, int r) {
  const int p = second ? second[r] : r;
  return p >= 0 ? first[p] : -1;
}
__device__ __forceinline__ int sorted_code(const int* ids, const int* first, const int* second, int r,
                                           int tokens, int num_codes) {
  if (r >= tokens) return num_codes;
  const int t = sorted_token(first, second, r);
  const int id = t >= 0 ? ids[t] : num_codes;
  return (id >= 0 && id < num_codes) ? id : num_codes;
}
extern "C" __global__ void codebook_segments(const int* ids, const int* first, const int* second, int* rows,
                                             int* offsets, int tokens, int num_codes) {
  const i64 r = global_thread_x();
  if (r > tokens) return;
  if (r < tokens) rows[r] = sorted_token(first, second, int(r));
  const int code = sorted_code(ids, first, second, int(r), tokens, num_codes);
  const int prev = r == 0 ? -1 : sorted_code(ids, first, second, int(r) - 1, tokens, num_codes);
  for (int j = prev + 1; j <= code; ++j) offsets[j] = int(r);
}
EMU_EXPORT(codebook_segments)

// ------------------------------------------------------------------------------------------
// codebook_code_grad_<dt>: dC[j, :] = scale * sum_{r in segment j} (c_j - x_{rows[r]}), tokens in
//   sorted (ascending) order, scale = 2 / (live d) with live = offsets[Nc] (gridDim.x codes);
//   0 for a code no token chose. Mapping: block (j, y), thread = a 16-byte run of columns.
//   Traffic: each chosen X row read once, C and dC once.
// Launch: grid (Nc, ceil(runs / 256)), 256 threads, runs = ceil(d / elems per 16 bytes).
template <class T>
__device__ __forceinline__ void code_grad_body(const T* x, const T* codes, const int* rows, const int* offsets,
                                               float* dcodes, int d) {
  constexpr int V = elems_per_16<T>;
  const bool vec = rows_aligned_16(x, d) && rows_aligned_16(codes, d);
  const i64 j = blockIdx.x, k = code_column_run<T>();
  if (k >= d) return;
  const float scale = float(mean_square_gradient(offsets[gridDim.x], d));
  float acc[V], c[V];
  read_run<T>(c, codes + j * d, k, d, vec);
  segment_run_sum<T>(acc, x, rows, offsets, j, k, d, vec, [&](int q, float xv) { return c[q] - xv; });
#pragma unroll
  for (int q = 0; q < V; ++q)
    if (k + q < d) dcodes[j * d + k + q] = scale * acc[q];
}
#define CODE_GRAD(T, dt)                                                                      \
  extern "C" __global__ void codebook_code_grad_##dt(const T* x, const T* codes, const int* rows, \
                                                     const int* offsets, float* dcodes, int d) { \
    code_grad_body<T>(x, codes, rows, offsets, dcodes, d);                                    \
  }
CODE_GRAD(float, f32)
EMU_EXPORT(codebook_code_grad_f32)
CODE_GRAD(__half, f16)
EMU_EXPORT(codebook_code_grad_f16)
CODE_GRAD(__nv_bfloat16, bf16)
EMU_EXPORT(codebook_code_grad_bf16)

// ------------------------------------------------------------------------------------------
// codebook_ema_counts: n_j = offsets[j+1] - offsets[j]; counts[j] = decay counts[j] +
//   (1 - decay) n_j; dead[j] = counts[j] < threshold; total[0] = sum_j counts[j] (strided per
//   thread in code order, then block_sum). Launch: 1 x 256, 32 bytes dynamic shared.
extern "C" __global__ void codebook_ema_counts(const int* offsets, float* counts, unsigned char* dead,
                                               float* total, int num_codes, float decay, float threshold) {
  float s = 0.0f;
  for (int j = threadIdx.x; j < num_codes; j += blockDim.x) {
    const float n = float(offsets[j + 1] - offsets[j]);
    const float updated = decay * counts[j] + (1.0f - decay) * n;
    counts[j] = updated;
    dead[j] = updated < threshold ? 1 : 0;
    s += updated;
  }
  s = block_sum(s);
  if (threadIdx.x == 0) total[0] = s;
}
EMU_EXPORT(codebook_ema_counts)

// codebook_ema_codes_<dt>: m = sum of the code's token rows (sorted order); sums[j] = decay
//   sums[j] + (1 - decay) m; codes[j] = sums[j] / N^_j, N^_j = (N_j + eps) / (total + Nc eps)
//   * total. Mapping, traffic and launch as codebook_code_grad.
template <class T>
__device__ __forceinline__ void ema_codes_body(const T* x, const int* rows, const int* offsets, const float* counts,
                                               const float* total, float* sums, T* codes, int num_codes,
                                               int d, float decay, float eps) {
  constexpr int V = elems_per_16<T>;
  const bool vec = rows_aligned_16(x, d) && rows_aligned_16(codes, d);
  const i64 j = blockIdx.x, k = code_column_run<T>();
  if (k >= d) return;
  float m[V];
  segment_run_sum<T>(m, x, rows, offsets, j, k, d, vec, [](int, float xv) { return xv; });
  const float n_total = total[0];
  const float smoothed = (counts[j] + eps) / (n_total + float(num_codes) * eps) * n_total;
  float c[V];
#pragma unroll
  for (int q = 0; q < V; ++q) {
    float updated = 0.0f;
    if (k + q < d) {
      updated = decay * sums[j * d + k + q] + (1.0f - decay) * m[q];
      sums[j * d + k + q] = updated;
    }
    c[q] = updated / smoothed;
  }
  write_run<T>(codes + j * d, k, d, vec, c);
}
#define EMA_CODES(T, dt)                                                                      \
  extern "C" __global__ void codebook_ema_codes_##dt(const T* x, const int* rows, const int* offsets, \
                                                     const float* counts, const float* total, \
                                                     float* sums, T* codes, int num_codes, int d, \
                                                     float decay, float eps) {                \
    ema_codes_body<T>(x, rows, offsets, counts, total, sums, codes, num_codes, d, decay, eps); \
  }
EMA_CODES(float, f32)
EMU_EXPORT(codebook_ema_codes_f32)
EMA_CODES(__half, f16)
EMU_EXPORT(codebook_ema_codes_f16)
EMA_CODES(__nv_bfloat16, bf16)
EMU_EXPORT(codebook_ema_codes_bf16)
