// codebook_rows.cuh: the row-wise pieces of the codebook family (kernels/codebook.cu):
// 16-byte runs of a row (read with gate_tile.cuh's read_run, written with write_run below),
// a fixed-order block sum, and the per-code segment sums over tokens sorted by code.
#pragma once
#include "gate_tile.cuh"

// Writes V = elems_per_16<S> values to p[k .. k+V): one 16-byte store when `vec` (p + k aligned)
// and the whole run lies below `len`, else element by element up to `len`.
template <class S>
__device__ __forceinline__ void write_run(S* p, i64 k, i64 len, bool vec, const float (&v)[elems_per_16<S>]) {
  constexpr int V = elems_per_16<S>, PER_WORD = 4 / int(sizeof(S));
  if (vec && k + V <= len) {
    Raw16 raw = {{0u, 0u, 0u, 0u}};
#pragma unroll
    for (int q = 0; q < V; ++q) raw.w[q / PER_WORD] |= f32_to_bits<S>(v[q]) << (32 / PER_WORD * (q % PER_WORD));
    store_128(reinterpret_cast<Raw16*>(p + k), raw);
  } else {
#pragma unroll
    for (int q = 0; q < V; ++q)
      if (k + q < len) p[k + q] = from_f32<S>(v[q]);
  }
}

// Row `id` of the codebook, or null (a row of zeros to read_run) for an id outside [0, Nc):
// ids live on the device, so the host cannot reject them; no kernel indexes with a bad one.
template <class T>
__device__ __forceinline__ const T* code_row(const T* codes, int id, int num_codes, int d) {
  return (id >= 0 && id < num_codes) ? codes + i64(id) * d : nullptr;
}

// Calls f(t, k) for every run (token t, first element k) of a [tokens, d] tensor in runs of
// elems_per_16<S>, grid-stride: each thread visits its runs in a fixed order.
template <class S, class F>
__device__ __forceinline__ void for_each_run(i64 tokens, int d, F f) {
  constexpr int V = elems_per_16<S>;
  const i64 runs = (d + V - 1) / V;
  const i64 stride = i64(gridDim.x) * i64(blockDim.x);
  for (i64 item = global_thread_x(); item < tokens * runs; item += stride) {
    const i64 t = item / runs;
    f(t, (item - t * runs) * V);
  }
}

// The sum of v over a block of blockDim.x (a multiple of 32, <= 1024) threads in a fixed
// order: a shuffle tree in each warp, then the warp sums in warp order. Valid in thread 0.
// Needs blockDim.x / 32 floats of dynamic shared memory.
__device__ __forceinline__ float block_sum(float v) {
  DYN_SHARED(float, warp_sums);
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  if (threadIdx.x % 32 == 0) warp_sums[threadIdx.x / 32] = v;
  __syncthreads();
  float s = 0.0f;
  if (threadIdx.x == 0)
    for (int w = 0; w < int(blockDim.x / 32); ++w) s += warp_sums[w];
  return s;
}

// The first column of this thread's 16-byte run in the per-code kernels: block (j, y), thread
// i covers columns (y * blockDim.x + i) * V .. +V.
template <class T>
__device__ __forceinline__ i64 code_column_run() {
  return (i64(blockIdx.y) * blockDim.x + threadIdx.x) * elems_per_16<T>;
}

// acc[q] = sum of term(q, x_t[k + q]) over the tokens t = rows[offsets[j] .. offsets[j+1]) of
// code j, in that order (tokens ascending within a code: a fixed order).
template <class T, class F>
__device__ __forceinline__ void segment_run_sum(float (&acc)[elems_per_16<T>], const T* x, const int* rows,
                                                const int* offsets, i64 j, i64 k, int d, bool vec, F term) {
  constexpr int V = elems_per_16<T>;
#pragma unroll
  for (int q = 0; q < V; ++q) acc[q] = 0.0f;
  for (int r = offsets[j]; r < offsets[j + 1]; ++r) {
    float v[V];
    read_run<T>(v, x + i64(rows[r]) * d, k, d, vec);
#pragma unroll
    for (int q = 0; q < V; ++q) acc[q] += term(q, v[q]);
  }
}
