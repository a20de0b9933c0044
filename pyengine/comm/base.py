"""The small interface the Engine needs from a communicator."""
import abc


class CommError(RuntimeError):
    """A collective failed: a peer rank died, raised, or the collective timed out."""


class Comm(abc.ABC):
    """allreduce / broadcast / all-gather of control values over flat tensors.

    allreduce returns a handle with wait() (and, on CPU, then(callback)); average=True
    averages over the ranks, otherwise sums.
    """

    rank: int
    world_size: int
    name: str

    @abc.abstractmethod
    def allreduce(self, tensor, average: bool):
        """Starts an in-place allreduce of tensor; returns a handle with wait()."""

    @abc.abstractmethod
    def broadcast(self, tensor, src: int = 0):
        """Copies src's tensor to every rank (blocking)."""

    @abc.abstractmethod
    def all_gather_int(self, value: int):
        """Every rank's value, as a list indexed by rank."""

    def close(self):  # noqa: B027  (optional hook: most communicators hold nothing to release)
        """Releases the communicator's resources, if it holds any."""
