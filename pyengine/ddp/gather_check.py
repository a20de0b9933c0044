"""The first forward after an overlapped parameter all-gather, watched.

Note: with overlap_param_gather each module's forward waits only for the all-gather of its own
parameters (forward pre-hooks). A model that uses a parameter outside its module's forward (a
parent reading child.weight, a functional call on a shared tensor) would read it before its
gather completed: stale or torn values, silently. Where a model uses its parameters is fixed by
its code, so one forward of the model watched under a TorchFunctionMode tells: every torch call
is checked for a trainable Parameter whose gather is still pending. At the first such use the
check waits for every pending gather (that read is then correct) and remembers the parameter;
the engine then warns once and waits for all gathers at the end of each step from then on. The
model's own forward hooks enter and leave the mode, so it nests with any mode the user holds,
and only this one forward pays the check's Python cost per torch call.
"""
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves


class GatherCheck(TorchFunctionMode):
    """pending_name(param) -> the parameter's name while its gather is pending, else None;
    wait_all() waits for every pending gather."""

    def __init__(self, pending_name, wait_all):
        super().__init__()
        self.pending_name, self.wait_all = pending_name, wait_all
        self.violation = None  # (parameter name, torch function) of the first early use
        self.uses = 0  # torch calls that took a trainable parameter: 0 until a forward ran

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.violation is None:
            for a in tree_leaves((args, kwargs)):
                if isinstance(a, torch.nn.Parameter):
                    self.uses += 1
                    name = self.pending_name(a)
                    if name is not None:
                        self.violation = (name, getattr(func, "__name__", repr(func)))
                        self.wait_all()
                        break
        return func(*args, **kwargs)
