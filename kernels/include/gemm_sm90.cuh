// gemm_sm90.cuh: the Hopper (sm_90a) grouped GEMM over every group with gemm_group.cuh's A
// rows and epilogues, forward (C_e = A_e B_e^T) and dgrad (dA_e = dC_e B_e): a persistent,
// warp-specialised CTA whose producer warpgroup fills a ring of shared-memory stages (weights
// by TMA, rows of the left operand by cp.async, gathered or not) and whose two consumer
// warpgroups run wgmma on them. "depth" below is the reduction: K (forward) or N (dgrad).
//
// Tile: 128 rows x 256 columns x 64 of depth per stage, kStages = 4 stages of 48 KiB
//   A   128 x 64 (rows of A, or of dC), K-major, 128-byte swizzle (wgmma's canonical layout,
//       WgmmaTile): consumer warpgroup w reads rows 64w..64w+63 (8 KiB in);
//   B   forward: two TMA boxes of 128 weight rows x 64 of K (the same layout), one 256-row
//       operand: plain store: B_e rows n0..n0+255 (n0 = 256 col); SwiGLU: gate rows
//       c0..c0+127 then up rows h+c0..h+c0+127 (c0 = 128 col), so output column c0 + j has its
//       gate value in accumulator column j and its up value in column 128 + j of the same
//       thread. Rows of a box past B_e's last row belong to the next expert (or are
//       zero-filled past the tensor); they only feed columns the epilogue does not store.
//       dgrad: four TMA boxes of 64 columns of K x 64 rows of B_e (MN-major, the same swizzle)
//       over B as [E][N][K], so rows past N are zero-filled: the reduction never reads another
//       expert's weights.
//   Depth past the end: TMA and cp.async zero-fill it.
// Schedule: grid = min(SMs, an upper bound on the tiles); CTA b takes tiles b, b + grid, ...
//   of grouped_tile_at (column tile major inside a group: CTAs running at once share B_e's
//   column tile in L2) until the schedule ends. Every warp resolves each tile itself from the
//   device-side offsets (no shared handoff, no host sync).
// Thread mapping (384 threads, 1 CTA per SM):
//   warpgroup 0, the producer (setmaxnreg.dec 56): per k-block every thread waits for the
//     stage to be empty, thread t copies 16-byte chunk t % 8 of A rows t / 8 + 16 i (i < 8:
//     four whole 128-byte rows per warp request) with cp.async into the swizzled layout, and
//     warp 0's elected lane announces B's 32 KiB and issues its two TMA loads. A thread's
//     copies of k-block kb are waited for (cp.async.wait_group 1) after it issued k-block
//     kb + 1's, then fenced to the async proxy, then it arrives on kb's full barrier (129
//     arrivals: 128 copiers + the TMA announcement).
//   warpgroups 1-2, the consumers (setmaxnreg.inc 224): per k-block wait for the stage, issue
//     the four m64n256k16 wgmma of its 64 rows as one batch, wait until only that batch is in
//     flight and release the previous stage (one arrival per warp: 8 per phase). After the
//     last k-block the accumulators (128 f32 per thread, wgmma's fragment layout) go through
//     the epilogue, each warp through its own 4 KiB staging tile after the ring (64 columns
//     at a time, stored as 16-byte row segments: epilogue_stage.cuh; the SwiGLU backward
//     stores from the fragments), while the producer already fills the next tile's stages.
// Memory traffic: each weight tile read once per row tile of its group (from L2 after the
//   first), each A row once per column tile, C (and GU) written once in whole 32-byte
//   sectors; the ring is written by TMA and cp.async and read only by wgmma.
// Contract (checked on the host): f16/bf16, N and K multiples of 8, A (dC) and B 16-byte
//   aligned, E N < 2^31 (TMA coordinates).
#pragma once
#include "epilogue_stage.cuh"
#include "gemm_group.cuh"
#include "tma_pipeline.cuh"
#include "wgmma_tile.cuh"

namespace sm90 {
constexpr int kStages = 4, kTileM = 128, kTileN = 256, kTileK = 64, kThreads = 384;
constexpr unsigned kBoxRows = 128;                                  // weight rows per TMA box
constexpr unsigned kABytes = kTileM * kTileK * 2;                   // 16 KiB
constexpr unsigned kBoxBytes = kBoxRows * kTileK * 2;               // 16 KiB
constexpr unsigned kStageBytes = kABytes + 2 * kBoxBytes;           // 48 KiB
// The ring (+ alignment to the swizzle repeat), then each consumer warp's epilogue staging tile.
constexpr unsigned kSharedBytes = kStages * kStageBytes + 1024 + 8 * stage::kWarpBytes;
constexpr unsigned kProducers = 128, kConsumerWarps = 8;
// Registers per thread after setmaxnreg: the producer keeps its 8 A-row indices and addresses
// in 56 (40 spills), the consumers get the rest of the 64K: 128 x 56 + 256 x 224 = 168 x 384.
constexpr int kProducerRegs = 56, kConsumerRegs = 224;
static_assert(kProducers * kProducerRegs + 2 * kProducers * kConsumerRegs == 168 * kThreads,
              "setmaxnreg moves registers between the warpgroups, it adds none");
constexpr int kRowsPerCopier = kTileM * kTileK * 2 / 16 / kProducers;  // 8 rows of one chunk each
static_assert(kSharedBytes <= 227 * 1024, "the ring and the staging tiles fit an H100's shared memory per block");
}  // namespace sm90

