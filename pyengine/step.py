"""The training step as one pipeline: backward, each gradient's landing, the boundary step.

    backward(loss)   loss x scale / accum -> autograd; each gradient lands (grad_landed):
                     fp32 main grads += half grad; under data parallel its bucket may launch
    step()           every micro-batch; at the boundary, as data flows:
                     finish communication -> non-finite check and norm -> clip -> loss scale
                     -> optimizer passes (the parameters that got no gradient left out) -> result

Every stage of the boundary step is a native call on pointers the step plan resolved once
(plan.py); nothing here waits for the device. Under data parallel the check and the norm ran
per bucket, right after each bucket's allreduce (ddp/reducer.py), and the second stage folds
their rows. The pipeline is the one writer of the Window (window.py).

Note: the loss-scale update needs only the step's flag, and the optimizer reads only the
multiplier computed just before it (grad_coef, with the scale these gradients were made
with), so the update runs in the same native call as the norm and the clip, ahead of the
optimizer passes: one call where there were four.
"""
import time
import weakref
from operator import attrgetter

import torch

from .errors import UsageError


class StepResult:
    """What engine.step() returns: truthy when the parameters were updated.

    Note: whether a boundary step was skipped for non-finite gradients is known only on the
    device; bool() reads it (one sync), so a loop that ignores the result never waits. The
    result watches the step's live flag and copies it only if it is still held when the
    next boundary step begins (engine.step() calls freeze()), so the common loop, which drops
    it at once, costs no copy.
    """

    def __init__(self, boundary, flag=None):
        self.boundary = boundary
        self._flag = flag
        self._frozen = flag is None

    def freeze(self):
        """Keep this step's flag: the engine is about to overwrite the live one."""
        if not self._frozen:
            self._flag, self._frozen = self._flag.clone(), True

    def __bool__(self):
        return self.boundary and float(self._flag) == 0.0

    @property
    def skipped(self):
        return self.boundary and float(self._flag) != 0.0

    @property
    def flag(self):
        """The non-finite flag as a device tensor (1 when skipped), for logging without a sync."""
        self.freeze()
        return self._flag

    def __repr__(self):
        return f"StepResult(boundary={self.boundary}, updated={bool(self)})"


_PLACEMENT_CHECK_EVERY = 16  # boundary steps between checks that the parameters are still views
_requires_grad = attrgetter("requires_grad")


