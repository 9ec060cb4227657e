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

// The tokens [first, end) of this block's chunk.
struct TokenChunk {
  i64 first, end;
};
__device__ __forceinline__ TokenChunk token_chunk(i64 tokens_per_segment, i64 tokens_per_chunk) {
  const i64 segment_first = i64(blockIdx.y) * tokens_per_segment;
  const i64 first = segment_first + i64(blockIdx.z) * tokens_per_chunk;
  const i64 end = first + tokens_per_chunk;
  return {first, end < segment_first + tokens_per_segment ? end : segment_first + tokens_per_segment};
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

// ------------------------------------------------------------------------------------------
// Loss values. Block sums take 256 threads' values through a shared-memory tree in a fixed order.
constexpr int kLossThreads = 256;

template <typename T>
__device__ __forceinline__ T block_sum(T v, T* scratch) {
  __syncthreads();  // scratch may still be read by a previous block_sum
  scratch[threadIdx.x] = v;
  __syncthreads();
  for (int stride = kLossThreads / 2; stride > 0; stride >>= 1) {
    if (int(threadIdx.x) < stride) scratch[threadIdx.x] += scratch[threadIdx.x + stride];
    __syncthreads();
  }
  return scratch[0];
}

// The aux loss's dL/dp factor of a segment with `live` rows routed somewhere:
// alpha E / (k S live^2), with scale = alpha E / (k S) from the host; 0 for a segment with none.
// In double, so that the factor of a batch equals that of the same batch without its tokens
// routed nowhere bit for bit.
__device__ __forceinline__ float aux_coefficient(double scale, int live) {
  return live == 0 ? 0.0f : float(scale / (double(live) * double(live)));
}

// The z-loss factor c / live (f32, as c / T would be for a batch without its rows routed
// nowhere), times `times`; 0 for a batch with no live row.
__device__ __forceinline__ float z_coefficient(float coefficient, float times, int live) {
  return live == 0 ? 0.0f : times * coefficient / float(live);
}

// The per-chunk partials of router_losses_f32, slot i = s * chunks + c: the chunk's rows with a
// finite LSE and the sum of their lse^2; with ids, its E counts and E probability sums. A slot
// may hold the sum of a run of slots instead (the two-level reduction below).
struct LossPartials {
  int* live;
  float* lse_squares;
  int* counts;       // [slots, E], or null without the aux loss
  float* prob_sums;  // [slots, E], or null without the aux loss

  // Adds n slots first, first + stride, ... in that order. The loads of a loop's unrolled
  // iterations are independent of its adds, so up to 8 slots are in flight per thread.
  // Squares false: the rows only (squares unused, lse_squares not read).
  template <bool Squares = true>
  __device__ __forceinline__ void sum_rows(i64 first, i64 stride, int n, int* rows, float* squares) const {
    int r = 0;
    float q = 0.0f;
#pragma unroll 8
    for (int j = 0; j < n; ++j) {
      r += live[first + j * stride];
      if constexpr (Squares) q += lse_squares[first + j * stride];
    }
    *rows = r;
    if constexpr (Squares) *squares = q;
  }
  __device__ __forceinline__ void sum_column(i64 first, i64 stride, int n, int E, int e, int* count,
                                             float* prob) const {
    int c = 0;
    float p = 0.0f;
#pragma unroll 8
    for (int j = 0; j < n; ++j) {
      c += counts[(first + j * stride) * E + e];
      p += prob_sums[(first + j * stride) * E + e];
    }
    *count = c;
    *prob = p;
  }
};

// Chunks a first-level reduction adds: the launch's tail reads at most this many chunks' partials
// per column, then at most ceil(1024 / 32) = 32 groups' sums.
constexpr int kChunksPerGroup = 32;

// router_losses_f32: the Switch aux loss (token or sequence level), the z-loss, or both, from the
// logits z [T, E] (and, for the aux loss, the ids [T, k] selected from them) in one launch.
// Algorithm: block (s, c) = (blockIdx.y, blockIdx.z) owns chunk c of segment s (token_chunk).
//   1. Rows (warp w: rows w, w + 8, ... of the chunk): lse = max + log(sum exp(z - max)), NaN for a
//      non-finite row, into row_lse[t] (and row_lse_copy[t]). The warp keeps its count of finite
//      rows and the sum of their lse^2; the block adds the warps in warp order into its slot's
//      live and lse_squares. With ids, the chunk's slots go into a shared histogram (integer
//      atomics: exact in any order; ids outside [0, E) count nowhere).
//   2. Columns (thread i: experts i, i + 256, ...): prob_sums[slot, e] = the sum over the chunk's
//      finite rows, in row order, of exp(z[t, e] - lse[t]); counts[slot, e] = the histogram.
//   3. Groups: the chunks of a segment form groups of kChunksPerGroup (the last may be shorter).
//      The last block of a group to arrive (group_tickets[the group's first slot]; it resets it)
//      adds the group's slots in chunk order into its first slot. A group of one chunk already
//      is its sum. Groups finish while other blocks still run, so only the last one's sum is on
//      the launch's tail.
//   4. The last group to arrive (ticket; it resets it) adds each segment's group sums in group
//      order: live_rows[s] and counts[s, e]; aux_loss = sum_{s, e} aux_coefficient(s)
//      counts[s, e] P[s, e] with P the summed probabilities; z_live = the finite rows of the
//      batch and z_loss = z_coefficient(z_live) * the sum of the groups' lse^2 (thread-strided,
//      then block_sum).
//   Every sum has a fixed order: the same inputs give the same bits.
// Traffic: z read once from memory while a chunk fits the caches (pass 2 re-reads it: 64 KiB for
//   64 rows at E = 256, 256 KiB at E = 1024, and chunks grow past 64 rows above T = 65536, where
//   pass 2 may read from L2 or memory again), ids read once, row_lse written once (read back
//   from cache); 2 E + 2 values per chunk written and read once by its group's last block, and
//   one slot per group read by the last block. The tail is one group's sum (<= 32 slots a
//   column) and then <= 32 group sums per column of each segment: S E columns over 256 threads.
// Launch: grid (1, segments, chunks per segment), block 256, dynamic shared E ints when ids is not
//   null (else 0). ids null: no aux loss (chunk_counts, chunk_prob_sums, segment_counts, live_rows
//   and aux_loss are null too). z_loss null: no z-loss (z_live null). ticket: one int, zero;
//   group_tickets: one int per chunk slot [S, chunks], zero.
// The launch contract's parameters after z, ids, E and k, shared with router_select_losses.
#define ROUTER_LOSS_PARAMS                                                                          \
  long long tokens_per_segment, long long tokens_per_chunk, float *row_lse, float *row_lse_copy,    \
      int *chunk_live, float *chunk_lse_squares, int *chunk_counts, float *chunk_prob_sums,         \
      int *group_tickets, int *ticket, double aux_scale, int *segment_counts, int *live_rows,       \
      float *aux_loss, float z_loss_coefficient, int *z_live, float *z_loss
#define ROUTER_LOSS_ARGS                                                                            \
  tokens_per_segment, tokens_per_chunk, row_lse, row_lse_copy, chunk_live, chunk_lse_squares,       \
      chunk_counts, chunk_prob_sums, group_tickets, ticket, aux_scale, segment_counts, live_rows,   \
      aux_loss, z_loss_coefficient, z_live, z_loss

// The whole of router_losses_f32, callable by a kernel of the same grid and block (all its
// threads call it; it may return early).
__device__ __forceinline__ void router_losses_body(const float* z, const int* ids, int E, int k,
                                                   ROUTER_LOSS_PARAMS) {
  __shared__ float warp_squares[kSliceWarps];
  __shared__ int warp_live[kSliceWarps];
  __shared__ float float_scratch[kLossThreads];
  __shared__ int int_scratch[kLossThreads];
  __shared__ int last_block;
  DYN_SHARED(int, histogram);
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  const TokenChunk chunk = token_chunk(tokens_per_segment, tokens_per_chunk);
  const i64 chunks = gridDim.z;
  const i64 slot = i64(blockIdx.y) * chunks + blockIdx.z;
  const LossPartials partials{chunk_live, chunk_lse_squares, chunk_counts, chunk_prob_sums};
  if (ids) {
    for (int e = threadIdx.x; e < E; e += kLossThreads) histogram[e] = 0;
    __syncthreads();
    for (i64 i = chunk.first * k + threadIdx.x; i < chunk.end * k; i += kLossThreads) {
      const int id = ids[i];
      if (id >= 0 && id < E) atomicAdd(&histogram[id], 1);
    }
  }
  // 1. Rows.
  const bool vec = E % 4 == 0 && aligned_16(z);
  float squares = 0.0f;
  int live = 0;
  for (i64 t = chunk.first + warp; t < chunk.end; t += kSliceWarps) {
    const RowSoftmax stats = row_softmax_global(z + t * E, E, vec);
    const float lse = stats.nonfinite ? __uint_as_float(kQuietNaN) : stats.max + logf(stats.sum);
    if (lane == 0) {
      row_lse[t] = lse;
      if (row_lse_copy) row_lse_copy[t] = lse;
    }
    if (!stats.nonfinite) {
      squares += lse * lse;
      ++live;
    }
  }
  if (lane == 0) {
    warp_squares[warp] = squares;
    warp_live[warp] = live;
  }
  __syncthreads();  // also makes this block's row_lse visible to all its threads
  if (threadIdx.x == 0) {
    float chunk_squares = 0.0f;
    int chunk_rows = 0;
    for (int w = 0; w < kSliceWarps; ++w) {
      chunk_squares += warp_squares[w];
      chunk_rows += warp_live[w];
    }
    chunk_lse_squares[slot] = chunk_squares;
    chunk_live[slot] = chunk_rows;
  }
  // 2. Columns.
  if (ids)
    for (int e = threadIdx.x; e < E; e += kLossThreads) {
      float sum = 0.0f;
      for (i64 t = chunk.first; t < chunk.end; ++t) {
        const float lse = row_lse[t];
        if (lse == lse) sum += expf(z[t * E + e] - lse);
      }
      chunk_prob_sums[slot * E + e] = sum;
      chunk_counts[slot * E + e] = histogram[e];
    }
  // 3. The group's last block.
  const i64 group_chunk = i64(blockIdx.z) / kChunksPerGroup * kChunksPerGroup;  // its first chunk
  const i64 group_first = i64(blockIdx.y) * chunks + group_chunk;                 // and slot
  const int group_size = int(min(i64(kChunksPerGroup), chunks - group_chunk));
  if (group_size > 1) {
    if (!last_to_arrive(group_tickets + group_first, group_size, &last_block)) return;
    if (threadIdx.x == 0) {
      group_tickets[group_first] = 0;
      int rows;
      float group_squares;
      partials.sum_rows(group_first, 1, group_size, &rows, &group_squares);
      chunk_live[group_first] = rows;
      chunk_lse_squares[group_first] = group_squares;
    }
    if (ids)
      for (int e = threadIdx.x; e < E; e += kLossThreads) {
        int count;
        float prob;
        partials.sum_column(group_first, 1, group_size, E, e, &count, &prob);
        chunk_counts[group_first * E + e] = count;
        chunk_prob_sums[group_first * E + e] = prob;
      }
  }
  // 4. The last group.
  const i64 segments = gridDim.y, groups = (chunks + kChunksPerGroup - 1) / kChunksPerGroup;
  if (!last_to_arrive(ticket, int(segments * groups), &last_block)) return;
  if (threadIdx.x == 0) *ticket = 0;
  if (ids) {
    for (i64 s = threadIdx.x; s < segments; s += kLossThreads)
      partials.sum_rows<false>(s * chunks, kChunksPerGroup, int(groups), &live_rows[s], nullptr);
    __syncthreads();
    float partial = 0.0f;
    for (i64 i = threadIdx.x; i < segments * E; i += kLossThreads) {
      const i64 s = i / E;
      int count;
      float prob;
      partials.sum_column(s * chunks, kChunksPerGroup, int(groups), E, int(i % E), &count, &prob);
      segment_counts[i] = count;
      partial += aux_coefficient(aux_scale, live_rows[s]) * float(count) * prob;
    }
    const float total = block_sum(partial, float_scratch);
    if (threadIdx.x == 0) aux_loss[0] = total;
  }
  if (z_loss) {
    float partial = 0.0f;
    int rows = 0;
    for (i64 i = threadIdx.x; i < segments * groups; i += kLossThreads) {
      const i64 group = (i / groups) * chunks + (i % groups) * kChunksPerGroup;
      partial += chunk_lse_squares[group];
      rows += chunk_live[group];
    }
    const float total = block_sum(partial, float_scratch);
    const int total_rows = block_sum(rows, int_scratch);
    if (threadIdx.x == 0) {
      z_live[0] = total_rows;
      z_loss[0] = z_coefficient(z_loss_coefficient, 1.0f, total_rows) * total;
    }
  }
}

extern "C" __global__ void router_losses_f32(const float* z, const int* ids, int E, int k, ROUTER_LOSS_PARAMS) {
  router_losses_body(z, ids, E, k, ROUTER_LOSS_ARGS);
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
  router_losses_body(z, aux_loss ? ids : nullptr, E, k, ROUTER_LOSS_ARGS);
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
