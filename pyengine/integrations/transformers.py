"""Hugging Face `Trainer` with pyengine doing backward and the optimizer step.

    from pyengine.integrations.transformers import EngineTrainer
    trainer = EngineTrainer(model=model, args=args, train_dataset=ds)   # was: Trainer(...)
    trainer.train()

What the Trainer keeps: data loading (and Accelerate's sharding of it over ranks), the
forward and HF's loss normalisation, callbacks, logging, the LR scheduler (built by HF's
`get_scheduler` over `engine.optimizer`), checkpoint folders and resuming. What the Engine
takes over: backward (`engine.backward` in place of `accelerator.backward`), the update at the
accumulation boundary, clipping, precision, and under torch.distributed the gradient
allreduce (the model is never handed to `accelerator.prepare`, so no DDP wraps it).

From `TrainingArguments`: learning_rate, weight_decay (HF's no-decay groups, from
`get_decay_parameter_names`), adam_beta1/2, adam_epsilon, gradient_accumulation_steps ->
grad_accum_steps, max_grad_norm -> clip_grad_norm (0 or less: none), bf16/fp16 -> precision.
An `engine_config=` given to EngineTrainer supplies every other field; the fields above are
always taken from the arguments.
"""
import dataclasses
import os

import torch

from ..config import EngineConfig
from ..engine import Engine

__all__ = ["EngineTrainer", "engine_config_from_args", "ENGINE_CHECKPOINT_DIR"]

ENGINE_CHECKPOINT_DIR = "pyengine"  # the engine's folder inside HF's checkpoint-N folder
SCHEDULER_NAME = "scheduler.pt"
# HF's `optim` values whose update is torch.optim.AdamW's (decoupled decay)
ADAMW_OPTIMS = ("adamw_torch", "adamw_torch_fused")


def engine_config_from_args(args, engine_config=None):
    """An EngineConfig with the TrainingArguments' fields mapped onto it (see the module doc)."""
    optim = str(getattr(args.optim, "value", args.optim))
    if optim not in ADAMW_OPTIMS:
        raise ValueError(
            f"pyengine: TrainingArguments(optim={optim!r}) is not supported: the engine's update is "
            f"torch.optim.AdamW's; use optim in {ADAMW_OPTIMS} (the update is the engine's fused AdamW either way)")
    if args.optim_args:
        raise ValueError(f"pyengine: TrainingArguments(optim_args={args.optim_args!r}) is not supported: pass "
                         "other optimizer fields through EngineTrainer(engine_config=EngineConfig(...))")
    if args.bf16 and args.fp16:
        raise ValueError("pyengine: bf16=True and fp16=True together")
    precision = "bf16" if args.bf16 else "fp16" if args.fp16 else "fp32"
    base = engine_config if engine_config is not None else EngineConfig()
    if base.optimizer != "adamw":
        raise ValueError(f"pyengine: EngineConfig(optimizer={base.optimizer!r}) under the Trainer: the Trainer's "
                         "arguments describe AdamW; use optimizer='adamw'")
    return dataclasses.replace(
        base,
        precision=precision,
        lr=args.learning_rate,
        betas=(args.adam_beta1, args.adam_beta2),
        eps=args.adam_epsilon,
        weight_decay=args.weight_decay,
        grad_accum_steps=args.gradient_accumulation_steps,
        clip_grad_norm=args.max_grad_norm if args.max_grad_norm and args.max_grad_norm > 0 else None,
    )


class _EngineStep:
    """What the Trainer holds as `self.optimizer`. The engine updates inside `engine.step()`,
    which EngineTrainer calls after every micro-batch's backward; the Trainer's own
    `optimizer.step()` at its boundary only checks that the engine's boundary was the same
    one. `param_groups` are the engine optimizer's (a scheduler built on either drives it)."""

    def __init__(self, engine):
        self.engine = engine
        self.last = None  # the StepResult of the last engine.step()

    @property
    def step_was_skipped(self):
        # Accelerate's optimizer_step_was_skipped reads this: the Trainer then leaves the LR
        # scheduler where it was, as after a GradScaler skip. Only fp16 skips (one host read).
        if self.engine.config.precision != "fp16" or self.last is None:
            return False
        return not bool(self.last)

    @property
    def param_groups(self):
        return self.engine.optimizer.param_groups

    @property
    def defaults(self):
        return self.engine.optimizer.defaults

    def step(self, closure=None):
        if self.engine.micro_step != 0:
            raise RuntimeError(
                "pyengine: the Trainer stepped after a window of fewer micro-batches than "
                f"gradient_accumulation_steps={self.engine.config.grad_accum_steps} (the last window of an epoch "
                "whose batch count it does not divide): make the batches per epoch a multiple of it")

    def zero_grad(self, set_to_none=True):
        pass  # the engine clears its gradients at the boundary

    def state_dict(self):
        return self.engine.state_dict()

    def load_state_dict(self, sd):
        self.engine.load_state_dict(sd)


