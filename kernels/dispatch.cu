// dispatch.cu: from routing (ids [T, k]) to expert-grouped rows and back (math §4).
//
// Routing map (the counting sort of include/dispatch_map.cuh; L = e_end - e_begin local experts):
//   counts[L]          slots kept per local expert
//   offsets[L + 1]     exclusive prefix of counts, each rounded up to `align`; offsets[L] = total
//   sorted_rows[len]   per row the source slot t·k + j, by expert then slot; -1 for padding and for
//                      every row after offsets[L] (len is the host's upper bound)
//   inverse[T·k]       the row of each slot; -1 if not laid out (other rank's expert, dropped by
//                      capacity, routed nowhere: kNoExpert, or an id outside [0, E))
//   status[2]          [0] slots dropped by capacity, [1] ids outside [0, E) other than kNoExpert
//                      (never read past)
// Capacity C >= 0 keeps each expert's first C slots in PRIORITY_ORDER (all j = 0 by token,
// then j = 1, ...); capacity < 0 keeps all. Launches: T·k small -> dispatch_map_small (1);
// otherwise [count, rank] in PRIORITY_ORDER if capacity >= 0, then [count, rank] in SOURCE_ORDER.
// A kernel that writes the ids can do the SOURCE_ORDER count itself (count_slot, finish_count;
// router_select_counted_*), leaving dispatch_map_rank alone to finish the map.
//
// Row movers (T: f32, f16, bf16; f32 arithmetic; element offsets 64-bit; 16-byte accesses when
// d is a multiple of 16 bytes and the rows are 16-byte aligned, else one element at a time):
//   dispatch_permute_<T>       Xp[inverse[t·k+j]] = X[t], token-major: each X row read once and
//                              written to its k rows; zeros where sorted_rows[r] = -1
//   dispatch_combine_<T>       Y[t] = sum_j w[t,j] Yp[inverse[t·k+j]] (+ R[t]), j = 0..k-1 in order;
//                              a slot not laid out adds nothing, unless its weight is NaN (the
//                              router's mark of a row routed nowhere): then Y[t] is NaN;
//                              also the permute backward (no weights: dX[t] = sum_j dXp[inverse])
//   dispatch_combine_bwd_<T>   dYp[r] = w[slot] dY[slot / k], dw[slot] = <dY[slot / k], Yp[r]>
//   dispatch_live_rows         rows[t] = t, or -1 for a token routed nowhere (ids[t·k] = kNoExpert):
//                              the gathered row list that keeps such tokens out of the shared
//                              experts' weight gradients
// Row indices read from device memory (sorted_rows, inverse) outside their valid range are
// treated as -1, so no launch reads or writes out of bounds whatever they hold.
#include "dispatch_map.cuh"
#include "dispatch_vec.cuh"

