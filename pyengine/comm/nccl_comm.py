"""NcclComm: pyengine's own NCCL communicator (built into _cuda when NCCL headers were found)."""


def available() -> bool:
    return False
