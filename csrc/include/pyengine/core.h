// pyengine core API: plain functions over (address, numel, dtype) and a stream handle.
//
// Note: the core never sees torch, numpy or Python. A tensor crosses in as a raw address,
// an element count and a DType; a CUDA stream as its handle (an integer, 0 on CPU). That is
// what lets one compiled wheel serve any torch version.
//
// Device-resident scalars (flag, sum of squares, multipliers, hyper-parameters, loss-scale
// state) are passed as float pointers into the same memory space as the buffers, so no op
// ever needs the host to read a value back. Counters (optimizer steps, boundary steps) are
// int64 there: a float32 count stops advancing at 2^24.
#pragma once
#include <cstdint>

namespace pyengine {

enum class DType : int { f32 = 0, f16 = 1, bf16 = 2 };

inline int dtype_size(DType t) { return t == DType::f32 ? 4 : 2; }
const char* dtype_name(DType t);

using Stream = std::uintptr_t;  // cudaStream_t as an integer; 0 is the legacy default stream

// Note: the hyper-parameters of every optimizer live in device memory, one block of
// kHyperSlots doubles per param group (OptimizerArgs::hyper), in the order its line in
// csrc/optimizers.def names them; booleans (nesterov, maximize) travel as 0.0 / 1.0. It is
// the one source of them: a captured CUDA graph then follows an LR schedule, since the
// values are read when the kernel runs, not when it was launched. They are doubles because
// torch.optim derives its per-step scalars (1 - beta, 1 - beta**step, lr / bc1, 1 - lr x wd)
// from the Python floats in double and rounds each once: a float32 beta2 = 0.999 alone moves
// 1 - beta2 by 1.3e-5 relative. The kernels do the same once per launch (per thread on CUDA).
constexpr int kHyperSlots = 8;  // doubles reserved per param group

// Dynamic loss scaling, DeepSpeed semantics (see kernels/loss_scale.h).
struct LossScaleConfig {
  float growth_factor = 2.0f, backoff_factor = 0.5f, min_scale = 1.0f, max_scale = 16777216.0f;
  int growth_interval = 2000, hysteresis = 2;
  bool consecutive_hysteresis = false;
};

// One fused optimizer pass over one contiguous range of the flat buffers.
//
// Note: the pointers are resolved once per buffer layout (the engine's plan) and the struct
// is reused every step; the hyper-parameters are read from `hyper` when the pass runs.
// Null optional pointers mean "absent": grad_scale = 1, found_inf = never skip, model = no
// half copy, state1 = no SGD momentum buffer. `hyper` and `step` are required.
struct OptimizerArgs {
  float* master = nullptr;
  float* state1 = nullptr;  // the optimizer's states, in the order optimizers.def names them:
  float* state2 = nullptr;  //   Adam(W) exp_avg, exp_avg_sq; SGD momentum_buffer; Lion exp_avg
  void* grad = nullptr;
  DType grad_dtype = DType::f32;
  bool zero_grad = false;  // write 0 to grad after reading it (also on a skipped step)
  void* model = nullptr;   // the half-precision (or fp32) model copy written from master
  DType model_dtype = DType::f32;
  std::int64_t n = 0;
  const float* grad_scale = nullptr;  // device: 1/loss_scale x clip coefficient
  const float* found_inf = nullptr;   // device: a nonzero value skips the whole update
  std::int64_t* step = nullptr;       // device: updates taken so far by this range (exact integer)
  const double* hyper = nullptr;      // device: kHyperSlots doubles, the optimizer's hyper-parameters
  bool advance_step = true;           // count the update (false for all but a group's last range)
};

// The scalar work of one boundary step, in one call (see step_scalars below).
struct StepScalarArgs {
  // where the gradient statistics come from: a read-only pass over the gradient buffer...
  const void* grad = nullptr;
  DType grad_dtype = DType::f32;
  std::int64_t n = 0;
  float* workspace = nullptr;  // CUDA: 2 x reduce_partials(n) floats
  // ...or, under data parallel, one (sumsq, found_inf) row per bucket, folded in row order
  const float* bucket_rows = nullptr;
  std::int64_t buckets = 0;
  float* scalars = nullptr;            // the StepSlot array
  const float* inv_scale = nullptr;    // the gradients' multiplier to unscale (null: 1)
  float* loss_scale_state = nullptr;   // kLossScaleStateSize floats, updated last
  float max_norm = 0.0f;              // <= 0 or inf: no clipping
  LossScaleConfig loss_scale;
  float* host_mirror = nullptr;       // pinned host memory: receives the loss-scale state (GPU)
  std::int64_t* boundaries = nullptr; // device: +1 per boundary step (kStepAll, kStepGlobal); null: not counted
  // The communicator's abort word (host memory the device can read; null: none). Nonzero
  // once the communicator was aborted: its collectives may have returned part-way, so the
  // step is flagged as non-finite and skipped (kStepAll, kStepGlobal) instead of applying
  // partially reduced gradients; the next collective then raises on the host.
  const std::int32_t* abort_word = nullptr;
  // kStepAll: all of it. Sharded optimizer state (ZeRO-1) splits it around an allreduce of
  // this rank's (found_inf, sumsq): kStepLocal folds them, kStepGlobal does the rest.
  int phase = 0;
};
constexpr int kStepAll = 0, kStepLocal = 1, kStepGlobal = 2;

// The engine's per-step device scalars live in one float32 array; these are its slots,
// exported to Python by the bindings so the numbers are written once.
enum StepSlot : int {
  kFoundInf = 0,    // nonzero: some gradient is inf/NaN, the update is skipped
  kSumsq = 1,       // sum of squares of the unscaled gradients
  kGradNorm = 2,    // sqrt(sumsq), written by clip_coef (out[0])
  kGradCoef = 3,    // 1/loss_scale x clip coefficient, written by clip_coef (out[1])
  // slot 4 is reserved (it held a float boundary count; StepScalarArgs::boundaries counts them
  // now, as an exact integer)
  kStepSlots = 8,   // (4 and the rest reserved)
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
// "absent": inv_scale = 1, found_inf/sumsq = not written.
#define PYENGINE_DECLARE_OPS                                                                   \
  /* dst(f32) += alpha * src */                                                              \
  void accumulate(float* dst, const void* src, DType src_dtype, std::int64_t n, float alpha,   \
                  Stream stream);                                                             \
  /* dst[0..n) = value */                                                                     \
  void fill(void* dst, DType dtype, std::int64_t n, float value, Stream stream);               \
  /* dst_dev[0..n) = values (host, n <= kHyperSlots), queued on the stream */                 \
  void set_hyper(double* dst_dev, const double* values, int n, Stream stream);                 \
  /* dst = alpha * src, any dtype to any dtype */                                            \
  void cast_scale(void* dst, DType dst_dtype, const void* src, DType src_dtype,               \
                  std::int64_t n, float alpha, Stream stream);                                \
  /* y = src * inv_scale; found_inf |= !finite(y); sumsq += sum(y*y); dst = y if dst */       \
  void unscale_check_sumsq(const void* src, DType src_dtype, void* dst, DType dst_dtype,      \
                           std::int64_t n, const float* inv_scale_dev, float* found_inf_dev,  \
                           float* sumsq_dev, float* workspace_dev, Stream stream);            \
  /* out[r] = sum of (src[r*chunk + j] * inv_scale)^2, j < chunk, in double, for r < rows: */ \
  /* a fixed order within each chunk, so a chunk's sum depends on its values alone        */ \
  void chunk_sumsq(const void* src, DType src_dtype, std::int64_t rows, std::int64_t chunk,   \
                   const float* inv_scale_dev, double* out_dev, Stream stream);               \
  /* out[0] = sqrt(sumsq); out[1] = inv_scale * min(1, max_norm / (norm + 1e-6)) */          \
  void clip_coef(const float* sumsq_dev, const float* inv_scale_dev, float max_norm,          \
                 float* out_dev, Stream stream);                                              \
  void update_loss_scale(float* state_dev, const float* found_inf_dev,                        \
                         const LossScaleConfig& cfg, Stream stream);                          \
  /* found_inf and sumsq (fresh) of the unscaled gradients, then grad_norm and grad_coef   */ \
  /* (clip_coef), then the loss-scale update: the step's scalar work before the optimizer. */ \
  void step_scalars(const StepScalarArgs& args, Stream stream);                               \
  /* Multi-tensor gather (to_flat) or scatter: flat[offsets[i]..] <-> tensors[i] x alpha */  \
  void multi_copy(const std::uintptr_t* tensors, const std::int64_t* numels, int count,       \
                  DType tensor_dtype, void* flat, DType flat_dtype, float alpha, bool to_flat, \
                  Stream stream);

// One fused optimizer pass per line of csrc/optimizers.def, `<name>_step(args, stream)` in
// both namespaces, and the list itself (`optimizers`) for the bindings.
struct OptimizerInfo {
  const char* name;      // "adamw"
  const char* function;  // "adamw_step"
  const char* states;    // "exp_avg, exp_avg_sq": what state1, state2 hold
  const char* hyper;     // "lr, beta1, beta2, eps, weight_decay, maximize": the hyper block's slots
  void (*step)(const OptimizerArgs& args, Stream stream);
};

namespace cpu {
PYENGINE_DECLARE_OPS
#include "pyengine/optimizers.inc"
void set_num_threads(int n);
int num_threads();
const char* simd_level();
}  // namespace cpu

namespace cuda {
PYENGINE_DECLARE_OPS
#include "pyengine/optimizers.inc"
int device_count();          // 0 when no driver or no device; never throws
const char* compiled_archs();
}  // namespace cuda

}  // namespace pyengine
