// gate.cu: router scoring z = score(X) (math §1), forward and backward.
//
// Forms (weights stored like nn.Linear, `in` = d contiguous; x_t a row of X [T, d]):
//   linear     z_te = W_e . x_t + b_e                      W [E, d], b [E] f32
//   low-rank   z_te = sum_j (U_ej . x)(V_ej . x) + B_e . x + c_e    U, V [E, r, d], B [E, d], c [E] f32
//   symmetric  z_te = sum_j (U_ej . x)^2 + B_e . x + c_e            U [E, r, d]
//   attention  z_te = sum_j (Q_j . x)(K_ej . x) / sqrt(r)           Q [r, d] shared, K [E, r, d]
//   full       z_te = sum_j (A_ej . x) x_j + B_e . x + c_e          A [E, d, d] (row j = A_e[j, :]);
//              the full form is the low-rank one with U = A_e and V = I, so it runs as rank d.
//   (B, b, c optional; the monomial form is full without B.) X and the weights share one
//   dtype (f32/f16/bf16); z, dz, biases and weight gradients are f32; dX has X's dtype.
//
// Non-finite input rows (math §1): a row of X with an element that is NaN, +-inf or at least
// 2^64 in magnitude (its square overflows f32) gets NaN logits from the forward, whatever the
// form, so the router routes it nowhere; in the backward its dz is 0, which adds nothing.
// Non-finite weights are outside the contract: the logits they touch are not finite (+-inf or
// NaN as f32 arithmetic gives them; NaN on the split-tf32 tiles, whose low term of an infinite
// operand is inf - inf).
//
// Every kernel is a tiled GEMM on tensor cores over k-tiles in shared memory with f32
// accumulation, 256 threads: the forward and the coefficient kernels on the pair tiles of
// gate_mma.cuh (m16n8k16 for f16/bf16; split tf32 for f32), the f32 linear forward, dX and dW
// on the split-tf32 tile of gate_tf32.cuh. Every f32 operand is split into two tf32 terms, so
// f32 X gets f32 accuracy. All sums run in a fixed order (no atomics), so results do not depend
// on the schedule.
//
// Kernels:
//   gate_scores_<form>_<dtype>   forward: one launch, writes only z (gate_scores_mma_body;
//                                the f32 linear gate: gate_scores_linear_tf32)
//   gate_coef_<form>_<dtype>     backward step 1 (not linear): recomputes the projections of
//                                the forward tile and writes per-row gradient coefficients
//   gate_dx_<dtype>              dX = sum over segments G_s W_s (+ a dense [T, d] term), on
//                                tensor cores (tf32, f32-accurate: gate_tf32.cuh)
//   gate_dw_<dtype>              dW = G^T X for one segment (f32), tensor cores, split over tokens
//   gate_sum[_inplace]_f32       fixed-order strided sums (dc, db, per-expert reductions)
//   gate_decode_<form>_<dtype>   the forward for T <= 64 (every form but full): a warp per
//                                slice of an expert's rows (gate_decode.cuh)
//   gate_route_<form>_<dtype>_e<N>   the forward with the router's top-k selection (and the
//                                routing map's count, and the router losses) fused, where a
//                                block holds every expert:
//                                E <= 256 (linear f16/bf16; 128 below N = 256), 128 (linear
//                                f32) or 16 (rank forms)
//   gate_decode_route_linear_<dtype>_e<N>   the same at T <= 64 on the decode kernel, with the
//                                map's count, E <= 512 (the last block of each token block selects)
#include "include/dispatch_map.cuh"
#include "include/gate_decode.cuh"
#include "include/gate_mma.cuh"
#include "include/gate_tf32.cuh"
#include "include/router_losses.cuh"
#include "include/router_select.cuh"

// ------------------------------------------------------------------------------------------
// gate_scores_linear_f32: z[t, e] = W_e . x_t + b_e on tensor cores, f32-accurate.
// Algorithm: the GEMM X W^T on the split-tf32 tile (gate_tf32.cuh: each f32 operand split into
//   two tf32 terms, 3 mma.sync m16n8k8 a fragment pair, so the error is f32 accumulation noise,
//   not tf32's 2^-11), with the 64-token X tile as As[k][t] and the block's 128 weight rows as
//   Bs[k][e] (both with the k rows of a tile interleaved, so that no store has a bank conflict),
//   over k-tiles of d double-buffered through registers (tf32_k_loop: k-tile k + 1's 16-byte
//   loads in flight under k-tile k's mma, one barrier a k-tile). Experts past E load as
//   zero rows. Rows of the tile with a huge_input element get NaN logits (flagged as their
//   k-tiles are stored, read after the loop's last barrier).
// Mapping: blockIdx.x = 64-token tile, blockIdx.y = 128-expert tile; 8 warps, each 32 tokens x
//   32 experts (gate_tf32.cuh); thread i stages X item i and W items i, i + 256 (16 bytes each).
// Traffic: X read ceil(E / 128) times (from L2 after the first), each weight row once per token
//   tile, z written once: one pass over X wherever E <= 128.
// Launch: grid (ceil(T/64), ceil(E/128)), 256 threads, TF32_SHARED_BYTES dynamic shared.
__device__ __forceinline__ void gate_scores_linear_tf32(const float* x, const float* w, const float* bias,
                                                        float* z, i64 tokens, int d, int experts) {
  DYN_SHARED(float, smem);  // STAGED_SLOTS x (As [BK][TF32_LDA] X, Bs [BK][TF32_LDB] weight rows)
  __shared__ int huge_rows[TF32_BM];
  const i64 t0 = i64(blockIdx.x) * TF32_BM;
  const int e0 = blockIdx.y * TF32_BN;
  const bool vec = rows_aligned_16(x, d) && rows_aligned_16(w, d);
  if (threadIdx.x < TF32_BM) huge_rows[threadIdx.x] = 0;
  __syncthreads();  // every flag cleared before the first store can set one
  auto x_row = [&](int m) -> const float* { return t0 + m < tokens ? x + (t0 + m) * d : nullptr; };
  auto w_row = [&](int n) -> const float* { return e0 + n < experts ? w + i64(e0 + n) * d : nullptr; };
  TileStage<float, KContiguous::items<float>(TF32_BM)> x_stage;  // X[t0 + m][k0 ..)
  TileStage<float, KContiguous::items<float>(TF32_BN)> w_stage;  // W[e0 + n][k0 ..)
  auto fetch = [&](i64 k0) {
    x_stage.fetch([&](Raw16& v, int item) { KContiguous::fetch_item<float>(v, item, x_row, k0, d, vec); });
    w_stage.fetch([&](Raw16& v, int item) { KContiguous::fetch_item<float>(v, item, w_row, k0, d, vec); });
  };
  // Both operands' k rows interleaved (KContiguous::store_item): the same order for X and W, and
  // every store of a warp on 32 distinct banks (TF32_LDA and TF32_LDB are 8 mod 32).
  auto store = [&](float* As, float* Bs, i64) {
    x_stage.store([&](int item, const auto& v) { KContiguous::store_item<float, true>(As, TF32_LDA, item, v, huge_rows); });
    w_stage.store([&](int item, const auto& v) { KContiguous::store_item<float, true>(Bs, TF32_LDB, item, v, nullptr); });
  };
  float acc[2][4][4] = {};
  int step = 0;
  tf32_k_loop<true>(acc, smem, step, 0, d, fetch, store);
  const float nan = __uint_as_float(kQuietNaN);
  for_each_tf32_acc(acc, [&](int m, int n, float v) {
    const i64 t = t0 + m;
    const int e = e0 + n;
    if (t < tokens && e < experts) z[t * experts + e] = huge_rows[m] ? nan : v + (bias ? bias[e] : 0.0f);
  });
}

