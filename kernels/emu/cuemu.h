// cuemu.h: the CUDA execution model on the CPU, as seen by kernel code.
//
// A kernel file (`kernels/*.cu`) compiled as host C++ with this header runs on the CPU:
// each CUDA thread of a block is a fiber, one OS thread runs one block at a time, blocks
// are spread over a small worker pool (runtime.cpp). Barriers and warp collectives are
// fiber switches; they never act as memory barriers beyond what CUDA promises, so a
// missing __syncthreads / __syncwarp shows up under the shuffled schedule.
//
// What is emulated: thread/block indices, static and dynamic shared memory, __syncthreads
// (+ _count/_and/_or), __syncwarp, shuffles, votes, atomics, 16-bit floats, and the PTX
// wrappers of kernels/include/ptx.cuh (mma.sync m16n8k16 and m16n8k8 tf32, which refuses operands
// with bits below tf32's precision; cvt.rna.tf32.f32, ldmatrix, cp.async, and Hopper's
// mbarrier, TMA tensor and bulk copies, elect.sync: hopper_async.h; and the warpgroup
// instructions in wgmma.cpp: wgmma.mma_async with fence / commit_group / wait_group,
// setmaxnreg, fence.proxy.async). Warpgroup instructions are collectives of the 128 threads
// of an aligned warpgroup; wgmma reads its operands at the covering wait_group and poisons its
// accumulators until then.
// What is not: timing, the weak memory model (fences are plain fences), warp divergence
// costs, texture/surface memory, cooperative groups, clusters (TMA multicast, distributed
// shared memory), TMA im2col mode.
#pragma once
#ifdef __CUDACC__
#error "cuemu.h is the CPU emulation header; nvcc must not see it"
#endif
#define CUEMU_HOST 1
#pragma GCC diagnostic ignored "-Wunknown-pragmas"  // #pragma unroll

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <array>
#include <type_traits>
#include <utility>

#if defined(__SANITIZE_ADDRESS__)
#define CUEMU_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define CUEMU_ASAN 1
#endif
#endif

// ------------------------------------------------------------------ qualifiers
#define __global__
#define __device__
#define __host__
#define __constant__ static
#define __forceinline__ inline __attribute__((always_inline))
#define __restrict__ __restrict
#define __launch_bounds__(...)
#define __grid_constant__
#define __align__(n) __attribute__((aligned(n)))
#if defined(CUEMU_ASAN)
// AddressSanitizer puts redzones around globals but not around thread_local data, so in
// sanitizer builds static shared arrays are plain statics (overruns are reported) and the
// runtime runs one block at a time, which keeps "one instance per running block" true.
#define __shared__ static
#elif defined(CUEMU_PROFILE)
// The memory profiler recognises shared memory by address: static shared arrays are
// gathered in one section (blocks run one at a time, as in sanitizer builds).
#define __shared__ static __attribute__((section("cuemu_shared")))
#else
// One instance per OS thread; an OS thread runs one block at a time and fibers never
// migrate, so this is one instance per running block.
#define __shared__ static thread_local __attribute__((tls_model("initial-exec")))
#endif

// ------------------------------------------------------------------ vector types
struct uint3 { unsigned int x, y, z; };
struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int vx = 1, unsigned int vy = 1, unsigned int vz = 1) : x(vx), y(vy), z(vz) {}
};
#define CUEMU_VEC2(T, N, A)                              \
  struct __align__(A) N##2 { T x, y; };                  \
  inline N##2 make_##N##2(T x, T y) { return N##2{x, y}; }
#define CUEMU_VEC4(T, N, A)                                          \
  struct __align__(A) N##4 { T x, y, z, w; };                        \
  inline N##4 make_##N##4(T x, T y, T z, T w) { return N##4{x, y, z, w}; }