// ------------------------------------------------------------------------------------------
// dispatch_map_small: the whole routing map in one block (decode: T·k up to a few thousand).
// Launch: 1 block of MAP_THREADS; dynamic shared (MAP_WARPS + 1) * (L + 1) + L ints.
// Mapping: warp w ranks slots [w·span, (w+1)·span), span = ceil(T·k / MAP_WARPS) rounded up to 32,
// once in PRIORITY_ORDER (capacity >= 0 only: marks kept slots in inverse) and once in
// SOURCE_ORDER. Traffic: ids read 2-4 times (cached), inverse written twice, outputs once.
extern "C" __global__ void dispatch_map_small(const int* ids, int tokens, int k, int num_experts,
                                              int expert_begin, int local_experts, int align, int capacity,
                                              int sorted_len, int* counts, int* offsets, int* sorted_rows,
                                              int* inverse, int* status) {
  __shared__ int scratch[32];
  __shared__ int dropped;
  DYN_SHARED(int, shared);
  const MapShape m{ids, tokens, k, num_experts, expert_begin, local_experts};
  int* warp_counts = shared;
  int* totals = warp_counts + MAP_WARPS * m.buckets();
  int* group_offsets = totals + m.buckets();
  const i64 span = (i64(m.slots()) + MAP_WARPS * 32 - 1) / (MAP_WARPS * 32) * 32;
  i64 first, last;
  warp_range(0, m.slots(), span, first, last);
  if (threadIdx.x == 0) dropped = 0;
  if (capacity >= 0) {
    rank_in_warp(m, PRIORITY_ORDER, nullptr, first, last, warp_counts, inverse);
    __syncthreads();
    warp_prefix(m.buckets(), warp_counts, nullptr, totals);
    __syncthreads();
    place_slots(m, PRIORITY_ORDER, first, last, warp_counts, nullptr, capacity, sorted_len, nullptr, inverse);
    count_dropped(totals, local_experts, capacity, &dropped);
    __syncthreads();  // the kept flags in inverse are read by other threads below
  }
  rank_in_warp(m, SOURCE_ORDER, capacity >= 0 ? inverse : nullptr, first, last, warp_counts, inverse);
  __syncthreads();
  warp_prefix(m.buckets(), warp_counts, nullptr, totals);
  __syncthreads();
  write_offsets(totals, local_experts, align, counts, offsets, group_offsets, scratch);
  place_slots(m, SOURCE_ORDER, first, last, warp_counts, group_offsets, capacity, sorted_len, sorted_rows, inverse);
  mark_unused_rows(local_experts, counts, offsets, sorted_len, sorted_rows, threadIdx.x, blockDim.x);
  if (threadIdx.x == 0) {
    status[0] = dropped;
    status[1] = totals[local_experts];
  }
}
EMU_EXPORT(dispatch_map_small)

// ------------------------------------------------------------------------------------------
// dispatch_map_count: per-tile bucket counts, then (the last block to finish) their prefix.
// Launch: ceil(T·k / tile_slots) blocks of MAP_THREADS; dynamic shared (L + 1) ints; workspace
// [MAP_WORKSPACE_HEADER + blocks·(L + 1)] with workspace[0] = 0 (the last block resets it).
// Block b counts slots [b·tile_slots, (b+1)·tile_slots) of `order` (shared integer atomics; with
// `kept`, capacity-dropped slots are skipped) into workspace row b. The last block (a ticket
// after __threadfence) turns each bucket's column into its exclusive prefix over tiles, in tile
// order, then: PRIORITY_ORDER writes status[0] (capacity drops); SOURCE_ORDER writes counts,
// offsets, status[1] (invalid ids) and status[0] = 0 when capacity < 0.
// Traffic: ids once; workspace written once, read and rewritten once by the last block.
extern "C" __global__ void dispatch_map_count(const int* ids, int tokens, int k, int num_experts,
                                              int expert_begin, int local_experts, int align, int capacity,
                                              int order, int tile_slots, const int* kept, int* workspace,
                                              int* counts, int* offsets, int* status) {
  __shared__ int scratch[32];
  __shared__ int last_block;
  __shared__ int dropped;
  DYN_SHARED(int, hist);
  const MapShape m{ids, tokens, k, num_experts, expert_begin, local_experts};
  const int buckets = m.buckets();
  for (int b = threadIdx.x; b < buckets; b += blockDim.x) hist[b] = 0;
  __syncthreads();
  const i64 begin = i64(blockIdx.x) * tile_slots, end = min(i64(m.slots()), begin + tile_slots);
  for (i64 i = begin + threadIdx.x; i < end; i += blockDim.x) {
    const int bucket = m.bucket_of(m.slot_at(i, order), kept);
    if (bucket >= 0) atomicAdd(&hist[bucket], 1);
  }
  __syncthreads();
  int* tile_counts = workspace + MAP_WORKSPACE_HEADER;
  for (int b = threadIdx.x; b < buckets; b += blockDim.x) tile_counts[i64(blockIdx.x) * buckets + b] = hist[b];
  finish_count(m, order, align, capacity, gridDim.x, workspace, hist, scratch, &last_block, &dropped, counts, offsets,
               status);
}
EMU_EXPORT(dispatch_map_count)

