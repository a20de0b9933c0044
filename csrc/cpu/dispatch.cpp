// CPU backend entry points: pick the SIMD table once, resolve the device-resident scalars
// (on the CPU they are plain host floats), then call the table.
#include <omp.h>

#include <atomic>
#include <cstring>
#include <stdexcept>
#include <string>

#include "cpu/convert.h"
#include "cpu/op_table.h"
#include "cpu/parallel.h"
#include "kernels/loss_scale.h"
#include "kernels/norm.h"
#include "kernels/optimizers.h"
#include "kernels/prologue.h"

namespace pyengine {

const char* dtype_name(DType t) {
  switch (t) {
    case DType::f32: return "float32";
    case DType::f16: return "float16";
    case DType::bf16: return "bfloat16";
  }
  return "unknown";
}

namespace cpu {
namespace {

const OpTable& pick_table() {
#if defined(__x86_64__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))
    return isa_avx2::table;
#endif
  return isa_generic::table;
}

const OpTable& ops() {
  static const OpTable& t = pick_table();
  return t;
}

std::atomic<int> g_threads{0};

void check_n(std::int64_t n, const char* op) {
  if (n < 0) throw std::invalid_argument(std::string(op) + ": n must be >= 0");
}

}  // namespace

void set_num_threads(int n) {
  if (n < 1) throw std::invalid_argument("set_num_threads: n must be >= 1, got " + std::to_string(n));
  g_threads = n;
}
int num_threads() {
  int n = g_threads.load();
  return n > 0 ? n : omp_get_max_threads();
}
const char* simd_level() { return ops().name; }

void accumulate(float* dst, const void* src, DType src_dtype, std::int64_t n, float alpha, Stream) {
  check_n(n, "accumulate");
  ops().accumulate(dst, src, src_dtype, n, alpha);
}

void fill(void* dst, DType dtype, std::int64_t n, float value, Stream) {
  check_n(n, "fill");
  ops().fill(dst, dtype, n, value);
}

void set_hyper(double* dst, const double* values, int n, Stream) {
  if (n < 0 || n > kHyperSlots) throw std::invalid_argument("set_hyper: n must be in [0, 8]");
  std::memcpy(dst, values, static_cast<size_t>(n) * sizeof(double));
}

void cast_scale(void* dst, DType dst_dtype, const void* src, DType src_dtype, std::int64_t n, float alpha,
                Stream) {
  check_n(n, "cast_scale");
  ops().cast_scale(dst, dst_dtype, src, src_dtype, n, alpha);
}

void unscale_check_sumsq(const void* src, DType src_dtype, void* dst, DType dst_dtype, std::int64_t n,
                         const float* inv_scale, float* found_inf, float* sumsq, float*, Stream) {
  check_n(n, "unscale_check_sumsq");
  bool nonfinite = false;
  double s = ops().unscale_check_sumsq(src, src_dtype, dst, dst_dtype, n, inv_scale ? *inv_scale : 1.0f,
                                       &nonfinite);
  if (sumsq) *sumsq = static_cast<float>(static_cast<double>(*sumsq) + s);
  if (nonfinite && found_inf) *found_inf = 1.0f;
}

namespace {
// Note: element j of a chunk goes to lane j % 8, the lanes are folded in one fixed tree, so
// a chunk's sum is a function of its values alone (not of its address, the thread count or
// which rank computes it): what the deterministic norm is built on (deterministic.py).
// A float's square is exact in double, so contraction into an FMA cannot change a bit.
template <class T> double chunk_sum(const T* x, std::int64_t chunk, float inv) {
  double lane[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  std::int64_t j = 0;
  for (; j + 8 <= chunk; j += 8) {
    for (int l = 0; l < 8; ++l) {
      double y = static_cast<double>(to_float(x[j + l]) * inv);
      lane[l] += y * y;
    }
  }
  for (; j < chunk; ++j) {
    double y = static_cast<double>(to_float(x[j]) * inv);
    lane[j % 8] += y * y;
  }
  return ((lane[0] + lane[1]) + (lane[2] + lane[3])) + ((lane[4] + lane[5]) + (lane[6] + lane[7]));
}
}  // namespace

void chunk_sumsq(const void* src, DType src_dtype, std::int64_t rows, std::int64_t chunk, const float* inv_scale,
                 double* out, Stream) {
  check_n(rows, "chunk_sumsq");
  if (chunk < 1) throw std::invalid_argument("chunk_sumsq: chunk must be >= 1");
  const float inv = inv_scale ? *inv_scale : 1.0f;
  with_dtype(src_dtype, [&](auto tag) {
    using T = decltype(tag);
    const T* x = static_cast<const T*>(src);
    parallel_pieces(rows, rows * chunk, [&](std::int64_t r) { out[r] = chunk_sum(x + r * chunk, chunk, inv); });
  });
}

void clip_coef(const float* sumsq, const float* inv_scale, float max_norm, float* out, Stream) {
  kernels::clip_coefficient(*sumsq, inv_scale ? *inv_scale : 1.0f, max_norm, out);
}

namespace {
// A skipped step touches nothing but the gradient it was asked to clear.
void clear_grad(const OptimizerArgs& a) {
  if (a.zero_grad && a.n > 0) std::memset(a.grad, 0, static_cast<size_t>(a.n) * dtype_size(a.grad_dtype));
}

// One optimizer pass: check, read the device scalars once, skip or run the table's pass
// with this step's functor, count the step.
template <class R>
void run_optimizer(const OptimizerArgs& a, void (*pass)(const OptimizerArgs&, const typename R::elem&)) {
  using Elem = typename R::elem;
  if (const char* err = kernels::optimizer_args_error(a, R::states::kCount, kernels::StatesOptional<Elem>::value))
    throw std::invalid_argument(std::string(R::function) + ": " + err);
  kernels::OptimizerPrologue pro = kernels::optimizer_prologue(a);
  if (pro.skip) return clear_grad(a);  // master, state and step untouched
  pass(a, Elem::template make<typename R::hyper>(a.hyper, pro.next_step, pro.grad_scale));
  if (a.advance_step) *a.step = pro.next_step;
}
}  // namespace

#define PE_OPTIMIZER(name, elem, states, hyper) \
  void name##_step(const OptimizerArgs& a, Stream) { run_optimizer<kernels::registry::name>(a, ops().name##_step); }
#include "optimizers.def"
#undef PE_OPTIMIZER

void update_loss_scale(float* state, const float* found_inf, const LossScaleConfig& cfg, Stream) {
  kernels::update_loss_scale(state, found_inf ? *found_inf : 0.0f, cfg);
}

void step_scalars(const StepScalarArgs& a, Stream s) {
  float* sc = a.scalars;
  const float* inv = a.inv_scale;
  if (a.phase != kStepGlobal) {
    sc[kFoundInf] = 0.0f;
    sc[kSumsq] = 0.0f;
    if (a.bucket_rows != nullptr) {
      double sum = 0.0;
      float flag = 0.0f;
      for (std::int64_t b = 0; b < a.buckets; ++b) {  // row order: deterministic
        sum += a.bucket_rows[2 * b];
        float f = a.bucket_rows[2 * b + 1];
        flag = (f != 0.0f || flag != 0.0f) ? 1.0f : 0.0f;  // NaN != 0: flagged
      }
      sc[kSumsq] = static_cast<float>(sum);
      sc[kFoundInf] = flag;
    } else {
      unscale_check_sumsq(a.grad, a.grad_dtype, nullptr, DType::f32, a.n, inv, sc + kFoundInf, sc + kSumsq, nullptr,
                          s);
    }
  }
  if (a.phase == kStepLocal) return;
  if (a.abort_word != nullptr && *static_cast<const volatile std::int32_t*>(a.abort_word) != 0) sc[kFoundInf] = 1.0f;
  clip_coef(sc + kSumsq, inv, a.max_norm, sc + kGradNorm, s);
  update_loss_scale(a.loss_scale_state, sc + kFoundInf, a.loss_scale, s);
  if (a.boundaries != nullptr) *a.boundaries += 1;
  if (a.host_mirror != nullptr) std::memcpy(a.host_mirror, a.loss_scale_state, kLossScaleStateSize * sizeof(float));
}

void multi_copy(const std::uintptr_t* tensors, const std::int64_t* numels, int count, DType tensor_dtype,
                void* flat, DType flat_dtype, float alpha, bool to_flat, Stream) {
  ops().multi_copy(tensors, numels, count, tensor_dtype, flat, flat_dtype, alpha, to_flat);
}

}  // namespace cpu
}  // namespace pyengine
