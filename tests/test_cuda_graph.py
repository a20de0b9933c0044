"""engine.capture(): a step captured in a CUDA graph and replayed gives the eager run's weights,
loss scale, skips and counts bitwise, an injected overflow and an LR schedule included. Each
case runs in a process of its own: a failed capture would poison the CUDA context."""
import pytest
import torch

from dist_util import ok, run_ranks

pytestmark = pytest.mark.cuda


def _toy(seed=0):
    torch.manual_seed(seed)
    layers = []
    for _ in range(4):
        layers += [torch.nn.Linear(32, 32), torch.nn.LayerNorm(32)]
    return torch.nn.Sequential(*layers).cuda()


def _graph_vs_eager(rank, world, precision):
    from pyengine import Engine, EngineConfig

    dt = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(8, 32, generator=g), torch.randn(8, 32, generator=g)) for _ in range(12)]
    poison = [float("inf") if k == 5 else 1.0 for k in range(12)]  # step 5 overflows
    cfg = dict(precision=precision, lr=1e-2, clip_grad_norm=1.0, initial_loss_scale=2.0**10, hysteresis=1)
    torch.manual_seed(7)
    loaded = {k: torch.randn_like(v) * 0.1 for k, v in _toy().state_dict().items()}
    runs = []
    for mode in ("eager", "graph"):
        m = _toy()
        e = Engine(m, EngineConfig(**cfg))
        sched = torch.optim.lr_scheduler.LambdaLR(e.optimizer, lambda k: 1.0 / (1 + 0.1 * k))
        x, y = torch.zeros(8, 32, device="cuda", dtype=dt), torch.zeros(8, 32, device="cuda", dtype=dt)
        scale_in = torch.ones((), device="cuda")
        x.copy_(data[0][0])
        y.copy_(data[0][1])

        def step_fn(m=m, e=e, x=x, y=y, scale_in=scale_in):
            loss = torch.nn.functional.mse_loss(m(x).float(), y.float()) * scale_in
            e.backward(loss)
            return loss

        if mode == "eager":
            for _ in range(3):  # what capture's warm-up does
                step_fn()
                e.step()
        else:
            graph = e.capture(step_fn, warmup=3)
        trace, results = [], []
        for k in range(12):
            x.copy_(data[k][0])
            y.copy_(data[k][1])
            scale_in.fill_(poison[k])
            if k == 8:  # weights written in place between steps reach the fp32 master weights
                m.load_state_dict(loaded)
            if mode == "eager":
                step_fn()
                result = e.step()
            else:
                result = graph.replay()
            sched.step()
            results.append(result)
            trace.append((bool(result), e.loss_scale))
        torch.cuda.synchronize()
        late = [bool(r) for r in results]  # each result keeps its own step's flag
        runs.append({"master": e.flat.master_flat.cpu(), "trace": trace, "late": late, "skipped": e.skipped_steps,
                     "global": e.global_step, "boundaries": e.boundary_steps})
    return runs


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_replay_equals_eager_bitwise(precision):
    [(eager, graph)] = ok(run_ranks(_graph_vs_eager, 1, precision), 1)
    assert torch.equal(graph["master"], eager["master"])
    assert graph["trace"] == eager["trace"]
    assert graph["trace"][5][0] is False, "the injected overflow is skipped in the graph too"
    assert graph["late"] == [t[0] for t in graph["trace"]], "a replay's result read a later step's flag"
    assert (graph["skipped"], graph["global"], graph["boundaries"]) == (eager["skipped"], eager["global"], 15)


def test_main_job_with_cuda_graph_trains_as_eager(tmp_path):
    """--cuda-graph replays captured steps; the weights end bitwise as the eager run's."""
    import subprocess
    import sys

    from pyengine.checkpoint import read
    from pyengine.train.checkpoints import latest_checkpoint

    args = ["--model", "tiny", "--batch-size", "4", "--max-data-mb", "0.5", "--eval-batches", "2", "--steps", "8",
            "--device", "cuda", "--nproc", "1", "--precision", "bf16"]
    for name, extra in (("eager", []), ("graph", ["--cuda-graph"])):
        res = subprocess.run([sys.executable, "-m", "pyengine.train", *args, *extra, "--out", str(tmp_path / name)],
                             capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, res.stderr[-3000:]
    a, b = (read(latest_checkpoint(tmp_path / n)) for n in ("eager", "graph"))
    assert a["meta"]["boundaries"] == b["meta"]["boundaries"] == 8
    assert torch.equal(a["master"], b["master"])


def test_the_main_job_fills_the_gpu_by_default():
    from pyengine.train.cli import build_parser, resolve

    p = build_parser()
    args = resolve(p.parse_args(["--device", "cuda"]), p, ["--device", "cuda"])
    assert args.model == "gpt2" and args.seq_len == 1024 and args.precision == "bf16"
    assert 1 <= args.batch_size <= 64
