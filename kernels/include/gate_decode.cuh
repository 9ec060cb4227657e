// gate_decode.cuh: the gate's forward z = score(X) for a few tokens (T <= 64, the decode step),
// for the linear form and the rank forms (low-rank, symmetric, attention-like; not the full
// form, whose rank is d).
//
// Why a second kernel: the tiled kernels (gate.cu, gate_mma.cuh) give a block to every 64
// tokens x 16 to 128 experts, so at decode a handful of blocks stream all the weights, each
// through a chain of synchronous k-tiles. Here every warp streams its own slice of one expert's
// rows, so all of them are in flight at once, and the slices are summed in a fixed order.
//
// Algorithm: the d inputs are cut into 16-byte chunks (V = 16 / sizeof(T) elements), and the
//   chunks into groups of 32 (512 bytes). Expert e's groups are dealt round-robin to S slices
//   (S = slices: 1, 2, 4 or 8), so every warp request is a whole group but the last. Per chunk
//   of GATE_RC ranks (one pass for the linear form) an expert has ROWS projection rows: the left
//   rows (U_j, K_j), the right ones (V_j; the attention form's shared Q_j) and its linear row (W,
//   or B in the first chunk). Warp (e, s) computes partial[n][t] = sum over its chunks of
//   row_n[chunk] . x_t[chunk] for the block's TOKENS tokens (X loaded once per chunk for all
//   rows), lane l taking chunk l of each of its groups; a butterfly (xor 16, 8, 4, 2, 1) sums
//   the lanes, then thread (e, t) adds the S partials of each row in slice order and forms the
//   chunk's term (sum_j L_j R_j, L_j^2 or Q_j K_j / sqrt(r), plus the linear row), added to z
//   chunk after chunk, then the bias. Every sum has one order whatever the schedule: bitwise
//   deterministic.
// Mapping: 256 threads = 8 warps; a block holds 8 / S experts (warp w: expert w / S, slice
//   w % S) and TOKENS tokens (blockIdx.y: 16 for the linear form, 4 for the rank forms, whose
//   ROWS x TOKENS accumulators per lane would not fit 16); grid (ceil(E S / 8),
//   ceil(T / TOKENS)). The host picks S from T: more tokens, fewer slices, so that more experts
//   share each X chunk in L1 (gate/mod.rs, `decode_slices`).
// Memory traffic: the weights read once per token block (once for T <= TOKENS) as 16-byte
//   loads, a warp's 32 lanes covering 512 contiguous bytes (16 sectors per request); X, at most
//   64 x d, read by every warp of a block from L1 and by each block from L2; z written once.
// Non-finite rows (math §1): each lane flags the tokens whose chunk holds a huge_input element;
//   the flags are OR-ed like the sums, so a row is flagged wherever its bad element sits, and
//   it gets NaN for every logit.
#pragma once
#include "gate_forms.cuh"

constexpr int DECODE_WARPS = 8;

template <Form F> struct DecodeForm {
  static_assert(F != Form::Full, "the full form's rank is d: it runs on the tiles");
  static constexpr int RC = F == Form::Linear ? 0 : GATE_RC;
  static constexpr bool right = F == Form::LowRank || F == Form::Attention;  // V_j, or Q_j
  static constexpr bool lin = F != Form::Attention;                         // W, or B
  static constexpr int ROWS = RC * (right ? 2 : 1) + (lin ? 1 : 0);
  static constexpr int TOKENS = F == Form::Linear ? 16 : 4;
};

