"""How a bucket's communication is ordered against the computation, and what its timing
keeps, checked on fake streams, events and collectives (the real CUDA path runs the same
code in tests/test_cuda_engine.py).

The invariants:
  - CUDA: a bucket's collective is queued after everything the compute stream produced; the
    optimizer's stream waits for every bucket's end; abandon() (a failed backward) makes the
    compute stream wait for the communication stream before anything else is queued there.
  - CPU: abandon() returns only when every launched collective and its check have finished.
  - The timing events held are bounded per step, however long the run (EventWindows)."""
import threading
import time

import pytest
import torch

from pyengine.ddp import overlap as ov
from pyengine.trace import CommStats, Tracer


class FakeEvent:
    """A CUDA event whose completion the test decides; time stamps come from a counter. As on
    a real stream, waiting for an event finishes every event recorded before it there."""

    clock = 0.0
    recorded = []

    def __init__(self, enable_timing=False, log=None, stream=None, t=None):
        self.log, self.done, self.synced, self.t, self.stream = log, False, False, t, stream
        FakeEvent.recorded.append(self)

    def record(self, stream=None):
        FakeEvent.clock += 1.0
        self.t, self.stream = FakeEvent.clock, stream
        if self.log is not None and stream is not None:
            self.log.append((stream.name, "record", id(self)))

    def query(self):
        return self.done

    def synchronize(self):
        self.synced = self.done = True
        for ev in FakeEvent.recorded:
            if ev.stream is self.stream and ev.t <= self.t:
                ev.done = True

    def elapsed_time(self, other):
        assert self.done and other.done, "elapsed_time of an unfinished event"
        return other.t - self.t


class FakeStream:
    def __init__(self, name, log):
        self.name, self.log, self.cuda_stream = name, log, 0

    def wait_stream(self, other):
        self.log.append((self.name, "waits for stream", other.name))

    def wait_event(self, ev):
        self.log.append((self.name, "waits for event", id(ev)))


class FakeWire:
    def numel(self):
        return 8

    def element_size(self):
        return 4

    def record_stream(self, stream):
        pass


class Done:
    def wait(self):
        pass


@pytest.fixture(autouse=True)
def fresh_events():
    FakeEvent.recorded = []


@pytest.fixture
def fake_cuda(monkeypatch):
    log = []
    compute = FakeStream("compute", log)
    monkeypatch.setattr(torch.cuda, "Stream", lambda device=None: FakeStream("comm", log))
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: compute)

    class StreamContext:
        def __init__(self, s):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(torch.cuda, "stream", StreamContext)
    monkeypatch.setattr(torch.cuda, "Event", lambda enable_timing=False: FakeEvent(enable_timing, log))
    return log


def bucket(index, log):
    def cast(stream):
        log.append(("comm", "cast", index))

    def collective():
        log.append(("comm", "collective", index))
        return Done()

    def after(stream):
        log.append(("comm", "check", index))

    return ov.BucketWork(index, 8, cast, collective, after, FakeWire())


def test_cuda_bucket_order_and_the_optimizer_waits_for_every_bucket(fake_cuda):
    log = fake_cuda
    o = ov.CudaOverlap(None, Tracer(False), CommStats(), "cuda:0")
    o.launch(bucket(0, log))
    o.launch(bucket(1, log))
    # each bucket: the comm stream waits for the compute stream, then cast, collective, check
    for k in (0, 1):
        i = log.index(("comm", "cast", k))
        assert log[i - 2] == ("comm", "waits for stream", "compute")
        assert log[i + 1:i + 3] == [("comm", "collective", k), ("comm", "check", k)]
    ends = [id(end) for _, _, end in o._spans]
    o.finish()
    waited = [e for s, what, e in log if s == "compute" and what == "waits for event"]
    assert waited == ends


def test_cuda_abandon_orders_the_comm_stream_before_the_compute_stream(fake_cuda):
    log = fake_cuda
    o = ov.CudaOverlap(None, Tracer(False), CommStats(), "cuda:0")
    o.launch(bucket(0, log))
    o.abandon()
    assert log[-1] == ("compute", "waits for stream", "comm"), log[-3:]
    assert o._spans == []
    o.finish()  # the retried backward's window holds none of the abandoned buckets
    assert not [e for s, what, e in log if s == "compute" and what == "waits for event"]


def test_cuda_overlap_holds_a_bounded_number_of_events(fake_cuda):
    """1,000 windows of 3 buckets with the device always behind: at most the limit's events."""
    log = fake_cuda
    stats = CommStats()
    o = ov.CudaOverlap(None, Tracer(False), stats, "cuda:0")
    held = []
    for _ in range(1000):
        for k in range(3):
            o.launch(bucket(k, log))
        o.finish()
        held.append(o._windows.events())
        log.clear()
    assert max(held) == ov.MAX_UNFOLDED_WINDOWS * (1 + 2 * 3)
    o.fold_timing()
    assert o._windows.events() == 0 and stats.windows == 1000


