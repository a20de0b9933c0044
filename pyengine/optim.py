"""Fused optimizers over flat buffers, as torch.optim.Optimizer subclasses.

Note: param_groups hold the user's parameters and hyper-parameters exactly as in torch, so
torch.optim.lr_scheduler works unchanged; an lr change takes effect at the next step since
every step reads the group's values. The update itself runs once per group over the group's
contiguous range of the flat buffers: one pass that reads the gradient, multiplies it by the
device-resident (1/loss_scale x clip coefficient), skips everything when the non-finite flag
is set, updates fp32 master weights and state, and writes the half-precision model copy.
"""
import torch

from . import ops

_GROUP_KEYS = {
    "adamw": ("lr", "betas", "eps", "weight_decay"),
    "adam": ("lr", "betas", "eps", "weight_decay"),
    "sgd": ("lr", "momentum", "dampening", "weight_decay", "nesterov"),
}


class FusedOptimizer(torch.optim.Optimizer):
    """Adam / AdamW / SGD over an Engine's FlatBuffers. Built by the Engine."""

    def __init__(self, kind, buffers, group_options, defaults, grad_source, found_inf, grad_scale):
        self.kind = kind
        self.buffers = buffers
        # callable: group index -> (flat gradient range to read, whether to clear it in the pass)
        self._grad_source = grad_source
        self._found_inf = found_inf
        self._grad_scale = grad_scale
        groups = []
        for g, opts in zip(buffers.groups, group_options):
            groups.append({"params": list(g.params), **opts})
        super().__init__(groups, {k: defaults[k] for k in _GROUP_KEYS[kind]})
        self._alloc_state()

    def _alloc_state(self):
        dev, n = self.buffers.device, self.buffers.numel
        if self.kind == "sgd":
            need_buf = any(g["momentum"] > 0 for g in self.param_groups)
            self.flat_state = {"momentum_buffer": torch.zeros(n, device=dev)} if need_buf else {}
        else:
            self.flat_state = {"exp_avg": torch.zeros(n, device=dev), "exp_avg_sq": torch.zeros(n, device=dev)}
        self.steps = [torch.zeros(1, device=dev) for _ in self.param_groups]

    @property
    def state_floats(self) -> int:
        return len(self.flat_state)

    def add_param_group(self, param_group):
        if getattr(self, "buffers", None) is not None and len(self.param_groups) >= len(self.buffers.groups):
            raise RuntimeError("FusedOptimizer: param groups are fixed when the Engine is built; "
                               "pass every group to Engine(..., param_groups=...)")
        super().add_param_group(param_group)

    def zero_grad(self, set_to_none=True):
        self.buffers.zero_grad()

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise ValueError("FusedOptimizer.step: closures are not supported; call engine.step()")
        fb = self.buffers
        for gi, (group, rng) in enumerate(zip(self.param_groups, fb.groups)):
            if rng.numel == 0:
                continue
            s, e = rng.start, rng.end
            master = fb.master_flat[s:e]
            model = None if fb.master_flat is fb.param_flat else fb.param_flat[s:e]
            grad, zero = self._grad_source(gi)
            common = dict(grad_scale=self._grad_scale, found_inf=self._found_inf, model=model, zero_grad=zero)
            if self.kind == "sgd":
                buf = self.flat_state.get("momentum_buffer")
                ops.sgd_step(master, grad, self.steps[gi], lr=group["lr"], momentum=group["momentum"],
                             dampening=group["dampening"], weight_decay=group["weight_decay"],
                             nesterov=group["nesterov"], momentum_buf=None if buf is None else buf[s:e], **common)
            else:
                ops.adam_step(master, self.flat_state["exp_avg"][s:e], self.flat_state["exp_avg_sq"][s:e], grad,
                              self.steps[gi], lr=group["lr"], betas=tuple(group["betas"]), eps=group["eps"],
                              weight_decay=group["weight_decay"], decoupled=self.kind == "adamw", **common)

    # Checkpoints: per parameter (by index in the engine's canonical order), so they stay valid
    # when the layout changes (bucket rebuild) or the world size does.
    def flat_state_per_param(self, params):
        out = []
        for p in params:
            out.append({k: self.buffers._slice(v, p).clone() for k, v in self.flat_state.items()})
        return out

    def load_flat_state_per_param(self, params, states):
        for p, st in zip(params, states):
            for k, v in self.flat_state.items():
                if k not in st:
                    raise ValueError(f"optimizer state for a parameter lacks {k!r} (saved with another optimizer?)")
                self.buffers._slice(v, p).copy_(st[k].reshape(-1))
