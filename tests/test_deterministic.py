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
    overflow_at (a step whose micro-batch 3 overflows in fp16), device."""
    opts = opts or {}
    from pyengine import Engine, EngineConfig
    from pyengine.train.model import GPT, PRESETS, decay_groups

    device = torch.device(opts.get("device", "cpu"))
    if device.type == "cuda":
        torch.use_deterministic_algorithms(True)  # GPU kernels' bits (see the README)
    torch.manual_seed(0)
    model = GPT(copy.deepcopy(PRESETS["tiny"])).to(device)
    m = G // world
    cfg = dict(lr=3e-3, weight_decay=0.1, clip_grad_norm=0.25, grad_accum_steps=m, bucket_mb=0.05,
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
            x = torch.stack([text[s:s + SEQ] for s in starts]).to(device)
            y = torch.stack([text[s + 1:s + SEQ + 1] for s in starts]).to(device)
            loss = model(x, y)
            if step == opts.get("overflow_at") and j == 3 and cfg["precision"] == "fp16":
                loss = loss + float("inf") * model.ln_f.bias.sum()
            engine.backward(loss)
            result = engine.step()
        norms.append(engine.grad_norm)
        skipped.append(result.skipped)
        scales.append(engine.loss_scale)
    engine.wait_for_params()
    params = torch.cat([p.detach().float().flatten() for p in model.parameters()]).cpu()
    out = {"params": params, "norms": torch.tensor(norms, dtype=torch.float64), "skipped": skipped,
           "scales": scales, "mem": engine.memory_per_param(), "global_step": engine.global_step,
           "state": _canonical_state(engine, opts.get("state_dir") or opts["save_to"])}
    if engine.tree is not None:
        out["tree_bytes"] = sum(t.numel() * t.element_size() for t in engine.tree.slots)
        out["layout_numel"] = engine.flat.layout.numel
    engine.close()
    return out


def _canonical_state(engine, folder):
    """fp32 master weights and Adam moments in registration order: the canonical arrays of a
    checkpoint folder (each rank writes its shard; read() joins them)."""
    from pyengine.checkpoint import read

    engine.save(folder)
    saved = read(folder)
    return {k: saved[k].clone() for k in ("master", "exp_avg", "exp_avg_sq")}


def many(rank, world, configs, steps, folder, opts=None):
    """det_rank for several configurations in one process (one start-up for all)."""
    return [det_rank(rank, world, c, steps, dict(opts or {}, state_dir=f"{folder}/{k}")) for k, c in enumerate(configs)]


CONFIGS = [dict(precision="fp32", zero_stage=0), dict(precision="fp32", zero_stage=1),
           dict(precision="bf16", zero_stage=0), dict(precision="bf16", zero_stage=1, overlap_param_gather=True),
           dict(precision="fp16", zero_stage=1, initial_loss_scale=2.0**10)]
DEFAULT_PATH = [dict(precision="fp32", zero_stage=1, deterministic=False)]
STEPS = 20
OVERFLOW_AT = 3  # micro-batch 3 of step 3: rank 0's at 2 ranks, rank 1's at 4


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Each world size's results for CONFIGS (+ the default path at 2 and 4 ranks), rank 0's."""
    out = {}
    for world in (1, 2, 4):
        configs = CONFIGS + (DEFAULT_PATH if world > 1 else [])
        folder = str(tmp_path_factory.mktemp(f"world{world}"))
        ranks = ok(run_ranks(many, world, configs, STEPS, folder, dict(overflow_at=OVERFLOW_AT)), world)
        out[world] = ranks[0]
        for r in ranks[1:]:  # every rank holds the same parameters
            for a, b in zip(ranks[0], r):
                assert torch.equal(a["params"], b["params"])
    return out


def _assert_bitwise(a, b, what):
    assert torch.equal(a["params"], b["params"]), f"{what}: parameters differ by up to " \
        f"{(a['params'] - b['params']).abs().max().item():.3g}"
    for k in a["state"]:
        assert torch.equal(a["state"][k], b["state"][k]), f"{what}: {k} differs"
    assert torch.equal(a["norms"], b["norms"]), f"{what}: grad norms {a['norms'].tolist()} vs {b['norms'].tolist()}"
    assert a["scales"] == b["scales"] and a["skipped"] == b["skipped"], what


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("k", range(len(CONFIGS)), ids=[f"{c['precision']}-zero{c['zero_stage']}" for c in CONFIGS])
def test_bitwise_equal_at_1_2_and_4_ranks(runs, world, k):
    one, many_ = runs[1][k], runs[world][k]
    _assert_bitwise(one, many_, f"{CONFIGS[k]} at 1 and {world} ranks")
    assert one["global_step"] == STEPS - sum(one["skipped"])
    norms = one["norms"]
    if CONFIGS[k]["precision"] != "fp16":
        assert bool((norms > 0.25).all()), f"the clip (0.25) must bind at every step: norms {norms.tolist()}"


