// CommGuard: who may call into a communicator, and when it may be aborted. Pure host code
// (no CUDA, no NCCL), so the protocol is tested on the CPU through _C._CommGuardProbe.
//
// One thread (the main thread) enqueues collectives; a watchdog thread polls for errors and
// timeouts and asks for the abort. The guard keeps the two from ever being inside the
// communicator at once:
//   - enqueue(call) runs call under the enqueue mutex, and raises first if an abort was
//     requested, so nothing new reaches a communicator that is going away;
//   - request_abort(why) records why at once (the next enqueue or check raises with it),
//     raises the abort word through its hook, then performs the real abort only if it can
//     take the enqueue mutex without waiting;
//   - poll(), from the watchdog's loop, retries a pending abort each time it runs.
//
// Note: NCCL communicators are not thread-safe: only one thread may operate a communicator at
// a time, and nothing exempts ncclCommGetAsyncError or ncclCommAbort. Hence try_use() for the
// watchdog's own queries, and an abort that waits for the enqueue in progress to leave.
//
// Note: an enqueue that never leaves (a blocking NCCL call waiting on a peer that died) would
// keep the abort pending forever, and the process hung. NCCL documents ncclCommAbort as
// aborting the operations still running on the device, and makes abort callable at any point
// only for nonblocking communicators; it does not document that ncclCommAbort unblocks a
// blocking host call made by another thread. So the guard waits, and only once an abort has
// waited stuck_after_s for the enqueue in progress (no other can start after a request) does
// it abort anyway, concurrently: by then that call is lost either way, and without the abort
// the process hangs. The reason then says so. stuck_after_s = infinity never aborts concurrently.
#pragma once
#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <limits>
#include <mutex>
#include <stdexcept>
#include <string>
#include <utility>

namespace pyengine::comm {

// Sets an abort word (pinned, device-mapped host memory in NcclComm) to 1 and fences, so the
// store is visible to the device before anything this thread does next. The thread that then
// aborts, if another, saw the request published after this store (CommGuard::request_abort).
inline void raise_abort_word(std::int32_t* word) {
  if (word == nullptr) return;
  __atomic_store_n(word, 1, __ATOMIC_SEQ_CST);
  __atomic_thread_fence(__ATOMIC_SEQ_CST);
}

class CommGuard {
 public:
  using Clock = std::chrono::steady_clock;
  struct Hooks {
    std::function<void()> raise_abort_word;  // runs once, before abort
    std::function<void()> abort;             // the real abort (ncclCommAbort); runs once
  };

  // label prefixes the error raised after an abort ("pyengine.NcclComm (rank 0)").
  CommGuard(Hooks hooks, std::string label,
            double stuck_after_s = std::numeric_limits<double>::infinity())
      : hooks_(std::move(hooks)), label_(std::move(label)), stuck_after_s_(stuck_after_s) {}
  CommGuard(const CommGuard&) = delete;
  CommGuard& operator=(const CommGuard&) = delete;

  // Main thread: runs call (the NCCL enqueue) unless an abort was requested, which raises.
  template <class Call> void enqueue(Call&& call) {
    check();  // without waiting for an enqueue in progress on another thread
    std::lock_guard<std::mutex> lock(enqueue_mu_);
    check();  // a request made while this thread waited
    in_enqueue_.store(true);
    struct Leave {
      std::atomic<bool>& flag;
      ~Leave() { flag.store(false); }
    } leave{in_enqueue_};
    call();
  }

  // Raises (std::runtime_error, naming the reason) once an abort was requested.
  void check() const {
    if (!requested_.load()) return;
    std::lock_guard<std::mutex> lock(reason_mu_);
    throw std::runtime_error(label_ + ": " + reason_);
  }

  // Any thread. The first request wins: its reason is kept and the word raised, before any
  // abort can run; later requests change nothing.
  void request_abort(const std::string& why) {
    {
      std::lock_guard<std::mutex> lock(reason_mu_);
      if (requested_.load()) return;
      reason_ = why;
      requested_at_ = Clock::now();
      if (hooks_.raise_abort_word) hooks_.raise_abort_word();
      requested_.store(true);
    }
    try_perform();
  }

  // Watchdog: performs a pending abort once no enqueue is in progress (or past the bound).
  void poll() { try_perform(); }

  // Watchdog: runs query on the communicator (ncclCommGetAsyncError) only while no enqueue is
  // in progress and no abort was requested. Returns whether it ran.
  template <class Query> bool try_use(Query&& query) {
    std::unique_lock<std::mutex> lock(enqueue_mu_, std::try_to_lock);
    if (!lock.owns_lock() || requested_.load()) return false;
    query();
    return true;
  }

  // Owner, before freeing the communicator (no enqueue can start any more): performs a pending
  // abort, waiting for an enqueue in progress. Returns whether the communicator was aborted.
  bool abort_if_requested() {
    if (!requested_.load()) return false;
    std::lock_guard<std::mutex> lock(enqueue_mu_);
    perform_once(false);
    return true;
  }

  bool abort_requested() const { return requested_.load(); }
  bool abort_performed() const { return performed_.load(); }
  std::string reason() const {
    std::lock_guard<std::mutex> lock(reason_mu_);
    return reason_;
  }

 private:
  void try_perform() {
    if (!requested_.load()) return;
    std::unique_lock<std::mutex> lock(enqueue_mu_, std::try_to_lock);
    if (lock.owns_lock())
      perform_once(false);
    else if (stuck_past_bound())
      perform_once(true);  // else retried at the next poll
  }

  bool stuck_past_bound() {
    if (!in_enqueue_.load()) return false;  // the enqueue is leaving: the next poll gets the lock
    std::lock_guard<std::mutex> lock(reason_mu_);
    return std::chrono::duration<double>(Clock::now() - requested_at_).count() >= stuck_after_s_;
  }

  void perform_once(bool while_enqueue_inside) {
    if (performed_.exchange(true)) return;
    if (while_enqueue_inside) {
      std::lock_guard<std::mutex> lock(reason_mu_);
      reason_ += " (aborted while an enqueue was still inside NCCL after " + std::to_string(stuck_after_s_) +
                 " s; that call's outcome is unknown)";
    }
    if (hooks_.abort) hooks_.abort();
  }

  Hooks hooks_;
  const std::string label_;
  const double stuck_after_s_;
  std::mutex enqueue_mu_;         // held by the enqueuing thread inside NCCL
  mutable std::mutex reason_mu_;  // reason_, requested_at_
  std::string reason_;
  Clock::time_point requested_at_{};
  std::atomic<bool> requested_{false};
  std::atomic<bool> performed_{false};
  std::atomic<bool> in_enqueue_{false};
};

}  // namespace pyengine::comm
