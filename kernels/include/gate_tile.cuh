// gate_tile.cuh: the pieces of the tiled f32 GEMMs on k-major shared tiles: the gate's
// split-tf32 tile (gate_tf32.cuh: the f32 linear forward, dX, dW) and the codebook's f32 FMA
// tile (codebook_nearest.cuh).
//
// Each is C[m][n] = sum_k A(m, k) * B(k, n) over k-tiles of width GATE_BK held in shared
// memory as f32, k-major: As[k][m] and Bs[k][n]. The loaders below convert the stored dtype
// (f32, f16, bf16) to f32 once, when a tile is filled, so the inner loop reads f32 from shared
// memory whatever the input dtype.
//
// tile_fma's thread mapping (256 threads = 16 x 16): tx = threadIdx.x % 16, ty = threadIdx.x / 16.
// Thread (ty, tx) owns rows m = ty + 16 i (i < TM) and column groups g = tx + 16 j (j < NG),
// each group NC adjacent columns.
#pragma once
#include "common.cuh"

constexpr int GATE_THREADS = 256;
constexpr int GATE_BK = 16;  // k-tile width: 64 B of f32, 32 B of f16/bf16 per row

// 16 bytes read by one load_128, as raw words (the 16-bit types are not trivially copyable
// on the emulator, so they are unpacked from the words below).
struct alignas(16) Raw16 {
  uint32_t w[4];
};
template <class S> constexpr int elems_per_16 = 16 / int(sizeof(S));

// Element q of a Raw16 holding S values (little-endian, as on every CUDA target).
template <class S>
__device__ __forceinline__ float raw16_element(const Raw16& r, int q, S*) {
  constexpr int per_word = 4 / int(sizeof(S));
  return bits_to_f32<S>(r.w[q / per_word] >> (32 / per_word * (q % per_word)));
}

// True when rows starting at `base + i * stride` (elements) are all 16-byte aligned, so
// every 16-byte-aligned k offset inside a row may be read with load_128.
template <class S>
__device__ __forceinline__ bool rows_aligned_16(const S* base, i64 stride) {
  return base == nullptr ||
         ((reinterpret_cast<uintptr_t>(base) % 16) == 0 && (stride * i64(sizeof(S))) % 16 == 0);
}

// Reads V = elems_per_16<S> consecutive elements p[k .. k+V) as f32: one 16-byte load when
// `vec` (p + k aligned) and all are below `len`, else element by element, 0 past `len` or
// for a null row.
template <class S>
__device__ __forceinline__ void read_run(float (&out)[elems_per_16<S>], const S* p, i64 k, i64 len,
                                         bool vec) {
  constexpr int V = elems_per_16<S>;
  if (p != nullptr && vec && k + V <= len) {
    const Raw16 raw = load_128(reinterpret_cast<const Raw16*>(p + k));
#pragma unroll
    for (int q = 0; q < V; ++q) out[q] = raw16_element(raw, q, static_cast<S*>(nullptr));
  } else {
#pragma unroll
    for (int q = 0; q < V; ++q) out[q] = (p != nullptr && k + q < len) ? to_f32(p[k + q]) : 0.0f;
  }
}

// The same run as raw bits, laid out as the 16-byte load lays them out (raw16_element reads
// them). Nothing here uses the loaded words, so a caller can keep them in flight while it works
// (TileStage); the element path (edges, unaligned rows) packs each element's bits.
template <class S>
__device__ __forceinline__ Raw16 read_run_raw(const S* p, i64 k, i64 len, bool vec) {
  constexpr int V = elems_per_16<S>, per_word = V / 4;
  if (p != nullptr && vec && k + V <= len) return load_128(reinterpret_cast<const Raw16*>(p + k));
  Raw16 raw = {};
#pragma unroll
  for (int q = 0; q < V; ++q)
    if (p != nullptr && k + q < len) raw.w[q / per_word] |= element_bits(p[k + q]) << (32 / per_word * (q % per_word));
  return raw;
}

// The loaders below split each k-tile into items of 16 bytes of source, item i handled by thread
// i % GATE_THREADS: fetch_item reads item i (as f32, or as raw bits for TileStage), store_item
// writes its f32 values to the tile. load_tile_k_contiguous fetches and stores each item in
// turn; TileStage keeps a whole k-tile's items in registers between the two, so a kernel can
// fetch k-tile k + 1 while it works on k-tile k (staged_k_loop, below).

