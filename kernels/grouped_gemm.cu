// grouped_gemm.cu: the grouped expert GEMM (math §5), forward and backward.
//
// For each expert e with rows [offsets[e], offsets[e+1]) of the grouped matrix:
//   forward  C_e  = A_e · B_e^T      A_e [m_e, K] (rows contiguous, or gathered from token order:
//                                    row r = A[sorted_rows[r] / top_k], -1 = a zero row),
//                                    B [E, N, K] (nn.Linear), C [rows, N] (or H [rows, N/2])
//   dgrad    dA_e = dC_e · B_e       dC [rows, N] -> dA [rows, K]
//   wgrad    dB_e = dC_e^T · A_e     [N, K] f32 per expert, a reduction over the group's rows
// Group sizes are read from device memory (offsets, i32 [E+1]); rows = the grouped matrix's
// row count (dispatch's sorted_rows_len) bounds every group. Rows of a group are written
// whatever they hold (a gathered padding row gives a zero input row); rows outside every group
// are not touched. Epilogues (gemm_group.cuh): plain store, SwiGLU (W1 = [E, 2h, d], gate rows
// [0, h) then up rows [h, 2h): H = silu(G) ⊙ U, optionally keeping GU [rows, 2h]), SwiGLU
// backward fused into dgrad (dH -> dGU), and a per-row combine weight; output T or f32.
//
// Tiles (gemm_tiles.cuh): f16/bf16 on tensor cores (mma.sync m16n8k16 + ldmatrix, 3-stage
// cp.async, 128x128x32, 8 warps of 64x32, padded shared rows: conflict-free ldmatrix), f32 on
// 64x64x16 FMA tiles. On sm_90a the f16/bf16 forward also has a persistent, warp-specialised
// wgmma kernel fed by TMA and cp.async through a 4-stage mbarrier ring (gemm_sm90.cuh). Accumulation f32 everywhere; every sum in a fixed order (no atomics).
// Alignment contract of the tensor-core path: K and N multiples of 8, operands 16-byte aligned.
//
// Kernels (<dtype> = f32, f16, bf16):
//   grouped_gemm_fwd_<dtype>     forward, all epilogues
//   grouped_gemm_fwd_sm90_<dtype>  the same on sm_90a (f16, bf16), 128x256x64 wgmma tiles
//   grouped_gemm_dgrad_sm90_<dtype>  dgrad likewise, every epilogue
//   grouped_gemm_wgrad_sm90_<dtype>  wgrad likewise, every write mode and the mask
//   grouped_gemm_decode_<dtype>  forward for groups of few rows: streams B through cp.async
//                                rings, split-K inside the CTA (gemm_decode.cuh)
//   grouped_gemm_decode_dgrad_<dtype>  dgrad likewise, B read across its rows
//   grouped_gemm_dgrad_<dtype>   dA (plain, or SwiGLU backward into dGU), row weights optional
//   grouped_gemm_wgrad_<dtype>   dB over a device list of active experts (ESFT mask), f32,
//                                replacing, accumulating, or sparse (experts with rows only)
//   grouped_gemm_zero_unwritten  zeroes the dB of experts a sparse pass did not write
#include "include/gemm_decode.cuh"
#include "include/gemm_sm90.cuh"
#include "include/gemm_sm90_wgrad.cuh"
#include "include/gemm_tiles.cuh"

template <class T> struct FwdArgs {
  GroupedRows<T> a;
  const T* b;
  const int* offsets;
  int experts;
  i64 rows, n, kdim;
  Epilogue<T> epi;
};

#define FWD_PARAMS(T)                                                                                   \
  const T *a, long long a_rows, const int *sorted_rows, int top_k, const T *b, const int *offsets,      \
      int experts, long long rows, long long n, long long kdim, void *out, int out_f32, int mode,        \
      const float *weights, long long slots, T *gu
