// planted_bugs.cu: kernels with deliberate bugs, one each, to prove that the emulator's tools
// catch them. Each comment names the tool that must catch the bug and the control that must
// pass. Never launched on a GPU by the tests (several are undefined behaviour there); they are
// compiled by nvcc only to keep them valid CUDA.
//
// Kernels:
//   planted_missing_syncthreads    shared-memory read of a neighbour's write, no barrier
//   planted_with_syncthreads       the control: the same with the barrier
//   planted_missing_cp_async_wait  shared memory read without waiting for cp.async (flag)
//   planted_missing_syncwarp       ldmatrix of rows other lanes wrote, no __syncwarp (flag)
//   planted_out_of_bounds_write    global write one past the end
//   planted_static_shared_overrun  static __shared__ write one past the end
//   planted_divergent_barrier      __syncthreads in divergent code: a deadlock
//   planted_trap                   __trap() in one thread
//   planted_misaligned_access      a 16/8/4-byte access at an address off its alignment
//   planted_tile_barrier           ldmatrix-fed k-tiles without the "tile consumed" barrier (mode)
//   planted_warp_rank              ballot ranks without the __syncwarp after the count advance (flag)
//   planted_race_free_idioms       the control of the race detector: nothing to report
//   planted_array_overrun          a local or static shared array indexed past its end
#include "ptx.cuh"

// ------------------------------------------------------------------------------------------
// planted_missing_syncthreads / planted_with_syncthreads: y[g] = x[g-1] within a block (0 for
// the block's thread 0), through shared memory.
// Launch: blockDim.x = 256; x and y have gridDim.x * 256 floats. g = global thread id, t = tid.
// Host (control, and the bug under in-order scheduling): y[g] = t > 0 ? x[g-1] : 0.
// Bug: no __syncthreads between s[t] = x[g] and the read of s[t-1]. The in-order schedule runs
// thread t-1 to completion first and hides it; the reversed schedule must expose it (every
// y[g] with t > 0 differs from the expectation), a shuffled one in about half of them.
template <bool Sync>
__device__ __forceinline__ void shift_through_shared(const float* x, float* y, float* s) {
  const int t = threadIdx.x;
  const i64 g = global_thread_x();
  s[t] = x[g];
  if constexpr (Sync) __syncthreads();
  y[g] = t > 0 ? s[t - 1] : 0.0f;
}

extern "C" __global__ void planted_missing_syncthreads(const float* x, float* y) {
  __shared__ float s[256];
  shift_through_shared<false>(x, y, s);
}
EMU_EXPORT(planted_missing_syncthreads)

extern "C" __global__ void planted_with_syncthreads(const float* x, float* y) {
  __shared__ float s[256];
  shift_through_shared<true>(x, y, s);
}
EMU_EXPORT(planted_with_syncthreads)

// ------------------------------------------------------------------------------------------
// planted_missing_cp_async_wait: out[g] = in[g - t + (t+1) % blockDim.x] (a rotation by one
// within the block) through shared memory filled by cp.async.
// Launch: any grid and block; blockDim.x float4 of dynamic shared memory; in and out have
// gridDim.x * blockDim.x float4, 16-byte aligned.
// Host (do_wait = 1, the control): out[b*bd + t] = in[b*bd + (t+1) % bd].
// Bug (do_wait = 0): shared memory is read without cp_async_wait. The emulator lands a copy
// only at a wait that covers it (at the latest when its thread exits), so under any schedule
// at least the first thread of each block to read sees stale shared memory: out must differ
// from the expectation (in order, threads 0 .. bd-2 of every block do). Stale data is only
// detectable if it differs from in: run the buggy launch on shared memory the emulator
// poisons, or at least not right after a control launch with the same input.
extern "C" __global__ void planted_missing_cp_async_wait(const float4* in, float4* out,
                                                         int do_wait) {
  DYN_SHARED(float4, s);
  const unsigned t = threadIdx.x;
  const i64 g = global_thread_x();
  cp_async<16>(&s[t], &in[g]);
  cp_async_commit();
  if (do_wait) cp_async_wait<0>();
  __syncthreads();
  // load_128, not a float4 copy: the race detector sees this read (clang turns a struct copy
  // into a memcpy, which its load tracing does not see).
  store_128(&out[g], load_128(&s[(t + 1) % blockDim.x]));
}
EMU_EXPORT(planted_missing_cp_async_wait)

