"""Validated wrappers over the native kernels, for torch tensors on CPU or CUDA, CuPy arrays
(on CuPy's current stream) and numpy arrays.

Every op checks device, dtype, contiguity, sizes and overlapping buffers and raises a
ValueError/TypeError naming the argument. On CUDA the kernels run on the current stream
and nothing here synchronizes with the host. Device-resident scalars (`found_inf`,
`sumsq`, `inv_scale`, `grad_scale`, the loss-scale `state`) are float32 arrays on the same
device as the data; an optimizer's `step` counter is a one-element int64 array there.
"""
import math
from dataclasses import dataclass, field
from operator import attrgetter, methodcaller

from . import _native
from ._checks import _bool, check_number
from ._arrays import DTYPE_NAMES, F32, ArrayView, _current_cuda_device, _torch_dtype_code, torch_device, view

__all__ = [
    "accumulate_", "fill_", "cast_scale", "unscale_check_sumsq", "clip_coef", "adam_step", "adamw_step",
    "sgd_step", "lion_step", "update_loss_scale", "new_loss_scale_state", "flatten", "unflatten",
    "sumsq_workspace", "FlatCopy", "LOSS_SCALE_STATE_SIZE",
]

LOSS_SCALE_STATE_SIZE = _native._C.LOSS_SCALE_STATE_SIZE
_REDUCE_CHUNK = _native._C.REDUCE_CHUNK
_HYPER_SLOTS = _native._C.HYPER_SLOTS
# name -> the hyper block's slot names, in the core's order (csrc/optimizers.def)
_HYPER_NAMES = {o["name"]: o["hyper"] for o in _native._C.OPTIMIZERS}


# ----------------------------------------------------------------------------------------
# validation helpers


def _arr(x, name, writable=False, dtypes=None):
    v = view(x, name, writable)
    if dtypes is not None and v.dtype not in dtypes:
        want = " or ".join(DTYPE_NAMES[d] for d in dtypes)
        raise TypeError(f"{name}: expected {want}, got {DTYPE_NAMES[v.dtype]}")
    return v


def _opt(x, name, **kw):
    return None if x is None else _arr(x, name, **kw)


def _scalar(x, name, size=1, writable=False):
    """A device-resident float32 scalar (or small fixed array)."""
    if x is None:
        return None
    v = _arr(x, name, writable, (F32,))
    if v.numel < size:
        raise ValueError(f"{name}: expected a float32 array of at least {size} element(s), got {v.numel}")
    return v


def _same_device(views):
    views = [v for v in views if v is not None]
    first = views[0]
    for v in views[1:]:
        if v.device != first.device:
            raise ValueError(
                f"{v.name} is on {v.device_str()} but {first.name} is on {first.device_str()}; "
                "all arguments must be on the same device"
            )
    return first


def _same_numel(ref, *others):
    for v in others:
        if v is not None and v.numel != ref.numel:
            raise ValueError(f"{v.name} has {v.numel} elements but {ref.name} has {ref.numel}")


def _no_overlap(views, allow_same=()):
    """Buffers must not overlap, except the pairs in allow_same when they are identical.

    Sort by address, then compare each buffer with the one reaching furthest so far:
    O(n log n), so flattening thousands of tensors stays cheap.
    """
    views = sorted((v for v in views if v is not None and v.nbytes > 0), key=lambda v: (v.ptr, v.nbytes))
    reach = None  # the buffer whose end is furthest so far
    for v in views:
        if reach is not None and v.ptr < reach.ptr + reach.nbytes:
            same = v.ptr == reach.ptr and v.nbytes == reach.nbytes
            if not (same and ((v.name, reach.name) in allow_same or (reach.name, v.name) in allow_same)):
                raise ValueError(f"{reach.name} and {v.name} overlap in memory; pass separate buffers")
        if reach is None or v.ptr + v.nbytes > reach.ptr + reach.nbytes:
            reach = v