// k-contiguous sources (X rows, weight rows): tile[k * ld + m] = row(m)[k0 + k] for m < rows,
// k < GATE_BK. Elements at k0 + k >= klen and null rows are 0. vec: every row start is 16-byte
// aligned (rows_aligned_16); k0 is a multiple of GATE_BK. Item i is row i / UNITS, run i % UNITS.
struct KContiguous {
  template <class S>
  __host__ __device__ static constexpr int items(int rows) { return rows * (GATE_BK / elems_per_16<S>); }
  template <class S, class RowFn>
  __device__ __forceinline__ static void fetch_item(float (&v)[elems_per_16<S>], int item, RowFn row,
                                                    i64 k0, i64 klen, bool vec) {
    constexpr int V = elems_per_16<S>, UNITS = GATE_BK / V;
    read_run<S>(v, row(item / UNITS), k0 + item % UNITS * V, klen, vec);
  }
  template <class S, class RowFn>
  __device__ __forceinline__ static void fetch_item(Raw16& raw, int item, RowFn row, i64 k0, i64 klen,
                                                    bool vec) {
    constexpr int V = elems_per_16<S>, UNITS = GATE_BK / V;
    raw = read_run_raw<S>(row(item / UNITS), k0 + item % UNITS * V, klen, vec);
  }
  // huge_rows (shared, or null): set to 1 for a row with a huge_input element (an atomic: several
  // threads load one row, and plain stores of one flag would race).
  // Interleaved: element q of run u goes to tile row q * UNITS + u instead of u * V + q. A GEMM
  // may hold its k-tile's rows in any order both operands share, and this one spreads a warp's
  // stores (8 rows m x UNITS runs, one element each at a time) over 32 distinct banks when
  // ld = 8 (mod 32), where the natural order puts the runs of a row 4 V rows = 0 (mod 32) banks
  // apart: a 4-way conflict on every store.
  template <class S, bool Interleaved = false>
  __device__ __forceinline__ static void store_item(float* tile, int ld, int item,
                                                    const float (&v)[elems_per_16<S>], int* huge_rows) {
    constexpr int V = elems_per_16<S>, UNITS = GATE_BK / V;
    const int m = item / UNITS, u = item % UNITS;
#pragma unroll
    for (int q = 0; q < V; ++q) {
      tile[(Interleaved ? q * UNITS + u : u * V + q) * ld + m] = v[q];
      if (huge_rows && huge_input(v[q])) atomicOr(&huge_rows[m], 1);
    }
  }
};

template <class S, class RowFn>
__device__ __forceinline__ void load_tile_k_contiguous(float* tile, int ld, int rows, RowFn row,
                                                       i64 k0, i64 klen, bool vec) {
  for (int item = threadIdx.x; item < KContiguous::items<S>(rows); item += GATE_THREADS) {
    float v[elems_per_16<S>];
    KContiguous::fetch_item<S>(v, item, row, k0, klen, vec);
    KContiguous::store_item<S>(tile, ld, item, v, nullptr);
  }
}

// m-contiguous sources: tile[k * ld + m] = row(k)[m] for k < GATE_BK, m < width, where row(k)
// already points at the tile's first column (null: a row of 0). Elements at m >= mlen are 0.
// width: a multiple of 16/sizeof(S). vec: row(k) 16-byte aligned. Item i is row i / (width / V),
// run i % (width / V).
struct MContiguous {
  template <class S>
  __host__ __device__ static constexpr int items(int width) { return GATE_BK * (width / elems_per_16<S>); }
  template <class S, class RowFn>
  __device__ __forceinline__ static void fetch_item(Raw16& raw, int item, int width, RowFn row, i64 mlen,
                                                    bool vec) {
    const int units = width / elems_per_16<S>;
    raw = read_run_raw<S>(row(item / units), i64(item % units) * elems_per_16<S>, mlen, vec);
  }
  // finite_only: NaN and +-inf store as 0 too (gate_dw's X: such a row was routed nowhere).
  template <class S>
  __device__ __forceinline__ static void store_item(float* tile, int ld, int width, int item,
                                                    const float (&v)[elems_per_16<S>], bool finite_only) {
    constexpr int V = elems_per_16<S>;
    const int units = width / V, k = item / units, u = item % units;
#pragma unroll
    for (int q = 0; q < V; ++q) tile[k * ld + u * V + q] = finite_only && !finite_f32(v[q]) ? 0.0f : v[q];
  }
};

