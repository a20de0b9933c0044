"""Differential fuzzing of the Engine with torch.optim as the oracle: the models, the programs
hypothesis draws, and the runner that plays one program on both sides in lockstep.

A program is plain data (dicts, tuples, numbers), so it prints, replays and travels to
spawned ranks. It fixes a model kind and seed, an optimizer and its hyper-parameters, the
param groups, clipping, micro-batches per update (grad_accum_steps) and an LR scheduler, then
lists user actions. The runner builds the same model twice from the seed: a plain PyTorch
side (torch.optim, clip_grad_norm_, torch.autocast for bf16, DDP for two ranks) and an Engine
side, and plays every action on both.

Oracle. After each update the engine's weights, and its optimizer state in torch.optim's
format (exp_avg, exp_avg_sq, momentum_buffer, each parameter's step), must equal torch's
within the tolerance derived in `Tolerance` below; or the engine must have raised a documented
error (pyengine.UsageError, GradientAccessError under it, or a ValueError/TypeError naming
the argument) at the first action torch would have handled differently. An action the engine
refused is not applied to the torch side, and the engine must be as it was. Anything else, an
undocumented exception, a missing error, an error at another action or a divergence, fails
with `Divergence`, tagged with the row of the expected-behaviour table it falls under
(`ROWS`), and hypothesis shrinks the program.

Lockstep: after each update is compared, the torch side takes the engine's weights and
optimizer state (the step counts are compared, never copied), so every comparison covers one
step's arithmetic from identical inputs. Both sides run the same forward and backward on the
same weights, so their gradients are bitwise equal (fp32, bf16 under autocast, two ranks
averaging over gloo), and the tolerance only has to cover one optimizer step's roundings.
A wrong formula shows up in the step it is wrong in, not blurred by earlier steps.
"""
import copy
import io
import math
import os
import shutil
import tempfile
import warnings

import torch
import torch.nn as nn
from hypothesis import strategies as st

import pyengine
from pyengine import Engine, EngineConfig, UsageError

U = 2.0 ** -24  # unit roundoff of fp32: one rounding moves a value by at most U x its magnitude
DOCUMENTED = (UsageError, ValueError, TypeError)

# the expected-behaviour table each failure is filed under
ROWS = {
    1: "SGD momentum set after Engine(...) applies as in torch",
    2: "zero_grad between backward and step",
    3: "a second torch optimizer's step() is refused",
    4: "requires_grad_(False) after Engine(...): not updated",
    5: "unfreezing a part frozen at build is refused",
    6: "a parameter without gradient is untouched",
    7: "model.to(memory_format=channels_last) is refused, model unchanged",
    8: "fp16 checkpoint into an fp32 engine: no loss scale imported",
    9: "bf16 checkpoint into an fp16 engine: own loss scale, skips carried",
    10: "amsgrad refused, maximize as torch",
    11: "step counts above 2**24 as torch",
    12: "Adam/AdamW bias correction as torch's float64 formula",
    13: "torch.save(submodule.state_dict()) about torch's size",
    0: "other",
}


class Divergence(AssertionError):
    def __init__(self, row, msg):
        super().__init__(f"[row {row}: {ROWS.get(row, '?')}] {msg}")
        self.row, self.msg = row, msg


class StopProgram(Exception):
    """The engine cannot be brought back to a known state: the program ends here (passing)."""


# -- models (a few hundred parameters each) ---------------------------------------------------
class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.l0 = nn.Linear(6, 16)
        self.l1 = nn.Linear(16, 3)

    def forward(self, x, aux=False):
        return self.l1(torch.tanh(self.l0(x)))


class Frozen(nn.Module):
    """l0 is frozen (requires_grad=False) when the Engine is built."""

    def __init__(self):
        super().__init__()
        self.l0 = nn.Linear(6, 12)
        self.l1 = nn.Linear(12, 12)
        self.l2 = nn.Linear(12, 3)

    def forward(self, x, aux=False):
        return self.l2(torch.tanh(self.l1(torch.tanh(self.l0(x)))))


class NoGrad(nn.Module):
    """`aux` takes part only in the micro-batches that ask for it; `spare` never does."""

    def __init__(self):
        super().__init__()
        self.l0 = nn.Linear(6, 12)
        self.aux = nn.Linear(12, 12)
        self.l1 = nn.Linear(12, 3)
        self.spare = nn.Parameter(torch.randn(4) * 0.5)

    def forward(self, x, aux=False):
        h = torch.tanh(self.l0(x))
        if aux:
            h = h + torch.tanh(self.aux(h))
        return self.l1(h)


class Tied(nn.Module):
    """An embedding and an output layer sharing one Parameter."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.mix = nn.Linear(8, 8)
        self.out = nn.Linear(8, 10)
        self.out.weight = self.emb.weight

    def forward(self, x, aux=False):
        return self.out(torch.tanh(self.mix(self.emb(x))))


class Conv(nn.Module):
    """4-D weights, so memory-format casts mean something."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3)
        self.head = nn.Linear(27, 3)

    def forward(self, x, aux=False):
        return self.head(torch.tanh(self.conv(x)).flatten(1))


MODELS = {"mlp": MLP, "frozen": Frozen, "nograd": NoGrad, "tied": Tied, "conv": Conv}
BUILD_FROZEN = {"frozen": ("l0",)}
FREEZABLE = {"mlp": ("l0", "l1"), "frozen": ("l0", "l1", "l2"), "nograd": ("l0", "aux", "l1"),
             "tied": ("emb", "mix", "out"), "conv": ("conv", "head")}


def make_model(kind, seed):
    torch.manual_seed(seed)
    m = MODELS[kind]()
    for name in BUILD_FROZEN.get(kind, ()):
        m.get_submodule(name).requires_grad_(False)
    return m


def make_batch(kind, seed, rank=0):
    g = torch.Generator().manual_seed(seed * 7919 + rank * 104729 + 17)
    if kind == "tied":
        return torch.randint(0, 10, (4, 5), generator=g), torch.randint(0, 10, (4, 5), generator=g)
    if kind == "conv":
        return torch.randn(2, 2, 5, 5, generator=g), torch.randn(2, 3, generator=g)
    return torch.randn(4, 6, generator=g), torch.randn(4, 3, generator=g)


