"""The ranks' fixed-pairing exchange of EngineConfig(deterministic=True).

Note: a ring (gloo's, NCCL's) adds the ranks' values in an order that depends on the number
of ranks and on which chunk of the ring an element falls in. Here each collective is built
from point-to-point rounds whose pairing is fixed (deterministic.py, Note [one tree at any
world size]):

  reduce-scatter, recursive halving: round k pairs rank r with r ^ 2^k; each keeps one half
      of its current range (bit k of r says which), sends the other, adds what it receives;
      after log2(d) rounds rank r holds slice bitrev(r), summed as ((R0 + R1) + (R2 + R3))...
  all-gather, recursive doubling: the rounds in reverse, each sending what it holds.

Each round moves half the bytes of the one before: (d - 1) / d of the buffer per phase, the
same bytes on the wire as a ring, in log2(d) rounds instead of d - 1.

On the CPU the rounds of one collective run on one helper thread, collectives in the order
they were issued (the same order on every rank), so the host thread goes on with backward;
the point-to-point messages travel in a process group of their own, so they never interleave
with the collectives the engine's other messages use. On CUDA (NCCL) the rounds are queued
on the calling stream.
"""
import threading
from concurrent.futures import ThreadPoolExecutor

import torch

from ..comm.base import Comm, CommError, comm_failure
from ..deterministic import tree_ranges
from ..layout import bit_reverse


class _Done:
    """A collective already queued on the stream (CUDA): wait() has nothing to wait for."""

    def wait(self):
        return None

    def then(self, callback):
        callback()
        return self


class _Task:
    """A collective running on the exchange's helper thread (CPU)."""

    def __init__(self, exchange, future, what):
        self._exchange, self._future, self._what = exchange, future, what

    def wait(self):
        try:
            return self._future.result()
        except CommError:
            raise
        except Exception as exc:
            raise comm_failure(self._what, exc) from exc

    def then(self, callback):
        """callback() after the collective, on the same thread (collectives keep their order)."""
        return _Task(self._exchange, self._exchange._submit(lambda: (self.wait(), callback())[1]), self._what)


class TreeComm(Comm):
    """The Comm interface over a base communicator's point-to-point messages, with the fixed
    pairing above. Sums only: deterministic mode scales the loss once by 1/G and never
    averages. Control messages go through the base communicator."""

    name = "tree"

    def __init__(self, base: Comm, device: torch.device, timeout: float):
        self.base = base
        self.rank, self.world_size, self.group = base.rank, base.world_size, base.group
        self.device = device
        self._p2p = base.point_to_point(timeout)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pyengine-tree") \
            if device.type == "cpu" else None
        self._scratch = {}
        self._lock = threading.Lock()
        self.calls = 0
        self.rounds = 0  # point-to-point rounds (tests count them)
        self.bytes_sent = 0

    @property
    def control_device(self):
        return self.base.control_device

    def _submit(self, fn):
        return self._pool.submit(fn)

    def _run(self, fn, what):
        self.calls += 1
        if self._pool is None:
            fn()
            return _Done()
        return _Task(self, self._submit(fn), what)

    # -- the rounds ------------------------------------------------------------------------------
    def _buffer(self, like, n):
        key = (like.dtype, like.device)
        buf = self._scratch.get(key)
        if buf is None or buf.numel() < n:
            buf = self._scratch[key] = torch.empty(max(n, 1), dtype=like.dtype, device=like.device)
        return buf[:n]

    def _halving(self, x):
        """Recursive halving over x in place; returns the range this rank keeps."""
        lo, hi = 0, x.numel()
        for peer, k0, k1, s0, s1 in tree_ranges(x.numel(), self.rank, self.world_size):
            got = self._buffer(x, k1 - k0)
            self._p2p.exchange(x[s0:s1], got, peer)
            x[k0:k1].add_(got)  # a + b == b + a: the peer adds the same bits into its half
            self.rounds += 1
            self.bytes_sent += (s1 - s0) * x.element_size()
            lo, hi = k0, k1
        return lo, hi

    def _doubling(self, x):
        """Recursive doubling: the halving's rounds in reverse, each rank sending what it holds."""
        for peer, k0, k1, s0, s1 in reversed(tree_ranges(x.numel(), self.rank, self.world_size)):
            self._p2p.exchange(x[k0:k1], x[s0:s1], peer)
            self.rounds += 1
            self.bytes_sent += (k1 - k0) * x.element_size()

    # -- the Comm interface ----------------------------------------------------------------------
    def allreduce(self, tensor, average: bool):
        if average:
            raise ValueError("TreeComm: sums only (deterministic mode scales the loss by 1/G instead)")

        def run():
            self._halving(tensor)
            self._doubling(tensor)

        return self._run(run, f"fixed-pairing allreduce of {tensor.numel()} {_name(tensor)}")

    def _own_slice(self, whole, part, op):
        n = part.numel()
        if whole.numel() != n * self.world_size:
            raise ValueError(f"TreeComm.{op}: the whole tensor must hold world_size x {n} elements")
        return whole[bit_reverse(self.rank, self.world_size) * n:][:n]

    def reduce_scatter(self, output, input, average: bool):
        """input's sum over the ranks; this rank keeps slice bitrev(rank), which output must be
        (the deterministic layout's ownership, layout.py)."""
        if average:
            raise ValueError("TreeComm: sums only (deterministic mode scales the loss by 1/G instead)")
        mine = self._own_slice(input, output, "reduce_scatter")

        def run():
            self._halving(input)
            if output.data_ptr() != mine.data_ptr():
                output.copy_(mine)

        return self._run(run, f"fixed-pairing reduce-scatter of {input.numel()} {_name(input)}")

    def all_gather(self, output, input):
        """Every rank's input into output, rank r's at slice bitrev(r)."""
        mine = self._own_slice(output, input, "all_gather")

        def run():
            if input.data_ptr() != mine.data_ptr():
                mine.copy_(input)
            self._doubling(output)

        return self._run(run, f"fixed-pairing all-gather of {output.numel()} {_name(output)}")

    def broadcast(self, tensor, src: int = 0):
        self.base.broadcast(tensor, src)

    def all_gather_int(self, value: int):
        return self.base.all_gather_int(value)

    def broadcast_ints(self, values, src: int = 0):
        return self.base.broadcast_ints(values, src)

    def close(self):
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        self._p2p.close()
        self.base.close()


def _name(t):
    return str(t.dtype).replace("torch.", "")
