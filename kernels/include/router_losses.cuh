// router_losses.cuh: the router's balance losses (math §3) as a per-block body: the Switch aux
// loss (token or sequence level) and the ST-MoE z-loss of chunks of rows, reduced over the
// chunks in a fixed order by the last blocks to arrive. router_losses_f32 (router.cu) runs it on
// a grid of its own; router_select_losses_e<N>_f32 after the selection of the same chunk;
// gate_route_<form>_<dtype>_e<N> (gate.cu) after the selection of its 64-token tile, which is a
// chunk when the chunks are 64 tokens long.
#pragma once
#include "dispatch_map.cuh"
#include "router_row.cuh"

// The loss chunk a block owns: chunk `chunk` of segment `segment`, of `chunks` per segment and
// `segments` in all. The loss kernels' own grid is (1, segments, chunks); a fused kernel whose
// blocks are the chunks (gate_route) names its own.
struct LossBlock {
  i64 segment, chunk, segments, chunks;
};
__device__ __forceinline__ LossBlock grid_loss_block() {
  return {i64(blockIdx.y), i64(blockIdx.z), i64(gridDim.y), i64(gridDim.z)};
}

// The tokens [first, end) of a block's chunk.
struct TokenChunk {
  i64 first, end;
};
__device__ __forceinline__ TokenChunk token_chunk(const LossBlock& b, i64 tokens_per_segment, i64 tokens_per_chunk) {
  const i64 segment_first = b.segment * tokens_per_segment;
  const i64 first = segment_first + b.chunk * tokens_per_chunk;
  const i64 end = first + tokens_per_chunk;
  return {first, end < segment_first + tokens_per_segment ? end : segment_first + tokens_per_segment};
}
// The chunk of a block of the grid (1 or E slices, segments, chunks).
__device__ __forceinline__ TokenChunk token_chunk(i64 tokens_per_segment, i64 tokens_per_chunk) {
  return token_chunk(grid_loss_block(), tokens_per_segment, tokens_per_chunk);
}

