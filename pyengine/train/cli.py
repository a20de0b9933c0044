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

from pyengine.config import OPTIMIZERS

from .model import PRESETS
from .schedule import FINAL_FRACTION, short_float

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


PRESET_NOTES = {"large": "GPT-2 124M's layers at half its context",
                "gpt2": "GPT-2 124M's shape"}


def build_parser():
    p = argparse.ArgumentParser(
        prog="pyengine-train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=_positive_int, default=300,
                   help="optimizer steps to train (default 300); the lr schedule spans the --steps a run starts with: "
                        "a --resume with more trains the extra steps at the final lr")
    p.add_argument("--model", choices=sorted(PRESETS), default=None,
                   help="model size preset: " + ", ".join(
                       f"{k} ({v.n_layer} layers x {v.d_model}, {v.n_head} heads, {v.seq_len}-byte context"
                       f"{', ' + PRESET_NOTES[k] if k in PRESET_NOTES else ''})" for k, v in PRESETS.items()) +
                   " (default: small on a CPU, gpt2 on a GPU)")
    p.add_argument("--batch-size", type=_positive_int, default=None,
                   help="sequences per rank per micro-batch (default: 16 on a CPU; on a GPU, what fills its memory)")
    p.add_argument("--seq-len", type=_positive_int, default=None, help="tokens (bytes) per sequence "
                   "(default: the preset's)")
    p.add_argument("--grad-accum", type=_positive_int, default=None,
                   help="micro-batches per optimizer step on each rank (1); with --deterministic, the micro-batches "
                        "of the whole step over all ranks, G (8), of which each rank runs G/nproc")
    p.add_argument("--precision", choices=PRECISIONS, default=None,
                   help="parameter precision; master weights stay fp32 (default: fp32 on CPU, bf16 on GPU)")
    p.add_argument("--comm-dtype", choices=("fp32", "fp16", "bf16"), default=None,
                   help="gradient dtype on the wire (default: the gradient buffer's)")
    p.add_argument("--lr", type=_positive_float, default=2e-3, help="peak learning rate (2e-3), with warm-up and "
                   "cosine decay to 10%%")
    p.add_argument("--optimizer", choices=OPTIMIZERS, default="adamw",
                   help="the optimizer, as in torch.optim: " + ", ".join(OPTIMIZERS) + " (adamw); adamw and adam "
                        "with betas (0.9, 0.95), sgd with momentum 0.9 (it usually wants a larger --lr)")
    p.add_argument("--warmup", type=int, default=20, help="warm-up steps (20)")
    p.add_argument("--weight-decay", type=float, default=0.1, help="weight decay on matrices (0.1): decoupled with "
                   "adamw, added to the gradient (L2) with adam and sgd")
    p.add_argument("--clip", type=_positive_float, default=1.0, help="global gradient-norm clip (1.0)")
    p.add_argument("--data", default=None, help="a text file or a folder of text files (default: the Python "
                   "standard library's source on this machine)")
    p.add_argument("--max-data-mb", type=_positive_float, default=16.0,
                   help="bytes read per rank, in MB (16); with --deterministic, the size of the corpus all ranks "
                        "draw from (its first MB; each rank reads only its own batches' bytes)")
    p.add_argument("--out", default=None, help="output folder (default runs/<timestamp>)")
    p.add_argument("--resume", default=None, metavar="DIR", help="continue the run in DIR where it stopped")
    p.add_argument("--seed", type=int, default=0, help="random seed (0)")
    p.add_argument("--baseline", choices=("ddp",), default=None,
                   help="also train the same run with torch DDP (+ AMP autocast in bf16/fp16), its steps "
                        "alternating with the engine's, for a side-by-side report")
    p.add_argument("--trace", action="store_true", help="write a Chrome trace of backward, buckets and optimizer")
    p.add_argument("--nproc", type=_positive_int, default=None,
                   help="ranks on this machine (default: one per GPU, else 2 CPU ranks); under torchrun, "
                        "torchrun's world size is used and config.json records it with nproc_per_node and nnodes")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto (default): cuda when torch sees a GPU, else cpu")
    p.add_argument("--log-every", type=_positive_int, default=10, help="steps between progress updates (10)")
    p.add_argument("--ckpt-every", type=int, default=100, help="steps between checkpoints; 0: only at the end (100)")
    p.add_argument("--eval-batches", type=_positive_int, default=20,
                   help="held-out batches per rank (20); with --deterministic, in all, spread over the ranks")
    p.add_argument("--keep-checkpoints", type=_positive_int, default=2,
                   help="checkpoints kept in the run folder, newest first; a damaged one is skipped on --resume (2)")
    p.add_argument("--comm-timeout", type=_positive_float, default=300.0,
                   help="seconds a collective may wait for a stalled or dead rank before the run fails (300)")
    p.add_argument("--zero", type=int, choices=(0, 1), default=0,
                   help="1: shard the fp32 master weights and optimizer state over the ranks (ZeRO-1): 12 of the "
                        "16-18 bytes a parameter become 12/ranks (0)")
    p.add_argument("--deterministic", action="store_true",
                   help="bitwise the same run at any --nproc (1, 2, 4, ...: powers of two dividing --grad-accum): "
                        "the step's G micro-batches are drawn from the whole corpus by (seed, step, micro-batch) "
                        "alone, the engine sums their gradients in one fixed tree, reported losses are folded in a "
                        "fixed order, and on the CPU every rank uses --threads threads; a run may --resume at "
                        "another --nproc and continue bitwise")
    p.add_argument("--threads", type=_positive_int, default=None,
                   help="CPU threads per rank (default: OMP_NUM_THREADS if set, else the machine's cores / --nproc; "
                        "with --deterministic on the CPU, 1 at every --nproc, since a CPU matmul's bits depend on its "
                        "thread count)")
    p.add_argument("--cuda-graph", action="store_true",
                   help="capture each training step in a CUDA graph and replay it (one GPU, --grad-accum 1): for "
                        "models whose kernels are too small to hide their launch cost")
    return p


