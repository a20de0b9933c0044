// NCCL communicator over the library found at run time (see nccl_comm.h).
//
// Note: NCCL is not linked. torch already loaded one libnccl.so.2 into the process; a second
// copy would mean two NCCL runtimes, so dlopen first asks for the loaded one (RTLD_NOLOAD)
// and only then searches. The watchdog thread polls each collective's completion event and
// ncclCommGetAsyncError; an error, or a collective older than the timeout, aborts the
// communicator, so the next check() raises instead of the job hanging forever.
//
// Note: every call into the communicator goes through CommGuard (comm_guard.h): the main
// thread's enqueues under its mutex, the watchdog's query and abort only when no enqueue is
// in progress, since NCCL communicators take one thread at a time.
#include "comm/nccl_comm.h"

#include <cuda_runtime.h>
#include <dlfcn.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <mutex>
#include <stdexcept>
#include <thread>

#include "comm/comm_guard.h"
#include "comm/nccl_abi.h"

namespace pyengine::comm {
namespace {

using nccl::Comm;
using nccl::Result;
using nccl::UniqueId;

struct Lib {
  void* handle = nullptr;
  Result (*get_unique_id)(UniqueId*) = nullptr;
  Result (*comm_init_rank)(Comm*, int, UniqueId, int) = nullptr;
  Result (*all_reduce)(const void*, void*, size_t, int, int, Comm, cudaStream_t) = nullptr;
  Result (*reduce_scatter)(const void*, void*, size_t, int, int, Comm, cudaStream_t) = nullptr;
  Result (*all_gather)(const void*, void*, size_t, int, Comm, cudaStream_t) = nullptr;
  Result (*broadcast)(const void*, void*, size_t, int, int, Comm, cudaStream_t) = nullptr;
  Result (*get_async_error)(Comm, Result*) = nullptr;
  Result (*abort)(Comm) = nullptr;
  Result (*destroy)(Comm) = nullptr;
  const char* (*error_string)(Result) = nullptr;
  Result (*get_version)(int*) = nullptr;
  // point-to-point (NCCL >= 2.7), optional: only deterministic mode's exchange uses them
  Result (*send)(const void*, size_t, int, int, Comm, cudaStream_t) = nullptr;
  Result (*recv)(void*, size_t, int, int, Comm, cudaStream_t) = nullptr;
  Result (*group_start)() = nullptr;
  Result (*group_end)() = nullptr;
};

std::mutex g_lib_mu;
Lib g_lib;

template <class F> bool sym(void* h, const char* name, F& out) {
  out = reinterpret_cast<F>(dlsym(h, name));
  return out != nullptr;
}

const Lib& lib() {
  std::lock_guard<std::mutex> lock(g_lib_mu);
  if (!g_lib.handle) throw std::runtime_error("pyengine NCCL: the library is not loaded (call nccl_load first)");
  return g_lib;
}

void check_nccl(Result r, const char* op) {
  if (r != nccl::kSuccess && r != nccl::kInProgress)
    throw std::runtime_error(std::string("pyengine.NcclComm.") + op + ": NCCL error " + std::to_string(r) + ": " +
                             (g_lib.error_string ? g_lib.error_string(r) : "?"));
}

void check_cuda(cudaError_t e, const char* op) {
  if (e != cudaSuccess)
    throw std::runtime_error(std::string("pyengine.NcclComm.") + op + ": CUDA error " + cudaGetErrorName(e) + ": " +
                             cudaGetErrorString(e));
}

int nccl_dtype(DType t) {
  switch (t) {
    case DType::f32: return nccl::kFloat32;
    case DType::f16: return nccl::kFloat16;
    case DType::bf16: return nccl::kBfloat16;
  }
  throw std::invalid_argument("pyengine.NcclComm: unsupported dtype");
}

cudaStream_t as_stream(Stream s) { return reinterpret_cast<cudaStream_t>(s); }

}  // namespace

std::string nccl_load(const std::string& path) {
  std::lock_guard<std::mutex> lock(g_lib_mu);
  if (g_lib.handle) return "";
  const char* name = path.empty() ? "libnccl.so.2" : path.c_str();
  void* h = dlopen(name, RTLD_NOW | RTLD_GLOBAL | RTLD_NOLOAD);
  if (!h) h = dlopen(name, RTLD_NOW | RTLD_GLOBAL);
  if (!h) return std::string("cannot load ") + name + ": " + dlerror();
  Lib l;
  l.handle = h;
  bool ok = sym(h, "ncclGetUniqueId", l.get_unique_id) && sym(h, "ncclCommInitRank", l.comm_init_rank) &&
            sym(h, "ncclAllReduce", l.all_reduce) && sym(h, "ncclReduceScatter", l.reduce_scatter) &&
            sym(h, "ncclAllGather", l.all_gather) && sym(h, "ncclBroadcast", l.broadcast) &&
            sym(h, "ncclCommGetAsyncError", l.get_async_error) && sym(h, "ncclCommAbort", l.abort) &&
            sym(h, "ncclCommDestroy", l.destroy) && sym(h, "ncclGetErrorString", l.error_string) &&
            sym(h, "ncclGetVersion", l.get_version);
  if (!ok) return std::string(name) + " lacks an NCCL symbol pyengine needs (NCCL 2.x required)";
  if (!(sym(h, "ncclSend", l.send) && sym(h, "ncclRecv", l.recv) && sym(h, "ncclGroupStart", l.group_start) &&
        sym(h, "ncclGroupEnd", l.group_end)))
    l.send = nullptr;  // sendrecv() then says so
  g_lib = l;
  return "";
}

std::string nccl_unique_id(const std::string& path) {
  std::string err = nccl_load(path);
  if (!err.empty()) throw std::runtime_error("pyengine NCCL: " + err);
  UniqueId id;
  check_nccl(lib().get_unique_id(&id), "unique_id");
  return std::string(id.internal, nccl::kUniqueIdBytes);
}

int nccl_version() {
  int v = 0;
  check_nccl(lib().get_version(&v), "version");
  return v;
}

struct NcclComm::State {
  // An abort that has waited a whole collective timeout for an enqueue to leave is performed
  // anyway (see comm_guard.h).
  State(int rank, double timeout)
      : timeout_s(timeout),
        guard({[this] { raise_abort_word(word_host); },
               [this] {
                 if (comm) lib().abort(comm);  // pending kernels return early; the comm is gone after
               }},
              "pyengine.NcclComm (rank " + std::to_string(rank) + ")", timeout) {}
  ~State() {
    if (word_host) cudaFreeHost(word_host);
  }

