"""The pieces of EngineConfig(deterministic=True), one process: the micro-batch tree, the
exchange's pairing, the deterministic layout, the chunk sums (against a float64 reference),
and the engine against plain PyTorch summing the same tree."""
import math

import pytest
import torch

from pyengine import Engine, EngineConfig
from pyengine._native import _C
from pyengine.deterministic import MicroTree, pairwise_sum, tree_ranges
from pyengine.layout import NORM_CHUNK, Layout, bit_reverse


def _leaf(x):
    return x if isinstance(x, int) else _leaf(x[0])


def _play(m):
    """MicroTree(m)'s operations on symbols: each buffer holds the tree it has summed. A
    micro-batch's backward adds its leaf onto whatever the gradient buffer holds."""
    t = MicroTree(m)
    grad, slots = None, [None] * t.depth

    def add(a, b):
        return (a, b) if _leaf(a) < _leaf(b) else (b, a)  # a + b == b + a

    for j in range(m):
        grad = j if grad is None else add(grad, j)
        for op, dst, *src in t.fold(j):
            get = (lambda x: grad if x == "G" else slots[x])
            value = None if op == "zero" else get(src[0]) if op == "copy" else add(get(dst), get(src[0]))
            if dst == "G":
                grad = value
            else:
                slots[dst] = value
        if j < m - 1 and not t.lands(j):
            assert grad is None, "the buffer is cleared for the next leaf"
    return grad, t


@pytest.mark.parametrize("m", list(range(1, 34)))
def test_the_streamed_folds_build_the_midpoint_tree(m):
    root, t = _play(m)
    assert root == t.shape()
    assert t.depth <= max(0, math.ceil(math.log2(m)) - 1), "landing saves a level"
    assert sum(map(t.lands, range(m))) == sum(1 for j in range(m - 1) if t.lands(j))  # never the last leaf


@pytest.mark.parametrize("G", [2, 4, 8, 12, 16, 24])
def test_each_ranks_micro_batches_are_a_subtree_of_the_global_tree(G):
    """Why a rank's sum plus the exchange equals the tree over all G: at every d that is a
    power of two dividing G, the global tree's nodes log2(d) levels down are the ranks'
    ranges, each shaped as MicroTree(G / d)."""
    whole = MicroTree(G).shape()

    def shift(tree, by):
        return tree + by if isinstance(tree, int) else (shift(tree[0], by), shift(tree[1], by))

    d = 1
    while G % d == 0:
        level = [whole]
        for _ in range(int(math.log2(d))):
            level = [child for node in level for child in node]
        m = G // d
        assert level == [shift(MicroTree(m).shape(), r * m) for r in range(d)]
        d *= 2


def test_bit_reverse():
    assert [bit_reverse(r, 8) for r in range(8)] == [0, 4, 2, 6, 1, 5, 3, 7]
    assert bit_reverse(0, 1) == 0 and [bit_reverse(r, 2) for r in range(2)] == [0, 1]


