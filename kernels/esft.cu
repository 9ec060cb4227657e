// esft.cu: expert-specialized fine-tuning (math §8): per-expert statistics accumulated over a
// probe set of any number of batches, then the experts to train.
//
// Running state (EsftScores in src/ops/esft.rs allocates it zeroed, for E <= 1024 experts):
//   counts[E]        u64: slots routed to each expert, over every accumulated batch (exact)
//   weight_sums[E]   sum of the slots' weights in fixed point: an i64 of ESFT_FIXED_ONE = 2^32
//                    units per 1.0, added as u64 (two's complement wraps to the right signed
//                    sum). Integer adds are exact and order-free: the sums are deterministic
//                    whatever order blocks run in, and several batches give the very bits
//                    of one batch of their concatenation. Each weight is rounded to 2^-32 (the mean
//                    g_i moves by at most 2^-33). Range: the total weight over all experts
//                    stays below 2^31 in magnitude (esft_select adds the sums in i64 too).
//   totals[2]        u64: [0] tokens accumulated, [1] slots skipped
// A slot is skipped (counts nowhere, adds nothing, but is counted in totals[1]) when its id is
// outside [0, E) or its weight is NaN, infinite or larger than ESFT_MAX_WEIGHT in magnitude.
//
// Kernels:
//   esft_accumulate   adds one batch of routing (ids, weights [T, k]) to the state
//   esft_select       scores, ranking, the shortest prefix whose cumulative score reaches p
#include "common.cuh"

// Fixed-point units per 1.0 of weight, and the largest weight magnitude accumulated (so that
// one slot's units, < 2^48, can never overflow a running sum on its own).
constexpr float ESFT_FIXED_ONE = 4294967296.0f;
constexpr float ESFT_MAX_WEIGHT = 65536.0f;
// The `kind` of esft_select that ranks by token score (ScoreKind::Token in src/ops/esft.rs);
// any other value, ScoreKind::Gate's 0, ranks by gate score.
constexpr int ESFT_TOKEN = 1;

// ------------------------------------------------------------------------------------------
// esft_accumulate: counts[e] += #{valid slots with id e}, weight_sums[e] += their weights in
// fixed point, totals[0] += T, totals[1] += #{skipped slots}.
// Mapping: a grid-stride loop over the T·k slots; each block histograms its slots into shared
// memory (shared 64-bit integer atomics), then adds its nonzero bins to the state with one global
// integer atomic each. No float atomics: every add is an integer add, exact in any order.
// Traffic: ids and weights read once; 2 atomics per block and touched expert.
// Launch: any grid, any block (the wrapper: ceil(T·k / 4096) blocks, at most 128, of 256
//   threads); dynamic shared 2·E u64 (16 KiB at E = 1024); 1 <= E; T >= 0.
extern "C" __global__ void esft_accumulate(const int* ids, const float* weights, long long tokens, int k, int E,
                                           unsigned long long* counts, unsigned long long* weight_sums,
                                           unsigned long long* totals) {
  __shared__ unsigned long long block_skipped;
  DYN_SHARED(unsigned long long, bins);
  unsigned long long* block_counts = bins;
  unsigned long long* block_sums = bins + E;
  for (int i = threadIdx.x; i < 2 * E; i += blockDim.x) bins[i] = 0ull;
  if (threadIdx.x == 0) block_skipped = 0ull;
  __syncthreads();
  const i64 slots = tokens * k;
  unsigned long long skipped = 0ull;
  for (i64 s = global_thread_x(); s < slots; s += i64(gridDim.x) * blockDim.x) {
    const int id = ids[s];
    const float w = weights[s];
    if (id < 0 || id >= E || !(fabsf(w) <= ESFT_MAX_WEIGHT)) {  // !(<=) is also true for NaN
      ++skipped;
      continue;
    }
    atomicAdd(&block_counts[id], 1ull);
    atomicAdd(&block_sums[id], (unsigned long long)llrintf(w * ESFT_FIXED_ONE));
  }
  if (skipped) atomicAdd(&block_skipped, skipped);
  __syncthreads();
  for (int e = threadIdx.x; e < E; e += blockDim.x) {
    if (block_counts[e] == 0ull) continue;
    atomicAdd(&counts[e], block_counts[e]);
    atomicAdd(&weight_sums[e], block_sums[e]);
  }
  if (threadIdx.x == 0) {
    if (block_skipped) atomicAdd(&totals[1], block_skipped);
    if (blockIdx.x == 0) totals[0] += (unsigned long long)tokens;  // the only writer of totals[0]
  }
}
EMU_EXPORT(esft_accumulate)

