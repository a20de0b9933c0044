// CUDA drivers: fused unscale / non-finite check / sum of squares, and the clip coefficient.
//
// Note: the reduction is deterministic in two stages without float atomics. Stage 1: each
// fixed chunk of kReduceChunk elements is reduced by one block in a fixed thread order and
// written to its own slot of the workspace. Stage 2: one block folds the slots in a fixed
// order (in double) and adds the total to the device-resident accumulator. The result
// depends on the data alone, not on the grid size or the number of SMs.
#include <cub/block/block_reduce.cuh>

#include "cuda/launch.cuh"
#include "kernels/loss_scale.h"
#include "kernels/norm.h"
#include "kernels/unscale.h"

namespace pyengine::cuda {
namespace {

namespace k = pyengine::kernels;

struct AccSum {
  __device__ k::SumsqAcc operator()(const k::SumsqAcc& a, const k::SumsqAcc& b) const {
    k::SumsqAcc r = a;
    r.merge(b);
    return r;
  }
};

struct Partial {
  double sumsq;
  float nonfinite;
};
struct PartialSum {
  __device__ Partial operator()(const Partial& a, const Partial& b) const {
    return {a.sumsq + b.sumsq, a.nonfinite + b.nonfinite};
  }
};

constexpr int kPerThread = static_cast<int>(kReduceChunk / kBlock);  // 32 elements
static_assert(kPerThread % kVec == 0, "chunk must split into vector groups");

// Thread t of a chunk handles groups t, t+kBlock, ... of kVec elements: the same elements in
// the same order on the vector and the scalar path, chosen for src and dst apart (no head
// peel: the chunks start at element 0, fixed, so that the sum is deterministic).
template <class S, class D>
__global__ void sumsq_stage1(const S* src, D* dst, std::int64_t n, std::int64_t chunks, const float* inv_scale,
                             bool src_vec, bool dst_vec, k::SumsqAcc* partials) {
  using Reduce = cub::BlockReduce<k::SumsqAcc, kBlock>;
  __shared__ typename Reduce::TempStorage tmp;
  const float inv = inv_scale ? *inv_scale : 1.0f;
  for (std::int64_t c = blockIdx.x; c < chunks; c += gridDim.x) {
    k::SumsqAcc acc;
    const std::int64_t base = c * kReduceChunk;
    for (int g = 0; g < kPerThread / kVec; ++g) {
      std::int64_t i = base + (static_cast<std::int64_t>(g) * kBlock + threadIdx.x) * kVec;
      float x[kVec];
      if (i + kVec <= n) {
        load_any<kVec>(src, i, src_vec, x);
      } else {
#pragma unroll
        for (int j = 0; j < kVec; ++j) x[j] = i + j < n ? to_float(src[i + j]) : 0.0f;
      }
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        x[j] *= inv;
        acc.add(x[j]);
      }
      if constexpr (!std::is_same_v<D, NoArray>) {
        if (i + kVec <= n) {
          store_any<kVec>(dst, i, dst_vec, x);
        } else {
          for (int j = 0; j < kVec && i + j < n; ++j) dst[i + j] = from_float<D>(x[j]);
        }
      }
    }
    k::SumsqAcc total = Reduce(tmp).Reduce(acc, AccSum());
    if (threadIdx.x == 0) partials[c] = total;
    __syncthreads();  // tmp is reused by the next chunk
  }
}

__global__ void sumsq_stage2(const k::SumsqAcc* partials, std::int64_t chunks, float* sumsq, float* found_inf) {
  using Reduce = cub::BlockReduce<Partial, kBlock>;
  __shared__ typename Reduce::TempStorage tmp;
  Partial mine{0.0, 0.0f};
  for (std::int64_t c = threadIdx.x; c < chunks; c += kBlock) {
    mine.sumsq += partials[c].sumsq;
    mine.nonfinite += partials[c].nonfinite;
  }
  Partial total = Reduce(tmp).Reduce(mine, PartialSum());
  if (threadIdx.x == 0) {
    if (sumsq) *sumsq = static_cast<float>(static_cast<double>(*sumsq) + total.sumsq);
    if (found_inf && total.nonfinite != 0.0f) *found_inf = 1.0f;  // NaN != 0
  }
}

__global__ void clip_kernel(const float* sumsq, const float* inv_scale, float max_norm, float* out) {
  k::clip_coefficient(*sumsq, inv_scale ? *inv_scale : 1.0f, max_norm, out);
}

__global__ void clear_flag_and_sumsq(float* scalars) {
  scalars[kFoundInf] = 0.0f;
  scalars[kSumsq] = 0.0f;
}

// One thread: fold the bucket rows (if any) in row order; then, unless only the local phase
// is asked, clip, update the loss scale, count the boundary and mirror the state to the host.
__global__ void step_scalars_tail(const float* rows, std::int64_t buckets, float* sc, const float* inv_scale,
                                  float* ls, float max_norm, LossScaleConfig cfg, float* host_mirror,
                                  std::int64_t* boundaries, const std::int32_t* abort_word, int phase) {
  if (rows != nullptr && phase != kStepGlobal) {
    double sum = 0.0;
    float flag = 0.0f;
    for (std::int64_t b = 0; b < buckets; ++b) {
      sum += rows[2 * b];
      float f = rows[2 * b + 1];
      flag = (f != 0.0f || flag != 0.0f) ? 1.0f : 0.0f;  // NaN != 0: flagged
    }
    sc[kSumsq] = static_cast<float>(sum);
    sc[kFoundInf] = flag;
  }
  if (phase == kStepLocal) return;
  // mapped host memory, written by the communicator's watchdog before it aborts (core.h)
  if (abort_word != nullptr && *static_cast<const volatile std::int32_t*>(abort_word) != 0) sc[kFoundInf] = 1.0f;
  k::clip_coefficient(sc[kSumsq], inv_scale ? *inv_scale : 1.0f, max_norm, sc + kGradNorm);
  k::update_loss_scale(ls, sc[kFoundInf], cfg);
  if (boundaries != nullptr) *boundaries += 1;
  if (host_mirror != nullptr) {  // pinned host memory, written through the unified address space
    for (int i = 0; i < kLossScaleStateSize; ++i) host_mirror[i] = ls[i];
  }
}

// One warp per chunk: lane l sums elements l, l+32, ... in order, then a fixed butterfly:
// the sum depends on the chunk's values alone (deterministic.py).
template <class S>
__global__ void chunk_sumsq_kernel(const S* src, std::int64_t rows, std::int64_t chunk, const float* inv_scale,
                                   double* out) {
  const float inv = inv_scale ? *inv_scale : 1.0f;
  const int lane = threadIdx.x % 32;
  const std::int64_t warps = static_cast<std::int64_t>(gridDim.x) * (blockDim.x / 32);
  for (std::int64_t r = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32; r < rows; r += warps) {
    const S* x = src + r * chunk;
    double acc = 0.0;
    for (std::int64_t j = lane; j < chunk; j += 32) {
      double y = static_cast<double>(to_float(x[j]) * inv);
      acc += y * y;
    }
    for (int off = 16; off > 0; off /= 2) acc += __shfl_xor_sync(0xffffffffu, acc, off);
    if (lane == 0) out[r] = acc;
  }
}

}  // namespace