def test_zero1_is_bitwise_zero0(runs):
    """The same update on owned slices as on the whole buffer, the same chunked norm."""
    for world in (2, 4):
        _assert_bitwise(runs[world][0], runs[world][1], f"fp32 zero 0 and zero 1 at {world} ranks")
        _assert_bitwise(runs[world][2], runs[world][3], f"bf16 zero 0 and zero 1 at {world} ranks")


def test_fp16_overflow_skips_the_same_steps(runs):
    fp16 = [runs[w][4] for w in (1, 2, 4)]
    assert fp16[0]["skipped"][OVERFLOW_AT] and sum(fp16[0]["skipped"]) >= 1
    for r in fp16[1:]:
        assert r["skipped"] == fp16[0]["skipped"] and r["scales"] == fp16[0]["scales"]


def test_the_default_path_is_not_world_size_invariant(runs):
    """What deterministic=True buys: the default path (each rank's sum, then the backend's
    ring, 1/accum then 1/world) trains the same model at 2 and 4 ranks, but not the same bits."""
    a, b = runs[2][len(CONFIGS)], runs[4][len(CONFIGS)]
    diff = (a["params"] - b["params"]).abs().max().item()
    assert 0 < diff < 1e-2, diff
    assert not torch.equal(a["norms"], b["norms"])


def test_the_tree_partials_are_what_memory_per_param_says(runs):
    for world, depth in ((1, 2), (2, 1), (4, 0)):  # MicroTree(8 / world).depth: landing saves a level
        r = runs[world][0]
        assert r["mem"]["tree_partials"] == 4 * depth
        assert r["tree_bytes"] == r["mem"]["tree_partials"] * r["layout_numel"]
    assert "tree_partials" not in runs[2][len(CONFIGS)]["mem"]


@pytest.mark.parametrize("resume_world", [1, 2])
def test_a_checkpoint_of_4_ranks_continues_bitwise_at_1_and_2(tmp_path, runs, resume_world):
    cfg = CONFIGS[3]  # bf16, ZeRO-1
    ckpt = str(tmp_path / "ckpt")
    ok(run_ranks(det_rank, 4, cfg, STEPS // 2, dict(save_to=ckpt, overflow_at=OVERFLOW_AT)), 4)
    resumed = ok(run_ranks(det_rank, resume_world, cfg, STEPS // 2,
                           dict(load_from=ckpt, start=STEPS // 2, state_dir=str(tmp_path / "end"))), resume_world)[0]
    straight = runs[4][3]
    assert resumed["global_step"] == straight["global_step"]
    assert torch.equal(resumed["params"], straight["params"])
    for k in straight["state"]:
        assert torch.equal(resumed["state"][k], straight["state"][k]), k
    assert torch.equal(resumed["norms"], straight["norms"][STEPS // 2:])


def _three_ranks(rank, world):
    from pyengine import Engine, EngineConfig

    try:
        Engine(torch.nn.Linear(4, 4), EngineConfig(deterministic=True, grad_accum_steps=2))
    except ValueError as exc:
        return str(exc)
    return None


def test_a_world_size_that_is_not_a_power_of_two_is_refused_at_build():
    for msg in ok(run_ranks(_three_ranks, 3), 3):
        assert msg is not None and "powers of two" in msg and "world size is 3" in msg


@pytest.mark.cuda
def test_two_ranks_sharing_one_gpu_over_gloo_are_bitwise_one(tmp_path):
    """GPU bits need torch.use_deterministic_algorithms(True) (det_rank sets it)."""
    cfg = dict(precision="bf16", zero_stage=1)
    one = ok(run_ranks(det_rank, 1, cfg, 5, dict(device="cuda", state_dir=str(tmp_path / "one"))), 1)[0]
    two = ok(run_ranks(det_rank, 2, cfg, 5, dict(device="cuda", state_dir=str(tmp_path / "two"))), 2)[0]
    _assert_bitwise(one, two, "bf16 zero 1 on one GPU at 1 and 2 ranks")