def forward_loss(kind, model, batch, aux, cast=None):
    """The loss in fp32 (a bf16 model's output is upcast first, on both sides)."""
    x, y = batch
    if cast is not None and x.is_floating_point():
        x = x.to(cast)
    out = model(x, aux).float()
    if kind == "tied":
        return torch.nn.functional.cross_entropy(out.reshape(-1, 10), y.reshape(-1))
    return ((out - y) ** 2).mean()


def _lambda_schedule(n):
    return 1.0 / (1.0 + 0.5 * n)


# -- programs ---------------------------------------------------------------------------------
LRS = [1e-3, 0.01, 0.1, 0.3, 1.0]  # large ones make a wrong step size visible above the weights' ulps
# (0.5, 0.75): 1 - beta and beta**step are exact in fp32 for the first steps, so Adam's other
# behaviour is compared without any rounding of the bias correction in the way
BETAS = [(0.9, 0.999), (0.8, 0.99), (0.5, 0.9), (0.95, 0.9995), (0.5, 0.75)]
BIG_STEPS = [2 ** 24 + 3, 2 ** 31 + 5]


@st.composite
def programs(draw, profile="fp32"):
    """One program for `profile`: "fp32" (one process), "bf16" (one process, against
    autocast) or "ddp" (fp32, 2 gloo ranks, against DistributedDataParallel)."""
    one = profile != "ddp"
    kinds = ["mlp", "frozen", "nograd", "tied", "conv"] if profile == "fp32" else (
        ["mlp", "frozen", "nograd", "conv"] if profile == "bf16" else ["mlp", "frozen", "tied", "conv"])
    kind = draw(st.sampled_from(kinds))
    opt = draw(st.sampled_from(["adamw", "adam", "sgd"]))
    hp = {"lr": draw(st.sampled_from(LRS)), "weight_decay": draw(st.sampled_from([0.0, 0.01, 0.1]))}
    if opt == "sgd":
        hp["momentum"] = draw(st.sampled_from([0.0, 0.5, 0.9]))
        hp["nesterov"] = hp["momentum"] > 0 and draw(st.booleans())
        hp["dampening"] = 0.0 if hp["nesterov"] else draw(st.sampled_from([0.0, 0.3]))
    else:
        hp["betas"] = draw(st.sampled_from(BETAS))
        hp["eps"] = draw(st.sampled_from([1e-8, 1e-6]))
    prog = {
        "profile": profile, "kind": kind, "seed": draw(st.integers(0, 2 ** 16)), "opt": opt, "hp": hp,
        "groups": draw(st.sampled_from(["one", "split"])),
        "build_extra": draw(st.sampled_from([{}, {}, {"maximize": True}] +
                                            ([{"amsgrad": True}] if opt != "sgd" and one else []))),
        "clip": draw(st.sampled_from([None, None, 0.05, 0.5, 5.0])),
        "accum": draw(st.integers(1, 4)),
        "sched": draw(st.sampled_from([None, None, "step", "lambda", "onecycle", "onecycle_mom"])),
    }
    prog["actions"] = draw(st.lists(action(prog), min_size=1, max_size=8))
    return prog


def action(prog):
    profile, kind, opt, k = prog["profile"], prog["kind"], prog["opt"], prog["accum"]
    one = profile != "ddp"
    ngroups = 2 if prog["groups"] == "split" else 1

    def hook(boundary_mid):
        if profile == "ddp" and boundary_mid:
            return st.just(None)  # two ranks: gradients are in flight there (a documented refusal)
        return st.sampled_from([None, None, None, ("zero", "model", True), ("zero", "model", False),
                                ("zero", "opt", True), ("zero", "opt", False), ("other",)])

    @st.composite
    def train(draw):
        micros = []
        for i in range(k):
            micros.append({"top": draw(hook(False)), "mid": draw(hook(i == k - 1)),
                           "aux": draw(st.booleans()) if kind == "nograd" else False,
                           "data": draw(st.integers(0, 2 ** 16))})
        return ("train", tuple(micros))

    keys = ["lr", "weight_decay", "maximize"] + (["momentum"] if opt == "sgd" else ["betas"])
    if opt != "sgd" and one:
        keys.append("amsgrad")

    @st.composite
    def set_hp(draw):
        key = draw(st.sampled_from(keys))
        value = {"lr": st.sampled_from(LRS), "weight_decay": st.sampled_from([0.0, 0.01, 0.1]),
                 "maximize": st.booleans(), "amsgrad": st.booleans(), "betas": st.sampled_from(BETAS),
                 "momentum": st.sampled_from([0.5, 0.9] if prog["hp"].get("nesterov") else [0.0, 0.5, 0.9])}[key]
        return ("set", draw(st.integers(0, ngroups - 1)), key, draw(value))

    choices = [train(), train(), train(), set_hp()]
    if prog["sched"]:
        choices.append(st.just(("sched",)))
    choices.append(st.tuples(st.just("roundtrip"), st.sampled_from(["engine", "optimizer", "folder"])))
    if opt != "sgd":
        choices.append(st.tuples(st.just("load_torch"), st.sampled_from([None, 7, 1000] + BIG_STEPS)))
    else:
        choices.append(st.tuples(st.just("load_torch"), st.just(None)))
    if one:
        choices.append(st.tuples(st.just("freeze"), st.sampled_from(FREEZABLE[kind]), st.booleans()))
        choices.append(st.just(("other",)))
        choices.append(st.just(("channels_last",)))
        choices.append(st.tuples(st.just("save_sub"), st.sampled_from(FREEZABLE[kind])))
    if profile == "fp32":
        choices.append(st.tuples(st.just("xload"), st.sampled_from(["fp16>fp32", "bf16>fp16"])))
    return st.one_of(*choices)


