// The CPU elementwise driver, twin of cuda/launch.cuh: one generic loop serves every fused op.
//
// An op is an element functor over floats (kernels/*.h: AccumulateElem, AdamElem, ...) plus
// the arrays it walks, each tagged with how it is accessed:
//   in(p)      read            out(p)     written            inout(p)   read and written
//   in_zero(p) read, then cleared in the same pass (the optimizer's zero_grad)
// An absent optional array (a null model copy, SGD without momentum) is a `none()`: the
// functor reads 0 from it and still gets a float to write, which the compiler drops.
//
// Note: the driver splits [0, n) into one contiguous range per thread (cpu/parallel.h) and
// runs the functor in one `omp simd` loop over floats. A float array is indexed in place; a
// bf16 array is converted inside the loop (a 16-bit shift, free beside the memory traffic);
// an fp16 array, where the CPU has F16C, is converted a 512-element block at a time into a
// float block on the stack and back (vcvtph2ps/vcvtps2ph), since converting fp16 inside the
// loop with integer selects kept fp16 loops compute-bound. Without F16C fp16 goes inline.
#pragma once
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <utility>

#include "cpu/convert.h"
#include "cpu/half_staging.h"
#include "cpu/parallel.h"

namespace pyengine::cpu {

enum class Access { In, Out, InOut, InZero, None };

template <class T, Access A> struct Array {
  using type = T;
  static constexpr Access access = A;
  T* p;
};

struct NoArray {};
template <class T> Array<const T, Access::In> in(const T* p) { return {p}; }
template <class T> Array<T, Access::Out> out(T* p) { return {p}; }
template <class T> Array<T, Access::InOut> inout(T* p) { return {p}; }
template <class T> Array<T, Access::InZero> in_zero(T* p) { return {p}; }
inline Array<NoArray, Access::None> none() { return {nullptr}; }

constexpr std::int64_t kDriverBlock = kStageBlock;  // elements per staged block (2 KB of floats)

namespace detail {

template <class T> constexpr bool kIsFloat = std::is_same_v<std::remove_const_t<T>, float>;
#if defined(__F16C__)
template <class T> constexpr bool kStagedType = std::is_same_v<std::remove_const_t<T>, half_t>;
#else
template <class T> constexpr bool kStagedType = false;
#endif

// How the loop sees one array:
//   kDirect  a float array, indexed in place (also an absent array: its writes go to a sink)
//   kInline  a half array converted element by element inside the loop (bf16: a shift)
//   kStaged  an fp16 array converted a block at a time through F16C into `buf`
enum class Mode { kDirect, kInline, kStaged };
template <class A> constexpr Mode mode_of() {
  using T = typename A::type;
  if constexpr (A::access == Access::None || kIsFloat<T>) return Mode::kDirect;
  else if constexpr (kStagedType<T>) return Mode::kStaged;
  else return Mode::kInline;
}

template <class A> struct View {
  using T = std::remove_const_t<typename A::type>;
  static constexpr Mode mode = mode_of<A>();
  static constexpr bool reads = A::access == Access::In || A::access == Access::InOut || A::access == Access::InZero;
  static constexpr bool writes = A::access == Access::Out || A::access == Access::InOut;
  float* f = nullptr;  // kDirect and kStaged: what the loop indexes
  T* h = nullptr;      // kInline: the half array, offset to the block
  float buf[mode == Mode::kStaged ? kDriverBlock : 1];
  View() {}  // user-provided: the tuple of views must not zero `buf` (2 KB) for every block

  void load(const A& a, std::int64_t bb, std::int64_t len) {
    if constexpr (A::access == Access::None) {
      return;
    } else if constexpr (mode == Mode::kDirect) {
      f = const_cast<float*>(a.p) + bb;
    } else if constexpr (mode == Mode::kInline) {
      h = const_cast<T*>(a.p) + bb;
    } else {
      f = buf;
      if constexpr (reads) halves_to_floats(a.p + bb, buf, len);
      if constexpr (A::access == Access::InZero)
        std::memset(static_cast<void*>(const_cast<T*>(a.p) + bb), 0, static_cast<size_t>(len) * sizeof(T));
    }
  }
  void store(const A& a, std::int64_t bb, std::int64_t len) {
    if constexpr (mode == Mode::kStaged && writes) floats_to_halves(buf, const_cast<T*>(a.p) + bb, len);
  }

  // Element i inside the loop, through the loop's local float `x`: loaded before the functor
  // runs, stored after it. Note: the functor never holds a reference into an array, so the
  // compiler need not assume that its writes to one array may change another's elements.
  inline void before(std::int64_t i, float& x) const {
    if constexpr (reads && mode == Mode::kInline) x = to_float(h[i]);
    else if constexpr (reads) x = f[i];
    else if constexpr (A::access == Access::None) x = 0.0f;  // an absent array reads 0
  }
  inline void after(std::int64_t i, float x) const {
    if constexpr (A::access == Access::InZero) {  // a staged block was cleared in load()
      if constexpr (mode == Mode::kInline) h[i] = from_float<T>(0.0f);
      else if constexpr (mode == Mode::kDirect) f[i] = 0.0f;
    } else if constexpr (writes) {
      if constexpr (mode == Mode::kInline) h[i] = from_float<T>(x);
      else f[i] = x;  // the array itself, or its staged block
    }
  }
};

// The functor's argument: a value for inputs, a reference to the loop's local otherwise.
template <class A> inline decltype(auto) arg(float& x) {
  if constexpr (A::access == Access::In || A::access == Access::InZero) return static_cast<float>(x);
  else return (x);
}

template <class F, class... A, std::size_t... K>
void run_block(const F& f, std::int64_t bb, std::int64_t len, std::index_sequence<K...>, const A&... arrays) {
  std::tuple<View<A>...> views;
  (std::get<K>(views).load(arrays, bb, len), ...);
#pragma omp simd
  for (std::int64_t i = 0; i < len; ++i) {
    float x[sizeof...(A)];
    (std::get<K>(views).before(i, x[K]), ...);
    f(arg<A>(x[K])...);
    (std::get<K>(views).after(i, x[K]), ...);
  }
  (std::get<K>(views).store(arrays, bb, len), ...);
}

template <class F, class... A, std::size_t... K>
float reduce_block(const F& f, std::int64_t bb, std::int64_t len, std::index_sequence<K...>, const A&... arrays) {
  std::tuple<View<A>...> views;
  (std::get<K>(views).load(arrays, bb, len), ...);
  float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
  for (std::int64_t i = 0; i < len; ++i) {
    float x[sizeof...(A)];
    (std::get<K>(views).before(i, x[K]), ...);
    sum += f(arg<A>(x[K])...);
    (std::get<K>(views).after(i, x[K]), ...);
  }
  (std::get<K>(views).store(arrays, bb, len), ...);
  return sum;
}

template <class... A> constexpr bool kAnyStaged = ((mode_of<A>() == Mode::kStaged) || ...);

}  // namespace detail

// f over the elements [b, e) on the calling thread.
template <class F, class... A> void elementwise_range(std::int64_t b, std::int64_t e, const F& f, const A&... arrays) {
  constexpr bool staged = detail::kAnyStaged<A...>;
  const std::int64_t block = staged ? kDriverBlock : (e - b);
  for (std::int64_t bb = b; bb < e; bb += block)
    detail::run_block(f, bb, std::min(block, e - bb), std::index_sequence_for<A...>{}, arrays...);
}

// f over [0, n), split among the threads: the CPU launch_elementwise.
template <class F, class... A> void launch_elementwise(std::int64_t n, const F& f, const A&... arrays) {
  parallel_ranges(n, [&](std::int64_t b, std::int64_t e) { elementwise_range(b, e, f, arrays...); });
}

// sum of f(elements...) over [b, e) on the calling thread, in blocks: the reduction twin of
// elementwise_range. The order of the additions is fixed by the compiled loop and the
// block boundaries, so the result depends on the data alone.
template <class F, class... A> float reduce_range(std::int64_t b, std::int64_t e, const F& f, const A&... arrays) {
  constexpr bool staged = detail::kAnyStaged<A...>;
  const std::int64_t block = staged ? kDriverBlock : (e - b);
  float total = 0.0f;
  for (std::int64_t bb = b; bb < e; bb += block)
    total += detail::reduce_block(f, bb, std::min(block, e - bb), std::index_sequence_for<A...>{}, arrays...);
  return total;
}

// As with_dtype (cpu/convert.h), with NoArray for a null optional array.
template <class F> inline void with_optional_dtype(const void* p, DType t, F&& f) {
  if (p == nullptr) f(NoArray{});
  else with_dtype(t, f);
}

// The driver array for an optional output: out(p) or none().
template <class T> inline auto optional_out(void* p) {
  if constexpr (std::is_same_v<T, NoArray>) return none();
  else return out(static_cast<T*>(p));
}

}  // namespace pyengine::cpu
