import os
import zlib

import pytest
import torch

import pyengine

SIZES = [0, 1, 3, 4097, 2**20 + 5]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Elements of offset from an aligned allocation: 0 aligned, 1 and 3 never 16-byte aligned.
OFFSETS = [0, 1, 3]


def has_cuda():
    return pyengine.cuda_available() and torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="needs a CUDA GPU and pyengine's CUDA kernels")
    for item in items:
        if "cuda" in item.keywords and not has_cuda():
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def restored_environment():
    """Each test starts with the environment the session had: Lightning and Accelerate write
    RANK / WORLD_SIZE / LOCAL_RANK / MASTER_* into os.environ, which would make a later test in
    the same worker look launched by torchrun."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(autouse=True)
def fixed_seed(request):
    """A seed fixed per test (derived from its id), printed; PYENGINE_TEST_SEED overrides it
    to replay or explore other data."""
    override = os.environ.get("PYENGINE_TEST_SEED")
    seed = int(override) if override else zlib.crc32(request.node.nodeid.encode()) & 0x7FFFFFFF
    torch.manual_seed(seed)
    print(f"PYENGINE_TEST_SEED={seed} ({request.node.nodeid})")
    yield seed


def unaligned(n, dtype, offset=0, device="cpu", scale=1.0):
    """n random values starting `offset` elements into a larger allocation."""
    base = torch.randn(n + offset, device=device, dtype=torch.float32).mul_(scale).to(dtype)
    return base[offset:]


def assert_close(actual, expected, rtol, atol, msg=""):
    actual = actual.double().flatten()
    expected = expected.double().flatten()
    err = (actual - expected).abs()
    bound = atol + rtol * expected.abs()
    bad = err > bound
    if bool(bad.any()):
        i = int(bad.nonzero()[0])
        raise AssertionError(f"{msg}: {int(bad.sum())} mismatches, first at {i}: "
                             f"{actual[i].item()} vs {expected[i].item()}")


def rounding(dtype):
    """Relative rounding error of one cast into dtype."""
    return {torch.float32: 2**-23, torch.float16: 2**-10, torch.bfloat16: 2**-7}[dtype]
