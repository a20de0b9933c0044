"""A Hugging Face Trainer step with pyengine (EngineTrainer) against the Trainer's own default
(Accelerate, torch's fused AdamW), side by side on the same GPT-2 and the same data.

A step is what the Trainer does between on_step_begin and on_step_end: forward, backward,
clipping, the update, the scheduler (data loading is outside it). The two trainers run
alternately, one warm-up train() call each, then `rounds` short ones, so noise hits them alike; the first steps of
each call are dropped and the median of the rest is reported."""
import statistics
import tempfile
import time

import torch

from .common import print_table, write_results

SHAPES = {  # name: (n_layer, n_embd, n_head, seq, batch)
    "gpt2-tiny": (2, 32, 2, 16, 2),
    "gpt2-small-cpu": (4, 256, 4, 128, 8),
    "gpt2-124M": (12, 768, 12, 512, 8),
}


class _Tokens(torch.utils.data.Dataset):
    def __init__(self, n, seq, vocab):
        self.x = torch.randint(0, vocab, (n, seq), generator=torch.Generator().manual_seed(0))

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"input_ids": self.x[i], "labels": self.x[i]}


def _trainer(cls, shape, device, steps, vocab):
    from transformers import GPT2Config, GPT2LMHeadModel, TrainerCallback, TrainingArguments

    n_layer, n_embd, n_head, seq, batch = shape
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=n_layer, n_embd=n_embd, n_head=n_head, vocab_size=vocab,
                                       n_positions=seq))
    times = []

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            if device != "cpu":
                torch.cuda.synchronize()
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            if device != "cpu":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - self.t0)

    args = TrainingArguments(output_dir=tempfile.mkdtemp(), report_to=[], disable_tqdm=True,
                             use_cpu=device == "cpu", bf16=device != "cpu", dataloader_num_workers=0,
                             per_device_train_batch_size=batch, max_steps=steps, learning_rate=1e-4,
                             weight_decay=0.1, warmup_steps=2, max_grad_norm=1.0, save_strategy="no",
                             logging_strategy="no", seed=0)
    trainer = cls(model=model, args=args, train_dataset=_Tokens(steps * batch, seq, vocab), callbacks=[Clock()])
    return trainer, times


def run(args):
    from transformers import Trainer, logging

    from ..integrations.transformers import EngineTrainer

    logging.set_verbosity_error()
    device = args.device
    if device == "cpu":
        names = ["gpt2-tiny"] if args.quick else ["gpt2-tiny", "gpt2-small-cpu"]
    else:
        names = ["gpt2-tiny"] if args.quick else ["gpt2-small-cpu", "gpt2-124M"]
    steps, rounds, drop = (6, 2, 2) if args.quick else (12, 5, 2)
    vocab = 512 if not args.quick else 64
    rows = []
    for name in names:
        shape = SHAPES[name]
        pair = [_trainer(Trainer, shape, device, steps, vocab), _trainer(EngineTrainer, shape, device, steps, vocab)]
        samples = [[], []]
        for trainer, _ in pair:  # warm-up call: first-use costs (allocator, threads, engine build)
            trainer.train()
        for _ in range(rounds):
            for i, (trainer, times) in enumerate(pair):
                times.clear()
                trainer.train()
                samples[i].extend(times[drop:])
        base, eng = (statistics.median(s) for s in samples)
        pair[1][0].engine.close()
        rows.append({"model": name, "shape": dict(zip(("n_layer", "n_embd", "n_head", "seq", "batch"), shape)),
                     "steps_timed": len(samples[0]), "trainer_ms": round(base * 1e3, 3),
                     "engine_trainer_ms": round(eng * 1e3, 3), "speedup": round(base / eng, 3)})
    print_table(["model", "Trainer ms", "EngineTrainer ms", "speedup"],
                [[r["model"], r["trainer_ms"], r["engine_trainer_ms"], r["speedup"]] for r in rows])
    import transformers

    path = write_results("hf", device, rows, args.out,
                         extra={"transformers": transformers.__version__, "threads": torch.get_num_threads(),
                                "method": __doc__.split("\n\n")[1].replace("\n", " ")})
    print(f"wrote {path}")
    return 0
