"""How one bucket's communication runs beside the computation, on the CPU and on CUDA.

A bucket's gradient work is always: [cast + predivide into the wire dtype] -> a collective
(allreduce, or reduce-scatter under ZeRO-1) -> `after`: the fused unscale / non-finite check
/ sum of squares of what this rank keeps, into the bucket's stats row (and, under ZeRO-1,
clearing the gradients of the slices other ranks own). Under ZeRO-1 each bucket's updated
parameters are then all-gathered after the step.

Note: on the CPU (gloo) the collective runs on gloo's threads and `after` runs in its
future, so the host thread goes on with backward; the step waits for the futures. On CUDA
everything is queued on a communication stream that first waits for what the compute stream
has produced so far; the compute stream later waits on each bucket's event, so the host
never waits. Timings: host clocks on the CPU, CUDA events on the GPU (EventWindows).

Note [abandon]: a failed backward abandons the buckets it launched, and the retried backward
writes the same gradient buffer. So abandon() first orders every launched collective before
what comes next: on the CPU it waits for their futures; on CUDA the compute stream waits for
the communication stream (no host sync). Only then may the gradients be cleared or written.
"""
import time
from typing import Callable, List, Optional

import torch


class BucketWork:
    """One bucket's resolved work: cast(stream) or None, collective() -> a handle with wait()
    (and then() on the CPU), after(stream); wire: the tensor the collective moves."""

    def __init__(self, index: int, numel: int, cast: Optional[Callable], collective: Callable, after: Callable,
                 wire: torch.Tensor, label: str = "allreduce"):
        self.index, self.numel, self.cast, self.collective, self.after = index, numel, cast, collective, after
        self.wire, self.label = wire, label


class CpuOverlap:
    def __init__(self, comm, tracer, stats):
        self.comm, self.tracer, self.stats = comm, tracer, stats
        self._pending: List[tuple] = []
        self._gathers: dict = {}

    def launch(self, w: BucketWork):
        t0 = time.perf_counter()
        self.tracer.instant(f"bucket {w.index} ready", t0, track="comm")
        if w.cast is not None:
            w.cast(0)
        work = w.collective()
        done = {}

        def after(w=w):
            w.after(0)
            done["t"] = time.perf_counter()

        self._pending.append((w, t0, done, work, work.then(after)))
        self.stats.count(w.wire)

    def finish(self):
        """Waits for every bucket's collective and its `after`."""
        t0 = time.perf_counter()
        pending, self._pending = self._pending, []
        for w, _, _, work, fut in pending:
            work.wait()
            try:
                fut.wait()
            except Exception as exc:
                raise RuntimeError(f"pyengine: post-{w.label} check of bucket {w.index} failed: {exc}") from exc
        t1 = time.perf_counter()
        for w, start, done, _, _ in pending:
            end = done.get("t", t1)
            self.stats.comm_s += end - start
            self.tracer.span(f"{w.label} bucket {w.index}", start, end, track="comm", numel=w.numel)
        self.stats.exposed_s += t1 - t0
        self.stats.windows += 1
        self.tracer.span("wait for comm (exposed)", t0, t1)

    def gather(self, index: int, start: Callable, numel: int):
        """Starts a parameter all-gather (start() -> handle), waited by wait_gather(index)."""
        self._gathers[index] = (start(), time.perf_counter(), numel)

    def wait_gather(self, index: int):
        entry = self._gathers.pop(index, None)
        if entry is not None:
            work, t0, numel = entry
            work.wait()
            t1 = time.perf_counter()
            self.tracer.span(f"all-gather bucket {index}", t0, t1, track="comm", numel=numel)

    def pending_gathers(self):
        return list(self._gathers)

    def abandon(self):
        """Forgets this window's buckets once nothing launched can still write (Note [abandon])."""
        pending, self._pending = self._pending, []
        for _, _, _, work, fut in pending:
            for handle in (work, fut):
                try:
                    handle.wait()
                except Exception:  # noqa: BLE001  the backward's own error is the one raised
                    pass

    def fold_timing(self):
        """Host timings are folded as they come."""