@pytest.mark.parametrize("world", [1, 2, 4, 8])
@pytest.mark.parametrize("n", [0, 1, 7, 64, 1000, 4096])
def test_the_exchange_sums_every_element_in_the_fixed_rank_tree(world, n):
    """Played symbolically: each element's sum is ((R0 + R1) + (R2 + R3)) + ... whichever rank
    holds it; the kept ranges tile [0, n); with n a multiple of world, rank r keeps slice
    bitrev(r) (the deterministic layout's ownership)."""
    held = {r: [r] * n for r in range(world)}  # held[r][e]: the tree of rank values element e holds
    rounds = {r: tree_ranges(n, r, world) for r in range(world)}
    for k in range(int(math.log2(world))):
        new = {r: list(held[r]) for r in range(world)}
        for r in range(world):
            peer, k0, k1, s0, s1 = rounds[r][k]
            assert rounds[peer][k][0] == r and rounds[peer][k][3:5] == (k0, k1), "the peer sends what r keeps"
            for e in range(k0, k1):
                a, b = held[r][e], held[peer][e]
                new[r][e] = (a, b) if _leaf(a) < _leaf(b) else (b, a)
        held = new
    expected = list(range(world))
    while len(expected) > 1:
        expected = [(expected[i], expected[i + 1]) for i in range(0, len(expected), 2)]
    expected = expected[0]
    kept = []
    for r in range(world):
        lo, hi = (rounds[r][-1][1], rounds[r][-1][2]) if rounds[r] else (0, n)
        kept.append((lo, hi))
        for e in range(lo, hi):
            assert held[r][e] == expected, (r, e, held[r][e])
        if n % world == 0:
            s = bit_reverse(r, world)
            assert (lo, hi) == (s * n // world, (s + 1) * n // world)
    assert sorted(kept)[0][0] == 0 and sorted(kept)[-1][1] == n
    assert sum(hi - lo for lo, hi in kept) == n


def test_the_deterministic_layout_is_chunk_aligned_and_owns_by_bit_reversal():
    numels = [3, 700, 5, 2048, 1, 0, 513]
    for world in (1, 2, 4):
        for bucket in (None, 600, 3000):
            L = Layout(numels, [list(reversed(range(len(numels))))], bucket_elems=bucket, shard_world=world,
                       deterministic=True)
            assert all(s.offset % NORM_CHUNK == 0 for s in L.slots)
            assert L.numel % (NORM_CHUNK * world) == 0
            for r in range(world):
                for o in L.owned(r):
                    assert o.start % NORM_CHUNK == 0 and o.numel % NORM_CHUNK == 0
                    b = L.buckets[o.bucket]
                    assert o.start == b.start + bit_reverse(r, world) * (b.numel // world)
            again = L.reordered(list(range(len(numels))))
            assert again.deterministic and all(s.offset % NORM_CHUNK == 0 for s in again.slots)
    with pytest.raises(ValueError, match="power of two"):
        Layout(numels, [list(range(len(numels)))], shard_world=3, deterministic=True)


# -- chunk_sumsq: the core op the norm is built on -----------------------------------------------
def _chunk_sumsq(x, chunk, inv=None):
    rows = x.numel() // chunk
    out = torch.full((rows,), -1.0, dtype=torch.float64)
    inv_t = torch.tensor([inv], dtype=torch.float32) if inv is not None else None
    _C.chunk_sumsq(x.data_ptr(), {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}[x.dtype], rows, chunk,
                   inv_t.data_ptr() if inv_t is not None else 0, out.data_ptr(), 0)
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("rows,chunk", [(0, 512), (1, 1), (3, 7), (5, 8), (2, 9), (257, 512), (4, 4099)])
def test_chunk_sumsq_matches_float64(dtype, rows, chunk):
    x = torch.randn(rows * chunk).mul_(3).to(dtype)
    for inv in (None, 0.125, 3.0):
        y = x.float() * (inv if inv is not None else 1.0)  # the scaled value is rounded to fp32, as in the op
        ref = (y.double() ** 2).view(rows, chunk).sum(1) if rows else torch.zeros(0, dtype=torch.float64)
        got = _chunk_sumsq(x, chunk, inv)
        # squares are exact in double; a sum of `chunk` positive terms in double is within
        # chunk x 2^-53 relative (both orders)
        assert torch.allclose(got, ref, rtol=2 * chunk * 2.0**-53, atol=0), (got - ref).abs().max()


def test_chunk_sumsq_flags_inf_and_nan_and_does_not_overflow_on_large_finite_values():
    x = torch.ones(4 * 16)
    x[3] = float("inf")
    x[16 + 5] = float("nan")
    x[32:48] = 3e38  # finite: its square overflows float32, not double
    got = _chunk_sumsq(x, 16)
    assert got[0] == math.inf and math.isnan(got[1]) and math.isfinite(got[2]) and got[3] == 16
    assert got[2] == pytest.approx(16 * float(torch.tensor(3e38)) ** 2, rel=1e-12)


def test_chunk_sumsq_depends_on_the_values_alone_not_the_address_or_threads():
    import pyengine

    base = torch.randn(64 * 512 + 3)
    a = base[:64 * 512].clone()
    shifted = base.clone()
    shifted[3:] = a  # the same values 12 bytes off the allocation's alignment
    ref = _chunk_sumsq(a, 512)
    assert torch.equal(_chunk_sumsq(shifted[3:], 512), ref)
    before = pyengine.get_num_threads() if hasattr(pyengine, "get_num_threads") else None
    try:
        for threads in (1, 2):
            pyengine.set_num_threads(threads)
            assert torch.equal(_chunk_sumsq(a, 512), ref)
    finally:
        if before:
            pyengine.set_num_threads(before)


def test_pairwise_sum_is_the_fixed_tree():
    def ref(values):
        level = list(values)
        while len(level) > 1:
            level = [level[i] + level[i + 1] if i + 1 < len(level) else level[i] for i in range(0, len(level), 2)]
        return level[0] if level else 0.0

    for n in (0, 1, 2, 3, 7, 100, 1025):
        x = torch.rand(n, dtype=torch.float64) * 10 ** torch.randint(-8, 8, (n,)).double()
        got = pairwise_sum(x)
        assert got.shape == () and float(got) == ref(x.tolist())  # Python floats add as doubles: bitwise


# -- the engine against plain PyTorch summing the same tree --------------------------------------
def _model():
    torch.manual_seed(3)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))


