"""TorchComm: the Comm interface over any torch.distributed backend (gloo on CPU, nccl)."""
import datetime
import threading

import torch
import torch.distributed as dist

from .base import Comm, comm_failure


# torch 2.13 renamed the single-tensor collectives; older releases have only the old names
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


_HELPER = None


def _helper():
    """One thread that waits for collectives without futures, in the order they were issued."""
    global _HELPER
    if _HELPER is None:
        from concurrent.futures import ThreadPoolExecutor

        _HELPER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pyengine-comm")
    return _HELPER


class _Waiter:
    def __init__(self, future):
        self._future = future

    def wait(self):
        return self._future.result()


class _KeepSlice:
    """An allreduce that finishes as a reduce-scatter: finish() (keep this rank's slice) runs
    once, on whichever of wait() and the completion future comes first."""

    def __init__(self, work, finish):
        self._work, self._finish = work, finish
        self._lock = threading.Lock()
        self._done = False

    def _finish_once(self):
        with self._lock:
            if not self._done:
                self._done = True
                self._finish()

    def get_future(self):
        return self._work.get_future().then(lambda f: (f.value(), self._finish_once())[1])

    def wait(self):
        self._work.wait()
        self._finish_once()


class Work:
    """An asynchronous collective; wait() raises CommError instead of hanging or crashing."""

    def __init__(self, work, what):
        self._work = work
        self._what = what

    def then(self, callback):
        """Runs callback() when the collective completes, off the calling thread (CPU); returns
        a handle with wait(). Note: gloo gives an allreduce a future to chain on, but not a
        reduce-scatter; that one is waited for on a helper thread instead."""
        try:
            fut = self._work.get_future()
        except RuntimeError:
            return _Waiter(_helper().submit(lambda: (self._work.wait(), callback())))
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

    def reduce_scatter(self, output, input, average: bool):
        self.calls += 1
        op = dist.ReduceOp.AVG if (average and self._avg) else dist.ReduceOp.SUM
        if self.backend == "gloo":
            return self._reduce_scatter_by_allreduce(output, input, op, average)
        work = _reduce_scatter(output, input, op=op, group=self.group, async_op=True)
        if average and not self._avg:
            work.wait()
            output.div_(self.world_size)
        return Work(work, f"reduce-scatter of {input.numel()} {str(input.dtype).replace('torch.', '')}")

    def all_gather(self, output, input):
        self.calls += 1
        if self.backend == "gloo" and input.is_cuda:  # gloo gathers CUDA tensors into a list only
            work = dist.all_gather(list(output.chunk(self.world_size)), input, group=self.group, async_op=True)
        else:
            work = _all_gather(output, input, group=self.group, async_op=True)
        return Work(work, f"all-gather of {output.numel()} {str(output.dtype).replace('torch.', '')}")

    def _reduce_scatter_by_allreduce(self, output, input, op, average):
        """Note: gloo's reduce-scatter is slower than its allreduce of the whole input (2 ranks
        on loopback, 16 MB fp32: 21.9 ms against 13.3 ms) and takes CPU tensors only, while its
        allreduce moves CUDA tensors too. Under gloo each rank therefore allreduces the bucket
        in place and keeps its slice: the same sums, faster, and no extra buffer (the bucket is
        the wire buffer). NCCL keeps its true reduce-scatter."""
        work = dist.all_reduce(input, op=op, group=self.group, async_op=True)
        n = output.numel()
        mine = input[self.rank * n:(self.rank + 1) * n]

        def finish():
            if average and not self._avg:
                mine.div_(self.world_size)
            if output.data_ptr() != mine.data_ptr():
                output.copy_(mine)

        return Work(_KeepSlice(work, finish), f"reduce-scatter of {input.numel()} "
                    f"{str(input.dtype).replace('torch.', '')}")

    def point_to_point(self, timeout: float):
        return TorchPointToPoint(self, timeout)

    @property
    def control_device(self):
        if self.backend == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")


class TorchPointToPoint:
    """Paired send/receive over a process group of its own (created here, on every rank at
    once), so its messages never interleave with the engine's collectives."""

    def __init__(self, comm: TorchComm, timeout: float):
        self.backend = comm.backend
        self.group = dist.new_group(backend=comm.backend, timeout=datetime.timedelta(seconds=timeout))
        self._global = {r: dist.get_global_rank(comm.group, r) if comm.group is not None else r
                        for r in range(comm.world_size)}

    def exchange(self, send, recv, peer: int):
        """send to peer and recv from it, both at once; returns when both are done (on NCCL:
        when the calling stream is ordered after them). gloo moves CUDA tensors through host
        memory."""
        staged = self.backend == "gloo" and send.is_cuda
        s, r = (send.cpu(), torch.empty(recv.shape, dtype=recv.dtype)) if staged else (send, recv)
        peer = self._global[peer]
        ops = [dist.P2POp(dist.isend, s, peer, self.group), dist.P2POp(dist.irecv, r, peer, self.group)]
        for work in dist.batch_isend_irecv(ops):
            work.wait()
        if staged:
            recv.copy_(r)

    def close(self):
        try:
            dist.destroy_process_group(self.group)
        except Exception:  # the default group may be gone already
            pass
