// gate_forms.cuh: what the gate kernels share about the scoring forms (kernels/gate.cu).
#pragma once
#include "gate_tile.cuh"

enum class Form { Linear, LowRank, Symmetric, Attention, Full };

constexpr int GATE_RC = 4;   // ranks per chunk: the projections of one chunk form one tile
constexpr int GATE_BM = 64;  // tokens per block of every scoring tile

// The weight operands of a scoring kernel, by the part they play (null when absent).
struct GateWeightsPtrs {
  const void* left;   // U, K or A: [E, rank, d]
  const void* right;  // V: [E, rank, d]
  const void* query;  // Q: [rank, d]
  const void* lin;    // W or B: [E, d]
};

// p + off, or null for a null p (an absent optional operand).
__device__ __forceinline__ const float* offset(const float* p, i64 off) { return p ? p + off : nullptr; }
