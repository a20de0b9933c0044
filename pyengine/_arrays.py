"""One validated view of an array argument: torch tensor, CUDA array (CuPy, via
__cuda_array_interface__) or host array (numpy, via __array_interface__).

Note: the kernels take (address, numel, dtype, stream). This module is the one place that
turns a framework object into those, so ops.py validates the same way whatever the caller
uses, and nothing below needs torch.
"""
from dataclasses import dataclass, field

F32, F16, BF16 = 0, 1, 2
DTYPE_NAMES = {F32: "float32", F16: "float16", BF16: "bfloat16"}
_TYPESTR = {"<f4": F32, "<f2": F16, "=f4": F32, "=f2": F16, "|f4": F32, "|f2": F16}
_ITEMSIZE = {F32: 4, F16: 2, BF16: 2}


@dataclass(frozen=True)
class ArrayView:
    name: str
    ptr: int
    numel: int
    dtype: int  # F32 / F16 / BF16
    device: tuple  # ("cpu", -1) or ("cuda", index)
    kind: str  # "torch" | "cai" | "host"
    obj: object
    stream: int = 0  # CAI arrays only: the stream the producer uses
    nbytes: int = field(init=False)

    def __post_init__(self):
        object.__setattr__(self, "nbytes", self.numel * _ITEMSIZE[self.dtype])

    @property
    def is_cuda(self) -> bool:
        return self.device[0] == "cuda"

    def device_str(self) -> str:
        return "cpu" if not self.is_cuda else f"cuda:{self.device[1]}"


_TORCH_CODES = {}


def _torch_dtype_code(t):
    if not _TORCH_CODES:
        import torch

        _TORCH_CODES.update({torch.float32: F32, torch.float16: F16, torch.bfloat16: BF16})
    return _TORCH_CODES.get(t.dtype)


def _contiguous_interface(iface, shape, itemsize) -> bool:
    strides = iface.get("strides")
    if strides is None:
        return True
    expected, acc = [], itemsize
    for dim in reversed(shape):
        expected.append(acc)
        acc *= dim
    return tuple(reversed(expected)) == tuple(strides) or any(d == 0 for d in shape)


def _numel(shape):
    n = 1
    for d in shape:
        n *= d
    return n


def torch_device(x, name: str):
    """(kind, index) of a contiguous torch tensor on cpu or cuda; ValueError naming `name` else."""
    import torch

    if not x.is_contiguous():
        raise ValueError(f"{name}: expected a contiguous tensor (call .contiguous() first)")
    if x.device.type == "cuda":
        return ("cuda", x.device.index if x.device.index is not None else torch.cuda.current_device())
    if x.device.type == "cpu":
        return ("cpu", -1)
    raise ValueError(f"{name}: tensors on {x.device.type} are not supported (use cpu or cuda)")


def view(x, name: str, writable: bool = False) -> ArrayView:
    """Validates that x is a contiguous float32/float16/bfloat16 array and describes it."""
    mod = type(x).__module__ or ""
    if mod.startswith("torch"):
        import torch

        if isinstance(x, torch.Tensor):
            code = _torch_dtype_code(x)
            if code is None:
                raise TypeError(f"{name}: expected a float32, float16 or bfloat16 tensor, got {x.dtype}")
            return ArrayView(name, x.data_ptr(), x.numel(), code, torch_device(x, name), "torch", x)
    iface = getattr(x, "__cuda_array_interface__", None)
    kind = "cai"
    if iface is None:
        iface = getattr(x, "__array_interface__", None)
        kind = "host"
    if iface is None:
        raise TypeError(f"{name}: expected a torch tensor, a CUDA array or a host array, got {type(x).__name__}")
    code = _TYPESTR.get(iface["typestr"])
    if code is None:
        raise TypeError(f"{name}: expected float32 or float16 data, got typestr {iface['typestr']!r}")
    shape = tuple(iface["shape"])
    if not _contiguous_interface(iface, shape, _ITEMSIZE[code]):
        raise ValueError(f"{name}: expected a C-contiguous array")
    ptr, readonly = iface["data"]
    if readonly and writable:
        raise ValueError(f"{name}: the array is read-only")
    if kind == "host":
        return ArrayView(name, ptr or 0, _numel(shape), code, ("cpu", -1), kind, x)
    dev_obj = getattr(x, "device", None)
    index = getattr(dev_obj, "id", None)
    if index is None:
        index = _current_cuda_device()
    stream = iface.get("stream") or 0
    return ArrayView(name, ptr or 0, _numel(shape), code, ("cuda", index), kind, x, stream)


def _current_cuda_device() -> int:
    try:
        import cupy

        return cupy.cuda.runtime.getDevice()
    except ImportError:
        return 0
