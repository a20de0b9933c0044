"""The fused optimizers: one spec table, and a torch.optim.Optimizer facade over it.

Note: an optimizer is described once, by an OptimizerSpec: the hyper-parameters a param
group carries (torch's names, validated the same way everywhere), the flat fp32 state
buffers it keeps, and how a group's values become the core's config struct. Adding one
means one entry here, its element functor in csrc/kernels/ and its two drivers.

param_groups hold the user's parameters and hyper-parameters exactly as in torch, so
torch.optim.lr_scheduler works unchanged; a changed lr applies at the next step since the
step plan reads the groups' values each step.
"""
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import torch

from ._checks import HYPERPARAMETER_CHECKS as CHECKS
from .errors import UsageError


def _adam_config(decoupled):
    def make(mod, g):
        c = mod.AdamConfig()
        c.lr, (c.beta1, c.beta2), c.eps, c.weight_decay = g["lr"], g["betas"], g["eps"], g["weight_decay"]
        c.decoupled = decoupled
        return c

    return make


def _sgd_config(mod, g):
    if g["nesterov"] and (g["momentum"] <= 0 or g["dampening"] != 0):
        raise ValueError("nesterov: needs momentum > 0 and dampening == 0")
    c = mod.SgdConfig()
    c.lr, c.momentum, c.dampening, c.weight_decay, c.nesterov = (
        g["lr"], g["momentum"], g["dampening"], g["weight_decay"], g["nesterov"])
    return c


def _adam_hyper(g):
    return [g["lr"], g["betas"][0], g["betas"][1], g["eps"], g["weight_decay"]]


def _sgd_hyper(g):
    return [g["lr"], g["momentum"], g["dampening"], g["weight_decay"]]


@dataclass(frozen=True)
class OptimizerSpec:
    """What the engine needs to know about one optimizer."""
    name: str
    group_keys: Tuple[str, ...]  # hyper-parameters a param group carries (torch's names)
    native: str  # the core function of one fused pass
    config: Callable  # (core module, group dict) -> the core's config struct
    states: Callable  # (param groups) -> names of the flat fp32 state buffers, in the core's order
    torch_states: Tuple[str, ...]  # the same names in torch.optim's per-parameter state
    hyper: Callable  # (checked group values) -> the config's float fields in the core's order
    momentum_key: Optional[str] = None  # SGD: a value > 0 means momentum buffers exist from then on
    # torch.optim's other group entries that change the math; the engine refuses other values
    # (at build and when a step finds one written into param_groups)
    fixed: Tuple[Tuple[str, object, str], ...] = ()

    def defaults(self, cfg) -> dict:
        """A param group's entries where the user gives none: EngineConfig's values, and
        torch.optim's for the entries the engine keeps fixed."""
        return {**{k: getattr(cfg, k) for k in self.group_keys}, **{k: v for k, v, _ in self.fixed}}

    @property
    def watched(self) -> Tuple[str, ...]:
        """The group entries a step compares with the values last sent to the device."""
        return self.group_keys + tuple(k for k, _, _ in self.fixed)


_AMSGRAD = ("amsgrad", False, "pyengine's fused Adam keeps no max_exp_avg_sq; remove amsgrad (torch's default "
            "is False)")
_MAXIMIZE = ("maximize", False, "train on the negated loss instead")


def _decoupled(value):
    fix = "use EngineConfig(optimizer='adamw')" if not value else "use EngineConfig(optimizer='adam')"
    return ("decoupled_weight_decay", value, f"the weight decay's kind is fixed by the optimizer: {fix}")


SPECS: Dict[str, OptimizerSpec] = {
    "adamw": OptimizerSpec("adamw", ("lr", "betas", "eps", "weight_decay"), "adam_step", _adam_config(True),
                           lambda groups: ("exp_avg", "exp_avg_sq"), ("exp_avg", "exp_avg_sq"), _adam_hyper,
                           fixed=(_AMSGRAD, _MAXIMIZE, _decoupled(True))),
    "adam": OptimizerSpec("adam", ("lr", "betas", "eps", "weight_decay"), "adam_step", _adam_config(False),
                          lambda groups: ("exp_avg", "exp_avg_sq"), ("exp_avg", "exp_avg_sq"), _adam_hyper,
                          fixed=(_AMSGRAD, _MAXIMIZE, _decoupled(False))),
    "sgd": OptimizerSpec("sgd", ("lr", "momentum", "dampening", "weight_decay", "nesterov"), "sgd_step", _sgd_config,
                         lambda groups: ("momentum_buffer",) if any(g["momentum"] > 0 for g in groups) else (),
                         ("momentum_buffer",), _sgd_hyper, momentum_key="momentum", fixed=(_MAXIMIZE,)),
}


