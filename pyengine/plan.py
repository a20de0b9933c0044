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


def dtype_code(t: torch.Tensor) -> int:
    return _CODE[t.dtype]


def current_stream(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0


class _Pass:
    """One fused optimizer pass: one param group's contiguous range."""

    def __init__(self, group_index, fn, args, spec):
        self.group_index = group_index
        self.fn = fn
        self.args = args
        self.spec = spec
        self.read = itemgetter(*spec.group_keys)  # the group's values as one tuple, in C
        self.values = None  # the group's hyper-parameters the config was made from
        self.config = None


class StepPlan:
    """Resolved native calls over one FlatBuffers layout.

    opt_grads: the flat gradient the optimizer reads (the gradient buffer, or a wire buffer
    in another dtype under data parallel); zero_in_pass: the optimizer clears it as it reads.
    """

    def __init__(self, mod, flat, scalars, scaler, optimizer, opt_grads, zero_in_pass, max_norm, main_grads,
                 bucket_rows=None):
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
        self._scalar_args = a
        ptr = scalars.ptr
        self.zero_in_pass = zero_in_pass
        self._clear_grads = (g.data_ptr(), dtype_code(g), g.numel(), 0.0)
        self.passes = []
        fn = getattr(mod, optimizer.spec.native)
        states = [flat.state[name] for name in optimizer.spec.states(optimizer.param_groups)]
        half_model = flat.master_flat is not flat.param_flat
        # each group's float hyper-parameters in device memory (see core.h, kHyperSlots)
        self.hyper = torch.zeros(len(optimizer.param_groups), HYPER_SLOTS, dtype=torch.float32, device=flat.device)
        for gi, span in enumerate(flat.layout.groups):
            if span.numel == 0:
                continue
            a = mod.OptimizerArgs()
            a.master = _at(flat.master_flat, span.start)
            a.state1 = _at(states[0], span.start) if len(states) > 0 else 0
            a.state2 = _at(states[1], span.start) if len(states) > 1 else 0
            a.grad, a.grad_dtype, a.zero_grad = _at(opt_grads, span.start), dtype_code(opt_grads), zero_in_pass
            if half_model:
                a.model, a.model_dtype = _at(flat.param_flat, span.start), dtype_code(flat.param_flat)
            a.n = span.numel
            a.grad_scale, a.found_inf = ptr("grad_coef"), ptr("found_inf")
            a.step = _at(optimizer.steps, gi)
            a.hyper = _at(self.hyper, gi * HYPER_SLOTS)
            self.passes.append(_Pass(gi, fn, a, optimizer.spec))
        self._optimizer = optimizer
        # fp32 main grads: where each parameter's half gradient is added (grads.py's hook)
        self._main = [(_at(g, s.offset), s.numel) for s in flat.layout.slots] if main_grads else None

    # -- the hot path ------------------------------------------------------------------------
    def stream(self) -> int:
        return torch.cuda.current_stream(self.device).cuda_stream if self.cuda else 0

    def step_scalars(self, stream):
        """found_inf and sumsq (one read-only pass, or the buckets' rows), grad_norm and
        grad_coef, then the loss-scale update: one native call."""
        self.mod.step_scalars(self._scalar_args, stream)

    def sync_hyper(self, stream):
        """Each group's hyper-parameters as the optimizer's param_groups hold them now, to the
        device (only what changed, validated first). A captured step reads them from there."""
        groups = self._optimizer.param_groups
        for p in self.passes:
            group = groups[p.group_index]
            values = p.read(group)
            if values != p.values:  # first step, or a scheduler / the user changed a value
                checked = check_group(p.spec, group, f"engine.optimizer.param_groups[{p.group_index}]")
                p.config, p.values = p.spec.config(self.mod, checked), values
                self.mod.set_scalars(p.args.hyper, p.spec.hyper(checked), stream)

    def update(self, stream):
        """One fused optimizer pass per non-empty param group."""
        self.sync_hyper(stream)
        for p in self.passes:
            p.fn(p.args, p.config, stream)

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


def _at(t: torch.Tensor, offset: int) -> int:
    """Address of element `offset` of a flat tensor."""
    return t.data_ptr() + offset * t.element_size()