class StepPipeline:
    def __init__(self, parts):
        self.parts = parts
        self.window = parts.window
        self._last_result = None  # weakref to the last boundary StepResult (see StepResult)
        self._mark_used = self.window.used.__setitem__
        self._find_unused = parts.reducer is not None and parts.config.find_unused_parameters
        self._global_micro = parts.config.grad_accum_steps * parts.world_size  # G
        parts.guard.install_hooks(self.grad_landed)

    # -- backward ------------------------------------------------------------------------------
    def backward(self, loss):
        """loss x loss_scale / grad_accum_steps -> autograd. Once per micro-batch."""
        p, w = self.parts, self.window
        if not isinstance(loss, torch.Tensor):
            raise TypeError(f"Engine.backward: loss must be a tensor, got {type(loss).__name__}")
        if loss.numel() != 1:
            raise ValueError(f"Engine.backward: loss must be a scalar (one element), got shape {tuple(loss.shape)}; "
                             "reduce it first, e.g. loss.mean()")
        if not loss.requires_grad:
            raise ValueError("Engine.backward: loss does not require grad; was it computed under torch.no_grad(), "
                             "or from a detached tensor?")
        if w.backward_pending:
            raise RuntimeError("Engine.backward was called twice without engine.step() in between; sum the losses "
                               "of one micro-batch and call backward once, then engine.step() (every micro-batch)")
        if p.outsiders:
            self._check_outsiders()
        t0 = time.perf_counter()
        last = w.next_is_boundary
        reducer = p.reducer
        if p.flat.sharded:
            reducer.wait_params()  # overlap_param_gather: what no module's forward waited for
        p.guard.before_backward()
        if reducer is not None and last:
            reducer.prepare()
        if p.config.deterministic:
            # one factor for the whole global batch, the same at every world size (deterministic.py)
            scaled = loss.float() * (p.scaler.scale_tensor.to(loss.device) * (1.0 / self._global_micro))
        else:
            scaled = loss.float() * p.scaler.scale_tensor.to(loss.device)
            if p.config.grad_accum_steps > 1:
                scaled = scaled / p.config.grad_accum_steps
        w.begin_backward()
        try:
            scaled.backward()
        except BaseException:
            if reducer is not None:
                reducer.abort()  # first: nothing it launched may still write the buffers
            w.abort_backward()
            p.guard.after_backward()
            p.guard.discard()  # the window starts again, without what it had accumulated
            raise
        p.guard.after_backward()
        communicating = reducer is not None and last
        if communicating:
            reducer.end_of_backward(frozen=self._frozen)
        w.end_backward(communicating)
        p.tracer.span("backward", t0, time.perf_counter(), micro=w.micro)

    def grad_landed(self, i, param):
        """Post-accumulate hook: parameter i's gradient is complete for this backward."""
        self._mark_used(i, 1)
        p = self.parts
        g = p.guard.landed(i, param)
        if g is not None:
            p.plan.accumulate(i, g)
        if p.reducer is not None:
            p.reducer.grad_ready(i)

    # -- step ----------------------------------------------------------------------------------
    def step(self) -> StepResult:
        """Call once per micro-batch; updates at the accumulation boundary."""
        w = self.window
        if not w.backward_pending:
            raise RuntimeError("Engine.step: no backward since the last step; call engine.backward(loss) "
                               "once per micro-batch before engine.step()")
        if not w.next_is_boundary:
            if self.parts.tree is not None:
                self.parts.tree.fold_micro(w.micro)  # deterministic: into this rank's fixed tree
            w.end_micro_step()
            return StepResult(False)
        return self.boundary()

    def boundary(self) -> StepResult:
        p, w = self.parts, self.window
        tracing = p.tracer.enabled
        t0 = time.perf_counter() if tracing else 0.0
        self.before_boundary()
        skipped = self._skipped() if self._may_skip() else ()
        w.end_micro_step()
        plan, reducer = p.plan, p.reducer
        stream = plan.stream()
        # 1. communication done: every bucket allreduced and checked, its (sumsq, found_inf) row written
        if reducer is not None:
            reducer.finish()
        elif p.tree is not None:
            p.tree.fold_last(0, p.flat.layout.numel)  # deterministic: the tree's root
        # 2-4. found_inf and sumsq (read-only pass, or the rows in a fixed order: deterministic),
        #      grad_norm and grad_coef = 1/loss_scale x min(1, max_norm / grad_norm), loss scale
        plan.step_scalars(stream)
        t_opt = time.perf_counter() if tracing else 0.0
        # 5. one fused pass per run of one cohort: grad x grad_coef, skipped on the device when
        #    found_inf is set, fp32 master + state updated, half model copy written, grad cleared;
        #    the parameters that received no gradient are left as torch.optim leaves them
        plan.update(stream, skipped)
        p.optimizer.notify_step()  # LR schedulers count optimizer.step() calls
        if tracing:
            p.tracer.span("optimizer", t_opt, time.perf_counter(), step=w.boundaries + 1)
        # 6. gradients cleared where the optimizer pass read another buffer
        plan.zero_grads(stream)
        result = self.new_result()
        order = reducer.take_rebuild_order() if reducer is not None else None
        if p.flat.sharded:
            # each rank's updated slices to every rank; a relayout needs them all at once
            reducer.gather_params(wait=order is not None)
        w.end_boundary()
        if order is not None:
            self._relayout(order)
        if tracing:
            p.tracer.span("step", t0, time.perf_counter(), step=w.boundaries)
        return result

    def before_boundary(self):
        """The host's part of a boundary step before its device work, also run before each
        replay of a captured step (graph.py): the skip-run and outsider checks, the fp32
        master weights refreshed from parameters written in place (model.load_state_dict),
        and the last result's flag frozen before this step overwrites the live one."""
        p, w = self.parts, self.window
        self.check_skip_run()
        if p.outsiders:
            self._check_outsiders()
        if p.guard.before_step(check_placement=w.boundaries % _PLACEMENT_CHECK_EVERY == 0):
            p.flat.refresh_master()  # the parameters were written in place
        last = self._last_result() if self._last_result is not None else None
        if last is not None:
            last.freeze()

    def new_result(self) -> StepResult:
        """This boundary step's result, watching the live flag until the next one freezes it."""
        result = StepResult(True, self.parts.scalars.found_inf)
        self._last_result = weakref.ref(result)
        return result

    def _frozen(self) -> list:
        """Parameters the engine trains that are frozen now (requires_grad_(False))."""
        params = self.parts.params
        if all(map(_requires_grad, params)):
            return []
        return [i for i, q in enumerate(params) if not q.requires_grad]

    def _may_skip(self) -> bool:
        """Some parameter may have received no gradient (one host scan, no Python loop)."""
        return self._find_unused or self.window.used.count(0) != 0

    def _skipped(self) -> tuple:
        """The parameters torch.optim would skip in this step: those whose .grad would be
        None, i.e. that received no gradient in the window (on any rank, under data parallel):
        unused ones and ones frozen with requires_grad_(False). Their gradient buffers hold
        nothing to clear (nothing landed since the last clear).

        Note: torch.optim skips by `p.grad is None`, not by requires_grad: a layer frozen
        after its backward still steps there, and here (it received a gradient)."""
        p, used = self.parts, self.window.used
        if p.reducer is not None and p.config.find_unused_parameters:
            used = p.reducer.global_used(used)
        if used.count(0) == 0:
            return ()
        return tuple(i for i, u in enumerate(used) if not u)

    def _check_outsiders(self):
        """A parameter frozen when the Engine was built (and not in its param_groups) that was
        unfrozen since: the engine keeps no buffers for it and cannot train it."""
        p = self.parts
        if any(map(_requires_grad, p.outsiders)):
            name = next(p.outsider_names[id(q)] for q in p.outsiders if q.requires_grad)
            raise UsageError(
                f"pyengine: parameter {name} was frozen (requires_grad=False) when the Engine was built, so the "
                "engine keeps no buffers for it and cannot train it now that it requires grad. Unfreeze it before "
                "building the Engine, or list it in Engine(..., param_groups=...) (the engine then leaves it untouched "
                "while it is frozen and trains it once unfrozen), or set requires_grad=False on it again")

    def check_skip_run(self):
        p = self.parts
        limit = p.config.max_consecutive_skips
        if limit and p.scaler.lagged_consecutive_skips() >= limit:
            bad = []
            for i, name in enumerate(p.names):
                if not bool(torch.isfinite(p.flat.grad_view(i)).all()):
                    bad.append(name)
                if len(bad) == 5:
                    break
            where = (f"the first parameters with non-finite gradients now: {', '.join(bad)}" if bad else
                     "this step's gradients are finite, but the previous ones were not")
            raise FloatingPointError(
                f"pyengine: {limit} consecutive steps were skipped for inf/NaN gradients ({where}; loss scale "
                f"{p.scaler.value('scale'):g}). Training is not progressing: check the data, lower the lr, or use "
                "bf16. Raise EngineConfig.max_consecutive_skips (0 disables) to keep going")

    # -- layout rebuild (data parallel), loads ----------------------------------------------------
    def _relayout(self, ready_order):
        """Lay the buffers out in the observed gradient-ready order (rank 0's, broadcast)."""
        from .build import make_norm, make_plan

        p = self.parts
        order = p.comm.broadcast_ints(ready_order, 0)
        p.flat.relayout(p.flat.layout.reordered(order), gather_state=self._gather_state)
        if p.tree is not None:
            p.tree.allocate(p.flat.grad_flat)
        p.norm = p.reducer.norm = make_norm(p)
        p.reducer.build(record_order=False)
        p.guard.rebind()
        p.plan = make_plan(p)

    def _gather_state(self, shard, layout, pieces):
        """Every element of a sharded state buffer, as canonical runs, one old bucket at a time
        (all-gathered from the ranks' slices: one bucket of temporary memory, not the model's)."""
        p = self.parts
        owned = layout.owned(p.rank)
        canon = p.flat.canon
        for b in layout.buckets:
            o = owned[b.index]
            whole = torch.empty(b.numel, dtype=shard.dtype, device=shard.device)
            p.comm.all_gather(whole, shard[o.local:o.local + o.numel]).wait()
            for i, off, at, n in layout.segments(b.start, b.end):
                yield canon[i] + off, whole[at - b.start:at - b.start + n]

    def after_load(self, boundaries):
        """A checkpoint was loaded: the window starts afresh."""
        p = self.parts
        p.scalars.boundaries.fill_(boundaries)
        p.flat.grad_flat.zero_()
        if p.reducer is not None and p.reducer.wire_flat is not p.flat.grad_flat:
            p.reducer.wire_flat.zero_()
        p.guard.rebind()
        self.window.boundaries = boundaries
        self.window.reset()
