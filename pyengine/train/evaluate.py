"""Held-out loss and a text sample of the main job's model."""
import torch
import torch.distributed as dist


@torch.no_grad()
def evaluate(model, data, args, device):
    """Mean held-out loss over every rank's validation split."""
    model.eval()
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
    prompt = data.val[: min(64, model.config.seq_len // 2)].unsqueeze(0).to(device)
    model.eval()
    out = model.generate(prompt, n, generator=g if device.type == "cpu" else None)
    model.train()
    return bytes(out[0].tolist()).decode("utf-8", errors="replace")
