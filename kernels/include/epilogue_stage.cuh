// epilogue_stage.cuh: a warp's epilogue through shared memory, for wgmma accumulators.
//
// Why: wgmma leaves a thread pairs of adjacent columns (accumulator 4j + 2 half + i is row
// g8 + 8 half, column 8j + 2q + i of its warp's 16 rows; g8 = lane / 4, q = lane % 4). Stored
// straight from there, one warp store writes 8 rows x 16 bytes: half of every 32-byte sector
// it touches for f32, a quarter for a 16-bit output written one element at a time.
//
// Algorithm: the warp writes a 16 x 64 f32 piece of its results into its own 4 KiB staging
// tile in that fragment layout (8-byte stores), then reads the tile back by rows, each lane
// one 16-byte segment of a row (4 f32 or 8 16-bit elements), converts, and stores the segment
// with one 16-byte store: a warp store covers 2 whole rows of 256 bytes (f32) or 4 of 128
// bytes (16-bit), every sector full. Segments past the output's last column, or at an
// address not 16-byte aligned (outputs may be views at any element), go element by element.
// Only the warp touches its tile, so __syncwarp orders the writes before the reads, and the
// reads before the next piece's writes: no block barrier, no other warp waits.
//
// Layout: row r (0..15) is 256 bytes, 16 chunks of 16 bytes; logical chunk c sits at physical
// chunk c ^ f(r) ^ (c >> 3), f(r) = 2 (r & 3) + ((r >> 2) & 1), a permutation inside each half
// row. Banks are 4 bytes, so a chunk's bank group is its physical index mod 8; each phase of
// the three access patterns touches 8 distinct groups (no bank conflict):
//   fragment writes (8 bytes; a half warp = rows g8 in 0..3 or 4..7 of one 8-row half, logical
//     chunk 2j + q / 2): f(r) moves j's bits 1..2 by the row and bit 0 by the half, q / 2 fills bit 0;
//   f32 reads (16 bytes; a quarter warp = chunks 0..7 or 8..15 of one row): a permutation;
//   16-bit reads (chunk 2m, then 2m + 1, of one row for m = 0..7): c >> 3 flips bit 0 for m >= 4,
//     so the two halves of the row land on opposite parities.
#pragma once
#include "common.cuh"

namespace stage {
constexpr int kRows = 16, kCols = 64;
constexpr unsigned kWarpBytes = kRows * kCols * 4;  // 4 KiB per warp

// n elements of T at p (n sizeof(T) = 8 or 16 bytes, p aligned to that) as f32: one access.
template <class T, int n>
__device__ __forceinline__ void load_segment(const T* p, float (&v)[n]) {
  constexpr int kBytes = n * int(sizeof(T)), kWords = kBytes / 4;
  static_assert(kBytes == 8 || kBytes == 16, "a segment is 8 or 16 bytes");
  unsigned words[kWords];
  if constexpr (kBytes == 16) {
    const uint4 w = load_128(reinterpret_cast<const uint4*>(p));
    memcpy(words, &w, 16);
  } else {
    const uint2 w = load_64(reinterpret_cast<const uint2*>(p));
    memcpy(words, &w, 8);
  }
  constexpr int per_word = 4 / int(sizeof(T));
#pragma unroll
  for (int e = 0; e < n; ++e) v[e] = bits_to_f32<T>(words[e / per_word] >> (16 * (e % per_word)));
}

// The 16 bytes of n elements of E at p (16-byte aligned) from f32 values (rounded to nearest
// even for a 16-bit E): one store.
template <class E, int n>
__device__ __forceinline__ void store_segment(E* p, const float (&v)[n]) {
  static_assert(n * sizeof(E) == 16, "a stored segment is 16 bytes");
  constexpr int per_word = 4 / int(sizeof(E));
  unsigned words[4] = {0u, 0u, 0u, 0u};
#pragma unroll
  for (int e = 0; e < n; ++e) words[e / per_word] |= f32_to_bits<E>(v[e]) << (16 * (e % per_word));
  uint4 w;
  memcpy(&w, words, 16);
  store_128(reinterpret_cast<uint4*>(p), w);
}
}  // namespace stage

struct WarpStage {
  float* tile;  // this warp's 4 KiB, 16-byte aligned

  // The float offset of (row, col) in the tile (the swizzle above).
  __device__ __forceinline__ static int offset(int row, int col) {
    const int chunk = col >> 2;
    const int physical = chunk ^ (((row & 3) << 1) | ((row >> 2) & 1)) ^ (chunk >> 3);
    return row * stage::kCols + physical * 4 + (col & 3);
  }

  // Fills the tile from value(j, half, i): row g8 + 8 half, column 8j + 2q + i (j < 8), the
  // fragment layout of a 64-column piece of accumulators.
  template <class F>
  __device__ __forceinline__ void put_fragments(F&& value) const {
    const int lane = int(threadIdx.x % 32), g8 = lane / 4, q = lane % 4;
    __syncwarp();  // the reads of the previous piece are done
#pragma unroll
    for (int j = 0; j < stage::kCols / 8; ++j)
#pragma unroll
      for (int half = 0; half < 2; ++half)
        store_64(reinterpret_cast<float2*>(tile + offset(g8 + 8 * half, 8 * j + 2 * q)),
                 make_float2(value(j, half, 0), value(j, half, 1)));
    __syncwarp();
  }

