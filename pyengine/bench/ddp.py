"""The Engine against torch DDP, side by side on several ranks: same model, batch and
accumulation; step time, tokens/s, exposed communication and memory per parameter.

DDP's side is what a PyTorch user writes: DistributedDataParallel + (GradScaler for fp16)
+ clip_grad_norm_(foreach) + AdamW(fused). Iterations alternate between the variants so that
machine noise hits all alike; the figure is rank 0's median step time.

--zero 1 runs the engine unsharded and with ZeRO-1 (fp32 wire both) beside DDP, and times
each rank's optimizer passes alone: with the master weights and state sharded they cover
1/ranks of the parameters.

--deterministic runs the engine's default path (gloo's ring) and EngineConfig(deterministic=
True) (the micro-batch tree and the fixed-pairing exchange) side by side, with the same
micro-batches per rank (2 unless --grad-accum says otherwise), at the --zero stage given.
Beside the step times: the share of each path's bucket collectives inside backward (from
the trace), the bytes each rank puts on the wire per step (the ring's modelled, the tree's
counted by TreeComm), memory_per_param() of both, where the deterministic path's time goes
(its parts timed as the steps run) and the parts alone (an allreduce of the gradients through
gloo's ring and through the exchange, the tree's folds, the chunk norm). Two changes the
engine could make are measured here without changing it, each checked to give the same bits:
with 2 micro-batches a rank, a third variant lets the second micro-batch's gradient land on
the first's (the tree's folds made no-ops on that engine), and the parts alone include the
exchange with its halving in pipelined segments and with two buckets in flight.
"""
import collections
import re
import statistics
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist

from pyengine import Engine, EngineConfig
from pyengine.deterministic import tree_ranges
from pyengine.train.model import GPT, GPTConfig

from .common import device_name, print_table, side_by_side, sync, write_results
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


# the bucket spans overlap.py writes: "allreduce bucket K", "reduce-scatter bucket K", and on the
# deterministic path "fixed-pairing allreduce bucket K", "fixed-pairing reduce-scatter bucket K"
_GRAD_BUCKET = re.compile(r"^(fixed-pairing )?(allreduce|reduce-scatter) bucket \d+$")


def _comm_during_backward(events) -> float:
    """The fraction of the gradient buckets' collective time that falls inside backward, from
    a trace (the parameter all-gathers of ZeRO-1 are not counted)."""
    bwd = [(e["ts"], e["ts"] + e["dur"]) for e in events if e.get("ph") == "X" and e["name"] == "backward"]
    comm = [(e["ts"], e["ts"] + e["dur"]) for e in events if e.get("ph") == "X" and _GRAD_BUCKET.match(e["name"])]
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


