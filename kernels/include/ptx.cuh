// ptx.cuh: the only file with inline PTX. Each wrapper has an emulated twin in
// kernels/emu (the CPU build calls ::cuemu::*), so a kernel written against these
// wrappers runs unchanged on both devices.
//
// Conventions: destination first; every wrapper is warp-synchronous where the PTX
// instruction is (`.sync.aligned`: all 32 lanes must execute it, converged).
//
// Fragment layouts (PTX ISA, "Matrix fragments for mma.m16n8k16"), g = lane/4, t = lane%4:
//   A (16x16, row-major), 4 x b32, two 16-bit values each (lower column in the low half):
//       a[i] holds row g + 8*((i>>0)&1), columns 2t, 2t+1 (+8 if i >= 2)
//   B (16x8, "col": k-major per column), 2 x b32: b[i] holds k = 2t, 2t+1 (+8 if i == 1), column g
//   C/D (16x8 f32), 4 floats: c[i] at row g (+8 if i >= 2), column 2t + (i&1)
#pragma once
#include "common.cuh"

#if defined(__CUDA_ARCH__)
__device__ __forceinline__ unsigned shared_address(const void* p) {
  return static_cast<unsigned>(__cvta_generic_to_shared(p));
}
#endif

// D = A*B + C, bf16 inputs, f32 accumulation (mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32).
__device__ __forceinline__ void mma_m16n8k16_bf16(float (&d)[4], const uint32_t (&a)[4],
                                                  const uint32_t (&b)[2], const float (&c)[4]) {
#if defined(__CUDA_ARCH__)
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
      "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%10,%11,%12,%13};\n"
      : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]),
        "f"(c[2]), "f"(c[3]));
#elif defined(CUEMU_HOST)
  ::cuemu::mma_m16n8k16(d, a, b, c, ::cuemu::MmaInput::Bf16);
#endif
}

// D = A*B + C, f16 inputs, f32 accumulation (mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32).
__device__ __forceinline__ void mma_m16n8k16_f16(float (&d)[4], const uint32_t (&a)[4],
                                                 const uint32_t (&b)[2], const float (&c)[4]) {
#if defined(__CUDA_ARCH__)
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
      "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%10,%11,%12,%13};\n"
      : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]),
        "f"(c[2]), "f"(c[3]));
#elif defined(CUEMU_HOST)
  ::cuemu::mma_m16n8k16(d, a, b, c, ::cuemu::MmaInput::F16);
#endif
}

// d += a·b in the precision of the element type T the tiles hold (__half or __nv_bfloat16),
// picked by overload on a typed null pointer so templates over T call one name.
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2], __half*) {
  mma_m16n8k16_f16(d, a, b, d);
}
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2],
                                          __nv_bfloat16*) {
  mma_m16n8k16_bf16(d, a, b, d);
}

// ldmatrix.sync.aligned.m8n8.x{1,2,4}[.trans].shared.b16: N 8x8 matrices of 16-bit values
// from shared memory. Lane l supplies the 16-byte-aligned address of row l%8 of matrix l/8
// (lanes >= 8N are ignored). Register j of lane l receives row l/4, elements 2(l%4) and
// 2(l%4)+1 of matrix j; with .trans, column l/4, rows 2(l%4) and 2(l%4)+1.
#if defined(__CUDA_ARCH__)
#define MOE_LDMATRIX(N, TRANS, REGS, ...)                                                      \
  asm volatile("ldmatrix.sync.aligned.m8n8.x" #N TRANS ".shared.b16 " REGS ", [%" #N "];\n"   \
               : __VA_ARGS__                                                                   \
               : "r"(shared_address(row)))
#endif
template <bool Trans>
__device__ __forceinline__ void ldmatrix_x1(uint32_t (&r)[1], const void* row) {
#if defined(__CUDA_ARCH__)
  if constexpr (Trans) MOE_LDMATRIX(1, ".trans", "{%0}", "=r"(r[0]));
  else MOE_LDMATRIX(1, "", "{%0}", "=r"(r[0]));
#elif defined(CUEMU_HOST)
  ::cuemu::ldmatrix(r, 1, Trans, row);
#endif
}
template <bool Trans>
__device__ __forceinline__ void ldmatrix_x2(uint32_t (&r)[2], const void* row) {
#if defined(__CUDA_ARCH__)
  if constexpr (Trans) MOE_LDMATRIX(2, ".trans", "{%0,%1}", "=r"(r[0]), "=r"(r[1]));
  else MOE_LDMATRIX(2, "", "{%0,%1}", "=r"(r[0]), "=r"(r[1]));
#elif defined(CUEMU_HOST)
  ::cuemu::ldmatrix(r, 2, Trans, row);
#endif
}
template <bool Trans>
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* row) {
#if defined(__CUDA_ARCH__)
  if constexpr (Trans)
    MOE_LDMATRIX(4, ".trans", "{%0,%1,%2,%3}", "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]));
  else MOE_LDMATRIX(4, "", "{%0,%1,%2,%3}", "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]));
#elif defined(CUEMU_HOST)
  ::cuemu::ldmatrix(r, 4, Trans, row);
#endif
}

// cp.async: an asynchronous global -> shared copy of Bytes (4, 8 or 16) bytes. Only the
// first `src_bytes` are read; the rest of the destination is zero-filled (src_bytes = 0
// is the predicated-off load that fills zeros). The data is guaranteed to have landed only
// after a cp_async_wait<N>() that covers its commit group (the emulator copies exactly
// then, so a read before the wait sees stale data, as it may on a GPU).
template <int Bytes>
__device__ __forceinline__ void cp_async(void* smem_dst, const void* gmem_src,
                                         int src_bytes = Bytes) {
  static_assert(Bytes == 4 || Bytes == 8 || Bytes == 16, "cp.async copies 4, 8 or 16 bytes");
#if defined(__CUDA_ARCH__)
  if constexpr (Bytes == 16)  // .cg (bypass L1) exists only for 16-byte copies
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(shared_address(smem_dst)),
                 "l"(gmem_src), "r"(src_bytes));
  else
    asm volatile("cp.async.ca.shared.global [%0], [%1], %2, %3;\n" ::"r"(shared_address(smem_dst)),
                 "l"(gmem_src), "n"(Bytes), "r"(src_bytes));
#elif defined(CUEMU_HOST)
  ::cuemu::cp_async(smem_dst, gmem_src, Bytes, unsigned(src_bytes));
#endif
}

// Closes the current group of cp.async copies issued by this thread.
__device__ __forceinline__ void cp_async_commit() {
#if defined(__CUDA_ARCH__)
  asm volatile("cp.async.commit_group;\n" ::);
#elif defined(CUEMU_HOST)
  ::cuemu::cp_async_commit();
#endif
}

// Waits until at most N of this thread's committed groups are still in flight.
// Other threads' copies need a __syncthreads() after it to be visible.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
#if defined(__CUDA_ARCH__)
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#elif defined(CUEMU_HOST)
  ::cuemu::cp_async_wait_group(N);
#endif
}
