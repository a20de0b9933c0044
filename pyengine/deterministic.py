"""EngineConfig(deterministic=True): the same bits at any number of ranks.

Note [one tree at any world size]: a step of G micro-batches (G = grad_accum_steps x d at d
ranks) sums their gradients in ONE fixed binary tree over the micro-batch indices: the range
[0, G) is split at its midpoint, each half again, down to single micro-batches. Rank r runs
micro-batches [r G/d, (r+1) G/d); with d a power of two dividing G those ranges are exactly
the subtrees log2(d) levels below the root, so

  - each rank sums its own subtree as its micro-batches land (MicroTree: a stack of partial
    buffers, one per pending left sibling; the same shape whatever r and d, since a subtree's
    shape depends on its size alone), and
  - the top log2(d) levels are the ranks' exchange (ddp/exchange.py): neighbours first
    (ranks 0+1, 2+3), then ranks two apart, ...: recursive halving, whose every element is
    a + b of the two subtrees below it; a + b == b + a bit for bit, so which rank adds
    does not matter, only the tree's shape, and that is fixed.

The micro-batch gradients themselves are the same bits at every d: the same weights, the same
inputs, the loss multiplied by one factor (loss scale x 1/G) before backward, the same
threads per process (a CPU matmul's bits depend on its thread count), the leaf summed from a
zeroed buffer. So the step's gradient is the same bits at every d, hence the update.

The norm and the non-finite flag (ChunkNorm) are summed over fixed chunks of NORM_CHUNK
elements of each parameter, each chunk in a fixed order (the core's chunk_sumsq), then
the chunks in registration order in a fixed pairwise tree: nothing depends on the buckets,
their rebuild, the shards or d (layout.py, Note [the deterministic layout]). Under ZeRO-1
each rank sums the chunks of its own slices and the chunk sums are allreduced: every chunk
is nonzero on one rank only, and x + 0 is exact.

What it costs: the stack (MicroTree.depth buffers in the accumulation dtype, one fewer than
ceil(log2(G / d)) thanks to Note [landing]; memory_per_param()'s 'tree_partials'), a copy, a
clear and a few adds over the gradients for every other micro-batch (none at 2 a rank),
padding of each parameter to NORM_CHUNK elements, and the exchange's log2(d) rounds per bucket
in place of the backend's ring (the same bytes on the wire). Measured: 0.98-1.05x of the
default step on 2 CPU cores (README, Benchmarks).
"""
from typing import List, Tuple

import torch

from .layout import NORM_CHUNK
from .plan import dtype_code