// ------------------------------------------------------------------------------------------
// dispatch_map_rank: the stable placement of one tile, after dispatch_map_count in the same order.
// Launch: the same grid as dispatch_map_count; MAP_THREADS; dynamic shared MAP_WARPS·(L + 1) ints.
// Block b ranks its tile (place_tile: warp w owns tile_slots / MAP_WARPS consecutive slots),
// starting from the tile's prefix in the workspace, which it clears (place_tile).
// PRIORITY_ORDER: inverse[slot] = 0 kept / -1 dropped.
// SOURCE_ORDER (`filter`: read those flags first): sorted_rows and inverse, then the grid marks
// unused rows -1. Traffic: ids once, inverse written twice (scratch rank, then final), sorted_rows once.
extern "C" __global__ void dispatch_map_rank(const int* ids, int tokens, int k, int num_experts, int expert_begin,
                                             int local_experts, int capacity, int order, int tile_slots,
                                             int filter, int sorted_len, int* workspace, const int* counts,
                                             const int* offsets, int* sorted_rows, int* inverse) {
  DYN_SHARED(int, warp_counts);
  const MapShape m{ids, tokens, k, num_experts, expert_begin, local_experts};
  place_tile(m, order, capacity, tile_slots, blockIdx.x, filter != 0, sorted_len, workspace, offsets, warp_counts,
             sorted_rows, inverse);
  if (order == SOURCE_ORDER)
    mark_unused_rows(local_experts, counts, offsets, sorted_len, sorted_rows, global_thread_x(),
                     i64(gridDim.x) * blockDim.x);
}
EMU_EXPORT(dispatch_map_rank)

// ------------------------------------------------------------------------------------------
// Row movers. Rows of d elements; a "row group" of lanes_per_row threads (a power of two <= 256,
// chosen by the host from d) moves one row, rows_per_block = blockDim.x / lanes_per_row groups per
// block, grid-stride over rows. V = Vec<T>::N (16-byte accesses) or 1 (scalar fallback).

template <class T, int V>
__device__ __forceinline__ void permute_row(const T* src, T* dst, int d, int lane, int lanes) {
  for (int c = lane * V; c < d; c += lanes * V) {
    if constexpr (V == 1) {
      dst[c] = src ? src[c] : from_f32<T>(0.0f);
    } else {
      const Chunk v = src ? load_128(reinterpret_cast<const Chunk*>(src + c)) : zero_chunk();
      store_128(reinterpret_cast<Chunk*>(dst + c), v);
    }
  }
}

// One token's row to its destination rows (dests[j * stride], j < k; -1: none), lanes of a row
// group: each lane loads its chunks of the row once (none when the token has no destination) and
// stores each to the k destinations in j order.
template <class T, int V>
__device__ __forceinline__ void permute_token(const T* src, const int* dests, int stride, int k, int d, T* xp,
                                              int lane, int lanes) {
  bool routed = false;
  for (int j = 0; j < k; ++j) routed |= dests[j * stride] >= 0;
  if (!routed) return;
  for (int c = lane * V; c < d; c += lanes * V) {
    if constexpr (V == 1) {
      const T v = src[c];
      for (int j = 0; j < k; ++j)
        if (dests[j * stride] >= 0) xp[i64(dests[j * stride]) * d + c] = v;
    } else {
      const Chunk v = load_128(reinterpret_cast<const Chunk*>(src + c));
      for (int j = 0; j < k; ++j)
        if (dests[j * stride] >= 0) store_128(reinterpret_cast<Chunk*>(xp + i64(dests[j * stride]) * d + c), v);
    }
  }
}

