"""python -m pyengine.bench lightning: a Lightning Trainer's step with EngineStrategy against
Lightning's own default (one device, torch AdamW), side by side.

The two run in alternating rounds (fit, fit, fit, ...) on the same model, data and optimizer;
a callback stamps the end of every batch and the step time is the median of the differences
after each round's warm-up batches. Single device only; one step = one batch (no accumulation).
"""
import statistics
import time

import torch

from .common import device_name, print_table, write_results


def _module(width, depth, lr=1e-3):
    import lightning.pytorch as pl

    class MLP(pl.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            layers = []
            for _ in range(depth):
                layers += [torch.nn.Linear(width, width), torch.nn.GELU()]
            self.net = torch.nn.Sequential(*layers, torch.nn.Linear(width, 1))

        def training_step(self, batch, batch_idx):
            x, y = batch
            return torch.nn.functional.mse_loss(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=lr, weight_decay=0.1)

    return MLP()


class _Stamps:
    def __init__(self):
        import lightning.pytorch as pl

        stamps = self.stamps = []

        class CB(pl.Callback):
            def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
                stamps.append(time.perf_counter())

        self.callback = CB()


def _fit(engine, device, width, depth, steps, batch):
    import lightning.pytorch as pl
    from ..config import EngineConfig
    from ..integrations.lightning import EngineStrategy

    g = torch.Generator().manual_seed(1)
    x = torch.randn(steps * batch, width, generator=g)
    y = torch.randn(steps * batch, 1, generator=g)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch)
    st = _Stamps()
    trainer = pl.Trainer(accelerator="gpu" if device == "cuda" else "cpu", devices=1, max_steps=steps,
                         enable_progress_bar=False, logger=False, enable_checkpointing=False,
                         enable_model_summary=False, callbacks=[st.callback], use_distributed_sampler=False,
                         strategy=EngineStrategy(EngineConfig()) if engine else "auto")
    trainer.fit(_module(width, depth), loader)
    return [b - a for a, b in zip(st.stamps, st.stamps[1:])]


def run(args):
    import logging

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    device = "cuda" if str(args.device).startswith("cuda") else "cpu"
    shapes = [(256, 2, 32)] if args.quick else [(256, 2, 32), (1024, 4, 32)]
    rounds, steps, warm = (3, 12, 3) if args.quick else (5, 30, 5)
    rows = []
    for width, depth, batch in shapes:
        times = {True: [], False: []}
        for _ in range(rounds):
            for engine in (False, True):  # alternating rounds: drift in the machine hits both
                times[engine] += _fit(engine, device, width, depth, steps, batch)[warm:]
        plain, eng = statistics.median(times[False]) * 1e3, statistics.median(times[True]) * 1e3
        params = sum(p.numel() for p in _module(width, depth).parameters())
        rows.append({"model": f"mlp w{width} d{depth}", "params": params, "batch": batch,
                     "lightning_ms": round(plain, 3), "engine_strategy_ms": round(eng, 3),
                     "speedup": round(plain / eng, 3), "steps_timed_each": len(times[True])})
    print(f"Lightning Trainer step, {device_name(device)}: default (torch AdamW) vs EngineStrategy (fp32)")
    print_table(list(rows[0]), [list(r.values()) for r in rows])
    path = write_results("lightning", device, rows, args.out,
                         extra={"method": "alternating fit() rounds, median of per-batch intervals after warm-up",
                                "rounds": rounds, "steps_per_round": steps, "warmup_per_round": warm})
    print(f"wrote {path}")
    return 0
