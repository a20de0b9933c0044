"""Where every trainable parameter lives in the flat buffers: pure arithmetic, no tensors.

Note: the static layout (which parameter sits where, which group, bucket and rank owns which
range) is built once and kept apart from the per-iteration state (which gradients are
ready), as in Megatron-core's buffers. Parameters are named by their index in the model's
registration order (the "canonical" order, which checkpoints use); the layout lists them in
buffer order. Everything here is a pure function of sizes and orders, so it is tested
without a process group or a tensor.

Note [buckets and shards]: the buffers are laid out group by group; within a group the
parameters are cut into communication buckets at parameter boundaries (a small first
bucket, then buckets of about bucket_elems), so a bucket never spans two groups and one
optimizer pass with one group's hyper-parameters can run over any part of it. With sharded
optimizer state (ZeRO-1 over `shard_world` ranks) every bucket is padded to a multiple of
shard_world x ALIGN and rank r owns the r-th of its shard_world equal slices: the bucket is
reduce-scattered to those slices and all-gathered from them. Rank r's master weights and
optimizer state are its slices of all buckets, one after another: a contiguous buffer of
numel / shard_world elements.

Note [the deterministic layout]: with EngineConfig(deterministic=True) every parameter starts
at a multiple of NORM_CHUNK elements (and buckets pad to NORM_CHUNK x shard_world), so the
buffers are a sequence of NORM_CHUNK-element chunks that each lie inside one parameter and
one rank's slice, whatever the buckets, their rebuild or the number of ranks: the norm is
summed over those chunks (deterministic.py). And rank r owns slice bitrev(r) of each bucket,
the slice the fixed-pairing exchange leaves it (neighbours pair first, then ranks two apart).
"""
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

# Note: every parameter starts at a multiple of ALIGN elements (64 B in fp32, 32 B in half),
# so every group, bucket and shard range can use 16-byte vector loads on the GPU and aligned
# SIMD on the CPU. The padding holds zeros in every buffer; a zero gradient leaves it zero
# through every optimizer, at < ALIGN elements a param (and < shard_world x ALIGN a bucket).
ALIGN = 16
NORM_CHUNK = 512  # elements per norm chunk of the deterministic layout (2 KiB in fp32)


def align_up(n: int, to: int = ALIGN) -> int:
    return (n + to - 1) // to * to


def bit_reverse(r: int, world: int) -> int:
    """r's log2(world) bits in reverse order (world a power of two)."""
    out, bit = 0, 1
    while bit < world:
        out = (out << 1) | (1 if r & bit else 0)
        bit <<= 1
    return out


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
    group: int = 0

    @property
    def numel(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class Owned:
    """The slice of one bucket a rank owns under sharding."""
    bucket: int
    group: int
    start: int  # in the flat buffers
    end: int
    local: int  # where it starts in the rank's shard buffers

    @property
    def numel(self) -> int:
        return self.end - self.start


class Layout:
    """The flat-buffer layout of one model.

    numels[i] is the element count of canonical parameter i; groups[g] lists the canonical
    indices of param group g in the order they are laid out. bucket_elems None: one bucket
    per group. See Note [buckets and shards].
    """

    def __init__(self, numels: Sequence[int], groups: Sequence[Sequence[int]], bucket_elems: Optional[int] = None,
                 first_bucket_elems: Optional[int] = None, shard_world: int = 1, deterministic: bool = False):
        seen = sorted(i for g in groups for i in g)
        if seen != list(range(len(numels))):
            raise ValueError("Layout: every parameter must be in exactly one group")
        if shard_world < 1:
            raise ValueError("Layout: shard_world must be >= 1")
        self.numels = tuple(int(n) for n in numels)
        self.bucket_elems, self.first_bucket_elems, self.shard_world = bucket_elems, first_bucket_elems, shard_world
        self.deterministic = deterministic
        if deterministic and shard_world & (shard_world - 1):
            raise ValueError("Layout: a deterministic layout shards over a power of two ranks")
        align = self.align = NORM_CHUNK if deterministic else ALIGN
        pad = align * shard_world
        slots = [None] * len(numels)
        spans, buckets, pos = [], [], 0
        cap = first_bucket_elems or bucket_elems
        for gi, members in enumerate(groups):
            start, cur, bstart, size = pos, [], pos, 0
            for i in members:
                n = self.numels[i]
                if cur and cap is not None and size + n > cap:
                    pos = align_up(pos, pad)
                    buckets.append(Span(len(buckets), bstart, pos, tuple(cur), gi))
                    cur, bstart, size, cap = [], pos, 0, bucket_elems
                slots[i] = Slot(i, gi, pos, n)
                pos = align_up(pos + n, align)
                size += n
                cur.append(i)
            if cur:
                pos = align_up(pos, pad)
                buckets.append(Span(len(buckets), bstart, pos, tuple(cur), gi))
                if cap == first_bucket_elems:
                    cap = bucket_elems
            spans.append(Span(gi, start, pos, tuple(members), gi))
        self.slots: Tuple[Slot, ...] = tuple(slots)
        self.groups: Tuple[Span, ...] = tuple(spans)
        self.buckets: Tuple[Span, ...] = tuple(buckets)
        self.numel = pos
        self.order: Tuple[int, ...] = tuple(i for g in spans for i in g.members)

    # -- sharding ----------------------------------------------------------------------------
    @property
    def shard_numel(self) -> int:
        """Elements of each rank's shard buffers."""
        return self.numel // self.shard_world

    def slice_of(self, rank: int) -> int:
        """Which of a bucket's shard_world slices rank owns: its own index, or, in the
        deterministic layout, its bit reversal (Note [the deterministic layout])."""
        return bit_reverse(rank, self.shard_world) if self.deterministic else rank

    def owned(self, rank: int) -> List[Owned]:
        """The bucket slices rank owns, in bucket order (their local offsets follow one another)."""
        out, local = [], 0
        at = self.slice_of(rank)
        for b in self.buckets:
            chunk = b.numel // self.shard_world
            start = b.start + at * chunk
            out.append(Owned(b.index, b.group, start, start + chunk, local))
            local += chunk
        return out

    def segments(self, start: int, end: int) -> List[Tuple[int, int, int, int]]:
        """The parameters' elements within flat range [start, end), padding left out:
        (canonical index, offset within the parameter, flat offset, length) per piece."""
        out = []
        for i in self.order:
            s = self.slots[i]
            lo, hi = max(s.offset, start), min(s.end, end)
            if lo < hi:
                out.append((i, lo - s.offset, lo, hi - lo))
        return out

    def reordered(self, ready_order: Sequence[int]) -> "Layout":
        """The same groups with their members in the observed gradient-ready order, so the
        buckets that backward fills first come first (PyTorch DDP's rebuild). Parameters
        absent from ready_order keep their relative order, after the others."""
        rank = {i: k for k, i in enumerate(ready_order)}
        late = len(rank)
        groups = [sorted(g.members, key=lambda i: rank.get(i, late)) for g in self.groups]
        return Layout(self.numels, groups, self.bucket_elems, self.first_bucket_elems, self.shard_world,
                      self.deterministic)

    def __eq__(self, other):
        return isinstance(other, Layout) and (self.slots, self.buckets) == (other.slots, other.buckets)

    def __repr__(self):
        return (f"Layout({len(self.slots)} params, {len(self.groups)} groups, {len(self.buckets)} buckets, "
                f"{self.numel} elements, sharded over {self.shard_world})")
