// gate_mma.cuh: the tensor-core forward of the gate family (kernels/gate.cu): every form for
// f16/bf16 X, the rank forms for f32 X (the f32 linear gate is gate_scores_linear_tf32).
//
// Per chunk of GATE_RC ranks, a GEMM of a 64-token X tile against the block's stacked
// projection rows over k-tiles of d, then an epilogue that forms z in registers. The GEMM is
// mma.sync with f32 accumulation on shared tiles in the stored dtype: m16n8k16 read with
// ldmatrix for f16/bf16; for f32, m16n8k8 tf32 with each operand split into two tf32 terms
// (gate_tf32.cuh: 3 mmas a fragment pair, f32-accurate), its fragments read as scalars. The
// tiles are filled by a MMA_STAGES-slot cp.async ring (the copies of k-tile kt + 2 fly while
// the tensor cores work on kt, one barrier a k-tile; the X tile's huge elements are found in
// shared memory once it lands). A k-tile is 64 bytes of each row (32 halves or 16 floats;
// MmaRow), so both layouts take the same shared bytes. The columns are laid out for the
// epilogue (the C fragment of m16n8k16 and of m16n8k8 is the same):
//   pair tile of expert e (8 columns): [L_0, R_0, L_1, R_1, L_2, R_2, L_3, R_3] of the chunk,
//     so lane (g, t) of the C fragment holds L_t.x and R_t.x of rows g and g + 8: the rank-t
//     product is local and a quad shuffle sums the chunk. L, R per form:
//       low-rank U_j, V_j; symmetric U_j, U_j; attention K_ej, Q_j; full A_e[j, :], e_j
//       (the unit row, generated in shared memory: e_j . x = x_j).
//   linear tiles: the W or B rows of 8 experts per n8 tile (lane t holds experts 2t, 2t+1).
// Warps: 4 along tokens (16 rows each) x 2 along experts (BE/2 experts each); BE = 128
//   (linear; 256 in the widest route kernels, gate.cu) or 16 experts per block (32 would hold
//   163 registers in 16-bit: one block per SM; the weight rows, read once per 64-token tile,
//   dominate the L2 traffic either way).
// Traffic: X read ceil(E / BE) * chunks times (L2 after the first), each weight row once per
//   64-token tile, z written once; shared tiles hold the stored values (16-bit or f32).
// Bank conflicts: none for the 16-bit ldmatrix reads; for f32, none for A, and 2-way on the B
//   reads of the low-rank, attention and full pair tiles (a lane pair's L and R rows sit
//   L_ROWS = 64 rows, 0 mod 32 banks, apart).
// Launch: grid (ceil(T/64), ceil(E/BE)), 256 threads, MMA_STAGES * (64 + COLS) * 80 bytes of
//   dynamic shared memory (COLS: MmaForm): 33.8 KiB (symmetric) to 48.8 KiB (low-rank), 75 KiB
//   for the 256-expert linear tile (an opt-in above 48 KiB, which the launch makes).
#pragma once
#include "gate_forms.cuh"
#include "gate_tf32.cuh"
#include "ptx.cuh"

constexpr int MMA_STAGES = 3;  // slots of the cp.async ring: 2 k-tiles in flight

// A shared row of one k-tile: BK elements (64 bytes: 32 halves, two k16 steps, or 16 floats,
// two k8 steps) padded to LD (80 bytes: rows 16-byte aligned, and the fragment reads of 8 rows
// spread over the banks); V elements a 16-byte copy.
template <class T> struct MmaRow {
  static constexpr int BK = 64 / int(sizeof(T)), LD = 80 / int(sizeof(T)), V = 16 / int(sizeof(T));
};

