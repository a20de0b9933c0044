"""The fused optimizers: specs read from the compiled core's registry, and a torch.optim
Optimizer facade over them.

Note: the core's one list of optimizers (csrc/optimizers.def, exported as OPTIMIZERS) names
each optimizer's state buffers and the slots of its device hyper block. Everything the
engine needs follows from it: the param-group keys are the slots' torch.optim names (beta1
and beta2 come from `betas`), each validated by the one check of that name (_checks.py),
defaulting to EngineConfig's field; the state buffers are torch.optim's per-parameter state
names. Adding an optimizer is its element functor and its line there; nothing here.

param_groups hold the user's parameters and hyper-parameters exactly as in torch, so
torch.optim.lr_scheduler works unchanged; a changed value applies at the next step since the
step plan reads the groups' values each step.
"""
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch

from ._checks import HYPERPARAMETER_CHECKS as CHECKS
from ._native import _C
from .errors import UsageError

_TORCH_KEY = {"beta1": "betas", "beta2": "betas"}  # a hyper slot -> its param-group key, where they differ


@dataclass(frozen=True)
class OptimizerSpec:
    """What the engine needs to know about one optimizer."""
    name: str
    native: str  # the core function of one fused pass: native(OptimizerArgs, stream)
    hyper_names: Tuple[str, ...]  # the device hyper block's slots, in the core's order
    torch_states: Tuple[str, ...]  # its state buffers, by torch.optim's per-parameter state names
    # torch.optim's other group entries that change the math: the engine refuses other values
    # (at build and when a step finds one written into param_groups)
    fixed: Tuple[Tuple[str, object, str], ...] = ()

    @property
    def group_keys(self) -> Tuple[str, ...]:
        """The hyper-parameters a param group carries (torch's names), in slot order."""
        return tuple(dict.fromkeys(_TORCH_KEY.get(h, h) for h in self.hyper_names))

    @property
    def momentum_key(self) -> Optional[str]:
        """SGD: state buffers exist only once momentum > 0 (torch.optim.SGD's momentum_buffer)."""
        return "momentum" if "momentum" in self.hyper_names else None

    def states(self, groups) -> Tuple[str, ...]:
        """The state buffers to make at build for these groups' values."""
        key = self.momentum_key
        if key is not None and not any(g[key] > 0 for g in groups):
            return ()
        return self.torch_states

    def hyper(self, g) -> list:
        """A checked group's values in the hyper block's slot order (booleans as 0 / 1)."""
        betas = g.get("betas")
        out = []
        for h in self.hyper_names:
            v = betas[0] if h == "beta1" else betas[1] if h == "beta2" else g[h]
            out.append(float(v))
        return out

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


def _decoupled(value):
    fix = "use EngineConfig(optimizer='adamw')" if not value else "use EngineConfig(optimizer='adam')"
    return ("decoupled_weight_decay", value, f"the weight decay's kind is fixed by the optimizer: {fix}")


# torch.optim's entries of an optimizer's param groups that the fused kernel does not follow
_FIXED = {"adamw": (_AMSGRAD, _decoupled(True)), "adam": (_AMSGRAD, _decoupled(False))}

SPECS: Dict[str, OptimizerSpec] = {
    o["name"]: OptimizerSpec(o["name"], o["function"], tuple(o["hyper"]), tuple(o["states"]),
                             _FIXED.get(o["name"], ()))
    for o in _C.OPTIMIZERS
}


def check_group(spec: OptimizerSpec, values: dict, where: str, fixed: bool = True) -> dict:
    """The group's hyper-parameters, validated (TypeError/ValueError naming where and what);
    fixed: also the entries the engine refuses to change (a load leaves that to the step, as
    torch.optim's own state_dict round trip would)."""
    out = {}
    for k in spec.group_keys:
        try:
            out[k] = CHECKS[k](k, values[k])
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"{where}: {exc}") from None
    if out.get("nesterov") and (out["momentum"] <= 0 or out["dampening"] != 0):
        raise ValueError(f"{where}: nesterov needs momentum > 0 and dampening == 0")
    for key, default, fix in spec.fixed if fixed else ():
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