template <class T, Form F>
__device__ __forceinline__ void gate_decode_body(const T* x, GateWeightsPtrs w, const float* bias, float* z,
                                                 i64 tokens, int d, int experts, int rank, int slices) {
  using D = DecodeForm<F>;
  constexpr int V = elems_per_16<T>, ROWS = D::ROWS, TOKENS = D::TOKENS;
  __shared__ float partial[DECODE_WARPS][ROWS][TOKENS];
  __shared__ unsigned huge[DECODE_WARPS];
  const T* left = static_cast<const T*>(w.left);
  const T* right = static_cast<const T*>(F == Form::Attention ? w.query : w.right);
  const T* lin = static_cast<const T*>(w.lin);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int per_block = DECODE_WARPS / slices;
  const int e = blockIdx.x * per_block + warp / slices, s = warp % slices;
  const i64 t0 = i64(blockIdx.y) * TOKENS;
  const bool vec = rows_aligned_16(x, d) && rows_aligned_16(left, d) && rows_aligned_16(right, d) &&
                   rows_aligned_16(lin, d);
  const i64 chunks = (i64(d) + V - 1) / V;
  const int rank_chunks = F == Form::Linear ? 1 : (rank + GATE_RC - 1) / GATE_RC;

  // Combining thread (j, t): expert j of the block, token t; the slices of expert j are warps
  // j S + s. Its z accumulates over the rank chunks.
  const int j = threadIdx.x / TOKENS, t = threadIdx.x % TOKENS;
  const int out_e = blockIdx.x * per_block + j;
  const bool combines = j < per_block && out_e < experts && t0 + t < tokens;
  float zt = 0.0f;
  unsigned flags = 0;
  for (int rc = 0; rc < rank_chunks; ++rc) {
    const int r0 = rc * GATE_RC;
    // Row n of the chunk for this warp's expert (null: a zero row).
    auto row = [&](int n) -> const T* {
      if (e >= experts) return nullptr;
      if (n < D::RC) return r0 + n < rank ? left + (i64(e) * rank + r0 + n) * d : nullptr;
      if (D::right && n < 2 * D::RC) {
        const int jr = r0 + n - D::RC;
        if (jr >= rank) return nullptr;
        return F == Form::Attention ? right + i64(jr) * d : right + (i64(e) * rank + jr) * d;
      }
      return (rc == 0 && lin != nullptr) ? lin + i64(e) * d : nullptr;
    };
    float acc[ROWS][TOKENS] = {};
    unsigned huge_tokens = 0;  // bit t: token t0 + t has a huge element in this lane's chunks
    if (e < experts) {
      for (i64 c = i64(s) * 32 + lane; c < chunks; c += i64(slices) * 32) {
        float wv[ROWS][V];
#pragma unroll
        for (int n = 0; n < ROWS; ++n) read_run<T>(wv[n], row(n), c * V, d, vec);
#pragma unroll
        for (int tt = 0; tt < TOKENS; ++tt) {
          if (t0 + tt >= tokens) break;
          float xv[V];
          read_run<T>(xv, x + (t0 + tt) * d, c * V, d, vec);
#pragma unroll
          for (int q = 0; q < V; ++q) {
            if (huge_input(xv[q])) huge_tokens |= 1u << tt;
#pragma unroll
            for (int n = 0; n < ROWS; ++n) acc[n][tt] = fmaf(wv[n][q], xv[q], acc[n][tt]);
          }
        }
      }
    }
#pragma unroll
    for (int n = 0; n < ROWS; ++n)
#pragma unroll
      for (int tt = 0; tt < TOKENS; ++tt)
#pragma unroll
        for (int o = 16; o > 0; o /= 2) acc[n][tt] += __shfl_xor_sync(0xffffffffu, acc[n][tt], o);
#pragma unroll
    for (int o = 16; o > 0; o /= 2) huge_tokens |= __shfl_xor_sync(0xffffffffu, huge_tokens, o);
    if (lane == 0) {
#pragma unroll
      for (int n = 0; n < ROWS; ++n)
#pragma unroll
        for (int tt = 0; tt < TOKENS; ++tt) partial[warp][n][tt] = acc[n][tt];
      huge[warp] = huge_tokens;
    }
    __syncthreads();
    if (combines) {
      float p[ROWS];
#pragma unroll
      for (int n = 0; n < ROWS; ++n) {
        p[n] = 0.0f;
        for (int q = 0; q < slices; ++q) p[n] += partial[j * slices + q][n][t];
      }
      for (int q = 0; q < slices; ++q) flags |= huge[j * slices + q];
      float term = 0.0f;
#pragma unroll
      for (int c = 0; c < D::RC; ++c) {
        if constexpr (F == Form::LowRank) term += p[c] * p[D::RC + c];
        if constexpr (F == Form::Symmetric) term += p[c] * p[c];
        if constexpr (F == Form::Attention) term += p[D::RC + c] * p[c];
      }
      if constexpr (F == Form::Attention) term *= rsqrtf(float(rank));
      if constexpr (D::lin) term += p[ROWS - 1];  // zero after chunk 0 (a zero row)
      zt += term;
    }
    __syncthreads();  // partial and huge are rewritten by the next chunk
  }
  if (combines)
    z[(t0 + t) * experts + out_e] = (flags >> t) & 1u ? __uint_as_float(kQuietNaN) : zt + (bias ? bias[out_e] : 0.0f);
}