// Token-major permute: block-strided over tokens, per_block = blockDim.x / lanes_per_row tokens
// a pass, one row group each. The block stages its tokens' destination rows (inverse, read once,
// coalesced; outside [0, rows): -1) in shared memory as staged[j * per_block + group] (a row
// group's reads are broadcasts, neighbouring groups' distinct banks), then each group moves its
// token (permute_token). A second block-strided pass over the rows stages whether sorted_rows
// holds a slot in [0, T·k) and zero-fills the rows that do not (padding, unused).
template <class T>
__device__ __forceinline__ void permute(const T* x, const int* inverse, const int* sorted_rows, i64 tokens, int k,
                                        int d, i64 rows, int lanes_per_row, T* xp, int* staged) {
  const int per_block = blockDim.x / lanes_per_row, lane = threadIdx.x % lanes_per_row;
  const int group = threadIdx.x / lanes_per_row;
  const bool vec = d % Vec<T>::N == 0 && aligned16(x) && aligned16(xp);
  for (i64 first = i64(blockIdx.x) * per_block; first < tokens; first += i64(gridDim.x) * per_block) {
    const int span = int(min(i64(per_block), tokens - first)) * k;
    __syncthreads();  // the previous pass's reads of staged are done
    for (int i = threadIdx.x; i < span; i += blockDim.x) {
      const int r = inverse[first * k + i];
      staged[(i % k) * per_block + i / k] = r >= 0 && r < rows ? r : -1;
    }
    __syncthreads();
    if (first + group < tokens) {
      const T* src = x + (first + group) * d;
      if (vec) permute_token<T, Vec<T>::N>(src, staged + group, per_block, k, d, xp, lane, lanes_per_row);
      else permute_token<T, 1>(src, staged + group, per_block, k, d, xp, lane, lanes_per_row);
    }
  }
  const i64 slots = tokens * k;
  for (i64 first = i64(blockIdx.x) * per_block; first < rows; first += i64(gridDim.x) * per_block) {
    const int span = int(min(i64(per_block), rows - first));
    __syncthreads();
    for (int i = threadIdx.x; i < span; i += blockDim.x) {
      const int slot = sorted_rows[first + i];
      staged[i] = slot >= 0 && slot < slots;
    }
    __syncthreads();
    if (group < span && !staged[group]) {
      T* dst = xp + (first + group) * d;
      if (vec) permute_row<T, Vec<T>::N>(nullptr, dst, d, lane, lanes_per_row);
      else permute_row<T, 1>(nullptr, dst, d, lane, lanes_per_row);
    }
  }
}

// dispatch_permute_<T>(x [T, d], inverse [T·k], sorted_rows [rows], T, k, d, rows, lanes_per_row,
// xp [rows, d]): Xp[inverse[t·k + j]] = X[t], and zeros in the rows whose sorted_rows entry is
// not a slot. inverse and sorted_rows are one routing map's (each row's slot is the slot whose
// row it is), so every row of xp is written once.
// Launch: any grid, blockDim.x a multiple of lanes_per_row; dynamic shared
// (blockDim.x / lanes_per_row) * k ints. Traffic: each routed X row read once (16-byte loads when
// d fills chunks and the rows are aligned), each output row written once, inverse and sorted_rows
// read once.
#define DISPATCH_PERMUTE(SUFFIX, T)                                                                      \
  extern "C" __global__ void dispatch_permute_##SUFFIX(const T* x, const int* inverse, const int* sorted_rows, \
                                                       long long tokens, int k, int d, long long rows,         \
                                                       int lanes_per_row, T* xp) {                             \
    DYN_SHARED(int, staged);                                                                                  \
    permute<T>(x, inverse, sorted_rows, tokens, k, d, rows, lanes_per_row, xp, staged);                     \
  }
DISPATCH_PERMUTE(f32, float)
EMU_EXPORT(dispatch_permute_f32)
DISPATCH_PERMUTE(f16, __half)
EMU_EXPORT(dispatch_permute_f16)
DISPATCH_PERMUTE(bf16, __nv_bfloat16)
EMU_EXPORT(dispatch_permute_bf16)

