// common.cuh: the one header every kernel file includes first.
//
// The same .cu source is compiled two ways:
//   - by nvcc for the GPU (`__CUDACC__` defined): the real CUDA headers;
//   - as host C++ for the CPU emulator (kernels/emu/cuemu.h): every CUDA thread a fiber.
// This header hides the few places where the two differ:
//   EMU_EXPORT(kernel)   one line after each `extern "C" __global__` entry point; on the
//                        emulator it publishes the kernel (name, argument sizes, launcher)
//                        to Rust, on the GPU it is nothing (the fatbin has the symbol).
//   DYN_SHARED(T, name)  `T* name` pointing at the block's dynamic shared memory.
//   i64                  the type of every element offset (64-bit, see DESIGN.md).
#pragma once
#include <stdint.h>

#ifdef __CUDACC__
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#define EMU_EXPORT(kernel)
// nvcc: extern __shared__ arrays share one address; declare a single byte array for all.
extern __shared__ __align__(16) unsigned char moe_dynamic_shared[];
#define DYN_SHARED(T, name) T* name = reinterpret_cast<T*>(moe_dynamic_shared)
#else
#include "cuemu.h"
#define EMU_EXPORT(kernel) CUEMU_EXPORT(kernel)
#define DYN_SHARED(T, name) T* name = reinterpret_cast<T*>(::cuemu::dynamic_shared())
#endif

typedef int64_t i64;

// v is neither NaN nor +-inf.
__device__ __forceinline__ bool finite_f32(float v) { return fabsf(v) <= 3.402823466e+38f; }
// An input element this large (2^64: its square overflows f32), NaN or +-inf makes its row
// non-finite (math §1): the gate writes NaN logits for it, so the router routes it nowhere.
__device__ __forceinline__ bool huge_input(float v) { return !(fabsf(v) < 18446744073709551616.0f); }
// A quiet NaN's bits.
constexpr unsigned kQuietNaN = 0x7fc00000u;

// The expert id of a slot routed nowhere (a non-finite row, math §2): dispatch lays it out
// nowhere and, unlike other ids outside [0, E), does not count it as invalid.
constexpr int kNoExpert = -1;

// One 8- or 16-byte global access (ld.global.v2 / v4, st.global.v2 / v4 on the GPU). On the
// emulator it is a single access of that width too, which the memory profiler sees as such (a
// plain struct copy would be split into its fields by the host compiler). p: aligned to the
// width; the emulator fails the launch on a misaligned p, as the GPU would.
template <class T>
__device__ __forceinline__ T load_wide(const T* p) {
  constexpr int kBytes = int(sizeof(T));
  static_assert(kBytes == 8 || kBytes == 16, "a wide load moves 8 or 16 bytes");
#ifdef __CUDACC__
  return *p;
#else
  ::cuemu::check_aligned(p, kBytes, kBytes == 16 ? "load_128" : "load_64");  // the GPU faults: "misaligned address"
  typedef int bits_t __attribute__((vector_size(kBytes)));
  const bits_t bits = *reinterpret_cast<const bits_t*>(p);
  T v;
  memcpy(&v, &bits, kBytes);
  return v;
#endif
}
template <class T>
__device__ __forceinline__ T load_128(const T* p) {
  static_assert(sizeof(T) == 16, "load_128 moves 16 bytes");
  return load_wide(p);
}
// One 8-byte load (ld.global.v2 on the GPU), as load_128 for 8 bytes.
template <class T>
__device__ __forceinline__ T load_64(const T* p) {
  static_assert(sizeof(T) == 8, "load_64 moves 8 bytes");
  return load_wide(p);
}
// One store of sizeof(T) = 8 or 16 bytes (st.v2 / st.v4 on the GPU; one access of that width
// on the emulator, which fails the launch on a misaligned p).
template <class T>
__device__ __forceinline__ void store_wide(T* p, const T& v) {
  constexpr int kBytes = int(sizeof(T));
  static_assert(kBytes == 8 || kBytes == 16, "a wide store moves 8 or 16 bytes");
#ifdef __CUDACC__
  *p = v;
#else
  ::cuemu::check_aligned(p, kBytes, kBytes == 16 ? "store_128" : "store_64");
  typedef int bits_t __attribute__((vector_size(kBytes)));
  bits_t bits;
  memcpy(&bits, &v, kBytes);
  *reinterpret_cast<bits_t*>(p) = bits;
#endif
}
template <class T>
__device__ __forceinline__ void store_128(T* p, const T& v) {
  static_assert(sizeof(T) == 16, "store_128 moves 16 bytes");
  store_wide(p, v);
}
template <class T>
__device__ __forceinline__ void store_64(T* p, const T& v) {
  static_assert(sizeof(T) == 8, "store_64 moves 8 bytes");
  store_wide(p, v);
}

// Whether p may take a 16-byte access.
__device__ __forceinline__ bool aligned_16(const void* p) {
  return (reinterpret_cast<uintptr_t>(p) & 15u) == 0;
}
// Whether p may take an access of kBytes (a power of two).
template <unsigned kBytes>
__device__ __forceinline__ bool aligned_to(const void* p) {
  return (reinterpret_cast<uintptr_t>(p) & (kBytes - 1u)) == 0;
}

// Conversions between a stored element (f32, f16, bf16) and the f32 every kernel computes in;
// to 16 bits they round to nearest even (cvt.rn), like every kernel's store.
__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }
template <class T> __device__ __forceinline__ T from_f32(float v);
template <> __device__ __forceinline__ float from_f32<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_f32<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// The same from and to an element's bits, held in the low bits of a word (for elements
// unpacked from, or packed into, a wider access).
template <class T> __device__ __forceinline__ float bits_to_f32(unsigned bits);
template <> __device__ __forceinline__ float bits_to_f32<float>(unsigned bits) { return __uint_as_float(bits); }
template <> __device__ __forceinline__ float bits_to_f32<__half>(unsigned bits) {
  return __half2float(__ushort_as_half((unsigned short)bits));
}
template <> __device__ __forceinline__ float bits_to_f32<__nv_bfloat16>(unsigned bits) {
  return __bfloat162float(__ushort_as_bfloat16((unsigned short)bits));
}
// An element's own bits, in the low bits of a word.
__device__ __forceinline__ unsigned element_bits(float v) { return __float_as_uint(v); }
__device__ __forceinline__ unsigned element_bits(__half v) { return __half_as_ushort(v); }
__device__ __forceinline__ unsigned element_bits(__nv_bfloat16 v) { return __bfloat16_as_ushort(v); }
template <class T> __device__ __forceinline__ unsigned f32_to_bits(float v);
template <> __device__ __forceinline__ unsigned f32_to_bits<float>(float v) { return __float_as_uint(v); }
template <> __device__ __forceinline__ unsigned f32_to_bits<__half>(float v) {
  return __half_as_ushort(__float2half_rn(v));
}
template <> __device__ __forceinline__ unsigned f32_to_bits<__nv_bfloat16>(float v) {
  return __bfloat16_as_ushort(__float2bfloat16_rn(v));
}

// The logistic sigmoid (SwiGLU's silu(x) = x sigmoid(x)).
__device__ __forceinline__ float sigmoidf_(float x) { return 1.0f / (1.0f + expf(-x)); }

// Global index of this thread along x, computed in 64 bits (grids of > 2^31 threads exist).
__device__ __forceinline__ i64 global_thread_x() {
  return i64(blockIdx.x) * i64(blockDim.x) + i64(threadIdx.x);
}
