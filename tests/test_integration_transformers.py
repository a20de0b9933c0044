"""EngineTrainer against the plain Hugging Face Trainer: a tiny GPT-2 on random tokens, fp32 on
the CPU, the same seed, data order and schedule on both sides."""
import os
import tempfile

import pytest

transformers = pytest.importorskip("transformers")
import torch  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments  # noqa: E402

from pyengine.integrations.transformers import EngineTrainer  # noqa: E402

U = 2.0 ** -24  # fp32 unit roundoff
STEPS = 20
LR = 1e-3


class Tokens(torch.utils.data.Dataset):
    def __init__(self, n=40, seq=16):
        self.x = torch.randint(0, 64, (n, seq), generator=torch.Generator().manual_seed(0))

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"input_ids": self.x[i], "labels": self.x[i]}


def tiny_gpt2():
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=32))


def train(cls, out=None, n=40, resume=None, model=None, callbacks=None, **kw):
    model = model or tiny_gpt2()
    args = dict(output_dir=out or tempfile.mkdtemp(), report_to=[], disable_tqdm=True, use_cpu=True,
                dataloader_num_workers=0, per_device_train_batch_size=2, max_steps=STEPS, learning_rate=LR,
                weight_decay=0.1, warmup_steps=5, lr_scheduler_type="linear", logging_steps=1,
                save_strategy="no", seed=0)
    args.update(kw)
    trainer = cls(model=model, args=TrainingArguments(**args), train_dataset=Tokens(n), callbacks=callbacks)
    trainer.train(resume_from_checkpoint=resume)
    logs = [h for h in trainer.state.log_history if "loss" in h]
    weights = {k: v.detach().clone() for k, v in model.named_parameters()}
    if isinstance(trainer, EngineTrainer):
        trainer.engine.close()
    return logs, weights


def weight_tolerance(w, steps=STEPS):
    # AdamW on both sides, the same fp32 formulas rounded in another order: each step moves a
    # weight by at most 10 roundings of |w| + lr (tests/fuzz_actions.py Tolerance, W_ADAM; the
    # update m/sqrt(v) is at most about 1 in size), added up over the steps, to first order.
    return steps * 10 * U * (w.abs().max().item() + LR)


def assert_close(ref, got):
    (ref_logs, ref_w), (logs, w) = ref, got
    assert len(ref_logs) == len(logs) == STEPS
    for a, b in zip(ref_logs, logs):
        assert a["learning_rate"] == b["learning_rate"]  # the scheduler drives engine.optimizer
        # the loss is a sum of rounded terms of size about |loss|: the same steps x 10 units
        assert abs(a["loss"] - b["loss"]) <= STEPS * 10 * U * abs(a["loss"]) + 1e-6, (a, b)
    for k in ref_w:
        d = (ref_w[k] - w[k]).abs()
        if k.endswith("attn.c_attn.bias"):
            # the key bias (the middle third) has a zero gradient in exact arithmetic (softmax
            # ignores a constant per query), so each side steps on rounding noise, which Adam
            # normalises into steps of up to about lr: held only to 2 lr per step there.
            e = d.numel() // 3
            assert d[e:2 * e].max().item() <= 2 * LR * STEPS, k
            d = torch.cat([d[:e], d[2 * e:]])
        assert d.max().item() <= weight_tolerance(ref_w[k]), (k, d.max().item(), weight_tolerance(ref_w[k]))


def test_matches_trainer_fp32():
    assert_close(train(Trainer), train(EngineTrainer))


def test_accumulation_and_binding_clip_match_trainer():
    kw = dict(gradient_accumulation_steps=2, max_grad_norm=0.5)
    ref, got = train(Trainer, **kw), train(EngineTrainer, **kw)
    assert all(h["grad_norm"] > 0.5 for h in ref[0])  # the clip binds at every step
    assert_close(ref, got)
    for a, b in zip(ref[0], got[0]):  # the norm before clipping, summed in another order
        assert abs(a["grad_norm"] - b["grad_norm"]) <= 1e-5 * a["grad_norm"]


