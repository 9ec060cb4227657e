// mix.cu: the VQ-MoE mixing gate (math §6, last bullet): per token t, from the gate's two logits
// l_t = (l0, l1) (f32, [T, 2]),
//   [a0, a1] = softmax(l_t), computed as a0 = sigmoid(l0 - l1), a1 = sigmoid(l1 - l0)
//   forward:  y = a0·y_cont + a1·y_disc                                   ([T, d] rows)
//   backward: dy_cont = a0·dy, dy_disc = a1·dy,
//             da0 = <dy, y_cont>, da1 = <dy, y_disc>,
//             dl0 = a0 a1 (da0 - da1), dl1 = -dl0                        (softmax backward, f32)
// Non-finite logits: the difference l0 - l1 decides. A NaN logit, or two equal infinities
// (inf - inf), makes a0 = a1 = NaN: the token's y is NaN, and the mix routes it nowhere (math
// §2): its dy_cont, dy_disc and dl are exactly 0, so it adds nothing to either path's or the
// gate's gradients. One infinite logit against a finite one gives the limit (1, 0) or (0, 1).
//
// Layout: rows of d elements of T (f32, f16, bf16), row-major; f32 arithmetic; element offsets
// 64-bit. A row moves in 16-byte chunks when d is a multiple of 16 bytes and every row pointer is
// 16-byte aligned, else one element at a time (dispatch_vec.cuh).
// Mapping: one warp per token (grid-stride over tokens); lane l takes chunks l, l + 32, ...
// The two dot products of the backward are per-lane sums in column order, then a fixed xor
// butterfly: deterministic, no atomics.
//
// Kernels (T in f32, f16, bf16):
//   mix_forward_<T>    y from logits, y_cont, y_disc
//   mix_backward_<T>   dy_cont, dy_disc, dlogits from logits, y_cont, y_disc, dy
#include "dispatch_vec.cuh"

constexpr unsigned kMixFullMask = 0xffffffffu;

// The two gate weights of token t (see the header for non-finite logits).
struct MixWeights {
  float a0, a1;
};
__device__ __forceinline__ MixWeights mix_weights(const float* logits, i64 t) {
  const float diff = logits[2 * t] - logits[2 * t + 1];
  return {1.0f / (1.0f + expf(-diff)), 1.0f / (1.0f + expf(diff))};
}
// The weights the backward uses: (0, 0) for a token the mix routes nowhere (NaN weights), so
// its gradients are exact zeros whatever dy holds.
__device__ __forceinline__ MixWeights mix_backward_weights(const float* logits, i64 t) {
  const MixWeights a = mix_weights(logits, t);
  return a.a0 == a.a0 ? a : MixWeights{0.0f, 0.0f};
}

// Lane `lane`'s share of one row: y = a0·cont + a1·disc.
template <class T, int V>
__device__ __forceinline__ void mix_row(const T* cont, const T* disc, MixWeights a, int d, T* y, int lane) {
  for (int c = lane * V; c < d; c += 32 * V) {
    float u[V], v[V];
    load_f32<T, V>(u, cont + c);
    load_f32<T, V>(v, disc + c);
    for (int i = 0; i < V; ++i) u[i] = a.a0 * u[i] + a.a1 * v[i];
    store_f32<T, V>(y + c, u);
  }
}

// Lane `lane`'s share of one row's backward: dcont = a0·dy, ddisc = a1·dy, and its parts of
// <dy, cont> and <dy, disc> in column order.
template <class T, int V>
__device__ __forceinline__ float2 mix_row_backward(const T* cont, const T* disc, const T* dy, MixWeights a, int d,
                                                   T* dcont, T* ddisc, int lane) {
  float2 dots = make_float2(0.0f, 0.0f);
  for (int c = lane * V; c < d; c += 32 * V) {
    float g[V], v[V];
    load_f32<T, V>(g, dy + c);
    load_f32<T, V>(v, cont + c);
    for (int i = 0; i < V; ++i) dots.x += g[i] * v[i];
    load_f32<T, V>(v, disc + c);
    for (int i = 0; i < V; ++i) dots.y += g[i] * v[i];
    for (int i = 0; i < V; ++i) v[i] = a.a0 == 0.0f ? 0.0f : a.a0 * g[i];
    store_f32<T, V>(dcont + c, v);
    for (int i = 0; i < V; ++i) v[i] = a.a1 == 0.0f ? 0.0f : a.a1 * g[i];
    store_f32<T, V>(ddisc + c, v);
  }
  return dots;
}

