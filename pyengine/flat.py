"""The flat buffers of one model on one Layout: params, gradients, master weights and
optimizer state.

Note: every trainable parameter becomes a view into one contiguous buffer in the model's
precision. Gradients are a flat buffer in the parameter dtype, or, with fp32 accumulation
of half-precision params, a flat fp32 main-grad buffer (grads.py feeds it). Master weights
and optimizer state are flat fp32 buffers with the same layout, so every kernel runs once
per group or bucket over one contiguous range instead of once per tensor. fp32 params are
their own master weights: the optimizer updates them in place.

With sharded optimizer state (ZeRO-1, layout.shard_world > 1) the params and gradients stay
whole, and the fp32 master weights (half-precision params only) and the optimizer state hold
only this rank's slices of the buckets, one after another (layout.py, Note [buckets and
shards]): 12 bytes a parameter become 12 / world.

Every buffer can be read and written by canonical ranges (`pieces`): parameter i's elements
numbered as if the parameters were packed in registration order without padding. That is
how a checkpoint is stored, whatever the layout, the stage or the number of ranks.
"""
import bisect
from typing import Dict, List, Sequence, Tuple

import torch

from . import ops
from .layout import Layout

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def canonical_offsets(numels: Sequence[int]) -> List[int]:
    """Where each parameter starts in the packed canonical order."""
    out, pos = [], 0
    for n in numels:
        out.append(pos)
        pos += n
    return out