#define FWD_ARGS(T)                                                                                     \
  FwdArgs<T> {                                                                                          \
    GroupedRows<T>{a, a_rows, sorted_rows, top_k, kdim}, b, offsets, experts, rows, n, kdim,           \
        Epilogue<T>{mode, out, out_f32, mode == EPI_SWIGLU ? n / 2 : n, weights, sorted_rows, slots, gu, n / 2} \
  }

// ------------------------------------------------------------------------------------------
// grouped_gemm_fwd_<dtype>: C_e = A_e B_e^T for every row tile of every group.
// Mapping: blockIdx.x = row tile, numbered group after group (find_group_tile; tiles past the
//   last one exit at once), blockIdx.y = column tile (BN output columns; SwiGLU: BN/2 output
//   columns from BN/2 gate and BN/2 up rows, interleaved per warp span).
// Traffic: each A row read once per column tile (L2 after the first), each weight row once per
//   row tile of its group, C written once.
// Launch: grid (ceil(rows / BM) + E, ceil(N_out / BN_out)), Tile::THREADS threads,
//   Tile::smem_bytes<K, K>() + BM * 12 (the A-row and row-scale tables) dynamic shared bytes.
template <class T>
__device__ __forceinline__ void grouped_fwd(const FwdArgs<T> p) {
  using Tile = typename RowsTileOf<T>::type;
  DYN_SHARED(unsigned char, smem);
  int* found = reinterpret_cast<int*>(smem);
  find_group_tile(found, p.offsets, p.experts, p.rows, Tile::BM, blockIdx.x);
  __syncthreads();
  const int e = found[0];
  if (e < 0) return;
  const i64 row0 = found[1], row_end = found[2];
  const bool swiglu = p.epi.mode == EPI_SWIGLU;
  const i64 h = p.n / 2, c0 = i64(blockIdx.y) * (swiglu ? Tile::BN / 2 : Tile::BN);
  const T* be = p.b + i64(e) * p.n * p.kdim;
  // The tile's A rows and row scales, resolved once (the gather reads sorted_rows here, not per
  // k-tile or per element).
  const T** a_rows = reinterpret_cast<const T**>(smem + Tile::template smem_bytes<Major::K, Major::K>());
  float* scales = reinterpret_cast<float*>(a_rows + Tile::BM);
  fill_tile_table<Tile::BM, Tile::THREADS>(a_rows, [&](int m) { return row0 + m < row_end ? p.a.row(row0 + m) : nullptr; });
  fill_tile_table<Tile::BM, Tile::THREADS>(scales, [&](int m) { return row0 + m < row_end ? p.epi.scale(row0 + m) : 0.0f; });
  auto a_row = [&](int m) -> const T* { return a_rows[m]; };
  auto b_row = [&](int n) -> const T* {
    const i64 w = swiglu ? swiglu_weight_row(n, Tile::SWIGLU_SPAN, c0, h) : (c0 + n < p.n ? c0 + n : -1);
    return w >= 0 ? be + w * p.kdim : nullptr;
  };
  typename Tile::Acc acc = {};
  Tile::template mainloop<Major::K, Major::K>(acc, a_row, 0, b_row, 0, p.kdim, smem, p.b);
  if (swiglu) {
    Tile::pairs(acc, [&](int m, int c, float g, float u) {
      if (row0 + m < row_end && c0 + c < h) p.epi.pair(row0 + m, c0 + c, g, u, scales[m]);
    });
  } else {
    Tile::each_adjacent(acc, [&](int m, int c, float v0, float v1) {
      if (row0 + m < row_end) p.epi.adjacent(row0 + m, c0 + c, v0, v1, scales[m], p.n);
    });
  }
}

