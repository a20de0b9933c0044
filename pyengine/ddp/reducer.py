"""The Reducer: bucketed gradient communication that overlaps backward, and, with sharded
optimizer state (ZeRO-1), the all-gather of the updated parameters.

Note: on the last micro-batch of an accumulation window each parameter's post-accumulate
hook (grads.py) reports its gradient ready; the BucketTracker says which buckets may launch
(in index order, the same on every rank), and the overlap mechanics (overlap.py) run each
bucket's cast, collective and fused unscale / non-finite check / sum of squares while
backward goes on. Each bucket writes its own (sumsq, found_inf) row, so the step folds the
rows in a fixed order (deterministic) and is left with one optimizer pass.

Under ZeRO-1 (layout.shard_world > 1) the collective is a reduce-scatter, in place: each
rank keeps the averaged gradients of its own slice of the bucket (layout.py, Note [buckets
and shards]), checks and sums only that slice, and clears the rest of the bucket's gradients
there and then (the optimizer clears its own slice as it reads it). After the update each
bucket's parameters are all-gathered from the slices, in the order the next forward needs
them; by default the step waits for them at its end, and with overlap_param_gather each
module's forward waits only for its own buckets (forward pre-hooks).
"""
import torch

from .._arrays import F32
from ..flat import DTYPES
from ..plan import dtype_code
from .buckets import BucketTracker
from .overlap import BucketWork, CpuOverlap, CudaOverlap


