// _C._CommGuardProbe: CommGuard over a fake communicator, so tests/test_comm_guard.py can check
// the protocol on the CPU. The fake "NCCL call" sleeps; the fake abort records what it saw.
#include <pybind11/pybind11.h>

#include <chrono>
#include <condition_variable>
#include <memory>
#include <thread>
#include <vector>

#include "comm/comm_guard.h"

namespace pyengine::comm {
namespace {

class CommGuardProbe {
  using Clock = std::chrono::steady_clock;

 public:
  // A poller thread calls guard.poll() every poll_interval_s, as NcclComm's watchdog does.
  CommGuardProbe(double poll_interval_s, double stuck_after_s)
      : guard_({[this] { raise_abort_word(&word_); }, [this] { fake_abort(); }}, "probe", stuck_after_s),
        poll_interval_(std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(poll_interval_s))) {
    poller_ = std::thread([this] {
      std::unique_lock<std::mutex> lock(mu_);
      while (!stop_) {
        cv_.wait_for(lock, poll_interval_);
        lock.unlock();
        guard_.poll();
        lock.lock();
      }
    });
  }
  ~CommGuardProbe() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop_ = true;
    }
    cv_.notify_all();
    poller_.join();
    for (auto& t : workers_) t.join();
  }

  // On the calling thread; raises as NcclComm's collectives do.
  void enqueue(double seconds) {
    guard_.enqueue([&] { fake_nccl_call(seconds); });
  }

  // On a worker thread; returns once the worker is inside the fake NCCL call.
  void start_enqueue(double seconds) {
    workers_.emplace_back([this, seconds] {
      try {
        enqueue(seconds);
      } catch (const std::exception& e) {
        std::lock_guard<std::mutex> lock(mu_);
        worker_error_ = e.what();
        ++refused_;
      }
      cv_.notify_all();
    });
    std::unique_lock<std::mutex> lock(mu_);
    cv_.wait(lock, [&] { return entered_ + refused_ > started_waits_; });
    ++started_waits_;
  }

  // Waits for the workers; returns the last worker's error ("" if none raised).
  std::string join() {
    for (auto& t : workers_) t.join();
    workers_.clear();
    std::lock_guard<std::mutex> lock(mu_);
    return worker_error_;
  }

  // n threads, released together, all request an abort.
  void request_abort_from_threads(int n) {
    std::vector<std::thread> threads;
    std::atomic<bool> go{false};
    for (int i = 0; i < n; ++i)
      threads.emplace_back([this, i, &go] {
        while (!go.load()) std::this_thread::yield();
        guard_.request_abort("request " + std::to_string(i));
      });
    go.store(true);
    for (auto& t : threads) t.join();
  }

  CommGuard& guard() { return guard_; }
  int abort_word() const { return __atomic_load_n(&word_, __ATOMIC_SEQ_CST); }
  int aborts() const { return aborts_.load(); }
  int nccl_calls() const { return nccl_calls_.load(); }
  int inside_at_abort() const { return inside_at_abort_.load(); }
  int word_at_abort() const { return word_at_abort_.load(); }
  // Seconds from the last fake call's end to the abort (negative: the abort came first).
  double abort_after_leave_s() const { return seconds(last_leave_, abort_at_); }
  // Seconds from the first abort request to the abort.
  double abort_after_request_s() const { return seconds(first_request_, abort_at_); }
  void request_abort(const std::string& why) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (first_request_ == Clock::time_point{}) first_request_ = Clock::now();
    }
    guard_.request_abort(why);
  }

 private:
  void fake_nccl_call(double secs) {
    nccl_calls_.fetch_add(1);
    inside_.fetch_add(1);
    {
      std::lock_guard<std::mutex> lock(mu_);
      ++entered_;
    }
    cv_.notify_all();
    std::this_thread::sleep_for(std::chrono::duration<double>(secs));
    {
      std::lock_guard<std::mutex> lock(mu_);
      last_leave_ = Clock::now();
    }
    inside_.fetch_sub(1);
  }

  void fake_abort() {
    inside_at_abort_.store(inside_.load());
    word_at_abort_.store(abort_word());
    {
      std::lock_guard<std::mutex> lock(mu_);
      abort_at_ = Clock::now();
    }
    aborts_.fetch_add(1);
  }

  double seconds(Clock::time_point from, Clock::time_point to) const {
    std::lock_guard<std::mutex> lock(mu_);
    return std::chrono::duration<double>(to - from).count();
  }

  std::int32_t word_ = 0;
  std::atomic<int> aborts_{0}, nccl_calls_{0}, inside_{0}, inside_at_abort_{-1}, word_at_abort_{-1};
  mutable std::mutex mu_;
  std::condition_variable cv_;
  bool stop_ = false;
  int entered_ = 0, refused_ = 0, started_waits_ = 0;
  std::string worker_error_;
  Clock::time_point last_leave_{}, abort_at_{}, first_request_{};
  CommGuard guard_;  // after the fields its hooks touch
  Clock::duration poll_interval_;
  std::vector<std::thread> workers_;
  std::thread poller_;
};

}  // namespace
}  // namespace pyengine::comm

void bind_comm_guard_probe(pybind11::module_& m) {
  namespace py = pybind11;
  using Probe = pyengine::comm::CommGuardProbe;
  auto nogil = py::call_guard<py::gil_scoped_release>();
  py::class_<Probe>(m, "_CommGuardProbe", "CommGuard over a fake communicator (tests only)")
      .def(py::init<double, double>(), py::arg("poll_interval_s"), py::arg("stuck_after_s"))
      .def("enqueue", &Probe::enqueue, py::arg("seconds"), nogil)
      .def("start_enqueue", &Probe::start_enqueue, py::arg("seconds"), nogil)
      .def("join", &Probe::join, nogil)
      .def("request_abort", &Probe::request_abort, py::arg("why"), nogil)
      .def("request_abort_from_threads", &Probe::request_abort_from_threads, py::arg("n"), nogil)
      .def("poll", [](Probe& p) { p.guard().poll(); }, nogil)
      .def("check", [](Probe& p) { p.guard().check(); }, nogil)
      .def("try_query", [](Probe& p) { return p.guard().try_use([] {}); }, nogil)
      .def_property_readonly("abort_requested", [](Probe& p) { return p.guard().abort_requested(); })
      .def_property_readonly("abort_performed", [](Probe& p) { return p.guard().abort_performed(); })
      .def_property_readonly("reason", [](Probe& p) { return p.guard().reason(); })
      .def_property_readonly("abort_word", &Probe::abort_word)
      .def_property_readonly("aborts", &Probe::aborts)
      .def_property_readonly("nccl_calls", &Probe::nccl_calls)
      .def_property_readonly("inside_at_abort", &Probe::inside_at_abort)
      .def_property_readonly("word_at_abort", &Probe::word_at_abort)
      .def_property_readonly("abort_after_leave_s", &Probe::abort_after_leave_s)
      .def_property_readonly("abort_after_request_s", &Probe::abort_after_request_s);
}
