"""Host overhead: where the step is launch-bound, not bandwidth-bound.

Three measurements, each side by side in one run:
  toy model   12 x (Linear 128 + LayerNorm) = 48 tensors, batch 32: a whole iteration
              (forward, backward, step) of the engine against torch's own loop (zero_grad,
              backward, clip_grad_norm_(foreach), AdamW(fused)); on CUDA both in bf16
              (torch: autocast), on the CPU both in fp32 (bf16 autocast is ~15x slower there).
              On CUDA also the engine's step captured in a CUDA graph (Engine.capture).
  step host   engine.step() on 100 tensors x 64 elements, where the kernels cost nothing and
              the time is the engine's own; each step follows a backward of one tensor, so the
              step does its full work (checks, norm, clip, every group's pass, loss scale).
              Reported: the lowest median of 5 rounds (noise on a shared machine only adds).
  op call     ops.adam_step (checked every call) against the step plan's native call on the
              same pointers (checked once per layout).
"""
import statistics
import time

import torch

from pyengine import Engine, EngineConfig, ops

from .common import device_name, print_table, side_by_side, sync, write_results


def _toy(device, seed=0):
    torch.manual_seed(seed)
    layers = []
    for _ in range(12):
        layers += [torch.nn.Linear(128, 128), torch.nn.LayerNorm(128)]
    return torch.nn.Sequential(*layers).to(device)


