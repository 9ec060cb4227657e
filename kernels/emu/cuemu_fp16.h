// cuemu_fp16.h: CUDA's 16-bit float types for the CPU emulator.
//
// Storage is the IEEE bit pattern, so buffers are bit-compatible with the GPU's and with
// Rust's `half::{f16, bf16}`. Conversions follow PTX `cvt`: float -> f16/bf16 rounds to
// nearest even, overflows to infinity, and maps every NaN to the canonical 0x7fff;
// f16/bf16 -> float is exact. Arithmetic operators compute in float and round once, which
// equals the correctly rounded 16-bit operation (24 >= 2*11 + 2 bits, so double rounding
// is harmless), matching the native sm_80+ instructions.
#pragma once
#include <math.h>
#include <stdint.h>
#include <string.h>

namespace cuemu {
inline uint32_t float_bits(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
inline float bits_float(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }

inline uint16_t float_to_bf16_bits(float f) {
  const uint32_t u = float_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fff;
  return uint16_t((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);  // RNE; carries into inf
}
inline float bf16_bits_to_float(uint16_t h) { return bits_float(uint32_t(h) << 16); }

inline uint16_t float_to_f16_bits(float f) {
  const uint32_t u = float_bits(f), sign = (u >> 16) & 0x8000u, a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return 0x7fff;                       // NaN
  if (a >= 0x477ff000u) return uint16_t(sign | 0x7c00u);    // >= 65520 rounds to inf
  if (a < 0x38800000u) {                                    // below 2^-14: subnormal or 0
    // 0.5f has a float ulp of 2^-24, the f16 subnormal step: the FPU rounds for us.
    const float r = bits_float(a) + 0.5f;
    return uint16_t(sign | (float_bits(r) - 0x3f000000u));
  }
  const uint32_t m = a - 0x38000000u;                       // rebias exponent 127 -> 15
  return uint16_t(sign | ((m + 0xfffu + ((m >> 13) & 1u)) >> 13));
}
inline float f16_bits_to_float(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000u) << 16, e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
  if (e == 31) return bits_float(sign | 0x7f800000u | (m << 13));
  if (e == 0) {
    const float r = float(m) * 5.9604644775390625e-8f;  // m * 2^-24, exact
    return sign ? -r : r;
  }
  return bits_float(sign | ((e + 112u) << 23) | (m << 13));
}
// cvt.rna.tf32.f32: float -> tf32 (10 explicit mantissa bits, the low 13 of the f32 bit
// pattern zero), rounded to nearest with ties away from zero; a carry may reach infinity.
// Every NaN maps to one quiet NaN that survives the truncation.
inline uint32_t float_to_tf32_bits(float f) {
  const uint32_t u = float_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fffe000u;
  return (u + 0x1000u) & 0xffffe000u;
}
// double -> float rounded to odd. Rounding that to a 16-bit type (nearest even) equals
// rounding the double directly, since float keeps >= 2 more bits than f16 or bf16: this is
// how doubles and fused multiply-adds reach 16 bits without rounding twice.
inline float double_to_float_odd(double d) {
  float f = float(d);
  if (double(f) == d || d != d) return f;
  if (fabs(double(f)) > fabs(d)) f = nextafterf(f, 0.0f);  // the neighbour toward zero
  return bits_float(float_bits(f) | 1u);
}
}  // namespace cuemu

// One definition for both types: Name, bits->float, float->bits.
#define CUEMU_HALF_TYPE(Name, ToFloat, FromFloat)                                                 \
  struct Name {                                                                                   \
    unsigned short __x = 0; /* "= 0" keeps static shared arrays free of TLS init guards */        \
    Name() = default;                                                                             \
    Name(float f) : __x(::cuemu::FromFloat(f)) {}                                                 \
    Name(double f) : __x(::cuemu::FromFloat(::cuemu::double_to_float_odd(f))) {}                 \
    Name(int i) : Name(float(i)) {}                                                               \
    operator float() const { return ::cuemu::ToFloat(__x); }                                      \
  };                                                                                              \
  inline Name operator+(Name a, Name b) { return Name(float(a) + float(b)); }                     \
  inline Name operator-(Name a, Name b) { return Name(float(a) - float(b)); }                     \
  inline Name operator*(Name a, Name b) { return Name(float(a) * float(b)); }                     \
  inline Name operator/(Name a, Name b) { return Name(float(a) / float(b)); }                     \
  inline Name operator-(Name a) { Name r = a; r.__x ^= 0x8000u; return r; }                       \
  inline Name& operator+=(Name& a, Name b) { return a = a + b; }                                  \
  inline Name& operator*=(Name& a, Name b) { return a = a * b; }                                  \
  inline bool operator==(Name a, Name b) { return float(a) == float(b); }                         \
  inline bool operator!=(Name a, Name b) { return float(a) != float(b); }                         \
  inline bool operator<(Name a, Name b) { return float(a) < float(b); }                           \
  inline bool operator>(Name a, Name b) { return float(a) > float(b); }                           \
  inline bool operator<=(Name a, Name b) { return float(a) <= float(b); }                         \
  inline bool operator>=(Name a, Name b) { return float(a) >= float(b); }

CUEMU_HALF_TYPE(__half, f16_bits_to_float, float_to_f16_bits)
CUEMU_HALF_TYPE(__nv_bfloat16, bf16_bits_to_float, float_to_bf16_bits)
#undef CUEMU_HALF_TYPE

struct __attribute__((aligned(4))) __half2 { __half x, y; };
struct __attribute__((aligned(4))) __nv_bfloat162 { __nv_bfloat16 x, y; };
typedef __half half;
typedef __half2 half2;
typedef __nv_bfloat16 nv_bfloat16;
typedef __nv_bfloat162 nv_bfloat162;

inline __half __float2half(float f) { return __half(f); }
inline __half __float2half_rn(float f) { return __half(f); }
inline float __half2float(__half h) { return float(h); }
inline __half2 __floats2half2_rn(float a, float b) { return {__half(a), __half(b)}; }
inline __half2 __float2half2_rn(float a) { return {__half(a), __half(a)}; }
inline float2 __half22float2(__half2 h) { return {float(h.x), float(h.y)}; }
inline float __low2float(__half2 h) { return float(h.x); }
inline float __high2float(__half2 h) { return float(h.y); }
inline unsigned short __half_as_ushort(__half h) { return h.__x; }
inline __half __ushort_as_half(unsigned short u) { __half h; h.__x = u; return h; }
inline __half __hadd(__half a, __half b) { return a + b; }
inline __half __hmul(__half a, __half b) { return a * b; }
// One rounding, like fma.rn.f16: the double FMA of f16 values is exact.
inline __half __hfma(__half a, __half b, __half c) { return __half(fma(double(a), double(b), double(c))); }
inline bool __hisnan(__half h) { return (h.__x & 0x7fffu) > 0x7c00u; }

inline __nv_bfloat16 __float2bfloat16(float f) { return __nv_bfloat16(f); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return __nv_bfloat16(f); }
inline float __bfloat162float(__nv_bfloat16 h) { return float(h); }
inline __nv_bfloat162 __floats2bfloat162_rn(float a, float b) { return {__nv_bfloat16(a), __nv_bfloat16(b)}; }
inline __nv_bfloat162 __float2bfloat162_rn(float a) { return {__nv_bfloat16(a), __nv_bfloat16(a)}; }
inline float2 __bfloat1622float2(__nv_bfloat162 h) { return {float(h.x), float(h.y)}; }
inline float __low2float(__nv_bfloat162 h) { return float(h.x); }
inline float __high2float(__nv_bfloat162 h) { return float(h.y); }
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 h) { return h.__x; }
inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short u) { __nv_bfloat16 h; h.__x = u; return h; }
inline __nv_bfloat16 __hadd(__nv_bfloat16 a, __nv_bfloat16 b) { return a + b; }
inline __nv_bfloat16 __hmul(__nv_bfloat16 a, __nv_bfloat16 b) { return a * b; }
inline __nv_bfloat16 __hfma(__nv_bfloat16 a, __nv_bfloat16 b, __nv_bfloat16 c) {
  return __nv_bfloat16(fma(double(a), double(b), double(c)));
}
inline bool __hisnan(__nv_bfloat16 h) { return (h.__x & 0x7fffu) > 0x7f80u; }