# flags that may differ on --resume: how the run is watched or how long it goes, and how its
# state is spread over ranks (a checkpoint loads at any --nproc and --zero)
RESUME_MAY_CHANGE = ("steps", "log_every", "ckpt_every", "eval_batches", "keep_checkpoints", "comm_timeout", "trace",
                     "baseline", "cuda_graph", "nproc", "zero")
# and, only without --deterministic (where they set the bits the run computes):
RESUME_MAY_CHANGE_UNLESS_DETERMINISTIC = ("threads",)


def resolve(args, parser, argv):
    """Checks what argparse cannot and fills defaults that depend on the machine."""
    import torch

    if args.resume:
        return _resolve_resume(args, parser, argv)
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
    from .worker import in_torchrun

    if in_torchrun():  # the user's torchrun decides: nproc is the whole world, on every node
        args.nproc = int(os.environ["WORLD_SIZE"])
    elif args.nproc is None:
        args.nproc = torch.cuda.device_count() if args.device == "cuda" else 2
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", args.nproc)) if in_torchrun() else args.nproc
    if args.device == "cuda" and per_node > torch.cuda.device_count():
        parser.error(f"--nproc {per_node}: only {torch.cuda.device_count()} GPU(s) visible")
    if args.grad_accum is None:
        args.grad_accum = 8 if args.deterministic else 1
    if args.baseline == "ddp":
        from .baseline import TORCH_OPTIMIZERS

        if args.optimizer not in TORCH_OPTIMIZERS:
            parser.error(f"--baseline ddp: no torch.optim counterpart is set up for --optimizer {args.optimizer} "
                         f"(only {', '.join(TORCH_OPTIMIZERS)})")
    if args.cuda_graph and (args.device != "cuda" or args.nproc != 1 or args.grad_accum != 1):
        parser.error("--cuda-graph: needs --device cuda with one rank (--nproc 1) and --grad-accum 1")
    if args.model is None:
        args.model = "gpt2" if args.device == "cuda" else "small"
    if args.deterministic:
        _check_deterministic(args, parser)
    args.seq_len = args.seq_len or PRESETS[args.model].seq_len
    if args.batch_size is None:
        args.batch_size = _gpu_batch(args) if args.device == "cuda" else 16
    _check_data_fits(args, parser)
    _check_attention_fits(args, parser)
    if args.out is None:
        args.out = _new_run_folder()
    args.schedule_steps = args.steps  # the lr schedule's length, kept on --resume (schedule.py)
    return args


def _check_deterministic(args, parser):
    """--deterministic: what it needs of the other flags, and the thread count it fixes."""
    _check_deterministic_split(args.nproc, args.grad_accum, parser)
    if args.comm_dtype not in (None, "fp32"):
        parser.error(f"--comm-dtype {args.comm_dtype} with --deterministic: the gradients travel in the fp32 they are "
                     "summed in (a narrower wire would round partial sums at levels that depend on --nproc); "
                     "drop --comm-dtype")
    if PRESETS[args.model].dropout > 0:
        parser.error(f"--deterministic: --model {args.model} uses dropout, whose masks would depend on the ranks; "
                     "a deterministic run needs a model without dropout")
    if args.threads is None and args.device == "cpu":
        args.threads = 1


