"""Gradients that cannot silently detach: what p.grad is for a parameter the Engine trains,
the hooks that feed the flat gradient buffers, and the checks around backward and step.

Note [p.grad stays attached]: a PyTorch habit (model.zero_grad(), whose default sets
p.grad = None) used to detach a parameter's gradient from the flat buffer: autograd then
allocated a fresh tensor, the buffer stayed zero and step() applied a zero update in
silence. Here every trainable parameter's .grad is an EngineGrad the engine hands out:

  - with the gradient buffer in the parameter dtype, it is a view of that buffer, so
    autograd accumulates into it in place (its C++ path never sees the subclass);
  - with fp32 main grads, it is a placeholder that holds no memory (an empty sparse tensor
    of p's shape): before each backward the engine sets p.grad = None so autograd hands the
    fresh half gradient to a post-accumulate hook, which adds it into the fp32 main-grad
    buffer and puts the placeholder back. (A plain loss.backward() then reaches the hook
    outside engine.backward() and gets an error saying so.)

Whatever a user does to it is then either exactly what PyTorch does or a clear error:
  - clearing (zero_grad() either way, optimizer.zero_grad(), p.grad = None) discards the
    gradient accumulated so far, as in PyTorch; a None is noticed at the next backward;
  - anything else (clip_grad_norm_, reading values, another optimizer's step) runs as in
    PyTorch where p.grad holds the true gradient (fp32 or bf16 gradient buffer, one process);
    elsewhere the values are loss-scaled, not yet averaged across ranks, or live in the fp32
    buffer, so such code would compute something wrong without a word: it raises instead,
    saying what to use (EngineConfig.clip_grad_norm, engine.grad_norm, engine.step()).
"""
from collections import deque
from itertools import repeat
from operator import attrgetter, is_, methodcaller
from typing import Callable, List, Optional

import torch
from torch.utils._pytree import tree_flatten

from .errors import GradientAccessError, UsageError  # noqa: F401 (re-exported)

# torch functions on a gradient that read no values (shape queries, flags, properties)
_METADATA = frozenset({
    "__get__", "size", "dim", "ndimension", "numel", "nelement", "stride", "storage_offset", "is_contiguous",
    "element_size", "data_ptr", "is_floating_point", "is_complex", "requires_grad_", "__hash__", "__len__",
    "get_device", "_has_compatible_shallow_copy_type",
})
_CLEARS = frozenset({"zero_", "_foreach_zero_"})
# conversions a module applies to every parameter's .grad when it is moved or cast
_CONVERSIONS = frozenset({"to", "cuda", "cpu", "half", "float", "bfloat16", "double", "type"})

# Note: the per-parameter checks run every backward and step, so they are written as chains
# of map() over C-level callables (about 0.1 us a parameter) instead of Python loops.
_grad, _data_ptr, _version = attrgetter("grad"), methodcaller("data_ptr"), attrgetter("_version")


def _all_attached(params, handles) -> bool:
    return all(map(is_, map(_grad, params), handles))


def _set_grads(params, values):
    deque(map(setattr, params, repeat("grad"), values), maxlen=0)


class EngineGrad(torch.Tensor):
    """p.grad of a parameter the Engine trains (see Note [p.grad stays attached])."""

    _pe_guard: "GradGuard"
    _pe_index: int

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", str(func))
        if name not in _METADATA:
            handles = [a for a in tree_flatten((args, kwargs))[0] if isinstance(a, EngineGrad)]
            guard = handles[0]._pe_guard if handles else None
            if guard is not None:
                if name in _CLEARS or (name == "fill_" and len(args) > 1 and _is_zero(args[1])):
                    guard.clear([h._pe_index for h in handles])
                    return args[0]
                if name == "__set__" and len(args) == 2 and args[1] is args[0]:
                    return None  # grad.data = grad: what Module._apply does after a no-op conversion
                if name in _CONVERSIONS and args and args[0] is handles[0]:
                    try:
                        with torch._C.DisableTorchFunctionSubclass():
                            out = func(*args, **kwargs)
                    except RuntimeError:  # e.g. channels_last of the fp32-main-grad placeholder (sparse)
                        out = None
                    if out is args[0]:
                        return out  # a no-op conversion (already on that device, in that dtype)
                    guard.moved(handles[0]._pe_index)
                guard.check_use(name, handles[0]._pe_index)
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **kwargs)


def _is_zero(v):
    return isinstance(v, (int, float)) and v == 0


