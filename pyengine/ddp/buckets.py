"""Which buckets may start communicating, from which gradients have landed: pure bookkeeping.

Note: buckets launch strictly in index order, the same on every rank, so collectives match
across ranks even when gradients land in a different order on each. A bucket launches when
its last gradient has landed and every bucket before it has launched. The first armed
iteration also records the order in which gradients land, from which the layout is rebuilt
once (layout.Layout.reordered), as PyTorch DDP does.
"""
from typing import List, Optional, Sequence


class BucketTracker:
    """members[k]: the parameters (canonical indices) of bucket k."""

    def __init__(self, members: Sequence[Sequence[int]], record_order: bool):
        self.members = [tuple(m) for m in members]
        self.bucket_of = {i: k for k, m in enumerate(self.members) for i in m}
        self.recording = record_order
        self.ready_order: List[int] = []
        self.armed = False
        self.pending: List[int] = []
        self.ready = set()
        self.next_launch = 0

    def arm(self):
        """Start of the backward that communicates (the last micro-batch of the window)."""
        if self.armed:
            raise RuntimeError(
                "Engine.backward was called twice on the micro-batch that communicates (the last of the "
                "accumulation window) without engine.step() in between; sum the losses and call backward once "
                "per micro-batch")
        self.armed = True
        self.pending = [len(m) for m in self.members]
        self.ready = set()
        self.next_launch = 0

    def disarm(self):
        self.armed = False

    def mark_ready(self, i: int) -> List[int]:
        """Parameter i's gradient landed; returns the buckets that may launch now, in order."""
        if i in self.ready:
            raise ValueError(i)
        self.ready.add(i)
        if self.recording:
            self.ready_order.append(i)
        self.pending[self.bucket_of[i]] -= 1
        return self._launchable()

    def missing(self) -> List[int]:
        """Parameters whose gradient has not landed (in bucket order)."""
        return [i for m in self.members for i in m if i not in self.ready]

    def mark_missing_ready(self) -> List[int]:
        """End of backward: parameters that got no gradient count as ready (their gradient
        stays zero); returns the buckets that may launch now."""
        launch = []
        for i in self.missing():
            launch += self.mark_ready(i)
        return launch + self._launchable()

    @property
    def all_launched(self) -> bool:
        return self.next_launch == len(self.members)

    def take_ready_order(self) -> Optional[List[int]]:
        """The recorded gradient-ready order, once, after the first armed iteration."""
        if not self.recording or not self.ready_order or self.armed:
            return None
        self.recording = False
        order, self.ready_order = self.ready_order, []
        return order

    def _launchable(self) -> List[int]:
        out = []
        while self.next_launch < len(self.members) and self.pending[self.next_launch] == 0:
            out.append(self.next_launch)
            self.next_launch += 1
        return out
