// dispatch_map.cuh: the pieces of the routing map's stable counting sort (kernels/dispatch.cu).
//
// Slots s = t·k + j are visited in one of two orders:
//   SOURCE_ORDER    s = 0, 1, 2, ...                     (the order rows are laid out in)
//   PRIORITY_ORDER  all j = 0 by token, then j = 1, ...  (the order capacity keeps slots in)
// Each slot falls in a bucket: 0..L-1 its local expert, L an id outside [0, E) other than
// kNoExpert (counted, never laid out), or -1 (kNoExpert: routed nowhere; another rank's expert;
// or a slot capacity dropped: not dispatched here).
//
// A block ranks a tile of slots stably in three phases, each warp owning a contiguous part:
//   1. rank_in_warp: 32 slots at a time, lanes with the same bucket find each other with one
//      ballot per key bit; a slot's rank is its warp's running count for the bucket plus the
//      peers on lower lanes. The rank goes to inverse[slot] (scratch until phase 3).
//   2. warp_prefix: per bucket, the warps' counts become exclusive prefixes in warp order,
//      starting from a base (the ranks that earlier tiles hold).
//   3. place_slots: rank = warp prefix + rank within the warp, in the visiting order; nothing
//      but the slot order decides a rank (integer atomics only ever count).
#pragma once
#include "common.cuh"

constexpr int MAP_THREADS = 256;  // blockDim.x of every map kernel
constexpr int MAP_WARPS = MAP_THREADS / 32;
// Ints before the per-tile counts: [0] the count's done-ticket; [1, 1 + MAP_BLOCK_TICKETS) the
// tickets of a fused scoring kernel's token blocks (gate_decode_route_linear_<dtype>_e<N>, at
// most 4 blocks of 16 tokens). Every ticket is 0 after every launch (its last taker resets it).
constexpr int MAP_WORKSPACE_HEADER = 8;
constexpr int MAP_BLOCK_TICKETS = 4;
static_assert(1 + MAP_BLOCK_TICKETS <= MAP_WORKSPACE_HEADER, "the tickets fit the header");

enum SlotOrder : int { SOURCE_ORDER = 0, PRIORITY_ORDER = 1 };

// The routing problem as the kernels see it. slots() < 2^31 (the wrapper checks T·k).
struct MapShape {
  const int* ids;  // [T, k]
  int tokens, k, num_experts, expert_begin, local_experts;

  __device__ __forceinline__ int slots() const { return tokens * k; }
  __device__ __forceinline__ int buckets() const { return local_experts + 1; }
  // The slot visited i-th (0 <= i < slots()) in `order`.
  __device__ __forceinline__ int slot_at(i64 i, int order) const {
    if (order == SOURCE_ORDER) return int(i);
    const int j = int(i / tokens), t = int(i - i64(j) * tokens);
    return t * k + j;
  }
  // The bucket of `slot`; with `kept` (the capacity pass's flags), a local slot whose flag is
  // negative was dropped and gets -1, as does kNoExpert.
  __device__ __forceinline__ int bucket_of(int slot, const int* kept) const {
    const int id = ids[slot];
    if (id == kNoExpert) return -1;
    if (id < 0 || id >= num_experts) return local_experts;
    const int local = id - expert_begin;
    if (local < 0 || local >= local_experts || (kept && kept[slot] < 0)) return -1;
    return local;
  }
};

// Counting pass, per slot: one integer atomic into the row of the slot's tile (tiles of
// tile_slots consecutive slots in SOURCE_ORDER) of the zeroed per-tile counts. Any thread of any
// kernel that knows the slot's id can call it: the order of the atomics never matters.
__device__ __forceinline__ void count_slot(const MapShape& m, int slot, int tile_slots, int* tile_counts) {
  const int bucket = m.bucket_of(slot, nullptr);
  if (bucket >= 0) atomicAdd(&tile_counts[i64(slot / tile_slots) * m.buckets() + bucket], 1);
}

// The lanes of this warp whose key equals this lane's (keys < 2^bits). All 32 lanes call it.
__device__ __forceinline__ unsigned warp_peers(unsigned key, int bits) {
  unsigned peers = 0xffffffffu;
  for (int b = 0; b < bits; ++b) {
    const unsigned set = __ballot_sync(0xffffffffu, (key >> b) & 1u);
    peers &= ((key >> b) & 1u) ? set : ~set;
  }
  return peers;
}

