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

// D = A*B + C, tf32 inputs, f32 accumulation (mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32).
// Fragments (g = lane/4, t = lane%4), each register one tf32 value (cvt_rna_tf32, or an f16/bf16
// value widened to f32, whose low 13 bits are already zero):
//   A (16x8, row-major): a[i] at row g (+8 if i is odd), column t (+4 if i >= 2)
//   B (8x8, "col"): b[i] at k = t + 4i, column g;   C/D: as for m16n8k16
__device__ __forceinline__ void mma_m16n8k8_tf32(float (&d)[4], const uint32_t (&a)[4],
                                                 const uint32_t (&b)[2], const float (&c)[4]) {
#if defined(__CUDA_ARCH__)
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 "
      "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%10,%11,%12,%13};\n"
      : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]),
        "f"(c[2]), "f"(c[3]));
#elif defined(CUEMU_HOST)
  ::cuemu::mma_m16n8k8_tf32(d, a, b, c);
#endif
}

// cvt.rna.tf32.f32: x rounded to tf32 (nearest, ties away from zero), as the b32 register an
// mma .tf32 operand takes. x - (the result) is exact in f32, which is how a kernel splits an
// f32 value into two tf32 terms.
__device__ __forceinline__ uint32_t cvt_rna_tf32(float x) {
#if defined(__CUDA_ARCH__)
  uint32_t r;
  asm("cvt.rna.tf32.f32 %0, %1;\n" : "=r"(r) : "f"(x));
  return r;
#elif defined(CUEMU_HOST)
  return ::cuemu::float_to_tf32_bits(x);
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

// ==========================================================================================
// Hopper's asynchronous data movement (sm_90): mbarrier, TMA, bulk copies. The emulated
// twins and their model are in kernels/emu/hopper_async.{h,cpp}. Every kernel file is also
// compiled for sm_80, where these instructions do not exist: there the wrappers trap, and a
// kernel that needs them must not be launched (the runtime picks the sm_90a image on sm_90).
//
// Host wrappers take the caller's file and line (defaulted, never written by kernels) so that
// the emulator's errors name the kernel's line.
#if defined(CUEMU_HOST)
#define MOE_SITE_PARAMS , const char* site_file = __builtin_FILE(), int site_line = __builtin_LINE()
#define MOE_SITE ::cuemu::Site{site_file, site_line}
#define MOE_SITE_FORWARD , site_file, site_line
#else
#define MOE_SITE_PARAMS
#define MOE_SITE_FORWARD
#endif
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#define MOE_SM90 1
#endif

// A tensor map as a kernel parameter: `const __grid_constant__ TensorMap map`, passed by the
// Rust launcher (src/device/tensor_map.rs) and addressed as `&map`. On the GPU its bytes are
// what cuTensorMapEncodeTiled wrote; on the emulator a cuemu::EmuTensorMap.
struct alignas(64) TensorMap {
  uint64_t opaque[16];
};

// ------------------------------------------------------------------ mbarrier
// A 64-bit shared-memory object counting arrivals (and transaction bytes) per phase. A phase
// completes when `count` threads have arrived and every byte announced with expect_tx has
// landed; then the next phase begins with the same count. Waits name a phase by its parity:
// wait(p) returns once the phase of parity p has completed (so on a fresh barrier wait(1)
// returns at once: "the phase before phase 0" is complete).

// mbarrier.init.shared::cta.b64: expects `count` arrivals per phase (1..2^20-1). Make the
// initialisation visible (__syncthreads) before another thread uses the barrier.
__device__ __forceinline__ void mbarrier_init(uint64_t* bar, unsigned count MOE_SITE_PARAMS) {
#if defined(MOE_SM90)
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(shared_address(bar)), "r"(count) : "memory");
#elif defined(__CUDA_ARCH__)
  __trap();
#elif defined(CUEMU_HOST)
  ::cuemu::mbarrier_init(bar, count, MOE_SITE);
#endif
}

