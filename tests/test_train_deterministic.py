"""pyengine-train --deterministic: the sampler that depends on (seed, step, micro-batch) only,
its reads from disk, the fixed-order folds of the reported losses, the flags, and (slow, several
processes) bitwise the same losses and weights at 1, 2 and 4 ranks and across a --resume at
another --nproc."""
import builtins
import json
import random
import shutil
import subprocess
import sys

import pytest
import torch

from pyengine.train import cli as train_cli
from pyengine.train import data as data_mod
from pyengine.train.data import Corpus, StepData
from pyengine.train.folds import gather_strided, tree_mean


def _corpus_dir(tmp_path, sizes, seed=0):
    """Files of random printable bytes (every 33-byte window unique), named so the sorted
    order is the creation order; an empty file among them."""
    rng = random.Random(seed)
    folder = tmp_path / "data"
    folder.mkdir(parents=True)
    blobs = []
    for k, n in enumerate(sizes):
        blob = bytes(rng.randrange(32, 127) for _ in range(n))
        (folder / f"part{k:02d}.txt").write_bytes(blob)
        blobs.append(blob)
    return folder, b"".join(blobs)


SIZES = [37, 0, 50, 29, 64, 41, 33, 80, 45, 38, 90, 31]  # windows of 33 bytes often span 2-3 files


def _step_data(folder, rank, world, G=4, seq_len=32, max_bytes=10**6):
    return StepData(str(folder), rank, world, seq_len, max_bytes, G)


def test_corpus_reads_any_range_across_files(tmp_path):
    folder, whole = _corpus_dir(tmp_path, SIZES)
    c = Corpus(data_mod.corpus_files(str(folder)))
    assert c.size == len(whole) and c.bytes_read == 0
    rng = random.Random(1)
    ranges = [(0, len(whole)), (0, 0), (len(whole), len(whole)), (36, 38), (37, 87), (30, 200)]
    ranges += [tuple(sorted((rng.randrange(len(whole) + 1), rng.randrange(len(whole) + 1)))) for _ in range(200)]
    for lo, hi in ranges:
        assert c.read(lo, hi) == whole[lo:hi], (lo, hi)
    assert len(c._open) <= Corpus.keep_open
    with pytest.raises(IndexError):
        c.read(0, len(whole) + 1)
    capped = Corpus(data_mod.corpus_files(str(folder)), max_bytes=100)
    assert capped.size == 100 and capped.read(0, 100) == whole[:100]
    c.close()
    capped.close()


def test_a_micro_batch_is_the_same_at_any_number_of_ranks(tmp_path):
    folder, whole = _corpus_dir(tmp_path, SIZES)
    G, steps, batch = 8, 3, 3
    seen = {}
    for world in (1, 2, 4, 8):
        order = []
        for rank in range(world):
            d = _step_data(folder, rank, world, G=G)
            order += list(d.micros)
            for s in range(steps):
                for j in d.micros:
                    x, y = d.train_batch(7, s, j, batch)
                    if (s, j) in seen:
                        assert torch.equal(x, seen[s, j][0]) and torch.equal(y, seen[s, j][1]), (world, rank, s, j)
                    seen[s, j] = (x, y)
        assert order == list(range(G)), "rank r runs [r*G/d, (r+1)*G/d), in order"
    # and the batches do depend on the seed, the step and the micro-batch
    x0 = seen[0, 0][0]
    assert not torch.equal(x0, seen[0, 1][0]) and not torch.equal(x0, seen[1, 0][0])
    assert not torch.equal(x0, _step_data(folder, 0, 1).train_batch(8, 0, 0, batch)[0])


