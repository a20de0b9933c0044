"""PyTorch Lightning: train an unchanged LightningModule through the Engine.

    from pyengine import EngineConfig
    from pyengine.integrations.lightning import EngineStrategy
    trainer = Trainer(strategy=EngineStrategy(EngineConfig()), ...)

EngineStrategy is a DDPStrategy (Lightning's launcher spawns the ranks and sets up the process
group: gloo on the CPU, nccl on CUDA) that never wraps the model in DDP: the Engine averages
the gradients itself. Its precision plugin (EnginePrecision) owns backward and the optimizer
step, as DeepSpeed's does. What Lightning holds is mapped onto the Engine:

  configure_optimizers' AdamW / Adam / SGD  -> EngineConfig.optimizer + param_groups (lr, betas,
                                               eps, weight_decay, momentum, dampening, nesterov,
                                               maximize); its LR schedulers drive engine.optimizer
  Trainer(accumulate_grad_batches=k)        -> grad_accum_steps=k
  Trainer(gradient_clip_val=c) (norm)       -> clip_grad_norm=c
  Trainer(precision=...)                    -> "32-true": fp32, "bf16-true"/"bf16-mixed": bf16,
                                               "16-mixed": fp16 with dynamic loss scaling
  checkpoints                               -> hold engine.state_dict(); ckpt_path resumes it

Anything it cannot honour is refused at fit() with a message saying what to do.
"""
from contextlib import contextmanager
from datetime import timedelta
from typing import Any, Callable, Optional

import torch

from ..config import EngineConfig
from ..errors import UsageError

try:
    import lightning.pytorch as pl
    from lightning.pytorch.plugins.precision import Precision
    from lightning.pytorch.strategies import DDPStrategy
    from lightning.pytorch.trainer.states import TrainerFn
    from lightning.pytorch.utilities import GradClipAlgorithmType
    from lightning.pytorch.core.optimizer import _init_optimizers_and_lr_schedulers
except ImportError as e:  # pragma: no cover - exercised only without lightning
    raise ImportError("pyengine.integrations.lightning needs PyTorch Lightning: pip install \"pyengine[lightning]\"") from e

__all__ = ["EngineStrategy", "EnginePrecision"]

# "bf16-mixed" too: the engine's bf16 keeps fp32 master weights, which is what mixed asks for (and
# Lightning turns "16-mixed" into "bf16-mixed" on the CPU, where it has no fp16 AMP)
_PRECISIONS = {"32-true": "fp32", "32": "fp32", "bf16-true": "bf16", "bf16-mixed": "bf16", "16-mixed": "fp16"}
_HYPER_KEYS = {
    "adamw": ("lr", "betas", "eps", "weight_decay", "maximize"),
    "adam": ("lr", "betas", "eps", "weight_decay", "maximize"),
    "sgd": ("lr", "momentum", "dampening", "nesterov", "weight_decay", "maximize"),
}
_CKPT_KEY = "pyengine_engine"


def _refuse(msg):
    raise UsageError(f"EngineStrategy: {msg}")


class EnginePrecision(Precision):
    """Backward through engine.backward, the step through engine.step (Lightning's clipping is
    the engine's clip_grad_norm, so Lightning's own is skipped)."""

    def __init__(self, precision: str, strategy: "EngineStrategy"):
        super().__init__()
        self.precision = precision  # Lightning's name of it
        self._strategy = strategy
        self._dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[_PRECISIONS[precision]]

    # half parameters: floating inputs follow them (as Lightning's HalfPrecision does)
    def convert_input(self, data):
        if self._dtype is None:
            return data
        from lightning_utilities.core.apply_func import apply_to_collection

        return apply_to_collection(data, torch.Tensor, lambda t: t.to(self._dtype) if t.is_floating_point() else t)

    @contextmanager
    def forward_context(self):
        if self._dtype is None:
            yield
            return
        default = torch.get_default_dtype()
        torch.set_default_dtype(self._dtype)
        try:
            yield
        finally:
            torch.set_default_dtype(default)

    def backward(self, tensor, model, optimizer, *args, **kwargs):
        engine = self._strategy.engine
        k = engine.config.grad_accum_steps
        # Lightning's closure already divided the loss by accumulate_grad_batches and the engine
        # divides by grad_accum_steps: undo Lightning's (exact for powers of two)
        loss = tensor * k if k > 1 else tensor
        boundary = engine._pipeline.window.next_is_boundary
        engine.backward(loss)
        if not boundary:
            engine.step()  # inside the window: counts the micro-batch, updates nothing

    def optimizer_step(self, optimizer, model, closure: Callable[[], Any], **kwargs):
        engine = self._strategy.engine
        closure_result = closure()  # training_step, zero_grad, backward
        if closure_result is None:
            _refuse("training_step returned None (a skipped batch); the engine cannot skip a micro-batch of its "
                    "accumulation window. Return a loss for every batch")
        window = engine._pipeline.window
        if not (window.backward_pending and window.next_is_boundary):
            _refuse(f"Lightning stepped the optimizer inside the engine's accumulation window of "
                    f"{engine.config.grad_accum_steps} micro-batches (the epoch's number of batches is not a multiple "
                    "of accumulate_grad_batches). Make limit_train_batches / the dataset's batches a multiple of "
                    "accumulate_grad_batches")
        self._after_closure(model, optimizer)
        return closure_result

    def clip_gradients(self, optimizer, clip_val=0.0, gradient_clip_algorithm=None):
        return None  # EngineConfig.clip_grad_norm does it inside engine.step()

    def _after_closure(self, model, optimizer):
        from lightning.pytorch.trainer import call

        trainer = model.trainer
        call._call_callback_hooks(trainer, "on_before_optimizer_step", optimizer)
        call._call_lightning_module_hook(trainer, "on_before_optimizer_step", optimizer)
        # engine.backward above ran the last micro-batch; the update (and clipping) happens at
        # the boundary step, which the window reached with that backward
        self._strategy.engine.step()


