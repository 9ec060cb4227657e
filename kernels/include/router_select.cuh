// router_select.cuh: top-k selection of rows held in registers, and the k combine weights,
// shared by the selection kernels and the backward (router.cu). select_row is the whole
// per-row selection: a scoring kernel that produces rows of logits can call it to fuse.
//
// Lanes of a row (RowLanes<L>): a row belongs to L consecutive lanes of a warp (L a power of
// two, 32 / L rows per warp). The reference mapping is one warp per row (L = 32); with L < 32,
// lane p = lane % L of a row stands in for the V = 32 / L "virtual lanes" v = p + L*j (j < V) of
// that mapping: it holds their slots and does their work. Every float sum runs that mapping's
// butterfly over the 32 virtual lanes, its steps between virtual lanes of one lane (xor masks
// >= L) as register adds and the rest (masks < L) as shuffles, so sums and weights have the same
// bits at every L; the maxima (floats and packed integer candidates) have no order to keep.
//
// Register layout of virtual lane v (SlotLayout): VPL slots. Scalar layout: slot s is element
// 32*s + v. Vector layout (E % 4 == 0, 16-byte aligned rows, VPL % 4 == 0): slot s is element
// 128*(s/4) + 4*v + s%4, so each lane loads 16 bytes at a time. A lane's array index i is
// slot i % VPL of its virtual lane i / VPL.
#pragma once
#include "router_row.cuh"

enum ScoreFunction : int { kSoftmax = 0, kSigmoid = 1, kNone = 2 };

// The routing options of math §2 that shape the weights (RouterConfig in src/ops/router).
struct SelectOptions {
  int score;         // ScoreFunction
  bool topk_first;   // topk_then_softmax (score must be kSoftmax)
  bool renormalize;  // divide the k weights by their sum + 1e-20
  float scale;       // multiplies the final weights
};

struct SlotLayout {
  bool vec;
  __device__ __forceinline__ int element(int slot, int lane) const {
    return vec ? (slot >> 2) * 128 + lane * 4 + (slot & 3) : slot * kWarp + lane;
  }
};

// The lanes of one row: L consecutive lanes of a warp, lane p standing in for the virtual lanes
// p + L*j of the warp-per-row mapping (see the header). All reductions are warp-collective: every
// lane of the warp calls them, each row's lanes get their row's result.
template <int L>
struct RowLanes {
  static_assert(L >= 1 && L <= kWarp && (L & (L - 1)) == 0, "a power of two up to a warp");
  static constexpr int V = kWarp / L;
  __device__ __forceinline__ static int virtual_lane(int j) { return int(threadIdx.x % L) + L * j; }
  // Whether pred holds on a lane of this row (one ballot).
  __device__ __forceinline__ static bool any(bool pred) {
    const unsigned ballot = __ballot_sync(kFullMask, pred);
    if constexpr (L == kWarp) return ballot != 0u;
    else return ((ballot >> (threadIdx.x % kWarp & ~unsigned(L - 1))) & ((1u << L) - 1u)) != 0u;
  }
  // The warp-per-row butterfly sum of the 32 virtual lanes' values (a[j]: virtual lane p + L*j),
  // bit for bit: masks 16 .. L inside the lane, then log2(L) shuffles.
  __device__ __forceinline__ static float sum(const float (&a)[V]) {
    float t[V];
#pragma unroll
    for (int j = 0; j < V; ++j) t[j] = a[j];
    fold<V / 2>(t);
    float v = t[0];
#pragma unroll
    for (int m = L / 2; m > 0; m >>= 1) v += __shfl_xor_sync(kFullMask, v, m);
    return v;
  }
  // t[j] += t[j + H] for j < H, then H / 2, ...: the butterfly steps inside a lane.
  template <int H>
  __device__ __forceinline__ static void fold(float (&t)[V]) {
    if constexpr (H > 0) {
#pragma unroll
      for (int j = 0; j < H; ++j) t[j] += t[j + H];
      fold<H / 2>(t);
    }
  }
  __device__ __forceinline__ static float max(float v) {
#pragma unroll
    for (int m = L / 2; m > 0; m >>= 1) v = fmaxf(v, __shfl_xor_sync(kFullMask, v, m));
    return v;
  }
  __device__ __forceinline__ static unsigned long long max_u64(unsigned long long v) {
#pragma unroll
    for (int m = L / 2; m > 0; m >>= 1) {
      const unsigned long long other = __shfl_xor_sync(kFullMask, v, m);
      v = other > v ? other : v;
    }
    return v;
  }
};

