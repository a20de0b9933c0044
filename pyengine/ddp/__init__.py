"""Data parallel: bucket bookkeeping (buckets.py), the CPU and CUDA overlap mechanics
(overlap.py) and the Reducer that joins them to the engine's gradient hooks (reducer.py)."""
from .reducer import Reducer

__all__ = ["Reducer"]
