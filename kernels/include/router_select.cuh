// router_select.cuh: top-k selection of one row held in a warp's registers, and the k combine
// weights, shared by the selection kernel and its backward (router.cu). select_row is the whole
// per-row selection: a scoring kernel that produces a row of logits can call it to fuse.
//
// Register layout of a row (SlotLayout): lane l holds VPL slots. Scalar layout: slot s is
// element 32*s + l. Vector layout (E % 4 == 0, 16-byte aligned rows, VPL % 4 == 0): slot s is
// element 128*(s/4) + 4*l + s%4, so each lane loads 16 bytes at a time. In both layouts a
// lane's slots are in increasing element order, which is what makes ties go to the lower
// index inside a lane; across lanes the packed (key, element) comparison does it.
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
  __device__ __forceinline__ int lane_of(int e) const { return vec ? (e & 127) >> 2 : e & 31; }
  __device__ __forceinline__ int slot_of(int e) const { return vec ? (e >> 7) * 4 + (e & 3) : e >> 5; }
};

// v[s] = row[element(s)] for elements < E, else 0.
template <int VPL>
__device__ __forceinline__ void load_slots(float (&v)[VPL], const float* row, int E, SlotLayout layout) {
  const int lane = threadIdx.x % kWarp;
  if constexpr (VPL % 4 == 0) {
    if (layout.vec) {
#pragma unroll
      for (int j = 0; j < VPL / 4; ++j) {
        const int e = layout.element(4 * j, lane);
        const float4 q = e < E ? load_128(reinterpret_cast<const float4*>(row + e)) : make_float4(0.f, 0.f, 0.f, 0.f);
        v[4 * j] = q.x;
        v[4 * j + 1] = q.y;
        v[4 * j + 2] = q.z;
        v[4 * j + 3] = q.w;
      }
      return;
    }
  }
#pragma unroll
  for (int s = 0; s < VPL; ++s) {
    const int e = layout.element(s, lane);
    v[s] = e < E ? row[e] : 0.0f;
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

// The weights of the selected logits z (one per active lane): all 0 for a non-finite row (whose
// written weights select_row replaces by NaN; the backward sees the zero);
// topk_then_softmax: a softmax over the k logits (0 when they are all -inf); otherwise the score,
// divided by the k scores' sum + 1e-20 with renormalize. Warp-collective: all lanes call it.
__device__ __forceinline__ SelectedWeights selected_weights(const SelectOptions& o, const RowSoftmax& s,
                                                            float z, bool active) {
  SelectedWeights w{0.0f, 1.0f, 0.0f};
  if (s.nonfinite) return w;
  if (o.score == kSoftmax && o.topk_first) {
    const float top = warp_max(active ? z : -INFINITY);
    const float t = (active && top > -INFINITY) ? expf(z - top) : 0.0f;
    w.denom = warp_sum(t);
    w.score = t;
    w.normalized = t > 0.0f ? t / w.denom : 0.0f;
    return w;
  }
  if (active) w.score = o.score == kSigmoid ? sigmoid(z) : o.score == kNone ? z : row_softmax_prob(s, z);
  w.normalized = w.score;
  if (o.renormalize) {
    w.denom = warp_sum(w.score) + kRenormEpsilon;
    w.normalized = w.score / w.denom;
  }
  return w;
}

// Group-limited routing: zeroes the keys outside the topk_groups best groups. A group's score is
// the sum of its two best keys' values (its one value when a group has one expert), ranked like
// keys (NaN lowest, ties to the lower group). groups <= 32: lane g holds group g's score.
template <int VPL>
__device__ __forceinline__ void keep_best_groups(unsigned (&key)[VPL], int E, int groups, int topk_groups,
                                                 SlotLayout layout) {
  const int lane = threadIdx.x % kWarp;
  const int size = E / groups;
  unsigned group_key = 0u;
  for (int g = 0; g < groups; ++g) {
    unsigned best = 0u, second = 0u;
#pragma unroll
    for (int s = 0; s < VPL; ++s) {
      const int e = layout.element(s, lane);
      if (e >= g * size && e < (g + 1) * size) {
        if (key[s] > best) {
          second = best;
          best = key[s];
        } else if (key[s] > second) {
          second = key[s];
        }
      }
    }
#pragma unroll
    for (int m = 16; m > 0; m >>= 1) {
      const unsigned other_best = __shfl_xor_sync(kFullMask, best, m);
      const unsigned other_second = __shfl_xor_sync(kFullMask, second, m);
      second = max(min(best, other_best), max(second, other_second));
      best = max(best, other_best);
    }
    const float score = rank_value(best) + (second != 0u ? rank_value(second) : 0.0f);
    if (lane == g) group_key = rank_key(score);
  }
  unsigned chosen = 0u;
  for (int r = 0; r < topk_groups; ++r) {
    const int g = candidate_element(warp_max_u64(pack_candidate(group_key, lane)));
    chosen |= 1u << g;
    if (lane == g) group_key = 0u;
  }
#pragma unroll
  for (int s = 0; s < VPL; ++s) {
    const int e = layout.element(s, lane);
    if (e < E && !((chosen >> (e / size)) & 1u)) key[s] = 0u;
  }
}

// k rounds of warp argmax over the keys: returns, in lane r < k, the element chosen in round r.
// Each round: every lane's best slot (the first of equal keys), then the warp's best (key,
// element); its owner clears that slot. Needs k candidates with a nonzero key.
template <int VPL>
__device__ __forceinline__ int take_top_k(unsigned (&key)[VPL], int k, SlotLayout layout) {
  const int lane = threadIdx.x % kWarp;
  int chosen = 0;
  for (int r = 0; r < k; ++r) {
    unsigned best = 0u;
    int best_slot = 0;
#pragma unroll
    for (int s = 0; s < VPL; ++s) {
      if (key[s] > best) {
        best = key[s];
        best_slot = s;
      }
    }
    const int e = candidate_element(warp_max_u64(pack_candidate(best, layout.element(best_slot, lane))));
    if (layout.lane_of(e) == lane) {
      const int slot = layout.slot_of(e);
#pragma unroll
      for (int s = 0; s < VPL; ++s)
        if (s == slot) key[s] = 0u;
    }
    if (lane == r) chosen = e;
  }
  return chosen;
}

// Selects row `row` of z [T, E] (one warp, every lane calls it): writes ids[row, 0..k) and
// weights[row, 0..k) and counts the row in *nonfinite_rows (when not null) if it is non-finite
// (then its ids are kNoExpert and its weights NaN).
// The algorithm and its contract are at router_select_e<N>_f32 (router.cu). z holds rows of E
// logits (global memory, or a shared-memory tile in a fused scoring kernel). E <= 32 * VPL.
template <int VPL>
__device__ __forceinline__ void select_row(const float* z, const float* bias, i64 row, int E, int k,
                                           const SelectOptions& o, int groups, int topk_groups, int* ids,
                                           float* weights, unsigned* nonfinite_rows) {
  const int lane = threadIdx.x % kWarp;
  const float* z_row = z + row * E;
  const SlotLayout layout{VPL % 4 == 0 && E % 4 == 0 && aligned_16(z) && (!bias || aligned_16(bias))};
  float v[VPL];
  load_slots<VPL>(v, z_row, E, layout);
  RowMaxPartial partial;
#pragma unroll
  for (int s = 0; s < VPL; ++s)
    if (layout.element(s, lane) < E) partial.add(v[s]);
  RowSoftmax stats = row_softmax_max(partial);
  if (o.score == kSoftmax && !o.topk_first) {
    float sum = 0.0f;
#pragma unroll
    for (int s = 0; s < VPL; ++s)
      if (layout.element(s, lane) < E) sum += row_softmax_term(stats, v[s]);
    stats.sum = warp_sum(sum);
  }
  float b[VPL] = {};
  if (bias) load_slots<VPL>(b, bias, E, layout);
  unsigned key[VPL];
#pragma unroll
  for (int s = 0; s < VPL; ++s) {
    const float score = selection_score(o, stats, v[s]) + (bias ? b[s] : 0.0f);
    key[s] = layout.element(s, lane) < E ? rank_key(score) : 0u;
  }
  if (groups > 1) keep_best_groups<VPL>(key, E, groups, topk_groups, layout);
  const int id = take_top_k<VPL>(key, k, layout);
  const bool active = lane < k;
  const SelectedWeights w = selected_weights(o, stats, active ? z_row[id] : 0.0f, active);
  if (active) {  // a non-finite row is routed nowhere: no expert, a NaN weight (router_row.cuh)
    ids[row * k + lane] = stats.nonfinite ? kNoExpert : id;
    weights[row * k + lane] = stats.nonfinite ? __uint_as_float(kQuietNaN) : o.scale * w.normalized;
  }
  if (lane == 0 && stats.nonfinite && nonfinite_rows) atomicAdd(nonfinite_rows, 1u);
}
