"""Engine: orchestration of the mixed-precision, data-parallel training step."""
import os
import tempfile
import time
import warnings

import torch

from . import ops
from .buffers import DTYPES, FlatBuffers
from .config import EngineConfig
from .optim import FusedOptimizer
from .scaler import CONSECUTIVE_SKIPS, SCALE, SKIPPED_TOTAL, LossScaler
from .trace import CommStats, Tracer

_OPT_KEYS = {"adamw": ("lr", "betas", "eps", "weight_decay"), "adam": ("lr", "betas", "eps", "weight_decay"),
             "sgd": ("lr", "momentum", "dampening", "weight_decay", "nesterov")}
CHECKPOINT_VERSION = 1


class StepResult:
    """What engine.step() returns: truthy when the parameters were updated.

    Note: whether a boundary step was skipped for non-finite gradients is known only on the
    device; bool() reads it (one sync), so a loop that ignores the result never waits.
    """

    def __init__(self, boundary, flag=None):
        self.boundary = boundary
        self._flag = flag

    def __bool__(self):
        return self.boundary and float(self._flag) == 0.0

    @property
    def skipped(self):
        return self.boundary and float(self._flag) != 0.0

    @property
    def flag(self):
        """The non-finite flag as a device tensor (1 when skipped), for logging without a sync."""
        return self._flag

    def __repr__(self):
        return f"StepResult(updated={bool(self)})"


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
        # validated before the model is touched: a bad argument leaves it as it was
        groups, options = _resolve_groups(param_groups, named, cfg)
        for n, p in named:
            p._pyengine_name = n
        self._names = [n for n, _ in named]
        self._canonical = [p for _, p in named]  # registration order: checkpoints use it

        from . import distributed as pdist

        self.distributed = pdist.init_if_needed(cfg, device)
        if self.distributed:
            device = pdist.local_device(device)
            if device != _single_device(model):
                model.to(device)  # in place: the Parameter objects (and the groups) stay the same
        self.device = device
        dtype = DTYPES[cfg.precision]
        if dtype != torch.float32:
            model.to(dtype)
        rank_of = {id(p): i for i, p in enumerate(self._canonical)}
        # Note: reverse registration order within each group, so the last layers' gradients,
        # which backward produces first, sit in the first bucket (DDP does the same).
        groups = [sorted(g, key=lambda p: -rank_of[id(p)]) for g in groups]
        accum_fp32 = cfg.accum_dtype == "fp32" and dtype != torch.float32
        self.buffers = fb = FlatBuffers(groups, dtype, accum_fp32, device)

        self.scaler = LossScaler(cfg, device)
        # device scalars: 0 found_inf, 1 sumsq, 2 global norm, 3 grad multiplier
        self._scalars = torch.zeros(4, device=device)
        self.comm = None
        self.reducer = None
        self.rank, self.world_size = 0, 1
        self.tracer = Tracer(None)
        self._stats = CommStats()
        if self.distributed:
            self.comm = pdist.make_comm(cfg, device)
            self.rank, self.world_size = self.comm.rank, self.comm.world_size
            pdist.check_agreement(self.comm, pdist.fingerprint(named, cfg), "the model or EngineConfig")
        if cfg.trace_path:
            path = cfg.trace_path if self.world_size == 1 else _rank_path(cfg.trace_path, self.rank)
            self.tracer = Tracer(path, self.rank)
        if self.distributed:
            from .ddp import Reducer

            if cfg.broadcast_params:
                self._broadcast_initial_state()
            self.reducer = Reducer(fb, self.comm, cfg, self.scaler.inv_scale_tensor, self.tracer, self._stats)
        self.optimizer = FusedOptimizer(cfg.optimizer, fb, options, _defaults(cfg), self._optimizer_grads,
                                        self._scalars[0:1], self._scalars[3:4])
        self._hooks = []
        if fb.accum_fp32 or self.reducer is not None:
            for p in fb.params:
                self._hooks.append(p.register_post_accumulate_grad_hook(self._on_grad))
        self._micro = 0  # step() calls since the last boundary
        self._backward_pending = False
        self._boundaries = 0

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
        t0 = time.perf_counter()
        last = self._micro + 1 == self.config.grad_accum_steps
        if self.reducer is not None and last:
            self.reducer.prepare()
        scale = self.scaler.scale_tensor.to(loss.device)
        scaled = loss.float() * scale
        if self.config.grad_accum_steps > 1:
            scaled = scaled / self.config.grad_accum_steps
        try:
            scaled.backward()
        except BaseException:
            if self.reducer is not None:
                self.reducer.active = False
            raise
        if self.reducer is not None and last:
            self.reducer.end_of_backward()
        self._backward_pending = True
        self.tracer.span("backward", t0, time.perf_counter(), micro=self._micro)

    def _on_grad(self, p):
        if self.buffers.accum_fp32:
            ops.accumulate_(self.buffers.grad_view(p), p.grad.reshape(-1))
            p.grad = None
        if self.reducer is not None:
            self.reducer.grad_ready(p)

    def _optimizer_grads(self, group_index):
        """The gradients the optimizer reads, and whether its pass clears them."""
        g = self.buffers.groups[group_index]
        flat = self.reducer.optimizer_grads if self.reducer is not None else self.buffers.grad_flat
        return flat[g.start:g.end], self._optimizer_zeroes

    @property
    def _optimizer_zeroes(self):
        # Note: when the optimizer reads the gradient buffer itself it clears each element
        # after reading it (the line is in cache already), which saves a whole write pass over
        # the gradients; with a separate wire buffer the gradient buffer is zeroed on its own.
        return self.reducer is None or self.reducer.optimizer_grads is self.buffers.grad_flat

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
        t0 = time.perf_counter()
        self._check_skip_run()
        sc = self._scalars
        if self.reducer is not None:
            stats = self.reducer.finish()
            torch.sum(stats[:, 0], dim=0, keepdim=True, out=sc[1:2])  # fixed order: deterministic
            torch.amax(stats[:, 1], dim=0, keepdim=True, out=sc[0:1])
        else:
            sc[0:2].zero_()
            ops.unscale_check_sumsq(self.buffers.grad_flat, sc[0:1], sc[1:2], inv_scale=self.scaler.inv_scale_tensor)
        ops.clip_coef(sc[1:2], self.config.clip_grad_norm, sc[2:4], inv_scale=self.scaler.inv_scale_tensor)
        t1 = time.perf_counter()
        self.optimizer.step()
        self.scaler.update(sc[0:1])
        flag = sc[0:1].clone()
        if not self._optimizer_zeroes:
            self.buffers.zero_grad()
        self._boundaries += 1
        if self.reducer is not None:
            order = self.reducer.take_rebuild_order()
            if order is not None:
                self._rebuild_layout(order)
        t2 = time.perf_counter()
        self.tracer.span("optimizer", t1, t2, step=self._boundaries)
        self.tracer.span("step", t0, t2)
        return StepResult(True, flag)

    def _check_skip_run(self):
        limit = self.config.max_consecutive_skips
        if limit and self.scaler.lagged_consecutive_skips() >= limit:
            bad = []
            for name, p in zip(self._names, self._canonical):
                g = self.buffers.grad_view(p)
                if not bool(torch.isfinite(g).all()):
                    bad.append(name)
                if len(bad) == 5:
                    break
            where = (f"the first parameters with non-finite gradients now: {', '.join(bad)}" if bad else
                     "this step's gradients are finite, but the previous ones were not")
            raise FloatingPointError(
                f"pyengine: {limit} consecutive steps were skipped for inf/NaN gradients ({where}; loss scale "
                f"{self.loss_scale:g}). Training is not progressing: check the data, lower the lr, or use bf16. "
                "Raise EngineConfig.max_consecutive_skips (0 disables) to keep going")

    # -- layout rebuild (data parallel) ---------------------------------------------------------
    def _rebuild_layout(self, ready_order):
        """Lay the buffers out in the observed gradient-ready order (rank 0's, broadcast)."""
        index = {id(p): i for i, p in enumerate(self._canonical)}
        order = self.comm.broadcast_ints([index[id(p)] for p in ready_order], 0)
        pos = {i: k for k, i in enumerate(order)}  # params absent from rank 0's order go last
        groups = [sorted(g.params, key=lambda p: pos.get(index[id(p)], len(pos))) for g in self.buffers.groups]
        moved = self.buffers.relayout(groups, list(self.optimizer.flat_state.values()))
        for k, v in zip(list(self.optimizer.flat_state), moved):
            self.optimizer.flat_state[k] = v
        for g, opt_g in zip(self.buffers.groups, self.optimizer.param_groups):
            opt_g["params"] = list(g.params)
        self.reducer.rebuild()

    def _broadcast_initial_state(self):
        fb = self.buffers
        self.comm.broadcast(fb.master_flat, 0)
        if fb.master_flat is not fb.param_flat:
            ops.cast_scale(fb.master_flat, fb.param_flat)
        for b in self.model.buffers():
            if b.is_floating_point() or b.dtype in (torch.int64, torch.int32):
                self.comm.broadcast(b.data, 0)

    # -- numbers users read (each one host read, lazily) -----------------------------------------
    @property
    def global_step(self) -> int:
        """Optimizer updates applied (skipped steps excluded)."""
        return int(self.optimizer.steps[0].item())

    @property
    def skipped_steps(self) -> int:
        return int(self.scaler.value(SKIPPED_TOTAL))

    @property
    def consecutive_skips(self) -> int:
        return int(self.scaler.value(CONSECUTIVE_SKIPS))

    @property
    def loss_scale(self) -> float:
        return self.scaler.value(SCALE)

    @property
    def grad_norm(self) -> float:
        """Global gradient norm (unscaled, before clipping) of the last boundary step."""
        return float(self._scalars[2].item())

    @property
    def grad_norm_tensor(self):
        """The same as a one-element device tensor: no sync."""
        return self._scalars[2:3]

    @property
    def micro_step(self) -> int:
        """Micro-batches done in the current accumulation window."""
        return self._micro

    @property
    def boundary_steps(self) -> int:
        """Accumulation boundaries reached (applied plus skipped updates)."""
        return self._boundaries

    def memory_per_param(self) -> dict:
        """Persistent bytes per trainable parameter (flat buffers)."""
        fb = self.buffers
        d = {"param": fb.param_flat.element_size(),
             "grad": 0 if fb.accum_fp32 else fb.grad_flat.element_size(),
             "main_grad_fp32": 4 if fb.accum_fp32 else 0,
             "master": 0 if fb.master_flat is fb.param_flat else 4,
             "optimizer_state": 4 * self.optimizer.state_floats}
        if self.reducer is not None and self.reducer.wire_flat is not fb.grad_flat:
            d["comm_buffer"] = self.reducer.wire_flat.element_size()
        d["total"] = sum(d.values())
        return d

    def stats(self) -> dict:
        """Communication time, exposed communication time and overlap fraction so far.
        On CUDA this reads the recorded events (a sync)."""
        if self.reducer is not None and self.reducer.cuda:
            self.reducer.fold_gpu_timing()
        return self._stats.as_dict()

    # -- checkpoints -------------------------------------------------------------------------
    def state_dict(self) -> dict:
        if self._micro != 0:
            raise RuntimeError(
                f"Engine.state_dict: {self._micro} micro-batch(es) of the current accumulation window are pending; "
                "their gradients would be lost. Save right after the boundary step")
        fb, opt = self.buffers, self.optimizer
        return {
            "version": CHECKPOINT_VERSION,
            "config": self.config.to_dict(),
            "param_names": list(self._names),
            "master": [fb.master_view(p).detach().clone().cpu() for p in self._canonical],
            "optimizer": {
                "kind": opt.kind,
                "param_groups": [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups],
                "group_members": [[self._names.index(p._pyengine_name) for p in g.params] for g in fb.groups],
                "state": [{k: v.cpu() for k, v in st.items()} for st in opt.flat_state_per_param(self._canonical)],
                "steps": [s.cpu().clone() for s in opt.steps],
            },
            "scaler": self.scaler.state_dict(),
            "boundaries": self._boundaries,
            "model_buffers": {n: b.detach().cpu().clone() for n, b in self.model.named_buffers()},
        }

    def load_state_dict(self, sd: dict):
        if not isinstance(sd, dict) or sd.get("version") != CHECKPOINT_VERSION:
            raise ValueError("Engine.load_state_dict: not a pyengine checkpoint (or from an incompatible version)")
        if list(sd["param_names"]) != self._names:
            missing = sorted(set(self._names) - set(sd["param_names"]))[:5]
            extra = sorted(set(sd["param_names"]) - set(self._names))[:5]
            raise ValueError(f"Engine.load_state_dict: the checkpoint's parameters differ from the model's "
                             f"(missing from checkpoint: {missing}, unknown to the model: {extra})")
        o = sd["optimizer"]
        if o["kind"] != self.optimizer.kind:
            raise ValueError(f"Engine.load_state_dict: checkpoint optimizer is {o['kind']!r}, "
                             f"this engine uses {self.optimizer.kind!r}")
        fb = self.buffers
        with torch.no_grad():
            for name, p, m in zip(self._names, self._canonical, sd["master"]):
                if m.numel() != p.numel():
                    raise ValueError(f"Engine.load_state_dict: {name} has {m.numel()} elements in the checkpoint, "
                                     f"{p.numel()} in the model")
                fb.master_view(p).copy_(m.reshape(-1))
                if fb.master_flat is not fb.param_flat:
                    ops.cast_scale(fb.master_view(p), fb.param_view(p))
            self.optimizer.load_flat_state_per_param(self._canonical, o["state"])
            for s, saved in zip(self.optimizer.steps, o["steps"]):
                s.copy_(saved)
            for g, saved in zip(self.optimizer.param_groups, o["param_groups"]):
                g.update(saved)
            self.scaler.load_state_dict(sd["scaler"])
            bufs = dict(self.model.named_buffers())
            for n, b in sd.get("model_buffers", {}).items():
                if n in bufs:
                    bufs[n].copy_(b)
        fb.zero_grad()
        self._boundaries = int(sd.get("boundaries", 0))
        self._micro = 0
        self._backward_pending = False

    def save(self, path, extra=None) -> str:
        """Writes the checkpoint atomically (temporary file, fsync, rename); rank 0 only.
        `extra` (a dict) is stored under sd["extra"] for the caller's own state."""
        sd = self.state_dict()
        if extra is not None:
            sd["extra"] = dict(extra)
        if self.rank != 0:
            return str(path)
        path = os.fspath(path)
        folder = os.path.dirname(os.path.abspath(path))
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".pyengine-", suffix=".tmp", dir=folder)
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(sd, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        return path

    def load(self, path):
        if not os.path.exists(path):
            raise FileNotFoundError(f"Engine.load: no checkpoint at {path}")
        self.load_state_dict(torch.load(path, map_location="cpu", weights_only=False))

    def close(self):
        """Writes the trace (if any) and removes the engine's hooks."""
        for h in self._hooks:
            h.remove()
        self._hooks = []
        return self.tracer.write()

    def __del__(self):
        try:
            for h in self._hooks:
                h.remove()
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


def _defaults(cfg):
    return {"lr": cfg.lr, "betas": cfg.betas, "eps": cfg.eps, "weight_decay": cfg.weight_decay,
            "momentum": cfg.momentum, "dampening": cfg.dampening, "nesterov": cfg.nesterov}


def _resolve_groups(param_groups, named, cfg):
    """Validated (params per group, options per group) from a torch-style param_groups list."""
    keys = _OPT_KEYS[cfg.optimizer]
    defaults = _defaults(cfg)
    if param_groups is None:
        return [[p for _, p in named]], [{k: defaults[k] for k in keys}]
    if isinstance(param_groups, dict) or not isinstance(param_groups, (list, tuple)):
        raise TypeError("Engine: param_groups must be a list of dicts, each with a 'params' entry (torch style)")
    name_of = {id(p): n for n, p in named}
    seen = {}
    groups, options = [], []
    for gi, g in enumerate(param_groups):
        if not isinstance(g, dict) or "params" not in g:
            raise TypeError(f"Engine: param_groups[{gi}] must be a dict with a 'params' entry")
        ps = g["params"]
        ps = [ps] if isinstance(ps, torch.Tensor) else list(ps)
        members = []
        for p in ps:
            if id(p) not in name_of:
                raise ValueError(f"Engine: param_groups[{gi}] holds a tensor that is not a trainable parameter of the "
                                 "model (not in model.parameters(), or requires_grad=False)")
            if id(p) in seen:
                raise ValueError(f"Engine: parameter {name_of[id(p)]} appears in param_groups[{seen[id(p)]}] and "
                                 f"param_groups[{gi}]; each parameter must be in exactly one group")
            seen[id(p)] = gi
            members.append(p)
        opts = {k: g.get(k, defaults[k]) for k in keys}
        extra = {k: v for k, v in g.items() if k != "params" and k not in keys}
        unknown_opt = [k for k in extra if k in defaults]
        if unknown_opt:
            warnings.warn(f"Engine: param_groups[{gi}] sets {unknown_opt}, which {cfg.optimizer} does not use",
                          stacklevel=3)
        try:
            EngineConfig(optimizer=cfg.optimizer, **{k: (tuple(v) if k == "betas" else v) for k, v in opts.items()})
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"Engine: param_groups[{gi}]: {exc}") from None
        groups.append(members)
        options.append({**opts, **extra})
    missing = [n for n, p in named if id(p) not in seen]
    if missing:
        raise ValueError(f"Engine: trainable parameters missing from param_groups: {', '.join(missing[:8])}"
                         f"{' ...' if len(missing) > 8 else ''}; add them to a group or set requires_grad=False")
    return groups, options
