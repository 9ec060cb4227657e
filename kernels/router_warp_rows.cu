// router_warp_rows.cu (test-only, feature dev-tools): router_select_warp_per_row_e<N>_f32, the
// selection kernels of router.cu in the warp-per-row mapping (select_row with L = 32: one warp
// per row, lane l holding its N / 32 slots, every reduction a full-warp butterfly). The kernels
// of router.cu run N / 32 lanes per row, each standing in for 32 / L of these lanes
// (router_select.cuh); tests compare the two bit for bit (ops::router::select_warp_per_row).
// Launch: grid ceil(T / 4), block 128, no shared memory; the contract of router_select_e<N>_f32.
#include "router_select.cuh"

#define ROUTER_SELECT_WARP_PER_ROW(N)                                                                \
  extern "C" __global__ void router_select_warp_per_row_e##N##_f32(ROUTER_SELECT_PARAMS) {           \
    ROUTER_SELECT_ROW(N, kWarp);                                                                     \
  }
ROUTER_SELECT_WARP_PER_ROW(32)
EMU_EXPORT(router_select_warp_per_row_e32_f32)
ROUTER_SELECT_WARP_PER_ROW(64)
EMU_EXPORT(router_select_warp_per_row_e64_f32)
ROUTER_SELECT_WARP_PER_ROW(128)
EMU_EXPORT(router_select_warp_per_row_e128_f32)
ROUTER_SELECT_WARP_PER_ROW(256)
EMU_EXPORT(router_select_warp_per_row_e256_f32)
ROUTER_SELECT_WARP_PER_ROW(512)
EMU_EXPORT(router_select_warp_per_row_e512_f32)
ROUTER_SELECT_WARP_PER_ROW(1024)
EMU_EXPORT(router_select_warp_per_row_e1024_f32)