// v[i] = row[element of i] for elements < E, else 0 (i = j*VPL + s: slot s of virtual lane j).
template <int VPL, int L>
__device__ __forceinline__ void load_slots(float (&v)[RowLanes<L>::V * VPL], const float* row, int E,
                                           SlotLayout layout) {
#pragma unroll
  for (int j = 0; j < RowLanes<L>::V; ++j) {
    const int lane = RowLanes<L>::virtual_lane(j);
    if constexpr (VPL % 4 == 0) {
      if (layout.vec) {
#pragma unroll
        for (int q = 0; q < VPL / 4; ++q) {
          const int e = layout.element(4 * q, lane);
          const float4 x = e < E ? load_128(reinterpret_cast<const float4*>(row + e)) : make_float4(0.f, 0.f, 0.f, 0.f);
          v[j * VPL + 4 * q] = x.x;
          v[j * VPL + 4 * q + 1] = x.y;
          v[j * VPL + 4 * q + 2] = x.z;
          v[j * VPL + 4 * q + 3] = x.w;
        }
        continue;
      }
    }
#pragma unroll
    for (int s = 0; s < VPL; ++s) {
      const int e = layout.element(s, lane);
      v[j * VPL + s] = e < E ? row[e] : 0.0f;
    }
  }
}

__device__ __forceinline__ float sigmoid(float z) { return 1.0f / (1.0f + expf(-z)); }

// The score selection ranks, before the bias: the softmax probability (softmax_then_topk), the
// logit (topk_then_softmax and `none`) or its sigmoid. For a softmax a -inf logit scores 0 and
// NaN / +inf keep themselves, so they keep their rank in a non-finite row.
__device__ __forceinline__ float selection_score(const SelectOptions& o, const RowSoftmax& s, float z) {
  if (o.score == kSigmoid) return sigmoid(z);
  if (o.score == kNone || o.topk_first) return z;
  if (z > -INFINITY && z < INFINITY) return expf(z - s.max) / s.sum;
  return z == -INFINITY ? 0.0f : z;
}

// What the weights of the k selected slots are made of (lanes < k hold one each).
struct SelectedWeights {
  float score;       // unbiased score of this slot: p, sigmoid(z) or z (0 when inactive)
  float denom;       // renormalization denominator (sum of the k scores + 1e-20), or 1
  float normalized;  // the weight before `scale`
};

