// NCCL communicator: unique id, collectives on a caller's stream, an async-error and
// timeout watchdog that aborts the communicator instead of letting the job hang.
#pragma once
#include <cstdint>
#include <memory>
#include <string>

#include "pyengine/core.h"

namespace pyengine::comm {

// Loads NCCL (path, else the already-loaded libnccl.so.2, else the default search) once.
// Returns "" on success or why it failed.
std::string nccl_load(const std::string& path);
std::string nccl_unique_id(const std::string& path);  // 128 bytes
int nccl_version();

class NcclComm {
 public:
  NcclComm(const std::string& unique_id, int rank, int world_size, int device, double timeout_s);
  ~NcclComm();
  NcclComm(const NcclComm&) = delete;
  NcclComm& operator=(const NcclComm&) = delete;

  void allreduce(std::uintptr_t buf, std::int64_t n, DType dtype, bool average, Stream stream);
  void reduce_scatter(std::uintptr_t send, std::uintptr_t recv, std::int64_t recv_count, DType dtype,
                      bool average, Stream stream);
  void all_gather(std::uintptr_t send, std::uintptr_t recv, std::int64_t send_count, DType dtype, Stream stream);
  void broadcast(std::uintptr_t buf, std::int64_t n, DType dtype, int root, Stream stream);
  // send_count elements to peer and recv_count from it, grouped (deterministic mode's exchange)
  void sendrecv(std::uintptr_t send, std::int64_t send_count, std::uintptr_t recv, std::int64_t recv_count,
                DType dtype, int peer, Stream stream);

  // Raises (std::runtime_error) once an abort was requested: the watchdog found an error or a
  // timeout, or abort() was called. The collectives raise the same way before enqueuing.
  void check() const;
  // Aborts the communicator: pending collectives fail, later calls raise. If a collective is
  // being enqueued on another thread, ncclCommAbort runs once that enqueue has left.
  void abort(const std::string& why);
  bool aborted() const;
  // The abort word: device address of an int32 in pinned, mapped host memory, 0 while healthy,
  // set to 1 before ncclCommAbort runs, so device code can skip work that would consume what
  // an aborted collective left half done. Valid for this communicator's lifetime.
  std::uintptr_t abort_word() const;
  std::uintptr_t abort_word_host() const;  // the same int32's host address
  int rank() const { return rank_; }
  int world_size() const { return world_; }

 private:
  struct State;
  void watch_after_enqueue(Stream stream, const char* op);
  std::shared_ptr<State> st_;
  int rank_, world_;
};

}  // namespace pyengine::comm
