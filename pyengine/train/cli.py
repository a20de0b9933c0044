"""pyengine-train: trains a small byte-level GPT out of the box.

With no arguments it trains on the Python standard library's source found on this machine,
one rank per GPU with NCCL when GPUs are present, otherwise 2 CPU ranks with gloo, and writes
metrics, a report, plots and a checkpoint under runs/<timestamp>/.

Several nodes: run the same command on every node through torchrun, e.g.
    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \\
        -m pyengine.train --model medium --out /shared/runs/exp1
"""
import argparse
import datetime
import json
import os
import sys
from pathlib import Path

from .model import PRESETS

PRECISIONS = ("fp32", "bf16", "fp16")


def _positive_int(text):
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v}")
    return v


def _positive_float(text):
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not v > 0 or v != v or v == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text}")
    return v


def build_parser():
    p = argparse.ArgumentParser(
        prog="pyengine-train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=_positive_int, default=300, help="optimizer steps to train (default 300)")
    p.add_argument("--model", choices=sorted(PRESETS), default="small",
                   help="model size preset: " + ", ".join(
                       f"{k} ({v.n_layer} layers x {v.d_model})" for k, v in PRESETS.items()) + " (default small)")
    p.add_argument("--batch-size", type=_positive_int, default=16, help="sequences per rank per micro-batch (16)")
    p.add_argument("--seq-len", type=_positive_int, default=None, help="tokens (bytes) per sequence "
                   "(default: the preset's)")
    p.add_argument("--grad-accum", type=_positive_int, default=1, help="micro-batches per optimizer step (1)")
    p.add_argument("--precision", choices=PRECISIONS, default=None,
                   help="parameter precision; master weights stay fp32 (default: fp32 on CPU, bf16 on GPU)")
    p.add_argument("--comm-dtype", choices=("fp32", "fp16", "bf16"), default=None,
                   help="gradient dtype on the wire (default: the gradient buffer's)")
    p.add_argument("--lr", type=_positive_float, default=2e-3, help="peak learning rate (2e-3), with warm-up and "
                   "cosine decay to 10%%")
    p.add_argument("--warmup", type=int, default=20, help="warm-up steps (20)")
    p.add_argument("--weight-decay", type=float, default=0.1, help="AdamW weight decay on matrices (0.1)")
    p.add_argument("--clip", type=_positive_float, default=1.0, help="global gradient-norm clip (1.0)")
    p.add_argument("--data", default=None, help="a text file or a folder of text files (default: the Python "
                   "standard library's source on this machine)")
    p.add_argument("--max-data-mb", type=_positive_float, default=16.0, help="bytes read per rank, in MB (16)")
    p.add_argument("--out", default=None, help="output folder (default runs/<timestamp>)")
    p.add_argument("--resume", default=None, metavar="DIR", help="continue the run in DIR where it stopped")
    p.add_argument("--seed", type=int, default=0, help="random seed (0)")
    p.add_argument("--baseline", choices=("ddp",), default=None,
                   help="afterwards, train the same run with torch DDP + AMP for a side-by-side report")
    p.add_argument("--trace", action="store_true", help="write a Chrome trace of backward, buckets and optimizer")
    p.add_argument("--nproc", type=_positive_int, default=None,
                   help="ranks on this machine (default: one per GPU, else 2 CPU ranks)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="(auto)")
    p.add_argument("--log-every", type=_positive_int, default=10, help="steps between progress updates (10)")
    p.add_argument("--ckpt-every", type=int, default=100, help="steps between checkpoints; 0: only at the end (100)")
    p.add_argument("--eval-batches", type=_positive_int, default=20, help="held-out batches per rank (20)")
    return p


def resolve(args, parser):
    """Checks what argparse cannot and fills defaults that depend on the machine."""
    import torch

    if args.resume:
        run_dir = Path(args.resume)
        cfg_path = run_dir / "config.json"
        if not (run_dir / "checkpoint.pt").exists() or not cfg_path.exists():
            parser.error(f"--resume {args.resume}: no checkpoint.pt and config.json there (is it a pyengine-train "
                         "output folder?)")
        saved = json.loads(cfg_path.read_text())
        steps = args.steps if _in_argv("--steps") else saved["steps"]
        args = argparse.Namespace(**{**saved, "steps": steps, "resume": str(run_dir), "out": str(run_dir)})
        return args
    if args.warmup < 0:
        parser.error("--warmup: must be >= 0")
    if args.weight_decay < 0:
        parser.error("--weight-decay: must be >= 0")
    if args.ckpt_every < 0:
        parser.error("--ckpt-every: must be >= 0")
    if args.data is not None and not Path(args.data).exists():
        parser.error(f"--data {args.data}: no such file or folder")
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no GPU is visible")
    if args.precision is None:
        if args.device == "cpu":
            args.precision = "fp32"  # bf16 matmuls are ~15x slower than fp32 on these CPUs
        else:
            args.precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if args.nproc is None:
        args.nproc = torch.cuda.device_count() if args.device == "cuda" else 2
    if args.device == "cuda" and args.nproc > torch.cuda.device_count():
        parser.error(f"--nproc {args.nproc}: only {torch.cuda.device_count()} GPU(s) visible")
    seq = args.seq_len or PRESETS[args.model].seq_len
    args.seq_len = seq
    if args.out is None:
        args.out = os.path.join("runs", datetime.datetime.now().strftime("%Y%m%d-%H%M%S"))
    return args


_ARGV = []


def _require_train_extras(parser):
    """The progress bar and the plots need the [train] extra; say so before any rank starts."""
    import importlib.util

    missing = [m for m in ("tqdm", "matplotlib") if importlib.util.find_spec(m) is None]
    if missing:
        parser.error(f"{' and '.join(missing)} missing: install the main job's extras with "
                     "pip install 'pyengine[train]' (or pip install '.[train]' in a clone)")


def _in_argv(flag):
    return any(a == flag or a.startswith(flag + "=") for a in _ARGV)


LAUNCH_ENV = "PYENGINE_TRAIN_LAUNCH"


def main(argv=None):
    from .worker import in_torchrun, train

    if in_torchrun() and os.environ.get(LAUNCH_ENV):
        # a rank we started: the resolved arguments travel as a file, not as argv
        from torch.distributed.elastic.multiprocessing.errors import record

        # record: the launcher's failure summary then names the rank and shows its traceback
        return record(train)(argparse.Namespace(**json.loads(Path(os.environ[LAUNCH_ENV]).read_text())))
    argv = list(sys.argv[1:] if argv is None else argv)
    _ARGV[:] = argv
    parser = build_parser()
    args = resolve(parser.parse_args(argv), parser)
    _require_train_extras(parser)
    if in_torchrun():  # started by the user's own torchrun (e.g. several nodes)
        return train(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if not args.resume:
        (out / "config.json").write_text(json.dumps(vars(args), indent=1))
    if args.nproc == 1:
        return train(args)
    return _launch(args)


def _launch(args):
    """Starts args.nproc ranks on this machine through torch.distributed's launcher."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    launch_file = Path(args.out) / ".launch.json"
    launch_file.write_text(json.dumps(vars(args)))
    os.environ[LAUNCH_ENV] = str(launch_file.resolve())
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // args.nproc)))
    launcher = get_args_parser().parse_args(
        ["--standalone", f"--nproc-per-node={args.nproc}", "--max-restarts=0", "--module", "pyengine.train"])
    try:
        run(launcher)
    except ChildFailedError as exc:
        # Ranks ended by a signal were stopped by the launcher (or by Ctrl-C); a rank that
        # exited with an error of its own is the cause, the earliest one first.
        signalled = (-2, -9, -15, 130)
        errors = [f for f in exc.failures.values() if f.exitcode not in signalled]
        if not errors:
            print(f"pyengine-train: interrupted; outputs so far are in {args.out} (resume with --resume {args.out})",
                  file=sys.stderr)
            return 130
        first = min(errors, key=lambda f: f.timestamp)
        print(exc.format_msg(), file=sys.stderr)
        print(f"pyengine-train: rank {first.global_rank} failed (exit code {first.exitcode}). Outputs so far: "
              f"{args.out}", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, SignalException):
        print(f"pyengine-train: interrupted; outputs so far are in {args.out} (resume with --resume {args.out})",
              file=sys.stderr)
        return 130
    return 0