// The token range of this warp: tokens warp_id, warp_id + warps, ...
__device__ __forceinline__ i64 first_token() { return i64(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32; }
__device__ __forceinline__ i64 token_stride() { return i64(gridDim.x) * (blockDim.x / 32); }

template <class T>
__device__ __forceinline__ void mix_forward(const float* logits, const T* cont, const T* disc, i64 tokens, int d,
                                            T* y) {
  const int lane = threadIdx.x % 32;
  const bool vec = d % Vec<T>::N == 0 && aligned16(cont) && aligned16(disc) && aligned16(y);
  for (i64 t = first_token(); t < tokens; t += token_stride()) {
    const MixWeights a = mix_weights(logits, t);
    const i64 row = t * d;
    if (vec) mix_row<T, Vec<T>::N>(cont + row, disc + row, a, d, y + row, lane);
    else mix_row<T, 1>(cont + row, disc + row, a, d, y + row, lane);
  }
}

template <class T>
__device__ __forceinline__ void mix_backward(const float* logits, const T* cont, const T* disc, const T* dy,
                                             i64 tokens, int d, T* dcont, T* ddisc, float* dlogits) {
  const int lane = threadIdx.x % 32;
  const bool vec = d % Vec<T>::N == 0 && aligned16(cont) && aligned16(disc) && aligned16(dy) &&
                   aligned16(dcont) && aligned16(ddisc);
  for (i64 t = first_token(); t < tokens; t += token_stride()) {
    const MixWeights a = mix_backward_weights(logits, t);
    const i64 row = t * d;
    float2 dots = vec ? mix_row_backward<T, Vec<T>::N>(cont + row, disc + row, dy + row, a, d, dcont + row,
                                                       ddisc + row, lane)
                      : mix_row_backward<T, 1>(cont + row, disc + row, dy + row, a, d, dcont + row, ddisc + row,
                                               lane);
    for (int m = 16; m > 0; m >>= 1) {  // fixed butterfly: every lane ends with the same sums
      dots.x += __shfl_xor_sync(kMixFullMask, dots.x, m);
      dots.y += __shfl_xor_sync(kMixFullMask, dots.y, m);
    }
    if (lane == 0) {
      const float g = a.a0 * a.a1 == 0.0f ? 0.0f : a.a0 * a.a1 * (dots.x - dots.y);
      dlogits[2 * t] = g;
      dlogits[2 * t + 1] = -g;
    }
  }
}

// mix_forward_<T>(logits [T, 2], y_cont [T, d], y_disc [T, d], tokens, d, y [T, d])
// Launch: any grid, blockDim.x a multiple of 32. Traffic: logits, y_cont, y_disc read once, y
// written once.
#define MIX_FORWARD(SUFFIX, T)                                                                         \
  extern "C" __global__ void mix_forward_##SUFFIX(const float* logits, const T* y_cont, const T* y_disc, \
                                                  long long tokens, int d, T* y) {                     \
    mix_forward<T>(logits, y_cont, y_disc, tokens, d, y);                                              \
  }
MIX_FORWARD(f32, float)
EMU_EXPORT(mix_forward_f32)
MIX_FORWARD(f16, __half)
EMU_EXPORT(mix_forward_f16)
MIX_FORWARD(bf16, __nv_bfloat16)
EMU_EXPORT(mix_forward_bf16)

// mix_backward_<T>(logits [T, 2], y_cont [T, d], y_disc [T, d], dy [T, d], tokens, d,
//                  dy_cont [T, d], dy_disc [T, d], dlogits [T, 2] f32)
// Launch: any grid, blockDim.x a multiple of 32. Traffic: logits, y_cont, y_disc, dy read once;
// dy_cont, dy_disc, dlogits written once.
#define MIX_BACKWARD(SUFFIX, T)                                                                              \
  extern "C" __global__ void mix_backward_##SUFFIX(const float* logits, const T* y_cont, const T* y_disc,     \
                                                   const T* dy, long long tokens, int d, T* dy_cont,          \
                                                   T* dy_disc, float* dlogits) {                              \
    mix_backward<T>(logits, y_cont, y_disc, dy, tokens, d, dy_cont, dy_disc, dlogits);                       \
  }
MIX_BACKWARD(f32, float)
EMU_EXPORT(mix_backward_f32)
MIX_BACKWARD(f16, __half)
EMU_EXPORT(mix_backward_f16)
MIX_BACKWARD(bf16, __nv_bfloat16)
EMU_EXPORT(mix_backward_bf16)
