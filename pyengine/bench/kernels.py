"""Kernel microbenchmark: each fused op against its PyTorch equivalent, timed side by side,
with the minimal bytes each must move and the fraction of the measured streaming bandwidth.

Minimal bytes per element (r = read, w = written), with the access pattern whose measured
ceiling applies ("% peak" = time those bytes need at the ceilings / measured time):
  accumulate  fp32 dst += src         r dst 4 + src s, w dst 4          update
  cast_scale  src -> dst              r s, w d                          copy
  unscale_check_sumsq (read-only)     r grad s                          read
  adamw       fp32 master/m/v         r 12 + grad s, w 12 (+ model 2)   update
  sgd momentum                        r 8 + grad s, w 8                 update
  flatten     100 tensors -> flat     r s, w d                          copy
              (ops.flatten checks its arguments every call; ops.FlatCopy once)
  full step   norm pass + AdamW pass  4 read + 28 update = 32 (PyTorch's sequence: 48)
  adamw, 124M flat (CUDA)             r 12 + grad 2, w 12 + model 2 (+ grad cleared 2)  update
"""
import torch

from pyengine import ops

from .common import ideal_time, print_table, side_by_side, stream_bandwidth, write_results

ES = {torch.float32: 4, torch.float16: 2, torch.bfloat16: 2}
SHORT = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def _cases(n, dev, half, with_fp32):
    """(name, dtype label, bytes moved, ours, torch equivalent or None); the fp32-only cases
    once, with_fp32."""
    hs = ES[half]
    dst, src32 = torch.randn(n, device=dev), torch.randn(n, device=dev)
    srch = torch.randn(n, device=dev).to(half)
    outh = torch.empty(n, device=dev, dtype=half)
    flag, sumsq, inv = (torch.zeros(1, device=dev), torch.zeros(1, device=dev), torch.ones(1, device=dev))
    ws = ops.sumsq_workspace(src32)
    yield ("accumulate", f"fp32+={SHORT[half]}", {"update": n * (8 + hs)},
           lambda: ops.accumulate_(dst, srch, 1e-3), lambda: dst.add_(srch, alpha=1e-3))
    yield ("cast_scale", f"fp32->{SHORT[half]}", {"copy": n * (4 + hs)},
           lambda: ops.cast_scale(src32, outh, 0.5), lambda: outh.copy_(src32.mul(0.5)))

    def torch_unscale_norm(g):
        # Note: torch has no CUDA bf16 _amp_foreach_non_finite_check_and_unscale_ (GradScaler
        # is fp16's); bf16 is then held against the norm and a finiteness test of the product
        if g.dtype == torch.bfloat16 and g.is_cuda:
            y = g * inv
            return torch._foreach_norm([y]), torch.isfinite(y).all()
        torch._amp_foreach_non_finite_check_and_unscale_([g], flag, inv)
        return torch._foreach_norm([g])

    for g in (src32, srch) if with_fp32 else (srch,):
        yield ("unscale_check_sumsq", f"{SHORT[g.dtype]} r/o", {"read": n * ES[g.dtype]},
               lambda g=g: ops.unscale_check_sumsq(g, flag, sumsq, inv_scale=inv, workspace=ws),
               lambda g=g: torch_unscale_norm(g))

    p = torch.nn.Parameter(torch.randn(n, device=dev))
    p.grad = torch.randn(n, device=dev) * 1e-3
    m, v = torch.zeros(n, device=dev), torch.zeros(n, device=dev)
    step = torch.zeros(1, dtype=torch.int64, device=dev)
    master = p.detach().clone()
    torch_adamw = torch.optim.AdamW([p], lr=1e-4, weight_decay=0.1, fused=True)
    if with_fp32:
        yield ("adamw", "fp32", {"update": n * 28},
               lambda: ops.adamw_step(master, m, v, p.grad, step, lr=1e-4, weight_decay=0.1, found_inf=flag),
               torch_adamw.step)
    gh = p.grad.to(half)
    yield ("adamw", f"{SHORT[half]} grad+model", {"update": n * (24 + 2 * hs)},
           lambda: ops.adamw_step(master, m, v, gh, step, lr=1e-4, weight_decay=0.1, found_inf=flag,
                                  model=outh, grad_scale=inv), None)
    if not with_fp32:
        return
    q = torch.nn.Parameter(torch.randn(n, device=dev))
    q.grad = p.grad
    buf = torch.zeros(n, device=dev)
    torch_sgd = torch.optim.SGD([q], lr=1e-4, momentum=0.9, foreach=True)
    yield ("sgd momentum", "fp32", {"update": n * 20},
           lambda: ops.sgd_step(master, p.grad, step, lr=1e-4, momentum=0.9, momentum_buf=buf), torch_sgd.step)
    parts = list(torch.randn(n, device=dev).split((n + 99) // 100))
    flat = torch.empty(n, device=dev)
    yield ("flatten", "100 x fp32", {"copy": n * 8}, lambda: ops.flatten(parts, flat), lambda: torch.cat(parts, out=flat))
    prepared = ops.FlatCopy(parts, flat)
    yield ("flatten (FlatCopy)", "100 x fp32", {"copy": n * 8}, prepared.flatten, lambda: torch.cat(parts, out=flat))


def full_step_case(n, dev, tensors=100):
    """The whole step over n fp32 params in `tensors` tensors: ours (norm pass + one fused
    AdamW pass with unscale, clip and skip) against GradScaler.unscale_ +
    clip_grad_norm_(foreach) + AdamW(fused)."""
    sizes = [n // tensors + (1 if i < n % tensors else 0) for i in range(tensors)]
    params = [torch.nn.Parameter(torch.randn(s, device=dev) * 0.02) for s in sizes]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-2
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.1, fused=True)
    scaler = torch.amp.GradScaler(torch.device(dev).type, init_scale=1.0, growth_interval=10**9)

    loss = torch.ones((), device=dev)

    def torch_step():
        scaler.scale(loss)  # what backward(scaler.scale(loss)) does to the scaler's state
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(params, 1e9, foreach=True)
        scaler.step(opt)
        scaler.update()

    master = torch.cat([p.detach().flatten() for p in params])
    grads = torch.cat([p.grad.flatten() for p in params])
    m, v = torch.zeros(n, device=dev), torch.zeros(n, device=dev)
    step = torch.zeros(1, dtype=torch.int64, device=dev)
    flag, sumsq = torch.zeros(1, device=dev), torch.zeros(1, device=dev)
    coef = torch.empty(2, device=dev)
    state = ops.new_loss_scale_state(1.0, 2, dev)
    ws = ops.sumsq_workspace(grads)

    def our_step():
        flag.zero_()
        sumsq.zero_()
        ops.unscale_check_sumsq(grads, flag, sumsq, inv_scale=state[1:2], workspace=ws)
        ops.clip_coef(sumsq, 1e9, coef, inv_scale=state[1:2])
        ops.adamw_step(master, m, v, grads, step, lr=1e-4, weight_decay=0.1, grad_scale=coef[1:2], found_inf=flag)
        ops.update_loss_scale(state, flag, growth_interval=10**9)

    return ("full step", f"fp32, {tensors} tensors", {"read": n * 4, "update": n * 28}, our_step, torch_step,
            n * 48)


GPT2_124M = 124_439_808  # GPT-2 small's parameters (tied embeddings): one flat buffer


def flat_adamw_cases(n, dev):
    """The engine's AdamW pass over one model's flat buffers: fp32 master and moments, bf16
    gradient read with the clip multiplier, bf16 model copy written, and the gradient cleared
    in the same pass or not (the engine clears it there: one write instead of a fill pass)."""
    master, m, v = torch.randn(n, device=dev) * 0.02, torch.zeros(n, device=dev), torch.zeros(n, device=dev)
    grad = (torch.randn(n, device=dev) * 1e-3).to(torch.bfloat16)
    model = torch.empty(n, device=dev, dtype=torch.bfloat16)
    step = torch.zeros(1, dtype=torch.int64, device=dev)
    flag, coef = torch.zeros(1, device=dev), torch.ones(1, device=dev)
    for clear in (True, False):
        yield (f"adamw, {n / 1e6:.0f}M flat", "bf16 grad" + (" cleared" if clear else "") + " + model",
               {"update": n * (24 + 2 + 2 + (2 if clear else 0))},
               lambda clear=clear: ops.adamw_step(master, m, v, grad, step, lr=1e-4, weight_decay=0.1,
                                                  found_inf=flag, grad_scale=coef, model=model, zero_grad=clear))


def run(args):
    dev = args.device
    sizes = [1 << 20] if args.quick else [1 << 20, 1 << 24]
    repeats = 5 if args.quick else 15
    bw = stream_bandwidth(dev)
    print(f"streaming bandwidth on {dev}: " + ", ".join(f"{k} {v / 1e9:.1f} GB/s" for k, v in bw.items()))
    rows, table = [], []

    def record(name, label, n, by_pattern, t_ours, t_torch, torch_bytes=None):
        nbytes = sum(by_pattern.values())
        gbs = nbytes / t_ours / 1e9
        row = {"op": name, "dtype": label, "elements": n, "ours_ms": t_ours * 1e3, "bytes": by_pattern,
               "gb_per_s": gbs, "pct_stream": 100 * ideal_time(by_pattern, bw) / t_ours,
               "torch_ms": None if t_torch is None else t_torch * 1e3,
               "speedup": None if t_torch is None else t_torch / t_ours, "torch_bytes": torch_bytes}
        rows.append(row)
        table.append([name, label, n, f"{row['ours_ms']:.3f}", f"{gbs:.1f}", f"{row['pct_stream']:.0f}%",
                      "-" if t_torch is None else f"{row['torch_ms']:.3f}",
                      "-" if t_torch is None else f"{row['speedup']:.2f}x"])

    halves = [torch.bfloat16, torch.float16] if dev == "cpu" else [torch.float16, torch.bfloat16]
    for n in sizes:
        for name, label, nbytes, ours, ref in (c for h in halves for c in _cases(n, dev, h, h is halves[0])):
            fns = [ours] if ref is None else [ours, ref]
            times = side_by_side(fns, dev, repeats=repeats)
            record(name, label, n, nbytes, times[0], times[1] if ref else None)
    n_step = (1 << 20) if args.quick else 20_000_000
    name, label, nbytes, ours, ref, torch_bytes = full_step_case(n_step, dev)
    t_ours, t_torch = side_by_side([ours, ref], dev, repeats=max(5, repeats // 2))
    record(name, label, n_step, nbytes, t_ours, t_torch, torch_bytes)
    if dev != "cpu" and not args.quick:  # one model's whole buffer: too slow to repeat on a CPU
        for name, label, nbytes, ours in flat_adamw_cases(GPT2_124M, dev):
            record(name, label, GPT2_124M, nbytes, side_by_side([ours], dev, repeats=repeats)[0], None)
    print_table(["op", "dtype", "elements", "ms", "GB/s", "% peak", "torch ms", "speedup"], table)
    path = write_results("kernels", dev, rows, args.out, {"stream_gb_per_s": {k: v / 1e9 for k, v in bw.items()}})
    print(f"wrote {path}")
    return 0
