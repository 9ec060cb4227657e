// gate_decode.cuh: the linear gate z = X W^T + b for a few tokens (T <= 64, the decode step).
//
// Why a second kernel: the tiled kernels (gate.cu, gate_mma.cuh) give a block to every 64
// tokens x 64 or 128 experts, so at decode a handful of blocks stream all of W, each through
// a chain of synchronous k-tiles. Here every warp streams its own slice of one expert's row,
// so all of W is in flight at once, and the slices are summed in a fixed order.
//
// Algorithm: the d inputs are cut into 16-byte chunks (V = 16 / sizeof(T) elements), and the
//   chunks into groups of 32 (512 bytes). Expert e's groups are dealt round-robin to S slices
//   (S = slices: 1, 2, 4 or 8), so every warp request is a whole group but the last; warp
//   (e, s) computes partial[t] = sum over its chunks of W_e[chunk] . x_t[chunk] for the block's
//   tokens, lane l taking chunk l of each of its groups; a butterfly (xor 16, 8, 4, 2, 1) sums
//   the lanes, then thread (e, t) adds the S partials in slice order and the bias. Every sum
//   has one order whatever the schedule: bitwise deterministic.
// Mapping: 256 threads = 8 warps; a block holds 8 / S experts (warp w: expert w / S, slice
//   w % S) and DECODE_TOKENS tokens (blockIdx.y); grid (ceil(E S / 8), ceil(T / DECODE_TOKENS)).
//   The host picks S from T: more tokens, fewer slices, so that more experts share each X
//   chunk in L1 (gate/mod.rs, `decode_slices`).
// Memory traffic: W read once per token block (once for T <= DECODE_TOKENS) as 16-byte loads,
//   a warp's 32 lanes covering 512 contiguous bytes (16 sectors per request); X, at most
//   64 x d, read by every warp of a block from L1 and by each block from L2; z written once.
// Non-finite rows (math §1): each lane flags the tokens whose chunk holds a huge_input element;
//   the flags are OR-ed like the sums, so a row is flagged wherever its bad element sits, and
//   it gets NaN for every logit.
#pragma once
#include "gate_tile.cuh"

constexpr int DECODE_TOKENS = 16;  // tokens per block: one f32 accumulator each per lane
constexpr int DECODE_WARPS = 8;

template <class T>
__device__ __forceinline__ void gate_decode_linear_body(const T* x, const T* w, const float* bias,
                                                        float* z, i64 tokens, int d, int experts,
                                                        int slices) {
  constexpr int V = elems_per_16<T>;
  __shared__ float partial[DECODE_WARPS][DECODE_TOKENS];
  __shared__ unsigned huge[DECODE_WARPS];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int per_block = DECODE_WARPS / slices;
  const int e = blockIdx.x * per_block + warp / slices, s = warp % slices;
  const i64 t0 = i64(blockIdx.y) * DECODE_TOKENS;
  const bool vec = rows_aligned_16(x, d) && rows_aligned_16(w, d);

  float acc[DECODE_TOKENS] = {};
  unsigned huge_tokens = 0;  // bit t: token t0 + t has a huge element in this lane's chunks
  if (e < experts) {
    const i64 chunks = (i64(d) + V - 1) / V;
    const T* w_row = w + i64(e) * d;
    for (i64 c = i64(s) * 32 + lane; c < chunks; c += i64(slices) * 32) {
      float wv[V];
      read_run<T>(wv, w_row, c * V, d, vec);
#pragma unroll
      for (int t = 0; t < DECODE_TOKENS; ++t) {
        if (t0 + t >= tokens) break;
        float xv[V];
        read_run<T>(xv, x + (t0 + t) * d, c * V, d, vec);
#pragma unroll
        for (int q = 0; q < V; ++q) {
          acc[t] = fmaf(wv[q], xv[q], acc[t]);
          if (huge_input(xv[q])) huge_tokens |= 1u << t;
        }
      }
    }
  }
#pragma unroll
  for (int t = 0; t < DECODE_TOKENS; ++t) {
#pragma unroll
    for (int o = 16; o > 0; o /= 2) acc[t] += __shfl_xor_sync(0xffffffffu, acc[t], o);
  }
#pragma unroll
  for (int o = 16; o > 0; o /= 2) huge_tokens |= __shfl_xor_sync(0xffffffffu, huge_tokens, o);
  if (lane == 0) {
#pragma unroll
    for (int t = 0; t < DECODE_TOKENS; ++t) partial[warp][t] = acc[t];
    huge[warp] = huge_tokens;
  }
  __syncthreads();

  // Thread (j, t): expert j of the block, token t; the slices of expert j are warps j S + s.
  const int j = threadIdx.x / DECODE_TOKENS, t = threadIdx.x % DECODE_TOKENS;
  const int out_e = blockIdx.x * per_block + j;
  if (j >= per_block || out_e >= experts || t0 + t >= tokens) return;
  float sum = 0.0f;
  unsigned flags = 0;
  for (int q = 0; q < slices; ++q) {
    sum += partial[j * slices + q][t];
    flags |= huge[j * slices + q];
  }
  z[(t0 + t) * experts + out_e] =
      (flags >> t) & 1u ? __uint_as_float(kQuietNaN) : sum + (bias ? bias[out_e] : 0.0f);
}
