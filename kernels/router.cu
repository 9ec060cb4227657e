// router.cu: top-k expert selection, its backward, expert statistics and the balance losses
// (math §2, §3). The gate that produces the logits is the `gate` family.
//
// Layout: logits z [T, E] f32 row-major; ids [T, k] i32; weights and d_weights [T, k] f32.
// Everything accumulates in f32, in fixed orders (butterfly warp sums, fixed warp and block
// trees): results are bit-for-bit reproducible run to run. Integer counts use integer atomics.
// The non-finite-row rule (NaN / +inf logits, or no finite logit) is in router_row.cuh.
//
// Kernels (launch contracts above each):
//   router_select_e{32,64,128,256,512,1024}_f32   fused top-k selection, N / 32 lanes per row,
//                                                  the row in registers (E <= the suffix N)
//   router_select_counted_e{...}_f32               the same + the routing map's counting pass
//   router_select_backward_f32                     dz from d(weights), one warp per row
//   router_expert_statistics_f32                   per (segment, expert) counts, per-chunk weight sums
//   router_sum_chunks_f32                          adds per-chunk partial sums in chunk order
//   router_losses_f32                              Switch load-balancing loss (token or sequence
//                                                  level) and ST-MoE router z-loss, one launch
//   router_select_losses_e{...}_f32                the selection (+ the map's count) and the
//                                                  losses of its ids, one launch
//   router_losses_backward_f32                     their gradients, added into dz, one launch
//   router_bias_update_f32                         DeepSeek-V3 b += gamma * sign(mean(c) - c)
#include "dispatch_map.cuh"
#include "router_losses.cuh"
#include "router_select.cuh"

constexpr int kRowWarps = 4;    // warps per block of the row kernels (128 threads)
constexpr int kSliceWarps = 8;  // warps per block in the per-expert reduction kernels (256 threads)