// Loss values. Block sums take 256 threads' values through a shared-memory tree in a fixed order.
constexpr int kLossThreads = 256;
constexpr int kLossWarps = kLossThreads / kWarp;

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
// may hold the sum of a run of slots instead (the reductions below).
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
  // Adds the run of n slots first, first + stride, ... into slot first: the rows and lse^2 on
  // thread 0, with Columns column e on thread e % 256 (each thread reads only its own columns).
  __device__ __forceinline__ void sum_run(i64 first, i64 stride, int n, int E, bool columns) const {
    if (threadIdx.x == 0) {
      int rows;
      float squares;
      sum_rows(first, stride, n, &rows, &squares);
      live[first] = rows;
      lse_squares[first] = squares;
    }
    if (columns)
      for (int e = threadIdx.x; e < E; e += kLossThreads) {
        int count;
        float prob;
        sum_column(first, stride, n, E, e, &count, &prob);
        counts[first * E + e] = count;
        prob_sums[first * E + e] = prob;
      }
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
// per column, then at most ceil(1024 / 32) = 32 groups' sums, then one value per segment.
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
//   4. Segments: the last group of a segment to arrive (group_tickets[the segment's last slot],
//      which no group uses; it resets it) adds the segment's group sums in group order into its
//      first slot (a segment of one group already is its sum), then writes live_rows[s],
//      counts[s, e] and the segment's aux term sum_e aux_coefficient(s) counts[s, e] P[s, e]
//      (P the summed probabilities; thread-strided over e, then block_sum).
//   5. The last segment to arrive (ticket; it resets it; none for one segment) adds the
//      segments' aux terms into aux_loss, and their live rows and lse^2 sums into z_live and
//      z_loss = z_coefficient(z_live) * the sum (thread-strided over segments, then block_sum).
//   Every sum has a fixed order: the same inputs give the same bits.
// Traffic: z read once from memory while a chunk fits the caches (pass 2 re-reads it: 64 KiB for
//   64 rows at E = 256, 256 KiB at E = 1024, and chunks grow past 64 rows above T = 65536, where
//   pass 2 may read from L2 or memory again), ids read once, row_lse written once (read back
//   from cache); 2 E + 2 values per chunk written and read once by its group's last block, and
//   one slot per group read by its segment's last block. The tail is one group's sum (<= 32
//   slots a column), one segment's (<= 32 group sums a column of E), then one value per segment:
//   the segments' E-column sums run in their own blocks, not S E columns in the last one.
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

// The whole of router_losses_f32 for the chunk of block b, callable by any kernel of 256 threads
// whose blocks own the chunks one each (all its threads call it; it may return early).
__device__ __forceinline__ void router_losses_body(const LossBlock& b, const float* z, const int* ids, int E, int k,
                                                   ROUTER_LOSS_PARAMS) {
  __shared__ float warp_squares[kLossWarps];
  __shared__ int warp_live[kLossWarps];
  __shared__ float float_scratch[kLossThreads];
  __shared__ int int_scratch[kLossThreads];
  __shared__ int last_block;
  DYN_SHARED(int, histogram);
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  const TokenChunk chunk = token_chunk(b, tokens_per_segment, tokens_per_chunk);
  const i64 chunks = b.chunks;
  const i64 slot = b.segment * chunks + b.chunk;
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
  for (i64 t = chunk.first + warp; t < chunk.end; t += kLossWarps) {
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
    for (int w = 0; w < kLossWarps; ++w) {
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
  const i64 group_chunk = b.chunk / kChunksPerGroup * kChunksPerGroup;  // its first chunk
  const i64 group_first = b.segment * chunks + group_chunk;             // and slot
  const int group_size = int(min(i64(kChunksPerGroup), chunks - group_chunk));
  if (group_size > 1) {
    if (!last_to_arrive(group_tickets + group_first, group_size, &last_block)) return;
    if (threadIdx.x == 0) group_tickets[group_first] = 0;
    partials.sum_run(group_first, 1, group_size, E, ids != nullptr);
  }
  // 4. The segment's last group. Its sums go to the segment's first slot; its ticket is the
  // segment's last chunk slot, never a group's (a group starting there has one chunk).
  const i64 segment_first = b.segment * chunks;
  const int groups = int((chunks + kChunksPerGroup - 1) / kChunksPerGroup);
  if (groups > 1) {
    int* segment_ticket = group_tickets + segment_first + chunks - 1;
    if (!last_to_arrive(segment_ticket, groups, &last_block)) return;
    if (threadIdx.x == 0) *segment_ticket = 0;
    partials.sum_run(segment_first, kChunksPerGroup, groups, E, ids != nullptr);
  }
  __syncthreads();  // the segment's live rows (thread 0's sum, here or in 3.), read by every thread
  // The segment's aux loss term sum_e aux_coefficient(s) counts[s, e] P[s, e], left in its
  // first slot's probability column 0 once every column is read.
  if (ids) {
    const int live = chunk_live[segment_first];
    float partial = 0.0f;
    for (int e = threadIdx.x; e < E; e += kLossThreads) {
      const int count = chunk_counts[segment_first * E + e];
      segment_counts[b.segment * E + e] = count;
      partial += aux_coefficient(aux_scale, live) * float(count) * chunk_prob_sums[segment_first * E + e];
    }
    const float term = block_sum(partial, float_scratch);
    if (threadIdx.x == 0) {
      live_rows[b.segment] = live;
      chunk_prob_sums[segment_first * E] = term;
    }
  }
  // 5. The last segment (ticket; it resets it) adds the segments' terms in segment order.
  const i64 segments = b.segments;
  if (segments > 1) {
    if (!last_to_arrive(ticket, int(segments), &last_block)) return;
    if (threadIdx.x == 0) *ticket = 0;
  }
  if (ids) {
    float partial = 0.0f;
    for (i64 s = threadIdx.x; s < segments; s += kLossThreads) partial += chunk_prob_sums[s * chunks * E];
    const float total = block_sum(partial, float_scratch);
    if (threadIdx.x == 0) aux_loss[0] = total;
  }
  if (z_loss) {
    float partial = 0.0f;
    int rows = 0;
    for (i64 s = threadIdx.x; s < segments; s += kLossThreads) {
      partial += chunk_lse_squares[s * chunks];
      rows += chunk_live[s * chunks];
    }
    const float total = block_sum(partial, float_scratch);
    const int total_rows = block_sum(rows, int_scratch);
    if (threadIdx.x == 0) {
      z_live[0] = total_rows;
      z_loss[0] = z_coefficient(z_loss_coefficient, 1.0f, total_rows) * total;
    }
  }
}