// Shared rows of the B tile: the L rows of each expert's chunk ([expert][4]), then the R rows
// (low-rank: V per expert [expert][4]; attention and full: the 4 rows Q_j or e_j, shared by
// every expert; symmetric: none, R is L), then one linear row per expert. A pair tile's
// fragment reads address L and R rows wherever they are, so no row is stored twice.
// LINEAR_BE: the linear tile's experts, 128 (the scoring kernels) or 256 (the widest route
// kernels, gate.cu).
template <Form F, int LINEAR_BE = 128> struct MmaForm {
  static constexpr bool pairs = F != Form::Linear;
  static constexpr int BE = pairs ? 16 : LINEAR_BE;  // experts per block
  static constexpr int WE = BE / 2;                // experts per warp
  static constexpr int PAIR_TILES = pairs ? WE : 0;
  static constexpr int LIN_TILES = WE / 8;
  static constexpr int L_ROWS = pairs ? BE * GATE_RC : 0;
  static constexpr int R_ROWS = F == Form::LowRank ? BE * GATE_RC
                                : (F == Form::Attention || F == Form::Full) ? GATE_RC
                                                                             : 0;
  static constexpr int LIN0 = L_ROWS + R_ROWS;     // first linear row
  static constexpr int COLS = LIN0 + BE;           // shared rows of the B tile
  // Shared row of the pair tile of block expert el, rank c of the chunk, factor s (0: L, 1: R).
  static __device__ __forceinline__ int pair_row(int el, int c, int s) {
    if (s == 0 || F == Form::Symmetric) return el * GATE_RC + c;
    if (F == Form::LowRank) return L_ROWS + el * GATE_RC + c;
    return L_ROWS + c;
  }
};

// Issues the fill of tile[m * LD + k] = row(m)[k0 + k] for m < rows, k < BK (MmaRow<T>), in the
// stored type: with vec (every row start 16-byte aligned, rows_aligned_16, so klen is a
// multiple of V and a run of V lies wholly inside or wholly past it) one 16-byte cp.async a run,
// zero-filled past klen and for null rows. Without vec, and for the rows with a unit column
// (1 at k0 + k == unit(m) >= 0, else 0), the run is stored element by element at once. The
// caller commits and waits; `fallback` (16-byte aligned global memory) is the source address
// the zero-filling copies name.
template <class T, class RowFn, class UnitFn>
__device__ __forceinline__ void load_tile_rows_async(T* tile, int rows, RowFn row, UnitFn unit, i64 k0,
                                                     i64 klen, bool vec, const T* fallback) {
  using R = MmaRow<T>;
  constexpr int V = R::V, UNITS = R::BK / V;
  for (int item = threadIdx.x; item < rows * UNITS; item += GATE_THREADS) {
    const int m = item / UNITS, u = item % UNITS;
    const i64 k = k0 + u * V;
    const T* p = row(m);
    const i64 one_at = unit(m);
    T* dst = tile + m * R::LD + u * V;
    if (vec && one_at < 0) {
      const bool live = p != nullptr && k < klen;
      cp_async<16>(dst, live ? p + k : fallback, live ? 16 : 0);
    } else {
#pragma unroll
      for (int q = 0; q < V; ++q) {
        const float v = (p != nullptr && k + q < klen) ? to_f32(p[k + q]) : (k + q == one_at ? 1.0f : 0.0f);
        dst[q] = from_f32<T>(v);
      }
    }
  }
}

// Sets huge_rows[m] (shared) for each row m of a landed X tile (GATE_BM rows of BK) that
// holds a huge_input element: one 16-byte shared read a thread, thread i reading row i % 64
// (8 consecutive threads read 8 rows 80 bytes apart: 8 distinct 16-byte bank groups), and an
// atomic, since the 4 runs of a row are read by as many threads. Zero-filled runs hold no huge
// element.
template <class T>
__device__ __forceinline__ void mark_huge_rows(const T* tile, int* huge_rows) {
  using R = MmaRow<T>;
  constexpr int V = R::V;
  static_assert(GATE_BM * (R::BK / V) == GATE_THREADS, "one run of the X tile a thread");
  const int m = threadIdx.x % GATE_BM, u = threadIdx.x / GATE_BM;
  const Raw16 raw = load_128(reinterpret_cast<const Raw16*>(tile + m * R::LD + u * V));
  bool huge = false;
#pragma unroll
  for (int q = 0; q < V; ++q) huge |= huge_input(raw16_element(raw, q, static_cast<T*>(nullptr)));
  if (huge) atomicOr(&huge_rows[m], 1);
}