// ------------------------------------------------------------------------------------------
// router_select_e<N>_f32: ids and weights of the k best experts of each row.
// Mapping: L = N / 32 lanes per row (32 / L rows per warp, 128 / L per block), each lane holding
//   32 slots: the slots of the V = 32 / L virtual lanes of the warp-per-row mapping it stands in
//   for (router_select.cuh), so every sum, and hence every weight, has that mapping's bits.
// Algorithm, per row: load the row into registers (16-byte loads when E % 4 == 0 and z, bias
//   are 16-byte aligned, N >= 128); softmax max (log2 L shuffles) and sum (the virtual lanes'
//   butterfly: 5 - log2 L register steps, log2 L shuffles); key = rank_key(score(z) + bias)
//   (router_row.cuh: NaN lowest); with groups, keep_best_groups zeroes the keys outside the
//   topk_groups best groups; take_top_k: k tournament rounds, each a scan of the lane's 32 keys
//   and a log2 L-step argmax of packed (key, element) over the row's lanes (ties: lower element);
//   the weights from the k unbiased scores (re-read z[id], L1-hot) by selected_weights. Slot r is
//   written by lane r % L: ids in rank order.
// Dependent shuffles per row (32-bit shuffles on the longest chain; a u64 step is two independent
//   ones): log2 L each for the max, the softmax sum (softmax_then_topk), each group, each chosen
//   group, each of the k picks, and the renormalize or topk_then_softmax sum (+ its max).
//   DeepSeek-V3 (E = 256: L = 8; sigmoid, k = 8, 8 groups, top 4, renormalize):
//   3 + 8*3 + 4*3 + 8*3 + 3 = 66 on the chain; a warp issues 126 shuffle instructions for its 4
//   rows (32 per row). The warp-per-row mapping (L = 32): 110 on the chain, 210 per row.
//   E <= 32 (L = 1): no shuffle at all, a row per lane.
// Traffic: z (and bias) read once, ids and weights written once. Registers: 32 keys per lane
//   plus the row while keys are formed, as the warp-per-row kernel at E = 1024 holds (ptxas,
//   sm_90: 127 at E = 256, where the warp-per-row mapping takes 40; no spills).
// The row's work is select_row (router_select.cuh), which a fused scoring kernel can call too.
// Launch: grid ceil(T / (128 / L)), block 128, no shared memory. 1 <= E <= N,
//   1 <= k <= min(E, 32), groups in 1..=32 dividing E, 1 <= topk_groups <= groups,
//   k <= topk_groups * E / groups; bias [E] or null; nonfinite_rows: one counter the kernel adds
//   the row count to (or null).
//
// router_select_counted_e<N>_f32: the same selection fused with the counting pass of the
// routing map of the ids it writes (math §4, kernels/dispatch.cu): the lane of slot r < k also
// counts it into the per-tile counts of the map's tiled counting sort (count_slot: one integer
// atomic), and the last block to finish turns them into tile prefixes, counts and offsets
// (finish_count), so dispatch_map_rank alone completes the map, one launch fewer than
// selection + routing map. A kernel of its own, so the plain selection keeps its registers.
// Extra launch contract: dynamic shared (local_experts + 1) ints; T·k < 2^31; map_workspace
// [MAP_WORKSPACE_HEADER + ceil(T·k / tile_slots)·(local_experts + 1)] zeroed; expert_begin, local_experts
// and align as in the map. Traffic: k integer atomics per row; the last block reads the counts.
#define ROUTER_SELECT(N)                                                                            \
  extern "C" __global__ void router_select_e##N##_f32(ROUTER_SELECT_PARAMS) { ROUTER_SELECT_ROW(N, N / kWarp); } \
  extern "C" __global__ void router_select_counted_e##N##_f32(                                     \
      ROUTER_SELECT_PARAMS, int *map_workspace, int tile_slots, int expert_begin, int local_experts, \
      int align, int *counts, int *offsets, int *status) {                                         \
    constexpr int L = N / kWarp;                                                                    \
    __shared__ int scratch[32];                                                                     \
    __shared__ int last_block;                                                                      \
    __shared__ int dropped;                                                                         \
    DYN_SHARED(int, totals);                                                                        \
    ROUTER_SELECT_ROW(N, L);                                                                        \
    const MapShape m{ids, int(T), k, E, expert_begin, local_experts};                              \
    int* tile_counts = map_workspace + MAP_WORKSPACE_HEADER;                                        \
    if (row < T)                                                                                    \
      for (int r = threadIdx.x % L; r < k; r += L) count_slot(m, int(row) * k + r, tile_slots, tile_counts); \
    const int tiles = int((i64(m.slots()) + tile_slots - 1) / tile_slots);                         \
    finish_count(m, SOURCE_ORDER, align, -1, tiles, map_workspace, totals, scratch, &last_block,   \
                 &dropped, counts, offsets, status);                                                \
  }
ROUTER_SELECT(32)
EMU_EXPORT(router_select_e32_f32)
EMU_EXPORT(router_select_counted_e32_f32)
ROUTER_SELECT(64)
EMU_EXPORT(router_select_e64_f32)
EMU_EXPORT(router_select_counted_e64_f32)
ROUTER_SELECT(128)
EMU_EXPORT(router_select_e128_f32)
EMU_EXPORT(router_select_counted_e128_f32)
ROUTER_SELECT(256)
EMU_EXPORT(router_select_e256_f32)
EMU_EXPORT(router_select_counted_e256_f32)
ROUTER_SELECT(512)
EMU_EXPORT(router_select_e512_f32)
EMU_EXPORT(router_select_counted_e512_f32)
ROUTER_SELECT(1024)
EMU_EXPORT(router_select_e1024_f32)
EMU_EXPORT(router_select_counted_e1024_f32)

