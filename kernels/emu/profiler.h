// profiler.h: the memory profiler's interface inside the emulator (MOE_EMU_PROFILE builds).
//
// Kernel files are compiled with clang's -fsanitize-coverage=trace-loads,trace-stores, so
// every load and store a CUDA thread makes calls __sanitizer_cov_{load,store}N (profiler.cpp).
// The runtime adds what happens inside it (ldmatrix rows, cp.async copies, atomics). Each
// access is classified (global, shared, local, other) and grouped into warp-level requests:
// the n-th time lane i executes an access site pairs with the n-th time lane j of the same
// warp does. Requests become per-site and per-launch metrics, read by Rust through the
// C API at the end of profiler.cpp (mirrored in src/device/profile.rs).
#pragma once
#include <stddef.h>
#include <stdint.h>

namespace cuemu::profiler {
enum class Access : uint8_t { Load = 0, Store = 1, Atomic = 2 };
enum class Space : uint8_t { Global = 0, Shared = 1, Local = 2, Other = 3 };

// Where the running CUDA thread is; filled by the runtime (runtime.cpp).
struct LaneView {
  unsigned thread, warp;
  const char* stack_lo;
  size_t stack_size;
  const unsigned char* dynamic_shared;
  size_t dynamic_shared_bytes;
};
bool current_lane(LaneView* out);  // false when no CUDA thread runs on this OS thread

struct LaunchProfile;
LaunchProfile* launch_begin();  // profiling on until launch_end; one launch at a time
void block_begin(unsigned threads);
void block_end();
void launch_end();
void record(const void* addr, unsigned bytes, Access access, uintptr_t site);
}  // namespace cuemu::profiler