def _float(x, name, lo=None, hi=None, lo_open=False, hi_open=False):
    return check_number(name, x, lo, hi, lo_open, hi_open)


def _ptr(v):
    return 0 if v is None else v.ptr


class _Launch:
    """Backend module, stream and device guard for the views of one call."""

    def __init__(self, ref: ArrayView):
        self.ref = ref
        self._guard = None
        if not ref.is_cuda:
            self.mod, self.stream = _native._C, 0
            return
        self.mod = _native.cuda_module()
        if ref.kind == "torch":
            import torch

            self.stream = torch.cuda.current_stream(ref.device[1]).cuda_stream
            if torch.cuda.current_device() != ref.device[1]:
                self._guard = torch.cuda.device(ref.device[1])
        else:
            self.stream = _cupy_stream(ref)
            try:
                import cupy

                self._guard = cupy.cuda.Device(ref.device[1])
            except ImportError:
                pass

    def __enter__(self):
        if self._guard is not None:
            self._guard.__enter__()
        return self

    def __exit__(self, *exc):
        if self._guard is not None:
            self._guard.__exit__(*exc)
        return False


def _cupy_stream(ref):
    mod = type(ref.obj).__module__ or ""
    if mod.startswith("cupy"):
        import cupy

        return cupy.cuda.get_current_stream().ptr
    return ref.stream  # the producer's stream from __cuda_array_interface__ (1/2: legacy/per-thread)


def _alloc_f32(ref: ArrayView, n: int):
    """Scratch float32 memory beside ref (torch's or CuPy's allocator: no sync)."""
    if ref.kind == "torch":
        import torch

        return torch.empty(n, dtype=torch.float32, device=ref.obj.device)
    if ref.kind == "cai":
        import cupy

        return cupy.empty(n, dtype=cupy.float32)
    import numpy

    return numpy.empty(n, dtype=numpy.float32)


# ----------------------------------------------------------------------------------------
# ops


def accumulate_(dst, src, alpha=1.0):
    """dst += alpha * src, dst float32 (e.g. fp32 main grads), src any float dtype."""
    d = _arr(dst, "dst", True, (F32,))
    s = _arr(src, "src")
    a = _float(alpha, "alpha")
    _same_device([d, s])
    _same_numel(d, s)
    _no_overlap([d, s], allow_same={("dst", "src")})
    with _Launch(d) as L:
        L.mod.accumulate(d.ptr, s.ptr, s.dtype, d.numel, a, L.stream)
    return dst


def fill_(dst, value=0.0):
    """dst[:] = value (any float dtype), on dst's device and stream."""
    d = _arr(dst, "dst", True)
    v = _float(value, "value")
    with _Launch(d) as L:
        L.mod.fill(d.ptr, d.dtype, d.numel, v, L.stream)
    return dst


def cast_scale(src, out, alpha=1.0):
    """out = alpha * src, converting dtype (e.g. predivide into the communication dtype)."""
    s = _arr(src, "src")
    o = _arr(out, "out", True)
    a = _float(alpha, "alpha")
    _same_device([s, o])
    _same_numel(s, o)
    _no_overlap([s, o], allow_same={("src", "out")} if s.dtype == o.dtype else ())
    with _Launch(s) as L:
        L.mod.cast_scale(o.ptr, o.dtype, s.ptr, s.dtype, s.numel, a, L.stream)
    return out