// ------------------------------------------------------------------------------------------
// router_select_backward_f32: dz [T, E] (overwritten) from d_weights [T, k] and the forward's ids.
// Algorithm, per row (one warp): softmax statistics of z (two lane-strided passes); lane j < k
//   takes id_j (ids out of [0, E) and repeats of an earlier slot's id are ignored: they get no
//   gradient) and re-forms the forward's weights (selected_weights). Then, with rho = scale:
//   - softmax_then_topk, no renormalize: dz = rho p (m - <p, m>) over all E (m = dw on K): a dense
//     write of -rho p <p, m>, then lanes j fix dz[id_j] = rho p_j (dw_j - <p, m>) (after __syncwarp);
//   - topk_then_softmax, or softmax + renormalize (the same function): dz_j = w_j (rho dw_j -
//     sum_K w_i rho dw_i) on K;
//   - sigmoid / none: ds_j = rho dw_j, or with renormalize (rho / S)(dw_j - sum_K (s_i / S) dw_i);
//     dz_j = ds_j s_j (1 - s_j) for sigmoid, ds_j for none;
//   0 on unselected logits (written first), and a zero row for a non-finite row.
// Traffic: z read by the max pass, and for softmax_then_topk by the sum and dense-write passes too
//   (L1/L2-hot); dz written once; ids and d_weights read once.
// Launch: grid ceil(T / 4), block 128, no shared memory; 1 <= k <= 32, k <= E.
extern "C" __global__ void router_select_backward_f32(const float* z, const int* ids, const float* d_weights,
                                                      long long T, int E, int k, int score, int topk_first,
                                                      int renormalize, float scale, float* dz) {
  const i64 row = i64(blockIdx.x) * kRowWarps + threadIdx.x / kWarp;
  if (row >= T) return;
  const int lane = threadIdx.x % kWarp;
  const SelectOptions o{score, topk_first != 0, renormalize != 0, scale};
  const float* z_row = z + row * E;
  float* dz_row = dz + row * E;
  const bool vec = E % 4 == 0 && aligned_16(z) && aligned_16(dz);
  // The softmax sum is needed only where p over all E is: softmax_then_topk.
  const RowSoftmax stats = row_softmax_global(z_row, E, vec, o.score == kSoftmax && !o.topk_first);
  const int id = lane < k ? ids[row * k + lane] : -1;
  bool active = id >= 0 && id < E;
  for (int j = 0; j < k; ++j) {
    const int earlier = __shfl_sync(kFullMask, id, j);
    if (j < lane && earlier == id) active = false;
  }
  const float dw = active ? d_weights[row * k + lane] : 0.0f;
  const SelectedWeights w = selected_weights(o, stats, active ? z_row[id] : 0.0f, active);
  const bool dense = o.score == kSoftmax && !o.topk_first && !o.renormalize && !stats.nonfinite;
  const float dense_dot = dense ? warp_sum(w.score * dw) : 0.0f;
  lane_strided_write(dz_row, dense ? z_row : nullptr, E, vec, [&](int, float zv) {
    return dense ? -o.scale * row_softmax_prob(stats, zv) * dense_dot : 0.0f;
  });
  __syncwarp();
  if (stats.nonfinite) return;
  float grad;
  if (dense) {
    grad = o.scale * w.score * (dw - dense_dot);
  } else if (o.score == kSoftmax) {
    grad = w.normalized * o.scale * (dw - warp_sum(w.normalized * dw));
  } else {
    const float ds = o.renormalize ? (o.scale / w.denom) * (dw - warp_sum(w.normalized * dw)) : o.scale * dw;
    grad = o.score == kSigmoid ? ds * w.score * (1.0f - w.score) : ds;
  }
  if (active) dz_row[id] = grad;
}
EMU_EXPORT(router_select_backward_f32)

// ------------------------------------------------------------------------------------------
// Per-expert reductions over tokens. A block owns 32 experts (lane l: expert 32*blockIdx.x + l)
// and one chunk of tokens: chunk blockIdx.z of segment blockIdx.y (tokens_per_chunk tokens, the
// last chunk of a segment shorter). Its 8 warps take interleaved pieces of the chunk and each
// lane accumulates its own expert in registers, so no float atomics are needed; the 8 warp
// partials are then added in warp order. Fixed order: reproducible bits.

// Adds the block's per-warp partials (lane-indexed) in warp order; the result is valid in warp 0.
template <class T>
__device__ __forceinline__ T sum_warp_partials(T (&partials)[kSliceWarps][kWarp], T mine) {
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  partials[warp][lane] = mine;
  __syncthreads();
  T total = T(0);
  if (warp == 0)
    for (int w = 0; w < kSliceWarps; ++w) total += partials[w][lane];
  return total;
}

