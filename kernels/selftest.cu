// selftest.cu: kernels that exist only for tests. Each one exercises one CUDA primitive that
// the CPU emulator reimplements, on inputs for which the host can compute the exact expected
// output, so the same test passes or fails in the same way on a GPU and on the emulator.
//
// Kernels (each has its launch contract and the host's expected output above it):
//   selftest_block_reduce_f32   grid-stride f32 sum + shared-memory tree, order fixed
//   selftest_shuffle            __shfl_sync, __shfl_xor_sync, __shfl_up_sync, __shfl_down_sync
//   selftest_vote               __ballot_sync, __any_sync, __all_sync
//   selftest_atomics            contended int/unsigned/u64/f32 atomics, global and shared
//   selftest_mma_direct_bf16    mma.m16n8k16, fragments gathered straight from global memory
//   selftest_mma_direct_f16     the same with f16 inputs
//   selftest_mma_direct_tf32    mma.m16n8k8 tf32 on f32 inputs rounded with cvt.rna.tf32.f32
//   selftest_convert_tf32       cvt.rna.tf32.f32 alone
//   selftest_mma_ldmatrix_bf16  the same product through a 3-stage cp.async pipeline + ldmatrix
//   selftest_ldmatrix           ldmatrix x1/x2/x4, plain and .trans
//   selftest_cp_async           cp.async of 16, 8 and 4 bytes, full and zero-filled
//   selftest_cp_async_groups    two commit groups per thread, wait_group 1 then 0
//   selftest_dynamic_shared     a reversal through dynamic shared memory
//   selftest_convert_16bit      float <-> f16 / bf16 conversions (cvt.rn semantics)
//   selftest_barrier_reduce     __syncthreads_count/_and/_or with exited threads
//   selftest_float_minmax       min/max of floats with NaN operands
//
// "full" below is the warp mask 0xffffffff; every warp-level kernel needs all 32 lanes.
#include "ptx.cuh"

// ------------------------------------------------------------------------------------------
// selftest_block_reduce_f32: per-block f32 sums in a fixed order the host replays bit-exactly.
// Launch: any grid; blockDim.x = bd a power of two <= 1024; bd floats of dynamic shared memory.
// Mapping: G = gridDim.x * bd threads. Thread t of block b adds, in f32, starting from 0.0f,
//   v = 0.0f; v += x[b*bd + t]; v += x[b*bd + t + G]; v += x[b*bd + t + 2G]; ... (indices < n)
// then s[t] = v; for stride = bd/2, bd/4, ..., 1: every t < stride does s[t] = s[t] + s[t+stride]
// (a __syncthreads after each step). block_sums[b] = s[0].
// Host: replay exactly these f32 additions, in this order; the result must match bit for bit.
extern "C" __global__ void selftest_block_reduce_f32(const float* x, long long n,
                                                     float* block_sums) {
  DYN_SHARED(float, s);
  const unsigned t = threadIdx.x;
  const i64 grid_stride = i64(gridDim.x) * i64(blockDim.x);
  float v = 0.0f;
  for (i64 i = global_thread_x(); i < n; i += grid_stride) v += x[i];
  s[t] = v;
  __syncthreads();
  for (unsigned stride = blockDim.x / 2; stride > 0; stride >>= 1) {
    if (t < stride) s[t] += s[t + stride];
    __syncthreads();
  }
  if (t == 0) block_sums[blockIdx.x] = s[0];
}
EMU_EXPORT(selftest_block_reduce_f32)

