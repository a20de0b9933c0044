"""Loss-scale update on the device: growth, backoff, hysteresis (DeepSpeed's rules), bounds."""
import torch

from pyengine import ops


class RefScaler:
    """DeepSpeed DynamicLossScaler.update_scale, transcribed as the reference."""

    def __init__(self, scale, window, hysteresis, min_scale, consecutive=False):
        self.scale, self.window, self.delayed, self.min = scale, window, hysteresis, min_scale
        self.cur_hyst, self.consecutive = hysteresis, consecutive
        self.cur_iter, self.last_overflow = 0, -1

    def update(self, overflow):
        if overflow:
            if self.delayed == 1 or self.cur_hyst == 1:
                self.scale = max(self.scale / 2, self.min)
            else:
                self.cur_hyst -= 1
            self.last_overflow = self.cur_iter
        else:
            if self.consecutive:
                self.cur_hyst = self.delayed
            if (self.cur_iter - self.last_overflow) % self.window == 0:
                if not self.consecutive:
                    self.cur_hyst = self.delayed
                self.scale *= 2
        self.cur_iter += 1


def run(pattern, window=3, hysteresis=2, consecutive=False, min_scale=1.0, initial=2.0**10):
    state = ops.new_loss_scale_state(initial, hysteresis, "cpu")
    ref = RefScaler(initial, window, hysteresis, min_scale, consecutive)
    flag = torch.zeros(1)
    for i, overflow in enumerate(pattern):
        flag.fill_(1.0 if overflow else 0.0)
        ops.update_loss_scale(state, flag, growth_interval=window, hysteresis=hysteresis, min_scale=min_scale,
                              max_scale=2.0**100,
                              consecutive_hysteresis=consecutive)
        ref.update(overflow)
        assert state[0].item() == ref.scale, f"step {i}: {state[0].item()} vs {ref.scale}"
        assert state[1].item() == 1.0 / ref.scale
    return state


def test_growth_after_window_of_clean_steps():
    state = run([0] * 7, window=3)
    assert state[0].item() == 2.0**12


def test_hysteresis_delays_backoff():
    run([1, 1, 1, 0, 0, 0, 1, 1, 0, 1], window=3, hysteresis=2)
    run([1, 0, 1, 1, 0, 0, 0, 0, 1, 1, 1], window=4, hysteresis=3)


def test_consecutive_hysteresis_resets_on_clean_step():
    run([1, 0, 1, 0, 1, 1, 0, 0, 0, 1], window=5, hysteresis=2, consecutive=True)


def test_random_patterns_against_reference():
    g = torch.Generator().manual_seed(torch.seed() % 2**31)
    for _ in range(20):
        pattern = (torch.rand(60, generator=g) < 0.3).tolist()
        run(pattern, window=int(torch.randint(1, 6, (1,), generator=g)),
            hysteresis=int(torch.randint(1, 4, (1,), generator=g)))


def test_never_below_min_and_counts_skips():
    state = run([1] * 20, window=3, hysteresis=1, min_scale=4.0, initial=64.0)
    assert state[0].item() == 4.0
    assert state[4].item() == 20 and state[5].item() == 20
    flag = torch.zeros(1)
    ops.update_loss_scale(state, flag, growth_interval=3, hysteresis=1)
    assert state[5].item() == 0 and state[4].item() == 20


def test_max_scale_caps_growth():
    state = ops.new_loss_scale_state(2.0**23, 1, "cpu")
    flag = torch.zeros(1)
    for _ in range(5):
        ops.update_loss_scale(state, flag, growth_interval=1, hysteresis=1, max_scale=2.0**24)
    assert state[0].item() == 2.0**24