#define GATE_SCORES_PARAMS(T)                                                                   \
  const T *x, const T *left, const T *right, const T *query, const T *lin, const float *bias,   \
      float *z, long long tokens, int d, int experts, int rank
// The forward, on tensor cores: the pair tiles of gate_mma.cuh, except for the f32 linear gate,
// whose 128-expert split-tf32 tile has no pairs to form.
// LINEAR_BE: the 16-bit linear tile's experts (MmaForm).
template <class T, Form F, int LINEAR_BE = 128>
__device__ __forceinline__ void gate_scores(const T* x, GateWeightsPtrs w, const float* bias, float* z,
                                            i64 tokens, int d, int experts, int rank) {
  if constexpr (std::is_same_v<T, float> && F == Form::Linear) {
    static_assert(LINEAR_BE == TF32_BN, "the split-tf32 tile holds 128 experts");
    gate_scores_linear_tf32(x, static_cast<const float*>(w.lin), bias, z, tokens, d, experts);
  } else {
    gate_scores_mma_body<T, F, false, LINEAR_BE>(x, w, bias, nullptr, z, tokens, d, experts, rank);
  }
}
// The coefficient pass on the forward's pair tile.
template <class T, Form F>
__device__ __forceinline__ void gate_coef(const T* x, GateWeightsPtrs w, const float* dz, float* ws, i64 tokens,
                                          int d, int experts, int rank) {
  gate_scores_mma_body<T, F, true>(x, w, nullptr, dz, ws, tokens, d, experts, rank);
}
#define GATE_SCORES(T, F)                                                                       \
  gate_scores<T, F>(x, GateWeightsPtrs{left, right, query, lin}, bias, z, tokens, d, experts, rank)
#define GATE_COEF_PARAMS(T)                                                                     \
  const T *x, const T *left, const T *right, const T *query, const T *lin, const float *dz,     \
      float *ws, long long tokens, int d, int experts, int rank
#define GATE_COEF(T, F)                                                                         \
  gate_coef<T, F>(x, GateWeightsPtrs{left, right, query, lin}, dz, ws, tokens, d, experts, rank)

extern "C" __global__ void gate_scores_linear_f32(GATE_SCORES_PARAMS(float)) { GATE_SCORES(float, Form::Linear); }
EMU_EXPORT(gate_scores_linear_f32)
extern "C" __global__ void gate_scores_linear_f16(GATE_SCORES_PARAMS(__half)) { GATE_SCORES(__half, Form::Linear); }
EMU_EXPORT(gate_scores_linear_f16)
extern "C" __global__ void gate_scores_linear_bf16(GATE_SCORES_PARAMS(__nv_bfloat16)) { GATE_SCORES(__nv_bfloat16, Form::Linear); }
EMU_EXPORT(gate_scores_linear_bf16)
extern "C" __global__ void gate_scores_lowrank_f32(GATE_SCORES_PARAMS(float)) { GATE_SCORES(float, Form::LowRank); }
EMU_EXPORT(gate_scores_lowrank_f32)
extern "C" __global__ void gate_scores_lowrank_f16(GATE_SCORES_PARAMS(__half)) { GATE_SCORES(__half, Form::LowRank); }
EMU_EXPORT(gate_scores_lowrank_f16)
extern "C" __global__ void gate_scores_lowrank_bf16(GATE_SCORES_PARAMS(__nv_bfloat16)) { GATE_SCORES(__nv_bfloat16, Form::LowRank); }
EMU_EXPORT(gate_scores_lowrank_bf16)
extern "C" __global__ void gate_scores_symmetric_f32(GATE_SCORES_PARAMS(float)) { GATE_SCORES(float, Form::Symmetric); }
EMU_EXPORT(gate_scores_symmetric_f32)
extern "C" __global__ void gate_scores_symmetric_f16(GATE_SCORES_PARAMS(__half)) { GATE_SCORES(__half, Form::Symmetric); }
EMU_EXPORT(gate_scores_symmetric_f16)
extern "C" __global__ void gate_scores_symmetric_bf16(GATE_SCORES_PARAMS(__nv_bfloat16)) { GATE_SCORES(__nv_bfloat16, Form::Symmetric); }
EMU_EXPORT(gate_scores_symmetric_bf16)
extern "C" __global__ void gate_scores_attention_f32(GATE_SCORES_PARAMS(float)) { GATE_SCORES(float, Form::Attention); }
EMU_EXPORT(gate_scores_attention_f32)
extern "C" __global__ void gate_scores_attention_f16(GATE_SCORES_PARAMS(__half)) { GATE_SCORES(__half, Form::Attention); }
EMU_EXPORT(gate_scores_attention_f16)
extern "C" __global__ void gate_scores_attention_bf16(GATE_SCORES_PARAMS(__nv_bfloat16)) { GATE_SCORES(__nv_bfloat16, Form::Attention); }
EMU_EXPORT(gate_scores_attention_bf16)
extern "C" __global__ void gate_scores_full_f32(GATE_SCORES_PARAMS(float)) { GATE_SCORES(float, Form::Full); }
EMU_EXPORT(gate_scores_full_f32)
extern "C" __global__ void gate_scores_full_f16(GATE_SCORES_PARAMS(__half)) { GATE_SCORES(__half, Form::Full); }
EMU_EXPORT(gate_scores_full_f16)
extern "C" __global__ void gate_scores_full_bf16(GATE_SCORES_PARAMS(__nv_bfloat16)) { GATE_SCORES(__nv_bfloat16, Form::Full); }
EMU_EXPORT(gate_scores_full_bf16)