class EngineStrategy(DDPStrategy):
    """Lightning's DDPStrategy with the Engine in place of DistributedDataParallel and the
    torch optimizer: `Trainer(strategy=EngineStrategy(EngineConfig(...)))`.

    config: the EngineConfig for everything Lightning does not say (bucket sizes, comm dtype,
        loss-scale settings, ...); its optimizer fields come from configure_optimizers and its
        precision, grad_accum_steps and clip_grad_norm from the Trainer. **engine_kwargs: fields
        of EngineConfig, applied over `config`. start_method, process_group_backend, timeout:
        as DDPStrategy's ("popen" re-runs the script per rank; "spawn"/"fork" in notebooks, tests).
    """

    strategy_name = "pyengine"

    def __init__(self, config: Optional[EngineConfig] = None, *, start_method: str = "popen",
                 process_group_backend: Optional[str] = None, timeout: Optional[timedelta] = None,
                 accelerator=None, parallel_devices=None, cluster_environment=None, **engine_kwargs):
        kw = {} if timeout is None else {"timeout": timeout}
        super().__init__(accelerator=accelerator, parallel_devices=parallel_devices,
                         cluster_environment=cluster_environment, start_method=start_method,
                         process_group_backend=process_group_backend, **kw)
        base = (config or EngineConfig()).to_dict()
        unknown = sorted(set(engine_kwargs) - set(base))
        if unknown:
            raise TypeError(f"EngineStrategy: unknown EngineConfig field(s) {unknown}")
        base.update(engine_kwargs)
        self._user_config = EngineConfig.from_dict(base)
        self.engine = None
        self._final_state = None

    # -- set-up ----------------------------------------------------------------------------
    def setup(self, trainer: "pl.Trainer") -> None:
        self.accelerator.setup(trainer)
        if trainer.state.fn != TrainerFn.FITTING:
            self.model_to_device()  # validate / test / predict: nothing to train
            return
        module = self.lightning_module
        if not module.automatic_optimization:
            _refuse("manual optimization (automatic_optimization=False) is not supported: the engine owns backward "
                    "and the optimizer step. Use automatic optimization (return the loss from training_step), or "
                    "drive pyengine.Engine yourself without Lightning's strategy")
        mode = str(trainer.precision)
        if mode not in _PRECISIONS:
            _refuse(f"Trainer(precision={mode!r}) is not supported; use '32-true' (fp32), 'bf16-true' or "
                    "'bf16-mixed' (bf16 parameters, fp32 master weights) or '16-mixed' (fp16 parameters, fp32 master weights, dynamic "
                    "loss scaling)")
        if trainer.gradient_clip_val and GradClipAlgorithmType(trainer.gradient_clip_algorithm or "norm") != \
                GradClipAlgorithmType.NORM:
            _refuse("gradient_clip_algorithm='value' is not supported; the engine clips the global norm. Use "
                    "gradient_clip_algorithm='norm' (the default)")
        self.model_to_device()
        optimizers, scheduler_configs = _init_optimizers_and_lr_schedulers(module)
        if len(optimizers) != 1:
            _refuse(f"configure_optimizers returned {len(optimizers)} optimizers; the engine trains with one. Return "
                    "one optimizer (use param_groups for per-parameter hyper-parameters)")
        torch_opt = optimizers[0]
        name = _optimizer_name(torch_opt)
        cfg = self._engine_config(trainer, mode, name, torch_opt)
        groups = _engine_groups(torch_opt, name)
        from ..engine import Engine

        self._final_state = None
        self.engine = engine = Engine(module, cfg, param_groups=groups)
        # what schedulers (or the user) put in the groups beyond the hyper-parameters (initial_lr, ...)
        for mine, theirs in zip(engine.optimizer.param_groups, torch_opt.param_groups):
            for key, value in theirs.items():
                if key != "params" and key not in mine:
                    mine[key] = value
        _track_step(engine.optimizer)
        for config in scheduler_configs:
            _repoint(config.scheduler, torch_opt, engine.optimizer)
        self.optimizers = [engine.optimizer]
        self.lr_scheduler_configs = scheduler_configs
        self.precision_plugin = EnginePrecision(mode, self)

    def _engine_config(self, trainer, mode, name, torch_opt):
        user = self._user_config
        defaults = EngineConfig()
        lightning = {"precision": _PRECISIONS[mode], "grad_accum_steps": int(trainer.accumulate_grad_batches),
                     "clip_grad_norm": float(trainer.gradient_clip_val) if trainer.gradient_clip_val else None}
        d = user.to_dict()
        for key, value in lightning.items():
            mine = getattr(user, key)
            if mine != getattr(defaults, key) and mine != value:
                _refuse(f"EngineConfig.{key}={mine!r} but the Trainer says {value!r}; set it on the Trainer "
                        "(precision, accumulate_grad_batches, gradient_clip_val) and leave it at its default here")
            d[key] = value
        for key in ("lr", "betas", "eps", "weight_decay", "momentum", "dampening", "nesterov", "maximize"):
            d[key] = getattr(defaults, key)
        d["optimizer"] = name
        g0 = torch_opt.param_groups[0]
        for key in _HYPER_KEYS[name]:
            value = g0[key]
            d[key] = tuple(value) if key == "betas" else value
        if user.zero_stage != 0:
            _refuse("zero_stage=1 is not supported under Lightning yet (its checkpoints would need each rank's "
                    "shard); use zero_stage=0")
        return EngineConfig.from_dict(d)

    def setup_optimizers(self, trainer):  # done in setup(), on the engine
        pass

    # -- checkpoints -----------------------------------------------------------------------
    def save_checkpoint(self, checkpoint, filepath, storage_options=None):
        if self.engine is not None:
            checkpoint[_CKPT_KEY] = self.engine.state_dict()
        elif self._final_state is not None:  # trainer.save_checkpoint after fit()
            checkpoint[_CKPT_KEY] = self._final_state
        super().save_checkpoint(checkpoint, filepath, storage_options=storage_options)

    def load_optimizer_state_dict(self, checkpoint):
        if self.engine is None:
            return
        if _CKPT_KEY not in checkpoint:
            _refuse("the checkpoint holds no engine state (it was not written under EngineStrategy); resume it with "
                    "the strategy that wrote it, or load only the weights (LightningModule.load_from_checkpoint)")
        self.engine.load_state_dict(checkpoint[_CKPT_KEY])

    def teardown(self):
        if self.engine is not None:
            # what trainer.save_checkpoint(...) after fit() saves (the engine releases the model here)
            self._final_state = self.engine.state_dict()
            self.engine.close()
            self.engine = None
        super().teardown()


