"""The flat buffers of one model on one Layout: params, gradients, master weights and
optimizer state.

Note: every trainable parameter becomes a view into one contiguous buffer in the model's
precision. Gradients are a flat buffer in the parameter dtype, or, with fp32 accumulation
of half-precision params, a flat fp32 main-grad buffer (grads.py feeds it). Master weights
and optimizer state are flat fp32 buffers with the same layout, so every kernel runs once
per group or bucket over one contiguous range instead of once per tensor. fp32 params are
their own master weights: the optimizer updates them in place.
"""
from typing import Dict, List, Sequence

import torch

from .layout import Layout

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class FlatBuffers:
    """params: the trainable parameters in canonical order (Layout indices)."""

    def __init__(self, layout: Layout, params: Sequence[torch.nn.Parameter], param_dtype, grad_dtype,
                 state_names: Sequence[str], device):
        self.params: List[torch.nn.Parameter] = list(params)
        self.param_dtype = param_dtype
        self.grad_dtype = grad_dtype
        self.device = torch.device(device)
        self.layout = layout
        self.param_flat = self._new(param_dtype)
        self.grad_flat = self._new(grad_dtype)
        self.master_flat = self.param_flat if param_dtype == torch.float32 else self._new(torch.float32)
        self.state: Dict[str, torch.Tensor] = {name: self._new(torch.float32) for name in state_names}
        with torch.no_grad():
            for i, p in enumerate(self.params):
                self.master_view(i).copy_(p.detach().reshape(-1))
            if self.master_flat is not self.param_flat:
                self.param_flat.copy_(self.master_flat)
        self._attach()

    @property
    def master_separate(self) -> bool:
        """fp32 master weights apart from the (half-precision) parameters."""
        return self.master_flat is not self.param_flat

    @property
    def main_grads(self) -> bool:
        """Gradients accumulate in fp32 while the params are half precision."""
        return self.grad_dtype != self.param_dtype

    def _new(self, dtype):
        return torch.zeros(self.layout.numel, dtype=dtype, device=self.device)

    def _attach(self):
        for i, p in enumerate(self.params):
            p.data = self.param_view(i).view_as(p)

    # -- views of canonical parameter i ----------------------------------------------------
    def view(self, flat: torch.Tensor, i: int) -> torch.Tensor:
        s = self.layout.slots[i]
        return flat[s.offset:s.end]

    def param_view(self, i):
        return self.view(self.param_flat, i)

    def grad_view(self, i):
        return self.view(self.grad_flat, i)

    def master_view(self, i):
        return self.view(self.master_flat, i)

    def nbytes_per_param(self) -> Dict[str, int]:
        """Persistent bytes per element of the flat buffers, by role."""
        out = {"param": self.param_flat.element_size(), "grad": self.grad_flat.element_size(),
               "master": 0 if self.master_flat is self.param_flat else 4, "optimizer_state": 4 * len(self.state)}
        if self.main_grads:
            out["main_grad_fp32"] = out.pop("grad")
        return out

    # -- layout change ---------------------------------------------------------------------
    def relayout(self, layout: Layout):
        """Move params, master weights and optimizer state to a new layout of the same
        parameters. The gradients must be clear (they are zeroed, not moved)."""
        old, old_layout = (self.param_flat, self.master_flat, dict(self.state)), self.layout
        self.layout = layout
        self.param_flat = self._new(self.param_dtype)
        self.grad_flat = self._new(self.grad_dtype)
        self.master_flat = self.param_flat if self.param_dtype == torch.float32 else self._new(torch.float32)
        moves = [(old[0], self.param_flat), (old[1], self.master_flat)] if old[1] is not old[0] else \
            [(old[0], self.param_flat)]
        self.state = {}
        for name, flat in old[2].items():
            self.state[name] = self._new(torch.float32)
            moves.append((flat, self.state[name]))
        with torch.no_grad():
            for src, dst in moves:
                for i in range(len(self.params)):
                    a, b = old_layout.slots[i], layout.slots[i]
                    dst[b.offset:b.end].copy_(src[a.offset:a.end])
        self._attach()