def test_windows_are_the_corpus_bytes_and_the_tail_is_held_out(tmp_path):
    folder, whole = _corpus_dir(tmp_path, SIZES)
    cap = 500
    d = _step_data(folder, 0, 1, max_bytes=cap)
    assert d.corpus.size == cap and d.n_train + d.n_val == cap
    spans = 0
    starts = [0] + [sum(SIZES[:k + 1]) for k in range(len(SIZES))]
    for s in range(20):
        x, y = d.train_batch(0, s, 0, 4)
        assert x.dtype == torch.int64 and x.shape == (4, 32) and torch.equal(x[:, 1:], y[:, :-1])
        for row in torch.cat([x, y[:, -1:]], dim=1):
            window = bytes(row.tolist())
            at = whole.find(window)
            assert 0 <= at and at + len(window) <= d.n_train, "a training window lies in the training part"
            spans += any(at < b < at + len(window) for b in starts)
    assert spans > 0, "some windows span two or more files"
    for i in range(10):
        x, y = d.val_batch(0, i, 4)
        for row in torch.cat([x, y[:, -1:]], dim=1):
            at = whole.find(bytes(row.tolist()))
            assert d.n_train <= at and at + 33 <= cap, "a held-out window lies in the held-out tail"
    assert bytes(d.prompt(16).tolist()) == whole[d.n_train:d.n_train + 16]


def test_each_rank_reads_from_disk_only_its_own_windows(tmp_path, monkeypatch):
    folder, whole = _corpus_dir(tmp_path, [3000, 2500, 4000, 3500])
    read_bytes = [0]

    class Counting:
        def __init__(self, fh):
            self.fh = fh

        def read(self, n=-1):
            out = self.fh.read(n)
            read_bytes[0] += len(out)
            return out

        def __getattr__(self, name):
            return getattr(self.fh, name)

    monkeypatch.setattr(data_mod, "open", lambda *a, **k: Counting(builtins.open(*a, **k)), raising=False)
    G, world, batch, steps, evals = 8, 4, 2, 3, 6
    for rank in range(world):
        read_bytes[0] = 0
        d = _step_data(folder, rank, world, G=G)
        assert read_bytes[0] == 0, "building the data reads nothing"
        for s in range(steps):
            for j in d.micros:
                d.train_batch(0, s, j, batch)
        for i in d.eval_indices(evals):
            d.val_batch(0, i, batch)
        mine = steps * len(d.micros) * batch + len(d.eval_indices(evals)) * batch
        assert read_bytes[0] == d.corpus.bytes_read == mine * 33
        assert read_bytes[0] < len(whole) // 4


def test_eval_batches_are_spread_over_the_ranks_and_the_same_at_any_number(tmp_path):
    folder, _ = _corpus_dir(tmp_path, SIZES)
    E = 5
    ref = [_step_data(folder, 0, 1).val_batch(3, i, 2)[0] for i in range(E)]
    for world in (2, 4):
        got = {}
        for rank in range(world):
            d = _step_data(folder, rank, world)
            assert list(d.eval_indices(E)) == list(range(rank, E, world)), "the order gather_strided puts back"
            for i in d.eval_indices(E):
                assert i not in got
                got[i] = d.val_batch(3, i, 2)[0]
        assert sorted(got) == list(range(E)) and all(torch.equal(got[i], ref[i]) for i in range(E))


def test_tree_mean_has_one_order_and_the_strided_gather_puts_values_back_in_order():
    v = torch.tensor([1e8, 1.0, -1e8, 3.0, 0.5], dtype=torch.float32)
    a, b, c, d, e = v
    expected = (((a + b) + (c + d)) + (e + 0.0)) / 5
    assert torch.equal(tree_mean(v), expected)
    assert torch.equal(tree_mean(v[:1]), v[0])
    # one rank: its values are all of them, in order
    assert torch.equal(gather_strided(v, 5), v)