// The weights of the selected logits z[j] (virtual lane j holds slot p + L*j of the k; active[j]
// when that slot exists): all 0 for a non-finite row (whose written weights select_row replaces
// by NaN; the backward sees the zero); topk_then_softmax: a softmax over the k logits (0 when they
// are all -inf); otherwise the score, divided by the k scores' sum + 1e-20 with renormalize.
// Sums as RowLanes<L>::sum: the same bits at every L. Warp-collective: all lanes call it.
template <int L>
__device__ __forceinline__ void selected_weights(const SelectOptions& o, const RowSoftmax& s,
                                                 const float (&z)[RowLanes<L>::V],
                                                 const bool (&active)[RowLanes<L>::V],
                                                 SelectedWeights (&w)[RowLanes<L>::V]) {
  using Row = RowLanes<L>;
  // No early return for a non-finite row: its lanes share warps with other rows' lanes, and
  // every sum below is a full-warp shuffle all of them must reach. Its weights are set last.
  float terms[Row::V];
  if (o.score == kSoftmax && o.topk_first) {
    float top = -INFINITY;
#pragma unroll
    for (int j = 0; j < Row::V; ++j) top = fmaxf(top, active[j] ? z[j] : -INFINITY);
    top = Row::max(top);
#pragma unroll
    for (int j = 0; j < Row::V; ++j) terms[j] = (active[j] && top > -INFINITY) ? expf(z[j] - top) : 0.0f;
    const float denom = Row::sum(terms);
#pragma unroll
    for (int j = 0; j < Row::V; ++j)
      w[j] = SelectedWeights{terms[j], denom, terms[j] > 0.0f ? terms[j] / denom : 0.0f};
  } else {
#pragma unroll
    for (int j = 0; j < Row::V; ++j) {
      terms[j] = !active[j] ? 0.0f
                 : o.score == kSigmoid ? sigmoid(z[j])
                 : o.score == kNone    ? z[j]
                                       : row_softmax_prob(s, z[j]);
      w[j] = SelectedWeights{terms[j], 1.0f, terms[j]};
    }
    if (o.renormalize) {
      const float denom = Row::sum(terms) + kRenormEpsilon;
#pragma unroll
      for (int j = 0; j < Row::V; ++j) w[j] = SelectedWeights{terms[j], denom, terms[j] / denom};
    }
  }
  if (s.nonfinite) {
#pragma unroll
    for (int j = 0; j < Row::V; ++j) w[j] = SelectedWeights{0.0f, 1.0f, 0.0f};
  }
}

// selected_weights in the warp-per-row mapping: one slot per lane (lanes < k active).
__device__ __forceinline__ SelectedWeights selected_weights(const SelectOptions& o, const RowSoftmax& s, float z,
                                                            bool active) {
  const float zs[1] = {z};
  const bool actives[1] = {active};
  SelectedWeights w[1];
  selected_weights<kWarp>(o, s, zs, actives, w);
  return w[0];
}

// The element this lane's array index i (slot i % VPL of virtual lane i / VPL) holds.
template <int VPL, int L>
__device__ __forceinline__ int slot_element(SlotLayout layout, int i) {
  return layout.element(i % VPL, RowLanes<L>::virtual_lane(i / VPL));
}

// f(i) for each of this lane's array indices, in increasing element order: scalar layout by
// (slot, virtual lane), vector layout by (slot / 4, virtual lane, slot % 4). A strict > over
// that order keeps the lower element of equal keys.
template <int VPL, int L, class F>
__device__ __forceinline__ void for_slots_in_element_order(SlotLayout layout, F&& f) {
  constexpr int V = RowLanes<L>::V;
  if constexpr (VPL % 4 == 0) {
    if (layout.vec) {
#pragma unroll
      for (int q = 0; q < VPL / 4; ++q)
#pragma unroll
        for (int j = 0; j < V; ++j)
#pragma unroll
          for (int c = 0; c < 4; ++c) f(j * VPL + 4 * q + c);
      return;
    }
  }
#pragma unroll
  for (int s = 0; s < VPL; ++s)
#pragma unroll
    for (int j = 0; j < V; ++j) f(j * VPL + s);
}