// Bits of the largest ballot key (bucket + 1, at most buckets()).
__device__ __forceinline__ int key_bits(const MapShape& m) { return 32 - __clz(m.buckets()); }

// The part of the visiting range [begin, end) that warp w owns: `span` slots (a multiple of 32).
__device__ __forceinline__ void warp_range(i64 begin, i64 end, i64 span, i64& first, i64& last) {
  first = min(end, begin + i64(threadIdx.x / 32) * span);
  last = min(end, first + span);
}

// Phase 1: each warp counts its slots [first, last) per bucket into its row of warp_counts
// ([MAP_WARPS][buckets], shared) and leaves each local slot's rank within the warp in
// inverse[slot]; slots not laid out get -1. The whole warp calls it.
__device__ __forceinline__ void rank_in_warp(const MapShape& m, int order, const int* kept, i64 first,
                                             i64 last, int* warp_counts, int* inverse) {
  const int lane = threadIdx.x % 32, bits = key_bits(m);
  int* counts = warp_counts + (threadIdx.x / 32) * m.buckets();
  for (int b = lane; b < m.buckets(); b += 32) counts[b] = 0;
  __syncwarp();
  const unsigned lower_lanes = (1u << lane) - 1u;
  for (i64 chunk = first; chunk < last; chunk += 32) {
    const int slot = chunk + lane < last ? m.slot_at(chunk + lane, order) : -1;
    const int bucket = slot >= 0 ? m.bucket_of(slot, kept) : -1;
    const unsigned peers = warp_peers(unsigned(bucket + 1), bits);
    const int rank = bucket >= 0 ? counts[bucket] + __popc(peers & lower_lanes) : -1;
    __syncwarp();  // every lane has read its count before the lowest peer advances it
    if (bucket >= 0 && (peers & lower_lanes) == 0) counts[bucket] += __popc(peers);
    __syncwarp();
    if (slot >= 0) inverse[slot] = bucket < m.local_experts ? rank : -1;
  }
}

// Phase 2 (after a __syncthreads): per bucket, warp_counts becomes base[b] (0 without a base)
// plus the counts of the earlier warps; totals[b] (if given) gets the tile's count.
__device__ __forceinline__ void warp_prefix(int buckets, int* warp_counts, const int* base, int* totals) {
  for (int b = threadIdx.x; b < buckets; b += blockDim.x) {
    const int start = base ? base[b] : 0;
    int running = start;
    for (int w = 0; w < MAP_WARPS; ++w) {
      const int c = warp_counts[w * buckets + b];
      warp_counts[w * buckets + b] = running;
      running += c;
    }
    if (totals) totals[b] = running - start;
  }
}

// Phase 3 (after a __syncthreads): the same slots as phase 1, by the same threads. A slot's rank
// in its bucket is final here. PRIORITY_ORDER: inverse[slot] = 0 if the rank is below capacity
// (kept), -1 if not. SOURCE_ORDER: the slot goes to row group_offsets[bucket] + rank, which is
// below sorted_len whenever the counts came from these ids; a row outside [0, sorted_len) (counts
// left by other ids: a misused counted map) is not written and the slot gets -1.
__device__ __forceinline__ void place_slots(const MapShape& m, int order, i64 first, i64 last,
                                            const int* warp_counts, const int* group_offsets, int capacity,
                                            int sorted_len, int* sorted_rows, int* inverse) {
  const int* counts = warp_counts + (threadIdx.x / 32) * m.buckets();
  for (i64 i = first + threadIdx.x % 32; i < last; i += 32) {
    const int slot = m.slot_at(i, order);
    const int within = inverse[slot];
    if (within < 0) continue;
    const int bucket = m.bucket_of(slot, nullptr);  // local: phase 1 ranked it
    const int rank = counts[bucket] + within;
    if (order == PRIORITY_ORDER) {
      inverse[slot] = rank < capacity ? 0 : -1;
    } else {
      const i64 row = i64(group_offsets[bucket]) + rank;
      const bool inside = row >= 0 && row < sorted_len;
      if (inside) sorted_rows[row] = slot;
      inverse[slot] = inside ? int(row) : -1;
    }
  }
}