// ------------------------------------------------------------------------------------------
// grouped_gemm_fwd_sm90_<dtype> and grouped_gemm_dgrad_sm90_<dtype>: the forward and dgrad on
// sm_90a (gemm_sm90.cuh has the algorithm, mapping and traffic): FWD_PARAMS / DGRAD_PARAMS
// after map_b, the tensor map of b (forward: [E N, K], boxes 128 x 64; dgrad: [E][N][K], boxes
// 64 x 64 x 1; both 128-byte swizzle).
// Launch: grid (min(SMs, tiles), 1, 1) with tiles = (ceil(rows / 128) + E) x column tiles
//   (ceil(N / 256); SwiGLU ceil(N/2 / 128); dgrad ceil(K / 256)), sm90::kThreads threads,
//   sm90::kSharedBytes dynamic shared bytes.
#define SM90_FWD_KERNEL(T, NAME)                                                                         \
  extern "C" __global__ void __launch_bounds__(sm90::kThreads, 1)                                        \
      NAME(const __grid_constant__ TensorMap map_b, FWD_PARAMS(T)) {                                     \
    __shared__ TmaPipeline<sm90::kStages> pipe;                                                          \
    const FwdArgs<T> f = FWD_ARGS(T);                                                                    \
    const i64 cols = mode == EPI_SWIGLU ? n / 2 : n;                                                     \
    grouped_gemm_sm90<false, T>(Sm90Args<T>{&map_b, f.a, offsets, experts, rows, n, kdim, cols, f.epi}, pipe); \
  }
#define SM90_DGRAD_KERNEL(T, NAME)                                                                       \
  extern "C" __global__ void __launch_bounds__(sm90::kThreads, 1)                                        \
      NAME(const __grid_constant__ TensorMap map_b, DGRAD_PARAMS(T)) {                                   \
    __shared__ TmaPipeline<sm90::kStages> pipe;                                                          \
    const GroupedRows<T> dc_rows{dc, rows, nullptr, 0, n};                                               \
    grouped_gemm_sm90<true, T>(Sm90Args<T>{&map_b, dc_rows, offsets, experts, rows, n, n, kdim, DGRAD_EPILOGUE(T)}, \
                               pipe);                                                                    \
  }

// ------------------------------------------------------------------------------------------
// grouped_gemm_decode_<dtype>: the forward when groups have few rows (decode), and
// grouped_gemm_decode_dgrad_<dtype>: dgrad likewise; both stream B_e once per pass of up to
// rows_cap rows through per-warp cp.async rings, split-K inside the CTA (gemm_decode.cuh has
// the algorithm, mapping and traffic).
// Launch: grid (ceil(cols / (32 * DEC_WARPS / ksplit)), E), DEC_WARPS * 32 threads,
//   DEC_WARPS * DEC_STAGES * decode_stage_bytes(COLS, rows_cap) + DEC_ROWS * 8 dynamic shared
//   bytes (COLS = 2 for the SwiGLU forward, else 1); cols = N (forward), N/2 (SwiGLU), K (dgrad).
//   __launch_bounds__(128, 3): at most 168 registers (32 rows x COLS accumulators), 3 blocks
//   (12 warps, 36 ring stages of weights in flight) per SM where shared memory allows.
template <class T>
__device__ __forceinline__ void grouped_decode(const FwdArgs<T> p, int ksplit, int rows_cap) {
  const bool swiglu = p.epi.mode == EPI_SWIGLU;
  const DecodeArgs<T> d{p.a,    p.b,    p.offsets, p.experts, p.rows,  p.n,
                        p.kdim, p.kdim, swiglu ? p.n / 2 : p.n, p.epi, ksplit, rows_cap};
  if (swiglu) decode_stream<T, 2, false>(d);
  else decode_stream<T, 1, false>(d);
}