// gate_route_<form>_<dtype>_e<N>: a gate's forward with the router's selection, and optionally
// the routing map's counting pass, in one launch, wherever one block's tile holds every expert of
// its 64 tokens: E <= BE, the forward tile's experts per block (linear: 128, or 256 for f16/bf16
// at N = 256; the rank forms' pair tiles: 16), N = 32 .. 256 >= E the selection's row width.
// Algorithm: gate_scores (the form's forward tile for T) writes the block's 64 x E logits to z;
//   a block barrier makes them visible to the whole block; then each row of the tile is
//   selected exactly as router_select_e<N>_f32 selects it (select_row, reading the row back from
//   L1/L2), so z, ids and weights have the bits of the two launches. With a map workspace, each
//   selected slot is counted and the last block finishes the count, as
//   router_select_counted_e<N>_f32 does.
// Mapping: the gate's; then in passes of R = 256 / L rows thread i is lane i % L of row
//   t0 + R pass + i / L: L = 8 lanes a row (16 at N = 256: 4 passes of 16 rows), each holding
//   N / L <= 16 of its slots (router_select_e<N>_f32 gives a row N / 32 lanes; the sums have the
//   same bits at any lanes a row, router_select.cuh).
//   At most 16 slots a lane keep the linear kernels at 95-96 registers (16-bit) and 113-115
//   (f32) with the losses' body (sm_80, sm_90a; no spills), 2 blocks per SM by their launch
//   bounds (32 slots took 128 and spilled on sm_80), the 256-expert tile at one (its bound,
//   GATE_ROUTE_BOUNDS_WIDE); the rank forms take the scoring kernels'
//   bounds (none: 79-128 registers on f16/bf16, 107-138 on f32).
//   Rows past T are not live.
// Losses (aux_loss or z_loss not null): when the losses' chunks are the 64-token tiles
//   (tokens_per_chunk = 64, and one segment or segments a multiple of 64 long), each block then
//   runs router_losses_body on its tile as chunk (tile mod segment) of segment tile / segment
//   (tiles past the last whole segment skip it), its histogram from the ids it just wrote: the
//   chunking, lse and sums of router_losses_f32, so its bits.
// Traffic: the gate's, plus z re-read once (L2-hot), twice more with the losses (the rows, then
//   the columns); ids and weights written once.
// Launch: the forward's grid (ceil(T / 64), 1), 256 threads, its dynamic shared bytes (and at
//   least (local_experts + 1) ints when counting, E with the aux loss). Parameters:
//   GATE_SCORES_PARAMS; the router bias (select_bias) and k; the selection's after k
//   (ROUTER_SELECT_PARAMS); the count's (router_select_counted_e<N>_f32), map_workspace null for
//   no count; ROUTER_LOSS_PARAMS (router_losses.cuh), aux_loss and z_loss null for none.
#define GATE_ROUTE_PARAMS(T)                                                                     \
  GATE_SCORES_PARAMS(T), const float *select_bias, int k, int score, int topk_first, int renormalize, \
      float scale, int groups, int topk_groups, int *ids, float *weights, unsigned *nonfinite_rows,  \
      int *map_workspace, int tile_slots, int expert_begin, int local_experts, int align, int *counts, \
      int *offsets, int *status
template <class T, Form F, int N>
__device__ __forceinline__ void gate_route(GATE_ROUTE_PARAMS(T), ROUTER_LOSS_PARAMS) {
  constexpr int L = N > 128 ? N / 16 : 8, ROWS_PER_PASS = GATE_THREADS / L;  // <= 16 slots a lane
  static_assert(TF32_BM == GATE_BM, "every forward tile holds 64 tokens");
  __shared__ int scratch[32];
  __shared__ int last_block;
  __shared__ int dropped;
  gate_scores<T, F, (N > 128 ? 256 : 128)>(x, GateWeightsPtrs{left, right, query, lin}, bias, z, tokens, d,
                                            experts, rank);
  __syncthreads();  // the tile's z rows are written and visible to the block
  const SelectOptions o{score, topk_first != 0, renormalize != 0, scale};
  const MapShape m{ids, int(tokens), k, experts, expert_begin, local_experts};
#pragma unroll 1
  for (int pass = 0; pass < GATE_BM / ROWS_PER_PASS; ++pass) {
    const i64 row = i64(blockIdx.x) * GATE_BM + pass * ROWS_PER_PASS + int(threadIdx.x) / L;
    const bool live = row < tokens;
    select_row<N / kWarp, L>(z, select_bias, live ? row : 0, live, experts, k, o, groups, topk_groups, ids, weights,
                             nonfinite_rows);
    if (map_workspace != nullptr && live)
      for (int r = threadIdx.x % L; r < k; r += L)
        count_slot(m, int(row) * k + r, tile_slots, map_workspace + MAP_WORKSPACE_HEADER);
  }
  if (map_workspace != nullptr) {  // uniform over the grid
    DYN_SHARED(int, totals);        // the gate's tiles are done with (the barrier above)
    const int tiles = int((i64(m.slots()) + tile_slots - 1) / tile_slots);
    finish_count(m, SOURCE_ORDER, align, -1, tiles, map_workspace, totals, scratch, &last_block, &dropped, counts,
                 offsets, status);
  }
  if (aux_loss == nullptr && z_loss == nullptr) return;  // uniform over the grid
  const i64 tile_first = i64(blockIdx.x) * GATE_BM;
  const LossBlock chunk{tile_first / tokens_per_segment, tile_first % tokens_per_segment / GATE_BM,
                        tokens / tokens_per_segment, (tokens_per_segment + GATE_BM - 1) / GATE_BM};
  if (chunk.segment >= chunk.segments) return;  // past the last whole segment: no loss reads it
  __syncthreads();  // the tile's ids are visible to the block; totals may become the histogram
  router_losses_body(chunk, z, aux_loss ? ids : nullptr, experts, k, ROUTER_LOSS_ARGS);
}
// The linear tiles run 2 blocks an SM; the rank forms keep the scoring kernels' register freedom.
#define GATE_ROUTE_BOUNDS_LINEAR __launch_bounds__(GATE_THREADS, 2)
#define GATE_ROUTE_BOUNDS_RANK
// The 256-expert linear tile holds twice the linear accumulators: one block an SM (138-140
// registers, 0 spills, sm_80 and sm_90a; and 75 KiB of shared memory).
#define GATE_ROUTE_BOUNDS_WIDE __launch_bounds__(GATE_THREADS, 1)
#define GATE_ROUTE(T, F, BOUNDS, NAME, N)                                                        \
  extern "C" __global__ void BOUNDS NAME(GATE_ROUTE_PARAMS(T), ROUTER_LOSS_PARAMS) {             \
    gate_route<T, F, N>(x, left, right, query, lin, bias, z, tokens, d, experts, rank, select_bias, k, score, \
                        topk_first, renormalize, scale, groups, topk_groups, ids, weights, nonfinite_rows, \
                        map_workspace, tile_slots, expert_begin, local_experts, align, counts, offsets, status, \
                        ROUTER_LOSS_ARGS);                                                       \
  }
