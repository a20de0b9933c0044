// OpenMP helpers with fixed work splitting.
#pragma once
#include <omp.h>

#include <algorithm>
#include <cstdint>

namespace pyengine::cpu {

int num_threads();

// Elements below which a loop stays on the calling thread (a parallel region costs a few us).
constexpr std::int64_t kMinParallelElems = 1 << 16;

// f(begin, end) over [0, n), one contiguous range per thread, 64-element aligned splits.
template <class F> void parallel_ranges(std::int64_t n, const F& f) {
  int nt = static_cast<int>(std::min<std::int64_t>(num_threads(), n / kMinParallelElems));
  if (nt <= 1) {
    if (n > 0) f(std::int64_t{0}, n);
    return;
  }
  std::int64_t per = ((n + nt - 1) / nt + 63) / 64 * 64;
#pragma omp parallel for num_threads(nt) schedule(static)
  for (int t = 0; t < nt; ++t) {
    std::int64_t b = std::min(n, t * per), e = std::min(n, b + per);
    if (b < e) f(b, e);
  }
}

// f(piece) for piece in [0, pieces), statically split; used where the pieces are fixed
// chunks (deterministic reductions) so the thread count never changes what is computed.
template <class F> void parallel_pieces(std::int64_t pieces, std::int64_t elems, const F& f) {
  int nt = static_cast<int>(std::min<std::int64_t>(num_threads(), elems / kMinParallelElems));
  nt = static_cast<int>(std::min<std::int64_t>(nt, pieces));
  if (nt <= 1) {
    for (std::int64_t p = 0; p < pieces; ++p) f(p);
    return;
  }
#pragma omp parallel for num_threads(nt) schedule(static)
  for (std::int64_t p = 0; p < pieces; ++p) f(p);
}

}  // namespace pyengine::cpu