def _optimizer_name(opt):
    t = type(opt)
    if t is torch.optim.AdamW:
        return "adamw"
    if t is torch.optim.Adam:
        return "adamw" if opt.defaults.get("decoupled_weight_decay") else "adam"
    if t is torch.optim.SGD:
        return "sgd"
    _refuse(f"configure_optimizers returned {t.__module__}.{t.__name__}; the engine runs torch.optim.AdamW, Adam or "
            "SGD (their fused form). Return one of those")


def _engine_groups(opt, name):
    groups = []
    for gi, g in enumerate(opt.param_groups):
        if g.get("amsgrad"):
            _refuse(f"param_groups[{gi}] has amsgrad=True, which the engine does not run; set amsgrad=False")
        if g.get("differentiable"):
            _refuse(f"param_groups[{gi}] has differentiable=True, which the engine does not run")
        groups.append({"params": list(g["params"]),
                       **{k: (tuple(g[k]) if k == "betas" else g[k]) for k in _HYPER_KEYS[name]}})
    return groups


def _track_step(opt):
    """What LRScheduler's constructor does to its optimizer: note each step, so the scheduler
    knows the optimizer stepped first."""
    if hasattr(opt.step, "_wrapped_by_lr_sched"):
        return
    inner = opt.step

    def step(*args, **kwargs):
        opt._opt_called = True
        return inner(*args, **kwargs)

    step._wrapped_by_lr_sched = True
    opt.step = step


def _repoint(sched, old, new):
    """An LR scheduler built on the torch optimizer now drives the engine's (chained ones too)."""
    if getattr(sched, "optimizer", None) is old:
        sched.optimizer = new
    for child in getattr(sched, "_schedulers", ()) or ():
        _repoint(child, old, new)
