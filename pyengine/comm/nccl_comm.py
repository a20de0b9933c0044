"""NcclComm: pyengine's own NCCL communicator (C++, in _cuda), the same small interface as
TorchComm. Gradient collectives run through it on the caller's CUDA stream; the NCCL unique
id travels through torch.distributed's store; control messages (start-up checks, layout
broadcasts) use the torch.distributed process group.
"""
import itertools
import os

import torch
import torch.distributed as dist

from .. import _native
from .._arrays import view
from .base import Comm, CommError

_ids = itertools.count()


def _library_path() -> str:
    """The libnccl.so.2 torch uses; "" lets the loader take the already-loaded one."""
    try:
        import nvidia.nccl

        for base in getattr(nvidia.nccl, "__path__", []):
            cand = os.path.join(base, "lib", "libnccl.so.2")
            if os.path.exists(cand):
                return cand
    except ImportError:
        pass
    return ""


def available() -> bool:
    cu = _native._cuda
    if cu is None or not getattr(cu, "HAS_NCCL", False) or not torch.cuda.is_available():
        return False
    return cu.nccl_load(_library_path()) == ""


class _Work:
    """Enqueued on the caller's stream: ordering is the stream's; wait() only surfaces errors."""

    def __init__(self, comm):
        self._comm = comm

    def wait(self):
        self._comm.check()


class NcclComm(Comm):
    name = "nccl"

    def __init__(self, group=None, timeout=300.0, device=None):
        cu = _native.cuda_module()
        err = cu.nccl_load(_library_path())
        if err:
            raise RuntimeError(f"pyengine NcclComm: {err}")
        if not dist.is_initialized():
            raise RuntimeError("pyengine NcclComm: torch.distributed must be initialized first (its store carries "
                               "the NCCL unique id)")
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.device = torch.device(device) if device is not None else torch.device("cuda", torch.cuda.current_device())
        key = f"pyengine/nccl_id/{next(_ids)}"
        store = dist.distributed_c10d._get_default_store()
        if self.rank == 0:
            uid = cu.nccl_unique_id(_library_path())
            store.set(key, uid)
        else:
            uid = store.get(key)  # waits up to the store's timeout
        self._c = cu.NcclComm(bytes(uid), self.rank, self.world_size, self.device.index, float(timeout))
        self.calls = 0

    def _stream(self):
        return torch.cuda.current_stream(self.device).cuda_stream

    def check(self):
        self._call(self._c.check)

    def _call(self, fn, *args):
        """fn(*args), its RuntimeError (an abort, an NCCL error) raised as CommError."""
        try:
            return fn(*args)
        except RuntimeError as exc:
            raise CommError(f"{exc}. A peer rank probably died, raised or stalled past comm_timeout; "
                            "the job cannot continue (check the other ranks' errors)") from exc

    @property
    def abort_word(self) -> int:
        """Device address of an int32 in mapped host memory: 0 while healthy, 1 from just before
        the communicator aborts (watchdog or abort()), for device code to skip on."""
        return self._c.abort_word() if self._c is not None else 0

    def allreduce(self, tensor, average: bool):
        v = view(tensor, "tensor", writable=True)
        if not v.is_cuda:
            raise ValueError("NcclComm.allreduce: tensor must be on a CUDA device")
        self.calls += 1
        self._call(self._c.allreduce, v.ptr, v.numel, v.dtype, bool(average), self._stream())
        return _Work(self)

    def _pair(self, op, output, input, big, small):
        """Views of output/input where `big` must hold world_size x `small` elements."""
        o, i = view(output, "output", writable=True), view(input, "input")
        views = {"output": o, "input": i}
        if not (o.is_cuda and i.is_cuda):
            raise ValueError(f"NcclComm.{op}: tensors must be on a CUDA device")
        if views[big].numel != views[small].numel * self.world_size:
            raise ValueError(f"NcclComm.{op}: {big} must hold world_size x {small} elements "
                             f"({self.world_size} x {views[small].numel}), got {views[big].numel}")
        if i.dtype != o.dtype:
            raise TypeError(f"NcclComm.{op}: input and output dtypes differ")
        return o, i

    def reduce_scatter(self, output, input, average: bool):
        o, i = self._pair("reduce_scatter", output, input, "input", "output")
        self._call(self._c.reduce_scatter, i.ptr, o.ptr, o.numel, o.dtype, bool(average), self._stream())
        return _Work(self)

    def all_gather(self, output, input):
        o, i = self._pair("all_gather", output, input, "output", "input")
        self._call(self._c.all_gather, i.ptr, o.ptr, i.numel, i.dtype, self._stream())
        return _Work(self)

    def point_to_point(self, timeout: float):
        return _NcclPointToPoint(self)

    @property
    def control_device(self):
        return self.device

    def abort(self, why=""):
        self._c.abort(why)

    def close(self):
        self._c = None


class _NcclPointToPoint:
    """Grouped ncclSend/ncclRecv on the calling stream (deterministic mode's exchange)."""

    def __init__(self, comm: NcclComm):
        self._comm = comm

    def exchange(self, send, recv, peer: int):
        s, r = view(send, "send"), view(recv, "recv", writable=True)
        if not (s.is_cuda and r.is_cuda) or s.dtype != r.dtype:
            raise ValueError("NcclComm.sendrecv: CUDA tensors of one dtype")
        self._comm.calls += 1
        c = self._comm
        c._call(c._c.sendrecv, s.ptr, s.numel, r.ptr, r.numel, s.dtype, int(peer), c._stream())
        self._comm.check()

    def close(self):
        """The communicator's to release."""