void chunk_sumsq(const void* src, DType src_dtype, std::int64_t rows, std::int64_t chunk, const float* inv_scale,
                 double* out, Stream s) {
  if (rows < 0 || chunk < 1) throw std::invalid_argument("chunk_sumsq: rows must be >= 0 and chunk >= 1");
  if (rows == 0) return;
  with_dtype(src_dtype, [&](auto stag) {
    using S = decltype(stag);
    const int per_block = kBlock / 32;
    std::int64_t blocks = (rows + per_block - 1) / per_block;
    chunk_sumsq_kernel<S><<<static_cast<unsigned>(std::min<std::int64_t>(blocks, 65535)), kBlock, 0, as_stream(s)>>>(
        static_cast<const S*>(src), rows, chunk, inv_scale, out);
    check_launch("chunk_sumsq");
  });
}

void unscale_check_sumsq(const void* src, DType src_dtype, void* dst, DType dst_dtype, std::int64_t n,
                         const float* inv_scale, float* found_inf, float* sumsq, float* workspace, Stream s) {
  if (n == 0) return;
  if (workspace == nullptr) throw std::invalid_argument("unscale_check_sumsq: workspace is required on CUDA");
  auto* partials = reinterpret_cast<k::SumsqAcc*>(workspace);
  std::int64_t chunks = reduce_partials(n);
  with_dtype(src_dtype, [&](auto stag) {
    with_optional_dtype(dst, dst_dtype, [&](auto dtag) {
      using S = decltype(stag);
      using D = decltype(dtag);
      const std::uintptr_t addrs[] = {reinterpret_cast<std::uintptr_t>(src), reinterpret_cast<std::uintptr_t>(dst)};
      const int elem_bytes[] = {static_cast<int>(sizeof(S)), static_cast<int>(sizeof(D))};  // D: NoArray if none
      const std::uint32_t mask = vector_mask(addrs, elem_bytes, 2, 0, kVec);
      auto* kernel = &sumsq_stage1<S, D>;
      kernel<<<grid_for(kernel, chunks * kBlock), kBlock, 0, as_stream(s)>>>(
          static_cast<const S*>(src), static_cast<D*>(dst), n, chunks, inv_scale, mask & 1u, mask >> 1 & 1u,
          partials);
      check_launch("unscale_check_sumsq");
    });
  });
  sumsq_stage2<<<1, kBlock, 0, as_stream(s)>>>(partials, chunks, sumsq, found_inf);
  check_launch("unscale_check_sumsq");
}

void step_scalars(const StepScalarArgs& a, Stream s) {
  if (a.bucket_rows == nullptr && a.phase != kStepGlobal) {
    clear_flag_and_sumsq<<<1, 1, 0, as_stream(s)>>>(a.scalars);
    check_launch("step_scalars");
    unscale_check_sumsq(a.grad, a.grad_dtype, nullptr, DType::f32, a.n, a.inv_scale, a.scalars + kFoundInf,
                        a.scalars + kSumsq, a.workspace, s);
  }
  if (a.bucket_rows == nullptr && a.phase == kStepLocal) return;
  step_scalars_tail<<<1, 1, 0, as_stream(s)>>>(a.bucket_rows, a.buckets, a.scalars, a.inv_scale, a.loss_scale_state,
                                               a.max_norm, a.loss_scale, a.host_mirror, a.boundaries, a.abort_word,
                                               a.phase);
  check_launch("step_scalars");
}

void clip_coef(const float* sumsq, const float* inv_scale, float max_norm, float* out, Stream s) {
  clip_kernel<<<1, 1, 0, as_stream(s)>>>(sumsq, inv_scale, max_norm, out);
  check_launch("clip_coef");
}

}  // namespace pyengine::cuda
