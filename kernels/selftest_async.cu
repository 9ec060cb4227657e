// selftest_async.cu: self-tests of Hopper's asynchronous data movement (ptx.cuh: mbarrier,
// TMA tensor copies, bulk copies, elect.sync, fence.proxy.async), each against an output the
// host computes from the formula above the kernel (src/selftest/hopper.rs). sm_90 only: on
// older GPUs the wrappers trap, and the Rust side does not launch these there.
//
// Kernels:
//   selftest_mbarrier_pipeline   a producer thread and consumer warps through S stages of
//                                full/empty mbarriers over R rounds, rows moved by bulk copies,
//                                results written back by a bulk store
//   selftest_tma_roundtrip_{2..5}d  a TMA load of one box (edges zero-filled, swizzled), the
//                                raw shared tile copied out, and a TMA store of the tile
#include "ptx.cuh"

// The first byte at or after `p` whose shared-memory address is a multiple of `align`. The
// swizzle patterns follow shared addresses, not offsets from the dynamic base (which the
// emulator aligns to 1024 bytes; on the GPU static shared memory may come first).
__device__ __forceinline__ unsigned char* align_shared(unsigned char* p, unsigned align) {
#if defined(__CUDA_ARCH__)
  const unsigned address = shared_address(p);
#else
  const unsigned address = unsigned(reinterpret_cast<uintptr_t>(p));
#endif
  return p + (align - address % align) % align;
}

// ------------------------------------------------------------------------------------------
// selftest_mbarrier_pipeline: R rounds through S stages (1 <= S <= 8) of a ring in shared memory.
// Launch: blockDim.x = 32 + C (C a multiple of 4, consumers), one block; dynamic shared memory
// S * 4C + 4C bytes + 16 (alignment). src holds R rows of C u32, out C u32.
// Mapping: warp 0 is the producer: its elected lane, for round r (stage s = r % S, use
// u = r / S of that stage), waits empty[s] for parity (u & 1) ^ 1 (a fresh barrier passes),
// announces 4C bytes on full[s] and bulk-copies row r into the stage. Thread 32 + i (consumer i)
// waits full[s] for parity u & 1 (test_wait on odd rounds, try_wait on even), reads element i of
// the stage, and arrives on empty[s] (count C). full[s] counts one arrival plus the bytes.
// After the last round each consumer writes acc to a shared result row, which, after a block
// barrier and fence.proxy.async, thread 32 bulk-stores to out.
// Host: acc_i = 0; for r in 0..R: acc_i = acc_i * 31 + src[r*C + i] (u32, wrapping).
constexpr int kMaxStages = 8;

extern "C" __global__ void selftest_mbarrier_pipeline(const unsigned* src, int rounds, int stages,
                                                      unsigned* out) {
  __shared__ __align__(8) uint64_t full[kMaxStages], empty[kMaxStages];
  DYN_SHARED(unsigned char, dyn);
  const int consumers = int(blockDim.x) - 32;
  const unsigned row_bytes = 4u * unsigned(consumers);
  unsigned* ring = reinterpret_cast<unsigned*>(align_shared(dyn, 16));
  unsigned* result = ring + stages * consumers;
  const int t = threadIdx.x;
  if (t == 0)
    for (int s = 0; s < stages; ++s) {
      mbarrier_init(&full[s], 1);
      mbarrier_init(&empty[s], unsigned(consumers));
    }
  __syncthreads();
  if (t < 32) {
    if (elect_one())
      for (int r = 0; r < rounds; ++r) {
        const int s = r % stages, u = r / stages;
        mbarrier_wait(&empty[s], unsigned(u & 1) ^ 1u);
        mbarrier_arrive_expect_tx(&full[s], row_bytes);
        bulk_load(ring + s * consumers, src + i64(r) * consumers, row_bytes, &full[s]);
      }
  } else {
    const int i = t - 32;
    unsigned acc = 0;
    for (int r = 0; r < rounds; ++r) {
      const int s = r % stages, u = r / stages;
      if (r & 1)
        while (!mbarrier_test_wait_parity(&full[s], unsigned(u & 1))) {}
      else
        mbarrier_wait(&full[s], unsigned(u & 1));
      acc = acc * 31u + ring[s * consumers + i];
      mbarrier_arrive(&empty[s]);
    }
    result[i] = acc;
  }
  __syncthreads();
  if (t == 32) {
    fence_proxy_async_shared_cta();  // the result row was written by ordinary stores
    bulk_store(out, result, row_bytes);
    bulk_commit_group();
    bulk_wait_group<0>();
  }
}
EMU_EXPORT(selftest_mbarrier_pipeline)

