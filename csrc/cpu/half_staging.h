// fp16 through F16C in blocks, for the AVX2 build.
//
// Note: GCC 12 does not vectorize _Float16 conversions, and the branch-free integer version
// in convert.h costs ~20 operations per 8 halves, which made fp16 loops compute-bound at
// ~40% of the read bandwidth. Where F16C exists, fp16 arrays are converted 8 at a time
// (vcvtph2ps / vcvtps2ph, round to nearest even) into a small float block on the stack, and
// the same float loops run over it. Elsewhere, and for every other dtype, nothing changes.
#pragma once
#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "cpu/convert.h"
#if defined(__F16C__)
#include <immintrin.h>
#endif

namespace pyengine::cpu {

#if defined(__F16C__)
constexpr bool kHaveF16C = true;
#else
constexpr bool kHaveF16C = false;
#endif

constexpr std::int64_t kStageBlock = 512;

template <class T> constexpr bool kStaged = kHaveF16C && std::is_same_v<T, half_t>;
template <class T> using Staged = std::conditional_t<kStaged<T>, float, T>;

inline void halves_to_floats(const half_t* s, float* d, std::int64_t n) {
  std::int64_t i = 0;
#if defined(__F16C__)
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(d + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i))));
#endif
  for (; i < n; ++i) d[i] = to_float(s[i]);
}

inline void floats_to_halves(const float* s, half_t* d, std::int64_t n) {
  std::int64_t i = 0;
#if defined(__F16C__)
  for (; i + 8 <= n; i += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(d + i),
                     _mm256_cvtps_ph(_mm256_loadu_ps(s + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#endif
  for (; i < n; ++i) d[i] = from_float<half_t>(s[i]);
}

// The elements [bb, bb + len) of an input array: the array itself, or its halves in tmp.
template <class T> const Staged<T>* stage_in(const T* p, std::int64_t bb, std::int64_t len, float* tmp) {
  if constexpr (kStaged<T>) {
    halves_to_floats(p + bb, tmp, len);
    return tmp;
  } else {
    return p == nullptr ? nullptr : p + bb;
  }
}

// Where a loop writes [bb, bb + len) of an output array (tmp for fp16), then commit_out.
template <class T> Staged<T>* stage_out(T* p, std::int64_t bb, float* tmp) {
  if constexpr (kStaged<T>) return p == nullptr ? nullptr : tmp;
  else return p == nullptr ? nullptr : p + bb;
}
template <class T> void commit_out(T* p, std::int64_t bb, std::int64_t len, const float* tmp) {
  if constexpr (kStaged<T>) {
    if (p != nullptr) floats_to_halves(tmp, p + bb, len);
  }
}

// f(bb, len) over [b, e): in blocks of kStageBlock when any of Ts is staged, else once.
template <class... Ts, class F> void staged_blocks(std::int64_t b, std::int64_t e, F&& f) {
  if constexpr ((kStaged<Ts> || ...)) {
    for (std::int64_t bb = b; bb < e; bb += kStageBlock) f(bb, std::min(kStageBlock, e - bb));
  } else {
    if (b < e) f(b, e - b);
  }
}

}  // namespace pyengine::cpu
