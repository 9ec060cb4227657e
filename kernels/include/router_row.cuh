// router_row.cuh: the pieces every router kernel shares. One warp owns one row of logits (the
// selection kernels give a row fewer lanes: router_select.cuh).
//
//   warp_sum / warp_max                  butterfly reductions: every lane ends with the same
//                                        bits (each step adds the same two values, commuted)
//   rank_key / rank_value                a float <-> an unsigned key whose integer order is the
//                                        routing order: NaN below -inf, -0 == +0; key 0 is
//                                        free to mean "no candidate"
//   RowSoftmax, row_softmax_*            softmax statistics over the finite logits of a row and
//                                        the non-finite-row rule (below)
//   lane_strided_read / lane_strided_write   a warp's pass over one row, 16 bytes per lane
//                                        access when the row is 16-byte aligned
//
// The non-finite-row rule (math §2, made precise): a row is *non-finite* when one of its
// logits is NaN or +inf, or none of them is finite. Such a row is routed nowhere: its k ids are
// kNoExpert (-1, which dispatch lays out nowhere and does not count as invalid) and its k
// weights NaN (so the combine makes its output row NaN), its dense probabilities are 0, it adds
// nothing to the losses and gets a zero gradient; the select kernel counts it.
// -inf logits in an otherwise finite row are ordinary (probability 0): they are how callers
// mask experts out.
#pragma once
#include "common.cuh"

constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kWarp = 32;
// Added to the denominator when k weights are renormalized (math §2).
constexpr float kRenormEpsilon = 1e-20f;

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int m = 16; m > 0; m >>= 1) v += __shfl_xor_sync(kFullMask, v, m);
  return v;
}
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int m = 16; m > 0; m >>= 1) v = fmaxf(v, __shfl_xor_sync(kFullMask, v, m));
  return v;
}

// The routing order as unsigned integers: key(a) > key(b) iff a ranks above b. NaN is 1 (below
// -inf, whose key is 0x007fffff); -0 and +0 share a key so that they tie. Never 0.
__device__ __forceinline__ unsigned rank_key(float x) {
  if (x != x) return 1u;
  const unsigned u = __float_as_uint(x == 0.0f ? 0.0f : x);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}
// The float a key came from (NaN for key 1). Not defined for key 0.
__device__ __forceinline__ float rank_value(unsigned key) {
  if (key == 1u) return __uint_as_float(kQuietNaN);
  return __uint_as_float((key & 0x80000000u) ? (key & 0x7fffffffu) : ~key);
}

// (key, element) packed so that the larger integer wins: the higher key, then the lower
// element. 0 (key 0) is "no candidate".
__device__ __forceinline__ unsigned long long pack_candidate(unsigned key, int element) {
  return key == 0u ? 0ull : ((unsigned long long)key << 32) | (0xffffffffu - unsigned(element));
}
__device__ __forceinline__ int candidate_element(unsigned long long packed) {
  return int(0xffffffffu - unsigned(packed & 0xffffffffull));
}

// Softmax statistics over a row's finite logits: p_e = exp(z_e - max) / sum.
struct RowSoftmax {
  float max;     // max over finite logits (-inf when there is none)
  float sum;     // sum of exp(z - max) over finite logits
  bool nonfinite;  // the non-finite-row rule above
};

// Per-lane partial state while a lane visits its share of the row.
struct RowMaxPartial {
  float max = -INFINITY;
  bool bad = false;  // saw NaN or +inf
  __device__ __forceinline__ void add(float z) {
    if (z != z || z == INFINITY) bad = true;
    else max = fmaxf(max, z);
  }
};
// Combines the lanes' partial maxima; the sum is added by row_softmax_finish.
__device__ __forceinline__ RowSoftmax row_softmax_max(const RowMaxPartial& p) {
  RowSoftmax s;
  s.max = warp_max(p.max);
  s.nonfinite = __any_sync(kFullMask, p.bad) || s.max == -INFINITY;
  s.sum = 0.0f;
  return s;
}
// exp(z - max) of one logit; 0 for -inf and for what the non-finite rule excludes.
__device__ __forceinline__ float row_softmax_term(const RowSoftmax& s, float z) {
  return (z > -INFINITY && z < INFINITY) ? expf(z - s.max) : 0.0f;
}
__device__ __forceinline__ float row_softmax_prob(const RowSoftmax& s, float z) {
  return s.nonfinite ? 0.0f : row_softmax_term(s, z) / s.sum;
}

// A warp's pass over row[0, E): f(e, value) for each element, lane-strided. With `vec` (E a
// multiple of 4 and row 16-byte aligned) each lane reads 4 consecutive elements at a time.
template <class F>
__device__ __forceinline__ void lane_strided_read(const float* row, int E, bool vec, F&& f) {
  const int lane = threadIdx.x % kWarp;
  if (vec) {
    for (int e = lane * 4; e < E; e += kWarp * 4) {
      const float4 q = load_128(reinterpret_cast<const float4*>(row + e));
      f(e, q.x);
      f(e + 1, q.y);
      f(e + 2, q.z);
      f(e + 3, q.w);
    }
  } else {
    for (int e = lane; e < E; e += kWarp) f(e, row[e]);
  }
}
// out[e] = f(e, in[e]) (in may be null: f(e, 0)), lane-strided, vectorized as above.
template <class F>
__device__ __forceinline__ void lane_strided_write(float* out, const float* in, int E, bool vec, F&& f) {
  const int lane = threadIdx.x % kWarp;
  if (vec) {
    for (int e = lane * 4; e < E; e += kWarp * 4) {
      float4 q = in ? load_128(reinterpret_cast<const float4*>(in + e)) : make_float4(0.f, 0.f, 0.f, 0.f);
      q = make_float4(f(e, q.x), f(e + 1, q.y), f(e + 2, q.z), f(e + 3, q.w));
      store_128(reinterpret_cast<float4*>(out + e), q);
    }
  } else {
    for (int e = lane; e < E; e += kWarp) out[e] = f(e, in ? in[e] : 0.0f);
  }
}

// Softmax statistics of a row read from global memory: the max pass, and (with_sum) the sum
// pass (L1-hot). Without the sum only `max` and `nonfinite` are valid.
__device__ __forceinline__ RowSoftmax row_softmax_global(const float* row, int E, bool vec, bool with_sum = true) {
  RowMaxPartial partial;
  lane_strided_read(row, E, vec, [&](int, float z) { partial.add(z); });
  RowSoftmax s = row_softmax_max(partial);
  if (!with_sum) return s;
  float sum = 0.0f;
  lane_strided_read(row, E, vec, [&](int, float z) { sum += row_softmax_term(s, z); });
  s.sum = warp_sum(sum);
  return s;
}