// ------------------------------------------------------------------------------------------
// grouped_gemm_dgrad_<dtype>: dA_e = dC_e B_e, [rows, N] x [N, K] -> [rows, K]; with
// EPI_SWIGLU_BWD the result is dH and the epilogue writes dGU [rows, 2K] from GU.
// Mapping: as the forward (row tiles of all groups x column tiles of K); the reduction runs
//   over N: dC tiles K-major, B_e tiles MN-major (rows of B_e along the reduction: the
//   transposed ldmatrix).
// Traffic: dC rows once per column tile, B_e once per row tile of its group, dA written once.
// Launch: grid (ceil(rows / BM) + E, ceil(K / BN)), Tile::THREADS threads,
//   Tile::smem_bytes<K, MN>() + BM * 4 (the row-scale table) dynamic shared bytes.
template <class T>
__device__ __forceinline__ void grouped_dgrad(const T* dc, const T* b, const int* offsets, int experts, i64 rows,
                                              i64 n, i64 kdim, const Epilogue<T> epi) {
  using Tile = typename RowsTileOf<T>::type;
  DYN_SHARED(unsigned char, smem);
  int* found = reinterpret_cast<int*>(smem);
  find_group_tile(found, offsets, experts, rows, Tile::BM, blockIdx.x);
  __syncthreads();
  const int e = found[0];
  if (e < 0) return;
  const i64 row0 = found[1], row_end = found[2], c0 = i64(blockIdx.y) * Tile::BN;
  const T* be = b + i64(e) * n * kdim;
  float* scales = reinterpret_cast<float*>(smem + Tile::template smem_bytes<Major::K, Major::MN>());
  fill_tile_table<Tile::BM, Tile::THREADS>(scales, [&](int m) { return row0 + m < row_end ? epi.scale(row0 + m) : 0.0f; });
  auto dc_row = [&](int m) -> const T* { return row0 + m < row_end ? dc + (row0 + m) * n : nullptr; };
  auto b_row = [&](i64 k) -> const T* { return be + k * kdim + c0; };
  typename Tile::Acc acc = {};
  Tile::template mainloop<Major::K, Major::MN>(acc, dc_row, 0, b_row, int(min(kdim - c0, i64(Tile::BN))), n, smem,
                                               dc);
  Tile::each_adjacent(acc, [&](int m, int c, float v0, float v1) {
    if (row0 + m < row_end) epi.adjacent(row0 + m, c0 + c, v0, v1, scales[m], kdim);
  });
}

// ------------------------------------------------------------------------------------------
// grouped_gemm_wgrad_<dtype>: dB_e = dC_e^T A_e ([N, m_e] x [m_e, K]) for the experts listed
// in active[0 .. gridDim.y) (null: every expert, blockIdx.y): masked experts get no block at
// all. How dB_e is written (`mode`):
//   kWgradReplace     dB_e = result; an empty group writes zeros;
//   kWgradAccumulate  dB_e += result; an empty group leaves dB_e as it is;
//   kWgradSparse      an empty group is neither computed nor written; otherwise dB_e is replaced
//                     the first time it is written in the caller's pass and added to after.
//                     `written[e]` (zeroed by the caller before the pass) records it as
//                     (call + 1) << 1 | added, where `call` numbers the wgrad launches of the pass
//                     from 0 and `added` says whether an earlier call had written dB_e. Every block
//                     of expert e reads the flag and writes the same new value, so a block that
//                     reads a flag already marked by this call still recovers `added`: no order
//                     between blocks is needed. Two launches sharing a call index (dW1 and dW2 of
//                     one layer iteration) must have the same groups.
// Mapping: blockIdx.y = index into active, blockIdx.x = (N tile, K tile) of dB_e; the reduction
//   runs over the group's rows in order (deterministic): dC and A tiles both MN-major; A rows
//   gathered like the forward's; a row A lacks (nullptr) loads as zeros in dC too.
// Traffic: dC_e read once per K tile, A_e once per N tile, dB written (or read and written) once;
//   nothing for an empty group in sparse mode.
// Launch: grid (ceil(N / BM) * ceil(K / BN), active count), Tile::THREADS threads,
//   Tile::smem_bytes<MN, MN>() dynamic shared bytes.
template <class T>
__device__ __forceinline__ void grouped_wgrad(const T* dc, const GroupedRows<T> a, const int* offsets,
                                              const int* active, int experts, i64 rows, i64 n, i64 kdim,
                                              float* db, int mode, unsigned* written, unsigned call) {
  using Tile = typename RowsTileOf<T>::type;
  DYN_SHARED(unsigned char, smem);
  __shared__ int add_to_db;
  const int e = active != nullptr ? active[blockIdx.y] : int(blockIdx.y);
  if (e < 0 || e >= experts) return;
  const GroupRange g = group_range(offsets, e, rows);
  if (mode == kWgradSparse && g.end == g.start) return;  // uniform: the group is the block's
  if (threadIdx.x == 0) {
    add_to_db = mode == kWgradSparse ? wgrad_mark_written(written, e, call) : mode == kWgradAccumulate;
  }
  __syncthreads();
  const bool accumulate = add_to_db != 0;
  const int tiles_n = int((n + Tile::BM - 1) / Tile::BM);
  const i64 n0 = i64(blockIdx.x % tiles_n) * Tile::BM, k0 = i64(blockIdx.x / tiles_n) * Tile::BN;
  // A row absent from A (padding, or a token routed nowhere in a gathered list) is absent from
  // dC too: 0 * NaN would otherwise reach dB.
  auto dc_row = [&](i64 r) -> const T* { return a.row(g.start + r) ? dc + (g.start + r) * n + n0 : nullptr; };
  auto a_row = [&](i64 r) -> const T* {
    const T* p = a.row(g.start + r);
    return p ? p + k0 : nullptr;
  };
  typename Tile::Acc acc = {};
  Tile::template mainloop<Major::MN, Major::MN>(acc, dc_row, int(min(n - n0, i64(Tile::BM))), a_row,
                                                int(min(kdim - k0, i64(Tile::BN))), g.end - g.start, smem, dc);
  float* dbe = db + i64(e) * n * kdim;
  Tile::each(acc, [&](int m, int c, float v) {
    if (n0 + m >= n || k0 + c >= kdim) return;
    const i64 i = (n0 + m) * kdim + k0 + c;
    dbe[i] = accumulate ? dbe[i] + v : v;
  });
}

