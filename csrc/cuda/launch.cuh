// The CUDA elementwise driver, twin of cpu/driver.h: one generic kernel serves every fused op.
//
// An op is an element functor over floats (kernels/*.h) plus the arrays it walks, tagged with
// how each is accessed: in / out / inout / in_zero (read, then cleared in the same pass) /
// none (an absent optional array: reads 0, writes dropped). A `prologue` functor runs once per thread before any
// element: it reads the device-resident scalars (flag, step, multiplier) and returns whether
// to run the functor, or only to clear the in_zero arrays (a skipped optimizer step).
//
// Note: memory-bound kernels need many loads in flight. Each thread handles kUnroll groups of
// kVec elements per loop iteration and issues every load of all of them before any store
// (the arrays may alias as far as the compiler knows, so a store would hold back the loads
// after it); consecutive threads take consecutive groups, so every load is coalesced; a group
// is one 16-byte load for fp32 (8 for fp16/bf16). The grid is one full wave of this kernel
// as its registers allow (cudaOccupancyMaxActiveBlocksPerMultiprocessor, cached), or less
// when the work is small, and strides over the rest.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>

#include "pyengine/core.h"
#include "pyengine/launch_shape.h"

namespace pyengine::cuda {

struct NoArray {};  // an absent optional array (no model copy, no momentum buffer)

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <class T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

constexpr int kVec = 4;  // elements per group on the vector path
constexpr int kBlock = 256;

template <class T, int W> struct alignas(sizeof(T) * W) Pack { T v[W]; };

template <int W, class T> __device__ __forceinline__ void load(const T* p, std::int64_t i, float (&x)[W]) {
  Pack<T, W> pk = *reinterpret_cast<const Pack<T, W>*>(p + i);
#pragma unroll
  for (int j = 0; j < W; ++j) x[j] = to_float(pk.v[j]);
}
template <int W, class T> __device__ __forceinline__ void store(T* p, std::int64_t i, const float (&x)[W]) {
  if constexpr (!std::is_same_v<std::remove_const_t<T>, NoArray>) {
    Pack<T, W> pk;
#pragma unroll
    for (int j = 0; j < W; ++j) pk.v[j] = from_float<T>(x[j]);
    *reinterpret_cast<Pack<T, W>*>(p + i) = pk;
  }
}

enum class Access { In, Out, InOut, InZero, None };

template <class T, Access A> struct Array {
  using type = std::remove_const_t<T>;
  static constexpr Access access = A;
  static constexpr bool reads = A == Access::In || A == Access::InOut || A == Access::InZero;
  static constexpr bool writes = A == Access::Out || A == Access::InOut;
  T* p;
};
template <class T> Array<const T, Access::In> in(const T* p) { return {p}; }
template <class T> Array<T, Access::Out> out(T* p) { return {p}; }
template <class T> Array<T, Access::InOut> inout(T* p) { return {p}; }
template <class T> Array<T, Access::InZero> in_zero(T* p) { return {p}; }
inline Array<NoArray, Access::None> none() { return {nullptr}; }
template <class T> inline auto optional_out(void* p) {
  if constexpr (std::is_same_v<T, NoArray>) return none();
  else return out(static_cast<T*>(p));
}

// What a thread does, decided once by the prologue.
template <class Elem> struct Plan {
  bool run;         // apply the functor
  bool clear_only;  // else: only clear the in_zero arrays (a skipped step that clears its grad)
  Elem elem;
};

// A prologue with nothing to decide: always run `elem`.
template <class Elem> struct Always {
  Elem elem;
  __device__ Plan<Elem> operator()() const { return {true, false, elem}; }
};

namespace detail {

template <class A, int W> __device__ __forceinline__ void load_one(const A& a, std::int64_t i, float (&x)[W]) {
  if constexpr (A::reads) {
    load<W>(a.p, i, x);
  } else if constexpr (A::access == Access::None) {  // an absent array reads 0
#pragma unroll
    for (int j = 0; j < W; ++j) x[j] = 0.0f;
  }
}
template <class A, int W> __device__ __forceinline__ void store_one(const A& a, std::int64_t i, const float (&x)[W]) {
  if constexpr (A::access == Access::InZero) {
    float z[W] = {};
    store<W>(a.p, i, z);
  } else if constexpr (A::writes) {
    store<W>(a.p, i, x);
  }
}
template <class A, int W> __device__ __forceinline__ void clear_one(const A& a, std::int64_t i) {
  if constexpr (A::access == Access::InZero) {
    float z[W] = {};
    store<W>(a.p, i, z);
  }
}
template <class A> __device__ __forceinline__ decltype(auto) arg(float& x) {
  if constexpr (A::access == Access::In || A::access == Access::InZero) return static_cast<float>(x);
  else return (x);
}

// U groups of W elements at `first`, `first + step`, ...; group g covers [g*W, g*W + W).
template <int U, int W, class Elem, class... A, std::size_t... K>
__device__ __forceinline__ void run_groups(const Elem& f, std::int64_t first, std::int64_t step, std::int64_t groups,
                                           std::index_sequence<K...>, const A&... a) {
  float x[sizeof...(A)][U][W];
#pragma unroll
  for (int u = 0; u < U; ++u) {
    std::int64_t g = first + u * step;
    if (g < groups) (load_one<A, W>(a, g * W, x[K][u]), ...);
  }
#pragma unroll
  for (int u = 0; u < U; ++u) {
#pragma unroll
    for (int j = 0; j < W; ++j) f(arg<A>(x[K][u][j])...);
  }
#pragma unroll
  for (int u = 0; u < U; ++u) {
    std::int64_t g = first + u * step;
    if (g < groups) (store_one<A, W>(a, g * W, x[K][u]), ...);
  }
}

template <int U, int W, class... A>
__device__ __forceinline__ void clear_groups(std::int64_t first, std::int64_t step, std::int64_t groups,
                                             const A&... a) {
#pragma unroll
  for (int u = 0; u < U; ++u) {
    std::int64_t g = first + u * step;
    if (g < groups) (clear_one<A, W>(a, g * W), ...);
  }
}

}  // namespace detail

// Groups per thread and iteration: enough loads in flight without spilling registers.
template <class... A> constexpr int kUnroll = sizeof...(A) >= 4 ? 2 : 4;

template <class Prologue, class... A>
__global__ void elementwise_kernel(Prologue prologue, std::int64_t n, bool vec, A... a) {
  auto plan = prologue();
  if (!plan.run && !plan.clear_only) return;
  constexpr int U = kUnroll<A...>;
  const std::int64_t tid = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x;
  const std::int64_t threads = static_cast<std::int64_t>(gridDim.x) * blockDim.x;
  const std::int64_t groups = vec ? n / kVec : 0;
  auto seq = std::index_sequence_for<A...>{};
  for (std::int64_t base = tid; base < groups; base += U * threads) {
    if (plan.run) detail::run_groups<U, kVec>(plan.elem, base, threads, groups, seq, a...);
    else detail::clear_groups<U, kVec>(base, threads, groups, a...);
  }
  // the elements after the last whole group (or all of them when misaligned), one at a time
  for (std::int64_t i = groups * kVec + tid; i < n; i += threads) {
    if (plan.run) detail::run_groups<1, 1>(plan.elem, i, 0, i + 1, seq, a...);
    else detail::clear_groups<1, 1>(i, 0, i + 1, a...);
  }
}

inline bool aligned(const void* p, int elem_bytes) {
  return reinterpret_cast<std::uintptr_t>(p) % (static_cast<std::uintptr_t>(elem_bytes) * kVec) == 0;
}
template <class A> inline bool aligned_array(const A& a) {
  if constexpr (A::access == Access::None) return true;
  else return a.p == nullptr || aligned(a.p, sizeof(typename A::type));
}

template <class F> inline void with_dtype(DType t, F&& f) {
  switch (t) {
    case DType::f32: f(float{}); return;
    case DType::f16: f(__half{}); return;
    case DType::bf16: f(__nv_bfloat16{}); return;
  }
}
template <class F> inline void with_optional_dtype(const void* p, DType t, F&& f) {
  if (p == nullptr) f(NoArray{});
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
// Blocks of kBlock threads of `kernel` resident per SM of the current device, cached per
// (kernel, device).
int blocks_per_sm(const void* kernel);

// Blocks of kBlock threads to cover `work` thread-steps of `kernel`, at most one full wave.
template <class Kernel> inline unsigned grid_for(Kernel* kernel, std::int64_t work) {
  const void* k = reinterpret_cast<const void*>(kernel);
  return static_cast<unsigned>(grid_blocks(work, kBlock, sm_count(), blocks_per_sm(k)));
}

// The CUDA launch_elementwise: prologue() decides per thread; the arrays' alignment picks the
// vector path (every array must allow 16-byte fp32 / 8-byte half groups).
template <class Prologue, class... A>
void launch_elementwise(const Prologue& prologue, std::int64_t n, Stream s, const char* name, const A&... a) {
  if (n == 0) return;
  const bool vec = (aligned_array(a) && ...);
  constexpr int U = kUnroll<A...>;
  const std::int64_t work = vec ? (n / kVec + U - 1) / U : n;
  auto* kernel = &elementwise_kernel<Prologue, A...>;
  kernel<<<grid_for(kernel, work), kBlock, 0, as_stream(s)>>>(prologue, n, vec, a...);
  check_launch(name);
}

}  // namespace pyengine::cuda
