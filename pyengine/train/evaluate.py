"""Held-out loss and a text sample of the main job's model."""
import torch
import torch.distributed as dist

from .data import rank_eval_batches
from .folds import gather_strided, tree_mean


@torch.no_grad()
def evaluate(model, data, args, device):
    """Mean held-out loss over every rank's validation split; under --deterministic the mean
    of the --eval-batches batches, spread over the ranks and folded in a fixed order."""
    model.eval()
    if getattr(args, "deterministic", False):
        mine = rank_eval_batches(args, data)
        losses = torch.zeros(len(mine), device=device)
        for k, i in enumerate(mine):
            x, y = data.val_batch(args.seed, i, args.batch_size)
            losses[k] = model(x.to(device), y.to(device)).float()
        model.train()
        return float(tree_mean(gather_strided(losses, args.eval_batches)))
    total = torch.zeros((), device=device)
    for i in range(args.eval_batches):
        x, y = data.val_batch(args.seed, i, args.batch_size)
        total += model(x.to(device), y.to(device)).float()
    model.train()
    mean = total / args.eval_batches
    if dist.is_initialized():
        dist.all_reduce(mean, op=dist.ReduceOp.SUM)
        mean /= dist.get_world_size()
    return float(mean)


def sample_text(model, data, device, n=300):
    g = torch.Generator(device="cpu").manual_seed(0)
    prompt = data.prompt(min(64, model.config.seq_len // 2)).unsqueeze(0).to(device)
    model.eval()
    out = model.generate(prompt, n, generator=g if device.type == "cpu" else None)
    model.train()
    return bytes(out[0].tolist()).decode("utf-8", errors="replace")