// A k-tile's worth of items (COUNT of them, 16 bytes of S each) in registers, as raw bits: thread
// t holds items t + i * GATE_THREADS, i < ITEMS. fetch(f) calls f(raw, item) to read each (a
// layout's raw fetch_item); store(f) unpacks each to f32 and calls f(item, values) (its store_item).
template <class S, int COUNT>
struct TileStage {
  static constexpr int V = elems_per_16<S>, ITEMS = (COUNT + GATE_THREADS - 1) / GATE_THREADS;
  Raw16 raw[ITEMS];
  template <class Fetch>
  __device__ __forceinline__ void fetch(Fetch f) {
#pragma unroll
    for (int i = 0; i < ITEMS; ++i) {
      const int item = threadIdx.x + i * GATE_THREADS;
      if (COUNT % GATE_THREADS == 0 || item < COUNT) f(raw[i], item);
    }
  }
  template <class Store>
  __device__ __forceinline__ void store(Store f) const {
#pragma unroll
    for (int i = 0; i < ITEMS; ++i) {
      const int item = threadIdx.x + i * GATE_THREADS;
      if (COUNT % GATE_THREADS != 0 && item >= COUNT) continue;
      float v[V];
#pragma unroll
      for (int q = 0; q < V; ++q) v[q] = raw16_element(raw[i], q, static_cast<S*>(nullptr));
      f(item, v);
    }
  }
};

// Double buffering through registers: runs compute(As, Bs) over the k-tiles k0 = begin,
// begin + GATE_BK, ... < end. fetch(k0) reads k-tile k0 into the caller's TileStages, store(As, Bs, k0)
// writes k-tile k0 into a slot of slot_floats floats (As at its start, Bs at b_offset). Each step stores
// the fetched tile into slot step % 2, passes one barrier, fetches the next tile and runs compute
// on the stored one, so the loads of k-tile k + 1 are in flight while k-tile k is worked on. One
// barrier a step suffices: a slot is rewritten two steps after its last read, and no thread passes
// the barrier of the step between before every thread has finished that read. `step` carries the
// slot parity across calls (gate_dx's segments, the forward's rank chunks).
constexpr int STAGED_SLOTS = 2;
template <class Fetch, class Store, class Compute>
__device__ __forceinline__ void staged_k_loop(float* smem, int slot_floats, int b_offset, int& step, i64 begin,
                                              i64 end, Fetch fetch, Store store, Compute compute) {
  if (begin >= end) return;
  fetch(begin);
  for (i64 k0 = begin; k0 < end; k0 += GATE_BK, ++step) {
    float* As = smem + (step % STAGED_SLOTS) * slot_floats;
    float* Bs = As + b_offset;
    store(As, Bs, k0);
    __syncthreads();  // the slot is filled; the other slot's compute (step - 1) is done everywhere
    if (k0 + GATE_BK < end) fetch(k0 + GATE_BK);
    compute(static_cast<const float*>(As), static_cast<const float*>(Bs));
  }
}

// acc[i][j * NC + c] += sum_k As[k][ty + 16 i] * Bs[k][(tx + 16 j) * NC + c] over one k-tile.
template <int TM, int NG, int NC>
__device__ __forceinline__ void tile_fma(float (&acc)[TM][NG * NC], const float* As, int lda,
                                         const float* Bs, int ldb, int ty, int tx) {
#pragma unroll 2
  for (int k = 0; k < GATE_BK; ++k) {
    float a[TM];
#pragma unroll
    for (int i = 0; i < TM; ++i) a[i] = As[k * lda + ty + 16 * i];
#pragma unroll
    for (int j = 0; j < NG; ++j) {
#pragma unroll
      for (int c = 0; c < NC; ++c) {
        const float b = Bs[k * ldb + (tx + 16 * j) * NC + c];
#pragma unroll
        for (int i = 0; i < TM; ++i) acc[i][j * NC + c] = fmaf(a[i], b, acc[i][j * NC + c]);
      }
    }
  }
}