// counts = totals[0..L), offsets = exclusive prefix of each count rounded up to `align`,
// offsets[L] = the padded total; group_offsets (shared, optional) gets a copy of offsets[0..L).
// The whole block calls it (scratch: 32 shared ints); it ends with a __syncthreads.
__device__ __forceinline__ void write_offsets(const int* totals, int local_experts, int align, int* counts,
                                              int* offsets, int* group_offsets, int* scratch) {
  const int per_thread = (local_experts + blockDim.x - 1) / blockDim.x;
  const int first = min(local_experts, int(threadIdx.x) * per_thread);
  const int last = min(local_experts, first + per_thread);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
  int sum = 0;
  for (int b = first; b < last; ++b) sum += (totals[b] + align - 1) / align * align;
  int inclusive = sum;
  for (int o = 1; o < 32; o *= 2) {
    const int v = __shfl_up_sync(0xffffffffu, inclusive, o);
    if (lane >= o) inclusive += v;
  }
  if (lane == 31) scratch[warp] = inclusive;
  __syncthreads();
  if (warp == 0) {
    int w = lane < warps ? scratch[lane] : 0;
    for (int o = 1; o < 32; o *= 2) {
      const int v = __shfl_up_sync(0xffffffffu, w, o);
      if (lane >= o) w += v;
    }
    scratch[lane] = w;  // inclusive prefix over warps
  }
  __syncthreads();
  int running = inclusive - sum + (warp > 0 ? scratch[warp - 1] : 0);
  for (int b = first; b < last; ++b) {
    counts[b] = totals[b];
    offsets[b] = running;
    if (group_offsets) group_offsets[b] = running;
    running += (totals[b] + align - 1) / align * align;
  }
  if (threadIdx.x == blockDim.x - 1) offsets[local_experts] = running;
  __syncthreads();
}

// A value another block of this launch wrote before taking its ticket: read from L2 (never a
// stale L1 line). On the emulator memory is coherent and the ticket's fences order the access.
__device__ __forceinline__ int load_l2(const int* p) {
#ifdef __CUDACC__
  return __ldcg(p);
#else
  return *p;
#endif
}

// The last block of dispatch_map_count: each bucket's column of per-tile counts
// (tile_counts[tile * buckets + b]) becomes its exclusive prefix in tile order, and totals[b] the
// column's sum. A thread per bucket walks the tiles in batches, the loads of a batch in flight
// together (a dependent load per tile would cost a full L2 round trip each).
__device__ __forceinline__ void prefix_over_tiles(int* tile_counts, int buckets, int tiles, int* totals) {
  constexpr int BATCH = 8;
  for (int b = threadIdx.x; b < buckets; b += blockDim.x) {
    int running = 0;
    for (int first = 0; first < tiles; first += BATCH) {
      int c[BATCH];
      for (int i = 0; i < BATCH; ++i)
        c[i] = first + i < tiles ? load_l2(tile_counts + i64(first + i) * buckets + b) : 0;
      for (int i = 0; i < BATCH && first + i < tiles; ++i) {
        tile_counts[i64(first + i) * buckets + b] = running;
        running += c[i];
      }
    }
    totals[b] = running;
  }
}

// Slots dropped by capacity: sum over local experts of max(0, total - capacity), added to
// *dropped (shared) by integer atomics. The whole block calls it.
__device__ __forceinline__ void count_dropped(const int* totals, int local_experts, int capacity, int* dropped) {
  int mine = 0;
  for (int b = threadIdx.x; b < local_experts; b += blockDim.x) mine += max(0, totals[b] - capacity);
  if (mine) atomicAdd(dropped, mine);
}

// A ticket taken by `arrivals` blocks, every thread of each calling it once the block's global
// writes are done: true (in every thread) in the last block to arrive, which then sees the
// writes of every block before it (each fences before its ticket, the last one after). The last
// block resets *ticket to 0 once it no longer needs it. `flag`: one shared int of the caller.
__device__ __forceinline__ bool last_to_arrive(int* ticket, int arrivals, int* flag) {
  __threadfence();  // this block's writes are visible before its ticket
  __syncthreads();
  if (threadIdx.x == 0) *flag = atomicAdd(ticket, 1) == arrivals - 1;
  __syncthreads();
  const bool last = *flag != 0;
  if (last) __threadfence();
  return last;
}

