"""The main job's learning-rate schedule: linear warm-up, then cosine decay to 10%.

Note: the schedule's length is fixed when a run starts (`schedule_steps` in config.json, the
--steps it started with). A --resume with a larger --steps trains the extra steps at the
final lr; one with a smaller --steps stops earlier on the same schedule. Stretching the
cosine to the new length instead would raise the lr of every step still to come (up to
5.7x for 300 -> 600 steps) in the middle of the run.
"""
import math

FINAL_FRACTION = 0.1  # of the peak lr, reached at the end of the schedule and kept after it


def schedule_steps(args) -> int:
    """The schedule's length: the --steps the run started with (runs started before it was
    recorded kept their --steps in config.json)."""
    return getattr(args, "schedule_steps", None) or args.steps


def lr_lambda(args):
    length = schedule_steps(args)

    def f(step):
        if args.warmup and step < args.warmup:
            return (step + 1) / args.warmup
        progress = min(1.0, (step - args.warmup) / max(1, length - args.warmup))
        return FINAL_FRACTION + (1 - FINAL_FRACTION) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


def short_float(x: float) -> str:
    """2e-4 rather than 0.0002 or 2e-04."""
    mantissa, exponent = f"{x:.6e}".split("e")
    mantissa = mantissa.rstrip("0").rstrip(".")
    return f"{mantissa}e{int(exponent)}"
