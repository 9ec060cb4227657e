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
// fence_proxy_async_shared().
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
// fence.proxy.async.shared::cta: ordinary (generic-proxy) writes to shared memory become
// visible to the async proxy (TMA stores, wgmma operands) issued after it by this thread.
__device__ __forceinline__ void fence_proxy_async_shared() {
#if defined(MOE_SM90)
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#elif defined(__CUDA_ARCH__)
  __trap();
#elif defined(CUEMU_HOST)
  ::cuemu::fence_proxy_async_shared();
#endif
}

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
