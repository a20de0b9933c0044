"""Engine: the facade that builds the step's parts and drives them.

The parts, each in its own module: layout.py (where each parameter lives), flat.py (the
buffers), grads.py (p.grad and the gradient hooks), scalars.py and scaler.py (device
scalars, loss scale), optim.py (the optimizer spec and torch.optim facade), plan.py (native
calls resolved once per layout), step.py (the boundary step), ddp/ (overlapped gradient
communication), checkpoint.py (state_dict, save, load).
"""
import os
import time
import warnings
import weakref

import torch

from . import _native, checkpoint
from .config import EngineConfig
from .flat import DTYPES, FlatBuffers
from .grads import GradGuard
from .layout import Layout
from .optim import SPECS, FusedOptimizer, check_group
from .plan import StepPlan
from .scalars import StepScalars
from .scaler import LossScaler
from .step import StepResult, boundary_step
from .trace import CommStats, Tracer

__all__ = ["Engine", "StepResult"]

MiB = 1024 * 1024
_PLACEMENT_CHECK_EVERY = 16  # boundary steps between checks that the parameters are still views


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
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"Engine: model must be a torch.nn.Module, got {type(model).__name__}")
        if config is None:
            config = EngineConfig()
        if not isinstance(config, EngineConfig):
            raise TypeError(f"Engine: config must be an EngineConfig, got {type(config).__name__}")
        config.validate()
        self.config = cfg = config
        self.model = model
        device = _single_device(model)
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError("Engine: the model has no parameter with requires_grad=True; nothing to train")
        _check_supported(model, named)
        spec = SPECS[cfg.optimizer]
        # validated before the model is touched: a bad argument leaves it as it was
        groups, options = _resolve_groups(param_groups, named, cfg, spec)
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]  # canonical (registration) order: checkpoints use it
        for p in self.params:
            p.grad = None  # whatever was accumulated before the engine existed is not its gradient

        from . import distributed as pdist

        self.distributed = pdist.init_if_needed(cfg, device)
        if self.distributed:
            device = pdist.local_device(device)
            if device != _single_device(model):
                model.to(device)  # in place: the Parameter objects (and the groups) stay the same
        self.device = device
        self.mod = _native.cuda_module() if device.type == "cuda" else _native._C
        self.comm = None
        self.reducer = None
        self.rank, self.world_size = 0, 1
        self.tracer = Tracer(None)
        self._stats = CommStats()
        if self.distributed:
            self.comm = pdist.make_comm(cfg, device)
            self.rank, self.world_size = self.comm.rank, self.comm.world_size
            pdist.check_agreement(self.comm, pdist.fingerprint(named, cfg), "the model or EngineConfig")
            if cfg.broadcast_params:
                self._broadcast_initial_state()
        if cfg.trace_path:
            path = cfg.trace_path if self.world_size == 1 else _rank_path(cfg.trace_path, self.rank)
            self.tracer = Tracer(path, self.rank)
        dtype = DTYPES[cfg.precision]
        main_grads = cfg.accum_dtype == "fp32" and dtype != torch.float32
        grad_dtype = torch.float32 if main_grads else dtype
        wire_bytes = torch.empty((), dtype=DTYPES[cfg.comm_dtype] if cfg.comm_dtype else grad_dtype).element_size()
        shard_world = self.world_size if cfg.zero_stage == 1 else 1
        # Note: reverse registration order within each group, so the last layers' gradients,
        # which backward produces first, sit in the first bucket (DDP does the same).
        layout = Layout([p.numel() for p in self.params], [sorted(g, reverse=True) for g in groups],
                        bucket_elems=int(cfg.bucket_mb * MiB // wire_bytes) if self.distributed else None,
                        first_bucket_elems=int(cfg.first_bucket_mb * MiB // wire_bytes) if self.distributed else None,
                        shard_world=shard_world)
        self.flat = FlatBuffers(layout, self.params, dtype, grad_dtype, spec.states(options), device, rank=self.rank)
        if dtype != torch.float32:
            model.to(dtype)  # frozen params and buffers; the trainable params already are views in dtype
        for p in self.params:
            p._pyengine_owner = weakref.ref(self)

        self.scalars = StepScalars(device, 1.0, cfg.hysteresis)
        self.scaler = LossScaler(cfg, self.scalars, self.mod)
        self.optimizer = FusedOptimizer(spec, [{"params": [self.params[i] for i in g], **o}
                                               for g, o in zip(groups, options)],
                                        {k: getattr(cfg, k) for k in spec.group_keys}, self)
        if self.distributed:
            from .ddp import Reducer

            self.reducer = Reducer(self.flat, self.comm, cfg, self.mod, self.scalars, self.names, self.tracer,
                                   self._stats, modules=list(model.modules()))
        self.grads = GradGuard(self.flat, self.names, self._inexact_reason(),
                               accumulate=lambda i, g: self.plan.accumulate(i, g),
                               on_ready=self.reducer.grad_ready if self.reducer is not None else None)
        self.plan = self._make_plan()
        self._micro = 0  # step() calls since the last boundary
        self._backward_pending = False
        self._boundaries = 0
        self._last_result = None  # weakref to the last boundary StepResult (see StepResult)

    def _inexact_reason(self):
        if self.flat.main_grads:
            return (f"its gradient accumulates in the engine's fp32 main-grad buffer (EngineConfig.accum_dtype='fp32' "
                    f"with {self.config.precision} params) and .grad holds no values")
        if self.scaler.active:
            return "the gradients are multiplied by the fp16 loss scale until engine.step()"
        if self.distributed:
            return "the gradients are averaged across ranks only inside engine.step()"
        return None

    def _make_plan(self):
        opt_grads = self.reducer.optimizer_grads if self.reducer is not None else self.flat.grad_flat
        return StepPlan(self.mod, self.flat, self.scalars, self.scaler, self.optimizer, opt_grads,
                        zero_in_pass=opt_grads is self.flat.grad_flat, max_norm=self.config.clip_grad_norm,
                        main_grads=self.flat.main_grads,
                        bucket_rows=self.reducer.bucket_stats if self.reducer is not None else None,
                        combine=self.reducer.combine_scalars if self.flat.sharded else None)

    # -- the training step -------------------------------------------------------------------
    def backward(self, loss):
        """loss x loss_scale / grad_accum_steps -> autograd. Once per micro-batch."""
        if not isinstance(loss, torch.Tensor):
            raise TypeError(f"Engine.backward: loss must be a tensor, got {type(loss).__name__}")
        if loss.numel() != 1:
            raise ValueError(f"Engine.backward: loss must be a scalar (one element), got shape {tuple(loss.shape)}; "
                             "reduce it first, e.g. loss.mean()")
        if not loss.requires_grad:
            raise ValueError("Engine.backward: loss does not require grad; was it computed under torch.no_grad(), "
                             "or from a detached tensor?")
        if self._backward_pending:
            raise RuntimeError("Engine.backward was called twice without engine.step() in between; sum the losses "
                               "of one micro-batch and call backward once, then engine.step() (every micro-batch)")
        t0 = time.perf_counter()
        last = self._micro + 1 == self.config.grad_accum_steps
        if self.flat.sharded:
            self.reducer.wait_params()  # overlap_param_gather: what no module's forward waited for
        self.grads.before_backward()
        if self.reducer is not None and last:
            self.reducer.prepare()
        scaled = loss.float() * self.scaler.scale_tensor.to(loss.device)
        if self.config.grad_accum_steps > 1:
            scaled = scaled / self.config.grad_accum_steps
        try:
            scaled.backward()
        except BaseException:
            if self.reducer is not None:
                self.reducer.abort()
            self.grads.after_backward()
            raise
        self.grads.after_backward()
        if self.reducer is not None and last:
            self.reducer.end_of_backward()
            self.grads.in_flight = True
        self._backward_pending = True
        self.tracer.span("backward", t0, time.perf_counter(), micro=self._micro)

    def step(self):
        """Call once per micro-batch. At the accumulation boundary: non-finite check, global
        norm, clipping, one fused optimizer pass per group, loss-scale update, grads zeroed.
        Returns a StepResult, truthy when the parameters were updated."""
        if not self._backward_pending:
            raise RuntimeError("Engine.step: no backward since the last step; call engine.backward(loss) "
                               "once per micro-batch before engine.step()")
        self._backward_pending = False
        self._micro += 1
        if self._micro < self.config.grad_accum_steps:
            return StepResult(False)
        self._micro = 0
        tracing = self.tracer.enabled
        t0 = time.perf_counter() if tracing else 0.0
        self._check_skip_run()
        if self.grads.before_step(check_placement=self._boundaries % _PLACEMENT_CHECK_EVERY == 0):
            self.flat.refresh_master()  # the parameters were written in place
        last = self._last_result() if self._last_result is not None else None
        if last is not None:
            last.freeze()
        t_opt = time.perf_counter() if tracing else 0.0
        result = boundary_step(self.plan, self.scalars, self.optimizer, self.reducer)
        order = self.reducer.take_rebuild_order() if self.reducer is not None else None
        if self.flat.sharded:
            # each rank's updated slices to every rank; a relayout needs them all at once
            self.reducer.gather_params(wait=order is not None)
        self._last_result = weakref.ref(result)
        if tracing:
            self.tracer.span("optimizer", t_opt, time.perf_counter(), step=self._boundaries + 1)
        self.grads.in_flight = self.grads.dirty = False
        self._boundaries += 1
        if order is not None:
            self._relayout(order)
        if tracing:
            self.tracer.span("step", t0, time.perf_counter(), step=self._boundaries)
        return result

    def _check_skip_run(self):
        limit = self.config.max_consecutive_skips
        if limit and self.scaler.lagged_consecutive_skips() >= limit:
            bad = []
            for i, name in enumerate(self.names):
                if not bool(torch.isfinite(self.flat.grad_view(i)).all()):
                    bad.append(name)
                if len(bad) == 5:
                    break
            where = (f"the first parameters with non-finite gradients now: {', '.join(bad)}" if bad else
                     "this step's gradients are finite, but the previous ones were not")
            raise FloatingPointError(
                f"pyengine: {limit} consecutive steps were skipped for inf/NaN gradients ({where}; loss scale "
                f"{self.loss_scale:g}). Training is not progressing: check the data, lower the lr, or use bf16. "
                "Raise EngineConfig.max_consecutive_skips (0 disables) to keep going")

    def capture(self, step_fn, warmup=3):
        """A StepGraph of step_fn (forward on static inputs + engine.backward) and step():
        see pyengine/graph.py. CUDA, one process, grad_accum_steps=1."""
        from .graph import StepGraph

        return StepGraph(self, step_fn, warmup)

    # -- layout rebuild (data parallel) ---------------------------------------------------------
    def _relayout(self, ready_order):
        """Lay the buffers out in the observed gradient-ready order (rank 0's, broadcast)."""
        order = self.comm.broadcast_ints(ready_order, 0)
        self.flat.relayout(self.flat.layout.reordered(order), gather_state=self._gather_state)
        self.reducer.build(record_order=False)
        self.grads.rebind()
        self.plan = self._make_plan()

    def _gather_state(self, shard, layout, pieces):
        """Every element of a sharded state buffer, as canonical runs, one old bucket at a time
        (all-gathered from the ranks' slices: one bucket of temporary memory, not the model's)."""
        owned = layout.owned(self.rank)
        canon = self.flat.canon
        for b in layout.buckets:
            o = owned[b.index]
            whole = torch.empty(b.numel, dtype=shard.dtype, device=shard.device)
            self.comm.all_gather(whole, shard[o.local:o.local + o.numel]).wait()
            for i, off, at, n in layout.segments(b.start, b.end):
                yield canon[i] + off, whole[at - b.start:at - b.start + n]

    def _broadcast_initial_state(self):
        """Rank 0's fp32 parameter values and model buffers on every rank, before the buffers
        are built (so sharded master weights start from them too)."""
        with torch.no_grad():
            values = torch.cat([p.detach().reshape(-1).float() for p in self.params])
            self.comm.broadcast(values, 0)
            pos = 0
            for p in self.params:
                p.copy_(values[pos:pos + p.numel()].view_as(p))
                pos += p.numel()
        for b in self.model.buffers():
            if b.is_floating_point() or b.dtype in (torch.int64, torch.int32):
                self.comm.broadcast(b.data, 0)

    def _after_load(self, boundaries):
        """checkpoint.load_state_dict: the window starts afresh."""
        self.scalars.boundaries.fill_(float(boundaries))
        self.flat.grad_flat.zero_()
        if self.reducer is not None and self.reducer.wire_flat is not self.flat.grad_flat:
            self.reducer.wire_flat.zero_()
        self.grads.rebind()
        self._boundaries = boundaries
        self._micro = 0
        self._backward_pending = False

    # -- numbers users read (each one host read, lazily) -----------------------------------------
    @property
    def global_step(self) -> int:
        """Optimizer updates applied (boundary steps minus skipped ones), whatever the groups."""
        return self.boundary_steps - self.skipped_steps

    @property
    def skipped_steps(self) -> int:
        return int(self.scaler.value("skipped_total"))

    @property
    def consecutive_skips(self) -> int:
        return int(self.scaler.value("consecutive_skips"))

    @property
    def loss_scale(self) -> float:
        return self.scaler.value("scale")

    @property
    def grad_norm(self) -> float:
        """Global gradient norm (unscaled, before clipping) of the last boundary step."""
        return float(self.scalars.grad_norm.item())

    @property
    def grad_norm_tensor(self):
        """The same as a one-element device tensor: no sync."""
        return self.scalars.grad_norm

    @property
    def micro_step(self) -> int:
        """Micro-batches done in the current accumulation window."""
        return self._micro

    @property
    def boundary_steps(self) -> int:
        """Accumulation boundaries reached (applied plus skipped updates), counted on the
        device, so steps replayed from a captured CUDA graph count too."""
        return int(self.scalars.boundaries.item())

    def memory_per_param(self) -> dict:
        """Persistent bytes per trainable parameter (flat buffers)."""
        d = self.flat.nbytes_per_param()
        if self.reducer is not None and self.reducer.wire_flat is not self.flat.grad_flat:
            d["comm_buffer"] = self.reducer.wire_flat.element_size()
        d["total"] = sum(d.values())
        return d

    def stats(self) -> dict:
        """Communication time, exposed communication time and overlap fraction so far.
        On CUDA this reads the recorded events (a sync)."""
        if self.reducer is not None:
            self.reducer.overlap.fold_timing()
        return self._stats.as_dict()

    # -- checkpoints (checkpoint.py) ---------------------------------------------------------------
    def wait_for_params(self):
        """ZeRO-1 with overlap_param_gather: waits for the all-gather of the updated parameters.
        Call it before reading parameters outside the model's forward between step() and the
        next forward (the engine's own save, state_dict and backward wait by themselves)."""
        if self.flat.sharded:
            self.reducer.wait_params()

    def state_dict(self) -> dict:
        self.wait_for_params()
        return checkpoint.state_dict(self)

    def load_state_dict(self, sd: dict):
        checkpoint.load_state_dict(self, sd)

    def save(self, path, extra=None) -> str:
        """Writes a checkpoint folder (see checkpoint.py): every rank calls it, each writes its
        own shard, nothing is gathered; atomic and checksummed. `extra` (a dict) comes back
        from load()."""
        return checkpoint.save(self, path, extra)

    def load(self, path):
        """Loads a checkpoint folder saved at any world size and ZeRO stage; returns its `extra`."""
        return checkpoint.load(self, path)

    def close(self):
        """Writes the trace (if any), removes the engine's hooks and releases the model."""
        self.wait_for_params()
        self.grads.remove()
        if self.reducer is not None:
            self.reducer.remove_hooks()
        for p in self.params:
            if getattr(p, "_pyengine_owner", None) is not None and p._pyengine_owner() is self:
                del p._pyengine_owner
        return self.tracer.write()

    def __del__(self):
        try:
            self.grads.remove()
        except Exception:
            pass


def _rank_path(path, rank):
    root, ext = os.path.splitext(path)
    return f"{root}.rank{rank}{ext or '.json'}"


def _single_device(model):
    devices = {t.device for t in list(model.parameters()) + list(model.buffers())}
    if len(devices) > 1:
        raise ValueError(f"Engine: the model is spread over several devices ({sorted(map(str, devices))}); "
                         "pyengine trains one model replica per process on one device: move it with model.to(device) "
                         "and use data parallelism across devices")
    dev = devices.pop() if devices else torch.device("cpu")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"Engine: models on {dev.type} are not supported (cpu or cuda)")
    return dev


def _check_supported(model, named):
    for name, m in model.named_modules():
        if getattr(m, "sparse", False) and isinstance(m, (torch.nn.Embedding, torch.nn.EmbeddingBag)):
            raise ValueError(f"Engine: {name or 'the model'} is an embedding with sparse=True; pyengine keeps dense "
                             "gradients in flat buffers: build it with sparse=False")
    for name, p in named:
        owner = getattr(p, "_pyengine_owner", None)
        if owner is not None and owner() is not None:
            raise ValueError(f"Engine: parameter {name} is already trained by another Engine; call close() on that "
                             "engine first (two engines on one model would each update only their own buffers)")


def _resolve_groups(param_groups, named, cfg, spec):
    """Validated (canonical indices per group, hyper-parameters per group) from a torch-style
    param_groups list."""
    defaults = {k: getattr(cfg, k) for k in spec.group_keys}
    if param_groups is None:
        return [list(range(len(named)))], [dict(defaults)]
    if isinstance(param_groups, dict) or not isinstance(param_groups, (list, tuple)):
        raise TypeError("Engine: param_groups must be a list of dicts, each with a 'params' entry (torch style)")
    index = {id(p): i for i, (_, p) in enumerate(named)}
    seen = {}
    groups, options = [], []
    for gi, g in enumerate(param_groups):
        if not isinstance(g, dict) or "params" not in g:
            raise TypeError(f"Engine: param_groups[{gi}] must be a dict with a 'params' entry")
        ps = g["params"]
        ps = [ps] if isinstance(ps, torch.Tensor) else list(ps)
        members = []
        for p in ps:
            if id(p) not in index:
                raise ValueError(f"Engine: param_groups[{gi}] holds a tensor that is not a trainable parameter of the "
                                 "model (not in model.parameters(), or requires_grad=False)")
            i = index[id(p)]
            if i in seen:
                raise ValueError(f"Engine: parameter {named[i][0]} appears in param_groups[{seen[i]}] and "
                                 f"param_groups[{gi}]; each parameter must be in exactly one group")
            seen[i] = gi
            members.append(i)
        values = {k: (tuple(g[k]) if k == "betas" and isinstance(g.get(k), list) else g.get(k, defaults[k]))
                  for k in spec.group_keys}
        checked = check_group(spec, values, f"Engine: param_groups[{gi}]")
        extra = {k: v for k, v in g.items() if k != "params" and k not in spec.group_keys}
        unused = [k for k in extra if k in ("lr", "betas", "eps", "weight_decay", "momentum", "dampening", "nesterov")]
        if unused:
            warnings.warn(f"Engine: param_groups[{gi}] sets {unused}, which {cfg.optimizer} does not use",
                          stacklevel=3)
        groups.append(sorted(members))
        options.append({**checked, **extra})
    missing = [n for i, (n, _) in enumerate(named) if i not in seen]
    if missing:
        raise ValueError(f"Engine: trainable parameters missing from param_groups: {', '.join(missing[:8])}"
                         f"{' ...' if len(missing) > 8 else ''}; add them to a group or set requires_grad=False")
    return groups, options
