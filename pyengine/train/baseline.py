"""--baseline ddp: the same run with what a PyTorch user writes: DistributedDataParallel,
AMP autocast (GradScaler for fp16), clip_grad_norm_(foreach), the same optimizer from
torch.optim (AdamW or Adam fused, SGD foreach)."""
import json
import statistics
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


def run_ddp_baseline(args, data, device, out, rank, world):
    own_group = not dist.is_initialized()
    if own_group:  # one rank: DDP still needs a process group
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=f"tcp://127.0.0.1:{port}",
                                rank=0, world_size=1)
    model = build_model(args, device)
    ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    groups = decay_groups(model, args.weight_decay)
    name, kwargs, state_bytes = TORCH_OPTIMIZERS[args.optimizer]
    opt = getattr(torch.optim, name)(groups, lr=args.lr, **kwargs)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(args))
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.precision)
    scaler = torch.amp.GradScaler(device.type, enabled=args.precision == "fp16")
    rows = []
    micros = rank_micros(args, data)  # the same micro-batches as the engine's run
    for step in range(args.steps):
        t0 = time.perf_counter()
        total = 0.0
        for k, micro in enumerate(micros):
            x, y = data.train_batch(args.seed, step, micro, args.batch_size)
            x, y = x.to(device), y.to(device)
            ctx = ddp.no_sync() if k < len(micros) - 1 else _null()
            with ctx, torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                loss = ddp(x, y) / len(micros)
            scaler.scale(loss).backward()
            total += loss.detach()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip, foreach=True)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        sched.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        rows.append({"step": step + 1, "loss": float(total), "step_s": time.perf_counter() - t0})
    if rank == 0:
        with open(out / "baseline_ddp.jsonl", "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
    tail = rows[len(rows) // 10:] or rows
    step_s = statistics.median(r["step_s"] for r in tail)
    tokens = args.batch_size * args.seq_len * len(micros) * world
    if own_group:
        dist.destroy_process_group()
    return {"step_s": step_s, "tokens_per_s": tokens / step_s, "final_loss": rows[-1]["loss"],
            # fp32 param + grad + optimizer state, plus the bucket copy of the gradients DDP keeps by default
            "val_loss": evaluate(model, data, args, device), "bytes_per_param": 4 + 4 + state_bytes + 4}


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False
