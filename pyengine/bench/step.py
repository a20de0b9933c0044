"""engine.step() against PyTorch's AMP sequence on the same ~20M-parameter model:
GradScaler.unscale_ + clip_grad_norm_(foreach=True) + AdamW(fused=True), timed side by side.

Only the step is timed; each iteration's backward (untimed) writes fresh gradients.
"""
import statistics
import time

import torch

from pyengine import Engine, EngineConfig

from .common import print_table, sync, write_results


class Slab(torch.nn.Module):
    """`tensors` parameters of about n/tensors elements; loss = sum(p * c) so backward
    writes fixed gradients c cheaply."""

    def __init__(self, n, tensors, device, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        sizes = [n // tensors + (1 if i < n % tensors else 0) for i in range(tensors)]
        self.ps = torch.nn.ParameterList(torch.nn.Parameter(torch.randn(s, generator=g).to(device) * 0.02)
                                         for s in sizes)
        self.cs = [torch.randn(s, generator=g).to(device) * 1e-2 for s in sizes]

    def loss(self):
        return sum((p * c.to(p.dtype)).sum() for p, c in zip(self.ps, self.cs))


def _time_steps(before, step, device, iters):
    times = []
    for _ in range(iters):
        before()
        sync(device)
        t0 = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - t0)
    return times


def run_one(precision, n, dev, iters):
    cfg = EngineConfig(precision=precision, lr=1e-4, weight_decay=0.1, clip_grad_norm=1.0)
    model = Slab(n, 100, dev)
    engine = Engine(model, cfg)
    ref = Slab(n, 100, dev)
    opt = torch.optim.AdamW(ref.parameters(), lr=1e-4, weight_decay=0.1, fused=True)
    # The sequence the target names keeps GradScaler on for every precision (its unscale_
    # pass is part of the cost); "no scaler" drops it, as an fp32 or bf16 user might.
    scaler = torch.amp.GradScaler(torch.device(dev).type)
    plain = Slab(n, 100, dev)
    plain_opt = torch.optim.AdamW(plain.parameters(), lr=1e-4, weight_decay=0.1, fused=True)

    def ours_backward():
        engine.backward(model.loss())

    def torch_backward():
        opt.zero_grad(set_to_none=False)
        scaler.scale(ref.loss()).backward()

    def torch_step():
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0, foreach=True)
        scaler.step(opt)
        scaler.update()

    def plain_backward():
        plain_opt.zero_grad(set_to_none=False)
        plain.loss().backward()

    def plain_step():
        torch.nn.utils.clip_grad_norm_(plain.parameters(), 1.0, foreach=True)
        plain_opt.step()

    pairs = [(ours_backward, engine.step), (torch_backward, torch_step), (plain_backward, plain_step)]
    for _ in range(3):  # warm-up, then interleaved rounds
        for b, s in pairs:
            b()
            s()
    samples = [[], [], []]
    for _ in range(iters):
        for i, (b, s) in enumerate(pairs):
            samples[i] += _time_steps(b, s, dev, 1)
    t_ours, t_torch, t_plain = (statistics.median(x) for x in samples)
    mem = engine.memory_per_param()
    engine.close()
    return {"precision": precision, "params": n, "engine_ms": t_ours * 1e3, "torch_ms": t_torch * 1e3,
            "speedup": t_torch / t_ours, "torch_no_scaler_ms": t_plain * 1e3, "speedup_no_scaler": t_plain / t_ours,
            "bytes_per_param": mem["total"], "memory": mem}


def run(args):
    dev = args.device
    n = (1 << 20) if args.quick else 20_000_000
    iters = 5 if args.quick else 15
    precisions = ["fp32"] if dev == "cpu" else ["fp16", "bf16", "fp32"]
    rows = [run_one(p, n, dev, iters) for p in precisions]
    print(f"engine.step() vs GradScaler.unscale_ + clip_grad_norm_(foreach) + AdamW(fused), {n} params in "
          f"100 tensors, on {dev}")
    print_table(["precision", "engine ms", "torch AMP ms", "speedup", "torch no-scaler ms", "speedup",
                 "bytes/param (engine)"],
                [[r["precision"], f"{r['engine_ms']:.2f}", f"{r['torch_ms']:.2f}", f"{r['speedup']:.2f}x",
                  f"{r['torch_no_scaler_ms']:.2f}", f"{r['speedup_no_scaler']:.2f}x", f"{r['bytes_per_param']:.0f}"]
                 for r in rows])
    print("torch AMP keeps fp32 params (4) + fp32 grads (4) + AdamW state (8) = 16 B/param; the engine's "
          "fp16/bf16 layout is 2 + 2 + 4 master + 8 state = 16, +4 with fp32 accumulation")
    print(f"wrote {write_results('step', dev, rows, args.out)}")
    return 0