def test_step_loss_of_several_ranks_is_the_one_rank_fold(monkeypatch):
    """What each rank contributes, concatenated in rank order (the gather), folds to the bits
    one rank gets from all G values."""
    from pyengine.train import folds, worker

    G = 8
    losses = torch.rand(G) * 5
    for world in (2, 4):
        shares = losses.view(world, G // world)
        monkeypatch.setattr(folds, "_world", lambda: world)
        monkeypatch.setattr(worker, "gather_equal", lambda local: shares.reshape(-1))
        assert torch.equal(worker.step_loss(shares[0]), tree_mean(losses))
    # the strided gather of held-out losses: rank r holds batches r, r + world, ...
    E = 7
    vals = torch.rand(E)
    for world in (2, 4, 8):
        per = -(-E // world)
        rows = [torch.cat([vals[r::world], torch.zeros(per - vals[r::world].numel())]) for r in range(world)]
        monkeypatch.setattr(folds, "_world", lambda: world)
        monkeypatch.setattr(folds, "gather_equal", lambda local: torch.cat(rows))
        assert torch.equal(gather_strided(vals[0::world], E), vals)


# -- flags --------------------------------------------------------------------------------


def _resolve(argv):
    parser = train_cli.build_parser()
    return train_cli.resolve(parser.parse_args(argv), parser, argv)


def _flags(tmp_path, *more):
    folder = tmp_path / "data"
    if not folder.exists():
        _corpus_dir(tmp_path, [4000, 3000])
    return ["--model", "tiny", "--seq-len", "32", "--device", "cpu", "--data", str(folder),
            "--out", str(tmp_path / "run"), *more]


def test_flag_defaults(tmp_path):
    args = _resolve(_flags(tmp_path, "--deterministic", "--nproc", "4"))
    assert args.grad_accum == 8 and args.threads == 1 and args.deterministic
    args = _resolve(_flags(tmp_path, "--nproc", "2"))
    assert args.grad_accum == 1 and args.threads is None and not args.deterministic


@pytest.mark.parametrize("more,message", [
    (["--nproc", "3", "--grad-accum", "6"], "--nproc 3 with --deterministic: the ranks must be a power of two"),
    (["--nproc", "4", "--grad-accum", "6"], "--nproc 4 with --deterministic: it must divide --grad-accum 6"),
    (["--nproc", "2", "--comm-dtype", "bf16"], "--comm-dtype bf16 with --deterministic"),
    (["--nproc", "1", "--max-data-mb", "0.00005"], "are fewer than the 66 that --seq-len 32 needs"),
])
def test_bad_deterministic_flags_are_parser_errors(tmp_path, capsys, more, message):
    with pytest.raises(SystemExit) as exc:
        _resolve(_flags(tmp_path, "--deterministic", *more))
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_dropout_is_refused(tmp_path, capsys, monkeypatch):
    from dataclasses import replace

    monkeypatch.setitem(train_cli.PRESETS, "tiny", replace(train_cli.PRESETS["tiny"], dropout=0.1))
    with pytest.raises(SystemExit):
        _resolve(_flags(tmp_path, "--deterministic", "--nproc", "1"))
    assert "uses dropout" in capsys.readouterr().err


def test_resume_keeps_G_and_checks_the_new_nproc(tmp_path, capsys):
    args = _resolve(_flags(tmp_path, "--deterministic", "--nproc", "2", "--grad-accum", "4"))
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps(vars(args)))
    resumed = _resolve(["--resume", str(run), "--nproc", "4"])
    assert resumed.nproc == 4 and resumed.grad_accum == 4 and resumed.threads == 1 and resumed.deterministic
    for more, message in [(["--nproc", "8"], "--nproc 8 with --deterministic: it must divide --grad-accum 4"),
                          (["--threads", "2"], "--threads 2 (the run has 1)"),
                          (["--grad-accum", "8"], "--grad-accum 8 (the run has 4)")]:
        with pytest.raises(SystemExit):
            _resolve(["--resume", str(run), *more])
        assert message in capsys.readouterr().err
    # without --deterministic the thread count is only how fast it runs
    plain = _resolve(_flags(tmp_path / "x", "--nproc", "2", "--threads", "1"))
    (tmp_path / "x" / "run").mkdir()
    (tmp_path / "x" / "run" / "config.json").write_text(json.dumps(vars(plain)))
    assert _resolve(["--resume", str(tmp_path / "x" / "run"), "--threads", "2"]).threads == 2


def test_help_documents_the_flags():
    text = " ".join(train_cli.build_parser().format_help().split())
    assert "--deterministic" in text and "--threads" in text
    assert "the micro-batches of the whole step over all ranks, G (8)" in text


# -- end to end ---------------------------------------------------------------------------

TINY = ["--model", "tiny", "--seq-len", "32", "--batch-size", "2", "--grad-accum", "4", "--steps", "4",
        "--eval-batches", "3", "--log-every", "1", "--ckpt-every", "2", "--device", "cpu", "--deterministic",
        "--max-data-mb", "0.03"]


def _cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "pyengine.train", *args], capture_output=True, text=True,
                          timeout=timeout)


