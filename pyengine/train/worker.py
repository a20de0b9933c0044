"""One rank of the main job: data shard, model, Engine, training loop, checkpoints, report."""
import json
import logging
import math
import os
import signal
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

from pyengine import Engine, EngineConfig

from .data import ShardData
from .evaluate import evaluate, sample_text
from .model import build_model, decay_groups
from .schedule import lr_lambda

UNIFORM_LOSS = math.log(256)  # nats per byte of a uniform guess


def in_torchrun():
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))


def _setup_logging(rank):
    """Warnings and log records from any rank reach the console marked with the rank."""
    logging.basicConfig(level=logging.WARNING, format=f"[rank {rank}] %(levelname)s %(message)s", stream=sys.stderr)
    logging.getLogger("pyengine").setLevel(logging.INFO)

    def show(message, category, filename, lineno, file=None, line=None):
        print(f"[rank {rank}] {category.__name__}: {message} ({os.path.basename(filename)}:{lineno})",
              file=sys.stderr)

    warnings.showwarning = show
    return logging.getLogger("pyengine.train")


class StopFlag:
    """Ctrl-C / SIGTERM ask for a clean stop at the next agreement point; another one, a few
    seconds later, stops at once.

    Note: a terminal's Ctrl-C reaches every rank and the launcher, which then forwards a
    signal of its own to each rank; repeats within `grace_s` count as the same request, so
    the ranks still checkpoint and report before they exit.
    """

    grace_s = 5.0

    def __init__(self):
        self.requested = False
        self._first = None
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._handler)

    def _handler(self, signum, frame):
        now = time.monotonic()
        if self.requested and now - self._first > self.grace_s:
            raise KeyboardInterrupt
        if not self.requested:
            self.requested, self._first = True, now

    def agreed(self, device):
        """True on every rank when any rank was asked to stop."""
        if not (dist.is_available() and dist.is_initialized()):
            return self.requested
        t = torch.tensor([1.0 if self.requested else 0.0], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())


