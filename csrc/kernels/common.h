// Shared by the CPU and CUDA drivers: the host+device qualifier for element functors.
#pragma once
#include <cmath>
#if defined(__CUDACC__)
#define PE_HD __host__ __device__ __forceinline__
#else
#define PE_HD inline
#endif

namespace pyengine::kernels {
PE_HD float sqrt_(float x) {
#if defined(__CUDA_ARCH__)
  return __fsqrt_rn(x);  // IEEE-rounded, like the CPU's sqrtss
#else
  return __builtin_sqrtf(x);
#endif
}
}  // namespace pyengine::kernels
