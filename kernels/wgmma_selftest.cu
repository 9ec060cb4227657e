// wgmma_selftest.cu: self-tests of Hopper's warpgroup MMA (ptx.cuh: wgmma_m64k16 and its
// fence / commit / wait, the matrix descriptor, fence.proxy.async). They run on the emulator
// and on sm_90a GPUs; in other GPU builds wgmma traps.
//
// Kernels:
//   selftest_wgmma_bf16_n64    D (64 x 64) = A (64 x k) * B (k x 64), bf16, every layout option
//   selftest_wgmma_bf16_n256   the same with N = 256
//   selftest_wgmma_f16_n128    the same with f16 inputs and N = 128
//
// Launch: one block of 128 threads (one warpgroup); dynamic shared memory 1024 + 2 (64 + N) k
// bytes. a: 64 x k row-major, bt: N x k row-major (B transposed), both 16-bit bit patterns of
// T; d: 64 x N row-major f32. k a multiple of 64, at most 128.
// mode_a, mode_b: the SwizzleMode of each tile; flags: bit 0 A from registers (fragments read
// from global memory), bit 1 A stored MN-major, bit 2 B stored MN-major.
// Mapping: every thread copies elements a[i], bt[i] for i = t, t + 128, ... into the tiles
// (WgmmaTile, ordinary stores), fences the async proxy, then the warpgroup issues one wgmma
// per 16-deep slice, committing each and keeping at most one in flight (wait_group 1; 0 with
// A in registers, which the next slice rewrites), the first with scale-d = 0 over
// accumulators that start as NaN. Traffic: A and B once.
// Host: d[m][n] = sum_kk a[m][kk] * bt[n][kk]; exact on small integers.
#include "wgmma_layout.cuh"

template <class T, int N, bool TransA, bool TransB>
__device__ __forceinline__ void wgmma_slice(float (&acc)[N / 2], const WgmmaTile& ta, const unsigned char* tile_a,
                                            const uint32_t (&a_regs)[4], bool a_in_registers, const WgmmaTile& tb,
                                            const unsigned char* tile_b, unsigned s) {
  if (a_in_registers)
    wgmma_m64k16<N, T, TransB>(acc, a_regs, tb.slice(tile_b, s), s > 0);
  else
    wgmma_m64k16<N, T, TransA, TransB>(acc, ta.slice(tile_a, s), tb.slice(tile_b, s), s > 0);
}

template <class T, int N>
__device__ __forceinline__ void wgmma_selftest_body(const uint16_t* a, const uint16_t* bt, float* d, int k, int mode_a,
                                                    int mode_b, int flags) {
  DYN_SHARED(unsigned char, raw);
  const unsigned t = threadIdx.x, depth = unsigned(k);
  const bool a_in_registers = flags & 1;
  const WgmmaTile ta{64, depth, SwizzleMode(mode_a), (flags & 2) != 0};
  const WgmmaTile tb{N, depth, SwizzleMode(mode_b), (flags & 4) != 0};
  unsigned char* tile_a = align_1024(raw);
  unsigned char* tile_b = tile_a + ta.bytes();
  for (unsigned i = t; i < 64 * depth; i += 128)
    *reinterpret_cast<uint16_t*>(tile_a + ta.offset(i / depth, i % depth)) = a[i];
  for (unsigned i = t; i < N * depth; i += 128)
    *reinterpret_cast<uint16_t*>(tile_b + tb.offset(i / depth, i % depth)) = bt[i];
  fence_proxy_async_shared_cta();
  __syncthreads();

  const unsigned w = t / 32, g = t % 32 / 4, q = t % 4;
  float acc[N / 2];
#pragma unroll
  for (int r = 0; r < N / 2; ++r) acc[r] = __uint_as_float(kQuietNaN);  // scale-d = 0 must ignore these
  wgmma_fence_operand(acc);
  for (unsigned s = 0; s < depth / 16; ++s) {
    uint32_t a_regs[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const i64 at = i64(16 * w + g + 8 * (i % 2)) * depth + 16 * s + 2 * q + 8 * (i / 2);
      a_regs[i] = uint32_t(a[at]) | uint32_t(a[at + 1]) << 16;
    }
    wgmma_fence();
    if (ta.mn_major && tb.mn_major) wgmma_slice<T, N, true, true>(acc, ta, tile_a, a_regs, a_in_registers, tb, tile_b, s);
    else if (ta.mn_major) wgmma_slice<T, N, true, false>(acc, ta, tile_a, a_regs, a_in_registers, tb, tile_b, s);
    else if (tb.mn_major) wgmma_slice<T, N, false, true>(acc, ta, tile_a, a_regs, a_in_registers, tb, tile_b, s);
    else wgmma_slice<T, N, false, false>(acc, ta, tile_a, a_regs, a_in_registers, tb, tile_b, s);
    wgmma_commit_group();
    // A's registers, like the accumulators, belong to the wgmma until its wait: the next
    // slice may overwrite them only after a full wait.
    if (a_in_registers) wgmma_wait_group<0>();
    else wgmma_wait_group<1>();
  }
  wgmma_wait_group<0>();
  wgmma_fence_operand(acc);
#pragma unroll
  for (int j = 0; j < N / 8; ++j)
#pragma unroll
    for (int i = 0; i < 4; ++i) d[(16 * w + g + 8 * (i / 2)) * N + 8 * j + 2 * q + i % 2] = acc[4 * j + i];
}

extern "C" __global__ void __launch_bounds__(128, 1)
    selftest_wgmma_bf16_n64(const uint16_t* a, const uint16_t* bt, float* d, int k, int mode_a, int mode_b, int flags) {
  wgmma_selftest_body<__nv_bfloat16, 64>(a, bt, d, k, mode_a, mode_b, flags);
}
EMU_EXPORT(selftest_wgmma_bf16_n64)

extern "C" __global__ void __launch_bounds__(128, 1)
    selftest_wgmma_bf16_n256(const uint16_t* a, const uint16_t* bt, float* d, int k, int mode_a, int mode_b, int flags) {
  wgmma_selftest_body<__nv_bfloat16, 256>(a, bt, d, k, mode_a, mode_b, flags);
}
EMU_EXPORT(selftest_wgmma_bf16_n256)

extern "C" __global__ void __launch_bounds__(128, 1)
    selftest_wgmma_f16_n128(const uint16_t* a, const uint16_t* bt, float* d, int k, int mode_a, int mode_b, int flags) {
  wgmma_selftest_body<__half, 128>(a, bt, d, k, mode_a, mode_b, flags);
}
EMU_EXPORT(selftest_wgmma_f16_n128)