// ------------------------------------------------------------------------------------------
// selftest_shuffle: the four shuffles, each with a segment width.
// Launch: one block, blockDim.x a multiple of 32; width in {1, 2, 4, 8, 16, 32}.
// Mapping: thread i, lane = i % 32, w = i - lane (its warp's first thread), p = i % width (its
// position in its width-segment), seg = i - p (the segment's first thread). v = in[i].
//   out[4i+0] = __shfl_sync(full, v, lane*7 + 3, width)
//             = in[seg + (lane*7 + 3) % width]
//     (the source index is passed unreduced on purpose: CUDA takes it modulo width, within
//      the caller's own segment)
//   out[4i+1] = __shfl_xor_sync(full, v, 5, width): src = lane ^ 5,
//             = in[w + src]  if src <= (lane - p) + width - 1  (the caller's segment or an
//                                                              EARLIER one: it is read)
//             = v            otherwise                         (a LATER segment: own value)
//     (for width >= 8 the source always lies in the caller's segment; widths 1, 2 and 4
//      cross segments both ways)
//   out[4i+2] = __shfl_up_sync(full, v, 3, width)   = p >= 3        ? in[i - 3] : v
//   out[4i+3] = __shfl_down_sync(full, v, 3, width) = p + 3 < width ? in[i + 3] : v
extern "C" __global__ void selftest_shuffle(const int* in, int* out, int width) {
  const unsigned full = 0xffffffffu;
  const int i = threadIdx.x, lane = i % 32;
  const int v = in[i];
  out[4 * i + 0] = __shfl_sync(full, v, lane * 7 + 3, width);
  out[4 * i + 1] = __shfl_xor_sync(full, v, 5, width);
  out[4 * i + 2] = __shfl_up_sync(full, v, 3, width);
  out[4 * i + 3] = __shfl_down_sync(full, v, 3, width);
}
EMU_EXPORT(selftest_shuffle)

// ------------------------------------------------------------------------------------------
// selftest_vote: the three warp votes.
// Launch: one block, blockDim.x a multiple of 32. Thread i in warp w = i / 32.
//   out[3i+0] = __ballot_sync(full, pred[i] != 0): bit l set iff pred[32w + l] != 0
//   out[3i+1] = 1 if any of pred[32w .. 32w+32) is nonzero, else 0
//   out[3i+2] = 1 if all of pred[32w .. 32w+32) are nonzero, else 0
// (any/all receive pred[i] itself, so nonzero values other than 1 count as true; their int
//  results are normalised to 0/1 here.)
extern "C" __global__ void selftest_vote(const int* pred, unsigned* out) {
  const unsigned full = 0xffffffffu;
  const int i = threadIdx.x;
  const int p = pred[i];
  out[3 * i + 0] = __ballot_sync(full, p != 0);
  out[3 * i + 1] = __any_sync(full, p) ? 1u : 0u;
  out[3 * i + 2] = __all_sync(full, p) ? 1u : 0u;
}
EMU_EXPORT(selftest_vote)

