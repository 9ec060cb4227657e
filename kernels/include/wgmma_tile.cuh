// wgmma_tile.cuh: one step of a warpgroup GEMM over a shared-memory stage, the tensor-core
// half of a TMA pipeline (tma_pipeline.cuh): acc (64 x N, f32) += A (64 x Depth) * B (Depth x N)
// with A and B in wgmma's canonical layouts (wgmma_layout.cuh's WgmmaTile; TMA with the
// matching swizzle writes them), as Depth / 16 wgmma.mma_async m64nNk16 in one committed batch.
//
// The step returns once at most `Pending` batches are in flight (wgmma.wait_group Pending):
// with Pending = 1 the batch just issued may still run while the caller releases the stage of
// the batch before it, whose shared reads that wait covered. The whole warpgroup calls it with
// uniform arguments; acc must be initialised (every wgmma accumulates).
#pragma once
#include "wgmma_layout.cuh"

template <int N, int Depth, int Pending, class T, bool TransA, bool TransB>
__device__ __forceinline__ void wgmma_tile_step(float (&acc)[N / 2], const WgmmaTile& ta, const unsigned char* a,
                                                const WgmmaTile& tb, const unsigned char* b) {
  static_assert(Depth % 16 == 0, "a stage is a whole number of 16-deep slices");
  wgmma_fence_operand(acc);
  wgmma_fence();  // the accumulators were written (initialised, or by the previous batch)
#pragma unroll
  for (unsigned s = 0; s < unsigned(Depth / 16); ++s)
    wgmma_m64k16<N, T, TransA, TransB>(acc, ta.slice(a, s), tb.slice(b, s), true);
  wgmma_commit_group();
  wgmma_wait_group<Pending>();
  wgmma_fence_operand(acc);
}
