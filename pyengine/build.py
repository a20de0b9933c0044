"""Assembles an Engine's parts: validation, param groups, process group, layout, buffers,
scalars, optimizer, communication, gradient guard, step plan.

Note: each part is built once here and handed what it needs; no part reaches into another
through the Engine. What changes between steps is the Window's (window.py); what the step
does with the parts is the pipeline's (step.py). The parameters' names live once, in
`Parts.names` (the list every part is handed), rank and world size in the communicator
(`Parts.rank`, `Parts.world_size` and the reducer read them there).
"""
import warnings
import weakref

import torch

from . import _native
from .config import EngineConfig
from .counts import StepCounts
from .deterministic import ChunkNorm, TreeAccumulator, check_world
from .flat import DTYPES, FlatBuffers
from .grads import GradGuard
from .layout import Layout
from .optim import SPECS, FusedOptimizer, check_group
from .plan import StepPlan
from .scalars import StepScalars
from .scaler import LossScaler
from .trace import CommStats, Tracer
from .window import Window

MiB = 1024 * 1024


class Parts:
    """The parts of one Engine (attributes set by build())."""

    @property
    def boundary_steps(self) -> int:
        """Accumulation boundaries reached (applied plus skipped updates), counted on the device."""
        return int(self.scalars.boundaries.item())

    @property
    def micro_step(self) -> int:
        return self.window.micro

    @property
    def rank(self) -> int:
        """This process's rank: the communicator's (0 on one process)."""
        return self.comm.rank if self.comm is not None else 0

    @property
    def world_size(self) -> int:
        return self.comm.world_size if self.comm is not None else 1