// ------------------------------------------------------------------------------------------
// planted_missing_syncwarp: ldmatrix_x4 of four 8x8 matrices of 16-bit values that the lanes
// of the warp wrote to shared memory, each lane a row that ANOTHER lane's ldmatrix reads.
// Launch: one block of 32 threads. m holds 4 matrices, matrix j row r column c at
// m[j*64 + r*8 + c], i.e. 32 rows of 8 values: row R = 8j + r at m[R*8 .. R*8+8].
// Lane l copies row (l+1) % 32 into the shared tile; ldmatrix has lane l address row l
// (row l%8 of matrix l/8), which lane (l+31) % 32 wrote.
// Host (do_sync = 1, the control), g = l/4, t = l%4, M = m + j*64:
//   out[l*4 + j] = M[g*8 + 2t] | M[g*8 + 2t + 1] << 16
// Bug (do_sync = 0): no __syncwarp between the stores and the ldmatrix. Only an emulator that
// captures each lane's row when that lane arrives at the ldmatrix catches it (out differs
// from the expectation): in order, row 0 (written by lane 31, which runs last) is stale; a
// reversed schedule makes rows 1 .. 31 stale; a shuffled one about half of them. An emulator
// that gathers all lanes before reading memory hides the bug under every schedule.
extern "C" __global__ void planted_missing_syncwarp(const unsigned short* m, unsigned* out,
                                                    int do_sync) {
  __shared__ __align__(16) uint16_t tile[32][8];
  const int lane = threadIdx.x % 32;
  const int mine = (lane + 1) % 32;
  for (int c = 0; c < 8; ++c) tile[mine][c] = m[mine * 8 + c];
  if (do_sync) __syncwarp();
  uint32_t r[4];
  ldmatrix_x4<false>(r, &tile[lane][0]);
  for (int j = 0; j < 4; ++j) out[lane * 4 + j] = r[j];
}
EMU_EXPORT(planted_missing_syncwarp)

// ------------------------------------------------------------------------------------------
// planted_out_of_bounds_write: out[i] = 1 for i in [0, n], i.e. one element past the end.
// Launch: grid * block > n threads; out has n floats.
// Caught by: the AddressSanitizer build (heap-buffer-overflow on out[n]). Without ASan the
// write lands in the allocation's slack and goes unnoticed.
extern "C" __global__ void planted_out_of_bounds_write(float* out, int n) {
  const i64 i = global_thread_x();
  if (i <= n) out[i] = 1.0f;  // planted: should be i < n
}
EMU_EXPORT(planted_out_of_bounds_write)

// ------------------------------------------------------------------------------------------
// planted_static_shared_overrun: thread 63 writes s[64] of a 64-float static __shared__ array.
// Launch: blockDim.x = 64; out has gridDim.x * 64 floats.
// Caught by: the AddressSanitizer build (the emulator makes static shared arrays ASan-visible
// globals with redzones). Without ASan out[b*64 + t] = t - 1 for t >= 1 (s[0] never written).
// The write goes through a pointer, as kernels pass shared arrays down: indexing the array
// itself would be caught first, in every build, by the bounds checks (planted_array_overrun).
extern "C" __global__ void planted_static_shared_overrun(float* out) {
  __shared__ float s[64];
  float* tile = s;
  const unsigned t = threadIdx.x;
  tile[t + 1] = float(t);  // planted: thread 63 writes s[64]
  __syncthreads();
  out[global_thread_x()] = s[t];
}
EMU_EXPORT(planted_static_shared_overrun)

// ------------------------------------------------------------------------------------------
// planted_divergent_barrier: a deadlock. Threads 0-15 wait at a __syncthreads inside a branch;
// threads 16-31 wait in a full-mask __shfl_sync for lanes 0-15, which never arrive.
// Launch: one block of 32 threads; out has 32 ints.
// Caught by: the emulator itself, which must detect that no thread can make progress and
// return a launch error (not hang). Undefined behaviour on a GPU: never launched there.
extern "C" __global__ void planted_divergent_barrier(int* out) {
  const int t = threadIdx.x;
  int v = t;
  if (t < 16) __syncthreads();  // planted: threads 16-31 never reach this barrier
  else v = __shfl_sync(0xffffffffu, v, 0);  // lanes 0-15 never reach this shuffle
  out[t] = v;
}
EMU_EXPORT(planted_divergent_barrier)

