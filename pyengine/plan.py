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
    """One fused optimizer pass: one contiguous range of one param group."""

    def __init__(self, group, fn, args):
        self.group = group
        self.fn = fn
        self.args = args


class _Group:
    """A param group's hyper-parameters as last validated and sent to the device."""

    def __init__(self, index, spec, hyper_ptr):
        self.index, self.spec, self.hyper_ptr = index, spec, hyper_ptr
        self.read = itemgetter(*spec.group_keys)  # the group's values as one tuple, in C
        self.values = None
        self.config = None


class StepPlan:
    """Resolved native calls over one FlatBuffers layout.

    opt_grads: the flat gradient the optimizer reads (the gradient buffer, or a wire buffer
    in another dtype under data parallel); zero_in_pass: the optimizer clears it as it reads.
    """

    def __init__(self, mod, flat, scalars, scaler, optimizer, opt_grads, zero_in_pass, max_norm, main_grads,
                 bucket_rows=None, combine=None):
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
        a.inv_scale = scalars.ptr("inv_scale")
        a.max_norm = math.inf if max_norm is None else float(max_norm)
        a.loss_scale = scaler.config
        if scaler.host_mirror is not None:
            a.host_mirror = scaler.host_mirror.data_ptr()
        # Sharded state: this rank's (found_inf, sumsq) are combined over the ranks between
        # the local fold and the rest (clip, loss scale), by `combine`.
        self._combine, self._flag_and_sumsq = combine, scalars.flag_and_sumsq
        self._scalar_args = a
        if combine is not None:
            self._local, self._global = _with_phase(mod, a, STEP_LOCAL), _with_phase(mod, a, STEP_GLOBAL)
        ptr = scalars.ptr
        self.zero_in_pass = zero_in_pass
        self._clear_grads = (g.data_ptr(), dtype_code(g), g.numel(), 0.0)
        fn = getattr(mod, optimizer.spec.native)
        states = [flat.state[name] for name in optimizer.spec.states(optimizer.param_groups)]
        # each group's float hyper-parameters in device memory (see core.h, kHyperSlots)
        self.hyper = torch.zeros(len(optimizer.param_groups), HYPER_SLOTS, dtype=torch.float32, device=flat.device)
        self.groups = [_Group(gi, optimizer.spec, _at(self.hyper, gi * HYPER_SLOTS))
                       for gi in range(len(optimizer.param_groups))]
        # (group, offset in the whole buffers, offset in the state buffers, length) of each pass:
        # one per group, or, with sharded state, one per bucket slice this rank owns
        if flat.sharded:
            ranges = [(o.group, o.start, o.local, o.numel) for o in flat.layout.owned(flat.rank)]
        else:
            ranges = [(gi, sp.start, sp.start, sp.numel) for gi, sp in enumerate(flat.layout.groups)]
        ranges = [r for r in ranges if r[3] > 0]
        last = {r[0]: k for k, r in enumerate(ranges)}  # a group's step count advances once
        self.passes = []
        for k, (gi, at, local, n) in enumerate(ranges):
            a = mod.OptimizerArgs()
            a.master = _at(flat.master_flat, local if flat.master_separate else at)
            a.state1 = _at(states[0], local) if len(states) > 0 else 0
            a.state2 = _at(states[1], local) if len(states) > 1 else 0
            a.grad, a.grad_dtype, a.zero_grad = _at(opt_grads, at), dtype_code(opt_grads), zero_in_pass
            if flat.master_separate:
                a.model, a.model_dtype = _at(flat.param_flat, at), dtype_code(flat.param_flat)
            a.n = n
            a.grad_scale, a.found_inf = ptr("grad_coef"), ptr("found_inf")
            a.step = _at(optimizer.steps, gi)
            a.hyper = self.groups[gi].hyper_ptr
            a.advance_step = last[gi] == k
            self.passes.append(_Pass(self.groups[gi], fn, a))
        self._optimizer = optimizer
        # fp32 main grads: where each parameter's half gradient is added (grads.py's hook)
        self._main = [(_at(g, s.offset), s.numel) for s in flat.layout.slots] if main_grads else None

    # -- the hot path ------------------------------------------------------------------------
    def stream(self) -> int:
        return torch.cuda.current_stream(self.device).cuda_stream if self.cuda else 0

    def step_scalars(self, stream):
        """found_inf and sumsq (one read-only pass, or the buckets' rows), grad_norm and
        grad_coef, then the loss-scale update: one native call (two around the ranks'
        combination of found_inf and sumsq with sharded state)."""
        if self._combine is None:
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
                g.config, g.values = g.spec.config(self.mod, checked), values
                self.mod.set_scalars(g.hyper_ptr, g.spec.hyper(checked), stream)

    def update(self, stream):
        """One fused optimizer pass per non-empty param group (per owned bucket slice when the
        state is sharded)."""
        self.sync_hyper(stream)
        for p in self.passes:
            p.fn(p.args, p.group.config, stream)

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
                 "loss_scale_state", "max_norm", "loss_scale", "host_mirror"):
        setattr(b, name, getattr(a, name))
    b.phase = phase
    return b


def _at(t: torch.Tensor, offset: int) -> int:
    """Address of element `offset` of a flat tensor."""
    return t.data_ptr() + offset * t.element_size()
