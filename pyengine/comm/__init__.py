"""Gradient communication backends."""


def nccl_support() -> bool:
    """Whether the NCCL communicator (NcclComm) was compiled into _cuda."""
    from .._native import _cuda

    return bool(_cuda is not None and getattr(_cuda, "HAS_NCCL", False))