GATE_ROUTE(float, Form::Linear, GATE_ROUTE_BOUNDS_LINEAR, gate_route_linear_f32_e32, 32)
EMU_EXPORT(gate_route_linear_f32_e32)
GATE_ROUTE(float, Form::Linear, GATE_ROUTE_BOUNDS_LINEAR, gate_route_linear_f32_e64, 64)
EMU_EXPORT(gate_route_linear_f32_e64)
GATE_ROUTE(float, Form::Linear, GATE_ROUTE_BOUNDS_LINEAR, gate_route_linear_f32_e128, 128)
EMU_EXPORT(gate_route_linear_f32_e128)
GATE_ROUTE(__half, Form::Linear, GATE_ROUTE_BOUNDS_LINEAR, gate_route_linear_f16_e32, 32)
EMU_EXPORT(gate_route_linear_f16_e32)
GATE_ROUTE(__half, Form::Linear, GATE_ROUTE_BOUNDS_LINEAR, gate_route_linear_f16_e64, 64)
EMU_EXPORT(gate_route_linear_f16_e64)
GATE_ROUTE(__half, Form::Linear, GATE_ROUTE_BOUNDS_LINEAR, gate_route_linear_f16_e128, 128)
EMU_EXPORT(gate_route_linear_f16_e128)
GATE_ROUTE(__half, Form::Linear, GATE_ROUTE_BOUNDS_WIDE, gate_route_linear_f16_e256, 256)
EMU_EXPORT(gate_route_linear_f16_e256)
GATE_ROUTE(__nv_bfloat16, Form::Linear, GATE_ROUTE_BOUNDS_LINEAR, gate_route_linear_bf16_e32, 32)
EMU_EXPORT(gate_route_linear_bf16_e32)
GATE_ROUTE(__nv_bfloat16, Form::Linear, GATE_ROUTE_BOUNDS_LINEAR, gate_route_linear_bf16_e64, 64)
EMU_EXPORT(gate_route_linear_bf16_e64)
GATE_ROUTE(__nv_bfloat16, Form::Linear, GATE_ROUTE_BOUNDS_LINEAR, gate_route_linear_bf16_e128, 128)
EMU_EXPORT(gate_route_linear_bf16_e128)
GATE_ROUTE(__nv_bfloat16, Form::Linear, GATE_ROUTE_BOUNDS_WIDE, gate_route_linear_bf16_e256, 256)
EMU_EXPORT(gate_route_linear_bf16_e256)
// The rank forms: E <= 16 fits a block, so N = 32 only.
GATE_ROUTE(float, Form::LowRank, GATE_ROUTE_BOUNDS_RANK, gate_route_lowrank_f32_e32, 32)
EMU_EXPORT(gate_route_lowrank_f32_e32)
GATE_ROUTE(__half, Form::LowRank, GATE_ROUTE_BOUNDS_RANK, gate_route_lowrank_f16_e32, 32)
EMU_EXPORT(gate_route_lowrank_f16_e32)
GATE_ROUTE(__nv_bfloat16, Form::LowRank, GATE_ROUTE_BOUNDS_RANK, gate_route_lowrank_bf16_e32, 32)
EMU_EXPORT(gate_route_lowrank_bf16_e32)
GATE_ROUTE(float, Form::Symmetric, GATE_ROUTE_BOUNDS_RANK, gate_route_symmetric_f32_e32, 32)
EMU_EXPORT(gate_route_symmetric_f32_e32)
GATE_ROUTE(__half, Form::Symmetric, GATE_ROUTE_BOUNDS_RANK, gate_route_symmetric_f16_e32, 32)
EMU_EXPORT(gate_route_symmetric_f16_e32)
GATE_ROUTE(__nv_bfloat16, Form::Symmetric, GATE_ROUTE_BOUNDS_RANK, gate_route_symmetric_bf16_e32, 32)
EMU_EXPORT(gate_route_symmetric_bf16_e32)
GATE_ROUTE(float, Form::Attention, GATE_ROUTE_BOUNDS_RANK, gate_route_attention_f32_e32, 32)
EMU_EXPORT(gate_route_attention_f32_e32)
GATE_ROUTE(__half, Form::Attention, GATE_ROUTE_BOUNDS_RANK, gate_route_attention_f16_e32, 32)
EMU_EXPORT(gate_route_attention_f16_e32)
GATE_ROUTE(__nv_bfloat16, Form::Attention, GATE_ROUTE_BOUNDS_RANK, gate_route_attention_bf16_e32, 32)
EMU_EXPORT(gate_route_attention_bf16_e32)
GATE_ROUTE(float, Form::Full, GATE_ROUTE_BOUNDS_RANK, gate_route_full_f32_e32, 32)
EMU_EXPORT(gate_route_full_f32_e32)
GATE_ROUTE(__half, Form::Full, GATE_ROUTE_BOUNDS_RANK, gate_route_full_f16_e32, 32)
EMU_EXPORT(gate_route_full_f16_e32)
GATE_ROUTE(__nv_bfloat16, Form::Full, GATE_ROUTE_BOUNDS_RANK, gate_route_full_bf16_e32, 32)
EMU_EXPORT(gate_route_full_bf16_e32)

// gate_decode_<form>_<dtype>: GATE_SCORES_PARAMS, then slices (gate_decode.cuh). Launch:
// grid (ceil(E slices / 8), ceil(T / TOKENS)), 256 threads, no dynamic shared memory.
// __launch_bounds__(256, 3) for the linear form: unbounded, ptxas keeps all 16 tokens' X chunks
// in flight at once (159 registers, one block per SM); bounded, 70 registers, 0 spills and 3
// blocks per SM, which a kernel that streams W needs more than the extra loads in flight per
// warp. The rank forms hold ROWS x 4 accumulators and ROWS weight chunks per lane: symmetric
// (5 rows) fits 128 registers (2 blocks per SM) without spilling, low-rank and attention (9 and
// 8 rows) need more (1 block per SM, 8 warps).
#define GATE_DECODE(T, F, NAME, BLOCKS)                                                          \
  extern "C" __global__ void __launch_bounds__(256, BLOCKS) NAME(GATE_SCORES_PARAMS(T), int slices) { \
    gate_decode_body<T, F>(x, GateWeightsPtrs{left, right, query, lin}, bias, z, tokens, d, experts, rank, slices); \
  }
GATE_DECODE(float, Form::Linear, gate_decode_linear_f32, 3)
EMU_EXPORT(gate_decode_linear_f32)
GATE_DECODE(__half, Form::Linear, gate_decode_linear_f16, 3)
EMU_EXPORT(gate_decode_linear_f16)
GATE_DECODE(__nv_bfloat16, Form::Linear, gate_decode_linear_bf16, 3)
EMU_EXPORT(gate_decode_linear_bf16)
GATE_DECODE(float, Form::LowRank, gate_decode_lowrank_f32, 1)
EMU_EXPORT(gate_decode_lowrank_f32)
GATE_DECODE(__half, Form::LowRank, gate_decode_lowrank_f16, 1)
EMU_EXPORT(gate_decode_lowrank_f16)
GATE_DECODE(__nv_bfloat16, Form::LowRank, gate_decode_lowrank_bf16, 1)
EMU_EXPORT(gate_decode_lowrank_bf16)
GATE_DECODE(float, Form::Symmetric, gate_decode_symmetric_f32, 2)
EMU_EXPORT(gate_decode_symmetric_f32)
GATE_DECODE(__half, Form::Symmetric, gate_decode_symmetric_f16, 2)
EMU_EXPORT(gate_decode_symmetric_f16)
GATE_DECODE(__nv_bfloat16, Form::Symmetric, gate_decode_symmetric_bf16, 2)
EMU_EXPORT(gate_decode_symmetric_bf16)
GATE_DECODE(float, Form::Attention, gate_decode_attention_f32, 1)
EMU_EXPORT(gate_decode_attention_f32)
GATE_DECODE(__half, Form::Attention, gate_decode_attention_f16, 1)
EMU_EXPORT(gate_decode_attention_f16)
GATE_DECODE(__nv_bfloat16, Form::Attention, gate_decode_attention_bf16, 1)
EMU_EXPORT(gate_decode_attention_bf16)