CUEMU_VEC2(float, float, 8) CUEMU_VEC4(float, float, 16)
CUEMU_VEC2(int, int, 8) CUEMU_VEC4(int, int, 16)
CUEMU_VEC2(unsigned int, uint, 8) CUEMU_VEC4(unsigned int, uint, 16)
CUEMU_VEC2(double, double, 16)
CUEMU_VEC2(long long, longlong, 16)
#undef CUEMU_VEC2
#undef CUEMU_VEC4
constexpr int warpSize = 32;

#include "cuemu_fp16.h"

// Built-in variables: per OS thread, rewritten by the runtime on every fiber switch.
// constinit: no dynamic initialisation, so no TLS wrapper call on every read.
#define CUEMU_TLS thread_local __attribute__((tls_model("initial-exec")))
extern CUEMU_TLS constinit uint3 threadIdx;
extern CUEMU_TLS constinit uint3 blockIdx;
extern CUEMU_TLS constinit dim3 blockDim;
extern CUEMU_TLS constinit dim3 gridDim;

// ------------------------------------------------------------------ runtime interface
namespace cuemu {
enum class MmaInput : uint32_t { Bf16 = 0, F16 = 1, Tf32 = 2 };

void* dynamic_shared();
enum class BarrierReduce { Count, And, Or };
int block_barrier(int predicate, BarrierReduce reduce, const char* file, int line);
void warp_sync(unsigned mask);
uint64_t warp_shuffle(unsigned mask, uint64_t value, unsigned source_lane);
unsigned warp_ballot(unsigned mask, int predicate);
unsigned active_mask();
unsigned lane_id();
void mma_m16n8k16(float* d, const uint32_t* a, const uint32_t* b, const float* c, MmaInput input);
// mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 (fragments in ptx.cuh).
void mma_m16n8k8_tf32(float* d, const uint32_t* a, const uint32_t* b, const float* c);
void ldmatrix(uint32_t* regs, unsigned num, bool trans, const void* row);
void cp_async(void* dst, const void* src, unsigned bytes, unsigned src_bytes);
void cp_async_commit();
void cp_async_wait_group(unsigned pending);
// Hopper's warpgroup instructions and the async-proxy shadow (wgmma.cpp; layouts in ptx.cuh).
uint32_t wgmma_shared_offset(const void* p);  // the shared address of p (dynamic shared memory only)
void wgmma_fence();
void wgmma_commit_group();
void wgmma_wait_group(unsigned pending);
void wgmma_mma_async(float* d, unsigned n, MmaInput input, uint64_t desc_a, const uint32_t* a_regs,
                     uint64_t desc_b, bool trans_a, bool trans_b, bool accumulate);
void setmaxnreg(bool increase, unsigned registers);
void fence_proxy_async_shared_cta();
// For the async proxy's twins (wgmma here, TMA stores): fails the launch if generic-proxy
// stores changed [smem, smem + bytes) since the last fence.proxy.async. Shared memory that
// the async proxy itself wrote (a TMA load landing) must be announced by async_proxy_write.
void async_proxy_read(const void* smem, size_t bytes, const char* what);
void async_proxy_write(const void* smem, size_t bytes);
// Runtime internals: the warpgroup rendezvous (the last of the 128 threads to arrive runs
// `resolve` before any continues) and the per-block reset of wgmma.cpp's state.
void warpgroup_arrive(const char* what, void (*resolve)(unsigned warpgroup));
void hopper_block_begin(unsigned char* shared, size_t shared_bytes);
[[noreturn]] void trap(const char* file, int line);
}  // namespace cuemu
#include "hopper_async.h"
namespace cuemu {
[[noreturn]] void fail(const char* message);  // abandons the block: the launch returns the message
// The GPU faults ("misaligned address") on an access whose address is not a multiple of its
// width; these fail the launch with the access, the address and the alignment it needs.
[[noreturn]] void misaligned(const char* access, const void* address, unsigned alignment);
inline void check_aligned(const void* address, unsigned alignment, const char* access) {
  if (reinterpret_cast<uintptr_t>(address) & (alignment - 1)) misaligned(access, address, alignment);
}
#ifdef CUEMU_PROFILE
void profile_atomic(const void* p, unsigned bytes);  // the caller's address is the site
#define CUEMU_PROFILE_ATOMIC(p) ::cuemu::profile_atomic(p, sizeof(*(p)))
#else
#define CUEMU_PROFILE_ATOMIC(p) ((void)0)
#endif
// Every atomic checks its address first: atomics need natural alignment on the GPU.
#define CUEMU_ATOMIC_ENTRY(p) (::cuemu::check_aligned(p, sizeof(*(p)), "atomic"), CUEMU_PROFILE_ATOMIC(p))

// What EMU_EXPORT publishes for one kernel; Rust reads it (src/device/emulator.rs).
constexpr unsigned kMaxParams = 48;  // EmuKernelEntry::param_sizes in src/device/registry.rs
struct KernelEntry {
  const char* name;
  void (*invoke)(void** params);  // params packed as cuLaunchKernel's kernelParams
  uint32_t param_count;
  uint16_t param_sizes[kMaxParams];
};

template <class F> struct KernelSignature;
template <class... A> struct KernelSignature<void (*)(A...)> {
  static_assert(sizeof...(A) <= kMaxParams, "too many kernel parameters");
  template <auto Kernel, size_t... I> static void call(void** p, std::index_sequence<I...>) {
    Kernel(*static_cast<std::remove_cv_t<std::remove_reference_t<A>>*>(p[I])...);
  }
  template <auto Kernel> static void invoke(void** p) { call<Kernel>(p, std::index_sequence_for<A...>{}); }
  template <auto Kernel> static constexpr KernelEntry entry(const char* name) {
    return KernelEntry{name, &invoke<Kernel>, uint32_t(sizeof...(A)), {uint16_t(sizeof(A))...}};
  }
};
}  // namespace cuemu