def train(args):
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    local = int(os.environ.get("LOCAL_RANK", 0))
    log = _setup_logging(rank)
    device = torch.device("cuda", local) if args.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stop = StopFlag()

    data = ShardData(args.data, rank, world, args.seq_len, int(args.max_data_mb * 1e6))
    model = build_model(args, device)
    cfg = EngineConfig(precision=args.precision, lr=args.lr, betas=(0.9, 0.95), weight_decay=args.weight_decay,
                       clip_grad_norm=args.clip, grad_accum_steps=args.grad_accum, comm_dtype=args.comm_dtype,
                       trace_path=str(out / "trace.json") if args.trace else None)
    engine = Engine(model, cfg, param_groups=decay_groups(model, args.weight_decay))
    if engine.world_size != world:
        raise RuntimeError(f"expected {world} ranks, the process group has {engine.world_size}")
    sched = torch.optim.lr_scheduler.LambdaLR(engine.optimizer, lr_lambda(args))
    ckpt = out / "checkpoint.pt"
    start = 0
    if args.resume:
        sd = torch.load(ckpt, map_location="cpu", weights_only=False)
        saved_world = sd.get("extra", {}).get("world_size", world)
        if saved_world != world:
            raise ValueError(f"--resume: the run used {saved_world} ranks, this one has {world}; resume with "
                             f"--nproc {saved_world} (each rank's data shard depends on it)")
        engine.load_state_dict(sd)
        start = engine.boundary_steps
        sched.last_epoch = start
        if rank == 0:
            log.info("resumed %s at step %d", out, start)

    n_params = sum(p.numel() for p in model.parameters())
    tokens_per_step = args.batch_size * args.seq_len * args.grad_accum * world
    pbar = None
    if rank == 0:
        from tqdm import tqdm

        pbar = tqdm(total=args.steps, initial=start, desc="pyengine-train", unit="step", dynamic_ncols=True,
                    file=sys.stderr)
        log.info("%s: %.2fM params, %d rank(s) on %s, %s, %d tokens/step", args.model, n_params / 1e6, world,
                 device.type, args.precision, tokens_per_step)
    metrics = open(out / "metrics.jsonl", "a") if rank == 0 else None
    pending = []  # per step: device tensor [loss, loss_scale, skipped, grad_norm] + host timings
    comm_prev = engine.stats()
    step = start
    interrupted = False
    t_window = time.perf_counter()
    try:
        while step < args.steps:
            t0 = time.perf_counter()
            loss_sum = torch.zeros((), device=device)
            for micro in range(args.grad_accum):
                x, y = data.train_batch(args.seed, step, micro, args.batch_size)
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                loss = model(x, y)
                engine.backward(loss)
                loss_sum += loss.detach().float()
                if micro < args.grad_accum - 1:
                    engine.step()
            t1 = time.perf_counter()
            result = engine.step()
            sched.step()
            t2 = time.perf_counter()
            exposed = 0.0
            if device.type == "cpu":  # on CUDA stats() reads events (a sync): only at log points
                st = engine.stats()
                exposed = st["exposed_comm_s"] - comm_prev["exposed_comm_s"]
                comm_prev = st
            pending.append((torch.stack([loss_sum / args.grad_accum, engine.scaler.scale_tensor.reshape(()),
                                         result.flag.reshape(()), engine.grad_norm_tensor.reshape(())]),
                            {"step": step + 1, "lr": engine.optimizer.param_groups[0]["lr"],
                             "fwd_bwd_s": t1 - t0, "exposed_comm_s": exposed, "optimizer_s": max(0.0, t2 - t1 - exposed),
                             "step_s": t2 - t0}))
            step += 1
            if step % args.log_every == 0 or step == args.steps:
                if device.type == "cuda":  # spread the interval's exposed time over its steps
                    st = engine.stats()
                    share = (st["exposed_comm_s"] - comm_prev["exposed_comm_s"]) / len(pending)
                    comm_prev = st
                    for _, info in pending:
                        info["exposed_comm_s"] = share
                        info["optimizer_s"] = max(0.0, info["step_s"] - info["fwd_bwd_s"] - share)
                _flush(pending, metrics, pbar, tokens_per_step, t_window)
                pending, t_window = [], time.perf_counter()
                if stop.agreed(device):
                    interrupted = True
                    break
            if args.ckpt_every and step % args.ckpt_every == 0:
                _save(engine, ckpt, world)
    except KeyboardInterrupt:
        interrupted = True
        log.warning("second interrupt: stopping without waiting for the other ranks")
        raise
    finally:
        if pending and rank == 0:
            _flush(pending, metrics, pbar, tokens_per_step, t_window)
        if pbar is not None:
            pbar.close()
        if metrics is not None:
            metrics.close()
    _save(engine, ckpt, world)
    val = evaluate(model, data, args, device)
    trace = engine.close()
    summary = {"steps_done": step, "interrupted": interrupted, "val_loss": val, "uniform_loss": UNIFORM_LOSS,
               "params": n_params, "world_size": world, "memory_per_param": engine.memory_per_param(),
               "skipped_steps": engine.skipped_steps, "loss_scale": engine.loss_scale, "comm": engine.stats(),
               "trace": trace}
    if args.baseline == "ddp" and not interrupted:
        from .baseline import run_ddp_baseline

        summary["baseline"] = run_ddp_baseline(args, data, device, out, rank, world)
    if rank == 0:
        summary["sample"] = sample_text(model, data, device)
        (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
        from .report import write_report

        path = write_report(out, vars(args), summary)
        log.info("held-out loss %.3f nats/byte (uniform guess %.3f); report: %s", val, UNIFORM_LOSS, path)
        if interrupted:
            log.warning("interrupted at step %d; continue with: pyengine-train --resume %s", step, out)
    if dist.is_initialized():
        dist.barrier()
    return 130 if interrupted else 0


def _save(engine, path, world):
    engine.save(path, extra={"world_size": world})


def _flush(pending, metrics, pbar, tokens_per_step, t_window):
    if not pending:
        return
    values = torch.stack([v for v, _ in pending]).tolist()  # one host read per interval
    elapsed = time.perf_counter() - t_window
    tps = tokens_per_step * len(pending) / max(elapsed, 1e-9)
    if metrics is not None:
        for (loss, scale, skipped, norm), (_, info) in zip(values, pending):
            rec = {**info, "loss": loss, "loss_scale": scale, "skipped": bool(skipped), "grad_norm": norm,
                   "tokens_per_s": tokens_per_step / max(info["step_s"], 1e-9)}
            metrics.write(json.dumps(rec) + "\n")
        metrics.flush()
    if pbar is not None:
        pbar.update(len(pending))
        pbar.set_postfix(loss=f"{values[-1][0]:.3f}", tok_s=f"{tps:,.0f}", scale=f"{values[-1][1]:g}")
