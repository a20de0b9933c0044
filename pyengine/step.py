"""One optimizer step at the accumulation boundary, as data flows.

    finish communication -> non-finite check and norm -> clip -> loss scale -> optimizer -> result

Every stage is a native call on pointers the step plan resolved once (plan.py); nothing here
waits for the device. Under data parallel the check and the norm ran per bucket, right after
each bucket's allreduce (ddp/reducer.py), and the second stage folds their rows.

Note: the loss-scale update needs only the step's flag, and the optimizer reads only the
multiplier computed just before it (grad_coef, with the scale these gradients were made
with), so the update runs in the same native call as the norm and the clip, ahead of the
optimizer passes: one call where there were four.
"""


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


def boundary_step(plan, scalars, optimizer, reducer) -> StepResult:
    stream = plan.stream()
    # 1. communication done: every bucket allreduced and checked, its (sumsq, found_inf) row written
    if reducer is not None:
        reducer.finish()
    # 2-4. found_inf and sumsq (read-only pass, or the rows in a fixed order: deterministic),
    #      grad_norm and grad_coef = 1/loss_scale x min(1, max_norm / grad_norm), loss scale
    plan.step_scalars(stream)
    # 5. one fused pass per param group: grad x grad_coef, skipped on the device when
    #    found_inf is set, fp32 master + state updated, half model copy written, grad cleared.
    #    Through optimizer.step(), so LR schedulers see the step.
    optimizer._update = lambda: plan.update(stream)
    try:
        optimizer.step()
    finally:
        optimizer._update = None
    # 6. gradients cleared where the optimizer pass read another buffer
    plan.zero_grads(stream)
    return StepResult(True, scalars.found_inf)
