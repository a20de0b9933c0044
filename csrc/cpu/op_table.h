// The CPU ops that have SIMD variants. ops_simd.cpp is compiled once per ISA level, each copy
// filling one OpTable; dispatch.cpp picks the best table the running CPU supports.
//
// Note: compiling one source twice (generic x86-64, and AVX2+FMA+F16C) lets the compiler
// vectorize the same functor loops for each level, and one wheel runs on any x86-64 CPU.
// The device scalars (flag, step, multiplier, hyper block) are read in dispatch.cpp, once per
// call, so the table's functions take plain values (an optimizer's ready-made functor).
#pragma once
#include <cstdint>

#include "kernels/optimizers.h"
#include "pyengine/core.h"

namespace pyengine::cpu {

struct OpTable {
  const char* name;
  void (*accumulate)(float* dst, const void* src, DType src_dtype, std::int64_t n, float alpha);
  void (*fill)(void* dst, DType dtype, std::int64_t n, float value);
  void (*cast_scale)(void* dst, DType dst_dtype, const void* src, DType src_dtype,
                     std::int64_t n, float alpha);
  // Returns the sum of squares; sets *nonfinite when any scaled value is inf or NaN.
  double (*unscale_check_sumsq)(const void* src, DType src_dtype, void* dst, DType dst_dtype,
                                std::int64_t n, float inv_scale, bool* nonfinite);
  void (*multi_copy)(const std::uintptr_t* tensors, const std::int64_t* numels, int count,
                     DType tensor_dtype, void* flat, DType flat_dtype, float alpha, bool to_flat);
  // One fused pass per optimizer of optimizers.def, with its per-launch functor already made.
#define PE_OPTIMIZER(name, elem, states, hyper) void (*name##_step)(const OptimizerArgs& args, const kernels::elem& f);
#include "optimizers.def"
#undef PE_OPTIMIZER
};

int num_threads();
namespace isa_generic { extern const OpTable table; }
namespace isa_avx2 { extern const OpTable table; }

}  // namespace pyengine::cpu
