"""The main job and the Engine under faults: a rank that raises or is killed, Ctrl-C far from a
log point, a killed launcher, a second writer, a reused folder, a crash between checkpoints, a
damaged checkpoint, and bad inputs refused before anything starts."""
import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

from pyengine import Engine, EngineConfig
from pyengine.checkpoint import CheckpointError, read
from pyengine.checkfile import read_file
from pyengine.train.checkpoints import checkpoints

pytestmark = pytest.mark.slow

TINY = ["--model", "tiny", "--batch-size", "4", "--max-data-mb", "0.5", "--eval-batches", "2"]
LONG = [*TINY, "--steps", "100000", "--log-every", "100000", "--ckpt-every", "0"]


def cli(*args, env=None, timeout=240):
    return subprocess.run([sys.executable, "-m", "pyengine.train", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


class Run:
    """The main job in a process group of its own, as a terminal would run it, with its stderr
    read as it comes."""

    def __init__(self, *args, env=None):
        self.p = subprocess.Popen([sys.executable, "-m", "pyengine.train", *args], start_new_session=True,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                  env={**os.environ, **(env or {})})
        self.pid = self.p.pid
        self.lines = []
        self._reader = threading.Thread(target=lambda: self.lines.extend(self.p.stderr), daemon=True)
        self._reader.start()

    def wait_training(self, timeout=120):
        """Until rank 0 announces the run, then a little more: some steps done."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            if any("tokens/step" in line for line in list(self.lines)):
                time.sleep(2.0)
                return
            if self.p.poll() is not None:
                raise AssertionError("the run ended early: " + "".join(self.lines)[-2000:])
            time.sleep(0.1)
        raise AssertionError("the run did not start")

    def finish(self, timeout=120):
        self.p.wait(timeout=timeout)
        self._reader.join(timeout=10)
        return self.p.returncode, "".join(self.lines)


def children(pid):
    res = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True)
    return [int(x) for x in res.stdout.split()]


def alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie waiting for its reaper is gone for our purpose
        return f.read().split()[2] != "Z"


def metric_steps(out):
    return [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_a_rank_that_raises_is_reported_once_with_its_traceback(tmp_path):
    res = cli(*TINY, "--steps", "8", "--out", str(tmp_path / "run"), env={"PYENGINE_TRAIN_FAULT": "1:3"})
    assert res.returncode == 1, res.stderr[-2000:]
    assert "pyengine-train: rank 1 failed: RuntimeError: injected failure (PYENGINE_TRAIN_FAULT=1:3)" in res.stderr
    assert "_injected_fault" in res.stderr, "the last lines of its traceback"
    assert res.stderr.count("Traceback") == 1, "one report, not one per rank"


def test_a_rank_killed_by_a_signal_is_a_failure_not_an_interrupt(tmp_path):
    out = tmp_path / "run"
    run = Run(*LONG, "--out", str(out))
    run.wait_training()
    ranks = children(run.pid)
    assert len(ranks) == 2
    os.kill(ranks[1], signal.SIGKILL)
    code, err = run.finish(timeout=60)
    assert code == 1, err[-2000:]
    assert "rank 1 failed: killed by SIGKILL" in err and "interrupted" not in err


def test_ctrl_c_far_from_a_log_point_checkpoints_and_reports(tmp_path):
    out = tmp_path / "run"
    run = Run(*LONG, "--out", str(out))
    run.wait_training()
    os.killpg(run.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
    # the next log point is 100000 steps away: a run that stopped only there would not end
    # within finish()'s wait (it raises TimeoutExpired)
    code, err = run.finish()
    assert code == 130, err[-2000:]
    [ckpt] = checkpoints(out)
    steps = read(ckpt)["meta"]["boundaries"]
    assert 0 < steps < 100000 and (out / "report.md").exists()
    assert metric_steps(out) == list(range(1, steps + 1))
    assert f"--resume {out}" in err


def test_ranks_die_with_their_launcher(tmp_path):
    out = tmp_path / "run"
    run = Run(*LONG, "--out", str(out))
    run.wait_training()
    ranks = children(run.pid)
    os.kill(run.pid, signal.SIGKILL)  # the OOM killer, or kill -9
    run.finish()
    deadline = time.time() + 60
    while time.time() < deadline and any(alive(r) for r in ranks):
        time.sleep(0.2)
    assert not any(alive(r) for r in ranks), "orphaned ranks"
    assert checkpoints(out), "they stopped like on Ctrl-C: a checkpoint at the next step"
    res = cli("--resume", str(out), "--steps", str(read(checkpoints(out)[0])["meta"]["boundaries"] + 2))
    assert res.returncode == 0, res.stderr[-2000:]


def test_a_second_writer_is_refused_while_a_run_holds_the_folder(tmp_path):
    out = tmp_path / "run"
    run = Run(*LONG, "--out", str(out))
    try:
        run.wait_training()
        res = cli(*TINY, "--out", str(out))
        assert res.returncode == 2 and "already holds a run" in res.stderr
        (out / "checkpoint-0000001").mkdir()  # --resume then passes its own checks
        res = cli("--resume", str(out))
        assert res.returncode == 2 and "in use by another pyengine-train (pid" in res.stderr
    finally:
        os.killpg(run.pid, signal.SIGKILL)
        run.finish()


def test_reusing_a_run_folder_without_resume_is_refused(tmp_path):
    out = tmp_path / "run"
    assert cli(*TINY, "--steps", "2", "--out", str(out)).returncode == 0
    before = {f.name: f.read_bytes() for f in out.iterdir() if f.is_file()}
    res = cli(*TINY, "--steps", "2", "--out", str(out))
    assert res.returncode == 2 and "already holds a run; continue it with --resume" in res.stderr
    assert {f.name: f.read_bytes() for f in out.iterdir() if f.is_file()} == before, "nothing was changed"


def test_after_a_crash_and_resume_each_step_is_logged_once(tmp_path):
    out = tmp_path / "run"
    res = cli(*TINY, "--steps", "12", "--log-every", "1", "--ckpt-every", "5", "--out", str(out),
              env={"PYENGINE_TRAIN_FAULT": "0:8"})
    assert res.returncode == 1
    assert metric_steps(out)[-1] == 8, "steps 6-8 were logged after the checkpoint at 5"
    res = cli("--resume", str(out))
    assert res.returncode == 0, res.stderr[-2000:]
    assert metric_steps(out) == list(range(1, 13))


def test_a_damaged_checkpoint_is_skipped_for_the_older_one(tmp_path):
    out = tmp_path / "run"
    assert cli(*TINY, "--steps", "6", "--ckpt-every", "3", "--out", str(out)).returncode == 0
    newest, older = checkpoints(out)
    assert (newest.name, older.name) == ("checkpoint-0000006", "checkpoint-0000003")
    shard = newest / "shard-0-of-1.pt"
    data = bytearray(shard.read_bytes())
    g = torch.Generator().manual_seed(0)
    middle = len(data) // 2
    data[middle:middle + 4096] = bytes(torch.randint(0, 256, (4096,), generator=g, dtype=torch.uint8).tolist())
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="checksum does not match"):
        read_file(shard)
    res = cli("--resume", str(out), "--steps", "8")
    assert res.returncode == 0, res.stderr[-2000:]
    assert "checksum does not match" in res.stderr and "resuming from the older checkpoint" in res.stderr
    assert "resumed" in res.stderr and "at step 3" in res.stderr
    assert [c.name for c in checkpoints(out)] == ["checkpoint-0000008", "checkpoint-0000006"]


@pytest.mark.parametrize("args,message", [
    (["--seq-len", "100000"], "--seq-len 100000"),
    (["--data", "EMPTY_FILE"], "0 bytes give each of 2 rank(s)"),
    (["--data", "EMPTY_DIR"], "the folder holds no text files"),
    (["--comm-timeout", "0"], "--comm-timeout"),
    (["--keep-checkpoints", "0"], "--keep-checkpoints"),
])
def test_bad_inputs_are_refused_before_any_rank_starts(tmp_path, args, message):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "empty_dir").mkdir()
    (tmp_path / "empty_dir" / "data.bin").write_bytes(b"\0")
    args = [a.replace("EMPTY_FILE", str(tmp_path / "empty.txt")).replace("EMPTY_DIR", str(tmp_path / "empty_dir"))
            for a in args]
    res = cli(*TINY, "--steps", "2", "--out", str(tmp_path / "run"), *args, timeout=60)
    assert res.returncode == 2 and message in res.stderr, res.stderr[-2000:]
    assert not (tmp_path / "run").exists(), "no rank started, no run folder made"


def test_resume_refuses_changes_to_what_the_run_computes_and_applies_the_others(tmp_path):
    out = tmp_path / "run"
    assert cli(*TINY, "--steps", "2", "--out", str(out)).returncode == 0
    res = cli("--resume", str(out), "--model", "small", "--lr", "0.1", "--precision", "bf16")
    assert res.returncode == 2
    for part in ("--model small (the run has tiny)", "--lr 0.1 (the run has 0.002)",
                 "--precision bf16 (the run has fp32)"):
        assert part in res.stderr
    # a checkpoint loads at any number of ranks and either ZeRO stage
    res = cli("--resume", str(out), "--steps", "3", "--comm-timeout", "60", "--nproc", "1", "--zero", "1")
    assert res.returncode == 0, res.stderr[-2000:]
    assert ("resuming with --steps 3 (was 2), --comm-timeout 60.0 (was 300.0), --nproc 1 (was 2), --zero 1 (was 0)"
            in res.stderr)
    assert "each rank now reads another part of the data" in res.stderr


# -- the Engine's own surprises (one process) ----------------------------------------------------
def _mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))


def test_backward_twice_without_step_raises_in_one_process_too():
    m = _mlp()
    e = Engine(m, EngineConfig())
    x = torch.randn(2, 4)
    e.backward(m(x).sum())
    with pytest.raises(RuntimeError, match="called twice without engine.step"):
        e.backward(m(x).sum())


def test_a_second_engine_on_the_same_model_is_refused_until_the_first_closes():
    m = _mlp()
    first = Engine(m, EngineConfig())
    with pytest.raises(ValueError, match="already trained by another Engine"):
        Engine(m, EngineConfig())
    first.close()
    Engine(m, EngineConfig())


@pytest.mark.parametrize("kwargs,message", [
    (dict(initial_loss_scale=float("inf")), "initial_loss_scale: must be <= 16777216"),
    (dict(loss_scale=float("inf")), "loss_scale: must be <="),
    (dict(optimizer="adamw", momentum=0.9), "momentum: set to 0.9, but optimizer='adamw' does not use it"),
    (dict(optimizer="sgd", betas=(0.8, 0.9)), "betas: set to (0.8, 0.9), but optimizer='sgd'"),
])
def test_config_values_that_would_be_ignored_or_stall_training_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        EngineConfig(**kwargs)


def test_a_sparse_embedding_is_refused_with_a_clear_error():
    m = torch.nn.Sequential(torch.nn.Embedding(10, 4, sparse=True), torch.nn.Linear(4, 1))
    with pytest.raises(ValueError, match=r"0 is an embedding with sparse=True.*sparse=False"):
        Engine(m, EngineConfig(precision="bf16"))


def test_non_finite_weights_are_not_saved_over_a_good_checkpoint(tmp_path):
    m = _mlp()
    e = Engine(m, EngineConfig())
    path = tmp_path / "ckpt"
    e.save(path)
    good = {f.name: f.read_bytes() for f in path.iterdir()}
    with torch.no_grad():
        e.flat.master_view(0)[3] = float("nan")
    with pytest.raises(FloatingPointError, match=r"inf/NaN \(first: 0\.weight\)"):
        e.save(path)
    assert {f.name: f.read_bytes() for f in path.iterdir()} == good


def test_what_interrupted_saves_left_is_removed(tmp_path):
    from pyengine.train import checkpoints as train_ckpts

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    left = tmp_path / ".ckpt.partial"  # a save of "ckpt" that died before its rename
    left.mkdir()
    (left / f".pyengine-{int(dead.stdout)}-abcd.tmp").write_bytes(b"x" * 100)
    e = Engine(_mlp(), EngineConfig())
    e.save(tmp_path / "ckpt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    # the main job's run folder: partial saves of other steps too (the run's lock makes it the only writer)
    (tmp_path / ".checkpoint-0000003.partial").mkdir()
    (tmp_path / "checkpoint-0000002.old").mkdir()
    train_ckpts.save(e, tmp_path, 4, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-0000004", "ckpt"]


def _resume_when_one_rank_cannot_read_rank(rank, world, out):
    from pyengine.train.checkpoints import load_newest_good, save

    torch.distributed.init_process_group("gloo")
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 4)
    engine = Engine(model, EngineConfig(lr=0.1, zero_stage=1))
    for step in (1, 2):
        engine.backward(model(torch.ones(2, 4)).square().sum())
        engine.step()
        save(engine, out, step, keep=2, extra={"step": step})
    if rank == 1:  # a transient read error on one rank only, for the newest checkpoint
        real = engine.load

        def flaky(path):
            if path.name.endswith("0000002"):
                raise OSError("simulated read error")
            return real(path)

        engine.load = flaky
    extra, path = load_newest_good(engine, out)
    return {"extra": extra, "path": path.name}


def test_every_rank_resumes_from_the_same_checkpoint_when_one_cannot_read_the_newest(tmp_path):
    from dist_util import ok, run_ranks

    out = ok(run_ranks(_resume_when_one_rank_cannot_read_rank, 2, tmp_path), 2)
    assert [r["extra"]["step"] for r in out] == [1, 1]


def _damage(path):
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 64] = bytes(255 - b for b in data[middle:middle + 64])
    path.write_bytes(bytes(data))


def test_pruning_keeps_the_checkpoint_just_written_over_a_damaged_newer_one(tmp_path):
    out = tmp_path / "run"
    assert cli(*TINY, "--steps", "6", "--ckpt-every", "3", "--out", str(out)).returncode == 0
    _damage(out / "checkpoint-0000006" / "shard-0-of-1.pt")
    # resumed from 3, it stops at 5 and keeps one checkpoint: the one it has just written, not the
    # damaged 6 from the steps it abandoned
    res = cli("--resume", str(out), "--steps", "5", "--keep-checkpoints", "1")
    assert res.returncode == 0, res.stderr[-2000:]
    assert [c.name for c in checkpoints(out)] == ["checkpoint-0000005"]
    assert read(out / "checkpoint-0000005")["meta"]["boundaries"] == 5
    assert "at step 3" in res.stderr and "removed checkpoint-0000006" in res.stderr
    res = cli("--resume", str(out), "--steps", "7")
    assert res.returncode == 0, res.stderr[-2000:]
    assert "at step 5" in res.stderr and "skipping" not in res.stderr
    assert metric_steps(out) == list(range(1, 8))


def test_pruning_at_the_engine_level_never_removes_the_checkpoint_just_written(tmp_path):
    from pyengine.train import checkpoints as train_ckpts

    e = Engine(_mlp(), EngineConfig())
    for step in (100, 200):
        train_ckpts.save(e, tmp_path, step, keep=2)
    # resumed from 100 (200 did not read back), it now writes 150: 200 is an abandoned future
    train_ckpts.save(e, tmp_path, 150, keep=1)
    assert [c.name for c in checkpoints(tmp_path)] == ["checkpoint-0000150"]
    train_ckpts.save(e, tmp_path, 160, keep=2)
    assert [c.name for c in checkpoints(tmp_path)] == ["checkpoint-0000160", "checkpoint-0000150"]


def test_a_run_that_stopped_before_its_first_checkpoint_starts_again_on_resume(tmp_path):
    out = tmp_path / "run"
    res = cli(*TINY, "--steps", "6", "--log-every", "1", "--out", str(out), env={"PYENGINE_TRAIN_FAULT": "1:3"})
    assert res.returncode == 1 and not checkpoints(out)
    assert f"no checkpoint was written yet: pyengine-train --resume {out} starts the run again from step 0" in res.stderr
    assert metric_steps(out)[-1] == 3
    # a plain start on it sends to --resume (or another --out), and changes nothing
    before = {f.name: f.read_bytes() for f in out.iterdir() if f.is_file()}
    res = cli(*TINY, "--steps", "6", "--out", str(out))
    assert res.returncode == 2
    assert {f.name: f.read_bytes() for f in out.iterdir() if f.is_file()} == before
    assert (f"stopped before its first checkpoint: pyengine-train --resume {out} starts it again from step 0 with its "
            "saved flags; or choose another --out") in res.stderr
    # --resume starts it again with its saved flags
    res = cli("--resume", str(out))
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stderr.count("starting it again from step 0 with its saved flags") == 1
    assert metric_steps(out) == list(range(1, 7)), "the first attempt's steps are not kept"
    assert [c.name for c in checkpoints(out)] == ["checkpoint-0000006"]


def _zero1_save_into_own_folder_rank(rank, world, root):
    torch.distributed.init_process_group("gloo")
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 4)
    engine = Engine(model, EngineConfig(lr=0.1, zero_stage=1))
    engine.backward(model(torch.ones(2, 4)).square().sum())
    engine.step()
    try:
        engine.save(root / f"node{rank}" / "ckpt")  # no shared filesystem: each rank its own path
    except CheckpointError as exc:
        return {"error": str(exc), "left": sorted(str(p.relative_to(root)) for p in root.rglob("*"))}
    return {"error": None}


def test_zero1_ranks_writing_into_different_folders_fail_at_the_first_save(tmp_path):
    from dist_util import ok, run_ranks

    out = ok(run_ranks(_zero1_save_into_own_folder_rank, 2, tmp_path), 2)
    for r in out:
        assert r["error"] is not None, "every rank fails, at this first save"
        assert (f"shard-1-of-2.pt, written by rank 1 into its folder {tmp_path / 'node1' / '.ckpt.partial'}, is not "
                f"in rank 0's folder {tmp_path / 'node0' / '.ckpt.partial'}") in r["error"]
        assert ("every rank must write into the same folder; use a shared filesystem for --out (or engine.save path)"
                in r["error"].lower())
        assert "resume" not in r["error"]
    assert not list(tmp_path.rglob("ckpt")) and not list(tmp_path.rglob(".ckpt.partial")), "nothing left in place"


def test_zero1_main_job_with_an_out_per_node_fails_at_the_first_checkpoint(tmp_path):
    """Two nodes of the user's torchrun, each with its own --out (no shared filesystem)."""
    from dist_util import free_port

    port = str(free_port())
    procs = []
    for rank in (0, 1):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "pyengine.train", *TINY, "--steps", "6", "--ckpt-every", "2", "--zero", "1",
             "--out", str(tmp_path / f"node{rank}")], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            text=True))
    errs = [p.communicate(timeout=240)[1] for p in procs]
    for rank, (p, err) in enumerate(zip(procs, errs)):
        assert p.returncode not in (0, None), f"rank {rank} exited {p.returncode}: {err[-2000:]}"
        assert "shard-1-of-2.pt, written by rank 1 into its folder" in err, err[-2000:]
        assert "use a shared filesystem for --out" in err
        assert "--resume" not in err
    for rank in (0, 1):
        node = tmp_path / f"node{rank}"
        assert not checkpoints(node) and not list(node.glob(".checkpoint-*")), "no checkpoint, complete or partial"
        assert (node / "metrics.jsonl").exists() == (rank == 0)
    assert [json.loads(line)["step"] for line in (tmp_path / "node0" / "metrics.jsonl").read_text().splitlines()] \
        == [1, 2], "it failed at the first checkpoint, step 2"