def _make_class():
    from transformers import Trainer

    class EngineTrainer(Trainer):
        """transformers.Trainer with a pyengine Engine doing backward, clipping and the update.
        `engine_config`: an EngineConfig for the fields TrainingArguments does not set
        (bucket sizes, comm dtype, loss-scale knobs, ZeRO stage, ...). `self.engine` is the
        Engine once training has started."""

        def __init__(self, *args, engine_config=None, **kwargs):
            optimizers = kwargs.get("optimizers", (None, None))
            if optimizers is not None and any(o is not None for o in optimizers):
                raise ValueError("pyengine: EngineTrainer(optimizers=...) is not supported: the engine builds its "
                                 "own AdamW and the scheduler from TrainingArguments (lr_scheduler_type, "
                                 "warmup_steps); set them there, or subclass and override create_scheduler with "
                                 "a scheduler over self.engine.optimizer")
            if kwargs.get("optimizer_cls_and_kwargs") is not None:
                raise ValueError("pyengine: EngineTrainer(optimizer_cls_and_kwargs=...) is not supported: the "
                                 "update is the engine's AdamW; pass its fields through engine_config=")
            super().__init__(*args, **kwargs)
            if self.is_deepspeed_enabled or self.is_fsdp_enabled:
                raise ValueError("pyengine: EngineTrainer with DeepSpeed or FSDP: the engine replaces them")
            self._engine_config = engine_config_from_args(self.args, engine_config)
            self.engine = None
            self.accelerator.backward = self._engine_backward  # the one call training_step makes

        # -- optimizer and scheduler ---------------------------------------------------------
        def create_optimizer(self, model=None):
            if self.engine is None:
                model = self.model if model is None else model
                decay = set(self.get_decay_parameter_names(model))
                named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
                groups = [
                    {"params": [p for n, p in named if n in decay], "weight_decay": self.args.weight_decay},
                    {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0},
                ]
                groups = [g for g in groups if g["params"]]
                self.engine = Engine(model, self._engine_config, param_groups=groups)
                self.optimizer = _EngineStep(self.engine)
                self.accelerator._optimizers.append(self.optimizer)  # for optimizer_step_was_skipped
            return self.optimizer

        def create_scheduler(self, num_training_steps, optimizer=None):
            return super().create_scheduler(num_training_steps, optimizer=self.engine.optimizer)

        def _prepare_for_training(self, max_steps, train_dataloader, resume_from_checkpoint):
            # Trainer._prepare_for_training without accelerator.prepare(model, optimizer): the
            # engine owns the update and the allreduce, so no DDP and no AcceleratedOptimizer.
            if self._created_lr_scheduler:
                self.lr_scheduler = None
                self._created_lr_scheduler = False
            self.create_optimizer()
            self.create_scheduler(num_training_steps=max_steps)
            self.model_wrapped = self.model
            if resume_from_checkpoint is not None:
                self._load_optimizer_and_scheduler(resume_from_checkpoint)
            for attr in ("model", "optimizer", "lr_scheduler"):
                setattr(self.callback_handler, attr, getattr(self, attr))
            self.callback_handler.train_dataloader = train_dataloader
            return self.model, train_dataloader

        # -- backward, step, norm --------------------------------------------------------------
        def _engine_backward(self, loss, **kwargs):
            # training_step has normalised the loss for accumulation (divided it by the window's
            # micro-batch count, or by the window's token count); engine.backward divides by
            # grad_accum_steps itself, so it gets the loss back at one micro-batch's scale.
            ga = self.engine.config.grad_accum_steps
            self.engine.backward(loss * ga if ga != 1 else loss)
            self.optimizer.last = self.engine.step()  # updates at the engine's boundary, the Trainer's

        def _clip_grad_norm(self, model):
            return self.engine.grad_norm_tensor.detach().clone()

        def _get_grad_norm(self, model, grad_norm=None):
            if grad_norm is None:
                grad_norm = self.engine.grad_norm_tensor
            return float(grad_norm)

        # -- checkpoints ---------------------------------------------------------------------
        def _save_optimizer_and_scheduler(self, output_dir):
            self.engine.save(os.path.join(output_dir, ENGINE_CHECKPOINT_DIR))  # every rank: its shard
            if self.args.should_save:
                torch.save(self.lr_scheduler.state_dict(), os.path.join(output_dir, SCHEDULER_NAME))

        def _save_scaler(self, output_dir):
            pass  # the loss scale is in the engine's checkpoint

        def _load_scaler(self, checkpoint):
            pass

        def _load_optimizer_and_scheduler(self, checkpoint):
            if checkpoint is None:
                return
            path = os.path.join(checkpoint, ENGINE_CHECKPOINT_DIR)
            if not os.path.isdir(path):
                raise FileNotFoundError(f"pyengine: {checkpoint} holds no engine checkpoint ({path}); it was not "
                                        "written by EngineTrainer")
            self.engine.load(path)
            sched = os.path.join(checkpoint, SCHEDULER_NAME)
            if os.path.isfile(sched):
                self.lr_scheduler.load_state_dict(torch.load(sched, weights_only=True))

        def _save(self, output_dir=None, state_dict=None):
            # the parameters are views of the engine's flat buffers: safetensors refuses tensors
            # that share storage, so the model is saved from copies.
            if state_dict is None and self.engine is not None:
                state_dict = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
            return super()._save(output_dir, state_dict=state_dict)

    return EngineTrainer


_cls = None


def __getattr__(name):
    # transformers is imported on first use, so `import pyengine.integrations.transformers`
    # works without it
    global _cls
    if name == "EngineTrainer":
        if _cls is None:
            _cls = _make_class()
        return _cls
    raise AttributeError(name)
