// The few NCCL ABI facts pyengine needs, declared here so the CUDA module builds without
// NCCL's headers; the library itself is found at run time (the one torch already loaded).
// Values follow NCCL's public, stable C ABI (nccl.h, 2.x).
#pragma once

namespace pyengine::nccl {

constexpr int kUniqueIdBytes = 128;
struct UniqueId {
  char internal[kUniqueIdBytes];
};
struct CommHandle;  // opaque ncclComm
using Comm = CommHandle*;

enum Result : int {
  kSuccess = 0, kUnhandledCudaError = 1, kSystemError = 2, kInternalError = 3,
  kInvalidArgument = 4, kInvalidUsage = 5, kRemoteError = 6, kInProgress = 7
};
enum DataType : int { kFloat16 = 6, kFloat32 = 7, kBfloat16 = 9, kInt64 = 4 };
enum RedOp : int { kSum = 0, kAvg = 4 };

}  // namespace pyengine::nccl