  // Reads the tile's first `rows` rows back by 16-byte segments of `per` floats' worth of
  // output (per = 4: one 16-byte read; per = 8: two, for a 16-bit output), each lane one
  // segment: f(r, c, v) for tile row r, tile column c = its first column, v[per] its values.
  template <int per, class F>
  __device__ __forceinline__ void for_each_segment(int rows, F&& f) const {
    constexpr int segments = stage::kCols / per;  // per row: 16 or 8
    constexpr int rows_per_pass = 32 / segments;  // 2 or 4
    const int lane = int(threadIdx.x % 32), seg = lane % segments;
#pragma unroll
    for (int pass = 0; pass < stage::kRows / rows_per_pass; ++pass) {
      const int r = lane / segments + rows_per_pass * pass;
      if (r >= rows) continue;
      float v[per];
#pragma unroll
      for (int h = 0; h < per / 4; ++h) {
        const float4 x = load_128(reinterpret_cast<const float4*>(tile + offset(r, seg * per + 4 * h)));
        v[4 * h] = x.x;
        v[4 * h + 1] = x.y;
        v[4 * h + 2] = x.z;
        v[4 * h + 3] = x.w;
      }
      f(r, seg * per, v);
    }
  }

  // Stores the tile's first `rows` rows: tile (r, c) to out[(row0 + r) ld + col0 + c] as E,
  // for col0 + c < col_end; with `add`, added to what is there (read, add in f32, write).
  template <class E>
  __device__ __forceinline__ void store_rows(E* out, i64 ld, i64 row0, int rows, i64 col0, i64 col_end,
                                             bool add = false) const {
    constexpr int per = 16 / int(sizeof(E));  // elements per segment: 4 (f32) or 8
    for_each_segment<per>(rows, [&](int r, int col, float (&v)[per]) {
      const i64 c = col0 + col;
      E* dst = out + (row0 + r) * ld + c;
      if (c + per <= col_end && aligned_16(dst)) {
        if (add) {  // f32 outputs only: 16-bit outputs are never accumulated into
          float old[per];
          stage::load_segment(dst, old);
#pragma unroll
          for (int e = 0; e < per; ++e) v[e] += old[e];
        }
        stage::store_segment(dst, v);
      } else {
#pragma unroll
        for (int e = 0; e < per; ++e)
          if (c + e < col_end) dst[e] = from_f32<E>(add ? to_f32(dst[e]) + v[e] : v[e]);
      }
    });
  }

  // The SwiGLU backward of the tile's first `rows` rows, which hold dh (scaled), for row
  // row0 + r: with g, u the saved gate and up values of column c = col0 + tile column (a GU
  // row is 2h: gate at c, up at h + c), out[row, c] = dh u silu'(g) and out[row, h + c] =
  // dh silu(g), for c < col_end (<= h). Reads GU and writes both outputs by whole row segments
  // (16 bytes of output each; GU's segment is 8 bytes when GU is 16-bit and the output f32); a
  // segment past col_end or not aligned goes element by element. The math is Epilogue::single's.
  template <class E, class T>
  __device__ __forceinline__ void swiglu_backward_rows(E* out, i64 ld, const T* gu, i64 h, i64 row0, int rows,
                                                       i64 col0, i64 col_end) const {
    constexpr int per = 16 / int(sizeof(E));
    for_each_segment<per>(rows, [&](int r, int col, float (&dh)[per]) {
      const i64 c = col0 + col, row = row0 + r;
      const T* g_src = gu + row * 2 * h + c;
      E* d_gate = out + row * ld + c;
      E* d_up = d_gate + h;
      const bool whole = c + per <= col_end && aligned_16(d_gate) && aligned_16(d_up) &&
                         aligned_to<per * sizeof(T)>(g_src) && aligned_to<per * sizeof(T)>(g_src + h);
      float g[per], u[per];
      if (whole) {
        stage::load_segment(g_src, g);
        stage::load_segment(g_src + h, u);
      } else {
#pragma unroll
        for (int e = 0; e < per; ++e) {
          g[e] = c + e < col_end ? to_f32(g_src[e]) : 0.0f;
          u[e] = c + e < col_end ? to_f32(g_src[h + e]) : 0.0f;
        }
      }
      float dg[per], du[per];
#pragma unroll
      for (int e = 0; e < per; ++e) {
        const float sg = sigmoidf_(g[e]);
        dg[e] = dh[e] * u[e] * sg * (1.0f + g[e] * (1.0f - sg));
        du[e] = dh[e] * g[e] * sg;
      }
      if (whole) {
        stage::store_segment(d_gate, dg);
        stage::store_segment(d_up, du);
      } else {
#pragma unroll
        for (int e = 0; e < per; ++e)
          if (c + e < col_end) {
            d_gate[e] = from_f32<E>(dg[e]);
            d_up[e] = from_f32<E>(du[e]);
          }
      }
    });
  }
};