def sumsq_workspace(grad):
    """Scratch that unscale_check_sumsq needs on CUDA for `grad` (reusable across calls)."""
    g = _arr(grad, "grad")
    return _alloc_f32(g, 2 * max(1, -(-g.numel // _REDUCE_CHUNK)))


def unscale_check_sumsq(grad, found_inf, sumsq, inv_scale=None, out=None, workspace=None):
    """y = grad * inv_scale; found_inf := 1 if any y is inf/NaN; sumsq += sum(y**2).

    out=None reads only (norm and flag, no write); out=grad unscales in place; any other
    out receives y in its own dtype. found_inf is only ever set, never cleared.
    """
    g = _arr(grad, "grad")
    f = _scalar(found_inf, "found_inf", writable=True)
    q = _scalar(sumsq, "sumsq", writable=True)
    i = _scalar(inv_scale, "inv_scale")
    o = _opt(out, "out", writable=True)
    _same_device([g, f, q, i, o])
    _same_numel(g, o)
    _no_overlap([g, o, f, q], allow_same={("grad", "out")})
    _no_overlap([i, f, q])
    with _Launch(g) as L:
        w = None
        if g.is_cuda and g.numel > 0:
            need = 2 * -(-g.numel // _REDUCE_CHUNK)
            if workspace is None:
                workspace = _alloc_f32(g, need)
            w = _scalar(workspace, "workspace", size=need, writable=True)
            _same_device([g, w])
            _no_overlap([g, o, f, q, w], allow_same={("grad", "out")})
        L.mod.unscale_check_sumsq(g.ptr, g.dtype, _ptr(o), o.dtype if o else F32, g.numel, _ptr(i), f.ptr,
                                  q.ptr, _ptr(w), L.stream)


def clip_coef(sumsq, max_norm, out, inv_scale=None):
    """out[0] = sqrt(sumsq) (the global norm); out[1] = inv_scale * min(1, max_norm/(norm+1e-6)).

    max_norm None, 0 or inf: no clipping (out[1] = inv_scale).
    """
    q = _scalar(sumsq, "sumsq")
    o = _scalar(out, "out", size=2, writable=True)
    i = _scalar(inv_scale, "inv_scale")
    m = math.inf if max_norm is None else _float(max_norm, "max_norm", lo=0.0)
    _same_device([q, o, i])
    _no_overlap([q, o])
    with _Launch(q) as L:
        L.mod.clip_coef(q.ptr, _ptr(i), m, o.ptr, L.stream)
    return out


@dataclass(frozen=True)
class _CounterView:
    """An int64 step counter, described like an ArrayView for the device and overlap checks."""
    name: str
    ptr: int
    numel: int
    device: tuple
    kind: str
    obj: object
    nbytes: int = field(init=False)

    def __post_init__(self):
        object.__setattr__(self, "nbytes", self.numel * 8)

    @property
    def is_cuda(self) -> bool:
        return self.device[0] == "cuda"

    def device_str(self) -> str:
        return "cpu" if not self.is_cuda else f"cuda:{self.device[1]}"


_INT64_TYPESTRS = ("<i8", "=i8", "|i8")


def _step_counter(x, name="step"):
    """The optimizer's step count: a writable one-element int64 array (an exact integer)."""
    hint = "use an int64 tensor, e.g. torch.zeros(1, dtype=torch.int64): a float32 count stops at 2**24"
    mod = type(x).__module__ or ""
    if mod.startswith("torch"):
        import torch

        if isinstance(x, torch.Tensor):
            if x.dtype != torch.int64:
                raise TypeError(f"{name}: expected an int64 step counter, got {x.dtype}; {hint}")
            dev = torch_device(x, name)
            if x.numel() < 1:
                raise ValueError(f"{name}: expected an int64 array of at least 1 element(s), got 0")
            return _CounterView(name, x.data_ptr(), 1, dev, "torch", x)
    iface = getattr(x, "__cuda_array_interface__", None)
    kind = "cai"
    if iface is None:
        iface = getattr(x, "__array_interface__", None)
        kind = "host"
    if iface is None:
        raise TypeError(f"{name}: expected a torch tensor, a CUDA array or a host array, got {type(x).__name__}")
    if iface["typestr"] not in _INT64_TYPESTRS:
        raise TypeError(f"{name}: expected an int64 step counter, got typestr {iface['typestr']!r}; {hint}")
    ptr, readonly = iface["data"]
    if readonly:
        raise ValueError(f"{name}: the array is read-only")
    if math.prod(iface["shape"]) < 1:
        raise ValueError(f"{name}: expected an int64 array of at least 1 element(s), got 0")
    if kind == "host":
        return _CounterView(name, ptr or 0, 1, ("cpu", -1), kind, x)
    index = getattr(getattr(x, "device", None), "id", None)
    return _CounterView(name, ptr or 0, 1, ("cuda", _current_cuda_device() if index is None else index), kind, x)


def _optimizer_views(master, grad, step, model, grad_scale, found_inf, state, zero_grad):
    p = _arr(master, "master", True, (F32,))
    g = _arr(grad, "grad", writable=zero_grad)
    st = _step_counter(step)
    mo = _opt(model, "model", writable=True)
    gs = _scalar(grad_scale, "grad_scale")
    fi = _scalar(found_inf, "found_inf")
    states = [_arr(x, nm, True, (F32,)) if x is not None else None for nm, x in state]
    _same_device([p, g, st, mo, gs, fi, *states])
    _same_numel(p, g, mo, *states)
    _no_overlap([p, g, mo, *states, st], allow_same=())
    return p, g, st, mo, gs, fi, states


def _hyper_block(L, ref, optimizer, values):
    """A device block of kHyperSlots doubles holding `values` in the core's slot order for `optimizer`,
    written on the call's stream (no host sync). It lives until the pass has read it: the
    allocators hand memory back in stream order."""
    block = _arr(_alloc_f32(ref, 2 * _HYPER_SLOTS), "hyper", True)  # kHyperSlots doubles
    L.mod.set_hyper(block.ptr, [float(values[n]) for n in _HYPER_NAMES[optimizer]], L.stream)
    return block


def _run_optimizer(optimizer, p, states, g, zero_grad, mo, gs, fi, st, values):
    with _Launch(p) as L:
        a = L.mod.OptimizerArgs()
        s1, s2 = (list(states) + [None, None])[:2]
        a.master, a.state1, a.state2 = p.ptr, _ptr(s1), _ptr(s2)
        a.grad, a.grad_dtype, a.zero_grad = g.ptr, g.dtype, bool(zero_grad)
        a.model, a.model_dtype = _ptr(mo), mo.dtype if mo else F32
        a.n, a.grad_scale, a.found_inf, a.step = p.numel, _ptr(gs), _ptr(fi), st.ptr
        hyper = _hyper_block(L, p, optimizer, values)  # kept alive until the call returns
        a.hyper = hyper.ptr
        getattr(L.mod, f"{optimizer}_step")(a, L.stream)


def _betas(betas, hi_open=True):
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise TypeError("betas: expected a pair (beta1, beta2)")
    return tuple(_float(b, f"betas[{k}]", lo=0.0, hi=1.0, hi_open=hi_open) for k, b in enumerate(betas))


def adam_step(master, exp_avg, exp_avg_sq, grad, step, *, lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
              decoupled=False, maximize=False, grad_scale=None, found_inf=None, model=None, zero_grad=False):
    """One fused Adam (decoupled=False, L2 decay) or AdamW (decoupled=True) step.

    g = grad * grad_scale (negated when maximize); if found_inf != 0 nothing at all changes
    (step included); otherwise master, exp_avg, exp_avg_sq and step advance as in
    torch.optim.Adam(W), and model (fp16/bf16/fp32) receives the new master weights.
    step is a one-element int64 array on the data's device. zero_grad=True clears grad in
    the same pass (skipped step or not), instead of a separate zeroing pass.
    """
    lr = _float(lr, "lr", lo=0.0)
    b1, b2 = _betas(betas)
    eps = _float(eps, "eps", lo=0.0)
    wd = _float(weight_decay, "weight_decay", lo=0.0)
    mx = _bool("maximize", maximize)
    p, g, st, mo, gs, fi, states = _optimizer_views(
        master, grad, step, model, grad_scale, found_inf, [("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)],
        zero_grad)
    values = dict(lr=lr, beta1=b1, beta2=b2, eps=eps, weight_decay=wd, maximize=mx)
    _run_optimizer("adamw" if decoupled else "adam", p, states, g, zero_grad, mo, gs, fi, st, values)


def adamw_step(master, exp_avg, exp_avg_sq, grad, step, **kw):
    """adam_step with decoupled weight decay (torch.optim.AdamW)."""
    return adam_step(master, exp_avg, exp_avg_sq, grad, step, decoupled=True, **kw)


def sgd_step(master, grad, step, *, lr, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False,
             maximize=False, momentum_buf=None, grad_scale=None, found_inf=None, model=None, zero_grad=False):
    """One fused SGD step with torch.optim.SGD's formulas (momentum_buf needed when momentum > 0;
    given with momentum == 0 it is left untouched, as torch does). zero_grad as in adam_step."""
    lr = _float(lr, "lr", lo=0.0)
    mom = _float(momentum, "momentum", lo=0.0)
    damp = _float(dampening, "dampening", lo=0.0, hi=1.0)
    wd = _float(weight_decay, "weight_decay", lo=0.0)
    mx = _bool("maximize", maximize)
    if nesterov and (mom <= 0.0 or damp != 0.0):
        raise ValueError("nesterov: needs momentum > 0 and dampening == 0")
    if mom > 0.0 and momentum_buf is None:
        raise ValueError("momentum_buf: required when momentum > 0")
    p, g, st, mo, gs, fi, states = _optimizer_views(
        master, grad, step, model, grad_scale, found_inf, [("momentum_buf", momentum_buf)], zero_grad)
    values = dict(lr=lr, momentum=mom, dampening=damp, weight_decay=wd, nesterov=bool(nesterov), maximize=mx)
    _run_optimizer("sgd", p, states, g, zero_grad, mo, gs, fi, st, values)


def lion_step(master, exp_avg, grad, step, *, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0, maximize=False,
              grad_scale=None, found_inf=None, model=None, zero_grad=False):
    """One fused Lion step (Chen et al. 2023; the formulas of lion-pytorch):
    p *= 1 - lr*weight_decay; p -= lr * sign(beta1*m + (1-beta1)*g); m = beta2*m + (1-beta2)*g.

    g = grad * grad_scale (negated when maximize); found_inf, model, step and zero_grad as in
    adam_step (the step count is kept, though Lion's update does not depend on it).
    """
    lr = _float(lr, "lr", lo=0.0)
    b1, b2 = _betas(betas, hi_open=False)
    wd = _float(weight_decay, "weight_decay", lo=0.0)
    mx = _bool("maximize", maximize)
    p, g, st, mo, gs, fi, states = _optimizer_views(
        master, grad, step, model, grad_scale, found_inf, [("exp_avg", exp_avg)], zero_grad)
    values = dict(lr=lr, beta1=b1, beta2=b2, weight_decay=wd, maximize=mx)
    _run_optimizer("lion", p, states, g, zero_grad, mo, gs, fi, st, values)


def new_loss_scale_state(initial_scale, hysteresis, like):
    """A loss-scale state array (float32 x LOSS_SCALE_STATE_SIZE) on like's device.

    Slots: 0 scale, 1 1/scale, 2 clean steps since the last change, 3 hysteresis left,
    4 skipped steps in total, 5 consecutive skipped steps, 6 last step's flag.
    """
    s = _float(initial_scale, "initial_scale", lo=0.0, lo_open=True)
    h = int(hysteresis)
    if h < 1:
        raise ValueError(f"hysteresis: must be >= 1, got {hysteresis}")
    import torch

    dev = like.device if isinstance(like, torch.Tensor) else torch.device(like)
    return torch.tensor([s, 1.0 / s, 0.0, float(h), 0.0, 0.0, 0.0, 0.0], dtype=torch.float32, device=dev)


def update_loss_scale(state, found_inf, *, growth_factor=2.0, backoff_factor=0.5, growth_interval=2000,
                      hysteresis=2, min_scale=1.0, max_scale=2.0**24, consecutive_hysteresis=False):
    """Updates the loss-scale state on the device from found_inf (DeepSpeed hysteresis rules)."""
    st = _scalar(state, "state", size=LOSS_SCALE_STATE_SIZE, writable=True)
    fi = _scalar(found_inf, "found_inf")
    gf = _float(growth_factor, "growth_factor", lo=1.0)
    bf = _float(backoff_factor, "backoff_factor", lo=0.0, hi=1.0, lo_open=True)
    mn = _float(min_scale, "min_scale", lo=0.0, lo_open=True)
    mx = _float(max_scale, "max_scale", lo=mn)
    if int(growth_interval) < 1:
        raise ValueError(f"growth_interval: must be >= 1, got {growth_interval}")
    if int(hysteresis) < 1:
        raise ValueError(f"hysteresis: must be >= 1, got {hysteresis}")
    _same_device([st, fi])
    with _Launch(st) as L:
        L.mod.update_loss_scale(st.ptr, _ptr(fi), loss_scale_config(L.mod, gf, bf, mn, mx, growth_interval, hysteresis,
                                                                    consecutive_hysteresis), L.stream)


def loss_scale_config(mod, growth_factor, backoff_factor, min_scale, max_scale, growth_interval, hysteresis,
                      consecutive_hysteresis):
    """The native LossScaleConfig (values already validated)."""
    c = mod.LossScaleConfig()
    c.growth_factor, c.backoff_factor, c.min_scale, c.max_scale = growth_factor, backoff_factor, min_scale, max_scale
    c.growth_interval, c.hysteresis, c.consecutive_hysteresis = int(growth_interval), int(hysteresis), \
        bool(consecutive_hysteresis)
    return c


def _multi(tensors, flat, alpha, to_flat):
    copy = FlatCopy(tensors, flat, alpha, _writes_tensors=not to_flat)
    if to_flat:
        copy.flatten()
    else:
        copy.unflatten()


class FlatCopy:
    """flatten / unflatten of one list of tensors and one flat buffer, checked once.

    ops.flatten checks its arguments on every call (about 1 us a tensor); a training loop
    that copies the same tensors every step checks them once here and then pays one native
    call. The tensors must keep their storage (no resize, no .data = ...) while it is used.
    """

    def __init__(self, tensors, flat, alpha=1.0, _writes_tensors=True):
        if isinstance(tensors, (str, bytes)) or not hasattr(tensors, "__iter__"):
            raise TypeError("tensors: expected a list of arrays")
        tensors = list(tensors)
        f = _arr(flat, "flat", writable=True)
        a = _float(alpha, "alpha")
        fast = _torch_list(tensors, f) if f.kind == "torch" else None
        if fast is not None:
            ptrs, numels, dt, nbytes = fast
        else:
            views = [_arr(t, f"tensors[{i}]", writable=_writes_tensors) for i, t in enumerate(tensors)]
            if views:
                _same_device([f, *views])
                for v in views:
                    if v.dtype != views[0].dtype:
                        raise TypeError(f"{v.name}: all tensors must share one dtype ({DTYPE_NAMES[views[0].dtype]}), "
                                        f"got {DTYPE_NAMES[v.dtype]}")
            ptrs, numels, nbytes = [v.ptr for v in views], [v.numel for v in views], [v.nbytes for v in views]
            dt = views[0].dtype if views else f.dtype
        total = sum(numels)
        if total != f.numel:
            raise ValueError(f"flat has {f.numel} elements but the tensors hold {total}")
        _no_overlap_ranges(f, ptrs, nbytes, tensors_written=_writes_tensors)
        self._args = (ptrs, numels, dt, f.ptr, f.dtype, a)
        self._flat, self._tensors, self._total = f, tensors, total  # keep them alive

    def flatten(self):
        """flat = concat(alpha * t for t in tensors), cast to flat's dtype, in one launch."""
        self._run(True)
        return self._flat.obj

    def unflatten(self):
        """Scatters alpha * flat back into the tensors (cast to their dtype), in one launch."""
        self._run(False)
        return self._tensors

    def _run(self, to_flat):
        if self._total == 0:
            return
        ptrs, numels, dt, fptr, fdt, a = self._args
        with _Launch(self._flat) as L:
            L.mod.multi_copy(ptrs, numels, dt, fptr, fdt, a, to_flat, L.stream)


# Note: flatten/unflatten take many tensors at a time, so for a list of torch tensors the
# checks run in bulk, as map() chains over C-level getters (about 1 us a tensor where one
# ArrayView each cost 5): the host cost, not the copy, decides a flatten of small tensors.
_dtype_of, _device_of = attrgetter("dtype"), attrgetter("device")
_ptr_of, _numel_of = methodcaller("data_ptr"), methodcaller("numel")
_contiguous, _elem_size = methodcaller("is_contiguous"), methodcaller("element_size")


def _torch_list(tensors, f):
    """(ptrs, numels, dtype code, nbytes) of a list of torch tensors on flat's device, checked;
    None when the list holds anything else (the per-array path then checks and names it)."""
    import torch

    if not all(map(torch.is_tensor, tensors)):
        return None
    if not tensors:
        return [], [], f.dtype, []
    dtypes = set(map(_dtype_of, tensors))
    if len(dtypes) > 1:
        first = tensors[0].dtype
        i = next(k for k, t in enumerate(tensors) if t.dtype != first)
        raise TypeError(f"tensors[{i}]: all tensors must share one dtype ({first}), got {tensors[i].dtype}")
    code = _torch_dtype_code(tensors[0])
    if code is None:
        raise TypeError(f"tensors[0]: expected a float32, float16 or bfloat16 tensor, got {tensors[0].dtype}")
    if set(map(_device_of, tensors)) != {f.obj.device}:
        i = next(k for k, t in enumerate(tensors) if t.device != f.obj.device)
        raise ValueError(f"tensors[{i}] is on {tensors[i].device} but flat is on {f.obj.device}; all arguments must "
                         "be on the same device")
    if not all(map(_contiguous, tensors)):
        i = next(k for k, t in enumerate(tensors) if not t.is_contiguous())
        raise ValueError(f"tensors[{i}]: expected a contiguous tensor (call .contiguous() first)")
    numels = list(map(_numel_of, tensors))
    size = tensors[0].element_size()
    return list(map(_ptr_of, tensors)), numels, code, [n * size for n in numels]


def _no_overlap_ranges(f, ptrs, nbytes, tensors_written):
    """flat must not overlap any tensor; written tensors must not overlap one another."""
    lo, hi = f.ptr, f.ptr + f.nbytes
    if f.nbytes and any(p < hi and p + n > lo for p, n in zip(ptrs, nbytes) if n):
        raise ValueError("flat and tensors overlap in memory; pass separate buffers")
    if tensors_written:
        reach = 0
        for p, n in sorted((p, n) for p, n in zip(ptrs, nbytes) if n):
            if p < reach:
                raise ValueError("two of the tensors overlap in memory; pass separate buffers")
            reach = max(reach, p + n)


def flatten(tensors, flat, alpha=1.0):
    """flat = concat(alpha * t for t in tensors), cast to flat's dtype, in one launch."""
    _multi(tensors, flat, alpha, True)
    return flat


def unflatten(flat, tensors, alpha=1.0):
    """Scatters alpha * flat back into tensors (cast to their dtype), in one launch."""
    _multi(tensors, flat, alpha, False)
    return tensors