// Group-limited routing: zeroes the keys outside the topk_groups best groups. A group's score is
// the sum of its two best keys' values (its one value when a group has one expert), ranked like
// keys (NaN lowest, ties to the lower group). Per group: each lane's best two keys in the group,
// merged over the row's lanes in log2(L) steps (two independent shuffles each); the exact top two
// of the group whatever the order, so the score has the same bits at every L. Group g's key sits
// in virtual lane g (groups <= 32), and topk_groups rounds of argmax over (key, group) pick them.
template <int VPL, int L>
__device__ __forceinline__ void keep_best_groups(unsigned (&key)[RowLanes<L>::V * VPL], int E, int groups,
                                                 int topk_groups, SlotLayout layout) {
  using Row = RowLanes<L>;
  constexpr int P = Row::V * VPL;
  const int size = E / groups;
  unsigned group_key[Row::V] = {};
  for (int g = 0; g < groups; ++g) {
    unsigned best = 0u, second = 0u;
#pragma unroll
    for (int i = 0; i < P; ++i) {
      const int e = slot_element<VPL, L>(layout, i);
      if (e >= g * size && e < (g + 1) * size) {
        if (key[i] > best) {
          second = best;
          best = key[i];
        } else if (key[i] > second) {
          second = key[i];
        }
      }
    }
#pragma unroll
    for (int m = L / 2; m > 0; m >>= 1) {
      const unsigned other_best = __shfl_xor_sync(kFullMask, best, m);
      const unsigned other_second = __shfl_xor_sync(kFullMask, second, m);
      second = max(min(best, other_best), max(second, other_second));
      best = max(best, other_best);
    }
    const float score = rank_value(best) + (second != 0u ? rank_value(second) : 0.0f);
#pragma unroll
    for (int j = 0; j < Row::V; ++j)
      if (Row::virtual_lane(j) == g) group_key[j] = rank_key(score);
  }
  unsigned chosen = 0u;
  for (int r = 0; r < topk_groups; ++r) {
    unsigned long long mine = 0ull;
#pragma unroll
    for (int j = 0; j < Row::V; ++j) {
      const unsigned long long c = pack_candidate(group_key[j], Row::virtual_lane(j));
      mine = c > mine ? c : mine;
    }
    const int g = candidate_element(Row::max_u64(mine));
    chosen |= 1u << g;
#pragma unroll
    for (int j = 0; j < Row::V; ++j)
      if (Row::virtual_lane(j) == g) group_key[j] = 0u;
  }
#pragma unroll
  for (int i = 0; i < P; ++i) {
    const int e = slot_element<VPL, L>(layout, i);
    if (e < E && !((chosen >> (e / size)) & 1u)) key[i] = 0u;
  }
}

// k rounds of a tournament over the row's lanes: each lane's best key (a strict > in element
// order: the lower element of equal keys), then the row's best packed (key, element) in log2(L)
// u64 shuffle steps; its owner clears that key. chosen[j] = the element picked in round p + L*j
// (for rounds < k). Needs k candidates with a nonzero key.
template <int VPL, int L>
__device__ __forceinline__ void take_top_k(unsigned (&key)[RowLanes<L>::V * VPL], int k, SlotLayout layout,
                                           int (&chosen)[RowLanes<L>::V]) {
  using Row = RowLanes<L>;
  constexpr int P = Row::V * VPL;
  for (int r = 0; r < k; ++r) {
    unsigned best = 0u;
    int best_slot = 0;
    for_slots_in_element_order<VPL, L>(layout, [&](int i) {
      if (key[i] > best) {
        best = key[i];
        best_slot = i;
      }
    });
    const unsigned long long mine = pack_candidate(best, slot_element<VPL, L>(layout, best_slot));
    const unsigned long long winner = Row::max_u64(mine);
    if (mine == winner) {
#pragma unroll
      for (int i = 0; i < P; ++i)
        if (i == best_slot) key[i] = 0u;
    }
    const int e = candidate_element(winner);
#pragma unroll
    for (int j = 0; j < Row::V; ++j)
      if (Row::virtual_lane(j) == r) chosen[j] = e;
  }
}