// mbarrier.arrive.shared::cta.b64: one arrival (release semantics: this thread's earlier
// writes are visible to whoever waits on the phase).
__device__ __forceinline__ void mbarrier_arrive(uint64_t* bar MOE_SITE_PARAMS) {
#if defined(MOE_SM90)
  asm volatile("{\n .reg .b64 state;\n mbarrier.arrive.shared::cta.b64 state, [%0];\n}\n" ::"r"(shared_address(bar))
               : "memory");
#elif defined(__CUDA_ARCH__)
  __trap();
#elif defined(CUEMU_HOST)
  ::cuemu::mbarrier_arrive(bar, 0, MOE_SITE);
#endif
}

// mbarrier.arrive.expect_tx.shared::cta.b64: announce `tx_bytes` more bytes for the current
// phase (the copies that will complete them) and arrive.
__device__ __forceinline__ void mbarrier_arrive_expect_tx(uint64_t* bar, unsigned tx_bytes MOE_SITE_PARAMS) {
#if defined(MOE_SM90)
  asm volatile("{\n .reg .b64 state;\n mbarrier.arrive.expect_tx.shared::cta.b64 state, [%0], %1;\n}\n" ::"r"(
                   shared_address(bar)),
               "r"(tx_bytes)
               : "memory");
#elif defined(__CUDA_ARCH__)
  __trap();
#elif defined(CUEMU_HOST)
  ::cuemu::mbarrier_arrive(bar, tx_bytes, MOE_SITE);
#endif
}

// mbarrier.{try,test}_wait.parity.shared::cta.b64 (acquire semantics): true once the phase
// of `parity` has completed. try_wait may wait a while first; test_wait looks and returns.
#if defined(MOE_SM90)
#define MOE_MBARRIER_POLL(OP)                                                                   \
  asm volatile("{\n .reg .pred p;\n mbarrier." OP ".parity.shared::cta.b64 p, [%1], %2;\n"    \
               " selp.u32 %0, 1, 0, p;\n}\n"                                                  \
               : "=r"(done)                                                                     \
               : "r"(shared_address(bar)), "r"(parity)                                          \
               : "memory")
#endif
template <bool Try>
__device__ __forceinline__ bool mbarrier_poll_parity(uint64_t* bar, unsigned parity MOE_SITE_PARAMS) {
#if defined(MOE_SM90)
  unsigned done;
  if constexpr (Try) MOE_MBARRIER_POLL("try_wait");
  else MOE_MBARRIER_POLL("test_wait");
  return done != 0;
#elif defined(__CUDA_ARCH__)
  __trap();
  return false;
#elif defined(CUEMU_HOST)
  return Try ? ::cuemu::mbarrier_try_wait_parity(bar, parity, MOE_SITE)
             : ::cuemu::mbarrier_test_wait_parity(bar, parity, MOE_SITE);
#endif
}
// The GPU's try_wait may give up after a time and return false, so callers loop (as
// mbarrier_wait below does).
__device__ __forceinline__ bool mbarrier_try_wait_parity(uint64_t* bar, unsigned parity MOE_SITE_PARAMS) {
  return mbarrier_poll_parity<true>(bar, parity MOE_SITE_FORWARD);
}
__device__ __forceinline__ bool mbarrier_test_wait_parity(uint64_t* bar, unsigned parity MOE_SITE_PARAMS) {
  return mbarrier_poll_parity<false>(bar, parity MOE_SITE_FORWARD);
}

// Waits until the phase of `parity` has completed.
__device__ __forceinline__ void mbarrier_wait(uint64_t* bar, unsigned parity MOE_SITE_PARAMS) {
  while (!mbarrier_try_wait_parity(bar, parity MOE_SITE_FORWARD)) {}
}

// ------------------------------------------------------------------ TMA and bulk copies
// cp.async.bulk.tensor.Nd.shared::cluster.global.tile.mbarrier::complete_tx::bytes: the box
// of the tensor map at element coordinates `c` (dimension 0 first; negative or past the end is
// allowed: those elements are zero-filled) into shared memory at `smem_dst` (128-byte aligned,
// and aligned to the swizzle's repeat), laid out densely with dimension 0 fastest and then
// swizzled (swizzle.cuh). The box's bytes, out-of-bounds ones included, complete tx-count on
// `bar`: announce them with mbarrier_arrive_expect_tx and read the tile only after the wait.
#if defined(MOE_SM90)
#define MOE_TMA_LOAD(N, COORDS, ...)                                                                \
  asm volatile("cp.async.bulk.tensor." #N "d.shared::cluster.global.tile.mbarrier::complete_tx::bytes " \
               "[%0], [%1, {" COORDS "}], [%2];\n" ::"r"(shared_address(smem_dst)),                 \
               "l"(map), "r"(shared_address(bar)), __VA_ARGS__                                       \
               : "memory")
