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
