"""pyengine-train end to end: 2 gloo ranks on a tiny preset, interruption and bitwise resume,
bad flags, the report and plots."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

pytestmark = pytest.mark.slow

TINY = ["--model", "tiny", "--batch-size", "4", "--max-data-mb", "0.5", "--eval-batches", "2", "--log-every", "1"]


def cli(*args, timeout=300, **kw):
    return subprocess.run([sys.executable, "-m", "pyengine.train", *args], capture_output=True, text=True,
                          timeout=timeout, **kw)


def test_end_to_end_two_ranks(tmp_path):
    out = tmp_path / "run"
    res = cli(*TINY, "--steps", "6", "--out", str(out), "--trace")
    assert res.returncode == 0, res.stderr[-3000:]
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 6
    rec = json.loads(lines[-1])
    assert {"step", "time", "loss", "lr", "loss_scale", "grad_norm", "tokens_per_s", "fwd_bwd_s", "exposed_comm_s",
            "optimizer_s"} <= set(rec)
    assert abs(rec["time"] - time.time()) < 600  # unix seconds
    report = (out / "report.md").read_text()
    assert "held-out loss" in report and "Sample" in report and "bytes" in report
    assert "Wall time:" in report and "Data: Python standard library (default)" in report
    assert "Resumed" not in report
    assert not (out / "loss_scale.png").exists() and "loss_scale.png" not in report  # fp32: no loss scale
    for png in ("loss.png", "lr.png", "grad_norm.png", "step_time.png"):
        assert f"]({png})" in report
        data = (out / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000, png
        from PIL import Image

        with Image.open(out / png) as im:
            im.verify()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["val_loss"] < summary["uniform_loss"]
    assert summary["data"]["source"] == "Python standard library (default)"
    assert summary["data"]["corpus_bytes"] > summary["data"]["bytes_used"] > 0
    assert 0 < summary["wall_s"] <= summary["wall_s_total"]
    assert [p.name for p in out.glob("checkpoint-*")] == ["checkpoint-0000006"]
    assert (out / "trace.rank0.json").exists() and (out / "trace.rank1.json").exists()


def _master(run):
    from pyengine.checkpoint import read
    from pyengine.train.checkpoints import latest_checkpoint

    ck = read(latest_checkpoint(run))
    return ck["master"], [ck["exp_avg"], ck["exp_avg_sq"]], ck["meta"]["boundaries"]


def test_interrupt_then_resume_is_bitwise(tmp_path):
    steps = ["--steps", "60"]
    ref = tmp_path / "ref"
    assert cli(*TINY, *steps, "--out", str(ref)).returncode == 0
    run = tmp_path / "run"
    p = subprocess.Popen([sys.executable, "-m", "pyengine.train", *TINY, *steps, "--out", str(run)],
                         start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = run / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and p.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
            break
        time.sleep(0.05)
    os.killpg(p.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
    output, _ = p.communicate(timeout=120)
    assert p.returncode == 130, output[-3000:]
    stopped = _master(run)[2]
    assert 3 <= stopped < 60, "the run must have stopped part-way"
    assert (run / "report.md").exists(), "an interrupted run still writes its report"
    res = cli("--resume", str(run))
    assert res.returncode == 0, res.stderr[-3000:]
    a, b = _master(ref), _master(run)
    assert a[2] == b[2] == 60
    assert torch.equal(a[0], b[0])
    for sx, sy in zip(a[1], b[1]):
        assert torch.equal(sx, sy)
    steps_logged = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert steps_logged == list(range(1, 61)), "metrics continue where they stopped"
    resumed = [json.loads(line)["step"] for line in metrics.read_text().splitlines() if json.loads(line).get("resumed")]
    assert resumed == [stopped + 1]
    assert f"Resumed at step {stopped}." in (run / "report.md").read_text()
    summary = json.loads((run / "summary.json").read_text())
    assert summary["wall_s_total"] > summary["wall_s"]  # both invocations


def test_zero1_run_writes_one_shard_per_rank_and_resumes_sharded_or_on_one_rank(tmp_path):
    import shutil

    from pyengine.checkpoint import read
    from pyengine.train.checkpoints import latest_checkpoint

    run, same, straight = tmp_path / "run", tmp_path / "same", tmp_path / "straight"
    res = cli(*TINY, "--steps", "4", "--ckpt-every", "2", "--zero", "1", "--out", str(run))
    assert res.returncode == 0, res.stderr[-3000:]
    newest = latest_checkpoint(run)
    assert sorted(p.name for p in newest.iterdir()) == ["index.json", "meta.pt", "shard-0-of-2.pt", "shard-1-of-2.pt"]
    at4 = read(newest)
    shutil.copytree(run, same)
    # resumed as it ran: bitwise the run that was never stopped
    assert cli("--resume", str(same), "--steps", "6").returncode == 0
    assert cli(*TINY, "--steps", "6", "--ckpt-every", "2", "--zero", "1", "--out", str(straight)).returncode == 0
    a, b = read(latest_checkpoint(same)), read(latest_checkpoint(straight))
    for name in ("master", "exp_avg", "exp_avg_sq"):
        assert torch.equal(a[name], b[name]), name
    # resumed on one unsharded rank (each rank reads its own part of the data, so the batches
    # differ from the 2-rank run's): the sharded state came back whole, so v only decays by
    # beta2 = 0.95 a step plus new squared gradients (fp32 rounding: 1e-6 relative)
    res = cli("--resume", str(run), "--steps", "6", "--nproc", "1", "--zero", "0")
    assert res.returncode == 0, res.stderr[-3000:]
    ck = read(latest_checkpoint(run))
    assert ck["meta"]["boundaries"] == 6 and ck["index"]["world_size"] == 1
    assert (ck["exp_avg_sq"] >= at4["exp_avg_sq"] * 0.95**2 * (1 - 1e-6)).all()
    steps_logged = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps_logged == list(range(1, 7))


@pytest.mark.parametrize("args,message", [
    (["--steps", "0"], "--steps"),
    (["--precision", "fp8"], "--precision"),
    (["--data", "/no/such/path"], "no such file"),
    (["--batch-size", "x"], "--batch-size"),
    (["--lr", "-1"], "--lr"),
    (["--cuda-graph", "--device", "cpu"], "--cuda-graph: needs --device cuda"),
])
def test_bad_flags_exit_2(args, message):
    res = cli(*args)
    assert res.returncode == 2
    assert message in res.stderr


def test_resume_without_a_run_folder_exit_2(tmp_path):
    res = cli("--resume", str(tmp_path))
    assert res.returncode == 2 and "no config.json there: not a pyengine-train run folder" in res.stderr


def _lrs(run):
    return {json.loads(line)["step"]: json.loads(line)["lr"] for line in (run / "metrics.jsonl").read_text().splitlines()}


def test_resume_with_other_steps_keeps_the_schedule_the_run_started_with(tmp_path):
    import shutil

    flags = [*TINY, "--warmup", "2", "--steps", "10"]
    ref, run, short = tmp_path / "ref", tmp_path / "run", tmp_path / "short"
    assert cli(*flags, "--out", str(ref)).returncode == 0
    res = cli(*flags, "--ckpt-every", "5", "--out", str(run), env={**os.environ, "PYENGINE_TRAIN_FAULT": "0:7"})
    assert res.returncode == 1, res.stderr[-3000:]
    shutil.copytree(run, short)
    expected = _lrs(ref)
    assert all(expected[s] > expected[s + 1] for s in range(3, 10)), "after the warm-up the cosine falls every step"
    # longer: the 10-step schedule, then its final lr (10% of the peak 2e-3) for steps 11-14
    res = cli("--resume", str(run), "--steps", "14")
    assert res.returncode == 0, res.stderr[-3000:]
    lrs = _lrs(run)
    assert sorted(lrs) == list(range(1, 15))
    assert [lrs[s] for s in range(1, 11)] == [expected[s] for s in range(1, 11)]
    assert [lrs[s] for s in range(11, 15)] == [pytest.approx(2e-4, rel=1e-12)] * 4
    assert ("--steps 14: the schedule of the first 10 steps is kept; steps 11-14 train at the final lr 2e-4"
            in res.stderr)
    # shorter: the same schedule, stopped early
    res = cli("--resume", str(short), "--steps", "8")
    assert res.returncode == 0, res.stderr[-3000:]
    lrs = _lrs(short)
    assert [lrs[s] for s in sorted(lrs)] == [expected[s] for s in range(1, 9)]
    assert "--steps 8: the run stops early on the schedule of its first 10 steps" in res.stderr


def test_optimizer_sgd_trains_and_resume_refuses_another_optimizer(tmp_path):
    from pyengine.checkpoint import read
    from pyengine.train.checkpoints import latest_checkpoint

    run = tmp_path / "run"
    res = cli(*TINY, "--optimizer", "sgd", "--lr", "0.05", "--warmup", "2", "--steps", "12", "--out", str(run))
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads((run / "config.json").read_text())["optimizer"] == "sgd"
    ck = read(latest_checkpoint(run))
    assert ck["index"]["optimizer"] == "sgd" and ck["index"]["states"] == ["momentum_buffer"]
    assert ck["meta"]["param_groups"][0]["momentum"] == 0.9
    losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert sum(losses[-3:]) / 3 < losses[0] - 0.5, losses
    res = cli("--resume", str(run), "--steps", "14", "--optimizer", "adamw")
    assert res.returncode == 2
    assert "--optimizer adamw (the run has sgd)" in res.stderr and "cannot change mid-run" in res.stderr


def test_help_documents_every_flag():
    res = cli("--help")
    assert res.returncode == 0
    for flag in ("--steps", "--model", "--batch-size", "--seq-len", "--grad-accum", "--precision", "--comm-dtype",
                 "--lr", "--data", "--out", "--resume", "--seed", "--baseline", "--trace", "--nproc",
                 "--keep-checkpoints", "--comm-timeout", "--cuda-graph", "--zero", "--optimizer"):
        assert flag in res.stdout
    from pyengine.config import OPTIMIZERS

    assert "{" + ",".join(OPTIMIZERS) + "}" in res.stdout, "--optimizer offers what the engine has"
    assert "sgd with momentum 0.9" in " ".join(res.stdout.split())
    text = " ".join(res.stdout.split())
    assert "gpt2 (12 layers x 768, 12 heads, 1024-byte context, GPT-2 124M's shape)" in text
    assert "large (12 layers x 768, 12 heads, 512-byte context" in text
    assert "auto (default): cuda when torch sees a GPU, else cpu" in text


def test_under_torchrun_nproc_is_the_world_size(monkeypatch):
    from pyengine.train.cli import build_parser, resolve

    for k, v in {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(k, v)
    parser = build_parser()
    argv = ["--model", "tiny", "--device", "cpu", "--nproc", "2"]
    assert resolve(parser.parse_args(argv), parser, argv).nproc == 4


def test_too_little_data_is_refused_before_any_rank_starts(tmp_path):
    small = tmp_path / "tiny.txt"
    small.write_text("just a few bytes\n" * 6)
    res = cli("--model", "tiny", "--steps", "2", "--data", str(small), "--out", str(tmp_path / "run"))
    assert res.returncode == 2
    assert "102 bytes give each of 2 rank(s) 51 bytes, fewer than the 196 that --seq-len 64 needs" in res.stderr
    assert not (tmp_path / "run").exists()


def test_baseline_ddp_alternates_its_steps_with_the_engine_and_is_named_for_what_ran(tmp_path):
    out = tmp_path / "run"
    res = cli(*TINY, "--steps", "4", "--out", str(out), "--baseline", "ddp")
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["baseline"]["label"] == "DDP" and summary["baseline"]["interleaved"]  # fp32: no AMP
    engine = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    base = [json.loads(line) for line in (out / "baseline_ddp.jsonl").read_text().splitlines()]
    assert [r["step"] for r in base] == [1, 2, 3, 4]
    # engine step k is logged before DDP step k, which ends before engine step k + 1
    for k in range(3):
        assert engine[k]["time"] <= base[k]["time"] <= engine[k + 1]["time"]
    report = (out / "report.md").read_text()
    assert "torch DDP" in report and "DDP + AMP" not in report and "alternated" in report
    assert "baseline DDP" in res.stderr or "DDP ms" in res.stderr  # progress while DDP trains


def test_baseline_label_names_the_amp_dtype():
    from pyengine.train.baseline import label

    assert (label("fp32"), label("bf16"), label("fp16")) == ("DDP", "DDP + AMP (bf16)", "DDP + AMP (fp16)")
