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
//   - Hopper's synchronisation, across warps (a thread's clock then also holds an entry per
//     thread of other warps, allocated in the first block that uses it): an mbarrier arrive
//     is a release (the arriving thread's knowledge joins the phase's clock), a wait that sees
//     the phase complete an acquire (the waiter learns the clock of the last completed
//     phase); a wgmma issue joins what the 128 threads of its warpgroup know, and the covering
//     wgmma.wait_group tells all 128 that the reads are done.
// Shuffles, votes, ballots, mma and ldmatrix exchange values but order no memory.
// Asynchronous accesses are checked with what their issuer knew at the issue and recorded
// when they happen:
//   - a cp.async copy is a write by its issuing thread, landing at the covering wait_group;
//   - a TMA or bulk load is a write by its issuing thread, landing when its mbarrier phase
//     completes (the phase's clock then holds the landing, so its waiters are ordered after);
//   - wgmma's shared operands are reads by the warpgroup's first thread at the covering
//     wgmma.wait_group; a TMA or bulk store's source a read by its issuer when it lands.
// The first conflict fails the block with both accesses (thread, kind, width, source line).
#pragma once
#include <stddef.h>
#include <stdint.h>

#include <vector>

namespace cuemu::racecheck {
enum class Kind : uint8_t { Load, Store, Atomic, LdMatrix, CpAsync, AsyncLoad, AsyncRead };

extern bool on;  // this launch is checked (blocks run one at a time in the profiling build)

void launch_begin(bool enabled);
void block_begin(unsigned threads, const unsigned char* dynamic_shared, size_t dynamic_shared_bytes);
void barrier();                                   // a block barrier was released: a new epoch
void warp_sync(unsigned warp, unsigned lanes);    // a __syncwarp released `lanes` of `warp`
// An access by the running CUDA thread; anything outside shared memory is ignored.
void access(const void* p, unsigned bytes, Kind kind, uintptr_t site);

// What the issuing thread knew when it issued an asynchronous access.
struct Issue {
  uint32_t epoch, thread;
  uint32_t clock[32];
  std::vector<uint32_t> cross;  // its knowledge of other warps' threads (empty: none)
  uintptr_t site;
};
Issue issue(uintptr_t site);  // by the running thread, which then ticks
// The 128 threads of the warpgroup starting at `first_thread` issue a collective (wgmma):
// what any of them knows, on behalf of the first; each then ticks.
Issue warpgroup_issue(unsigned first_thread, uintptr_t site);
// The access of `issue` happens now: checked with what the issuer knew at the issue, recorded
// with what it knows now. `kind` is CpAsync or AsyncLoad (writes) or AsyncRead.
void land(const Issue& issue, const void* p, unsigned bytes, Kind kind);

// A vector clock over the block's threads: an mbarrier phase's.
using Clock = std::vector<uint32_t>;
void release(Clock& into);        // the running thread arrives: its knowledge joins `into`; it ticks
void acquire(const Clock& from);  // the running thread's wait completed: it learns `from`
void landed(const Issue& issue, Clock& into);  // the load of `issue` landed: `into` holds the landing
// The covering wgmma.wait_group of the warpgroup at `first_thread` completed (its reads have
// landed): all 128 threads learn the first thread's clock, which then ticks.
void warpgroup_waited(unsigned first_thread);
}  // namespace cuemu::racecheck
