// profiler_probes.cu: kernels with hand-computable memory behaviour, to validate the
// emulator's memory profiler (tests/profiler.rs). Each comment states the expected numbers
// for one warp of 32 threads per block.
#include "common.cuh"

// Coalesced 4-byte loads and stores: 4 sectors per request, redundancy 1.
extern "C" __global__ void probe_coalesced(const float* x, float* y) {
  const i64 i = global_thread_x();
  y[i] = x[i];
}
EMU_EXPORT(probe_coalesced)

// 16-byte vector loads and stores: 16 sectors per request.
extern "C" __global__ void probe_vector(const float4* x, float4* y) {
  const i64 i = global_thread_x();
  store_128(y + i, load_128(x + i));
}
EMU_EXPORT(probe_vector)

// Lane l reads x[32 l]: a stride of 32 floats, 32 sectors per request.
extern "C" __global__ void probe_strided(const float* x, float* y) {
  const i64 i = global_thread_x();
  y[i] = x[i * 32];
}
EMU_EXPORT(probe_strided)

// Every lane reads x[0]: a broadcast, 1 sector per request.
extern "C" __global__ void probe_broadcast(const float* x, float* y) {
  y[global_thread_x()] = x[0];
}
EMU_EXPORT(probe_broadcast)

// A 32x32 float tile in shared memory, written by rows, read by columns. With Pad = 0 every
// column read puts 32 words in one bank (32-way conflict); with Pad = 1 (33 columns) the
// words land in 32 different banks (conflict-free). The row writes are conflict-free both ways.
template <int Pad>
__device__ void transpose_tile(const float* x, float* y, float (*tile)[32 + Pad]) {
  const int lane = threadIdx.x;
  for (int r = 0; r < 32; ++r) tile[r][lane] = x[r * 32 + lane];
  __syncwarp();
  for (int c = 0; c < 32; ++c) y[c * 32 + lane] = tile[lane][c];
}
extern "C" __global__ void probe_shared_columns(const float* x, float* y) {
  __shared__ float tile[32][32];
  transpose_tile<0>(x, y, tile);
}
EMU_EXPORT(probe_shared_columns)
extern "C" __global__ void probe_shared_columns_padded(const float* x, float* y) {
  __shared__ float tile[32][33];
  transpose_tile<1>(x, y, tile);
}
EMU_EXPORT(probe_shared_columns_padded)

// Reads its input twice: load redundancy 2.
extern "C" __global__ void probe_read_twice(const float* x, float* y, long long n) {
  const i64 i = global_thread_x();
  float s = x[i];
  __syncthreads();  // keeps the compiler from merging the two loads
  s += x[(i + 1) % n];
  y[i] = s;
}
EMU_EXPORT(probe_read_twice)

// One atomicAdd per thread on one counter.
extern "C" __global__ void probe_atomics(int* counter) { atomicAdd(counter, 1); }
EMU_EXPORT(probe_atomics)