#endif
template <int N>
__device__ __forceinline__ void tma_load(void* smem_dst, const TensorMap* map, uint64_t* bar,
                                         const int (&c)[N] MOE_SITE_PARAMS) {
  static_assert(N >= 2 && N <= 5, "TMA tensor copies here are 2D to 5D");
#if defined(MOE_SM90)
  if constexpr (N == 2) MOE_TMA_LOAD(2, "%3, %4", "r"(c[0]), "r"(c[1]));
  if constexpr (N == 3) MOE_TMA_LOAD(3, "%3, %4, %5", "r"(c[0]), "r"(c[1]), "r"(c[2]));
  if constexpr (N == 4) MOE_TMA_LOAD(4, "%3, %4, %5, %6", "r"(c[0]), "r"(c[1]), "r"(c[2]), "r"(c[3]));
  if constexpr (N == 5)
    MOE_TMA_LOAD(5, "%3, %4, %5, %6, %7", "r"(c[0]), "r"(c[1]), "r"(c[2]), "r"(c[3]), "r"(c[4]));
#elif defined(__CUDA_ARCH__)
  __trap();
#elif defined(CUEMU_HOST)
  ::cuemu::tma_load(smem_dst, map, bar, c, N, MOE_SITE);
#endif
}

// cp.async.bulk.tensor.Nd.global.shared::cta.tile.bulk_group: the box at `c` from shared
// memory (the layout of tma_load) to global memory; elements outside the tensor are not
// written. Part of this thread's current bulk group: shared memory may be reused after
// bulk_wait_group<N, true> (.read), global memory holds the data after bulk_wait_group<N>.
// Ordinary stores that filled the tile must be made visible first with
// fence_proxy_async_shared_cta().
#if defined(MOE_SM90)
#define MOE_TMA_STORE(N, COORDS, ...)                                                      \
  asm volatile("cp.async.bulk.tensor." #N "d.global.shared::cta.tile.bulk_group "          \
               "[%0, {" COORDS "}], [%1];\n" ::"l"(map), "r"(shared_address(smem_src)), \
               __VA_ARGS__                                                                 \
               : "memory")
#endif
template <int N>
__device__ __forceinline__ void tma_store(const TensorMap* map, const void* smem_src,
                                          const int (&c)[N] MOE_SITE_PARAMS) {
  static_assert(N >= 2 && N <= 5, "TMA tensor copies here are 2D to 5D");
#if defined(MOE_SM90)
  if constexpr (N == 2) MOE_TMA_STORE(2, "%2, %3", "r"(c[0]), "r"(c[1]));
  if constexpr (N == 3) MOE_TMA_STORE(3, "%2, %3, %4", "r"(c[0]), "r"(c[1]), "r"(c[2]));
  if constexpr (N == 4) MOE_TMA_STORE(4, "%2, %3, %4, %5", "r"(c[0]), "r"(c[1]), "r"(c[2]), "r"(c[3]));
  if constexpr (N == 5)
    MOE_TMA_STORE(5, "%2, %3, %4, %5, %6", "r"(c[0]), "r"(c[1]), "r"(c[2]), "r"(c[3]), "r"(c[4]));
#elif defined(__CUDA_ARCH__)
  __trap();
#elif defined(CUEMU_HOST)
  ::cuemu::tma_store(map, smem_src, c, N, MOE_SITE);
#endif
}

// cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes: `bytes` (a multiple of
// 16) contiguous bytes, both addresses 16-byte aligned, completing tx-count on `bar` like
// tma_load. For gathered rows: one copy per row.
__device__ __forceinline__ void bulk_load(void* smem_dst, const void* gmem_src, unsigned bytes,
                                          uint64_t* bar MOE_SITE_PARAMS) {
#if defined(MOE_SM90)
  asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n" ::"r"(
                   shared_address(smem_dst)),
               "l"(gmem_src), "r"(bytes), "r"(shared_address(bar))
               : "memory");
