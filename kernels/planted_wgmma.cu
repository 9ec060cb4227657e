// planted_wgmma.cu: kernels with deliberate wgmma / warpgroup bugs, one per mode, to prove the
// emulator catches them (kernels/emu/wgmma.cpp). Mode 0 is the control and must pass. Never
// launched on a GPU by the tests (the bugs are undefined behaviour there); compiled by nvcc only
// to keep them valid CUDA.
//
// Kernels:
//   planted_wgmma_pipeline   a two-stage wgmma k-loop (bf16, N = 64), bug by mode:
//                              1 a stage refilled while the wgmma reading it is in flight
//                              2 the accumulators read before the covering wait_group
//                              3 the tiles written without fence.proxy.async
//   planted_warpgroup        warpgroup collectives by a block of two warpgroups, bug by mode:
//                              1 wgmma by warps 1..4 (not an aligned warpgroup)
//                              2 setmaxnreg with two register counts in one warpgroup
#include "wgmma_layout.cuh"

// ------------------------------------------------------------------------------------------
// planted_wgmma_pipeline: d (64 x 64) = a (64 x 64) * bt^T, as selftest_wgmma_bf16_n64 with
// K-major 128B-swizzled tiles, but one 16-deep slice at a time through two stages: slice s is
// written into stage s % 2 by ordinary stores, fenced, and multiplied; wait_group 1 then
// guarantees that slice s-1's wgmma is done, so the next iteration may refill its stage.
// Launch: 1 block of 128 threads, 1024 + 2 * 16 KiB of dynamic shared memory.
// Host (control): d[m][n] = sum_kk a[m][kk] * bt[n][kk]. Bugs: (1) wait_group 2 lets slice
// s-1's wgmma still be in flight when its stage is refilled: the emulator reads the operands
// at the covering wait, so d differs; (2) d stored before wait_group 0: NaN; (3) no fence: the
// launch fails naming fence.proxy.async.
extern "C" __global__ void __launch_bounds__(128, 1)
    planted_wgmma_pipeline(const uint16_t* a, const uint16_t* bt, float* d, int mode) {
  DYN_SHARED(unsigned char, raw);
  constexpr unsigned kDepth = 64, kN = 64, kSlices = kDepth / 16;
  const WgmmaTile tile{64, 16, SwizzleMode::B128, false};  // one slice: 64 rows of 16 (of 64) elements
  unsigned char* stages = align_1024(raw);
  const unsigned t = threadIdx.x, w = t / 32, g = t % 32 / 4, q = t % 4;
  float acc[kN / 2];
#pragma unroll
  for (int r = 0; r < int(kN / 2); ++r) acc[r] = 0.0f;
  wgmma_fence_operand(acc);
  for (unsigned s = 0; s < kSlices; ++s) {
    unsigned char* a_tile = stages + s % 2 * 16 * 1024;
    unsigned char* b_tile = a_tile + 8 * 1024;  // a stage: A then B, 8 KiB each (rows of 128 bytes)
    for (unsigned i = t; i < 64 * 16; i += 128) {
      const unsigned row = i / 16, kk = i % 16;
      *reinterpret_cast<uint16_t*>(a_tile + tile.offset(row, kk)) = a[row * kDepth + 16 * s + kk];
      *reinterpret_cast<uint16_t*>(b_tile + tile.offset(row, kk)) = bt[row * kDepth + 16 * s + kk];
    }
    if (mode != 3) fence_proxy_async_shared_cta();
    __syncthreads();
    wgmma_fence();
    wgmma_m64k16<kN, __nv_bfloat16>(acc, tile.slice(a_tile, 0), tile.slice(b_tile, 0), true);
    wgmma_commit_group();
    if (mode == 1) wgmma_wait_group<2>();
    else wgmma_wait_group<1>();
  }
  if (mode == 2) {
    for (int j = 0; j < int(kN / 8); ++j)
      for (int i = 0; i < 4; ++i) d[(16 * w + g + 8 * (i / 2)) * kN + 8 * j + 2 * q + i % 2] = acc[4 * j + i];
  }
  wgmma_wait_group<0>();
  wgmma_fence_operand(acc);
  if (mode == 2) return;
#pragma unroll
  for (int j = 0; j < int(kN / 8); ++j)
#pragma unroll
    for (int i = 0; i < 4; ++i) d[(16 * w + g + 8 * (i / 2)) * kN + 8 * j + 2 * q + i % 2] = acc[4 * j + i];
}
EMU_EXPORT(planted_wgmma_pipeline)

// ------------------------------------------------------------------------------------------
// planted_warpgroup: warp 0 is a "producer" that only waits at the final barrier; the other
// warps run warpgroup collectives. Control (mode 0): warpgroup 0 lowers its register budget
// (setmaxnreg.dec 40), warpgroup 1 (warps 4..7) raises its own (setmaxnreg.inc 232) and runs
// wgmma.fence / commit_group / wait_group 0; out[t] = t. Bugs: (1) the wgmma collectives run by
// warps 1..4, which straddle two warpgroups: a deadlock or an exited-thread error naming the
// warpgroup; (2) warps 6 and 7 ask setmaxnreg.inc for 240 registers: an error naming setmaxnreg.
// Launch: 1 block of 256 threads; out has 256 ints.
extern "C" __global__ void __launch_bounds__(256, 1) planted_warpgroup(int* out, int mode) {
  const unsigned t = threadIdx.x, warp = t / 32;
  if (warp < 4) setmaxnreg<false, 40>();
  else if (mode == 2 && warp >= 6) setmaxnreg<true, 240>();
  else setmaxnreg<true, 232>();
  const bool consumer = mode == 1 ? warp >= 1 && warp <= 4 : warp >= 4;
  if (consumer) {
    wgmma_fence();
    wgmma_commit_group();
    wgmma_wait_group<0>();
  }
  __syncthreads();
  out[t] = int(t);
}
EMU_EXPORT(planted_warpgroup)
