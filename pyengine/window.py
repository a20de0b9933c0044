"""Window: the state of one accumulation window, from the first micro-batch's backward to the
boundary step, written by the StepPipeline (step.py) and reset by one reset(); the one other
write is forget(), when a user clears gradients to None (grads.py).

Note: everything that changes between two boundary steps lives here and nowhere else: how
many micro-batches ran, whether a backward waits for its step, whether the boundary
micro-batch's gradients are being communicated, whether any gradient has been accumulated
since the last clear, and which parameters received a gradient. Readers (the gradient
guard, the optimizer facade, checkpoints) ask the window; none of them writes it. A step, an
aborted backward and a checkpoint load end the window with reset(); the boundary count is
the one thing that survives it.
"""


class Window:
    def __init__(self, accum_steps: int, n_params: int):
        self.accum_steps = accum_steps
        self.n_params = n_params
        self.boundaries = 0  # boundary steps taken (host count; the device keeps its own)
        self.used = bytearray(n_params)  # 1: parameter i received a gradient in this window
        self._none_used = bytes(n_params)
        self.in_backward = False  # inside engine.backward()'s autograd call
        self.reset()

    def reset(self):
        """A fresh window: nothing accumulated, nothing pending."""
        self.micro = 0  # step() calls since the last boundary
        self.backward_pending = False  # a backward ran and waits for its step()
        self.in_flight = False  # the boundary micro-batch's gradients are being communicated
        self.dirty = False  # some micro-batch accumulated since the last clear
        self.used[:] = self._none_used  # in place: the gradient hooks hold its __setitem__

    # -- what readers ask ----------------------------------------------------------------------
    @property
    def next_is_boundary(self) -> bool:
        """The next step() (or the pending one) ends the window."""
        return self.micro + 1 == self.accum_steps

    @property
    def boundary_pending(self) -> bool:
        """The boundary micro-batch's backward ran; its step() has not: clearing a gradient to
        None now would make PyTorch skip that parameter."""
        return self.backward_pending and self.next_is_boundary

    # -- the pipeline's writes -------------------------------------------------------------------
    def begin_backward(self):
        self.dirty = self.in_backward = True

    def end_backward(self, communicating: bool):
        self.in_backward = False
        self.backward_pending = True
        self.in_flight = communicating

    def abort_backward(self):
        """A backward failed part-way: its gradients are partial, the window starts again
        (the pipeline clears what it had accumulated: GradGuard.discard)."""
        self.in_backward = False
        self.reset()

    def forget(self, indices):
        """Gradients cleared to None: those parameters have received nothing in this window."""
        used = self.used
        for i in indices:
            used[i] = 0

    def end_micro_step(self) -> bool:
        """step() of a micro-batch; True when it is the boundary."""
        self.backward_pending = False
        self.micro += 1
        return self.micro == self.accum_steps

    def end_boundary(self):
        self.boundaries += 1
        self.reset()
