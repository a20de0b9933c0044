// fp16 <-> float conversion of whole blocks, through F16C in the AVX2 build.
//
// Note: GCC 12 does not vectorize _Float16 conversions, and the branch-free integer version
// in convert.h costs ~20 operations per 8 halves, which made fp16 loops compute-bound at
// ~40% of the read bandwidth. Where F16C exists, fp16 arrays are converted 8 at a time
// (vcvtph2ps / vcvtps2ph, round to nearest even); the driver (cpu/driver.h) stages half
// arrays through float blocks with these.
#pragma once
#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "cpu/convert.h"
#if defined(__F16C__)
#include <immintrin.h>
#endif

namespace pyengine::cpu {

constexpr std::int64_t kStageBlock = 512;  // elements per staged block: 2 KB of floats, in L1

inline void halves_to_floats(const half_t* s, float* d, std::int64_t n) {
  std::int64_t i = 0;
#if defined(__F16C__)
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(d + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i))));
#endif
#pragma omp simd
  for (std::int64_t j = i; j < n; ++j) d[j] = to_float(s[j]);
}

inline void floats_to_halves(const float* s, half_t* d, std::int64_t n) {
  std::int64_t i = 0;
#if defined(__F16C__)
  for (; i + 8 <= n; i += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(d + i),
                     _mm256_cvtps_ph(_mm256_loadu_ps(s + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#endif
#pragma omp simd
  for (std::int64_t j = i; j < n; ++j) d[j] = from_float<half_t>(s[j]);
}

}  // namespace pyengine::cpu
