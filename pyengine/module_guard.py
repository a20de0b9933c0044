"""A refused move or cast of the model leaves it exactly as it was.

Note: Module.to()/.cuda()/.half()/... convert a module's parameters one by one (param.data =
converted) and then each parameter's .grad; the engine learns of the conversion only from
the .grad (grads.py, EngineGrad) and refuses it there, when torch has already moved that
weight, and the buffers of earlier submodules, out of place. Each module of the model
therefore runs its _apply (what every such call goes through) inside a wrapper that, at the
outermost call, notes every parameter's tensor, .grad and buffer, and puts them all back if
the conversion raises. It costs nothing on the training path.
"""
import threading
import types

_state = threading.local()


class ModuleGuard:
    def __init__(self, model):
        self.model = model
        self.modules = list(model.modules())
        for m in self.modules:
            m.__dict__["_apply"] = _GuardedApply(m, model)

    def remove(self):
        for m in self.modules:
            if isinstance(m.__dict__.get("_apply"), _GuardedApply):
                del m.__dict__["_apply"]


class _GuardedApply:
    """module._apply for one module of an Engine-trained model.

    Note: a copy of the model (copy.deepcopy, pickle / torch.save of the whole model) is not
    the engine's: it gets the module's own _apply back, bound to the copy."""

    def __init__(self, module, model):
        self.module, self.model = module, model

    def __call__(self, fn, *args, **kwargs):
        original = type(self.module)._apply.__get__(self.module)
        if getattr(_state, "depth", 0):
            return original(fn, *args, **kwargs)
        saved = _snapshot(self.model)
        _state.depth = 1
        try:
            return original(fn, *args, **kwargs)
        except BaseException:
            _restore(saved)
            raise
        finally:
            _state.depth = 0

    def __reduce__(self):
        return _plain_apply, (self.module,)

    def __deepcopy__(self, memo):
        return _plain_apply(memo.get(id(self.module), self.module))


def _plain_apply(module):
    """The module's own _apply, bound to it (what a copy of the model gets)."""
    return types.MethodType(type(module)._apply, module)


def _snapshot(model):
    params = [(p, p.data, p.grad) for p in model.parameters()]
    buffers = [(m, k, b) for m in model.modules() for k, b in m._buffers.items()]
    return params, buffers


def _restore(saved):
    import torch

    params, buffers = saved
    with torch.no_grad():
        for p, data, grad in params:
            p.data = data  # the noted alias: the same storage, offset and strides as before
            if p.grad is not grad:
                p.grad = grad
    for m, k, b in buffers:
        m._buffers[k] = b
