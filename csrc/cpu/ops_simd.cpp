// CPU drivers for the streaming ops: OpenMP over contiguous ranges, `omp simd` inner loops
// over the shared element functors. Compiled once per ISA level (PE_ISA names the copy).
#include <cstring>
#include <type_traits>
#include <vector>

#include "cpu/convert.h"
#include "cpu/half_staging.h"
#include "cpu/op_table.h"
#include "cpu/parallel.h"
#include "kernels/adam.h"
#include "kernels/sgd.h"
#include "kernels/unscale.h"

#ifndef PE_ISA
#error "PE_ISA must name the ISA namespace"
#endif

namespace pyengine::cpu::PE_ISA {
namespace {

namespace k = pyengine::kernels;

template <class M> inline void store_model(M* out, std::int64_t i, float p) { out[i] = from_float<M>(p); }
template <> inline void store_model<NoModel>(NoModel*, std::int64_t, float) {}

template <class F> void with_model_dtype(void* model, DType t, F&& f) {
  if (model == nullptr) f(NoModel{});
  else with_dtype(t, f);
}

void accumulate(float* dst, const void* src, DType src_dtype, std::int64_t n, float alpha) {
  with_dtype(src_dtype, [&](auto tag) {
    using S = decltype(tag);
    const S* s = static_cast<const S*>(src);
    parallel_ranges(n, [&](std::int64_t b, std::int64_t e) {
      staged_blocks<S>(b, e, [&](std::int64_t bb, std::int64_t len) {
        float tmp[kStageBlock];
        const auto* sv = stage_in(s, bb, len, tmp);
        float* dv = dst + bb;
#pragma omp simd
        for (std::int64_t i = 0; i < len; ++i) dv[i] = k::accumulate_value(dv[i], to_float(sv[i]), alpha);
      });
    });
  });
}

template <class S, class D> void cast_loop(const S* s, D* d, std::int64_t n, float alpha) {
  if (alpha == 1.0f) {
#pragma omp simd
    for (std::int64_t i = 0; i < n; ++i) d[i] = from_float<D>(to_float(s[i]));
  } else {
#pragma omp simd
    for (std::int64_t i = 0; i < n; ++i) d[i] = from_float<D>(k::scale_value(to_float(s[i]), alpha));
  }
}

template <class S, class D> void cast_range(const S* s, D* d, std::int64_t b, std::int64_t e, float alpha) {
  staged_blocks<S, D>(b, e, [&](std::int64_t bb, std::int64_t len) {
    float tin[kStageBlock], tout[kStageBlock];
    cast_loop(stage_in(s, bb, len, tin), stage_out(d, bb, tout), len, alpha);
    commit_out(d, bb, len, tout);
  });
}

void cast_scale(void* dst, DType dst_dtype, const void* src, DType src_dtype, std::int64_t n, float alpha) {
  with_dtype(src_dtype, [&](auto stag) {
    with_dtype(dst_dtype, [&](auto dtag) {
      using S = decltype(stag);
      using D = decltype(dtag);
      parallel_ranges(n, [&](std::int64_t b, std::int64_t e) {
        cast_range(static_cast<const S*>(src), static_cast<D*>(dst), b, e, alpha);
      });
    });
  });
}

// One fixed chunk: the lane order inside is fixed by this compiled loop.
//
// Note: the hot loop keeps only the sum of squares. Any inf or NaN makes that sum non-finite
// (inf^2 = inf, NaN propagates), so a finite sum proves the chunk clean; only a non-finite sum
// (a real inf/NaN, or squares past float range) pays a second, exact scan for the flag. One
// accumulator instead of two is what keeps the bf16 pass near the read bandwidth.
template <class S, class D>
k::SumsqAcc sumsq_loop(const S* s, D* d, std::int64_t n, float inv) {
  float sq = 0.0f;
  if (d == nullptr) {
#pragma omp simd reduction(+ : sq)
    for (std::int64_t i = 0; i < n; ++i) {
      float y = to_float(s[i]) * inv;
      sq += y * y;
    }
  } else {
#pragma omp simd reduction(+ : sq)
    for (std::int64_t i = 0; i < n; ++i) {
      float y = to_float(s[i]) * inv;
      d[i] = from_float<D>(y);
      sq += y * y;
    }
  }
  float nf = 0.0f;
  if (!(sq - sq == 0.0f)) {  // sq is inf or NaN
#pragma omp simd reduction(+ : nf)
    for (std::int64_t i = 0; i < n; ++i) nf += (to_float(s[i]) * inv) * 0.0f;
  }
  return k::SumsqAcc{sq, nf};
}

template <class S, class D>
k::SumsqAcc sumsq_chunk(const S* s, D* d, std::int64_t b, std::int64_t e, float inv) {
  k::SumsqAcc acc;
  staged_blocks<S, D>(b, e, [&](std::int64_t bb, std::int64_t len) {
    float tin[kStageBlock], tout[kStageBlock];
    acc.merge(sumsq_loop(stage_in(s, bb, len, tin), stage_out(d, bb, tout), len, inv));
    commit_out(d, bb, len, tout);
  });
  return acc;
}

double unscale_check_sumsq(const void* src, DType src_dtype, void* dst, DType dst_dtype,
                           std::int64_t n, float inv_scale, bool* nonfinite) {
  std::int64_t chunks = reduce_partials(n);
  std::vector<k::SumsqAcc> partial(static_cast<size_t>(chunks));
  with_dtype(src_dtype, [&](auto stag) {
    with_dtype(dst_dtype, [&](auto dtag) {
      using S = decltype(stag);
      using D = decltype(dtag);
      const S* s = static_cast<const S*>(src);
      D* d = static_cast<D*>(dst);
      parallel_pieces(chunks, n, [&](std::int64_t c) {
        std::int64_t b = c * kReduceChunk, e = std::min(n, b + kReduceChunk);
        partial[c] = sumsq_chunk(s, d, b, e, inv_scale);
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

// Zero: clear each gradient element right after reading it (the line is already in cache).
template <bool Zero, class G> inline float take_grad(G* g, std::int64_t i) {
  float x = to_float(g[i]);
  if constexpr (Zero) g[i] = from_float<G>(0.0f);
  return x;
}

template <class F> void with_zero(bool zero_grad, F&& f) {
  if (zero_grad) f(std::true_type{});
  else f(std::false_type{});
}

// A staged (fp16) gradient block is cleared after its conversion, so the loop itself reads
// the float copy and clears nothing.
template <bool Zero, class G> void clear_staged(G* g, std::int64_t bb, std::int64_t len) {
  if constexpr (Zero && kStaged<G>) std::memset(static_cast<void*>(g + bb), 0, static_cast<size_t>(len) * sizeof(G));
}
template <bool Zero, class G> constexpr bool kZeroInLoop = Zero && !kStaged<G>;

template <bool Zero, class G, class M>
void adam_loop(float* p, float* m, float* v, G* g, M* out, std::int64_t n, float gs, const k::AdamCoeffs& kc) {
#pragma omp simd
  for (std::int64_t i = 0; i < n; ++i) {
    float pi = p[i], mi = m[i], vi = v[i];
    k::adam_update(pi, mi, vi, take_grad<Zero>(g, i) * gs, kc);
    p[i] = pi;
    m[i] = mi;
    v[i] = vi;
    store_model(out, i, pi);
  }
}

template <bool Zero, class G, class M>
void adam_range(float* p, float* m, float* v, G* g, M* out, std::int64_t b, std::int64_t e,
                float gs, const k::AdamCoeffs& kc) {
  staged_blocks<G, M>(b, e, [&](std::int64_t bb, std::int64_t len) {
    float tg[kStageBlock], tm[kStageBlock];
    auto* gv = const_cast<Staged<G>*>(stage_in(g, bb, len, tg));
    clear_staged<Zero>(g, bb, len);
    adam_loop<kZeroInLoop<Zero, G>>(p + bb, m + bb, v + bb, gv, stage_out(out, bb, tm), len, gs, kc);
    commit_out(out, bb, len, tm);
  });
}

void adam_step(float* master, float* exp_avg, float* exp_avg_sq, void* grad, DType grad_dtype, bool zero_grad,
               void* model, DType model_dtype, std::int64_t n, float grad_scale, const k::AdamCoeffs& kc) {
  with_dtype(grad_dtype, [&](auto gtag) {
    with_model_dtype(model, model_dtype, [&](auto mtag) {
      with_zero(zero_grad, [&](auto ztag) {
        using G = decltype(gtag);
        using M = decltype(mtag);
        parallel_ranges(n, [&](std::int64_t b, std::int64_t e) {
          adam_range<decltype(ztag)::value>(master, exp_avg, exp_avg_sq, static_cast<G*>(grad),
                                            static_cast<M*>(model), b, e, grad_scale, kc);
        });
      });
    });
  });
}

template <bool Zero, class G, class M>
void sgd_loop(float* p, float* buf, G* g, M* out, std::int64_t n, float gs, const SgdConfig& c, bool first) {
  if (buf == nullptr) {
#pragma omp simd
    for (std::int64_t i = 0; i < n; ++i) {
      float pi = p[i], unused = 0.0f;
      k::sgd_update<false>(pi, unused, take_grad<Zero>(g, i) * gs, c, first);
      p[i] = pi;
      store_model(out, i, pi);
    }
  } else {
#pragma omp simd
    for (std::int64_t i = 0; i < n; ++i) {
      float pi = p[i], bi = buf[i];
      k::sgd_update<true>(pi, bi, take_grad<Zero>(g, i) * gs, c, first);
      p[i] = pi;
      buf[i] = bi;
      store_model(out, i, pi);
    }
  }
}

template <bool Zero, class G, class M>
void sgd_range(float* p, float* buf, G* g, M* out, std::int64_t b, std::int64_t e, float gs,
               const SgdConfig& c, bool first) {
  staged_blocks<G, M>(b, e, [&](std::int64_t bb, std::int64_t len) {
    float tg[kStageBlock], tm[kStageBlock];
    auto* gv = const_cast<Staged<G>*>(stage_in(g, bb, len, tg));
    clear_staged<Zero>(g, bb, len);
    sgd_loop<kZeroInLoop<Zero, G>>(p + bb, buf == nullptr ? nullptr : buf + bb, gv, stage_out(out, bb, tm), len,
                                   gs, c, first);
    commit_out(out, bb, len, tm);
  });
}

void sgd_step(float* master, float* momentum_buf, void* grad, DType grad_dtype, bool zero_grad, void* model,
              DType model_dtype, std::int64_t n, float grad_scale, const SgdConfig& cfg, bool first) {
  with_dtype(grad_dtype, [&](auto gtag) {
    with_model_dtype(model, model_dtype, [&](auto mtag) {
      with_zero(zero_grad, [&](auto ztag) {
        using G = decltype(gtag);
        using M = decltype(mtag);
        parallel_ranges(n, [&](std::int64_t b, std::int64_t e) {
          sgd_range<decltype(ztag)::value>(master, momentum_buf, static_cast<G*>(grad), static_cast<M*>(model),
                                           b, e, grad_scale, cfg, first);
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
  std::int64_t offset = 0, total = 0;
  for (int t = 0; t < count; ++t) {
    for (std::int64_t b = 0; b < numels[t]; b += kPiece)
      pieces.push_back({t, b, std::min(numels[t], b + kPiece), offset});
    offset += numels[t];
  }
  total = offset;
  with_dtype(tensor_dtype, [&](auto ttag) {
    with_dtype(flat_dtype, [&](auto ftag) {
      using T = decltype(ttag);
      using F = decltype(ftag);
      parallel_pieces(static_cast<std::int64_t>(pieces.size()), total, [&](std::int64_t i) {
        const Piece& pc = pieces[i];
        T* t = reinterpret_cast<T*>(tensors[pc.tensor]);
        F* f = static_cast<F*>(flat) + pc.flat_offset;
        if (to_flat) cast_range(t, f, pc.begin, pc.end, alpha);
        else cast_range(f, t, pc.begin, pc.end, alpha);
      });
    });
  });
}

}  // namespace

#define PE_STR2(x) #x
#define PE_STR(x) PE_STR2(x)
extern const OpTable table = {PE_STR(PE_ISA_LABEL), accumulate, cast_scale, unscale_check_sumsq,
                              adam_step, sgd_step, multi_copy};

}  // namespace pyengine::cpu::PE_ISA
