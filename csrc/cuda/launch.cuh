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
// is one 16-byte load for fp32 (8 for fp16/bf16) where the array allows it. The host picks a
// head peel (elements [0, head) one at a time) that lines the most bytes up on group
// boundaries, and per array whether its groups use vector loads/stores or element-wise ones
// at the same indices (pyengine/launch_shape.h): one misaligned array no longer sends the
// others to the scalar path. That choice per array costs registers (ptxas, sm_90: 56 -> 96 for
// an fp32 accumulate), so a launch whose arrays all line up runs an instantiation without it.
// The grid is one full wave of this kernel as its registers allow
// (cudaOccupancyMaxActiveBlocksPerMultiprocessor, cached), or less when the work is small,
// and strides over the rest.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
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

// The same group element by element: for an array that is not aligned for Pack<T, W>.
template <int W, class T> __device__ __forceinline__ void load_elems(const T* p, std::int64_t i, float (&x)[W]) {
#pragma unroll
  for (int j = 0; j < W; ++j) x[j] = to_float(p[i + j]);
}
template <int W, class T> __device__ __forceinline__ void store_elems(T* p, std::int64_t i, const float (&x)[W]) {
  if constexpr (!std::is_same_v<std::remove_const_t<T>, NoArray>) {
#pragma unroll
    for (int j = 0; j < W; ++j) p[i + j] = from_float<T>(x[j]);
  }
}
// Vector or element-wise, chosen per array and launch (warp-uniform).
template <int W, class T>
__device__ __forceinline__ void load_any(const T* p, std::int64_t i, bool vec, float (&x)[W]) {
  if (W == 1 || vec) load<W>(p, i, x);
  else load_elems<W>(p, i, x);
}
template <int W, class T>
__device__ __forceinline__ void store_any(T* p, std::int64_t i, bool vec, const float (&x)[W]) {
  if (W == 1 || vec) store<W>(p, i, x);
  else store_elems<W>(p, i, x);
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

template <class A, int W>
__device__ __forceinline__ void load_one(const A& a, std::int64_t i, bool vec, float (&x)[W]) {
  if constexpr (A::reads) {
    load_any<W>(a.p, i, vec, x);
  } else if constexpr (A::access == Access::None) {  // an absent array reads 0
#pragma unroll
    for (int j = 0; j < W; ++j) x[j] = 0.0f;
  }
}
template <class A, int W>
__device__ __forceinline__ void store_one(const A& a, std::int64_t i, bool vec, const float (&x)[W]) {
  if constexpr (A::access == Access::InZero) {
    float z[W] = {};
    store_any<W>(a.p, i, vec, z);
  } else if constexpr (A::writes) {
    store_any<W>(a.p, i, vec, x);
  }
}
template <class A, int W> __device__ __forceinline__ void clear_one(const A& a, std::int64_t i, bool vec) {
  if constexpr (A::access == Access::InZero) {
    float z[W] = {};
    store_any<W>(a.p, i, vec, z);
  }
}
template <class A> __device__ __forceinline__ decltype(auto) arg(float& x) {
  if constexpr (A::access == Access::In || A::access == Access::InZero) return static_cast<float>(x);
  else return (x);
}

// Array a's part of U groups: all vector or all element-wise, one branch around its U loads
// (a branch per load cost more registers: ptxas, sm_90, fp32 cast_scale 80 against 64).
template <int U, int W, class A>
__device__ __forceinline__ void load_array(const A& a, std::int64_t origin, std::int64_t first, std::int64_t step,
                                           std::int64_t groups, bool vec, float (&x)[U][W]) {
  if (vec) {
#pragma unroll
    for (int u = 0; u < U; ++u)
      if (first + u * step < groups) load_one<A, W>(a, origin + (first + u * step) * W, true, x[u]);
  } else {
#pragma unroll
    for (int u = 0; u < U; ++u)
      if (first + u * step < groups) load_one<A, W>(a, origin + (first + u * step) * W, false, x[u]);
  }
}
template <int U, int W, class A>
__device__ __forceinline__ void store_array(const A& a, std::int64_t origin, std::int64_t first, std::int64_t step,
                                            std::int64_t groups, bool vec, const float (&x)[U][W]) {
  if (vec) {
#pragma unroll
    for (int u = 0; u < U; ++u)
      if (first + u * step < groups) store_one<A, W>(a, origin + (first + u * step) * W, true, x[u]);
  } else {
#pragma unroll
    for (int u = 0; u < U; ++u)
      if (first + u * step < groups) store_one<A, W>(a, origin + (first + u * step) * W, false, x[u]);
  }
}

// U groups of W elements at `first`, `first + step`, ...; group g covers elements
// [origin + g*W, origin + g*W + W). Bit K of `mask`: array K takes the vector path.
template <int U, int W, class Elem, class... A, std::size_t... K>
__device__ __forceinline__ void run_groups(const Elem& f, std::int64_t origin, std::int64_t first, std::int64_t step,
                                           std::int64_t groups, std::uint32_t mask, std::index_sequence<K...>,
                                           const A&... a) {
  float x[sizeof...(A)][U][W];
  (load_array<U, W>(a, origin, first, step, groups, (mask >> K) & 1u, x[K]), ...);
#pragma unroll
  for (int u = 0; u < U; ++u) {
#pragma unroll
    for (int j = 0; j < W; ++j) f(arg<A>(x[K][u][j])...);
  }
  (store_array<U, W>(a, origin, first, step, groups, (mask >> K) & 1u, x[K]), ...);
}

template <int U, int W, class... A, std::size_t... K>
__device__ __forceinline__ void clear_groups(std::int64_t origin, std::int64_t first, std::int64_t step,
                                             std::int64_t groups, std::uint32_t mask, std::index_sequence<K...>,
                                             const A&... a) {
#pragma unroll
  for (int u = 0; u < U; ++u) {
    std::int64_t g = first + u * step;
    if (g < groups) (clear_one<A, W>(a, origin + g * W, (mask >> K) & 1u), ...);
  }
}

// The elements done one at a time: [0, head) and the [tail, n) after the last whole group.
struct Singles {
  std::int64_t head, tail;
  __device__ std::int64_t count(std::int64_t n) const { return head + (n - tail); }
  __device__ std::int64_t element(std::int64_t s) const { return s < head ? s : tail + (s - head); }
};

}  // namespace detail