// grouped_gemm_zero_unwritten(written [E], db [E, per_expert] f32, experts, per_expert): zeroes
// dB_e of every expert whose written[e] is 0 (after a pass of sparse wgrad calls: the experts
// that got no rows, or were masked), so dB becomes the dense gradient.
// Mapping: blockIdx.y = expert (a written expert's blocks return at once), grid-stride over its
// elements in 16-byte stores (per_expert a multiple of 4 and db 16-byte aligned) or one at a time.
// Traffic: E flags; 4 bytes written per element of an unwritten expert.
extern "C" __global__ void grouped_gemm_zero_unwritten(const unsigned* written, float* db, int experts,
                                                       long long per_expert) {
  const int e = int(blockIdx.y);
  if (e >= experts || written[e] != 0) return;
  float* dbe = db + i64(e) * per_expert;
  const i64 stride = i64(gridDim.x) * blockDim.x;
  if (per_expert % 4 == 0 && reinterpret_cast<uintptr_t>(db) % 16 == 0) {
    const float4 zero = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    for (i64 i = global_thread_x(); i < per_expert / 4; i += stride) store_128(reinterpret_cast<float4*>(dbe) + i, zero);
  } else {
    for (i64 i = global_thread_x(); i < per_expert; i += stride) dbe[i] = 0.0f;
  }
}
EMU_EXPORT(grouped_gemm_zero_unwritten)

#define DGRAD_PARAMS(T)                                                                                 \
  const T *dc, const T *b, const int *offsets, int experts, long long rows, long long n, long long kdim, \
      void *out, int out_f32, int mode, const int *sorted_rows, const float *weights, long long slots,   \
      const T *gu
#define DGRAD_EPILOGUE(T)                                                                               \
  Epilogue<T> { mode, out, out_f32, mode == EPI_SWIGLU_BWD ? 2 * kdim : kdim, weights, sorted_rows, slots, \
                const_cast<T*>(gu), kdim }