# -- tolerances -------------------------------------------------------------------------------
class Tolerance:
    """Per-element bounds on |engine - torch| after one step from identical inputs.

    Both sides evaluate torch.optim's fp32 formulas on the same fp32 inputs (the same weights,
    state and, bitwise, the same gradient); they differ only in how each operation rounds
    (lerp against a multiply-add, addcdiv against a product, FMA contraction, the bias
    correction computed in float64 and rounded once). Each rounding moves its result by at
    most U times that intermediate's magnitude, so a side that rounds r times at magnitudes
    up to M is within r*U*M of the exact value, and two sides within 2*r*U*M of each other.

    Weights, Adam / AdamW (torch: decay multiply, lerp 3, mul + addcmul 3, sqrt, divide,
    add eps, then addcdiv's divide, multiply and add: the roundings that reach the weight are
    the decay, the 5 of the update and the final add, about 5 per side): W_ADAM = 10 units of
    M = max(|w0|, |w1|) + lr * S, S = (beta1 |m0| + (1 - beta1)(|g| + |m0|)) / bc1 / (sqrt(v1) /
    sqrt(bc2) + eps), the update's size before any cancellation in the first moment
    (|g| includes the L2 term wd |w0| for Adam). A step size off by a relative 1.7e-6 (the
    bias corrections in fp32, 1 - powf(beta, step), instead of torch's float64
    1 - beta**step) moves the weight by 1.7e-6 |update| = 28 U |update| > 10 U (|w| + |update|)
    wherever the update is over half the weight, which the large learning rates (0.3, 1.0)
    give nearly every element. An emulation of a correct fused pass (float64 bias
    corrections, (1 - beta) rounded as torch rounds it) stays within 4 units; one that
    computes 1.0f - beta2 in fp32 is 117 units off (v is then 1.3e-5 off).

    Weights, SGD: up to 9 roundings a side (decay multiply-add, momentum multiply-add,
    nesterov multiply-add, lr multiply, add): W_SGD = 18 units of M = max(|w0|, |w1|) +
    lr * (|g| + momentum |b0| + |b1|).

    Optimizer state: exp_avg (lerp / multiply-add: 3 roundings a side at |m0| + G), exp_avg_sq
    (3 a side at beta2 v0 + (1 - beta2) G^2), momentum_buffer (3 a side at momentum |b0| + G),
    where G = |g| + wd |w0| is the gradient term's size before the L2 decay may cancel it:
    S_STATE = 8 units. Step counts are integers: exactly equal.

    Clipping: both sides compute coef = max_norm / (norm + 1e-6) from a norm summed in another
    order; the coefficients' relative difference dc (measured each step, and itself bounded
    by NORM_TERMS: n non-negative squares summed in fp32 are within n*U relative, halved by the
    square root, plus the norm of per-tensor norms and the sqrt and divide) scales the
    gradient, so the weights get 2 dc (|w1 - w0| + lr * S) more (the first and second moments
    both move with it) and the state 2 dc (first moment, buffer) or 4 dc (second moment)
    of the gradient's term.

    Gradients read through p.grad (fp32, one process): the same backward on the same weights,
    accumulated in the same order; bitwise in practice, allowed GRAD = 8 units of the tensor's
    largest element (a differently placed division by grad_accum_steps, accumulated over up
    to 4 micro-batches).

    bf16 (against torch.autocast(bfloat16) with fp32 master weights): both sides round the
    same fp32 master to bf16 (round to nearest even) and run the same bf16 kernels on the
    same bf16 inputs, so the forward and backward are bitwise the same and the fp32 master
    step takes the fp32 tolerance; the engine's bf16 weight must be its master rounded to
    bf16. (The tied model is left out: autograd sums the two uses of a shared bf16 leaf in
    bf16, autocast in fp32, a 2^-9 relative gradient difference that Adam's normalization
    turns into O(lr) on elements with small gradients, so no tolerance below the update holds.)

    Two ranks: gloo sums the two ranks' gradients (a + b, the same either order) and both
    sides divide by 2, which is exact; so the same tolerance as one process.
    """
    W_ADAM = 10
    W_SGD = 18
    S_STATE = 8
    GRAD = 8
    NORM_TERMS = 16

    @staticmethod
    def size_bytes(torch_bytes):
        """torch.save of a submodule's state_dict: the same tensors under the same keys; the
        archive may lay out storages differently (a few records), never the whole model."""
        return torch_bytes + max(96, 0.03 * torch_bytes)


def _f64(t):
    return t.detach().to(torch.float64)


