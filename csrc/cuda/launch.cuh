// CUDA driver helpers: dtype dispatch, W-wide loads/stores, grid sizing, launch checks.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "pyengine/core.h"

namespace pyengine::cuda {

struct NoModel {};  // "no half-precision model copy"

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <class T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// Elements per thread step on the vector path: 4 x fp32 = one 16-byte load.
constexpr int kVec = 4;
constexpr int kBlock = 256;

template <class T, int W> struct alignas(sizeof(T) * W) Pack { T v[W]; };

template <int W, class T> __device__ __forceinline__ void load(const T* p, std::int64_t i, float (&x)[W]) {
  Pack<T, W> pk = *reinterpret_cast<const Pack<T, W>*>(p + i);
#pragma unroll
  for (int j = 0; j < W; ++j) x[j] = to_float(pk.v[j]);
}
template <int W, class T> __device__ __forceinline__ void store(T* p, std::int64_t i, const float (&x)[W]) {
  if constexpr (!std::is_same_v<T, NoModel>) {
    Pack<T, W> pk;
#pragma unroll
    for (int j = 0; j < W; ++j) pk.v[j] = from_float<T>(x[j]);
    *reinterpret_cast<Pack<T, W>*>(p + i) = pk;
  }
}

inline bool aligned(const void* p, int elem_bytes) {
  return reinterpret_cast<std::uintptr_t>(p) % (static_cast<std::uintptr_t>(elem_bytes) * kVec) == 0;
}

template <class F> inline void with_dtype(DType t, F&& f) {
  switch (t) {
    case DType::f32: f(float{}); return;
    case DType::f16: f(__half{}); return;
    case DType::bf16: f(__nv_bfloat16{}); return;
  }
}
template <class F> inline void with_model_dtype(const void* model, DType t, F&& f) {
  if (model == nullptr) f(NoModel{});
  else with_dtype(t, f);
}

inline cudaStream_t as_stream(Stream s) { return reinterpret_cast<cudaStream_t>(s); }

[[noreturn]] inline void raise_cuda(cudaError_t err, const char* op) {
  throw std::runtime_error(std::string("pyengine.") + op + ": CUDA error " + cudaGetErrorName(err) + ": " +
                           cudaGetErrorString(err));
}
inline void check(cudaError_t err, const char* op) {
  if (err != cudaSuccess) raise_cuda(err, op);
}
// After a launch: a bad configuration or a sticky error surfaces here, named by op.
inline void check_launch(const char* op) { check(cudaGetLastError(), op); }

int sm_count();  // of the current device, cached

// Enough blocks of kBlock threads to cover `work` thread-steps, at most 8 per SM (grid-stride beyond).
inline unsigned grid_for(std::int64_t work) {
  std::int64_t blocks = (work + kBlock - 1) / kBlock;
  std::int64_t cap = static_cast<std::int64_t>(sm_count()) * 8;
  if (blocks > cap) blocks = cap;
  return static_cast<unsigned>(blocks < 1 ? 1 : blocks);
}

// Runs op.template apply<W>(i) for every W-element group: the vector path when `vec`, then
// the scalar tail. Op::prepare() reads device-resident scalars once per thread and may
// return false to skip the whole launch (the non-finite flag).
template <class Op> __global__ void elementwise_kernel(Op op, std::int64_t n, bool vec) {
  if (!op.prepare()) return;
  std::int64_t tid = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x;
  std::int64_t stride = static_cast<std::int64_t>(gridDim.x) * blockDim.x;
  std::int64_t groups = vec ? n / kVec : 0;
  for (std::int64_t g = tid; g < groups; g += stride) op.template apply<kVec>(g * kVec);
  for (std::int64_t i = groups * kVec + tid; i < n; i += stride) op.template apply<1>(i);
}

template <class Op> void launch_elementwise(const Op& op, std::int64_t n, bool vec, Stream s, const char* name) {
  if (n == 0) return;
  std::int64_t work = vec ? (n + kVec - 1) / kVec : n;
  elementwise_kernel<<<grid_for(work), kBlock, 0, as_stream(s)>>>(op, n, vec);
  check_launch(name);
}

}  // namespace pyengine::cuda