class CudaOverlap:
    def __init__(self, comm, tracer, stats, device):
        self.comm, self.tracer, self.stats, self.device = comm, tracer, stats, device
        self.stream = torch.cuda.Stream(device)
        self._spans: List[tuple] = []  # (bucket, start event, end event) of this window
        self._windows = EventWindows(stats)
        self._gathers: dict = {}

    def launch(self, w: BucketWork):
        self.tracer.instant(f"bucket {w.index} ready", time.perf_counter(), track="comm")
        compute = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(compute)  # the gradients produced so far
        with torch.cuda.stream(self.stream):
            s = self.stream.cuda_stream
            start = torch.cuda.Event(enable_timing=True)
            start.record(self.stream)
            if w.cast is not None:
                w.cast(s)
            work = w.collective()
            work.wait()  # NCCL: the comm stream waits; the host does not
            w.after(s)
            end = torch.cuda.Event(enable_timing=True)
            end.record(self.stream)
        w.wire.record_stream(self.stream)
        self._spans.append((w, start, end))
        self.stats.count(w.wire)

    def finish(self):
        """The compute stream waits for every bucket (no host sync)."""
        compute = torch.cuda.current_stream(self.device)
        mark = torch.cuda.Event(enable_timing=True)
        mark.record(compute)  # where the optimizer would start without communication
        for _, _, end in self._spans:
            compute.wait_event(end)
        self._windows.add(mark, self._spans)
        self._spans = []
        self.stats.windows += 1

    def gather(self, index: int, start: Callable, numel: int):
        self.stream.wait_stream(torch.cuda.current_stream(self.device))  # the updated parameters
        with torch.cuda.stream(self.stream):
            start().wait()
            done = torch.cuda.Event()
            done.record(self.stream)
        self._gathers[index] = done

    def wait_gather(self, index: int):
        """The compute stream waits for that bucket's parameters (no host sync)."""
        done = self._gathers.pop(index, None)
        if done is not None:
            torch.cuda.current_stream(self.device).wait_event(done)

    def pending_gathers(self):
        return list(self._gathers)

    def abandon(self):
        """Forgets this window's buckets; the compute stream first waits for every collective
        queued on the communication stream (Note [abandon])."""
        torch.cuda.current_stream(self.device).wait_stream(self.stream)
        self._spans = []

    def fold_timing(self):
        """Folds every recorded window into comm / exposed times (waits for them: a sync)."""
        self._windows.fold_all()


# at most this many windows' events wait to be folded (Note [bounded events])
MAX_UNFOLDED_WINDOWS = 4


class EventWindows:
    """The CUDA timing events of the windows not yet folded into stats: a mark on the compute
    stream where the optimizer would start without communication, and each bucket's (start,
    end) on the communication stream.

    Note [bounded events]: a window leaves 1 + 2 x buckets events. Folding them only when
    stats() is asked for grew the list without bound in a long run. Each new window folds the
    finished ones at the front (event queries, no sync): the streams run in order, so a window
    whose mark and last end have completed is done. When the host runs more than
    MAX_UNFOLDED_WINDOWS windows ahead of the device, the oldest is waited for: the host is
    then held at most that many steps ahead, which CUDA's launch queue bounds anyway.
    """

    def __init__(self, stats, limit: int = MAX_UNFOLDED_WINDOWS):
        self.stats, self.limit = stats, limit
        self._windows: List[tuple] = []  # (mark event, [(bucket, start, end), ...]), oldest first

    def __len__(self):
        return len(self._windows)

    def events(self) -> int:
        """Events held now (bounded by limit x (1 + 2 x buckets))."""
        return sum(1 + 2 * len(spans) for _, spans in self._windows)

    def add(self, mark, spans):
        self._windows.append((mark, spans))
        while self._windows and self._done(self._windows[0]):
            self._fold(self._windows.pop(0))
        while len(self._windows) > self.limit:
            self._fold(self._windows.pop(0), wait=True)

    def fold_all(self):
        while self._windows:
            self._fold(self._windows.pop(0), wait=True)

    @staticmethod
    def _done(window) -> bool:
        mark, spans = window
        return mark.query() and (not spans or spans[-1][2].query())

    def _fold(self, window, wait=False):
        mark, spans = window
        if wait:
            mark.synchronize()
            if spans:
                spans[-1][2].synchronize()
        for _, start, end in spans:
            self.stats.comm_s += start.elapsed_time(end) / 1e3
        late = max((mark.elapsed_time(end) for _, _, end in spans), default=0.0)
        self.stats.exposed_s += max(0.0, late) / 1e3