def build(model, config, param_groups) -> Parts:
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"Engine: model must be a torch.nn.Module, got {type(model).__name__}")
    if config is None:
        config = EngineConfig()
    if not isinstance(config, EngineConfig):
        raise TypeError(f"Engine: config must be an EngineConfig, got {type(config).__name__}")
    config.validate()
    cfg = config
    device = single_device(model)
    spec = SPECS[cfg.optimizer]
    # validated before the model is touched: a bad argument leaves it as it was
    named, groups, options = resolve_groups(param_groups, model, cfg, spec)
    check_supported(model, named)
    parts = Parts()
    parts.config, parts.model = cfg, model
    parts.names = [n for n, _ in named]
    parts.params = [p for _, p in named]  # canonical (registration) order: checkpoints use it
    # parameters of the model the engine does not train (frozen when it was built)
    mine = {id(p) for p in parts.params}
    parts.outsiders = [p for p in model.parameters() if id(p) not in mine]
    parts.outsider_names = {id(p): n for n, p in model.named_parameters() if id(p) not in mine}
    for p in parts.params:
        p.grad = None  # whatever was accumulated before the engine existed is not its gradient

    from . import distributed as pdist

    parts.distributed = pdist.init_if_needed(cfg, device)
    if parts.distributed:
        device = pdist.local_device(device)
        if device != single_device(model):
            model.to(device)  # in place: the Parameter objects (and the groups) stay the same
    parts.device = device
    parts.mod = _native.cuda_module() if device.type == "cuda" else _native._C
    parts.comm, parts.reducer = None, None
    parts.tracer, parts.stats = Tracer(None), CommStats()
    if parts.distributed:
        parts.comm = pdist.make_comm(cfg, device)
        if cfg.deterministic:
            check_world(parts.comm.world_size, cfg.grad_accum_steps)
        pdist.check_agreement(parts.comm, pdist.fingerprint(named, cfg), "the model or EngineConfig")
        if cfg.broadcast_params:
            broadcast_initial_state(parts)
    if cfg.trace_path:
        from .engine import rank_path

        path = cfg.trace_path if parts.world_size == 1 else rank_path(cfg.trace_path, parts.rank)
        parts.tracer = Tracer(path, parts.rank)
    dtype = DTYPES[cfg.precision]
    main_grads = cfg.accum_dtype == "fp32" and dtype != torch.float32
    grad_dtype = torch.float32 if main_grads else dtype
    wire_bytes = torch.empty((), dtype=DTYPES[cfg.comm_dtype] if cfg.comm_dtype else grad_dtype).element_size()
    shard_world = parts.world_size if cfg.zero_stage == 1 else 1
    # Note: reverse registration order within each group, so the last layers' gradients,
    # which backward produces first, sit in the first bucket (DDP does the same).
    layout = Layout([p.numel() for p in parts.params], [sorted(g, reverse=True) for g in groups],
                    bucket_elems=int(cfg.bucket_mb * MiB // wire_bytes) if parts.distributed else None,
                    first_bucket_elems=int(cfg.first_bucket_mb * MiB // wire_bytes) if parts.distributed else None,
                    shard_world=shard_world, deterministic=cfg.deterministic)
    parts.flat = FlatBuffers(layout, parts.params, dtype, grad_dtype, spec.states(options), device, rank=parts.rank)
    if dtype != torch.float32:
        model.to(dtype)  # frozen params and buffers; the trainable params already are views in dtype
    parts.scalars = StepScalars(device, 1.0, cfg.hysteresis)
    parts.scaler = LossScaler(cfg, parts.scalars, parts.mod)
    group_of = [0] * len(parts.params)
    for gi, g in enumerate(groups):
        for i in g:
            group_of[i] = gi
    parts.counts = StepCounts(group_of, len(groups), device)
    parts.window = Window(cfg.grad_accum_steps, len(parts.params))
    # deterministic: this rank's micro-batch tree, and the chunked norm (deterministic.py)
    parts.tree = (TreeAccumulator(cfg.grad_accum_steps, parts.flat.grad_flat)
                  if cfg.deterministic and cfg.grad_accum_steps > 1 else None)
    parts.norm = make_norm(parts)
    parts.optimizer = FusedOptimizer(spec, [{"params": [parts.params[i] for i in g], **o}
                                            for g, o in zip(groups, options)], spec.defaults(cfg), parts)
    if parts.distributed:
        from .ddp import Reducer

        parts.reducer = Reducer(parts.flat, parts.comm, cfg, parts.mod, parts.scalars, parts.names, parts.tracer,
                                parts.stats, modules=list(model.modules()), tree=parts.tree, norm=parts.norm)
    parts.guard = GradGuard(parts.flat, parts.names, inexact_reason(parts), parts.window, parts.tree)
    parts.plan = make_plan(parts)
    parts.input_cast = install_input_cast(model, dtype) if cfg.cast_inputs and dtype != torch.float32 else None
    return parts


def install_input_cast(model, dtype):
    """A forward pre-hook on the root module: floating-point tensors among forward's args and
    kwargs (nested in lists, tuples and dicts too) become `dtype`; others pass unchanged."""

    def cast(x):
        if isinstance(x, torch.Tensor):
            return x.to(dtype) if x.is_floating_point() and x.dtype != dtype else x
        if isinstance(x, (list, tuple)):
            items = [cast(v) for v in x]
            if isinstance(x, tuple) and hasattr(x, "_fields"):  # namedtuple
                return type(x)(*items)
            return type(x)(items)
        if isinstance(x, dict):
            return type(x)((k, cast(v)) for k, v in x.items())
        return x

    def hook(module, args, kwargs):
        return cast(args), cast(kwargs)

    return model.register_forward_pre_hook(hook, with_kwargs=True)


def make_plan(parts) -> StepPlan:
    """The step plan over the current layout (again after a relayout)."""
    r, flat = parts.reducer, parts.flat
    opt_grads = r.optimizer_grads if r is not None else flat.grad_flat
    return StepPlan(parts.mod, flat, parts.scalars, parts.scaler, parts.optimizer, parts.counts, opt_grads,
                    zero_in_pass=opt_grads is flat.grad_flat, max_norm=parts.config.clip_grad_norm,
                    main_grads=flat.main_grads, bucket_rows=r.bucket_stats if r is not None else None,
                    combine=r.combine_scalars if flat.sharded and parts.norm is None else None,
                    norm=parts.norm, whole_norm=r is None,
                    abort_word=getattr(parts.comm, "abort_word", 0) if r is not None else 0)


def make_norm(parts):
    """deterministic: the chunked norm over the current layout's gradient buffer (else None)."""
    if not parts.config.deterministic:
        return None
    return ChunkNorm(parts.mod, parts.flat.layout, parts.flat.grad_flat, parts.scalars,
                     comm=parts.comm if parts.flat.sharded else None)


def inexact_reason(parts):
    """Why p.grad does not hold the true gradient between backward and step (None: it does)."""
    if parts.flat.main_grads:
        return (f"its gradient accumulates in the engine's fp32 main-grad buffer (EngineConfig.accum_dtype='fp32' "
                f"with {parts.config.precision} params) and .grad holds no values")
    if parts.scaler.active:
        return "the gradients are multiplied by the fp16 loss scale until engine.step()"
    if parts.distributed:
        return "the gradients are averaged across ranks only inside engine.step()"
    if parts.tree is not None:
        return ("EngineConfig(deterministic=True) sums the micro-batches' gradients in a fixed tree inside "
                "engine.step(); .grad holds a partial sum of the window")
    return None


class _OwnerRef:
    """p._pyengine_owner: a weak reference to the Engine training p. A copy of the parameter
    (copy.deepcopy, pickle / torch.save of the model) is no engine's: it copies as None."""

    __slots__ = ("ref",)

    def __init__(self, engine):
        self.ref = weakref.ref(engine)

    def __call__(self):
        return self.ref()

    def __reduce__(self):
        return type(None), ()

    def __deepcopy__(self, memo):
        return None


def claim(parts, engine):
    """Marks the parameters as trained by `engine` (a second Engine on them is refused)."""
    for p in parts.params:
        p._pyengine_owner = _OwnerRef(engine)


def release(parts, engine):
    for p in parts.params:
        if getattr(p, "_pyengine_owner", None) is not None and p._pyengine_owner() is engine:
            del p._pyengine_owner


def broadcast_initial_state(parts):
    """Rank 0's fp32 parameter values and model buffers on every rank, before the buffers
    are built (so sharded master weights start from them too)."""
    with torch.no_grad():
        values = torch.cat([p.detach().reshape(-1).float() for p in parts.params])
        parts.comm.broadcast(values, 0)
        pos = 0
        for p in parts.params:
            p.copy_(values[pos:pos + p.numel()].view_as(p))
            pos += p.numel()
    for b in parts.model.buffers():
        if b.is_floating_point() or b.dtype in (torch.int64, torch.int32):
            parts.comm.broadcast(b.data, 0)


def single_device(model):
    devices = {t.device for t in list(model.parameters()) + list(model.buffers())}
    if len(devices) > 1:
        raise ValueError(f"Engine: the model is spread over several devices ({sorted(map(str, devices))}); "
                         "pyengine trains one model replica per process on one device: move it with model.to(device) "
                         "and use data parallelism across devices")
    dev = devices.pop() if devices else torch.device("cpu")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"Engine: models on {dev.type} are not supported (cpu or cuda)")
    return dev


def check_supported(model, named):
    for name, m in model.named_modules():
        if getattr(m, "sparse", False) and isinstance(m, (torch.nn.Embedding, torch.nn.EmbeddingBag)):
            raise ValueError(f"Engine: {name or 'the model'} is an embedding with sparse=True; pyengine keeps dense "
                             "gradients in flat buffers: build it with sparse=False")
    for name, p in named:
        owner = getattr(p, "_pyengine_owner", None)
        if owner is not None and owner() is not None:
            raise ValueError(f"Engine: parameter {name} is already trained by another Engine; call close() on that "
                             "engine first (two engines on one model would each update only their own buffers)")


def resolve_groups(param_groups, model, cfg, spec):
    """The parameters the engine trains, as (name, param) in registration order, and the
    validated (canonical indices, hyper-parameters) of each torch-style param group.

    Without param_groups: every parameter with requires_grad=True. A param group may also
    list frozen parameters (as torch.optim allows): the engine keeps them, leaves them
    untouched while they are frozen and trains them once unfrozen."""
    defaults = {k: getattr(cfg, k) for k in spec.group_keys}
    everything = [(n, p) for n, p in model.named_parameters()]
    if param_groups is None:
        named = [(n, p) for n, p in everything if p.requires_grad]
        if not named:
            raise ValueError("Engine: the model has no parameter with requires_grad=True; nothing to train")
        return named, [list(range(len(named)))], [dict(defaults)]
    if isinstance(param_groups, dict) or not isinstance(param_groups, (list, tuple)):
        raise TypeError("Engine: param_groups must be a list of dicts, each with a 'params' entry (torch style)")
    listed = {}
    for gi, g in enumerate(param_groups):
        if not isinstance(g, dict) or "params" not in g:
            raise TypeError(f"Engine: param_groups[{gi}] must be a dict with a 'params' entry")
        ps = g["params"]
        for p in [ps] if isinstance(ps, torch.Tensor) else list(ps):
            listed.setdefault(id(p), gi)
    named = [(n, p) for n, p in everything if p.requires_grad or id(p) in listed]
    index = {id(p): i for i, (_, p) in enumerate(named)}
    seen = {}
    groups, options = [], []
    for gi, g in enumerate(param_groups):
        ps = g["params"]
        ps = [ps] if isinstance(ps, torch.Tensor) else list(ps)
        members = []
        for p in ps:
            if id(p) not in index:
                raise ValueError(f"Engine: param_groups[{gi}] holds a tensor that is not a parameter of the model "
                                 "(not in model.parameters())")
            i = index[id(p)]
            if i in seen:
                raise ValueError(f"Engine: parameter {named[i][0]} appears in param_groups[{seen[i]}] and "
                                 f"param_groups[{gi}]; each parameter must be in exactly one group")
            seen[i] = gi
            members.append(i)
        values = {k: (tuple(g[k]) if k == "betas" and isinstance(g.get(k), list) else g.get(k, defaults[k]))
                  for k in spec.group_keys}
        checked = check_group(spec, {**g, **values}, f"Engine: param_groups[{gi}]")
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
    if not named:
        raise ValueError("Engine: the model has no parameter with requires_grad=True; nothing to train")
    return named, groups, options