def _batches(G):
    g = torch.Generator().manual_seed(11)
    return [(torch.randn(4, 6, generator=g), torch.randn(4, 3, generator=g)) for _ in range(G)]


def _tree_sum(values, lo=0, hi=None):
    hi = len(values) if hi is None else hi
    if hi - lo == 1:
        return values[lo]
    mid = lo + (hi - lo) // 2
    return _tree_sum(values, lo, mid) + _tree_sum(values, mid, hi)


@pytest.mark.parametrize("G", [1, 3, 4, 8])
def test_one_process_steps_with_torchs_gradients_summed_in_the_tree(G):
    """SGD at lr 1: w - g is one rounding in any implementation, so the engine's update must be
    the bits of w minus the tree sum of torch's micro-batch gradients (each of loss x 1/G)."""
    model, ref = _model(), _model()
    engine = Engine(model, EngineConfig(optimizer="sgd", lr=1.0, grad_accum_steps=G, deterministic=True))
    grads = []
    factor = torch.ones(1) * (1.0 / G)  # the engine's factor: loss scale (1) x 1/G, one float32 rounding
    for x, y in _batches(G):
        loss = torch.nn.functional.mse_loss(model(x), y)
        engine.backward(loss)
        engine.step()
        ref.zero_grad(set_to_none=True)
        (torch.nn.functional.mse_loss(ref(x), y).float() * factor).sum().backward()
        grads.append([p.grad.clone() for p in ref.parameters()])
    with torch.no_grad():
        for k, (p, q) in enumerate(zip(model.parameters(), ref.parameters())):
            expected = q - _tree_sum([g[k] for g in grads])
            assert torch.equal(p, expected), (k, (p - expected).abs().max())
    norm = math.sqrt(sum(float((_tree_sum([g[k] for g in grads]).double() ** 2).sum())
                         for k in range(len(grads[0]))))
    assert engine.grad_norm == pytest.approx(norm, rel=1e-6)  # float32 result of a float64 sum


def test_zero_grad_in_the_window_discards_the_partial_sums_as_torch_does():
    G = 4
    model, ref = _model(), _model()
    engine = Engine(model, EngineConfig(optimizer="sgd", lr=1.0, grad_accum_steps=G, deterministic=True))
    grads = []
    factor = torch.ones(1) * (1.0 / G)
    for j, (x, y) in enumerate(_batches(G)):
        if j == 2:
            model.zero_grad()  # torch: what the window accumulated so far is gone
            grads = []
        engine.backward(torch.nn.functional.mse_loss(model(x), y))
        engine.step()
        ref.zero_grad(set_to_none=True)
        (torch.nn.functional.mse_loss(ref(x), y).float() * factor).sum().backward()
        grads.append([p.grad.clone() for p in ref.parameters()])
    with torch.no_grad():
        for k, (p, q) in enumerate(zip(model.parameters(), ref.parameters())):
            assert torch.equal(p, q - (grads[0][k] + grads[1][k]))


def test_grad_between_micro_batches_says_it_holds_one_micro_batch():
    from pyengine.errors import GradientAccessError

    model = _model()
    engine = Engine(model, EngineConfig(grad_accum_steps=2, deterministic=True))
    x, y = _batches(1)[0]
    engine.backward(torch.nn.functional.mse_loss(model(x), y))
    with pytest.raises(GradientAccessError, match="fixed tree"):
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)


def test_a_narrower_wire_is_refused():
    with pytest.raises(ValueError, match="accumulation dtype"):
        EngineConfig(deterministic=True, precision="bf16", comm_dtype="bf16")
    with pytest.raises(ValueError, match="accumulation dtype"):
        EngineConfig(deterministic=True, comm_dtype="fp16")
    EngineConfig(deterministic=True, precision="bf16", accum_dtype="param", comm_dtype="bf16")  # its own dtype