// What the sm_90a kernels need: the forward's or dgrad's operands and epilogue.
template <class T> struct Sm90Args {
  const TensorMap* map_b;  // forward: B as [E N rows, K], boxes 128 x 64; dgrad: [E][N][K], boxes 64 x 64 x 1
  GroupedRows<T> a;        // rows of the left operand, `depth` long
  const int* offsets;
  int experts;
  i64 rows;
  i64 b_rows;  // N: rows of each B_e
  i64 depth;   // the reduction: K (forward) or N (dgrad)
  i64 cols;    // output columns: N (store), N/2 (SwiGLU), K (dgrad)
  Epilogue<T> epi;

  __device__ __forceinline__ bool swiglu() const { return epi.mode == EPI_SWIGLU; }
  __device__ __forceinline__ int col_tiles() const {
    const i64 per = swiglu() ? sm90::kBoxRows : sm90::kTileN;
    return int((cols + per - 1) / per);
  }
  __device__ __forceinline__ GroupTile tile(i64 t) const {
    return grouped_tile_at(offsets, experts, rows, sm90::kTileM, col_tiles(), t);
  }
};

// A copying producer thread's side of the ring: after issuing (and committing) its cp.async
// copies of a stage, it waits for those of the stage before (one stage behind, so two stages'
// copies are in flight), fences them to the async proxy and arrives on that stage's full
// barrier; finish does the same for the last stage.
struct CopyLanding {
  PipelineState landing{0, 0};
  bool pending = false;

  template <int Stages>
  __device__ __forceinline__ void copied(TmaPipeline<Stages>& pipe) {
    cp_async_commit();
    if (pending) {  // the previous stage's copies: landed, visible to wgmma, announced
      cp_async_wait<1>();
      fence_proxy_async_shared_cta();
      pipe.producer_arrive(landing);
      landing.advance<Stages>();
    }
    pending = true;
  }
  template <int Stages>
  __device__ __forceinline__ void finish(TmaPipeline<Stages>& pipe) {
    if (!pending) return;
    cp_async_wait<0>();
    fence_proxy_async_shared_cta();
    pipe.producer_arrive(landing);
  }
};

// The consumer warps' staging tiles (epilogue_stage.cuh), 4 KiB each, after the ring.
__device__ __forceinline__ float* sm90_staging(unsigned char* stages) {
  return reinterpret_cast<float*>(stages + sm90::kStages * sm90::kStageBytes);
}

// The producer warpgroup: A by cp.async, B by TMA, stage after stage over the CTA's tiles.
template <bool Dgrad, class T>
__device__ __forceinline__ void sm90_produce(const Sm90Args<T>& p, TmaPipeline<sm90::kStages>& pipe,
                                             unsigned char* stages) {
  using namespace sm90;
  const unsigned t = threadIdx.x, chunk = t % 8;
  const WgmmaTile tile_a{kTileM, kTileK, SwizzleMode::B128, false};
  const int k_blocks = int((p.depth + kTileK - 1) / kTileK);
  PipelineState st{0, 0};
  CopyLanding landing;
  for (i64 next = blockIdx.x;; next += gridDim.x) {
    const GroupTile g = p.tile(next);
    if (g.e < 0) break;
    int src[kRowsPerCopier];  // the A row each of this thread's tile rows reads, -1 for zeros
#pragma unroll
    for (int i = 0; i < kRowsPerCopier; ++i) {
      const i64 r = g.row0 + t / 8 + 16 * i;
      src[i] = r < g.row_end ? int(p.a.source(r)) : -1;
    }
    // Forward: the first weight row of each box (SwiGLU: gate, then up = gate + h).
    const i64 b_row0 = i64(g.e) * p.b_rows + (p.swiglu() ? i64(g.col) * kBoxRows : i64(g.col) * kTileN);
    const i64 b_row1 = p.swiglu() ? b_row0 + p.cols : b_row0 + kBoxRows;
    for (int kb = 0; kb < k_blocks; ++kb) {
      unsigned char* stage = stages + st.stage * kStageBytes;
      pipe.producer_acquire(st);
      if (t < 32 && elect_one()) {
        uint64_t* full = pipe.producer_commit(st, 2 * kBoxBytes);
        if constexpr (Dgrad) {
#pragma unroll
          for (int j = 0; j < 4; ++j)
            tma_load<3>(stage + kABytes + j * (kBoxBytes / 2), p.map_b, full,
                        {g.col * kTileN + 64 * j, kb * kTileK, g.e});
        } else {
          tma_load<2>(stage + kABytes, p.map_b, full, {kb * kTileK, int(b_row0)});
          tma_load<2>(stage + kABytes + kBoxBytes, p.map_b, full, {kb * kTileK, int(b_row1)});
        }
      }
      const i64 k = i64(kb) * kTileK + chunk * 8;
#pragma unroll
      for (int i = 0; i < kRowsPerCopier; ++i) {
        const bool inside = src[i] >= 0 && k < p.depth;
        const T* from = inside ? p.a.a + i64(src[i]) * p.a.ld + k : p.a.a;
        cp_async<16>(stage + tile_a.offset(t / 8 + 16 * i, chunk * 8), from, inside ? 16 : 0);
      }
      landing.copied(pipe);
      st.advance<kStages>();
    }
  }
  landing.finish(pipe);
}

