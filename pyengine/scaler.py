"""The loss scaler: its whole state lives in StepScalars and is updated on the device.

Note: reading the scale or the skip counts from Python is the only host-device sync, and it
is lazy. To notice a long run of skipped steps without a sync (and without an event query,
which a CUDA graph cannot capture), the step's native call copies the state into pinned host
memory after every update, and the engine reads it there; the copy may be a step or two
behind, which only delays the error that max_consecutive_skips raises.
"""
import torch

from . import ops
from .scalars import LOSS_SCALE_SLOTS, LOSS_SCALE_STATE_SIZE


class LossScaler:
    def __init__(self, cfg, scalars, mod):
        self.scalars = scalars
        self.precision = cfg.precision
        if cfg.precision != "fp16":
            initial, self.dynamic = 1.0, False
        elif cfg.loss_scale == "dynamic":
            initial, self.dynamic = float(cfg.initial_loss_scale), True
        else:
            initial, self.dynamic = float(cfg.loss_scale), False
        self.active = cfg.precision == "fp16" and initial != 1.0 or self.dynamic
        self._initial = (initial, cfg.hysteresis)
        scalars.reset_loss_scale(initial, cfg.hysteresis)
        if self.dynamic:
            self.config = ops.loss_scale_config(mod, 2.0, 0.5, cfg.min_loss_scale, cfg.max_loss_scale,
                                                cfg.loss_scale_window, cfg.hysteresis, cfg.consecutive_hysteresis)
        else:  # a fixed scale (x1 either way): only the skip counters move
            self.config = ops.loss_scale_config(mod, 1.0, 1.0, 1e-30, 3e38, 2**30, 1, False)
        cuda = scalars.tensor.device.type == "cuda"
        # On a GPU the step's native call copies the state here (pinned host memory it writes
        # through the unified address space: no event, no torch op, capturable in a CUDA graph).
        self.host_mirror = torch.zeros(LOSS_SCALE_STATE_SIZE, pin_memory=True) if cuda else None
        # a numpy view of host memory: reading one float costs no torch op
        self._host_view = (self.host_mirror if cuda else scalars.loss_scale_state).numpy()
        self._consecutive = LOSS_SCALE_SLOTS["consecutive_skips"]

    @property
    def scale_tensor(self):
        return self.scalars.scale

    @property
    def inv_scale_tensor(self):
        return self.scalars.inv_scale

    def lagged_consecutive_skips(self) -> int:
        """Consecutive skipped steps, without a sync (on a GPU, as of a recent update)."""
        return int(self._host_view[self._consecutive])

    def value(self, name) -> float:
        return float(getattr(self.scalars, name))

    def state_dict(self):
        return {"state": self.scalars.loss_scale_state.cpu().clone(), "dynamic": self.dynamic,
                "precision": self.precision}

    def load_state_dict(self, sd, saved_precision=None):
        """Loads a saved scaler state. Note: the scale belongs to the precision it was found
        for: an fp16 scale imported into an fp32 or bf16 engine would multiply its gradients,
        and bf16's scale of 1 would let an fp16 engine's gradients underflow. So the scale, its
        growth tracker and hysteresis are taken only from an fp16 checkpoint into an fp16
        engine; otherwise the engine keeps its own starting values and carries the skipped-step
        count (so global_step stays right)."""
        saved = sd.get("precision", saved_precision)
        state = sd["state"].to(self.scalars.tensor.device)
        if saved is not None and (saved == "fp16") != (self.precision == "fp16"):
            k = LOSS_SCALE_SLOTS["skipped_total"]
            skipped = state[k].clone()
            self.scalars.reset_loss_scale(*self._initial)
            state = self.scalars.loss_scale_state.clone()
            state[k] = skipped
        self.scalars.loss_scale_state.copy_(state)
        if self.host_mirror is not None:
            self.host_mirror.copy_(state.cpu())
