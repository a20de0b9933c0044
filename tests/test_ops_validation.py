"""Bad input gets a clear ValueError/TypeError naming the argument, never a crash."""
import numpy as np
import pytest
import torch

from pyengine import ops


def counter(value=0):
    return torch.tensor([value], dtype=torch.int64)


def test_wrong_dtype_names_argument():
    with pytest.raises(TypeError, match="dst: expected float32"):
        ops.accumulate_(torch.zeros(4, dtype=torch.float16), torch.zeros(4))
    with pytest.raises(TypeError, match="src: expected a float32, float16 or bfloat16 tensor, got torch.int64"):
        ops.accumulate_(torch.zeros(4), torch.zeros(4, dtype=torch.int64))


def test_not_an_array():
    with pytest.raises(TypeError, match="grad: expected a torch tensor"):
        ops.unscale_check_sumsq([1.0, 2.0], torch.zeros(1), torch.zeros(1))


def test_size_mismatch():
    with pytest.raises(ValueError, match="src has 5 elements but dst has 4"):
        ops.accumulate_(torch.zeros(4), torch.zeros(5))
    with pytest.raises(ValueError, match="exp_avg has 3 elements but master has 4"):
        ops.adamw_step(torch.zeros(4), torch.zeros(3), torch.zeros(4), torch.zeros(4), counter(), lr=0.1)


def test_non_contiguous():
    x = torch.zeros(4, 4).t()
    with pytest.raises(ValueError, match="src: expected a contiguous tensor"):
        ops.cast_scale(x, torch.zeros(4, 4))


def test_overlap_rejected():
    buf = torch.zeros(10)
    with pytest.raises(ValueError, match="overlap"):
        ops.cast_scale(buf[0:6], buf[4:10])
    with pytest.raises(ValueError, match="master and exp_avg overlap"):
        ops.adamw_step(buf[0:5], buf[2:7], torch.zeros(5), torch.zeros(5), counter(), lr=0.1)


def test_scalar_buffers_checked():
    with pytest.raises(ValueError, match="out: expected a float32 array of at least 2"):
        ops.clip_coef(torch.zeros(1), 1.0, torch.zeros(1))
    with pytest.raises(TypeError, match="found_inf: expected float32"):
        ops.unscale_check_sumsq(torch.zeros(3), torch.zeros(1, dtype=torch.float16), torch.zeros(1))


def test_hyperparameters_checked():
    args = (torch.zeros(4), torch.zeros(4), torch.zeros(4), torch.zeros(4), counter())
    with pytest.raises(ValueError, match="lr: must be >= 0"):
        ops.adamw_step(*args, lr=-1.0)
    with pytest.raises(ValueError, match=r"betas\[1\]: must be < 1"):
        ops.adamw_step(*args, lr=1.0, betas=(0.9, 1.0))
    with pytest.raises(TypeError, match="lr: expected a number"):
        ops.adamw_step(*args, lr="fast")
    with pytest.raises(ValueError, match="nesterov"):
        ops.sgd_step(torch.zeros(4), torch.zeros(4), counter(), lr=0.1, nesterov=True)
    with pytest.raises(ValueError, match="momentum_buf: required"):
        ops.sgd_step(torch.zeros(4), torch.zeros(4), counter(), lr=0.1, momentum=0.9)
    with pytest.raises(TypeError, match="maximize: expected True or False"):
        ops.adamw_step(*args, lr=1.0, maximize=1)
    with pytest.raises(TypeError, match="maximize: expected True or False"):
        ops.sgd_step(torch.zeros(4), torch.zeros(4), counter(), lr=0.1, maximize="yes")
    lion = (torch.zeros(4), torch.zeros(4), torch.zeros(4), counter())
    with pytest.raises(ValueError, match="lr: must be >= 0"):
        ops.lion_step(*lion, lr=-1e-4)
    with pytest.raises(ValueError, match=r"betas\[0\]: must be <= 1"):
        ops.lion_step(*lion, betas=(1.5, 0.99))
    with pytest.raises(TypeError, match="betas: expected a pair"):
        ops.lion_step(*lion, betas=0.9)
    with pytest.raises(ValueError, match="weight_decay: must be >= 0"):
        ops.lion_step(*lion, weight_decay=-0.1)
    with pytest.raises(ValueError, match="exp_avg has 3 elements but master has 4"):
        ops.lion_step(torch.zeros(4), torch.zeros(3), torch.zeros(4), counter())