# -- the runner -------------------------------------------------------------------------------
class Runner:
    def __init__(self, prog, rank=0, world=1, tmpdir=None):
        self.p = prog
        self.kind, self.profile = prog["kind"], prog["profile"]
        self.rank, self.world = rank, world
        self.bf16 = self.profile == "bf16"
        self.read_grads = self.profile == "fp32"  # where p.grad is documented to hold the true gradient
        self.tmp = tmpdir
        self.ntmp = 0
        self.log = []

    # -- build ------------------------------------------------------------------------------
    def groups(self, model, extra):
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if self.p["groups"] == "one":
            spec = [(named, {})]
        else:
            spec = [([(n, p) for n, p in named if p.dim() >= 2], {}),
                    ([(n, p) for n, p in named if p.dim() < 2], {"lr": self.p["hp"]["lr"] * 0.5, "weight_decay": 0.0})]
        out = []
        for gi, (ps, over) in enumerate(spec):
            g = {"params": [p for _, p in ps], **over}
            if gi == 0:
                g.update(extra)
            out.append(g)
        return out

    def torch_optimizer(self, groups):
        hp, name = dict(self.p["hp"]), self.p["opt"]
        if name == "sgd":
            return torch.optim.SGD(groups, **hp)
        cls = torch.optim.AdamW if name == "adamw" else torch.optim.Adam
        return cls(groups, **hp)

    def config(self, **over):
        hp = dict(self.p["hp"])
        cfg = dict(precision="bf16" if self.bf16 else "fp32", optimizer=self.p["opt"], clip_grad_norm=self.p["clip"],
                   grad_accum_steps=self.p["accum"], **hp)
        if self.world > 1:
            cfg.update(comm_backend="torch", bucket_mb=1e-4, first_bucket_mb=1e-4, comm_timeout=60.0)
        cfg.update(over)
        return EngineConfig(**cfg)

    def build(self):
        kind, seed = self.kind, self.p["seed"]
        extra = dict(self.p["build_extra"])
        self.tm = make_model(kind, seed)
        self.em = make_model(kind, seed)
        if "amsgrad" in extra:
            # torch builds it; the engine must refuse it, naming amsgrad, and leave the model as it was
            try:
                Engine(self.em, self.config(), param_groups=self.groups(self.em, extra))
            except DOCUMENTED as exc:
                if "amsgrad" not in str(exc):
                    raise Divergence(10, f"Engine(amsgrad=True) raised without naming amsgrad: {exc!r}")
            except Exception as exc:
                raise Divergence(10, f"Engine(amsgrad=True) raised an undocumented {exc!r}")
            else:
                raise Divergence(10, "Engine(param_groups=[{..., 'amsgrad': True}]) was accepted")
            extra.pop("amsgrad")
            self.em = make_model(kind, seed)
        self.extra = extra
        if self.world > 1:
            import torch.distributed as dist
            from torch.nn.parallel import DistributedDataParallel as DDP

            if not dist.is_initialized():
                dist.init_process_group("gloo")
        self.engine = Engine(self.em, self.config(), param_groups=self.groups(self.em, extra))
        self.topt = self.torch_optimizer(self.groups(self.tm, extra))
        self.tnet = DDP(self.tm) if self.world > 1 else self.tm
        self.names = list(self.engine.names)
        self.t_params = dict(self.tm.named_parameters())
        self.e_params = dict(self.em.named_parameters())
        self.build_frozen = [n for n, p in self.tm.named_parameters() if not p.requires_grad]
        self.build_momentum = [g.get("momentum") for g in self.topt.param_groups]
        self.scheds = [self.scheduler(o) for o in (self.topt, self.engine.optimizer)]
        self.big_step = False

    def scheduler(self, opt):
        s, S = self.p["sched"], torch.optim.lr_scheduler
        if s is None:
            return None
        if s == "step":
            return S.StepLR(opt, step_size=2, gamma=0.5)
        if s == "lambda":
            return S.LambdaLR(opt, _lambda_schedule)
        return S.OneCycleLR(opt, max_lr=self.p["hp"]["lr"], total_steps=100, cycle_momentum=s == "onecycle_mom")

    # -- helpers ------------------------------------------------------------------------------
    def engine_call(self, what, fn, row=0):
        """fn() on the engine side: (None, result) or (documented exception, None); an
        undocumented exception fails the program (filed under `row`)."""
        try:
            return None, fn()
        except DOCUMENTED as exc:
            return exc, None
        except Exception as exc:
            raise Divergence(row, f"{what} raised an undocumented {type(exc).__name__}: {exc}") from exc

    def model_snapshot(self, model):
        out = {}
        for n, t in list(model.named_parameters()) + list(model.named_buffers()):
            out[n] = (t.detach().clone(), t.data_ptr(), tuple(t.stride()), t.dtype)
        return out

    def same_model(self, model, snap):
        now = self.model_snapshot(model)
        if set(now) != set(snap):
            return f"parameters changed: {sorted(set(now) ^ set(snap))}"
        for n, (v, ptr, stride, dtype) in snap.items():
            v2, ptr2, stride2, dtype2 = now[n]
            if ptr2 != ptr or stride2 != stride or dtype2 != dtype or not torch.equal(v2, v):
                return (f"{n} changed (data_ptr {ptr}->{ptr2}, strides {stride}->{stride2}, dtype {dtype}->{dtype2}, "
                        f"values equal: {v.shape == v2.shape and torch.equal(v2, v)})")
        return None

    def pending(self):
        """Errors the next train action must raise: [(row, predicate(exc), what)]."""
        out = []
        unfrozen = [n for n in self.build_frozen if self.t_params[n].requires_grad]
        if unfrozen:
            out.append((5, lambda e, u=unfrozen: isinstance(e, UsageError) and any(n in str(e) for n in u),
                        f"unfrozen at build-frozen {unfrozen}"))
        if any(g.get("amsgrad") for g in self.engine.optimizer.param_groups):
            out.append((10, lambda e: isinstance(e, (UsageError, ValueError)) and "amsgrad" in str(e),
                        "amsgrad=True in a param group"))
        return out

    def other_optimizer_step(self, where):
        other = torch.optim.SGD(self.em.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1)
        snap = self.model_snapshot(self.em)
        exc, _ = self.engine_call("another optimizer's step()", other.step, row=3)
        if exc is None:
            raise Divergence(3, f"a second torch.optim.SGD over the engine's parameters stepped ({where}) without "
                                "a UsageError")
        if not isinstance(exc, UsageError):
            raise Divergence(3, f"a second optimizer's step() raised {exc!r}, not a UsageError")
        changed = self.same_model(self.em, snap)
        if changed:
            raise Divergence(3, f"the refused step() of a second optimizer changed the model: {changed}")

    # -- actions ------------------------------------------------------------------------------
    def run(self):
        warnings.simplefilter("ignore")
        self.build()
        for n, act in enumerate(self.p["actions"]):
            self.log.append(act)
            try:
                getattr(self, "act_" + act[0])(*act[1:])
            except StopProgram:
                return self.log
            except Divergence as d:
                raise Divergence(d.row, f"action {n} {act!r}: {d.msg}") from d
        return self.log

    def act_train(self, micros):
        k = len(micros)
        if not any(p.requires_grad for p in self.tm.parameters()):
            # every layer frozen: torch's backward raises too ("does not require grad"); so must the engine's
            batch = make_batch(self.kind, micros[0]["data"], self.rank)
            exc, _ = self.engine_call("engine.backward", lambda: self.engine.backward(
                forward_loss(self.kind, self.em, batch, micros[0]["aux"], torch.bfloat16 if self.bf16 else None)))
            if not isinstance(exc, ValueError) or "does not require grad" not in str(exc):
                raise Divergence(0, f"a backward with every parameter frozen: torch raises, the engine gave {exc!r}")
            raise StopProgram()
        pending = self.pending()
        snap = self.engine.state_dict()
        before = self.model_snapshot(self.em)
        cast = torch.bfloat16 if self.bf16 else None
        step_must_raise = None  # a row: model.zero_grad(set_to_none=True) before the boundary step
        for i, mb in enumerate(micros):
            boundary = i == k - 1
            batch = make_batch(self.kind, mb["data"], self.rank)
            self.hook(mb["top"], top=True, boundary=boundary)
            exc, _ = self.engine_call("engine.backward", lambda: self.engine.backward(
                forward_loss(self.kind, self.em, batch, mb["aux"], cast)))
            if exc is not None:
                return self.refused(exc, pending, None, snap, before, "engine.backward")
            self.torch_backward(batch, mb["aux"], k, last=boundary)
            if self.read_grads:
                self.check_grads()
            must = self.hook(mb["mid"], top=False, boundary=boundary)
            if must:
                step_must_raise = must
            exc, _ = self.engine_call("engine.step", self.engine.step)
            if exc is not None:
                return self.refused(exc, pending, step_must_raise if boundary else None, snap, before, "engine.step")
        if pending:
            row, _, what = pending[0]
            raise Divergence(row, f"{what}: the next backward and step raised nothing")
        if step_must_raise:
            raise Divergence(2, "model.zero_grad(set_to_none=True) between engine.backward and the boundary "
                                "engine.step: the step raised no UsageError (torch would skip every parameter)")
        ctx = self.torch_step()
        self.check_step(ctx)

    def refused(self, exc, pending, step_row, snap, before, where):
        allowed = list(pending)
        if step_row:
            allowed.append((step_row, lambda e: isinstance(e, UsageError), "zero_grad(set_to_none=True) mid-window"))
        if not allowed:
            raise Divergence(0, f"{where} raised {type(exc).__name__}: {exc}")
        if not any(pred(exc) for _, pred, _ in allowed):
            raise Divergence(allowed[0][0], f"{where} raised {exc!r}, expected for: {[w for _, _, w in allowed]}")
        changed = self.same_model(self.em, before)
        if changed:
            raise Divergence(allowed[0][0], f"the refused {where} changed the model: {changed}")
        # the user undoes what was refused; the engine restarts from the state before the action
        for n in self.build_frozen:
            self.t_params[n].requires_grad_(False)
            self.e_params[n].requires_grad_(False)
            self.t_params[n].grad = None
        for g in self.engine.optimizer.param_groups:
            if g.get("amsgrad"):
                g["amsgrad"] = False
        self.tm.zero_grad(set_to_none=True)
        exc2, _ = self.engine_call("engine.load_state_dict", lambda: self.engine.load_state_dict(snap))
        if exc2 is not None:
            raise StopProgram()
        self.compare_exact("after a refused action and a reload of the state before it")

    def hook(self, h, top, boundary):
        """A user call at the top of a micro-batch or between its backward and step. Returns the
        row whose UsageError the coming step must raise, if any."""
        if h is None:
            return None
        if h[0] == "other":
            self.other_optimizer_step("at the top of a micro-batch" if top else "between backward and step")
            return None
        _, target, none = h
        refuse = not top and boundary and none  # torch would skip every parameter at this step
        if self.world > 1 and not top and boundary:
            refuse = True
        fn = (lambda: self.engine.optimizer.zero_grad(set_to_none=none)) if target == "opt" else (
            lambda: self.em.zero_grad(set_to_none=none))
        exc, _ = self.engine_call(f"{target}.zero_grad(set_to_none={none})", fn)
        if exc is not None:
            if not (refuse and isinstance(exc, UsageError)):
                raise Divergence(2, f"{target}.zero_grad(set_to_none={none}) {'at the top' if top else 'mid'} of a "
                                    f"micro-batch raised {exc!r}; torch handles it")
            return None  # refused at the call: the torch side does not clear either
        if refuse and target == "opt":
            raise Divergence(2, f"optimizer.zero_grad(set_to_none={none}) between engine.backward and the boundary "
                                "engine.step raised no UsageError (torch would skip every parameter)")
        if refuse:
            return 2  # model.zero_grad(set_to_none=True): p.grad = None; the step must refuse
        (self.topt.zero_grad if target == "opt" else self.tm.zero_grad)(set_to_none=none)
        return None

    def torch_backward(self, batch, aux, k, last):
        ctx = self.tnet.no_sync() if self.world > 1 and not last else _Null()
        with ctx:
            if self.bf16:
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    loss = forward_loss(self.kind, self.tnet, batch, aux)
            else:
                loss = forward_loss(self.kind, self.tnet, batch, aux)
            (loss / k).backward()

    def torch_step(self):
        """clip_grad_norm_, opt.step(), opt.zero_grad() on the torch side; what the tolerance needs."""
        params = [p for g in self.topt.param_groups for p in g["params"]]
        ctx = {"w0": {n: self.t_params[n].detach().clone() for n in self.names},
               "g": {}, "state0": {}, "coef": None}
        if self.p["clip"] is not None:
            norm_t = float(torch.nn.utils.clip_grad_norm_(params, self.p["clip"]))
            ctx["norm_t"] = norm_t
        for n in self.names:
            p = self.t_params[n]
            ctx["g"][n] = None if p.grad is None else p.grad.detach().clone()
            ctx["state0"][n] = {k: (v.detach().clone() if torch.is_tensor(v) else v)
                                for k, v in self.topt.state.get(p, {}).items()}
        self.topt.step()
        self.topt.zero_grad()
        self.tm.zero_grad(set_to_none=True)
        return ctx

    # -- checks -------------------------------------------------------------------------------
    def check_grads(self):
        for n in self.names:
            pe, pt = self.e_params[n], self.t_params[n]
            ge = pe.grad
            gt = pt.grad
            if gt is None:
                if ge is not None and bool(ge.detach().clone().ne(0).any()):
                    raise Divergence(self.grad_row(), f"p.grad of {n} holds values where torch has none")
                continue
            if ge is None:
                raise Divergence(self.grad_row(), f"p.grad of {n} is None where torch holds a gradient")
            a, b = _f64(ge.detach().clone()), _f64(gt)
            tol = Tolerance.GRAD * U * float(b.abs().max())
            err = float((a - b).abs().max())
            if err > tol:
                ratio = float(a.abs().max() / b.abs().max()) if float(b.abs().max()) > 0 else float("nan")
                raise Divergence(self.grad_row(), f"p.grad of {n} is not the true gradient: max error {err:.3g} > "
                                                  f"{tol:.3g} (engine/torch magnitude {ratio:.6g})")

    def grad_row(self):
        return 8 if getattr(self, "xloaded", False) else 0

    def engine_state(self):
        """The engine's weights (fp32 master) and optimizer state by parameter name."""
        esd = self.engine.optimizer.state_dict()
        by_name = {}
        id2name = {id(p): n for n, p in self.em.named_parameters()}
        for g_sd, g in zip(esd["param_groups"], self.engine.optimizer.param_groups):
            for k, p in zip(g_sd["params"], g["params"]):
                by_name[id2name[id(p)]] = esd["state"].get(k)
        if self.bf16:
            sd = self.engine.state_dict()
            masters = sd["master"]
            if isinstance(masters, dict):
                w = {n: masters[n].reshape(self.e_params[n].shape) for n in self.names}
            else:
                w = {n: m.reshape(self.e_params[n].shape) for n, m in zip(sd["param_names"], masters)}
            for n in self.names:
                half = self.e_params[n].detach()
                if not torch.equal(half, w[n].to(half.dtype)):
                    raise Divergence(0, f"the bf16 weight of {n} is not its fp32 master rounded to bf16")
        else:
            w = {n: self.e_params[n].detach() for n in self.names}
        return w, by_name

    def torch_state(self, n):
        return self.topt.state.get(self.t_params[n], {})

    def group_of(self, n):
        p = self.t_params[n]
        for g in self.topt.param_groups:
            if any(q is p for q in g["params"]):
                return g
        raise KeyError(n)

    def diagnose(self, n, ctx, what):
        """The table row a divergence of parameter n most likely falls under."""
        g = self.group_of(n)
        gt = ctx["g"].get(n) if ctx else None
        if n in self.e_params and not self.e_params[n].requires_grad:
            return 4
        if ctx is not None and gt is None:
            return 6
        if what == "step" and self.big_step:
            return 11
        if self.p["opt"] == "sgd":
            gi = self.topt.param_groups.index(g)
            if g.get("momentum") != self.build_momentum[gi] or what == "momentum_buffer":
                return 1
        if g.get("maximize"):
            return 10
        if self.p["opt"] != "sgd":
            return 12
        return 0

    def check_step(self, ctx):
        w, est = self.engine_state()
        dc = 0.0
        if self.p["clip"] is not None:
            norm_t, norm_e = ctx["norm_t"], self.engine.grad_norm
            nel = sum(self.t_params[n].numel() for n in self.names)
            bound = (nel + 2 * len(self.names) + Tolerance.NORM_TERMS) * U * norm_t
            if abs(norm_e - norm_t) > bound:
                raise Divergence(0, f"engine.grad_norm {norm_e!r} vs clip_grad_norm_'s {norm_t!r}: beyond {bound:.3g}")
            c = self.p["clip"]
            ce, ct = min(1.0, c / (norm_e + 1e-6)), min(1.0, c / (norm_t + 1e-6))
            if ce < 1.0 or ct < 1.0:
                dc = abs(ce - ct) / ct + 2 * U
        for n in self.names:
            self.check_param(n, ctx, w[n], est.get(n), dc)
        self.sync(w, est)

    def check_param(self, n, ctx, we, se, dc):
        pt = self.t_params[n]
        g_t = ctx["g"][n]
        st0, st1 = ctx["state0"][n], self.torch_state(n)
        w0, w1, we = _f64(ctx["w0"][n]), _f64(pt), _f64(we)
        if g_t is None:
            # torch skipped the parameter: weight and state exactly as they were
            if not torch.equal(we, w0):
                raise Divergence(self.diagnose(n, ctx, "weight"),
                                 f"{n} got no gradient (torch leaves it) but the engine moved it by up to "
                                 f"{float((we - w0).abs().max()):.3g}")
            self.check_state(n, se, st1, exact=True, ctx=ctx)
            return
        group = self.group_of(n)
        lr = group["lr"]
        g = _f64(g_t)
        if group.get("maximize"):
            g = -g
        wd = group["weight_decay"]
        if self.p["opt"] == "sgd":
            mom = group["momentum"]
            geff = g.abs() + wd * w0.abs()
            b0 = _f64(st0["momentum_buffer"]).abs() if st0.get("momentum_buffer") is not None else torch.zeros_like(w0)
            b1 = _f64(st1["momentum_buffer"]).abs() if st1.get("momentum_buffer") is not None else geff
            S = geff + mom * b0 + b1
            K = Tolerance.W_SGD
        else:
            b1_, b2_ = group["betas"]
            step = float(st1["step"])
            bc1, bc2 = 1 - b1_ ** step, 1 - b2_ ** step
            geff = g.abs() + (wd * w0.abs() if self.p["opt"] == "adam" else 0)
            m0 = _f64(st0["exp_avg"]).abs() if "exp_avg" in st0 else torch.zeros_like(w0)
            v1 = _f64(st1["exp_avg_sq"])
            S = (b1_ * m0 + (1 - b1_) * (geff + m0)) / bc1 / (v1.sqrt() / math.sqrt(bc2) + group["eps"])
            K = Tolerance.W_ADAM
        scale = torch.maximum(w0.abs(), w1.abs()) + lr * S
        tol = K * U * scale + 2 * dc * ((w1 - w0).abs() + lr * S)
        err = (we - w1).abs()
        bad = err > tol
        if bool(bad.any()):
            i = int(bad.flatten().nonzero()[0])
            ratio = float((err / scale).flatten()[i] / U)
            raise Divergence(self.diagnose(n, ctx, "weight"),
                             f"weight {n}[{i}]: engine {we.flatten()[i].item()!r} torch {w1.flatten()[i].item()!r} "
                             f"(from {w0.flatten()[i].item()!r}, lr {lr}); error {err.flatten()[i].item():.3g} = "
                             f"{ratio:.1f} units of max(|w|) + lr*|update|, allowed {K} (+clip {dc:.2g}); "
                             f"{int(bad.sum())} of {bad.numel()} elements off")
        self.check_state(n, se, st1, exact=False, ctx=ctx, g=g, st0=st0, w0=w0, dc=dc, group=group)

    def check_state(self, n, se, st1, exact, ctx=None, g=None, st0=None, w0=None, dc=0.0, group=None):
        keys = [k for k in ("exp_avg", "exp_avg_sq", "momentum_buffer") if st1.get(k) is not None]
        if "step" in st1 or keys:
            if se is None:
                raise Divergence(self.diagnose(n, ctx, keys[0] if keys else "step"),
                                 f"engine.optimizer.state_dict() has no state for {n}; torch has {sorted(st1)}")
        elif se is not None and "step" in se and self.p["opt"] != "sgd" and float(se["step"]) != 0:
            raise Divergence(self.diagnose(n, ctx, "step"),
                             f"{n} was never updated by torch (no state) but the engine counts step {float(se['step'])}")
        if "step" in st1 and self.p["opt"] != "sgd":
            if "step" not in se or float(se["step"]) != float(st1["step"]):
                raise Divergence(self.diagnose(n, ctx, "step"),
                                 f"step of {n}: engine {float(se['step']) if 'step' in se else None!r}, torch "
                                 f"{float(st1['step'])!r}")
        for k in keys:
            if k not in se or se[k] is None:
                raise Divergence(self.diagnose(n, ctx, k), f"engine state of {n} lacks {k} (torch holds it)")
            a, b = _f64(se[k]).reshape(-1), _f64(st1[k]).reshape(-1)
            if exact:
                if not torch.equal(a, b):
                    raise Divergence(self.diagnose(n, ctx, k), f"{k} of {n} changed where torch kept it: max "
                                                               f"difference {float((a - b).abs().max()):.3g}")
                continue
            gg = g.reshape(-1).abs()
            if self.p["opt"] == "adam":
                gg = gg + group["weight_decay"] * w0.reshape(-1).abs()
            elif self.p["opt"] == "sgd":
                gg = gg + group["weight_decay"] * w0.reshape(-1).abs()
            prev = st0.get(k)
            prev = _f64(prev).reshape(-1).abs() if prev is not None else torch.zeros_like(b)
            if k == "exp_avg":
                tol = Tolerance.S_STATE * U * (prev + gg) + 2 * dc * gg
            elif k == "exp_avg_sq":
                # every term is positive, but the gradient's own terms may cancel (g + wd*w): its
                # rounding is relative to G = |g| + wd |w|, so v's is relative to beta2 v0 + (1 - beta2) G^2
                b2 = group["betas"][1]
                tol = Tolerance.S_STATE * U * (b2 * prev + (1 - b2) * gg * gg) + 4 * dc * (1 - b2) * gg * gg
            else:
                tol = Tolerance.S_STATE * U * (group["momentum"] * prev + gg) + 2 * dc * gg
            err = (a - b).abs()
            bad = err > tol
            if bool(bad.any()):
                i = int(bad.nonzero()[0])
                rel = float(err[i] / b[i].abs()) if float(b[i]) != 0 else float("inf")
                raise Divergence(self.diagnose(n, ctx, k), f"{k} of {n}[{i}]: engine {a[i].item()!r} torch "
                                                           f"{b[i].item()!r} (relative {rel:.3g})")

    def sync(self, w, est):
        """The torch side continues from the engine's weights and state (not its step counts)."""
        with torch.no_grad():
            for n in self.names:
                self.t_params[n].copy_(w[n].to(torch.float32).view_as(self.t_params[n]))
                st = self.torch_state(n)
                se = est.get(n) or {}
                for k in ("exp_avg", "exp_avg_sq", "momentum_buffer"):
                    if st.get(k) is not None and se.get(k) is not None:
                        st[k].copy_(se[k].view_as(st[k]))

    def compare_exact(self, when):
        """Nothing was updated: the engine holds exactly what torch holds."""
        w, est = self.engine_state()
        for n in self.names:
            if not torch.equal(_f64(w[n]), _f64(self.t_params[n])):
                raise Divergence(0, f"{when}: the weight {n} changed")
            try:
                self.check_state(n, est.get(n), self.torch_state(n), exact=True)
            except Divergence as d:
                raise Divergence(d.row, f"{when}: {d.msg}") from None

    # -- the other actions ----------------------------------------------------------------------
    def act_set(self, gi, key, value):
        eg, tg = self.engine.optimizer.param_groups[gi], self.topt.param_groups[gi]
        eg[key] = value
        if key != "amsgrad":  # torch cannot switch amsgrad on over existing state; the engine must refuse it
            tg[key] = value

    def act_sched(self):
        for s in self.scheds:
            s.step()
        for eg, tg in zip(self.engine.optimizer.param_groups, self.topt.param_groups):
            for k in ("lr", "momentum", "betas"):
                if k in tg and eg.get(k) != tg[k]:
                    raise Divergence(0, f"the scheduler wrote {k}={eg.get(k)!r} to the engine, {tg[k]!r} to torch")

    def act_freeze(self, name, flag):
        self.tm.get_submodule(name).requires_grad_(flag)
        self.em.get_submodule(name).requires_grad_(flag)

    def act_other(self):
        self.other_optimizer_step("between updates")

    def act_roundtrip(self, how):
        if how == "engine":
            buf = io.BytesIO()
            torch.save(self.engine.state_dict(), buf)
            buf.seek(0)
            sd = torch.load(buf, weights_only=False)
            fn = lambda: self.engine.load_state_dict(sd)
        elif how == "optimizer":
            sd = copy.deepcopy(self.engine.optimizer.state_dict())
            fn = lambda: self.engine.optimizer.load_state_dict(sd)
        else:
            path = self.tmp_path()

            def fn():
                return self.engine.load(self.engine.save(path))
        exc, _ = self.engine_call(f"{how} state round trip", fn)
        if exc is not None:
            raise Divergence(0, f"the {how} state round trip raised {exc!r}")
        self.compare_exact(f"after the {how} state round trip")

    def act_load_torch(self, step):
        sd = copy.deepcopy(self.topt.state_dict())
        if step is not None:
            for entry in sd["state"].values():
                # a count beyond fp32's 2**24 needs a wider tensor; torch counts on in its dtype
                entry["step"] = torch.tensor(float(step), dtype=torch.float64 if step > 2 ** 24 else torch.float32)
            if sd["state"] and step > 2 ** 24:
                self.big_step = True
        self.topt.load_state_dict(copy.deepcopy(sd))
        exc, _ = self.engine_call("engine.optimizer.load_state_dict(torch's)",
                                  lambda: self.engine.optimizer.load_state_dict(copy.deepcopy(sd)))
        if exc is not None:
            raise Divergence(11 if step and step > 2 ** 24 else 0,
                             f"loading torch.optim's state_dict into the engine raised {exc!r}")
        self.compare_exact("after loading torch.optim's state_dict")

    def act_channels_last(self):
        snap = self.model_snapshot(self.em)
        four_d = any(p.dim() == 4 for p in self.em.parameters())
        exc, _ = self.engine_call("model.to(memory_format=torch.channels_last)",
                                  lambda: self.em.to(memory_format=torch.channels_last), row=7)
        changed = self.same_model(self.em, snap)
        if exc is not None:
            if not isinstance(exc, UsageError):
                raise Divergence(7, f"model.to(memory_format=channels_last) raised {exc!r}, not a UsageError")
            if changed:
                raise Divergence(7, f"the refused model.to(memory_format=channels_last) changed the model: {changed}")
            return
        if four_d:
            raise Divergence(7, "model.to(memory_format=channels_last) on a model with 4-D weights raised no "
                                f"UsageError ({changed or 'the model looks unchanged'})")
        if changed:
            raise Divergence(7, f"model.to(memory_format=channels_last) (a no-op for torch) changed the model: {changed}")
        self.tm.to(memory_format=torch.channels_last)

    def act_save_sub(self, name):
        sizes = []
        for m in (self.tm, self.em):
            buf = io.BytesIO()
            torch.save(m.get_submodule(name).state_dict(), buf)
            sizes.append(len(buf.getvalue()))
        if sizes[1] > Tolerance.size_bytes(sizes[0]):
            raise Divergence(13, f"torch.save(model.{name}.state_dict()) wrote {sizes[1]} B, torch {sizes[0]} B")

    def donor_model(self):
        """A fresh model with the engine's current weights and the engine's trainable set."""
        m = make_model(self.kind, self.p["seed"])
        m.load_state_dict({k: v.detach().float().clone() for k, v in self.em.state_dict().items()})
        for n, p in m.named_parameters():
            p.requires_grad_(n in self.names)
        return m

    def act_xload(self, how):
        if how == "fp16>fp32":
            dm = self.donor_model()
            donor = Engine(dm, self.config(precision="fp16", initial_loss_scale=2.0 ** 12), param_groups=self.groups(dm, self.extra))
            donor.optimizer.load_state_dict(copy.deepcopy(self.engine.optimizer.state_dict()))
            path = donor.save(self.tmp_path())
            donor.close()
            exc, _ = self.engine_call("engine.load(an fp16 engine's checkpoint)", lambda: self.engine.load(path), row=8)
            if exc is not None:
                raise Divergence(8, f"an fp32 engine refused an fp16 engine's checkpoint: {exc!r}")
            self.xloaded = True
            if self.engine.loss_scale != 1.0:
                raise Divergence(8, f"an fp32 engine imported the fp16 loss scale {self.engine.loss_scale}")
            self.compare_exact("after loading an fp16 engine's checkpoint of the same state")
            return
        # bf16 -> fp16, on engines beside the one under test
        src_m = self.donor_model()
        src = Engine(src_m, self.config(precision="bf16", clip_grad_norm=None, grad_accum_steps=1),
                     param_groups=self.groups(src_m, self.extra))
        for j, scale in enumerate((1.0, float("inf"))):
            batch = make_batch(self.kind, 1000 + j)
            src.backward(forward_loss(self.kind, src_m, batch, False, torch.bfloat16) * scale)
            src.step()
        path = src.save(self.tmp_path())
        dst_m = self.donor_model()
        init = 2.0 ** 10
        dst = Engine(dst_m, self.config(precision="fp16", clip_grad_norm=None, grad_accum_steps=1,
                                        initial_loss_scale=init), param_groups=self.groups(dst_m, self.extra))
        exc, _ = self.engine_call("engine.load(a bf16 checkpoint)", lambda: dst.load(path), row=9)
        try:
            if exc is not None:
                raise Divergence(9, f"an fp16 engine refused a bf16 engine's checkpoint: {exc!r}")
            if dst.loss_scale != init:
                raise Divergence(9, f"an fp16 engine loading a bf16 checkpoint has loss scale {dst.loss_scale}, not its "
                                    f"initial_loss_scale {init}")
            if dst.skipped_steps != src.skipped_steps:
                raise Divergence(9, f"skipped steps {dst.skipped_steps} after loading a checkpoint with "
                                    f"{src.skipped_steps}")
            a, b = src.optimizer.state_dict(), dst.optimizer.state_dict()
            for k, entry in a["state"].items():
                for key, v in entry.items():
                    if torch.is_tensor(v) and not torch.equal(v.double(), b["state"][k][key].double()):
                        raise Divergence(9, f"optimizer state {k}.{key} differs after loading the bf16 checkpoint")
        finally:
            src.close()
            dst.close()

    def tmp_path(self):
        self.ntmp += 1
        return os.path.join(self.tmp, f"ckpt{self.ntmp}")

    def close(self):
        eng = getattr(self, "engine", None)
        if eng is not None:
            eng.close()


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def run_program(prog, rank=0, world=1, tmpdir=None):
    """Plays one program; raises Divergence on the first difference from the oracle."""
    own = tmpdir is None
    tmpdir = tmpdir or tempfile.mkdtemp(prefix="pe-fuzz-")
    os.makedirs(tmpdir, exist_ok=True)
    r = Runner(prog, rank, world, tmpdir)
    try:
        return r.run()
    finally:
        r.close()
        if own:
            shutil.rmtree(tmpdir, ignore_errors=True)


def ddp_rank(rank, world, progs, tmpdir):
    """Runs programs on this rank; stops at the first failure on any rank (all ranks agree
    after every program, so none waits in a collective for a rank that stopped)."""
    import torch.distributed as dist

    for i, prog in enumerate(progs):
        err = None
        try:
            run_program(prog, rank, world, os.path.join(tmpdir, f"p{i}"))
        except Exception as exc:
            err = f"{type(exc).__name__}: {exc}"
        if not dist.is_initialized():
            dist.init_process_group("gloo")
        errs = [None] * world
        dist.all_gather_object(errs, err)
        if any(errs):
            return {"failed": i, "program": prog, "errors": errs}
    return {"failed": None}