// One token's output row: y = sum_j w_j yp[inverse_j] (+ residual), f32, j in order; NaN when a
// slot not laid out has a NaN weight (a row routed nowhere: its output shows it).
template <class T, int V>
__device__ __forceinline__ void combine_row(const T* yp, const int* inverse, const float* weights,
                                            const T* residual, int k, int d, i64 yp_rows, T* y, int lane,
                                            int lanes) {
  for (int c = lane * V; c < d; c += lanes * V) {
    float acc[V], v[V];
    for (int i = 0; i < V; ++i) acc[i] = 0.0f;
    for (int j = 0; j < k; ++j) {
      const int r = inverse[j];
      const float w = weights ? weights[j] : 1.0f;
      if (r < 0 || r >= yp_rows) {  // dropped or not dispatched: contributes nothing ...
        if (w != w)                 // ... but routed nowhere (NaN weight) makes the row NaN
          for (int i = 0; i < V; ++i) acc[i] = w;
        continue;
      }
      load_f32<T, V>(v, yp + i64(r) * d + c);
      for (int i = 0; i < V; ++i) acc[i] += w * v[i];
    }
    if (residual) {
      load_f32<T, V>(v, residual + c);
      for (int i = 0; i < V; ++i) acc[i] += v[i];
    }
    store_f32<T, V>(y + c, acc);
  }
}

template <class T>
__device__ __forceinline__ void combine(const T* yp, const int* inverse, const float* weights, const T* residual,
                                        int tokens, int k, int d, i64 yp_rows, int lanes_per_row, T* y) {
  const int rows_per_block = blockDim.x / lanes_per_row, lane = threadIdx.x % lanes_per_row;
  const bool vec = d % Vec<T>::N == 0 && aligned16(yp) && aligned16(y) && (!residual || aligned16(residual));
  for (i64 t = i64(blockIdx.x) * rows_per_block + threadIdx.x / lanes_per_row; t < tokens;
       t += i64(gridDim.x) * rows_per_block) {
    const int* inv = inverse + t * k;
    const float* w = weights ? weights + t * k : nullptr;
    const T* res = residual ? residual + t * d : nullptr;
    if (vec) combine_row<T, Vec<T>::N>(yp, inv, w, res, k, d, yp_rows, y + t * d, lane, lanes_per_row);
    else combine_row<T, 1>(yp, inv, w, res, k, d, yp_rows, y + t * d, lane, lanes_per_row);
  }
}

// dispatch_combine_<T>(yp [yp_rows, d], inverse [T, k], weights [T, k] or null, residual [T, d] or
// null, tokens, k, d, yp_rows, lanes_per_row, y [T, d])
// Launch: any grid, blockDim.x a multiple of lanes_per_row. Traffic: Y written once; each kept
// slot's Yp row read once; residual, inverse and weights once.
#define DISPATCH_COMBINE(SUFFIX, T)                                                                          \
  extern "C" __global__ void dispatch_combine_##SUFFIX(const T* yp, const int* inverse, const float* weights, \
                                                       const T* residual, int tokens, int k, int d,            \
                                                       long long yp_rows, int lanes_per_row, T* y) {          \
    combine<T>(yp, inverse, weights, residual, tokens, k, d, yp_rows, lanes_per_row, y);                    \
  }
DISPATCH_COMBINE(f32, float)
EMU_EXPORT(dispatch_combine_f32)
DISPATCH_COMBINE(f16, __half)
EMU_EXPORT(dispatch_combine_f16)
DISPATCH_COMBINE(bf16, __nv_bfloat16)
EMU_EXPORT(dispatch_combine_bf16)

// One dispatched row of the combine backward, lanes of one warp: dyp = w·dy, and (yp given) the
// lane's part of <dy, yp> in column order.
template <class T, int V>
__device__ __forceinline__ float combine_bwd_row(const T* dy, const T* yp, float w, int d, T* dyp, int lane) {
  float dot = 0.0f;
  for (int c = lane * V; c < d; c += 32 * V) {
    float g[V], v[V];
    load_f32<T, V>(g, dy + c);
    if (yp) {
      load_f32<T, V>(v, yp + c);
      for (int i = 0; i < V; ++i) dot += g[i] * v[i];
    }
    for (int i = 0; i < V; ++i) g[i] *= w;
    store_f32<T, V>(dyp + c, g);
  }
  return dot;
}

