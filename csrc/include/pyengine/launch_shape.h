// The host decisions that shape a CUDA elementwise launch, as plain functions (no CUDA
// include): the CPU module binds them for tests, cuda/launch.cuh calls them.
#pragma once
#include <cstdint>
#include <stdexcept>

namespace pyengine {

// Blocks of `block` threads to cover `work_threads` thread-steps, at most one full wave
// (`sms` x `blocks_per_sm`, what the kernel's registers and shared memory let reside at once);
// the kernel strides over the rest. At least 1.
//
// Note: the work is spread evenly over grid-stride threads, so a grid past one wave leaves a
// partial second wave (1.6 waves at 5 resident blocks per SM and a cap of 8) and the SMs idle
// for the tail of it; one wave exactly keeps every resident block busy to the end.
inline std::int64_t grid_blocks(std::int64_t work_threads, int block, int sms, int blocks_per_sm) {
  if (block < 1) throw std::invalid_argument("grid_blocks: block must be >= 1");
  const std::int64_t wave = static_cast<std::int64_t>(sms < 1 ? 1 : sms) * (blocks_per_sm < 1 ? 1 : blocks_per_sm);
  const std::int64_t needed = work_threads > 0 ? (work_threads - 1) / block + 1 : 0;
  const std::int64_t blocks = needed < wave ? needed : wave;
  return blocks < 1 ? 1 : blocks;
}

// Bit k set: array k's groups of `vec` elements starting at element `head` lie on
// vec x elem_bytes[k] byte boundaries. An absent array (address 0) counts as aligned.
inline std::uint32_t vector_mask(const std::uintptr_t* addrs, const int* elem_bytes, int count, int head, int vec) {
  if (count < 0 || count > 32) throw std::invalid_argument("vector_mask: count must be in [0, 32]");
  std::uint32_t mask = 0;
  for (int k = 0; k < count; ++k) {
    const std::uintptr_t group_bytes = static_cast<std::uintptr_t>(elem_bytes[k]) * vec;
    if (addrs[k] == 0 || (addrs[k] + static_cast<std::uintptr_t>(head) * elem_bytes[k]) % group_bytes == 0)
      mask |= 1u << k;
  }
  return mask;
}

struct VectorPlan {
  int head;            // elements [0, head) are done one at a time
  std::uint32_t mask;  // arrays (bit k: array k) whose groups from `head` on use vector loads/stores
};

// The head peel in [0, vec) (and <= n) that moves the most bytes through vector loads and
// stores, the smallest such; and which arrays then go vector.
//
// Note: a group is vec elements of every array at the same indices, so one peel shifts all
// arrays alike; an array that still does not line up loads its group element by element
// instead of sending every array of the launch to the scalar path. The score is what the
// vector path actually moves: whole groups after the peel times the aligned arrays' bytes.
inline VectorPlan vector_plan(const std::uintptr_t* addrs, const int* elem_bytes, int count, std::int64_t n, int vec) {
  if (vec < 1) throw std::invalid_argument("vector_plan: vec must be >= 1");
  VectorPlan best{0, vector_mask(addrs, elem_bytes, count, 0, vec)};
  std::int64_t best_bytes = -1;
  for (int head = 0; head < vec && head <= n; ++head) {
    const std::uint32_t mask = vector_mask(addrs, elem_bytes, count, head, vec);
    std::int64_t bytes = 0;
    for (int k = 0; k < count; ++k)
      if (addrs[k] != 0 && (mask >> k & 1u)) bytes += elem_bytes[k];
    bytes *= (n - head) / vec * vec;
    if (bytes > best_bytes) best = {head, mask}, best_bytes = bytes;
  }
  return best;
}

}  // namespace pyengine
