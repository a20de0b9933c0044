"""model.state_dict() of an Engine-trained model saves what it holds, not the flat buffer.

Note: every trainable parameter is a view of one flat buffer, and torch.save writes a
tensor's whole storage: torch.save(model.classifier.state_dict()) wrote the whole model
(326,804 B for 780 B of tensors). A state-dict hook on each module that holds such
parameters hands out the same views (no copy: writing into the state dict still writes the
model, as in PyTorch) as a tensor type that pickles and deep-copies only its own elements.
"""
import functools

import torch


class ParamView(torch.Tensor):
    """A state_dict value that views the engine's flat buffer: a plain tensor in every use,
    but torch.save and copy.deepcopy copy only its own elements."""

    __torch_function__ = torch._C._disabled_torch_function_impl

    def __reduce_ex__(self, protocol):
        return torch.Tensor.__reduce_ex__(self.as_subclass(torch.Tensor).clone(), protocol)

    def __deepcopy__(self, memo):
        out = self.as_subclass(torch.Tensor).clone()
        memo[id(self)] = out
        return out


class StateViews:
    """Installs the hooks on the modules holding `params` (the engine's); remove() undoes it."""

    def __init__(self, model, params):
        owned = {id(p) for p in params}
        self._handles = []
        for module in model.modules():
            names = tuple(k for k, p in module._parameters.items() if p is not None and id(p) in owned)
            if names:
                # a module-level function: the hook pickles with the model (torch.save(model))
                self._handles.append(module.register_state_dict_post_hook(functools.partial(_compact, names)))

    def remove(self):
        for h in self._handles:
            h.remove()
        self._handles = []


def _compact(names, module, state_dict, prefix, local_metadata):
    for n in names:
        key = prefix + n
        v = state_dict.get(key)
        if type(v) is torch.Tensor:  # keep_vars=True hands out the Parameter itself: left alone
            state_dict[key] = v.as_subclass(ParamView)
