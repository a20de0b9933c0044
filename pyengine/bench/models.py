"""Whole training steps of GPT-2-shaped models: the engine against PyTorch AMP, side by side.

For each shape and precision, one process holds both: the engine (half-precision params,
fp32 main grads, fused step) and PyTorch AMP as its users write it (fp32 params, autocast,
GradScaler for fp16, clip_grad_norm_(foreach), AdamW(fused)). Their iterations alternate
(forward, backward, step, then a device sync) so the machine's noise hits both alike; the
figures are medians. Models: HF GPT2LMHeadModel where transformers is installed, else the
main job's GPT with the same shape (layers, width, heads, sequence 1024, vocabulary 50257).

Reported per variant: ms per iteration, tokens/s, model TFLOP/s (6 x params + 12 x layers x
sequence x width per token: forward and backward, attention included), the fraction of the
card's peak (MFU) where the card is known, and peak memory (each variant's own: measured
while the other variant's memory is counted out).
"""
import statistics
import time

import torch

from pyengine import Engine, EngineConfig
from pyengine.devices import peak_tflops

from .common import device_name, print_table, sync, write_results

SHAPES = {  # name: (layers, width, heads), GPT-2's
    "124M": (12, 768, 12),
    "350M": (24, 1024, 16),
    "774M": (36, 1280, 20),
    "1.5B": (48, 1600, 25),
}
BATCH = {"124M": 16, "350M": 8, "774M": 8, "1.5B": 4}  # sequences of 1024 that fill an H200 for both
TINY = {"tiny": (2, 64, 2)}  # the CPU smoke run


def _build(shape, seq, vocab, device, seed=0):
    layers, width, heads = shape
    torch.manual_seed(seed)
    try:
        from transformers import GPT2Config, GPT2LMHeadModel

        cfg = GPT2Config(vocab_size=vocab, n_positions=seq, n_embd=width, n_layer=layers, n_head=heads,
                         resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        model = GPT2LMHeadModel(cfg).to(device)
        return model, (lambda m, x: m(x, labels=x).loss), "HF GPT2LMHeadModel"
    except ImportError:
        from pyengine.train.model import GPT, GPTConfig

        model = GPT(GPTConfig(vocab_size=vocab, seq_len=seq, n_layer=layers, n_head=heads, d_model=width)).to(device)
        return model, (lambda m, x: m(x, x)), "pyengine.train GPT"


def run_shape(name, shape, precision, batch, seq, vocab, device, iters):
    cuda = torch.device(device).type == "cuda"
    half = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]
    x = torch.randint(0, vocab, (batch, seq), device=device)

    def allocated():
        return torch.cuda.memory_allocated() if cuda else 0

    # torch AMP first, alone for its peak
    base = allocated()
    ref, loss_of, impl = _build(shape, seq, vocab, device)
    opt = torch.optim.AdamW(ref.parameters(), lr=1e-4, weight_decay=0.1, fused=cuda)
    scaler = torch.amp.GradScaler(torch.device(device).type, enabled=precision == "fp16")

    def torch_step():
        with torch.autocast(torch.device(device).type, dtype=half, enabled=precision != "fp32"):
            loss = loss_of(ref, x)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0, foreach=True)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)

    peak_torch = _peak(torch_step, device, base)
    base = allocated()
    model, _, _ = _build(shape, seq, vocab, device)
    engine = Engine(model, EngineConfig(precision=precision, lr=1e-4, weight_decay=0.1, clip_grad_norm=1.0,
                                        initial_loss_scale=2.0**12))

    def engine_step():
        engine.backward(loss_of(model, x))
        engine.step()

    peak_engine = _peak(engine_step, device, base)
    samples = {"engine": [], "torch": []}
    for _ in range(iters):
        for label, fn in (("engine", engine_step), ("torch", torch_step)):
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            samples[label].append(time.perf_counter() - t0)
    n_params = sum(p.numel() for p in model.parameters())
    flops = (6 * n_params + 12 * shape[0] * seq * shape[1]) * batch * seq  # forward + backward, attention too
    peak = peak_tflops(device)
    row = {"model": name, "impl": impl, "precision": precision, "batch": batch, "seq": seq, "params": n_params}
    for label in ("engine", "torch"):
        t = statistics.median(samples[label])
        row[f"{label}_ms"] = t * 1e3
        row[f"{label}_tokens_per_s"] = batch * seq / t
        row[f"{label}_tflops"] = flops / t / 1e12
        row[f"{label}_mfu"] = None if peak is None else flops / t / 1e12 / peak
    row["speedup"] = row["torch_ms"] / row["engine_ms"]
    row["engine_peak_gb"], row["torch_peak_gb"] = peak_engine / 2**30, peak_torch / 2**30
    engine.close()
    return row


def _peak(step, device, base, warmup=2):
    """Peak bytes above `base` over a couple of steps (GPU; 0 on the CPU)."""
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    for _ in range(warmup):
        step()
    sync(device)
    return torch.cuda.max_memory_allocated() - base if cuda else 0


def run(args):
    dev = args.device
    cuda = torch.device(dev).type == "cuda"
    shapes = TINY if (args.quick or not cuda) else SHAPES
    if args.models:
        shapes = {k: SHAPES[k] if k in SHAPES else TINY[k] for k in args.models.split(",")}
    precisions = ["bf16", "fp16"] if cuda else ["fp32"]
    seq, vocab = (1024, 50257) if cuda and not args.quick else (64, 256)
    iters = 3 if args.quick else 10
    rows = []
    for name, shape in shapes.items():
        for precision in precisions:
            batch = args.batch_size or BATCH.get(name, 4)
            rows.append(run_shape(name, shape, precision, batch, seq, vocab, dev, iters))
            if cuda:
                torch.cuda.empty_cache()  # both models of this row are gone
            r = rows[-1]
            print(f"{name} {precision}: engine {r['engine_ms']:.1f} ms, torch AMP {r['torch_ms']:.1f} ms, "
                  f"{r['speedup']:.2f}x", flush=True)
    print(f"{rows[0]['impl']} on {device_name(dev)}, sequence {seq}")
    print_table(["model", "prec", "batch", "torch AMP ms", "engine ms", "speedup", "engine tok/s", "engine TFLOP/s",
                 "MFU", "peak GB torch / engine"],
                [[r["model"], r["precision"], r["batch"], f"{r['torch_ms']:.1f}", f"{r['engine_ms']:.1f}",
                  f"{r['speedup']:.2f}x", f"{r['engine_tokens_per_s']:,.0f}", f"{r['engine_tflops']:.1f}",
                  "-" if r["engine_mfu"] is None else f"{r['engine_mfu']:.0%}",
                  f"{r['torch_peak_gb']:.1f} / {r['engine_peak_gb']:.1f}"] for r in rows])
    print(f"wrote {write_results('models', dev, rows, args.out)}")
    return 0
