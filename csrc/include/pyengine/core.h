// pyengine core API: plain functions over (address, numel, dtype) and a stream handle.
//
// Note: the core never sees torch, numpy or Python. A tensor crosses in as a raw address,
// an element count and a DType; a CUDA stream as its handle (an integer, 0 on CPU). That is
// what lets one compiled wheel serve any torch version.
//
// Device-resident scalars (flag, sum of squares, multipliers, step counters, loss-scale
// state) are passed as float pointers into the same memory space as the buffers, so no op
// ever needs the host to read a value back.
#pragma once
#include <cstdint>

namespace pyengine {

enum class DType : int { f32 = 0, f16 = 1, bf16 = 2 };

inline int dtype_size(DType t) { return t == DType::f32 ? 4 : 2; }
const char* dtype_name(DType t);

using Stream = std::uintptr_t;  // cudaStream_t as an integer; 0 is the legacy default stream

// Hyper-parameters of the fused Adam family. `decoupled` selects AdamW (decay applied to the
// weights) against Adam (L2 decay added to the gradient).
struct AdamConfig {
  float lr, beta1, beta2, eps, weight_decay;
  bool decoupled;
};

struct SgdConfig {
  float lr, momentum, dampening, weight_decay;
  bool nesterov;
};

// Dynamic loss scaling, DeepSpeed semantics (see kernels/loss_scale.h).
struct LossScaleConfig {
  float growth_factor, backoff_factor, min_scale, max_scale;
  int growth_interval, hysteresis;
  bool consecutive_hysteresis;
};

// Layout of the loss-scale state array (float32 x kLossScaleStateSize, device-resident).
enum LossScaleSlot : int {
  kScale = 0, kInvScale = 1, kGrowthTracker = 2, kHysteresisLeft = 3,
  kSkippedTotal = 4, kConsecutiveSkips = 5, kLastFound = 6, kStateReserved = 7
};
constexpr int kLossScaleStateSize = 8;

// Elements summed into one partial by the deterministic reductions. Fixed, so the result
// depends on the data alone, never on the number of threads or blocks.
constexpr std::int64_t kReduceChunk = 8192;
inline std::int64_t reduce_partials(std::int64_t n) { return (n + kReduceChunk - 1) / kReduceChunk; }

// Every backend implements this same set of functions (namespaces cpu and cuda).
// Pointers named *_dev live in the buffers' memory space. Null optional pointers mean
// "absent": inv_scale/grad_scale = 1, found_inf = never skip, model = no half copy.
#define PYENGINE_DECLARE_OPS                                                                   \
  /* dst(f32) += alpha * src */                                                              \
  void accumulate(float* dst, const void* src, DType src_dtype, std::int64_t n, float alpha,   \
                  Stream stream);                                                             \
  /* dst = alpha * src, any dtype to any dtype */                                            \
  void cast_scale(void* dst, DType dst_dtype, const void* src, DType src_dtype,               \
                  std::int64_t n, float alpha, Stream stream);                                \
  /* y = src * inv_scale; found_inf |= !finite(y); sumsq += sum(y*y); dst = y if dst */       \
  void unscale_check_sumsq(const void* src, DType src_dtype, void* dst, DType dst_dtype,      \
                           std::int64_t n, const float* inv_scale_dev, float* found_inf_dev,  \
                           float* sumsq_dev, float* workspace_dev, Stream stream);            \
  /* out[0] = sqrt(sumsq); out[1] = inv_scale * min(1, max_norm / (norm + 1e-6)) */          \
  void clip_coef(const float* sumsq_dev, const float* inv_scale_dev, float max_norm,          \
                 float* out_dev, Stream stream);                                              \
  /* zero_grad: write 0 to grad after reading it (also on a skipped step), saving the */    \
  /* separate zeroing pass over the gradient buffer */                                        \
  void adam_step(float* master, float* exp_avg, float* exp_avg_sq, void* grad,                \
                 DType grad_dtype, bool zero_grad, void* model, DType model_dtype, std::int64_t n, \
                 const float* grad_scale_dev, const float* found_inf_dev, float* step_dev,    \
                 const AdamConfig& cfg, Stream stream);                                       \
  void sgd_step(float* master, float* momentum_buf, void* grad, DType grad_dtype,             \
                bool zero_grad, void* model, DType model_dtype, std::int64_t n, const float* grad_scale_dev,  \
                const float* found_inf_dev, float* step_dev, const SgdConfig& cfg,            \
                Stream stream);                                                               \
  void update_loss_scale(float* state_dev, const float* found_inf_dev,                        \
                         const LossScaleConfig& cfg, Stream stream);                          \
  /* Multi-tensor gather (to_flat) or scatter: flat[offsets[i]..] <-> tensors[i] x alpha */  \
  void multi_copy(const std::uintptr_t* tensors, const std::int64_t* numels, int count,       \
                  DType tensor_dtype, void* flat, DType flat_dtype, float alpha, bool to_flat, \
                  Stream stream);

namespace cpu {
PYENGINE_DECLARE_OPS
void set_num_threads(int n);
int num_threads();
const char* simd_level();
}  // namespace cpu

namespace cuda {
PYENGINE_DECLARE_OPS
int device_count();          // 0 when no driver or no device; never throws
const char* compiled_archs();
}  // namespace cuda

}  // namespace pyengine