// One tile's mainloop for a consumer warpgroup: acc = 0, then per k-block wait for the stage,
// issue its wgmma batch (A at a_offset into the stage, B after the A tile) and, once only that
// batch is in flight, release the previous stage; at the end wait for everything and release
// the last stage. k_blocks may be 0 (acc stays 0, no stage is touched). The wait is
// unconditional: one on some paths only to the epilogue makes ptxas inject its own (C7517).
template <class T, bool TransA, bool TransB>
__device__ __forceinline__ void sm90_tile_mainloop(float (&acc)[sm90::kTileN / 2], TmaPipeline<sm90::kStages>& pipe,
                                                   PipelineState& read, PipelineState& release, int k_blocks,
                                                   const unsigned char* stages, const WgmmaTile& tile_a,
                                                   unsigned a_offset, const WgmmaTile& tile_b) {
  using namespace sm90;
#pragma unroll
  for (int r = 0; r < kTileN / 2; ++r) acc[r] = 0.0f;
  for (int kb = 0; kb < k_blocks; ++kb) {
    const unsigned char* stage = stages + read.stage * kStageBytes;
    pipe.consumer_wait(read);
    wgmma_tile_step<kTileN, kTileK, 1, T, TransA, TransB>(acc, tile_a, stage + a_offset, tile_b, stage + kABytes);
    if (kb > 0) {  // wait_group 1 retired k-block kb-1's batch: its stage is free
      pipe.consumer_release(release);
      release.advance<kStages>();
    }
    read.advance<kStages>();
  }
  wgmma_wait_group<0>();
  wgmma_fence_operand(acc);
  if (k_blocks > 0) {
    pipe.consumer_release(release);
    release.advance<kStages>();
  }
}

