"""Argument checks shared by ops and EngineConfig: one wording for every bad number."""
import math


def check_number(name, value, lo=None, hi=None, lo_open=False, hi_open=False) -> float:
    """value as a float, or a TypeError/ValueError that names `name` and what was expected."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}: expected a number, got {type(value).__name__}")
    value = float(value)
    if math.isnan(value):
        raise ValueError(f"{name}: must not be NaN")
    if lo is not None and (value < lo or (lo_open and value == lo)):
        raise ValueError(f"{name}: must be {'>' if lo_open else '>='} {lo}, got {value}")
    if hi is not None and (value > hi or (hi_open and value == hi)):
        raise ValueError(f"{name}: must be {'<' if hi_open else '<='} {hi}, got {value}")
    return value


def _betas(name, v):
    if not isinstance(v, (tuple, list)) or len(v) != 2:
        raise TypeError(f"{name}: expected a pair (beta1, beta2), got {v!r}")
    return tuple(check_number(f"{name}[{k}]", b, lo=0.0, hi=1.0, hi_open=True) for k, b in enumerate(v))


def _bool(name, v):
    if not isinstance(v, bool):
        raise TypeError(f"{name}: expected True or False, got {type(v).__name__}")
    return v


# One check per optimizer hyper-parameter, shared by EngineConfig, param_groups, the public
# ops and the values an LR scheduler (or a user) writes into optimizer.param_groups.
HYPERPARAMETER_CHECKS = {
    "lr": lambda n, v: check_number(n, v, lo=0.0),
    "betas": _betas,
    "eps": lambda n, v: check_number(n, v, lo=0.0),
    "weight_decay": lambda n, v: check_number(n, v, lo=0.0),
    "momentum": lambda n, v: check_number(n, v, lo=0.0),
    "dampening": lambda n, v: check_number(n, v, lo=0.0, hi=1.0),
    "nesterov": _bool,
    "maximize": _bool,
}