class FlatBuffers:
    """params: the trainable parameters in canonical order (Layout indices); rank: this
    rank's index among layout.shard_world (sharded state only)."""

    def __init__(self, layout: Layout, params: Sequence[torch.nn.Parameter], param_dtype, grad_dtype,
                 state_names: Sequence[str], device, rank: int = 0):
        self.params: List[torch.nn.Parameter] = list(params)
        self.param_dtype = param_dtype
        self.grad_dtype = grad_dtype
        self.device = torch.device(device)
        self.rank = rank
        self.canon = canonical_offsets(layout.numels)
        self._allocate(layout, state_names)
        with torch.no_grad():
            full = self.master_flat if self.master_flat is self.param_flat else None
            if full is not None or not self.sharded:
                target = self.master_flat
                for i, p in enumerate(self.params):
                    self.view(target, i).copy_(p.detach().reshape(-1))
            else:  # the master shard: this rank's pieces of the fp32 values the model holds now
                values = [p.detach().reshape(-1) for p in self.params]
                for c0, n, local in self.pieces():
                    i, off = self._param_at(c0)
                    self.master_flat[local:local + n].copy_(values[i][off:off + n])
                for i, p in enumerate(self.params):
                    self.view(self.param_flat, i).copy_(p.detach().reshape(-1))
            if not self.sharded and self.master_flat is not self.param_flat:
                self.param_flat.copy_(self.master_flat)
        self._attach()

    def _allocate(self, layout, state_names):
        self.layout = layout
        self.sharded = layout.shard_world > 1
        shard = layout.shard_numel if self.sharded else layout.numel
        self.param_flat = self._new(layout.numel, self.param_dtype)
        self.grad_flat = self._new(layout.numel, self.grad_dtype)
        self.master_flat = self.param_flat if self.param_dtype == torch.float32 else self._new(shard, torch.float32)
        self.state: Dict[str, torch.Tensor] = {name: self._new(shard, torch.float32) for name in state_names}

    def add_state(self, name: str):
        """A state buffer born after the build (SGD momentum turned on later): zeros."""
        if name not in self.state:
            shard = self.layout.shard_numel if self.sharded else self.layout.numel
            self.state[name] = self._new(shard, torch.float32)

    @property
    def master_separate(self) -> bool:
        """fp32 master weights apart from the (half-precision) parameters."""
        return self.master_flat is not self.param_flat

    @property
    def main_grads(self) -> bool:
        """Gradients accumulate in fp32 while the params are half precision."""
        return self.grad_dtype != self.param_dtype

    def _new(self, n, dtype):
        return torch.zeros(n, dtype=dtype, device=self.device)

    def _attach(self):
        for i, p in enumerate(self.params):
            p.data = self.param_view(i).view_as(p)

    # -- views of canonical parameter i in the whole buffers ----------------------------------
    def view(self, flat: torch.Tensor, i: int) -> torch.Tensor:
        s = self.layout.slots[i]
        return flat[s.offset:s.end]

    def param_view(self, i):
        return self.view(self.param_flat, i)

    def grad_view(self, i):
        return self.view(self.grad_flat, i)

    def master_view(self, i):
        """Parameter i's fp32 master weights (whole buffers only; see pieces() when sharded)."""
        if self.sharded and self.master_separate:
            raise RuntimeError("internal: the master weights are sharded; read them by pieces()")
        return self.view(self.master_flat, i)

    # -- canonical pieces ----------------------------------------------------------------------
    def whole_pieces(self) -> List[Tuple[int, int, int]]:
        """(canonical start, length, offset) of every parameter in the whole (unsharded)
        buffers, padding left out, in buffer order."""
        out = []
        for i in self.layout.order:
            s = self.layout.slots[i]
            if s.numel:
                out.append((self.canon[i], s.numel, s.offset))
        return out

    def pieces(self) -> List[Tuple[int, int, int]]:
        """(canonical start, length, offset in this rank's state buffers) of every run of
        parameter elements the state buffers hold, padding left out, in buffer order."""
        if not self.sharded:
            return self.whole_pieces()
        out = []
        for o in self.layout.owned(self.rank):
            for i, off, flat, n in self.layout.segments(o.start, o.end):
                out.append((self.canon[i] + off, n, o.local + (flat - o.start)))
        return out

    def master_pieces(self) -> List[Tuple[int, int, int]]:
        """As pieces(), for what the master buffer holds: the whole fp32 params when they are
        their own master weights."""
        if self.master_separate or not self.sharded:
            return self.pieces()
        return self.whole_pieces()

    def owned_master_pieces(self) -> List[Tuple[int, int, int]]:
        """The master weights this rank updates (and saves): with fp32 params under ZeRO-1
        the owned slices of the whole param buffer, else master_pieces()."""
        if self.master_separate or not self.sharded:
            return self.pieces()
        return [(self.canon[i] + off, n, flat) for o in self.layout.owned(self.rank)
                for i, off, flat, n in self.layout.segments(o.start, o.end)]

    def refresh_master(self):
        """The master weights this rank updates follow the parameters, after an in-place write
        to them (model.load_state_dict, ...), as a torch optimizer would use the new values."""
        if not self.master_separate:
            return
        if not self.sharded:
            ops.cast_scale(self.param_flat, self.master_flat)
            return
        for o in self.layout.owned(self.rank):
            ops.cast_scale(self.param_flat[o.start:o.end], self.master_flat[o.local:o.local + o.numel])

    def _param_at(self, c0):
        i = bisect.bisect_right(self.canon, c0) - 1
        while self.layout.numels[i] == 0:  # empty params share a start with the next one
            i += 1
        return i, c0 - self.canon[i]

    def nbytes_per_param(self) -> Dict[str, float]:
        """Persistent bytes of the flat buffers per element of the layout, by role."""
        n = self.layout.numel

        def per(t):
            return t.numel() * t.element_size() / n

        out = {"param": per(self.param_flat), "grad": per(self.grad_flat),
               "master": per(self.master_flat) if self.master_separate else 0,
               "optimizer_state": sum(per(t) for t in self.state.values())}
        if self.main_grads:
            out["main_grad_fp32"] = out.pop("grad")
        return out

    # -- layout change -----------------------------------------------------------------------
    def relayout(self, layout: Layout, gather_state=None):
        """Move params, master weights and optimizer state to a new layout of the same
        parameters (the gradients must be clear: they are zeroed, not moved). With sharded
        state, gather_state(buffer, old layout) must yield (canonical start, values) runs that
        together hold every element of that buffer, from all ranks (it communicates)."""
        old_layout, old_param = self.layout, self.param_flat
        old = {"master": self.master_flat, **self.state} if self.master_separate else dict(self.state)
        old_master_pieces = self.master_pieces()
        old_pieces = self.pieces()
        self._allocate(layout, list(self.state))
        with torch.no_grad():
            for i in range(len(self.params)):
                a, b = old_layout.slots[i], layout.slots[i]
                self.param_flat[b.offset:b.end].copy_(old_param[a.offset:a.end])
            new = {"master": self.master_flat, **self.state} if self.master_separate else dict(self.state)
            for name, src in old.items():
                dst_pieces = self.master_pieces() if name == "master" else self.pieces()
                if self.sharded:
                    runs = gather_state(src, old_layout, old_master_pieces if name == "master" else old_pieces)
                else:
                    src_pieces = old_master_pieces if name == "master" else old_pieces
                    runs = ((c0, src[off:off + n]) for c0, n, off in src_pieces)
                copy_runs(runs, new[name], dst_pieces)
        self._attach()


def copy_runs(runs, dst: torch.Tensor, dst_pieces: List[Tuple[int, int, int]]):
    """Writes the canonical runs (start, values) that overlap dst's pieces into dst."""
    dst_pieces = sorted(dst_pieces)
    starts = [c0 for c0, _, _ in dst_pieces]
    for c0, values in runs:
        c1 = c0 + values.numel()
        k = max(0, bisect.bisect_right(starts, c0) - 1)
        while k < len(dst_pieces) and dst_pieces[k][0] < c1:
            d0, n, off = dst_pieces[k]
            lo, hi = max(c0, d0), min(c1, d0 + n)
            if lo < hi:
                dst[off + lo - d0:off + hi - d0].copy_(values[lo - c0:hi - c0])
            k += 1