// gate_decode_route_linear_<dtype>_e<N>: the routing step at T <= 64 (the decode step) in one
// launch: the linear gate's decode kernel, the router's selection and the routing map's count
// (N = 32 ... 512 >= E: the selection's row width).
// Algorithm: every block runs gate_decode_body (its experts' slices against its 16 tokens) and
//   writes its logits to z, then takes its token block's ticket (map_workspace[1 + blockIdx.y]).
//   The last of the gridDim.x blocks to take it sees all 16 z rows of the token block (each block
//   fences before its ticket, the last one after: last_to_arrive) and selects them exactly as
//   router_select_counted_e<N>_f32 would (select_row; the sums have the same bits at any lanes a
//   row, router_select.cuh), counting each selected slot into the map's per-tile counts. The
//   last of those gridDim.y selecting blocks to take the map's done-ticket completes the count
//   (complete_count) and, given sorted_rows, places every slot as dispatch_map_rank would
//   (place_tile over the map's tiles, then mark_unused_rows). So z, ids, weights and the map
//   have the bits of gate_decode, router_select_counted and place_counted, in one launch.
//   z and ids from other blocks are read with plain loads (no .nc path: this kernel writes them),
//   ordered by the writer's fence before its ticket and the last block's fence after it (a
//   release/acquire pair in the PTX memory model); the per-tile counts, which only atomics
//   write, are read through L2 as in every count.
// Mapping: gate_decode_body's; then thread i is lane i % L of row i / L of the token block:
//   L = N / 16 lanes a row holding 16 slots each for N >= 128 (one pass of 256 / L rows, two at
//   N = 512), 4 lanes of N / 4 slots below. 63-80 registers (nvcc 13.5, sm_80 and sm_90a), 0
//   spills, 3 blocks per SM like the decode kernel; 2 lanes a row at N = 32 spilled 28-40 bytes.
// Traffic: the decode gate's, plus the token block's z rows re-read once from L2; ids and weights
//   written once; k integer atomics per row; placing, the last block re-reads ids (L2) and
//   writes inverse twice and sorted_rows once (at most 64 k slots).
// Launch: the decode kernel's grid (ceil(E slices / 8), ceil(T / 16) <= MAP_BLOCK_TICKETS), 256
//   threads, (local_experts + 1) ints of dynamic shared memory, MAP_WARPS times that to place.
//   Parameters: GATE_ROUTE_PARAMS (map_workspace must not be null: it holds the tickets), then
//   the placement's (sorted_len, sorted_rows, inverse; sorted_rows null for the count only) and
//   slices.
#define GATE_DECODE_ROUTE_PARAMS(T) GATE_ROUTE_PARAMS(T), int sorted_len, int *sorted_rows, int *inverse, int slices
template <class T, int N>
__device__ __forceinline__ void gate_decode_route_linear(GATE_DECODE_ROUTE_PARAMS(T)) {
  constexpr int TOKENS = DecodeForm<Form::Linear>::TOKENS;
  constexpr int L = N > 64 ? N / 16 : 4, ROWS_PER_PASS = DECODE_WARPS * kWarp / L;
  __shared__ int scratch[32];
  __shared__ int last_block;
  __shared__ int dropped;
  gate_decode_body<T, Form::Linear>(x, GateWeightsPtrs{left, right, query, lin}, bias, z, tokens, d, experts, rank,
                                    slices);
  if (!last_to_arrive(map_workspace + 1 + blockIdx.y, int(gridDim.x), &last_block)) return;
  const SelectOptions o{score, topk_first != 0, renormalize != 0, scale};
  const MapShape m{ids, int(tokens), k, experts, expert_begin, local_experts};
#pragma unroll 1
  for (int pass = 0; pass * ROWS_PER_PASS < TOKENS; ++pass) {
    const int r = pass * ROWS_PER_PASS + int(threadIdx.x) / L;
    const i64 row = i64(blockIdx.y) * TOKENS + r;
    const bool live = r < TOKENS && row < tokens;
    select_row<N / kWarp, L>(z, select_bias, live ? row : 0, live, experts, k, o, groups, topk_groups, ids, weights,
                             nonfinite_rows);
    if (live)
      for (int s = threadIdx.x % L; s < k; s += L)
        count_slot(m, int(row) * k + s, tile_slots, map_workspace + MAP_WORKSPACE_HEADER);
  }
  if (threadIdx.x == 0) map_workspace[1 + blockIdx.y] = 0;  // every block of the column took it
  if (!last_to_arrive(map_workspace, int(gridDim.y), &last_block)) return;
  DYN_SHARED(int, totals);
  const int tiles = int((i64(m.slots()) + tile_slots - 1) / tile_slots);
  complete_count(m, SOURCE_ORDER, align, -1, tiles, map_workspace, totals, scratch, &dropped, counts, offsets,
                 status);
  if (sorted_rows == nullptr) return;  // uniform over the grid: the count only
  int* warp_counts = totals;           // the count's totals are written out (counts, offsets)
#pragma unroll 1
  for (int tile = 0; tile < tiles; ++tile) {
    __syncthreads();  // warp_counts is free (the count's totals, or the previous tile's ranks)
    place_tile(m, SOURCE_ORDER, -1, tile_slots, tile, false, sorted_len, map_workspace, offsets, warp_counts,
               sorted_rows, inverse);
  }
  mark_unused_rows(local_experts, counts, offsets, sorted_len, sorted_rows, threadIdx.x, blockDim.x);
}
#define GATE_DECODE_ROUTE(T, NAME, N)                                                            \
  extern "C" __global__ void __launch_bounds__(256, 3) NAME(GATE_DECODE_ROUTE_PARAMS(T)) {       \
    gate_decode_route_linear<T, N>(x, left, right, query, lin, bias, z, tokens, d, experts, rank, select_bias, k, \
                                   score, topk_first, renormalize, scale, groups, topk_groups, ids, weights, \
                                   nonfinite_rows, map_workspace, tile_slots, expert_begin, local_experts, align, \
                                   counts, offsets, status, sorted_len, sorted_rows, inverse, slices); \
  }
