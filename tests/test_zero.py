"""Sharded optimizer state (ZeRO-1) on 2 and 4 gloo ranks: the same training as unsharded,
the memory it saves (allocated bytes), overflow skips agreed by every rank, the bucket
rebuild, and checkpoints that load at any world size and either stage."""
import copy

import pytest
import torch

from dist_util import ok, run_ranks
from pyengine.flat import copy_runs

pytestmark = pytest.mark.slow

GLOBAL_BATCH = 8


def gpt_rank(rank, world, cfg_kwargs, steps, opts=None):
    """A tiny GPT trained on slices of the same global batches whatever the world size; opts:
    accum, save_to, load_from, start, rewrite_at (the step before which the model's first
    weights are written back in place with model.load_state_dict)."""
    opts = opts or {}
    accum, save_to, load_from, start = (opts.get("accum", 2), opts.get("save_to"), opts.get("load_from"),
                                        opts.get("start", 0))
    seed = 0
    from pyengine import Engine, EngineConfig
    from pyengine.train.model import GPT, PRESETS, decay_groups

    torch.manual_seed(seed)
    model = GPT(copy.deepcopy(PRESETS["tiny"]))
    cfg = dict(lr=3e-3, weight_decay=0.1, clip_grad_norm=1.0, grad_accum_steps=accum, bucket_mb=0.05,
               first_bucket_mb=0.01, loss_scale_window=10)
    cfg.update(cfg_kwargs)
    engine = Engine(model, EngineConfig(**cfg), param_groups=decay_groups(model, 0.1))
    if load_from:
        engine.load(load_from)
    first_weights = copy.deepcopy(model.state_dict())
    g = torch.Generator().manual_seed(123)
    text = torch.randint(0, 32, (8192,), generator=g)
    norms, skipped = [], []
    per_rank = GLOBAL_BATCH // world
    for step in range(start, start + steps):
        if step == opts.get("rewrite_at"):
            model.load_state_dict(first_weights)
        for micro in range(accum):
            gg = torch.Generator().manual_seed(1000 * step + micro)
            starts = torch.randint(0, text.numel() - 65, (GLOBAL_BATCH,), generator=gg)[rank * per_rank:
                                                                                          (rank + 1) * per_rank]
            x = torch.stack([text[s:s + 64] for s in starts])
            y = torch.stack([text[s + 1:s + 65] for s in starts])
            loss = model(x, y)
            if cfg_kwargs.get("precision") == "fp16" and step == start + 3 and micro == 0 and rank == 0:
                # an overflow in one small parameter's gradient on one rank: it lands in one rank's
                # slice, and every rank must skip together
                loss = loss + float("inf") * model.ln_f.bias.sum()
            engine.backward(loss)
            result = engine.step()
        norms.append(engine.grad_norm)
        skipped.append(result.skipped)
    if save_to:
        engine.save(save_to)
    engine.wait_for_params()  # overlap_param_gather: the last step's all-gathers
    params = torch.cat([p.detach().float().flatten() for p in model.parameters()])
    return {"params": params, "norms": norms, "skipped": skipped, "mem": engine.memory_per_param(),
            "buffers": _allocated(engine), "layout_numel": engine.flat.layout.numel,
            "global_step": engine.global_step, "loss_scale": engine.loss_scale,
            "gathers": (engine.reducer._gathers_checked, engine.reducer._gathers_overlap) if engine.reducer else None}


def _allocated(engine):
    """Bytes the engine's persistent buffers really hold, per element of its layout."""
    f = engine.flat
    bufs = [f.param_flat, f.grad_flat, *f.state.values()] + ([f.master_flat] if f.master_separate else [])
    return sum(t.numel() * t.element_size() for t in bufs) / f.layout.numel


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_zero1_trains_as_unsharded(world, precision):
    """A clip limit that never binds: the norm is computed and combined but scales nothing, so
    20 steps of weights must agree to the bit and every norm to its rounding."""
    cfg = dict(precision=precision, clip_grad_norm=1e9)
    z1 = ok(run_ranks(gpt_rank, world, dict(cfg, zero_stage=1), 20), world)
    z0 = ok(run_ranks(gpt_rank, world, cfg, 20), world)
    for r in z1[1:]:
        assert torch.equal(r["params"], z1[0]["params"]), "every rank holds the same parameters"
    # Note: the gradients are the same sums (gloo reduces the same elements in the same rank
    # order either way) and the update the same fp32 arithmetic: bitwise.
    assert torch.equal(z1[0]["params"], z0[0]["params"])
    # The norm groups its fp32 partial sums per owned slice and then across ranks instead of
    # per bucket: a sum of ~1e5 squares regrouped differs by a few ulps (2**-23 each).
    for a, b in zip(z1[0]["norms"], z0[0]["norms"]):
        assert a == pytest.approx(b, rel=1e-6)


