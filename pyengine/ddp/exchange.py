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

On the CPU the rounds of one collective run on a helper thread, so the host thread goes on
with backward. There are two lanes, each a thread with a point-to-point process group of its
own: collective k goes to lane k % 2, so two buckets are in flight (a bucket's rounds wait on
each other; gloo's send/recv of one bucket alone measured 61-96 ms against 52-74 ms for its
ring at 2 ranks, two in flight 54-70 ms). Every rank issues the same collectives in the same
order, so the lanes carry the same messages in the same order everywhere; the collectives of
a step touch disjoint memory (buckets, their chunk-sum rows), and each lane has its own
scratch. The groups are apart from the engine's other messages, so nothing interleaves. On
CUDA (NCCL) the rounds are queued on the calling stream, one lane.
"""
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
    """A collective running on one lane's helper thread (CPU)."""

    def __init__(self, lane, future, what):
        self._lane, self._future, self._what = lane, future, what

    def wait(self):
        try:
            return self._future.result()
        except CommError:
            raise
        except Exception as exc:
            raise comm_failure(self._what, exc) from exc

    def then(self, callback):
        """callback() after the collective, on the same thread (collectives keep their order)."""
        return _Task(self._lane, self._lane.pool.submit(lambda: (self.wait(), callback())[1]), self._what)


class _Lane:
    """One helper thread, its point-to-point group and its scratch buffers."""

    def __init__(self, base, timeout, threaded, index):
        self.p2p = base.point_to_point(timeout)
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"pyengine-tree{index}") if threaded else None
        self.scratch = {}
        self.rounds = 0
        self.bytes_sent = 0

    def buffer(self, like, n):
        key = (like.dtype, like.device)
        buf = self.scratch.get(key)
        if buf is None or buf.numel() < n:
            buf = self.scratch[key] = torch.empty(max(n, 1), dtype=like.dtype, device=like.device)
        return buf[:n]

    def close(self):
        if self.pool is not None:
            self.pool.shutdown(wait=True)
            self.pool = None
        self.p2p.close()


class TreeComm(Comm):
    """The Comm interface over a base communicator's point-to-point messages, with the fixed
    pairing above. Sums only: deterministic mode scales the loss once by 1/G and never
    averages. Control messages go through the base communicator."""

    name = "tree"

    def __init__(self, base: Comm, device: torch.device, timeout: float):
        self.base = base
        self.rank, self.world_size, self.group = base.rank, base.world_size, base.group
        self.device = device
        cpu = device.type == "cpu"
        self._lanes = [_Lane(base, timeout, cpu, k) for k in range(2 if cpu else 1)]
        self.calls = 0

    @property
    def rounds(self) -> int:
        """Point-to-point rounds so far (tests and the benchmark count them)."""
        return sum(lane.rounds for lane in self._lanes)

    @property
    def bytes_sent(self) -> int:
        return sum(lane.bytes_sent for lane in self._lanes)

    @property
    def control_device(self):
        return self.base.control_device

    @property
    def abort_word(self) -> int:
        """The base communicator's: its abort ends this exchange's messages too."""
        return getattr(self.base, "abort_word", 0)

    def _run(self, fn, what):
        """fn(lane) on the next lane: its thread on the CPU, inline on CUDA."""
        lane = self._lanes[self.calls % len(self._lanes)]
        self.calls += 1
        if lane.pool is None:
            fn(lane)
            return _Done()
        return _Task(lane, lane.pool.submit(fn, lane), what)

    # -- the rounds ------------------------------------------------------------------------------
    def _halving(self, lane, x):
        """Recursive halving over x in place; returns the range this rank keeps."""
        lo, hi = 0, x.numel()
        for peer, k0, k1, s0, s1 in tree_ranges(x.numel(), self.rank, self.world_size):
            got = lane.buffer(x, k1 - k0)
            lane.p2p.exchange(x[s0:s1], got, peer)
            x[k0:k1].add_(got)  # a + b == b + a: the peer adds the same bits into its half
            lane.rounds += 1
            lane.bytes_sent += (s1 - s0) * x.element_size()
            lo, hi = k0, k1
        return lo, hi

    def _doubling(self, lane, x):
        """Recursive doubling: the halving's rounds in reverse, each rank sending what it holds."""
        for peer, k0, k1, s0, s1 in reversed(tree_ranges(x.numel(), self.rank, self.world_size)):
            lane.p2p.exchange(x[k0:k1], x[s0:s1], peer)
            lane.rounds += 1
            lane.bytes_sent += (k1 - k0) * x.element_size()

    # -- the Comm interface ----------------------------------------------------------------------
    def allreduce(self, tensor, average: bool):
        if average:
            raise ValueError("TreeComm: sums only (deterministic mode scales the loss by 1/G instead)")

        def run(lane):
            self._halving(lane, tensor)
            self._doubling(lane, tensor)

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

        def run(lane):
            self._halving(lane, input)
            if output.data_ptr() != mine.data_ptr():
                output.copy_(mine)

        return self._run(run, f"fixed-pairing reduce-scatter of {input.numel()} {_name(input)}")

    def all_gather(self, output, input):
        """Every rank's input into output, rank r's at slice bitrev(r)."""
        mine = self._own_slice(output, input, "all_gather")

        def run(lane):
            if input.data_ptr() != mine.data_ptr():
                mine.copy_(input)
            self._doubling(lane, output)

        return self._run(run, f"fixed-pairing all-gather of {output.numel()} {_name(output)}")

    def broadcast(self, tensor, src: int = 0):
        self.base.broadcast(tensor, src)

    def all_gather_int(self, value: int):
        return self.base.all_gather_int(value)

    def broadcast_ints(self, values, src: int = 0):
        return self.base.broadcast_ints(values, src)

    def close(self):
        for lane in self._lanes:
            lane.close()
        self.base.close()


def _name(t):
    return str(t.dtype).replace("torch.", "")
