// racecheck.h: the shared-memory race detector of the profiling build (MOE_EMU_PROFILE=1),
// switched on per launch (MOE_EMU_RACECHECK=1); the CPU counterpart of compute-sanitizer's
// racecheck.
//
// Every access to shared memory is seen: plain loads and stores of kernel code (clang's
// load/store tracing, profiler.cpp's callbacks), and what the runtime performs (each lane's
// ldmatrix row, cp.async copies, atomics). Two accesses conflict when they touch the same
// byte, at least one writes, neither is an atomic of a pair of atomics, and no ordering
// separates them. Orderings (happens-before):
//   - a block barrier both sides of which they lie: each release of __syncthreads (and its
//     _count/_and/_or forms) starts a new epoch of the block; accesses of different epochs
//     are ordered;
//   - within a warp, a __syncwarp whose mask covers both lanes: each lane carries a vector
//     clock of 32 entries; a __syncwarp merges the clocks of the lanes it releases, then each
//     lane advances its own entry.
// Shuffles, votes, ballots, mma and ldmatrix exchange values but order no memory. A cp.async
// copy is a write by its issuing thread that may land any time between the issue and the
// covering wait_group: it is checked with what the issuer knew at the issue and recorded
// when it lands. The first conflict fails the block with both accesses (thread, kind, width,
// source line).
#pragma once
#include <stddef.h>
#include <stdint.h>

namespace cuemu::racecheck {
enum class Kind : uint8_t { Load, Store, Atomic, LdMatrix, CpAsync };

extern bool on;  // this launch is checked (blocks run one at a time in the profiling build)

void launch_begin(bool enabled);
void block_begin(unsigned threads, const unsigned char* dynamic_shared, size_t dynamic_shared_bytes);
void barrier();                                   // a block barrier was released: a new epoch
void warp_sync(unsigned warp, unsigned lanes);    // a __syncwarp released `lanes` of `warp`
// An access by the running CUDA thread; anything outside shared memory is ignored.
void access(const void* p, unsigned bytes, Kind kind, uintptr_t site);

// What the issuing thread knew when it issued a cp.async.
struct Issue {
  uint32_t epoch, thread;
  uint32_t clock[32];
  uintptr_t site;
};
Issue issue(uintptr_t site);                          // by the running thread
void land(const Issue& issue, const void* dst, unsigned bytes);  // in the issuer's context
}  // namespace cuemu::racecheck