class _Timers:
    """Wall time of some methods of some objects as they run, on whichever thread, summed
    per key (instance attributes shadow the methods; the engine's code is left as it is)."""

    def __init__(self):
        self.total = collections.defaultdict(float)
        self.calls = collections.Counter()
        self._lock = threading.Lock()
        self.on = True

    def wrap(self, obj, attr, key):
        fn = getattr(obj, attr)

        def timed(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                if self.on:
                    dt = time.perf_counter() - t0
                    with self._lock:
                        self.total[key] += dt
                        self.calls[key] += 1

        setattr(obj, attr, timed)

    def reset(self):
        with self._lock:
            self.total.clear()
            self.calls.clear()


def _trace_parts(events, steps) -> dict:
    """Milliseconds per step of the traced spans: backward (all micro-batches), the boundary
    step, its exposed wait and optimizer passes, the gradient buckets' collectives (launch to
    checked; they overlap one another and backward) and ZeRO-1's parameter all-gathers."""
    keys = {"backward": "backward", "step": "boundary_step", "wait for comm (exposed)": "exposed_wait",
            "optimizer": "optimizer"}
    out = collections.defaultdict(float)
    for e in events:
        if e.get("ph") != "X":
            continue
        name = e["name"]
        key = keys.get(name) or ("bucket_collectives" if _GRAD_BUCKET.match(name) else
                                 "param_all_gathers" if name.startswith("all-gather bucket ") else None)
        if key:
            out[key] += e["dur"] / 1e3 / steps
    return dict(out)


def _ring_bytes(engine, windows) -> float:
    """What gloo's ring puts on the wire per step and rank: 2 (d-1)/d of each allreduced bucket
    (under gloo the engine's ZeRO-1 reduce-scatter is an allreduce of the bucket, comm/
    torch_comm.py), and under ZeRO-1 (d-1)/d of the parameters all-gathered."""
    d = engine.comm.world_size
    st = engine.stats()
    out = 2 * (d - 1) / d * st["comm_bytes"] / max(1, windows)
    if engine.flat.sharded:
        out += (d - 1) / d * engine.flat.param_flat.numel() * engine.flat.param_flat.element_size()
    return out


def _tree_bytes_model(engine) -> float:
    """What the fixed-pairing exchange should send per step and rank (to check the count):
    halving + doubling, (d-1)/d of the buffer each; under ZeRO-1 halving of the gradients,
    doubling of the parameters and an allreduce of the float64 chunk sums."""
    d = engine.comm.world_size
    g = engine.flat.grad_flat
    gb = g.numel() * g.element_size()
    if not engine.flat.sharded:
        return 2 * (d - 1) / d * gb
    p = engine.flat.param_flat
    return (d - 1) / d * (gb + p.numel() * p.element_size()) + 2 * (d - 1) / d * engine.norm.sums.numel() * 8


def _exchange(x, rank, world, group, scratch, seg=None):
    """An allreduce of x over `group` with the exchange's pairing (deterministic.tree_ranges),
    written here to time changes to it: with seg, the halving's messages travel in segments
    of seg elements and the next segment's are posted before this one's add. Each element is
    still a + b of the same two values, so the sums are the same bits (checked)."""
    rounds = tree_ranges(x.numel(), rank, world)
    for peer, k0, k1, s0, s1 in rounds:
        step = seg or max(k1 - k0, s1 - s0, 1)
        sends = [(o, min(s1 - s0, o + step)) for o in range(0, s1 - s0, step)]
        recvs = [(o, min(k1 - k0, o + step)) for o in range(0, k1 - k0, step)]

        def post(i, peer=peer, s0=s0, sends=sends, recvs=recvs):
            ops = []
            if i < len(sends):
                ops.append(dist.P2POp(dist.isend, x[s0 + sends[i][0]:s0 + sends[i][1]], peer, group))
            if i < len(recvs):
                ops.append(dist.P2POp(dist.irecv, scratch[recvs[i][0]:recvs[i][1]], peer, group))
            return dist.batch_isend_irecv(ops) if ops else []

        n = max(len(sends), len(recvs))
        pending = post(0)
        for i in range(n):
            following = post(i + 1) if i + 1 < n else []
            for w in pending:
                w.wait()
            if i < len(recvs):
                o, e = recvs[i]
                x[k0 + o:k0 + e].add_(scratch[o:e])
            pending = following
    for peer, k0, k1, s0, s1 in reversed(rounds):
        ops = [dist.P2POp(dist.isend, x[k0:k1], peer, group), dist.P2POp(dist.irecv, x[s0:s1], peer, group)]
        for w in dist.batch_isend_irecv(ops):
            w.wait()


def _isolated(default, det, device, repeats):
    """The deterministic path's parts alone, beside the default path's, over this layout's
    buckets (after the timed steps: the buffers' values no longer matter). Collectives: each
    bucket of a zeroed gradient-sized buffer, all issued then all waited, through gloo's ring
    (the default group), through the exchange (TreeComm: two buckets in flight on its two
    lanes), and through a change to the exchange written here: one bucket at a time, its
    halving in pipelined 4 MiB segments."""
    buckets = det.flat.layout.buckets
    flat = det.flat.grad_flat
    rank, world = det.comm.rank, det.comm.world_size
    buf = torch.zeros(flat.numel(), dtype=flat.dtype)
    groups = [dist.new_group(backend="gloo") for _ in range(2)]
    biggest = max(b.numel for b in buckets)
    scratch = [torch.empty(biggest, dtype=flat.dtype) for _ in range(2)]
    seg = (4 << 20) // flat.element_size()

    # the changed exchange sums the same bits as the engine's (random values, every bucket)
    x = torch.randn(flat.numel(), generator=torch.Generator().manual_seed(100 + rank), dtype=flat.dtype)
    y = x.clone()
    for t in [det.comm.allreduce(x[b.start:b.end], average=False) for b in buckets]:
        t.wait()
    for b in buckets:
        _exchange(y[b.start:b.end], rank, world, groups[0], scratch[0], seg)
    same_bits = torch.equal(x, y)

    def ring():
        for w in [dist.all_reduce(buf[b.start:b.end], async_op=True) for b in buckets]:
            w.wait()

    def tree():
        for t in [det.comm.allreduce(buf[b.start:b.end], average=False) for b in buckets]:
            t.wait()

    def segmented():
        for b in buckets:
            _exchange(buf[b.start:b.end], rank, world, groups[0], scratch[0], seg)

    dw, tw = default.reducer.works, det.reducer.works
    n = flat.numel()
    fns = {"ring_allreduce_ms": ring, "tree_allreduce_ms": tree, "tree_segmented_4MiB_ms": segmented,
           "default_bucket_checks_ms": lambda: [w.after(0) for w in dw],
           "chunk_norm_ms": lambda: [w.after(0) for w in tw]}
    if det.tree is not None:
        fns["tree_fold_micro_ms"] = lambda: det.tree.fold_micro(0)
        fns["tree_fold_last_ms"] = lambda: det.tree.fold_last(0, n)
    if det.norm.comm is None:
        fns["chunk_norm_finish_ms"] = det.norm.finish
    names = list(fns)
    times = side_by_side([fns[k] for k in names], device, repeats=repeats, warmup=2)
    out = {k: t * 1e3 for k, t in zip(names, times)}
    out["changed_exchange_same_bits"] = same_bits
    for g in groups:
        dist.destroy_process_group(g)
    return out


def _deterministic_rank(rank, world, device, gcfg, batch, accum, iters, zero, trace_prefix):
    """The default path and deterministic=True, the same model, inputs and micro-batches per
    rank, iterations interleaved; rank 0's rows."""
    dev = torch.device("cpu")
    dist.init_process_group("gloo")
    g = torch.Generator().manual_seed(rank)
    xs = [torch.randint(0, 256, (batch, gcfg.seq_len), generator=g) for _ in range(accum)]
    variants = []
    kinds = ["default", "deterministic"]
    for kind in kinds:
        model = _model(gcfg, dev)
        tag = kind
        engine = Engine(model, EngineConfig(
            lr=1e-4, weight_decay=0.1, clip_grad_norm=1.0, grad_accum_steps=accum, zero_stage=zero,
            overlap_param_gather=zero == 1, deterministic=kind != "default",
            trace_path=f"{trace_prefix}-zero{zero}-{tag}.json" if trace_prefix else None))

        def step(model=model, engine=engine):
            for x in xs:
                engine.backward(model(x, x))
                engine.step()

        variants.append((f"{kind} (zero {zero})", step, engine))
    default, det = variants[0][2], variants[1][2]
    for _, fn, _ in variants:
        for _ in range(2):
            fn()
    # after the warm-up: the first step's bucket rebuild makes a new norm (build.make_norm)
    timers = _Timers()
    timers.wrap(det.comm, "_halving", "exchange_halving")  # helper thread: the rounds and their adds
    timers.wrap(det.comm, "_doubling", "exchange_doubling")
    for lane in det.comm._lanes:
        timers.wrap(lane.p2p, "exchange", "exchange_send_recv")  # inside both: the messages alone
    timers.wrap(det.norm, "add_range", "chunk_sumsq")  # helper thread, after each bucket's exchange
    timers.wrap(det.norm, "finish", "chunk_norm_finish")  # main thread, in the step
    if det.tree is not None:
        timers.wrap(det.tree, "fold_micro", "tree_fold_micro")  # main thread, between micro-batches
        timers.wrap(det.tree, "fold_last", "tree_fold_last")  # main thread, in backward's hooks
    for _, _, engine in variants:
        engine.wait_for_params()
        engine.stats_counters.__init__()
    timers.reset()
    counted0 = {id(e): (e.comm.bytes_sent, e.comm.rounds) for _, _, e in variants if e is not default}
    marks = [len(e.tracer.events) for _, _, e in variants]
    samples = [[] for _ in variants]
    for _ in range(iters):
        for i, (_, fn, _) in enumerate(variants):
            dist.barrier()
            t0 = time.perf_counter()
            fn()
            samples[i].append(time.perf_counter() - t0)
    for _, _, engine in variants:
        engine.wait_for_params()
    timers.on = False

    tokens = batch * gcfg.seq_len * accum * world
    n_params = sum(p.numel() for p in default.params)
    rows = []
    for (name, _, engine), s, mark in zip(variants, samples, marks):
        med = statistics.median(s)
        st = engine.stats()
        mem = engine.memory_per_param()
        row = {"variant": name, "step_ms": med * 1e3, "step_ms_samples": [t * 1e3 for t in s],
               "tokens_per_s": tokens / med, "params": n_params, "grad_accum_per_rank": accum,
               "micro_batches_per_step": accum * world,
               "exposed_comm_ms": st["exposed_comm_s"] / max(1, st["windows"]) * 1e3,
               "comm_ms": st["comm_s"] / max(1, st["windows"]) * 1e3, "overlap": st["overlap_fraction"],
               "memory_per_param": mem, "bytes_per_param": mem["total"]}
        if engine is not default:
            sent0, rounds0 = counted0[id(engine)]
            row.update(wire_bytes_per_step=(engine.comm.bytes_sent - sent0) / iters,
                       wire_source="TreeComm.bytes_sent, counted", wire_bytes_model=_tree_bytes_model(engine),
                       rounds_per_step=(engine.comm.rounds - rounds0) / iters)
        if engine is det:
            row.update(parts_ms={k: v / iters * 1e3 for k, v in timers.total.items()},
                       parts_calls={k: v / iters for k, v in timers.calls.items()})
        elif engine is default:
            row.update(wire_bytes_per_step=_ring_bytes(engine, st["windows"]),
                       wire_source="ring model: 2 (d-1)/d x the buckets CommStats counted")
        if engine.tracer.enabled:
            row.update(trace_ms=_trace_parts(engine.tracer.events[mark:], iters),
                       comm_during_backward=_comm_during_backward(engine.tracer.events[mark:]))
        rows.append(row)
    for r, s in zip(rows, samples):
        r["vs_default"] = r["step_ms"] / rows[0]["step_ms"]
        # each iteration's pair, run back to back: noise that lasts longer than a step cancels
        r["vs_default_paired"] = statistics.median(a / b for a, b in zip(s, samples[0]))
    for r, (_, _, engine) in zip(rows, variants):
        r["optimizer_ms"] = _optimizer_ms(engine)
    isolated = _isolated(default, det, dev, repeats=max(5, iters // 2))
    for r, (_, _, engine) in zip(rows, variants):
        if engine.tracer.enabled:
            r["trace"] = engine.close()
    dist.destroy_process_group()
    return rows, isolated


def _run_deterministic(args):
    world = args.nproc
    gcfg = GPTConfig(seq_len=32, n_layer=6, n_head=8, d_model=512)
    batch = 1
    iters = 4 if args.quick else 24
    if args.quick:
        gcfg = GPTConfig(seq_len=32, n_layer=2, n_head=4, d_model=256)
    if args.model:
        from pyengine.train.model import PRESETS

        if args.model not in PRESETS:
            raise SystemExit(f"--model: one of {sorted(PRESETS)}")
        gcfg, batch = PRESETS[args.model], 16
    if args.batch_size:
        batch = args.batch_size
    accum = args.grad_accum or 2
    kind = (f"ddp-{args.model}" if args.model else "ddp") + "-deterministic" + \
        ("-zero1" if args.zero else "") + f"-{world}ranks"
    trace_prefix = f"{args.out}/trace-{kind}-cpu"
    Path(args.out).mkdir(parents=True, exist_ok=True)
    rows, isolated = spawn(_deterministic_rank, world, "cpu", gcfg, batch, accum, iters, args.zero, trace_prefix)
    print(f"{world} gloo ranks on {device_name('cpu')}: GPT {rows[0]['params'] / 1e6:.1f}M params, {accum} "
          f"micro-batches of {batch} x {gcfg.seq_len} tokens per rank and step ({accum * world} in all)")
    print_table(["variant", "step ms", "x default", "paired", "comm in bwd", "exposed ms", "wire MB/step",
                 "B/param"],
                [[r["variant"], f"{r['step_ms']:.1f}", f"{r['vs_default']:.3f}", f"{r['vs_default_paired']:.3f}",
                  f"{r.get('comm_during_backward', float('nan')):.0%}", f"{r['exposed_comm_ms']:.1f}",
                  f"{r['wire_bytes_per_step'] / 1e6:.1f}", f"{r['bytes_per_param']:.0f}"] for r in rows])
    for r in rows:
        print(f"{r['variant']}: memory per parameter {r['memory_per_param']}; traced ms/step "
              + ", ".join(f"{k} {v:.1f}" for k, v in r.get("trace_ms", {}).items()))
    det = rows[1]
    print("deterministic parts, ms per step as they ran: "
          + ", ".join(f"{k} {v:.1f}" for k, v in det["parts_ms"].items())
          + f"; {det['rounds_per_step']:.0f} rounds, {det['wire_bytes_per_step'] / 1e6:.1f} MB sent "
            f"(model {det['wire_bytes_model'] / 1e6:.1f} MB)")
    print("alone, ms: " + ", ".join(f"{k[:-3]} {v:.1f}" for k, v in isolated.items() if k.endswith("_ms"))
          + f"; the changed exchange sums the same bits: {isolated['changed_exchange_same_bits']}")
    extra = {"world": world, "batch": batch, "seq_len": gcfg.seq_len, "grad_accum_per_rank": accum,
             "zero": args.zero, "iters": iters, "isolated": isolated,
             "model": args.model or f"GPT {gcfg.n_layer} layers x {gcfg.d_model}"}
    print(f"wrote {write_results(kind, 'cpu', rows, args.out, extra)}")
    return 0


def run(args):
    if getattr(args, "deterministic", False):
        if args.device != "cpu":
            raise SystemExit("--deterministic: the CPU (gloo) only here")
        return _run_deterministic(args)
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