// ------------------------------------------------------------------------------------------
// selftest_atomics: every thread of the grid hammers the same few addresses.
// Launch: any grid and block; G = gridDim.x * blockDim.x threads (G < 2^31); iters >= 0.
// gid = the thread's global id (0 .. G-1). Slots: i32_slots[7], u32_slots[3], u64_slots[3],
// f32_slots[1], initialised by the host (I[...] = initial value; wrapping arithmetic).
// Each thread, iters times:
//   atomicAdd(&i32[0], 1)                    i32[0] = I + G*iters
//   atomicMin(&i32[1], -gid)                 i32[1] = min(I, -(G-1))      (iters > 0)
//   atomicMax(&i32[2], gid)                  i32[2] = max(I, G-1)         (iters > 0)
//   atomicAdd(&u32[0], 2u)                   u32[0] = I + 2*G*iters  (mod 2^32)
//   atomicMax(&u32[1], gid)                  u32[1] = max(I, G-1)         (iters > 0)
//   atomicMin(&u32[2], gid + 5u)             u32[2] = min(I, 5)           (iters > 0)
//   atomicAdd(&u64[0], 2^32 + 1)             u64[0] = I + G*iters*(2^32 + 1)  (mod 2^64)
//   u64[1] += 1 by an atomicCAS retry loop   u64[1] = I + G*iters  (mod 2^64)
//   atomicAdd(&f32[0], 1.0f)                 f32[0] = I + G*iters  (exact while < 2^24)
//   atomicAdd(&counter, 1), counter a __shared__ int zeroed per block; after a barrier
//   thread 0 does atomicAdd(&i32[5], counter) i32[5] = I + G*iters
// Once per thread (iters = 0 included):
//   old = atomicExch(&i32[3], gid); atomicAdd(&u64[2], (u64)(i64)old)
//     i32[3] ends as some gid in [0, G), and, since the exchanges form one chain,
//     u64[2] = I[u64 2] + G*(G-1)/2 + (u64)(i64)I[i32 3] - (u64)(i64)i32[3]  (mod 2^64)
//   old = atomicCAS(&i32[4], -1, gid); if old == -1: atomicAdd(&i32[6], 1)
//     with I[i32 4] = -1: i32[4] ends as some gid in [0, G) and i32[6] = I + 1 (one winner)
// Suggested host initial values: u64[0] = u64[1] = 2^32 - 16 so both carry into the high word.
extern "C" __global__ void selftest_atomics(int* i32_slots, unsigned* u32_slots,
                                            unsigned long long* u64_slots, float* f32_slots,
                                            int iters) {
  __shared__ int counter;
  const int gid = int(global_thread_x());
  if (threadIdx.x == 0) counter = 0;
  __syncthreads();
  unsigned long long guess = 0ull;  // a CAS with a wrong guess returns the current value
  for (int it = 0; it < iters; ++it) {
    atomicAdd(&i32_slots[0], 1);
    atomicMin(&i32_slots[1], -gid);
    atomicMax(&i32_slots[2], gid);
    atomicAdd(&u32_slots[0], 2u);
    atomicMax(&u32_slots[1], unsigned(gid));
    atomicMin(&u32_slots[2], unsigned(gid) + 5u);
    atomicAdd(&u64_slots[0], (1ull << 32) + 1ull);
    for (;;) {
      const unsigned long long seen = atomicCAS(&u64_slots[1], guess, guess + 1ull);
      if (seen == guess) break;
      guess = seen;
    }
    guess += 1ull;  // the value this thread just wrote: the next guess
    atomicAdd(&f32_slots[0], 1.0f);
    atomicAdd(&counter, 1);
  }
  const int exchanged = atomicExch(&i32_slots[3], gid);
  atomicAdd(&u64_slots[2], (unsigned long long)(long long)exchanged);
  if (atomicCAS(&i32_slots[4], -1, gid) == -1) atomicAdd(&i32_slots[6], 1);
  __syncthreads();
  if (threadIdx.x == 0) atomicAdd(&i32_slots[5], counter);
}
EMU_EXPORT(selftest_atomics)

// ------------------------------------------------------------------------------------------
// MMA self-tests: C (16x8, f32, row-major) = A (16xk, row-major) * B, where B is given
// transposed, as an 8xk row-major buffer bt (the nn.Linear weight layout): B[kk][n] = bt[n*k + kk].
// Launch: one block of 32 threads; k a multiple of 16.
// Host: C[m][n] = sum_kk A[m][kk] * bt[n*k + kk]. The tensor cores' internal summation order
// and rounding are unspecified, so compare exactly only on inputs whose products and partial
// sums are all exact in f32 (e.g. small integers, |A|, |B| <= 8 and k <= 256); otherwise use a
// tolerance growing with k.

// Two consecutive 16-bit elements as one b32 fragment register, p[0] in the low half.
__device__ __forceinline__ uint32_t pack_b16x2(const uint16_t* p) {
  return uint32_t(p[0]) | (uint32_t(p[1]) << 16);
}

// The mma wrapper for an element type.
template <class T> struct MmaM16n8k16;
template <> struct MmaM16n8k16<__nv_bfloat16> {
  static __device__ __forceinline__ void run(float (&d)[4], const uint32_t (&a)[4],
                                             const uint32_t (&b)[2], const float (&c)[4]) {
    mma_m16n8k16_bf16(d, a, b, c);
  }
};
template <> struct MmaM16n8k16<__half> {
  static __device__ __forceinline__ void run(float (&d)[4], const uint32_t (&a)[4],
                                             const uint32_t (&b)[2], const float (&c)[4]) {
    mma_m16n8k16_f16(d, a, b, c);
  }
};

