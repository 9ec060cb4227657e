// planted_async.cu: deliberate bugs in Hopper's asynchronous copies (mbarrier, TMA, bulk
// copies), one per mode or flag, to prove that the emulator catches them
// (tests/hopper_async.rs). Never launched on a GPU by the tests; compiled by nvcc only to
// keep them valid CUDA.
//
// Kernels:
//   planted_tma_tile          a TMA load of one 2D box: the control, a read without the
//                             mbarrier wait, and expect_tx announcing 16 bytes too many or
//                             too few (mode)
//   planted_mbarrier_parity   rows through one bulk-copied stage, the last wait on the wrong
//                             parity (flag)
#include "ptx.cuh"

__device__ __forceinline__ unsigned char* align_to_1024(unsigned char* p) {
#if defined(__CUDA_ARCH__)
  const unsigned address = shared_address(p);
#else
  const unsigned address = unsigned(reinterpret_cast<uintptr_t>(p));
#endif
  return p + (1024u - address % 1024u) % 1024u;
}

// ------------------------------------------------------------------------------------------
// planted_tma_tile: thread 0 loads the box of `map` at (c0, c1) into a 1024-byte-aligned tile
// and every thread copies the tile to `out` (16 bytes a thread per step).
// Launch: one block of any size, box_bytes + 1024 bytes of dynamic shared memory.
// mode 0 (control): announce box_bytes, wait: out = the tile as selftest_tma_roundtrip lays it.
// mode 1 (missing wait): no mbarrier wait; the tile still holds the poison the emulator fills
//   an in-flight destination with (0xFF bytes), and so does out.
// mode 2 (expect_tx 16 bytes too many): the phase can never complete: a deadlock naming the
//   barrier and its tx-count.
// mode 3 (expect_tx 16 bytes too few): the copy completes more bytes than announced: an error.
extern "C" __global__ void planted_tma_tile(const __grid_constant__ TensorMap map, int c0, int c1,
                                            unsigned box_bytes, int mode, unsigned char* out) {
  __shared__ __align__(8) uint64_t bar;
  DYN_SHARED(unsigned char, dyn);
  unsigned char* tile = align_to_1024(dyn);
  if (threadIdx.x == 0) mbarrier_init(&bar, 1);
  __syncthreads();
  if (threadIdx.x == 0) {
    const unsigned announced = mode == 2 ? box_bytes + 16 : mode == 3 ? box_bytes - 16 : box_bytes;
    mbarrier_arrive_expect_tx(&bar, announced);
    const int c[2] = {c0, c1};
    tma_load<2>(tile, &map, &bar, c);
  }
  if (mode != 1) mbarrier_wait(&bar, 0);
  for (unsigned i = threadIdx.x; i < box_bytes / 16; i += blockDim.x)
    reinterpret_cast<uint4*>(out)[i] = reinterpret_cast<const uint4*>(tile)[i];
}
EMU_EXPORT(planted_tma_tile)

// ------------------------------------------------------------------------------------------
// planted_mbarrier_parity: one warp; for round r lane 0 announces 128 bytes and bulk-copies
// row r (32 u32) into a one-row stage; every lane waits for the phase of parity r & 1, folds
// its element into acc, and the warp syncs before the next copy overwrites the stage.
// Launch: 32 threads, one block, 128 bytes of dynamic shared memory. src: rounds x 32 u32.
// Host (control): out[l] = fold over r of acc * 31 + src[r*32 + l] (u32, wrapping).
// flip = 1: the last round waits for parity (r & 1) ^ 1, whose phase (the one before) is long
// complete, so the wait returns at once and the lanes read the stage before the row lands:
// poison, or the previous row.
extern "C" __global__ void planted_mbarrier_parity(const unsigned* src, int rounds, int flip, unsigned* out) {
  __shared__ __align__(8) uint64_t full;
  DYN_SHARED(unsigned char, dyn);
  unsigned* stage = reinterpret_cast<unsigned*>(dyn);  // 16-byte aligned, as a bulk copy needs
  const unsigned lane = threadIdx.x;
  if (lane == 0) mbarrier_init(&full, 1);
  __syncwarp();
  unsigned acc = 0;
  for (int r = 0; r < rounds; ++r) {
    if (lane == 0) {
      mbarrier_arrive_expect_tx(&full, 128);
      bulk_load(stage, src + i64(r) * 32, 128, &full);
    }
    const unsigned wrong = (flip && r == rounds - 1) ? 1u : 0u;
    mbarrier_wait(&full, (unsigned(r) & 1u) ^ wrong);
    acc = acc * 31u + stage[lane];
    __syncwarp();
  }
  out[lane] = acc;
}
EMU_EXPORT(planted_mbarrier_parity)