// ------------------------------------------------------------------------------------------
// esft_select: the math §8 selection from the state.
// Algorithm, thread e for expert e (ranking) and then for rank position e (prefix):
//   1. key_e = the score's numerator in exact integer units (counts for the token score,
//      fixed-point weight sums for the gate score), over one positive denominator per kind
//      (unit = T·k, or T·2^32): ranking keys ranks scores, and equal scores tie exactly.
//   2. rank_e = #experts above e (a larger key, or an equal key and a lower id): O(E) per thread,
//      integer compares only; order[rank_e] = e.
//   3. prefix[r] = sum of the keys of ranks 0..r: a Hillis-Steele scan in i64, exact (within the
//      state's documented range) and so independent of the scan's association.
//   4. The shortest prefix: n = 1 + the lowest r with prefix[r] >= p·unit (an integer atomicMin;
//      the cumulative *score* is compared without rounding each score, so p = 1 over token scores
//      stops exactly at the last expert with a nonzero count). p <= 0: n = 0 (the empty prefix).
//      No prefix reaching p·unit (p above the total score, or T = 0): n = E, every expert.
// Scores: gate g_e = weight_sums[e] / 2^32 / T; token r_e = counts[e] / (T·k); 0 when T = 0.
// Outputs: scores[E] f32; mask[E] (1 = train, 0 = frozen); selected[E] the chosen ids in rank
//   order, then -1; selected_count[1].
// Traffic: the state read once, outputs written once; O(E^2) shared broadcast reads (E <= 1024).
// Launch: 1 block of a multiple of 32 threads >= E (at most 1024); dynamic shared E·(8 + 8 + 4)
//   bytes.
extern "C" __global__ void esft_select(const unsigned long long* counts, const unsigned long long* weight_sums,
                                       const unsigned long long* totals, int E, int k, int kind, double p,
                                       float* scores, int* mask, int* selected, int* selected_count) {
  __shared__ int chosen;
  DYN_SHARED(long long, keys);
  long long* prefix = keys + E;
  int* order = reinterpret_cast<int*>(prefix + E);
  const int e = threadIdx.x;
  const double tokens = double(totals[0]);
  const double unit = kind == ESFT_TOKEN ? tokens * k : tokens * double(ESFT_FIXED_ONE);
  if (e < E) keys[e] = (long long)(kind == ESFT_TOKEN ? counts[e] : weight_sums[e]);
  if (e == 0) chosen = p > 0.0 ? E : 0;
  __syncthreads();
  int rank = 0;
  if (e < E) {
    const long long key = keys[e];
    for (int j = 0; j < E; ++j) {
      const long long other = keys[j];
      rank += other > key || (other == key && j < e);
    }
    order[rank] = e;
    prefix[rank] = key;
  }
  for (int offset = 1; offset < E; offset <<= 1) {
    __syncthreads();
    const long long add = e < E && e >= offset ? prefix[e - offset] : 0ll;
    __syncthreads();
    if (e < E) prefix[e] += add;
  }
  __syncthreads();
  if (e < E && p > 0.0 && unit > 0.0 && double(prefix[e]) >= p * unit) atomicMin(&chosen, e + 1);
  __syncthreads();
  if (e == 0) *selected_count = chosen;
  if (e < E) {
    scores[e] = unit > 0.0 ? float(double(keys[e]) / unit) : 0.0f;
    mask[e] = rank < chosen ? 1 : 0;
    selected[e] = e < chosen ? order[e] : -1;
  }
}
EMU_EXPORT(esft_select)