// router_expert_statistics_f32: counts[s, e] += #{slots of segment s routed to e} (an integer
// atomicAdd per block and expert: exact, order-free; the caller zeroes counts), and, when weights
// and weight_partials are not null, weight_partials[s, c, e] = the sum of the weights of those in
// chunk c (router_sum_chunks_f32 adds the chunks in order).
// Mapping: each warp reads 32 slots (ids, weights) coalesced, then broadcasts them one by one
//   (__shfl_sync) to the 32 expert lanes. Ids outside [0, E) match no expert.
// Traffic: ids (and weights) read ceil(E/32) times (once per expert slice); one partial per
//   (segment, chunk, expert) written.
// Launch: grid (ceil(E / 32), segments, chunks per segment), block 256.
extern "C" __global__ void router_expert_statistics_f32(const int* ids, const float* weights,
                                                        long long tokens_per_segment, long long tokens_per_chunk,
                                                        int k, int E, int* counts, float* weight_partials) {
  __shared__ int count_partials[kSliceWarps][kWarp];
  __shared__ float sum_partials[kSliceWarps][kWarp];
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  const int expert = blockIdx.x * kWarp + lane;
  const TokenChunk chunk = token_chunk(tokens_per_segment, tokens_per_chunk);
  const i64 first = chunk.first * k, end = chunk.end * k;
  int count = 0;
  float sum = 0.0f;
  for (i64 base = first + i64(warp) * kWarp; base < end; base += kSliceWarps * kWarp) {
    const bool in = base + lane < end;
    const int id = in ? ids[base + lane] : -1;
    const float w = (in && weights) ? weights[base + lane] : 0.0f;
    for (int j = 0; j < kWarp; ++j) {
      const int slot_id = __shfl_sync(kFullMask, id, j);
      const float slot_w = __shfl_sync(kFullMask, w, j);
      if (slot_id == expert) {
        ++count;
        sum += slot_w;
      }
    }
  }
  const int total_count = sum_warp_partials(count_partials, count);
  const float total_sum = sum_warp_partials(sum_partials, sum);
  if (warp == 0 && expert < E) {
    if (total_count) atomicAdd(&counts[i64(blockIdx.y) * E + expert], total_count);
    if (weight_partials) weight_partials[(i64(blockIdx.y) * gridDim.z + blockIdx.z) * E + expert] = total_sum;
  }
}
EMU_EXPORT(router_expert_statistics_f32)

// router_sum_chunks_f32: out[e] = sum over c = 0, 1, ..., chunks - 1 of partials[c, e], in that
// order (the reduction's fixed second level). Launch: grid ceil(E / 256), block 256.
extern "C" __global__ void router_sum_chunks_f32(const float* partials, int chunks, int E, float* out) {
  const int e = blockIdx.x * blockDim.x + threadIdx.x;
  if (e >= E) return;
  float sum = 0.0f;
  for (int c = 0; c < chunks; ++c) sum += partials[i64(c) * E + e];
  out[e] = sum;
}
EMU_EXPORT(router_sum_chunks_f32)

// router_losses_f32: router_losses_body (router_losses.cuh: its algorithm, traffic and launch
// contract) on a grid of its own, (1, segments, chunks per segment). 4 blocks an SM by its
// bounds: unbounded, ptxas gave it 72 registers on sm_80 (3 blocks); 56-64 with them, no spills.
extern "C" __global__ void __launch_bounds__(kLossThreads, 4) router_losses_f32(const float* z, const int* ids, int E, int k, ROUTER_LOSS_PARAMS) {
  router_losses_body(grid_loss_block(), z, ids, E, k, ROUTER_LOSS_ARGS);
}
EMU_EXPORT(router_losses_f32)

