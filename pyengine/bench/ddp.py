"""The Engine against torch DDP, side by side on several ranks: same model, batch and
accumulation; step time, tokens/s, exposed communication and memory per parameter.

DDP's side is what a PyTorch user writes: DistributedDataParallel + (GradScaler for fp16)
+ clip_grad_norm_(foreach) + AdamW(fused). Iterations alternate between the variants so that
machine noise hits all alike; the figure is rank 0's median step time.

--zero 1 runs the engine unsharded and with ZeRO-1 (fp32 wire both) beside DDP, and times
each rank's optimizer passes alone: with the master weights and state sharded they cover
1/ranks of the parameters.
"""
import statistics
import time

import torch
import torch.distributed as dist

from pyengine import Engine, EngineConfig
from pyengine.train.model import GPT, GPTConfig

from .common import device_name, print_table, sync, write_results
from pyengine.testing import spawn


def _model(cfg, device, seed=0):
    torch.manual_seed(seed)
    return GPT(cfg).to(device)


def _optimizer_ms(engine, repeats=10):
    """Median time of this rank's fused optimizer passes alone (the update they make is kept:
    it runs after the step timings)."""
    stream = engine.plan.stream()
    times = []
    for _ in range(repeats):
        sync(engine.device)
        t0 = time.perf_counter()
        engine.plan.update(stream)
        sync(engine.device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def _comm_during_backward(events) -> float:
    """The fraction of the bucket collectives' time that falls inside backward, from a trace."""
    bwd = [(e["ts"], e["ts"] + e["dur"]) for e in events if e.get("ph") == "X" and e["name"] == "backward"]
    comm = [(e["ts"], e["ts"] + e["dur"]) for e in events if e.get("ph") == "X" and " bucket " in e["name"]
            and not e["name"].startswith("all-gather")]
    inside = sum(max(0.0, min(c1, b1) - max(c0, b0)) for c0, c1 in comm for b0, b1 in bwd)
    total = sum(c1 - c0 for c0, c1 in comm)
    return inside / total if total else float("nan")


def _bench_rank(rank, world, device, gcfg, batch, accum, iters, variants_spec, trace_prefix=None):
    if device == "cuda":
        torch.cuda.set_device(rank)
    dev = torch.device(device, rank) if device == "cuda" else torch.device("cpu")
    dist.init_process_group("nccl" if device == "cuda" else "gloo")
    g = torch.Generator().manual_seed(rank)
    x = torch.randint(0, 256, (batch, gcfg.seq_len), generator=g).to(dev)

    variants = []
    for wire, zero in variants_spec:
        model = _model(gcfg, dev)
        engine = Engine(model, EngineConfig(lr=1e-4, weight_decay=0.1, clip_grad_norm=1.0, grad_accum_steps=accum,
                                            comm_dtype=wire, zero_stage=zero, overlap_param_gather=zero == 1,
                                            trace_path=f"{trace_prefix}-zero{zero}.json" if trace_prefix else None))

        def step(model=model, engine=engine):
            for _ in range(accum):
                engine.backward(model(x, x))
                engine.step()

        name = f"engine (wire {wire or 'fp32'}, zero {zero})" if any(z for _, z in variants_spec) else \
            f"engine (wire {wire or 'fp32'})"
        variants.append((name, step, engine))

    ref = _model(gcfg, dev)
    ddp = torch.nn.parallel.DistributedDataParallel(ref, device_ids=[rank] if device == "cuda" else None)
    opt = torch.optim.AdamW(ddp.parameters(), lr=1e-4, weight_decay=0.1, fused=True)

    def ddp_step():
        for i in range(accum):
            if i < accum - 1:
                with ddp.no_sync():
                    (ddp(x, x) / accum).backward()
            else:
                (ddp(x, x) / accum).backward()
        torch.nn.utils.clip_grad_norm_(ddp.parameters(), 1.0, foreach=True)
        opt.step()
        opt.zero_grad(set_to_none=False)

    variants.append(("torch DDP", ddp_step, None))
    for _, fn, _ in variants:
        for _ in range(2):
            fn()
    for _, _, engine in variants:
        if engine is not None:
            engine.stats_counters.__init__()
    samples = [[] for _ in variants]
    for _ in range(iters):
        for i, (_, fn, _) in enumerate(variants):
            dist.barrier()
            sync(dev)
            t0 = time.perf_counter()
            fn()
            sync(dev)
            samples[i].append(time.perf_counter() - t0)
    tokens = batch * gcfg.seq_len * accum * world
    n_params = sum(p.numel() for p in ref.parameters())
    rows = []
    for (name, _, engine), s in zip(variants, samples):
        med = statistics.median(s)
        row = {"variant": name, "step_ms": med * 1e3, "tokens_per_s": tokens / med, "params": n_params}
        if engine is not None:
            st = engine.stats()
            row.update(exposed_comm_ms=st["exposed_comm_s"] / max(1, st["windows"]) * 1e3,
                       comm_ms=st["comm_s"] / max(1, st["windows"]) * 1e3, overlap=st["overlap_fraction"],
                       bytes_per_param=engine.memory_per_param()["total"], optimizer_ms=_optimizer_ms(engine))
            if engine.tracer.enabled:
                row.update(comm_during_backward=_comm_during_backward(engine.tracer.events),
                           trace=engine.close())
        else:
            # fp32 param + grad + AdamW state + DDP's bucket copy of the gradients
            row.update(bytes_per_param=4 + 4 + 8 + 4)
        rows.append(row)
    ddp_ms = rows[-1]["step_ms"]
    for r in rows:
        r["vs_ddp"] = r["step_ms"] / ddp_ms
    dist.destroy_process_group()
    return rows


def run(args):
    dev = args.device
    world = args.nproc
    if dev == "cuda":
        world = min(world, torch.cuda.device_count())
    # Overhead-bound by default: ~20M params, one short sequence per rank. --model small is
    # the main job's compute-bound default (0.84M params, 16 x 128 tokens per rank).
    gcfg = GPTConfig(seq_len=32, n_layer=6, n_head=8, d_model=512)
    batch, accum = 1, 1
    iters = 4 if args.quick else 12
    if args.quick:
        gcfg = GPTConfig(seq_len=32, n_layer=2, n_head=4, d_model=256)
    if args.model:
        from pyengine.train.model import PRESETS

        if args.model not in PRESETS:
            raise SystemExit(f"--model: one of {sorted(PRESETS)}")
        gcfg, batch = PRESETS[args.model], 16
    if args.batch_size:
        batch = args.batch_size
    spec = [(None, 0), (None, 1)] if args.zero else [(None, 0), ("bf16", 0)]
    kind = (f"ddp-{args.model}" if args.model else "ddp") + ("-zero1" if args.zero else "")
    trace_prefix = f"{args.out}/trace-{kind.replace('-zero1', '')}-{dev}" if args.zero else None
    rows = spawn(_bench_rank, world, dev, gcfg, batch, accum, iters, spec, trace_prefix)
    print(f"{world} ranks on {device_name(dev)}: GPT {rows[0]['params'] / 1e6:.1f}M params, batch {batch} x "
          f"{gcfg.seq_len} tokens per rank, accumulation {accum}")
    print_table(["variant", "step ms", "x DDP", "tokens/s", "comm ms", "exposed ms", "overlap", "optimizer ms",
                 "B/param"],
                [[r["variant"], f"{r['step_ms']:.1f}", f"{r['vs_ddp']:.2f}", f"{r['tokens_per_s']:.0f}",
                  f"{r.get('comm_ms', float('nan')):.1f}", f"{r.get('exposed_comm_ms', float('nan')):.1f}",
                  f"{r['overlap']:.0%}" if "overlap" in r else "-",
                  f"{r['optimizer_ms']:.2f}" if "optimizer_ms" in r else "-", f"{r['bytes_per_param']:.0f}"]
                 for r in rows])
    for r in rows:
        if "trace" in r:
            print(f"{r['variant']}: {r['comm_during_backward']:.0%} of the bucket collectives' time inside backward "
                  f"(trace: {r['trace']})")
    print(f"wrote {write_results(kind, dev, rows, args.out, {'world': world, 'batch': batch, 'seq_len': gcfg.seq_len})}")
    return 0
