"""Flat parameter / gradient / master buffers, param groups and buckets.

Note: every trainable parameter becomes a view into one contiguous buffer, laid out group
by group. Gradients are views into a flat gradient buffer (autograd accumulates into them in
place), or, with fp32 accumulation of half-precision params, live in a flat fp32 main-grad
buffer fed by a hook. Master weights and optimizer state are flat fp32 buffers with the
same layout, so every kernel runs once per group (or bucket) over one contiguous range
instead of once per tensor.
"""
from dataclasses import dataclass
from typing import Dict, List

import torch

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

# Note: every parameter starts at a multiple of ALIGN elements (64 B in fp32, 32 B in half),
# so every group and bucket range, which begin at parameter boundaries, can use 16-byte
# vector loads on the GPU and aligned SIMD on the CPU. The padding holds zeros in every
# buffer; a zero gradient leaves it zero through every optimizer, at < ALIGN elements a param.
ALIGN = 16


def _align(n):
    return (n + ALIGN - 1) // ALIGN * ALIGN


@dataclass
class GroupRange:
    """One param group's contiguous range of the flat buffers."""
    index: int
    start: int
    end: int
    params: List[torch.nn.Parameter]

    @property
    def numel(self):
        return self.end - self.start


@dataclass
class Bucket:
    """A contiguous slice of the gradient buffer that is communicated as one unit."""
    index: int
    start: int
    end: int
    params: List[torch.nn.Parameter]
    pending: int = 0  # params whose gradient has not landed yet in this iteration

    @property
    def numel(self):
        return self.end - self.start


class FlatBuffers:
    """Owns the flat buffers of one model; `order` gives the params of each group in layout order."""

    def __init__(self, groups: List[List[torch.nn.Parameter]], param_dtype, accum_fp32: bool, device):
        self.param_dtype = param_dtype
        self.device = device
        self.accum_fp32 = accum_fp32 and param_dtype != torch.float32
        self.grad_dtype = torch.float32 if self.accum_fp32 else param_dtype
        self._build(groups, copy_from=None)

    def _build(self, groups, copy_from):
        self.groups: List[GroupRange] = []
        self.offsets: Dict[int, tuple] = {}
        pos = 0
        for gi, params in enumerate(groups):
            start = pos
            for p in params:
                self.offsets[id(p)] = (pos, p.numel())
                pos = _align(pos + p.numel())
            self.groups.append(GroupRange(gi, start, pos, list(params)))
        self.numel = pos
        self.params = [p for g in self.groups for p in g.params]
        old = copy_from
        self.param_flat = torch.zeros(pos, dtype=self.param_dtype, device=self.device)
        self.grad_flat = torch.zeros(pos, dtype=self.grad_dtype, device=self.device)
        for p in self.params:
            src = p.detach() if old is None else old.param_view(p)
            self.param_view(p).copy_(src.reshape(-1))
        # fp32 params are their own master weights: the optimizer updates them in place.
        if self.param_dtype == torch.float32:
            self.master_flat = self.param_flat
        else:
            self.master_flat = torch.zeros(pos, dtype=torch.float32, device=self.device)
            for p in self.params:
                src = self.param_view(p) if old is None else old.master_view(p)
                self.master_view(p).copy_(src)
        for p in self.params:
            p.data = self.param_view(p).view_as(p)
            p.grad = None if self.accum_fp32 else self.grad_view(p).view_as(p)

    # views of one parameter's range
    def _slice(self, flat, p):
        off, n = self.offsets[id(p)]
        return flat[off:off + n]

    def param_view(self, p):
        return self._slice(self.param_flat, p)

    def grad_view(self, p):
        return self._slice(self.grad_flat, p)

    def master_view(self, p):
        return self._slice(self.master_flat, p)

    def relayout(self, groups: List[List[torch.nn.Parameter]], state_flats: List[torch.Tensor]):
        """Rebuild the buffers with a new order of params within each group, moving params,
        master weights and the given flat optimizer-state buffers to match. Returns the
        moved state buffers."""
        old = _Snapshot(self)
        moved_state = []
        self._build(groups, copy_from=old)
        for flat in state_flats:
            new = torch.zeros_like(flat)
            for p in self.params:
                off_old, n = old.offsets[id(p)]
                new_view = self._slice(new, p)
                new_view.copy_(flat[off_old:off_old + n])
            moved_state.append(new)
        return moved_state

    def zero_grad(self):
        self.grad_flat.zero_()


class _Snapshot:
    """The old buffers during a relayout."""

    def __init__(self, fb: FlatBuffers):
        self.offsets = dict(fb.offsets)
        self.param_flat, self.master_flat = fb.param_flat, fb.master_flat

    def param_view(self, p):
        off, n = self.offsets[id(p)]
        return self.param_flat[off:off + n]

    def master_view(self, p):
        off, n = self.offsets[id(p)]
        return self.master_flat[off:off + n]


def make_buckets(fb: FlatBuffers, bucket_bytes: float, first_bucket_bytes: float) -> List[Bucket]:
    """Cut the gradient buffer into buckets at parameter boundaries, in layout order: a
    small first bucket, then buckets of about bucket_bytes. Empty when there are no params."""
    buckets, cur, start, size = [], [], 0, 0
    esize = fb.grad_flat.element_size()
    cap = first_bucket_bytes
    for p in fb.params:
        off, n = fb.offsets[id(p)]
        if cur and size + n * esize > cap:
            buckets.append(Bucket(len(buckets), start, off, cur))
            cur, start, size, cap = [], off, 0, bucket_bytes
        cur.append(p)
        size += n * esize
    if cur:
        buckets.append(Bucket(len(buckets), start, fb.numel, cur))
    return buckets