GATE_DECODE_ROUTE(float, gate_decode_route_linear_f32_e32, 32)
EMU_EXPORT(gate_decode_route_linear_f32_e32)
GATE_DECODE_ROUTE(float, gate_decode_route_linear_f32_e64, 64)
EMU_EXPORT(gate_decode_route_linear_f32_e64)
GATE_DECODE_ROUTE(float, gate_decode_route_linear_f32_e128, 128)
EMU_EXPORT(gate_decode_route_linear_f32_e128)
GATE_DECODE_ROUTE(float, gate_decode_route_linear_f32_e256, 256)
EMU_EXPORT(gate_decode_route_linear_f32_e256)
GATE_DECODE_ROUTE(float, gate_decode_route_linear_f32_e512, 512)
EMU_EXPORT(gate_decode_route_linear_f32_e512)
GATE_DECODE_ROUTE(__half, gate_decode_route_linear_f16_e32, 32)
EMU_EXPORT(gate_decode_route_linear_f16_e32)
GATE_DECODE_ROUTE(__half, gate_decode_route_linear_f16_e64, 64)
EMU_EXPORT(gate_decode_route_linear_f16_e64)
GATE_DECODE_ROUTE(__half, gate_decode_route_linear_f16_e128, 128)
EMU_EXPORT(gate_decode_route_linear_f16_e128)
GATE_DECODE_ROUTE(__half, gate_decode_route_linear_f16_e256, 256)
EMU_EXPORT(gate_decode_route_linear_f16_e256)
GATE_DECODE_ROUTE(__half, gate_decode_route_linear_f16_e512, 512)
EMU_EXPORT(gate_decode_route_linear_f16_e512)
GATE_DECODE_ROUTE(__nv_bfloat16, gate_decode_route_linear_bf16_e32, 32)
EMU_EXPORT(gate_decode_route_linear_bf16_e32)
GATE_DECODE_ROUTE(__nv_bfloat16, gate_decode_route_linear_bf16_e64, 64)
EMU_EXPORT(gate_decode_route_linear_bf16_e64)
GATE_DECODE_ROUTE(__nv_bfloat16, gate_decode_route_linear_bf16_e128, 128)
EMU_EXPORT(gate_decode_route_linear_bf16_e128)
GATE_DECODE_ROUTE(__nv_bfloat16, gate_decode_route_linear_bf16_e256, 256)
EMU_EXPORT(gate_decode_route_linear_bf16_e256)
GATE_DECODE_ROUTE(__nv_bfloat16, gate_decode_route_linear_bf16_e512, 512)
EMU_EXPORT(gate_decode_route_linear_bf16_e512)

// The coefficient kernels: 2 blocks an SM (up to 128 registers) on the 16-bit pair tiles; the
// f32 pair tiles hold each fragment's two tf32 terms and spill 20-48 bytes at 128, so they take
// one block (145-146 registers, like the f32 forward: 137-144 with no bound).
#define GATE_COEF_BOUNDS_F32 __launch_bounds__(GATE_THREADS, 1)
extern "C" __global__ void GATE_COEF_BOUNDS_F32 gate_coef_lowrank_f32(GATE_COEF_PARAMS(float)) { GATE_COEF(float, Form::LowRank); }
EMU_EXPORT(gate_coef_lowrank_f32)
extern "C" __global__ void __launch_bounds__(GATE_THREADS, 2) gate_coef_lowrank_f16(GATE_COEF_PARAMS(__half)) { GATE_COEF(__half, Form::LowRank); }
EMU_EXPORT(gate_coef_lowrank_f16)
extern "C" __global__ void __launch_bounds__(GATE_THREADS, 2) gate_coef_lowrank_bf16(GATE_COEF_PARAMS(__nv_bfloat16)) { GATE_COEF(__nv_bfloat16, Form::LowRank); }
EMU_EXPORT(gate_coef_lowrank_bf16)
extern "C" __global__ void GATE_COEF_BOUNDS_F32 gate_coef_symmetric_f32(GATE_COEF_PARAMS(float)) { GATE_COEF(float, Form::Symmetric); }
EMU_EXPORT(gate_coef_symmetric_f32)
extern "C" __global__ void __launch_bounds__(GATE_THREADS, 2) gate_coef_symmetric_f16(GATE_COEF_PARAMS(__half)) { GATE_COEF(__half, Form::Symmetric); }
EMU_EXPORT(gate_coef_symmetric_f16)
extern "C" __global__ void __launch_bounds__(GATE_THREADS, 2) gate_coef_symmetric_bf16(GATE_COEF_PARAMS(__nv_bfloat16)) { GATE_COEF(__nv_bfloat16, Form::Symmetric); }
EMU_EXPORT(gate_coef_symmetric_bf16)
extern "C" __global__ void GATE_COEF_BOUNDS_F32 gate_coef_attention_f32(GATE_COEF_PARAMS(float)) { GATE_COEF(float, Form::Attention); }
EMU_EXPORT(gate_coef_attention_f32)
extern "C" __global__ void __launch_bounds__(GATE_THREADS, 2) gate_coef_attention_f16(GATE_COEF_PARAMS(__half)) { GATE_COEF(__half, Form::Attention); }
EMU_EXPORT(gate_coef_attention_f16)
extern "C" __global__ void __launch_bounds__(GATE_THREADS, 2) gate_coef_attention_bf16(GATE_COEF_PARAMS(__nv_bfloat16)) { GATE_COEF(__nv_bfloat16, Form::Attention); }
EMU_EXPORT(gate_coef_attention_bf16)
extern "C" __global__ void GATE_COEF_BOUNDS_F32 gate_coef_full_f32(GATE_COEF_PARAMS(float)) { GATE_COEF(float, Form::Full); }
EMU_EXPORT(gate_coef_full_f32)
extern "C" __global__ void __launch_bounds__(GATE_THREADS, 2) gate_coef_full_f16(GATE_COEF_PARAMS(__half)) { GATE_COEF(__half, Form::Full); }
EMU_EXPORT(gate_coef_full_f16)
extern "C" __global__ void __launch_bounds__(GATE_THREADS, 2) gate_coef_full_bf16(GATE_COEF_PARAMS(__nv_bfloat16)) { GATE_COEF(__nv_bfloat16, Form::Full); }
EMU_EXPORT(gate_coef_full_bf16)

