"""StepGraph: one training step (forward, engine.backward, engine.step) captured in a CUDA
graph and replayed, for models small enough that launching their kernels costs more than
running them.

Note: nothing in the step reads the device from the host, queries an event or allocates
through the engine (tests/test_capture_ready.py checks that the boundary step dispatches no
torch op at all), so torch.cuda.graph can capture it. What Python would do on each step is
done here around the replay instead (StepPipeline.before_boundary): the hyper-parameters an
LR scheduler changed are written to the device before it (the captured optimizer reads them
there), the lagged skip check reads its pinned host copy, parameters written in place
(model.load_state_dict) are copied into the fp32 master weights, and the previous result
freezes its flag before the replay overwrites the live one. The flag, the loss scale, the step counts and the
boundary count all live on the device, so replays count and skip exactly as eager steps do.
"""
import torch

from .devices import on_engine_device
from .step import StepResult


class StepGraph:
    """Captures `step_fn` followed by engine.step(). step_fn runs the forward on the model's
    static input tensors and calls engine.backward(loss); it may return tensors (e.g. the
    loss), which replay() then refreshes in place. The first `warmup` steps run eagerly (they
    are real training steps) before the capture, as torch.cuda.graph requires."""

    def __init__(self, engine, step_fn, warmup=3):
        if engine.device.type != "cuda":
            raise RuntimeError("Engine.capture: CUDA graphs need a model on a CUDA device")
        if engine.distributed:
            raise NotImplementedError("Engine.capture: data-parallel steps are not captured yet; use one process")
        if engine.config.grad_accum_steps != 1:
            raise ValueError("Engine.capture: needs grad_accum_steps=1 (one captured step is one update)")
        if engine.micro_step != 0:
            raise RuntimeError("Engine.capture: call it between steps")
        self.engine = engine
        side = torch.cuda.Stream(engine.device)
        side.wait_stream(torch.cuda.current_stream(engine.device))
        with torch.cuda.stream(side):
            for _ in range(warmup):
                step_fn()
                engine.step()
            engine.plan.sync_hyper(side.cuda_stream)  # nothing left for the capture to write
        torch.cuda.current_stream(engine.device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.outputs = step_fn()
            engine.step()

    @property
    def _cuda_index(self):
        return self.engine._cuda_index

    @on_engine_device
    def replay(self) -> StepResult:
        """One training step on whatever the static inputs hold now."""
        e = self.engine
        pipeline = e._pipeline
        pipeline.before_boundary()
        e.plan.sync_hyper(e.plan.stream())
        self.graph.replay()
        e.optimizer.notify_step()  # LR schedulers count optimizer.step() calls
        e.window.boundaries += 1
        return pipeline.new_result()