def _check_deterministic_split(nproc, grad_accum, parser):
    if nproc & (nproc - 1):
        parser.error(f"--nproc {nproc} with --deterministic: the ranks must be a power of two (1, 2, 4, 8, ...)")
    if grad_accum % nproc:
        parser.error(f"--nproc {nproc} with --deterministic: it must divide --grad-accum {grad_accum} (the "
                     f"micro-batches of the whole step, each rank runs grad-accum / nproc of them)")


def _resolve_resume(args, parser, argv):
    run_dir = Path(args.resume)
    from .checkpoints import latest_checkpoint

    if not (run_dir / "config.json").exists():
        parser.error(f"--resume {args.resume}: no config.json there: not a pyengine-train run folder")
    saved = {**vars(build_parser().parse_args([])), **json.loads((run_dir / "config.json").read_text())}
    # runs started before the schedule's length was recorded kept their --steps
    saved["schedule_steps"] = saved.get("schedule_steps") or saved["steps"]
    given = vars(_explicit(argv))
    given.pop("resume", None)
    if "out" in given and Path(given.pop("out")).resolve() != run_dir.resolve():
        parser.error(f"--out with --resume {args.resume}: a run continues in its own folder; drop --out")
    may_change = RESUME_MAY_CHANGE + (() if saved.get("deterministic") else RESUME_MAY_CHANGE_UNLESS_DETERMINISTIC)
    conflicts = [k for k, v in given.items() if k not in may_change and v != saved.get(k)]
    if conflicts:
        what = ", ".join(f"--{k.replace('_', '-')} {given[k]} (the run has {saved.get(k)})" for k in conflicts)
        parser.error(f"--resume {args.resume}: {what}: these set what the run computes and cannot change "
                     "mid-run; drop them, or start a new run with another --out")
    changed = {k: v for k, v in given.items() if k in may_change and v != saved.get(k)}
    if saved.get("deterministic"):  # the step's G stays; the ranks that share it must still divide it
        _check_deterministic_split(changed.get("nproc", saved["nproc"]), saved["grad_accum"], parser)
    if "nproc" in changed and saved.get("device") == "cuda":
        import torch

        if changed["nproc"] > torch.cuda.device_count():
            parser.error(f"--nproc {changed['nproc']}: only {torch.cuda.device_count()} GPU(s) visible")
    if changed:
        print("pyengine-train: resuming with " + ", ".join(
            f"--{k.replace('_', '-')} {v} (was {saved.get(k)})" for k, v in changed.items()), file=sys.stderr)
    resolved = argparse.Namespace(**{**saved, **changed, "resume": str(run_dir), "out": str(run_dir)})
    from .worker import in_torchrun

    if in_torchrun():  # the user's torchrun sets the world this time
        resolved.nproc = int(os.environ["WORLD_SIZE"])
    if "steps" in changed and resolved.steps != resolved.schedule_steps:
        print(f"pyengine-train: {_schedule_note(resolved)}", file=sys.stderr)
    if latest_checkpoint(run_dir) is None:
        print(f"pyengine-train: --resume {args.resume}: the run stopped before its first checkpoint; starting it again "
              "from step 0 with its saved flags", file=sys.stderr)
    return resolved


def _schedule_note(args) -> str:
    """What a changed --steps does to the lr schedule, fixed when the run started."""
    length = args.schedule_steps
    final = short_float(args.lr * FINAL_FRACTION)
    if args.steps > length:
        return (f"--steps {args.steps}: the schedule of the first {length} steps is kept; steps {length + 1}-"
                f"{args.steps} train at the final lr {final}")
    return (f"--steps {args.steps}: the run stops early on the schedule of its first {length} steps (its lr has not "
            f"decayed to the final {final} yet)")


def _explicit(argv):
    """Only the options given on the command line (their defaults suppressed)."""
    p = build_parser()
    for action in p._actions:
        action.default = argparse.SUPPRESS
    return p.parse_args(argv)


