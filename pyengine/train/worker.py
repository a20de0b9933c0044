"""One rank of the main job: data shard, model, Engine, training loop, checkpoints, report."""
import json
import logging
import math
import os
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

import pyengine
from pyengine import Engine, EngineConfig
from pyengine.devices import peak_tflops

from . import checkpoints, rundir
from .data import make_data, rank_micros
from .evaluate import evaluate, sample_text
from .folds import gather_equal, tree_mean
from .model import PRESETS, build_model, decay_groups, flops_per_token
from .schedule import lr_lambda

UNIFORM_LOSS = math.log(256)  # nats per byte of a uniform guess


# the main job's hyper-parameters of the optimizers whose param groups carry them
OPTIMIZER_SETTINGS = {"betas": (0.9, 0.95), "momentum": 0.9}


def optimizer_settings(name) -> dict:
    """EngineConfig fields for --optimizer `name`: whichever of OPTIMIZER_SETTINGS it uses, so an
    optimizer the engine adds gets the ones it shares with these and its defaults otherwise."""
    from pyengine.optim import SPECS

    return {k: v for k, v in OPTIMIZER_SETTINGS.items() if k in SPECS[name].group_keys}


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


def set_threads(args):
    """--threads: the CPU threads of this rank's torch ops and of the engine's core. Under
    --deterministic on the CPU a matmul's bits depend on its thread count, so every rank of
    every run uses the same number, whatever --nproc."""
    n = getattr(args, "threads", None)
    if n:
        torch.set_num_threads(n)
        pyengine.set_num_threads(n)


def local_accum(args, world) -> int:
    """Micro-batches this rank runs per step: under --deterministic --grad-accum counts the
    whole step's G over all ranks, of which each runs G / world."""
    if not getattr(args, "deterministic", False):
        return args.grad_accum
    if world & (world - 1) or args.grad_accum % world:
        raise ValueError(f"--deterministic: the world size {world} must be a power of two that divides --grad-accum "
                         f"{args.grad_accum}")
    return args.grad_accum // world