#define WGRAD_PARAMS(T)                                                                                 \
  const T *dc, const T *a, long long a_rows, const int *sorted_rows, int top_k, const int *offsets,     \
      const int *active, int experts, long long rows, long long n, long long kdim, float *db, int mode,   \
      unsigned *written, unsigned call

#define DECODE_PARAMS(T) FWD_PARAMS(T), int ksplit, int rows_cap
#define DECODE_DGRAD_PARAMS(T) DGRAD_PARAMS(T), int ksplit, int rows_cap
#define DECODE_DGRAD_ARGS(T)                                                                            \
  DecodeArgs<T> {                                                                                       \
    GroupedRows<T>{dc, rows, nullptr, 0, n}, b, offsets, experts, rows, n, kdim, n, kdim, DGRAD_EPILOGUE(T), \
        ksplit, rows_cap                                                                                \
  }
#define DECODE_BOUNDS __launch_bounds__(DEC_WARPS * 32, 3)

#define WGRAD_ROWS(T) GroupedRows<T>{a, a_rows, sorted_rows, top_k, kdim}

extern "C" __global__ void grouped_gemm_fwd_f32(FWD_PARAMS(float)) { grouped_fwd<float>(FWD_ARGS(float)); }
EMU_EXPORT(grouped_gemm_fwd_f32)
extern "C" __global__ void DECODE_BOUNDS grouped_gemm_decode_f32(DECODE_PARAMS(float)) {
  grouped_decode<float>(FWD_ARGS(float), ksplit, rows_cap);
}
EMU_EXPORT(grouped_gemm_decode_f32)
extern "C" __global__ void DECODE_BOUNDS grouped_gemm_decode_dgrad_f32(DECODE_DGRAD_PARAMS(float)) {
  decode_stream<float, 1, true>(DECODE_DGRAD_ARGS(float));
}
EMU_EXPORT(grouped_gemm_decode_dgrad_f32)
extern "C" __global__ void grouped_gemm_dgrad_f32(DGRAD_PARAMS(float)) {
  grouped_dgrad<float>(dc, b, offsets, experts, rows, n, kdim, DGRAD_EPILOGUE(float));
}
EMU_EXPORT(grouped_gemm_dgrad_f32)
extern "C" __global__ void grouped_gemm_wgrad_f32(WGRAD_PARAMS(float)) {
  grouped_wgrad<float>(dc, WGRAD_ROWS(float), offsets, active, experts, rows, n, kdim, db, mode, written, call);
}
EMU_EXPORT(grouped_gemm_wgrad_f32)
extern "C" __global__ void grouped_gemm_fwd_f16(FWD_PARAMS(__half)) { grouped_fwd<__half>(FWD_ARGS(__half)); }
EMU_EXPORT(grouped_gemm_fwd_f16)
extern "C" __global__ void DECODE_BOUNDS grouped_gemm_decode_f16(DECODE_PARAMS(__half)) {
  grouped_decode<__half>(FWD_ARGS(__half), ksplit, rows_cap);
}
EMU_EXPORT(grouped_gemm_decode_f16)
extern "C" __global__ void DECODE_BOUNDS grouped_gemm_decode_dgrad_f16(DECODE_DGRAD_PARAMS(__half)) {
  decode_stream<__half, 1, true>(DECODE_DGRAD_ARGS(__half));
}
EMU_EXPORT(grouped_gemm_decode_dgrad_f16)
extern "C" __global__ void grouped_gemm_dgrad_f16(DGRAD_PARAMS(__half)) {
  grouped_dgrad<__half>(dc, b, offsets, experts, rows, n, kdim, DGRAD_EPILOGUE(__half));
}
EMU_EXPORT(grouped_gemm_dgrad_f16)
extern "C" __global__ void grouped_gemm_wgrad_f16(WGRAD_PARAMS(__half)) {
  grouped_wgrad<__half>(dc, WGRAD_ROWS(__half), offsets, active, experts, rows, n, kdim, db, mode, written, call);
}
EMU_EXPORT(grouped_gemm_wgrad_f16)
extern "C" __global__ void grouped_gemm_fwd_bf16(FWD_PARAMS(__nv_bfloat16)) { grouped_fwd<__nv_bfloat16>(FWD_ARGS(__nv_bfloat16)); }
EMU_EXPORT(grouped_gemm_fwd_bf16)
extern "C" __global__ void DECODE_BOUNDS grouped_gemm_decode_bf16(DECODE_PARAMS(__nv_bfloat16)) {
  grouped_decode<__nv_bfloat16>(FWD_ARGS(__nv_bfloat16), ksplit, rows_cap);
}
EMU_EXPORT(grouped_gemm_decode_bf16)
extern "C" __global__ void DECODE_BOUNDS grouped_gemm_decode_dgrad_bf16(DECODE_DGRAD_PARAMS(__nv_bfloat16)) {
  decode_stream<__nv_bfloat16, 1, true>(DECODE_DGRAD_ARGS(__nv_bfloat16));
}
EMU_EXPORT(grouped_gemm_decode_dgrad_bf16)
extern "C" __global__ void grouped_gemm_dgrad_bf16(DGRAD_PARAMS(__nv_bfloat16)) {
  grouped_dgrad<__nv_bfloat16>(dc, b, offsets, experts, rows, n, kdim, DGRAD_EPILOGUE(__nv_bfloat16));
}
EMU_EXPORT(grouped_gemm_dgrad_bf16)
extern "C" __global__ void grouped_gemm_wgrad_bf16(WGRAD_PARAMS(__nv_bfloat16)) {
  grouped_wgrad<__nv_bfloat16>(dc, WGRAD_ROWS(__nv_bfloat16), offsets, active, experts, rows, n, kdim, db, mode, written, call);
}
EMU_EXPORT(grouped_gemm_wgrad_bf16)
SM90_FWD_KERNEL(__half, grouped_gemm_fwd_sm90_f16)
EMU_EXPORT(grouped_gemm_fwd_sm90_f16)
SM90_FWD_KERNEL(__nv_bfloat16, grouped_gemm_fwd_sm90_bf16)
EMU_EXPORT(grouped_gemm_fwd_sm90_bf16)
SM90_DGRAD_KERNEL(__half, grouped_gemm_dgrad_sm90_f16)
EMU_EXPORT(grouped_gemm_dgrad_sm90_f16)
SM90_DGRAD_KERNEL(__nv_bfloat16, grouped_gemm_dgrad_sm90_bf16)
EMU_EXPORT(grouped_gemm_dgrad_sm90_bf16)
// grouped_gemm_wgrad_sm90_<dtype>: wgrad on sm_90a (gemm_sm90_wgrad.cuh has the algorithm,
// mapping and traffic), WGRAD_PARAMS then the count of active experts.
// Launch: grid (min(SMs, tiles), 1, 1) with tiles = active x ceil(N / 128) x ceil(K / 256),
//   sm90::kThreads threads, sm90::kSharedBytes dynamic shared bytes.
#define SM90_WGRAD_KERNEL(T, NAME)                                                                       \
  extern "C" __global__ void __launch_bounds__(sm90::kThreads, 1) NAME(WGRAD_PARAMS(T), int slots) {     \
    __shared__ TmaPipeline<sm90::kStages> pipe;                                                          \
    grouped_gemm_wgrad_sm90<T>(                                                                          \
        Sm90Wgrad<T>{dc, WGRAD_ROWS(T), offsets, active, slots, experts, rows, n, kdim, db, mode, written, call}, \
        pipe);                                                                                           \
  }
SM90_WGRAD_KERNEL(__half, grouped_gemm_wgrad_sm90_f16)
EMU_EXPORT(grouped_gemm_wgrad_sm90_f16)
SM90_WGRAD_KERNEL(__nv_bfloat16, grouped_gemm_wgrad_sm90_bf16)
EMU_EXPORT(grouped_gemm_wgrad_sm90_bf16)