def toy_model(device, iters):
    cuda = torch.device(device).type == "cuda"
    precision = "bf16" if cuda else "fp32"
    x, y = torch.randn(32, 128, device=device), torch.randn(32, 128, device=device)
    m1 = _toy(device)
    engine = Engine(m1, EngineConfig(precision=precision, lr=1e-3, clip_grad_norm=1.0))
    dt = torch.bfloat16 if cuda else torch.float32
    m2 = _toy(device)
    opt = torch.optim.AdamW(m2.parameters(), lr=1e-3, fused=True)

    def ours():
        engine.backward(torch.nn.functional.mse_loss(m1(x.to(dt)).float(), y))
        engine.step()

    def theirs():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=cuda):
            loss = torch.nn.functional.mse_loss(m2(x).float(), y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(m2.parameters(), 1.0, foreach=True)
        opt.step()

    fns = [ours, theirs]
    if cuda:  # the same step captured in a CUDA graph (pyengine/graph.py)
        m3 = _toy(device)
        e3 = Engine(m3, EngineConfig(precision=precision, lr=1e-3, clip_grad_norm=1.0))
        xs = x.to(dt)

        def step_fn():
            loss = torch.nn.functional.mse_loss(m3(xs).float(), y)
            e3.backward(loss)
            return loss

        graph = e3.capture(step_fn)
        fns.append(graph.replay)
    times = side_by_side(fns, device, repeats=iters, warmup=20)
    engine.close()
    a, b = times[0], times[1]
    row = {"case": "toy model iteration", "precision": precision, "tensors": 48, "engine_us": a * 1e6,
           "torch_us": b * 1e6, "speedup": b / a}
    if cuda:
        row.update(graph_us=times[2] * 1e6, graph_speedup=b / times[2])
    return row


class _Slab(torch.nn.Module):
    def __init__(self, tensors, numel, device):
        super().__init__()
        self.ps = torch.nn.ParameterList(torch.nn.Parameter(torch.randn(numel, device=device)) for _ in range(tensors))


def step_host(device, precision, iters, tensors=100, rounds=5, used=None):
    """Host time of engine.step() (no device sync inside the timed region): the lowest of
    `rounds` medians, since this shared machine's noise only ever adds time. `used`: how many
    of the tensors the loss reaches (default all: every parameter is updated; fewer: the
    others are left out of the step, as torch.optim leaves a parameter without a gradient)."""
    m = _Slab(tensors, 64, device)
    engine = Engine(m, EngineConfig(precision=precision, clip_grad_norm=1.0, initial_loss_scale=256.0))
    reached = list(m.ps)[:tensors if used is None else used]

    def loss_fn():
        return torch.stack([p.float().sum() for p in reached]).sum()

    for _ in range(20):  # warm-up
        engine.backward(loss_fn())
        engine.step()
    step_medians, back_medians = [], []
    for _ in range(rounds):
        steps, backs = [], []
        for _ in range(iters // rounds):
            loss = loss_fn()
            sync(device)
            t0 = time.perf_counter()
            engine.backward(loss)
            t1 = time.perf_counter()
            engine.step()
            t2 = time.perf_counter()
            backs.append(t1 - t0)
            steps.append(t2 - t1)
        step_medians.append(statistics.median(steps))
        back_medians.append(statistics.median(backs))
    engine.close()
    return {"case": "engine.step() host time", "precision": precision, "tensors": tensors,
            "used": tensors if used is None else used,
            "step_us": min(step_medians) * 1e6, "backward_us": min(back_medians) * 1e6,
            "step_us_rounds": [t * 1e6 for t in step_medians]}


def op_call(device, iters):
    n = 1 << 10
    master, m, v, g = (torch.randn(n, device=device) for _ in range(4))
    step = torch.zeros(1, dtype=torch.int64, device=device)
    hyper = torch.tensor([1e-3, 0.9, 0.999, 1e-8, 0.0, 0.0, 0.0, 0.0], dtype=torch.float64, device=device)
    from pyengine import _native

    mod = _native.cuda_module() if torch.device(device).type == "cuda" else _native._C
    args = mod.OptimizerArgs()
    args.master, args.state1, args.state2, args.grad, args.n = (master.data_ptr(), m.data_ptr(), v.data_ptr(),
                                                                 g.data_ptr(), n)
    args.step, args.hyper = step.data_ptr(), hyper.data_ptr()
    stream = torch.cuda.current_stream().cuda_stream if torch.device(device).type == "cuda" else 0

    def checked():
        ops.adam_step(master, m, v, g, step, lr=1e-3)

    def native():
        mod.adamw_step(args, stream)

    a, b = [], []
    for _ in range(iters):
        t0 = time.perf_counter()
        checked()
        t1 = time.perf_counter()
        native()
        b.append(time.perf_counter() - t1)
        a.append(t1 - t0)
    sync(device)
    return {"case": "adam_step call, 1024 elements", "checked_us": statistics.median(a) * 1e6,
            "native_us": statistics.median(b) * 1e6}


def run(args):
    dev = args.device
    iters = 50 if args.quick else 500
    rows = [toy_model(dev, iters)]
    for precision in ("fp32", "bf16"):
        rows.append(step_host(dev, precision, iters))
    rows.append(op_call(dev, iters * 4))
    rows.append(step_host(dev, "fp32", iters, used=1))
    print(f"host overhead on {device_name(dev)}")
    graph_rows = [[rows[0]["case"] + ", CUDA graph", rows[0]["precision"], f"{rows[0]['graph_us']:.0f} us",
                   f"{rows[0]['torch_us']:.0f} us", f"{rows[0]['graph_speedup']:.2f}x"]] if "graph_us" in rows[0] else []
    print_table(["case", "", "engine", "torch", "speedup"], [
        [rows[0]["case"], rows[0]["precision"], f"{rows[0]['engine_us']:.0f} us", f"{rows[0]['torch_us']:.0f} us",
         f"{rows[0]['speedup']:.2f}x"], *graph_rows,
        *[[r["case"], f"{r['precision']}, {r['used']} of {r['tensors']} tensors used", f"{r['step_us']:.0f} us",
           f"(backward {r['backward_us']:.0f} us)", "-"] for r in rows[1:3] + rows[4:]],
        [rows[3]["case"], "checked ops vs plan", f"{rows[3]['native_us']:.1f} us", f"{rows[3]['checked_us']:.1f} us",
         f"{rows[3]['checked_us'] / rows[3]['native_us']:.0f}x"],
    ])
    print(f"wrote {write_results('overhead', dev, rows, args.out)}")
    return 0