// Stores the C fragment (layout in ptx.cuh) of lane into the 16x8 row-major c.
__device__ __forceinline__ void store_c_fragment(float* c, const float (&acc)[4], int lane) {
  const int g = lane / 4, t = lane % 4;
  c[g * 8 + 2 * t] = acc[0];
  c[g * 8 + 2 * t + 1] = acc[1];
  c[(g + 8) * 8 + 2 * t] = acc[2];
  c[(g + 8) * 8 + 2 * t + 1] = acc[3];
}

// Fragments gathered with the ptx.cuh formulas (g = lane/4, t = lane%4), per k tile k0:
//   a[0] = A[g][k0+2t, +1]     a[1] = A[g+8][k0+2t, +1]
//   a[2] = A[g][k0+2t+8, +1]   a[3] = A[g+8][k0+2t+8, +1]
//   b[0] = B[k0+2t, +1][g] = bt[g][k0+2t, +1]   b[1] = bt[g][k0+2t+8, +1]
template <class T>
__device__ __forceinline__ void mma_direct_body(const T* a_, const T* bt_, float* c, int k) {
  const uint16_t* a = reinterpret_cast<const uint16_t*>(a_);
  const uint16_t* bt = reinterpret_cast<const uint16_t*>(bt_);
  const int lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
  for (int k0 = 0; k0 < k; k0 += 16) {
    const uint16_t* a_lo = a + i64(g) * k + k0 + 2 * t;  // row g
    const uint16_t* a_hi = a_lo + i64(8) * k;            // row g + 8
    const uint16_t* b_n = bt + i64(g) * k + k0 + 2 * t;  // column n = g of B
    const uint32_t af[4] = {pack_b16x2(a_lo), pack_b16x2(a_hi), pack_b16x2(a_lo + 8),
                            pack_b16x2(a_hi + 8)};
    const uint32_t bf[2] = {pack_b16x2(b_n), pack_b16x2(b_n + 8)};
    MmaM16n8k16<T>::run(acc, af, bf, acc);
  }
  store_c_fragment(c, acc, lane);
}

extern "C" __global__ void selftest_mma_direct_bf16(const __nv_bfloat16* a, const __nv_bfloat16* b,
                                                    float* c, int k) {
  mma_direct_body(a, b, c, k);
}
EMU_EXPORT(selftest_mma_direct_bf16)

extern "C" __global__ void selftest_mma_direct_f16(const __half* a, const __half* b, float* c,
                                                   int k) {
  mma_direct_body(a, b, c, k);
}
EMU_EXPORT(selftest_mma_direct_f16)

// selftest_mma_direct_tf32: the same product on f32 inputs, each rounded to tf32 in the kernel
// (cvt.rna.tf32.f32), with the m16n8k8 fragments (ptx.cuh), per k tile k0:
//   a[0] = A[g][k0+t]  a[1] = A[g+8][k0+t]  a[2] = A[g][k0+t+4]  a[3] = A[g+8][k0+t+4]
//   b[0] = bt[g][k0+t] b[1] = bt[g][k0+t+4]
// Host: as above, on the inputs rounded to tf32 (nearest, ties away from zero). k a multiple of 8.
extern "C" __global__ void selftest_mma_direct_tf32(const float* a, const float* bt, float* c, int k) {
  const int lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
  for (int k0 = 0; k0 < k; k0 += 8) {
    const float* a_lo = a + i64(g) * k + k0 + t;  // row g
    const float* a_hi = a_lo + i64(8) * k;        // row g + 8
    const float* b_n = bt + i64(g) * k + k0 + t;  // column n = g of B
    const uint32_t af[4] = {cvt_rna_tf32(a_lo[0]), cvt_rna_tf32(a_hi[0]), cvt_rna_tf32(a_lo[4]),
                            cvt_rna_tf32(a_hi[4])};
    const uint32_t bf[2] = {cvt_rna_tf32(b_n[0]), cvt_rna_tf32(b_n[4])};
    mma_m16n8k8_tf32(acc, af, bf, acc);
  }
  store_c_fragment(c, acc, lane);
}
EMU_EXPORT(selftest_mma_direct_tf32)

