"""Process-group setup for the Engine: torchrun's environment, device choice, agreement checks."""
import datetime
import hashlib
import json
import os

import torch
import torch.distributed as dist

from .comm.torch_comm import TorchComm


def launched_by_torchrun() -> bool:
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))


def init_if_needed(cfg, device) -> bool:
    """Initializes torch.distributed from torchrun's environment when the user has not.
    Returns True when a process group is in use with more than one rank."""
    if not dist.is_available():
        return False
    if not dist.is_initialized():
        if not launched_by_torchrun() or int(os.environ["WORLD_SIZE"]) <= 1:
            return False
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=cfg.comm_timeout))
    return dist.get_world_size() > 1


def local_device(model_device: torch.device) -> torch.device:
    """The device this rank should use: cuda:LOCAL_RANK for CUDA models under torchrun."""
    if model_device.type == "cuda" and "LOCAL_RANK" in os.environ:
        dev = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(dev)
        return dev
    return model_device


def make_comm(cfg, device):
    if cfg.deterministic:
        return _tree_comm(cfg, device)
    if cfg.comm_backend == "nccl" or (cfg.comm_backend == "auto" and device.type == "cuda"):
        from .comm.nccl_comm import NcclComm, available

        if available():
            return NcclComm(timeout=cfg.comm_timeout, device=device)
        if cfg.comm_backend == "nccl":
            raise RuntimeError("EngineConfig.comm_backend='nccl' but pyengine was built without NCCL support "
                               "(or no GPU is visible); use comm_backend='torch'")
    return TorchComm()


def _tree_comm(cfg, device):
    """deterministic=True: the fixed-pairing exchange over torch.distributed's point-to-point
    messages (ddp/exchange.py)."""
    from .ddp.exchange import TreeComm

    base = None
    if cfg.comm_backend == "nccl" or (cfg.comm_backend == "auto" and device.type == "cuda"):
        from .comm.nccl_comm import NcclComm, available

        if available():
            base = NcclComm(timeout=cfg.comm_timeout, device=device)  # grouped ncclSend / ncclRecv
        elif cfg.comm_backend == "nccl":
            raise RuntimeError("EngineConfig.comm_backend='nccl' but pyengine was built without NCCL support "
                               "(or no GPU is visible); use comm_backend='torch'")
    return TreeComm(base or TorchComm(), device, cfg.comm_timeout)


def fingerprint(named_params, cfg) -> int:
    """A hash of parameter names, shapes and dtypes and of the config: equal on every rank."""
    desc = [(n, tuple(p.shape), str(p.dtype)) for n, p in named_params]
    cfg_d = cfg.to_dict()
    cfg_d.pop("trace_path", None)
    blob = json.dumps([desc, cfg_d], sort_keys=True, default=str).encode()
    return int.from_bytes(hashlib.sha256(blob).digest()[:7], "little")


def check_agreement(comm, value, what):
    values = comm.all_gather_int(value)
    bad = [r for r, v in enumerate(values) if v != values[0]]
    if bad:
        raise RuntimeError(
            f"pyengine: {what} differs between ranks: rank(s) {bad} do not match rank 0. Every rank must build "
            "the same model (same parameter names, shapes and dtypes) with the same EngineConfig")
