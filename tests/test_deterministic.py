"""EngineConfig(deterministic=True): the same bits at 1, 2 and 4 gloo ranks (deterministic.py).

A GPT of the main job, AdamW with a clip that binds, G = 8 micro-batches of 2 sequences per
step: rank r of d runs micro-batches [r 8/d, (r+1) 8/d) of each step. One thread per process
(a CPU matmul's bits depend on its thread count). Compared after 20 steps: the parameters,
the fp32 master weights and the Adam moments (the canonical checkpoint arrays), the loss
scale and every step's reported grad norm, all with torch.equal (bitwise).
"""
import copy

import pytest
import torch

from dist_util import ok, run_ranks

pytestmark = pytest.mark.slow

G = 8  # micro-batches per step, whatever the world size
MICRO = 2  # sequences per micro-batch
SEQ = 32


def det_rank(rank, world, cfg_kwargs, steps, opts=None):
    """Trains `steps` steps of the fixed global batches; opts: save_to, load_from, start,
    overflow_at (a step whose micro-batch 3 overflows in fp16)."""
    opts = opts or {}
    from pyengine import Engine, EngineConfig
    from pyengine.train.model import GPT, PRESETS, decay_groups

    torch.manual_seed(0)
    model = GPT(copy.deepcopy(PRESETS["tiny"]))
    m = G // world
    cfg = dict(lr=3e-3, weight_decay=0.1, clip_grad_norm=0.5, grad_accum_steps=m, bucket_mb=0.05,
               first_bucket_mb=0.01, loss_scale_window=4, deterministic=True)
    cfg.update(cfg_kwargs)
    engine = Engine(model, EngineConfig(**cfg), param_groups=decay_groups(model, 0.1))
    start = opts.get("start", 0)
    if opts.get("load_from"):
        engine.load(opts["load_from"])
    text = torch.randint(0, 32, (8192,), generator=torch.Generator().manual_seed(123))
    norms, skipped, scales = [], [], []
    for step in range(start, start + steps):
        for j in range(rank * m, (rank + 1) * m):  # this rank's micro-batches of the global batch
            gen = torch.Generator().manual_seed(1000 * step + j)
            starts = torch.randint(0, text.numel() - SEQ - 1, (MICRO,), generator=gen)
            x = torch.stack([text[s:s + SEQ] for s in starts])
            y = torch.stack([text[s + 1:s + SEQ + 1] for s in starts])
            loss = model(x, y)
            if step == opts.get("overflow_at") and j == 3:
                loss = loss + float("inf") * model.ln_f.bias.sum()
            engine.backward(loss)
            result = engine.step()
        norms.append(engine.grad_norm)
        skipped.append(result.skipped)
        scales.append(engine.loss_scale)
    if opts.get("save_to"):
        engine.save(opts["save_to"])
    engine.wait_for_params()
    params = torch.cat([p.detach().float().flatten() for p in model.parameters()])
    return {"params": params, "norms": torch.tensor(norms, dtype=torch.float64), "skipped": skipped,
            "scales": scales, "mem": engine.memory_per_param(), "global_step": engine.global_step}