// selftest_convert_tf32: out[i] = the bits of cvt.rna.tf32.f32(x[i]) for i < n. Launch: any 1-D
// grid covering n. Host: the low 13 bits cleared after adding 0x1000 to the bit pattern (nearest,
// ties away from zero; a carry may reach infinity); a NaN stays a NaN (payload unspecified).
extern "C" __global__ void selftest_convert_tf32(const float* x, long long n, unsigned* out) {
  const i64 i = global_thread_x();
  if (i < n) out[i] = cvt_rna_tf32(x[i]);
}
EMU_EXPORT(selftest_convert_tf32)

// ------------------------------------------------------------------------------------------
// selftest_mma_ldmatrix_bf16: the product of selftest_mma_direct_bf16 (same layouts, same host
// expectation), with each k tile staged into shared memory by cp_async<16> (3 stages: tiles
// kt+1 and kt+2 are in flight while tile kt is used) and read back with ldmatrix.
// Extra precondition: a and b 16-byte aligned.
// Per k tile: A (16 rows x 32 bytes) is 32 chunks of 16 bytes, lane l copies row l/2, half
// l%2; B^T (8 rows x 32 bytes) is 16 chunks, lanes 0-15 copy row l/2, half l%2.
// Reads: ldmatrix_x4 with lane l at A row l%16, column 8*(l/16) gives matrices (rows 0-7,
// cols 0-7), (8-15, 0-7), (0-7, 8-15), (8-15, 8-15) = a[0..3]. ldmatrix_x2 (not .trans) of
// B^T with lane l at row l%8, column 8*((l/8)%2): register j holds bt[g][8j + 2t, +1] =
// B[8j + 2t, +1][g] = b[j]. Lanes 16-31 pass valid, ignored addresses.
constexpr int kMmaStages = 3;

__device__ __forceinline__ void mma_stage_tile(uint16_t (*a_tile)[16], uint16_t (*b_tile)[16],
                                               const uint16_t* a, const uint16_t* bt, int k,
                                               int k0, int lane) {
  const int row = lane / 2, col = (lane % 2) * 8;
  cp_async<16>(&a_tile[row][col], a + i64(row) * k + k0 + col);
  if (lane < 16) cp_async<16>(&b_tile[row][col], bt + i64(row) * k + k0 + col);
}

extern "C" __global__ void selftest_mma_ldmatrix_bf16(const __nv_bfloat16* a_,
                                                      const __nv_bfloat16* b_, float* c, int k) {
  __shared__ __align__(16) uint16_t a_tile[kMmaStages][16][16];
  __shared__ __align__(16) uint16_t b_tile[kMmaStages][8][16];
  const uint16_t* a = reinterpret_cast<const uint16_t*>(a_);
  const uint16_t* bt = reinterpret_cast<const uint16_t*>(b_);
  const int lane = threadIdx.x % 32, nk = k / 16;
  // Prologue: one commit group per stage, empty past the end, so that before iteration kt
  // exactly kMmaStages - 1 + kt groups are committed and group j holds tile j.
  for (int j = 0; j < kMmaStages - 1; ++j) {
    if (j < nk) mma_stage_tile(a_tile[j], b_tile[j], a, bt, k, j * 16, lane);
    cp_async_commit();
  }
  float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
  for (int kt = 0; kt < nk; ++kt) {
    cp_async_wait<kMmaStages - 2>();  // groups 0..kt of this lane have landed
    __syncwarp();                     // ... and every lane's: ldmatrix reads other lanes' rows
    const int st = kt % kMmaStages;
    uint32_t af[4], bf[2];
    ldmatrix_x4<false>(af, &a_tile[st][lane % 16][(lane / 16) * 8]);
    ldmatrix_x2<false>(bf, &b_tile[st][lane % 8][((lane / 8) % 2) * 8]);
    __syncwarp();  // every lane has finished reading before any lane refills a stage below
    const int next = kt + kMmaStages - 1;
    if (next < nk) mma_stage_tile(a_tile[next % kMmaStages], b_tile[next % kMmaStages], a, bt, k,
                                  next * 16, lane);
    cp_async_commit();
    mma_m16n8k16_bf16(acc, af, bf, acc);
  }
  store_c_fragment(c, acc, lane);
}
EMU_EXPORT(selftest_mma_ldmatrix_bf16)

