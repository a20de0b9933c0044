// CUDA drivers: accumulate, fill, cast_scale (on launch.cuh's elementwise driver) and the
// multi-tensor flatten/unflatten.
#include <algorithm>
#include <vector>

#include "cuda/launch.cuh"
#include "kernels/unscale.h"

namespace pyengine::cuda {
namespace {

namespace k = pyengine::kernels;

// Note: one launch moves up to kMaxTensors tensors; the host cuts them into tiles of
// kTile elements and block b copies tile b, so no thread searches for its tensor.
constexpr int kMaxTensors = 512;
constexpr int kMaxTiles = 1024;
constexpr std::int64_t kTile = 1 << 16;

struct MultiCopyArgs {
  std::uintptr_t ptr[kMaxTensors];
  std::int64_t numel[kMaxTensors];
  std::int64_t flat_offset[kMaxTensors];
  std::int16_t tile_tensor[kMaxTiles];
  std::int32_t tile_index[kMaxTiles];
};

template <class T, class F, int W>
__device__ void copy_tile(T* t, F* f, std::int64_t b, std::int64_t e, float alpha, bool to_flat) {
  for (std::int64_t i = b + threadIdx.x * W; i < e; i += blockDim.x * W) {
    float x[W];
    if (to_flat) {
      load<W>(t, i, x);
#pragma unroll
      for (int j = 0; j < W; ++j) x[j] = k::scale_value(x[j], alpha);
      store<W>(f, i, x);
    } else {
      load<W>(f, i, x);
#pragma unroll
      for (int j = 0; j < W; ++j) x[j] = k::scale_value(x[j], alpha);
      store<W>(t, i, x);
    }
  }
}

template <class T, class F>
__global__ void multi_copy_kernel(const __grid_constant__ MultiCopyArgs a, F* flat, float alpha, bool to_flat) {
  int t = a.tile_tensor[blockIdx.x];
  std::int64_t n = a.numel[t];
  std::int64_t b = static_cast<std::int64_t>(a.tile_index[blockIdx.x]) * kTile;
  std::int64_t e = b + kTile < n ? b + kTile : n;
  T* tp = reinterpret_cast<T*>(a.ptr[t]);
  F* fp = flat + a.flat_offset[t];
  bool vec = (reinterpret_cast<std::uintptr_t>(tp) % (sizeof(T) * kVec) == 0) &&
             (reinterpret_cast<std::uintptr_t>(fp) % (sizeof(F) * kVec) == 0);
  std::int64_t vec_end = vec ? b + (e - b) / kVec * kVec : b;
  if (vec) copy_tile<T, F, kVec>(tp, fp, b, vec_end, alpha, to_flat);
  copy_tile<T, F, 1>(tp, fp, vec_end, e, alpha, to_flat);
}

}  // namespace

void accumulate(float* dst, const void* src, DType src_dtype, std::int64_t n, float alpha, Stream s) {
  with_dtype(src_dtype, [&](auto tag) {
    using S = decltype(tag);
    launch_elementwise(Always<k::AccumulateElem>{{alpha}}, n, s, "accumulate", inout(dst), in(static_cast<const S*>(src)));
  });
}

void fill(void* dst, DType dtype, std::int64_t n, float value, Stream s) {
  with_dtype(dtype, [&](auto tag) {
    using D = decltype(tag);
    launch_elementwise(Always<k::FillElem>{{value}}, n, s, "fill", out(static_cast<D*>(dst)));
  });
}

void cast_scale(void* dst, DType dst_dtype, const void* src, DType src_dtype, std::int64_t n, float alpha,
                Stream s) {
  with_dtype(src_dtype, [&](auto stag) {
    with_dtype(dst_dtype, [&](auto dtag) {
      using S = decltype(stag);
      using D = decltype(dtag);
      launch_elementwise(Always<k::ScaleElem>{{alpha}}, n, s, "cast_scale", out(static_cast<D*>(dst)),
                         in(static_cast<const S*>(src)));
    });
  });
}

void multi_copy(const std::uintptr_t* tensors, const std::int64_t* numels, int count, DType tensor_dtype,
                void* flat, DType flat_dtype, float alpha, bool to_flat, Stream s) {
  with_dtype(tensor_dtype, [&](auto ttag) {
    with_dtype(flat_dtype, [&](auto ftag) {
      using T = decltype(ttag);
      using F = decltype(ftag);
      MultiCopyArgs args;
      int nt = 0, ntiles = 0;
      auto flush = [&]() {
        if (ntiles > 0) {
          multi_copy_kernel<T, F><<<ntiles, kBlock, 0, as_stream(s)>>>(args, static_cast<F*>(flat), alpha, to_flat);
          check_launch("multi_copy");
        }
        nt = 0;
        ntiles = 0;
      };
      std::int64_t offset = 0;
      for (int i = 0; i < count; offset += numels[i], ++i) {
        if (numels[i] == 0) continue;
        int slot = -1;
        for (std::int64_t tile = 0; tile * kTile < numels[i]; ++tile) {
          if (ntiles == kMaxTiles || (slot < 0 && nt == kMaxTensors)) {
            flush();
            slot = -1;
          }
          if (slot < 0) {  // (re)register tensor i in the current batch
            slot = nt++;
            args.ptr[slot] = tensors[i];
            args.numel[slot] = numels[i];
            args.flat_offset[slot] = offset;
          }
          args.tile_tensor[ntiles] = static_cast<std::int16_t>(slot);
          args.tile_index[ntiles] = static_cast<std::int32_t>(tile);
          ++ntiles;
        }
      }
      flush();
    });
  });
}

}  // namespace pyengine::cuda