// ------------------------------------------------------------------------------------------
// gate_dx_<dtype>: dX[t, l] = sum_s sum_{n < n_s} G_s[t * ld_s + n] W_s[n * d + l]
//                             (+ direct[t * ld_direct + l]), written in X's dtype.
// Segments s = 0, 1, 2 are the weight tensors seen as [n_s, d] row stacks with their f32
// coefficient columns (a null segment has n_s = 0; direct may be null). The sum over n runs
// segment by segment, k-tile by k-tile, in a fixed order.
// Algorithm: a GEMM on tensor cores (gate_tf32.cuh: tf32 mma.sync, the f32 coefficients split
//   into two tf32 terms, so f32 accuracy), G k-tiles as As[n][t], weight rows as Bs[n][l],
//   double-buffered through registers (tf32_k_loop: the next k-tile's loads in flight under
//   this one's mma, one barrier a k-tile).
// Mapping: blockIdx.x = 64-token tile, blockIdx.y = 128-column tile of d; 8 warps, each 32
//   tokens x 32 columns (gate_tf32.cuh).
// Traffic: G read once per column tile, W once per token tile, dX written once.
// Launch: grid (ceil(T/64), ceil(d/128)), 256 threads, TF32_SHARED_BYTES dynamic shared.
// acc += G[t0.., 0..n) W[0..n, l0..) for one segment, k-tile by k-tile (tf32_k_loop).
template <class T>
__device__ __forceinline__ void gate_dx_segment(float (&acc)[2][4][4], float* smem, int& step,
                                                const float* g, i64 ldg, const T* w, int n,
                                                i64 t0, int l0, i64 tokens, int d) {
  const bool vec_g = rows_aligned_16(g, ldg), vec_w = rows_aligned_16(w, d);
  auto g_row = [&](int m) -> const float* { return t0 + m < tokens ? g + (t0 + m) * ldg : nullptr; };
  TileStage<float, KContiguous::items<float>(TF32_BM)> a;  // G[t][k0 ..): k-contiguous
  TileStage<T, MContiguous::items<T>(TF32_BN)> b;      // W[k0 + k][l0 ..): m-contiguous
  auto fetch = [&](i64 k0) {
    auto w_row = [&](int k) -> const T* { return k0 + k < n ? w + (k0 + k) * d + l0 : nullptr; };
    a.fetch([&](Raw16& v, int item) { KContiguous::fetch_item<float>(v, item, g_row, k0, n, vec_g); });
    b.fetch([&](Raw16& v, int item) { MContiguous::fetch_item<T>(v, item, TF32_BN, w_row, d - l0, vec_w); });
  };
  auto store = [&](float* As, float* Bs, i64) {
    a.store([&](int item, const auto& v) { KContiguous::store_item<float>(As, TF32_LDA, item, v, nullptr); });
    b.store([&](int item, const auto& v) { MContiguous::store_item<T>(Bs, TF32_LDB, TF32_BN, item, v, false); });
  };
  tf32_k_loop<std::is_same_v<T, float>>(acc, smem, step, 0, n, fetch, store);
}

template <class T>
__device__ __forceinline__ void gate_dx_body(const float* g0, i64 ldg0, const T* w0, int n0,
                                             const float* g1, i64 ldg1, const T* w1, int n1,
                                             const float* g2, i64 ldg2, const T* w2, int n2,
                                             const float* direct, i64 ld_direct, T* dx, i64 tokens,
                                             int d) {
  DYN_SHARED(float, smem);  // STAGED_SLOTS x (As [BK][TF32_LDA] coefficients, Bs [BK][TF32_LDB] weight rows)
  const i64 t0 = i64(blockIdx.x) * TF32_BM;
  const int l0 = blockIdx.y * TF32_BN;
  float acc[2][4][4] = {};
  int step = 0;
  // One copy of the k-loop, its segment's arguments picked from the kernel's parameters (three
  // inlined copies held every segment's pointers live at once: up to 124 registers).
#pragma unroll 1
  for (int s = 0; s < 3; ++s) {
    const float* g = s == 0 ? g0 : s == 1 ? g1 : g2;
    const T* w = s == 0 ? w0 : s == 1 ? w1 : w2;
    gate_dx_segment<T>(acc, smem, step, g, s == 0 ? ldg0 : s == 1 ? ldg1 : ldg2, w,
                       s == 0 ? n0 : s == 1 ? n1 : n2, t0, l0, tokens, d);
  }
  for_each_tf32_acc(acc, [&](int m, int n, float v) {
    const i64 t = t0 + m;
    const int l = l0 + n;
    if (t >= tokens || l >= d) return;
    const float extra = direct ? direct[t * ld_direct + l] : 0.0f;
    dx[t * d + l] = from_f32<T>(v + extra);
  });
}

// Blocks an SM that gate_dx and gate_dw ask for: three 256-thread blocks leave 80 registers a
// thread. The 16-bit forms fit that without spilling on sm_90a; their sm_80 build, and the f32
// forms (three tf32 mmas a fragment pair, B's lo terms, twice the staged B items), would spill,
// so they take two (up to 128 registers).
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#define GATE_TF32_BLOCKS_16BIT 3
#else
#define GATE_TF32_BLOCKS_16BIT 2
#endif

// Each coefficient matrix is passed as (buffer, element offset, row stride): several of them
// live in one workspace buffer.
#define GATE_DX_PARAMS(T)                                                                       \
  const float *g0, long long off0, long long ldg0, const T *w0, int n0, const float *g1,        \
      long long off1, long long ldg1, const T *w1, int n1, const float *g2, long long off2,     \
      long long ldg2, const T *w2, int n2, const float *direct, long long off_direct,           \
      long long ld_direct, T *dx, long long tokens, int d
#define GATE_DX(T)                                                                              \
  gate_dx_body<T>(offset(g0, off0), ldg0, w0, n0, offset(g1, off1), ldg1, w1, n1,              \
                  offset(g2, off2), ldg2, w2, n2, offset(direct, off_direct), ld_direct, dx,    \
                  tokens, d)

extern "C" __global__ void __launch_bounds__(GATE_THREADS, 2) gate_dx_f32(GATE_DX_PARAMS(float)) { GATE_DX(float); }
EMU_EXPORT(gate_dx_f32)
extern "C" __global__ void __launch_bounds__(GATE_THREADS, GATE_TF32_BLOCKS_16BIT) gate_dx_f16(GATE_DX_PARAMS(__half)) { GATE_DX(__half); }
EMU_EXPORT(gate_dx_f16)
extern "C" __global__ void __launch_bounds__(GATE_THREADS, GATE_TF32_BLOCKS_16BIT) gate_dx_bf16(GATE_DX_PARAMS(__nv_bfloat16)) { GATE_DX(__nv_bfloat16); }
EMU_EXPORT(gate_dx_bf16)