#elif defined(__CUDA_ARCH__)
  __trap();
#elif defined(CUEMU_HOST)
  ::cuemu::bulk_load(smem_dst, gmem_src, bytes, bar, MOE_SITE);
#endif
}

// cp.async.bulk.global.shared::cta.bulk_group: `bytes` (a multiple of 16) from shared to
// global memory, both 16-byte aligned; completion as tma_store.
__device__ __forceinline__ void bulk_store(void* gmem_dst, const void* smem_src, unsigned bytes MOE_SITE_PARAMS) {
#if defined(MOE_SM90)
  asm volatile("cp.async.bulk.global.shared::cta.bulk_group [%0], [%1], %2;\n" ::"l"(gmem_dst),
               "r"(shared_address(smem_src)), "r"(bytes)
               : "memory");
#elif defined(__CUDA_ARCH__)
  __trap();
#elif defined(CUEMU_HOST)
  ::cuemu::bulk_store(gmem_dst, smem_src, bytes, MOE_SITE);
#endif
}

// cp.async.bulk.commit_group: closes this thread's current group of bulk stores.
__device__ __forceinline__ void bulk_commit_group() {
#if defined(MOE_SM90)
  asm volatile("cp.async.bulk.commit_group;\n" ::: "memory");
#elif defined(__CUDA_ARCH__)
  __trap();
#elif defined(CUEMU_HOST)
  ::cuemu::bulk_commit_group();
#endif
}

// cp.async.bulk.wait_group[.read] N: at most N of this thread's committed groups are in
// flight; the others have written global memory (Read: have at least finished reading shared
// memory, which may then be overwritten). The emulator performs each covered store whole here.
template <int N, bool Read = false>
__device__ __forceinline__ void bulk_wait_group() {
#if defined(MOE_SM90)
  if constexpr (Read) asm volatile("cp.async.bulk.wait_group.read %0;\n" ::"n"(N) : "memory");
  else asm volatile("cp.async.bulk.wait_group %0;\n" ::"n"(N) : "memory");
#elif defined(__CUDA_ARCH__)
  __trap();
#elif defined(CUEMU_HOST)
  ::cuemu::bulk_wait_group(N);
#endif
}

// ------------------------------------------------------------------ fences, election, PDL
// elect.sync: true in exactly one lane of the full warp (the lowest), which must be converged.
__device__ __forceinline__ bool elect_one() {
#if defined(MOE_SM90)
  unsigned elected;
  asm volatile("{\n .reg .pred p;\n elect.sync _|p, %1;\n selp.u32 %0, 1, 0, p;\n}\n"
               : "=r"(elected)
               : "r"(0xffffffffu));
  return elected != 0;
#elif defined(__CUDA_ARCH__)
  __trap();
  return false;
#elif defined(CUEMU_HOST)
  return ::cuemu::elect_sync(0xffffffffu);
#endif
}

