"""StepScalars: the step's named device scalars, in one float32 tensor.

Note: the flag, the sum of squares, the norm, the gradient multiplier and the loss-scale
state live in device memory so that no op has to wait for the host. They share one tensor
whose slot numbers come from the compiled core (STEP_SLOTS, LOSS_SCALE_SLOTS), so Python,
C++ and CUDA cannot disagree on where a value lives. Reading one from Python is a host sync
and happens only when a user asks (engine.loss_scale, engine.grad_norm, ...).
"""
import torch

from . import _native

STEP_SLOTS = dict(_native._C.STEP_SLOTS)
STEP_SLOT_COUNT = int(_native._C.STEP_SLOT_COUNT)
LOSS_SCALE_SLOTS = dict(_native._C.LOSS_SCALE_SLOTS)
LOSS_SCALE_STATE_SIZE = int(_native._C.LOSS_SCALE_STATE_SIZE)


class StepScalars:
    """[found_inf, sumsq, grad_norm, grad_coef | loss-scale state] on one device.

    Each name is a one-element view (`scalars.found_inf`, `scalars.scale`, ...);
    `norm_and_coef` is the two-slot output of the clip kernel and `loss_scale_state` the
    loss-scale block the update kernel works on.
    """

    def __init__(self, device, initial_scale: float, hysteresis: int):
        self.tensor = torch.zeros(STEP_SLOT_COUNT + LOSS_SCALE_STATE_SIZE, dtype=torch.float32, device=device)
        self.loss_scale_state = self.tensor[STEP_SLOT_COUNT:]
        for name, slot in STEP_SLOTS.items():
            setattr(self, name, self.tensor[slot:slot + 1])
        # boundary steps taken (applied or skipped): an exact int64 count on the device
        self.boundaries = torch.zeros(1, dtype=torch.int64, device=device)
        for name, slot in LOSS_SCALE_SLOTS.items():
            setattr(self, name, self.loss_scale_state[slot:slot + 1])
        flag, norm = STEP_SLOTS["found_inf"], STEP_SLOTS["grad_norm"]
        assert STEP_SLOTS["grad_coef"] == norm + 1, "clip_coef writes (norm, coef) side by side"
        assert STEP_SLOTS["sumsq"] == flag + 1, "the step clears (found_inf, sumsq) together"
        self.norm_and_coef = self.tensor[norm:norm + 2]
        self.flag_and_sumsq = self.tensor[flag:flag + 2]
        self.reset_loss_scale(initial_scale, hysteresis)

    def reset_loss_scale(self, scale: float, hysteresis: int):
        state = [0.0] * LOSS_SCALE_STATE_SIZE
        state[LOSS_SCALE_SLOTS["scale"]] = float(scale)
        state[LOSS_SCALE_SLOTS["inv_scale"]] = 1.0 / float(scale)
        state[LOSS_SCALE_SLOTS["hysteresis_left"]] = float(hysteresis)
        self.loss_scale_state.copy_(torch.tensor(state, dtype=torch.float32))

    def ptr(self, name: str) -> int:
        """Device address of a slot (resolved once by the step plan)."""
        return getattr(self, name).data_ptr()