def test_resume_from_checkpoint_is_bitwise():
    out = tempfile.mkdtemp()
    _, straight = train(EngineTrainer, out=out, save_strategy="steps", save_steps=10)
    ckpt = os.path.join(out, "checkpoint-10")
    assert os.path.isdir(os.path.join(ckpt, "pyengine"))
    steps = []

    class Count(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            steps.append(state.global_step)

    _, resumed = train(EngineTrainer, out=tempfile.mkdtemp(), resume=ckpt, callbacks=[Count()])
    assert steps == list(range(11, STEPS + 1))  # it continued, not restarted
    for k in straight:
        assert torch.equal(straight[k], resumed[k]), k


def test_refuses_other_optimizers():
    with pytest.raises(ValueError, match=r"optim='sgd'\) is not supported"):
        train(EngineTrainer, optim="sgd")
    model = tiny_gpt2()
    with pytest.raises(ValueError, match=r"optimizers=\.\.\.\) is not supported"):
        EngineTrainer(model=model, args=TrainingArguments(output_dir=tempfile.mkdtemp(), report_to=[],
                                                          use_cpu=True),
                      optimizers=(torch.optim.SGD(model.parameters(), lr=0.1), None))


def test_refuses_short_last_window():
    # 19 batches an epoch and windows of 2: HF's last window has 1 micro-batch, the engine's 2
    with pytest.raises(RuntimeError, match="fewer micro-batches than gradient_accumulation_steps=2"):
        train(EngineTrainer, n=38, max_steps=-1, num_train_epochs=1, gradient_accumulation_steps=2)


def _rank_run(rank, world, engine):
    logs, w = train(EngineTrainer if engine else Trainer)
    return [{k: h[k] for k in ("loss", "learning_rate")} for h in logs], w


@pytest.mark.slow
def test_two_gloo_ranks():
    # against the plain Trainer at 2 ranks (Accelerate's DDP): the same shards of each batch,
    # the same average of the two ranks' gradients, summed on another wire
    from dist_util import ok, run_ranks

    e0, e1 = ok(run_ranks(_rank_run, 2, True), 2)
    for k in e0[1]:
        assert torch.equal(e0[1][k], e1[1][k]), k
    ddp, _ = ok(run_ranks(_rank_run, 2, False), 2)
    assert_close(ddp, e0)


def test_arguments_map_onto_the_engine_config():
    from pyengine import EngineConfig
    from pyengine.integrations.transformers import engine_config_from_args

    args = TrainingArguments(output_dir=tempfile.mkdtemp(), report_to=[], use_cpu=True, learning_rate=2e-4,
                             weight_decay=0.05, adam_beta1=0.8, adam_beta2=0.95, adam_epsilon=1e-6,
                             gradient_accumulation_steps=4, max_grad_norm=0.0, bf16=True)
    cfg = engine_config_from_args(args, EngineConfig(bucket_mb=4))
    assert (cfg.precision, cfg.lr, cfg.betas, cfg.eps, cfg.weight_decay, cfg.grad_accum_steps, cfg.clip_grad_norm,
            cfg.bucket_mb) == ("bf16", 2e-4, (0.8, 0.95), 1e-6, 0.05, 4, None, 4)


def test_bf16_trains_in_bf16():
    model = tiny_gpt2()
    logs, _ = train(EngineTrainer, model=model, bf16=True, max_steps=3)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in logs) and len(logs) == 3


def test_no_decay_groups_follow_the_trainer():
    model = tiny_gpt2()
    trainer = EngineTrainer(model=model, args=TrainingArguments(output_dir=tempfile.mkdtemp(), report_to=[],
                                                                use_cpu=True, weight_decay=0.1))
    trainer.create_optimizer()
    decay = set(trainer.get_decay_parameter_names(model))
    by_id = {id(p): n for n, p in model.named_parameters()}
    for g in trainer.engine.optimizer.param_groups:
        names = {by_id[id(p)] for p in g["params"]}
        assert names <= decay if g["weight_decay"] == 0.1 else not names & decay
        assert g["weight_decay"] in (0.1, 0.0)
    assert any("ln_" in n for n in set(by_id.values()) - decay)
    trainer.engine.close()


_TORCHRUN_SCRIPT = """
import os, sys, tempfile, torch
sys.path.insert(0, {tests!r})
import transformers
from test_integration_transformers import EngineTrainer, train
out, resume = sys.argv[1], (sys.argv[2] if len(sys.argv) > 2 else None)
steps = []
class Count(transformers.TrainerCallback):
    def on_step_end(self, args, state, control, **kw):
        steps.append(state.global_step)
_, w = train(EngineTrainer, out=out if resume is None else tempfile.mkdtemp(), resume=resume, max_steps=6,
             gradient_accumulation_steps=2, save_strategy="steps", save_steps=3, callbacks=[Count()])
assert steps == ([4, 5, 6] if resume else [1, 2, 3, 4, 5, 6]), steps
torch.save(w, os.path.join({result!r}, "w%s-%s.pt" % ("resumed" if resume else "straight", os.environ["RANK"])))
"""


@pytest.mark.slow
def test_torchrun_two_ranks_resume(tmp_path):
    # the real launcher: Accelerate sets up the gloo group, the engine averages, and a
    # checkpoint written at 2 ranks resumes bitwise at 2 ranks
    import subprocess
    import sys

    script = tmp_path / "run.py"
    script.write_text(_TORCHRUN_SCRIPT.format(tests=os.path.dirname(__file__), result=str(tmp_path)))
    out = tmp_path / "out"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", str(script), str(out)]
    for extra in ([], [str(out / "checkpoint-3")]):
        r = subprocess.run(launch + extra, env=env, capture_output=True, text=True, timeout=240)
        assert r.returncode == 0, r.stderr[-3000:]
    w = {name: torch.load(tmp_path / f"w{name}.pt") for name in ("straight-0", "straight-1", "resumed-0",
                                                                   "resumed-1")}
    for k in w["straight-0"]:
        assert all(torch.equal(w["straight-0"][k], w[n][k]) for n in w), k


def test_fp16_skipped_steps_hold_the_scheduler():
    from pyengine import EngineConfig

    model = tiny_gpt2()
    trainer = EngineTrainer(model=model, train_dataset=Tokens(),
                            engine_config=EngineConfig(initial_loss_scale=2.0 ** 22, hysteresis=1),
                            args=TrainingArguments(output_dir=tempfile.mkdtemp(), report_to=[], disable_tqdm=True,
                                                   use_cpu=True, dataloader_num_workers=0, fp16=True,
                                                   per_device_train_batch_size=2, max_steps=12, warmup_steps=4,
                                                   save_strategy="no", seed=0))
    trainer.train()
    engine = trainer.engine
    assert engine.config.precision == "fp16" and 0 < engine.skipped_steps < 12
    assert trainer.lr_scheduler.last_epoch == engine.global_step  # the scheduler stepped on updates only
    engine.close()