// Groups per thread and iteration: enough loads in flight without spilling registers.
template <class... A> constexpr int kUnroll = sizeof...(A) >= 4 ? 2 : 4;

// Elements [head, head + groups*kVec) go in groups of kVec; bit k of `mask`: array k loads and
// stores them as one vector (else element by element). kAllVector: every array does.
template <bool kAllVector, class Prologue, class... A>
__global__ void elementwise_kernel(Prologue prologue, std::int64_t n, int head, std::uint32_t mask, A... a) {
  if constexpr (kAllVector) mask = ~0u;
  auto plan = prologue();
  if (!plan.run && !plan.clear_only) return;
  constexpr int U = kUnroll<A...>;
  const std::int64_t tid = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x;
  const std::int64_t threads = static_cast<std::int64_t>(gridDim.x) * blockDim.x;
  const std::int64_t groups = (n - head) / kVec;
  auto seq = std::index_sequence_for<A...>{};
  for (std::int64_t base = tid; base < groups; base += U * threads) {
    if (plan.run) detail::run_groups<U, kVec>(plan.elem, head, base, threads, groups, mask, seq, a...);
    else detail::clear_groups<U, kVec>(head, base, threads, groups, mask, seq, a...);
  }
  const detail::Singles singles{head, head + groups * kVec};
  for (std::int64_t s = tid; s < singles.count(n); s += threads) {
    const std::int64_t i = singles.element(s);
    if (plan.run) detail::run_groups<1, 1>(plan.elem, 0, i, 0, i + 1, 0u, seq, a...);
    else detail::clear_groups<1, 1>(0, i, 0, i + 1, 0u, seq, a...);
  }
}

template <class A> inline std::uintptr_t address_of(const A& a) {
  if constexpr (A::access == Access::None) return 0;
  else return reinterpret_cast<std::uintptr_t>(a.p);
}
template <class A> constexpr int elem_bytes_of() {
  if constexpr (A::access == Access::None) return 1;
  else return static_cast<int>(sizeof(typename A::type));
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

// The CUDA launch_elementwise: prologue() decides per thread; the arrays' addresses pick the
// head peel and which arrays take the vector path (vector_plan).
template <class Prologue, class... A>
void launch_elementwise(const Prologue& prologue, std::int64_t n, Stream s, const char* name, const A&... a) {
  if (n == 0) return;
  const std::uintptr_t addrs[] = {address_of(a)...};
  const int elem_bytes[] = {elem_bytes_of<A>()...};
  const VectorPlan vp = vector_plan(addrs, elem_bytes, static_cast<int>(sizeof...(A)), n, kVec);
  constexpr int U = kUnroll<A...>;
  const std::int64_t groups = (n - vp.head) / kVec;
  const std::int64_t singles = n - groups * kVec;
  const std::int64_t work = std::max((groups + U - 1) / U, singles);
  auto go = [&](auto* kernel) {
    kernel<<<grid_for(kernel, work), kBlock, 0, as_stream(s)>>>(prologue, n, vp.head, vp.mask, a...);
  };
  constexpr std::uint32_t kEvery = (1u << sizeof...(A)) - 1;
  if (vp.mask == kEvery) go(&elementwise_kernel<true, Prologue, A...>);
  else go(&elementwise_kernel<false, Prologue, A...>);
  check_launch(name);
}

}  // namespace pyengine::cuda