// ------------------------------------------------------------------------------------------
// planted_trap: thread 5 of block 0 executes __trap(); every other thread writes out[g] = 1.
// Launch: any grid, blockDim.x > 5; out has gridDim.x * blockDim.x ints.
// Caught by: the emulator, which must return a launch error (as the GPU does) instead of
// aborting the process.
extern "C" __global__ void planted_trap(int* out) {
  if (blockIdx.x == 0 && threadIdx.x == 5) __trap();
  out[global_thread_x()] = 1;
}
EMU_EXPORT(planted_trap)

// ------------------------------------------------------------------------------------------
// planted_raw_tf32_operand: an mma.m16n8k8 tf32 whose A operands are raw f32 bit patterns
// (no cvt.rna.tf32.f32 first) when `raw`, else the rounded values: out[lane] = d[0].
// Launch: one block of 32 threads; x has 32 floats, out 32 floats.
// Caught by: the emulator, which must fail the launch ("not a tf32 value"): which of the low 13
// bits the tensor cores use is not specified, so a kernel must not depend on it. raw = 0 is
// the control.
extern "C" __global__ void planted_raw_tf32_operand(const float* x, float* out, int raw) {
  const float v = x[threadIdx.x];
  const uint32_t r = raw ? __float_as_uint(v) : cvt_rna_tf32(v);
  const uint32_t a[4] = {r, r, r, r}, b[2] = {cvt_rna_tf32(1.0f), cvt_rna_tf32(1.0f)};
  float d[4] = {0.0f, 0.0f, 0.0f, 0.0f};
  mma_m16n8k8_tf32(d, a, b, d);
  out[threadIdx.x] = d[0];
}
EMU_EXPORT(planted_raw_tf32_operand)

// ------------------------------------------------------------------------------------------
// planted_misaligned_access: every lane makes one access of the kind `access` (below) at
// `offset` bytes past an aligned address, in global memory (`bytes` at lane * 16) or in a
// static shared tile; what a load reads lands, aligned, in out.
// Launch: one block of 32 threads; bytes has 1024 bytes (256-byte aligned), out 32 uint4.
// Caught by: the emulator, which must fail the launch with the access, the address and the
// alignment it needs ("misaligned address"), as the GPU faults. offset 0 is the control.
// Accesses: 0 load_128, 1 store_128, 2/3 cp_async<16> with the source / the destination off,
// 4 cp_async<8>, 5 cp_async<4>, 6 ldmatrix_x4 row, 7 a float2 load through a cast pointer,
// 8 a uint32_t store through a cast pointer, 9 atomicAdd on an int, 10 __ldg of a float4,
// 11 load_64, 12 store_64 (common.cuh's 8-byte vector accesses).
extern "C" __global__ void planted_misaligned_access(unsigned char* bytes, uint4* out, int access, int offset) {
  __shared__ __align__(16) unsigned char tile[32 * 16 + 16];
  const int lane = threadIdx.x;
  unsigned char* g = bytes + lane * 16 + offset;
  unsigned char* s = tile + lane * 16;
  uint4 v = make_uint4(unsigned(lane), 0u, 0u, 0u);
  switch (access) {
    case 0: v = load_128(reinterpret_cast<const uint4*>(g)); break;
    case 1: store_128(reinterpret_cast<uint4*>(g), v); break;
    case 2: cp_async<16>(s, g); break;
    case 3: cp_async<16>(s + offset, bytes + lane * 16); break;
    case 4: cp_async<8>(s, g); break;
    case 5: cp_async<4>(s, g); break;
    case 6: {
      uint32_t r[4];
      ldmatrix_x4<false>(r, s + offset);
      v = make_uint4(r[0], r[1], r[2], r[3]);
      break;
    }
    case 7: {
      const float2 f = *reinterpret_cast<const float2*>(g);
      v.y = __float_as_uint(f.x);
      break;
    }
    case 8: *reinterpret_cast<uint32_t*>(g) = unsigned(lane); break;
    case 9: v.y = unsigned(atomicAdd(reinterpret_cast<int*>(g), 1)); break;
    case 10: v.y = __float_as_uint(__ldg(reinterpret_cast<const float4*>(g)).x); break;
    case 11: {
      const uint2 pair = load_64(reinterpret_cast<const uint2*>(g));
      v = make_uint4(pair.x, pair.y, 0u, 0u);
      break;
    }
    case 12: store_64(reinterpret_cast<uint2*>(g), make_uint2(unsigned(lane), 0u)); break;
  }
  cp_async_commit();
  cp_async_wait<0>();
  out[lane] = v;
}
EMU_EXPORT(planted_misaligned_access)