// ------------------------------------------------------------------------------------------
// selftest_ldmatrix: ldmatrix.x{num}[.trans] of num 8x8 matrices of 16-bit values.
// Launch: one block of 32 threads; num in {1, 2, 4}; trans 0 or 1. Matrix j row r column c is
// m[j*64 + r*8 + c]. The matrices are copied to shared memory (__syncwarp after); lane l passes
// row l%8 of matrix (l/8) % num (lanes >= 8*num: a valid address the instruction ignores).
// Host, for lane l in 0..32, j in 0..num (g = l/4, t = l%4, M = m + j*64):
//   trans == 0: out[l*num + j] = M[g*8 + 2t]     | M[g*8 + 2t + 1] << 16
//   trans == 1: out[l*num + j] = M[(2t)*8 + g]   | M[(2t + 1)*8 + g] << 16
template <bool Trans>
__device__ __forceinline__ void ldmatrix_num(uint32_t (&r)[4], int num, const void* row) {
  if (num == 1) {
    uint32_t x[1];
    ldmatrix_x1<Trans>(x, row);
    r[0] = x[0];
  } else if (num == 2) {
    uint32_t x[2];
    ldmatrix_x2<Trans>(x, row);
    r[0] = x[0];
    r[1] = x[1];
  } else {
    ldmatrix_x4<Trans>(r, row);
  }
}

extern "C" __global__ void selftest_ldmatrix(const unsigned short* m, unsigned* out, int num,
                                             int trans) {
  __shared__ __align__(16) uint16_t s[4 * 64];
  const int lane = threadIdx.x % 32;
  for (int i = lane; i < num * 64; i += 32) s[i] = m[i];
  __syncwarp();
  const uint16_t* row = &s[((lane / 8) % num) * 64 + (lane % 8) * 8];
  uint32_t r[4] = {0u, 0u, 0u, 0u};
  if (trans) ldmatrix_num<true>(r, num, row);
  else ldmatrix_num<false>(r, num, row);
  for (int j = 0; j < num; ++j) out[lane * num + j] = r[j];
}
EMU_EXPORT(selftest_ldmatrix)

// ------------------------------------------------------------------------------------------
// cp.async self-tests. Shared memory is first filled with the byte 0xA5 (then __syncthreads),
// so a zero fill that did not happen, or data that never landed, shows in dst.

__device__ __forceinline__ void fill_shared_bytes(unsigned char* s, i64 n, unsigned char v) {
  for (i64 i = threadIdx.x; i < n; i += blockDim.x) s[i] = v;
}
__device__ __forceinline__ void copy_shared_bytes(unsigned char* dst, const unsigned char* s,
                                                  i64 n) {
  for (i64 i = threadIdx.x; i < n; i += blockDim.x) dst[i] = s[i];
}

