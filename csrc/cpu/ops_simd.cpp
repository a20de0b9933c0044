// The CPU ops on the elementwise driver (cpu/driver.h) and the shared element functors
// (kernels/*.h). Compiled once per ISA level (PE_ISA names the copy); dispatch.cpp picks one.
#include <cstring>
#include <vector>

#include "cpu/driver.h"
#include "cpu/op_table.h"
#include "kernels/optimizers.h"
#include "kernels/unscale.h"

#ifndef PE_ISA
#error "PE_ISA must name the ISA namespace"
#endif

namespace pyengine::cpu::PE_ISA {
namespace {

namespace k = pyengine::kernels;

void accumulate(float* dst, const void* src, DType src_dtype, std::int64_t n, float alpha) {
  with_dtype(src_dtype, [&](auto stag) {
    using S = decltype(stag);
    launch_elementwise(n, k::AccumulateElem{alpha}, inout(dst), in(static_cast<const S*>(src)));
  });
}

void fill(void* dst, DType dtype, std::int64_t n, float value) {
  with_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    launch_elementwise(n, k::FillElem{value}, out(static_cast<T*>(dst)));
  });
}

void cast_scale(void* dst, DType dst_dtype, const void* src, DType src_dtype, std::int64_t n, float alpha) {
  with_dtype(src_dtype, [&](auto stag) {
    with_dtype(dst_dtype, [&](auto dtag) {
      using S = decltype(stag);
      using D = decltype(dtag);
      launch_elementwise(n, k::ScaleElem{alpha}, out(static_cast<D*>(dst)), in(static_cast<const S*>(src)));
    });
  });
}

// y = src * inv; dst = y where dst exists; returns y*y (the summand).
struct UnscaleSquare {
  float inv;
  float operator()(float s, float& d) const {
    float y = s * inv;
    d = y;
    return y * y;
  }
};
// y * 0: exactly 0 for finite y, NaN for inf or NaN (see kernels/unscale.h).
struct NonfiniteTerm {
  float inv;
  float operator()(float s) const { return (s * inv) * 0.0f; }
};

// One fixed chunk of the deterministic sum.
//
// Note: the hot loop keeps only the sum of squares. Any inf or NaN makes that sum non-finite
// (inf^2 = inf, NaN propagates), so a finite sum proves the chunk clean; only a non-finite sum
// (a real inf/NaN, or squares past float range) pays a second, exact scan for the flag. One
// accumulator instead of two is what keeps the half-precision pass near the read bandwidth.
template <class S, class D>
k::SumsqAcc sumsq_chunk(const S* s, void* dst, std::int64_t b, std::int64_t e, float inv) {
  k::SumsqAcc acc;
  if constexpr (std::is_same_v<D, NoArray>) acc.sumsq = reduce_range(b, e, UnscaleSquare{inv}, in(s), none());
  else acc.sumsq = reduce_range(b, e, UnscaleSquare{inv}, in(s), out(static_cast<D*>(dst)));
  if (!(acc.sumsq - acc.sumsq == 0.0f)) acc.nonfinite = reduce_range(b, e, NonfiniteTerm{inv}, in(s));
  return acc;
}

double unscale_check_sumsq(const void* src, DType src_dtype, void* dst, DType dst_dtype,
                           std::int64_t n, float inv_scale, bool* nonfinite) {
  std::int64_t chunks = reduce_partials(n);
  std::vector<k::SumsqAcc> partial(static_cast<size_t>(chunks));
  with_dtype(src_dtype, [&](auto stag) {
    with_optional_dtype(dst, dst_dtype, [&](auto dtag) {
      using S = decltype(stag);
      using D = decltype(dtag);
      const S* s = static_cast<const S*>(src);
      parallel_pieces(chunks, n, [&](std::int64_t c) {
        std::int64_t b = c * kReduceChunk, e = std::min(n, b + kReduceChunk);
        partial[c] = sumsq_chunk<S, D>(s, dst, b, e, inv_scale);
      });
    });
  });
  // Note: chunk sums are combined in chunk order, in double: the result depends on the data
  // alone, not on how chunks were shared among threads.
  double total = 0.0, nf = 0.0;
  for (const auto& p : partial) {
    total += p.sumsq;
    nf += p.nonfinite;
  }
  *nonfinite = nf != 0.0;  // NaN != 0
  return total;
}

