// dispatch_vec.cuh: 16-byte row chunks of f32 / f16 / bf16 for the dispatch row movers
// (permute, combine and their backward passes), converted to and from f32 registers.
//
//   Chunk<T>             VEC = 16 / sizeof(T) elements, one load_128 / store_128 each
//   to_f32, from_f32     the storage <-> f32 conversions (round to nearest even)
//   aligned16(p)         whether rows starting at p may move in 16-byte chunks
//   load_f32, store_f32  V elements (V = VEC: one 16-byte access; V = 1: scalar) as f32
#pragma once
#include "common.cuh"

__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }

template <class T> __device__ __forceinline__ T from_f32(float v);
template <> __device__ __forceinline__ float from_f32<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_f32<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// The plain bits an element is stored as inside a Chunk (the 16-bit float classes are not
// trivially copyable on the emulator, so a 16-byte access must not memcpy into them).
template <class T> struct Raw { using type = T; };
template <> struct Raw<__half> { using type = unsigned short; };
template <> struct Raw<__nv_bfloat16> { using type = unsigned short; };

template <class T> __device__ __forceinline__ float raw_to_f32(typename Raw<T>::type r);
template <> __device__ __forceinline__ float raw_to_f32<float>(float r) { return r; }
template <> __device__ __forceinline__ float raw_to_f32<__half>(unsigned short r) {
  return __half2float(__ushort_as_half(r));
}
template <> __device__ __forceinline__ float raw_to_f32<__nv_bfloat16>(unsigned short r) {
  return __bfloat162float(__ushort_as_bfloat16(r));
}
template <class T> __device__ __forceinline__ typename Raw<T>::type f32_to_raw(float v);
template <> __device__ __forceinline__ float f32_to_raw<float>(float v) { return v; }
template <> __device__ __forceinline__ unsigned short f32_to_raw<__half>(float v) {
  return __half_as_ushort(__float2half_rn(v));
}
template <> __device__ __forceinline__ unsigned short f32_to_raw<__nv_bfloat16>(float v) {
  return __bfloat16_as_ushort(__float2bfloat16_rn(v));
}

// One 16-byte piece of a row: 4 f32 or 8 f16/bf16 values, as their bits.
template <class T>
struct __align__(16) Chunk {
  static constexpr int VEC = 16 / int(sizeof(T));
  typename Raw<T>::type v[VEC];
};

// A chunk of zero bits (0.0 in every element type).
template <class T>
__device__ __forceinline__ Chunk<T> zero_chunk() {
  Chunk<T> c;
  for (int i = 0; i < Chunk<T>::VEC; ++i) c.v[i] = 0;
  return c;
}

// True when p is 16-byte aligned: rows of a multiple of the vector width then all are.
__device__ __forceinline__ bool aligned16(const void* p) {
  return reinterpret_cast<uintptr_t>(p) % 16 == 0;
}

// V consecutive elements as f32: V = Chunk<T>::VEC is one 16-byte access (p aligned), V = 1 one
// element (the path for rows that are not 16-byte multiples or not aligned).
template <class T, int V>
__device__ __forceinline__ void load_f32(float (&out)[V], const T* p) {
  if constexpr (V == 1) {
    out[0] = to_f32(*p);
  } else {
    static_assert(V == Chunk<T>::VEC, "a vector load moves 16 bytes");
    const Chunk<T> c = load_128(reinterpret_cast<const Chunk<T>*>(p));
    for (int i = 0; i < V; ++i) out[i] = raw_to_f32<T>(c.v[i]);
  }
}
template <class T, int V>
__device__ __forceinline__ void store_f32(T* p, const float (&in)[V]) {
  if constexpr (V == 1) {
    *p = from_f32<T>(in[0]);
  } else {
    static_assert(V == Chunk<T>::VEC, "a vector store moves 16 bytes");
    Chunk<T> c;
    for (int i = 0; i < V; ++i) c.v[i] = f32_to_raw<T>(in[i]);
    store_128(reinterpret_cast<Chunk<T>*>(p), c);
  }
}