// acc[i] += the warp's 16 rows of As (rows 16 wm ..) times the 8 columns of n8 tile i over one
// k-tile, for i < TILES; b_row(i, r) is the shared row of column r of tile i. f16/bf16: m16n8k16
// from ldmatrix (lane l addresses row l % 8 of a B tile); f32: m16n8k8 tf32 on split terms, lane
// (g, t) reading A at rows g, g + 8 and columns t, t + 4, B at row b_row(i, g), columns t, t + 4.
template <class T, int TILES, class RowOf>
__device__ __forceinline__ void warp_k_tile(float (&acc)[TILES][4], const T* As, const T* Bs, int wm, RowOf b_row) {
  using R = MmaRow<T>;
  const int lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  if constexpr (sizeof(T) == 2) {
#pragma unroll
    for (int ks = 0; ks < R::BK; ks += 16) {
      uint32_t a[4];
      ldmatrix_x4<false>(a, As + (wm * 16 + lane % 16) * R::LD + ks + (lane / 16) * 8);
#pragma unroll
      for (int i = 0; i < TILES; ++i) {
        uint32_t b[2];
        ldmatrix_x2<false>(b, Bs + b_row(i, lane % 8) * R::LD + ks + ((lane / 8) % 2) * 8);
        mma_16816(acc[i], a, b, static_cast<T*>(nullptr));
      }
    }
  } else {
#pragma unroll
    for (int ks = 0; ks < R::BK; ks += 8) {
      const float* a = As + (wm * 16 + g) * R::LD + ks + t;
      uint32_t a_hi[4], a_lo[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) tf32_terms<true>(a_hi[i], a_lo[i], a[(i & 1) * 8 * R::LD + (i >> 1) * 4]);
#pragma unroll
      for (int i = 0; i < TILES; ++i) {
        const float* b = Bs + b_row(i, g) * R::LD + ks + t;
        uint32_t b_hi[2], b_lo[2];
        tf32_terms<true>(b_hi[0], b_lo[0], b[0]);
        tf32_terms<true>(b_hi[1], b_lo[1], b[4]);
        mma_tf32_terms<true>(acc[i], a_hi, a_lo, b_hi, b_lo);
      }
    }
  }
}