class Window:
    """The events of one window: a mark and buckets (start, end) with known times."""

    compute, comm = object(), object()

    def __init__(self, t0, spans):
        self.mark = FakeEvent(stream=self.compute, t=t0)
        self.spans = [(None, FakeEvent(stream=self.comm, t=start), FakeEvent(stream=self.comm, t=end))
                      for start, end in spans]

    def finish(self):
        for ev in [self.mark] + [e for _, s, e in self.spans] + [s for _, s, e in self.spans]:
            ev.done = True


def test_finished_windows_are_folded_without_a_sync():
    stats = CommStats()
    w = ov.EventWindows(stats, limit=4)
    total_comm = total_exposed = 0.0
    for k in range(50):
        win = Window(10.0 * k, [(10.0 * k - 4, 10.0 * k - 1), (10.0 * k - 2, 10.0 * k + 3)])
        win.finish()
        w.add(win.mark, win.spans)
        total_comm += 3 + 5
        total_exposed += 3
        assert len(w) == 0
        assert not any(e.synced for _, _, e in win.spans) and not win.mark.synced
    assert stats.comm_s == pytest.approx(total_comm / 1e3)
    assert stats.exposed_s == pytest.approx(total_exposed / 1e3)


def test_a_window_counts_as_done_only_when_its_mark_and_last_bucket_are():
    w = ov.EventWindows(CommStats(), limit=8)
    win = Window(0.0, [(1.0, 2.0), (2.0, 3.0)])
    for ev in [win.mark, win.spans[0][2], win.spans[0][1], win.spans[1][1]]:
        ev.done = True
    w.add(win.mark, win.spans)
    assert len(w) == 1  # the last bucket has not finished
    win.spans[1][2].done = True
    win.mark.done = False
    w.add(*_empty_finished())
    assert len(w) == 2  # the mark has not: the front stays, and the window behind it waits too
    win.mark.done = True
    w.add(*_empty_finished())
    assert len(w) == 0


def _empty_finished():
    win = Window(0.0, [])
    win.finish()
    return win.mark, win.spans


def test_past_the_limit_the_oldest_window_is_waited_for():
    stats = CommStats()
    w = ov.EventWindows(stats, limit=3)
    wins = [Window(10.0 * k, [(10.0 * k + 1, 10.0 * k + 4)]) for k in range(10)]  # the device never catches up
    for k, win in enumerate(wins):
        w.add(win.mark, win.spans)
        assert len(w) == min(k + 1, 3)
    assert all(win.spans[0][2].synced for win in wins[:7]) and not wins[7].spans[0][2].synced
    assert stats.comm_s == pytest.approx(7 * 3.0 / 1e3)
    w.fold_all()
    assert len(w) == 0 and stats.comm_s == pytest.approx(10 * 3.0 / 1e3)


class SlowWork:
    """A gloo collective still running on its thread: writes its result after `delay`."""

    def __init__(self, buf, delay, fail=False):
        self.buf, self.fail = buf, fail
        self._done = threading.Event()
        threading.Thread(target=self._run, args=(delay,), daemon=True).start()

    def _run(self, delay):
        time.sleep(delay)
        self.buf.fill_(7.0)
        self._done.set()

    def wait(self):
        self._done.wait()
        if self.fail:
            raise RuntimeError("peer gone")

    def then(self, fn):
        work = self

        class Future:
            def wait(self):
                work.wait()
                fn()

        return Future()


def test_cpu_abandon_waits_for_every_launched_collective():
    buf = torch.zeros(8)
    o = ov.CpuOverlap(None, Tracer(False), CommStats())
    w = ov.BucketWork(0, 8, None, lambda: SlowWork(buf, 0.2), lambda stream: None, buf)
    o.launch(w)
    o.abandon()
    assert torch.equal(buf, torch.full((8,), 7.0)), "abandon() returned while the collective still wrote"
    buf.zero_()
    time.sleep(0.05)
    assert not buf.any()


def test_cpu_abandon_swallows_a_failed_collective():
    """The failed backward's own error is the one raised; a collective that failed with it
    (a peer gone) surfaces at the next collective."""
    buf = torch.zeros(8)
    o = ov.CpuOverlap(None, Tracer(False), CommStats())
    o.launch(ov.BucketWork(0, 8, None, lambda: SlowWork(buf, 0.01, fail=True), lambda stream: None, buf))
    o.abandon()
    assert o._pending == []