// The end of a counting pass, in the one block that holds every block's counts (the last to
// arrive, or a kernel's only counting block): turns each bucket's column of per-tile counts into
// its exclusive prefix in tile order (prefix_over_tiles), then: PRIORITY_ORDER writes status[0]
// (capacity drops); SOURCE_ORDER writes counts, offsets, status[1] (invalid ids) and status[0] =
// 0 when capacity < 0. It resets the done-ticket workspace[0]. Shared memory, all from the
// calling kernel: totals (buckets ints), scratch (32 ints) and dropped (one int).
// `tiles`: rows of per-tile counts (the caller's grid may have more blocks than tiles).
__device__ __forceinline__ void complete_count(const MapShape& m, int order, int align, int capacity, int tiles,
                                               int* workspace, int* totals, int* scratch, int* dropped, int* counts,
                                               int* offsets, int* status) {
  if (threadIdx.x == 0) *dropped = 0;
  const int local_experts = m.local_experts;
  int* tile_counts = workspace + MAP_WORKSPACE_HEADER;
  prefix_over_tiles(tile_counts, m.buckets(), tiles, totals);
  __syncthreads();
  if (order == PRIORITY_ORDER) {
    count_dropped(totals, local_experts, capacity, dropped);
    __syncthreads();
    if (threadIdx.x == 0) status[0] = *dropped;
  } else {
    write_offsets(totals, local_experts, align, counts, offsets, nullptr, scratch);
    if (threadIdx.x == 0) {
      status[1] = totals[local_experts];
      if (capacity < 0) status[0] = 0;
    }
  }
  if (threadIdx.x == 0) workspace[0] = 0;  // every block has taken its ticket
}

// The end of a counting pass whose every block counted: every thread of every block calls it
// once its block's counts are in the workspace (plain stores or count_slot atomics); the last
// block to take the done-ticket completes the count (complete_count). `last_block`: one shared
// int, besides complete_count's shared memory.
__device__ __forceinline__ void finish_count(const MapShape& m, int order, int align, int capacity, int tiles,
                                             int* workspace, int* totals, int* scratch, int* last_block, int* dropped, int* counts,
                                             int* offsets, int* status) {
  if (!last_to_arrive(&workspace[0], int(gridDim.x * gridDim.y * gridDim.z), last_block)) return;
  complete_count(m, order, align, capacity, tiles, workspace, totals, scratch, dropped, counts, offsets, status);
}

// Rows of sorted_rows that hold no slot (each group's padding, and everything after the last
// group up to the buffer's length) become -1; threads first, first + stride, ... share them.
// Rows are clamped to [0, sorted_len) whatever offsets and counts hold.
__device__ __forceinline__ void mark_unused_rows(int local_experts, const int* counts, const int* offsets,
                                                 int sorted_len, int* sorted_rows, i64 first, i64 stride) {
  for (i64 b = first; b < local_experts; b += stride)
    for (int r = max(0, offsets[b] + counts[b]); r < min(offsets[b + 1], sorted_len); ++r) sorted_rows[r] = -1;
  for (i64 r = max(0, offsets[local_experts]) + first; r < sorted_len; r += stride) sorted_rows[r] = -1;
}

// The stable placement of tile `tile` (slots [tile·tile_slots, (tile+1)·tile_slots) of `order`)
// by the whole block (MAP_THREADS threads; warp w owns tile_slots / MAP_WARPS consecutive slots),
// from the tile's prefix in the workspace: phases 1-3 above (`filter`: read the capacity pass's
// kept flags from inverse first). warp_counts: MAP_WARPS·(L + 1) shared ints. A block that
// places several tiles separates them with a __syncthreads.
// The tile's prefix is cleared once read (each thread clears the buckets it read), so a map
// whose every tile is placed leaves its workspace zeroed (the tickets reset themselves): the
// next count on it needs no memset. Placing a tile consumes its count.
__device__ __forceinline__ void place_tile(const MapShape& m, int order, int capacity, int tile_slots, int tile,
                                           bool filter, int sorted_len, int* workspace, const int* offsets,
                                           int* warp_counts, int* sorted_rows, int* inverse) {
  const i64 begin = i64(tile) * tile_slots, end = min(i64(m.slots()), begin + tile_slots);
  i64 first, last;
  warp_range(begin, end, tile_slots / MAP_WARPS, first, last);
  rank_in_warp(m, order, filter ? inverse : nullptr, first, last, warp_counts, inverse);
  __syncthreads();
  int* tile_prefix = workspace + MAP_WORKSPACE_HEADER + i64(tile) * m.buckets();
  warp_prefix(m.buckets(), warp_counts, tile_prefix, nullptr);
  for (int b = threadIdx.x; b < m.buckets(); b += blockDim.x) tile_prefix[b] = 0;
  __syncthreads();
  place_slots(m, order, first, last, warp_counts, offsets, capacity, sorted_len, sorted_rows, inverse);
}