// router_select_losses_e<N>_f32: the selection of router_select_counted_e<N>_f32 (the map's count
// optional) and router_losses_f32 of the ids it selects, in one launch on the losses' grid.
// Algorithm, block (s, c) = chunk c of segment s (token_chunk), 256 threads:
//   0. Selection: the chunk's rows 256 / L at a time, L = N / 32 lanes a row, each row by
//      select_row (the selection kernels' per-row work: the same ids and weights bits); with a map
//      workspace the lane of slot r counts it (count_slot), and the last block of the grid to
//      arrive completes the count (finish_count).
//   1.-4. router_losses_body on the same chunk, its histogram from the ids this block just wrote
//      (aux_loss null: ids are not counted). The chunking, the rows' lse and every sum are those
//      of router_losses_f32 with the same tokens_per_segment and tokens_per_chunk: the same bits.
// Traffic: z read from memory once (selection); the losses' passes re-read the chunk's rows from
//   L1 / L2 (64 KiB for 64 rows at E = 256), where a separate losses launch reads them from
//   memory again; ids and weights written once and the chunk's ids read back from L1 / L2.
// Launch: router_losses_f32's grid and block, dynamic shared max((local_experts + 1) ints with a
//   map, E ints with the aux loss); the contracts of router_select_counted_e<N>_f32 (a null
//   map_workspace: no count, then tile_slots .. status are unused) and router_losses_f32
//   (whose z, ids, E and k are the selection's).
template <int N>
__device__ __forceinline__ void select_losses_body(ROUTER_SELECT_PARAMS, int* map_workspace, int tile_slots,
                                                   int expert_begin, int local_experts, int align, int* counts,
                                                   int* offsets, int* status, ROUTER_LOSS_PARAMS) {
  constexpr int L = N / kWarp, kRowsPerStep = kLossThreads / L;
  __shared__ int scratch[32];
  __shared__ int last_block;
  __shared__ int dropped;
  DYN_SHARED(int, totals);
  const SelectOptions o{score, topk_first != 0, renormalize != 0, scale};
  const TokenChunk chunk = token_chunk(tokens_per_segment, tokens_per_chunk);
  const MapShape m{ids, int(T), k, E, expert_begin, local_experts};
  int* tile_counts = map_workspace ? map_workspace + MAP_WORKSPACE_HEADER : nullptr;
  for (i64 first = chunk.first; first < chunk.end; first += kRowsPerStep) {
    const i64 row = first + threadIdx.x / L;
    const bool live = row < chunk.end;
    select_row<N / kWarp, L>(z, bias, live ? row : 0, live, E, k, o, groups, topk_groups, ids, weights,
                             nonfinite_rows);
    if (live && tile_counts)
      for (int r = threadIdx.x % L; r < k; r += L) count_slot(m, int(row) * k + r, tile_slots, tile_counts);
  }
  if (map_workspace) {
    const int tiles = int((i64(m.slots()) + tile_slots - 1) / tile_slots);
    finish_count(m, SOURCE_ORDER, align, -1, tiles, map_workspace, totals, scratch, &last_block, &dropped,
                 counts, offsets, status);
  }
  __syncthreads();  // the chunk's ids are visible to the block; totals may become the histogram
  router_losses_body(grid_loss_block(), z, aux_loss ? ids : nullptr, E, k, ROUTER_LOSS_ARGS);
}

// Two blocks an SM where 128 registers hold the row without spilling (ptxas, sm_80 and sm_90a):
// a block takes 160-168 registers a thread otherwise.
constexpr int select_losses_min_blocks(int n) { return n >= 128 && n <= 512 ? 2 : 1; }

#define ROUTER_SELECT_LOSSES(N)                                                                     \
  extern "C" __global__ void __launch_bounds__(kLossThreads, select_losses_min_blocks(N))          \
      router_select_losses_e##N##_f32(                                                              \
      ROUTER_SELECT_PARAMS, int *map_workspace, int tile_slots, int expert_begin, int local_experts, \
      int align, int *counts, int *offsets, int *status, ROUTER_LOSS_PARAMS) {                      \
    select_losses_body<N>(z, bias, T, E, k, score, topk_first, renormalize, scale, groups,          \
                          topk_groups, ids, weights, nonfinite_rows, map_workspace, tile_slots,     \
                          expert_begin, local_experts, align, counts, offsets, status,              \
                          ROUTER_LOSS_ARGS);                                                        \
  }
