"""Engine: the facade. build.py assembles the parts, step.py's pipeline drives them, the
Window holds what changes between steps, checkpoint.py saves and loads them.
"""
import os

from . import checkpoint
from .build import build, claim, release
from .devices import cuda_index, on_engine_device
from .module_guard import ModuleGuard
from .optim import refuse_foreign_optimizers
from .state_views import StateViews
from .step import StepPipeline, StepResult

__all__ = ["Engine", "StepResult"]


class Engine:
    """Trains `model` with fused mixed-precision steps over flat buffers.

        engine = Engine(model, EngineConfig(precision="bf16", grad_accum_steps=4))
        for batch in loader:
            engine.backward(loss_fn(model(batch)))   # once per micro-batch
            engine.step()                            # every micro-batch; updates at the boundary

    The model's trainable parameters become views into flat buffers (cast to the configured
    precision); master weights and optimizer state are fp32. Under torchrun the engine sets up
    torch.distributed itself and averages gradients across ranks, overlapped with backward.
    """

    def __init__(self, model, config=None, param_groups=None):
        self._cuda_index = cuda_index(model)  # the device the core's launches need current
        self._build(model, config, param_groups)

    @on_engine_device
    def _build(self, model, config, param_groups):
        parts = self._parts = build(model, config, param_groups)
        claim(parts, self)
        refuse_foreign_optimizers()
        self._pipeline = StepPipeline(parts)
        self._views = StateViews(model, parts.params)
        self._moves = ModuleGuard(model)
        device = parts.flat.device
        self._cuda_index = device.index if device.type == "cuda" else None

    def __getattr__(self, name):
        # the parts (config, model, params, names, flat, plan, optimizer, reducer, ...), read-only
        if name.startswith("__") or name in ("_parts", "_pipeline", "_cuda_index"):
            raise AttributeError(name)
        try:
            return getattr(self._parts, name)
        except AttributeError:
            raise AttributeError(f"'Engine' object has no attribute {name!r}") from None

    @property
    def grads(self):
        return self._parts.guard

    @property
    def stats_counters(self):
        """The CommStats behind stats() (the benchmarks reset it between phases)."""
        return self._parts.stats

    # -- the training step -------------------------------------------------------------------
    @on_engine_device
    def backward(self, loss):
        """loss x loss_scale / grad_accum_steps -> autograd. Once per micro-batch."""
        self._pipeline.backward(loss)

    @on_engine_device
    def step(self) -> StepResult:
        """Call once per micro-batch. At the accumulation boundary: non-finite check, global
        norm, clipping, the fused optimizer passes, loss-scale update, grads zeroed.
        Returns a StepResult, truthy when the parameters were updated."""
        return self._pipeline.step()

    @on_engine_device
    def capture(self, step_fn, warmup=3):
        """A StepGraph of step_fn (forward on static inputs + engine.backward) and step():
        see pyengine/graph.py. CUDA, one process, grad_accum_steps=1."""
        from .graph import StepGraph

        return StepGraph(self, step_fn, warmup)

    # -- numbers users read (each one host read, lazily) -----------------------------------------
    @property
    def global_step(self) -> int:
        """Optimizer updates applied (boundary steps minus skipped ones), whatever the groups."""
        return self.boundary_steps - self.skipped_steps

    @property
    def skipped_steps(self) -> int:
        return int(self._parts.scaler.value("skipped_total"))

    @property
    def consecutive_skips(self) -> int:
        return int(self._parts.scaler.value("consecutive_skips"))

    @property
    def loss_scale(self) -> float:
        return self._parts.scaler.value("scale")

    @property
    def grad_norm(self) -> float:
        """Global gradient norm (unscaled, before clipping) of the last boundary step."""
        return float(self._parts.scalars.grad_norm.item())

    @property
    def grad_norm_tensor(self):
        """The same as a one-element device tensor: no sync."""
        return self._parts.scalars.grad_norm

    @property
    def micro_step(self) -> int:
        """Micro-batches done in the current accumulation window."""
        return self._parts.window.micro

    @property
    def boundary_steps(self) -> int:
        """Accumulation boundaries reached (applied plus skipped updates), counted on the
        device, so steps replayed from a captured CUDA graph count too."""
        return self._parts.boundary_steps

    def memory_per_param(self) -> dict:
        """Persistent bytes per trainable parameter (flat buffers)."""
        p = self._parts
        d = p.flat.nbytes_per_param()
        if p.reducer is not None and p.reducer.wire_flat is not p.flat.grad_flat:
            d["comm_buffer"] = p.reducer.wire_flat.element_size()
        if p.tree is not None:  # deterministic: the micro-batch tree's partial sums
            d["tree_partials"] = p.tree.bytes_per_element
        d["total"] = sum(d.values())
        return d

    @on_engine_device
    def stats(self) -> dict:
        """Communication time, exposed communication time and overlap fraction so far.
        On CUDA this reads the recorded events (a sync)."""
        if self._parts.reducer is not None:
            self._parts.reducer.overlap.fold_timing()
        return self._parts.stats.as_dict()

    # -- checkpoints (checkpoint.py) ---------------------------------------------------------------
    @on_engine_device
    def wait_for_params(self):
        """ZeRO-1 with overlap_param_gather: waits for the all-gather of the updated parameters.
        Call it before reading parameters outside the model's forward between step() and the
        next forward (the engine's own save, state_dict and backward wait by themselves)."""
        if self._parts.flat.sharded:
            self._parts.reducer.wait_params()

    @on_engine_device
    def state_dict(self) -> dict:
        self.wait_for_params()
        return checkpoint.state_dict(self._parts)

    @on_engine_device
    def load_state_dict(self, sd: dict):
        self.wait_for_params()
        self._pipeline.after_load(checkpoint.load_state_dict(self._parts, sd))

    @on_engine_device
    def save(self, path, extra=None) -> str:
        """Writes a checkpoint folder (see checkpoint.py): every rank calls it, each writes its
        own shard, nothing is gathered; atomic and checksummed. `extra` (a dict) comes back
        from load()."""
        self.wait_for_params()
        return checkpoint.save(self._parts, path, extra)

    @on_engine_device
    def load(self, path):
        """Loads a checkpoint folder saved at any world size and ZeRO stage; returns its `extra`."""
        self.wait_for_params()  # an all-gather in flight would land on the loaded weights
        extra, boundaries = checkpoint.load(self._parts, path)
        self._pipeline.after_load(boundaries)
        return extra

    @on_engine_device
    def close(self):
        """Writes the trace (if any), removes the engine's hooks and releases the model."""
        self.wait_for_params()
        self._detach()
        return self._parts.tracer.write()

    def _detach(self):
        p = self._parts
        p.guard.remove()
        if getattr(p, "input_cast", None) is not None:
            p.input_cast.remove()
            p.input_cast = None
        for q in p.params:
            q.grad = None  # the model is PyTorch's again: no engine handles left on it
        self._views.remove()
        self._moves.remove()
        if p.reducer is not None:
            p.reducer.remove_hooks()
        release(p, self)

    def __del__(self):
        try:
            self._detach()
        except Exception:
            pass


def rank_path(path, rank):
    root, ext = os.path.splitext(path)
    return f"{root}.rank{rank}{ext or '.json'}"