// griddepcontrol.launch_dependents / .wait (programmatic dependent launch): let the next
// kernel of the stream start its prologue / wait until the previous kernel's memory is
// visible. The emulator runs launches one after another, so both are no-ops there; on sm_80
// they are no-ops too (no PDL).
__device__ __forceinline__ void griddep_launch_dependents() {
#if defined(MOE_SM90)
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void griddep_wait() {
#if defined(MOE_SM90)
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}

// ------------------------------------------------------------------ Hopper warpgroup MMA
// wgmma (sm_90a only: nvcc -gencode=arch=compute_90a,code=sm_90a). In other GPU passes
// wgmma_m64k16 traps and the rest are empty; the emulator always runs them (kernels/emu/wgmma.cpp).
// Every wrapper here is `.sync.aligned` over a warpgroup: all 128 threads of warps 4g..4g+3
// execute it together, with warpgroup-uniform operands.
//
// D (64 x N, f32) += A (64 x 16) * B (16 x N), N a multiple of 8 in 8..256 (the wrappers take
// N in {8, 16, 32, 64, 128, 256}). Thread t of the warpgroup, w = t/32, g = (t%32)/4, q = t%4:
//   d[4j + i] (N/2 floats): row 16w + g + 8(i/2), column 8j + 2q + i%2, for j < N/8, i < 4
//   a[i] (A in registers, 4 x b32): row 16w + g + 8(i%2), columns 2q, 2q+1 (+8 if i >= 2)
// A and B in shared memory are read through 64-bit matrix descriptors (wgmma_descriptor). The
// canonical layouts for 16-bit elements (PTX ISA, "Shared memory matrix layout"), for the
// 16-deep slice one instruction reads; `mn` is a row of A or a column of B:
//   K-major (default): rows of `span` bytes (16 unswizzled, else the swizzle's 32/64/128),
//     element (mn, k) at (mn%8)*span + (mn/8)*SBO + (k%8)*2 + (k/8)*(unswizzled ? LBO : 16);
//     so a 128B-swizzled tile of rows of 64 elements has SBO = 1024 (LBO is ignored) and the
//     k-th 16-deep slice starts 32k bytes in.
//   MN-major (Trans = true): the same with mn and k exchanged; unswizzled, (mn%8)*2 +
//     (mn/8)*SBO + (k%8)*16 + (k/8)*LBO; swizzled, (mn%8)*2 + (mn/8 % (span/16))*16 +
//     (mn/8 / (span/16))*LBO + (k%8)*span + (k/8)*SBO.
// then permuted by swizzle_address (swizzle.cuh). A swizzled tile must start on a multiple of
// its repeat (the emulator requires the descriptor's base offset to be 0).
//
// Asynchrony: wgmma_m64k16 only starts the product. Before the first one (and whenever the
// accumulator or A registers were written since), call wgmma_fence(); close a batch with
// wgmma_commit_group(); wgmma_wait_group<N>() waits until at most N batches are in flight.
// Until then the accumulators must not be read (the emulator fills them with NaN) and the
// shared operands must not be overwritten (the emulator reads them at the wait). Bracket the
// accumulator array with wgmma_fence_operand(d) before the first wgmma and after the wait so
// nvcc keeps its reads and writes on the right side of the asm. Shared memory written by
// ordinary stores (or cp.async) needs fence_proxy_async_shared_cta() before wgmma reads it.
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define MOE_SM90A 1
#endif
#include <type_traits>

#include "swizzle.cuh"

// The matrix descriptor of an operand tile at `smem` (PTX ISA, "Matrix Descriptor Format"):
// bits 0-13 start address >> 4, 16-29 leading byte offset >> 4, 32-45 stride byte offset >> 4,
// 49-51 base offset (0), 62-63 layout (0 none, 1 128B, 2 64B, 3 32B swizzle).
__device__ __forceinline__ uint64_t wgmma_descriptor(const void* smem, unsigned leading_bytes, unsigned stride_bytes,
                                                     SwizzleMode swizzle) {
#if defined(__CUDA_ARCH__)
  const unsigned address = shared_address(smem);
#else
  const unsigned address = ::cuemu::wgmma_shared_offset(smem);
#endif
  const uint64_t layout = (4u - swizzle_bits(swizzle)) & 3u;
  return uint64_t((address >> 4) & 0x3fffu) | uint64_t((leading_bytes >> 4) & 0x3fffu) << 16 |
         uint64_t((stride_bytes >> 4) & 0x3fffu) << 32 | layout << 62;
}

__device__ __forceinline__ void wgmma_fence() {
#if defined(MOE_SM90A)
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#elif defined(CUEMU_HOST)
  ::cuemu::wgmma_fence();
#endif
}

__device__ __forceinline__ void wgmma_commit_group() {
#if defined(MOE_SM90A)
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
#elif defined(CUEMU_HOST)
  ::cuemu::wgmma_commit_group();
#endif
}

template <int N>
__device__ __forceinline__ void wgmma_wait_group() {
  static_assert(N >= 0 && N <= 7, "wgmma.wait_group takes 0..7");
#if defined(MOE_SM90A)
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
#elif defined(CUEMU_HOST)
  ::cuemu::wgmma_wait_group(N);
#endif
}

// Tells nvcc that every accumulator may change here (no code; nothing in the emulator).
template <int R>
__device__ __forceinline__ void wgmma_fence_operand(float (&d)[R]) {
#if defined(__CUDA_ARCH__)
#pragma unroll
  for (int i = 0; i < R; ++i) asm volatile("" : "+f"(d[i])::"memory");
#endif
}

#if defined(MOE_SM90A)
// Operand lists for the accumulators: "+f"(d[i]) ... and the matching "{%0, %1, ...}".
#define MOE_ACC4(i) "+f"(d[i]), "+f"(d[i + 1]), "+f"(d[i + 2]), "+f"(d[i + 3])
#define MOE_ACC8(i) MOE_ACC4(i), MOE_ACC4(i + 4)
#define MOE_ACC16(i) MOE_ACC8(i), MOE_ACC8(i + 8)
#define MOE_ACC32(i) MOE_ACC16(i), MOE_ACC16(i + 16)
#define MOE_ACC64(i) MOE_ACC32(i), MOE_ACC32(i + 32)
#define MOE_ACC128(i) MOE_ACC64(i), MOE_ACC64(i + 64)
#define MOE_R10(t) "%" #t "0,%" #t "1,%" #t "2,%" #t "3,%" #t "4,%" #t "5,%" #t "6,%" #t "7,%" #t "8,%" #t "9"
#define MOE_REGS4 "{%0,%1,%2,%3}"
#define MOE_REGS8 "{%0,%1,%2,%3,%4,%5,%6,%7}"
#define MOE_REGS16 "{" MOE_R10() ",%10,%11,%12,%13,%14,%15}"
#define MOE_REGS32 "{" MOE_R10() "," MOE_R10(1) "," MOE_R10(2) ",%30,%31}"
#define MOE_REGS64 \
  "{" MOE_R10() "," MOE_R10(1) "," MOE_R10(2) "," MOE_R10(3) "," MOE_R10(4) "," MOE_R10(5) ",%60,%61,%62,%63}"
#define MOE_REGS128                                                                                              \
  "{" MOE_R10() "," MOE_R10(1) "," MOE_R10(2) "," MOE_R10(3) "," MOE_R10(4) "," MOE_R10(5) "," MOE_R10(6) "," \
      MOE_R10(7) "," MOE_R10(8) "," MOE_R10(9) "," MOE_R10(10) "," MOE_R10(11) ",%120,%121,%122,%123,%124,%125,%126,%127}"
// A and B from shared memory: %Q descriptor A, %Q+1 descriptor B, %Q+2 scale-d, %Q+3/%Q+4
// transposes (the two numbers after them are the register form's).
#define MOE_WGMMA_SS(NN, TYPE, REGS, ACC, QA, QB, QS, QTA, QTB, UNUSED1, UNUSED2)                      \
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %" #QS ", 0;\n"                                       \
               "wgmma.mma_async.sync.aligned.m64n" #NN "k16.f32." TYPE "." TYPE " " REGS ", %" #QA    \
               ", %" #QB ", p, 1, 1, %" #QTA ", %" #QTB ";\n}\n"                                     \
               : ACC                                                                                   \
               : "l"(desc_a), "l"(desc_b), "r"(int(accumulate)), "n"(int(TransA)), "n"(int(TransB)))
