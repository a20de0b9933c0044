"""The small interface the Engine needs from a communicator."""


class CommError(RuntimeError):
    """A collective failed: a peer rank died, raised, or the collective timed out."""


class Comm:
    """allreduce / broadcast / reduce-scatter / all-gather over flat tensors.

    allreduce returns a handle with wait() (and, on CPU, then(callback)); average=True
    averages over the ranks, otherwise sums.
    """

    rank: int
    world_size: int
    name: str

    def allreduce(self, tensor, average: bool):
        raise NotImplementedError

    def broadcast(self, tensor, src: int = 0):
        raise NotImplementedError

    def all_gather_int(self, value: int):
        raise NotImplementedError

    def close(self):
        pass
