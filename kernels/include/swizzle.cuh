// swizzle.cuh: Hopper's shared-memory swizzle modes, one definition for the GPU-side
// address arithmetic of kernels and for the emulator's TMA and wgmma twins.
//
// TMA writes a tile into shared memory, and wgmma reads one through a matrix descriptor,
// in one of four layouts. A swizzled layout permutes the 16-byte chunks inside each row
// of the swizzle span (32, 64 or 128 bytes) by XOR with the row index, so that the eight
// 16-byte chunks a warp touches in one column land in different banks:
//
//   mode   span   chunk bits XORed   with address bits   repeats every
//   None     -          -                  -                   -
//   B32     32 B      [4]               [7]                 256 B
//   B64     64 B      [4:5]             [7:8]               512 B
//   B128   128 B      [4:6]             [7:9]              1024 B
//
// The permutation acts on the absolute shared-memory address (PTX ISA, "Tensor-copy
// swizzling modes"; CUDA driver API, CUtensorMapSwizzle), so a swizzled tile must start
// on a multiple of its repeat: swizzle_base_aligned() checks that.
#pragma once
#include "common.cuh"

enum class SwizzleMode : unsigned { None = 0, B32 = 1, B64 = 2, B128 = 3 };

// log2 of the number of 16-byte chunks permuted: 0 (none), 1, 2 or 3.
__host__ __device__ __forceinline__ unsigned swizzle_bits(SwizzleMode mode) {
  return static_cast<unsigned>(mode);
}

// Bytes after which the pattern repeats (and to which a swizzled tile must be aligned).
__host__ __device__ __forceinline__ unsigned swizzle_repeat_bytes(SwizzleMode mode) {
  return mode == SwizzleMode::None ? 16u : 128u << swizzle_bits(mode);
}

// Bytes in one swizzled row (the span): TMA's inner box must not exceed it.
__host__ __device__ __forceinline__ unsigned swizzle_span_bytes(SwizzleMode mode) {
  return mode == SwizzleMode::None ? 0u : 16u << swizzle_bits(mode);
}

// Where the byte at logical shared address `addr` is stored under `mode`. An involution:
// applying it twice gives `addr` back.
__host__ __device__ __forceinline__ unsigned swizzle_address(unsigned addr, SwizzleMode mode) {
  const unsigned mask = (1u << swizzle_bits(mode)) - 1u;
  return addr ^ (((addr >> 7) & mask) << 4);
}

__host__ __device__ __forceinline__ bool swizzle_base_aligned(unsigned addr, SwizzleMode mode) {
  return addr % swizzle_repeat_bytes(mode) == 0;
}
