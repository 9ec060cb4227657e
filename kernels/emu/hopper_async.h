// hopper_async.h: the emulated twins of Hopper's asynchronous data movement (ptx.cuh):
// mbarrier, TMA tensor copies (cp.async.bulk.tensor), plain bulk copies (cp.async.bulk),
// their bulk groups, elect.sync, griddepcontrol and fence.proxy.async.
//
// Model (hopper_async.cpp has the details)
//   - An mbarrier is a 64-bit shared-memory word. mbarrier.init writes a tag into it that
//     names an entry of the block's barrier table: phase, pending arrivals, expected count,
//     tx-count. A phase completes when its pending arrivals and its tx-count both reach zero.
//   - A load (TMA or bulk) reads global memory when it is issued and fills its shared
//     destination with a poison pattern (0xFF bytes: NaN as f32, f16 and bf16). Its bytes
//     are counted against its mbarrier's tx-count only when no CUDA thread of the block can
//     run (the latest moment a copy engine may take), and they reach shared memory only when
//     that barrier's phase completes. A read without the wait therefore sees poison.
//   - A wait (try_wait / test_wait on the parity of an incomplete phase) parks the thread
//     until the phase completes; a wait that can never complete is a deadlock, reported with
//     the barrier's state.
//   - A store (TMA or bulk, shared -> global) reads shared memory and writes global memory at
//     the bulk wait_group of its issuing thread that covers it (or when that thread exits).
#pragma once
#include <stdint.h>

namespace cuemu {

// The emulator's tensor map: what src/device/tensor_map.rs encodes for the emulator, in the
// 128 bytes of a CUtensorMap. Dimension 0 is the contiguous one.
struct alignas(64) EmuTensorMap {
  uint32_t magic;          // kTensorMapMagic: anything else was not encoded by this crate
  uint32_t rank;           // 2..5
  uint32_t element_bytes;  // 1, 2 or 4
  uint32_t swizzle;        // SwizzleMode (swizzle.cuh)
  uint64_t address;        // global address of element (0, ..., 0)
  uint64_t dims[5];        // elements per dimension
  uint64_t strides[5];     // bytes between consecutive elements of each dimension
  uint32_t box[5];         // elements per dimension of the box one copy moves
  uint32_t reserved;
};
static_assert(sizeof(EmuTensorMap) == 128, "a tensor map is 128 bytes, as CUtensorMap");
constexpr uint32_t kTensorMapMagic = 0x50414d54u;  // "TMAP"

// A source location, captured by the ptx.cuh wrappers (__builtin_FILE/LINE defaults) so that
// errors name the line of the kernel.
struct Site {
  const char* file;
  int line;
};

void mbarrier_init(uint64_t* bar, unsigned count, Site site);
uint64_t mbarrier_arrive(uint64_t* bar, unsigned tx_bytes, Site site);  // arrive.expect_tx when tx_bytes > 0
void mbarrier_expect_tx(uint64_t* bar, unsigned tx_bytes, Site site);
// try_wait returns true once the phase of `parity` has completed (parking until then);
// test_wait parks likewise but returns what it saw when called.
bool mbarrier_try_wait_parity(uint64_t* bar, unsigned parity, Site site);
bool mbarrier_test_wait_parity(uint64_t* bar, unsigned parity, Site site);

void tma_load(void* smem_dst, const void* tensor_map, uint64_t* bar, const int* coords, unsigned rank, Site site);
void tma_store(const void* tensor_map, const void* smem_src, const int* coords, unsigned rank, Site site);
void bulk_load(void* smem_dst, const void* gmem_src, unsigned bytes, uint64_t* bar, Site site);
void bulk_store(void* gmem_dst, const void* smem_src, unsigned bytes, Site site);
void bulk_commit_group();
void bulk_wait_group(unsigned pending);  // .read or not: both complete the covered stores

bool elect_sync(unsigned mask);

// What the scheduler (runtime.cpp) asks of this file.
namespace hopper {
void block_begin(unsigned threads);
// The block can run no thread: let the copy engine finish every load in flight. Returns
// true if that may have made a thread runnable.
bool progress();
void thread_exit(unsigned thread);  // the thread's stores in flight land
// Appends a description of the barrier a parked thread waits on to `out` (size `len`).
void describe_wait(const void* object, unsigned parity, char* out, unsigned long len);
}  // namespace hopper

// What this file asks of the scheduler.
namespace sched {
// Parks the calling CUDA thread until unpark(object); the deadlock report describes it
// through hopper::describe_wait(object, parity) and names `site`.
void park(const void* object, unsigned parity, Site site);
void unpark(const void* object);
unsigned thread_index();  // linear index of the calling CUDA thread in its block
}  // namespace sched
}  // namespace cuemu