def test_zero1_binding_clip_scales_as_unsharded():
    """Where the clip binds, the regrouped norm's last bits reach the update; after one step from
    the same state Adam's update g*c/(|g*c|+eps) moves by ~eps/|g| of that relative error."""
    cfg = dict(precision="fp32", clip_grad_norm=0.1)
    z1 = ok(run_ranks(gpt_rank, 2, dict(cfg, zero_stage=1), 1, dict(accum=1)), 2)
    z0 = ok(run_ranks(gpt_rank, 2, cfg, 1, dict(accum=1)), 2)
    assert z1[0]["norms"][0] == pytest.approx(z0[0]["norms"][0], rel=1e-6)
    assert z0[0]["norms"][0] > 0.1, "the clip binds"
    # Note: one step at lr 3e-3; a relative error of 1e-6 in the clip factor moves an update by
    # at most lr * 1e-6 (for |g*c| near eps), and w - lr*u may then round to the neighbouring
    # fp32 value: one ulp of w (2**-23 relative). Later steps amplify it chaotically: one step.
    torch.testing.assert_close(z1[0]["params"], z0[0]["params"], rtol=2**-23, atol=3e-3 * 1e-6)


def test_zero1_without_clipping_is_bitwise_the_unsharded_run():
    """Without clipping the norm feeds nothing: the weights must agree to the bit."""
    cfg = dict(precision="bf16", clip_grad_norm=None)
    z1 = ok(run_ranks(gpt_rank, 2, dict(cfg, zero_stage=1), 8), 2)
    z0 = ok(run_ranks(gpt_rank, 2, cfg, 8), 2)
    assert torch.equal(z1[0]["params"], z0[0]["params"])


def test_fp16_overflow_is_skipped_by_every_rank_together():
    out = ok(run_ranks(gpt_rank, 2, dict(precision="fp16", zero_stage=1, initial_loss_scale=2.0**8), 6), 2)
    for r in out:
        assert r["skipped"] == [False, False, False, True, False, False]
        assert r["global_step"] == 5
    assert out[0]["loss_scale"] == out[1]["loss_scale"]
    assert torch.equal(out[0]["params"], out[1]["params"])


@pytest.mark.parametrize("precision,accum_dtype,formula", [
    ("bf16", "fp32", lambda d: 6 + 12 / d), ("bf16", "param", lambda d: 4 + 12 / d), ("fp32", "fp32", lambda d: 8 + 8 / d)])
def test_memory_per_param_is_what_is_allocated(precision, accum_dtype, formula):
    world = 4
    out = ok(run_ranks(gpt_rank, world, dict(precision=precision, accum_dtype=accum_dtype, zero_stage=1), 1), world)
    for r in out:
        assert r["buffers"] == pytest.approx(formula(world)), "bytes the buffers hold per layout element"
        assert r["mem"]["total"] == pytest.approx(formula(world))


def test_bucket_rebuild_keeps_zero1_results():
    # the rebuild changes which bucket (and rank) owns each element, not the sums or the update:
    # with a clip that never binds the weights agree to the bit
    cfg = dict(zero_stage=1, clip_grad_norm=1e9)
    a = ok(run_ranks(gpt_rank, 2, dict(cfg, rebuild_buckets=True), 6), 2)
    b = ok(run_ranks(gpt_rank, 2, dict(cfg, rebuild_buckets=False), 6), 2)
    assert torch.equal(a[0]["params"], b[0]["params"])