// ------------------------------------------------------------------------------------------
// gate_dw_<dtype>: dW[r, l] = sum_t G[t * ldg + r] X[t * d + l] for r < rows, l < d (f32).
// The weight gradient of one stacked segment. A NaN or +-inf element of X counts as 0: it makes
// every logit of its row non-finite, so the row was routed nowhere (math §2), its dz and
// coefficients are 0, and it must add exactly nothing (0 * NaN would poison dW).
// Algorithm: a GEMM on tensor cores (gate_tf32.cuh: tf32 mma.sync with G split into two tf32
//   terms, and X too when it is f32: f32 accuracy), the reduction over tokens split in
//   gridDim.z slices of split_tokens tokens (split-K): slice s sums its tokens in order and
//   writes out + s * rows * d; with more than one slice the host then adds the slices with
//   gate_sum_f32 in slice order. The split depends only on the shape, so dW is bitwise
//   reproducible. T = 0 writes zeros. k-tiles double-buffered as in gate_dx (tf32_k_loop).
// Mapping: blockIdx.x = 64-row tile of dW, blockIdx.y = 128-column tile of d, blockIdx.z =
//   token slice; 8 warps, each 32 rows x 32 columns (gate_tf32.cuh).
// Traffic: G read once per column tile, X once per row tile, each slice written once.
// Launch: grid (ceil(rows/64), ceil(d/128), slices), 256 threads, TF32_SHARED_BYTES dynamic shared.
template <class T>
__device__ __forceinline__ void gate_dw_body(const float* g, i64 ldg, int rows, const T* x,
                                             i64 tokens, int d, i64 split_tokens, float* out) {
  DYN_SHARED(float, smem);  // STAGED_SLOTS x (As [BK][TF32_LDA] coefficients, Bs [BK][TF32_LDB] X rows)
  const int r0 = blockIdx.x * TF32_BM, l0 = blockIdx.y * TF32_BN;
  const i64 begin = i64(blockIdx.z) * split_tokens, end = min(tokens, begin + split_tokens);
  const bool vec_g = rows_aligned_16(g, ldg) && r0 % 4 == 0, vec_x = rows_aligned_16(x, d);
  TileStage<float, MContiguous::items<float>(TF32_BM)> a;  // G[k0 + k][r0 ..)
  TileStage<T, MContiguous::items<T>(TF32_BN)> b;      // X[k0 + k][l0 ..)
  auto fetch = [&](i64 k0) {
    auto g_row = [&](int k) -> const float* { return k0 + k < end ? g + (k0 + k) * ldg + r0 : nullptr; };
    auto x_row = [&](int k) -> const T* { return k0 + k < end ? x + (k0 + k) * d + l0 : nullptr; };
    a.fetch([&](Raw16& v, int item) { MContiguous::fetch_item<float>(v, item, TF32_BM, g_row, rows - r0, vec_g); });
    b.fetch([&](Raw16& v, int item) { MContiguous::fetch_item<T>(v, item, TF32_BN, x_row, d - l0, vec_x); });
  };
  auto store = [&](float* As, float* Bs, i64) {
    a.store([&](int item, const auto& v) { MContiguous::store_item<float>(As, TF32_LDA, TF32_BM, item, v, false); });
    b.store([&](int item, const auto& v) { MContiguous::store_item<T>(Bs, TF32_LDB, TF32_BN, item, v, true); });
  };
  float acc[2][4][4] = {};
  int step = 0;
  tf32_k_loop<std::is_same_v<T, float>>(acc, smem, step, begin, end, fetch, store);
  float* slice = out + i64(blockIdx.z) * rows * d;
  for_each_tf32_acc(acc, [&](int m, int n, float v) {
    const int r = r0 + m, l = l0 + n;
    if (r < rows && l < d) slice[i64(r) * d + l] = v;
  });
}

// g null: the coefficients live in out's buffer (the backward's workspace, whose split-K slices
// sit in another range of it), at element offset off.
#define GATE_DW_PARAMS(T)                                                                       \
  const float *g, long long off, long long ldg, int rows, const T *x, long long tokens, int d,   \
      long long split_tokens, float *out, long long out_off
#define GATE_DW(T)                                                                              \
  gate_dw_body<T>(offset(g ? g : out, off), ldg, rows, x, tokens, d, split_tokens, out + out_off)

extern "C" __global__ void __launch_bounds__(GATE_THREADS, 2) gate_dw_f32(GATE_DW_PARAMS(float)) { GATE_DW(float); }
EMU_EXPORT(gate_dw_f32)
extern "C" __global__ void __launch_bounds__(GATE_THREADS, GATE_TF32_BLOCKS_16BIT) gate_dw_f16(GATE_DW_PARAMS(__half)) { GATE_DW(__half); }
EMU_EXPORT(gate_dw_f16)
extern "C" __global__ void __launch_bounds__(GATE_THREADS, GATE_TF32_BLOCKS_16BIT) gate_dw_bf16(GATE_DW_PARAMS(__nv_bfloat16)) { GATE_DW(__nv_bfloat16); }
EMU_EXPORT(gate_dw_bf16)

// ------------------------------------------------------------------------------------------
// gate_sum_f32: out[o * inner + b] = sum_{s < count} in[o * outer_stride + s * stride + b]
// (in and out offset by in_off and out_off elements) for o < outer, b < inner, in a fixed
// order: lane p of GATE_SUM_LANES sums s = p, p + 8, p + 16, ... ascending, then the 8
// partial sums are added p = 0 .. 7. Used for dc and db (sums of dz over tokens: long sums,
// hence the lanes) and for the attention and full forms' sums over experts.
// Mapping: 32 consecutive outputs per block, warp w = lane p (coalesced across outputs).
// Traffic: each input read once, each output written once.
// Launch: grid ceil(outer * inner / 32), 256 threads, 8 * 32 * 4 = 1 KiB dynamic shared.
constexpr int GATE_SUM_LANES = GATE_THREADS / 32;
__device__ __forceinline__ void gate_sum_body(const float* in, i64 outer, int inner,
                                              i64 outer_stride, i64 count, i64 stride, float* out) {
  DYN_SHARED(float, partial);  // [GATE_SUM_LANES][32]
  const int lane = threadIdx.x % 32, p = threadIdx.x / 32;
  const i64 i = i64(blockIdx.x) * 32 + lane;
  const bool inside = i < outer * inner;
  float s = 0.0f;
  if (inside) {
    const float* src = in + (i / inner) * outer_stride + i % inner;
    for (i64 k = p; k < count; k += GATE_SUM_LANES) s += src[k * stride];
  }
  partial[p * 32 + lane] = s;
  __syncthreads();
  if (p == 0 && inside) {
    float total = 0.0f;
    for (int q = 0; q < GATE_SUM_LANES; ++q) total += partial[q * 32 + lane];
    out[i] = total;
  }
}

extern "C" __global__ void gate_sum_f32(const float* in, long long in_off, long long outer,
                                        int inner, long long outer_stride, long long count,
                                        long long stride, float* out, long long out_off) {
  gate_sum_body(in + in_off, outer, inner, outer_stride, count, stride, out + out_off);
}
EMU_EXPORT(gate_sum_f32)
// The same sums with input and output in one buffer (disjoint ranges of the workspace).
extern "C" __global__ void gate_sum_inplace_f32(float* buf, long long in_off, long long outer,
                                                int inner, long long outer_stride, long long count,
                                                long long stride, long long out_off) {
  gate_sum_body(buf + in_off, outer, inner, outer_stride, count, stride, buf + out_off);
}
EMU_EXPORT(gate_sum_inplace_f32)