// selftest_cp_async: cp.async of each size, with and without zero fill.
// Launch: one block (any blockDim.x); N = n_chunks; 56N bytes of dynamic shared memory; src
// and dst 56N bytes, 16-byte aligned. Six regions, byte offsets (each aligned to its chunk
// size for every N), chunk c = 0 .. N-1 of each region copied by thread c % blockDim.x:
//   R0 [  0, 16N)  cp_async<16>, src_bytes = 16
//   R1 [16N, 32N)  cp_async<16>, src_bytes = c % 17   (0 .. 16: zero fill, 0 = all zeros)
//   R2 [32N, 40N)  cp_async<8>,  src_bytes = 8
//   R3 [40N, 48N)  cp_async<8>,  src_bytes = c % 9
//   R4 [48N, 52N)  cp_async<4>,  src_bytes = 4
//   R5 [52N, 56N)  cp_async<4>,  src_bytes = c % 5
// One commit group, cp_async_wait<0>(), __syncthreads, then shared -> dst with plain loads.
// Host: for a region at offset o with chunk size z, chunk c, byte e in 0..z:
//   dst[o + c*z + e] = e < src_bytes(c) ? src[o + c*z + e] : 0.
extern "C" __global__ void selftest_cp_async(const unsigned char* src, unsigned char* dst,
                                             int n_chunks) {
  DYN_SHARED(unsigned char, s);
  const i64 n = n_chunks, total = 56 * n;
  fill_shared_bytes(s, total, 0xA5);
  __syncthreads();
  i64 off = 0;
  for (int region = 0; region < 6; ++region) {
    const int size = 16 >> (region / 2);
    const bool zero_fill = region % 2 == 1;
    for (i64 c = threadIdx.x; c < n; c += blockDim.x) {
      const i64 at = off + c * size;
      const int src_bytes = zero_fill ? int(c % (size + 1)) : size;
      if (size == 16) cp_async<16>(s + at, src + at, src_bytes);
      else if (size == 8) cp_async<8>(s + at, src + at, src_bytes);
      else cp_async<4>(s + at, src + at, src_bytes);
    }
    off += size * n;
  }
  cp_async_commit();
  cp_async_wait<0>();
  __syncthreads();
  copy_shared_bytes(dst, s, total);
}
EMU_EXPORT(selftest_cp_async)

// selftest_cp_async_groups: two commit groups per thread, waited for one at a time.
// Launch: one block (any blockDim.x); N = n_chunks; 32N bytes of dynamic shared memory; src
// and dst 32N bytes, 16-byte aligned. Thread t owns the 16-byte chunks c = t, t+blockDim.x, ...
// < N: group 0 copies src chunk c, group 1 copies src chunk N + c (to the same shared offsets).
// After cp_async_wait<1>() (this thread's group 0 has landed; group 1 may still be in flight)
// and __syncthreads, bytes [0, 16N) go from shared memory to dst; after cp_async_wait<0>() and
// __syncthreads, bytes [16N, 32N). Host: dst == src (an emulator that lands nothing at
// wait_group 1 leaves 0xA5 in the first half).
extern "C" __global__ void selftest_cp_async_groups(const unsigned char* src, unsigned char* dst,
                                                    int n_chunks) {
  DYN_SHARED(unsigned char, s);
  const i64 n = n_chunks;
  fill_shared_bytes(s, 32 * n, 0xA5);
  __syncthreads();
  for (int group = 0; group < 2; ++group) {
    for (i64 c = threadIdx.x; c < n; c += blockDim.x) {
      const i64 at = (group * n + c) * 16;
      cp_async<16>(s + at, src + at);
    }
    cp_async_commit();
  }
  cp_async_wait<1>();
  __syncthreads();
  copy_shared_bytes(dst, s, 16 * n);  // group 0 only: reading it now is legal
  cp_async_wait<0>();
  __syncthreads();
  copy_shared_bytes(dst + 16 * n, s + 16 * n, 16 * n);
}
EMU_EXPORT(selftest_cp_async_groups)