# A stand-in for torchrun's agent: starts one rank with torchrun's environment, says its pid, waits.
_AGENT = """
import os, subprocess, sys
env = dict(os.environ, RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1", GROUP_RANK="0",
           TORCHELASTIC_RUN_ID="test", MASTER_ADDR="127.0.0.1", MASTER_PORT="29555")
p = subprocess.Popen([sys.executable, "-m", "pyengine.train", *sys.argv[1:]], env=env)
print(p.pid, flush=True)
p.wait()
"""


def test_a_rank_under_torchrun_stops_with_a_checkpoint_when_the_agent_is_killed(tmp_path):
    out = tmp_path / "run"
    agent = subprocess.Popen([sys.executable, "-c", _AGENT, *LONG, "--out", str(out)], start_new_session=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    rank = int(agent.stdout.readline())
    lines = []
    reader = threading.Thread(target=lambda: lines.extend(agent.stderr), daemon=True)
    reader.start()
    deadline = time.time() + 120
    while not any("tokens/step" in line for line in list(lines)):
        assert time.time() < deadline and alive(rank), "the rank did not start: " + "".join(lines)[-2000:]
        time.sleep(0.1)
    time.sleep(2.0)
    os.kill(agent.pid, signal.SIGKILL)  # kill -9 of the agent, or its node lost
    agent.wait(timeout=10)
    deadline = time.time() + 60
    while time.time() < deadline and alive(rank):
        time.sleep(0.2)
    assert not alive(rank), "the rank trained on without its agent"
    assert checkpoints(out), "it stopped like on Ctrl-C: a checkpoint at the next step"
    config = json.loads((out / "config.json").read_text())
    assert (config["nproc"], config["nproc_per_node"], config["nnodes"]) == (1, 1, 1)
