"""Where every trainable parameter lives in the flat buffers: pure arithmetic, no tensors.

Note: the static layout (which parameter sits where, which group and bucket owns which
range) is built once and kept apart from the per-iteration state (which gradients are
ready), as in Megatron-core's buffers. Parameters are named by their index in the model's
registration order (the "canonical" order, which checkpoints use); the layout lists them in
buffer order. Everything here is a pure function of sizes and orders, so it is tested
without a process group or a tensor.
"""
from dataclasses import dataclass
from typing import List, Sequence, Tuple

# Note: every parameter starts at a multiple of ALIGN elements (64 B in fp32, 32 B in half),
# so every group and bucket range, which begin at parameter boundaries, can use 16-byte
# vector loads on the GPU and aligned SIMD on the CPU. The padding holds zeros in every
# buffer; a zero gradient leaves it zero through every optimizer, at < ALIGN elements a param.
ALIGN = 16


def align_up(n: int, to: int = ALIGN) -> int:
    return (n + to - 1) // to * to


@dataclass(frozen=True)
class Slot:
    """One parameter's range of the flat buffers."""
    index: int  # canonical index (registration order)
    group: int
    offset: int
    numel: int

    @property
    def end(self) -> int:
        return self.offset + self.numel


@dataclass(frozen=True)
class Span:
    """A contiguous range of the flat buffers and the parameters in it (canonical indices, in
    buffer order). A param group's span, or a bucket's."""
    index: int
    start: int
    end: int
    members: Tuple[int, ...]

    @property
    def numel(self) -> int:
        return self.end - self.start


class Layout:
    """The flat-buffer layout of one model.

    numels[i] is the element count of canonical parameter i; groups[g] lists the canonical
    indices of param group g in the order they are laid out. Groups follow one another;
    every parameter starts ALIGN-aligned.
    """

    def __init__(self, numels: Sequence[int], groups: Sequence[Sequence[int]]):
        seen = sorted(i for g in groups for i in g)
        if seen != list(range(len(numels))):
            raise ValueError("Layout: every parameter must be in exactly one group")
        self.numels = tuple(int(n) for n in numels)
        slots = [None] * len(numels)
        spans, pos = [], 0
        for gi, members in enumerate(groups):
            start = pos
            for i in members:
                slots[i] = Slot(i, gi, pos, self.numels[i])
                pos = align_up(pos + self.numels[i])
            spans.append(Span(gi, start, pos, tuple(members)))
        self.slots: Tuple[Slot, ...] = tuple(slots)
        self.groups: Tuple[Span, ...] = tuple(spans)
        self.numel = pos
        self.order: Tuple[int, ...] = tuple(i for g in spans for i in g.members)

    def buckets(self, elem_bytes: int, bucket_bytes: float, first_bucket_bytes: float) -> List[Span]:
        """Cut the buffers into communication buckets at parameter boundaries, in buffer order:
        a small first bucket (communication starts early), then buckets of about bucket_bytes.
        Together the buckets cover [0, numel) without gaps (padding included)."""
        out, cur, start, size, cap = [], [], 0, 0, first_bucket_bytes
        for i in self.order:
            s = self.slots[i]
            if cur and size + s.numel * elem_bytes > cap:
                out.append(Span(len(out), start, s.offset, tuple(cur)))
                cur, start, size, cap = [], s.offset, 0, bucket_bytes
            cur.append(i)
            size += s.numel * elem_bytes
        if cur:
            out.append(Span(len(out), start, self.numel, tuple(cur)))
        return out

    def reordered(self, ready_order: Sequence[int]) -> "Layout":
        """The same groups with their members in the observed gradient-ready order, so the
        buckets that backward fills first come first (PyTorch DDP's rebuild). Parameters
        absent from ready_order keep their relative order, after the others."""
        rank = {i: k for k, i in enumerate(ready_order)}
        late = len(rank)
        groups = [sorted(g.members, key=lambda i: rank.get(i, late)) for g in self.groups]
        return Layout(self.numels, groups)

    def __eq__(self, other):
        return isinstance(other, Layout) and self.slots == other.slots

    def __repr__(self):
        return f"Layout({len(self.slots)} params, {len(self.groups)} groups, {self.numel} elements)"
