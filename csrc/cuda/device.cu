// CUDA backend: loss-scale update kernel and device queries.
#include <map>
#include <mutex>
#include <utility>
#include <vector>

#include "cuda/launch.cuh"
#include "kernels/loss_scale.h"

#ifndef PE_CUDA_ARCHS
#define PE_CUDA_ARCHS ""
#endif

namespace pyengine::cuda {
namespace {

__global__ void loss_scale_kernel(float* state, const float* found_inf, LossScaleConfig cfg) {
  kernels::update_loss_scale(state, found_inf ? *found_inf : 0.0f, cfg);
}

struct Scalars {
  double v[kHyperSlots];
};
__global__ void set_hyper_kernel(double* dst, Scalars values, int n) {
  if (threadIdx.x < n) dst[threadIdx.x] = values.v[threadIdx.x];
}

}  // namespace

void set_hyper(double* dst, const double* values, int n, Stream s) {
  if (n < 0 || n > kHyperSlots) throw std::invalid_argument("set_hyper: n must be in [0, 8]");
  Scalars v{};
  for (int i = 0; i < n; ++i) v.v[i] = values[i];
  set_hyper_kernel<<<1, kHyperSlots, 0, as_stream(s)>>>(dst, v, n);
  check_launch("set_hyper");
}

void update_loss_scale(float* state, const float* found_inf, const LossScaleConfig& cfg, Stream s) {
  loss_scale_kernel<<<1, 1, 0, as_stream(s)>>>(state, found_inf, cfg);
  check_launch("update_loss_scale");
}

int device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // e.g. no driver (error 35): report no GPU, leave no sticky error
    return 0;
  }
  return n;
}

const char* compiled_archs() { return PE_CUDA_ARCHS; }

int sm_count() {
  static std::mutex mu;
  static std::vector<int> cache;
  int dev = 0;
  check(cudaGetDevice(&dev), "sm_count");
  std::lock_guard<std::mutex> lock(mu);
  if (static_cast<int>(cache.size()) <= dev) cache.resize(dev + 1, 0);
  if (cache[dev] == 0) check(cudaDeviceGetAttribute(&cache[dev], cudaDevAttrMultiProcessorCount, dev), "sm_count");
  return cache[dev];
}

int blocks_per_sm(const void* kernel) {
  static std::mutex mu;
  static std::map<std::pair<const void*, int>, int> cache;
  int dev = 0;
  check(cudaGetDevice(&dev), "blocks_per_sm");
  std::lock_guard<std::mutex> lock(mu);
  auto [it, fresh] = cache.try_emplace({kernel, dev}, 0);
  if (fresh) {
    cudaError_t err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&it->second, kernel, kBlock, 0);
    if (err != cudaSuccess) {
      cache.erase(it);
      raise_cuda(err, "blocks_per_sm");
    }
  }
  return it->second;
}

}  // namespace pyengine::cuda