def train(args, stop=None):
    """Returns 0 when the run reached args.steps, 130 when it stopped early on request."""
    from .stop import StopFlag

    t_start = time.time()
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    local = int(os.environ.get("LOCAL_RANK", 0))
    log = _setup_logging(rank)
    deterministic = getattr(args, "deterministic", False)
    accum = local_accum(args, world)
    set_threads(args)
    stop = stop or StopFlag()
    device = torch.device("cuda", local) if args.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    lock_fd = None
    if rank == 0 and not os.environ.get("PYENGINE_TRAIN_LOCK_FD"):  # the user's torchrun: no launcher holds it
        lock_fd = rundir.lock(out)

    data = make_data(args, rank, world)
    micros = rank_micros(args, data)
    model = build_model(args, device)
    cfg = EngineConfig(precision=args.precision, optimizer=args.optimizer, lr=args.lr,
                       **optimizer_settings(args.optimizer), weight_decay=args.weight_decay,
                       clip_grad_norm=args.clip, grad_accum_steps=accum, comm_dtype=args.comm_dtype,
                       deterministic=deterministic,
                       comm_timeout=args.comm_timeout, zero_stage=getattr(args, "zero", 0),
                       # the GPT uses each parameter inside its own module's forward
                       overlap_param_gather=getattr(args, "zero", 0) == 1,
                       trace_path=str(out / "trace.json") if args.trace else None)
    engine = Engine(model, cfg, param_groups=decay_groups(model, args.weight_decay))
    if engine.world_size != world:
        raise RuntimeError(f"expected {world} ranks, the process group has {engine.world_size}")
    lr_at = lr_lambda(args)
    sched = torch.optim.lr_scheduler.LambdaLR(engine.optimizer, lr_at)
    start = 0
    if args.resume and not checkpoints.any_checkpoint(engine, out):
        if rank == 0:  # it stopped before its first checkpoint: it starts again (cli.py said so)
            rundir.truncate_metrics(out, 0)
    elif args.resume:
        extra, path = checkpoints.load_newest_good(engine, out)
        saved_world = (extra or {}).get("world_size", world)
        start = engine.boundary_steps
        sched.last_epoch = start
        for group, base in zip(engine.optimizer.param_groups, sched.base_lrs):
            group["lr"] = base * lr_at(start)  # the run's own schedule, whatever was saved
        if rank == 0:
            rundir.truncate_metrics(out, start)
            abandoned = checkpoints.remove_after(out, path)
            log.info("resumed %s at step %d from %s", out, start, path.name)
            if abandoned:
                log.warning("removed %s: written after %s by the run that stopped, they are not part of the run "
                            "that continues from it", ", ".join(abandoned), path.name)
            if saved_world != world and not deterministic:
                log.warning("the run had %d rank(s), this one has %d: the weights and optimizer state carry over "
                            "exactly, but each rank now reads another part of the data", saved_world, world)

    n_params = sum(p.numel() for p in model.parameters())
    tokens_per_step = args.batch_size * args.seq_len * accum * world  # under --deterministic: x G
    pbar = None
    if rank == 0:
        from tqdm import tqdm

        pbar = tqdm(total=args.steps, initial=start, desc="pyengine-train", unit="step", dynamic_ncols=True,
                    file=sys.stderr)
        log.info("%s: %.2fM params, %d rank(s) on %s, %s, %d tokens/step", args.model, n_params / 1e6, world,
                 device.type, args.precision, tokens_per_step)
    metrics = open(out / "metrics.jsonl", "a") if rank == 0 else None
    log_ = _MetricsLog(metrics, pbar, tokens_per_step)
    log_.mark_resumed = start > 0  # the first row written says the run resumed there
    comm_prev = engine.stats()
    step = start
    interrupted = False

    def save(at):
        log_.flush()  # a checkpoint at step s always has the metrics of steps <= s on disk
        checkpoints.save(engine, out, at, args.keep_checkpoints, extra={"world_size": world})

    graph = _StepGraph(model, engine) if getattr(args, "cuda_graph", False) else None
    # --baseline ddp on a fresh run: its steps alternate with the engine's (baseline.py)
    base = None
    if args.baseline == "ddp" and start == 0:
        from .baseline import DDPBaseline

        base = DDPBaseline(args, data, device, rank, world)
        log_.baseline_label = base.label
    try:
        while step < args.steps:
            t0 = time.perf_counter()
            lr = engine.optimizer.param_groups[0]["lr"]  # the lr this step uses
            if graph is not None and graph.ready(step - start):
                x, y = data.train_batch(args.seed, step, 0, args.batch_size)
                loss, result = graph.step(x, y)
                t1 = t0  # one replay: forward, backward and update are not told apart
            else:
                loss = torch.zeros((), device=device)
                losses = torch.zeros(accum, device=device) if deterministic else None
                for k, micro in enumerate(micros):
                    x, y = data.train_batch(args.seed, step, micro, args.batch_size)
                    x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                    micro_loss = model(x, y)
                    engine.backward(micro_loss)
                    if deterministic:
                        losses[k] = micro_loss.detach().float()
                    else:
                        loss += micro_loss.detach().float() / accum
                    if k < accum - 1:
                        engine.step()
                t1 = time.perf_counter()
                result = engine.step()
                if deterministic:
                    loss = step_loss(losses)
            sched.step()
            t2 = time.perf_counter()
            exposed = 0.0
            if device.type == "cpu":  # on CUDA stats() reads events (a sync): only at log points
                st = engine.stats()
                exposed = st["exposed_comm_s"] - comm_prev["exposed_comm_s"]
                comm_prev = st
            _record(log_, engine, loss, result, step, lr, t0, t1, t2, exposed)
            if base is not None:
                log_.baseline_step_s = base.step(step)["step_s"]
            step += 1
            if device.type == "cuda" and (step % args.log_every == 0 or step == args.steps):
                comm_prev = log_.spread_exposed(engine.stats(), comm_prev)
            if _after_step(args, step, log_, stop, save, rank):
                interrupted = True
                break
    except KeyboardInterrupt:
        interrupted = True
        log.warning("second interrupt: stopping without a checkpoint")
        raise
    finally:
        if rank == 0:
            try:
                log_.flush()
            finally:
                if pbar is not None:
                    pbar.close()
                if metrics is not None:
                    metrics.close()
    stop.finish()
    save(step)
    val = evaluate(model, data, args, device)
    trace = engine.close()
    summary = {"steps_done": step, "interrupted": interrupted, "val_loss": val, "uniform_loss": UNIFORM_LOSS,
               "params": n_params, "world_size": world, "memory_per_param": engine.memory_per_param(),
               "flops_per_token": flops_per_token(n_params, PRESETS[args.model], args.seq_len),
               "peak_tflops_per_device": peak_tflops(device), "device_name": _device_name(device),
               "skipped_steps": engine.skipped_steps, "loss_scale": engine.loss_scale, "comm": engine.stats(),
               "trace": trace, "data": describe_data(args, data, world)}
    if base is not None:
        if not interrupted:
            summary["baseline"] = base.finish(out)
        elif base.own_group:
            dist.destroy_process_group()
    elif args.baseline == "ddp" and not interrupted:  # resumed: the baseline runs afterwards, from step 0
        from .baseline import run_ddp_baseline

        summary["baseline"] = run_ddp_baseline(args, data, device, out, rank, world)
    if rank == 0:
        summary["sample"] = sample_text(model, data, device)
        summary.update(wall_times(out, t_start, bool(args.resume)))
        (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
        from .report import write_report

        path = write_report(out, vars(args), summary)
        log.info("held-out loss %.3f nats/byte (uniform guess %.3f); report: %s", val, UNIFORM_LOSS, path)
        if interrupted:
            log.warning("stopped at step %d (%s); continue with: pyengine-train --resume %s", step,
                        stop.why or "asked to stop", out)
    if dist.is_initialized():
        dist.barrier()
    if lock_fd is not None:
        os.close(lock_fd)
    return 130 if interrupted else 0


def describe_data(args, data, world) -> dict:
    """Where the text came from and how much of it: summary.json's and the report's."""
    from .data import StepData, corpus_files

    files = corpus_files(args.data)
    if isinstance(data, StepData):
        used = data.corpus.size  # every rank reads from the same bytes
    else:
        used = (data.train.numel() + data.val.numel()) * world  # about: the shards are equal to a byte
    return {"source": str(Path(args.data).resolve()) if args.data else "Python standard library (default)",
            "files": len(files), "corpus_bytes": sum(f.stat().st_size for f in files), "bytes_used": used,
            "max_data_mb": args.max_data_mb}


def wall_times(out, t_start, resumed) -> dict:
    """This invocation's wall time, and the run's over all its invocations (the earlier ones'
    from the summary.json they left; an invocation that crashed left none)."""
    now = time.time()
    earlier = 0.0
    if resumed:
        try:
            earlier = float(json.loads((out / "summary.json").read_text()).get("wall_s_total", 0.0))
        except (OSError, ValueError):
            pass
    return {"wall_s": now - t_start, "wall_s_total": earlier + now - t_start}


def step_loss(losses):
    """--deterministic: the step's loss as reported, the mean of all G micro-batch losses
    (this rank's `losses` are its share, in order), gathered in global order and folded in a
    fixed tree (folds.py): the same bits at any number of ranks. Without it the reported loss
    is rank 0's own mean."""
    return tree_mean(gather_equal(losses))


def _record(log_, engine, loss, result, step, lr, t0, t1, t2, exposed):
    log_.add(torch.stack([loss.reshape(()), engine.scaler.scale_tensor.reshape(()), result.flag.reshape(()),
                          engine.grad_norm_tensor.reshape(())]),
             {"step": step + 1, "time": time.time(), "lr": lr, "fwd_bwd_s": t1 - t0,
              "exposed_comm_s": exposed, "optimizer_s": max(0.0, t2 - t1 - exposed), "step_s": t2 - t0})


def _after_step(args, step, log_, stop, save, rank) -> bool:
    """Logging, checkpoints and the stop agreement after step `step`; True to stop."""
    _injected_fault(rank, step)
    if step % args.log_every == 0 or step == args.steps:
        log_.flush()
    if args.ckpt_every and step % args.ckpt_every == 0 and step < args.steps:
        save(step)
    return stop.poll()  # every rank, one step after any was asked to stop


class _StepGraph:
    """--cuda-graph: the first steps run eagerly (they warm up the kernels and allocator), then
    one step (forward on static inputs, backward, update) is captured and replayed."""

    eager_steps = 3

    def __init__(self, model, engine):
        self.model, self.engine, self.graph = model, engine, None

    def ready(self, steps_done) -> bool:
        return steps_done >= self.eager_steps

    def step(self, x, y):
        if self.graph is None:
            dev = self.engine.device
            self.x, self.y = torch.empty_like(x, device=dev), torch.empty_like(y, device=dev)

            def step_fn():
                loss = self.model(self.x, self.y)
                self.engine.backward(loss)
                return loss

            self.graph = self.engine.capture(step_fn, warmup=0)
        self.x.copy_(x, non_blocking=True)
        self.y.copy_(y, non_blocking=True)
        result = self.graph.replay()
        return self.graph.outputs.detach().float().clone(), result


def _device_name(device):
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def _injected_fault(rank, step):
    """PYENGINE_TRAIN_FAULT=RANK:STEP makes that rank raise after that step: how the tests (and
    anyone checking a deployment) see one rank fail on its own."""
    spec = os.environ.get("PYENGINE_TRAIN_FAULT")
    if spec and spec == f"{rank}:{step}":
        raise RuntimeError(f"injected failure (PYENGINE_TRAIN_FAULT={spec})")


class _MetricsLog:
    """Rank 0's metrics.jsonl and progress bar: one host read per flush, not per step."""

    def __init__(self, file, pbar, tokens_per_step):
        self.file, self.pbar, self.tokens_per_step = file, pbar, tokens_per_step
        self.pending = []  # per step: device tensor [loss, loss_scale, skipped, grad_norm] + host timings
        self.baseline_label, self.baseline_step_s = None, None  # --baseline ddp, interleaved
        self.mark_resumed = False
        self.t_window = time.perf_counter()

    def add(self, values, info):
        self.pending.append((values, info))

    def spread_exposed(self, stats, prev):
        """CUDA: spread the interval's exposed communication time over its steps."""
        if self.pending:
            share = (stats["exposed_comm_s"] - prev["exposed_comm_s"]) / len(self.pending)
            for _, info in self.pending:
                info["exposed_comm_s"] = share
                info["optimizer_s"] = max(0.0, info["step_s"] - info["fwd_bwd_s"] - share)
        return stats

    def flush(self):
        if not self.pending or (self.file is None and self.pbar is None):
            self.pending = []
            return
        values = torch.stack([v for v, _ in self.pending]).tolist()
        elapsed = time.perf_counter() - self.t_window
        if self.file is not None:
            for (loss, scale, skipped, norm), (_, info) in zip(values, self.pending):
                rec = {**info, "loss": loss, "loss_scale": scale, "skipped": bool(skipped), "grad_norm": norm,
                       "tokens_per_s": self.tokens_per_step / max(info["step_s"], 1e-9)}
                if self.mark_resumed:
                    rec["resumed"], self.mark_resumed = True, False
                self.file.write(json.dumps(rec) + "\n")
            self.file.flush()
        if self.pbar is not None:
            self.pbar.update(len(self.pending))
            if self.baseline_step_s is not None:  # the window's wall time holds the DDP steps too
                elapsed = sum(info["step_s"] for _, info in self.pending)
            tps = self.tokens_per_step * len(self.pending) / max(elapsed, 1e-9)
            post = {"loss": f"{values[-1][0]:.3f}", "tok_s": f"{tps:,.0f}", "scale": f"{values[-1][1]:g}"}
            if self.baseline_step_s is not None:
                post["step_ms"] = f"{1e3 * self.pending[-1][1]['step_s']:.0f}"
                post[self.baseline_label + " ms"] = f"{1e3 * self.baseline_step_s:.0f}"
            self.pbar.set_postfix(post)
        self.pending, self.t_window = [], time.perf_counter()
