"""The small interface the Engine needs from a communicator."""
import abc

import torch
import torch.distributed as dist


class CommError(RuntimeError):
    """A collective failed: a peer rank died, raised, or the collective timed out."""


def comm_failure(what, exc):
    return CommError(
        f"pyengine: {what} failed on rank {dist.get_rank()}: {exc}. A peer rank probably died, raised "
        "or stalled past comm_timeout; the job cannot continue (check the other ranks' errors)")


class Comm(abc.ABC):
    """Gradient collectives (allreduce) plus small control messages.

    allreduce returns a handle with wait() (and, on CPU, then(callback)); average=True
    averages over the ranks, otherwise sums.

    Note: control messages (start-up agreement, layout order, initial weights) always travel
    through the torch.distributed process group, whichever implementation moves gradients,
    so they live here once; `control_device` is where that group wants its tensors.
    """

    rank: int
    world_size: int
    name: str
    group = None
    abort_word = 0  # device address of an int32 that turns 1 before the communicator aborts; 0: none

    @abc.abstractmethod
    def allreduce(self, tensor, average: bool):
        """Starts an in-place allreduce of tensor; returns a handle with wait()."""

    @abc.abstractmethod
    def reduce_scatter(self, output, input, average: bool):
        """Starts a reduce-scatter of input (world_size x output elements) into output, which
        may be input's own rank-th slice; returns a handle with wait()."""

    @abc.abstractmethod
    def all_gather(self, output, input):
        """Starts an all-gather of input into output (world_size x input elements); input may
        be output's own rank-th slice; returns a handle with wait()."""

    @property
    @abc.abstractmethod
    def control_device(self) -> torch.device:
        """The device of the process group's tensors (cuda for nccl, cpu for gloo)."""

    def broadcast(self, tensor, src: int = 0):
        """Copies src's tensor to every rank (blocking)."""
        try:
            dist.broadcast(tensor, src=src, group=self.group)
        except Exception as exc:
            raise comm_failure("broadcast", exc) from exc

    def all_gather_int(self, value: int):
        """Every rank's value, as a list indexed by rank."""
        t = torch.tensor([value], dtype=torch.int64, device=self.control_device)
        out = [torch.zeros_like(t) for _ in range(self.world_size)]
        try:
            dist.all_gather(out, t, group=self.group)
        except Exception as exc:
            raise comm_failure("all_gather", exc) from exc
        return [int(x.item()) for x in out]

    def broadcast_ints(self, values, src: int = 0):
        """src's list of ints on every rank (lengths may differ before the call)."""
        n = torch.tensor([len(values)], dtype=torch.int64, device=self.control_device)
        self.broadcast(n, src)
        t = torch.zeros(int(n), dtype=torch.int64, device=self.control_device)
        if self.rank == src:
            t.copy_(torch.tensor(list(values), dtype=torch.int64))
        self.broadcast(t, src)
        return t.cpu().tolist()

    def point_to_point(self, timeout: float):
        """A PointToPoint over this communicator's ranks (deterministic mode's exchange)."""
        raise NotImplementedError(f"the {self.name} communicator has no point-to-point messages")

    def close(self):  # noqa: B027  (optional hook: most communicators hold nothing to release)
        """Releases the communicator's resources, if it holds any."""
