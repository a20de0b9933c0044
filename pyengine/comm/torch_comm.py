"""TorchComm: the Comm interface over any torch.distributed backend (gloo on CPU, nccl)."""
import torch
import torch.distributed as dist

from .base import Comm, comm_failure


class Work:
    """An asynchronous collective; wait() raises CommError instead of hanging or crashing."""

    def __init__(self, work, what):
        self._work = work
        self._what = what

    def then(self, callback):
        """Runs callback() when the collective completes, on the communication thread (CPU)."""
        fut = self._work.get_future()
        return fut.then(lambda f: (f.value(), callback())[1])

    def wait(self):
        try:
            self._work.wait()
        except Exception as exc:  # gloo/NCCL raise RuntimeError or DistBackendError
            raise comm_failure(self._what, exc) from exc


class TorchComm(Comm):
    name = "torch"

    def __init__(self, group=None):
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.backend = dist.get_backend(group)
        # Note: gloo in torch 2.13 averages fp32/fp16/bf16 (ReduceOp.AVG); the Engine still
        # predivides fp16 itself, so sums of large gradients cannot overflow on the wire.
        self._avg = hasattr(dist.ReduceOp, "AVG")
        self.calls = 0  # collectives issued (tests count them)

    def allreduce(self, tensor, average: bool):
        self.calls += 1
        op = dist.ReduceOp.AVG if (average and self._avg) else dist.ReduceOp.SUM
        work = dist.all_reduce(tensor, op=op, group=self.group, async_op=True)
        if average and not self._avg:
            work.wait()
            tensor.div_(self.world_size)
        return Work(work, f"allreduce of {tensor.numel()} {str(tensor.dtype).replace('torch.', '')}")

    @property
    def control_device(self):
        if self.backend == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")
