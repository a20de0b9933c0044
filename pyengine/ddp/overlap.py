"""How one bucket's communication runs beside backward, on the CPU and on CUDA.

A bucket's work is always: [cast + predivide into the wire dtype] -> allreduce -> the fused
unscale / non-finite check / sum of squares of the reduced bucket into its stats row.

Note: on the CPU (gloo) the allreduce runs on gloo's threads and the check runs in the
collective's future, so the host thread goes on with backward; step() waits for the
futures. On CUDA everything is queued on a communication stream that first waits for the
gradients produced so far on the compute stream; step() makes the compute stream wait on
each bucket's event, so the host never waits. Timings: host clocks on the CPU, CUDA events
on the GPU, read (a sync) only when stats() is asked for.
"""
import time
from typing import Callable, List, Optional

import torch


class BucketWork:
    """One bucket's resolved work: cast(stream) or None, the wire slice, whether the
    collective averages (else the cast predivided), and check(stream)."""

    def __init__(self, index: int, numel: int, cast: Optional[Callable], wire: torch.Tensor, average: bool,
                 check: Callable):
        self.index, self.numel, self.cast, self.wire, self.average, self.check = index, numel, cast, wire, average, check


class CpuOverlap:
    def __init__(self, comm, tracer, stats):
        self.comm, self.tracer, self.stats = comm, tracer, stats
        self._pending: List[tuple] = []

    def launch(self, w: BucketWork):
        t0 = time.perf_counter()
        self.tracer.instant(f"bucket {w.index} ready", t0, track="comm")
        if w.cast is not None:
            w.cast(0)
        work = self.comm.allreduce(w.wire, average=w.average)
        done = {}

        def after(w=w):
            w.check(0)
            done["t"] = time.perf_counter()

        self._pending.append((w, t0, done, work, work.then(after)))
        self.stats.count(w.wire)

    def finish(self):
        """Waits for every bucket's collective and check."""
        t0 = time.perf_counter()
        pending, self._pending = self._pending, []
        for w, _, _, work, fut in pending:
            work.wait()
            try:
                fut.wait()
            except Exception as exc:
                raise RuntimeError(f"pyengine: post-allreduce check of bucket {w.index} failed: {exc}") from exc
        t1 = time.perf_counter()
        for w, start, done, _, _ in pending:
            end = done.get("t", t1)
            self.stats.comm_s += end - start
            self.tracer.span(f"allreduce bucket {w.index}", start, end, track="comm", numel=w.numel)
        self.stats.exposed_s += t1 - t0
        self.stats.windows += 1
        self.tracer.span("wait for comm (exposed)", t0, t1)

    def abandon(self):
        self._pending = []

    def fold_timing(self):
        """Host timings are folded as they come."""


class CudaOverlap:
    def __init__(self, comm, tracer, stats, device):
        self.comm, self.tracer, self.stats, self.device = comm, tracer, stats, device
        self.stream = torch.cuda.Stream(device)
        self._spans: List[tuple] = []  # (bucket, start event, end event) of this window
        self._windows: List[tuple] = []  # (mark event, spans) not yet folded into stats

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
            work = self.comm.allreduce(w.wire, average=w.average)
            work.wait()  # NCCL: the comm stream waits; the host does not
            w.check(s)
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
        self._windows.append((mark, self._spans))
        self._spans = []
        self.stats.windows += 1

    def abandon(self):
        self._spans = []

    def fold_timing(self):
        """Turns the recorded events into comm / exposed times (waits for them: a sync)."""
        for mark, spans in self._windows:
            for _, start, end in spans:
                end.synchronize()
                self.stats.comm_s += start.elapsed_time(end) / 1e3
            late = max((mark.elapsed_time(end) for _, _, end in spans), default=0.0)
            self.stats.exposed_s += max(0.0, late) / 1e3
        self._windows = []