// ------------------------------------------------------------------------------------------
// planted_tile_barrier: out = A · B^T on tensor cores (mma.sync m16n8k16, f32 accumulation),
// A and B 16 x K f16 row-major (K = 16 * k_tiles), out 16 x 16 f32, through shared k-tiles read
// with ldmatrix, the way gate_mma.cuh, mma_tile.cuh and the codebook kernels feed theirs.
// `mode` picks the tiling (PlantedTiling in src/selftest/planted/races.rs):
//   0  one tile buffer, two barriers per k-tile: "previous tile consumed", "tile loaded"
//   1  the same without the "consumed" barrier (planted: the survivor of gate_mma.cuh)
//   2  two tile buffers, one barrier per k-tile (race-free)
//   3  two tile buffers filled by cp.async one k-tile ahead, the copy of tile kt + 1 in
//      flight while tile kt is read (race-free)
// Launch: one block of 64 threads (2 warps), no dynamic shared memory. Warp w computes output
// columns 8w .. 8w + 7; lane l of warp 0 loads 16 bytes of the A tile (row l / 2, columns
// 8 (l % 2) ..), warp 1 the same of the B tile.
// Host: out[r * 16 + c] = sum_k A[r][k] B[c][k] (small integers: exact in f32).
// Bug (mode 1): a warp that has consumed tile kt loads its operand of tile kt + 1 over it while
// the other warp may still read tile kt. The race detector reports it under every schedule. The
// run-ahead schedule makes it wrong values: one warp computes tile kt and loads kt + 1 before
// the other reads kt. The first-in first-out schedules hide it: released warps re-queue behind
// each other, so no warp gets a collective ahead, and ldmatrix reads when each lane arrives.
constexpr int PLANTED_LD = 24;  // halves per shared tile row: 48 bytes, rows 16-byte aligned

extern "C" __global__ void planted_tile_barrier(const __half* a, const __half* b, float* out, int k_tiles,
                                                int mode) {
  __shared__ __align__(16) __half tiles[2][2][16 * PLANTED_LD];  // [buffer][A, B][row * LD + k]
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const i64 K = 16 * i64(k_tiles);
  const int row = lane / 2, col = 8 * (lane % 2);
  const __half* src = (warp == 0 ? a : b) + row * K + col;
  auto load = [&](int kt, int buffer) {
    __half* dst = &tiles[buffer][warp][row * PLANTED_LD + col];
    if (mode == 3) cp_async<16>(dst, src + 16 * kt);
    else store_128(reinterpret_cast<uint4*>(dst), load_128(reinterpret_cast<const uint4*>(src + 16 * kt)));
  };
  float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
  if (mode == 3) {
    load(0, 0);
    cp_async_commit();
  }
  for (int kt = 0; kt < k_tiles; ++kt) {
    const int buffer = mode >= 2 ? kt % 2 : 0;
    if (mode == 3) {
      if (kt + 1 < k_tiles) load(kt + 1, (kt + 1) % 2);
      cp_async_commit();
      cp_async_wait<1>();  // tile kt has landed (tile kt + 1 may be in flight)
    } else {
      if (mode == 0) __syncthreads();  // the previous k-tile has been consumed (mode 1: planted)
      load(kt, buffer);
    }
    __syncthreads();
    uint32_t fa[4], fb[2];
    ldmatrix_x4<false>(fa, &tiles[buffer][0][(lane % 16) * PLANTED_LD + (lane / 16) * 8]);
    ldmatrix_x2<false>(fb, &tiles[buffer][1][(warp * 8 + lane % 8) * PLANTED_LD + ((lane / 8) % 2) * 8]);
    mma_16816(acc, fa, fb, static_cast<__half*>(nullptr));
    if (mode == 3) __syncthreads();  // consumed before the next k-tile's copy overwrites it
  }
  const int g = lane / 4, t = lane % 4;
  for (int i = 0; i < 4; ++i) out[(g + (i >= 2 ? 8 : 0)) * 16 + warp * 8 + 2 * t + (i & 1)] = acc[i];
}
EMU_EXPORT(planted_tile_barrier)

