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

  // Stores the tile's first `rows` rows: tile (r, c) to out[(row0 + r) ld + col0 + c] as E,
  // for col0 + c < col_end; with `add`, added to what is there (read, add in f32, write).
  template <class E>
  __device__ __forceinline__ void store_rows(E* out, i64 ld, i64 row0, int rows, i64 col0, i64 col_end,
                                             bool add = false) const {
    constexpr int per = 16 / int(sizeof(E));    // elements per segment: 4 (f32) or 8
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
      const i64 c = col0 + seg * per;
      E* dst = out + (row0 + r) * ld + c;
      if (c + per <= col_end && aligned_16(dst)) {
        if constexpr (per == 4) {
          if (add) {
            const float4 old = load_128(reinterpret_cast<const float4*>(dst));
            v[0] += old.x;
            v[1] += old.y;
            v[2] += old.z;
            v[3] += old.w;
          }
          store_128(reinterpret_cast<float4*>(dst), make_float4(v[0], v[1], v[2], v[3]));
        } else {  // 16-bit outputs are never accumulated into
          static_assert(sizeof(E) == 2, "f32 or a 16-bit element");
          uint4 bits;
          bits.x = f32_to_bits<E>(v[0]) | (f32_to_bits<E>(v[1]) << 16);
          bits.y = f32_to_bits<E>(v[2]) | (f32_to_bits<E>(v[3]) << 16);
          bits.z = f32_to_bits<E>(v[4]) | (f32_to_bits<E>(v[5]) << 16);
          bits.w = f32_to_bits<E>(v[6]) | (f32_to_bits<E>(v[7]) << 16);
          store_128(reinterpret_cast<uint4*>(dst), bits);
        }
      } else {
#pragma unroll
        for (int e = 0; e < per; ++e)
          if (c + e < col_end) dst[e] = from_f32<E>(add ? to_f32(dst[e]) + v[e] : v[e]);
      }
    }
  }
};
