"""One optimizer step at the accumulation boundary, as data flows.

    finish communication -> norm and non-finite check -> clip -> optimizer -> loss scale -> result

Every stage is a native call on pointers the step plan resolved once (plan.py); nothing here
waits for the device. Under data parallel the norm and the check ran per bucket, right after
each bucket's allreduce (ddp/reducer.py), so the first stage only folds their rows.
"""
import torch

from .plan import current_stream


class StepResult:
    """What engine.step() returns: truthy when the parameters were updated.

    Note: whether a boundary step was skipped for non-finite gradients is known only on the
    device; bool() reads it (one sync), so a loop that ignores the result never waits. The
    result watches the step's live flag and copies it only if it is still held when the
    next boundary step begins (engine.step() calls freeze()), so the common loop, which drops
    it at once, costs no copy.
    """

    def __init__(self, boundary, flag=None):
        self.boundary = boundary
        self._flag = flag
        self._frozen = flag is None

    def freeze(self):
        """Keep this step's flag: the engine is about to overwrite the live one."""
        if not self._frozen:
            self._flag, self._frozen = self._flag.clone(), True

    def __bool__(self):
        return self.boundary and float(self._flag) == 0.0

    @property
    def skipped(self):
        return self.boundary and float(self._flag) != 0.0

    @property
    def flag(self):
        """The non-finite flag as a device tensor (1 when skipped), for logging without a sync."""
        self.freeze()
        return self._flag

    def __repr__(self):
        return f"StepResult(boundary={self.boundary}, updated={bool(self)})"


def boundary_step(plan, scalars, optimizer, scaler, reducer) -> StepResult:
    stream = current_stream(plan.device)
    # 1. communication done: each bucket's rows (sumsq, found_inf) -> the step's scalars, in a
    #    fixed order (deterministic); one process: the read-only norm and check pass instead.
    if reducer is not None:
        rows = reducer.finish()
        torch.sum(rows[:, 0], dim=0, keepdim=True, out=scalars.sumsq)
        torch.amax(rows[:, 1], dim=0, keepdim=True, out=scalars.found_inf)
    else:
        plan.norm(stream)
    # 2. clip: grad_norm = sqrt(sumsq); grad_coef = 1/loss_scale x min(1, max_norm / grad_norm)
    plan.clip(stream)
    # 3. one fused pass per param group: grad x grad_coef, skipped on the device when
    #    found_inf is set, fp32 master + state updated, half model copy written, grad cleared.
    #    Through optimizer.step(), so LR schedulers see the step.
    optimizer._update = lambda: plan.update(stream)
    try:
        optimizer.step()
    finally:
        optimizer._update = None
    # 4. loss scale: grow, back off (hysteresis) or keep; skip counters
    scaler.update(stream)
    # 5. gradients cleared where the optimizer pass read another buffer
    plan.zero_grads(stream)
    return StepResult(True, scalars.found_inf)
