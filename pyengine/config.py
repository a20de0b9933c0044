"""EngineConfig: every knob of the training step, validated up front."""
import dataclasses
from dataclasses import dataclass
from typing import Optional, Tuple, Union

from ._checks import HYPERPARAMETER_CHECKS, check_number
from ._native import _C

FLOAT32_MAX = 3.4028234663852886e38
PRECISIONS = ("fp32", "bf16", "fp16")
OPTIMIZERS = tuple(o["name"] for o in _C.OPTIMIZERS)  # the core's registry (csrc/optimizers.def)
_HYPER = {o["name"]: o["hyper"] for o in _C.OPTIMIZERS}
# EngineConfig fields that are some optimizer's hyper-parameters (the config's name of each slot)
_OPTIMIZER_FIELDS = {"lr": "lr", "beta1": "betas", "beta2": "betas", "eps": "eps", "weight_decay": "weight_decay",
                     "momentum": "momentum", "dampening": "dampening", "nesterov": "nesterov", "maximize": "maximize"}
COMM_BACKENDS = ("auto", "torch", "nccl")
COMM_DTYPES = (None, "fp32", "fp16", "bf16")


@dataclass
class EngineConfig:
    """Configuration of an Engine. Every field is checked when the Engine is built.

    Precision and optimizer
      precision: "fp32" | "bf16" | "fp16", the dtype of the model's parameters (and gradients);
          master weights and optimizer state are fp32 in every case.
      optimizer: "adamw" (decoupled decay) | "adam" (L2 decay) | "sgd" | "lion" (Chen et al.
          2023, one state buffer; lion-pytorch's formula): the core's registry.
      lr, betas, eps, weight_decay: as in torch.optim.AdamW / Adam; lr and weight_decay
          also for SGD and Lion, betas for Lion. Per-group values come from param_groups.
      momentum, dampening, nesterov: SGD only, as in torch.optim.SGD.
      maximize: as in torch.optim: the gradient's sign is flipped (every optimizer).
      clip_grad_norm: clip the global gradient norm to this value; None: no clipping.

    Accumulation
      grad_accum_steps: micro-batches per optimizer step; backward() divides the loss by it
          and step() updates only at the boundary.
      accum_dtype: "fp32" accumulates half-precision gradients in an fp32 main-grad buffer
          (4 more bytes per parameter); "param" accumulates in the parameter dtype.

    Loss scaling (fp16 only; bf16 and fp32 use none)
      loss_scale: "dynamic" or a fixed float.
      initial_loss_scale, loss_scale_window (clean steps before growing x2),
      hysteresis (overflows tolerated before backing off x0.5, DeepSpeed's rule),
      consecutive_hysteresis (restore hysteresis on any clean step), min_loss_scale,
      max_loss_scale.
      max_consecutive_skips: after this many skipped steps in a row the engine raises,
          naming the first parameters with non-finite gradients (0 disables).

    Data parallel (torch.distributed; used when the world size is above 1)
      comm_backend: "auto" (own NCCL on CUDA when compiled, else torch.distributed) |
          "torch" | "nccl".
      comm_dtype: None (the gradient buffer's dtype) | "fp32" | "fp16" | "bf16": the dtype on
          the wire; averaging is fused into the cast (predivide) so fp16 cannot overflow.
      bucket_mb, first_bucket_mb: bucket sizes in MiB; a small first bucket starts the
          communication early.
      rebuild_buckets: after the first iteration, lay buffers out in the observed
          gradient-ready order (as PyTorch DDP does).
      find_unused_parameters: allow parameters that get no gradient in an iteration.
      zero_stage: 0 (every rank holds all fp32 master weights and optimizer state) | 1 (each
          of the d ranks holds 1/d of them: ZeRO-1; gradients are reduce-scattered, the
          updated parameters all-gathered; with half params 12 of the 16-18 bytes a parameter
          costs become 12/d, with fp32 params 8 of 16 become 8/d). No effect on one process.
      overlap_param_gather: ZeRO-1: each module's forward waits only for the all-gather of its
          own parameters (forward pre-hooks), instead of the step waiting for all of them.
          Only for models whose parameters are used inside their own module's forward.
      comm_timeout: seconds before a stuck collective fails the job with an error.
      broadcast_params: copy rank 0's parameters and buffers to every rank at start.
      deterministic: the same bits at any number of ranks (deterministic.py, Note [one tree
          at any world size]): the G = grad_accum_steps x world_size micro-batches of a step
          are summed in one fixed binary tree, the loss scaled once by 1/G, the ranks
          combined by a fixed-pairing exchange and the norm folded over fixed chunks of the
          parameters' registration order. Keep G fixed (grad_accum_steps = G / world_size)
          and a run at 1, 2, 4, ... ranks gives bitwise the same weights. World sizes: powers
          of two; the wire carries the accumulation dtype (comm_dtype None or that dtype).

    Inputs
      cast_inputs: with precision "bf16" or "fp16", the floating-point tensors among the
          arguments of the model's forward (positional and keyword, inside lists, tuples and
          dicts too) are cast to that dtype before forward runs (a forward pre-hook on the
          model, removed by close()), so fp32 batches feed a half-precision model. Integer
          and bool tensors (token ids, masks) are left as they are. No effect with fp32.
          False: inputs reach the model as given.

    Observability
      trace_path: write a Chrome trace (chrome://tracing, Perfetto) of backward, buckets
          and optimizer to this file (per-rank suffix when distributed).
    """

    precision: str = "fp32"
    optimizer: str = "adamw"
    lr: float = 3e-4
    betas: Tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    momentum: float = 0.0
    dampening: float = 0.0
    nesterov: bool = False
    maximize: bool = False
    clip_grad_norm: Optional[float] = None
    grad_accum_steps: int = 1
    accum_dtype: str = "fp32"
    loss_scale: Union[str, float] = "dynamic"
    initial_loss_scale: float = 2.0**16
    loss_scale_window: int = 2000
    hysteresis: int = 2
    consecutive_hysteresis: bool = False
    min_loss_scale: float = 1.0
    max_loss_scale: float = 2.0**24
    max_consecutive_skips: int = 50
    comm_backend: str = "auto"
    comm_dtype: Optional[str] = None
    bucket_mb: float = 25.0
    first_bucket_mb: float = 1.0
    rebuild_buckets: bool = True
    find_unused_parameters: bool = False
    zero_stage: int = 0
    overlap_param_gather: bool = False
    comm_timeout: float = 300.0
    broadcast_params: bool = True
    deterministic: bool = False
    cast_inputs: bool = True
    trace_path: Optional[str] = None

    def __post_init__(self):
        self.validate()

    # -- validation ------------------------------------------------------------------------
    def validate(self):
        _choice("precision", self.precision, PRECISIONS)
        _choice("optimizer", self.optimizer, OPTIMIZERS)
        _choice("accum_dtype", self.accum_dtype, ("fp32", "param"))
        _choice("comm_backend", self.comm_backend, COMM_BACKENDS)
        _choice("comm_dtype", self.comm_dtype, COMM_DTYPES)
        for key, check in HYPERPARAMETER_CHECKS.items():
            setattr(self, key, check(f"EngineConfig.{key}", getattr(self, key)))
        if self.nesterov and (self.momentum <= 0 or self.dampening != 0):
            raise ValueError("EngineConfig.nesterov: needs momentum > 0 and dampening == 0")
        if self.clip_grad_norm is not None:
            _num("clip_grad_norm", self.clip_grad_norm, lo=0.0, lo_open=True)
        _int("grad_accum_steps", self.grad_accum_steps, lo=1)
        _int("zero_stage", self.zero_stage, lo=0)
        _choice("zero_stage", self.zero_stage, (0, 1))
        if self.overlap_param_gather is True and self.zero_stage == 0:
            raise ValueError("EngineConfig.overlap_param_gather: only with zero_stage=1 (without sharding there are no "
                             "parameters to gather)")
        for flag in ("overlap_param_gather", "find_unused_parameters", "rebuild_buckets", "broadcast_params",
                     "nesterov", "maximize", "consecutive_hysteresis", "deterministic", "cast_inputs"):
            if not isinstance(getattr(self, flag), bool):
                raise TypeError(f"EngineConfig.{flag}: expected True or False, got {type(getattr(self, flag)).__name__}")
        self._check_optimizer_fields()
        if self.deterministic and self.comm_dtype is not None and self.comm_dtype != self.accumulation_dtype:
            raise ValueError(
                f"EngineConfig.comm_dtype: {self.comm_dtype!r} with deterministic=True; the wire must carry the "
                f"accumulation dtype ({self.accumulation_dtype!r} here): a narrower wire would round the partial sums "
                "at tree levels that depend on the number of ranks. Leave comm_dtype=None")
        # the scale lives in float32 on the device: finite, and within its bounds
        if isinstance(self.loss_scale, str):
            _choice("loss_scale", self.loss_scale, ("dynamic",))
        else:
            _num("loss_scale", self.loss_scale, lo=0.0, lo_open=True, hi=FLOAT32_MAX)
        _num("min_loss_scale", self.min_loss_scale, lo=0.0, lo_open=True, hi=FLOAT32_MAX)
        _num("max_loss_scale", self.max_loss_scale, lo=self.min_loss_scale, hi=FLOAT32_MAX)
        _num("initial_loss_scale", self.initial_loss_scale, lo=self.min_loss_scale, hi=self.max_loss_scale)
        _int("loss_scale_window", self.loss_scale_window, lo=1)
        _int("hysteresis", self.hysteresis, lo=1)
        _int("max_consecutive_skips", self.max_consecutive_skips, lo=0)
        _num("bucket_mb", self.bucket_mb, lo=0.0, lo_open=True)
        _num("first_bucket_mb", self.first_bucket_mb, lo=0.0, lo_open=True)
        _num("comm_timeout", self.comm_timeout, lo=0.0, lo_open=True)
        if self.trace_path is not None and not isinstance(self.trace_path, str):
            raise TypeError("EngineConfig.trace_path: expected a file path (str) or None")

    def _check_optimizer_fields(self):
        """A field of another optimizer set away from its default would be ignored in silence."""
        used = {_OPTIMIZER_FIELDS[h] for h in _HYPER[self.optimizer]}
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        for name in dict.fromkeys(_OPTIMIZER_FIELDS.values()):
            if name not in used and getattr(self, name) != defaults[name]:
                owners = [o for o, hs in _HYPER.items() if name in {_OPTIMIZER_FIELDS[h] for h in hs}]
                raise ValueError(f"EngineConfig.{name}: set to {getattr(self, name)!r}, but optimizer="
                                 f"{self.optimizer!r} does not use it (it is {'/'.join(owners)}'s); remove it or "
                                 "change the optimizer")

    @property
    def accumulation_dtype(self) -> str:
        """The dtype gradients are summed in: fp32, or the half precision with accum_dtype='param'."""
        return "fp32" if self.accum_dtype == "fp32" else self.precision

    @property
    def dynamic_scaling(self) -> bool:
        return self.precision == "fp16" and self.loss_scale == "dynamic"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "EngineConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"EngineConfig: unknown field(s) {unknown}; known fields: {sorted(known)}")
        return cls(**d)


def _choice(name, value, allowed):
    if value not in allowed:
        raise ValueError(f"EngineConfig.{name}: {value!r} is not one of {list(allowed)}")


def _num(name, value, lo=None, hi=None, lo_open=False, hi_open=False):
    check_number(f"EngineConfig.{name}", value, lo, hi, lo_open, hi_open)


def _int(name, value, lo=None):
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"EngineConfig.{name}: expected an int, got {type(value).__name__}")
    if lo is not None and value < lo:
        raise ValueError(f"EngineConfig.{name}: must be >= {lo}, got {value}")
