"""Timing, bandwidth reference and result files shared by the benchmarks.

Note: these machines are shared and noisy, so every figure is a median over repeats, and
every ratio compares two things timed side by side in the same run (interleaved), never a
number against one from another run.
"""
import datetime
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def median_time(fn, device="cpu", repeats=15, warmup=3, min_time=0.0):
    """Median wall time of fn() in seconds (device-synchronized)."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    t_end = time.perf_counter() + min_time
    while len(times) < repeats or time.perf_counter() < t_end:
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def side_by_side(fns, device="cpu", repeats=15, warmup=3):
    """Median times of several functions, run interleaved so noise hits them alike."""
    for fn in fns:
        for _ in range(warmup):
            fn()
    sync(device)
    samples = [[] for _ in fns]
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            fn()
            sync(device)
            samples[i].append(time.perf_counter() - t0)
    return [statistics.median(s) for s in samples]


def stream_bandwidth(device="cpu", nbytes=None):
    """Measured streaming bandwidth in bytes/s for the three access patterns kernels use:
    'read' (sum of one buffer), 'copy' (one buffer into another) and 'update' (a buffer
    scaled in place; read + write of the same lines, so no write-allocate traffic). Each
    kernel is held against the ceilings of the patterns it uses."""
    if nbytes is None:
        nbytes = (1 << 28) if torch.device(device).type == "cpu" else (1 << 31)
    n = nbytes // 4
    src = torch.rand(n, device=device)
    dst = torch.empty_like(src)
    t_copy, t_read, t_update = side_by_side(
        [lambda: dst.copy_(src), lambda: src.sum(), lambda: dst.mul_(1.0)], device, repeats=9)
    return {"copy": 2 * nbytes / t_copy, "read": nbytes / t_read, "update": 2 * nbytes / t_update}


def ideal_time(bytes_by_pattern, bandwidth):
    """Shortest time the bytes can move at the measured bandwidth of each pattern."""
    return sum(b / bandwidth[p] for p, b in bytes_by_pattern.items())


def device_name(device):
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(torch.device(device))
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{model}, {os.cpu_count()} cores"


def write_results(kind, device, rows, out_dir, extra=None):
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y-%m-%d")
    dev = "cuda" if torch.device(device).type == "cuda" else "cpu"
    path = out / f"{kind}-{dev}-{stamp}.json"
    payload = {"benchmark": kind, "date": stamp, "device": device_name(device), "torch": torch.__version__,
               "rows": rows, **(extra or {})}
    path.write_text(json.dumps(payload, indent=1))
    return path


def print_table(headers, rows):
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) for i, h in enumerate(headers)]
    line = "  ".join(str(h).rjust(w) for h, w in zip(headers, widths))
    print(line)
    print("-" * len(line))
    for r in rows:
        print("  ".join(str(c).rjust(w) for c, w in zip(r, widths)))