  Comm comm = nullptr;
  int device = 0;
  double timeout_s;
  // The abort word: 0 while healthy, 1 from just before ncclCommAbort (see abort_word()).
  std::int32_t* word_host = nullptr;
  void* word_device = nullptr;
  CommGuard guard;
  std::mutex mu;  // pending, stop
  std::condition_variable cv;
  struct Pending {
    cudaEvent_t event;
    std::chrono::steady_clock::time_point start;
    const char* op;
  };
  std::deque<Pending> pending;
  std::atomic<bool> stop{false};
  std::thread watchdog;

  void run() {
    using namespace std::chrono;
    cudaSetDevice(device);
    std::unique_lock<std::mutex> lock(mu);
    while (!stop) {
      cv.wait_for(lock, milliseconds(50));
      guard.poll();  // a pending abort, once the enqueue in progress has left
      if (guard.abort_requested()) continue;
      Result async = nccl::kSuccess;
      bool asked = guard.try_use([&] {
        if (lib().get_async_error(comm, &async) != nccl::kSuccess) async = nccl::kSuccess;
      });
      if (asked && async != nccl::kSuccess && async != nccl::kInProgress) {
        guard.request_abort(std::string("NCCL reported an asynchronous error: ") + lib().error_string(async));
        continue;
      }
      while (!pending.empty()) {
        cudaError_t q = cudaEventQuery(pending.front().event);
        if (q == cudaErrorNotReady) {
          double age = duration<double>(steady_clock::now() - pending.front().start).count();
          if (age > timeout_s)
            guard.request_abort(std::string(pending.front().op) + " did not complete within " +
                                std::to_string(timeout_s) +
                                " s (a peer rank died, stalled or issued a different collective); "
                                "communicator aborted");
          break;
        }
        cudaEventDestroy(pending.front().event);
        pending.pop_front();
        if (q != cudaSuccess) {
          guard.request_abort(std::string("CUDA error after ") + "collective: " + cudaGetErrorString(q));
          break;
        }
      }
    }
  }
};

NcclComm::NcclComm(const std::string& unique_id, int rank, int world_size, int device, double timeout_s)
    : st_(std::make_shared<State>(rank, timeout_s)), rank_(rank), world_(world_size) {
  if (unique_id.size() != static_cast<size_t>(nccl::kUniqueIdBytes))
    throw std::invalid_argument("NcclComm: unique_id must be 128 bytes (from nccl_unique_id on rank 0)");
  if (world_size < 1 || rank < 0 || rank >= world_size)
    throw std::invalid_argument("NcclComm: rank must be in [0, world_size)");
  if (!(timeout_s > 0)) throw std::invalid_argument("NcclComm: timeout_s must be > 0");
  std::string err = nccl_load("");
  if (!err.empty()) throw std::runtime_error("pyengine NCCL: " + err);
  UniqueId id;
  std::memcpy(id.internal, unique_id.data(), nccl::kUniqueIdBytes);
  check_cuda(cudaSetDevice(device), "init");
  st_->device = device;
  check_cuda(cudaHostAlloc(reinterpret_cast<void**>(&st_->word_host), sizeof(std::int32_t), cudaHostAllocMapped),
             "init (abort word)");
  *st_->word_host = 0;
  check_cuda(cudaHostGetDevicePointer(&st_->word_device, st_->word_host, 0), "init (abort word)");
  check_nccl(lib().comm_init_rank(&st_->comm, world_size, id, rank), "init");
  auto st = st_;
  st_->watchdog = std::thread([st] { st->run(); });
}

NcclComm::~NcclComm() {
  {
    std::lock_guard<std::mutex> lock(st_->mu);
    st_->stop = true;
  }
  st_->cv.notify_all();
  if (st_->watchdog.joinable()) st_->watchdog.join();
  for (auto& p : st_->pending) cudaEventDestroy(p.event);
  // an abort still waiting for its poll runs now; a healthy communicator is destroyed
  if (!st_->guard.abort_if_requested() && st_->comm) lib().destroy(st_->comm);
}

void NcclComm::check() const { st_->guard.check(); }

void NcclComm::abort(const std::string& why) {
  st_->guard.request_abort(why.empty() ? "aborted by the application" : why);
}

bool NcclComm::aborted() const { return st_->guard.abort_requested(); }

std::uintptr_t NcclComm::abort_word() const { return reinterpret_cast<std::uintptr_t>(st_->word_device); }

std::uintptr_t NcclComm::abort_word_host() const { return reinterpret_cast<std::uintptr_t>(st_->word_host); }

void NcclComm::watch_after_enqueue(Stream stream, const char* op) {
  cudaEvent_t ev;
  check_cuda(cudaEventCreateWithFlags(&ev, cudaEventDisableTiming), op);
  check_cuda(cudaEventRecord(ev, as_stream(stream)), op);
  std::lock_guard<std::mutex> lock(st_->mu);
  st_->pending.push_back({ev, std::chrono::steady_clock::now(), op});
}

void NcclComm::allreduce(std::uintptr_t buf, std::int64_t n, DType dtype, bool average, Stream stream) {
  check();
  if (n < 0) throw std::invalid_argument("NcclComm.allreduce: n must be >= 0");
  void* p = reinterpret_cast<void*>(buf);
  st_->guard.enqueue([&] {
    check_nccl(lib().all_reduce(p, p, static_cast<size_t>(n), nccl_dtype(dtype), average ? nccl::kAvg : nccl::kSum,
                                st_->comm, as_stream(stream)),
               "allreduce");
  });
  watch_after_enqueue(stream, "allreduce");
}

void NcclComm::reduce_scatter(std::uintptr_t send, std::uintptr_t recv, std::int64_t recv_count, DType dtype,
                              bool average, Stream stream) {
  check();
  if (recv_count < 0) throw std::invalid_argument("NcclComm.reduce_scatter: recv_count must be >= 0");
  st_->guard.enqueue([&] {
    check_nccl(lib().reduce_scatter(reinterpret_cast<const void*>(send), reinterpret_cast<void*>(recv),
                                    static_cast<size_t>(recv_count), nccl_dtype(dtype),
                                    average ? nccl::kAvg : nccl::kSum, st_->comm, as_stream(stream)),
               "reduce_scatter");
  });
  watch_after_enqueue(stream, "reduce_scatter");
}

void NcclComm::all_gather(std::uintptr_t send, std::uintptr_t recv, std::int64_t send_count, DType dtype,
                          Stream stream) {
  check();
  if (send_count < 0) throw std::invalid_argument("NcclComm.all_gather: send_count must be >= 0");
  st_->guard.enqueue([&] {
    check_nccl(lib().all_gather(reinterpret_cast<const void*>(send), reinterpret_cast<void*>(recv),
                                static_cast<size_t>(send_count), nccl_dtype(dtype), st_->comm, as_stream(stream)),
               "all_gather");
  });
  watch_after_enqueue(stream, "all_gather");
}

void NcclComm::broadcast(std::uintptr_t buf, std::int64_t n, DType dtype, int root, Stream stream) {
  check();
  if (root < 0 || root >= world_) throw std::invalid_argument("NcclComm.broadcast: root out of range");
  if (n < 0) throw std::invalid_argument("NcclComm.broadcast: n must be >= 0");
  void* p = reinterpret_cast<void*>(buf);
  st_->guard.enqueue([&] {
    check_nccl(lib().broadcast(p, p, static_cast<size_t>(n), nccl_dtype(dtype), root, st_->comm, as_stream(stream)),
               "broadcast");
  });
  watch_after_enqueue(stream, "broadcast");
}

// Note: one grouped send and receive, so the two ranks of a pair never wait on each other's
// send (NCCL's point-to-point calls block until matched otherwise); the counts may differ by
// one element (halving an odd range).
void NcclComm::sendrecv(std::uintptr_t send, std::int64_t send_count, std::uintptr_t recv, std::int64_t recv_count,
                        DType dtype, int peer, Stream stream) {
  check();
  if (peer < 0 || peer >= world_) throw std::invalid_argument("NcclComm.sendrecv: peer out of range");
  if (send_count < 0 || recv_count < 0) throw std::invalid_argument("NcclComm.sendrecv: counts must be >= 0");
  const Lib& l = lib();
  if (l.send == nullptr) throw std::runtime_error("pyengine.NcclComm.sendrecv: this NCCL has no ncclSend/ncclRecv");
  int dt = nccl_dtype(dtype);
  st_->guard.enqueue([&] {  // the whole group, from this one thread
    check_nccl(l.group_start(), "sendrecv");
    Result rs = l.send(reinterpret_cast<const void*>(send), static_cast<size_t>(send_count), dt, peer, st_->comm,
                       as_stream(stream));
    Result rr = l.recv(reinterpret_cast<void*>(recv), static_cast<size_t>(recv_count), dt, peer, st_->comm,
                       as_stream(stream));
    Result re = l.group_end();
    check_nccl(rs, "sendrecv (send)");
    check_nccl(rr, "sendrecv (recv)");
    check_nccl(re, "sendrecv (group)");
  });
  watch_after_enqueue(stream, "sendrecv");
}

}  // namespace pyengine::comm