// A from registers: %Q..%Q+3 A, %Q+4 descriptor B, %Q+5 scale-d, %Q+6 transpose of B.
#define MOE_WGMMA_RS(NN, TYPE, REGS, ACC, Q0, Q1, Q2, Q3, QB, QS, QTB)                                    \
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %" #QS ", 0;\n"                                          \
               "wgmma.mma_async.sync.aligned.m64n" #NN "k16.f32." TYPE "." TYPE " " REGS ", {%" #Q0 ", %" #Q1 \
               ", %" #Q2 ", %" #Q3 "}, %" #QB ", p, 1, 1, %" #QTB ";\n}\n"                                 \
               : ACC                                                                                      \
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(int(accumulate)), "n"(int(TransB)))
#define MOE_WGMMA_EACH_N(M, TYPE)                                                                   \
  if constexpr (N == 8) M(8, TYPE, MOE_REGS4, MOE_ACC4(0), 4, 5, 6, 7, 8, 9, 10);                    \
  else if constexpr (N == 16) M(16, TYPE, MOE_REGS8, MOE_ACC8(0), 8, 9, 10, 11, 12, 13, 14);          \
  else if constexpr (N == 32) M(32, TYPE, MOE_REGS16, MOE_ACC16(0), 16, 17, 18, 19, 20, 21, 22);      \
  else if constexpr (N == 64) M(64, TYPE, MOE_REGS32, MOE_ACC32(0), 32, 33, 34, 35, 36, 37, 38);      \
  else if constexpr (N == 128) M(128, TYPE, MOE_REGS64, MOE_ACC64(0), 64, 65, 66, 67, 68, 69, 70);    \
  else M(256, TYPE, MOE_REGS128, MOE_ACC128(0), 128, 129, 130, 131, 132, 133, 134)
