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
from typing import Callable, Dict, Tuple

import torch

from ._checks import HYPERPARAMETER_CHECKS as CHECKS


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


SPECS: Dict[str, OptimizerSpec] = {
    "adamw": OptimizerSpec("adamw", ("lr", "betas", "eps", "weight_decay"), "adam_step", _adam_config(True),
                           lambda groups: ("exp_avg", "exp_avg_sq"), ("exp_avg", "exp_avg_sq"), _adam_hyper),
    "adam": OptimizerSpec("adam", ("lr", "betas", "eps", "weight_decay"), "adam_step", _adam_config(False),
                          lambda groups: ("exp_avg", "exp_avg_sq"), ("exp_avg", "exp_avg_sq"), _adam_hyper),
    "sgd": OptimizerSpec("sgd", ("lr", "momentum", "dampening", "weight_decay", "nesterov"), "sgd_step", _sgd_config,
                         lambda groups: ("momentum_buffer",) if any(g["momentum"] > 0 for g in groups) else (),
                         ("momentum_buffer",), _sgd_hyper),
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
    return out


class FusedOptimizer(torch.optim.Optimizer):
    """Adam / AdamW / SGD over an Engine's flat buffers, built by the Engine.

    step() is the fused update inside engine.step() (which also checks gradients, clips and
    updates the loss scale); called on its own it raises. zero_grad() clears the engine's
    gradients as PyTorch's would. state_dict() / load_state_dict() use torch.optim's format.
    """

    def __init__(self, spec: OptimizerSpec, groups, defaults, engine):
        self.spec = spec
        self._engine = engine
        self._update = None  # set by engine.step() around its call of step()
        super().__init__(groups, defaults)
        self.steps = torch.zeros(len(self.param_groups), dtype=torch.float32, device=engine.device)

    def _patch_step_function(self):
        """Note: torch.optim wraps every optimizer's step() in a profiler range and its step
        hooks, which costs more host time than this whole step; engine.step() records its own
        trace. LR schedulers still see each step (they wrap the instance's step)."""

    def add_param_group(self, param_group):
        if getattr(self, "steps", None) is not None:
            raise RuntimeError("FusedOptimizer: param groups are fixed when the Engine is built; pass every group to "
                               "Engine(..., param_groups=...)")
        super().add_param_group(param_group)

    def step(self, closure=None):
        if closure is not None:
            raise ValueError("engine.optimizer.step(closure): closures are not supported; call engine.step()")
        if self._update is None:
            raise RuntimeError("engine.optimizer.step() is part of engine.step(), which also checks the gradients, "
                               "clips them and updates the loss scale; call engine.step() once per micro-batch")
        self._update()

    def zero_grad(self, set_to_none: bool = True):
        """Discards the gradients accumulated so far (either value of set_to_none)."""
        self._engine.grads.clear(range(len(self._engine.params)))

    def state_dict(self):
        from .checkpoint import optimizer_state_dict

        return optimizer_state_dict(self._engine)

    def load_state_dict(self, state_dict):
        from .checkpoint import load_optimizer_state_dict

        load_optimizer_state_dict(self._engine, state_dict)
