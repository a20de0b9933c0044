"""accumulate, cast_scale and the multi-tensor flatten/unflatten against float64 references."""
import pytest
import torch

from conftest import DTYPES, OFFSETS, SIZES, assert_close, rounding, unaligned
from pyengine import ops


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("src_dtype", DTYPES)
@pytest.mark.parametrize("offset", OFFSETS)
def test_accumulate(n, src_dtype, offset):
    dst = unaligned(n, torch.float32, offset)
    src = unaligned(n, src_dtype, (offset + 1) % 4)
    expected = dst.double() + 0.37 * src.double()
    ops.accumulate_(dst, src, 0.37)
    # two fp32 roundings of the float64 result (product, sum), 2^-24 each; absolute slack of
    # ulps of the inputs where dst and src cancel to near zero
    assert_close(dst, expected, rtol=2**-22, atol=1e-7, msg="accumulate")


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("src_dtype", DTYPES)
@pytest.mark.parametrize("dst_dtype", DTYPES)
@pytest.mark.parametrize("offset", [0, 1])
def test_cast_scale(n, src_dtype, dst_dtype, offset):
    src = unaligned(n, src_dtype, offset)
    out = torch.empty(n + offset, dtype=dst_dtype)[offset:]
    ops.cast_scale(src, out, alpha=0.125 if offset else 1.0)
    expected = src.double() * (0.125 if offset else 1.0)
    # one float op (exact for a power-of-two alpha) and one rounding into dst: torch's cast
    assert torch.equal(out, expected.float().to(dst_dtype)), "cast_scale must round exactly as torch does"


@pytest.mark.parametrize("dst_dtype", [torch.float16, torch.bfloat16])
def test_cast_special_values(dst_dtype):
    vals = [float("inf"), float("-inf"), float("nan"), 65504.0, 65520.0, 1e-8, -0.0, 6e-5, 3e38, 1.0000001]
    src = torch.tensor(vals, dtype=torch.float32)
    out = torch.empty(len(vals), dtype=dst_dtype)
    ops.cast_scale(src, out)
    ref = src.to(dst_dtype)
    same = (out == ref) | (out.isnan() & ref.isnan())
    assert bool(same.all()), f"{out} vs {ref}"
    assert torch.equal(out.view(torch.int16)[~ref.isnan()], ref.view(torch.int16)[~ref.isnan()])


def test_cast_overflow_to_fp16_is_inf():
    src = torch.tensor([70000.0, -1e6, 65504.0])
    out = torch.empty(3, dtype=torch.float16)
    ops.cast_scale(src, out)
    assert out[0].item() == float("inf") and out[1].item() == float("-inf") and out[2].item() == 65504.0


def test_cast_in_place_same_dtype():
    x = torch.randn(1001)
    expected = x * 0.5
    ops.cast_scale(x, x, 0.5)
    assert torch.equal(x, expected)


@pytest.mark.parametrize("tensor_dtype", DTYPES)
@pytest.mark.parametrize("flat_dtype", DTYPES)
def test_flatten_unflatten_round_trip(tensor_dtype, flat_dtype):
    shapes = [(3, 5), (0,), (1,), (4097,), (70000,), (2, 3, 7)]
    tensors = [torch.randn(s).to(tensor_dtype) for s in shapes]
    total = sum(t.numel() for t in tensors)
    flat = torch.empty(total, dtype=flat_dtype)
    ops.flatten(tensors, flat, alpha=0.5)
    expected = torch.cat([t.flatten().double() * 0.5 for t in tensors]).float().to(flat_dtype)
    assert torch.equal(flat, expected)
    back = [torch.empty_like(t) for t in tensors]
    ops.unflatten(flat, back, alpha=2.0)
    for b, f in zip(back, torch.split(flat, [t.numel() for t in tensors])):
        assert torch.equal(b.flatten(), (f.double() * 2.0).float().to(tensor_dtype))


def test_flatten_many_tensors():
    tensors = [torch.randn(i % 7 + 1) for i in range(3000)]
    flat = torch.empty(sum(t.numel() for t in tensors))
    ops.flatten(tensors, flat)
    assert torch.equal(flat, torch.cat(tensors))


def test_fp16_subnormals_survive():
    src = torch.tensor([6e-8, 1e-7, -3e-6, 5.96e-8], dtype=torch.float16)
    dst = torch.zeros(4)
    ops.accumulate_(dst, src)
    assert torch.equal(dst, src.float())
    assert rounding(torch.float16) == 2**-10


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_fill(n, dtype):
    x = unaligned(n, dtype, n % 3)
    ops.fill_(x, 0.0)
    assert bool((x == 0).all())
    ops.fill_(x, -2.5)  # exactly representable in every dtype
    assert bool((x == -2.5).all())
    with pytest.raises(ValueError, match="value: must not be NaN"):
        ops.fill_(x, float("nan"))


@pytest.mark.parametrize("dtype", DTYPES)
def test_flat_copy_checked_once_then_reused(dtype):
    parts = [unaligned(n, dtype, n % 3) for n in (0, 1, 4097, 33)]
    flat = torch.empty(sum(p.numel() for p in parts), dtype=torch.float32)
    copy = ops.FlatCopy(parts, flat, alpha=0.5)
    copy.flatten()
    assert torch.equal(flat, torch.cat([p.float() * 0.5 for p in parts]))  # one product, exact for 0.5
    for p in parts:
        p.zero_()
    copy.unflatten()
    assert torch.equal(torch.cat([p.float() for p in parts]), (flat * 0.5).to(dtype).float())
    with pytest.raises(ValueError, match="flat and tensors overlap"):
        ops.FlatCopy([flat[:4]], flat[2:6])
    with pytest.raises(ValueError, match="two of the tensors overlap"):
        base = torch.zeros(8)
        ops.FlatCopy([base[0:4], base[2:6]], torch.zeros(8)).unflatten()
    with pytest.raises(TypeError, match=r"tensors\[1\]: all tensors must share one dtype"):
        ops.FlatCopy([torch.zeros(2), torch.zeros(2, dtype=torch.float16)], torch.zeros(4))