// ------------------------------------------------------------------------------------------
// selftest_dynamic_shared: a reversal through dynamic shared memory (checks its size handling).
// Launch: any grid and block; n floats of dynamic shared memory; out has gridDim.x * n floats.
// Each block writes s[i] = 2i + 1 (i strided by blockDim.x), __syncthreads, then
// out[b*n + i] = s[n-1-i]. Host: out[b*n + i] = 2(n-1-i) + 1 = 2n - 1 - 2i (exact for n <= 2^23).
extern "C" __global__ void selftest_dynamic_shared(float* out, int n) {
  DYN_SHARED(float, s);
  for (int i = threadIdx.x; i < n; i += blockDim.x) s[i] = float(i * 2 + 1);
  __syncthreads();
  float* out_b = out + i64(blockIdx.x) * n;
  for (int i = threadIdx.x; i < n; i += blockDim.x) out_b[i] = s[n - 1 - i];
}
EMU_EXPORT(selftest_dynamic_shared)

// ------------------------------------------------------------------------------------------
// selftest_convert_16bit: the 16-bit float conversions every kernel's I/O goes through.
// Launch: any 1-D grid covering n. For i < n:
//   f16_bits[i]  = bits of __float2half_rn(x[i]),  bf16_bits[i] = bits of __float2bfloat16_rn(x[i])
//   f16_wide[i]  = __half2float(half with bits[i]), bf16_wide[i] = __bfloat162float(bf16 with bits[i])
// Host: round to nearest even, overflow to infinity, NaN stays NaN (payload unspecified);
// widening is exact. With bits[i] = i for i < 65536 the widening check is exhaustive.
extern "C" __global__ void selftest_convert_16bit(const float* x, const unsigned short* bits, long long n,
                                                  unsigned short* f16_bits, unsigned short* bf16_bits,
                                                  float* f16_wide, float* bf16_wide) {
  const i64 i = global_thread_x();
  if (i >= n) return;
  f16_bits[i] = __half_as_ushort(__float2half_rn(x[i]));
  bf16_bits[i] = __bfloat16_as_ushort(__float2bfloat16_rn(x[i]));
  f16_wide[i] = __half2float(__ushort_as_half(bits[i]));
  bf16_wide[i] = __bfloat162float(__ushort_as_bfloat16(bits[i]));
}
EMU_EXPORT(selftest_convert_16bit)

// ------------------------------------------------------------------------------------------
// selftest_barrier_reduce: __syncthreads_count / _and / _or when some threads have exited.
// Launch: one block of bd threads; threads t >= active return at once (they take no part).
// Thread t < active: out[3t+0] = __syncthreads_count(pred[t]), out[3t+1] = __syncthreads_and(
// pred[t]), out[3t+2] = __syncthreads_or(pred[t]).
// Host: over t < active, c = #(pred != 0): count = c, and = (c == active), or = (c > 0).
extern "C" __global__ void selftest_barrier_reduce(const int* pred, int* out, int active) {
  const int t = threadIdx.x;
  if (t >= active) return;
  const int p = pred[t];
  const int count = __syncthreads_count(p);
  const int all = __syncthreads_and(p);
  const int any = __syncthreads_or(p);
  out[3 * t + 0] = count;
  out[3 * t + 1] = all != 0;
  out[3 * t + 2] = any != 0;
}
EMU_EXPORT(selftest_barrier_reduce)

// ------------------------------------------------------------------------------------------
// selftest_float_minmax: CUDA's min/max on floats are fminf/fmaxf: a NaN operand loses to a
// number in either argument order; both NaN gives NaN.
// Launch: any 1-D grid covering n. out_min[i] = min(a[i], b[i]), out_max[i] = max(a[i], b[i]).
// Host: IEEE minNum / maxNum (Rust's f32::min / f32::max).
extern "C" __global__ void selftest_float_minmax(const float* a, const float* b, float* out_min, float* out_max,
                                                 long long n) {
  const i64 i = global_thread_x();
  if (i >= n) return;
  out_min[i] = min(a[i], b[i]);
  out_max[i] = max(a[i], b[i]);
}
EMU_EXPORT(selftest_float_minmax)
