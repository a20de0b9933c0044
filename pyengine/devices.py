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