def check_group(spec: OptimizerSpec, values: dict, where: str) -> dict:
    """The group's hyper-parameters, validated (TypeError/ValueError naming where and what)."""
    out = {}
    for k in spec.group_keys:
        try:
            out[k] = CHECKS[k](k, values[k])
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"{where}: {exc}") from None
    if spec.name == "sgd" and out["nesterov"] and (out["momentum"] <= 0 or out["dampening"] != 0):
        raise ValueError(f"{where}: nesterov needs momentum > 0 and dampening == 0")
    for key, default, fix in spec.fixed:
        if values.get(key, default) != default:
            raise ValueError(f"{where}: {key}={values[key]!r} is not supported ({fix})")
    return out


class FusedOptimizer(torch.optim.Optimizer):
    """The torch.optim facade of an Engine's fused optimizer, built by the Engine.

    param_groups hold the user's parameters and hyper-parameters as torch.optim's do (LR
    schedulers and user writes reach the next step). step() is called by engine.step() right
    after its fused update, so LR schedulers see every update; called by anyone else it
    raises. zero_grad() clears the engine's gradients as PyTorch's would.
    state_dict() / load_state_dict() use torch.optim's format.
    """

    def __init__(self, spec: OptimizerSpec, groups, defaults, parts):
        self.spec = spec
        self._parts = parts
        self._notifying = False
        super().__init__(groups, defaults)
        self._built = True

    def _patch_step_function(self):
        """Note: torch.optim wraps every optimizer's step() in a profiler range and its step
        hooks, which costs more host time than this whole step; engine.step() records its own
        trace. LR schedulers still see each step (they wrap the instance's step)."""

    def add_param_group(self, param_group):
        if getattr(self, "_built", False):
            raise RuntimeError("FusedOptimizer: param groups are fixed when the Engine is built; pass every group to "
                               "Engine(..., param_groups=...)")
        super().add_param_group(param_group)

    def notify_step(self):
        """engine.step(): the update is done; what wraps step() (LR schedulers) learns of it."""
        self._notifying = True
        try:
            self.step()
        finally:
            self._notifying = False

    def step(self, closure=None):
        if closure is not None:
            raise ValueError("engine.optimizer.step(closure): closures are not supported; call engine.step()")
        if not self._notifying:
            raise UsageError("engine.optimizer.step() is part of engine.step(), which also checks the gradients, "
                             "clips them and updates the loss scale; call engine.step() once per micro-batch")

    def zero_grad(self, set_to_none: bool = True):
        """Discards the gradients accumulated so far, as torch.optim's zero_grad; with
        set_to_none=True between backward and the updating step it raises (PyTorch would
        skip every parameter there)."""
        self._parts.guard.clear(range(len(self._parts.params)), to_none=set_to_none)

    def state_dict(self):
        from .checkpoint import optimizer_state_dict

        return optimizer_state_dict(self._parts)

    def load_state_dict(self, state_dict):
        from .checkpoint import load_optimizer_state_dict

        load_optimizer_state_dict(self._parts, state_dict)


# -- another optimizer over the engine's parameters ------------------------------------------------
_hook = None


def refuse_foreign_optimizers():
    """Installs (once per process) a global optimizer step pre-hook: an optimizer other than
    an Engine's own that steps a parameter an Engine trains raises before it writes anything."""
    global _hook
    if _hook is None:
        from torch.optim.optimizer import register_optimizer_step_pre_hook

        _hook = register_optimizer_step_pre_hook(_check_foreign)


def _check_foreign(optimizer, args, kwargs):
    if isinstance(optimizer, FusedOptimizer):
        return
    for g in optimizer.param_groups:
        for p in g["params"]:
            owner = getattr(p, "_pyengine_owner", None)
            if owner is not None and owner() is not None:
                raise UsageError(
                    f"pyengine: {type(optimizer).__name__}.step() on parameters an Engine trains: the engine updates "
                    "them in engine.step() (its fp32 master weights and state would not follow this update). Use "
                    "engine.step() alone; for other hyper-parameters per parameter pass Engine(..., param_groups=...)")