#define CUEMU_EXPORT(kernel)                                                                     \
  extern "C" const ::cuemu::KernelEntry cuemu_kernel_##kernel =                                 \
      ::cuemu::KernelSignature<decltype(&kernel)>::entry<&kernel>(#kernel);

// ------------------------------------------------------------------ math and bits
template <class To, class From> inline To cuemu_bitcast(From f) {
  static_assert(sizeof(To) == sizeof(From));
  To t;
  memcpy(&t, &f, sizeof(To));
  return t;
}
inline float __int_as_float(int i) { return cuemu_bitcast<float>(i); }
inline int __float_as_int(float f) { return cuemu_bitcast<int>(f); }
inline float __uint_as_float(unsigned u) { return cuemu_bitcast<float>(u); }
inline unsigned __float_as_uint(float f) { return cuemu_bitcast<unsigned>(f); }
inline double __longlong_as_double(long long i) { return cuemu_bitcast<double>(i); }
inline long long __double_as_longlong(double d) { return cuemu_bitcast<long long>(d); }
inline float __expf(float x) { return expf(x); }
inline float __logf(float x) { return logf(x); }
inline float __sinf(float x) { return sinf(x); }
inline float __cosf(float x) { return cosf(x); }
inline float __powf(float a, float b) { return powf(a, b); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __frcp_rn(float x) { return 1.0f / x; }
inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
inline float __saturatef(float x) { return x < 0.f ? 0.f : (x > 1.f ? 1.f : x); }
inline float __fmaf_rn(float a, float b, float c) { return fmaf(a, b, c); }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __clz(int x) { return x ? __builtin_clz(unsigned(x)) : 32; }
inline int __clzll(long long x) { return x ? __builtin_clzll((unsigned long long)x) : 64; }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline unsigned __umulhi(unsigned a, unsigned b) { return unsigned((uint64_t(a) * b) >> 32); }
inline unsigned __brev(unsigned x) {
  x = ((x >> 1) & 0x55555555u) | ((x & 0x55555555u) << 1);
  x = ((x >> 2) & 0x33333333u) | ((x & 0x33333333u) << 2);
  x = ((x >> 4) & 0x0f0f0f0fu) | ((x & 0x0f0f0f0fu) << 4);
  return __builtin_bswap32(x);
}
#define CUEMU_MINMAX(T)                                     \
  inline T min(T a, T b) { return b < a ? b : a; }          \
  inline T max(T a, T b) { return a < b ? b : a; }
CUEMU_MINMAX(int) CUEMU_MINMAX(unsigned) CUEMU_MINMAX(long long) CUEMU_MINMAX(unsigned long long)
CUEMU_MINMAX(long) CUEMU_MINMAX(unsigned long)
#undef CUEMU_MINMAX
// CUDA's float min/max are fminf/fmaxf: a NaN operand loses to a number, in either order.
inline float min(float a, float b) { return fminf(a, b); }
inline float max(float a, float b) { return fmaxf(a, b); }
inline double min(double a, double b) { return fmin(a, b); }
inline double max(double a, double b) { return fmax(a, b); }
template <class T> inline T __ldg(const T* p) {
  ::cuemu::check_aligned(p, alignof(T), "__ldg");
  return *p;
}
inline void __threadfence() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
inline void __threadfence_block() { __atomic_signal_fence(__ATOMIC_SEQ_CST); }
inline void __nanosleep(unsigned) {}
#define __trap() ::cuemu::trap(__FILE__, __LINE__)

// ------------------------------------------------------------------ atomics
// Relaxed, device scope. Fibers of one block never preempt each other, but blocks run on
// several OS threads at once, so these are real atomic instructions. An atomic's first read
// is a read-modify-write of nothing (fetch_or 0), not an atomic load: the profiling build
// traces loads, and its race detector must not take an atomic's own read for a plain one.
template <class T> inline T cuemu_atomic_read(T* p) { return __atomic_fetch_or(p, T(0), __ATOMIC_RELAXED); }
#define CUEMU_ATOMIC_INT(T)                                                                      \
  inline T atomicAdd(T* p, T v) { CUEMU_ATOMIC_ENTRY(p); return __atomic_fetch_add(p, v, __ATOMIC_RELAXED); }           \
  inline T atomicSub(T* p, T v) { CUEMU_ATOMIC_ENTRY(p); return __atomic_fetch_sub(p, v, __ATOMIC_RELAXED); }           \
  inline T atomicAnd(T* p, T v) { CUEMU_ATOMIC_ENTRY(p); return __atomic_fetch_and(p, v, __ATOMIC_RELAXED); }           \
  inline T atomicOr(T* p, T v) { CUEMU_ATOMIC_ENTRY(p); return __atomic_fetch_or(p, v, __ATOMIC_RELAXED); }             \
  inline T atomicXor(T* p, T v) { CUEMU_ATOMIC_ENTRY(p); return __atomic_fetch_xor(p, v, __ATOMIC_RELAXED); }           \
  inline T atomicExch(T* p, T v) { CUEMU_ATOMIC_ENTRY(p); return __atomic_exchange_n(p, v, __ATOMIC_RELAXED); }         \
  inline T atomicCAS(T* p, T expected, T v) {                                                    \
    CUEMU_ATOMIC_ENTRY(p);                                                                     \
    __atomic_compare_exchange_n(p, &expected, v, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED);     \
    return expected;                                                                             \
  }                                                                                              \
  inline T atomicMax(T* p, T v) {                                                                \
    CUEMU_ATOMIC_ENTRY(p);                                                                     \
    T old = cuemu_atomic_read(p);                                                                \
    while (old < v && !__atomic_compare_exchange_n(p, &old, v, true, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {} \
    return old;                                                                                  \
  }                                                                                              \
  inline T atomicMin(T* p, T v) {                                                                \
    CUEMU_ATOMIC_ENTRY(p);                                                                     \
    T old = cuemu_atomic_read(p);                                                                \
    while (v < old && !__atomic_compare_exchange_n(p, &old, v, true, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {} \
    return old;                                                                                  \
  }
CUEMU_ATOMIC_INT(int)
CUEMU_ATOMIC_INT(unsigned int)
CUEMU_ATOMIC_INT(unsigned long long)
CUEMU_ATOMIC_INT(long long)
#undef CUEMU_ATOMIC_INT
template <class F, class Bits> inline F cuemu_atomic_float_add(F* p, F v) {
  CUEMU_ATOMIC_ENTRY(p);
  Bits* q = reinterpret_cast<Bits*>(p);
  Bits old = cuemu_atomic_read(q);
  while (!__atomic_compare_exchange_n(q, &old, cuemu_bitcast<Bits>(cuemu_bitcast<F>(old) + v), true,
                                      __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {}
  return cuemu_bitcast<F>(old);
}
inline float atomicAdd(float* p, float v) { return cuemu_atomic_float_add<float, uint32_t>(p, v); }
inline double atomicAdd(double* p, double v) { return cuemu_atomic_float_add<double, uint64_t>(p, v); }
inline float atomicExch(float* p, float v) {
  return __uint_as_float(atomicExch(reinterpret_cast<unsigned*>(p), __float_as_uint(v)));
}

// ------------------------------------------------------------------ barriers and warps
#define CUEMU_BARRIER(p, reduce) ::cuemu::block_barrier((p) != 0, ::cuemu::BarrierReduce::reduce, __FILE__, __LINE__)
#define __syncthreads() ((void)CUEMU_BARRIER(1, Count))
#define __syncthreads_count(p) CUEMU_BARRIER(p, Count)
#define __syncthreads_or(p) CUEMU_BARRIER(p, Or)
#define __syncthreads_and(p) CUEMU_BARRIER(p, And)
inline void __syncwarp(unsigned mask = 0xffffffffu) { ::cuemu::warp_sync(mask); }
inline unsigned __activemask() { return ::cuemu::active_mask(); }

template <class T> inline T cuemu_shuffle(unsigned mask, T v, unsigned source_lane) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable_v<T>, "shuffle of a type wider than 8 bytes");
  uint64_t bits = 0;
  memcpy(&bits, &v, sizeof(T));
  bits = ::cuemu::warp_shuffle(mask, bits, source_lane);
  T r;
  memcpy(&r, &bits, sizeof(T));
  return r;
}
// Lane arithmetic as in the CUDA programming guide: a warp is split into segments of
// `width` lanes (a power of two, 1..32); sources outside the caller's segment leave the
// value unchanged (up/down/xor).
inline void cuemu_check_width(int width) {
  if (width < 1 || width > 32 || (width & (width - 1))) ::cuemu::fail("shuffle width must be a power of two in 1..32");
}
template <class T> inline T __shfl_sync(unsigned mask, T v, int src, int width = warpSize) {
  cuemu_check_width(width);
  const unsigned lane = ::cuemu::lane_id(), base = lane & ~unsigned(width - 1);
  return cuemu_shuffle(mask, v, base + (unsigned(src) & unsigned(width - 1)));
}
template <class T> inline T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = warpSize) {
  cuemu_check_width(width);
  const unsigned lane = ::cuemu::lane_id();
  return cuemu_shuffle(mask, v, (lane & unsigned(width - 1)) < delta ? lane : lane - delta);
}
template <class T> inline T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = warpSize) {
  cuemu_check_width(width);
  const unsigned lane = ::cuemu::lane_id();
  return cuemu_shuffle(mask, v, (lane & unsigned(width - 1)) + delta >= unsigned(width) ? lane : lane + delta);
}
template <class T> inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = warpSize) {
  cuemu_check_width(width);
  const unsigned lane = ::cuemu::lane_id(), source = lane ^ unsigned(lane_mask);
  const unsigned segment_end = (lane & ~unsigned(width - 1)) + unsigned(width);
  return cuemu_shuffle(mask, v, source >= segment_end ? lane : source);
}
inline unsigned __ballot_sync(unsigned mask, int p) { return ::cuemu::warp_ballot(mask, p); }
inline int __any_sync(unsigned mask, int p) { return ::cuemu::warp_ballot(mask, p) != 0; }
inline int __all_sync(unsigned mask, int p) { return ::cuemu::warp_ballot(mask, !p) == 0; }