class GradGuard:
    """Keeps p.grad attached for the parameters of one FlatBuffers.

    inexact: None when p.grad holds the true gradient between backward and step (gradient
    buffer in the param dtype, no loss scaling, one process); else why it does not. It reads
    the accumulation window's state (window.py); its one write there is Window.forget(), when
    a user clears gradients to None. The gradient hooks are the pipeline's (install_hooks).
    """

    def __init__(self, flat, names: List[str], inexact: Optional[str], window, tree=None):
        self.flat = flat
        self.tree = tree  # deterministic: the partial sums that hold the window's earlier micro-batches
        self.names = names
        self.inexact = inexact
        self.window = window
        self.main = flat.main_grads
        self._hooks = []
        self.rebind()

    def install_hooks(self, landed: Callable):
        """landed(i, p) runs when parameter i's gradient is complete for a backward."""
        for i, p in enumerate(self.flat.params):
            frozen = not p.requires_grad
            if frozen:  # torch registers hooks only on tensors that require grad; kept once unfrozen
                p.requires_grad_(True)
            self._hooks.append(p.register_post_accumulate_grad_hook(lambda p, i=i: landed(i, p)))
            if frozen:
                p.requires_grad_(False)

    def rebind(self):
        """New handles on the current buffers (after a relayout), attached as p.grad."""
        self.handles: List[EngineGrad] = []
        for i, p in enumerate(self.flat.params):
            if self.main:  # an empty sparse tensor of p's shape: a placeholder that holds no memory
                empty = torch.sparse_coo_tensor(torch.zeros((p.dim(), 0), dtype=torch.long, device=p.device),
                                                torch.zeros(0, dtype=p.dtype, device=p.device), p.shape,
                                                check_invariants=False)
                h = torch.Tensor._make_subclass(EngineGrad, empty)
            else:
                h = self.flat.grad_view(i).view(p.shape).as_subclass(EngineGrad)
            h._pe_guard, h._pe_index = self, i
            self.handles.append(h)
            p.grad = h
        self.param_versions = [p._version for p in self.flat.params]
        self.param_ptrs = [self.flat.param_view(i).data_ptr() for i in range(len(self.flat.params))]

    def remove(self):
        for h in self._hooks:
            h.remove()
        self._hooks = []

    # -- around backward ---------------------------------------------------------------------
    def before_backward(self):
        """Notices cleared or replaced gradients (PyTorch semantics: what was accumulated is
        gone), then readies p.grad for autograd."""
        params, handles = self.flat.params, self.handles
        if not _all_attached(params, handles):
            for i, (p, h) in enumerate(zip(params, handles)):
                if p.grad is not h:
                    self._take_user_grad(i, p.grad)
                    p.grad = h
        if self.main:
            _set_grads(params, repeat(None))  # autograd hands the new gradient to the hook, not to +=

    def after_backward(self):
        """Puts the handles back where autograd left no gradient (unused parameters) or a
        backward failed part-way."""
        if self.main and not _all_attached(self.flat.params, self.handles):
            _set_grads(self.flat.params, self.handles)

    def landed(self, i, p):
        """Parameter i's gradient is complete for this backward: returns the half gradient to
        add into the fp32 main grads (None when autograd accumulated into the buffer itself)."""
        h = self.handles[i]
        if not self.window.in_backward:
            g, p.grad = p.grad, h
            if self.main:  # what autograd left is not the engine's: nothing was added anywhere
                raise GradientAccessError(
                    "pyengine: loss.backward() on a model the Engine trains; call engine.backward(loss) instead (it "
                    "applies the loss scale and the accumulation, and feeds the engine's gradient buffers)")
            self._take_user_grad(i, g)
            return None
        g = p.grad
        if g is h:
            return None
        p.grad = h
        if self.main:
            return g
        self._take_user_grad(i, g)  # replaced during backward: take it in
        return None

    def _take_user_grad(self, i, g):
        dst = self.flat.grad_view(i)
        with torch.no_grad():
            if g is None:
                self.window.forget((i,))
                if self.window.dirty:
                    dst.zero_()
                    self._clear_partials((i,))
            else:
                with torch._C.DisableTorchFunctionSubclass():
                    dst.copy_(g.reshape(-1))

    # -- before the boundary step ----------------------------------------------------------
    def before_step(self, check_placement=False):
        """Raises when p.grad was cleared or replaced between backward and step (or, with
        check_placement, a parameter no longer lives in the buffers); returns True when
        half-precision parameter values were written in place (e.g. model.load_state_dict), so
        the caller refreshes its fp32 master copy from them.

        Note: a parameter's version counter moves with every in-place write to it; the
        engine's own kernels write through raw pointers and move none. fp32 parameters are
        their own master weights, so their writes need no refresh and are not checked.
        Whether the parameters still live in the buffers is checked every few steps
        (data_ptr() costs 0.3 us a parameter); moving or casting the model is caught at once
        by its gradients (EngineGrad)."""
        params = self.flat.params
        if (_all_attached(params, self.handles)
                and (not self.flat.master_separate or list(map(_version, params)) == self.param_versions)
                and (not check_placement or list(map(_data_ptr, params)) == self.param_ptrs)):
            return False
        written = False
        for i, p in enumerate(params):
            written |= self._step_problem(i, p)
        return written and self.flat.master_separate

    def _step_problem(self, i, p) -> bool:
        g, h = p.grad, self.handles[i]
        if g is not h:
            p.grad = h
            if g is not None and self.inexact is None:
                self._take_user_grad(i, g)  # p.grad = something: PyTorch would step with it
            else:
                raise GradientAccessError(
                    f"pyengine: the gradient of {self.names[i]} was {'cleared' if g is None else 'replaced'} between "
                    "engine.backward() and engine.step(). PyTorch would then skip that parameter; pyengine cannot. "
                    "Clear gradients before backward (model.zero_grad() at the top of the loop), or not at all: "
                    "engine.step() clears them after each update")
        if p.data_ptr() != self.param_ptrs[i]:
            raise RuntimeError(
                f"pyengine: parameter {self.names[i]} no longer lives in the engine's buffers (was the model moved or "
                "cast with .to()/.cuda()/.half(), or a parameter reassigned, after Engine(...)?). Do that before "
                "building the Engine")
        if p._version != self.param_versions[i]:
            self.param_versions[i] = p._version
            return True
        return False

    # -- what EngineGrad asks ----------------------------------------------------------------
    def clear(self, indices, to_none: bool = False):
        """zero_grad semantics: the gradient accumulated so far is discarded (to_none: as if
        set to None, so the parameters count as having received nothing in this window)."""
        w = self.window
        if w.in_flight:
            raise GradientAccessError(
                "pyengine: gradients were cleared between engine.backward() and engine.step() while they are being "
                "averaged across ranks. Clear them before backward (model.zero_grad() at the top of the loop), or not "
                "at all: engine.step() clears them after each update")
        if to_none and w.boundary_pending:
            raise GradientAccessError(
                "pyengine: zero_grad(set_to_none=True) between engine.backward() and the engine.step() that updates: "
                "PyTorch would then skip every parameter in that step; pyengine cannot. Clear gradients before "
                "backward (zero_grad() at the top of the loop), or not at all: engine.step() clears them after each "
                "update (zero_grad(set_to_none=False) here steps with zero gradients, as in PyTorch)")
        with torch.no_grad():
            if len(indices) == len(self.handles):
                self.flat.grad_flat.zero_()
            else:
                for i in indices:
                    self.flat.grad_view(i).zero_()
            self._clear_partials(indices)
        if to_none:
            w.forget(indices)

    def discard(self):
        """A backward failed part-way: everything the window accumulated is dropped, as the
        window restarts at its first micro-batch (Window.abort_backward). Otherwise a caught
        error (an out-of-memory batch skipped) left its partial gradients to the next step."""
        with torch.no_grad():
            self.flat.grad_flat.zero_()
            self._clear_partials(self.handles)

    def _clear_partials(self, indices):
        if self.tree is not None:
            slots = self.flat.layout.slots
            self.tree.clear([(0, self.flat.layout.numel)] if len(indices) == len(self.handles)
                            else [(slots[i].offset, slots[i].end) for i in indices])

    def moved(self, i):
        """Module.to()/.cuda()/.half() converts each parameter, then its .grad: the parameters
        would leave the engine's buffers and train nothing (module_guard.py puts back what
        torch had already converted)."""
        raise UsageError(
            f"pyengine: the model is being moved or cast (.to(), .cuda(), .half(), ...) after Engine(...) took over its "
            f"parameters ({self.names[i]} and the others would leave the engine's buffers and stop training). Move or "
            "cast the model before building the Engine")

    def check_use(self, what, i):
        if self.inexact is not None or self.window.in_flight:
            reason = self.inexact or "the gradients are being averaged across ranks until engine.step()"
            raise GradientAccessError(
                f"pyengine: {what}() on the .grad of {self.names[i]}: {reason}, so it would compute the wrong "
                "thing. Clip with EngineConfig(clip_grad_norm=...) (engine.grad_norm then holds the total norm that "
                "clip_grad_norm_ returns); update with engine.step(), not another optimizer; zero_grad() works as in "
                "PyTorch")
