"""What a device can do at best, for utilization figures (MFU)."""
import torch

# dense bf16/fp16 tensor-core TFLOP/s of the SXM parts, by the name torch reports
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0}


def peak_tflops(device):
    """The device's peak dense half-precision TFLOP/s, or None where it is not known (CPUs)."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


def cuda_index(model) -> "int | None":
    """The CUDA device index of the model's first parameter, None on the CPU (or without any)."""
    p = next(iter(model.parameters()), None)
    return p.device.index if p is not None and p.device.type == "cuda" else None


def on_engine_device(method):
    """Runs an Engine method with the engine's CUDA device current.

    Note: the core's kernels launch on the current device, into the stream the engine passes,
    which belongs to the engine's device. A model on cuda:1 stepped while cuda:0 is current
    (the default in a process that never called set_device) would launch into another
    device's stream. torch's own ops guard themselves; the core's do not, so every public
    entry point that reaches them (backward, step, capture, replay, checkpoints) runs under
    this guard. Where the device is already current it costs one query.
    """
    import functools

    @functools.wraps(method)
    def guarded(self, *args, **kwargs):
        index = self._cuda_index
        if index is None or torch.cuda.current_device() == index:
            return method(self, *args, **kwargs)
        with torch.cuda.device(index):
            return method(self, *args, **kwargs)

    return guarded
