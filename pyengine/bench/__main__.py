"""python -m pyengine.bench {kernels,step,overhead,models,allreduce,ddp,lightning,hf} [options]"""
import argparse
import sys


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m pyengine.bench", description=__doc__)
    sub = parser.add_subparsers(dest="which", required=True)
    for name, help_text in [
        ("kernels", "each fused kernel against its PyTorch equivalent, with % of streaming bandwidth"),
        ("step", "engine.step() against GradScaler.unscale_ + clip_grad_norm_ + fused AdamW"),
        ("overhead", "host cost: a 48-tensor toy model against torch's loop, engine.step() host time, op calls"),
        ("models", "GPT-2 124M-1.5B training steps against PyTorch AMP: tokens/s, TFLOP/s, MFU, peak memory"),
        ("allreduce", "nccl-tests style allreduce table for each available backend"),
        ("ddp", "the engine against torch DDP, side by side on several ranks"),
        ("lightning", "a Lightning Trainer step with EngineStrategy against Lightning's own default, side by side"),
        ("hf", "a Hugging Face Trainer step with pyengine against the Trainer's own default (Accelerate)"),
    ]:
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
        p.add_argument("--out", default="benchmarks/results", help="folder for the JSON results")
        p.add_argument("--quick", action="store_true", help="fewer sizes and repeats (smoke run)")
        if name in ("allreduce", "ddp"):
            p.add_argument("--nproc", type=int, default=2, help="ranks to spawn (default 2)")
        if name == "ddp":
            p.add_argument("--model", default=None,
                           help="a pyengine-train preset (e.g. small, the main job's default) instead of the "
                                "overhead-bound 19M-parameter GPT with one 32-token sequence per rank")
            p.add_argument("--batch-size", type=int, default=None, help="sequences per rank (with --model: 16)")
            p.add_argument("--zero", type=int, choices=(0, 1), default=0,
                           help="1: the engine unsharded and with ZeRO-1 side by side, with each rank's "
                                "optimizer time (default 0: fp32 and bf16 wire)")
            p.add_argument("--deterministic", action="store_true",
                           help="the default path (gloo's ring) against EngineConfig(deterministic=True) "
                                "(fixed tree and fixed-pairing exchange), at the --zero stage given")
            p.add_argument("--grad-accum", type=int, default=None,
                           help="with --deterministic: micro-batches per rank and step (default 2)")
        if name == "models":
            p.add_argument("--models", default=None, help="comma-separated shapes (default: 124M,350M,774M,1.5B "
                           "on a GPU; a tiny one on the CPU)")
            p.add_argument("--batch-size", type=int, default=None, help="sequences per step (default: per shape)")
    args = parser.parse_args(argv)
    import importlib

    module = {"lightning": "lightning_bench", "hf": "hf_bench"}.get(args.which, args.which)
    mod = importlib.import_module(f"pyengine.bench.{module}")
    return mod.run(args)


if __name__ == "__main__":
    sys.exit(main())
