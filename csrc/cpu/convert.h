// Host storage types for fp16/bf16 and their conversions to and from float.
//
// Note: fp16 uses the compiler's _Float16, which GCC lowers to F16C's vcvtph2ps/vcvtps2ph
// (vectorized) when the ISA build enables it and to exact software conversion otherwise.
// bf16 is plain bit arithmetic (round to nearest even, NaN kept quiet), as torch does it.
#pragma once
#include <cstdint>
#include <cstring>

#include "pyengine/core.h"

namespace pyengine::cpu {

using half_t = _Float16;
struct bf16_t {
  std::uint16_t bits;
};
struct NoModel {};  // "no half-precision model copy" in the optimizer loops

inline float to_float(float x) { return x; }
inline float to_float(half_t x) { return static_cast<float>(x); }
inline float to_float(bf16_t x) {
  return __builtin_bit_cast(float, static_cast<std::uint32_t>(x.bits) << 16);
}

template <class T> inline T from_float(float x);
template <> inline float from_float<float>(float x) { return x; }
template <> inline half_t from_float<half_t>(float x) { return static_cast<half_t>(x); }
template <> inline bf16_t from_float<bf16_t>(float x) {
  std::uint32_t u = __builtin_bit_cast(std::uint32_t, x);
  std::uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  bool nan = (u & 0x7fffffffu) > 0x7f800000u;
  return bf16_t{static_cast<std::uint16_t>(nan ? 0x7fc0u : rounded)};
}

// Calls f(T{}) with T the storage type of `t`.
template <class F> inline void with_dtype(DType t, F&& f) {
  switch (t) {
    case DType::f32: f(float{}); return;
    case DType::f16: f(half_t{}); return;
    case DType::bf16: f(bf16_t{}); return;
  }
}

}  // namespace pyengine::cpu