ROUTER_SELECT_LOSSES(32)
EMU_EXPORT(router_select_losses_e32_f32)
ROUTER_SELECT_LOSSES(64)
EMU_EXPORT(router_select_losses_e64_f32)
ROUTER_SELECT_LOSSES(128)
EMU_EXPORT(router_select_losses_e128_f32)
ROUTER_SELECT_LOSSES(256)
EMU_EXPORT(router_select_losses_e256_f32)
ROUTER_SELECT_LOSSES(512)
EMU_EXPORT(router_select_losses_e512_f32)
ROUTER_SELECT_LOSSES(1024)
EMU_EXPORT(router_select_losses_e1024_f32)

// ------------------------------------------------------------------------------------------
// Loss gradients, added into dz, with p = exp(z - lse): the aux loss's is the dense softmax
// backward of its per-row g = dL/dp, dz_e += p_e (g_e - <p, g>); the z-loss's is
// d(lse^2)/dz_e = 2 lse p_e times c / T'. Rows with a NaN lse get nothing.

// router_losses_backward_f32: the aux loss's gradient, the z-loss's, or both, added into dz in
// one pass over z and dz. Per row t with a finite lse (p = exp(z - lse)):
//   aux (counts not null): g_e = aux_coefficient(s) counts[s, e] for the segment s = t /
//     tokens_per_segment (the forward's factor: dL/dp_{t,e} = alpha E / (k S live_s^2) c_{s,e}),
//     dz_e += p_e (g_e - <p, g>);
//   z (z_live not null): dz_e += z_coefficient(c, 2, z_live) lse_t p_e;
// added in that order, each as its own launch would add it: the same bits as two launches.
// Traffic: z read once (twice with the aux loss: <p, g> first, L1-hot), dz read and written once.
// Launch: grid ceil(T / 4), block 128; one warp per row, lane-strided passes.
extern "C" __global__ void router_losses_backward_f32(const float* z, const float* lse, const int* counts,
                                                      const int* live, long long T, long long tokens_per_segment,
                                                      int E, double aux_scale, const int* z_live, float z_c,
                                                      float* dz) {
  const i64 row = i64(blockIdx.x) * kRowWarps + threadIdx.x / kWarp;
  if (row >= T || lse[row] != lse[row]) return;
  const float row_lse = lse[row];
  const float* z_row = z + row * E;
  const bool vec = E % 4 == 0 && aligned_16(z) && aligned_16(dz);
  const i64 segment = row / tokens_per_segment;
  const int* c = counts ? counts + segment * E : nullptr;
  const float aux_c = counts ? aux_coefficient(aux_scale, live[segment]) : 0.0f;
  const float z_coefficient_2 = z_live ? z_coefficient(z_c, 2.0f, z_live[0]) : 0.0f;
  float dot = 0.0f;
  if (c) {
    lane_strided_read(z_row, E, vec, [&](int e, float zv) { dot += expf(zv - row_lse) * aux_c * float(c[e]); });
    dot = warp_sum(dot);
  }
  lane_strided_write(dz + row * E, dz + row * E, E, vec, [&](int e, float old) {
    float v = old;
    if (c) v = v + expf(z_row[e] - row_lse) * (aux_c * float(c[e]) - dot);
    if (z_live) v = v + z_coefficient_2 * row_lse * expf(z_row[e] - row_lse);
    return v;
  });
}
EMU_EXPORT(router_losses_backward_f32)

// ------------------------------------------------------------------------------------------
// router_bias_update_f32: bias[e] += gamma * sign(mean(counts) - counts[e]), the sign taken
// exactly in integers: sign(sum(counts) - E * counts[e]). No gradient.
// Launch: grid 1, block 256. Counts are non-negative (as expert_statistics writes them).
extern "C" __global__ void router_bias_update_f32(const int* counts, int E, float gamma, float* bias) {
  __shared__ unsigned long long total;
  if (threadIdx.x == 0) total = 0ull;
  __syncthreads();
  unsigned long long partial = 0ull;
  for (int e = threadIdx.x; e < E; e += blockDim.x) partial += (unsigned long long)(long long)counts[e];
  atomicAdd(&total, partial);
  __syncthreads();
  for (int e = threadIdx.x; e < E; e += blockDim.x) {
    const long long diff = (long long)total - (long long)E * counts[e];
    bias[e] += diff > 0 ? gamma : diff < 0 ? -gamma : 0.0f;
  }
}
EMU_EXPORT(router_bias_update_f32)
