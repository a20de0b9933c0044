"""Bucketed gradient allreduce that overlaps backward.

Note: on the last micro-batch of an accumulation window each parameter's post-accumulate
hook marks it ready in its bucket; when a bucket's last gradient lands, and every bucket
before it has been launched, its allreduce starts while backward goes on. Buckets launch in
index order, the same on every rank. After a bucket's reduction, the fused
unscale / non-finite check / sum of squares runs for that bucket right there (CPU: on the
communication thread, via the collective's future; CUDA: on the comm stream, ordered by
events), writing its own slot of a small stats tensor, so step() sums the slots in a fixed
order (deterministic) and is left with one optimizer pass.
"""
import time

import torch

from . import ops
from .buffers import DTYPES, make_buckets


class Reducer:
    def __init__(self, buffers, comm, cfg, inv_scale, tracer, stats):
        self.fb = buffers
        self.comm = comm
        self.cfg = cfg
        self.world = comm.world_size
        self.inv_scale = inv_scale
        self.tracer = tracer
        self.stats = stats
        self.wire_dtype = DTYPES[cfg.comm_dtype] if cfg.comm_dtype else buffers.grad_dtype
        self.cuda = buffers.device.type == "cuda"
        self.comm_stream = torch.cuda.Stream(buffers.device) if self.cuda else None
        self.ready_order = []  # first communicating iteration: params in gradient-ready order
        self.rebuilt = not cfg.rebuild_buckets
        self._build()
        self.active = False
        self._gpu_windows = []  # CUDA: (step-start event, [(start, end) per bucket]) not yet folded

    def _build(self):
        mb = 1024 * 1024
        self.buckets = make_buckets(self.fb, self.cfg.bucket_mb * mb, self.cfg.first_bucket_mb * mb)
        self.bucket_of = {id(p): b for b in self.buckets for p in b.params}
        # Wire buffer: the gradient buffer itself when the dtypes match, else a flat copy in the
        # wire dtype that the optimizer then reads directly (no cast back).
        self.wire_flat = (self.fb.grad_flat if self.wire_dtype == self.fb.grad_dtype
                          else torch.empty(self.fb.numel, dtype=self.wire_dtype, device=self.fb.device))
        self.bucket_stats = torch.zeros(max(1, len(self.buckets)), 2, device=self.fb.device)  # sumsq, found_inf
        self.workspaces = [ops.sumsq_workspace(self.wire_flat[b.start:b.end]) if self.cuda else None
                           for b in self.buckets]

    @property
    def optimizer_grads(self):
        return self.wire_flat

    # -- one communicating micro-batch ---------------------------------------------------
    def prepare(self):
        """Arm the hooks for the last micro-batch of the window."""
        if self.active:
            raise RuntimeError(
                "Engine.backward was called twice on the micro-batch that communicates (the last of the "
                "accumulation window) without engine.step() in between; sum the losses and call "
                "backward once per micro-batch")
        self.active = True
        self.next_launch = 0
        self.ready = set()
        self.pending_work = []
        self.launch_times = {}
        self.done_times = {}
        self.events = {}
        for b in self.buckets:
            b.pending = len(b.params)
        self.bucket_stats.zero_()

    def grad_ready(self, p):
        if not self.active:
            return
        if id(p) in self.ready:
            raise RuntimeError(
                f"parameter {self._name(p)} received two gradients in one backward (is it used by two "
                "wrapped modules, or reentrant checkpointing?); pyengine supports one gradient per backward")
        self.ready.add(id(p))
        if not self.rebuilt:
            self.ready_order.append(p)
        self.bucket_of[id(p)].pending -= 1
        self._launch_ready()

    def _launch_ready(self):
        while self.next_launch < len(self.buckets) and self.buckets[self.next_launch].pending == 0:
            self._launch(self.buckets[self.next_launch])
            self.next_launch += 1

    def _launch(self, b):
        t0 = time.perf_counter()
        self.tracer.instant(f"bucket {b.index} ready", t0, track="comm")
        grads = self.fb.grad_flat[b.start:b.end]
        wire = self.wire_flat[b.start:b.end]
        stats = self.bucket_stats[b.index]
        predivide = self.wire_dtype == torch.float16 or wire is not grads
        if self.cuda:
            # The comm stream waits for the gradients produced so far on the compute stream.
            self.comm_stream.wait_stream(torch.cuda.current_stream(self.fb.device))
            with torch.cuda.stream(self.comm_stream):
                start = torch.cuda.Event(enable_timing=True)
                start.record(self.comm_stream)
                self._cast(grads, wire, predivide)
                work = self.comm.allreduce(wire, average=not predivide)
                work.wait()  # NCCL: the comm stream waits; the host does not
                ops.unscale_check_sumsq(wire, stats[1:2], stats[0:1], inv_scale=self.inv_scale,
                                        workspace=self.workspaces[b.index])
                ev = torch.cuda.Event(enable_timing=True)
                ev.record(self.comm_stream)
            self.events[b.index] = ev
            self.launch_times[b.index] = start
            grads.record_stream(self.comm_stream)
        else:
            self._cast(grads, wire, predivide)
            work = self.comm.allreduce(wire, average=not predivide)

            def after(b=b, wire=wire, stats=stats):
                ops.unscale_check_sumsq(wire, stats[1:2], stats[0:1], inv_scale=self.inv_scale)
                self.done_times[b.index] = time.perf_counter()

            self.pending_work.append((b, work, work.then(after)))
        if not self.cuda:
            self.launch_times[b.index] = t0
        self.stats.collectives += 1
        self.stats.bytes += wire.numel() * wire.element_size()

    def _cast(self, grads, wire, predivide):
        """Into the wire dtype, predividing by the world size (fused into the cast)."""
        alpha = 1.0 / self.world if predivide else 1.0
        if wire is not grads or alpha != 1.0:
            ops.cast_scale(grads, wire, alpha)

    def end_of_backward(self):
        """Autograd's final callback: parameters that got no gradient."""
        if not self.active:
            return
        missing = [p for b in self.buckets for p in b.params if id(p) not in self.ready]
        if missing and not self.cfg.find_unused_parameters:
            self.active = False
            names = ", ".join(self._name(p) for p in missing[:8])
            more = f" and {len(missing) - 8} more" if len(missing) > 8 else ""
            raise RuntimeError(
                f"these parameters received no gradient in this iteration: {names}{more}. If that is "
                "expected (conditional branches, frozen heads), pass EngineConfig(find_unused_parameters=True); "
                "otherwise set requires_grad=False on them")
        for p in missing:  # their gradient stays zero: mark them ready so their buckets launch
            self.ready.add(id(p))
            if not self.rebuilt:
                self.ready_order.append(p)
            self.bucket_of[id(p)].pending -= 1
        self._launch_ready()
        self.backward_end = time.perf_counter()

    def finish(self):
        """Make the optimizer's stream wait for every bucket; returns (sumsq, found_inf) per bucket."""
        if not self.active:
            raise RuntimeError("internal: finish() without a communicating backward")
        self.active = False
        t0 = time.perf_counter()
        if self.next_launch != len(self.buckets):
            raise RuntimeError("internal: not every bucket was launched; was backward interrupted?")
        if self.cuda:
            cur = torch.cuda.current_stream(self.fb.device)
            mark = torch.cuda.Event(enable_timing=True)
            mark.record(cur)  # where the optimizer's stream would start without communication
            for ev in self.events.values():
                cur.wait_event(ev)
            self._gpu_windows.append((mark, [(self.launch_times[i], self.events[i]) for i in sorted(self.events)]))
        else:
            for b, work, fut in self.pending_work:
                work.wait()
                try:
                    fut.wait()
                except Exception as exc:
                    raise RuntimeError(f"pyengine: post-allreduce check of bucket {b.index} failed: {exc}") from exc
        t1 = time.perf_counter()
        if not self.cuda:
            for b in self.buckets:
                end = self.done_times.get(b.index, t1)
                self.stats.comm_s += end - self.launch_times[b.index]
                self.tracer.span(f"allreduce bucket {b.index}", self.launch_times[b.index], end, track="comm",
                                 numel=b.numel)
            self.stats.exposed_s += t1 - t0
            self.tracer.span("wait for comm (exposed)", t0, t1)
        self.stats.windows += 1
        return self.bucket_stats

    def fold_gpu_timing(self):
        """CUDA: turn the recorded events into comm / exposed times (waits for them: a sync)."""
        for mark, spans in self._gpu_windows:
            for start, end in spans:
                end.synchronize()
                self.stats.comm_s += start.elapsed_time(end) / 1e3
            late = max((mark.elapsed_time(end) for _, end in spans), default=0.0)
            self.stats.exposed_s += max(0.0, late) / 1e3
        self._gpu_windows = []

    def _name(self, p):
        return getattr(p, "_pyengine_name", "<unnamed>")

    # -- layout rebuild ------------------------------------------------------------------
    def take_rebuild_order(self):
        """The observed ready order, once, after the first communicating iteration."""
        if self.rebuilt or not self.ready_order:
            return None
        self.rebuilt = True
        order, self.ready_order = self.ready_order, []
        return order

    def rebuild(self):
        self._build()
