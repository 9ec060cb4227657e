// dispatch_vec.cuh: rows of f32 / f16 / bf16 moved in 16-byte chunks and converted to and from
// f32 registers, for the dispatch row movers.
//
//   Chunk                one 16-byte access: an unsigned __int128, which nvcc keeps as one
//                        128-bit load / store (a uint4 built in registers can be split into
//                        four 32-bit stores after loop unrolling)
//   Vec<T>::N            elements per 16-byte chunk: 4 f32 or 8 f16/bf16
//   aligned16(p)         whether rows starting at p may move in 16-byte chunks
//   load_f32, store_f32  V elements as f32: V = Vec<T>::N is one 16-byte access (p 16-byte
//                        aligned), V = 1 one element (the fallback for other rows)
// Conversions round to nearest even, like every kernel's f32 -> 16-bit store.
#pragma once
#include "common.cuh"

template <class T>
struct Vec {
  static constexpr int N = 16 / int(sizeof(T));
};

// 16 bytes of a row (see the header: why an integer and not a uint4).
typedef unsigned __int128 Chunk;
__device__ __forceinline__ Chunk zero_chunk() { return Chunk(0); }

// 32-bit word i of a chunk (the lowest first: the element at the lowest address).
__device__ __forceinline__ unsigned chunk_word(Chunk c, int i) { return unsigned(c >> (32 * i)); }

// Word w of the chunk holding the values in[0..V) (V / 4 values per word, the first lowest).
template <class T, int V>
__device__ __forceinline__ Chunk pack_word(const float (&in)[V], int w) {
  if constexpr (V == 4) return Chunk(f32_to_bits<T>(in[w])) << (32 * w);
  else return Chunk(f32_to_bits<T>(in[2 * w]) | (f32_to_bits<T>(in[2 * w + 1]) << 16)) << (32 * w);
}

__device__ __forceinline__ bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

template <class T, int V>
__device__ __forceinline__ void load_f32(float (&out)[V], const T* p) {
  if constexpr (V == 1) {
    out[0] = to_f32(*p);
  } else {
    static_assert(V == Vec<T>::N, "a vector load moves 16 bytes");
    constexpr int per_word = V / 4, bits = 32 / per_word;
    const Chunk c = load_128(reinterpret_cast<const Chunk*>(p));
    for (int i = 0; i < V; ++i) {
      const unsigned word = chunk_word(c, i / per_word) >> (i % per_word * bits);
      out[i] = bits_to_f32<T>(per_word == 1 ? word : word & 0xffffu);
    }
  }
}

template <class T, int V>
__device__ __forceinline__ void store_f32(T* p, const float (&in)[V]) {
  if constexpr (V == 1) {
    *p = from_f32<T>(in[0]);
  } else {
    static_assert(V == Vec<T>::N, "a vector store moves 16 bytes");
    store_128(reinterpret_cast<Chunk*>(p),
              pack_word<T>(in, 0) | pack_word<T>(in, 1) | pack_word<T>(in, 2) | pack_word<T>(in, 3));
  }
}
