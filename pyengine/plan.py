"""The step plan: every native call of the hot path with its pointers resolved once per layout.

Note: the public `ops` check every argument on every call (about 30 us each), which is right
for a library call and wrong for a training step that makes the same calls with the same
buffers thousands of times. The plan checks once, when the layout is built (the buffers are
the engine's own, so their devices, dtypes, sizes and alignment are right by construction),
and keeps the core's argument structs; a step is then a handful of native calls. Only the
hyper-parameters are read again each step, since an LR scheduler may change them; a changed
value is validated before it is used.
"""
import math
from operator import itemgetter

import torch

from .optim import check_group

from ._native import _C

_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
HYPER_SLOTS = int(_C.HYPER_SLOTS)
STEP_LOCAL, STEP_GLOBAL = int(_C.STEP_LOCAL), int(_C.STEP_GLOBAL)


def dtype_code(t: torch.Tensor) -> int:
    return _CODE[t.dtype]


def current_stream(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0


class _Pass:
    """One fused optimizer pass: one contiguous range of one cohort of one param group."""

    def __init__(self, group, cohort, fn, args):
        self.group, self.cohort, self.fn, self.args = group, cohort, fn, args


class _Group:
    """A param group's hyper-parameters as last validated and sent to the device."""

    def __init__(self, index, spec, hyper_ptr):
        self.index, self.spec, self.hyper_ptr = index, spec, hyper_ptr
        self.read = itemgetter(*spec.watched)  # the group's values as one tuple, in C
        self.values = None


class StepPlan:
    """Resolved native calls over one FlatBuffers layout.

    opt_grads: the flat gradient the optimizer reads (the gradient buffer, or a wire buffer
    in another dtype under data parallel); zero_in_pass: the optimizer clears it as it reads.
    """

    def __init__(self, mod, flat, scalars, scaler, optimizer, counts, opt_grads, zero_in_pass, max_norm, main_grads,
                 bucket_rows=None, combine=None, norm=None, whole_norm=False, abort_word=0):
        self.mod = mod
        self.device = flat.device
        self.cuda = flat.device.type == "cuda"
        g = flat.grad_flat
        a = mod.StepScalarArgs()
        self.workspace = None
        if bucket_rows is not None:  # data parallel: each bucket's (sumsq, found_inf) row
            a.bucket_rows, a.buckets = bucket_rows.data_ptr(), bucket_rows.shape[0]
        else:
            a.grad, a.grad_dtype, a.n = g.data_ptr(), dtype_code(g), g.numel()
            if self.cuda and g.numel() > 0:
                from .ops import sumsq_workspace

                self.workspace = sumsq_workspace(g)
                a.workspace = self.workspace.data_ptr()
        a.scalars, a.loss_scale_state = scalars.tensor.data_ptr(), scalars.loss_scale_state.data_ptr()
        a.boundaries = scalars.boundaries.data_ptr()
        a.inv_scale = scalars.ptr("inv_scale")
        a.max_norm = math.inf if max_norm is None else float(max_norm)
        a.loss_scale = scaler.config
        if scaler.host_mirror is not None:
            a.host_mirror = scaler.host_mirror.data_ptr()
        a.abort_word = abort_word  # data parallel: a step after the communicator's abort is skipped
        # Sharded state: this rank's (found_inf, sumsq) are combined over the ranks between
        # the local fold and the rest (clip, loss scale), by `combine`.
        self._combine, self._flag_and_sumsq = combine, scalars.flag_and_sumsq
        self._scalar_args = a
        if combine is not None:
            self._local, self._global = _with_phase(mod, a, STEP_LOCAL), _with_phase(mod, a, STEP_GLOBAL)
        # deterministic: the chunked norm (deterministic.py) writes found_inf and sumsq; over
        # the whole buffer here without data parallel, else per bucket after its exchange
        self._norm, self._whole_norm = norm, whole_norm
        if norm is not None:
            self._global = _with_phase(mod, a, STEP_GLOBAL)
        self.zero_in_pass = zero_in_pass
        self._clear_grads = (g.data_ptr(), dtype_code(g), g.numel(), 0.0)
        self._flat, self._opt_grads, self._optimizer, self._counts = flat, opt_grads, optimizer, counts
        self._fn = getattr(mod, optimizer.spec.native)
        self._grad_coef, self._found_inf = scalars.ptr("grad_coef"), scalars.ptr("found_inf")
        # each group's float hyper-parameters in device memory (see core.h, kHyperSlots)
        self.hyper = torch.zeros(len(optimizer.param_groups), HYPER_SLOTS, dtype=torch.float64, device=flat.device)
        self.groups = [_Group(gi, optimizer.spec, _at(self.hyper, gi * HYPER_SLOTS))
                       for gi in range(len(optimizer.param_groups))]
        # (group, offset in the whole buffers, offset in the state buffers, length) of each range
        # the optimizer covers: one per group, or, with sharded state, one per owned bucket slice
        if flat.sharded:
            ranges = [(o.group, o.start, o.local, o.numel) for o in flat.layout.owned(flat.rank)]
        else:
            ranges = [(gi, sp.start, sp.start, sp.numel) for gi, sp in enumerate(flat.layout.groups)]
        self._ranges = [r for r in ranges if r[3] > 0]
        self._cache = {}
        self._settled = set()  # keys whose skipped parameters already have cohorts of their own
        self._default, self._default_version, self._default_states = None, None, None
        # fp32 main grads: where each parameter's half gradient is added (grads.py's hook)
        self._main = [(_at(g, s.offset), s.numel) for s in flat.layout.slots] if main_grads else None

    @property
    def passes(self) -> list:
        """The passes of a step that updates every parameter."""
        return self.passes_for(())

    # -- the passes ----------------------------------------------------------------------------
    def passes_for(self, skipped: tuple) -> list:
        """The fused passes of a step that leaves the parameters `skipped` (canonical indices,
        sorted) untouched: contiguous runs of one cohort each (counts.py, Note [cohorts]).
        Cached by what they depend on."""
        if (not skipped and self._counts.version == self._default_version
                and len(self._flat.state) == self._default_states):
            return self._default  # the common step: every parameter updated, nothing changed
        key = (skipped, self._counts.version, len(self._flat.state))
        passes = self._cache.get(key)
        if passes is None:
            if len(self._cache) > 16:
                self._cache.clear()
            passes = self._cache[key] = self._build_passes(set(skipped))
        if not skipped:
            self._default, self._default_version, self._default_states = passes, key[1], key[2]
        return passes

    def _build_passes(self, skipped) -> list:
        flat, counts, layout = self._flat, self._counts, self._flat.layout
        cohort = counts.cohort
        runs = []  # (group, cohort, start in whole buffers, start in state buffers, length)
        for gi, at, local, n in self._ranges:
            pieces = layout.segments(at, at + n)
            if not skipped and len({cohort[i] for i, _, _, _ in pieces}) <= 1:
                runs.append((gi, cohort[pieces[0][0]] if pieces else gi, at, local, n))  # the whole range
                continue
            cur = None
            for i, _, f0, m in pieces:
                if i in skipped:
                    cur = None
                    continue
                if cur is not None and cur[1] == cohort[i]:
                    cur[4] = f0 + m - cur[2]
                else:
                    cur = [gi, cohort[i], f0, local + (f0 - at), m]
                    runs.append(cur)
        last = {r[1]: k for k, r in enumerate(runs)}  # a cohort's count advances once, at its last run
        states = [flat.state[name] for name in self._optimizer.spec.torch_states if name in flat.state]
        opt_grads = self._opt_grads
        passes = []
        for k, (gi, c, at, local, n) in enumerate(runs):
            a = self.mod.OptimizerArgs()
            a.master = _at(flat.master_flat, local if flat.master_separate else at)
            a.state1 = _at(states[0], local) if len(states) > 0 else 0
            a.state2 = _at(states[1], local) if len(states) > 1 else 0
            a.grad, a.grad_dtype, a.zero_grad = _at(opt_grads, at), dtype_code(opt_grads), self.zero_in_pass
            if flat.master_separate:
                a.model, a.model_dtype = _at(flat.param_flat, at), dtype_code(flat.param_flat)
            a.n = n
            a.grad_scale, a.found_inf = self._grad_coef, self._found_inf
            a.step = counts.counter_ptr(c)
            a.hyper = self.groups[gi].hyper_ptr
            a.advance_step = last[c] == k
            passes.append(_Pass(self.groups[gi], c, self._fn, a))
        return passes

    # -- the hot path ------------------------------------------------------------------------
    def stream(self) -> int:
        return torch.cuda.current_stream(self.device).cuda_stream if self.cuda else 0

    def step_scalars(self, stream):
        """found_inf and sumsq (one read-only pass, or the buckets' rows), grad_norm and
        grad_coef, then the loss-scale update: one native call (two around the ranks'
        combination of found_inf and sumsq with sharded state)."""
        if self._norm is not None:
            if self._whole_norm:
                self._norm.add_range(0, self._flat.layout.numel, stream)
            self._norm.finish()
            self.mod.step_scalars(self._global, stream)
        elif self._combine is None:
            self.mod.step_scalars(self._scalar_args, stream)
        else:
            self.mod.step_scalars(self._local, stream)
            self._combine(self._flag_and_sumsq)
            self.mod.step_scalars(self._global, stream)

    def sync_hyper(self, stream):
        """Each group's hyper-parameters as the optimizer's param_groups hold them now, to the
        device (only what changed, validated first). A captured step reads them from there."""
        param_groups = self._optimizer.param_groups
        for g in self.groups:
            group = param_groups[g.index]
            values = g.read(group)
            if values != g.values:  # first step, or a scheduler / the user changed a value
                checked = check_group(g.spec, group, f"engine.optimizer.param_groups[{g.index}]")
                if g.spec.momentum_key is not None and checked[g.spec.momentum_key] > 0:
                    self._momentum_born(g.index)
                g.values = values
                self.mod.set_hyper(g.hyper_ptr, g.spec.hyper(checked), stream)

    def _momentum_born(self, group):
        """SGD momentum turned on for a group (at the first step, or later as
        OneCycleLR(cycle_momentum=True) does): its buffers exist from now on, and their first
        step takes the gradient itself, as torch.optim.SGD's do."""
        self._flat.add_state("momentum_buffer")  # the passes key on the state buffers: rebuilt
        self._counts.restart(group)

    def update(self, stream, skipped: tuple = ()):
        """One fused optimizer pass per contiguous run of one cohort of the parameters not
        `skipped` (per owned bucket slice when the state is sharded). The skipped ones
        received no gradient: their gradient buffers hold nothing to clear."""
        self.sync_hyper(stream)
        passes = self.passes_for(skipped)
        if skipped:
            key = (skipped, self._counts.version, len(self._flat.state))
            if key not in self._settled:
                self._counts.split(skipped, {p.cohort for p in passes})  # before the passes advance the counts
                passes = self.passes_for(skipped)
                self._settled.add((skipped, self._counts.version, len(self._flat.state)))
        for p in passes:
            p.fn(p.args, stream)

    def zero_grads(self, stream):
        """Clears the gradient buffer when the optimizer pass did not."""
        if not self.zero_in_pass:
            self.mod.fill(*self._clear_grads, stream)

    def accumulate(self, i, g):
        """fp32 main grad of parameter i += its half gradient g (on the current stream)."""
        dst, n = self._main[i]
        if not g.is_contiguous():
            g = g.contiguous()
        self.mod.accumulate(dst, g.data_ptr(), _CODE[g.dtype], n, 1.0, current_stream(self.device))


def _with_phase(mod, a, phase):
    """A copy of the StepScalarArgs `a` for one phase."""
    b = mod.StepScalarArgs()
    for name in ("grad", "grad_dtype", "n", "workspace", "bucket_rows", "buckets", "scalars", "inv_scale",
                 "loss_scale_state", "max_norm", "loss_scale", "host_mirror", "boundaries", "abort_word"):
        setattr(b, name, getattr(a, name))
    b.phase = phase
    return b


def _at(t: torch.Tensor, offset: int) -> int:
    """Address of element `offset` of a flat tensor."""
    return t.data_ptr() + offset * t.element_size()