#endif

// Whether T is bf16 (else f16), after checking N and T.
template <int N, class T>
__host__ __device__ constexpr bool wgmma_bf16() {
  static_assert(N == 8 || N == 16 || N == 32 || N == 64 || N == 128 || N == 256,
                "wgmma_m64k16: N must be 8, 16, 32, 64, 128 or 256");
  static_assert(std::is_same_v<T, __nv_bfloat16> || std::is_same_v<T, __half>,
                "wgmma_m64k16: T must be __nv_bfloat16 or __half");
  return std::is_same_v<T, __nv_bfloat16>;
}

// D = A*B + (accumulate ? D : 0), A and B from shared memory; T is __nv_bfloat16 or __half.
// TransA / TransB: the operand is MN-major instead of K-major.
template <int N, class T, bool TransA = false, bool TransB = false>
__device__ __forceinline__ void wgmma_m64k16(float (&d)[N / 2], uint64_t desc_a, uint64_t desc_b, bool accumulate) {
  constexpr bool bf16 = wgmma_bf16<N, T>();
#if defined(MOE_SM90A)
  if constexpr (bf16) MOE_WGMMA_EACH_N(MOE_WGMMA_SS, "bf16");
  else MOE_WGMMA_EACH_N(MOE_WGMMA_SS, "f16");
#elif defined(__CUDA_ARCH__)
  __trap();  // wgmma exists only in sm_90a code
#elif defined(CUEMU_HOST)
  ::cuemu::wgmma_mma_async(d, N, bf16 ? ::cuemu::MmaInput::Bf16 : ::cuemu::MmaInput::F16, desc_a, nullptr, desc_b,
                           TransA, TransB, accumulate);
#endif
}

// The same with A from registers (layout above); only B may be MN-major.
template <int N, class T, bool TransB = false>
__device__ __forceinline__ void wgmma_m64k16(float (&d)[N / 2], const uint32_t (&a)[4], uint64_t desc_b,
                                             bool accumulate) {
  constexpr bool bf16 = wgmma_bf16<N, T>();
#if defined(MOE_SM90A)
  if constexpr (bf16) MOE_WGMMA_EACH_N(MOE_WGMMA_RS, "bf16");
  else MOE_WGMMA_EACH_N(MOE_WGMMA_RS, "f16");
#elif defined(__CUDA_ARCH__)
  __trap();
#elif defined(CUEMU_HOST)
  ::cuemu::wgmma_mma_async(d, N, bf16 ? ::cuemu::MmaInput::Bf16 : ::cuemu::MmaInput::F16, 0, a, desc_b, false,
                           TransB, accumulate);
#endif
}

// setmaxnreg.{inc,dec}.sync.aligned.u32: the warpgroup's per-thread register budget rises
// (Increase) or falls to Regs, a multiple of 8 in 24..256, warpgroup-uniform. A hint
// elsewhere than sm_90a: nothing. The kernel needs __launch_bounds__ (ptxas ignores it
// otherwise: C7508).
template <bool Increase, int Regs>
__device__ __forceinline__ void setmaxnreg() {
  static_assert(Regs % 8 == 0 && Regs >= 24 && Regs <= 256, "setmaxnreg takes a multiple of 8 in 24..256");
#if defined(MOE_SM90A)
  if constexpr (Increase) asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(Regs));
  else asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(Regs));
#elif defined(CUEMU_HOST)
  ::cuemu::setmaxnreg(Increase, Regs);
#endif
}

// fence.proxy.async.shared::cta: this thread's earlier ordinary shared-memory stores become
// visible to the async proxy (wgmma operands, TMA stores). Before sm_90 there is no async proxy.
__device__ __forceinline__ void fence_proxy_async_shared_cta() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#elif defined(CUEMU_HOST)
  ::cuemu::fence_proxy_async_shared_cta();
#endif
}
