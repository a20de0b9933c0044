"""The Reducer: bucketed gradient allreduce that overlaps backward.

Note: on the last micro-batch of an accumulation window each parameter's post-accumulate
hook (grads.py) reports its gradient ready; the BucketTracker says which buckets may launch
(in index order, the same on every rank), and the overlap mechanics (overlap.py) run each
bucket's cast, allreduce and fused unscale / non-finite check / sum of squares while backward
goes on. Each bucket writes its own (sumsq, found_inf) row, so step() sums the rows in a fixed
order (deterministic) and is left with one optimizer pass.
"""
import torch

from .._arrays import F32
from ..flat import DTYPES
from ..plan import dtype_code
from .buckets import BucketTracker
from .overlap import BucketWork, CpuOverlap, CudaOverlap

MiB = 1024 * 1024


class Reducer:
    def __init__(self, flat, comm, cfg, mod, scalars, names, tracer, stats):
        self.flat, self.comm, self.cfg, self.mod, self.names = flat, comm, cfg, mod, names
        self.world = comm.world_size
        self.wire_dtype = DTYPES[cfg.comm_dtype] if cfg.comm_dtype else flat.grad_dtype
        self.cuda = flat.device.type == "cuda"
        self._inv_scale = scalars.ptr("inv_scale")
        self.overlap = CudaOverlap(comm, tracer, stats, flat.device) if self.cuda else CpuOverlap(comm, tracer, stats)
        self.build(record_order=cfg.rebuild_buckets)

    def build(self, record_order: bool):
        """Buckets, wire buffer and resolved per-bucket work for the current layout."""
        flat = self.flat
        buckets = flat.layout.buckets(torch.empty((), dtype=self.wire_dtype).element_size(), self.cfg.bucket_mb * MiB,
                                      self.cfg.first_bucket_mb * MiB)
        # Wire buffer: the gradient buffer itself when the dtypes match, else a flat copy in the
        # wire dtype that the optimizer then reads directly (no cast back).
        self.wire_flat = (flat.grad_flat if self.wire_dtype == flat.grad_dtype
                          else torch.zeros(flat.layout.numel, dtype=self.wire_dtype, device=flat.device))
        self.bucket_stats = torch.zeros(max(1, len(buckets)), 2, device=flat.device)  # (sumsq, found_inf)
        self.buckets = buckets
        self._workspaces = []
        self.works = [self._work(b) for b in buckets]
        self.tracker = BucketTracker([b.members for b in buckets], record_order)

    def _work(self, b) -> BucketWork:
        grads = self.flat.grad_flat[b.start:b.end]
        wire = self.wire_flat[b.start:b.end]
        separate = self.wire_flat is not self.flat.grad_flat
        # Note: averaging is fused into the cast (predivide) whenever there is a cast, and
        # always for an fp16 wire, whose sum over ranks could overflow before a divide.
        predivide = separate or self.wire_dtype == torch.float16
        alpha = 1.0 / self.world if predivide else 1.0
        mod, n = self.mod, b.numel
        gp, gd, wp, wd = grads.data_ptr(), dtype_code(grads), wire.data_ptr(), dtype_code(wire)
        cast = None
        if separate or alpha != 1.0:
            def cast(stream, gp=gp, gd=gd, wp=wp, wd=wd, n=n, alpha=alpha):
                mod.cast_scale(wp, wd, gp, gd, n, alpha, stream)
        row = self.bucket_stats[b.index]
        sumsq, flag = row.data_ptr(), row.data_ptr() + row.element_size()
        ws = 0
        if self.cuda and n > 0:
            from ..ops import sumsq_workspace

            self._workspaces.append(sumsq_workspace(wire))
            ws = self._workspaces[-1].data_ptr()

        def check(stream, wp=wp, wd=wd, n=n, sumsq=sumsq, flag=flag, ws=ws):
            mod.unscale_check_sumsq(wp, wd, 0, F32, n, self._inv_scale, flag, sumsq, ws, stream)

        return BucketWork(b.index, n, cast, wire, not predivide, check)

    @property
    def optimizer_grads(self) -> torch.Tensor:
        return self.wire_flat

    # -- one communicating micro-batch ---------------------------------------------------
    def prepare(self):
        """Arms the hooks for the last micro-batch of the window."""
        self.tracker.arm()
        self.bucket_stats.zero_()  # once per window (the per-bucket kernels accumulate into it)

    def grad_ready(self, i: int):
        if not self.tracker.armed:
            return
        try:
            launch = self.tracker.mark_ready(i)
        except ValueError:
            raise RuntimeError(
                f"parameter {self.names[i]} received two gradients in one backward (is it used by two wrapped "
                "modules, or reentrant checkpointing?); pyengine supports one gradient per backward") from None
        for k in launch:
            self.overlap.launch(self.works[k])

    def end_of_backward(self):
        """After autograd: parameters that got no gradient."""
        if not self.tracker.armed:
            return
        missing = self.tracker.missing()
        if missing and not self.cfg.find_unused_parameters:
            self.abort()
            names = ", ".join(self.names[i] for i in missing[:8])
            more = f" and {len(missing) - 8} more" if len(missing) > 8 else ""
            raise RuntimeError(
                f"these parameters received no gradient in this iteration: {names}{more}. If that is expected "
                "(conditional branches, frozen heads), pass EngineConfig(find_unused_parameters=True); otherwise "
                "set requires_grad=False on them")
        for k in self.tracker.mark_missing_ready():
            self.overlap.launch(self.works[k])

    def finish(self) -> torch.Tensor:
        """Makes the optimizer's stream wait for every bucket; returns the (sumsq, found_inf) rows."""
        if not self.tracker.armed:
            raise RuntimeError("internal: finish() without a communicating backward")
        if not self.tracker.all_launched:
            self.abort()
            raise RuntimeError("internal: not every bucket was launched; was backward interrupted?")
        self.tracker.disarm()
        self.overlap.finish()
        return self.bucket_stats

    def abort(self):
        """A failed backward: forget this window's communication."""
        self.tracker.disarm()
        self.overlap.abandon()

    def take_rebuild_order(self):
        return self.tracker.take_ready_order()