// ------------------------------------------------------------------------------------------
// selftest_tma_roundtrip_Nd: one box through shared memory and back.
// Launch: one block of any size; dynamic shared memory box_bytes + 1024 (alignment).
// coords: 2N ints, the load's box coordinates then the store's (dimension 0 first).
// Mapping: thread 0 initialises the barrier, announces box_bytes and loads the box of `src` at
// coords[0..N) into a tile aligned to 1024 bytes; every thread waits, then copies the tile
// byte-for-byte (16 bytes a thread per step) to tile_out. Thread 0 then stores the tile to
// `dst` at coords[N..2N) and waits for the store.
// Host: tile_out byte at swizzle(o) (o = e * element size, e the box element's index, dimension
// 0 fastest; swizzle as in swizzle.cuh on the offset from the aligned tile) holds the source
// element at coords + index, or zeros where that is outside the tensor; dst gets each box
// element whose store position is inside the tensor, the rest of dst is unchanged.
template <int N>
__device__ __forceinline__ void tma_roundtrip(const TensorMap* src, const TensorMap* dst, const int* coords,
                                              unsigned box_bytes, unsigned char* tile_out) {
  __shared__ __align__(8) uint64_t bar;
  DYN_SHARED(unsigned char, dyn);
  unsigned char* tile = align_shared(dyn, 1024);
  if (threadIdx.x == 0) mbarrier_init(&bar, 1);
  __syncthreads();
  int c[N];
  for (int d = 0; d < N; ++d) c[d] = coords[d];
  if (threadIdx.x == 0) {
    mbarrier_arrive_expect_tx(&bar, box_bytes);
    tma_load<N>(tile, src, &bar, c);
  }
  mbarrier_wait(&bar, 0);
  for (unsigned i = threadIdx.x; i < box_bytes / 16; i += blockDim.x)
    reinterpret_cast<uint4*>(tile_out)[i] = reinterpret_cast<const uint4*>(tile)[i];
  if (threadIdx.x == 0) {
    for (int d = 0; d < N; ++d) c[d] = coords[N + d];
    tma_store<N>(dst, tile, c);
    bulk_commit_group();
    bulk_wait_group<0>();
  }
}

// One entry point per rank (each must be named on its own EMU_EXPORT line).
#define MOE_TMA_ROUNDTRIP(N)                                                                   \
  extern "C" __global__ void selftest_tma_roundtrip_##N##d(                                    \
      const __grid_constant__ TensorMap src, const __grid_constant__ TensorMap dst,            \
      const int* coords, unsigned box_bytes, unsigned char* tile_out) {                         \
    tma_roundtrip<N>(&src, &dst, coords, box_bytes, tile_out);                                  \
  }
MOE_TMA_ROUNDTRIP(2)
EMU_EXPORT(selftest_tma_roundtrip_2d)
MOE_TMA_ROUNDTRIP(3)
EMU_EXPORT(selftest_tma_roundtrip_3d)
MOE_TMA_ROUNDTRIP(4)
EMU_EXPORT(selftest_tma_roundtrip_4d)
MOE_TMA_ROUNDTRIP(5)
EMU_EXPORT(selftest_tma_roundtrip_5d)
#undef MOE_TMA_ROUNDTRIP