def is_power_of_two(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


def check_world(world: int, accum: int):
    """The world sizes deterministic mode supports: powers of two (then d divides G = accum x d)."""
    if not is_power_of_two(world):
        raise ValueError(
            f"EngineConfig(deterministic=True): the world size is {world}; the fixed tree over the G micro-batches of "
            f"a step (here G = grad_accum_steps x world_size = {accum * world}) needs each rank's micro-batches to be "
            "one of its subtrees, which holds for world sizes that are powers of two (1, 2, 4, 8, ...). Run on a "
            "power of two ranks, or without deterministic=True")


class MicroTree:
    """The fixed binary tree over m micro-batches (split at the midpoint), summed as the
    leaves land in order. fold(j) lists the operations after leaf j landed in the gradient
    buffer 'G': ('add', dst, src) is dst += src, ('copy', dst, 'G') a push, ('zero', 'G')
    clears the buffer for the next leaf; slots are the stack's indices. The last leaf's
    operations leave the root in G.

    Note [landing]: a leaf whose sibling is the next leaf is left in G, uncleared, and the
    next micro-batch's backward adds onto it (autograd's +=, or the fp32 main-grad hook's):
    that is g_j + g_(j+1), the very bits of the tree's pair, with no copy, clear or add. It
    halves the pushes; with two micro-batches a rank there is no fold and no partial buffer.
    """

    def __init__(self, m: int):
        if m < 1:
            raise ValueError("MicroTree: at least one micro-batch")
        self.m = m
        self._ops: List[List[tuple]] = []
        stack = 0
        depth = 0
        landed = False  # the previous leaf is still in G, and this one was added onto it
        for j in range(m):
            pops = self._pops(j) - (1 if landed else 0)  # the pair is summed already
            landed = self.lands(j)
            ops = []
            if landed:
                pass
            elif j == m - 1:
                assert pops == stack, "internal: the last leaf closes every pending subtree"
                for k in range(stack - 1, -1, -1):
                    ops.append(("add", "G", k))
                stack = 0
            elif pops == 0:
                ops += [("copy", stack, "G"), ("zero", "G")]
                stack += 1
            else:
                top = stack - 1
                ops.append(("add", top, "G"))
                for k in range(top - 1, top - pops, -1):
                    ops.append(("add", k, k + 1))
                ops.append(("zero", "G"))
                stack = stack - pops + 1
            depth = max(depth, stack)
            self._ops.append(ops)
        self.depth = depth  # stack buffers needed

    def lands(self, j: int) -> bool:
        """Leaf j is the left child of a pair of leaves (Note [landing])."""
        lo, hi = 0, self.m
        while hi - lo > 2:
            mid = lo + (hi - lo) // 2
            lo, hi = (lo, mid) if j < mid else (mid, hi)
        return hi - lo == 2 and j == lo

    def _pops(self, j: int) -> int:
        """How many finished left siblings leaf j's node absorbs on its way up: the levels at
        which it is (or becomes) a right child whose subtree ends at j."""
        lo, hi, path = 0, self.m, []
        while hi - lo > 1:  # the path from the root to leaf j: is the child a right child?
            mid = lo + (hi - lo) // 2
            if j < mid:
                path.append((False, hi))
                hi = mid
            else:
                path.append((True, hi))
                lo = mid
        pops = 0
        for right, end in reversed(path):  # bottom up: a right child that ends at j absorbs its sibling
            if not right or end - 1 != j:
                break
            pops += 1
        return pops

    def fold(self, j: int) -> List[tuple]:
        return self._ops[j]

    def shape(self, lo: int = 0, hi: int = None):
        """The tree as nested pairs of leaf indices (for tests and documentation)."""
        hi = self.m if hi is None else hi
        if hi - lo == 1:
            return lo
        mid = lo + (hi - lo) // 2
        return (self.shape(lo, mid), self.shape(mid, hi))


class TreeAccumulator:
    """The stack of partial sums of one rank's micro-batch tree, over the flat gradient buffer."""

    def __init__(self, m: int, grad_flat: torch.Tensor):
        self.tree = MicroTree(m)
        self.allocate(grad_flat)

    def allocate(self, grad_flat: torch.Tensor):
        """Buffers for (a new layout of) the gradient buffer; the stack is empty at a boundary."""
        self.grad = grad_flat
        self.slots = [torch.zeros_like(grad_flat) for _ in range(self.tree.depth)]

    @property
    def bytes_per_element(self) -> int:
        return self.tree.depth * self.grad.element_size()

    def _run(self, ops, start: int, end: int):
        def buf(x):
            return (self.grad if x == "G" else self.slots[x])[start:end]

        for op, dst, *src in ops:
            if op == "add":
                buf(dst).add_(buf(src[0]))
            elif op == "copy":
                buf(dst).copy_(buf(src[0]))
            else:
                buf(dst).zero_()

    def fold_micro(self, j: int):
        """Leaf j (not the last) landed in the gradient buffer: fold it in and clear the
        buffer, or leave it there for the next micro-batch to add onto (Note [landing])."""
        self._run(self.tree.fold(j), 0, self.grad.numel())

    def fold_last(self, start: int, end: int):
        """The last leaf landed in [start, end) of the gradient buffer: the subtree's root there."""
        self._run(self.tree.fold(self.tree.m - 1), start, end)

    def clear(self, views):
        """A user cleared gradients (zero_grad): the partial sums of those elements go too."""
        for s in self.slots:
            for start, end in views:
                s[start:end].zero_()


class ChunkNorm:
    """The sum of squares and the non-finite flag of the unscaled gradients, over fixed chunks
    of each parameter (see Note [one tree at any world size])."""

    def __init__(self, mod, layout, grad: torch.Tensor, scalars, comm=None):
        self.mod, self.grad, self.scalars = mod, grad, scalars
        self.comm = comm  # ZeRO-1: the chunk sums of the ranks' slices are allreduced
        rows: List[int] = []
        for i in range(len(layout.numels)):  # registration order
            s = layout.slots[i]
            first = s.offset // NORM_CHUNK
            rows.extend(range(first, first + (s.numel + NORM_CHUNK - 1) // NORM_CHUNK))
        self.order = torch.tensor(rows, dtype=torch.int64, device=grad.device)
        self.sums = torch.zeros(layout.numel // NORM_CHUNK, dtype=torch.float64, device=grad.device)
        self._inv = scalars.ptr("inv_scale")
        self._gp, self._gd, self._es = grad.data_ptr(), dtype_code(grad), grad.element_size()

    def add_range(self, start: int, end: int, stream: int = 0):
        """The chunk sums of flat range [start, end) (multiples of NORM_CHUNK)."""
        rows = (end - start) // NORM_CHUNK
        if rows:
            self.mod.chunk_sumsq(self._gp + start * self._es, self._gd, rows, NORM_CHUNK, self._inv,
                                 self.sums.data_ptr() + (start // NORM_CHUNK) * 8, stream)

    def finish(self):
        """sumsq and found_inf into the step's scalars (device ops, no host sync)."""
        if self.comm is not None:
            self.comm.allreduce(self.sums, average=False).wait()
        total = pairwise_sum(self.sums.index_select(0, self.order))
        self.scalars.sumsq.copy_(total.reshape(1))
        self.scalars.found_inf.copy_((~torch.isfinite(total)).reshape(1))
        if self.comm is not None:
            self.sums.zero_()  # each rank writes only its own rows next step


def pairwise_sum(x: torch.Tensor) -> torch.Tensor:
    """A fixed pairwise tree: (x0 + x1), (x2 + x3), ... level by level, an odd last element
    carried up. Elementwise adds only, so the order never depends on threads or devices."""
    while x.numel() > 1:
        n = x.numel()
        pairs = x[0:n - 1:2] + x[1:n:2]
        x = torch.cat([pairs, x[n - 1:]]) if n % 2 else pairs
    return x.reshape(()) if x.numel() else torch.zeros((), dtype=x.dtype, device=x.device)


def tree_ranges(n: int, rank: int, world: int) -> List[Tuple[int, int, int, int]]:
    """The fixed-pairing exchange over n elements: per round (peer, kept start, kept end,
    sent start, sent end), bottom-up: round k pairs rank with rank ^ 2^k; the rank whose bit k is
    0 keeps the lower half of the current range. After all rounds rank keeps the range of
    slice bitrev(rank) when n is a multiple of world."""
    out = []
    lo, hi, bit = 0, n, 1
    while bit < world:
        mid = lo + (hi - lo) // 2
        peer = rank ^ bit
        if rank & bit:
            out.append((peer, mid, hi, lo, mid))
            lo = mid
        else:
            out.append((peer, lo, mid, mid, hi))
            hi = mid
        bit <<= 1
    return out