def test_step_counter_must_be_int64():
    args = (torch.zeros(4), torch.zeros(4), torch.zeros(4), torch.zeros(4))
    with pytest.raises(TypeError, match="step: expected an int64 step counter, got torch.float32; use an int64"):
        ops.adamw_step(*args, torch.zeros(1), lr=0.1)
    with pytest.raises(TypeError, match="step: expected an int64 step counter, got torch.int32"):
        ops.lion_step(torch.zeros(4), torch.zeros(4), torch.zeros(4), torch.zeros(1, dtype=torch.int32))
    with pytest.raises(TypeError, match="step: expected an int64 step counter, got typestr '<f4'"):
        ops.sgd_step(torch.zeros(4), torch.zeros(4), np.zeros(1, dtype=np.float32), lr=0.1)
    with pytest.raises(ValueError, match="step: expected an int64 array of at least 1"):
        ops.adamw_step(*args, torch.zeros(0, dtype=torch.int64), lr=0.1)
    with pytest.raises(ValueError, match="step and master overlap"):
        ops.adamw_step(*args, args[0][:2].view(torch.int64), lr=0.1)
    step = np.zeros(1, dtype=np.int64)  # numpy arrays work as well
    ops.adamw_step(*(np.zeros(4, dtype=np.float32) for _ in range(4)), step, lr=0.1)
    assert step.tolist() == [1]


def test_native_optimizer_checks_its_pointers():
    from pyengine import _native

    C = _native._C
    p, g, step = torch.zeros(4), torch.zeros(4), counter()
    hyper = torch.zeros(C.HYPER_SLOTS)
    a = C.OptimizerArgs()
    a.master, a.grad, a.state1, a.state2, a.n, a.step = p.data_ptr(), g.data_ptr(), p.data_ptr(), g.data_ptr(), 4, \
        step.data_ptr()
    with pytest.raises(ValueError, match="adamw_step: hyper is required"):
        C.adamw_step(a, 0)
    a.hyper = hyper.data_ptr()
    a.state2 = 0
    with pytest.raises(ValueError, match="adam_step: state2 is null"):
        C.adam_step(a, 0)
    a.step = 0
    with pytest.raises(ValueError, match="lion_step: step is required"):
        C.lion_step(a, 0)


def test_device_mismatch_is_reported_before_any_launch():
    meta = torch.zeros(4, device="meta")
    with pytest.raises(ValueError, match="meta"):
        ops.accumulate_(meta, torch.zeros(4))


def test_flatten_checks():
    with pytest.raises(ValueError, match="flat has 3 elements but the tensors hold 4"):
        ops.flatten([torch.zeros(2), torch.zeros(2)], torch.zeros(3))
    with pytest.raises(TypeError, match=r"tensors\[1\]: all tensors must share one dtype"):
        ops.flatten([torch.zeros(2), torch.zeros(2, dtype=torch.float16)], torch.zeros(4))


def test_numpy_arrays_work_and_read_only_output_is_rejected():
    src = np.arange(6, dtype=np.float32)
    out = np.zeros(6, dtype=np.float16)
    ops.cast_scale(src, out, 0.5)
    assert out.tolist() == [0.0, 0.5, 1.0, 1.5, 2.0, 2.5]
    ro = np.zeros(6, dtype=np.float32)
    ro.setflags(write=False)
    with pytest.raises(ValueError, match="out: the array is read-only"):
        ops.cast_scale(src, ro)


def test_loss_scale_args():
    state = ops.new_loss_scale_state(2.0**16, 2, "cpu")
    with pytest.raises(ValueError, match="state: expected a float32 array of at least 8"):
        ops.update_loss_scale(torch.zeros(3), torch.zeros(1))
    with pytest.raises(ValueError, match="backoff_factor"):
        ops.update_loss_scale(state, torch.zeros(1), backoff_factor=1.5)


def test_cuda_optimizer_checks_hyper_on_the_host():
    """The CUDA drivers refuse a null hyper block (or step) before any launch, so this runs
    wherever the CUDA kernels are compiled, GPU or not."""
    from pyengine import _native

    if _native._cuda is None:
        pytest.skip("built without CUDA kernels")
    for o in _native._cuda.OPTIMIZERS:
        a = _native._cuda.OptimizerArgs()
        a.n, a.step = 4, 8
        with pytest.raises(ValueError, match=f"{o['function']}: hyper is required"):
            getattr(_native._cuda, o["function"])(a, 0)
        a.hyper, a.step = 8, 0
        with pytest.raises(ValueError, match=f"{o['function']}: step is required"):
            getattr(_native._cuda, o["function"])(a, 0)