// Selects row `row` of z [T, E] (its L lanes; every lane of the warp calls it, `live` false for
// lanes whose row is past the end: they run the collectives on zeros, touching no memory): writes ids[row, 0..k) and weights[row, 0..k) and counts the row in *nonfinite_rows
// (when not null) if it is non-finite (then its ids are kNoExpert and its weights NaN). Slot r of
// the k is virtual lane r's (lane r % L).
// The algorithm and its contract are at router_select_e<N>_f32 (router.cu). z holds rows of E
// logits (global memory, or a shared-memory tile in a fused scoring kernel). E <= 32 * VPL.
template <int VPL, int L>
__device__ __forceinline__ void select_row(const float* z, const float* bias, i64 row, bool live, int E, int k,
                                           const SelectOptions& o, int groups, int topk_groups, int* ids,
                                           float* weights, unsigned* nonfinite_rows) {
  using Row = RowLanes<L>;
  constexpr int V = Row::V, P = V * VPL;
  const float* z_row = z + row * E;
  const SlotLayout layout{VPL % 4 == 0 && E % 4 == 0 && aligned_16(z) && (!bias || aligned_16(bias))};
  float v[P];
  load_slots<VPL, L>(v, z_row, live ? E : 0, layout);
  RowMaxPartial partial;
#pragma unroll
  for (int i = 0; i < P; ++i)
    if (slot_element<VPL, L>(layout, i) < E) partial.add(v[i]);
  RowSoftmax stats{Row::max(partial.max), 0.0f, false};
  stats.nonfinite = Row::any(partial.bad) || stats.max == -INFINITY;
  if (o.score == kSoftmax && !o.topk_first) {
    float sums[V];
#pragma unroll
    for (int j = 0; j < V; ++j) {
      float sum = 0.0f;
#pragma unroll
      for (int s = 0; s < VPL; ++s)
        if (slot_element<VPL, L>(layout, j * VPL + s) < E) sum += row_softmax_term(stats, v[j * VPL + s]);
      sums[j] = sum;
    }
    stats.sum = Row::sum(sums);
  }
  float b[P] = {};
  if (bias) load_slots<VPL, L>(b, bias, live ? E : 0, layout);
  unsigned key[P];
#pragma unroll
  for (int i = 0; i < P; ++i) {
    const float score = selection_score(o, stats, v[i]) + (bias ? b[i] : 0.0f);
    key[i] = slot_element<VPL, L>(layout, i) < E ? rank_key(score) : 0u;
  }
  if (groups > 1) keep_best_groups<VPL, L>(key, E, groups, topk_groups, layout);
  int id[V];
  take_top_k<VPL, L>(key, k, layout, id);
  float chosen_z[V];
  bool active[V];
#pragma unroll
  for (int j = 0; j < V; ++j) {
    active[j] = Row::virtual_lane(j) < k;
    chosen_z[j] = live && active[j] ? z_row[id[j]] : 0.0f;
  }
  SelectedWeights w[V];
  selected_weights<L>(o, stats, chosen_z, active, w);
#pragma unroll
  for (int j = 0; j < V; ++j) {
    if (live && active[j]) {  // a non-finite row is routed nowhere: no expert, a NaN weight (router_row.cuh)
      const i64 slot = row * k + Row::virtual_lane(j);
      ids[slot] = stats.nonfinite ? kNoExpert : id[j];
      weights[slot] = stats.nonfinite ? __uint_as_float(kQuietNaN) : o.scale * w[j].normalized;
    }
  }
  if (live && threadIdx.x % L == 0 && stats.nonfinite && nonfinite_rows) atomicAdd(nonfinite_rows, 1u);
}

// A selection kernel's parameters, and its rows: L lanes per row (one block: blockDim.x / L rows),
// row width N (E <= N). Every lane runs select_row, those of rows past T not live.
#define ROUTER_SELECT_PARAMS                                                                        \
  const float *z, const float *bias, long long T, int E, int k, int score, int topk_first,         \
      int renormalize, float scale, int groups, int topk_groups, int *ids, float *weights,         \
      unsigned *nonfinite_rows
#define ROUTER_SELECT_ROW(N, L)                                                                     \
  const i64 row = (i64(blockIdx.x) * blockDim.x + threadIdx.x) / (L);                              \
  const SelectOptions o{score, topk_first != 0, renormalize != 0, scale};                          \
  select_row<(N) / kWarp, (L)>(z, bias, row < T ? row : 0, row < T, E, k, o, groups, topk_groups, ids,    \
                               weights, nonfinite_rows)
