// wgmma_layout.cuh: where a rows x depth tile of 16-bit elements sits in shared memory in one
// of wgmma's canonical layouts (ptx.cuh), and the descriptor of each 16-deep slice of it, for
// code that fills such a tile with ordinary stores (the self-tests; TMA writes the same layouts
// on its own). `mn` is a row of A or a column of B; the tile starts on a 1024-byte boundary.
//
//   K-major, unswizzled:  8x8 core matrices of 128 bytes, down mn first (SBO = 128), then
//                         along k (LBO = rows * 16).
//   K-major, swizzled:    rows of E = span/2 elements (SBO = 8 * span), E-deep column blocks
//                         of the whole tile one after another along k.
//   MN-major, unswizzled: core matrices of 8 k-rows of 8 mn, along mn first (SBO = 128),
//                         then along k (LBO = rows * 16).
//   MN-major, swizzled:   k-rows of E mn-elements (SBO = 8 * span between 8-deep groups),
//                         E-wide mn blocks of the whole depth one after another (LBO).
// Every address is then permuted by swizzle_address.
#pragma once
#include "ptx.cuh"

struct WgmmaTile {
  unsigned rows, depth;  // mn and k extents; rows a multiple of 8 (of E when MN-major swizzled), depth of 16
  SwizzleMode mode;
  bool mn_major;

  __host__ __device__ unsigned span() const { return mode == SwizzleMode::None ? 16u : swizzle_span_bytes(mode); }

  // Byte offset of element (mn, k) from the tile's start.
  __host__ __device__ unsigned offset(unsigned mn, unsigned k) const {
    const unsigned e = span() / 2;
    unsigned linear;
    if (mode == SwizzleMode::None)
      linear = mn_major ? k / 8 * rows * 16 + mn / 8 * 128 + k % 8 * 16 + mn % 8 * 2
                        : k / 8 * rows * 16 + mn / 8 * 128 + mn % 8 * 16 + k % 8 * 2;
    else
      linear = mn_major ? mn / e * depth * span() + k * span() + mn % e * 2 : k / e * rows * span() + mn * span() + k % e * 2;
    return swizzle_address(linear, mode);
  }

  __host__ __device__ unsigned bytes() const { return rows * depth * 2; }

  // The descriptor of slice s (k in 16s..16s+15) of the tile at `tile`.
  __device__ uint64_t slice(const unsigned char* tile, unsigned s) const {
    const unsigned k0 = 16 * s, e = span() / 2;
    if (mode == SwizzleMode::None) return wgmma_descriptor(tile + k0 / 8 * rows * 16, rows * 16, 128, mode);
    if (mn_major) return wgmma_descriptor(tile + k0 * span(), depth * span(), 8 * span(), mode);
    return wgmma_descriptor(tile + k0 / e * rows * span() + k0 % e * 2, 16, 8 * span(), mode);
  }
};

// Rounds a shared-memory pointer up to the 1024-byte repeat of the 128-byte swizzle.
__device__ __forceinline__ unsigned char* align_1024(unsigned char* p) {
  return p + ((1024u - unsigned(reinterpret_cast<uintptr_t>(p) & 1023u)) & 1023u);
}