template <class T>
__device__ __forceinline__ void combine_bwd(const T* dy, const T* yp, const int* sorted_rows, const int* inverse,
                                            const float* weights, int slots, int k, int d, i64 rows, T* dyp,
                                            float* dw) {
  const int lane = threadIdx.x % 32, warps = blockDim.x / 32;
  const bool vec = d % Vec<T>::N == 0 && aligned16(dy) && aligned16(dyp) && (!yp || aligned16(yp));
  for (i64 r = i64(blockIdx.x) * warps + threadIdx.x / 32; r < rows; r += i64(gridDim.x) * warps) {
    const int slot = sorted_rows[r];
    if (slot < 0 || slot >= slots) {  // padding: no gradient
      if (vec) permute_row<T, Vec<T>::N>(nullptr, dyp + r * d, d, lane, 32);
      else permute_row<T, 1>(nullptr, dyp + r * d, d, lane, 32);
      continue;
    }
    const T* g = dy + i64(slot / k) * d;
    const T* y = dw ? yp + r * d : nullptr;
    const float w = weights ? weights[slot] : 1.0f;
    float dot = vec ? combine_bwd_row<T, Vec<T>::N>(g, y, w, d, dyp + r * d, lane)
                    : combine_bwd_row<T, 1>(g, y, w, d, dyp + r * d, lane);
    for (int o = 16; o > 0; o /= 2) dot += __shfl_xor_sync(0xffffffffu, dot, o);  // fixed butterfly
    if (dw && lane == 0) dw[slot] = dot;
  }
  if (!dw) return;
  for (i64 s = global_thread_x(); s < slots; s += i64(gridDim.x) * blockDim.x) {
    const int r = inverse[s];
    if (r < 0 || r >= rows) dw[s] = 0.0f;  // dropped or not dispatched: the weight had no effect
  }
}

// dispatch_combine_bwd_<T>(dy [T, d], yp [rows, d] or null, sorted_rows [rows], inverse [T·k],
// weights [T·k] or null, slots = T·k, k, d, rows, dyp [rows, d], dw [T·k] or null (with yp))
// Launch: any grid, blockDim.x a multiple of 32; one warp per dispatched row. Traffic: dYp written
// once, Yp read once, dY read once per kept slot, dw written once.
#define DISPATCH_COMBINE_BWD(SUFFIX, T)                                                                        \
  extern "C" __global__ void dispatch_combine_bwd_##SUFFIX(const T* dy, const T* yp, const int* sorted_rows,  \
                                                           const int* inverse, const float* weights, int slots, \
                                                           int k, int d, long long rows, T* dyp, float* dw) {  \
    combine_bwd<T>(dy, yp, sorted_rows, inverse, weights, slots, k, d, rows, dyp, dw);                        \
  }
DISPATCH_COMBINE_BWD(f32, float)
EMU_EXPORT(dispatch_combine_bwd_f32)
DISPATCH_COMBINE_BWD(f16, __half)
EMU_EXPORT(dispatch_combine_bwd_f16)
DISPATCH_COMBINE_BWD(bf16, __nv_bfloat16)
EMU_EXPORT(dispatch_combine_bwd_bf16)

// ------------------------------------------------------------------------------------------
// dispatch_live_rows(ids [T, k], tokens, k, rows [T]): rows[t] = t, or -1 when the router routed
// token t nowhere (a non-finite row: all its ids are kNoExpert, so its first one is). A GEMM
// that gathers its rows through `rows` sees such a token as padding (zeros), which keeps it out
// of the sums over tokens of the shared experts' weight gradients.
// Launch: any grid, any block; grid-stride. Traffic: one id read and one int written per token.
extern "C" __global__ void dispatch_live_rows(const int* ids, int tokens, int k, int* rows) {
  for (i64 t = global_thread_x(); t < tokens; t += i64(gridDim.x) * blockDim.x)
    rows[t] = ids[t * k] == kNoExpert ? -1 : int(t);
}
EMU_EXPORT(dispatch_live_rows)
