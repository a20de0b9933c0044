"""--deterministic: reported means whose bits do not depend on the number of ranks.

Note: an allreduce of per-rank means sums in an order that depends on the world size (and
a mean of means rounds twice), so under --deterministic the ranks all-gather their single
values (one per micro-batch, or per held-out batch) into one vector in global order, and
every rank folds that vector in one fixed pairwise tree (tree_mean): the same additions in
the same order at 1, 2 or 4 ranks.
"""
import torch
import torch.distributed as dist

# torch 2.13 renamed the single-tensor all-gather; older releases have only the old name
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def tree_mean(values: torch.Tensor) -> torch.Tensor:
    """The mean of a 1-D tensor, summed in a fixed pairwise tree: the vector is padded with
    zeros to a power of two (x + 0 is x) and neighbours added level by level, then divided
    by the number of values. The order depends on the length alone."""
    n = values.numel()
    if n == 0:
        raise ValueError("tree_mean of no values")
    v = values.reshape(-1)
    width = 1 << (n - 1).bit_length()
    if width != n:
        v = torch.cat([v, v.new_zeros(width - n)])
    while v.numel() > 1:
        v = v[0::2] + v[1::2]
    return v[0] / n


def _world():
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def gather_equal(local: torch.Tensor) -> torch.Tensor:
    """Every rank's `local` (the same length everywhere), concatenated in rank order."""
    world = _world()
    if world == 1:
        return local.reshape(-1)
    local = local.reshape(-1).contiguous()
    out = local.new_empty(world * local.numel())
    if local.is_cuda and dist.get_backend() == "gloo":  # gloo gathers CUDA tensors into a list only
        dist.all_gather(list(out.chunk(world)), local)
    else:
        _all_gather(out, local)
    return out


def gather_strided(local: torch.Tensor, n: int) -> torch.Tensor:
    """The n values that rank r holds at positions r, r + world, r + 2 world, ... (`local`
    in that order), back in global order. Ranks with fewer pad to ceil(n / world)."""
    world = _world()
    per = -(-n // world)
    if local.numel() < per:
        local = torch.cat([local.reshape(-1), local.new_zeros(per - local.numel())])
    # [world, per] in rank order; value i sits at row i % world, column i // world
    return gather_equal(local).view(world, per).t().reshape(-1)[:n]