def _run_record(run):
    from pyengine.checkpoint import read
    from pyengine.train.checkpoints import latest_checkpoint

    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    ck = read(latest_checkpoint(run))
    return {"steps": [m["step"] for m in metrics], "loss": [m["loss"] for m in metrics],
            "grad_norm": [m["grad_norm"] for m in metrics],
            "val_loss": json.loads((run / "summary.json").read_text())["val_loss"],
            "boundaries": ck["meta"]["boundaries"], "world_size": ck["index"]["world_size"],
            "state": {k: ck[k] for k in ("master", "exp_avg", "exp_avg_sq")}}


def _differences(a, b):
    """What differs, bitwise, between two runs' records (floats compared as floats: their
    JSON text is the shortest repr, so equal floats are equal bits)."""
    diffs = []
    for key in ("steps", "boundaries"):
        if a[key] != b[key]:
            diffs.append(f"{key}: {a[key]} vs {b[key]}")
    for key in ("loss", "grad_norm"):
        bad = [s for s, x, y in zip(a["steps"], a[key], b[key]) if x != y]
        if bad:
            diffs.append(f"{key} differs at step(s) {bad}")
    if a["val_loss"] != b["val_loss"]:
        diffs.append(f"val_loss {a['val_loss']!r} vs {b['val_loss']!r}")
    for name, t in a["state"].items():
        if not torch.equal(t, b["state"][name]):
            diffs.append(f"{name} differs (max {float((t - b['state'][name]).abs().max()):.3g})")
    return diffs


@pytest.mark.slow
def test_one_two_and_four_ranks_and_a_resume_at_another_nproc_are_bitwise_the_same(tmp_path):
    folder, _ = _corpus_dir(tmp_path, [9000, 7000, 11000, 8000])  # 35 kB, capped at 30 kB
    runs = {}
    for n in (1, 2, 4):
        out = tmp_path / f"n{n}"
        res = _cli(*TINY, "--data", str(folder), "--nproc", str(n), "--out", str(out))
        assert res.returncode == 0, res.stderr[-3000:]
        config = json.loads((out / "config.json").read_text())
        assert config["grad_accum"] == 4 and config["threads"] == 1 and config["deterministic"]
        runs[n] = _run_record(out)
        assert runs[n]["world_size"] == n and runs[n]["steps"] == [1, 2, 3, 4]
    # stopped after step 2 at 4 ranks (its checkpoint at 2 is the newest), resumed at 2
    stopped = tmp_path / "stopped"
    shutil.copytree(tmp_path / "n4", stopped)
    shutil.rmtree(stopped / "checkpoint-0000004")
    res = _cli("--resume", str(stopped), "--nproc", "2")
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads((stopped / "config.json").read_text())["grad_accum"] == 4, "G stays on --resume"
    runs["4 then 2"] = _run_record(stopped)
    assert runs["4 then 2"]["world_size"] == 2
    failures = {n: d for n, r in runs.items() if n != 1 and (d := _differences(runs[1], r))}
    assert not failures, "not bitwise the 1-rank run: " + "; ".join(f"{n} ranks: {', '.join(d)}"
                                                                     for n, d in failures.items())