// The gradient array of an optimizer pass: cleared in the same pass when asked.
template <class G, class F> void with_grad(const OptimizerArgs& a, F&& f) {
  if (a.zero_grad) f(in_zero(static_cast<G*>(a.grad)));
  else f(in(static_cast<const G*>(a.grad)));
}

// The state arrays of a pass over R's states, in order: state1 (, state2); none() for each
// when the optimizer allows them absent and they are (SGD without a momentum buffer).
template <class R, class F> void with_states(const OptimizerArgs& a, F&& f) {
  constexpr int kStates = R::states::kCount;
  if constexpr (k::StatesOptional<typename R::elem>::value) {
    if (a.state1 == nullptr) {
      if constexpr (kStates == 1) return f(none());
      else return f(none(), none());
    }
  }
  if constexpr (kStates == 1) f(inout(a.state1));
  else f(inout(a.state1), inout(a.state2));
}

// One fused optimizer pass: (master, states..., grad, model copy) through R's functor.
template <class R> void optimizer_pass(const OptimizerArgs& a, const typename R::elem& f) {
  with_dtype(a.grad_dtype, [&](auto gtag) {
    with_optional_dtype(a.model, a.model_dtype, [&](auto mtag) {
      using G = decltype(gtag);
      using M = decltype(mtag);
      with_grad<G>(a, [&](auto grad) {
        with_states<R>(a, [&](auto... states) {
          launch_elementwise(a.n, f, inout(a.master), states..., grad, optional_out<M>(a.model));
        });
      });
    });
  });
}

// Note: tensors are cut into pieces of at most kPiece elements and the pieces shared among
// threads, so one large tensor among many small ones still uses every thread.
void multi_copy(const std::uintptr_t* tensors, const std::int64_t* numels, int count, DType tensor_dtype,
                void* flat, DType flat_dtype, float alpha, bool to_flat) {
  constexpr std::int64_t kPiece = 1 << 15;
  struct Piece { int tensor; std::int64_t begin, end, flat_offset; };
  std::vector<Piece> pieces;
  std::int64_t offset = 0;
  for (int t = 0; t < count; ++t) {
    for (std::int64_t b = 0; b < numels[t]; b += kPiece)
      pieces.push_back({t, b, std::min(numels[t], b + kPiece), offset});
    offset += numels[t];
  }
  with_dtype(tensor_dtype, [&](auto ttag) {
    with_dtype(flat_dtype, [&](auto ftag) {
      using T = decltype(ttag);
      using F = decltype(ftag);
      parallel_pieces(static_cast<std::int64_t>(pieces.size()), offset, [&](std::int64_t i) {
        const Piece& pc = pieces[i];
        T* t = reinterpret_cast<T*>(tensors[pc.tensor]);
        F* f = static_cast<F*>(flat) + pc.flat_offset;
        if (to_flat) elementwise_range(pc.begin, pc.end, k::ScaleElem{alpha}, out(f), in(static_cast<const T*>(t)));
        else elementwise_range(pc.begin, pc.end, k::ScaleElem{alpha}, out(t), in(static_cast<const F*>(f)));
      });
    });
  });
}

}  // namespace

#define PE_STR2(x) #x
#define PE_STR(x) PE_STR2(x)
extern const OpTable table = {
    PE_STR(PE_ISA_LABEL), accumulate, fill, cast_scale, unscale_check_sumsq, multi_copy,
#define PE_OPTIMIZER(name, elem, states, hyper) optimizer_pass<k::registry::name>,
#include "optimizers.def"
#undef PE_OPTIMIZER
};

}  // namespace pyengine::cpu::PE_ISA