// A consumer warp's epilogue of one tile: its 16 rows r0.. (the first `rows` of them inside the
// group) of the accumulators (accumulator 4j + 2 half + i: row g8 + 8 half, column 8j + 2q + i).
// The plain store (forward and dgrad) and SwiGLU go through the warp's staging tile, 64 columns
// at a time: 16-byte stores of whole row segments. SwiGLU's output column c0 + j has its gate
// value in column j and its up value in column 128 + j; GU, when saved, is two more outputs
// (gate at column c, up at h + c of each 2h row). The SwiGLU backward (dgrad) stages dh, then
// reads GU and writes dGU by row segments (WarpStage::swiglu_backward_rows).
template <bool Dgrad, class T>
__device__ __forceinline__ void sm90_epilogue(const Sm90Args<T>& p, const float (&acc)[sm90::kTileN / 2],
                                              WarpStage stage, i64 r0, int rows, int col_tile) {
  using namespace sm90;
  const int g8 = int(threadIdx.x % 32 / 4);
  const float s[2] = {g8 < rows ? p.epi.scale(r0 + g8) : 0.0f, g8 + 8 < rows ? p.epi.scale(r0 + g8 + 8) : 0.0f};
  const Epilogue<T>& epi = p.epi;
  // The staged piece to columns col0.. of the output.
  const auto store_out = [&](auto* out, i64 ld, i64 col0) { stage.store_rows(out, ld, r0, rows, col0, p.cols); };
  if (!Dgrad && p.swiglu()) {
    const i64 c0 = i64(col_tile) * kBoxRows;
#pragma unroll
    for (int piece = 0; piece < 2; ++piece) {
      const i64 col0 = c0 + 64 * piece;
      const auto gate = [&](int j, int half, int i) { return acc[4 * (8 * piece + j) + 2 * half + i] * s[half]; };
      const auto up = [&](int j, int half, int i) { return acc[4 * (8 * piece + j + kTileN / 16) + 2 * half + i] * s[half]; };
      if (epi.gu != nullptr) {
        stage.put_fragments(gate);
        stage.store_rows(epi.gu, 2 * epi.h, r0, rows, col0, epi.h);
        stage.put_fragments(up);
        stage.store_rows(epi.gu + epi.h, 2 * epi.h, r0, rows, col0, epi.h);
      }
      stage.put_fragments([&](int j, int half, int i) {
        const float gv = gate(j, half, i);
        return gv * sigmoidf_(gv) * up(j, half, i);
      });
      if (epi.out_f32) store_out(static_cast<float*>(epi.out), epi.ld, col0);
      else store_out(static_cast<T*>(epi.out), epi.ld, col0);
    }
  } else {  // the plain store, or dgrad's SwiGLU backward (dh staged; GU read by row segments)
    const i64 c0 = i64(col_tile) * kTileN;
#pragma unroll
    for (int piece = 0; piece < kTileN / 64; ++piece) {
      const i64 col0 = c0 + 64 * piece;
      stage.put_fragments([&](int j, int half, int i) { return acc[4 * (8 * piece + j) + 2 * half + i] * s[half]; });
      if (epi.mode == EPI_STORE) {
        if (epi.out_f32) store_out(static_cast<float*>(epi.out), epi.ld, col0);
        else store_out(static_cast<T*>(epi.out), epi.ld, col0);
      } else if constexpr (Dgrad) {
        if (epi.out_f32) stage.swiglu_backward_rows(static_cast<float*>(epi.out), epi.ld, epi.gu, epi.h, r0, rows, col0, p.cols);
        else stage.swiglu_backward_rows(static_cast<T*>(epi.out), epi.ld, epi.gu, epi.h, r0, rows, col0, p.cols);
      }
    }
  }
}

// The consumer warpgroups: wgmma over each tile's stages, then the epilogue.
template <bool Dgrad, class T>
__device__ __forceinline__ void sm90_consume(const Sm90Args<T>& p, TmaPipeline<sm90::kStages>& pipe,
                                             const unsigned char* stages, float* staging) {
  using namespace sm90;
  const unsigned wg = threadIdx.x / 128 - 1, w = threadIdx.x % 128 / 32;
  const WgmmaTile tile_a{64, kTileK, SwizzleMode::B128, false};
  const WgmmaTile tile_b{kTileN, kTileK, SwizzleMode::B128, Dgrad};  // dgrad: MN-major
  const int k_blocks = int((p.depth + kTileK - 1) / kTileK);
  PipelineState read{0, 0}, release{0, 0};
  float acc[kTileN / 2];
  for (i64 next = blockIdx.x;; next += gridDim.x) {
    const GroupTile g = p.tile(next);
    if (g.e < 0) break;
    sm90_tile_mainloop<T, false, Dgrad>(acc, pipe, read, release, k_blocks, stages, tile_a, wg * (kABytes / 2),
                                        tile_b);

    const i64 r0 = g.row0 + 64 * wg + 16 * w;  // this warp's 16 rows
    const int rows = int(r0 < g.row_end ? (g.row_end - r0 < 16 ? g.row_end - r0 : 16) : 0);
    if (rows > 0) sm90_epilogue<Dgrad>(p, acc, WarpStage{staging + (4 * wg + w) * (stage::kWarpBytes / 4)}, r0, rows, g.col);
  }
}

// The kernel body: barriers, the 1024-aligned ring, then the warpgroups' roles.
template <bool Dgrad, class T>
__device__ __forceinline__ void grouped_gemm_sm90(const Sm90Args<T>& p, TmaPipeline<sm90::kStages>& pipe) {
#if defined(__CUDA_ARCH__) && !defined(MOE_SM90A)
  __trap();  // wgmma exists only in sm_90a code, and the host launches this kernel nowhere else
#else
  DYN_SHARED(unsigned char, raw);
  unsigned char* stages = align_1024(raw);
  if (threadIdx.x == 0) pipe.init(sm90::kConsumerWarps, sm90::kProducers);
  __syncthreads();
  if (threadIdx.x < sm90::kProducers) {
    setmaxnreg<false, sm90::kProducerRegs>();
    sm90_produce<Dgrad>(p, pipe, stages);
  } else {
    setmaxnreg<true, sm90::kConsumerRegs>();
    sm90_consume<Dgrad>(p, pipe, stages, sm90_staging(stages));
  }
#endif
}
