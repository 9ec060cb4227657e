// tma_pipeline.cuh: a ring of shared-memory stages filled by TMA (or bulk) copies and drained
// by consumers, synchronised by a full and an empty mbarrier per stage (ptx.cuh). The shape of
// CUTLASS 3's PipelineTmaAsync and ThunderKittens' producer/consumer loops, for one CTA.
//
//   producer (one elected thread)              consumers (every consumer thread)
//   producer_acquire(st)  wait empty[s]        consumer_wait(st)     wait full[s]
//   full = producer_commit(st, bytes)          ... read stage s (or issue wgmma on it) ...
//   tma_load(stage s, ..., full)               consumer_release(st)  one arrival per warp on
//   st.advance()                                                     empty[s], after the reads
//                                                                    are done (for wgmma: after
//                                                                    the wait_group covering them)
//                                              st.advance()
//
// PipelineState names the stage a side works on and the parity of that stage's current use:
// use u of stage s is k-block u * Stages + s, and its parity is u & 1. A consumer waits full[s]
// for parity u & 1 (the u-th fill completed); the producer waits empty[s] for parity
// (u & 1) ^ 1 (the (u-1)-th drain completed; on a fresh barrier the phase "before phase 0"
// counts as complete, so the first Stages acquires pass at once).
//
// Barrier counts: full[s] expects the producer's arrive.expect_tx plus the bytes it announced
// (unless no TMA fills the stages), and, where producer threads also fill the stage with
// their own copies (cp.async: rows TMA cannot address, such as gathered ones), one
// producer_arrive from each of those threads;
// empty[s] expects one arrival per consumer warp. An arrival releases the arriving
// thread's (and, for a warpgroup's wgmma, its warpgroup's) finished reads; a completed wait
// acquires them, so the producer's next copy into the stage is ordered after them.
#pragma once
#include "ptx.cuh"

struct PipelineState {
  unsigned stage, phase;

  template <int Stages>
  __device__ __forceinline__ void advance() {
    if (++stage == unsigned(Stages)) {
      stage = 0;
      phase ^= 1u;
    }
  }
};

// Lives in static shared memory (`__shared__ TmaPipeline<S> pipe;`, declared in the kernel);
// one thread calls init, then a __syncthreads makes the barriers visible to every thread
// before first use.
template <int Stages>
struct TmaPipeline {
  static_assert(Stages >= 1 && Stages <= 8, "a pipeline of 1..8 stages");
  uint64_t full[Stages], empty[Stages];

  // tma_producer: whether a producer_commit arrives on full[s] (false: every byte of a stage
  // comes from the copying producers' own copies).
  __device__ __forceinline__ void init(unsigned consumer_warps, unsigned copying_producers = 0,
                                       bool tma_producer = true) {
    for (int s = 0; s < Stages; ++s) {
      mbarrier_init(&full[s], (tma_producer ? 1 : 0) + copying_producers);
      mbarrier_init(&empty[s], consumer_warps);
    }
    fence_proxy_async_shared_cta();  // the initialised barriers, visible to the copies (TMA)
  }

  // Producer: waits until the consumers released the stage's previous use.
  __device__ __forceinline__ void producer_acquire(const PipelineState& st) {
    mbarrier_wait(&empty[st.stage], st.phase ^ 1u);
  }

  // Producer: announces the `tx_bytes` the stage's copies will write and arrives; returns the
  // barrier those copies complete (pass it to tma_load / bulk_load, issued after this call).
  __device__ __forceinline__ uint64_t* producer_commit(const PipelineState& st, unsigned tx_bytes) {
    mbarrier_arrive_expect_tx(&full[st.stage], tx_bytes);
    return &full[st.stage];
  }

  // Producer thread that copied part of the stage itself (one of `copying_producers`): arrives
  // once its copies have landed (cp_async_wait) and were made visible to the async proxy
  // (fence_proxy_async_shared_cta), so wgmma reads them after the consumers' wait.
  __device__ __forceinline__ void producer_arrive(const PipelineState& st) { mbarrier_arrive(&full[st.stage]); }

  // Consumer: waits until the stage's copies have landed.
  __device__ __forceinline__ void consumer_wait(const PipelineState& st) { mbarrier_wait(&full[st.stage], st.phase); }

  // Consumer (every thread of each consumer warp; a 1D block): lane 0 arrives on empty, once
  // the warp's reads of the stage are complete.
  __device__ __forceinline__ void consumer_release(const PipelineState& st) {
    if (threadIdx.x % 32 == 0) mbarrier_arrive(&empty[st.stage]);
  }
};