// ------------------------------------------------------------------------------------------
// planted_warp_rank: rank[i] = how many of keys[0 .. i) equal keys[i] (keys in 0..7), by one
// warp in chunks of 32 the way rank_in_warp (dispatch_map.cuh) ranks slots: lanes with the
// same key find each other with one ballot per key bit; a key's rank is the warp's running
// count for it (shared memory) plus its peers on lower lanes; the lowest peer then advances
// the count.
// Launch: one block of 32 threads; keys and rank have n ints.
// Bug (sync = 0): no __syncwarp between a chunk's count advance and the next chunk's count
// reads. The emulated ballots wait for all 32 lanes, so the values are right under every
// schedule; on a GPU a ballot orders no memory. Only the race detector catches it.
extern "C" __global__ void planted_warp_rank(const int* keys, int* rank, int n, int sync) {
  __shared__ int counts[8];
  const int lane = threadIdx.x % 32;
  if (lane < 8) counts[lane] = 0;
  __syncwarp();
  for (int chunk = 0; chunk < n; chunk += 32) {
    const int i = chunk + lane;
    const int key = i < n ? keys[i] : 8;  // 8: no key (peers only of the other absent lanes)
    unsigned peers = 0xffffffffu;
    for (int bit = 0; bit < 4; ++bit) {
      const unsigned ones = __ballot_sync(0xffffffffu, (key >> bit) & 1);
      peers &= (key >> bit) & 1 ? ones : ~ones;
    }
    const unsigned lower = peers & ((1u << lane) - 1u);
    const int r = key < 8 ? counts[key] + __popc(lower) : 0;
    __syncwarp();  // every lane has read its count before the lowest peer advances it
    if (key < 8 && lower == 0) counts[key] += __popc(peers);
    if (sync) __syncwarp();  // the advance before the next chunk's reads (0: planted)
    if (i < n) rank[i] = r;
  }
}
EMU_EXPORT(planted_warp_rank)

// ------------------------------------------------------------------------------------------
// planted_race_free_idioms: what the race detector must accept (any report is a false alarm).
// Launch: one block of 64 threads (2 warps); out has 64 + 8 + 64 ints. t = thread, l = lane.
//   warp-private scratch: l writes scratch[w][l], __syncwarp, reads scratch[w][(l + 1) % 32]:
//     out[t] = 32 w + (l + 1) % 32
//   shared atomics from both warps in one epoch, a barrier, then plain reads: out[64 + b] = 8
//     (the threads with t % 8 == b)
//   the two 16-bit halves of one word stored by two threads, unordered (different bytes), read
//     after a barrier by the other: out[72 + t] = t ^ 1
extern "C" __global__ void planted_race_free_idioms(int* out) {
  __shared__ int scratch[2][32];
  __shared__ int histogram[8];
  __shared__ __align__(4) unsigned short halves[64];
  const int t = threadIdx.x, lane = t % 32, warp = t / 32;
  if (t < 8) histogram[t] = 0;
  scratch[warp][lane] = t;
  halves[t] = static_cast<unsigned short>(t);
  __syncwarp();
  out[t] = scratch[warp][(lane + 1) % 32];
  __syncthreads();
  atomicAdd(&histogram[t % 8], 1);
  __syncthreads();
  if (t < 8) out[64 + t] = histogram[t];
  out[72 + t] = halves[t ^ 1];
}
EMU_EXPORT(planted_race_free_idioms)

// ------------------------------------------------------------------------------------------
// planted_array_overrun: out[t] = local[index] or, with `shared`, tile[index], where thread t's
// local[i] = 10 t + i and tile[i] = i (8 ints each).
// Launch: one block of 32 threads; out has 32 ints.
// Caught by: the emulator (kernels compiled with -fsanitize=bounds): an index outside 0..7
// fails the launch ("index ... out of bounds"); on the GPU it reads whatever lies there.
// index 0..7 is the control: out[t] = shared ? index : 10 t + index.
extern "C" __global__ void planted_array_overrun(int* out, int index, int shared) {
  __shared__ int tile[8];
  int local[8];
  const int t = threadIdx.x;
  for (int i = 0; i < 8; ++i) local[i] = 10 * t + i;
  if (t < 8) tile[t] = t;
  __syncthreads();
  out[t] = shared ? tile[index] : local[index];
}
EMU_EXPORT(planted_array_overrun)