class Reducer:
    def __init__(self, flat, comm, cfg, mod, scalars, names, tracer, stats, modules=(), tree=None, norm=None):
        self.flat, self.comm, self.cfg, self.mod, self.names = flat, comm, cfg, mod, names
        # deterministic (deterministic.py): the micro-batch tree's last fold before each bucket's
        # exchange, the chunked norm after it; set again after a relayout
        self.tree, self.norm = tree, norm
        self._modules = list(modules)  # the model's, for overlap_param_gather's hooks
        self.wire_dtype = DTYPES[cfg.comm_dtype] if cfg.comm_dtype else flat.grad_dtype
        self.cuda = flat.device.type == "cuda"
        self._inv_scale = scalars.ptr("inv_scale")
        self.overlap = CudaOverlap(comm, tracer, stats, flat.device) if self.cuda else CpuOverlap(comm, tracer, stats)
        self._hooks = []
        self._check = None  # the GatherCheck watching the first overlapped forward, while it runs
        self._check_next_forward = False
        self._gathers_overlap = cfg.overlap_param_gather  # False once a forward used a parameter early
        self._gathers_checked = False
        self.build(record_order=cfg.rebuild_buckets)

    @property
    def rank(self) -> int:
        return self.comm.rank  # the one place rank and world size live: the communicator

    @property
    def world(self) -> int:
        return self.comm.world_size

    @property
    def sharded(self) -> bool:
        return self.flat.sharded

    def build(self, record_order: bool):
        """Wire buffer and resolved per-bucket work for the current layout."""
        flat = self.flat
        buckets = flat.layout.buckets
        # Wire buffer: the gradient buffer itself when the dtypes match, else a flat copy in the
        # wire dtype that the optimizer then reads directly (no cast back).
        self.wire_flat = (flat.grad_flat if self.wire_dtype == flat.grad_dtype
                          else torch.zeros(flat.layout.numel, dtype=self.wire_dtype, device=flat.device))
        self.bucket_stats = torch.zeros(max(1, len(buckets)), 2, device=flat.device)  # (sumsq, found_inf)
        self.buckets = buckets
        self._workspaces = []
        owned = flat.layout.owned(self.rank) if self.sharded else None
        self.works = [self._work(b, owned[b.index] if owned else None) for b in buckets]
        self.tracker = BucketTracker([b.members for b in buckets], record_order)
        self._bucket_of = {i: b.index for b in buckets for i in b.members}
        if self.cfg.overlap_param_gather and self.sharded and not self._hooks:
            self._install_gather_hooks()

    def _work(self, b, owned) -> BucketWork:
        if self.norm is not None:
            return self._deterministic_work(b, owned)
        grads = self.flat.grad_flat[b.start:b.end]
        wire = self.wire_flat[b.start:b.end]
        separate = self.wire_flat is not self.flat.grad_flat
        # Note: averaging is fused into the cast (predivide) whenever there is a cast, and
        # always for an fp16 wire, whose sum over ranks could overflow before a divide.
        predivide = separate or self.wire_dtype == torch.float16
        alpha = 1.0 / self.world if predivide else 1.0
        mod, comm = self.mod, self.comm
        gp, gd, wp, wd = grads.data_ptr(), dtype_code(grads), wire.data_ptr(), dtype_code(wire)
        cast = None
        if separate or alpha != 1.0:
            def cast(stream, gp=gp, gd=gd, wp=wp, wd=wd, n=b.numel, alpha=alpha):
                mod.cast_scale(wp, wd, gp, gd, n, alpha, stream)
        # what this rank keeps: the whole bucket, or its own slice of it (ZeRO-1)
        keep = wire if owned is None else self.wire_flat[owned.start:owned.end]
        if owned is None:
            def collective(wire=wire, average=not predivide):
                return comm.allreduce(wire, average=average)
        else:
            def collective(wire=wire, keep=keep, average=not predivide):
                return comm.reduce_scatter(keep, wire, average=average)
        row = self.bucket_stats[b.index]
        sumsq, flag = row.data_ptr(), row.data_ptr() + row.element_size()
        ws = 0
        if self.cuda and keep.numel() > 0:
            from ..ops import sumsq_workspace

            self._workspaces.append(sumsq_workspace(keep))
            ws = self._workspaces[-1].data_ptr()
        kp, kn = keep.data_ptr(), keep.numel()
        # ZeRO-1 with the gradient buffer on the wire: the slices other ranks own are done with
        clear = [] if owned is None or separate else [
            (gp, owned.start - b.start), (gp + (owned.end - b.start) * grads.element_size(), b.end - owned.end)]

        def after(stream, kp=kp, kn=kn, sumsq=sumsq, flag=flag, ws=ws, clear=clear, gd=gd):
            mod.unscale_check_sumsq(kp, wd, 0, F32, kn, self._inv_scale, flag, sumsq, ws, stream)
            for ptr, n in clear:
                if n:
                    mod.fill(ptr, gd, n, 0.0, stream)

        return BucketWork(b.index, b.numel, cast, collective, after, wire,
                          "allreduce" if owned is None else "reduce-scatter")

    def _deterministic_work(self, b, owned) -> BucketWork:
        """The bucket's subtree root (the last micro-batch folded in), the fixed-pairing sum
        over the ranks (ddp/exchange.py), then the chunk sums of what this rank keeps; under
        ZeRO-1 the other slices' gradients cleared. No averaging: the loss carries 1/G."""
        wire = self.wire_flat[b.start:b.end]
        if wire.data_ptr() != self.flat.grad_flat[b.start:b.end].data_ptr():
            raise RuntimeError("internal: the deterministic wire is the gradient buffer")
        tree, norm, comm, mod = self.tree, self.norm, self.comm, self.mod
        cast = None
        if tree is not None:
            def cast(stream, start=b.start, end=b.end):
                tree.fold_last(start, end)
        lo, hi = (b.start, b.end) if owned is None else (owned.start, owned.end)
        if owned is None:
            def collective(wire=wire):
                return comm.allreduce(wire, average=False)
        else:
            keep = self.wire_flat[lo:hi]

            def collective(wire=wire, keep=keep):
                return comm.reduce_scatter(keep, wire, average=False)
        g = self.flat.grad_flat
        clear = [] if owned is None else [(b.start, lo), (hi, b.end)]

        def after(stream, lo=lo, hi=hi, clear=clear):
            norm.add_range(lo, hi, stream)
            for start, end in clear:
                if end > start:
                    g[start:end].zero_()

        return BucketWork(b.index, b.numel, cast, collective, after, wire,
                          "fixed-pairing allreduce" if owned is None else "fixed-pairing reduce-scatter")

    @property
    def optimizer_grads(self) -> torch.Tensor:
        return self.wire_flat

    # -- one communicating micro-batch ---------------------------------------------------
    def prepare(self):
        """Arms the hooks for the last micro-batch of the window."""
        self.wait_params()
        self.tracker.arm()
        self.bucket_stats.zero_()

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

    def end_of_backward(self, frozen=list):
        """After autograd: parameters that got no gradient (those `frozen()` lists, frozen with
        requires_grad_(False) since the Engine was built, are expected to get none)."""
        if not self.tracker.armed:
            return
        missing = self.tracker.missing()
        if missing:
            frozen = set(frozen())
            missing = [i for i in missing if i not in frozen]
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

    def global_used(self, used: bytearray) -> bytearray:
        """find_unused_parameters: which parameters received a gradient on any rank in this
        window (a parameter none used is skipped, as DDP leaves its .grad None). One tiny
        allreduce and a host read, as DDP's unused-parameter bitmap."""
        t = torch.frombuffer(bytes(used), dtype=torch.uint8).to(self.flat.device, torch.float32)
        self.comm.allreduce(t, average=False).wait()
        return bytearray((t.cpu() > 0).to(torch.uint8).numpy().tobytes())

    def take_rebuild_order(self):
        return self.tracker.take_ready_order()

    # -- ZeRO-1: the updated parameters back to every rank ------------------------------------
    def combine_scalars(self, flag_and_sumsq: torch.Tensor):
        """The step's (found_inf, sumsq) summed over the ranks: one tiny allreduce (device-side
        on NCCL; a nonzero or NaN flag anywhere stays nonzero)."""
        self.comm.allreduce(flag_and_sumsq, average=False).wait()

    def gather_params(self, wait=False):
        """All-gathers each bucket's parameters from the ranks' slices, last bucket first (the
        next forward's order: buckets follow backward); waits for them here (always when a
        relayout follows: `wait`) unless each module's forward waits for its own
        (overlap_param_gather, gather_check.py)."""
        owned = self.flat.layout.owned(self.rank)
        p = self.flat.param_flat
        for b in reversed(self.buckets):
            o = owned[b.index]
            self.overlap.gather(b.index, lambda b=b, o=o: self.comm.all_gather(p[b.start:b.end], p[o.start:o.end]),
                                b.numel)
        if wait or not self._gathers_overlap:
            self.wait_params()
        else:
            self._check_next_forward = not self._gathers_checked

    def wait_params(self):
        """Every parameter gathered: before backward, a checkpoint, a relayout."""
        self._wait_all()

    def _wait_all(self):
        for k in reversed(self.overlap.pending_gathers()):
            self.overlap.wait_gather(k)

    def _pending_name(self, param):
        i = self._param_index.get(id(param))
        if i is None or self._bucket_of[i] not in self.overlap.pending_gathers():
            return None
        return self.names[i]

    def _install_gather_hooks(self):
        """Each module that holds trainable parameters waits, before its forward, for the
        buckets of those parameters."""
        index = self._param_index = {id(p): i for i, p in enumerate(self.flat.params)}
        if self._modules:  # the model's own forward, watched once (gather_check.py)
            root = self._modules[0]
            self._hooks.append(root.register_forward_pre_hook(lambda mod, args: self._begin_check(), prepend=True))
            self._hooks.append(root.register_forward_hook(lambda mod, args, out: self._end_check(), always_call=True))
        for module in self._modules:
            ids = [index[id(p)] for p in module._parameters.values() if p is not None and id(p) in index]
            if ids:
                self._hooks.append(module.register_forward_pre_hook(
                    lambda mod, args, ids=tuple(ids): self._wait_for(ids)))

    def _begin_check(self):
        if self._check_next_forward and self._check is None:
            from .gather_check import GatherCheck

            self._check = GatherCheck(self._pending_name, self._wait_all)
            self._check.__enter__()

    def _end_check(self):
        if self._check is None:
            return
        check, self._check = self._check, None
        check.__exit__(None, None, None)
        if check.uses == 0:
            return  # a forward that used no parameter: watch the next one
        self._gathers_checked, self._check_next_forward = True, False
        if check.violation is not None:
            import warnings

            self._gathers_overlap = False
            warnings.warn(f"EngineConfig.overlap_param_gather: the forward used parameter {check.violation[0]} "
                          f"(in {check.violation[1]}) outside its module's forward, before its all-gather had "
                          "arrived; each step now waits for every all-gather at its end instead", stacklevel=2)

    def _wait_for(self, ids):
        for i in ids:
            self.overlap.wait_gather(self._bucket_of[i])

    def remove_hooks(self):
        for h in self._hooks:
            h.remove()
        self._hooks = []
