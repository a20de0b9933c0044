"""The loss scaler: its whole state lives on the device and is updated there.

Note: reading the scale, the skip counts or the last step's flag from Python is the only
host-device sync, and it is lazy. To notice a run of skipped steps without syncing, the
state is copied into pinned host memory after each update (non-blocking) and that copy is
read at the next step once its event has completed, one step late.
"""
import torch

from . import ops

SCALE, INV_SCALE, GROWTH_TRACKER, HYSTERESIS_LEFT, SKIPPED_TOTAL, CONSECUTIVE_SKIPS, LAST_FOUND = range(7)


class LossScaler:
    def __init__(self, cfg, device):
        self.cfg = cfg
        self.device = torch.device(device)
        if cfg.precision != "fp16":
            initial, self.dynamic = 1.0, False
        elif cfg.loss_scale == "dynamic":
            initial, self.dynamic = float(cfg.initial_loss_scale), True
        else:
            initial, self.dynamic = float(cfg.loss_scale), False
        self.state = ops.new_loss_scale_state(initial, cfg.hysteresis, self.device)
        pin = self.device.type == "cuda"
        self._host = torch.zeros(ops.LOSS_SCALE_STATE_SIZE, pin_memory=pin)
        self._event = torch.cuda.Event() if pin else None

    @property
    def scale_tensor(self):
        return self.state[SCALE:SCALE + 1]

    @property
    def inv_scale_tensor(self):
        return self.state[INV_SCALE:INV_SCALE + 1]

    def update(self, found_inf):
        c = self.cfg
        if self.dynamic:
            ops.update_loss_scale(self.state, found_inf, growth_factor=2.0, backoff_factor=0.5,
                                  growth_interval=c.loss_scale_window, hysteresis=c.hysteresis,
                                  min_scale=c.min_loss_scale, max_scale=c.max_loss_scale,
                                  consecutive_hysteresis=c.consecutive_hysteresis)
        else:  # fixed scale (x1 either way): only the skip counters move
            ops.update_loss_scale(self.state, found_inf, growth_factor=1.0, backoff_factor=1.0,
                                  growth_interval=2**30, hysteresis=1, min_scale=1e-30, max_scale=3e38)
        if self._event is not None:
            self._host.copy_(self.state, non_blocking=True)
            self._event.record()

    def lagged_consecutive_skips(self):
        """Consecutive skipped steps as of the last completed update, without a sync."""
        if self._event is None:
            return int(self.state[CONSECUTIVE_SKIPS])
        if not self._event.query():
            return 0
        return int(self._host[CONSECUTIVE_SKIPS])

    def value(self, slot):
        return float(self.state[slot])

    def state_dict(self):
        return {"state": self.state.cpu().clone(), "dynamic": self.dynamic}

    def load_state_dict(self, sd):
        self.state.copy_(sd["state"].to(self.state.device))