@pytest.mark.parametrize("world,stage", [(4, 1), (1, 0), (2, 0)])
def test_checkpoint_of_2_ranks_zero1_continues_at_other_world_sizes_and_stages(tmp_path, world, stage):
    from pyengine.checkpoint import read
    ckpt, again = str(tmp_path / "ckpt"), str(tmp_path / "again")
    base = dict(precision="bf16", clip_grad_norm=1e9)
    ok(run_ranks(gpt_rank, 2, dict(base, zero_stage=1), 5, dict(save_to=ckpt)), 2)
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [
        "index.json", "meta.pt", "shard-0-of-2.pt", "shard-1-of-2.pt"], "each rank wrote only its shard"
    # loaded at another world size and stage and saved again at once: every value comes back
    ok(run_ranks(gpt_rank, world, dict(base, zero_stage=stage), 0, dict(load_from=ckpt, save_to=again)), world)
    before, after = read(ckpt), read(again)
    for name in ("master", "exp_avg", "exp_avg_sq"):
        assert torch.equal(before[name], after[name]), name
    assert torch.equal(before["meta"]["param_steps"], after["meta"]["param_steps"])
    assert torch.equal(before["meta"]["scaler"]["state"], after["meta"]["scaler"]["state"])
    assert before["meta"]["scaler"]["dynamic"] == after["meta"]["scaler"]["dynamic"]
    assert after["index"]["world_size"] == world
    ended, straight_end = str(tmp_path / "ended"), str(tmp_path / "straight")
    resumed = ok(run_ranks(gpt_rank, world, dict(base, zero_stage=stage), 5,
                           dict(load_from=ckpt, start=5, save_to=ended)), world)
    assert resumed[0]["global_step"] == 10
    straight = ok(run_ranks(gpt_rank, 2, dict(base, zero_stage=1), 10, dict(save_to=straight_end)), 2)
    if world == 2:  # the same sums and the same update as the run that saved it, to the bit
        assert torch.equal(resumed[0]["params"], straight[0]["params"])
    else:
        # The same global batch, its gradient summed in another grouping: each sum moves by
        # fp32 rounding (measured: a typical master weight by 7e-7 to 1e-6 after 5 steps). Adam
        # divides by sqrt(v), so a weight whose gradient is near zero may turn its update around:
        # at most lr (3e-3) a step, 5 steps. A wrongly sliced load moves weights by their size.
        diff = (read(ended)["master"] - read(straight_end)["master"]).abs()
        assert diff.median() < 1e-5 and diff.max() <= 5 * 3e-3


def test_resume_without_change_is_bitwise(tmp_path):
    ckpt = str(tmp_path / "ckpt")
    cfg = dict(precision="bf16", zero_stage=1)
    ok(run_ranks(gpt_rank, 2, cfg, 4, dict(save_to=ckpt)), 2)
    resumed = ok(run_ranks(gpt_rank, 2, cfg, 4, dict(load_from=ckpt, start=4)), 2)
    straight = ok(run_ranks(gpt_rank, 2, cfg, 8), 2)
    assert torch.equal(resumed[0]["params"], straight[0]["params"])


def test_copy_runs_maps_canonical_runs_into_any_piece_order():
    dst = torch.zeros(10)
    pieces = [(6, 2, 0), (0, 3, 5), (3, 3, 2)]  # buffer order is not canonical order
    runs = [(0, torch.tensor([0.0, 1, 2, 3])), (4, torch.tensor([4.0, 5, 6, 7]))]
    copy_runs(runs, dst, pieces)
    assert dst.tolist() == [6, 7, 3, 4, 5, 0, 1, 2, 0, 0]


def _reduce_scatter_rank(rank, world):
    import torch.distributed as dist

    from pyengine.comm.torch_comm import TorchComm

    dist.init_process_group("gloo")
    comm = TorchComm()
    g = torch.Generator().manual_seed(7 + rank)
    inp = torch.randn(world * 37, generator=g)
    ref = torch.empty(37)  # gloo's own reduce-scatter
    dist.reduce_scatter_tensor(ref, inp.clone(), op=dist.ReduceOp.AVG)
    out = torch.empty(37)
    comm.reduce_scatter(out, inp.clone(), average=True).wait()
    in_place = inp.clone()  # output a view of the input, as the Reducer passes it
    comm.reduce_scatter(in_place[rank * 37:(rank + 1) * 37], in_place, average=True).wait()
    chained, seen = torch.zeros(37), []  # a completion callback sees the slice already kept
    comm.reduce_scatter(chained, inp.clone(), average=True).then(lambda: seen.append(chained.clone())).wait()
    return {"ref": ref, "out": out, "in_place": in_place[rank * 37:(rank + 1) * 37], "chained": seen[0]}