def _check_data_fits(args, parser):
    """The corpus must give every rank one training and one held-out window."""
    from .data import corpus_files, held_out

    try:
        files = corpus_files(args.data)
    except FileNotFoundError as exc:
        parser.error(str(exc))
    total = sum(f.stat().st_size for f in files)
    if args.deterministic:  # one corpus for all ranks: a training and a held-out window
        size = min(total, int(args.max_data_mb * 1e6))
        need = 2 * (args.seq_len + 1)
        if size - held_out(size, args.seq_len) < args.seq_len + 1:
            where = args.data or "the Python standard library"
            parser.error(f"--data {where}: {size} bytes (--max-data-mb {args.max_data_mb}) are fewer than the {need} "
                         f"that --seq-len {args.seq_len} needs; use more data or a shorter --seq-len")
        return
    per_rank = min(total // args.nproc, int(args.max_data_mb * 1e6))
    need = 2 * (args.seq_len + 2) + args.seq_len
    if per_rank < need:
        where = args.data or "the Python standard library"
        parser.error(f"--data {where}: {total} bytes give each of {args.nproc} rank(s) {per_rank} bytes, fewer than the "
                     f"{need} that --seq-len {args.seq_len} needs; use more data, a shorter --seq-len or fewer ranks")


def _check_attention_fits(args, parser):
    """On the CPU, attention materializes a seq_len x seq_len score matrix per head: refuse a
    --seq-len whose scores alone would not fit in the memory the machine has free."""
    if args.device != "cpu":
        return
    cfg = PRESETS[args.model]
    # scores, softmax and their gradients: about 4 float32 copies, on every rank at once
    need = 4 * 4 * args.batch_size * cfg.n_head * args.seq_len ** 2 * args.nproc
    free = _free_memory()
    if free and need > 0.8 * free:
        parser.error(f"--seq-len {args.seq_len}: attention alone needs about {need / 2**30:.0f} GiB on this machine "
                     f"({args.nproc} rank(s) x batch {args.batch_size} x {cfg.n_head} heads x seq_len^2), "
                     f"{free / 2**30:.0f} GiB is free; lower --seq-len or --batch-size")


def _gpu_batch(args):
    """Sequences per micro-batch that fill about half of the GPU's free memory with
    activations (bf16, flash attention: about 40 bytes per token, layer and unit of width,
    for the forward tensors autograd keeps), between 1 and 64."""
    import torch

    cfg = PRESETS[args.model]
    free, _ = torch.cuda.mem_get_info()
    per_sequence = 40 * cfg.n_layer * cfg.d_model * args.seq_len
    return int(max(1, min(64, 0.5 * free // per_sequence)))


def _free_memory():
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _new_run_folder():
    base = os.path.join("runs", datetime.datetime.now().strftime("%Y%m%d-%H%M%S"))
    path, k = base, 1
    while os.path.exists(path):
        k += 1
        path = f"{base}-{k}"
    return path


def _require_train_extras(parser):
    """The progress bar and the plots need the [train] extra; say so before any rank starts."""
    import importlib.util

    missing = [m for m in ("tqdm", "matplotlib") if importlib.util.find_spec(m) is None]
    if missing:
        parser.error(f"{' and '.join(missing)} missing: install the main job's extras with "
                     "pip install 'pyengine[train]' (or pip install '.[train]' in a clone)")


def main(argv=None):
    from . import rundir
    from .worker import in_torchrun, train

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = resolve(parser.parse_args(argv), parser, argv)
    _require_train_extras(parser)
    out = Path(args.out)
    first = int(os.environ.get("RANK", "0")) == 0
    if first and not args.resume:
        try:
            rundir.check_fresh(out)
        except rundir.RunFolderError as exc:
            parser.error(str(exc))
    if in_torchrun():  # the user's own torchrun (e.g. several nodes): this process is one rank
        if first and not args.resume:
            out.mkdir(parents=True, exist_ok=True)
            world, per_node = int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_WORLD_SIZE", 1))
            recorded = {**vars(args), "nproc_per_node": per_node, "nnodes": max(1, world // per_node)}
            (out / "config.json").write_text(json.dumps(recorded, indent=1))
        from .stop import StopFlag, die_with_parent

        # the parent is torchrun's agent: its death (kill -9, a lost node) stops this rank at
        # the next step with a checkpoint, as under our own launcher
        stop = StopFlag()
        die_with_parent(os.getppid(), stop)
        return train(args, stop)
    try:
        lock_fd = rundir.lock(out)
    except rundir.RunFolderError as exc:
        print(f"pyengine-train: {exc}", file=sys.stderr)
        return 2
    if not args.resume:
        (out / "config.json").write_text(json.dumps(vars(args), indent=1))
    from .launch import Launcher

    return Launcher(args, out, lock_fd).run()
