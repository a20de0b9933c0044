"""--baseline ddp: the same run with what a PyTorch user writes: DistributedDataParallel,
AMP autocast in bf16/fp16 (GradScaler for fp16; plain fp32 otherwise), clip_grad_norm_(foreach),
the same optimizer from torch.optim (AdamW or Adam fused, SGD foreach). A fresh run
alternates its steps with the engine's (engine step, DDP step, ...) so that both are timed
under the same load; a resumed run trains the baseline afterwards, from step 0."""
import json
import statistics
import sys
import time

import torch
import torch.distributed as dist

from .data import rank_micros
from .evaluate import evaluate
from .model import build_model, decay_groups
from .schedule import lr_lambda


# --optimizer -> what a PyTorch user writes for it; (name, keyword arguments, state bytes per parameter)
TORCH_OPTIMIZERS = {
    "adamw": ("AdamW", {"betas": (0.9, 0.95), "fused": True}, 8),
    "adam": ("Adam", {"betas": (0.9, 0.95), "fused": True}, 8),
    "sgd": ("SGD", {"momentum": 0.9, "foreach": True}, 4),
}


def label(precision) -> str:
    """What the baseline runs, as the report and the progress bar name it."""
    return "DDP" if precision == "fp32" else f"DDP + AMP ({precision})"


class DDPBaseline:
    """The baseline one step at a time, so the main job can alternate its steps with the
    engine's: both runs see the same load on a shared machine (the timed steps interleave)."""

    def __init__(self, args, data, device, rank, world):
        self.args, self.data, self.device, self.rank, self.world = args, data, device, rank, world
        self.own_group = not dist.is_initialized()
        if self.own_group:  # one rank: DDP still needs a process group
            import socket

            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                    init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
        self.model = model = build_model(args, device)
        self.ddp = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
        name, kwargs, self.state_bytes = TORCH_OPTIMIZERS[args.optimizer]
        self.opt = getattr(torch.optim, name)(decay_groups(model, args.weight_decay), lr=args.lr, **kwargs)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lr_lambda(args))
        self.amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.precision)
        self.scaler = torch.amp.GradScaler(device.type, enabled=args.precision == "fp16")
        self.micros = rank_micros(args, data)  # the same micro-batches as the engine's run
        self.rows = []
        self.label = label(args.precision)
        self.interleaved = True  # run_ddp_baseline says otherwise

    def step(self, step) -> dict:
        args, device, micros = self.args, self.device, self.micros
        t0 = time.perf_counter()
        total = 0.0
        for k, micro in enumerate(micros):
            x, y = self.data.train_batch(args.seed, step, micro, args.batch_size)
            x, y = x.to(device), y.to(device)
            ctx = self.ddp.no_sync() if k < len(micros) - 1 else _null()
            with ctx, torch.autocast(device.type, dtype=self.amp, enabled=self.amp is not None):
                loss = self.ddp(x, y) / len(micros)
            self.scaler.scale(loss).backward()
            total += loss.detach()
        self.scaler.unscale_(self.opt)
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), args.clip, foreach=True)
        self.scaler.step(self.opt)
        self.scaler.update()
        self.opt.zero_grad(set_to_none=True)
        self.sched.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        row = {"step": step + 1, "loss": float(total), "step_s": time.perf_counter() - t0, "time": time.time()}
        self.rows.append(row)
        return row

    def finish(self, out) -> dict:
        rows, args = self.rows, self.args
        if self.rank == 0:
            with open(out / "baseline_ddp.jsonl", "w") as f:
                for r in rows:
                    f.write(json.dumps(r) + "\n")
        tail = rows[len(rows) // 10:] or rows
        step_s = statistics.median(r["step_s"] for r in tail)
        tokens = args.batch_size * args.seq_len * len(self.micros) * self.world
        val = evaluate(self.model, self.data, args, self.device)
        if self.own_group:
            dist.destroy_process_group()
        return {"label": self.label, "interleaved": self.interleaved, "step_s": step_s, "tokens_per_s": tokens / step_s, "final_loss": rows[-1]["loss"],
                # fp32 param + grad + optimizer state, plus the bucket copy of the gradients DDP keeps by default
                "val_loss": val, "bytes_per_param": 4 + 4 + self.state_bytes + 4}


def run_ddp_baseline(args, data, device, out, rank, world):
    """The whole baseline after the engine's run (a resumed run: the baseline has no checkpoint)."""
    base = DDPBaseline(args, data, device, rank, world)
    base.interleaved = False
    pbar = None
    if rank == 0:
        from tqdm import tqdm

        pbar = tqdm(total=args.steps, desc=f"baseline {base.label}", unit="step", dynamic_ncols=True, file=sys.stderr)
    for step in range(args.steps):
        row = base.step(step)
        if pbar is not None:
            pbar.update(1)
            pbar.set_postfix(loss=f"{row['loss']:.3f}", step_ms=f"{1e3 * row['step_s']:.0f}")
    if pbar is not None:
        pbar.close()
    return base.finish(out)


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False