def test_reduce_scatter_over_gloo_keeps_this_ranks_slice_of_an_allreduce():
    # an average of 2 values is exact in any order: the slice agrees with gloo's own
    # reduce-scatter to the bit, kept before the completion callback runs
    for r in ok(run_ranks(_reduce_scatter_rank, 2), 2):
        for got in ("out", "in_place", "chained"):
            assert torch.equal(r[got], r["ref"]), got


def test_overlapped_param_gather_trains_as_unsharded_across_the_bucket_rebuild():
    # each module's forward waits for its own buckets; the first step's relayout waits for all
    cfg = dict(precision="bf16", clip_grad_norm=1e9)
    z1 = ok(run_ranks(gpt_rank, 2, dict(cfg, zero_stage=1, overlap_param_gather=True, rebuild_buckets=True), 6), 2)
    z0 = ok(run_ranks(gpt_rank, 2, cfg, 6), 2)
    assert torch.equal(z1[0]["params"], z0[0]["params"])
    assert torch.equal(z1[1]["params"], z0[0]["params"])
    # a forward was watched and every parameter was used only after its module's hook waited
    assert z1[0]["gathers"] == z1[1]["gathers"] == (True, True)


def _parent_reads_child_weight_rank(rank, world, overlap, steps=4):
    import warnings

    import torch.nn.functional as F

    from pyengine import Engine, EngineConfig

    class Parent(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(16, 64), torch.nn.Linear(64, 4)

        def forward(self, x):  # a's parameters used outside a's own forward
            return self.b(torch.tanh(F.linear(x, self.a.weight, self.a.bias)))

    torch.manual_seed(0)
    model = Parent()
    engine = Engine(model, EngineConfig(lr=1e-2, zero_stage=1, overlap_param_gather=overlap, bucket_mb=0.002,
                                        first_bucket_mb=0.001, rebuild_buckets=False))
    g = torch.Generator().manual_seed(rank)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(steps):
            x = torch.randn(8, 16, generator=g)
            engine.backward(model(x).square().mean())
            engine.step()
    return {"params": torch.cat([p.detach().flatten() for p in model.parameters()]),
            "buckets": len(engine.reducer.buckets), "warnings": [str(w.message) for w in caught]}


def test_a_parameter_used_outside_its_module_turns_the_overlap_off_with_a_warning():
    over = ok(run_ranks(_parent_reads_child_weight_rank, 2, True), 2)
    plain = ok(run_ranks(_parent_reads_child_weight_rank, 2, False), 2)
    assert over[0]["buckets"] >= 2
    warned = [w for w in over[0]["warnings"] if "overlap_param_gather" in w]
    assert len(warned) == 1 and "parameter a.weight (in linear)" in warned[0], over[0]["warnings"]
    assert not plain[0]["warnings"]
    # the early read waited for its gather: the same weights as without the overlap, to the bit
    assert torch.equal(over[0]["params"], plain[0]["params"])


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_weights_written_in_place_reach_the_owned_master_slices(precision):
    # model.load_state_dict between steps: each rank's master slices follow the new values
    cfg = dict(precision=precision, clip_grad_norm=1e9)
    z1 = ok(run_ranks(gpt_rank, 2, dict(cfg, zero_stage=1), 4, dict(rewrite_at=2)), 2)
    z0 = ok(run_ranks(gpt_rank, 2, cfg, 4, dict(rewrite_at=2)), 2)
    plain = ok(run_ranks(gpt_rank, 2, cfg, 4), 2)
    assert torch.equal(z1[0]["params"], z0[0]["params"])
    assert not torch.equal(z0[0]["params"], plain[0]["params"]), "the rewrite changed the training"


def test_fp32_zero1_shards_hold_only_the_owned_weights(tmp_path):
    # fp32 params are their own master weights, whole on every rank: each shard still holds
    # only the slices its rank updated, and together they are the model's weights
    from pyengine.checkfile import read_file
    from pyengine.checkpoint import read

    ckpt = tmp_path / "ckpt"
    out = ok(run_ranks(gpt_rank, 2, dict(precision="fp32", zero_stage=1), 2, dict(save_to=str(ckpt))), 2)
    shards = [read_file(ckpt / f"shard-{r}-of-2.pt") for r in range(2)]
    total = sum(s["master"].numel() for s in shards)
    assert total == out[0]["params"].numel() and all(s["master"].numel() < total for s in shards)
    assert torch.equal(read(str(ckpt))["master"], out[0]["params"])
