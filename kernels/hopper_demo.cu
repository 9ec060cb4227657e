// hopper_demo.cu: the end-to-end Hopper demonstration (issue 15), the seed of the Hopper
// grouped GEMM: TMA loads through a 3-stage mbarrier pipeline (tma_pipeline.cuh) into wgmma
// (wgmma_tile.cuh), with a producer warp and a consumer warpgroup. Test-only (dev-tools),
// driven by src/selftest/hopper_demo.rs on the emulator and on sm_90a GPUs.
//
// hopper_demo_gemm_bf16: C[M, N] = A[M, K] * B[K, N]; A, B row-major bf16, C row-major f32,
// f32 accumulation.
// Launch: grid (ceil(N / 128), ceil(M / 64)), 256 threads, kSharedBytes of dynamic shared
// memory. Tensor maps (SWIZZLE_128B, box 64 x 64): a over dims [K, M], b over dims [N, K];
// K and N multiples of 8 (16-byte row strides).
// Algorithm: block (x, y) owns the 64 x 128 tile of C at row 64y, column 128x and walks K in
// k-blocks of 64 through a ring of 3 stages; a stage holds A's 64 x 64 box (K-major: rows of
// 128 bytes, the 128-byte swizzle) and B's 64 x 128 slab as two 64 x 64 boxes (N-major, the
// same swizzle), exactly wgmma's canonical swizzled layouts (WgmmaTile). Boxes past the
// tensor's edges are zero-filled by TMA, so the ragged edges of M, N and K need no code.
// Thread mapping: warpgroup 0 (warps 0-3) is the producer and gives its registers away
// (setmaxnreg.dec 40); warps 1-3 exit, warp 0's elected lane acquires each stage (empty
// barrier), announces its 24 KiB on the full barrier and issues the three TMA loads.
// Warpgroup 1 (warps 4-7) is the consumer (setmaxnreg.inc 232): per k-block it waits for the
// stage, issues its four m64n128k16 wgmma as one batch and waits until only that batch is in
// flight, which retires the previous batch, so it then releases the previous stage. The
// accumulators (64 f32 per thread, wgmma's fragment layout) go straight to C, guarded at the
// edges.
// Memory traffic: A is read ceil(N / 128) times, B ceil(M / 64) times (once per tile they
// feed, 2 bytes an element), C written once (4 bytes an element); shared memory is written
// only by TMA and read only by wgmma.
//
// hopper_demo_planted_early_release: the same with a planted bug for the race detector
// (tests/hopper_async.rs): the consumer releases each stage right after issuing its batch,
// before the wait_group that covers the batch's reads, so the producer may refill a stage
// wgmma still reads. (The emulator's values may or may not show it, by schedule; the race
// detector reports it under every schedule.)
#include "tma_pipeline.cuh"
#include "wgmma_tile.cuh"

namespace {
constexpr int kStages = 3, kTileM = 64, kTileN = 128, kTileK = 64;
constexpr unsigned kBoxBytes = 64 * 64 * 2;                  // one 64 x 64 bf16 TMA box
constexpr unsigned kStageBytes = 3 * kBoxBytes;              // A's box and B's two
constexpr unsigned kSharedBytes = kStages * kStageBytes + 1024;  // + alignment to the swizzle repeat
static_assert(kSharedBytes <= 227 * 1024, "the ring fits an H100's shared memory per block");
constexpr unsigned kConsumerWarps = 4;
}  // namespace

template <bool EarlyRelease>
__device__ __forceinline__ void demo_gemm(TmaPipeline<kStages>& pipe, const TensorMap* map_a, const TensorMap* map_b,
                                          float* c, int m, int n, int k) {
  DYN_SHARED(unsigned char, raw);
  unsigned char* stages = align_1024(raw);
  const unsigned warp = threadIdx.x / 32;
  const int row0 = int(blockIdx.y) * kTileM, col0 = int(blockIdx.x) * kTileN;
  const int k_blocks = (k + kTileK - 1) / kTileK;
  if (threadIdx.x == 0) pipe.init(kConsumerWarps);
  __syncthreads();

  if (warp < 4) {  // the producer warpgroup
    setmaxnreg<false, 40>();
    if (warp == 0 && elect_one()) {
      PipelineState st{0, 0};
      for (int kb = 0; kb < k_blocks; ++kb) {
        unsigned char* stage = stages + st.stage * kStageBytes;
        pipe.producer_acquire(st);
        uint64_t* full = pipe.producer_commit(st, kStageBytes);
        tma_load<2>(stage, map_a, full, {kb * kTileK, row0});
        tma_load<2>(stage + kBoxBytes, map_b, full, {col0, kb * kTileK});
        tma_load<2>(stage + 2 * kBoxBytes, map_b, full, {col0 + 64, kb * kTileK});
        st.advance<kStages>();
      }
    }
    return;
  }

  setmaxnreg<true, 232>();  // the consumer warpgroup
  const WgmmaTile tile_a{kTileM, kTileK, SwizzleMode::B128, false};
  const WgmmaTile tile_b{kTileN, kTileK, SwizzleMode::B128, true};
  float acc[kTileN / 2];
#pragma unroll
  for (int r = 0; r < kTileN / 2; ++r) acc[r] = 0.0f;
  PipelineState read{0, 0}, release{0, 0};
  for (int kb = 0; kb < k_blocks; ++kb) {
    const unsigned char* stage = stages + read.stage * kStageBytes;
    pipe.consumer_wait(read);
    wgmma_tile_step<kTileN, kTileK, 1, __nv_bfloat16, false, true>(acc, tile_a, stage, tile_b, stage + kBoxBytes);
    if constexpr (EarlyRelease) {
      pipe.consumer_release(read);  // the bug: this batch's wgmma may still read the stage
    } else if (kb > 0) {  // wait_group 1 retired k-block kb-1's batch: its stage is free
      pipe.consumer_release(release);
      release.advance<kStages>();
    }
    read.advance<kStages>();
  }
  wgmma_wait_group<0>();
  wgmma_fence_operand(acc);

  const unsigned t = threadIdx.x - 128, w = t / 32, g = t % 32 / 4, q = t % 4;
#pragma unroll
  for (int j = 0; j < kTileN / 8; ++j)
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int row = row0 + int(16 * w + g) + 8 * (i / 2), col = col0 + 8 * j + int(2 * q) + i % 2;
      if (row < m && col < n) c[i64(row) * n + col] = acc[4 * j + i];
    }
}

extern "C" __global__ void __launch_bounds__(256, 1)
    hopper_demo_gemm_bf16(const __grid_constant__ TensorMap map_a, const __grid_constant__ TensorMap map_b, float* c,
                          int m, int n, int k) {
  __shared__ TmaPipeline<kStages> pipe;
  demo_gemm<false>(pipe, &map_a, &map_b, c, m, n, k);
}
EMU_EXPORT(hopper_demo_gemm_bf16)

extern "C" __global__ void __launch_bounds__(256, 1)
    hopper_demo_planted_early_release(const __grid_constant__ TensorMap map_a, const __grid_constant__ TensorMap map_b,
                                      float* c, int m, int n, int k) {
  __shared__ TmaPipeline<kStages> pipe;
  demo_gemm<true>(pipe, &map_a, &map_b, c, m, n, k);
}
EMU_EXPORT(hopper_demo_planted_early_release)
