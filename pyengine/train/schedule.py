"""The main job's learning-rate schedule: linear warm-up, then cosine decay to 10%."""
import math


def lr_lambda(args):
    def f(step):
        if args.warmup and step < args.warmup:
            return (step + 1) / args.warmup
        progress = min(1.0, (step - args.warmup) / max(1, args.steps - args.warmup))
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    return f