// COEF: the backward's coefficient pass (gate.cu, gate_coef_<form>_<dtype>) on the same tile:
// from dz [T, E], each chunk's pair tiles give, for rank j of expert e and row t, the
// coefficients of the left and right rows, g (F == Symmetric ? 2 L : R) s and g L s (g the dz
// element, s the attention scale; 0 wherever g is 0, whatever L and R are), written to
// out = ws [T, 2 E rank] at [t, e rank + j] and [t, E rank + e rank + j]. No linear tiles run
// (the linear rows' coefficient is dz itself) and nothing else is written.
template <class T, Form F, bool COEF = false, int LINEAR_BE = 128>
__device__ __forceinline__ void gate_scores_mma_body(const T* x, GateWeightsPtrs w, const float* bias,
                                                     const float* dz, float* out, i64 tokens, int d,
                                                     int experts, int rank) {
  using M = MmaForm<F, LINEAR_BE>;
  static_assert(!COEF || M::pairs, "the linear gate has no coefficient pass");
  constexpr int TILES = M::PAIR_TILES + (COEF ? 0 : M::LIN_TILES);  // n8 tiles a warp multiplies
  using R = MmaRow<T>;
  // MMA_STAGES ring slots, each [64][LD] X rows, then [COLS][LD] projection rows.
  constexpr int STAGE_ELEMS = (GATE_BM + M::COLS) * R::LD;
  DYN_SHARED(T, smem);
  const T* left = static_cast<const T*>(w.left);
  const T* right = static_cast<const T*>(w.right);
  const T* query = static_cast<const T*>(w.query);
  const T* lin = COEF ? nullptr : static_cast<const T*>(w.lin);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int wm = warp % 4, wn = warp / 4, g = lane / 4, t = lane % 4;
  const i64 t0 = i64(blockIdx.x) * GATE_BM;
  const int e0 = blockIdx.y * M::BE;
  // x is never null (the kernel runs only for T > 0), so vec implies d % V == 0.
  const bool vec = rows_aligned_16(x, d) && rows_aligned_16(left, d) && rows_aligned_16(right, d) &&
                   rows_aligned_16(query, d) && rows_aligned_16(lin, d);
  const int chunks = M::pairs ? (rank + GATE_RC - 1) / GATE_RC : 1;
  const int ktiles = int((i64(d) + R::BK - 1) / R::BK);
  const float pair_scale = F == Form::Attention ? rsqrtf(float(rank)) : 1.0f;
  auto x_row = [&](int m) -> const T* { return t0 + m < tokens ? x + (t0 + m) * d : nullptr; };
  auto no_unit = [](int) -> i64 { return -1; };
  const i64 row_top = t0 + wm * 16 + g, row_bottom = row_top + 8;

  // z of this warp's experts for rows g and g + 8, summed over chunks (every lane of a quad
  // holds the same pair sums; the linear term is added at the end).
  // Rows of the tile with a huge_input element get NaN logits (gate.cu); read after the
  // k-loop's barriers.
  __shared__ int huge_rows[GATE_BM];
  if (threadIdx.x < GATE_BM) huge_rows[threadIdx.x] = 0;
  float zpair[M::PAIR_TILES > 0 ? M::PAIR_TILES : 1][2] = {};
  float zlin[M::LIN_TILES][4] = {};
  for (int chunk = 0; chunk < chunks; ++chunk) {
    const int r0 = chunk * GATE_RC;
    // The source of shared row n (layout above MmaForm); null: zeros (or a unit row).
    auto weight_row = [&](int n) -> const T* {
      if (n >= M::LIN0) {
        const int e = e0 + n - M::LIN0;
        return (chunk == 0 && lin != nullptr && e < experts) ? lin + i64(e) * d : nullptr;
      }
      if (n >= M::L_ROWS) {  // R rows
        const int m = n - M::L_ROWS, j = r0 + m % GATE_RC;
        if constexpr (F == Form::LowRank) {
          const int e = e0 + m / GATE_RC;
          return (e < experts && j < rank) ? right + (i64(e) * rank + j) * d : nullptr;
        }
        if constexpr (F == Form::Attention) return j < rank ? query + i64(j) * d : nullptr;
        return nullptr;  // full: the unit row e_j
      }
      const int e = e0 + n / GATE_RC, j = r0 + n % GATE_RC;
      return (e < experts && j < rank) ? left + (i64(e) * rank + j) * d : nullptr;
    };
    auto unit_column = [&](int n) -> i64 {
      const int j = r0 + (n - M::L_ROWS);
      return (F == Form::Full && n >= M::L_ROWS && n < M::LIN0 && j < rank) ? j : -1;
    };

    float acc[TILES][4] = {};
    // The MMA_STAGES-deep ring: k-tile kt fills slot kt % MMA_STAGES, issued MMA_STAGES - 1
    // tiles ahead of the tensor cores. One barrier a k-tile: it publishes tile kt (every
    // thread's copies waited for) and frees the slot of kt - 1, which the fill issued after it
    // reuses.
    auto fill = [&](int kt) {
      T* As = smem + (kt % MMA_STAGES) * STAGE_ELEMS;
      const i64 k0 = i64(kt) * R::BK;
      load_tile_rows_async<T>(As, GATE_BM, x_row, no_unit, k0, d, vec, x);
      load_tile_rows_async<T>(As + GATE_BM * R::LD, M::COLS, weight_row, unit_column, k0, d, vec, x);
    };
    // The slots are free: nothing used them before the first chunk, and each chunk ends with
    // every copy landed and a barrier. huge_rows' clearing is ordered before any mark by the
    // barrier of k-tile 0.
#pragma unroll
    for (int s = 0; s < MMA_STAGES - 1; ++s) {
      if (s < ktiles) fill(s);
      cp_async_commit();
    }
    for (int kt = 0; kt < ktiles; ++kt) {
      cp_async_wait<MMA_STAGES - 2>();  // k-tile kt has landed (this thread's copies)
      __syncthreads();
      if (kt + MMA_STAGES - 1 < ktiles) fill(kt + MMA_STAGES - 1);
      cp_async_commit();
      const T* As = smem + (kt % MMA_STAGES) * STAGE_ELEMS;
      const T* Bs = As + GATE_BM * R::LD;
      if (!COEF && chunk == 0) mark_huge_rows(As, huge_rows);  // X is the same in every chunk
      // Column r of n8 tile i: column 2c + s of a pair tile (rank c, factor s), else a linear row.
      warp_k_tile<T, TILES>(acc, As, Bs, wm, [&](int i, int r) {
        return i < M::PAIR_TILES ? M::pair_row(wn * M::WE + i, r / 2, r % 2)
                                 : M::LIN0 + wn * M::WE + (i - M::PAIR_TILES) * 8 + r;
      });
    }
    cp_async_wait<0>();  // only empty groups remain
    __syncthreads();     // the slots are free for the next chunk; every huge_rows mark is visible
    if constexpr (COEF) {
      // Lane (g, t) holds L and R of rank r0 + t for rows g and g + 8 of each pair tile.
#pragma unroll
      for (int p = 0; p < M::PAIR_TILES; ++p) {
        const int e = e0 + wn * M::WE + p, j = r0 + t;
        if (e >= experts || j >= rank) continue;
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const i64 row = h ? row_bottom : row_top;
          if (row >= tokens) continue;
          const float gz = dz[row * experts + e], left_x = acc[p][2 * h], right_x = acc[p][2 * h + 1];
          // A zero dz (a row routed nowhere) gives exact zeros: its projections may be NaN.
          auto times_g = [gz](float v) { return gz == 0.0f ? 0.0f : gz * v; };
          float* coef_left = out + row * (2 * i64(experts) * rank) + i64(e) * rank;
          if constexpr (F == Form::Symmetric) {
            coef_left[j] = times_g(2.0f * left_x);
          } else {
            coef_left[j] = times_g(right_x) * pair_scale;
            coef_left[i64(experts) * rank + j] = times_g(left_x) * pair_scale;
          }
        }
      }
    } else {
#pragma unroll
      for (int p = 0; p < M::PAIR_TILES; ++p) {
        float top = acc[p][0] * acc[p][1], bottom = acc[p][2] * acc[p][3];
        top += __shfl_xor_sync(0xffffffffu, top, 1);
        top += __shfl_xor_sync(0xffffffffu, top, 2);
        bottom += __shfl_xor_sync(0xffffffffu, bottom, 1);
        bottom += __shfl_xor_sync(0xffffffffu, bottom, 2);
        zpair[p][0] += top * pair_scale;
        zpair[p][1] += bottom * pair_scale;
      }
#pragma unroll
      for (int i = 0; i < M::LIN_TILES; ++i)
#pragma unroll
        for (int c = 0; c < 4; ++c) zlin[i][c] += acc[M::PAIR_TILES + i][c];
    }
  }

  if constexpr (COEF) return;
  // Lane t writes experts 2t, 2t+1 of each linear tile (rows g and g + 8); the pair sums
  // of those experts are in every lane of its quad.
  const bool huge_top = huge_rows[wm * 16 + g], huge_bottom = huge_rows[wm * 16 + g + 8];
  const float nan = __uint_as_float(kQuietNaN);
#pragma unroll
  for (int i = 0; i < M::LIN_TILES; ++i) {
#pragma unroll
    for (int s = 0; s < 2; ++s) {
      const int local = i * 8 + 2 * t + s;  // expert within this warp's WE
      const int e = e0 + wn * M::WE + local;
      float top = zlin[i][s], bottom = zlin[i][2 + s];
      if constexpr (M::pairs) {
        // zpair is indexed by a compile-time p: pick this lane's expert without dynamic indexing.
#pragma unroll
        for (int p = i * 8; p < i * 8 + 8; ++p) {
          if (p == local) {
            top += zpair[p][0];
            bottom += zpair[p][1];
          }
        }
      }
      if (e >= experts) continue;
      const float b = bias ? bias[e] : 0.0f;
      if (row_top < tokens) out[row_top * experts + e] = huge_top ? nan : top + b;
      if (row_bottom < tokens) out[row_bottom * experts + e] = huge_bottom ? nan : bottom + b;
    }
  }
}
